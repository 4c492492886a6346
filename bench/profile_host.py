"""Host-side cost of one decode call (Python overhead), with cProfile's top entries.

    python bench/profile_host.py
"""
import sys
import time

import cupy
import numpy as np

import fi_cupy

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import per_call_us as per_call, print_profile  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    q = cupy.asarray(rng.standard_normal((32, 128)).astype(np.float16))
    k = cupy.asarray(rng.standard_normal((4096, 8, 128)).astype(np.float16))
    fi_cupy.single_decode_with_kv_cache(q, k, k)
    cupy.cuda.Device().synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        fi_cupy.single_decode_with_kv_cache(q, k, k)
    cupy.cuda.Device().synchronize()
    print(f"single_decode (CuPy arrays): {(time.perf_counter() - t0) / n * 1e6:.0f} us per call, host + GPU")
    try:
        import torch
    except ImportError:
        return
    qt = torch.randn((16, 32, 128), device="cuda", dtype=torch.bfloat16)
    cache = torch.randn((16 * 64, 2, 16, 8, 128), device="cuda", dtype=torch.bfloat16)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(np.arange(17) * 64, np.arange(16 * 64), np.full(16, 16), 32, 8, 128, 16, q_data_type="bfloat16")
    out = torch.empty_like(qt)
    w.run(qt, cache, out=out)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        w.run(qt, cache, out=out)
    torch.cuda.synchronize()
    print(f"wrapper.run (torch, 16x1024): {(time.perf_counter() - t0) / n * 1e6:.0f} us per call, host + GPU")
    from fi_cupy._core import arrays

    print(f"  describe(torch): {per_call(lambda: arrays.describe(qt, 'q')):.1f} us; "
          f"__dlpack__(): {per_call(lambda: qt.__dlpack__()):.1f} us; "
          f"__dlpack_device__(): {per_call(lambda: qt.__dlpack_device__()):.1f} us; "
          f"current stream: {per_call(lambda: torch.cuda.current_stream(0).cuda_stream):.1f} us")
    print_profile(lambda: w.run(qt, cache, out=out), n, torch.cuda.synchronize)


if __name__ == "__main__":
    main()
