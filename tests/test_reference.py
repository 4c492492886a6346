"""The numpy references against independent formulations."""
import math

import numpy as np

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
