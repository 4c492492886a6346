"""Host arrays of one forward step, built from the scheduler's requests: the tokens with their
positions and request index, and the page table of the step's requests after this step's append."""
from __future__ import annotations

import numpy as np


class StepInputs:
    def __init__(self, tokens, positions, batch_indices, kv_lens, pages, page_size: int):
        self.tokens = np.asarray(tokens, np.int32)
        self.positions = np.asarray(positions, np.int32)
        self.batch_indices = np.asarray(batch_indices, np.int32)
        kv_lens = np.asarray(kv_lens, np.int64)
        npages = -(-kv_lens // page_size)
        if any(len(p) < n for p, n in zip(pages, npages)):
            raise ValueError("a request has fewer pages than its KV length needs")
        self.kv_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
        self.kv_indices = np.concatenate([np.asarray(p[:n], np.int32) for p, n in zip(pages, npages)] +
                                         [np.zeros(0, np.int32)])
        self.kv_last = (kv_lens - (npages - 1) * page_size).astype(np.int32)
        self.num_requests = len(kv_lens)

    @property
    def qo_indptr(self) -> np.ndarray:
        counts = np.bincount(self.batch_indices, minlength=self.num_requests)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def prefill_inputs(reqs, page_size: int) -> StepInputs:
    """Whole prompts of requests whose cache is empty: positions 0 .. len - 1."""
    lens = [len(r.prompt) for r in reqs]
    return StepInputs(np.concatenate([np.asarray(r.prompt, np.int32) for r in reqs]),
                      np.concatenate([np.arange(n) for n in lens]),
                      np.repeat(np.arange(len(reqs)), lens), lens, [r.pages for r in reqs], page_size)


def decode_inputs(reqs, page_size: int, ahead: bool = False) -> StepInputs:
    """Each request's newest token, at the position after its cached ones. ahead: the step after the
    one in flight (positions one further; its tokens, not yet known on the host, are left 0)."""
    pos = [r.kv_len + int(ahead) for r in reqs]
    tokens = np.zeros(len(reqs)) if ahead else [r.output[-1] for r in reqs]
    return StepInputs(tokens, pos, np.arange(len(reqs)), [p + 1 for p in pos], [r.pages for r in reqs], page_size)


def padded(s: StepInputs, bucket: int) -> StepInputs:
    """The step with bucket - n padding requests of one token at position 0 in (reserved) page 0, so a
    CUDA graph captured for `bucket` requests replays it."""
    pad = bucket - s.num_requests
    if pad < 0:
        raise ValueError(f"padded: {s.num_requests} requests exceed the bucket of {bucket}")
    if pad == 0:
        return s
    out = StepInputs.__new__(StepInputs)
    out.tokens = np.concatenate([s.tokens, np.zeros(pad, np.int32)])
    out.positions = np.concatenate([s.positions, np.zeros(pad, np.int32)])
    out.batch_indices = np.arange(bucket, dtype=np.int32)
    out.kv_indptr = np.concatenate([s.kv_indptr, s.kv_indptr[-1] + np.arange(1, pad + 1)]).astype(np.int32)
    out.kv_indices = np.concatenate([s.kv_indices, np.zeros(pad, np.int32)])
    out.kv_last = np.concatenate([s.kv_last, np.ones(pad, np.int32)])
    out.num_requests = bucket
    return out
