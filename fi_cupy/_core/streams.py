"""The stream a launch goes on: an explicit `stream=`, else the caller's framework's current stream.

torch callers: torch.cuda.current_stream(device); CuPy callers: cupy.cuda.get_current_stream();
JAX and others: CuPy's current stream (JAX orders its own work through the DLPack stream argument).
Handles are raw cudaStream_t integers; 0 is the legacy default stream.
"""
from __future__ import annotations


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
    if framework == "torch":
        import torch
        return int(torch.cuda.current_stream(device).cuda_stream)
    import cupy
    with cupy.cuda.Device(device):
        return int(cupy.cuda.get_current_stream().ptr)


def resolve(stream, framework: str, device: int) -> int:
    return handle_of(stream) if stream is not None else current(framework, device)


def is_capturing(stream: int) -> bool:
    """Whether `stream` is capturing a CUDA graph (host syncs and copies must then be skipped)."""
    from cupy.cuda import runtime
    try:
        return bool(runtime.streamIsCapturing(stream))
    except Exception:  # noqa: BLE001 - an old CuPy without the query: assume not capturing
        return False


def order_after(device: int, producer_stream: int, consumer_stream) -> None:
    """Make `consumer_stream` (a DLPack stream argument: None, 1 = legacy default, 2 = per-thread
    default, or a handle) wait for the work queued so far on `producer_stream`."""
    import cupy
    from cupy.cuda import runtime
    with cupy.cuda.Device(device):
        if consumer_stream is None:
            runtime.streamSynchronize(producer_stream)  # consumer gave no stream: be safe
            return
        consumer = {1: 0, 2: 2}.get(int(consumer_stream), int(consumer_stream))
        if consumer == producer_stream:
            return
        ev = runtime.eventCreateWithFlags(runtime.eventDisableTiming)
        try:
            runtime.eventRecord(ev, producer_stream)
            runtime.streamWaitEvent(consumer, ev, 0)
        finally:
            runtime.eventDestroy(ev)
