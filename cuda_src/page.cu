// Paged KV cache maintenance: appending new tokens' K/V rows into their pages, and the index arrays
// that describe an append (sequence lengths; batch index and position of each appended token).
//
// Page table convention (as decode and prefill read it): request b owns pages
// kv_indices[kv_indptr[b] .. kv_indptr[b + 1]); its token at position p lives in page
// kv_indices[kv_indptr[b] + p / page_size], slot p % page_size.
#include "common/types.cuh"
#include "common/vec.cuh"
#include "common/pdl.cuh"

namespace fic {

// One CTA per token (a grid-stride loop beyond the grid); its threads cover the token's rows of all
// heads, VB bytes of K and of V each (rows are row_bytes long). The rows are loaded before the chain
// of dependent index loads (batch index -> page table -> page) resolves, so both latencies overlap.
// The copy is dtype-blind: the cache and the appended rows share a dtype. A token whose batch index,
// position or page falls outside the page table is skipped, so a bad index never writes outside the
// cache (the Python side checks indices before launch unless told not to).
template <typename I, int VB>
__global__ void __launch_bounds__(256) append_paged_kv_kernel(
    const unsigned char* key, long long k_tok, long long k_head, const unsigned char* value, long long v_tok,
    long long v_head, const I* batch_indices, const I* positions, const I* kv_indices, const I* kv_indptr,
    int batch, long long num_pages, unsigned char* k_cache, unsigned char* v_cache, long long c_page,
    long long c_slot, long long c_head, int page_size, long long nnz, int heads, int row_bytes) {
  typedef typename RawBytes<VB>::type Raw;
  constexpr int kMaxPerThread = 4;  // rows of a token held in registers at once
  pdl_begin();
  const int nv = row_bytes / VB, total = heads * nv;
  for (long long i = blockIdx.x; i < nnz; i += gridDim.x) {
    for (int j0 = 0; j0 < total; j0 += kMaxPerThread * blockDim.x) {
      Raw kx[kMaxPerThread], vx[kMaxPerThread];
#pragma unroll
      for (int u = 0; u < kMaxPerThread; ++u) {
        const int j = j0 + u * blockDim.x + threadIdx.x;
        if (j < total) {
          const int h = j / nv, c = (j - h * nv) * VB;
          kx[u] = *reinterpret_cast<const Raw*>(key + i * k_tok + h * k_head + c);
          vx[u] = *reinterpret_cast<const Raw*>(value + i * v_tok + h * v_head + c);
        }
      }
      const long long b = batch_indices[i];
      const int p = (int)positions[i];
      if (b < 0 || b >= batch || p < 0) break;
      const long long slot_idx = (long long)kv_indptr[b] + p / page_size;
      if (slot_idx >= (long long)kv_indptr[b + 1]) break;
      const long long page = kv_indices[slot_idx];
      if (page < 0 || page >= num_pages) break;
      const long long base = page * c_page + (long long)(p % page_size) * c_slot;
#pragma unroll
      for (int u = 0; u < kMaxPerThread; ++u) {
        const int j = j0 + u * blockDim.x + threadIdx.x;
        if (j < total) {
          const int h = j / nv, c = (j - h * nv) * VB;
          *reinterpret_cast<Raw*>(k_cache + base + h * c_head + c) = kx[u];
          *reinterpret_cast<Raw*>(v_cache + base + h * c_head + c) = vx[u];
        }
      }
    }
  }
}

// seq_lens[b] = max(pages_b - 1, 0) * page_size + last_page_len[b]
template <typename I>
__global__ void seq_lens_kernel(const I* kv_indptr, const I* last_page_len, int page_size, int batch, int* out) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const long long pages = (long long)kv_indptr[b + 1] - kv_indptr[b];
  out[b] = (int)((pages > 1 ? pages - 1 : 0) * page_size + last_page_len[b]);
}

// Token i of request b (append_indptr[b] <= i < append_indptr[b + 1]) is appended at position
// seq_lens[b] - (append_indptr[b + 1] - append_indptr[b]) + (i - append_indptr[b]).
template <typename I>
__global__ void batch_indices_positions_kernel(const I* append_indptr, const I* seq_lens, int batch, long long nnz,
                                               int* batch_indices, int* positions) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nnz) return;
  int lo = 0, hi = batch;  // the last b with append_indptr[b] <= i
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if ((long long)append_indptr[mid] <= i) lo = mid; else hi = mid;
  }
  const long long start = append_indptr[lo], n = (long long)append_indptr[lo + 1] - start;
  const bool in_batch = i < (long long)append_indptr[batch];
  batch_indices[i] = in_batch ? lo : -1;
  positions[i] = in_batch ? (int)((long long)seq_lens[lo] - n + (i - start)) : -1;
}

}  // namespace fic
