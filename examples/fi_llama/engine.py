"""The serving loop: the scheduler picks each step's prefill and decode requests, the model runs
them, the sampler picks one token per request, finished requests give their pages back."""
from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

import cupy as cp
import cupyx

import fi_cupy
from fi_cupy import sampling

from .batch import decode_inputs, prefill_inputs
from .checkpoint import Weights
from .config import ModelConfig
from .model import LlamaModel
from .pages import PageAllocator
from .scheduler import Request, Scheduler, Step


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # <= 0: off
    top_p: float = 1.0        # 1: off


def sample(logits, p: SamplingParams, generator: sampling.Generator):
    """int32 token ids (rows of logits), on the current stream."""
    if p.temperature <= 0:
        return cp.argmax(logits, axis=1).astype(cp.int32)
    probs = fi_cupy.softmax(logits, temperature=float(p.temperature))
    k = p.top_k if 0 < p.top_k < logits.shape[1] else 0
    if k and p.top_p < 1.0:
        return fi_cupy.top_k_top_p_sampling_from_probs(probs, k, p.top_p, generator=generator)
    if k:
        return fi_cupy.top_k_sampling_from_probs(probs, k, generator=generator)
    if p.top_p < 1.0:
        return fi_cupy.top_p_sampling_from_probs(probs, p.top_p, generator=generator)
    return fi_cupy.sampling_from_probs(probs, generator=generator)


@dataclasses.dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    step_times: list = dataclasses.field(default_factory=list)  # seconds of each decode step


def kv_pages_for_memory(cfg: ModelConfig, page_size: int, fraction: float) -> int:
    """Pages that `fraction` of the GPU's free memory holds."""
    free, _ = cp.cuda.runtime.memGetInfo()
    return max(2, int(free * fraction) // (cfg.kv_bytes_per_token() * page_size))


class Engine:
    def __init__(self, cfg: ModelConfig, weights: Weights, *, page_size: int = 16, max_batch: int = 64,
                 max_prefill_tokens: int = 8192, num_pages: int | None = None, kv_memory_fraction: float = 0.5,
                 sampling_params: SamplingParams = SamplingParams(), seed: int = 0, ignore_eos: bool = False):
        if num_pages is None:
            num_pages = kv_pages_for_memory(cfg, page_size, kv_memory_fraction)
        self.cfg, self.page_size, self.params = cfg, page_size, sampling_params
        self.model = LlamaModel(cfg, weights, num_pages, page_size, max_batch, max_prefill_tokens,
                                greedy=sampling_params.temperature <= 0)
        self.allocator = PageAllocator(num_pages)
        self.scheduler = Scheduler(self.allocator, page_size, max_batch, max_prefill_tokens, cfg.eos_token_ids,
                                   ignore_eos)
        self.generator = sampling.Generator(seed)
        self.stats = Stats()
        self._ids = itertools.count()
        self._ids_host = cupyx.empty_pinned((max_batch,), dtype=np.int32)  # sampled ids land here
        self._ahead = None  # the decode requests whose next step is queued (see step())

    def add(self, prompt, max_new_tokens: int) -> Request:
        r = Request(next(self._ids), [int(t) for t in prompt], int(max_new_tokens))
        if r.worst_kv_len > self.model.max_positions:
            raise ValueError(f"request: prompt + max_new_tokens - 1 = {r.worst_kv_len} tokens exceed the "
                             f"{self.model.max_positions} positions of the model's RoPE table")
        bad = [t for t in r.prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        self.scheduler.add(r)
        return r

    def step(self) -> list:
        """One scheduler step (a prefill of the admitted requests and/or a decode of the running ones).
        Returns the requests that finished.

        Decode steps overlap host and GPU: while a step runs on the GPU, the host queues the next
        step's positions and page table and plans its attention, assuming every request goes on; its
        tokens are this step's samples, copied on the device. The next step launches that at once
        unless the batch changed (a request finished at EOS, or new ones were admitted)."""
        step = self.scheduler.schedule()
        tokens = []
        if step.prefill:
            t = time.perf_counter()
            logits = self.model.prefill(prefill_inputs(step.prefill, self.page_size))
            tokens.append(self._wait(self._sample(logits)))
            self.stats.prefill_s += time.perf_counter() - t
            self.stats.prefill_tokens += sum(len(r.prompt) for r in step.prefill)
            self._ahead = None
        if step.decode:
            t = time.perf_counter()
            if self._ahead != step.decode:
                self.model.prepare_decode(decode_inputs(step.decode, self.page_size))
            pending = self._sample(self.model.launch_decode(), stage=True)
            self._ahead = self._prepare_next(step.decode)
            tokens.append(self._wait(pending))
            dt = time.perf_counter() - t
            self.stats.decode_s += dt
            self.stats.step_times.append(dt)
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(step.decode)
        if not tokens:
            if self.scheduler.waiting:
                raise RuntimeError("no request could be admitted (the KV cache or the prefill budget is too small)")
            return []
        return self.scheduler.commit(step, np.concatenate(tokens))

    def _prepare_next(self, reqs):
        """Queue the decode step that follows `reqs` if none of them can finish by length now; returns
        the requests it was prepared for, or None."""
        if any(len(r.output) + 1 >= r.max_new_tokens for r in reqs):
            return None
        for r in reqs:  # after this step's token: kv_len + 1 cached, kv_len + 2 after the next append
            self.scheduler.reserve(r, r.kv_len + 2)
        self.model.prepare_decode(decode_inputs(reqs, self.page_size, ahead=True), tokens=False)
        return list(reqs)

    def _sample(self, logits, stage: bool = False):
        """Queue sampling and the copy of the ids to the host; with stage, the ids also become the
        next decode step's input tokens on the device (a greedy decode step's graph did both).
        Returns what _wait() needs."""
        b = logits.shape[0]
        with self.model.stream:
            if stage and self.model.greedy:
                ids = self.model.tokens[:b]
            else:
                ids = sample(logits, self.params, self.generator)
                if stage:
                    self.model.tokens[:b] = ids
            ids.get(stream=self.model.stream, out=self._ids_host[:b], blocking=False)
            done = self.model.stream.record()
        return done, b

    def _wait(self, pending) -> np.ndarray:
        done, b = pending
        done.synchronize()
        return self._ids_host[:b].copy()

    def run(self, on_finish=None) -> list:
        """Steps until every request has finished; returns them in the order they finished."""
        done = []
        while self.scheduler.has_work:
            for r in self.step():
                done.append(r)
                if on_finish is not None:
                    on_finish(r)
        return done


__all__ = ["Engine", "SamplingParams", "Stats", "Step", "sample"]
