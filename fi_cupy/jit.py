"""FlashInfer's flashinfer.jit module makers for custom attention variants (fi_cupy/variant.py): the
same arguments, a module that single_prefill_with_kv_cache_with_jit_module /
single_decode_with_kv_cache_with_jit_module (or a wrapper's jit_args) take. Nothing needs nvcc:
build_and_load() returns at once and the kernel is compiled with NVRTC at its first call."""
from __future__ import annotations

from .variant import JitModule, _flags, _variant


def gen_customize_single_prefill_module(backend, uri, dtype_q, dtype_kv, dtype_o, head_dim_qk, head_dim_vo,
                                        additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                                        additional_scalar_dtypes, variant_name, variant_decl, pos_encoding_mode=0,
                                        use_sliding_window=False, use_logits_soft_cap=False,
                                        use_fp16_qk_reduction=False, fp8_enabled=False) -> JitModule:
    """A single-prefill variant module. backend: "fa2" (the portable kernel), "fa3" or "auto" (the Hopper
    kernel where it takes the variant: sm_90a, head dims 64 / 128); the dtypes
    and head dims are taken from the arrays of each call."""
    _backend(backend)
    return _module("single_prefill", backend, (pos_encoding_mode, use_sliding_window, use_logits_soft_cap), uri,
                   additional_tensor_names, additional_tensor_dtypes, additional_scalar_names, additional_scalar_dtypes,
                   variant_name, variant_decl)


def gen_customize_single_decode_module(uri, dtype_q, dtype_kv, dtype_o, head_dim_qk, head_dim_vo,
                                       additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                                       additional_scalar_dtypes, variant_name, variant_decl, pos_encoding_mode=0,
                                       use_sliding_window=False, use_logits_soft_cap=False) -> JitModule:
    """A single-decode variant module (run on the prefill kernel with one query row)."""
    return _module("single_decode", "auto", (pos_encoding_mode, use_sliding_window, use_logits_soft_cap), uri,
                   additional_tensor_names, additional_tensor_dtypes, additional_scalar_names, additional_scalar_dtypes,
                   variant_name, variant_decl)


def gen_customize_batch_prefill_module(backend, uri, dtype_q, dtype_kv, dtype_o, idtype, head_dim_qk, head_dim_vo,
                                       additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                                       additional_scalar_dtypes, variant_name, variant_decl, pos_encoding_mode=0,
                                       use_sliding_window=False, use_logits_soft_cap=False,
                                       use_fp16_qk_reduction=False, fp8_enabled=False) -> JitModule:
    """A batch-prefill variant module: pass it as the wrappers' jit_args."""
    _backend(backend)
    return _module("batch_prefill", backend, (pos_encoding_mode, use_sliding_window, use_logits_soft_cap), uri,
                   additional_tensor_names, additional_tensor_dtypes, additional_scalar_names, additional_scalar_dtypes,
                   variant_name, variant_decl)


def gen_customize_batch_decode_module(uri, dtype_q, dtype_kv, dtype_o, idtype, head_dim_qk, head_dim_vo,
                                      additional_tensor_names, additional_tensor_dtypes, additional_scalar_names,
                                      additional_scalar_dtypes, variant_name, variant_decl, pos_encoding_mode=0,
                                      use_sliding_window=False, use_logits_soft_cap=False) -> JitModule:
    """A batch-decode variant module: pass it as BatchDecodeWithPagedKVCacheWrapper's jit_args."""
    return _module("batch_decode", "auto", (pos_encoding_mode, use_sliding_window, use_logits_soft_cap), uri,
                   additional_tensor_names, additional_tensor_dtypes, additional_scalar_names, additional_scalar_dtypes,
                   variant_name, variant_decl)


def _module(kind: str, backend: str, flags: tuple, uri, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes,
            variant_name, variant_decl) -> JitModule:
    """What every maker returns: FlashInfer's compile flags checked (their defaults only), the variant read
    from its declaration, as a `kind` module for `backend`."""
    _flags(flags, ("pos_encoding_mode", "use_sliding_window", "use_logits_soft_cap"))
    return JitModule(_variant(uri, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes, variant_name,
                              variant_decl), kind, backend)


def _backend(backend) -> None:
    if backend not in ("fa2", "fa3", "auto"):
        raise NotImplementedError(f"backend: {backend!r}; custom variants run on the portable kernel ('fa2') or the "
                                  f"Hopper one ('fa3'; 'auto' picks)")
