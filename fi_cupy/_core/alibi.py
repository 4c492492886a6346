"""ALiBi slopes (pos_encoding_mode="ALIBI"): FlashInfer's formula, and one device copy per (device,
number of heads) that the attention kernels read (its address never changes, so CUDA graphs and the
fast path keep it)."""
from __future__ import annotations

import math

import numpy as np

_device: dict = {}  # (device, num_heads) -> (device array, its host source)


def slopes(num_heads: int) -> np.ndarray:
    """float32 (num_heads,): with n the largest power of 2 <= num_heads, 2^(-8k/n) for k = 1..n, then
    2^(-4k/n) for the odd k = 1, 3, .. for the heads past n (Press et al., as FlashInfer and
    Hugging Face compute them)."""
    n = 2 ** int(math.floor(math.log2(num_heads)))
    out = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    out += [2.0 ** (-4.0 * k / n) for k in range(1, 2 * (num_heads - n), 2)]
    return np.asarray(out, dtype=np.float32)


def device_slopes(num_heads: int, device: int, stream: int) -> int:
    """The address of the slopes on `device`, uploaded on `stream` the first time (then waited for,
    unless the stream is being captured: the captured launches come after the copy on that stream)."""
    entry = _device.get((device, num_heads))
    if entry is None:
        from . import arrays, streams
        from . import dtypes as dt
        from .workspace import upload
        host = slopes(num_heads)
        obj = arrays.empty("cupy", (num_heads,), dt.float32, device, stream)
        entry = (obj, arrays.describe(obj, "alibi_slopes"), host)
        upload(host, entry[1].ptr, device, stream)
        if not streams.is_capturing(stream):
            from cupy.cuda import runtime
            runtime.streamSynchronize(stream)
        _device[(device, num_heads)] = entry
    return entry[1].ptr
