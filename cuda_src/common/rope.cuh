// Rotary position embedding (Llama / GPT-NeoX "rotate half" form) applied to one 8-element pack.
// Element i of the head is paired with element i +- D/2, which lives in another lane of the same
// row group; freq and sin/cos are computed in fp32 as Hugging Face's LlamaRotaryEmbedding does.
#pragma once

namespace fic {

// inv_freq for the 8 dims [8*lane, 8*lane+8) of a head of size D.
template <int D>
__device__ __forceinline__ void rope_freqs(int lane_in_row, float rcp_scale, float theta,
                                           float (&freq)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    int i = (lane_in_row * 8 + e) % (D / 2);
    freq[e] = rcp_scale / powf(theta, float(2 * i) / float(D));
  }
}

// Rotate x (this lane's 8 dims) at position pos. All lanes of the warp must call it (shuffle).
// row_base: first lane of this row group; lanes_per_row: active lanes (D/8) in the row group.
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
    sincosf(pos * freq[e], &s, &c);
    x[e] = first_half ? (x[e] * c - y[e] * s) : (x[e] * c + y[e] * s);
  }
}

}  // namespace fic
