"""RoPE on the GPU against the float64 reference (fi_cupy.reference.rope), CuPy callers (inputs from
tests/gpu_arrays.py): pos_ids and ragged (indptr, offsets) positions, Llama 3.1 frequencies, a cos/sin
cache, partial rotary_dim, interleave, GQA head counts, in place and out of place, NaN-poisoned outputs.
JAX callers in one test."""
import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from gpu_arrays import DTYPES, bits, f64, rand, uniform
from tolerances import assert_close

try:
    import jax.numpy as jnp
except ImportError:  # JAX callers: one interop test
    jnp = None

needs_jax = pytest.mark.skipif(jnp is None, reason="needs JAX (interop test)")

pytestmark = pytest.mark.gpu


def _pos(n, high=65536, seed=0):
    return np.random.default_rng(seed).integers(0, high, n)


def _clone(x):
    """A copy of x in new memory (any dtype: bfloat16 is copied through its bits)."""
    return bits(x).copy().view(x.dtype)


def _equal(a, b) -> bool:
    """Same shape and values (as torch.equal: NaN unequal)."""
    return a.shape == b.shape and np.array_equal(f64(a), f64(b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,rotary_dim", [(64, None), (128, None), (128, 64), (256, None), (80, 48)])
@pytest.mark.parametrize("interleave", [False, True])
def test_rope_pos_ids(dtype, d, rotary_dim, interleave):
    q, k = rand((37, 32, d), dtype), rand((37, 8, d), dtype)
    pos = _pos(37)
    pos_t = cp.asarray(pos, dtype=cp.int32)
    qr, kr = fi_cupy.apply_rope_pos_ids(q, k, pos_t, rotary_dim=rotary_dim, interleave=interleave,
                                        rope_scale=2.0, rope_theta=5e5)
    inv = reference.rope_inv_freq(rotary_dim or d, 5e5, 2.0)
    for got, x in ((qr, q), (kr, k)):
        assert_close(f64(got), reference.rope(f64(x), pos, inv, rotary_dim, interleave), dtype)
    # In place gives the same values and leaves the pass-through dims alone.
    q2, k2 = _clone(q), _clone(k)
    assert fi_cupy.apply_rope_pos_ids_inplace(q2, k2, pos_t.astype(cp.int64), rotary_dim=rotary_dim,
                                              interleave=interleave, rope_scale=2.0, rope_theta=5e5) is None
    assert _equal(q2, qr) and _equal(k2, kr)


def test_rope_large_positions():
    """Angles past 4e5 rad take the double-precision reduction path."""
    q, k = rand((9, 2, 64), "float32"), rand((9, 1, 64), "float32")
    pos = np.array([0, 1, 399_999, 400_001, 1_000_003, 2_000_000, 8_000_000, 65_537, 3])
    qr, kr = fi_cupy.apply_rope_pos_ids(q, k, cp.asarray(pos, dtype=cp.int64))
    inv = reference.rope_inv_freq(64)
    assert_close(f64(qr), reference.rope(f64(q), pos, inv), "float32")
    assert_close(f64(kr), reference.rope(f64(k), pos, inv), "float32")


def test_rope_ragged_batch_with_empty_request():
    lens, offsets = [5, 0, 17, 1], np.array([0, 9, 100, 4000])
    indptr = np.concatenate([[0], np.cumsum(lens)])
    n = indptr[-1]
    q, k = rand((n, 8, 128), "bfloat16"), rand((n, 2, 128), "bfloat16")
    ip = cp.asarray(indptr, dtype=cp.int32)
    of = cp.asarray(offsets, dtype=cp.int32)
    qr, kr = fi_cupy.apply_rope(q, k, ip, of)
    pos = reference.ragged_positions(indptr, offsets)
    inv = reference.rope_inv_freq(128)
    assert_close(f64(qr), reference.rope(f64(q), pos, inv), "bfloat16")
    assert_close(f64(kr), reference.rope(f64(k), pos, inv), "bfloat16")
    fi_cupy.apply_rope_inplace(q, k, ip, of)
    assert _equal(q, qr) and _equal(k, kr)


@pytest.mark.parametrize("interleave", [False, True])
def test_llama31_rope(interleave):
    lens, offsets = [30, 3], np.array([70000, 12])
    indptr = np.concatenate([[0], np.cumsum(lens)])
    q, k = rand((33, 32, 128), "float16"), rand((33, 8, 128), "float16")
    ip = cp.asarray(indptr, dtype=cp.int64)
    of = cp.asarray(offsets, dtype=cp.int64)
    inv = reference.llama31_inv_freq(128, 5e5, 8.0, 1.0, 4.0, 8192)
    pos = reference.ragged_positions(indptr, offsets)
    qr, kr = fi_cupy.apply_llama31_rope(q, k, ip, of, interleave=interleave)
    assert_close(f64(qr), reference.rope(f64(q), pos, inv, interleave=interleave), "float16")
    assert_close(f64(kr), reference.rope(f64(k), pos, inv, interleave=interleave), "float16")
    pos_t = cp.asarray(pos, dtype=cp.int64)
    qp, kp = fi_cupy.apply_llama31_rope_pos_ids(q, k, pos_t, interleave=interleave)
    assert _equal(qp, qr) and _equal(kp, kr)
    fi_cupy.apply_llama31_rope_pos_ids_inplace(q, k, pos_t, interleave=interleave)
    assert _equal(q, qr) and _equal(k, kr)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [128, 64])
def test_cos_sin_cache(is_neox, rotary_dim):
    head, max_pos = 128, 4096
    inv = reference.rope_inv_freq(rotary_dim, 1e4)
    ang = np.arange(max_pos, dtype=np.float32)[:, None] * inv[None, :]
    cs = np.concatenate([np.cos(ang), np.sin(ang)], axis=1)
    cache = cp.asarray(cs)
    pos = _pos(21, max_pos)
    query, key = rand((21, 4 * head), "bfloat16"), rand((21, 2 * head), "bfloat16")
    qo, ko = fi_cupy.apply_rope_with_cos_sin_cache(cp.asarray(pos, dtype=cp.int64), query, key, head, cache,
                                                   is_neox=is_neox)
    for got, x, h in ((qo, query, 4), (ko, key, 2)):
        ref = reference.rope(f64(x).reshape(21, h, head), pos, rotary_dim=rotary_dim, interleave=not is_neox,
                             cos_sin=cs).reshape(21, h * head)
        assert_close(f64(got), ref, "bfloat16")
    fi_cupy.apply_rope_with_cos_sin_cache_inplace(cp.asarray(pos, dtype=cp.int64), query, key, head, cache,
                                                  is_neox=is_neox)
    assert _equal(query, qo) and _equal(key, ko)


def test_cos_sin_cache_position_outside_cache_gives_nan_rows():
    cache = uniform((16, 64))
    q, k = rand((3, 2, 64), "float32"), rand((3, 1, 64), "float32")
    pos = cp.asarray([0, 16, 5], dtype=cp.int64)
    qo, _ = fi_cupy.apply_rope_with_cos_sin_cache(pos, q, k, 64, cache)
    got = f64(qo)
    assert np.isnan(got[1]).all() and not np.isnan(got[[0, 2]]).any()


@needs_jax
def test_jax_inplace_returns_new_arrays():
    """Interop: JAX arrays are immutable."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((4, 2, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, 1, 64)), jnp.float32)
    pos = jnp.asarray([3, 1, 4, 1], jnp.int32)
    q0 = np.asarray(q)
    qr, kr = fi_cupy.apply_rope_pos_ids_inplace(q, k, pos)
    assert np.array_equal(np.asarray(q), q0)
    inv = reference.rope_inv_freq(64)
    assert_close(np.asarray(qr), reference.rope(q0, np.asarray(pos), inv), "float32")
    assert_close(np.asarray(kr), reference.rope(np.asarray(k), np.asarray(pos), inv), "float32")
