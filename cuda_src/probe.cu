// Hopper probe: one wgmma (warpgroup MMA, sm_90a only) D[64x8] = A[64x16] * B[16x8], bf16 in, f32 out.
// It proves that the NVRTC path builds arch-specific ("a") targets, which later Hopper kernels need:
// it assembles for sm_90a and is rejected for plain sm_90 (tests/test_compile_all.py checks both).
// A is row-major (M x K) and B is given as N x K (K-major), both staged in shared memory as 8x8
// "core matrices" (8 rows of 16 bytes) with no swizzle.
#include "common/smem.cuh"
#include "common/types.cuh"

namespace fic {

__device__ __forceinline__ unsigned long long smem_desc(const void* p, unsigned lbo, unsigned sbo) {
  const unsigned addr = smem_u32(p);
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
         ((unsigned long long)(sbo >> 4) << 32);
}

__global__ void __launch_bounds__(128) wgmma_probe_kernel(const bf16_t* A, const bf16_t* B, float* D,
                                                         unsigned lbo, unsigned sbo) {
  __shared__ __align__(128) bf16_t sA[64 * 16];
  __shared__ __align__(128) bf16_t sB[8 * 16];
  const int t = threadIdx.x;
  // core matrix (row block rb, k block kb) at ((rb * 2 + kb) * 64) elements; row r inside at r * 8.
  for (int i = t; i < 64 * 16; i += 128) {
    const int r = i / 16, c = i % 16;
    sA[((r / 8) * 2 + c / 8) * 64 + (r % 8) * 8 + c % 8] = A[i];
  }
  for (int i = t; i < 8 * 16; i += 128) {
    const int n = i / 16, c = i % 16;
    sB[(c / 8) * 64 + n * 8 + c % 8] = B[i];
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  const unsigned long long da = smem_desc(sA, lbo, sbo), db = smem_desc(sB, lbo, sbo);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, %4, %5, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "l"(da), "l"(db), "r"(0));
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  // Accumulator layout of m64n8: warp w owns rows 16w..16w+15; lane l holds rows l/4 and l/4 + 8,
  // columns 2*(l%4) and 2*(l%4)+1.
  const int w = t / 32, l = t % 32;
  const int r = 16 * w + l / 4, c = 2 * (l % 4);
  D[r * 8 + c] = d0;
  D[r * 8 + c + 1] = d1;
  D[(r + 8) * 8 + c] = d2;
  D[(r + 8) * 8 + c + 1] = d3;
}

}  // namespace fic
