"""`python -m fi_cupy`: environment report and a short self-check (exit status 2 without a GPU: the
report says so in its last line, after the parts that need none).
`python -m fi_cupy precompile [--arch sm_90a] [--all] [-j N]`: compile the standard kernel configurations
ahead of time into the disk cache, with a progress bar (no GPU needed).
Installed as the `fi_cupy` command too (pyproject's console script); `--help` explains each option.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import __version__, decode, decode_schedule, prefill
from ._core import compile as cc
from ._core import dtypes as dt
from ._core import kernels, streams

STANDARD_HEAD_DIMS = (64, 128, 256)


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
    n, err = streams.gpu_count()
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
    for (name, arch), count in sorted(cc.cached_variants().items()):
        print(f"  custom variant {name} ({arch}): {count} program{'s' if count > 1 else ''}")
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


def _arch(text: str) -> str:
    if not re.fullmatch(r"(sm|compute)_\d{2,3}[af]?", text):
        raise argparse.ArgumentTypeError(f"expected an NVRTC target such as sm_80, sm_90a or compute_90, got {text!r}")
    return text


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads, got {text!r}")
    return n


def _precompile_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", action="append", type=_arch, metavar="ARCH",
                    help="the GPU target to compile for, e.g. sm_80 (Ampere), sm_89 (Ada), sm_90a (Hopper); "
                    "repeatable (default: each visible GPU's target; with no GPU: sm_80 and sm_90a)")
    ap.add_argument("--all", action="store_true", help="every supported head dim and variant, not only the "
                    "standard ones (decode: head dims 64/128/256; prefill: no RoPE, soft cap or custom mask)")
    ap.add_argument("-j", "--jobs", type=_jobs, default=os.cpu_count() or 2, metavar="N",
                    help="compile N kernel programs at a time, in threads (NVRTC runs them in parallel; "
                    "default: the number of CPUs, %(default)s here)")


def precompile(args) -> int:
    archs = args.arch
    if not archs:
        n, _ = streams.gpu_count()
        archs = sorted({kernels.device_arch(i) for i in range(n)}) or ["sm_80", "sm_90a"]
    progs = decode.all_programs(decode.SUPPORTED_HEAD_DIMS if args.all else STANDARD_HEAD_DIMS)
    progs += prefill.all_programs() if args.all else prefill.standard_programs()
    progs += decode_schedule.all_programs()  # decode plan()'s schedule kernel
    jobs = [(p, a) for a in archs for p in progs]
    if "sm_90a" in archs:  # the Hopper prefill kernel (backend "fa3") and the merge module it launches
        hopper = [p for p in prefill.sm90_programs() if args.all or p.kernels[0].targs[-1] == 0]
        hopper += [prefill.merge_program(q) for q in prefill.Q_DTYPES]
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


COMMANDS = ("precompile",)
_ENVIRONMENT = """environment:
  FI_CUPY_CACHE_DIR     the kernel cache folder
                        (default: $XDG_CACHE_HOME/fi_cupy, else ~/.cache/fi_cupy)
  FI_CUPY_CUDA_INCLUDE  the folder with cuda_fp16.h, cuda_bf16.h and cuda_fp8.h when
                        neither the cuda12/cuda13 extra nor a CUDA toolkit provides it
  FI_CUPY_LOG=1         print each kernel compile
"""


def _prog() -> str:
    # Installed as the `fi_cupy` command too (a console script): name the one the user typed.
    name = os.path.basename(sys.argv[0] or "")
    return "fi_cupy" if name in ("fi_cupy", "fi_cupy.exe") else "python -m fi_cupy"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=_prog(), usage="%(prog)s [-h] [command [options]]", epilog=_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Without a command: the environment report (GPU, driver, CuPy, NVRTC, kernel\n"
        "cache) and a self-check, decode against its reference, timed. Exit status 2 when\n"
        "no GPU is visible (the parts that need none still run), 1 when NVRTC is missing\n"
        "or the self-check fails.")
    sub = ap.add_subparsers(dest="command", metavar="command", title="commands", prog=ap.prog,
                            help="one of the below, or none for the environment report")
    p = sub.add_parser("precompile", help="compile the standard kernels ahead of time into the disk cache "
                       "(no GPU needed)", description="Compile the standard kernel configurations (or, with "
                       "--all, every one) into the disk cache ahead of time, with a progress bar, so the "
                       "first calls need not wait for NVRTC. No GPU needed.")
    _precompile_args(p)
    return ap


def main(argv=None) -> int:
    ap = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # argparse's own "invalid choice: ... (choose from ...)" reads as an option error; say what it is.
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        ap.error(f"unknown command {argv[0]!r}; expected one of: {', '.join(COMMANDS)} "
                 "(or none, for the environment report)")
    args = ap.parse_args(argv)
    return precompile(args) if args.command == "precompile" else report()


if __name__ == "__main__":
    sys.exit(main())
