"""Decode split-KV planning (pure host code)."""
import numpy as np
import pytest

from fi_cupy import scheduler
from fi_cupy.decode import make_params, plan_decode


def _check_partition(kv_lens, visible, num_slots, slots, merge_indptr, num_partial):
    batch = len(kv_lens)
    used = slots[slots[:, 0] >= 0]
    assert slots.shape == (num_slots, 4)
    covered = {r: [] for r in range(batch)}
    for r, s, e, p in used.tolist():
        covered[r].append((s, e, p))
    for r in range(batch):
        segs = sorted(covered[r])
        assert segs, f"request {r} has no slot"
        # the chunks tile [visible, kv_len) exactly
        assert segs[0][0] == min(visible[r], kv_lens[r]) or kv_lens[r] == 0
        assert segs[-1][1] == kv_lens[r]
        for (s0, e0, _), (s1, _, _) in zip(segs, segs[1:]):
            assert e0 == s1
        n = len(segs)
        assert merge_indptr[r + 1] - merge_indptr[r] == (n if n > 1 else 0)
        rows = sorted(p for _, _, p in segs)
        if n == 1:
            assert rows == [-1]
        else:
            assert rows == list(range(merge_indptr[r], merge_indptr[r + 1]))
    assert num_partial == merge_indptr[-1]


@pytest.mark.parametrize("kv_lens", [[8192], [131072], [0], [1], [4096] * 16, [2048] * 64,
                                     [0, 1, 5, 1000, 70000, 3], list(range(0, 3000, 7))])
def test_partition_covers_every_token(kv_lens):
    kv_lens = np.array(kv_lens)
    vis = np.zeros_like(kv_lens)
    n = scheduler.decode_num_slots(len(kv_lens), 8, 1, 132)
    slots, mi, npart = scheduler.decode_partition(kv_lens, vis, n)
    _check_partition(kv_lens, vis, n, slots, mi, npart)


def test_partition_splits_long_single_request_and_respects_window():
    kv = np.array([32768])
    vis = np.array([32768 - 1 - 999])  # window_left = 999
    n = scheduler.decode_num_slots(1, 8, 1, 132)
    slots, mi, npart = scheduler.decode_partition(kv, vis, n)
    _check_partition(kv, vis, n, slots, mi, npart)
    full, _, _ = scheduler.decode_partition(kv, np.zeros(1, np.int64), n)
    assert (full[:, 0] >= 0).sum() > 8  # the whole context is split over many slots


def test_num_slots_depends_on_batch_only():
    a = scheduler.decode_num_slots(16, 8, 1, 132)
    assert a == scheduler.decode_num_slots(16, 8, 1, 132) and a >= 16
    assert scheduler.decode_num_slots(1024, 8, 1, 132) == 1024


@pytest.mark.parametrize("g,expected", [(1, (1, 1)), (2, (4, 1)), (4, (4, 1)), (5, (8, 1)), (8, (8, 1)),
                                        (32, (8, 4)), (12, (8, 2))])
def test_heads_per_block(g, expected):
    assert scheduler.decode_heads_per_block(g) == expected


def _params(**kw):
    base = dict(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16, pos_encoding_mode="NONE",
                window_left=-1, logits_soft_cap=None, q_data_type="bfloat16", kv_data_type=None,
                sm_scale=None, rope_scale=None, rope_theta=None)
    base.update(kw)
    return make_params(**base)


def test_plan_lengths_and_metadata():
    p = _params()
    indptr = np.array([0, 2, 2, 5])
    indices = np.array([7, 3, 1, 0, 9])
    last = np.array([5, 0, 16])
    plan = plan_decode(p, indptr, indices, last, num_sms=132)
    kv = plan.meta[plan.offsets["kv_lens"]: plan.offsets["kv_lens"] + 3]
    assert kv.tolist() == [16 + 5, 0, 2 * 16 + 16]
    assert plan.max_page == 9
    ix = plan.offsets["indices"]
    assert plan.meta[ix: ix + 5].tolist() == indices.tolist()
    assert all(v % 4 == 0 for v in plan.offsets.values())  # 16-byte aligned parts


@pytest.mark.parametrize("kw,err,match", [
    (dict(num_qo_heads=30), ValueError, r"num_qo_heads \(30\) must be a multiple of num_kv_heads \(8\)"),
    (dict(head_dim=100), ValueError, "head_dim: 100 is not supported"),
    (dict(head_dim=512), ValueError, "head_dim: 512 is not supported"),
    (dict(pos_encoding_mode="ALIBI"), ValueError, "pos_encoding_mode: 'ALIBI' is not one of"),
    (dict(q_data_type="float32"), TypeError, "q_data_type: float32 is not supported"),
    (dict(kv_data_type="int8"), TypeError, "kv_data_type: int8 is not supported with q bfloat16"),
    (dict(page_size=0), ValueError, "page_size: expected a positive integer"),
    (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap: must be > 0"),
])
def test_param_errors(kw, err, match):
    with pytest.raises(err, match=match):
        _params(**kw)


def test_plan_errors():
    p = _params()
    with pytest.raises(ValueError, match="last_page_len: request 0 has 1 pages and last_page_len 17"):
        plan_decode(p, np.array([0, 1]), np.array([0]), np.array([17]), 132)
    with pytest.raises(ValueError, match="indptr: must be non-decreasing"):
        plan_decode(p, np.array([0, 2, 1]), np.array([0, 1]), np.array([1, 1]), 132)
    with pytest.raises(ValueError, match="indices: has 1 entries but indptr"):
        plan_decode(p, np.array([0, 2]), np.array([0]), np.array([1]), 132)
    with pytest.raises(ValueError, match="indices: page indices must be >= 0"):
        plan_decode(p, np.array([0, 1]), np.array([-3]), np.array([1]), 132)
    with pytest.raises(ValueError, match="last_page_len: expected 2 entries"):
        plan_decode(p, np.array([0, 1, 2]), np.array([0, 1]), np.array([1]), 132)
