"""Experiment: where the decode time goes on the bandwidth-bound shapes, as % of copy (the bytes of
bench_decode.py). Variants, each on the same shapes in one process:
  default     the plan as shipped
  no-merge    the same plan with the merge launch left out (wrong output: timing only)
  aligned     quotas a whole number of (request, head block) pairs, so no pair is cut and nothing
              merges (some CTAs of the wave may stay idle)
  ctas=N      a wave of N CTAs an SM instead of what occupancy allows
  python bench/decode_probe.py [--shapes BxL,...] [--variants default,no-merge,aligned,ctas=3]"""
import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode  # noqa: E402
import common  # noqa: E402

from fi_cupy import decode, scheduler  # noqa: E402
from fi_cupy._core import kernels  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shapes", default="512x512,256x4096,128x1024,64x2048,16x4096")
ap.add_argument("--variants", default="default,no-merge,aligned,ctas=3,ctas=2")
args = ap.parse_args()
shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

torch = common.torch_or_none()
bw = common.copy_bandwidth()
pick_quota, launch, num_ctas = scheduler._pick_quota, decode.launch_decode, decode.decode_num_ctas


def aligned_quota(cum, n, min_quota):
    q0 = pick_quota(cum, n, min_quota)
    pair = int(np.diff(cum).max())
    return max(q0, -(-q0 // pair) * pair) if pair else q0


def no_merge_launch(plan, *a, **k):
    return launch(dataclasses.replace(plan, num_merges=0), *a, **k)


for b, l in shapes:
    row = []
    for v in args.variants.split(","):
        scheduler._pick_quota, decode.launch_decode, decode.decode_num_ctas = pick_quota, launch, num_ctas
        decode._num_ctas.clear()
        if v == "no-merge":
            decode.launch_decode = no_merge_launch
        elif v == "aligned":
            scheduler._pick_quota = aligned_quota
        elif v.startswith("ctas="):
            per_sm = int(v[5:])
            decode.decode_num_ctas = lambda *a, _n=per_sm: kernels.device_props(0)["sms"] * _n
        t, _, nbytes = bench_decode.bench_fi_cupy(torch, b, l)
        row.append(f"{v} {t * 1e6:.1f} us {nbytes / t / bw:.1%}")
        torch.cuda.empty_cache()
    print(f"{b}x{l}: " + " | ".join(row), flush=True)
scheduler._pick_quota, decode.launch_decode, decode.decode_num_ctas = pick_quota, launch, num_ctas
