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
#pragma unroll 4
  for (int k = 0; k < n; ++k) m = fmaxf(m, s[k * s_stride]);
  return m;
}

// out = the N values of the merged state, not yet normalised (weights exp2(s_k - m)); returns the
// weights' total, 0 when every state is empty (out = 0 then). The caller divides by it (each family
// picks its reciprocal) and takes the lse from merged_lse. UNROLL: states loaded ahead (cascade's
// merge over many states takes 2, prefill's 4: MLA cuts a request into tens of chunks, and a merge
// that loads one state at a time waits a memory latency per state).
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

// Attention sinks (FlashInfer's `sinks`, gpt-oss): one more logit per query head, sinks[h] in the units
// of sm_scale * q.k, joins the softmax denominator and carries no value. Folded into a finished row:
// given the row's lse (base 2) without it, the row's output scales by 2^lse / (2^lse + e^sink) and its
// lse becomes log2(2^lse + e^sink). A row that saw no key (lse = -inf) keeps o = 0 and gets lse =
// sink in base 2. Returns the output scale; `lse` is updated in place. Applied only where a row is
// finished (never to partial states, which the merge finishes), so a sink joins each row once.
__device__ __forceinline__ float fold_sink(float& lse, const float* __restrict__ sinks, int qo_head) {
  const float s2 = sinks[qo_head] * FIC_LOG2E;
  const float hi = fmaxf(lse, s2), lo = fminf(lse, s2);
  if (hi == neg_inf()) return 0.f;  // no key and a -inf sink: nothing in the row
  const float total = hi + __log2f(1.f + ptx_exp2(lo - hi));
  const float scale = ptx_exp2(lse - total);
  lse = total;
  return scale;
}

}  // namespace fic
