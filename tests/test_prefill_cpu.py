"""Prefill on the CPU: the work schedule (every query tile and key visited once, KV cuts merged),
tile choice, shared-memory budget, and argument checks that run before any launch."""
import numpy as np
import pytest

from fi_cupy import prefill, scheduler
from fi_cupy._core import dtypes as dt


def _coverage(sch, qo_lens, kv_lens, group, hkv, rows):
    """(request, kv_head, tile) -> sorted list of KV ranges, and the partial rows used."""
    cover = {}
    for r, h, p0, prow, lo, hi, _, _ in sch.items:
        cover.setdefault((r, h, p0), []).append((lo, hi, prow))
    for key, ranges in cover.items():
        ranges.sort()
        r = key[0]
        assert ranges[0][0] == 0 and ranges[-1][1] == kv_lens[r], f"{key}: KV not covered: {ranges}"
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"{key}: gaps/overlaps {ranges}"
        assert (len(ranges) == 1) == (ranges[0][2] == -1)
    want = {(r, h, p0) for r in range(len(qo_lens)) for h in range(hkv)
            for p0 in range(0, qo_lens[r] * group, rows)}
    assert set(cover) == want
    return cover


@pytest.mark.parametrize("causal", [False, True])
def test_schedule_covers_every_tile_once(causal):
    qo, kv = [300, 0, 1, 64, 5], [1100, 9, 40, 64, 0]
    sch = scheduler.prefill_schedule(qo, kv, 4, 2, 128, 1000, causal)
    _coverage(sch, qo, kv, 4, 2, 128)


def test_schedule_cuts_long_kv_when_tiles_are_few():
    qo, kv = [3, 1], [131072, 600]
    sch = scheduler.prefill_schedule(qo, kv, 8, 1, 64, 264, True)
    cover = _coverage(sch, qo, kv, 8, 1, 64)
    chunks = cover[(0, 0, 0)]
    assert len(chunks) > 1 and all((hi - lo) % 64 == 0 or hi == 131072 for lo, hi, _ in chunks)
    assert all(hi - lo >= scheduler.PREFILL_MIN_CHUNK for lo, hi, _ in chunks[:-1])
    # The merge item names the same partial rows the chunks write.
    (r, h, p0, base, n, rows, _, _), = [m for m in sch.merges if m[0] == 0]
    assert n == len(chunks) and rows == 64 and [c[2] for c in chunks] == [base + i * rows for i in range(n)]
    assert sch.num_partial_rows == sum(m[4] * m[5] for m in sch.merges)
    assert len(cover[(1, 0, 0)]) == 1  # 600 keys: no cut


def test_schedule_orders_longest_first():
    sch = scheduler.prefill_schedule([4096], [4096], 1, 2, 128, 10, True)
    starts = sch.items[:, 2]
    assert starts[0] == 4096 - 128 and starts[-1] == 0  # causal: the last tile sees the most keys


def test_tiles_and_shared_memory():
    for d in prefill.SUPPORTED_HEAD_DIMS:
        for t in prefill.tile_shapes(d):
            for kv in (dt.bfloat16, dt.float8_e4m3fn):
                assert prefill.smem_bytes(d, t, kv) <= 163 * 1024  # fits an sm_80 CTA
    for d in prefill.SM90_HEAD_DIMS:
        assert prefill.smem_bytes(d, prefill.SM90_TILE, dt.bfloat16) <= 227 * 1024  # fits an sm_90 CTA
    assert prefill.pick_tile(128, 64).rows == 64 and prefill.pick_tile(128, 65).rows == 128
    assert prefill.pick_tile(128, 4096, prefill.SOFT_CAP).rows == 64  # large tile + tanh would spill
    assert prefill.pick_tile(128, 4096, prefill.CUSTOM_MASK).rows == 64
    assert prefill.pick_tile(128, 4096, 0, rope=True).rows == 64
    # width 256: 64 rows at any length (split stages, 64-key tiles); the tile (96 KB) fits the 99 KB an
    # sm_86 / sm_89 CTA gets, with fp8 K/V too (32-key tiles, 80 KB)
    for kv in (dt.bfloat16, dt.float8_e4m3fn):
        t = prefill.pick_tile(256, 4096, smem_limit=99 * 1024, kv_dtype=kv)
        assert t == prefill.pick_tile(256, 4096) == prefill.TileShape(1, 4)
        assert prefill.kv_tile(256, t, kv) == (64 if kv == dt.bfloat16 else 32)
        assert prefill.smem_bytes(256, t, kv) <= 99 * 1024
    # RoPE on the fly at 256: no split stages; the 8-warp tile, or on a 99 KB CTA the 64-row one (96 KB)
    assert prefill.pick_tile(256, 4096, rope=True) == prefill.TileShape(1, 8)
    t = prefill.pick_tile(256, 4096, rope=True, smem_limit=99 * 1024, kv_dtype=dt.bfloat16)
    assert t == prefill.TileShape(1, 4) and not prefill.split_stages(256, t, dt.bfloat16, rope=True)
    assert prefill.kv_tile(256, t, dt.bfloat16, rope=True) == 32
    assert prefill.smem_bytes(256, t, dt.bfloat16, rope=True) <= 99 * 1024
    # V/O width 128 (192 / 128 too): four warps of 32 rows; with a soft cap, mask or ALiBi the 64-row tile
    assert prefill.pick_tile(192, 4096, head_dim_vo=128) == prefill.TileShape(2, 4)
    assert prefill.kv_tile(192, prefill.TileShape(2, 4), dt.bfloat16, 128) == 32
    for flags in (prefill.SOFT_CAP, prefill.CUSTOM_MASK, prefill.ALIBI):
        assert prefill.pick_tile(192, 4096, flags, head_dim_vo=128) == prefill.TileShape(1, 4)
    for d, dv in prefill.HEAD_DIM_PAIRS:
        for t in prefill.tile_shapes(d, dv):
            assert prefill.smem_bytes(d, t, dt.bfloat16, dv) <= 163 * 1024


def test_widths_hold_every_head_dim():
    """Each head dim runs on the narrowest compiled width that holds it; 512 in two 256-column halves;
    head dims of one width share one program."""
    for d in prefill.SUPPORTED_HEAD_DIMS:
        w, wv, splits = prefill.widths(d)
        assert w in prefill.WIDTHS and w >= d and all(x < d for x in prefill.WIDTHS if x < w)
        assert wv * splits == w and splits == (2 if d == 512 else 1)
    assert prefill.widths(192, 128) == (192, 128, 1) and prefill.widths(128, 64) == (128, 64, 1)
    tile = prefill.tile_shapes(80)[1]
    same = [prefill.prefill_program(d, tile, dt.float16, dt.float16, True, False, 0) for d in (80, 96, 112, 128)]
    assert len(set(same)) == 1
    assert same[0] in prefill.all_programs()


def test_params_checks():
    ok = dict(num_qo_heads=8, num_kv_heads=2, head_dim_qk=128, head_dim_vo=None, causal=True, pos_encoding_mode="NONE",
              window_left=-1, logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None,
              q_data_type="bfloat16", kv_data_type=None, paged=True)
    p = prefill.make_params(**ok)
    assert p.group_size == 4 and abs(p.sm_scale - 128 ** -0.5) < 1e-12
    bad = [({"head_dim_qk": 40}, ValueError, "head_dim_qk: 40"), ({"head_dim_qk": 272}, ValueError, "head_dim_qk"),
           ({"head_dim_qk": 384}, ValueError, "head_dim_qk"),
           ({"num_qo_heads": 6, "num_kv_heads": 4}, ValueError, "num_qo_heads"),
           ({"head_dim_vo": 96}, NotImplementedError, "head_dim_vo: 96 with head_dim_qk 128"),
           ({"q_data_type": "float32"}, TypeError, "q_data_type"),
           ({"kv_data_type": "float8_e4m3fn", "head_dim_qk": 192, "head_dim_vo": 128}, TypeError, "kv_data_type"),
           ({"pos_encoding_mode": "ROPE_LLAMA", "head_dim_qk": 80}, NotImplementedError, "pos_encoding_mode"),
           ({"pos_encoding_mode": "ROPE_LLAMA", "head_dim_vo": 64}, NotImplementedError, "pos_encoding_mode"),
           ({"pos_encoding_mode": "XPOS"}, ValueError, "pos_encoding_mode: 'XPOS' is not one of 'NONE', 'ROPE_LLAMA', "
                                                      "'ALIBI'"),
           ({"pos_encoding_mode": "ALIBI", "logits_soft_cap": 30.0}, NotImplementedError,
            'logits_soft_cap: 30.0 with pos_encoding_mode "ALIBI" is not supported'),
           ({"logits_soft_cap": -1.0}, ValueError, "logits_soft_cap"), ({"causal": "yes"}, TypeError, "causal"),
           ({"window_left": 1.5}, TypeError, "window_left")]
    for change, exc, word in bad:
        with pytest.raises(exc, match=word):
            prefill.make_params(**{**ok, **change})
    assert prefill.make_params(**{**ok, "kv_data_type": "float8_e5m2"}).kv_dtype == dt.float8_e5m2
    assert not p.alibi and not p.rope
    alibi = prefill.make_params(**{**ok, "pos_encoding_mode": "ALIBI"})
    assert alibi.alibi and not alibi.rope and alibi.soft_cap == 0
    assert prefill.make_params(**{**ok, "pos_encoding_mode": "ALIBI", "logits_soft_cap": 0.0}).alibi  # 0: no cap


def test_plan_metadata_layout():
    p = prefill.make_params(8, 2, 128, None, True, "NONE", -1, None, None, None, None, "bfloat16", None, True, 16)
    qo = np.array([0, 100, 100, 130], np.int32)
    kv_ip = np.array([0, 7, 8, 10], np.int32)
    kv_lens = np.array([100, 9, 30], np.int32)
    idx = np.arange(10, dtype=np.int32)[::-1].copy()
    tile, _ = prefill.plan_tile(p, np.diff(qo), False)
    plan, cap = prefill.plan_prefill(p, qo, kv_ip, kv_lens, (idx, 9), tile, 264, None)
    m = plan.meta
    assert all(v % 4 == 0 for v in plan.offsets.values())  # 16-byte aligned parts
    n = m[plan.offsets["counts"]]
    items = m[plan.offsets["items"]: plan.offsets["items"] + 8 * n].reshape(-1, 8)
    assert n == plan.num_items and set(items[:, 0]) == {0, 2}  # request 1 has no queries
    np.testing.assert_array_equal(m[plan.offsets["qo_indptr"]: plan.offsets["qo_indptr"] + 4], qo)
    np.testing.assert_array_equal(m[plan.offsets["indices"]: plan.offsets["indices"] + 10], idx)
    assert plan.max_page == 9 and plan.tile.rows == 128
    # CUDA graphs: a second plan with the reserved capacity keeps every offset.
    cap["sizes"] = {k: 2 * v + 8 for k, v in cap["sizes"].items()}
    a, _ = prefill.plan_prefill(p, qo, kv_ip, kv_lens, (idx, 9), tile, 264, None, cap)
    b, _ = prefill.plan_prefill(p, np.array([0, 5, 6, 7], np.int32), kv_ip, kv_lens, (idx, 9), tile, 264, None,
                                cap)
    assert a.offsets == b.offsets and a.meta.size == b.meta.size and a.grid == b.grid


def test_standard_programs_are_the_plain_variants():
    std = prefill.standard_programs()
    assert std and all(p.kernels[0].targs[-2] == "false" and p.kernels[0].targs[-1] == 0 for p in std)
    assert len(prefill.all_programs()) > len(std)


def test_backend_choice():
    """backend="fa3" (the Hopper kernel) names what it cannot take; "fa2" always takes the portable
    kernel; "auto" falls back to it off sm_90a; unknown names are refused."""
    p = prefill.make_params(8, 2, 128, None, True, "NONE", -1, None, None, None, None, "bfloat16", None, True, 16)
    qo = np.array([4096])
    with pytest.raises(ValueError, match="sm_90a"):
        prefill.plan_tile(p, qo, False, "fa3", None)
    assert not prefill.plan_tile(p, qo, False, "auto", None)[0].sm90
    assert not prefill.plan_tile(p, qo, False, "fa2", None)[0].sm90
    rope = prefill.make_params(8, 2, 128, None, True, "ROPE_LLAMA", -1, None, None, None, None, "bfloat16", None,
                               True, 16)
    assert "ROPE_LLAMA" in prefill.sm90_unsupported(rope)
    d256 = prefill.make_params(8, 2, 256, None, True, "NONE", -1, None, None, None, None, "bfloat16", None, True, 16)
    assert "head_dim 256" in prefill.sm90_unsupported(d256)
    fp8 = prefill.make_params(8, 2, 128, None, True, "NONE", -1, None, None, None, None, "bfloat16", "float8_e4m3fn",
                              True, 16)
    assert "kv_data_type" in prefill.sm90_unsupported(fp8)
    assert prefill.sm90_unsupported(p) is None
    with pytest.raises(ValueError, match="backend"):
        prefill.check_backend("fa4")


def _alibi_params(**change):
    kw = dict(num_qo_heads=8, num_kv_heads=2, head_dim_qk=128, head_dim_vo=None, causal=True, pos_encoding_mode="ALIBI",
              window_left=-1, logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None,
              q_data_type="bfloat16", kv_data_type=None, paged=True, page_size=16)
    return prefill.make_params(**{**kw, **change})


@pytest.mark.parametrize("d", prefill.SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("custom_mask", [False, True])
def test_alibi_kernels(d, custom_mask, monkeypatch):
    """ALiBi runs on both kernels with the ALIBI variant flag: on an sm_90a device "fa3" and "auto" (rows past
    AUTO_MIN_ROWS) take the Hopper kernel at its head dims (64 / 128; "fa3" elsewhere is refused naming the
    head dim), "fa2" the portable tile."""
    from fi_cupy._core import kernels
    p = _alibi_params(head_dim_qk=d)
    qo = np.array([4096, 3])
    hopper_dim = d in prefill.SM90_HEAD_DIMS
    why = prefill.sm90_unsupported(p)
    assert why is None if hopper_dim else why.startswith("head_dim")
    monkeypatch.setattr(kernels, "device_arch", lambda device: "sm_90a")
    monkeypatch.setattr(kernels, "device_props", lambda device: {"cc": 90, "sms": 132, "smem_optin": 227 * 1024})
    want = prefill.ALIBI | (prefill.CUSTOM_MASK if custom_mask else 0)
    if hopper_dim:
        for backend in ("fa3", "auto"):
            tile, flags = prefill.plan_tile(p, qo, custom_mask, backend, 0)
            assert tile.sm90 and flags == want
        prog = prefill.prefill_program(d, tile, p.q_dtype, p.kv_dtype, True, False, flags)
        assert prog.kernels[0].kernel == "fic::prefill_sm90_kernel" and prog.kernels[0].targs[-1] == want
        assert prog in prefill.sm90_programs()  # CI compiles it
    else:
        with pytest.raises(ValueError, match=r"^backend: 'fa3' \(the Hopper kernel\) does not support head_dim"):
            prefill.plan_tile(p, qo, custom_mask, "fa3", 0)
    for backend in ("fa2",) if hopper_dim else ("auto", "fa2"):
        tile, flags = prefill.plan_tile(p, qo, custom_mask, backend, 0)
        assert not tile.sm90 and flags == want
        assert tile == prefill.pick_tile(d, 4096 * p.group_size, want)
        prog = prefill.prefill_program(d, tile, p.q_dtype, p.kv_dtype, True, False, flags)
        assert prog.kernels[0].kernel == "fic::prefill_kernel" and prog.kernels[0].targs[-1] == want


def test_alibi_flag_and_programs():
    """The ALIBI flag (4) in variant_flags and plan.flags, never beside RoPE or a soft cap in the programs
    built ahead of time; the ALiBi variants are not part of the standard (precompiled) set."""
    assert (prefill.SOFT_CAP, prefill.CUSTOM_MASK, prefill.ALIBI) == (1, 2, 4)
    p = _alibi_params()
    assert prefill.variant_flags(p, False) == prefill.ALIBI
    assert prefill.variant_flags(p, True) == prefill.ALIBI | prefill.CUSTOM_MASK
    assert prefill.variant_flags(_alibi_params(pos_encoding_mode="NONE"), False) == 0
    qo = np.array([0, 5, 6], np.int32)
    kv_ip = np.array([0, 1, 2], np.int32)
    tile, flags = prefill.plan_tile(p, np.diff(qo), False)
    plan, _ = prefill.plan_prefill(p, qo, kv_ip, np.array([9, 16], np.int32), (np.arange(2, dtype=np.int32), 1),
                                   tile, 264, None)
    assert plan.flags == flags == prefill.ALIBI and plan.params.alibi
    alibi_progs = [pr for pr in prefill.all_programs() if pr.kernels[0].targs[-1] & prefill.ALIBI]
    assert alibi_progs and all(pr.kernels[0].kernel == "fic::prefill_kernel" for pr in alibi_progs)
    assert all(pr.kernels[0].targs[-2] == "false" and not pr.kernels[0].targs[-1] & prefill.SOFT_CAP
               for pr in alibi_progs)  # no RoPE, no soft cap
    assert {pr.kernels[0].targs[-1] for pr in alibi_progs} == {prefill.ALIBI, prefill.ALIBI | prefill.CUSTOM_MASK}
    assert not [pr for pr in prefill.standard_programs() if pr.kernels[0].targs[-1] & prefill.ALIBI]


def test_schedule_snake_balances_a_persistent_grid():
    """Causal 4096 x 32 heads over 132 persistent CTAs: dealing rounds in a snake order balances
    the keys each CTA visits better than plain striding."""
    def worst(snake):
        sch = scheduler.prefill_schedule([4096], [4096], 1, 32, 128, 132, True, snake=snake)
        cost = scheduler.prefill_tile_cost(4096, 4096, 1, 128, True)[sch.items[:, 2] // 128]
        per_cta = np.bincount(np.arange(cost.size) % 132, weights=cost, minlength=132)
        return per_cta.max() / per_cta.mean()
    assert worst(True) < worst(False) and worst(True) < 1.04  # 1.125 striding, 1.031 snake


@pytest.mark.parametrize("split", [0, 100])
def test_prefill_split_options_cut_a_request_the_same_whatever_the_batch(split):
    qo, kv = [300, 7, 1, 2000, 64], [3000, 7, 900, 2000, 64]
    full = scheduler.prefill_schedule(qo, kv, 4, 2, 128, 1000, True, split=split)
    alone = scheduler.prefill_schedule(qo[:1], kv[:1], 4, 2, 128, 1000, True, split=split)

    def ranges(sch):
        return sorted((h, p0, lo, hi) for r, h, p0, _, lo, hi, _, _ in sch.items.tolist() if r == 0)
    assert ranges(full) == ranges(alone)
    chunks = {(lo, hi) for _, _, lo, hi in ranges(full)}
    if split == 0:
        assert chunks == {(0, 3000)} and full.merges.shape[0] == 0
    else:
        assert sorted(chunks) == [(c, min(c + 128, 3000)) for c in range(0, 3000, 128)]  # 100 rounded up to 64s


def _reference_prefill(qo, kv, group, hkv, rows, num_ctas, causal, min_chunk, snake, split):
    """prefill_schedule's items and merges written out tile by tile, chunk by chunk (issue 21 rewrote it
    for host time, output for output): a request's KV is cut into n chunks of `chunk` keys (multiples
    of 64) where the tiles alone do not fill num_ctas, or by a fixed split; items are sorted by the keys
    they visit, longest first (stable), then dealt in a snake for a persistent grid; an uncut batch of
    LOCALITY_WAVES waves or more goes request by request, each longest first."""
    tiles = [-(-q * group // rows) for q in qo]
    base = sum(tiles) * hkv
    want = max(1, -(-num_ctas // max(base, 1))) if base < num_ctas else 1
    items, merges, costs, prow = [], [], [], 0
    for r, (q, k) in enumerate(zip(qo, kv)):
        if split == 0 or (split is None and want == 1):
            n, chunk, cut = 1, k, False
        elif split is None:
            n = max(1, min(want, k // min_chunk))
            cut = n > 1
            chunk = -(-(-(-k // n)) // 64) * 64 if cut else k
            n = -(-k // chunk) if cut else 1
        else:
            chunk = -(-split // 64) * 64
            cut = k > chunk
            n, chunk = (-(-k // chunk), chunk) if cut else (1, k)
        for h in range(hkv):
            for t in range(tiles[r]):
                tile_cost = scheduler.prefill_tile_cost(q, k, group, rows, causal)[t]
                if cut:
                    merges.append((r, h, t * rows, prow, n, rows, 0, 0))
                for c in range(n):
                    lo, hi = c * chunk, min(c * chunk + chunk, k)
                    items.append((r, h, t * rows, prow + c * rows if cut else -1, lo, hi, 0, 0))
                    costs.append(max(0, min(hi, tile_cost) - lo))
                prow += n * rows if cut else 0
    order = sorted(range(len(items)), key=lambda i: -costs[i])
    uncut = split == 0 or (split is None and want == 1)
    if uncut and not snake and len(qo) > 1 and len(items) >= scheduler.LOCALITY_WAVES * num_ctas:
        # request by request (most keys first), each from its last tile, a tile's heads in order
        order = sorted(range(len(items)), key=lambda i: (-kv[items[i][0]], items[i][0], -items[i][2], items[i][1]))
    if snake:
        full = len(order) // num_ctas
        dealt = list(order)
        for i, item in enumerate(order):
            rnd, pos = divmod(i, num_ctas)
            dealt[rnd * num_ctas + (num_ctas - 1 - pos if rnd % 2 and rnd < full else pos)] = item
        order = dealt
    return (np.array([items[i] for i in order], np.int32).reshape(-1, 8), np.array(merges, np.int32).reshape(-1, 8),
            prow)


@pytest.mark.parametrize("seed", range(4))
def test_prefill_schedule_matches_the_tile_by_tile_rule(seed):
    """Random batches (alike requests, which take the closed form, and mixed ones; empty queries and
    KV; cut or not; split None / 0 / k; snake or not): the same items, merges and partial rows."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        b = int(rng.choice([1, 2, 3, 16, 33, 128, 600]))
        if rng.random() < 0.4:
            qo, kv = np.full(b, int(rng.choice([0, 1, 16, 100, 1000]))), np.full(b, int(rng.choice([0, 1, 64, 1024, 40000])))
        else:
            qo = np.where(rng.random(b) < 0.2, 0, rng.integers(1, 300, b))
            kv = np.where(rng.random(b) < 0.2, 0, qo + rng.integers(0, 9000, b))
        group, hkv, rows = int(rng.choice([1, 4, 5, 8])), int(rng.choice([1, 2, 8])), int(rng.choice([64, 128]))
        num_ctas, causal = int(rng.choice([1, 4, 132, 528, 2000])), bool(rng.integers(0, 2))
        min_chunk, snake = int(rng.choice([1, 256, 512])), bool(rng.random() < 0.3)
        split = [None, None, 0, 1, 100, 1000][int(rng.integers(0, 6))]
        if int((-(-qo * group // rows)).sum()) * hkv * (1 + int(kv.max(initial=0)) // max(split or 512, 64)) > 20_000:
            continue  # items enough for a Python loop
        sch = scheduler.prefill_schedule(qo, kv, group, hkv, rows, num_ctas, causal, min_chunk, snake, split)
        items, merges, prow = _reference_prefill(qo.tolist(), kv.tolist(), group, hkv, rows, num_ctas, causal,
                                                 min_chunk, snake, split)
        assert sch.items.dtype == sch.merges.dtype == np.int32
        assert np.array_equal(sch.items, items) and np.array_equal(sch.merges, merges)
        assert sch.num_partial_rows == prow and type(sch.num_partial_rows) is int


@pytest.mark.parametrize("uniform", [False, True])
def test_schedule_by_request_past_many_waves(uniform):
    """An uncut batch of at least LOCALITY_WAVES waves runs request by request: requests with the most keys
    first, each request's items together and longest first, a tile's KV heads side by side; fewer waves or
    one request stay longest first over the whole batch (the snake of a persistent grid: the tile-by-tile
    rule's test). Either way every (request, head, tile) appears once."""
    rng = np.random.default_rng(3)
    qo = np.full(24, 700) if uniform else rng.integers(1, 1500, 24)
    kv = qo + (0 if uniform else rng.integers(0, 300, 24))
    heads, rows = 4, 64
    tiles = (qo + rows - 1) // rows
    assert int(tiles.sum()) * heads >= scheduler.LOCALITY_WAVES * 8
    few = scheduler.prefill_schedule(qo, kv, 1, heads, rows, int(tiles.sum()) * heads, True)
    many = scheduler.prefill_schedule(qo, kv, 1, heads, rows, 8, True)
    snake = scheduler.prefill_schedule(qo, kv, 1, heads, rows, 8, True, snake=True)
    for sch in (few, many, snake):
        got = sorted(map(tuple, sch.items[:, :3].tolist()))
        assert got == sorted((r, h, t * rows) for r in range(qo.size) for h in range(heads) for t in range(tiles[r]))

    def cost(sch):
        return np.array([scheduler.prefill_tile_cost(qo[r], kv[r], 1, rows, True)[p // rows]
                         for r, _, p in sch.items[:, :3].tolist()])
    assert (np.diff(cost(few)) <= 0).all()  # longest first
    req, head, p0 = many.items[:, 0], many.items[:, 1], many.items[:, 2]
    firsts = req[np.r_[True, req[1:] != req[:-1]]]
    assert firsts.size == qo.size and (np.diff(kv[firsts]) <= 0).all()  # each request once, most keys first
    same = req[1:] == req[:-1]
    c = cost(many)
    assert (c[1:][same] <= c[:-1][same]).all()  # longest first within a request
    tie = same & (p0[1:] == p0[:-1])
    assert tie.any() and (head[1:][tie] == head[:-1][tie] + 1).all()  # a tile's heads side by side
    one = scheduler.prefill_schedule(qo[:1], kv[:1], 1, 64, rows, 1, True)  # one request: longest first
    assert (np.diff(cost(one)) <= 0).all()


def test_cuda_graph_plan_fills_its_table_buffers(monkeypatch):
    """A CUDA-graph paged prefill wrapper's plan() writes FlashInfer's table buffers: qo_indptr, the page
    indptr, the used page indices (int32 or int64 given: int32 written) and last_page_len, as given; and the
    metadata block. The device stands in (uploads recorded, an H100's properties)."""
    from test_core_cpu import FakeCudaArray, stub_h100_host
    stub_h100_host(monkeypatch)
    uploads = {}
    monkeypatch.setattr(prefill, "upload",
                        lambda host, ptr, device, stream, pinned=None: uploads.__setitem__(ptr, host.copy()))
    monkeypatch.setattr(prefill, "num_ctas", lambda params, tile, device, paged, flags: 264)
    names = ("qo_indptr_buf", "paged_kv_indptr_buf", "paged_kv_indices_buf", "paged_kv_last_page_len_buf")
    bufs = {n: FakeCudaArray((64,), (1,), code=0, bits=32, ptr=0x100000 * (i + 1)) for i, n in enumerate(names)}
    ws = FakeCudaArray((64 << 20,), None, code=1, bits=8, ptr=0x40000000)
    w = prefill.BatchPrefillWithPagedKVCacheWrapper(ws, use_cuda_graph=True, **bufs)
    qo, ip, lp = np.array([0, 3, 3, 8]), np.array([0, 2, 3, 6]), np.array([5, 16, 1])
    for dtype in (np.int32, np.int64):
        ix = np.array([9, 4, 7, 1, 2, 8, 30], dtype)  # one more than indptr uses
        uploads.clear()
        w.plan(qo, ip, ix, lp, 8, 2, 128, 16, causal=True, q_data_type="float16")
        for name, want in zip(names, (qo, ip, ix[:6], lp)):
            got = uploads[0x100000 * (names.index(name) + 1)]
            assert got.dtype == np.int32 and got.tolist() == want.tolist(), name
        assert len(uploads) == 5  # and the metadata block


@pytest.mark.parametrize("kv", [100, 5000])  # one chunk (nothing cut), and cut KV ranges with merges
def test_uniform_schedules_share_no_writable_memory(kv):
    """A uniform batch's items come from a memoised grid (scheduler._uniform_grid): each schedule's items
    are its own to write, the memoised grid and merges are read-only, and a schedule written over leaves
    the next one of the same shape as it was."""
    args = ([16] * 4, [kv] * 4, 4, 2, 64, 132, True)
    first = scheduler.prefill_schedule(*args)
    want = first.items.copy(), first.merges.copy()
    assert first.items.flags.writeable and not first.merges.flags.writeable
    assert (first.merges.size > 0) == (kv == 5000)
    first.items[:] = -5
    again = scheduler.prefill_schedule(*args)
    np.testing.assert_array_equal(again.items, want[0])
    np.testing.assert_array_equal(again.merges, want[1])
    assert not np.shares_memory(again.items, first.items)
