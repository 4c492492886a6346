"""Prefill benchmark (issue 4): TFLOP/s against a bf16 matmul measured in the same run, with torch SDPA
(flash and cuDNN backends) and FlashInfer when importable, on the same shapes.

Shapes: bf16, head_dim 128. Single prefill: causal L=4096 32/32 heads, causal L=8192 32/8, non-causal
L=4096 32/32; causal L=4096 32/32 at head_dim 256 and 512, and 16/16 at 192/128 (issue 22). Batch paged:
16 requests appending 1024 tokens to 1024 cached (32/8 heads, page 16, causal). Ragged: 64 requests of random
lengths 128..2048 (32/8 heads, causal), and the same at head_dim_qk 192 / head_dim_vo 128 with 16/16
heads (DeepSeek's prefill over decompressed MLA keys, a tensor-parallel slice). FLOPs:
2*Lq*Lkv*H*(D_qk + D_vo) (2 matmuls), with (2*Lkv - Lq)*Lq/2 in place of Lq*Lkv for causal (the
unmasked part only).
Times: median of CUDA-event timings of CUDA-graph replays after warm-up. "ours" is backend="auto" (on
sm_90a the Hopper kernel, cuda_src/prefill_sm90.cu); "ours fa2" the portable mma.sync kernel. FlashInfer:
its default backend at head_dim 128, its fa2 backend at 256 and 192/128 (issue 22 compares with that;
bench/flashinfer_setup.sh's `fi_prebuild build full` builds those modules; see bench/NOTES.md), none at 512.

    python bench/bench_prefill.py [--only single|paged|ragged] [--match SUBSTRING]   (cases whose name holds it)
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fi_cupy  # noqa: E402
from fi_cupy._core import compile as cc, kernels  # noqa: E402

D = 128
SINGLE = [("single causal L=4096 32/32", 4096, 32, 32, True, D), ("single causal L=8192 32/8", 8192, 32, 8, True, D),
          ("single non-causal L=4096 32/32", 4096, 32, 32, False, D),
          ("single causal L=4096 32/32 d256", 4096, 32, 32, True, 256),
          ("single causal L=4096 32/32 d512", 4096, 32, 32, True, 512),
          ("single causal L=4096 16/16 d192/128", 4096, 16, 16, True, 192, 128)]


BACKENDS = ("auto", "fa2")  # ours: the default choice (the Hopper kernel on sm_90a), and the portable kernel


def flops(qo, kv, h, causal, d=D, dv=None):
    pairs = (2 * kv - qo) * qo / 2 if causal else qo * kv
    return 2 * pairs * h * (d + (d if dv is None else dv))


def matmul_tflops(torch):
    n = 8192
    a = torch.randn((n, n), device="cuda", dtype=torch.bfloat16)
    b = torch.randn((n, n), device="cuda", dtype=torch.bfloat16)
    t = common.time_graph(lambda: torch.matmul(a, b), calls_per_graph=5, replays=10)
    return 2 * n ** 3 / t / 1e12


def single_case(torch, name, L, hq, hkv, causal, d, dv=None):
    dv = d if dv is None else dv
    q = torch.randn((L, hq, d), device="cuda", dtype=torch.bfloat16)
    k = torch.randn((L, hkv, d), device="cuda", dtype=torch.bfloat16)
    v = torch.randn((L, hkv, dv), device="cuda", dtype=torch.bfloat16)
    out = torch.empty((L, hq, dv), device="cuda", dtype=torch.bfloat16)
    f = flops(L, L, hq, causal, d, dv)
    res = {b: common.time_graph(lambda: fi_cupy.single_prefill_with_kv_cache(q, k, v, causal=causal, out=out,
                                                                             backend=b), calls_per_graph=3, replays=10)
           for b in BACKENDS}
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    for label, backend in (("torch flash", SDPBackend.FLASH_ATTENTION), ("torch cuDNN", SDPBackend.CUDNN_ATTENTION)):
        try:
            def fn():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=hq != hkv)
            res[label] = common.time_graph(fn, calls_per_graph=3, replays=10)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is reported as '-'
            print(f"{label} {name}: {type(e).__name__}: {str(e)[:120]}")
            res[label] = None
    for label, fi_backend in fi_backends(d, dv):
        try:
            import flashinfer
            res[label] = common.time_graph(lambda: flashinfer.single_prefill_with_kv_cache(
                q, k, v, causal=causal, backend=fi_backend), calls_per_graph=3, replays=10)
        except Exception as e:  # noqa: BLE001 - not importable, or cannot run this case: reported as '-'
            if not isinstance(e, ImportError):
                print(f"{label} {name}: {type(e).__name__}: {str(e)[:200]}")
            res[label] = None
    return f, res


def fi_backends(d: int, dv: int | None = None) -> tuple:
    """FlashInfer's columns for a head dim: its default backend at 128 (fa3 on sm_90a), its fa2 backend
    at 256 and 192/128 (issue 22's comparison; each is a JIT build of its own), none at 512."""
    if (d, dv or d) == (D, D):
        return (("FlashInfer", "auto"),)
    return (("FlashInfer fa2", "fa2"),) if d <= 256 else ()


def paged_case(torch, sinks: bool = False, alibi: bool = False):
    """16 x (1024 new on 1024 cached) causal; sinks: with attention sinks (one float32 logit per qo head);
    alibi: pos_encoding_mode="ALIBI" (both kernels take it)."""
    batch, new, cached, hq, hkv, ps = 16, 1024, 1024, 32, 8, 16
    kv_len = new + cached
    pages_per = kv_len // ps
    cache = torch.randn((batch * pages_per, 2, ps, hkv, D), device="cuda", dtype=torch.bfloat16)
    indices = np.random.default_rng(0).permutation(batch * pages_per).astype(np.int32)
    indptr = (np.arange(batch + 1) * pages_per).astype(np.int32)
    last = np.full(batch, ps, np.int32)
    qo_indptr = (np.arange(batch + 1) * new).astype(np.int32)
    q = torch.randn((batch * new, hq, D), device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kw = {"sinks": torch.randn(hq, device="cuda", dtype=torch.float32)} if sinks else {}
    res = {}
    for b in BACKENDS:
        w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                        backend=b)
        w.plan(qo_indptr, indptr, indices, last, hq, hkv, D, ps, causal=True, q_data_type="bfloat16",
               pos_encoding_mode="ALIBI" if alibi else "NONE")
        res[b] = common.time_graph(lambda: w.run(q, cache, out=out, **kw), calls_per_graph=5, replays=10)
    try:
        import flashinfer
        fw = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
        to = lambda a: torch.as_tensor(a, device="cuda")
        fw.plan(to(qo_indptr), to(indptr), to(indices), to(last), hq, hkv, D, ps, causal=True,
                q_data_type=torch.bfloat16, pos_encoding_mode="ALIBI" if alibi else "NONE")
        res["FlashInfer"] = common.time_graph(lambda: fw.run(q, cache, **kw), calls_per_graph=5, replays=10)
    except Exception as e:  # noqa: BLE001 - not importable, or cannot run this case: reported as '-'
        if not isinstance(e, ImportError):
            print(f"FlashInfer paged{' sinks' if sinks else ''}{' alibi' if alibi else ''}: {type(e).__name__}: {e}")
        res["FlashInfer"] = None
    return batch * flops(new, kv_len, hq, True), res


def ragged_case(torch, hq=32, hkv=8, d=D, dv=D):
    lens = np.random.default_rng(1).integers(128, 2049, size=64)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    n = int(indptr[-1])
    q = torch.randn((n, hq, d), device="cuda", dtype=torch.bfloat16)
    k = torch.randn((n, hkv, d), device="cuda", dtype=torch.bfloat16)
    v = torch.randn((n, hkv, dv), device="cuda", dtype=torch.bfloat16)
    out = torch.empty((n, hq, dv), device="cuda", dtype=torch.bfloat16)
    res = {}
    for b in BACKENDS:
        w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                         backend=b)
        w.plan(indptr, indptr, hq, hkv, d, dv, causal=True, q_data_type="bfloat16")
        res[b] = common.time_graph(lambda: w.run(q, k, v, out=out), calls_per_graph=5, replays=10)
    for label, fi_backend in fi_backends(d, dv):
        try:
            import flashinfer
            fw = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
                torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), backend=fi_backend)
            to = lambda a: torch.as_tensor(a, device="cuda")
            fw.plan(to(indptr), to(indptr), hq, hkv, d, dv, causal=True, q_data_type=torch.bfloat16)
            res[label] = common.time_graph(lambda: fw.run(q, k, v), calls_per_graph=5, replays=10)
        except Exception as e:  # noqa: BLE001 - not importable, or cannot run this case: reported as '-'
            if not isinstance(e, ImportError):
                print(f"{label} ragged d{d}/{dv}: {type(e).__name__}: {str(e)[:200]}")
            res[label] = None
    return float(sum(flops(int(L), int(L), hq, True, d, dv) for L in lens)), res


def main():
    torch = common.torch_or_none()
    if torch is None:
        sys.exit("bench_prefill.py needs torch with CUDA")
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    match = sys.argv[sys.argv.index("--match") + 1] if "--match" in sys.argv else ""
    props = kernels.device_props(0)
    print(f"device: {props['name']} ({props['sms']} SMs, {kernels.device_arch(0)}), NVRTC {cc.nvrtc_version()}")
    mm = matmul_tflops(torch)
    todo = []  # (group, name, thunk): a case runs only if picked by --only and --match
    for name, L, hq, hkv, causal, d, *dv in SINGLE:
        todo.append(("single", name, lambda name=name, a=(L, hq, hkv, causal, d, *dv): single_case(torch, name, *a)))
    todo += [("paged", "batch paged 16 x (1024 new + 1024 cached) 32/8 p16", lambda: paged_case(torch)),
             ("paged", "the same with attention sinks", lambda: paged_case(torch, sinks=True)),
             ("paged", "the same with ALiBi", lambda: paged_case(torch, alibi=True)),
             ("ragged", "ragged 64 x U[128, 2048] causal 32/8", lambda: ragged_case(torch)),
             ("ragged", "ragged 64 x U[128, 2048] causal 16/16 d192/128", lambda: ragged_case(torch, 16, 16, 192, 128))]
    cases = []
    for group, name, run in todo:
        if only in (None, group) and match in name:
            cases.append((name,) + run())
            torch.cuda.empty_cache()
    mm = max(mm, matmul_tflops(torch))
    peers = ["fa2", "torch flash", "torch cuDNN", "FlashInfer", "FlashInfer fa2"]
    tf = lambda f, t: "-" if t is None else f"{f / t / 1e12:.0f}"
    rows, data = [], []
    for name, f, res in cases:
        t = res["auto"]
        rows.append([name, f"{t * 1e3:.3f}", tf(f, t), f"{100 * f / t / 1e12 / mm:.0f}%"] +
                    [tf(f, res.get(p)) for p in peers])
        data.append({"case": name, "ms": t * 1e3, "TFLOPs": f / t / 1e12, "pct_matmul": 100 * f / t / 1e12 / mm,
                     **{p: (None if res.get(p) is None else f / res[p] / 1e12) for p in peers}})
    common.print_table(f"prefill bf16 d{D} unless named; bf16 matmul {mm:.0f} TFLOP/s (same run); TFLOP/s, median of graph replays",
                       ["case", "ms", "TFLOP/s", "of matmul"] + [("ours " if p == "fa2" else "") + p + " TFLOP/s" for p in peers], rows)
    common.save_json("bench_prefill.json", {"device": props["name"], "matmul_TFLOPs": mm, "rows": data})


if __name__ == "__main__":
    main()
