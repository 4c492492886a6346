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
    scored at once (plan() runs every decode step: host time counts)."""
    total = int(cum[-1])
    q0 = max(-(-total // num_ctas), min_quota)
    if total == 0:
        return q0
    longest = int(np.diff(cum).max())
    whole = -(-q0 // longest) * longest  # the fewest whole longest pairs that fit the wave
    qs = np.unique(np.concatenate([[q0, whole], -(-longest // np.arange(1, 65))]))
    qs = qs[qs >= q0][:, None]
    starts = np.arange(-(-total // q0))[None, :] * qs  # CTA starts of each candidate; past total: unused
    inner = np.searchsorted(cum, starts + qs, side="left") - np.searchsorted(cum, starts, side="right")
    load = np.where(starts < total, np.minimum(qs, total - starts) + SEGMENT_COST * (1 + inner), 0)
    cuts = ((starts < total) & ~np.isin(starts, cum)).any(axis=1)  # a CTA starts inside a pair
    return int(qs[np.argmin(load.max(axis=1) + MERGE_COST * cuts), 0])  # ties: the smallest quota


def decode_schedule(kv_lens, visible_start, head_blocks: int, num_ctas: int, min_quota: int | None = None,
                    split: int | None = None) -> DecodeSchedule:
    """split: None cuts the token space into equal CTA quotas (_pick_quota). 0 (FlashInfer's
    disable_split_kv) never cuts a pair; k > 0 (fixed_split_size, in tokens) cuts every pair at multiples
    of k keys from its first visible key. With a split given, where a pair is cut depends on that
    request alone, so a request's output is bit-identical whatever the batch around it (the merge
    adds its chunks in token order); the chunks are dealt to CTAs in order, balanced by tokens."""
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    vis = np.minimum(np.asarray(visible_start, dtype=np.int64), kv_lens)
    batch = kv_lens.size
    pairs = batch * head_blocks
    pair_len = np.repeat(kv_lens - vis, head_blocks)
    cum = np.concatenate([[0], np.cumsum(pair_len)])
    total = int(cum[-1])
    if split is None:
        quota = _pick_quota(cum, num_ctas, MIN_QUOTA if min_quota is None else min_quota)
        # Non-empty segments: the pair boundaries and the CTA quota boundaries cut the token space.
        bounds = np.unique(np.concatenate([cum, np.arange(quota, total, quota)]))
        lo, hi = bounds[:-1], bounds[1:]
        pair = np.searchsorted(cum, lo, side="right") - 1
        cta = np.minimum(lo // quota, num_ctas - 1)
    else:
        if split < 0:
            raise ValueError(f"split: expected None, 0 or a positive token count, got {split}")
        chunks = np.where(pair_len > 0, -(-pair_len // split) if split else 1, 0)
        pair = np.repeat(np.arange(pairs), chunks)
        first = np.concatenate([[0], np.cumsum(chunks)])[:-1]
        j = np.arange(pair.size) - np.repeat(first, chunks)  # chunk number within its pair
        lo = cum[pair] + (j * split if split else 0)
        hi = np.minimum(lo + split, cum[pair + 1]) if split else cum[pair + 1]
        quota = max(-(-total // num_ctas), 1)
        cta = np.minimum((lo + hi) // 2 // quota, num_ctas - 1)  # by the chunk's middle token
    # Empty pairs (kv_len 0 or nothing visible) still write o = 0, lse = -inf: spread over the CTAs.
    empty = np.flatnonzero(pair_len == 0)
    pair = np.concatenate([pair, empty])
    cta = np.concatenate([cta, empty % num_ctas])
    lo = np.concatenate([lo, cum[empty]])
    hi = np.concatenate([hi, cum[empty]])
    order = np.lexsort((lo, pair, cta))
    pair, cta, lo, hi = pair[order], cta[order], lo[order], hi[order]
    req = pair // head_blocks
    start = vis[req] + (lo - cum[pair])
    end = vis[req] + (hi - cum[pair])
    n_per_pair = np.bincount(pair, minlength=pairs)
    # Partial rows: contiguous per pair, in token order.
    partial = np.full(pair.size, -1, dtype=np.int64)
    idx = np.flatnonzero(n_per_pair[pair] > 1)
    idx = idx[np.lexsort((start[idx], pair[idx]))]
    partial[idx] = np.arange(idx.size)
    cut = np.flatnonzero(n_per_pair > 1)
    return DecodeSchedule(
        segments=np.stack([req, pair % head_blocks, start, end], axis=1).astype(np.int32),
        segment_partial=partial.astype(np.int32),
        cta_indptr=np.searchsorted(cta, np.arange(num_ctas + 1), side="left").astype(np.int32),
        merge_pairs=cut.astype(np.int32),
        merge_indptr=np.concatenate([[0], np.cumsum(n_per_pair[cut])]).astype(np.int32),
        num_partial_rows=int(idx.size),
        quota=quota,
    )


# ---------------------------------------------------------------------------------------------
# Prefill: work items over (request, KV head, query tile), cut along KV when the tiles alone do not
# fill the GPU.

PREFILL_MIN_CHUNK = 512  # fewest keys a KV chunk gets: below it, merging partial states costs more


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
    # KV chunks a request: n_chunks of `chunk` keys (multiples of 64 when cut).
    if split is None:
        n_chunks = np.maximum(1, np.minimum(want, kv_lens // min_chunk))
        chunk = np.where(n_chunks > 1, -(-kv_lens // n_chunks), kv_lens)
    else:
        chunk = np.full_like(kv_lens, -(-split // 64) * 64) if split else kv_lens
        n_chunks = np.maximum(1, -(-kv_lens // np.maximum(chunk, 1))) if split else np.ones_like(kv_lens)
    cut = n_chunks > 1
    chunk = np.where(cut, -(-chunk // 64) * 64, chunk)
    n_chunks = np.where(cut, -(-kv_lens // np.maximum(chunk, 1)), 1)
    # Query tiles in loop order: request, KV head, tile.
    per_req = tiles * num_kv_heads
    r = np.repeat(np.arange(qo_lens.size), per_req)
    w = np.arange(r.size) - np.repeat(np.cumsum(per_req) - per_req, per_req)
    h, t = w // np.maximum(tiles[r], 1), w % np.maximum(tiles[r], 1)
    p0 = t * rows
    packed = qo_lens[r] * group
    if causal:
        last_tok = np.minimum(p0 + rows, packed) - 1
        tcost = np.clip(last_tok // group + (kv_lens[r] - qo_lens[r]) + 1, 0, kv_lens[r])
    else:
        tcost = kv_lens[r]
    # A cut tile writes n_chunks partial rows blocks, in tile order.
    tile_cut = cut[r]
    tile_rows = np.where(tile_cut, n_chunks[r] * rows, 0)
    prow = np.cumsum(tile_rows) - tile_rows
    nc = n_chunks[r]
    ti = np.repeat(np.arange(r.size), nc)  # the tile of each item
    c = np.arange(ti.size) - np.repeat(np.cumsum(nc) - nc, nc)
    kv_i = kv_lens[r][ti]
    ck = chunk[r][ti]
    lo = np.where(tile_cut[ti], c * ck, 0)
    hi = np.where(tile_cut[ti], np.minimum(kv_i, (c + 1) * ck), kv_i)
    part = np.where(tile_cut[ti], prow[ti] + c * rows, -1)
    zero = np.zeros_like(lo)
    it = np.stack([r[ti], h[ti], p0[ti], part, lo, hi, zero, zero], axis=1).astype(np.int32).reshape(-1, 8)
    cost = np.where(tile_cut[ti], np.maximum(0, np.minimum(hi, tcost[ti]) - lo), tcost[ti])
    mt = np.flatnonzero(tile_cut)
    zm = np.zeros_like(mt)
    merges = np.stack([r[mt], h[mt], p0[mt], prow[mt], nc[mt], np.full_like(mt, rows), zm, zm], axis=1)
    prow_total = int(tile_rows.sum())
    order = np.argsort(-cost.astype(np.int64), kind="stable")
    if snake:
        rnd, pos = np.divmod(np.arange(order.size), num_ctas)
        reverse = (rnd % 2 == 1) & (rnd < order.size // num_ctas)  # a last partial round stays in order
        dealt = np.empty_like(order)
        dealt[rnd * num_ctas + np.where(reverse, num_ctas - 1 - pos, pos)] = order
        order = dealt
    return PrefillSchedule(it[order], merges.astype(np.int32).reshape(-1, 8), prow_total)
