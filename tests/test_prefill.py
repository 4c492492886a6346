"""Prefill attention on the GPU (CuPy callers) against a float64 reference.

Accuracy rule (relative, so it holds for every dtype): the kernel's max error against the float64
reference (fi_cupy.reference.prefill_attention, on the GPU) is at most twice that of the same attention
computed naively in the input precision (`attention` below: scores, softmax and P V each rounded to the
input dtype with float32 arithmetic between, as torch's bf16/fp16 ops do them). Outputs are poisoned with
NaN first; every case draws fresh random inputs (tests/gpu_arrays.py); page tables are shuffled; a float8
cache is its bytes (uint8) planned with kv_data_type. Every test runs on both kernels (the prefill_kernel
fixture).

Coverage of test_path_grid (one item per KV source x group x length shape, on each backend; head_dim,
mask, dtype and layout rotate). Derived from fi_cupy/prefill.py (plan_tile, pick_tile, tile_shapes,
kv_tile, AUTO_MIN_ROWS) and scheduler.prefill_schedule; every item asserts the tile and merge it
should reach (GRID_FA2_TILES, GRID_FA3_TILE), and test_path_grid_covers_every_path_group_and_source
checks that the grid reaches every path at every group and source:

  axis     value                          reaches
  backend  fa3 (d 64 / 128, K/V in the    prefill_sm90_kernel<D, T, PAGED, FLAGS>: 128 packed rows,
           q dtype, no RoPE)              128-key tiles (a d256 item skips: fa2 runs the same case)
           fa2                            prefill_kernel<D, MT, WARPS, QT, KVT, PAGED, ROPE, FLAGS>, by shape:
  shape    small: packed rows <= 64       MT=1 x 4 warps (64 rows), 64 keys a KV tile (d64, d128), 32 (d256)
           large: 200 x group rows        d64: MT=2 x 4 (128 rows, 64 keys); d128: MT=2 x 4 (128 rows,
                                          32 keys), with a custom mask MT=1 x 4 (64 rows, 64 keys);
                                          d256: MT=1 x 8 (128 rows, 32 keys)
           split: kv 2500 and 1100 under  few work items, so the KV range is cut in chunks of >= 512 keys:
           few queries                    prefill_merge_kernel<D, T> (plan num_merges > 0); the tile as
                                          small / large by its packed rows
  source   paged (page 1, 7, 8, 16), ragged, single (the shape's first request)
  group    1 (2 qo / 2 kv heads), 4 (8 / 2), 8 (16 / 2); packed row = token x group + head
  mask     causal (bottom-right) or a random custom mask with a row that sees nothing, rotating (large
           d128 stays causal: a mask takes the 64-row tile there)

Every shape has qo_len 0 and kv_len 0 requests, qo_len > kv_len (causal rows that see no key; at qo 200
over kv 50 whole 128-row items see none), and lengths off every tile (64 / 128 rows, 32 / 64 / 128
keys). test_fp8_paged_grid: fp8 K/V (fa2 only) at groups 1, 4, 8 x page sizes 1, 8, 16.

The other head dims (every multiple of 16 from 16 to 256, and 512; portable kernel only) and head_dim_vo
!= head_dim_qk (192 / 128, 128 / 64) have a section of their own at the end: single prefill at each new
head dim (test_single_head_dims), a source x group x shape grid with soft cap / window, custom masks,
ALiBi and sinks rotating (test_head_dim_grid), head_dim 512 (test_head_dim_512), the qk / vo pairs
(test_head_dim_qk_vo), fp8 K/V on the ragged wrapper and single prefill (test_fp8_ragged,
test_fp8_single), "auto" falling back to the portable kernel on sm_90a, and the refusals.
"""
import math

import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from gpu_arrays import FP8, bits, capture, contiguous, dtype_name, empty, f64, f64_dev, nan_like, poison, rand, \
    replay, rng, take, to_torch, uniform
from tolerances import OUT_TOL, assert_lse_close

try:
    import torch
except ImportError:  # only the float8 single prefill test (a torch caller) needs it
    torch = None

pytestmark = pytest.mark.gpu
needs_torch_cuda = pytest.mark.skipif(torch is None or not torch.cuda.is_available(),
                                      reason="needs torch with CUDA (float8 single prefill is a torch caller)")


def _round(x, dtype: str):
    """x's values rounded to `dtype` (float16 / bfloat16: to nearest even), as float32."""
    x = x.astype(cp.float32, copy=False)
    if dtype == "float16":
        return x.astype(cp.float16).astype(cp.float32)
    if dtype == "bfloat16":
        b = x.view(cp.uint32)
        return ((b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000).astype(cp.uint32, copy=False).view(cp.float32)
    return x


def _dev(x):
    """x as float64 on the GPU; float64 arrays (K/V already dequantised) pass through."""
    return x if x.dtype == cp.float64 else f64_dev(x)


def _lse_nan(q):
    return cp.full(q.shape[:2], np.nan, dtype=cp.float32)


def attention(q, k, v, causal=False, window_left=-1, mask=None, soft_cap=0.0, sm_scale=None, rope=False,
              dtype="float64", sinks=None, alibi=False):
    """One request computed naively on the GPU in `dtype`. "float64" rounds nothing (it agrees with
    fi_cupy.reference.prefill_attention); "float16" / "bfloat16" round each step's result to that dtype,
    float32 arithmetic in between, as torch computes on such tensors: the accuracy rule's baseline.
    q (Lq, Hq, D), k/v (Lk, Hkv, D) CuPy arrays (16-bit, or float64 holding such values); mask bool
    (Lq, Lk); sinks float32 (Hq,) or None. alibi: reference.alibi_bias added to the scaled scores in
    float32 (float64 unrounded), the sum not rounded to `dtype`: the baseline's error stays that of the
    scores alone, so ALiBi gives the kernel no more room. v may have another head dim (head_dim_vo):
    o takes it, the default scale stays 1 / sqrt(q's). Returns (o, lse base 2), float64 CuPy arrays."""
    q, k, v = _dev(q), _dev(k), _dev(v)
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    o, lse = cp.zeros((lq, hq, v.shape[-1])), cp.full((lq, hq), -np.inf)
    work = np.float64 if dtype == "float64" else np.float32
    rnd = (lambda x: x) if dtype == "float64" else (lambda x: _round(x, dtype))  # noqa: E731

    def finish(o, lse):
        if sinks is None:
            return o, lse
        # the sink scales each finished row: one more step, rounded as the others
        o, lse = reference.with_sinks(o, lse, sinks)
        return rnd(o.astype(work)).astype(cp.float64), lse

    if lq == 0 or lk == 0:
        return finish(o, lse)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    qpos = cp.arange(lq) + lk - lq
    if rope:
        q = reference.rope_llama(q.transpose(1, 0, 2), qpos).transpose(1, 0, 2)
        k = reference.rope_llama(k.transpose(1, 0, 2), cp.arange(lk)).transpose(1, 0, 2)
    q, k, v = (rnd(x.astype(work)) for x in (q, k, v))
    keep = cp.ones((lq, lk), dtype=bool)
    j = cp.arange(lk)[None, :]
    if causal:
        keep &= j <= qpos[:, None]
    if window_left >= 0:
        keep &= j >= qpos[:, None] - window_left
    if mask is not None:
        keep &= mask
    g = hq // hkv
    qh = q.transpose(1, 0, 2)  # (Hq, Lq, D); query head h reads KV head h // g
    kh, vh = (cp.repeat(x, g, axis=1).transpose(1, 0, 2) for x in (k, v))
    hstep = 8
    rstep = max(1, min(lq, (1 << 27) // (hstep * lk)))  # heads and rows in blocks: bounded memory
    for h0 in range(0, hq, hstep):
        hs = slice(h0, min(hq, h0 + hstep))
        for r0 in range(0, lq, rstep):
            rs = slice(r0, min(lq, r0 + rstep))
            s = rnd(rnd(cp.matmul(qh[hs, rs], kh[hs].transpose(0, 2, 1))) * work(scale))
            if alibi:  # slope_h * (key position - query position), as the scores are formed
                s = s + reference.alibi_bias(hq, qpos[rs], cp.arange(lk), cp, cp.arange(hs.start, hs.stop)).astype(work)
            if soft_cap:
                s = rnd(work(soft_cap) * rnd(cp.tanh(rnd(s / work(soft_cap)))))
            s = cp.where(keep[None, rs], s, work(-np.inf))
            m = s.max(axis=-1, keepdims=True)
            e = cp.exp(s - m)  # NaN on a row that sees nothing: 0 after nan_to_num
            p = cp.nan_to_num(rnd(e / e.sum(axis=-1, keepdims=True)), nan=0.0)
            o[rs, hs] = rnd(cp.matmul(p, vh[hs])).transpose(1, 0, 2)
            m64 = cp.where(cp.isfinite(m), m, work(0)).astype(cp.float64)
            sums = cp.exp(s.astype(cp.float64) - m64).sum(axis=-1)
            lse[rs, hs] = ((m64[..., 0] + cp.log(sums)) / math.log(2.0)).T
    return finish(o, lse)


def check(out, q, k, v, lse=None, **kw):
    """The accuracy rule, the lse, and no NaN. k/v in q's dtype, or float64 holding values of it."""
    ref, ref_lse = reference.prefill_attention(
        _dev(q), _dev(k), _dev(v), causal=kw.get("causal", False), window_left=kw.get("window_left", -1),
        custom_mask=kw.get("mask"), logits_soft_cap=kw.get("soft_cap", 0.0), sm_scale=kw.get("sm_scale"),
        rope=kw.get("rope", False), sinks=kw.get("sinks"), alibi=kw.get("alibi", False))
    naive, _ = attention(q, k, v, dtype=dtype_name(q), **kw)
    got = f64_dev(out)
    assert not cp.isnan(got).any(), "NaN in output (unwritten or invalid elements)"
    err = float(cp.abs(got - ref).max())
    base = float(cp.abs(naive - ref).max())
    assert err <= 2 * base + 1e-6, f"max error {err:.3g} > 2 x naive {dtype_name(q)} error {base:.3g}"
    if lse is not None:
        assert_lse_close(f64(lse), cp.asnumpy(ref_lse))
    return err, base


@pytest.fixture(autouse=True, params=["fa2", "fa3"])
def prefill_kernel(request, monkeypatch):
    """Every test runs on both kernels: "fa2" the portable one, "fa3" the Hopper one wherever it
    applies (backend "auto" with no minimum tile: other variants still take the portable kernel)."""
    from fi_cupy import prefill
    from fi_cupy._core import kernels
    if request.param == "fa3" and kernels.device_arch(0) != "sm_90a":
        pytest.skip("the Hopper prefill kernel needs an sm_90a GPU")
    monkeypatch.setattr(prefill, "AUTO_MIN_ROWS", 0 if request.param == "fa3" else 1 << 62)
    return request.param


# ---------------------------------------------------------------------------------------------
# Single prefill


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("qo,kv,hq,hkv", [(1, 1, 4, 4), (7, 113, 8, 1), (113, 1023, 8, 2), (1023, 1023, 4, 4),
                                          (257, 4097, 8, 1)])
def test_single(d, dtype, causal, qo, kv, hq, hkv):
    q, k, v = rand((qo, hq, d), dtype), rand((kv, hkv, d), dtype), rand((kv, hkv, d), dtype)
    out = nan_like(q)
    o, lse = fi_cupy.single_prefill_with_kv_cache(q, k, v, causal=causal, return_lse=True, out=out)
    assert o is out
    check(o, q, k, v, lse, causal=causal)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_single_options(layout):
    """Window, soft cap, sm_scale, HND, and a large-magnitude input."""
    q, k, v = rand((300, 8, 128), "bfloat16", 3.0), rand((700, 2, 128), "bfloat16"), rand((700, 2, 128), "bfloat16")
    kk, vv = (k, v) if layout == "NHD" else (contiguous(k.transpose(1, 0, 2)), contiguous(v.transpose(1, 0, 2)))
    for kw in ({"causal": True, "window_left": 100}, {"window_left": 37}, {"logits_soft_cap": 30.0},
               {"causal": True, "logits_soft_cap": 5.0, "sm_scale": 0.3}):
        o, lse = fi_cupy.single_prefill_with_kv_cache(q, kk, vv, kv_layout=layout, return_lse=True, **kw)
        ref_kw = {"causal": kw.get("causal", False), "window_left": kw.get("window_left", -1),
                  "soft_cap": kw.get("logits_soft_cap", 0.0), "sm_scale": kw.get("sm_scale")}
        check(o, q, k, v, lse, **ref_kw)


@pytest.mark.parametrize("packed", [False, True])
def test_single_custom_mask(packed):
    qo, kv = 150, 333
    q, k, v = rand((qo, 8, 64), "float16"), rand((kv, 4, 64), "float16"), rand((kv, 4, 64), "float16")
    mask = uniform((qo, kv)) > 0.4
    mask[5] = False  # a row that sees nothing: o = 0, lse = -inf
    arg = {"packed_custom_mask": fi_cupy.packbits(mask.reshape(-1), bitorder="little")} if packed else \
        {"custom_mask": mask}
    o, lse = fi_cupy.single_prefill_with_kv_cache(q, k, v, return_lse=True, **arg)
    check(o, q, k, v, lse, mask=mask)
    assert np.all(f64(o[5]) == 0) and np.all(np.isneginf(f64(lse[5])))


def test_custom_mask_replaces_causal():
    """As in FlashInfer (mask mode CUSTOM), a custom mask replaces the causal mask: causal=True is
    ignored when one is given (single prefill and the ragged wrapper). All-ones masks with qo < kv:
    every key is seen, which the causal mask would have hidden from the first rows."""
    qo, kv = 40, 100
    q, k, v = rand((qo, 8, 64), "float16"), rand((kv, 2, 64), "float16"), rand((kv, 2, 64), "float16")
    mask = uniform((qo, kv)) > 0.3
    o = fi_cupy.single_prefill_with_kv_cache(q, k, v, custom_mask=mask, causal=True)
    check(o, q, k, v, mask=mask)
    w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(cp.empty(32 << 20, dtype=cp.uint8))
    w.plan(np.array([0, qo], np.int32), np.array([0, kv], np.int32), 8, 2, 64, custom_mask=mask.reshape(-1),
           causal=True, q_data_type="float16")
    check(w.run(q, k, v), q, k, v, mask=mask)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_single_rope(d):
    q, k, v = rand((77, 4, d), "bfloat16"), rand((200, 2, d), "bfloat16"), rand((200, 2, d), "bfloat16")
    o = fi_cupy.single_prefill_with_kv_cache(q, k, v, causal=True, pos_encoding_mode="ROPE_LLAMA")
    check(o, q, k, v, causal=True, rope=True)


def test_split_kv_long_context():
    """Few query rows on a long context: the KV range is cut over CTAs and merged."""
    q, k, v = rand((3, 8, 128), "bfloat16"), rand((131072, 1, 128), "bfloat16"), rand((131072, 1, 128), "bfloat16")
    o, lse = fi_cupy.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True)
    check(o, q, k, v, lse, causal=True)


def test_long_query():
    """qo_len 32768 causal (one head pair), checked on every row."""
    n = 32768
    q, k, v = rand((n, 1, 128), "bfloat16"), rand((n, 1, 128), "bfloat16"), rand((n, 1, 128), "bfloat16")
    o, lse = fi_cupy.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True)
    check(o, q, k, v, lse, causal=True)


@pytest.mark.parametrize("sinks", [False, True])
def test_reference_agrees_with_numpy(sinks):
    """The CuPy helper above, rounding nothing, and fi_cupy.reference.prefill_attention on the host
    compute the same thing (the baseline differs from the reference by its roundings alone)."""
    q, k, v = rand((9, 4, 64), "float16"), rand((20, 2, 64), "float16"), rand((20, 2, 64), "float16")
    mask = uniform((9, 20)) > 0.3
    s = rand((4,), "float32", 2.0) if sinks else None
    o, lse = attention(q, k, v, causal=True, window_left=6, mask=mask, soft_cap=7.0, rope=True, sinks=s)
    ro, rl = reference.prefill_attention(f64(q), f64(k), f64(v), causal=True, window_left=6,
                                         custom_mask=cp.asnumpy(mask), logits_soft_cap=7.0, rope=True,
                                         sinks=None if s is None else f64(s))
    np.testing.assert_allclose(cp.asnumpy(o), ro, atol=1e-12)
    np.testing.assert_allclose(cp.asnumpy(lse), rl, atol=1e-12)


@pytest.mark.parametrize("sinks", [False, True])
def test_reference_agrees_with_numpy_alibi(sinks):
    """As above with ALiBi (no RoPE, no soft cap beside it), qo < kv so that the query positions matter."""
    q, k, v = rand((9, 12, 64), "float16"), rand((20, 4, 64), "float16"), rand((20, 4, 64), "float16")
    mask = uniform((9, 20)) > 0.3
    s = rand((12,), "float32", 2.0) if sinks else None
    o, lse = attention(q, k, v, causal=True, window_left=12, mask=mask, alibi=True, sinks=s)
    ro, rl = reference.prefill_attention(f64(q), f64(k), f64(v), causal=True, window_left=12,
                                         custom_mask=cp.asnumpy(mask), alibi=True, sinks=None if s is None else f64(s))
    np.testing.assert_allclose(cp.asnumpy(o), ro, atol=1e-12)
    np.testing.assert_allclose(cp.asnumpy(lse), rl, atol=1e-12)
    plain, _ = reference.prefill_attention(f64(q), f64(k), f64(v), causal=True, window_left=12,
                                           custom_mask=cp.asnumpy(mask), sinks=None if s is None else f64(s))
    assert np.abs(plain - ro).max() > 1e-2  # the bias is there


# ---------------------------------------------------------------------------------------------
# Batch: paged and ragged


class Batch:
    """A paged batch: a random cache with a shuffled page table and spare pages. d_vo (V's head dim) other
    than d: the cache is a (k_cache, v_cache) pair of 4-D arrays, the only form that holds two head dims."""

    def __init__(self, qo_lens, kv_lens, page_size=16, hq=8, hkv=2, d=128, dtype="bfloat16", kv_dtype=None,
                 layout="NHD", cache=None, d_vo=None):
        kv_dtype = kv_dtype or dtype
        self.d_vo = d if d_vo is None else d_vo
        self.qo_lens, self.kv_lens, self.ps, self.layout = list(qo_lens), list(kv_lens), page_size, layout
        self.qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
        npages = [math.ceil(n / page_size) for n in kv_lens]
        total = sum(npages) + 2 if cache is None else cache.shape[0]
        perm = rng().permutation(total)
        self.kv_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
        self.indices = perm[: self.kv_indptr[-1]].astype(np.int32)
        self.last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, npages)], np.int32)
        if self.d_vo == d:
            shape = (total, 2, page_size, hkv, d) if layout == "NHD" else (total, 2, hkv, page_size, d)
            self.cache = rand(shape, kv_dtype) if cache is None else cache  # float8: its bytes (uint8)
        else:
            self.cache = tuple(rand((total, page_size, hkv, x) if layout == "NHD" else (total, hkv, page_size, x),
                                    kv_dtype) for x in (d, self.d_vo)) if cache is None else cache
        self.kv_dtype = kv_dtype
        self.q = rand((int(self.qo_indptr[-1]), hq, d), dtype)
        self.hkv, self.d = hkv, d

    def kv(self, r):
        """(k, v) of request r: float64 CuPy arrays (kv_len, hkv, d / d_vo), float8 dequantised (unscaled)."""
        ids = self.indices[self.kv_indptr[r]: self.kv_indptr[r + 1]]
        if isinstance(self.cache, tuple):  # (k_cache, v_cache) of two head dims
            pages = [f64_dev(take(c, ids), self.kv_dtype) for c in self.cache]
            if self.layout == "HND":
                pages = [x.transpose(0, 2, 1, 3) for x in pages]
            return tuple(x.reshape(-1, self.hkv, x.shape[-1])[: self.kv_lens[r]] for x in pages)
        pages = f64_dev(take(self.cache, ids), self.kv_dtype)
        if self.layout == "HND":
            pages = pages.transpose(0, 1, 3, 2, 4)
        kv = pages.transpose(1, 0, 2, 3, 4).reshape(2, -1, self.hkv, self.d)[:, : self.kv_lens[r]]
        return kv[0], kv[1]

    def check(self, out, lse=None, v_scale=1.0, k_scale=1.0, **kw):
        for r in range(len(self.qo_lens)):
            a, b = self.qo_indptr[r], self.qo_indptr[r + 1]
            if a == b:
                continue
            k, v = self.kv(r)
            q = self.q[a:b]
            if self.kv_dtype in FP8:  # the reference sees the dequantised values, scaled, in q's dtype
                k, v = (_round(x * s, dtype_name(q)).astype(cp.float64) for x, s in ((k, k_scale), (v, v_scale)))
            check(out[a:b], q, k, v, None if lse is None else lse[a:b], **kw)


def _ws():
    return cp.empty(256 * 1024 * 1024, dtype=cp.uint8)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("page_size", [1, 16, 7])
def test_batch_paged(layout, causal, page_size):
    # Mixed: long and short, qo < kv (append), qo 0, kv 0 (qo > 0 with nothing to see).
    b = Batch([300, 1, 0, 17, 64, 5], [1100, 40, 9, 17, 2000, 0], page_size=page_size, layout=layout)
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), layout)
    w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 8, 2, 128, page_size, causal=causal, q_data_type="bfloat16")
    out, lse = nan_like(b.q), _lse_nan(b.q)
    o, l2 = w.run(b.q, b.cache, out=out, lse=lse, return_lse=True)
    assert o is out and l2 is lse
    b.check(o, lse, causal=causal)
    a = b.qo_indptr[5]
    assert np.all(f64(o[a:]) == 0) and np.all(np.isneginf(f64(lse[a:])))


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_batch_paged_gqa(d, group):
    b = Batch([40, 129, 3], [40, 700, 1500], hq=2 * group, hkv=2, d=d, dtype="float16")
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 2 * group, 2, d, 16, causal=True, q_data_type="float16")
    b.check(w.run(b.q, (b.cache[:, 0], b.cache[:, 1])), causal=True)


@pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_batch_paged_fp8(kv_dtype):
    b = Batch([100, 7], [500, 300], kv_dtype=kv_dtype)
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 8, 2, 128, 16, causal=True, q_data_type="bfloat16",
           kv_data_type=kv_dtype)
    o1 = w.run(b.q, b.cache)
    b.check(o1, causal=True)
    o2 = w.run(b.q, b.cache, k_scale=0.5, v_scale=2.0)  # a scale that is ignored fails here
    b.check(o2, causal=True, k_scale=0.5, v_scale=2.0)
    assert not np.array_equal(f64(o1), f64(o2))


def test_batch_paged_rope_softcap_window():
    b = Batch([60, 200], [300, 200])
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 8, 2, 128, 16, causal=True, pos_encoding_mode="ROPE_LLAMA",
           logits_soft_cap=20.0, window_left=90, q_data_type="bfloat16")
    b.check(w.run(b.q, b.cache), causal=True, rope=True, soft_cap=20.0, window_left=90)


def test_batch_paged_custom_mask():
    b = Batch([30, 0, 45], [50, 10, 45])
    masks = [uniform((q, k)) > 0.5 for q, k in zip(b.qo_lens, b.kv_lens)]
    flat = cp.concatenate([m.reshape(-1) for m in masks])
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 8, 2, 128, 16, custom_mask=flat, q_data_type="bfloat16")
    o = w.run(b.q, b.cache)
    for r, m in enumerate(masks):
        a, e = b.qo_indptr[r], b.qo_indptr[r + 1]
        if a < e:
            k, v = b.kv(r)
            check(o[a:e], b.q[a:e], k, v, mask=m)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_batch_ragged(layout):
    qo_lens, kv_lens = [128, 1, 0, 700, 33], [128, 300, 5, 900, 0]
    qo_ip = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_ip = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q = rand((int(qo_ip[-1]), 16, 64), "float16")
    k, v = rand((int(kv_ip[-1]), 4, 64), "float16"), rand((int(kv_ip[-1]), 4, 64), "float16")
    kk, vv = (k, v) if layout == "NHD" else (contiguous(k.transpose(1, 0, 2)), contiguous(v.transpose(1, 0, 2)))
    w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_ws(), layout)
    w.plan(qo_ip, kv_ip, 16, 4, 64, causal=True, q_data_type="float16")
    o, lse = w.run(q, kk, vv, return_lse=True)
    for r in range(len(qo_lens)):
        a, e = qo_ip[r], qo_ip[r + 1]
        if a < e:
            check(o[a:e], q[a:e], k[kv_ip[r]:kv_ip[r + 1]], v[kv_ip[r]:kv_ip[r + 1]], lse[a:e], causal=True)


def test_cuda_graph_replans():
    """Capture run() once; re-plan other lengths on the same wrapper; a replay gives the new plan's result."""
    b1 = Batch([200, 50], [600, 50])
    b2 = Batch([10, 300], [350, 300], cache=b1.cache)  # other lengths, pages of the same cache
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), use_cuda_graph=True)
    q = empty((400, 8, 128), "bfloat16")
    out = empty(q.shape, "bfloat16")

    def plan(b):
        w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 8, 2, 128, 16, causal=True, q_data_type="bfloat16")

    plan(b1)
    bits(q)[:250] = bits(b1.q)
    graph, s = capture(lambda: w.run(q, b1.cache, out=out))
    for b in (b1, b2):
        plan(b)
        n = b.q.shape[0]
        bits(q)[:n] = bits(b.q)
        poison(out)
        replay(graph, s)
        b.check(out[:n], causal=True)


# ---------------------------------------------------------------------------------------------
# Coverage grid: every kernel path x group size x KV source (table in the module docstring).

GRID_GROUPS = {1: (2, 2), 4: (8, 2), 8: (16, 2)}  # group -> (num_qo_heads, num_kv_heads)
GRID_SOURCES = ("paged1", "paged7", "paged8", "paged16", "ragged", "single")
GRID_SHAPES = ("small", "large", "split")
# prefill_kernel's (MT, warps, keys a KV tile) by head_dim and tile; prefill_sm90_kernel's.
GRID_FA2_TILES = {(64, "small"): (1, 4, 64), (64, "large"): (2, 4, 64),
                  (128, "small"): (1, 4, 64), (128, "large"): (2, 4, 32),
                  (256, "small"): (1, 4, 64), (256, "large"): (1, 4, 64)}  # 256: split stages, 64 rows always
GRID_FA2_FP8_KV = {256: 32}  # keys a KV tile where fp8 K/V changes it (no split stages: a raw stage beside)
GRID_FA3_TILE = (1, 8, 128)


def _grid_lens(shape: str, group: int) -> tuple:
    """(qo_lens, kv_lens): qo 0 and kv 0 requests, qo_len > kv_len, lengths off every tile."""
    cap = 64 // group  # query tokens whose packed rows just fill the 64-row tile
    return {"small": ([cap, 0, 1, 3, cap - 1], [cap // 2, 5, 0, 70, 129]),
            "large": ([200, 0, 1, 130, 5, 40], [50, 9, 0, 300, 1, 17]),
            "split": ([20, 0, 3, 1], [2500, 40, 1100, 0])}[shape]


def _grid_path(backend: str, d: int, packed_rows: int, masked: bool) -> tuple:
    """(path name, (MT, warps, keys a KV tile)) a grid item must reach: the fixture's backend "fa3"
    where the Hopper kernel applies (every grid item has K/V in the q dtype and no RoPE)."""
    if backend == "fa3" and d in (64, 128):
        return "sm90", GRID_FA3_TILE
    tile = "small" if packed_rows <= 64 or (masked and d == 128) else "large"
    return f"fa2-{tile}", GRID_FA2_TILES[(d, tile)]


def _prefill_grid() -> list:
    cases = []
    for si, source in enumerate(GRID_SOURCES):
        for gi, group in enumerate(GRID_GROUPS):
            for hi, shape in enumerate(GRID_SHAPES):
                i, turn = len(cases), si + gi + hi
                d = (64, 128)[i % 2] if shape == "split" else (64, 128, 256)[turn % 3]  # split: both backends
                masked = turn % 2 == 1 and not (shape == "large" and d == 128)
                dtype = ("float16", "bfloat16")[i // 2 % 2]
                layout = ("NHD", "HND")[i // 3 % 2]
                cases.append(pytest.param(source, group, shape, d, dtype, layout, masked,
                                          id=f"{source}-g{group}-{shape}-d{d}-{'mask' if masked else 'causal'}"
                                             f"-{dtype}-{layout}"))
    return cases


def _dead_rows(qo_len: int, kv_len: int, causal: bool, mask):
    """Query rows of one request that see no key (o = 0, lse = -inf on every head): a CuPy bool array."""
    dead = cp.full((qo_len,), kv_len == 0, dtype=bool)
    if causal:
        dead |= cp.arange(qo_len) < qo_len - kv_len
    if mask is not None:
        dead |= ~mask.any(axis=1)
    return dead


def _check_requests(out, lse, q, qo_indptr, kv_of, causal: bool, masks, sinks=None, **kw) -> None:
    """Each request against the reference, and its rows that see no key exactly 0 / -inf (with sinks:
    lse the sink alone, sinks / ln 2). kw: more of check()'s options (alibi, window_left; a window never
    hides a row's own position, so the rows that see no key stay those of causal, the mask and kv_len)."""
    for r in range(qo_indptr.size - 1):
        a, e = int(qo_indptr[r]), int(qo_indptr[r + 1])
        if a == e:
            continue
        k, v = kv_of(r)
        m = None if masks is None else masks[r]
        check(out[a:e], q[a:e], k, v, lse[a:e], causal=causal, mask=m, sinks=sinks, **kw)
        dead = _dead_rows(e - a, k.shape[0], causal, m)
        assert cp.all(f64_dev(out[a:e])[dead] == 0), f"request {r}"
        dead_lse = lse[a:e][dead]
        if sinks is None:
            assert cp.all(cp.isneginf(dead_lse)), f"request {r}"
        else:
            want = cp.broadcast_to(sinks.astype(cp.float64) / math.log(2.0), dead_lse.shape)
            assert cp.allclose(dead_lse, want, rtol=1e-5, atol=1e-6), f"request {r}: lse of rows that see no key"


@pytest.mark.parametrize("source,group,shape,d,dtype,layout,masked", _prefill_grid())
def test_path_grid(source, group, shape, d, dtype, layout, masked, prefill_kernel):
    from fi_cupy import prefill
    if prefill_kernel == "fa3" and d not in prefill.SM90_HEAD_DIMS:
        pytest.skip(f"fa3 takes head_dim {prefill.SM90_HEAD_DIMS}: the fa2 item runs this case")
    hq, hkv = GRID_GROUPS[group]
    qo_lens, kv_lens = _grid_lens(shape, group)
    if source == "single":
        qo_lens, kv_lens = qo_lens[:1], kv_lens[:1]
    masks = None
    if masked:
        masks = [uniform((a, b)) > 0.5 for a, b in zip(qo_lens, kv_lens)]
        for m in masks:
            m[:1] = False  # a row that sees nothing
    flat = None if masks is None else cp.concatenate([m.reshape(-1) for m in masks])
    causal = not masked
    qo_ip = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    if source.startswith("paged"):
        ps = int(source[len("paged"):])
        b = Batch(qo_lens, kv_lens, page_size=ps, hq=hq, hkv=hkv, d=d, dtype=dtype, layout=layout)
        q, kv_of = b.q, b.kv
        w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), layout)
        w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, hq, hkv, d, ps, causal=causal, custom_mask=flat,
               q_data_type=dtype)
        call = lambda out, lse: w.run(q, b.cache, out=out, lse=lse, return_lse=True)  # noqa: E731
    else:
        kv_ip = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
        q = rand((int(qo_ip[-1]), hq, d), dtype)
        k, v = rand((int(kv_ip[-1]), hkv, d), dtype), rand((int(kv_ip[-1]), hkv, d), dtype)
        kk, vv = (k, v) if layout == "NHD" else (contiguous(k.transpose(1, 0, 2)), contiguous(v.transpose(1, 0, 2)))
        kv_of = lambda r: (k[kv_ip[r]:kv_ip[r + 1]], v[kv_ip[r]:kv_ip[r + 1]])  # noqa: E731
        if source == "ragged":
            w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_ws(), layout)
            w.plan(qo_ip, kv_ip, hq, hkv, d, causal=causal, custom_mask=flat, q_data_type=dtype)
            call = lambda out, lse: w.run(q, kk, vv, out=out, lse=lse, return_lse=True)  # noqa: E731
        else:
            call = lambda out, lse: fi_cupy.single_prefill_with_kv_cache(  # noqa: E731
                q, kk, vv, custom_mask=flat if masks is None else masks[0], causal=causal, kv_layout=layout,
                return_lse=True, out=out, lse=lse)
    out, lse = nan_like(q), _lse_nan(q)
    o, l2 = call(out, lse)
    assert o is out and l2 is lse
    # The path this item names, so the grid cannot drift to one kernel unnoticed.
    plan = next(reversed(prefill._single_plans.values())) if source == "single" else w._plan
    name, want = _grid_path(prefill_kernel, d, max(qo_lens) * group, masked)
    assert (plan.tile.mt, plan.tile.warps, prefill.kv_tile(d, plan.tile, plan.params.kv_dtype)) == want
    assert plan.tile.sm90 == (name == "sm90")
    assert (plan.num_merges > 0) == (shape == "split"), f"num_merges {plan.num_merges}"
    _check_requests(out, lse, q, qo_ip, kv_of, causal, masks)


def test_path_grid_covers_every_path_group_and_source(prefill_kernel):
    """The grid itself: every path of each backend at every group and KV source, with and without
    a custom mask; every fa2 tile of every head_dim."""
    if prefill_kernel == "fa3":
        pytest.skip("checks the cells of both backends at once")
    reached, fa2_tiles = set(), set()
    for c in _prefill_grid():
        source, group, shape, d, _, _, masked = c.values
        rows = max(_grid_lens(shape, group)[0]) * group
        for backend in ("fa2", "fa3") if d in (64, 128) else ("fa2",):
            name, tile = _grid_path(backend, d, rows, masked)
            reached |= {(backend, name, group, source), (backend, name, group, masked)}
            if shape == "split":
                reached |= {(backend, "merge", group, source), (backend, "merge", group, masked)}
            if backend == "fa2":
                fa2_tiles.add((d, tile))
    paths = {"fa2": ("fa2-small", "fa2-large", "merge"), "fa3": ("sm90", "merge")}
    want = {(b, p, g, x) for b in paths for p in paths[b] for g in GRID_GROUPS for x in GRID_SOURCES + (False, True)}
    assert not want - reached, sorted(map(str, want - reached))
    assert fa2_tiles == {(d, tile) for (d, _), tile in GRID_FA2_TILES.items()}


@pytest.mark.parametrize("group", list(GRID_GROUPS))
@pytest.mark.parametrize("page_size", [1, 8, 16])
def test_fp8_paged_grid(group, page_size, prefill_kernel):
    """fp8 K/V (portable kernel only) at every group and page size: small and large tiles, d 64 / 128 / 256."""
    if prefill_kernel == "fa3":
        pytest.skip("fa3 takes K/V in the q dtype only: the fa2 item runs this case")
    from fi_cupy import prefill
    i = list(GRID_GROUPS).index(group) + (1, 8, 16).index(page_size)
    shape, d = ("small", "large")[i % 2], (64, 128, 256)[i % 3]
    kv_dtype = ("float8_e4m3fn", "float8_e5m2")[page_size % 2]
    hq, hkv = GRID_GROUPS[group]
    qo_lens, kv_lens = _grid_lens(shape, group)
    b = Batch(qo_lens, kv_lens, page_size=page_size, hq=hq, hkv=hkv, d=d, kv_dtype=kv_dtype)
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, hq, hkv, d, page_size, causal=True, q_data_type="bfloat16",
           kv_data_type=kv_dtype)
    _, (mt, warps, kv) = _grid_path("fa2", d, max(qo_lens) * group, False)
    want = (mt, warps, GRID_FA2_FP8_KV.get(d, kv))
    assert (w._plan.tile.mt, w._plan.tile.warps, prefill.kv_tile(d, w._plan.tile, w._plan.params.kv_dtype)) == want
    out, lse = nan_like(b.q), _lse_nan(b.q)
    w.run(b.q, b.cache, out=out, lse=lse, return_lse=True, k_scale=0.5, v_scale=2.0)
    b.check(out, lse, causal=True, k_scale=0.5, v_scale=2.0)


# ---------------------------------------------------------------------------------------------
# Attention sinks (FlashInfer's run(sinks=), gpt-oss): one float32 logit per query head joins each
# row's softmax denominator. "split" is the grid's split shape (the sink folded in the merge of cut
# KV ranges); "dead" has rows that see no key (qo_len > kv_len causal, kv_len 0) and lengths off the
# tiles, so the kernel's own epilogue folds it, into rows with and without keys.

SINK_LENS = {"split": _grid_lens("split", 4), "dead": ([40, 3, 0, 7, 130], [17, 0, 9, 7, 300])}


@pytest.mark.parametrize("shape", list(SINK_LENS))
@pytest.mark.parametrize("causal", [False, True])
def test_sinks(shape, causal, prefill_kernel):
    qo_lens, kv_lens = SINK_LENS[shape]
    hq, hkv = GRID_GROUPS[4]
    dtype, page_size, layout = ("bfloat16", 16, "NHD") if shape == "split" else ("float16", 7, "HND")
    b = Batch(qo_lens, kv_lens, page_size=page_size, hq=hq, hkv=hkv, d=128, dtype=dtype, layout=layout)
    sinks = rand((hq,), "float32", 2.0)
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), layout)
    w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, hq, hkv, 128, page_size, causal=causal, q_data_type=dtype)
    assert w._plan.tile.sm90 == (prefill_kernel == "fa3")
    if shape == "split":
        assert w._plan.num_merges > 0
    out, lse = nan_like(b.q), _lse_nan(b.q)
    w.run(b.q, b.cache, out=out, lse=lse, return_lse=True, sinks=sinks)
    _check_requests(out, lse, b.q, b.qo_indptr, b.kv, causal, None, sinks)
    # One plan, more calls: sinks is part of a call's signature (None or an array), and a replayed call
    # (fi_cupy/_core/fastpath.py: the third call replays the second) reads the new array's pointer.
    for again in (None, rand((hq,), "float32", 2.0), rand((hq,), "float32", 2.0)):
        out, lse = nan_like(b.q), _lse_nan(b.q)
        w.run(b.q, b.cache, out=out, lse=lse, return_lse=True, sinks=again)
        _check_requests(out, lse, b.q, b.qo_indptr, b.kv, causal, None, again)


# ---------------------------------------------------------------------------------------------
# ALiBi (pos_encoding_mode="ALIBI"): logit += slope_h * (key position - query position), the query at
# kv_len - qo_len + i, FlashInfer's slopes. Both kernels take it: every item asserts which ran (the
# Hopper one under the "fa3" fixture, head dims 64 / 128; the d256 items skip there, the fa2 item runs
# the same case), and under "fa3" an explicit backend="fa3" plan runs too. test_alibi: KV source x group x length
# shape (the grid's: qo 0 and kv 0 requests, qo > kv, lengths off the tiles; "split" cuts KV ranges and
# merges them), head_dim, mask (causal / none / a custom mask with a row that sees nothing), dtype and
# layout rotating.

ALIBI_SOURCES = ("paged16", "paged7", "ragged", "single")
ALIBI_MASKS = ("causal", "none", "mask")


def _alibi_grid() -> list:
    cases = []
    for si, source in enumerate(ALIBI_SOURCES):
        for gi, group in enumerate(GRID_GROUPS):
            for hi, shape in enumerate(GRID_SHAPES):
                i, turn = len(cases), si + gi + hi
                d = (64, 128, 256)[turn % 3]
                mask = ALIBI_MASKS[(i + si) % 3]
                dtype = ("float16", "bfloat16")[i // 2 % 2]
                layout = ("NHD", "HND")[i // 3 % 2]
                cases.append(pytest.param(source, group, shape, d, mask, dtype, layout,
                                          id=f"{source}-g{group}-{shape}-d{d}-{mask}-{dtype}-{layout}"))
    return cases


def test_alibi_grid_covers_sources_groups_dims_and_masks(prefill_kernel):
    """The ALiBi grid itself: every source meets every mask, every group every head_dim, and the items the
    fa3 fixture runs (head_dim 64 / 128) every source, group, shape and mask."""
    from fi_cupy import prefill
    if prefill_kernel == "fa3":
        pytest.skip("checks the grid itself")
    cells = [c.values for c in _alibi_grid()]
    for axis, values in ((0, ALIBI_SOURCES), (1, tuple(GRID_GROUPS)), (2, GRID_SHAPES), (3, (64, 128, 256)),
                         (4, ALIBI_MASKS)):
        assert {c[axis] for c in cells} == set(values)
    assert {(c[0], c[4]) for c in cells} == {(s, m) for s in ALIBI_SOURCES for m in ALIBI_MASKS}
    assert {(c[1], c[3]) for c in cells} == {(g, d) for g in GRID_GROUPS for d in (64, 128, 256)}
    hopper = [c for c in cells if c[3] in prefill.SM90_HEAD_DIMS]
    for axis, values in ((0, ALIBI_SOURCES), (1, tuple(GRID_GROUPS)), (2, GRID_SHAPES), (4, ALIBI_MASKS)):
        assert {c[axis] for c in hopper} == set(values)


@pytest.mark.parametrize("source,group,shape,d,mask,dtype,layout", _alibi_grid())
def test_alibi(source, group, shape, d, mask, dtype, layout, prefill_kernel):
    from fi_cupy import prefill
    fa3 = prefill_kernel == "fa3"
    if fa3 and d not in prefill.SM90_HEAD_DIMS:
        pytest.skip(f"fa3 takes head_dim {prefill.SM90_HEAD_DIMS}: the fa2 item runs this case")
    hq, hkv = GRID_GROUPS[group]
    qo_lens, kv_lens = _grid_lens(shape, group)
    if source == "single":
        qo_lens, kv_lens = qo_lens[:1], kv_lens[:1]
    masks = None
    if mask == "mask":
        masks = [uniform((a, b)) > 0.5 for a, b in zip(qo_lens, kv_lens)]
        for m in masks:
            m[:1] = False  # a row that sees nothing
    flat = None if masks is None else cp.concatenate([m.reshape(-1) for m in masks])
    causal = mask == "causal"
    opts = dict(causal=causal, custom_mask=flat, pos_encoding_mode="ALIBI", q_data_type=dtype)
    qo_ip = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    if source.startswith("paged"):
        ps = int(source[len("paged"):])
        b = Batch(qo_lens, kv_lens, page_size=ps, hq=hq, hkv=hkv, d=d, dtype=dtype, layout=layout)
        q, kv_of = b.q, b.kv
        args = (b.qo_indptr, b.kv_indptr, b.indices, b.last, hq, hkv, d, ps)
        w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), layout, backend="fa3" if fa3 else "auto")
        w.plan(*args, **opts)
        call = lambda out, lse: w.run(q, b.cache, out=out, lse=lse, return_lse=True)  # noqa: E731
    else:
        kv_ip = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
        q = rand((int(qo_ip[-1]), hq, d), dtype)
        k, v = rand((int(kv_ip[-1]), hkv, d), dtype), rand((int(kv_ip[-1]), hkv, d), dtype)
        kk, vv = (k, v) if layout == "NHD" else (contiguous(k.transpose(1, 0, 2)), contiguous(v.transpose(1, 0, 2)))
        kv_of = lambda r: (k[kv_ip[r]:kv_ip[r + 1]], v[kv_ip[r]:kv_ip[r + 1]])  # noqa: E731
        if source == "ragged":
            w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_ws(), layout, backend="fa3" if fa3 else "auto")
            w.plan(qo_ip, kv_ip, hq, hkv, d, **opts)
            call = lambda out, lse: w.run(q, kk, vv, out=out, lse=lse, return_lse=True)  # noqa: E731
        else:
            single = dict(custom_mask=None if masks is None else masks[0], causal=causal, kv_layout=layout,
                          pos_encoding_mode="ALIBI", backend="fa3" if fa3 else "auto")
            call = lambda out, lse: fi_cupy.single_prefill_with_kv_cache(  # noqa: E731
                q, kk, vv, return_lse=True, out=out, lse=lse, **single)
    out, lse = nan_like(q), _lse_nan(q)
    o, l2 = call(out, lse)
    assert o is out and l2 is lse
    plan = next(reversed(prefill._single_plans.values())) if source == "single" else w._plan
    assert plan.params.alibi and plan.tile.sm90 == fa3 and plan.flags & prefill.ALIBI  # the kernel that ran
    assert (plan.num_merges > 0) == (shape == "split"), f"num_merges {plan.num_merges}"
    _check_requests(out, lse, q, qo_ip, kv_of, causal, masks, alibi=True)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_window_and_sm_scale(causal, prefill_kernel):
    """A window (0, a few keys, longer than some requests) and sm_scale with ALiBi, 12 qo / 4 kv heads (the
    slopes of a head count that is no power of 2: 8 of 2^(-8k/8), then 4 of 2^(-4k/8), k odd)."""
    b = Batch([60, 200, 1, 0, 33], [300, 200, 70, 5, 0], page_size=16, hq=12, hkv=4, d=128, dtype="float16",
              layout="HND")
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), "HND")
    for kw in ({"window_left": 0}, {"window_left": 37}, {"window_left": 150, "sm_scale": 0.3}, {"sm_scale": 0.02}):
        w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 12, 4, 128, 16, causal=causal, pos_encoding_mode="ALIBI",
               q_data_type="float16", **kw)
        assert w._plan.tile.sm90 == (prefill_kernel == "fa3")
        out, lse = nan_like(b.q), _lse_nan(b.q)
        w.run(b.q, b.cache, out=out, lse=lse, return_lse=True)
        _check_requests(out, lse, b.q, b.qo_indptr, b.kv, causal, None, alibi=True, **kw)


@pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_alibi_fp8_paged(kv_dtype, prefill_kernel):
    """fp8 K/V with k_scale / v_scale: the bias joins the logits unscaled (k_scale scales q.k only)."""
    if prefill_kernel == "fa3":
        pytest.skip("fa3 takes K/V in the q dtype only: the fa2 item runs this case")
    b = Batch([100, 7, 0, 300], [500, 300, 3, 90], page_size=8, hq=16, hkv=2, d=64, kv_dtype=kv_dtype)
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 16, 2, 64, 8, causal=True, pos_encoding_mode="ALIBI",
           q_data_type="bfloat16", kv_data_type=kv_dtype)
    out, lse = nan_like(b.q), _lse_nan(b.q)
    w.run(b.q, b.cache, out=out, lse=lse, return_lse=True, k_scale=0.5, v_scale=2.0)
    b.check(out, lse, causal=True, k_scale=0.5, v_scale=2.0, alibi=True)


@pytest.mark.parametrize("shape", list(SINK_LENS))
def test_alibi_with_sinks(shape, prefill_kernel):
    """Sinks beside ALiBi on the paged wrapper: "split" folds the sink in the merge, "dead" in the kernel's
    epilogue, into rows with and without keys."""
    qo_lens, kv_lens = SINK_LENS[shape]
    hq, hkv = GRID_GROUPS[4]
    b = Batch(qo_lens, kv_lens, page_size=16, hq=hq, hkv=hkv, d=128, dtype="bfloat16")
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, hq, hkv, 128, 16, causal=True, pos_encoding_mode="ALIBI",
           q_data_type="bfloat16")
    assert w._plan.tile.sm90 == (prefill_kernel == "fa3") and (w._plan.num_merges > 0) == (shape == "split")
    for sinks in (rand((hq,), "float32", 2.0), rand((hq,), "float32", 2.0)):  # recorded, then replayed
        out, lse = nan_like(b.q), _lse_nan(b.q)
        w.run(b.q, b.cache, out=out, lse=lse, return_lse=True, sinks=sinks)
        _check_requests(out, lse, b.q, b.qo_indptr, b.kv, True, None, sinks, alibi=True)


def test_alibi_cuda_graph_replans(prefill_kernel):
    """The slopes' device copy is fixed: a captured ALiBi run replays right after a re-plan."""
    b1 = Batch([200, 50], [600, 50])
    b2 = Batch([10, 300], [350, 300], cache=b1.cache)
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), use_cuda_graph=True)
    q = empty((400, 8, 128), "bfloat16")
    out = empty(q.shape, "bfloat16")

    def plan(b):
        w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 8, 2, 128, 16, causal=True, pos_encoding_mode="ALIBI",
               q_data_type="bfloat16")
        assert w._plan.tile.sm90 == (prefill_kernel == "fa3")

    plan(b1)
    bits(q)[:250] = bits(b1.q)
    graph, s = capture(lambda: w.run(q, b1.cache, out=out))
    for b in (b1, b2):
        plan(b)
        n = b.q.shape[0]
        bits(q)[:n] = bits(b.q)
        poison(out)
        replay(graph, s)
        b.check(out[:n], causal=True, alibi=True)


# ---------------------------------------------------------------------------------------------
# Regression (issue 19): on the Hopper kernel, a work item of 128 packed rows that sees no key at all
# (n_tiles == 0: causal rows before kv_len - qo_len, or kv_len 0) returned Q's values instead of 0:
# its Q copies (cp.async, in no group) were not waited on before the epilogue staged O over them. The
# contract on every path: such rows give o = 0 and lse = -inf, as the equivalent custom mask does.


def _causal_as_mask(qo_len: int, kv_len: int):
    """The bottom-right causal mask as a custom one: CuPy bool (qo_len, kv_len)."""
    return cp.arange(kv_len)[None, :] <= cp.arange(qo_len)[:, None] + (kv_len - qo_len)


def _check_causal_equals_mask(causal, masked, q, qo_lens, kv_of, dtype):
    """Both runs: rows that see no key exactly 0 / -inf, all rows alike; the first, middle and last
    requests against the reference."""
    (oc, lc), (om, lm) = causal, masked
    oc64, om64 = f64_dev(oc), f64_dev(om)
    qo_ip = np.concatenate([[0], np.cumsum(qo_lens)])
    for o, lse in (oc64, lc), (om64, lm):
        for r in range(len(qo_lens)):
            a, e = int(qo_ip[r]), int(qo_ip[r + 1])
            dead = _dead_rows(e - a, kv_of(r)[0].shape[0], True, None)
            assert cp.all(o[a:e][dead] == 0), f"request {r}: a row that sees no key must give o = 0"
            assert cp.all(cp.isneginf(lse[a:e][dead])), f"request {r}: ... and lse = -inf"
    for x in (oc64, lc, om64, lm):
        assert not cp.isnan(x).any(), "NaN (unwritten or invalid elements)"
    atol, rtol = OUT_TOL[dtype]  # compared on the GPU: a batch of 128 x 127 rows is 66 M elements
    err = cp.abs(oc64 - om64)
    assert cp.all(err <= atol + rtol * cp.abs(om64)), f"causal vs custom mask: max err {float(err.max()):.3g}"
    assert_lse_close(f64(lc), f64(lm), "lse: causal vs custom mask")
    n = len(qo_lens)
    for r in sorted({0, n // 2, n - 1}):
        a, e = int(qo_ip[r]), int(qo_ip[r + 1])
        k, v = kv_of(r)
        check(oc[a:e], q[a:e], k, v, lc[a:e], causal=True)


def _expect_tile(plan, backend, d):
    assert plan.tile.sm90 == (backend == "fa3" and d in (64, 128))


@pytest.mark.parametrize("batch,qo_len,kv_len,d", [
    (16, 577, 97, 128),  # the reports: 32 qo / 4 kv heads, fp16
    (128, 127, 97, 128),
    (12, 127, 54, 128),  # passed before the fix (no 128-row item without keys), kept as a control
    (16, 577, 97, 64),
    (16, 577, (97, 0), 128),  # every other request has no keys at all
    (16, 577, 97, 256),
])
def test_regression_rows_seeing_no_key_ragged(batch, qo_len, kv_len, d, prefill_kernel):
    if prefill_kernel == "fa3" and d == 256:
        pytest.skip("fa3 takes head_dim 64 / 128: the fa2 item runs this case")
    qo_lens = [qo_len] * batch
    kv_lens = [kv_len[r % 2] if isinstance(kv_len, tuple) else kv_len for r in range(batch)]
    qo_ip = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_ip = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q = rand((int(qo_ip[-1]), 32, d), "float16")
    k, v = rand((int(kv_ip[-1]), 4, d), "float16"), rand((int(kv_ip[-1]), 4, d), "float16")
    mask = cp.concatenate([_causal_as_mask(a, b).reshape(-1) for a, b in zip(qo_lens, kv_lens)])
    w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_ws())
    runs = []
    for kw in ({"causal": True}, {"custom_mask": mask}):
        w.plan(qo_ip, kv_ip, 32, 4, d, q_data_type="float16", **kw)
        _expect_tile(w._plan, prefill_kernel, d)
        out, lse = nan_like(q), _lse_nan(q)
        runs.append(w.run(q, k, v, out=out, lse=lse, return_lse=True))
    _check_causal_equals_mask(*runs, q, qo_lens, lambda r: (k[kv_ip[r]:kv_ip[r + 1]], v[kv_ip[r]:kv_ip[r + 1]]),
                              "float16")


@pytest.mark.parametrize("page_size,d", [(16, 128), (8, 128), (1, 128), (16, 64), (16, 256)])
def test_regression_rows_seeing_no_key_paged(page_size, d, prefill_kernel):
    if prefill_kernel == "fa3" and d == 256:
        pytest.skip("fa3 takes head_dim 64 / 128: the fa2 item runs this case")
    qo_lens, kv_lens = [577] * 16, [97] * 16
    b = Batch(qo_lens, kv_lens, page_size=page_size, hq=32, hkv=4, d=d, dtype="float16")
    mask = cp.concatenate([_causal_as_mask(577, 97).reshape(-1)] * 16)
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    runs = []
    for kw in ({"causal": True}, {"custom_mask": mask}):
        w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 32, 4, d, page_size, q_data_type="float16", **kw)
        _expect_tile(w._plan, prefill_kernel, d)
        out, lse = nan_like(b.q), _lse_nan(b.q)
        runs.append(w.run(b.q, b.cache, out=out, lse=lse, return_lse=True))
    _check_causal_equals_mask(*runs, b.q, qo_lens, b.kv, "float16")


@pytest.mark.parametrize("d", [64, 128, 256])
def test_regression_rows_seeing_no_key_single(d, prefill_kernel):
    from fi_cupy import prefill
    if prefill_kernel == "fa3" and d == 256:
        pytest.skip("fa3 takes head_dim 64 / 128: the fa2 item runs this case")
    q = rand((577, 32, d), "float16")
    k, v = rand((97, 4, d), "float16"), rand((97, 4, d), "float16")
    runs = []
    for kw in ({"causal": True}, {"custom_mask": _causal_as_mask(577, 97)}):
        runs.append(fi_cupy.single_prefill_with_kv_cache(q, k, v, return_lse=True, **kw))
        _expect_tile(next(reversed(prefill._single_plans.values())), prefill_kernel, d)
    _check_causal_equals_mask(*runs, q, [577], lambda r: (k, v), "float16")


# ---------------------------------------------------------------------------------------------
# Mask packing


@pytest.mark.parametrize("bitorder", ["big", "little"])
def test_packbits_matches_numpy(bitorder):
    x = uniform(1001) > 0.5
    xh = cp.asnumpy(x)
    got = cp.asnumpy(fi_cupy.packbits(x, bitorder=bitorder))
    np.testing.assert_array_equal(got, np.packbits(xh, bitorder=bitorder))
    indptr = np.array([0, 5, 5, 300, 1001])
    packed, new_ip = fi_cupy.segment_packbits(x, indptr, bitorder=bitorder)
    want = [np.packbits(xh[a:b], bitorder=bitorder) for a, b in zip(indptr[:-1], indptr[1:])]
    np.testing.assert_array_equal(cp.asnumpy(packed), np.concatenate(want))
    np.testing.assert_array_equal(cp.asnumpy(new_ip), np.concatenate([[0], np.cumsum([w.size for w in want])]))


def test_bad_input():
    q, k = rand((10, 8, 128), "bfloat16"), rand((20, 2, 128), "bfloat16")
    q40, k40 = rand((10, 8, 40), "bfloat16"), rand((20, 2, 40), "bfloat16")  # not a multiple of 16
    with pytest.raises(ValueError, match="head_dim"):
        fi_cupy.single_prefill_with_kv_cache(q40, k40, contiguous(k40))
    with pytest.raises(ValueError, match="num_qo_heads"):
        fi_cupy.single_prefill_with_kv_cache(rand((10, 6, 128), "bfloat16"), rand((20, 4, 128), "bfloat16"),
                                             rand((20, 4, 128), "bfloat16"))
    k16 = rand(k.shape, "float16")  # K/V: q's dtype or float8
    with pytest.raises(TypeError, match="^k: .*float16"):
        fi_cupy.single_prefill_with_kv_cache(q, k16, k16)
    with pytest.raises(ValueError, match="custom_mask"):
        fi_cupy.single_prefill_with_kv_cache(q, k, k, custom_mask=cp.ones((10, 19), dtype=bool))
    b = Batch([10], [40])
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    with pytest.raises(ValueError, match="paged_kv_indices"):
        w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, 8, 2, 128, 16, q_data_type="bfloat16")
        w.run(b.q, b.cache[:1])
    with pytest.raises(ValueError, match="qo_indptr"):
        w.plan(np.array([0, 5, 3]), np.array([0, 1, 2]), b.indices, np.array([1, 1]), 8, 2, 128, 16)
    with pytest.raises(RuntimeError, match="before plan"):
        fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_ws()).run(q, k, k)


# ---------------------------------------------------------------------------------------------
# Head dims past 64 / 128 / 256 (every multiple of 16 up to 256, and 512), head_dim_vo != head_dim_qk
# (192 / 128, 128 / 64), and fp8 K/V on the ragged wrapper and single prefill. The Hopper kernel takes
# none of these: their fa3 items skip (fa2 runs the same case; backend "auto" would too), and
# test_new_head_dims_auto_falls_back runs "auto" under the fa3 fixture. Every case: NaN-poisoned
# outputs, lse checked, the rows that see no key exactly 0 / -inf (_check_requests); batches are the
# grid's shapes (qo 0 and kv 0 requests, qo_len > kv_len, lengths off every tile; "split" cuts KV
# ranges and merges the partial rows).

NEW_HEAD_DIMS = (16, 32, 48, 80, 96, 112, 144, 160, 176, 192, 208, 224, 240, 512)
QK_VO_PAIRS = ((192, 128), (128, 64))  # (head_dim_qk, head_dim_vo)


def _indptr(lens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def _skip_fa3_for(prefill_kernel, d, d_vo=None, kv_dtype=None) -> None:
    """The fa3 item of a case the Hopper kernel does not take: fa2 runs it ("auto" falls back to it)."""
    from fi_cupy import prefill
    if prefill_kernel == "fa3" and (d not in prefill.SM90_HEAD_DIMS or d_vo not in (None, d) or kv_dtype in FP8):
        pytest.skip("fa3 takes head_dim 64 / 128 with head_dim_vo equal and K/V in the q dtype: the fa2 item runs "
                    "this case")


def _run_source(source, qo_lens, kv_lens, hq, hkv, d, d_vo=None, dtype="bfloat16", kv_dtype=None, layout="NHD",
                masks=None, causal=False, scales=None, sinks=None, **opts):
    """One batch on `source` ("paged<page size>", "ragged", or "single": the batch's first request), planned
    with opts (keywords plan() and single prefill share: logits_soft_cap, window_left, pos_encoding_mode)
    and run into NaN outputs with return_lse; scales: (k_scale, v_scale) for run(); sinks: paged only.
    Paged K/V of two head dims are a (k_cache, v_cache) pair: a paged plan() that refuses head_dim_vo
    skips the test (the only refusal that does). Returns (out, lse, q, qo_indptr, kv_of, plan): kv_of(r)
    request r's (k, v) as check() takes them (fp8: dequantised, scaled, in q's dtype, as Batch.check),
    plan the plan that ran."""
    from fi_cupy import prefill
    d_vo = d if d_vo is None else d_vo
    kv_dtype = kv_dtype or dtype
    fp8 = kv_dtype in FP8
    if source == "single":
        qo_lens, kv_lens, masks = qo_lens[:1], kv_lens[:1], None if masks is None else masks[:1]
    qo_ip = _indptr(qo_lens)
    flat = None if masks is None else cp.concatenate([m.reshape(-1) for m in masks])
    run_kw = {} if scales is None else {"k_scale": scales[0], "v_scale": scales[1]}
    plan_kw = dict(causal=causal, custom_mask=flat, q_data_type=dtype, kv_data_type=kv_dtype, **opts)
    if d_vo != d:
        plan_kw["head_dim_vo"] = d_vo
    if source.startswith("paged"):
        ps = int(source[len("paged"):])
        b = Batch(qo_lens, kv_lens, page_size=ps, hq=hq, hkv=hkv, d=d, dtype=dtype, kv_dtype=kv_dtype, layout=layout,
                  d_vo=d_vo)
        q, kv_raw = b.q, b.kv
        w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), layout)
        try:
            w.plan(b.qo_indptr, b.kv_indptr, b.indices, b.last, hq, hkv, d, ps, **plan_kw)
        except NotImplementedError as e:
            if d_vo != d and "head_dim_vo" in str(e):
                pytest.skip(f"the paged wrapper does not take head_dim_vo != head_dim_qk ({e})")
            raise
        call = lambda out, lse: w.run(q, b.cache, out=out, lse=lse, return_lse=True, sinks=sinks,  # noqa: E731
                                      **run_kw)
    else:
        assert sinks is None, "run(sinks=) is the paged wrapper's"
        kv_ip = _indptr(kv_lens)
        q = rand((int(qo_ip[-1]), hq, d), dtype)
        k, v = rand((int(kv_ip[-1]), hkv, d), kv_dtype), rand((int(kv_ip[-1]), hkv, d_vo), kv_dtype)
        kk, vv = (k, v) if layout == "NHD" else (contiguous(k.transpose(1, 0, 2)), contiguous(v.transpose(1, 0, 2)))

        def kv_raw(r):
            rows = slice(int(kv_ip[r]), int(kv_ip[r + 1]))
            return tuple(f64_dev(x[rows], kv_dtype) if fp8 else x[rows] for x in (k, v))

        if source == "ragged":
            w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_ws(), layout)
            w.plan(qo_ip, kv_ip, hq, hkv, d, **plan_kw)
            call = lambda out, lse: w.run(q, kk, vv, out=out, lse=lse, return_lse=True, **run_kw)  # noqa: E731
        else:
            assert not fp8, "CuPy float8 K/V are uint8 bytes, which single prefill cannot type: test_fp8_single"
            single = dict(custom_mask=None if masks is None else masks[0], causal=causal, kv_layout=layout, **opts)
            call = lambda out, lse: fi_cupy.single_prefill_with_kv_cache(  # noqa: E731
                q, kk, vv, return_lse=True, out=out, lse=lse, **single, **run_kw)
    out, lse = nan_like(empty((q.shape[0], hq, d_vo), dtype)), _lse_nan(q)
    o, l2 = call(out, lse)
    assert o is out and l2 is lse
    plan = next(reversed(prefill._single_plans.values())) if source == "single" else w._plan
    kv_of = kv_raw
    if fp8:
        s = scales or (1.0, 1.0)
        kv_of = lambda r: tuple(_round(x * f, dtype).astype(cp.float64)  # noqa: E731
                                for x, f in zip(kv_raw(r), s))
    return out, lse, q, qo_ip, kv_of, plan


# (qo_len, kv_len): kv 0 and 1, qo > kv (causal rows that see no key), lengths off 16 / 32 / 64 / 128,
# few queries on a long context. Ordered so that any 4 in a row (a head dim's items) hold a kv <= 1 or
# qo > kv shape.
SINGLE_SHAPES = ((1, 1), (129, 77), (100, 1000), (37, 0), (257, 513), (200, 1), (63, 300), (5, 2049))


def _single_dims_grid() -> list:
    """Every new head dim x causal x 2 shapes (4 consecutive SINGLE_SHAPES a head dim, rotating); group
    (1 / 4 / 8), KV heads (2 / 1 / 4), dtype and layout rotating."""
    cases = []
    for di, d in enumerate(NEW_HEAD_DIMS):
        for ci, causal in enumerate((False, True)):
            for j in range(2):
                i = len(cases)
                qo, kv = SINGLE_SHAPES[(3 * di + 2 * ci + j) % len(SINGLE_SHAPES)]
                group, hkv = (1, 4, 8)[i % 3], (2, 1, 4)[i // 3 % 3]
                dtype, layout = ("float16", "bfloat16")[i // 2 % 2], ("NHD", "HND")[i // 5 % 2]
                cases.append(pytest.param(d, causal, qo, kv, group * hkv, hkv, dtype, layout,
                                          id=f"d{d}-{'causal' if causal else 'full'}-qo{qo}-kv{kv}-g{group}-h{hkv}-"
                                             f"{dtype}-{layout}"))
    return cases


@pytest.mark.parametrize("d,causal,qo,kv,hq,hkv,dtype,layout", _single_dims_grid())
def test_single_head_dims(d, causal, qo, kv, hq, hkv, dtype, layout, prefill_kernel):
    _skip_fa3_for(prefill_kernel, d)
    out, lse, q, qo_ip, kv_of, plan = _run_source("single", [qo], [kv], hq, hkv, d, dtype=dtype, layout=layout,
                                                  causal=causal)
    assert not plan.tile.sm90 and plan.params.head_dim == d
    _check_requests(out, lse, q, qo_ip, kv_of, causal, None)


HEAD_DIM_SOURCES = ("paged1", "paged7", "paged16", "ragged")
# causal; causal with a soft cap and a window; a custom mask with a row that sees nothing; ALiBi
# (causal); no mask
HEAD_DIM_VARIANTS = ("causal", "cap_window", "mask", "alibi", "none")


def _head_dim_grid() -> list:
    """KV source x group x (small or large, split), the new head dims, the variants (every source meets
    each), dtype and layout rotating; sinks on every other paged item."""
    cases = []
    for si, source in enumerate(HEAD_DIM_SOURCES):
        for gi, group in enumerate(GRID_GROUPS):
            for hi in range(2):
                i = len(cases)
                shape = "split" if hi else ("small", "large")[(si + gi) % 2]
                d = NEW_HEAD_DIMS[3 * i % len(NEW_HEAD_DIMS)]
                variant = HEAD_DIM_VARIANTS[(i + si) % len(HEAD_DIM_VARIANTS)]
                dtype, layout = ("float16", "bfloat16")[i // 2 % 2], ("NHD", "HND")[i // 3 % 2]
                sinks = source.startswith("paged") and i % 2 == 0
                cases.append(pytest.param(source, group, shape, d, variant, dtype, layout, sinks,
                                          id=f"{source}-g{group}-{shape}-d{d}-{variant}-{dtype}-{layout}"
                                             f"{'-sinks' if sinks else ''}"))
    return cases


def _variant_options(variant: str) -> tuple:
    """(causal, plan options, check() options) of a HEAD_DIM_VARIANTS entry (the mask is the caller's)."""
    if variant == "cap_window":
        return True, {"logits_soft_cap": 30.0, "window_left": 37}, {"soft_cap": 30.0, "window_left": 37}
    if variant == "alibi":
        return True, {"pos_encoding_mode": "ALIBI"}, {"alibi": True}
    return variant == "causal", {}, {}


def _random_masks(qo_lens, kv_lens) -> list:
    masks = [uniform((a, b)) > 0.5 for a, b in zip(qo_lens, kv_lens)]
    for m in masks:
        m[:1] = False  # a row that sees nothing
    return masks


@pytest.mark.parametrize("source,group,shape,d,variant,dtype,layout,sinks", _head_dim_grid())
def test_head_dim_grid(source, group, shape, d, variant, dtype, layout, sinks, prefill_kernel):
    _skip_fa3_for(prefill_kernel, d)
    hq, hkv = GRID_GROUPS[group]
    qo_lens, kv_lens = _grid_lens(shape, group)
    masks = _random_masks(qo_lens, kv_lens) if variant == "mask" else None
    causal, opts, kw = _variant_options(variant)
    s = rand((hq,), "float32", 2.0) if sinks else None
    out, lse, q, qo_ip, kv_of, plan = _run_source(source, qo_lens, kv_lens, hq, hkv, d, dtype=dtype, layout=layout,
                                                  masks=masks, causal=causal, sinks=s, **opts)
    assert not plan.tile.sm90 and plan.params.head_dim == d
    assert (plan.num_merges > 0) == (shape == "split"), f"num_merges {plan.num_merges}"
    _check_requests(out, lse, q, qo_ip, kv_of, causal, masks, s, **kw)


def test_new_head_dim_grids_cover(prefill_kernel):
    """The rotations above: every new head dim at every group, causal and not, with a kv <= 1 or qo > kv
    shape, in single prefill; in the batch grid every head dim, every source with every variant, and
    split shapes under every variant."""
    if prefill_kernel == "fa3":
        pytest.skip("checks the grids themselves")
    single = [c.values for c in _single_dims_grid()]
    for d in NEW_HEAD_DIMS:
        mine = [c for c in single if c[0] == d]
        assert {c[4] // c[5] for c in mine} == {1, 4, 8} and {c[1] for c in mine} == {False, True}, d
        assert any(c[3] <= 1 or c[2] > c[3] for c in mine), d
    assert {c[3] for c in single} >= {0, 1} and {c[6] for c in single} == {"float16", "bfloat16"}
    grid = [c.values for c in _head_dim_grid()]
    assert {c[3] for c in grid} == set(NEW_HEAD_DIMS)
    assert {(c[0], c[4]) for c in grid} == {(s, v) for s in HEAD_DIM_SOURCES for v in HEAD_DIM_VARIANTS}
    assert {c[4] for c in grid if c[2] == "split"} == set(HEAD_DIM_VARIANTS)
    assert {c[2] for c in grid} == set(GRID_SHAPES) and any(c[7] for c in grid)


@pytest.mark.parametrize("source", ["single", "ragged", "paged16", "paged7"])
@pytest.mark.parametrize("shape", ["large", "split"])
def test_head_dim_512(source, shape, prefill_kernel):
    """head_dim 512, causal with a soft cap, lse checked; "split" merges partial rows of 512 columns;
    paged7 with sinks."""
    _skip_fa3_for(prefill_kernel, 512)
    i = ["single", "ragged", "paged16", "paged7"].index(source) + (shape == "split")
    group = list(GRID_GROUPS)[i % 3]
    hq, hkv = GRID_GROUPS[group]
    s = rand((hq,), "float32", 2.0) if source == "paged7" else None
    out, lse, q, qo_ip, kv_of, plan = _run_source(source, *_grid_lens(shape, group), hq, hkv, 512,
                                                  dtype=("float16", "bfloat16")[i % 2], causal=True, sinks=s,
                                                  logits_soft_cap=30.0)
    assert not plan.tile.sm90 and (plan.num_merges > 0) == (shape == "split"), f"num_merges {plan.num_merges}"
    _check_requests(out, lse, q, qo_ip, kv_of, True, None, s, soft_cap=30.0)


def _qk_vo_grid() -> list:
    """Source x pair x group (1, 8) x shape (large, split); causal rotating (each source and pair has
    both, at each shape); dtype and layout rotating."""
    cases = []
    for si, source in enumerate(("single", "ragged", "paged7")):
        for pi, (dqk, dvo) in enumerate(QK_VO_PAIRS):
            for gi, group in enumerate((1, 8)):
                for hi, shape in enumerate(("large", "split")):
                    i = len(cases)
                    causal = (si + pi + gi + hi) % 2 == 1
                    dtype, layout = ("float16", "bfloat16")[i // 2 % 2], ("NHD", "HND")[i // 3 % 2]
                    cases.append(pytest.param(source, dqk, dvo, group, shape, causal, dtype, layout,
                                              id=f"{source}-{dqk}x{dvo}-g{group}-{shape}-"
                                                 f"{'causal' if causal else 'full'}-{dtype}-{layout}"))
    return cases


@pytest.mark.parametrize("source,dqk,dvo,group,shape,causal,dtype,layout", _qk_vo_grid())
def test_head_dim_qk_vo(source, dqk, dvo, group, shape, causal, dtype, layout, prefill_kernel):
    """q / k of head_dim_qk, v and the output of head_dim_vo (single prefill infers it from v's shape);
    sm_scale 1 / sqrt(head_dim_qk). Paged: a (k_cache, v_cache) pair, skipped if plan() refuses it."""
    _skip_fa3_for(prefill_kernel, dqk, dvo)
    hq, hkv = GRID_GROUPS[group]
    out, lse, q, qo_ip, kv_of, plan = _run_source(source, *_grid_lens(shape, group), hq, hkv, dqk, d_vo=dvo,
                                                  dtype=dtype, layout=layout, causal=causal)
    assert out.shape == q.shape[:2] + (dvo,) and kv_of(0)[1].shape[-1] == dvo
    assert not plan.tile.sm90 and (plan.num_merges > 0) == (shape == "split"), f"num_merges {plan.num_merges}"
    if shape == "large":  # V/O width <= 128: four warps of 32 rows (192 / 128: its K rows in 16 + 8 chunks)
        assert (plan.tile.mt, plan.tile.warps) == (2, 4), plan.tile
    _check_requests(out, lse, q, qo_ip, kv_of, causal, None)



@pytest.mark.parametrize("source", ["ragged", "paged7"])
@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=["d128", "d192x128"])
def test_batch_by_request(source, dims, prefill_kernel, monkeypatch):
    """An uncut batch of many waves runs request by request (scheduler._by_request; LOCALITY_WAVES lowered to 1
    so a test-sized batch takes it): every item still runs once and each request matches the reference; an
    empty request, qo_len > kv_len, lengths off every tile; 192 / 128 at four warps of 32 rows (fa2)."""
    from fi_cupy import scheduler
    dqk, dvo = dims
    _skip_fa3_for(prefill_kernel, dqk, dvo)
    monkeypatch.setattr(scheduler, "LOCALITY_WAVES", 1)
    calls, real = [], scheduler._by_request
    monkeypatch.setattr(scheduler, "_by_request", lambda *a: calls.append(a) or real(*a))
    # 86 query tiles of 128 packed rows x 8 KV heads: 688 items, a wave of up to 5 CTAs an SM on 132 SMs
    qo_lens, kv_lens = [300, 1, 0, 257, 130, 77, 400, 64] * 2, [300, 6, 3, 357, 130, 1, 450, 64] * 2
    out, lse, q, qo_ip, kv_of, plan = _run_source(source, qo_lens, kv_lens, 32, 8, dqk, d_vo=dvo, causal=True)
    assert calls and plan.num_merges == 0, f"by request: {len(calls)} calls, {plan.num_merges} merges"
    if prefill_kernel == "fa2":
        assert (plan.tile.mt, plan.tile.warps) == (2, 4), plan.tile
    _check_requests(out, lse, q, qo_ip, kv_of, True, None)


FP8_DIMS = (64, 128, 80, 256, 512)


@pytest.mark.parametrize("d", FP8_DIMS)
@pytest.mark.parametrize("group", list(GRID_GROUPS))
def test_fp8_ragged(d, group, prefill_kernel):
    """fp8 K/V on the ragged wrapper: uint8 bytes planned with kv_data_type, k_scale / v_scale given to
    run() (a scale that is ignored fails); shape, causal, fp8 kind, dtype and layout rotating."""
    _skip_fa3_for(prefill_kernel, d, kv_dtype="float8_e4m3fn")
    di, gi = FP8_DIMS.index(d), list(GRID_GROUPS).index(group)
    shape = GRID_SHAPES[(di + gi) % 3]
    causal = (di + gi) % 2 == 0
    hq, hkv = GRID_GROUPS[group]
    out, lse, q, qo_ip, kv_of, plan = _run_source(
        "ragged", *_grid_lens(shape, group), hq, hkv, d, dtype=("float16", "bfloat16")[di % 2],
        kv_dtype=FP8[(di + gi) // 2 % 2], layout=("NHD", "HND")[gi % 2], causal=causal, scales=(0.5, 2.0))
    assert not plan.tile.sm90 and (plan.num_merges > 0) == (shape == "split"), f"num_merges {plan.num_merges}"
    _check_requests(out, lse, q, qo_ip, kv_of, causal, None)


@needs_torch_cuda
@pytest.mark.parametrize("d", FP8_DIMS)
def test_fp8_single(d, prefill_kernel):
    """fp8 K/V on single prefill. It has no kv_data_type (neither has FlashInfer's): the float8 kind comes
    from k / v's own dtype. CuPy has no float8 dtype and gpu_arrays holds float8 as uint8 bytes, which do
    not say which kind (single prefill refuses them), so this case is a torch caller on the same memory,
    as test_decode's float8 single decode; CuPy callers reach fp8 K/V through the ragged wrapper, whose
    plan() names the kind (test_fp8_ragged)."""
    _skip_fa3_for(prefill_kernel, d, kv_dtype="float8_e4m3fn")
    i = FP8_DIMS.index(d)
    qo, kv, hq, hkv = ((129, 300, 8, 2), (200, 77, 16, 2), (37, 2049, 2, 2), (1, 1, 8, 1), (70, 1500, 4, 2))[i]
    kv_dtype, dtype, causal = FP8[i % 2], ("float16", "bfloat16")[i // 2 % 2], i % 2 == 0
    q, k, v = rand((qo, hq, d), dtype), rand((kv, hkv, d), kv_dtype), rand((kv, hkv, d), kv_dtype)
    out, lse = nan_like(q), _lse_nan(q)
    o, l2 = fi_cupy.single_prefill_with_kv_cache(
        to_torch(q, dtype), to_torch(k, kv_dtype), to_torch(v, kv_dtype), causal=causal, k_scale=0.5, v_scale=2.0,
        return_lse=True, out=to_torch(out, dtype), lse=to_torch(lse, "float32"))
    assert isinstance(o, torch.Tensor) and o.data_ptr() == out.data.ptr and l2.data_ptr() == lse.data.ptr
    torch.cuda.synchronize()
    kv_of = lambda r: tuple(_round(f64_dev(x, kv_dtype) * s, dtype).astype(cp.float64)  # noqa: E731
                            for x, s in ((k, 0.5), (v, 2.0)))
    _check_requests(out, lse, q, _indptr([qo]), kv_of, causal, None)


@pytest.mark.parametrize("source", ["single", "ragged", "paged16"])
@pytest.mark.parametrize("dims", [(48, 48), (512, 512), (192, 128)], ids=["d48", "d512", "d192x128"])
def test_new_head_dims_auto_falls_back(source, dims, prefill_kernel):
    """Under the fa3 fixture (an sm_90a GPU, backend "auto" taking the Hopper kernel from the first row),
    head dims it does not take run the portable kernel, right."""
    if prefill_kernel == "fa2":
        pytest.skip("the fa2 fixture runs these head dims in the tests above")
    hq, hkv = GRID_GROUPS[4]
    out, lse, q, qo_ip, kv_of, plan = _run_source(source, *_grid_lens("large", 4), hq, hkv, dims[0], d_vo=dims[1],
                                                  causal=True)
    assert not plan.tile.sm90
    _check_requests(out, lse, q, qo_ip, kv_of, True, None)


def _raises(exc, words, call) -> None:
    """call() raises exc whose message names every one of `words`."""
    with pytest.raises(exc) as e:
        call()
    for w in words:
        assert w in str(e.value), f"{w!r} not in {e.value}"


def test_bad_head_dims(prefill_kernel):
    """Refused before any launch, naming the argument: head dims off the list (not a multiple of 16, past
    256 but 512), head_dim_vo other than the pairs, RoPE on the fly at a new head dim or with head_dim_vo
    != head_dim_qk, and backend "fa3" at a head dim the Hopper kernel does not take."""
    if prefill_kernel == "fa3":
        pytest.skip("argument checks: the fa2 item runs them")
    qo_ip, kv_ip = _indptr([10, 3]), _indptr([20, 7])
    b = Batch([10, 3], [20, 7], d=64)

    def ragged(d, backend="auto", **kw):
        return lambda: fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_ws(), backend=backend).plan(
            qo_ip, kv_ip, 8, 2, d, q_data_type="bfloat16", **kw)

    def paged(d, backend="auto", **kw):
        return lambda: fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), backend=backend).plan(
            b.qo_indptr, b.kv_indptr, b.indices, b.last, 8, 2, d, 16, q_data_type="bfloat16", **kw)

    def single(d, d_vo=None, **kw):
        return lambda: fi_cupy.single_prefill_with_kv_cache(rand((10, 8, d)), rand((20, 2, d)),
                                                            rand((20, 2, d_vo or d)), **kw)

    for d in (40, 272, 384):
        _raises(ValueError, ["head_dim_qk", str(d)], ragged(d))
        _raises(ValueError, ["head_dim_qk", str(d)], paged(d))
        _raises(ValueError, ["head_dim", str(d)], single(d))
    _raises(NotImplementedError, ["head_dim_vo", "96"], ragged(128, head_dim_vo=96))
    _raises(NotImplementedError, ["head_dim_vo", "96"], paged(128, head_dim_vo=96))
    _raises(NotImplementedError, ["head_dim_vo", "96"], single(128, 96))
    rope = {"pos_encoding_mode": "ROPE_LLAMA"}
    for call in (ragged(80, **rope), paged(80, **rope), single(80, **rope), ragged(192, head_dim_vo=128, **rope),
                 single(192, 128, **rope)):
        _raises(NotImplementedError, ["pos_encoding_mode"], call)
    for call in (ragged(96, "fa3"), paged(96, "fa3"), single(96, backend="fa3")):  # as for ALiBi: the backend
        _raises(ValueError, ["backend: 'fa3'", "head_dim 96"], call)
