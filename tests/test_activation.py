"""Gated activations on the GPU against float64 references, CuPy callers (inputs from
tests/gpu_arrays.py): every dtype and activation, odd widths, a stride on the token axis, NaN-poisoned
outputs."""
import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from gpu_arrays import DTYPES, dtype_name, f64, nan_like, rand
from tolerances import assert_close

pytestmark = pytest.mark.gpu

FNS = {"silu": fi_cupy.silu_and_mul, "gelu": fi_cupy.gelu_and_mul, "gelu_tanh": fi_cupy.gelu_tanh_and_mul}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(FNS))
@pytest.mark.parametrize("d", [1, 7, 4095, 14336])
def test_act_and_mul(dtype, act, d):
    x = rand((5, 2 * d), dtype, scale=3.0)
    out = nan_like(x[:, :d])  # a new contiguous (5, d) array
    assert FNS[act](x, out=out) is out
    assert_close(f64(out), reference.act_and_mul(f64(x), act), dtype)


@pytest.mark.parametrize("tokens", [1, 65536])
def test_silu_token_counts(tokens):
    x = rand((tokens, 2 * 256), "bfloat16")
    got = fi_cupy.silu_and_mul(x)
    assert got.shape == (tokens, 256) and isinstance(got, cp.ndarray) and dtype_name(got) == "bfloat16"
    assert_close(f64(got), reference.act_and_mul(f64(x), "silu"), "bfloat16")


def test_strided_rows_and_3d():
    base = rand((6, 3000), "float16")
    x = base[:, 100:100 + 2 * 1024]  # rows 3000 apart, offset 100 elements
    assert_close(f64(fi_cupy.silu_and_mul(x)), reference.act_and_mul(f64(x), "silu"), "float16")
    y = rand((2, 3, 64), "float32")
    assert_close(f64(fi_cupy.gelu_and_mul(y)), reference.act_and_mul(f64(y), "gelu"), "float32")


def test_large_negative_inputs_give_zero_not_nan():
    x = cp.full((1, 16), -1e4, dtype=cp.float32)
    got = f64(fi_cupy.silu_and_mul(x))
    assert not np.isnan(got).any() and np.all(np.abs(got) == 0)
