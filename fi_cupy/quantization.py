"""Mask packing (FlashInfer keeps these in flashinfer.quantization): `packbits` and `segment_packbits`
(cuda_src/packbits.cu), as numpy.packbits does it. Prefill takes custom masks packed little-endian: each
request's (qo_len, kv_len) boolean mask flattened row-major, packed on its own and padded to a whole byte,
the requests concatenated."""
from __future__ import annotations

import numpy as np

from ._core import arrays, checks, kernels
from ._core import dtypes as dt
from ._core.call import Call
from ._core.fastpath import Signatures
from ._core.readback import download
from ._core.docs import KERNEL_GLOSSARY, document
from ._core.workspace import upload
from ._core.kernels import KernelSpec, Program, i32, i64, ptr

BITORDERS = ("big", "little")
MASK_DTYPES = (dt.bool_, dt.uint8, dt.int8)


def packbits_program(little: bool) -> Program:
    return Program("packbits.cu", (KernelSpec("fic::segment_packbits_kernel", (kernels.cpp_bool(little),)),))


def packed_indptr(indptr: np.ndarray) -> np.ndarray:
    """Byte offsets of the packed segments: each segment of n bits takes ceil(n / 8) bytes."""
    return np.concatenate([[0], np.cumsum((np.diff(indptr) + 7) // 8)]).astype(np.int64)


def _describe(c: Call, x, name: str = "x"):
    xi = c.arg(x, name)
    if xi.dtype not in MASK_DTYPES:
        raise TypeError(f"{name}: expected a bool (or uint8) mask, got {xi.dtype}")
    checks.ndim(xi, 1, "(n,): a flattened mask")
    checks.contiguous(xi)
    return xi


_SIGS = Signatures()  # packbits' recorded calls: they read the offsets kept in _whole
_whole: dict = {}  # (device, n) -> ArrayInfo of [0, n, 0, ceil(n / 8)] (int64): one segment's offsets


def _whole_offsets(c: Call, n: int):
    """The device offsets of packbits' one segment of n elements, uploaded once per length and kept (a
    recorded call, on any stream, reads them; both are dropped together when the cache is full)."""
    m = _whole.get((c.device, n))
    if m is None:
        if len(_whole) >= 64:
            _whole.clear()
            _SIGS.clear()
        host = np.array([0, n, 0, (n + 7) // 8], np.int64)
        obj = arrays.empty("cupy", host.shape, dt.int64, c.device, c.stream)
        m = _whole[(c.device, n)] = arrays.describe(obj, "offsets")
        upload(host, m.ptr, c.device, c.stream)
        from cupy.cuda import runtime
        runtime.streamSynchronize(c.stream)  # once per length: a replay on another stream may read them next
    c.fixed(m)
    return m


def _pack(c: Call, xi, indptr: np.ndarray | None, bitorder: str, name: str = "x"):
    """(packed object, host out_indptr) of x's segments at host `indptr` (None: x is one segment)."""
    checks.choice("bitorder", bitorder, BITORDERS)
    whole = indptr is None
    if whole:
        indptr = np.array([0, xi.shape[0]], np.int64)
    if indptr[-1] != xi.shape[0]:
        raise ValueError(f"indptr: indptr[-1] = {indptr[-1]} but {name} has {xi.shape[0]} elements")
    out_indptr = packed_indptr(indptr)
    n_out = int(out_indptr[-1])
    obj, o = c.new((n_out,), dt.uint8, "packed")
    if n_out:
        m = _whole_offsets(c, xi.shape[0]) if whole else \
            _to_device(c, np.concatenate([indptr.astype(np.int64), out_indptr]), dt.int64)[1]
        prog = packbits_program(bitorder == "little")
        fn = kernels.functions(prog, c.device)[prog.kernels[0]]
        c.launch(fn, (-(-n_out // 256),), (256,),
                 [ptr(xi), ptr(m), ptr(m, 8 * indptr.size), i32(indptr.size - 1), ptr(o), i64(n_out)])
    return obj, out_indptr


# Each parameter's entry, once for the module (docs.document writes the Parameters sections).
_PARAMS = {**KERNEL_GLOSSARY,
           "x": ("array\n"
                 "    ``(n,)`` bool, uint8 or int8 (nonzero is 1), contiguous, on a CUDA device (torch, JAX, CuPy\n"
                 "    or any DLPack producer)."),
           "bitorder": ("str, default \"big\"\n"
                        "    ``\"big\"``: the first element goes to the most significant bit of its byte (numpy's\n"
                        "    default); ``\"little\"``: to the least significant (the order prefill's\n"
                        "    packed_custom_mask uses)."),
           "indptr": ("array\n"
                      "    ``(num_segments + 1,)`` integer offsets of the segments in x: starting at 0,\n"
                      "    non-decreasing, ``indptr[-1] = len(x)``. Read on the host: pass a numpy array (a device\n"
                      "    array is copied back, one synchronisation).")}


@document("Pack a 1-D boolean array into bits of a uint8 array, as ``numpy.packbits`` does.",
          returns=("array\n"
                   "    ``(ceil(n / 8),)`` uint8: a new array in x's framework."), glossary=_PARAMS,
          notes=("The segment offsets are uploaded once per length of x and kept: the first call of a length waits\n"
                 "for the upload, later ones do not synchronise. ``stream`` is fi_cupy's addition."))
def packbits(x, bitorder: str = "big", stream=None):
    """Elements ``8j .. 8j + 7`` become byte j; the last byte is padded with zero bits."""
    return _SIGS((x,), ("packbits", bitorder), stream, lambda: _packbits(x, bitorder, stream))


def _packbits(x, bitorder, stream):
    c = Call(x, stream, name="x")
    obj, _ = _pack(c, _describe(c, x), None, bitorder)
    return c.result(obj)


@document("Pack each segment of a 1-D boolean array on its own, as ``numpy.packbits`` does.",
          returns=("packed : array\n"
                   "    ``(new_indptr[-1],)`` uint8: a new array in x's framework.\n"
                   "new_indptr : array\n"
                   "    ``(num_segments + 1,)`` int32 device array (x's framework): the byte offsets of the packed\n"
                   "    segments, ``new_indptr[i + 1] - new_indptr[i] = ceil((indptr[i + 1] - indptr[i]) / 8)``."),
          glossary=_PARAMS,
          params={"x": ("array\n"
                        "    ``(indptr[-1],)`` bool, uint8 or int8 (nonzero is 1), contiguous, on a CUDA device\n"
                        "    (torch, JAX, CuPy or any DLPack producer).")},
          notes=("indptr is read on the host (a device array is copied back: one synchronisation); the offsets are\n"
                 "uploaded without waiting. new_indptr is int32 whatever indptr's dtype. ``stream`` is fi_cupy's\n"
                 "addition."))
def segment_packbits(x, indptr, bitorder: str = "big", stream=None):
    """Segment i, ``x[indptr[i]:indptr[i + 1]]``, becomes bytes ``new_indptr[i]`` to ``new_indptr[i + 1]``
    of the output, its last byte padded with zero bits: that is how prefill's custom masks are packed,
    one request at a time.
    """
    c = Call(x, stream, name="x")
    xi = _describe(c, x)
    if hasattr(indptr, "__dlpack_device__") and int(indptr.__dlpack_device__()[0]) != 1:  # on a device
        info = c.arg(indptr, "indptr")
        checks.dtype_in(info, (dt.int32, dt.int64))
        checks.ndim(info, 1, "(num_segments + 1,)")
        checks.contiguous(info)
        ip = download((info,), c.device, c.stream)[0]
    else:
        ip = checks.host_int_array("indptr", indptr)
    checks.indptr("indptr", ip)
    obj, out_ip = _pack(c, xi, ip.astype(np.int64), bitorder)
    return c.result(obj), c.result(_to_device(c, out_ip.astype(np.int32), dt.int32)[0])


def _to_device(c: Call, a: np.ndarray, dtype: dt.DType):
    """(object, ArrayInfo) of a new device array holding host array `a` (upload stages it in pinned
    memory: `a` may be released on return, no wait)."""
    obj, info = c.new(a.shape, dtype, "indptr")
    upload(a, info.ptr, c.device, c.stream)
    return obj, info
