// Multi-head latent attention on Hopper (sm_90a), absorbed form (fi_cupy/mla.py): every query head
// attends over one shared compressed cache, Q/K = [ckv (512) | kpe (64)], V = ckv. The prefill
// kernels' ABI, work items, partial rows and merge (common/prefill_tile.cuh) with one KV head whose
// group is every query head: a CTA's 64 packed rows are 64 (token, head) pairs of one request, so
// each K/V tile read from memory serves 64 heads.
//
// A CTA is two warpgroups over the same 64 rows. The O accumulator (64 x 512 fp32) is too large for
// one warpgroup, so warpgroup wg owns output columns 256 wg .. 256 wg + 255 (128 registers a
// thread). A K tile (64 keys x 576) is read once into shared memory and serves as V too (its first
// 512 columns, read transposed). Per tile:
//  1. S = Q K^T, split by keys: warpgroup wg scores keys 32 wg .. 32 wg + 31 (Q and K from shared
//     memory), so neither computes the other's scores;
//  2. the row maxima are exchanged through shared memory (both warpgroups rescale by the same max);
//  3. each writes its P (bf16/fp16) into a shared 64 x 64 P tile;
//  4. O[:, own columns] += P V with P and V from shared memory.
// Row sums are per warpgroup (own keys) and added at the end. Q, two K stages and P take 224 KB;
// the stages are filled with cp.async and tracked by "full" / "empty" mbarriers as in
// prefill_sm90.cu, page numbers loaded a tile ahead.
#include "common/types.cuh"
#include "common/math.cuh"
#include "common/async_copy.cuh"
#include "common/bulk_copy.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "common/prefill_tile.cuh"
#include "common/pdl.cuh"

namespace fic {

struct MlaSm90Cfg {
  static constexpr int kCkv = 512, kKpe = 64, kD = kCkv + kKpe;  // V/O width; Q/K width
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kRows = 64;      // packed rows a CTA (both warpgroups)
  static constexpr int kKV = 64;        // keys a tile, 32 scored by each warpgroup
  static constexpr int kStages = 2;
  static constexpr int kSlab = 64 * 128;  // 64 rows of 64 16-bit columns (128-byte swizzle)
  static constexpr int kQBytes = kRows * kD * 2;
  static constexpr int kTileBytes = kKV * kD * 2;
  static constexpr int kPOffset = kQBytes + kStages * kTileBytes;  // P: 64 rows x 64 keys, one slab
  static constexpr int kRedOffset = kPOffset + kSlab;               // float [2][64]: row maxima / sums
  static constexpr int kBarOffset = kRedOffset + 2 * kRows * 4;
  static constexpr int kSmemBytes = 1024 + kBarOffset + 2 * kStages * 8;  // fi_cupy/prefill.py smem_bytes
  static_assert(kRows == 64 && kKV == 64, "a slab holds 64 rows: Q, K and P tiles are slabs of 64 rows");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm_90 CTA may have");
};

// Copies row `row` (64 + 8 chunks of 16 bytes: ckv then kpe) of a 576-wide tile, a warp a row: lanes
// take ckv chunks lane and lane + 32, lanes 0..7 kpe chunk lane. ok = false zero-fills.
template <typename T>
__device__ __forceinline__ void mla_copy_row(unsigned char* tile, int row, const T* ckv, const T* kpe, bool ok,
                                             int lane) {
  cp_async<16>(tile + sw128_offset<64>(row, lane), ckv + lane * 8, ok);
  cp_async<16>(tile + sw128_offset<64>(row, lane + 32), ckv + (lane + 32) * 8, ok);
  if (lane < 8) cp_async<16>(tile + sw128_offset<64>(row, 64 + lane), kpe + lane * 8, ok);
}

template <typename T>
__global__ void __launch_bounds__(256, 1)
mla_sm90_kernel(FIC_PREFILL_PARAMS(T, T)) {
  using C = MlaSm90Cfg;
  constexpr int KV = C::kKV, KS = C::kD / 16;
  pdl_begin();
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The 128-byte swizzle is a function of address bits 4-9: tiles start 1024-byte aligned.
  unsigned char* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4, wq = warp % 4;
  const int g = lane / 4, c = lane % 4;
  const FastDiv page_div = {page_size, page_div_mul, page_div_shift};
  const float scale = sm_scale * FIC_LOG2E;
  float* red = reinterpret_cast<float*>(smem + C::kRedOffset);
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + C::kBarOffset);
  unsigned long long* empty = full + C::kStages;
  if (threadIdx.x == 0) {
    for (int i = 0; i < C::kStages; ++i) {
      mbarrier_init(full + i, C::kThreads);      // one cp.async arrival a thread
      mbarrier_init(empty + i, C::kThreads / 32);  // one arrival a warp
    }
    fence_barrier_init();
  }
  unsigned gt = 0;  // tiles of earlier items (the pipeline position)

  const int n_items = *num_items;
  for (int it = blockIdx.x; it < n_items; it += gridDim.x) {
    // Every warp is done with the previous item's shared memory (its O staged in the Q tile), and
    // the barriers are initialised.
    __syncthreads();
    const PrefillItem w = PrefillItem::load<C::kRows, KV>(items, it, qo_indptr, kv_indptr, kv_lens, group_size,
                                                         causal, -1);
    const int p0 = w.p0, lo = w.lo, hi = w.hi, n_tiles = w.n_tiles;

    // Q: packed row r = (token, head) pair p0 + r; a warp a row, rows warp + 8 i.
#pragma unroll
    for (int i = 0; i < C::kRows / 8; ++i) {
      const int row = warp + 8 * i, p = p0 + row;
      const bool ok = p < w.packed_len;
      const int tok = ok ? p / group_size : 0, h = ok ? p - tok * group_size : 0;
      const long long tq = w.qo_start + tok;
      mla_copy_row(smem, row, q + tq * q_stride_n + h * q_stride_h, q_pe + tq * q_pe_stride_n + h * q_pe_stride_h,
                   ok, lane);
    }

    // K tile t (keys lo + 64 t ..; zeros past hi) into stage (gt + t) % 2 once all 8 warps released
    // the stage's previous tile. Lane i < 8 looks up the page of the warp's row warp + 8 i a tile
    // ahead (offsets), so no copy waits on a page number.
    long long ckv_off = 0, kpe_off = 0;
    auto offsets = [&](int t) {
      if (t >= n_tiles || lane >= 8) return;
      const int j = lo + t * KV + warp + 8 * lane;
      if (j >= hi) return;
      const unsigned pg = page_div.quot(j);
      const long long pid = page_indices[w.kv_off + pg], slot = j - pg * page_size;
      ckv_off = pid * kv_stride_page + slot * kv_stride_slot;
      kpe_off = pid * k_pe_stride_page + slot * k_pe_stride_slot;
    };
    auto issue = [&](int t) {
      if (t >= n_tiles) return;
      const unsigned n = gt + t, stage = n % C::kStages;
      if (n >= C::kStages) mbarrier_wait(empty + stage, (n / C::kStages - 1) & 1);
      unsigned char* st = smem + C::kQBytes + stage * C::kTileBytes;
#pragma unroll
      for (int i = 0; i < KV / 8; ++i) {
        const int row = warp + 8 * i;
        const long long co = __shfl_sync(0xffffffffu, ckv_off, i), po = __shfl_sync(0xffffffffu, kpe_off, i);
        mla_copy_row(st, row, k_base + co, k_pe + po, lo + t * KV + row < hi, lane);
      }
      cp_async_arrive_noinc(full + stage);
    };
    offsets(0);
    issue(0);
    offsets(1);
    issue(1);
    offsets(2);

    float o[1][32][4];  // rows 16 wq + g (+ 8) of the tile, columns 256 wg + 8 dt + 2 c (+ 1)
    float m[2] = {neg_inf(), neg_inf()}, dsum[2] = {0.f, 0.f};
#pragma unroll
    for (int dt = 0; dt < 32; ++dt) o[0][dt][0] = o[0][dt][1] = o[0][dt][2] = o[0][dt][3] = 0.f;
    const unsigned q_addr = smem_u32(smem), p_addr = q_addr + C::kPOffset;

    for (int t = 0; t < n_tiles; ++t) {
      const unsigned n = gt + t, stage = n % C::kStages;
      mbarrier_wait(full + stage, (n / C::kStages) & 1);
      fence_proxy_async();  // the landed copies (generic proxy) visible to wgmma (the async proxy)
      const unsigned k_addr = q_addr + C::kQBytes + stage * C::kTileBytes;
      const int j0 = lo + t * KV;

      // 1. S = Q K^T over this warpgroup's 32 keys (rows 32 wg .. of the K slabs).
      float s[1][4][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const unsigned koff = (kk >> 2) * C::kSlab + (kk & 3) * 32;  // 16 columns = 32 bytes into the slab
        wgmma_ss<32, T>(s[0], wgmma_desc(q_addr + koff, 0, 1024), wgmma_desc(k_addr + wg * 32 * 128 + koff, 0, 1024),
                        kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_hold(s[0]);
      if (w.edge<KV>(j0, causal, -1, false))
        mask_scores<1, 4, false>(s, w, group_size, causal, -1, 0, p0 + wq * 16, j0 + wg * 32, g, c, nullptr);

      // 2. The rows' maxima over all 64 keys: own 32 keys over the quad, then the other warpgroup's.
      float ms[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = neg_inf();
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mx = fmaxf(mx, fmaxf(s[0][nt][2 * h], s[0][nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        ms[h] = mx;
        if (c == 0) red[wg * 64 + wq * 16 + g + 8 * h] = mx;
      }
      __syncthreads();  // (a) both warpgroups' maxima written
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float mx = fmaxf(m[h], fmaxf(ms[h], red[(1 - wg) * 64 + wq * 16 + g + 8 * h]));
        ms[h] = mx == neg_inf() ? 0.f : mx * scale;
        const float alpha = ptx_exp2(m[h] * scale - ms[h]);
        m[h] = mx;
        dsum[h] *= alpha;
#pragma unroll
        for (int dt = 0; dt < 32; ++dt) {
          o[0][dt][2 * h] *= alpha;
          o[0][dt][2 * h + 1] *= alpha;
        }
      }

      // 3. P of this warpgroup's keys into columns 32 wg .. of the P tile. The previous tile's P V of
      // both warpgroups is done: each waited for its wgmma before reaching (a).
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float x0 = ptx_exp2(fmaf(s[0][nt][2 * h], scale, -ms[h]));
          const float x1 = ptx_exp2(fmaf(s[0][nt][2 * h + 1], scale, -ms[h]));
          dsum[h] += x0 + x1;
          *reinterpret_cast<unsigned*>(smem + C::kPOffset + sw128_offset<64>(wq * 16 + g + 8 * h, wg * 4 + nt) +
                                       4 * c) = pack2(T(), x0, x1);
        }
      fence_proxy_async();  // P (generic-proxy stores) visible to wgmma
      __syncthreads();      // (b) the whole P tile written; the maxima read (the next tile may overwrite them)

      // 4. O[:, own columns] += P V: V = the tile's ckv columns 256 wg .., read transposed (MN-major).
      wgmma_hold(o[0]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < KV / 16; ++kk)
        wgmma_ss_t<256, T>(o[0], wgmma_desc(p_addr + kk * 32, 0, 1024),
                           wgmma_desc(k_addr + wg * 4 * C::kSlab + kk * 2048, C::kSlab, 1024));
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_hold(o[0]);
      __syncwarp();
      if (lane == 0) mbarrier_arrive_cta(empty + stage);  // this warp is done with the stage
      issue(t + 2);
      offsets(t + 3);
    }
    gt += n_tiles;
    if (n_tiles == 0) cp_async_wait_all();  // no full barrier waited on: the Q copies may still be in flight

    // Row sums over both warpgroups' keys (the maxima of the last tile were read before (b)).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      dsum[h] += __shfl_xor_sync(0xffffffffu, dsum[h], 1);
      dsum[h] += __shfl_xor_sync(0xffffffffu, dsum[h], 2);
      if (c == 0) red[wg * 64 + wq * 16 + g + 8 * h] = dsum[h];
    }
    __syncthreads();  // also: every S of the item is done, so the Q tile may stage O
#pragma unroll
    for (int h = 0; h < 2; ++h)  // finish_rows sums over the quad again: one lane carries the total
      dsum[h] = c == 0 ? dsum[h] + red[(1 - wg) * 64 + wq * 16 + g + 8 * h] : 0.f;

    float mm[1][2] = {{m[0], m[1]}}, dd[1][2] = {{dsum[0], dsum[1]}};
    const int4 ie = items[2 * (int)opaque(it)];
    // Both warpgroups hold the same rows: the first writes the lse (partial lse rows get equal values).
    const RowDest dest = {ie.z, w.packed_len, group_size, 0, w.qo_start, num_qo_heads, ie.w, wg == 0 ? lse : nullptr,
                          part_o, part_lse, sinks, C::kCkv, wg * 256};
    finish_rows(o, mm, dd, scale, 1.f, wq * 16, g, c, dest);
    if (dest.prow < 0)  // staged in this warpgroup's 32 KB of the Q tile
      store_rows<256>(o, smem + wg * 4 * C::kSlab, [](int r, int ch) { return sw128_offset<64>(r, ch); }, wq * 16,
                      lane, out, o_stride_n, o_stride_h, dest);
  }
}

}  // namespace fic
