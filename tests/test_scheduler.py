"""Decode split-KV planning (pure host code)."""
import numpy as np
import pytest

from fi_cupy import scheduler
from fi_cupy.decode import make_params, plan_decode


def _check_schedule(kv_lens, visible, head_blocks, num_ctas, sch):
    batch = len(kv_lens)
    pairs = batch * head_blocks
    seg = sch.segments
    n = seg.shape[0]
    seg_cap, part_cap, merge_cap = scheduler.DecodeSchedule.capacity(batch, head_blocks, num_ctas)
    assert n <= seg_cap and sch.num_partial_rows <= part_cap and sch.merge_pairs.size <= merge_cap
    assert sch.cta_indptr[0] == 0 and sch.cta_indptr[-1] == n and np.all(np.diff(sch.cta_indptr) >= 0)
    by_pair = {}
    for i, (r, hb, s0, e0) in enumerate(seg.tolist()):
        by_pair.setdefault(r * head_blocks + hb, []).append((s0, e0, int(sch.segment_partial[i])))
    assert sorted(by_pair) == list(range(pairs)), "every (request, head block) has a segment"
    for p, segs in by_pair.items():
        r = p // head_blocks
        segs.sort()
        lo = min(visible[r], kv_lens[r])
        assert segs[0][0] == lo and segs[-1][1] == kv_lens[r]
        for (a0, a1, _), (b0, _, _) in zip(segs, segs[1:]):
            assert a1 == b0 and a1 > a0
        rows = [x[2] for x in segs]
        mi = sch.merge_indptr
        if len(segs) == 1:
            assert rows == [-1] and p not in sch.merge_pairs
        else:
            i = int(np.flatnonzero(sch.merge_pairs == p)[0])
            assert rows == list(range(mi[i], mi[i + 1]))  # contiguous, in token order
    assert np.all(np.diff(sch.merge_pairs) > 0) and sch.merge_indptr.size == sch.merge_pairs.size + 1
    assert sch.merge_indptr[0] == 0 and sch.merge_indptr[-1] == sch.num_partial_rows
    # balance: every CTA gets at most one quota of tokens
    load = [int((seg[a:b, 3] - seg[a:b, 2]).sum()) for a, b in zip(sch.cta_indptr[:-1], sch.cta_indptr[1:])]
    total = int(sum(max(0, l - v) for l, v in zip(kv_lens, visible))) * head_blocks
    even = max(-(-total // num_ctas), 64)
    assert sum(load) == total and max(load) <= sch.quota and sch.quota >= even
    assert -(-total // sch.quota) <= num_ctas


@pytest.mark.parametrize("kv_lens", [[8192], [131072], [0], [1], [4096] * 16, [2048] * 64, [512] * 512,
                                     [0, 1, 5, 1000, 70000, 3], list(range(0, 3000, 7)), [0, 0, 0]])
@pytest.mark.parametrize("head_blocks,num_ctas", [(8, 396), (1, 132), (16, 264)])
def test_schedule_covers_every_token_once_and_balances(kv_lens, head_blocks, num_ctas):
    kv = np.array(kv_lens)
    vis = np.zeros_like(kv)
    _check_schedule(kv, vis, head_blocks, num_ctas, scheduler.decode_schedule(kv, vis, head_blocks, num_ctas))


def test_schedule_window_only_visible_tokens():
    kv = np.array([32768, 10, 0])
    vis = np.maximum(0, kv - 1 - 999)  # window_left = 999
    sch = scheduler.decode_schedule(kv, vis, 8, 396)
    _check_schedule(kv, vis, 8, 396, sch)
    assert sch.segments[:, 2].min() >= 0 and (sch.segments[sch.segments[:, 0] == 0, 2] >= 32768 - 1000).all()


@pytest.mark.parametrize("batch,kv_len,num_ctas", [(512, 512, 528), (128, 1024, 528), (64, 2048, 528)])
def test_uniform_batch_cuts_no_pair_when_whole_pairs_fill_the_wave(batch, kv_len, num_ctas):
    """Whole pairs a CTA cost a few idle CTAs but no partial states and no merge launch (measured
    faster on the H100: bench/decode_probe.py)."""
    kv = np.full(batch, kv_len)
    sch = scheduler.decode_schedule(kv, np.zeros_like(kv), 8, num_ctas)
    _check_schedule(kv, np.zeros_like(kv), 8, num_ctas, sch)
    assert sch.quota % kv_len == 0 and sch.merge_pairs.size == 0 and sch.num_partial_rows == 0


def test_long_single_request_is_spread_over_all_ctas():
    sch = scheduler.decode_schedule(np.array([131072]), np.array([0]), 8, 396)
    loads = np.diff(sch.cta_indptr)
    assert (loads > 0).sum() >= 390 and sch.num_partial_rows > 300


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
    plan = plan_decode(p, indptr, indices, last, num_ctas=396)
    kv = plan.meta[plan.offsets["kv_lens"]: plan.offsets["kv_lens"] + 3]
    assert kv.tolist() == [16 + 5, 0, 2 * 16 + 16]
    assert plan.max_page == 9
    ix = plan.offsets["indices"]
    assert plan.meta[ix: ix + 5].tolist() == indices.tolist()
    assert all(v % 4 == 0 for v in plan.offsets.values())  # 16-byte aligned parts


@pytest.mark.parametrize("kw,err,match", [
    (dict(num_qo_heads=30), ValueError, r"num_qo_heads \(30\) must be a multiple of num_kv_heads \(8\)"),
    (dict(head_dim=100), ValueError, "head_dim: 100 is not supported"),
    (dict(head_dim=272), ValueError, "head_dim: 272 is not supported"),
    (dict(pos_encoding_mode="XPOS"), ValueError, "pos_encoding_mode: 'XPOS' is not one of 'NONE', 'ROPE_LLAMA', "
                                                 "'ALIBI'$"),
    (dict(pos_encoding_mode="ALIBI", logits_soft_cap=30.0), NotImplementedError,
     'logits_soft_cap: 30.0 with pos_encoding_mode "ALIBI" is not supported'),
    (dict(q_data_type="float32"), TypeError, "q_data_type: float32 is not supported"),
    (dict(kv_data_type="int8"), TypeError, "kv_data_type: int8 is not supported with q bfloat16"),
    (dict(page_size=0), ValueError, "page_size: expected a positive integer"),
    (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap: must be > 0"),
])
def test_param_errors(kw, err, match):
    with pytest.raises(err, match=match):
        _params(**kw)


@pytest.mark.parametrize("mode", ["NONE", "ROPE_LLAMA", "ALIBI"])
@pytest.mark.parametrize("kv_data_type", [None, "float8_e4m3fn"])
def test_alibi_decode_variant(mode, kv_data_type):
    """pos_encoding_mode "ALIBI": 16-bit and fp8 KV keep the tensor-core kernel; the last template argument of
    either kernel is the ALiBi bool (RoPE takes the CUDA-core kernel, without ALiBi). The
    mode comes back as params.pos_encoding_mode (what q_len_per_req > 1 plans its prefill with)."""
    from fi_cupy import decode
    p = _params(pos_encoding_mode=mode, kv_data_type=kv_data_type)
    assert (p.rope, p.alibi, p.pos_encoding_mode) == (mode == "ROPE_LLAMA", mode == "ALIBI", mode)
    main = decode.decode_variant(p, p.kv_dtype)[0].kernels[0]
    tc = mode != "ROPE_LLAMA"
    assert decode.uses_tensor_cores(p.q_dtype, p.kv_dtype, p.rope) == tc
    assert main.kernel == ("fic::batch_decode_tc_kernel" if tc else "fic::batch_decode_kernel")
    assert main.targs[-1] == ("true" if mode == "ALIBI" else "false")
    if not tc:
        assert main.targs[-2] == ("true" if mode == "ROPE_LLAMA" else "false")  # the RoPE bool before it
    # the plan is the same host schedule whatever the mode
    indptr, indices, last = np.array([0, 2, 2, 5]), np.array([7, 3, 1, 0, 9]), np.array([5, 0, 16])
    a, b = plan_decode(p, indptr, indices, last, 396), plan_decode(_params(kv_data_type=kv_data_type), indptr,
                                                                    indices, last, 396)
    assert np.array_equal(a.meta, b.meta) and a.offsets == b.offsets and a.params.alibi == (mode == "ALIBI")


def test_alibi_decode_programs_built_ahead():
    """all_programs has every decode variant with ALiBi (never with RoPE) for every head dim, group block
    and dtype pair: on tensor cores for 16-bit and fp8 KV, on CUDA cores where a GPU's shared memory is short."""
    from fi_cupy import decode
    from fi_cupy._core import dtypes as dt
    mains = [p.kernels[0] for p in decode.all_programs((64, 256))]
    alibi = [k for k in mains if k.targs[-1] == "true"]  # both kernels: the ALiBi bool last
    cuda_core = [k for k in alibi if k.kernel == "fic::batch_decode_kernel"]
    assert cuda_core and all(k.targs[-2] == "false" for k in cuda_core)  # RoPE and ALiBi together: never
    assert {k.targs[0] for k in cuda_core} == {256}  # the shared-memory fallback: not needed at 64
    tc = [k for k in alibi if k.kernel == "fic::batch_decode_tc_kernel"]
    assert {k.targs[3] for k in tc} == {dt.float16.cpp, dt.bfloat16.cpp, dt.float8_e4m3fn.cpp, dt.float8_e5m2.cpp}
    assert {k.targs[2] for k in tc} == {dt.float16.cpp, dt.bfloat16.cpp}
    assert {k.targs[1] for k in tc} == {k.targs[1] for k in cuda_core} == {1, 4, scheduler.MAX_HEADS_PER_BLOCK}


def test_plan_errors():
    p = _params()
    with pytest.raises(ValueError, match="last_page_len: request 0 has 1 pages and last_page_len 17"):
        plan_decode(p, np.array([0, 1]), np.array([0]), np.array([17]), 396)
    with pytest.raises(ValueError, match="indptr: must be non-decreasing"):
        plan_decode(p, np.array([0, 2, 1]), np.array([0, 1]), np.array([1, 1]), 396)
    with pytest.raises(ValueError, match="indices: has 1 entries but indptr"):
        plan_decode(p, np.array([0, 2]), np.array([0]), np.array([1]), 396)
    with pytest.raises(ValueError, match="indices: page indices must be >= 0"):
        plan_decode(p, np.array([0, 1]), np.array([-3]), np.array([1]), 396)
    with pytest.raises(ValueError, match="last_page_len: expected 2 entries"):
        plan_decode(p, np.array([0, 1, 2]), np.array([0, 1]), np.array([1]), 396)


def test_replan_same_batch_keeps_every_device_offset():
    """CUDA graphs: a re-plan with the same batch size moves nothing run() reads but the indices' length."""
    p = _params()
    a = plan_decode(p, np.array([0, 2, 3]), np.arange(3), np.array([5, 9]), num_ctas=396)
    b = plan_decode(p, np.array([0, 700, 701]), np.arange(701), np.array([16, 1]), num_ctas=396)
    assert a.offsets == b.offsets and a.partial_bytes() == b.partial_bytes()


def test_plan_pads_merge_indptr_to_capacity():
    """A CUDA graph launches a merge CTA for every cut pair a plan can have: those past the cut
    pairs must find an empty row range."""
    p = _params()
    plan = plan_decode(p, np.array([0, 2048]), np.arange(2048), np.array([16]), num_ctas=396)
    assert plan.num_merges == 8  # one request, 8 KV heads, each cut over many CTAs
    assert plan.merge_capacity == 396  # the grid a CUDA-graph run launches
    off = plan.offsets
    mp = plan.meta[off["merge_pairs"]: off["merge_pairs"] + 8]
    mi = plan.meta[off["merge_indptr"]: off["merge_indptr"] + 396 + 1]
    assert mp.tolist() == list(range(8))
    assert mi[0] == 0 and np.all(np.diff(mi[:9]) >= 2) and np.all(mi[8:] == mi[8])


def test_quota_aligns_with_uniform_lengths():
    """16 x 4096 tokens over 528 CTAs: 1024-token quotas give each CTA one segment."""
    sch = scheduler.decode_schedule(np.full(16, 4096), np.zeros(16), 8, 528)
    assert sch.quota == 1024 and np.all(np.diff(sch.cta_indptr) <= 1)


def _request_segments(sch, r):
    seg = sch.segments[sch.segments[:, 0] == r]
    return sorted(map(tuple, seg[:, 1:].tolist()))


@pytest.mark.parametrize("split", [0, 128, 1000])
def test_split_options_cut_a_request_the_same_whatever_the_batch(split):
    """disable_split_kv (0) / fixed_split_size (tokens): a request's segments, hence its output, depend
    on it alone; every token is covered once; 0 never cuts."""
    kv = np.array([5000, 3, 900, 0, 17, 4000, 1, 260] * 3)
    head_blocks, num_ctas = 8, 264
    full = scheduler.decode_schedule(kv, np.zeros_like(kv), head_blocks, num_ctas, split=split)
    alone = scheduler.decode_schedule(kv[:1], np.zeros(1, np.int64), head_blocks, num_ctas, split=split)
    assert _request_segments(full, 0) == _request_segments(alone, 0)
    for r, n in enumerate(kv.tolist()):
        for hb in range(head_blocks):
            segs = [s for s in _request_segments(full, r) if s[0] == hb]
            bounds = [s[1] for s in segs] + [segs[-1][2]]
            assert bounds[0] == 0 and bounds[-1] == n
            want = [0] if split == 0 or n == 0 else list(range(0, n, split))
            assert bounds[:-1] == want
    assert np.all(np.diff(full.cta_indptr) >= 0) and full.cta_indptr[-1] == full.segments.shape[0]
    if split == 0:
        assert full.merge_pairs.size == 0 and np.all(full.segment_partial == -1)


def test_plan_decode_grows_capacity_for_a_fixed_split_and_refuses_past_a_fixed_one():
    p = make_params(32, 8, 128, 16, "NONE", -1, None, "bfloat16", None, None, None, None)
    ip, ix, lp = np.array([0, 256]), np.arange(256), np.array([16])
    plan = plan_decode(p, ip, ix, lp, num_ctas=132, split=16)  # 256 chunks a head block: past the default caps
    assert plan.segment_capacity >= 256 * 2 and plan.merge_capacity >= 2
    with pytest.raises(ValueError, match="fixed_split_size: use_cuda_graph=True keeps"):
        plan_decode(p, ip, ix, lp, num_ctas=132, split=16, fixed_capacity=(10, 10, 10))


def _brute_quota(kv_lens, head_blocks, num_ctas, min_quota=scheduler.MIN_QUOTA):
    """_pick_quota's rule written out CTA by CTA: every candidate quota scored by its most loaded CTA
    (tokens + SEGMENT_COST a segment, a boundary inside a CTA starting a segment) plus MERGE_COST where
    a CTA starts inside a pair; ties go to the smallest quota."""
    bounds = np.concatenate([[0], np.cumsum(np.repeat(kv_lens, head_blocks))]).tolist()
    total = bounds[-1]
    q0 = max(-(-total // num_ctas), min_quota)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    cands = sorted({q for q in [q0, -(-q0 // longest) * longest] + [-(-longest // k) for k in range(1, 65)]
                    if q >= q0})
    best = None
    for q in cands:
        starts = range(0, total, q)
        load = max(min(q, total - s) + scheduler.SEGMENT_COST * (1 + sum(s < b < s + q for b in bounds))
                   for s in starts)
        score = load + scheduler.MERGE_COST * any(s not in bounds for s in starts)
        if best is None or score < best[0]:
            best = (score, q)
    return best[1]


@pytest.mark.parametrize("kv_lens,head_blocks,num_ctas", [
    ([1024] * 16, 8, 528), ([8192], 8, 528), ([5, 0, 300, 0, 7000, 64], 3, 132), ([1, 1, 1], 1, 132),
    ([4096, 100, 100, 100], 2, 264), ([0, 0, 40000, 0], 4, 1056), ([3000] * 40, 1, 132), ([65] * 7, 16, 300)])
def test_pick_quota_matches_the_rule_cta_by_cta(kv_lens, head_blocks, num_ctas):
    cum = np.concatenate([[0], np.cumsum(np.repeat(kv_lens, head_blocks))])
    assert scheduler._pick_quota(cum, num_ctas, scheduler.MIN_QUOTA) == _brute_quota(kv_lens, head_blocks, num_ctas)


@pytest.mark.parametrize("split", [None, 0, 50])
def test_segments_are_in_cta_pair_token_order_with_empty_pairs(split):
    """Empty pairs (kv_len 0, or a window that leaves nothing visible): the k-th on CTA k % num_ctas, after
    that CTA's other segments, which keep (pair, token) order; partial rows stay contiguous per pair, in
    token order."""
    kv = np.array([0, 700, 0, 0, 5000, 1, 0, 2600, 0])
    vis = np.array([0, 0, 0, 0, 4990, 1, 0, 100, 0])  # request 5: nothing visible
    head_blocks, num_ctas = 3, 132
    sch = scheduler.decode_schedule(kv, vis, head_blocks, num_ctas, split=split)
    if split is None:  # coverage and balance by quota (a fixed split balances chunks, not quotas)
        _check_schedule(kv, vis, head_blocks, num_ctas, sch)
    cta = np.repeat(np.arange(num_ctas), np.diff(sch.cta_indptr))
    seg = sch.segments
    empty = (seg[:, 2] == seg[:, 3]).tolist()
    keys = list(zip(cta.tolist(), empty, (seg[:, 0] * head_blocks + seg[:, 1]).tolist(), seg[:, 2].tolist()))
    assert keys == sorted(keys)
    empty_pairs = sorted(k[2] for k in keys if k[1])
    assert len(empty_pairs) == 6 * head_blocks  # requests 0, 2, 3, 5, 6, 8
    for c, _, p, _ in (k for k in keys if k[1]):
        assert c == empty_pairs.index(p) % num_ctas


def test_page_table_lengths_with_and_without_empty_requests():
    from fi_cupy.page import page_table_lengths
    kv, used, top = page_table_lengths(np.array([0, 2, 2, 5]), np.arange(6)[::-1], np.array([5, 0, 16]), 16)
    assert kv.tolist() == [21, 0, 48] and used.tolist() == [5, 4, 3, 2, 1] and top == 5
    kv, used, top = page_table_lengths(np.array([0, 1, 3]), None, np.array([16, 1]), 16)
    assert kv.tolist() == [16, 17] and used is None and top == -1
    assert page_table_lengths(np.array([0]), np.zeros(0, np.int64), np.zeros(0, np.int64), 16)[0].size == 0
    with pytest.raises(ValueError, match="request 1 has 0 pages and last_page_len 3"):
        page_table_lengths(np.array([0, 2, 2]), np.arange(2), np.array([5, 3]), 16)
    with pytest.raises(ValueError, match="request 1 has 1 pages and last_page_len 0"):
        page_table_lengths(np.array([0, 2, 3]), np.arange(3), np.array([5, 0]), 16)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64])
def test_largest_page_finds_the_largest_index_and_any_negative_one(dtype):
    """One pass over an unsigned view: the largest index, -1 for none, and a negative one found wherever it
    is (first, last, the type's minimum), as the two reductions it replaces."""
    from fi_cupy.page import largest_page
    rng = np.random.default_rng(7)
    for n in (0, 1, 5, 1000):
        a = rng.integers(0, np.iinfo(dtype).max // 2 + 1, n, dtype=dtype)
        assert largest_page(a, "indices") == (int(a.max()) if n else -1)
        assert largest_page(a[::-3], "indices") == (int(a[::-3].max()) if n else -1)  # a strided view
        if n and np.iinfo(dtype).min < 0:
            for at, v in ((0, -1), (n - 1, -7), (n // 2, np.iinfo(dtype).min)):
                b = a.copy()
                b[at] = v
                with pytest.raises(ValueError, match=f"^indices: page indices must be >= 0, got {v}$"):
                    largest_page(b, "indices")


def test_host_index_array_keeps_int32_and_int64():
    from fi_cupy._core import checks
    for dtype in (np.int32, np.int64):
        a = np.arange(4, dtype=dtype)
        assert checks.host_index_array("indices", a) is a
    for x in (np.arange(4, dtype=np.int16), np.arange(4, dtype=np.uint32), [0, 1, 2]):
        assert checks.host_index_array("indices", x).dtype == np.int64
    with pytest.raises(TypeError, match="^indices: expected an integer array, got dtype float32"):
        checks.host_index_array("indices", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="^indices: expected a 1-D array"):
        checks.host_index_array("indices", np.zeros((2, 2), np.int32))


@pytest.mark.parametrize("causal", [False, True])
def test_prefill_uncut_batch_gives_a_whole_kv_item_a_tile(causal):
    """As many query tiles as CTAs: nothing is cut, one item a tile over the whole KV range, longest first."""
    qo, kv = [300, 0, 17, 64, 1], [1100, 9, 40, 64, 0]
    sch = scheduler.prefill_schedule(qo, kv, 4, 2, 64, 4, causal)
    assert sch.merges.shape == (0, 8) and sch.merges.dtype == np.int32 and sch.num_partial_rows == 0
    items = sch.items
    assert items.dtype == np.int32 and sorted(map(tuple, items[:, :3].tolist())) == sorted(
        (r, h, p0) for r in range(5) for h in range(2) for p0 in range(0, qo[r] * 4, 64))
    assert np.all(items[:, 3] == -1) and np.all(items[:, 4] == 0) and np.all(items[:, 6:] == 0)
    assert items[:, 5].tolist() == [kv[r] for r in items[:, 0]]
    cost = [scheduler.prefill_tile_cost(qo[r], kv[r], 4, 64, causal)[p0 // 64] for r, _, p0 in items[:, :3].tolist()]
    assert cost == sorted(cost, reverse=True)


@pytest.mark.parametrize("smem_optin, d, kv, want", [
    (232448, 128, None, "tc"), (232448, 256, None, "tc"), (232448, 512, None, "wide"),  # H100 / H200
    (166912, 208, None, "tc"), (166912, 224, None, "cuda"), (166912, 512, "float8_e4m3fn", "wide"),  # A100
    (101376, 112, None, "tc"), (101376, 128, None, "cuda"), (101376, 256, None, "cuda"),  # sm_86 / sm_89
    (101376, 128, "float8_e5m2", "tc"), (101376, 144, "float8_e5m2", "cuda"),  # fp8: smaller raw stages
    (101376, 512, None, None), (101376, 512, "float8_e4m3fn", None),
])
def test_decode_variant_fits_the_gpus_shared_memory(monkeypatch, smem_optin, d, kv, want):
    """The decode kernel follows the GPU's shared memory a CTA (no GPU here: its properties are a stand-in):
    where the tensor-core kernel's pipeline does not fit, the CUDA-core kernel runs; head_dim 512 has no
    smaller kernel and is refused, naming head_dim and the bytes."""
    from fi_cupy import decode
    from fi_cupy._core import kernels
    monkeypatch.setitem(kernels._props, 7, {"cc": 89, "sms": 128, "name": "stand-in", "smem_optin": smem_optin,
                                            "smem_sm": smem_optin + 1024})
    p = _params(head_dim=d, kv_data_type=kv, num_qo_heads=32, num_kv_heads=4)
    if want is None:
        with pytest.raises(NotImplementedError, match=f"^head_dim: decode at {d} needs .* this GPU .* allows"):
            decode.decode_variant(p, p.kv_dtype, 7)
        return
    prog, smem = decode.decode_variant(p, p.kv_dtype, 7)
    kernel = {"tc": "fic::batch_decode_tc_kernel", "cuda": "fic::batch_decode_kernel",
              "wide": "fic::batch_decode_wide_kernel"}[want]
    assert prog.kernels[0].kernel == kernel and smem <= smem_optin
    assert prog in decode.all_programs([d])  # CI compiles what a GPU can pick


# The schedules written out pair by pair (issue 21 rewrote decode_schedule and _pick_quota for host time:
# these are the rules the rewrite keeps, output for output).

def _reference_quota(kv_lens, visible, head_blocks, num_ctas, min_quota=scheduler.MIN_QUOTA):
    """_pick_quota as it was: every candidate scored at once by the (candidates x CTAs) arrays."""
    pair_len = np.repeat(np.maximum(np.asarray(kv_lens) - np.minimum(visible, kv_lens), 0), head_blocks)
    cum = np.concatenate([[0], np.cumsum(pair_len)]).astype(np.int64)
    total = int(cum[-1])
    q0 = max(-(-total // num_ctas), min_quota)
    if total == 0:
        return q0
    longest = int(pair_len.max())
    cands = sorted({q for q in [q0, -(-q0 // longest) * longest] + [-(-longest // k) for k in range(1, 65)]
                    if q >= q0})
    return scheduler._score_all(cum, cands, total)[0] if len(cands) > 1 else q0


def _pair_pieces(start, n, quota, split):
    """Token-space (lo, hi) pieces of a pair of n tokens from `start`: cut at the quota boundaries inside
    it (split None), whole (0), or every `split` tokens from its start."""
    if split is None:
        cuts = [b for b in range((start // quota + 1) * quota, start + n, quota)]
    else:
        cuts = list(range(start + split, start + n, split)) if split else []
    bounds = [start] + cuts + [start + n]
    return list(zip(bounds, bounds[1:]))


def _reference_schedule(kv_lens, visible, head_blocks, num_ctas, quota, split):
    """(segments, segment_partial, cta_indptr, merge_pairs, merge_indptr) pair by pair: a piece goes to
    the CTA of its first token (a quota split) or of its middle token (a fixed split, balanced by tokens);
    the k-th empty pair is one empty segment on CTA k % num_ctas; segments in (CTA, empty, pair, token)
    order; partial rows numbered in that order, contiguous per cut pair."""
    rows, start, merge_pairs, merge_indptr, empties = [], 0, [], [0], 0
    total = sum(max(0, k - min(v, k)) for k, v in zip(kv_lens, visible)) * head_blocks
    balance = max(-(-total // num_ctas), 1)
    for r, (kv, v) in enumerate(zip(kv_lens, visible)):
        v = min(v, kv)
        for hb in range(head_blocks):
            p = r * head_blocks + hb
            if kv == v:
                rows.append((empties % num_ctas, True, p, (r, hb, v, v), False))
                empties += 1
                continue
            pieces = _pair_pieces(start, kv - v, quota, split)
            for lo, hi in pieces:
                cta = lo // quota if split is None else min((lo + hi) // 2 // balance, num_ctas - 1)
                rows.append((cta, False, p, (r, hb, lo - start + v, hi - start + v), len(pieces) > 1))
            start += kv - v
    rows.sort(key=lambda x: x[:3])  # stable: a pair's pieces keep their token order
    segments, partial, cut_rows = [], [], {}
    for _, _, p, seg, cut in rows:
        segments.append(seg)
        partial.append(sum(map(len, cut_rows.values())) if cut else -1)
        if cut:
            cut_rows.setdefault(p, []).append(partial[-1])
    for p in sorted(cut_rows):
        merge_pairs.append(p)
        merge_indptr.append(merge_indptr[-1] + len(cut_rows[p]))
    counts = np.bincount([x[0] for x in rows], minlength=num_ctas)
    return (np.array(segments, np.int32).reshape(-1, 4), np.array(partial, np.int32),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), np.array(merge_pairs, np.int32),
            np.array(merge_indptr, np.int32))


def _random_decode_batch(rng):
    """kv_lens, visible starts (None: none hidden), head_blocks, num_ctas, split: lengths 0, 1, mixed,
    uniform, one long among short ones; windows and arbitrary visible starts; batch 1..600."""
    b = int(rng.choice([1, 2, 3, 16, 33, 128, 600]))
    kind = int(rng.integers(0, 6))
    if kind == 0:
        kv = np.full(b, int(rng.choice([0, 1, 7, 64, 1000, 1024, 4096, 32768])))
    elif kind == 1:
        kv = rng.integers(0, 3, b)
    elif kind == 2:
        kv = rng.integers(0, 5000, b)
    elif kind == 3:
        kv = np.where(rng.random(b) < 0.3, 0, rng.integers(1, 100000, b))
    elif kind == 4:
        kv = rng.integers(1, 100, b)
        kv[rng.integers(0, b)] = int(rng.integers(1, 300000))
    else:
        kv = rng.choice([512, 1024, 2048], b)
    window = rng.random()
    if window < 0.25:  # a sliding window: every request past it has the same visible length
        vis = np.maximum(0, kv - 1 - int(rng.choice([0, 1, 99, 999, 4095])))
    elif window < 0.35:
        vis = rng.integers(0, 2000, b)
    else:
        vis = None
    return (kv, vis, int(rng.choice([1, 2, 3, 4, 8, 16])), int(rng.choice([1, 7, 132, 264, 528, 1056])),
            [None, None, None, 0, 1, 100, 1000][int(rng.integers(0, 7))])


@pytest.mark.parametrize("seed", range(4))
def test_decode_schedule_matches_the_pair_by_pair_rule(seed):
    """Random batches: the quota _pick_quota picks (candidates pruned by their floor, uniform pairs in
    closed form) is the one scoring every candidate at once picks, and decode_schedule's segments,
    partial rows, CTA ranges and merges are the pair-by-pair ones, dtypes included."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        kv, vis, head_blocks, num_ctas, split = _random_decode_batch(rng)
        visible = np.zeros_like(kv) if vis is None else vis
        total = int(np.maximum(kv - np.minimum(visible, kv), 0).sum()) * head_blocks
        if total // max(split or total or 1, 1) > 200_000:  # pieces enough for a Python loop
            continue
        sch = scheduler.decode_schedule(kv, vis, head_blocks, num_ctas, split=split)
        quota = _reference_quota(kv, visible, head_blocks, num_ctas) if split is None else max(-(-total // num_ctas), 1)
        assert sch.quota == quota
        want = _reference_schedule(kv.tolist(), visible.tolist(), head_blocks, num_ctas, quota, split)
        got = (sch.segments, sch.segment_partial, sch.cta_indptr, sch.merge_pairs, sch.merge_indptr)
        for name, g, w in zip(("segments", "segment_partial", "cta_indptr", "merge_pairs", "merge_indptr"), got, want):
            assert g.dtype == np.int32 and np.array_equal(g, w), name
        assert sch.num_partial_rows == int(want[4][-1]) and type(sch.num_partial_rows) is int


@pytest.mark.parametrize("length,pairs,num_ctas", [
    (1024, 128, 528), (1024, 8, 528), (1000, 128, 528), (1024, 4096, 528), (4095, 3, 132), (7, 600, 1056),
    (131072, 1, 132), (100, 9, 7), (65, 112, 300), (3000, 40, 132), (1, 5, 132), (3, 1000, 1),
    (4095, 600, 132)])
def test_uniform_quota_matches_the_rule_cta_by_cta(length, pairs, num_ctas):
    """Pairs of one length are scored in closed form (_uniform_score): the same quota as the rule CTA by
    CTA, and the same score as the array scoring for every candidate."""
    assert scheduler._pick_quota(np.arange(pairs + 1) * length, num_ctas, scheduler.MIN_QUOTA) == \
        _brute_quota([length] * pairs, 1, num_ctas)
    cum = np.arange(pairs + 1, dtype=np.int64) * length
    for q in {64, 65, 100, 249, 256, length, 2 * length, length + 1, max(1, length // 3), -(-pairs * length // 528)}:
        if q >= -(-pairs * length // num_ctas):
            assert scheduler._uniform_score(q, length, pairs) == \
                scheduler._quota_score(cum, q, pairs * length, length) == \
                scheduler._score_all(cum, [q], pairs * length)[1]


@pytest.mark.parametrize("seed", range(4))
def test_decode_quota_is_the_schedules_quota_and_knows_its_cuts(seed):
    """plan() on a GPU picks the quota alone (decode_quota) and leaves the schedule to the device: the same
    quota as decode_schedule's, and "a pair is cut" exactly when that schedule merges something (the
    merge is launched on that alone). Uniform batches take decode_quota's closed form."""
    rng = np.random.default_rng(100 + seed)
    for i in range(60):
        kv, vis, head_blocks, num_ctas, _ = _random_decode_batch(rng)
        if i % 3 == 0:  # a sliding window, as plan() derives it (the others: arbitrary visible starts)
            vis = np.maximum(0, kv - 1 - int(rng.choice([0, 5, 1000])))
        sch = scheduler.decode_schedule(kv, vis, head_blocks, num_ctas)
        assert scheduler.decode_quota(kv, vis, head_blocks, num_ctas) == (sch.quota, sch.merge_pairs.size > 0)


@pytest.mark.parametrize("kv_lens,window_left", [([1024] * 16, -1), ([1024] * 512, -1), ([0, 700, 5, 0, 3000], -1),
                                                 ([0, 700, 5, 0, 3000], 99), ([8192], -1), ([0, 0], -1)])
def test_plan_with_the_schedule_on_the_device(kv_lens, window_left):
    """plan_decode(on_device=True) (a wrapper's plan on a GPU) leaves the schedule parts to the kernel: the
    same layout as the host plan, the host's parts (page table, lengths, indices) from upload_from on, equal to
    the host plan's, the quota the host schedule uses, and a merge grid of the capacity exactly when that
    schedule cuts a pair."""
    p = _params(window_left=window_left)
    pages = [-(-n // 16) for n in kv_lens]
    indptr = np.concatenate([[0], np.cumsum(pages)])
    indices = np.random.default_rng(0).permutation(int(indptr[-1]))
    last = np.array([n - (k - 1) * 16 if k else 0 for n, k in zip(kv_lens, pages)])
    host = plan_decode(p, indptr, indices, last, num_ctas=528)
    dev = plan_decode(p, indptr, indices, last, num_ctas=528, on_device=True)
    assert dev.offsets == host.offsets and dev.meta.size == host.meta.size
    start = dev.upload_from
    assert start == dev.offsets["page_indptr"] > dev.offsets["empty_before"] and host.upload_from == 0
    assert np.array_equal(dev.meta[start:], host.meta[start:])
    vis = np.maximum(0, np.array(kv_lens) - 1 - window_left) if window_left >= 0 else None
    sch = scheduler.decode_schedule(kv_lens, vis, 8, 528)
    assert dev.quota == sch.quota and host.quota is None and dev.num_kv_heads_blocks == 8
    assert dev.num_merges == (dev.merge_capacity if sch.merge_pairs.size else 0)
    assert (dev.segment_capacity, dev.partial_capacity, dev.merge_capacity) == \
        scheduler.DecodeSchedule.capacity(len(kv_lens), 8, 528)
