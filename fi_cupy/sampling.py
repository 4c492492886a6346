"""Sampling without sorting (cuda_src/sampling.cu): FlashInfer's fi.sampling API.

probs / logits: (batch, vocab) float32 with a contiguous last dim. Randomness: Philox keyed by
(seed, offset) and counted by (output row, token), so the same seed and offset give the same tokens
in every framework. FlashInfer takes a torch generator; here `generator=` takes a
fi_cupy.sampling.Generator (the default one is seeded from the OS), or pass `seed=` and `offset=`
explicitly. Each call takes one offset from the generator. Filters (see sampling.cu): top-k keeps
the tokens with fewer than k larger ones (ties at the boundary kept); top-p those whose larger
tokens hold less than top_p of the mass; min-p those with p >= min_p * max p. Per-row parameters are
1-D arrays of length batch. Returns int32 token ids (batch,) in the caller's framework.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ._core import checks, kernels, streams
from ._core import dtypes as dt
from ._core.call import Call
from ._core.kernels import KernelSpec, Program, f32, i32, i64, ptr

THREADS = 1024  # kSampleThreads
FILTER_ORDERS = ("top_k_first", "joint")


class Generator:
    """Philox seed and a running offset; each sampling call takes the next offset."""

    def __init__(self, seed: int | None = None):
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else int(seed) % 2 ** 64
        self.offset = 0
        self._lock = threading.Lock()

    def manual_seed(self, seed: int) -> "Generator":
        self.seed, self.offset = int(seed) % 2 ** 64, 0
        return self

    def draw(self) -> tuple:
        with self._lock:
            self.offset += 1
            return self.seed, self.offset - 1


default_generator = Generator()


SELECT_SMEM = 162 * 1024  # kSelectSmemBytes: histograms and the sorted candidates of the select kernels
# (kernel, vectorised template arguments or None for a kernel without one)
_KERNELS = (("sample_from_probs_kernel", True), ("renorm_probs_kernel", True), ("mask_logits_kernel", True),
            ("chain_speculative_kernel", True), ("softmax_kernel", True), ("sample_from_logits_kernel", False))


def kernel_program(name: str, *targs) -> Program:
    """One NVRTC program a kernel variant, so that a first call compiles only what it runs."""
    return Program("sampling.cu", (KernelSpec(f"fic::{name}", targs),))


def all_programs() -> list:
    out = []
    for name, vec in _KERNELS:
        out += [kernel_program(name, v) for v in (4, 1)] if vec else [kernel_program(name)]
    return out + [ring_program()]


def _fn(device: int, name: str, *targs):
    """The loaded kernel `name` with template arguments `targs` (VEC), none for a kernel without."""
    def build():
        prog = kernel_program(name, *targs)
        return prog, prog.kernels[0]
    return kernels.cached_function(device, ("sampling", name) + targs, build)


# The ring softmax (softmax_ring_kernel): CTAs of 512 consumer threads and a producer warp, a ring of
# 16 KB chunks (8 KB chunks measured 3-5 points slower on the H100) filling shared memory.
RING_THREADS, RING_CHUNK, RING_MAX_SLOTS = 512, 4096, 16  # RING_MAX_SLOTS: kMaxRingSlots
RING_STATIC_SMEM = 1024  # the kernel's barriers, pairs and scratch (656 bytes), rounded up
RING_RESERVED_SMEM = 1024  # what the driver keeps of each CTA's shared memory
# A row's stall (its last chunk's latency, the pair exchange), as floats of a slice: fitted on the
# H100 so that the cost below ranks the shapes measured by bench/softmax_probe.py in their order.
RING_ROW_COST = 4096
# Copies a CTA keeps in flight when it has the SM to itself (0: as many as buffers are free): 2 took
# batch 256 / 512 at 128256 from 82 / 87% of copy to 85 / 90% on the H100; with two CTAs an SM any
# limit measured slower (bench/NOTES.md).
RING_WINDOW_ALONE = 2
# Chunks a thread keeps in registers when its CTA has the SM to itself (the kernel's HOLD): 7 chunks
# of 8 registers fit under the 96 that 17 warps leave a thread (an SM sub-partition holds 5 of them).
# Slices may then be longer than the ring, which lets 66 clusters of 2 take 128 x 128256 in 2 rounds
# (H100: 50.7-51.3 us, 86-87% of copy, against 55.5 us for 7@2); HOLD also made every shape of one
# CTA an SM measured 0-3% faster (bench/NOTES.md).
RING_HOLD_ALONE = 7
# A shape whose slice needs the held chunks to fit is taken for at most this many rounds: beyond it
# the steady state decides, and there the shapes that fit the ring measured faster (H100, 512 x
# 128256: 4@1 194.9 us, 2@1 197.9).
RING_HOLD_MAX_ROUNDS = 4


def ring_window(per_sm: int) -> int:
    return RING_WINDOW_ALONE if per_sm == 1 else 0


def ring_hold(per_sm: int) -> int:
    return RING_HOLD_ALONE if per_sm == 1 else 0


def ring_program() -> Program:
    """The ring softmax for one CTA an SM and for two, in one program: a plan asks both kernels how
    many clusters stay resident, so they compile together."""
    return Program("sampling.cu", tuple(KernelSpec("fic::softmax_ring_kernel", (RING_THREADS, RING_CHUNK, ring_hold(m)))
                                        for m in (1, 2)))


def ring_fn(device: int, per_sm: int):
    """The ring softmax kernel for per_sm (1 or 2) CTAs an SM."""
    def build():
        prog = ring_program()
        return prog, prog.kernels[per_sm - 1]
    return kernels.cached_function(device, ("sampling", "softmax_ring_kernel", per_sm), build)


def ring_slots(props: dict, per_sm: int) -> int:
    """Chunk buffers a CTA holds at per_sm CTAs an SM."""
    room = props["smem_optin"] if per_sm == 1 else props["smem_sm"] // per_sm - RING_RESERVED_SMEM
    return max(0, min(RING_MAX_SLOTS, (room - RING_STATIC_SMEM) // (RING_CHUNK * 4)))


def ring_slice(vocab: int, cluster: int) -> tuple:
    """(floats a CTA's slice, chunks it takes) when `cluster` CTAs share a row of `vocab` floats."""
    slice_ = -(-vocab // (4 * cluster)) * 4
    return slice_, -(-slice_ // RING_CHUNK)


def softmax_ring_shape(vocab: int, batch: int, slots, resident):
    """(CTAs a cluster, CTAs an SM, floats a CTA's slice) of the ring softmax, or None when no cluster
    of at most 16 CTAs holds a row with a buffer to spare (beyond the chunks held in registers).
    slots(per_sm): chunk buffers a CTA; resident(cluster, per_sm): clusters the GPU holds at once
    (cuOccupancyMaxActiveClusters, which knows how the SMs split into GPCs). The cheapest by rounds x
    (a slice's SM time + a row's stall): e.g. on the H100 at 128 x 128256, 66 clusters of 2 take the
    rows in 2 rounds where 32 clusters of 7 at two CTAs an SM need 4."""
    best = None
    for per_sm in (1, 2):
        n_slots, hold = slots(per_sm), ring_hold(per_sm)
        for cluster in range(1, 17):
            slice_, chunks = ring_slice(vocab, cluster)
            if chunks - hold >= n_slots:
                continue
            k = resident(cluster, per_sm)
            if k <= 0:
                continue
            rounds = -(-batch // k)
            if chunks >= n_slots and rounds > RING_HOLD_MAX_ROUNDS:
                continue
            cost = rounds * (slice_ * per_sm + RING_ROW_COST)
            if best is None or cost < best[0]:
                best = (cost, (cluster, per_sm, slice_))
    return None if best is None else best[1]


def ring_resident(device: int, cluster: int, per_sm: int) -> int:
    """Clusters of `cluster` CTAs at per_sm CTAs an SM that `device` holds at once (0: no buffers)."""
    smem = ring_slots(kernels.device_props(device), per_sm) * RING_CHUNK * 4
    return ring_fn(device, per_sm).max_active_clusters(cluster, RING_THREADS + 32, smem) if smem else 0


def ring_plan(device: int, vocab: int, batch: int, cluster: int, per_sm: int, window: int | None = None) -> tuple:
    """The plan tuple (see _ring_plan) for rows of `vocab` over clusters of `cluster` CTAs at per_sm
    CTAs an SM; window: copies in flight (default ring_window(per_sm))."""
    return (ring_fn(device, per_sm), cluster, ring_slots(kernels.device_props(device), per_sm),
            ring_slice(vocab, cluster)[0], min(batch, ring_resident(device, cluster, per_sm)),
            ring_window(per_sm) if window is None else window)


_ring_plans: dict = {}


def _ring_plan(device: int, vocab: int, batch: int):
    """(kernel, CTAs a cluster, chunk buffers, slice, clusters to launch, copies in flight) of the
    ring softmax on `device`, or None (no clusters, or rows too long); memoised, so a decode loop
    pays for the choice once."""
    key = (device, vocab, batch)
    if key not in _ring_plans:
        plan = None
        if kernels.clusters_supported(device):
            props = kernels.device_props(device)
            shape = softmax_ring_shape(vocab, batch, lambda per_sm: ring_slots(props, per_sm),
                                       lambda cluster, per_sm: ring_resident(device, cluster, per_sm))
            if shape is not None:
                plan = ring_plan(device, vocab, batch, shape[0], shape[1])
        _ring_plans[key] = plan
    return _ring_plans[key]


def _host(c: Call, info, name: str) -> np.ndarray:
    import cupy
    with cupy.cuda.Device(c.device), cupy.cuda.ExternalStream(c.stream):
        mem = cupy.cuda.UnownedMemory(info.ptr, info.nbytes, info.obj, c.device)
        view = cupy.ndarray(info.shape, np.dtype(info.dtype.name), cupy.cuda.MemoryPointer(mem, 0),
                            tuple(s * info.dtype.itemsize for s in info.strides))
        return cupy.asnumpy(view, stream=cupy.cuda.get_current_stream())


def _vec(info) -> int:
    """4 (16-byte loads) when every row of `info` is 16-byte aligned, else 1."""
    return 4 if info.shape[1] % 4 == 0 and info.ptr % 16 == 0 and info.strides[0] % 4 == 0 else 1


def _matrix(c: Call, x, name: str):
    info = c.arg(x, name)
    checks.dtype_in(info, (dt.float32,))
    checks.ndim(info, 2, "(batch_size, vocab_size)")
    checks.last_dim_contiguous(info)
    return info


def _rows(c: Call, info, indices):
    """(batch, row indices ArrayInfo or None)."""
    if indices is None:
        return info.shape[0], None
    ix = c.arg(indices, "indices")
    checks.dtype_in(ix, (dt.int32,), " (int32 row indices)")
    checks.ndim(ix, 1, "(batch_size,)")
    checks.contiguous(ix)
    if ix.size and not streams.is_capturing(c.stream):
        h = _host(c, ix, "indices")
        if h.min() < 0 or h.max() >= info.shape[0]:
            raise ValueError(f"indices: entries must lie in [0, {info.shape[0]}) (rows of {info.name}), got "
                             f"{int(h.min())}..{int(h.max())}")
    return ix.shape[0], ix


def _param(c: Call, value, name: str, batch: int, kind: str):
    """(array ArrayInfo or None, scalar) for a scalar or per-row parameter."""
    if value is None:
        return None, None
    if np.isscalar(value) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return None, value.item() if isinstance(value, np.generic) else value
    info = c.arg(value, name)
    want = dt.int32 if kind == "int" else dt.float32
    checks.dtype_in(info, (want,), f" (per-row {name})")
    checks.shape(info, (batch,), "(batch_size,)")
    checks.contiguous(info)
    return info, None


def _check_nan(c: Call, info) -> None:
    h = _host(c, info, info.name)
    if np.isnan(h).any():
        raise ValueError(f"{info.name}: contains NaN (check_nan=True)")


def _seed(generator, seed, offset) -> tuple:
    if seed is not None:
        off = 0 if offset is None else checks.int_arg("offset", offset)
        return checks.int_arg("seed", seed) % 2 ** 64, off % 2 ** 64
    g = generator if generator is not None else default_generator
    if not isinstance(g, Generator):
        raise TypeError(f"generator: expected a fi_cupy.sampling.Generator (or pass seed= and offset=), got "
                        f"{type(g).__name__}")
    return g.draw()


def _check_top_p(c: Call, p_arr, p_val) -> None:
    if p_val is not None and not 0.0 < float(p_val) <= 1.0:
        raise ValueError(f"top_p: must lie in (0, 1], got {p_val}")
    if p_arr is not None and not streams.is_capturing(c.stream):
        h = _host(c, p_arr, "top_p")
        if not np.all((h > 0) & (h <= 1)):
            raise ValueError(f"top_p: entries must lie in (0, 1], got {h.min()}..{h.max()}")


def _check_top_k(k_val) -> None:
    if k_val is not None and (isinstance(k_val, bool) or not isinstance(k_val, (int, np.integer))):
        raise TypeError(f"top_k: expected an int or an int32 array, got {k_val!r}")


def _sample_probs(probs, indices, top_k, top_p, min_p, top_k_first, generator, seed, offset, check_nan,
                  enable_pdl, stream):
    c = Call(probs, stream, enable_pdl, "probs")
    p = _matrix(c, probs, "probs")
    batch, ix = _rows(c, p, indices)
    vocab = p.shape[1]
    k_arr, k_val = _param(c, top_k, "top_k", batch, "int")
    p_arr, p_val = _param(c, top_p, "top_p", batch, "float")
    m_arr, m_val = _param(c, min_p, "min_p", batch, "float")
    _check_top_k(k_val)
    _check_top_p(c, p_arr, p_val)
    if m_val is not None and not 0.0 <= float(m_val) <= 1.0:
        raise ValueError(f"min_p: must lie in [0, 1], got {m_val}")
    if check_nan and not streams.is_capturing(c.stream):
        _check_nan(c, p)
    s, o = _seed(generator, seed, offset)
    out_obj, out = c.new((batch,), dt.int32, "samples")
    if batch and vocab:
        c.launch(_fn(c.device, "sample_from_probs_kernel", _vec(p)), (batch,), (THREADS,), [
            ptr(p), i64(p.strides[0]), ptr(ix), i32(vocab), ptr(k_arr), i32(0 if k_val is None else k_val),
            ptr(p_arr), f32(1.0 if p_val is None else p_val), ptr(m_arr), f32(0.0 if m_val is None else m_val),
            i32(1 if top_k_first else 0), np.uint64(s), np.uint64(o), ptr(out)], smem=SELECT_SMEM)
    return c.result(out_obj)


def sampling_from_probs(probs, indices=None, deterministic: bool = True, generator=None, check_nan: bool = False,
                        seed=None, offset=None, enable_pdl=None, stream=None):
    """A token per row drawn from probs (not necessarily normalised)."""
    return _sample_probs(probs, indices, None, None, None, False, generator, seed, offset, check_nan, enable_pdl,
                         stream)


def top_p_sampling_from_probs(probs, top_p, indices=None, deterministic: bool = True, generator=None,
                              check_nan: bool = False, seed=None, offset=None, enable_pdl=None, stream=None):
    return _sample_probs(probs, indices, None, top_p, None, False, generator, seed, offset, check_nan, enable_pdl,
                         stream)


def top_k_sampling_from_probs(probs, top_k, indices=None, deterministic: bool = True, generator=None,
                              check_nan: bool = False, seed=None, offset=None, enable_pdl=None, stream=None):
    return _sample_probs(probs, indices, top_k, None, None, False, generator, seed, offset, check_nan, enable_pdl,
                         stream)


def min_p_sampling_from_probs(probs, min_p, indices=None, deterministic: bool = True, generator=None,
                              check_nan: bool = False, seed=None, offset=None, enable_pdl=None, stream=None):
    return _sample_probs(probs, indices, None, None, min_p, False, generator, seed, offset, check_nan, enable_pdl,
                         stream)


def top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices=None, filter_apply_order: str = "top_k_first",
                                    deterministic: bool = True, generator=None, check_nan: bool = False, seed=None,
                                    offset=None, enable_pdl=None, stream=None):
    """top_k_first: top-p over the renormalised top-k set; joint: both filters on the original probs."""
    checks.choice("filter_apply_order", filter_apply_order, FILTER_ORDERS)
    return _sample_probs(probs, indices, top_k, top_p, None, filter_apply_order == "top_k_first", generator, seed,
                         offset, check_nan, enable_pdl, stream)


def sampling_from_logits(logits, indices=None, deterministic: bool = True, generator=None, check_nan: bool = False,
                         seed=None, offset=None, enable_pdl=None, stream=None):
    """A token per row drawn from softmax(logits), by Gumbel-max in one pass (no softmax written)."""
    c = Call(logits, stream, enable_pdl, "logits")
    x = _matrix(c, logits, "logits")
    batch, ix = _rows(c, x, indices)
    if check_nan and not streams.is_capturing(c.stream):
        _check_nan(c, x)
    s, o = _seed(generator, seed, offset)
    out_obj, out = c.new((batch,), dt.int32, "samples")
    if batch and x.shape[1]:
        c.launch(_fn(c.device, "sample_from_logits_kernel"), (batch,), (THREADS,), [
            ptr(x), i64(x.strides[0]), ptr(ix), i32(x.shape[1]), np.uint64(s), np.uint64(o), ptr(out)])
    return c.result(out_obj)


def softmax(logits, temperature=None, enable_pdl=None, stream=None):
    """softmax(logits / temperature) per row, float32; temperature a scalar or a (batch,) float32 array."""
    c = Call(logits, stream, enable_pdl, "logits")
    x = _matrix(c, logits, "logits")
    batch, vocab = x.shape
    t_arr, t_val = _param(c, temperature, "temperature", batch, "float")
    if t_val is not None and not float(t_val) > 0:
        raise ValueError(f"temperature: must be > 0, got {t_val}")
    out_obj, o = c.new((batch, vocab), dt.float32, "probs")
    if batch and vocab:
        temp = [ptr(t_arr), f32(1.0 if t_val is None else t_val)]
        plan = _ring_plan(c.device, vocab, batch) if _vec(x) == 4 else None
        if plan is None:  # two passes over the row
            args = [ptr(x), i64(x.strides[0]), i32(vocab)] + temp + [ptr(o)]
            c.launch(_fn(c.device, "softmax_kernel", _vec(x)), (batch,), (THREADS,), args)
        else:  # persistent clusters, each row read once into shared memory
            fn, cluster, slots, slice_, nclusters, window = plan
            args = [ptr(x), i64(x.strides[0]), i32(batch), i32(vocab), i32(slice_), i32(slots), i32(window)] + \
                temp + [ptr(o)]
            c.launch(fn, (nclusters * cluster,), (RING_THREADS + 32,), args, smem=slots * RING_CHUNK * 4,
                     cluster=cluster)
    return c.result(out_obj)


def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order: str = "top_k_first",
                                     deterministic: bool = True, generator=None, check_nan: bool = False,
                                     seed=None, offset=None, enable_pdl=None, stream=None):
    """softmax, then top_k_top_p_sampling_from_probs."""
    probs = softmax(logits, enable_pdl=enable_pdl, stream=stream)
    return top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices, filter_apply_order, deterministic,
                                           generator, check_nan, seed, offset, enable_pdl, stream)


def _renorm(probs, top_k, top_p, enable_pdl, stream):
    c = Call(probs, stream, enable_pdl, "probs")
    p = _matrix(c, probs, "probs")
    batch, vocab = p.shape
    k_arr, k_val = _param(c, top_k, "top_k", batch, "int")
    p_arr, p_val = _param(c, top_p, "top_p", batch, "float")
    _check_top_k(k_val)
    _check_top_p(c, p_arr, p_val)
    out_obj, o = c.new((batch, vocab), dt.float32, "renorm_probs")
    if batch and vocab:
        vec = _vec(p)
        c.launch(_fn(c.device, "renorm_probs_kernel", vec), (batch,), (THREADS,), [
            ptr(p), i64(p.strides[0]), i32(vocab), ptr(k_arr), i32(0 if k_val is None else k_val), ptr(p_arr),
            f32(1.0 if p_val is None else p_val), ptr(o)], smem=SELECT_SMEM)
    return c.result(out_obj)


def top_p_renorm_probs(probs, top_p, enable_pdl=None, stream=None):
    """probs with the tokens outside the top-p set zeroed and the rest scaled to sum to 1."""
    return _renorm(probs, None, top_p, enable_pdl, stream)


def top_k_renorm_probs(probs, top_k, enable_pdl=None, stream=None):
    """probs with the tokens outside the top-k set (ties at the boundary kept) zeroed, the rest scaled to
    sum to 1."""
    return _renorm(probs, top_k, None, enable_pdl, stream)


def top_k_mask_logits(logits, top_k, enable_pdl=None, stream=None):
    """logits with the tokens outside the top-k set (ties at the boundary kept) set to -inf."""
    c = Call(logits, stream, enable_pdl, "logits")
    x = _matrix(c, logits, "logits")
    batch, vocab = x.shape
    k_arr, k_val = _param(c, top_k, "top_k", batch, "int")
    _check_top_k(k_val)
    out_obj, o = c.new((batch, vocab), dt.float32, "masked_logits")
    if batch and vocab:
        c.launch(_fn(c.device, "mask_logits_kernel", _vec(x)), (batch,), (THREADS,), [
            ptr(x), i64(x.strides[0]), i32(vocab), ptr(k_arr), i32(0 if k_val is None else k_val), ptr(o)],
            smem=SELECT_SMEM)
    return c.result(out_obj)


def _counter(c: Call, given, batch: int, name: str):
    """(object, ArrayInfo) of an int32 (batch,) counter the kernel adds to: `given` (a copy for an
    immutable caller's array), or new zeros."""
    if given is None:
        return c.zeros((batch,), dt.int32, name)
    info = c.arg(given, name)
    checks.dtype_in(info, (dt.int32,), f" ({name})")
    checks.shape(info, (batch,), "(batch_size,)")
    checks.contiguous(info)
    if not c.writable(info):
        return c.copy_of(info, "(it is copied, JAX arrays being immutable)")
    return given, info


def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs, maybe_output_accepted_token_num=None,
                               maybe_output_emitted_draft_token_num=None, deterministic: bool = True,
                               generator=None, seed=None, offset=None, enable_pdl=None, stream=None):
    """Speculative sampling over a chain of drafts (see chain_speculative_kernel in sampling.cu).

    draft_probs (batch, n, vocab) float32, draft_token_ids (batch, n) int32, target_probs
    (batch, n + 1, vocab) float32, all contiguous. Returns (output_token_ids (batch, n + 1) int32 with
    -1 after the first rejection, output_accepted_token_num, output_emitted_draft_token_num): the counts
    are added to the given arrays (updated in place; for JAX, to copies) or to new zeros."""
    c = Call(draft_probs, stream, enable_pdl, "draft_probs")
    q = c.arg(draft_probs, "draft_probs")
    ids = c.arg(draft_token_ids, "draft_token_ids")
    p = c.arg(target_probs, "target_probs")
    checks.dtype_in(q, (dt.float32,))
    checks.dtype_in(p, (dt.float32,))
    checks.dtype_in(ids, (dt.int32,))
    checks.ndim(q, 3, "(batch_size, num_speculate_tokens, vocab_size)")
    batch, n, vocab = q.shape
    checks.shape(ids, (batch, n), "(batch_size, num_speculate_tokens)")
    checks.shape(p, (batch, n + 1, vocab), "(batch_size, num_speculate_tokens + 1, vocab_size)")
    for info in (q, ids, p):
        checks.contiguous(info)
    if ids.size and not streams.is_capturing(c.stream):
        h = _host(c, ids, "draft_token_ids")
        if h.min() < 0 or h.max() >= vocab:
            raise ValueError(f"draft_token_ids: entries must lie in [0, {vocab}), got {int(h.min())}..{int(h.max())}")
    acc_obj, acc = _counter(c, maybe_output_accepted_token_num, batch, "maybe_output_accepted_token_num")
    emi_obj, emi = _counter(c, maybe_output_emitted_draft_token_num, batch, "maybe_output_emitted_draft_token_num")
    s, o = _seed(generator, seed, offset)
    out_obj, out = c.new((batch, n + 1), dt.int32, "output_token_ids")
    if batch and vocab:
        vec = 4 if vocab % 4 == 0 and q.ptr % 16 == 0 and p.ptr % 16 == 0 else 1
        c.launch(_fn(c.device, "chain_speculative_kernel", vec), (batch,), (THREADS,), [
            ptr(q), ptr(ids), ptr(p), i32(n), i32(vocab), np.uint64(s), np.uint64(o), ptr(out), ptr(acc),
            ptr(emi)])
    return c.result(out_obj, acc_obj, emi_obj)
