"""Work partition heuristics as pure functions (no GPU needed; unit-tested on the CPU).

Decode split-KV: the decode grid is (num_slots, num_kv_heads, head_slices). num_slots depends only on
the batch size and the device, never on the lengths, so a re-plan of a batch of the same size keeps
the launch shape and a captured CUDA graph stays valid. Requests longer than the chunk size are cut
into equal chunks, one slot each; their partial states are merged by a second kernel.
"""
from __future__ import annotations

import math

import numpy as np

MAX_HEADS_PER_BLOCK = 8


def decode_heads_per_block(group_size: int) -> tuple:
    """(heads per block, head slices) for a GQA group: 1, 4 or 8 heads (masked when the group is
    smaller), so a K/V byte is read once per block and the kernel grid stays small."""
    gb = 1 if group_size == 1 else (4 if group_size <= 4 else MAX_HEADS_PER_BLOCK)
    return gb, math.ceil(group_size / gb)


def decode_num_slots(batch_size: int, num_kv_heads: int, head_slices: int, num_sms: int,
                     blocks_per_sm: int = 4) -> int:
    """Slots so that slots * kv_heads * slices fills about blocks_per_sm blocks per SM."""
    per_slot = num_kv_heads * head_slices
    return max(batch_size, math.ceil(num_sms * blocks_per_sm / per_slot), 1)


def decode_partition(kv_lens: np.ndarray, visible_start: np.ndarray, num_slots: int,
                     min_chunk: int = 256):
    """Cut each request's visible tokens [visible_start, kv_len) into chunks, at most num_slots in all.

    Returns (slots int32 (num_slots, 4) rows of (request, start, end, partial_row or -1; request -1
    for an unused slot), merge_indptr int32 (batch + 1) over partial rows, num_partial_rows).
    """
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    visible_start = np.asarray(visible_start, dtype=np.int64)
    batch = kv_lens.size
    if num_slots < batch:
        raise ValueError(f"num_slots ({num_slots}) must be >= batch size ({batch})")
    lens = np.maximum(kv_lens - visible_start, 0)
    max_len = int(lens.max()) if batch else 0

    def chunks_for(c: int) -> np.ndarray:
        return np.maximum(1, -(-lens // c))

    chunk = max(max_len, 1)
    if num_slots > batch and max_len > min_chunk:
        lo, hi = min_chunk, max_len  # smallest chunk whose chunk count fits the slots
        while lo < hi:
            mid = (lo + hi) // 2
            if int(chunks_for(mid).sum()) <= num_slots:
                hi = mid
            else:
                lo = mid + 1
        chunk = lo
    n = chunks_for(chunk)
    # Equal-sized chunks per request (balance), at most `chunk` tokens each.
    per = -(-lens // n)
    req = np.repeat(np.arange(batch, dtype=np.int64), n)
    idx = np.arange(req.size, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    start = visible_start[req] + idx * per[req]
    end = np.minimum(start + per[req], kv_lens[req])
    start = np.minimum(start, end)
    split = n[req] > 1
    partial_row = np.full(req.size, -1, dtype=np.int64)
    partial_row[split] = np.arange(int(split.sum()))
    merge_counts = np.where(n > 1, n, 0)
    merge_indptr = np.concatenate([[0], np.cumsum(merge_counts)]).astype(np.int32)
    slots = np.full((num_slots, 4), -1, dtype=np.int32)
    slots[:, 1:3] = 0
    slots[: req.size] = np.stack([req, start, end, partial_row], axis=1)
    return slots, merge_indptr, int(split.sum())
