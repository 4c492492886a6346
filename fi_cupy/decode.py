"""Decode attention: `single_decode_with_kv_cache` and `BatchDecodeWithPagedKVCacheWrapper`.

Both run cuda_src/decode.cu: batch_decode_tc_kernel (tensor cores) for KV of the q dtype or fp8 (converted
in shared memory) without RoPE, batch_decode_kernel (CUDA cores) for RoPE on the fly and GPUs whose shared
memory is short of the tensor-core kernel's, batch_decode_wide_kernel (tensor
cores, the head dim split over the warps) at head_dim 512, and merge_states_kernel for requests cut over
several CTAs. A single decode is a batch of one request whose K/V form one page.
Supported (one table, README "Decode"): head_dim every multiple of 16 from 16 to 256, and 512; q fp16/bf16;
KV the q dtype or fp8 (e4m3fn, e5m2); any page size; any GQA group; NHD and HND; a 5-D cache or a
(k, v) pair; sliding window; logits soft cap; RoPE on the fly ("ROPE_LLAMA"); lse in base 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from . import decode_schedule, scheduler
from .page import (KVView, LAYOUTS, cache_parts, check_cache_against, describe_kv_pair, describe_paged_cache,
                   page_table_from_block_tables, page_table_lengths)
from ._core import alibi, arrays, checks, kernels, memo, streams
from ._core.call import Call
from ._core.fastpath import Signatures, plain
from ._core.workspace import (PlanCache, PlannedWrapper, align, attention_outputs, attention_result, attention_sinks,
                              backend_arg, device_copy, kv_split, output_dtype, pack_meta, scale, single_call_meta,
                              upload)
from ._core import dtypes as dt
from ._core.fastdiv import fastdiv_params
from ._core.kernels import NULL, KernelSpec, Program, f32, f64, i32, i64, ptr, u32
from ._core.docs import RUN_OPTIONS, RUN_RETURNS, document
from .variant import NO_VARIANT, AttentionVariant, as_variant, check_variant_run, from_jit_args

KERNEL_HEAD_DIMS = tuple(range(16, 257, 16))  # both decode kernels' instantiations
# Head dims past 256: batch_decode_wide_kernel (KV of the q dtype or fp8, no RoPE on the fly), whose warps
# split the head dim (the other kernels keep a row in a warp's lanes, which 512 does not fit).
WIDE_HEAD_DIMS = (512,)
SUPPORTED_HEAD_DIMS = KERNEL_HEAD_DIMS + WIDE_HEAD_DIMS
Q_DTYPES = (dt.float16, dt.bfloat16)
KV_DTYPES = {q: (q, dt.float8_e4m3fn, dt.float8_e5m2) for q in Q_DTYPES}
POS_ENCODINGS = ("NONE", "ROPE_LLAMA", "ALIBI")
DECODE_BACKENDS = ("auto", "fa2")  # FlashInfer's names; both run our kernels
# plan()'s quota schedule written on the GPU (decode_schedule.py) instead of by numpy (issue 21: plan() at
# batch 512 on an H100, 339 -> 150 us; bench/decode_plan_ab.py). False keeps the host schedule: the reference the kernel is tested
# against (tests/test_decode_schedule.py), and a switch to compare the two.
DEVICE_SCHEDULE = True


def uses_tensor_cores(q_dtype: dt.DType, kv_dtype: dt.DType, rope: bool) -> bool:
    """KV of the q dtype or fp8 without RoPE runs on tensor cores (batch_decode_tc_kernel: fp8 converted to
    the q dtype in shared memory); RoPE on the fly runs on CUDA cores (batch_decode_kernel)."""
    return (kv_dtype == q_dtype or kv_dtype.bits == 8) and not rope


def decode_program(head_dim: int, heads_per_block: int, q_dtype: dt.DType, kv_dtype: dt.DType,
                   rope: bool, alibi: bool = False, tensor_cores: bool | None = None,
                   variant: AttentionVariant | None = None) -> Program:
    """tensor_cores: None follows uses_tensor_cores; False takes the CUDA-core kernel for 16-bit KV too
    (decode_variant, on a GPU whose CTAs cannot have the tensor-core kernel's shared memory). variant: a
    custom attention variant compiled into the tensor-core kernel (the only one that takes one)."""
    tc = uses_tensor_cores(q_dtype, kv_dtype, rope) if tensor_cores is None else tensor_cores
    if variant is not None and not (tc and head_dim in KERNEL_HEAD_DIMS):
        raise ValueError("variant: only the tensor-core decode kernel takes a custom variant (takes_variant)")
    if head_dim in WIDE_HEAD_DIMS:
        if rope:
            raise ValueError(f"head_dim {head_dim}: the wide decode kernel applies no RoPE on the fly")
        main = KernelSpec("fic::batch_decode_wide_kernel", (head_dim, heads_per_block, q_dtype.cpp, kv_dtype.cpp,
                                                            kernels.cpp_bool(alibi)))
        smem = f"fic::DecodeWideCfg<{head_dim}, {kv_dtype.cpp}>::kSmemBytes"
    elif tc:
        main = KernelSpec("fic::batch_decode_tc_kernel", (head_dim, heads_per_block, q_dtype.cpp, kv_dtype.cpp,
                                                          kernels.cpp_bool(alibi)) +
                          ((variant.binding,) if variant is not None else ()))
        smem = f"fic::DecodeTcSmem<{head_dim}, {heads_per_block}, {kv_dtype.cpp}>::value"
    else:
        main = KernelSpec("fic::batch_decode_kernel", (head_dim, heads_per_block, q_dtype.cpp, kv_dtype.cpp,
                                                       kernels.cpp_bool(rope), kernels.cpp_bool(alibi)))
        smem = f"fic::DecodeCfg<{head_dim}, {heads_per_block}, {kv_dtype.cpp}>::kSmemBytes"
    return Program("decode.cu", (main, KernelSpec("fic::merge_states_kernel", (head_dim, heads_per_block, q_dtype.cpp))),
                   ((smem, decode_smem_bytes(head_dim, heads_per_block, tc, kv_dtype.bits // 8)),),
                   variant._sources() if variant is not None else ())


def decode_smem_bytes(head_dim: int, heads_per_block: int, tensor_cores: bool, kv_bytes: int = 2) -> int:
    """Dynamic shared memory of the decode kernels (DecodeCfg / DecodeTcSmem / DecodeWideCfg in
    cuda_src/decode.cu, checked against them at compile time): 4 warps of cp.async pipeline (12 KB each;
    tensor cores: at least 3 stages of 16 padded K and V rows, 24 KB or more), reused for the final merge
    of the warps (MergeBlock: a warp's block padded to 16 bytes). Wide head dims, a warp: 16 rows of K and
    V of its quarter of the dims, padded, in 3 stages (fp8: 4 raw stages and that tile converted), and two
    buffers of the warps' partial scores. Tensor cores with fp8 KV: raw stages (about 16 KB a warp, 4 to 16)
    and the converted tile."""
    if head_dim in WIDE_HEAD_DIMS:
        tile = 2 * 16 * (head_dim // 4 + 8) * 2
        warp = 3 * tile if kv_bytes == 2 else 4 * 2 * 16 * (head_dim // 4) * kv_bytes + tile
        return 4 * warp + 2 * 4 * 32 * 16
    merge = 4 * ((heads_per_block * (head_dim + 2) + 3) // 4 * 4) * 4
    if not tensor_cores:
        return max(4 * 12288, merge)
    tile = 2 * 16 * (head_dim + 8) * 2
    if kv_bytes == 1:
        raw = 2 * 16 * head_dim
        return max(4 * (max(4, min(16, 16384 // raw)) * raw + tile), merge)
    return max(4 * max(3, min(16, 24576 // tile)) * tile, merge)


_variants: dict = {}  # decode_variant's answers, by what it reads


def decode_variant(params: DecodeParams, kv_dtype: dt.DType, device: int | None = None) -> tuple:
    """(Program, dynamic shared memory bytes) that decode runs for these parameters and KV dtype on
    `device` (None: a GPU with the shared memory of an H100). The tensor-core kernel keeps 3 stages of
    16 K and V rows a warp, 102 KB at head_dim 128: where a CTA cannot have that (sm_86 / sm_89 allow
    99 KB, A100 163 KB), the CUDA-core kernel (48 KB) runs instead. The wide kernel (head_dim 512, 102-106
    KB) has no such fallback: NotImplementedError there. Memoised by what it reads (plan() asks twice a
    step)."""
    limit = None if device is None else kernels.device_props(device)["smem_optin"]
    key = (params.group_size, params.head_dim, params.q_dtype, kv_dtype, params.rope, params.alibi, limit,
           params.variant)
    got = _variants.get(key)
    if got is not None:
        return got
    gb, _ = scheduler.decode_heads_per_block(params.group_size)
    d, kv_bytes = params.head_dim, kv_dtype.bits // 8
    tc = uses_tensor_cores(params.q_dtype, kv_dtype, params.rope)
    if tc and d not in WIDE_HEAD_DIMS and limit is not None and decode_smem_bytes(d, gb, True, kv_bytes) > limit:
        tc = False
    smem = decode_smem_bytes(d, gb, tc, kv_bytes)
    if limit is not None and smem > limit:
        raise NotImplementedError(f"head_dim: decode at {d} needs {smem} bytes of shared memory a CTA; this GPU "
                                  f"({kernels.device_props(device)['name']}) allows {limit}")
    got = _variants[key] = decode_program(d, gb, params.q_dtype, kv_dtype, params.rope, params.alibi, tc,
                                          params.variant), smem
    return got


def takes_variant(params: DecodeParams, kv_dtype: dt.DType, device: int | None = None) -> bool:
    """Whether a custom variant runs on the decode kernel (the tensor-core one: KV of the q dtype, head dims
    up to 256, its shared memory on `device`); elsewhere decode runs it on the paged prefill kernel."""
    if not (kv_dtype == params.q_dtype and not params.rope and params.head_dim in KERNEL_HEAD_DIMS):
        return False
    limit = None if device is None else kernels.device_props(device)["smem_optin"]
    gb, _ = scheduler.decode_heads_per_block(params.group_size)
    return limit is None or decode_smem_bytes(params.head_dim, gb, True) <= limit


def variant_split(variant: AttentionVariant, split: int | None) -> int | None:
    """The plan's split for a variant on the decode kernel: cut KV ranges merge by their lse, which gives
    a variant's answer only where it is the softmax with the default OutputTransform; others never cut."""
    return split if variant.use_softmax and not variant.transforms_output else 0


def all_programs(head_dims=SUPPORTED_HEAD_DIMS) -> list:
    """Every instantiation of the supported grid (CI compiles these; `precompile` the standard ones)."""
    out = []
    for d in head_dims:
        for q in Q_DTYPES:
            for kv in KV_DTYPES[q]:
                for gb in (1, 4, scheduler.MAX_HEADS_PER_BLOCK):
                    for rope, al in ((False, False), (True, False), (False, True)):  # NONE, ROPE, ALIBI
                        if not (rope and d in WIDE_HEAD_DIMS):
                            out.append(decode_program(d, gb, q, kv, rope, al))
                        if uses_tensor_cores(q, kv, rope) and d not in WIDE_HEAD_DIMS and \
                                decode_smem_bytes(d, gb, True, kv.bits // 8) > kernels.SMEM_EVERY_GPU:
                            # where a GPU cannot give the tensor-core kernel its shared memory (decode_variant)
                            out.append(decode_program(d, gb, q, kv, rope, al, tensor_cores=False))
    return out


# ---------------------------------------------------------------------------------------------
# Plan: everything host-side, once per batch


@dataclass
class DecodeParams:
    """The per-batch constants of a decode launch (shared by the wrapper and single decode)."""
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    q_dtype: dt.DType
    kv_dtype: dt.DType
    rope: bool
    window_left: int
    soft_cap: float
    sm_scale: float
    rope_scale: float
    rope_theta: float
    alibi: bool = False  # pos_encoding_mode "ALIBI": FlashInfer's slopes (_core/alibi.py)
    variant: AttentionVariant | None = None  # a custom attention variant (takes_variant), its plan's qo_indptr

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def pos_encoding_mode(self) -> str:
        return "ROPE_LLAMA" if self.rope else "ALIBI" if self.alibi else "NONE"


@memo.of_plain_args  # plan() checks the same options every step
def make_params(num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode, window_left,
                logits_soft_cap, q_data_type, kv_data_type, sm_scale, rope_scale, rope_theta,
                variant: AttentionVariant | None = None) -> DecodeParams:
    """The checked per-batch constants; variant: the options a custom variant owns are refused beside it."""
    num_qo_heads = checks.positive_int("num_qo_heads", num_qo_heads)
    num_kv_heads = checks.positive_int("num_kv_heads", num_kv_heads)
    checks.heads(num_qo_heads, num_kv_heads)
    head_dim = checks.positive_int("head_dim", head_dim)
    checks.head_dim(head_dim, SUPPORTED_HEAD_DIMS)
    page_size = checks.positive_int("page_size", page_size)
    checks.choice("pos_encoding_mode", pos_encoding_mode, POS_ENCODINGS)
    q_dtype = dt.as_dtype(q_data_type, "q_data_type")
    if q_dtype not in Q_DTYPES:
        raise TypeError(f"q_data_type: {q_dtype} is not supported; expected float16 or bfloat16")
    kv_dtype = q_dtype if kv_data_type is None else dt.as_dtype(kv_data_type, "kv_data_type")
    if kv_dtype not in KV_DTYPES[q_dtype]:
        raise TypeError(f"kv_data_type: {kv_dtype} is not supported with q {q_dtype}; expected "
                        f"{' or '.join(str(k) for k in KV_DTYPES[q_dtype])}")
    wl, cap, sm, rs, rt = checks.attention_options(head_dim, window_left, logits_soft_cap, sm_scale, rope_scale,
                                                   rope_theta)
    checks.alibi_without_soft_cap(pos_encoding_mode, cap)
    if variant is not None:
        variant._refuse_owned(pos_encoding_mode, sm_scale, cap)
    if pos_encoding_mode == "ROPE_LLAMA" and head_dim in WIDE_HEAD_DIMS:
        raise NotImplementedError(f"pos_encoding_mode: ROPE_LLAMA (RoPE on the fly) is supported up to head_dim 256, "
                                  f"got head_dim {head_dim}; apply RoPE to q and k first (apply_rope_inplace) and "
                                  f"plan with pos_encoding_mode='NONE'")
    return DecodeParams(num_qo_heads, num_kv_heads, head_dim, page_size, q_dtype, kv_dtype,
                        pos_encoding_mode == "ROPE_LLAMA", wl, cap, sm, rs, rt, pos_encoding_mode == "ALIBI", variant)


@dataclass
class DecodePlan:
    """Host-side schedule plus the int32 metadata block that run() reads on the device.

    Every offset in `meta` and the partial-state region depend on the batch size, the heads and the
    device only (capacities, not the current lengths), unless a fixed split needs more; the page
    indices go last. indices_ptr: where the kernel reads the page indices when they are not in
    `meta` (a device array of the caller's: fast_decode_plan, or the CUDA-graph indices buffer)."""
    params: DecodeParams
    batch_size: int
    num_ctas: int
    num_merges: int          # the merge grid: pairs cut over several CTAs (the capacity on a device schedule)
    max_page: int            # largest page index used (-1 if none or unchecked)
    meta: np.ndarray         # int32 metadata, parts at `offsets`
    offsets: dict            # name -> int32 element offset within meta
    partial_capacity: int    # partial rows the workspace region holds
    segment_capacity: int    # segments the metadata holds
    merge_capacity: int      # cut pairs the metadata holds: the merge grid a CUDA graph launches
    indices_ptr: int = 0     # 0: the indices are in meta
    keep: tuple = ()         # arrays the plan reads on the device (kept alive with it)
    quota: int | None = None  # a schedule left to the device (tokens a CTA); None: meta holds the host's

    @property
    def upload_from(self) -> int:
        """meta[upload_from:] is the host's to upload; the parts before it, the schedule kernel's."""
        return 0 if self.quota is None else self.offsets["page_indptr"]

    @property
    def heads_per_block(self) -> tuple:
        return scheduler.decode_heads_per_block(self.params.group_size)

    @property
    def num_kv_heads_blocks(self) -> int:
        return self.params.num_kv_heads * self.heads_per_block[1]

    def partial_bytes(self) -> int:
        gb = self.heads_per_block[0]
        rows = self.partial_capacity
        return align(rows * gb * self.params.head_dim * 4) + align(rows * gb * 4)

    def run_key(self) -> tuple:
        """What run() reads of the plan besides the metadata's contents: two plans with equal keys launch
        alike, so run()'s recorded calls outlive a re-plan (PlannedWrapper._plan). Every field but the
        ones that _PER_PLAN names, so a field added later counts until it is named there; max_page is
        checked by run() on every call instead (its `fits`)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in _PER_PLAN)


# DecodePlan fields that run()'s recorded calls do not depend on: the metadata block (uploaded to the same
# place: the offsets and capacities are in the key), the largest page index (run() tests the cache
# against it each call), the arrays kept alive and the quota (the schedule kernel's, at plan time).
_PER_PLAN = frozenset(("meta", "max_page", "keep", "quota"))


def check_page_table(params: DecodeParams, indptr: np.ndarray, indices: np.ndarray,
                     last_page_len: np.ndarray) -> tuple:
    """(kv_lens, used page indices, the largest of them) of a checked page table."""
    checks.indptr("indptr", indptr)
    return page_table_lengths(indptr, indices, last_page_len, params.page_size)


def plan_decode(params: DecodeParams, indptr: np.ndarray, indices: np.ndarray | None,
                last_page_len: np.ndarray, num_ctas: int, lengths: tuple | None = None, split: int | None = None,
                fixed_capacity: tuple | None = None, on_device: bool = False, alloc=None) -> DecodePlan:
    """lengths: check_page_table's result when the caller has checked the table already (with
    indices None: the kernel reads them from a device array, outside meta). split: see
    scheduler.decode_schedule. fixed_capacity (CUDA graphs): the (segments, partial rows, cut pairs)
    capacities every plan of the wrapper keeps; a split that needs more is refused. on_device (a
    wrapper's plan): a quota split (split None) is left to the schedule kernel (decode_schedule.py,
    launched by the wrapper after the upload): the host picks the quota alone. alloc: pack_meta's."""
    batch = indptr.size - 1
    kv_lens, used, max_page = lengths or check_page_table(params, indptr, indices, last_page_len)
    wl = params.window_left
    visible = np.maximum(0, kv_lens - 1 - wl) if wl >= 0 else None  # None: from key 0
    _, slices = scheduler.decode_heads_per_block(params.group_size)
    head_blocks = params.num_kv_heads * slices
    sch, quota = None, None
    if on_device and split is None:  # a quota split never needs more than the default capacities
        quota, cut = scheduler.decode_quota(kv_lens, visible, head_blocks, num_ctas)
        caps = fixed_capacity or scheduler.DecodeSchedule.capacity(batch, head_blocks, num_ctas)
        num_merges = caps[2] if cut else 0  # the merge grid: the pairs cut are known on the device only
    else:
        sch = scheduler.decode_schedule(kv_lens, visible, head_blocks, num_ctas, split=split)
        need = (sch.segments.shape[0], sch.num_partial_rows, sch.merge_pairs.size)
        if fixed_capacity is not None:
            caps = fixed_capacity
            if any(n > c for n, c in zip(need, caps)):
                raise ValueError(f"fixed_split_size: use_cuda_graph=True keeps the metadata sizes of the first plan, "
                                 f"(segments, partial rows, cut pairs) = {caps}; this plan needs {need}: use a larger "
                                 f"fixed_split_size, or a wrapper a configuration")
        else:
            caps = tuple(map(max, need, scheduler.DecodeSchedule.capacity(batch, head_blocks, num_ctas)))
        num_merges = sch.merge_pairs.size
    seg_cap, part_cap, merge_cap = caps
    used = np.zeros(0, np.int32) if used is None else used
    parts = decode_schedule.device_parts(batch, seg_cap, num_ctas, merge_cap)
    if sch is not None:  # the host's schedule in the kernel's parts
        for i, a in enumerate((sch.segments.ravel(), sch.segment_partial, sch.cta_indptr, sch.merge_pairs,
                               sch.merge_indptr)):
            parts[i] = (parts[i][0], a, parts[i][2])
    meta, offsets = pack_meta(parts + [("page_indptr", indptr, batch + 1), ("kv_lens", kv_lens, batch)] +
                              # a variant's params.get_qo_len: one query a request
                              ([("qo_indptr", np.arange(batch + 1), batch + 1)] if params.variant is not None else []) +
                              [("indices", used, used.size)], alloc)
    if sch is not None:  # merge_indptr is padded with its last entry, so the merge CTAs past the cut pairs find no rows
        mi = sch.merge_indptr
        start = offsets["merge_indptr"]
        meta[start + mi.size: start + merge_cap + 1] = mi[-1]
    return DecodePlan(params, batch, num_ctas, num_merges, max_page, meta, offsets, part_cap, seg_cap, merge_cap,
                      quota=quota)


_num_ctas: dict = {}  # (program, smem, device) -> CTAs in one wave


def decode_num_ctas(params: DecodeParams, kv_dtype: dt.DType, device: int) -> int:
    """One wave of the decode kernel on `device` (compiles / loads the kernel; memoised: plan() runs
    every decode step)."""
    prog, smem = decode_variant(params, kv_dtype, device)
    got = _num_ctas.get((prog, smem, device))
    if got is None:
        occ = kernels.functions(prog, device)[prog.kernels[0]].occupancy(128, smem)
        got = _num_ctas[(prog, smem, device)] = kernels.device_props(device)["sms"] * max(occ, 1)
    return got


# ---------------------------------------------------------------------------------------------
# Launch


def launch_decode(c: Call, plan: DecodePlan, meta_ptr: int, partial_ptr: int, q: arrays.ArrayInfo, kv: KVView,
                  o: arrays.ArrayInfo, l_info, k_scale: float, v_scale: float, always_merge: bool = False,
                  sinks: arrays.ArrayInfo | None = None, variant_args: tuple = ()) -> None:
    """Queue the decode kernel, and the merge of cut pairs, on Call `c` (its stream and programmatic
    dependent launch setting). No allocation, no sync. meta_ptr / partial_ptr: the plan's metadata and
    partial states, fixed while the plan is. always_merge keeps the launch sequence fixed whatever the
    plan (CUDA graphs). sinks: attention-sink logits (attention_sinks) or None. variant_args: a custom
    variant's extra run() arguments (tensors, then scalars)."""
    p = plan.params
    gb, slices = plan.heads_per_block
    prog, smem = decode_variant(p, kv.dtype, q.device)
    dec, merge = kernels.functions(prog, q.device).values()
    meta = ptr(meta_ptr, stable=True)
    off = {k: ptr(meta, 4 * v) for k, v in plan.offsets.items()}
    part_o = ptr(partial_ptr, stable=True)
    part_lse = ptr(part_o, align(plan.partial_capacity * gb * p.head_dim * 4))
    _, mul, shift = fastdiv_params(p.page_size)
    q_scale = p.sm_scale * k_scale * (1.0 if p.soft_cap > 0 else 1.4426950408889634)
    qs, os_ = q.strides, o.strides
    q_sb, o_sb = (qs[-3] if q.ndim == 3 else 0), (os_[-3] if o.ndim == 3 else 0)
    c.launch(dec, (plan.num_ctas,), (128,), [
        ptr(q), i64(q_sb), i64(qs[-2]),
        ptr(kv.k_ptr), ptr(kv.v_ptr), i64(kv.stride_page), i64(kv.stride_slot), i64(kv.stride_head),
        ptr(off["page_indptr"]), ptr(plan.indices_ptr, stable=True) if plan.indices_ptr else off["indices"],
        ptr(off["kv_lens"]), ptr(off["cta_indptr"]),
        ptr(off["segments"]), ptr(off["segment_partial"]),
        ptr(o), i64(o_sb), i64(os_[-2]), ptr(l_info), ptr(part_o), ptr(part_lse),
        i32(p.num_qo_heads), i32(p.group_size), i32(slices), u32(p.page_size), u32(mul), u32(shift),
        f32(q_scale), f32(p.soft_cap), f32(v_scale), f32(1.0 / p.rope_scale), f64(math.log2(p.rope_theta)),
        ptr(sinks), ptr(alibi.device_slopes(p.num_qo_heads, q.device, c.stream), stable=True) if p.alibi else NULL,
        NO_VARIANT if p.variant is None else p.variant._pack(
            c, variant_args, meta_ptr + 4 * plan.offsets["qo_indptr"], meta_ptr + 4 * plan.offsets["kv_lens"],
            p.num_qo_heads, p.num_kv_heads),
    ], smem=smem)
    if always_merge or plan.num_merges:  # a CUDA graph keeps the grid for every cut pair a plan can have
        n = plan.merge_capacity if always_merge else plan.num_merges
        c.launch(merge, (n, gb), (128,), [
            part_o, part_lse, off["merge_pairs"], off["merge_indptr"], ptr(o), i64(o_sb),
            i64(os_[-2]), ptr(l_info), i32(p.num_qo_heads), i32(p.group_size), i32(plan.num_kv_heads_blocks),
            ptr(sinks),
        ])


def _pages_of(cache) -> int:
    """The leading dim of a cache array (its pages, in every layout), or -1 without one."""
    shape = getattr(cache, "shape", ())
    return shape[0] if len(shape) else -1


def _check_q(q: arrays.ArrayInfo, p: DecodeParams, batch_shape: tuple) -> None:
    checks.dtype_in(q, Q_DTYPES)
    if q.dtype != p.q_dtype:
        raise TypeError(f"q: dtype {q.dtype} does not match the planned q_data_type {p.q_dtype}")
    checks.shape(q, batch_shape + (p.num_qo_heads, p.head_dim),
                 "(batch_size, num_qo_heads, head_dim)" if batch_shape else "(num_qo_heads, head_dim)")
    checks.last_dim_contiguous(q)
    checks.vector_aligned(q)


# ---------------------------------------------------------------------------------------------
# Public API


@document("Decode attention for a batch of requests over a paged KV cache (FlashInfer's API).")
class BatchDecodeWithPagedKVCacheWrapper(PlannedWrapper):
    """Decode attention for a batch of requests over a paged KV cache (FlashInfer's API).

    plan() once per batch (host work: split-KV schedule, one host-to-device copy of the metadata into
    the workspace); run() once per layer: no host sync, no allocation when `out` (and `lse`) are
    given, so it can be captured in a CUDA graph. A re-plan of a batch of the same size keeps every
    device address and the launch shape, so a captured graph replays the new plan.

    plan() reads indptr, indices and last_page_len on the host: pass host (numpy) arrays, or device
    arrays, which plan() copies to the host (one synchronisation); `fast_decode_plan` leaves device
    indices on the device. Beyond FlashInfer: every head_dim multiple of 16 up to 256 and 512, any page
    size, and q_len_per_req > 1 (multi-token decode, run on the prefill kernel) without use_tensor_cores.
    use_tensor_cores is accepted and reported; the kernel is chosen by the dtypes and the GPU (tensor
    cores for 16-bit KV of the q dtype without RoPE, CUDA cores otherwise or where the GPU's shared
    memory is short; at head_dim 512 the wide tensor-core kernel), which is faster either way.
    """

    family = "decode"

    def __init__(self, float_workspace_buffer, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 use_tensor_cores: bool = False, paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
                 paged_kv_last_page_len_buffer=None, backend: str = "auto", jit_args=None):
        self._backend = backend_arg(backend, DECODE_BACKENDS)
        self._use_tensor_cores = checks.flag("use_tensor_cores", use_tensor_cores)
        # a custom attention variant (fi_cupy/variant.py): on the tensor-core decode kernel where it takes one
        # (takes_variant), else on the paged prefill kernel
        self._variant = None if jit_args is None else from_jit_args(jit_args, "BatchDecodeWithPagedKVCacheWrapper")
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, None, LAYOUTS)
        # CUDA graphs: FlashInfer's kernels read these buffers, which plan() fills; ours read the
        # workspace, except the indices (the kernel reads the indices buffer, so an engine may write
        # the page indices there itself before fast_decode_plan). plan() fills all three, as FlashInfer.
        self._buffers = {}
        for name, buf in (("paged_kv_indptr_buffer", paged_kv_indptr_buffer),
                          ("paged_kv_indices_buffer", paged_kv_indices_buffer),
                          ("paged_kv_last_page_len_buffer", paged_kv_last_page_len_buffer)):
            if buf is not None:
                info = arrays.describe(buf, name)
                checks.dtype_is(info, dt.int32, "int32 (FlashInfer's index dtype)")
                checks.ndim(info, 1, "(n,)")
                checks.contiguous(info)
                checks.same_device(info, self._ws)
                self._buffers[name] = info
        lp = self._buffers.get("paged_kv_last_page_len_buffer")
        self._fixed_batch = lp.shape[0] if (lp is not None and self._use_cuda_graph) else None
        self._multi = None      # the prefill wrapper that runs q_len_per_req > 1
        self._via_prefill = False  # whether the current plan is _multi's
        self._q_len = 1         # q_len_per_req of the current plan
        self._graph_caps = None  # CUDA graphs: the metadata capacities of the first plan
        self._last_plan = None  # (plan function, tables, keyword arguments): forward() re-plans from it

    @property
    def use_tensor_cores(self) -> bool:
        """The use_tensor_cores the wrapper was made with (the kernel choice does not depend on it)."""
        return self._use_tensor_cores

    @document('The backend the plan runs.', returns="backend : str\n    \"fa2\".")
    def resolved_backend(self) -> str:
        """The backend plan() runs: always FlashInfer's "fa2" family (our portable kernels)."""
        return "fa2"

    @document("Accepted for FlashInfer's API; nothing to prewarm.")
    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        """Nothing to prewarm: the kernels take the cache's strides at run time, for any layout."""
        checks.choice("variant", variant, ("independent",))

    @document('Use another workspace buffer.')
    def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer=None) -> None:
        """Use another workspace from now on; the current plan is dropped (plan again)."""
        super().reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._graph_caps = None
        if getattr(self, "_multi", None) is not None:
            self._multi.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)

    @document('Plan a decode batch (host work, one copy of the schedule into the workspace).')
    def plan(self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
             page_size: int, pos_encoding_mode: str = "NONE", window_left: int = -1,
             logits_soft_cap: float | None = None, q_data_type="float16", kv_data_type=None, o_data_type=None,
             data_type=None, sm_scale: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, non_blocking: bool = True, block_tables=None, seq_lens=None,
             fixed_split_size: int | None = None, disable_split_kv: bool = False, q_len_per_req: int = 1, *,
             window_right: int | None = None, is_causal: bool | None = None, stream=None) -> None:
        """Plan a batch: request b owns pages indices[indptr[b]:indptr[b + 1]], the last one holding
        last_page_len[b] tokens (or block_tables + seq_lens, FlashInfer's trtllm-gen form).
        Positional arguments after page_size follow FlashInfer's legacy order. data_type: the KV
        dtype when kv_data_type is None. o_data_type: None or q's dtype. disable_split_kv=True or a
        fixed_split_size (pages) make each request's output bit-identical whatever the batch.
        q_len_per_req > 1: each request has that many queries (q is (batch * q_len_per_req, heads,
        head_dim)), causal within the request unless is_causal=False. window_right: decode queries
        see no key to their right, so only -1 / 0 (no effect) are accepted."""
        kw = dict(locals())  # the keyword arguments, as _plan_impl and forward()'s re-plan read them
        for k in ("self", "indptr", "indices", "last_page_len"):
            del kw[k]
        self._plan_impl((indptr, indices, last_page_len), kw, fast=False)

    begin_forward = plan

    @document('The workspace bytes plan() would need for these arguments.', returns="need : (int, int)\n    (float workspace bytes, int workspace bytes): the int workspace is unused (0).")
    def workspace_size(self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                       page_size: int, pos_encoding_mode: str = "NONE", window_left: int = -1,
                       logits_soft_cap: float | None = None, q_data_type="float16", kv_data_type=None,
                       o_data_type=None, data_type=None, sm_scale: float | None = None,
                       rope_scale: float | None = None, rope_theta: float | None = None, block_tables=None,
                       seq_lens=None, fixed_split_size: int | None = None, disable_split_kv: bool = False,
                       q_len_per_req: int = 1) -> tuple:
        """(float workspace bytes, int workspace bytes) that plan() with these arguments needs; the int
        workspace is unused (0). Nothing is planned or written."""
        kw = dict(locals(), non_blocking=True, window_right=None, is_causal=None, stream=None)
        for k in ("self", "indptr", "indices", "last_page_len"):
            del kw[k]
        return self._plan_impl((indptr, indices, last_page_len), kw, fast=False, dry=True), 0

    def _plan_impl(self, tables: tuple, kw: dict, fast: bool, indptr_host=None, dry: bool = False):
        """plan() and fast_decode_plan(): fast leaves device indices where they are (unchecked) and
        takes indptr from indptr_host. dry: return the workspace bytes needed, plan nothing."""
        indptr, indices, last_page_len = tables
        params = make_params(kw["num_qo_heads"], kw["num_kv_heads"], kw["head_dim"], kw["page_size"],
                             kw["pos_encoding_mode"], kw["window_left"], kw["logits_soft_cap"], kw["q_data_type"],
                             kw["kv_data_type"] if kw["kv_data_type"] is not None else kw["data_type"],
                             kw["sm_scale"], kw["rope_scale"], kw["rope_theta"], self._variant)
        output_dtype(kw["o_data_type"], params.q_dtype)
        checks.unsupported("window_right", kw["window_right"], (None, -1, 0))
        q_len = checks.positive_int("q_len_per_req", kw["q_len_per_req"])
        causal = True if kw["is_causal"] is None else checks.flag("is_causal", kw["is_causal"])
        split = kv_split(kw["fixed_split_size"], kw["disable_split_kv"], params.page_size)
        non_blocking = checks.flag("non_blocking", kw["non_blocking"])
        ip, ix, lp, dev_ix = self._tables(params, indptr, indices, last_page_len, kw["block_tables"], kw["seq_lens"],
                                          fast and q_len == 1,
                                          indptr_host)
        if self._fixed_batch is not None and ip.size - 1 != self._fixed_batch:
            raise ValueError(f"use_cuda_graph=True: the batch size is fixed at {self._fixed_batch} (the length of "
                             f"paged_kv_last_page_len_buffer); got {ip.size - 1}")
        if self._use_cuda_graph and not dry and self._q_len_fixed(q_len):
            raise ValueError(f"q_len_per_req: use_cuda_graph=True keeps the q_len_per_req of the first plan "
                             f"({self._q_len}); got {q_len}; create a wrapper per q_len_per_req")
        if q_len > 1 or (self._variant is not None and not takes_variant(params, params.kv_dtype, self._ws.device)):
            return self._plan_multi(params, ip, ix, lp, q_len, causal, kw, non_blocking, dry, fast)
        if self._variant is not None:
            split = variant_split(self._variant, split)
        lengths = page_table_lengths(ip, ix, lp, params.page_size)  # before any device work
        num_ctas = decode_num_ctas(params, params.kv_dtype, self._ws.device)
        variant = (decode_variant(params, params.kv_dtype, self._ws.device), num_ctas)
        if self._graph_caps is not None and self._graph_caps[0] != variant and not dry:
            self._graph_caps = None  # another kernel: a graph captured before must be captured again anyway
        alloc = None if dry else self._pinned.empty
        plan = plan_decode(params, ip, ix, lp, num_ctas, lengths, split, self._graph_caps and self._graph_caps[1],
                           on_device=DEVICE_SCHEDULE, alloc=alloc)
        if self._use_cuda_graph and self._graph_caps is None and not dry:
            caps = (plan.segment_capacity, plan.partial_capacity, plan.merge_capacity)
            if split:  # room for a fixed split that grows with the lengths (the others fit the default)
                caps = tuple(2 * c for c in caps)
                plan = plan_decode(params, ip, ix, lp, num_ctas, lengths, split, caps, on_device=DEVICE_SCHEDULE,
                                   alloc=alloc)
            self._graph_caps = (variant, caps)
        if dry:
            return plan.partial_bytes() + plan.meta.nbytes
        self._room_for(plan)
        if self._use_cuda_graph and self._plan is not None and self._plan.batch_size != plan.batch_size:
            raise ValueError(f"use_cuda_graph=True: the batch size must stay {self._plan.batch_size} across "
                             f"plans (got {plan.batch_size}); create a wrapper per batch size")
        s = streams.resolve(kw["stream"], self._ws.framework, self._ws.device)
        if params.alibi:  # uploaded now: run() allocates nothing
            alibi.device_slopes(params.num_qo_heads, self._ws.device, s)
        plan = self._place_indices(plan, ix, dev_ix, s)
        meta_ptr = self._ws.ptr + plan.partial_bytes()
        upload(plan.meta[plan.upload_from:], meta_ptr + 4 * plan.upload_from, self._ws.device, s, self._pinned)
        if plan.quota is not None:
            decode_schedule.launch_schedule(meta_ptr, plan.offsets, plan.batch_size, plan.num_kv_heads_blocks,
                                            plan.num_ctas, plan.quota, params.window_left, plan.merge_capacity, s,
                                            self._ws.device)
        if self._use_cuda_graph and not fast:  # fast_decode_plan leaves the buffers to the engine, as FlashInfer
            self._fill_buffers(ip, lp, s)
        self._finish(plan, 1, s, non_blocking)
        self._last_plan = (tables, kw, fast, indptr_host)

    def _override(self, **opts) -> None:
        """forward(): FlashInfer's legacy call sets these options for this and later runs."""
        if self._last_plan is None:
            raise RuntimeError("forward() called before plan()")
        tables, kw, fast, indptr_host = self._last_plan
        if any(kw[k] != v for k, v in opts.items()):
            self._plan_impl(tables, {**kw, **opts}, fast, indptr_host)

    def _q_len_fixed(self, q_len: int) -> bool:
        """Whether a CUDA-graph wrapper already planned with another q_len_per_req."""
        return (self._plan is not None or self._q_len > 1) and q_len != self._q_len

    def _finish(self, plan, q_len: int, s: int, non_blocking: bool) -> None:
        self._plan, self._q_len = plan, q_len
        self._via_prefill = plan is None
        if not non_blocking and not streams.is_capturing(s):
            from cupy.cuda import runtime
            runtime.streamSynchronize(s)  # FlashInfer's non_blocking=False: the copies have landed

    def _tables(self, params, indptr, indices, last_page_len, block_tables, seq_lens, fast: bool, indptr_host):
        """(indptr, indices or None, last_page_len) on the host, and the device indices the kernel reads
        instead (fast_decode_plan: an int32 device array, or None)."""
        page = params.page_size
        if block_tables is not None or (indptr is None and seq_lens is not None):
            if block_tables is None:
                raise ValueError("block_tables: required with seq_lens when indptr is None")
            ip, ix, lp = page_table_from_block_tables(block_tables, seq_lens, page)
            return ip, ix, lp, None
        ip = checks.host_int_array("indptr", indptr if indptr_host is None else indptr_host)
        checks.indptr("indptr", ip)
        if fast and page == 1 and not isinstance(last_page_len, np.ndarray):
            lp = (np.diff(ip) > 0).astype(np.int64)  # page size 1: a non-empty request's last page is full
        else:
            lp = checks.host_int_array("last_page_len", last_page_len)
        dev_ix = None
        if fast and hasattr(indices, "__dlpack_device__") and int(indices.__dlpack_device__()[0]) != 1:
            info = arrays.describe(indices, "indices")
            if info.dtype == dt.int32 and info.ndim == 1 and info.is_contiguous() and \
                    (not self._use_cuda_graph or "paged_kv_indices_buffer" in self._buffers):
                if info.shape[0] < ip[-1]:
                    raise ValueError(f"indices: has {info.shape[0]} entries but indptr[-1] is {ip[-1]}")
                dev_ix = info
        ix = None if dev_ix is not None else checks.host_index_array("indices", indices)
        if seq_lens is not None:
            want = checks.host_int_array("seq_lens", seq_lens)
            got = page_table_lengths(ip, None, lp, page)[0]
            if want.shape != got.shape or np.any(want != got):
                raise ValueError("seq_lens: does not match the lengths that indptr and last_page_len give")
        return ip, ix, lp, dev_ix

    def _place_indices(self, plan: DecodePlan, ix, dev_ix, s: int) -> DecodePlan:
        """Where the kernel reads the page indices: the CUDA-graph indices buffer (filled here), the
        caller's device array (fast_decode_plan), or the metadata block."""
        buf = self._buffers.get("paged_kv_indices_buffer") if self._use_cuda_graph else None
        n = int(plan.meta[plan.offsets["page_indptr"] + plan.batch_size])
        if buf is not None:
            if n > buf.shape[0]:
                raise ValueError(f"paged_kv_indices_buffer: holds {buf.shape[0]} page indices; this plan uses {n}")
            if dev_ix is not None:
                device_copy(dev_ix, buf, 4 * n, s)
            elif n:
                upload(np.ascontiguousarray(ix[:n], dtype=np.int32), buf.ptr, self._ws.device, s)
            return replace(plan, indices_ptr=buf.ptr, keep=(buf,))
        if dev_ix is not None:
            return replace(plan, indices_ptr=dev_ix.ptr, keep=(dev_ix,))
        return plan

    def _fill_buffers(self, ip: np.ndarray, lp: np.ndarray, s: int) -> None:
        """FlashInfer's plan() writes indptr and last_page_len into the CUDA-graph buffers: so do we."""
        for name, a in (("paged_kv_indptr_buffer", ip), ("paged_kv_last_page_len_buffer", lp)):
            buf = self._buffers.get(name)
            if buf is not None and a.size:
                if a.size > buf.shape[0]:
                    raise ValueError(f"{name}: holds {buf.shape[0]} entries; this plan writes {a.size}")
                upload(a.astype(np.int32), buf.ptr, self._ws.device, s)

    def _plan_multi(self, params: DecodeParams, ip, ix, lp, q_len: int, causal: bool, kw: dict, non_blocking: bool,
                    dry: bool, fast: bool):
        """q_len_per_req > 1 (or a custom variant the decode kernel cannot take) runs the paged prefill kernel: request b's queries are
        rows b * q_len .. (b + 1) * q_len of q, the last q_len positions of its KV."""
        from . import prefill  # it takes every head dim decode does
        if self._multi is None:
            self._multi = prefill.BatchPrefillWithPagedKVCacheWrapper(self._ws_obj, self._kv_layout,
                                                                      self._use_cuda_graph, jit_args=self._variant)
        args = (np.arange(ip.size) * q_len, ip, ix, lp, params.num_qo_heads, params.num_kv_heads, params.head_dim,
                params.page_size)
        opts = dict(causal=causal, pos_encoding_mode=params.pos_encoding_mode,
                    sm_scale=params.sm_scale if self._variant is None else kw["sm_scale"],
                    window_left=params.window_left, logits_soft_cap=params.soft_cap or None,
                    rope_scale=params.rope_scale, rope_theta=params.rope_theta, q_data_type=params.q_dtype,
                    kv_data_type=params.kv_dtype, fixed_split_size=kw["fixed_split_size"],
                    disable_split_kv=kw["disable_split_kv"])
        if dry:
            return self._multi.workspace_size(*args, **opts)[0]
        self._multi.plan(*args, **opts, stream=kw["stream"])
        s = streams.resolve(kw["stream"], self._ws.framework, self._ws.device)
        if self._use_cuda_graph and not fast:
            self._fill_buffers(ip, lp, s)
        self._finish(None, q_len, s, non_blocking)
        self._last_plan = ((ip, ix, lp), kw, False, None)

    @document('Decode attention of the planned batch.', returns=RUN_RETURNS, params=RUN_OPTIONS)
    def run(self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None,
            return_lse: bool = False, enable_pdl=None, window_left=None, sinks=None, q_len_per_req=None,
            skip_softmax_threshold_scale_factor=None, kv_cache_sf=None, stream=None):
        """o (batch_size, num_qo_heads, head_dim) in q's dtype, and lse (batch_size, num_qo_heads) in
        base 2 with return_lse=True. q_scale, k_scale, v_scale: floats (None: 1) that scale the
        logits (q, k) and the output (v), for fp8 caches."""
        if args and self._variant is None:
            raise TypeError(f"run(): unexpected extra positional arguments ({len(args)}); they are a custom "
                            f"variant's (jit_args), and this wrapper has none")
        checks.unsupported("skip_softmax_threshold_scale_factor", skip_softmax_threshold_scale_factor)
        checks.unsupported("kv_cache_sf", kv_cache_sf)
        if self._plan is None and not self._via_prefill:
            raise RuntimeError("run() called before plan()")
        if q_len_per_req is not None and q_len_per_req != self._q_len:
            raise ValueError(f"q_len_per_req: run() got {q_len_per_req} but plan() used {self._q_len}")
        qk_scale = scale("q_scale", q_scale) * scale("k_scale", k_scale)  # both scale the logits
        if self._via_prefill:
            return self._multi.run(q, paged_kv_cache, *args, k_scale=qk_scale, v_scale=v_scale, out=out, lse=lse,
                                   return_lse=return_lse, enable_pdl=enable_pdl, window_left=window_left,
                                   sinks=sinks, stream=stream)
        p = self._plan.params
        if window_left is not None and window_left != p.window_left:
            raise NotImplementedError(f"window_left: run() got {window_left} but plan() used "
                                      f"{p.window_left}; the window is part of the plan's schedule")
        vs = scale("v_scale", v_scale)
        if p.variant is not None:  # its extra arguments packed anew each call (no recording)
            check_variant_run(p.variant, return_lse, sinks, qk_scale)
            return self._run(q, paged_kv_cache, out, lse, return_lse, qk_scale, vs, enable_pdl, sinks, stream, args)
        parts = cache_parts(paged_kv_cache)
        # the plan's page table against this cache, which _run checks: recorded calls outlive re-plans
        fits = self._plan.max_page < _pages_of(parts[0])
        return self._sigs((q, *parts, out, lse, sinks), (qk_scale, vs, return_lse, enable_pdl, fits),
                          stream, lambda: self._run(q, paged_kv_cache, out, lse, return_lse, qk_scale, vs, enable_pdl,
                                                    sinks, stream))

    def _run(self, q, paged_kv_cache, out, lse, return_lse, qk_scale, v_scale, enable_pdl, sinks, stream,
             variant_args: tuple = ()):
        plan = self._plan
        p = plan.params
        c = Call(q, stream, enable_pdl, "q")
        qi = c.arg(q, "q")
        _check_q(qi, p, (plan.batch_size,))
        kv = describe_paged_cache(c, paged_kv_cache, self._kv_layout)
        kv = check_cache_against(kv, p, plan.max_page)
        out_obj, o, lse_obj, l_info = attention_outputs(c, qi, out, lse, return_lse,
                                                        "(batch_size, num_qo_heads, head_dim)",
                                                        "(batch_size, num_qo_heads)")
        sk = attention_sinks(c, sinks, p.num_qo_heads)
        checks.same_device(qi, self._ws)
        launch_decode(c, plan, self._ws.ptr + plan.partial_bytes(), self._ws.ptr, qi, kv, o, l_info, qk_scale,
                      v_scale, self._use_cuda_graph, sk, variant_args)
        c.infos.extend(plan.keep)
        return attention_result(c, out_obj, lse_obj, return_lse)

    @document("run() with return_lse=True.", returns="(o, lse) : (array, float32 array)\n    The output and its log-sum-exp (base 2), lse of shape q.shape[:-1].")
    def run_return_lse(self, q, paged_kv_cache, *args, **kwargs):
        """FlashInfer's name for run(..., return_lse=True); the keywords are run()'s."""
        return self.run(q, paged_kv_cache, *args, return_lse=True, **kwargs)

    @document("FlashInfer's legacy call: its options replace the plan's, then run().", returns="o : array\n    The attention output, q's shape and dtype.")
    def forward(self, q, paged_kv_cache, pos_encoding_mode: str = "NONE", q_scale=None, k_scale=None, v_scale=None,
                window_left: int = -1, logits_soft_cap: float | None = None, sm_scale: float | None = None,
                rope_scale: float | None = None, rope_theta: float | None = None):
        """FlashInfer's legacy call: its attention options replace the plan's (re-planned when they
        differ), then run()."""
        self._override(pos_encoding_mode=pos_encoding_mode, window_left=window_left, logits_soft_cap=logits_soft_cap,
                       sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta)
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)

    @document('forward() that also returns the log-sum-exp.', returns="(o, lse) : (array, float32 array)\n    The output and its log-sum-exp (base 2), lse of shape q.shape[:-1].")
    def forward_return_lse(self, q, paged_kv_cache, pos_encoding_mode: str = "NONE", q_scale=None, k_scale=None,
                           v_scale=None, window_left: int = -1, logits_soft_cap: float | None = None,
                           sm_scale: float | None = None, rope_scale: float | None = None,
                           rope_theta: float | None = None):
        """forward() returning (o, lse)."""
        self._override(pos_encoding_mode=pos_encoding_mode, window_left=window_left, logits_soft_cap=logits_soft_cap,
                       sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta)
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, return_lse=True)


@document("FlashInfer's CUDA-graph decode wrapper (use_cuda_graph=True with fixed index buffers).")
class CUDAGraphBatchDecodeWithPagedKVCacheWrapper(BatchDecodeWithPagedKVCacheWrapper):
    """FlashInfer's CUDA-graph decode wrapper: use_cuda_graph=True with the index buffers that fix
    the batch size (len(last_page_len_buffer)) and the most pages (len(indices_buffer))."""

    def __init__(self, workspace_buffer, indptr_buffer, indices_buffer, last_page_len_buffer, kv_layout: str = "NHD",
                 use_tensor_cores: bool = False):
        super().__init__(workspace_buffer, kv_layout, True, use_tensor_cores, indptr_buffer, indices_buffer,
                         last_page_len_buffer)


@document("Re-plan a decode wrapper cheaply between CUDA-graph replays (FlashInfer's fast_decode_plan).", skip=(), params={'q_data_type': 'str or dtype, optional\n    float16 or bfloat16; None: data_type, else float16.'})
def fast_decode_plan(self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                     page_size: int, pos_encoding_mode: str = "NONE", window_left: int = -1,
                     logits_soft_cap: float | None = None, q_data_type=None, kv_data_type=None, data_type=None,
                     sm_scale: float | None = None, rope_scale: float | None = None, rope_theta: float | None = None,
                     non_blocking: bool = True, fixed_split_size: int | None = None, disable_split_kv: bool = False,
                     q_len_per_req: int = 1, global_override_indptr_cpu=None) -> None:
    """FlashInfer's cheaper re-plan of a decode wrapper (`self`), as SGLang calls it between CUDA-graph
    replays: the same plan as plan(), but device `indices` (int32) stay on the device and are not
    checked (the kernel reads them, or a copy in the wrapper's indices buffer, as FlashInfer's does:
    a page index past the cache is the caller's error, as there), indptr is read from
    global_override_indptr_cpu when given (no device-to-host copy), and with page_size 1 a device
    last_page_len is not read (a non-empty request's last page is full)."""
    if data_type is not None:
        q_data_type = data_type if q_data_type is None else q_data_type
        kv_data_type = data_type if kv_data_type is None else kv_data_type
    kw = dict(num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
              pos_encoding_mode=pos_encoding_mode, window_left=window_left, logits_soft_cap=logits_soft_cap,
              q_data_type="float16" if q_data_type is None else q_data_type, kv_data_type=kv_data_type,
              o_data_type=None, data_type=None, sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta,
              non_blocking=non_blocking, block_tables=None, seq_lens=None, fixed_split_size=fixed_split_size,
              disable_split_kv=disable_split_kv, q_len_per_req=q_len_per_req, window_right=None, is_causal=None,
              stream=None)
    if not isinstance(self, BatchDecodeWithPagedKVCacheWrapper):
        raise TypeError(f"self: expected a BatchDecodeWithPagedKVCacheWrapper, got {type(self).__name__}")
    self._plan_impl((indptr, indices, last_page_len), kw, fast=True, indptr_host=global_override_indptr_cpu)


# Single decode: plans cached by shape (a small LRU: a decode loop grows kv_len every step), scratch
# (metadata + partials) cached per (device, stream).
_single_plans = PlanCache()
_single_scratch: dict = {}
_single_sigs = Signatures(per_stream=True)  # single_decode's recorded calls: they read _single_scratch


@document("Decode attention of one query token against one request's K and V.", returns="o : array\n    (num_qo_heads, head_dim), q's dtype.\nlse : float32 array\n    Only with return_lse=True: (o, lse), lse (num_qo_heads,) in base 2.")
def single_decode_with_kv_cache(q, k, v, kv_layout: str = "NHD", pos_encoding_mode: str = "NONE",
                                use_tensor_cores: bool = False, q_scale: float | None = None,
                                k_scale: float | None = None, v_scale: float | None = None,
                                window_left: int = -1, logits_soft_cap: float | None = None,
                                sm_scale: float | None = None, rope_scale: float | None = None,
                                rope_theta: float | None = None, return_lse: bool = False,
                                out=None, lse=None, stream=None):
    """Decode attention of one query token: q (num_qo_heads, head_dim) against k, v of shape
    (kv_len, num_kv_heads, head_dim) [NHD] or (num_kv_heads, kv_len, head_dim) [HND].
    Returns o (num_qo_heads, head_dim), and lse (num_qo_heads,) in base 2 with return_lse=True.
    use_tensor_cores is accepted for compatibility; the same kernel runs either way."""
    checks.flag("use_tensor_cores", use_tensor_cores)
    opts = (kv_layout, pos_encoding_mode, q_scale, k_scale, v_scale, window_left, logits_soft_cap, sm_scale,
            rope_scale, rope_theta, return_lse)

    def full():
        return _single_decode(q, k, v, *opts, out, lse, stream)
    return _single_sigs((q, k, v, out, lse), opts, stream, full) if plain(opts) else full()


def _single_decode(q, k, v, kv_layout, pos_encoding_mode, q_scale, k_scale, v_scale, window_left, logits_soft_cap,
                   sm_scale, rope_scale, rope_theta, return_lse, out, lse, stream,
                   variant: AttentionVariant | None = None, variant_args: tuple = ()):
    """single_decode_with_kv_cache's work, with a custom variant or without (a variant the decode kernel
    cannot take runs on the prefill kernel: takes_variant)."""
    checks.choice("kv_layout", kv_layout, LAYOUTS)
    c = Call(q, stream, name="q")
    qi = c.arg(q, "q")
    kv, kv_len = describe_kv_pair(c, k, v, kv_layout)
    checks.ndim(qi, 2, "(num_qo_heads, head_dim)")
    hkv = kv.num_kv_heads
    if kv.head_dim != qi.shape[1]:
        raise ValueError(f"k: head_dim {kv.head_dim} does not match q's head_dim {qi.shape[1]}")
    checks.dtype_in(qi, Q_DTYPES)
    checks.dtype_in(kv.infos[0], KV_DTYPES[qi.dtype], f" with q {qi.dtype}")
    params = make_params(qi.shape[0], hkv, qi.shape[1], max(kv_len, 1), pos_encoding_mode, window_left,
                         logits_soft_cap, qi.dtype, kv.dtype, sm_scale, rope_scale, rope_theta, variant)
    dev = c.device
    if variant is not None:
        if not takes_variant(params, params.kv_dtype, dev):
            from .prefill import _single_prefill  # one query row on the prefill kernel
            got = _single_prefill(q[None], k, v, None, None, None, False, kv_layout, "NONE", None, window_left, None,
                                  None, None, "fa2", return_lse, k_scale, v_scale, None if out is None else out[None],
                                  None if lse is None else lse[None], stream, variant, variant_args)
            return (got[0][0], got[1][0]) if return_lse else got[0]
        check_variant_run(variant, return_lse, None, scale("q_scale", q_scale) * scale("k_scale", k_scale))
    if q_scale is not None:
        params.sm_scale *= checks.float_arg("q_scale", q_scale)
    _check_q(qi, params, ())
    out_obj, o, lse_obj, l_info = attention_outputs(c, qi, out, lse, return_lse, "(num_qo_heads, head_dim)",
                                                    "(num_qo_heads,)")
    key = (dev, kv_len, params.num_qo_heads, hkv, params.head_dim, params.window_left, params.q_dtype,
           params.kv_dtype, params.rope, params.alibi, variant)
    plan = _single_plans.get(key, lambda: plan_decode(params, np.array([0, 1 if kv_len else 0]), np.zeros(1, np.int64),
                                                       np.array([kv_len]), decode_num_ctas(params, params.kv_dtype, dev),
                                                       split=None if variant is None else variant_split(variant, None)))
    plan = replace(plan, params=params)
    # Metadata lives after the partials, as in the wrapper's workspace; uploaded once per shape.
    base = single_call_meta(_single_scratch, dev, c.stream, c.framework, key, plan.meta, plan.partial_bytes(),
                            _single_sigs)
    launch_decode(c, plan, base + plan.partial_bytes(), base, qi, kv, o, l_info, scale("k_scale", k_scale),
                  scale("v_scale", v_scale), variant_args=variant_args)
    return attention_result(c, out_obj, lse_obj, return_lse)


@document("Decode attention of one query token with a custom attention variant.", returns="o : array\n    (num_qo_heads, head_dim_vo), q's dtype.\nlse : float32 array\n    Only with return_lse=True: (o, lse), lse (num_qo_heads,) in base 2.")
def single_decode_with_kv_cache_with_jit_module(jit_module, q, k, v, *args, kv_layout: str = "NHD",
                                                window_left: int = -1, return_lse: bool = False, out=None, lse=None,
                                                stream=None):
    """single_decode_with_kv_cache with a custom variant: jit_module from
    fi_cupy.jit.gen_customize_single_decode_module(...).build_and_load() (or an AttentionVariant); args:
    the variant's extra parameters, tensors then scalars. Runs on the tensor-core decode kernel (KV of the
    q dtype, head dims up to 256), else on the prefill kernel with one query row."""
    return _single_decode(q, k, v, kv_layout, "NONE", None, None, None, window_left, None, None, None, None,
                          return_lse, out, lse, stream, as_variant(jit_module, "jit_module"), args)


@document("FlashInfer's cached batch-decode module for a custom variant.", returns="module : fi_cupy.variant.JitModule\n    The variant module, for BatchDecodeWithPagedKVCacheWrapper's jit_args.")
def get_batch_decode_jit_module(module_name, jit_module):
    """The variant module `jit_module` cached under `module_name` (as FlashInfer's, which loads a compiled
    module once per name); pass it as BatchDecodeWithPagedKVCacheWrapper's jit_args. Nothing compiles here."""
    from .variant import named_module
    return named_module(module_name, jit_module, "batch_decode")
