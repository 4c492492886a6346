"""Work partition heuristics as pure functions (no GPU needed; unit-tested on the CPU).

Decode runs a persistent grid of exactly one wave of CTAs (num_ctas = SMs x resident CTAs per SM).
The work, the flattened (request, head block, token) space, is cut into equal token quotas, one per
CTA, so every CTA streams the same number of K/V bytes whatever the mix of lengths. A head block is
GB query heads of one KV head. A (request, head block) pair cut over several CTAs leaves partial
states that a second kernel merges. The grid and every metadata capacity depend on the batch size
and the device only, so a re-plan keeps a captured CUDA graph valid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_HEADS_PER_BLOCK = 8


def decode_heads_per_block(group_size: int) -> tuple:
    """(heads per block GB, head slices) for a GQA group: 1, 4 or 8 heads (masked when the group is
    smaller), so each K/V byte is read once per block and the registers hold scores and accumulators."""
    gb = 1 if group_size == 1 else (4 if group_size <= 4 else MAX_HEADS_PER_BLOCK)
    return gb, math.ceil(group_size / gb)


@dataclass
class DecodeSchedule:
    segments: np.ndarray         # int32 (n, 4): request, head block, token start, token end
    segment_partial: np.ndarray  # int32 (n,): partial row, or -1 when the pair is written directly
    cta_indptr: np.ndarray       # int32 (num_ctas + 1,): segments of CTA b
    merge_pairs: np.ndarray      # int32 (m,): the pairs (request * head_blocks + hb) cut over several CTAs
    merge_indptr: np.ndarray     # int32 (m + 1,): partial rows of merge_pairs[i]
    num_partial_rows: int
    quota: int                   # tokens per CTA

    @staticmethod
    def capacity(batch_size: int, head_blocks: int, num_ctas: int) -> tuple:
        """(max segments, max partial rows, max cut pairs): bounds that depend on the batch size only.
        A pair is cut only where a quota boundary falls inside it: at most num_ctas - 1 of them."""
        return batch_size * head_blocks + num_ctas, 2 * num_ctas, num_ctas


SEGMENT_COST = 32  # a segment's fixed cost (query load, pipeline fill, epilogue) in tokens
MERGE_COST = 128   # a plan that cuts pairs: partial states, the merge launch and its wait, in tokens
MIN_QUOTA = 64     # fewest tokens a CTA is given: below it, more CTAs only add partial states to merge


def _pick_quota(cum: np.ndarray, num_ctas: int, min_quota: int) -> int:
    """Tokens per CTA: the smallest even split, a split aligned to the longest pair (a fraction of
    it, or whole pairs so that nothing is cut and nothing merges); scored by the most loaded CTA
    (tokens + SEGMENT_COST a segment) plus MERGE_COST when some pair is cut. All candidates are
    scored at once (plan() runs every decode step: host time counts, mostly as numpy calls)."""
    total = int(cum[-1])
    q0 = max(-(-total // num_ctas), min_quota)
    if total == 0:
        return q0
    qs = _quota_candidates(q0, int((cum[1:] - cum[:-1]).max()))
    if qs.size == 1:
        return int(qs[0])
    qs = qs[:, None]
    n0 = -(-total // q0)  # CTAs of the smallest candidate: the most any candidate has
    # Per CTA, the pair boundaries strictly inside it (its segments - 1) and whether it starts inside a
    # pair; found by the fewer of (candidates x CTAs) binary searches or (candidates x boundaries) divisions.
    inner, cuts = (_cta_boundaries_by_division if cum.size <= n0 else _cta_boundaries_by_search)(cum, qs, n0)
    # CTAs past total get no tokens and no boundaries: a load <= 0, below CTA 0's, so they never count in
    # the maximum. The SEGMENT_COST every CTA pays once is left out: it moves every score alike.
    load = np.minimum(qs, total - np.arange(n0) * qs) + SEGMENT_COST * inner
    return int(qs[(load.max(axis=1) + MERGE_COST * cuts).argmin(), 0])  # ties: the smallest quota


def _cta_boundaries_by_search(cum: np.ndarray, qs: np.ndarray, n0: int) -> tuple:
    """(boundaries strictly inside each CTA (candidates x n0), whether some CTA of a candidate starts
    inside a pair), by searching the CTA edges (CTA b spans edges b..b + 1) in the pair boundaries."""
    edges = np.arange(n0 + 1) * qs
    right = cum.searchsorted(edges, "right")       # boundaries <= edge
    left = cum.searchsorted(edges[:, 1:], "left")  # boundaries < edge, from edge 1 (edge 0 is boundary 0)
    # A CTA (1..) starts inside a pair: not on a boundary, and before total.
    starts_left, starts_right = left[:, :-1], right[:, 1:-1]
    return left - right[:, :-1], ((starts_left == starts_right) & (starts_right < cum.size)).any(axis=1)


def _cta_boundaries_by_division(cum: np.ndarray, qs: np.ndarray, n0: int) -> tuple:
    """_cta_boundaries_by_search's result from the CTA each pair boundary falls in: counted where it is
    not the CTA's start; a pair is cut where its last token falls in a later CTA than its first."""
    cta = cum // qs
    row = np.arange(0, qs.size * (n0 + 1), n0 + 1)[:, None]  # total // q can be n0: a spare column
    counts = np.bincount((cta + row)[cum != cta * qs], minlength=qs.size * (n0 + 1))
    return counts.reshape(qs.size, n0 + 1)[:, :n0], ((cum[1:] - 1) // qs > cta[:, :-1]).any(axis=1)


def _quota_candidates(q0: int, longest: int) -> np.ndarray:
    """Ascending quotas >= q0: q0, the fewest whole longest pairs >= q0, and ceil(longest / k) for
    k = 1..64. ceil(longest / k) >= q0 exactly when k * (q0 - 1) < longest, so only those k are made."""
    whole = -(-q0 // longest) * longest
    kmax = 64 if q0 <= 1 else min(64, (longest - 1) // (q0 - 1))
    return np.array(sorted({q0, whole, *(-(-longest // k) for k in range(1, kmax + 1))}), dtype=np.int64)


def decode_schedule(kv_lens, visible_start, head_blocks: int, num_ctas: int, min_quota: int | None = None,
                    split: int | None = None) -> DecodeSchedule:
    """split: None cuts the token space into equal CTA quotas (_pick_quota). 0 (FlashInfer's
    disable_split_kv) never cuts a pair; k > 0 (fixed_split_size, in tokens) cuts every pair at multiples
    of k keys from its first visible key. With a split given, where a pair is cut depends on that
    request alone, so a request's output is bit-identical whatever the batch around it (the merge
    adds its chunks in token order); the chunks are dealt to CTAs in order, balanced by tokens.

    Segments are made in token order, which is already (CTA, pair, token) order: CTAs take the token
    space in order. Only the empty pairs, spread over the CTAs, need sorting in."""
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    vis = np.minimum(np.asarray(visible_start, dtype=np.int64), kv_lens)
    req_len = kv_lens - vis
    pair_len = req_len.repeat(head_blocks)
    cum = np.zeros(pair_len.size + 1, np.int64)
    pair_len.cumsum(out=cum[1:])
    if split is None:
        quota = _pick_quota(cum, num_ctas, MIN_QUOTA if min_quota is None else min_quota)
        pair, cta, lo, hi = _quota_segments(cum, quota, num_ctas)
    else:
        if split < 0:
            raise ValueError(f"split: expected None, 0 or a positive token count, got {split}")
        quota, (pair, cta, lo, hi) = _split_segments(pair_len, cum, split, num_ctas)
    n_per_pair = np.bincount(pair, minlength=pair_len.size)
    # Partial rows: contiguous per pair, in token order (the order segments are made in).
    cut_seg = n_per_pair[pair] > 1
    partial = (cut_seg.cumsum() * cut_seg - 1).astype(np.int32)
    segments = np.empty((pair.size, 4), np.int32)
    req, _ = np.divmod(pair, head_blocks, out=(segments[:, 0], segments[:, 1]))
    shift = vis[req] - cum[pair]  # token space -> key position
    np.add(lo, shift, out=segments[:, 2])
    np.add(hi, shift, out=segments[:, 3])
    if not req_len.all():
        segments, partial, cta = _add_empty_pairs(segments, partial, cta, pair, pair_len, vis, head_blocks,
                                                  num_ctas)
    cut = (n_per_pair > 1).nonzero()[0]
    merge_indptr = np.zeros(cut.size + 1, np.int32)
    n_per_pair[cut].cumsum(out=merge_indptr[1:])
    cta_indptr = np.zeros(num_ctas + 1, np.int32)
    np.bincount(cta, minlength=num_ctas).cumsum(out=cta_indptr[1:])
    return DecodeSchedule(segments, partial, cta_indptr, cut.astype(np.int32), merge_indptr,
                          num_partial_rows=int(merge_indptr[-1]), quota=quota)


def _quota_segments(cum: np.ndarray, quota: int, num_ctas: int) -> tuple:
    """(pair, CTA, token lo, token hi) of the non-empty segments, in token order: the pair boundaries
    and the CTA quota boundaries cut the token space. Both are sorted: a stable argsort merges them,
    pair boundaries first among equals, so a bound's pair is the count of pair boundaries up to it."""
    merged = np.concatenate((cum, np.arange(quota, int(cum[-1]), quota)))
    order = merged.argsort(kind="stable")
    bounds = merged[order]
    at = (bounds[1:] != bounds[:-1]).nonzero()[0]  # the last of equal bounds starts the segment
    lo, hi = bounds[at], bounds[at + 1]
    pair = (order < cum.size).cumsum()[at] - 1
    return pair, np.minimum(lo // quota, num_ctas - 1), lo, hi


def _split_segments(pair_len: np.ndarray, cum: np.ndarray, split: int, num_ctas: int) -> tuple:
    """(quota, (pair, CTA, token lo, token hi)) of the non-empty chunks of a fixed split, in token
    order: 0 keeps every pair whole; k > 0 cuts it every k tokens. A chunk goes to the CTA of its
    middle token."""
    total = int(cum[-1])
    quota = max(-(-total // num_ctas), 1)
    if split:
        chunks = -(-pair_len // split)
        pair = np.arange(pair_len.size).repeat(chunks)
        first = (chunks.cumsum() - chunks).repeat(chunks)
        lo = cum[pair] + (np.arange(pair.size) - first) * split
        hi = np.minimum(lo + split, cum[pair + 1])
    else:
        pair = pair_len.nonzero()[0]
        lo, hi = cum[pair], cum[pair + 1]
    return quota, (pair, np.minimum((lo + hi) // 2 // quota, num_ctas - 1), lo, hi)


def _add_empty_pairs(segments: np.ndarray, partial: np.ndarray, cta: np.ndarray, pair: np.ndarray,
                     pair_len: np.ndarray, vis: np.ndarray, head_blocks: int, num_ctas: int) -> tuple:
    """Empty pairs (kv_len 0 or nothing visible) still write o = 0, lse = -inf: one empty segment
    each, spread over the CTAs, sorted in by (CTA, pair) (a stable sort keeps the token order)."""
    empty = (pair_len == 0).nonzero()[0]
    seg = np.empty((empty.size, 4), np.int32)
    req, _ = np.divmod(empty, head_blocks, out=(seg[:, 0], seg[:, 1]))
    seg[:, 2] = seg[:, 3] = vis[req]
    cta = np.concatenate((cta, empty % num_ctas))
    order = (cta * pair_len.size + np.concatenate((pair, empty))).argsort(kind="stable")
    partial = np.concatenate((partial, np.full(empty.size, -1, np.int32)))
    return np.concatenate((segments, seg))[order], partial[order], cta[order]


# ---------------------------------------------------------------------------------------------
# Prefill: work items over (request, KV head, query tile), cut along KV when the tiles alone do not
# fill the GPU.

PREFILL_MIN_CHUNK = 512  # fewest keys a KV chunk gets: below it, merging partial states costs more
# MLA's Hopper kernel (cuda_src/mla_sm90.cu): a 64-key tile is ~9 MFLOP for its 64 rows, so chunks of
# four tiles outweigh their partial rows (64 x 512 floats); small batches (a request a few CTAs) need
# the cuts. H200, 1 x 1024 decode at 128 heads: 38 us with 512, 22 with 128; 1 x 8192: 36 us with 512,
# 52 with 128 (the merge of 64 chunks).
MLA_MIN_CHUNK = 256


@dataclass
class PrefillSchedule:
    items: np.ndarray        # int32 (n, 8): request, kv_head, first packed row, partial row or -1, kv begin, kv end, 0, 0
    merges: np.ndarray       # int32 (m, 8): request, kv_head, first packed row, first partial row, chunks, rows, 0, 0
    num_partial_rows: int


def prefill_tile_cost(qo_len: int, kv_len: int, group: int, rows: int, causal: bool) -> np.ndarray:
    """Keys each query tile of one request and KV head visits (what the tile costs, roughly)."""
    packed = qo_len * group
    starts = np.arange(0, packed, rows)
    if not causal:
        return np.full(starts.size, kv_len, dtype=np.int64)
    last_tok = np.minimum(starts + rows, packed) - 1
    return np.clip(last_tok // group + (kv_len - qo_len) + 1, 0, kv_len).astype(np.int64)


def prefill_schedule(qo_lens, kv_lens, group: int, num_kv_heads: int, rows: int, num_ctas: int,
                     causal: bool, min_chunk: int = PREFILL_MIN_CHUNK, snake: bool = False,
                     split: int | None = None) -> PrefillSchedule:
    """Items for every (request, KV head, query tile of `rows` packed rows). When those are fewer than
    num_ctas, the KV range of long requests is cut into chunks (multiples of 64 keys, at least
    min_chunk) so one wave fills the GPU; a cut tile's chunks write partial rows merged afterwards.
    Items are ordered longest first, so a CTA that finishes early picks up short work. snake (for a
    persistent grid of num_ctas CTAs, CTA b taking items b, b + num_ctas, ...): each round of
    num_ctas items is dealt in reverse when its number is odd, so long and short shares alternate.
    split (FlashInfer's split-KV options, as decode_schedule's): 0 never cuts; k > 0 cuts every
    request's KV into chunks of k keys rounded up to 64: where a request is cut depends on it alone."""
    qo_lens = np.asarray(qo_lens, dtype=np.int64)
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    tiles = -(-(qo_lens * group) // rows)
    base = int(tiles.sum()) * num_kv_heads
    want = max(1, -(-num_ctas // max(base, 1))) if base < num_ctas else 1
    r, h, p0, tcost = _query_tiles(qo_lens, kv_lens, tiles, group, num_kv_heads, rows, causal)
    if split == 0 or (split is None and want == 1):  # nothing is cut: an item a tile, the whole KV range
        items = np.zeros((r.size, 8), np.int32)
        items[:, 0], items[:, 1], items[:, 2], items[:, 3], items[:, 5] = r, h, p0, -1, kv_lens[r]
        merges, prow_total, cost = np.zeros((0, 8), np.int32), 0, tcost
    else:
        items, merges, prow_total, cost = _cut_items(kv_lens, r, h, p0, tcost, want, min_chunk, split, rows)
    order = (-cost).argsort(kind="stable")
    if snake:
        rnd, pos = np.divmod(np.arange(order.size), num_ctas)
        reverse = (rnd % 2 == 1) & (rnd < order.size // num_ctas)  # a last partial round stays in order
        dealt = np.empty_like(order)
        dealt[rnd * num_ctas + np.where(reverse, num_ctas - 1 - pos, pos)] = order
        order = dealt
    return PrefillSchedule(items[order], merges, prow_total)


def _query_tiles(qo_lens: np.ndarray, kv_lens: np.ndarray, tiles: np.ndarray, group: int, num_kv_heads: int,
                 rows: int, causal: bool) -> tuple:
    """(request, KV head, first packed row, keys visited) of every query tile, in loop order: request,
    KV head, tile."""
    per_req = tiles * num_kv_heads
    r = np.arange(qo_lens.size).repeat(per_req)
    h, t = np.divmod(np.arange(r.size) - (per_req.cumsum() - per_req).repeat(per_req), tiles[r])
    p0 = t * rows
    kv_r = kv_lens[r]
    if not causal:
        return r, h, p0, kv_r
    last_tok = np.minimum(p0 + rows, qo_lens[r] * group) - 1
    # Bottom-right causal: a tile's last query row sees keys up to its token + (kv_len - qo_len).
    seen = last_tok // group + (kv_lens - qo_lens + 1)[r]
    return r, h, p0, np.minimum(np.maximum(seen, 0), kv_r)


def _kv_chunks(kv_lens: np.ndarray, want: int, min_chunk: int, split: int | None) -> tuple:
    """(chunks, chunk keys, cut) a request: n_chunks of `chunk` keys, multiples of 64 where cut."""
    if split is None:
        n_chunks = np.maximum(1, np.minimum(want, kv_lens // min_chunk))
        chunk = np.where(n_chunks > 1, -(-kv_lens // n_chunks), kv_lens)
    else:
        chunk = np.full_like(kv_lens, -(-split // 64) * 64)
        n_chunks = np.maximum(1, -(-kv_lens // np.maximum(chunk, 1)))
    cut = n_chunks > 1
    chunk = np.where(cut, -(-chunk // 64) * 64, chunk)
    return np.where(cut, -(-kv_lens // np.maximum(chunk, 1)), 1), chunk, cut


def _cut_items(kv_lens: np.ndarray, r: np.ndarray, h: np.ndarray, p0: np.ndarray, tcost: np.ndarray, want: int,
               min_chunk: int, split: int | None, rows: int) -> tuple:
    """(items, merges, partial rows, item costs) where some requests' KV is cut: a cut tile's chunks
    write n_chunks blocks of partial rows, in tile order, which one merge combines."""
    n_chunks, chunk, cut = _kv_chunks(kv_lens, want, min_chunk, split)
    tile_cut, nc = cut[r], n_chunks[r]
    tile_rows = nc * rows * tile_cut
    prow = tile_rows.cumsum() - tile_rows
    ti = np.arange(r.size).repeat(nc)  # the tile of each item
    c = np.arange(ti.size) - (nc.cumsum() - nc).repeat(nc)  # the chunk of each item within its tile
    r_i, item_cut = r[ti], tile_cut[ti]
    ck = np.where(cut, chunk, kv_lens)[r_i]  # an uncut tile: one chunk, keys 0 to kv_len
    lo = c * ck
    hi = np.minimum(kv_lens[r_i], lo + ck)
    items = np.zeros((ti.size, 8), np.int32)
    items[:, 0], items[:, 1], items[:, 2], items[:, 4], items[:, 5] = r_i, h[ti], p0[ti], lo, hi
    items[:, 3] = np.where(item_cut, prow[ti] + c * rows, -1)
    cost = np.maximum(0, np.minimum(hi, tcost[ti]) - lo)  # uncut: tcost (0 <= tcost <= kv_len)
    mt = tile_cut.nonzero()[0]
    merges = np.zeros((mt.size, 8), np.int32)
    merges[:, 0], merges[:, 1], merges[:, 2], merges[:, 3], merges[:, 4], merges[:, 5] = \
        r[mt], h[mt], p0[mt], prow[mt], nc[mt], rows
    return items, merges, int(tile_rows.sum()), cost
