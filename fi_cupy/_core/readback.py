"""Device arrays read back to the host for checks of their contents (index ranges): through one pinned
buffer per device, a copy each and one wait for the stream. HostCheck makes such a check a step that a
replayed call (fastpath.Recipe) repeats."""
from __future__ import annotations

import threading

import numpy as np

from . import streams

_readback: dict = {}  # device -> the pinned buffer that download() reads arrays back through
_readback_lock = threading.Lock()


def download(infos, device: int, stream: int) -> list:
    """Host copies (numpy) of contiguous device arrays `infos` of numeric dtypes (not bfloat16 / float8),
    read through one pinned buffer: a copy each queued on `stream`, where the arrays' producers are
    ordered, and one wait for it. A host check of several index arrays then costs one synchronisation.
    Not while the stream is being captured (callers skip their checks then)."""
    return download_at([i.ptr for i in infos], [host_layout(i) for i in infos], device, stream)


def host_layout(info) -> tuple:
    """(nbytes, numpy dtype, shape) of a contiguous ArrayInfo's host copy (download_at's layouts)."""
    return info.nbytes, np.dtype(info.dtype.name), tuple(info.shape)


def download_at(addresses, layouts, device: int, stream: int) -> list:
    """download() of arrays given by device address and host_layout."""
    import cupy
    import cupyx
    from cupy.cuda import runtime
    offsets, total = [], 0
    for nbytes, _, _ in layouts:
        offsets.append(total)
        total += -(-nbytes // 16) * 16
    with _readback_lock, cupy.cuda.Device(device):
        buf = _readback.get(device)
        if buf is None or buf.nbytes < total:
            buf = _readback[device] = cupyx.empty_pinned(max(total, 1 << 16), dtype=np.uint8)
        base = buf.ctypes.data
        for address, (nbytes, _, _), off in zip(addresses, layouts, offsets):
            if nbytes:
                runtime.memcpyAsync(base + off, address, nbytes, runtime.memcpyDeviceToHost, stream)
        runtime.streamSynchronize(stream)
        return [buf[off:off + nbytes].view(dtype).reshape(shape).copy()
                for (nbytes, dtype, shape), off in zip(layouts, offsets)]


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
