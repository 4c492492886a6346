"""bf16 GEMMs through cuBLAS, called with ctypes on a handle of our own: CuPy's cuBLAS bindings refuse
to run while a stream is being captured, and a decode step is captured into a CUDA graph. cuBLAS
itself supports capture; the handle gets a workspace of its own, so cuBLAS allocates nothing while
capturing."""
from __future__ import annotations

import ctypes
import importlib

import numpy as np

import cupy as cp

OP_N, OP_T = 0, 1
CUDA_R_32F, CUDA_R_16BF = 0, 14
COMPUTE_32F = 68
GEMM_DEFAULT = -1
POINTER_MODE_HOST = 0
WORKSPACE_BYTES = 32 << 20

_lib = None
_handles: dict = {}  # device -> (handle, workspace)
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _load():
    global _lib
    if _lib is None:
        importlib.import_module("cupy_backends.cuda.libs.cublas")  # CuPy finds libcublas (wheel or toolkit)
        from cuda.pathfinder import load_nvidia_dynamic_lib
        lib = ctypes.CDLL(load_nvidia_dynamic_lib("cublas").abs_path)
        vp, i = ctypes.c_void_p, ctypes.c_int
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetPointerMode_v2.argtypes = [vp, i]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
        _lib = lib
    return _lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLAS {what} failed with status {status}")


def _handle(device: int):
    got = _handles.get(device)
    if got is None:
        lib = _load()
        h = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(h)), "create")
        _check(lib.cublasSetPointerMode_v2(h, POINTER_MODE_HOST), "set pointer mode")
        ws = cp.empty(WORKSPACE_BYTES, dtype=cp.uint8)
        _check(lib.cublasSetWorkspace_v2(h, ws.data.ptr, WORKSPACE_BYTES), "set workspace")
        got = _handles[device] = (h, ws)
    return got[0]


def _cuda_type(dtype) -> int:
    if dtype.name == "bfloat16":
        return CUDA_R_16BF
    if dtype == np.float32:
        return CUDA_R_32F
    raise TypeError(f"gemm: dtype {dtype} is not supported (bfloat16 inputs; bfloat16 or float32 output)")


def gemm(x, w, out) -> None:
    """out (m, n) = x (m, k) @ w (n, k)^T on the current stream: bf16 inputs, fp32 accumulation, out bf16
    or float32. Rows may be strided; the last dims must be contiguous."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or out.shape != (m, n):
        raise ValueError(f"gemm: shapes {x.shape} @ {w.shape}^T -> {out.shape} do not agree")
    if m == 0:
        return
    lib = _load()
    h = _handle(x.device.id)
    _check(lib.cublasSetStream_v2(h, cp.cuda.get_current_stream().ptr), "set stream")
    # Row-major y = x w^T is column-major y^T = w^T' x': A = w read transposed, B = x.
    _check(lib.cublasGemmEx(h, OP_T, OP_N, n, m, k, ctypes.addressof(_ONE), w.data.ptr, _cuda_type(w.dtype),
                            w.strides[0] // w.itemsize, x.data.ptr, _cuda_type(x.dtype), x.strides[0] // x.itemsize,
                            ctypes.addressof(_ZERO), out.data.ptr, _cuda_type(out.dtype),
                            out.strides[0] // out.itemsize, COMPUTE_32F, GEMM_DEFAULT), "GemmEx")
