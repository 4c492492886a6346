"""One small call of every fi_cupy kernel and path, for compute-sanitizer (bench/sanitize.sh runs it
under memcheck, racecheck, synccheck and initcheck).

    python bench/sanitize_cases.py                       # every case, one process
    python bench/sanitize_cases.py 'decode_*' softmax_ring --exclude 'decode_*fp8*'
    python bench/sanitize_cases.py --list [patterns]     # names and what each covers (no GPU needed)

Each case draws fresh random inputs (numpy, copied to the device), poisons its outputs (0xFF bytes: NaN
in every float dtype), makes its call, synchronises, checks that the outputs were written and prints
`case <name>: ok`. At the end: every kernel instantiation launched (recorded by a wrapper around
fi_cupy._core.kernels.launch), the __global__ templates of cuda_src/*.cu that no case launched, and
one `sanitize_cases:` summary line. Exit status 1 when a case failed. Sizes are small: a sanitizer
slows kernels down 10-100x.

So that memcheck sees an access past the end of an array rather than one landing in a pooled
neighbour: CuPy's memory pool is off (each array its own cudaMalloc), PYTORCH_NO_CUDA_MEMORY_CACHING=1
is set before torch loads, plan/run wrappers get a workspace of exactly the bytes their plan needs
(plan() puts its metadata at the end of it) and paged caches have no spare pages. fi_cupy's own
scratch for single decode / prefill (_core/workspace.py single_call_meta: at least 1 MB) stays
oversized.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # read when torch initialises CUDA
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fi_cupy._core import kernels as _kernels  # noqa: E402  (touches no device)

# ---------------------------------------------------------------------------------------------
# Which kernels ran: every launch goes through kernels.launch (family modules call it by attribute).

LAUNCHES: Counter = Counter()           # mangled kernel name -> launches
CASE_KERNELS: dict = defaultdict(set)   # case -> mangled names
_current = [""]
_launch = _kernels.launch


def _recording_launch(fn, *args, **kwargs):
    LAUNCHES[fn.name] += 1
    CASE_KERNELS[_current[0]].add(fn.name)
    return _launch(fn, *args, **kwargs)


_kernels.launch = _recording_launch

_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?([A-Za-z_]\w*)\s*\(")


def kernel_templates() -> dict:
    """__global__ name -> its file in cuda_src/ (one kernel family a file)."""
    out = {}
    for f in sorted((REPO / "cuda_src").glob("*.cu")):
        for m in _GLOBAL.finditer(f.read_text()):
            out[m.group(1)] = f.name
    return out


def template_of(mangled: str, templates) -> str | None:
    """The template a mangled name instantiates: Itanium mangling spells an identifier as its length
    then its characters, so '19merge_states_kernel' never matches inside another name."""
    hits = [t for t in templates if f"{len(t)}{t}" in mangled]
    return max(hits, key=len) if hits else None


def demangle(names) -> dict:
    """mangled -> readable (c++filt where installed, else the mangled name)."""
    names = list(names)
    tool = shutil.which("c++filt")
    if tool and names:
        try:
            got = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30).stdout
            lines = got.splitlines()
            if len(lines) == len(names):
                return dict(zip(names, lines))
        except (OSError, subprocess.SubprocessError):
            pass
    return {n: n for n in names}


# ---------------------------------------------------------------------------------------------
# Case registry


class Skip(Exception):
    """A case that this machine cannot run (no torch, not sm_90a, no clusters)."""


CASES: dict = {}  # name -> (function, description, needs, heavy)


def case(name: str, doc: str, needs: tuple = (), heavy: bool = False):
    """Register a case. heavy: slow under a sanitizer, so it runs after the others (a run that hits
    its time limit has checked everything else first)."""
    def register(fn):
        assert name not in CASES, name
        CASES[name] = (fn, doc, needs, heavy)
        return fn
    return register


def _check_needs(needs) -> None:
    for need in needs:
        if need == "torch":
            try:
                import torch
            except ImportError:
                raise Skip("torch is not installed") from None
            if not torch.cuda.is_available():
                raise Skip("torch has no CUDA")
        elif need == "sm90a" and _kernels.device_arch(0) != "sm_90a":
            raise Skip(f"needs an sm_90a GPU (this one: {_kernels.device_arch(0)})")
        elif need == "clusters" and not _kernels.clusters_supported(0):
            raise Skip("needs thread-block clusters (sm_90+)")


# ---------------------------------------------------------------------------------------------
# Arrays: CuPy by default, torch where fp8 / bf16 is needed. Inputs come from numpy (no device RNG).


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _ptr_bytes(x) -> tuple:
    if _is_torch(x):
        return x.data_ptr(), x.numel() * x.element_size()
    return x.data.ptr, x.nbytes


def poison(*xs):
    """Fill with 0xFF bytes: NaN in fp32 / fp16 / bf16 / fp8, -1 in integers (a cudaMemset, which
    initcheck counts as initialised)."""
    from cupy.cuda import runtime
    for x in xs:
        p, n = _ptr_bytes(x)
        if n:
            runtime.memset(p, 0xFF, n)
    return xs[0] if len(xs) == 1 else xs


def sync() -> None:
    from cupy.cuda import runtime
    runtime.deviceSynchronize()


def host(x) -> np.ndarray:
    if _is_torch(x):
        import torch
        x = x.detach()
        if x.dtype not in (torch.float16, torch.float32, torch.int32, torch.int64, torch.bool, torch.uint8):
            x = x.float()
        return x.cpu().numpy()
    import cupy
    return cupy.asnumpy(x)


def written(**arrays) -> None:
    """No NaN left: every poisoned element was written."""
    for name, x in arrays.items():
        h = host(x)
        if np.issubdtype(h.dtype, np.floating) and np.isnan(h).any():
            raise AssertionError(f"{name}: {int(np.isnan(h).sum())} of {h.size} elements unwritten or NaN")


def in_range(name: str, x, lo: int, hi: int) -> None:
    h = host(x)
    if h.size and (h.min() < lo or h.max() >= hi):
        raise AssertionError(f"{name}: values {h.min()}..{h.max()} outside [{lo}, {hi})")


class CupyArrays:
    def randn(self, rng, shape, dtype="float16", scale=1.0):
        import cupy
        return cupy.asarray((rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype))

    def asarray(self, a):
        import cupy
        return cupy.asarray(a)

    def nan(self, shape, dtype="float16"):
        import cupy
        return poison(cupy.empty(shape, dtype=dtype))

    def nan_like(self, x):
        return self.nan(x.shape, x.dtype)

    def workspace(self, nbytes: int):
        import cupy
        return cupy.empty(int(nbytes), dtype=cupy.uint8)


class TorchArrays:
    def randn(self, rng, shape, dtype="float16", scale=1.0):
        import torch
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * scale).cuda()
        return x.to(getattr(torch, dtype))

    def asarray(self, a):
        import torch
        return torch.from_numpy(np.ascontiguousarray(a)).cuda()

    def nan(self, shape, dtype="float16"):
        import torch
        return poison(torch.empty(shape, dtype=getattr(torch, str(dtype)), device="cuda"))

    def nan_like(self, x):
        import torch
        return poison(torch.empty_like(x))

    def workspace(self, nbytes: int):
        import torch
        return torch.empty(int(nbytes), dtype=torch.uint8, device="cuda")


CP, TH = CupyArrays(), TorchArrays()


def tight(make, plans, X=CP):
    """A plan/run wrapper on a workspace of exactly the bytes its plans need (the largest; the first
    plan is left in place). make(workspace) builds it, each plans[i](wrapper) plans it."""
    w = make(X.workspace(256 << 20))
    need = 0
    for plan in plans:
        plan(w)
        need = max(need, w._plan.partial_bytes() + w._plan.meta.nbytes)
    w.reset_workspace_buffer(X.workspace(need))
    plans[0](w)
    return w


def page_table(rng, kv_lens, page_size: int, num_pages: int | None = None) -> tuple:
    """(indptr, indices, last_page_len, num_pages) int32 for kv_lens: a shuffled page table that uses
    every page of the cache (no spare page past the last one used) unless num_pages says more."""
    npages = [-(-n // page_size) for n in kv_lens]
    total = max(sum(npages), 1) if num_pages is None else num_pages
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    indices = rng.permutation(total)[: indptr[-1]].astype(np.int32)
    last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, npages)], np.int32)
    return indptr, indices, last, total


def cache_shape(num_pages, page_size, hkv, d, layout) -> tuple:
    return (num_pages, 2, page_size, hkv, d) if layout == "NHD" else (num_pages, 2, hkv, page_size, d)


def make_cache(X, rng, num_pages, page_size, hkv, d, layout, dtype, pair=False):
    """A 5-D paged cache, or (pair=True) separate k and v caches: two allocations, so a read past
    the end of k is not a read of v."""
    shape = cache_shape(num_pages, page_size, hkv, d, layout)
    if not pair:
        return X.randn(rng, shape, dtype)
    one = shape[:1] + shape[2:]
    return X.randn(rng, one, dtype), X.randn(rng, one, dtype)


def capture_and_replay(run, replan, outputs) -> None:
    """run() eagerly and once under CUDA-graph capture on a side stream, re-plan, poison the outputs
    and replay the graph: the replay must read the new plan from the workspace."""
    import cupy
    s = cupy.cuda.Stream(non_blocking=True)  # does not wait for the legacy stream: sync around it
    sync()
    with s:
        run()
        s.begin_capture()
        try:
            run()
        finally:
            graph = s.end_capture()
        replan()
    sync()
    poison(*outputs)
    sync()
    graph.launch(s)
    s.synchronize()


# ---------------------------------------------------------------------------------------------
# Decode: batch_decode_tc_kernel (16-bit KV of the q dtype), batch_decode_kernel (fp8 KV, RoPE),
# merge_states_kernel (pairs cut over several CTAs). Group size 1 / <= 4 / more picks GB 1 / 4 / 8.


def decode_batch(rng, kv_lens, page_size, hq, hkv, d, *, X=CP, layout="NHD", pair=False, q_dtype="float16",
                 kv_dtype=None, device_indices=False, merges=False, run_kw=None, **plan_kw):
    import fi_cupy
    kv_dtype = kv_dtype or q_dtype
    indptr, indices, last, pages = page_table(rng, kv_lens, page_size)
    cache = make_cache(X, rng, pages, page_size, hkv, d, layout, kv_dtype, pair)
    q = X.randn(rng, (len(kv_lens), hq, d), q_dtype)
    table = [X.asarray(a) for a in (indptr, indices, last)] if device_indices else [indptr, indices, last]
    w = tight(lambda ws: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(ws, layout), [
        lambda w: w.plan(*table, hq, hkv, d, page_size, q_data_type=q_dtype, kv_data_type=kv_dtype, **plan_kw)], X)
    if merges and not w._plan.num_merges:
        raise AssertionError(f"the plan cut no request over several CTAs (num_ctas {w._plan.num_ctas}): "
                             "merge_states_kernel would not run")
    out, lse = X.nan_like(q), X.nan((len(kv_lens), hq), "float32")
    w.run(q, cache, out=out, lse=lse, return_lse=True, **(run_kw or {}))
    sync()
    written(out=out, lse=lse)


@case("decode_tc_group1", "tensor-core decode, group size 1 (GB 1), window_left, page 16, an empty request")
def _():
    decode_batch(_rng(), [1, 37, 0, 300, 16], 16, 2, 2, 128, window_left=100)


@case("decode_tc_group4_hnd_pair", "tensor-core decode, group 4 (GB 4), HND (k, v) pair, page 7, soft cap, sm_scale")
def _():
    decode_batch(_rng(), [5, 130, 1, 77], 7, 8, 2, 64, layout="HND", pair=True, logits_soft_cap=30.0, sm_scale=0.2)


@case("decode_tc_group8_split", "tensor-core decode, group 8 (GB 8), one 4000-token request cut over CTAs + merge")
def _():
    decode_batch(_rng(), [4000], 16, 8, 1, 128, merges=True)


@case("decode_tc_fp8_group1", "tensor-core decode, fp8 e4m3 KV converted in shared memory, 4/4 heads (issue 19's "
      "crash, then on CUDA cores), int32 device index arrays, k/v scales", needs=("torch",))
def _():
    decode_batch(_rng(), [97] * 12, 16, 4, 4, 128, X=TH, kv_dtype="float8_e4m3fn", device_indices=True,
                 run_kw={"k_scale": 0.5, "v_scale": 2.0})


@case("decode_cuda_core_fp8_rope_group1", "CUDA-core decode, fp8 e4m3 KV with RoPE on the fly, 4/4 heads, int32 "
      "device index arrays, k/v scales", needs=("torch",))
def _():
    decode_batch(_rng(), [97] * 12, 16, 4, 4, 128, X=TH, kv_dtype="float8_e4m3fn", device_indices=True,
                 pos_encoding_mode="ROPE_LLAMA", run_kw={"k_scale": 0.5, "v_scale": 2.0})


@case("decode_cuda_core_rope_group1", "CUDA-core decode, RoPE on the fly, 4/4 heads, head_dim 256, page 1")
def _():
    decode_batch(_rng(), [5, 97, 1], 1, 4, 4, 256, pos_encoding_mode="ROPE_LLAMA")


@case("decode_cuda_core_rope_group4", "CUDA-core decode, RoPE (rope_scale, rope_theta), group 4, HND, page 8")
def _():
    decode_batch(_rng(), [9, 200, 0], 8, 8, 2, 128, layout="HND", pos_encoding_mode="ROPE_LLAMA", rope_scale=2.0,
                 rope_theta=5e5)


@case("decode_tc_fp8_group8_split", "tensor-core decode, bf16 q, fp8 e5m2 KV, group 8, a 4000-token request "
      "cut over CTAs + merge", needs=("torch",))
def _():
    decode_batch(_rng(), [4000], 16, 16, 2, 128, X=TH, q_dtype="bfloat16", kv_dtype="float8_e5m2", merges=True,
                 run_kw={"k_scale": 0.7, "v_scale": 1.3})


@case("decode_cuda_graph", "use_cuda_graph=True decode wrapper (merge grid of every cut pair a plan can have): "
      "eager run, capture, re-plan other lengths, replay")
def _():
    import fi_cupy
    rng = _rng()
    hq, hkv, d, ps = 8, 2, 128, 16
    lens_a, lens_b = [50, 1000, 3], [700, 0, 64]
    ip_a, ix_a, last_a, pages = page_table(rng, lens_a, ps)
    ip_b, ix_b, last_b, _ = page_table(rng, lens_b, ps, num_pages=pages)
    cache = make_cache(CP, rng, pages, ps, hkv, d, "NHD", "float16")
    q = CP.randn(rng, (3, hq, d))
    out, lse = CP.nan_like(q), CP.nan((3, hq), "float32")

    def plan(ip, ix, last):
        return lambda w: w.plan(ip, ix, last, hq, hkv, d, ps, q_data_type="float16")
    w = tight(lambda ws: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=True),
              [plan(ip_a, ix_a, last_a), plan(ip_b, ix_b, last_b)])
    capture_and_replay(lambda: w.run(q, cache, out=out, lse=lse, return_lse=True),
                       lambda: plan(ip_b, ix_b, last_b)(w), (out, lse))
    written(out=out, lse=lse)


@case("single_decode_tc", "single_decode_with_kv_cache, tensor cores, NHD, out and lse given")
def _():
    import fi_cupy
    rng = _rng()
    q, k, v = CP.randn(rng, (8, 128)), CP.randn(rng, (300, 2, 128)), CP.randn(rng, (300, 2, 128))
    out, lse = CP.nan_like(q), CP.nan((8,), "float32")
    fi_cupy.single_decode_with_kv_cache(q, k, v, out=out, lse=lse, return_lse=True)
    sync()
    written(out=out, lse=lse)


@case("single_decode_fp8_group1", "single_decode_with_kv_cache, tensor cores, fp8 e4m3 HND, 4/4 heads",
      needs=("torch",))
def _():
    import fi_cupy
    rng = _rng()
    q = TH.randn(rng, (4, 128))
    k, v = (TH.randn(rng, (4, 97, 128), "float8_e4m3fn") for _ in range(2))
    out, lse = fi_cupy.single_decode_with_kv_cache(q, k, v, kv_layout="HND", k_scale=0.5, return_lse=True)
    sync()
    written(out=out, lse=lse)


# ---------------------------------------------------------------------------------------------
# Prefill: prefill_kernel (backend "fa2", any variant), prefill_sm90_kernel ("fa3": sm_90a, head_dim
# 64 / 128, KV in the q dtype, no RoPE), prefill_merge_kernel (KV ranges cut over CTAs).


def _mask(rng, qo_lens, kv_lens):
    """A random boolean custom mask, each request's (qo_len, kv_len) flattened and concatenated, with
    the first row of every request hidden (a row that sees no key)."""
    parts = []
    for qo, kv in zip(qo_lens, kv_lens):
        m = rng.random((qo, kv)) > 0.4
        if qo:
            m[0] = False
        parts.append(m.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def prefill_paged(rng, qo_lens, kv_lens, page_size, hq, hkv, d, backend, *, X=CP, layout="NHD", pair=False,
                  kv_dtype=None, mask=False, run_kw=None, **plan_kw):
    import fi_cupy
    kv_dtype = kv_dtype or "float16"
    qo_ip = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    indptr, indices, last, pages = page_table(rng, kv_lens, page_size)
    cache = make_cache(X, rng, pages, page_size, hkv, d, layout, kv_dtype, pair)
    q = X.randn(rng, (int(qo_ip[-1]), hq, d))
    if mask:
        plan_kw["custom_mask"] = X.asarray(_mask(rng, qo_lens, kv_lens))
    w = tight(lambda ws: fi_cupy.BatchPrefillWithPagedKVCacheWrapper(ws, layout, backend=backend), [
        lambda w: w.plan(qo_ip, indptr, indices, last, hq, hkv, d, page_size, q_data_type="float16",
                         kv_data_type=kv_dtype, **plan_kw)], X)
    out, lse = X.nan_like(q), X.nan(q.shape[:2], "float32")
    w.run(q, cache, out=out, lse=lse, return_lse=True, **(run_kw or {}))
    sync()
    written(out=out, lse=lse)


def prefill_ragged(rng, qo_lens, kv_lens, hq, hkv, d, backend, *, layout="NHD", mask=False, merges=False,
                   **plan_kw):
    import fi_cupy
    qo_ip = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_ip = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    n = int(kv_ip[-1])
    shape = (n, hkv, d) if layout == "NHD" else (hkv, n, d)
    q, k, v = CP.randn(rng, (int(qo_ip[-1]), hq, d)), CP.randn(rng, shape), CP.randn(rng, shape)
    if mask:
        plan_kw["custom_mask"] = CP.asarray(_mask(rng, qo_lens, kv_lens))
    w = tight(lambda ws: fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(ws, layout, backend=backend), [
        lambda w: w.plan(qo_ip, kv_ip, hq, hkv, d, q_data_type="float16", **plan_kw)])
    if merges and not w._plan.num_merges:
        raise AssertionError(f"the plan cut no KV range ({w._plan.num_items} items): prefill_merge_kernel would "
                             "not run")
    out, lse = CP.nan_like(q), CP.nan(q.shape[:2], "float32")
    w.run(q, k, v, out=out, lse=lse, return_lse=True)
    sync()
    written(out=out, lse=lse)


def prefill_graph(rng, backend) -> None:
    import fi_cupy
    hq, hkv, d, ps = 8, 2, 128, 16
    (qa, ka), (qb, kb) = ([30, 50], [60, 120]), ([10, 60], [100, 60])
    ip_a, ix_a, last_a, pages = page_table(rng, ka, ps)
    ip_b, ix_b, last_b, _ = page_table(rng, kb, ps, num_pages=pages)
    cache = make_cache(CP, rng, pages, ps, hkv, d, "NHD", "float16")
    q = CP.randn(rng, (80, hq, d))  # one buffer for both plans (rows past qo_indptr[-1] are left alone)
    out, lse = CP.nan_like(q), CP.nan(q.shape[:2], "float32")

    def plan(qo, ip, ix, last):
        qo_ip = np.concatenate([[0], np.cumsum(qo)]).astype(np.int32)
        return lambda w: w.plan(qo_ip, ip, ix, last, hq, hkv, d, ps, causal=True, q_data_type="float16")
    plan_a, plan_b = plan(qa, ip_a, ix_a, last_a), plan(qb, ip_b, ix_b, last_b)
    w = tight(lambda ws: fi_cupy.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=True,
                                                                     backend=backend), [plan_a, plan_b])
    capture_and_replay(lambda: w.run(q, cache, out=out, lse=lse, return_lse=True), lambda: plan_b(w), (out, lse))
    n = sum(qb)
    written(out=out[:n], lse=lse[:n])


@case("prefill_fa2_paged_causal", "fa2 paged, causal, group 4, d128, page 16, qo 0 / qo > kv (rows that see no key)")
def _():
    prefill_paged(_rng(), [17, 1, 0, 40, 30], [40, 33, 9, 40, 10], 16, 8, 2, 128, "fa2", causal=True)


@case("prefill_fa2_paged_rope_softcap_window", "fa2 paged, RoPE on the fly, soft cap, sliding window, causal, "
      "group 1, d256, HND (k, v) pair, page 5")
def _():
    prefill_paged(_rng(), [20, 3, 70], [70, 3, 70], 5, 4, 4, 256, "fa2", layout="HND", pair=True, causal=True,
                  pos_encoding_mode="ROPE_LLAMA", logits_soft_cap=20.0, window_left=30)


@case("prefill_fa2_paged_fp8", "fa2 paged, fp8 e4m3 KV with k/v scales, causal, d128", needs=("torch",))
def _():
    prefill_paged(_rng(), [30, 7], [70, 20], 16, 8, 2, 128, "fa2", X=TH, kv_dtype="float8_e4m3fn", causal=True,
                  run_kw={"k_scale": 0.5, "v_scale": 2.0})


@case("prefill_fa2_paged_custom_mask", "fa2 paged, boolean custom mask (packed by segment_packbits), d128")
def _():
    prefill_paged(_rng(), [30, 0, 45], [50, 10, 45], 16, 8, 2, 128, "fa2", mask=True)


@case("prefill_fa2_ragged_custom_mask", "fa2 ragged, custom mask with hidden rows, group 1, d64, an empty KV")
def _():
    prefill_ragged(_rng(), [10, 0, 25, 6], [30, 5, 25, 0], 4, 4, 64, "fa2", mask=True)


@case("prefill_fa2_ragged_split_kv", "fa2 ragged, 2 queries on 2048 keys: KV cut over CTAs + prefill_merge_kernel")
def _():
    prefill_ragged(_rng(), [2], [2048], 4, 1, 128, "fa2", causal=True, merges=True)


@case("prefill_fa2_single_causal_hnd", "fa2 single_prefill_with_kv_cache, causal, HND, d128")
def _():
    import fi_cupy
    rng = _rng()
    q, k, v = CP.randn(rng, (50, 8, 128)), CP.randn(rng, (2, 120, 128)), CP.randn(rng, (2, 120, 128))
    out, lse = CP.nan_like(q), CP.nan((50, 8), "float32")
    fi_cupy.single_prefill_with_kv_cache(q, k, v, causal=True, kv_layout="HND", out=out, lse=lse, return_lse=True,
                                         backend="fa2")
    sync()
    written(out=out, lse=lse)


@case("prefill_fa2_single_packed_mask", "fa2 single_prefill_with_kv_cache, packed_custom_mask from packbits "
      "(little), d64")
def _():
    import fi_cupy
    rng = _rng()
    q, k, v = CP.randn(rng, (33, 4, 64)), CP.randn(rng, (70, 2, 64)), CP.randn(rng, (70, 2, 64))
    packed = fi_cupy.packbits(CP.asarray(_mask(rng, [33], [70])), bitorder="little")
    o, lse = fi_cupy.single_prefill_with_kv_cache(q, k, v, packed_custom_mask=packed, return_lse=True, backend="fa2")
    sync()
    written(out=o, lse=lse)


@case("prefill_fa2_cuda_graph", "fa2 use_cuda_graph=True paged wrapper (persistent grid, merge always launched): "
      "eager run, capture, re-plan, replay")
def _():
    prefill_graph(_rng(), "fa2")


@case("prefill_fa3_paged_causal", "fa3 paged, causal, group 4, d128, page 16, qo 0 / qo > kv", needs=("sm90a",))
def _():
    prefill_paged(_rng(), [40, 1, 0, 70, 30], [40, 90, 9, 100, 10], 16, 8, 2, 128, "fa3", causal=True)


@case("prefill_fa3_paged_hnd_pair", "fa3 paged, HND (k, v) pair, page 7, window, d64", needs=("sm90a",))
def _():
    prefill_paged(_rng(), [65, 9], [130, 9], 7, 4, 1, 64, "fa3", layout="HND", pair=True, window_left=50)


@case("prefill_fa3_ragged_mask_softcap", "fa3 ragged, custom mask, soft cap, sliding window, d64",
      needs=("sm90a",))
def _():
    prefill_ragged(_rng(), [65, 3, 20], [80, 3, 0], 4, 2, 64, "fa3", mask=True, logits_soft_cap=30.0, window_left=40)


@case("prefill_fa3_ragged_split_kv", "fa3 ragged, 2 queries on 2048 keys: KV cut over CTAs + prefill_merge_kernel",
      needs=("sm90a",))
def _():
    prefill_ragged(_rng(), [2], [2048], 4, 1, 64, "fa3", causal=True, merges=True)


@case("prefill_fa3_single_causal", "fa3 single_prefill_with_kv_cache, causal, group 4, d128", needs=("sm90a",))
def _():
    import fi_cupy
    rng = _rng()
    q, k, v = CP.randn(rng, (100, 4, 128)), CP.randn(rng, (150, 1, 128)), CP.randn(rng, (150, 1, 128))
    out = CP.nan_like(q)
    fi_cupy.single_prefill_with_kv_cache(q, k, v, causal=True, out=out, backend="fa3")
    sync()
    written(out=out)


@case("prefill_fa3_cuda_graph", "fa3 use_cuda_graph=True paged wrapper: eager run, capture, re-plan, replay",
      needs=("sm90a",))
def _():
    prefill_graph(_rng(), "fa3")


# ---------------------------------------------------------------------------------------------
# Attention-state merge (cascade.cu)


def _states(rng, shape, dtype):
    v = CP.randn(rng, shape, dtype)
    s = rng.standard_normal(shape[:-1], dtype=np.float32) * 4
    s.reshape(-1)[::5] = -np.inf  # empty states weigh 0
    return v, CP.asarray(s)


@case("cascade_merge_state", "merge_state, fp16, some empty (-inf) states")
def _():
    import fi_cupy
    rng = _rng()
    (va, sa), (vb, sb) = _states(rng, (7, 4, 64), "float16"), _states(rng, (7, 4, 64), "float16")
    v, s = fi_cupy.merge_state(va, sa, vb, sb)
    sync()
    written(v=v, s=s)


@case("cascade_merge_state_in_place_mask", "merge_state_in_place with a row mask, fp32")
def _():
    import fi_cupy
    rng = _rng()
    (v, s), (vo, so) = _states(rng, (9, 3, 128), "float32"), _states(rng, (9, 3, 128), "float32")
    mask = CP.asarray(rng.random(9) > 0.5)
    fi_cupy.merge_state_in_place(v, s, vo, so, mask=mask)
    sync()
    written(v=v, s=s)


@case("cascade_merge_states", "merge_states over 3 states, fp16, d128")
def _():
    import fi_cupy
    rng = _rng()
    v, s = _states(rng, (5, 3, 2, 128), "float16")
    vm, sm = fi_cupy.merge_states(v, s)
    sync()
    written(v=vm, s=sm)


# ---------------------------------------------------------------------------------------------
# Paged KV append (page.cu): seq_lens_kernel, batch_indices_positions_kernel, append_paged_kv_kernel


def _append(index_dtype, layout, pair, dtype, d):
    import fi_cupy
    rng = _rng()
    ps, hkv = 4, 2
    kv_lens, append = [7, 2, 5], [3, 2, 0]  # lengths after the append, tokens appended
    indptr, indices, last, pages = page_table(rng, kv_lens, ps)
    cache = make_cache(CP, rng, pages, ps, hkv, d, layout, dtype, pair)
    ip, ix, lp = (CP.asarray(a.astype(index_dtype)) for a in (indptr, indices, last))
    append_ip = CP.asarray(np.concatenate([[0], np.cumsum(append)]).astype(index_dtype))
    nnz = sum(append)
    seq_lens = fi_cupy.get_seq_lens(ip, lp, ps)
    bi, pos = fi_cupy.get_batch_indices_positions(append_ip, seq_lens.astype(index_dtype), nnz)
    k, v = CP.randn(rng, (nnz, hkv, d), dtype), CP.randn(rng, (nnz, hkv, d), dtype)
    fi_cupy.append_paged_kv_cache(k, v, bi.astype(index_dtype), pos.astype(index_dtype), cache, ix, ip, lp, layout)
    sync()
    in_range("seq_lens", seq_lens, 0, max(kv_lens) + 1)
    # every appended row is in its page slot
    kh, vh, bh, ph = host(k), host(v), host(bi), host(pos)
    caches = [host(c) for c in cache] if pair else [host(cache)[:, 0], host(cache)[:, 1]]
    for i in range(nnz):
        page, slot = indices[indptr[bh[i]] + ph[i] // ps], ph[i] % ps
        for src, c in zip((kh, vh), caches):
            row = c[page, slot] if layout == "NHD" else c[page, :, slot]
            if not np.array_equal(row, src[i]):
                raise AssertionError(f"token {i} (request {bh[i]}, position {ph[i]}) not found in its page slot")


@case("page_append_nhd_int32", "get_seq_lens, get_batch_indices_positions, append_paged_kv_cache: int32 indices, "
      "fp16 NHD 5-D cache")
def _():
    _append(np.int32, "NHD", False, "float16", 64)


@case("page_append_hnd_pair_int64", "the same with int64 indices, an fp32 HND (k, v) pair, head_dim 24")
def _():
    _append(np.int64, "HND", True, "float32", 24)


# ---------------------------------------------------------------------------------------------
# Norms (norm.cu: register-held rows of 1, 2, 4, 8 vectors a thread, or the long-row loop)


@case("norm_rmsnorm", "rmsnorm fp16, hidden 4096 (1 vector a thread), out given")
def _():
    import fi_cupy
    rng = _rng()
    x, w = CP.randn(rng, (5, 4096)), CP.randn(rng, (4096,))
    out = CP.nan_like(x)
    fi_cupy.rmsnorm(x, w, out=out)
    sync()
    written(out=out)


@case("norm_fused_add_rmsnorm", "fused_add_rmsnorm fp32, hidden 1000, in place")
def _():
    import fi_cupy
    rng = _rng()
    x, r = CP.randn(rng, (3, 1000), "float32"), CP.randn(rng, (3, 1000), "float32")
    w = CP.randn(rng, (1000,), "float32")
    fi_cupy.fused_add_rmsnorm(x, r, w)
    sync()
    written(input=x, residual=r)


@case("norm_gemma_rmsnorm_strided", "gemma_rmsnorm fp16 rows with a token stride, fp32 weight, hidden 96")
def _():
    import fi_cupy
    rng = _rng()
    x = CP.randn(rng, (4, 128))[:, :96]
    w = CP.randn(rng, (96,), "float32")
    out = fi_cupy.gemma_rmsnorm(x, w)
    sync()
    written(out=out)


@case("norm_gemma_fused_add_rmsnorm", "gemma_fused_add_rmsnorm fp16, hidden 8192 (2 vectors a thread)")
def _():
    import fi_cupy
    rng = _rng()
    x, r, w = CP.randn(rng, (2, 8192)), CP.randn(rng, (2, 8192)), CP.randn(rng, (8192,))
    fi_cupy.gemma_fused_add_rmsnorm(x, r, w)
    sync()
    written(input=x, residual=r)


@case("norm_layernorm", "layernorm fp16 input, fp32 gemma and beta, hidden 3000")
def _():
    import fi_cupy
    rng = _rng()
    x = CP.randn(rng, (3, 3000))
    out = fi_cupy.layernorm(x, CP.randn(rng, (3000,), "float32"), CP.randn(rng, (3000,), "float32"))
    sync()
    written(out=out)


@case("norm_rmsnorm_long_row", "rmsnorm fp32, hidden 20000: the long-row loop (ITEMS 0)")
def _():
    import fi_cupy
    rng = _rng()
    x, w = CP.randn(rng, (2, 20000), "float32"), CP.randn(rng, (20000,), "float32")
    out = fi_cupy.rmsnorm(x, w)
    sync()
    written(out=out)


# ---------------------------------------------------------------------------------------------
# Gated activations (activation.cu)


@case("act_silu_and_mul", "silu_and_mul fp16, d 1000")
def _():
    import fi_cupy
    out = fi_cupy.silu_and_mul(CP.randn(_rng(), (4, 2000)))
    sync()
    written(out=out)


@case("act_gelu_and_mul", "gelu_and_mul fp32, d 257 (scalar accesses)")
def _():
    import fi_cupy
    out = fi_cupy.gelu_and_mul(CP.randn(_rng(), (3, 514), "float32"))
    sync()
    written(out=out)


@case("act_gelu_tanh_and_mul", "gelu_tanh_and_mul fp16, 3-D input, out given")
def _():
    import fi_cupy
    x = CP.randn(_rng(), (2, 3, 256))
    out = CP.nan((2, 3, 128))
    fi_cupy.gelu_tanh_and_mul(x, out=out)
    sync()
    written(out=out)


# ---------------------------------------------------------------------------------------------
# RoPE (rope.cu): positions from indptr/offsets or pos_ids; theta, Llama 3.1 or a cos/sin cache


def _rope_qk(rng, nnz, hq, hk, d, dtype="float16"):
    return CP.randn(rng, (nnz, hq, d), dtype), CP.randn(rng, (nnz, hk, d), dtype)


def _ragged_positions(index_dtype):
    return CP.asarray(np.array([0, 4, 10], index_dtype)), CP.asarray(np.array([3, 0], index_dtype))


@case("rope_offsets", "apply_rope (indptr/offsets, int32), rotary_dim 64 < head_dim 128, out of place")
def _():
    import fi_cupy
    q, k = _rope_qk(_rng(), 10, 4, 2, 128)
    qr, kr = fi_cupy.apply_rope(q, k, *_ragged_positions(np.int32), rotary_dim=64)
    sync()
    written(q_rope=qr, k_rope=kr)


@case("rope_offsets_inplace_interleave", "apply_rope_inplace (indptr/offsets, int64), interleave, fp32")
def _():
    import fi_cupy
    q, k = _rope_qk(_rng(), 10, 2, 1, 64, "float32")
    fi_cupy.apply_rope_inplace(q, k, *_ragged_positions(np.int64), interleave=True)
    sync()
    written(q=q, k=k)


@case("rope_pos_ids", "apply_rope_pos_ids (int32), fp16, rope_scale / rope_theta")
def _():
    import fi_cupy
    rng = _rng()
    q, k = _rope_qk(rng, 6, 3, 3, 64)
    qr, kr = fi_cupy.apply_rope_pos_ids(q, k, CP.asarray(rng.integers(0, 4096, 6).astype(np.int32)), rope_scale=2.0,
                                        rope_theta=5e5)
    sync()
    written(q_rope=qr, k_rope=kr)


@case("rope_pos_ids_inplace_fused_qkv", "apply_rope_pos_ids_inplace on q and k viewed in a fused qkv buffer "
      "(head strides), int64")
def _():
    import fi_cupy
    rng = _rng()
    qkv = CP.randn(rng, (5, 8, 128))
    fi_cupy.apply_rope_pos_ids_inplace(qkv[:, :4], qkv[:, 4:6], CP.asarray(np.arange(5, dtype=np.int64) * 7))
    sync()
    written(qkv=qkv)


@case("rope_llama31_offsets", "apply_llama31_rope (indptr/offsets, int32)")
def _():
    import fi_cupy
    q, k = _rope_qk(_rng(), 10, 4, 2, 128)
    qr, kr = fi_cupy.apply_llama31_rope(q, k, *_ragged_positions(np.int32))
    sync()
    written(q_rope=qr, k_rope=kr)


@case("rope_llama31_pos_ids_inplace", "apply_llama31_rope_pos_ids_inplace (int64), rotary_dim 32")
def _():
    import fi_cupy
    rng = _rng()
    q, k = _rope_qk(rng, 7, 2, 2, 64)
    fi_cupy.apply_llama31_rope_pos_ids_inplace(q, k, CP.asarray(rng.integers(0, 20000, 7)), rotary_dim=32)
    sync()
    written(q=q, k=k)


def _cos_sin_cache(max_pos: int, rotary_dim: int):
    inv = 1e4 ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    ang = np.arange(max_pos)[:, None] * inv[None, :]
    return CP.asarray(np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32))


@case("rope_cos_sin_cache", "apply_rope_with_cos_sin_cache, neox, 2-D (nnz, heads * head_size) fp16, int64 "
      "positions")
def _():
    import fi_cupy
    rng = _rng()
    query, key = CP.randn(rng, (6, 4 * 64)), CP.randn(rng, (6, 2 * 64))
    qo, ko = fi_cupy.apply_rope_with_cos_sin_cache(CP.asarray(rng.integers(0, 128, 6)), query, key, 64,
                                                    _cos_sin_cache(128, 64), is_neox=True)
    sync()
    written(query=qo, key=ko)


@case("rope_cos_sin_cache_inplace_gptj", "apply_rope_with_cos_sin_cache_inplace, interleaved (is_neox=False), "
      "rotary_dim 32 < head_size, fp32")
def _():
    import fi_cupy
    rng = _rng()
    query, key = _rope_qk(rng, 6, 3, 1, 64, "float32")
    fi_cupy.apply_rope_with_cos_sin_cache_inplace(CP.asarray(rng.integers(0, 50, 6).astype(np.int32)), query, key,
                                                  64, _cos_sin_cache(50, 32), is_neox=False)
    sync()
    written(query=query, key=key)


# ---------------------------------------------------------------------------------------------
# Sampling (sampling.cu): softmax (ring of cluster CTAs on sm_90+, else two passes), the select
# kernels (histogram + candidates in shared memory, or radix select for flat rows), speculative.


def _probs(rng, batch, vocab, temp=3.0):
    x = rng.standard_normal((batch, vocab)) * temp
    p = np.exp(x - x.max(axis=1, keepdims=True))
    return CP.asarray((p / p.sum(axis=1, keepdims=True)).astype(np.float32))


def _logits(rng, batch, vocab):
    return CP.asarray((rng.standard_normal((batch, vocab)) * 3).astype(np.float32))


def _softmax_case(batch, vocab, plan=None, temperature=None):
    """softmax at (batch, vocab); plan: the ring plan to force (None: leave the choice to softmax;
    False: the two-pass kernel)."""
    from fi_cupy import sampling
    rng = _rng()
    x = _logits(rng, batch, vocab)
    key = (0, vocab, batch)
    saved = sampling._ring_plans.pop(key, "absent")
    if plan is not None:
        sampling._ring_plans[key] = plan or None
    try:
        t = temperature(rng) if callable(temperature) else temperature
        p = sampling.softmax(x, t)
        sync()
    finally:
        sampling._ring_plans.pop(key, None)
        if saved != "absent":
            sampling._ring_plans[key] = saved
    written(probs=p)


@case("softmax_ring", "softmax 128 x 128256: the cluster ring kernel as softmax picks it", needs=("clusters",),
      heavy=True)
def _():
    from fi_cupy import sampling
    plan = sampling._ring_plan(0, 128256, 128)
    if plan is None:
        raise AssertionError("softmax would not take the ring kernel at 128 x 128256")
    _fn, cluster, slots, slice_, nclusters, window = plan
    print(f"  ring: {nclusters} clusters of {cluster} CTAs, {slots} buffers, slice {slice_}, window {window}")
    _softmax_case(128, 128256)


@case("softmax_ring_two_ctas_per_sm", "softmax 6 x 32000 forced onto the ring kernel at 2 CTAs an SM (no held "
      "chunks), 2 clusters: each streams 3 rows through its ring; per-row temperature", needs=("clusters",))
def _():
    from fi_cupy import sampling
    batch, vocab, cluster, per_sm = 6, 32000, 2, 2
    slots = sampling.ring_slots(_kernels.device_props(0), per_sm)
    if sampling.ring_slice(vocab, cluster)[1] - sampling.ring_hold(per_sm) >= slots:
        raise AssertionError(f"a slice of {vocab} / {cluster} does not fit {slots} ring buffers")
    plan = sampling.ring_plan(0, vocab, batch, cluster, per_sm)
    if plan[4] < 1:
        raise AssertionError("no cluster of 2 at 2 CTAs an SM is resident")
    plan = plan[:4] + (min(plan[4], 2),) + plan[5:]
    _softmax_case(batch, vocab, plan, lambda rng: CP.asarray(rng.uniform(0.5, 2.0, batch).astype(np.float32)))


@case("softmax_two_pass_vec1", "softmax vocab 1001 (not a multiple of 4: the two-pass kernel, scalar loads), "
      "temperature 0.7")
def _():
    _softmax_case(3, 1001, temperature=0.7)


@case("softmax_two_pass_vec4", "softmax 2 x 4096 with the ring plan forced off: the two-pass kernel, 16-byte loads")
def _():
    _softmax_case(2, 4096, plan=False)


def _sample(fn, probs, vocab, *args, **kwargs):
    out = fn(probs, *args, seed=1234, offset=7, **kwargs)
    sync()
    in_range(fn.__name__, out, 0, vocab)


@case("sampling_from_probs_indices", "sampling_from_probs with row indices, vocab 5000")
def _():
    from fi_cupy import sampling
    rng = _rng()
    _sample(sampling.sampling_from_probs, _probs(rng, 4, 5000), 5000,
            indices=CP.asarray(np.array([3, 0, 0, 2], np.int32)))


@case("sampling_top_p_per_row", "top_p_sampling_from_probs, per-row top_p array, vocab 1001 (scalar loads)")
def _():
    from fi_cupy import sampling
    rng = _rng()
    _sample(sampling.top_p_sampling_from_probs, _probs(rng, 3, 1001), 1001,
            CP.asarray(np.array([0.9, 0.5, 1.0], np.float32)))


@case("sampling_top_k", "top_k_sampling_from_probs, top_k 50, vocab 5000")
def _():
    from fi_cupy import sampling
    _sample(sampling.top_k_sampling_from_probs, _probs(_rng(), 3, 5000), 5000, 50)


@case("sampling_min_p", "min_p_sampling_from_probs, min_p 0.1, vocab 5000")
def _():
    from fi_cupy import sampling
    _sample(sampling.min_p_sampling_from_probs, _probs(_rng(), 3, 5000), 5000, 0.1)


@case("sampling_top_k_top_p", "top_k_top_p_sampling_from_probs, per-row top_k, top_k_first and joint")
def _():
    from fi_cupy import sampling
    rng = _rng()
    p, k = _probs(rng, 3, 5000), CP.asarray(np.array([20, 1, 400], np.int32))
    for order in ("top_k_first", "joint"):
        _sample(sampling.top_k_top_p_sampling_from_probs, p, 5000, k, 0.8, filter_apply_order=order)


@case("sampling_top_k_top_p_from_logits", "top_k_top_p_sampling_from_logits (softmax, then the select kernel)")
def _():
    from fi_cupy import sampling
    _sample(sampling.top_k_top_p_sampling_from_logits, _logits(_rng(), 3, 5000), 5000, 40, 0.9)


@case("sampling_from_logits", "sampling_from_logits (Gumbel-max), vocab 1001, row indices")
def _():
    from fi_cupy import sampling
    rng = _rng()
    _sample(sampling.sampling_from_logits, _logits(rng, 3, 1001), 1001, indices=CP.asarray(np.array([2, 1], np.int32)))


@case("sampling_flat_rows_radix", "nearly flat rows (20000 tokens in one histogram bin): top-p, top-k sampling "
      "and top-p renorm through the exact radix select")
def _():
    from fi_cupy import sampling
    rng = _rng()
    p = 1.0 + 0.01 * rng.random((2, 20000))
    probs = CP.asarray((p / p.sum(axis=1, keepdims=True)).astype(np.float32))
    _sample(sampling.top_p_sampling_from_probs, probs, 20000, 0.5)
    _sample(sampling.top_k_sampling_from_probs, probs, 20000, 10000)
    r = sampling.top_p_renorm_probs(probs, 0.5)
    sync()
    written(renorm_probs=r)


@case("renorm_and_mask", "top_p_renorm_probs, top_k_renorm_probs (per-row top_k, vocab 1001), top_k_mask_logits")
def _():
    from fi_cupy import sampling
    rng = _rng()
    a = sampling.top_p_renorm_probs(_probs(rng, 3, 5000), 0.9)
    b = sampling.top_k_renorm_probs(_probs(rng, 2, 1001), CP.asarray(np.array([10, 500], np.int32)))
    c = sampling.top_k_mask_logits(_logits(rng, 3, 5000), 10)  # -inf outside the top k: no NaN
    sync()
    written(top_p_renorm=a, top_k_renorm=b, masked_logits=c)


@case("chain_speculative", "chain_speculative_sampling, 4 drafts, vocab 1000, counters given and new")
def _():
    from fi_cupy import sampling
    rng = _rng()
    batch, n, vocab = 3, 4, 1000
    draft = _probs(rng, batch * n, vocab).reshape(batch, n, vocab)
    target = _probs(rng, batch * (n + 1), vocab).reshape(batch, n + 1, vocab)
    ids = CP.asarray(rng.integers(0, vocab, (batch, n)).astype(np.int32))
    acc, emi = CP.asarray(np.zeros(batch, np.int32)), CP.asarray(np.zeros(batch, np.int32))
    out, _, _ = sampling.chain_speculative_sampling(draft, ids, target, acc, emi, seed=5, offset=0)
    out2, acc2, emi2 = sampling.chain_speculative_sampling(draft, ids, target, seed=6, offset=0)
    sync()
    for name, x in (("output_token_ids", out), ("output_token_ids (new counters)", out2)):
        in_range(name, x, -1, vocab)
    for name, x in (("accepted", acc), ("emitted", emi), ("accepted (new)", acc2), ("emitted (new)", emi2)):
        in_range(name, x, 0, n + 1)


# ---------------------------------------------------------------------------------------------
# Mask packing (packbits.cu) and the Hopper wgmma probe (probe.cu)


@case("packbits", "packbits (big-endian) and segment_packbits (little-endian, an empty segment)")
def _():
    import fi_cupy
    rng = _rng()
    x = rng.random(1001) > 0.5
    a = fi_cupy.packbits(CP.asarray(x), bitorder="big")
    b, ip = fi_cupy.segment_packbits(CP.asarray(x), np.array([0, 5, 5, 300, 1001]), bitorder="little")
    sync()
    if not np.array_equal(host(a), np.packbits(x, bitorder="big")):
        raise AssertionError("packbits differs from numpy.packbits")
    in_range("segment_packbits", b, 0, 256)
    in_range("new indptr", ip, 0, host(b).size + 1)


@case("wgmma_probe", "one wgmma instruction (fi_cupy.probe)", needs=("sm90a",))
def _():
    from fi_cupy import probe
    rng = np.random.default_rng(0)
    a = rng.integers(-4, 5, (64, 16)).astype(np.float32)
    b = rng.integers(-4, 5, (8, 16)).astype(np.float32)
    bits = lambda m: (m.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731 - exact for small integers
    if not np.array_equal(probe.wgmma_matmul(bits(a), bits(b)), a @ b.T):
        raise AssertionError("wgmma probe: D != A B^T")


# ---------------------------------------------------------------------------------------------
# Driver


def _rng():
    """Fresh inputs, the same on every run of a case (seeded by its name)."""
    return np.random.default_rng(zlib.crc32(_current[0].encode()))


def select(patterns, excludes) -> list:
    names = list(CASES)
    if patterns:
        chosen = []
        for p in patterns:
            hit = [n for n in names if fnmatch.fnmatchcase(n, p)]
            if not hit:
                sys.exit(f"sanitize_cases: no case matches {p!r} (see --list)")
            chosen += [n for n in hit if n not in chosen]
        names = chosen
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, x) for x in excludes)]
    return sorted(names, key=lambda n: CASES[n][3])  # stable: heavy cases last


def device_ok() -> bool:
    try:
        sync()
        return True
    except Exception:  # noqa: BLE001 - a sticky CUDA error: every later call fails too
        return False


def report(ran_all: bool) -> int:
    """Print the kernels launched and the templates missed; returns the number missed."""
    templates = kernel_templates()
    readable = demangle(LAUNCHES)
    by_template = defaultdict(list)
    for name in sorted(LAUNCHES):
        by_template[template_of(name, templates)].append(name)
    print(f"\nkernels launched: {len(LAUNCHES)} instantiations, {sum(LAUNCHES.values())} launches")
    for t in sorted(by_template, key=lambda t: (t is None, templates.get(t, ""), t or "")):
        for name in by_template[t]:
            print(f"kernel {t or '?'} {templates.get(t, '?')} {name} launches={LAUNCHES[name]}")
            if readable[name] != name:
                print(f"    {readable[name]}")
    missed = [t for t in templates if t not in by_template]
    print(f"templates: {len(templates) - len(missed)}/{len(templates)} launched; not launched: "
          f"{' '.join(f'{t} ({templates[t]})' for t in missed) if missed else 'none'}")
    if missed and ran_all:
        print("  (a full run should launch every template; those above were skipped or are not reached)")
    return len(missed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help="case names or glob patterns (default: all)")
    ap.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="leave out matching cases")
    ap.add_argument("--list", action="store_true", help="print the selected cases and what each covers, then exit")
    args = ap.parse_args()
    names = select(args.cases, args.exclude)
    if args.list:
        for n in names:
            print(f"{n}\t{CASES[n][1]}")
        return 0
    import cupy
    cupy.cuda.set_allocator(None)  # every array its own cudaMalloc: no pooled neighbour to hide an overrun
    cupy.cuda.set_pinned_memory_allocator(None)
    ok = failed = skipped = 0
    for i, name in enumerate(names):
        fn, _doc, needs, _heavy = CASES[name]
        _current[0] = name
        t0 = time.perf_counter()
        try:
            _check_needs(needs)
            fn()
            sync()
        except Skip as e:
            skipped += 1
            print(f"case {name}: skipped ({e})", flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - report the case, keep going unless the context is lost
            failed += 1
            traceback.print_exc()
            print(f"case {name}: FAILED ({type(e).__name__}: {e})", flush=True)
            if not device_ok():
                print(f"sticky CUDA error after case {name}: the {len(names) - i - 1} cases after it cannot run",
                      flush=True)
                break
            continue
        ok += 1
        print(f"case {name}: ok ({time.perf_counter() - t0:.2f} s, {len(CASE_KERNELS[name])} kernel instantiations)",
              flush=True)
    _current[0] = ""
    report(not args.cases and not args.exclude)
    print(f"sanitize_cases: {ok} ok, {failed} failed, {skipped} skipped of {len(names)} cases", flush=True)
    return 1 if failed or ok + skipped < len(names) else 0


if __name__ == "__main__":
    sys.exit(main())
