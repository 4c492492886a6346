"""append_paged_kv_cache, get_seq_lens and get_batch_indices_positions on the GPU (CuPy callers): appended
rows land in the right page and slot of a shuffled page table, and nothing else in the cache changes (the
whole cache is compared before and after, as bytes); fp8 caches (CuPy: their bytes as uint8, appended as
bytes), both layouts, a (k, v) pair; bad indices raise. torch float8 tensors and the JAX caller's new cache
are interop tests."""
import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from gpu_arrays import FP8, bits, rand

try:
    import torch
except ImportError:
    torch = None

pytestmark = pytest.mark.gpu
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (interop test)")


def _table(kv_lens, page_size, spare=5, seed=0):
    rng = np.random.default_rng(seed)
    pages = [-(-n // page_size) for n in kv_lens]
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    indices = rng.permutation(indptr[-1] + spare)[: indptr[-1]].astype(np.int32)
    last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)], np.int32)
    return indptr, indices, last, indptr[-1] + spare


def _cuda(a, dtype=np.int32):
    return cp.asarray(np.asarray(a).astype(dtype))


def _u8(x) -> np.ndarray:
    """x's bytes on the host (CuPy or numpy, any layout and float type, float8 bytes included)."""
    return np.ascontiguousarray(cp.asnumpy(bits(x))).view(np.uint8)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("as_tuple", [False, True])
def test_append_matches_reference_and_touches_nothing_else(dtype, layout, as_tuple):
    page_size, hkv, d = 16, 8, 128
    old = [0, 17, 31, 5]      # tokens already cached
    new = [7, 1, 33, 0]       # tokens appended now
    kv_lens = [a + b for a, b in zip(old, new)]
    indptr, indices, last, num_pages = _table(kv_lens, page_size)
    shape = (num_pages, 2, page_size, hkv, d) if layout == "NHD" else (num_pages, 2, hkv, page_size, d)
    cache = rand(shape, dtype)  # float8: uint8 bytes, appended to as bytes by the same kernel
    before = cp.asnumpy(bits(cache))
    app_indptr = _cuda(np.concatenate([[0], np.cumsum(new)]))
    seq_lens = fi_cupy.get_seq_lens(_cuda(indptr), _cuda(last), page_size)
    assert cp.asnumpy(seq_lens).tolist() == kv_lens
    nnz = sum(new)
    bi, pos = fi_cupy.get_batch_indices_positions(app_indptr, seq_lens, nnz)
    exp_b = np.repeat(np.arange(4), new)
    exp_p = np.concatenate([np.arange(o, o + n) for o, n in zip(old, new)])
    assert cp.asnumpy(bi).tolist() == exp_b.tolist() and cp.asnumpy(pos).tolist() == exp_p.tolist()
    key = rand((nnz, hkv, d), dtype)
    val = rand((nnz, hkv, d), dtype)
    arg = (cache[:, 0], cache[:, 1]) if as_tuple else cache
    assert fi_cupy.append_paged_kv_cache(key, val, bi, pos, arg, _cuda(indices), _cuda(indptr), _cuda(last),
                                         kv_layout=layout) is None
    ck, cv = reference.append_paged_kv(_u8(before[:, 0]), _u8(before[:, 1]), _u8(key), _u8(val), exp_b, exp_p,
                                       indices, indptr, page_size, layout)
    assert np.array_equal(_u8(cache[:, 0]), ck) and np.array_equal(_u8(cache[:, 1]), cv)


@needs_torch
@pytest.mark.parametrize("dtype", FP8)
def test_append_torch_float8_cache(dtype):
    """torch float8 tensors (the dtype read from the tensor, not the bytes): the same bytes land."""
    page_size, hkv, d = 16, 2, 64
    indptr, indices, last, num_pages = _table([9, 20], page_size)
    tdt = getattr(torch, dtype)
    cache = torch.randn((num_pages, 2, page_size, hkv, d), device="cuda").to(tdt)
    before = cache.view(torch.uint8).cpu().numpy()
    key, val = (torch.randn((5, hkv, d), device="cuda").to(tdt) for _ in range(2))
    bi, pos = np.array([0, 0, 1, 1, 1]), np.array([7, 8, 17, 18, 19])
    t32 = lambda a: torch.as_tensor(np.asarray(a, np.int32), device="cuda")  # noqa: E731
    fi_cupy.append_paged_kv_cache(key, val, t32(bi), t32(pos), cache, t32(indices), t32(indptr), t32(last))
    u8 = lambda t: t.contiguous().view(torch.uint8).cpu().numpy()  # noqa: E731
    ck, cv = reference.append_paged_kv(before[:, 0], before[:, 1], u8(key), u8(val), bi, pos, indices, indptr,
                                       page_size)
    assert np.array_equal(u8(cache[:, 0]), ck) and np.array_equal(u8(cache[:, 1]), cv)


def test_strided_append_rows_and_int64_indices():
    page_size = 4
    indptr, indices, last, num_pages = _table([6], page_size)
    cache = rand((num_pages, 2, page_size, 2, 64), "float16")
    before = cp.asnumpy(cache)
    qkv = rand((6, 3, 2, 64), "float16")  # k and v are slices of a qkv buffer
    bi, pos = np.zeros(6, np.int64), np.arange(6)
    fi_cupy.append_paged_kv_cache(qkv[:, 1], qkv[:, 2], _cuda(bi, np.int64), _cuda(pos, np.int64), cache,
                                  _cuda(indices, np.int64), _cuda(indptr, np.int64), _cuda(last, np.int64))
    ck, cv = reference.append_paged_kv(_u8(before[:, 0]), _u8(before[:, 1]), _u8(qkv[:, 1]), _u8(qkv[:, 2]), bi,
                                       pos, indices, indptr, page_size)
    assert np.array_equal(_u8(cache[:, 0]), ck) and np.array_equal(_u8(cache[:, 1]), cv)


def test_out_of_range_indices_raise_or_are_skipped():
    page_size = 4
    indptr, indices, last, num_pages = _table([5, 3], page_size)
    cache = rand((num_pages, 2, page_size, 1, 16), "bfloat16")
    k = rand((1, 1, 16), "bfloat16")
    args = (_cuda(indices), _cuda(indptr), _cuda(last))
    with pytest.raises(ValueError, match="positions"):
        fi_cupy.append_paged_kv_cache(k, k, _cuda([1]), _cuda([3]), cache, *args)  # request 1 has length 3
    with pytest.raises(ValueError, match="batch_indices"):
        fi_cupy.append_paged_kv_cache(k, k, _cuda([2]), _cuda([0]), cache, *args)
    bad_pages = indices.copy()
    bad_pages[0] = num_pages
    with pytest.raises(ValueError, match="kv_indices"):
        fi_cupy.append_paged_kv_cache(k, k, _cuda([0]), _cuda([0]), cache, _cuda(bad_pages), *args[1:])
    before = bits(cache).copy()  # check=False: the kernel skips rows outside the page table
    fi_cupy.append_paged_kv_cache(k, k, _cuda([0]), _cuda([99]), cache, *args, check=False)
    cp.cuda.Device().synchronize()
    assert cp.array_equal(bits(cache), before)


def test_jax_append_returns_new_cache():
    jnp = pytest.importorskip("jax.numpy")
    indptr, indices, last, num_pages = _table([3], 4)
    rng = np.random.default_rng(0)
    cache = jnp.asarray(rng.standard_normal((num_pages, 2, 4, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 8)), jnp.float32)
    c0 = np.asarray(cache)
    new = fi_cupy.append_paged_kv_cache(k, k, jnp.asarray([0], jnp.int32), jnp.asarray([2], jnp.int32), cache,
                                        jnp.asarray(indices), jnp.asarray(indptr), jnp.asarray(last))
    assert np.array_equal(np.asarray(cache), c0)
    ck, cv = reference.append_paged_kv(c0[:, 0], c0[:, 1], np.asarray(k), np.asarray(k), [0], [2], indices, indptr, 4)
    got = np.asarray(new)
    assert np.array_equal(got[:, 0], ck) and np.array_equal(got[:, 1], cv)
