"""Prefill attention on tensor cores: `single_prefill_with_kv_cache`,
`BatchPrefillWithPagedKVCacheWrapper` and `BatchPrefillWithRaggedKVCacheWrapper` (cuda_src/prefill.cu).

Supported (README "Prefill"): head_dim every multiple of 16 from 16 to 256, and 512; head_dim_qk !=
head_dim_vo for 192 / 128 and 128 / 64; q fp16/bf16; KV the q dtype, or fp8 (e4m3fn, e5m2) with
equal dims; any GQA group; NHD and HND; causal (bottom-right aligned: with qo_len <
kv_len, query i sees keys 0 .. kv_len - qo_len + i), sliding window, custom masks (boolean or
packed little-endian), logits soft cap, RoPE on the fly (q at kv_len - qo_len + i, k at its index),
lse in base 2. Rows that see no key (empty KV, a mask hiding everything) give o = 0, lse = -inf.
A custom mask replaces the causal mask, as in FlashInfer (causal=True is then ignored).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from . import scheduler
from .quantization import MASK_DTYPES, packed_indptr, segment_packbits
from .page import (KVView, LAYOUTS, as_planned_dtype, cache_parts, check_cache_against, describe_kv_pair,
                   describe_paged_cache, page_table_from_block_tables, page_table_lengths)
from ._core import alibi, arrays, checks, kernels, memo, streams
from ._core.call import Call
from ._core.fastpath import Signatures, plain
from ._core.workspace import (PlanCache, PlannedWrapper, align, attention_outputs, attention_result, attention_sinks,
                              backend_arg, device_copy, kv_split, output_dtype, pack_meta, scale, single_call_meta,
                              upload)
from ._core import dtypes as dt
from ._core.fastdiv import fastdiv_params
from ._core.kernels import NULL, KernelSpec, Program, f32, f64, i32, i64, ptr, u32
from .variant import NO_VARIANT, AttentionVariant, check_variant_run, from_jit_args
from ._core.docs import RUN_OPTIONS, RUN_RETURNS, document

SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 16)) + (512,)
# The portable kernel's compiled Q/K widths: a head dim runs on the narrowest that holds it, the
# columns past it zero-filled in shared memory (cuda_src/prefill.cu PrefillCfg). 512 computes its
# output in two halves of 256 columns (blockIdx.y), each over the whole Q/K width.
WIDTHS = (64, 128, 192, 256, 512)
HEAD_DIM_PAIRS = ((192, 128), (128, 64))  # (head_dim_qk, head_dim_vo) pairs other than equal dims
ROPE_HEAD_DIMS = (64, 128, 256)  # RoPE on the fly: the kernel's pair layout needs the exact width
# Absorbed multi-head latent attention (fi_cupy/mla.py): Q/K are [ckv (512) | kpe (64)], 576 wide, the
# kpe columns read from their own arrays (q_pe, kpe_cache); V is ckv, 512 wide, in two halves of 256.
MLA_CKV, MLA_KPE = 512, 64
MLA_DIMS = (MLA_CKV + MLA_KPE, MLA_CKV)  # (head_dim_qk, head_dim_vo) of the kernel
SMEM_EVERY_GPU = kernels.SMEM_EVERY_GPU
Q_DTYPES = (dt.float16, dt.bfloat16)
FP8 = (dt.float8_e4m3fn, dt.float8_e5m2)
POS_ENCODINGS = ("NONE", "ROPE_LLAMA", "ALIBI")
# variant flags (cuda_src/common/prefill_tile.cuh kSoftCap, kCustomMask, kAlibi; ALiBi without a soft cap)
SOFT_CAP, CUSTOM_MASK, ALIBI = 1, 2, 4


# ---------------------------------------------------------------------------------------------
# Kernel variants


@dataclass(frozen=True)
class TileShape:
    mt: int      # 16-row slices a warp owns
    warps: int
    sm90: bool = False  # the Hopper kernel (cuda_src/prefill_sm90.cu): two warpgroups, wgmma
    # warp groups that split the output columns of the same rows (MLA's Hopper kernel,
    # cuda_src/mla_sm90.cu: 2); 1 elsewhere
    col_groups: int = 1

    @property
    def rows(self) -> int:
        return self.warps * self.mt * 16 // self.col_groups

    @property
    def threads(self) -> int:
        return self.warps * 32


def widths(head_dim: int, head_dim_vo: int | None = None) -> tuple:
    """(D, DV, splits) of the portable kernel for these head dims: its Q/K width, the V/O columns a CTA
    computes, and the CTAs (blockIdx.y) that share a row's output columns."""
    vo = head_dim if head_dim_vo is None else head_dim_vo
    if (head_dim, vo) == MLA_DIMS:
        return head_dim, 256, 2
    if vo != head_dim:
        return head_dim, vo, 1  # HEAD_DIM_PAIRS: exact widths
    w = next(w for w in WIDTHS if w >= head_dim)
    return (w, 256, 2) if w == 512 else (w, w, 1)


def tile_shapes(head_dim: int, head_dim_vo: int | None = None, rope: bool = False) -> tuple:
    """(large, small) query tiles: 128 packed rows, or 64 when every request's packed rows fit (at
    widths 256 and up always 64: four warps, two CTAs an SM, beat eight warps on 128 rows at 256 (see
    split_stages); at 512 and 576 a 128-row Q tile leaves no shared memory for K/V stages). RoPE on the
    fly at 256 takes no split stages: there the 8-warp tile stays the large one. Where the V/O width is
    128 (192/128 too), four warps of 32 rows each: H100, 192/128 ragged 64 x U[128, 2048] causal 16/16
    200 -> 225 TFLOP/s against eight warps of 16 rows, single causal L=4096 259 -> 300."""
    d, dv, _ = widths(head_dim, head_dim_vo)
    if d == 256 and rope:
        return TileShape(1, 8), TileShape(1, 4)
    if d >= 256:
        return TileShape(1, 4), TileShape(1, 4)
    return (TileShape(2, 4), TileShape(1, 4)) if d <= 128 or dv <= 128 else (TileShape(1, 8), TileShape(1, 4))


def pick_tile(head_dim: int, max_packed_rows: int, flags: int = 0, rope: bool = False,
              head_dim_vo: int | None = None, smem_limit: int | None = None, kv_dtype: dt.DType | None = None,
              variant: bool = False) -> TileShape:
    """The small tile when every request fits it, or where the large one runs out of registers: at
    V/O width 128 (192/128 too) the 128-row tile's accumulators leave no room for a soft cap, a custom
    mask or RoPE (some NVRTC versions spill there), nor at widths 64 and 128 for a custom variant's
    hooks; or out of shared memory (smem_limit: the device's bytes a CTA)."""
    large, small = tile_shapes(head_dim, head_dim_vo, rope)
    if smem_limit is not None and smem_bytes(head_dim, large, kv_dtype, head_dim_vo, rope) > smem_limit:
        return small
    if variant and widths(head_dim, head_dim_vo)[1] <= 128:
        return small  # the hooks' position math beside 128 rows' accumulators spilled (64 and 128 wide)
    return small if max_packed_rows <= small.rows or not _fits(head_dim, large, flags, rope, head_dim_vo) else large


def _fits(head_dim: int, tile: TileShape, flags: int, rope: bool, head_dim_vo: int | None = None) -> bool:
    return not ((flags or rope) and widths(head_dim, head_dim_vo)[1] == 128 and tile.mt == 2)


def split_stages(head_dim: int, tile: TileShape, kv_dtype: dt.DType, head_dim_vo: int | None = None,
                 rope: bool = False) -> bool:
    """PrefillCfg::kSplit: one K and one V buffer of 64 keys in place of two K/V stages (16-bit K/V,
    no RoPE on the fly, width 256, the 64-row tile)."""
    return (not tile.sm90 and not rope and kv_dtype not in FP8 and widths(head_dim, head_dim_vo) == (256, 256, 1)
            and (tile.mt, tile.warps) == (1, 4))


def kv_tile(head_dim: int, tile: TileShape, kv_dtype: dt.DType, head_dim_vo: int | None = None,
            rope: bool = False) -> int:
    """PrefillCfg::kKV: keys a tile; 64 with split stages; 32 where the O accumulators take 128
    registers a thread, or at V/O widths of 192 and more; 16 at Q/K width 512. PrefillSm90Cfg::kKV: 128;
    MlaSm90Cfg::kKV: 64."""
    if tile.sm90:
        return 64 if tile == MLA_SM90_TILE else 128
    if split_stages(head_dim, tile, kv_dtype, head_dim_vo, rope):
        return 64
    d, dv, _ = widths(head_dim, head_dim_vo)
    return 16 if d >= 512 else 32 if dv * tile.mt >= 256 or dv >= 192 else 64


def smem_bytes(head_dim: int, tile: TileShape, kv_dtype: dt.DType, head_dim_vo: int | None = None,
               rope: bool = False) -> int:
    """PrefillCfg::kSmemBytes: Q tile, and two 16-bit K/V stages (split stages: one; fp8: one widened,
    one raw).
    PrefillSm90Cfg::kSmemBytes: Q tile, three K/V stages, their six mbarriers, and 1 KB to align the
    tiles to 1024 bytes. MlaSm90Cfg::kSmemBytes: Q, two K stages, the P tile, the row exchange, four
    mbarriers and the 1 KB."""
    kv_tile_ = kv_tile(head_dim, tile, kv_dtype, head_dim_vo, rope)
    if tile == MLA_SM90_TILE:
        return 1024 + (tile.rows + 2 * kv_tile_) * head_dim * 2 + tile.rows * kv_tile_ * 2 + 2 * tile.rows * 4 + 4 * 8
    if tile.sm90:
        return 1024 + tile.rows * head_dim * 2 + 3 * 2 * kv_tile_ * head_dim * 2 + 6 * 8
    d, dv, _ = widths(head_dim, head_dim_vo)
    stage = kv_tile_ * (d + dv) * 2
    if split_stages(head_dim, tile, kv_dtype, head_dim_vo, rope):
        return tile.rows * d * 2 + stage
    return tile.rows * d * 2 + stage + (kv_tile_ * (d + dv) if kv_dtype in FP8 else stage)


def _merge_spec(q_dtype: dt.DType) -> KernelSpec:
    return KernelSpec("fic::prefill_merge_kernel", (q_dtype.cpp,))


def prefill_program(head_dim: int, tile: TileShape, q_dtype: dt.DType, kv_dtype: dt.DType, paged: bool,
                    rope: bool, flags: int, head_dim_vo: int | None = None,
                    variant: AttentionVariant | None = None) -> Program:
    """The main kernel (and, for the portable kernel, the merge kernel in the same module), with the
    launch's shared memory and KV tile checked against the kernel's constants at compile time. Head
    dims of one width (widths()) share a program. variant: a custom attention variant compiled into
    the kernel (its code appended to the source; not MLA's Hopper kernel)."""
    smem = smem_bytes(head_dim, tile, kv_dtype, head_dim_vo, rope)
    kv = kv_tile(head_dim, tile, kv_dtype, head_dim_vo, rope)
    if tile == MLA_SM90_TILE:
        cfg = "fic::MlaSm90Cfg"
        return Program("mla_sm90.cu", (KernelSpec("fic::mla_sm90_kernel", (q_dtype.cpp,)),),
                       ((f"{cfg}::kSmemBytes", smem), (f"{cfg}::kKV", kv), (f"{cfg}::kRows", tile.rows),
                        (f"{cfg}::kD", head_dim), (f"{cfg}::kCkv", head_dim_vo)))
    binding = (variant.binding,) if variant is not None else ()
    extra = variant._sources() if variant is not None else ()
    if tile.sm90:
        cfg = f"fic::PrefillSm90Cfg<{head_dim}>"
        return Program("prefill_sm90.cu", (KernelSpec("fic::prefill_sm90_kernel", (
            head_dim, q_dtype.cpp, kernels.cpp_bool(paged), flags) + binding),),
            ((f"{cfg}::kSmemBytes", smem), (f"{cfg}::kKV", kv)), extra)
    d, dv, _ = widths(head_dim, head_dim_vo)
    main = KernelSpec("fic::prefill_kernel", (d, dv, tile.mt, tile.warps, q_dtype.cpp, kv_dtype.cpp,
                                              kernels.cpp_bool(paged), kernels.cpp_bool(rope), flags) + binding)
    cfg = f"fic::PrefillCfg<{d}, {dv}, {tile.mt}, {tile.warps}, {kv_dtype.cpp}, {kernels.cpp_bool(rope)}>"
    return Program("prefill.cu", (main, _merge_spec(q_dtype)),
                   ((f"{cfg}::kSmemBytes", smem), (f"{cfg}::kKV", kv), (f"{cfg}::kRows", tile.rows)), extra)


def merge_program(q_dtype: dt.DType) -> Program:
    return Program("prefill.cu", (_merge_spec(q_dtype),))


# The Hopper kernel: sm_90a, head_dim 64 / 128, K/V in the q dtype, no RoPE on the fly (the others
# take the portable kernel). BACKENDS follow FlashInfer's names: "fa2" the portable mma.sync kernel,
# "fa3" the Hopper one, "auto" the Hopper one where it applies and some query tile is over 64 rows.
SM90_TILE = TileShape(1, 8, True)
# MLA's Hopper kernel (cuda_src/mla_sm90.cu): 64 rows, both warpgroups on them, each half of O's columns.
MLA_SM90_TILE = TileShape(1, 8, True, 2)
SM90_HEAD_DIMS = (64, 128)
BACKENDS = ("auto", "fa2", "fa3")
AUTO_MIN_ROWS = 64  # tests set it to 0 to run the Hopper kernel on every shape it takes


def sm90_unsupported(params: "PrefillParams") -> str | None:
    """Why the Hopper kernel cannot run these parameters (None: it can)."""
    if params.head_dim not in SM90_HEAD_DIMS:
        return f"head_dim {params.head_dim} (it takes {', '.join(map(str, SM90_HEAD_DIMS))})"
    if params.vo != params.head_dim:
        return f"head_dim_vo {params.vo} != head_dim_qk {params.head_dim}"
    if params.kv_dtype != params.q_dtype:
        return f"kv_data_type {params.kv_dtype} (it takes K/V in the q dtype)"
    if params.rope:
        return "pos_encoding_mode ROPE_LLAMA"
    return None


def sm90_programs() -> list:
    """Every Hopper instantiation (sm_90a only), MLA's last."""
    return [prefill_program(d, SM90_TILE, q, q, paged, False, flags)
            for d in SM90_HEAD_DIMS for q in Q_DTYPES for paged in (True, False)
            for flags in (0, SOFT_CAP, CUSTOM_MASK, SOFT_CAP | CUSTOM_MASK, ALIBI, ALIBI | CUSTOM_MASK)] + [
        prefill_program(MLA_DIMS[0], MLA_SM90_TILE, q, q, True, False, 0, MLA_DIMS[1]) for q in Q_DTYPES]


def kv_dtypes(q_dtype: dt.DType, head_dim: int, head_dim_vo: int) -> tuple:
    """The K/V dtypes prefill takes with these head dims: the q dtype, and fp8 with equal dims."""
    return (q_dtype,) + (FP8 if head_dim == head_dim_vo else ())


def all_programs() -> list:
    """Every instantiation the API can launch (CI compiles them all): a head dim per width."""
    out = []
    for d, dv in [(w, w) for w in WIDTHS] + list(HEAD_DIM_PAIRS):
        for rope in (False, True) if d == dv and d in ROPE_HEAD_DIMS else (False,):
            for tile in dict.fromkeys(tile_shapes(d, dv, rope)):
                for q in Q_DTYPES:
                    for paged in (True, False):
                        for kv in kv_dtypes(q, d, dv):
                            # ALiBi: no RoPE and no soft cap beside it
                            for flags in range(4) if rope else (0, 1, 2, 3, ALIBI, ALIBI | CUSTOM_MASK):
                                if _fits(d, tile, flags, rope, dv):
                                    out.append(prefill_program(d, tile, q, kv, paged, rope, flags, dv))
    return out + mla_programs()


def mla_programs() -> list:
    """MLA's instantiations: paged, K/V in the q dtype, no RoPE, soft cap, mask or ALiBi (causal is a
    runtime flag)."""
    d, dv = MLA_DIMS
    return [prefill_program(d, tile, q, q, True, False, 0, dv) for tile in dict.fromkeys(tile_shapes(d, dv))
            for q in Q_DTYPES]


def standard_programs() -> list:
    """What `python -m fi_cupy precompile` builds: no RoPE, no soft cap, no custom mask, at the common widths
    (64, 128, 256, equal head dims), fp8 K/V on the paged path only: the set of before the other widths came,
    so precompiling takes no longer (--all builds everything)."""
    def standard(p):
        d, dv, _, _, q, kv, paged, rope, flags = p.kernels[0].targs
        return rope == "false" and flags == 0 and d == dv and d in ROPE_HEAD_DIMS and (paged == "true" or kv == q)
    return [p for p in all_programs() if standard(p)]


# ---------------------------------------------------------------------------------------------
# Parameters and plan (host side)


@dataclass
class PrefillParams:
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    q_dtype: dt.DType
    kv_dtype: dt.DType
    causal: bool
    window_left: int
    soft_cap: float
    sm_scale: float
    rope: bool
    rope_scale: float
    rope_theta: float
    page_size: int = 0  # 0: ragged
    alibi: bool = False  # pos_encoding_mode "ALIBI": FlashInfer's slopes (_core/alibi.py)
    head_dim_vo: int = 0  # 0: head_dim
    variant: AttentionVariant | None = None  # a custom attention variant (fi_cupy/variant.py)

    @property
    def vo(self) -> int:
        """head_dim_vo: V's and the output's head dim."""
        return self.head_dim_vo or self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads


@memo.of_plain_args  # plan() checks the same options every step
def make_params(num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo, causal, pos_encoding_mode, window_left,
                logits_soft_cap, sm_scale, rope_scale, rope_theta, q_data_type, kv_data_type, paged: bool,
                page_size: int = 0, has_mask: bool = False, variant: AttentionVariant | None = None) -> PrefillParams:
    """The checked per-batch constants. As in FlashInfer, a custom mask replaces the causal mask (mask
    mode CUSTOM): `causal` is ignored when one is given (has_mask). variant: the options a custom
    variant owns (its logits) are refused beside it."""
    num_qo_heads = checks.positive_int("num_qo_heads", num_qo_heads)
    num_kv_heads = checks.positive_int("num_kv_heads", num_kv_heads)
    checks.heads(num_qo_heads, num_kv_heads)
    d = checks.positive_int("head_dim_qk", head_dim_qk)
    checks.head_dim(d, SUPPORTED_HEAD_DIMS, "head_dim_qk")
    vo = d if head_dim_vo is None else checks.positive_int("head_dim_vo", head_dim_vo)
    if vo != d and (d, vo) not in HEAD_DIM_PAIRS:
        raise NotImplementedError(f"head_dim_vo: {vo} with head_dim_qk {d} is not supported; head_dim_vo equals "
                                  f"head_dim_qk, or (head_dim_qk, head_dim_vo) is one of "
                                  f"{', '.join(f'{a}/{b}' for a, b in HEAD_DIM_PAIRS)}")
    checks.choice("pos_encoding_mode", pos_encoding_mode, POS_ENCODINGS)
    if pos_encoding_mode == "ROPE_LLAMA" and (d != vo or d not in ROPE_HEAD_DIMS):
        raise NotImplementedError(f"pos_encoding_mode: 'ROPE_LLAMA' (RoPE on the fly) takes head_dim "
                                  f"{', '.join(map(str, ROPE_HEAD_DIMS))} with head_dim_vo equal; got {d}/{vo}: apply "
                                  f"RoPE to q and k first (fi_cupy.apply_rope_pos_ids) and plan with 'NONE'")
    q_dtype = dt.as_dtype(q_data_type, "q_data_type")
    if q_dtype not in Q_DTYPES:
        raise TypeError(f"q_data_type: {q_dtype} is not supported; expected float16 or bfloat16")
    kv_dtype = q_dtype if kv_data_type is None else dt.as_dtype(kv_data_type, "kv_data_type")
    allowed = kv_dtypes(q_dtype, d, vo)
    if kv_dtype not in allowed:
        why = "" if kv_dtype not in FP8 else f" (fp8 K/V: head_dim_vo equal to head_dim_qk; got {d}/{vo})"
        raise TypeError(f"kv_data_type: {kv_dtype} is not supported with q {q_dtype}{why}; expected "
                        f"{' or '.join(str(k) for k in allowed)}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    wl, cap, sm, rs, rt = checks.attention_options(d, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta)
    checks.alibi_without_soft_cap(pos_encoding_mode, cap)
    if variant is not None:
        variant._refuse_owned(pos_encoding_mode, sm_scale, cap)
    return PrefillParams(num_qo_heads, num_kv_heads, d, q_dtype, kv_dtype, bool(causal) and not has_mask, wl, cap, sm,
                         pos_encoding_mode == "ROPE_LLAMA", rs, rt, page_size, pos_encoding_mode == "ALIBI",
                         0 if vo == d else vo, variant)


@dataclass
class PrefillPlan:
    params: PrefillParams
    batch_size: int
    total_qo: int
    tile: TileShape
    num_items: int
    num_merges: int
    num_partial_rows: int
    max_page: int           # paged: largest page index (-1 if none); ragged: kv_indptr[-1]
    meta: np.ndarray        # int32 metadata, parts at `offsets` (16-byte aligned)
    offsets: dict
    partial_capacity: int   # partial rows the workspace holds
    grid: int
    merge_grid: int
    mask: object = None     # packed custom mask (device array) and its info, or None

    @property
    def flags(self) -> int:
        return variant_flags(self.params, self.mask is not None)

    def partial_bytes(self) -> int:
        rows = self.partial_capacity
        return align(rows * self.params.vo * 4) + align(rows * 4)


def variant_flags(params: PrefillParams, custom_mask: bool) -> int:
    return (SOFT_CAP if params.soft_cap > 0 else 0) | (CUSTOM_MASK if custom_mask else 0) | (ALIBI if params.alibi else 0)


def plan_prefill(params: PrefillParams, qo_indptr: np.ndarray, kv_indptr: np.ndarray, kv_lens: np.ndarray,
                 pages: tuple | None, tile: TileShape, num_ctas: int, mask_offsets: np.ndarray | None,
                 capacity: dict | None = None, split: int | None = None, alloc=None) -> tuple:
    """(PrefillPlan without mask, sizes) for host metadata. kv_indptr: page indptr (paged) or token
    offsets (ragged). pages (paged): (the used page indices, kv_indptr[-1] of them; the largest, checked
    by page.page_table_lengths). capacity (CUDA graphs): fixed part sizes, so every device address stays
    put. alloc: pack_meta's."""
    batch = qo_indptr.size - 1
    qo_lens = qo_indptr[1:] - qo_indptr[:-1]  # slicing, not np.diff: plan() runs every step
    # CUDA graphs keep one persistent grid of num_ctas CTAs (else a CTA an item): deal it in a snake.
    min_chunk = scheduler.MLA_MIN_CHUNK if tile == MLA_SM90_TILE else scheduler.PREFILL_MIN_CHUNK
    sch = scheduler.prefill_schedule(qo_lens, kv_lens, params.group_size, params.num_kv_heads, tile.rows,
                                     num_ctas, params.causal, min_chunk, snake=capacity is not None, split=split)
    counts = np.array([sch.items.shape[0], sch.merges.shape[0], 0, 0], dtype=np.int32)
    idx, max_page = pages if pages is not None else (np.zeros(0, np.int32), -1)
    # int64 offsets as int32 pairs; none: zeros (pack_meta's for a part without values)
    moff = None if mask_offsets is None else mask_offsets.astype(np.int64).view(np.int32)
    parts = [("counts", counts, 4), ("items", sch.items.ravel(), sch.items.size),
             ("merges", sch.merges.ravel(), sch.merges.size), ("qo_indptr", qo_indptr, batch + 1),
             ("kv_indptr", kv_indptr, batch + 1), ("kv_lens", kv_lens, batch), ("mask_offset", moff, 2 * batch),
             ("indices", idx, idx.size)]
    sizes = {n: size for n, _, size in parts}
    if capacity is not None:
        for n, _, size in parts:
            if size > capacity["sizes"][n]:
                raise ValueError(f"use_cuda_graph=True: this plan needs {size} entries of '{n}' metadata but the "
                                 f"first plan reserved {capacity['sizes'][n]}; create a new wrapper for larger batches")
        sizes = capacity["sizes"]
    meta, offsets = pack_meta([(n, a, sizes[n]) for n, a, _ in parts], alloc)
    part_cap = sch.num_partial_rows if capacity is None else capacity["partial"]
    if sch.num_partial_rows > part_cap:
        raise ValueError("use_cuda_graph=True: this plan cuts more KV ranges than the first plan; create a new "
                         "wrapper")
    n_items, n_merges = sch.items.shape[0], sch.merges.shape[0]
    if capacity is None:
        # An item a CTA: the hardware hands them out longest first as SMs free up.
        grid, merge_grid = max(n_items, 1), max(n_merges, 1)
    else:
        grid, merge_grid = capacity["grid"], capacity["merge_grid"]
    plan = PrefillPlan(params, batch, int(qo_indptr[-1]), tile, n_items, n_merges, sch.num_partial_rows,
                       max_page, meta, offsets, part_cap, grid, merge_grid)
    return plan, {"sizes": sizes, "partial": part_cap, "grid": grid, "merge_grid": merge_grid}


def check_backend(backend) -> str:
    return backend_arg(backend, BACKENDS)


# pick_tile's answers by its arguments (it is a pure function of them): plan() picks a tile every step.
_pick_tile_memo = functools.lru_cache(maxsize=256)(pick_tile)
_smem_bytes_memo = functools.lru_cache(maxsize=256)(smem_bytes)


def plan_tile(params: PrefillParams, qo_lens: np.ndarray, custom_mask: bool, backend: str = "fa2",
              device: int | None = None, batch_invariant: bool = False) -> tuple:
    """(tile, variant flags) for a batch: the Hopper tile where `backend` asks for it (or "auto" allows
    it), else the portable tile from the longest request's packed rows. batch_invariant (a split-KV
    option given): a tile that does not depend on the other requests (the large one)."""
    flags = variant_flags(params, custom_mask)
    if (params.head_dim, params.vo) == MLA_DIMS and backend != "fa2":
        arch = kernels.device_arch(device) if device is not None else None
        if arch == "sm_90a":
            return MLA_SM90_TILE, flags
        if backend == "fa3":
            raise ValueError(f"backend: 'fa3' (the Hopper MLA kernel) needs sm_90a, not this device ({arch}); use "
                             f"'fa2' or 'auto'")
    rows = int(qo_lens.max(initial=0)) * params.group_size
    if batch_invariant:
        rows = 1 << 30
    if backend != "fa2":
        why = sm90_unsupported(params)
        if why is None:
            arch = kernels.device_arch(device) if device is not None else None
            if arch != "sm_90a":
                why = f"this device ({arch}; it needs sm_90a)"
        if backend == "fa3" and why is not None:
            raise ValueError(f"backend: 'fa3' (the Hopper kernel) does not support {why}; use 'fa2' or 'auto'")
        if why is None and (backend == "fa3" or rows > AUTO_MIN_ROWS):
            return SM90_TILE, flags
    tile = _pick_tile_memo(params.head_dim, rows, flags, params.rope, params.vo, variant=params.variant is not None)
    if device is None or _smem_bytes_memo(params.head_dim, tile, params.kv_dtype, params.vo,
                                          params.rope) <= SMEM_EVERY_GPU:
        return tile, flags
    limit = kernels.device_props(device)["smem_optin"]
    tile = pick_tile(params.head_dim, rows, flags, params.rope, params.vo, limit, params.kv_dtype,
                     params.variant is not None)
    need = smem_bytes(params.head_dim, tile, params.kv_dtype, params.vo, params.rope)
    if need > limit:
        raise NotImplementedError(f"head_dim_qk: {params.head_dim} (head_dim_vo {params.vo}) needs "
                                  f"{need} bytes of shared memory a CTA; this GPU allows {limit}")
    return tile, flags


def num_ctas(params: PrefillParams, tile: TileShape, device: int, paged: bool, flags: int) -> int:
    """One wave of the prefill kernel on `device` (compiles / loads the kernel; memoised by what the
    program is made of: plan() asks every step)."""
    key = (params.head_dim, params.vo, params.q_dtype, params.kv_dtype, params.rope, params.variant, tile, paged, flags,
           device)
    got = _num_ctas.get(key)
    if got is None:
        prog = prefill_program(params.head_dim, tile, params.q_dtype, params.kv_dtype, paged, params.rope, flags,
                               params.vo, params.variant)
        fn = kernels.functions(prog, device)[prog.kernels[0]]
        occ = fn.occupancy(tile.threads, smem_bytes(params.head_dim, tile, params.kv_dtype, params.vo, params.rope))
        got = _num_ctas[key] = kernels.device_props(device)["sms"] * max(occ, 1)
    return got


_num_ctas: dict = {}  # num_ctas's answers


# ---------------------------------------------------------------------------------------------
# Launch


def launch_prefill(c: Call, plan: PrefillPlan, meta_ptr: int, partial_ptr: int, q: arrays.ArrayInfo, kv: KVView,
                   paged: bool, o: arrays.ArrayInfo, l_info, k_scale: float, v_scale: float,
                   always_merge: bool = False, sinks: arrays.ArrayInfo | None = None, pe: tuple = (),
                   variant_args: tuple = ()) -> None:
    """Queue the prefill kernel, and the merge of cut KV ranges, on Call `c`. No allocation, no sync.
    meta_ptr / partial_ptr: the plan's metadata and partial states, fixed while the plan is. sinks:
    attention-sink logits (attention_sinks) or None. pe (MLA): (q_pe ArrayInfo, kpe_cache ArrayInfo), whose
    columns follow q's and the cache's at width 576. variant_args: a custom variant's extra run()
    arguments (tensors, then scalars)."""
    p = plan.params
    prog = prefill_program(p.head_dim, plan.tile, p.q_dtype, kv.dtype, paged, p.rope, plan.flags, p.vo, p.variant)
    main = kernels.functions(prog, q.device)[prog.kernels[0]]
    mprog = prog if len(prog.kernels) > 1 else merge_program(p.q_dtype)
    merge = kernels.functions(mprog, q.device)[mprog.kernels[-1]]
    meta = ptr(meta_ptr, stable=True)
    off = {k: ptr(meta, 4 * v) for k, v in plan.offsets.items()}
    part_o = ptr(partial_ptr, stable=True)
    part_lse = ptr(part_o, align(plan.partial_capacity * p.vo * 4))
    splits = 1 if plan.tile.sm90 else widths(p.head_dim, p.vo)[2]
    _, mul, shift = fastdiv_params(max(p.page_size, 1))
    mask_ptr = ptr(plan.mask[1].ptr, stable=True) if plan.mask is not None else None
    c.launch(main, (plan.grid, splits), (plan.tile.threads,), [
        ptr(q), i64(q.strides[0]), i64(q.strides[1]),
        ptr(kv.k_ptr), ptr(kv.v_ptr), i64(kv.stride_page), i64(kv.stride_slot), i64(kv.stride_head),
        ptr(off["qo_indptr"]), ptr(off["kv_indptr"]), ptr(off["indices"]), ptr(off["kv_lens"]),
        ptr(mask_ptr), ptr(off["mask_offset"]), ptr(off["items"]), ptr(off["counts"]),
        ptr(o), i64(o.strides[0]), i64(o.strides[1]), ptr(l_info), ptr(part_o), ptr(part_lse),
        i32(p.num_qo_heads), i32(p.group_size), u32(max(p.page_size, 1)), u32(mul), u32(shift),
        i32(int(p.causal)), i32(p.window_left), f32(p.sm_scale * k_scale), f32(p.soft_cap), f32(v_scale),
        f32(1.0 / p.rope_scale), f64(math.log2(p.rope_theta)), ptr(sinks),
        ptr(alibi.device_slopes(p.num_qo_heads, q.device, c.stream), stable=True) if p.alibi else NULL,
        i32(p.head_dim), i32(p.vo), *(i64(s) for s in kv.v_strides),
        *((ptr(pe[0]), i64(pe[0].strides[0]), i64(pe[0].strides[1]), ptr(pe[1]), i64(pe[1].strides[0]),
           i64(pe[1].strides[1])) if pe else (NULL, i64(0), i64(0), NULL, i64(0), i64(0))),
    ] + ([] if plan.tile == MLA_SM90_TILE else [NO_VARIANT if p.variant is None else p.variant._pack(
        c, variant_args, meta_ptr + 4 * plan.offsets["qo_indptr"], meta_ptr + 4 * plan.offsets["kv_lens"],
        p.num_qo_heads, p.num_kv_heads)]), smem=smem_bytes(p.head_dim, plan.tile, kv.dtype, p.vo, p.rope))
    if always_merge or plan.num_merges:
        # a CTA of 128 threads per 128 (row, 8 dims) pieces of a tile (prefill_merge_kernel's blockIdx.y)
        c.launch(merge, (plan.merge_grid, -(-plan.tile.rows * (p.vo // 8) // 128)), (128,), [
            part_o, part_lse, off["merges"], ptr(off["counts"], 4), off["qo_indptr"],
            ptr(o), i64(o.strides[0]), i64(o.strides[1]), ptr(l_info), i32(p.num_qo_heads), i32(p.group_size),
            ptr(sinks), i32(p.vo),
        ])




def _check_q(q: arrays.ArrayInfo, p: PrefillParams, total: int) -> None:
    checks.dtype_in(q, Q_DTYPES)
    if q.dtype != p.q_dtype:
        raise TypeError(f"q: dtype {q.dtype} does not match the planned q_data_type {p.q_dtype}")
    if q.ndim != 3 or q.shape[1:] != (p.num_qo_heads, p.head_dim) or q.shape[0] < total:
        raise ValueError(f"q: expected shape (n, {p.num_qo_heads}, {p.head_dim}) with n >= qo_indptr[-1] = {total} "
                         f"(rows past it are left alone: CUDA graphs keep one buffer), got {q.shape}")
    checks.last_dim_contiguous(q)
    checks.vector_aligned(q)


def _prepare_mask(custom_mask, packed_custom_mask, qo_lens: np.ndarray, kv_lens: np.ndarray, stream,
                  current_of=None, target=None, device: int = 0):
    """(packed mask object, ArrayInfo, byte offsets per request, byte indptr) or None. A boolean mask is
    packed here (little-endian, per request), as FlashInfer's plan() does: on the device, or on the
    host for a numpy mask (multi-item scoring builds one). target: a uint8 device buffer (CUDA graphs'
    custom_mask_buf) the packed mask is copied into, so the kernel reads a fixed address."""
    if custom_mask is None and packed_custom_mask is None:
        return None
    sizes = qo_lens.astype(np.int64) * kv_lens.astype(np.int64)
    bit_indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    byte_indptr = packed_indptr(bit_indptr)
    if packed_custom_mask is None and isinstance(custom_mask, np.ndarray):
        flat = custom_mask.reshape(-1)
        if flat.size != bit_indptr[-1]:
            raise ValueError(f"custom_mask: expected {bit_indptr[-1]} elements (sum of qo_len * kv_len over the "
                             f"requests, flattened row-major), got {flat.size}")
        host = np.concatenate([np.packbits(flat[bit_indptr[i]:bit_indptr[i + 1]].astype(bool), bitorder="little")
                               for i in range(sizes.size)] or [np.zeros(0, np.uint8)])
        packed_custom_mask = arrays.empty("cupy", (max(host.size, 1),), dt.uint8, device, stream)
        upload(host, arrays.describe(packed_custom_mask, "custom_mask (packed)").ptr, device, stream)
    elif packed_custom_mask is None:
        info = arrays.describe(custom_mask, "custom_mask", stream, current_of)
        checks.dtype_in(info, MASK_DTYPES)
        if info.size != bit_indptr[-1]:
            raise ValueError(f"custom_mask: expected {bit_indptr[-1]} elements (sum of qo_len * kv_len over the "
                             f"requests, flattened row-major), got {info.size}")
        flat = custom_mask.reshape(-1) if info.ndim != 1 or not info.is_contiguous() else custom_mask
        packed_custom_mask, _ = segment_packbits(flat, bit_indptr, bitorder="little",
                                                 stream=stream if current_of is None else None)
    pm = arrays.describe(packed_custom_mask, "packed_custom_mask", stream, current_of)
    if pm.dtype != dt.uint8:
        raise TypeError(f"packed_custom_mask: expected uint8, got {pm.dtype}")
    checks.contiguous(pm)
    if pm.size < byte_indptr[-1]:
        raise ValueError(f"packed_custom_mask: expected {byte_indptr[-1]} bytes (each request's qo_len * kv_len "
                         f"bits padded to a byte), got {pm.size}")
    if target is not None:
        if target.size < byte_indptr[-1]:
            raise ValueError(f"custom_mask_buf: holds {target.size} bytes; this plan's packed mask has "
                             f"{byte_indptr[-1]}")
        device_copy(pm, target, int(byte_indptr[-1]), stream)
        return target.obj, target, byte_indptr[:-1], byte_indptr
    return packed_custom_mask, pm, byte_indptr[:-1], byte_indptr


# ---------------------------------------------------------------------------------------------
# Wrappers


_PLAN_OPTIONS = ("causal", "pos_encoding_mode", "use_fp16_qk_reduction", "window_left", "logits_soft_cap",
                 "sm_scale", "rope_scale", "rope_theta")  # what FlashInfer's legacy forward() may override


# FlashInfer's cuDNN / trtllm-gen length arguments that plan() checks against the indptrs (_check_lengths)
_LENGTH_ARGS = ("seq_lens_q", "seq_lens", "max_token_per_sequence", "max_sequence_kv", "uniform_q_len")


class _PrefillWrapper(PlannedWrapper):
    """Shared by the paged and ragged wrappers: FlashInfer's constructor, plan() options, CUDA-graph
    capacities and buffers, outputs, launch, and the legacy forward() calls."""
    family = "prefill"
    _paged = True
    _table_buffers: tuple = ()  # FlashInfer's index buffers, in the order plan() fills them

    def __init__(self, float_workspace_buffer, kv_layout: str, use_cuda_graph: bool, buffers: dict, backend: str,
                 jit_args, jit_kwargs, variant_owns_mask):
        self._backend = check_backend(backend)
        checks.unsupported("jit_kwargs", jit_kwargs)
        checks.unsupported("variant_owns_mask", variant_owns_mask, (False,))
        # a custom attention variant (fi_cupy/variant.py): its extra arguments follow run()'s positional ones
        self._variant = None if jit_args is None else from_jit_args(jit_args, type(self).__name__)
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, None, LAYOUTS)
        # CUDA graphs: FlashInfer's kernels read these buffers and plan() fills them; plan() fills them
        # too, and the kernel reads the packed custom mask from custom_mask_buf (a fixed address).
        self._buffers = {}
        for name, buf in buffers.items():
            if buf is not None:
                info = arrays.describe(buf, name)
                checks.dtype_is(info, dt.uint8 if name == "custom_mask_buf" else dt.int32,
                                "uint8" if name == "custom_mask_buf" else "int32 (FlashInfer's index dtype)")
                checks.ndim(info, 1, "(n,)")
                checks.contiguous(info)
                checks.same_device(info, self._ws)
                self._buffers[name] = info
        self._last_plan = None  # (tables, keyword arguments): forward() re-plans from them
        self._mask_store = None  # CUDA graphs without custom_mask_buf: the packed mask's fixed home

    @document('Use another workspace buffer.')
    def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer=None) -> None:
        """Use another workspace from now on; the current plan is dropped (plan again)."""
        super().reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._capacity = None  # CUDA graphs: metadata sizes, grid and tile fixed by the first plan

    @document('The backend the last plan runs.', returns="backend : str\n    \"fa3\" or \"fa2\".")
    def resolved_backend(self) -> str:
        """The backend the last plan runs: "fa3" (the Hopper kernel) or "fa2"; before a plan, the one
        asked for."""
        if self._plan is None:
            return self._backend
        return "fa3" if self._plan.tile.sm90 else "fa2"

    @document("Accepted for FlashInfer's API; nothing to prewarm.")
    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        """Nothing to prewarm: the kernels take the cache's strides at run time, for any layout."""
        checks.choice("variant", variant, ("independent",))

    def _options(self, kw: dict, has_mask: bool) -> tuple:
        """(params, split) of plan()'s keyword arguments, checked; the options we cannot honour refused."""
        params = make_params(kw["num_qo_heads"], kw["num_kv_heads"], kw["head_dim_qk"], kw["head_dim_vo"],
                             kw["causal"], kw["pos_encoding_mode"], kw["window_left"], kw["logits_soft_cap"],
                             kw["sm_scale"], kw["rope_scale"], kw["rope_theta"], kw["q_data_type"], kw["kv_data_type"],
                             self._paged, kw.get("page_size", 0), has_mask=has_mask, variant=self._variant)
        checks.flag("use_fp16_qk_reduction", kw["use_fp16_qk_reduction"])  # a permission: we reduce in float32
        checks.flag("non_blocking", kw["non_blocking"])
        output_dtype(kw["o_data_type"], params.q_dtype)
        split = kv_split(kw["fixed_split_size"], kw["disable_split_kv"], max(params.page_size, 1))
        # a variant's rows are formed whole (OutputTransform sees the finished row): no KV range is cut
        return params, (0 if self._variant is not None else split)

    def _check_lengths(self, kw: dict, qo: np.ndarray, kv_lens: np.ndarray) -> None:
        """FlashInfer's cuDNN / trtllm-gen length arguments, where given, must agree with the indptrs."""
        if all(kw.get(k) is None for k in _LENGTH_ARGS):  # plan() runs every step
            return
        qo_lens = qo[1:] - qo[:-1]
        for name, want in (("seq_lens_q", qo_lens), ("seq_lens", kv_lens)):
            if kw.get(name) is not None:
                got = checks.host_int_array(name, kw[name])
                if got.shape != want.shape or np.any(got != want):
                    raise ValueError(f"{name}: {got.tolist()[:8]} does not match the lengths the indptrs give "
                                     f"{want.tolist()[:8]}")
        for name, want, what in (("max_token_per_sequence", qo_lens, "query"),
                                 ("max_sequence_kv", kv_lens, "KV")):
            if kw.get(name) is not None and want.size and checks.int_arg(name, kw[name]) < want.max():
                raise ValueError(f"{name}: {kw[name]} is below the longest {what} length {int(want.max())}")
        if kw.get("uniform_q_len") is not None:
            u = checks.int_arg("uniform_q_len", kw["uniform_q_len"])
            if np.any(qo_lens != u):
                raise ValueError(f"uniform_q_len: {u}, but the query lengths are {qo_lens.tolist()[:8]}")

    def _mask_args(self, kw: dict, qo: np.ndarray, kv_lens: np.ndarray):
        """custom_mask, with FlashInfer's multi-item-scoring arguments turned into one (see multi_item)."""
        if kw["prefix_len_ptr"] is None and kw["token_pos_in_items_ptr"] is None:
            checks.unsupported("max_item_len_ptr", kw["max_item_len_ptr"])
            return kw["custom_mask"]
        if kw["custom_mask"] is not None or kw["packed_custom_mask"] is not None:
            raise ValueError("custom_mask: cannot be combined with the multi-item-scoring arguments (prefix_len_ptr, "
                             "token_pos_in_items_ptr), which define the mask")
        if kw["prefix_len_ptr"] is None or kw["token_pos_in_items_ptr"] is None:
            raise ValueError("prefix_len_ptr and token_pos_in_items_ptr: multi-item scoring needs both")
        from .multi_item import multi_item_mask
        prefix = checks.host_int_array("prefix_len_ptr", kw["prefix_len_ptr"])
        pos = checks.host_int_array("token_pos_in_items_ptr", kw["token_pos_in_items_ptr"])
        # max_item_len_ptr: a hint for FlashInfer's kernel (key tiles it may skip), checked, not needed here.
        most = None if kw["max_item_len_ptr"] is None else checks.host_int_array("max_item_len_ptr",
                                                                                  kw["max_item_len_ptr"])
        return multi_item_mask(np.diff(qo), kv_lens, prefix, pos,
                               checks.int_arg("token_pos_in_items_len", kw["token_pos_in_items_len"]),
                               max_item_lens=most)

    def _finish_plan(self, params, qo_indptr, kv_indptr, kv_lens, used_pages, custom_mask,
                     packed_custom_mask, stream, split=None, dry: bool = False):
        s = streams.resolve(stream, self._ws.framework, self._ws.device)
        qo_lens = qo_indptr[1:] - qo_indptr[:-1]
        # The tile before the mask: a backend that cannot run the plan is refused before packing (a launch).
        tile, flags = plan_tile(params, qo_lens, custom_mask is not None or packed_custom_mask is not None,
                                self._backend, self._ws.device, batch_invariant=split is not None)
        cap = self._capacity if self._use_cuda_graph else None
        if cap is not None:
            tile = cap["tile"]
        has_mask = custom_mask is not None or packed_custom_mask is not None
        target = self._mask_target(qo_lens, kv_lens, s) if has_mask and self._use_cuda_graph and not dry else None
        mask = _prepare_mask(custom_mask, packed_custom_mask, qo_lens, kv_lens, s, target=target,
                             device=self._ws.device)
        ctas = num_ctas(params, tile, self._ws.device, self._paged, flags)
        offsets = None if mask is None else mask[2]
        alloc = None if dry else self._pinned.empty
        plan, capacity = plan_prefill(params, qo_indptr, kv_indptr, kv_lens, used_pages, tile, ctas, offsets, cap,
                                      split, alloc)
        if self._use_cuda_graph and cap is None:
            # Room to grow: the grid is one wave and the metadata parts are sized generously.
            capacity["sizes"] = {k: max(2 * v, 1024) for k, v in capacity["sizes"].items()}
            capacity["partial"] = max(2 * capacity["partial"], 4 * ctas * tile.rows)
            capacity["grid"], capacity["merge_grid"], capacity["tile"] = ctas, ctas, tile
            plan, _ = plan_prefill(params, qo_indptr, kv_indptr, kv_lens, used_pages, tile, ctas, offsets, capacity,
                                   split, alloc)
            if not dry:
                self._capacity = capacity
        if mask is not None:
            plan.mask = (mask[0], mask[1])
        if dry:
            return plan.partial_bytes() + plan.meta.nbytes
        self._room_for(plan)
        upload(plan.meta, self._ws.ptr + plan.partial_bytes(), self._ws.device, s, self._pinned)
        if params.alibi:  # uploaded now, after every check: run() allocates nothing
            alibi.device_slopes(params.num_qo_heads, self._ws.device, s)
        if self._use_cuda_graph:
            pages = kv_indptr[1:] - kv_indptr[:-1]
            last_page = None if used_pages is None else \
                np.where(pages > 0, kv_lens - (pages - 1) * max(params.page_size, 1), 0)
            indices = None if used_pages is None else used_pages[0]
            tables = dict(zip(self._table_buffers, (qo_indptr, kv_indptr, indices, last_page)))
            if mask is not None:
                tables["mask_indptr_buf"] = mask[3]
            self._fill_buffers(tables, s)
        self._plan = plan

    def _mask_target(self, qo_lens: np.ndarray, kv_lens: np.ndarray, s: int):
        """CUDA graphs: where the packed mask goes, at an address that stays put across plans (a captured
        run reads it there): FlashInfer's custom_mask_buf, or a buffer of ours sized by the first masked
        plan, with room to grow."""
        buf = self._buffers.get("custom_mask_buf")
        if buf is not None:
            return buf
        need = int(packed_indptr(np.concatenate([[0], np.cumsum(qo_lens.astype(np.int64) * kv_lens)]))[-1])
        if self._mask_store is None:
            obj = arrays.empty("cupy", (max(2 * need, 1 << 16),), dt.uint8, self._ws.device, s)
            self._mask_store = arrays.describe(obj, "custom_mask (the wrapper's copy)")
        elif need > self._mask_store.size:
            raise ValueError(f"custom_mask: use_cuda_graph=True keeps the mask buffer of the first masked plan "
                             f"({self._mask_store.size} bytes packed); this one needs {need}: pass a larger "
                             f"custom_mask_buf, or create a new wrapper")
        return self._mask_store

    def _fill_buffers(self, tables: dict, s: int) -> None:
        """FlashInfer's plan() writes its index arrays into the CUDA-graph buffers: so do we."""
        for name, a in tables.items():
            buf = self._buffers.get(name)
            if buf is not None and a is not None and a.size:
                if a.size > buf.shape[0]:
                    raise ValueError(f"{name}: holds {buf.shape[0]} entries; this plan writes {a.size}")
                upload(np.ascontiguousarray(a, dtype=np.int32), buf.ptr, self._ws.device, s)

    def _signature_run(self, q, kv_arrays: tuple, describe_kv, out, lse, return_lse, k_scale, v_scale, enable_pdl,
                       stream, sinks=None, variant_args: tuple = ()):
        """run()'s one call path: a recorded call of this signature (fastpath.Signatures), else _run.
        kv_arrays: the K/V arrays of the call; describe_kv(c) their checked KVView on Call c. A custom
        variant's call packs its extra arguments anew each time (no recording)."""
        vs = scale("v_scale", v_scale)
        if self._plan.params.variant is not None:
            return self._run(q, describe_kv, out, lse, return_lse, k_scale, vs, enable_pdl, stream, sinks, variant_args)
        return self._sigs((q, *kv_arrays, out, lse, sinks), (k_scale, vs, return_lse, enable_pdl), stream,
                          lambda: self._run(q, describe_kv, out, lse, return_lse, k_scale, vs, enable_pdl, stream,
                                            sinks))

    def _run(self, q, describe_kv, out, lse, return_lse, k_scale, v_scale, enable_pdl, stream, sinks,
             variant_args: tuple = ()):
        plan = self._plan
        p = plan.params
        check_variant_run(p.variant, return_lse, sinks, k_scale)
        c = Call(q, stream, enable_pdl, "q")
        kv = describe_kv(c)
        qi = c.arg(q, "q")
        _check_q(qi, p, plan.total_qo)  # before outputs are made from q's shape
        out_obj, o, lse_obj, l_info = attention_outputs(c, qi, out, lse, return_lse,
                                                        "(qo_len, num_qo_heads, head_dim_vo)", "(qo_len, num_qo_heads)",
                                                        p.vo)
        self._launch(c, qi, kv, o, l_info, k_scale, v_scale, attention_sinks(c, sinks, p.num_qo_heads), variant_args)
        return attention_result(c, out_obj, lse_obj, return_lse)

    def _launch(self, c: Call, q: arrays.ArrayInfo, kv: KVView, o: arrays.ArrayInfo, l_info, k_scale: float,
                v_scale: float, sinks: arrays.ArrayInfo | None = None, variant_args: tuple = ()) -> None:
        """The planned kernels for q over kv into o / l_info, on Call c: run()'s work once its arguments are
        described (also one level of MultiLevelCascadeAttentionWrapper.run)."""
        plan = self._plan
        _check_q(q, plan.params, plan.total_qo)
        checks.same_device(q, self._ws)
        launch_prefill(c, plan, self._ws.ptr + plan.partial_bytes(), self._ws.ptr, q, kv, self._paged, o, l_info,
                       k_scale, v_scale, self._use_cuda_graph, sinks, variant_args=variant_args)
        if plan.mask is not None:
            c.infos.append(plan.mask[1])

    def _begin_run(self, args, q_scale, k_scale, lse_base, lse_layout, kv_cache_sf) -> float:
        """The logits scale of a run(), its FlashInfer options checked."""
        if args and self._variant is None:
            raise TypeError(f"run(): unexpected extra positional arguments ({len(args)}); they are a custom "
                            f"variant's (jit_args), and this wrapper has none")
        checks.unsupported("lse_base", lse_base, ("log2",))
        checks.unsupported("lse_layout", lse_layout, ("NH",))
        checks.unsupported("kv_cache_sf", kv_cache_sf)
        if self._plan is None:
            raise RuntimeError("run() called before plan()")
        return scale("q_scale", q_scale) * scale("k_scale", k_scale)

    def _override(self, opts: dict) -> None:
        """forward(): FlashInfer's legacy call sets these options for this and later runs."""
        if self._last_plan is None:
            raise RuntimeError("forward() called before plan()")
        tables, kw = self._last_plan
        if any(kw[k] != v for k, v in opts.items()):
            self._plan_impl(tables, {**kw, **opts})


@document("Prefill (or append) attention for a batch over a paged KV cache (FlashInfer's API).")
class BatchPrefillWithPagedKVCacheWrapper(_PrefillWrapper):
    """Prefill (or append) attention for a batch of requests over a paged KV cache (FlashInfer's API).

    plan() once per batch: host work (tiles, KV cuts, one copy of the metadata into the workspace);
    it reads qo_indptr, paged_kv_indptr, paged_kv_indices and paged_kv_last_page_len on the host (pass
    numpy arrays; device arrays are copied back, one synchronisation). run() once per layer: no host
    sync, no allocation when `out` (and `lse`) are given; with use_cuda_graph=True every device
    address and the launch shape stay fixed across re-plans, so a captured graph replays a new plan.
    """
    _paged = True
    _table_buffers = ("qo_indptr_buf", "paged_kv_indptr_buf", "paged_kv_indices_buf", "paged_kv_last_page_len_buf")

    def __init__(self, float_workspace_buffer, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf=None, paged_kv_indptr_buf=None, paged_kv_indices_buf=None,
                 paged_kv_last_page_len_buf=None, custom_mask_buf=None, mask_indptr_buf=None, backend: str = "auto",
                 jit_args=None, jit_kwargs=None, variant_owns_mask: bool = False):
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, dict(
            qo_indptr_buf=qo_indptr_buf, paged_kv_indptr_buf=paged_kv_indptr_buf,
            paged_kv_indices_buf=paged_kv_indices_buf, paged_kv_last_page_len_buf=paged_kv_last_page_len_buf,
            custom_mask_buf=custom_mask_buf, mask_indptr_buf=mask_indptr_buf), backend, jit_args, jit_kwargs,
            variant_owns_mask)

    @document('Plan a prefill batch over a paged KV cache.')
    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
             num_kv_heads: int, head_dim_qk: int, page_size: int, head_dim_vo: int | None = None,
             custom_mask=None, packed_custom_mask=None, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: float | None = None, window_left: int = -1,
             logits_soft_cap: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, q_data_type="float16", kv_data_type=None, o_data_type=None,
             non_blocking: bool = True, prefix_len_ptr=None, token_pos_in_items_ptr=None,
             token_pos_in_items_len: int = 0, max_item_len_ptr=None, seq_lens=None, seq_lens_q=None,
             block_tables=None, max_token_per_sequence: int | None = None, max_sequence_kv: int | None = None,
             fixed_split_size: int | None = None, disable_split_kv: bool = False, uniform_q_len: int | None = None,
             *, stream=None) -> None:
        """Plan a batch: request b's queries are rows qo_indptr[b] .. qo_indptr[b + 1] of q, its KV the
        pages paged_kv_indices[paged_kv_indptr[b]:paged_kv_indptr[b + 1]] (or block_tables + seq_lens),
        the last holding paged_kv_last_page_len[b] tokens. causal is bottom-right aligned. A custom mask
        (boolean, flattened per request) or FlashInfer's multi-item-scoring arguments replace causal.
        disable_split_kv / fixed_split_size (pages): outputs bit-identical whatever the batch.
        use_fp16_qk_reduction is a permission we do not use (float32 throughout)."""
        kw = dict(locals())
        del kw["self"]
        tables = tuple(kw.pop(k) for k in ("qo_indptr", "paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len"))
        self._plan_impl(tables, kw)

    begin_forward = plan

    @document('The workspace bytes plan() would need for these arguments.', returns="need : (int, int)\n    (float workspace bytes, int workspace bytes): the int workspace is unused (0).")
    def workspace_size(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
                       num_kv_heads: int, head_dim_qk: int, page_size: int, head_dim_vo: int | None = None,
                       custom_mask=None, packed_custom_mask=None, causal: bool = False, pos_encoding_mode: str = "NONE",
                       use_fp16_qk_reduction: bool = False, sm_scale: float | None = None, window_left: int = -1,
                       logits_soft_cap: float | None = None, rope_scale: float | None = None,
                       rope_theta: float | None = None, q_data_type="float16", kv_data_type=None, o_data_type=None,
                       prefix_len_ptr=None, token_pos_in_items_ptr=None, token_pos_in_items_len: int = 0,
                       max_item_len_ptr=None, seq_lens=None, seq_lens_q=None, block_tables=None,
                       max_token_per_sequence: int | None = None, max_sequence_kv: int | None = None,
                       fixed_split_size: int | None = None, disable_split_kv: bool = False,
                       uniform_q_len: int | None = None) -> tuple:
        """(float workspace bytes, int workspace bytes) that plan() with these arguments needs; the int
        workspace is unused (0). Nothing is planned or written."""
        kw = dict(locals(), non_blocking=True, stream=None)
        del kw["self"]
        tables = tuple(kw.pop(k) for k in ("qo_indptr", "paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len"))
        return self._plan_impl(tables, kw, dry=True), 0

    def _plan_impl(self, tables: tuple, kw: dict, dry: bool = False):
        qo_indptr, indptr, indices, last_page_len = tables
        page_size = kw["page_size"] = checks.positive_int("page_size", kw["page_size"])
        qo = checks.host_int_array("qo_indptr", qo_indptr)
        checks.indptr("qo_indptr", qo)
        if kw["block_tables"] is not None and indptr is None:
            ip, ix, lp = page_table_from_block_tables(kw["block_tables"], kw["seq_lens"], page_size)
        else:
            checks.unsupported("block_tables", kw["block_tables"])  # with indptr given: one page table, not two
            ip = checks.host_int_array("paged_kv_indptr", indptr)
            ix = checks.host_index_array("paged_kv_indices", indices)
            lp = checks.host_int_array("paged_kv_last_page_len", last_page_len)
        checks.indptr("paged_kv_indptr", ip, qo.size)
        kv_lens, used, max_page = page_table_lengths(ip, ix, lp, page_size, "paged_kv_")
        self._check_lengths(kw, qo, kv_lens)
        if qo[-1] >= 2 ** 31:
            raise ValueError("qo_indptr[-1] (total queries) must be < 2**31")
        custom_mask = self._mask_args(kw, qo, kv_lens)
        params, split = self._options(kw, custom_mask is not None or kw["packed_custom_mask"] is not None)
        # int64 on: the checks above keep every value below 2**31, and packing casts to int32
        need = self._finish_plan(params, qo, ip, kv_lens, (used, max_page), custom_mask, kw["packed_custom_mask"],
                                 kw["stream"], split, dry)
        if dry:
            return need
        self._last_plan = (tables, kw)

    @document('Prefill attention of the planned batch.', returns=RUN_RETURNS, params=RUN_OPTIONS)
    def run(self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None,
            return_lse: bool = False, lse_base: str = "log2", lse_layout: str = "NH", enable_pdl=None,
            window_left=None, sinks=None, kv_cache_sf=None, skip_softmax_threshold_scale_factor=None,
            use_fp16_softmax=None, uses_spcompress=None, stream=None):
        """o like q (rows past qo_indptr[-1] are left alone), and lse (rows, num_qo_heads) in base 2
        with return_lse=True. q_scale, k_scale scale the logits and v_scale the output (fp8 caches)."""
        checks.unsupported("skip_softmax_threshold_scale_factor", skip_softmax_threshold_scale_factor)
        checks.unsupported("use_fp16_softmax", use_fp16_softmax, (None, False))
        checks.unsupported("uses_spcompress", uses_spcompress, (None, False))
        qk_scale = self._begin_run(args, q_scale, k_scale, lse_base, lse_layout, kv_cache_sf)
        p = self._plan.params
        if window_left is not None and window_left != p.window_left:
            raise NotImplementedError(f"window_left: run() got {window_left} but plan() used {p.window_left}; the "
                                      f"window is part of the plan's schedule")
        return self._signature_run(q, cache_parts(paged_kv_cache), lambda c: self._paged_view(c, paged_kv_cache), out,
                                   lse, return_lse, qk_scale, v_scale, enable_pdl, stream, sinks, args)

    def _paged_view(self, c: Call, paged_kv_cache) -> KVView:
        return self._check_view(describe_paged_cache(c, paged_kv_cache, self._kv_layout,
                                                     allow_vo=self._plan.params.vo != self._plan.params.head_dim))

    def _check_view(self, kv: KVView, indices_name: str = "paged_kv_indices") -> KVView:
        """A described cache against the plan (see check_cache_against); the view to launch with."""
        return _fp8_aligned(check_cache_against(kv, self._plan.params, self._plan.max_page, indices_name))

    @document("run() with return_lse=True.", returns="(o, lse) : (array, float32 array)\n    The output and its log-sum-exp (base 2), lse of shape q.shape[:-1].")
    def run_return_lse(self, q, paged_kv_cache, *args, **kwargs):
        """FlashInfer's name for run(..., return_lse=True); the keywords are run()'s."""
        return self.run(q, paged_kv_cache, *args, return_lse=True, **kwargs)

    @document("FlashInfer's legacy call: its options replace the plan's, then run().", returns="o : array\n    The attention output, q's shape and dtype.")
    def forward(self, q, paged_kv_cache, causal: bool = False, pos_encoding_mode: str = "NONE",
                use_fp16_qk_reduction: bool = False, k_scale=None, v_scale=None, window_left: int = -1,
                logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float | None = None,
                rope_theta: float | None = None):
        """FlashInfer's legacy call: its attention options replace the plan's (re-planned when they
        differ), then run()."""
        opts = dict(locals())
        self._override({k: opts[k] for k in _PLAN_OPTIONS})
        return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale)

    @document('forward() that also returns the log-sum-exp.', returns="(o, lse) : (array, float32 array)\n    The output and its log-sum-exp (base 2), lse of shape q.shape[:-1].")
    def forward_return_lse(self, q, paged_kv_cache, causal: bool = False, pos_encoding_mode: str = "NONE",
                           use_fp16_qk_reduction: bool = False, k_scale=None, v_scale=None, window_left: int = -1,
                           logits_soft_cap: float | None = None, sm_scale: float | None = None,
                           rope_scale: float | None = None, rope_theta: float | None = None):
        """forward() returning (o, lse)."""
        opts = dict(locals())
        self._override({k: opts[k] for k in _PLAN_OPTIONS})
        return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale, return_lse=True)


@document("Prefill attention for a batch whose K/V are ragged arrays (FlashInfer's API).")
class BatchPrefillWithRaggedKVCacheWrapper(_PrefillWrapper):
    """Prefill attention for a batch whose K/V are ragged arrays: request i's keys are rows
    kv_indptr[i] .. kv_indptr[i + 1] of k and v (total_kv, num_kv_heads, head_dim) [NHD] or
    (num_kv_heads, total_kv, head_dim) [HND]. plan()/run() as for the paged wrapper."""
    _paged = False
    _table_buffers = ("qo_indptr_buf", "kv_indptr_buf")

    def __init__(self, float_workspace_buffer, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf=None, kv_indptr_buf=None, custom_mask_buf=None, mask_indptr_buf=None,
                 backend: str = "auto", jit_args=None, jit_kwargs=None, variant_owns_mask: bool = False):
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, dict(
            qo_indptr_buf=qo_indptr_buf, kv_indptr_buf=kv_indptr_buf, custom_mask_buf=custom_mask_buf,
            mask_indptr_buf=mask_indptr_buf), backend, jit_args, jit_kwargs, variant_owns_mask)

    @document('Plan a prefill batch over ragged K/V.')
    def plan(self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             head_dim_vo: int | None = None, custom_mask=None, packed_custom_mask=None, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, window_left: int = -1,
             logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, q_data_type="float16", kv_data_type=None, o_data_type=None,
             non_blocking: bool = True, prefix_len_ptr=None, token_pos_in_items_ptr=None,
             token_pos_in_items_len: int = 0, max_item_len_ptr=None, fixed_split_size: int | None = None,
             disable_split_kv: bool = False, seq_lens=None, seq_lens_q=None, max_token_per_sequence: int | None = None,
             max_sequence_kv: int | None = None, v_indptr=None, o_indptr=None, uniform_q_len: int | None = None,
             *, stream=None) -> None:
        """Plan a batch: request b's queries are rows qo_indptr[b] .. qo_indptr[b + 1] of q, its keys and
        values rows kv_indptr[b] .. kv_indptr[b + 1] of k and v. Options as the paged wrapper's;
        fixed_split_size counts keys (a page is one key here). v_indptr / o_indptr: only kv_indptr /
        qo_indptr themselves (V and O laid out as K and Q)."""
        kw = dict(locals())
        del kw["self"]
        tables = (kw.pop("qo_indptr"), kw.pop("kv_indptr"))
        self._plan_impl(tables, kw)

    begin_forward = plan

    def _plan_impl(self, tables: tuple, kw: dict, dry: bool = False):
        qo = checks.host_int_array("qo_indptr", tables[0])
        kv = checks.host_int_array("kv_indptr", tables[1])
        checks.indptr("qo_indptr", qo)
        checks.indptr("kv_indptr", kv, qo.size)
        for name, same, like in (("v_indptr", kv, "kv_indptr"), ("o_indptr", qo, "qo_indptr")):
            if kw[name] is not None:
                other = checks.host_int_array(name, kw[name])
                if other.shape != same.shape or np.any(other != same):
                    raise NotImplementedError(f"{name}: only equal to {like} is supported (a separate layout)")
        if qo[-1] >= 2 ** 31 or kv[-1] >= 2 ** 31:
            raise ValueError("lengths must be < 2**31")
        kv_lens = np.diff(kv)
        self._check_lengths(kw, qo, kv_lens)
        custom_mask = self._mask_args(kw, qo, kv_lens)
        params, split = self._options(kw, custom_mask is not None or kw["packed_custom_mask"] is not None)
        need = self._finish_plan(params, qo.astype(np.int32), kv.astype(np.int32), kv_lens.astype(np.int32), None,
                                 custom_mask, kw["packed_custom_mask"], kw["stream"], split, dry)
        if dry:
            return need
        self._plan.max_page = int(kv[-1])
        self._last_plan = (tables, kw)

    @document('Prefill attention of the planned batch.', returns=RUN_RETURNS)
    def run(self, q, k, v, *args, q_scale=None, k_scale=None, v_scale=None, o_scale=None, out=None, lse=None,
            return_lse: bool = False, lse_base: str = "log2", lse_layout: str = "NH", enable_pdl=None,
            kv_cache_sf=None, stream=None):
        """o like q, and lse (rows, num_qo_heads) in base 2 with return_lse=True."""
        checks.unsupported("o_scale", o_scale, (None, 1.0))
        qk_scale = self._begin_run(args, q_scale, k_scale, lse_base, lse_layout, kv_cache_sf)
        return self._signature_run(q, (k, v), lambda c: self._ragged_view(c, k, v), out, lse, return_lse, qk_scale,
                                   v_scale, enable_pdl, stream, variant_args=args)

    def _ragged_view(self, c: Call, k, v) -> KVView:
        kvv, n = _kv_pair(c, k, v, self._kv_layout, self._plan.params)
        if n < self._plan.max_page:
            raise ValueError(f"k: has {n} rows but kv_indptr[-1] is {self._plan.max_page}")
        return kvv

    @document("run() with return_lse=True.", returns="(o, lse) : (array, float32 array)\n    The output and its log-sum-exp (base 2), lse of shape q.shape[:-1].")
    def run_return_lse(self, q, k, v, *args, **kwargs):
        """FlashInfer's name for run(..., return_lse=True); the keywords are run()'s."""
        return self.run(q, k, v, *args, return_lse=True, **kwargs)

    @document("FlashInfer's legacy call: its options replace the plan's, then run().", returns="o : array\n    The attention output, q's shape and dtype.")
    def forward(self, q, k, v, causal: bool = False, pos_encoding_mode: str = "NONE",
                use_fp16_qk_reduction: bool = False, window_left: int = -1, logits_soft_cap: float | None = None,
                sm_scale: float | None = None, rope_scale: float | None = None, rope_theta: float | None = None):
        """FlashInfer's legacy call: its attention options replace the plan's, then run()."""
        opts = dict(locals())
        self._override({k_: opts[k_] for k_ in _PLAN_OPTIONS})
        return self.run(q, k, v)

    @document('forward() that also returns the log-sum-exp.', returns="(o, lse) : (array, float32 array)\n    The output and its log-sum-exp (base 2), lse of shape q.shape[:-1].")
    def forward_return_lse(self, q, k, v, causal: bool = False, pos_encoding_mode: str = "NONE",
                           use_fp16_qk_reduction: bool = False, window_left: int = -1,
                           logits_soft_cap: float | None = None, sm_scale: float | None = None,
                           rope_scale: float | None = None, rope_theta: float | None = None):
        """forward() returning (o, lse)."""
        opts = dict(locals())
        self._override({k_: opts[k_] for k_ in _PLAN_OPTIONS})
        return self.run(q, k, v, return_lse=True)


def _kv_pair(c: Call, k, v, kv_layout: str, p: PrefillParams) -> tuple:
    """(KVView, rows) of ragged or single-request K/V on Call c, checked against the parameters."""
    kvv, n = describe_kv_pair(c, k, v, kv_layout, allow_vo=p.vo != p.head_dim)
    return _check_kv_against(kvv, p), n


def _fp8_aligned(kv: KVView) -> KVView:
    """fp8 K/V: the portable kernel copies 16 fp8 values (16 bytes) at a time."""
    if kv.dtype in FP8:
        for info in kv.infos:
            checks.vector_aligned(info, 16)
    return kv


def _check_kv_against(kvv: KVView, p: PrefillParams) -> KVView:
    """The K/V view to launch with (as_planned_dtype: uint8 planned as float8 is read as float8)."""
    kvv = as_planned_dtype(kvv, p.kv_dtype, "k")
    if (kvv.num_kv_heads, kvv.head_dim) != (p.num_kv_heads, p.head_dim):
        raise ValueError(f"k: (num_kv_heads, head_dim) = {(kvv.num_kv_heads, kvv.head_dim)} does not match "
                         f"{(p.num_kv_heads, p.head_dim)}")
    if kvv.v_head_dim != p.vo:
        raise ValueError(f"v: head_dim {kvv.v_head_dim} does not match head_dim_vo {p.vo}")
    return _fp8_aligned(kvv)


# ---------------------------------------------------------------------------------------------
# Single prefill: plans cached by shape, scratch per (device, stream)

_single_plans = PlanCache()
_single_scratch: dict = {}
_single_sigs = Signatures(per_stream=True)  # single_prefill's recorded calls: they read _single_scratch


@document('Prefill attention of one request.', returns="o : array\n    q's shape and dtype.\nlse : float32 array\n    Only with return_lse=True: (o, lse), lse (qo_len, num_qo_heads) in base 2.")
def single_prefill_with_kv_cache(q, k, v, scale_q=None, scale_k=None, scale_v=None, o_dtype=None, custom_mask=None,
                                 packed_custom_mask=None, causal: bool = False, kv_layout: str = "NHD",
                                 pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                                 sm_scale: float | None = None, window_left: int = -1,
                                 logits_soft_cap: float | None = None, rope_scale: float | None = None,
                                 rope_theta: float | None = None, backend: str = "auto", return_lse: bool = False,
                                 kv_cache_sf=None, k_scale=None, v_scale=None, *, out=None, lse=None, stream=None):
    """Prefill attention of one request: q (qo_len, num_qo_heads, head_dim) against k, v of shape
    (kv_len, num_kv_heads, head_dim) [NHD] or (num_kv_heads, kv_len, head_dim) [HND] (v's head dim may
    differ: head_dim_vo, the output's; fp8 k / v are read as such, and uint8 ones are refused since
    their fp8 kind is unknown: use the ragged wrapper, whose plan() names it). custom_mask:
    boolean (qo_len, kv_len), True = attend; or packed_custom_mask (its packbits, little-endian).
    Returns o like q, and lse (qo_len, num_qo_heads) in base 2 with return_lse=True. backend: "auto",
    "fa2" (portable kernel) or "fa3" (Hopper kernel), as FlashInfer names them. k_scale / v_scale:
    floats scaling the logits / the output. FlashInfer's per-head fp8 scales (scale_q, scale_k,
    scale_v), o_dtype other than q's and kv_cache_sf are not supported."""
    for name, val in (("scale_q", scale_q), ("scale_k", scale_k), ("scale_v", scale_v), ("kv_cache_sf", kv_cache_sf)):
        checks.unsupported(name, val)
    opts = (o_dtype, causal, kv_layout, pos_encoding_mode, sm_scale, window_left, logits_soft_cap, rope_scale,
            rope_theta, backend, return_lse, k_scale, v_scale)

    def full():
        return _single_prefill(q, k, v, o_dtype, custom_mask, packed_custom_mask, causal, kv_layout, pos_encoding_mode,
                               sm_scale, window_left, logits_soft_cap, rope_scale, rope_theta, backend, return_lse,
                               k_scale, v_scale, out, lse, stream)
    if custom_mask is not None or packed_custom_mask is not None or not plain(opts):  # a mask is packed per call
        return full()
    return _single_sigs((q, k, v, out, lse), opts, stream, full)


@document("FlashInfer's cached batch-prefill module for a custom variant.", returns="module : fi_cupy.variant.JitModule\n    The variant module, for the prefill wrappers' jit_args.")
def get_batch_prefill_jit_module(module_name, jit_module):
    """The variant module `jit_module` cached under `module_name` (as FlashInfer's, which loads a compiled
    module once per name); pass it as the prefill wrappers' jit_args. Nothing compiles here."""
    from .variant import named_module
    return named_module(module_name, jit_module, "batch_prefill")


# FlashInfer's MaskMode values (single_prefill_with_kv_cache_with_jit_module's mask_mode)
MASK_NON_CAUSAL, MASK_CAUSAL, MASK_CUSTOM = 0, 1, 2


@document('Prefill attention of one request with a custom attention variant.', returns="o : array\n    q's shape and dtype (head_dim_vo last).\nlse : float32 array\n    Only with return_lse=True.")
def single_prefill_with_kv_cache_with_jit_module(jit_module, q, k, v, *args, kv_layout: str = "NHD",
                                                 mask_mode: int = MASK_NON_CAUSAL, window_left: int = -1,
                                                 return_lse: bool = False, out=None, lse=None, stream=None):
    """single_prefill_with_kv_cache with a custom variant: jit_module from
    fi_cupy.jit.gen_customize_single_prefill_module(...).build_and_load() (or an AttentionVariant);
    args: the variant's extra parameters, tensors then scalars. mask_mode: FlashInfer's MaskMode value,
    0 (non-causal) or 1 (causal, bottom-right aligned)."""
    from .variant import JitModule, as_variant
    variant = as_variant(jit_module, "jit_module")
    mode = checks.int_arg("mask_mode", getattr(mask_mode, "value", mask_mode))
    checks.choice("mask_mode", mode, (MASK_NON_CAUSAL, MASK_CAUSAL))
    backend = jit_module.backend if isinstance(jit_module, JitModule) else "auto"  # the module's, as FlashInfer's
    return _single_prefill(q, k, v, None, None, None, mode == MASK_CAUSAL, kv_layout, "NONE", None, window_left, None,
                           None, None, backend, return_lse, None, None, out, lse, stream, variant, args)


def _single_prefill(q, k, v, o_dtype, custom_mask, packed_custom_mask, causal, kv_layout, pos_encoding_mode, sm_scale,
                    window_left, logits_soft_cap, rope_scale, rope_theta, backend, return_lse, k_scale, v_scale, out,
                    lse, stream, variant: AttentionVariant | None = None, variant_args: tuple = ()):
    """single_prefill_with_kv_cache's work, with a custom variant or without."""
    checks.choice("kv_layout", kv_layout, LAYOUTS)
    check_backend(backend)
    c = Call(q, stream, name="q")
    dev, s, cur = c.device, c.stream, (c.framework if stream is None else None)
    qi = c.arg(q, "q")
    checks.ndim(qi, 3, "(qo_len, num_qo_heads, head_dim)")
    checks.dtype_in(qi, Q_DTYPES)
    output_dtype(o_dtype, qi.dtype, "o_dtype")
    kvv, kv_len = describe_kv_pair(c, k, v, kv_layout, allow_vo=True)
    if kvv.head_dim != qi.shape[2]:
        raise ValueError(f"k: head_dim {kvv.head_dim} does not match q's head_dim {qi.shape[2]}")
    if kvv.dtype not in (qi.dtype,) + FP8:
        also = (" or float8 (a float8 dtype: uint8 bytes do not say which; the ragged wrapper takes them)"
                if kvv.dtype == dt.uint8 else ", float8_e4m3fn or float8_e5m2")
        raise TypeError(f"k: dtype {kvv.dtype} is not supported with q {qi.dtype}; expected {qi.dtype}{also}")
    has_mask = custom_mask is not None or packed_custom_mask is not None
    params = make_params(qi.shape[1], kvv.num_kv_heads, qi.shape[2], kvv.v_head_dim, causal, pos_encoding_mode,
                         window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, qi.dtype, kvv.dtype, False,
                         has_mask=has_mask, variant=variant)
    check_variant_run(variant, return_lse, None, scale("k_scale", k_scale))
    kvv = _check_kv_against(kvv, params)
    _check_q(qi, params, qi.shape[0])
    out_obj, o, lse_obj, l_info = attention_outputs(c, qi, out, lse, return_lse,
                                                    "(qo_len, num_qo_heads, head_dim_vo)", "(qo_len, num_qo_heads)",
                                                    params.vo)
    qo_len = qi.shape[0]
    qo_ip = np.array([0, qo_len], np.int32)
    kv_ip = np.array([0, kv_len], np.int32)
    # The plan depends on the tile (backend, variant) and the variant: both are in the key. The tile
    # first: a backend that cannot run these parameters is refused before the mask is packed (a launch).
    tile, flags = plan_tile(params, qo_ip[1:], has_mask, backend, dev)
    mask = None
    if has_mask:
        if custom_mask is not None:  # a host (numpy) mask is packed on the host
            ci = custom_mask if isinstance(custom_mask, np.ndarray) else arrays.describe(custom_mask, "custom_mask", s,
                                                                                         cur)
            if tuple(ci.shape) != (qo_len, kv_len):
                raise ValueError(f"custom_mask: expected shape {(qo_len, kv_len)} (qo_len, kv_len), got "
                                 f"{tuple(ci.shape)}")
        mask = _prepare_mask(custom_mask, packed_custom_mask, qo_ip[1:], kv_ip[1:], s, cur, device=dev)
    key = (dev, qo_len, kv_len, params.num_qo_heads, kvv.num_kv_heads, params.head_dim, params.vo, params.causal,
           params.window_left, params.rope, params.alibi, flags, tile, variant)
    got = _single_plans.get(key, lambda: plan_prefill(params, qo_ip, kv_ip, kv_ip[1:].copy(), None, tile,
                                                      num_ctas(params, tile, dev, False, flags),
                                                      None if mask is None else mask[2],
                                                      split=0 if variant is not None else None)[0])
    plan = PrefillPlan(**{**got.__dict__, "params": params, "mask": None if mask is None else mask[:2]})
    base = single_call_meta(_single_scratch, dev, s, c.framework, key, plan.meta, plan.partial_bytes(), _single_sigs)
    launch_prefill(c, plan, base + plan.partial_bytes(), base, qi, kvv, False, o, l_info, scale("k_scale", k_scale),
                   scale("v_scale", v_scale), variant_args=variant_args)
    if plan.mask is not None:
        c.infos.append(plan.mask[1])
    return attention_result(c, out_obj, lse_obj, return_lse)
