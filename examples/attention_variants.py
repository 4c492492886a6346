"""Custom attention variants (fi_cupy.AttentionVariant), as a user writes them: each a C++ struct of hooks
(cuda_src/common/variant.cuh lists them) and its extra parameters. Used by tests/test_variant*.py and
bench/bench_jit.py; the README shows the first.

    o = fi_cupy.single_prefill_with_kv_cache_with_jit_module(SIGMOID, q, k, v, logits_scale, bias)
"""
from fi_cupy import AttentionVariant

# FlashSigmoid-style attention: sigmoid(q.k * scale + bias) weighs V directly, no softmax normalisation.
# Written as (1 + tanh(x / 2)) / 2: one hardware tanh a score, where 1 / (1 + exp(-x)) takes an exp and a
# reciprocal (two of the special-function unit's slow instructions; softmax takes one exp a score).
SIGMOID = AttentionVariant("SigmoidAttention", r"""
struct SigmoidAttention : AttentionVariantBase {
  static constexpr bool use_softmax = false;
  float half_scale, half_bias;
  template <typename Params>
  __device__ SigmoidAttention(const Params& params, uint32_t batch_idx, uint8_t* smem) {
    half_scale = 0.5f * params.logits_scale;
    half_bias = 0.5f * params.sigmoid_bias;
  }
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {
    return fmaf(0.5f, math::tanh(fmaf(logits, half_scale, half_bias)), 0.5f);
  })
};
""", scalars=[("logits_scale", "double"), ("sigmoid_bias", "double")])

# Document masking: packed sequences where a query sees only keys of its own document. doc_ids holds
# each request's token document ids in rows of `doc_stride` entries (request b: doc_ids[b * doc_stride + i]
# for key position i; a query at position kv_len - qo_len + qo_idx).
DOC_MASK = AttentionVariant("DocumentMask", r"""
struct DocumentMask : AttentionVariantBase {
  const int* ids;       // this request's document ids by key position
  uint32_t q_offset;    // kv_len - qo_len: the first query's key position
  template <typename Params>
  __device__ DocumentMask(const Params& params, uint32_t batch_idx, uint8_t* smem) {
    sm_scale_log2 = params.sm_scale * math::log2e;
    ids = params.doc_ids + (long long)batch_idx * params.doc_stride;
    q_offset = params.get_kv_len(batch_idx) - params.get_qo_len(batch_idx);
  }
  REGISTER_LOGITS_MASK(params, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {
    return ids[q_offset + qo_idx] == ids[kv_idx];
  })
};
""", tensors=[("doc_ids", "int32_t")], scalars=[("doc_stride", "int64_t"), ("sm_scale", "double")])

# ALiBi as a user variant: logit + slope_h * (key position - query position), in q.k units (the softmax
# scales by sm_scale afterwards, so the slope is divided by it here).
ALIBI = AttentionVariant("AlibiVariant", r"""
struct AlibiVariant : AttentionVariantBase {
  float rcp_scale;
  int q_offset;
  template <typename Params>
  __device__ AlibiVariant(const Params& params, uint32_t batch_idx, uint8_t* smem) {
    sm_scale_log2 = params.sm_scale * math::log2e;
    rcp_scale = 1.f / params.sm_scale;
    q_offset = (int)params.get_kv_len(batch_idx) - (int)params.get_qo_len(batch_idx);
  }
  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, {
    return logits + params.slopes[qo_head_idx] * rcp_scale * float((int)kv_idx - (q_offset + (int)qo_idx));
  })
};
""", tensors=[("slopes", "float")], scalars=[("sm_scale", "double")])

# A per-head temperature: each query head's q divided by its temperature (QueryTransform), softmax as usual.
TEMPERATURE = AttentionVariant("HeadTemperature", r"""
struct HeadTemperature : AttentionVariantBase {
  template <typename Params>
  __device__ HeadTemperature(const Params& params, uint32_t batch_idx, uint8_t* smem) {
    sm_scale_log2 = params.sm_scale * math::log2e;
  }
  REGISTER_QUERY_TRANSFORM(params, q, batch_idx, qo_idx, qo_head_idx, dim, {
    return q / params.temperature[qo_head_idx];
  })
};
""", tensors=[("temperature", "float")], scalars=[("sm_scale", "double")])

# The default attention written as a variant (the cost of the hooks, bench/bench_jit.py): softmax over
# q.k * sm_scale.
SOFTMAX = AttentionVariant("PlainSoftmax", r"""
struct PlainSoftmax : AttentionVariantBase {
  template <typename Params>
  __device__ PlainSoftmax(const Params& params, uint32_t batch_idx, uint8_t* smem) {
    sm_scale_log2 = params.sm_scale * math::log2e;
  }
};
""", scalars=[("sm_scale", "double")])

# A learned per-dimension key scale (KeyTransform): k[h, i] * k_mul[h * head_dim + i], softmax as usual.
KEY_SCALE = AttentionVariant("KeyScale", r"""
struct KeyScale : AttentionVariantBase {
  template <typename Params>
  __device__ KeyScale(const Params& params, uint32_t batch_idx, uint8_t* smem) {
    sm_scale_log2 = params.sm_scale * math::log2e;
  }
  REGISTER_KEY_TRANSFORM(params, k, batch_idx, kv_idx, kv_head_idx, dim, {
    return k * params.k_mul[kv_head_idx * params.head_dim + dim];
  })
};
""", tensors=[("k_mul", "float")], scalars=[("sm_scale", "double"), ("head_dim", "int32_t")])

# A per-head output gate (OutputTransform): each head's softmax output times gate[head].
GATE = AttentionVariant("OutputGate", r"""
struct OutputGate : AttentionVariantBase {
  template <typename Params>
  __device__ OutputGate(const Params& params, uint32_t batch_idx, uint8_t* smem) {
    sm_scale_log2 = params.sm_scale * math::log2e;
  }
  REGISTER_OUTPUT_TRANSFORM(params, output, batch_idx, qo_idx, qo_head_idx, m, d, scale, {
    return d > 0.f ? output * scale * params.gate[qo_head_idx] / d : 0.f;
  })
};
""", tensors=[("gate", "float")], scalars=[("sm_scale", "double")])

EXAMPLES = {"sigmoid": SIGMOID, "doc_mask": DOC_MASK, "alibi": ALIBI, "temperature": TEMPERATURE,
            "softmax": SOFTMAX, "key_scale": KEY_SCALE, "gate": GATE}
