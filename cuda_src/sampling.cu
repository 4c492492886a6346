// Sampling and logits processing without sorting the vocabulary. One CTA of 1024 threads per row.
//
// Filters keep the tokens whose value is at least a threshold:
//   top-k: keep token i if fewer than k tokens have a larger value (ties at the boundary are kept);
//   top-p: keep token i if the tokens with a larger probability hold < top_p * the row's mass
//          (with top_k_first, of the top-k set's mass);
//   min-p: keep token i if p_i >= min_p * max_j p_j.
// Probabilities <= 0 (and NaN) are never kept or drawn.
//
// Thresholds (select_kept): one pass builds a 4096-bin histogram of the values' order keys (counts for
// top-k, truncated masses for top-p: 32-bit shared atomics only), whose crossing bin bounds the threshold
// from below. A second pass gathers the tokens at or above that bin into shared memory (at most
// kCandidates); a bitonic sort there gives exact thresholds, and the kept set is a prefix of the sorted
// list. More candidates than fit: an exact radix select over the row (three more passes).
//
// Draws: inverse CDF with one uniform per row. Over sorted candidates, a binary search of their prefix
// sums. Over the row (stream_sample), each thread sums the weights of the vectors it owns, a block scan
// lays the threads' sums end to end, and the warp of the thread whose interval holds u * total walks its
// vectors again to the token. Passes after the first run backwards so that they start on the part of the
// row the previous pass left in L2.
//
// Inputs: float32, float16 or bfloat16 rows (the kernels' T), converted to float32 as they load, so every
// pass computes in float32 and float32 rows take the code they always did. Per-row parameters (top_k,
// top_p, min_p, temperature) come as a Param: a scalar, or an array of the caller's dtype read once a row.
// Row indices and draft ids are int32 or int64; sampled ids are written as int32 or int64.
#include "common/math.cuh"
#include "common/vec.cuh"
#include "common/philox.cuh"
#include "common/pdl.cuh"
#include "common/cluster.cuh"
#include "common/bulk_copy.cuh"

namespace fic {

constexpr int kSampleThreads = 1024;  // launch bounds say one CTA an SM: up to 64 registers, no spills
constexpr int kBins = 4096;           // histogram bins (12 bits of the order key)
constexpr int kCandidates = 8192;     // tokens gathered into shared memory for the exact thresholds
constexpr int kBinTokens = 4096;      // candidates of one bin sorted at a time
constexpr int kSelectSmemBytes = 162 * 1024;  // dynamic shared memory of the select kernels (sampling.py);
                                              // sm_80 allows 163 KB a block

// ---------------------------------------------------------------------------------------------
// Values, keys, random numbers

// Unsigned keys that order like the floats (NaN above +inf).
__device__ __forceinline__ unsigned int order_key(float x) {
  const unsigned int u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned int k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Which values take part: positive probabilities; logits that are not NaN.
template <bool LOGITS>
__device__ __forceinline__ bool takes_part(float x) {
  return LOGITS ? !isnan(x) : x > 0.f;
}

// Histogram bin: 12 bits of the key. Probabilities are positive, so their top key bit is fixed and the
// bins take 8 exponent and 4 mantissa bits; logits take the sign, 8 exponent and 3 mantissa bits.
template <bool LOGITS>
__device__ __forceinline__ int bin_of(unsigned int key) {
  return LOGITS ? (int)(key >> 20) : (int)((key >> 19) & 0xfffu);
}
template <bool LOGITS>
__device__ __forceinline__ unsigned int bin_floor_key(int bin) {
  return LOGITS ? (unsigned int)bin << 20 : 0x80000000u | ((unsigned int)bin << 19);
}

// Philox block (seed, offset, row, counter): four independent 32-bit draws.
__device__ __forceinline__ uint4 row_random(unsigned long long seed, unsigned long long offset, int r, int ctr) {
  return philox4x32(make_uint4((unsigned int)ctr, (unsigned int)r, (unsigned int)offset,
                               (unsigned int)(offset >> 32)),
                    make_uint2((unsigned int)seed, (unsigned int)(seed >> 32)));
}

// 2^e as a double (e within the normal range), built from its exponent bits.
__device__ __forceinline__ double pow2(int e) { return __longlong_as_double((long long)(e + 1023) << 52); }

// A scalar or per-row parameter. code: the array's dtype (sampling.py PARAM_CODES); val: the scalar.
struct Param {
  const void* arr;  // nullptr: every row takes val
  double val;
  int code;
};
enum ParamCode { kI32 = 0, kI64 = 1, kF16 = 2, kBF16 = 3, kF32 = 4, kF64 = 5, kI8 = 6, kU8 = 7, kI16 = 8, kU16 = 9,
                 kU32 = 10, kU64 = 11 };

__device__ __forceinline__ double param_at(const Param& a, int r) {
  if (a.arr == nullptr) return a.val;
  switch (a.code) {
    case kI32: return (double)static_cast<const int*>(a.arr)[r];
    case kI64: return (double)static_cast<const long long*>(a.arr)[r];
    case kF16: return (double)__half2float(static_cast<const half_t*>(a.arr)[r]);
    case kBF16: return (double)__bfloat162float(static_cast<const bf16_t*>(a.arr)[r]);
    case kF64: return static_cast<const double*>(a.arr)[r];
    case kI8: return (double)static_cast<const signed char*>(a.arr)[r];
    case kU8: return (double)static_cast<const unsigned char*>(a.arr)[r];
    case kI16: return (double)static_cast<const short*>(a.arr)[r];
    case kU16: return (double)static_cast<const unsigned short*>(a.arr)[r];
    case kU32: return (double)static_cast<const unsigned int*>(a.arr)[r];
    case kU64: return (double)static_cast<const unsigned long long*>(a.arr)[r];
    default: return (double)static_cast<const float*>(a.arr)[r];
  }
}
// Counts (top_k) from float arrays truncate toward zero, as torch's .int(); NaN is 0, the rest clamped to int.
__device__ __forceinline__ int param_int(const Param& a, int r) {
  const double v = param_at(a, r);
  return v != v ? 0 : (int)fmin(fmax(trunc(v), -2147483648.0), 2147483647.0);
}
__device__ __forceinline__ float param_float(const Param& a, int r) { return (float)param_at(a, r); }

// Philox seed and offset: scalars, or per-row arrays (stride 1) or one value for all rows (stride 0).
struct Rng {
  const unsigned long long* seed_arr;
  const unsigned long long* offset_arr;
  unsigned long long seed, offset;
  int seed_stride, offset_stride;
};
struct RowRng {
  unsigned long long seed, offset;
};
__device__ __forceinline__ RowRng row_rng(const Rng& g, int r) {
  RowRng o;
  o.seed = g.seed_arr != nullptr ? g.seed_arr[(long long)r * g.seed_stride] : g.seed;
  o.offset = g.offset_arr != nullptr ? g.offset_arr[(long long)r * g.offset_stride] : g.offset;
  return o;
}

// Entry r of an int32 (is64 == 0) or int64 array of ids.
__device__ __forceinline__ long long id_at(const void* ids, int is64, long long r) {
  return is64 ? static_cast<const long long*>(ids)[r] : (long long)static_cast<const int*>(ids)[r];
}
__device__ __forceinline__ void store_id(void* out, int is64, long long r, int token) {
  if (is64) static_cast<long long*>(out)[r] = token; else static_cast<int*>(out)[r] = token;
}

template <int VEC>
__device__ __forceinline__ float vsum(const Vec<float, VEC>& x) {
  float s = x[0];
#pragma unroll
  for (int e = 1; e < VEC; ++e) s += x[e];
  return s;
}

template <int VEC>
__device__ __forceinline__ Vec<float, VEC> vzero() {
  Vec<float, VEC> z;
#pragma unroll
  for (int e = 0; e < VEC; ++e) z.set(e, 0.f);
  return z;
}

// ---------------------------------------------------------------------------------------------
// Block reductions and scans (every thread of the block gets the result). `scratch` holds 32 values.

struct Max { template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; } };
struct Sum { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
template <>
__device__ __forceinline__ float2 shfl_xor(float2 v, int o) { return make_float2(shfl_xor(v.x, o), shfl_xor(v.y, o)); }

template <typename T, typename Op>
__device__ T block_reduce(T x, Op op, T* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, shfl_xor(x, o));
  const int nw = blockDim.x >> 5;  // a power of two
  __syncthreads();  // scratch may still be read by a previous call
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  x = scratch[threadIdx.x & (nw - 1)];  // each group of nw lanes reduces all the warps' values
  for (int o = nw >> 1; o > 0; o >>= 1) x = op(x, shfl_xor(x, o));
  return x;
}

// Exclusive prefix sum in thread order; *total gets the block's sum.
template <typename T>
__device__ T block_exclusive_scan(T x, T* scratch, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T inc = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  const T w = lane < (int)(blockDim.x >> 5) ? scratch[lane] : T(0);
  T winc = w;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, winc, o);
    if (lane >= o) winc += y;
  }
  *total = __shfl_sync(0xffffffffu, winc, 31);
  return __shfl_sync(0xffffffffu, winc - w, warp) + inc - x;
}

// ---------------------------------------------------------------------------------------------
// Row passes. Thread t owns vectors j * blockDim.x + t; a pass visits them in batches of loads (all
// in flight before the first use), forwards or backwards (REV). f(v, x, valid) sees every slot of every
// batch with the same trip count in all threads, so it may use warp collectives.

// VEC elements of T at p as floats (16-bit types convert exactly; float32 is a plain load).
template <typename T, int VEC>
struct FloatLoad {
  static __device__ __forceinline__ Vec<float, VEC> at(const T* p) {
    Vec<T, VEC> raw;
    raw.load(p);
    Vec<float, VEC> x;
#pragma unroll
    for (int e = 0; e < VEC; ++e) x.set(e, raw[e]);
    return x;
  }
};
template <int VEC>
struct FloatLoad<float, VEC> {
  static __device__ __forceinline__ Vec<float, VEC> at(const float* p) {
    Vec<float, VEC> x;
    x.load(p);
    return x;
  }
};

template <typename T, int VEC>
struct RowIn {
  const T* p;
  int nv;  // vectors of VEC elements
  __device__ __forceinline__ Vec<float, VEC> at(int v) const { return FloatLoad<T, VEC>::at(p + (long long)v * VEC); }
};

template <int VEC, bool REV, typename Load, typename F>
__device__ __forceinline__ void row_pass(int nv, Load load, F f) {
  constexpr int U = 4;  // vector loads in flight a thread (more spills the scalar variants on NVRTC 13.0)
  const int T = blockDim.x, nt = (nv + T - 1) / T;
  const auto vec_of = [&](int jj) { return (REV ? nt - 1 - jj : jj) * T + (int)threadIdx.x; };
  for (int j0 = 0; j0 < nt; j0 += U) {
    Vec<float, VEC> x[U];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int v = vec_of(j0 + q);
      x[q] = (j0 + q < nt && v < nv) ? load(v) : vzero<VEC>();
    }
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const int v = vec_of(j0 + q);
      f(v, x[q], j0 + q < nt && v < nv);
    }
  }
}

struct SampleScratch {
  unsigned long long u64[32];
  double f64[32];
  float f32[32];
  unsigned int u32[32];
  int i32[32];
  unsigned long long above;  // crossing_bin's weight above the bin found
  int result[4];
};

// stream_sample's weights: the values of `row` that are positive and >= v, 0 for the others.
template <typename T, int VEC>
struct KeptWeights {
  RowIn<T, VEC> row;
  float v;
  __device__ __forceinline__ Vec<float, VEC> operator()(int q) const {
    Vec<float, VEC> x = row.at(q);
#pragma unroll
    for (int e = 0; e < VEC; ++e) if (!(x[e] > 0.f && x[e] >= v)) x.set(e, 0.f);
    return x;
  }
};

// Inverse-CDF draw over the row's weights w(v) (non-negative, a Vec per vector), u in [0, 1).
// Returns the token, or -1 when every weight is 0. Every thread of the block must call it.
template <int VEC, typename W>
__device__ int stream_sample(W w, int nv, float u, SampleScratch& sc) {
  const int T = blockDim.x, nt = (nv + T - 1) / T;
  float s = 0.f;
  row_pass<VEC, true>(nv, w, [&](int, const Vec<float, VEC>& x, bool) { s += vsum<VEC>(x); });
  float total;
  const float start = block_exclusive_scan(s, sc.f32, &total);
  const float target = u * total;
  const int winner = block_reduce((s > 0.f && start <= target) ? (int)threadIdx.x : -1, Max(), sc.i32);
  if (winner < 0) return -1;
  if ((int)(threadIdx.x >> 5) == (winner >> 5)) {
    const int lane = threadIdx.x & 31;
    float c = __shfl_sync(0xffffffffu, start, winner & 31);
    int pick = -1, last = -1;
    float c_last = c;
    for (int j0 = 0; j0 < nt; j0 += 32) {  // one of the winner's vectors a lane, walked in pass order
      const int j = nt - 1 - (j0 + lane), v = j * T + winner;
      const float ts = (j0 + lane < nt && v < nv) ? vsum<VEC>(w(v)) : 0.f;
      for (int l = 0; l < 32 && j0 + l < nt; ++l) {
        const float tl = __shfl_sync(0xffffffffu, ts, l);
        if (pick < 0 && tl > 0.f) {
          last = j0 + l, c_last = c;
          if (c + tl > target) pick = last; else c += tl;
        }
      }
    }
    if (pick < 0) pick = last, c = c_last;  // rounding put the target past the winner's last token
    if (lane == 0) {
      const int v = (nt - 1 - pick) * T + winner;
      const Vec<float, VEC> x = w(v);
      int e_pick = -1, e_last = 0;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (e_pick < 0 && x[e] > 0.f) {
          e_last = e;
          if (c + x[e] > target) e_pick = e; else c += x[e];
        }
      }
      sc.result[0] = v * VEC + (e_pick < 0 ? e_last : e_pick);
    }
  }
  __syncthreads();
  return sc.result[0];
}

// ---------------------------------------------------------------------------------------------
// Thresholds

struct Filter {
  int k;        // top-k in use when 0 < k < vocab
  float p;      // top-p in use when p < 1
  float min_p;  // min-p in use when > 0
  bool k_first; // top-p over the top-k set's mass
  __device__ bool use_k(int vocab) const { return k > 0 && k < vocab; }
  __device__ bool use_p() const { return p < 1.f; }
  __device__ bool use_min() const { return min_p > 0.f; }
};

// Row r's filter: a per-row array, when given, overrides the scalar.
__device__ __forceinline__ Filter row_filter(int r, const Param& k, const Param& p, const Param& m, bool k_first) {
  Filter f;
  f.k = param_int(k, r);
  f.p = param_float(p, r);
  f.min_p = param_float(m, r);
  f.k_first = k_first;
  return f;
}

struct SelectSmem {
  // Pass 1: tokens and truncated masses a bin. Then, over the candidates only: tokens a bin (hcount)
  // and exact masses as sums of the significands' low 16 (hmass) and high 8 bits (hmass_hi).
  unsigned int hcount[kBins];
  unsigned int hmass[kBins];
  unsigned int hmass_hi[kBins];
  union {
    struct {
      unsigned long long cand[kCandidates];  // (order key << 32) | ~token, in gather order
      unsigned long long bin[kBinTokens];    // one bin's candidates, sorted descending
      float bin_cum[kBinTokens];             // their inclusive prefix sums (probabilities)
    } c;
    unsigned long long hist[kBins];          // the exact radix select's histogram
  } u;
  SampleScratch sc;
  int n_cand, n_bin, sorted_bin;
};
static_assert(sizeof(SelectSmem) <= kSelectSmemBytes, "sampling.py allocates kSelectSmemBytes");

__device__ __forceinline__ unsigned long long cand_key(unsigned int key, int token) {
  return ((unsigned long long)key << 32) | (0xffffffffu - (unsigned int)token);
}
__device__ __forceinline__ float entry_value(unsigned long long e) { return key_value((unsigned int)(e >> 32)); }
__device__ __forceinline__ int entry_token(unsigned long long e) { return (int)(0xffffffffu - (unsigned int)e); }

// Scanning the bins from the top, the bin at which the weight of the bins >= it first reaches target
// (STRICT: first exceeds it); -1 when it never does. get(b) gives bin b's weight; *above_out gets the
// weight of the bins above the one found. Every thread must call it.
template <typename T, bool STRICT = false, typename Get>
__device__ int crossing_bin(int nbins, Get get, T target, T* scratch, int* found, T* above_out) {
  const int per = (nbins + kSampleThreads - 1) / kSampleThreads;
  const int b0 = nbins - 1 - (int)threadIdx.x * per;
  T w = 0;
  for (int j = 0; j < per; ++j) if (b0 - j >= 0) w += get(b0 - j);
  T total;
  T s = block_exclusive_scan(w, scratch, &total);  // weight of the bins above b0
  if (threadIdx.x == 0) *found = -1;
  __syncthreads();
  for (int j = 0; j < per; ++j) {
    if (b0 - j < 0) break;
    const T h = get(b0 - j);
    if (STRICT ? (s <= target && s + h > target) : (s < target && s + h >= target)) {
      *found = b0 - j;
      if (above_out != nullptr) *above_out = s;
    }
    s += h;
  }
  __syncthreads();
  return *found;
}

// Bitonic sort of keys[0, n) descending, n a power of two.
__device__ void sort_desc(unsigned long long* keys, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int p = threadIdx.x; p < n / 2; p += blockDim.x) {
        const int i = ((p & ~(j - 1)) << 1) | (p & (j - 1)), o = i | j;
        const unsigned long long a = keys[i], b = keys[o];
        const bool desc = (i & k) == 0;
        if (desc ? a < b : a > b) keys[i] = b, keys[o] = a;
      }
      __syncthreads();
    }
  }
}

// Exact mass of bin b's candidates: significand sums times the bin's unit 2^(exponent - 150)
// (denormals: 2^-149). Exact in a double (at most 2^13 terms of 24 bits).
__device__ __forceinline__ double bin_mass(const SelectSmem& sm, int b) {
  return ((double)sm.hmass_hi[b] * 65536.0 + (double)sm.hmass[b]) * pow2(max(b >> 4, 1) - 150);
}

// The exact mass of the candidates in the bins above bv. Every thread must call it.
__device__ double mass_above(SelectSmem& sm, int bv) {
  double s = 0.0;
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) if (b > bv) s += bin_mass(sm, b);
  return block_reduce(s, Sum(), sm.sc.f64);
}

// Counts and exact masses a bin over the n candidates (masses only for probabilities).
template <bool LOGITS>
__device__ void candidate_stats(SelectSmem& sm, int n) {
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) sm.hcount[i] = 0, sm.hmass[i] = 0, sm.hmass_hi[i] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const unsigned int key = (unsigned int)(sm.u.c.cand[i] >> 32), b = bin_of<LOGITS>(key);
    atomicAdd(&sm.hcount[b], 1u);
    if (!LOGITS) {
      const unsigned int u = key & 0x7fffffffu, sig = (u & 0x7fffffu) | ((u >> 23) ? 0x800000u : 0u);
      atomicAdd(&sm.hmass[b], sig & 0xffffu);
      atomicAdd(&sm.hmass_hi[b], sig >> 16);
    }
  }
  sm.sorted_bin = -1;
  __syncthreads();
}

// Bin b's candidates into sm.u.c.bin, sorted descending, with prefix sums for probabilities; their
// count (select_kept has checked that every bin fits). Every thread must call it.
template <bool LOGITS>
__device__ int sort_bin(SelectSmem& sm, int n, int b) {
  if (sm.sorted_bin == b) return sm.n_bin;
  __syncthreads();
  if (threadIdx.x == 0) sm.n_bin = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int i0 = 0; i0 < n; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    const unsigned long long e = i < n ? sm.u.c.cand[i] : 0ull;
    const bool take = i < n && bin_of<LOGITS>((unsigned int)(e >> 32)) == b;
    const unsigned int m = __ballot_sync(0xffffffffu, take);
    if (m == 0) continue;
    int base = 0;
    if (lane == 0) base = atomicAdd(&sm.n_bin, __popc(m));
    base = __shfl_sync(0xffffffffu, base, 0) + __popc(m & ((1u << lane) - 1u));
    if (take && base < kBinTokens) sm.u.c.bin[base] = e;
  }
  __syncthreads();
  const int nb = sm.n_bin;
  int n2 = 32;
  while (n2 < nb) n2 <<= 1;
  for (int i = nb + threadIdx.x; i < n2; i += blockDim.x) sm.u.c.bin[i] = 0ull;  // pads sort last
  __syncthreads();
  sort_desc(sm.u.c.bin, n2);
  if (!LOGITS) {  // prefix sums: a segment a thread, then a block scan
    const int seg = (nb + kSampleThreads - 1) / kSampleThreads, a = min(nb, (int)threadIdx.x * seg),
              z = min(nb, a + seg);
    float s = 0.f;
    for (int i = a; i < z; ++i) s += entry_value(sm.u.c.bin[i]);
    float tot;
    float c = block_exclusive_scan(s, sm.sc.f32, &tot);
    for (int i = a; i < z; ++i) c += entry_value(sm.u.c.bin[i]), sm.u.c.bin_cum[i] = c;
  }
  if (threadIdx.x == 0) sm.sorted_bin = b;
  __syncthreads();
  return nb;
}

// Entries of the sorted bin with value >= v.
__device__ int bin_count_at_least(const SelectSmem& sm, int nb, float v) {
  int lo = 0, hi = nb;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (entry_value(sm.u.c.bin[mid]) >= v) lo = mid + 1; else hi = mid;
  }
  return lo;
}
// The first of bin_cum[0, nb) that is >= x (STRICT: > x); nb when none.
template <bool STRICT>
__device__ int bin_first_cum(const SelectSmem& sm, int nb, float x) {
  int lo = 0, hi = nb;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const float c = sm.u.c.bin_cum[mid];
    if (STRICT ? c > x : c >= x) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Fixed-point mass for the exact select: 2^40 units of probability.
__device__ __forceinline__ unsigned long long fixed_mass(float x) {
  return (unsigned long long)((double)x * 1099511627776.0);
}

// The exact threshold key: the largest key t with weight(keys > t) < target <= weight(keys >= t), by
// count or by fixed-point mass, over the tokens that take part. Three passes: 12, 12 and 8 key bits.
// With frac > 0 the mass target is frac * (the row's mass), found on the first pass.
template <typename T, int VEC, bool LOGITS>
__device__ unsigned int radix_select(RowIn<T, VEC> row, bool by_mass, unsigned long long target, double frac,
                                     SelectSmem& sm) {
  unsigned int prefix = 0;
  for (int level = 0; level < 3; ++level) {
    const int bits = level < 2 ? 12 : 8, shift = level == 0 ? 20 : level == 1 ? 8 : 0;
    const int nb = 1 << bits;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sm.u.hist[i] = 0;
    __syncthreads();
    row_pass<VEC, false>(row.nv, [&](int v) { return row.at(v); }, [&](int, const Vec<float, VEC>& x, bool ok) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const unsigned int key = order_key(x[e]);
        if (ok && takes_part<LOGITS>(x[e]) && (level == 0 || (key >> (shift + bits)) == prefix))
          atomicAdd(&sm.u.hist[(key >> shift) & (nb - 1)], by_mass ? fixed_mass(x[e]) : 1ull);
      }
    });
    __syncthreads();
    if (level == 0 && frac > 0.0) {
      unsigned long long part = 0, total;
      for (int i = threadIdx.x; i < kBins; i += blockDim.x) part += sm.u.hist[i];
      (void)block_exclusive_scan(part, sm.sc.u64, &total);
      target = (unsigned long long)(frac * (double)total);
      if (target == 0) target = 1;
    }
    int b = crossing_bin<unsigned long long>(nb, [&](int i) { return sm.u.hist[i]; }, target, sm.sc.u64,
                                             &sm.sc.result[1], &sm.sc.above);
    unsigned long long above = sm.sc.above;
    __syncthreads();
    // Fewer tokens (or less mass) than the target: keep all of them. The lowest key that takes part is
    // -inf's; the key prefix 0 the later levels would build is a NaN's, and x >= NaN keeps nothing.
    if (b < 0 && level == 0) return order_key(neg_inf());
    if (b < 0) b = 0, above = 0;  // not reached: a level below the first refines the bin found above
    target -= above;
    prefix = (prefix << bits) | (unsigned int)b;
  }
  return prefix;
}

// What select_kept found: keep the tokens whose value is >= v. With in_smem, every kept token is a
// candidate in shared memory: bins above bv entirely, and the first n_bv tokens of bin bv (sorted in
// sm.u.c.bin); `mass` is the kept mass, `above` the mass of the bins above bv (probabilities).
struct Kept {
  bool in_smem;
  float v;
  int bv, n_bv;
  double mass, above;
};

// Kept set of `row` under filter f; mx and total are the row's max and mass (probabilities), unused
// for logits. Pass 1's histograms are in sm (counts when hist_count, truncated masses when hist_mass).
template <typename T, int VEC, bool LOGITS>
__device__ Kept select_kept(RowIn<T, VEC> row, int vocab, Filter f, float mx, float total, SelectSmem& sm,
                            bool hist_count, bool hist_mass, int mass_shift) {
  const bool use_k = f.use_k(vocab), use_p = !LOGITS && f.use_p();
  // Crossing bins: exact for counts; for masses the truncated sums are lower bounds, so the bin found is
  // at or below the true one and the gathered set still holds every kept token.
  int c_lo = 0;
  if (use_k && hist_count)
    c_lo = max(0, crossing_bin<unsigned int>(kBins, [&](int b) { return sm.hcount[b]; }, (unsigned int)f.k,
                                             sm.sc.u32, &sm.sc.result[1], (unsigned int*)nullptr));
  if (use_p && hist_mass && !(use_k && f.k_first)) {
    // bin b holds exponent b >> 4; its sum counts units of 2^(exponent - 150 + mass_shift)
    const int cp = crossing_bin<double>(
        kBins, [&](int b) { return (b >> 4) == 0 ? 0.0 : (double)sm.hmass[b] * pow2((b >> 4) - 150 + mass_shift); },
        (double)f.p * (double)total, sm.sc.f64, &sm.sc.result[1], (double*)nullptr);
    c_lo = max(c_lo, max(cp, 0));
  }
  // Gather the candidates (a warp-aggregated slot counter).
  if (threadIdx.x == 0) sm.n_cand = 0;
  __syncthreads();
  const unsigned int lo_key = bin_floor_key<LOGITS>(c_lo);
  const int lane = threadIdx.x & 31;
  row_pass<VEC, true>(row.nv, [&](int v) { return row.at(v); }, [&](int v, const Vec<float, VEC>& x, bool ok) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const unsigned int key = order_key(x[e]);
      const bool take = ok && takes_part<LOGITS>(x[e]) && key >= lo_key;
      const unsigned int m = __ballot_sync(0xffffffffu, take);
      if (m == 0) continue;
      int base = 0;
      if (lane == 0) base = atomicAdd(&sm.n_cand, __popc(m));
      base = __shfl_sync(0xffffffffu, base, 0) + __popc(m & ((1u << lane) - 1u));
      if (take && base < kCandidates) sm.u.c.cand[base] = cand_key(key, v * VEC + e);
    }
  });
  __syncthreads();
  const int n = sm.n_cand;
  Kept kept;
  kept.in_smem = n <= kCandidates;
  if (kept.in_smem) {
    candidate_stats<LOGITS>(sm, n);
    unsigned int fullest = 0;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) fullest = max(fullest, sm.hcount[i]);
    kept.in_smem = block_reduce(fullest, Max(), sm.sc.u32) <= (unsigned int)kBinTokens;  // every bin sorts
  }
  if (kept.in_smem) {
    float v = neg_inf();
    int bv = -1, n_bv = 0;  // the bin v cuts (sorted in sm.u.c.bin) and its tokens >= v
    if (use_k) {  // the (k - tokens above)-th token of the bin where the count reaches k
      const int ck = crossing_bin<unsigned int>(kBins, [&](int b) { return sm.hcount[b]; }, (unsigned int)f.k,
                                                sm.sc.u32, &sm.sc.result[1], &sm.sc.u32[31]);
      const unsigned int above = sm.sc.u32[31];
      __syncthreads();
      if (ck >= 0) {
        const int nb = sort_bin<LOGITS>(sm, n, ck);
        v = entry_value(sm.u.c.bin[f.k - (int)above - 1]);
        bv = ck, n_bv = bin_count_at_least(sm, nb, v);
      }
    }
    if (use_p) {
      double base = (double)total;
      if (use_k && f.k_first)  // the top-k set's mass: the bins above bv, then bin bv's kept part
        base = mass_above(sm, bv) + (bv >= 0 ? (double)sm.u.c.bin_cum[n_bv - 1] : 0.0);
      const double target = (double)f.p * base;
      const int cp = crossing_bin<double>(kBins, [&](int b) { return bin_mass(sm, b); }, target, sm.sc.f64,
                                          &sm.sc.result[1], &sm.sc.f64[31]);
      const double above = sm.sc.f64[31];
      __syncthreads();
      if (cp >= 0 && cp >= bv) {  // a cut at or above top-k's
        const int nb = sort_bin<LOGITS>(sm, n, cp);
        const float tp = entry_value(sm.u.c.bin[min(nb - 1, bin_first_cum<false>(sm, nb, (float)(target - above)))]);
        if (tp >= v) v = tp, bv = cp, n_bv = bin_count_at_least(sm, nb, tp);
      }
    }
    if (!LOGITS && f.use_min() && f.min_p * mx > v) {
      v = f.min_p * mx;
      bv = bin_of<false>(order_key(v));
      n_bv = bin_count_at_least(sm, sort_bin<LOGITS>(sm, n, bv), v);
    }
    kept.v = v;
    kept.bv = bv;
    kept.n_bv = n_bv;
    kept.above = kept.mass = 0.0;
    if (!LOGITS) {  // the mass of the bins above bv, and the kept mass
      kept.above = mass_above(sm, bv);
      kept.mass = kept.above + (bv >= 0 && n_bv > 0 ? (double)sm.u.c.bin_cum[n_bv - 1] : 0.0);
    }
    return kept;
  }
  // Too many candidates: exact radix selects over the row.
  unsigned int v = 0;
  if (use_k) {
    v = radix_select<T, VEC, LOGITS>(row, false, (unsigned long long)f.k, 0.0, sm);
    if (use_p && f.k_first) {  // top-p over the top-k set's exact mass
      unsigned long long m = 0, mk;
      row_pass<VEC, true>(row.nv, [&](int q) { return row.at(q); }, [&](int, const Vec<float, VEC>& x, bool) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) if (takes_part<LOGITS>(x[e]) && order_key(x[e]) >= v) m += fixed_mass(x[e]);
      });
      (void)block_exclusive_scan(m, sm.sc.u64, &mk);
      unsigned long long t = (unsigned long long)((double)f.p * (double)mk);
      v = max(v, radix_select<T, VEC, LOGITS>(row, true, t == 0 ? 1ull : t, 0.0, sm));
    }
  }
  if (use_p && !(use_k && f.k_first)) v = max(v, radix_select<T, VEC, LOGITS>(row, true, 0ull, (double)f.p, sm));
  kept.v = key_value(v);
  if (!LOGITS && f.use_min()) kept.v = fmaxf(kept.v, f.min_p * mx);
  kept.bv = -1;
  kept.mass = kept.above = 0.0;
  return kept;
}

// Inverse-CDF draw from a kept set in shared memory: the bin by a scan of the bins' exact masses from
// the top, then the token within the bin's sorted tokens. Every thread must call it.
__device__ int sample_in_smem(SelectSmem& sm, const Kept& kept, float u) {
  const int n = sm.n_cand;
  double rem = (double)u * kept.mass;
  int b = kept.bv, limit;
  if (rem < kept.above) {
    b = crossing_bin<double, true>(kBins, [&](int i) { return i > kept.bv ? bin_mass(sm, i) : 0.0; }, rem,
                                   sm.sc.f64, &sm.sc.result[1], &sm.sc.f64[31]);
    rem -= sm.sc.f64[31];
    __syncthreads();
    if (b < 0) return -1;
    limit = sort_bin<false>(sm, n, b);
  } else {
    rem -= kept.above;
    if (b < 0) return -1;
    sort_bin<false>(sm, n, b);
    limit = kept.n_bv;
  }
  if (limit <= 0) return -1;
  if (threadIdx.x == 0) sm.sc.result[0] = entry_token(sm.u.c.bin[min(limit - 1, bin_first_cum<true>(sm, limit, (float)rem))]);
  __syncthreads();
  return sm.sc.result[0];
}

// Pass 1 over probabilities: max, mass, and the histograms the filter needs.
template <typename T, int VEC>
__device__ void probs_pass1(RowIn<T, VEC> row, bool hist_count, bool hist_mass, int mass_shift, SelectSmem& sm,
                            float* mx_out, float* total_out) {
  if (hist_count || hist_mass) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sm.hcount[i] = 0, sm.hmass[i] = 0;
    __syncthreads();
  }
  float mx = 0.f, s = 0.f;
  row_pass<VEC, false>(row.nv, [&](int v) { return row.at(v); }, [&](int, const Vec<float, VEC>& x, bool) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float y = x[e];
      if (y > 0.f) {
        mx = fmaxf(mx, y);
        s += y;
        const unsigned int u = __float_as_uint(y);
        if (hist_count) atomicAdd(&sm.hcount[u >> 19], 1u);
        if (hist_mass) atomicAdd(&sm.hmass[u >> 19], ((u & 0x7fffffu) | 0x800000u) >> mass_shift);
      }
    }
  });
  *mx_out = block_reduce(mx, Max(), sm.sc.f32);
  *total_out = block_reduce(s, Sum(), sm.sc.f32);
}

// Mass truncation: 24-bit significands shifted right so that a bin's sum (<= vocab terms) fits 32 bits.
__device__ __forceinline__ int mass_shift_for(int vocab) {
  int s = 10;
  while (((long long)vocab << (24 - s)) > 0xffffffffll) ++s;
  return s;
}

template <typename T, int VEC>
__device__ __forceinline__ RowIn<T, VEC> row_of(const T* base, long long row_stride, long long row, int vocab) {
  RowIn<T, VEC> r;
  r.p = base + (long long)row * row_stride;
  r.nv = vocab / VEC;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Kernels

// A token per row from probs under the filters. A per-row array, when given, overrides the scalar.
// out (int32, or int64 when out64) gets the token, 0 for a row with nothing to draw (no probability
// > 0); valid (when not null) says which rows had something to draw.
template <typename T, int VEC>
__global__ void __launch_bounds__(kSampleThreads, 1) sample_from_probs_kernel(
    const T* probs, long long row_stride, const void* row_indices, int idx64, int vocab, Param top_k, Param top_p,
    Param min_p, int top_k_first, Rng rng, void* out, int out64, bool* valid) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SelectSmem& sm = *reinterpret_cast<SelectSmem*>(smem_raw);
  pdl_begin();
  const int r = blockIdx.x;
  const RowIn<T, VEC> row = row_of<T, VEC>(probs, row_stride, row_indices != nullptr ? id_at(row_indices, idx64, r) : r,
                                           vocab);
  const Filter f = row_filter(r, top_k, top_p, min_p, top_k_first != 0);
  const RowRng g = row_rng(rng, r);
  const float u = uniform_co(row_random(g.seed, g.offset, r, 0).x);
  const bool use_k = f.use_k(vocab), use_p = f.use_p();
  int token;
  if (!use_k && !use_p && !f.use_min()) {
    token = stream_sample<VEC>(KeptWeights<T, VEC>{row, 0.f}, row.nv, u, sm.sc);
  } else {
    const int shift = mass_shift_for(vocab);
    const bool hc = use_k, hm = use_p && !(use_k && f.k_first);
    float mx, total;
    probs_pass1<T, VEC>(row, hc, hm, shift, sm, &mx, &total);
    Kept kept;
    if (use_k || use_p) {
      kept = select_kept<T, VEC, false>(row, vocab, f, mx, total, sm, hc, hm, shift);
    } else {  // min-p alone: a second pass draws over the row
      kept.in_smem = false;
      kept.v = f.min_p * mx;
    }
    if (kept.in_smem) {
      token = sample_in_smem(sm, kept, u);
    } else {
      token = stream_sample<VEC>(KeptWeights<T, VEC>{row, kept.v}, row.nv, u, sm.sc);
    }
  }
  if (threadIdx.x == 0) {
    store_id(out, out64, r, token < 0 ? 0 : token);
    if (valid != nullptr) valid[r] = token >= 0;
  }
}

// Renormalised top-k / top-p probabilities: kept tokens scaled by 1 / (kept mass), the others 0; written as
// TO (FlashInfer: top-k keeps the input dtype, top-p writes float32).
template <typename T, typename TO, int VEC>
__global__ void __launch_bounds__(kSampleThreads, 1) renorm_probs_kernel(
    const T* probs, long long row_stride, int vocab, Param top_k, Param top_p, TO* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SelectSmem& sm = *reinterpret_cast<SelectSmem*>(smem_raw);
  pdl_begin();
  const int r = blockIdx.x;
  const RowIn<T, VEC> row = row_of<T, VEC>(probs, row_stride, r, vocab);
  const Param none = {nullptr, 0.0, 0};
  const Filter f = row_filter(r, top_k, top_p, none, false);
  const bool use_k = f.use_k(vocab), use_p = f.use_p();
  const int shift = mass_shift_for(vocab);
  float mx, total;
  probs_pass1<T, VEC>(row, use_k, use_p, shift, sm, &mx, &total);
  float v = 0.f, mass = total;
  if (use_k || use_p) {
    const Kept kept = select_kept<T, VEC, false>(row, vocab, f, mx, total, sm, use_k, use_p, shift);
    v = kept.v;
    if (kept.in_smem) {
      mass = (float)kept.mass;
    } else {
      float s = 0.f;
      row_pass<VEC, true>(row.nv, [&](int q) { return row.at(q); }, [&](int, const Vec<float, VEC>& x, bool) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) if (x[e] > 0.f && x[e] >= v) s += x[e];
      });
      mass = block_reduce(s, Sum(), sm.sc.f32);
    }
  }
  const float inv = mass > 0.f ? __frcp_rn(mass) : 0.f;
  TO* orow = out + (long long)r * vocab;
  row_pass<VEC, true>(row.nv, [&](int q) { return row.at(q); }, [&](int q, const Vec<float, VEC>& x, bool ok) {
    Vec<TO, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.set(e, (x[e] > 0.f && x[e] >= v) ? x[e] * inv : 0.f);
    if (ok) o.store(orow + (long long)q * VEC);
  });
}

// Logits outside the top-k set set to -inf (NaN logits too); the others copied (exactly, in T).
template <typename T, int VEC>
__global__ void __launch_bounds__(kSampleThreads, 1) mask_logits_kernel(
    const T* logits, long long row_stride, int vocab, Param top_k, T* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SelectSmem& sm = *reinterpret_cast<SelectSmem*>(smem_raw);
  pdl_begin();
  const int r = blockIdx.x;
  const RowIn<T, VEC> row = row_of<T, VEC>(logits, row_stride, r, vocab);
  const Param p_none = {nullptr, 1.0, 0}, m_none = {nullptr, 0.0, 0};
  const Filter f = row_filter(r, top_k, p_none, m_none, false);
  float v = neg_inf();
  if (f.use_k(vocab)) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sm.hcount[i] = 0;
    __syncthreads();
    row_pass<VEC, false>(row.nv, [&](int q) { return row.at(q); }, [&](int, const Vec<float, VEC>& x, bool ok) {
#pragma unroll
      for (int e = 0; e < VEC; ++e)  // only loaded slots: the others hold zeros, not logits
        if (ok && !isnan(x[e])) atomicAdd(&sm.hcount[bin_of<true>(order_key(x[e]))], 1u);
    });
    __syncthreads();
    v = select_kept<T, VEC, true>(row, vocab, f, 0.f, 0.f, sm, true, false, 0).v;
  }
  T* orow = out + (long long)r * vocab;
  const bool all = !f.use_k(vocab);
  row_pass<VEC, true>(row.nv, [&](int q) { return row.at(q); }, [&](int q, const Vec<float, VEC>& x, bool ok) {
    Vec<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.set(e, (all || x[e] >= v) && !isnan(x[e]) ? x[e] : neg_inf());
    if (ok) o.store(orow + (long long)q * VEC);
  });
}

// Chain speculative sampling (Leviathan et al. 2023; Chen et al. 2023), one CTA a request. Draft token i
// is accepted when u_i * q_i(d_i) < p_i(d_i); at the first rejection j a token is drawn from
// max(p_j - q_j, 0), and when all are accepted from p_n. out_ids gets the accepted drafts, the drawn
// token and -1 after it; accepted[r] += drafts that pass on their own, emitted[r] += drafts emitted.
// draft_ids: int32, or int64 when ids64.
template <typename T, int VEC>
__global__ void __launch_bounds__(kSampleThreads, 1) chain_speculative_kernel(
    const T* draft_probs, const void* draft_ids, int ids64, const T* target_probs, int n_spec, int vocab, Rng rng,
    int* out_ids, int* accepted, int* emitted) {
  __shared__ SampleScratch sc;
  pdl_begin();
  const int r = blockIdx.x;
  const RowRng g = row_rng(rng, r);
  if (threadIdx.x == 0) {
    int first_reject = n_spec, n_acc = 0;
    for (int i = 0; i < n_spec; ++i) {
      const long long d = id_at(draft_ids, ids64, (long long)r * n_spec + i);
      bool ok = false;
      if (d >= 0 && d < vocab) {
        const float q = to_float(draft_probs[((long long)r * n_spec + i) * vocab + d]);
        const float p = to_float(target_probs[((long long)r * (n_spec + 1) + i) * vocab + d]);
        ok = uniform_open(row_random(g.seed, g.offset, r, i).x) * q < p;
      }
      n_acc += ok;
      if (!ok && first_reject == n_spec) first_reject = i;
    }
    sc.result[1] = first_reject;
    accepted[r] += n_acc;
    emitted[r] += first_reject;
  }
  __syncthreads();
  const int j = sc.result[1];
  int* orow = out_ids + (long long)r * (n_spec + 1);
  for (int i = threadIdx.x; i <= n_spec; i += blockDim.x)
    if (i < j) orow[i] = (int)id_at(draft_ids, ids64, (long long)r * n_spec + i); else if (i > j) orow[i] = -1;
  const float u = uniform_co(row_random(g.seed, g.offset, r, j).y);
  const RowIn<T, VEC> p = row_of<T, VEC>(target_probs, vocab, (long long)r * (n_spec + 1) + j, vocab);
  int token = -1;
  if (j < n_spec) {
    const RowIn<T, VEC> q = row_of<T, VEC>(draft_probs, vocab, (long long)r * n_spec + j, vocab);
    token = stream_sample<VEC>([&](int v) {
      Vec<float, VEC> a = p.at(v), b = q.at(v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) a.set(e, a[e] - b[e] > 0.f ? a[e] - b[e] : 0.f);
      return a;
    }, p.nv, u, sc);
  }
  if (token < 0)  // all drafts accepted, or p_j <= q_j everywhere (rounding): draw from p_j
    token = stream_sample<VEC>(KeptWeights<T, VEC>{p, 0.f}, p.nv, u, sc);
  if (threadIdx.x == 0) orow[j] = token < 0 ? 0 : token;
}

// Gumbel-max over logits: argmax_i logit_i - log(E_i), E_i ~ Exp(1) from Philox(seed, offset, row, i / 4).
struct Best {  // largest key, lowest index on ties
  float key;
  int idx;
};
__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.key > a.key || (b.key == a.key && b.idx < a.idx)) ? b : a;
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads, 1) sample_from_logits_kernel(
    const T* logits, long long row_stride, const void* row_indices, int idx64, int vocab, Rng rng, void* out,
    int out64) {
  __shared__ float keys[32];
  __shared__ int idxs[32];
  pdl_begin();
  const int r = blockIdx.x;
  const T* row = logits + (row_indices != nullptr ? id_at(row_indices, idx64, r) : (long long)r) * row_stride;
  const RowRng g = row_rng(rng, r);
  Best best = {neg_inf(), vocab};
  for (int q = threadIdx.x; q < (vocab + 3) / 4; q += blockDim.x) {
    const uint4 rnd = row_random(g.seed, g.offset, r, q);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = q * 4 + e;
      const unsigned int bits = e == 0 ? rnd.x : e == 1 ? rnd.y : e == 2 ? rnd.z : rnd.w;
      if (i < vocab) best = better(best, Best{to_float(row[i]) - logf(-logf(uniform_open(bits))), i});
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    best = better(best, Best{__shfl_xor_sync(0xffffffffu, best.key, o), __shfl_xor_sync(0xffffffffu, best.idx, o)});
  if ((threadIdx.x & 31) == 0) keys[threadIdx.x >> 5] = best.key, idxs[threadIdx.x >> 5] = best.idx;
  __syncthreads();
  best = Best{keys[threadIdx.x & 31], idxs[threadIdx.x & 31]};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    best = better(best, Best{__shfl_xor_sync(0xffffffffu, best.key, o), __shfl_xor_sync(0xffffffffu, best.idx, o)});
  if (threadIdx.x == 0) store_id(out, out64, r, best.idx < vocab ? best.idx : 0);
}

// probs = softmax(logits / temperature) per row, float32: an online max/sum pass, then the write pass.
template <typename T, int VEC>
__global__ void __launch_bounds__(kSampleThreads, 1) softmax_kernel(const T* logits, long long row_stride, int vocab,
                                                                 Param temperature, float* probs) {
  __shared__ float fs[32];
  pdl_begin();
  const int r = blockIdx.x;
  const RowIn<T, VEC> row = row_of<T, VEC>(logits, row_stride, r, vocab);
  const float t = param_float(temperature, r);
  const float scale = FIC_LOG2E / t;
  float m = neg_inf(), s = 0.f;
  row_pass<VEC, false>(row.nv, [&](int v) { return row.at(v); }, [&](int, const Vec<float, VEC>& x, bool ok) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float y = x[e] * scale;
      if (!ok) continue;
      if (y > m) {
        s = s * ptx_exp2(m - y) + 1.f;
        m = y;
      } else if (y != neg_inf()) {  // -inf adds 0; while m is -inf too, exp2(y - m) would be NaN
        s += ptx_exp2(y - m);
      }
    }
  });
  const float gm = block_reduce(m, Max(), fs);
  s = m == neg_inf() ? 0.f : s * ptx_exp2(m - gm);
  s = block_reduce(s, Sum(), fs);
  const float inv = __frcp_rn(s);
  float* orow = probs + (long long)r * vocab;
  row_pass<VEC, true>(row.nv, [&](int v) { return row.at(v); }, [&](int v, const Vec<float, VEC>& x, bool ok) {
    Vec<float, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.set(e, ptx_exp2(x[e] * scale - gm) * inv);
    if (ok) o.store(orow + (long long)v * VEC);
  });
}

// Reduce `x` over the first THREADS threads of the CTA (a power-of-two number of warps) with named
// barrier 1, so that other warps need not take part. Like block_reduce, safe to call back to back.
template <int THREADS, typename T, typename Op>
__device__ __forceinline__ T consumer_reduce(T x, Op op, T* scratch) {
  constexpr int kWarps = THREADS / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, shfl_xor(x, o));
  asm volatile("bar.sync 1, %0;" ::"n"(THREADS) : "memory");  // scratch may still be read by a previous call
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  asm volatile("bar.sync 1, %0;" ::"n"(THREADS) : "memory");
  x = scratch[threadIdx.x & (kWarps - 1)];
#pragma unroll
  for (int o = kWarps >> 1; o > 0; o >>= 1) x = op(x, shfl_xor(x, o));
  return x;
}

// softmax streamed through a ring of chunks in shared memory (sm_90+): persistent clusters of CTAs,
// each cluster taking rows cluster_id, cluster_id + nclusters, ... in turn; each CTA owns a slice of
// `slice` floats (a multiple of 4) of every row, cut into chunks of CHUNK floats. A producer thread
// bulk-copies the chunks of this cluster's rows, in order, into a ring of `slots` chunk buffers and
// refills a buffer as soon as every consumer warp has read it for the last time, so the next row's
// first chunks land while this row's pairs are exchanged. The THREADS consumer threads keep an online
// (max, sum of exp) over the chunks as they land, send the CTA's pair to every CTA of the cluster
// (DSMEM writes plus a remote mbarrier arrival), then normalise each chunk from shared memory
// straight to global memory: plain stores, so no buffer waits on a write, and buffer releases are
// CTA-scoped (a cluster-scoped release would wait for those stores). One read and one write of the
// row. HOLD > 0 (one CTA an SM, whose register file is then free): each thread keeps its share of
// a row's first HOLD chunks in registers from the max/sum pass to the write pass, so their buffers
// are refilled at once and a slice may be longer than the ring; without it a CTA's whole slice sits
// in the ring through the pair exchange. The write pass takes the buffered chunks before the held
// ones, so the next row's copies start with the first stores. Needs chunks a slice - HOLD < slots
// <= kMaxRingSlots; rows of length vocab % 4 == 0, 16-byte aligned; output contiguous; at most 16
// CTAs a cluster. One CTA an SM (HOLD > 0) or two (HOLD == 0); sampling.py picks. float32 logits only
// (16-bit rows take softmax_kernel).
// window > 0 keeps at most that many of a CTA's copies in flight (a copy waits for the one `window`
// before it to land): the memory system then serves the CTAs' chunks in turn rather than one CTA's
// whole burst after another's, which kept clusters of one CTA an SM 2-3 points below (H100).
constexpr int kMaxRingSlots = 16;
template <int THREADS, int CHUNK, int HOLD>
__global__ void __launch_bounds__(THREADS + 32, HOLD > 0 ? 1 : 2) softmax_ring_kernel(
    const float* logits, long long row_stride, int batch, int vocab, int slice, int slots, int window,
    Param temperature, float* probs) {
#if FIC_HAS_CLUSTERS
  constexpr int kChunk4 = CHUNK / 4, kPer = kChunk4 / THREADS;
  static_assert(kChunk4 % THREADS == 0, "a chunk is a whole number of float4 a consumer thread");
  extern __shared__ float4 ring[];                      // `slots` chunks
  __shared__ unsigned long long landed[kMaxRingSlots];  // the producer's copy of a chunk is in
  __shared__ unsigned long long freed[kMaxRingSlots];   // every consumer warp has read the chunk for the last time
  __shared__ unsigned long long exchanged[2];           // every CTA's pair of a row is in, by row parity
  __shared__ float pair_max[2][16], pair_sum[2][16];    // [row parity][sender rank]
  __shared__ float scratch[2][THREADS / 32];
  const unsigned int rank = cluster_rank(), ncta = cluster_size();
  const int cluster_id = blockIdx.x / ncta, nclusters = gridDim.x / ncta;
  const int lo = (int)rank * slice, len = max(0, min(vocab - lo, slice));
  const int nchunks = (slice + CHUNK - 1) / CHUNK;  // the same in every CTA: rows stay in step
  const int rows = batch > cluster_id ? (batch - cluster_id + nclusters - 1) / nclusters : 0;
  auto chunk_len = [&](int c) { return max(0, min(len - c * CHUNK, CHUNK)); };  // floats
  if (threadIdx.x == 0) {
    for (int s = 0; s < slots; ++s) mbarrier_init(&landed[s], 1), mbarrier_init(&freed[s], THREADS / 32);
    for (int p = 0; p < 2; ++p) mbarrier_init(&exchanged[p], ncta);
    fence_barrier_init();
  }
  // Copies need only this CTA's barriers; remote arrivals need every peer's, so the cluster barrier
  // is split: the producer starts at once, the consumers wait before their first row.
  cluster_arrive();
  __syncthreads();
  pdl_begin();
  if (threadIdx.x >= THREADS) {  // the producer warp
    if (threadIdx.x == THREADS) {
      const int total = rows * nchunks;
      for (int g = 0; g < total; ++g) {  // chunk g: row j, chunk c of the slice
        const int j = g / nchunks, c = g - j * nchunks, s = g % slots;
        if (g >= slots) mbarrier_wait(&freed[s], (unsigned int)(g / slots - 1) & 1u);
        if (window > 0 && g >= window)  // window < slots: that barrier is not yet re-armed
          mbarrier_wait(&landed[(g - window) % slots], (unsigned int)((g - window) / slots) & 1u);
        const unsigned int bytes = (unsigned int)chunk_len(c) * 4u;
        mbarrier_arrive_expect(&landed[s], bytes);
        if (bytes)
          bulk_load(ring + s * kChunk4, logits + (cluster_id + (long long)j * nclusters) * row_stride + lo + c * CHUNK,
                    bytes, &landed[s]);
      }
    }
    __syncwarp();
    cluster_wait();
  } else {
    cluster_wait();  // every peer's barriers are initialised before this CTA's first remote arrival
    const int lane = threadIdx.x & 31;
    // Chunk g's float4 into x once it has landed (-inf past the slice's end).
    auto take = [&](int g, float4(&x)[kPer]) {
      const float4* b = ring + (g % slots) * kChunk4;
      const int n4 = chunk_len(g % nchunks) / 4;
      mbarrier_wait(&landed[g % slots], (unsigned int)(g / slots) & 1u);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int v = threadIdx.x + i * THREADS;
        x[i] = v < n4 ? b[v] : make_float4(neg_inf(), neg_inf(), neg_inf(), neg_inf());
      }
    };
    // This warp has read chunk g's buffer for the last time: one arrival a warp. Each thread's
    // reads are fenced from the bulk copy that will refill the buffer (another proxy).
    auto release = [&](int g) {
      fence_proxy_async();
      __syncwarp();
      if (lane == 0) mbarrier_arrive_cta(&freed[g % slots]);
    };
    for (int j = 0; j < rows; ++j) {
      const int r = cluster_id + j * nclusters, par = j & 1, g0 = j * nchunks;
      const float scale = FIC_LOG2E / param_float(temperature, r);
      float m = neg_inf(), s = 0.f;  // this thread's online max (scaled, log2 units) and sum of exp2
      auto accumulate = [&](const float4(&x)[kPer]) {
        float cm = neg_inf();
#pragma unroll
        for (int i = 0; i < kPer; ++i) cm = fmaxf(cm, fmaxf(fmaxf(x[i].x, x[i].y), fmaxf(x[i].z, x[i].w)));
        cm *= scale;  // scale > 0: max commutes with it
        if (cm == neg_inf()) return;  // nothing but -inf: adds 0
        if (cm > m) s = s * ptx_exp2(m - cm), m = cm;
#pragma unroll
        for (int i = 0; i < kPer; ++i)
          s += (ptx_exp2(x[i].x * scale - m) + ptx_exp2(x[i].y * scale - m)) +
               (ptx_exp2(x[i].z * scale - m) + ptx_exp2(x[i].w * scale - m));
      };
      float4 held[HOLD > 0 ? HOLD : 1][kPer];  // chunks 0 .. HOLD - 1, their buffers already released
#pragma unroll
      for (int c = 0; c < HOLD; ++c)
        if (c < nchunks) {
          take(g0 + c, held[c]);
          release(g0 + c);
          accumulate(held[c]);
        }
      for (int c = HOLD; c < nchunks; ++c) {
        float4 x[kPer];
        take(g0 + c, x);
        accumulate(x);
      }
      const float cta_m = consumer_reduce<THREADS>(m, Max(), scratch[0]);
      s = consumer_reduce<THREADS>(m == neg_inf() ? 0.f : s * ptx_exp2(m - cta_m), Sum(), scratch[1]);
      if (threadIdx.x < ncta) {  // send this CTA's pair to CTA threadIdx.x
        cluster_store(cluster_addr(&pair_max[par][rank], threadIdx.x), cta_m);
        cluster_store(cluster_addr(&pair_sum[par][rank], threadIdx.x), s);
        mbarrier_arrive_remote(cluster_addr(&exchanged[par], threadIdx.x));
      }
      mbarrier_wait<true>(&exchanged[par], (unsigned int)(j >> 1) & 1u);
      // Each lane < ncta takes one sender's pair; the warp combines them.
      const float pm = lane < (int)ncta ? pair_max[par][lane] : neg_inf();
      const float ps = lane < (int)ncta ? pair_sum[par][lane] : 0.f;
      float gm = pm;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) gm = fmaxf(gm, shfl_xor(gm, o));
      float gs = ps > 0.f ? ps * ptx_exp2(pm - gm) : 0.f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) gs += shfl_xor(gs, o);
      const float inv = __frcp_rn(gs);
      float* orow = probs + (long long)r * vocab + lo;
      auto emit = [&](int c, const float4(&x)[kPer]) {
        const int n4 = chunk_len(c) / 4;
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const int v = threadIdx.x + i * THREADS;
          if (v < n4)
            __stcs(reinterpret_cast<float4*>(orow + c * CHUNK) + v,
                   make_float4(ptx_exp2(x[i].x * scale - gm) * inv, ptx_exp2(x[i].y * scale - gm) * inv,
                               ptx_exp2(x[i].z * scale - gm) * inv, ptx_exp2(x[i].w * scale - gm) * inv));
        }
      };
      for (int c = HOLD; c < nchunks; ++c) {  // the buffered chunks first: their refills start sooner
        float4 x[kPer];
        take(g0 + c, x);  // landed before the max/sum pass: no wait
        release(g0 + c);
        emit(c, x);
      }
#pragma unroll
      for (int c = 0; c < HOLD; ++c)
        if (c < nchunks) emit(c, held[c]);
    }
  }
  cluster_sync();  // no CTA leaves while a peer may still write its pairs into this one
#endif
}

}  // namespace fic
