"""Continuous batching: which requests prefill and which decode at each step, and their KV pages.

A request is admitted (FIFO) when the batch has room, the step's prefill-token budget allows, and the
cache can hold the worst case of every admitted request (prompt + max_new_tokens - 1 tokens), so a
running request never finds the cache full. Pages are taken as tokens arrive and given back when
the request finishes, for the next ones to reuse."""
from __future__ import annotations

import collections
import dataclasses

from .pages import PageAllocator, pages_for


@dataclasses.dataclass(eq=False)
class Request:
    rid: int
    prompt: list
    max_new_tokens: int
    output: list = dataclasses.field(default_factory=list)
    pages: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    @property
    def kv_len(self) -> int:
        """Tokens whose K/V are in the cache: the prompt, then every output token but the newest."""
        return len(self.prompt) + len(self.output) - 1 if self.output else 0

    @property
    def worst_kv_len(self) -> int:
        return len(self.prompt) + self.max_new_tokens - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class Step:
    prefill: list  # admitted this step: their prompts run through the model, one token each comes out
    decode: list   # running: their newest token runs through the model, one token each comes out


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_batch: int, max_prefill_tokens: int,
                 eos_token_ids=(), ignore_eos: bool = False):
        if max_batch < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch and max_prefill_tokens must be >= 1")
        self.allocator, self.page_size = allocator, page_size
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.eos = frozenset(() if ignore_eos else eos_token_ids)
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.finished: list = []
        self._committed = 0  # worst-case pages of the running requests

    def add(self, req: Request) -> None:
        if not req.prompt:
            raise ValueError(f"request {req.rid}: empty prompt")
        if req.max_new_tokens < 1:
            raise ValueError(f"request {req.rid}: max_new_tokens must be >= 1")
        need = pages_for(req.worst_kv_len, self.page_size)
        if need > self.allocator.capacity:
            raise ValueError(f"request {req.rid}: needs {need} KV pages ({req.worst_kv_len} tokens), the cache holds "
                             f"{self.allocator.capacity}")
        if len(req.prompt) > self.max_prefill_tokens:
            raise ValueError(f"request {req.rid}: prompt of {len(req.prompt)} tokens exceeds max_prefill_tokens "
                             f"{self.max_prefill_tokens}")
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        decode = list(self.running)
        for r in decode:  # room for the token appended this step
            self._grow(r, r.kv_len + 1)
        prefill, tokens = [], 0
        while self.waiting and len(self.running) + len(prefill) < self.max_batch:
            r = self.waiting[0]
            worst = pages_for(r.worst_kv_len, self.page_size)
            if tokens + len(r.prompt) > self.max_prefill_tokens or \
                    self._committed + worst > self.allocator.capacity:
                break
            self.waiting.popleft()
            self._committed += worst
            tokens += len(r.prompt)
            self._grow(r, len(r.prompt))
            prefill.append(r)
        return Step(prefill, decode)

    def reserve(self, r: Request, kv_tokens: int) -> None:
        """Pages for kv_tokens tokens of a running request ahead of its step (within its worst case)."""
        if kv_tokens > r.worst_kv_len:
            raise ValueError(f"request {r.rid}: {kv_tokens} tokens exceed its worst case {r.worst_kv_len}")
        self._grow(r, kv_tokens)

    def _grow(self, r: Request, kv_tokens: int) -> None:
        extra = pages_for(kv_tokens, self.page_size) - len(r.pages)
        if extra > 0:
            r.pages += self.allocator.allocate(extra)

    def commit(self, step: Step, tokens) -> list:
        """Record one new token per request of the step (prefill first, then decode, as `tokens` is
        ordered), finish those at EOS or max_new_tokens and free their pages. Returns the finished."""
        reqs = step.prefill + step.decode
        if len(tokens) != len(reqs):
            raise ValueError(f"commit: {len(tokens)} tokens for {len(reqs)} requests")
        done = []
        for r, t in zip(reqs, tokens):
            r.output.append(int(t))
            if int(t) in self.eos:
                r.finish_reason = "eos"
            elif len(r.output) >= r.max_new_tokens:
                r.finish_reason = "length"
            if r.finished:
                done.append(r)
        self.running += step.prefill
        for r in done:
            self.running.remove(r)
            self.allocator.free(r.pages)
            r.pages = []
            self._committed -= pages_for(r.worst_kv_len, self.page_size)
            self.finished.append(r)
        return done
