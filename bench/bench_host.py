"""Host cost of eager calls (issue 21): wall time per call of back-to-back calls of every public op on tiny
shapes (so the GPU is never the limit), from torch, CuPy and JAX callers, next to FlashInfer's same-named
call and torch's own equivalent where importable; plus plan() of the decode and paged-prefill wrappers at
batch 1, 16, 128, 512 (host numpy index arrays).

Per-call time: common.per_call_us, the mean wall time over N calls after warm-up, with a device-wide sync
before and after the timed loop (so queued GPU work counts). plan(): the median of single calls, each
between two syncs (plan() uploads; the upload counts). Microseconds throughout.

Cells: a figure in us; "n/a" the op does not take this caller (JAX arrays are immutable: no in-place op,
no out=); "-" the framework or peer is not importable (or has no GPU); "err" the case failed (its error is
printed and the run goes on). Rows marked [cupy: fp16] give CuPy float16 inputs where the others get
bfloat16 (CuPy holds bfloat16 only through ml_dtypes, which is not installed).

Usage: python bench/bench_host.py [--quick] [--dry] [--json PATH] [--only OPS] [--callers torch,cupy,jax]
                                  [--peers flashinfer,torch] [--calls N]
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside torch and CuPy on one GPU

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import per_call_us, print_table, save_json, torch_or_none  # noqa: E402

import fi_cupy  # noqa: E402

CALLERS = ("torch", "cupy", "jax")  # fi_cupy called with this framework's arrays
COLUMNS = ("fi_cupy/torch", "fi_cupy/cupy", "fi_cupy/jax", "flashinfer", "torch")
HEADER = ["op", "shape", "fi_cupy torch-caller", "fi_cupy cupy-caller", "fi_cupy jax-caller", "FlashInfer", "torch",
          "issue 21 (H200)", "target (issue 21)"]
PLAN_BATCHES = (1, 16, 128, 512)
CUPY_TARGET_US = 8.0  # issue 21: element-wise ops from CuPy at most 8 us a call

# Shapes (Llama 3.1 8B where it applies): hidden, MLP width, heads, head dim, page size, vocab.
H, INTER, HQ, HKV, D, PAGE = 4096, 14336, 32, 8, 128, 16
VOCAB = 4096  # small on purpose: a one-row sampling call stays launch-bound on the GPU
SPEC = 4  # draft tokens of chain_speculative_sampling
WORKSPACE = 256 << 20  # wrapper workspace bytes (enough for plan() at batch 512)

# Issue 21's figures: one H200 run, torch tensors in, 2000 back-to-back calls.
ISSUE21 = {
    ("rmsnorm", None): {"fi_cupy": 129, "flashinfer": 8.9, "torch": 14.9},
    ("silu_and_mul", None): {"fi_cupy": 57, "flashinfer": 8.0, "torch": 21},
    ("BatchDecodeWithPagedKVCacheWrapper.run", None): {"fi_cupy": 102, "flashinfer": 38.5},
    ("BatchDecodeWithPagedKVCacheWrapper.plan", 16): {"fi_cupy": 959, "flashinfer": 487},
}

# Public names with no row of their own, and why (tests/test_bench_host_cpu.py checks the rest all appear).
NOT_TIMED = {
    "__version__": "not an op",
    "KernelCompileError": "not an op",
    "CudaEnvironmentError": "not an op",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper": "BatchDecodeWithPagedKVCacheWrapper's plan() and run() "
                                                   "over fixed buffers, for CUDA-graph capture, not eager calls",
    "AttentionVariant": "not an op (a custom variant's declaration)",
    "single_prefill_with_kv_cache_with_jit_module": "custom variants: bench/bench_jit.py times their compile, load "
                                                    "and kernels",
    "single_decode_with_kv_cache_with_jit_module": "custom variants: bench/bench_jit.py times their compile, load "
                                                   "and kernels",
    "get_batch_prefill_jit_module": "not an op (a custom variant's module lookup)",
    "get_batch_decode_jit_module": "not an op (a custom variant's module lookup)",
}


@dataclass(frozen=True)
class Case:
    """One row: build(mod, maker) makes the inputs with maker (a Maker) and returns the zero-argument call
    to time, of `mod` (fi_cupy, or flashinfer with torch tensors: same names and signatures)."""
    group: str
    op: str  # the public name; Class.method for wrappers
    shape: str
    build: Callable
    kind: str = "elementwise"  # elementwise | attention | run | plan | step (plan + runs) | sync (waits for the host)
    callers: tuple = CALLERS
    flashinfer: bool = True  # FlashInfer has the same call
    torch: Callable | None = None  # torch_peer(torch, maker) -> call: torch's own equivalent
    half: bool = True  # inputs in bfloat16 (CuPy: float16 without ml_dtypes)
    batch: int | None = None

    @property
    def issue(self):
        return ISSUE21.get((self.op, self.batch))


# ---------------------------------------------------------------------------------------------------------
# Inputs


@functools.lru_cache(maxsize=None)
def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def host_probs(*shape):
    x = randn(*shape) * 3
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def i32(a):
    return np.ascontiguousarray(a, dtype=np.int32)


class Maker:
    """Device arrays of one caller's framework, from host (numpy) data. dtype "half" is the case's 16-bit
    float: bfloat16, or float16 for CuPy without ml_dtypes."""

    def __init__(self, name: str, half: str = "bfloat16"):
        self.name, self.half = name, half
        self.mutable = name != "jax"  # JAX arrays are never written: no out=, no in-place op
        if name == "torch":
            import torch
            self.xp = torch
        elif name == "cupy":
            import cupy
            self.xp = cupy
        else:
            import jax.numpy as jnp
            self.xp = jnp

    def dtype(self, name: str = "half"):
        name = self.half if name == "half" else name
        if self.name == "torch":
            return getattr(self.xp, name)
        if self.name == "cupy":
            if name == "bfloat16":
                import ml_dtypes
                return ml_dtypes.bfloat16
            return np.dtype(name)
        return getattr(self.xp, "bool_" if name == "bool" else name)

    def dtype_arg(self):
        """q_data_type for plan(): torch's dtype object for torch callers (FlashInfer wants one), else a name."""
        return self.dtype() if self.name == "torch" else self.half

    def arr(self, host, dtype: str = "half"):
        host, d = np.ascontiguousarray(host), self.dtype(dtype)
        if self.name == "torch":
            return self.xp.from_numpy(host).to("cuda").to(d)
        if self.name == "cupy":
            return self.xp.asarray(host).astype(d)
        a = self.xp.asarray(host).astype(d)
        a.block_until_ready()
        return a

    def zeros(self, shape, dtype: str = "half"):
        if self.name == "torch":
            return self.xp.zeros(shape, dtype=self.dtype(dtype), device="cuda")
        a = self.xp.zeros(shape, dtype=self.dtype(dtype))
        if self.name == "jax":
            a.block_until_ready()
        return a


def peer(mod) -> bool:
    return mod is not fi_cupy


def index_arg(mod, mk: Maker, a):
    """A host index array for plan(): numpy for fi_cupy, a CPU torch tensor for FlashInfer."""
    return mk.xp.from_numpy(i32(a)) if peer(mod) else i32(a)


def op_fn(mod, name: str):
    """mod.name, or mod.<submodule>.name (FlashInfer keeps some functions in submodules only)."""
    got = getattr(mod, name, None)
    for sub in ("sampling", "quantization", "page", "cascade", "rope", "norm", "activation", "decode", "prefill"):
        if got is not None:
            break
        got = getattr(getattr(mod, sub, None), name, None)
    if got is None:
        raise AttributeError(f"{getattr(mod, '__name__', mod)} has no {name}")
    return got


def out_call(f, mk: Maker, out_shape, *args, **kw):
    """f(*args, out=new array) for callers whose arrays may be written, else f(*args) (JAX)."""
    if mk.mutable:
        o = mk.zeros(out_shape)
        return lambda: f(*args, out=o, **kw)
    return lambda: f(*args, **kw)


# ---------------------------------------------------------------------------------------------------------
# Norms, activations


def b_norm(name):
    def build(mod, mk):
        x, w = mk.arr(randn(1, H)), mk.arr(randn(H, seed=1))
        return out_call(op_fn(mod, name), mk, (1, H), x, w)
    return build


def b_fused_add(name):
    def build(mod, mk):
        x, r, w = mk.arr(randn(1, H)), mk.arr(randn(1, H, seed=1)), mk.arr(randn(H, seed=2))
        f = op_fn(mod, name)
        return lambda: f(x, r, w)
    return build


def b_layernorm(mod, mk):
    x, g, b = mk.arr(randn(1, H)), mk.arr(randn(H, seed=1), "float32"), mk.arr(randn(H, seed=2), "float32")
    f = op_fn(mod, "layernorm")
    return lambda: f(x, g, b)


def b_act(name):
    def build(mod, mk):
        return out_call(op_fn(mod, name), mk, (1, INTER), mk.arr(randn(1, 2 * INTER)))
    return build


def t_rmsnorm(gemma):
    def build(torch, mk):
        x, w = mk.arr(randn(1, H)), mk.arr(randn(H, seed=1) + (1.0 if gemma else 0.0))  # gemma: 1 + w held
        return lambda: torch.nn.functional.rms_norm(x, (H,), w, 1e-6)
    return build


def t_fused_add(torch, mk):
    x, r, w = mk.arr(randn(1, H)), mk.arr(randn(1, H, seed=1)), mk.arr(randn(H, seed=2))

    def fn():  # the same in-place contract: residual += input; input = norm(residual)
        r.add_(x)
        x.copy_(torch.nn.functional.rms_norm(r, (H,), w, 1e-6))
    return fn


def t_layernorm(torch, mk):
    x, g, b = mk.arr(randn(1, H)), mk.arr(randn(H, seed=1)), mk.arr(randn(H, seed=2))
    return lambda: torch.nn.functional.layer_norm(x, (H,), g, b, 1e-6)


def t_act(kind):
    def build(torch, mk):
        F = torch.nn.functional
        x = mk.arr(randn(1, 2 * INTER))
        act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda a: F.gelu(a, approximate="tanh")}[kind]
        return lambda: act(x[..., :INTER]) * x[..., INTER:]
    return build


def norm_cases():
    g, s = "norm", f"1x{H} bf16"
    yield Case(g, "rmsnorm", s + ", out=", b_norm("rmsnorm"), torch=t_rmsnorm(False))
    yield Case(g, "gemma_rmsnorm", s + ", out=", b_norm("gemma_rmsnorm"), torch=t_rmsnorm(True))
    yield Case(g, "fused_add_rmsnorm", s + ", in place", b_fused_add("fused_add_rmsnorm"), torch=t_fused_add)
    yield Case(g, "gemma_fused_add_rmsnorm", s + ", in place", b_fused_add("gemma_fused_add_rmsnorm"))
    yield Case(g, "layernorm", s + ", fp32 gamma/beta", b_layernorm, torch=t_layernorm)


def activation_cases():
    s = f"1x{INTER} bf16, out="
    for name, kind in (("silu_and_mul", "silu"), ("gelu_and_mul", "gelu"), ("gelu_tanh_and_mul", "gelu_tanh")):
        yield Case("activation", name, s, b_act(name), torch=t_act(kind))


# ---------------------------------------------------------------------------------------------------------
# RoPE


def qk(mk):
    return mk.arr(randn(1, HQ, D)), mk.arr(randn(1, HKV, D, seed=1))


def b_rope_pos(name):
    def build(mod, mk):
        q, k = qk(mk)
        pos, f = mk.arr(np.array([1000]), "int32"), op_fn(mod, name)
        return lambda: f(q, k, pos)
    return build


def b_rope_indptr(name):
    def build(mod, mk):
        q, k = qk(mk)
        indptr, offsets, f = mk.arr(np.array([0, 1]), "int32"), mk.arr(np.array([1000]), "int32"), op_fn(mod, name)
        return lambda: f(q, k, indptr, offsets)
    return build


def b_rope_cache(name):
    def build(mod, mk):
        q, k = mk.arr(randn(1, HQ * D)), mk.arr(randn(1, HKV * D, seed=1))
        pos, cache = mk.arr(np.array([1000]), "int64"), mk.arr(randn(4096, D, seed=2), "float32")
        f = op_fn(mod, name)
        return lambda: f(pos, q, k, D, cache, True)
    return build


def rope_cases():
    s = f"1x({HQ}+{HKV})x{D} bf16"
    for base in ("apply_rope", "apply_llama31_rope"):
        for suffix, builder in (("_pos_ids", b_rope_pos), ("", b_rope_indptr)):
            name = base + suffix
            yield Case("rope", name, s + ", returns new q/k", builder(name))
            yield Case("rope", name + "_inplace", s, builder(name + "_inplace"), callers=("torch", "cupy"))
    name = "apply_rope_with_cos_sin_cache"
    yield Case("rope", name, s + ", int64 positions, fp32 cache", b_rope_cache(name))
    yield Case("rope", name + "_inplace", s + ", int64 positions, fp32 cache", b_rope_cache(name + "_inplace"),
               callers=("torch", "cupy"))


# ---------------------------------------------------------------------------------------------------------
# Paged KV append and helpers, state merge, packbits


APPEND_B, APPEND_PAGES = 16, 64  # 16 requests of 1024 tokens; one token appended to each


def b_append(check):
    def build(mod, mk):
        cache = mk.arr(randn(APPEND_B * APPEND_PAGES, 2, PAGE, HKV, D))
        key, value = mk.arr(randn(APPEND_B, HKV, D, seed=1)), mk.arr(randn(APPEND_B, HKV, D, seed=2))
        bi, pos = mk.arr(np.arange(APPEND_B), "int32"), mk.arr(np.full(APPEND_B, APPEND_PAGES * PAGE - 1), "int32")
        indices = mk.arr(np.random.default_rng(3).permutation(APPEND_B * APPEND_PAGES), "int32")
        indptr = mk.arr(np.arange(APPEND_B + 1) * APPEND_PAGES, "int32")
        last = mk.arr(np.full(APPEND_B, PAGE), "int32")
        f = op_fn(mod, "append_paged_kv_cache")
        kw = {} if check is None else {"check": check}
        return lambda: f(key, value, bi, pos, cache, indices, indptr, last, **kw)
    return build


def b_batch_indices(mod, mk):
    ip, lens = mk.arr(np.arange(APPEND_B + 1), "int32"), mk.arr(np.full(APPEND_B, APPEND_PAGES * PAGE), "int32")
    f = op_fn(mod, "get_batch_indices_positions")
    return lambda: f(ip, lens, APPEND_B)


def b_seq_lens(mod, mk):
    ip = mk.arr(np.arange(APPEND_B + 1) * APPEND_PAGES, "int32")
    last = mk.arr(np.full(APPEND_B, 7), "int32")
    f = op_fn(mod, "get_seq_lens")
    return lambda: f(ip, last, PAGE)


def state(mk, seed, states=None):
    lead = (1,) if states is None else (1, states)
    return mk.arr(randn(*lead, HQ, D, seed=seed)), mk.arr(randn(*lead, HQ, seed=seed + 1), "float32")


def b_merge_state(mod, mk):
    (va, sa), (vb, sb) = state(mk, 0), state(mk, 2)
    f = op_fn(mod, "merge_state")
    return lambda: f(va, sa, vb, sb)


def b_merge_in_place(mod, mk):
    (v, s), (vo, so) = state(mk, 0), state(mk, 2)
    f = op_fn(mod, "merge_state_in_place")
    return lambda: f(v, s, vo, so)


def b_merge_states(mod, mk):
    v, s = state(mk, 0, states=2)
    f = op_fn(mod, "merge_states")
    return lambda: f(v, s)


MASK = 128 * 128  # one 128 x 128 custom mask


def b_packbits(mod, mk):
    x, f = mk.arr(randn(MASK) > 0, "bool"), op_fn(mod, "packbits")
    return lambda: f(x, "little")


def b_segment_packbits(mod, mk):
    x, f = mk.arr(randn(MASK) > 0, "bool"), op_fn(mod, "segment_packbits")
    indptr = np.arange(0, MASK + 1, MASK // 4)
    ip = mk.arr(indptr, "int32") if peer(mod) else indptr  # fi_cupy reads indptr on the host: numpy
    return lambda: f(x, ip, "little")


def page_cases():
    s = f"{APPEND_B} requests x 1 token, {APPEND_B}x{APPEND_PAGES} pages of {PAGE}x{HKV}x{D} bf16"
    yield Case("page", "append_paged_kv_cache", s, b_append(None), callers=("torch", "cupy"))
    yield Case("page", "append_paged_kv_cache", s + ", check=False", b_append(False), callers=("torch", "cupy"),
               flashinfer=False)
    yield Case("page", "get_batch_indices_positions", f"{APPEND_B} requests, nnz {APPEND_B}", b_batch_indices,
               half=False)
    yield Case("page", "get_seq_lens", f"{APPEND_B} requests", b_seq_lens, half=False)


def merge_cases():
    s = f"1x{HQ}x{D} bf16"
    yield Case("merge", "merge_state", s, b_merge_state)
    yield Case("merge", "merge_state_in_place", s, b_merge_in_place, callers=("torch", "cupy"))
    yield Case("merge", "merge_states", f"1x2x{HQ}x{D} bf16", b_merge_states)


def quantization_cases():
    s = f"{MASK} bools, little"
    yield Case("quantization", "packbits", s, b_packbits, kind="sync", half=False)
    yield Case("quantization", "segment_packbits", s + ", 4 segments", b_segment_packbits, kind="sync", half=False)


# ---------------------------------------------------------------------------------------------------------
# Sampling (float32, default generator: the same call a FlashInfer user makes)


def b_sampling(name, src, *params):
    def build(mod, mk):
        x = mk.arr(host_probs(1, VOCAB) if src == "probs" else randn(1, VOCAB) * 3, "float32")
        f = op_fn(mod, name)
        return lambda: f(x, *params)
    return build


def b_speculative(mod, mk):
    dq = mk.arr(host_probs(1, SPEC, VOCAB), "float32")
    tq = mk.arr(host_probs(1, SPEC + 1, VOCAB), "float32")
    ids = mk.arr(np.random.default_rng(1).integers(0, VOCAB, (1, SPEC)), "int32")
    f = op_fn(mod, "chain_speculative_sampling")
    return lambda: f(dq, ids, tq)


def t_sampling(kind):
    def build(torch, mk):
        if kind == "softmax":
            x = mk.arr(randn(1, VOCAB) * 3, "float32")
            return lambda: torch.softmax(x, -1)
        if kind == "from_logits":
            x = mk.arr(randn(1, VOCAB) * 3, "float32")
            return lambda: torch.multinomial(torch.softmax(x, -1), 1)
        x = mk.arr(host_probs(1, VOCAB), "float32")
        return lambda: torch.multinomial(x, 1)
    return build


SAMPLING = (  # name, input, FlashInfer's positional parameters, torch equivalent
    ("softmax", "logits", (), "softmax"),
    ("sampling_from_probs", "probs", (), "from_probs"),
    ("sampling_from_logits", "logits", (), "from_logits"),
    ("top_p_sampling_from_probs", "probs", (0.9,), None),
    ("top_k_sampling_from_probs", "probs", (50,), None),
    ("min_p_sampling_from_probs", "probs", (0.1,), None),
    ("top_k_top_p_sampling_from_probs", "probs", (50, 0.9), None),
    ("top_k_top_p_sampling_from_logits", "logits", (50, 0.9), None),
    ("top_p_renorm_probs", "probs", (0.9,), None),
    ("top_k_renorm_probs", "probs", (50,), None),
    ("top_k_mask_logits", "logits", (50,), None),
)


def sampling_cases():
    for name, src, params, t in SAMPLING:
        shape = f"1x{VOCAB} fp32" + "".join(f", {p}" for p in params)
        yield Case("sampling", name, shape, b_sampling(name, src, *params), half=False,
                   torch=t_sampling(t) if t else None)
    yield Case("sampling", "chain_speculative_sampling", f"1x{SPEC} drafts x {VOCAB} fp32", b_speculative,
               half=False)


# ---------------------------------------------------------------------------------------------------------
# Attention: single requests, planned wrappers


SINGLE_KV, PREFILL_L = 1024, 128


def b_single_decode(mod, mk):
    q, k, v = (mk.arr(randn(*s, seed=i)) for i, s in enumerate(((HQ, D), (SINGLE_KV, HKV, D), (SINGLE_KV, HKV, D))))
    f = op_fn(mod, "single_decode_with_kv_cache")
    return lambda: f(q, k, v)


def b_single_prefill(mod, mk):
    q = mk.arr(randn(PREFILL_L, HQ, D))
    k, v = mk.arr(randn(PREFILL_L, HKV, D, seed=1)), mk.arr(randn(PREFILL_L, HKV, D, seed=2))
    f = op_fn(mod, "single_prefill_with_kv_cache")
    return lambda: f(q, k, v, causal=True)


def t_sdpa(q_len, kv_len, causal):
    def build(torch, mk):
        # torch takes (batch, heads, tokens, head_dim): views of the NHD arrays, made once.
        q = mk.arr(randn(q_len, HQ, D)).transpose(0, 1).unsqueeze(0)
        k = mk.arr(randn(kv_len, HKV, D, seed=1)).transpose(0, 1).unsqueeze(0)
        v = mk.arr(randn(kv_len, HKV, D, seed=2)).transpose(0, 1).unsqueeze(0)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda: sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    return build


DEC_B, DEC_PAGES = 16, 1024 // PAGE  # decode run(): 16 requests x 1024 tokens
PF_B, PF_QO, PF_PAGES = 4, 16, 256 // PAGE  # prefill run(): 4 requests, 16 new tokens onto 256


def decode_table(batch, pages=DEC_PAGES):
    return (np.arange(batch + 1) * pages, np.random.default_rng(batch).permutation(batch * pages),
            np.full(batch, PAGE))


def wrapper(mod, mk, cls, **kw):
    return getattr(mod, cls)(mk.zeros((WORKSPACE,), "uint8"), **kw)


def b_decode_run(mod, mk):
    w = wrapper(mod, mk, "BatchDecodeWithPagedKVCacheWrapper")
    w.plan(*(index_arg(mod, mk, a) for a in decode_table(DEC_B)), HQ, HKV, D, PAGE, q_data_type=mk.dtype_arg())
    q, cache = mk.arr(randn(DEC_B, HQ, D)), mk.arr(randn(DEC_B * DEC_PAGES, 2, PAGE, HKV, D, seed=1))
    return out_call(w.run, mk, (DEC_B, HQ, D), q, cache)


def prefill_tables(batch, qo, pages):
    qo_indptr = np.arange(batch + 1) * qo
    return (qo_indptr,) + decode_table(batch, pages)


def b_paged_prefill_run(mod, mk):
    w = wrapper(mod, mk, "BatchPrefillWithPagedKVCacheWrapper")
    w.plan(*(index_arg(mod, mk, a) for a in prefill_tables(PF_B, PF_QO, PF_PAGES)), HQ, HKV, D, PAGE, causal=True,
           q_data_type=mk.dtype_arg())
    q, cache = mk.arr(randn(PF_B * PF_QO, HQ, D)), mk.arr(randn(PF_B * PF_PAGES, 2, PAGE, HKV, D, seed=1))
    return out_call(w.run, mk, (PF_B * PF_QO, HQ, D), q, cache)


def b_ragged_prefill_run(mod, mk):
    w = wrapper(mod, mk, "BatchPrefillWithRaggedKVCacheWrapper")
    kv = PF_PAGES * PAGE
    w.plan(index_arg(mod, mk, np.arange(PF_B + 1) * PF_QO), index_arg(mod, mk, np.arange(PF_B + 1) * kv), HQ, HKV,
           D, causal=True, q_data_type=mk.dtype_arg())
    q = mk.arr(randn(PF_B * PF_QO, HQ, D))
    k, v = mk.arr(randn(PF_B * kv, HKV, D, seed=1)), mk.arr(randn(PF_B * kv, HKV, D, seed=2))
    return out_call(w.run, mk, (PF_B * PF_QO, HQ, D), q, k, v)


MLA_H, MLA_PAGE = 16, 64  # MLA decode: 16 heads (a tensor-parallel slice of 128), pages of 64


def mla_tables(batch=DEC_B, kv=DEC_PAGES * PAGE):
    pages = -(-kv // MLA_PAGE)
    return (np.arange(batch + 1), np.arange(batch + 1) * pages, np.random.default_rng(4).permutation(batch * pages),
            np.full(batch, kv))


def b_mla_run(mod, mk):
    w = getattr(mod, "BatchMLAPagedAttentionWrapper")(mk.zeros((WORKSPACE,), "uint8"))
    w.plan(*(index_arg(mod, mk, a) for a in mla_tables()), MLA_H, 512, 64, MLA_PAGE, False, 1 / 192 ** 0.5,
           mk.dtype_arg(), mk.dtype_arg())
    pages = DEC_B * -(-DEC_PAGES * PAGE // MLA_PAGE)
    q_nope, q_pe = mk.arr(randn(DEC_B, MLA_H, 512)), mk.arr(randn(DEC_B, MLA_H, 64, seed=1))
    ckv, kpe = mk.arr(randn(pages, MLA_PAGE, 512, seed=2)), mk.arr(randn(pages, MLA_PAGE, 64, seed=3))
    return out_call(w.run, mk, (DEC_B, MLA_H, 512), q_nope, q_pe, ckv, kpe)


def b_mla_append(mod, mk):
    pages = -(-APPEND_PAGES * PAGE // MLA_PAGE)
    ckv, kpe = mk.arr(randn(APPEND_B * pages, MLA_PAGE, 512)), mk.arr(randn(APPEND_B * pages, MLA_PAGE, 64, seed=1))
    rows_c, rows_k = mk.arr(randn(APPEND_B, 512, seed=2)), mk.arr(randn(APPEND_B, 64, seed=3))
    bi, pos = mk.arr(np.arange(APPEND_B), "int32"), mk.arr(np.full(APPEND_B, pages * MLA_PAGE - 1), "int32")
    indices = mk.arr(np.random.default_rng(5).permutation(APPEND_B * pages), "int32")
    indptr, last = mk.arr(np.arange(APPEND_B + 1) * pages, "int32"), mk.arr(np.full(APPEND_B, MLA_PAGE), "int32")
    f = op_fn(mod, "append_paged_mla_kv_cache")
    return lambda: f(rows_c, rows_k, bi, pos, ckv, kpe, indices, indptr, last)


SHARED_PAGES, UNIQUE_PAGES = 64, 4  # cascade: a 1024-token prefix shared by 16 requests, 64 own tokens each


def cascade_tables():
    """Level 0: the shared prefix, one query segment of all 16 tokens; level 1: each request's own pages."""
    qo = ([0, DEC_B], np.arange(DEC_B + 1))
    kv_indptr = ([0, SHARED_PAGES], np.arange(DEC_B + 1) * UNIQUE_PAGES)
    kv_indices = (np.arange(SHARED_PAGES), SHARED_PAGES + np.arange(DEC_B * UNIQUE_PAGES))
    last = ([PAGE], np.full(DEC_B, PAGE))
    return qo, kv_indptr, kv_indices, last


def b_cascade_run(mod, mk):
    w = getattr(mod, "MultiLevelCascadeAttentionWrapper")(2, mk.zeros((WORKSPACE,), "uint8"))
    tables = [[index_arg(mod, mk, a) for a in level] for level in cascade_tables()]
    w.plan(*tables, HQ, HKV, D, PAGE, causal=True, q_data_type=mk.dtype_arg())
    q = mk.arr(randn(DEC_B, HQ, D))
    cache = mk.arr(randn(SHARED_PAGES + DEC_B * UNIQUE_PAGES, 2, PAGE, HKV, D, seed=1))
    return lambda: w.run(q, cache)  # FlashInfer's cascade run() takes no out=: the same call for all


def shared_inputs(mk):
    q = mk.arr(randn(DEC_B, HQ, D))
    ks, vs = (mk.arr(randn(SHARED_PAGES * PAGE, HKV, D, seed=s)) for s in (1, 2))
    cache = mk.arr(randn(DEC_B * UNIQUE_PAGES, 2, PAGE, HKV, D, seed=3))
    return q, ks, vs, cache


def unique_tables(mod, mk):
    return [index_arg(mod, mk, a) for a in decode_table(DEC_B, UNIQUE_PAGES)]


def b_shared_decode(mod, mk):
    w = wrapper(mod, mk, "BatchDecodeWithSharedPrefixPagedKVCacheWrapper")
    w.begin_forward(*unique_tables(mod, mk), HQ, HKV, D, PAGE, data_type=mk.dtype_arg())
    q, ks, vs, cache = shared_inputs(mk)
    return lambda: w.forward(q, ks, vs, cache)


def b_shared_prefill(mod, mk):
    w = wrapper(mod, mk, "BatchPrefillWithSharedPrefixPagedKVCacheWrapper")
    w.begin_forward(index_arg(mod, mk, np.arange(DEC_B + 1)), *unique_tables(mod, mk), HQ, HKV, D, PAGE)
    q, ks, vs, cache = shared_inputs(mk)
    return lambda: w.forward(q, ks, vs, cache, causal=True)


def attention_cases():
    heads = f"{HQ}/{HKV} heads d{D} bf16"
    yield Case("attention", "single_decode_with_kv_cache", f"kv {SINGLE_KV}, {heads}", b_single_decode,
               kind="attention", torch=t_sdpa(1, SINGLE_KV, False))
    yield Case("attention", "single_prefill_with_kv_cache", f"{PREFILL_L}x{PREFILL_L} causal, {heads}",
               b_single_prefill, kind="attention", torch=t_sdpa(PREFILL_L, PREFILL_L, True))
    yield Case("attention", "BatchDecodeWithPagedKVCacheWrapper.run",
               f"{DEC_B}x{DEC_PAGES * PAGE} p{PAGE}, {heads}, planned, out=", b_decode_run, kind="run")
    yield Case("attention", "BatchPrefillWithPagedKVCacheWrapper.run",
               f"{PF_B}x({PF_QO} new onto {PF_PAGES * PAGE}) p{PAGE} causal, {heads}, out=", b_paged_prefill_run,
               kind="run")
    yield Case("attention", "BatchPrefillWithRaggedKVCacheWrapper.run",
               f"{PF_B}x({PF_QO} new onto {PF_PAGES * PAGE}) causal, {heads}, out=", b_ragged_prefill_run, kind="run")
    cascade = f"{DEC_B} requests x ({SHARED_PAGES * PAGE} shared + {UNIQUE_PAGES * PAGE} own) p{PAGE}, {heads}"
    yield Case("attention", "MultiLevelCascadeAttentionWrapper.run", "2 levels, " + cascade,
               b_cascade_run, kind="run")
    yield Case("attention", "BatchDecodeWithSharedPrefixPagedKVCacheWrapper.forward", cascade, b_shared_decode,
               kind="run")
    yield Case("attention", "BatchPrefillWithSharedPrefixPagedKVCacheWrapper.forward", cascade + ", causal",
               b_shared_prefill, kind="run")
    yield Case("attention", "BatchMLAPagedAttentionWrapper.run",
               f"{DEC_B}x{DEC_PAGES * PAGE} p{MLA_PAGE}, {MLA_H} heads, ckv 512 + kpe 64 bf16, planned, out=", b_mla_run,
               kind="run", callers=("torch", "cupy"))
    yield Case("page", "append_paged_mla_kv_cache", f"{APPEND_B} requests x 1 token, ckv 512 + kpe 64 bf16",
               b_mla_append, callers=("torch", "cupy"))


# ---------------------------------------------------------------------------------------------------------
# plan()


PLAN_QO = 16  # paged prefill plan(): 16 new tokens a request (kv 1024 includes them)


def b_decode_plan(batch, fast=False):
    def build(mod, mk):
        w = wrapper(mod, mk, "BatchDecodeWithPagedKVCacheWrapper")
        args = [index_arg(mod, mk, a) for a in decode_table(batch)]
        dtype = mk.dtype_arg()
        if fast:
            f = op_fn(mod, "fast_decode_plan")
            w.plan(*args, HQ, HKV, D, PAGE, q_data_type=dtype)  # fast_decode_plan re-plans a planned wrapper
            return lambda: f(w, *args, HQ, HKV, D, PAGE, q_data_type=dtype)
        return lambda: w.plan(*args, HQ, HKV, D, PAGE, q_data_type=dtype)
    return build


def b_prefill_plan(batch):
    def build(mod, mk):
        w = wrapper(mod, mk, "BatchPrefillWithPagedKVCacheWrapper")
        args = [index_arg(mod, mk, a) for a in prefill_tables(batch, PLAN_QO, DEC_PAGES)]
        dtype = mk.dtype_arg()
        return lambda: w.plan(*args, HQ, HKV, D, PAGE, causal=True, q_data_type=dtype)
    return build


STEP_LAYERS, STEP_PAGES = 32, 4  # an eager decode step: one plan(), then a run() per layer of 32; short KV


def b_decode_step(mod, mk):
    """One eager decode step of a 32-layer model: plan() (the same batch, as an engine re-plans each step
    while the lengths grow), then run() for each layer: the first run() after a plan() is what the
    planned run() rows do not show. KV short (64 tokens a request) so the GPU stays under the host."""
    w = wrapper(mod, mk, "BatchDecodeWithPagedKVCacheWrapper")
    args = [index_arg(mod, mk, a) for a in decode_table(DEC_B, STEP_PAGES)]
    dtype = mk.dtype_arg()
    w.plan(*args, HQ, HKV, D, PAGE, q_data_type=dtype)
    q, cache = mk.arr(randn(DEC_B, HQ, D)), mk.arr(randn(DEC_B * STEP_PAGES, 2, PAGE, HKV, D, seed=1))
    run = out_call(w.run, mk, (DEC_B, HQ, D), q, cache)

    def step():
        w.plan(*args, HQ, HKV, D, PAGE, q_data_type=dtype)
        for _ in range(STEP_LAYERS):
            run()
    return step


def plan_cases():
    yield Case("plan", "decode step: plan() + 32 x run()",
               f"batch {DEC_B} x {STEP_PAGES * PAGE} p{PAGE}, {HQ}/{HKV} d{D}, out=", b_decode_step, kind="step")
    for b in PLAN_BATCHES:
        s = f"batch {b} x {DEC_PAGES * PAGE} p{PAGE}, {HQ}/{HKV} d{D}, numpy indices"
        yield Case("plan", "BatchDecodeWithPagedKVCacheWrapper.plan", s, b_decode_plan(b), kind="plan", batch=b)
        yield Case("plan", "fast_decode_plan", s, b_decode_plan(b, fast=True), kind="plan", batch=b,
                   flashinfer=False)
        yield Case("plan", "BatchPrefillWithPagedKVCacheWrapper.plan", s + f", {PLAN_QO} new tokens, causal",
                   b_prefill_plan(b), kind="plan", batch=b)


# ---------------------------------------------------------------------------------------------------------
# Case list, cells, table


def cases(cupy_half: str = "bfloat16") -> list:
    out = []
    for gen in (norm_cases, activation_cases, rope_cases, page_cases, merge_cases, quantization_cases,
                sampling_cases, attention_cases, plan_cases):
        for c in gen():
            if c.half and cupy_half != "bfloat16" and "cupy" in c.callers:
                c = replace(c, shape=c.shape + " [cupy: fp16]")
            out.append(c)
    return out


def select(all_cases, only: str) -> list:
    keys = [k for k in only.split(",") if k]
    return [c for c in all_cases if not keys or any(c.op == k or c.group == k or c.op.startswith(k) for k in keys)]


def declared(case: Case) -> list:
    """The columns a case has a call for (whether or not the framework is importable here)."""
    cols = [f"fi_cupy/{c}" for c in CALLERS if c in case.callers]
    return cols + (["flashinfer"] if case.flashinfer else []) + (["torch"] if case.torch else [])


@dataclass
class Env:
    """What this run can call: makers per caller (None: absent), the FlashInfer module, torch."""
    makers: dict = field(default_factory=dict)
    flashinfer: object = None
    torch: object = None
    absent: dict = field(default_factory=dict)  # name -> why


def cell(case: Case, env: Env, col: str):
    """(status, thunk): status 'n/a' (the op does not take it), 'absent' (not importable here) or 'ready';
    thunk() builds the inputs and returns the call to time."""
    if col not in declared(case):
        return "n/a", None
    if col.startswith("fi_cupy/"):
        mk = env.makers.get(col.split("/")[1])
        return ("ready", lambda: case.build(fi_cupy, mk)) if mk else ("absent", None)
    mk = env.makers.get("torch")
    if col == "flashinfer":
        return ("ready", lambda: case.build(env.flashinfer, mk)) if (env.flashinfer and mk) else ("absent", None)
    return ("ready", lambda: case.torch(env.torch, mk)) if (env.torch and mk) else ("absent", None)


def issue_text(issue) -> str:
    if not issue:
        return ""
    names = {"fi_cupy": "fi_cupy then", "flashinfer": "FI", "torch": "torch"}
    return ", ".join(f"{names[k]} {v:g}" for k, v in issue.items())


def verdict(kind: str, batch, us: dict, issue) -> str:
    """Issue 21's targets for this row: 'ok', 'MISS: ...', or '' where none applies or nothing to compare.
    FlashInfer from the same run, else issue 21's figure (marked)."""
    fi, ref = us.get("flashinfer"), "FI"
    if fi is None and issue and issue.get("flashinfer"):
        fi, ref = issue["flashinfer"], "FI(issue)"
    t, c = us.get("fi_cupy/torch"), us.get("fi_cupy/cupy")
    checks = []
    if kind in ("elementwise", "run") and fi is not None and t is not None:
        checks.append((t <= fi, f"torch {t:.1f} > {ref} {fi:.1f}"))
    if kind == "elementwise" and c is not None:
        checks.append((c <= CUPY_TARGET_US, f"cupy {c:.1f} > {CUPY_TARGET_US:g}"))
    if kind == "plan" and batch in (16, 512) and fi is not None and t is not None:
        checks.append((t <= fi / 2, f"torch {t:.0f} > {ref}/2 {fi / 2:.0f}"))
    if not checks:
        return ""
    misses = [why for ok, why in checks if not ok]
    return "MISS: " + "; ".join(misses) if misses else "ok"


def cell_text(rec: dict, col: str) -> str:
    us = rec["us"].get(col)
    if us is not None:
        return f"{us:.1f}"
    st = rec["status"].get(col, "n/a")
    return {"n/a": "n/a", "absent": "-"}.get(st, "err")


def table_rows(records: list) -> tuple:
    """(HEADER, rows) for print_table: one row per record, the COLUMNS in order, issue 21 and the verdict."""
    rows = [[r["op"], r["shape"]] + [cell_text(r, c) for c in COLUMNS] +
            [issue_text(r.get("issue")), verdict(r["kind"], r.get("batch"), r["us"], r.get("issue"))]
            for r in records]
    return HEADER, rows


def record(case: Case) -> dict:
    return {"group": case.group, "op": case.op, "shape": case.shape, "kind": case.kind, "batch": case.batch,
            "issue": case.issue, "us": {}, "status": {}}


# ---------------------------------------------------------------------------------------------------------
# Running


def device_sync():
    import cupy
    cupy.cuda.runtime.deviceSynchronize()  # device-wide: torch's, CuPy's and JAX's streams alike


def synced_times(fn, n: int, sync) -> list:
    """Wall times (s) of n single fn() calls, each between two syncs (plan(): its uploads count)."""
    times = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def synced_us(fn, n: int, warmup: int, sync) -> float:
    """Median of synced_times after `warmup` calls, microseconds."""
    for _ in range(warmup):
        fn()
    return statistics.median(synced_times(fn, n, sync)) * 1e6


def time_case(case: Case, fn, args) -> float:
    if case.kind in ("plan", "step"):
        return synced_us(fn, args.plan_calls, 3, device_sync)
    return per_call_us(fn, args.calls, args.warmup, sync=device_sync)


def run_case(case: Case, env: Env, args) -> dict:
    rec = record(case)
    for col in COLUMNS:
        status, thunk = cell(case, env, col)
        if thunk is None:
            rec["status"][col] = status
            continue
        try:
            rec["us"][col] = time_case(case, thunk(), args)
            rec["status"][col] = "ok"
        except Exception as e:  # noqa: BLE001 - one failing cell must not stop the run
            rec["status"][col] = f"error: {type(e).__name__}: {str(e)[:300]}"
            print(f"  {case.op} [{case.shape}] {col}: {type(e).__name__}: {e}", flush=True)
            try:
                device_sync()
            except Exception:  # noqa: BLE001 - a sticky CUDA error: later cells report their own
                pass
    return rec


def open_env(callers, peers) -> Env:
    env = Env()
    env.torch = torch_or_none()
    for name in CALLERS:
        if name not in callers:
            env.absent[name] = "not asked for (--callers)"
            continue
        try:
            env.makers[name] = open_maker(name, env.torch)
        except Exception as e:  # noqa: BLE001 - absent, or present without a GPU
            env.absent[name] = f"{type(e).__name__}: {e}"
    if "torch" not in peers:
        env.torch = None
    if "flashinfer" in peers and "torch" in env.makers:
        try:
            import flashinfer
            env.flashinfer = flashinfer
        except Exception as e:  # noqa: BLE001 - absent or broken install
            env.absent["flashinfer"] = f"{type(e).__name__}: {e}"
    return env


def open_maker(name: str, torch) -> Maker:
    if name == "torch":
        if torch is None:
            raise RuntimeError("torch with CUDA is not importable")
        return Maker("torch")
    if name == "cupy":
        return Maker("cupy", cupy_half())
    import jax
    if jax.default_backend() not in ("gpu", "cuda"):
        raise RuntimeError(f"JAX has no GPU backend (default: {jax.default_backend()})")
    return Maker("jax")


def cupy_half() -> str:
    """bfloat16 where CuPy can hold it (through ml_dtypes), else float16."""
    try:
        import cupy
        import ml_dtypes
        cupy.zeros(1, np.float32).astype(ml_dtypes.bfloat16)  # as Maker.arr makes them
        return "bfloat16"
    except Exception:  # noqa: BLE001 - no ml_dtypes, or a CuPy without bfloat16
        return "float16"


def versions() -> dict:
    from importlib import metadata
    dists = {"fi_cupy": ("fi_cupy", "fi-cupy"), "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
             "torch": ("torch",), "jax": ("jax",), "jaxlib": ("jaxlib",),
             "flashinfer": ("flashinfer-python", "flashinfer"), "ml_dtypes": ("ml_dtypes",)}
    out = {}
    for name, candidates in dists.items():
        for d in candidates:
            try:
                out[name] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            out[name] = None
    out["fi_cupy"] = out["fi_cupy"] or fi_cupy.__version__
    out["python"] = platform.python_version()
    return out


def host_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header_info(device: str) -> dict:
    return {"device": device, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host_cpu": host_cpu(), "versions": versions()}


def write_json(path, doc) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
    else:
        save_json("bench_host.json", doc)  # $OUT or $FI_CUPY_BENCH_DIR, as the other benchmarks


def print_tables(records: list, title: str) -> None:
    for group in dict.fromkeys(r["group"] for r in records):
        header, rows = table_rows([r for r in records if r["group"] == group])
        print_table(f"{group}: {title}", header, rows)


def print_info(info: dict) -> None:
    v = info["versions"]
    print(f"device: {info['device']}; host CPU: {info['host_cpu']}; {info['date']}")
    print("versions: " + ", ".join(f"{k} {v[k] or '-'}" for k in v))


def dry(args) -> None:
    """The case list and what is importable, with no GPU touched (find_spec imports nothing)."""
    half = "bfloat16" if importlib.util.find_spec("ml_dtypes") else "float16"
    cs = select(cases(half), args.only)
    if not cs:
        sys.exit(f"no case matches --only {args.only!r}")
    info = header_info("(dry run: no device)")
    info["importable"] = {m: importlib.util.find_spec(m) is not None for m in ("torch", "jax", "flashinfer",
                                                                               "ml_dtypes")}
    print_info(info)
    print("importable: " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in info["importable"].items()))
    print_table(f"{len(cs)} cases (dry: nothing built or timed)", ["group", "op", "shape", "kind", "columns"],
                [[c.group, c.op, c.shape, c.kind, " ".join(declared(c))] for c in cs])
    print("not timed: " + "; ".join(f"{k} ({v})" for k, v in NOT_TIMED.items()))
    write_json(args.json, {**info, "dry": True, "columns": list(COLUMNS), "plan_batches": list(PLAN_BATCHES),
                           "not_timed": NOT_TIMED,
                           "cases": [{"group": c.group, "op": c.op, "shape": c.shape, "kind": c.kind,
                                      "batch": c.batch, "issue": c.issue, "columns": declared(c)} for c in cs]})


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 calls a cell (2000 otherwise), 10 plan() calls")
    ap.add_argument("--dry", action="store_true", help="list the cases; build and time nothing, no GPU needed")
    ap.add_argument("--json", default="", metavar="PATH", help="write the results here (rewritten after each row); "
                    "default: bench_host.json in $OUT or $FI_CUPY_BENCH_DIR when set")
    ap.add_argument("--only", default="", help="comma-separated ops, op prefixes or groups (norm, activation, "
                    "rope, page, merge, quantization, sampling, attention, plan)")
    ap.add_argument("--callers", default=",".join(CALLERS), help="fi_cupy callers to time")
    ap.add_argument("--peers", default="flashinfer,torch", help="peers to time ('' for none)")
    ap.add_argument("--calls", type=int, default=None, help="calls a cell (overrides --quick)")
    args = ap.parse_args(argv)
    args.calls = args.calls or (200 if args.quick else 2000)
    args.warmup = 10 if args.quick else 20
    args.plan_calls = 10 if args.quick else 100
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.dry:
        return dry(args)
    import cupy
    try:
        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception as e:  # noqa: BLE001 - CuPy raises various errors without a driver
        sys.exit(f"bench_host needs a CUDA GPU ({type(e).__name__}: {e}); --dry lists the cases without one")
    env = open_env(args.callers.split(","), args.peers.split(","))
    half = env.makers["cupy"].half if "cupy" in env.makers else "bfloat16"
    cs = select(cases(half), args.only)
    if not cs:
        sys.exit(f"no case matches --only {args.only!r}")
    info = header_info(device)
    doc = {**info, "calls": args.calls, "plan_calls": args.plan_calls, "columns": list(COLUMNS),
           "absent": env.absent, "rows": []}
    print_info(info)
    for name, why in env.absent.items():
        print(f"absent: {name}: {why}")
    for case in cs:
        rec = run_case(case, env, args)
        doc["rows"].append(rec)
        print(f"{case.op} [{case.shape}]: " + " | ".join(f"{c} {cell_text(rec, c)}" for c in COLUMNS), flush=True)
        write_json(args.json, doc)  # after every row: a run cut short keeps what it measured
    title = (f"us per call on {device}; mean of {args.calls} back-to-back calls (plan(): median of "
             f"{args.plan_calls}, each between syncs); n/a: not taken, -: not importable, err: failed")
    print_tables(doc["rows"], title)
    print("\nissue 21 (H200): figures from the issue's own run, torch tensors in, 2000 calls. Targets: element-wise "
          f"ops and planned run() at most FlashInfer's time from torch, element-wise ops at most "
          f"{CUPY_TARGET_US:g} us from CuPy; plan() at most half of FlashInfer's at batch 16 and 512.")


if __name__ == "__main__":
    main()
