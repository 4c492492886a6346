"""MLA's host side (CPU): which pages a plan reads when FlashInfer's page table lists more than kv_len_arr
needs, and its refusals."""
import numpy as np
import pytest

from fi_cupy import mla, prefill


def test_pages_used_keeps_the_needed_pages_in_order():
    ip = np.array([0, 3, 3, 7], np.int64)
    ix = np.array([9, 4, 6, 1, 2, 8, 5], np.int64)
    lens = np.array([17, 0, 16], np.int64)  # page 16: 2 of 3 pages, none, 1 of 4
    used_ip, used = mla._pages_used(ip, ix, lens, 16)
    assert used_ip.tolist() == [0, 2, 2, 3] and used.tolist() == [9, 4, 1]
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
