"""Host-side cost of one small-op call (rmsnorm on one token, torch caller): wall time per call, the
cost of each stage of fi_cupy's call path (the per-signature fast path and the full path it replays),
and cProfile's top entries.

    python bench/profile_small_host.py
"""
import sys

import torch

import fi_cupy
from fi_cupy import norm
from fi_cupy._core import fastpath, streams

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import per_call_us, print_profile  # noqa: E402


def per_call(f):
    return per_call_us(f, 2000, warmup=20)


def main():
    x = torch.randn((1, 4096), device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(x)
    fi_cupy.rmsnorm(x, w, out=o)
    torch.cuda.synchronize()
    print(f"rmsnorm(out=): {per_call(lambda: fi_cupy.rmsnorm(x, w, out=o)):.1f} us per call (host-bound loop)")
    print(f"rmsnorm(): {per_call(lambda: fi_cupy.rmsnorm(x, w)):.1f} us per call")
    print(f"gemma_rmsnorm(out=): {per_call(lambda: fi_cupy.gemma_rmsnorm(x, w, out=o)):.1f} us per call")
    print(f"silu_and_mul(out=): {per_call(lambda: fi_cupy.silu_and_mul(x, out=o[:, :2048])):.1f} us per call")
    print(f"torch rms_norm: {per_call(lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6)):.1f} us per call")
    recipe = next(iter(norm._SIGS._recipes.values()))
    stages = {
        "fastpath.key_of (5 arrays)": lambda: fastpath.key_of((x, w, None, None, o), ("rms", 1e-6, None)),
        "torch current stream (raw)": lambda: streams.torch_current(0),
        "torch.empty": lambda: torch.empty((1, 4096), dtype=torch.bfloat16, device="cuda:0"),
        "recipe.replay": lambda: recipe.replay((x, w, None, None, o), [x.data_ptr(), w.data_ptr(), 0, 0,
                                                                       o.data_ptr()]),
        "full path (no replay)": lambda: norm._norm_call("rms", x, w, None, 1e-6, o, None, None),
    }
    for name, f in stages.items():
        print(f"  {name}: {per_call(f):.1f} us")
    print_profile(lambda: fi_cupy.rmsnorm(x, w, out=o), 500, torch.cuda.synchronize)


if __name__ == "__main__":
    main()
