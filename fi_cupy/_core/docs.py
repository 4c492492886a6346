"""numpydoc docstrings for the attention API, assembled from one glossary of its parameters.

The decode and prefill wrappers share most of FlashInfer's parameters (plan(), workspace_size(),
fast_decode_plan(), forward() take the same ones): each is described once here, and `document` writes a
function's Parameters section from its real signature, in order. A parameter missing from the glossary
fails at import time, so a signature cannot outgrow its documentation.
"""
from __future__ import annotations

import inspect

_CACHE = ("array or (array, array)\n"
          "    The paged KV cache: one 5-D array (num_pages, 2, page_size, num_kv_heads, head_dim) for\n"
          "    kv_layout \"NHD\", (num_pages, 2, num_kv_heads, page_size, head_dim) for \"HND\", or a (k_cache,\n"
          "    v_cache) pair of 4-D arrays; the planned kv_data_type; strided is fine if the last dim is\n"
          "    contiguous.")

GLOSSARY = {
    # Wrapper construction.
    "float_workspace_buffer": "array\n    A contiguous device buffer (any dtype; 128 MB is FlashInfer's usual size) that plan() writes "
                              "its schedule into and run() reads; the wrapper keeps a reference.",
    "workspace_buffer": "array\n    The float workspace buffer (see float_workspace_buffer).",
    "int_workspace_buffer": "array, optional\n    FlashInfer's second workspace; accepted and unused (one buffer "
                            "holds everything here).",
    "kv_layout": "str, default \"NHD\"\n    \"NHD\" (slot, head, dim) or \"HND\" (head, slot, dim) within a page.",
    "use_cuda_graph": "bool, default False\n    Keep every device address and the launch shape fixed across "
                      "re-plans (the first plan reserves room), so a captured run() replays any later plan.",
    "use_tensor_cores": "bool, default False\n    Accepted and reported by the use_tensor_cores property; the "
                        "kernel is chosen by the dtypes (tensor cores for 16-bit KV of the q dtype without RoPE).",
    "backend": "str, default \"auto\"\n    FlashInfer's backend name: \"auto\" or \"fa2\" (and \"fa3\", the Hopper "
               "kernel, in prefill); FlashInfer's others raise NotImplementedError.",
    "jit_args": "AttentionVariant or tuple, optional\n    A custom attention variant (fi_cupy.variant): an "
                "AttentionVariant, a module of fi_cupy.jit, or FlashInfer's jit_args tuple (uri, dtype_q, dtype_kv, "
                "dtype_o, idtype, head_dim_qk, head_dim_vo, additional tensor names and dtypes, additional scalar "
                "names and dtypes, variant name, variant declaration). It runs on the prefill kernels; run() "
                "takes its extra arguments after the usual positional ones (tensors, then scalars).",
    "jit_module": "module of fi_cupy.jit or AttentionVariant\n    The custom variant: "
                  "fi_cupy.jit.gen_customize_single_*_module(...).build_and_load(), or an AttentionVariant.",
    "module_name": "str\n    The name a variant module is cached under (FlashInfer's uri).",
    "mask_mode": "int, default 0\n    FlashInfer's MaskMode value: 0 non-causal, 1 causal (bottom-right aligned).",
    "jit_kwargs": "None\n    FlashInfer's extra arguments of Hopper variants: not supported (None only).",
    "variant_owns_mask": "bool, default False\n    Only False (it concerns custom variants).",
    "paged_kv_indptr_buffer": "int32 array (batch_size + 1,), optional\n    CUDA graphs: plan() writes indptr "
                              "into it, as FlashInfer's does.",
    "paged_kv_indices_buffer": "int32 array, optional\n    CUDA graphs: the kernel reads the page indices from it; "
                               "plan() copies them in (fast_decode_plan only when they are another array).",
    "paged_kv_last_page_len_buffer": "int32 array (batch_size,), optional\n    CUDA graphs: fixes the batch size "
                                     "(its length); plan() writes last_page_len into it.",
    "indptr_buffer": "int32 array (batch_size + 1,)\n    As paged_kv_indptr_buffer.",
    "indices_buffer": "int32 array\n    As paged_kv_indices_buffer.",
    "last_page_len_buffer": "int32 array (batch_size,)\n    As paged_kv_last_page_len_buffer.",
    "qo_indptr_buf": "int32 array (batch_size + 1,), optional\n    CUDA graphs: plan() writes qo_indptr into it.",
    "paged_kv_indptr_buf": "int32 array, optional\n    CUDA graphs: plan() writes paged_kv_indptr into it.",
    "paged_kv_indices_buf": "int32 array, optional\n    CUDA graphs: plan() writes paged_kv_indices into it.",
    "paged_kv_last_page_len_buf": "int32 array, optional\n    CUDA graphs: plan() writes paged_kv_last_page_len "
                                  "into it.",
    "kv_indptr_buf": "int32 array, optional\n    CUDA graphs: plan() writes kv_indptr into it.",
    "custom_mask_buf": "uint8 array, optional\n    CUDA graphs: the packed custom mask's fixed home (without it the "
                       "wrapper keeps one of its own, sized by its first masked plan).",
    "mask_indptr_buf": "int32 array, optional\n    CUDA graphs: plan() writes the packed mask's byte offsets into it.",
    # Page tables and lengths (host arrays; device arrays are copied to the host: one synchronisation).
    "indptr": "int array (batch_size + 1,)\n    Request b owns pages indices[indptr[b]:indptr[b + 1]]. Host (numpy) "
              "or device; read on the host.",
    "indices": "int array\n    Page indices into the cache, request by request.",
    "last_page_len": "int array (batch_size,)\n    Tokens in each request's last page: 1..page_size, 0 for a "
                     "request without pages.",
    "qo_indptr": "int array (batch_size + 1,)\n    Request b's queries are rows qo_indptr[b] .. qo_indptr[b + 1] of q.",
    "paged_kv_indptr": "int array (batch_size + 1,)\n    As indptr (decode).",
    "paged_kv_indices": "int array\n    As indices (decode).",
    "paged_kv_last_page_len": "int array (batch_size,)\n    As last_page_len (decode).",
    "kv_indptr": "int array (batch_size + 1,)\n    Request b's keys and values are rows kv_indptr[b] .. "
                 "kv_indptr[b + 1] of k and v.",
    "block_tables": "int array (batch_size, max_pages), optional\n    FlashInfer's trtllm-gen page table: with "
                    "seq_lens, instead of the CSR arrays (pass None for those).",
    "seq_lens": "int array (batch_size,), optional\n    KV lengths: with block_tables, the page table; with the CSR "
                "arrays, checked against them.",
    "seq_lens_q": "int array (batch_size,), optional\n    Query lengths, checked against qo_indptr.",
    "max_token_per_sequence": "int, optional\n    Checked: at least the longest query length.",
    "max_sequence_kv": "int, optional\n    Checked: at least the longest KV length.",
    "uniform_q_len": "int, optional\n    Checked: every request has this many queries.",
    "v_indptr": "int array, optional\n    Only equal to kv_indptr (V laid out as K); else NotImplementedError.",
    "o_indptr": "int array, optional\n    Only equal to qo_indptr (O laid out as Q); else NotImplementedError.",
    "global_override_indptr_cpu": "int array (batch_size + 1,), optional\n    A host copy of indptr: no copy from "
                                  "the device.",
    # Heads, sizes, dtypes.
    "num_qo_heads": "int\n    Query / output heads (a multiple of num_kv_heads).",
    "num_kv_heads": "int\n    Key / value heads.",
    "head_dim": "int\n    Decode: every multiple of 16 from 16 to 256.",
    "head_dim_qk": "int\n    Prefill head dim: 64, 128 or 256.",
    "head_dim_vo": "int, optional\n    Only equal to head_dim_qk (None); else NotImplementedError.",
    "page_size": "int\n    Tokens a page: any positive size.",
    "q_data_type": "str or dtype, default \"float16\"\n    float16 or bfloat16.",
    "kv_data_type": "str or dtype, optional\n    The cache dtype: q's (default), float8_e4m3fn or float8_e5m2 (prefill: "
                    "paged only).",
    "o_data_type": "str or dtype, optional\n    Only q's dtype (None); else NotImplementedError.",
    "data_type": "str or dtype, optional\n    FlashInfer's older name: the KV dtype when kv_data_type is None.",
    # Attention options.
    "causal": "bool, default False\n    Causal, bottom-right aligned: query i of a request sees keys up to "
              "kv_len - qo_len + i. A custom mask replaces it.",
    "is_causal": "bool, optional\n    q_len_per_req > 1: causal within the request (None: True).",
    "pos_encoding_mode": "str, default \"NONE\"\n    \"NONE\", \"ROPE_LLAMA\" (RoPE on the fly: q at its position, "
                         "key i at i) or \"ALIBI\" (logit += slope_h * (key position - query position), FlashInfer's "
                         "slopes; not with logits_soft_cap; prefill: the fa2 kernel. The lse counts the query at its "
                         "position: FlashInfer's counts it from the request's first query, so its lse differs by "
                         "slope_h * (kv_len - qo_len) / ln 2; o is the same).",
    "use_fp16_qk_reduction": "bool, default False\n    A permission FlashInfer takes to reduce q.k in float16; "
                             "unused (float32 throughout).",
    "window_left": "int, default -1\n    Sliding window: a query sees the keys at most window_left positions "
                   "before it; -1 for none.",
    "window_right": "int, optional\n    Decode queries see no key to their right: only None, -1 or 0 (no effect).",
    "logits_soft_cap": "float, optional\n    cap * tanh(s / cap) on the scaled logits; None or 0 for none.",
    "sm_scale": "float, optional\n    Logit scale; default 1 / sqrt(head_dim).",
    "rope_scale": "float, optional\n    RoPE position scale (default 1).",
    "rope_theta": "float, optional\n    RoPE base (default 1e4).",
    "custom_mask": "bool array, optional\n    Each request's (qo_len, kv_len) mask (True = attend), flattened "
                   "row-major and concatenated; host or device. Replaces causal.",
    "packed_custom_mask": "uint8 array, optional\n    custom_mask packed per request, little-endian bits "
                          "(segment_packbits(..., bitorder=\"little\")).",
    "prefix_len_ptr": "int array (batch_size,), optional\n    Multi-item scoring: each request's shared prefix "
                      "length (FlashInfer's mask: an item token sees the prefix and its own item, causally).",
    "token_pos_in_items_ptr": "int array, optional\n    Multi-item scoring: each token's position in its item "
                              "(0 at delimiters), token_pos_in_items_len entries a request.",
    "token_pos_in_items_len": "int, default 0\n    Multi-item scoring: the row length of token_pos_in_items_ptr.",
    "max_item_len_ptr": "int array (batch_size,), optional\n    Multi-item scoring: a bound FlashInfer's kernel "
                        "uses to skip tiles; checked, not needed.",
    "fixed_split_size": "int, optional\n    Split every request's KV into chunks of this many pages (-1 or None: "
                        "the scheduler's split): outputs bit-identical whatever the batch.",
    "disable_split_kv": "bool, default False\n    Never split a request's KV: outputs bit-identical whatever the "
                        "batch.",
    "q_len_per_req": "int, default 1\n    Queries a request (multi-token decode: q has batch_size * q_len_per_req "
                     "rows); > 1 runs the prefill kernel (head_dim 64, 128, 256).",
    "non_blocking": "bool, default True\n    False: plan() waits until its copies have landed.",
    "stream": "stream, optional\n    The stream to launch on (int handle, torch / CuPy stream); default the caller's "
              "current stream.",
    # run() arguments.
    "q": "array\n    Queries, float16 / bfloat16: decode (batch_size, num_qo_heads, head_dim); prefill (rows, "
         "num_qo_heads, head_dim) with rows >= qo_indptr[-1] (rows past it are left alone).",
    "k": "array\n    Keys: (rows, num_kv_heads, head_dim) for NHD, (num_kv_heads, rows, head_dim) for HND.",
    "v": "array\n    Values, as k.",
    "paged_kv_cache": _CACHE,
    "q_scale": "float, optional\n    Scales the logits (None: 1).",
    "k_scale": "float, optional\n    Scales the logits (fp8 caches; None: 1).",
    "v_scale": "float, optional\n    Scales the output (fp8 caches; None: 1).",
    "o_scale": "float, optional\n    Only None or 1.0; else NotImplementedError.",
    "out": "array, optional\n    Written in place: q's shape and dtype; else a new array in q's framework.",
    "lse": "float32 array, optional\n    Written in place: (rows, num_qo_heads), base 2.",
    "return_lse": "bool, default False\n    Also return the log-sum-exp (base 2).",
    "lse_base": "str, default \"log2\"\n    Only \"log2\"; else NotImplementedError.",
    "lse_layout": "str, default \"NH\"\n    Only \"NH\" (rows, heads); else NotImplementedError.",
    "enable_pdl": "bool, optional\n    Programmatic dependent launch (None: where the GPU has it).",
    "sinks": ("float32 array, optional\n    Attention sinks (gpt-oss): (num_qo_heads,), one extra logit per query head in the units "
              "of sm_scale * q.k that joins the softmax denominator and carries no value. The returned lse includes it; "
              "a row that sees no key gives o = 0, lse = sinks[h] / ln 2."),
    "kv_cache_sf": "None\n    nvfp4 scale factors are not supported: anything but None raises NotImplementedError.",
    "skip_softmax_threshold_scale_factor": "None\n    Not supported: anything but None raises NotImplementedError.",
    "use_fp16_softmax": "bool, optional\n    Only None or False; else NotImplementedError.",
    "uses_spcompress": "bool, optional\n    Only None or False; else NotImplementedError.",
    "variant": "str, default \"independent\"\n    Accepted; nothing to prewarm (strides are read at run time).",
    "self": "BatchDecodeWithPagedKVCacheWrapper\n    The wrapper to re-plan.",
    # Single-request calls.
    "scale_q": "None\n    FlashInfer's per-head fp8 scales: not supported (NotImplementedError).",
    "scale_k": "None\n    As scale_q.",
    "scale_v": "None\n    As scale_q.",
    "o_dtype": "str or dtype, optional\n    Only q's dtype (None); else NotImplementedError.",
}

RUN_RETURNS = ("o : array\n    The attention output, q's shape and dtype (out when given).\n"
               "lse : float32 array\n    Only with return_lse=True: (o, lse), lse of shape q.shape[:-1], base 2.")


def document(summary: str, returns: str | None = None, skip: tuple = ("self",), params: dict | None = None,
             glossary: dict | None = None, notes: str | None = None):
    """Decorator: fn.__doc__ = the one-line `summary`, fn's own docstring as the extended description,
    then numpydoc Parameters (every parameter of fn's signature, in order, looked up in `params`, then in
    `glossary` (default GLOSSARY); `skip` left out), Returns and Notes. On a class, the parameters are
    its constructor's. An entry is "type line\\n    description lines"."""
    glossary = GLOSSARY if glossary is None else glossary

    def apply(fn):
        lines = [summary.strip(), ""]
        if fn.__doc__:
            lines += [inspect.cleandoc(fn.__doc__), ""]
        lines += ["Parameters", "----------"]
        for name, p in inspect.signature(fn).parameters.items():
            if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            entry = (params or {}).get(name, glossary.get(name))
            if entry is None:
                where = "fi_cupy._core.docs.GLOSSARY" if glossary is GLOSSARY else "its glossary"
                raise KeyError(f"{fn.__qualname__}: parameter {name!r} is not in {where}")
            head, _, body = entry.partition("\n")
            lines += [f"{name} : {head}", body]
        if returns:
            lines += ["", "Returns", "-------", returns]
        if notes:
            lines += ["", "Notes", "-----", notes]
        fn.__doc__ = "\n".join(lines) + "\n"
        return fn
    return apply


# The functional kernels' (norm, rope, sampling, ...) launch options, in their modules' glossaries.
KERNEL_GLOSSARY = {
    "enable_pdl": ("bool or None, default None\n"
                   "    Programmatic dependent launch: the kernel may start while the previous one on the stream\n"
                   "    finishes. None: on where the GPU supports it (compute capability 9.0 and newer)."),
    "stream": ("int, stream object or None, default None\n"
               "    The CUDA stream to launch on: a ``cudaStream_t`` handle, a torch or CuPy stream, or any object\n"
               "    with ``__cuda_stream__``. None: the current stream of the caller's framework (CuPy's for JAX).\n"
               "    fi_cupy's addition to FlashInfer's signature."),
}


RUN_OPTIONS = {  # run()'s per-call forms of plan options (default None: the plan's)
    "window_left": "int, optional\n    Only None or the planned window_left: the window is part of the plan's "
                   "schedule (another value raises NotImplementedError).",
    "q_len_per_req": "int, optional\n    None or the planned q_len_per_req (checked).",
}
