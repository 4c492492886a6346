// Sampling without sorting the vocabulary. One CTA of 1024 threads per output row.
//
// Filters keep the tokens whose probability is at least a threshold value v:
//   top-k: keep token i if fewer than k tokens have a larger probability (ties at the boundary are kept);
//   top-p: keep token i if the mass of the tokens with a larger probability is < top_p * mass of the row
//          (with top_k_first, of the top-k set);
//   min-p: keep token i if p_i >= min_p * max_j p_j.
// The top-k / top-p thresholds come from a radix select on the bit patterns of the probabilities
// (non-negative floats order like their bits): a histogram of the top 11 bits (counts and fixed-point
// masses, integer atomics, so the result does not depend on the order of the additions), then the
// next 11 and the last 10 bits restricted to the boundary bin. The sample is an exponential race over
// the kept tokens, argmax_i p_i / E_i with E_i ~ Exp(1) from Philox(seed, offset, row, i), which draws
// token i with probability p_i / (mass kept), in one more pass. From logits the race is the Gumbel-max
// argmax_i logit_i - log(E_i).
#include "common/math.cuh"
#include "common/vec.cuh"
#include "common/philox.cuh"
#include "common/pdl.cuh"

namespace fic {

constexpr int kSampleThreads = 1024;  // launch bounds say one CTA an SM: up to 64 registers, no spills
constexpr int kBins = 2048;                    // 11 bits
constexpr double kMassScale = 1099511627776.0;  // 2^40: fixed-point unit of probability mass

__device__ __forceinline__ unsigned long long to_mass(float p) {
  return p > 0.f ? (unsigned long long)((double)p * kMassScale) : 0ull;
}

// Exp(1) variate of element i of output row r (one Philox call per 4 elements).
__device__ __forceinline__ float exp_variate(uint4 rnd, int e) {
  const unsigned int x = e == 0 ? rnd.x : e == 1 ? rnd.y : e == 2 ? rnd.z : rnd.w;
  return -logf(uniform_open(x));
}

__device__ __forceinline__ uint4 row_random(unsigned long long seed, unsigned long long offset, int r, int quad) {
  return philox4x32(make_uint4((unsigned int)quad, (unsigned int)r, (unsigned int)offset, (unsigned int)(offset >> 32)),
                    make_uint2((unsigned int)seed, (unsigned int)(seed >> 32)));
}

// f(i, x) for every element of a row, VEC-wide loads (VEC = 4 needs a 16-byte aligned row of n % 4 == 0).
template <int VEC, typename F>
__device__ __forceinline__ void for_each(const float* row, int n, F f) {
  for (int v = threadIdx.x; v < n / VEC; v += blockDim.x) {
    Vec<float, VEC> x;
    x.load(row + v * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) f(v * VEC + e, x[e]);
  }
}

// ---------------------------------------------------------------------------------------------
// Block reductions (blockDim.x == kSampleThreads)

struct Best {  // the race's leader: largest key, lowest index on ties
  float key;
  int idx;
};
__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.key > a.key || (b.key == a.key && b.idx < a.idx)) ? b : a;
}

__device__ Best block_best(Best b, Best* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Best other = {__shfl_xor_sync(0xffffffffu, b.key, o), __shfl_xor_sync(0xffffffffu, b.idx, o)};
    b = better(b, other);
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = b;
  __syncthreads();
  b = scratch[threadIdx.x & 31];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Best other = {__shfl_xor_sync(0xffffffffu, b.key, o), __shfl_xor_sync(0xffffffffu, b.idx, o)};
    b = better(b, other);
  }
  return b;
}

__device__ float block_max(float x, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  x = scratch[threadIdx.x & 31];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Exclusive prefix sum over threads in thread order (every thread gets its own and the total).
__device__ unsigned long long block_exclusive_scan(unsigned long long x, unsigned long long* scratch,
                                                   unsigned long long* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long inc = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  unsigned long long w = lane < 32 ? scratch[lane] : 0ull, winc = w;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(0xffffffffu, winc, o);
    if (lane >= o) winc += y;
  }
  const unsigned long long warp_base = __shfl_sync(0xffffffffu, winc - w, warp);
  *total = __shfl_sync(0xffffffffu, winc, 31);
  return warp_base + inc - x;
}

// ---------------------------------------------------------------------------------------------
// Radix select

struct SampleSmem {
  unsigned int count0[kBins];          // level-0 histogram (top 11 bits): token counts
  unsigned long long mass0[kBins];     // and fixed-point masses
  unsigned long long work[kBins];      // levels 1-2: the weight being selected on
  unsigned long long scan[32];
  Best best[32];
  float fscratch[32];
  int found_bin;
  unsigned long long found_above;
};

// The lowest bin b of h[0, nbins) with sum_{b' > b} h[b'] < target; *above gets that sum.
// Every thread of the block must call it.
template <typename H>
__device__ int find_bin(const H* h, int nbins, unsigned long long target, SampleSmem& sm,
                        unsigned long long* above) {
  const int per = nbins / kSampleThreads;  // 1 or 2 bins a thread, highest bins first
  const int b0 = nbins - 1 - threadIdx.x * per;
  unsigned long long w = 0;
  for (int j = 0; j < per; ++j) w += (unsigned long long)h[b0 - j];
  unsigned long long total;
  unsigned long long s = block_exclusive_scan(w, sm.scan, &total);  // mass of the bins above b0
  if (threadIdx.x == 0) sm.found_bin = 0, sm.found_above = 0;
  __syncthreads();
  for (int j = 0; j < per; ++j) {
    const unsigned long long hb = (unsigned long long)h[b0 - j];
    if (s < target && (b0 - j == 0 || s + hb >= target)) {
      sm.found_bin = b0 - j;
      sm.found_above = s;
    }
    s += hb;
  }
  __syncthreads();
  *above = sm.found_above;
  return sm.found_bin;
}

// The smallest bit pattern v such that the weight (count, or mass) of the tokens with larger values is
// below target. Levels 1 and 2 re-read the row, counting only the tokens of the boundary bin so far.
template <int VEC>
__device__ unsigned int radix_select(const float* row, int n, bool by_mass, unsigned long long target,
                                     SampleSmem& sm) {
  unsigned long long above;
  const int b0 = by_mass ? find_bin(sm.mass0, kBins, target, sm, &above)
                         : find_bin(sm.count0, kBins, target, sm, &above);
  target -= above;
  unsigned int prefix = (unsigned int)b0;
  int shift = 21;
  for (int level = 1; level <= 2; ++level) {
    const int bits = level == 1 ? 11 : 10, nb = 1 << bits, hi_shift = shift;
    shift -= bits;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sm.work[i] = 0;
    __syncthreads();
    for_each<VEC>(row, n, [&](int, float x) {
      const unsigned int u = __float_as_uint(x);
      if (x > 0.f && (u >> hi_shift) == prefix)
        atomicAdd(&sm.work[(u >> shift) & (nb - 1)], by_mass ? to_mass(x) : 1ull);
    });
    __syncthreads();
    const int b = find_bin(sm.work, nb, target, sm, &above);
    target -= above;
    prefix = (prefix << bits) | (unsigned int)b;
  }
  return prefix;
}

// ---------------------------------------------------------------------------------------------
// Kernels

// top_k <= 0 or >= vocab: no top-k; top_p >= 1: no top-p; min_p <= 0: no min-p. A per-row array, when
// given, overrides the scalar. top_k_first: top-p applies to the mass of the top-k set.
template <int VEC>
__global__ void __launch_bounds__(kSampleThreads, 1) sample_from_probs_kernel(
    const float* probs, long long row_stride, const int* row_indices, int vocab, const int* top_k_arr,
    int top_k_val, const float* top_p_arr, float top_p_val, const float* min_p_arr, float min_p_val,
    int top_k_first, unsigned long long seed, unsigned long long offset, int* out) {
  __shared__ SampleSmem sm;
  pdl_begin();
  const int r = blockIdx.x;
  const int src = row_indices != nullptr ? row_indices[r] : r;
  const float* row = probs + (long long)src * row_stride;
  const int k = top_k_arr != nullptr ? top_k_arr[r] : top_k_val;
  const float top_p = top_p_arr != nullptr ? top_p_arr[r] : top_p_val;
  const float min_p = min_p_arr != nullptr ? min_p_arr[r] : min_p_val;
  const bool use_k = k > 0 && k < vocab, use_p = top_p < 1.f, use_min = min_p > 0.f;

  unsigned int v = 0;  // keep tokens whose bits are >= v (and whose probability is > 0)
  if (use_k || use_p || use_min) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sm.count0[i] = 0, sm.mass0[i] = 0;
    __syncthreads();
    float mx = 0.f;
    for_each<VEC>(row, vocab, [&](int, float x) {
      if (x > 0.f) {
        const int bin = __float_as_uint(x) >> 21;
        atomicAdd(&sm.count0[bin], 1u);
        atomicAdd(&sm.mass0[bin], to_mass(x));
        mx = fmaxf(mx, x);
      }
    });
    mx = block_max(mx, sm.fscratch);
    __syncthreads();
    unsigned long long part = 0, kept_mass;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) part += sm.mass0[i];
    (void)block_exclusive_scan(part, sm.scan, &kept_mass);  // the row's mass
    if (use_k) {
      const unsigned int vk = radix_select<VEC>(row, vocab, false, (unsigned long long)k, sm);
      v = max(v, vk);
      if (top_k_first) {  // mass of the top-k set, exactly: one pass
        unsigned long long m = 0;
        for_each<VEC>(row, vocab, [&](int, float x) { if (x > 0.f && __float_as_uint(x) >= vk) m += to_mass(x); });
        unsigned long long t;
        (void)block_exclusive_scan(m, sm.scan, &t);
        kept_mass = t;
      }
    }
    if (use_p) {
      unsigned long long target = (unsigned long long)((double)top_p * (double)kept_mass);
      if (target == 0) target = 1;
      v = max(v, radix_select<VEC>(row, vocab, true, target, sm));
    }
    if (use_min) v = max(v, __float_as_uint(min_p * mx));
  }
  // The race over the kept tokens.
  Best best = {-1.f, vocab};
  for (int q = threadIdx.x; q < (vocab + 3) / 4; q += blockDim.x) {
    const uint4 rnd = row_random(seed, offset, r, q);
    float x4[4];
    if (VEC == 4) {
      Vec<float, 4> x;
      x.load(row + q * 4);
#pragma unroll
      for (int e = 0; e < 4; ++e) x4[e] = x[e];
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) x4[e] = q * 4 + e < vocab ? row[q * 4 + e] : 0.f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float x = x4[e];
      if (x > 0.f && __float_as_uint(x) >= v) best = better(best, Best{x / exp_variate(rnd, e), q * 4 + e});
    }
  }
  best = block_best(best, sm.best);
  if (threadIdx.x == 0) out[r] = best.idx < vocab ? best.idx : 0;
}

// Gumbel-max over logits: argmax_i logit_i - log(E_i).
__global__ void __launch_bounds__(kSampleThreads, 1) sample_from_logits_kernel(
    const float* logits, long long row_stride, const int* row_indices, int vocab, unsigned long long seed,
    unsigned long long offset, int* out) {
  __shared__ Best scratch[32];
  pdl_begin();
  const int r = blockIdx.x;
  const float* row = logits + (long long)(row_indices != nullptr ? row_indices[r] : r) * row_stride;
  Best best = {neg_inf(), vocab};
  for (int q = threadIdx.x; q < (vocab + 3) / 4; q += blockDim.x) {
    const uint4 rnd = row_random(seed, offset, r, q);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = q * 4 + e;
      if (i < vocab) best = better(best, Best{row[i] - logf(exp_variate(rnd, e)), i});
    }
  }
  best = block_best(best, scratch);
  if (threadIdx.x == 0) out[r] = best.idx < vocab ? best.idx : 0;
}

// probs = softmax(logits / temperature) per row: an online max/sum pass, then the write pass.
template <int VEC>
__global__ void __launch_bounds__(kSampleThreads, 1) softmax_kernel(const float* logits, long long row_stride,
                                                                 int vocab, const float* temp_arr, float temp_val,
                                                                 float* probs) {
  __shared__ float fs[32];
  pdl_begin();
  const int r = blockIdx.x;
  const float* row = logits + (long long)r * row_stride;
  const float t = temp_arr != nullptr ? temp_arr[r] : temp_val;
  const float scale = FIC_LOG2E / t;
  float m = neg_inf(), s = 0.f;
  for_each<VEC>(row, vocab, [&](int, float x) {
    const float y = x * scale;
    if (y > m) {
      s = s * ptx_exp2(m - y) + 1.f;
      m = y;
    } else {
      s += ptx_exp2(y - m);
    }
  });
  const float gm = block_max(m, fs);
  s = m == neg_inf() ? 0.f : s * ptx_exp2(m - gm);
  s = warp_sum(s);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) fs[threadIdx.x >> 5] = s;
  __syncthreads();
  s = warp_sum(fs[threadIdx.x & 31]);
  const float inv = __frcp_rn(s);
  float* orow = probs + (long long)r * vocab;
  for (int v = threadIdx.x; v < vocab / VEC; v += blockDim.x) {
    Vec<float, VEC> x, o;
    x.load(row + v * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.set(e, ptx_exp2(x[e] * scale - gm) * inv);
    o.store(orow + v * VEC);
  }
}

}  // namespace fic
