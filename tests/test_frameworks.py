"""CuPy and JAX callers get their own framework's arrays back; DLPack edge cases on the GPU. Interop
tests of torch and JAX callers are marked needs_torch / needs_jax: each skips on its own without its
framework, and the CuPy tests run with CuPy alone."""
import math
import os
import subprocess
import sys

import cupy
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from fi_cupy._core import arrays
from fi_cupy._core import dtypes as dt
from tolerances import assert_close, assert_lse_close

try:
    import torch
except ImportError:
    torch = None
try:
    import jax
    import jax.numpy as jnp
except ImportError:
    jax = jnp = None

pytestmark = pytest.mark.gpu
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (interop test)")
needs_jax = pytest.mark.skipif(jax is None, reason="needs JAX (interop test)")


def _paged(xp_from_numpy, rng, lens, ps=16, hq=16, hkv=4, d=128, dtype=np.float16):
    npg = [math.ceil(n / ps) for n in lens]
    total = sum(npg) + 2
    perm = rng.permutation(total).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(npg)]).astype(np.int32)
    last = np.array([n - (p - 1) * ps if p else 0 for n, p in zip(lens, npg)], np.int32)
    cache = rng.standard_normal((total, 2, ps, hkv, d)).astype(dtype)
    q = rng.standard_normal((len(lens), hq, d)).astype(dtype)
    ref = []
    for r, n in enumerate(lens):
        kv = cache[perm[indptr[r]: indptr[r + 1]]].astype(np.float64).transpose(1, 0, 2, 3, 4)
        kv = kv.reshape(2, -1, hkv, d)[:, :n]
        ref.append(reference.decode_attention(q[r].astype(np.float64), kv[0], kv[1]))
    return (xp_from_numpy(q), xp_from_numpy(cache), indptr, perm[: indptr[-1]], last,
            np.stack([o for o, _ in ref]), np.stack([lse for _, lse in ref]))


def test_cupy_caller_gets_cupy_arrays():
    rng = np.random.default_rng(0)
    q, cache, indptr, idx, last, ro, rl = _paged(cupy.asarray, rng, [1, 100, 0, 2000])
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cupy.empty(64 << 20, dtype=cupy.uint8))
    w.plan(indptr, idx, last, 16, 4, 128, 16, q_data_type=cupy.float16)
    out = cupy.full(q.shape, cupy.nan, dtype=cupy.float16)
    o, lse = w.run(q, cache, out=out, return_lse=True)
    assert o is out and isinstance(lse, cupy.ndarray) and lse.dtype == cupy.float32
    assert_close(cupy.asnumpy(o), ro, "float16")
    assert_lse_close(cupy.asnumpy(lse), rl)
    o2 = w.run(q, cache)  # allocated output
    assert isinstance(o2, cupy.ndarray) and o2.dtype == cupy.float16
    assert_close(cupy.asnumpy(o2), ro, "float16")


def test_cupy_on_a_non_default_stream():
    rng = np.random.default_rng(1)
    q, cache, indptr, idx, last, ro, _ = _paged(cupy.asarray, rng, [3000, 5])
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cupy.empty(64 << 20, dtype=cupy.uint8))
    w.plan(indptr, idx, last, 16, 4, 128, 16, q_data_type="float16")
    w.run(q, cache)  # compile outside the timed region
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        q2 = cupy.zeros_like(q)
        x = cupy.ones((4096, 4096), cupy.float32)
        for _ in range(10):
            x = x @ x / 4096.0
        q2[...] = q
        o = w.run(q2, cache)
    s.synchronize()
    assert_close(cupy.asnumpy(o), ro, "float16")


@needs_jax
def test_jax_caller_gets_jax_arrays_and_inputs_stay_unchanged():
    rng = np.random.default_rng(2)
    for dtype, name in ((np.float16, "float16"), (jnp.bfloat16, "bfloat16")):
        q, cache, indptr, idx, last, ro, rl = _paged(jnp.asarray, rng, [7, 900, 0], dtype=dtype)
        q_before = np.asarray(q.astype(jnp.float32))
        ws = jnp.zeros((32 << 20,), jnp.uint8)
        w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(indptr, idx, last, 16, 4, 128, 16, q_data_type=q.dtype)
        o, lse = w.run(q, cache, return_lse=True)
        assert isinstance(o, jax.Array) and o.dtype == q.dtype and o.shape == q.shape
        assert isinstance(lse, jax.Array) and lse.dtype == jnp.float32
        assert_close(np.asarray(o.astype(jnp.float32)), ro, name)
        assert_lse_close(np.asarray(lse), rl)
        assert np.array_equal(np.asarray(q.astype(jnp.float32)), q_before)
        # JAX keeps computing on the result
        assert np.isfinite(float(jnp.sum(o.astype(jnp.float32) * 2)))


@needs_jax
def test_jax_outputs_alive_at_exit():
    """JAX frees an output it still holds at exit while the interpreter tears fi_cupy's modules down: the
    DLPack deleter it calls must outlive them (a freed ctypes thunk made that exit a segfault)."""
    code = ("import jax.numpy as jnp, fi_cupy\n"
            "x = jnp.ones((4, 256), jnp.bfloat16)\n"
            "outs = [fi_cupy.rmsnorm(x, jnp.ones((256,), jnp.bfloat16)) for _ in range(3)]  # recorded, replayed\n"
            "o = fi_cupy.single_decode_with_kv_cache(jnp.ones((8, 64), jnp.float16), jnp.ones((9, 2, 64), jnp.float16),\n"
            "                                        jnp.ones((9, 2, 64), jnp.float16))\n"
            "print(float(outs[-1].astype(jnp.float32).sum()), o.shape)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "(8, 64)" in r.stdout


@needs_jax
def test_jax_single_decode():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((8, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((333, 2, 64)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((333, 2, 64)), jnp.bfloat16)
    o = fi_cupy.single_decode_with_kv_cache(q, k, v)
    assert isinstance(o, jax.Array)
    f64 = lambda x: np.asarray(x.astype(jnp.float32)).astype(np.float64)
    ro, _ = reference.decode_attention(f64(q), f64(k), f64(v))
    assert_close(f64(o), ro, "bfloat16")


def test_describe_edge_cases():
    a = cupy.arange(24, dtype=cupy.float32).reshape(2, 3, 4)
    info = arrays.describe(a, "a")
    assert info.shape == (2, 3, 4) and info.strides == (12, 4, 1) and info.dtype is dt.float32
    assert info.ptr == a.data.ptr and info.device == a.device.id and info.framework == "cupy"
    e = cupy.empty((0, 5), cupy.float16)
    ie = arrays.describe(e, "e")
    assert ie.shape == (0, 5) and ie.size == 0
    one = cupy.empty((4, 1, 8), cupy.float16)[:, :, :]
    assert arrays.describe(one, "one").is_contiguous()
    sl = arrays.describe(a[:, 1:, ::2], "sl")
    assert sl.strides == (12, 4, 2) and sl.ptr == a.data.ptr + 16


@needs_torch
def test_describe_torch_bf16_and_fp8():
    for tdt, d in ((torch.bfloat16, dt.bfloat16), (torch.float8_e4m3fn, dt.float8_e4m3fn),
                   (torch.float8_e5m2, dt.float8_e5m2), (torch.int64, dt.int64)):
        t = torch.zeros((3, 16), device="cuda").to(tdt)
        info = arrays.describe(t, "t")
        assert info.dtype is d and info.ptr == t.data_ptr() and info.framework == "torch"


@needs_torch
def test_explicit_stream_argument():
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn((8, 128), generator=g, device="cuda").half()
    k = torch.randn((500, 2, 128), generator=g, device="cuda").half()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    o = fi_cupy.single_decode_with_kv_cache(q, k, k, stream=s)
    s.synchronize()
    ro, _ = reference.decode_attention(q.double().cpu().numpy(), k.double().cpu().numpy(), k.double().cpu().numpy())
    assert_close(o.double().cpu().numpy(), ro, "float16")


@needs_torch
def test_fast_paths_match_dlpack():
    """torch and CuPy arrays are read from their own attributes: the same description as DLPack's."""
    base = torch.zeros((6, 1, 4, 32), device="cuda")
    cases = [base.bfloat16(), base.half()[:, :, 1:, ::2], base.to(torch.float8_e5m2), base.int()[2:],
             base[:, :, :, :16].transpose(0, 2)]
    c = cupy.zeros((5, 1, 8, 16), cupy.float16)
    for x in cases + [c, c[1:, :, ::2], c.transpose(2, 0, 1, 3)]:
        fast = arrays.describe(x, "x")
        slow = arrays.describe_dlpack(x, "x")
        for f in ("ptr", "shape", "strides", "dtype", "device", "framework"):
            assert getattr(fast, f) == getattr(slow, f), (f, getattr(fast, f), getattr(slow, f))
    with pytest.raises(ValueError, match="t: expected an array on a CUDA device, got one on CPU"):
        arrays.describe(torch.zeros(3), "t")
