"""The call sequences serving engines make through FlashInfer's API (GPU, torch callers), each against
the float64 reference. Written by us after reading how vLLM's and SGLang's FlashInfer backends drive
the library (vllm/v1/attention/backends/flashinfer.py, vllm/v1/sample/ops/topk_topp_sampler.py,
python/sglang/srt/layers/attention/flashinfer_backend.py):

- SGLang decode: a CUDA-graph wrapper with FlashInfer's index buffers; the engine writes page indices
  into the buffer on the device and re-plans with fast_decode_plan between replays.
- vLLM decode: plan() with host indptr / last_page_len and device indices, fp8 cache with float
  k_scale / v_scale, sliding window and soft cap, run(out=).
- SGLang extend: ragged forward_return_lse over the new tokens (causal) plus paged forward_return_lse
  over the cached prefix, merged with merge_state.
- Spec-decode verify: draft tokens against prefix + drafts with a tree mask (custom_mask).
- vLLM sampling: top-k / top-p from logits with per-request parameters.
- The plan options engines set: disable_split_kv / fixed_split_size (batch-invariant outputs),
  q_len_per_req (multi-token decode), block_tables + seq_lens, multi-item scoring, legacy names.
Outputs are poisoned with NaN before each call.
"""
import math

import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from fi_cupy.multi_item import multi_item_mask
from tolerances import assert_close, assert_lse_close

try:
    import torch
except ImportError:
    torch = None

# Interop: the engines call with torch tensors, torch CUDA graphs and streams. Each item skips on its own
# without torch (the kernels themselves are covered with CuPy inputs by the other modules).
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch is None, reason="needs torch (the engines' framework)")]

DT = {} if torch is None else {"float16": torch.float16, "bfloat16": torch.bfloat16,
                               "float8_e4m3fn": torch.float8_e4m3fn}
_seed = [0]


def _rng():
    _seed[0] += 1
    return np.random.default_rng(4200 + _seed[0]), torch.Generator(device="cuda").manual_seed(4200 + _seed[0])


def _ws(mb=128):
    return torch.empty(mb << 20, dtype=torch.uint8, device="cuda")


def _i32(a):
    return torch.as_tensor(np.asarray(a, dtype=np.int32), device="cuda")


def _f64(x):
    return x.double().cpu().numpy()


class Cache:
    """A paged cache (NHD, 5-D or a (k, v) pair), its shuffled page table for `lens`, helpers to read a
    request's K/V back as float64."""

    def __init__(self, lens, page, hkv, d, dtype="bfloat16", spare=8, pair=False):
        rng, g = _rng()
        self.page, self.hkv, self.d, self.pair = page, hkv, d, pair
        self.num_pages = sum(-(-n // page) for n in lens) + spare
        self.data = torch.randn((self.num_pages, 2, page, hkv, d), generator=g, device="cuda").to(DT[dtype])
        self.perm = rng.permutation(self.num_pages)
        self.set_lens(lens)

    def set_lens(self, lens):
        self.lens = list(lens)
        pages = [-(-n // self.page) for n in lens]
        self.indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        self.indices = self.perm[: self.indptr[-1]].astype(np.int32)
        self.last = np.array([n - (p - 1) * self.page if p else 0 for n, p in zip(lens, pages)], np.int32)

    @property
    def arg(self):
        return (self.data[:, 0], self.data[:, 1]) if self.pair else self.data

    def kv(self, r):
        pages = torch.as_tensor(self.indices[self.indptr[r]:self.indptr[r + 1]].astype(np.int64), device="cuda")
        kv = self.data.float()[pages].transpose(0, 1).reshape(2, -1, self.hkv, self.d)[:, : self.lens[r]]
        kv = kv.double().cpu().numpy()
        return kv[0], kv[1]


def _capture(call):
    """A CUDA graph of call(), after one warm-up run on a side stream (torch's capture recipe)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def _decode_ref(cache, q, **kw):
    qf = _f64(q)
    outs = [reference.decode_attention(qf[r], *cache.kv(r), **kw) for r in range(len(cache.lens))]
    return np.stack([o for o, _ in outs]), np.stack([s for _, s in outs])


# ---------------------------------------------------------------------------------------------
# Decode


def test_sglang_cuda_graph_decode_with_fast_decode_plan():
    """SGLang's decode under CUDA graphs: one wrapper a batch size with FlashInfer's index buffers,
    page size 1, a (k, v) pair; before each replay the engine writes indptr and the page indices
    into the buffers on the device and calls fast_decode_plan with a host copy of indptr."""
    batch, hq, hkv, d, max_tokens = 6, 16, 4, 128, 4096
    rng, g = _rng()
    cache = Cache([1] * batch, 1, hkv, d, spare=max_tokens, pair=True)
    indptr_buf = torch.zeros(batch + 1, dtype=torch.int32, device="cuda")
    indices_buf = torch.zeros(max_tokens, dtype=torch.int32, device="cuda")
    last_buf = torch.ones(batch, dtype=torch.int32, device="cuda")
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(
        _ws(), "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=indptr_buf,
        paged_kv_indices_buffer=indices_buf, paged_kv_last_page_len_buffer=last_buf)
    q = torch.empty((batch, hq, d), dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)

    def step(lens, fast=True):
        cache.set_lens(lens)
        indptr_buf.copy_(_i32(cache.indptr))
        indices_buf[: cache.indices.size].copy_(_i32(cache.indices))
        args = (indptr_buf, indices_buf, last_buf, hq, hkv, d, 1)
        if fast:
            fi_cupy.fast_decode_plan(w, *args, "NONE", data_type=torch.bfloat16, q_data_type=torch.bfloat16,
                                     non_blocking=True, global_override_indptr_cpu=torch.as_tensor(cache.indptr))
        else:
            w.begin_forward(*args, "NONE", data_type=torch.bfloat16, q_data_type=torch.bfloat16)
        q.copy_(torch.randn(q.shape, generator=g, device="cuda"))
        out.fill_(float("nan"))

    step([7, 300, 1, 64, 1000, 33], fast=False)
    graph = _capture(lambda: w.run(q, cache.arg, out=out))
    for lens in ([8, 301, 2, 65, 1001, 34], [2000, 1, 1, 1, 1, 90], [0, 17, 3000, 5, 0, 900]):
        step(lens)
        graph.replay()
        torch.cuda.synchronize()
        ro, _ = _decode_ref(cache, q)
        assert_close(_f64(out), ro, "bfloat16")
        assert torch.equal(indptr_buf.cpu(), torch.as_tensor(cache.indptr))


@pytest.mark.parametrize("kv_dt", ["bfloat16", "float8_e4m3fn"])
def test_vllm_decode_plan_and_run(kv_dt):
    """vLLM's decode: host indptr / last_page_len, device indices, page 16, 5-D NHD cache, the model's
    sm_scale, window and soft cap as keywords, fp8 caches with float scales, run(out=)."""
    lens, hq, hkv, d = [1, 17, 0, 300, 4097, 33], 32, 8, 128
    cache = Cache(lens, 16, hkv, d, "bfloat16")
    if kv_dt != "bfloat16":
        cache.data = (cache.data.float() / 2).to(DT[kv_dt])
    _, g = _rng()
    q = torch.randn((len(lens), hq, d), generator=g, device="cuda").to(torch.bfloat16)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_ws(), "NHD", use_tensor_cores=True)
    scale = 1 / math.sqrt(d)
    w.plan(torch.as_tensor(cache.indptr), _i32(cache.indices), torch.as_tensor(cache.last), hq, hkv, d, 16,
           pos_encoding_mode="NONE", sm_scale=scale, window_left=1023, logits_soft_cap=30.0,
           q_data_type=torch.bfloat16, kv_data_type=DT[kv_dt], fixed_split_size=None, disable_split_kv=False)
    out = torch.full_like(q, float("nan"))
    ks, vs = (1.0, 1.0) if kv_dt == "bfloat16" else (1.7, 0.6)
    got = w.run(q, cache.data, k_scale=ks, v_scale=vs, out=out)
    assert got is out
    ro, _ = _decode_ref(cache, q, sm_scale=scale, window_left=1023, logits_soft_cap=30.0, k_scale=ks, v_scale=vs)
    assert_close(_f64(out), ro, "bfloat16")


def test_cuda_graph_wrapper_and_legacy_names():
    """CUDAGraphBatchDecodeWithPagedKVCacheWrapper, begin_forward / forward / forward_return_lse /
    run_return_lse / end_forward, and forward() options replacing the plan's (as FlashInfer)."""
    lens, hq, hkv, d = [5, 120, 64, 1], 8, 2, 64
    cache = Cache(lens, 8, hkv, d)
    _, g = _rng()
    q = torch.randn((len(lens), hq, d), generator=g, device="cuda").to(torch.bfloat16)
    bufs = (torch.zeros(5, dtype=torch.int32, device="cuda"), torch.zeros(64, dtype=torch.int32, device="cuda"),
            torch.zeros(4, dtype=torch.int32, device="cuda"))
    w = fi_cupy.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(_ws(), *bufs, "NHD")
    assert w.is_cuda_graph_enabled and not w.use_tensor_cores
    w.begin_forward(cache.indptr, cache.indices, cache.last, hq, hkv, d, 8, "NONE", q_data_type="bfloat16")
    assert torch.equal(bufs[0].cpu(), torch.as_tensor(cache.indptr))
    assert torch.equal(bufs[1][: cache.indices.size].cpu(), torch.as_tensor(cache.indices))
    assert torch.equal(bufs[2].cpu(), torch.as_tensor(cache.last))
    ro, rl = _decode_ref(cache, q)
    assert_close(_f64(w.forward(q, cache.data)), ro, "bfloat16")
    o, lse = w.run_return_lse(q, cache.data)
    assert_close(_f64(o), ro, "bfloat16")
    assert_lse_close(_f64(lse), rl)
    o, lse = w.forward_return_lse(q, cache.data, pos_encoding_mode="ROPE_LLAMA", logits_soft_cap=20.0)
    ro2, rl2 = _decode_ref(cache, q, rope=True, logits_soft_cap=20.0)
    assert_close(_f64(o), ro2, "bfloat16")
    assert_lse_close(_f64(lse), rl2)
    assert_close(_f64(w.run(q, cache.data)), ro2, "bfloat16")  # forward's options stay, as in FlashInfer
    w.end_forward()
    with pytest.raises(ValueError, match="batch size is fixed at 4"):
        w.plan(cache.indptr[:3], cache.indices, cache.last[:2], hq, hkv, d, 8)


def test_block_tables_and_seq_lens_plan_like_indptr():
    lens, hq, hkv, d, page = [40, 3, 0, 129], 16, 4, 128, 16
    cache = Cache(lens, page, hkv, d)
    _, g = _rng()
    q = torch.randn((len(lens), hq, d), generator=g, device="cuda").to(torch.bfloat16)
    table = np.zeros((len(lens), 12), np.int32)
    for r in range(len(lens)):
        row = cache.indices[cache.indptr[r]:cache.indptr[r + 1]]
        table[r, : row.size] = row
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_ws())
    w.plan(None, None, None, hq, hkv, d, page, q_data_type="bfloat16", block_tables=_i32(table),
           seq_lens=_i32(lens))
    a = w.run(q, cache.data)
    w.plan(cache.indptr, cache.indices, cache.last, hq, hkv, d, page, q_data_type="bfloat16", seq_lens=_i32(lens))
    assert torch.equal(a, w.run(q, cache.data))
    assert_close(_f64(a), _decode_ref(cache, q)[0], "bfloat16")


@pytest.mark.parametrize("q_len,causal,d", [(3, None, 128), (4, False, 64), (2, True, 256)])
def test_multi_token_decode_q_len_per_req(q_len, causal, d):
    """q_len_per_req > 1 (spec-decode verification in decode form): request b's queries are rows
    b * q_len .. of q, the last q_len positions of its KV, causal among themselves by default."""
    lens, hq, hkv = [q_len, 50, 700, q_len + 1], 16, 4
    cache = Cache(lens, 16, hkv, d)
    _, g = _rng()
    q = torch.randn((len(lens) * q_len, hq, d), generator=g, device="cuda").to(torch.bfloat16)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_ws(), use_tensor_cores=True)
    w.plan(cache.indptr, cache.indices, cache.last, hq, hkv, d, 16, q_data_type="bfloat16", q_len_per_req=q_len,
           is_causal=causal)
    out, lse = torch.full_like(q, float("nan")), torch.full((q.shape[0], hq), float("nan"), device="cuda")
    w.run(q, cache.data, out=out, lse=lse, return_lse=True, q_len_per_req=q_len)
    qf = _f64(q)
    for r in range(len(lens)):
        ro, rl = reference.prefill_attention(qf[r * q_len:(r + 1) * q_len], *cache.kv(r), causal=causal is not False)
        assert_close(_f64(out[r * q_len:(r + 1) * q_len]), ro, "bfloat16")
        assert_lse_close(_f64(lse[r * q_len:(r + 1) * q_len]), rl)


@pytest.mark.parametrize("option", [{"disable_split_kv": True}, {"fixed_split_size": 8}])
def test_decode_split_options_are_batch_invariant(option):
    """With disable_split_kv or a fixed_split_size, a request's output is bit-identical whatever the
    batch around it (vLLM's batch-invariant mode), and matches the reference."""
    hq, hkv, d = 32, 8, 128
    big = Cache([5000] + [3, 900, 17, 4000, 1, 260] * 4, 16, hkv, d, spare=0)
    _, g = _rng()
    q = torch.randn((len(big.lens), hq, d), generator=g, device="cuda").to(torch.bfloat16)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_ws())
    w.plan(big.indptr, big.indices, big.last, hq, hkv, d, 16, q_data_type="bfloat16", **option)
    full = w.run(q, big.data)
    alone = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_ws())
    n0 = big.indptr[1]
    alone.plan(big.indptr[:2], big.indices[:n0], big.last[:1], hq, hkv, d, 16, q_data_type="bfloat16", **option)
    one = alone.run(q[:1], big.data)
    assert torch.equal(one[0], full[0])
    ro, _ = _decode_ref(big, q)
    assert_close(_f64(full), ro, "bfloat16")


# ---------------------------------------------------------------------------------------------
# Prefill


def test_sglang_extend_ragged_and_paged_merged():
    """SGLang's extend with a cached prefix: ragged attention over the new tokens (causal), paged
    attention over the prefix (not causal), both forward_return_lse with the model's sm_scale and
    soft cap, merged with merge_state: equal to causal attention over prefix + new tokens."""
    prefix, new, hq, hkv, d = [0, 37, 512, 5], [9, 1, 130, 64], 16, 4, 128
    cache = Cache(prefix, 1, hkv, d, pair=True)
    _, g = _rng()
    qo = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = torch.randn((qo[-1], hq, d), generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn((qo[-1], hkv, d), generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn((qo[-1], hkv, d), generator=g, device="cuda").to(torch.bfloat16)
    ws = _ws()
    ragged = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
    paged = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), "NHD")
    ragged.begin_forward(_i32(qo), _i32(qo), hq, hkv, d, q_data_type=torch.bfloat16)
    paged.begin_forward(_i32(qo), _i32(cache.indptr), _i32(cache.indices), _i32(cache.last), hq, hkv, d, 1,
                        q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, non_blocking=True)
    scale, cap = 1 / math.sqrt(d) * 0.9, 40.0
    o1, s1 = ragged.forward_return_lse(q, k, v, causal=True, sm_scale=scale, logits_soft_cap=cap)
    o2, s2 = paged.forward_return_lse(q, cache.arg, causal=False, sm_scale=scale, logits_soft_cap=cap)
    o, s = fi_cupy.merge_state(o1, s1, o2, s2)
    qf, kf, vf = _f64(q), _f64(k), _f64(v)
    for r in range(len(new)):
        pk, pv = cache.kv(r)
        rows = slice(qo[r], qo[r + 1])
        ro, rl = reference.prefill_attention(qf[rows], np.concatenate([pk, kf[rows]]), np.concatenate([pv, vf[rows]]),
                                             causal=True, sm_scale=scale, logits_soft_cap=cap)
        assert_close(_f64(o[rows]), ro, "bfloat16")
        assert_lse_close(_f64(s[rows]), rl)


def test_spec_decode_verify_with_a_tree_mask():
    """Target-model verification of draft trees: each request's drafts (already in the cache) attend
    to the whole prefix and to their ancestors in the tree; the custom mask replaces causal."""
    prefix, drafts, hq, hkv, d, page = [100, 7, 1500], [5, 3, 8], 32, 8, 128, 16
    rng, g = _rng()
    lens = [p + n for p, n in zip(prefix, drafts)]
    cache = Cache(lens, page, hkv, d)
    qo = np.concatenate([[0], np.cumsum(drafts)]).astype(np.int32)
    q = torch.randn((qo[-1], hq, d), generator=g, device="cuda").to(torch.bfloat16)
    masks = _tree_masks(rng, prefix, drafts)
    flat = torch.as_tensor(np.concatenate([m.ravel() for m in masks]), device="cuda")
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
    for causal in (False, True):
        w.plan(qo, cache.indptr, cache.indices, cache.last, hq, hkv, d, page, custom_mask=flat, causal=causal,
               q_data_type="bfloat16")
        out = torch.full_like(q, float("nan"))
        w.run(q, cache.data, out=out)
        qf = _f64(q)
        for r in range(len(lens)):
            ro, _ = reference.prefill_attention(qf[qo[r]:qo[r + 1]], *cache.kv(r), custom_mask=masks[r])
            assert_close(_f64(out[qo[r]:qo[r + 1]]), ro, "bfloat16")


def _tree_masks(rng, prefix, drafts):
    """Per request: the drafts see the whole prefix and their ancestors in a random tree (and themselves)."""
    masks = []
    for p, n in zip(prefix, drafts):
        parent = [-1] + [int(rng.integers(0, j)) for j in range(1, n)]
        tree = np.eye(n, dtype=bool)
        for j in range(n):
            a = parent[j]
            while a >= 0:
                tree[j, a] = True
                a = parent[a]
        masks.append(np.concatenate([np.ones((n, p), bool), tree], axis=1))
    return masks


@pytest.mark.parametrize("mask_buf", [False, True])
def test_spec_decode_verify_under_a_cuda_graph(mask_buf):
    """SGLang's target verify runs in a CUDA graph: a paged prefill wrapper with use_cuda_graph=True
    and a custom mask, re-planned with another tree (same batch) between replays; the mask lives at a
    fixed address (custom_mask_buf, or the wrapper's own buffer)."""
    drafts, hq, hkv, d, page = [4, 4, 4], 16, 4, 128, 16
    rng, g = _rng()
    qo = np.concatenate([[0], np.cumsum(drafts)]).astype(np.int32)
    cache = Cache([300, 40, 1000], page, hkv, d, spare=200)
    bufs = dict(custom_mask_buf=torch.zeros(1 << 16, dtype=torch.uint8, device="cuda"),
                mask_indptr_buf=torch.zeros(4, dtype=torch.int32, device="cuda")) if mask_buf else {}
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws(), "NHD", use_cuda_graph=True, **bufs)
    q = torch.randn((qo[-1], hq, d), generator=g, device="cuda").to(torch.bfloat16)
    out = torch.empty_like(q)

    def plan(prefix):
        cache.set_lens([p + n for p, n in zip(prefix, drafts)])
        masks = _tree_masks(rng, prefix, drafts)
        w.plan(qo, cache.indptr, cache.indices, cache.last, hq, hkv, d, page, q_data_type="bfloat16",
               custom_mask=torch.as_tensor(np.concatenate([m.ravel() for m in masks]), device="cuda"))
        return masks

    masks = plan([296, 36, 996])
    graph = _capture(lambda: w.run(q, cache.data, out=out))
    for prefix in ([297, 37, 997], [300, 200, 5]):
        masks = plan(prefix)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        qf = _f64(q)
        for r in range(len(drafts)):
            ro, _ = reference.prefill_attention(qf[qo[r]:qo[r + 1]], *cache.kv(r), custom_mask=masks[r])
            assert_close(_f64(out[qo[r]:qo[r + 1]]), ro, "bfloat16")


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("option", [{"disable_split_kv": True}, {"fixed_split_size": 32}])
def test_prefill_split_options_are_batch_invariant(paged, option):
    """fixed_split_size counts pages: 32 pages of 16 (paged) are 512 keys, and a ragged "page" is one key,
    so the ragged case asks for 512 (a cut tile writes a partial block a chunk: small chunks on long
    prompts need a large workspace, which plan() says)."""
    if not paged and "fixed_split_size" in option:
        option = {"fixed_split_size": 512}
    hq, hkv, d = 16, 4, 128
    qlens, kvlens = [300] + [7, 1, 200, 64] * 3, [3000] + [7, 900, 2000, 64] * 3
    cache = Cache(kvlens, 16 if paged else 1, hkv, d)
    _, g = _rng()
    qo = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    q = torch.randn((qo[-1], hq, d), generator=g, device="cuda").to(torch.bfloat16)
    kvo = np.concatenate([[0], np.cumsum(kvlens)]).astype(np.int32)
    k = torch.randn((kvo[-1], hkv, d), generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn((kvo[-1], hkv, d), generator=g, device="cuda").to(torch.bfloat16)

    def run(n):
        if paged:
            w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
            w.plan(qo[:n + 1], cache.indptr[:n + 1], cache.indices, cache.last[:n], hq, hkv, d, 16, causal=True,
                   q_data_type="bfloat16", **option)
            return w.run(q[: qo[n]], cache.data)
        w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_ws())
        w.plan(qo[:n + 1], kvo[:n + 1], hq, hkv, d, causal=True, q_data_type="bfloat16", **option)
        return w.run(q[: qo[n]], k[: kvo[n]], v[: kvo[n]])

    full, one = run(len(qlens)), run(1)
    assert torch.equal(one, full[: qo[1]])
    qf = _f64(q)
    kk, vv = cache.kv(0) if paged else (_f64(k[: kvo[1]]), _f64(v[: kvo[1]]))
    ro, _ = reference.prefill_attention(qf[: qo[1]], kk, vv, causal=True)
    assert_close(_f64(one), ro, "bfloat16")


@pytest.mark.parametrize("paged", [True, False])
def test_multi_item_scoring(paged):
    """Multi-item scoring (a shared prefix, then items separated by delimiters: each item token sees
    the prefix and its own item, causally), as FlashInfer's plan() arguments describe it."""
    hq, hkv, d = 8, 2, 128
    rng, g = _rng()
    prefixes, items = [12, 0, 40], [[3, 5, 1], [4, 4], [7]]
    pos_rows, lens = [], []
    for p, its in zip(prefixes, items):
        row = [0]
        for n in its:
            row += list(range(1, n + 1)) + [0]
        pos_rows.append(row)
        lens.append(p + len(row))
    width = max(len(r) for r in pos_rows)
    tpi = np.zeros((len(lens), width), np.uint16)
    for b, row in enumerate(pos_rows):
        tpi[b, : len(row)] = row
    qlens = list(lens)
    qo = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    kvo = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    cache = Cache(lens, 16 if paged else 1, hkv, d)
    q = torch.randn((qo[-1], hq, d), generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn((kvo[-1], hkv, d), generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn((kvo[-1], hkv, d), generator=g, device="cuda").to(torch.bfloat16)
    opts = dict(prefix_len_ptr=torch.as_tensor(np.array(prefixes, np.uint32)).cuda(),
                token_pos_in_items_ptr=torch.as_tensor(tpi.ravel().astype(np.int32)),
                token_pos_in_items_len=width, max_item_len_ptr=torch.as_tensor(np.array([5, 4, 7], np.int32)),
                causal=True, q_data_type="bfloat16")
    if paged:
        w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_ws())
        w.plan(qo, cache.indptr, cache.indices, cache.last, hq, hkv, d, 16, **opts)
        out = w.run(q, cache.data)
    else:
        w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_ws())
        w.plan(qo, kvo, hq, hkv, d, **opts)
        out = w.run(q, k, v)
    mask = multi_item_mask(np.array(qlens), np.array(lens), np.array(prefixes), tpi.ravel(), width)
    at = np.concatenate([[0], np.cumsum(np.array(qlens) * np.array(lens))])
    qf = _f64(q)
    for r in range(len(lens)):
        kk, vv = cache.kv(r) if paged else (_f64(k[kvo[r]:kvo[r + 1]]), _f64(v[kvo[r]:kvo[r + 1]]))
        m = mask[at[r]:at[r + 1]].reshape(qlens[r], lens[r])
        ro, _ = reference.prefill_attention(qf[qo[r]:qo[r + 1]], kk, vv, custom_mask=m)
        assert_close(_f64(out[qo[r]:qo[r + 1]]), ro, "bfloat16")


# ---------------------------------------------------------------------------------------------
# Sampling


def test_vllm_top_k_top_p_sampling_with_per_request_parameters():
    """vLLM's FlashInfer sampler: top_k_top_p_sampling_from_logits with per-request k (int32) and p
    (float32) tensors, or top-p / top-k alone from probs: every token lies in its row's filtered set,
    and k = 1 rows give the argmax."""
    batch, vocab = 64, 32000
    _, g = _rng()
    logits = torch.randn((batch, vocab), generator=g, device="cuda") * 3
    k = torch.as_tensor(np.tile([1, 5, 50, vocab], batch // 4), dtype=torch.int32, device="cuda")
    p = torch.as_tensor(np.tile([0.9, 1.0, 0.5, 0.1], batch // 4), dtype=torch.float32, device="cuda")
    probs = torch.softmax(logits, dim=-1)
    pf, kk, pp = _f64(probs), k.cpu().numpy(), p.cpu().numpy()
    for _ in range(4):
        tok = fi_cupy.top_k_top_p_sampling_from_logits(logits, k, p, deterministic=True).cpu().numpy()
        tp = fi_cupy.top_p_sampling_from_probs(probs, p, deterministic=True).cpu().numpy()
        tk = fi_cupy.top_k_sampling_from_probs(probs, k, deterministic=True).cpu().numpy()
        for r in range(batch):
            both = reference.filtered_distribution(pf[r], top_k=int(kk[r]), top_p=float(pp[r]))
            assert both[tok[r]] > 0, (r, tok[r])
            assert reference.filtered_distribution(pf[r], top_p=float(pp[r]))[tp[r]] > 0
            assert reference.filtered_distribution(pf[r], top_k=int(kk[r]))[tk[r]] > 0
        assert np.all(tok[kk == 1] == pf[kk == 1].argmax(axis=1))
