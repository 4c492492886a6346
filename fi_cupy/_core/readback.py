"""Device arrays read back to the host for checks of their contents (index ranges): through one pinned
buffer per device, a copy each and one wait for the stream. HostCheck makes such a check a step that a
replayed call (fastpath.Recipe) repeats."""
from __future__ import annotations

import threading

import numpy as np

from . import streams

_readback: dict = {}  # device -> the pinned buffer that download() reads arrays back through
_readback_lock = threading.Lock()


_RAW_BITS = {"bfloat16": np.dtype(np.uint16), "float8_e4m3fn": np.dtype(np.uint8),
             "float8_e5m2": np.dtype(np.uint8)}  # dtypes numpy lacks: their host copies hold the raw bits


def download(infos, device: int, stream: int) -> list:
    """Host copies (numpy, contiguous) of device arrays `infos`, read through one pinned buffer: a copy
    of each array's span queued on `stream`, where the arrays' producers are ordered, and one wait for
    it. bfloat16 / float8 arrays come back as their raw bits (uint16 / uint8). A host check of several
    index arrays then costs one synchronisation. Not while the stream is being captured (callers skip
    their checks then)."""
    return download_at([i.ptr for i in infos], [host_layout(i) for i in infos], device, stream)


def host_layout(info) -> tuple:
    """(bytes spanned, numpy dtype, shape, byte strides) of an ArrayInfo (download_at's layouts)."""
    item = info.dtype.itemsize
    span = (sum((n - 1) * st for n, st in zip(info.shape, info.strides)) + 1) * item if info.size else 0
    dtype = _RAW_BITS.get(info.dtype.name) or np.dtype(info.dtype.name)
    return span, dtype, tuple(info.shape), tuple(st * item for st in info.strides)


def download_at(addresses, layouts, device: int, stream: int) -> list:
    """download() of arrays given by device address and host_layout."""
    import cupy
    import cupyx
    from cupy.cuda import runtime
    offsets, total = [], 0
    for span, _, _, _ in layouts:
        offsets.append(total)
        total += -(-span // 16) * 16
    with _readback_lock, cupy.cuda.Device(device):
        buf = _readback.get(device)
        if buf is None or buf.nbytes < total:
            buf = _readback[device] = cupyx.empty_pinned(max(total, 1 << 16), dtype=np.uint8)
        base = buf.ctypes.data
        for address, (span, _, _, _), off in zip(addresses, layouts, offsets):
            if span:
                runtime.memcpyAsync(base + off, address, span, runtime.memcpyDeviceToHost, stream)
        runtime.streamSynchronize(stream)
        return [np.lib.stride_tricks.as_strided(buf[off:off + span].view(dtype), shape, strides).copy() if span
                else np.empty(shape, dtype) for (span, dtype, shape, strides), off in zip(layouts, offsets)]


class HostCheck:
    """A check of array contents read back to the host: fn(*host copies) raises on bad values. Called
    like a recorded launch (here(addresses, stream)), so that a replayed call repeats it; skipped while
    the stream is being captured into a CUDA graph (no host read then)."""
    __slots__ = ("fn", "layouts", "device")

    def __init__(self, fn, infos, device: int):
        self.fn, self.layouts, self.device = fn, [host_layout(i) for i in infos], device

    def here(self, addresses, stream: int) -> None:
        if not streams.is_capturing(stream):
            self.fn(*download_at(addresses, self.layouts, self.device, stream))
