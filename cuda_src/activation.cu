// Gated activations of an MLP: out = act(x[..., :d]) * x[..., d:] for SiLU, GELU (erf) and GELU
// (tanh approximation). grid.x cuts a row into chunks of blockDim.x vectors, grid.y strides over rows
// (rows may exceed the 65535 limit of grid.y). Float32 arithmetic, one rounding at the store.
#include "common/types.cuh"
#include "common/math.cuh"
#include "common/vec.cuh"
#include "common/pdl.cuh"

namespace fic {

enum Activation { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

template <int ACT>
__device__ __forceinline__ float activate(float x) {
  if (ACT == kSilu) return x * __frcp_rn(1.f + __expf(-x));  // rcp(inf) = 0: large negative x gives -0
  if (ACT == kGelu) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  const float u = 0.7978845608028654f * fmaf(0.044715f * x, x * x, x);
  return 0.5f * x * (1.f + tanh_inline(u));
}

template <typename T, int VEC, int ACT>
__global__ void __launch_bounds__(256) act_and_mul_kernel(const T* in, long long in_stride, T* out,
                                                          long long out_stride, int rows, int d) {
  pdl_begin();
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (c >= d) return;
  for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
    Vec<T, VEC> g, u, o;
    g.load_stream(in + r * in_stride + c);
    u.load_stream(in + r * in_stride + d + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.set(i, activate<ACT>(g[i]) * u[i]);
    o.store_stream(out + r * out_stride + c);
  }
}

}  // namespace fic
