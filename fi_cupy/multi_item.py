"""Multi-item scoring masks (the prefix_len_ptr / token_pos_in_items_ptr arguments of prefill plan()).

Host-side, numpy only: turns FlashInfer's compact description of a multi-item-scoring batch into the
dense boolean (query, key) mask, or into three numbers per query row that describe the same mask.

Layout (FlashInfer 0.7.2, flashinfer/prefill.py, BatchPrefillWithPagedKVCacheWrapper.plan docstring):
a request's kv_len tokens are a shared prefix of prefix_len tokens followed by items, each item
preceded by a delimiter, with one more delimiter at the end. token_pos_in_items gives every token
after the prefix its 1-based position inside its item, 0 at delimiters; items of lengths 3, 2, 4 give
[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0]. For a batch the rows are concatenated into one 1-D array,
request b's row starting at element b * token_pos_in_items_len (rows zero-padded to that length).

Which keys a query attends (include/flashinfer/attention/prefill.cuh, logits_mask_multi_item_scoring;
the sm90 path, hopper/mainloop_mma.cuh mask_multi_item_scoring, applies the same rule):
queries are the last qo_len of the request's kv_len tokens, so query row i sits at position
p = i + kv_len - qo_len (bottom-right alignment, as for causal). Key k (0 <= k < kv_len) is attended iff
  - k <= p (causal; rows with p < 0, i.e. qo_len > kv_len, attend nothing), and
  - k >= p - window_left when window_left >= 0 (the ordinary sliding window, counted in positions), and
  - p < prefix_len (a prefix token: plain causal), or k < prefix_len (everything sees the prefix),
    or k > p - t with t = token_pos_in_items[b * token_pos_in_items_len + p - prefix_len].
For well-formed positions this means: a token at position t of an item sees the whole prefix plus
positions 1..t of its own item (never a delimiter, never another item), and a delimiter (t = 0) sees
only the prefix, not even itself; with prefix_len == 0 a delimiter row attends nothing (FlashInfer
returns 0 there, lse = -inf). FlashInfer's own test (tests/attention/test_batch_prefill_kernels.py,
create_2D_multi_item_mask_dense) builds the same mask with delimiter rows and columns cleared.

max_item_len_ptr never changes which pairs attend: the paged kernel (BatchPrefillWithPagedKVCacheDevice,
num_iterations_mask; sm90: num_kv_tiles_outside_items_window) skips the KV tiles between the prefix and
p - max_item_len, which is exact only when max_item_len is at least every t read by the request's item
queries. multi_item_mask checks that when given max_item_lens.

Found in FlashInfer's Python side (flashinfer/prefill.py run()): the paged wrapper switches to the
multi-item mask whenever prefix_len_ptr was given, overriding causal and custom_mask; the ragged wrapper
stores the four arguments but never selects that mask mode, so there they change nothing.
"""
from __future__ import annotations

import numpy as np

UINT16_MAX = 0xFFFF
UINT32_MAX = 0xFFFFFFFF
ROW_BLOCK = 1024  # mask rows built per numpy step: bounds the temporaries at ROW_BLOCK * kv_len bools


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _int_vector(x, name: str, lo: int, hi: int) -> np.ndarray:
    """A 1-D integer array (any integer dtype; FlashInfer passes uint32 / uint16) with values in [lo, hi]."""
    a = np.asarray(x)
    if a.size == 0 and not isinstance(x, np.ndarray):
        a = a.astype(np.int64)  # np.asarray([]) is float64
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: must be an integer array, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {a.shape}")
    if a.size:
        mn, mx = int(a.min()), int(a.max())
        if mn < lo or mx > hi:
            raise ValueError(f"{name}: values must be in [{lo}, {hi}], got values in [{mn}, {mx}]")
    return a.astype(np.int64, copy=False)


def _check_args(qo_lens, kv_lens, prefix_lens, token_pos_in_items, token_pos_in_items_len,
                window_left, max_item_lens):
    qo = _int_vector(qo_lens, "qo_lens", 0, UINT32_MAX)
    kv = _int_vector(kv_lens, "kv_lens", 0, UINT32_MAX)
    prefix = _int_vector(prefix_lens, "prefix_lens", 0, UINT32_MAX)
    pos = _int_vector(token_pos_in_items, "token_pos_in_items", 0, UINT16_MAX)
    batch = qo.size
    for a, name in ((kv, "kv_lens"), (prefix, "prefix_lens")):
        if a.size != batch:
            raise ValueError(f"{name}: must have one entry per request like qo_lens ({batch}), got {a.size}")
    if not _is_int(token_pos_in_items_len) or not 0 <= token_pos_in_items_len <= UINT32_MAX:
        raise ValueError(f"token_pos_in_items_len: must be an int in [0, {UINT32_MAX}], "
                         f"got {token_pos_in_items_len!r}")
    if not _is_int(window_left):
        raise ValueError(f"window_left: must be an int (negative: no window), got {window_left!r}")
    bad = np.nonzero(prefix > kv)[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"prefix_lens: the prefix cannot be longer than the request; request {b} has "
                         f"prefix_lens {int(prefix[b])} > kv_lens {int(kv[b])}")
    # Tokens after the prefix that some query reads a position for (none without queries).
    need = np.where(qo > 0, kv - prefix, 0)
    row = int(token_pos_in_items_len)
    if batch > 1:
        bad = np.nonzero(need > row)[0]
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"token_pos_in_items_len: each request's row must hold its kv_len - prefix_len "
                             f"tokens when there are several requests; got {row}, request {b} needs "
                             f"{int(need[b])}")
    ends = np.arange(batch, dtype=np.int64) * row + need
    bad = np.nonzero((need > 0) & (ends > pos.size))[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"token_pos_in_items: request {b} reads elements up to {int(ends[b])} "
                         f"(row start {b} * token_pos_in_items_len + kv_len - prefix_len), got {pos.size} "
                         f"elements")
    if max_item_lens is not None:
        mil = _int_vector(max_item_lens, "max_item_lens", 0, UINT16_MAX)
        if mil.size != batch:
            raise ValueError(f"max_item_lens: must have one entry per request like qo_lens ({batch}), "
                             f"got {mil.size}")
    else:
        mil = None
    return qo, kv, prefix, pos, row, int(window_left), mil


def _limits(qo: int, kv: int, prefix: int, pos_row: np.ndarray, window_left: int):
    """(p, lo, hi, start) for one request's query rows; see multi_item_row_limits."""
    p = np.arange(qo, dtype=np.int64) + (kv - qo)
    hi = np.maximum(p + 1, 0)
    lo = np.maximum(p - window_left, 0) if window_left >= 0 else np.zeros_like(p)
    start = np.zeros_like(p)  # prefix rows: no gap, plain causal
    item = p >= prefix
    # t of each item row; k > p - t  <=>  k >= p - t + 1
    start[item] = p[item] - pos_row[p[item] - prefix] + 1
    return p, lo, hi, start


def multi_item_row_limits(qo_lens, kv_lens, prefix_lens, token_pos_in_items, token_pos_in_items_len,
                          *, window_left: int = -1, max_item_lens=None):
    """The mask of multi_item_mask as three int64 arrays over all query rows (sum(qo_lens) each, in
    request order): row r of request b attends key k (0 <= k < kv_lens[b]) iff
    lo[r] <= k < hi[r] and (k < prefix_lens[b] or k >= start[r]). Arguments as in multi_item_mask."""
    qo, kv, prefix, pos, row, wl, mil = _check_args(qo_lens, kv_lens, prefix_lens, token_pos_in_items,
                                                    token_pos_in_items_len, window_left, max_item_lens)
    out = []
    for b in range(qo.size):
        q, k, pf = int(qo[b]), int(kv[b]), int(prefix[b])
        p, lo, hi, start = _limits(q, k, pf, pos[b * row:], wl)
        if mil is not None:
            item = p >= pf
            t = p[item] - start[item] + 1
            if t.size and int(t.max()) > int(mil[b]):
                raise ValueError(f"max_item_lens: request {b} has max_item_lens {int(mil[b])} but its "
                                 f"token_pos_in_items reach {int(t.max())}; FlashInfer skips keys farther "
                                 f"back than max_item_len, so it must be at least the longest item")
        out.append((lo, hi, start))
    if not out:
        return tuple(np.zeros(0, np.int64) for _ in range(3))
    return tuple(np.concatenate([o[i] for o in out]) for i in range(3))


def multi_item_mask(qo_lens, kv_lens, prefix_lens, token_pos_in_items, token_pos_in_items_len,
                    *, window_left: int = -1, max_item_lens=None) -> np.ndarray:
    """FlashInfer's multi-item-scoring mask (MaskMode::kMultiItemScoring) as a flat boolean array.

    qo_lens, kv_lens, prefix_lens: 1-D integer arrays, one entry per request (prefix_lens is
        prefix_len_ptr; prefix_lens <= kv_lens).
    token_pos_in_items: 1-D integer array, values in [0, 65535] (token_pos_in_items_ptr); request b's
        positions start at element b * token_pos_in_items_len. Only the elements some query reads must
        exist; with several requests each row must hold kv_len - prefix_len positions.
    token_pos_in_items_len: int >= 0 (may be 0 for a single request).
    window_left: the prefill window_left (< 0: no window).
    max_item_lens: optional max_item_len_ptr; if given, checked to be large enough that FlashInfer's
        tile skipping is exact (see the module docstring). It never changes the mask.

    Returns the concatenation over requests of each request's (qo_len, kv_len) mask, row-major,
    True = attend (length sum(qo_lens * kv_lens); request b's block starts at the prefix sum of the
    products, like a custom mask's mask_indptr). Rows may be all False (delimiters with no prefix,
    queries before the first key).
    """
    lo, hi, start = multi_item_row_limits(qo_lens, kv_lens, prefix_lens, token_pos_in_items,
                                          token_pos_in_items_len, window_left=window_left,
                                          max_item_lens=max_item_lens)
    qo = np.asarray(qo_lens).astype(np.int64)
    kv = np.asarray(kv_lens).astype(np.int64)
    prefix = np.asarray(prefix_lens).astype(np.int64)
    out = np.empty(int(np.sum(qo * kv)), dtype=bool)
    off = row0 = 0
    for b in range(qo.size):
        q, k = int(qo[b]), int(kv[b])
        m = out[off:off + q * k].reshape(q, k)
        keys = np.arange(k, dtype=np.int64)[None, :]
        in_prefix = keys < int(prefix[b])
        for r in range(0, q, ROW_BLOCK):
            rows = slice(row0 + r, row0 + min(q, r + ROW_BLOCK))
            blk = m[r:r + ROW_BLOCK]
            np.greater_equal(keys, lo[rows, None], out=blk)
            blk &= keys < hi[rows, None]
            blk &= in_prefix | (keys >= start[rows, None])
        off += q * k
        row0 += q
    return out
