// Bit packing of boolean masks (numpy.packbits semantics), per segment: segment s of the input
// (in_indptr[s] .. in_indptr[s + 1]) becomes bytes out_indptr[s] .. out_indptr[s + 1], the last one
// padded with zero bits. One thread per output byte; its segment found by binary search.
#include "common/pdl.cuh"

namespace fic {

template <bool LITTLE>
__global__ void __launch_bounds__(256)
segment_packbits_kernel(const unsigned char* __restrict__ x, const long long* __restrict__ in_indptr,
                        const long long* __restrict__ out_indptr, int num_segments,
                        unsigned char* __restrict__ out, long long out_bytes) {
  pdl_begin();
  const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= out_bytes) return;
  int lo = 0, hi = num_segments - 1;  // last segment whose out_indptr[s] <= b
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (out_indptr[mid] <= b) lo = mid; else hi = mid - 1;
  }
  const long long first = in_indptr[lo] + 8 * (b - out_indptr[lo]), end = in_indptr[lo + 1];
  unsigned int v = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const bool bit = first + i < end && x[first + i] != 0;
    v |= (unsigned int)bit << (LITTLE ? i : 7 - i);
  }
  out[b] = (unsigned char)v;
}

}  // namespace fic
