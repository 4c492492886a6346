"""Sampling without sorting (cuda_src/sampling.cu): FlashInfer's fi.sampling API.

probs / logits: (batch, vocab) float32, float16 or bfloat16 with a contiguous last dim (a stride on the
batch axis is fine); the kernels compute in float32. Outputs as FlashInfer's: token ids int32, or the
dtype of `indices` (int32 / int64) when given; softmax and top_p_renorm_probs float32;
top_k_renorm_probs and top_k_mask_logits the input dtype.

Filters (see sampling.cu): top-k keeps the tokens with fewer than k larger ones (ties at the boundary
kept); top-p those whose larger tokens hold less than top_p of the mass; min-p those with
p >= min_p * max p. top_k / top_p / min_p / temperature: a Python or numpy scalar, or a 1-D device array
of length batch of any integer or float dtype, read by the kernel (float arrays of top_k truncate toward
zero, as torch's .int()).

Randomness: Philox keyed by (seed, offset) and counted by (output row, token), so the same seed and
offset give the same tokens in every framework; the output row feeds the counter, so a row's tokens
depend on its position, not on the other rows (as FlashInfer documents for its per-row seeds). seed and
offset: ints, or int64 / uint64 device arrays of length 1 or batch (per-row values, CUDA-graph safe);
offset defaults to 0 when seed is given (FlashInfer would then use the generator and ignore seed); an
offset without seed is ignored, as in FlashInfer. Without seed, the generator gives them: a CUDA
torch.Generator as FlashInfer's get_seed_and_offset reads it (its Philox seed and offset, the offset
advanced by the call's rounded increment); a CPU one has no offset, so two 63-bit values are drawn from
it instead. generator=None: torch callers use torch's default CUDA generator of the device, as
FlashInfer; others fi_cupy.sampling.default_generator (a Generator seeded from the OS; each call takes
the next offset).
deterministic / is_deterministic are accepted: every kernel here is deterministic whatever they say.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading

import numpy as np

from ._core import arrays, checks, kernels, streams
from ._core import dtypes as dt
from ._core.call import Call
from ._core.docs import KERNEL_GLOSSARY, document
from ._core.fastpath import Signatures, split
from ._core.kernels import KernelSpec, Program, fresh_arg, i32, i64, ptr, struct_arg

THREADS = 1024  # kSampleThreads
FILTER_ORDERS = ("top_k_first", "joint")
IN_DTYPES = (dt.float32, dt.float16, dt.bfloat16)  # probs, logits, draft / target probs
# Per-row parameter arrays: their dtype as the kernels' ParamCode.
PARAM_CODES = {dt.int32: 0, dt.int64: 1, dt.float16: 2, dt.bfloat16: 3, dt.float32: 4, dt.float64: 5, dt.int8: 6,
               dt.uint8: 7}
PARAM_CODES.update({getattr(dt, n): c for n, c in (("int16", 8), ("uint16", 9), ("uint32", 10), ("uint64", 11))
                    if hasattr(dt, n)})  # where _core.dtypes knows them
# (input, output) dtypes of renorm_probs_kernel: top-k keeps the input dtype, top-p writes float32.
RENORM_TYPES = ((dt.float32, dt.float32), (dt.float16, dt.float16), (dt.bfloat16, dt.bfloat16),
                (dt.float16, dt.float32), (dt.bfloat16, dt.float32))
VECS = (4, 1)  # elements a load: 4 (8 or 16 bytes) when every row is aligned to it, else 1


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
_torch_lock = threading.Lock()  # a torch generator's state is read, advanced and written back as one step


SELECT_SMEM = 162 * 1024  # kSelectSmemBytes: histograms and the sorted candidates of the select kernels


_SIGS = Signatures()  # recorded calls by signature: an eager call of a known signature only launches


def _covering_first(targs: list) -> list:
    """targs reordered so that the first few hold every value of every position (greedily): the default
    compile test takes the first programs that bring a new template argument value."""
    out, seen, rest = [], set(), list(targs)
    while rest:
        best = max(rest, key=lambda t: len(set(enumerate(t)) - seen))
        rest.remove(best)
        out.append(best)
        seen |= set(enumerate(best))
    return out


def _variants() -> dict:
    """kernel -> the template arguments of every instantiation the API launches."""
    ts = [d.cpp for d in IN_DTYPES]
    by_type = _covering_first([(t, v) for t in ts for v in VECS])
    return {
        "sample_from_probs_kernel": by_type,
        "renorm_probs_kernel": _covering_first([(a.cpp, b.cpp, v) for a, b in RENORM_TYPES for v in VECS]),
        "mask_logits_kernel": by_type,
        "chain_speculative_kernel": by_type,
        "softmax_kernel": by_type,
        "sample_from_logits_kernel": [(t,) for t in ts],
    }


def kernel_program(name: str, *targs) -> Program:
    """One NVRTC program a kernel variant, so that a first call compiles only what it runs."""
    return Program("sampling.cu", (KernelSpec(f"fic::{name}", targs),))


def all_programs() -> list:
    return [kernel_program(name, *t) for name, ts in _variants().items() for t in ts] + [ring_program()]


def _fn(device: int, name: str, *targs):
    """The loaded kernel `name` with template arguments `targs` (C++ text: element types, VEC)."""
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


# ---------------------------------------------------------------------------------------------
# Host-side reads (checks only: each one syncs, and none runs while a CUDA graph is captured)


@contextlib.contextmanager
def _cupy_on(c: Call):
    """CuPy on this call's device and stream (a host read, or work a recorded call could not replay)."""
    if c.rec is not None:
        c.rec.refuse("works through CuPy")
    import cupy
    with cupy.cuda.Device(c.device), streams.as_cupy(c.stream):
        yield cupy


def _view(cupy, info):
    """A CuPy view of `info` (bfloat16, which CuPy lacks, as its uint16 bits)."""
    mem = cupy.cuda.UnownedMemory(info.ptr, max(1, info.nbytes), info.obj, info.device)
    np_dtype = np.uint16 if info.dtype is dt.bfloat16 else np.dtype(info.dtype.name)
    return cupy.ndarray(info.shape, np_dtype, cupy.cuda.MemoryPointer(mem, 0), info.byte_strides)


def _as_float32(cupy, view, info):
    """The values of a float view as float32 (bfloat16 bits widened: exact)."""
    if info.dtype is dt.bfloat16:
        return (view.astype(cupy.uint32) << 16).view(cupy.float32)
    return view.astype(cupy.float32)


def _check_nan(c: Call, info) -> None:
    """check_nan=True: reduced on the device, one flag read back."""
    with _cupy_on(c) as cupy:
        v = _view(cupy, info)
        bad = ((v & 0x7fff) > 0x7f80).any() if info.dtype is dt.bfloat16 else cupy.isnan(v).any()
        if bool(bad):
            raise ValueError(f"{info.name}: contains NaN (check_nan=True)")


# ---------------------------------------------------------------------------------------------
# Arguments


def _matrix(c: Call, x, name: str):
    info = c.arg(x, name)
    checks.dtype_in(info, IN_DTYPES)
    checks.ndim(info, 2, "(batch_size, vocab_size)")
    checks.last_dim_contiguous(info)
    return info


def _vec(info) -> int:
    """4 when every row of `info` starts on a 4-element boundary and vocab % 4 == 0, else 1."""
    return 4 if info.shape[1] % 4 == 0 and info.ptr % (4 * info.dtype.itemsize) == 0 and info.strides[0] % 4 == 0 \
        else 1


def _rows(c: Call, info, indices):
    """(batch, row indices ArrayInfo or None)."""
    if indices is None:
        return info.shape[0], None
    ix = c.arg(indices, "indices")
    checks.dtype_in(ix, (dt.int32, dt.int64), " (row indices)")
    checks.ndim(ix, 1, "(batch_size,)")
    checks.contiguous(ix)
    if ix.size:
        c.host_check(functools.partial(_check_range, name="indices", end=info.shape[0],
                                       what=f" (rows of {info.name})"), ix)
    return ix.shape[0], ix


def _check_range(h, name: str, end: int, what: str = "") -> None:
    """An index array read back to the host (Call.host_check): entries in [0, end)."""
    if h.min() < 0 or h.max() >= end:
        raise ValueError(f"{name}: entries must lie in [0, {end}){what}, got {int(h.min())}..{int(h.max())}")


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float, np.number)) or (isinstance(value, np.ndarray) and value.ndim == 0)


def _param(c: Call, value, name: str, batch: int, kind: str, default):
    """(kernel Param, array ArrayInfo or None, scalar or None) of a scalar or per-row parameter: an int
    (kind "int") or a number, or a (batch,) device array of any dtype in PARAM_CODES. None: `default`."""
    if value is None:
        return struct_arg("Qdi", 0, float(default), 0), None, None
    v = value.item() if isinstance(value, (np.generic, np.ndarray)) and value.ndim == 0 else value
    if isinstance(v, (bool, str)):
        raise TypeError(f"{name}: expected a number or a 1-D array of length batch_size, got {value!r}")
    if _is_scalar(value):
        if kind == "int" and not isinstance(v, int):
            raise TypeError(f"{name}: expected an int or a 1-D array of length batch_size, got {value!r}")
        return struct_arg("Qdi", 0, float(v), 0), None, v
    info = c.arg(value, name)
    checks.dtype_in(info, tuple(PARAM_CODES), f" (per-row {name})")
    checks.shape(info, (batch,), "(batch_size,)")
    checks.contiguous(info)
    return struct_arg("Qdi", ptr(info), 0.0, PARAM_CODES[info.dtype]), info, None


def _check_top_p(c: Call, p_arr, p_val) -> None:
    if p_val is not None and not 0.0 < float(p_val) <= 1.0:
        raise ValueError(f"top_p: must lie in (0, 1], got {p_val}")
    if p_arr is not None and p_arr.size:
        c.host_check(functools.partial(_check_top_p_values, bf16=p_arr.dtype is dt.bfloat16), p_arr)


def _check_top_p_values(h, bf16: bool) -> None:
    """Per-row top_p read back to the host (Call.host_check; bfloat16 as its bits)."""
    if bf16:
        h = (h.astype(np.uint32) << 16).view(np.float32)
    if not np.all((h > 0) & (h <= 1)):
        raise ValueError(f"top_p: entries must lie in (0, 1], got {h.min()}..{h.max()}")


def _check_min_p(m_val) -> None:
    if m_val is not None and not 0.0 <= float(m_val) <= 1.0:
        raise ValueError(f"min_p: must lie in [0, 1], got {m_val}")


# ---------------------------------------------------------------------------------------------
# Seeds and offsets


def _is_torch_generator(g) -> bool:
    torch = sys.modules.get("torch")  # a caller with a torch generator has imported torch
    return torch is not None and isinstance(g, torch.Generator)


def get_seed_and_offset(increment: int, generator=None, device=None) -> tuple:
    """(seed, offset) for a call from a torch.Generator, advancing it (FlashInfer's function of that name;
    increment: FlashInfer's count for the call, e.g. batch * 32 for the top-k / top-p samplers, batch *
    vocab for sampling_from_logits). generator=None: torch's default CUDA generator
    of `device` (a torch.device or an index; None: the current one). A CUDA generator's state is its
    (Philox seed, offset): the offset grows by the increment rounded up to a multiple of 4 and is
    written back, and the new offset is returned, as in FlashInfer. A CPU generator has no offset
    (FlashInfer cannot read one): two 63-bit values are drawn from it instead, so manual_seed() still
    reproduces the tokens and each call advances it. A fi_cupy Generator gives its next offset."""
    if isinstance(generator, Generator):
        return generator.draw()
    import torch
    if generator is None:
        index = device if device is None or isinstance(device, int) else torch.device(device).index
        generator = _torch_default_generator(torch.cuda.current_device() if index is None else index)
    if not _is_torch_generator(generator):
        raise TypeError(f"generator: expected a torch.Generator or a fi_cupy.sampling.Generator, got "
                        f"{type(generator).__name__}")
    increment = checks.int_arg("increment", increment)
    with _torch_lock:
        if generator.device.type != "cuda":
            seed, offset = torch.empty(2, dtype=torch.int64).random_(generator=generator).tolist()
            return seed, offset
        step = (increment + 3) // 4 * 4
        try:  # the state's two fields read and written directly: ~1 us against ~12 through get/set_state
            seed, offset = generator.initial_seed(), generator.get_offset() + step
            generator.set_offset(offset)
        except (AttributeError, RuntimeError):  # a torch without them, or a stand-in with a state only
            seed, offset = generator.get_state().view(torch.int64).tolist()
            offset += step
            generator.set_state(torch.tensor([seed, offset], dtype=torch.int64).view(torch.uint8))
    return seed % 2 ** 64, offset % 2 ** 64


def _torch_default_generator(device: int):
    import torch
    torch.cuda.init()
    return torch.cuda.default_generators[device]


def _draw(framework: str, device: int, generator, increment: int) -> tuple:
    g = generator
    if g is None:
        if framework == "torch":  # FlashInfer: torch's default CUDA generator of the device
            return get_seed_and_offset(increment, None, device)
        g = default_generator
    if isinstance(g, Generator):
        return g.draw()
    if _is_torch_generator(g):
        return get_seed_and_offset(increment, g)
    raise TypeError(f"generator: expected a torch.Generator or a fi_cupy.sampling.Generator (or pass seed= and "
                    f"offset=), got {type(g).__name__}")


def _int64_bits(x):
    """A uint64 array as int64 of the same bits: the kernels read either as unsigned 64-bit values."""
    if str(getattr(x, "dtype", "")).endswith("uint64") and hasattr(x, "view"):
        if arrays.framework_of(x) == "torch":
            import torch
            return x.view(torch.int64)
        return x.view(np.int64)
    return x


def _seed_part(c: Call, value, name: str, batch: int) -> tuple:
    """(ArrayInfo or None, stride, scalar) of seed or offset: an int, or an int64 / uint64 device array
    of length 1 (every row) or batch (one value a row)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    is_array = isinstance(value, arrays.ArrayInfo) or hasattr(value, "__dlpack__")
    if not is_array or getattr(value, "ndim", 1) == 0:  # an int (or a 0-d array)
        return None, 0, checks.int_arg(name, value) % 2 ** 64
    info = c.arg(_int64_bits(value), name)
    checks.dtype_in(info, (dt.int64,) + ((dt.uint64,) if hasattr(dt, "uint64") else ()), f" (per-row {name})")
    checks.ndim(info, 1, "(batch_size,) or (1,)")
    if info.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected length 1 or batch_size ({batch}), got {info.shape[0]}")
    checks.contiguous(info)
    return info, 0 if info.shape[0] == 1 else 1, 0


def _rng(c: Call, generator, seed, offset, batch: int, increment: int) -> bytes:
    """The kernels' Rng: explicit seed and offset (offset 0 when only seed is given), else drawn from the
    generator with FlashInfer's increment for the call (an offset without a seed is ignored, as there)."""
    if seed is None:  # drawn again by each replay of a recorded call (fastpath)
        fw, dev = c.framework, c.device

        def draw():
            s, o = _draw(fw, dev, generator, increment)
            return struct_arg("QQQQii", 0, 0, s, o, 0, 0)
        return fresh_arg(draw)
    s_arr, s_stride, s = _seed_part(c, seed, "seed", batch)
    o_arr, o_stride, o = _seed_part(c, 0 if offset is None else offset, "offset", batch)
    return struct_arg("QQQQii", ptr(s_arr), ptr(o_arr), s, o, s_stride, o_stride)


# ---------------------------------------------------------------------------------------------
# Samplers


def _samples(c: Call, batch: int, vocab: int, ix, return_valid: bool):
    """(samples object, ArrayInfo, valid object or None, ArrayInfo or None): int32 ids, or the dtype of
    the row indices (FlashInfer); zeros (and valid False) when there is no vocabulary to draw from."""
    make = c.new if vocab else c.zeros
    out_obj, out = make((batch,), dt.int32 if ix is None else ix.dtype, "samples")
    v_obj, v = make((batch,), dt.bool_, "valid") if return_valid else (None, None)
    return out_obj, out, v_obj, v


def _sample_probs(probs, indices, top_k, top_p, min_p, top_k_first, generator, seed, offset, check_nan,
                  return_valid, enable_pdl, stream, increment_per_row):
    arr, sca = split(top_k, top_p, min_p, seed, offset)
    return _SIGS((probs, indices) + arr, ("probs", top_k_first, generator, check_nan, return_valid, enable_pdl,
                                          increment_per_row) + sca, stream,
                 lambda: _sample_probs_call(probs, indices, top_k, top_p, min_p, top_k_first, generator, seed, offset,
                                            check_nan, return_valid, enable_pdl, stream, increment_per_row))


def _sample_probs_call(probs, indices, top_k, top_p, min_p, top_k_first, generator, seed, offset, check_nan,
                       return_valid, enable_pdl, stream, increment_per_row):
    c = Call(probs, stream, enable_pdl, "probs")
    p = _matrix(c, probs, "probs")
    batch, ix = _rows(c, p, indices)
    vocab = p.shape[1]
    k_par, _, _ = _param(c, top_k, "top_k", batch, "int", 0)
    p_par, p_arr, p_val = _param(c, top_p, "top_p", batch, "float", 1.0)
    m_par, _, m_val = _param(c, min_p, "min_p", batch, "float", 0.0)
    _check_top_p(c, p_arr, p_val)
    _check_min_p(m_val)
    if check_nan and not streams.is_capturing(c.stream):
        _check_nan(c, p)
    rng = _rng(c, generator, seed, offset, batch, batch * increment_per_row)
    out_obj, out, v_obj, v = _samples(c, batch, vocab, ix, return_valid)
    if batch and vocab:
        vec = _vec(p)
        c.launch(_fn(c.device, "sample_from_probs_kernel", p.dtype.cpp, vec), (batch,), (THREADS,), [
            ptr(p), i64(p.strides[0]), ptr(ix), i32(ix is not None and ix.dtype is dt.int64), i32(vocab), k_par,
            p_par, m_par, i32(1 if top_k_first else 0), rng, ptr(out), i32(out.dtype is dt.int64), ptr(v)],
            smem=SELECT_SMEM)
    return c.result(out_obj, v_obj) if return_valid else c.result(out_obj)


# Each parameter's entry, once for the module (docs.document writes the Parameters sections).
_PARAMS = {**KERNEL_GLOSSARY,
           "probs": ("array\n"
                     "    ``(batch_size, vocab_size)`` probabilities, float32, float16 or bfloat16, on a CUDA\n"
                     "    device (torch, JAX, CuPy or any DLPack producer); last dim contiguous, a stride on the\n"
                     "    batch axis is fine. Rows need not be normalised: a token is drawn in proportion to its\n"
                     "    entry; entries <= 0 and NaN are never drawn. With ``indices``, ``(num_rows,\n"
                     "    vocab_size)``: the rows indices picks."),
           "indices": ("array, optional\n"
                       "    ``(batch_size,)`` int32 or int64, contiguous: output i is drawn from row ``indices[i]``\n"
                       "    of probs (several outputs may share a row); the token ids then come in indices' dtype.\n"
                       "    Its entries are checked on the host (one synchronisation) unless a CUDA graph is being\n"
                       "    captured. None: output i from row i, ids int32."),
           "deterministic": ("bool, default True\n"
                             "    Accepted for FlashInfer: every kernel here is deterministic whatever it says."),
           "generator": ("torch.Generator or fi_cupy.sampling.Generator, optional\n"
                         "    Where seed and offset come from when ``seed`` is None. A CUDA torch.Generator is read\n"
                         "    and advanced as FlashInfer's get_seed_and_offset does (its Philox offset grows by the\n"
                         "    call's increment, rounded up to 4); a CPU one gives two 63-bit draws. None: torch's\n"
                         "    default CUDA generator of the device for torch callers,\n"
                         "    ``fi_cupy.sampling.default_generator`` (seeded from the OS, the next offset each\n"
                         "    call) for the others."),
           "check_nan": ("bool, default False\n"
                         "    Raise ValueError when probs contains NaN (a reduction on the device and one\n"
                         "    synchronisation; skipped while a CUDA graph is being captured)."),
           "seed": ("int or array, optional\n"
                    "    Philox seed: an int, or an int64 / uint64 device array of length 1 (every row) or\n"
                    "    batch_size (one seed a row; a CUDA graph replays with the values the array holds then).\n"
                    "    None: seed and offset come from ``generator``. Update seed or offset between calls for new\n"
                    "    draws."),
           "offset": ("int or array, optional\n"
                      "    Philox offset, in the same forms as seed; 0 when seed is given without it. Ignored\n"
                      "    without seed, as in FlashInfer."),
           "return_valid": ("bool, default False\n"
                            "    Also return ``valid``, False for the rows with nothing to draw."),
           "enable_pdl": ("bool or None, default None\n"
                          "    Programmatic dependent launch: the kernel may start while the previous one on the\n"
                          "    stream finishes. None: on where the GPU supports it (compute capability 9.0 and\n"
                          "    newer). fi_cupy's addition to FlashInfer's signature."),
           "top_p": ("float or array\n"
                     "    Keep the tokens whose larger tokens hold less than top_p of the row's mass: the smallest\n"
                     "    set of the largest probabilities whose mass reaches top_p. In ``(0, 1]``: a number for\n"
                     "    every row, or a ``(batch_size,)`` device array of any float or integer dtype (its range\n"
                     "    checked on the host, one synchronisation, unless a CUDA graph is being captured)."),
           "top_k": ("int or array\n"
                     "    Keep the tokens with fewer than top_k larger probabilities (ties at the boundary all\n"
                     "    kept); ``top_k <= 0`` or ``>= vocab_size`` keeps every token. An int for every row, or a\n"
                     "    ``(batch_size,)`` device array of any integer or float dtype, read by the kernel (floats\n"
                     "    truncate toward zero)."),
           "min_p": ("float or array\n"
                     "    Keep the tokens with ``p >= min_p * max(p)`` of their row. A number in ``[0, 1]`` for\n"
                     "    every row, or a ``(batch_size,)`` device array of any float or integer dtype."),
           "filter_apply_order": ("str, default \"top_k_first\"\n"
                                  "    ``\"top_k_first\"``: top-p over the top-k set renormalised (its mass the\n"
                                  "    top-k set's); ``\"joint\"``: both filters on the original row, the kept set\n"
                                  "    their intersection."),
           "logits": ("array\n"
                      "    ``(batch_size, vocab_size)`` logits, float32, float16 or bfloat16, on a CUDA device\n"
                      "    (torch, JAX, CuPy or any DLPack producer); last dim contiguous, a stride on the batch\n"
                      "    axis is fine. NaN logits are never drawn. With ``indices``, ``(num_rows, vocab_size)``:\n"
                      "    the rows indices picks."),
           "temperature": ("float or array, optional\n"
                           "    Divides the logits: a positive number for every row, or a ``(batch_size,)`` device\n"
                           "    array of any float or integer dtype, read by the kernel. None: 1."),
           "is_deterministic": ("bool, default False\n"
                                "    Accepted for FlashInfer: the kernel is deterministic whatever it says."),
           "draft_probs": ("array\n"
                           "    ``(batch_size, num_speculate_tokens, vocab_size)``: the draft model's probabilities\n"
                           "    of each draft token's position; float32, float16 or bfloat16, contiguous, on a CUDA\n"
                           "    device (torch, JAX, CuPy or any DLPack producer)."),
           "draft_token_ids": ("array\n"
                               "    ``(batch_size, num_speculate_tokens)`` int32 or int64, contiguous: the draft\n"
                               "    tokens, each in ``[0, vocab_size)`` (checked on the host, one synchronisation,\n"
                               "    unless a CUDA graph is being captured)."),
           "target_probs": ("array\n"
                            "    ``(batch_size, num_speculate_tokens + 1, vocab_size)``: the target model's\n"
                            "    probabilities at each draft position and one past the last; float32, float16 or\n"
                            "    bfloat16 (when its dtype differs from draft_probs', both are converted to float32\n"
                            "    copies first), contiguous."),
           "maybe_output_accepted_token_num": ("array, optional\n"
                                               "    ``(batch_size,)`` int32, contiguous: each request's count of\n"
                                               "    drafts that pass their acceptance test, each taken on its own\n"
                                               "    (without stopping at the first rejection), is added to it in\n"
                                               "    place (for JAX, to a copy). None: counted from zero in a new\n"
                                               "    array."),
           "maybe_output_emitted_draft_token_num": ("array, optional\n"
                                                    "    ``(batch_size,)`` int32, contiguous: each request's count\n"
                                                    "    of emitted drafts (those before the first rejection; the\n"
                                                    "    bonus or replacement token not counted) is added to it, as\n"
                                                    "    above.")}

_SAMPLED = ("samples : array\n"
            "    ``(batch_size,)`` token ids: int32, or indices' dtype when indices is given. A row with nothing to\n"
            "    draw (no entry > 0) gives 0.\n"
            "valid : array\n"
            "    Only with ``return_valid=True``: ``(batch_size,)`` bool, False for the rows with nothing to draw.")

_TOKEN_IDS = ("array\n"
              "    ``(batch_size,)`` token ids: int32, or indices' dtype when indices is given.")

_PHILOX_NOTES = ("Random numbers come from Philox keyed by (seed, offset) and counted by (output row, token), so\n"
                 "the same seed and offset give the same tokens in every framework, and a row's token depends on\n"
                 "its position in the batch, not on the other rows. There are no rejection rounds to run out (one\n"
                 "exact draw a row, without sorting), so every row with positive mass is valid. Differences from\n"
                 "FlashInfer: seed without offset uses offset 0 (FlashInfer would take both from the generator),\n"
                 "fi_cupy Generators, JAX / CuPy arrays, ``enable_pdl`` and ``stream``.")

_DIFFERENCES = "Differences from FlashInfer: JAX / CuPy arrays, ``enable_pdl`` and ``stream``."

_LOGITS_INDICES = {"indices": ("array, optional\n"
                               "    ``(batch_size,)`` int32 or int64, contiguous: output i is drawn from row\n"
                               "    ``indices[i]`` of logits (several outputs may share a row); the token ids then\n"
                               "    come in indices' dtype. Its entries are checked on the host (one\n"
                               "    synchronisation) unless a CUDA graph is being captured. None: output i from row\n"
                               "    i, ids int32.")}

_LOGITS_TOP_K = {"top_k": ("int or array\n"
                           "    Keep the tokens with fewer than top_k larger logits (ties at the boundary all\n"
                           "    kept); ``top_k <= 0`` or ``>= vocab_size`` keeps every token. An int for every row,\n"
                           "    or a ``(batch_size,)`` device array of any integer or float dtype, read by the\n"
                           "    kernel (floats truncate toward zero).")}

_RENORM_PARAMS = {"probs": ("array\n"
                            "    ``(batch_size, vocab_size)`` probabilities, float32, float16 or bfloat16, on a\n"
                            "    CUDA device (torch, JAX, CuPy or any DLPack producer); last dim contiguous, a\n"
                            "    stride on the batch axis is fine. Entries <= 0 and NaN are never kept.")}


@document("Draw one token a row from probabilities, without filtering.", returns=_SAMPLED, glossary=_PARAMS,
          notes=_PHILOX_NOTES)
def sampling_from_probs(probs, indices=None, deterministic: bool = True, generator=None, check_nan: bool = False,
                        seed=None, offset=None, return_valid: bool = False, enable_pdl=None, stream=None):
    """Token j of a row is drawn with probability ``probs[j] / sum(probs)`` over its positive entries."""
    return _sample_probs(probs, indices, None, None, None, False, generator, seed, offset, check_nan, return_valid,
                         enable_pdl, stream, 1)


@document("Draw one token a row from its top-p (nucleus) set.", returns=_SAMPLED, glossary=_PARAMS,
          notes=_PHILOX_NOTES)
def top_p_sampling_from_probs(probs, top_p, indices=None, deterministic: bool = True, generator=None,
                              check_nan: bool = False, seed=None, offset=None, return_valid: bool = False,
                              enable_pdl=None, stream=None):
    """The draw is in proportion to the kept probabilities, renormalised."""
    return _sample_probs(probs, indices, None, top_p, None, False, generator, seed, offset, check_nan, return_valid,
                         enable_pdl, stream, 32)


@document("Draw one token a row from its top-k set.", returns=_SAMPLED, glossary=_PARAMS, notes=_PHILOX_NOTES)
def top_k_sampling_from_probs(probs, top_k, indices=None, deterministic: bool = True, generator=None,
                              check_nan: bool = False, seed=None, offset=None, return_valid: bool = False,
                              enable_pdl=None, stream=None):
    """The draw is in proportion to the kept probabilities, renormalised."""
    return _sample_probs(probs, indices, top_k, None, None, False, generator, seed, offset, check_nan, return_valid,
                         enable_pdl, stream, 32)


@document("Draw one token a row from its min-p set.", returns=_SAMPLED, glossary=_PARAMS, notes=_PHILOX_NOTES)
def min_p_sampling_from_probs(probs, min_p, indices=None, deterministic: bool = True, generator=None,
                              check_nan: bool = False, seed=None, offset=None, return_valid: bool = False,
                              enable_pdl=None, stream=None):
    """The draw is in proportion to the kept probabilities, renormalised."""
    return _sample_probs(probs, indices, None, None, min_p, False, generator, seed, offset, check_nan, return_valid,
                         enable_pdl, stream, 1)


@document("Draw one token a row after both the top-k and the top-p filter.", returns=_SAMPLED, glossary=_PARAMS,
          params={"top_p": ("float or array\n"
                            "    Keep the tokens whose larger tokens hold less than top_p of the row's mass (with\n"
                            "    filter_apply_order=\"top_k_first\", of the top-k set's mass): the smallest set of\n"
                            "    the largest probabilities whose mass reaches top_p. In ``(0, 1]``: a number for\n"
                            "    every row, or a ``(batch_size,)`` device array of any float or integer dtype\n"
                            "    (its range checked on the host, one synchronisation, unless a CUDA graph is\n"
                            "    being captured).")}, notes=_PHILOX_NOTES)
def top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices=None, filter_apply_order: str = "top_k_first",
                                    deterministic: bool = True, generator=None, check_nan: bool = False, seed=None,
                                    offset=None, return_valid: bool = False, enable_pdl=None, stream=None):
    """The draw is in proportion to the kept probabilities, renormalised."""
    checks.choice("filter_apply_order", filter_apply_order, FILTER_ORDERS)
    return _sample_probs(probs, indices, top_k, top_p, None, filter_apply_order == "top_k_first", generator, seed,
                         offset, check_nan, return_valid, enable_pdl, stream, 32)


@document("Draw one token a row from ``softmax(logits)``, in one pass over the logits.", returns=_TOKEN_IDS,
          glossary=_PARAMS,
          params={**_LOGITS_INDICES,
                  "check_nan": ("bool, default False\n"
                                "    Raise ValueError when logits contains NaN (a reduction on the device and one\n"
                                "    synchronisation; skipped while a CUDA graph is being captured).")},
          notes=("Random numbers come from Philox keyed by (seed, offset) and counted by (output row, token), so\n"
                 "the same seed and offset give the same tokens in every framework, and a row's token depends on\n"
                 "its position in the batch, not on the other rows. The generator is advanced by FlashInfer's\n"
                 "increment for this call, ``batch_size * vocab_size``. Differences from FlashInfer: seed without\n"
                 "offset uses offset 0, fi_cupy Generators, JAX / CuPy arrays, ``enable_pdl`` and ``stream``."))
def sampling_from_logits(logits, indices=None, deterministic: bool = True, generator=None, check_nan: bool = False,
                         seed=None, offset=None, enable_pdl=None, stream=None):
    """The draw is the Gumbel-max trick (``argmax(logits + Gumbel noise)``), whose law is exactly the
    softmax: no probabilities are written.
    """
    arr, sca = split(seed, offset)
    return _SIGS((logits, indices) + arr, ("logits", generator, check_nan, enable_pdl) + sca, stream,
                 lambda: _sample_logits(logits, indices, generator, check_nan, seed, offset, enable_pdl, stream))


def _sample_logits(logits, indices, generator, check_nan, seed, offset, enable_pdl, stream):
    c = Call(logits, stream, enable_pdl, "logits")
    x = _matrix(c, logits, "logits")
    batch, ix = _rows(c, x, indices)
    vocab = x.shape[1]
    if check_nan and not streams.is_capturing(c.stream):
        _check_nan(c, x)
    rng = _rng(c, generator, seed, offset, batch, batch * vocab)
    out_obj, out, _, _ = _samples(c, batch, vocab, ix, False)
    if batch and vocab:
        c.launch(_fn(c.device, "sample_from_logits_kernel", x.dtype.cpp), (batch,), (THREADS,), [
            ptr(x), i64(x.strides[0]), ptr(ix), i32(ix is not None and ix.dtype is dt.int64), i32(vocab), rng,
            ptr(out), i32(out.dtype is dt.int64)])
    return c.result(out_obj)


@document("Row softmax of ``logits / temperature``, in float32.",
          returns=("array\n"
                   "    ``(batch_size, vocab_size)`` float32 probabilities, whatever the logits' dtype (as\n"
                   "    FlashInfer): a new array in the caller's framework."), glossary=_PARAMS,
          params={"logits": ("array\n"
                             "    ``(batch_size, vocab_size)``, float32, float16 or bfloat16, on a CUDA device\n"
                             "    (torch, JAX, CuPy or any DLPack producer); last dim contiguous, a stride on the\n"
                             "    batch axis is fine."),
                  "enable_pdl": KERNEL_GLOSSARY["enable_pdl"]},
          notes=("On compute capability 9.0 and newer, float32 logits whose rows are 16-byte aligned (vocab_size a\n"
                 "multiple of 4) are read once, through shared memory (thread-block clusters); other inputs take\n"
                 "two passes over each row. Differences from FlashInfer: JAX / CuPy arrays and ``stream``."))
def softmax(logits, temperature=None, enable_pdl=None, stream=None):
    arr, sca = split(temperature)
    return _SIGS((logits,) + arr, ("softmax", enable_pdl) + sca, stream,
                 lambda: _softmax(logits, temperature, enable_pdl, stream))


def _softmax(logits, temperature, enable_pdl, stream):
    c = Call(logits, stream, enable_pdl, "logits")
    x = _matrix(c, logits, "logits")
    batch, vocab = x.shape
    t_par, _, t_val = _param(c, temperature, "temperature", batch, "float", 1.0)
    if t_val is not None and not float(t_val) > 0:
        raise ValueError(f"temperature: must be > 0, got {t_val}")
    out_obj, o = c.new((batch, vocab), dt.float32, "probs")
    if batch and vocab:
        vec = _vec(x)
        # the ring reads float32 rows by bulk copy; 16-bit rows take the two-pass kernel
        plan = _ring_plan(c.device, vocab, batch) if vec == 4 and x.dtype is dt.float32 else None
        if plan is None:  # two passes over the row
            c.launch(_fn(c.device, "softmax_kernel", x.dtype.cpp, vec), (batch,), (THREADS,),
                     [ptr(x), i64(x.strides[0]), i32(vocab), t_par, ptr(o)])
        else:  # persistent clusters, each row read once into shared memory
            fn, cluster, slots, slice_, nclusters, window = plan
            args = [ptr(x), i64(x.strides[0]), i32(batch), i32(vocab), i32(slice_), i32(slots), i32(window), t_par,
                    ptr(o)]
            c.launch(fn, (nclusters * cluster,), (RING_THREADS + 32,), args, smem=slots * RING_CHUNK * 4,
                     cluster=cluster)
    return c.result(out_obj)


@document("Softmax of the logits, then one token a row after the top-k and top-p filters.", returns=_TOKEN_IDS,
          glossary=_PARAMS,
          params={**_LOGITS_TOP_K, **_LOGITS_INDICES,
                  "top_p": ("float or array\n"
                            "    Keep the tokens whose larger tokens hold less than top_p of the row's\n"
                            "    probability mass (with filter_apply_order=\"top_k_first\", of the top-k set's):\n"
                            "    the smallest set of the largest probabilities whose mass reaches top_p. In ``(0,\n"
                            "    1]``: a number for every row, or a ``(batch_size,)`` device array of any float\n"
                            "    or integer dtype (its range checked on the host, one synchronisation, unless a\n"
                            "    CUDA graph is being captured)."),
                  "filter_apply_order": ("str, default \"top_k_first\"\n"
                                         "    ``\"top_k_first\"``: top-p over the top-k set renormalised;\n"
                                         "    ``\"joint\"``: both filters on the original row, the kept set their\n"
                                         "    intersection."),
                  "check_nan": ("bool, default False\n"
                                "    Raise ValueError when the softmax of logits contains NaN (a reduction on the\n"
                                "    device and one synchronisation; skipped while a CUDA graph is being captured).")},
          notes=("Random numbers come from Philox keyed by (seed, offset) and counted by (output row, token), so\n"
                 "the same seed and offset give the same tokens in every framework, and a row's token depends on\n"
                 "its position in the batch, not on the other rows. Differences from FlashInfer: seed without\n"
                 "offset uses offset 0, fi_cupy Generators, JAX / CuPy arrays, ``enable_pdl`` and ``stream``."))
def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order: str = "top_k_first",
                                     deterministic: bool = True, generator=None, check_nan: bool = False,
                                     seed=None, offset=None, enable_pdl=None, stream=None):
    """The same as ``top_k_top_p_sampling_from_probs(softmax(logits), ...)``: the float32 probabilities
    are written to a temporary array first.
    """
    checks.choice("filter_apply_order", filter_apply_order, FILTER_ORDERS)
    probs = softmax(logits, enable_pdl=enable_pdl, stream=stream)
    return top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices, filter_apply_order, deterministic,
                                           generator, check_nan, seed, offset, False, enable_pdl, stream)


# ---------------------------------------------------------------------------------------------
# Logits processing


def _renorm(probs, top_k, top_p, enable_pdl, stream):
    arr, sca = split(top_k, top_p)
    return _SIGS((probs,) + arr, ("renorm", enable_pdl) + sca, stream,
                 lambda: _renorm_call(probs, top_k, top_p, enable_pdl, stream))


def _renorm_call(probs, top_k, top_p, enable_pdl, stream):
    c = Call(probs, stream, enable_pdl, "probs")
    p = _matrix(c, probs, "probs")
    batch, vocab = p.shape
    k_par, _, _ = _param(c, top_k, "top_k", batch, "int", 0)
    p_par, p_arr, p_val = _param(c, top_p, "top_p", batch, "float", 1.0)
    _check_top_p(c, p_arr, p_val)
    out_dt = p.dtype if top_p is None else dt.float32  # FlashInfer: top-k keeps the dtype, top-p is float32
    out_obj, o = c.new((batch, vocab), out_dt, "renorm_probs")
    if batch and vocab:
        vec = _vec(p)
        c.launch(_fn(c.device, "renorm_probs_kernel", p.dtype.cpp, out_dt.cpp, vec), (batch,), (THREADS,), [
            ptr(p), i64(p.strides[0]), i32(vocab), k_par, p_par, ptr(o)], smem=SELECT_SMEM)
    return c.result(out_obj)


@document("Keep each row's top-p set, renormalised: the other probabilities become 0.",
          returns=("array\n"
                   "    ``(batch_size, vocab_size)`` float32 (FlashInfer's output dtype, whatever probs' dtype):\n"
                   "    the kept entries scaled to sum to 1. A new array in the caller's framework."),
          glossary=_PARAMS, params=_RENORM_PARAMS, notes=_DIFFERENCES)
def top_p_renorm_probs(probs, top_p, is_deterministic: bool = False, enable_pdl=None, stream=None):
    return _renorm(probs, None, top_p, enable_pdl, stream)


@document("Keep each row's top-k set, renormalised: the other probabilities become 0.",
          returns=("array\n"
                   "    ``(batch_size, vocab_size)`` in probs' dtype (as FlashInfer): the kept entries scaled to\n"
                   "    sum to 1. A new array in the caller's framework."), glossary=_PARAMS, params=_RENORM_PARAMS,
          notes=_DIFFERENCES)
def top_k_renorm_probs(probs, top_k, is_deterministic: bool = False, enable_pdl=None, stream=None):
    return _renorm(probs, top_k, None, enable_pdl, stream)


@document("Set every logit outside its row's top-k set to -inf.",
          returns=("array\n"
                   "    ``(batch_size, vocab_size)`` in logits' dtype: the kept logits copied exactly, the others\n"
                   "    -inf. A new array in the caller's framework."), glossary=_PARAMS,
          params={**_LOGITS_TOP_K,
                  "logits": ("array\n"
                             "    ``(batch_size, vocab_size)``, float32, float16 or bfloat16, on a CUDA device\n"
                             "    (torch, JAX, CuPy or any DLPack producer); last dim contiguous, a stride on the\n"
                             "    batch axis is fine. NaN logits are never kept.")}, notes=_DIFFERENCES)
def top_k_mask_logits(logits, top_k, enable_pdl=None, stream=None):
    arr, sca = split(top_k)
    return _SIGS((logits,) + arr, ("mask_logits", enable_pdl) + sca, stream,
                 lambda: _mask_logits(logits, top_k, enable_pdl, stream))


def _mask_logits(logits, top_k, enable_pdl, stream):
    c = Call(logits, stream, enable_pdl, "logits")
    x = _matrix(c, logits, "logits")
    batch, vocab = x.shape
    k_par, _, _ = _param(c, top_k, "top_k", batch, "int", 0)
    out_obj, o = c.new((batch, vocab), x.dtype, "masked_logits")
    if batch and vocab:
        c.launch(_fn(c.device, "mask_logits_kernel", x.dtype.cpp, _vec(x)), (batch,), (THREADS,), [
            ptr(x), i64(x.strides[0]), i32(vocab), k_par, ptr(o)], smem=SELECT_SMEM)
    return c.result(out_obj)


# ---------------------------------------------------------------------------------------------
# Speculative sampling


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


def _float32_copy(c: Call, info):
    """A float32 copy of `info`, converted on this call's stream (CuPy's pool keeps the memory for that
    stream, so nothing reuses it before the launch has read it)."""
    with _cupy_on(c) as cupy:
        x = cupy.ascontiguousarray(_as_float32(cupy, _view(cupy, info), info))
    return arrays.describe(x, info.name)


@document("Speculative sampling over a chain of draft tokens (Leviathan et al., Chen et al.).",
          returns=("output_token_ids : array\n"
                   "    ``(batch_size, num_speculate_tokens + 1)`` int32: the accepted drafts, then the token drawn\n"
                   "    at the first rejection (or the bonus token), then -1.\n"
                   "output_accepted_token_num : array\n"
                   "    ``(batch_size,)`` int32: maybe_output_accepted_token_num after the addition (the given\n"
                   "    array, a new one, or for JAX a new copy).\n"
                   "output_emitted_draft_token_num : array\n"
                   "    ``(batch_size,)`` int32: maybe_output_emitted_draft_token_num after the addition."),
          glossary=_PARAMS,
          params={"generator": ("torch.Generator or fi_cupy.sampling.Generator, optional\n"
                                "    Where seed and offset come from when ``seed`` is None. A CUDA torch.Generator\n"
                                "    is read and advanced as FlashInfer's get_seed_and_offset does (its Philox\n"
                                "    offset grows by the call's increment, ``batch_size * (num_speculate_tokens +\n"
                                "    1)``, rounded up to 4); a CPU one gives two 63-bit draws. None: torch's\n"
                                "    default CUDA generator of the device for torch callers,\n"
                                "    ``fi_cupy.sampling.default_generator`` (seeded from the OS, the next offset\n"
                                "    each call) for the others.")},
          notes=("Random numbers come from Philox keyed by (seed, offset) and counted by (output row, token), so\n"
                 "the same seed and offset give the same tokens in every framework, and a row's token depends on\n"
                 "its position in the batch, not on the other rows. Differences from FlashInfer: seed without\n"
                 "offset uses offset 0, fi_cupy Generators, JAX / CuPy arrays (the counters added to copies),\n"
                 "``enable_pdl`` and ``stream``."))
def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs, maybe_output_accepted_token_num=None,
                               maybe_output_emitted_draft_token_num=None, deterministic: bool = True,
                               generator=None, seed=None, offset=None, enable_pdl=None, stream=None):
    """Draft i of a request is accepted when ``u * q_i(d_i) < p_i(d_i)`` for a uniform u (q the draft
    model's probabilities, p the target's). At the first rejection j the output token is drawn from
    ``max(p_j - q_j, 0)`` renormalised (from p_j when that is all zero) and the rest are -1; when all
    drafts are accepted a bonus token is drawn from the last target row. The emitted tokens then
    follow the target model's law exactly.
    """
    arr, sca = split(seed, offset)
    return _SIGS((draft_probs, draft_token_ids, target_probs, maybe_output_accepted_token_num,
                  maybe_output_emitted_draft_token_num) + arr, ("chain", generator, enable_pdl) + sca,
                 stream, lambda: _chain_speculative(draft_probs, draft_token_ids, target_probs,
                                                    maybe_output_accepted_token_num,
                                                    maybe_output_emitted_draft_token_num, generator, seed, offset,
                                                    enable_pdl, stream))


def _chain_speculative(draft_probs, draft_token_ids, target_probs, maybe_output_accepted_token_num,
                       maybe_output_emitted_draft_token_num, generator, seed, offset, enable_pdl, stream):
    c = Call(draft_probs, stream, enable_pdl, "draft_probs")
    q = c.arg(draft_probs, "draft_probs")
    ids = c.arg(draft_token_ids, "draft_token_ids")
    p = c.arg(target_probs, "target_probs")
    checks.dtype_in(q, IN_DTYPES)
    checks.dtype_in(p, IN_DTYPES)
    checks.dtype_in(ids, (dt.int32, dt.int64))
    checks.ndim(q, 3, "(batch_size, num_speculate_tokens, vocab_size)")
    batch, n, vocab = q.shape
    checks.shape(ids, (batch, n), "(batch_size, num_speculate_tokens)")
    checks.shape(p, (batch, n + 1, vocab), "(batch_size, num_speculate_tokens + 1, vocab_size)")
    for info in (q, ids, p):
        checks.contiguous(info)
    if ids.size:
        c.host_check(functools.partial(_check_range, name="draft_token_ids", end=vocab), ids)
    rng = _rng(c, generator, seed, offset, batch, batch * (n + 1))
    acc_obj, acc = _counter(c, maybe_output_accepted_token_num, batch, "maybe_output_accepted_token_num")
    emi_obj, emi = _counter(c, maybe_output_emitted_draft_token_num, batch, "maybe_output_emitted_draft_token_num")
    # no vocabulary (only possible without drafts): the drawn token is 0
    out_obj, out = (c.new if vocab else c.zeros)((batch, n + 1), dt.int32, "output_token_ids")
    if batch and vocab:
        if q.dtype is not p.dtype:  # the kernel reads one dtype
            q, p = _float32_copy(c, q), _float32_copy(c, p)
        a = 4 * q.dtype.itemsize
        vec = 4 if vocab % 4 == 0 and q.ptr % a == 0 and p.ptr % a == 0 else 1
        c.launch(_fn(c.device, "chain_speculative_kernel", q.dtype.cpp, vec), (batch,), (THREADS,), [
            ptr(q), ptr(ids), i32(ids.dtype is dt.int64), ptr(p), i32(n), i32(vocab), rng, ptr(out), ptr(acc),
            ptr(emi)])
    return c.result(out_obj, acc_obj, emi_obj)
