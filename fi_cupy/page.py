"""Paged KV cache: its description (shared by decode and prefill), append_paged_kv_cache,
get_seq_lens and get_batch_indices_positions (cuda_src/page.cu).

A cache is one 5-D array (num_pages, 2, page_size, num_kv_heads, head_dim) [NHD] /
(num_pages, 2, num_kv_heads, page_size, head_dim) [HND], or a (k_cache, v_cache) pair of 4-D arrays.
Request b owns pages kv_indices[kv_indptr[b]:kv_indptr[b + 1]]; its token at position p sits in
page kv_indices[kv_indptr[b] + p // page_size], slot p % page_size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from ._core import checks, kernels
from ._core import dtypes as dt
from ._core.call import Call
from ._core.docs import KERNEL_GLOSSARY, document
from ._core.fastpath import Signatures
from ._core.kernels import KernelSpec, Program, i32, i64, ptr

LAYOUTS = ("NHD", "HND")
INDEX_DTYPES = (dt.int32, dt.int64)
CACHE_DTYPES = (dt.float16, dt.bfloat16, dt.float32, dt.float8_e4m3fn, dt.float8_e5m2)
THREADS = 256
MAX_GRID = 2 ** 31 - 1  # one CTA per appended token
_SIGS = Signatures()  # recorded calls by signature: an eager call of a known signature only launches


@dataclass
class KVView:
    k_ptr: int
    v_ptr: int
    stride_page: int
    stride_slot: int
    stride_head: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: dt.DType
    device: int
    infos: tuple
    # V's (head_dim, stride_page, stride_slot, stride_head) where they differ from K's (prefill with
    # head_dim_vo != head_dim_qk); () when V is laid out as K.
    v_dims: tuple = ()

    @property
    def v_head_dim(self) -> int:
        return self.v_dims[0] if self.v_dims else self.head_dim

    @property
    def v_strides(self) -> tuple:
        """V's (stride_page, stride_slot, stride_head)."""
        return self.v_dims[1:] if self.v_dims else (self.stride_page, self.stride_slot, self.stride_head)


def page_table_lengths(indptr: np.ndarray, indices: np.ndarray | None, last_page_len: np.ndarray, page_size: int,
                       prefix: str = "") -> tuple:
    """(kv_lens, used page indices, the largest of them or -1) of a CSR page table, checked (decode's
    `indptr`, prefill's `paged_kv_indptr`: argument names are prefix + indptr / indices / last_page_len).
    indices None: they stay on the device, unchecked (fast_decode_plan); used is then None."""
    batch = indptr.size - 1
    if last_page_len.size != batch:
        raise ValueError(f"{prefix}last_page_len: expected {batch} entries (batch_size), got {last_page_len.size}")
    total_pages = int(indptr[-1])
    if indices is not None and indices.size < total_pages:
        raise ValueError(f"{prefix}indices: has {indices.size} entries but {prefix}indptr[-1] is {indptr[-1]}")
    pages = indptr[1:] - indptr[:-1]
    every_request_has_pages = batch > 0 and bool(pages.min() > 0)
    if not _last_pages_ok(pages, last_page_len, page_size, every_request_has_pages):
        bad = _bad_last_pages(pages, last_page_len, page_size)
        i = int(np.argmax(bad))
        raise ValueError(f"{prefix}last_page_len: request {i} has {pages[i]} pages and last_page_len "
                         f"{last_page_len[i]}; expected 1..{page_size} (page_size) for a non-empty request, 0 for none")
    used = None if indices is None else indices[:total_pages]
    max_page = -1 if used is None else largest_page(used, f"{prefix}indices")
    if total_pages >= 2 ** 31:
        raise ValueError(f"{prefix}indptr[-1] (total pages) must be < 2**31")
    kv_lens = (pages - 1) * page_size + last_page_len
    if not every_request_has_pages:
        kv_lens = np.where(pages > 0, kv_lens, 0)
    # A request's length is at most its pages * page_size: its own check only where the total allows 2**31.
    if total_pages * page_size >= 2 ** 31 and kv_lens.size and kv_lens.max() >= 2 ** 31:
        raise ValueError("a request's kv length must be < 2**31")
    return kv_lens, used, max_page


def largest_page(used: np.ndarray, name: str) -> int:
    """The largest of page indices `used` (-1 when empty), ValueError naming `name` when one is negative.
    One pass: viewed as unsigned, a negative entry is above every non-negative one, so a single max()
    both finds the largest and shows a negative (plan() reads 32K indices a step at batch 512)."""
    if not used.size:
        return -1
    if used.dtype.kind != "i":
        return int(used.max())
    top = int(used.view(used.dtype.str.replace("i", "u")).max())
    if top >> (8 * used.itemsize - 1):
        raise ValueError(f"{name}: page indices must be >= 0, got {int(used.min())}")
    return top


def _last_pages_ok(pages: np.ndarray, last_page_len: np.ndarray, page_size: int, every_request_has_pages: bool) -> bool:
    """Whether every last_page_len fits its request: two reductions where every request has pages (a
    decode batch), the element-wise rule otherwise."""
    if every_request_has_pages:
        return bool(last_page_len.min() >= 1 and last_page_len.max() <= page_size)
    return not _bad_last_pages(pages, last_page_len, page_size).any()


def _bad_last_pages(pages: np.ndarray, last_page_len: np.ndarray, page_size: int) -> np.ndarray:
    """Requests whose last_page_len is not 1..page_size (with pages) or 0 (without)."""
    return ((pages > 0) & ((last_page_len < 1) | (last_page_len > page_size))) | ((pages == 0) & (last_page_len != 0))


def page_table_from_block_tables(block_tables, seq_lens, page_size: int) -> tuple:
    """(indptr, indices, last_page_len) host arrays of the CSR page table that FlashInfer's
    block_tables (batch, max_pages) + seq_lens (batch,) form describes (the trtllm-gen style
    arguments): request b owns block_tables[b, :ceil(seq_lens[b] / page_size)]."""
    lens = checks.host_int_array("seq_lens", seq_lens)
    bt = checks.host_int_array("block_tables", block_tables, ndim=2)
    if bt.shape[0] != lens.size:
        raise ValueError(f"block_tables: expected {lens.size} rows (one a request of seq_lens), got {bt.shape[0]}")
    if lens.size and lens.min() < 0:
        raise ValueError(f"seq_lens: lengths must be >= 0, got {int(lens.min())}")
    pages = -(-lens // page_size)
    if pages.size and pages.max() > bt.shape[1]:
        b = int(np.argmax(pages > bt.shape[1]))
        raise ValueError(f"block_tables: request {b} needs {pages[b]} pages for seq_lens {lens[b]} at page_size "
                         f"{page_size} but block_tables has {bt.shape[1]} columns")
    indptr = np.concatenate([[0], np.cumsum(pages)])
    indices = bt[np.arange(bt.shape[1])[None, :] < pages[:, None]]  # row-major: request by request
    last = np.where(pages > 0, lens - (pages - 1) * page_size, 0)
    return indptr, indices, last


def as_planned_dtype(view: KVView, kv_dtype: dt.DType, name: str) -> KVView:
    """The view read as the planned K/V dtype: uint8 K/V planned as float8 (CuPy has no float8 dtype, so
    its callers hand over the bytes) are read as that float8; any other mismatch is a TypeError."""
    if view.dtype == dt.uint8 and kv_dtype.itemsize == 1:  # planned as float8 (1-byte KV dtypes are)
        view = replace(view, dtype=kv_dtype)
    if view.dtype != kv_dtype:
        raise TypeError(f"{name}: dtype {view.dtype} does not match the planned kv_data_type {kv_dtype}"
                        + (" (uint8 K/V hold float8 bytes: plan with kv_data_type='float8_e4m3fn' or "
                           "'float8_e5m2')" if view.dtype == dt.uint8 else ""))
    return view


def check_cache_against(view: KVView, p, max_page: int, indices_name: str = "indices") -> None:
    """A cache against the planned parameters `p` (kv_dtype, page_size, num_kv_heads, head_dim) and the
    largest page index the page table uses. Returns the view to launch with (as_planned_dtype)."""
    view = as_planned_dtype(view, p.kv_dtype, "paged_kv_cache")
    if (view.page_size, view.num_kv_heads, view.head_dim) != (p.page_size, p.num_kv_heads, p.head_dim):
        raise ValueError(f"paged_kv_cache: (page_size, num_kv_heads, head_dim) = "
                         f"{(view.page_size, view.num_kv_heads, view.head_dim)} does not match the plan "
                         f"{(p.page_size, p.num_kv_heads, p.head_dim)}")
    vo = getattr(p, "vo", p.head_dim)
    if view.v_head_dim != vo:
        raise ValueError(f"paged_kv_cache: v_cache's head_dim {view.v_head_dim} does not match the plan's head_dim_vo "
                         f"{vo}")
    if max_page >= view.num_pages:
        raise ValueError(f"{indices_name}: page index {max_page} is out of range for a cache of {view.num_pages} pages")
    return view


def cache_parts(paged_kv_cache) -> tuple:
    """(k_cache, v_cache) of a tuple cache, (cache, None) of a 5-D one: the arrays of a call's signature."""
    if isinstance(paged_kv_cache, (tuple, list)) and len(paged_kv_cache) == 2:
        return tuple(paged_kv_cache)
    return paged_kv_cache, None


def _v_dims(k, v, name: str, allow_vo: bool, lead: int) -> tuple:
    """KVView.v_dims of V against K: () when V matches K in shape, dtype and strides; with allow_vo, V's
    head dim and strides where only its head dim differs (lead: the dims before it that must match)."""
    if v.shape == k.shape and v.dtype == k.dtype and v.strides == k.strides:
        return ()
    if allow_vo and v.dtype == k.dtype and v.ndim == k.ndim and v.shape[:lead] == k.shape[:lead] and \
            v.shape[-1] != k.shape[-1]:
        return (v.shape[-1],) + tuple(v.strides[:lead])
    also = " (or its head dim alone differs: head_dim_vo)" if allow_vo else ""
    what = "must match k in shape, dtype and strides" if v.ndim == 3 else \
        "k_cache and v_cache must have the same shape, strides and dtype"
    raise ValueError(f"{name}: {what}{also}; got {v.shape}/{v.dtype}/{v.strides} vs {k.shape}/{k.dtype}/{k.strides}")


def describe_kv_pair(c, k, v, kv_layout: str, allow_vo: bool = False) -> tuple:
    """(KVView, n) of one request's K and V, arguments of Call `c`: (n, H, D) [NHD] or (H, n, D) [HND]
    arrays, as a single page of max(n, 1) slots (single decode and prefill, ragged prefill). allow_vo:
    V may have its own head dim (and strides), as prefill's head_dim_vo."""
    ki = c.arg(k, "k")
    vi = c.arg(v, "v")
    checks.ndim(ki, 3, "(kv_len, num_kv_heads, head_dim)" if kv_layout == "NHD" else "(num_kv_heads, kv_len, head_dim)")
    v_dims = _v_dims(ki, vi, "v", allow_vo, 2)
    for i in (ki, vi):
        checks.last_dim_contiguous(i)
        checks.vector_aligned(i)
    checks.same_device(ki, vi)
    slot_ax, head_ax = (0, 1) if kv_layout == "NHD" else (1, 0)
    n = ki.shape[slot_ax]
    view = KVView(ptr(ki), ptr(vi), 0, ki.strides[slot_ax], ki.strides[head_ax], 1, max(n, 1), ki.shape[head_ax],
                  ki.shape[2], ki.dtype, ki.device, (ki, vi))
    if v_dims:
        view = replace(view, v_dims=(v_dims[0], 0, vi.strides[slot_ax], vi.strides[head_ax]))
    return view, n


def describe_paged_cache(c, paged_kv_cache, kv_layout: str, name: str = "paged_kv_cache",
                         allow_vo: bool = False) -> KVView:
    """A 5-D cache (num_pages, 2, page_size, H, D) [NHD] / (num_pages, 2, H, page_size, D) [HND], or a
    (k_cache, v_cache) pair of 4-D arrays, an argument of Call `c`. allow_vo: a pair's v_cache may have
    its own head dim (and strides), as prefill's head_dim_vo."""
    checks.choice("kv_layout", kv_layout, LAYOUTS)
    slot_dim, head_dim_ax = (1, 2) if kv_layout == "NHD" else (2, 1)
    layout = "(num_pages, page_size, num_kv_heads, head_dim)" if kv_layout == "NHD" else \
        "(num_pages, num_kv_heads, page_size, head_dim)"
    if isinstance(paged_kv_cache, (tuple, list)):
        if len(paged_kv_cache) != 2:
            raise ValueError(f"{name}: a tuple must be (k_cache, v_cache), got {len(paged_kv_cache)} items")
        k = c.arg(paged_kv_cache[0], f"{name}[0] (k_cache)")
        v = c.arg(paged_kv_cache[1], f"{name}[1] (v_cache)")
        checks.ndim(k, 4, f"{layout} for kv_layout={kv_layout}")
        v_dims = _v_dims(k, v, f"{name}[1] (v_cache)", allow_vo, 3)
        checks.same_device(k, v)
        s = k.strides
        view = KVView(ptr(k), ptr(v), s[0], s[1 + slot_dim - 1], s[1 + head_dim_ax - 1], k.shape[0],
                      k.shape[slot_dim], k.shape[head_dim_ax], k.shape[3], k.dtype, k.device, (k, v))
        if v_dims:
            vs = v.strides
            view = replace(view, v_dims=(v_dims[0], vs[0], vs[slot_dim], vs[head_dim_ax]))
        for i in (k, v):
            checks.last_dim_contiguous(i)
            checks.vector_aligned(i)
        return view
    kv = c.arg(paged_kv_cache, name)
    five = "(num_pages, 2, page_size, num_kv_heads, head_dim)" if kv_layout == "NHD" else \
        "(num_pages, 2, num_kv_heads, page_size, head_dim)"
    if kv.ndim != 5 or kv.shape[1] != 2:
        raise ValueError(f"{name}: expected shape {five} for kv_layout={kv_layout}, or a (k_cache, v_cache) "
                         f"tuple; got shape {kv.shape}")
    checks.last_dim_contiguous(kv)
    checks.vector_aligned(kv)
    s = kv.strides
    return KVView(ptr(kv), ptr(kv, s[1] * kv.dtype.itemsize), s[0], s[1 + slot_dim], s[1 + head_dim_ax],
                  kv.shape[0], kv.shape[1 + slot_dim], kv.shape[1 + head_dim_ax], kv.shape[4], kv.dtype, kv.device,
                  (kv,))


def append_program(index: dt.DType, vec_bytes: int) -> Program:
    return Program("page.cu", (KernelSpec("fic::append_paged_kv_kernel", (index.cpp, vec_bytes)),))


def index_program(index: dt.DType) -> Program:
    """get_seq_lens and get_batch_indices_positions."""
    return Program("page.cu", (KernelSpec("fic::seq_lens_kernel", (index.cpp,)),
                               KernelSpec("fic::batch_indices_positions_kernel", (index.cpp,))))


def all_programs() -> list:
    return [append_program(i, vb) for i in INDEX_DTYPES for vb in (16, 8, 4, 2, 1)] + \
        [index_program(i) for i in INDEX_DTYPES]


def _byte_vector(row_bytes: int, addresses, byte_strides) -> int:
    vb = 16
    while vb > 1 and (row_bytes % vb or any(a % vb for a in addresses) or any(s % vb for s in byte_strides)):
        vb //= 2
    return vb


def _index_array(c: Call, x, name: str, dtype=None, length=None):
    info = c.arg(x, name)
    checks.dtype_in(info, INDEX_DTYPES)
    if dtype is not None and info.dtype != dtype:
        raise TypeError(f"{name}: dtype {info.dtype} must match the other index arrays ({dtype})")
    checks.ndim(info, 1, f"({'*' if length is None else length},)")
    if length is not None and info.shape[0] != length:
        raise ValueError(f"{name}: expected {length} entries, got {info.shape[0]}")
    checks.contiguous(info)
    return info


def _append_indices(c: Call, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, nnz: int,
                    page_size: int, num_pages: int, check: bool = True) -> tuple:
    """(batch_indices, positions, kv_indices, kv_indptr) of an append as ArrayInfos of one index dtype,
    kv_last_page_len beside them, and (check, not while capturing a CUDA graph) their values on the host."""
    bi = _index_array(c, batch_indices, "batch_indices", length=nnz)
    pos = _index_array(c, positions, "positions", bi.dtype, nnz)
    ix = _index_array(c, kv_indices, "kv_indices", bi.dtype)
    ip = _index_array(c, kv_indptr, "kv_indptr", bi.dtype)
    if ip.shape[0] < 1:
        raise ValueError("kv_indptr: must have at least one entry")
    lp = _index_array(c, kv_last_page_len, "kv_last_page_len", bi.dtype, ip.shape[0] - 1)
    if check:
        c.host_check(functools.partial(_check_append_indices, page_size=page_size, num_pages=num_pages),
                     ip, ix, lp, bi, pos)
    return bi, pos, ix, ip


def _append_function(c: Call, index: dt.DType, vec_bytes: int):
    """append_paged_kv_kernel for these index dtype and copy width, on the call's device."""
    return kernels.cached_function(c.device, ("append", index.name, vec_bytes), lambda: (
        append_program(index, vec_bytes), append_program(index, vec_bytes).kernels[0]))


def _check_append_indices(ip, ix, lp, b, p, page_size: int, num_pages: int) -> None:
    """The check of an append's index arrays, read back to the host (Call.host_check): kv_indptr,
    kv_indices, kv_last_page_len, batch_indices, positions."""
    ip, ix, lp, b, p = (a.astype(np.int64, copy=False) for a in (ip, ix, lp, b, p))
    checks.indptr("kv_indptr", ip)
    if ip[-1] > ix.size:
        raise ValueError(f"kv_indptr: its last entry {ip[-1]} exceeds the {ix.size} entries of kv_indices")
    used = ix[:ip[-1]]
    if used.size and used.view(np.uint64).max() >= num_pages:  # a negative index is huge unsigned
        bad = int(used[(used < 0) | (used >= num_pages)][0])
        raise ValueError(f"kv_indices: page index {bad} is out of range for a cache of {num_pages} pages")
    pages = np.diff(ip)
    seq = np.maximum(pages - 1, 0) * page_size + lp
    if np.any((lp < 0) | (lp > page_size)) or np.any((pages == 0) & (lp != 0)):
        raise ValueError(f"kv_last_page_len: entries must lie in [1, page_size={page_size}] (0 for a request "
                         f"without pages), got {lp.tolist()[:16]}")
    if b.size and (b.min() < 0 or b.max() >= pages.size):
        raise ValueError(f"batch_indices: entries must lie in [0, batch_size={pages.size}), got {int(b.min())}"
                         f"..{int(b.max())}")
    if p.size:
        limit = seq[b]
        bad = (p < 0) | (p >= limit)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"positions: token {j} of request {int(b[j])} has position {int(p[j])}, outside "
                             f"[0, {int(limit[j])}) (the request's length from kv_indptr and kv_last_page_len)")


# Each parameter's entry, once for the module (docs.document writes the Parameters sections).
_PARAMS = {**KERNEL_GLOSSARY,
           "append_key": ("array\n"
                          "    ``(nnz, num_kv_heads, head_dim)``, in the cache's dtype (float16, bfloat16, float32,\n"
                          "    float8_e4m3fn or float8_e5m2: rows are copied as bytes, so quantise before appending\n"
                          "    to an fp8 cache), on a CUDA device (torch, JAX, CuPy or any DLPack producer). The\n"
                          "    head dim must be contiguous; the token and head strides are free."),
           "append_value": ("array\n"
                            "    Like append_key: same shape and dtype."),
           "batch_indices": ("array\n"
                             "    ``(nnz,)`` int32 or int64 device array, contiguous: the request of each token.\n"
                             "    The five index arrays share one dtype."),
           "positions": ("array\n"
                         "    ``(nnz,)`` in batch_indices' dtype, contiguous: each token's position within its\n"
                         "    request, in ``[0, seq_len)`` where ``seq_len = (pages - 1) * page_size +\n"
                         "    kv_last_page_len[b]``."),
           "paged_kv_cache": ("array or tuple of array\n"
                              "    The cache, written in place: one 5-D array ``(num_pages, 2, page_size,\n"
                              "    num_kv_heads, head_dim)`` for ``kv_layout=\"NHD\"`` or ``(num_pages, 2,\n"
                              "    num_kv_heads, page_size, head_dim)`` for ``\"HND\"`` (``[:, 0]`` the keys, ``[:,\n"
                              "    1]`` the values), or a ``(k_cache, v_cache)`` pair of 4-D arrays ``(num_pages,\n"
                              "    page_size, num_kv_heads, head_dim)`` [NHD] / ``(num_pages, num_kv_heads,\n"
                              "    page_size, head_dim)`` [HND] with equal shapes, strides and dtypes. The head\n"
                              "    dim contiguous; the data pointer and the page, slot and head strides multiples\n"
                              "    of 8 elements; no two elements sharing memory."),
           "kv_indices": ("array\n"
                          "    ``(>= kv_indptr[-1],)`` in batch_indices' dtype, contiguous: the page indices of all\n"
                          "    requests, request by request, each in ``[0, num_pages)``."),
           "kv_indptr": ("array\n"
                         "    ``(batch_size + 1,)`` in batch_indices' dtype, contiguous: request b owns pages\n"
                         "    ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``."),
           "kv_last_page_len": ("array\n"
                                "    ``(batch_size,)`` in batch_indices' dtype, contiguous: the tokens in each\n"
                                "    request's last page, in ``[1, page_size]`` (0 for a request without pages)."),
           "kv_layout": ("str, default \"NHD\"\n"
                         "    ``\"NHD\"`` or ``\"HND\"``: the order of the slot and head axes of a page (see\n"
                         "    paged_kv_cache)."),
           "check": ("bool, default True\n"
                     "    Read the five index arrays on the host and raise ValueError for any entry outside the\n"
                     "    page table or the cache (device arrays are copied: one synchronisation). Skipped while\n"
                     "    the stream is being captured into a CUDA graph. With False (or under capture) the kernel\n"
                     "    still skips tokens whose indices fall outside the page table or the cache: nothing is\n"
                     "    written outside the cache. fi_cupy's addition."),
           "page_size": ("int\n"
                         "    Tokens a page holds (positive)."),
           "append_indptr": ("array\n"
                             "    ``(batch_size + 1,)`` int32 or int64 device array, contiguous, ``batch_size >=\n"
                             "    1``: request b's appended tokens are rows ``append_indptr[b]`` to\n"
                             "    ``append_indptr[b + 1]``."),
           "seq_lens": ("array\n"
                        "    ``(batch_size,)`` in append_indptr's dtype, contiguous: each request's length after\n"
                        "    the append (get_seq_lens of the updated page table)."),
           "nnz": ("int\n"
                   "    The number of outputs, normally ``append_indptr[-1]`` (non-negative). Entries past\n"
                   "    ``append_indptr[-1]`` get -1 in both outputs.")}


@document("Append the keys and values of new tokens to a paged KV cache, in place.",
          returns=("None or array or tuple of array\n"
                   "    None: the cache was written in place. JAX callers (immutable arrays) get a new cache with\n"
                   "    the rows written, in paged_kv_cache's form (one array, or a ``(k_cache, v_cache)`` pair): a\n"
                   "    full copy of the cache each call, so keep append loops in torch or CuPy."), glossary=_PARAMS,
          notes=("Beyond FlashInfer: the index checks (``check``) and the kernel's own bounds (a bad index never\n"
                 "writes outside the cache, where FlashInfer's kernel writes wherever the index points), JAX arrays\n"
                 "and ``stream``."))
def append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices,
                          kv_indptr, kv_last_page_len, kv_layout: str = "NHD", check: bool = True, stream=None):
    """Token i (row i of append_key / append_value) goes to request ``batch_indices[i]`` at position
    ``positions[i]``: page ``kv_indices[kv_indptr[b] + p // page_size]``, slot ``p % page_size``. The page
    table must already count the appended tokens (kv_indptr, kv_indices and kv_last_page_len as after
    the append); get_batch_indices_positions gives batch_indices and positions.
    """
    args = (append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices, kv_indptr,
            kv_last_page_len, kv_layout, check, stream)
    return _SIGS((append_key, append_value, batch_indices, positions, *cache_parts(paged_kv_cache), kv_indices,
                  kv_indptr, kv_last_page_len), ("append", kv_layout, check), stream, lambda: _append(*args))


def _append(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices, kv_indptr,
            kv_last_page_len, kv_layout, check, stream):
    c = Call(append_key, stream, name="append_key")
    k = c.arg(append_key, "append_key")
    v = c.arg(append_value, "append_value")
    checks.ndim(k, 3, "(nnz, num_kv_heads, head_dim)")
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"append_value: must match append_key in shape and dtype; got {v.shape}/{v.dtype} vs "
                         f"{k.shape}/{k.dtype}")
    for x in (k, v):
        checks.last_dim_contiguous(x)
    kv = describe_paged_cache(c, paged_kv_cache, kv_layout)
    for info in kv.infos:
        checks.no_overlap(info)
    if kv.dtype != k.dtype:
        raise TypeError(f"append_key: dtype {k.dtype} does not match the cache's {kv.dtype} (quantise before "
                        f"appending to an fp8 cache)")
    if (k.shape[1], k.shape[2]) != (kv.num_kv_heads, kv.head_dim):
        raise ValueError(f"append_key: (num_kv_heads, head_dim) = {k.shape[1:]} does not match the cache's "
                         f"{(kv.num_kv_heads, kv.head_dim)}")
    nnz = k.shape[0]
    bi, pos, ix, ip = _append_indices(c, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, nnz,
                                      kv.page_size, kv.num_pages, check)
    result = None
    if not all(c.writable(i) for i in kv.infos):  # JAX: write into a copy of the cache
        kv, result = _copy_cache(c, kv)
    item = kv.dtype.itemsize
    row_bytes = kv.head_dim * item
    if nnz and kv.num_kv_heads:
        vb = _byte_vector(row_bytes, (k.ptr, v.ptr, kv.k_ptr, kv.v_ptr),
                          [s * item for s in (k.strides[0], k.strides[1], v.strides[0], v.strides[1],
                                              kv.stride_page, kv.stride_slot, kv.stride_head)])
        fn = _append_function(c, bi.dtype, vb)
        threads = min(THREADS, max(32, (kv.num_kv_heads * (row_bytes // vb) + 31) // 32 * 32))
        c.launch(fn, (min(nnz, MAX_GRID),), (threads,), [
            ptr(k), i64(k.strides[0] * item), i64(k.strides[1] * item), ptr(v), i64(v.strides[0] * item),
            i64(v.strides[1] * item), ptr(bi), ptr(pos), ptr(ix), ptr(ip), i32(ip.shape[0] - 1), i64(kv.num_pages),
            ptr(kv.k_ptr), ptr(kv.v_ptr), i64(kv.stride_page * item), i64(kv.stride_slot * item),
            i64(kv.stride_head * item), i32(kv.page_size), i64(nnz), i32(kv.num_kv_heads), i32(row_bytes)])
    if result is None:
        c.result()
        return None
    return c.result(*result)  # the new cache: one array, or a (k_cache, v_cache) pair


def _copy_cache(c: Call, kv: KVView):
    """A writable copy of an immutable cache: (view of the copy, new objects to return)."""
    objs, ptrs = [], []
    for info in kv.infos:
        obj, new = c.copy_of(info, "to append for an immutable (JAX) caller")
        objs.append(obj)
        ptrs.append(new.ptr)
    if len(ptrs) == 2:
        k_ptr, v_ptr = ptrs
    else:
        k_ptr, v_ptr = ptrs[0], ptrs[0] + (kv.v_ptr - kv.k_ptr)
    view = KVView(k_ptr, v_ptr, kv.stride_page, kv.stride_slot, kv.stride_head, kv.num_pages, kv.page_size,
                  kv.num_kv_heads, kv.head_dim, kv.dtype, kv.device, kv.infos)
    return view, tuple(objs)


@document("The length of each request of a paged KV cache, from its page table.",
          returns=("array\n"
                   "    ``(batch_size,)`` int32: a new array in the caller's framework."), glossary=_PARAMS,
          params={"kv_indptr": ("array\n"
                                "    ``(batch_size + 1,)`` int32 or int64 device array, contiguous: request b owns\n"
                                "    ``kv_indptr[b + 1] - kv_indptr[b]`` pages."),
                  "kv_last_page_len": ("array\n"
                                       "    ``(batch_size,)`` in kv_indptr's dtype, contiguous: the tokens in each\n"
                                       "    request's last page (0 for a request without pages).")})
def get_seq_lens(kv_indptr, kv_last_page_len, page_size: int, stream=None):
    """``seq_lens[b] = max(pages_b - 1, 0) * page_size + kv_last_page_len[b]`` with
    ``pages_b = kv_indptr[b + 1] - kv_indptr[b]``.
    """
    return _SIGS((kv_indptr, kv_last_page_len), ("seq_lens", page_size), stream,
                 lambda: _seq_lens(kv_indptr, kv_last_page_len, page_size, stream))


def _seq_lens(kv_indptr, kv_last_page_len, page_size, stream):
    c = Call(kv_indptr, stream, name="kv_indptr")
    page_size = checks.positive_int("page_size", page_size)
    ip = _index_array(c, kv_indptr, "kv_indptr")
    batch = ip.shape[0] - 1
    if batch < 0:
        raise ValueError("kv_indptr: must have at least one entry")
    lp = _index_array(c, kv_last_page_len, "kv_last_page_len", ip.dtype, batch)
    out_obj, o = c.new((batch,), dt.int32, "seq_lens")
    if batch:
        fn = kernels.functions(index_program(ip.dtype), c.device)
        c.launch(list(fn.values())[0], (-(-batch // THREADS),), (THREADS,),
                 [ptr(ip), ptr(lp), i32(page_size), i32(batch), ptr(o)], pdl=False)
    return c.result(out_obj)


@document("The request and position of each appended token, for append_paged_kv_cache.",
          returns=("batch_indices : array\n"
                   "    ``(nnz,)`` int32: the request of each token (the given array, or a new one).\n"
                   "positions : array\n"
                   "    ``(nnz,)`` int32: the position of each token within its request."), glossary=_PARAMS,
          params={"batch_indices": ("array, optional\n"
                                    "    ``(nnz,)`` int32, contiguous: written instead of a new array (not a JAX\n"
                                    "    array)."),
                  "positions": ("array, optional\n"
                                "    ``(nnz,)`` int32, contiguous: written instead of a new array (not a JAX\n"
                                "    array).")})
def get_batch_indices_positions(append_indptr, seq_lens, nnz: int, batch_indices=None, positions=None,
                                stream=None):
    """For the tokens of request b (rows ``append_indptr[b]`` to ``append_indptr[b + 1]``):
    ``batch_indices = b`` and ``positions = seq_lens[b] - append_len[b] + i`` for the request's i-th
    appended token, ``append_len[b] = append_indptr[b + 1] - append_indptr[b]``: the appended tokens are
    the last ones of each request.
    """
    return _SIGS((append_indptr, seq_lens, batch_indices, positions), ("positions", nnz), stream,
                 lambda: _batch_positions(append_indptr, seq_lens, nnz, batch_indices, positions, stream))


def _batch_positions(append_indptr, seq_lens, nnz, batch_indices, positions, stream):
    c = Call(append_indptr, stream, name="append_indptr")
    if isinstance(nnz, bool) or not isinstance(nnz, (int, np.integer)) or nnz < 0:
        raise ValueError(f"nnz: expected a non-negative integer, got {nnz!r}")
    ip = _index_array(c, append_indptr, "append_indptr")
    batch = ip.shape[0] - 1
    if batch < 1:
        raise ValueError(f"append_indptr: expected batch_size + 1 >= 2 entries, got {ip.shape[0]}")
    sl = _index_array(c, seq_lens, "seq_lens", ip.dtype, batch)
    b_obj, b = c.out(batch_indices, (int(nnz),), dt.int32, "batch_indices", "(nnz,)")
    p_obj, p = c.out(positions, (int(nnz),), dt.int32, "positions", "(nnz,)")
    checks.contiguous(b)
    checks.contiguous(p)
    if nnz:
        fn = kernels.functions(index_program(ip.dtype), c.device)
        c.launch(list(fn.values())[1], (-(-int(nnz) // THREADS),), (THREADS,),
                 [ptr(ip), ptr(sl), i32(batch), i64(nnz), ptr(b), ptr(p)], pdl=False)
    return c.result(b_obj, p_obj)
