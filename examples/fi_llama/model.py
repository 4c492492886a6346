"""The forward pass on the GPU: fi_cupy kernels for attention, norms, RoPE, the KV append and the
activation; cuBLAS (blas.py) for the four GEMMs of a layer and the LM head.

One set of activation buffers, sized for the largest step, serves prefill (eager) and decode (a
CUDA graph per padded batch size, captured at its first use and replayed after each re-plan: a
decode step is ~12 launches a layer, far more host time than GPU time at small batch)."""
from __future__ import annotations

import numpy as np

import cupy as cp
import cupyx
from ml_dtypes import bfloat16

import fi_cupy

from .batch import StepInputs, padded
from .blas import gemm
from .checkpoint import Weights
from .config import ModelConfig
from .rope import cos_sin_cache

WORKSPACE_BYTES = 256 << 20  # attention plans and split-KV partials
MAX_ROPE_POSITIONS = 1 << 17  # a 64 MiB table at head_dim 128


def graph_buckets(max_batch: int) -> list:
    """Batch sizes a decode graph is captured for: powers of two, then max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: Weights, num_pages: int, page_size: int, max_batch: int,
                 max_prefill_tokens: int, stream=None, max_positions: int | None = None, greedy: bool = False):
        self.cfg, self.w, self.page_size = cfg, weights, page_size
        # greedy: a decode step ends with the argmax of its logits, written to self.tokens[:batch]
        self.greedy = greedy
        # Positions the RoPE table covers (a request may hold this many tokens).
        self.max_positions = max_positions or min(cfg.max_position_embeddings, MAX_ROPE_POSITIONS)
        self.max_batch, self.num_pages = max_batch, num_pages
        self.stream = stream or cp.cuda.Stream(non_blocking=True)
        h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        rows = max(max_prefill_tokens, max_batch)
        with self.stream:
            self.cache = cp.empty((cfg.num_layers, num_pages, 2, page_size, hkv, d), dtype=bfloat16)  # NHD
            bf = dict(dtype=bfloat16)
            self.x, self.res = cp.empty((rows, h), **bf), cp.empty((rows, h), **bf)
            self.qkv = cp.empty((rows, cfg.qkv_rows), **bf)
            self.attn = cp.empty((rows, hq, d), **bf)
            self.gu = cp.empty((rows, 2 * cfg.intermediate_size), **bf)
            self.act = cp.empty((rows, cfg.intermediate_size), **bf)
            self.last = cp.empty((max_batch, h), **bf)
            self.logits = cp.empty((max_batch, cfg.vocab_size), dtype=cp.float32)
            i32 = dict(dtype=cp.int32)
            self.tokens, self.positions, self.bidx = (cp.zeros(rows, **i32) for _ in range(3))
            self.kv_indptr, self.kv_last = cp.zeros(max_batch + 1, **i32), cp.zeros(max_batch, **i32)
            self.kv_indices = cp.zeros(num_pages, **i32)
            self.last_rows = cp.zeros(max_batch, **i32)
            self.argmax = cp.zeros(max_batch, dtype=cp.int64)
            self.workspace = cp.empty(WORKSPACE_BYTES, dtype=cp.uint8)
            self.cos_sin = cp.asarray(cos_sin_cache(cfg.rope, cfg.head_dim, self.max_positions))
        staging = 4 * rows + 2 * max_batch + 1 + num_pages
        self._staging = [cupyx.empty_pinned(staging, dtype=np.int32) for _ in range(2)]
        self._staged, self._slot = [None, None], 0
        self.prefill_wrapper = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.buckets = graph_buckets(max_batch)
        self._decode = {}  # bucket -> (wrapper, graph or None)
        self._prepared = None  # (number of requests, bucket) of the decode step prepare_decode() queued

    # -- inputs ------------------------------------------------------------------------------------
    def _upload(self, s: StepInputs, tokens: bool = True) -> None:
        """Queue the step's index arrays to the device. Through pinned memory (two buffers, each reused
        once its copies have run): a copy from pageable memory may wait for the stream to drain, which
        would stall a host preparing the next step while the GPU runs this one."""
        parts = [(self.positions, s.positions), (self.bidx, s.batch_indices), (self.kv_indptr, s.kv_indptr),
                 (self.kv_last, s.kv_last), (self.kv_indices, s.kv_indices)]
        if tokens:
            parts.append((self.tokens, s.tokens))
        slot, self._slot = self._slot, 1 - self._slot
        if self._staged[slot] is not None:
            self._staged[slot].synchronize()
        buf, at = self._staging[slot], 0
        for dev, host in parts:
            buf[at:at + host.size] = host
            if host.size:
                dev.data.copy_from_host_async(buf[at:].ctypes.data, host.nbytes, self.stream)
            at += host.size
        self._staged[slot] = self.stream.record()

    def _plan_args(self, s: StepInputs) -> tuple:
        c = self.cfg
        return (s.kv_indptr, s.kv_indices, s.kv_last, c.num_heads, c.num_kv_heads, c.head_dim, self.page_size)

    # -- the layers --------------------------------------------------------------------------------
    def _rope(self, q, k, pos) -> None:
        fi_cupy.apply_rope_with_cos_sin_cache_inplace(pos, q, k, self.cfg.head_dim, self.cos_sin, is_neox=True)

    def _layers(self, n: int, num_requests: int, attend) -> None:
        """Every layer over the step's n tokens; leaves the final-normed hidden states in self.x[:n]."""
        c, w = self.cfg, self.w
        hq, hkv, eps = c.num_heads, c.num_kv_heads, c.rms_norm_eps
        x, res, qkv, attn = self.x[:n], self.res[:n], self.qkv[:n], self.attn[:n]
        pos, bidx = self.positions[:n], self.bidx[:n]
        indptr, last = self.kv_indptr[:num_requests + 1], self.kv_last[:num_requests]
        heads = qkv.reshape(n, hq + 2 * hkv, c.head_dim)
        q, k, v = heads[:, :hq], heads[:, hq:hq + hkv], heads[:, hq + hkv:]
        cp.take(w.embed, self.tokens[:n], axis=0, out=x)
        res.fill(0)  # so the first fused add-norm makes res = embedding, x = norm(embedding)
        for i, lw in enumerate(w.layers):
            fi_cupy.fused_add_rmsnorm(x, res, lw.ln1, eps)
            gemm(x, lw.wqkv, qkv)
            if lw.bqkv is not None:
                cp.add(qkv, lw.bqkv, out=qkv)
            self._rope(q, k, pos)
            fi_cupy.append_paged_kv_cache(k, v, bidx, pos, self.cache[i], self.kv_indices, indptr, last, check=False)
            attend(i, q, attn)
            gemm(attn.reshape(n, hq * c.head_dim), lw.wo, x)
            fi_cupy.fused_add_rmsnorm(x, res, lw.ln2, eps)
            gemm(x, lw.wgu, self.gu[:n])
            fi_cupy.silu_and_mul(self.gu[:n], out=self.act[:n])
            gemm(self.act[:n], lw.wd, x)
        fi_cupy.fused_add_rmsnorm(x, res, w.norm, eps)

    # -- prefill -----------------------------------------------------------------------------------
    def prefill(self, s: StepInputs, all_logits: bool = False):
        """Causal prefill of the step's prompts (KV empty before). Returns float32 logits: one row per
        request (its last token), or one per token with all_logits."""
        n, b = s.tokens.size, s.num_requests
        c = self.cfg
        self._prepared = None  # the step buffers are about to be overwritten
        with self.stream:
            self._upload(s)
            qo_indptr = s.qo_indptr
            self.prefill_wrapper.plan(qo_indptr, *self._plan_args(s), causal=True, q_data_type="bfloat16")
            self._layers(n, b, lambda i, q, out: self.prefill_wrapper.run(q, self.cache[i], out=out))
            if all_logits:
                logits = cp.full((n, c.vocab_size), np.nan, dtype=cp.float32)  # rows left unwritten show
                gemm(self.x[:n], self.w.lm_head, logits)
                return logits
            self.last_rows[:b].set(qo_indptr[1:] - 1, self.stream)
            cp.take(self.x[:n], self.last_rows[:b], axis=0, out=self.last[:b])
            gemm(self.last[:b], self.w.lm_head, self.logits[:b])
            return self.logits[:b]

    # -- decode ------------------------------------------------------------------------------------
    def _decode_body(self, wrapper, bucket: int) -> None:
        self._layers(bucket, bucket, lambda i, q, out: wrapper.run(q, self.cache[i], out=out))
        gemm(self.x[:bucket], self.w.lm_head, self.logits[:bucket])
        if self.greedy:  # the argmax, already in place as the next step's input tokens
            cp.argmax(self.logits[:bucket], axis=1, out=self.argmax[:bucket])
            self.tokens[:bucket] = self.argmax[:bucket]

    def decode(self, s: StepInputs):
        """One decode step: a token per request (positions = the request's KV length before it). Runs as
        a CUDA graph of the padded batch size; the padding requests read and write page 0 only.
        Returns float32 logits (num_requests, vocab)."""
        self.prepare_decode(s, tokens=True)
        return self.launch_decode()

    def prepare_decode(self, s: StepInputs, tokens: bool = True) -> None:
        """Queue the step's inputs and plan its attention, without running it. tokens=False leaves
        self.tokens as it is: the caller has put the step's tokens there on the device (the previous
        step's samples), so this can run on the host while the previous step still runs on the GPU."""
        b = s.num_requests
        if s.tokens.size != b or b > self.max_batch:
            raise ValueError(f"decode: expected one token per request and at most {self.max_batch} requests")
        bucket = next(x for x in self.buckets if x >= b)
        s = padded(s, bucket)
        with self.stream:
            self._upload(s, tokens)
            wrapper, graph = self._decode.get(bucket, (None, None))
            if wrapper is None:
                wrapper = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_cuda_graph=True)
                self._decode[bucket] = (wrapper, None)
            wrapper.plan(*self._plan_args(s), q_data_type="bfloat16")
        self._prepared = (b, bucket)

    def launch_decode(self):
        """Run the prepared step; returns its float32 logits (num_requests, vocab)."""
        if self._prepared is None:
            raise RuntimeError("launch_decode() without prepare_decode()")
        (b, bucket), self._prepared = self._prepared, None
        wrapper, graph = self._decode[bucket]
        with self.stream:
            if graph is None:  # first use: run eagerly (this step's result), then capture for the next ones
                self._decode_body(wrapper, bucket)
                self.stream.begin_capture()
                try:
                    self._decode_body(wrapper, bucket)
                finally:
                    graph = self.stream.end_capture()
                self._decode[bucket] = (wrapper, graph)
            else:
                graph.launch(self.stream)
        return self.logits[:b]
