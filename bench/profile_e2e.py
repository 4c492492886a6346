"""Where a decode step of examples/fi_llama goes (issue 7): the step's CUDA graph against graphs of
its GEMMs alone and of its other kernels alone (CUDA events), and a cProfile of the host side of
engine.step(). python bench/profile_e2e.py [--size 8b] [--batch 1]"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import common  # noqa: E402

import cupy as cp  # noqa: E402

from fi_llama import checkpoint, config  # noqa: E402
from fi_llama.blas import gemm  # noqa: E402
from fi_llama.engine import Engine  # noqa: E402


def timed_ms(stream, launch, reps=20) -> float:
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        launch()
        b.record(stream)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def graph_ms(stream, body, reps=20) -> float:
    with stream:
        body()
        stream.begin_capture()
        body()
        g = stream.end_capture()
    return timed_ms(stream, lambda: g.launch(stream), reps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="8b")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    cfg = config.preset(a.size)
    bw = common.copy_bandwidth()
    w = checkpoint.random(cfg, progress=False)
    b = a.batch
    eng = Engine(cfg, w, page_size=16, max_batch=b, max_prefill_tokens=max(1024, b), num_pages=b * 80 + 1,
                 ignore_eos=True)
    rng = np.random.default_rng(0)
    for _ in range(b):
        eng.add(rng.integers(0, cfg.vocab_size, 1024), 200)
    for _ in range(8):
        eng.step()
    m = eng.model
    bucket = next(x for x in m.buckets if x >= b)
    full = timed_ms(m.stream, lambda: m._decode[bucket][1].launch(m.stream))

    def gemms():
        for lw in w.layers:
            gemm(m.x[:b], lw.wqkv, m.qkv[:b])
            gemm(m.attn[:b].reshape(b, -1), lw.wo, m.x[:b])
            gemm(m.x[:b], lw.wgu, m.gu[:b])
            gemm(m.act[:b], lw.wd, m.x[:b])
        gemm(m.x[:b], w.lm_head, m.logits[:b])
    g = graph_ms(m.stream, gemms)
    per = {}
    for name, (wt, xin, out) in {"qkv": (w.layers[0].wqkv, m.x, m.qkv), "o": (w.layers[0].wo, m.x, m.x),
                                 "gate_up": (w.layers[0].wgu, m.x, m.gu), "down": (w.layers[0].wd, m.act, m.x),
                                 "lm_head": (w.lm_head, m.x, m.logits)}.items():
        k = wt.shape[1]
        t = graph_ms(m.stream, lambda: [gemm(xin[:b, :k], wt, out[:b, :wt.shape[0]]) for _ in range(10)]) / 10
        per[name] = (t, wt.nbytes / (t / 1e3) / bw)
    wbytes = w.nbytes_read_per_token()
    print(f"copy {bw / 1e9:.0f} GB/s; weights {wbytes / 1e9:.2f} GB -> floor {wbytes / bw * 1e3:.2f} ms")
    print(f"decode graph (batch {b}): {full:.2f} ms; its GEMMs alone {g:.2f} ms ({wbytes / (g / 1e3) / bw:.0%} of "
          f"copy); the rest ~{full - g:.2f} ms")
    for name, (t, frac) in per.items():
        print(f"  gemm {name}: {t * 1e3:.1f} us ({frac:.0%} of copy)")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        eng.step()
    pr.disable()
    st = eng.stats.step_times[-50:]
    print(f"host-timed step: median {statistics.median(st) * 1e3:.2f} ms")
    pstats.Stats(pr).sort_stats("cumtime").print_stats(25)


if __name__ == "__main__":
    main()
