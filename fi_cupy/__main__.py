"""`python -m fi_cupy`: environment report and a short self-check (exit status 2 without a GPU: the
report says so in its last line, after the parts that need none).
`python -m fi_cupy precompile [--arch sm_90a] [--all]`: compile the standard kernel configurations
ahead of time into the disk cache, with a progress bar (no GPU needed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import __version__, decode, prefill
from ._core import compile as cc
from ._core import dtypes as dt
from ._core import kernels

STANDARD_HEAD_DIMS = (64, 128, 256)


def _gpu():
    """(device count, why none is visible: CuPy's reason in short)."""
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CuPy raises several types without a driver or a device
        text = str(e).strip().splitlines()
        return 0, (text[0] if text else type(e).__name__)[:160]
    return n, None if n else "device count 0"


def no_gpu_line(why: str, what: str) -> str:
    """The one line printed instead of a traceback where a GPU is needed and none is visible."""
    return f"fi_cupy: no CUDA GPU visible ({why}); {what}"


def report() -> int:
    import cupy
    print(f"fi_cupy {__version__} (kernel sources: {cc.cuda_src_dir()})")
    print(f"CuPy {cupy.__version__}")
    try:
        print(f"NVRTC {'.'.join(map(str, cc.nvrtc_version()))}; CUDA headers: {cc.cuda_include_dir()}")
    except cc.CudaEnvironmentError as e:
        print(f"NVRTC/headers: NOT FOUND: {e}")
        return 1
    n, err = _gpu()
    if n:
        from cupy.cuda import runtime
        drv = runtime.driverGetVersion()
        print(f"driver: CUDA {drv // 1000}.{drv % 1000 // 10}")
        for i in range(n):
            p = kernels.device_props(i)
            print(f"GPU {i}: {p['name']}, compute capability {p['cc'] // 10}.{p['cc'] % 10}, {p['sms']} SMs, "
                  f"kernels built for {kernels.device_arch(i)}")
    entries, size = cc.cache_stats()
    print(f"kernel cache: {cc.cache_dir()} ({entries} entries, {size / 1e6:.1f} MB)")
    status = self_check(n > 0)
    if not n:
        print(no_gpu_line(err, "the self-check compiled its kernel but cannot run it"), file=sys.stderr)
        return 2
    return status


def self_check(have_gpu: bool) -> int:
    prog = decode.decode_program(128, 4, dt.bfloat16, dt.bfloat16, False)
    if not have_gpu:
        for arch in ("sm_80", "sm_90a"):
            t0 = time.perf_counter()
            c = prog.compile(arch)
            how = "from cache" if c.from_cache else "compiled"
            print(f"self-check: decode kernel {how} for {arch} in {time.perf_counter() - t0:.2f} s")
        return 0
    import cupy
    from . import reference
    rng = np.random.default_rng(0)
    hq, hkv, d, n = 32, 8, 128, 4096
    q = rng.standard_normal((hq, d)).astype(np.float16)
    k = rng.standard_normal((n, hkv, d)).astype(np.float16)
    v = rng.standard_normal((n, hkv, d)).astype(np.float16)
    qd, kd, vd = cupy.asarray(q), cupy.asarray(k), cupy.asarray(v)
    t0 = time.perf_counter()
    o = decode.single_decode_with_kv_cache(qd, kd, vd)
    cupy.cuda.get_current_stream().synchronize()
    first = time.perf_counter() - t0
    a, b = cupy.cuda.Event(), cupy.cuda.Event()
    a.record()
    for _ in range(20):
        o = decode.single_decode_with_kv_cache(qd, kd, vd)
    b.record()
    b.synchronize()
    per_ms = cupy.cuda.get_elapsed_time(a, b) / 20
    ref, _ = reference.decode_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    err = float(np.abs(cupy.asnumpy(o).astype(np.float64) - ref).max())
    ok = err < 5e-3
    print(f"self-check: single decode fp16, {hq}/{hkv} heads, d{d}, kv_len {n}: max abs error {err:.2e} "
          f"({'ok' if ok else 'FAILED'}); first call {first:.2f} s, then {per_ms:.3f} ms/call")
    return 0 if ok else 1


def _precompile_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", action="append", help="e.g. sm_90a, repeatable (default: each visible GPU's "
                    "arch; with no GPU: sm_80 and sm_90a)")
    ap.add_argument("--all", action="store_true", help="every supported head dim and variant, not only the "
                    "standard ones (decode: head dims 64/128/256; prefill: no RoPE, soft cap or custom mask)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)


def precompile(args) -> int:
    archs = args.arch
    if not archs:
        n, _ = _gpu()
        archs = sorted({kernels.device_arch(i) for i in range(n)}) or ["sm_80", "sm_90a"]
    progs = decode.all_programs(decode.SUPPORTED_HEAD_DIMS if args.all else STANDARD_HEAD_DIMS)
    progs += prefill.all_programs() if args.all else prefill.standard_programs()
    jobs = [(p, a) for a in archs for p in progs]
    if "sm_90a" in archs:  # the Hopper prefill kernel (backend "fa3") and the merge module it launches
        hopper = [p for p in prefill.sm90_programs() if args.all or p.kernels[0].targs[-1] == 0]
        hopper += [prefill.merge_program(d, q) for d in prefill.SM90_HEAD_DIMS for q in prefill.Q_DTYPES]
        jobs += [(p, "sm_90a") for p in hopper]
    from tqdm import tqdm
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as ex, \
            tqdm(total=len(jobs), desc=f"precompile ({', '.join(archs)})", unit="kernel") as bar:
        for _ in ex.map(lambda j: j[0].compile(j[1]), jobs):
            bar.update()
    entries, size = cc.cache_stats()
    print(f"{len(jobs)} kernel programs ready in {time.perf_counter() - t0:.1f} s; cache {cc.cache_dir()} "
          f"({entries} entries, {size / 1e6:.1f} MB)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fi_cupy", description="Without a command: the environment "
                                 "report (GPU, driver, CuPy, NVRTC, kernel cache) and a self-check, decode "
                                 "against its reference, timed; exit status 2 when no GPU is visible.")
    sub = ap.add_subparsers(dest="command", metavar="{precompile}")
    _precompile_args(sub.add_parser("precompile", help="compile the standard kernels ahead of time into the "
                                    "disk cache (no GPU needed)"))
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    return precompile(args) if args.command == "precompile" else report()


if __name__ == "__main__":
    sys.exit(main())
