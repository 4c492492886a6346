"""merge_state / merge_state_in_place / merge_states on the GPU against the float64 reference, CuPy
callers (inputs from tests/gpu_arrays.py), including empty states (lse -inf): one empty state contributes
nothing, all empty give 0 and -inf. JAX callers in one test."""
import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from gpu_arrays import DTYPES, f64, rand, uniform
from tolerances import assert_close, assert_lse_close

try:
    import jax.numpy as jnp
except ImportError:  # JAX callers: one interop test
    jnp = None

needs_jax = pytest.mark.skipif(jnp is None, reason="needs JAX (interop test)")

pytestmark = pytest.mark.gpu


def _lse(shape, empty_frac=0.2):
    s = rand(shape, "float32", scale=4.0)
    s[uniform(shape) < empty_frac] = -np.inf
    return s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256, 100])
def test_merge_state(dtype, d):
    va, vb = rand((33, 8, d), dtype), rand((33, 8, d), dtype)
    sa, sb = _lse((33, 8)), _lse((33, 8))
    sa[0, 0] = sb[0, 0] = float("-inf")  # both empty
    v, s = fi_cupy.merge_state(va, sa, vb, sb)
    rv, rs = reference.merge_state(f64(va), f64(sa), f64(vb), f64(sb))
    assert_close(f64(v), rv, dtype)
    assert_lse_close(f64(s), rs)
    assert np.all(f64(v[0, 0]) == 0)


def test_merge_state_in_place_with_mask_and_strides():
    big = rand((20, 4, 2, 128), "bfloat16")
    v = big[:, :, 0]  # (seq, heads, d) with a head stride of 256
    s = _lse((20, 4))
    vo, so = rand((20, 4, 128), "bfloat16"), _lse((20, 4))
    mask = uniform((20,)) < 0.5
    v0, s0 = f64(v), f64(s)
    assert fi_cupy.merge_state_in_place(v, s, vo, so, mask=mask) is None
    rv, rs = reference.merge_state(v0, s0, f64(vo), f64(so))
    m = cp.asnumpy(mask)
    rv[~m], rs[~m] = v0[~m], s0[~m]
    assert_close(f64(v), rv, "bfloat16")
    assert_lse_close(f64(s), rs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 7])
def test_merge_states(dtype, n):
    v = rand((19, n, 4, 128), dtype)
    s = _lse((19, n, 4))
    s[3] = float("-inf")
    vm, sm = fi_cupy.merge_states(v, s)
    rv, rs = reference.merge_states(f64(v), f64(s))
    assert_close(f64(vm), rv, dtype)
    assert_lse_close(f64(sm), rs)


@needs_jax
def test_jax_in_place_returns_new_state():
    """Interop: JAX arrays are immutable."""
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.standard_normal((5, 2, 64)), jnp.float32)
    s = jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)
    vo = jnp.asarray(rng.standard_normal((5, 2, 64)), jnp.float32)
    so = jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)
    v0 = np.asarray(v)
    nv, ns = fi_cupy.merge_state_in_place(v, s, vo, so, mask=jnp.asarray([True, False, True, True, False]))
    assert np.array_equal(np.asarray(v), v0)
    rv, rs = reference.merge_state(v0, np.asarray(s), np.asarray(vo), np.asarray(so))
    keep = np.array([False, True, False, False, True])
    rv[keep], rs[keep] = v0[keep], np.asarray(s)[keep]
    assert_close(np.asarray(nv), rv, "float32")
    assert_lse_close(np.asarray(ns), rs)
