"""The stream a launch goes on: an explicit `stream=`, else the caller's framework's current stream.

torch callers: torch.cuda.current_stream(device); CuPy callers: cupy.cuda.get_current_stream();
JAX and others: CuPy's current stream (JAX orders its own work through the DLPack stream argument).
Handles are raw cudaStream_t integers; 0 is the legacy default stream.

No CUDA GPU: require_gpu() raises one CudaEnvironmentError saying why (no driver, a driver older than
CuPy's runtime, no device) where CuPy would raise cudaErrorInsufficientDriver from deep inside, which
suggests a driver upgrade even with no driver. current(), order_after() and arrays.empty() call it
first: one of them is a call's first CUDA call, unless stream= is explicit and nothing needs ordering
or allocating (then argument checks run with no GPU: CPU tests describe stand-in arrays on stream 0).
"""
from __future__ import annotations

import os
import threading

from .compile import CudaEnvironmentError

_gpu_seen: list = []  # non-empty once a GPU was found: later calls skip the query (a few ns, not ~1 us)
_INSUFFICIENT_DRIVER, _NO_DEVICE = 35, 100  # cudaError_t codes


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _why_no_gpu(e: Exception) -> str:
    """CuPy's exception from the device query, in short, with what it looked for."""
    status = getattr(e, "status", None)
    try:
        from cupy.cuda import runtime
        rt = _cuda_version(runtime.runtimeGetVersion())
        drv = runtime.driverGetVersion()
    except Exception:  # noqa: BLE001 - without a usable runtime there is nothing more to say
        rt, drv = None, None
    if status == _INSUFFICIENT_DRIVER and drv == 0:
        return f"CuPy's CUDA {rt} runtime found no NVIDIA driver"
    if status == _INSUFFICIENT_DRIVER and drv:
        # The usual cause is the cuda13 extra on a CUDA 12 driver, not an old driver to upgrade.
        major = drv // 1000
        hint = f"; install fi_cupy's cuda{major} extra to match it" if major in (12, 13) else ""
        return f"the NVIDIA driver supports CUDA {_cuda_version(drv)}, older than CuPy's CUDA {rt} runtime{hint}"
    if status == _NO_DEVICE:
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "the NVIDIA driver found no CUDA device" + ("" if vis is None else f" (CUDA_VISIBLE_DEVICES={vis!r})")
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


def gpu_count() -> tuple:
    """(number of CUDA GPUs CuPy sees, why there is none: a short reason, None when there is one)."""
    try:
        from cupy.cuda import runtime
        n = runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CuPy raises several types without a driver or a device
        return 0, _why_no_gpu(e)
    if n:
        return n, None
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    return 0, "device count 0" + ("" if vis is None else f", CUDA_VISIBLE_DEVICES={vis!r}")


def gpu_seen() -> bool:
    """Whether a CUDA GPU was found already (no query)."""
    return bool(_gpu_seen)


def require_gpu() -> None:
    """Raise CudaEnvironmentError, saying why, unless CuPy sees a CUDA GPU."""
    if _gpu_seen:
        return
    n, why = gpu_count()
    if not n:
        raise CudaEnvironmentError(f"no CUDA GPU visible ({why}); fi_cupy runs its kernels on an NVIDIA GPU "
                                   "(compute capability 8.0 or newer) that `nvidia-smi` lists")
    _gpu_seen.append(n)


def handle_of(stream) -> int:
    """cudaStream_t of an int, a torch.cuda.Stream, a cupy Stream or any `__cuda_stream__` object."""
    if isinstance(stream, int):
        return stream
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    for attr in ("cuda_stream", "ptr"):  # torch, cupy
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise TypeError(f"stream: expected an int handle, a torch/CuPy stream or an object with "
                    f"__cuda_stream__, got {type(stream).__name__}")


def current(framework: str, device: int) -> int:
    if not _gpu_seen:  # the first CUDA call of a call on the caller's current stream (most calls)
        require_gpu()
    if framework == "torch":
        return torch_current(device)
    return cupy_current(device)


def _torch_current_fn():
    """torch's raw current-stream query (~0.1 us; torch.cuda.current_stream builds a Stream, ~2 us),
    else the public one."""
    import torch
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw if raw is not None else (lambda d: int(torch.cuda.current_stream(d).cuda_stream))


_torch_stream: list = []


def _torch_query():
    """_torch_current_fn's result, resolved once."""
    if not _torch_stream:
        _torch_stream.append(_torch_current_fn())
    return _torch_stream[0]


def torch_current(device: int) -> int:
    """cudaStream_t of torch's current stream on `device`."""
    return (_torch_stream[0] if _torch_stream else _torch_query())(device)


_cupy_fns: list = []


def _cupy():
    """(cupy.cuda.get_current_stream, runtime.getDevice, cupy.cuda.Device, cupy.cuda.runtime), imported
    once (an import statement costs about a microsecond a call)."""
    if not _cupy_fns:
        import cupy
        from cupy.cuda import runtime
        _cupy_fns.append((cupy.cuda.get_current_stream, runtime.getDevice, cupy.cuda.Device, runtime))
    return _cupy_fns[0]


def cupy_current(device: int) -> int:
    """cudaStream_t of CuPy's current stream on `device` (CuPy keeps one per device and thread)."""
    get, get_device, Device, _ = _cupy_fns[0] if _cupy_fns else _cupy()
    if get_device() == device:
        return get().ptr
    with Device(device):
        return get().ptr


def cuda_runtime():
    """cupy.cuda.runtime (imported once)."""
    return (_cupy_fns[0] if _cupy_fns else _cupy())[3]


def on_device(device: int, fn, *args):
    """fn(*args) with `device` current (no switch when it already is)."""
    _, get_device, Device, _ = _cupy_fns[0] if _cupy_fns else _cupy()
    if get_device() == device:
        return fn(*args)
    with Device(device):
        return fn(*args)


def cupy_current_here() -> int:
    """cupy_current of the current device (the caller has checked it)."""
    return (_cupy_fns[0] if _cupy_fns else _cupy())[0]().ptr


def current_query(framework: str, device: int):
    """() -> the caller's current stream on `device` for "torch" or "cupy" arrays, the lookups resolved
    once (a replay, which has checked that `device` is current, calls it every time); None otherwise."""
    if framework == "torch":
        raw = _torch_query()
        return lambda: raw(device)
    if framework == "cupy":
        get = (_cupy_fns[0] if _cupy_fns else _cupy())[0]
        return lambda: get().ptr
    return None


def resolve(stream, framework: str, device: int) -> int:
    return handle_of(stream) if stream is not None else current(framework, device)


def is_capturing(stream: int) -> bool:
    """Whether `stream` is capturing a CUDA graph (host syncs and copies must then be skipped)."""
    from cupy.cuda import runtime
    try:
        return bool(runtime.streamIsCapturing(stream))
    except Exception:  # noqa: BLE001 - an old CuPy without the query: assume not capturing
        return False


_DLPACK_STREAMS = {1: 0, 2: 2}  # DLPack's legacy default (1) is CUDA's handle 0; per-thread default stays 2
_events = threading.local()  # this thread's ordering event per device (recorded again at each use)


def _ordering_event(device: int) -> int:
    """A timing-free event of `device` for this thread, created once: recording it again is safe, since a
    stream wait takes the event's latest record at the time of the wait, and no other thread records it."""
    evs = getattr(_events, "by_device", None)
    if evs is None:
        evs = _events.by_device = {}
    ev = evs.get(device)
    if ev is None:
        ev = evs[device] = new_event(device)
    return ev


def new_event(device: int) -> int:
    """A timing-free CUDA event of `device` (the caller destroys it or keeps it for reuse)."""
    _, _, Device, runtime = _cupy_fns[0] if _cupy_fns else _cupy()
    with Device(device):
        return runtime.eventCreateWithFlags(runtime.eventDisableTiming)


def order_after(device: int, producer_stream: int, consumer_stream) -> None:
    """Make `consumer_stream` (a DLPack stream argument: None, 1 = legacy default, 2 = per-thread
    default, or a handle) wait for the work queued so far on `producer_stream`."""
    if not _gpu_seen:  # the first CUDA call of a torch call on an explicit stream
        require_gpu()
    _, _, Device, runtime = _cupy_fns[0] if _cupy_fns else _cupy()
    if consumer_stream is None:
        with Device(device):
            runtime.streamSynchronize(producer_stream)  # consumer gave no stream: be safe
        return
    consumer = int(consumer_stream)
    consumer = _DLPACK_STREAMS.get(consumer, consumer)
    if consumer == producer_stream:
        return
    on_device(device, _wait, runtime, _ordering_event(device), producer_stream, consumer)


def _wait(runtime, ev: int, producer: int, consumer: int) -> None:
    runtime.eventRecord(ev, producer)
    runtime.streamWaitEvent(consumer, ev, 0)



class _RawStream:
    """A raw cudaStream_t seen through the CUDA stream protocol (version 0, the handle)."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def as_cupy(handle: int):
    """A CuPy Stream object for a raw handle (to run CuPy work on it with `with`): Stream.from_external
    where CuPy has it (14+; ExternalStream is deprecated there), ExternalStream before."""
    import cupy
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_RawStream(handle))
    return cupy.cuda.ExternalStream(handle)
