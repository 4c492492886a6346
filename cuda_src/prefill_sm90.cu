// Prefill attention on Hopper (sm_90a): warpgroup MMA (wgmma), fp32 accumulation, online softmax in
// base 2. The second variant of cuda_src/prefill.cu behind the same API, work items and merge kernel
// (prefill.cu's header explains rows, items, masks and partial states); fi_cupy/prefill.py picks it
// on sm_90a for 16-bit K/V without RoPE.
//
// A CTA is two warpgroups over 128 packed query rows (64 each). Q stays in shared memory; K and V
// tiles of kKV keys stream through three stages of cp.async copies, stored 128-byte swizzled as
// wgmma reads them (common/wgmma.cuh). Per tile each warpgroup computes S = Q K^T (both operands
// from shared memory), masks and the online softmax in registers, then O += P V with P from
// registers (V read transposed from shared memory). The accumulators have mma.sync's m16n8 layout,
// so the masks, softmax and epilogue follow prefill.cu's with one 16-row slice a warp.
//
// Persistent CTAs stride over the items. No CTA-wide barrier in the loop: each stage has a "full"
// mbarrier (every thread's copies into it landed: cp.async arrivals) and an "empty" one (all 8
// warps done reading it), so the two warpgroups drift apart and one's softmax overlaps the other's
// MMAs. The loads run kStages - 1 tiles ahead across item boundaries (the next item's first tiles
// land while this one finishes), and each warp loads the next item's Q rows as soon as its
// warpgroup's last S of this item is done (q_full, one mbarrier a warpgroup); the output is stored
// from registers.
#include "common/types.cuh"
#include "common/math.cuh"
#include "common/vec.cuh"
#include "common/async_copy.cuh"
#include "common/bulk_copy.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "common/pdl.cuh"

namespace fic {

template <int D>
struct PrefillSm90Cfg {
  static_assert(D == 64 || D == 128, "the wgmma prefill takes head_dim 64 or 128");
  static constexpr int kThreads = 256;               // two warpgroups
  static constexpr int kRows = 128;                  // packed query rows a CTA, 64 a warpgroup
  static constexpr int kKV = 128;                    // keys a tile
  static constexpr int kStages = 3;
  static constexpr int kQBytes = kRows * D * 2;
  static constexpr int kTileBytes = kKV * D * 2;     // one K or V tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  // Q | stages | full[kStages], empty[kStages], q_full[2] mbarriers; + slack to align tiles to 1 KB.
  static constexpr int kBarOffset = kQBytes + kStages * kStageBytes;
  static constexpr int kSmemBytes = 1024 + kBarOffset + (2 * kStages + 2) * 8;
};

constexpr int kSm90SoftCap = 1, kSm90CustomMask = 2;  // as prefill.cu's kSoftCap, kCustomMask

// The KV range an item visits: [lo, hi) after the causal and window bounds, in n_tiles tiles.
struct Sm90Span {
  int lo, hi, n_tiles;
};

template <int KV, int ROWS>
__device__ __forceinline__ Sm90Span sm90_span(int4 ia, int4 ib, const int* qo_indptr, const int* kv_lens,
                                              int group_size, int causal, int window_left) {
  const int qo_len = qo_indptr[ia.x + 1] - qo_indptr[ia.x], kv_len = kv_lens[ia.x];
  const int packed_len = qo_len * group_size, delta = kv_len - qo_len;
  const int t_lo = ia.z / group_size, t_hi = (min(ia.z + ROWS, packed_len) - 1) / group_size;
  Sm90Span sp;
  sp.lo = ib.x;
  sp.hi = min(ib.y, kv_len);
  if (causal) sp.hi = min(sp.hi, t_hi + delta + 1);
  if (window_left >= 0) sp.lo = max(sp.lo, t_lo + delta - window_left);
  sp.n_tiles = sp.hi > sp.lo ? (sp.hi - sp.lo + KV - 1) / KV : 0;
  return sp;
}

template <int D, typename T, bool PAGED, int FLAGS>
__global__ void __launch_bounds__(256, 1)
prefill_sm90_kernel(const T* __restrict__ q, long long q_stride_n, long long q_stride_h,
                    const T* __restrict__ k_base, const T* __restrict__ v_base,
                    long long kv_stride_page, long long kv_stride_slot, long long kv_stride_head,
                    const int* __restrict__ qo_indptr, const int* __restrict__ kv_indptr,
                    const int* __restrict__ page_indices, const int* __restrict__ kv_lens,
                    const unsigned char* __restrict__ custom_mask, const long long* __restrict__ mask_offset,
                    const int4* __restrict__ items, const int* __restrict__ num_items,
                    T* __restrict__ out, long long o_stride_n, long long o_stride_h, float* __restrict__ lse,
                    float* __restrict__ part_o, float* __restrict__ part_lse,
                    int num_qo_heads, int group_size, unsigned int page_size, unsigned int page_div_mul,
                    unsigned int page_div_shift, int causal, int window_left, float sm_scale, float soft_cap,
                    float v_scale, float rope_rcp_scale, double rope_log2_theta) {
  using C = PrefillSm90Cfg<D>;
  constexpr int KV = C::kKV, NB = KV / 8, DB = D / 8, KS = D / 16, kChunks = D / 8, kThreads = C::kThreads;
  pdl_begin();
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The 128-byte swizzle is a function of address bits 4-9: tiles start 1024-byte aligned.
  unsigned char* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  const int g = lane / 4, c = lane % 4;
  const FastDiv page_div = {page_size, page_div_mul, page_div_shift};
  constexpr bool capped = (FLAGS & kSm90SoftCap) != 0, masked = (FLAGS & kSm90CustomMask) != 0;
  const float scale = capped ? FIC_LOG2E : sm_scale * FIC_LOG2E;
  const float cap_pre = capped ? sm_scale * ptx_rcp(soft_cap) : 0.f;

  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + C::kBarOffset);
  unsigned long long* empty = full + C::kStages;
  unsigned long long* q_full = empty + C::kStages;  // one a warpgroup: its 64 Q rows landed
  if (threadIdx.x == 0) {
    for (int i = 0; i < C::kStages; ++i) {
      mbarrier_init(full + i, kThreads);        // one cp.async arrival a thread
      mbarrier_init(empty + i, kThreads / 32);  // one arrival a warp
    }
    mbarrier_init(q_full, 128);
    mbarrier_init(q_full + 1, 128);
    fence_barrier_init();
  }
  __syncthreads();
  const int n_items = *num_items;

  // This warp's 16 rows of item it's Q tile (zeros past the request), then an arrival on q_full.
  auto load_q = [&](int it) {
    if (it >= n_items) return;
    const int4 ia = items[2 * it];
    const int qo_start = qo_indptr[ia.x], packed_len = (qo_indptr[ia.x + 1] - qo_start) * group_size;
#pragma unroll
    for (int i = 0; i < 16 * kChunks / 32; ++i) {
      const int idx = i * 32 + lane, row = warp * 16 + idx / kChunks, ch = idx % kChunks;
      const int p = ia.z + row;
      const bool ok = p < packed_len;
      const int tok = ok ? p / group_size : 0, h = ia.y * group_size + (ok ? p - tok * group_size : 0);
      cp_async<16>(smem + sw128_offset<C::kRows>(row, ch),
                   q + (long long)(qo_start + tok) * q_stride_n + h * q_stride_h + ch * 8, ok);
    }
    cp_async_arrive_noinc(q_full + wg);
  };

  // The loader: K/V tiles in the order the CTA computes them, across its items, kStages - 1 tiles
  // ahead. Tile number n goes to stage n % kStages once every warp has released the stage's previous
  // tile; each warpgroup copies half of its rows.
  int l_it = blockIdx.x, l_t = 0, l_kv_off = 0;
  long long l_head_off = 0;
  Sm90Span ls = {0, 0, 0};
  unsigned l_n = 0;
  auto l_seek = [&]() {  // from item l_it on, the first with tiles
    for (; l_it < n_items; l_it += gridDim.x) {
      const int4 ia = items[2 * l_it], ib = items[2 * l_it + 1];
      ls = sm90_span<KV, C::kRows>(ia, ib, qo_indptr, kv_lens, group_size, causal, window_left);
      if (ls.n_tiles > 0) {
        l_kv_off = kv_indptr[ia.x];
        l_head_off = (long long)ia.y * kv_stride_head;
        return;
      }
    }
  };
  auto l_issue = [&]() {
    if (l_it >= n_items) return;
    const unsigned stage = l_n % C::kStages;
    if (l_n >= C::kStages) mbarrier_wait(empty + stage, (l_n / C::kStages - 1) & 1);
    const int j0 = ls.lo + l_t * KV;
    constexpr int kStep = 128 / kChunks;
    const int tid = (int)opaque(threadIdx.x);
    const int ch = tid % kChunks, row0 = wg * (KV / 2) + (int)opaque((tid % 128) / kChunks);
    const long long slot_stride = ((long long)opaque((unsigned)(kv_stride_slot >> 32)) << 32) |
                                  opaque((unsigned)kv_stride_slot);
    const long long base = l_head_off + (PAGED ? 0 : (long long)l_kv_off * slot_stride);
    unsigned char* st = smem + C::kQBytes + stage * C::kStageBytes;
#pragma unroll
    for (int i = 0; i < KV / 2 / kStep; ++i) {
      const int row = row0 + i * kStep, j = j0 + row;
      const bool ok = j < ls.hi;
      long long off = base;
      if (ok) {
        if (PAGED) {
          const unsigned pg = page_div.quot(j);
          off += (long long)page_indices[l_kv_off + pg] * kv_stride_page + (long long)(j - pg * page_size) * slot_stride;
        } else {
          off += (long long)j * slot_stride;
        }
      }
      const unsigned so = sw128_offset<KV>(row, ch);
      cp_async<16>(st + so, k_base + off + ch * 8, ok);
      cp_async<16>(st + C::kTileBytes + so, v_base + off + ch * 8, ok);
    }
    cp_async_arrive_noinc(full + stage);
    ++l_n;
    if (++l_t == ls.n_tiles) {
      l_t = 0;
      l_it += gridDim.x;
      l_seek();
    }
  };

  load_q(blockIdx.x);
  l_seek();
#pragma unroll
  for (int i = 0; i < C::kStages - 1; ++i) l_issue();

  unsigned n = 0;  // tiles computed so far (the loader's numbering)
  int ci = 0;      // items of this CTA so far (q_full's phase)
  for (int it = blockIdx.x; it < n_items; it += gridDim.x, ++ci) {
    const int4 ia = items[2 * it], ib = items[2 * it + 1];
    const Sm90Span sp = sm90_span<KV, C::kRows>(ia, ib, qo_indptr, kv_lens, group_size, causal, window_left);
    const int req = ia.x, p0 = ia.z;
    const int qo_len = qo_indptr[req + 1] - qo_indptr[req], kv_len = kv_lens[req];
    const int packed_len = qo_len * group_size, delta = kv_len - qo_len;
    const int t_lo = p0 / group_size, t_hi = (min(p0 + C::kRows, packed_len) - 1) / group_size;
    const long long mask_base = masked ? mask_offset[req] * 8 : 0;
    const int r0 = warp * 16 + g;  // this thread's rows (tile-relative): r0 and r0 + 8

    float o[DB][4];
    float m[2], dsum[2];
    m[0] = m[1] = neg_inf();
    dsum[0] = dsum[1] = 0.f;
#pragma unroll
    for (int dt = 0; dt < DB; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    mbarrier_wait(q_full + wg, ci & 1);
    if (sp.n_tiles == 0) load_q(it + gridDim.x);  // this item reads no Q: the next one may load

    for (int t = 0; t < sp.n_tiles; ++t, ++n) {
      const unsigned stage = n % C::kStages;
      mbarrier_wait(full + stage, (n / C::kStages) & 1);
      fence_proxy_async();  // the landed copies (generic proxy) visible to wgmma (the async proxy)
      const unsigned q_addr = smem_u32(smem) + wg * 64 * 128;
      const unsigned k_addr = smem_u32(smem) + C::kQBytes + stage * C::kStageBytes;
      const unsigned v_addr = k_addr + C::kTileBytes;
      const int j0 = sp.lo + t * KV;

      // S = Q K^T: 64 rows x KV keys a warpgroup.
      float s[NB][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const unsigned koff = (kk & 3) * 32;  // 16 columns = 32 bytes into the slab
        const unsigned long long da = wgmma_desc(q_addr + (kk >> 2) * (C::kRows * 128) + koff, 0, 1024);
        const unsigned long long db = wgmma_desc(k_addr + (kk >> 2) * (KV * 128) + koff, 0, 1024);
        if (kk == 0) wgmma_ss<KV, 0, T>(s, da, db);
        else wgmma_ss<KV, 1, T>(s, da, db);
      }
      wgmma_commit();
      l_issue();  // while the tensor cores work on S
      wgmma_wait<0>();
      wgmma_hold(s);
      // The item's last S read this warpgroup's Q: the next item's rows may land there now.
      if (t == sp.n_tiles - 1) load_q(it + gridDim.x);

      if (capped) {
#pragma unroll
        for (int nt = 0; nt < NB; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] = soft_cap * tanh_inline(s[nt][e] * cap_pre);
      }

      // Element masks only where the tile straddles a bound.
      const bool edge = j0 + KV > sp.hi || (causal && j0 + KV - 1 > t_lo + delta) ||
                        (window_left >= 0 && j0 < t_hi + delta - window_left) || masked;
      if (edge) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int p = p0 + r0 + 8 * h;  // rows past the end: clamped
          const int ti = min(p, packed_len - 1) / group_size, last = causal ? ti + delta : 0x7fffffff;
          const int first = window_left >= 0 ? ti + delta - window_left : -0x7fffffff;
          const long long mrow = mask_base + (long long)ti * kv_len;
#pragma unroll
          for (int nt = 0; nt < NB; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = j0 + nt * 8 + 2 * c + e;
              bool ok = j < sp.hi && j <= last && j >= first;
              if (masked && ok) {
                const long long bit = mrow + j;
                ok = (custom_mask[bit >> 3] >> (bit & 7)) & 1;
              }
              if (!ok) s[nt][2 * h + e] = neg_inf();
            }
        }
      }

      // Online softmax: rows g and g + 8 of the warp's slice, a row over the 4 lanes of a quad.
      float ms[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = m[h];
#pragma unroll
        for (int nt = 0; nt < NB; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        ms[h] = mx == neg_inf() ? 0.f : mx * scale;
        const float alpha = ptx_exp2(m[h] * scale - ms[h]);
        m[h] = mx;
        dsum[h] *= alpha;
#pragma unroll
        for (int dt = 0; dt < DB; ++dt) {
          o[dt][2 * h] *= alpha;
          o[dt][2 * h + 1] *= alpha;
        }
      }
      // P as the A fragments of the KV / 16 k steps of O += P V.
      unsigned pa[KV / 16][4];
#pragma unroll
      for (int kk = 0; kk < KV / 16; ++kk)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float x0 = ptx_exp2(fmaf(s[2 * kk + e2][2 * h], scale, -ms[h]));
            const float x1 = ptx_exp2(fmaf(s[2 * kk + e2][2 * h + 1], scale, -ms[h]));
            dsum[h] += x0 + x1;
            pa[kk][e2 * 2 + h] = pack2(T(), x0, x1);
          }
      wgmma_hold(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KV / 16; ++kk)
        wgmma_rs_t<D, T>(o, pa[kk], wgmma_desc(v_addr + kk * 2048, KV * 128, 1024));
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_hold(o);
      __syncwarp();
      if (lane == 0) mbarrier_arrive_cta(empty + stage);  // this warp is done with the stage
    }

    // Epilogue: finish the row sums, normalise, write straight from registers (the Q rows may
    // already hold the next item's queries): the output rows, or float32 partial rows.
    const int4 ie = items[2 * (int)opaque(it)];
    const int kv_head = ie.y, prow = ie.w, qo_start = qo_indptr[ie.x];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float d = dsum[h];
      d += __shfl_xor_sync(0xffffffffu, d, 1);
      d += __shfl_xor_sync(0xffffffffu, d, 2);
      const float inv = d > 0.f ? ptx_rcp(d) * v_scale : 0.f;
      const float l = d > 0.f ? (m[h] * scale + __log2f(d)) : neg_inf();
      const int r = r0 + 8 * h, p = p0 + r;
      if (p >= packed_len) continue;
      const int ti = p / group_size, head = kv_head * group_size + p - ti * group_size;
      if (c == 0) {
        if (prow >= 0) part_lse[prow + r] = l;
        else if (lse != nullptr) lse[(long long)(qo_start + ti) * num_qo_heads + head] = l;
      }
      if (prow >= 0) {
        float* dst = part_o + (long long)(prow + r) * D + 2 * c;
#pragma unroll
        for (int dt = 0; dt < DB; ++dt)
          *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
      } else {
        T* dst = out + (long long)(qo_start + ti) * o_stride_n + head * o_stride_h + 2 * c;
#pragma unroll
        for (int dt = 0; dt < DB; ++dt)
          *reinterpret_cast<unsigned*>(dst + dt * 8) = pack2(T(), o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
      }
    }
  }
}

}  // namespace fic
