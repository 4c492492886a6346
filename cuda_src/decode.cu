// Decode attention over a paged KV cache: one query token per request, K/V read from pages.
//
// Work split (host-side plan, fi_cupy/scheduler.py): a persistent grid of exactly one wave of CTAs
// (num_SMs x resident CTAs per SM). The work is the flattened (request, head block, token) space,
// cut into equal token quotas, one per CTA; a CTA walks its list of segments. A segment is a token
// range of one (request, head block); a head block is GB query heads of one KV head. A (request,
// head block) that lies in one segment writes its output directly; one cut over several CTAs writes
// float32 partial states that merge_states_kernel combines. The grid depends only on the device, so
// a planned run() replays in a CUDA graph after any re-plan.
//
// Inside a CTA: 4 warps stride over the segment's tokens in tiles. A token row is handled by a row
// group of LANES lanes; each lane owns 8 consecutive dims. Each warp streams its tiles through a
// private cp.async pipeline in shared memory (12 KB per warp), and each lane reads back
// only what it copied, so no barrier is needed inside the loop. A lane computes all GB query heads
// against the K row it holds, so each K/V byte is read from memory once. Online softmax in base 2.
#include "common/types.cuh"
#include "common/math.cuh"
#include "common/softmax.cuh"
#include "common/rope.cuh"
#include "common/async_copy.cuh"
#include "common/mma.cuh"
#include "common/pdl.cuh"
#include "common/variant.cuh"

namespace fic {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kWarpPipelineBytes = 12288;  // 48 KB a CTA: 4 CTAs (16 warps) per SM

// One warp's block of the end-of-segment merge (acc [GB][D], then [GB][m, d]) in floats, padded to
// 16 bytes: write_segment reads it with 16-byte loads, so every warp's block must start aligned
// (GB * (D + 2) alone is odd x 2 floats at GB = 1, which misaligned warps 1 and 3).
template <int D, int GB>
struct MergeBlock {
  static constexpr int kFloats = (GB * (D + 2) + 3) / 4 * 4;
  static constexpr int kBytes = kDecodeWarps * kFloats * 4;  // all warps
};

template <int D, int GB, typename KVT>
struct DecodeCfg {
  static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head_dim must be a multiple of 16 in [16, 256]");
  typedef typename Pack8<KVT>::raw Raw;                         // 8 elements: 16 B (16-bit), 8 B (fp8)
  static constexpr int kActiveLanes = D / 8;                    // lanes holding real dims
  static constexpr int kLanes = NextPow2<kActiveLanes>::value;  // row group size (power of 2)
  static constexpr int kRowsPerWarp = 32 / kLanes;
  static constexpr int kRowsPerLane = GB >= 8 ? 2 : 4;          // keeps scores + accumulators in registers
  static constexpr int kTileRows = kRowsPerWarp * kRowsPerLane; // tokens per warp per tile
  static constexpr int kStageBytes = kRowsPerLane * 32 * int(sizeof(Raw)) * 2;  // K and V
  static constexpr int kStages = kWarpPipelineBytes / kStageBytes;
  static constexpr int kPipelineBytes = kDecodeWarps * kWarpPipelineBytes;
  static constexpr int kMergeBytes = MergeBlock<D, GB>::kBytes;
  // fi_cupy/decode.py: decode_smem_bytes() computes the same number for the launch.
  static constexpr int kSmemBytes = kPipelineBytes > kMergeBytes ? kPipelineBytes : kMergeBytes;
};

// The end of a segment: merge the per-warp states in shared memory (warp w's block at sm + w * ws
// floats: acc [GB][D], then [GB][m, d]) and write the output and lse (prow < 0), or a float32
// partial row (prow >= 0).
// VAR (a custom variant, batch_decode_tc_kernel): a direct row's elements go through its OutputTransform
// (m in the variant's logit scale, -inf for a row without keys; without softmax m = 0 and d = 1); partial
// rows only come from variants the plan may cut (softmax, the default OutputTransform), written as below.
template <int D, int GB, typename QT, typename VAR = NoVariant>
__device__ __forceinline__ void write_segment(const float* sm, int ws, int prow, int request,
                                              int kv_head, int head0, int group_size, int num_qo_heads,
                                              float v_scale, QT* __restrict__ out, long long o_stride_b,
                                              long long o_stride_h, float* __restrict__ lse,
                                              float* __restrict__ part_o, float* __restrict__ part_lse,
                                              const float* __restrict__ sinks,
                                              typename VAR::Variant* var = nullptr,
                                              const typename VAR::Params* vparams = nullptr) {
  constexpr int kChunks = D / 8;
  for (int item = threadIdx.x; item < GB * kChunks; item += kDecodeThreads) {
    const int h = item / kChunks, d0 = (item % kChunks) * 8;
    if (head0 + h >= group_size) continue;
    SoftmaxState<8> m;
    m.init();
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float* blk = sm + w * ws;
      float a[8];
      load8<float>(blk + h * D + d0, a);
      m.merge(blk[GB * D + 2 * h], blk[GB * D + 2 * h + 1], a);
    }
    const int qo_head = kv_head * group_size + head0 + h;
    float l = m.lse(), inv = m.inv_d() * v_scale;
    if (prow < 0 && sinks != nullptr) inv *= fold_sink(l, sinks, qo_head);  // partial rows: at the merge
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = m.acc[e] * inv;
    if constexpr (VAR::kActive) {
      constexpr bool kSoftmax = VAR::Variant::use_softmax;
      if (prow < 0) {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          o[e] = var->OutputTransform(*vparams, m.acc[e], (uint32_t)request, 0u, (uint32_t)qo_head,
                                      kSoftmax ? m.m : 0.f, kSoftmax ? m.d : 1.f, v_scale);
      }
    }
    if (prow < 0) {
      store8<QT>(out + request * o_stride_b + qo_head * o_stride_h + d0, o);
      if (lse != nullptr && d0 == 0) lse[(long long)request * num_qo_heads + qo_head] = l;
    } else {
      store8<float>(part_o + ((long long)prow * GB + h) * D + d0, o);
      if (d0 == 0) part_lse[(long long)prow * GB + h] = l;
    }
  }
}

// Minimum resident CTAs per SM for ptxas: 4 (what 48 KB of shared memory a CTA allows) unless the
// registers of 8 heads, or RoPE or ALiBi with 4, need more than 128 per thread (fp8 + ALiBi at 4 heads
// spilled 24 bytes on sm_90a with 4). Without the hint ptxas picks ~72 registers for small variants and
// spills.
template <int GB, bool POS>
struct DecodeMinBlocks {
  static constexpr int value = GB >= 8 ? 2 : ((POS && GB >= 4) ? 3 : 4);
};

template <int D, int GB, typename QT, typename KVT, bool ROPE, bool ALIBI>
__global__ void __launch_bounds__(kDecodeThreads, DecodeMinBlocks<GB, ROPE || ALIBI>::value)
batch_decode_kernel(const QT* __restrict__ q, long long q_stride_b, long long q_stride_h,
                    const KVT* __restrict__ k_cache, const KVT* __restrict__ v_cache,
                    long long kv_stride_page, long long kv_stride_slot, long long kv_stride_head,
                    const int* __restrict__ page_indptr, const int* __restrict__ page_indices,
                    const int* __restrict__ kv_lens, const int* __restrict__ cta_indptr,
                    const int4* __restrict__ segments, const int* __restrict__ segment_partial,
                    QT* __restrict__ out, long long o_stride_b, long long o_stride_h,
                    float* __restrict__ lse, float* __restrict__ part_o, float* __restrict__ part_lse,
                    int num_qo_heads, int group_size, int head_slices, unsigned int page_size,
                    unsigned int page_div_mul, unsigned int page_div_shift, float q_scale, float soft_cap,
                    float v_scale, float rope_rcp_scale, double rope_log2_theta,
                    const float* __restrict__ sinks, const float* __restrict__ alibi_slopes,
                    const NoVariant::Params /* the decode kernels' one ABI: variants on the tc kernel only */) {
  static_assert(!(ROPE && ALIBI), "one position encoding");
  pdl_begin();
  using C = DecodeCfg<D, GB, KVT>;
  using Raw = typename C::Raw;
  constexpr int L = C::kLanes, R = C::kRowsPerLane, RPW = C::kRowsPerWarp, S = C::kStages;
  extern __shared__ __align__(16) unsigned char smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = lane / L, lane_in_row = lane % L, row_base = row * L;
  const bool active_lane = lane_in_row < C::kActiveLanes;
  const int dim0 = (active_lane ? lane_in_row : 0) * 8;
  const FastDiv page_div = {page_size, page_div_mul, page_div_shift};
  // This warp's pipeline: stage s holds K rows then V rows, each [R][32 lanes] packs.
  Raw* pipe = reinterpret_cast<Raw*>(smem + warp * kWarpPipelineBytes);

  float rope_freq[8];
  if (ROPE) rope_freqs<D>(lane_in_row, rope_rcp_scale, rope_log2_theta, rope_freq);
  const float rcp_cap = soft_cap > 0.f ? __frcp_rn(soft_cap) : 0.f;  // no division in the loop

  const int seg_begin = cta_indptr[blockIdx.x], seg_end = cta_indptr[blockIdx.x + 1];
  // A segment's descriptor and page-table start are loaded one segment ahead (fewer dependent
  // round trips before its first K/V bytes arrive).
  int4 next_sg = seg_begin < seg_end ? segments[seg_begin] : make_int4(0, 0, 0, 0);
  int next_page_start = seg_begin < seg_end ? page_indptr[next_sg.x] : 0;
  for (int seg = seg_begin; seg < seg_end; ++seg) {
    const int4 sg = next_sg;
    const int page_start = next_page_start;
    if (seg + 1 < seg_end) {
      next_sg = segments[seg + 1];
      next_page_start = page_indptr[next_sg.x];
    }
    const int request = sg.x, kv_head = sg.y / head_slices, head0 = (sg.y % head_slices) * GB;
    const int start = sg.z, end = sg.w;
    const int kv_len = (ROPE || ALIBI) ? kv_lens[request] : 0;  // only these need the query position
    // ALiBi: logit += slope_h * (key position - query position), in base 2 (q_scale holds log2(e)).
    float slope[GB];
#pragma unroll
    for (int h = 0; h < GB; ++h)
      slope[h] = (ALIBI && head0 + h < group_size) ? alibi_slopes[kv_head * group_size + head0 + h] * FIC_LOG2E : 0.f;

    SoftmaxState<8> st[GB];
#pragma unroll
    for (int h = 0; h < GB; ++h) st[h].init();

    const long long head_off = (long long)kv_head * kv_stride_head + dim0;
    const int* pages = page_indices + page_start;
    const int tile_stride = kDecodeWarps * C::kTileRows;
    const int first = start + warp * C::kTileRows;
    const int n_tiles = (end > first) ? (end - first + tile_stride - 1) / tile_stride : 0;

    // Page ids of the next tile to issue are loaded one issue ahead, so their latency is hidden.
    int pid[R];
    auto load_pids = [&](int t) {
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int tok = first + t * tile_stride + j * RPW + row;
        pid[j] = (t < n_tiles && tok < end) ? pages[page_div.quot(tok)] : 0;
      }
    };
    auto issue = [&](int t) {
      if (t < n_tiles) {
        Raw* stage = pipe + (t % S) * (2 * R * 32);
#pragma unroll
        for (int j = 0; j < R; ++j) {
          const int tok = first + t * tile_stride + j * RPW + row;
          const bool ok = tok < end && active_lane;
          const unsigned p = page_div.quot(tok);
          const long long off = (long long)pid[j] * kv_stride_page +
                                (long long)(tok - p * page_size) * kv_stride_slot + head_off;
          cp_async<sizeof(Raw)>(stage + j * 32 + lane, ok ? k_cache + off : k_cache, ok);
          cp_async<sizeof(Raw)>(stage + (R + j) * 32 + lane, ok ? v_cache + off : v_cache, ok);
        }
        load_pids(t + 1);
      }
      cp_async_commit();  // one group per issue, empty or not, so wait_group counts stay uniform
    };

    load_pids(0);
#pragma unroll
    for (int t = 0; t < S - 1; ++t) issue(t);

    // (loaded after the first copies are in flight) Query heads of this block, pre-scaled so that q.k is the base-2 logit (or the pre-tanh logit).
    float qf[GB][8];
#pragma unroll
    for (int h = 0; h < GB; ++h) {
      const int hh = head0 + h;
      if (hh < group_size) {
        load8<QT>(q + request * q_stride_b + (kv_head * group_size + hh) * q_stride_h + dim0, qf[h]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) qf[h][e] = 0.f;
      }
      if (ROPE) rope_apply<D>(qf[h], rope_freq, float(kv_len - 1), lane_in_row, row_base);
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[h][e] = active_lane ? qf[h][e] * q_scale : 0.f;
    }


    for (int t = 0; t < n_tiles; ++t) {
      issue(t + S - 1);
      cp_async_wait<S - 1>();
      const Raw* stage = pipe + (t % S) * (2 * R * 32);
      const int tile_start = first + t * tile_stride;

      float s[R][GB];
#pragma unroll
      for (int j = 0; j < R; ++j) {
        float kf[8];
        unpack8<KVT>(stage[j * 32 + lane], kf);
        if (ROPE) rope_apply<D>(kf, rope_freq, float(tile_start + j * RPW + row), lane_in_row, row_base);
#pragma unroll
        for (int h = 0; h < GB; ++h) {
          float acc = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc = fmaf(qf[h][e], kf[e], acc);
          s[j][h] = acc;
        }
      }
      // Reduce the partial dot products over the lanes of each row group.
#pragma unroll
      for (int j = 0; j < R; ++j)
#pragma unroll
        for (int h = 0; h < GB; ++h)
#pragma unroll
          for (int o = L / 2; o > 0; o /= 2) s[j][h] += __shfl_xor_sync(0xffffffffu, s[j][h], o);

#pragma unroll
      for (int h = 0; h < GB; ++h) {
        float m_tile = neg_inf();
#pragma unroll
        for (int j = 0; j < R; ++j) {
          float x = s[j][h];
          if (soft_cap > 0.f) x = soft_cap * FIC_LOG2E * tanh_inline(x * rcp_cap);
          if (ALIBI) x = fmaf(slope[h], float(tile_start + j * RPW + row - (kv_len - 1)), x);
          s[j][h] = (tile_start + j * RPW + row < end) ? x : neg_inf();
          m_tile = fmaxf(m_tile, s[j][h]);
        }
        const float m_new = fmaxf(st[h].m, m_tile);
        const float scale = rescale_factor(st[h].m, m_new);
        st[h].m = m_new;
        st[h].d *= scale;
#pragma unroll
        for (int e = 0; e < 8; ++e) st[h].acc[e] *= scale;
#pragma unroll
        for (int j = 0; j < R; ++j) {
          s[j][h] = (s[j][h] == neg_inf()) ? 0.f : ptx_exp2(s[j][h] - m_new);
          st[h].d += s[j][h];
        }
      }
#pragma unroll
      for (int j = 0; j < R; ++j) {
        float vf[8];
        unpack8<KVT>(stage[(R + j) * 32 + lane], vf);
#pragma unroll
        for (int h = 0; h < GB; ++h)
#pragma unroll
          for (int e = 0; e < 8; ++e) st[h].acc[e] = fmaf(s[j][h], vf[e], st[h].acc[e]);
      }
    }
    cp_async_wait<0>();

    // Merge the row groups of each warp (lanes with the same lane_in_row hold the same dims).
#pragma unroll
    for (int h = 0; h < GB; ++h) {
#pragma unroll
      for (int o = L; o < 32; o *= 2) {
        float acc2[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc2[e] = __shfl_xor_sync(0xffffffffu, st[h].acc[e], o);
        const float m2 = __shfl_xor_sync(0xffffffffu, st[h].m, o);
        const float d2 = __shfl_xor_sync(0xffffffffu, st[h].d, o);
        st[h].merge(m2, d2, acc2);
      }
    }

    // Merge the warps through shared memory (the pipeline buffers, now idle).
    __syncthreads();
    constexpr int ws = MergeBlock<D, GB>::kFloats;
    float* sm = reinterpret_cast<float*>(smem);
    if (row == 0 && active_lane) {
      float* blk = sm + warp * ws;
#pragma unroll
      for (int h = 0; h < GB; ++h) {
#pragma unroll
        for (int e = 0; e < 8; ++e) blk[h * D + dim0 + e] = st[h].acc[e];
        if (lane_in_row == 0) {
          blk[GB * D + 2 * h] = st[h].m;
          blk[GB * D + 2 * h + 1] = st[h].d;
        }
      }
    }
    __syncthreads();

    write_segment<D, GB, QT>(sm, ws, segment_partial[seg], request, kv_head, head0, group_size,
                             num_qo_heads, v_scale, out, o_stride_b, o_stride_h, lse, part_o, part_lse, sinks);
    __syncthreads();  // the merge buffers become pipeline buffers again
  }
}

// Tensor-core decode for KV without RoPE, 16-bit or fp8 (fp8 chunks converted to the q dtype in shared memory by
// the lane that copied them, exactly: every e4m3 / e5m2 value is an fp16 and a bf16 value). Same work split and
// epilogue as batch_decode_kernel, but each warp computes a 16-token tile with mma.sync:
//   S^T (16 tokens x 8 heads) = K (16 x D) . Q^T (D x 8)          tokens are M, GQA heads are N
//   O^T (D x 8 heads)        += V^T (D x 16) . P^T (16 x 8)       P^T from S^T by movmatrix
// so no rows are padded and a token costs ~2 warp instructions of math instead of ~80 on CUDA cores.
// K/V tiles are copied into padded shared-memory rows (D + 8 elements: ldmatrix without bank conflicts).
// Steps shared by the two tensor-core decode kernels (batch_decode_tc_kernel, batch_decode_wide_kernel). Both
// hold S^T = K Q^T of a 16-key tile in mma.sync's m16n8 layout: a lane's sacc[0], sacc[1] are key g, heads 2c
// and 2c + 1 of the head block, sacc[2], sacc[3] key g + 8; O^T in o[KS][4] (dims 16 mt + g / + 8).

// ALiBi slopes (base 2) of a lane's score columns, heads head0 + 2c and + 1 (0 past the block or the group).
template <int GB>
__device__ __forceinline__ void lane_alibi_slopes(float (&slope)[2], const float* alibi_slopes, int kv_head,
                                                  int head0, int group_size, int c) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int hj = head0 + 2 * c + j;
    slope[j] = (2 * c + j < GB && hj < group_size) ? alibi_slopes[kv_head * group_size + hj] * FIC_LOG2E : 0.f;
  }
}

// S^T of one 16-key tile: K rows from shared memory (row stride RS elements) against the Q^T fragments.
template <int KS, int RS, typename T>
__device__ __forceinline__ void score_tile(float (&sacc)[4], const T* ks, const unsigned (&qb)[KS][2], int mi,
                                           int mr) {
  sacc[0] = sacc[1] = sacc[2] = sacc[3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    unsigned a[4];
    ldmatrix_x4(a, ks + ((mi & 1) * 8 + mr) * RS + 16 * kk + (mi >> 1) * 8);
    mma_16816<T>(sacc, a, qb[kk][0], qb[kk][1]);
  }
}

// The built-in logits (base 2) of a lane's scores: q_scale (sm_scale * log2 e, times q/k scales), the soft
// cap, ALiBi (key position tile_start + g (+ 8) against the query's `last`), -inf past the segment (in0 / in1:
// keys g / g + 8 inside).
template <bool ALIBI>
__device__ __forceinline__ void builtin_logits(float (&sacc)[4], float q_scale, float soft_cap, float rcp_cap,
                                               const float (&slope)[2], int tile_start, int g, int last, bool in0,
                                               bool in1) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float x = sacc[i] * q_scale;
    if (soft_cap > 0.f) x = soft_cap * FIC_LOG2E * tanh_inline(x * rcp_cap);
    if (ALIBI) x = fmaf(slope[i & 1], float(tile_start + g + (i < 2 ? 0 : 8) - last), x);
    sacc[i] = ((i < 2) ? in0 : in1) ? x : neg_inf();
  }
}

// One tile's K and V copies of a lane: chunk idx = i * 32 + lane of 16 rows x kChunks 8-element chunks, so
// consecutive lanes read consecutive bytes of a row. Lane r < 16 holds row r's cache offset (my_off); the
// others take it by shuffle. Rows from tile_first on past `end` are zero-filled. 16-bit KV: chunk (row, col) goes
// to the padded tile's row * RS + col; fp8: to raw slot idx (V after K's 16 rows), for convert_tile.
template <typename KVT, typename T, int kChunks, int RS>
__device__ __forceinline__ void copy_tile(unsigned char* stage, const KVT* k_cache, const KVT* v_cache,
                                          long long my_off, int tile_first, int end, int lane) {
  using Raw = typename Pack8<KVT>::raw;
  constexpr bool kConvert = sizeof(KVT) == 1;
#pragma unroll
  for (int i = 0; i < kChunks / 2; ++i) {
    const int idx = i * 32 + lane, row = idx / kChunks, col = (idx % kChunks) * 8;
    const long long off = __shfl_sync(0xffffffffu, my_off, row);
    const bool ok = tile_first + row < end;
    void* kd = kConvert ? (void*)(reinterpret_cast<Raw*>(stage) + idx)
                        : (void*)(reinterpret_cast<T*>(stage) + row * RS + col);
    void* vd = kConvert ? (void*)(reinterpret_cast<Raw*>(stage) + 16 * kChunks + idx)
                        : (void*)(reinterpret_cast<T*>(stage) + (16 + row) * RS + col);
    cp_async<sizeof(Raw)>(kd, ok ? k_cache + off + col : k_cache, ok);
    cp_async<sizeof(Raw)>(vd, ok ? v_cache + off + col : v_cache, ok);
  }
}

// fp8 KV: a lane's chunks of one raw stage (K's 16 rows of kChunks 8-element chunks, then V's, as copied: chunk
// idx = i * 32 + lane) converted into the padded 16-bit tile ldmatrix reads (row stride RS). Exact: every e4m3 /
// e5m2 value is an fp16 and a bf16 value. The lane copied these chunks, so its wait made them visible to it.
template <typename KVT, int kChunks, int RS, typename T>
__device__ __forceinline__ void convert_tile(T* conv, const unsigned char* stage, int lane) {
  using Raw = typename Pack8<KVT>::raw;
  const Raw* raw = reinterpret_cast<const Raw*>(stage);
#pragma unroll
  for (int i = 0; i < kChunks / 2; ++i) {
    const int idx = i * 32 + lane, row = idx / kChunks, col = (idx % kChunks) * 8;
    float f[8];
    unpack8<KVT>(raw[idx], f);
    store8<T>(conv + row * RS + col, f);
    unpack8<KVT>(raw[16 * kChunks + idx], f);
    store8<T>(conv + (16 + row) * RS + col, f);
  }
}

// O^T += P^T V of one tile: with SOFTMAX the online softmax of the logits first (row maxima m, sums dsum of
// heads 2c, 2c + 1 over the warp's keys; -inf logits weigh 0); without it the scores are P as they are. V rows
// from shared memory (row stride RS), read transposed.
template <int KS, int RS, bool SOFTMAX, typename T>
__device__ __forceinline__ void softmax_pv_tile(float (&sacc)[4], float (&m)[2], float (&dsum)[2],
                                                float (&o)[KS][4], const T* vs, int mi, int mr) {
#pragma unroll
  for (int j = 0; j < 2 && SOFTMAX; ++j) {
    float mt = fmaxf(sacc[j], sacc[2 + j]);
#pragma unroll
    for (int off = 4; off < 32; off *= 2) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
    const float m_new = fmaxf(m[j], mt);
    const float sc = rescale_factor(m[j], m_new);
    m[j] = m_new;
    dsum[j] *= sc;
#pragma unroll
    for (int k = 0; k < KS; ++k) {
      o[k][j] *= sc;
      o[k][2 + j] *= sc;
    }
    sacc[j] = (sacc[j] == neg_inf()) ? 0.f : ptx_exp2(sacc[j] - m_new);
    sacc[2 + j] = (sacc[2 + j] == neg_inf()) ? 0.f : ptx_exp2(sacc[2 + j] - m_new);
    dsum[j] += sacc[j] + sacc[2 + j];
  }
  const unsigned b0 = movmatrix_trans(pack2(T(), sacc[0], sacc[1]));
  const unsigned b1 = movmatrix_trans(pack2(T(), sacc[2], sacc[3]));
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) {
    unsigned a[4];
    ldmatrix_x4_trans(a, vs + ((mi >> 1) * 8 + mr) * RS + 16 * mt + (mi & 1) * 8);
    mma_16816<T>(o[mt], a, b0, b1);
  }
}

// A warp's state at a segment's end into shared memory: the row sums over the warp's lanes, then O^T as
// [GB][W] floats (W: the dims the warp holds) and (m, d) of each head after them.
template <int KS, int GB, int W>
__device__ __forceinline__ void stage_warp_state(float* blk, const float (&o)[KS][4], const float (&m)[2],
                                                 float (&dsum)[2], int g, int c) {
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int off = 4; off < 32; off *= 2) dsum[j] += __shfl_xor_sync(0xffffffffu, dsum[j], off);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int h = 2 * c + j;
    if (h < GB) {
#pragma unroll
      for (int mt = 0; mt < KS; ++mt) {
        blk[h * W + 16 * mt + g] = o[mt][j];
        blk[h * W + 16 * mt + g + 8] = o[mt][2 + j];
      }
      if (g == 0) {
        blk[GB * W + 2 * h] = m[j];
        blk[GB * W + 2 * h + 1] = dsum[j];
      }
    }
  }
}

// A warp's shared memory in batch_decode_tc_kernel. 16-bit KV: stages of the padded tile ldmatrix reads (K and
// V rows of 16 tokens). fp8 KV: raw stages (8-byte chunks as copied) and one padded 16-bit tile that each
// lane converts its own chunks into before the warp's mma; the same bytes in flight in half the stage size.
template <int D, typename KVT>
struct DecodeTcCfg {
  static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head_dim must be a multiple of 16 in [16, 256]");
  typedef typename Pack8<KVT>::raw Raw;                              // one copy: 8 elements
  static constexpr bool kConvert = sizeof(KVT) == 1;
  static constexpr int kChunks = D / 8;                              // copies a row
  static constexpr int kRow = D + 8;                                 // tile row stride, elements
  static constexpr int kTileElems = 2 * 16 * kRow;                   // K and V rows of 16 tokens, 16-bit
  static constexpr int kTileBytes = kTileElems * 2;
  static constexpr int kStageBytes = kConvert ? 2 * 16 * kChunks * int(sizeof(Raw)) : kTileBytes;
  // >= 2 tiles ahead, 12-16 KB of cache bytes in flight a warp (fp8: 2 CTAs an SM up to head_dim 128),
  // at most 16 stages (fp8 at small head dims)
  static constexpr int kStageBudget = kConvert ? 16384 : 24576, kFewest = kConvert ? 4 : 3;
  static constexpr int kFit = kStageBudget / kStageBytes > 16 ? 16 : kStageBudget / kStageBytes;
  static constexpr int kStages = kFit > kFewest ? kFit : kFewest;
  // fp8: the converted tile after the stages (it also stages the segment's merge state)
  static constexpr int kWarpBytes = kStages * kStageBytes + (kConvert ? kTileBytes : 0);
  static constexpr int kMergeAt = kConvert ? kStages * kStageBytes : (kStages - 1) * kStageBytes;
};

template <int D, int GB, typename KVT>
struct DecodeTcSmem {
  static constexpr int kPipeline = kDecodeWarps * DecodeTcCfg<D, KVT>::kWarpBytes;
  static constexpr int kMerge = MergeBlock<D, GB>::kBytes;
  // fi_cupy/decode.py: decode_smem_bytes() computes the same number for the launch.
  static constexpr int value = kPipeline > kMerge ? kPipeline : kMerge;
  static constexpr int kPerSm = 233472 / (value + 1024);             // 228 KB an SM, 1 KB reserved a CTA
  static constexpr int kMinBlocks = kPerSm < 1 ? 1 : (kPerSm > 4 ? 4 : kPerSm);
};

// VAR: a custom attention variant (common/variant.cuh; NoVariant: none), its parameters in vparams. Its
// hooks see the request (batch_idx), query position 0 (the one query of the request, as FlashInfer's
// decode), the key position and the heads, only for keys of the segment and real heads of the block.
template <int D, int GB, typename T, typename KVT, bool ALIBI, typename VAR = NoVariant>
__global__ void __launch_bounds__(kDecodeThreads, DecodeTcSmem<D, GB, KVT>::kMinBlocks)
batch_decode_tc_kernel(const T* __restrict__ q, long long q_stride_b, long long q_stride_h,
                       const KVT* __restrict__ k_cache, const KVT* __restrict__ v_cache,
                       long long kv_stride_page, long long kv_stride_slot, long long kv_stride_head,
                       const int* __restrict__ page_indptr, const int* __restrict__ page_indices,
                       const int* __restrict__ kv_lens, const int* __restrict__ cta_indptr,
                       const int4* __restrict__ segments, const int* __restrict__ segment_partial,
                       T* __restrict__ out, long long o_stride_b, long long o_stride_h,
                       float* __restrict__ lse, float* __restrict__ part_o, float* __restrict__ part_lse,
                       int num_qo_heads, int group_size, int head_slices, unsigned int page_size,
                       unsigned int page_div_mul, unsigned int page_div_shift, float q_scale, float soft_cap,
                       float v_scale, float rope_rcp_scale, double rope_log2_theta,
                       const float* __restrict__ sinks, const float* __restrict__ alibi_slopes,
                       const __grid_constant__ typename VAR::Params vparams) {
  static_assert(GB <= 8, "an mma tile holds 8 heads");
  static_assert(!(VAR::kActive && ALIBI), "custom variants: no ALiBi (the variant owns the logits)");
  using C = DecodeTcCfg<D, KVT>;
  static_assert(C::kConvert || sizeof(KVT) == sizeof(T), "16-bit KV is read in the q dtype");
  static_assert(!VAR::kActive || !C::kConvert, "custom variants: KV of the q dtype");
  using Var = typename VAR::Variant;
  constexpr bool kSoftmax = Var::use_softmax;
  pdl_begin();
  constexpr int S = C::kStages, RS = C::kRow, KS = D / 16, kChunks = C::kChunks;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;              // fragment row / column pair
  const int mi = lane / 8, mr = lane % 8;            // ldmatrix: matrix and row this lane addresses
  unsigned char* pipe = smem + warp * C::kWarpBytes;  // stages; fp8: then the converted tile
  T* conv = reinterpret_cast<T*>(pipe + S * C::kStageBytes);
  const FastDiv page_div = {page_size, page_div_mul, page_div_shift};
  const float rcp_cap = soft_cap > 0.f ? __frcp_rn(soft_cap) : 0.f;

  // Segment context; the next segment's first tiles are issued before this segment's epilogue,
  // so its memory latency overlaps the merge of the warps (whose buffers live in each warp's last
  // pipeline stage, the one a prologue does not fill).
  struct Seg {
    int request, kv_head, head0, end, first, n_tiles, last;  // last: the query's position (ALiBi)
    long long head_off;
    const int* pages;
  };
  const int seg_begin = cta_indptr[blockIdx.x], seg_end = cta_indptr[blockIdx.x + 1];
  const int tile_stride = kDecodeWarps * 16;
  auto make_seg = [&](int4 sg, int page_start) {
    Seg x;
    x.request = sg.x;
    x.kv_head = sg.y / head_slices;
    x.head0 = (sg.y % head_slices) * GB;
    x.end = sg.w;
    x.first = sg.z + warp * 16;
    x.n_tiles = (x.end > x.first) ? (x.end - x.first + tile_stride - 1) / tile_stride : 0;
    x.head_off = (long long)x.kv_head * kv_stride_head;
    x.pages = page_indices + page_start;
    x.last = ALIBI ? kv_lens[x.request] - 1 : 0;
    return x;
  };

  // Copies (copy_tile): lane r < 16 computes row r's cache offset, its page id loaded one issue ahead.
  int pid = 0;
  auto load_pid = [&](const Seg& x, int t) {
    const int tok = x.first + t * tile_stride + (lane % 16);
    pid = (t < x.n_tiles && tok < x.end) ? x.pages[page_div.quot(tok)] : 0;
  };
  auto issue = [&](const Seg& x, int t) {
    if (t < x.n_tiles) {
      unsigned char* stage = pipe + (t % S) * C::kStageBytes;
      const int my_tok = x.first + t * tile_stride + (lane % 16);
      const unsigned p = page_div.quot(my_tok);
      const long long my_off = (long long)pid * kv_stride_page +
                               (long long)(my_tok - p * page_size) * kv_stride_slot + x.head_off;
      copy_tile<KVT, T, kChunks, RS>(stage, k_cache, v_cache, my_off, x.first + t * tile_stride, x.end, lane);
      load_pid(x, t + 1);
    }
    cp_async_commit();
  };
  auto prologue = [&](const Seg& x) {
    load_pid(x, 0);
#pragma unroll
    for (int t = 0; t < S - 1; ++t) issue(x, t);
  };

  // Q^T fragments (B operand): head g of the block, dims 16kk + 2c, +1 and 16kk + 2c + 8, +9. Loaded
  // with a segment's prologue, so the first mma of the segment does not wait for them.
  unsigned qb[KS][2];
  float slope[2] = {0.f, 0.f};  // ALiBi slopes (base 2) of this lane's score columns, heads 2c and 2c + 1
  auto load_q = [&](const Seg& x) {
    const int hh = x.head0 + g;
    const bool valid = g < GB && hh < group_size;
    if (ALIBI) lane_alibi_slopes<GB>(slope, alibi_slopes, x.kv_head, x.head0, group_size, c);
    const T* qp = q + x.request * q_stride_b + (x.kv_head * group_size + (valid ? hh : 0)) * q_stride_h + 2 * c;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      qb[kk][0] = valid ? *reinterpret_cast<const unsigned*>(qp + 16 * kk) : 0u;
      qb[kk][1] = valid ? *reinterpret_cast<const unsigned*>(qp + 16 * kk + 8) : 0u;
    }
    if constexpr (Var::kQueryTransform) {  // this lane's q elements: dims 16kk + 2c (+1), 16kk + 2c + 8 (+9)
      Var vq(vparams, (uint32_t)x.request, smem);
      const uint32_t qo_head = x.kv_head * group_size + hh;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float2 f = to_float2(T(), qb[kk][h]);
          const uint32_t dim = 16 * kk + 8 * h + 2 * c;
          if (valid)
            qb[kk][h] = pack2(T(), vq.QueryTransform(vparams, f.x, (uint32_t)x.request, 0u, qo_head, dim),
                              vq.QueryTransform(vparams, f.y, (uint32_t)x.request, 0u, qo_head, dim + 1));
        }
    }
  };

  Seg cur = {};
  if (seg_begin < seg_end) {
    const int4 sg = segments[seg_begin];
    cur = make_seg(sg, page_indptr[sg.x]);
    prologue(cur);
    load_q(cur);
  }
  for (int seg = seg_begin; seg < seg_end; ++seg) {
    const int request = cur.request, kv_head = cur.kv_head, head0 = cur.head0, end = cur.end;
    const int first = cur.first, n_tiles = cur.n_tiles, last = cur.last;
    const float seg_slope[2] = {slope[0], slope[1]};  // load_q refills slope for the next segment
    Var var(vparams, (uint32_t)request, smem);        // a variant's per-request state (nothing without one)
    int4 next_sg = make_int4(0, 0, 0, 0);
    int next_page_start = 0;
    if (seg + 1 < seg_end) {  // loaded now, used at this segment's end
      next_sg = segments[seg + 1];
      next_page_start = page_indptr[next_sg.x];
    }
    // heads 2c, 2c + 1; without softmax m stays 0 (the warps' merge then adds their sums)
    float m[2] = {kSoftmax ? neg_inf() : 0.f, kSoftmax ? neg_inf() : 0.f}, dsum[2] = {0.f, 0.f};
    float o[KS][4];
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

    for (int t = 0; t < n_tiles; ++t) {
      issue(cur, t + S - 1);
      cp_async_wait<S - 1>();
      const T* ks = reinterpret_cast<const T*>(pipe + (t % S) * C::kStageBytes);
      if constexpr (C::kConvert) {  // each lane converts the chunks it copied (visible to it after the wait)
        convert_tile<KVT, kChunks, RS>(conv, pipe + (t % S) * C::kStageBytes, lane);
        ks = conv;
      }
      if constexpr (Var::kKeyTransform) {  // each lane transforms the chunks it copied (issue's layout)
        T* kt = const_cast<T*>(ks);
#pragma unroll
        for (int i = 0; i < kChunks / 2; ++i) {
          const int idx = i * 32 + lane, row = idx / kChunks, col = (idx % kChunks) * 8;
          const int tok = first + t * tile_stride + row;
          if (tok < end)
            variant_key_chunk<T>(*reinterpret_cast<uint4*>(kt + row * RS + col), var, vparams, request, tok, kv_head,
                                 col);
        }
      }
      __syncwarp();  // ldmatrix reads rows other lanes copied (or converted)
      const T* vs = ks + 16 * RS;

      float sacc[4];  // S^T: [0], [1] token g, heads 2c, 2c+1; [2], [3] token g + 8
      score_tile<KS, RS>(sacc, ks, qb, mi, mr);
      const int tile_start = first + t * tile_stride;
      const bool in0 = tile_start + g < end, in1 = tile_start + g + 8 < end;
      if constexpr (VAR::kActive) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // the variant's logit (softmax: times its scale), -inf where hidden
          const int col = 2 * c + (i & 1), tok = tile_start + g + (i < 2 ? 0 : 8);
          float x = neg_inf();
          if (((i < 2) ? in0 : in1) && col < GB && head0 + col < group_size) {
            const uint32_t qo_head = kv_head * group_size + head0 + col;
            x = var.LogitsTransform(vparams, sacc[i], (uint32_t)request, 0u, (uint32_t)tok, qo_head, (uint32_t)kv_head);
            if (Var::kLogitsMask && !var.LogitsMask(vparams, (uint32_t)request, 0u, (uint32_t)tok, qo_head,
                                                    (uint32_t)kv_head))
              x = neg_inf();
            else if (kSoftmax)
              x *= var.sm_scale_log2;
          }
          sacc[i] = kSoftmax ? x : (x == neg_inf() ? 0.f : x);  // without softmax the logit is P itself
        }
      } else {
        builtin_logits<ALIBI>(sacc, q_scale, soft_cap, rcp_cap, seg_slope, tile_start, g, last, in0, in1);
      }
      softmax_pv_tile<KS, RS, kSoftmax>(sacc, m, dsum, o, vs, mi, mr);
      __syncwarp();  // every lane is done with this stage before it is refilled
    }
    cp_async_wait<0>();
    __syncwarp();  // every lane is done with this segment's stages
    if (seg + 1 < seg_end) {
      cur = make_seg(next_sg, next_page_start);
      prologue(cur);  // fills stages 0 .. S-2; stage S-1 (fp8: the converted tile) holds the merge state below
      load_q(cur);    // this segment's last mma has consumed qb
    }
    float* sm = reinterpret_cast<float*>(smem + C::kMergeAt);  // warp w: + w * kWarpBytes
    constexpr int ws = C::kWarpBytes / 4;
    stage_warp_state<KS, GB, D>(sm + warp * ws, o, m, dsum, g, c);
    __syncthreads();
    write_segment<D, GB, T, VAR>(sm, ws, segment_partial[seg], request, kv_head, head0, group_size, num_qo_heads,
                                 v_scale, out, o_stride_b, o_stride_h, lse, part_o, part_lse, sinks, &var, &vparams);
    __syncthreads();  // the merge buffers become pipeline buffers again
  }
}

// Tensor-core decode for head dims past 256 (512: Gemma-family models), KV of the q dtype or fp8. A
// 512-wide row fits neither a warp's registers (Q^T fragments and O^T accumulators) nor a per-warp
// pipeline of whole rows, so the 4 warps of a CTA split the head dim: warp w owns dims
// [w * D/4, (w + 1) * D/4) and the warps walk one segment's 16-token tiles together. Each warp copies
// and multiplies only its slice of K and V (a private cp.async pipeline, as in batch_decode_tc_kernel);
// its partial S^T = K_w . Q_w^T goes through shared memory, where every warp sums the 4 partials in
// the same order (one barrier a tile, two buffers), so all warps hold the same scores and softmax
// state and accumulate O^T for their own dims. Nothing is merged across warps at the end: each warp
// writes its slice of the output. Each K/V byte is read once, as in the other decode kernels.
// Copies move 8 elements (16 bytes, fp8: 8), so a cache needs the alignment of the other decode kernels.
// 16-bit KV lands in the padded tile that ldmatrix reads; fp8 KV lands in raw stages, and each lane
// converts the chunks it copied into that tile (in the q dtype) before the warp's mma.
template <int D, typename KVT>
struct DecodeWideCfg {
  static_assert(D % 64 == 0 && D > 256 && D <= 512, "wide decode: head_dim a multiple of 64 in (256, 512]");
  typedef typename Pack8<KVT>::raw Raw;              // one copy: 8 elements
  static constexpr bool kConvert = sizeof(KVT) == 1; // fp8: raw stages, converted into the tile
  static constexpr int kDW = D / kDecodeWarps;       // dims a warp owns
  static constexpr int kChunks = kDW / 8;            // copies a row
  static constexpr int kRow = kDW + 8;               // tile row stride, elements (ldmatrix without bank conflicts)
  static constexpr int kTileElems = 2 * 16 * kRow;   // K and V rows of 16 tokens, this warp's dims, 16-bit
  static constexpr int kTileBytes = kTileElems * 2;
  static constexpr int kStageBytes = kConvert ? 2 * 16 * kChunks * int(sizeof(Raw)) : kTileBytes;
  static constexpr int kStages = kConvert ? 4 : 3;   // a warp keeps 8-12 KB in flight: 2 CTAs an SM ~100 KB
  static constexpr int kWarpBytes = kStages * kStageBytes + (kConvert ? kTileBytes : 0);
  static constexpr int kExchangeBytes = 2 * kDecodeWarps * 32 * 16;  // two buffers of every warp's S^T fragments
  // fi_cupy/decode.py: decode_smem_bytes() computes the same number for the launch.
  static constexpr int kSmemBytes = kDecodeWarps * kWarpBytes + kExchangeBytes;
};

template <int D, int GB, typename T, typename KVT, bool ALIBI>
__global__ void __launch_bounds__(kDecodeThreads, 2)
batch_decode_wide_kernel(const T* __restrict__ q, long long q_stride_b, long long q_stride_h,
                         const KVT* __restrict__ k_cache, const KVT* __restrict__ v_cache,
                         long long kv_stride_page, long long kv_stride_slot, long long kv_stride_head,
                         const int* __restrict__ page_indptr, const int* __restrict__ page_indices,
                         const int* __restrict__ kv_lens, const int* __restrict__ cta_indptr,
                         const int4* __restrict__ segments, const int* __restrict__ segment_partial,
                         T* __restrict__ out, long long o_stride_b, long long o_stride_h,
                         float* __restrict__ lse, float* __restrict__ part_o, float* __restrict__ part_lse,
                         int num_qo_heads, int group_size, int head_slices, unsigned int page_size,
                         unsigned int page_div_mul, unsigned int page_div_shift, float q_scale, float soft_cap,
                         float v_scale, float rope_rcp_scale, double rope_log2_theta,
                         const float* __restrict__ sinks, const float* __restrict__ alibi_slopes,
                         const NoVariant::Params /* the decode kernels' one ABI: variants on the tc kernel only */) {
  static_assert(GB <= 8, "an mma tile holds 8 heads");
  using C = DecodeWideCfg<D, KVT>;
  constexpr int S = C::kStages, RS = C::kRow, DW = C::kDW, KS = DW / 16, kChunks = C::kChunks;
  static_assert(C::kConvert || sizeof(KVT) == sizeof(T), "16-bit KV is read in the q dtype");
  static_assert((GB * DW + 2 * GB) * 4 <= C::kTileBytes, "the epilogue stages a warp's output in one tile");
  pdl_begin();
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;              // fragment row / column pair
  const int mi = lane / 8, mr = lane % 8;            // ldmatrix: matrix and row this lane addresses
  const int dim0 = warp * DW;                        // this warp's slice of the head dim
  unsigned char* pipe = smem + warp * C::kWarpBytes;     // stages: [K rows | V rows] of this warp's dims
  T* conv = reinterpret_cast<T*>(pipe + S * C::kStageBytes);  // fp8: the converted tile (16-bit: unused)
  float4* xch = reinterpret_cast<float4*>(smem + kDecodeWarps * C::kWarpBytes);  // [2][warps][32 lanes]
  const FastDiv page_div = {page_size, page_div_mul, page_div_shift};
  const float rcp_cap = soft_cap > 0.f ? __frcp_rn(soft_cap) : 0.f;

  struct Seg {
    int request, kv_head, head0, end, first, n_tiles, last;  // last: the query's position (ALiBi)
    long long head_off;
    const int* pages;
  };
  const int seg_begin = cta_indptr[blockIdx.x], seg_end = cta_indptr[blockIdx.x + 1];
  auto make_seg = [&](int4 sg, int page_start) {
    Seg x;
    x.request = sg.x;
    x.kv_head = sg.y / head_slices;
    x.head0 = (sg.y % head_slices) * GB;
    x.end = sg.w;
    x.first = sg.z;
    x.n_tiles = (x.end > x.first) ? (x.end - x.first + 15) / 16 : 0;
    x.head_off = (long long)x.kv_head * kv_stride_head + dim0;
    x.pages = page_indices + page_start;
    x.last = ALIBI ? kv_lens[x.request] - 1 : 0;
    return x;
  };

  // Copies of this warp's slice (copy_tile; head_off includes dim0): lane r < 16 computes row r's cache
  // offset, its page id loaded one issue ahead.
  int pid = 0;
  auto load_pid = [&](const Seg& x, int t) {
    const int tok = x.first + t * 16 + (lane % 16);
    pid = (t < x.n_tiles && tok < x.end) ? x.pages[page_div.quot(tok)] : 0;
  };
  auto issue = [&](const Seg& x, int t) {
    if (t < x.n_tiles) {
      unsigned char* stage = pipe + (t % S) * C::kStageBytes;
      const int my_tok = x.first + t * 16 + (lane % 16);
      const unsigned p = page_div.quot(my_tok);
      const long long my_off = (long long)pid * kv_stride_page +
                               (long long)(my_tok - p * page_size) * kv_stride_slot + x.head_off;
      copy_tile<KVT, T, kChunks, RS>(stage, k_cache, v_cache, my_off, x.first + t * 16, x.end, lane);
      load_pid(x, t + 1);
    }
    cp_async_commit();
  };
  auto prologue = [&](const Seg& x) {
    load_pid(x, 0);
#pragma unroll
    for (int t = 0; t < S - 1; ++t) issue(x, t);
  };

  // Q^T fragments of this warp's dims (B operand): head g of the block, dims dim0 + 16kk + 2c, +1, +8, +9.
  unsigned qb[KS][2];
  float slope[2] = {0.f, 0.f};  // ALiBi slopes (base 2) of this lane's score columns, heads 2c and 2c + 1
  auto load_q = [&](const Seg& x) {
    const int hh = x.head0 + g;
    const bool valid = g < GB && hh < group_size;
    if (ALIBI) lane_alibi_slopes<GB>(slope, alibi_slopes, x.kv_head, x.head0, group_size, c);
    const T* qp = q + x.request * q_stride_b + (x.kv_head * group_size + (valid ? hh : 0)) * q_stride_h + dim0 + 2 * c;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      qb[kk][0] = valid ? *reinterpret_cast<const unsigned*>(qp + 16 * kk) : 0u;
      qb[kk][1] = valid ? *reinterpret_cast<const unsigned*>(qp + 16 * kk + 8) : 0u;
    }
  };

  Seg cur = {};
  if (seg_begin < seg_end) {
    const int4 sg = segments[seg_begin];
    cur = make_seg(sg, page_indptr[sg.x]);
    prologue(cur);
    load_q(cur);
  }
  int tick = 0;  // tiles done by this CTA: the exchange buffer of a tile is tick & 1, across segments
  for (int seg = seg_begin; seg < seg_end; ++seg) {
    const int request = cur.request, kv_head = cur.kv_head, head0 = cur.head0, end = cur.end;
    const int first = cur.first, n_tiles = cur.n_tiles, last = cur.last;
    const float seg_slope[2] = {slope[0], slope[1]};  // load_q refills slope for the next segment
    int4 next_sg = make_int4(0, 0, 0, 0);
    int next_page_start = 0;
    if (seg + 1 < seg_end) {
      next_sg = segments[seg + 1];
      next_page_start = page_indptr[next_sg.x];
    }
    float m[2] = {neg_inf(), neg_inf()}, dsum[2] = {0.f, 0.f};  // heads 2c, 2c + 1
    float o[KS][4];
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

    for (int t = 0; t < n_tiles; ++t, ++tick) {
      issue(cur, t + S - 1);
      cp_async_wait<S - 1>();
      const T* ks = reinterpret_cast<const T*>(pipe + (t % S) * C::kStageBytes);
      if constexpr (C::kConvert) {  // each lane converts the chunks it copied (visible to it after the wait)
        convert_tile<KVT, kChunks, RS>(conv, pipe + (t % S) * C::kStageBytes, lane);
        ks = conv;
      }
      __syncwarp();  // ldmatrix reads rows other lanes copied (or converted)
      const T* vs = ks + 16 * RS;

      float sacc[4];  // S^T over this warp's dims: token g / g + 8, heads 2c, 2c + 1
      score_tile<KS, RS>(sacc, ks, qb, mi, mr);
      // The whole S^T: every warp sums the 4 partials in the same order, so all hold the same scores.
      float4* buf = xch + (tick & 1) * (kDecodeWarps * 32);
      buf[warp * 32 + lane] = make_float4(sacc[0], sacc[1], sacc[2], sacc[3]);
      __syncthreads();
      sacc[0] = sacc[1] = sacc[2] = sacc[3] = 0.f;
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float4 p4 = buf[w * 32 + lane];
        sacc[0] += p4.x;
        sacc[1] += p4.y;
        sacc[2] += p4.z;
        sacc[3] += p4.w;
      }
      const int tile_start = first + t * 16;
      const bool in0 = tile_start + g < end, in1 = tile_start + g + 8 < end;
      builtin_logits<ALIBI>(sacc, q_scale, soft_cap, rcp_cap, seg_slope, tile_start, g, last, in0, in1);
      softmax_pv_tile<KS, RS, true>(sacc, m, dsum, o, vs, mi, mr);
      __syncwarp();  // every lane is done with this stage before it is refilled
    }
    cp_async_wait<0>();
    __syncwarp();
    if (seg + 1 < seg_end) {
      cur = make_seg(next_sg, next_page_start);
      prologue(cur);  // fills stages 0 .. S-2; stage S-1 (fp8: the converted tile) stages the output below
      load_q(cur);
    }
    // This warp's slice of each head's output: O^T fragments to [GB][DW] floats, then (m, d) per head.
    float* blk = reinterpret_cast<float*>(C::kConvert ? reinterpret_cast<unsigned char*>(conv)
                                                      : pipe + (S - 1) * C::kStageBytes);
    stage_warp_state<KS, GB, DW>(blk, o, m, dsum, g, c);
    __syncwarp();
    const int prow = segment_partial[seg];
    for (int item = lane; item < GB * kChunks; item += 32) {
      const int h = item / kChunks, d0 = (item % kChunks) * 8;
      if (head0 + h >= group_size) continue;
      const float mh = blk[GB * DW + 2 * h], dh = blk[GB * DW + 2 * h + 1];
      const int qo_head = kv_head * group_size + head0 + h;
      float l = (dh > 0.f) ? mh + __log2f(dh) : neg_inf();
      float inv = ((dh > 0.f) ? __frcp_rn(dh) : 0.f) * v_scale;
      if (prow < 0 && sinks != nullptr) inv *= fold_sink(l, sinks, qo_head);  // partial rows: at the merge
      float a[8];
      load8<float>(blk + h * DW + d0, a);
#pragma unroll
      for (int e = 0; e < 8; ++e) a[e] *= inv;
      if (prow < 0) {
        store8<T>(out + request * o_stride_b + qo_head * o_stride_h + dim0 + d0, a);
        if (lse != nullptr && dim0 + d0 == 0) lse[(long long)request * num_qo_heads + qo_head] = l;
      } else {
        store8<float>(part_o + ((long long)prow * GB + h) * D + dim0 + d0, a);
        if (dim0 + d0 == 0) part_lse[(long long)prow * GB + h] = l;
      }
    }
    __syncwarp();  // the staged output is read before the stage is refilled
  }
}

// Merge the partial states of each (request, head block) cut over several CTAs: for each head,
// out = sum_r 2^lse_r o_r / sum_r 2^lse_r over rows merge_indptr[i] .. merge_indptr[i + 1] of the
// cut pair merge_pairs[i]. Grid (cut pairs, GB): only the cut pairs, so a batch of thousands of
// pairs does not launch thousands of CTAs that exit (a CUDA graph launches the plan's capacity, and
// the padded merge_indptr gives the CTAs past the cut pairs no rows). The 128 threads are (row
// group, 8-dim chunk): every row group sums its rows with U loads in flight, so a merge of tens of
// rows takes a few memory round trips.
// (The minimum of 8 CTAs an SM is for ptxas: left free, NVRTC 13.0 gives sm_80 32 registers and a spill.)
template <int D, int GB, typename OT>
__global__ void __launch_bounds__(128, 8)
merge_states_kernel(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                    const int* __restrict__ merge_pairs, const int* __restrict__ merge_indptr,
                    OT* __restrict__ out, long long o_stride_b, long long o_stride_h, float* __restrict__ lse,
                    int num_qo_heads, int group_size, int head_blocks, const float* __restrict__ sinks) {
  constexpr int kChunks = NextPow2<D / 8>::value, kGroups = 128 / kChunks, U = 4;
  // Launched early, the merge waits here for the decode kernel's partial states. Every CTA waits,
  // even one with nothing to merge, so that this grid's end implies the decode kernel's (the next
  // kernel's wait covers only this one).
  pdl_begin();
  const int h = blockIdx.y;
  const int row0 = merge_indptr[blockIdx.x], row1 = merge_indptr[blockIdx.x + 1];
  const int pair = merge_pairs[blockIdx.x];  // past the cut pairs: 0, a valid pair with no rows here
  const int slices = (group_size + GB - 1) / GB;
  const int request = pair / head_blocks, hb = pair % head_blocks;
  const int kv_head = hb / slices, head0 = (hb % slices) * GB;
  if (row1 - row0 < 2 || head0 + h >= group_size) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunk = threadIdx.x % kChunks, group = threadIdx.x / kChunks;
  const int dim0 = (chunk < D / 8 ? chunk : 0) * 8;  // padding chunks re-read chunk 0, unused
  __shared__ float sm_red[4];
  __shared__ float sm_acc[kGroups][D];

  float m = neg_inf();
  for (int r = row0 + threadIdx.x; r < row1; r += 128) m = fmaxf(m, part_lse[(long long)r * GB + h]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) sm_red[warp] = m;
  __syncthreads();
  m = fmaxf(fmaxf(sm_red[0], sm_red[1]), fmaxf(sm_red[2], sm_red[3]));

  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float wsum = 0.f;
  for (int r = row0 + group; r < row1; r += kGroups * U) {
    float wr[U], o[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int rr = min(r + kGroups * u, row1 - 1);  // clamped rows get weight 0
      const float l = part_lse[(long long)rr * GB + h];
      wr[u] = (r + kGroups * u >= row1 || l == neg_inf()) ? 0.f : ptx_exp2(l - m);
      load8<float>(part_o + ((long long)rr * GB + h) * D + dim0, o[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      wsum += wr[u];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = fmaf(wr[u], o[u][e], acc[e]);
    }
  }
  if (chunk < D / 8) {
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[group][dim0 + e] = acc[e];
  }
  __shared__ float sm_w[kGroups];  // the threads of a row group hold the same weight sum
  if (chunk == 0) sm_w[group] = wsum;
  __syncthreads();
  if (threadIdx.x < D / 8) {
    float w = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int g = 0; g < kGroups; ++g) {
      w += sm_w[g];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] += sm_acc[g][threadIdx.x * 8 + e];
    }
    const int qo_head = kv_head * group_size + head0 + h;
    float inv = (w > 0.f) ? __frcp_rn(w) : 0.f, l = (w > 0.f) ? m + __log2f(w) : neg_inf();
    if (sinks != nullptr) inv *= fold_sink(l, sinks, qo_head);
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= inv;
    store8<OT>(out + request * o_stride_b + qo_head * o_stride_h + threadIdx.x * 8, o);
    if (lse != nullptr && threadIdx.x == 0) lse[(long long)request * num_qo_heads + qo_head] = l;
  }
}

}  // namespace fic
