// Multi-head latent attention on Hopper (sm_90a), absorbed form (fi_cupy/mla.py): every query head
// attends over one shared compressed cache, Q/K = [ckv (512) | kpe (64)], V = ckv. The prefill
// kernels' ABI, work items, partial rows and merge (common/prefill_tile.cuh) with one KV head whose
// group is every query head: a CTA's 64 packed rows are 64 (token, head) pairs of one request, so
// each K/V tile read from memory serves 64 heads.
//
// A CTA is two warpgroups over the same 64 rows. The O accumulator (64 x 512 fp32) is too large for
// one warpgroup, so warpgroup wg owns output columns 256 wg .. 256 wg + 255 (128 registers a
// thread). A K tile (64 keys x 576) is read once into shared memory and serves as V too (its first
// 512 columns, read transposed). The roles, per tile t:
//  - warpgroup 0 (softmax): S = Q K^T over all 64 keys (m64n64 wgmma, Q and K from shared memory),
//    the online softmax, P into a shared P tile and each row's rescale factor beside it, then
//    O[:, 0:256] += P V with P from its registers;
//  - warpgroup 1 (loads and the other half): rescales O[:, 256:512] by the factors and adds P V with
//    P from the shared tile, then issues the copies of tile t + 2 (Q and every K tile: cp.async).
// Scoring once (not once a warpgroup) keeps the shared-memory reads of Q at one pass a tile; the
// two P V halves run on the tensor cores together. Named
// barriers hand the P tile over: 1 "P full" (0 arrives, 1 waits), 2 "P free" (1 arrives, 0 waits).
// Q, two K stages and P take 224 KB; the stages are tracked by "full" / "empty" mbarriers as in
// prefill_sm90.cu, page numbers loaded a tile ahead. Warpgroup 0 keeps the row maxima and sums
// and hands them to warpgroup 1 for the epilogue.
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
  static constexpr int kKV = 64;        // keys a tile
  static constexpr int kStages = 2;
  static constexpr int kSlab = 64 * 128;  // 64 rows of 64 16-bit columns (128-byte swizzle)
  static constexpr int kQBytes = kRows * kD * 2;
  static constexpr int kTileBytes = kKV * kD * 2;
  static constexpr int kPOffset = kQBytes + kStages * kTileBytes;  // P: 64 rows x 64 keys, one slab
  static constexpr int kRedOffset = kPOffset + kSlab;               // float [2][64]: rescale factors / m, sums
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

// Named barriers between the two warpgroups (id 0 is __syncthreads).
constexpr int kBarPFull = 1, kBarPFree = 2;

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
      mbarrier_init(full + i, 128);             // one cp.async arrival a loading (warpgroup 1) thread
      mbarrier_init(empty + i, C::kThreads / 32);  // one arrival a warp
    }
    fence_barrier_init();
  }
  unsigned gt = 0;  // tiles of earlier items (the pipeline position)
  const unsigned q_addr = smem_u32(smem), p_addr = q_addr + C::kPOffset;

  const int n_items = *num_items;
  for (int it = blockIdx.x; it < n_items; it += gridDim.x) {
    // Every warp is done with the previous item's shared memory (its O staged in the Q tile), and
    // the barriers are initialised.
    __syncthreads();
    const PrefillItem w = PrefillItem::load<C::kRows, KV>(items, it, qo_indptr, kv_indptr, kv_lens, group_size,
                                                         causal, -1);
    const int p0 = w.p0, lo = w.lo, hi = w.hi, n_tiles = w.n_tiles;
    float o[1][32][4];  // rows 16 wq + g (+ 8) of the tile, columns 256 wg + 8 dt + 2 c (+ 1)
#pragma unroll
    for (int dt = 0; dt < 32; ++dt) o[0][dt][0] = o[0][dt][1] = o[0][dt][2] = o[0][dt][3] = 0.f;
    float m[1][2] = {{neg_inf(), neg_inf()}}, dsum[1][2] = {{0.f, 0.f}};

    if (wg == 1) {
      // Loads: Q, packed row r = (token, head) pair p0 + r, then K tiles; a warp a row, rows wq + 4 i.
#pragma unroll 4
      for (int i = 0; i < C::kRows / 4; ++i) {
        const int row = wq + 4 * i, p = p0 + row;
        const bool ok = p < w.packed_len;
        const int tok = ok ? p / group_size : 0, h = ok ? p - tok * group_size : 0;
        const long long tq = w.qo_start + tok;
        mla_copy_row(smem, row, q + tq * q_stride_n + h * q_stride_h, q_pe + tq * q_pe_stride_n + h * q_pe_stride_h,
                     ok, lane);
      }
      // K tile t (keys lo + 64 t ..; zeros past hi) into stage (gt + t) % 2 once all 8 warps released
      // the stage's previous tile. Lane i < 16 looks up the page of the warp's row wq + 4 i a tile
      // ahead (offsets), so no copy waits on a page number.
      long long ckv_off = 0, kpe_off = 0;
      auto offsets = [&](int t) {
        if (t >= n_tiles || lane >= 16) return;
        const int j = lo + t * KV + wq + 4 * lane;
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
#pragma unroll 4
        for (int i = 0; i < KV / 4; ++i) {
          const int row = wq + 4 * i;
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
      bar_arrive(kBarPFree, 256);  // the P tile is free for tile 0

      for (int t = 0; t < n_tiles; ++t) {
        const unsigned n = gt + t, stage = n % C::kStages;
        mbarrier_wait(full + stage, (n / C::kStages) & 1);
        fence_proxy_async();
        const unsigned k_addr = q_addr + C::kQBytes + stage * C::kTileBytes;
        bar_sync(kBarPFull, 256);  // P and the rescale factors of tile t
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float alpha = red[wq * 16 + g + 8 * h];
#pragma unroll
          for (int dt = 0; dt < 32; ++dt) {
            o[0][dt][2 * h] *= alpha;
            o[0][dt][2 * h + 1] *= alpha;
          }
        }
        wgmma_hold(o[0]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KV / 16; ++kk)
          wgmma_ss_t<256, T>(o[0], wgmma_desc(p_addr + kk * 32, 0, 1024),
                             wgmma_desc(k_addr + 4 * C::kSlab + kk * 2048, C::kSlab, 1024));
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_hold(o[0]);
        __syncwarp();
        if (lane == 0) mbarrier_arrive_cta(empty + stage);  // this warp is done with the stage
        bar_arrive(kBarPFree, 256);  // P (and the factors) read
        issue(t + 2);
        offsets(t + 3);
      }
      if (n_tiles == 0) cp_async_wait_all();  // no full barrier waited on: the Q copies may still be in flight
    } else {
      for (int t = 0; t < n_tiles; ++t) {
        const unsigned n = gt + t, stage = n % C::kStages;
        mbarrier_wait(full + stage, (n / C::kStages) & 1);
        fence_proxy_async();  // the landed copies (generic proxy) visible to wgmma (the async proxy)
        const unsigned k_addr = q_addr + C::kQBytes + stage * C::kTileBytes;
        const int j0 = lo + t * KV;

        // S = Q K^T, 64 rows x 64 keys.
        float s[1][8][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          const unsigned koff = (kk >> 2) * C::kSlab + (kk & 3) * 32;  // 16 columns = 32 bytes into the slab
          wgmma_ss<64, T>(s[0], wgmma_desc(q_addr + koff, 0, 1024), wgmma_desc(k_addr + koff, 0, 1024), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_hold(s[0]);
        if (w.edge<KV>(j0, causal, -1, false))
          mask_scores<1, 8, false>(s, w, group_size, causal, -1, 0, p0 + wq * 16, j0, g, c, nullptr);

        // Online softmax; the rows' rescale factors (exp2 of the old max minus the new, as applied
        // to this half of O) for warpgroup 1.
        const float m_old[2] = {m[0][0], m[0][1]};
        float ms[1][2];
        softmax_rescale(s, m, dsum, o, ms, scale);
        unsigned pa[KV / 16][1][4];
#pragma unroll
        for (int kk = 0; kk < KV / 16; ++kk) make_p<T>(pa[kk], s, kk, ms, dsum, scale);
        bar_sync(kBarPFree, 256);  // warpgroup 1 is done with the previous P and factors
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (c == 0) red[wq * 16 + g + 8 * h] = ptx_exp2(m_old[h] * scale - ms[0][h]);
        // P's A fragments: pa[kk][0][r] holds rows g (r even) / g + 8 (r odd) and keys 16 kk + 8 (r / 2) + 2 c.
#pragma unroll
        for (int kk = 0; kk < KV / 16; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r)
            *reinterpret_cast<unsigned*>(smem + C::kPOffset + sw128_offset<64>(wq * 16 + g + 8 * (r & 1), 2 * kk + r / 2) +
                                         4 * c) = pa[kk][0][r];
        fence_proxy_async();  // P (generic-proxy stores) visible to warpgroup 1's wgmma
        bar_arrive(kBarPFull, 256);

        // O[:, 0:256] += P V, P from registers, V = the tile's ckv columns 0 .. 255 read transposed.
        wgmma_hold(o[0]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KV / 16; ++kk)
          wgmma_rs_t<256, T>(o[0], pa[kk][0], wgmma_desc(k_addr + kk * 2048, C::kSlab, 1024));
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_hold(o[0]);
        __syncwarp();
        if (lane == 0) mbarrier_arrive_cta(empty + stage);  // this warp is done with the stage
      }
      bar_sync(kBarPFree, 256);  // warpgroup 1's last P V is done (and the arrivals balance)
      // The rows' maxima and sums for warpgroup 1's epilogue.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float d = dsum[0][h];
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        d += __shfl_xor_sync(0xffffffffu, d, 2);
        if (c == 0) {
          red[wq * 16 + g + 8 * h] = m[0][h];
          red[64 + wq * 16 + g + 8 * h] = d;
        }
      }
    }
    gt += n_tiles;
    __syncthreads();  // the maxima and sums written; every S of the item done, so the Q tile may stage O
    if (wg == 1) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // finish_rows sums over the quad: one lane carries the total
        m[0][h] = red[wq * 16 + g + 8 * h];
        dsum[0][h] = c == 0 ? red[64 + wq * 16 + g + 8 * h] : 0.f;
      }
    }

    const int4 ie = items[2 * (int)opaque(it)];
    // Both warpgroups hold the same rows: the first writes the lse (partial lse rows get equal values).
    const RowDest dest = {ie.z, w.packed_len, group_size, 0, w.qo_start, num_qo_heads, ie.w, wg == 0 ? lse : nullptr,
                          part_o, part_lse, sinks, C::kCkv, wg * 256};
    finish_rows(o, m, dsum, scale, 1.f, wq * 16, g, c, dest);
    if (dest.prow < 0)  // staged in this warpgroup's 32 KB of the Q tile
      store_rows<256>(o, smem + wg * 4 * C::kSlab, [](int r, int ch) { return sw128_offset<64>(r, ch); }, wq * 16,
                      lane, out, o_stride_n, o_stride_h, dest);
  }
}

}  // namespace fic
