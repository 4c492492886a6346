"""fi_cupy: FlashInfer-style LLM serving kernels compiled at run time with NVRTC through CuPy.

No PyTorch and no nvcc needed: arrays come in and go out through DLPack (torch, JAX, CuPy), kernels
are compiled for the GPU at first use and cached on disk.
"""
__version__ = "0.1.0"

try:
    import cupy  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised only without CuPy (tests/test_messages.py)
    _what = ("fi_cupy needs CuPy" if _e.name == "cupy" else f"CuPy could not be imported ({_e})")
    raise ImportError(
        f"{_what}. Install it with the extra for your CUDA driver (`nvidia-smi` prints its 'CUDA Version': "
        "13.x -> cuda13, 12.x -> cuda12), which also brings NVRTC and the CUDA headers.\n"
        "  from a source checkout (the folder with pyproject.toml): pip install '.[cuda13]'  (or '.[cuda12]')\n"
        "  from a package index, once fi_cupy is published there:   pip install 'fi_cupy[cuda13]'  "
        "(or 'fi_cupy[cuda12]')"
    ) from _e

from ._core.compile import CudaEnvironmentError, KernelCompileError  # noqa: E402
from . import activation, cascade, norm, page, rope, sampling  # noqa: E402
from .activation import gelu_and_mul, gelu_tanh_and_mul, silu_and_mul  # noqa: E402
from .cascade import (  # noqa: E402
    BatchDecodeWithSharedPrefixPagedKVCacheWrapper, BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
    MultiLevelCascadeAttentionWrapper, merge_state, merge_state_in_place, merge_states)
from .decode import (  # noqa: E402
    BatchDecodeWithPagedKVCacheWrapper, CUDAGraphBatchDecodeWithPagedKVCacheWrapper, fast_decode_plan,
    get_batch_decode_jit_module, single_decode_with_kv_cache, single_decode_with_kv_cache_with_jit_module)
from .quantization import packbits, segment_packbits  # noqa: E402
from .mla import BatchMLAPagedAttentionWrapper, append_paged_mla_kv_cache  # noqa: E402
from .prefill import (  # noqa: E402
    BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper, get_batch_prefill_jit_module,
    single_prefill_with_kv_cache, single_prefill_with_kv_cache_with_jit_module)
from .variant import AttentionVariant  # noqa: E402
from . import jit  # noqa: E402
from .norm import fused_add_rmsnorm, gemma_fused_add_rmsnorm, gemma_rmsnorm, layernorm, rmsnorm  # noqa: E402
from .page import append_paged_kv_cache, get_batch_indices_positions, get_seq_lens  # noqa: E402
from .sampling import (  # noqa: E402
    chain_speculative_sampling, min_p_sampling_from_probs, sampling_from_logits, sampling_from_probs, softmax,
    top_k_mask_logits, top_k_renorm_probs, top_k_sampling_from_probs, top_k_top_p_sampling_from_logits,
    top_k_top_p_sampling_from_probs, top_p_renorm_probs, top_p_sampling_from_probs)
from .rope import (  # noqa: E402
    apply_llama31_rope, apply_llama31_rope_inplace, apply_llama31_rope_pos_ids, apply_llama31_rope_pos_ids_inplace,
    apply_rope, apply_rope_inplace, apply_rope_pos_ids, apply_rope_pos_ids_inplace, apply_rope_with_cos_sin_cache,
    apply_rope_with_cos_sin_cache_inplace)

__all__ = [
    "__version__",
    "BatchDecodeWithPagedKVCacheWrapper", "CUDAGraphBatchDecodeWithPagedKVCacheWrapper", "fast_decode_plan",
    "single_decode_with_kv_cache", "single_decode_with_kv_cache_with_jit_module", "get_batch_decode_jit_module",
    "BatchPrefillWithPagedKVCacheWrapper", "BatchPrefillWithRaggedKVCacheWrapper", "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_with_jit_module", "get_batch_prefill_jit_module", "AttentionVariant",
    "BatchMLAPagedAttentionWrapper", "append_paged_mla_kv_cache",
    "packbits", "segment_packbits",
    "rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm", "layernorm",
    "silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul",
    "apply_rope", "apply_rope_inplace", "apply_rope_pos_ids", "apply_rope_pos_ids_inplace",
    "apply_llama31_rope", "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace", "apply_rope_with_cos_sin_cache", "apply_rope_with_cos_sin_cache_inplace",
    "append_paged_kv_cache", "get_batch_indices_positions", "get_seq_lens",
    "merge_state", "merge_state_in_place", "merge_states",
    "MultiLevelCascadeAttentionWrapper", "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
    "softmax", "sampling_from_probs", "sampling_from_logits", "top_p_sampling_from_probs",
    "top_k_sampling_from_probs", "min_p_sampling_from_probs", "top_k_top_p_sampling_from_probs",
    "top_k_top_p_sampling_from_logits", "top_p_renorm_probs", "top_k_renorm_probs", "top_k_mask_logits",
    "chain_speculative_sampling",
    "KernelCompileError",
    "CudaEnvironmentError",
]
