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


# ---------------------------------------------------------------------------------------------
# Regressions found by the fuzz suite (tests/fuzz_ops.py): -inf logits, small vocabularies, low floors


def _strided(x, pad=3, off=1):
    """x in rows `vocab + pad` floats apart from `off` (NaN around): 4-byte aligned rows, so VEC 1."""
    base = torch.full((x.shape[0], x.shape[1] + pad), float("nan"), device="cuda")
    base[:, off:off + x.shape[1]] = x
    return base[:, off:off + x.shape[1]]


def _partly_inf(batch, vocab, seed):
    """Rows partly -inf as the fuzz suite masks them (a share of 5..95% of each row, the last token kept
    finite), and rows whose first 4096 tokens (every thread's first slots on the two-pass kernel, a
    ring CTA's first, held chunk) or first half (a ring cluster's first CTAs' whole slices) are -inf."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn((batch, vocab), device="cuda", generator=g) * 4
    share = torch.linspace(0.05, 0.95, batch, device="cuda")[:, None]
    x = torch.where(torch.rand((batch, vocab), device="cuda", generator=g) < share, float("-inf"), x)
    x[0, :4096] = float("-inf")
    x[1, : vocab // 2] = float("-inf")
    x[:, -1] = 1.0  # never a whole row
    return x


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
                "per_row": (torch.linspace(0.2, 2.0, batch, device="cuda"), None)}[temperature]
    if temperature == "per_row":
        t_ref = t.cpu().numpy()
    got = sampling.softmax(_strided(x) if path == "two_pass_strided" else x, t).cpu().numpy()
    assert not np.isnan(got).any(), f"NaN in rows {np.flatnonzero(np.isnan(got).any(1)).tolist()}"
    np.testing.assert_allclose(got, reference.softmax(x.cpu().numpy(), t_ref), rtol=1e-4, atol=1e-9)


def _check_mask(got, x, ks):
    got, x = got.cpu().numpy(), x.cpu().numpy()
    for r in range(x.shape[0]):
        want = reference.top_k_mask_logits(x[r], int(ks[r])).astype(np.float32)
        bad = got[r] != want
        assert not bad.any(), f"row {r} (top_k {int(ks[r])}): {int(bad.sum())} of {x.shape[1]} logits differ"


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("vocab", [7, 8, 9])
def test_top_k_mask_logits_small_vocab(vocab, strided):
    """With fewer logits >= 0 than k, the count pass also counted the zeros its unloaded slots hold (a
    vocab of 7 to 9 leaves most of the 1024 threads without a token), so the k-th largest seemed to be
    0, fewer than k candidates were gathered and nothing was masked (fuzz: vocab 8 top_k 6, 9 / 8,
    7 / 5). Every k from 0 to vocab, per row; rows mixed, all negative, partly -inf; VEC 4 at vocab 8."""
    g = torch.Generator(device="cuda").manual_seed(vocab)
    rows = 3 * (vocab + 1)
    x = torch.randn((rows, vocab), device="cuda", generator=g) * 2
    x[vocab + 1:2 * (vocab + 1)] = -x[vocab + 1:2 * (vocab + 1)].abs() - 0.5
    x[2 * (vocab + 1):, ::3] = float("-inf")
    ks = torch.arange(rows, device="cuda", dtype=torch.int32) % (vocab + 1)
    xs = _strided(x) if strided else x
    _check_mask(sampling.top_k_mask_logits(xs, ks), x, ks.cpu().numpy())
    _check_mask(sampling.top_k_mask_logits(xs, vocab - 2), x, np.full(rows, vocab - 2))
    row = torch.tensor([[-1.5, 0.5, -0.25, 2.0, -3.0, 1.0, -0.75, -2.0, 0.125][:vocab]], device="cuda")
    _check_mask(sampling.top_k_mask_logits(row, vocab - 2), row, [vocab - 2])


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
    g = torch.Generator(device="cuda").manual_seed(vocab + k)
    x = torch.randn((batch, vocab), device="cuda", generator=g) * 2.5
    x[1::2] = torch.round(x[1::2])
    share = torch.tensor(shares, device="cuda")[:, None]
    x = torch.where(torch.rand((batch, vocab), device="cuda", generator=g) < share, low, x)
    x[:, vocab // 3] = 1.0
    ks = np.full(batch, k)
    _check_mask(sampling.top_k_mask_logits(x, k), x, ks)
    _check_mask(sampling.top_k_mask_logits(_strided(x), k), x, ks)


def test_top_k_mask_logits_k_above_the_non_nan_count():
    """k between the row's non-NaN count and vocab, with more candidates than shared memory takes: the
    radix select found no bin, built the key prefix 0 (a NaN's) and masked every logit."""
    vocab = 20000
    g = torch.Generator(device="cuda").manual_seed(20)
    x = torch.randn((4, vocab), device="cuda", generator=g) * 3
    x[:, 100:110] = float("nan")  # 19990 numbers a row
    ks = torch.tensor([vocab - 1, vocab - 5, vocab - 10, vocab - 11], device="cuda", dtype=torch.int32)
    _check_mask(sampling.top_k_mask_logits(x, ks), x, ks.cpu().numpy())


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
    pt = torch.as_tensor(p, device="cuda")
    got = sampling.top_k_renorm_probs(pt, k).cpu().numpy()
    for r in range(4):
        want = reference.filtered_distribution(p[r].astype(np.float64), top_k=k)
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-9, err_msg=f"row {r}")
    tok = sampling.top_k_sampling_from_probs(pt, k, seed=5).cpu().numpy()
    assert np.all(p[np.arange(4), tok] > 0), f"drew tokens of probability 0: {tok.tolist()}"


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
    got = sampling.top_k_top_p_sampling_from_logits(
        torch.as_tensor(logits, device="cuda"), 5, 0.7, indices=torch.zeros(N, dtype=torch.int32, device="cuda"),
        filter_apply_order=order, seed=21, offset=3).cpu().numpy()
    assert np.all(q[got] > 0), f"drew tokens outside the filtered support: {np.unique(got[q[got] <= 0]).tolist()}"
    stat, crit = _chi2_ok(_cells(got, pos, vocab), np.append(q[pos], 0.0), N)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}"


def test_samplers_from_logits_partly_inf_strided():
    """The fuzz case's shape: vocab 19609, strided rows partly -inf, top_k 113, top_p 0.928 (joint and
    top_k_first); and Gumbel-max sampling_from_logits on the same rows. No token has a -inf logit, and
    each lies in the reference's top-k set."""
    batch, vocab, k, top_p = 7, 19609, 113, 0.928
    x = _partly_inf(batch, vocab, seed=1618)
    xs, x64 = _strided(x, pad=2, off=1), x.double().cpu().numpy()
    probs = reference.softmax(x64)
    draws = {"gumbel": sampling.sampling_from_logits(xs, seed=3, offset=1)}
    for order in ("joint", "top_k_first"):
        draws[order] = sampling.top_k_top_p_sampling_from_logits(xs, k, top_p, filter_apply_order=order, seed=3,
                                                                 offset=1)
    for name, tok in draws.items():
        tok = tok.cpu().numpy()
        assert np.all(np.isfinite(x64[np.arange(batch), tok])), f"{name}: drew -inf logits: {tok.tolist()}"
        if name != "gumbel":
            assert all(reference.top_k_mask(probs[r], k)[tok[r]] for r in range(batch)), name
