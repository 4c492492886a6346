// Programmatic dependent launch (sm_90+). A kernel launched with the PDL attribute may start while the
// kernel before it on the stream is finishing; pdl_begin() lets the next kernel be scheduled as soon
// as every CTA of this one has started, then waits until the previous kernel has completed and its
// writes are visible. Call it before the first global memory access. Without the attribute, or
// before sm_90, it costs nothing.
#pragma once

namespace fic {

__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace fic
