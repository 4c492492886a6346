"""Cascade (shared-prefix) decode benchmark: MultiLevelCascadeAttentionWrapper against the plain batch
decode over the same KV with the prefix duplicated per request, and FlashInfer's cascade wrapper when
importable (issue 26).

Shapes: a shared prefix of 1k, 8k and 32k tokens, 16 / 64 / 256 requests each with 256 tokens of its
own, one query a request (decode), bf16, 32 query / 8 KV heads, head_dim 128, page 16. The cascade has
two levels over one cache (pages shuffled): level 0 the prefix, all the queries packed as one request
(qo_indptr [0, batch]: the prefix is read once, on tensor cores), level 1 each request's own pages.
The plain decode reads a cache in which every request owns a copy of the prefix pages (what serving
without prefix sharing stores), so no request's prefix is served from another's reads in L2. Times are
medians of CUDA-event timings of CUDA-graph replays (20 calls a graph); each call reads another copy of
the inputs until at least 256 MB are touched per cycle. "floor": the cascade's bytes (prefix once, the
unique KV, q and out) at the copy bandwidth measured in the same run. A last column checks the cascade
against the plain decode (max |difference|, bf16 outputs).

    python bench/bench_cascade.py            # needs a GPU
    python bench/bench_cascade.py --dry      # the shapes, page tables and byte counts only (no GPU)
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fi_cupy  # noqa: E402

HQ, HKV, D, PS = 32, 8, 128, 16
PREFIXES = (1024, 8192, 32768)
BATCHES = (16, 64, 256)
UNIQUE = 256
MIN_WORKING_SET = 256 << 20  # rotate input copies until at least this many bytes are touched per cycle
TOKEN_BYTES = 2 * HKV * D * 2  # K and V of one token, bf16
PAGE_BYTES = PS * TOKEN_BYTES
WORKSPACE = 256 << 20


class Shape:
    """Host-side layout of one row: the cascade's two-level page tables over one shuffled cache, and the
    plain decode's table over a cache holding one copy of the prefix a request."""

    def __init__(self, prefix: int, batch: int, unique: int = UNIQUE, seed: int = 0):
        self.prefix, self.batch, self.unique = prefix, batch, unique
        self.sp, self.up = -(-prefix // PS), -(-unique // PS)  # prefix pages, pages of one request's own
        rng = np.random.default_rng(seed)
        self.cascade_pages = self.sp + batch * self.up
        perm = rng.permutation(self.cascade_pages).astype(np.int32)
        prefix_ids, own_ids = perm[: self.sp], perm[self.sp:]
        last = lambda n, pages: n - (pages - 1) * PS if pages else 0  # noqa: E731
        self.levels = (
            [np.array([0, batch], np.int32), np.arange(batch + 1, dtype=np.int32)],           # qo_indptr_arr
            [np.array([0, self.sp], np.int32), (np.arange(batch + 1) * self.up).astype(np.int32)],
            [prefix_ids, own_ids],
            [np.array([last(prefix, self.sp)], np.int32), np.full(batch, last(unique, self.up), np.int32)],
        )
        # Plain decode: request r's pages are a copy of the prefix pages, then its own, at shuffled places.
        per = self.sp + self.up
        self.decode_pages = batch * per
        self.decode_perm = rng.permutation(self.decode_pages).astype(np.int64)
        self.decode_src = np.concatenate([np.concatenate([prefix_ids, own_ids[r * self.up: (r + 1) * self.up]])
                                          for r in range(batch)]).astype(np.int64)  # cascade page of each
        self.decode_indptr = (np.arange(batch + 1) * per).astype(np.int32)
        self.decode_indices = self.decode_perm.astype(np.int32)
        kv_len = prefix + unique
        self.decode_last = np.full(batch, kv_len - (-(-kv_len // PS) - 1) * PS, np.int32)

    @property
    def io_bytes(self) -> int:
        return 2 * self.batch * HQ * D * 2  # q read, out written

    @property
    def cascade_bytes(self) -> int:
        return (self.prefix + self.batch * self.unique) * TOKEN_BYTES + self.io_bytes

    @property
    def decode_bytes(self) -> int:
        return self.batch * (self.prefix + self.unique) * TOKEN_BYTES + self.io_bytes

    def copies(self, nbytes_per_copy: int) -> int:
        return max(1, min(16, math.ceil(MIN_WORKING_SET / nbytes_per_copy)))

    def describe(self) -> str:
        return (f"prefix {self.prefix} x {self.batch} requests: cascade {self.cascade_pages} pages "
                f"(level 0: {self.sp} pages, 1 request of {self.batch} queries; level 1: {self.batch} x {self.up}), "
                f"{self.cascade_bytes / 1e6:.1f} MB read; plain decode {self.decode_pages} pages, "
                f"{self.decode_bytes / 1e6:.1f} MB read; copies {self.copies(self.cascade_pages * PAGE_BYTES)} / "
                f"{self.copies(self.decode_pages * PAGE_BYTES)}")


def _cascade_inputs(torch, sh: Shape):
    n = sh.copies(sh.cascade_pages * PAGE_BYTES)
    caches = [torch.randn((sh.cascade_pages, 2, PS, HKV, D), device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    qs = [torch.randn((sh.batch, HQ, D), device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    return caches, qs, [torch.empty_like(q) for q in qs]


def _duplicated(torch, sh: Shape, cascade_cache):
    """The plain decode's cache: cascade page decode_src[j] copied to page decode_perm[j], in chunks (the
    32k x 256 row is 35 GB)."""
    out = torch.empty((sh.decode_pages, 2, PS, HKV, D), device="cuda", dtype=torch.bfloat16)
    step = 1 << 14
    for j in range(0, sh.decode_pages, step):
        dst = torch.as_tensor(sh.decode_perm[j: j + step], device="cuda")
        src = torch.as_tensor(sh.decode_src[j: j + step], device="cuda")
        out[dst] = cascade_cache[src]
    return out


def _rotating(fn_of_j, n):
    i = [0]

    def fn():
        j = i[0] % n
        i[0] += 1
        fn_of_j(j)
    return fn


def bench_cascade(torch, sh: Shape, caches, qs, outs):
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(2, torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda"))
    w.plan(*sh.levels, HQ, HKV, D, PS, q_data_type="bfloat16", kv_data_type="bfloat16")
    fn = _rotating(lambda j: w.run(qs[j], caches[j], out=outs[j]), len(caches))
    t = common.time_graph(fn)
    eager = common.per_call_us(fn, n=100, sync=torch.cuda.synchronize)
    w.run(qs[0], caches[0], out=outs[0])
    return t, eager, outs[0].clone()


def bench_shared_prefix_wrapper(torch, sh: Shape, caches, qs):
    """FlashInfer's two-level decode form (contiguous k_shared / v_shared) as fi_cupy implements it."""
    try:
        ks, vs = [], []
        for c in caches:
            ids = torch.as_tensor(sh.levels[2][0].astype(np.int64), device="cuda")
            kv = c[ids].transpose(0, 1).reshape(2, -1, HKV, D)[:, : sh.prefix]
            ks.append(kv[0].contiguous())
            vs.append(kv[1].contiguous())
        w = fi_cupy.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(
            torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda"))
        w.begin_forward(sh.levels[1][1], sh.levels[2][1], sh.levels[3][1], HQ, HKV, D, PS, data_type="bfloat16")
        return common.time_graph(_rotating(lambda j: w.forward(qs[j], ks[j], vs[j], caches[j]), len(caches)))
    except Exception as e:  # noqa: BLE001 - reported as '-', the other columns still stand
        print(f"shared-prefix decode wrapper {sh.prefix}x{sh.batch}: {type(e).__name__}: {e}")
        return None


def bench_plain_decode(torch, sh: Shape, cascade_caches, qs, outs):
    n = sh.copies(sh.decode_pages * PAGE_BYTES)
    caches = [_duplicated(torch, sh, cascade_caches[j % len(cascade_caches)]) for j in range(n)]
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda"))
    w.plan(sh.decode_indptr, sh.decode_indices, sh.decode_last, HQ, HKV, D, PS, q_data_type="bfloat16",
           kv_data_type="bfloat16")
    m = min(n, len(qs))
    t = common.time_graph(_rotating(lambda j: w.run(qs[j % m], caches[j], out=outs[j % m]), n))
    w.run(qs[0], caches[0], out=outs[0])
    return t, outs[0].clone()


def bench_flashinfer(torch, sh: Shape, caches, qs):
    try:
        import flashinfer
    except ImportError:
        return None
    try:
        w = flashinfer.MultiLevelCascadeAttentionWrapper(
            2, torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda"), "NHD")
        to = lambda arrs: [torch.as_tensor(a, device="cuda") for a in arrs]  # noqa: E731
        w.plan(*[to(a) for a in sh.levels], HQ, HKV, D, PS, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        return common.time_graph(_rotating(lambda j: w.run(qs[j], caches[j]), len(caches)))
    except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is reported as '-'
        print(f"FlashInfer cascade {sh.prefix}x{sh.batch}: {type(e).__name__}: {e}")
        return None


def _fits(torch, nbytes: int) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return nbytes < 0.8 * free


def main():
    shapes = [Shape(p, b) for p in PREFIXES for b in BATCHES]
    if "--dry" in sys.argv:
        for sh in shapes:
            print(sh.describe())
        return
    torch = common.torch_or_none()
    if torch is None:
        sys.exit("bench_cascade.py needs torch with CUDA to build bf16 inputs")
    from fi_cupy._core import kernels
    props = kernels.device_props(0)
    print(f"device: {props['name']} ({props['sms']} SMs, {kernels.device_arch(0)})")
    copy_before = common.copy_bandwidth()
    measured = []
    for sh in shapes:
        print(sh.describe(), flush=True)
        caches, qs, outs = _cascade_inputs(torch, sh)
        t, eager, o_cascade = bench_cascade(torch, sh, caches, qs, outs)
        t2 = bench_shared_prefix_wrapper(torch, sh, caches, qs)
        fi = bench_flashinfer(torch, sh, caches, qs)
        plain, diff = None, None
        if _fits(torch, sh.decode_pages * PAGE_BYTES):
            plain, o_plain = bench_plain_decode(torch, sh, caches, qs, outs)
            diff = (o_cascade.float() - o_plain.float()).abs().max().item()
        else:
            print(f"plain decode {sh.prefix}x{sh.batch}: its {sh.decode_pages * PAGE_BYTES / 1e9:.1f} GB cache does "
                  f"not fit; skipped")
        measured.append((sh, t, eager, t2, plain, fi, diff))
        del caches, qs, outs
        torch.cuda.empty_cache()
    copy_after = common.copy_bandwidth()
    copy_bw = max(copy_before, copy_after)  # the higher reading: ratios are never flattered by a slow copy
    print(f"copy ceiling (read+write): {copy_before / 1e9:.0f} GB/s before, {copy_after / 1e9:.0f} GB/s after; "
          f"floors use {copy_bw / 1e9:.0f} GB/s")
    us = lambda s: "-" if s is None else f"{s * 1e6:.1f}"  # noqa: E731
    rows, data = [], []
    for sh, t, eager, t2, plain, fi, diff in measured:
        floor = sh.cascade_bytes / copy_bw
        rows.append([f"{sh.prefix // 1024}k x {sh.batch}", us(t), f"{t / floor:.2f}x", us(t2), us(plain),
                     "-" if plain is None else f"{plain / t:.1f}x", us(fi), "-" if fi is None else f"{fi / t:.2f}x",
                     f"{eager:.0f}", "-" if diff is None else f"{diff:.2g}"])
        data.append({"prefix": sh.prefix, "batch": sh.batch, "unique": sh.unique, "cascade_us": t * 1e6,
                     "floor_us": floor * 1e6, "cascade_eager_us": eager,
                     "shared_prefix_wrapper_us": None if t2 is None else t2 * 1e6,
                     "plain_decode_us": None if plain is None else plain * 1e6,
                     "flashinfer_cascade_us": None if fi is None else fi * 1e6, "max_abs_diff_vs_decode": diff})
    common.print_table(
        f"cascade decode, bf16, {HQ}/{HKV} heads, d{D}, page {PS}, {UNIQUE} own tokens a request; copy "
        f"{copy_bw / 1e9:.0f} GB/s; times in us: median of CUDA-graph replays",
        ["prefix x batch", "cascade", "/ floor", "2-level wrapper", "plain decode", "speed-up", "FlashInfer cascade",
         "FI / ours", "eager us", "|cascade - decode|"], rows)
    common.save_json("bench_cascade.json", {"device": props["name"], "copy_GBps": copy_bw / 1e9,
                                            "copy_before_GBps": copy_before / 1e9,
                                            "copy_after_GBps": copy_after / 1e9, "rows": data})


if __name__ == "__main__":
    main()
