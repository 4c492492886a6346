"""RoPE as a cos/sin table, computed once on the host: the decode step then looks the rotation up
(fi_cupy.apply_rope_with_cos_sin_cache_inplace) instead of recomputing frequencies and sines in
every layer. Frequencies follow Hugging Face (default, linear, and Llama 3's per-band rescaling)."""
from __future__ import annotations

import numpy as np

from .config import RopeConfig


def inv_freq(rope: RopeConfig, rotary_dim: int) -> np.ndarray:
    """float32 inverse frequencies of the rotary_dim / 2 pairs."""
    f = rope.theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if rope.kind == "linear":
        f = f / rope.factor
    elif rope.kind == "llama3":
        wavelen = 2 * np.pi / f
        low, high = rope.original_max_position_embeddings / np.array([rope.low_freq_factor, rope.high_freq_factor])
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / \
            (rope.high_freq_factor - rope.low_freq_factor)
        f = np.where(wavelen > low, f / rope.factor,
                     np.where(wavelen < high, f, (1 - smooth) * f / rope.factor + smooth * f))
    return f.astype(np.float32)


def cos_sin_cache(rope: RopeConfig, rotary_dim: int, max_positions: int) -> np.ndarray:
    """(max_positions, rotary_dim) float32 = [cos | sin] of the float32 angle position * inv_freq."""
    angle = (np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq(rope, rotary_dim)[None, :]).astype(
        np.float64)
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)
