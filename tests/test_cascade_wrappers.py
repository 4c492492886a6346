"""Cascade attention wrappers: MultiLevelCascadeAttentionWrapper and the two-level shared-prefix forms.

GPU tests (marked `gpu`, CuPy callers with inputs from tests/gpu_arrays.py, outputs poisoned with NaN)
against fi_cupy.reference on each request's concatenated KV (shared segments, then its own tokens), with
FlashInfer's causal semantics: the shared levels are seen whole, causal applies within the last level
only (bottom-right aligned there). Covered: 1, 2 and 3 levels; shared prefixes of 0 (no shared part) to
32768 tokens; requests with no unique part; fp8 (e4m3) KV with k_scale / v_scale (a CuPy float8 cache is
its bytes, uint8, planned with kv_data_type); causal and not; GQA groups 1, 4, 8; page sizes 1 and 16;
NHD / HND and (k, v) caches; CUDA-graph replays across re-plans. The shared-prefix decode wrapper takes
its unique cache's dtype from the array, so its fp8 case is a torch interop test.

CPU tests: argument checks on DLPack stubs (each error names the argument, before any launch), and the
multi-level wrapper's plumbing with its level wrappers replaced by recorders: workspace slices, causal
on the last level only, the run order and merges, the row views, no allocation in run() with `out`.
"""
import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import cascade, reference
from fi_cupy._core import arrays, kernels, streams
from fi_cupy._core import dtypes as dt
from gpu_arrays import BF16, FP8, bits, capture, contiguous, empty, f64, f64_dev, nan_like, poison, rand, replay, take
from test_bad_inputs import WS, Case, S, _raises_naming, _tripwire
from tolerances import assert_close, assert_lse_close

try:
    import torch
except ImportError:
    torch = None

gpu = pytest.mark.gpu
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (interop test)")
U8, I32 = dt.uint8, dt.int32


def _indptr(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# CPU: argument checks


def _ml(n=2, **kw):
    return fi_cupy.MultiLevelCascadeAttentionWrapper(n, kw.pop("ws", WS), **kw)


# Two levels over a 2-request batch: one shared prefix (pages 0-1), then each request's own pages.
ML_PLAN = dict(qo_indptr_arr=[np.array([0, 3]), np.array([0, 1, 3])],
               paged_kv_indptr_arr=[np.array([0, 2]), np.array([0, 1, 3])],
               paged_kv_indices_arr=[np.array([0, 1]), np.array([2, 3, 4])],
               paged_kv_last_page_len=[np.array([16]), np.array([5, 7])],
               num_qo_heads=8, num_kv_heads=2, head_dim=64, page_size=16)


def ml_plan(**change):
    _ml().plan(**{**ML_PLAN, **change}, stream=0)


def _swap(name, i, value):
    arr = list(ML_PLAN[name])
    arr[i] = value
    return {name: arr}


CPU_CASES = {
    "ml_ctor_num_levels_zero": Case(lambda: _ml(0), ValueError, "num_levels", "positive integer, got 0"),
    "ml_ctor_num_levels_text": Case(lambda: _ml("2"), ValueError, "num_levels", "positive integer"),
    "ml_ctor_kv_layout": Case(lambda: _ml(kv_layout="NDH"), ValueError, "kv_layout", "'NDH' is not one of"),
    "ml_ctor_use_cuda_graph_text": Case(lambda: _ml(use_cuda_graph="yes"), TypeError, "use_cuda_graph", "bool"),
    "ml_ctor_workspace_on_host": Case(lambda: _ml(ws=np.empty(64, np.uint8)), ValueError, "float_workspace_buffer",
                                      "CUDA device"),
    "ml_ctor_workspace_strided": Case(lambda: _ml(ws=S((1024,), U8, (2,))), ValueError, "float_workspace_buffer",
                                      "contiguous"),
    "ml_ctor_buffers_of_another_count": Case(
        lambda: _ml(use_cuda_graph=True, qo_indptr_buf_arr=[S((3,), I32)]), ValueError, "qo_indptr_buf_arr",
        "expected 2 arrays"),
    "ml_ctor_buffer_float": Case(
        lambda: _ml(use_cuda_graph=True, paged_kv_indptr_buf_arr=[S((3,), I32), S((3,), dt.float32)]), TypeError,
        r"paged_kv_indptr_buf_arr[1]", "int32"),
    "ml_plan_tables_not_a_list": Case(lambda: ml_plan(qo_indptr_arr=np.array([0, 3])), TypeError, "qo_indptr_arr",
                                      "list of 2 arrays"),
    "ml_plan_tables_of_another_count": Case(lambda: ml_plan(paged_kv_indices_arr=[np.array([0, 1])]), ValueError,
                                            "paged_kv_indices_arr", "expected 2 arrays"),
    "ml_plan_qo_indptr_not_from_zero": Case(lambda: ml_plan(**_swap("qo_indptr_arr", 1, np.array([1, 1, 3]))),
                                            ValueError, r"qo_indptr_arr[1]", "must start at 0"),
    "ml_plan_qo_indptr_float": Case(lambda: ml_plan(**_swap("qo_indptr_arr", 0, np.array([0.0, 3.0]))), TypeError,
                                    r"qo_indptr_arr[0]", "integer array"),
    "ml_plan_totals_differ": Case(lambda: ml_plan(**_swap("qo_indptr_arr", 0, np.array([0, 2]))), ValueError,
                                  r"qo_indptr_arr[0]", r"ends at 2 but qo_indptr_arr\[1\] ends at 3"),
    "ml_plan_kv_indptr_of_another_batch": Case(
        lambda: ml_plan(**_swap("paged_kv_indptr_arr", 1, np.array([0, 3]))), ValueError,
        r"paged_kv_indptr_arr[1]", "expected 3 entries"),
    "ml_plan_last_page_len_zero": Case(
        lambda: ml_plan(**_swap("paged_kv_last_page_len", 1, np.array([0, 7]))), ValueError,
        r"paged_kv_last_page_len[1]", r"expected 1\.\.16"),
    "ml_plan_page_index_negative": Case(
        lambda: ml_plan(**_swap("paged_kv_indices_arr", 0, np.array([0, -1]))), ValueError,
        r"paged_kv_indices_arr[0]", ">= 0, got -1"),
    "ml_plan_indices_short": Case(lambda: ml_plan(**_swap("paged_kv_indices_arr", 1, np.array([2]))), ValueError,
                                  r"paged_kv_indices_arr[1]", "has 1 entries"),
    "ml_plan_head_dim": Case(lambda: ml_plan(head_dim=72), ValueError, "head_dim", "72 is not supported"),
    "ml_plan_heads": Case(lambda: ml_plan(num_qo_heads=6, num_kv_heads=4), ValueError, "num_qo_heads",
                          "must be a multiple"),
    "ml_plan_causal_text": Case(lambda: ml_plan(causal="yes"), TypeError, "causal", "bool"),
    "ml_plan_q_data_type": Case(lambda: ml_plan(q_data_type="float32"), TypeError, "q_data_type",
                                "float32 is not supported"),
    "ml_plan_kv_data_type": Case(lambda: ml_plan(kv_data_type="int8"), TypeError, "kv_data_type", "int8"),
    "ml_plan_pos_encoding_unknown": Case(lambda: ml_plan(pos_encoding_mode="XPOS"), ValueError, "pos_encoding_mode",
                                         "'XPOS' is not one of 'NONE', 'ROPE_LLAMA', 'ALIBI'"),
    # ALiBi: no cascade (each level would count key positions from its own start); refused on the host,
    # before any level is planned (device work: the workspace here is a stub)
    "ml_plan_alibi": Case(lambda: ml_plan(pos_encoding_mode="ALIBI"), NotImplementedError, "pos_encoding_mode",
                          '"ALIBI" is not supported by the cascade'),
    "ml_prewarm_variant": Case(lambda: _ml().prewarm_paged_kv_stride_variant("shared"), ValueError, "variant"),
    "ml_reset_int_buffers_of_another_count": Case(lambda: _ml().reset_workspace_buffer(WS, [None]), ValueError,
                                                  "int_workspace_buffers", "expected 2 arrays"),
    "decode_shared_ctor_kv_layout": Case(
        lambda: fi_cupy.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(WS, "NDH"), ValueError, "kv_layout"),
    "decode_shared_indptr_not_from_zero": Case(
        lambda: fi_cupy.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(WS).begin_forward(
            np.array([1, 2]), np.array([0]), np.array([3]), 8, 2, 64, 16), ValueError, "unique_kv_indptr",
        "must start at 0"),
    "decode_shared_last_page_len": Case(
        lambda: fi_cupy.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(WS).begin_forward(
            np.array([0, 1, 1]), np.array([0]), np.array([3, 2]), 8, 2, 64, 16), ValueError, "unique_kv_last_page_len",
        "0 for none"),
    "decode_shared_data_type": Case(
        lambda: fi_cupy.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(WS).begin_forward(
            np.array([0, 1]), np.array([0]), np.array([3]), 8, 2, 64, 16, data_type="int8"), TypeError, "data_type",
        "int8"),
    "prefill_shared_ctor_kv_layout": Case(
        lambda: fi_cupy.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(WS, "NDH"), ValueError, "kv_layout"),
    "prefill_shared_qo_indptr": Case(
        lambda: fi_cupy.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(WS).begin_forward(
            np.array([0, 3, 2]), np.array([0, 1, 2]), np.array([0, 1]), np.array([3, 3]), 8, 2, 64, 16), ValueError,
        "qo_indptr", "non-decreasing"),
    "prefill_shared_head_dim": Case(
        lambda: fi_cupy.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(WS).begin_forward(
            np.array([0, 3]), np.array([0, 1]), np.array([0]), np.array([3]), 8, 2, 72, 16), ValueError, "head_dim",
        "72 is not supported"),
}


@pytest.mark.parametrize("name", sorted(CPU_CASES))
def test_bad_input_cpu(name, monkeypatch):
    _raises_naming(CPU_CASES[name], monkeypatch)


def test_run_before_plan():
    with pytest.raises(RuntimeError, match="before plan"):
        _ml().run(S((3, 8, 64)), S((5, 2, 16, 2, 64)), stream=0)
    with pytest.raises(RuntimeError, match="before begin_forward"):
        fi_cupy.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(WS).forward(S((2, 8, 64)), S((4, 2, 64)),
                                                                           S((4, 2, 64)), S((5, 2, 16, 2, 64)))
    with pytest.raises(RuntimeError, match="before begin_forward"):
        fi_cupy.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(WS).forward(S((2, 8, 64)), S((4, 2, 64)),
                                                                            S((4, 2, 64)), S((5, 2, 16, 2, 64)))


def test_aliases_and_flags():
    w = _ml(3)
    assert cascade.MultiLevelCascadeAttentionWrapper.begin_forward is cascade.MultiLevelCascadeAttentionWrapper.plan
    assert cascade.MultiLevelCascadeAttentionWrapper.forward is cascade.MultiLevelCascadeAttentionWrapper.run
    assert w.is_cuda_graph_enabled is False and _ml(use_cuda_graph=True).is_cuda_graph_enabled is True
    w.prewarm_paged_kv_stride_variant()


# ---------------------------------------------------------------------------------------------
# CPU: the multi-level plumbing, level wrappers replaced by recorders


class _Recorder:
    """Stands in for BatchPrefillWithPagedKVCacheWrapper: records what the cascade asks of it."""
    log: list = []

    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, **bufs):
        self.ws = arrays.describe(float_workspace_buffer, "float_workspace_buffer")
        self.layout, self.graph, self.bufs = kv_layout, use_cuda_graph, bufs
        self.level = len([e for e in _Recorder.log if e[0] == "init"])
        _Recorder.log.append(("init", self.level))

    def plan(self, *args, **kw):
        _Recorder.log.append(("plan", self.level, args, kw))

    def _check_view(self, kv, indices_name="paged_kv_indices"):
        return kv

    def _launch(self, c, q, kv, o, l_info, k_scale, v_scale):
        _Recorder.log.append(("run", self.level, q, kv, dict(out=o, lse=l_info, k_scale=k_scale, v_scale=v_scale,
                                                             stream=c.stream)))

    def reset_workspace_buffer(self, ws, iw=None):
        self.ws = arrays.describe(ws, "float_workspace_buffer")


def _info(shape, dtype, ptr):
    return arrays.ArrayInfo("scratch", ptr, tuple(shape), arrays.contiguous_strides(shape), dtype, 0, "cupy")


@pytest.fixture
def recorded(monkeypatch):
    from fi_cupy import prefill
    _Recorder.log = []
    monkeypatch.setattr(prefill, "BatchPrefillWithPagedKVCacheWrapper", _Recorder)
    made, merges, uploads = [], [], []

    def device_array(fw, shape, dtype, device, stream):
        info = _info(shape, dtype, (len(made) + 1) << 32)
        made.append(info)
        return None, info
    monkeypatch.setattr(cascade, "_device_array", device_array)
    monkeypatch.setattr(cascade, "_merge_into", lambda c, o, l, oo, lo, mask: merges.append((o, l, oo, lo, mask)))
    monkeypatch.setattr(cascade, "upload", lambda host, p, dev, s: uploads.append((host.copy(), p)))
    monkeypatch.setattr(arrays, "keep_alive", lambda *a: None)
    # Explicit streams only (stream=0 below): no current-stream query, no GPU needed.
    monkeypatch.setattr(streams, "resolve", lambda stream, fw, dev: streams.handle_of(stream))
    return made, merges, uploads


def _three_level_plan(total=6):
    """Level 0: one prefix for all; level 1: two groups of requests; level 2: each request (3)."""
    per = [1, 2, total - 3]
    return dict(qo_indptr_arr=[_indptr([total]), _indptr([per[0], per[1] + per[2]]), _indptr(per)],
                paged_kv_indptr_arr=[_indptr([4]), _indptr([1, 2]), _indptr([1, 0, 2])],
                paged_kv_indices_arr=[np.arange(4), np.array([4, 5, 6]), np.array([7, 8, 9])],
                paged_kv_last_page_len=[np.array([16]), np.array([3, 16]), np.array([5, 0, 1])],
                num_qo_heads=8, num_kv_heads=2, head_dim=64, page_size=16)


def test_levels_plan_causal_last_only_and_own_workspace(recorded):
    ws = S(((1 << 20) + 100,), U8, offset=16)  # not 256-aligned: slices start on 256-byte boundaries anyway
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(3, ws)
    base = arrays.describe(ws, "ws")
    parts = [lv.ws for lv in w._wrappers]
    for a in parts:
        assert a.ptr % 256 == 0 and a.nbytes >= ((1 << 20) // 3) - 512
        assert base.ptr <= a.ptr and a.ptr + a.nbytes <= base.ptr + base.nbytes
    for a, b in zip(parts, parts[1:]):
        assert a.ptr + a.nbytes <= b.ptr, "level workspaces overlap: one level's plan would overwrite another's"
    plan = _three_level_plan()
    w.plan(**plan, causal=True, sm_scale=0.25, logits_soft_cap=3.0, q_data_type="bfloat16", stream=0)
    plans = [e for e in _Recorder.log if e[0] == "plan"]
    assert [p[1] for p in plans] == [0, 1, 2]
    assert [p[3]["causal"] for p in plans] == [False, False, True]  # FlashInfer: only the last level
    for i, p in enumerate(plans):
        assert all(np.array_equal(p[2][j], plan[k][i]) for j, k in enumerate(
            ("qo_indptr_arr", "paged_kv_indptr_arr", "paged_kv_indices_arr", "paged_kv_last_page_len")))
        assert p[2][4:] == (8, 2, 64, 16)
        assert p[3]["sm_scale"] == 0.25 and p[3]["logits_soft_cap"] == 3.0 and p[3]["q_data_type"] == "bfloat16"


def test_run_order_views_and_no_allocation(recorded, monkeypatch):
    made, merges, _ = recorded
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(3, WS)
    w.plan(**_three_level_plan(6), q_data_type="bfloat16", stream=0)
    assert [m.shape for m in made] == [(6, 8, 64), (6, 8), (6, 8)]  # one level's (o, lse), the merged lse
    scratch_o, scratch_lse, acc_lse = made
    q, cache, out = S((9, 8, 64)), S((10, 2, 16, 2, 64)), S((9, 8, 64))  # q: 3 rows past the plan's queries
    monkeypatch.setattr(arrays, "empty", _tripwire)  # out given: run() allocates nothing
    _Recorder.log = []
    w.run(q, cache, out=out, k_scale=0.5, stream=0)
    runs = [e for e in _Recorder.log if e[0] == "run"]
    assert [r[1] for r in runs] == [2, 0, 1]  # the last level into out, then the others merged in
    last = runs[0][4]
    assert last["out"].ptr == arrays.describe(out, "out").ptr and last["out"].shape == (6, 8, 64)
    assert last["lse"].ptr == acc_lse.ptr and last["lse"].shape == (6, 8)
    assert runs[0][2].shape == (6, 8, 64) and all(r[4]["k_scale"] == 0.5 and r[4]["stream"] == 0 for r in runs)
    for r in runs[1:]:
        assert r[4]["out"].ptr == scratch_o.ptr and r[4]["lse"].ptr == scratch_lse.ptr
    assert len(merges) == 2
    for o, lse, oo, lo, mask in merges:
        assert (o.ptr, lse.ptr, oo.ptr, lo.ptr, mask) == (last["out"].ptr, acc_lse.ptr, scratch_o.ptr,
                                                          scratch_lse.ptr, None)
        assert o.shape == oo.shape == (6, 8, 64)
    with pytest.raises(ValueError, match=r"^q: has 5 rows but the plan has 6 queries"):
        w.run(S((5, 8, 64)), cache, out=S((5, 8, 64)), stream=0)
    with pytest.raises(ValueError, match=r"^paged_kv_indices_arr: page index 9 is out of range for a cache of 9"):
        w.run(q, S((9, 2, 16, 2, 64)), out=out, stream=0)


def test_one_level_is_the_prefill(recorded):
    made, merges, _ = recorded
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(1, WS)
    w.plan([_indptr([2, 3])], [_indptr([1, 1])], [np.array([0, 1])], [np.array([4, 9])], 8, 2, 64, 16, causal=True,
           stream=0)
    assert [e[3]["causal"] for e in _Recorder.log if e[0] == "plan"] == [True]
    _Recorder.log = []
    w.run(S((5, 8, 64)), S((2, 2, 16, 2, 64)), out=S((5, 8, 64)), stream=0)
    assert [e[1] for e in _Recorder.log if e[0] == "run"] == [0] and not merges


def test_cuda_graph_scratch_is_fixed_and_rows_masked(recorded):
    made, merges, uploads = recorded
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(3, WS, use_cuda_graph=True)
    w.plan(**_three_level_plan(8), stream=0)
    assert all(lv.graph for lv in w._wrappers)
    n_made = len(made)
    mask = made[-1]
    assert mask.shape == (8,) and uploads[-1][1] == mask.ptr and uploads[-1][0].tolist() == [1] * 8
    w.plan(**_three_level_plan(5), stream=0)  # fewer queries: same scratch, rows 5..7 masked off
    assert len(made) == n_made and uploads[-1][0].tolist() == [1] * 5 + [0] * 3
    _Recorder.log = []
    w.run(S((8, 8, 64)), S((10, 2, 16, 2, 64)), out=S((8, 8, 64)), stream=0)
    runs = [e for e in _Recorder.log if e[0] == "run"]
    assert all(r[2].shape == (8, 8, 64) for r in runs)  # one launch shape for every plan
    assert all(m[4].ptr == mask.ptr and m[4].shape == (8,) for m in merges)
    with pytest.raises(ValueError, match=r"^qo_indptr_arr: use_cuda_graph=True keeps the query rows of the first"):
        w.plan(**_three_level_plan(9), stream=0)
    with pytest.raises(ValueError, match=r"^num_qo_heads: use_cuda_graph=True keeps"):
        w.plan(**{**_three_level_plan(8), "num_qo_heads": 4}, stream=0)


def test_non_graph_scratch_grows(recorded):
    made, _, _ = recorded
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(2, WS)
    small = dict(ML_PLAN)
    w.plan(**small, stream=0)
    n = len(made)
    w.plan(**small, stream=0)
    assert len(made) == n  # same sizes: kept
    big = {**small, "qo_indptr_arr": [np.array([0, 7]), np.array([0, 3, 7])]}
    w.plan(**big, stream=0)
    assert len(made) == n + 3 and made[-3].shape == (7, 8, 64)


# ---------------------------------------------------------------------------------------------
# GPU: against the reference


def _torch_of(x):
    """A torch CUDA copy of CuPy array x (interop tests): bfloat16 through its bits, float8 bytes as uint8."""
    h = cp.asnumpy(bits(x))
    t = torch.as_tensor(h.view(np.int16) if x.dtype == BF16 else h, device="cuda")
    return t.view(torch.bfloat16) if x.dtype == BF16 else t


def _cupy_of(t):
    """A CuPy copy of torch CUDA tensor t (bfloat16 through its bits)."""
    if t.dtype == torch.bfloat16:
        return cp.asarray(t.view(torch.int16).cpu().numpy()).view(cp.uint16).view(BF16)
    return cp.asarray(t.cpu().numpy())


class CascadeBatch:
    """A batch whose requests' KV is one segment a level in one shuffled paged cache: `shared` lists,
    for each shared level, its groups as (segment length, requests in the group) (contiguous request
    ranges); `unique` each request's own tokens (the last level), `qo` its queries."""

    def __init__(self, shared, unique, qo, page_size=16, hq=8, hkv=2, d=128, kv_dtype="bfloat16", layout="NHD",
                 spare=3):
        self.batch = len(unique)
        self.shared, self.unique, self.qo = shared, list(unique), list(qo)
        self.page_size, self.hq, self.hkv, self.d, self.layout = page_size, hq, hkv, d, layout
        segs = [[n for n, _ in lv] for lv in shared] + [self.unique]
        pages = [[-(-n // page_size) for n in lv] for lv in segs]
        total_pages = sum(map(sum, pages))
        rng = np.random.default_rng(len(segs) * 1000 + total_pages)
        pool = rng.permutation(total_pages + spare).astype(np.int32)
        self.tables, at = [], 0
        for lv, (lens, pg) in enumerate(zip(segs, pages)):
            members = [g for _, g in shared[lv]] if lv < len(shared) else [1] * self.batch
            assert sum(members) == self.batch
            starts = np.concatenate([[0], np.cumsum(members)])
            qo_ip = _indptr([sum(self.qo[starts[i]: starts[i + 1]]) for i in range(len(members))])
            ip = _indptr(pg)
            ix = pool[at: at + ip[-1]]
            at += ip[-1]
            last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pg)], np.int32)
            owner = np.repeat(np.arange(len(members)), members)  # the group of each request
            self.tables.append((qo_ip, ip, ix, last, lens, owner))
        n_pages = total_pages + spare
        shape = (n_pages, 2, page_size, hkv, d) if layout == "NHD" else (n_pages, 2, hkv, page_size, d)
        self.kv_dtype = kv_dtype
        self.cache = rand(shape, kv_dtype, scale=2.0 if kv_dtype in FP8 else 1.0)  # float8: its bytes (uint8)

    def plan_args(self):
        return [list(x) for x in zip(*[t[:4] for t in self.tables])]

    def segment(self, lv, r):
        """(k, v) float64 CuPy arrays (len, hkv, d) of request r's segment at level lv (float8 dequantised)."""
        _, ip, ix, _, lens, owner = self.tables[lv]
        grp = owner[r]
        pages = f64_dev(take(self.cache, ix[ip[grp]: ip[grp + 1]]), self.kv_dtype)
        if self.layout == "HND":
            pages = pages.transpose(0, 1, 3, 2, 4)
        kv = pages.transpose(1, 0, 2, 3, 4).reshape(2, -1, self.hkv, self.d)[:, : lens[grp]]
        return kv[0], kv[1]

    def reference(self, q, causal, k_scale=1.0, v_scale=1.0, sm_scale=None):
        """(o, lse) float64 numpy: each request over its concatenated KV; FlashInfer's causal: every
        shared segment whole, bottom-right causal within the request's own (last-level) tokens."""
        qo = _indptr(self.qo)
        q64 = f64_dev(q)
        outs, lses = [], []
        for r in range(self.batch):
            parts = [self.segment(lv, r) for lv in range(len(self.tables))]
            k = cp.concatenate([p[0] for p in parts]) * k_scale
            v = cp.concatenate([p[1] for p in parts]) * v_scale
            n_shared, u, nq = k.shape[0] - self.unique[r], self.unique[r], self.qo[r]
            mask = np.ones((nq, n_shared + u), bool)
            if causal:
                j, i = np.arange(u)[None, :], np.arange(nq)[:, None]
                mask[:, n_shared:] = j <= u - nq + i
            o, lse = reference.prefill_attention(q64[qo[r]: qo[r + 1]], k, v, custom_mask=cp.asarray(mask),
                                                 sm_scale=sm_scale)
            outs.append(cp.asnumpy(o))
            lses.append(cp.asnumpy(lse))
        return np.concatenate(outs), np.concatenate(lses)


def _workspace(nbytes=256 << 20):
    return cp.empty(nbytes, dtype=cp.uint8)


def _lse_nan(q):
    return cp.full(q.shape[:2], np.nan, dtype=cp.float32)


def _run_multilevel(b, causal, dtype, extra_rows=0, **plan_kw):
    levels = len(b.tables)
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(levels, _workspace(), b.layout)
    w.plan(*b.plan_args(), b.hq, b.hkv, b.d, b.page_size, causal=causal, q_data_type=dtype,
           kv_data_type=b.kv_dtype, **plan_kw)
    total = sum(b.qo)
    q = rand((total + extra_rows, b.hq, b.d), dtype)
    return w, q


def _check(b, o, q, causal, dtype, lse=None, **ref_kw):
    total = sum(b.qo)
    ro, rl = b.reference(q[:total], causal, **ref_kw)
    assert_close(f64(o[:total]), ro, dtype)
    if lse is not None:
        assert_lse_close(f64(lse[:total]), rl)


def _shared_spec(levels, batch, g):
    """Shared levels of a `levels`-level batch: level 0 one prefix for all; level 1 groups of 1-3."""
    rng = np.random.default_rng(g)
    spec = []
    if levels >= 2:
        spec.append([(int(rng.integers(1, 300)), batch)])
    if levels >= 3:
        sizes, left = [], batch
        while left:
            sizes.append(min(left, int(rng.integers(1, 4))))
            left -= sizes[-1]
        spec.append([(int(rng.integers(0, 100)), s) for s in sizes])
    return spec


@gpu
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("page_size", [1, 16])
def test_multilevel(levels, causal, group, page_size):
    dtype = ("bfloat16", "float16")[(levels + group) % 2]
    batch = 6
    rng = np.random.default_rng(levels * 100 + group * 10 + page_size)
    qo = rng.integers(1, 6, batch).tolist()
    qo[0] = 1  # a decode request
    unique = [q + int(rng.integers(0, 80)) for q in qo]
    b = CascadeBatch(_shared_spec(levels, batch, group + page_size), unique, qo, page_size, hq=2 * group, hkv=2,
                     kv_dtype=dtype)
    w, q = _run_multilevel(b, causal, dtype)
    out = nan_like(q)
    o = w.run(q, b.cache, out=out)
    assert o is out
    _check(b, out, q, causal, dtype)


@gpu
@pytest.mark.parametrize("prefix", [0, 1, 100, 4097, 32768])
@pytest.mark.parametrize("causal", [False, True])
def test_prefix_lengths_and_requests_without_unique_part(prefix, causal):
    """Two levels, a decode-heavy batch: requests 2 and 5 have no tokens of their own (their last-level
    pages are none: they see the prefix alone, causal or not), request 3 has several queries."""
    qo = [1, 1, 1, 4, 1, 2, 1, 1]
    unique = [37, 1, 0, 60, 16, 0, 255, 129]
    b = CascadeBatch([[(prefix, len(qo))]], unique, qo, 16, hq=32, hkv=8)
    w, q = _run_multilevel(b, causal, "bfloat16", extra_rows=3)
    out, lse = nan_like(q), _lse_nan(q)
    w.run(q, b.cache, out=out, lse=lse, return_lse=True)
    _check(b, out, q, causal, "bfloat16", lse=lse)
    n = sum(qo)
    assert np.isnan(f64(out[n:])).all() and np.isnan(f64(lse[n:])).all()  # rows past the plan: untouched
    if prefix == 0:  # nothing shared and nothing unique: o = 0, lse = -inf
        assert np.all(f64(out[2]) == 0) and np.all(np.isneginf(f64(lse[2])))


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("levels", [2, 3])
def test_fp8_kv(causal, levels):
    """e4m3 KV (the portable prefill kernel) with k_scale / v_scale (run() takes them beyond FlashInfer)."""
    qo = [1, 3, 1, 2]
    b = CascadeBatch(_shared_spec(levels, 4, 7), [40, 3, 0, 500], qo, 16, hq=16, hkv=4, kv_dtype="float8_e4m3fn")
    w, q = _run_multilevel(b, causal, "float16")
    out = nan_like(q)
    w.run(q, b.cache, out=out, k_scale=0.5, v_scale=1.5)
    _check(b, out, q, causal, "float16", k_scale=0.5, v_scale=1.5)


@gpu
def test_layouts_legacy_names_and_new_outputs():
    """HND and a (k_cache, v_cache) pair; begin_forward / forward; out and lse allocated by run()."""
    b = CascadeBatch([[(333, 3)], [(20, 2), (0, 1)]], [5, 9, 2], [2, 1, 2], 16, hq=8, hkv=2, d=64, layout="HND")
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(3, _workspace(), "HND")
    w.begin_forward(*b.plan_args(), 8, 2, 64, 16, True, q_data_type="bfloat16")
    q = rand((5, 8, 64), "bfloat16")
    _check(b, w.forward(q, b.cache), q, True, "bfloat16")
    o, lse = w.run(q, (b.cache[:, 0], b.cache[:, 1]), return_lse=True)
    _check(b, o, q, True, "bfloat16", lse=lse)


@gpu
def test_cuda_graph_replays_a_new_plan():
    """use_cuda_graph=True: a run captured once replays later plans (other lengths, fewer queries);
    rows past the current plan's queries are left alone."""
    spec = [[(700, 4)]]
    b1 = CascadeBatch(spec, [30, 1, 64, 200], [1, 1, 1, 1], 16, hq=32, hkv=8)
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(2, _workspace(), use_cuda_graph=True)
    w.plan(*b1.plan_args(), 32, 8, 128, 16, q_data_type="bfloat16")
    q = rand((4, 32, 128), "bfloat16")
    out = nan_like(q)
    cache = cp.zeros((64 + 4 * 20, 2, 16, 8, 128), dtype=cp.uint16).view(BF16)
    bits(cache)[: b1.cache.shape[0]] = bits(b1.cache)
    g, s = capture(lambda: w.run(q, cache, out=out))
    b1.cache = cache
    poison(out)
    replay(g, s)
    _check(b1, out, q, False, "bfloat16")
    b2 = CascadeBatch([[(900, 3)]], [5, 0, 300], [1, 1, 1], 16, hq=32, hkv=8)  # fewer queries, longer KV
    bits(cache)[: b2.cache.shape[0]] = bits(b2.cache)
    b2.cache = cache
    w.plan(*b2.plan_args(), 32, 8, 128, 16, q_data_type="bfloat16")
    poison(out)
    replay(g, s)
    _check(b2, out, q, False, "bfloat16")
    assert np.isnan(f64(out[3])).all()


# ---------------------------------------------------------------------------------------------
# GPU: the two-level forms


def _shared_kv(n, hkv, d, dtype, layout):
    k, v = rand((n, hkv, d), dtype), rand((n, hkv, d), dtype)
    return (k, v) if layout == "NHD" else (contiguous(k.transpose(1, 0, 2)), contiguous(v.transpose(1, 0, 2)))


def _with_shared(b, k_shared, v_shared):
    """b's reference with the contiguous shared prefix as level 0 (the paged tables hold the unique part)."""
    ks, vs = (k_shared, v_shared) if b.layout == "NHD" else (k_shared.transpose(1, 0, 2), v_shared.transpose(1, 0, 2))
    unique_segment = b.segment
    b.tables = [(_indptr([sum(b.qo)]), None, None, None, [ks.shape[0]], np.zeros(b.batch, int))] + b.tables
    b.segment = lambda lv, r: (f64_dev(ks), f64_dev(vs)) if lv == 0 else unique_segment(lv, r)


@gpu
@pytest.mark.parametrize("prefix,group,page_size,dtype", [
    (0, 4, 16, "bfloat16"), (7, 1, 1, "float16"), (1000, 8, 16, "bfloat16"), (1000, 4, 1, "float16"),
    (32768, 4, 16, "bfloat16")])
def test_shared_prefix_decode(prefix, group, page_size, dtype):
    unique = [3, 0, 17, 1, 64, 0]
    b = CascadeBatch([], unique, [1] * len(unique), page_size, hq=4 * group, hkv=4, d=128, kv_dtype=dtype)
    w = fi_cupy.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(_workspace())
    qo_ip, ip, ix, last = b.tables[0][:4]
    w.begin_forward(ip, ix, last, b.hq, b.hkv, b.d, page_size, data_type=dtype)
    ks, vs = _shared_kv(prefix, b.hkv, b.d, dtype, "NHD")
    q = rand((len(unique), b.hq, b.d), dtype)
    o = w.forward(q, ks, vs, b.cache)
    _with_shared(b, ks, vs)
    _check(b, o, q, False, dtype)


@gpu
@needs_torch
def test_shared_prefix_decode_fp8_unique_and_bf16_q():
    """data_type e4m3 (the unique cache); q bfloat16: forward() re-plans for q's dtype. forward() reads the
    cache's dtype from the array (a CuPy float8 cache would read as uint8): torch tensors, interop."""
    unique = [40, 0, 5]
    b = CascadeBatch([], unique, [1, 1, 1], 16, hq=16, hkv=4, d=128, kv_dtype="float8_e4m3fn")
    w = fi_cupy.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(_workspace())
    w.begin_forward(*b.tables[0][1:4], 16, 4, 128, 16, data_type="float8_e4m3fn")
    ks, vs = _shared_kv(600, 4, 128, "bfloat16", "NHD")
    q = rand((3, 16, 128), "bfloat16")
    o = w.forward(_torch_of(q), _torch_of(ks), _torch_of(vs), _torch_of(b.cache).view(torch.float8_e4m3fn))
    assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16
    _with_shared(b, ks, vs)
    _check(b, _cupy_of(o), q, False, "bfloat16")


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefix,group,layout", [(0, 1, "NHD"), (33, 4, "HND"), (2048, 8, "NHD")])
def test_shared_prefix_prefill(causal, prefix, group, layout):
    qo = [5, 1, 3, 7]
    unique = [9, 0, 3, 100]  # request 1: queries but no tokens of its own
    b = CascadeBatch([], unique, qo, 16, hq=2 * group, hkv=2, d=128, layout=layout)
    w = fi_cupy.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(_workspace(), layout)
    w.begin_forward(*b.tables[0][:4], b.hq, b.hkv, b.d, 16)
    ks, vs = _shared_kv(prefix, b.hkv, b.d, "bfloat16", layout)
    q = rand((sum(qo), b.hq, b.d), "bfloat16")
    o = w.forward(q, ks, vs, b.cache, causal=causal, sm_scale=0.1)
    _with_shared(b, ks, vs)
    _check(b, o, q, causal, "bfloat16", sm_scale=0.1)


# ---------------------------------------------------------------------------------------------
# GPU: bad inputs refused before any launch, the wrappers still right afterwards


def _planned_ml(ws_bytes=32 << 20):
    b = CascadeBatch([[(50, 3)]], [4, 0, 9], [1, 2, 1], 16, hq=8, hkv=2, d=64)
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(2, _workspace(ws_bytes))
    w.plan(*b.plan_args(), 8, 2, 64, 16, causal=True, q_data_type="bfloat16")
    q = rand((4, 8, 64), "bfloat16")
    return w, b, q


def _planned_decode_shared():
    b = CascadeBatch([], [4, 0, 9], [1, 1, 1], 16, hq=8, hkv=2, d=64)
    w = fi_cupy.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(_workspace(32 << 20))
    w.begin_forward(*b.tables[0][1:4], 8, 2, 64, 16, data_type="bfloat16")
    ks, vs = _shared_kv(20, 2, 64, "bfloat16", "NHD")
    return w, b, rand((3, 8, 64), "bfloat16"), ks, vs


def _unplanned_ml():
    b = CascadeBatch([[(50, 40)]], [4, 0, 9, 1] * 10, [1, 2, 1, 1] * 10, 16, hq=8, hkv=2, d=64)
    return fi_cupy.MultiLevelCascadeAttentionWrapper(2, _workspace(4096)), b  # 80 work items: > 2 KB a level


# name: (set-up, the bad call on what set-up returns, exception, argument named first, text it contains)
GPU_CASES = {
    "ml_plan_workspace_too_small": (_unplanned_ml, lambda w, b: w.plan(*b.plan_args(), 8, 2, 64, 16),
                                    ValueError, "float_workspace_buffer", "level 1's share"),
    "ml_run_q_short": (_planned_ml, lambda w, b, q: w.run(q[:3], b.cache), ValueError, "q", "has 3 rows"),
    "ml_run_q_other_dtype": (_planned_ml, lambda w, b, q: w.run(rand(q.shape, "float16"), b.cache), TypeError, "q",
                             "float16"),
    "ml_run_cache_too_few_pages": (_planned_ml, lambda w, b, q: w.run(q, b.cache[:2]), ValueError,
                                   "paged_kv_indices_arr", "out of range"),
    "ml_run_cache_other_heads": (_planned_ml, lambda w, b, q: w.run(q, contiguous(b.cache[:, :, :, :1])),
                                 ValueError, "paged_kv_cache", "does not match the plan"),
    "ml_run_out_other_shape": (_planned_ml, lambda w, b, q: w.run(q, b.cache, out=contiguous(q[:, :4])), ValueError,
                               "out", "expected shape"),
    "ml_run_lse_other_dtype": (_planned_ml, lambda w, b, q: w.run(q, b.cache, lse=contiguous(q[:, :, 0])), TypeError,
                               "lse", "float32"),
    "ml_run_k_scale_text": (_planned_ml, lambda w, b, q: w.run(q, b.cache, k_scale="x"), TypeError, "k_scale", ""),
    "decode_shared_k_shared_heads": (_planned_decode_shared,
                                     lambda w, b, q, ks, vs: w.forward(q, ks[:, :1], vs[:, :1], b.cache),
                                     ValueError, "k_shared", "does not match the plan"),
    "decode_shared_v_shared_shape": (_planned_decode_shared, lambda w, b, q, ks, vs: w.forward(q, ks, vs[:5], b.cache),
                                     ValueError, "v_shared", "must match k_shared"),
    # A CuPy float8 prefix is its bytes (uint8): refused as a dtype other than q's all the same.
    "decode_shared_k_shared_fp8": (_planned_decode_shared, lambda w, b, q, ks, vs: w.forward(
        q, empty(ks.shape, "float8_e4m3fn"), empty(vs.shape, "float8_e4m3fn"), b.cache), TypeError, "k_shared",
        "q's dtype"),
    "decode_shared_q_float32": (_planned_decode_shared,
                                lambda w, b, q, ks, vs: w.forward(rand(q.shape, "float32"), ks, vs, b.cache),
                                TypeError, "q", "float32 is not supported"),
    "decode_shared_cache_float32": (_planned_decode_shared,
                                    lambda w, b, q, ks, vs: w.forward(q, ks, vs, empty(b.cache.shape, "float32")),
                                    TypeError, "unique_kv_cache", "float32"),
}


@gpu
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_bad_input_gpu(name, monkeypatch):
    """The bad call raises, naming the argument, with kernels.launch a tripwire; then a valid multi-level
    run is still right (nothing ran on bad memory)."""
    setup, call, exc, arg, says = GPU_CASES[name]
    state = setup()
    monkeypatch.setattr(kernels, "launch", _tripwire)
    with pytest.raises(exc) as err:
        call(*state)
    monkeypatch.undo()
    msg = str(err.value)
    assert msg.startswith(arg) and not msg[len(arg):len(arg) + 1].isalnum(), msg
    assert says in msg, msg
    cp.cuda.Device().synchronize()
    w, b, q = _planned_ml()
    out = nan_like(q)
    w.run(q, b.cache, out=out)
    _check(b, out, q, True, "bfloat16")
