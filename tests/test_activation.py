"""Gated activations on the GPU against float64 references: every dtype and activation, odd widths,
a stride on the token axis, NaN-poisoned outputs."""
import pytest

from fi_cupy import reference
from tolerances import assert_close
from torch_util import DTYPES, f64, nan_like, rand

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
import fi_cupy  # noqa: E402

FNS = {"silu": fi_cupy.silu_and_mul, "gelu": fi_cupy.gelu_and_mul, "gelu_tanh": fi_cupy.gelu_tanh_and_mul}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(FNS))
@pytest.mark.parametrize("d", [1, 7, 4095, 14336])
def test_act_and_mul(dtype, act, d):
    x = rand((5, 2 * d), dtype, scale=3.0)
    out = nan_like(x[:, :d].contiguous())
    assert FNS[act](x, out=out) is out
    assert_close(f64(out), reference.act_and_mul(f64(x), act), dtype)


@pytest.mark.parametrize("tokens", [1, 65536])
def test_silu_token_counts(tokens):
    x = rand((tokens, 2 * 256), "bfloat16")
    got = fi_cupy.silu_and_mul(x)
    assert got.shape == (tokens, 256) and got.dtype == torch.bfloat16
    assert_close(f64(got), reference.act_and_mul(f64(x), "silu"), "bfloat16")


def test_strided_rows_and_3d():
    base = rand((6, 3000), "float16")
    x = base[:, 100:100 + 2 * 1024]  # rows 3000 apart, offset 100 elements
    assert_close(f64(fi_cupy.silu_and_mul(x)), reference.act_and_mul(f64(x), "silu"), "float16")
    y = rand((2, 3, 64), "float32")
    assert_close(f64(fi_cupy.gelu_and_mul(y)), reference.act_and_mul(f64(y), "gelu"), "float32")


def test_large_negative_inputs_give_zero_not_nan():
    x = torch.full((1, 16), -1e4, device="cuda", dtype=torch.float32)
    got = fi_cupy.silu_and_mul(x)
    assert not torch.isnan(got).any() and torch.all(got.abs() == 0)
