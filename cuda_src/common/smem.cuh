// Shared-memory addresses: the 32-bit shared-space byte address that PTX's shared-memory operands
// (ldmatrix, cp.async, mbarrier, bulk copies, mapa) take; the fence between the two proxies.
#pragma once

namespace fic {

// Shared-space byte address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Orders this thread's shared-memory accesses through the generic proxy (ld/st.shared, cp.async)
// before later ones through the async proxy (wgmma's operand reads, bulk copies' writes), both
// ways: writes made visible to wgmma, and reads finished before a bulk copy refills the buffer (an
// mbarrier release alone does not order them: the ring softmax read a refilled float4 about once
// in 1000 runs without it).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Named barrier `id` (1 to 15: 0 is __syncthreads) over `threads` threads, a multiple of 32: sync waits for
// them all, arrive counts this warp in without waiting.
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace fic
