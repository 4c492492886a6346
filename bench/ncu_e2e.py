"""Kernel by kernel, one batch-1 decode step of examples/fi_llama (8B shapes): run under Nsight Compute,
which profiles only the step between cudaProfilerStart/Stop:
  ncu --profile-from-start off --metrics gpu__time_duration.sum --csv python3 bench/ncu_e2e.py > k.csv
then `python3 bench/ncu_e2e.py --summarise k.csv` sums the durations by kernel name."""
from __future__ import annotations

import collections
import csv
import os
import sys

import numpy as np


def summarise(path: str) -> None:
    rows = [r for r in csv.reader(open(path)) if len(r) > 10]
    head = rows[0]
    name_i, val_i, unit_i = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
    tot, cnt = collections.Counter(), collections.Counter()
    for r in rows[1:]:
        v = float(r[val_i].replace(",", ""))
        v = v / 1e3 if r[unit_i] == "nsecond" else v if r[unit_i] == "usecond" else v * 1e3
        key = r[name_i].split("(")[0][:90]
        tot[key] += v
        cnt[key] += 1
    for k, v in tot.most_common():
        print(f"{v:9.1f} us  {cnt[k]:4d} x {v / cnt[k]:7.2f} us  {k}")
    print(f"{sum(tot.values()):9.1f} us in {sum(cnt.values())} kernels")


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import cupy as cp
    from fi_llama import checkpoint, config
    from fi_llama.engine import Engine
    cfg = config.preset("8b")
    w = checkpoint.random(cfg, progress=False)
    eng = Engine(cfg, w, page_size=16, max_batch=1, max_prefill_tokens=1024, num_pages=100, ignore_eos=True)
    eng.add(np.random.default_rng(0).integers(0, cfg.vocab_size, 1024), 64)
    for _ in range(6):
        eng.step()
    cp.cuda.Device().synchronize()
    cp.cuda.profiler.start()
    eng.step()
    cp.cuda.Device().synchronize()
    cp.cuda.profiler.stop()


if __name__ == "__main__":
    summarise(sys.argv[2]) if sys.argv[1:2] == ["--summarise"] else main()
