// Shared-memory addresses: the 32-bit shared-space byte address that PTX's shared-memory operands
// (ldmatrix, cp.async, mbarrier, bulk copies, mapa) take.
#pragma once

namespace fic {

// Shared-space byte address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

}  // namespace fic
