"""Decode's split-KV schedule built on the device: BatchDecodeWithPagedKVCacheWrapper.plan() picks the quota
on the host (scheduler.decode_quota) and cuda_src/decode_schedule.cu writes the segments, partial rows, CTA
ranges and merges into the plan's metadata block, element for element scheduler.decode_schedule's. The
host then does no per-pair work and uploads only the request arrays and page indices (issue 21: plan()
at batch 512 was mostly numpy calls over every (request, head block) pair).

The kernel is one CTA on the plan's stream, queued after the upload of the lengths it reads and before
any run(): the same stream order as an upload, so a CUDA graph captured over run() replays each re-plan.
"""
from __future__ import annotations

from ._core import kernels
from ._core.kernels import DevPtr, KernelSpec, Program, i32, i64

THREADS = 1024  # the kernel's block (kScheduleThreads, checked at compile time)
# Batches of up to STAGED_REQUESTS requests: the kernel keeps its request prefixes in STAGED_BYTES of dynamic
# shared memory (kStagedRequests, kStagedBytes) instead of the scratch parts.
STAGED_REQUESTS, STAGED_BYTES = 2047, 2048 * 16
# Parts of the metadata block the kernel writes (int32 elements), before the parts the host uploads.
DEVICE_PARTS = ("segments", "segment_partial", "cta_indptr", "merge_pairs", "merge_indptr", "cum", "empty_before")


def schedule_program() -> Program:
    return Program("decode_schedule.cu", (KernelSpec("fic::decode_schedule_kernel", ()),),
                   asserts=(("fic::kScheduleThreads", THREADS), ("fic::kStagedRequests", STAGED_REQUESTS),
                            ("fic::kStagedBytes", STAGED_BYTES)))


def all_programs() -> list:
    return [schedule_program()]


def _program_and_kernel() -> tuple:
    prog = schedule_program()
    return prog, prog.kernels[0]


def device_parts(batch: int, seg_cap: int, num_ctas: int, merge_cap: int) -> list:
    """(name, None, int32 capacity) of DEVICE_PARTS for pack_meta: the schedule at its capacities and the
    kernel's scratch (cum: batch + 1 int64, 16-byte aligned as every part)."""
    caps = (4 * seg_cap, seg_cap, num_ctas + 1, merge_cap, merge_cap + 1, 2 * (batch + 1), batch + 1)
    return list(zip(DEVICE_PARTS, (None,) * len(caps), caps))


def launch_schedule(meta_ptr: int, offsets: dict, batch: int, head_blocks: int, num_ctas: int, quota: int,
                    window_left: int, merge_cap: int, stream: int, device: int) -> None:
    """Queue the schedule kernel on `stream`: it reads the plan's kv_lens (uploaded before) and writes the
    DEVICE_PARTS of the metadata block at meta_ptr (offsets: pack_meta's, int32 elements)."""
    smem = STAGED_BYTES if batch <= STAGED_REQUESTS else 0
    launch = _launches.get((device, smem))
    if launch is None:  # plan() launches every step: its Prepared is kept, and fed plain ints
        fn = kernels.cached_function(device, ("decode_schedule",), _program_and_kernel)
        launch = _launches[(device, smem)] = kernels.Prepared(fn, (1,), (THREADS,), _SIGNATURE, device, smem)
    at = {part: meta_ptr + 4 * off for part, off in offsets.items()}
    launch([at["kv_lens"], batch, head_blocks, num_ctas, quota, window_left, at["cum"], at["empty_before"],
            at["segments"], at["segment_partial"], at["cta_indptr"], at["merge_pairs"], at["merge_indptr"],
            merge_cap], stream)


# The kernel's parameters (kernels.signature_of of its arguments), in launch_schedule's order.
_SIGNATURE = (DevPtr, i32, i32, i32, i64, i32) + (DevPtr,) * 7 + (i32,)
_launches: dict = {}  # (device, dynamic shared memory) -> kernels.Prepared
