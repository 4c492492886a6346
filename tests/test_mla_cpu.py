"""MLA's host side (CPU): which pages a plan reads when FlashInfer's page table lists more than kv_len_arr
needs, and its refusals; which kernel a backend picks, and how the Hopper kernel's plan cuts a long request."""
import numpy as np
import pytest

from fi_cupy import mla, prefill


def test_pages_used_keeps_the_needed_pages_in_order():
    ip = np.array([0, 3, 3, 7], np.int64)
    ix = np.array([9, 4, 6, 1, 2, 8, 5], np.int64)
    lens = np.array([17, 0, 16], np.int64)  # page 16: 2 of 3 pages, none, 1 of 4
    used_ip, used, top = mla._pages_used(ip, ix, lens, 16)
    assert used_ip.tolist() == [0, 2, 2, 3] and used.tolist() == [9, 4, 1] and top == 9
    with pytest.raises(ValueError, match="^kv_len_arr: request 0 has 49 tokens, more than its 3 pages of 16"):
        mla._pages_used(ip, ix, np.array([49, 0, 1]), 16)
    with pytest.raises(ValueError, match="^kv_indices: has 6 entries but kv_indptr"):
        mla._pages_used(ip, ix[:6], lens, 16)
    with pytest.raises(ValueError, match="^kv_indices: page indices must be >= 0"):
        mla._pages_used(ip, np.array([-1, 4, 6, 1, 2, 8, 5]), lens, 16)


def test_mla_width_in_the_kernel_tables():
    """Q/K 576 = ckv 512 + kpe 64, V/O 512 in two halves of 256; a 64-row tile; compiled for both dtypes."""
    assert prefill.widths(*prefill.MLA_DIMS) == (576, 256, 2)
    assert set(prefill.tile_shapes(*prefill.MLA_DIMS)) == {prefill.TileShape(1, 4)}
    assert len(prefill.mla_programs()) == 2 and all(p in prefill.all_programs() for p in prefill.mla_programs())


def _mla_params(heads=128):
    d, dv = prefill.MLA_DIMS
    return prefill.PrefillParams(heads, 1, d, prefill.Q_DTYPES[1], prefill.Q_DTYPES[1], False, -1, 0.0, 0.1, False, 1.0,
                                 1e4, 64, False, dv)


def test_hopper_tile_and_its_backend_choice(monkeypatch):
    """The Hopper kernel (cuda_src/mla_sm90.cu) takes 64 rows with both warpgroups (256 threads), 64-key tiles; "auto"
    and "fa3" pick it on sm_90a, "fa2" the portable tile; "fa3" elsewhere is refused naming the backend."""
    t = prefill.MLA_SM90_TILE
    dqk, dvo = prefill.MLA_DIMS
    assert (t.rows, t.threads, prefill.kv_tile(dqk, t, prefill.Q_DTYPES[1], dvo)) == (64, 256, 64)
    assert [p.filename for p in prefill.sm90_programs()[-2:]] == ["mla_sm90.cu"] * 2  # fp16, bf16: CI compiles them
    assert prefill.smem_bytes(dqk, t, prefill.Q_DTYPES[1], dvo) <= 227 * 1024
    qo = np.ones(4, np.int64)
    monkeypatch.setattr(prefill.kernels, "device_arch", lambda device: "sm_90a")
    monkeypatch.setattr(prefill.kernels, "device_props", lambda device: {"smem_optin": 227 * 1024})  # an H100's
    for backend in ("auto", "fa3"):
        assert prefill.plan_tile(_mla_params(), qo, False, backend, 0)[0] == t
    assert prefill.plan_tile(_mla_params(), qo, False, "fa2", 0)[0] == prefill.TileShape(1, 4)
    monkeypatch.setattr(prefill.kernels, "device_arch", lambda device: "sm_80")
    assert prefill.plan_tile(_mla_params(), qo, False, "auto", 0)[0] == prefill.TileShape(1, 4)
    with pytest.raises(ValueError, match="^backend: 'fa3'"):
        prefill.plan_tile(_mla_params(), qo, False, "fa3", 0)


def test_hopper_plan_cuts_small_batches_into_256_key_chunks():
    """One 8192-token request at 128 heads: 2 row tiles, each cut into chunks of at least MLA_MIN_CHUNK keys so
    the grid fills, whose partial states merge afterwards."""
    qo, kv = np.array([0, 1], np.int32), np.array([8192], np.int32)
    plan, _ = prefill.plan_prefill(_mla_params(), qo, np.array([0, 128], np.int32), kv, (np.arange(128, dtype=np.int32), 127),
                                   prefill.MLA_SM90_TILE, 132, None)
    assert plan.num_merges == 2 and plan.num_items == 2 * (8192 // 256)
