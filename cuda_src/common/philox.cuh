// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator, so each (seed, offset, row, element) has its own random numbers, independent of the
// launch shape, and the same seed and offset give the same draws in every framework.
#pragma once

namespace fic {

__device__ __forceinline__ uint4 philox4x32(uint4 c, uint2 k) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const unsigned int hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const unsigned int hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}

// A uniform float in the open interval (0, 1) from 23 random bits: (k + 0.5) / 2^23 is exact in float32
// (24 significant bits), so the largest value is 1 - 2^-24. With 24 bits, (2^24 - 1) + 0.5 rounded to
// 2^24 and returned 1.0: a Gumbel key of +inf that made one uniformly drawn token win a row.
__device__ __forceinline__ float uniform_open(unsigned int x) {
  return ((float)(x >> 9) + 0.5f) * 1.1920928955078125e-7f;
}

// A uniform float in [0, 1) from 24 random bits (inverse-CDF targets must stay below the total).
__device__ __forceinline__ float uniform_co(unsigned int x) {
  return (float)(x >> 8) * 5.9604644775390625e-8f;
}

}  // namespace fic
