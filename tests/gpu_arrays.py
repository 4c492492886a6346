"""GPU test inputs made with CuPy alone (no torch, no JAX): the kernel tests run on a machine with only
the README's install. bfloat16 arrays are CuPy arrays of ml_dtypes.bfloat16 (CuPy 14 holds them; this
module converts to and from them with integer kernels, which every CuPy version has); float8 arrays are
their bytes as uint8 (CuPy has no float8 dtype; the attention wrappers read a uint8 cache planned as
float8, see fi_cupy.page.check_cache_against), made and read back through ml_dtypes on the host."""
from __future__ import annotations

import cupy as cp
import ml_dtypes
import numpy as np

DTYPES = ("float16", "bfloat16", "float32")
FP8 = ("float8_e4m3fn", "float8_e5m2")
BF16 = np.dtype(ml_dtypes.bfloat16)
_HOST = {"float16": np.float16, "bfloat16": BF16, "float32": np.float32, "float64": np.float64,
         "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}
_seed = [0]


def host_dtype(name: str) -> np.dtype:
    """The numpy dtype of `name` (ml_dtypes for bfloat16 and float8)."""
    return np.dtype(_HOST[name])


def dtype_name(x) -> str:
    """The element type name of a CuPy array made here (uint8 arrays are float8 bytes: ask the test)."""
    return "bfloat16" if x.dtype == BF16 else np.dtype(x.dtype).name


def next_seed() -> int:
    _seed[0] += 1
    return 7000 + _seed[0]


def rng() -> np.random.Generator:
    """A host generator with a fresh seed (page tables, lengths, indices)."""
    return np.random.default_rng(next_seed())


def cast(x32, dtype: str):
    """A float32 CuPy array as `dtype` (float16 / bfloat16 / float32 on the GPU; float8 bytes via the host)."""
    if dtype == "bfloat16":
        b = cp.ascontiguousarray(x32, dtype=cp.float32).view(cp.uint32)
        b = (b + (0x7FFF + ((b >> 16) & 1))) >> 16  # round to nearest even (random inputs: no NaN)
        return b.astype(cp.uint16).view(BF16)
    if dtype in FP8:
        return cp.asarray(cp.asnumpy(x32).astype(_HOST[dtype]).view(np.uint8))
    return x32.astype(dtype)


def rand(shape, dtype: str = "bfloat16", scale: float = 1.0):
    """Fresh random normal values (never all zeros), a new seed per call."""
    g = cp.random.default_rng(next_seed())
    return cast(g.standard_normal(shape, dtype=cp.float32) * np.float32(scale), dtype)


def uniform(shape, lo: float = 0.0, hi: float = 1.0, dtype: str = "float32"):
    """Fresh uniform values in [lo, hi)."""
    g = cp.random.default_rng(next_seed())
    return cast(g.random(shape, dtype=cp.float32) * np.float32(hi - lo) + np.float32(lo), dtype)


def from_host(a: np.ndarray, dtype: str):
    """A host array (any float type) as a CuPy array of `dtype` (float8: its bytes)."""
    h = np.asarray(a, dtype=np.float32).astype(_HOST[dtype])
    return cp.asarray(h.view(np.uint8) if dtype in FP8 else h)


def empty(shape, dtype: str):
    return cp.empty(shape, dtype=np.uint8 if dtype in FP8 else host_dtype(dtype))


def nan_like(x):
    """An array like x (shape and dtype) filled with NaN: a kernel that skips an element fails the test."""
    if x.dtype == BF16:
        return cp.full(x.shape, 0x7FC0, dtype=cp.uint16).view(BF16)
    return cp.full(x.shape, np.nan, dtype=x.dtype)


def f64(x, dtype: str | None = None) -> np.ndarray:
    """A CuPy array (any layout) as a float64 numpy array. `dtype` names the float8 type of uint8 bytes."""
    if dtype in FP8:
        return cp.asnumpy(x).view(_HOST[dtype]).astype(np.float64)
    if x.dtype == BF16:
        bits = x.view(cp.uint16).astype(cp.uint32) << 16
        return cp.asnumpy(bits.view(cp.float32)).astype(np.float64)
    return cp.asnumpy(x).astype(np.float64)


# Appended for the attention / page tests (test_decode, test_prefill, test_cascade_wrappers, test_page):
# copies, gathers and comparisons go through bits(), so no CuPy kernel ever runs on a bfloat16 array.


def bits(x):
    """x's raw view for copies, gathers, scatters and bitwise compares: uint16 for bfloat16, else x itself
    (float16 / float32 / float8 bytes: CuPy copies those). Works on host (numpy) arrays too."""
    return x.view(np.uint16) if x.dtype == BF16 else x


def contiguous(x):
    """A C-contiguous copy of x (any dtype)."""
    return cp.ascontiguousarray(bits(x)).view(x.dtype)


def take(x, indices, axis: int = 0):
    """x[indices] along `axis` (any dtype), indices a host or device integer array."""
    return cp.take(bits(x), cp.asarray(indices), axis=axis).view(x.dtype)


def poison(x) -> None:
    """Fill x with NaN in place (x float; float8 bytes are not NaN-poisoned by this)."""
    if x.dtype == BF16:
        x.view(cp.uint16).fill(0x7FC0)
    else:
        x.fill(np.nan)


def f64_dev(x, dtype: str | None = None):
    """x (any layout) as a float64 CuPy array on its device (references computed on the GPU). `dtype`
    names the float8 type of uint8 bytes."""
    if dtype in FP8:
        table = cp.asarray(np.arange(256, dtype=np.uint8).view(_HOST[dtype]).astype(np.float64))
        return cp.take(table, x.astype(cp.int32))
    if x.dtype == BF16:
        return (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32).astype(cp.float64)
    return x.astype(cp.float64)


def to_torch(x, dtype: str):
    """A CuPy array (any layout) as a torch tensor of `dtype` on the same memory (DLPack; bfloat16 and
    float8 through integers of their size): the torch caller of an interop case."""
    import torch
    if x.size == 0:  # no DLPack for empty arrays (their data pointer may be null)
        return torch.empty_strided(x.shape, [s // x.itemsize for s in x.strides], dtype=getattr(torch, dtype),
                                   device="cuda")
    if dtype == "bfloat16":
        return torch.from_dlpack(x.view(cp.int16)).view(torch.bfloat16)
    if dtype in FP8:
        return torch.from_dlpack(x).view(getattr(torch, dtype))
    return torch.from_dlpack(x)


def capture(fn):
    """(graph, stream): fn() captured into a CUDA graph on a new non-blocking stream, after one warm-up
    call there (compiling and loading stay outside the capture). Capture needs a stream other than the
    legacy one, and a non-blocking stream does not wait for it: the device is synchronised before."""
    s = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with s:
        fn()
        s.begin_capture()
        try:
            fn()
        finally:
            graph = s.end_capture()
    s.synchronize()
    return graph, s


def replay(graph, s) -> None:
    """Launch a captured graph on its stream once the device's other work is done, and wait for it."""
    cp.cuda.Device().synchronize()
    graph.launch(s)
    s.synchronize()
