// Bulk copies (the TMA's 1-D mode, sm_90+) from global to shared memory, and the mbarriers that say
// when a load has landed or a buffer is free again. One thread issues a copy of any multiple of 16
// bytes (both addresses 16-byte aligned); the SM's threads stay free while it is in flight. Guard
// uses with FIC_HAS_CLUSTERS (cluster.cuh), which is also the sm_90 test.
#pragma once

#include "cluster.cuh"

namespace fic {

#if FIC_HAS_CLUSTERS
// An mbarrier that completes a phase when `count` threads have arrived and the bytes they announced
// have landed. Call fence_barrier_init() and __syncthreads() before any use.
__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, unsigned int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// One arrival that also announces `bytes` still to land on the barrier (0: a plain arrival).
__device__ __forceinline__ void mbarrier_arrive_expect(unsigned long long* bar, unsigned int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
// One arrival releasing at CTA scope only: cheap after global stores, which a cluster-scope release
// would wait on. For barriers that only this CTA's threads wait on.
__device__ __forceinline__ void mbarrier_arrive_cta(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// Wait until the phase with parity `parity` (0 for the first, then alternating) has completed.
// CLUSTER: also see the writes that other CTAs of the cluster made before arriving
// (mbarrier_arrive_remote).
template <bool CLUSTER = false>
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, unsigned int parity) {
  unsigned int done;
  do {
    if (CLUSTER)
      asm volatile(
          "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n\t"
          "selp.u32 %0, 1, 0, p;\n\t}"
          : "=r"(done)
          : "r"(smem_u32(bar)), "r"(parity)
          : "memory");
    else
      asm volatile(
          "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
          : "=r"(done)
          : "r"(smem_u32(bar)), "r"(parity)
          : "memory");
  } while (!done);
}
// Arrive on the barrier at cluster address `remote_bar` (cluster_addr: another CTA's), releasing this
// thread's earlier writes to it.
__device__ __forceinline__ void mbarrier_arrive_remote(unsigned int remote_bar) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote_bar) : "memory");
}

// global -> shared, completing on `bar` (announce the bytes with mbarrier_arrive_expect first).
__device__ __forceinline__ void bulk_load(void* smem, const void* gmem, unsigned int bytes,
                                          unsigned long long* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
#endif

}  // namespace fic
