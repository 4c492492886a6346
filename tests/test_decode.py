"""Decode attention on the GPU against the float64 reference (fi_cupy.reference), CuPy callers.

Every case draws fresh random inputs (tests/gpu_arrays.py), shuffles the page table, and poisons out/lse
with NaN so an unwritten element fails. A float8 cache is its bytes (uint8) planned with kv_data_type
float8_e4m3fn / float8_e5m2. torch appears only in interop tests (torch streams, outputs allocated in
torch, single decode with torch float8 K/V, whose dtype comes from the arrays); other framework callers
are in test_frameworks.py.

Coverage of test_path_grid (one item per path x group x page size; the minor axes rotate across
items). Derived from fi_cupy/decode.py (uses_tensor_cores, decode_variant) and fi_cupy/scheduler.py
(decode_heads_per_block, decode_schedule); every item asserts the kernel, GB and merge it names:

  axis     value                        reaches
  path     tc: KV in the q dtype        batch_decode_tc_kernel<D, GB, T, T> (mma.sync, 16 tokens a warp)
           fp8: e4m3 / e5m2 KV          batch_decode_tc_kernel<D, GB, T, KVT> (converted in shared memory)
           rope: ROPE_LLAMA             batch_decode_kernel<D, GB, QT, KVT, true> (CUDA cores; KV 16-bit,
                                        fp8 on every third item)
  group    1 (4 qo / 4 kv heads)        GB = 1 (the group size issue 19's decode crash needed)
           4 (8 / 2)                    GB = 4
           6 (12 / 2)                   GB = 8, two of its heads masked
           8 (16 / 2)                   GB = 8
  page     1, 7, 8, 16                  every path and group meets every page size
  lens     split [2999, 1, 0, 17, ..]   a pair cut over CTAs: merge_states_kernel<D, GB, T> runs
           whole [97, 0, 97, ..]        equal lengths, whole pairs a CTA: no merge
           tiny  [0, 1, 3, 0, 2, 9]     all in one CTA's quota: no merge
  rotated  head_dim 64 / 128 / 256, q fp16 / bf16, NHD / HND, 5-D cache / (k, v) pair

Lengths 0 (o = 0, lse = -inf), 1, and non-multiples of a CTA's step (CUDA cores: 4 warps x
32 / next_pow2(D / 8) rows x 4 (GB 8: 2) tokens, 32 at d128; tensor cores: 64 tokens).
Each (path, group) meets "split" at two page sizes and "whole" and "tiny" at one each.
"""
import math

import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from gpu_arrays import BF16, FP8, bits, capture, dtype_name, empty, f64, f64_dev, nan_like, poison, rand, replay, \
    rng, take
from tolerances import assert_close, assert_lse_close

try:
    import torch
except ImportError:
    torch = None

pytestmark = pytest.mark.gpu
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (interop test)")


def _torch_of(x):
    """A torch CUDA copy of CuPy array x (interop tests): bfloat16 through its bits, float8 bytes as uint8."""
    h = cp.asnumpy(bits(x))
    t = torch.as_tensor(h.view(np.int16) if x.dtype == BF16 else h, device="cuda")
    return t.view(torch.bfloat16) if x.dtype == BF16 else t


class PagedBatch:
    """A random paged cache, shuffled page table and queries for given per-request lengths."""

    def __init__(self, kv_lens, page_size=16, hq=32, hkv=8, d=128, q_dt="bfloat16", kv_dt=None,
                 layout="NHD", as_tuple=False, spare_pages=3, q_len=1):
        kv_dt = kv_dt or q_dt
        self.kv_lens, self.page_size, self.hq, self.hkv, self.d = list(kv_lens), page_size, hq, hkv, d
        self.q_dt, self.kv_dt, self.layout = q_dt, kv_dt, layout
        npages = [math.ceil(n / page_size) for n in kv_lens]
        total = sum(npages) + spare_pages
        perm = rng().permutation(total)
        self.indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
        self.indices = perm[: self.indptr[-1]].astype(np.int32)
        self.last_page_len = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, npages)],
                                      dtype=np.int32)
        shape = (total, 2, page_size, hkv, d) if layout == "NHD" else (total, 2, hkv, page_size, d)
        self.cache = rand(shape, kv_dt)  # float8: its bytes (uint8)
        # q_len > 1: planned with q_len_per_req, request r's queries are rows r * q_len .. of q
        self.q_len = q_len
        self.q = rand((len(kv_lens) * q_len, hq, d), q_dt)
        self.as_tuple = as_tuple

    @property
    def kv_arg(self):
        return (self.cache[:, 0], self.cache[:, 1]) if self.as_tuple else self.cache

    def request_kv(self, r):
        """(k, v) of request r as float64 numpy (L, hkv, d)."""
        pages = f64(take(self.cache, self.indices[self.indptr[r]: self.indptr[r + 1]]), self.kv_dt)
        if self.layout == "HND":
            pages = pages.transpose(0, 1, 3, 2, 4)
        kv = pages.transpose(1, 0, 2, 3, 4).reshape(2, -1, self.hkv, self.d)[:, : self.kv_lens[r]]
        return kv[0], kv[1]

    def reference(self, **kw):
        """(o, lse) like q. q_len > 1: each request's queries are the last q_len positions of its KV,
        causal among themselves (prefill_attention)."""
        outs, lses = [], []
        qf = f64(self.q).reshape(len(self.kv_lens), self.q_len, self.hq, self.d)
        for r in range(len(self.kv_lens)):
            k, v = self.request_kv(r)
            if self.q_len == 1:
                o, lse = reference.decode_attention(qf[r, 0], k, v, **kw)
            else:
                o, lse = reference.prefill_attention(qf[r], k, v, causal=True, **kw)
            outs.append(o)
            lses.append(lse)
        return np.stack(outs).reshape(self.q.shape), np.stack(lses).reshape(self.q.shape[:2])


def _workspace():
    return cp.empty(128 * 1024 * 1024, dtype=cp.uint8)


def run_batch(b: PagedBatch, pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None,
              sm_scale=None, rope_scale=None, rope_theta=None, k_scale=None, v_scale=None, wrapper=None,
              sinks=None):
    w = wrapper or fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), b.layout)
    w.plan(b.indptr, b.indices, b.last_page_len, b.hq, b.hkv, b.d, b.page_size,
           pos_encoding_mode=pos_encoding_mode, window_left=window_left, logits_soft_cap=logits_soft_cap,
           q_data_type=b.q_dt, kv_data_type=b.kv_dt, sm_scale=sm_scale, rope_scale=rope_scale,
           rope_theta=rope_theta, q_len_per_req=b.q_len)
    out = nan_like(b.q)
    lse = cp.full(b.q.shape[:2], np.nan, dtype=cp.float32)
    o, l2 = w.run(b.q, b.kv_arg, out=out, lse=lse, return_lse=True, k_scale=k_scale, v_scale=v_scale, sinks=sinks,
                  q_len_per_req=b.q_len)
    assert o is out and l2 is lse
    return f64(out), f64(lse)  # the copies to the host wait for the kernels


def check_batch(b, **kw):
    ref_kw = {k: v for k, v in kw.items() if k in ("window_left", "sm_scale", "rope_scale", "rope_theta",
                                                    "k_scale", "v_scale")}
    ref_kw = {k: v for k, v in ref_kw.items() if v is not None}
    if kw.get("logits_soft_cap"):
        ref_kw["logits_soft_cap"] = kw["logits_soft_cap"]
    if kw.get("pos_encoding_mode") == "ROPE_LLAMA":
        ref_kw["rope"] = True
    if kw.get("pos_encoding_mode") == "ALIBI":
        ref_kw["alibi"] = True
    if kw.get("sinks") is not None:
        ref_kw["sinks"] = cp.asnumpy(kw["sinks"])  # the references run on the host here
    out, lse = run_batch(b, **kw)
    ro, rl = b.reference(**ref_kw)
    assert_close(out, ro, b.q_dt)
    assert_lse_close(lse, rl)
    return out, lse


LENS = [1, 17, 0, 300, 16, 1000, 33]


@pytest.mark.parametrize("d", list(range(16, 257, 16)))
def test_every_head_dim(d):
    check_batch(PagedBatch(LENS, page_size=16, hq=8, hkv=2, d=d))


# head_dim 512 runs batch_decode_wide_kernel (the warps split the head dim), fp8 KV too. The split lengths make
# the scheduler cut long requests (the merge kernel at 512), groups 1 / 3 / 4 / 8 (3: a masked head in the block),
# page sizes 1 / 5 / 7 / 16, lengths 0 / 1 and non-multiples of the 16-token tile, soft cap, sinks, ALiBi, a window
# (its CUDA-graph replay: test_cuda_graph_capture_replan_replay).
@pytest.mark.parametrize("group,page_size,lens,opts", [
    (1, 16, [2999, 1, 0, 17, 640], {}),
    (4, 7, LENS, {"sinks": True}),
    (8, 1, [0, 1, 33, 1500], {"logits_soft_cap": 30.0}),
    (3, 16, [5000, 15, 16, 1], {"pos_encoding_mode": "ALIBI"}),
    (8, 5, [4097, 0, 250], {"window_left": 100}),
])
@pytest.mark.parametrize("q_dt", ["float16", "bfloat16"])
def test_head_dim_512(group, page_size, lens, opts, q_dt):
    b = PagedBatch(lens, page_size=page_size, hq=2 * group, hkv=2, d=512, q_dt=q_dt, as_tuple=group == 4)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), b.layout)
    kw = dict(opts, sinks=rand((b.hq,), "float32") if opts.get("sinks") else None)
    check_batch(b, wrapper=w, **kw)
    prog, _ = fi_cupy.decode.decode_variant(w._plan.params, w._plan.params.kv_dtype)
    assert not w._via_prefill and prog.kernels[0].kernel == "fic::batch_decode_wide_kernel"


def test_head_dim_512_many_requests():
    """A batch wider than one wave of CTAs: many segments a CTA, each CTA's exchange buffers reused
    across segments."""
    rng = np.random.default_rng(5)
    b = PagedBatch(rng.integers(0, 300, 200).tolist(), page_size=16, hq=16, hkv=2, d=512, q_dt="bfloat16")
    check_batch(b)


@pytest.mark.parametrize("d,group,q_dt,mode", [(128, 8, "bfloat16", "NONE"), (256, 1, "float16", "NONE"),
                                             (160, 4, "bfloat16", "ALIBI")])
def test_cuda_core_kernel_where_shared_memory_is_short(monkeypatch, d, group, q_dt, mode):
    """A GPU that cannot give the tensor-core kernel its shared memory (sm_86 / sm_89: 99 KB a CTA) runs
    16-bit KV on the CUDA-core kernel: the H200 stands in, its shared-memory limit lowered."""
    from fi_cupy._core import kernels
    dev = cp.cuda.Device().id
    monkeypatch.setitem(kernels._props, dev, dict(kernels.device_props(dev), smem_optin=99 * 1024))
    b = PagedBatch(LENS + [3000], page_size=16, hq=2 * group, hkv=2, d=d, q_dt=q_dt)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), b.layout)
    check_batch(b, wrapper=w, pos_encoding_mode=mode)
    prog, smem = fi_cupy.decode.decode_variant(w._plan.params, w._plan.params.kv_dtype, dev)
    assert prog.kernels[0].kernel == "fic::batch_decode_kernel" and smem <= 99 * 1024


@pytest.mark.parametrize("kv_dt", ["float8_e4m3fn", "float8_e5m2"])
def test_head_dim_512_fp8(kv_dt):
    b = PagedBatch([700, 1, 0, 2000], page_size=16, hq=8, hkv=2, d=512, kv_dt=kv_dt)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), b.layout)
    check_batch(b, wrapper=w, k_scale=0.5, v_scale=2.0)
    prog, _ = fi_cupy.decode.decode_variant(w._plan.params, w._plan.params.kv_dtype)
    assert not w._via_prefill and prog.kernels[0].kernel == "fic::batch_decode_wide_kernel"
    assert prog.kernels[0].targs[3] == fi_cupy._core.dtypes.as_dtype(kv_dt).cpp


def test_head_dim_512_refusals():
    """RoPE on the fly is not taken at 512 (the prefill kernel's limit), naming the argument."""
    b = PagedBatch([5, 9], hq=4, hkv=2, d=512)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    with pytest.raises(NotImplementedError, match="^pos_encoding_mode"):
        w.plan(b.indptr, b.indices, b.last_page_len, 4, 2, 512, 16, pos_encoding_mode="ROPE_LLAMA")


@pytest.mark.parametrize("kv_len,layout", [(0, "NHD"), (1, "HND"), (3001, "NHD")])
def test_single_decode_head_dim_512(kv_len, layout):
    hq, hkv, d = 8, 2, 512
    q = rand((hq, d), "bfloat16")
    k = rand((kv_len, hkv, d) if layout == "NHD" else (hkv, kv_len, d), "bfloat16")
    v = rand(k.shape, "bfloat16")
    out, lse = nan_like(q), cp.full((hq,), np.nan, dtype=cp.float32)
    o, l2 = fi_cupy.single_decode_with_kv_cache(q, k, v, kv_layout=layout, return_lse=True, out=out, lse=lse,
                                                 sm_scale=0.05)
    kf, vf = (f64(x) if layout == "NHD" else f64(x).transpose(1, 0, 2) for x in (k, v))
    ro, rl = reference.decode_attention(f64(q), kf, vf, sm_scale=0.05)
    assert_close(f64(o), ro, "bfloat16")
    assert_lse_close(f64(l2), rl)
    assert f64(out).tolist() == f64(o).tolist()  # out= was written


@pytest.mark.parametrize("q_dt,kv_dt", [("float16", "float16"), ("bfloat16", "bfloat16"),
                                        ("float16", "float8_e4m3fn"), ("float16", "float8_e5m2"),
                                        ("bfloat16", "float8_e4m3fn"), ("bfloat16", "float8_e5m2")])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_dtypes_layouts_page_sizes(q_dt, kv_dt, layout, page_size):
    check_batch(PagedBatch([5, 130, 1, 77, 0, 513], page_size=page_size, q_dt=q_dt, kv_dt=kv_dt, layout=layout))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_kv_tuple_cache(layout):
    check_batch(PagedBatch([5, 130, 1, 77], layout=layout, as_tuple=True))


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (12, 4), (16, 4), (20, 4), (32, 4), (64, 8), (32, 1), (48, 2)])
def test_gqa_groups(hq, hkv):
    check_batch(PagedBatch([3, 260, 1029], hq=hq, hkv=hkv, d=128))


@pytest.mark.parametrize("window_left", [0, 5, 100, 5000])
def test_sliding_window(window_left):
    check_batch(PagedBatch([1, 7, 300, 2100, 9000]), window_left=window_left)


@pytest.mark.parametrize("q_dt", ["float16", "bfloat16"])
def test_soft_cap_and_sm_scale(q_dt):
    check_batch(PagedBatch([4, 700, 3000], q_dt=q_dt), logits_soft_cap=5.0, sm_scale=0.3)


@pytest.mark.parametrize("d,layout,kv_dt", [(128, "NHD", None), (64, "HND", None), (256, "NHD", None),
                                            (80, "NHD", None), (128, "NHD", "float8_e4m3fn")])
def test_rope_on_the_fly(d, layout, kv_dt):
    b = PagedBatch([1, 9, 400, 2500], hq=16, hkv=4, d=d, layout=layout, kv_dt=kv_dt)
    check_batch(b, pos_encoding_mode="ROPE_LLAMA")
    check_batch(b, pos_encoding_mode="ROPE_LLAMA", rope_scale=2.0, rope_theta=5e5)


def test_fp8_scales_change_the_output():
    b = PagedBatch([50, 900], kv_dt="float8_e4m3fn")
    base, _ = check_batch(b)
    scaled, _ = check_batch(b, k_scale=0.5, v_scale=2.0)
    assert np.abs(scaled - base).max() > 0.1  # both scales are applied
    only_k, _ = check_batch(b, k_scale=0.5)
    assert np.abs(only_k - base).max() > 1e-2


def test_all_requests_empty():
    out, lse = check_batch(PagedBatch([0, 0, 0]))
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_batch_1024_requests():
    rng = np.random.default_rng(5)
    check_batch(PagedBatch(rng.integers(0, 200, 1024).tolist(), hq=8, hkv=2, d=64))


def test_long_context_split_kv_128k():
    b = PagedBatch([131072], hq=32, hkv=8, d=128)
    out, lse = run_batch(b)
    # float64 reference on the GPU (reference.decode_attention takes CuPy arrays; on the host it would take
    # gigabytes and minutes)
    kv = f64_dev(take(b.cache, b.indices)).transpose(1, 0, 2, 3, 4).reshape(2, -1, 8, 128)
    ref_o, ref_l = reference.decode_attention(f64_dev(b.q[0]), kv[0], kv[1])
    assert_close(out[0], cp.asnumpy(ref_o), "bfloat16")
    assert_lse_close(lse[0], cp.asnumpy(ref_l))


def test_mixed_long_and_short_with_split():
    check_batch(PagedBatch([40000, 1, 0, 17, 6000], hq=32, hkv=8))


@pytest.mark.parametrize("kv_len,layout", [(1, "NHD"), (7, "HND"), (4097, "NHD"), (33000, "HND"), (0, "NHD")])
def test_single_decode(kv_len, layout):
    hq, hkv, d = 32, 8, 128
    shape = (kv_len, hkv, d) if layout == "NHD" else (hkv, kv_len, d)
    k = rand(shape, "bfloat16")
    v = rand(shape, "bfloat16")
    q = rand((hq, d), "bfloat16")
    o, lse = fi_cupy.single_decode_with_kv_cache(q, k, v, kv_layout=layout, return_lse=True)
    assert isinstance(o, cp.ndarray) and dtype_name(o) == "bfloat16" and o.shape == (hq, d)
    kk, vv = f64(k), f64(v)
    if layout == "HND":
        kk, vv = kk.transpose(1, 0, 2), vv.transpose(1, 0, 2)
    ro, rl = reference.decode_attention(f64(q), kk, vv)
    assert_close(f64(o), ro, "bfloat16")
    assert_lse_close(f64(lse), rl)


def test_single_decode_growing_length_keeps_a_bounded_plan_cache():
    from fi_cupy import decode as dec
    k = rand((200, 2, 64), "float16")
    q = rand((8, 64), "float16")
    for n in range(100, 200):  # a decode loop: one more token each step
        o = fi_cupy.single_decode_with_kv_cache(q, k[:n], k[:n])
    assert len(dec._single_plans) <= dec._single_plans.size
    ro, _ = reference.decode_attention(f64(q), f64(k[:199]), f64(k[:199]))
    assert_close(f64(o), ro, "float16")


def test_single_decode_strided_kv_and_options():
    big = rand((300, 4, 2, 64), "float16")  # k, v interleaved per token
    k, v = big[:, :, 0], big[:, :, 1]
    q = rand((8, 64), "float16")
    o = fi_cupy.single_decode_with_kv_cache(q, k, v, window_left=50, logits_soft_cap=10.0,
                                            pos_encoding_mode="ROPE_LLAMA")
    ro, _ = reference.decode_attention(f64(q), f64(k), f64(v), window_left=50, logits_soft_cap=10.0, rope=True)
    assert_close(f64(o), ro, "float16")


@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (16, 4, 512)])  # 512: batch_decode_wide_kernel
def test_cuda_graph_capture_replan_replay(hq, hkv, d):
    b1 = PagedBatch([100, 2000, 5, 7000], hq=hq, hkv=hkv, d=d)
    b2 = PagedBatch([3000, 1, 64, 9000], hq=hq, hkv=hkv, d=d)  # same batch size, other lengths and pages
    cache = cp.concatenate([bits(b1.cache), bits(b2.cache)]).view(BF16)  # one cache holding both page sets
    off = b1.cache.shape[0]
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD", use_cuda_graph=True)
    plan_args = dict(num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=16, q_data_type="bfloat16")
    w.plan(b1.indptr, b1.indices, b1.last_page_len, **plan_args)
    q = bits(b1.q).copy().view(BF16)
    out = nan_like(q)
    g, s = capture(lambda: w.run(q, cache, out=out))
    w.plan(b2.indptr, b2.indices + off, b2.last_page_len, **plan_args)
    bits(q)[...] = bits(b2.q)
    poison(out)
    replay(g, s)
    expect = w.run(b2.q, cache)  # uncaptured run of the new plan
    assert np.array_equal(f64(out), f64(expect))
    ro, _ = b2.reference()
    assert_close(f64(out), ro, "bfloat16")


def test_cache_over_2_pow_31_elements():
    # (num_pages, 2, 16, 8, 128) bf16 with 66000 pages: 4.3e9 elements; use the pages past 2^31.
    hkv, d, ps, pages = 8, 128, 16, 66000
    cache = empty((pages, 2, ps, hkv, d), "bfloat16")
    assert cache.size > 2 ** 31
    lens = [300, 5000]
    npg = [math.ceil(n / ps) for n in lens]
    base = pages - sum(npg)
    idx = np.arange(base, pages, dtype=np.int32)[::-1].copy()  # last pages, reversed
    # Page idx[i] gets rows[i]. Written and read through the tail slice: CuPy's own copy kernels then
    # index a small array (the kernel under test gets the whole cache).
    rows = rand((len(idx), 2, ps, hkv, d), "bfloat16")
    bits(cache)[base:] = bits(rows)[::-1]
    indptr = np.array([0, npg[0], sum(npg)], np.int32)
    last = np.array([n - (p - 1) * ps for n, p in zip(lens, npg)], np.int32)
    q = rand((2, 32, d), "bfloat16")
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    w.plan(indptr, idx, last, 32, hkv, d, ps, q_data_type="bfloat16")
    out = w.run(q, cache)
    for r in range(2):
        pg = idx[indptr[r]: indptr[r + 1]] - base
        kv = f64(take(cache[base:], pg)).transpose(1, 0, 2, 3, 4).reshape(2, -1, hkv, d)[:, : lens[r]]
        ro, _ = reference.decode_attention(f64(q[r]), kv[0], kv[1])
        assert_close(f64(out[r]), ro, "bfloat16")


@needs_torch
def test_non_default_torch_stream_is_ordered():
    b = PagedBatch([4000, 4000])
    cache = _torch_of(b.cache)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    w.plan(b.indptr, b.indices, b.last_page_len, b.hq, b.hkv, b.d, b.page_size, q_data_type="bfloat16")
    q = torch.zeros(b.q.shape, dtype=torch.bfloat16, device="cuda")
    q_src = _torch_of(b.q)
    out = torch.full_like(q, float("nan"))
    w.run(q, cache, out=out)  # warm-up (compile) on the default stream
    torch.cuda.synchronize()
    out.fill_(float("nan"))
    s = torch.cuda.Stream()
    x = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        for _ in range(20):  # ~tens of ms of queued work before q is written
            x = x @ x / 100.0
        q.copy_(q_src)
        w.run(q, cache, out=out)  # must run after the copy, on stream s
    s.synchronize()
    ro, _ = b.reference()
    assert_close(out.double().cpu().numpy(), ro, "bfloat16")


@needs_torch
def test_outputs_allocated_in_torch():
    b = PagedBatch([10, 20])
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    w.plan(b.indptr, b.indices, b.last_page_len, b.hq, b.hkv, b.d, b.page_size, q_data_type=torch.bfloat16)
    o, lse = w.run(_torch_of(b.q), _torch_of(b.cache), return_lse=True)
    assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 and o.shape == b.q.shape
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32 and lse.shape == (2, 32)


def test_plan_accepts_device_index_arrays():
    b = PagedBatch([10, 200, 3])
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    w.plan(cp.asarray(b.indptr), cp.asarray(b.indices), cp.asarray(b.last_page_len), b.hq, b.hkv, b.d, b.page_size,
           q_data_type="bfloat16")
    out = w.run(b.q, b.cache)
    assert_close(f64(out), b.reference()[0], "bfloat16")


def test_wgmma_probe_runs():
    from fi_cupy import probe
    from fi_cupy._core import kernels
    if kernels.device_arch(0) != "sm_90a":
        pytest.skip("wgmma needs a Hopper (sm_90a) GPU")
    rng = np.random.default_rng(0)
    a = rng.integers(-4, 5, (64, 16)).astype(np.float32)
    b = rng.integers(-4, 5, (8, 16)).astype(np.float32)
    bits = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # exact: small integers
    d = probe.wgmma_matmul(bits(a), bits(b))
    np.testing.assert_array_equal(d, a @ b.T)


# ---------------------------------------------------------------------------------------------
# Coverage grid: every kernel path x group size x page size (table in the module docstring).

GRID_HEADS = {1: (4, 4), 4: (8, 2), 6: (12, 2), 8: (16, 2)}  # group -> (num_qo_heads, num_kv_heads)
GRID_GB = {1: 1, 4: 4, 6: 8, 8: 8}  # heads per block the scheduler must pick for the group
GRID_PAGES = (1, 7, 8, 16)
GRID_LENS = {"split": [2999, 1, 0, 17, 130, 64], "whole": [97, 0, 97, 97, 0, 97, 97], "tiny": [0, 1, 3, 0, 2, 9]}
GRID_KERNEL = {"tc": "fic::batch_decode_tc_kernel", "fp8": "fic::batch_decode_tc_kernel",
               "rope": "fic::batch_decode_kernel"}


def _path_grid() -> list:
    cases = []
    for pi, path in enumerate(GRID_KERNEL):
        for gi, group in enumerate(GRID_HEADS):
            for si, page_size in enumerate(GRID_PAGES):
                i = len(cases)
                lens = ("split", "whole", "split", "tiny")[(pi + gi + si) % 4]
                d = (64, 128, 256)[i % 3]
                q_dt = ("bfloat16", "float16")[i // 3 % 2]
                fp8 = path == "fp8" or (path == "rope" and i % 3 == 0)
                kv_dt = ("float8_e4m3fn", "float8_e5m2")[i // 2 % 2] if fp8 else q_dt
                layout = ("NHD", "HND")[i % 2]
                as_tuple = i % 5 == 4
                case = (path, group, page_size, lens, d, q_dt, kv_dt, layout, as_tuple)
                dts = q_dt if kv_dt == q_dt else f"{q_dt}-{kv_dt}"
                cases.append(pytest.param(*case, id=f"{path}-g{group}-p{page_size}-{lens}-d{d}-{dts}-{layout}"
                                                    f"{'-kv_pair' if as_tuple else ''}"))
    return cases


@pytest.mark.parametrize("path,group,page_size,lens,d,q_dt,kv_dt,layout,as_tuple", _path_grid())
def test_path_grid(path, group, page_size, lens, d, q_dt, kv_dt, layout, as_tuple):
    hq, hkv = GRID_HEADS[group]
    b = PagedBatch(GRID_LENS[lens], page_size=page_size, hq=hq, hkv=hkv, d=d, q_dt=q_dt, kv_dt=kv_dt,
                   layout=layout, as_tuple=as_tuple)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), layout)
    out, lse = check_batch(b, pos_encoding_mode="ROPE_LLAMA" if path == "rope" else "NONE", wrapper=w)
    _assert_grid_path(w, path, group, lens)
    empty = np.array(b.kv_lens) == 0
    assert np.all(out[empty] == 0) and np.all(np.isneginf(lse[empty]))


def _assert_grid_path(w, path, group, lens):
    """The path a grid item names, so the grid cannot drift to one kernel unnoticed."""
    p = w._plan.params
    assert fi_cupy.decode.uses_tensor_cores(p.q_dtype, p.kv_dtype, p.rope) == (path != "rope")
    assert fi_cupy.decode.decode_variant(p, p.kv_dtype)[0].kernels[0].kernel == GRID_KERNEL[path]
    assert w._plan.heads_per_block == (GRID_GB[group], 1)
    assert (w._plan.num_merges > 0) == (lens == "split"), f"num_merges {w._plan.num_merges}"


def test_path_grid_covers_every_path_group_and_page():
    """The grid itself: each (path, group, page size) once; the merge at every (path, group)."""
    cells = [tuple(c.values[:4]) for c in _path_grid()]
    want = {(p, g, s) for p in GRID_KERNEL for g in GRID_HEADS for s in GRID_PAGES}
    assert sorted(c[:3] for c in cells) == sorted(want)
    assert {(p, g) for p, g, _, lens in cells if lens == "split"} == {(p, g) for p, g, _ in want}
    assert {c[3] for c in cells} == set(GRID_LENS)


# ---------------------------------------------------------------------------------------------
# Attention sinks (FlashInfer's run(sinks=), gpt-oss): one float32 logit per query head joins each
# row's softmax denominator. Each path x lens shape at group 4, on the grid item of that cell (its page
# size, head_dim, dtypes and layout), so "split" folds the sink in the merge and "whole" / "tiny" in
# the decode kernel's own epilogue.


def _sinks(hq):
    return rand((hq,), "float32", 2.0)


@pytest.mark.parametrize("lens", list(GRID_LENS))
@pytest.mark.parametrize("path", list(GRID_KERNEL))
def test_sinks(path, lens):
    group = 4
    _, _, page_size, _, d, q_dt, kv_dt, layout, as_tuple = next(
        c.values for c in _path_grid() if c.values[:2] == (path, group) and c.values[3] == lens)
    hq, hkv = GRID_HEADS[group]
    b = PagedBatch(GRID_LENS[lens], page_size=page_size, hq=hq, hkv=hkv, d=d, q_dt=q_dt, kv_dt=kv_dt, layout=layout,
                   as_tuple=as_tuple)
    sinks = _sinks(hq)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), layout)
    mode = "ROPE_LLAMA" if path == "rope" else "NONE"
    out, lse = check_batch(b, pos_encoding_mode=mode, wrapper=w, sinks=sinks)
    _assert_grid_path(w, path, group, lens)
    empty = np.array(b.kv_lens) == 0  # no key: o = 0, lse = the sink alone (base 2)
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[empty], np.broadcast_to(f64(sinks) / math.log(2.0), lse[empty].shape), rtol=1e-5,
                               atol=1e-6)
    # One plan, more calls: sinks is part of a call's signature (None or an array), and a replayed call
    # (fi_cupy/_core/fastpath.py: the third call replays the second) reads the new array's pointer.
    for again in (None, _sinks(hq), _sinks(hq)):
        o = w.run(b.q, b.kv_arg, sinks=again)
        ro, _ = b.reference(rope=path == "rope", sinks=None if again is None else cp.asnumpy(again))
        assert_close(f64(o), ro, q_dt)


def test_sinks_q_len_per_req():
    """q_len_per_req = 2 runs the paged prefill kernel: sinks go with it. kv_len 1 and 0: rows that see
    no key."""
    b = PagedBatch([50, 1, 700, 2, 0], hq=8, hkv=2, d=128, q_len=2)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    sinks = _sinks(8)
    out, lse = check_batch(b, wrapper=w, sinks=sinks)
    assert w._multi is not None and w._multi._plan is not None  # the prefill wrapper ran
    dead = np.repeat(b.kv_lens, 2) - 2 + np.tile([0, 1], 5) < 0  # row 2r + i sits at position kv_len - 2 + i
    assert np.all(out[dead] == 0)
    np.testing.assert_allclose(lse[dead], np.broadcast_to(f64(sinks) / math.log(2.0), lse[dead].shape), rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------
# ALiBi (pos_encoding_mode="ALIBI"): logit += slope_h * (key position - (kv_len - 1)), FlashInfer's slopes.
# 16-bit and fp8 KV both run the tensor-core kernel (fp8 converted in shared memory), its ALiBi template bool last.
# Each path x lens shape at group 4 on the grid item of that cell (as test_sinks); then groups 1, 6 (two
# of the block's heads masked) and 8 on their "split" grid items, and 8 / 8 and 32 / 4 heads; window,
# sm_scale and fp8 scales; single decode; sinks beside ALiBi; q_len_per_req = 2; a CUDA-graph replay.

ALIBI_PATHS = ("tc", "fp8")


def _assert_alibi_kernel(w, path):
    p = w._plan.params
    main = fi_cupy.decode.decode_variant(p, p.kv_dtype)[0].kernels[0]
    assert p.alibi and not p.rope
    assert main.kernel == GRID_KERNEL[path] and main.targs[-1] == "true", main


def _alibi_grid_batch(path, group, lens):
    """A batch as test_path_grid's first item of (path, group, lens) (its page size, head_dim, dtypes, layout)."""
    _, _, page_size, _, d, q_dt, kv_dt, layout, as_tuple = next(
        c.values for c in _path_grid() if c.values[:2] == (path, group) and c.values[3] == lens)
    hq, hkv = GRID_HEADS[group]
    return PagedBatch(GRID_LENS[lens], page_size=page_size, hq=hq, hkv=hkv, d=d, q_dt=q_dt, kv_dt=kv_dt, layout=layout,
                      as_tuple=as_tuple)


@pytest.mark.parametrize("lens", list(GRID_LENS))
@pytest.mark.parametrize("path", ALIBI_PATHS)
def test_alibi(path, lens):
    b = _alibi_grid_batch(path, 4, lens)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), b.layout)
    out, lse = check_batch(b, pos_encoding_mode="ALIBI", wrapper=w)
    _assert_grid_path(w, path, 4, lens)
    _assert_alibi_kernel(w, path)
    empty = np.array(b.kv_lens) == 0
    assert np.all(out[empty] == 0) and np.all(np.isneginf(lse[empty]))
    # the bias is there: without it the reference differs (slopes 2^-1 .. 2^-8 over these lengths)
    if lens != "tiny":
        plain, _ = b.reference()
        assert np.abs(plain - out).max() > 0.05
    # One plan, more calls of another signature (no out / lse): the first is recorded, the second replayed
    # (fi_cupy/_core/fastpath.py) with the slopes' pointer it recorded
    for _ in range(2):
        b.q = rand(b.q.shape, b.q_dt)
        o = w.run(b.q, b.kv_arg)
        assert_close(f64(o), b.reference(alibi=True)[0], b.q_dt)


@pytest.mark.parametrize("group", [1, 6, 8])
@pytest.mark.parametrize("path", ALIBI_PATHS)
def test_alibi_groups(path, group):
    """Groups 1 (4 / 4 heads), 6 (12 / 2: GB 8, two heads of the block masked) and 8 (16 / 2), then the larger
    head counts FlashInfer models use (8 / 8 and 32 / 4: the slopes of 8 and 32 heads), on "split"."""
    b = _alibi_grid_batch(path, group, "split")
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), b.layout)
    check_batch(b, pos_encoding_mode="ALIBI", wrapper=w)
    _assert_grid_path(w, path, group, "split")
    _assert_alibi_kernel(w, path)
    if group in (1, 8):
        hq, hkv = {1: (8, 8), 8: (32, 4)}[group]
        kv_dt = "float8_e5m2" if path == "fp8" else "float16"
        b = PagedBatch([1500, 3, 0, 260, 1], page_size=16, hq=hq, hkv=hkv, d=128, q_dt="float16", kv_dt=kv_dt)
        w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
        check_batch(b, pos_encoding_mode="ALIBI", wrapper=w)
        _assert_alibi_kernel(w, path)


@pytest.mark.parametrize("path", ALIBI_PATHS)
def test_alibi_window_scales_and_sm_scale(path):
    """The bias joins the logits after sm_scale and the fp8 k_scale (neither scales it); a window hides the
    keys as without ALiBi."""
    kv_dt = "float8_e4m3fn" if path == "fp8" else "bfloat16"
    b = PagedBatch([1, 9, 400, 2500, 0], hq=16, hkv=4, d=128, kv_dt=kv_dt)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    scales = dict(k_scale=0.5, v_scale=2.0) if path == "fp8" else {}
    for kw in ({"window_left": 100}, {"sm_scale": 0.3, **scales}, {"window_left": 0}):
        check_batch(b, pos_encoding_mode="ALIBI", wrapper=w, **kw)
        _assert_alibi_kernel(w, path)


@pytest.mark.parametrize("kv_len,layout,hq,hkv", [(1, "NHD", 8, 8), (97, "HND", 12, 4), (5000, "NHD", 32, 8),
                                                  (0, "NHD", 32, 8)])
def test_alibi_single_decode(kv_len, layout, hq, hkv):
    d = 128
    shape = (kv_len, hkv, d) if layout == "NHD" else (hkv, kv_len, d)
    k, v, q = rand(shape, "float16"), rand(shape, "float16"), rand((hq, d), "float16")
    out, lse = nan_like(q), cp.full((hq,), np.nan, dtype=cp.float32)
    o, l2 = fi_cupy.single_decode_with_kv_cache(q, k, v, kv_layout=layout, pos_encoding_mode="ALIBI", return_lse=True,
                                                out=out, lse=lse)
    assert o is out and l2 is lse
    kk, vv = f64(k), f64(v)
    if layout == "HND":
        kk, vv = kk.transpose(1, 0, 2), vv.transpose(1, 0, 2)
    ro, rl = reference.decode_attention(f64(q), kk, vv, alibi=True)
    assert_close(f64(o), ro, "float16")
    assert_lse_close(f64(lse), rl)
    # the same arrays without ALiBi: another cached plan, the plain result
    o = fi_cupy.single_decode_with_kv_cache(q, k, v, kv_layout=layout)
    assert_close(f64(o), reference.decode_attention(f64(q), kk, vv)[0], "float16")


@pytest.mark.parametrize("path", ALIBI_PATHS)
def test_alibi_with_sinks(path):
    """Sinks beside ALiBi: the sink joins each row's denominator after the biased logits ("split": in the
    merge; the kv_len 0 requests: the sink alone)."""
    b = _alibi_grid_batch(path, 4, "split")
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), b.layout)
    sinks = _sinks(b.hq)
    out, lse = check_batch(b, pos_encoding_mode="ALIBI", wrapper=w, sinks=sinks)
    _assert_alibi_kernel(w, path)
    empty = np.array(b.kv_lens) == 0
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[empty], np.broadcast_to(f64(sinks) / math.log(2.0), lse[empty].shape), rtol=1e-5,
                               atol=1e-6)


def test_alibi_q_len_per_req():
    """q_len_per_req = 2 runs the paged prefill kernel (the portable one: ALiBi) with the mode: row 2r + i
    sits at kv_len - 2 + i. kv_len 1 and 0: rows that see no key."""
    from fi_cupy import prefill
    b = PagedBatch([50, 1, 700, 2, 0], hq=8, hkv=2, d=128, q_len=2)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    out, lse = check_batch(b, pos_encoding_mode="ALIBI", wrapper=w)
    plan = w._multi._plan
    assert plan.params.alibi and not plan.tile.sm90 and plan.flags & prefill.ALIBI
    dead = np.repeat(b.kv_lens, 2) - 2 + np.tile([0, 1], 5) < 0
    assert np.all(out[dead] == 0) and np.all(np.isneginf(lse[dead]))


def test_alibi_cuda_graph_replay():
    """The slopes' device copy is fixed: a captured ALiBi run replays right after a re-plan."""
    b1 = PagedBatch([100, 2000, 5], hq=16, hkv=4)
    b2 = PagedBatch([3000, 1, 64], hq=16, hkv=4)
    cache = cp.concatenate([bits(b1.cache), bits(b2.cache)]).view(BF16)
    off = b1.cache.shape[0]
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD", use_cuda_graph=True)
    plan_args = dict(num_qo_heads=16, num_kv_heads=4, head_dim=128, page_size=16, q_data_type="bfloat16",
                     pos_encoding_mode="ALIBI")
    w.plan(b1.indptr, b1.indices, b1.last_page_len, **plan_args)
    q = bits(b1.q).copy().view(BF16)
    out = nan_like(q)
    g, s = capture(lambda: w.run(q, cache, out=out))
    w.plan(b2.indptr, b2.indices + off, b2.last_page_len, **plan_args)
    bits(q)[...] = bits(b2.q)
    poison(out)
    replay(g, s)
    assert_close(f64(out), b2.reference(alibi=True)[0], "bfloat16")


# ---------------------------------------------------------------------------------------------
# Regression (issue 19): batch_decode_kernel (then fp8 KV or RoPE; now RoPE) at group size 1 read its warps'
# merge blocks, GB * (D + 2) floats each, with 16-byte loads: warps 1 and 3 were misaligned at GB = 1
# (CUDA_ERROR_MISALIGNED_ADDRESS, sticky). The tests before never ran group size 1 on that kernel. The
# report's fp8 cases now run the tensor-core kernel; fp8 with RoPE keeps the CUDA-core one.


@pytest.mark.parametrize("kv_dt,rope,d,page_size", [
    ("float8_e4m3fn", True, 128, 16),  # the report (fp8, no RoPE then): batch 12, kv_len 97, 4 / 4 heads, fp16 q
    ("float8_e5m2", True, 128, 16),
    ("float8_e4m3fn", True, 256, 1),
    ("float8_e4m3fn", True, 128, 8),
    ("float16", True, 128, 16),  # RoPE on the fly with fp16 KV crashed the same way
    ("float16", True, 256, 8),
    ("float16", True, 128, 1),
    ("float8_e5m2", True, 64, 16),
])
def test_regression_group1_cuda_core_kernel(kv_dt, rope, d, page_size):
    b = PagedBatch([97] * 12, page_size=page_size, hq=4, hkv=4, d=d, q_dt="float16", kv_dt=kv_dt)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), "NHD")
    mode = "ROPE_LLAMA" if rope else "NONE"
    dev = lambda a: cp.asarray(a, dtype=cp.int32)  # noqa: E731 - as the report passed them: int32 device arrays
    w.plan(dev(b.indptr), dev(b.indices), dev(b.last_page_len), 4, 4, d, page_size, pos_encoding_mode=mode,
           q_data_type="float16", kv_data_type=kv_dt)
    assert not fi_cupy.decode.uses_tensor_cores(w._plan.params.q_dtype, w._plan.params.kv_dtype, rope)
    assert w._plan.heads_per_block == (1, 1)
    o, lse = w.run(b.q, b.cache, return_lse=True)
    cp.cuda.Device().synchronize()  # a misaligned access raises here
    ro, rl = b.reference(rope=rope)
    assert_close(f64(o), ro, "float16")
    assert_lse_close(f64(lse), rl)


@pytest.mark.parametrize("kv_dt,rope", [pytest.param("float8_e4m3fn", False, marks=needs_torch), ("float16", True)])
def test_regression_group1_cuda_core_single_decode(kv_dt, rope):
    k, v = rand((97, 4, 128), kv_dt), rand((97, 4, 128), kv_dt)
    q = rand((4, 128), "float16")
    ro, rl = reference.decode_attention(f64(q), f64(k, kv_dt), f64(v, kv_dt), rope=rope)
    if kv_dt in FP8:  # single decode reads the K/V dtype from the arrays: float8 K/V are torch tensors
        q, k, v = _torch_of(q), _torch_of(k).view(getattr(torch, kv_dt)), _torch_of(v).view(getattr(torch, kv_dt))
    o, lse = fi_cupy.single_decode_with_kv_cache(q, k, v, pos_encoding_mode="ROPE_LLAMA" if rope else "NONE",
                                                 return_lse=True)
    host = (lambda x: x.double().cpu().numpy()) if kv_dt in FP8 else f64  # synchronises: a misaligned access raises
    assert_close(host(o), ro, "float16")
    assert_lse_close(host(lse), rl)


# ---------------------------------------------------------------------------------------------
# Bad input: a Python error naming the argument, before any launch.


@pytest.fixture
def planned():
    b = PagedBatch([10, 40])
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    w.plan(b.indptr, b.indices, b.last_page_len, b.hq, b.hkv, b.d, b.page_size, q_data_type="bfloat16")
    return w, b


def test_error_q_dtype(planned):
    w, b = planned
    with pytest.raises(TypeError, match="q: dtype float16 does not match the planned q_data_type bfloat16"):
        w.run(rand(b.q.shape, "float16"), b.cache)


def test_error_q_shape_and_cpu(planned):
    w, b = planned
    with pytest.raises(ValueError, match=r"q: expected shape \(2, 32, 128\)"):
        w.run(b.q[:, :16], b.cache)
    with pytest.raises(ValueError, match="q: expected an array on a CUDA device, got one on CPU"):
        w.run(cp.asnumpy(bits(b.q)).view(BF16), b.cache)  # a host bfloat16 array (copied as its bits)


def test_error_non_contiguous_q(planned):
    w, b = planned
    qt = empty((2, 32, 256), "bfloat16")[:, :, ::2]
    with pytest.raises(ValueError, match="q: the last dim must be contiguous"):
        w.run(qt, b.cache)


def test_error_cache_mismatch(planned):
    w, b = planned
    with pytest.raises(ValueError, match="paged_kv_cache: expected shape"):
        w.run(b.q, b.cache[:, 0])
    with pytest.raises(TypeError, match="paged_kv_cache: dtype float16 does not match the planned kv_data_type"):
        w.run(b.q, empty(b.cache.shape, "float16"))
    with pytest.raises(ValueError, match="does not match the plan"):
        w.run(b.q, b.cache[:, :, :8])


def test_error_page_index_out_of_range():
    b = PagedBatch([10, 40], spare_pages=0)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    bad = b.indices.copy()
    bad[0] = b.cache.shape[0] + 5
    w.plan(b.indptr, bad, b.last_page_len, b.hq, b.hkv, b.d, b.page_size, q_data_type="bfloat16")
    with pytest.raises(ValueError, match=r"indices: page index \d+ is out of range for a cache of \d+ pages"):
        w.run(b.q, b.cache)


def test_error_out_buffer(planned):
    w, b = planned
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 32, 128\)"):
        w.run(b.q, b.cache, out=empty((2, 32, 64), "bfloat16"))
    with pytest.raises(TypeError, match="lse: dtype bfloat16 does not match the lse dtype"):
        w.run(b.q, b.cache, lse=empty((2, 32), "bfloat16"), return_lse=True)


def test_error_plan_arguments():
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    with pytest.raises(ValueError, match="num_qo_heads .* must be a multiple of num_kv_heads"):
        w.plan(np.array([0, 1]), np.array([0]), np.array([1]), 30, 8, 128, 16)
    with pytest.raises(ValueError, match="head_dim: 72 is not supported"):
        w.plan(np.array([0, 1]), np.array([0]), np.array([1]), 32, 8, 72, 16)
    with pytest.raises(ValueError, match="indptr: must be non-decreasing"):
        w.plan(np.array([0, 2, 1]), np.array([0, 1]), np.array([1, 1]), 32, 8, 128, 16)
    with pytest.raises(RuntimeError, match="run\\(\\) called before plan\\(\\)"):
        fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace()).run(None, None)


def test_error_workspace_too_small():
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cp.empty(1024, dtype=cp.uint8))
    with pytest.raises(ValueError, match="float_workspace_buffer: 1024 bytes is too small"):
        w.plan(np.array([0, 1]), np.array([0]), np.array([1]), 32, 8, 128, 16)


def test_error_single_decode_inputs():
    q = rand((32, 128), "bfloat16")
    k = rand((10, 8, 128), "bfloat16")
    with pytest.raises(ValueError, match="v: must match k"):
        fi_cupy.single_decode_with_kv_cache(q, k, k[:5])
    with pytest.raises(ValueError, match="k: head_dim 64 does not match q's head_dim 128"):
        fi_cupy.single_decode_with_kv_cache(q, k[..., :64], k[..., :64])
    with pytest.raises(ValueError, match="kv_layout: 'NDH' is not one of"):
        fi_cupy.single_decode_with_kv_cache(q, k, k, kv_layout="NDH")
    with pytest.raises(TypeError, match="q: dtype float32 is not supported"):
        fi_cupy.single_decode_with_kv_cache(rand(q.shape, "float32"), k, k)
