// Element-wise vectors: N consecutive elements of T moved as one aligned access (N * sizeof(T) bytes,
// at most 16) and converted to float. The element-wise families (norm, activation, rope, cascade) are
// templated on N so one source serves 16-byte, narrower and scalar accesses.
#pragma once
#include "types.cuh"

namespace fic {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) { return __half2float(x); }
__device__ __forceinline__ float to_float(bf16_t x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }

template <int BYTES> struct RawBytes;
template <> struct RawBytes<1> { typedef unsigned char type; };
template <> struct RawBytes<2> { typedef unsigned short type; };
template <> struct RawBytes<4> { typedef unsigned int type; };
template <> struct RawBytes<8> { typedef uint2 type; };
template <> struct RawBytes<16> { typedef uint4 type; };
struct __align__(16) Raw32 { uint4 lo, hi; };  // float32 weights beside 16-bit activations
template <> struct RawBytes<32> { typedef Raw32 type; };

// N elements of T in the registers of one thread, loaded and stored as one access (two for 32 bytes).
template <typename T, int N>
struct Vec {
  typedef typename RawBytes<N * sizeof(T)>::type Raw;
  union { Raw raw; T e[N]; } u;

  __device__ __forceinline__ void load(const T* p) { u.raw = *reinterpret_cast<const Raw*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Raw*>(p) = u.raw; }
  // Streaming (evict-first) variants for data read or written once.
  __device__ __forceinline__ void load_stream(const T* p) { u.raw = __ldcs(reinterpret_cast<const Raw*>(p)); }
  __device__ __forceinline__ void store_stream(T* p) const { __stcs(reinterpret_cast<Raw*>(p), u.raw); }
  __device__ __forceinline__ float operator[](int i) const { return to_float(u.e[i]); }
  __device__ __forceinline__ void set(int i, float x) { u.e[i] = from_float<T>(x); }
};

// Warp and block sums (every thread of the block gets the total). `scratch` holds one float per
// warp of a row team of blockDim.x threads; rows of a CTA (threadIdx.y) reduce independently.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float row_sum(float x, float* scratch) {
  x = warp_sum(x);
  const int warps = blockDim.x >> 5;
  if (warps == 1) return x;
  float* mine = scratch + threadIdx.y * 32;
  __syncthreads();  // scratch may still be read by a previous call
  if ((threadIdx.x & 31) == 0) mine[threadIdx.x >> 5] = x;
  __syncthreads();
  x = (threadIdx.x & 31) < warps ? mine[threadIdx.x & 31] : 0.f;
  return warp_sum(x);
}

}  // namespace fic
