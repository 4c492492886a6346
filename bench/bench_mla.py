"""MLA benchmark (issue 24): DeepSeek-V3 shapes, 128 heads, ckv 512 + kpe 64, bf16, pages of 64. Decode at batch
1, 16, 64, 128 x kv_len 1024, 8192, 32768, and a chunked prefill of 16 x (512 new on 4096 cached), causal.
TFLOP/s count 2 * heads * rows * keys * (576 + 512) (causal: the unmasked keys), against a bf16 matmul measured
in the same run; GB/s count the cache read (ckv + kpe) plus q and out, against the device-to-device copy
measured in the same run. Medians of CUDA-graph replays; each replay reads another copy of the cache where it
fits, so L2 does not hold it. Our backend "auto" (the Hopper kernel on sm_90a) and "fa2" (the portable one) in
the same run, and FlashInfer's MLA wrapper on the same shapes when importable.

    python bench/bench_mla.py            # needs a GPU and torch
"""
from __future__ import annotations

import functools
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_prefill import matmul_tflops  # noqa: E402

import fi_cupy  # noqa: E402
from fi_cupy._core import kernels  # noqa: E402

H, CKV, KPE, PAGE = 128, 512, 64, 64
DECODE = [(b, kv) for b in (1, 16, 64, 128) for kv in (1024, 8192, 32768)]
PREFILL = [(16, 512, 4096)]  # (batch, new tokens, cached tokens)
SM_SCALE = 1 / math.sqrt(192)  # DeepSeek-V3's qk head dim (128 nope + 64 rope) before absorption
MIN_WORKING_SET = 256 << 20


def case(torch, batch, qo, kv):
    """Tables and arrays of `batch` requests of qo queries on kv tokens (the new ones included)."""
    pages_per = -(-kv // PAGE)
    pages = batch * pages_per
    cache_bytes = pages * PAGE * (CKV + KPE) * 2
    copies = max(1, min(8, -(-MIN_WORKING_SET // cache_bytes)))
    rng = np.random.default_rng(0)
    tables = (np.arange(batch + 1, dtype=np.int32) * qo, np.arange(batch + 1, dtype=np.int32) * pages_per,
              rng.permutation(pages).astype(np.int32), np.full(batch, kv, np.int32))
    mk = lambda *s: torch.randn(s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    caches = [(mk(pages, PAGE, CKV), mk(pages, PAGE, KPE)) for _ in range(copies)]
    q = (mk(batch * qo, H, CKV), mk(batch * qo, H, KPE))
    out = torch.empty(batch * qo, H, CKV, device="cuda", dtype=torch.bfloat16)
    causal_keys = qo * kv - qo * (qo - 1) / 2 if qo > 1 else kv
    flops = 2 * H * batch * causal_keys * (CKV + KPE + CKV)
    nbytes = cache_bytes + 2 * batch * qo * H * (CKV + KPE + CKV)
    return tables, caches, q, out, flops, nbytes


def run_case(torch, make_wrapper, batch, qo, kv):
    tables, caches, (qn, qp), out, flops, nbytes = case(torch, batch, qo, kv)
    w = make_wrapper()
    try:
        w.plan(*[torch.as_tensor(t, device="cuda") if make_wrapper is flashinfer_wrapper else t for t in tables], H,
               CKV, KPE, PAGE, qo > 1, SM_SCALE, torch.bfloat16, torch.bfloat16)
    except Exception as e:  # noqa: BLE001 - a peer that cannot plan this case is reported as '-'
        print(f"{batch}x({qo} on {kv}): {type(e).__name__}: {e}")
        return None, flops, nbytes
    i = [0]

    def fn():
        ckv, kpe = caches[i[0] % len(caches)]
        i[0] += 1
        w.run(qn, qp, ckv, kpe, out=out)
    return common.time_graph(fn), flops, nbytes


def fi_wrapper(backend="auto"):
    return fi_cupy.BatchMLAPagedAttentionWrapper(torch_mod.empty(256 << 20, dtype=torch_mod.uint8, device="cuda"),
                                                 backend=backend)


def flashinfer_wrapper():
    import flashinfer
    return flashinfer.mla.BatchMLAPagedAttentionWrapper(
        torch_mod.empty(256 << 20, dtype=torch_mod.uint8, device="cuda"))


torch_mod = None


def main():
    global torch_mod
    torch_mod = torch = common.torch_or_none()
    if torch is None:
        sys.exit("bench_mla.py needs torch with CUDA")
    try:
        import flashinfer  # noqa: F401
        peers = True
    except ImportError:
        peers = False
    props = kernels.device_props(0)
    copy_bw, mm = common.copy_bandwidth(), matmul_tflops(torch)
    print(f"device: {props['name']}; copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s")
    rows, data = [], []
    for batch, qo, kv in [(b, 1, kv) for b, kv in DECODE] + PREFILL:
        t, flops, nbytes = run_case(torch, fi_wrapper, batch, qo, kv)
        t_fa2 = run_case(torch, functools.partial(fi_wrapper, "fa2"), batch, qo, kv)[0]
        t_fi = run_case(torch, flashinfer_wrapper, batch, qo, kv)[0] if peers else None
        pct = lambda x: "-" if x is None else f"{flops / x / 1e12:.0f} ({100 * flops / x / 1e12 / mm:.0f}%)"  # noqa
        rows.append([f"{batch}x({qo} on {kv})", f"{t * 1e3:.4f}", pct(t), f"{nbytes / t / 1e9:.0f}",
                     f"{100 * nbytes / t / copy_bw:.0f}%", pct(t_fa2), pct(t_fi)])
        data.append({"batch": batch, "qo": qo, "kv": kv, "ms": t * 1e3, "TFLOPs": flops / t / 1e12,
                     "GBps": nbytes / t / 1e9,
                     "fa2_ms": None if t_fa2 is None else t_fa2 * 1e3, "flashinfer_ms": None if t_fi is None else t_fi * 1e3})
        torch.cuda.empty_cache()
    common.print_table(f"MLA, {H} heads, ckv {CKV} + kpe {KPE}, page {PAGE}, bf16; matmul {mm:.0f} TFLOP/s, copy "
                       f"{copy_bw / 1e9:.0f} GB/s; median of CUDA-graph replays",
                       ["B x (new on kv)", "ms", "TFLOP/s (of matmul)", "GB/s", "of copy", "fa2 TFLOP/s", "FlashInfer TFLOP/s"], rows)
    common.save_json("bench_mla.json", {"device": props["name"], "copy_GBps": copy_bw / 1e9, "matmul_TFLOPs": mm,
                                        "rows": data})


if __name__ == "__main__":
    main()
