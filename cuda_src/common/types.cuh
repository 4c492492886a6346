// Element types, 8-element packs and their conversion to float.
// A "pack" is the 8 consecutive elements one thread owns along the head dim: one 16-byte access
// for 16-bit types, one 8-byte access for fp8. Kernels compute in float32 only.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace fic {

typedef __half half_t;
typedef __nv_bfloat16 bf16_t;
typedef __nv_fp8_e4m3 e4m3_t;
typedef __nv_fp8_e5m2 e5m2_t;

template <typename T> struct Pack8;
template <> struct Pack8<half_t> { typedef uint4 raw; };
template <> struct Pack8<bf16_t> { typedef uint4 raw; };
template <> struct Pack8<e4m3_t> { typedef uint2 raw; };
template <> struct Pack8<e5m2_t> { typedef uint2 raw; };

__device__ __forceinline__ float2 to_float2(half_t, unsigned int w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
__device__ __forceinline__ float2 to_float2(bf16_t, unsigned int w) {
  // bf16 -> f32 is a shift: exact and cheaper than a conversion instruction.
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ float2 to_float2(e4m3_t, unsigned short w) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}
__device__ __forceinline__ float2 to_float2(e5m2_t, unsigned short w) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w), __NV_E5M2);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// Unpack 8 elements to float.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& r, float (&f)[8]) {
  const unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 v = to_float2(T(), w[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}
template <typename T>
__device__ __forceinline__ void unpack8(const uint2& r, float (&f)[8]) {
  const unsigned int w[2] = {r.x, r.y};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float2 v = to_float2(T(), static_cast<unsigned short>(w[i] >> (16 * j)));
      f[4 * i + 2 * j] = v.x;
      f[4 * i + 2 * j + 1] = v.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  unpack8<T>(*reinterpret_cast<const typename Pack8<T>::raw*>(p), f);
}

// Float -> storage type, 8 elements as one 16-byte store (16-bit types) or two (float).
__device__ __forceinline__ unsigned int pack2(half_t, float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<unsigned int*>(&h);
}
__device__ __forceinline__ unsigned int pack2(bf16_t, float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<unsigned int*>(&h);
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[8]) {
  uint4 r;
  r.x = pack2(T(), f[0], f[1]);
  r.y = pack2(T(), f[2], f[3]);
  r.z = pack2(T(), f[4], f[5]);
  r.w = pack2(T(), f[6], f[7]);
  *reinterpret_cast<uint4*>(p) = r;
}
template <>
__device__ __forceinline__ void store8<float>(float* p, const float (&f)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
template <>
__device__ __forceinline__ void load8<float>(const float* p, float (&f)[8]) {
  float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

}  // namespace fic
