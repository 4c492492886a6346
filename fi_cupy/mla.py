"""Multi-head latent attention (DeepSeek-V2/V3/R1, Kimi K2): `BatchMLAPagedAttentionWrapper` and
`append_paged_mla_kv_cache` (FlashInfer's names and arguments).

The absorbed form: every query head attends over one shared compressed cache, ckv (head_dim_ckv = 512) and
kpe (head_dim_kpe = 64) per token: logits = sm_scale * (q_nope . ckv + q_pe . kpe), o = softmax . ckv. It runs
on the portable paged prefill kernel (cuda_src/prefill.cu) as attention with one KV head whose GQA group is
every query head, so each K/V tile read serves them all: Q and K 576 wide, [ckv | kpe], the kpe columns read
from q_pe and kpe_cache; V is ckv, its two 256-column halves on blockIdx.y. Decode is the case of one query a
request; causal chunked prefill the case of more. The plan (query tiles, KV cuts and their merge, CUDA-graph
capacities) is the prefill wrapper's.
"""
from __future__ import annotations

import math

import numpy as np

from . import prefill
from .page import KVView, MAX_GRID, THREADS, _append_function, _append_indices, _byte_vector, largest_page
from ._core import checks, streams
from ._core import dtypes as dt
from ._core.call import Call
from ._core.fastpath import Signatures
from ._core.docs import GLOSSARY, document
from ._core.kernels import i32, i64, ptr
from ._core.workspace import attention_outputs, attention_result, attention_sinks
from ._core.workspace import output_dtype as check_output_dtype

HEAD_DIM_CKV, HEAD_DIM_KPE = prefill.MLA_CKV, prefill.MLA_KPE

_DEFAULT_ONLY = ("optional\n    FlashInfer's trtllm-gen / profiler argument: accepted at its default only "
                 "(NotImplementedError).")
_DOCS = dict(GLOSSARY, **{
    "use_cuda_graph": ("bool, default False\n    Keep every device address and the launch shape across re-plans "
                       "of the same batch size, so a captured run() replays a new plan."),
    "qo_indptr": ("int32 array (batch_size + 1,), optional\n    Request b's queries are rows qo_indptr[b] .. "
                  "qo_indptr[b + 1] (in __init__: FlashInfer's CUDA-graph buffer, filled by plan())."),
    "kv_indptr": ("int32 array (batch_size + 1,), optional\n    Request b's pages are "
                  "kv_indices[kv_indptr[b]:kv_indptr[b + 1]] (in __init__: the CUDA-graph buffer)."),
    "kv_indices": ("int32 array, optional\n    Page indices into ckv_cache / kpe_cache (in __init__: the "
                   "CUDA-graph buffer)."),
    "kv_len_arr": ("int32 array (batch_size,), optional\n    Tokens of each request's KV; its pages hold them (in "
                   "__init__: the CUDA-graph buffer)."),
    "backend": ("str, default \"auto\"\n    \"fa3\": the Hopper kernel (sm_90a; cuda_src/mla_sm90.cu), \"fa2\": "
                "the portable one (the prefill kernel at width 576), \"auto\": the Hopper kernel where the GPU has "
                "it."),
    "num_heads": ("int, optional\n    Query heads (16, 32, 64 and 128: tensor-parallel slices of DeepSeek's 128; "
                  "any count runs)."),
    "head_dim_ckv": "int, optional\n    512 (the compressed KV's width); others raise NotImplementedError.",
    "head_dim_kpe": "int, optional\n    64 (the decoupled RoPE key's width); others raise NotImplementedError.",
    "page_size": "int, optional\n    Tokens a page: any positive size.",
    "causal": ("bool, optional\n    None or False: no mask; True: query i of a request sits at key position "
               "kv_len - qo_len + i and sees the keys up to it (chunked prefill)."),
    "sm_scale": "float, optional\n    The logits' scale; None: 1 / sqrt(576).",
    "q_data_type": "str or dtype, optional\n    float16 (None) or bfloat16.",
    "kv_data_type": "str or dtype, optional\n    The caches' dtype: q's (fp8 raises NotImplementedError).",
    "use_profiler": "bool, default False\n    Only False.",
    "enable_pdl": "bool or None, default None\n    Programmatic dependent launch for run()'s kernels; None: where "
                  "the GPU has it.",
    "use_sinks": "bool, default False\n    Accepted; run(sinks=) takes the sink logits either way.",
    "output_dtype": "str or dtype, optional\n    Only q's dtype (None); else NotImplementedError.",
    "q_nope": "array (n, num_heads, 512), optional\n    The queries' compressed-space part, q's dtype (required: the "
              "None default is FlashInfer's, whose trtllm-gen path takes `query` instead).",
    "q_pe": "array (n, num_heads, 64), optional\n    The queries' RoPE part.",
    "ckv_cache": "array (num_pages, page_size, 512), optional\n    The compressed KV cache (also the values).",
    "kpe_cache": "array (num_pages, page_size, 64), optional\n    The RoPE keys.",
    "out": "array, optional\n    (n, num_heads, 512) in q's dtype: written and returned.",
    "lse": "float32 array, optional\n    (n, num_heads): written (base 2) and returned with o.",
    "return_lse": "bool, default False\n    Also return the log-sum-exp (base 2).",
    "return_lse_base_on_e": "bool, default False\n    Only False (base 2); True raises NotImplementedError.",
    "sinks": "float32 array, optional\n    (num_heads,): one extra logit per head in the softmax denominator.",
    "append_ckv": "array (nnz, 512)\n    The new tokens' compressed KV rows.",
    "append_kpe": "array (nnz, 64)\n    The new tokens' RoPE keys.",
    "batch_indices": "int32 or int64 array (nnz,)\n    The request of each new token.",
    "positions": "int32 or int64 array (nnz,)\n    The position of each new token in its request.",
    "kv_last_page_len": "array (batch_size,)\n    Tokens in each request's last page, after the append.",
}, **{k: _DEFAULT_ONLY for k in ("metadata", "cum_seq_lens_q", "block_tables", "seq_lens", "max_q_len", "query_layout",
                                 "kv_cache_layout", "lse_mode", "output_scale", "scale_mode", "skip_softmax",
                                 "profiler_buffer", "kv_len", "page_table", "o_scale", "query", "kv_cache",
                                 "ckv_scale", "ckv_scale_arr", "kpe_scale", "skip_softmax_threshold_scale_factor",
                                 "bmm1_scale", "bmm2_scale")})


def _pages_used(kv_indptr: np.ndarray, kv_indices: np.ndarray, kv_lens: np.ndarray, page_size: int) -> tuple:
    """(page indptr, page indices, the largest of them) of the pages that hold each request's kv_len
    tokens: FlashInfer's MLA plan takes lengths (kv_len_arr) beside the page table, which may list more
    pages than they need."""
    have = np.diff(kv_indptr)
    need = -(-kv_lens // page_size)
    short = np.nonzero(need > have)[0]
    if short.size:
        b = int(short[0])
        raise ValueError(f"kv_len_arr: request {b} has {int(kv_lens[b])} tokens, more than its {int(have[b])} pages "
                         f"of {page_size} hold (kv_indptr[{b + 1}] - kv_indptr[{b}])")
    if kv_indices.size < kv_indptr[-1]:
        raise ValueError(f"kv_indices: has {kv_indices.size} entries but kv_indptr[-1] is {int(kv_indptr[-1])}")
    ip = np.zeros(need.size + 1, np.int64)
    np.cumsum(need, out=ip[1:])
    # entry k of the used table is request r's page (k - ip[r]) of its own list
    r = np.repeat(np.arange(need.size), need)
    used = kv_indices[kv_indptr[:-1][r] + np.arange(ip[-1]) - ip[:-1][r]] if ip[-1] else np.zeros(0, np.int64)
    return ip, used, largest_page(used, "kv_indices")


@document("Multi-head latent attention (DeepSeek's MLA, absorbed form) over a paged compressed cache.",
          glossary=_DOCS)
class BatchMLAPagedAttentionWrapper(prefill._PrefillWrapper):
    """Multi-head latent attention for a batch of requests (FlashInfer's API): decode (one query a
    request) and causal chunked prefill in one wrapper, over a compressed cache of ckv (num_pages,
    page_size, 512) and kpe (num_pages, page_size, 64). plan() once per batch (host work, one copy of the
    metadata into the workspace); run() once per layer: no host sync, no allocation when `out` (and
    `lse`) are given; with use_cuda_graph=True a captured run() replays any re-plan of the same batch.
    """
    family = "mla"
    _paged = True
    _table_buffers = ()  # plan() fills FlashInfer's four buffers itself, with the tables as given

    def __init__(self, float_workspace_buffer, use_cuda_graph: bool = False, qo_indptr=None, kv_indptr=None,
                 kv_indices=None, kv_len_arr=None, backend: str = "auto"):
        super().__init__(float_workspace_buffer, "NHD", use_cuda_graph, dict(
            qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, kv_len_arr=kv_len_arr), backend,
            None, None, False)
        self._enable_pdl = None

    @document("Plan an MLA batch over a paged compressed cache.", glossary=_DOCS)
    def plan(self, qo_indptr=None, kv_indptr=None, kv_indices=None, kv_len_arr=None, num_heads=None,
             head_dim_ckv=None, head_dim_kpe=None, page_size=None, causal=None, sm_scale=None, q_data_type=None,
             kv_data_type=None, use_profiler: bool = False, *, metadata=None, cum_seq_lens_q=None,
             block_tables=None, seq_lens=None, max_q_len=None, query_layout=None, kv_cache_layout=None,
             lse_mode: str = "none", output_dtype=None, output_scale="none", scale_mode: str = "default",
             skip_softmax: bool = False, enable_pdl=None, use_sinks: bool = False) -> None:
        """Plan a batch: request b's queries are rows qo_indptr[b] .. qo_indptr[b + 1] of q_nope / q_pe,
        its kv_len_arr[b] tokens the first of the pages kv_indices[kv_indptr[b]:kv_indptr[b + 1]]. causal:
        query i of a request sits at key position kv_len - qo_len + i and sees the keys up to it. sm_scale
        None: 1 / sqrt(head_dim_ckv + head_dim_kpe) (DeepSeek's models pass their own). The trtllm-gen
        arguments (metadata, block_tables, ...) are accepted at their defaults only."""
        for name, value, ok in (("use_profiler", use_profiler, (False,)), ("metadata", metadata, (None,)),
                                ("cum_seq_lens_q", cum_seq_lens_q, (None,)), ("block_tables", block_tables, (None,)),
                                ("seq_lens", seq_lens, (None,)), ("max_q_len", max_q_len, (None,)),
                                ("query_layout", query_layout, (None,)), ("kv_cache_layout", kv_cache_layout, (None,)),
                                ("lse_mode", lse_mode, ("none",)), ("output_scale", output_scale, ("none", None)),
                                ("scale_mode", scale_mode, ("default",)), ("skip_softmax", skip_softmax, (False,))):
            checks.unsupported(name, value, ok)
        for name, value in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices),
                            ("kv_len_arr", kv_len_arr), ("num_heads", num_heads), ("head_dim_ckv", head_dim_ckv),
                            ("head_dim_kpe", head_dim_kpe), ("page_size", page_size)):
            if value is None:
                raise TypeError(f"plan(): missing the argument {name}")
        num_heads = checks.positive_int("num_heads", num_heads)
        for name, got, want in (("head_dim_ckv", head_dim_ckv, HEAD_DIM_CKV),
                                ("head_dim_kpe", head_dim_kpe, HEAD_DIM_KPE)):
            if checks.positive_int(name, got) != want:
                raise NotImplementedError(f"{name}: {got} is not supported; MLA runs DeepSeek's {want} "
                                          f"(head_dim_ckv 512, head_dim_kpe 64)")
        page_size = checks.positive_int("page_size", page_size)
        causal = False if causal is None else checks.flag("causal", causal)
        q_dtype = dt.as_dtype("float16" if q_data_type is None else q_data_type, "q_data_type")
        if q_dtype not in prefill.Q_DTYPES:
            raise TypeError(f"q_data_type: {q_dtype} is not supported; expected float16 or bfloat16")
        kv_dtype = q_dtype if kv_data_type is None else dt.as_dtype(kv_data_type, "kv_data_type")
        if kv_dtype in prefill.FP8:
            raise NotImplementedError(f"kv_data_type: {kv_dtype} (an fp8 compressed cache) is not supported yet; "
                                      f"MLA takes the cache in q's dtype")
        if kv_dtype != q_dtype:
            raise TypeError(f"kv_data_type: {kv_dtype} does not match q_data_type {q_dtype}")
        check_output_dtype(output_dtype, q_dtype)
        scale_ = 1.0 / math.sqrt(HEAD_DIM_CKV + HEAD_DIM_KPE) if sm_scale is None else checks.float_arg("sm_scale",
                                                                                                       sm_scale)
        if scale_ <= 0 or not math.isfinite(scale_):
            raise ValueError(f"sm_scale: must be a positive finite number, got {sm_scale}")
        self._enable_pdl = None if enable_pdl is None else checks.flag("enable_pdl", enable_pdl)
        self._use_sinks = checks.flag("use_sinks", use_sinks)
        qo = checks.host_int_array("qo_indptr", qo_indptr)
        checks.indptr("qo_indptr", qo)
        ip = checks.host_int_array("kv_indptr", kv_indptr)
        checks.indptr("kv_indptr", ip, qo.size)
        ix = checks.host_int_array("kv_indices", kv_indices)
        lens = checks.host_int_array("kv_len_arr", kv_len_arr)
        if lens.shape != (qo.size - 1,):
            raise ValueError(f"kv_len_arr: expected {qo.size - 1} entries (batch_size), got shape {lens.shape}")
        if lens.size and lens.min() < 0:
            raise ValueError(f"kv_len_arr: lengths must be >= 0, got {int(lens.min())}")
        if qo[-1] >= 2 ** 31:
            raise ValueError("qo_indptr[-1] (total queries) must be < 2**31")
        used_ip, used, top = _pages_used(ip, ix, lens, page_size)
        params = prefill.PrefillParams(num_heads, 1, prefill.MLA_DIMS[0], q_dtype, kv_dtype, causal, -1, 0.0, scale_,
                                       False, 1.0, 1e4, page_size, False, prefill.MLA_DIMS[1])
        self._finish_plan(params, qo.astype(np.int32), used_ip.astype(np.int32), lens.astype(np.int32), (used, top),
                          None, None, None)
        if self._use_cuda_graph:  # as FlashInfer's plan(): its CUDA-graph buffers hold the tables
            self._fill_buffers({"qo_indptr": qo, "kv_indptr": ip, "kv_indices": ix[:int(ip[-1])], "kv_len_arr": lens},
                               streams.resolve(None, self._ws.framework, self._ws.device))

    @document("MLA attention of the planned batch.", glossary=_DOCS,
              returns=("o : array\n    (n, num_heads, 512), q's dtype.\nlse : float32 array\n    Only with "
                       "return_lse=True: (o, lse), lse (n, num_heads) in base 2."))
    def run(self, q_nope=None, q_pe=None, ckv_cache=None, kpe_cache=None, out=None, lse=None, return_lse: bool = False,
            profiler_buffer=None, kv_len=None, page_table=None, return_lse_base_on_e: bool = False, o_scale=None, *,
            query=None, kv_cache=None, ckv_scale=None, ckv_scale_arr=None, kpe_scale=None, sinks=None,
            skip_softmax_threshold_scale_factor=None, bmm1_scale=None, bmm2_scale=None):
        """o (n, num_heads, head_dim_ckv) in q's dtype (rows past qo_indptr[-1] are left alone), and lse
        (n, num_heads) in base 2 with return_lse=True. q_nope (n, num_heads, 512), q_pe (n, num_heads, 64),
        ckv_cache (num_pages, page_size, 512), kpe_cache (num_pages, page_size, 64). sinks: one float32
        logit per head joins each row's softmax denominator."""
        for name, value, ok in (("profiler_buffer", profiler_buffer, (None,)), ("kv_len", kv_len, (None,)),
                                ("page_table", page_table, (None,)),
                                ("return_lse_base_on_e", return_lse_base_on_e, (False,)), ("o_scale", o_scale, (None,)),
                                ("query", query, (None,)), ("kv_cache", kv_cache, (None,)),
                                ("ckv_scale", ckv_scale, (None,)), ("ckv_scale_arr", ckv_scale_arr, (None,)),
                                ("kpe_scale", kpe_scale, (None,)),
                                ("skip_softmax_threshold_scale_factor", skip_softmax_threshold_scale_factor, (None,)),
                                ("bmm1_scale", bmm1_scale, (None,)), ("bmm2_scale", bmm2_scale, (None,))):
            checks.unsupported(name, value, ok)
        for name, value in (("q_nope", q_nope), ("q_pe", q_pe), ("ckv_cache", ckv_cache), ("kpe_cache", kpe_cache)):
            if value is None:
                raise TypeError(f"run(): missing the argument {name}")
        if self._plan is None:
            raise RuntimeError("run() called before plan()")
        return_lse = checks.flag("return_lse", return_lse)
        return self._sigs((q_nope, q_pe, ckv_cache, kpe_cache, out, lse, sinks), ("mla", return_lse), None,
                          lambda: self._run_mla(q_nope, q_pe, ckv_cache, kpe_cache, out, lse, return_lse, sinks))

    def _run_mla(self, q_nope, q_pe, ckv_cache, kpe_cache, out, lse, return_lse, sinks):
        plan = self._plan
        p = plan.params
        c = Call(q_nope, None, self._enable_pdl, "q_nope")
        qn, qp = c.arg(q_nope, "q_nope"), c.arg(q_pe, "q_pe")
        ck, kp = c.arg(ckv_cache, "ckv_cache"), c.arg(kpe_cache, "kpe_cache")
        for info in (qn, qp, ck, kp):
            if info.dtype != p.q_dtype:
                raise TypeError(f"{info.name}: dtype {info.dtype} does not match the planned q_data_type {p.q_dtype}")
        n, h = plan.total_qo, p.num_qo_heads
        if qn.ndim != 3 or qn.shape[1:] != (h, HEAD_DIM_CKV) or qn.shape[0] < n:
            raise ValueError(f"q_nope: expected shape (n, {h}, {HEAD_DIM_CKV}) with n >= qo_indptr[-1] = {n}, "
                             f"got {qn.shape}")
        if qp.shape != qn.shape[:2] + (HEAD_DIM_KPE,):
            raise ValueError(f"q_pe: expected shape {qn.shape[:2] + (HEAD_DIM_KPE,)} (q_nope's rows and heads), got "
                             f"{qp.shape}")
        pages = (p.page_size,)
        if ck.ndim != 3 or ck.shape[1:] != pages + (HEAD_DIM_CKV,):
            raise ValueError(f"ckv_cache: expected shape (num_pages, {p.page_size}, {HEAD_DIM_CKV}), got {ck.shape}")
        if kp.shape != ck.shape[:2] + (HEAD_DIM_KPE,):
            raise ValueError(f"kpe_cache: expected shape {ck.shape[:2] + (HEAD_DIM_KPE,)} (ckv_cache's pages), got "
                             f"{kp.shape}")
        if plan.max_page >= ck.shape[0]:
            raise ValueError(f"kv_indices: page {plan.max_page} is past the cache's {ck.shape[0]} pages")
        for info in (qn, qp, ck, kp):
            checks.last_dim_contiguous(info)
            checks.vector_aligned(info)
        for a, b in ((qn, qp), (qn, ck), (qn, kp)):
            checks.same_device(a, b)
        checks.same_device(qn, self._ws)
        cs = ck.strides
        kv = KVView(ptr(ck), ptr(ck), cs[0], cs[1], 0, ck.shape[0], p.page_size, 1, p.head_dim, ck.dtype, ck.device,
                    (ck, kp), (HEAD_DIM_CKV, cs[0], cs[1], 0))
        out_obj, o, lse_obj, l_info = attention_outputs(c, qn, out, lse, return_lse, "(n, num_heads, head_dim_ckv)",
                                                        "(n, num_heads)")
        sk = attention_sinks(c, sinks, h)
        prefill.launch_prefill(c, plan, self._ws.ptr + plan.partial_bytes(), self._ws.ptr, qn, kv, True, o, l_info,
                               1.0, 1.0, self._use_cuda_graph, sk, pe=(qp, kp))
        return attention_result(c, out_obj, lse_obj, return_lse)


_APPEND_SIGS = Signatures()  # append_paged_mla_kv_cache's recorded calls (its index check included)


@document("Append new tokens' compressed KV (ckv and kpe rows) into their pages.", glossary=_DOCS)
def append_paged_mla_kv_cache(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices,
                              kv_indptr, kv_last_page_len) -> None:
    """Token i (row i of append_ckv (nnz, 512) and append_kpe (nnz, 64)) goes to request batch_indices[i]
    at position positions[i]: page kv_indices[kv_indptr[b] + p // page_size], slot p % page_size of
    ckv_cache (num_pages, page_size, 512) and kpe_cache (num_pages, page_size, 64). The page table must
    already count the appended tokens; get_batch_indices_positions gives batch_indices and positions."""
    args = (append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices, kv_indptr,
            kv_last_page_len)
    return _APPEND_SIGS(args, ("append_mla",), None, lambda: _append_mla(*args))


def _append_mla(append_ckv, append_kpe, batch_indices, positions, ckv_cache, kpe_cache, kv_indices, kv_indptr,
                kv_last_page_len) -> None:
    c = Call(append_ckv, None, name="append_ckv")
    rows = (c.arg(append_ckv, "append_ckv"), c.arg(append_kpe, "append_kpe"))
    caches = (c.arg(ckv_cache, "ckv_cache"), c.arg(kpe_cache, "kpe_cache"))
    nnz = rows[0].shape[0] if rows[0].ndim == 2 else -1
    for r, cache, d in zip(rows, caches, (HEAD_DIM_CKV, HEAD_DIM_KPE)):
        checks.ndim(r, 2, f"(nnz, {d})")
        checks.ndim(cache, 3, f"(num_pages, page_size, {d})")
        if r.shape != (nnz, cache.shape[2]):
            raise ValueError(f"{r.name}: expected shape ({nnz}, {cache.shape[2]}) (nnz, {cache.name}'s last dim), got "
                             f"{r.shape}")
        if r.dtype != cache.dtype:
            raise TypeError(f"{r.name}: dtype {r.dtype} does not match {cache.name}'s {cache.dtype}")
        checks.last_dim_contiguous(r)
        checks.last_dim_contiguous(cache)
        checks.no_overlap(cache)
        c.writable(cache, True)
    if caches[1].shape[:2] != caches[0].shape[:2]:
        raise ValueError(f"kpe_cache: expected (num_pages, page_size) = {caches[0].shape[:2]} (ckv_cache's), got "
                         f"{caches[1].shape[:2]}")
    num_pages, page_size = caches[0].shape[:2]
    bi, pos, ix, ip = _append_indices(c, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, nnz,
                                      page_size, num_pages)
    if nnz:
        for r, cache in zip(rows, caches):
            # append_paged_kv_kernel with one head and the same rows as K and V (written twice, alike)
            item = r.dtype.itemsize
            row_bytes = cache.shape[2] * item
            vb = _byte_vector(row_bytes, (r.ptr, cache.ptr), [s * item for s in (r.strides[0], cache.strides[0],
                                                                                  cache.strides[1])])
            fn = _append_function(c, bi.dtype, vb)
            threads = min(THREADS, max(32, (row_bytes // vb + 31) // 32 * 32))
            c.launch(fn, (min(nnz, MAX_GRID),), (threads,), [
                ptr(r), i64(r.strides[0] * item), i64(0), ptr(r), i64(r.strides[0] * item), i64(0), ptr(bi), ptr(pos),
                ptr(ix), ptr(ip), i32(ip.shape[0] - 1), i64(num_pages), ptr(cache), ptr(cache),
                i64(cache.strides[0] * item), i64(cache.strides[1] * item), i64(0), i32(page_size), i64(nnz), i32(1),
                i32(row_bytes)])
    c.result()
