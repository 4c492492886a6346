// Decode attention over a paged KV cache: one query token per request, K/V read from pages.
//
// Work split (host-side plan, fi_cupy/scheduler.py): the grid is (slots, num_kv_heads, head_slices).
// A slot is a contiguous token range [start, end) of one request; a request with a long context is
// split over several slots (split-KV) whose partial results go to a float32 workspace and are merged
// by merge_states_kernel. A request covered by a single slot writes its output directly.
// Unused slots (request < 0) exit at once, so the grid depends on the batch size only and a planned
// run() can be replayed in a CUDA graph after a re-plan.
//
// Inside a block: 4 warps stride over the slot's tokens in tiles. Each token row is handled by a
// row group of LANES lanes; each lane owns 8 consecutive dims (one 16-byte load for 16-bit KV).
// A lane computes all GB query heads of the GQA group against the K row it loaded, so each K/V
// byte is read from memory once per block. Softmax is online, in base 2, per row group; the row
// groups and warps are merged at the end.
#include "common/types.cuh"
#include "common/math.cuh"
#include "common/softmax.cuh"
#include "common/rope.cuh"

namespace fic {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;

template <int D, int GB>
struct DecodeTraits {
  static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head_dim must be a multiple of 16 in [16, 256]");
  static constexpr int kActiveLanes = D / 8;                   // lanes holding real dims
  static constexpr int kLanes = NextPow2<kActiveLanes>::value;  // row group size (power of 2)
  static constexpr int kRowsPerWarp = 32 / kLanes;
  // rows loaded per lane per tile (two tiles in flight); fewer for 8 heads to stay under 255 registers
  static constexpr int kRowsPerLane = GB >= 8 ? 2 : 4;
  static constexpr int kTileRows = kRowsPerWarp * kRowsPerLane; // tokens per warp per tile
};

struct SlotInfo {
  int request, start, end, partial_row;
};

template <int D, int GB, typename KVT>
struct KVTile {
  typename Pack8<KVT>::raw k[DecodeTraits<D, GB>::kRowsPerLane], v[DecodeTraits<D, GB>::kRowsPerLane];
};

template <int D, int GB, typename QT, typename KVT, bool ROPE>
__global__ void __launch_bounds__(kDecodeThreads)
batch_decode_kernel(const QT* __restrict__ q, long long q_stride_b, long long q_stride_h,
                    const KVT* __restrict__ k_cache, const KVT* __restrict__ v_cache,
                    long long kv_stride_page, long long kv_stride_slot, long long kv_stride_head,
                    const int* __restrict__ page_indptr, const int* __restrict__ page_indices,
                    const int* __restrict__ kv_lens, const int4* __restrict__ slots,
                    QT* __restrict__ out, long long o_stride_b, long long o_stride_h,
                    float* __restrict__ lse, float* __restrict__ part_o, float* __restrict__ part_lse,
                    int num_qo_heads, int group_size, unsigned int page_size,
                    unsigned int page_div_mul, unsigned int page_div_shift, int window_left,
                    float q_scale, float soft_cap, float v_scale, float rope_rcp_scale,
                    float rope_theta) {
  using Tr = DecodeTraits<D, GB>;
  constexpr int L = Tr::kLanes, R = Tr::kRowsPerLane, RPW = Tr::kRowsPerWarp;

  const int4 slot4 = slots[blockIdx.x];
  const SlotInfo slot = {slot4.x, slot4.y, slot4.z, slot4.w};
  if (slot.request < 0) return;
  const int kv_head = blockIdx.y;
  const int head0 = blockIdx.z * GB;  // first head of this slice within the group

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = lane / L, lane_in_row = lane % L, row_base = row * L;
  const bool active_lane = lane_in_row < Tr::kActiveLanes;
  const int dim0 = (active_lane ? lane_in_row : 0) * 8;

  const int kv_len = kv_lens[slot.request];
  // Sliding window: the query sits at position kv_len - 1 and sees keys >= kv_len - 1 - window_left.
  const int visible_start = (window_left >= 0) ? max(0, kv_len - 1 - window_left) : 0;
  const int start = max(slot.start, visible_start), end = slot.end;

  float rope_freq[8];
  if (ROPE) rope_freqs<D>(lane_in_row, rope_rcp_scale, rope_theta, rope_freq);

  // Query heads of this slice, pre-scaled so that q.k is the base-2 logit (or the pre-tanh logit).
  float qf[GB][8];
#pragma unroll
  for (int h = 0; h < GB; ++h) {
    const int hh = head0 + h;
    const int qo_head = kv_head * group_size + hh;
    if (hh < group_size) {
      load8<QT>(q + slot.request * q_stride_b + qo_head * q_stride_h + dim0, qf[h]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[h][e] = 0.f;
    }
    if (ROPE) rope_apply<D>(qf[h], rope_freq, float(kv_len - 1), lane_in_row, row_base);
#pragma unroll
    for (int e = 0; e < 8; ++e) qf[h][e] = active_lane ? qf[h][e] * q_scale : 0.f;
  }

  SoftmaxState<8> st[GB];
#pragma unroll
  for (int h = 0; h < GB; ++h) st[h].init();

  const long long head_off = (long long)kv_head * kv_stride_head + dim0;
  const int* pages = page_indices + page_indptr[slot.request];
  const FastDiv page_div = {page_size, page_div_mul, page_div_shift};

  auto load_tile = [&](int tile_start, KVTile<D, GB, KVT>& t) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int tok = tile_start + j * RPW + row;
      if (tok < end && active_lane) {
        const unsigned int p = page_div.quot(tok);
        const long long off = (long long)pages[p] * kv_stride_page +
                              (long long)(tok - p * page_size) * kv_stride_slot + head_off;
        t.k[j] = load_pack8<KVT>(k_cache + off);
        t.v[j] = load_pack8<KVT>(v_cache + off);
      } else {
        t.k[j] = {};
        t.v[j] = {};
      }
    }
  };

  const int tile_stride = kDecodeWarps * Tr::kTileRows;
  int tile_start = start + warp * Tr::kTileRows;
  KVTile<D, GB, KVT> cur, nxt;
  if (tile_start < end) load_tile(tile_start, cur);
  for (; tile_start < end; tile_start += tile_stride) {
    // Prefetch the next tile while this one is computed.
    if (tile_start + tile_stride < end) load_tile(tile_start + tile_stride, nxt);

    float s[R][GB];
#pragma unroll
    for (int j = 0; j < R; ++j) {
      float kf[8];
      unpack8<KVT>(cur.k[j], kf);
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
        const int tok = tile_start + j * RPW + row;
        float x = s[j][h];
        if (soft_cap > 0.f) x = soft_cap * FIC_LOG2E * tanhf(x / soft_cap);
        s[j][h] = (tok < end) ? x : neg_inf();
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
      unpack8<KVT>(cur.v[j], vf);
#pragma unroll
      for (int h = 0; h < GB; ++h)
#pragma unroll
        for (int e = 0; e < 8; ++e) st[h].acc[e] = fmaf(s[j][h], vf[e], st[h].acc[e]);
    }
    cur = nxt;
  }

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

  // Merge the warps through shared memory.
  __shared__ float sm_acc[kDecodeWarps][GB][D];
  __shared__ float sm_md[kDecodeWarps][GB][2];
  if (row == 0 && active_lane) {
#pragma unroll
    for (int h = 0; h < GB; ++h) {
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_acc[warp][h][dim0 + e] = st[h].acc[e];
      if (lane_in_row == 0) {
        sm_md[warp][h][0] = st[h].m;
        sm_md[warp][h][1] = st[h].d;
      }
    }
  }
  __syncthreads();

  const bool direct = slot.partial_row < 0;
  for (int item = threadIdx.x; item < GB * Tr::kActiveLanes; item += kDecodeThreads) {
    const int h = item / Tr::kActiveLanes, d0 = (item % Tr::kActiveLanes) * 8;
    const int hh = head0 + h;
    if (hh >= group_size) continue;
    const int qo_head = kv_head * group_size + hh;
    SoftmaxState<8> m;
    m.init();
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      float a[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) a[e] = sm_acc[w][h][d0 + e];
      m.merge(sm_md[w][h][0], sm_md[w][h][1], a);
    }
    const float inv = m.inv_d();
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = m.acc[e] * inv * v_scale;
    if (direct) {
      store8<QT>(out + slot.request * o_stride_b + qo_head * o_stride_h + d0, o);
      if (lse != nullptr && d0 == 0) lse[(long long)slot.request * num_qo_heads + qo_head] = m.lse();
    } else {
      const long long prow = (long long)slot.partial_row * num_qo_heads + qo_head;
      store8<float>(part_o + prow * D + d0, o);
      if (d0 == 0) part_lse[prow] = m.lse();
    }
  }
}

// Merge the split-KV partial states of each request: grid (batch, ceil(num_qo_heads / 4)), one warp
// per (request, head). merge_indptr[r] .. merge_indptr[r + 1] are the request's partial rows;
// requests with fewer than two rows were written directly by the decode kernel.
template <int D, typename OT>
__global__ void __launch_bounds__(128)
merge_states_kernel(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                    const int* __restrict__ merge_indptr, OT* __restrict__ out, long long o_stride_b,
                    long long o_stride_h, float* __restrict__ lse, int num_qo_heads) {
  constexpr int kActiveLanes = D / 8;
  const int r = blockIdx.x;
  const int head = blockIdx.y * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (head >= num_qo_heads) return;
  const int row0 = merge_indptr[r], row1 = merge_indptr[r + 1];
  if (row1 - row0 < 2) return;
  SoftmaxState<8> st;
  st.init();
  // Each partial is already normalised: weight it by 2^lse.
  for (int row = row0; row < row1; ++row) {
    const long long prow = (long long)row * num_qo_heads + head;
    const float l = part_lse[prow];
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (lane < kActiveLanes) load8<float>(part_o + prow * D + lane * 8, a);
    st.merge(l, (l == neg_inf()) ? 0.f : 1.f, a);
  }
  if (lane < kActiveLanes) {
    float o[8];
    const float inv = st.inv_d();
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = st.acc[e] * inv;
    store8<OT>(out + r * o_stride_b + head * o_stride_h + lane * 8, o);
  }
  if (lse != nullptr && lane == 0) lse[(long long)r * num_qo_heads + head] = st.lse();
}

}  // namespace fic
