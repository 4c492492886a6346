"""Host cost of plan() without the GPU (issue 21): decode.plan_decode (page-table check, split-KV schedule,
metadata) and the paged prefill plan's host part (page_table_lengths, plan_tile, plan_prefill: what
BatchPrefillWithPagedKVCacheWrapper.plan() does before its upload), at batch 1, 16, 128, 512.

Shapes as bench/bench_host.py's plan rows: kv 1024 tokens a request, page 16, 32/8 heads, head_dim 128;
prefill: 16 new tokens a request, causal. The "mixed" columns plan batches of the same mean lengths
drawn at random (kv 1..2047 tokens, prefill 1..31 new ones), which the uniform batches' closed forms
do not serve. Decode gets num_ctas = 132 x 4 (H100 SMs x resident CTAs); prefill gets 132 x the CTAs
of its tile that fit an SM's shared memory. Median of N single calls, in us.

The last two columns time the wrappers' whole plan() (bench_host.py's call) with the device stubbed
(stub_device): no GPU is touched, so run it on a machine without one (or in a process of its own).

Usage: python bench/bench_plan_cpu.py [--calls N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, save_json  # noqa: E402

from fi_cupy import decode, prefill  # noqa: E402
from fi_cupy.page import page_table_lengths  # noqa: E402

BATCHES = (1, 16, 128, 512)
HQ, HKV, D, PAGE = 32, 8, 128, 16
KV_LEN, QO_LEN = 1024, 16
SMS = 132
DECODE_CTAS = SMS * 4
SMEM_PER_SM = 227 * 1024
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")  # FakeCudaArray's module


def decode_tables(batch: int, mixed: bool = False) -> tuple:
    """(indptr, indices, last_page_len) of `batch` requests of KV_LEN tokens (mixed: 1..2 * KV_LEN - 1,
    drawn), pages shuffled."""
    rng = np.random.default_rng(batch)
    lens = rng.integers(1, 2 * KV_LEN, batch) if mixed else np.full(batch, KV_LEN)
    pages = -(-lens // PAGE)
    indptr = np.concatenate([[0], np.cumsum(pages)])
    return indptr, rng.permutation(int(indptr[-1])), lens - (pages - 1) * PAGE


def qo_lens(batch: int, mixed: bool = False) -> np.ndarray:
    """New tokens a request: QO_LEN, or (mixed) 1..2 * QO_LEN - 1 drawn."""
    return np.random.default_rng(batch + 1).integers(1, 2 * QO_LEN, batch) if mixed else np.full(batch, QO_LEN)


def decode_call(batch: int, mixed: bool = False):
    params = decode.make_params(HQ, HKV, D, PAGE, "NONE", -1, None, "float16", None, None, None, None)
    indptr, indices, last = decode_tables(batch, mixed)
    return lambda: decode.plan_decode(params, indptr, indices, last, num_ctas=DECODE_CTAS)


def prefill_call(batch: int, mixed: bool = False):
    params = prefill.make_params(HQ, HKV, D, None, True, "NONE", -1, None, None, None, None, "float16", None,
                                 paged=True, page_size=PAGE)
    indptr, indices, last = decode_tables(batch, mixed)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens(batch, mixed))])

    def host_plan():
        # What _plan_impl and _finish_plan compute on the host, in their order (int32 casts included).
        kv_lens, used, top = page_table_lengths(indptr, indices, last, PAGE, "paged_kv_")
        qo, ip, kv = (a.astype(np.int32) for a in (qo_indptr, indptr, kv_lens))
        tile, _ = prefill.plan_tile(params, qo[1:] - qo[:-1], False, "fa2")
        return prefill.plan_prefill(params, qo, ip, kv, (used, top), tile, prefill_ctas(tile, params.kv_dtype), None)
    return host_plan


def prefill_ctas(tile, kv_dtype) -> int:
    """The prefill grid's CTAs on the H100 assumed here: SMS x the CTAs of `tile` that fit an SM."""
    return SMS * max(1, SMEM_PER_SM // prefill.smem_bytes(D, tile, kv_dtype))


def stub_device() -> None:
    """Let the wrappers' plan() run on a machine without a GPU: the current stream is 0, uploads are the
    staging copy alone (none for metadata packed in the wrapper's pinned memory, numpy's here), the
    device is an H100 (132 SMs, 227 KB of shared memory a CTA) and the CTA counts are the ones above
    (they load a kernel on a GPU). Decode's schedule kernel is not launched
    (a launch's host cost, a few us on a GPU host, is not in these figures). For the wrapper columns only."""
    from fi_cupy import decode_schedule
    from fi_cupy._core import kernels, streams, workspace
    decode_schedule.launch_schedule = lambda *args: None

    def upload(host, ptr, device, stream, pinned=None):  # the staging copy, unless packed in pinned memory
        if pinned is None:
            staging = np.empty(host.nbytes, np.uint8)
            staging[:] = host.reshape(-1).view(np.uint8)
    workspace.PinnedSlots.empty = lambda self, n: np.empty(n, np.int32)
    streams.resolve = lambda stream, framework, device: 0
    for mod in (workspace, decode, prefill):
        mod.upload = upload
    props = {"name": "H100 (stub)", "sms": SMS, "smem_optin": 227 * 1024, "smem_sm": SMEM_PER_SM, "cc": 90}
    kernels.device_props = lambda device=0: props
    kernels.device_arch = lambda device=0: "sm_90a"
    decode.decode_num_ctas = lambda params, kv_dtype, device: DECODE_CTAS
    prefill.num_ctas = lambda params, tile, device, paged, flags: prefill_ctas(tile, params.kv_dtype)


def wrapper_call(batch: int, which: str, mixed: bool = False):
    """BatchDecodeWithPagedKVCacheWrapper.plan() or BatchPrefillWithPagedKVCacheWrapper.plan() in full
    (checks, schedule, packing, the staging copy), as bench_host.py calls it, with the device stubbed."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from test_core_cpu import FakeCudaArray  # a DLPack producer of a fake device array
    ws = FakeCudaArray((256 << 20,), None, code=1, bits=8)
    indptr, indices, last = decode_tables(batch, mixed)
    if which == "decode":
        w = decode.BatchDecodeWithPagedKVCacheWrapper(ws)
        return lambda: w.plan(indptr, indices, last, HQ, HKV, D, PAGE, q_data_type="float16")
    w = prefill.BatchPrefillWithPagedKVCacheWrapper(ws)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens(batch, mixed))])
    return lambda: w.plan(qo_indptr, indptr, indices, last, HQ, HKV, D, PAGE, causal=True, q_data_type="float16")


def device_scheduled(fn):
    """fn with decode.DEVICE_SCHEDULE on: the host picks the quota and leaves the schedule to the kernel
    (whose launch stub_device skips)."""
    def call():
        was, decode.DEVICE_SCHEDULE = decode.DEVICE_SCHEDULE, True
        try:
            fn()
        finally:
            decode.DEVICE_SCHEDULE = was
    return call


def median_us(fn, calls: int, warmup: int = 20) -> float:
    """Median wall time of single fn() calls, microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="timed calls a cell (median taken)")
    ap.add_argument("--json", help="also write the figures here ($OUT/bench_plan_cpu.json where OUT is set)")
    args = ap.parse_args()
    rows = []
    stub_device()
    cells = (("plan_decode_us", decode_call, False), ("plan_decode_mixed_us", decode_call, True),
             ("prefill_host_us", prefill_call, False), ("prefill_host_mixed_us", prefill_call, True),
             ("decode_wrapper_plan_us", lambda b, m: wrapper_call(b, "decode", m), False),
             ("decode_device_schedule_plan_us", lambda b, m: device_scheduled(wrapper_call(b, "decode", m)), False),
             ("prefill_wrapper_plan_us", lambda b, m: wrapper_call(b, "prefill", m), False))
    for batch in BATCHES:
        rows.append({"batch": batch, **{key: round(median_us(make(batch, mixed), args.calls), 1)
                                        for key, make, mixed in cells}})
    print_table(f"plan() host part, median of {args.calls} calls, us (decode num_ctas {DECODE_CTAS}); the "
                f"wrappers' whole plan() with the device stubbed",
                ["batch", "plan_decode", "decode mixed", "prefill host", "prefill mixed", "decode plan()",
                 "decode plan(), schedule on the device",
                 "prefill plan()"],
                [[r["batch"]] + [r[key] for key, _, _ in cells] for r in rows])
    save_json("bench_plan_cpu.json", rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
