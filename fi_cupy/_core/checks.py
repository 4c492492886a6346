"""Argument checks run before any launch. Each error names the argument, what it got and what is allowed."""
from __future__ import annotations

import math

import numpy as np

from . import dtypes as dt
from .arrays import ArrayInfo


def dtype_in(info: ArrayInfo, allowed, what: str = "") -> None:
    if info.dtype not in allowed:
        raise TypeError(f"{info.name}: dtype {info.dtype} is not supported{what}; "
                        f"expected {' or '.join(str(a) for a in allowed)}")


def dtype_is(info: ArrayInfo, expected: dt.DType, why: str) -> None:
    if info.dtype != expected:
        raise TypeError(f"{info.name}: dtype {info.dtype} does not match {why} ({expected})")


def ndim(info: ArrayInfo, n: int, layout: str) -> None:
    if info.ndim != n:
        raise ValueError(f"{info.name}: expected {n} dims {layout}, got shape {info.shape}")


def shape(info: ArrayInfo, expected: tuple, layout: str) -> None:
    """expected may hold None for dims that are free."""
    if len(info.shape) != len(expected) or any(e is not None and s != e for s, e in zip(info.shape, expected)):
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{info.name}: expected shape {exp} {layout}, got {info.shape}")


def same_device(*infos: ArrayInfo) -> int:
    infos = [i for i in infos if i is not None]
    devs = {i.device for i in infos}
    if len(devs) > 1:
        raise ValueError("all arrays must be on one CUDA device; got " +
                         ", ".join(f"{i.name} on cuda:{i.device}" for i in infos))
    return infos[0].device


def last_dim_contiguous(info: ArrayInfo) -> None:
    if info.ndim and info.shape[-1] > 1 and info.strides[-1] != 1:
        raise ValueError(f"{info.name}: the last dim must be contiguous (stride 1), got strides {info.strides}")


def contiguous(info: ArrayInfo) -> None:
    if not info.is_contiguous():
        raise ValueError(f"{info.name}: must be contiguous, got shape {info.shape} strides {info.strides}")


def no_overlap(info: ArrayInfo) -> None:
    """An array a kernel writes: no two elements may share an address (an expanded, stride-0 view
    would make the writes race). Sufficient test: sorted by stride, each dim steps past the extent
    of the dims inside it, which every slice or transpose of a non-overlapping array satisfies."""
    extent = 1
    for s, n in sorted(zip(info.strides, info.shape)):
        if n > 1:
            if s < extent and 0 not in info.shape:  # an empty array has nothing to write
                raise ValueError(f"{info.name}: is written, so its elements must not overlap; got shape "
                                 f"{info.shape} strides {info.strides} (an expanded or stride-0 view?); pass a "
                                 f"contiguous array")
            extent += s * (n - 1)


def pointer_aligned(info: ArrayInfo, nbytes: int) -> None:
    if info.size and info.ptr % nbytes:
        raise ValueError(f"{info.name}: data pointer must be {nbytes}-byte aligned (got address "
                         f"{info.ptr:#x}); pass a freshly allocated or contiguous array")


def vector_aligned(info: ArrayInfo, elems: int = 8) -> None:
    """Kernels move `elems` elements per access along the last dim: base and row strides must allow it.
    An empty array is never accessed: nothing to check (its strides are contiguous ones, arrays.py)."""
    if info.size == 0:
        return
    pointer_aligned(info, elems * info.dtype.itemsize)
    bad = [s for n, s in zip(info.shape[:-1], info.strides[:-1]) if n > 1 and s % elems]
    if bad:
        raise ValueError(f"{info.name}: strides must be multiples of {elems} elements for vector loads, "
                         f"got strides {info.strides}")


def head_dim(value: int, supported, arg: str = "head_dim") -> None:
    if value not in supported:
        raise ValueError(f"{arg}: {value} is not supported; supported head dims: "
                         f"{', '.join(str(s) for s in supported)}")


def heads(num_qo_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads <= 0 or num_qo_heads <= 0:
        raise ValueError(f"num_qo_heads and num_kv_heads must be positive, got {num_qo_heads}, {num_kv_heads}")
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")


def host_int_array(name: str, x, ndim: int = 1, keep: tuple = ()) -> np.ndarray:
    """An integer array of `ndim` dims as host int64 numpy (dtypes in `keep` as they are). Device arrays
    are copied to the host (a sync): callers document where that happens."""
    if isinstance(x, np.ndarray):
        a = x
    elif hasattr(x, "__dlpack_device__") and int(x.__dlpack_device__()[0]) != 1:
        a = _device_to_host(x, name)
    else:
        a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":  # np.issubdtype(a.dtype, np.integer), without its cost
        raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype}")
    return a if a.dtype in keep else a.astype(np.int64, copy=False)


_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def host_index_array(name: str, x) -> np.ndarray:
    """host_int_array for page indices, which are range-checked and copied but never computed with: int32
    stays int32 (plan() at batch 512 would otherwise convert 32K indices every step)."""
    return host_int_array(name, x, keep=_INDEX_DTYPES)


def _device_to_host(x, name: str) -> np.ndarray:
    """A device array read back on its framework's current stream (readback.download: one wait)."""
    from .call import Call
    from .readback import download
    from .streams import require_gpu
    require_gpu()
    c = Call(x, None, name=name)
    info = c.arg(x, name)
    dtype_in(info, (dt.int32, dt.int64, dt.int16, dt.uint16, dt.uint32))
    return download((info,), c.device, c.stream)[0]


def indptr(name: str, a: np.ndarray, length: int | None = None) -> None:
    if length is not None and a.size != length:
        raise ValueError(f"{name}: expected {length} entries (batch_size + 1), got {a.size}")
    if a.size == 0:
        raise ValueError(f"{name}: must have at least one entry")
    if a[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {a[0]}")
    down = a[1:] < a[:-1]  # slicing, not np.diff: plan() checks indptrs every step
    if down.any():
        i = int(down.argmax())
        raise ValueError(f"{name}: must be non-decreasing, but {name}[{i}]={a[i]} > {name}[{i + 1}]={a[i + 1]}")


def float_or_none(name: str, v):
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float or None, got {type(v).__name__}") from None


def float_arg(name: str, v) -> float:
    if v is None:
        raise TypeError(f"{name}: expected a float, got None")
    return float_or_none(name, v)


def int_arg(name: str, v) -> int:
    """A scalar integer argument (an int, or a one-element array: read on the host). Arrays of
    several values (per-row device values, which FlashInfer also takes) are not supported."""
    if isinstance(v, (bool, float, str)) or v is None:
        raise TypeError(f"{name}: expected an int, got {v!r}")
    try:
        return int(v)
    except (TypeError, ValueError, RuntimeError):
        if hasattr(v, "__dlpack__") or isinstance(v, np.ndarray):
            raise NotImplementedError(f"{name}: arrays of several values are not supported; pass an int") from None
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None


def vector_width(infos, length: int, max_bytes: int = 16) -> int:
    """Largest vector width (elements, a power of two, at most max_bytes of the first array's dtype)
    that divides `length` and every array's pointer and row strides, so each vector access is aligned."""
    infos = [i for i in infos if i is not None]
    item = infos[0].dtype.itemsize
    w = max_bytes // item
    while w > 1:
        if length % w == 0 and all(
                i.ptr % (w * i.dtype.itemsize) == 0 and
                all(s % w == 0 for n, s in zip(i.shape[:-1], i.strides[:-1]) if n > 1) for i in infos):
            return w
        w //= 2
    return 1


def rows_of(info: ArrayInfo, what: str = "") -> tuple:
    """(rows, row_stride) of an array read as rows of its last dim: the leading dims must collapse
    into one strided axis (a stride on the token axis is fine) and the last dim be contiguous."""
    last_dim_contiguous(info)
    if info.ndim == 0:
        raise ValueError(f"{info.name}: expected at least 1 dim{what}, got a scalar")
    lead = [(n, s) for n, s in zip(info.shape[:-1], info.strides[:-1]) if n != 1]
    rows = math.prod(info.shape[:-1])
    if not lead:
        return rows, info.shape[-1]
    for (n_outer, s_outer), (n_inner, s_inner) in zip(lead, lead[1:]):
        if s_outer != n_inner * s_inner:
            raise ValueError(f"{info.name}: its leading dims {info.shape[:-1]} with strides {info.strides[:-1]} "
                             f"do not form one strided row axis; make it contiguous")
    return rows, lead[-1][1]


def attention_options(head_dim: int, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta) -> tuple:
    """(window_left, soft cap (0 for none), sm_scale, rope_scale, rope_theta) with FlashInfer's defaults
    (1/sqrt(head_dim), 1, 1e4), checked: shared by decode and prefill."""
    if not isinstance(window_left, (int, np.integer)):
        raise TypeError(f"window_left: expected an int (-1 for no window), got {window_left!r}")
    cap = float_or_none("logits_soft_cap", logits_soft_cap) or 0.0
    if cap < 0:
        raise ValueError(f"logits_soft_cap: must be > 0 (or None/0 for none), got {cap}")
    sm = float_or_none("sm_scale", sm_scale)
    rs = float_or_none("rope_scale", rope_scale)
    rt = float_or_none("rope_theta", rope_theta)
    if rs is not None and rs <= 0 or rt is not None and rt <= 0:
        raise ValueError(f"rope_scale and rope_theta must be positive, got {rope_scale}, {rope_theta}")
    return (int(window_left), cap, 1.0 / math.sqrt(head_dim) if sm is None else sm, 1.0 if rs is None else rs,
            1e4 if rt is None else rt)


def alibi_without_soft_cap(pos_encoding_mode: str, soft_cap: float) -> None:
    """ALiBi with a logits soft cap: FlashInfer scales such logits by sm_scale twice; we do not copy that."""
    if pos_encoding_mode == "ALIBI" and soft_cap > 0:
        raise NotImplementedError(f"logits_soft_cap: {soft_cap} with pos_encoding_mode \"ALIBI\" is not supported "
                                  "(leave it None, or use another pos_encoding_mode)")


def unsupported(name: str, value, neutral=(None,)) -> None:
    """A FlashInfer argument we accept but cannot honour: NotImplementedError unless it has one of its
    neutral values (the default, or one that asks for nothing)."""
    if value is neutral[0]:  # the default, as nearly every call passes it: plan() checks several a step
        return
    if not any(value is n or (n is not None and not hasattr(value, "__dlpack__") and value == n) for n in neutral):
        shown = type(value).__name__ if hasattr(value, "__dlpack__") else repr(value)
        raise NotImplementedError(f"{name}: {shown} is not supported (only {' or '.join(map(repr, neutral))})")


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return bool(value)
