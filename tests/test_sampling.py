"""Samplers on the GPU with CuPy inputs: chi-square against the filtered distribution (fi_cupy.reference)
at a fixed seed, zero-probability tokens never drawn, top_k=1 is the argmax, same seed and offset give the
same tokens, softmax against numpy, check_nan; float16 / bfloat16 inputs, int64 indices and draft ids,
per-row parameters of every dtype, fi_cupy Generators, per-row seeds and offsets, CUDA graphs,
return_valid. torch.Generator semantics (CUDA, CPU and torch's default generator) are interop tests that
need torch. On the CPU (no launch): parameter and seed forms, generator state handling, FlashInfer's
signatures."""
import inspect
import math
import struct

import cupy as cp
import numpy as np
import pytest

from fi_cupy import reference, sampling
from fi_cupy._core import dtypes as dt
from fi_cupy._core import kernels, streams
from fi_cupy._core.arrays import ArrayInfo, contiguous_strides
from fi_cupy._core.call import Call
from gpu_arrays import BF16, bits, cast, dtype_name, f64, f64_dev, from_host, host_dtype, poison, rand, uniform

try:
    import torch
except ImportError:  # a machine with only fi_cupy's install: the interop tests skip, the rest run
    torch = None

gpu = pytest.mark.gpu
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (interop test)")


N = 40000  # draws: one per row of a batch of identical rows


def _chi2_ok(counts, q, n):
    """Pearson chi-square below the 99.9% quantile (Wilson-Hilferty) over the cells with q > 0."""
    keep = q > 0
    exp = q[keep] * n
    stat = float(((counts[keep] - exp) ** 2 / exp).sum())
    df = max(1, int(keep.sum()) - 1)
    crit = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


def _rows(p):
    return cp.asarray(np.tile(np.asarray(p, np.float32), (N, 1)))


def _eq(a, b) -> bool:
    """torch.equal for CuPy arrays: same shape and dtype, equal values (bfloat16 compared through float64,
    so no CuPy kernel runs on it)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == BF16:
        a, b = f64_dev(a), f64_dev(b)
    return bool(cp.array_equal(a, b))


def _f32(x):
    """x (float16 / bfloat16 / float32) as float32: exact."""
    return f64_dev(x).astype(cp.float32)


P = np.array([0.02, 0.3, 0.0, 0.05, 0.15, 0.01, 0.22, 0.04, 0.11, 0.1], np.float64)


CHI_CASES = [  # (sampler, its filter arguments, the reference's filters)
    ("sampling_from_probs", {}, {}),
    ("top_k_sampling_from_probs", {"top_k": 4}, {"top_k": 4}),
    ("top_p_sampling_from_probs", {"top_p": 0.6}, {"top_p": 0.6}),
    ("min_p_sampling_from_probs", {"min_p": 0.3}, {"min_p": 0.3}),
    ("top_k_top_p_sampling_from_probs", {"top_k": 5, "top_p": 0.7}, {"top_k": 5, "top_p": 0.7}),
    ("top_k_top_p_sampling_from_probs", {"top_k": 5, "top_p": 0.7, "filter_apply_order": "joint"},
     {"top_k": 5, "top_p": 0.7, "order": "joint"})]


@pytest.mark.parametrize("name,kw,ref", CHI_CASES)
@gpu
def test_chi_square(name, kw, ref):
    q = reference.filtered_distribution(P, **ref)
    got = cp.asnumpy(getattr(sampling, name)(_rows(P * 0.5), seed=1234, offset=7, **kw))  # unnormalised
    assert got.dtype == np.int32 and got.min() >= 0 and got.max() < P.size
    assert np.all(q[got] > 0), "drew a token whose filtered probability is 0"
    stat, crit = _chi2_ok(np.bincount(got, minlength=P.size), q, N)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"


@gpu
def test_sampling_from_logits_chi_square():
    logits = np.log(P + 1e-30)
    logits[2] = -np.inf
    got = cp.asnumpy(sampling.sampling_from_logits(_rows(logits), seed=5, offset=0))
    stat, crit = _chi2_ok(np.bincount(got, minlength=P.size), P / P.sum(), N)
    assert stat < crit and not np.any(got == 2)


@gpu
def test_per_row_parameters_and_indices():
    rng = np.random.default_rng(0)
    probs = rng.random((6, 50)).astype(np.float32) ** 4
    k = np.array([1, 2, 3, 50, 0, 7], np.int32)
    pt = cp.asarray(probs)
    got = cp.asnumpy(sampling.top_k_sampling_from_probs(pt, cp.asarray(k), seed=3))
    assert got[0] == probs[0].argmax()
    for r in range(6):
        assert reference.top_k_mask(probs[r], int(k[r]))[got[r]]
    idx = cp.asarray([5, 5, 0, 2], dtype=cp.int32)
    got = cp.asnumpy(sampling.top_p_sampling_from_probs(pt, cp.asarray([0.5, 0.9, 0.3, 1.0], dtype=cp.float32),
                                                        indices=idx, seed=9))
    for j, (r, tp) in enumerate(zip([5, 5, 0, 2], [0.5, 0.9, 0.3, 1.0])):
        assert reference.top_p_mask(probs[r], tp)[got[j]]


@gpu
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 256000, 1001])
def test_large_vocab_support(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((8, vocab)).astype(np.float32) * 4
    probs = sampling.softmax(cp.asarray(logits))
    np.testing.assert_allclose(cp.asnumpy(probs), reference.softmax(logits), rtol=1e-4, atol=1e-9)
    pn = cp.asnumpy(probs).astype(np.float64)
    for name, kw, mask in [("top_k_sampling_from_probs", {"top_k": 20}, lambda p: reference.top_k_mask(p, 20)),
                           ("top_p_sampling_from_probs", {"top_p": 0.5}, lambda p: reference.top_p_mask(p, 0.5)),
                           ("min_p_sampling_from_probs", {"min_p": 0.1}, lambda p: reference.min_p_mask(p, 0.1))]:
        got = cp.asnumpy(getattr(sampling, name)(probs, seed=11, **kw))
        assert all(mask(pn[r])[got[r]] for r in range(8)), name
    greedy = cp.asnumpy(sampling.top_k_sampling_from_probs(probs, 1, seed=2))
    assert np.array_equal(greedy, logits.argmax(1))


@gpu
def test_reproducible_and_offsets_differ():
    p = _rows(P)[:1000]
    a = cp.asnumpy(sampling.sampling_from_probs(p, seed=42, offset=3))
    b = cp.asnumpy(sampling.sampling_from_probs(p, seed=42, offset=3))
    c = cp.asnumpy(sampling.sampling_from_probs(p, seed=42, offset=4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    g1, g2 = sampling.Generator(8), sampling.Generator(8)
    assert np.array_equal(cp.asnumpy(sampling.sampling_from_probs(p, generator=g1)),
                          cp.asnumpy(sampling.sampling_from_probs(p, generator=g2)))
    assert g1.offset == 1


@gpu
@pytest.mark.parametrize("vocab", [1000, 4, 7, 65537 * 4, 16 * 13 * 4096, 16 * 20 * 4096, 16 * 20 * 4096 + 4])
def test_softmax_temperature_per_row(vocab):
    """Ring shapes (1000: 16 CTAs of 64 floats; 262148: slices that end mid-chunk; 851968: 16 CTAs
    of 13 chunks; 1310720: 16 CTAs of 20 chunks, 7 of them held in registers, the longest row), the
    two-pass kernel (7: unaligned rows; 1310724: longer)."""
    x = rand((3, vocab), "float32", scale=4)
    t = cp.asarray([0.5, 1.0, 2.0], dtype=cp.float32)
    got = cp.asnumpy(sampling.softmax(x, t))
    np.testing.assert_allclose(got, reference.softmax(cp.asnumpy(x), cp.asnumpy(t)), rtol=1e-4, atol=1e-9)


@gpu
@pytest.mark.parametrize("batch,vocab", [(300, 32000), (203, 128256), (40, 151936)])
def test_softmax_many_rows_a_cluster_and_masked_slices(batch, vocab):
    """More rows than resident clusters, so each cluster streams several through its ring of buffers;
    -inf logits, with whole CTA slices of -inf in some rows (their share is 0, never NaN)."""
    g = cp.random.default_rng(batch)
    x = g.standard_normal((batch, vocab), dtype=cp.float32) * 3
    x[::3, : vocab // 2] = -np.inf  # the first CTAs of those rows see nothing but -inf
    x[1::5, 7::11] = -np.inf
    nan_block = cp.full_like(x, np.nan)  # freed to CuPy's pool, so the output most likely reuses its NaN block
    del nan_block
    got = cp.asnumpy(sampling.softmax(x))
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, reference.softmax(cp.asnumpy(x)), rtol=1e-4, atol=1e-9)


def _force_ring(monkeypatch, batch, vocab, cluster, per_sm, window=None):
    """Make softmax at (batch, vocab) run the ring kernel as `cluster` CTAs at per_sm CTAs an SM."""
    if sampling._ring_plan(0, vocab, batch) is None:
        pytest.skip("the ring softmax needs thread-block clusters (sm_90+)")
    slots = sampling.ring_slots(kernels.device_props(0), per_sm)
    assert sampling.ring_slice(vocab, cluster)[1] - sampling.ring_hold(per_sm) < slots
    plan = sampling.ring_plan(0, vocab, batch, cluster, per_sm, window)
    monkeypatch.setitem(sampling._ring_plans, (0, vocab, batch), plan)


@gpu
@pytest.mark.parametrize("window", [0, 1, 2, 3])
@pytest.mark.parametrize("cluster,per_sm", [(7, 2), (2, 1)])
def test_softmax_ring_copies_in_flight(monkeypatch, window, cluster, per_sm):
    """The ring kernel with at most `window` copies in flight a CTA (0: as many as buffers allow); 2@1
    holds 7 of its 16 chunks in registers, with more rows than resident clusters."""
    batch, vocab = 70, 128256
    _force_ring(monkeypatch, batch, vocab, cluster, per_sm, window)
    x = rand((batch, vocab), "float32", scale=3)
    np.testing.assert_allclose(cp.asnumpy(sampling.softmax(x)), reference.softmax(cp.asnumpy(x)),
                               rtol=1e-4, atol=1e-9)


@gpu
@pytest.mark.parametrize("cluster,per_sm", [(7, 2), (2, 1)])
def test_softmax_ring_buffer_reuse_stress(monkeypatch, cluster, per_sm):
    """The ring refills a buffer by bulk copy once every warp has read it: without a proxy fence
    between the reads and the refill, about one run in 1000 at this shape (7@2) read a refilled
    float4 (the first of a chunk). 2000 runs, checked on the GPU without a host sync in the loop."""
    _force_ring(monkeypatch, 64, 151936, cluster, per_sm)
    x = rand((64, 151936), "float32", scale=3)
    ref = cp.asarray(reference.softmax(cp.asnumpy(x).astype(np.float64)).astype(np.float32))
    bad = cp.zeros((), dtype=cp.int32)
    for _ in range(2000):
        bad += (~cp.isclose(sampling.softmax(x), ref, rtol=1e-4, atol=1e-9)).any()
    assert int(bad) == 0, f"{int(bad)} of 2000 runs differ from the float64 softmax"


@gpu
def test_bad_input():
    p = uniform((4, 10))
    with pytest.raises(ValueError, match="top_p"):
        sampling.top_p_sampling_from_probs(p, 1.5)
    with pytest.raises(ValueError, match="top_p"):
        sampling.top_p_sampling_from_probs(p, cp.asarray([0.5, 0.0, 0.5, 0.5], dtype=cp.float32))
    with pytest.raises(ValueError, match="indices"):
        sampling.sampling_from_probs(p, indices=cp.asarray([0, 4], dtype=cp.int32))
    with pytest.raises(ValueError, match="top_k: expected shape"):
        sampling.top_k_sampling_from_probs(p, cp.ones(3, dtype=cp.int32))
    with pytest.raises(TypeError, match="probs: dtype float64"):
        sampling.sampling_from_probs(p.astype(cp.float64))
    with pytest.raises(ValueError, match="probs: expected 2 dims"):
        sampling.sampling_from_probs(p[0])
    q = p.copy()
    q[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sampling.sampling_from_probs(q, check_nan=True)


def _shared_rows(p):
    """N draws from one (1, vocab) row through `indices`: a large vocabulary at the memory of one row."""
    return cp.asarray(np.asarray(p, np.float32)[None]), cp.zeros(N, dtype=cp.int32)


def _embedded(vocab, rest_mass):
    """P's 10 tokens at spread positions of a vocab, the other tokens sharing rest_mass equally."""
    rng = np.random.default_rng(vocab)
    pos = rng.choice(vocab, P.size, replace=False)
    p = np.full(vocab, rest_mass / (vocab - P.size))
    p[pos] = P * (1 - rest_mass)
    return p, pos


def _cells(got, pos, vocab):
    """Counts over P's positions plus one cell for every other token."""
    where = np.full(vocab, P.size)
    where[pos] = np.arange(P.size)
    return np.bincount(where[got], minlength=P.size + 1)


@pytest.mark.parametrize("name,kw,ref,rest", [
    ("sampling_from_probs", {}, {}, 0.01),
    ("top_p_sampling_from_probs", {"top_p": 0.6}, {"top_p": 0.6}, 0.01),
    ("top_k_sampling_from_probs", {"top_k": 4}, {"top_k": 4}, 0.01),
    ("min_p_sampling_from_probs", {"min_p": 0.3}, {"min_p": 0.3}, 0.01),
    ("top_k_top_p_sampling_from_probs", {"top_k": 5, "top_p": 0.7}, {"top_k": 5, "top_p": 0.7}, 0.01),
    # Flat tails hold 45% of the mass in ~40k tied tokens: more candidates than shared memory takes,
    # so the exact radix select decides; ties at the boundary are all kept.
    ("top_p_sampling_from_probs", {"top_p": 0.9}, {"top_p": 0.9}, 0.45),
    ("top_k_sampling_from_probs", {"top_k": 12}, {"top_k": 12}, 0.45),
    ("top_k_top_p_sampling_from_probs", {"top_k": 12, "top_p": 0.9, "filter_apply_order": "joint"},
     {"top_k": 12, "top_p": 0.9, "order": "joint"}, 0.45),
])
@gpu
def test_chi_square_large_vocab(name, kw, ref, rest):
    vocab = 40000  # 10 vectors of 4 a thread: the scans, rescans and gathers over many tiles
    p, pos = _embedded(vocab, rest)
    q = reference.filtered_distribution(p, **ref)
    probs, idx = _shared_rows(p)
    got = cp.asnumpy(getattr(sampling, name)(probs, indices=idx, seed=77, offset=1, **kw))
    assert got.min() >= 0 and got.max() < vocab and np.all(q[got] > 0)
    qc = np.append(q[pos], q.sum() - q[pos].sum())
    stat, crit = _chi2_ok(_cells(got, pos, vocab), qc, N)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"


@gpu
@pytest.mark.parametrize("vocab", [128256, 151936, 1003])
def test_renorm_probs(vocab):
    rng = np.random.default_rng(vocab)
    probs = rng.dirichlet(np.full(vocab, 0.05), size=6).astype(np.float32)
    probs[5] = 1.0 / vocab  # all tied: ties at the boundary are kept, so nothing is cut
    pt = cp.asarray(probs)
    pn = probs.astype(np.float64)
    ks = np.array([1, 50, 1000, 9000, 0, 7], np.int32)
    ps = np.array([0.05, 0.5, 0.9, 0.99, 1.0, 0.3], np.float32)
    for name, arg, ref in [
            ("top_k_renorm_probs", cp.asarray(ks), lambda r: {"top_k": int(ks[r])}),
            ("top_p_renorm_probs", cp.asarray(ps), lambda r: {"top_p": float(ps[r])}),
            ("top_k_renorm_probs", 20, lambda r: {"top_k": 20}),
            ("top_p_renorm_probs", 0.8, lambda r: {"top_p": 0.8})]:
        got = cp.asnumpy(getattr(sampling, name)(pt, arg))
        for r in range(6):
            want = reference.filtered_distribution(pn[r], **ref(r))
            np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-9, err_msg=f"{name} row {r}")
            assert abs(got[r].sum() - 1) < 1e-4


@gpu
def test_top_k_mask_logits():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 50000)).astype(np.float32) * 5
    x[1, :] = np.round(x[1, :])  # many ties
    x[2, 7] = np.nan
    x[3, :] = -3.0
    ks = np.array([1, 100, 5000, 20000, 50000], np.int32)
    got = cp.asnumpy(sampling.top_k_mask_logits(cp.asarray(x), cp.asarray(ks)))
    for r in range(5):
        np.testing.assert_array_equal(got[r], reference.top_k_mask_logits(x[r], int(ks[r])).astype(np.float32))


@gpu
def test_chain_speculative_sampling_law():
    rng = np.random.default_rng(5)
    vocab, n = 12, 3
    q = rng.dirichlet(np.ones(vocab), size=n)
    p = rng.dirichlet(np.ones(vocab), size=n + 1)
    ids = np.array([int(np.argmax(q[i])) for i in range(n)], np.int32)
    law = reference.chain_speculative_distribution(q, ids, p)
    rows = 40000
    qt = cp.asarray(np.tile(q.astype(np.float32), (rows, 1, 1)))
    pt = cp.asarray(np.tile(p.astype(np.float32), (rows, 1, 1)))
    it = cp.asarray(np.tile(ids, (rows, 1)))
    out, acc, emitted = sampling.chain_speculative_sampling(qt, it, pt, seed=3, offset=0)
    out, acc, emitted = cp.asnumpy(out), cp.asnumpy(acc), cp.asnumpy(emitted)
    for r in range(0, rows, 997):  # accepted prefix, the drawn token, then -1
        j = emitted[r]
        assert np.array_equal(out[r, :j], ids[:j]) and np.all(out[r, j + 1:] == -1) and 0 <= out[r, j] < vocab
    cells = sorted(law)
    index = {c: i for i, c in enumerate(cells)}
    outcome = [index.get((int(j), int(out[r, j])), -1) for r, j in enumerate(emitted)]
    assert min(outcome) >= 0, "an outcome of probability 0"
    stat, crit = _chi2_ok(np.bincount(outcome, minlength=len(cells)), np.array([law[c] for c in cells]), rows)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"
    # Independent acceptance counts: each draft passes with probability min(1, p/q).
    rate = sum(min(1.0, p[i, ids[i]] / q[i, ids[i]]) for i in range(n))
    assert abs(acc.mean() - rate) < 5 * np.sqrt(n * 0.25 / rows)


@gpu
def test_chain_speculative_sampling_edges_and_counters():
    vocab, n, b = 1000, 4, 3
    rng = np.random.default_rng(9)
    q = rng.dirichlet(np.ones(vocab), size=(b, n)).astype(np.float32)
    ids = rng.integers(0, vocab, (b, n)).astype(np.int32)
    p = np.concatenate([q, rng.dirichlet(np.ones(vocab), size=(b, 1)).astype(np.float32)], axis=1)
    p[1, 0, ids[1, 0]] = 0.0  # request 1: draft 0 is always rejected (p renormalised: a residual remains)
    p[1, 0] /= p[1, 0].sum()
    acc0 = cp.asarray([10, 20, 30], dtype=cp.int32)
    emi0 = cp.asarray([1, 1, 1], dtype=cp.int32)
    out, acc, emi = sampling.chain_speculative_sampling(cp.asarray(q), cp.asarray(ids), cp.asarray(p), acc0, emi0,
                                                        seed=1)
    out = cp.asnumpy(out)
    assert acc is acc0 and emi is emi0  # updated in place, as FlashInfer does
    assert list(cp.asnumpy(emi)) == [1 + n, 1, 1 + n] and list(cp.asnumpy(acc)) == [10 + n, 20 + n - 1, 30 + n]
    assert np.array_equal(out[0, :n], ids[0]) and np.array_equal(out[2, :n], ids[2])  # p == q: all accepted
    assert out[1, 0] != ids[1, 0] and np.all(out[1, 1:] == -1)
    resid = np.maximum(p[1, 0] - q[1, 0], 0)
    assert resid[out[1, 0]] > 0


@gpu
def test_new_ops_bad_input():
    p = uniform((4, 64))
    with pytest.raises(ValueError, match="top_p"):
        sampling.top_p_renorm_probs(p, 0.0)
    with pytest.raises(TypeError, match="top_k"):
        sampling.top_k_renorm_probs(p, 2.5)
    with pytest.raises(ValueError, match="top_k: expected shape"):
        sampling.top_k_mask_logits(p, cp.ones(5, dtype=cp.int32))
    q = uniform((2, 3, 64))
    ids = cp.zeros((2, 3), dtype=cp.int32)
    with pytest.raises(ValueError, match="target_probs: expected shape"):
        sampling.chain_speculative_sampling(q, ids, uniform((2, 3, 64)))
    with pytest.raises(ValueError, match="draft_token_ids: entries"):
        sampling.chain_speculative_sampling(q, ids + 64, uniform((2, 4, 64)))
    with pytest.raises(TypeError, match="maybe_output_accepted_token_num"):
        sampling.chain_speculative_sampling(q, ids, uniform((2, 4, 64)), cp.zeros(2, dtype=cp.int64))


# ---------------------------------------------------------------------------------------------
# Regressions found by the fuzz suite (tests/fuzz_ops.py): -inf logits, small vocabularies, low floors


def _strided(x, pad=3, off=1):
    """x in rows `vocab + pad` elements apart from `off` (NaN around): 4-byte aligned rows, so VEC 1.
    Copied as raw bits, so bfloat16 rows too."""
    base = cp.empty((x.shape[0], x.shape[1] + pad), dtype=x.dtype)
    poison(base)
    bits(base)[:, off:off + x.shape[1]] = bits(x)
    return base[:, off:off + x.shape[1]]


def _partly_inf(batch, vocab, seed):
    """Rows partly -inf as the fuzz suite masks them (a share of 5..95% of each row, the last token kept
    finite), and rows whose first 4096 tokens (every thread's first slots on the two-pass kernel, a
    ring CTA's first, held chunk) or first half (a ring cluster's first CTAs' whole slices) are -inf."""
    g = cp.random.default_rng(seed)
    x = g.standard_normal((batch, vocab), dtype=cp.float32) * 4
    share = cp.linspace(0.05, 0.95, batch, dtype=cp.float32)[:, None]
    x = cp.where(g.random((batch, vocab), dtype=cp.float32) < share, np.float32(-np.inf), x)
    x[0, :4096] = -np.inf
    x[1, : vocab // 2] = -np.inf
    x[:, -1] = 1.0  # never a whole row
    return x


@gpu
@pytest.mark.parametrize("temperature", ["none", "scalar", "per_row"])
@pytest.mark.parametrize("path", ["two_pass_vec1", "two_pass_strided", "two_pass_long", "two_pass_vec4",
                                  "ring_7@2", "ring_2@1"])
def test_softmax_rows_partly_inf(monkeypatch, path, temperature):
    """A thread whose first logits were -inf added exp2(-inf - -inf) = NaN to its sum on the two-pass
    kernel, and the whole row came out NaN (fuzz: vocab 1529 to 151937, VEC 1). Each path: vec1 (odd
    vocab), strided rows, a long row (149 slots a thread), vec4 (the ring plan forced off), and the ring
    at 7 CTAs of 2 an SM and 2 CTAs of 1 an SM (7 chunks held in registers)."""
    batch, vocab = 6, {"two_pass_vec1": 1529, "two_pass_strided": 4096, "two_pass_long": 151937,
                       "two_pass_vec4": 32000}.get(path, 128256)
    if path == "two_pass_vec4":
        monkeypatch.setitem(sampling._ring_plans, (0, vocab, batch), None)
    elif path.startswith("ring"):
        cluster, per_sm = map(int, path[5:].split("@"))
        _force_ring(monkeypatch, batch, vocab, cluster, per_sm)
    x = _partly_inf(batch, vocab, seed=len(path))
    t, t_ref = {"none": (None, None), "scalar": (0.6, np.full(batch, 0.6)),
                "per_row": (cp.linspace(0.2, 2.0, batch, dtype=cp.float32), None)}[temperature]
    if temperature == "per_row":
        t_ref = cp.asnumpy(t)
    got = cp.asnumpy(sampling.softmax(_strided(x) if path == "two_pass_strided" else x, t))
    assert not np.isnan(got).any(), f"NaN in rows {np.flatnonzero(np.isnan(got).any(1)).tolist()}"
    np.testing.assert_allclose(got, reference.softmax(cp.asnumpy(x), t_ref), rtol=1e-4, atol=1e-9)


def _check_mask(got, x, ks):
    got, x = cp.asnumpy(got), cp.asnumpy(x)
    for r in range(x.shape[0]):
        want = reference.top_k_mask_logits(x[r], int(ks[r])).astype(np.float32)
        bad = got[r] != want
        assert not bad.any(), f"row {r} (top_k {int(ks[r])}): {int(bad.sum())} of {x.shape[1]} logits differ"


@gpu
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("vocab", [7, 8, 9])
def test_top_k_mask_logits_small_vocab(vocab, strided):
    """With fewer logits >= 0 than k, the count pass also counted the zeros its unloaded slots hold (a
    vocab of 7 to 9 leaves most of the 1024 threads without a token), so the k-th largest seemed to be
    0, fewer than k candidates were gathered and nothing was masked (fuzz: vocab 8 top_k 6, 9 / 8,
    7 / 5). Every k from 0 to vocab, per row; rows mixed, all negative, partly -inf; VEC 4 at vocab 8."""
    g = cp.random.default_rng(vocab)
    rows = 3 * (vocab + 1)
    x = g.standard_normal((rows, vocab), dtype=cp.float32) * 2
    x[vocab + 1:2 * (vocab + 1)] = -cp.abs(x[vocab + 1:2 * (vocab + 1)]) - np.float32(0.5)
    x[2 * (vocab + 1):, ::3] = -np.inf
    ks = cp.arange(rows, dtype=cp.int32) % (vocab + 1)
    xs = _strided(x) if strided else x
    _check_mask(sampling.top_k_mask_logits(xs, ks), x, cp.asnumpy(ks))
    _check_mask(sampling.top_k_mask_logits(xs, vocab - 2), x, np.full(rows, vocab - 2))
    row = cp.asarray([[-1.5, 0.5, -0.25, 2.0, -3.0, 1.0, -0.75, -2.0, 0.125][:vocab]], dtype=cp.float32)
    _check_mask(sampling.top_k_mask_logits(row, vocab - 2), row, [vocab - 2])


@gpu
@pytest.mark.parametrize("vocab,k,low,shares", [
    (1024, 40, -3e4, (0.05, 0.5, 0.8, 0.93, 0.94, 0.95, 0.99)),
    (4732, 2685, float("-inf"), (0.0, 0.1, 0.2, 0.3, 0.4, 0.7, 0.99)),
    (1075, 740, float("-inf"), (0.0, 0.05, 0.1, 0.2, 0.25, 0.5, 0.99)),
    (50000, 4100, -3e4, (0.05, 0.5, 0.85, 0.87, 0.89, 0.9, 0.99))])
def test_top_k_mask_logits_masked_rows(vocab, k, low, shares):
    """Rows with a share of their logits at -3e4 or -inf, as the fuzz suite builds them; most shares
    leave fewer than k logits >= 0 but at least k finite ones, where the count pass's zeros masked
    nothing (fuzz: vocab 1024 top_k 40 with -3e4 floors; 4732 / 2685 and 1075 / 740 with -inf). Odd
    rows rounded (ties); 50000 / 4100 at 99%: the k-th largest is the floor, tied over more tokens
    than shared memory sorts (the exact radix select)."""
    batch = len(shares)
    g = cp.random.default_rng(vocab + k)
    x = g.standard_normal((batch, vocab), dtype=cp.float32) * 2.5
    x[1::2] = cp.around(x[1::2])
    share = cp.asarray(shares, dtype=cp.float32)[:, None]
    x = cp.where(g.random((batch, vocab), dtype=cp.float32) < share, np.float32(low), x)
    x[:, vocab // 3] = 1.0
    ks = np.full(batch, k)
    _check_mask(sampling.top_k_mask_logits(x, k), x, ks)
    _check_mask(sampling.top_k_mask_logits(_strided(x), k), x, ks)


@gpu
def test_top_k_mask_logits_k_above_the_non_nan_count():
    """k between the row's non-NaN count and vocab, with more candidates than shared memory takes: the
    radix select found no bin, built the key prefix 0 (a NaN's) and masked every logit."""
    vocab = 20000
    g = cp.random.default_rng(20)
    x = g.standard_normal((4, vocab), dtype=cp.float32) * 3
    x[:, 100:110] = np.nan  # 19990 numbers a row
    ks = cp.asarray([vocab - 1, vocab - 5, vocab - 10, vocab - 11], dtype=cp.int32)
    _check_mask(sampling.top_k_mask_logits(x, ks), x, cp.asnumpy(ks))


@gpu
def test_top_k_renorm_and_sample_with_fewer_positives_than_k():
    """Probabilities: ~12000 positive tokens (more than the 8192 candidates shared memory takes) and
    top_k 15000: the radix select's NaN threshold kept nothing, so renorm wrote zeros and the sampler
    returned token 0, of probability 0."""
    vocab, k = 20000, 15000
    rng = np.random.default_rng(12)
    p = rng.random((4, vocab)).astype(np.float32)
    p[:, rng.random(vocab) < 0.4] = 0.0
    p[:, 0] = 0.0
    p /= p.sum(1, keepdims=True)
    pt = cp.asarray(p)
    got = cp.asnumpy(sampling.top_k_renorm_probs(pt, k))
    for r in range(4):
        want = reference.filtered_distribution(p[r].astype(np.float64), top_k=k)
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-9, err_msg=f"row {r}")
    tok = cp.asnumpy(sampling.top_k_sampling_from_probs(pt, k, seed=5))
    assert np.all(p[np.arange(4), tok] > 0), f"drew tokens of probability 0: {tok.tolist()}"


@gpu
@pytest.mark.parametrize("order", ["top_k_first", "joint"])
def test_top_k_top_p_sampling_from_logits_with_inf_chi_square(order):
    """P's logits at 10 spread tokens of a vocab of 1001 (VEC 1), every other logit -inf: the
    softmax came out NaN, so every draw returned token 0 (fuzz: vocab 19609, 'drew tokens of
    probability 0'). N draws of the one row through indices, against the filtered distribution."""
    vocab = 1001
    pos = np.random.default_rng(1).choice(vocab, P.size, replace=False)
    logits = np.full((1, vocab), -np.inf, np.float32)
    with np.errstate(divide="ignore"):
        logits[0, pos] = np.log(P)  # P[2] = 0: -inf
    p = np.zeros(vocab)
    p[pos] = P
    q = reference.filtered_distribution(p, top_k=5, top_p=0.7, order=order)
    got = cp.asnumpy(sampling.top_k_top_p_sampling_from_logits(
        cp.asarray(logits), 5, 0.7, indices=cp.zeros(N, dtype=cp.int32), filter_apply_order=order, seed=21,
        offset=3))
    assert np.all(q[got] > 0), f"drew tokens outside the filtered support: {np.unique(got[q[got] <= 0]).tolist()}"
    stat, crit = _chi2_ok(_cells(got, pos, vocab), np.append(q[pos], 0.0), N)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"


@gpu
def test_samplers_from_logits_partly_inf_strided():
    """The fuzz case's shape: vocab 19609, strided rows partly -inf, top_k 113, top_p 0.928 (joint and
    top_k_first); and Gumbel-max sampling_from_logits on the same rows. No token has a -inf logit, and
    each lies in the reference's top-k set."""
    batch, vocab, k, top_p = 7, 19609, 113, 0.928
    x = _partly_inf(batch, vocab, seed=1618)
    xs, x64 = _strided(x, pad=2, off=1), cp.asnumpy(x).astype(np.float64)
    probs = reference.softmax(x64)
    draws = {"gumbel": sampling.sampling_from_logits(xs, seed=3, offset=1)}
    for order in ("joint", "top_k_first"):
        draws[order] = sampling.top_k_top_p_sampling_from_logits(xs, k, top_p, filter_apply_order=order, seed=3,
                                                                 offset=1)
    for name, tok in draws.items():
        tok = cp.asnumpy(tok)
        assert np.all(np.isfinite(x64[np.arange(batch), tok])), f"{name}: drew -inf logits: {tok.tolist()}"
        if name != "gumbel":
            assert all(reference.top_k_mask(probs[r], k)[tok[r]] for r in range(batch)), name


# ---------------------------------------------------------------------------------------------
# CPU (no launch): parameter forms, seeds and offsets, generators, signatures


def _info(name, shape, dtype=dt.float32, strides=None, ptr=1 << 20):
    """An array description with no memory behind it: enough for the checks before any launch."""
    return ArrayInfo(name, ptr, tuple(shape), strides or contiguous_strides(shape), dtype, 0, "cupy")


PR = _info("probs", (4, 64))


@pytest.fixture
def no_stream_query(monkeypatch):
    """Stream resolution stubbed (the legacy default stream, no device query): the checks under test run
    before any CUDA call, and this machine may have no GPU."""
    monkeypatch.setattr(streams, "resolve", lambda stream, framework, device: 0)


def _call():
    return Call(PR, stream=0)


def _unpack_param(b):
    return struct.unpack("<Qdi", b)  # Param: array pointer, scalar, dtype code


def _unpack_rng(b):
    return struct.unpack("<QQQQii", b)  # Rng: seed array, offset array, seed, offset, their strides


@pytest.mark.usefixtures("no_stream_query")
@pytest.mark.parametrize("value,kind,want", [
    (5, "int", 5.0), (np.int64(7), "int", 7.0), (np.int32(-1), "int", -1.0), (np.array(9), "int", 9.0),
    (2 ** 40, "int", float(2 ** 40)), (0.25, "float", 0.25), (np.float32(0.1), "float", float(np.float32(0.1))),
    (np.float16(0.5), "float", 0.5), (1, "float", 1.0), (np.int8(3), "float", 3.0)])
def test_param_scalar_forms(value, kind, want):
    par, arr, val = sampling._param(_call(), value, "top_k" if kind == "int" else "top_p", 4, kind, 0)
    assert arr is None and val == want and _unpack_param(par) == (0, want, 0)


@pytest.mark.usefixtures("no_stream_query")
def test_param_default_and_arrays_of_every_dtype():
    assert _unpack_param(sampling._param(_call(), None, "top_p", 4, "float", 1.0)[0]) == (0, 1.0, 0)
    for d, code in sampling.PARAM_CODES.items():
        a = _info("top_k", (4,), d, ptr=4096)
        par, arr, val = sampling._param(_call(), a, "top_k", 4, "int", 0)
        assert arr is a and val is None and _unpack_param(par) == (4096, 0.0, code), d
    assert len(set(sampling.PARAM_CODES.values())) == len(sampling.PARAM_CODES)
    for d in (dt.int32, dt.int64, dt.float16, dt.bfloat16, dt.float32, dt.float64, dt.int8, dt.uint8):
        assert d in sampling.PARAM_CODES


@pytest.mark.usefixtures("no_stream_query")
@pytest.mark.parametrize("value,kind,exc,match", [
    (2.5, "int", TypeError, "top_k: expected an int"), (np.float64(3.0), "int", TypeError, "top_k: expected an int"),
    (True, "int", TypeError, "top_k: expected a number"), ("5", "int", TypeError, "top_k: expected a number"),
    ([1, 2, 3, 4], "int", TypeError, "top_k: expected an array"),
    (_info("top_k", (3,), dt.int32), "int", ValueError, r"top_k: expected shape \(4\)"),
    (_info("top_k", (4, 1), dt.int32), "int", ValueError, r"top_k: expected shape \(4\)"),
    (_info("top_k", (), dt.int32), "int", ValueError, r"top_k: expected shape \(4\)"),
    (_info("top_k", (4,), dt.bool_), "int", TypeError, "top_k: dtype bool is not supported"),
    (_info("top_k", (4,), dt.float8_e4m3fn), "int", TypeError, "top_k: dtype float8_e4m3fn"),
    (_info("top_p", (4,), dt.float32, strides=(2,)), "float", ValueError, "top_p: must be contiguous"),
])
def test_param_errors(value, kind, exc, match):
    with pytest.raises(exc, match=match):
        sampling._param(_call(), value, "top_k" if "top_k" in match else "top_p", 4, kind, 0)


@pytest.mark.usefixtures("no_stream_query")
def test_seed_and_offset_forms():
    c = _call()
    assert _unpack_rng(sampling._rng(c, None, 5, 7, 4, 4)) == (0, 0, 5, 7, 0, 0)
    assert _unpack_rng(sampling._rng(c, None, 5, None, 4, 4)) == (0, 0, 5, 0, 0, 0)  # offset 0
    assert _unpack_rng(sampling._rng(c, None, -1, np.int64(3), 4, 4)) == (0, 0, 2 ** 64 - 1, 3, 0, 0)
    assert _unpack_rng(sampling._rng(c, None, np.array([11]), 2, 4, 4)) == (0, 0, 11, 2, 0, 0)
    per_row, one = _info("seed", (4,), dt.int64, ptr=8192), _info("offset", (1,), dt.int64, ptr=16384)
    assert _unpack_rng(sampling._rng(c, None, per_row, one, 4, 4)) == (8192, 16384, 0, 0, 1, 0)
    assert _unpack_rng(sampling._rng(c, None, 9, per_row, 4, 4)) == (0, 8192, 9, 0, 0, 1)  # a scalar seed, per-row
    # a generator is not consulted when seed is given
    assert _unpack_rng(sampling._rng(c, object(), 1, 2, 4, 4)) == (0, 0, 1, 2, 0, 0)


@pytest.mark.usefixtures("no_stream_query")
@pytest.mark.parametrize("seed,offset,exc,match", [
    (1.5, 0, TypeError, "seed: expected an int, got 1.5"), (1, 2.5, TypeError, "offset: expected an int"),
    (_info("seed", (4,), dt.int32), 0, TypeError, "seed: dtype int32 is not supported"),
    (_info("seed", (3,), dt.int64), 0, ValueError, r"seed: expected length 1 or batch_size \(4\), got 3"),
    (1, _info("offset", (5,), dt.int64), ValueError, r"offset: expected length 1 or batch_size \(4\)"),
    (_info("seed", (4, 1), dt.int64), 0, ValueError, "seed: expected 1 dims"),
    (_info("seed", (4,), dt.int64, strides=(2,)), 0, ValueError, "seed: must be contiguous"),
])
def test_seed_and_offset_errors(seed, offset, exc, match):
    with pytest.raises(exc, match=match):
        sampling._rng(_call(), None, seed, offset, 4, 4)


def _round4(n):
    return (n + 3) // 4 * 4


@needs_torch
def test_get_seed_and_offset_cuda_generator_state():
    """A CUDA generator's state is (seed, offset) as int64: the offset grows by the increment rounded up
    to a multiple of 4, is written back, and the new offset is returned (FlashInfer's rule); a stand-in
    with a CUDA device and such a state, since this test runs without a GPU."""

    class FakeCudaGenerator(torch.Generator):
        @property
        def device(self):
            return torch.device("cuda", 0)

        def get_state(self):
            return self.state.clone()

        def set_state(self, s):
            self.state = s.clone()

    g = FakeCudaGenerator()
    g.state = torch.tensor([-5, 8], dtype=torch.int64).view(torch.uint8)
    expect = 8
    for inc in (1, 4, 5, 3 * 32, 1001 * 7, 0):
        expect += _round4(inc)
        assert sampling.get_seed_and_offset(inc, g) == (2 ** 64 - 5, expect)
        assert g.state.view(torch.int64).tolist() == [-5, expect]


@needs_torch
@pytest.mark.gpu
def test_get_seed_and_offset_real_cuda_generator():
    """On a real CUDA generator, the direct seed / offset reads advance it exactly as the state rule does."""
    if not torch.cuda.is_available():
        pytest.skip("needs torch with a CUDA device")
    g = torch.Generator("cuda")
    g.manual_seed(2 ** 63 + 11)
    torch.rand(5, device="cuda", generator=g)  # a nonzero offset to start from
    for inc in (1, 4, 5, 1001 * 7):
        seed, offset = g.get_state().view(torch.int64).tolist()
        assert sampling.get_seed_and_offset(inc, g) == (seed % 2 ** 64, offset + _round4(inc))
        assert g.get_state().view(torch.int64).tolist() == [seed, offset + _round4(inc)]


@needs_torch
def test_get_seed_and_offset_cpu_generator():
    """A CPU generator has no offset: two values are drawn from it, reproducible after manual_seed."""
    g = torch.Generator()
    g.manual_seed(123)
    a, b = sampling.get_seed_and_offset(32, g), sampling.get_seed_and_offset(32, g)
    assert a != b and all(0 <= v < 2 ** 63 for v in a + b)
    g.manual_seed(123)
    assert sampling.get_seed_and_offset(32, g) == a
    ours = sampling.Generator(5)
    assert sampling.get_seed_and_offset(10, ours) == (5, 0) and ours.offset == 1
    with pytest.raises(TypeError, match="generator"):
        sampling.get_seed_and_offset(10, object())


@needs_torch
def test_generator_choice(monkeypatch):
    """generator=None: torch callers take torch's default CUDA generator of their device (FlashInfer),
    others fi_cupy's default Generator; a torch or fi_cupy generator is used as given."""
    asked = []

    class Default(torch.Generator):
        device = torch.device("cuda", 3)
        state = torch.tensor([77, 0], dtype=torch.int64).view(torch.uint8)

        def get_state(self):
            return self.state

        def set_state(self, s):
            type(self).state = s.clone()

    monkeypatch.setattr(sampling, "_torch_default_generator", lambda d: asked.append(d) or Default())
    assert sampling._draw("torch", 3, None, 10) == (77, 12) and asked == [3]
    assert sampling._draw("torch", 3, None, 1) == (77, 16) and asked == [3, 3]
    before = sampling.default_generator.offset
    seed, off = sampling._draw("cupy", 0, None, 10)
    assert (seed, off) == (sampling.default_generator.seed, before) and sampling.default_generator.offset == before + 1
    assert asked == [3, 3]  # not consulted for a non-torch caller
    assert sampling._draw("cupy", 0, sampling.Generator(4), 10) == (4, 0)
    with pytest.raises(TypeError, match="generator: expected a torch.Generator or a fi_cupy.sampling.Generator"):
        sampling._draw("cupy", 0, object(), 10)


class _Stop(Exception):
    pass


@pytest.mark.usefixtures("no_stream_query")
def test_generator_increments_follow_flashinfer(monkeypatch):
    """Each function advances a generator by FlashInfer's increment: batch (sampling_from_probs,
    min_p), 32 a row (top-k / top-p samplers), batch * vocab (sampling_from_logits), batch * (n + 1)
    (chain_speculative_sampling). Recorded at the seed step, before any allocation or launch."""
    seen = []

    def record(c, generator, seed, offset, batch, increment):
        seen.append((batch, increment))
        raise _Stop

    monkeypatch.setattr(sampling, "_rng", record)
    monkeypatch.setattr(sampling, "softmax", lambda logits, **kw: PR)  # the logits sampler's softmax
    ids = _info("draft_token_ids", (4, 0), dt.int64)
    for call, want in [
            (lambda: sampling.sampling_from_probs(PR, stream=0), 4),
            (lambda: sampling.min_p_sampling_from_probs(PR, 0.1, stream=0), 4),
            (lambda: sampling.top_p_sampling_from_probs(PR, 0.9, stream=0), 4 * 32),
            (lambda: sampling.top_k_sampling_from_probs(PR, 5, stream=0), 4 * 32),
            (lambda: sampling.top_k_top_p_sampling_from_probs(PR, 5, 0.9, stream=0), 4 * 32),
            (lambda: sampling.top_k_top_p_sampling_from_logits(PR, 5, 0.9, stream=0), 4 * 32),
            (lambda: sampling.sampling_from_logits(_info("logits", (4, 64)), stream=0), 4 * 64),
            (lambda: sampling.chain_speculative_sampling(_info("draft_probs", (4, 0, 64)), ids,
                                                         _info("target_probs", (4, 1, 64), dt.bfloat16),
                                                         stream=0), 4 * 1)]:
        with pytest.raises(_Stop):
            call()
        assert seen[-1] == (4, want)


@pytest.mark.usefixtures("no_stream_query")
@pytest.mark.parametrize("call,exc,match", [
    (lambda: sampling.sampling_from_probs(_info("probs", (4, 64), dt.float64), stream=0), TypeError,
     "probs: dtype float64 is not supported"),
    (lambda: sampling.top_k_mask_logits(_info("logits", (4, 64), dt.int32), 5, stream=0), TypeError,
     "logits: dtype int32"),
    (lambda: sampling.softmax(_info("logits", (4, 64), dt.float8_e5m2), stream=0), TypeError, "logits: dtype"),
    (lambda: sampling.sampling_from_probs(PR, indices=_info("indices", (4,), dt.float32), stream=0), TypeError,
     "indices: dtype float32"),
    (lambda: sampling.top_k_sampling_from_probs(PR, _info("top_k", (5,), dt.int64), stream=0), ValueError,
     r"top_k: expected shape \(4\)"),
    (lambda: sampling.top_k_renorm_probs(PR, _info("top_k", (4,), dt.bool_), stream=0), TypeError, "top_k: dtype bool"),
    (lambda: sampling.softmax(PR, temperature=True, stream=0), TypeError, "temperature"),
    (lambda: sampling.softmax(PR, temperature=-1, stream=0), ValueError, "temperature: must be > 0"),
    (lambda: sampling.softmax(PR, temperature=_info("temperature", (3,), dt.bfloat16), stream=0), ValueError,
     "temperature: expected shape"),
    (lambda: sampling.min_p_sampling_from_probs(PR, np.float32(1.5), stream=0), ValueError, "min_p: must lie in"),
    (lambda: sampling.top_p_sampling_from_probs(PR, np.float16(0.0), stream=0), ValueError, "top_p: must lie in"),
    (lambda: sampling.sampling_from_probs(PR, seed=_info("seed", (2,), dt.int64), stream=0), ValueError,
     "seed: expected length 1 or batch_size"),
    (lambda: sampling.sampling_from_probs(PR, generator="cuda", stream=0), TypeError, "generator"),
    (lambda: sampling.chain_speculative_sampling(_info("draft_probs", (2, 3, 64), dt.float16),
                                                 _info("draft_token_ids", (2, 3), dt.float32),
                                                 _info("target_probs", (2, 4, 64), dt.float16), stream=0),
     TypeError, "draft_token_ids: dtype float32"),
    (lambda: sampling.chain_speculative_sampling(_info("draft_probs", (2, 3, 64), dt.float64),
                                                 _info("draft_token_ids", (2, 3), dt.int64),
                                                 _info("target_probs", (2, 4, 64)), stream=0),
     TypeError, "draft_probs: dtype float64"),
])
def test_bad_input_cpu(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# FlashInfer 0.7.2's parameters (shared/flashinfer_api.json), in order, with their defaults; fi_cupy adds
# enable_pdl and stream after them (softmax has enable_pdl already).
FLASHINFER_SIGNATURES = {
    "sampling_from_probs": "probs indices=None deterministic=True generator=None check_nan=False seed=None "
                           "offset=None return_valid=False",
    "sampling_from_logits": "logits indices=None deterministic=True generator=None check_nan=False seed=None "
                            "offset=None",
    "top_p_sampling_from_probs": "probs top_p indices=None deterministic=True generator=None check_nan=False "
                                 "seed=None offset=None return_valid=False",
    "top_k_sampling_from_probs": "probs top_k indices=None deterministic=True generator=None check_nan=False "
                                 "seed=None offset=None return_valid=False",
    "min_p_sampling_from_probs": "probs min_p indices=None deterministic=True generator=None check_nan=False "
                                 "seed=None offset=None return_valid=False",
    "top_k_top_p_sampling_from_probs": "probs top_k top_p indices=None filter_apply_order='top_k_first' "
                                       "deterministic=True generator=None check_nan=False seed=None offset=None "
                                       "return_valid=False",
    "top_k_top_p_sampling_from_logits": "logits top_k top_p indices=None filter_apply_order='top_k_first' "
                                        "deterministic=True generator=None check_nan=False seed=None offset=None",
    "top_p_renorm_probs": "probs top_p is_deterministic=False",
    "top_k_renorm_probs": "probs top_k is_deterministic=False",
    "top_k_mask_logits": "logits top_k",
    "softmax": "logits temperature=None enable_pdl=None",
    "chain_speculative_sampling": "draft_probs draft_token_ids target_probs maybe_output_accepted_token_num=None "
                                  "maybe_output_emitted_draft_token_num=None deterministic=True generator=None "
                                  "seed=None offset=None",
    "get_seed_and_offset": "increment generator=None device=None",
}


@pytest.mark.parametrize("name", sorted(FLASHINFER_SIGNATURES))
def test_signatures_follow_flashinfer(name):
    params = list(inspect.signature(getattr(sampling, name)).parameters.values())
    want = FLASHINFER_SIGNATURES[name].split()
    got = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params]
    assert got[:len(want)] == want
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)  # no **kwargs
    assert set(got[len(want):]) <= {"enable_pdl=None", "stream=None"}


def test_every_instantiation_is_listed():
    """all_programs() lists each kernel for every input dtype and vector width (renorm: its output dtypes
    too), the logits sampler for every dtype, and the float32 ring softmax."""
    specs = [k.name_expr for p in sampling.all_programs() for k in p.kernels]
    assert len(specs) == len(set(specs))
    ts = [d.cpp for d in sampling.IN_DTYPES]
    for kernel in ("sample_from_probs_kernel", "mask_logits_kernel", "chain_speculative_kernel", "softmax_kernel"):
        assert {f"fic::{kernel}<{t}, {v}>" for t in ts for v in (4, 1)} <= set(specs)
    for a, b in sampling.RENORM_TYPES:
        assert {f"fic::renorm_probs_kernel<{a.cpp}, {b.cpp}, {v}>" for v in (4, 1)} <= set(specs)
    assert {(dt.float16, dt.float16), (dt.float16, dt.float32), (dt.bfloat16, dt.float32)} <= set(sampling.RENORM_TYPES)
    assert {f"fic::sample_from_logits_kernel<{t}>" for t in ts} <= set(specs)
    assert sum("softmax_ring_kernel" in s for s in specs) == 2
    assert len(specs) == 4 * 6 + 10 + 3 + 2


def test_imports_without_torch_and_vec_widths():
    import subprocess
    import sys
    code = "import sys, fi_cupy.sampling; assert sys.modules.get('torch') is None"  # None: blocked (block_imports)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert sampling._vec(_info("p", (2, 64), dt.float16, ptr=8)) == 4  # 8-byte rows suffice for 16-bit
    assert sampling._vec(_info("p", (2, 64), dt.float16, ptr=4)) == 1
    assert sampling._vec(_info("p", (2, 64), dt.float32, ptr=8)) == 1
    assert sampling._vec(_info("p", (2, 64), dt.bfloat16, strides=(66, 1))) == 1
    assert sampling._vec(_info("p", (2, 63), dt.bfloat16)) == 1


# ---------------------------------------------------------------------------------------------
# GPU: float16 / bfloat16 inputs, int64 ids, parameter dtypes, generators, per-row seeds, return_valid

HALF = ("float16", "bfloat16")
SAMPLERS = [  # (function, filter arguments, the reference's filters)
    ("sampling_from_probs", (), {}), ("top_k_sampling_from_probs", (20,), {"top_k": 20}),
    ("top_p_sampling_from_probs", (0.75,), {"top_p": 0.75}), ("min_p_sampling_from_probs", (0.125,), {"min_p": 0.125}),
    ("top_k_top_p_sampling_from_probs", (20, 0.75), {"top_k": 20, "top_p": 0.75})]


def _poison(nbytes):
    """Fill a block of CuPy's memory pool with NaN bits and free it: the next output of about that size
    most likely reuses it, so a slot the kernel does not write stays NaN (or an impossible token id)."""
    x = cp.full((max(1, nbytes // 4),), np.nan, dtype=cp.float32)
    del x


def _round(x, dtype):
    """float64 numpy values of x (array-like) rounded to `dtype` through float32, as the tests' inputs are
    (what a kernel reading that dtype sees)."""
    return np.asarray(x, np.float32).astype(host_dtype(dtype)).astype(np.float64)


def _exact_probs(batch, vocab, seed, zeros=0.3):
    """Probabilities k / 256 (k = 0..255, a share of them 0): exact in float16, bfloat16 and float32, so
    every dtype must give bitwise the same tokens and thresholds."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 256, (batch, vocab)) * (rng.random((batch, vocab)) >= zeros)
    k[:, 0] = 255
    return k.astype(np.float32) / 256


@gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name,kw,ref", CHI_CASES)
def test_chi_square_16bit(name, kw, ref, dtype):
    """The filtered distribution of P rounded to the input dtype, by chi-square."""
    q = reference.filtered_distribution(_round(P * 0.5, dtype), **ref)
    _poison(N * 4)
    got = getattr(sampling, name)(cast(_rows(P * 0.5), dtype), seed=99, offset=2, **kw)
    assert got.dtype == np.int32
    got = cp.asnumpy(got)
    assert got.min() >= 0 and got.max() < P.size and np.all(q[got] > 0)
    stat, crit = _chi2_ok(np.bincount(got, minlength=P.size), q, N)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"


@gpu
@pytest.mark.parametrize("dtype", HALF)
def test_sampling_from_logits_16bit_chi_square(dtype):
    logits = np.log(P + 1e-30)
    logits[2] = -np.inf
    x = _round(logits, dtype)
    got = cp.asnumpy(sampling.sampling_from_logits(cast(_rows(logits), dtype), seed=5, offset=3))
    q = reference.softmax(x[None])[0]
    stat, crit = _chi2_ok(np.bincount(got, minlength=P.size), q, N)
    assert stat < crit and not np.any(got == 2)


@gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("vocab", [5000, 5001])
def test_16bit_probs_draw_the_float32_tokens(dtype, vocab):
    """Values exact in every dtype: each sampler (both vector widths: vocab 5000 and 5001) draws bitwise
    the tokens of the float32 input, with and without indices, and every token lies in the float64
    reference's support."""
    p32 = _exact_probs(64, vocab, vocab)
    x32 = cp.asarray(p32)
    x16 = cast(x32, dtype)
    idx = cp.asarray([3, 3, 0, 63, 17] * 40, dtype=cp.int32)
    for name, args, ref in SAMPLERS:
        fn = getattr(sampling, name)
        for kw in ({}, {"indices": idx}):
            want = fn(x32, *args, seed=7, offset=1, **kw)
            _poison(want.size * 4)
            got = fn(x16, *args, seed=7, offset=1, **kw)
            assert _eq(got, want), f"{name} {list(kw)}"
        tok = cp.asnumpy(want)
        rows = cp.asnumpy(idx)
        assert all(reference.filtered_distribution(p32[r].astype(np.float64), **ref)[t] > 0 for r, t in zip(rows, tok))


@gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("order", ["top_k_first", "joint"])
def test_16bit_logits_samplers(dtype, order):
    """sampling_from_logits and top_k_top_p_sampling_from_logits on 16-bit logits: the tokens of the
    same (exactly representable) logits in float32; softmax of them is the float32 input's."""
    rng = np.random.default_rng(11)
    x32 = cp.asarray(np.round(rng.standard_normal((50, 3001)) * 16) / 4, dtype=cp.float32)
    x32[::7, ::5] = -np.inf
    x16 = cast(x32, dtype)
    assert _eq(_f32(x16), x32)
    assert _eq(sampling.sampling_from_logits(x16, seed=1, offset=9),
               sampling.sampling_from_logits(x32, seed=1, offset=9))
    assert _eq(sampling.top_k_top_p_sampling_from_logits(x16, 40, 0.8, filter_apply_order=order, seed=2),
               sampling.top_k_top_p_sampling_from_logits(x32, 40, 0.8, filter_apply_order=order, seed=2))


@gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("vocab,strided", [(1000, False), (1001, False), (128256, False), (4096, True)])
def test_softmax_16bit(monkeypatch, dtype, vocab, strided):
    """float32 output (as FlashInfer) against numpy on the rounded logits, temperature none / scalar /
    per row; with logits exact in the dtype, bitwise the two-pass kernel's float32 result."""
    monkeypatch.setitem(sampling._ring_plans, (0, vocab, 5), None)  # float32 on the two-pass kernel too
    x32 = cp.random.default_rng(vocab).standard_normal((5, vocab), dtype=cp.float32) * 3
    x32[1, : vocab // 2] = -np.inf  # set before the cast: no CuPy kernel writes bfloat16
    x = cast(x32, dtype)
    xs = _strided(x) if strided else x
    x64 = f64(x)
    for t in (None, 0.7, cp.asarray([0.5, 1.0, 2.0, 0.25, 4.0], dtype=cp.float32)):
        _poison(5 * vocab * 4)
        got = sampling.softmax(xs, t)
        assert got.dtype == np.float32 and got.shape == (5, vocab)
        t_ref = None if t is None else np.full(5, t) if isinstance(t, float) else cp.asnumpy(t)
        np.testing.assert_allclose(cp.asnumpy(got), reference.softmax(x64, t_ref), rtol=1e-4, atol=1e-9)
        assert _eq(got, sampling.softmax(_strided(_f32(x)) if strided else _f32(x), t))


@gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("vocab", [1003, 30000])
def test_renorm_16bit(dtype, vocab):
    """top_k_renorm_probs returns the input dtype, top_p_renorm_probs float32 (FlashInfer's output
    dtypes), against the float64 reference on the rounded inputs; with exact values, the float32 input's
    results (top-k rounded once to the dtype)."""
    rng = np.random.default_rng(vocab)
    p = rng.dirichlet(np.full(vocab, 0.1), size=4)
    x = from_host(p, dtype)  # through float32, as torch.as_tensor(p, dtype=float32).to(dtype)
    p64 = f64(x)
    tol = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}[dtype]
    ks, ps = [1, 20, 500, 0], [0.1, 0.5, 0.9, 1.0]
    _poison(4 * vocab * 2)
    got_k = sampling.top_k_renorm_probs(x, cp.asarray(ks, dtype=cp.int64))
    got_p = sampling.top_p_renorm_probs(x, cp.asarray(ps, dtype=cp.float32))
    assert dtype_name(got_k) == dtype and got_p.dtype == np.float32
    gk, gp = f64(got_k), cp.asnumpy(got_p)
    for r in range(4):
        want_k = reference.filtered_distribution(p64[r], top_k=ks[r])
        np.testing.assert_allclose(gk[r], want_k, rtol=tol, atol=1e-7, err_msg=f"row {r}")
        want_p = reference.filtered_distribution(p64[r], top_p=ps[r])
        np.testing.assert_allclose(gp[r], want_p, rtol=1e-5, atol=1e-9, err_msg=f"row {r}")
    e32 = cp.asarray(_exact_probs(8, vocab, 1))
    e16 = cast(e32, dtype)
    assert _eq(sampling.top_k_renorm_probs(e16, 30), cast(sampling.top_k_renorm_probs(e32, 30), dtype))
    assert _eq(sampling.top_p_renorm_probs(e16, 0.5), sampling.top_p_renorm_probs(e32, 0.5))


@gpu
@pytest.mark.parametrize("dtype", HALF)
def test_top_k_mask_logits_16bit(dtype):
    """The input dtype back, kept logits bit-exact, against the reference on the 16-bit values (many ties
    after rounding; NaN and -inf; k above the finite count; strided rows)."""
    rng = np.random.default_rng(4)
    xh = _round(rng.standard_normal((5, 20000)) * 3, dtype)  # built on the host: no CuPy math on bfloat16
    xh[1] = np.round(xh[1])
    xh[2, 7] = np.nan
    xh[3, ::2] = -np.inf
    x = from_host(xh, dtype)
    ks = [1, 100, 5000, 15000, 20000]
    x64 = f64(x)
    for xs in (x, _strided(x)):
        _poison(5 * 20000 * 2)
        got = sampling.top_k_mask_logits(xs, cp.asarray(ks, dtype=cp.int64))
        assert dtype_name(got) == dtype
        g64 = f64(got)
        for r in range(5):
            np.testing.assert_array_equal(g64[r], reference.top_k_mask_logits(x64[r], ks[r]), err_msg=f"row {r}")


def _chain_inputs(dtype, n=3, vocab=12, seed=5):
    """Draft and target probabilities of a few tokens, rounded to dtype; drafts drawn from the draft
    probabilities (rounded values as float64 for the exact law)."""
    rng = np.random.default_rng(seed)
    q = _round(rng.dirichlet(np.ones(vocab), size=n), dtype)
    p = _round(rng.dirichlet(np.ones(vocab), size=n + 1), dtype)
    ids = np.array([int(np.argmax(q[i])) for i in range(n)])
    return q, p, ids


@gpu
@pytest.mark.parametrize("dtype", HALF)
def test_chain_speculative_16bit_law_and_int64_ids(dtype):
    """16-bit draft / target probabilities and int64 draft ids: the exact law of the rounded inputs by
    chi-square; the tokens and counts of the same values in float32 with int32 ids; mixed dtypes (16-bit
    drafts, float32 targets) convert both to float32 first: again the same tokens."""
    q, p, ids = _chain_inputs(dtype)
    law = reference.chain_speculative_distribution(q, ids, p)
    rows = 40000
    q16 = from_host(np.tile(q, (rows, 1, 1)), dtype)
    p16 = from_host(np.tile(p, (rows, 1, 1)), dtype)
    ids64 = cp.asarray(np.tile(ids, (rows, 1)), dtype=cp.int64)
    _poison(rows * 4 * 4)
    out, acc, emi = sampling.chain_speculative_sampling(q16, ids64, p16, seed=3, offset=5)
    assert out.dtype == acc.dtype == emi.dtype == np.int32
    o, e = cp.asnumpy(out), cp.asnumpy(emi)
    cells = sorted(law)
    index = {c: i for i, c in enumerate(cells)}
    outcome = [index.get((int(j), int(o[r, j])), -1) for r, j in enumerate(e)]
    assert min(outcome) >= 0, "an outcome of probability 0"
    stat, crit = _chi2_ok(np.bincount(outcome, minlength=len(cells)), np.array([law[c] for c in cells]), rows)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"
    want = sampling.chain_speculative_sampling(_f32(q16), ids64.astype(cp.int32), _f32(p16), seed=3, offset=5)
    assert all(_eq(a, w) for a, w in zip((out, acc, emi), want))
    mixed = sampling.chain_speculative_sampling(q16, ids64, _f32(p16), seed=3, offset=5)
    assert all(_eq(a, w) for a, w in zip(mixed, want))


@gpu
@pytest.mark.parametrize("name,args", [(n, a) for n, a, _ in SAMPLERS] + [
    ("sampling_from_logits", ()), ("top_k_top_p_sampling_from_logits", (20, 0.75))])
def test_int64_indices(name, args):
    """int64 indices: the samples come back int64 (FlashInfer returns the indices' dtype), the tokens
    those of int32 indices; valid per output row."""
    x = cp.asarray(_exact_probs(6, 3000, 2))
    if name.endswith("_logits"):
        x = cp.log(x)
    rows = [5, 5, 0, 2, 1, 4, 3, 0] * 25
    fn = getattr(sampling, name)
    a = fn(x, *args, indices=cp.asarray(rows, dtype=cp.int32), seed=4, offset=8)
    _poison(len(rows) * 8)
    b = fn(x, *args, indices=cp.asarray(rows, dtype=cp.int64), seed=4, offset=8)
    assert a.dtype == np.int32 and b.dtype == np.int64 and _eq(a.astype(cp.int64), b)
    assert np.all(np.take_along_axis(cp.asnumpy(x)[rows], cp.asnumpy(b)[:, None], 1) > (
        -np.inf if name.endswith("_logits") else 0))
    if not name.endswith("_logits"):
        s, v = fn(x, *args, indices=cp.asarray(rows, dtype=cp.int64), seed=4, offset=8, return_valid=True)
        assert _eq(s, b) and v.dtype == np.bool_ and v.shape == (len(rows),) and bool(v.all())


PARAM_DTYPES = ("int32", "int64", "int16", "int8", "uint8", "float16", "bfloat16", "float32", "float64")


def _param_dtypes(floats_only=False):
    names = [d for d in PARAM_DTYPES if not floats_only or d.startswith(("float", "bfloat"))]
    return [d for d in names if getattr(dt, d, None) in sampling.PARAM_CODES]


def _param_array(values, dtype):
    """A device array of `values` in `dtype`: floats through float32 (as torch.tensor(values).to(dtype)),
    integers from int64."""
    if dtype.startswith(("float", "bfloat")):
        return cast(cp.asarray(values, dtype=cp.float32), dtype)
    return cp.asarray(np.asarray(values, np.int64).astype(dtype))


@gpu
@pytest.mark.parametrize("dtype", _param_dtypes())
def test_top_k_arrays_of_every_dtype(dtype):
    """A top_k array of any dtype gives the tokens (renorms, masks) of the int32 array, and row r those of
    the scalar top_k[r]; float arrays truncate toward zero (torch's .int())."""
    x = cp.asarray(_exact_probs(6, 3000, 3))
    logits = cp.log(x)
    ks = [1, 3, 50, 0, 7, 120]
    k32 = cp.asarray(ks, dtype=cp.int32)
    kd = _param_array([k + 0.75 if dtype.startswith(("float", "bfloat")) and k < 100 else k for k in ks], dtype)
    calls = [lambda k: sampling.top_k_sampling_from_probs(x, k, seed=6),
             lambda k: sampling.top_k_top_p_sampling_from_probs(x, k, 0.875, seed=6),
             lambda k: sampling.top_k_renorm_probs(x, k),
             lambda k: sampling.top_k_mask_logits(logits, k)]
    for i, call in enumerate(calls):
        want = call(k32)
        assert _eq(call(kd), want), f"call {i}"
        for r, k in enumerate(ks):
            assert _eq(call(k)[r], want[r]), f"call {i} row {r}"
            assert _eq(call(np.int64(k))[r], want[r])


@gpu
@pytest.mark.parametrize("dtype", _param_dtypes(floats_only=True))
def test_float_parameter_arrays_of_every_dtype(dtype):
    """top_p, min_p and temperature arrays of any float dtype (values exact in all of them) give the
    results of float32 arrays, and row r those of the scalar (Python float, numpy float32)."""
    x = cp.asarray(_exact_probs(6, 3000, 4))
    logits = cp.log(x) * 3
    vals = {"top_p": [0.5, 0.75, 0.25, 1.0, 0.625, 0.875], "min_p": [0.0, 0.5, 0.25, 0.125, 1.0, 0.75],
            "temperature": [0.5, 1.0, 2.0, 4.0, 0.25, 1.5]}
    calls = {"top_p": [lambda v: sampling.top_p_sampling_from_probs(x, v, seed=8),
                       lambda v: sampling.top_k_top_p_sampling_from_probs(x, 40, v, filter_apply_order="joint",
                                                                          seed=8),
                       lambda v: sampling.top_p_renorm_probs(x, v)],
             "min_p": [lambda v: sampling.min_p_sampling_from_probs(x, v, seed=8)],
             "temperature": [lambda v: sampling.softmax(logits, v)]}
    for name, fns in calls.items():
        f32 = cp.asarray(vals[name], dtype=cp.float32)
        fd = cast(f32, dtype)
        for i, call in enumerate(fns):
            want = call(f32)
            assert _eq(call(fd), want), f"{name} call {i}"
            for r, v in enumerate(vals[name]):
                assert _eq(call(v)[r], want[r]) and _eq(call(np.float32(v))[r], want[r]), (name, i, r)


@gpu
def test_integer_parameter_arrays_for_float_parameters():
    """Integer arrays of top_p / min_p / temperature are read as their values."""
    x = cp.asarray(_exact_probs(4, 2000, 5))
    ones = cp.ones(4, dtype=cp.int64)
    assert _eq(sampling.top_p_sampling_from_probs(x, ones, seed=1), sampling.sampling_from_probs(x, seed=1))
    temps = cp.asarray([1, 2, 3, 4], dtype=cp.uint8)
    assert _eq(sampling.softmax(x, temps), sampling.softmax(x, temps.astype(cp.float32)))
    assert _eq(sampling.min_p_sampling_from_probs(x, ones.astype(cp.int32) * 0, seed=1),
               sampling.sampling_from_probs(x, seed=1))


GEN_CASES = [  # (function, arguments, FlashInfer's increment for (batch, vocab))
    ("sampling_from_probs", (), lambda b, v: b), ("min_p_sampling_from_probs", (0.1,), lambda b, v: b),
    ("top_p_sampling_from_probs", (0.9,), lambda b, v: b * 32),
    ("top_k_sampling_from_probs", (20,), lambda b, v: b * 32),
    ("top_k_top_p_sampling_from_probs", (20, 0.9), lambda b, v: b * 32),
    ("sampling_from_logits", (), lambda b, v: b * v),
    ("top_k_top_p_sampling_from_logits", (20, 0.9), lambda b, v: b * 32)]


def _gen_input(name, batch=501, vocab=1001, framework="cupy"):
    x = _exact_probs(batch, vocab, 6)
    if framework == "torch":
        x = torch.as_tensor(x, device="cuda")
        return torch.log(x) if name.endswith("_logits") else x
    x = cp.asarray(x)
    return cp.log(x) if name.endswith("_logits") else x


@gpu
@pytest.mark.parametrize("name,args", [(n, a) for n, a, _ in GEN_CASES])
def test_fi_cupy_generator(name, args):
    """A CuPy caller's generators: a fi_cupy Generator gives its seed and the next offset a call (the
    same manual_seed, the same tokens: those of seed=, offset=); generator=None takes
    sampling.default_generator's next offset."""
    x, fn = _gen_input(name), getattr(sampling, name)
    g = sampling.Generator(1234)
    a = fn(x, *args, generator=g)
    assert g.offset == 1
    b = fn(x, *args, generator=g)
    assert g.offset == 2 and not _eq(a, b)
    g.manual_seed(1234)
    assert _eq(fn(x, *args, generator=g), a)
    assert _eq(fn(x, *args, seed=1234, offset=0), a) and _eq(fn(x, *args, seed=1234, offset=1), b)
    before = sampling.default_generator.offset
    c = fn(x, *args)
    assert sampling.default_generator.offset == before + 1
    assert _eq(fn(x, *args, seed=sampling.default_generator.seed, offset=before), c)


@gpu
@needs_torch
@pytest.mark.parametrize("name,args,inc", GEN_CASES)
def test_torch_cuda_generator(name, args, inc):
    """A CUDA torch.Generator: its offset advances by FlashInfer's rounded increment a call; the same
    manual_seed gives the same tokens; the tokens are those of seed=its seed, offset=the advanced offset
    (FlashInfer's get_seed_and_offset returns the offset after the increment)."""
    x, fn = _gen_input(name, framework="torch"), getattr(sampling, name)
    step = _round4(inc(*x.shape))
    g = torch.Generator(device="cuda")
    g.manual_seed(1234)
    a = fn(x, *args, generator=g)
    assert g.get_offset() == step
    b = fn(x, *args, generator=g)
    assert g.get_offset() == 2 * step and not torch.equal(a, b)
    g.manual_seed(1234)
    assert torch.equal(fn(x, *args, generator=g), a)
    assert torch.equal(fn(x, *args, seed=1234, offset=step), a)
    assert torch.equal(fn(x, *args, seed=1234, offset=2 * step), b)


@gpu
@needs_torch
@pytest.mark.parametrize("name,args,inc", GEN_CASES[:2] + GEN_CASES[5:6])
def test_torch_default_and_cpu_generators(name, args, inc):
    """generator=None with torch inputs: torch's default CUDA generator (torch.manual_seed reproduces, it
    advances as under FlashInfer); a CPU generator is reproducible too; a CuPy caller's calls advance
    fi_cupy's default Generator, not torch's."""
    x, fn = _gen_input(name, framework="torch"), getattr(sampling, name)
    step = _round4(inc(*x.shape))
    default = torch.cuda.default_generators[0]
    torch.manual_seed(0)
    a = fn(x, *args)
    assert default.get_offset() == step
    torch.manual_seed(0)
    assert torch.equal(fn(x, *args), a)
    assert torch.equal(fn(x, *args, seed=0, offset=step), a)  # torch.manual_seed(0): seed 0
    cpu = torch.Generator()
    cpu.manual_seed(5)
    c1 = fn(x, *args, generator=cpu)
    cpu.manual_seed(5)
    assert torch.equal(fn(x, *args, generator=cpu), c1)
    before, torch_before = sampling.default_generator.offset, default.get_offset()
    fn(cp.from_dlpack(x), *args)
    assert sampling.default_generator.offset == before + 1 and default.get_offset() == torch_before


@gpu
@needs_torch
def test_torch_generator_chain_speculative():
    q, p, ids = _chain_inputs("float32", n=4)
    b = 300
    qt = torch.as_tensor(np.tile(q, (b, 1, 1)), dtype=torch.float32, device="cuda")
    pt = torch.as_tensor(np.tile(p, (b, 1, 1)), dtype=torch.float32, device="cuda")
    it = torch.as_tensor(np.tile(ids, (b, 1)), dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda")
    g.manual_seed(9)
    out, _, _ = sampling.chain_speculative_sampling(qt, it, pt, generator=g)
    assert g.get_offset() == _round4(b * 5)
    again, _, _ = sampling.chain_speculative_sampling(qt, it, pt, seed=9, offset=_round4(b * 5))
    assert torch.equal(out, again)


@gpu
def test_per_row_seed_and_offset():
    """int64 / uint64 seed and offset arrays of length batch: each row's token depends on its own
    (seed, offset) and its position only (not on the other rows); a length-1 array is the scalar; equal
    per-row values are the scalar call. sampling_from_logits and chain_speculative_sampling too."""
    batch, vocab = 16, 4000
    x = cp.asarray(_exact_probs(batch, vocab, 7))
    seeds = cp.arange(batch, dtype=cp.int64) * 7919 + 3
    offsets = cp.arange(batch, dtype=cp.int64) * 4
    for name, args in [("top_k_top_p_sampling_from_probs", (100, 0.9)), ("sampling_from_probs", ()),
                       ("sampling_from_logits", ())]:
        fn = getattr(sampling, name)
        data = cp.log(x) if name == "sampling_from_logits" else x
        a = fn(data, *args, seed=seeds, offset=offsets)
        other = cp.ascontiguousarray(data[::-1])
        for r in range(batch):  # row r alone kept; every other row, seed and offset changed
            d, s, o = other.copy(), seeds + 1000, offsets + 8
            d[r], s[r], o[r] = data[r], seeds[r], offsets[r]
            assert int(fn(d, *args, seed=s, offset=o)[r]) == int(a[r]), f"{name} row {r}"
        scalar = fn(data, *args, seed=77, offset=12)
        assert _eq(fn(data, *args, seed=cp.asarray([77], dtype=cp.int64), offset=cp.asarray([12], dtype=cp.int64)),
                   scalar)
        assert _eq(fn(data, *args, seed=cp.full((batch,), 77, dtype=cp.int64), offset=12), scalar)
        assert _eq(fn(data, *args, seed=77, offset=cp.full((batch,), 12, dtype=cp.int64)), scalar)
    big = cp.asarray(np.array([-2 ** 63 + 5, -1], np.int64)).view(cp.uint64)  # 2^63 + 5, 2^64 - 1
    y = x[:2]
    assert _eq(sampling.sampling_from_probs(y, seed=big, offset=big),
               sampling.sampling_from_probs(y, seed=big.view(cp.int64), offset=big.view(cp.int64)))
    assert _eq(sampling.sampling_from_probs(y[:1], seed=big[1:], offset=0),
               sampling.sampling_from_probs(y[:1], seed=2 ** 64 - 1, offset=0))
    q, p, ids = _chain_inputs("float32", n=3)
    qt = cp.asarray(np.tile(q, (8, 1, 1)), dtype=cp.float32)
    pt = cp.asarray(np.tile(p, (8, 1, 1)), dtype=cp.float32)
    it = cp.asarray(np.tile(ids, (8, 1)), dtype=cp.int32)
    want = sampling.chain_speculative_sampling(qt, it, pt, seed=5, offset=4)[0]
    got = sampling.chain_speculative_sampling(qt, it, pt, seed=cp.full((8,), 5, dtype=cp.int64),
                                              offset=cp.full((8,), 4, dtype=cp.int64))[0]
    assert _eq(got, want)


@gpu
def test_cuda_graph_with_seed_and_offset_arrays():
    """Seeds and offsets as device arrays keep a captured sampler replayable: new offsets written in
    place give the tokens an eager call gives for them (FlashInfer's reason for taking tensors)."""
    x = cp.asarray(_exact_probs(8, 4096, 8))
    seeds = cp.arange(8, dtype=cp.int64) + 11
    offsets = cp.zeros(8, dtype=cp.int64)
    s = cp.cuda.Stream(non_blocking=True)  # capture needs a stream other than the legacy one
    cp.cuda.Device().synchronize()  # the inputs, made on the legacy stream, are ready
    outs = []
    with s:
        sampling.top_k_sampling_from_probs(x, 20, seed=seeds, offset=offsets)  # compile and load outside the capture
        s.begin_capture()
        try:
            tok = sampling.top_k_sampling_from_probs(x, 20, seed=seeds, offset=offsets)
        finally:
            graph = s.end_capture()
        for step in range(3):
            offsets.fill(4 * step)
            graph.launch(s)
            s.synchronize()
            outs.append(tok.copy())
            assert _eq(tok, sampling.top_k_sampling_from_probs(x, 20, seed=seeds, offset=4 * step))
    assert not _eq(outs[0], outs[1]) or not _eq(outs[1], outs[2])


@gpu
@pytest.mark.parametrize("name,args", [(n, a) for n, a, _ in SAMPLERS])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_return_valid(name, args, dtype):
    """valid (bool) is False exactly for the rows with nothing to draw (all zero, NaN or negative), whose
    sample is 0, as FlashInfer; True for every row with positive mass, NaN entries or not."""
    xh = _exact_probs(6, 2001, 9)
    xh[1] = 0.0
    xh[2] = np.nan
    xh[3] = -0.5
    xh[4, ::3] = np.nan
    x = from_host(xh, dtype)  # built on the host: no CuPy kernel writes bfloat16
    fn = getattr(sampling, name)
    _poison(64)
    s, v = fn(x, *args, seed=3, return_valid=True)
    assert v.dtype == np.bool_ and v.shape == (6,) and s.dtype == np.int32
    assert v.tolist() == [True, False, False, False, True, True]
    assert s[1:4].tolist() == [0, 0, 0]
    tok, x64 = cp.asnumpy(s), f64(x)
    assert all(x64[r, tok[r]] > 0 for r in (0, 4, 5))
    assert _eq(fn(x, *args, seed=3), s)  # return_valid=False: the samples alone
    idx = cp.asarray([1, 0, 3, 5], dtype=cp.int64)
    s2, v2 = fn(x, *args, indices=idx, seed=3, return_valid=True)
    assert s2.dtype == np.int64 and v2.tolist() == [False, True, False, True]


@gpu
def test_deterministic_flags_are_accepted():
    """deterministic=False and is_deterministic (either value, positional as in FlashInfer) change nothing:
    every kernel here is deterministic."""
    x = cp.asarray(_exact_probs(4, 3000, 10))
    assert _eq(sampling.top_k_sampling_from_probs(x, 5, None, False, seed=1),
               sampling.top_k_sampling_from_probs(x, 5, seed=1))
    assert _eq(sampling.top_p_renorm_probs(x, 0.5, True), sampling.top_p_renorm_probs(x, 0.5))
    assert _eq(sampling.top_k_renorm_probs(x, 5, True), sampling.top_k_renorm_probs(x, 5, False))


@gpu
def test_bad_input_dtypes_and_seeds():
    p = uniform((4, 64))
    with pytest.raises(TypeError, match="seed: dtype int32"):
        sampling.sampling_from_probs(p, seed=cp.ones(4, dtype=cp.int32), offset=0)
    with pytest.raises(ValueError, match=r"offset: expected length 1 or batch_size \(4\), got 3"):
        sampling.sampling_from_probs(p, seed=1, offset=cp.ones(3, dtype=cp.int64))
    with pytest.raises((TypeError, ValueError), match="seed: .*(CUDA device|host)"):  # a host array
        sampling.sampling_from_probs(p, seed=np.ones(4, dtype=np.int64), offset=0)
    with pytest.raises(TypeError, match="top_k: dtype bool"):
        sampling.top_k_sampling_from_probs(p, cp.ones(4, dtype=cp.bool_))
    with pytest.raises(ValueError, match=r"top_p: entries must lie in \(0, 1\]"):
        sampling.top_p_sampling_from_probs(p, from_host(np.array([0.5, 0.0, 0.5, 0.5]), "bfloat16"))
    with pytest.raises(TypeError, match="indices: dtype"):
        sampling.sampling_from_probs(p, indices=cp.zeros(4, dtype=cp.float32))
    p3 = p.reshape(2, 2, 64)
    with pytest.raises(TypeError, match="draft_token_ids: dtype"):
        sampling.chain_speculative_sampling(cp.ascontiguousarray(p3[:, :1]).astype(cp.float16),
                                            cp.zeros((2, 1), dtype=cp.float32), p3.astype(cp.float16))
    qh = cp.asnumpy(p)
    qh[1, 3] = np.nan
    q = from_host(qh, "bfloat16")
    with pytest.raises(ValueError, match="probs: contains NaN"):
        sampling.top_k_sampling_from_probs(q, 5, check_nan=True)
    with pytest.raises(ValueError, match="logits: contains NaN"):
        sampling.sampling_from_logits(_f32(q).astype(cp.float16), check_nan=True)
