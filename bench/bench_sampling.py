"""Sampling: median GPU time of CUDA-graph replays at vocab 128256 (float32), and its ratio to one
read of the probabilities at the copy bandwidth measured in the same run; torch's sort-based top-p
(sort, cumsum, mask, multinomial) and FlashInfer when importable.

softmax, which reads the logits and writes the probabilities, also reports its share of the copy
bandwidth (one read and one write at that bandwidth / its time).

Usage: python bench/bench_sampling.py [--batches 1,32,128,512] [--vocab 128256] [--only softmax,top_p]
"""
from __future__ import annotations

import argparse
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import copy_bandwidth, print_table, save_json, time_graph, torch_or_none  # noqa: E402

from fi_cupy import sampling  # noqa: E402

VOCAB = 128256
SPEC = 4  # drafts a request in the speculative row


def torch_top_p(torch, probs, top_p):
    sp, si = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sp, dim=-1)
    sp = sp.masked_fill(cum - sp > top_p, 0.0)
    pick = torch.multinomial(sp, 1)
    return torch.gather(si, 1, pick)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32,128,512")
    ap.add_argument("--only", default="", help="comma-separated prefixes of the ops to time")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    args = ap.parse_args()
    vocab = args.vocab
    torch = torch_or_none()
    if torch is None:
        sys.exit("bench_sampling needs torch to build its inputs")
    try:
        import flashinfer.sampling as fis
    except Exception:  # noqa: BLE001
        fis = None
    import cupy
    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    copy_bw = copy_bandwidth()
    rows, records = [], []
    for b in [int(x) for x in args.batches.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(b)
        logits = torch.randn((b, vocab), device="cuda", generator=g) * 3
        probs = torch.softmax(logits, -1)
        read_s = probs.numel() * 4 / copy_bw
        # speculative: draft and target distributions of SPEC drafts (softmax of random logits)
        dq = torch.softmax(torch.randn((b, SPEC, vocab), device="cuda", generator=g) * 3, -1)
        tq = torch.softmax(torch.randn((b, SPEC + 1, vocab), device="cuda", generator=g) * 3, -1)
        ids = torch.multinomial(dq.reshape(-1, vocab), 1).reshape(b, SPEC).int()
        ops = {
            "softmax": (lambda: sampling.softmax(logits), lambda: fis.softmax(logits) if fis else None),
            "sampling_from_probs": (lambda: sampling.sampling_from_probs(probs, seed=1),
                                    lambda: fis.sampling_from_probs(probs)),
            "top_p 0.9": (lambda: sampling.top_p_sampling_from_probs(probs, 0.9, seed=1),
                          lambda: fis.top_p_sampling_from_probs(probs, 0.9)),
            "top_k 50": (lambda: sampling.top_k_sampling_from_probs(probs, 50, seed=1),
                         lambda: fis.top_k_sampling_from_probs(probs, 50)),
            "min_p 0.1": (lambda: sampling.min_p_sampling_from_probs(probs, 0.1, seed=1),
                          lambda: fis.min_p_sampling_from_probs(probs, 0.1)),
            "top_k 50 + top_p 0.9": (lambda: sampling.top_k_top_p_sampling_from_probs(probs, 50, 0.9, seed=1),
                                     lambda: fis.top_k_top_p_sampling_from_probs(probs, 50, 0.9)),
            "sampling_from_logits": (lambda: sampling.sampling_from_logits(logits, seed=1),
                                     lambda: fis.sampling_from_logits(logits)),
            "top_p_renorm_probs 0.9": (lambda: sampling.top_p_renorm_probs(probs, 0.9),
                                       lambda: fis.top_p_renorm_probs(probs, 0.9)),
            "top_k_renorm_probs 50": (lambda: sampling.top_k_renorm_probs(probs, 50),
                                      lambda: fis.top_k_renorm_probs(probs, 50)),
            "top_k_mask_logits 50": (lambda: sampling.top_k_mask_logits(logits, 50),
                                     lambda: fis.top_k_mask_logits(logits, 50)),
            f"chain_speculative n={SPEC}": (lambda: sampling.chain_speculative_sampling(dq, ids, tq, seed=1),
                                            lambda: fis.chain_speculative_sampling(dq, ids, tq)),
        }
        want_torch = b <= 128 and (not args.only or "top_p" in args.only)
        torch_p = time_graph(lambda: torch_top_p(torch, probs, 0.9)) if want_torch else None
        if args.only:
            ops = {k: v for k, v in ops.items() if any(k.startswith(o) for o in args.only.split(","))}
        for name, (fn, fi_fn) in ops.items():
            t = time_graph(fn)
            fi_t = time_graph(fi_fn) if (fis and fi_fn) else None
            of_copy = 2 * read_s / t if name == "softmax" else None
            rows.append([b, name, f"{t * 1e6:.1f}", f"{t / read_s:.2f}x", f"{of_copy:.0%}" if of_copy else "-",
                         f"{fi_t * 1e6:.1f}" if fi_t else "-",
                         f"{torch_p * 1e6:.0f}" if (torch_p and name.startswith("top_p")) else "-"])
            records.append({"batch": b, "op": name, "us": t * 1e6, "reads": t / read_s, "of_copy": of_copy,
                            "flashinfer_us": fi_t and fi_t * 1e6,
                            "torch_sort_top_p_us": torch_p * 1e6 if (torch_p and name.startswith("top_p")) else None})
    print_table(f"Sampling on {dev}, vocab {vocab}, float32; one read of the probabilities at the copy "
                f"bandwidth {copy_bw / 1e9:.0f} GB/s (same run); median of CUDA-graph replays",
                ["batch", "op", "us", "x one read", "of copy", "FlashInfer us", "torch sort top-p us"], rows)
    save_json("bench_sampling.json", {"device": dev, "vocab": vocab, "copy_GBps": copy_bw / 1e9, "rows": records})


if __name__ == "__main__":
    main()
