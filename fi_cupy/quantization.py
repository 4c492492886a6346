"""Mask packing (FlashInfer keeps these in flashinfer.quantization): `packbits` and `segment_packbits`
(cuda_src/packbits.cu), as numpy.packbits does it. Prefill takes custom masks packed little-endian: each request's (qo_len, kv_len) boolean mask
flattened row-major, packed on its own and padded to a whole byte, the requests concatenated."""
from __future__ import annotations

import numpy as np

from ._core import checks, kernels
from ._core import dtypes as dt
from ._core.call import Call
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


def _pack(c: Call, xi, indptr: np.ndarray, bitorder: str, name: str = "x"):
    checks.choice("bitorder", bitorder, BITORDERS)
    if indptr[-1] != xi.shape[0]:
        raise ValueError(f"indptr: indptr[-1] = {indptr[-1]} but {name} has {xi.shape[0]} elements")
    out_indptr = packed_indptr(indptr)
    n_out = int(out_indptr[-1])
    obj, o = c.new((n_out,), dt.uint8, "packed")
    if n_out:
        _, m = _to_device(c, np.concatenate([indptr.astype(np.int64), out_indptr]), dt.int64)
        prog = packbits_program(bitorder == "little")
        fn = kernels.functions(prog, c.device)[prog.kernels[0]]
        c.launch(fn, (-(-n_out // 256),), (256,),
                 [ptr(xi), ptr(m.ptr), ptr(m.ptr + 8 * indptr.size), i32(indptr.size - 1), ptr(o), i64(n_out)])
    return obj, out_indptr


def packbits(x, bitorder: str = "big", stream=None):
    """Pack a 1-D boolean array into uint8 (numpy.packbits(x, bitorder=...)), on x's device."""
    c = Call(x, stream, name="x")
    xi = _describe(c, x)
    obj, _ = _pack(c, xi, np.array([0, xi.shape[0]], dtype=np.int64), bitorder)
    return c.result(obj)


def segment_packbits(x, indptr, bitorder: str = "big", stream=None):
    """Pack each segment x[indptr[i]:indptr[i + 1]] on its own (padded to a byte). Returns (packed,
    new_indptr) with new_indptr the segments' byte offsets, both in x's framework."""
    ip = checks.host_int_array("indptr", indptr)
    checks.indptr("indptr", ip)
    c = Call(x, stream, name="x")
    obj, out_ip = _pack(c, _describe(c, x), ip.astype(np.int64), bitorder)
    return c.result(obj), c.result(_to_device(c, out_ip.astype(np.int32), dt.int32)[0])


def _to_device(c: Call, a: np.ndarray, dtype: dt.DType):
    """(object, ArrayInfo) of a new device array holding host array `a` (synchronised: `a` may be
    released on return)."""
    from cupy.cuda import runtime
    obj, info = c.new(a.shape, dtype, "indptr")
    upload(a, info.ptr, c.device, c.stream)
    runtime.streamSynchronize(c.stream)
    return obj, info
