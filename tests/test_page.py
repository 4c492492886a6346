"""append_paged_kv_cache, get_seq_lens and get_batch_indices_positions on the GPU: appended rows land in
the right page and slot of a shuffled page table, and nothing else in the cache changes (the whole
cache is compared before and after); fp8 caches, both layouts, a (k, v) pair; bad indices raise."""
import numpy as np
import pytest

from fi_cupy import reference

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
import fi_cupy  # noqa: E402


def _table(kv_lens, page_size, spare=5, seed=0):
    rng = np.random.default_rng(seed)
    pages = [-(-n // page_size) for n in kv_lens]
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    indices = rng.permutation(indptr[-1] + spare)[: indptr[-1]].astype(np.int32)
    last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)], np.int32)
    return indptr, indices, last, indptr[-1] + spare


def _cuda(a, dtype=torch.int32):
    return torch.as_tensor(np.asarray(a), device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("as_tuple", [False, True])
def test_append_matches_reference_and_touches_nothing_else(dtype, layout, as_tuple):
    page_size, hkv, d = 16, 8, 128
    old = [0, 17, 31, 5]      # tokens already cached
    new = [7, 1, 33, 0]       # tokens appended now
    kv_lens = [a + b for a, b in zip(old, new)]
    indptr, indices, last, num_pages = _table(kv_lens, page_size)
    tdt = getattr(torch, dtype)
    shape = (num_pages, 2, page_size, hkv, d) if layout == "NHD" else (num_pages, 2, hkv, page_size, d)
    cache = torch.randn(shape, device="cuda").to(tdt)
    before = cache.clone()
    app_indptr = _cuda(np.concatenate([[0], np.cumsum(new)]))
    seq_lens = fi_cupy.get_seq_lens(_cuda(indptr), _cuda(last), page_size)
    assert seq_lens.cpu().tolist() == kv_lens
    nnz = sum(new)
    bi, pos = fi_cupy.get_batch_indices_positions(app_indptr, seq_lens, nnz)
    exp_b = np.repeat(np.arange(4), new)
    exp_p = np.concatenate([np.arange(o, o + n) for o, n in zip(old, new)])
    assert bi.cpu().numpy().tolist() == exp_b.tolist() and pos.cpu().numpy().tolist() == exp_p.tolist()
    key = torch.randn((nnz, hkv, d), device="cuda").to(tdt)
    val = torch.randn((nnz, hkv, d), device="cuda").to(tdt)
    arg = (cache[:, 0], cache[:, 1]) if as_tuple else cache
    assert fi_cupy.append_paged_kv_cache(key, val, bi, pos, arg, _cuda(indices), _cuda(indptr), _cuda(last),
                                         kv_layout=layout) is None
    u8 = lambda t: t.view(torch.uint8).cpu().numpy()  # noqa: E731 - compare bytes (fp8 included)
    ck, cv = reference.append_paged_kv(u8(before[:, 0]), u8(before[:, 1]), u8(key), u8(val), exp_b, exp_p,
                                       indices, indptr, page_size, layout)
    assert np.array_equal(u8(cache[:, 0]), ck) and np.array_equal(u8(cache[:, 1]), cv)


def test_strided_append_rows_and_int64_indices():
    page_size = 4
    indptr, indices, last, num_pages = _table([6], page_size)
    cache = torch.randn((num_pages, 2, page_size, 2, 64), device="cuda", dtype=torch.float16)
    before = cache.clone()
    qkv = torch.randn((6, 3, 2, 64), device="cuda", dtype=torch.float16)  # k and v are slices of a qkv buffer
    bi, pos = np.zeros(6, np.int64), np.arange(6)
    fi_cupy.append_paged_kv_cache(qkv[:, 1], qkv[:, 2], _cuda(bi, torch.int64), _cuda(pos, torch.int64), cache,
                                  _cuda(indices, torch.int64), _cuda(indptr, torch.int64), _cuda(last, torch.int64))
    u8 = lambda t: t.contiguous().view(torch.uint8).cpu().numpy()  # noqa: E731
    ck, cv = reference.append_paged_kv(u8(before[:, 0]), u8(before[:, 1]), u8(qkv[:, 1]), u8(qkv[:, 2]), bi, pos,
                                       indices, indptr, page_size)
    assert np.array_equal(u8(cache[:, 0]), ck) and np.array_equal(u8(cache[:, 1]), cv)


def test_out_of_range_indices_raise_or_are_skipped():
    page_size = 4
    indptr, indices, last, num_pages = _table([5, 3], page_size)
    cache = torch.randn((num_pages, 2, page_size, 1, 16), device="cuda", dtype=torch.bfloat16)
    k = torch.randn((1, 1, 16), device="cuda", dtype=torch.bfloat16)
    args = (_cuda(indices), _cuda(indptr), _cuda(last))
    with pytest.raises(ValueError, match="positions"):
        fi_cupy.append_paged_kv_cache(k, k, _cuda([1]), _cuda([3]), cache, *args)  # request 1 has length 3
    with pytest.raises(ValueError, match="batch_indices"):
        fi_cupy.append_paged_kv_cache(k, k, _cuda([2]), _cuda([0]), cache, *args)
    bad_pages = indices.copy()
    bad_pages[0] = num_pages
    with pytest.raises(ValueError, match="kv_indices"):
        fi_cupy.append_paged_kv_cache(k, k, _cuda([0]), _cuda([0]), cache, _cuda(bad_pages), *args[1:])
    before = cache.clone()  # check=False: the kernel skips rows outside the page table
    fi_cupy.append_paged_kv_cache(k, k, _cuda([0]), _cuda([99]), cache, *args, check=False)
    torch.cuda.synchronize()
    assert torch.equal(cache, before)


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
