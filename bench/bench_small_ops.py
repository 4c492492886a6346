"""Norms, activations, RoPE, KV append and state merge: median GPU time of CUDA-graph replays, GB/s
(bytes read + written, decimal) and the ratio to the copy bandwidth measured in the same run; torch
eager and FlashInfer on the same shapes when importable. Also the eager wall time of one call (host
included) for one token. bf16 throughout (the issue's shapes).

Usage: python bench/bench_small_ops.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import copy_bandwidth, per_call_us, print_table, save_json, time_graph, torch_or_none  # noqa: E402

import fi_cupy  # noqa: E402


def flashinfer_or_none():
    try:
        import flashinfer
        return flashinfer
    except Exception:  # noqa: BLE001 - absent or broken install
        return None


def cases(torch, quick: bool):
    """(op, shape label, bytes moved, {impl: fn})."""
    bf = torch.bfloat16
    F = torch.nn.functional
    fi = flashinfer_or_none()
    tokens = (1, 4096) if quick else (1, 128, 4096, 16384)
    for hidden in (4096, 8192):
        w = torch.randn(hidden, device="cuda", dtype=bf)
        for t in tokens:
            x = torch.randn((t, hidden), device="cuda", dtype=bf)
            r = torch.randn((t, hidden), device="cuda", dtype=bf)
            o = torch.empty_like(x)
            nb = 2 * x.numel() * 2 + hidden * 2
            impl = {"fi_cupy": lambda x=x, w=w, o=o: fi_cupy.rmsnorm(x, w, out=o),
                    "torch": lambda x=x, w=w: F.rms_norm(x, (hidden,), w, 1e-6)}
            if fi:
                impl["flashinfer"] = lambda x=x, w=w, o=o: fi.rmsnorm(x, w, out=o)
            yield "rmsnorm", f"{t}x{hidden}", nb, impl
            impl = {"fi_cupy": lambda x=x, r=r, w=w: fi_cupy.fused_add_rmsnorm(x, r, w),
                    "torch": lambda x=x, r=r, w=w: F.rms_norm(x + r, (hidden,), w, 1e-6)}
            if fi:
                impl["flashinfer"] = lambda x=x, r=r, w=w: fi.fused_add_rmsnorm(x, r, w)
            yield "fused_add_rmsnorm", f"{t}x{hidden}", 4 * x.numel() * 2 + hidden * 2, impl
    inter = 14336
    for t in tokens:
        x = torch.randn((t, 2 * inter), device="cuda", dtype=bf)
        o = torch.empty((t, inter), device="cuda", dtype=bf)
        nb = 3 * t * inter * 2
        impl = {"fi_cupy": lambda x=x, o=o: fi_cupy.silu_and_mul(x, out=o),
                "torch": lambda x=x: F.silu(x[:, :inter]) * x[:, inter:]}
        if fi:
            impl["flashinfer"] = lambda x=x, o=o: fi.silu_and_mul(x, out=o)
        yield "silu_and_mul", f"{t}x{inter}", nb, impl
        impl = {"fi_cupy": lambda x=x, o=o: fi_cupy.gelu_tanh_and_mul(x, out=o)}
        yield "gelu_tanh_and_mul", f"{t}x{inter}", nb, impl
    # RoPE: 4096 tokens, 32 q / 8 k heads of 128, in place.
    n = 4096
    q = torch.randn((n, 32, 128), device="cuda", dtype=bf)
    k = torch.randn((n, 8, 128), device="cuda", dtype=bf)
    pos = torch.arange(n, device="cuda", dtype=torch.int32)
    nb = 2 * (q.numel() + k.numel()) * 2 + n * 4
    impl = {"fi_cupy": lambda: fi_cupy.apply_rope_pos_ids_inplace(q, k, pos)}
    if fi:
        impl["flashinfer"] = lambda: fi.apply_rope_pos_ids_inplace(q, k, pos)
    yield "apply_rope_pos_ids_inplace", "4096x(32+8)x128", nb, impl
    impl = {"fi_cupy": lambda: fi_cupy.apply_llama31_rope_pos_ids_inplace(q, k, pos)}
    yield "apply_llama31_rope_pos_ids_inplace", "4096x(32+8)x128", nb, impl
    # Append 4096 tokens (8 KV heads of 128) into a page-16 cache, 16 requests of 256.
    # The cache (2 GiB) is far larger than L2 and the request's pages are scattered over it.
    page, reqs, per = 16, 16, 256
    num_pages = reqs * per // page
    spare = 32768
    cache = torch.empty((num_pages + spare, 2, page, 8, 128), device="cuda", dtype=bf)
    kv_indptr = torch.arange(0, num_pages + 1, per // page, device="cuda", dtype=torch.int32)
    last = torch.full((reqs,), page, device="cuda", dtype=torch.int32)
    bi = torch.arange(reqs, device="cuda", dtype=torch.int32).repeat_interleave(per)
    ps = torch.arange(per, device="cuda", dtype=torch.int32).repeat(reqs)
    # Successive calls take the next of 8 input sets and page tables (134 MB of rows in all), so
    # neither the appended rows nor the written pages stay in L2 from one call to the next.
    sets = [(torch.randn((n, 8, 128), device="cuda", dtype=bf), torch.randn((n, 8, 128), device="cuda", dtype=bf),
             torch.randperm(num_pages + spare, device="cuda")[:num_pages].to(torch.int32)) for _ in range(8)]
    nb = 2 * 2 * sets[0][0].numel() * 2 + 2 * n * 4
    turn = [0]

    def next_set():
        turn[0] += 1
        return sets[turn[0] % len(sets)]

    def append_fi_cupy():
        ak, av, kv_indices = next_set()
        fi_cupy.append_paged_kv_cache(ak, av, bi, ps, cache, kv_indices, kv_indptr, last, check=False)
    impl = {"fi_cupy": append_fi_cupy}
    if fi:
        def append_flashinfer():
            ak, av, kv_indices = next_set()
            fi.append_paged_kv_cache(ak, av, bi, ps, cache, kv_indices, kv_indptr, last)
        impl["flashinfer"] = append_flashinfer
    yield "append_paged_kv_cache", "4096x8x128 p16", nb, impl
    # merge_state over 4096 x 32 x 128.
    va, vb = (torch.randn((n, 32, 128), device="cuda", dtype=bf) for _ in range(2))
    sa, sb = (torch.randn((n, 32), device="cuda", dtype=torch.float32) for _ in range(2))
    nb = 3 * va.numel() * 2 + 3 * sa.numel() * 4
    impl = {"fi_cupy": lambda: fi_cupy.merge_state(va, sa, vb, sb)}
    if fi:
        impl["flashinfer"] = lambda: fi.merge_state(va, sa, vb, sb)
    yield "merge_state", "4096x32x128", nb, impl
    impl = {"fi_cupy": lambda: fi_cupy.merge_state_in_place(va, sa, vb, sb)}
    yield "merge_state_in_place", "4096x32x128", nb, impl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tokens 1 and 4096 only")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="override a launch constant for an experiment, e.g. norm.REG_TEAM=256")
    ap.add_argument("--only", default="", help="comma-separated ops to run")
    args = ap.parse_args()
    import importlib
    for kv in args.set:
        name, value = kv.split("=")
        mod, attr = name.rsplit(".", 1)
        setattr(importlib.import_module(f"fi_cupy.{mod}"), attr, int(value))
    torch = torch_or_none()
    if torch is None:
        sys.exit("bench_small_ops needs torch for bfloat16 inputs")
    import cupy
    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    copy_bw = copy_bandwidth()
    rows, records = [], []
    only = set(filter(None, args.only.split(",")))
    for op, label, nbytes, impls in cases(torch, args.quick):
        if only and op not in only:
            continue
        row = [op, label]
        rec = {"op": op, "shape": label, "bytes": nbytes}
        for name in ("fi_cupy", "flashinfer", "torch"):
            fn = impls.get(name)
            if fn is None:
                row.append("-")
                continue
            sec = time_graph(fn)
            gbs = nbytes / sec / 1e9
            row.append(f"{sec * 1e6:.1f} us {gbs:.0f} GB/s {100 * gbs * 1e9 / copy_bw:.0f}%")
            rec[name] = {"us": sec * 1e6, "GBps": gbs, "pct_copy": 100 * gbs * 1e9 / copy_bw}
        eager = f"{per_call_us(impls['fi_cupy'], 200, sync=torch.cuda.synchronize):.1f}" if label.startswith("1x") else ""
        row.append(eager)
        rec["fi_cupy_eager_us"] = eager
        rows.append(row)
        records.append(rec)
    print_table(f"Small ops on {dev}, bf16; copy ceiling {copy_bw / 1e9:.0f} GB/s (read + write, same run); "
                "GPU time of CUDA-graph replays, median; eager = wall time per call with host overhead",
                ["op", "shape", "fi_cupy", "flashinfer", "torch eager", "fi_cupy eager us"], rows)
    save_json("bench_small_ops.json", {"device": dev, "copy_GBps": copy_bw / 1e9, "rows": records})


if __name__ == "__main__":
    main()
