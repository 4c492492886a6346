"""Gated activations: silu_and_mul, gelu_and_mul, gelu_tanh_and_mul (cuda_src/activation.cu).

input (..., 2d) -> out (..., d): act(input[..., :d]) * input[..., d:]. Rows of the last dim (a stride
on the token axis is fine), float16 / bfloat16 / float32, arithmetic in float32.
"""
from __future__ import annotations

from ._core import checks, kernels
from ._core import dtypes as dt
from ._core.call import Call
from ._core.docs import KERNEL_GLOSSARY, document
from ._core.fastpath import Signatures
from ._core.kernels import KernelSpec, Program, i32, i64, ptr

DTYPES = (dt.float16, dt.bfloat16, dt.float32)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
THREADS = 256
MAX_GRID_Y = 65535


def act_program(act: str, dtype: dt.DType, vec: int) -> Program:
    return Program("activation.cu", (KernelSpec("fic::act_and_mul_kernel", (dtype.cpp, vec, ACTIVATIONS[act])),))


def all_programs() -> list:
    return [act_program(a, d, v) for a in ACTIVATIONS for d in DTYPES for v in (8, 4, 2, 1) if v * d.itemsize <= 16]


_SIGS = Signatures()  # recorded calls by signature: an eager call of a known signature only launches


def _act_and_mul(act: str, input, out, stream, enable_pdl=None):
    return _SIGS((input, out), (act, enable_pdl), stream, lambda: _act_call(act, input, out, stream, enable_pdl))


def _act_call(act: str, input, out, stream, enable_pdl=None):
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


# Each parameter's entry, once for the module (docs.document writes the Parameters sections).
_PARAMS = {**KERNEL_GLOSSARY,
           "input": ("array\n"
                     "    ``(..., 2 * d)``, float16, bfloat16 or float32, on a CUDA device (torch, JAX, CuPy or any\n"
                     "    DLPack producer). The last dim must be contiguous and even; the leading dims may have any\n"
                     "    strides that collapse into one strided row axis (e.g. a stride on the token axis)."),
           "out": ("array, optional\n"
                   "    Where to write the result: ``(..., d)`` in input's dtype, last dim contiguous, its leading\n"
                   "    dims one strided row axis, no two elements sharing memory. Not a JAX array (immutable).\n"
                   "    None: a new array."),
           "stream": ("int, stream object or None, default None\n"
                      "    The CUDA stream to launch on: a ``cudaStream_t`` handle, a torch or CuPy stream, or any\n"
                      "    object with ``__cuda_stream__``. None: the current stream of the caller's framework\n"
                      "    (CuPy's for JAX).")}

_GATED = ("array\n"
          "    ``(..., d)`` in input's dtype: ``out`` when given, else a new array of the caller's framework.")


@document("Fused SiLU and multiply, the gated MLP activation of Llama-style models.", returns=_GATED,
          glossary=_PARAMS,
          notes=("``silu(x) = x * sigmoid(x)``. Arithmetic in float32, rounded once to the output dtype. ``stream``\n"
                 "is fi_cupy's addition to FlashInfer's signature."))
def silu_and_mul(input, out=None, enable_pdl=None, stream=None):
    """``out = silu(input[..., :d]) * input[..., d:]`` with ``d = input.shape[-1] // 2``: the first half of
    the last dim is the gate, the second half the up projection (FlashInfer's layout, as a fused gate_up
    GEMM writes it).
    """
    return _act_and_mul("silu", input, out, stream, enable_pdl)


@document("Fused GELU (exact, erf form) and multiply.", returns=_GATED, glossary=_PARAMS,
          notes=("``gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2)))``. Arithmetic in float32, rounded once to the output\n"
                 "dtype. ``stream`` is fi_cupy's addition to FlashInfer's signature."))
def gelu_and_mul(input, out=None, enable_pdl=None, stream=None):
    """``out = gelu(input[..., :d]) * input[..., d:]`` with ``d = input.shape[-1] // 2``: the first half of
    the last dim is the gate, the second half the up projection (FlashInfer's layout, as a fused gate_up
    GEMM writes it).
    """
    return _act_and_mul("gelu", input, out, stream, enable_pdl)


@document("Fused GELU (tanh approximation) and multiply, as Gemma's MLP uses it.", returns=_GATED, glossary=_PARAMS,
          notes=("``gelu_tanh(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``. Arithmetic in\n"
                 "float32, rounded once to the output dtype. ``stream`` is fi_cupy's addition to FlashInfer's\n"
                 "signature."))
def gelu_tanh_and_mul(input, out=None, enable_pdl=None, stream=None):
    """``out = gelu_tanh(input[..., :d]) * input[..., d:]`` with ``d = input.shape[-1] // 2``: the first half of
    the last dim is the gate, the second half the up projection (FlashInfer's layout, as a fused gate_up
    GEMM writes it).
    """
    return _act_and_mul("gelu_tanh", input, out, stream, enable_pdl)
