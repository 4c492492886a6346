"""Samplers on the GPU: chi-square against the filtered distribution (fi_cupy.reference) at a fixed
seed, zero-probability tokens never drawn, top_k=1 is the argmax, same seed and offset give the same
tokens, softmax against numpy, check_nan."""
import math

import numpy as np
import pytest

from fi_cupy import reference

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
from fi_cupy import sampling  # noqa: E402
from fi_cupy._core import kernels  # noqa: E402

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
    return torch.as_tensor(np.tile(np.asarray(p, np.float32), (N, 1)), device="cuda")


P = np.array([0.02, 0.3, 0.0, 0.05, 0.15, 0.01, 0.22, 0.04, 0.11, 0.1], np.float64)


@pytest.mark.parametrize("name,kw,ref", [
    ("sampling_from_probs", {}, {}),
    ("top_k_sampling_from_probs", {"top_k": 4}, {"top_k": 4}),
    ("top_p_sampling_from_probs", {"top_p": 0.6}, {"top_p": 0.6}),
    ("min_p_sampling_from_probs", {"min_p": 0.3}, {"min_p": 0.3}),
    ("top_k_top_p_sampling_from_probs", {"top_k": 5, "top_p": 0.7}, {"top_k": 5, "top_p": 0.7}),
    ("top_k_top_p_sampling_from_probs", {"top_k": 5, "top_p": 0.7, "filter_apply_order": "joint"},
     {"top_k": 5, "top_p": 0.7, "order": "joint"}),
])
def test_chi_square(name, kw, ref):
    q = reference.filtered_distribution(P, **ref)
    got = getattr(sampling, name)(_rows(P * 0.5), seed=1234, offset=7, **kw).cpu().numpy()  # unnormalised
    assert got.dtype == np.int32 and got.min() >= 0 and got.max() < P.size
    assert np.all(q[got] > 0), "drew a token whose filtered probability is 0"
    stat, crit = _chi2_ok(np.bincount(got, minlength=P.size), q, N)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"


def test_sampling_from_logits_chi_square():
    logits = np.log(P + 1e-30)
    logits[2] = -np.inf
    got = sampling.sampling_from_logits(_rows(logits), seed=5, offset=0).cpu().numpy()
    stat, crit = _chi2_ok(np.bincount(got, minlength=P.size), P / P.sum(), N)
    assert stat < crit and not np.any(got == 2)


def test_per_row_parameters_and_indices():
    rng = np.random.default_rng(0)
    probs = rng.random((6, 50)).astype(np.float32) ** 4
    k = np.array([1, 2, 3, 50, 0, 7], np.int32)
    pt = torch.as_tensor(probs, device="cuda")
    got = sampling.top_k_sampling_from_probs(pt, torch.as_tensor(k, device="cuda"), seed=3).cpu().numpy()
    assert got[0] == probs[0].argmax()
    for r in range(6):
        assert reference.top_k_mask(probs[r], int(k[r]))[got[r]]
    idx = torch.tensor([5, 5, 0, 2], device="cuda", dtype=torch.int32)
    got = sampling.top_p_sampling_from_probs(pt, torch.tensor([0.5, 0.9, 0.3, 1.0], device="cuda"), indices=idx,
                                             seed=9).cpu().numpy()
    for j, (r, tp) in enumerate(zip([5, 5, 0, 2], [0.5, 0.9, 0.3, 1.0])):
        assert reference.top_p_mask(probs[r], tp)[got[j]]


@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 256000, 1001])
def test_large_vocab_support(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((8, vocab)).astype(np.float32) * 4
    lt = torch.as_tensor(logits, device="cuda")
    probs = sampling.softmax(lt)
    np.testing.assert_allclose(probs.cpu().numpy(), reference.softmax(logits), rtol=1e-4, atol=1e-9)
    pn = probs.cpu().numpy().astype(np.float64)
    for name, kw, mask in [("top_k_sampling_from_probs", {"top_k": 20}, lambda p: reference.top_k_mask(p, 20)),
                           ("top_p_sampling_from_probs", {"top_p": 0.5}, lambda p: reference.top_p_mask(p, 0.5)),
                           ("min_p_sampling_from_probs", {"min_p": 0.1}, lambda p: reference.min_p_mask(p, 0.1))]:
        got = getattr(sampling, name)(probs, seed=11, **kw).cpu().numpy()
        assert all(mask(pn[r])[got[r]] for r in range(8)), name
    greedy = sampling.top_k_sampling_from_probs(probs, 1, seed=2).cpu().numpy()
    assert np.array_equal(greedy, logits.argmax(1))


def test_reproducible_and_offsets_differ():
    p = _rows(P)[:1000]
    a = sampling.sampling_from_probs(p, seed=42, offset=3).cpu().numpy()
    b = sampling.sampling_from_probs(p, seed=42, offset=3).cpu().numpy()
    c = sampling.sampling_from_probs(p, seed=42, offset=4).cpu().numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    g1, g2 = sampling.Generator(8), sampling.Generator(8)
    assert np.array_equal(sampling.sampling_from_probs(p, generator=g1).cpu().numpy(),
                          sampling.sampling_from_probs(p, generator=g2).cpu().numpy())
    assert g1.offset == 1


@pytest.mark.parametrize("vocab", [1000, 4, 7, 65537 * 4, 16 * 13 * 4096, 16 * 20 * 4096, 16 * 20 * 4096 + 4])
def test_softmax_temperature_per_row(vocab):
    """Ring shapes (1000: 16 CTAs of 64 floats; 262148: slices that end mid-chunk; 851968: 16 CTAs
    of 13 chunks; 1310720: 16 CTAs of 20 chunks, 7 of them held in registers, the longest row), the
    two-pass kernel (7: unaligned rows; 1310724: longer)."""
    x = torch.randn((3, vocab), device="cuda") * 4
    t = torch.tensor([0.5, 1.0, 2.0], device="cuda")
    got = sampling.softmax(x, t).cpu().numpy()
    np.testing.assert_allclose(got, reference.softmax(x.cpu().numpy(), t.cpu().numpy()), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("batch,vocab", [(300, 32000), (203, 128256), (40, 151936)])
def test_softmax_many_rows_a_cluster_and_masked_slices(batch, vocab):
    """More rows than resident clusters, so each cluster streams several through its ring of buffers;
    -inf logits, with whole CTA slices of -inf in some rows (their share is 0, never NaN)."""
    g = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn((batch, vocab), device="cuda", generator=g) * 3
    x[::3, : vocab // 2] = float("-inf")  # the first CTAs of those rows see nothing but -inf
    x[1::5, 7::11] = float("-inf")
    poison = torch.full_like(x, float("nan"))  # freed, so the output most likely reuses its NaN block
    del poison
    got = sampling.softmax(x).cpu().numpy()
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, reference.softmax(x.cpu().numpy()), rtol=1e-4, atol=1e-9)


def _force_ring(monkeypatch, batch, vocab, cluster, per_sm, window=None):
    """Make softmax at (batch, vocab) run the ring kernel as `cluster` CTAs at per_sm CTAs an SM."""
    if sampling._ring_plan(0, vocab, batch) is None:
        pytest.skip("the ring softmax needs thread-block clusters (sm_90+)")
    slots = sampling.ring_slots(kernels.device_props(0), per_sm)
    assert sampling.ring_slice(vocab, cluster)[1] - sampling.ring_hold(per_sm) < slots
    plan = sampling.ring_plan(0, vocab, batch, cluster, per_sm, window)
    monkeypatch.setitem(sampling._ring_plans, (0, vocab, batch), plan)


@pytest.mark.parametrize("window", [0, 1, 2, 3])
@pytest.mark.parametrize("cluster,per_sm", [(7, 2), (2, 1)])
def test_softmax_ring_copies_in_flight(monkeypatch, window, cluster, per_sm):
    """The ring kernel with at most `window` copies in flight a CTA (0: as many as buffers allow); 2@1
    holds 7 of its 16 chunks in registers, with more rows than resident clusters."""
    batch, vocab = 70, 128256
    _force_ring(monkeypatch, batch, vocab, cluster, per_sm, window)
    x = torch.randn((batch, vocab), device="cuda") * 3
    np.testing.assert_allclose(sampling.softmax(x).cpu().numpy(), reference.softmax(x.cpu().numpy()),
                               rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("cluster,per_sm", [(7, 2), (2, 1)])
def test_softmax_ring_buffer_reuse_stress(monkeypatch, cluster, per_sm):
    """The ring refills a buffer by bulk copy once every warp has read it: without a proxy fence
    between the reads and the refill, about one run in 1000 at this shape (7@2) read a refilled
    float4 (the first of a chunk). 2000 runs, checked on the GPU without a host sync in the loop."""
    _force_ring(monkeypatch, 64, 151936, cluster, per_sm)
    x = torch.randn((64, 151936), device="cuda") * 3
    ref = torch.softmax(x.double(), -1).float()
    bad = torch.zeros((), dtype=torch.int32, device="cuda")
    for _ in range(2000):
        bad += (~torch.isclose(sampling.softmax(x), ref, rtol=1e-4, atol=1e-9)).any()
    assert int(bad) == 0, f"{int(bad)} of 2000 runs differ from torch.softmax"


def test_bad_input():
    p = torch.rand((4, 10), device="cuda")
    with pytest.raises(ValueError, match="top_p"):
        sampling.top_p_sampling_from_probs(p, 1.5)
    with pytest.raises(ValueError, match="top_p"):
        sampling.top_p_sampling_from_probs(p, torch.tensor([0.5, 0.0, 0.5, 0.5], device="cuda"))
    with pytest.raises(ValueError, match="indices"):
        sampling.sampling_from_probs(p, indices=torch.tensor([0, 4], device="cuda", dtype=torch.int32))
    with pytest.raises(ValueError, match="top_k: expected shape"):
        sampling.top_k_sampling_from_probs(p, torch.ones(3, device="cuda", dtype=torch.int32))
    with pytest.raises(TypeError, match="probs: dtype"):
        sampling.sampling_from_probs(p.half())
    with pytest.raises(ValueError, match="probs: expected 2 dims"):
        sampling.sampling_from_probs(p[0])
    q = p.clone()
    q[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sampling.sampling_from_probs(q, check_nan=True)


def _shared_rows(p):
    """N draws from one (1, vocab) row through `indices`: a large vocabulary at the memory of one row."""
    return (torch.as_tensor(np.asarray(p, np.float32)[None], device="cuda"),
            torch.zeros(N, dtype=torch.int32, device="cuda"))


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
def test_chi_square_large_vocab(name, kw, ref, rest):
    vocab = 40000  # 10 vectors of 4 a thread: the scans, rescans and gathers over many tiles
    p, pos = _embedded(vocab, rest)
    q = reference.filtered_distribution(p, **ref)
    probs, idx = _shared_rows(p)
    got = getattr(sampling, name)(probs, indices=idx, seed=77, offset=1, **kw).cpu().numpy()
    assert got.min() >= 0 and got.max() < vocab and np.all(q[got] > 0)
    qc = np.append(q[pos], q.sum() - q[pos].sum())
    stat, crit = _chi2_ok(_cells(got, pos, vocab), qc, N)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"


@pytest.mark.parametrize("vocab", [128256, 151936, 1003])
def test_renorm_probs(vocab):
    rng = np.random.default_rng(vocab)
    probs = rng.dirichlet(np.full(vocab, 0.05), size=6).astype(np.float32)
    probs[5] = 1.0 / vocab  # all tied: ties at the boundary are kept, so nothing is cut
    pt = torch.as_tensor(probs, device="cuda")
    pn = probs.astype(np.float64)
    ks = np.array([1, 50, 1000, 9000, 0, 7], np.int32)
    ps = np.array([0.05, 0.5, 0.9, 0.99, 1.0, 0.3], np.float32)
    for name, arg, ref in [
            ("top_k_renorm_probs", torch.as_tensor(ks, device="cuda"), lambda r: {"top_k": int(ks[r])}),
            ("top_p_renorm_probs", torch.as_tensor(ps, device="cuda"), lambda r: {"top_p": float(ps[r])}),
            ("top_k_renorm_probs", 20, lambda r: {"top_k": 20}),
            ("top_p_renorm_probs", 0.8, lambda r: {"top_p": 0.8})]:
        got = getattr(sampling, name)(pt, arg).cpu().numpy()
        for r in range(6):
            want = reference.filtered_distribution(pn[r], **ref(r))
            np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-9, err_msg=f"{name} row {r}")
            assert abs(got[r].sum() - 1) < 1e-4


def test_top_k_mask_logits():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 50000)).astype(np.float32) * 5
    x[1, :] = np.round(x[1, :])  # many ties
    x[2, 7] = np.nan
    x[3, :] = -3.0
    ks = np.array([1, 100, 5000, 20000, 50000], np.int32)
    got = sampling.top_k_mask_logits(torch.as_tensor(x, device="cuda"),
                                     torch.as_tensor(ks, device="cuda")).cpu().numpy()
    for r in range(5):
        np.testing.assert_array_equal(got[r], reference.top_k_mask_logits(x[r], int(ks[r])).astype(np.float32))


def test_chain_speculative_sampling_law():
    rng = np.random.default_rng(5)
    vocab, n = 12, 3
    q = rng.dirichlet(np.ones(vocab), size=n)
    p = rng.dirichlet(np.ones(vocab), size=n + 1)
    ids = np.array([int(np.argmax(q[i])) for i in range(n)], np.int32)
    law = reference.chain_speculative_distribution(q, ids, p)
    rows = 40000
    qt = torch.as_tensor(np.tile(q.astype(np.float32), (rows, 1, 1)), device="cuda")
    pt = torch.as_tensor(np.tile(p.astype(np.float32), (rows, 1, 1)), device="cuda")
    it = torch.as_tensor(np.tile(ids, (rows, 1)), device="cuda")
    out, acc, emitted = sampling.chain_speculative_sampling(qt, it, pt, seed=3, offset=0)
    out, acc, emitted = out.cpu().numpy(), acc.cpu().numpy(), emitted.cpu().numpy()
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


def test_chain_speculative_sampling_edges_and_counters():
    vocab, n, b = 1000, 4, 3
    rng = np.random.default_rng(9)
    q = rng.dirichlet(np.ones(vocab), size=(b, n)).astype(np.float32)
    ids = rng.integers(0, vocab, (b, n)).astype(np.int32)
    p = np.concatenate([q, rng.dirichlet(np.ones(vocab), size=(b, 1)).astype(np.float32)], axis=1)
    p[1, 0, ids[1, 0]] = 0.0  # request 1: draft 0 is always rejected (p renormalised: a residual remains)
    p[1, 0] /= p[1, 0].sum()
    acc0 = torch.tensor([10, 20, 30], dtype=torch.int32, device="cuda")
    emi0 = torch.tensor([1, 1, 1], dtype=torch.int32, device="cuda")
    out, acc, emi = sampling.chain_speculative_sampling(
        torch.as_tensor(q, device="cuda"), torch.as_tensor(ids, device="cuda"), torch.as_tensor(p, device="cuda"),
        acc0, emi0, seed=1)
    out = out.cpu().numpy()
    assert acc is acc0 and emi is emi0  # updated in place, as FlashInfer does
    assert list(emi.cpu().numpy()) == [1 + n, 1, 1 + n] and list(acc.cpu().numpy()) == [10 + n, 20 + n - 1, 30 + n]
    assert np.array_equal(out[0, :n], ids[0]) and np.array_equal(out[2, :n], ids[2])  # p == q: all accepted
    assert out[1, 0] != ids[1, 0] and np.all(out[1, 1:] == -1)
    resid = np.maximum(p[1, 0] - q[1, 0], 0)
    assert resid[out[1, 0]] > 0


def test_new_ops_bad_input():
    p = torch.rand((4, 64), device="cuda")
    with pytest.raises(ValueError, match="top_p"):
        sampling.top_p_renorm_probs(p, 0.0)
    with pytest.raises(TypeError, match="top_k"):
        sampling.top_k_renorm_probs(p, 2.5)
    with pytest.raises(ValueError, match="top_k: expected shape"):
        sampling.top_k_mask_logits(p, torch.ones(5, dtype=torch.int32, device="cuda"))
    q = torch.rand((2, 3, 64), device="cuda")
    ids = torch.zeros((2, 3), dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="target_probs: expected shape"):
        sampling.chain_speculative_sampling(q, ids, torch.rand((2, 3, 64), device="cuda"))
    with pytest.raises(ValueError, match="draft_token_ids: entries"):
        sampling.chain_speculative_sampling(q, ids + 64, torch.rand((2, 4, 64), device="cuda"))
    with pytest.raises(TypeError, match="maybe_output_accepted_token_num"):
        sampling.chain_speculative_sampling(q, ids, torch.rand((2, 4, 64), device="cuda"),
                                            torch.zeros(2, dtype=torch.int64, device="cuda"))
