"""Decode's schedule kernel (cuda_src/decode_schedule.cu) on the GPU: for random batches (lengths 0, 1, mixed,
uniform, one long among short ones; sliding windows; 1..16 head blocks; 1..1056 CTAs, past one thread a CTA)
its segments, partial rows, CTA ranges and merges are scheduler.decode_schedule's, element for element, and
it writes nothing past its parts; and the wrapper planned on it (decode.DEVICE_SCHEDULE, the default) gives
the reference's output, bit for bit the host schedule's."""
import cupy as cp
import numpy as np
import pytest

from fi_cupy import decode, decode_schedule, scheduler
from fi_cupy._core.workspace import pack_meta
from test_decode import PagedBatch, check_batch, run_batch
from test_scheduler import _random_decode_batch

pytestmark = pytest.mark.gpu
POISON = -7


def _device_schedule(kv: np.ndarray, window_left: int, head_blocks: int, num_ctas: int):
    """The kernel's parts for this batch, read back; its block poisoned first, one guard part after it."""
    batch = kv.size
    seg_cap, _, merge_cap = scheduler.DecodeSchedule.capacity(batch, head_blocks, num_ctas)
    vis = np.maximum(0, kv - 1 - window_left) if window_left >= 0 else None
    quota, cut = scheduler.decode_quota(kv, vis, head_blocks, num_ctas)
    meta, off = pack_meta(decode_schedule.device_parts(batch, seg_cap, num_ctas, merge_cap) +
                          [("kv_lens", kv, batch), ("guard", np.full(4, POISON), 4)])
    start = off["kv_lens"]
    meta[:start] = POISON
    dev = cp.asarray(meta)
    decode_schedule.launch_schedule(dev.data.ptr, off, batch, head_blocks, num_ctas, quota, window_left, merge_cap,
                                    cp.cuda.get_current_stream().ptr, dev.device.id)
    got = cp.asnumpy(dev)
    assert (got[start:] == meta[start:]).all()  # its input and the guard untouched
    part = {k: got[v:] for k, v in off.items()}
    n_seg = part["cta_indptr"][num_ctas]
    m = np.flatnonzero(part["merge_indptr"][: merge_cap + 1] == part["merge_indptr"][merge_cap])[0]
    return quota, cut, (part["segments"][: 4 * n_seg].reshape(-1, 4), part["segment_partial"][:n_seg],
                        part["cta_indptr"][: num_ctas + 1], part["merge_pairs"][:m], part["merge_indptr"][: m + 1],
                        part["merge_indptr"][: merge_cap + 1])


@pytest.mark.parametrize("seed", range(3))
def test_device_schedule_is_the_host_schedule(seed):
    rng = np.random.default_rng(seed)
    for i in range(40):
        kv, _, head_blocks, num_ctas, _ = _random_decode_batch(rng)
        window_left = [-1, -1, 0, 7, 999][i % 5]
        vis = np.maximum(0, kv - 1 - window_left) if window_left >= 0 else None
        want = scheduler.decode_schedule(kv, vis, head_blocks, num_ctas)
        quota, cut, got = _device_schedule(kv, window_left, head_blocks, num_ctas)
        assert quota == want.quota and cut == (want.merge_pairs.size > 0)
        names = ("segments", "segment_partial", "cta_indptr", "merge_pairs", "merge_indptr")
        for name, g, w in zip(names, got, (want.segments, want.segment_partial, want.cta_indptr, want.merge_pairs,
                                           want.merge_indptr)):
            assert np.array_equal(g, w), (i, name)
        assert (got[5][want.merge_pairs.size:] == want.num_partial_rows).all()  # padded: no rows past the cut pairs


@pytest.mark.parametrize("kv", [[0, 0, 0], [5], [0, 3000, 0, 1], [1] * 1500, [131072], [0, 7, 1] * 682 + [3],
                                [0, 7, 1] * 682 + [3, 5000]])
def test_device_schedule_edges(kv):
    """All empty, one request, empties around a long one, more requests than threads, one long request;
    2047 and 2048 requests (either side of decode_schedule.STAGED_REQUESTS)."""
    kv = np.array(kv)
    for head_blocks, num_ctas in ((1, 1), (8, 528), (3, 1056)):
        want = scheduler.decode_schedule(kv, None, head_blocks, num_ctas)
        _, _, got = _device_schedule(kv, -1, head_blocks, num_ctas)
        for g, w in zip(got, (want.segments, want.segment_partial, want.cta_indptr, want.merge_pairs,
                              want.merge_indptr)):
            assert np.array_equal(g, w)


@pytest.mark.parametrize("lens,group,page_size,opts", [
    ([2999, 1, 0, 17, 640], 4, 16, {}),                    # cut pairs, an empty request
    ([1024] * 64, 8, 16, {}),                              # uniform: closed-form quota
    ([0, 0, 5000, 0, 1, 1], 1, 7, {"window_left": 99}),    # empties around a long request, a window
    ([97, 0, 97, 0], 4, 1, {"logits_soft_cap": 30.0}),     # whole pairs, no merge
])
def test_wrapper_on_the_device_schedule(lens, group, page_size, opts, monkeypatch):
    b = PagedBatch(lens, page_size=page_size, hq=2 * group, hkv=2)
    monkeypatch.setattr(decode, "DEVICE_SCHEDULE", True)
    out, lse = check_batch(b, **opts)
    monkeypatch.setattr(decode, "DEVICE_SCHEDULE", False)
    host_out, host_lse = run_batch(b, **opts)
    assert np.array_equal(out, host_out) and np.array_equal(lse, host_lse)
