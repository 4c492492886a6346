"""Plain numpy references (float64) for every op. Tests compare against these; users can read them.

Conventions follow FlashInfer: lse is base 2; the default sm_scale is 1/sqrt(head_dim); a soft cap
gives cap * tanh(sm_scale * q.k / cap); RoPE is the Llama "rotate half" form with inv_freq and the
angle computed in float32, as Hugging Face's LlamaRotaryEmbedding does.
"""
from __future__ import annotations

import math

import numpy as np


def rope_llama(x: np.ndarray, pos: np.ndarray, rope_scale: float = 1.0, rope_theta: float = 1e4) -> np.ndarray:
    """x (..., n, D) rotated at positions pos (n,): float32 angles, float64 sin/cos and products."""
    d = x.shape[-1]
    inv_freq = (1.0 / (np.float32(rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    inv_freq = inv_freq.astype(np.float32) / np.float32(rope_scale)
    ang = (np.asarray(pos, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)
    x = np.asarray(x, dtype=np.float64)
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos + rot * sin


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float | None = None,
                     window_left: int = -1, logits_soft_cap: float = 0.0, rope: bool = False,
                     rope_scale: float = 1.0, rope_theta: float = 1e4, k_scale: float = 1.0,
                     v_scale: float = 1.0):
    """One decode step. q (Hq, D), k/v (L, Hkv, D) -> (o (Hq, D), lse (Hq,) base 2), float64.
    An empty (or fully windowed-out) context gives o = 0 and lse = -inf."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64) * k_scale
    v = np.asarray(v, np.float64) * v_scale
    hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    if rope:
        q = rope_llama(q[None], np.array([n - 1]), rope_scale, rope_theta)[0] if n else q
        k = rope_llama(k.transpose(1, 0, 2), np.arange(n), rope_scale, rope_theta).transpose(1, 0, 2)
    start = max(0, n - 1 - window_left) if window_left >= 0 else 0
    o = np.zeros((hq, d))
    lse = np.full(hq, -np.inf)
    if n - start <= 0:
        return o, lse
    kk = np.repeat(k[start:], g, axis=1)  # (L', Hq, D)
    vv = np.repeat(v[start:], g, axis=1)
    s = np.einsum("hd,lhd->hl", q, kk) * scale
    if logits_soft_cap and logits_soft_cap > 0:
        s = logits_soft_cap * np.tanh(s / logits_soft_cap)
    m = s.max(axis=1, keepdims=True)
    p = np.exp(s - m)
    den = p.sum(axis=1, keepdims=True)
    o = np.einsum("hl,lhd->hd", p / den, vv)
    lse = (m[:, 0] + np.log(den[:, 0])) / math.log(2.0)
    return o, lse
