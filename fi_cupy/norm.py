"""Norms: rmsnorm, fused_add_rmsnorm, gemma_rmsnorm, gemma_fused_add_rmsnorm, layernorm
(cuda_src/norm.cu). FlashInfer's names, arguments and defaults.

Inputs are rows of the last dim, which must be contiguous. The leading dims may have any strides that
collapse into at most two row axes (see row_layout): a stride on the token axis, or a 3-D per-head view
(tokens, heads, head_dim) sliced out of a fused qkv buffer, as Qwen3 / Gemma 3 normalise q and k
(FlashInfer's rmsnorm on 3-D input). The output has the input's shape; `out` may be the input itself
(in place) or another view with strides of its own. Dtypes float16, bfloat16, float32; weight in the
input dtype or float32. The fused functions update `input` and `residual` in place and return None,
except for JAX callers (immutable arrays), who get the new `(input, residual)` back.
"""
from __future__ import annotations

import math

from ._core import checks, kernels
from ._core import dtypes as dt
from ._core.call import Call
from ._core.docs import KERNEL_GLOSSARY, document
from ._core.fastpath import Signatures
from ._core.fastdiv import fastdiv_params
from ._core.kernels import KernelSpec, Program, f32, i32, i64, ptr, u32

DTYPES = (dt.float16, dt.bfloat16, dt.float32)
MODES = {"rms": 0, "gemma": 1, "layer": 2}
ITEMS = (1, 2, 4, 8)          # vectors a thread holds in registers; 0 = long-row fallback
REG_TEAM = 512                # most threads of a register-held row (launch bounds in norm.cu)
LOOP_TEAM = 1024              # threads of a row too long for registers
ROW_THREADS = 128             # threads of a CTA when rows are short (several rows a CTA)
MAX_ROWS = 2 ** 31 - 1        # the kernel counts rows in int (and FastDiv is exact below 2^31)


def norm_program(dtype: dt.DType, wdtype: dt.DType, vec: int, mode: str, add: bool) -> Program:
    """One NVRTC program: every ITEMS variant of (dtype, weight dtype, vector width, mode, add)."""
    return Program("norm.cu", tuple(
        KernelSpec("fic::norm_kernel", (dtype.cpp, wdtype.cpp, vec, items, MODES[mode], kernels.cpp_bool(add)))
        for items in (0,) + ITEMS))


def launch_shape(hidden: int, vec: int) -> tuple:
    """(items, threads per row, rows per CTA) for rows of `hidden` elements in vectors of `vec`."""
    nvec = hidden // vec
    items = next((k for k in ITEMS if nvec <= k * REG_TEAM), 0)
    team = LOOP_TEAM if items == 0 else max(32, (-(-nvec // items) + 31) // 32 * 32)
    return items, team, max(1, ROW_THREADS // team)


def all_programs() -> list:
    out = []
    for d in DTYPES:
        for w in dict.fromkeys((d, dt.float32)):
            for vec in _widths(d):
                for mode, add in (("rms", False), ("rms", True), ("gemma", False), ("gemma", True), ("layer", False)):
                    out.append(norm_program(d, w, vec, mode, add))
    return out


def row_layout(infos) -> tuple:
    """How the kernel addresses the rows (of the last dim) of arrays of one shape: (rows, heads,
    strides), row r of infos[k] at (r // heads) * s0 + (r % heads) * s1 for (s0, s1) = strides[k]
    ((0, 0) for None). The leading dims collapse where every array allows it (size-1 dims drop; a dim
    merges into the next when its stride is the next one's stride times that one's size) into at most
    two axes, tokens and heads; heads is 1 when one axis remains, the plain 2-D path."""
    live = [i for i in infos if i is not None]
    shape = live[0].shape
    for i in live:
        if i.ndim == 0:
            raise ValueError(f"{i.name}: expected at least 1 dim (rows of the last dim), got a scalar")
        checks.last_dim_contiguous(i)
    rows = math.prod(shape[:-1])
    if rows == 0:  # nothing to address: producers give empty arrays arbitrary strides
        return 0, 1, [(0, 0)] * len(infos)
    if rows > MAX_ROWS:
        raise ValueError(f"{live[0].name}: {rows} rows (leading dims {shape[:-1]}) exceed the {MAX_ROWS} supported")
    axes = _row_axes(shape, live)
    if len(axes) > 2:
        for i in live:  # name an array that cannot be read this way alone, else one that cannot with input
            if len(_row_axes(shape, [i])) > 2:
                raise ValueError(f"{i.name}: its leading dims {shape[:-1]} with strides {i.strides[:-1]} do not "
                                 f"collapse into at most two strided row axes (tokens, heads); make it contiguous")
        i = next((i for i in live[1:] if len(_row_axes(shape, [live[0], i])) > 2), live[-1])
        raise ValueError(f"{i.name}: its strides {i.strides[:-1]} and {live[0].name}'s {live[0].strides[:-1]} over "
                         f"leading dims {shape[:-1]} do not collapse together into at most two strided row axes "
                         f"(tokens, heads); make {i.name} contiguous or give it {live[0].name}'s strides")
    none = [0] * len(live)
    if len(axes) == 2:
        (_, s0), (heads, s1) = axes
    else:  # one row axis (s1 unused) or a single row
        heads, s0, s1 = 1, axes[0][1] if axes else none, none
    it = iter(zip(s0, s1))
    return rows, heads, [(0, 0) if i is None else next(it) for i in infos]


def _row_axes(shape: tuple, infos) -> list:
    """[(size, [stride of each info])] of the leading dims of `shape` after collapsing (row_layout)."""
    axes = []
    for d, n in enumerate(shape[:-1]):
        if n == 1:
            continue
        strides = [i.strides[d] for i in infos]
        if axes and all(so == n * s for so, s in zip(axes[-1][1], strides)):
            axes[-1] = (axes[-1][0] * n, strides)
        else:
            axes.append((n, strides))
    return axes


def _widths(d: dt.DType) -> tuple:
    return tuple(w for w in (8, 4, 2, 1) if w * d.itemsize <= 16)


_SIGS = Signatures()  # recorded calls by signature: an eager call of a known signature only launches


def _norm(mode: str, input, weight, bias, eps, out, residual, stream, enable_pdl=None):
    return _SIGS((input, weight, bias, residual, out), (mode, eps, enable_pdl), stream,
                 lambda: _norm_call(mode, input, weight, bias, eps, out, residual, stream, enable_pdl))


def _norm_call(mode: str, input, weight, bias, eps, out, residual, stream, enable_pdl=None):
    c = Call(input, stream, enable_pdl)
    x = c.arg(input, "input")
    checks.dtype_in(x, DTYPES)
    row_layout([x])  # input's own layout first, so its errors come before those of other arguments
    hidden = x.shape[-1]
    w = c.arg(weight, "weight" if mode != "layer" else "gemma")
    checks.dtype_in(w, dict.fromkeys((x.dtype, dt.float32)), f" with input {x.dtype}")
    checks.shape(w, (hidden,), "(hidden_size,) matching input's last dim")
    checks.last_dim_contiguous(w)
    b = None
    if mode == "layer":
        b = c.arg(bias, "beta")
        checks.dtype_is(b, w.dtype, "gemma's dtype")
        checks.shape(b, (hidden,), "(hidden_size,) matching input's last dim")
        checks.last_dim_contiguous(b)
    eps = checks.float_arg("eps", eps)
    r = None
    if residual is not None:
        r = c.arg(residual, "residual")
        checks.dtype_is(r, x.dtype, "input's dtype")
        checks.shape(r, x.shape, "matching input")
        if c.writable(x) and c.writable(r):
            checks.no_overlap(x)
            checks.no_overlap(r)
            out_obj, o, r_out_obj, ro = input, x, residual, r
        else:  # immutable (JAX): new arrays for both results
            out_obj, o = c.new(x.shape, x.dtype, "input")
            r_out_obj, ro = c.new(x.shape, x.dtype, "residual")
    else:
        # out may be input itself (in place): each thread writes only what it has read (norm.cu)
        out_obj, o = c.out(out, x.shape, x.dtype, "out", "matching input")
        r_out_obj, ro = None, None
    rows, heads, strides = row_layout([x, r, ro, o])
    if rows and hidden:
        vec = checks.vector_width([x, w, b, r, o, ro], hidden)
        items, team, rpc = launch_shape(hidden, vec)
        add = r is not None

        def build():
            prog = norm_program(x.dtype, w.dtype, vec, mode, add)
            return prog, prog.kernels[((0,) + ITEMS).index(items)]
        fn = kernels.cached_function(c.device, ("norm", x.dtype.name, w.dtype.name, vec, mode, add, items), build)
        _, mul, shift = fastdiv_params(heads)
        (xs0, xs1), (rs0, rs1), (ros0, ros1), (os0, os1) = strides
        c.launch(fn, (-(-rows // rpc),), (team, rpc), [
            ptr(x), i64(xs0), i64(xs1), ptr(r), i64(rs0), i64(rs1), ptr(ro), i64(ros0), i64(ros1), ptr(w), ptr(b),
            ptr(o), i64(os0), i64(os1), i32(rows), u32(heads), u32(mul), u32(shift), i32(hidden), f32(eps)])
    if residual is None:
        return c.result(out_obj)
    if out_obj is input:
        c.result()
        return None
    return c.result(out_obj, r_out_obj)


# Each parameter's entry, once for the module (docs.document writes the Parameters sections).
_PARAMS = {**KERNEL_GLOSSARY,
           "input": ("array\n"
                     "    ``(..., hidden_size)``, e.g. ``(batch_size, hidden_size)`` or a per-head ``(num_tokens,\n"
                     "    num_heads, head_dim)``; float16, bfloat16 or float32, on a CUDA device (torch, JAX, CuPy\n"
                     "    or any DLPack producer). Each row of the last dim is normalised on its own. The last dim\n"
                     "    must be contiguous; the leading dims may have any strides that collapse into at most two\n"
                     "    strided row axes (a stride on the token axis, or a per-head view of q or k sliced out of\n"
                     "    a fused qkv buffer)."),
           "weight": ("array\n"
                      "    ``(hidden_size,)``, the scale, multiplied into the normalised row; in input's dtype or\n"
                      "    float32, contiguous."),
           "eps": ("float, default 1e-6\n"
                   "    Added to the mean square before the reciprocal square root."),
           "out": ("array, optional\n"
                   "    Where to write the result: input's shape and dtype, last dim contiguous. It may be\n"
                   "    ``input`` itself (in place) or another view with strides of its own, provided its leading\n"
                   "    dims collapse together with input's into at most two strided row axes. Not a JAX array\n"
                   "    (immutable). None: a new array."),
           "residual": ("array\n"
                        "    The residual stream, input's shape and dtype (strides of its own, collapsing together\n"
                        "    with input's into at most two row axes). Updated in place to ``residual + input``,\n"
                        "    rounded to its dtype."),
           "gemma": ("array\n"
                     "    ``(hidden_size,)``, the scale (FlashInfer's name for gamma); in input's dtype or float32,\n"
                     "    contiguous."),
           "beta": ("array\n"
                    "    ``(hidden_size,)``, the shift, in gemma's dtype, contiguous.")}

_NORMED = ("array\n"
           "    input's shape and dtype: ``out`` when given (``input`` itself for ``out=input``), else a new array\n"
           "    of the caller's framework.")

_FUSED_ADD_RETURNS = ("None or tuple of array\n"
                      "    None: ``input`` and ``residual`` were written in place. JAX callers (immutable arrays)\n"
                      "    get ``(normed, new_residual)`` instead: new arrays of input's shape and dtype, the\n"
                      "    inputs untouched.")

_IN_PLACE_INPUT = {"input": ("array\n"
                             "    ``(..., hidden_size)``, e.g. ``(batch_size, hidden_size)`` or a per-head\n"
                             "    ``(num_tokens, num_heads, head_dim)``; float16, bfloat16 or float32, on a CUDA\n"
                             "    device (torch, JAX, CuPy or any DLPack producer). Each row of the last dim is\n"
                             "    normalised on its own, and input is overwritten with the result. The last dim\n"
                             "    must be contiguous; the leading dims may have any strides that collapse into at\n"
                             "    most two strided row axes (a stride on the token axis, or a per-head view of q or\n"
                             "    k sliced out of a fused qkv buffer).")}

_GEMMA_WEIGHT = {"weight": ("array\n"
                            "    ``(hidden_size,)``, the scale, applied as ``1 + weight`` (Gemma stores the offset\n"
                            "    from 1); in input's dtype or float32, contiguous.")}


@document("Root mean square normalisation (Llama's RMSNorm), row by row.", returns=_NORMED, glossary=_PARAMS,
          notes=("Arithmetic in float32 (the mean square included), rounded once to input's dtype. fi_cupy also\n"
                 "takes input with two strided row axes (Qwen3-style qk-norm on per-head views of a fused qkv\n"
                 "buffer, in place with ``out=input``), any hidden size, JAX arrays (``out`` aside) and ``stream``."))
def rmsnorm(input, weight, eps: float = 1e-6, out=None, enable_pdl=None, stream=None):
    """``out = input / sqrt(mean(input**2, axis=-1) + eps) * weight``."""
    return _norm("rms", input, weight, None, eps, out, None, stream, enable_pdl)


@document("Fused residual add and RMSNorm, in place: ``residual += input; input = rmsnorm(residual)``.",
          returns=_FUSED_ADD_RETURNS, glossary=_PARAMS, params=_IN_PLACE_INPUT,
          notes=("Arithmetic in float32. ``input`` and ``residual`` are written, so neither may have elements that\n"
                 "share memory (an expanded view). ``stream`` is fi_cupy's addition; the JAX return is fi_cupy's\n"
                 "(FlashInfer takes torch tensors only)."))
def fused_add_rmsnorm(input, residual, weight, eps: float = 1e-6, enable_pdl=None, stream=None):
    """The sum is rounded to residual's dtype and that stored value is normalised, as model code that keeps
    the residual stream in the activation dtype does.
    """
    return _norm("rms", input, weight, None, eps, None, residual, stream, enable_pdl)


@document("Gemma's RMSNorm, row by row: the weight is applied as ``1 + weight``.", returns=_NORMED, glossary=_PARAMS,
          params=_GEMMA_WEIGHT,
          notes=("Arithmetic in float32, ``1 + weight`` included, rounded once to input's dtype. fi_cupy also takes\n"
                 "input with two strided row axes (Gemma 3's qk-norm on per-head views, in place with\n"
                 "``out=input``), any hidden size, JAX arrays (``out`` aside) and ``stream``."))
def gemma_rmsnorm(input, weight, eps: float = 1e-6, out=None, enable_pdl=None, stream=None):
    """``out = input / sqrt(mean(input**2, axis=-1) + eps) * (1 + weight)``."""
    return _norm("gemma", input, weight, None, eps, out, None, stream, enable_pdl)


@document("Fused residual add and Gemma RMSNorm, in place: ``residual += input; input = norm(residual)``.",
          returns=_FUSED_ADD_RETURNS, glossary=_PARAMS, params={**_IN_PLACE_INPUT, **_GEMMA_WEIGHT},
          notes=("Arithmetic in float32. ``input`` and ``residual`` are written, so neither may have elements that\n"
                 "share memory. ``stream`` is fi_cupy's addition; the JAX return is fi_cupy's."))
def gemma_fused_add_rmsnorm(input, residual, weight, eps: float = 1e-6, enable_pdl=None, stream=None):
    """``norm`` is gemma_rmsnorm (the weight applied as ``1 + weight``). The sum is rounded to residual's
    dtype and that stored value is normalised.
    """
    return _norm("gemma", input, weight, None, eps, None, residual, stream, enable_pdl)


@document("Layer normalisation, row by row: ``(input - mean) / sqrt(var + eps) * gemma + beta``.",
          returns=("array\n"
                   "    A new array of input's shape and dtype, in the caller's framework."), glossary=_PARAMS,
          params={"eps": ("float, default 1e-6\n"
                          "    Added to the variance before the reciprocal square root.")},
          notes=("Arithmetic in float32: the mean first, then the variance of the differences from it (two passes,\n"
                 "not ``E[x**2] - mean**2``), rounded once to input's dtype. FlashInfer's layernorm takes bfloat16\n"
                 "input with float32 gemma / beta; here float16, bfloat16 or float32 input, gemma / beta in its\n"
                 "dtype or float32, and ``stream``."))
def layernorm(input, gemma, beta, eps: float = 1e-6, stream=None):
    """``var`` is the biased variance (divided by hidden_size), as ``torch.nn.LayerNorm`` computes it."""
    return _norm("layer", input, gemma, beta, eps, None, None, stream)
