"""Norms on the GPU against float64 references written as model code writes them (fi_cupy.reference),
CuPy callers (inputs from tests/gpu_arrays.py; bfloat16 as ml_dtypes arrays): every dtype, hidden sizes
that are not multiples of the vector width, 1 to 65536 tokens, a stride on the token axis, per-head q/k
norm on (tokens, heads, head_dim) views sliced out of a fused qkv buffer (in place, into a strided out=,
or into a new array), NaN-poisoned outputs. JAX callers in one test. CPU tests check the row addressing
(row_layout and the launch arguments) and its errors."""
import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import norm, reference
from fi_cupy._core import dtypes as dt
from fi_cupy._core import kernels
from fi_cupy._core.arrays import ArrayInfo, contiguous_strides
from fi_cupy._core.fastdiv import fastdiv_quot
from gpu_arrays import BF16, DTYPES, cast, dtype_name, empty, f64, host_dtype, nan_like, rand
from tolerances import assert_close

try:
    import jax.numpy as jnp
except ImportError:  # JAX callers: one interop test
    jnp = None

needs_jax = pytest.mark.skipif(jnp is None, reason="needs JAX (interop test)")

gpu = pytest.mark.gpu

HIDDEN = (1, 64, 4095, 4096, 5120, 8192, 70000)  # 70000: longer than a register-held row


@gpu
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


@gpu
@pytest.mark.parametrize("tokens", [1, 3, 65536])
def test_rmsnorm_token_counts_and_float32_weight(tokens):
    x = rand((tokens, 128), "bfloat16")
    w = rand((128,), "float32")
    got = fi_cupy.rmsnorm(x, w)
    assert isinstance(got, cp.ndarray) and dtype_name(got) == "bfloat16" and got.shape == x.shape
    assert_close(f64(got), reference.rmsnorm(f64(x), f64(w), 1e-6), "bfloat16")


@gpu
def test_rmsnorm_3d_and_token_stride():
    base = rand((5, 3, 2 * 256), "float16")
    x = base[:, :, :256]  # (tokens, heads, hidden) rows 512 apart: one strided row axis
    w = rand((256,), "float16")
    got = fi_cupy.rmsnorm(x, w)
    assert_close(f64(got), reference.rmsnorm(f64(x), f64(w)), "float16")
    y = base[:, 0, 8:264]  # rows 1536 apart, base offset 8 elements
    assert_close(f64(fi_cupy.rmsnorm(y, w)), reference.rmsnorm(f64(y), f64(w)), "float16")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 4095, 8192, 70000])
@pytest.mark.parametrize("gemma", [False, True])
def test_fused_add_rmsnorm(dtype, hidden, gemma):
    x, r, w = rand((9, hidden), dtype), rand((9, hidden), dtype), rand((hidden,), dtype)
    x0, r0 = f64(x), f64(r)
    fn = fi_cupy.gemma_fused_add_rmsnorm if gemma else fi_cupy.fused_add_rmsnorm
    assert fn(x, r, w, eps=1e-6) is None
    normed, summed = reference.fused_add_rmsnorm(x0, r0, f64(w), 1e-6, gemma, host_dtype(dtype))
    assert np.array_equal(f64(r), summed), "residual must hold input + residual rounded to its dtype"
    assert_close(f64(x), normed, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 768, 4095, 70000])
def test_layernorm(dtype, hidden):
    x = cast(rand((5, hidden), "float32", scale=3.0) + np.float32(2.0), dtype)  # a mean far from 0
    g, b = rand((hidden,), "float32"), rand((hidden,), "float32")
    got = fi_cupy.layernorm(x, g, b, 1e-5)
    assert_close(f64(got), reference.layernorm(f64(x), f64(g), f64(b), 1e-5), dtype)


@gpu
def test_zero_rows_and_cupy_caller():
    assert fi_cupy.rmsnorm(rand((0, 64)), rand((64,))).shape == (0, 64)
    x = cp.random.standard_normal((4, 100), dtype=cp.float32)
    w = cp.random.standard_normal(100, dtype=cp.float32)
    got = fi_cupy.rmsnorm(x, w)
    assert isinstance(got, cp.ndarray)
    assert_close(cp.asnumpy(got), reference.rmsnorm(cp.asnumpy(x), cp.asnumpy(w)), "float32")


@gpu
@needs_jax
def test_jax_fused_add_returns_new_arrays():
    """Interop: JAX arrays are immutable."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), dtype=jnp.float32)
    r = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64)), dtype=jnp.float32)
    w = jnp.ones(64, jnp.float32)
    x0, r0 = np.asarray(x), np.asarray(r)
    new_x, new_r = fi_cupy.fused_add_rmsnorm(x, r, w)
    assert np.array_equal(np.asarray(x), x0) and np.array_equal(np.asarray(r), r0), "JAX inputs were written"
    normed, summed = reference.fused_add_rmsnorm(x0, r0, np.ones(64), store_dtype=np.float32)
    assert_close(np.asarray(new_x), normed, "float32")
    assert_close(np.asarray(new_r), summed, "float32")


# ---------------------------------------------------------------------------------------------
# Per-head q/k norm on views of a fused qkv buffer (Qwen3, Gemma 3): two row axes, (tokens, heads)

OUT_MODES = ("new", "strided", "in_place")


def _nan_buffer(shape, dtype):
    return nan_like(empty(shape, dtype))


def _heads(buf, col, heads, d):
    """buf[:, col:col + heads * d] as (tokens, heads, d): a view whose rows do not collapse into one axis
    (as_strided, so that no reshape can copy it)."""
    item = buf.itemsize
    return cp.lib.stride_tricks.as_strided(buf[:, col:], (buf.shape[0], heads, d), (buf.strides[0], d * item, item))


def _bits(x):
    """A copy of the raw bits, on the device: NaN compares equal to itself (and no math on bfloat16)."""
    return x.view({2: cp.int16, 4: cp.int32}[x.itemsize]).copy()


def _equal(a, b) -> bool:
    return bool(cp.array_equal(a, b))


def _same_outside(a, b, lo: int, hi: int) -> bool:
    """Whether the bits of two (tokens, width) buffers agree outside columns lo:hi."""
    return _equal(a[:, :lo], b[:, :lo]) and _equal(a[:, hi:], b[:, hi:])


def _check_head_norm(fn, qkv, col, heads, d, w, out_mode, dtype, gemma, eps=1e-6):
    """Normalise the `heads` heads at column `col` of the fused buffer `qkv` (rows strided by its
    width) as out_mode says; check the result and that no byte outside the written view changed."""
    x = _heads(qkv, col, heads, d)
    want = reference.rmsnorm(f64(x), f64(w), eps, gemma)
    qkv_before = _bits(qkv)
    span = (col, col + heads * d)
    if out_mode == "new":
        got = fn(x, w, eps=eps)
        assert got.shape == x.shape
        assert _equal(_bits(qkv), qkv_before), "input buffer written"
    elif out_mode == "strided":  # another fused buffer: its own width, the view at another column
        obuf = _nan_buffer((qkv.shape[0], qkv.shape[1] + 2 * d), dtype)
        ocol = col + d
        out = _heads(obuf, ocol, heads, d)
        obuf_before = _bits(obuf)
        got = fn(x, w, eps=eps, out=out)
        assert got is out
        assert _equal(_bits(qkv), qkv_before), "input buffer written"
        assert _same_outside(_bits(obuf), obuf_before, ocol, ocol + heads * d), "out buffer written outside out"
    else:
        got = fn(x, w, eps=eps, out=x)
        assert got is x
        assert _same_outside(_bits(qkv), qkv_before, *span), "qkv buffer written outside the normalised heads"
    assert_close(f64(got), want, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads", [1, 8, 32, 40])
@pytest.mark.parametrize("out_mode", OUT_MODES)
def test_qk_norm_on_fused_qkv_views(dtype, head_dim, heads, out_mode):
    """q and k of a fused qkv projection, normalised per head (rmsnorm and gemma_rmsnorm). Tokens 0, 1
    (one row axis left: the 2-D path), 7 and 1000; weight in float32 for half the head counts."""
    kv_heads = max(1, heads // 4)
    wdtype = "float32" if heads in (8, 40) else dtype
    for tokens in (0, 1, 7, 1000):
        for gemma in (False, True):
            fn = fi_cupy.gemma_rmsnorm if gemma else fi_cupy.rmsnorm
            qkv = rand((tokens, (heads + 2 * kv_heads) * head_dim), dtype)
            for col, h in ((0, heads), (heads * head_dim, kv_heads)):  # q, then k
                w = rand((head_dim,), wdtype)
                _check_head_norm(fn, qkv, col, h, head_dim, w, out_mode, dtype, gemma)


@gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("out_mode", OUT_MODES)
def test_qk_norm_cupy_views(dtype, out_mode):
    """The same checks with inputs made by CuPy's own generator and cast (no gpu_arrays helper), one weight
    for rmsnorm and gemma_rmsnorm."""
    tokens, heads, kv_heads, d = 7, 8, 2, 128
    qkv = cp.random.default_rng(7).standard_normal((tokens, (heads + 2 * kv_heads) * d), "float32").astype(dtype)
    for col, h in ((0, heads), (heads * d, kv_heads)):
        w = cp.asarray(np.random.default_rng(h).standard_normal(d), dtype)
        _check_head_norm(fi_cupy.rmsnorm, qkv, col, h, d, w, out_mode, dtype, False)
        _check_head_norm(fi_cupy.gemma_rmsnorm, qkv, col, h, d, w, out_mode, dtype, True)


@gpu
@pytest.mark.parametrize("out_mode", OUT_MODES)
def test_two_row_axes_long_rows(out_mode):
    """Rows too long for registers (the fallback that reads a row again) on two row axes."""
    hidden = 70000
    buf = rand((3, 3 * hidden), "bfloat16")
    w = rand((hidden,), "bfloat16")
    _check_head_norm(fi_cupy.rmsnorm, buf, hidden, 2, hidden, w, out_mode, "bfloat16", False)


@gpu
def test_contiguous_input_into_strided_out_and_4d():
    """Input and out addressed by one shared layout although only out needs two axes; a 4-D view
    whose two leading dims collapse into the token axis."""
    x = rand((7, 8, 128), "float16")
    w = rand((128,), "float16")
    obuf = _nan_buffer((7, 12 * 128), "float16")
    out = _heads(obuf, 128, 8, 128)
    assert fi_cupy.rmsnorm(x, w, out=out) is out
    assert_close(f64(out), reference.rmsnorm(f64(x), f64(w)), "float16")
    assert np.isnan(f64(obuf[:, :128])).all() and np.isnan(f64(obuf[:, 9 * 128:])).all()
    big = rand((2, 3, 16 * 64), "bfloat16")  # (batch, seq, fused heads): q = the first 8 heads
    item = big.itemsize  # strides (3072, 1024, 64, 1) elements: batch and seq collapse
    q = cp.lib.stride_tricks.as_strided(big, (2, 3, 8, 64), (big.strides[0], big.strides[1], 64 * item, item))
    w = rand((64,), "float32")
    want = reference.rmsnorm(f64(q), f64(w), 1e-6, True)
    fi_cupy.gemma_rmsnorm(q, w, out=q)
    assert_close(f64(q), want, "bfloat16")


@gpu
@pytest.mark.parametrize("gemma", [False, True])
def test_fused_add_and_layernorm_on_head_views(gemma):
    """The fused add (input and residual each a strided head view, updated in place) and layernorm
    read rows through the same two-axis addressing."""
    tokens, heads, d = 9, 8, 128
    xbuf = rand((tokens, 12 * d), "bfloat16")
    rbuf = rand((tokens, 10 * d), "bfloat16")
    x, r = _heads(xbuf, 0, heads, d), _heads(rbuf, 2 * d, heads, d)
    w = rand((d,), "bfloat16")
    x0, r0, xbits, rbits = f64(x), f64(r), _bits(xbuf), _bits(rbuf)
    fn = fi_cupy.gemma_fused_add_rmsnorm if gemma else fi_cupy.fused_add_rmsnorm
    assert fn(x, r, w) is None
    normed, summed = reference.fused_add_rmsnorm(x0, r0, f64(w), 1e-6, gemma, BF16)
    assert np.array_equal(f64(r), summed)
    assert_close(f64(x), normed, "bfloat16")
    assert _same_outside(_bits(xbuf), xbits, 0, heads * d), "input buffer written outside input"
    assert _same_outside(_bits(rbuf), rbits, 2 * d, 10 * d), "residual buffer written outside residual"
    g, b = rand((d,), "float32"), rand((d,), "float32")
    y = _heads(rand((tokens, 12 * d), "float16"), 4 * d, heads, d)
    assert_close(f64(fi_cupy.layernorm(y, g, b, 1e-5)), reference.layernorm(f64(y), f64(g), f64(b), 1e-5),
                 "float16")


# ---------------------------------------------------------------------------------------------
# CPU: the row addressing (row_layout, the launch arguments) and its errors


def _info(name, shape, strides=None, dtype=dt.bfloat16, ptr=1 << 20):
    return ArrayInfo(name, ptr, tuple(shape), tuple(strides or contiguous_strides(shape)), dtype, 0, "cupy")


QKV = (12 * 128, 128, 1)  # q of a (tokens, (8 + 2 * 2) * 128) fused buffer: 8 heads of 128


@pytest.mark.parametrize("shape, strides, want", [
    ((7, 128), [None], (7, 1, [(128, 0)])),
    ((7, 128), [(300, 1)], (7, 1, [(300, 0)])),                          # a stride on the token axis
    ((128,), [None], (1, 1, [(0, 0)])),
    ((7, 8, 128), [None, None], (56, 1, [(128, 0), (128, 0)])),         # contiguous: one axis
    ((7, 8, 128), [QKV, QKV], (56, 8, [(1536, 128), (1536, 128)])),     # q view, in place
    ((7, 8, 128), [QKV, None], (56, 8, [(1536, 128), (1024, 128)])),    # q view into a new array
    ((1, 8, 128), [QKV], (8, 1, [(128, 0)])),                           # one token: one axis (heads)
    ((7, 1, 128), [(384, 128, 1)], (7, 1, [(384, 0)])),                 # one head: one axis (tokens)
    ((2, 3, 8, 64), [(3072, 1024, 64, 1)], (48, 8, [(1024, 64)])),      # batch and seq collapse
    ((1, 7, 1, 8, 128), [(5, 1536, 3, 128, 1)], (56, 8, [(1536, 128)])),  # size-1 dims drop
    ((0, 8, 128), [(1, 5, 1), None], (0, 1, [(0, 0), (0, 0)])),         # empty: strides do not matter
])
def test_row_layout(shape, strides, want):
    infos = [_info(f"a{k}", shape, s) for k, s in enumerate(strides)]
    assert norm.row_layout(infos) == want
    assert norm.row_layout(infos + [None])[2][-1] == (0, 0)


@pytest.mark.parametrize("shape, strides", [
    ((7, 8, 128), QKV), ((1000, 40, 64), (56 * 64, 64, 1)), ((1000, 40, 64), None), ((5, 3, 4, 64), (1536, 512, 64, 1)),
    ((3, 2, 70000), (9 * 70000, 70000, 1)), ((33, 3, 16), (100, 32, 1)),
])
def test_kernel_row_addresses_match_the_arrays(shape, strides):
    """Row r as the kernel computes it (FastDiv quotient by heads, two strides) lands on the r-th row
    of the array in C order, for every row."""
    info = _info("input", shape, strides)
    rows, heads, ((s0, s1),) = norm.row_layout([info])
    _, mul, shift = norm.fastdiv_params(heads)
    r = np.arange(rows)
    t = np.array([fastdiv_quot(int(i), mul, shift) for i in r]) if heads > 1 else r
    got = t * s0 + (r - t * heads) * s1
    idx = np.indices(shape[:-1]).reshape(len(shape) - 1, -1)
    want = (idx * np.array(info.strides[:-1])[:, None]).sum(0)
    assert np.array_equal(got, want)


def test_rmsnorm_launch_arguments(monkeypatch):
    """The host side end to end, without a GPU: the strides, head count and FastDiv constants reach
    the kernel in its argument order (norm.cu), and the 2-D path gets heads 1."""
    launched = []
    monkeypatch.setattr(kernels, "cached_function", lambda dev, key, build: key)
    monkeypatch.setattr(kernels, "launch", lambda fn, grid, block, args, *a, **k: launched.append((grid, block, args)))
    q = _info("input", (7, 8, 128), QKV)
    w = _info("weight", (128,), ptr=1 << 24)
    assert fi_cupy.rmsnorm(q, w, out=q, stream=0, enable_pdl=False) is q
    out = _info("out", (7, 8, 128), (14 * 128, 128, 1), ptr=1 << 26)
    fi_cupy.rmsnorm(q, w, out=out, stream=0, enable_pdl=False)
    fi_cupy.rmsnorm(_info("input", (7, 128)), w, out=_info("out", (7, 128), (256, 1)), stream=0, enable_pdl=False)
    names = ("in", "in_s0", "in_s1", "res", "res_s0", "res_s1", "res_out", "res_out_s0", "res_out_s1", "weight",
             "bias", "out", "out_s0", "out_s1", "rows", "heads", "heads_mul", "heads_shift", "hidden", "eps")
    (g1, b1, a1), (_, _, a2), (_, _, a3) = launched
    a1, a2, a3 = (dict(zip(names, map(int, a))) for a in (a1, a2, a3))
    assert g1 == (14,) and b1 == (32, 4)  # 56 rows of 16 vectors: 32 threads a row, 4 rows a CTA
    assert a1["in"] == a1["out"] == 1 << 20 and a1["res"] == a1["res_out"] == 0
    assert (a1["in_s0"], a1["in_s1"], a1["out_s0"], a1["out_s1"]) == (1536, 128, 1536, 128)
    assert (a1["rows"], a1["heads"], a1["heads_mul"], a1["heads_shift"], a1["hidden"]) == (56, 8, 1, 3, 128)
    assert (a2["out"], a2["out_s0"], a2["out_s1"]) == (1 << 26, 1792, 128)
    assert (a3["rows"], a3["heads"], a3["in_s0"], a3["in_s1"], a3["out_s0"], a3["out_s1"]) == (7, 1, 128, 0, 256, 0)


@pytest.mark.parametrize("call, match", [
    (lambda w: fi_cupy.rmsnorm(_info("input", (2, 3, 4, 64), (10000, 1000, 128, 1)), w, stream=0),
     r"^input: its leading dims \(2, 3, 4\) with strides \(10000, 1000, 128\) do not collapse into at most two"),
    (lambda w: fi_cupy.gemma_rmsnorm(_info("input", (2, 3, 4, 64)), w, stream=0,
                                     out=_info("out", (2, 3, 4, 64), (10000, 1000, 64, 1))),
     r"^out: its leading dims .* do not collapse into at most two strided row axes"),
    (lambda w: fi_cupy.rmsnorm(_info("input", (2, 3, 4, 64), (2000, 256, 64, 1)), w, stream=0,
                               out=_info("out", (2, 3, 4, 64), (3072, 1024, 128, 1))),
     r"^out: its strides \(3072, 1024, 128\) and input's \(2000, 256, 64\) .* do not collapse together"),
    (lambda w: fi_cupy.fused_add_rmsnorm(_info("input", (2, 3, 4, 64), (2000, 256, 64, 1)),
                                         _info("residual", (2, 3, 4, 64), (3072, 1024, 128, 1)), w, stream=0),
     r"^residual: its strides \(3072, 1024, 128\) and input's \(2000, 256, 64\) .* do not collapse together"),
    (lambda w: fi_cupy.rmsnorm(_info("input", (7, 8, 64), (1536, 64, 1)), w, out=_info("out", (7, 512)), stream=0),
     r"^out: expected shape \(7, 8, 64\)"),
    (lambda w: fi_cupy.fused_add_rmsnorm(_info("input", (7, 8, 64)), _info("residual", (56, 64)), w, stream=0),
     r"^residual: expected shape \(7, 8, 64\)"),
    (lambda w: fi_cupy.rmsnorm(_info("input", (7, 8, 64), (1536, 64, 2)), w, stream=0), r"^input: the last dim"),
    (lambda w: fi_cupy.rmsnorm(_info("input", (7, 8, 64)), w, out=_info("out", (7, 8, 64), (1024, 128, 2)), stream=0),
     r"^out: the last dim"),
    (lambda w: fi_cupy.rmsnorm(_info("input", (7, 8, 64)), w, out=_info("out", (7, 8, 64), (0, 64, 1)), stream=0),
     r"^out: is written, so its elements must not overlap"),
    (lambda w: fi_cupy.rmsnorm(_info("input", (), ()), w, stream=0), r"^input: expected at least 1 dim"),
    (lambda w: fi_cupy.rmsnorm(_info("input", (2 ** 16, 2 ** 15, 64), (2 ** 21, 64, 1)), w, stream=0),
     r"^input: 2147483648 rows .* exceed"),
])
def test_row_layout_errors(call, match, monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("launched before the bad input was refused")
    monkeypatch.setattr(kernels, "launch", tripwire)
    with pytest.raises(ValueError, match=match):
        call(_info("weight", (64,), ptr=1 << 24))
