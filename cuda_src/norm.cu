// Row norms: RMSNorm (Llama), Gemma RMSNorm (weight + 1), LayerNorm, each optionally fused with the
// residual add that precedes it in a transformer block (residual += input; input = norm(residual)).
//
// A team of blockDim.x threads normalises one row; a CTA holds blockDim.y rows. Row r of each array
// lies at (r / heads) * stride0 + (r % heads) * stride1 (its own two strides): leading dims that do not
// collapse into one axis, e.g. per-head q/k views (tokens, heads, head_dim) sliced out of a fused qkv
// buffer (Qwen3 / Gemma 3 qk-norm). The division runs only when heads > 1. Each thread owns
// VEC-element vectors of its row. With ITEMS > 0 the row is held in registers (ITEMS vectors per
// thread, raw storage type) so memory sees one read and one write per element; ITEMS == 0 is the
// fallback for rows longer than 512 * 8 vectors, which reads the row again from global memory (L2).
// All arithmetic is float32. The fused add rounds the sum to the storage type before normalising it,
// as model code does (the residual stream is stored in that type).
// In place (out == in; the fused add writes res_out == res and out == in) is safe: a thread writes only
// elements it has already read itself, in program order, and no other thread reads them.
#include "common/types.cuh"
#include "common/math.cuh"
#include "common/vec.cuh"
#include "common/pdl.cuh"

namespace fic {

enum NormMode { kRms = 0, kGemmaRms = 1, kLayer = 2 };

template <typename T, int VEC, bool ADD>
__device__ __forceinline__ Vec<T, VEC> norm_load(const T* in, const T* res, T* res_out, long long off_in,
                                                 long long off_res, long long off_res_out) {
  Vec<T, VEC> a;
  a.load(in + off_in);
  if (ADD) {
    Vec<T, VEC> r;
    r.load(res + off_res);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a.set(i, a[i] + r[i]);
    a.store(res_out + off_res_out);
  }
  return a;
}

template <typename T, typename W, int VEC, int MODE>
__device__ __forceinline__ void norm_store(const Vec<T, VEC>& a, const W* weight, const W* bias, int col,
                                           float mean, float rstd, T* out) {
  Vec<W, VEC> w, b;
  w.load(weight + col);
  if (MODE == kLayer) b.load(bias + col);
  Vec<T, VEC> o;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float x = a[i];
    float y;
    if (MODE == kRms) y = x * rstd * w[i];
    else if (MODE == kGemmaRms) y = x * rstd * (1.f + w[i]);
    else y = (x - mean) * rstd * w[i] + b[i];
    o.set(i, y);
  }
  o.store(out);
}

// Register-held rows use teams of at most 512 threads (128 registers a thread); the fallback 1024.
template <typename T, typename W, int VEC, int ITEMS, int MODE, bool ADD>
__global__ void __launch_bounds__(ITEMS == 0 ? 1024 : 512, 1) norm_kernel(
    const T* in, long long in_s0, long long in_s1, const T* res, long long res_s0, long long res_s1,
    T* res_out, long long res_out_s0, long long res_out_s1, const W* weight, const W* bias, T* out,
    long long out_s0, long long out_s1, int rows, unsigned heads, unsigned heads_mul, unsigned heads_shift,
    int hidden, float eps) {
  __shared__ float scratch[32 * 32];
  pdl_begin();
  const long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
  const bool live = row < rows;  // dead rows still join the reductions' barriers
  const int nvec = hidden / VEC;
  long long oi, orr, oro, oo;
  if (heads > 1) {  // two row axes (tokens, heads); rows < 2^31, the range FastDiv is exact on
    const FastDiv head_div = {heads, heads_mul, heads_shift};
    const long long t = head_div.quot((unsigned)row), h = row - t * heads;
    oi = t * in_s0 + h * in_s1;
    orr = t * res_s0 + h * res_s1;
    oro = t * res_out_s0 + h * res_out_s1;
    oo = t * out_s0 + h * out_s1;
  } else {  // one row axis: the plain 2-D path
    oi = row * in_s0;
    orr = row * res_s0;
    oro = row * res_out_s0;
    oo = row * out_s0;
  }
  const float inv_h = 1.f / (float)hidden;
  float mean = 0.f, rstd;
  if (ITEMS > 0) {
    constexpr int kItems = ITEMS > 0 ? ITEMS : 1;
    Vec<T, VEC> v[kItems];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (live && c < hidden) {
        v[k] = norm_load<T, VEC, ADD>(in, res, res_out, oi + c, orr + c, oro + c);
#pragma unroll
        for (int i = 0; i < VEC; ++i) s += MODE == kLayer ? v[k][i] : v[k][i] * v[k][i];
      }
    }
    s = row_sum(s, scratch);
    if (MODE == kLayer) {  // exact two-pass variance from the registers
      mean = s * inv_h;
      float q = 0.f;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * VEC;
        if (live && c < hidden) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) q += (v[k][i] - mean) * (v[k][i] - mean);
        }
      }
      s = row_sum(q, scratch);
    }
    rstd = rsqrtf(s * inv_h + eps);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (live && c < hidden) norm_store<T, W, VEC, MODE>(v[k], weight, bias, c, mean, rstd, out + oo + c);
    }
  } else {
    // Long rows: pass 1 reads (and writes the fused sum), later passes read again, mostly from L2.
    const T* src = ADD ? res_out : in;
    const long long os = ADD ? oro : oi;
    float s = 0.f;
    for (int p = threadIdx.x; live && p < nvec; p += blockDim.x) {
      Vec<T, VEC> a = norm_load<T, VEC, ADD>(in, res, res_out, oi + p * VEC, orr + p * VEC, oro + p * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += MODE == kLayer ? a[i] : a[i] * a[i];
    }
    s = row_sum(s, scratch);
    if (MODE == kLayer) {
      mean = s * inv_h;
      float q = 0.f;
      for (int p = threadIdx.x; live && p < nvec; p += blockDim.x) {
        Vec<T, VEC> a;
        a.load(src + os + p * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) q += (a[i] - mean) * (a[i] - mean);
      }
      s = row_sum(q, scratch);
    }
    rstd = rsqrtf(s * inv_h + eps);
    for (int p = threadIdx.x; live && p < nvec; p += blockDim.x) {
      Vec<T, VEC> a;
      a.load(src + os + p * VEC);
      norm_store<T, W, VEC, MODE>(a, weight, bias, p * VEC, mean, rstd, out + oo + p * VEC);
    }
  }
}

}  // namespace fic
