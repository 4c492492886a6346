// Custom attention variants (fi_cupy/variant.py): the hooks a user's C++ struct defines, compiled into the
// prefill kernels (cuda_src/prefill.cu; prefill_sm90.cu for variants without a Key transform) and the
// tensor-core decode kernel (cuda_src/decode.cu batch_decode_tc_kernel, query position 0) at run time with NVRTC. The declaration style follows FlashInfer's: a struct deriving from AttentionVariantBase,
// a constructor (params, batch_idx, smem_ptr), hooks registered by macro, helpers in math::. The kernel takes the variant as a binding
// (VariantBinding<Variant, Params>): Params is the struct fi_cupy/variant.py generates from the variant's
// extra tensors and scalars, passed by value as the kernel's last parameter.
//
// Hooks (each optional; positions are within the request: qo_idx the query token, kv_idx the key):
//   LogitsTransform(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx) -> float: the raw
//     q.k (before any scale) becomes the logit. With use_softmax the softmax takes exp2(logit *
//     sm_scale_log2); without it, the logit itself weighs V.
//   LogitsMask(params, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx) -> bool: false hides the key.
//   OutputTransform(params, output, batch_idx, qo_idx, qo_head_idx, m, d, scale) -> float: each output
//     element from the unnormalised sum over keys; m: the row's largest logit times sm_scale_log2 (-inf
//     when it saw no key), d: sum of exp2(logit * sm_scale_log2 - m), scale: v_scale. Default: output *
//     scale / d with softmax (0 for an empty row), output * scale without.
//   QueryTransform(params, q, batch_idx, qo_idx, qo_head_idx, dim) -> float and
//   KeyTransform(params, k, batch_idx, kv_idx, kv_head_idx, dim) -> float: each element of Q (once) and K
//     (each tile) in shared memory, rounded back to the q dtype (FlashInfer's hooks of these names take a
//     pointer to the whole tile instead).
// Hooks see only keys below the request's KV end and query rows of the request: a hook may index a
// per-token tensor without bounds checks of its own.
#pragma once
#include "math.cuh"
#include "types.cuh"

namespace fic {

// FlashInfer's integer names, for variant code (NVRTC has no <cstdint>).
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;

// FlashInfer's math:: helpers that variant code calls.
namespace math {
constexpr float log2e = 1.4426950408889634f;
constexpr float loge2 = 0.6931471805599453f;
// +infinity as FlashInfer's variants write it (-math::inf, m != -math::inf): no float literal is infinite,
// so an object that converts.
struct Infinity {
  __device__ __forceinline__ operator float() const { return __int_as_float(0x7f800000); }
  __device__ __forceinline__ float operator-() const { return __int_as_float(0xff800000); }
};
constexpr Infinity inf{};
__device__ __forceinline__ float ptx_exp2(float x) { return fic::ptx_exp2(x); }
__device__ __forceinline__ float ptx_rcp(float x) { return fic::ptx_rcp(x); }
__device__ __forceinline__ float ptx_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// FlashInfer's math::tanh: the hardware approximation (one instruction, relative error about 2^-11), not
// tanh_inline's two (the built-in soft cap's)
__device__ __forceinline__ float tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
}  // namespace math

#define REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, ...)       \
  template <typename Params>                                                                                   \
  __device__ __forceinline__ float LogitsTransform(const Params& params, float logits, uint32_t batch_idx,     \
                                                   uint32_t qo_idx, uint32_t kv_idx, uint32_t qo_head_idx,      \
                                                   uint32_t kv_head_idx) __VA_ARGS__

#define REGISTER_LOGITS_MASK(params, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, ...)                     \
  static constexpr bool kLogitsMask = true;                                                                    \
  template <typename Params>                                                                                   \
  __device__ __forceinline__ bool LogitsMask(const Params& params, uint32_t batch_idx, uint32_t qo_idx,        \
                                             uint32_t kv_idx, uint32_t qo_head_idx, uint32_t kv_head_idx) __VA_ARGS__

#define REGISTER_OUTPUT_TRANSFORM(params, output, batch_idx, qo_idx, qo_head_idx, m, d, scale, ...)                 \
  template <typename Params>                                                                                   \
  __device__ __forceinline__ float OutputTransform(const Params& params, float output, uint32_t batch_idx,     \
                                                   uint32_t qo_idx, uint32_t qo_head_idx, float m, float d,     \
                                                   float scale) __VA_ARGS__

#define REGISTER_QUERY_TRANSFORM(params, q, batch_idx, qo_idx, qo_head_idx, dim, ...)                              \
  static constexpr bool kQueryTransform = true;                                                                \
  template <typename Params>                                                                                   \
  __device__ __forceinline__ float QueryTransform(const Params& params, float q, uint32_t batch_idx,           \
                                                  uint32_t qo_idx, uint32_t qo_head_idx, uint32_t dim) __VA_ARGS__

#define REGISTER_KEY_TRANSFORM(params, k, batch_idx, kv_idx, kv_head_idx, dim, ...)                                \
  static constexpr bool kKeyTransform = true;                                                                  \
  template <typename Params>                                                                                   \
  __device__ __forceinline__ float KeyTransform(const Params& params, float k, uint32_t batch_idx,             \
                                                uint32_t kv_idx, uint32_t kv_head_idx, uint32_t dim) __VA_ARGS__

// The defaults a variant inherits. sm_scale_log2 (softmax only): the factor the softmax takes the logits
// by in base 2; log2(e) unless the constructor sets it (FlashInfer's variants set sm_scale * log2(e)).
struct AttentionVariantBase {
  static constexpr bool use_softmax = true;
  static constexpr bool kLogitsMask = false, kQueryTransform = false, kKeyTransform = false;
  float sm_scale_log2 = math::log2e;

  REGISTER_LOGITS_TRANSFORM(params, logits, batch_idx, qo_idx, kv_idx, qo_head_idx, kv_head_idx, { return logits; })

  template <typename Params>
  __device__ __forceinline__ bool LogitsMask(const Params&, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t) {
    return true;
  }

  template <typename Params>
  __device__ __forceinline__ float OutputTransform(const Params&, float output, uint32_t, uint32_t, uint32_t,
                                                   float m, float d, float scale) {
    (void)m;
    return output * scale * (d > 0.f ? ptx_rcp(d) : 0.f);
  }

  template <typename Params>
  __device__ __forceinline__ float QueryTransform(const Params&, float q, uint32_t, uint32_t, uint32_t, uint32_t) {
    return q;
  }

  template <typename Params>
  __device__ __forceinline__ float KeyTransform(const Params&, float k, uint32_t, uint32_t, uint32_t, uint32_t) {
    return k;
  }
};

// The fields every generated Params struct starts with (fi_cupy/variant.py PARAMS_BASE lays them out the
// same way; the compile checks each offset): the request geometry the constructor may ask for.
#define FIC_VARIANT_PARAMS_BASE                                                                               \
  const int* fic_qo_indptr;                                                                                   \
  const int* fic_kv_lens;                                                                                     \
  int num_qo_heads;                                                                                           \
  int num_kv_heads;                                                                                           \
  __device__ __forceinline__ uint32_t get_qo_len(uint32_t b) const {                                          \
    return (uint32_t)(fic_qo_indptr[b + 1] - fic_qo_indptr[b]);                                               \
  }                                                                                                           \
  __device__ __forceinline__ uint32_t get_kv_len(uint32_t b) const { return (uint32_t)fic_kv_lens[b]; }

// Kernels without a variant: nothing to construct, no hook runs (kActive false), and an 8-byte
// placeholder parameter.
struct NoVariant {
  struct Params {
    long long unused;
  };
  struct Variant : AttentionVariantBase {
    template <typename P>
    __device__ __forceinline__ Variant(const P&, uint32_t, uint8_t*) {}
  };
  static constexpr bool kActive = false;
};

template <typename V, typename P>
struct VariantBinding {
  using Variant = V;
  using Params = P;
  static constexpr bool kActive = true;
};

// QueryTransform / KeyTransform of one 16-byte chunk of a Q or K tile (8 elements of T from dim dim0),
// in place, rounded back to T: the kernels apply them to the chunks a thread copied.
template <typename T, typename Var, typename P>
__device__ __forceinline__ void variant_query_chunk(uint4& chunk, Var& var, const P& params, uint32_t batch_idx,
                                                    uint32_t qo_idx, uint32_t qo_head_idx, uint32_t dim0) {
  float x[8];
  unpack8<T>(chunk, x);
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = var.QueryTransform(params, x[e], batch_idx, qo_idx, qo_head_idx, dim0 + e);
  chunk = make_uint4(pack2(T(), x[0], x[1]), pack2(T(), x[2], x[3]), pack2(T(), x[4], x[5]), pack2(T(), x[6], x[7]));
}

template <typename T, typename Var, typename P>
__device__ __forceinline__ void variant_key_chunk(uint4& chunk, Var& var, const P& params, uint32_t batch_idx,
                                                  uint32_t kv_idx, uint32_t kv_head_idx, uint32_t dim0) {
  float x[8];
  unpack8<T>(chunk, x);
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = var.KeyTransform(params, x[e], batch_idx, kv_idx, kv_head_idx, dim0 + e);
  chunk = make_uint4(pack2(T(), x[0], x[1]), pack2(T(), x[2], x[3]), pack2(T(), x[4], x[5]), pack2(T(), x[6], x[7]));
}

}  // namespace fic
