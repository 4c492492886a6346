"""Decode plan() with its schedule built on the host against on the device (decode.DEVICE_SCHEDULE),
interleaved in one process so that the host's noise hits both alike: medians of 8 x 100 calls each way,
each call between two device syncs, at bench_host.py's decode plan shapes (CuPy caller). Then the schedule
launch alone: its host time and CUDA events around it (host launch + kernel). Needs a GPU; for where the
host time goes, bench/profile_plan.py.

Usage: python bench/decode_plan_ab.py
"""
import os
import statistics
import sys
import time

import cupy as cp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_host  # noqa: E402

import fi_cupy  # noqa: E402
from fi_cupy import decode, decode_schedule  # noqa: E402

BATCHES = (1, 16, 128, 512)


def schedule_launch(fn) -> tuple:
    """(host us, events us) medians of the schedule launch inside fn() (a plan on the device schedule)."""
    orig, host, gpu = decode_schedule.launch_schedule, [], []

    def timed_launch(*a):
        s = cp.cuda.ExternalStream(a[-2])
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(s)
        t = time.perf_counter()
        orig(*a)
        host.append(time.perf_counter() - t)
        e1.record(s)
        e1.synchronize()
        gpu.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3)
    decode_schedule.launch_schedule = timed_launch
    try:
        for _ in range(200):
            fn()
    finally:
        decode_schedule.launch_schedule = orig
    return 1e6 * statistics.median(host[20:]), 1e6 * statistics.median(gpu[20:])


def main() -> None:
    mk, was = bench_host.Maker("cupy"), decode.DEVICE_SCHEDULE
    try:
        for b in BATCHES:
            fn = bench_host.b_decode_plan(b)(fi_cupy, mk)
            got = {False: [], True: []}
            for _ in range(9):  # the first round warms up
                for flag in got:
                    decode.DEVICE_SCHEDULE = flag
                    got[flag] += bench_host.synced_times(fn, 100, bench_host.device_sync)
            med = {f: 1e6 * statistics.median(t[100:]) for f, t in got.items()}
            decode.DEVICE_SCHEDULE = True
            host, gpu = schedule_launch(fn)
            print(f"batch {b}: host schedule {med[False]:.1f} us, device schedule {med[True]:.1f} us "
                  f"(its launch: {host:.1f} us host, {gpu:.1f} us to the kernel's end)")
    finally:
        decode.DEVICE_SCHEDULE = was


if __name__ == "__main__":
    main()
