// cp.async (sm_80+): global -> shared copies that do not hold registers while in flight, so a warp
// can keep many tiles of a stream in the air. A copy with valid == false writes zeros and reads
// nothing (src-size 0), which keeps masked rows finite.
#pragma once
#include "smem.cuh"

namespace fic {

template <int N>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool valid) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async moves 4, 8 or 16 bytes");
  const unsigned s = smem_u32(smem);
  const int src_size = valid ? N : 0;
  if (N == 16) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global.L2::128B [%0], [%1], %2, %3;\n" ::"r"(s), "l"(gmem), "n"(N),
                 "r"(src_size)
                 : "memory");
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Every cp.async this thread issued has landed, committed to a group or not (wait_group alone skips
// copies not yet committed: a kernel that issued some outside its pipeline's groups needs this).
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Arrive on the shared-memory mbarrier `bar` once every cp.async this thread issued before has landed.
// noinc: the arrival counts towards the barrier's expected count (one per thread a phase).
__device__ __forceinline__ void cp_async_arrive_noinc(unsigned long long* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

}  // namespace fic
