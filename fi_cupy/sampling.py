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


def sampling_program() -> Program:
    return Program("sampling.cu", (KernelSpec("fic::sample_from_probs_kernel", (4,)),
                                   KernelSpec("fic::sample_from_probs_kernel", (1,)),
                                   KernelSpec("fic::sample_from_logits_kernel", ()),
                                   KernelSpec("fic::softmax_kernel", (4,)),
                                   KernelSpec("fic::softmax_kernel", (1,))))


def all_programs() -> list:
    return [sampling_program()]


def _fn(device: int, index: int):
    return kernels.cached_function(device, ("sampling", index),
                                   lambda: (sampling_program(), sampling_program().kernels[index]))


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
        return int(seed) % 2 ** 64, int(offset or 0) % 2 ** 64
    g = generator if generator is not None else default_generator
    if not isinstance(g, Generator):
        raise TypeError(f"generator: expected a fi_cupy.sampling.Generator (or pass seed= and offset=), got "
                        f"{type(g).__name__}")
    return g.draw()


def _sample_probs(probs, indices, top_k, top_p, min_p, top_k_first, generator, seed, offset, check_nan,
                  enable_pdl, stream):
    c = Call(probs, stream, enable_pdl)
    p = _matrix(c, probs, "probs")
    batch, ix = _rows(c, p, indices)
    vocab = p.shape[1]
    k_arr, k_val = _param(c, top_k, "top_k", batch, "int")
    p_arr, p_val = _param(c, top_p, "top_p", batch, "float")
    m_arr, m_val = _param(c, min_p, "min_p", batch, "float")
    if p_val is not None and not 0.0 < float(p_val) <= 1.0:
        raise ValueError(f"top_p: must lie in (0, 1], got {p_val}")
    if m_val is not None and not 0.0 <= float(m_val) <= 1.0:
        raise ValueError(f"min_p: must lie in [0, 1], got {m_val}")
    if k_val is not None and (isinstance(k_val, bool) or not isinstance(k_val, (int, np.integer))):
        raise TypeError(f"top_k: expected an int or an int32 array, got {k_val!r}")
    if not streams.is_capturing(c.stream):
        if p_arr is not None:
            h = _host(c, p_arr, "top_p")
            if not np.all((h > 0) & (h <= 1)):
                raise ValueError(f"top_p: entries must lie in (0, 1], got {h.min()}..{h.max()}")
        if check_nan:
            _check_nan(c, p)
    s, o = _seed(generator, seed, offset)
    out_obj, out = c.new((batch,), dt.int32, "samples")
    if batch and vocab:
        c.launch(_fn(c.device, 0 if _vec(p) == 4 else 1), (batch,), (THREADS,), [
            ptr(p), i64(p.strides[0]), ptr(ix), i32(vocab), ptr(k_arr), i32(0 if k_val is None else k_val),
            ptr(p_arr), f32(1.0 if p_val is None else p_val), ptr(m_arr), f32(0.0 if m_val is None else m_val),
            i32(1 if top_k_first else 0), np.uint64(s), np.uint64(o), ptr(out)])
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
    c = Call(logits, stream, enable_pdl)
    x = _matrix(c, logits, "logits")
    batch, ix = _rows(c, x, indices)
    if check_nan and not streams.is_capturing(c.stream):
        _check_nan(c, x)
    s, o = _seed(generator, seed, offset)
    out_obj, out = c.new((batch,), dt.int32, "samples")
    if batch and x.shape[1]:
        c.launch(_fn(c.device, 2), (batch,), (THREADS,), [
            ptr(x), i64(x.strides[0]), ptr(ix), i32(x.shape[1]), np.uint64(s), np.uint64(o), ptr(out)])
    return c.result(out_obj)


def softmax(logits, temperature=None, enable_pdl=None, stream=None):
    """softmax(logits / temperature) per row, float32; temperature a scalar or a (batch,) float32 array."""
    c = Call(logits, stream, enable_pdl)
    x = _matrix(c, logits, "logits")
    batch, vocab = x.shape
    t_arr, t_val = _param(c, temperature, "temperature", batch, "float")
    if t_val is not None and not float(t_val) > 0:
        raise ValueError(f"temperature: must be > 0, got {t_val}")
    out_obj, o = c.new((batch, vocab), dt.float32, "probs")
    if batch and vocab:
        c.launch(_fn(c.device, 3 if _vec(x) == 4 else 4), (batch,), (THREADS,), [
            ptr(x), i64(x.strides[0]), i32(vocab), ptr(t_arr), f32(1.0 if t_val is None else t_val), ptr(o)])
    return c.result(out_obj)


def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order: str = "top_k_first",
                                     deterministic: bool = True, generator=None, check_nan: bool = False,
                                     seed=None, offset=None, enable_pdl=None, stream=None):
    """softmax, then top_k_top_p_sampling_from_probs."""
    probs = softmax(logits, enable_pdl=enable_pdl, stream=stream)
    return top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices, filter_apply_order, deterministic,
                                           generator, check_nan, seed, offset, enable_pdl, stream)
