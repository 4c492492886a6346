// Merging attention states. A state is (v, s): v the softmax-weighted value of one (token, head) over
// some KV range, s the log-sum-exp of its logits in base 2 (the decode/prefill lse convention). Two
// states over disjoint ranges merge into the state over their union:
//   m = max(s_a, s_b); w_x = 2^(s_x - m); v = (w_a v_a + w_b v_b) / (w_a + w_b); s = m + log2(w_a + w_b)
// A state with s = -inf (an empty range) has weight 0; if every state is empty, v = 0 and s = -inf.
// A row (one token and head) belongs to a team of blockDim.x <= 32 lanes of one warp, each owning
// VEC-element vectors of the head dim; a CTA holds blockDim.y rows and strides over the rows. The
// team reads s before any lane writes it (__syncwarp), so the merge may run in place. Arrays are
// addressed by (token, head) strides in elements.
#include "common/types.cuh"
#include "common/math.cuh"
#include "common/vec.cuh"
#include "common/softmax.cuh"
#include "common/pdl.cuh"

namespace fic {

struct StateRef {  // one state array: v at v + i * v_tok + h * v_head, s at s + i * s_tok + h * s_head
  long long v_tok, v_head, s_tok, s_head;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(256) merge_state_kernel(
    const T* va, const float* sa, StateRef ra, const T* vb, const float* sb, StateRef rb, T* vo, float* so,
    StateRef ro, const unsigned char* mask, int rows, int heads, int d) {
  pdl_begin();
  const int nvec = d / VEC;
  for (int base = blockIdx.x * blockDim.y; base < rows; base += gridDim.x * blockDim.y) {
    const int row = base + threadIdx.y;
    const int i = row / heads, h = row - i * heads;
    const bool live = row < rows && (mask == nullptr || mask[i]);
    float m = neg_inf(), sum = 0.f;
    if (live) {
      const float a = sa[i * ra.s_tok + h * ra.s_head], b = sb[i * rb.s_tok + h * rb.s_head];
      m = fmaxf(a, b);
      float wa = 0.f, wb = 0.f;
      if (m != neg_inf()) {
        wa = ptx_exp2(a - m);
        wb = ptx_exp2(b - m);
        sum = wa + wb;
        const float inv = __frcp_rn(sum);
        wa *= inv;
        wb *= inv;
      }
      for (int c = threadIdx.x * VEC; c < d; c += blockDim.x * VEC) {
        Vec<T, VEC> x, y, o;
        x.load(va + i * ra.v_tok + h * ra.v_head + c);
        y.load(vb + i * rb.v_tok + h * rb.v_head + c);
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.set(e, wa * x[e] + wb * y[e]);
        o.store(vo + i * ro.v_tok + h * ro.v_head + c);
      }
    }
    __syncwarp();  // every lane of the row has read s before it is overwritten
    if (live && threadIdx.x == 0) so[i * ro.s_tok + h * ro.s_head] = m == neg_inf() ? m : m + __log2f(sum);
  }
}

// n states per (token, head): v (tokens, n, heads, d), s (tokens, n, heads); state k of token i is at
// v + i * v_tok + k * v_state + h * v_head.
template <typename T, int VEC>
__global__ void __launch_bounds__(256) merge_states_n_kernel(
    const T* v, const float* s, StateRef r, long long v_state, long long s_state, int n, T* vo, float* so,
    StateRef ro, int rows, int heads, int d) {
  pdl_begin();
  for (int row = blockIdx.x * blockDim.y + threadIdx.y; row < rows; row += gridDim.x * blockDim.y) {
    const int i = row / heads, h = row - i * heads;
    const float* sp = s + (long long)i * r.s_tok + h * r.s_head;
    const float m = max_lse(sp, s_state, n);
    for (int c = threadIdx.x * VEC; c < d; c += blockDim.x * VEC) {
      float acc[VEC];
      const float sum = merge_states<T, VEC, 2>(v + (long long)i * r.v_tok + h * r.v_head + c, v_state, sp, s_state, n,
                                             m, acc);
      const float inv = sum > 0.f ? __frcp_rn(sum) : 0.f;
      Vec<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.set(e, acc[e] * inv);
      o.store(vo + i * ro.v_tok + h * ro.v_head + c);
      if (c == 0) so[i * ro.s_tok + h * ro.s_head] = merged_lse(m, sum);
    }
  }
}

}  // namespace fic
