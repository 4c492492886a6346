"""The numpy references against independent formulations."""
import math

import numpy as np
import pytest

from fi_cupy import reference


def test_decode_reference_matches_softmax_formula():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((8, 64))
    k = rng.standard_normal((37, 2, 64))
    v = rng.standard_normal((37, 2, 64))
    o, lse = reference.decode_attention(q, k, v)
    for h in range(8):
        s = k[:, h // 4] @ q[h] / math.sqrt(64)
        p = np.exp(s - s.max())
        np.testing.assert_allclose(o[h], (p / p.sum()) @ v[:, h // 4], rtol=1e-12)
        np.testing.assert_allclose(lse[h], np.log2(np.exp(s).sum()), rtol=1e-12)


def test_decode_reference_empty_and_window():
    q = np.ones((2, 16))
    o, lse = reference.decode_attention(q, np.zeros((0, 1, 16)), np.zeros((0, 1, 16)))
    assert np.all(o == 0) and np.all(np.isneginf(lse))
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal((10, 1, 16)), rng.standard_normal((10, 1, 16))
    o_w, _ = reference.decode_attention(q, k, v, window_left=3)
    o_cut, _ = reference.decode_attention(q, k[6:], v[6:])
    np.testing.assert_allclose(o_w, o_cut)


def test_rope_matches_hf_rotate_half():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 32))
    pos = np.arange(5) + 100
    inv = 1.0 / (10000.0 ** (np.arange(0, 32, 2, dtype=np.float32) / np.float32(32)))
    ang = (pos.astype(np.float32)[:, None] * inv[None]).astype(np.float64)
    emb = np.concatenate([ang, ang], -1)
    rot = np.concatenate([-x[:, 16:], x[:, :16]], -1)
    np.testing.assert_allclose(reference.rope_llama(x, pos), x * np.cos(emb) + rot * np.sin(emb), rtol=1e-12)


def test_softmax_reference_against_the_formula_with_temperatures():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 50)) * 4
    t = np.array([0.5, 1.0, 2.0])
    got = reference.softmax(x, t)
    for r in range(3):
        e = np.exp(x[r] / t[r])
        np.testing.assert_allclose(got[r], e / e.sum(), rtol=1e-12)
    np.testing.assert_allclose(reference.softmax(x, 2.0), reference.softmax(x / 2.0), rtol=1e-12)
    masked = np.where(np.arange(50) < 25, -np.inf, x)  # -inf logits get 0, the rest still sum to 1
    assert np.all(reference.softmax(masked)[:, :25] == 0) and np.allclose(reference.softmax(masked).sum(1), 1)


# ---------------------------------------------------------------------------------------------
# Attention sinks: with_sinks and the sinks= of both attention references against the definition
# written out: the sink as one more column of each head's scaled (capped, masked) logits, softmaxed
# with the rest and dropped before P V.


def _attention_with_sink_column(q, k, v, keep, scale, cap, sinks):
    """q (Lq, Hq, D), k/v (Lk, Hkv, D), keep bool (Lq, Lk), sinks (Hq,) -> (o, lse base 2)."""
    lq, hq, d = q.shape
    g = hq // k.shape[1]
    o, lse = np.zeros((lq, hq, d)), np.zeros((lq, hq))
    for h in range(hq):
        s = q[:, h] @ k[:, h // g].T * scale  # (Lq, Lk)
        if cap:
            s = cap * np.tanh(s / cap)
        s = np.where(keep, s, -np.inf)
        s = np.concatenate([s, np.full((lq, 1), sinks[h])], axis=1)  # the sink: one logit, no value
        m = s.max(axis=1, keepdims=True)
        e = np.exp(s - m)
        o[:, h] = (e[:, :-1] / e.sum(axis=1, keepdims=True)) @ v[:, h // g]
        lse[:, h] = (m[:, 0] + np.log(e.sum(axis=1))) / math.log(2.0)
    return o, lse


def _sinks(rng, hq):
    """float32 values (what run() takes), held as float64: sinks / ln 2 below is then float64 too."""
    return (rng.standard_normal(hq) * 2).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cap", [0.0, 7.0])
def test_prefill_reference_with_sinks(group, causal, cap):
    # (qo, kv): qo < kv, qo > kv (causal: the first rows see no key), kv 0 (no row sees a key)
    rng = np.random.default_rng(10 + 4 * group + 2 * causal + bool(cap))
    hkv, d = 2, 16
    hq = group * hkv
    sinks = _sinks(rng, hq)
    for lq, lk in [(5, 11), (7, 3), (4, 0), (1, 1)]:
        q = rng.standard_normal((lq, hq, d)) * 2
        k, v = rng.standard_normal((lk, hkv, d)) * 2, rng.standard_normal((lk, hkv, d))
        keep = np.ones((lq, lk), bool)
        if causal:
            keep &= np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq
        want_o, want_lse = _attention_with_sink_column(q, k, v, keep, 1 / math.sqrt(d), cap, sinks)
        o, lse = reference.prefill_attention(q, k, v, causal=causal, logits_soft_cap=cap, sinks=sinks)
        np.testing.assert_allclose(o, want_o, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-14)
        dead = ~keep.any(axis=1)  # o = 0 and lse = the sink alone, in base 2
        assert np.all(o[dead] == 0)
        np.testing.assert_allclose(lse[dead], np.broadcast_to(sinks / math.log(2.0), lse[dead].shape), rtol=1e-12)


@pytest.mark.parametrize("group", [1, 4])
def test_decode_reference_with_sinks(group):
    rng = np.random.default_rng(20 + group)
    hkv, d = 2, 16
    hq = group * hkv
    sinks = _sinks(rng, hq)
    for n, window_left, cap in [(37, -1, 0.0), (9, 3, 0.0), (12, -1, 5.0), (1, -1, 0.0), (0, -1, 0.0)]:
        q = rng.standard_normal((hq, d)) * 2
        k, v = rng.standard_normal((n, hkv, d)) * 2, rng.standard_normal((n, hkv, d))
        keep = np.ones((1, n), bool)  # the query sits at position n - 1
        if window_left >= 0:
            keep &= np.arange(n)[None, :] >= n - 1 - window_left
        want_o, want_lse = _attention_with_sink_column(q[None], k, v, keep, 0.3, cap, sinks)
        o, lse = reference.decode_attention(q, k, v, sm_scale=0.3, window_left=window_left, logits_soft_cap=cap,
                                            sinks=sinks)
        np.testing.assert_allclose(o, want_o[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(lse, want_lse[0], rtol=1e-12, atol=1e-14)


def test_with_sinks_on_states():
    """with_sinks on given (o, lse) states: the scale and lse of the sink column, an empty state (lse -inf)
    gives o = 0 and lse = sink / ln 2, sinks=None hands the states back untouched."""
    rng = np.random.default_rng(30)
    o, lse = rng.standard_normal((6, 4, 8)), rng.standard_normal((6, 4)) * 3
    lse[2, 1] = -np.inf
    o[2, 1] = 0.0
    sinks = _sinks(rng, 4)
    got_o, got_lse = reference.with_sinks(o, lse, sinks.astype(np.float32))  # the dtype run() takes: same values
    total = np.log2(np.exp2(lse) + np.exp(sinks))
    np.testing.assert_allclose(got_lse, total, rtol=1e-12)
    np.testing.assert_allclose(got_o, o * (np.exp2(lse) / np.exp2(total))[..., None], rtol=1e-12)
    assert np.all(got_o[2, 1] == 0) and got_lse[2, 1] == pytest.approx(sinks[1] / math.log(2.0), rel=1e-12)
    same_o, same_lse = reference.with_sinks(o, lse, None)
    assert same_o is o and same_lse is lse


# ---------------------------------------------------------------------------------------------
# ALiBi (pos_encoding_mode="ALIBI"): the slopes against their formula written out, alibi_bias against a
# double loop, and both attention references against the definition: the bias slope_h * (key position -
# query position) added to each head's scaled logits, the query at kv_len - qo_len + i (decode: kv_len - 1).


def _slopes_written_out(n: int) -> list:
    """Press et al.'s slopes as FlashInfer's get_alibi_slopes computes them: p the largest power of 2 <= n;
    the powers 1..p of 2^(-8/p), then the odd powers 1, 3, .. of 2^(-4/p) for the n - p heads past p.
    float64; the kernels (and the references) read them as float32: _slopes32."""
    p = 1
    while 2 * p <= n:
        p *= 2
    first = [(2.0 ** (-8.0 / p)) ** k for k in range(1, p + 1)]
    rest = [(2.0 ** (-4.0 / p)) ** k for k in range(1, 2 * (n - p), 2)]
    return first + rest


def _slope_of_head(h: int, n: int) -> float:
    """FlashInfer's device-side form (get_alibi_slope): head h of n, one at a time."""
    p = 2 ** int(math.log2(n))
    return 2.0 ** (-8.0 * (h + 1) / p) if h < p else 2.0 ** (-4.0 * ((h + 1 - p) * 2 - 1) / p)


def _slopes32(n: int) -> np.ndarray:
    return np.asarray(_slopes_written_out(n), np.float32).astype(np.float64)


@pytest.mark.parametrize("n", [8, 12, 32, 1])
def test_alibi_slopes_against_the_formula(n):
    from fi_cupy._core.alibi import slopes
    got = slopes(n)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, _slopes_written_out(n), rtol=1e-7)
    np.testing.assert_allclose(got, [_slope_of_head(h, n) for h in range(n)], rtol=1e-7)
    known = {1: [2 ** -8], 8: [2.0 ** -k for k in range(1, 9)],
             12: [2.0 ** -k for k in range(1, 9)] + [2.0 ** -(k / 2) for k in (1, 3, 5, 7)]}
    if n in known:
        np.testing.assert_allclose(got, known[n], rtol=1e-7)
    assert np.all(got >= 2.0 ** -8) and np.all(got < 1)


def test_alibi_bias_against_a_double_loop():
    from fi_cupy._core.alibi import slopes
    qpos, kpos = np.array([4, 9, 0]), np.array([0, 1, 5, 9, 12])
    sl = slopes(12).astype(np.float64)
    want = np.zeros((12, 3, 5))
    for h in range(12):
        for i, qp in enumerate(qpos):
            for j, kp in enumerate(kpos):
                want[h, i, j] = sl[h] * (kp - qp)
    got = reference.alibi_bias(12, qpos, kpos)
    assert got.dtype == np.float64 and got.shape == (12, 3, 5)
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    heads = np.array([11, 0, 8])  # only these heads' rows, in that order
    np.testing.assert_allclose(reference.alibi_bias(12, qpos, kpos, np, heads), want[heads], rtol=1e-15, atol=0)
    assert np.all(got[:, 1, 3] == 0)  # key at the query's own position: no bias


def _attention_with_bias(q, k, v, keep, scale, bias, sinks=None):
    """q (Lq, Hq, D), k/v (Lk, Hkv, D), keep bool (Lq, Lk), bias (Hq, Lq, Lk) added to the scaled logits,
    sinks (Hq,) or None: one more logit column of no value -> (o, lse base 2), rows that see nothing 0 / -inf."""
    lq, hq, d = q.shape
    g = hq // k.shape[1]
    o, lse = np.zeros((lq, hq, d)), np.full((lq, hq), -np.inf)
    for h in range(hq):
        s = q[:, h] @ k[:, h // g].T * scale + bias[h]
        s = np.where(keep, s, -np.inf)
        if sinks is not None:
            s = np.concatenate([s, np.full((lq, 1), sinks[h])], axis=1)
        for i in range(lq):
            if np.all(np.isneginf(s[i])):
                continue
            m = s[i].max()
            e = np.exp(s[i] - m)
            o[i, h] = (e[:k.shape[0]] / e.sum()) @ v[:, h // g]  # the sink column carries no value
            lse[i, h] = (m + np.log(e.sum())) / math.log(2.0)
    return o, lse


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_left", [-1, 3])
def test_prefill_reference_with_alibi(group, causal, window_left):
    rng = np.random.default_rng(40 + 4 * group + 2 * causal + (window_left > 0))
    hkv, d, scale = 2, 16, 0.3
    hq = group * hkv
    sl = _slopes32(hq)
    for lq, lk in [(5, 11), (7, 3), (4, 0), (1, 1), (6, 6)]:
        q = rng.standard_normal((lq, hq, d)) * 2
        k, v = rng.standard_normal((lk, hkv, d)) * 2, rng.standard_normal((lk, hkv, d))
        qpos = np.arange(lq) + lk - lq  # the query's key position
        j = np.arange(lk)[None, :]
        keep = np.ones((lq, lk), bool)
        if causal:
            keep &= j <= qpos[:, None]
        if window_left >= 0:
            keep &= j >= qpos[:, None] - window_left
        bias = sl[:, None, None] * (j - qpos[:, None])[None]
        want_o, want_lse = _attention_with_bias(q, k, v, keep, scale, bias)
        o, lse = reference.prefill_attention(q, k, v, causal=causal, window_left=window_left, sm_scale=scale,
                                             alibi=True)
        np.testing.assert_allclose(o, want_o, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-14)
        if lk and lq:
            # FlashInfer's bias counts the query from the request's first one (kv_idx - qo_idx): the same
            # o, and an lse larger by slope_h * (kv_len - qo_len) / ln 2
            fi_o, fi_lse = _attention_with_bias(q, k, v, keep, scale, sl[:, None, None] * (j - np.arange(lq)[:, None]))
            np.testing.assert_allclose(o, fi_o, rtol=1e-12, atol=1e-14)
            fin = np.isfinite(lse)
            shift = np.broadcast_to(sl[None, :] * (lk - lq) / math.log(2.0), lse.shape)
            np.testing.assert_allclose(fi_lse[fin], (lse + shift)[fin], rtol=1e-12, atol=1e-12)
        if lk > 1:  # the bias changes the result
            plain, _ = reference.prefill_attention(q, k, v, causal=causal, window_left=window_left, sm_scale=scale)
            assert np.abs(plain - o).max() > 1e-3


def test_prefill_reference_with_alibi_and_sinks():
    rng = np.random.default_rng(50)
    lq, lk, hq, hkv, d = 6, 9, 8, 2, 16
    q = rng.standard_normal((lq, hq, d)) * 2
    k, v = rng.standard_normal((lk, hkv, d)) * 2, rng.standard_normal((lk, hkv, d))
    sinks = _sinks(rng, hq)
    qpos = np.arange(lq) + lk - lq
    keep = np.arange(lk)[None, :] <= qpos[:, None]
    bias = _slopes32(hq)[:, None, None] * (np.arange(lk)[None, :] - qpos[:, None])[None]
    want_o, want_lse = _attention_with_bias(q, k, v, keep, 1 / math.sqrt(d), bias, sinks)
    o, lse = reference.prefill_attention(q, k, v, causal=True, alibi=True, sinks=sinks)
    np.testing.assert_allclose(o, want_o, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (12, 2), (32, 4)])
def test_decode_reference_with_alibi_is_prefill_of_one_query(hq, hkv):
    """decode_attention(alibi=True): the query at kv_len - 1, as prefill_attention's one query; and against
    the bias written out."""
    rng = np.random.default_rng(60 + hq)
    d = 16
    sl = _slopes32(hq)
    cases = [(37, -1, None), (9, 3, None), (1, -1, None), (0, -1, None), (20, -1, _sinks(rng, hq))]
    for n, window_left, sinks in cases:
        q = rng.standard_normal((hq, d)) * 2
        k, v = rng.standard_normal((n, hkv, d)) * 2, rng.standard_normal((n, hkv, d))
        o, lse = reference.decode_attention(q, k, v, sm_scale=0.3, window_left=window_left, alibi=True, sinks=sinks)
        for causal in (False, True):  # one query at kv_len - 1: causal hides nothing
            po, pl = reference.prefill_attention(q[None], k, v, causal=causal, window_left=window_left, sm_scale=0.3,
                                                 alibi=True, sinks=sinks)
            np.testing.assert_allclose(o, po[0], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(lse, pl[0], rtol=1e-12, atol=1e-14)
        keep = np.ones((1, n), bool)
        if window_left >= 0:
            keep &= np.arange(n)[None, :] >= n - 1 - window_left
        bias = sl[:, None, None] * (np.arange(n) - (n - 1))[None, None, :]
        want_o, want_lse = _attention_with_bias(q[None], k, v, keep, 0.3, bias, sinks)
        np.testing.assert_allclose(o, want_o[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(lse, want_lse[0], rtol=1e-12, atol=1e-14)
        if n == 0:
            assert np.all(o == 0) and np.all(np.isneginf(lse))


# ---------------------------------------------------------------------------------------------
# head_dim_vo != head_dim_qk (DeepSeek's 192 / 128): o takes v's head dim, the default scale q's.


def _attention_double_loop(q, k, v, causal, window_left=-1, cap=0.0):
    """Row by row, head by head: q (Lq, Hq, Dqk), k (Lk, Hkv, Dqk), v (Lk, Hkv, Dvo) -> (o (Lq, Hq, Dvo), lse
    base 2); scale 1 / sqrt(Dqk); rows that see no key 0 / -inf."""
    lq, hq, dqk = q.shape
    lk, hkv, dvo = v.shape
    o, lse = np.zeros((lq, hq, dvo)), np.full((lq, hq), -np.inf)
    for i in range(lq):
        qpos = lk - lq + i
        for h in range(hq):
            kh = h // (hq // hkv)
            s, rows = [], []
            for j in range(lk):
                if (causal and j > qpos) or (window_left >= 0 and j < qpos - window_left):
                    continue
                x = float(q[i, h] @ k[j, kh]) / math.sqrt(dqk)
                s.append(cap * math.tanh(x / cap) if cap else x)
                rows.append(v[j, kh])
            if not s:
                continue
            m = max(s)
            e = np.exp(np.array(s) - m)
            o[i, h] = (e[:, None] * np.array(rows)).sum(axis=0) / e.sum()
            lse[i, h] = (m + math.log(e.sum())) / math.log(2.0)
    return o, lse


@pytest.mark.parametrize("dqk,dvo", [(192, 128), (128, 64)])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 1), (12, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_reference_head_dim_vo(dqk, dvo, hq, hkv, causal):
    # (qo, kv): qo < kv, qo > kv (causal: the first rows see no key), kv 0, and a window with a soft cap
    rng = np.random.default_rng(70 + dqk + hq + causal)
    for lq, lk, window_left, cap in [(5, 11, -1, 0.0), (7, 3, -1, 0.0), (4, 0, -1, 0.0), (6, 9, 2, 3.0)]:
        q = rng.standard_normal((lq, hq, dqk))
        k, v = rng.standard_normal((lk, hkv, dqk)), rng.standard_normal((lk, hkv, dvo))
        want_o, want_lse = _attention_double_loop(q, k, v, causal, window_left, cap)
        o, lse = reference.prefill_attention(q, k, v, causal=causal, window_left=window_left, logits_soft_cap=cap)
        assert o.shape == (lq, hq, dvo) and lse.shape == (lq, hq)
        np.testing.assert_allclose(o, want_o, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-14)
        if causal and lq > lk:
            assert np.all(o[: lq - lk] == 0) and np.all(np.isneginf(lse[: lq - lk]))
        # sm_scale stays 1 / sqrt(head_dim_qk): given explicitly, the same result
        o2, _ = reference.prefill_attention(q, k, v, causal=causal, window_left=window_left, logits_soft_cap=cap,
                                            sm_scale=1 / math.sqrt(dqk))
        np.testing.assert_array_equal(o2, o)


@pytest.mark.parametrize("lq, lk, causal", [(1, 37, False), (5, 9, True), (4, 2, True), (3, 0, False)])
def test_mla_reference_against_a_double_loop_and_prefill(lq, lk, causal):
    """reference.mla_attention: per (query, head) the softmax written out, and the same attention as
    prefill_attention over the concatenated [ckv | kpe] keys with V = ckv (one KV head, MQA)."""
    rng = np.random.default_rng(lq * 100 + lk)
    h, dc, dr, scale = 3, 16, 8, 0.3
    qn, qp = rng.standard_normal((lq, h, dc)), rng.standard_normal((lq, h, dr))
    ckv, kpe = rng.standard_normal((lk, dc)), rng.standard_normal((lk, dr))
    o, lse = reference.mla_attention(qn, qp, ckv, kpe, causal=causal, sm_scale=scale)
    assert o.shape == (lq, h, dc) and lse.shape == (lq, h)
    for i in range(lq):
        seen = [j for j in range(lk) if not causal or j <= lk - lq + i]
        for hh in range(h):
            if not seen:
                assert np.all(o[i, hh] == 0) and lse[i, hh] == -np.inf
                continue
            s = np.array([scale * (qn[i, hh] @ ckv[j] + qp[i, hh] @ kpe[j]) for j in seen])
            w = np.exp(s - s.max())
            np.testing.assert_allclose(o[i, hh], (w / w.sum()) @ ckv[seen], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(lse[i, hh], (s.max() + math.log(w.sum())) / math.log(2), rtol=1e-12)
    po, plse = reference.prefill_attention(np.concatenate([qn, qp], -1), np.concatenate([ckv, kpe], -1)[:, None],
                                           ckv[:, None], causal=causal, sm_scale=scale)
    np.testing.assert_allclose(o, po, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(plse))
