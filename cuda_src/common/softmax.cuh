// Online-softmax state in base 2 (scores already multiplied by log2(e)): running max m, running
// sum d of exp2(s - m). merge() combines two states; a state with m = -inf is empty and
// contributes nothing, and merging two empty states stays empty (never NaN).
#pragma once
#include "math.cuh"
#include "vec.cuh"

namespace fic {

// exp2(a - b) that treats an empty state (b = -inf, so also a = -inf) as scale 1 instead of NaN.
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  return (m_new == neg_inf()) ? 1.f : ptx_exp2(m_old - m_new);
}

template <int N>
struct SoftmaxState {
  float m, d;
  float acc[N];

  __device__ __forceinline__ void init() {
    m = neg_inf();
    d = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
  }

  // Fold another state (m2, d2, acc2) into this one.
  __device__ __forceinline__ void merge(float m2, float d2, const float (&acc2)[N]) {
    float mn = fmaxf(m, m2);
    float s1 = rescale_factor(m, mn), s2 = rescale_factor(m2, mn);
    d = d * s1 + d2 * s2;
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = acc[i] * s1 + acc2[i] * s2;
    m = mn;
  }

  // Log-sum-exp in base 2; -inf for an empty state.
  __device__ __forceinline__ float lse() const { return (d > 0.f) ? m + __log2f(d) : neg_inf(); }
  __device__ __forceinline__ float inv_d() const { return (d > 0.f) ? __frcp_rn(d) : 0.f; }
};

// Merging n states given as (values, base-2 lse) pairs, state k at v + k * v_stride and s[k * s_stride]
// (cascade's merge_states, prefill's KV cuts). max_lse is their largest lse (-inf when all are empty).
__device__ __forceinline__ float max_lse(const float* s, long long s_stride, int n) {
  float m = neg_inf();
  for (int k = 0; k < n; ++k) m = fmaxf(m, s[k * s_stride]);
  return m;
}

// out = the N values of the merged state, not yet normalised (weights exp2(s_k - m)); returns the
// weights' total, 0 when every state is empty (out = 0 then). The caller divides by it (each family
// picks its reciprocal) and takes the lse from merged_lse. UNROLL: states loaded ahead (cascade's
// merge over many states takes 2; NVRTC 13.0 spills prefill's float32 merge when it is unrolled).
template <typename T, int N, int UNROLL = 1>
__device__ __forceinline__ float merge_states(const T* v, long long v_stride, const float* s, long long s_stride,
                                              int n, float m, float (&out)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = 0.f;
  float sum = 0.f;
  if (m != neg_inf()) {
#pragma unroll UNROLL
    for (int k = 0; k < n; ++k) {
      const float w = ptx_exp2(s[k * s_stride] - m);
      Vec<T, N> x;
      x.load(v + k * v_stride);
#pragma unroll
      for (int e = 0; e < N; ++e) out[e] += w * x[e];
      sum += w;
    }
  }
  return sum;
}

// The lse of a merged state: its largest lse m and the total weight relative to it.
__device__ __forceinline__ float merged_lse(float m, float sum) { return m == neg_inf() ? m : m + __log2f(sum); }

}  // namespace fic
