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
    ref = np.exp(logits - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(probs.cpu().numpy(), ref, rtol=1e-4, atol=1e-9)
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


def test_softmax_temperature_per_row():
    x = torch.randn((3, 1000), device="cuda")
    t = torch.tensor([0.5, 1.0, 2.0], device="cuda")
    got = sampling.softmax(x, t).cpu().numpy()
    xs = x.cpu().numpy().astype(np.float64) / t.cpu().numpy()[:, None]
    ref = np.exp(xs - xs.max(1, keepdims=True))
    np.testing.assert_allclose(got, ref / ref.sum(1, keepdims=True), rtol=1e-4, atol=1e-9)


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
