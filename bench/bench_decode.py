"""Paged-KV decode benchmark: fi_cupy vs FlashInfer (when importable), GB/s against the copy ceiling.

Shapes (issue 3): bf16, 32 query / 8 kv heads, head_dim 128, page 16; (batch, kv_len) below, plus four
fp8-KV rows, one HND row, one with attention sinks, one with ALiBi, and head_dim 256 and 512 rows
(option d256 / d512). Bytes = KV read + q + out. Times are medians of CUDA-event timings of
CUDA-graph replays (20 runs a graph) after warm-up; each run reads another copy of the cache so the
50 MB L2 cannot hold the working set. Also: cold compile and cached load of the decode kernel.

    python bench/bench_decode.py            # needs a GPU
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fi_cupy  # noqa: E402
from fi_cupy import decode  # noqa: E402
from fi_cupy._core import compile as cc, kernels  # noqa: E402
from fi_cupy._core import dtypes as dt  # noqa: E402

HQ, HKV, D, PS = 32, 8, 128, 16
SHAPES = [(1, 8192), (1, 32768), (1, 131072), (4, 32768), (16, 4096), (64, 2048), (128, 1024),
          (256, 4096), (512, 512)]
# (shape, KV dtype, layout, option): "sinks" runs with attention sinks (one float32 logit per qo head),
# "alibi" with pos_encoding_mode="ALIBI", "cuda-cores" on the CUDA-core kernel (fp8 KV's kernel before the
# tensor-core one took it)
EXTRA = [((16, 4096), "float8_e4m3fn", "NHD", ""), ((16, 4096), "float8_e4m3fn", "NHD", "cuda-cores"),
         ((1, 32768), "float8_e4m3fn", "NHD", ""),
         ((64, 2048), "float8_e5m2", "NHD", ""), ((256, 4096), "float8_e4m3fn", "NHD", ""),
         ((16, 4096), "bfloat16", "HND", ""),
         ((16, 4096), "bfloat16", "NHD", "sinks"), ((16, 4096), "bfloat16", "NHD", "alibi"),
         ((16, 4096), "bfloat16", "NHD", "d256"), ((16, 4096), "bfloat16", "NHD", "d512"),
         ((1, 32768), "bfloat16", "NHD", "d512"), ((64, 2048), "bfloat16", "NHD", "d512"),
         ((16, 4096), "float8_e4m3fn", "NHD", "d512")]
PLAN_OPTION = {"alibi": {"pos_encoding_mode": "ALIBI"}}
MIN_WORKING_SET = 256 << 20  # rotate caches until at least this many bytes are touched per cycle


def _dim(option: str) -> int:
    """The head dim of a row: option "d<n>", else D."""
    return int(option[1:]) if option[:1] == "d" and option[1:].isdigit() else D


def _case(torch, batch, kv_len, kv_dtype, layout, D=D):
    pages_per = math.ceil(kv_len / PS)
    pages = batch * pages_per
    kv_item = 1 if "float8" in kv_dtype else 2
    cache_bytes = pages * 2 * PS * HKV * D * kv_item
    copies = max(1, min(16, math.ceil(MIN_WORKING_SET / cache_bytes)))
    shape = (pages, 2, PS, HKV, D) if layout == "NHD" else (pages, 2, HKV, PS, D)
    tdt = getattr(torch, kv_dtype)
    caches = [torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(tdt) for _ in range(copies)]
    rng = np.random.default_rng(0)
    indices = rng.permutation(pages).astype(np.int32)
    indptr = (np.arange(batch + 1) * pages_per).astype(np.int32)
    last = np.full(batch, kv_len - (pages_per - 1) * PS, np.int32)
    qs = [torch.randn((batch, HQ, D), device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    outs = [torch.empty_like(q) for q in qs]
    nbytes = batch * kv_len * HKV * D * 2 * kv_item + 2 * batch * HQ * D * 2
    return caches, qs, outs, indptr, indices, last, nbytes


def bench_fi_cupy(torch, batch, kv_len, kv_dtype="bfloat16", layout="NHD", option=""):
    if option == "cuda-cores":  # the kernel choice is memoised: forget it before and after
        orig = decode.uses_tensor_cores
        decode.uses_tensor_cores = lambda *a: False
        decode._variants.clear()
        try:
            return bench_fi_cupy(torch, batch, kv_len, kv_dtype, layout)
        finally:
            decode.uses_tensor_cores = orig
            decode._variants.clear()
    caches, qs, outs, indptr, indices, last, nbytes = _case(torch, batch, kv_len, kv_dtype, layout, _dim(option))
    sinks = torch.randn(HQ, device="cuda", dtype=torch.float32) if option == "sinks" else None
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                   layout)
    w.plan(indptr, indices, last, HQ, HKV, _dim(option), PS, q_data_type="bfloat16", kv_data_type=kv_dtype,
           **PLAN_OPTION.get(option, {}))
    i = [0]

    def fn():
        j = i[0] % len(caches)
        i[0] += 1
        w.run(qs[j], caches[j], out=outs[j], sinks=sinks)
    t = common.time_graph(fn)
    # host-inclusive time of one eager run() (what a Python caller pays per layer without graphs)
    torch.cuda.synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    eager = (time.perf_counter() - t0) / n
    return t, eager, nbytes


def bench_flashinfer(torch, batch, kv_len, kv_dtype="bfloat16", layout="NHD", option=""):
    try:
        import flashinfer
    except ImportError:
        return None
    caches, qs, outs, indptr, indices, last, nbytes = _case(torch, batch, kv_len, kv_dtype, layout, _dim(option))
    sinks = torch.randn(HQ, device="cuda", dtype=torch.float32) if option == "sinks" else None
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                      layout, use_tensor_cores=True)
    to = lambda a: torch.as_tensor(a, device="cuda")
    try:
        w.plan(to(indptr), to(indices), to(last), HQ, HKV, _dim(option), PS, q_data_type=torch.bfloat16,
               kv_data_type=getattr(torch, kv_dtype), **PLAN_OPTION.get(option, {}))
    except Exception as e:  # noqa: BLE001 - a peer that cannot plan this case is reported as '-'
        print(f"FlashInfer {batch}x{kv_len} {option}: {type(e).__name__}: {e}")
        return None
    i = [0]

    def fn():
        j = i[0] % len(caches)
        i[0] += 1
        w.run(qs[j], caches[j], out=outs[j], **({"sinks": sinks} if sinks is not None else {}))
    try:
        return common.time_graph(fn)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run this case is reported as '-'
        print(f"FlashInfer {batch}x{kv_len} {option}: {type(e).__name__}: {e}")
        return None


def bench_torch_sdpa(torch, batch, kv_len, D=D):
    """torch scaled_dot_product_attention on contiguous K/V (no paging) as a peer: same bytes."""
    import torch.nn.functional as F
    kv_bytes = batch * kv_len * HKV * D * 2 * 2
    copies = max(1, min(8, math.ceil(MIN_WORKING_SET / kv_bytes)))
    if copies * kv_bytes > (24 << 30):
        return None
    ks = [torch.randn((batch, HKV, kv_len, D), device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    vs = [torch.randn_like(k) for k in ks]
    qs = [torch.randn((batch, HQ, 1, D), device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    i = [0]

    def fn():
        j = i[0] % copies
        i[0] += 1
        F.scaled_dot_product_attention(qs[j], ks[j], vs[j], enable_gqa=True)
    try:
        return common.time_graph(fn)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is reported as '-'
        print(f"torch SDPA {batch}x{kv_len}: {type(e).__name__}: {e}")
        return None


def compile_times():
    """Cold compile (empty cache) and cached load (disk cache warm, process memo cleared)."""
    dev = 0
    prog = decode.decode_program(D, 4, dt.bfloat16, dt.bfloat16, False)
    old = os.environ.get("FI_CUPY_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FI_CUPY_CACHE_DIR"] = tmp
        kernels._loaded.clear()
        t0 = time.perf_counter()
        kernels.functions(prog, dev)
        cold = time.perf_counter() - t0
        kernels._loaded.clear()
        t0 = time.perf_counter()
        kernels.functions(prog, dev)
        cached = time.perf_counter() - t0
    if old is None:
        del os.environ["FI_CUPY_CACHE_DIR"]
    else:
        os.environ["FI_CUPY_CACHE_DIR"] = old
    kernels._loaded.clear()
    return cold, cached


def sweep(torch, copy_bw):
    """Latency-bound shapes under several minimum CTA quotas (scheduler.MIN_QUOTA)."""
    from fi_cupy import scheduler
    rows = []
    for mq in (64, 128, 256, 512):
        scheduler.MIN_QUOTA = mq
        for b, l in ((1, 8192), (1, 32768), (16, 4096)):
            t, _, nbytes = bench_fi_cupy(torch, b, l)
            rows.append([mq, f"{b}x{l}", f"{t * 1e3:.4f}", f"{100 * nbytes / t / copy_bw:.0f}%"])
    scheduler.MIN_QUOTA = 64
    common.print_table("min quota sweep", ["min quota", "B x L", "ms", "of copy"], rows)


def compare_backends(torch, copy_bw):
    """The same shapes through the tensor-core and the CUDA-core decode kernel."""
    rows = []
    orig = decode.uses_tensor_cores
    for name, pick in (("tensor cores", orig), ("CUDA cores", lambda *a: False)):
        decode.uses_tensor_cores = pick
        for b, l in SHAPES:
            t, _, nbytes = bench_fi_cupy(torch, b, l)
            rows.append([name, f"{b}x{l}", f"{t * 1e3:.4f}", f"{100 * nbytes / t / copy_bw:.0f}%"])
            torch.cuda.empty_cache()
    decode.uses_tensor_cores = orig
    common.print_table("decode kernels compared", ["kernel", "B x L", "ms", "of copy"], rows)


def main():
    torch = common.torch_or_none()
    if torch is None:
        sys.exit("bench_decode.py needs torch with CUDA to build bf16/fp8 inputs")
    props = kernels.device_props(0)
    copy_before = common.copy_bandwidth()
    cold, cached = compile_times()
    print(f"device: {props['name']} ({props['sms']} SMs, {kernels.device_arch(0)}), NVRTC {cc.nvrtc_version()}")
    print(f"decode kernel compile: cold {cold * 1e3:.0f} ms, cached load {cached * 1e3:.1f} ms")
    if "--sweep" in sys.argv:
        sweep(torch, copy_before)
    if "--compare" in sys.argv:
        compare_backends(torch, copy_before)
        return
    measured = []
    for (b, l), kvd, layout, opt in [((b, l), "bfloat16", "NHD", "") for b, l in SHAPES] + EXTRA:
        t, eager, nbytes = bench_fi_cupy(torch, b, l, kvd, layout, opt)
        fi = bench_flashinfer(torch, b, l, kvd, layout, opt)
        sdpa = bench_torch_sdpa(torch, b, l, _dim(opt)) if (kvd, layout) == ("bfloat16", "NHD") and \
            opt in ("", "d256", "d512") else None
        measured.append((b, l, kvd, layout, opt, t, eager, nbytes, sdpa, fi))
        torch.cuda.empty_cache()
    copy_after = common.copy_bandwidth()
    copy_bw = max(copy_before, copy_after)  # the higher reading: ratios are never flattered by a slow copy
    print(f"copy ceiling (read+write): {copy_before / 1e9:.0f} GB/s before, {copy_after / 1e9:.0f} GB/s after; "
          f"ratios use {copy_bw / 1e9:.0f} GB/s")
    pct = lambda secs, nbytes: "-" if secs is None else f"{100 * nbytes / secs / copy_bw:.0f}%"
    rows, data = [], []
    for b, l, kvd, layout, opt, t, eager, nbytes, sdpa, fi in measured:
        rows.append([f"{b}x{l}", kvd.replace("float8_", ""), layout, opt or "-", f"{t * 1e3:.4f}",
                     f"{nbytes / t / 1e9:.0f}", pct(t, nbytes), f"{eager * 1e6:.0f}", pct(sdpa, nbytes), pct(fi, nbytes)])
        data.append({"batch": b, "kv_len": l, "kv_dtype": kvd, "layout": layout, "option": opt, "ms": t * 1e3,
                     "GBps": nbytes / t / 1e9, "pct_copy": 100 * nbytes / t / copy_bw, "eager_us": eager * 1e6,
                     "torch_sdpa_ms": None if sdpa is None else sdpa * 1e3,
                     "flashinfer_ms": None if fi is None else fi * 1e3})
    common.print_table(f"paged decode, {HQ}/{HKV} heads, d{D}, page {PS}; copy {copy_bw / 1e9:.0f} GB/s; "
                       "times: median of CUDA-graph replays", ["B x L", "kv", "layout", "option", "ms", "GB/s", "of copy",
                                                              "eager us/call", "torch SDPA", "FlashInfer"], rows)
    common.save_json("bench_decode.json", {"device": props["name"], "copy_GBps": copy_bw / 1e9,
                                           "copy_before_GBps": copy_before / 1e9, "copy_after_GBps": copy_after / 1e9,
                                           "compile_cold_s": cold, "load_cached_s": cached, "rows": data})


if __name__ == "__main__":
    main()
