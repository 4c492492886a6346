"""Experiment: the ring softmax at several shapes (CTAs a cluster, CTAs an SM) against the one
sampling.softmax_ring_shape picks and torch.softmax, as % of the copy bandwidth (one read and one
write of the rows). Prints the clusters each shape keeps resident.
  python bench/softmax_probe.py [--shapes C@M,...] [--cases VOCABxBATCH,...]"""
import argparse
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import copy_bandwidth, time_graph  # noqa: E402

import torch  # noqa: E402

from fi_cupy import sampling  # noqa: E402
from fi_cupy._core import kernels  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shapes", default="3@1,4@1,5@1,8@1,6@2,7@2,8@2", help="forced (cluster)@(CTAs an SM) shapes")
ap.add_argument("--cases", default="128256x128,128256x512,128256x256,128256x64,128256x32,128256x1,"
                "151936x128,32000x512,256000x128", help="vocab x batch")
args = ap.parse_args()
forced = [tuple(int(v) for v in s.split("@")) for s in args.shapes.split(",") if s]

bw = copy_bandwidth()
props = kernels.device_props(0)
for per_sm in (1, 2):
    smem = sampling.ring_slots(props, per_sm) * sampling.RING_CHUNK * 4
    print(f"{per_sm} CTA(s) an SM, {smem} B: resident clusters of 1..16 CTAs",
          [sampling.ring_resident(0, c, per_sm) for c in range(1, 17)], flush=True)

for vocab, batch in [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]:
    x = torch.randn((batch, vocab), device="cuda") * 3
    ideal = 2 * x.numel() * 4 / bw
    ref = torch.softmax(x, -1)
    key = (0, vocab, batch)
    sampling._ring_plans.pop(key, None)
    chosen = sampling._ring_plan(0, vocab, batch)
    rows = []
    for cluster, per_sm in [(None, None)] + forced:
        if cluster is None:
            plan, desc = chosen, "chosen"
        else:
            chunks = sampling.ring_slice(vocab, cluster)[1]
            if chunks - sampling.ring_hold(per_sm) >= sampling.ring_slots(props, per_sm) or batch * cluster < 64:
                continue
            plan = sampling.ring_plan(0, vocab, batch, cluster, per_sm)
            desc = f"{cluster}@{per_sm}"
        sampling._ring_plans[key] = plan
        ok = torch.allclose(sampling.softmax(x), ref, rtol=1e-4, atol=1e-9)
        t = time_graph(lambda: sampling.softmax(x))
        rows.append(f"{desc}: {t * 1e6:.1f} us {ideal / t:.0%}{'' if ok else ' WRONG'}")
    sampling._ring_plans[key] = chosen
    t = time_graph(lambda: torch.softmax(x, -1))
    print(f"{batch} x {vocab}: chosen {chosen[1]} CTAs, {chosen[2]} buffers, {chosen[4]} clusters; torch.softmax "
          f"{t * 1e6:.1f} us {ideal / t:.0%}\n  " + " | ".join(rows), flush=True)
