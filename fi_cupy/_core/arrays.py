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
import struct
import threading
from collections import deque
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
_Q = struct.Struct("<Q")


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


_HEAD = ctypes.c_uint64 * 6  # DLTensor's leading words: data, device, ndim + dtype, shape, strides, byte_offset


def capsule_head(capsule, ndim: int) -> tuple:
    """(address of the first element, CUDA device id or -1 for memory elsewhere, strides in elements or
    None for row-major) of an unconsumed "dltensor" capsule of an `ndim`-dimensional array: what a replay
    needs of a JAX input whose shape and dtype it has from the array (describe_dlpack reads the rest)."""
    data, device, _, _, strides, offset = _HEAD.from_address(_capsule_get(capsule, _CAPSULE_NAME))
    on_cuda = (device & 0xFFFFFFFF) in (KDL_CUDA, KDL_CUDA_MANAGED)
    return (data + offset, device >> 32 if on_cuda else -1,
            tuple((ctypes.c_int64 * ndim).from_address(strides)) if strides and ndim else None)


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


# A consumer may call the deleter while the interpreter tears modules down (a JAX output still alive at
# exit), after this module's globals are gone. Capsules copy the deleter's address from a template, so no
# capsule holds a reference to the ctypes thunk behind it: one reference is leaked to keep it for the
# life of the process (freeing it made every such exit a segfault).
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_dlpack_deleter))


class DeviceBuffer:
    """Device memory (from CuPy's pool) that any DLPack consumer can take zero-copy.

    `__dlpack__(stream=s)` makes the consumer's stream wait for the stream the buffer was filled on.
    """
    __slots__ = ("shape", "dtype", "device", "stream_handle", "mem", "ptr")

    def __init__(self, shape, dtype: dt.DType, device: int, stream_handle: int):
        streams.require_gpu()
        import cupy
        self.shape, self.dtype, self.device, self.stream_handle = tuple(shape), dtype, device, stream_handle
        with cupy.cuda.Device(device):
            self.mem = cupy.cuda.alloc(self.nbytes_of(self.shape, dtype))
        self.ptr = self.mem.ptr

    @staticmethod
    def nbytes_of(shape: tuple, dtype: dt.DType) -> int:
        """Bytes a buffer of `shape` allocates (at least one: CuPy's pool gives no zero-byte memory)."""
        return max(1, math.prod(int(n) for n in shape) * dtype.itemsize)

    @classmethod
    def here(cls, alloc, shape: tuple, dtype: dt.DType, device: int, stream_handle: int, nbytes: int):
        """A buffer on the current device, which the caller has checked is `device` (a replay): the
        allocation alone. `alloc` is cupy.cuda.alloc; shape a tuple of ints; nbytes at least 1."""
        b = cls.__new__(cls)
        b.shape, b.dtype, b.device, b.stream_handle = shape, dtype, device, stream_handle
        b.mem = alloc(nbytes)
        b.ptr = b.mem.ptr
        return b

    def __dlpack_device__(self):
        return (KDL_CUDA, self.device)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        streams.order_after(self.device, self.stream_handle, stream)
        return _capsule_of(self.ptr, self.mem, self.shape, self.dtype, self.device)


_templates: dict = {}  # (shape, dtype code, bits, device) -> (DLManagedTensor bytes, its shape array)
_DATA_AT, _CTX_AT = _DLManagedTensor.dl_tensor.offset + _DLTensor.data.offset, _DLManagedTensor.manager_ctx.offset


def _capsule_of(ptr: int, mem, shape: tuple, dtype: dt.DType, device: int):
    """A "dltensor" capsule of row-major memory at `ptr`, which `mem` keeps alive until the consumer calls
    the deleter. Each (shape, dtype, device) is laid out once; a capsule copies that and sets two fields."""
    key = (shape, dtype.code, dtype.bits, device)
    t = _templates.get(key)
    if t is None:
        if len(_templates) >= 1024:  # shapes come and go: a live capsule holds its own shape array
            _templates.clear()
        ndim = len(shape)
        shape_arr = (ctypes.c_int64 * max(ndim, 1))(*shape)
        mt = _DLManagedTensor()
        mt.dl_tensor.device = _DLDevice(KDL_CUDA, device)
        mt.dl_tensor.ndim = ndim
        mt.dl_tensor.dtype = _DLDataType(dtype.code, dtype.bits, 1)
        mt.dl_tensor.shape = ctypes.cast(shape_arr, ctypes.POINTER(ctypes.c_int64))
        mt.deleter = _dlpack_deleter
        t = _templates[key] = (bytes(mt), shape_arr)
    mt = _DLManagedTensor.from_buffer_copy(t[0])
    addr = ctypes.addressof(mt)
    _Q.pack_into(mt, _DATA_AT, ptr)
    _Q.pack_into(mt, _CTX_AT, addr)
    _Owned.live[addr] = _Owned(mem, mt, t[1])
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
        return to_jax(obj)
    import cupy
    try:
        return cupy.from_dlpack(obj)
    except Exception:  # noqa: BLE001 - a dtype this CuPy cannot hold: the buffer itself speaks DLPack
        return obj


_jax_importers: dict = {}  # device -> (import function, JAX device, JAX's stream, takes the device type) or None
_JAX_KEEPS = ("bfloat16", "float16", "float32", "int32", "uint32", "int16", "uint16", "int8", "uint8", "bool",
              "float8_e4m3fn", "float8_e5m2")  # dtypes jax.dlpack.from_dlpack returns unconverted


def _jax_importer(device: int):
    """What jax.dlpack.from_dlpack resolves on every call (~95 us of host time a call on the H100 host),
    resolved once per device: jaxlib's capsule import, the JAX device and the stream JAX waits on for
    external buffers. None where this JAX lacks them (from_dlpack is used then)."""
    try:
        from jax._src import dlpack as jdl
        from jax._src import xla_bridge
        from jax._src.lib import _jax, jaxlib_extension_version
        backend = xla_bridge.get_backend(jdl._DL_DEVICE_TO_PLATFORM[KDL_CUDA])
        jdev = backend.device_from_local_hardware_id(device)
        stream = jdev.get_stream_for_external_ready_events()
        return _jax.dlpack_managed_tensor_to_buffer, jdev, stream, jaxlib_extension_version >= 467
    except Exception:  # noqa: BLE001 - private names of another JAX version: the public route
        return None


def to_jax(buf: DeviceBuffer):
    """`buf` as a JAX array, zero-copy: what jax.dlpack.from_dlpack(buf) returns, less its per-call
    lookups (the capsule import alone), for the dtypes it would not convert."""
    imp = _jax_importers.get(buf.device, False)
    if imp is False:
        imp = _jax_importers[buf.device] = _jax_importer(buf.device)
    if imp is not None and buf.dtype.name in _JAX_KEEPS:
        to_buffer, jdev, stream, typed = imp
        capsule = buf.__dlpack__(stream=stream)  # JAX's stream waits for ours
        try:
            return (to_buffer(capsule, jdev, stream, None, KDL_CUDA) if typed else
                    to_buffer(capsule, jdev, stream, None))
        except TypeError:  # another jaxlib's parameter list: the public route from now on
            _jax_importers[buf.device] = None
    import jax.dlpack
    return jax.dlpack.from_dlpack(buf)


# ---------------------------------------------------------------------------------------------
# Lifetimes

_STREAM_ORDERED = ("torch", "cupy", "fi_cupy")  # their allocators never reuse memory ahead of our stream
_pending: deque = deque()  # (device, event, objects) for launches that still read non-stream-ordered inputs
_spare: dict = {}          # device -> events whose holds were released, for reuse
_lock = threading.Lock()


def keep_alive(device: int, stream_handle: int, infos) -> None:
    """Hold inputs whose memory is not ordered with our stream (JAX, other DLPack producers) until
    the work queued so far on `stream_handle` completes; release those whose work has finished."""
    objs = [i for i in infos if i is not None and i.framework not in _STREAM_ORDERED]
    hold(device, stream_handle, objs)


def hold(device: int, stream_handle: int, objs) -> None:
    """Keep `objs` (capsules, arrays) alive until the work queued so far on `stream_handle` completes
    (one event recorded per call, reused once released); first release what earlier calls held whose
    work has completed. Holds are released in the order they were taken: a hold behind a slower one
    waits for it, which costs memory for a while, never correctness."""
    runtime = streams.cuda_runtime()
    with _lock:
        while _pending:
            dev, ev, _ = _pending[0]
            if runtime.eventQuery(ev) != 0:  # cudaErrorNotReady: this and later holds stay
                break
            _pending.popleft()
            _spare.setdefault(dev, []).append(ev)
        if not objs:
            return
        spare = _spare.get(device)
        ev = spare.pop() if spare else streams.new_event(device)
        streams.on_device(device, runtime.eventRecord, ev, stream_handle)  # before another thread queries it
        _pending.append((device, ev, objs))
