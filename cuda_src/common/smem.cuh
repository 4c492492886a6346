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

}  // namespace fic
