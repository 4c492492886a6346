"""Gated activations: silu_and_mul, gelu_and_mul, gelu_tanh_and_mul (cuda_src/activation.cu).

input (..., 2d) -> out (..., d): act(input[..., :d]) * input[..., d:]. Rows of the last dim (a stride
on the token axis is fine), float16 / bfloat16 / float32, arithmetic in float32.
"""
from __future__ import annotations

from ._core import checks, kernels
from ._core import dtypes as dt
from ._core.call import Call
from ._core.kernels import KernelSpec, Program, i32, i64, ptr

DTYPES = (dt.float16, dt.bfloat16, dt.float32)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
THREADS = 256
MAX_GRID_Y = 65535


def act_program(act: str, dtype: dt.DType, vec: int) -> Program:
    return Program("activation.cu", (KernelSpec("fic::act_and_mul_kernel", (dtype.cpp, vec, ACTIVATIONS[act])),))


def all_programs() -> list:
    return [act_program(a, d, v) for a in ACTIVATIONS for d in DTYPES for v in (8, 4, 2, 1) if v * d.itemsize <= 16]


def _act_and_mul(act: str, input, out, stream, enable_pdl=None):
    c = Call(input, stream, enable_pdl)
    x = c.arg(input, "input")
    checks.dtype_in(x, DTYPES)
    rows, x_stride = checks.rows_of(x)
    if x.shape[-1] % 2:
        raise ValueError(f"input: the last dim must be even (gate and up halves), got shape {x.shape}")
    d = x.shape[-1] // 2
    o_shape = x.shape[:-1] + (d,)
    out_obj, o = c.out(out, o_shape, x.dtype, "out", "(..., input.shape[-1] // 2)")
    _, o_stride = checks.rows_of(o)
    if rows and d:
        vec = checks.vector_width([x, o], d)
        fn = kernels.cached_function(c.device, ("act", act, x.dtype.name, vec), lambda: (
            act_program(act, x.dtype, vec), act_program(act, x.dtype, vec).kernels[0]))
        grid = (-(-(d // vec) // THREADS), min(rows, MAX_GRID_Y))
        c.launch(fn, grid, (THREADS,),
                 [ptr(x), i64(x_stride), ptr(o), i64(o_stride), i32(rows), i32(d)])
    return c.result(out_obj)


def silu_and_mul(input, out=None, enable_pdl=None, stream=None):
    """silu(input[..., :d]) * input[..., d:]"""
    return _act_and_mul("silu", input, out, stream, enable_pdl)


def gelu_and_mul(input, out=None, enable_pdl=None, stream=None):
    """gelu(input[..., :d]) * input[..., d:] with the exact (erf) GELU."""
    return _act_and_mul("gelu", input, out, stream, enable_pdl)


def gelu_tanh_and_mul(input, out=None, enable_pdl=None, stream=None):
    """gelu_tanh(input[..., :d]) * input[..., d:] with GELU's tanh approximation."""
    return _act_and_mul("gelu_tanh", input, out, stream, enable_pdl)
