// Fast math and integer helpers shared by all kernel families.
#pragma once

namespace fic {

#define FIC_LOG2E 1.4426950408889634f

__device__ __forceinline__ float ptx_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1/x to ~1 ulp without the IEEE slow-path call of __frcp_rn (a call inside a kernel with many live
// registers makes ptxas spill around it).
__device__ __forceinline__ float ptx_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// tanh without a library call: 1 - 2 / (e^{2|x|} + 1), with the sign restored (relative error ~1e-7
// away from 0; |x| < 2^-10 returns x, exact to fp32 there).
__device__ __forceinline__ float tanh_inline(float x) {
  const float ax = fabsf(x);
  const float t = 1.f - 2.f * ptx_rcp(ptx_exp2(2.f * FIC_LOG2E * ax) + 1.f);
  return ax < 9.765625e-4f ? x : copysignf(t, x);
}

// Division of a non-negative 32-bit integer by a run-time constant without a divide instruction
// (Granlund-Montgomery round-up method; the host computes mul and shift, see fi_cupy/_core/fastdiv.py).
struct FastDiv {
  unsigned int div, mul, shift;
  __device__ __forceinline__ unsigned int quot(unsigned int n) const {
    return (__umulhi(n, mul) + n) >> shift;
  }
};

template <int N> struct NextPow2 {
  static constexpr int value = (N <= 1) ? 1 : 2 * NextPow2<(N + 1) / 2>::value;
};
template <> struct NextPow2<1> { static constexpr int value = 1; };

}  // namespace fic
