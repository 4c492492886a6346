// Decode's split-KV schedule built on the device (fi_cupy/decode_schedule.py): the segments, partial
// rows, CTA ranges and merges of fi_cupy/scheduler.py's decode_schedule for a quota the host picked,
// element for element, so plan() does no per-pair work on the host (issue 21: plan() at batch 512).
//
// The token space is the pairs (request r, head block h) in order, pair (r, h) holding len[r] tokens
// (a request's visible keys); CTA b takes tokens [b * quota, (b + 1) * quota). A CTA's segments are the
// non-empty pairs its range meets, in token order; a segment is cut (partial row) where its pair
// reaches past the range. Empty pairs (nothing visible) get one empty segment each: the k-th empty
// pair goes to CTA k % num_ctas, after that CTA's non-empty segments. Partial rows are numbered in
// token order (CTA by CTA: at most a CTA's first and last segment are cut), so a cut pair's rows are
// contiguous; a cut pair is merged by the entry of its first interior quota boundary.
//
// One CTA of kThreads threads: a scan over the requests (token and empty-request prefixes, written to
// scratch), then each thread takes a run of CTAs: counts, a scan, and the writes. The CTA phase is chains
// of dependent loads (binary searches over the prefixes, a segment's length then the next): with up to
// kStagedRequests requests the prefixes and lengths sit in shared memory (kStagedBytes of dynamic shared
// memory), else in the global scratch.
namespace fic {

constexpr int kScheduleThreads = 1024;
constexpr int kStagedRequests = 2047;  // (batch + 1) x (cum, empty_before, kv_lens): 32 KB, under 48 KB with the scans
constexpr int kStagedBytes = (kStagedRequests + 1) * 16;

// Exclusive prefix over the block of each thread's N values (in place); returns the block totals.
template <int N>
__device__ __forceinline__ void block_exclusive_scan(long long (&v)[N], long long (&total)[N]) {
  __shared__ long long warp_sum[kScheduleThreads / 32][N];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  long long inc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    inc[i] = v[i];
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const long long y = __shfl_up_sync(0xffffffffu, inc[i], o);
      if (lane >= o) inc[i] += y;
    }
    if (lane == 31) warp_sum[warp][i] = inc[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      long long w = warp_sum[lane][i];
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const long long y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      warp_sum[lane][i] = w;  // inclusive over warps
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = inc[i] - v[i] + (warp ? warp_sum[warp - 1][i] : 0);
    total[i] = warp_sum[kScheduleThreads / 32 - 1][i];
  }
  __syncthreads();  // warp_sum is reused by the next scan
}

struct PairSpace {
  const long long* cum;     // cum[r]: tokens of the requests before r, a head block's (batch + 1)
  const int* empty_before;  // empty requests before r (batch + 1)
  int batch, hb;

  __device__ __forceinline__ long long len(int r) const { return cum[r + 1] - cum[r]; }
  // The pair holding token t (0 <= t < total): its request, head block and first token.
  __device__ __forceinline__ void find(long long t, int& r, int& h, long long& start) const {
    int lo = 0, hi = batch;  // the last r with hb * cum[r] <= t (a non-empty request, as t < total)
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (hb * cum[mid] <= t) lo = mid; else hi = mid;
    }
    r = lo;
    const long long n = len(r);
    h = (int)((t - hb * cum[r]) / n);
    start = hb * cum[r] + h * n;
  }
  // Index of non-empty pair (r, h) among the non-empty pairs.
  __device__ __forceinline__ long long nonempty_index(int r, int h) const {
    return (long long)(r - empty_before[r]) * hb + h;
  }
  // The request of the j-th empty request (the first r with empty_before[r + 1] > j).
  __device__ __forceinline__ int empty_request(int j) const {
    int lo = 0, hi = batch - 1;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (empty_before[mid + 1] > j) hi = mid; else lo = mid + 1;
    }
    return lo;
  }
};

// CTA b's share: its non-empty segments (from pair (r0, h0), starting at start0), which of its first and
// last are cut, whether it merges (its first pair's first interior boundary is b * quota), its empties.
struct CtaShare {
  int r0, h0, segs, empties;
  long long start0;
  bool cut_first, cut_last, merges;

  __device__ __forceinline__ CtaShare(const PairSpace& ps, int b, long long quota, long long total,
                                      long long empty_pairs, int num_ctas) {
    const long long s = b * quota;
    segs = 0;
    r0 = h0 = 0;
    start0 = 0;
    cut_first = cut_last = merges = false;
    if (s < total) {
      const long long e = min(s + quota, total);
      int r1, h1;
      long long start1;
      ps.find(s, r0, h0, start0);
      ps.find(e - 1, r1, h1, start1);
      segs = (int)(ps.nonempty_index(r1, h1) - ps.nonempty_index(r0, h0)) + 1;
      const bool ends_past = start1 + ps.len(r1) > e;
      cut_first = start0 < s || (segs == 1 && ends_past);
      cut_last = segs > 1 && ends_past;
      merges = start0 < s && start0 >= s - quota;
    }
    empties = b < empty_pairs ? (int)((empty_pairs - b + num_ctas - 1) / num_ctas) : 0;
  }
};

// kv_lens: the requests' KV lengths; window_left >= 0: a request sees its last window_left + 1 keys.
// Scratch: cum (batch + 1 long longs), empty_before (batch + 1 ints), used when batch > kStagedRequests
// (else the launch gives kStagedBytes of dynamic shared memory). Outputs as DecodeSchedule's, at their
// capacities: segments (int4: request, head block, key start, key end), segment_partial, cta_indptr
// (num_ctas + 1), merge_pairs, merge_indptr (merge_cap + 1, padded with its last entry).
__global__ void __launch_bounds__(kScheduleThreads)
decode_schedule_kernel(const int* __restrict__ kv_lens, int batch, int head_blocks, int num_ctas, long long quota,
                       int window_left, long long* __restrict__ cum, int* __restrict__ empty_before,
                       int4* __restrict__ segments, int* __restrict__ segment_partial, int* __restrict__ cta_indptr,
                       int* __restrict__ merge_pairs, int* __restrict__ merge_indptr, int merge_cap) {
  extern __shared__ long long staged[];
  const int tid = threadIdx.x;
  const int* lens = kv_lens;  // read by the CTA phase
  if (batch <= kStagedRequests) {  // cum, then empty_before and kv_lens (ints), in shared memory
    cum = staged;
    empty_before = reinterpret_cast<int*>(staged + batch + 1);
    int* lens_staged = empty_before + batch + 1;
    for (int r = tid; r < batch; r += kScheduleThreads) lens_staged[r] = kv_lens[r];
    lens = lens_staged;
  }
  // Requests: a run of `per` a thread; visible lengths and empty flags summed, scanned, written.
  const int per = (batch + kScheduleThreads - 1) / kScheduleThreads;
  const int r_begin = min(tid * per, batch), r_end = min(r_begin + per, batch);
  auto visible = [&](int r) -> long long {
    const long long kv = kv_lens[r];
    return window_left >= 0 ? min(kv, (long long)window_left + 1) : kv;
  };
  long long acc[2] = {0, 0}, tot[2];
  for (int r = r_begin; r < r_end; ++r) {
    const long long n = visible(r);
    acc[0] += n;
    acc[1] += n == 0;
  }
  block_exclusive_scan<2>(acc, tot);
  for (int r = r_begin; r < r_end; ++r) {
    const long long n = visible(r);
    cum[r] = acc[0];
    empty_before[r] = (int)acc[1];
    acc[0] += n;
    acc[1] += n == 0;
  }
  if (tid == 0) {
    cum[batch] = tot[0];
    empty_before[batch] = (int)tot[1];
  }
  __syncthreads();  // the prefixes are visible to the block (global memory, one CTA)

  const PairSpace ps{cum, empty_before, batch, head_blocks};
  const long long total = tot[0] * head_blocks, empty_pairs = tot[1] * head_blocks;
  // CTAs: a run of `cper` a thread; segments, cut segments and merges counted, scanned, then written.
  const int cper = (num_ctas + kScheduleThreads - 1) / kScheduleThreads;
  const int b_begin = min(tid * cper, num_ctas), b_end = min(b_begin + cper, num_ctas);
  long long base[3] = {0, 0, 0}, sums[3];
  for (int b = b_begin; b < b_end; ++b) {
    const CtaShare cs(ps, b, quota, total, empty_pairs, num_ctas);
    base[0] += cs.segs + cs.empties;
    base[1] += cs.cut_first + cs.cut_last;
    base[2] += cs.merges;
  }
  block_exclusive_scan<3>(base, sums);
  for (int b = b_begin; b < b_end; ++b) {
    const CtaShare cs(ps, b, quota, total, empty_pairs, num_ctas);
    const int seg0 = (int)base[0], row0 = (int)base[1];
    cta_indptr[b] = seg0;
    const long long s = b * quota, e = min(s + quota, total);
    int r = cs.r0, h = cs.h0;
    long long start = cs.start0;
    for (int i = 0; i < cs.segs; ++i) {
      const long long n = ps.len(r), vis = lens[r] - n;  // the request's first visible key
      const long long lo = max(start, s), hi = min(start + n, e);
      segments[seg0 + i] = make_int4(r, h, (int)(lo - start + vis), (int)(hi - start + vis));
      segment_partial[seg0 + i] = (i == 0 && cs.cut_first) ? row0
                                  : (i == cs.segs - 1 && cs.cut_last) ? row0 + cs.cut_first : -1;
      if (i + 1 < cs.segs) {  // the next non-empty pair
        if (++h == head_blocks) {
          h = 0;
          do ++r; while (ps.len(r) == 0);
        }
        start = head_blocks * cum[r] + h * ps.len(r);
      }
    }
    if (cs.merges) {  // its pair's rows start at the previous CTA's last (cut) segment's
      merge_pairs[base[2]] = cs.r0 * head_blocks + cs.h0;
      merge_indptr[base[2]] = row0 - 1;
    }
    for (int j = 0; j < cs.empties; ++j) {  // empty pairs k = b + j * num_ctas
      const long long k = b + (long long)j * num_ctas;
      const int er = ps.empty_request((int)(k / head_blocks));
      const int ek = lens[er];  // nothing visible: every key is before the window (or none at all)
      segments[seg0 + cs.segs + j] = make_int4(er, (int)(k % head_blocks), ek, ek);
      segment_partial[seg0 + cs.segs + j] = -1;
    }
    base[0] += cs.segs + cs.empties;
    base[1] += cs.cut_first + cs.cut_last;
    base[2] += cs.merges;
  }
  if (tid == 0) cta_indptr[num_ctas] = (int)sums[0];
  for (int m = (int)sums[2] + tid; m <= merge_cap; m += kScheduleThreads) merge_indptr[m] = (int)sums[1];
}

}  // namespace fic
