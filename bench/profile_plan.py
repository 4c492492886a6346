"""Host cost of the calls that are not on the per-signature fast path (issue 21): plan() of the decode and
paged-prefill wrappers and the cascade wrapper's run(), with bench_host.py's shapes and a CuPy caller.
For each: wall time per call (between syncs, as bench_host.py times plan()), then cProfile's top entries
by cumulative and by own time.

    python bench/profile_plan.py [--only decode_plan,prefill_plan,cascade_run] [--batch 16] [-n 200]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_host as bh  # noqa: E402

import fi_cupy  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="decode_plan,prefill_plan,cascade_run")
    ap.add_argument("--batch", type=int, default=16, help="plan() batch size")
    ap.add_argument("-n", type=int, default=200, help="calls profiled")
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args()
    mk = bh.Maker("cupy")
    builders = {"decode_plan": bh.b_decode_plan(args.batch), "prefill_plan": bh.b_prefill_plan(args.batch),
                "cascade_run": bh.b_cascade_run}
    for name in args.only.split(","):
        fn = builders[name](fi_cupy, mk)
        us = bh.synced_us(fn, args.n, 5, bh.device_sync)
        print(f"\n=== {name} (batch {args.batch}): {us:.1f} us per call, median between syncs")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.n):
            fn()
        bh.device_sync()
        pr.disable()
        st = pstats.Stats(pr)
        st.sort_stats("cumulative").print_stats(args.top)
        st.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
