"""Cascade attention: the attention-state merges merge_state, merge_state_in_place, merge_states
(cuda_src/cascade.cu), and FlashInfer's cascade wrappers built on them and on the prefill / decode
wrappers: MultiLevelCascadeAttentionWrapper, BatchDecodeWithSharedPrefixPagedKVCacheWrapper and
BatchPrefillWithSharedPrefixPagedKVCacheWrapper (see "Cascade attention wrappers" below).

A state is (v, s): v (seq_len, num_heads, head_dim) in float16 / bfloat16 / float32, and s
(seq_len, num_heads) float32, the log-sum-exp of the logits in base 2 (what decode and prefill return
with return_lse=True). A state with s = -inf contributes nothing; merging only such states gives
v = 0 and s = -inf. Any (token, head) strides are accepted; the head dim must be contiguous.
merge_state_in_place writes into v and s, except for JAX callers (immutable arrays): they get the
merged (v, s) back as new arrays.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from ._core import arrays, checks, kernels, streams
from ._core import dtypes as dt
from ._core.call import Call
from ._core.docs import KERNEL_GLOSSARY, document
from ._core.fastpath import Signatures
from ._core.kernels import KernelSpec, Program, i32, i64, ptr, struct_arg
from ._core.workspace import ALIGN, attention_outputs, attention_result, scale, upload
from .page import cache_parts, describe_paged_cache, page_table_lengths

DTYPES = (dt.float16, dt.bfloat16, dt.float32)
THREADS = 256
WAVES = 32  # CTAs per SM of the grid-stride loop (8 gave 83% of copy on H100, 32 gave 92%)


_SIGS = Signatures()  # recorded merge calls by signature: an eager call of a known signature only launches

def merge_program(dtype: dt.DType, vec: int) -> Program:
    return Program("cascade.cu", (KernelSpec("fic::merge_state_kernel", (dtype.cpp, vec)),
                                  KernelSpec("fic::merge_states_n_kernel", (dtype.cpp, vec))))


def all_programs() -> list:
    return [merge_program(d, v) for d in DTYPES for v in (8, 4, 2, 1) if v * d.itemsize <= 16]


def _state(c: Call, v, s, vname: str, sname: str, states_axis: bool = False):
    vi, si = c.arg(v, vname), c.arg(s, sname)
    checks.dtype_in(vi, DTYPES)
    checks.dtype_is(si, dt.float32, "the lse dtype (float32)")
    if states_axis:
        checks.ndim(vi, 4, "(seq_len, num_states, num_heads, head_dim)")
        checks.shape(si, vi.shape[:3], "(seq_len, num_states, num_heads)")
    else:
        checks.ndim(vi, 3, "(seq_len, num_heads, head_dim)")
        checks.shape(si, vi.shape[:2], "(seq_len, num_heads)")
    checks.last_dim_contiguous(vi)
    return vi, si


def _ref(vi, si) -> bytes:
    """StateRef: (token, head) strides of v and s (the last two non-head-dim axes)."""
    return struct_arg("qqqq", vi.strides[0], vi.strides[-2], si.strides[0], si.strides[-1])


def _shape(c: Call, rows: int, d: int, vec: int) -> tuple:
    """(grid, block): a team of up to 32 lanes per row (one warp), THREADS // team rows a CTA."""
    if rows >= 2 ** 31:
        raise ValueError(f"seq_len * num_heads = {rows} exceeds 2^31 - 1; merge in chunks of tokens")
    team = min(32, 1 << max(0, (d // vec - 1).bit_length()))
    rpc = THREADS // team
    sms = kernels.device_props(c.device)["sms"]
    return (max(1, min(-(-rows // rpc), sms * WAVES)),), (team, rpc)


def _same(a, b) -> None:
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"{b.name}: must match {a.name} in shape and dtype; got {b.shape}/{b.dtype} vs "
                         f"{a.shape}/{a.dtype}")


def _pair(c: Call, a, sa, b, sb, vo, so, mask) -> None:
    rows, d = a.shape[0] * a.shape[1], a.shape[2]
    if rows and d:
        vec = checks.vector_width([a, b, vo], d)
        fn = kernels.cached_function(c.device, ("merge_state", a.dtype.name, vec), lambda: (
            merge_program(a.dtype, vec), merge_program(a.dtype, vec).kernels[0]))
        c.launch(fn, *_shape(c, rows, d, vec), [
            ptr(a), ptr(sa), _ref(a, sa), ptr(b), ptr(sb), _ref(b, sb), ptr(vo), ptr(so), _ref(vo, so),
            ptr(mask), i32(rows), i32(a.shape[1]), i32(d)])


# Each parameter's entry, once for the module (docs.document writes the Parameters sections).
_PARAMS = {**KERNEL_GLOSSARY,
           "v_a": ("array\n"
                   "    ``(seq_len, num_heads, head_dim)``, the output of attention over segment A: float16,\n"
                   "    bfloat16 or float32, on a CUDA device (torch, JAX, CuPy or any DLPack producer). The head\n"
                   "    dim must be contiguous; the token and head strides are free."),
           "s_a": ("array\n"
                   "    ``(seq_len, num_heads)`` float32: the log-sum-exp of the attention logits in base 2, as\n"
                   "    decode and prefill return it with ``return_lse=True``; -inf marks an empty state. Any\n"
                   "    strides."),
           "v_b": ("array\n"
                   "    ``(seq_len, num_heads, head_dim)``, the output over segment B: v_a's shape and dtype. The\n"
                   "    head dim must be contiguous; the token and head strides are free."),
           "s_b": ("array\n"
                   "    ``(seq_len, num_heads)`` float32: the log-sum-exp of the attention logits in base 2, as\n"
                   "    decode and prefill return it with ``return_lse=True``; -inf marks an empty state. Any\n"
                   "    strides."),
           "v": ("array\n"
                 "    ``(seq_len, num_heads, head_dim)``, float16, bfloat16 or float32, on a CUDA device (torch,\n"
                 "    JAX, CuPy or any DLPack producer); updated in place, so no two elements may share memory. The\n"
                 "    head dim must be contiguous; the token and head strides are free."),
           "s": ("array\n"
                 "    ``(seq_len, num_heads)`` float32: the log-sum-exp of the attention logits in base 2 (as\n"
                 "    decode and prefill return it with ``return_lse=True``; -inf marks an empty state), updated in\n"
                 "    place. Any strides."),
           "v_other": ("array\n"
                       "    ``(seq_len, num_heads, head_dim)``: v's shape and dtype. The head dim must be\n"
                       "    contiguous; the token and head strides are free."),
           "s_other": ("array\n"
                       "    ``(seq_len, num_heads)`` float32: the log-sum-exp of the attention logits in base 2, as\n"
                       "    decode and prefill return it with ``return_lse=True``; -inf marks an empty state. Any\n"
                       "    strides."),
           "mask": ("array, optional\n"
                    "    ``(seq_len,)`` bool, uint8 or int8, contiguous: merge the tokens whose entry is nonzero\n"
                    "    (CUDA graphs replay one launch over a fixed number of rows and mask the ones past the\n"
                    "    batch). None: every token."),
           "num_levels": ("int\n"
                          "    The number of levels (positive): level 0 the outermost shared prefix, the last level\n"
                          "    each request's own tokens."),
           "float_workspace_buffer": ("array\n"
                                      "    Workspace on the CUDA device of the inputs (torch, CuPy or any DLPack\n"
                                      "    producer), any dtype, contiguous, 16-byte aligned: the plan's metadata\n"
                                      "    and partial states. FlashInfer recommends 128 MB."),
           "kv_layout": ("str, default \"NHD\"\n"
                         "    ``\"NHD\"`` or ``\"HND\"``: the axis order of k_shared / v_shared and of the cache's\n"
                         "    pages."),
           "use_cuda_graph": ("bool, default False\n"
                              "    Keep every device address and launch shape fixed across plans, so that a CUDA\n"
                              "    graph captured around run() replays later plans. The first plan fixes the most\n"
                              "    queries and the (num_qo_heads, head_dim, q_data_type); a larger batch needs a\n"
                              "    new wrapper."),
           "qo_indptr_buf_arr": ("list of array, optional\n"
                                 "    One int32 1-D contiguous device array a level (on the workspace's device);\n"
                                 "    with use_cuda_graph=True plan() copies that level's qo_indptr into it, as\n"
                                 "    FlashInfer's plan() does (our kernels read the workspace, so these are for\n"
                                 "    the caller's own use)."),
           "paged_kv_indptr_buf_arr": ("list of array, optional\n"
                                       "    As qo_indptr_buf_arr, for each level's paged_kv_indptr."),
           "paged_kv_indices_buf_arr": ("list of array, optional\n"
                                        "    As qo_indptr_buf_arr, for each level's paged_kv_indices."),
           "paged_kv_last_page_len_buf_arr": ("list of array, optional\n"
                                              "    As qo_indptr_buf_arr, for each level's paged_kv_last_page_len."),
           "int_workspace_buffers": ("list of array, optional\n"
                                     "    FlashInfer's integer workspaces, one a level: checked to be a list of\n"
                                     "    num_levels items, otherwise unused (the plans live in the float\n"
                                     "    workspace). FlashInfer requires them; here they may be left out."),
           "variant": ("str, default \"independent\"\n"
                       "    FlashInfer's stride variant; only ``\"independent\"`` is accepted (ValueError\n"
                       "    otherwise)."),
           "qo_indptr_arr": ("list of array\n"
                             "    One ``(batch_size_i + 1,)`` integer array a level: request r of level i holds\n"
                             "    query rows ``qo_indptr_arr[i][r]`` to ``qo_indptr_arr[i][r + 1]``. Each starts at\n"
                             "    0, is non-decreasing and ends at the same total number of queries (q's rows).\n"
                             "    Read on the host: pass numpy arrays (a device array is copied back, one\n"
                             "    synchronisation each)."),
           "paged_kv_indptr_arr": ("list of array\n"
                                   "    One ``(batch_size_i + 1,)`` integer array a level: request r of level i\n"
                                   "    owns pages\n"
                                   "    ``paged_kv_indices_arr[i][paged_kv_indptr_arr[i][r]:paged_kv_indptr_arr[i][r\n"
                                   "    + 1]]``."),
           "paged_kv_indices_arr": ("list of array\n"
                                    "    One integer array a level of at least ``paged_kv_indptr_arr[i][-1]`` page\n"
                                    "    indices (>= 0, below the cache's num_pages at run time)."),
           "paged_kv_last_page_len": ("list of array\n"
                                      "    One ``(batch_size_i,)`` integer array a level: the tokens in each\n"
                                      "    request's last page, in ``[1, page_size]`` (0 for a request without\n"
                                      "    pages)."),
           "num_qo_heads": ("int\n"
                            "    Query heads; a multiple of num_kv_heads."),
           "num_kv_heads": ("int\n"
                            "    Key / value heads."),
           "head_dim": ("int\n"
                        "    A multiple of 16 from 16 to 256 (and 512 where only prefill kernels run)."),
           "page_size": ("int\n"
                         "    Tokens a page holds (positive)."),
           "causal": ("bool, default False\n"
                      "    Causal mask on the last level only (bottom-right aligned within it), as in FlashInfer: a\n"
                      "    query sees every shared level whole."),
           "pos_encoding_mode": ("str, default \"NONE\"\n"
                                 "    ``\"NONE\"``, or ``\"ROPE_LLAMA\"`` to rotate q and k in the kernel (positions\n"
                                 "    count within a level). ``\"ALIBI\"`` raises NotImplementedError: its biases would\n"
                                 "    count positions within a level too, which no merge of the levels undoes."),
           "use_fp16_qk_reduction": ("bool, default False\n"
                                     "    Accepted; the kernels always accumulate in float32."),
           "sm_scale": ("float, optional\n"
                        "    Scale of the logits; None: ``1 / sqrt(head_dim)``."),
           "window_left": ("int, default -1\n"
                           "    Sliding window: a query sees no key more than window_left positions before its own\n"
                           "    (positions counted within a level); -1 for none."),
           "logits_soft_cap": ("float, optional\n"
                               "    Soft cap ``cap * tanh(logit / cap)`` (positive); None or 0: none."),
           "rope_scale": ("float, optional\n"
                          "    ROPE_LLAMA's position interpolation factor; None: 1."),
           "rope_theta": ("float, optional\n"
                          "    ROPE_LLAMA's frequency base; None: 1e4."),
           "q_data_type": ("str or dtype, default \"float16\"\n"
                           "    float16 or bfloat16: a name, or a torch, numpy or JAX dtype."),
           "kv_data_type": ("str or dtype, optional\n"
                            "    The cache's dtype: q_data_type (None), float8_e4m3fn or float8_e5m2."),
           "q": ("array\n"
                 "    ``(n, num_qo_heads, head_dim)`` in the planned q_data_type, ``n >= qo_indptr[-1]`` (rows past\n"
                 "    the plan's queries are left alone: a CUDA graph keeps one buffer). The head dim contiguous,\n"
                 "    the data pointer and the other strides multiples of 8 elements."),
           "paged_kv_cache": ("array or tuple of array\n"
                              "    The KV cache of every level: one 5-D array ``(num_pages, 2, page_size,\n"
                              "    num_kv_heads, head_dim)`` for ``kv_layout=\"NHD\"`` or ``(num_pages, 2,\n"
                              "    num_kv_heads, page_size, head_dim)`` for ``\"HND\"`` (``[:, 0]`` the keys, ``[:,\n"
                              "    1]`` the values), or a ``(k_cache, v_cache)`` pair of 4-D arrays. In the\n"
                              "    planned kv_data_type, with the planned page_size, num_kv_heads and head_dim;\n"
                              "    every page index of every level below num_pages. The head dim contiguous, the\n"
                              "    data pointer and the other strides multiples of 8 elements (16 for fp8)."),
           "k_scale": ("float, optional\n"
                       "    Multiplies the logits (an fp8 cache's key scale); None: 1. fi_cupy's addition."),
           "v_scale": ("float, optional\n"
                       "    Multiplies the output (an fp8 cache's value scale); None: 1. fi_cupy's addition."),
           "out": ("array, optional\n"
                   "    Where to write o: q's shape and dtype, head dim contiguous, rows 16-byte aligned; not a JAX\n"
                   "    array. None: a new array. fi_cupy's addition."),
           "lse": ("array, optional\n"
                   "    Where to write the merged lse: ``(n, num_qo_heads)`` float32, contiguous; written whenever\n"
                   "    given. Not a JAX array. fi_cupy's addition."),
           "return_lse": ("bool, default False\n"
                          "    Also return the lse. fi_cupy's addition."),
           "enable_pdl": ("bool or None, default None\n"
                          "    Programmatic dependent launch: a kernel may start while the previous one on the\n"
                          "    stream finishes. None: on where the GPU supports it (compute capability 9.0 and\n"
                          "    newer)."),
           "int_workspace_buffer": ("array, optional\n"
                                    "    FlashInfer's integer workspace: unused (the plan lives in the float\n"
                                    "    workspace). FlashInfer requires it; here it may be left out."),
           "unique_kv_indptr": ("array\n"
                                "    ``(batch_size + 1,)`` integer array: request r owns pages\n"
                                "    ``unique_kv_indices[unique_kv_indptr[r]:unique_kv_indptr[r + 1]]`` (none: only\n"
                                "    the prefix). Read on the host: pass numpy arrays (device arrays are copied\n"
                                "    back, one synchronisation each), as for the two below."),
           "unique_kv_indices": ("array\n"
                                 "    At least ``unique_kv_indptr[-1]`` page indices (>= 0)."),
           "unique_kv_last_page_len": ("array\n"
                                       "    ``(batch_size,)``: the tokens in each request's last page, in ``[1,\n"
                                       "    page_size]`` (0 for a request without pages)."),
           "data_type": ("str or dtype, default \"float16\"\n"
                         "    The unique cache's dtype: float16, bfloat16, float8_e4m3fn or float8_e5m2 (a name,\n"
                         "    or a torch, numpy or JAX dtype)."),
           "k_shared": ("array\n"
                        "    The shared prefix's keys: ``(shared_prefix_len, num_kv_heads, head_dim)`` for\n"
                        "    ``kv_layout=\"NHD\"`` or ``(num_kv_heads, shared_prefix_len, head_dim)`` for\n"
                        "    ``\"HND\"``, in q's dtype (the prefix runs on the prefill kernel, which takes K/V in\n"
                        "    the q dtype). The head dim contiguous, the data pointer and the other strides\n"
                        "    multiples of 8 elements."),
           "v_shared": ("array\n"
                        "    The shared prefix's values: k_shared's shape, dtype and strides."),
           "unique_kv_cache": ("array or tuple of array\n"
                               "    The requests' own pages: one 5-D array ``(num_pages, 2, page_size,\n"
                               "    num_kv_heads, head_dim)`` [NHD] / ``(num_pages, 2, num_kv_heads, page_size,\n"
                               "    head_dim)`` [HND], or a ``(k_cache, v_cache)`` pair of 4-D arrays, with the\n"
                               "    planned page_size, num_kv_heads and head_dim, every planned page index below\n"
                               "    num_pages."),
           "qo_indptr": ("array\n"
                         "    ``(batch_size + 1,)`` integer array: request r's queries are rows ``qo_indptr[r]`` to\n"
                         "    ``qo_indptr[r + 1]`` of q. Read on the host: pass numpy arrays (device arrays are\n"
                         "    copied back, one synchronisation each), as for the three below."),
           "paged_kv_indptr": ("array\n"
                               "    ``(batch_size + 1,)``: request r owns pages\n"
                               "    ``paged_kv_indices[paged_kv_indptr[r]:paged_kv_indptr[r + 1]]``."),
           "paged_kv_indices": ("array\n"
                                "    At least ``paged_kv_indptr[-1]`` page indices (>= 0).")}

_MERGE_NOTES = ("With ``w_x = 2 ** s_x``: ``v = (w_a * v_a + w_b * v_b) / (w_a + w_b)`` and ``s = log2(w_a +\n"
                "w_b)``, in float32 and shifted by the larger lse. A state with ``s = -inf`` weighs nothing;\n"
                "merging two empty states gives ``v = 0`` and ``s = -inf``. ``seq_len * num_heads`` must stay below\n"
                "``2**31``. fi_cupy also takes float32 states, any strides, JAX arrays and ``stream``.")

_SHARED_PREFIX_RESET = {"float_workspace_buffer": ("array\n"
                                                   "    Workspace on the CUDA device of the inputs (torch, CuPy or\n"
                                                   "    any DLPack producer), any dtype, contiguous, 16-byte\n"
                                                   "    aligned.")}


@document("Merge two attention states: the attention over the union of two KV segments.",
          returns=("v_merged : array\n"
                   "    ``(seq_len, num_heads, head_dim)`` in v_a's dtype: a new array in the caller's framework.\n"
                   "s_merged : array\n"
                   "    ``(seq_len, num_heads)`` float32, base 2."), glossary=_PARAMS, notes=_MERGE_NOTES)
def merge_state(v_a, s_a, v_b, s_b, stream=None):
    """``(v_a, s_a)`` is attention over segment A, ``(v_b, s_b)`` over segment B (the same queries); the
    result is attention over A and B together.
    """
    return _SIGS((v_a, s_a, v_b, s_b), ("merge_state",), stream, lambda: _merge_state(v_a, s_a, v_b, s_b, stream))


def _merge_state(v_a, s_a, v_b, s_b, stream):
    c = Call(v_a, stream, name="v_a")
    a, sa = _state(c, v_a, s_a, "v_a", "s_a")
    b, sb = _state(c, v_b, s_b, "v_b", "s_b")
    _same(a, b)
    vo_obj, vo = c.new(a.shape, a.dtype, "v_merged")
    so_obj, so = c.new(a.shape[:2], dt.float32, "s_merged")
    _pair(c, a, sa, b, sb, vo, so, None)
    return c.result(vo_obj, so_obj)


@document("Merge another attention state into ``(v, s)``, in place, where ``mask`` allows.",
          returns=("None or tuple of array\n"
                   "    None: v and s were updated in place. JAX callers (immutable arrays) get the merged ``(v,\n"
                   "    s)`` as new arrays instead (the tokens the mask leaves alone copied from v and s)."),
          glossary=_PARAMS, notes=_MERGE_NOTES)
def merge_state_in_place(v, s, v_other, s_other, mask=None, stream=None):
    """``(v, s)`` becomes the merge of itself with ``(v_other, s_other)`` (see merge_state) on every token
    whose mask entry is true; the other tokens keep their state.
    """
    return _SIGS((v, s, v_other, s_other, mask), ("merge_state_in_place",), stream,
                 lambda: _merge_state_in_place(v, s, v_other, s_other, mask, stream))


def _merge_state_in_place(v, s, v_other, s_other, mask, stream):
    c = Call(v, stream, name="v")
    a, sa = _state(c, v, s, "v", "s")
    b, sb = _state(c, v_other, s_other, "v_other", "s_other")
    _same(a, b)
    m = c.arg(mask, "mask")
    if m is not None:
        checks.dtype_in(m, (dt.bool_, dt.uint8, dt.int8))
        checks.shape(m, (a.shape[0],), "(seq_len,)")
        checks.contiguous(m)
    if c.writable(a) and c.writable(sa):
        checks.no_overlap(a)
        checks.no_overlap(sa)
        _pair(c, a, sa, b, sb, a, sa, m)
        c.result()
        return None
    if m is not None:  # rows the mask leaves alone keep the old state: start from a copy
        why = "for an immutable (JAX) caller with a mask"
        (vo_obj, vo), (so_obj, so) = c.copy_of(a, why), c.copy_of(sa, why)
    else:
        vo_obj, vo = c.new(a.shape, a.dtype, "v")
        so_obj, so = c.new(a.shape[:2], dt.float32, "s")
    _pair(c, a, sa, b, sb, vo, so, m)
    return c.result(vo_obj, so_obj)


@document("Merge ``num_states`` attention states of each token: attention over the union of their segments.",
          returns=("v_merged : array\n"
                   "    ``(seq_len, num_heads, head_dim)`` in v's dtype: a new array in the caller's framework.\n"
                   "s_merged : array\n"
                   "    ``(seq_len, num_heads)`` float32, base 2."), glossary=_PARAMS,
          params={"v": ("array\n"
                        "    ``(seq_len, num_states, num_heads, head_dim)``, float16, bfloat16 or float32, on a\n"
                        "    CUDA device (torch, JAX, CuPy or any DLPack producer). The head dim must be\n"
                        "    contiguous; the other strides are free."),
                  "s": ("array\n"
                        "    ``(seq_len, num_states, num_heads)`` float32: each state's log-sum-exp in base 2\n"
                        "    (-inf: empty). Any strides.")},
          notes=("``v = sum_j 2 ** s_j * v_j / sum_j 2 ** s_j`` and ``s = log2(sum_j 2 ** s_j)``, in float32; empty\n"
                 "states (``s = -inf``) weigh nothing, and a token whose states are all empty gets ``v = 0``, ``s =\n"
                 "-inf``. ``seq_len * num_heads`` must stay below ``2**31``. fi_cupy also takes float32 states, any\n"
                 "strides, JAX arrays and ``stream``."))
def merge_states(v, s, stream=None):
    """State j of token t, ``(v[t, j], s[t, j])``, is attention over one KV segment; the result is
    attention over all of them.
    """
    return _SIGS((v, s), ("merge_states",), stream, lambda: _merge_states(v, s, stream))


def _merge_states(v, s, stream):
    c = Call(v, stream, name="v")
    vi, si = _state(c, v, s, "v", "s", states_axis=True)
    seq, n, heads, d = vi.shape
    vo_obj, vo = c.new((seq, heads, d), vi.dtype, "v_merged")
    so_obj, so = c.new((seq, heads), dt.float32, "s_merged")
    rows = seq * heads
    if rows and d:
        vec = checks.vector_width([vi, vo], d)
        fn = kernels.cached_function(c.device, ("merge_states", vi.dtype.name, vec), lambda: (
            merge_program(vi.dtype, vec), merge_program(vi.dtype, vec).kernels[1]))
        c.launch(fn, *_shape(c, rows, d, vec), [
            ptr(vi), ptr(si), _ref(vi, si), i64(vi.strides[1]), i64(si.strides[1]), i32(n), ptr(vo), ptr(so),
            _ref(vo, so), i32(rows), i32(heads), i32(d)])
    return c.result(vo_obj, so_obj)


# ---------------------------------------------------------------------------------------------
# Cascade attention wrappers (FlashInfer's flashinfer/cascade.py API)
#
# A query's KV is the concatenation of one segment a level (level 0 the outermost shared prefix, the
# last level the request's own tokens). Each level is a batch prefill over that level's page table,
# whose qo_indptr groups the queries of all requests sharing a segment as ONE request: the prefill
# kernel then reads the segment once for all of them, as one long query on tensor cores. The levels'
# partial states (o, base-2 lse) are merged in place. As in FlashInfer, only the last level is causal
# (bottom-right aligned within that level); the shared levels are seen whole by every query.

_TABLES = ("qo_indptr_arr", "paged_kv_indptr_arr", "paged_kv_indices_arr", "paged_kv_last_page_len")
# The level wrapper's argument names, and ours for level i (its errors are renamed to ours).
_LEVEL_NAMES = {"qo_indptr": "qo_indptr_arr[{i}]", "paged_kv_indptr": "paged_kv_indptr_arr[{i}]",
                "paged_kv_indices": "paged_kv_indices_arr[{i}]",
                "paged_kv_last_page_len": "paged_kv_last_page_len[{i}]", "head_dim_qk": "head_dim"}


def _device_array(framework: str, shape, dtype: dt.DType, device: int, stream: int):
    """(object, ArrayInfo) of new device memory: the wrappers' scratch (CPU tests replace this)."""
    obj = arrays.empty(framework, shape, dtype, device, stream)
    return obj, arrays.describe(obj, "scratch")


def _merge_into(c: Call, o, lse, o_other, lse_other, mask) -> None:
    """(o, lse) <- merge((o, lse), (o_other, lse_other)) on c's stream, where mask (rows,) is nonzero."""
    _pair(c, o, lse, o_other, lse_other, o, lse, mask)


def _arr_arg(name: str, value, n: int, allow_none: bool = False):
    """A per-level list argument: a list (or tuple) of n items."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list of {n} arrays (one a level), got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name}: expected {n} arrays (num_levels), got {len(value)}")
    return list(value)


def _level_error(e: Exception, i: int) -> Exception:
    """A level wrapper's error, its argument renamed to ours (paged_kv_indptr -> paged_kv_indptr_arr[i])."""
    msg = str(e)
    m = re.match(r"(\w+)(?!\w)", msg)
    if m and m.group(1) in _LEVEL_NAMES:
        return _renamed(e, {m.group(1): _LEVEL_NAMES[m.group(1)].format(i=i)})
    if m and m.group(1) == "float_workspace_buffer":
        return type(e)(f"float_workspace_buffer: level {i}'s share of the buffer{msg[m.end():]}; the buffer is split "
                       f"evenly between the levels: pass a larger one")
    return e


def _slices(ws: arrays.ArrayInfo, n: int) -> list:
    """n disjoint slices of the workspace (uint8 ArrayInfo views), each starting on a 256-byte boundary."""
    lead = -ws.ptr % ALIGN
    size = max(0, ws.nbytes - lead) // n // ALIGN * ALIGN
    return [dataclasses.replace(ws, name="float_workspace_buffer", ptr=ws.ptr + lead + i * size, shape=(size,),
                                strides=(1,), dtype=dt.uint8) for i in range(n)]


@dataclasses.dataclass
class _Scratch:
    """Per-run scratch of a multi-level plan: one level's (o, lse) and the merged lse when the caller
    wants none; `mask` (CUDA graphs) marks the rows below the current plan's total queries."""
    key: tuple
    rows: int
    objs: tuple
    o: object
    lse_level: object
    lse_acc: object
    mask: object = None


class MultiLevelCascadeAttentionWrapper:
    """FlashInfer's multi-level cascade attention over one paged KV cache (one page table a level).

    plan() once per batch: level i is a BatchPrefillWithPagedKVCacheWrapper over qo_indptr_arr[i] and
    its page table (give the queries of all requests sharing a level-i segment one request there, e.g.
    qo_indptr [0, total_q] for a prefix shared by all: the segment is read once for all of them).
    Every level's qo_indptr ends at the same total. causal applies to the last level only, as in
    FlashInfer (a query sees every shared level whole). run(): each level's (o, lse), merged; no host
    sync, and no allocation when `out` (and `lse`, with return_lse) are given; with use_cuda_graph=True
    every address and launch shape stays fixed across re-plans (the first plan fixes the most queries).

    The float workspace is split into num_levels equal slices (256-byte aligned), one a level: each
    level's plan writes its metadata into its own workspace, so levels sharing one would overwrite
    each other's plans. Beyond FlashInfer, run() takes k_scale / v_scale (fp8 caches), out, lse,
    return_lse, enable_pdl and stream as the prefill wrapper's run() does.
    """

    @document("Create the wrapper and its num_levels batch prefill wrappers.", glossary=_PARAMS,
              params={"float_workspace_buffer": ("array\n"
                                                 "    Workspace on the CUDA device of the inputs (torch, CuPy or\n"
                                                 "    any DLPack producer), any dtype, contiguous: split into\n"
                                                 "    num_levels equal 256-byte aligned slices, one a level, each\n"
                                                 "    holding that level's plan metadata and partial states.\n"
                                                 "    FlashInfer recommends 128 MB; a plan that does not fit a\n"
                                                 "    level's slice raises ValueError saying so."),
                      "kv_layout": ("str, default \"NHD\"\n"
                                    "    ``\"NHD\"`` (pages of ``(page_size, num_kv_heads, head_dim)``) or\n"
                                    "    ``\"HND\"`` (``(num_kv_heads, page_size, head_dim)``).")})
    def __init__(self, num_levels, float_workspace_buffer, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf_arr=None, paged_kv_indptr_buf_arr=None, paged_kv_indices_buf_arr=None,
                 paged_kv_last_page_len_buf_arr=None):
        from . import prefill  # looked up per wrapper (the CPU tests put recorders in its place)
        self._num_levels = checks.positive_int("num_levels", num_levels)
        self._use_cuda_graph = checks.flag("use_cuda_graph", use_cuda_graph)
        self._kv_layout = kv_layout
        bufs = [_arr_arg(name, b, self._num_levels, allow_none=True) or [None] * self._num_levels
                for name, b in (("qo_indptr_buf_arr", qo_indptr_buf_arr),
                                ("paged_kv_indptr_buf_arr", paged_kv_indptr_buf_arr),
                                ("paged_kv_indices_buf_arr", paged_kv_indices_buf_arr),
                                ("paged_kv_last_page_len_buf_arr", paged_kv_last_page_len_buf_arr))]
        self._ws = arrays.describe(float_workspace_buffer, "float_workspace_buffer")
        checks.contiguous(self._ws)
        self._ws_obj = float_workspace_buffer
        self._wrappers = []
        for i, (ws, b) in enumerate(zip(_slices(self._ws, self._num_levels), zip(*bufs))):
            try:
                self._wrappers.append(prefill.BatchPrefillWithPagedKVCacheWrapper(
                    ws, kv_layout, self._use_cuda_graph, qo_indptr_buf=b[0], paged_kv_indptr_buf=b[1],
                    paged_kv_indices_buf=b[2], paged_kv_last_page_len_buf=b[3]))
            except (TypeError, ValueError) as e:
                raise _renamed(e, {n: f"{n}_arr[{i}]" for n in ("qo_indptr_buf", "paged_kv_indptr_buf",
                                                                 "paged_kv_indices_buf",
                                                                 "paged_kv_last_page_len_buf")}) from e
        self._total = None      # queries of the current plan (None: no plan)
        self._max_page = -1     # largest page index any level reads
        self._scratch = None
        self._sigs = Signatures()  # run()'s recorded calls; dropped by plan() (new metadata, maybe new scratch)

    @property
    def is_cuda_graph_enabled(self) -> bool:
        """Whether the wrapper was created with ``use_cuda_graph=True``."""
        return self._use_cuda_graph

    @document("Give the wrapper a new float workspace, split again between the levels; the plans are dropped.",
              glossary=_PARAMS,
              params={"float_workspace_buffer": ("array\n"
                                                 "    Workspace on the CUDA device of the inputs (torch, CuPy or\n"
                                                 "    any DLPack producer), any dtype, contiguous.")})
    def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffers=None) -> None:
        ints = _arr_arg("int_workspace_buffers", int_workspace_buffers, self._num_levels, allow_none=True)
        ints = ints or [None] * self._num_levels
        ws = arrays.describe(float_workspace_buffer, "float_workspace_buffer")
        checks.contiguous(ws)
        for w, part, iw in zip(self._wrappers, _slices(ws, self._num_levels), ints):
            w.reset_workspace_buffer(part, iw)
        self._ws, self._ws_obj = ws, float_workspace_buffer
        self._total, self._scratch = None, None
        self._sigs.clear()

    @document("Nothing to prewarm: the kernels take the cache's strides at run time.", glossary=_PARAMS)
    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        for w in self._wrappers:
            w.prewarm_paged_kv_stride_variant(variant)

    @document("Plan every level for a batch; the plan serves every layer's run() until the next plan().",
              glossary=_PARAMS,
              params={"head_dim": ("int\n"
                                   "    A multiple of 16 from 16 to 256, or 512 (the prefill kernel's head dims).")},
              notes=("Every level's tables are checked before any level is planned, and a bad entry raises naming\n"
                     "the level, e.g. ``paged_kv_indptr_arr[1]``. ``stream`` is fi_cupy's addition."))
    def plan(self, qo_indptr_arr, paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, sm_scale: float | None = None,
             window_left: int = -1, logits_soft_cap: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, q_data_type="float16", kv_data_type=None, *, stream=None) -> None:
        """Level i is a batch prefill of the queries grouped by ``qo_indptr_arr[i]`` over the pages of
        that level's page table: give the queries of all requests sharing a level-i segment one
        request there (e.g. ``qo_indptr_arr[0] = [0, total_q]`` for a prefix shared by all), so the
        segment is read once for all of them. The tables are read on the host.
        """
        n = self._num_levels
        tables = [_arr_arg(name, a, n) for name, a in zip(_TABLES, (qo_indptr_arr, paged_kv_indptr_arr,
                                                                    paged_kv_indices_arr, paged_kv_last_page_len))]
        causal = checks.flag("causal", causal)
        if pos_encoding_mode == "ALIBI":
            raise NotImplementedError("pos_encoding_mode: \"ALIBI\" is not supported by the cascade (each level would "
                                      "count key positions from its own start); use \"NONE\" or \"ROPE_LLAMA\"")
        host = [[checks.host_int_array(f"{name}[{i}]", a) for i, a in enumerate(t)] for name, t in zip(_TABLES, tables)]
        qos, ips, ixs, lps = host
        page_size = checks.positive_int("page_size", page_size)
        # Every level's tables before any level is planned (a plan does device work).
        for i in range(n):
            checks.indptr(f"qo_indptr_arr[{i}]", qos[i])
            checks.indptr(f"paged_kv_indptr_arr[{i}]", ips[i], qos[i].size)
            try:
                page_table_lengths(ips[i], ixs[i], lps[i], page_size, "paged_kv_")
            except ValueError as e:
                raise _level_error(e, i) from e
        total = int(qos[-1][-1])
        for i in range(n - 1):
            if qos[i][-1] != total:
                raise ValueError(f"qo_indptr_arr[{i}]: ends at {int(qos[i][-1])} but qo_indptr_arr[{n - 1}] ends at "
                                 f"{total}; every level covers all the queries (qo_indptr[-1] = total queries)")
        key = (num_qo_heads, head_dim, dt.as_dtype(q_data_type, "q_data_type"))
        self._check_scratch(total, key)
        self._total = None  # no valid plan until every level has one
        self._sigs.clear()
        for i, w in enumerate(self._wrappers):
            try:
                w.plan(qos[i], ips[i], ixs[i], lps[i], num_qo_heads, num_kv_heads, head_dim, page_size,
                       causal=causal and i == n - 1, pos_encoding_mode=pos_encoding_mode,
                       use_fp16_qk_reduction=use_fp16_qk_reduction, sm_scale=sm_scale, window_left=window_left,
                       logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
                       q_data_type=q_data_type, kv_data_type=kv_data_type, stream=stream)
            except (TypeError, ValueError, NotImplementedError) as e:
                raise _level_error(e, i) from e
        self._prepare_scratch(total, key, streams.resolve(stream, self._ws.framework, self._ws.device))
        used = [ix[: ip[-1]] for ix, ip in zip(ixs, ips)]
        self._max_page = max((int(u.max()) for u in used if u.size), default=-1)
        self._total = total

    begin_forward = plan

    def _check_scratch(self, total: int, key: tuple) -> None:
        """CUDA graphs: the first plan's scratch stays (a captured run keeps its addresses)."""
        sc = self._scratch
        if self._use_cuda_graph and sc is not None:
            if sc.key != key:
                raise ValueError(f"num_qo_heads: use_cuda_graph=True keeps the (num_qo_heads, head_dim, q_data_type) "
                                 f"of the first plan {sc.key}; got {key}; create a new wrapper")
            if total > sc.rows:
                raise ValueError(f"qo_indptr_arr: use_cuda_graph=True keeps the query rows of the first plan "
                                 f"({sc.rows}); this plan has {total}; create a new wrapper for larger batches")

    def _prepare_scratch(self, total: int, key: tuple, s: int) -> None:
        """One level's (o, lse) and the merged lse, for `total` query rows (key: heads, head_dim, q
        dtype). CUDA graphs: fixed by the first plan, a row mask marking the current plan's rows;
        otherwise they grow when a plan needs more."""
        sc = self._scratch
        if sc is None or (not self._use_cuda_graph and (sc.key != key or sc.rows < total)):
            rows, (heads, head_dim, q_dtype) = max(total, 1), key
            fw = "torch" if self._ws.framework == "torch" else "cupy"
            dev = self._ws.device
            o = _device_array(fw, (rows, int(heads), int(head_dim)), q_dtype, dev, s)
            ll = _device_array(fw, (rows, int(heads)), dt.float32, dev, s)
            la = _device_array(fw, (rows, int(heads)), dt.float32, dev, s)
            mask = _device_array("cupy", (rows,), dt.uint8, dev, s) if self._use_cuda_graph else (None, None)
            sc = self._scratch = _Scratch(key, rows, (o[0], ll[0], la[0], mask[0]), o[1], ll[1], la[1], mask[1])
        if sc.mask is not None:  # rows past this plan's queries are left alone by the merges
            self._mask_host = (np.arange(sc.rows) < total).astype(np.uint8)
            upload(self._mask_host, sc.mask.ptr, self._ws.device, s)

    @document("Attention of q over every level's KV: each level's (o, lse) merged into one output.",
              returns=("o : array or tuple of array\n"
                       "    ``(n, num_qo_heads, head_dim)`` in q's dtype (``out`` when given), in q's framework;\n"
                       "    with ``return_lse=True``, ``(o, lse)`` with lse ``(n, num_qo_heads)`` float32, the\n"
                       "    log-sum-exp of the logits in base 2."), glossary=_PARAMS)
    def run(self, q, paged_kv_cache, *, k_scale=None, v_scale=None, out=None, lse=None, return_lse: bool = False,
            enable_pdl=None, stream=None):
        """No host synchronisation; no allocation when ``out`` (and ``lse``, with return_lse) are given."""
        if self._total is None:
            raise RuntimeError("run() called before plan()")
        return_lse = checks.flag("return_lse", return_lse)
        return self._sigs((q, *cache_parts(paged_kv_cache), out, lse), (k_scale, v_scale, return_lse, enable_pdl),
                          stream, lambda: self._run(q, paged_kv_cache, k_scale, v_scale, out, lse, return_lse,
                                                    enable_pdl, stream))

    def _run(self, q, paged_kv_cache, k_scale, v_scale, out, lse, return_lse, enable_pdl, stream):
        """Every level's prefill and the merges as one Call: a call of a known signature replays its
        launches (the plan's metadata and the scratch stay where they are until the next plan)."""
        c = Call(q, stream, enable_pdl, name="q")
        qi = c.arg(q, "q")
        checks.ndim(qi, 3, "(total_q, num_qo_heads, head_dim)")
        if qi.shape[0] < self._total:
            raise ValueError(f"q: has {qi.shape[0]} rows but the plan has {self._total} queries (qo_indptr[-1])")
        sc = self._scratch
        c.fixed(sc.o, sc.lse_level, sc.lse_acc, sc.mask)
        # Rows merged: the plan's queries; under CUDA graphs every row the scratch holds (a fixed launch
        # shape), the mask leaving those past the current plan alone.
        n = min(sc.rows, qi.shape[0]) if self._use_cuda_graph else self._total
        view = describe_paged_cache(c, paged_kv_cache, self._kv_layout)
        if self._max_page >= view.num_pages:  # every level's pages, named as the caller passed them
            raise ValueError(f"paged_kv_indices_arr: page index {self._max_page} is out of range for a cache of "
                             f"{view.num_pages} pages")
        kv = self._wrappers[0]._check_view(view, "paged_kv_indices_arr")  # dtype and shape as planned
        out_obj, o, lse_obj, l_info = attention_outputs(c, qi, out, lse, return_lse,
                                                        "(total_q, num_qo_heads, head_dim)", "(total_q, num_qo_heads)")
        qv, ov = c.rows(qi, n), c.rows(o, n)
        lv = c.rows(l_info if l_info is not None else sc.lse_acc, n)
        qk_scale, vs = scale("k_scale", k_scale), scale("v_scale", v_scale)
        self._wrappers[-1]._launch(c, qv, kv, ov, lv, qk_scale, vs)
        if self._num_levels > 1:
            so, sl = c.rows(sc.o, n), c.rows(sc.lse_level, n)
            mask = None if sc.mask is None else c.rows(sc.mask, n)
            for w in self._wrappers[:-1]:  # FlashInfer's order: the last level, then the others merged in
                w._launch(c, qv, kv, so, sl, qk_scale, vs)
                _merge_into(c, ov, lv, so, sl, mask)
        return attention_result(c, out_obj, lse_obj, return_lse)

    forward = run


# ---------------------------------------------------------------------------------------------
# FlashInfer's two-level forms: the shared prefix as contiguous k_shared / v_shared (one single
# prefill of every query against it, non-causal: the prefix is read once), the unique part through
# the paged decode / prefill wrapper, the two states merged.

_16BIT = (dt.float16, dt.bfloat16)


def _check_shared(k_shared, v_shared, kv_layout: str, q_dtype: dt.DType, num_kv_heads: int, head_dim: int) -> None:
    """k_shared / v_shared against the plan, under their own names (before any launch)."""
    ki, vi = arrays.describe(k_shared, "k_shared"), arrays.describe(v_shared, "v_shared")
    layout = "(shared_prefix_len, num_kv_heads, head_dim)" if kv_layout == "NHD" else \
        "(num_kv_heads, shared_prefix_len, head_dim)"
    checks.ndim(ki, 3, layout)
    if vi.shape != ki.shape or vi.dtype != ki.dtype:
        raise ValueError(f"v_shared: must match k_shared in shape and dtype; got {vi.shape}/{vi.dtype} vs "
                         f"{ki.shape}/{ki.dtype}")
    heads = ki.shape[1] if kv_layout == "NHD" else ki.shape[0]
    if (heads, ki.shape[2]) != (num_kv_heads, head_dim):
        raise ValueError(f"k_shared: (num_kv_heads, head_dim) = {(heads, ki.shape[2])} does not match the plan "
                         f"{(num_kv_heads, head_dim)} (layout {layout})")
    checks.dtype_is(ki, q_dtype, "q's dtype (the shared prefix is read by single prefill, which takes K/V in the q "
                                 "dtype)")


def _renamed(e: Exception, names: dict) -> Exception:
    """An inner wrapper's error with its argument renamed to the one our caller passed."""
    m = re.match(r"(\w+)(?!\w)", str(e))
    if m and m.group(1) in names:
        return type(e)(names[m.group(1)] + str(e)[m.end():])
    return e


def _q_dtype(q) -> dt.DType:
    qi = arrays.describe(q, "q")
    checks.dtype_in(qi, _16BIT)
    return qi.dtype


def _cache_dtype(cache, name: str) -> dt.DType:
    first = cache[0] if isinstance(cache, (tuple, list)) and cache else cache
    return arrays.describe(first, name).dtype


def _merged(o, lse, o_other, lse_other):
    """o after merging (o_other, lse_other) into (o, lse); JAX callers get a new array."""
    got = merge_state_in_place(o, lse, o_other, lse_other)
    return o if got is None else got[0]


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper:
    """Batch decode whose requests share a prefix: FlashInfer's two-level cascade form.

    Every request's KV is the shared prefix (k_shared / v_shared, contiguous arrays) followed by its own
    pages of a paged cache. forward() runs the batch's queries as one request against the prefix (the
    single prefill kernel on tensor cores: the prefix is read once for the whole batch), the batch
    decode over each request's own pages, and merges the two states. MultiLevelCascadeAttentionWrapper
    is the general form (FlashInfer plans to deprecate this one in its favour).

    Notes
    -----
    begin_forward()'s data_type is the unique cache's dtype; q is taken to be float16 (FlashInfer's
    default), or bfloat16 when data_type is. forward() plans again when q or the cache come in other
    dtypes, so any of float16 / bfloat16 q with a cache in q's dtype or fp8 (e4m3fn, e5m2) runs. head_dim
    is a multiple of 16 from 16 to 256 (the decode kernels' head dims).
    """

    @document("Create the wrapper and the batch decode wrapper it plans the unique part on.", glossary=_PARAMS)
    def __init__(self, float_workspace_buffer, kv_layout: str = "NHD"):
        from . import decode
        self._decode = decode.BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout)
        self._kv_layout = kv_layout
        self._args = None  # begin_forward's tables and sizes (host), for re-plans
        self._dtypes = None  # (q dtype, kv dtype) of the current plan

    @document("Give the wrapper a new float workspace (the next forward() plans again).", glossary=_PARAMS,
              params=_SHARED_PREFIX_RESET)
    def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer=None) -> None:
        self._decode.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._dtypes = None

    @document("Plan the unique part of a batch: each request's own pages (the prefix needs no plan).",
              glossary=_PARAMS)
    def begin_forward(self, unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len, num_qo_heads: int,
                      num_kv_heads: int, head_dim: int, page_size: int, data_type="float16") -> None:
        kv = dt.as_dtype(data_type, "data_type")
        tables = (checks.host_int_array("unique_kv_indptr", unique_kv_indptr),
                  checks.host_int_array("unique_kv_indices", unique_kv_indices),
                  checks.host_int_array("unique_kv_last_page_len", unique_kv_last_page_len))
        self._args = (tables, (num_qo_heads, num_kv_heads, head_dim, page_size))
        self._dtypes = None
        self._plan(kv if kv in _16BIT else dt.float16, kv)

    def _plan(self, q_dtype: dt.DType, kv_dtype: dt.DType, kv_name: str = "data_type") -> None:
        tables, sizes = self._args
        try:
            self._decode.plan(*tables, *sizes, pos_encoding_mode="NONE", q_data_type=q_dtype, kv_data_type=kv_dtype)
        except (TypeError, ValueError) as e:
            raise _renamed(e, {"indptr": "unique_kv_indptr", "indices": "unique_kv_indices",
                               "last_page_len": "unique_kv_last_page_len", "kv_data_type": kv_name}) from e
        self._dtypes = (q_dtype, kv_dtype)

    @document("Decode attention of each request's query over the shared prefix and its own pages.",
              returns=("array\n"
                       "    ``(batch_size, num_qo_heads, head_dim)`` in q's dtype: a new array in q's framework."),
              glossary=_PARAMS,
              params={"q": ("array\n"
                            "    ``(batch_size, num_qo_heads, head_dim)``, float16 or bfloat16: one query a\n"
                            "    request.")})
    def forward(self, q, k_shared, v_shared, unique_kv_cache):
        if self._args is None:
            raise RuntimeError("forward() called before begin_forward()")
        want = (_q_dtype(q), _cache_dtype(unique_kv_cache, "unique_kv_cache"))
        if want != self._dtypes:
            self._plan(*want, kv_name="unique_kv_cache")
        _, (_, num_kv_heads, head_dim, _) = self._args
        _check_shared(k_shared, v_shared, self._kv_layout, want[0], num_kv_heads, head_dim)
        from .prefill import single_prefill_with_kv_cache
        # The batch's queries as one request against the prefix: the prefix is read once for all.
        o, lse = single_prefill_with_kv_cache(q, k_shared, v_shared, causal=False, kv_layout=self._kv_layout,
                                              pos_encoding_mode="NONE", return_lse=True)
        o_u, lse_u = self._decode.run(q, unique_kv_cache, return_lse=True)
        return _merged(o, lse, o_u, lse_u)

    def end_forward(self) -> None:
        """Nothing to release (FlashInfer's deprecated call, kept for its callers)."""
        pass


class BatchPrefillWithSharedPrefixPagedKVCacheWrapper:
    """Batch prefill / append whose requests share a prefix: FlashInfer's two-level cascade form.

    Every request's KV is the shared prefix (k_shared / v_shared, contiguous arrays) followed by its own
    pages of a paged cache. forward() runs all the queries as one request against the prefix (single
    prefill, non-causal since the prefix precedes every query; the prefix is read once), the batch
    prefill over each request's own pages (causal there with causal=True, bottom-right aligned within
    the unique part, as in FlashInfer), and merges the two states. MultiLevelCascadeAttentionWrapper is
    the general form (FlashInfer plans to deprecate this one in its favour).

    Notes
    -----
    begin_forward() plans for float16 q (FlashInfer's default); forward() plans again when q or the
    cache come in other dtypes (bfloat16, an fp8 unique cache) or its options differ from the plan's.
    head_dim is a multiple of 16 from 16 to 256, or 512 (the prefill kernel's head dims).
    """

    @document("Create the wrapper and the batch prefill wrapper it plans the unique part on.", glossary=_PARAMS)
    def __init__(self, float_workspace_buffer, kv_layout: str = "NHD"):
        from . import prefill
        self._prefill = prefill.BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout)
        self._kv_layout = kv_layout
        self._args = None
        self._opts = None  # the options and dtypes of the current plan

    @document("Give the wrapper a new float workspace (the next forward() plans again).", glossary=_PARAMS,
              params=_SHARED_PREFIX_RESET)
    def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer=None) -> None:
        self._prefill.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._opts = None

    @document("Nothing to prewarm: the kernels take the cache's strides at run time.", glossary=_PARAMS)
    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        self._prefill.prewarm_paged_kv_stride_variant(variant)

    @document("Plan the unique part of a batch: each request's queries and own pages.", glossary=_PARAMS,
              params={"paged_kv_last_page_len": ("array\n"
                                                 "    ``(batch_size,)``: the tokens in each request's last page, in\n"
                                                 "    ``[1, page_size]`` (0 for a request without pages).")})
    def begin_forward(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
                      num_kv_heads: int, head_dim: int, page_size: int) -> None:
        tables = tuple(checks.host_int_array(n, a) for n, a in (
            ("qo_indptr", qo_indptr), ("paged_kv_indptr", paged_kv_indptr), ("paged_kv_indices", paged_kv_indices),
            ("paged_kv_last_page_len", paged_kv_last_page_len)))
        self._args = (tables, (num_qo_heads, num_kv_heads, head_dim, page_size))
        self._opts = None
        self._plan((False, False, None, None, None, dt.float16, None))

    def _plan(self, opts: tuple) -> None:
        tables, sizes = self._args
        causal, fp16_qk, sm_scale, rope_scale, rope_theta, q_dtype, kv_dtype = opts
        try:
            self._prefill.plan(*tables, *sizes, causal=causal, use_fp16_qk_reduction=fp16_qk, sm_scale=sm_scale,
                               rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_dtype,
                               kv_data_type=kv_dtype)
        except (TypeError, ValueError) as e:
            raise _renamed(e, {"kv_data_type": "unique_kv_cache", "head_dim_qk": "head_dim"}) from e
        self._opts = opts

    @document("Prefill attention of every query over the shared prefix and its request's own pages.",
              returns=("array\n"
                       "    ``(qo_indptr[-1], num_qo_heads, head_dim)`` in q's dtype: a new array in q's framework."),
              glossary=_PARAMS,
              params={"q": ("array\n"
                            "    ``(qo_indptr[-1], num_qo_heads, head_dim)``, float16 or bfloat16; the head dim\n"
                            "    contiguous, the data pointer and the other strides multiples of 8 elements."),
                      "causal": ("bool, default False\n"
                                 "    Causal mask over the unique part (bottom-right aligned within it); the prefix\n"
                                 "    is always seen whole."),
                      "rope_scale": ("float, optional\n"
                                     "    Checked (positive) and passed on, but without effect: no RoPE is\n"
                                     "    applied here, as in FlashInfer, whose forward() also runs with\n"
                                     "    pos_encoding_mode \"NONE\"."),
                      "rope_theta": ("float, optional\n"
                                     "    As rope_scale: checked, without effect.")})
    def forward(self, q, k_shared, v_shared, unique_kv_cache, causal: bool = False,
                use_fp16_qk_reduction: bool = False, sm_scale: float | None = None, rope_scale: float | None = None,
                rope_theta: float | None = None):
        if self._args is None:
            raise RuntimeError("forward() called before begin_forward()")
        causal = checks.flag("causal", causal)
        use_fp16_qk_reduction = checks.flag("use_fp16_qk_reduction", use_fp16_qk_reduction)
        q_dtype = _q_dtype(q)
        opts = (causal, use_fp16_qk_reduction, sm_scale, rope_scale, rope_theta, q_dtype,
                _cache_dtype(unique_kv_cache, "unique_kv_cache"))
        if opts != self._opts:
            self._plan(opts)
        _, (_, num_kv_heads, head_dim, _) = self._args
        _check_shared(k_shared, v_shared, self._kv_layout, q_dtype, num_kv_heads, head_dim)
        from .prefill import single_prefill_with_kv_cache
        o, lse = single_prefill_with_kv_cache(q, k_shared, v_shared, causal=False, kv_layout=self._kv_layout,
                                              pos_encoding_mode="NONE", use_fp16_qk_reduction=use_fp16_qk_reduction,
                                              sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta,
                                              return_lse=True)
        o_u, lse_u = self._prefill.run(q, unique_kv_cache, return_lse=True)
        return _merged(o, lse, o_u, lse_u)

    def end_forward(self) -> None:
        """Nothing to release (FlashInfer's deprecated call, kept for its callers)."""
        pass
