"""Plain numpy references (float64) for every op. Tests compare against these; users can read them.

Conventions follow FlashInfer: lse is base 2; the default sm_scale is 1/sqrt(head_dim); a soft cap
gives cap * tanh(sm_scale * q.k / cap); RoPE is the Llama "rotate half" form with inv_freq and the
angle computed in float32, as Hugging Face's LlamaRotaryEmbedding does.

The attention references (rope_llama, decode_attention, prefill_attention, merge_state(s)) also take
CuPy arrays: given one, they compute in float64 on its GPU and return CuPy arrays (the fuzz suite
checks long cases that way). CuPy is imported only then, so these run on machines without it.
"""
from __future__ import annotations

import math

import numpy as np

_CHUNK = 1 << 22  # prefill score elements (heads x rows x keys) computed at once: 32 MB of float64


def _xp(*arrays):
    """The array module of the inputs: cupy when any of them is a CuPy array, else numpy."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy
            return cupy
    return np


def rope_llama(x: np.ndarray, pos: np.ndarray, rope_scale: float = 1.0, rope_theta: float = 1e4) -> np.ndarray:
    """x (..., n, D) rotated at positions pos (n,): float32 angles, float64 sin/cos and products."""
    xp = _xp(x, pos)
    d = x.shape[-1]
    # inv_freq on the host in both cases: a GPU float32 pow may differ from the host's by an ulp.
    inv_freq = (1.0 / (np.float32(rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    inv_freq = xp.asarray(inv_freq.astype(np.float32) / np.float32(rope_scale))
    ang = (xp.asarray(pos, dtype=xp.float32)[:, None] * inv_freq[None, :]).astype(xp.float64)
    cos = xp.concatenate([xp.cos(ang), xp.cos(ang)], axis=-1)
    sin = xp.concatenate([xp.sin(ang), xp.sin(ang)], axis=-1)
    x = xp.asarray(x, dtype=xp.float64)
    rot = xp.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos + rot * sin


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float | None = None,
                     window_left: int = -1, logits_soft_cap: float = 0.0, rope: bool = False,
                     rope_scale: float = 1.0, rope_theta: float = 1e4, k_scale: float = 1.0,
                     v_scale: float = 1.0, sinks=None, alibi: bool = False):
    """One decode step. q (Hq, D), k/v (L, Hkv, D) -> (o (Hq, D), lse (Hq,) base 2), float64.
    An empty (or fully windowed-out) context gives o = 0 and lse = -inf. sinks (Hq,): attention-sink
    logits (see with_sinks). alibi: add alibi_bias (the query sits at position L - 1)."""
    xp = _xp(q, k, v)
    q = xp.asarray(q, xp.float64)
    k = xp.asarray(k, xp.float64) * k_scale
    v = xp.asarray(v, xp.float64) * v_scale
    hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    if rope:
        q = rope_llama(q[None], xp.array([n - 1]), rope_scale, rope_theta)[0] if n else q
        k = rope_llama(k.transpose(1, 0, 2), xp.arange(n), rope_scale, rope_theta).transpose(1, 0, 2)
    start = max(0, n - 1 - window_left) if window_left >= 0 else 0
    o = xp.zeros((hq, d))
    lse = xp.full(hq, -xp.inf)
    if n - start <= 0:
        return with_sinks(o, lse, sinks)
    # Query head h reads KV head h // g: the group's heads as one matrix against its KV head.
    s = xp.matmul(q.reshape(hkv, g, d), k[start:].transpose(1, 2, 0)) * scale  # (Hkv, g, L')
    if alibi:
        s = s + alibi_bias(hq, xp.array([n - 1]), xp.arange(start, n), xp).reshape(hkv, g, n - start)
    if logits_soft_cap and logits_soft_cap > 0:
        s = logits_soft_cap * xp.tanh(s / logits_soft_cap)
    m = s.max(axis=2, keepdims=True)
    p = xp.exp(s - m)
    den = p.sum(axis=2, keepdims=True)
    o = xp.matmul(p / den, v[start:].transpose(1, 0, 2)).reshape(hq, d)
    lse = ((m + xp.log(den)) / math.log(2.0)).reshape(hq)
    return with_sinks(o, lse, sinks)


def alibi_bias(num_heads: int, qpos, kpos, xp=np, heads=None):
    """ALiBi (pos_encoding_mode="ALIBI"): slope_h * (key position - query position), added to the scaled
    logits, (num_heads or len(heads), len(qpos), len(kpos)) float64; slopes by FlashInfer's formula
    (fi_cupy._core.alibi.slopes). The softmax is that of FlashInfer's bias slope_h * (kv_idx - qo_idx),
    which counts qo_idx from the request's first query: the two differ by a constant a row, so o is
    the same and the lse differs by slope_h * (kv_len - qo_len) / ln 2."""
    from ._core.alibi import slopes
    sl = xp.asarray(slopes(num_heads), dtype=xp.float64)
    if heads is not None:  # only these heads' rows
        sl = sl[heads]
    diff = xp.asarray(kpos, dtype=xp.float64)[None, :] - xp.asarray(qpos, dtype=xp.float64)[:, None]
    return sl[:, None, None] * diff[None]


def with_sinks(o, lse, sinks):
    """Attention sinks (gpt-oss; FlashInfer's `sinks`): sinks[h] is one more logit of head h, in the
    units of the scaled logits (sm_scale * q.k), that joins the softmax denominator but carries no
    value. From a row's o and lse (base 2) without it: o * 2^lse / (2^lse + e^sink), and the lse of
    the whole denominator, log2(2^lse + e^sink). A row that sees no key keeps o = 0, lse = sink in
    base 2. o (..., H, D), lse (..., H), sinks (H,) or None (o, lse unchanged)."""
    if sinks is None:
        return o, lse
    xp = _xp(o, lse)
    s2 = xp.asarray(sinks, dtype=xp.float64) / math.log(2.0)  # base 2
    total = xp.logaddexp2(lse, s2)
    keep = xp.where(xp.isneginf(total), 0.0, xp.exp2(lse - xp.where(xp.isneginf(total), 0.0, total)))
    return o * keep[..., None], total


# ---------------------------------------------------------------------------------------------
# Norms and activations (float64, written as model code writes them)


def rmsnorm(x, weight, eps: float = 1e-6, gemma: bool = False) -> np.ndarray:
    """Llama RMSNorm: x * rsqrt(mean(x^2) + eps) * weight; Gemma uses (1 + weight)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * ((1.0 + w) if gemma else w)


def fused_add_rmsnorm(x, residual, weight, eps: float = 1e-6, gemma: bool = False, store_dtype=None):
    """(normed, new residual): residual + x is stored in store_dtype (model code keeps the residual
    stream in the activation dtype) and that stored value is normalised."""
    s = np.asarray(x, np.float64) + np.asarray(residual, np.float64)
    if store_dtype is not None:
        s = s.astype(store_dtype).astype(np.float64)
    return rmsnorm(s, weight, eps, gemma), s


def layernorm(x, gamma, beta, eps: float = 1e-6) -> np.ndarray:
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(gamma, np.float64) + np.asarray(beta, np.float64)


def act_and_mul(x, act: str) -> np.ndarray:
    """act(x[..., :d]) * x[..., d:] for act in silu, gelu (erf), gelu_tanh."""
    from math import erf
    x = np.asarray(x, np.float64)
    d = x.shape[-1] // 2
    g, u = x[..., :d], x[..., d:]
    if act == "silu":
        a = g / (1.0 + np.exp(-g))
    elif act == "gelu":
        a = 0.5 * g * (1.0 + np.vectorize(erf)(g / math.sqrt(2.0)))
    else:
        a = 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
    return a * u


# ---------------------------------------------------------------------------------------------
# Rotary embedding (general form)


def rope_inv_freq(rotary_dim: int, rope_theta: float = 1e4, rope_scale: float = 1.0) -> np.ndarray:
    """theta^(-2i / rotary_dim) / rope_scale, computed in float64 and rounded to float32 (the value
    Hugging Face's float32 computation approximates to within an ulp)."""
    i = np.arange(rotary_dim // 2, dtype=np.float64)
    return (rope_theta ** (-2.0 * i / rotary_dim) / rope_scale).astype(np.float32)


def llama31_inv_freq(rotary_dim: int, rope_theta: float = 5e5, factor: float = 8.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, old_context_len: float = 8192) -> np.ndarray:
    """Hugging Face's Llama 3 frequency rescaling (_compute_llama3_parameters), in float64, rounded."""
    i = np.arange(rotary_dim // 2, dtype=np.float64)
    f = rope_theta ** (-2.0 * i / rotary_dim)
    wavelen = 2 * math.pi / f
    low_wl, high_wl = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    out = np.where(wavelen > low_wl, f / factor, f)
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    out = np.where(medium, (1 - smooth) * f / factor + smooth * f, out)
    return out.astype(np.float32)


def rope(x, pos, inv_freq=None, rotary_dim: int | None = None, interleave: bool = False, cos_sin=None) -> np.ndarray:
    """x (nnz, heads, D) rotated at positions pos (nnz,). The angle is the float32 product
    pos * inv_freq; sin / cos in float64. cos_sin (max_pos, rotary_dim) = [cos | sin] replaces inv_freq.
    Non-interleaved pairs dim j with j + rotary_dim / 2; interleaved pairs 2i with 2i + 1."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    pos = np.asarray(pos)
    if cos_sin is not None:
        rd = cos_sin.shape[1]
        cos, sin = np.asarray(cos_sin[pos, : rd // 2], np.float64), np.asarray(cos_sin[pos, rd // 2:], np.float64)
    else:
        ang = (pos.astype(np.float32)[:, None] * np.asarray(inv_freq, np.float32)[None, :]).astype(np.float64)
        cos, sin = np.cos(ang), np.sin(ang)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (nnz, 1, rd / 2)
    out = x.copy()
    if interleave:
        a, b = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2] = a * cos - b * sin
        out[..., 1:rd:2] = b * cos + a * sin
    else:
        a, b = x[..., : rd // 2], x[..., rd // 2: rd]
        out[..., : rd // 2] = a * cos - b * sin
        out[..., rd // 2: rd] = b * cos + a * sin
    return out


def ragged_positions(indptr, offsets) -> np.ndarray:
    """Position of each token of a ragged batch: offsets[b] + index within request b."""
    indptr = np.asarray(indptr)
    return np.concatenate([np.arange(indptr[b + 1] - indptr[b]) + offsets[b] for b in range(len(indptr) - 1)]
                          + [np.zeros(0, np.int64)]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Attention states and the paged cache


def merge_states(v, s):
    """v (seq, n, heads, D), s (seq, n, heads) base-2 lse -> (v (seq, heads, D), s (seq, heads));
    empty states (s = -inf) weigh 0; all empty gives v = 0, s = -inf."""
    xp = _xp(v, s)
    v = xp.asarray(v, xp.float64)
    s = xp.asarray(s, xp.float64)
    m = s.max(axis=1, keepdims=True)
    finite = xp.isfinite(m)
    with np.errstate(invalid="ignore"):  # -inf - -inf in rows whose states are all empty
        w = xp.where(finite, xp.exp2(xp.where(finite, s - m, 0.0)), 0.0)
    w = xp.where(xp.isneginf(s), 0.0, w)
    tot = w.sum(axis=1)
    vo = (w[..., None] * v).sum(axis=1) / xp.where(tot > 0, tot, 1.0)[..., None]
    so = xp.where(tot > 0, m[:, 0] + xp.log2(xp.where(tot > 0, tot, 1.0)), -xp.inf)
    return vo, so


def merge_state(va, sa, vb, sb):
    xp = _xp(va, sa, vb, sb)
    return merge_states(xp.stack([xp.asarray(va), xp.asarray(vb)], axis=1),
                        xp.stack([xp.asarray(sa), xp.asarray(sb)], axis=1))


def append_paged_kv(cache_k, cache_v, key, value, batch_indices, positions, kv_indices, kv_indptr,
                    page_size: int, layout: str = "NHD"):
    """Copies of cache_k / cache_v (num_pages, page_size, H, D) [NHD] or (num_pages, H, page_size, D)
    [HND] with token i's rows written at request batch_indices[i], position positions[i]."""
    ck, cv = cache_k.copy(), cache_v.copy()
    for i, (b, p) in enumerate(zip(batch_indices, positions)):
        page = kv_indices[kv_indptr[b] + p // page_size]
        if layout == "NHD":
            ck[page, p % page_size], cv[page, p % page_size] = key[i], value[i]
        else:
            ck[page, :, p % page_size], cv[page, :, p % page_size] = key[i], value[i]
    return ck, cv


# ---------------------------------------------------------------------------------------------
# Sampling filters (one row; ties at a boundary are kept, as the kernels keep them)


def softmax(logits, temperature=None) -> np.ndarray:
    """Softmax over the last axis of logits / temperature (a scalar, or one value a row)."""
    x = np.asarray(logits, np.float64)
    if temperature is not None:
        x = x / np.reshape(np.asarray(temperature, np.float64), (-1, 1))
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def top_k_mask(p, k: int) -> np.ndarray:
    """Tokens with fewer than k tokens of larger probability (k <= 0 or >= len: all)."""
    p = np.asarray(p, np.float64)
    if k <= 0 or k >= p.size:
        return p > 0
    larger = p.size - np.searchsorted(np.sort(p), p, side="right")  # tokens strictly larger
    return (larger < k) & (p > 0)


def top_p_mask(p, top_p: float, mass=None) -> np.ndarray:
    """Tokens whose larger tokens hold less than top_p of `mass` (default: the row's mass)."""
    p = np.asarray(p, np.float64)
    mass = p[p > 0].sum() if mass is None else mass
    srt = np.sort(p)
    suffix = np.concatenate([np.cumsum(srt[::-1])[::-1], [0.0]])  # suffix[j] = sum of srt[j:]
    above = suffix[np.searchsorted(srt, p, side="right")]  # mass of the tokens strictly larger
    return (above < top_p * mass) & (p > 0)


def min_p_mask(p, min_p: float) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return (p >= min_p * p.max()) & (p > 0)


def filtered_distribution(p, top_k=None, top_p=None, min_p=None, order: str = "top_k_first") -> np.ndarray:
    """The distribution a sampler draws from after its filters, renormalised."""
    p = np.asarray(p, np.float64)
    keep = p > 0
    if top_k is not None:
        keep &= top_k_mask(p, top_k)
    if top_p is not None:
        mass = p[keep].sum() if (top_k is not None and order == "top_k_first") else None
        keep &= top_p_mask(p, top_p, mass)
    if min_p is not None:
        keep &= min_p_mask(p, min_p)
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def top_k_mask_logits(x, k: int) -> np.ndarray:
    """Logits outside the top-k set (fewer than k larger; NaN never kept) set to -inf."""
    x = np.asarray(x, np.float64)
    if k <= 0 or k >= x.size:
        return np.where(np.isnan(x), -np.inf, x)
    srt = np.sort(x[~np.isnan(x)])
    larger = srt.size - np.searchsorted(srt, x, side="right")
    return np.where((larger < k) & ~np.isnan(x), x, -np.inf)


def chain_speculative_distribution(draft_probs, draft_ids, target_probs) -> dict:
    """Exact law of one request's chain speculative step: {(emitted drafts j, token at j): probability}.
    Draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection j the token
    follows max(p_j - q_j, 0) renormalised; with all n accepted, p_n."""
    q = np.asarray(draft_probs, np.float64)
    p = np.asarray(target_probs, np.float64)
    n = q.shape[0]
    law, reach = {}, 1.0  # reach: probability that drafts 0..j-1 were all accepted
    for j in range(n + 1):
        if j < n:
            d = int(draft_ids[j])
            acc = 1.0 if q[j, d] <= 0 and p[j, d] > 0 else min(1.0, p[j, d] / q[j, d]) if q[j, d] > 0 else 0.0
            resid = np.maximum(p[j] - q[j], 0.0)
            resid = resid / resid.sum() if resid.sum() > 0 else p[j] / p[j].sum()
            for t in np.nonzero(resid)[0]:
                law[(j, int(t))] = law.get((j, int(t)), 0.0) + reach * (1 - acc) * resid[t]
            reach *= acc
        else:
            bonus = p[n] / p[n].sum()
            for t in np.nonzero(bonus)[0]:
                law[(n, int(t))] = law.get((n, int(t)), 0.0) + reach * bonus[t]
    return law


def sigmoid_attention(q, k, v, logits_scale: float, bias: float, causal: bool = False):
    """One request of sigmoid attention (no softmax; fi_cupy.variant's use_softmax = false): q (Lq, Hq,
    D), k (Lk, Hkv, D), v (Lk, Hkv, Dv) -> o (Lq, Hq, Dv) float64, o[i, h] = sum over the keys j query i
    sees (causal: j <= Lk - Lq + i) of sigmoid(q[i, h] . k[j] * logits_scale + bias) v[j]."""
    xp = _xp(q, k, v)
    q, k, v = (xp.asarray(a, xp.float64) for a in (q, k, v))
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    g = hq // hkv
    kh = xp.repeat(k.transpose(1, 0, 2), g, axis=0)  # (Hq, Lk, D): each query head's KV head
    vh = xp.repeat(v.transpose(1, 0, 2), g, axis=0)
    s = xp.einsum("hid,hjd->hij", q.transpose(1, 0, 2), kh) * logits_scale + bias
    p = 1.0 / (1.0 + xp.exp(-s))
    if causal:
        p = p * (xp.arange(lk)[None, None, :] <= (xp.arange(lq) + lk - lq)[None, :, None])
    return xp.einsum("hij,hjd->ihd", p, vh)


def prefill_attention(q, k, v, causal: bool = False, window_left: int = -1, custom_mask=None,
                      logits_soft_cap: float = 0.0, sm_scale: float | None = None, rope: bool = False,
                      rope_scale: float = 1.0, rope_theta: float = 1e4, sinks=None, alibi: bool = False):
    """One request. q (Lq, Hq, D), k (Lk, Hkv, D), v (Lk, Hkv, Dv), custom_mask bool (Lq, Lk) -> (o (Lq,
    Hq, Dv), lse (Lq, Hq) base 2), float64. Dv may differ from D (head_dim_vo != head_dim_qk); the
    default sm_scale is 1 / sqrt(D). Query i sits at key position Lk - Lq + i (causal, window, RoPE (q
    and k only) and ALiBi: alibi_bias); a row that sees no key gives o = 0, lse = -inf. sinks (Hq,):
    attention-sink logits (with_sinks)."""
    xp = _xp(q, k, v, custom_mask)
    q = xp.asarray(q, xp.float64)
    k = xp.asarray(k, xp.float64)
    v = xp.asarray(v, xp.float64)
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    dv = v.shape[-1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    qpos = xp.arange(lq) + lk - lq
    if rope:
        q = rope_llama(q.transpose(1, 0, 2), qpos, rope_scale, rope_theta).transpose(1, 0, 2)
        k = rope_llama(k.transpose(1, 0, 2), xp.arange(lk), rope_scale, rope_theta).transpose(1, 0, 2)
    keep = xp.ones((lq, lk), dtype=bool)
    j = xp.arange(lk)[None, :]
    if causal:
        keep &= j <= qpos[:, None]
    if window_left >= 0:
        keep &= j >= qpos[:, None] - window_left
    if custom_mask is not None:
        keep &= xp.asarray(custom_mask, dtype=bool)
    o = xp.zeros((lq, hq, dv))
    lse = xp.full((lq, hq), -xp.inf)
    if lq == 0 or lk == 0:
        return with_sinks(o, lse, sinks)
    qh = q.transpose(1, 0, 2)  # (Hq, Lq, D)
    kt = k.transpose(1, 2, 0)  # (Hkv, D, Lk)
    vh = v.transpose(1, 0, 2)  # (Hkv, Lk, Dv)
    # Blocks of query rows and heads, so the float64 scores stay within _CHUNK elements.
    rstep = max(1, min(lq, _CHUNK // lk))
    hstep = max(1, _CHUNK // (rstep * lk))
    for r0 in range(0, lq, rstep):
        rows = slice(r0, min(lq, r0 + rstep))
        for h0 in range(0, hq, hstep):
            heads = xp.arange(h0, min(hq, h0 + hstep))
            s = xp.matmul(qh[heads, rows], kt[heads // g]) * scale  # (h, r, Lk)
            if alibi:
                s = s + alibi_bias(hq, qpos[rows], xp.arange(lk), xp, heads)
            if logits_soft_cap and logits_soft_cap > 0:
                s = logits_soft_cap * xp.tanh(s / logits_soft_cap)
            s = xp.where(keep[None, rows], s, -xp.inf)
            m = s.max(axis=2, keepdims=True)
            m_safe = xp.where(xp.isfinite(m), m, 0.0)
            p = xp.exp(s - m_safe)
            den = p.sum(axis=2, keepdims=True)
            oh = xp.matmul(p / xp.where(den > 0, den, 1.0), vh[heads // g])  # (h, r, Dv)
            o[rows, h0:h0 + heads.size] = oh.transpose(1, 0, 2)
            den = den[..., 0]
            lh = xp.where(den > 0, m_safe[..., 0] + xp.log(xp.where(den > 0, den, 1.0)), -xp.inf)
            lse[rows, h0:h0 + heads.size] = lh.T
    return with_sinks(o, lse / math.log(2.0), sinks)


def mla_attention(q_nope, q_pe, ckv, kpe, causal: bool = False, sm_scale: float | None = None):
    """One request of absorbed multi-head latent attention (DeepSeek's MLA; FlashInfer's
    BatchMLAPagedAttentionWrapper): every query head attends over one shared compressed cache.
    q_nope (Lq, H, Dc), q_pe (Lq, H, Dr), ckv (Lk, Dc), kpe (Lk, Dr) -> (o (Lq, H, Dc), lse (Lq, H) base 2),
    float64: logits = sm_scale * (q_nope . ckv + q_pe . kpe), o = softmax(logits) . ckv. sm_scale None:
    1 / sqrt(Dc + Dr). Causal: query i sits at key position Lk - Lq + i and sees the keys up to it; a row
    that sees no key gives o = 0, lse = -inf. Written on its own (not through prefill_attention), so the
    tests of the MLA path check against an independent formula."""
    xp = _xp(q_nope, q_pe, ckv, kpe)
    qn, qp = xp.asarray(q_nope, xp.float64), xp.asarray(q_pe, xp.float64)
    c, r = xp.asarray(ckv, xp.float64), xp.asarray(kpe, xp.float64)
    lq, h, dc = qn.shape
    lk = c.shape[0]
    scale = 1.0 / math.sqrt(dc + r.shape[1]) if sm_scale is None else sm_scale
    o = xp.zeros((lq, h, dc))
    lse = xp.full((lq, h), -xp.inf)
    if lq == 0 or lk == 0:
        return o, lse
    s = (xp.einsum("qhd,kd->qhk", qn, c) + xp.einsum("qhd,kd->qhk", qp, r)) * scale
    if causal:
        keep = xp.arange(lk)[None, :] <= (xp.arange(lq) + lk - lq)[:, None]
        s = xp.where(keep[:, None, :], s, -xp.inf)
    m = s.max(axis=2, keepdims=True)
    m_safe = xp.where(xp.isfinite(m), m, 0.0)
    p = xp.exp(s - m_safe)
    den = p.sum(axis=2)
    o = xp.einsum("qhk,kd->qhd", p, c) / xp.where(den > 0, den, 1.0)[..., None]
    lse = xp.where(den > 0, m_safe[..., 0] + xp.log(xp.where(den > 0, den, 1.0)), -xp.inf)
    return o, lse / math.log(2.0)
