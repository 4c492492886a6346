// Thread-block clusters (sm_90+): rank, barrier, and writes to another CTA's shared memory (DSMEM).
// Kernels guard their cluster code with FIC_HAS_CLUSTERS so that the same source compiles for sm_80.
#pragma once
#include "smem.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FIC_HAS_CLUSTERS 1
#else
#define FIC_HAS_CLUSTERS 0
#endif

namespace fic {

#if FIC_HAS_CLUSTERS
__device__ __forceinline__ unsigned int cluster_rank() {
  unsigned int r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ unsigned int cluster_size() {
  unsigned int n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
  return n;
}
// The cluster barrier in two halves, for work that needs no peer between them: every thread of
// every CTA arrives, then each thread's wait returns once all have arrived, and writes before any
// arrival are visible to reads after the wait.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// Every thread of every CTA of the cluster: writes before it are visible to reads after it.
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}
// The shared-memory address of `p` (this CTA's) in CTA `rank` of the cluster, for cluster_store and
// remote mbarrier arrivals.
__device__ __forceinline__ unsigned int cluster_addr(const void* p, unsigned int rank) {
  unsigned int remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(p)), "r"(rank));
  return remote;
}
// Write `v` at cluster address `remote` (another CTA's shared memory).
__device__ __forceinline__ void cluster_store(unsigned int remote, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
}
#endif

}  // namespace fic
