// Rotary position embedding of q and k (nnz tokens x heads x head_dim), out of place or in place.
//
// Pairs: non-interleaved ("rotate half", Llama / GPT-NeoX) pairs dim j with j + rotary_dim / 2;
// interleaved (GPT-J) pairs 2i with 2i + 1. Dims past rotary_dim pass through unchanged.
// Frequencies (FREQ): kTheta inv_freq_i = theta^(-2i / rotary_dim) / rope_scale; kLlama31 the Llama 3.1
// rescaling of those (Hugging Face's _compute_llama3_parameters, with rope_scale as its factor);
// kCache cos and sin read from a float32 cache (max_pos, rotary_dim) = [cos | sin]. inv_freq is
// computed in double and rounded to float32, the angle pos * inv_freq is a float32 product and its
// sin / cos are float32 (an exact 2*pi reduction below 4e5 rad, a double one above), as Hugging Face
// computes them. Positions (POS): kPosIds one per token;
// kIndptr offsets[b] + (token - indptr[b]) for the request b that holds the token.
//
// Threads: blockDim.x lanes per (token, head chunk): the first rot_items lanes each rotate one vector
// pair (non-interleaved: VEC dims at j and at j + rotary_dim/2; interleaved: VEC dims at j), the rest
// copy pass-through vectors when the output is not the input. blockDim.y tokens per CTA; grid.y cuts
// the q heads then the k heads into chunks of kHeadChunk, which share one set of sin / cos. inv_freq
// (double-precision work) is computed once per CTA into shared memory.
#include "common/types.cuh"
#include "common/vec.cuh"
#include "common/pdl.cuh"
#include "common/rope.cuh"

namespace fic {

enum RopePos { kPosIds = 0, kIndptr = 1 };
enum RopeFreq { kTheta = 0, kLlama31 = 1, kCache = 2 };
constexpr int kHeadChunk = 8;
constexpr int kRopeMaxThreads = 256;  // the launch bound: a CTA's x * y threads
constexpr int kMaxHalfRotary = 512;  // rotary_dim / 2 of the shared inv_freq table

struct RopeFreqArgs {  // what the frequency modes need (unused fields are ignored)
  float rcp_scale;      // kTheta: 1 / rope_scale; kLlama31: 1 / factor
  float low_freq_factor, high_freq_factor, old_context_len;
  double log2_theta;
};

__device__ __forceinline__ float rope_inv_freq(int i, int rotary_dim, int mode, const RopeFreqArgs& a) {
  const double f = rope_theta_freq(i, rotary_dim, a.log2_theta);
  if (mode == kTheta) return (float)f * a.rcp_scale;
  const double wavelen = 6.283185307179586 / f;
  const double low_wavelen = a.old_context_len / a.low_freq_factor;
  const double high_wavelen = a.old_context_len / a.high_freq_factor;
  if (wavelen > low_wavelen) return (float)(f * a.rcp_scale);
  if (wavelen < high_wavelen) return (float)f;
  const double smooth = (a.old_context_len / wavelen - a.low_freq_factor) /
                        ((double)a.high_freq_factor - a.low_freq_factor);
  return (float)((1.0 - smooth) * f * a.rcp_scale + smooth * f);
}

template <typename I, int POS>
__device__ __forceinline__ long long rope_position(long long t, const I* pos_ids, const I* indptr, const I* offsets,
                                                   int batch) {
  if (POS == kPosIds) return (long long)pos_ids[t];
  int lo = 0, hi = batch;  // the last b with indptr[b] <= t
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if ((long long)indptr[mid] <= t) lo = mid; else hi = mid;
  }
  return (long long)offsets[lo] + (t - (long long)indptr[lo]);
}

struct RopeTensor {  // one of q / k: input and output with (token, head) strides in elements
  long long tok, head, out_tok, out_head;
};

template <typename T, typename I, int VEC, bool INTERLEAVE, int POS, int FREQ>
__global__ void __launch_bounds__(kRopeMaxThreads) rope_kernel(
    const T* q, T* q_out, RopeTensor qs, int num_q_heads, const T* k, T* k_out, RopeTensor ks, int num_k_heads,
    const I* pos_ids, const I* indptr, const I* offsets, int batch, const float* cos_sin, long long cs_stride,
    long long max_pos, RopeFreqArgs fa, long long nnz, int head_dim, int rotary_dim) {
  __shared__ float inv_freq[FREQ == kCache ? 1 : kMaxHalfRotary];
  const int half = rotary_dim / 2;
  if (FREQ != kCache) {
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < half; i += blockDim.x * blockDim.y)
      inv_freq[i] = rope_inv_freq(i, rotary_dim, FREQ, fa);
    __syncthreads();
  }
  pdl_begin();  // the table above needs no memory: it overlaps the previous kernel's tail
  const long long t = (long long)blockIdx.x * blockDim.y + threadIdx.y;
  if (t >= nnz) return;
  const int rot_items = INTERLEAVE ? rotary_dim / VEC : half / VEC;
  // A lane a vector: rotated ones, then (out of place) the pass-through ones past rotary_dim. Rows wider
  // than kRopeMaxThreads vectors (vector width 1) take several CTAs along z.
  const int lane = blockIdx.z * blockDim.x + threadIdx.x;
  const int h0 = blockIdx.y * kHeadChunk;
  const int total_heads = num_q_heads + num_k_heads;

  if (lane >= rot_items) {  // pass-through dims (only launched when writing out of place)
    const int c = rotary_dim + (lane - rot_items) * VEC;
    if (c >= head_dim) return;
    for (int hh = h0; hh < min(h0 + kHeadChunk, total_heads); ++hh) {
      const bool isq = hh < num_q_heads;
      const int h = isq ? hh : hh - num_q_heads;
      const RopeTensor& s = isq ? qs : ks;
      Vec<T, VEC> x;
      x.load((isq ? q : k) + t * s.tok + h * s.head + c);
      x.store((isq ? q_out : k_out) + t * s.out_tok + h * s.out_head + c);
    }
    return;
  }

  // This lane's dims: non-interleaved, [c, c + VEC) paired with [c + half, ...); interleaved, the
  // VEC / 2 pairs in [c, c + VEC). Frequency index of pair element e: fi0 + e (non-interleaved) or
  // fi0 + e / 2 (interleaved).
  const int c = lane * VEC;
  const int fi0 = INTERLEAVE ? c / 2 : c;
  constexpr int NF = INTERLEAVE ? VEC / 2 : VEC;
  const long long pos = rope_position<I, POS>(t, pos_ids, indptr, offsets, batch);
  float cs[NF], sn[NF];
  const bool bad = FREQ == kCache && (pos < 0 || pos >= max_pos);  // no read outside the cache: NaN out
#pragma unroll
  for (int e = 0; e < NF; ++e) {
    if (FREQ == kCache) {
      cs[e] = bad ? __int_as_float(0x7fc00000) : cos_sin[pos * cs_stride + fi0 + e];
      sn[e] = bad ? __int_as_float(0x7fc00000) : cos_sin[pos * cs_stride + half + fi0 + e];
    } else {
      const float angle = (float)pos * inv_freq[fi0 + e];
      if (fabsf(angle) < 4.0e5f) {
        rope_sincos(angle, &sn[e], &cs[e]);  // exact float reduction by 2*pi
      } else {  // a double reduction (error ~1e-7 rad up to 2^31 rad); no library call, so no spills
        const double k = rint((double)angle * 0.15915494309189535);
        __sincosf((float)fma(-k, 6.283185307179586, (double)angle), &sn[e], &cs[e]);
      }
    }
  }
  for (int hh = h0; hh < min(h0 + kHeadChunk, total_heads); ++hh) {
    const bool isq = hh < num_q_heads;
    const int h = isq ? hh : hh - num_q_heads;
    const RopeTensor& s = isq ? qs : ks;
    const T* src = (isq ? q : k) + t * s.tok + h * s.head;
    T* dst = (isq ? q_out : k_out) + t * s.out_tok + h * s.out_head;
    if (INTERLEAVE) {
      Vec<T, VEC> x, o;
      x.load(src + c);
#pragma unroll
      for (int e = 0; e < VEC / 2; ++e) {
        const float a = x[2 * e], b = x[2 * e + 1];
        o.set(2 * e, a * cs[e] - b * sn[e]);
        o.set(2 * e + 1, b * cs[e] + a * sn[e]);
      }
      o.store(dst + c);
    } else {
      Vec<T, VEC> x1, x2, o1, o2;
      x1.load(src + c);
      x2.load(src + c + half);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        o1.set(e, x1[e] * cs[e] - x2[e] * sn[e]);
        o2.set(e, x2[e] * cs[e] + x1[e] * sn[e]);
      }
      o1.store(dst + c);
      o2.store(dst + c + half);
    }
  }
}

}  // namespace fic
