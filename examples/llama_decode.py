#!/usr/bin/env python3
"""Serve a Llama-family model with fi_cupy, CuPy and numpy alone: continuous batching over a paged KV
cache, batch prefill for new prompts, batch decode (a CUDA graph a step) for running ones.

  python examples/llama_decode.py /path/to/Meta-Llama-3.1-8B-Instruct --prompt "The capital of France is"
  python examples/llama_decode.py --random 8b --prompt "1 2 3" --max-new-tokens 32

A checkpoint folder holds config.json and *.safetensors (and tokenizer.json for text in and out; the
`tokenizers` package reads it). Without a tokenizer, a prompt is whitespace-separated token ids, or
else its UTF-8 bytes as ids, and the output is printed as ids.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fi_llama import config as config_mod  # noqa: E402

DEFAULT_PROMPTS = ["The capital of France is", "Here is a short poem about the sea:",
                   "def fibonacci(n):", "The three laws of thermodynamics are"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    p.add_argument("--random", metavar="SIZE", help=f"random weights of a named size: {sorted(config_mod.PRESETS)}")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", help="a file with one prompt a line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="<= 0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-prefill-tokens", type=int, default=8192)
    p.add_argument("--kv-memory", type=float, default=0.5, help="fraction of free GPU memory for the KV cache")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    a = p.parse_args(argv)
    if (a.checkpoint is None) == (a.random is None):
        p.error("give a checkpoint folder or --random SIZE (one of them)")
    if not 0 < a.top_p <= 1 or a.temperature < 0 or a.max_new_tokens < 1:
        p.error("need 0 < --top-p <= 1, --temperature >= 0 and --max-new-tokens >= 1")
    return a


class TextCodec:
    """Prompts to ids and ids to text: a tokenizer.json through `tokenizers`, or plain ids."""

    def __init__(self, folder: str | None, vocab_size: int):
        self.tok, self.vocab = None, vocab_size
        path = os.path.join(folder, "tokenizer.json") if folder else None
        if path and os.path.isfile(path):
            from tokenizers import Tokenizer
            self.tok = Tokenizer.from_file(path)

    def encode(self, text: str) -> list:
        if self.tok is not None:
            return self.tok.encode(text).ids
        words = text.split()
        if words and all(w.isdigit() for w in words):
            return [int(w) for w in words]
        return [b % self.vocab for b in text.encode()]

    def decode(self, ids) -> str:
        return self.tok.decode(ids) if self.tok is not None else " ".join(map(str, ids))


def no_gpu_reason() -> str | None:
    """Why no CUDA GPU can be used, in CuPy's words shortened to a line; None when one is visible."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
        return "device count 0"
    except Exception as e:  # noqa: BLE001 - CuPy raises several types without a driver or a device
        text = str(e).strip().splitlines()
        return (text[0] if text else type(e).__name__)[:160]


def main(argv=None) -> int:
    a = parse_args(argv)
    why = no_gpu_reason()
    if why is not None:  # one line, not a traceback from deep inside CuPy
        print(f"llama_decode.py: no CUDA GPU visible ({why}); this example runs on one", file=sys.stderr)
        return 2
    import cupy as cp
    from fi_llama import checkpoint
    from fi_llama.engine import Engine, SamplingParams

    cfg = config_mod.preset(a.random) if a.random else config_mod.from_folder(a.checkpoint)
    codec = TextCodec(a.checkpoint, cfg.vocab_size)
    prompts = list(a.prompt)
    if a.prompt_file:
        with open(a.prompt_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    prompts = prompts or DEFAULT_PROMPTS
    dev = cp.cuda.Device()
    print(f"{cp.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}: "
          f"{cfg.num_parameters() / 1e9:.2f}B parameters, {cfg.num_layers} layers, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads of {cfg.head_dim}", flush=True)
    t = time.perf_counter()
    weights = checkpoint.random(cfg, a.seed) if a.random else checkpoint.load(a.checkpoint, cfg)
    cp.cuda.Device().synchronize()
    print(f"weights: {weights.nbytes_read_per_token() / 2**30:.1f} GiB in {time.perf_counter() - t:.1f} s", flush=True)
    eng = Engine(cfg, weights, page_size=a.page_size, max_batch=a.max_batch, max_prefill_tokens=a.max_prefill_tokens,
                 kv_memory_fraction=a.kv_memory, seed=a.seed, ignore_eos=a.ignore_eos,
                 sampling_params=SamplingParams(a.temperature, a.top_k, a.top_p))
    reqs = [eng.add(codec.encode(p), a.max_new_tokens) for p in prompts]
    text = {r.rid: p for r, p in zip(reqs, prompts)}

    def show(r):
        print(f"--- [{r.rid}] {text[r.rid]!r} ({len(r.prompt)} tokens; {len(r.output)} new, {r.finish_reason})\n"
              f"{codec.decode(r.output)}", flush=True)

    t = time.perf_counter()
    eng.run(on_finish=show)
    wall = time.perf_counter() - t
    s = eng.stats
    steps = sorted(s.step_times)
    print(f"\nprefill: {s.prefill_tokens} tokens in {s.prefill_s * 1e3:.1f} ms "
          f"({s.prefill_tokens / max(s.prefill_s, 1e-9):,.0f} tokens/s)")
    if steps:
        print(f"decode: {s.decode_tokens} tokens in {s.decode_steps} steps, {s.decode_s * 1e3:.1f} ms "
              f"({s.decode_tokens / s.decode_s:,.0f} tokens/s); time per step median "
              f"{steps[len(steps) // 2] * 1e3:.2f} ms (the first, which captures a CUDA graph, "
              f"{s.step_times[0] * 1e3:.1f} ms)")
    print(f"KV pages: peak {eng.allocator.peak_used} of {eng.allocator.capacity} (page size {a.page_size}); "
          f"wall {wall:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
