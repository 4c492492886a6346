"""fi_cupy: FlashInfer-style LLM serving kernels compiled at run time with NVRTC through CuPy.

No PyTorch and no nvcc needed: arrays come in and go out through DLPack (torch, JAX, CuPy), kernels
are compiled for the GPU at first use and cached on disk.
"""
__version__ = "0.1.0"

try:
    import cupy  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised only without CuPy
    raise ImportError(
        "fi_cupy needs CuPy. Install it with the extra matching your CUDA driver: "
        "pip install 'fi_cupy[cuda13]' (CUDA 13.x) or 'fi_cupy[cuda12]' (CUDA 12.x)."
    ) from _e

from ._core.compile import CudaEnvironmentError, KernelCompileError  # noqa: E402
from .decode import BatchDecodeWithPagedKVCacheWrapper, single_decode_with_kv_cache  # noqa: E402

__all__ = [
    "__version__",
    "BatchDecodeWithPagedKVCacheWrapper",
    "single_decode_with_kv_cache",
    "KernelCompileError",
    "CudaEnvironmentError",
]
