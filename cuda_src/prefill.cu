// Prefill attention on tensor cores (mma.sync m16n8k16, fp32 accumulation, online softmax in base 2).
//
// Rows. Queries of one KV head are "packed": packed row p of a request is query token p / group,
// query head kv_head * group + p % group, so a GQA group shares every K/V tile it reads. A CTA owns
// kRows consecutive packed rows of one (request, KV head); warp w owns MT slices of 16 of them.
//
// Work. The host plan (fi_cupy/scheduler.py) lists work items: (request, KV head, first packed row,
// partial row or -1) and a KV range. An item with the whole KV range writes the output directly; an
// item of a request whose KV range was cut (few query tiles, long context) writes float32 partial
// states that prefill_merge_kernel combines. CTAs stride over the items (count read on the device),
// so a CUDA graph replays any re-plan with the same grid.
//
// Pipeline. Q stays in shared memory; K and V tiles of kKV keys stream through two stages of
// cp.async copies (16-byte chunks, XOR-swizzled so ldmatrix is free of bank conflicts): tile t + 1
// is in flight while tile t is computed. fp8 KV lands raw and is widened to the q dtype in one pass;
// RoPE on the fly rotates Q as it is loaded and each K tile in shared memory. At the 64-row tile of
// the wide head dims (kSplit) one K and one V buffer take the place of the two stages, so 64-key
// tiles fit two CTAs an SM: K(t + 1) lands during softmax and P V of tile t, V(t + 1) during the
// next Q K^T.
//
// Masks. Causal (bottom-right aligned: query i sees keys up to kv_len - qo_len + i), sliding window,
// packed custom mask (little-endian bits, per request at a byte offset) and the KV bounds are applied
// only to tiles that straddle one of them; the others run without a per-element test.
#include "common/types.cuh"
#include "common/math.cuh"
#include "common/softmax.cuh"
#include "common/prefill_tile.cuh"
#include "common/variant.cuh"
#include "common/async_copy.cuh"
#include "common/mma.cuh"
#include "common/rope.cuh"
#include "common/pdl.cuh"

namespace fic {

template <typename T> struct Is16Bit { static constexpr bool value = false; };
template <> struct Is16Bit<half_t> { static constexpr bool value = true; };
template <> struct Is16Bit<bf16_t> { static constexpr bool value = true; };

// D: the Q/K width (head_dim_qk rounded up to 64, 128, 192, 256 or 512; 576 for MLA); DV: the V/O
// columns a CTA computes (head_dim_vo's width, or half of it at 512: blockIdx.y picks the half).
// Columns past the real head dims (head_dim_qk / head_dim_vo, runtime) are zero-filled in shared
// memory, so they add nothing to the scores and are not stored: one instantiation serves every head
// dim of its width. MT: 16-row slices a warp owns. WARPS: warps a CTA.
// kMla (width 576, fi_cupy/mla.py): Q/K are [ckv (512) | kpe (64)], the kpe columns read from q_pe and
// k_pe; V is the ckv cache (v_base, its strides), 512 wide.
template <int D, int DV, int MT, int WARPS, typename KVT, bool ROPE>
struct PrefillCfg {
  static_assert(D % 64 == 0 && DV % 64 == 0 && DV <= D && (D <= 512 || D == 576) && DV <= 256,
                "prefill widths: multiples of 64 (the 8-chunk swizzle), D <= 512 or 576 (MLA), DV <= min(D, 256)");
  static constexpr bool kMla = D == 576;
  static constexpr int kMlaSplit = 512;  // MLA: the first Q/K column read from q_pe / k_pe
  static constexpr int kThreads = WARPS * 32;
  static constexpr int kRows = WARPS * MT * 16;      // packed query rows a CTA
  static constexpr bool kRaw = !Is16Bit<KVT>::value; // fp8: copied raw, widened in shared memory
  // One K and one V buffer (see Pipeline): 16-bit K/V at width 256 and the 64-row tile, where two
  // 64-key stages would leave one CTA an SM (H100, single causal L=4096 d256: 282 TFLOP/s against
  // 269 with two 32-key stages and 252 with the 128-row tile). Not with RoPE on the fly: its 64-key
  // tiles spilled beside the RoPE frequencies.
  static constexpr bool kSplit = !kRaw && !ROPE && D == 256 && DV == 256 && WARPS == 4 && MT == 1;
  // keys a tile: 32 where the O accumulators already take 128 registers a thread (DV * MT >= 256) or
  // V/O widths of 192 and more (scores, masks and fragments beside 64-key tiles spill there, but for
  // kSplit's, whose P is made whole before the next K is issued); 16 at Q/K width 512, whose 32
  // k-steps of fragments beside 128 accumulators spilled at 32
  static constexpr int kKV = kSplit ? 64 : D >= 512 ? 16 : DV * MT >= 256 || DV >= 192 ? 32 : 64;
  static constexpr int kChunks = D / 8;              // 16-byte chunks of a 16-bit Q or K row
  static constexpr int kVChunks = DV / 8;            // ... of a V row
  static constexpr int kKTile = kKV * D;             // elements of one K tile
  static constexpr int kTile = kKV * (D + DV);       // elements of one K + V stage
  static constexpr int kQBytes = kRows * D * 2;
  static constexpr int kStageBytes = kTile * 2;      // K and V, 16-bit
  static constexpr int kRawStageBytes = kTile;       // K and V, fp8
  // 16-bit: Q | 2 stages (kSplit: Q | K | V, one stage). fp8: Q | 1 widened stage | 1 raw stage (tile
  // t + 1 lands raw while tile t is computed from the widened stage).
  static constexpr int kSmemBytes =
      kRaw ? kQBytes + kStageBytes + kRawStageBytes : kQBytes + (kSplit ? 1 : 2) * kStageBytes;
  static constexpr int kMinBlocks = WARPS == 8 ? 1 : 2;  // 255 registers a thread at most
  // K / V rows whose chunks the threads do not divide load in two column-kept parts (for_tile_chunks) on
  // the 32-row warp tile: 192/128's paged kernel spilled 20 B with the round-robin loop there. Not on
  // 16-row tiles: width 192 at 8 warps with a mask and ALiBi spilled 4 B with the parts.
  static constexpr bool kColumnParts = MT == 2;
  static_assert(!kMla || (!kRaw && DV == 256), "MLA: 16-bit caches, V in two halves");
};

// f(row, chunk) for each 16-byte chunk of a KV x RC tile, spread over THREADS threads. Where RC
// divides THREADS a thread keeps one chunk column (its row opaque: per-row addresses are rebuilt each
// tile rather than hoisted out of the KV loop into spilled registers); else chunks go round-robin, or
// with PARTS (PrefillCfg::kColumnParts) in two column-kept parts, the largest power of two first
// (192: 16 + 8 chunks). C0: the part's first chunk.
template <int KV, int RC, int THREADS, bool PARTS = false, int C0 = 0, typename F>
__device__ __forceinline__ void for_tile_chunks(int tid, F&& f) {
  constexpr int kHead = RC >= 64 && THREADS % 64 == 0 ? 64 : RC >= 32 && THREADS % 32 == 0 ? 32
                      : RC >= 16 && THREADS % 16 == 0 ? 16 : 0;
  if constexpr (THREADS % RC == 0 && KV % (THREADS / RC) == 0) {
    constexpr int kStep = THREADS / RC;
    const int ch = tid % RC, row0 = (int)opaque(tid / RC);
#pragma unroll
    for (int i = 0; i < KV / kStep; ++i) f(row0 + i * kStep, C0 + ch);
  } else if constexpr (PARTS && kHead > 0 && kHead < RC && KV % (THREADS / kHead) == 0) {
    for_tile_chunks<KV, kHead, THREADS, PARTS, C0>(tid, f);
    for_tile_chunks<KV, RC - kHead, THREADS, PARTS, C0 + kHead>(tid, f);
  } else {
    constexpr int N = KV * RC;
#pragma unroll
    for (int i = 0; i < (N + THREADS - 1) / THREADS; ++i) {
      const int idx = (int)opaque(i * THREADS + tid);  // rebuilt each tile, as above
      if (N % THREADS == 0 || idx < N) f(idx / RC, C0 + idx % RC);
    }
  }
}

// Element (row, col) of a [rows][D] 16-bit tile: 16-byte chunks XOR-swizzled by row % 8.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// 8 fp8 elements widened to the 16-bit q dtype (exact: fp8 values are representable in both).
template <typename T, typename KVT>
__device__ __forceinline__ uint4 widen8(uint2 raw) {
  uint4 out;
  unsigned int* o = reinterpret_cast<unsigned int*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_float2(KVT(), static_cast<unsigned short>((i < 2 ? raw.x : raw.y) >> (16 * (i & 1))));
    o[i] = pack2(T(), f.x, f.y);
  }
  return out;
}

// Rotate two 8-element halves (dims i and i + D/2) of a 16-bit row in place at position pos.
template <typename T>
__device__ __forceinline__ void rope_pair(uint4& lo, uint4& hi, const float (&freq)[8], float pos) {
  float a[8], b[8];
  unpack8<T>(lo, a);
  unpack8<T>(hi, b);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float s, c;
    rope_sincos(pos * freq[e], &s, &c);
    const float x = a[e], y = b[e];
    a[e] = x * c - y * s;
    b[e] = y * c + x * s;
  }
  lo = make_uint4(pack2(T(), a[0], a[1]), pack2(T(), a[2], a[3]), pack2(T(), a[4], a[5]), pack2(T(), a[6], a[7]));
  hi = make_uint4(pack2(T(), b[0], b[1]), pack2(T(), b[2], b[3]), pack2(T(), b[4], b[5]), pack2(T(), b[6], b[7]));
}

// VAR: a custom attention variant (common/variant.cuh; NoVariant: none), its parameters in vparams.
// A variant's QueryTransform over this item's Q tile in shared memory (rows of the request, dims below
// head_dim_qk), once the tile has landed; the caller syncs after.
template <int D, int ROWS, int THREADS, typename T, typename Var, typename P>
__device__ __forceinline__ void variant_transform_q(T* q_s, Var& var, const P& params, const PrefillItem& w,
                                                    int group_size, int head_dim_qk, int tid) {
  for (int idx = tid; idx < ROWS * (D / 8); idx += THREADS) {
    const int row = idx / (D / 8), ch = idx % (D / 8), p = w.p0 + row;
    if (p >= w.packed_len || ch * 8 >= head_dim_qk) continue;
    const int ti = p / group_size, h = w.kv_head * group_size + p - ti * group_size;
    variant_query_chunk<T>(*reinterpret_cast<uint4*>(q_s + swz<D>(row, ch)), var, params, w.req, ti, h, ch * 8);
  }
}

// A variant's KeyTransform over a K tile in shared memory (keys below the item's hi, dims below head_dim_qk).
template <int D, int KV, int THREADS, typename T, typename Var, typename P>
__device__ __forceinline__ void variant_transform_k(T* k_s, Var& var, const P& params, const PrefillItem& w, int j0,
                                                    int head_dim_qk, int tid) {
  for (int idx = tid; idx < KV * (D / 8); idx += THREADS) {
    const int row = idx / (D / 8), ch = idx % (D / 8), j = j0 + row;
    if (j >= w.hi || ch * 8 >= head_dim_qk) continue;
    variant_key_chunk<T>(*reinterpret_cast<uint4*>(k_s + swz<D>(row, ch)), var, params, w.req, j, w.kv_head, ch * 8);
  }
}

template <int D, int DV, int MT, int WARPS, typename T, typename KVT, bool PAGED, bool ROPE, int FLAGS,
          typename VAR = NoVariant>
__global__ void __launch_bounds__(WARPS * 32, PrefillCfg<D, DV, MT, WARPS, KVT, ROPE>::kMinBlocks)
prefill_kernel(FIC_PREFILL_PARAMS(T, KVT), const __grid_constant__ typename VAR::Params vparams) {
  using C = PrefillCfg<D, DV, MT, WARPS, KVT, ROPE>;
  constexpr int KV = C::kKV, NT = KV / 8, DT = DV / 8, KS = D / 16;
  constexpr int kThreads = C::kThreads, kChunks = C::kChunks, kVChunks = C::kVChunks;
  static_assert(!ROPE || D == DV, "RoPE on the fly: head_dim_qk == head_dim_vo");
  static_assert(!C::kMla || (!ROPE && PAGED && FLAGS == 0), "MLA: paged, no RoPE, soft cap, mask or ALiBi");
  using Var = typename VAR::Variant;
  static_assert(!VAR::kActive || (!C::kMla && !ROPE && (FLAGS & ~kCustomMask) == 0),
                "custom variants: no MLA, RoPE, soft cap or ALiBi (the variant owns the logits)");
  pdl_begin();
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* stage_s = reinterpret_cast<T*>(smem + C::kQBytes);  // 16-bit: 2 stages; fp8: the widened stage
  unsigned char* raw_s = smem + C::kQBytes + C::kStageBytes;   // fp8 only: the raw stage
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const FastDiv page_div = {page_size, page_div_mul, page_div_shift};
  constexpr bool capped = (FLAGS & kSoftCap) != 0, masked = (FLAGS & kCustomMask) != 0;
  constexpr bool alibi = (FLAGS & kAlibi) != 0;
  static_assert(!(alibi && (capped || ROPE)), "ALiBi takes no soft cap and no RoPE");
  // This CTA's first V / O column (head_dim_vo split over blockIdx.y where its width is half of D).
  const int vo_off = D == DV ? 0 : blockIdx.y * DV;
  // exp2 argument scale: logits in base 2. With a soft cap the scores are capped first.
  const float scale = capped ? FIC_LOG2E : sm_scale * FIC_LOG2E;
  const float cap_pre = capped ? sm_scale * ptx_rcp(soft_cap) : 0.f;

  float freq[8];  // RoPE: inverse frequencies of the 8 dims of this thread's pair chunk
  if (ROPE) {
    const int pc = threadIdx.x % (kChunks / 2);
#pragma unroll
    for (int e = 0; e < 8; ++e) freq[e] = (float)rope_theta_freq(pc * 8 + e, D, rope_log2_theta) * rope_rcp_scale;
  }

  const int n_items = *num_items;
  for (int it = blockIdx.x; it < n_items; it += gridDim.x) {
    const PrefillItem w = PrefillItem::load<C::kRows, KV>(items, it, qo_indptr, kv_indptr, kv_lens, group_size,
                                                         causal, window_left);
    const int kv_head = w.kv_head, p0 = w.p0, qo_start = w.qo_start, packed_len = w.packed_len;
    const int kv_off = w.kv_off, delta = w.delta, lo = w.lo, hi = w.hi, n_tiles = w.n_tiles;
    const long long head_off = (long long)kv_head * kv_stride_head;
    Var var(vparams, (uint32_t)w.req, smem);  // a variant's per-request state (nothing without one)
    // exp2 argument scale of this request: the variant's own where it has one
    const float sc = VAR::kActive ? (Var::use_softmax ? var.sm_scale_log2 : 1.f) : scale;
    const KVT* k_req = k_base + (PAGED ? 0 : (long long)kv_off * kv_stride_slot) + head_off;
    // V: K's strides at equal widths (V laid out as K), its own where the head dims differ
    const KVT* v_req = v_base + (D == DV ? (PAGED ? 0 : (long long)kv_off * kv_stride_slot) + head_off
                                         : (PAGED ? 0 : (long long)kv_off * v_stride_slot) +
                                               (long long)kv_head * v_stride_head);

    __syncthreads();  // the previous item's warps are done with shared memory
    const int tid = (int)opaque(threadIdx.x);  // per-item index math stays inside the item loop

    // Q tile: packed rows p0 .. p0 + kRows (zeros past the request).
    if (!ROPE) {
#pragma unroll
      for (int i = 0; i < C::kRows * kChunks / kThreads; ++i) {
        const int idx = i * kThreads + tid, row = idx / kChunks, ch = idx % kChunks;
        const int p = p0 + row;
        const bool ok = p < packed_len && ch * 8 < head_dim_qk;  // the rest zero-fills
        const int tok = ok ? p / group_size : 0, h = kv_head * group_size + (ok ? p - tok * group_size : 0);
        if (C::kMla && ch * 8 >= C::kMlaSplit)  // MLA's kpe columns: from q_pe
          cp_async<16>(q_s + swz<D>(row, ch), q_pe + (long long)(qo_start + tok) * q_pe_stride_n + h * q_pe_stride_h +
                                                  (ch * 8 - C::kMlaSplit), ok);
        else
          cp_async<16>(q_s + swz<D>(row, ch), q + (long long)(qo_start + tok) * q_stride_n + h * q_stride_h + ch * 8, ok);
      }
    } else {
      constexpr int H = kChunks / 2;
#pragma unroll
      for (int i = 0; i < C::kRows * H / kThreads; ++i) {
        const int idx = i * kThreads + tid, row = idx / H, ch = idx % H;
        const int p = p0 + row;
        uint4 a = make_uint4(0, 0, 0, 0), b = a;
        if (p < packed_len) {
          const int tok = p / group_size, h = kv_head * group_size + p - tok * group_size;
          const T* src = q + (long long)(qo_start + tok) * q_stride_n + h * q_stride_h + ch * 8;
          a = *reinterpret_cast<const uint4*>(src);
          b = *reinterpret_cast<const uint4*>(src + D / 2);
          rope_pair<T>(a, b, freq, (float)(tok + delta));
        }
        *reinterpret_cast<uint4*>(q_s + swz<D>(row, ch)) = a;
        *reinterpret_cast<uint4*>(q_s + swz<D>(row, ch + H)) = b;
      }
    }

    // K/V tile t into its stage: rows lo + t*KV .. (zeros past hi and past the real head dims).
    // Element offset of key j of the request in K (or V: its own strides where its head dim differs).
    // slot_stride: opaque_stride(...) of the tile, so it is rebuilt each tile rather than hoisted out of
    // the KV loop (with the per-row addresses derived from it) into spilled registers.
    auto opaque_stride = [](long long s) -> long long {
      return ((long long)opaque((unsigned)(s >> 32)) << 32) | opaque((unsigned)s);
    };
    auto row_offset = [&](int j, long long stride_page, long long slot_stride) -> long long {
      if (PAGED) {
        const unsigned pg = page_div.quot(j);
        return (long long)page_indices[kv_off + pg] * stride_page + (long long)(j - pg * page_size) * slot_stride;
      }
      return (long long)j * slot_stride;
    };
    // part: 0 K and V, 1 K only, 2 V only (kSplit issues them apart).
    auto issue = [&](int t, int part = 0) {
      if (t < n_tiles) {
        const int j0 = lo + t * KV;
        constexpr int CE = C::kRaw ? 16 : 8;  // elements a 16-byte chunk
        T* st = stage_s + (C::kSplit ? 0 : (t & 1) * C::kTile);
        unsigned char* rst = raw_s;
        const long long slot = opaque_stride(kv_stride_slot);
        if constexpr (D == DV) {  // K and V rows together: one address a row (equal widths: equal head
                                  // dims, K and V laid out alike)
          for_tile_chunks<KV, D / CE, kThreads, C::kColumnParts>(tid, [&](int row, int ch) {
            const int j = j0 + row;
            const bool ok = j < hi && ch * CE < head_dim_qk;
            const long long off = ok ? row_offset(j, kv_stride_page, slot) : 0;
            if (C::kRaw) {
              cp_async<16>(rst + row * D + ch * 16, k_req + off + ch * 16, ok);
              cp_async<16>(rst + C::kKTile + row * D + ch * 16, v_req + off + ch * 16, ok);
            } else {
              if (part != 2) cp_async<16>(st + swz<D>(row, ch), k_req + off + ch * 8, ok);
              if (part != 1) cp_async<16>(st + C::kKTile + swz<D>(row, ch), v_req + off + ch * 8, ok);
            }
          });
        } else {  // K, then V (each only where `part` asks for it)
          if (part != 2) for_tile_chunks<KV, D / CE, kThreads, C::kColumnParts>(tid, [&](int row, int ch) {
            const int j = j0 + row;
            const bool ok = j < hi && ch * CE < head_dim_qk;
            if (C::kMla && ch * 8 >= C::kMlaSplit) {  // MLA's kpe columns: from the kpe cache
              const long long off = ok ? row_offset(j, k_pe_stride_page, opaque_stride(k_pe_stride_slot)) : 0;
              cp_async<16>(st + swz<D>(row, ch), k_pe + off + (ch * 8 - C::kMlaSplit), ok);
              return;
            }
            const long long off = ok ? row_offset(j, kv_stride_page, slot) : 0;
            if (C::kRaw) cp_async<16>(rst + row * D + ch * 16, k_req + off + ch * 16, ok);
            else cp_async<16>(st + swz<D>(row, ch), k_req + off + ch * 8, ok);
          });
          const long long vslot = opaque_stride(v_stride_slot);
          if (part != 1) for_tile_chunks<KV, DV / CE, kThreads, C::kColumnParts>(tid, [&](int row, int ch) {
            const int j = j0 + row;
            const bool ok = j < hi && vo_off + ch * CE < head_dim_vo;
            const long long off = ok ? row_offset(j, v_stride_page, vslot) + vo_off : 0;
            if (C::kRaw) cp_async<16>(rst + C::kKTile + row * DV + ch * 16, v_req + off + ch * 16, ok);
            else cp_async<16>(st + C::kKTile + swz<DV>(row, ch), v_req + off + ch * 8, ok);
          });
        }
      }
      cp_async_commit();
    };
    if constexpr (C::kSplit) {  // two commit groups: K(0) (with Q), then V(0)
      issue(0, 1);
      issue(0, 2);
    } else {
      issue(0);
    }

    const long long mask_base = masked ? mask_offset[w.req] * 8 : 0;
    float al_slope[MT][2], al_qpos[MT][2];
    if (alibi) alibi_rows(al_slope, al_qpos, alibi_slopes, ptx_rcp(sm_scale), w, group_size, p0 + warp * MT * 16, g);

    float o[MT][DT][4];
    float m[MT][2], dsum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      m[mt][0] = m[mt][1] = neg_inf();
      dsum[mt][0] = dsum[mt][1] = 0.f;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    }

    for (int t = 0; t < n_tiles; ++t) {
      if constexpr (C::kSplit) cp_async_wait<1>();  // K(t) landed; V(t) may be in flight
      else cp_async_wait<0>();
      __syncthreads();  // tile t (kSplit: K(t)) visible to all; every warp is done with tile t - 1's stage
      const T* ks;
      if constexpr (C::kSplit) {
        ks = stage_s;
      } else if (C::kRaw) {
        // Widen (and rotate) the raw stage into the 16-bit stage, then start the next copy.
        const unsigned char* st = raw_s;
        T* dst = stage_s;
        if constexpr (D == DV) {  // K and V chunk pairs (ch, ch + D/2) together; RoPE rotates K's pair
          constexpr int H = kChunks / 2;
          for (int idx = tid; idx < KV * H; idx += kThreads) {
            const int row = idx / H, ch = idx % H;
            uint4 a = widen8<T, KVT>(*reinterpret_cast<const uint2*>(st + row * D + ch * 8));
            uint4 b = widen8<T, KVT>(*reinterpret_cast<const uint2*>(st + row * D + ch * 8 + D / 2));
            const uint4 va = widen8<T, KVT>(*reinterpret_cast<const uint2*>(st + C::kKTile + row * D + ch * 8));
            const uint4 vb = widen8<T, KVT>(*reinterpret_cast<const uint2*>(st + C::kKTile + row * D + ch * 8 + D / 2));
            if (ROPE) rope_pair<T>(a, b, freq, (float)(lo + t * KV + row));
            *reinterpret_cast<uint4*>(dst + swz<D>(row, ch)) = a;
            *reinterpret_cast<uint4*>(dst + swz<D>(row, ch + H)) = b;
            *reinterpret_cast<uint4*>(dst + C::kKTile + swz<D>(row, ch)) = va;
            *reinterpret_cast<uint4*>(dst + C::kKTile + swz<D>(row, ch + H)) = vb;
          }
        } else {  // K and V widths differ (no RoPE there): each on its own
          for (int idx = tid; idx < KV * kChunks; idx += kThreads) {
            const int row = idx / kChunks, ch = idx % kChunks;
            *reinterpret_cast<uint4*>(dst + swz<D>(row, ch)) =
                widen8<T, KVT>(*reinterpret_cast<const uint2*>(st + row * D + ch * 8));
          }
          for (int idx = tid; idx < KV * kVChunks; idx += kThreads) {
            const int row = idx / kVChunks, ch = idx % kVChunks;
            *reinterpret_cast<uint4*>(dst + C::kKTile + swz<DV>(row, ch)) =
                widen8<T, KVT>(*reinterpret_cast<const uint2*>(st + C::kKTile + row * DV + ch * 8));
          }
        }
        __syncthreads();
        ks = stage_s;
        issue(t + 1);
      } else {
        issue(t + 1);
        ks = stage_s + (t & 1) * C::kTile;
        if (ROPE) {
          T* kw = const_cast<T*>(ks);
          constexpr int H = kChunks / 2;
          for (int idx = tid; idx < KV * H; idx += kThreads) {
            const int row = idx / H, ch = idx % H;
            uint4 a = *reinterpret_cast<const uint4*>(kw + swz<D>(row, ch));
            uint4 b = *reinterpret_cast<const uint4*>(kw + swz<D>(row, ch + H));
            rope_pair<T>(a, b, freq, (float)(lo + t * KV + row));
            *reinterpret_cast<uint4*>(kw + swz<D>(row, ch)) = a;
            *reinterpret_cast<uint4*>(kw + swz<D>(row, ch + H)) = b;
          }
          __syncthreads();
        }
      }
      const int j0 = lo + t * KV;
      if constexpr (Var::kQueryTransform || Var::kKeyTransform) {
        if (Var::kQueryTransform && t == 0)
          variant_transform_q<D, C::kRows, kThreads, T>(q_s, var, vparams, w, group_size, head_dim_qk, tid);
        if (Var::kKeyTransform) variant_transform_k<D, KV, kThreads, T>(const_cast<T*>(ks), var, vparams, w, j0,
                                                                        head_dim_qk, tid);
        __syncthreads();
      }
      const T* vs = ks + C::kKTile;

      // S = Q K^T for this warp's MT x 16 rows and KV keys.
      float s[MT][NT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
      // Swizzled ldmatrix addresses: chunk (2kk + b) ^ (row & 7) = ((b ^ row & 7) ^ 2kk), so a step
      // along the head dim is one XOR of the lane's column byte offset (rebuilt each tile, not hoisted).
      const unsigned r7 = lane & 7;
      const unsigned q_row = opaque(smem_u32(q_s) + ((warp * MT) * 16 + r7 + ((lane >> 3) & 1) * 8) * (D * 2));
      const unsigned q_col = opaque((((lane >> 4) ^ r7) << 4));
      const unsigned k_row = opaque(smem_u32(ks) + (r7 + (lane >> 4) * 8) * (D * 2));
      const unsigned k_col = opaque(((((lane >> 3) & 1) ^ r7) << 4));
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], q_row + mt * 16 * D * 2 + (q_col ^ (kk << 5)));
        const unsigned kc = k_row + (k_col ^ (kk << 5));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          unsigned b[4];
          ldmatrix_x4(b, kc + np * 16 * D * 2);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<T>(s[mt][2 * np], a[mt], b[0], b[1]);
            mma_16816<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }

      if constexpr (VAR::kActive) {  // the variant's hooks; the KV bound tested only on edge tiles
        const int pf = p0 + warp * MT * 16;
        if (w.edge<KV>(j0, causal, window_left, masked))
          variant_scores<VAR, true>(s, var, vparams, w, group_size, pf, j0, g, c);
        else variant_scores<VAR, false>(s, var, vparams, w, group_size, pf, j0, g, c);
      }
      if (capped) cap_scores(s, soft_cap, cap_pre);
      if (alibi) alibi_scores(s, al_slope, al_qpos, j0, c);

      // Element masks only where the tile straddles a bound.
      const bool edge = w.edge<KV>(j0, causal, window_left, masked);
      if (edge)
        mask_scores<MT, NT, masked>(s, w, group_size, causal, window_left, mask_base, p0 + warp * MT * 16, j0, g, c,
                                    custom_mask);

      // Online softmax: rows g and g + 8 of each slice, a row spread over the 4 lanes of a quad.
      // New maxima first (rescaling O), then P is made one 16-key step at a time and multiplied into
      // O at once, so the scores die as P is formed (no P array beside S and O in registers).
      constexpr bool kSoftmax = !VAR::kActive || Var::use_softmax;
      float ms[MT][2];
      if (kSoftmax) softmax_rescale(s, m, dsum, o, ms, sc);
      // kSplit: P is made whole first (the scores die; P takes half their registers), then K(t + 1) is
      // issued into the buffer every warp is done with, and V(t) awaited.
      unsigned pall[C::kSplit ? KV / 16 : 1][MT][4];
      if constexpr (C::kSplit) {
#pragma unroll
        for (int kk = 0; kk < KV / 16; ++kk) {
          if (kSoftmax) make_p<T>(pall[kk], s, kk, ms, dsum, sc);
          else make_p_direct<T>(pall[kk], s, kk);
        }
        __syncthreads();
        issue(t + 1, 1);
        cp_async_wait<1>();  // V(t) landed; K(t + 1) may be in flight
        __syncthreads();
      }
      const unsigned v_row = opaque(smem_u32(vs) + (r7 + ((lane >> 3) & 1) * 8) * (DV * 2));
      const unsigned v_col = opaque((((lane >> 4) ^ r7) << 4));
#pragma unroll
      for (int kk = 0; kk < KV / 16; ++kk) {
        // C fragments of key tiles 2kk, 2kk + 1 -> the A fragment of this k-step (P on the left).
        unsigned pa[MT][4];
        if constexpr (C::kSplit) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) pa[mt][e] = pall[kk][mt][e];
        } else if (kSoftmax) make_p<T>(pa, s, kk, ms, dsum, sc);
        else make_p_direct<T>(pa, s, kk);  // no softmax: the variant's logits weigh V as they are
#pragma unroll
        for (int dp = 0; dp < DT / 2; ++dp) {
          unsigned b[4];
          ldmatrix_x4_trans(b, v_row + kk * 16 * DV * 2 + (v_col ^ (dp << 5)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<T>(o[mt][2 * dp], pa[mt], b[0], b[1]);
            mma_16816<T>(o[mt][2 * dp + 1], pa[mt], b[2], b[3]);
          }
        }
      }
      if constexpr (C::kSplit) {
        __syncthreads();  // every warp is done with V(t)
        issue(t + 1, 2);
      }
    }
    if (n_tiles == 0) {  // no loop barrier ran: other threads' Q copies may still land in our rows
      cp_async_wait<0>();
      __syncthreads();
    }

    // Epilogue: finish the row sums, normalise, write (directly or as a float32 partial row). The
    // item's fields are read again (L1) rather than held in registers through the KV loop; a direct
    // item's rows are staged in the warp's own Q rows (no other warp reads them).
    {
    const int4 ie = items[2 * (int)opaque(it)];
    const int qo_start = qo_indptr[ie.x];
    const RowDest dest = {ie.z, (qo_indptr[ie.x + 1] - qo_start) * group_size, group_size, ie.y, qo_start,
                          num_qo_heads, ie.w, lse, part_o, part_lse, sinks, head_dim_vo, vo_off};
    if constexpr (VAR::kActive)
      variant_finish_rows<VAR>(o, m, dsum, var, vparams, ie.x, v_scale, warp * MT * 16, g, c, dest);
    else
      finish_rows(o, m, dsum, scale, v_scale, warp * MT * 16, g, c, dest);
    if (dest.prow < 0)
      store_rows<DV>(o, reinterpret_cast<unsigned char*>(q_s), [](int r, int ch) { return 2 * swz<D>(r, ch); },
                    warp * MT * 16, lane, out, o_stride_n, o_stride_h, dest);
    }
  }
}

// Merge the float32 partial states of (request, KV head, query tile)s whose KV range was cut.
// Item: {request, kv_head, first packed row, first partial row}, {chunks, rows a chunk, -, -}; chunk c
// of packed row r is partial row base + c * rows + r. blockIdx.x strides over the items and blockIdx.y
// over a tile's (row, 8 dims) pieces: a few cut tiles still spread over many SMs (one CTA a tile read
// their partials at a fraction of the bandwidth).
template <typename T>
__global__ void __launch_bounds__(128)
prefill_merge_kernel(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                     const int4* __restrict__ items, const int* __restrict__ num_items,
                     const int* __restrict__ qo_indptr, T* __restrict__ out, long long o_stride_n,
                     long long o_stride_h, float* __restrict__ lse, int num_qo_heads, int group_size,
                     const float* __restrict__ sinks, int head_dim_vo) {
  pdl_begin();
  const int kChunks = head_dim_vo / 8, D = head_dim_vo;  // partial rows are head_dim_vo wide
  const int n_items = *num_items;
  for (int it = blockIdx.x; it < n_items; it += gridDim.x) {
    const int4 ia = items[2 * it], ib = items[2 * it + 1];
    const int req = ia.x, kv_head = ia.y, p0 = ia.z, base = ia.w, chunks = ib.x, rows = ib.y;
    const int qo_start = qo_indptr[req];
    const int packed_len = (qo_indptr[req + 1] - qo_start) * group_size;
    const int n_rows = min(rows, packed_len - p0);
    for (int idx = blockIdx.y * blockDim.x + threadIdx.x; idx < n_rows * kChunks; idx += gridDim.y * blockDim.x) {
      const int r = idx / kChunks, d0 = (idx % kChunks) * 8;
      const float* s = part_lse + base + r;  // chunk k at s[k * rows]
      const float mx = max_lse(s, rows, chunks);
      float acc[8];
      const float wsum = merge_states<float, 8, 4>(part_o + (long long)(base + r) * D + d0, (long long)rows * D, s, rows,
                                                chunks, mx, acc);
      const int p = p0 + r, ti = p / group_size, h = kv_head * group_size + p - ti * group_size;
      float inv = wsum > 0.f ? ptx_rcp(wsum) : 0.f, l = merged_lse(mx, wsum);
      if (sinks != nullptr) inv *= fold_sink(l, sinks, h);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] *= inv;
      store8<T>(out + (long long)(qo_start + ti) * o_stride_n + h * o_stride_h + d0, acc);
      if (lse != nullptr && d0 == 0) lse[(long long)(qo_start + ti) * num_qo_heads + h] = l;
    }
  }
}

}  // namespace fic
