"""Host-side cost of one small-op call (rmsnorm on one token, torch caller): wall time per call, the
cost of each stage of fi_cupy's call path, and cProfile's top entries.

    python bench/profile_small_host.py
"""
import sys

import torch

import fi_cupy
from fi_cupy import norm
from fi_cupy._core import arrays, kernels, streams
from fi_cupy._core.call import Call

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import per_call_us, print_profile  # noqa: E402


def norm_args(xi):
    """norm_kernel's arguments (fi_cupy/norm.py's launch) for one contiguous bf16 row of 4096, in place."""
    k = kernels
    return [k.ptr(xi), k.i64(4096), k.i64(0), k.ptr(None), k.i64(0), k.i64(0), k.ptr(None), k.i64(0), k.i64(0),
            k.ptr(xi), k.ptr(None), k.ptr(xi), k.i64(4096), k.i64(0), k.i32(1), k.u32(1), k.u32(1), k.u32(0),
            k.i32(4096), k.f32(1e-6)]


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
    print(f"torch rms_norm: {per_call(lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6)):.1f} us per call")
    prog = norm.norm_program(norm.DTYPES[1], norm.DTYPES[1], 8, "rms", False)
    fn = kernels.functions(prog, 0)[prog.kernels[1]]
    s = streams.current("torch", 0)
    xi = arrays.describe(x, "x")
    args = [kernels.ptr(xi)] * 1
    stages = {
        "Call(x)": lambda: Call(x),
        "current stream": lambda: streams.current("torch", 0),
        "describe(torch)": lambda: arrays.describe(x, "x", s, "torch"),
        "functions(program)": lambda: kernels.functions(prog, 0),
        "hash(program)": lambda: hash(prog),
        "torch.empty": lambda: torch.empty((1, 4096), dtype=torch.bfloat16, device="cuda:0"),
        "launch (20 args)": lambda: kernels.launch(fn, (1,), (512,), norm_args(xi), s, 0),
        "keep_alive": lambda: arrays.keep_alive(0, s, [xi]),
        "runtime.getDevice": lambda: runtime.getDevice(),
        "cuLaunchKernelEx alone": lambda: raw(cfg, fn.ptr, params, None),
    }
    del args
    from cupy.cuda import runtime
    kernels.launch(fn, (1,), (512,), norm_args(xi), s, 0)
    raw = kernels._cuda()[1]
    cfg = kernels._config()[1]
    params = next(iter(kernels._tls.params.values()))[1]
    for name, f in stages.items():
        print(f"  {name}: {per_call(f):.1f} us")
    print_profile(lambda: fi_cupy.rmsnorm(x, w, out=o), 500, torch.cuda.synchronize)


if __name__ == "__main__":
    main()
