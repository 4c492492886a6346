"""End-to-end serving benchmark (issue 7): an 8B-shaped random model (Llama 3.1 8B: hidden 4096, 32
layers, 32/8 heads, intermediate 14336, vocab 128256; bf16) served by examples/fi_llama (fi_cupy
kernels, cuBLAS GEMMs, a CUDA graph a decode step).

Decode: batches of 1, 16 and 64 requests with 1024-token prompts; once every prompt is prefilled,
each decode step is timed on the host (plan, upload, graph replay, sampling, the token copy back:
what a user waits for) and its graph alone with CUDA events. The floor of a step: the bytes of the
weights plus the KV cache it reads over the device-to-device copy bandwidth measured in the same run.
Prefill: 16 prompts of 1024 in one step. The same model through transformers' eager generate (greedy,
sdpa attention) where torch and transformers are installed: a decode step is (t(1 + n new tokens) -
t(1 new token)) / n, prefill from t(1 new token).

    python bench/bench_e2e.py [--size 8b] [--batches 1 16 64] [--steps 32] [--no-hf]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import common  # noqa: E402

import cupy as cp  # noqa: E402

from fi_llama import checkpoint, config  # noqa: E402
from fi_llama.batch import prefill_inputs  # noqa: E402
from fi_llama.engine import Engine  # noqa: E402
from fi_llama.scheduler import Request  # noqa: E402

PAGE = 16


def decode_case(cfg, weights, batch: int, prompt_len: int, steps: int, bw: float, rng) -> dict:
    pages = batch * -(-(prompt_len + steps + 8) // PAGE) + 1
    eng = Engine(cfg, weights, page_size=PAGE, max_batch=batch, max_prefill_tokens=max(prompt_len, 16384),
                 num_pages=pages, ignore_eos=True)
    for _ in range(batch):
        eng.add(rng.integers(0, cfg.vocab_size, prompt_len), steps + 8)
    while eng.scheduler.waiting:  # prefill every prompt (with decode steps of the running ones)
        eng.step()
    eng.step()  # the first pure decode step of this batch size captures its graph
    first = len(eng.stats.step_times)
    kv_tokens = sum(r.kv_len for r in eng.scheduler.running) + batch * steps // 2  # mid-run
    for _ in range(steps):
        eng.step()
    step = statistics.median(eng.stats.step_times[first:])
    # The graph alone (GPU time), replayed with the last plan.
    model = eng.model
    bucket = next(b for b in model.buckets if b >= batch)
    graph = model._decode[bucket][1]
    times = []
    for _ in range(10):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(model.stream)
        graph.launch(model.stream)
        b.record(model.stream)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    gpu = statistics.median(times)
    bytes_read = weights.nbytes_read_per_token() + kv_tokens * cfg.kv_bytes_per_token()
    floor = bytes_read / bw
    del eng, model, graph
    return {"batch": batch, "step_s": step, "gpu_s": gpu, "floor_s": floor, "tok_s": batch / step}


def prefill_case(cfg, weights, n: int, prompt_len: int, rng) -> float:
    eng = Engine(cfg, weights, page_size=PAGE, max_batch=n, max_prefill_tokens=n * prompt_len,
                 num_pages=n * -(-prompt_len // PAGE) + 1, ignore_eos=True)
    reqs = [Request(i, list(rng.integers(0, cfg.vocab_size, prompt_len)), 1) for i in range(n)]
    for r in reqs:
        r.pages = eng.allocator.allocate(-(-prompt_len // PAGE))
    inputs = prefill_inputs(reqs, PAGE)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        eng.model.prefill(inputs)
        eng.model.stream.synchronize()
        times.append(time.perf_counter() - t)
    del eng
    return n * prompt_len / statistics.median(times[1:])


def hf_cases(cfg, batches, prompt_len: int, steps: int, prefill_n: int) -> dict:
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"transformers not run: {e}")
        return {}
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "llama3", "rope_theta": cfg.rope.theta, "factor": cfg.rope.factor,
                         "low_freq_factor": cfg.rope.low_freq_factor, "high_freq_factor": cfg.rope.high_freq_factor,
                         "original_max_position_embeddings": cfg.rope.original_max_position_embeddings},
        eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hc).eval()
    torch.set_default_dtype(torch.float32)
    print(f"transformers {transformers.__version__}: {model.config._attn_implementation} attention", flush=True)

    def gen(ids, new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                           pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    out = {}
    for b in sorted(set(batches) | {prefill_n}):
        ids = torch.randint(0, cfg.vocab_size, (b, prompt_len), device="cuda")
        gen(ids[:, :16], 2)  # warm-up
        t1 = gen(ids, 1)
        tn = gen(ids, 1 + steps)
        out[b] = {"step_s": (tn - t1) / steps, "prefill_tok_s": b * prompt_len / t1}
        print(f"transformers batch {b}: step {out[b]['step_s'] * 1e3:.1f} ms, prefill+1 {t1:.2f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill-requests", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args()
    cfg = config.preset(a.size)
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    bw = common.copy_bandwidth()
    print(f"{dev}: copy {bw / 1e9:.0f} GB/s; model {a.size} ({cfg.num_parameters() / 1e9:.2f}B)", flush=True)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    weights = checkpoint.random(cfg, progress=False)
    cp.cuda.Device().synchronize()
    print(f"random weights: {weights.nbytes_read_per_token() / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s",
          flush=True)
    rows = [decode_case(cfg, weights, b, a.prompt_len, a.steps, bw, rng) for b in a.batches]
    prefill = prefill_case(cfg, weights, a.prefill_requests, a.prompt_len, rng)
    del weights
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()
    hf = {} if a.no_hf else hf_cases(cfg, a.batches, a.prompt_len, max(8, a.steps // 2), a.prefill_requests)
    gc.collect()
    table = []
    for r in rows:
        h = hf.get(r["batch"])
        table.append([r["batch"], f"{r['step_s'] * 1e3:.2f}", f"{r['gpu_s'] * 1e3:.2f}", f"{r['floor_s'] * 1e3:.2f}",
                      f"{r['step_s'] / r['floor_s']:.2f}x", f"{r['tok_s']:,.0f}",
                      f"{h['step_s'] * 1e3:.1f}" if h else "-", f"{h['step_s'] / r['step_s']:.1f}x" if h else "-"])
    common.print_table(f"decode, {a.size}, bf16, {a.prompt_len}-token prompts, page {PAGE} ({dev}; copy "
                       f"{bw / 1e9:.0f} GB/s)",
                       ["batch", "step ms (host)", "graph ms (GPU)", "floor ms", "step/floor", "tokens/s",
                        "transformers step ms", "speed-up"], table)
    h = hf.get(a.prefill_requests)
    print(f"\nprefill, {a.prefill_requests} x {a.prompt_len}: {prefill:,.0f} tokens/s"
          + (f"; transformers {h['prefill_tok_s']:,.0f} tokens/s ({prefill / h['prefill_tok_s']:.1f}x)" if h else ""))
    common.save_json("bench_e2e.json", {"device": dev, "copy_Bps": bw, "decode": rows, "prefill_tok_s": prefill,
                                        "prefill_requests": a.prefill_requests,
                                        "transformers": {str(k): v for k, v in hf.items()}})


if __name__ == "__main__":
    main()
