"""Work partition heuristics as pure functions (no GPU needed; unit-tested on the CPU).

Decode runs a persistent grid of exactly one wave of CTAs (num_ctas = SMs x resident CTAs per SM).
The work, the flattened (request, head block, token) space, is cut into equal token quotas, one per
CTA, so every CTA streams the same number of K/V bytes whatever the mix of lengths. A head block is
GB query heads of one KV head. A (request, head block) pair cut over several CTAs leaves partial
states that a second kernel merges. The grid and every metadata capacity depend on the batch size
and the device only, so a re-plan keeps a captured CUDA graph valid.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ._core import memo

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
FEW_CANDIDATES = 4  # more candidates than this left to score: all at once (_score_all), else one by one


def _pick_quota(cum: np.ndarray | None, num_ctas: int, min_quota: int, longest: int | None = None,
                uniform: tuple | None = None) -> int:
    """Tokens per CTA: the smallest even split q0, a split aligned to the longest pair (a fraction of
    it, or whole pairs so that nothing is cut and nothing merges); scored by the most loaded CTA
    (tokens + SEGMENT_COST a segment) plus MERGE_COST when some pair is cut; ties: the smallest quota.
    plan() runs every decode step, and its host time is mostly numpy calls: q0 is scored first, and
    only the candidates whose floor (_score_floor) is below the best score so far are scored after it;
    pairs all of one length are scored in closed form (_uniform_score). uniform: (total tokens, pairs) of
    pairs all `longest` long, whose prefix `cum` is then not needed (None)."""
    total, pairs = uniform or (int(cum[-1]), cum.size - 1)
    q0 = max(-(-total // num_ctas), min_quota)
    if total == 0:
        return q0
    if longest is None:  # the longest pair (decode_schedule knows it)
        longest = int((cum[1:] - cum[:-1]).max())
    if q0 % longest == 0:  # whole longest pairs already: no other candidate
        return q0
    uniform = total == longest * pairs
    if uniform:
        score = functools.partial(_uniform_score, length=longest, pairs=pairs)
    else:
        score = functools.partial(_quota_score, cum, total=total, longest=longest)
    best_q, best = q0, score(q0)
    left = _quota_candidates(q0, longest, total, best)
    if len(left) > FEW_CANDIDATES and not uniform:
        q, s = _score_all(cum, left, total)
        return q if s < best else best_q
    for q in left:  # ascending: a later quota wins only with a lower score
        if _score_floor(q, total, longest) < best:
            s = score(q)
            if s < best:
                best_q, best = q, s
    return best_q


def _quota_candidates(q0: int, longest: int, total: int, below: int) -> list:
    """Ascending quotas above q0 whose floor (_score_floor) is below `below`, of: the fewest whole
    longest pairs >= q0, and ceil(longest / k) for k = 1..64. ceil(longest / k) >= q0 exactly when
    k * (q0 - 1) < longest, so only those k are made; as k falls the quota (and its floor) grows."""
    out = {q for q in (longest, -(-q0 // longest) * longest) if q > q0 and min(q, total) < below}
    for k in range(64 if q0 <= 1 else min(64, (longest - 1) // (q0 - 1)), 1, -1):
        q = -(-longest // k)  # below the longest pair (or q0, when that is 1): floor q + MERGE_COST
        if q + MERGE_COST >= below:
            break
        out.add(q)
    out.discard(q0)
    return sorted(out)


def _score_floor(q: int, total: int, longest: int) -> int:
    """No quota scores below this: CTA 0's tokens, and MERGE_COST below the longest pair (a quota
    boundary then falls strictly inside it)."""
    return min(q, total) + MERGE_COST * (q < longest)


def _quota_score(cum: np.ndarray, q: int, total: int, longest: int) -> int:
    """_pick_quota's score of quota q, without the SEGMENT_COST every CTA pays once (it moves every score
    alike): the most loaded CTA, from the pair boundaries strictly inside each (the last, partial CTA
    counts the final boundary too: the cost model's convention), plus MERGE_COST when a pair is cut
    (certain below the longest pair). As _score_all, by divisions or searches, whichever are fewer."""
    full, rem = divmod(total, q)
    if cum.size <= full + 1:  # the CTA each boundary falls in; counted where it is not the CTA's start
        cta = cum // q
        inner = np.bincount(cta[cum % q != 0], minlength=full + 1)
        cut = q < longest or bool(((cum[1:] - 1) // q > cta[:-1]).any())
    else:  # the boundaries before each CTA edge (CTA b spans edges b..b + 1)
        edges = np.arange(0, (full + (rem > 0)) * q + 1, q)
        right = cum.searchsorted(edges, "right")
        left = cum.searchsorted(edges[1:], "left")
        inner = left - right[:-1]
        cut = q < longest or bool(((left[:-1] == right[1:-1]) & (right[1:-1] < cum.size)).any())
    load = q + SEGMENT_COST * int(inner[:full].max()) if full else 0
    if rem:
        load = max(load, rem + SEGMENT_COST * int(inner[full]))
    return load + MERGE_COST * cut


def _score_all(cum: np.ndarray, qs: list, total: int) -> tuple:
    """(quota, score) of the best of the ascending quotas qs, all scored at once in (candidates x CTAs)
    arrays (as _quota_score scores one; ties: the smallest quota)."""
    q = np.array(qs, dtype=np.int64)[:, None]
    n0 = -(-total // qs[0])  # CTAs of the smallest candidate: the most any candidate has
    # Per CTA, the pair boundaries strictly inside it (its segments - 1) and whether it starts inside a
    # pair; found by the fewer of (candidates x CTAs) binary searches or (candidates x boundaries) divisions.
    inner, cuts = (_cta_boundaries_by_division if cum.size <= n0 else _cta_boundaries_by_search)(cum, q, n0)
    # CTAs past total get no tokens and no boundaries: a load <= 0, below CTA 0's, so they never count in
    # the maximum.
    score = (np.minimum(q, total - np.arange(n0) * q) + SEGMENT_COST * inner).max(axis=1) + MERGE_COST * cuts
    i = int(score.argmin())
    return qs[i], int(score[i])


def _uniform_score(q: int, length: int, pairs: int) -> int:
    """_quota_score where every pair has `length` tokens: a CTA starting r tokens past a pair boundary
    holds m + (r + s >= length) boundaries, where q - 1 = m * length + s; the last, partial CTA holds
    those past its start."""
    total = pairs * length
    full, rem = divmod(total, q)
    m, s = divmod(q - 1, length)
    load = q + SEGMENT_COST * (m + _one_more_boundary(q, length, full, s)) if full else 0
    if rem:
        load = max(load, rem + SEGMENT_COST * (pairs - full * q // length))
    return load + MERGE_COST * (q % length != 0 and q < total)


def _one_more_boundary(q: int, length: int, ctas: int, s: int) -> bool:
    """Whether one of CTAs 0..ctas - 1 (quota q) starts at least length - s tokens past a pair boundary.
    Those offsets, b * q mod length, run over the multiples of g = gcd(q, length) within length / g CTAs;
    below the length, CTA length // q is the first to start within q - 1 tokens of the next boundary."""
    g = math.gcd(q, length)
    if ctas >= length // g:
        return length - g >= length - s
    if q < length:
        return length % q != 0 and length // q < ctas
    return int((np.arange(ctas) * q % length).max()) >= length - s


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


def decode_schedule(kv_lens, visible_start, head_blocks: int, num_ctas: int, min_quota: int | None = None,
                    split: int | None = None) -> DecodeSchedule:
    """visible_start: each request's first visible key (a sliding window), or None for key 0. split: None
    cuts the token space into equal CTA quotas (_pick_quota). 0 (FlashInfer's disable_split_kv) never
    cuts a pair; k > 0 (fixed_split_size, in tokens) cuts every pair at multiples of k keys from its
    first visible key. With a split given, where a pair is cut depends on that request alone, so a
    request's output is bit-identical whatever the batch around it (the merge adds its chunks in token
    order); the chunks are dealt to CTAs in order, balanced by tokens.

    Segments are made in token order, which is already (CTA, pair, token) order: CTAs take the token
    space in order. Only the empty pairs, spread over the CTAs after their other segments, need sorting
    in. cuda_src/decode_schedule.cu builds the quota schedule on the device, element for element this
    one (decode.DEVICE_SCHEDULE)."""
    vis, req_len = _request_lengths(kv_lens, visible_start)
    pair_len, cum = _pair_prefix(req_len, head_blocks)
    if split is None:
        length = int(req_len.max(initial=0))  # the longest pair
        quota = _pick_quota(cum, num_ctas, MIN_QUOTA if min_quota is None else min_quota, length)
        if length and length * pair_len.size == cum[-1] and (quota % length == 0 or length % quota == 0):
            return _even_schedule(pair_len.size, length, quota, head_blocks, num_ctas, vis)
        (pair, cta, lo, hi), n_per_pair = _quota_segments(cum, pair_len, quota)
    else:
        if split < 0:
            raise ValueError(f"split: expected None, 0 or a positive token count, got {split}")
        quota, (pair, cta, lo, hi), n_per_pair = _split_segments(pair_len, cum, split, num_ctas)
    cut_pair = n_per_pair > 1
    # Partial rows: contiguous per pair, in token order (the order segments are made in), so a cut
    # segment's row is its rank among the cut segments.
    partial = np.full(pair.size, -1, np.int32)
    cut_at = cut_pair[pair].nonzero()[0]
    partial[cut_at] = np.arange(cut_at.size, dtype=np.int32)
    segments = np.empty((pair.size, 4), np.int32)
    # (pair ids fit int32: a divmod from int32 costs half of one from int64 into the int32 columns)
    req, _ = np.divmod(pair.astype(np.int32), head_blocks, out=(segments[:, 0], segments[:, 1]))
    first = cum[pair]  # token space -> key position: less the pair's first token, plus its first visible key
    if vis is not None:
        first -= vis[req]
    np.subtract(lo, first, out=segments[:, 2])
    np.subtract(hi, first, out=segments[:, 3])
    if not req_len.all():
        segments, partial, cta = _add_empty_pairs(segments, partial, cta, pair, pair_len, vis, head_blocks,
                                                  num_ctas)
    cut = cut_pair.nonzero()[0]
    merge_indptr = np.zeros(cut.size + 1, np.int32)
    n_per_pair[cut].cumsum(out=merge_indptr[1:])
    cta_indptr = np.zeros(num_ctas + 1, np.int32)
    np.bincount(cta, minlength=num_ctas).cumsum(out=cta_indptr[1:])
    return DecodeSchedule(segments, partial, cta_indptr, cut.astype(np.int32), merge_indptr,
                          num_partial_rows=int(merge_indptr[-1]), quota=quota)


def _request_lengths(kv_lens, visible_start) -> tuple:
    """(first visible keys or None, visible keys a request), int64."""
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    if visible_start is None:
        return None, kv_lens
    vis = np.minimum(np.asarray(visible_start, dtype=np.int64), kv_lens)
    return vis, kv_lens - vis


def _pair_prefix(req_len: np.ndarray, head_blocks: int) -> tuple:
    """(tokens a pair, the pairs' token prefix (int64, pairs + 1))."""
    pair_len = req_len.repeat(head_blocks)
    cum = np.zeros(pair_len.size + 1, np.int64)
    pair_len.cumsum(out=cum[1:])
    return pair_len, cum


def decode_quota(kv_lens, visible_start, head_blocks: int, num_ctas: int) -> tuple:
    """(quota, whether a pair is cut) of decode_schedule's quota split, for a schedule built on the device
    (fi_cupy/decode_schedule.py) from the quota alone. A pair is cut where a quota boundary falls inside it:
    certain below the longest pair, none when one CTA holds everything, else searched."""
    _, req_len = _request_lengths(kv_lens, visible_start)
    longest = int(req_len.max(initial=0))
    pairs = req_len.size * head_blocks
    total = int(req_len.sum()) * head_blocks
    if longest * pairs == total:  # pairs all of one length: closed forms, no prefix
        quota = _pick_quota(None, num_ctas, MIN_QUOTA, longest, (total, pairs))
        return quota, quota < total and quota % longest != 0
    _, cum = _pair_prefix(req_len, head_blocks)
    quota = _pick_quota(cum, num_ctas, MIN_QUOTA, longest)
    if quota >= total or quota < longest:
        return quota, quota < total
    edges = np.arange(quota, total, quota)
    return quota, bool((cum[cum.searchsorted(edges)] != edges).any())


def _even_schedule(pairs: int, length: int, quota: int, head_blocks: int, num_ctas: int,
                   vis: np.ndarray | None) -> DecodeSchedule:
    """decode_schedule's quota schedule where every pair has `length` tokens and the quota is a multiple
    of it (whole pairs a CTA, none cut) or a divisor (each pair cut over length / quota whole CTAs), in
    closed form: a uniform batch (a benchmark, a CUDA-graph warm-up, a full sliding window) plans with
    a few numpy calls."""
    if quota % length == 0:
        per_cta = quota // length
        seg = np.arange(pairs)
        lo, hi = 0, length
        partial = np.full(pairs, -1, np.int32)
        merge_pairs, merge_indptr = np.zeros(0, np.int32), np.zeros(1, np.int32)
        cta_indptr = np.minimum(np.arange(0, (num_ctas + 1) * per_cta, per_cta, dtype=np.int32), pairs)
    else:
        per_pair = length // quota
        n = pairs * per_pair
        partial = np.arange(n, dtype=np.int32)  # every segment a whole CTA, every pair cut
        seg, lo = np.divmod(partial, per_pair)  # segment -> pair, its CTA within the pair
        lo *= quota
        hi = lo + quota
        merge_pairs, merge_indptr = np.arange(pairs, dtype=np.int32), np.arange(0, n + 1, per_pair, dtype=np.int32)
        cta_indptr = np.minimum(np.arange(num_ctas + 1, dtype=np.int32), n)
    segments = np.empty((seg.size, 4), np.int32)
    req, _ = np.divmod(seg, head_blocks, out=(segments[:, 0], segments[:, 1]))
    first = 0 if vis is None else vis[req]
    segments[:, 2] = lo + first
    segments[:, 3] = hi + first
    return DecodeSchedule(segments, partial, cta_indptr, merge_pairs, merge_indptr,
                          num_partial_rows=int(merge_indptr[-1]), quota=quota)


def _quota_segments(cum: np.ndarray, pair_len: np.ndarray, quota: int) -> tuple:
    """(pair, CTA, token lo, token hi) of the non-empty segments, in token order, and the segments of
    each pair: the pair boundaries and the CTA quota boundaries, merged (a stable sort of two sorted
    runs), cut the token space; a non-empty pair spans the CTAs of its first to its last token.
    quota >= total / num_ctas: every CTA is below num_ctas."""
    bounds = np.concatenate((cum, np.arange(quota, int(cum[-1]), quota)))
    bounds.sort(kind="stable")
    new = bounds[1:] != bounds[:-1]
    lo, hi = bounds[:-1][new], bounds[1:][new]
    n_per_pair = (cum[1:] + (quota - 1)) // quota - cum[:-1] // quota
    np.minimum(n_per_pair, pair_len, out=n_per_pair)  # an empty pair: none
    return (np.arange(pair_len.size).repeat(n_per_pair), lo // quota, lo, hi), n_per_pair


def _split_segments(pair_len: np.ndarray, cum: np.ndarray, split: int, num_ctas: int) -> tuple:
    """(quota, (pair, CTA, token lo, token hi), chunks of each pair) of the non-empty chunks of a fixed
    split, in token order: 0 keeps every pair whole; k > 0 cuts it every k tokens. A chunk goes to the
    CTA of its middle token."""
    total = int(cum[-1])
    quota = max(-(-total // num_ctas), 1)
    if split:
        chunks = -(-pair_len // split)
        pair = np.arange(pair_len.size).repeat(chunks)
        first = (chunks.cumsum() - chunks).repeat(chunks)
        lo = cum[pair] + (np.arange(pair.size) - first) * split
        hi = np.minimum(lo + split, cum[pair + 1])
    else:
        chunks = (pair_len > 0).astype(np.int64)
        pair = pair_len.nonzero()[0]
        lo, hi = cum[pair], cum[pair + 1]
    return quota, (pair, np.minimum((lo + hi) // 2 // quota, num_ctas - 1), lo, hi), chunks


def _add_empty_pairs(segments: np.ndarray, partial: np.ndarray, cta: np.ndarray, pair: np.ndarray,
                     pair_len: np.ndarray, vis: np.ndarray | None, head_blocks: int, num_ctas: int) -> tuple:
    """Empty pairs (kv_len 0 or nothing visible) still write o = 0, lse = -inf: one empty segment
    each, the k-th on CTA k % num_ctas (evenly spread), after that CTA's non-empty segments (a stable
    sort by (CTA, empty) keeps the token order). cuda_src/decode_schedule.cu places them alike."""
    empty = (pair_len == 0).nonzero()[0]
    seg = np.empty((empty.size, 4), np.int32)
    req, _ = np.divmod(empty, head_blocks, out=(seg[:, 0], seg[:, 1]))
    seg[:, 2] = seg[:, 3] = 0 if vis is None else vis[req]
    cta = np.concatenate((cta, np.arange(empty.size) % num_ctas))
    key = 2 * cta
    key[pair.size:] += 1
    order = key.argsort(kind="stable")
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
    Items are ordered longest first, so a CTA that finishes early picks up short work (an uncut batch
    of many waves: longest first within each request, request by request, for L2; LOCALITY_WAVES).
    snake (for a persistent grid of num_ctas CTAs, CTA b taking items b, b + num_ctas, ...): each round
    of num_ctas items is dealt in reverse when its number is odd, so long and short shares alternate.
    split (FlashInfer's split-KV options, as decode_schedule's): 0 never cuts; k > 0 cuts every
    request's KV into chunks of k keys rounded up to 64: where a request is cut depends on it alone.

    plan() runs every step, and its host time is mostly numpy calls: an item's fields come from its
    request's values and its index among the request's items, and where every request is alike, from
    a (request, KV head, tile, chunk) grid (_uniform_items)."""
    qo_lens, kv_lens = np.asarray(qo_lens), np.asarray(kv_lens)
    uniform = qo_lens.size > 0 and _all_equal(qo_lens) and _all_equal(kv_lens)
    if uniform:  # every request alike
        qo, kv = int(qo_lens[0]), int(kv_lens[0])
        tiles = -(-qo * group // rows)
        base = qo_lens.size * tiles * num_kv_heads
    else:
        qo_lens, kv_lens = qo_lens.astype(np.int64, copy=False), kv_lens.astype(np.int64, copy=False)
        packed = qo_lens * group
        tiles = (packed + (rows - 1)) // rows
        base = int(tiles.sum()) * num_kv_heads
    want = max(1, -(-num_ctas // max(base, 1))) if base < num_ctas else 1
    uncut = split == 0 or (split is None and want == 1)
    if uniform:
        chunks = (1, kv, False) if uncut else _kv_chunk(kv, want, min_chunk, split)
        items, merges, prow_total, cost = _uniform_items(qo_lens.size, qo, kv, tiles, chunks, group, num_kv_heads,
                                                         rows, causal)
    elif uncut:  # nothing is cut: an item a tile, the whole KV range
        items, cost = _whole_items(qo_lens, kv_lens, packed, tiles, group, num_kv_heads, rows, causal)
        merges, prow_total = np.zeros((0, 8), np.int32), 0
    else:
        items, merges, prow_total, cost = _cut_items(qo_lens, kv_lens, packed, tiles, group, num_kv_heads, rows,
                                                     causal, want, min_chunk, split)
    if uncut and not snake and qo_lens.size > 1 and items.shape[0] >= LOCALITY_WAVES * num_ctas:
        by_request = _by_request(np.full(qo_lens.size, tiles) if uniform else tiles, num_kv_heads, kv_lens)
        return PrefillSchedule(items[by_request], merges, prow_total)
    if cost is None and not snake:  # every item costs the same: loop order is longest first already
        return PrefillSchedule(items, merges, prow_total)
    order = np.arange(items.shape[0]) if cost is None else (-cost).argsort(kind="stable")
    if snake:
        rnd, pos = np.divmod(np.arange(order.size), num_ctas)
        reverse = (rnd % 2 == 1) & (rnd < order.size // num_ctas)  # a last partial round stays in order
        dealt = np.empty_like(order)
        dealt[rnd * num_ctas + np.where(reverse, num_ctas - 1 - pos, pos)] = order
        order = dealt
    return PrefillSchedule(items[order], merges, prow_total)


def _all_equal(a: np.ndarray) -> bool:
    """Whether every entry of 1-D, non-empty `a` is the same: small arrays as a Python list, where one
    numpy call costs more than the whole list."""
    if a.size <= 64:
        values = a.tolist()
        return values.count(values[0]) == len(values)
    return bool((a == a[0]).all())


# Uncut batches of at least this many waves of num_ctas items run request by request (_by_request), not
# longest first over the whole batch: the CTAs resident at once then read the K/V of a request or two,
# which L2 holds, where longest first spreads them over every request. H100, 2026-12-07 (portable kernel
# unless named, TFLOP/s): ragged 64 x U[128, 2048] causal 16/16 d192/128 225 -> 247, 32/8 d128 257 -> 284
# (on the Hopper kernel 340, against 296-305 in earlier sessions' runs); paged 16 x (1024 new on 1024) 32/8
# Hopper 328 -> 351. Single requests are unchanged (one request: the same order). Below 16 waves (not
# measured) longest first keeps the tail short. A persistent grid (CUDA-graph plans: snake) keeps its dealing.
LOCALITY_WAVES = 16


def _by_request(tiles: np.ndarray, heads: int, kv_lens: np.ndarray) -> np.ndarray:
    """Order of uncut items laid out in loop order (request, KV head, tile), `tiles` a request:
    requests with the most keys first (stable), each request's items together and longest first, which
    is its tiles from the last (a tile's keys never fall as the tile moves down), a tile's KV heads side
    by side. For one request this is longest first. Index arithmetic: a third of a lexsort's time here."""
    counts = tiles * heads
    req = np.argsort(-np.asarray(kv_lens), kind="stable")
    cnt, t = counts[req], np.repeat(tiles[req], counts[req])
    j = np.arange(int(cnt.sum())) - np.repeat(cnt.cumsum() - cnt, cnt)  # index within its request
    return np.repeat((counts.cumsum() - counts)[req], cnt) + (j % heads) * t + (t - 1 - j // heads)


def _request_items(counts: np.ndarray) -> tuple:
    """(request, index within the request) of the items of requests holding `counts` items each."""
    r = np.arange(counts.size).repeat(counts)
    return r, np.arange(r.size) - (counts.cumsum() - counts)[r]


def _tile_cost(p0: np.ndarray, r: np.ndarray, qo_lens: np.ndarray, kv_lens: np.ndarray, packed: np.ndarray,
               kv_r: np.ndarray, group: int, rows: int, causal: bool, clip: bool = True) -> np.ndarray:
    """Keys the query tile at packed row p0 of request r visits (prefill_tile_cost, item by item);
    clip False: the causal count before its clip to 0..kv_len (a chunk within the KV range clips it)."""
    if not causal:
        return kv_r
    # Bottom-right causal: a tile's last query row sees keys up to its token + (kv_len - qo_len).
    seen = (np.minimum(p0 + rows, packed[r]) - 1) // group + (kv_lens - qo_lens + 1)[r]
    if clip:
        np.maximum(seen, 0, out=seen)
        np.minimum(seen, kv_r, out=seen)
    return seen


def _whole_items(qo_lens: np.ndarray, kv_lens: np.ndarray, packed: np.ndarray, tiles: np.ndarray, group: int,
                 num_kv_heads: int, rows: int, causal: bool) -> tuple:
    """(items, item costs) where nothing is cut: an item a tile, the whole KV range, in loop order
    (request, KV head, tile)."""
    r, j = _request_items(tiles * num_kv_heads)
    h, t = np.divmod(j, tiles[r])
    p0 = t * rows
    kv_r = kv_lens[r]
    items = np.zeros((r.size, 8), np.int32)
    items[:, 0], items[:, 1], items[:, 2], items[:, 3], items[:, 5] = r, h, p0, -1, kv_r
    return items, _tile_cost(p0, r, qo_lens, kv_lens, packed, kv_r, group, rows, causal)


def _kv_chunks(kv_lens: np.ndarray, want: int, min_chunk: int, split: int | None) -> tuple:
    """(chunks, chunk keys, cut) a request: n_chunks of `chunk` keys, multiples of 64 where cut; an
    uncut request is one chunk of its kv_len keys."""
    if split is None:
        n_chunks = np.minimum(kv_lens // min_chunk, want)
        np.maximum(n_chunks, 1, out=n_chunks)
        cut = n_chunks > 1
        chunk = (kv_lens - 1) // n_chunks + 1  # ceil(kv_len / n_chunks)
    else:
        chunk = -(-split // 64) * 64
        cut = kv_lens > chunk  # more than one chunk (at least one key a chunk)
        chunk = np.full_like(kv_lens, max(chunk, 1))
    chunk = np.where(cut, (chunk + 63) & -64, kv_lens)
    return np.where(cut, (kv_lens - 1) // np.maximum(chunk, 1) + 1, 1), chunk, cut


def _kv_chunk(kv_len: int, want: int, min_chunk: int, split: int | None) -> tuple:
    """_kv_chunks of one request, in Python ints."""
    if split is None:
        n_chunks = max(1, min(want, kv_len // min_chunk))
        cut = n_chunks > 1
        chunk = -(-kv_len // n_chunks)
    else:
        chunk = -(-split // 64) * 64
        cut = kv_len > chunk
        chunk = max(chunk, 1)
    if not cut:
        return 1, kv_len, False
    chunk = (chunk + 63) & -64
    return -(-kv_len // chunk), chunk, True


def _uniform_items(batch: int, qo_len: int, kv_len: int, tiles: int, chunks: tuple, group: int, num_kv_heads: int,
                   rows: int, causal: bool) -> tuple:
    """_cut_items (or _whole_items) where every request has the same lengths: the items, in loop order,
    form a (request, KV head, tile, chunk) grid, each field a broadcast of one axis's values; the fields
    that do not depend on the lengths come from _uniform_grid (memoised). chunks: _kv_chunk's (chunks,
    chunk keys, cut) of every request. The item costs are None where all are equal (nothing to sort)."""
    n_chunks, chunk, cut = chunks
    skeleton, merges = _uniform_grid(batch, num_kv_heads, tiles, n_chunks, rows, cut)
    items = skeleton.copy()
    bounds = np.arange(n_chunks + 1) * chunk
    np.minimum(bounds, kv_len, out=bounds)
    lo, hi = bounds[:-1], bounds[1:]  # each chunk's keys
    items[..., 4] = lo
    items[..., 5] = hi
    # Keys each (tile, chunk) visits: prefill_tile_cost's tile keys within the chunk (its clip to
    # 0..kv_len changes none of these: 0 <= lo <= hi <= kv_len).
    if not causal:
        seen = kv_len
    elif tiles > 1:  # bottom-right: a tile's last query row sees keys up to its token + (kv_len - qo_len)
        p0 = np.arange(0, tiles * rows, rows)[:, None]  # each tile's first packed row
        seen = (np.minimum(p0 + rows, qo_len * group) - 1) // group + (kv_len - qo_len + 1)
    else:  # the same for the one tile, in Python ints
        seen = (min(rows, qo_len * group) - 1) // group + (kv_len - qo_len + 1)
    cost = np.minimum(hi, seen) - lo  # (tile, chunk), or (chunk) where every tile's is the same
    np.maximum(cost, 0, out=cost)
    if len(set(cost.ravel().tolist())) <= 1:  # a handful of values: a set is quicker than two reductions
        cost = None  # no reordering
    else:  # the costs of every request and head
        cost = np.broadcast_to(cost, (batch * num_kv_heads, tiles, n_chunks)).ravel()
    return items.reshape(-1, 8), merges, (batch * num_kv_heads * tiles * n_chunks * rows if cut else 0), cost


@functools.partial(memo.of_plain_args, size=16)  # a few shapes at a time; an entry can reach megabytes
def _uniform_grid(batch: int, num_kv_heads: int, tiles: int, n_chunks: int, rows: int, cut: bool) -> tuple:
    """The fields of a uniform batch's items that depend on its shape alone: a (batch, num_kv_heads, tiles,
    n_chunks, 8) grid holding each item's request, KV head, first packed row and first partial row (-1
    uncut), its KV range left to fill; and the merges, a tile each where cut. Memoised, read-only: a serving
    engine's steps repeat the shape while the lengths grow."""
    grid = (batch, num_kv_heads, tiles, n_chunks)
    items = np.zeros(grid + (8,), np.int32)
    items[..., 0] = np.arange(batch)[:, None, None, None]
    items[..., 1] = np.arange(num_kv_heads)[:, None, None]
    items[..., 2] = np.arange(0, tiles * rows, rows)[:, None]
    if cut:
        n = batch * num_kv_heads * tiles * n_chunks
        items[..., 3] = np.arange(0, n * rows, rows).reshape(grid)  # every item its block of partial rows
        merges = items[:, :, :, 0].copy().reshape(-1, 8)  # a merge a tile: its request, head, rows, first partial rows
        merges[:, 4], merges[:, 5] = n_chunks, rows
    else:
        items[..., 3] = -1
        merges = np.zeros((0, 8), np.int32)
    items.flags.writeable = merges.flags.writeable = False
    return items, merges


def _cut_items(qo_lens: np.ndarray, kv_lens: np.ndarray, packed: np.ndarray, tiles: np.ndarray, group: int,
               num_kv_heads: int, rows: int, causal: bool, want: int, min_chunk: int, split: int | None) -> tuple:
    """(items, merges, partial rows, item costs) where some requests' KV is cut, items in loop order
    (request, KV head, tile, chunk): a cut tile's chunks write n_chunks blocks of partial rows, in tile
    order, which one merge combines. A cut request's items take consecutive blocks of `rows` partial
    rows, so an item's block is its request's first plus its index within the request."""
    n_chunks, chunk, cut = _kv_chunks(kv_lens, want, min_chunk, split)
    per_req = tiles * num_kv_heads * n_chunks
    part_rows = per_req * (rows * cut)
    r, j = _request_items(per_req)
    u, c = np.divmod(j, n_chunks[r])  # the tile within the request, the chunk within the tile
    h, t = np.divmod(u, tiles[r])
    p0 = t * rows
    chunk_r, kv_r = chunk[r], kv_lens[r]
    lo = c * chunk_r
    hi = np.minimum(lo + chunk_r, kv_r)
    cut_r = cut[r]
    items = np.zeros((r.size, 8), np.int32)
    items[:, 0], items[:, 1], items[:, 2], items[:, 4], items[:, 5] = r, h, p0, lo, hi
    items[:, 3] = np.where(cut_r, (part_rows.cumsum() - part_rows)[r] + j * rows, -1)
    # The tile's keys within the chunk (0 <= lo <= hi <= kv_len: the tile cost's own clip changes none).
    cost = np.minimum(hi, _tile_cost(p0, r, qo_lens, kv_lens, packed, kv_r, group, rows, causal, clip=False)) - lo
    np.maximum(cost, 0, out=cost)
    merges = items[cut_r & (c == 0)]  # a cut tile's first chunk: its request, head, rows, partial rows
    merges[:, 4], merges[:, 5] = n_chunks[merges[:, 0]], rows
    return items, merges, int(part_rows.sum()), cost
