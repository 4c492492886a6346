// Rotary position embedding (Llama / GPT-NeoX "rotate half" form) applied to one 8-element pack.
// Element i of the head is paired with element i +- D/2, which lives in another lane of the same
// row group. inv_freq is theta^(-2i/D) / rope_scale rounded to fp32 and the angle pos * inv_freq is
// an fp32 product, as Hugging Face's LlamaRotaryEmbedding computes them. Nothing here calls a
// library slow path (a call inside the decode loop makes ptxas spill registers around it).
#pragma once

namespace fic {

// theta^(-2i / rotary_dim) in double: the unscaled frequency of pair i (rope.cu rescales it too).
__device__ __forceinline__ double rope_theta_freq(int i, int rotary_dim, double log2_theta) {
  return exp2(-(double)(2 * i) * log2_theta / (double)rotary_dim);
}

// inv_freq for the 8 dims [8*lane, 8*lane+8) of a head of size D (once per kernel, in double).
template <int D>
__device__ __forceinline__ void rope_freqs(int lane_in_row, float rcp_scale, double log2_theta,
                                           float (&freq)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e)
    freq[e] = (float)rope_theta_freq((lane_in_row * 8 + e) % (D / 2), D, log2_theta) * rcp_scale;
}

// sin and cos of an fp32 angle: reduce by 2*pi split in three (Cody-Waite: exact for |a| < 4e5),
// then the special-function unit on [-pi, pi] (absolute error ~5e-7).
__device__ __forceinline__ void rope_sincos(float a, float* s, float* c) {
  const float k = rintf(a * 0.15915494309189535f);
  float r = fmaf(-k, 6.28125f, a);
  r = fmaf(-k, 0.0019353071693331003f, r);
  r = fmaf(-k, 1.0253131677018246e-11f, r);
  __sincosf(r, s, c);
}

// Rotate x (this lane's 8 dims) at position pos. All lanes of the warp must call it (shuffle).
// row_base: first lane of this row group.
template <int D>
__device__ __forceinline__ void rope_apply(float (&x)[8], const float (&freq)[8], float pos,
                                           int lane_in_row, int row_base) {
  constexpr int kLanes = D / 8;
  const bool first_half = lane_in_row < kLanes / 2;
  const int partner = row_base + (lane_in_row + kLanes / 2) % kLanes;
  float y[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) y[e] = __shfl_sync(0xffffffffu, x[e], partner);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float s, c;
    rope_sincos(pos * freq[e], &s, &c);
    x[e] = first_half ? (x[e] * c - y[e] * s) : (x[e] * c + y[e] * s);
  }
}

}  // namespace fic
