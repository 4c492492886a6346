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
// No CTA-wide barrier in the loop: each stage has a "full" mbarrier (every thread's copies into it
// landed: cp.async arrivals) and an "empty" one (all 8 warps done reading it), and each warp loads
// and stages its own Q rows, so the two warpgroups only wait for each other over a stage. Stages and
// mbarrier phases follow a tile count that runs on across items.
#include "common/types.cuh"
#include "common/math.cuh"
#include "common/async_copy.cuh"
#include "common/bulk_copy.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "common/prefill_tile.cuh"
#include "common/variant.cuh"
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
  // Q | stages | full[kStages], empty[kStages] mbarriers; + slack to align the tiles to 1024 bytes.
  static constexpr int kBarOffset = kQBytes + kStages * kStageBytes;
  static constexpr int kSmemBytes = 1024 + kBarOffset + 2 * kStages * 8;  // fi_cupy/prefill.py smem_bytes
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm_90 CTA may have");
};

// VAR: a custom attention variant (common/variant.cuh; NoVariant: none), its parameters in vparams. A Query
// transform rewrites the Q tile once an item, each warp its own rows, before the warpgroup's first wgmma. A Key
// transform rewrites each K tile once it has landed, each thread the chunks it copied; both warpgroups read
// every K row, so that costs a CTA-wide barrier a tile (the default kernel has none in its loop).
template <int D, typename T, bool PAGED, int FLAGS, typename VAR = NoVariant>
__global__ void __launch_bounds__(256, 1)
prefill_sm90_kernel(FIC_PREFILL_PARAMS(T, T), const __grid_constant__ typename VAR::Params vparams) {
  using C = PrefillSm90Cfg<D>;
  using Var = typename VAR::Variant;
  static_assert(!VAR::kActive || (FLAGS & ~kCustomMask) == 0, "Hopper variants: no soft cap");
  constexpr int KV = C::kKV, NB = KV / 8, DB = D / 8, KS = D / 16, kChunks = D / 8, kThreads = C::kThreads;
  pdl_begin();
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The 128-byte swizzle is a function of address bits 4-9: tiles start 1024-byte aligned.
  unsigned char* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  const int g = lane / 4, c = lane % 4;
  const FastDiv page_div = {page_size, page_div_mul, page_div_shift};
  constexpr bool capped = (FLAGS & kSoftCap) != 0, masked = (FLAGS & kCustomMask) != 0, alibi = (FLAGS & kAlibi) != 0;
  static_assert(!(alibi && capped), "ALiBi takes no soft cap");
  const float scale = capped ? FIC_LOG2E : sm_scale * FIC_LOG2E;
  const float cap_pre = capped ? sm_scale * ptx_rcp(soft_cap) : 0.f;

  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + C::kBarOffset);
  unsigned long long* empty = full + C::kStages;
  if (threadIdx.x == 0) {
    for (int i = 0; i < C::kStages; ++i) {
      mbarrier_init(full + i, kThreads);  // one cp.async arrival a thread
      mbarrier_init(empty + i, kThreads / 32);  // one arrival a warp
    }
    fence_barrier_init();
  }
  __syncthreads();
  unsigned gt = 0;  // tiles of earlier items (the pipeline position)

  const int n_items = *num_items;
  for (int it = blockIdx.x; it < n_items; it += gridDim.x) {
    const PrefillItem w = PrefillItem::load<C::kRows, KV>(items, it, qo_indptr, kv_indptr, kv_lens, group_size,
                                                         causal, window_left);
    const int kv_head = w.kv_head, p0 = w.p0, qo_start = w.qo_start, packed_len = w.packed_len;
    const int kv_off = w.kv_off, lo = w.lo, hi = w.hi, n_tiles = w.n_tiles;
    const long long head_off = (long long)kv_head * kv_stride_head;
    const T* k_req = k_base + (PAGED ? 0 : (long long)kv_off * kv_stride_slot) + head_off;
    const T* v_req = v_base + (PAGED ? 0 : (long long)kv_off * kv_stride_slot) + head_off;
    Var var(vparams, (uint32_t)w.req, smem);  // a variant's per-request state (nothing without one)
    const float sc = VAR::kActive ? (Var::use_softmax ? var.sm_scale_log2 : 1.f) : scale;

    __syncwarp();  // the warp's lanes are done with its Q rows (the previous epilogue staged O there)
    const int tid = (int)opaque(threadIdx.x);

    // This warp's 16 rows of the Q tile: packed rows p0 + 16 warp .. (zeros past the request).
#pragma unroll
    for (int i = 0; i < 16 * kChunks / 32; ++i) {
      const int idx = i * 32 + lane, row = warp * 16 + idx / kChunks, ch = idx % kChunks;
      const int p = p0 + row;
      const bool ok = p < packed_len;
      const int tok = ok ? p / group_size : 0, h = kv_head * group_size + (ok ? p - tok * group_size : 0);
      cp_async<16>(smem + sw128_offset<C::kRows>(row, ch),
                   q + (long long)(qo_start + tok) * q_stride_n + h * q_stride_h + ch * 8, ok);
    }

    // K/V tile t: this warpgroup's half of its rows (lo + t*KV ..; zeros past hi) into stage
    // (gt + t) % kStages, once every warp has released the stage's previous tile. Paged: the page
    // numbers of a tile's rows are loaded one tile ahead (load_pages), so no copy waits on them.
    constexpr int kStep = 128 / kChunks, kPasses = KV / 2 / kStep;
    int pid[PAGED ? kPasses : 1];
    auto load_pages = [&](int t) {
      if (!PAGED || t >= n_tiles) return;
      const int row0 = wg * (KV / 2) + (int)opaque((tid % 128) / kChunks);
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int j = lo + t * KV + row0 + i * kStep;
        pid[PAGED ? i : 0] = j < hi ? page_indices[kv_off + page_div.quot(j)] : 0;
      }
    };
    auto issue = [&](int t) {
      if (t >= n_tiles) return;
      const unsigned n = gt + t, stage = n % C::kStages;
      if (n >= C::kStages) mbarrier_wait(empty + stage, (n / C::kStages - 1) & 1);
      const int j0 = lo + t * KV;
      const int ch = tid % kChunks, row0 = wg * (KV / 2) + (int)opaque((tid % 128) / kChunks);
      const long long slot_stride = ((long long)opaque((unsigned)(kv_stride_slot >> 32)) << 32) |
                                    opaque((unsigned)kv_stride_slot);
      unsigned char* st = smem + C::kQBytes + stage * C::kStageBytes;
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int row = row0 + i * kStep, j = j0 + row;
        const bool ok = j < hi;
        long long off = 0;
        if (ok) {
          if (PAGED) {
            const unsigned pg = page_div.quot(j);
            off = (long long)pid[PAGED ? i : 0] * kv_stride_page + (long long)(j - pg * page_size) * slot_stride;
          } else {
            off = (long long)j * slot_stride;
          }
        }
        const unsigned so = sw128_offset<KV>(row, ch);
        cp_async<16>(st + so, k_req + off + ch * 8, ok);
        cp_async<16>(st + C::kTileBytes + so, v_req + off + ch * 8, ok);
      }
      cp_async_arrive_noinc(full + stage);
    };
    load_pages(0);
    issue(0);
    load_pages(1);
    issue(1);
    load_pages(2);
    if constexpr (Var::kQueryTransform) {  // each lane transforms the Q chunks it copied, once they land
      cp_async_wait_all();
#pragma unroll
      for (int i = 0; i < 16 * kChunks / 32; ++i) {
        const int idx = i * 32 + lane, row = warp * 16 + idx / kChunks, ch = idx % kChunks, p = p0 + row;
        if (p < packed_len) {
          const int tok = p / group_size, h = kv_head * group_size + p - tok * group_size;
          variant_query_chunk<T>(*reinterpret_cast<uint4*>(smem + sw128_offset<C::kRows>(row, ch)), var, vparams,
                                 w.req, tok, h, ch * 8);
        }
      }
      fence_proxy_async();   // the rewritten rows visible to wgmma
      bar_sync(1 + wg, 128); // the warpgroup's 64 rows done before its first wgmma reads them
    }

    const long long mask_base = masked ? mask_offset[w.req] * 8 : 0;
    float al_slope[1][2], al_qpos[1][2];  // ALiBi: this thread's two rows' slopes and query positions
    if (alibi) alibi_rows(al_slope, al_qpos, alibi_slopes, ptx_rcp(sm_scale), w, group_size, p0 + warp * 16, g);

    // One 16-row slice a warp (MT = 1 in common/prefill_tile.cuh's terms).
    float o[1][DB][4];
    float m[1][2], dsum[1][2];
    m[0][0] = m[0][1] = neg_inf();
    dsum[0][0] = dsum[0][1] = 0.f;
#pragma unroll
    for (int dt = 0; dt < DB; ++dt) o[0][dt][0] = o[0][dt][1] = o[0][dt][2] = o[0][dt][3] = 0.f;

    for (int t = 0; t < n_tiles; ++t) {
      const unsigned n = gt + t, stage = n % C::kStages;
      mbarrier_wait(full + stage, (n / C::kStages) & 1);
      const int j0 = lo + t * KV;
      if constexpr (Var::kKeyTransform) {  // each thread the K chunks it copied in issue(t)
        unsigned char* kt = smem + C::kQBytes + stage * C::kStageBytes;
        const int ch = tid % kChunks, row0 = wg * (KV / 2) + (int)opaque((tid % 128) / kChunks);
#pragma unroll
        for (int i = 0; i < kPasses; ++i) {
          const int row = row0 + i * kStep, j = j0 + row;
          if (j < hi)
            variant_key_chunk<T>(*reinterpret_cast<uint4*>(kt + sw128_offset<KV>(row, ch)), var, vparams, w.req, j,
                                 kv_head, ch * 8);
        }
      }
      fence_proxy_async();  // the landed (or rewritten) tile (generic proxy) visible to wgmma (the async proxy)
      if constexpr (Var::kKeyTransform) bar_sync(3, kThreads);  // every row rewritten before either warpgroup reads
      const unsigned q_addr = smem_u32(smem) + wg * 64 * 128;
      const unsigned k_addr = smem_u32(smem) + C::kQBytes + stage * C::kStageBytes;
      const unsigned v_addr = k_addr + C::kTileBytes;

      // S = Q K^T: 64 rows x KV keys a warpgroup.
      float s[1][NB][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const unsigned koff = (kk & 3) * 32;  // 16 columns = 32 bytes into the slab
        const unsigned long long da = wgmma_desc(q_addr + (kk >> 2) * (C::kRows * 128) + koff, 0, 1024);
        const unsigned long long db = wgmma_desc(k_addr + (kk >> 2) * (KV * 128) + koff, 0, 1024);
        wgmma_ss<KV, T>(s[0], da, db, kk > 0);
      }
      wgmma_commit();
      issue(t + 2);  // while the tensor cores work on S
      load_pages(t + 3);
      wgmma_wait<0>();
      wgmma_hold(s[0]);

      if constexpr (VAR::kActive) {  // the variant's hooks; the KV bound tested only on edge tiles
        if (w.edge<KV>(j0, causal, window_left, masked)) variant_scores<VAR, true>(s, var, vparams, w, group_size,
                                                                                   p0 + warp * 16, j0, g, c);
        else variant_scores<VAR, false>(s, var, vparams, w, group_size, p0 + warp * 16, j0, g, c);
      }
      if (capped) cap_scores(s, soft_cap, cap_pre);
      if (alibi) alibi_scores(s, al_slope, al_qpos, j0, c);
      // Element masks only where the tile straddles a bound.
      const bool edge = w.edge<KV>(j0, causal, window_left, masked);
      if (edge) mask_scores<1, NB, masked>(s, w, group_size, causal, window_left, mask_base, p0 + warp * 16, j0, g, c,
                                           custom_mask);

      // Online softmax, then P as the A fragments of the KV / 16 k steps of O += P V.
      constexpr bool kSoftmax = !VAR::kActive || Var::use_softmax;
      float ms[1][2];
      if (kSoftmax) softmax_rescale(s, m, dsum, o, ms, sc);
      unsigned pa[KV / 16][1][4];
#pragma unroll
      for (int kk = 0; kk < KV / 16; ++kk) {
        if (kSoftmax) make_p<T>(pa[kk], s, kk, ms, dsum, sc);
        else make_p_direct<T>(pa[kk], s, kk);  // no softmax: the variant's logits weigh V as they are
      }
      wgmma_hold(o[0]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KV / 16; ++kk)
        wgmma_rs_t<D, T>(o[0], pa[kk][0], wgmma_desc(v_addr + kk * 2048, KV * 128, 1024));
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_hold(o[0]);
      __syncwarp();
      if (lane == 0) mbarrier_arrive_cta(empty + stage);  // this warp is done with the stage
    }
    gt += n_tiles;
    if (n_tiles == 0) {  // no full barrier waited on: the warp's Q copies (in no group) may still be in flight
      cp_async_wait_all();
      __syncwarp();
    }

    // Epilogue: finish the row sums, normalise, write (directly, staged in the warp's own Q rows, or
    // as float32 partial rows).
    const int4 ie = items[2 * (int)opaque(it)];
    const RowDest dest = {ie.z, packed_len, group_size, ie.y, qo_indptr[ie.x], num_qo_heads, ie.w, lse, part_o,
                          part_lse, sinks, D, 0};
    if constexpr (VAR::kActive)
      variant_finish_rows<VAR>(o, m, dsum, var, vparams, ie.x, v_scale, warp * 16, g, c, dest);
    else
      finish_rows(o, m, dsum, scale, v_scale, warp * 16, g, c, dest);
    if (dest.prow < 0)
      store_rows<D>(o, smem, [](int r, int ch) { return sw128_offset<C::kRows>(r, ch); }, warp * 16, lane, out,
                    o_stride_n, o_stride_h, dest);
  }
}

}  // namespace fic
