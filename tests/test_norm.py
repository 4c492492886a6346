"""Norms on the GPU against float64 references written as model code writes them (fi_cupy.reference):
every dtype, hidden sizes that are not multiples of the vector width, 1 to 65536 tokens, a stride on
the token axis, NaN-poisoned outputs."""
import numpy as np
import pytest

from fi_cupy import reference
from tolerances import assert_close
from torch_util import DTYPES, f64, nan_like, rand

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
import fi_cupy  # noqa: E402

HIDDEN = (1, 64, 4095, 4096, 5120, 8192, 70000)  # 70000: longer than a register-held row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("gemma", [False, True])
def test_rmsnorm(dtype, hidden, gemma):
    x = rand((7, hidden), dtype)
    w = rand((hidden,), dtype)
    out = nan_like(x)
    fn = fi_cupy.gemma_rmsnorm if gemma else fi_cupy.rmsnorm
    got = fn(x, w, eps=1e-5, out=out)
    assert got is out
    assert_close(f64(out), reference.rmsnorm(f64(x), f64(w), 1e-5, gemma), dtype)


@pytest.mark.parametrize("tokens", [1, 3, 65536])
def test_rmsnorm_token_counts_and_float32_weight(tokens):
    x = rand((tokens, 128), "bfloat16")
    w = rand((128,), "float32")
    got = fi_cupy.rmsnorm(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert_close(f64(got), reference.rmsnorm(f64(x), f64(w), 1e-6), "bfloat16")


def test_rmsnorm_3d_and_token_stride():
    base = rand((5, 3, 2 * 256), "float16")
    x = base[:, :, :256]  # (tokens, heads, hidden) rows 512 apart: one strided row axis
    w = rand((256,), "float16")
    got = fi_cupy.rmsnorm(x, w)
    assert_close(f64(got), reference.rmsnorm(f64(x), f64(w)), "float16")
    y = base[:, 0, 8:264]  # rows 1536 apart, base offset 8 elements
    assert_close(f64(fi_cupy.rmsnorm(y, w)), reference.rmsnorm(f64(y), f64(w)), "float16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 4095, 8192, 70000])
@pytest.mark.parametrize("gemma", [False, True])
def test_fused_add_rmsnorm(dtype, hidden, gemma):
    x, r, w = rand((9, hidden), dtype), rand((9, hidden), dtype), rand((hidden,), dtype)
    x0, r0 = f64(x), f64(r)
    fn = fi_cupy.gemma_fused_add_rmsnorm if gemma else fi_cupy.fused_add_rmsnorm
    assert fn(x, r, w, eps=1e-6) is None
    store = {"float16": np.float16, "float32": np.float32}.get(dtype)
    if store is None:
        import ml_dtypes
        store = ml_dtypes.bfloat16
    normed, summed = reference.fused_add_rmsnorm(x0, r0, f64(w), 1e-6, gemma, store)
    assert np.array_equal(f64(r), summed), "residual must hold input + residual rounded to its dtype"
    assert_close(f64(x), normed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 768, 4095, 70000])
def test_layernorm(dtype, hidden):
    x = rand((5, hidden), dtype, scale=3.0) + 2.0  # a mean far from 0
    g, b = rand((hidden,), "float32"), rand((hidden,), "float32")
    got = fi_cupy.layernorm(x, g, b, 1e-5)
    assert_close(f64(got), reference.layernorm(f64(x), f64(g), f64(b), 1e-5), dtype)


def test_zero_rows_and_cupy_caller():
    import cupy
    assert fi_cupy.rmsnorm(rand((0, 64)), rand((64,))).shape == (0, 64)
    x = cupy.random.standard_normal((4, 100), dtype=cupy.float32)
    w = cupy.random.standard_normal(100, dtype=cupy.float32)
    got = fi_cupy.rmsnorm(x, w)
    assert isinstance(got, cupy.ndarray)
    assert_close(cupy.asnumpy(got), reference.rmsnorm(cupy.asnumpy(x), cupy.asnumpy(w)), "float32")


def test_jax_fused_add_returns_new_arrays():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), dtype=jnp.float32)
    r = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64)), dtype=jnp.float32)
    w = jnp.ones(64, jnp.float32)
    x0, r0 = np.asarray(x), np.asarray(r)
    new_x, new_r = fi_cupy.fused_add_rmsnorm(x, r, w)
    assert np.array_equal(np.asarray(x), x0) and np.array_equal(np.asarray(r), r0), "JAX inputs were written"
    normed, summed = reference.fused_add_rmsnorm(x0, r0, np.ones(64), store_dtype=np.float32)
    assert_close(np.asarray(new_x), normed, "float32")
    assert_close(np.asarray(new_r), summed, "float32")
