"""Custom attention variants (issue 25): compile and load times of each example of
examples/attention_variants.py, and its kernel time beside the default kernel on the same shape.

- cold compile: NVRTC compile of the variant's program into an empty cache folder (what a user's first
  call waits for, before the module load), for the prefill shape's tile and the decode shape's tile;
- cached load: the same program read back from the disk cache and loaded as a module (a new process);
- kernel time: median of CUDA-graph replays (bench/common.py time_graph) of run() with the variant and
  of the default kernel (no variant) on the same wrapper and shape, and the ratio (backend "auto" for both:
  the Hopper kernel on sm_90a where it takes the variant), and the variant on the portable kernel ("fa2").
  Prefill: ragged, 4 x 2048 causal, 32/8 heads, d128 fp16. Decode: paged 16 x 4096, page 16, 32/8 heads, d128 fp16
  (variant and default on the tensor-core decode kernel), its GB/s beside the device-to-device copy of the same run.

Usage: python bench/bench_jit.py (JSON into $OUT or $FI_CUPY_BENCH_DIR)
       python bench/bench_jit.py --rounds N: prefill kernel times only, for A/Bs of the hooks (bench/ab.sh): the
       default kernel, every example and the built-in ALiBi, N interleaved rounds in one process, the best of each
       against the best default
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from common import copy_bandwidth, print_table, save_json, time_graph, torch_or_none  # noqa: E402

import fi_cupy  # noqa: E402
from fi_cupy import decode, prefill  # noqa: E402
from fi_cupy._core import dtypes as dt, kernels  # noqa: E402
from fi_cupy._core.alibi import slopes as alibi_slopes  # noqa: E402
from attention_variants import EXAMPLES  # noqa: E402

HQ, HKV, D = 32, 8, 128
SM = 1 / math.sqrt(D)


def extra_args(name: str, batch: int, kv_len: int):
    """The example's run() arguments (tensors, then scalars) for `batch` requests of kv_len keys."""
    if name == "sigmoid":
        return (SM, -1.0)
    if name == "doc_mask":
        ids = cp.asarray(np.repeat(np.arange(kv_len // 512 + 1), 512)[:kv_len][None].repeat(batch, 0).astype(np.int32))
        return (ids.ravel(), kv_len, SM)
    if name == "alibi":
        return (cp.asarray(alibi_slopes(HQ)), SM)
    if name == "temperature":
        return (cp.full(HQ, 1.5, cp.float32), SM)
    if name == "key_scale":
        return (cp.full(HKV * D, 0.9, cp.float32), SM, D)
    if name == "gate":
        return (cp.full(HQ, 0.5, cp.float32), SM)
    if name == "softmax":
        return (SM,)
    raise ValueError(f"no run() arguments for example {name!r}")


def arr(x):
    """x in the framework time_graph captures with: a torch tensor on the same memory where torch is there
    (its capture records torch's current stream, which a torch caller launches on), else x."""
    torch = torch_or_none()
    return torch.from_dlpack(x) if torch is not None and isinstance(x, cp.ndarray) else x


def prefill_program(variant, rows: int):
    """The prefill program plan() picks for `rows` packed rows."""
    params = prefill.make_params(HQ, HKV, D, None, True, "NONE", -1, None, None, None, None, "bfloat16", None, True,
                                 16, variant=variant)
    tile, flags = prefill.plan_tile(params, np.array([rows]), False, "auto")
    return prefill.prefill_program(D, tile, dt.bfloat16, dt.bfloat16, True, False, flags, D, variant)


def decode_program(variant):
    params = decode.make_params(HQ, HKV, D, 16, "NONE", -1, None, "bfloat16", None, None, None, None, variant)
    return decode.decode_variant(params, params.kv_dtype)[0]


def compile_times(prog, arch: str) -> tuple:
    """(cold compile s, cached compile-read + module load s) of a program."""
    old = os.environ.get("FI_CUPY_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FI_CUPY_CACHE_DIR"] = tmp
        try:
            t = time.perf_counter()
            prog.compile(arch)
            cold = time.perf_counter() - t
            t = time.perf_counter()
            got = prog.compile(arch)
            mod = cp.cuda.function.Module()
            mod.load(got.binary)
            cached = time.perf_counter() - t
        finally:
            if old is None:
                del os.environ["FI_CUPY_CACHE_DIR"]
            else:
                os.environ["FI_CUPY_CACHE_DIR"] = old
    return cold, cached


def prefill_case(variant, name, backend="auto", pos="NONE"):
    batch, n = 4, 2048
    q = cp.random.standard_normal((batch * n, HQ, D), dtype=cp.float32).astype(cp.float16)
    k = cp.random.standard_normal((batch * n, HKV, D), dtype=cp.float32).astype(cp.float16)
    v = cp.random.standard_normal((batch * n, HKV, D), dtype=cp.float32).astype(cp.float16)
    ip = np.arange(batch + 1) * n
    w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(arr(cp.empty(256 << 20, cp.uint8)), jit_args=variant,
                                                     backend=backend)
    w.plan(ip, ip, HQ, HKV, D, causal=True, q_data_type="float16", pos_encoding_mode=pos)
    out = cp.empty_like(q)
    args = () if variant is None else extra_args(name, batch, n)
    q, k, v, out = arr(q), arr(k), arr(v), arr(out)
    args = tuple(arr(a) for a in args)
    sec = time_graph(lambda: w.run(q, k, v, *args, out=out))
    flops = 4 * batch * HQ * D * n * n / 2  # causal: the unmasked half
    return sec, flops / sec / 1e12


def decode_case(variant, name, pos="NONE"):
    batch, n, page = 16, 4096, 16
    pages = n // page
    kc = cp.random.standard_normal((batch * pages, page, HKV, D), dtype=cp.float32).astype(cp.float16)
    vc = cp.random.standard_normal((batch * pages, page, HKV, D), dtype=cp.float32).astype(cp.float16)
    q = cp.random.standard_normal((batch, HQ, D), dtype=cp.float32).astype(cp.float16)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(arr(cp.empty(256 << 20, cp.uint8)), jit_args=variant)
    w.plan(np.arange(batch + 1) * pages, np.random.default_rng(0).permutation(batch * pages), np.full(batch, page), HQ,
           HKV, D, page, q_data_type="float16", pos_encoding_mode=pos)
    out = cp.empty_like(q)
    args = () if variant is None else extra_args(name, batch, n)
    flops_bytes = 2 * kc.nbytes
    q, kc, vc, out = arr(q), arr(kc), arr(vc), arr(out)
    args = tuple(arr(a) for a in args)
    sec = time_graph(lambda: w.run(q, (kc, vc), *args, out=out))
    return sec, flops_bytes / sec / 1e9


def prefill_rounds(rounds: int) -> None:
    """The prefill shape's kernel times, interleaved over `rounds` rounds (a process's clocks drift between rounds
    less than between processes), the best of each against the best default."""
    cases = [("default", None, "default", "NONE")] + [(n, v, n, "NONE") for n, v in EXAMPLES.items()]
    cases.append(("built-in ALiBi", None, "alibi", "ALIBI"))
    times = {label: [] for label, *_ in cases}
    for _ in range(rounds):
        for label, variant, name, pos in cases:
            times[label].append(prefill_case(variant, name, pos=pos)[0] * 1e6)
    base = min(times["default"])
    print_table(f"prefill ragged 4 x 2048 causal {HQ}/{HKV} d{D} fp16 on {kernels.device_props(0)['name']}, "
                f"{rounds} rounds", ["case", "us (each round)", "best / best default"],
                [[label, " ".join(f"{t:.1f}" for t in ts), f"{min(ts) / base:.3f}"] for label, ts in times.items()])
    save_json("bench_jit_rounds.json", {"rounds_us": times})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=0, help="prefill kernel times only, this many interleaved rounds")
    args = ap.parse_args()
    if args.rounds:
        return prefill_rounds(args.rounds)
    arch = kernels.device_arch(0)
    copy = copy_bandwidth() / 1e9
    base_p, base_d = prefill_case(None, "default"), decode_case(None, "default")
    rows, recs = [], []
    for name, variant in EXAMPLES.items():
        cold_p, cached_p = compile_times(prefill_program(variant, 2048 * 4), arch)
        cold_d, cached_d = compile_times(decode_program(variant), arch)
        p, d = prefill_case(variant, name), decode_case(variant, name)
        p2 = prefill_case(variant, name, "fa2")  # the portable kernel, where "auto" took the Hopper one
        rec = dict(variant=name, cold_prefill_s=cold_p, cached_prefill_s=cached_p, cold_decode_s=cold_d,
                   cached_decode_s=cached_d, prefill_us=p[0] * 1e6, prefill_tflops=p[1],
                   prefill_default_us=base_p[0] * 1e6, prefill_fa2_us=p2[0] * 1e6, decode_us=d[0] * 1e6, decode_gbs=d[1],
                   decode_default_us=base_d[0] * 1e6, copy_gbs=copy)
        recs.append(rec)
        rows.append([name, f"{cold_p:.2f}", f"{cached_p * 1e3:.1f}", f"{cold_d:.2f}", f"{cached_d * 1e3:.1f}",
                     f"{p[0] * 1e6:.0f} ({p[1]:.0f} TF)", f"{base_p[0] * 1e6:.0f} ({base_p[1]:.0f} TF)",
                     f"{p[0] / base_p[0]:.2f}", f"{p2[0] * 1e6:.0f}", f"{d[0] * 1e6:.1f} ({d[1]:.0f} GB/s)",
                     f"{base_d[0] * 1e6:.1f} ({base_d[1]:.0f} GB/s)", f"{d[0] / base_d[0]:.2f}"])
    print_table(f"custom variants on {kernels.device_props(0)['name']} ({arch}); prefill ragged 4 x 2048 causal, "
                f"decode 16 x 4096 p16; {HQ}/{HKV} heads d{D} fp16; copy {copy:.0f} GB/s", ["variant", "cold compile prefill s", "cached load prefill ms", "cold compile decode s",
                 "cached load decode ms", "prefill us", "default prefill us", "ratio", "prefill fa2 us", "decode us",
                 "default decode us", "ratio"], rows)
    # the built-in equivalent where there is one: pos_encoding_mode="ALIBI" (the portable prefill kernel, the
    # CUDA-core decode kernel) beside the ALiBi variant's rows above
    bp, bd = prefill_case(None, "alibi", pos="ALIBI"), decode_case(None, "alibi", pos="ALIBI")
    print(f"built-in ALiBi: prefill {bp[0] * 1e6:.0f} us ({bp[1]:.0f} TF), decode {bd[0] * 1e6:.1f} us "
          f"({bd[1]:.0f} GB/s)")
    save_json("bench_jit.json", {"rows": recs, "builtin_alibi": dict(prefill_us=bp[0] * 1e6, decode_us=bd[0] * 1e6)})


if __name__ == "__main__":
    main()
