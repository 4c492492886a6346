// Online-softmax state in base 2 (scores already multiplied by log2(e)): running max m, running
// sum d of exp2(s - m). merge() combines two states; a state with m = -inf is empty and
// contributes nothing, and merging two empty states stays empty (never NaN).
#pragma once
#include "math.cuh"

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

}  // namespace fic
