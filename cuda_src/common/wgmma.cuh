// Warpgroup MMA (wgmma, sm_90a only): D (64 x N, fp32) += A (64 x 16) * B (16 x N), 16-bit inputs.
// A 128-thread warpgroup issues it together; it runs asynchronously until wgmma_wait. The fp32
// accumulator of a thread is d[N / 8][4] in the mma.sync m16n8 layout: warp w of the warpgroup holds
// rows 16w + l / 4 (+ 8), columns 8j + 2 (l % 4) (+ 1) of block j, so code written for m16n8 tiles
// (masks, online softmax, epilogues) works on it unchanged.
//
// Operands from shared memory are described by 64-bit descriptors (wgmma_desc). Every tile here uses
// the 128-byte swizzle: a tile of R rows x C 16-bit columns is stored as C / 64 slabs of R rows of
// 128 bytes, 16-byte chunk k of row r at chunk k ^ (r % 8), slabs 1024-byte aligned (sw128_offset).
//  - K-major operand (the reduction dim contiguous: Q, K): rows 8 apart are 1024 bytes apart (SBO),
//    a 16-wide k step moves the start 32 bytes inside a slab, or to the next slab.
//  - MN-major operand (V, whose reduction dim is the key): the 16 keys of a k step are 16 rows, 2048
//    bytes; 8-key groups are 1024 bytes apart (SBO) and 64-column slabs LBO bytes apart; transposed
//    (imm-trans-b = 1).
#pragma once
#include "smem.cuh"
#include "types.cuh"

namespace fic {

// Byte offset of 16-byte chunk k (8 elements) of row r in a 128-byte-swizzled tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ unsigned sw128_offset(int r, int k) {
  return (unsigned)((k >> 3) * (ROWS * 128) + r * 128 + (((k & 7) ^ (r & 7)) << 4));
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte offsets.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned addr, unsigned lbo, unsigned sbo) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
         ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses of the accumulator across an asynchronous wgmma region.
template <int NB>
__device__ __forceinline__ void wgmma_hold(float (&d)[NB][4]) {
#pragma unroll
  for (int j = 0; j < NB; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// d (+)= A * B, A and B from shared memory, both K-major; scale_d = 0 overwrites d (a constant where
// the k loop is unrolled, so the predicate folds away).
template <int N, typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], unsigned long long a, unsigned long long b,
                                         int scale_d);
// d += A * B, A from registers (the m16n8k16 A fragment of this warp's 16 rows), B from shared memory,
// MN-major (transposed).
template <int N, typename T>
__device__ __forceinline__ void wgmma_rs_t(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long b);

// d += A * B, A and B from shared memory, A K-major, B MN-major (transposed): P V with P staged in
// shared memory (the MLA kernel's second warpgroup takes P from the first).
template <int N, typename T>
__device__ __forceinline__ void wgmma_ss_t(float (&d)[N / 8][4], unsigned long long a, unsigned long long b);

// The instructions for the shapes the kernels issue (prefill: S with N = 128 keys, O with N = head_dim
// 64 or 128; MLA: S with N = 64 keys, O with N = 256 columns), each written once for both 16-bit
// types (TY: bf16 or f16). D_REGS / ACC: the N / 2 accumulator operands; the operand numbers after
// them are given as text.
#define FIC_WGMMA_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FIC_WGMMA_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define FIC_WGMMA_R128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define FIC_WGMMA_ACC1(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FIC_WGMMA_ACC4(j) FIC_WGMMA_ACC1(j), FIC_WGMMA_ACC1(j + 1), FIC_WGMMA_ACC1(j + 2), FIC_WGMMA_ACC1(j + 3)
#define FIC_WGMMA_ACC8(j) FIC_WGMMA_ACC4(j), FIC_WGMMA_ACC4(j + 4)
#define FIC_WGMMA_ACC16(j) FIC_WGMMA_ACC8(j), FIC_WGMMA_ACC8(j + 8)
#define FIC_WGMMA_ACC32(j) FIC_WGMMA_ACC16(j), FIC_WGMMA_ACC16(j + 16)

#define FIC_WGMMA_SS(N, T, TY, D_REGS, ACC, A, B, SCALE_D)                                                  \
  template <>                                                                                              \
  __device__ __forceinline__ void wgmma_ss<N, T>(float (&d)[N / 8][4], unsigned long long a,                \
                                                 unsigned long long b, int scale_d) {                      \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n"                                     \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " D_REGS ", " A ", " B          \
                 ", p, 1, 1, 0, 0;\n}\n"                                                                    \
                 : ACC                                                                                     \
                 : "l"(a), "l"(b), "r"(scale_d));                                                          \
  }
#define FIC_WGMMA_SS_T(N, T, TY, D_REGS, ACC, A, B)                                                        \
  template <>                                                                                              \
  __device__ __forceinline__ void wgmma_ss_t<N, T>(float (&d)[N / 8][4], unsigned long long a,              \
                                                   unsigned long long b) {                                 \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " D_REGS ", " A ", " B          \
                 ", 1, 1, 1, 0, 1;\n"                                                                       \
                 : ACC                                                                                     \
                 : "l"(a), "l"(b));                                                                        \
  }
#define FIC_WGMMA_RS_T(N, T, TY, D_REGS, ACC, A, B, ONE)                                                    \
  template <>                                                                                              \
  __device__ __forceinline__ void wgmma_rs_t<N, T>(float (&d)[N / 8][4], const unsigned (&a)[4],            \
                                                   unsigned long long b) {                                 \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " ONE ", 0;\n"                                         \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " D_REGS ", " A ", " B          \
                 ", p, 1, 1, 1;\n}\n"                                                                       \
                 : ACC                                                                                     \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                            \
  }
#define FIC_WGMMA_ALL(T, TY)                                                                               \
  FIC_WGMMA_SS(64, T, TY, FIC_WGMMA_R32, FIC_WGMMA_ACC8(0), "%32", "%33", "%34")                           \
  FIC_WGMMA_SS(128, T, TY, FIC_WGMMA_R64, FIC_WGMMA_ACC16(0), "%64", "%65", "%66")                         \
  FIC_WGMMA_SS_T(256, T, TY, FIC_WGMMA_R128, FIC_WGMMA_ACC32(0), "%128", "%129")                           \
  FIC_WGMMA_RS_T(64, T, TY, FIC_WGMMA_R32, FIC_WGMMA_ACC8(0), "{%32, %33, %34, %35}", "%36", "%37")        \
  FIC_WGMMA_RS_T(128, T, TY, FIC_WGMMA_R64, FIC_WGMMA_ACC16(0), "{%64, %65, %66, %67}", "%68", "%69")      \
  FIC_WGMMA_RS_T(256, T, TY, FIC_WGMMA_R128, FIC_WGMMA_ACC32(0), "{%128, %129, %130, %131}", "%132", "%133")

FIC_WGMMA_ALL(bf16_t, "bf16")
FIC_WGMMA_ALL(half_t, "f16")

#undef FIC_WGMMA_ALL
#undef FIC_WGMMA_RS_T
#undef FIC_WGMMA_SS_T
#undef FIC_WGMMA_SS
#undef FIC_WGMMA_ACC32
#undef FIC_WGMMA_ACC16
#undef FIC_WGMMA_ACC8
#undef FIC_WGMMA_ACC4
#undef FIC_WGMMA_ACC1
#undef FIC_WGMMA_R128
#undef FIC_WGMMA_R64
#undef FIC_WGMMA_R32

}  // namespace fic
