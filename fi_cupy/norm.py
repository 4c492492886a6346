"""Norms: rmsnorm, fused_add_rmsnorm, gemma_rmsnorm, gemma_fused_add_rmsnorm, layernorm
(cuda_src/norm.cu). FlashInfer's names, arguments and defaults.

Inputs are rows of the last dim (any leading shape that forms one strided row axis, e.g. a stride on
the token axis); the last dim must be contiguous. Dtypes float16, bfloat16, float32; weight in the
input dtype or float32. The fused functions update `input` and `residual` in place and return None,
except for JAX callers (immutable arrays), who get the new `(input, residual)` back.
"""
from __future__ import annotations

from ._core import checks, kernels
from ._core import dtypes as dt
from ._core.call import Call
from ._core.kernels import KernelSpec, Program, f32, i32, i64, ptr

DTYPES = (dt.float16, dt.bfloat16, dt.float32)
MODES = {"rms": 0, "gemma": 1, "layer": 2}
ITEMS = (1, 2, 4, 8)          # vectors a thread holds in registers; 0 = long-row fallback
REG_TEAM = 512                # most threads of a register-held row (launch bounds in norm.cu)
LOOP_TEAM = 1024              # threads of a row too long for registers
ROW_THREADS = 128             # threads of a CTA when rows are short (several rows a CTA)


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


def _widths(d: dt.DType) -> tuple:
    return tuple(w for w in (8, 4, 2, 1) if w * d.itemsize <= 16)


def _norm(mode: str, input, weight, bias, eps, out, residual, stream, enable_pdl=None):
    c = Call(input, stream, enable_pdl)
    x = c.arg(input, "input")
    checks.dtype_in(x, DTYPES)
    rows, x_stride = checks.rows_of(x)
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
        _, r_stride = checks.rows_of(r)
        if c.writable(x) and c.writable(r):
            checks.no_overlap(x)
            checks.no_overlap(r)
            out_obj, o, r_out_obj, ro = input, x, residual, r
        else:  # immutable (JAX): new arrays for both results
            out_obj, o = c.new(x.shape, x.dtype, "input")
            r_out_obj, ro = c.new(x.shape, x.dtype, "residual")
    else:
        out_obj, o = c.out(out, x.shape, x.dtype, "out", "matching input")
        r_stride, r_out_obj, ro = 0, None, None
    _, o_stride = checks.rows_of(o)
    _, ro_stride = checks.rows_of(ro) if ro is not None else (0, 0)
    if rows and hidden:
        vec = checks.vector_width([x, w, b, r, o, ro], hidden)
        items, team, rpc = launch_shape(hidden, vec)
        add = r is not None

        def build():
            prog = norm_program(x.dtype, w.dtype, vec, mode, add)
            return prog, prog.kernels[((0,) + ITEMS).index(items)]
        fn = kernels.cached_function(c.device, ("norm", x.dtype.name, w.dtype.name, vec, mode, add, items), build)
        c.launch(fn, (-(-rows // rpc),), (team, rpc), [
            ptr(x), i64(x_stride), ptr(r), i64(r_stride), ptr(ro), i64(ro_stride), ptr(w), ptr(b),
            ptr(o), i64(o_stride), i32(rows), i32(hidden), f32(eps)])
    if residual is None:
        return c.result(out_obj)
    if out_obj is input:
        c.result()
        return None
    return c.result(out_obj, r_out_obj)


def rmsnorm(input, weight, eps: float = 1e-6, out=None, enable_pdl=None, stream=None):
    """out = input * rsqrt(mean(input^2) + eps) * weight, per row of the last dim."""
    return _norm("rms", input, weight, None, eps, out, None, stream, enable_pdl)


def fused_add_rmsnorm(input, residual, weight, eps: float = 1e-6, enable_pdl=None, stream=None):
    """residual += input (rounded to its dtype); input = rmsnorm(residual) * weight, in place.
    Returns None; JAX callers get the new (input, residual)."""
    return _norm("rms", input, weight, None, eps, None, residual, stream, enable_pdl)


def gemma_rmsnorm(input, weight, eps: float = 1e-6, out=None, enable_pdl=None, stream=None):
    """Gemma's RMSNorm: input * rsqrt(mean(input^2) + eps) * (1 + weight)."""
    return _norm("gemma", input, weight, None, eps, out, None, stream, enable_pdl)


def gemma_fused_add_rmsnorm(input, residual, weight, eps: float = 1e-6, enable_pdl=None, stream=None):
    """residual += input; input = gemma_rmsnorm(residual), in place (JAX: returns the new pair)."""
    return _norm("gemma", input, weight, None, eps, None, residual, stream, enable_pdl)


def layernorm(input, gemma, beta, eps: float = 1e-6, stream=None):
    """(input - mean) * rsqrt(var + eps) * gemma + beta, per row (biased variance, as torch)."""
    return _norm("layer", input, gemma, beta, eps, None, None, stream)
