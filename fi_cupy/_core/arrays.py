"""Arrays in and out through DLPack.

In: `describe(x, name)` reads any object that speaks DLPack (torch, JAX, CuPy, ...) into an ArrayInfo:
pointer, shape, strides, dtype from the DLPack code, device id. The capsule is held by the ArrayInfo,
so the producer keeps the memory alive at least while the ArrayInfo lives.

Out: `empty(framework, shape, dtype, device, stream)` allocates an output in the caller's framework:
torch.empty for torch callers, cupy.empty for CuPy callers, and for JAX (or any other producer) device
memory from CuPy handed over zero-copy through a DLPack capsule that fi_cupy produces itself.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import dtypes as dt
from . import streams

# ---------------------------------------------------------------------------------------------
# DLPack C structures (dlpack.h, unversioned "dltensor" capsule)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64),
    ]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]


_capsule_get = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get.restype = ctypes.c_void_p
_capsule_get.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_DEVICE_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA host (pinned)", 4: "OpenCL", 7: "Vulkan", 8: "Metal",
                 10: "ROCm", 13: "CUDA managed"}
_CAPSULE_NAME = b"dltensor"


class HostArrayError(TypeError, ValueError):
    """A host (CPU) array where a device array is needed. A TypeError (the wrong kind of array); also a
    ValueError, which this case raised before, so callers catching that still do."""


_HOST_KIND = {"numpy": "a host numpy array", "torch": "a torch CPU tensor", "jax": "a JAX CPU array"}


def check_on_cuda(name: str, x, dev_type: int) -> None:
    """Raise for an array whose DLPack device type is not CUDA (or CUDA managed memory), naming `name`:
    HostArrayError, saying how to move it, for host memory; ValueError for any other device."""
    if dev_type in (KDL_CUDA, KDL_CUDA_MANAGED):
        return
    where = _DEVICE_NAMES.get(dev_type, f"device type {dev_type}")
    if dev_type in (KDL_CPU, KDL_CUDA_HOST):
        fw = framework_of(x)
        kind = _HOST_KIND.get(fw, "a host array")
        raise HostArrayError(f"{name}: expected an array on a CUDA device, got one on {where} ({kind}); move it "
                             "to the GPU first: cupy.asarray(x), torch.as_tensor(x, device='cuda') or "
                             "jax.device_put(x)")
    raise ValueError(f"{name}: expected an array on a CUDA device, got one on {where}")


def framework_of(x) -> str:
    """'torch', 'jax', 'cupy', 'numpy' or the top-level module of x's type."""
    mod = type(x).__module__.split(".")[0]
    return "jax" if mod in ("jaxlib", "jax") else mod


@dataclass
class ArrayInfo:
    """What a kernel launch needs to know of one array. strides are in elements; byte_strides in bytes."""
    name: str
    ptr: int
    shape: tuple
    strides: tuple
    dtype: dt.DType
    device: int
    framework: str
    obj: Any = field(repr=False, default=None)
    _capsule: Any = field(repr=False, default=None)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def byte_strides(self) -> tuple:
        return tuple(s * self.dtype.itemsize for s in self.strides)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        if self.size == 0:  # no element to address: producers give empty arrays arbitrary strides
            return True
        expect = 1
        for n, s in zip(reversed(self.shape), reversed(self.strides)):
            if n != 1 and s != expect:
                return False
            expect *= n
        return True


def contiguous_strides(shape) -> tuple:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def dlpack_stream_arg(stream_handle: int) -> int:
    # DLPack: 1 means the legacy default stream; 0 is not allowed.
    return 1 if stream_handle == 0 else stream_handle


def _export(x, name: str, stream_handle: int | None):
    kwargs = {} if stream_handle is None else {"stream": dlpack_stream_arg(stream_handle)}
    try:
        return x.__dlpack__(**kwargs)
    except TypeError:
        if not kwargs:
            raise
        return x.__dlpack__()  # an old producer without the stream keyword


def describe(x, name: str, stream_handle: int | None = None, current_of: str | None = None) -> ArrayInfo:
    """Describe x for a launch. Raises TypeError/ValueError naming `name` for anything unusable.

    stream_handle: the stream the caller will launch on; the producer's queued work is ordered before
    it. current_of: a framework ("torch", "cupy") whose current stream *is* that launch stream, so its
    arrays need no ordering. torch tensors and CuPy arrays are read from their own attributes (a
    DLPack export costs ~100-200 us of host time in torch); everything else goes through DLPack.
    Both routes give the same ArrayInfo (tests/test_frameworks.py checks it)."""
    if isinstance(x, ArrayInfo):
        return x
    if isinstance(x, DeviceBuffer):  # our own output buffer: no capsule to export
        return ArrayInfo(name, x.ptr, x.shape, contiguous_strides(x.shape), x.dtype, x.device, "fi_cupy", x)
    fw = framework_of(x)
    if fw == "torch" and type(x).__name__ in ("Tensor", "Parameter"):
        return _describe_torch(x, name, None if current_of == "torch" else stream_handle)
    if fw == "cupy" and type(x).__name__ == "ndarray":
        return _describe_cupy(x, name, None if current_of == "cupy" else stream_handle)
    return describe_dlpack(x, name, None if current_of == fw and fw in ("torch", "cupy") else stream_handle)


def _checked_strides(name: str, shape: tuple, strides: tuple) -> tuple:
    for n, st in zip(shape, strides):
        if st < 0 and n > 1:
            raise ValueError(f"{name}: negative strides are not supported (strides {strides})")
    # The stride of a size-1 dim is arbitrary: normalise it so checks and kernels can ignore it. An array with
    # no elements has no meaningful strides at all (CuPy gives (0, 0, ...)): it is contiguous.
    cs = contiguous_strides(shape)
    if 0 in shape:
        return cs
    return tuple(c if n == 1 else st for n, st, c in zip(shape, strides, cs))


_FRAMEWORK_DTYPES: dict = {}


def _framework_dtype(d, name: str) -> dt.DType:
    got = _FRAMEWORK_DTYPES.get(d)
    if got is None:
        got = _FRAMEWORK_DTYPES[d] = dt.as_dtype(d, name)
    return got


def _describe_torch(x, name: str, stream_handle: int | None) -> ArrayInfo:
    dev = x.device
    if dev.type != "cuda":
        if dev.type == "cpu":
            check_on_cuda(name, x, KDL_CPU)
        raise ValueError(f"{name}: expected an array on a CUDA device, got one on {dev.type.upper()}")
    idx = dev.index if dev.index is not None else 0
    if stream_handle is not None:
        streams.order_after(idx, streams.torch_current(idx), stream_handle)
    shape = tuple(x.shape)
    return ArrayInfo(name, x.data_ptr(), shape, _checked_strides(name, shape, tuple(x.stride())),
                     _framework_dtype(x.dtype, name), idx, "torch", x)


def _describe_cupy(x, name: str, stream_handle: int | None) -> ArrayInfo:
    import cupy
    idx = x.device.id
    if stream_handle is not None:
        with cupy.cuda.Device(idx):
            streams.order_after(idx, int(cupy.cuda.get_current_stream().ptr), stream_handle)
    item = x.dtype.itemsize
    shape = tuple(x.shape)
    if any(st % item for st in x.strides):
        raise ValueError(f"{name}: byte strides {x.strides} are not multiples of the item size {item}")
    strides = _checked_strides(name, shape, tuple(st // item for st in x.strides))
    return ArrayInfo(name, x.data.ptr, shape, strides, _framework_dtype(x.dtype, name), idx, "cupy", x)


def describe_dlpack(x, name: str, stream_handle: int | None = None) -> ArrayInfo:
    """Read x through DLPack: pointer, shape, strides, dtype from the DLPack code, device id."""
    if not hasattr(x, "__dlpack__") or not hasattr(x, "__dlpack_device__"):
        raise TypeError(f"{name}: expected an array that supports DLPack (torch, JAX, CuPy, ...), "
                        f"got {type(x).__name__}")
    dev_type, dev_id = x.__dlpack_device__()
    check_on_cuda(name, x, int(dev_type))
    fw = framework_of(x)
    view_dtype = None
    try:
        capsule = _export(x, name, stream_handle)
    except (BufferError, RuntimeError, TypeError, ValueError) as e:
        # Producers that cannot export float8 through DLPack: export the same bytes as uint8.
        dname = str(getattr(x, "dtype", ""))
        if "float8" in dname and hasattr(x, "view"):
            capsule = _export(x.view(_framework_uint8(fw)), name, stream_handle)
            view_dtype = dt.as_dtype(dname, name)
        else:
            raise TypeError(f"{name}: could not be exported through DLPack: {e}") from e
    mt = _DLManagedTensor.from_address(_capsule_get(capsule, _CAPSULE_NAME))
    t = mt.dl_tensor
    ndim = t.ndim
    shape = tuple(t.shape[i] for i in range(ndim))
    dtype = view_dtype or dt.from_dlpack_code(t.dtype.code, t.dtype.bits, t.dtype.lanes)
    strides = _checked_strides(name, shape, tuple(t.strides[i] for i in range(ndim))) if t.strides \
        else contiguous_strides(shape)
    ptr = (t.data or 0) + t.byte_offset
    return ArrayInfo(name, ptr, shape, strides, dtype, int(t.device.device_id), fw, x, capsule)


def _framework_uint8(fw: str):
    if fw == "torch":
        import torch
        return torch.uint8
    return np.uint8


# ---------------------------------------------------------------------------------------------
# Outputs


class _Owned:
    """Keeps device memory, shape and DLManagedTensor alive until the consumer calls the deleter."""
    live: dict = {}

    def __init__(self, mem, managed, shape_arr):
        self.mem, self.managed, self.shape_arr = mem, managed, shape_arr


@_DELETER
def _dlpack_deleter(ptr):
    try:
        _Owned.live.pop(ptr, None)
    except Exception:  # interpreter shutdown
        pass


class DeviceBuffer:
    """Device memory (from CuPy's pool) that any DLPack consumer can take zero-copy.

    `__dlpack__(stream=s)` makes the consumer's stream wait for the stream the buffer was filled on.
    """

    def __init__(self, shape, dtype: dt.DType, device: int, stream_handle: int):
        streams.require_gpu()
        import cupy
        self.shape, self.dtype, self.device, self.stream_handle = tuple(shape), dtype, device, stream_handle
        nbytes = max(1, int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize)
        with cupy.cuda.Device(device):
            self.mem = cupy.cuda.alloc(nbytes)
        self.ptr = self.mem.ptr

    def __dlpack_device__(self):
        return (KDL_CUDA, self.device)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        streams.order_after(self.device, self.stream_handle, stream)
        ndim = len(self.shape)
        shape_arr = (ctypes.c_int64 * max(ndim, 1))(*self.shape)
        mt = _DLManagedTensor()
        mt.dl_tensor.data = self.ptr
        mt.dl_tensor.device = _DLDevice(KDL_CUDA, self.device)
        mt.dl_tensor.ndim = ndim
        mt.dl_tensor.dtype = _DLDataType(self.dtype.code, self.dtype.bits, 1)
        mt.dl_tensor.shape = ctypes.cast(shape_arr, ctypes.POINTER(ctypes.c_int64))
        mt.dl_tensor.strides = None
        mt.dl_tensor.byte_offset = 0
        mt.deleter = _dlpack_deleter
        addr = ctypes.addressof(mt)
        mt.manager_ctx = addr
        _Owned.live[addr] = _Owned(self.mem, mt, shape_arr)
        return _capsule_new(addr, _CAPSULE_NAME, None)


_CUPY_NATIVE = ("float16", "float32", "float64", "int32", "int64", "int8", "uint8", "bool")


def cupy_dtype(dtype: dt.DType):
    """The dtype CuPy makes `dtype`'s arrays with, or None: its own dtypes, and bfloat16 through ml_dtypes
    where that is installed (CuPy 14 holds bfloat16 arrays then)."""
    if dtype.name in _CUPY_NATIVE:
        return dtype.name
    if dtype.name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return None
        return ml_dtypes.bfloat16
    return None


def empty(framework: str, shape, dtype: dt.DType, device: int, stream_handle: int):
    """A new uninitialised output for a caller of `framework`: a torch tensor for torch callers,
    else a DeviceBuffer that `deliver()` hands to the caller's framework once the kernel is queued
    (so the consumer's stream is ordered after the kernel, not before it)."""
    streams.require_gpu()  # the first CUDA call of a call with an explicit stream and no ordering to do
    shape = tuple(int(s) for s in shape)
    if framework == "torch":
        import torch
        return torch.empty(shape, dtype=getattr(torch, dtype.name), device=f"cuda:{device}")
    cdt = cupy_dtype(dtype) if framework == "cupy" else None
    if cdt is not None:
        import cupy
        with cupy.cuda.Device(device):
            return cupy.empty(shape, dtype=cdt)
    return DeviceBuffer(shape, dtype, device, stream_handle)


def deliver(obj, framework: str):
    """The caller's array for an output made by empty(): zero-copy through DLPack."""
    if not isinstance(obj, DeviceBuffer):
        return obj
    if framework == "jax":
        import jax.dlpack
        return jax.dlpack.from_dlpack(obj)
    import cupy
    try:
        return cupy.from_dlpack(obj)
    except Exception:  # noqa: BLE001 - a dtype this CuPy cannot hold: the buffer itself speaks DLPack
        return obj


# ---------------------------------------------------------------------------------------------
# Lifetimes

_STREAM_ORDERED = ("torch", "cupy", "fi_cupy")  # their allocators never reuse memory ahead of our stream
_pending: list = []  # (device, event, objects) for launches that still read non-stream-ordered inputs


def keep_alive(device: int, stream_handle: int, infos) -> None:
    """Hold inputs whose memory is not ordered with our stream (JAX, other DLPack producers) until
    the work queued so far on `stream_handle` completes; release those whose work has finished."""
    from cupy.cuda import runtime
    if _pending:
        still = []
        for dev, ev, objs in _pending:
            if runtime.eventQuery(ev) == 0:  # cudaSuccess: done
                runtime.eventDestroy(ev)
            else:
                still.append((dev, ev, objs))
        _pending[:] = still
    objs = [i for i in infos if i is not None and i.framework not in _STREAM_ORDERED]
    if not objs:
        return
    import cupy
    with cupy.cuda.Device(device):
        ev = runtime.eventCreateWithFlags(runtime.eventDisableTiming)
        runtime.eventRecord(ev, stream_handle)
    _pending.append((device, ev, objs))
