// Score-tile steps shared by the prefill kernels (cuda_src/prefill.cu on mma.sync, prefill_sm90.cu on
// wgmma). A warp holds MT slices of 16 query rows; both accumulators have the m16n8 layout: lane
// (g = lane / 4, c = lane % 4) holds rows g and g + 8 of a slice, columns 8n + 2c and 8n + 2c + 1 of
// block n. Scores are in base 2 after `scale`; packed row p is query token p / group_size, head
// kv_head * group_size + p % group_size (prefill.cu's header).
#pragma once
#include "math.cuh"
#include "softmax.cuh"
#include "vec.cuh"
#include "variant.cuh"

namespace fic {

// The launch arguments of both prefill kernels, in the order fi_cupy/prefill.py's launch_prefill
// packs them: one ABI, so the two kernels cannot drift apart. T: q / out dtype; KVT: K/V dtype.
// head_dim_qk / head_dim_vo: the real head dims, at most the kernel's compiled widths (the portable
// kernel zero-fills the columns past them; the Hopper kernel takes exact widths). v_stride_*: V's
// strides where its head dim differs from K's (equal to kv_stride_* otherwise). q_pe / k_pe (MLA's
// absorbed Q/K, width 576 of the portable kernel only): columns 512 .. 575 of Q and K come from these
// arrays (q_pe (n, heads, 64), k_pe the kpe cache's pages and slots); nullptr elsewhere.
#define FIC_PREFILL_PARAMS(T, KVT)                                                                            \
  const T *__restrict__ q, long long q_stride_n, long long q_stride_h, const KVT *__restrict__ k_base,          \
      const KVT *__restrict__ v_base, long long kv_stride_page, long long kv_stride_slot, long long kv_stride_head, \
      const int *__restrict__ qo_indptr, const int *__restrict__ kv_indptr, const int *__restrict__ page_indices,  \
      const int *__restrict__ kv_lens, const unsigned char *__restrict__ custom_mask,                            \
      const long long *__restrict__ mask_offset, const int4 *__restrict__ items, const int *__restrict__ num_items, \
      T *__restrict__ out, long long o_stride_n, long long o_stride_h, float *__restrict__ lse,                   \
      float *__restrict__ part_o, float *__restrict__ part_lse, int num_qo_heads, int group_size,               \
      unsigned int page_size, unsigned int page_div_mul, unsigned int page_div_shift, int causal, int window_left, \
      float sm_scale, float soft_cap, float v_scale, float rope_rcp_scale, double rope_log2_theta,              \
      const float *__restrict__ sinks, const float *__restrict__ alibi_slopes, int head_dim_qk, int head_dim_vo,  \
      long long v_stride_page, long long v_stride_slot, long long v_stride_head, const T *__restrict__ q_pe,       \
      long long q_pe_stride_n, long long q_pe_stride_h, const KVT *__restrict__ k_pe, long long k_pe_stride_page, \
      long long k_pe_stride_slot

// Variant flags (template argument FLAGS of both kernels): logits soft cap, packed custom mask, ALiBi
// (portable kernel only). Each costs registers and code in the inner loop, so kernels without them do
// not carry them.
constexpr int kSoftCap = 1, kCustomMask = 2, kAlibi = 4;

// A work item (fi_cupy/scheduler.py): {request, KV head, first packed row, partial row or -1}, {KV
// begin, KV end, -, -}, with its request's geometry and the KV range it visits: [lo, hi) after the
// causal and window bounds of its ROWS packed rows, in n_tiles tiles of KV keys.
struct PrefillItem {
  int req, kv_head, p0, qo_start, packed_len, kv_len, kv_off;
  int delta;       // kv_len - qo_len: query i sits at key position i + delta
  int t_lo, t_hi;  // the first and last query token of the rows
  int lo, hi, n_tiles;

  template <int ROWS, int KV>
  __device__ __forceinline__ static PrefillItem load(const int4* items, int it, const int* qo_indptr,
                                                     const int* kv_indptr, const int* kv_lens, int group_size,
                                                     int causal, int window_left) {
    const int4 ia = items[2 * it], ib = items[2 * it + 1];
    PrefillItem w;
    w.req = ia.x;
    w.kv_head = ia.y;
    w.p0 = ia.z;
    w.qo_start = qo_indptr[w.req];
    const int qo_len = qo_indptr[w.req + 1] - w.qo_start;
    w.kv_len = kv_lens[w.req];
    w.kv_off = kv_indptr[w.req];
    w.packed_len = qo_len * group_size;
    w.delta = w.kv_len - qo_len;
    w.t_lo = w.p0 / group_size;
    w.t_hi = (min(w.p0 + ROWS, w.packed_len) - 1) / group_size;
    w.lo = ib.x;
    w.hi = min(ib.y, w.kv_len);
    if (causal) w.hi = min(w.hi, w.t_hi + w.delta + 1);
    if (window_left >= 0) w.lo = max(w.lo, w.t_lo + w.delta - window_left);
    w.n_tiles = w.hi > w.lo ? (w.hi - w.lo + KV - 1) / KV : 0;
    return w;
  }

  // Whether the tile of KV keys from j0 straddles a bound: only those take element masks.
  template <int KV>
  __device__ __forceinline__ bool edge(int j0, int causal, int window_left, bool masked) const {
    return j0 + KV > hi || (causal && j0 + KV - 1 > t_lo + delta) ||
           (window_left >= 0 && j0 < t_hi + delta - window_left) || masked;
  }
};

// Logits soft cap: s = cap * tanh(s * sm_scale / cap) (cap_pre = sm_scale / cap).
template <int MT, int NT>
__device__ __forceinline__ void cap_scores(float (&s)[MT][NT][4], float soft_cap, float cap_pre) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mt][nt][e] = soft_cap * tanh_inline(s[mt][nt][e] * cap_pre);
}

// ALiBi: s += slope_h * (j - i) for key position j and query position i, in the units of s (the
// slopes come divided by sm_scale: exp2 scales s by sm_scale * log2(e) later). slope, qpos: the
// thread's rows (mt, g + 8h); j0: the tile's first key. j - i is exact in float up to 2^24.
template <int MT, int NT>
__device__ __forceinline__ void alibi_scores(float (&s)[MT][NT][4], const float (&slope)[MT][2],
                                             const float (&qpos)[MT][2], int j0, int c) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float d0 = float(j0 + 2 * c) - qpos[mt][h];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) s[mt][nt][2 * h + e] = fmaf(slope[mt][h], d0 + float(nt * 8 + e), s[mt][nt][2 * h + e]);
    }
}

// The ALiBi rows of a thread (alibi_scores): packed rows p_first + mt * 16 + g + 8h (clamped to the
// item's last row), their heads' slopes over the kernel's logit scale and their query positions.
template <int MT>
__device__ __forceinline__ void alibi_rows(float (&slope)[MT][2], float (&qpos)[MT][2], const float* alibi_slopes,
                                           float rcp_sm_scale, const PrefillItem& b, int group_size, int p_first,
                                           int g) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int p = max(min(p_first + mt * 16 + g + 8 * h, b.packed_len - 1), 0);
      const int ti = p / group_size;
      slope[mt][h] = alibi_slopes[b.kv_head * group_size + p - ti * group_size] * rcp_sm_scale;
      qpos[mt][h] = float(ti + b.delta);
    }
}

// -inf where a score is masked: key j of the tile (j0 + 8n + 2c + e) past the item's hi, after the
// query's causal position, before its window, or cleared in the custom mask (the request's bits from
// mask_base). p_first: the packed row of the warp's first slice.
template <int MT, int NT, bool MASKED>
__device__ __forceinline__ void mask_scores(float (&s)[MT][NT][4], const PrefillItem& b, int group_size, int causal,
                                            int window_left, long long mask_base, int p_first, int j0, int g, int c,
                                            const unsigned char* custom_mask) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int p = p_first + mt * 16 + g + 8 * h;  // rows past the end: clamped
      const int ti = min(p, b.packed_len - 1) / group_size, last = causal ? ti + b.delta : 0x7fffffff;
      const int first = window_left >= 0 ? ti + b.delta - window_left : -0x7fffffff;
      const long long mrow = mask_base + (long long)ti * b.kv_len;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = j0 + nt * 8 + 2 * c + e;
          bool ok = j < b.hi && j <= last && j >= first;
          if (MASKED && ok) {
            const long long bit = mrow + j;
            ok = (custom_mask[bit >> 3] >> (bit & 7)) & 1;
          }
          if (!ok) s[mt][nt][2 * h + e] = neg_inf();
        }
    }
}

// Online softmax, first half: the rows' new maxima m (over the quad's 4 lanes), sums and O rescaled
// to them; ms = the scaled maxima that P is taken against (0 for a row that saw nothing yet).
template <int MT, int NT, int DT>
__device__ __forceinline__ void softmax_rescale(const float (&s)[MT][NT][4], float (&m)[MT][2],
                                                float (&dsum)[MT][2], float (&o)[MT][DT][4], float (&ms)[MT][2],
                                                float scale) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m[mt][h];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      ms[mt][h] = mx == neg_inf() ? 0.f : mx * scale;
      const float alpha = ptx_exp2(m[mt][h] * scale - ms[mt][h]);
      m[mt][h] = mx;
      dsum[mt][h] *= alpha;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[mt][dt][2 * h] *= alpha;
        o[mt][dt][2 * h + 1] *= alpha;
      }
    }
  }
}

// Online softmax, second half for one 16-key step kk: P = exp2(s * scale - ms) of key blocks 2kk and
// 2kk + 1, added to the row sums and packed as the m16n8k16 A fragment (P on the left of P V).
template <typename T, int MT, int NT>
__device__ __forceinline__ void make_p(unsigned (&pa)[MT][4], const float (&s)[MT][NT][4], int kk,
                                       const float (&ms)[MT][2], float (&dsum)[MT][2], float scale) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float x0 = ptx_exp2(fmaf(s[mt][2 * kk + e2][2 * h], scale, -ms[mt][h]));
        const float x1 = ptx_exp2(fmaf(s[mt][2 * kk + e2][2 * h + 1], scale, -ms[mt][h]));
        dsum[mt][h] += x0 + x1;
        pa[mt][e2 * 2 + h] = pack2(T(), x0, x1);
      }
}

// Where the finished rows go: the output (prow < 0) or float32 partial rows from prow on.
struct RowDest {
  int p0;          // the tile's first packed row
  int packed_len;
  int group_size;
  int kv_head;
  int qo_start;    // the request's first query token
  int num_qo_heads;
  int prow;        // first partial row, or -1
  float* lse;      // the output lse (may be null)
  float* part_o;
  float* part_lse;
  const float* sinks;  // attention-sink logits per qo head (may be null): folded into direct rows
  int vo_dim;          // head_dim_vo: the output's (and a partial row's) width
  int vo_off;          // the first output column this CTA computes (head_dim_vo split over blockIdx.y)
};

// Epilogue, first half: the row sums over the quad, O normalised (times v_scale), lse in base 2
// (-inf for a row that saw no key: o = 0 then) to the output or the partial rows, and partial O
// rows. The caller then writes a direct item's O rows (staged through shared memory).
template <int MT, int DT>
__device__ __forceinline__ void finish_rows(float (&o)[MT][DT][4], const float (&m)[MT][2], const float (&dsum)[MT][2],
                                            float scale, float v_scale, int r_first, int g, int c,
                                            const RowDest& k) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float d = dsum[mt][h];
      d += __shfl_xor_sync(0xffffffffu, d, 1);
      d += __shfl_xor_sync(0xffffffffu, d, 2);
      float inv = d > 0.f ? ptx_rcp(d) * v_scale : 0.f;
      float l = d > 0.f ? (m[mt][h] * scale + __log2f(d)) : neg_inf();
      const int r = r_first + mt * 16 + g + 8 * h, p = k.p0 + r;
      if (k.sinks != nullptr && k.prow < 0 && p < k.packed_len) {  // partial rows: at the merge
        const int ti = p / k.group_size;
        inv *= fold_sink(l, k.sinks, k.kv_head * k.group_size + p - ti * k.group_size);
      }
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[mt][dt][2 * h] *= inv;
        o[mt][dt][2 * h + 1] *= inv;
      }
      if (p < k.packed_len && c == 0) {
        if (k.prow >= 0) {
          k.part_lse[k.prow + r] = l;
        } else if (k.lse != nullptr) {
          const int ti = p / k.group_size;
          k.lse[(long long)(k.qo_start + ti) * k.num_qo_heads + k.kv_head * k.group_size + p - ti * k.group_size] = l;
        }
      }
      if (k.prow >= 0 && p < k.packed_len) {
        float* dst = k.part_o + (long long)(k.prow + r) * k.vo_dim + k.vo_off + 2 * c;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
          if (k.vo_off + dt * 8 < k.vo_dim)  // zero-filled columns past head_dim_vo are not stored
            *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(o[mt][dt][2 * h], o[mt][dt][2 * h + 1]);
      }
    }
}

// Epilogue, second half (direct items): the warp's MT x 16 rows staged as 16-bit values in its own
// rows of a shared tile (offset(row, chunk): byte offset of 16-byte chunk `chunk` of a row, in the
// kernel's swizzle), then written out in 16-byte stores. D: the columns a CTA computes (from
// k.vo_off; those past k.vo_dim are not stored).
template <int D, int MT, int DT, typename T, typename Offset>
__device__ __forceinline__ void store_rows(const float (&o)[MT][DT][4], unsigned char* tile, Offset offset,
                                           int r_first, int lane, T* out, long long o_stride_n, long long o_stride_h,
                                           const RowDest& k) {
  constexpr int kChunks = D / 8;
  const int g = lane / 4, c = lane % 4;
  // The rows are the warp's Q rows: every lane's last ldmatrix of them is done before any lane writes
  // (the mma.sync after it is no memory fence between lanes; racecheck flagged the hazard).
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_first + mt * 16 + g + 8 * h;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<unsigned*>(tile + offset(r, dt) + 4 * c) = pack2(T(), o[mt][dt][2 * h], o[mt][dt][2 * h + 1]);
    }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < MT * 16 * kChunks / 32; ++i) {
    const int idx = i * 32 + lane, r = r_first + idx / kChunks, ch = idx % kChunks;
    const int p = k.p0 + r;
    if (p < k.packed_len && k.vo_off + ch * 8 < k.vo_dim) {
      const int ti = p / k.group_size, h = k.kv_head * k.group_size + p - ti * k.group_size;
      *reinterpret_cast<uint4*>(out + (long long)(k.qo_start + ti) * o_stride_n + h * o_stride_h + k.vo_off + ch * 8) =
          *reinterpret_cast<const uint4*>(tile + offset(r, ch));
    }
  }
}

// Custom variants (variant.cuh), on the m16n8 score layout: each score of a (query row, key below the
// item's hi) becomes LogitsTransform's logit, or -inf where LogitsMask hides the key; EDGE (a tile that
// straddles the item's hi): keys at or past it become -inf, elsewhere every key is below it. The hooks run
// on every score under no branch, so the compiler computes what they share per row (a load, a slope) once
// a row: keys past hi are passed as hi - 1 and rows past the request as its packed row 0, whose results
// are never stored there, so hooks never see a position outside the request.
// p_first: the packed row of the warp's first slice.
template <typename VAR, bool EDGE, int MT, int NT>
__device__ __forceinline__ void variant_scores(float (&s)[MT][NT][4], typename VAR::Variant& var,
                                               const typename VAR::Params& params, const PrefillItem& b,
                                               int group_size, int p_first, int j0, int g, int c) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int p = p_first + mt * 16 + g + 8 * h;
      const int pc = p < b.packed_len ? p : 0, ti = pc / group_size;
      const uint32_t qo_head = b.kv_head * group_size + pc - ti * group_size;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = j0 + nt * 8 + 2 * c + e;
          const bool past = EDGE && j >= b.hi;
          const int jc = past ? b.hi - 1 : j;
          float& x = s[mt][nt][2 * h + e];
          float t = var.LogitsTransform(params, x, b.req, ti, jc, qo_head, b.kv_head);
          if (VAR::Variant::kLogitsMask && !var.LogitsMask(params, b.req, ti, jc, qo_head, b.kv_head)) t = neg_inf();
          x = past ? neg_inf() : t;
        }
    }
}

// A variant without softmax: P of one 16-key step kk is the logits themselves (0 where masked).
template <typename T, int MT, int NT>
__device__ __forceinline__ void make_p_direct(unsigned (&pa)[MT][4], const float (&s)[MT][NT][4], int kk) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float x0 = s[mt][2 * kk + e2][2 * h], x1 = s[mt][2 * kk + e2][2 * h + 1];
        pa[mt][e2 * 2 + h] = pack2(T(), x0 == neg_inf() ? 0.f : x0, x1 == neg_inf() ? 0.f : x1);
      }
}

// finish_rows for a variant (direct rows only: variants' plans never cut a KV range): each output element
// through OutputTransform with the row's m (times the logit scale, -inf for a row that saw no key) and
// sum d; without softmax m = 0 and d = 1. The lse (softmax variants) as finish_rows writes it.
template <typename VAR, int MT, int DT>
__device__ __forceinline__ void variant_finish_rows(float (&o)[MT][DT][4], const float (&m)[MT][2],
                                                    const float (&dsum)[MT][2], typename VAR::Variant& var,
                                                    const typename VAR::Params& params, int req, float v_scale,
                                                    int r_first, int g, int c, const RowDest& k) {
  constexpr bool kSoftmax = VAR::Variant::use_softmax;
  const float sc = kSoftmax ? var.sm_scale_log2 : 1.f;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float d = 1.f, mm = 0.f;
      if (kSoftmax) {
        d = dsum[mt][h];
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        d += __shfl_xor_sync(0xffffffffu, d, 2);
        mm = m[mt][h] == neg_inf() ? neg_inf() : m[mt][h] * sc;
      }
      const int r = r_first + mt * 16 + g + 8 * h, p = k.p0 + r;
      const int pc = p < k.packed_len ? p : 0, ti = pc / k.group_size;
      const int qo_head = k.kv_head * k.group_size + pc - ti * k.group_size;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          o[mt][dt][2 * h + e] = var.OutputTransform(params, o[mt][dt][2 * h + e], req, ti, qo_head, mm, d, v_scale);
      if (kSoftmax && p < k.packed_len && c == 0 && k.lse != nullptr)
        k.lse[(long long)(k.qo_start + ti) * k.num_qo_heads + qo_head] = d > 0.f ? mm + __log2f(d) : neg_inf();
    }
}

}  // namespace fic
