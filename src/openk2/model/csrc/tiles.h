// Shared AVX2 + FMA building blocks of the kernel library (included by its sources).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

// Before a loop over a register tile's rows or columns: unrolled early, the tile's array of accumulators lives in
// registers. Left to GCC 12's late unrolling, every step stored all of them to the stack (12 stores per 12 FMAs),
// which halved the tiles' FMA rate.
#define OPENK2_UNROLL _Pragma("GCC unroll 16")

namespace openk2_kernels {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, times 2^n), to ~1 ulp over the
// float range; inputs below -88.38 give 0 and above 88.38 give exp(88.38).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// The largest of a vector's lanes.
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// A softmax's first half for the attention kernels: p[s] = scale * p[s] where mask[s], else -inf (8 mask bytes
// widened to lanes at a time); returns the max (-inf when no key is seen).
inline float mask_scale_max(float* p, const bool* mask, int64_t n, float scale) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m256 scale_v = _mm256_set1_ps(scale), neg_inf_v = _mm256_set1_ps(neg_inf);
  __m256 top_v = neg_inf_v;
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256i seen = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + s)));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(seen, _mm256_setzero_si256()));
    const __m256 x = _mm256_blendv_ps(neg_inf_v, _mm256_mul_ps(scale_v, _mm256_loadu_ps(p + s)), keep);
    _mm256_storeu_ps(p + s, x);
    top_v = _mm256_max_ps(top_v, x);
  }
  float top = hmax(top_v);
  for (; s < n; ++s) {
    p[s] = mask[s] ? scale * p[s] : neg_inf;
    top = std::max(top, p[s]);
  }
  return top;
}

// out[i] = silu(gate[i]) * up[i] * weight, 8 at a time (out may be gate): the decode experts' activations
// (`few_rows_experts`, weighted by the token's gate) and training's SwiGLU forward (`csrc/swiglu.cpp`, weight 1). At a
// prefill's rows per expert, std::exp one value at a time took a fifth of the experts op (config A, 512 tokens).
inline void swiglu_row(const float* gate, const float* up, float* out, int64_t n, float weight) {
  const __m256 one = _mm256_set1_ps(1.0f), weight_v = _mm256_set1_ps(weight);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(silu, _mm256_loadu_ps(up + i)), weight_v));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i] * weight;
}

// Its second half: p[s] = exp(p[s] - top), 8 at a time (masked keys: exp8 of -inf is 0); returns their sum.
inline float exp_sum(float* p, int64_t n, float top) {
  const __m256 top_v = _mm256_set1_ps(top);
  __m256 total_v = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), top_v));
    _mm256_storeu_ps(p + s, e);
    total_v = _mm256_add_ps(total_v, e);
  }
  float total = hsum(total_v);
  for (; s < n; ++s) total += (p[s] = std::exp(p[s] - top));
  return total;
}

// y[m, n] = dot(x[m, :], w[n, :]) for MR rows of x and NR rows of w: MR * NR accumulators in registers
// (AVX2 has 16: MR = 4, NR = 3 uses 12, plus 3 weight vectors and 1 input vector).
// PREFETCH: also ask for the next tile's weight rows (the NR rows after these, at the same k), one cache line per
// row every 16 floats. At several input rows a tile computes long enough that the hardware prefetcher, left alone,
// lets the weight stream stall between bursts: a weight read from DRAM ran at half the bandwidth of one input row.
template <int MR, int NR, bool PREFETCH = false>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K, float* y, int64_t ldy) {
  __m256 acc[MR][NR];
  OPENK2_UNROLL
  for (int m = 0; m < MR; ++m)
    OPENK2_UNROLL
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 w_v[NR];
    OPENK2_UNROLL
    for (int n = 0; n < NR; ++n) w_v[n] = _mm256_loadu_ps(w + n * ldw + k);
    if constexpr (PREFETCH)
      if ((k & 15) == 0) {
        OPENK2_UNROLL
        for (int n = 0; n < NR; ++n) _mm_prefetch(reinterpret_cast<const char*>(w + (n + NR) * ldw + k), _MM_HINT_T0);
      }
    OPENK2_UNROLL
    for (int m = 0; m < MR; ++m) {
      const __m256 x_v = _mm256_loadu_ps(x + m * ldx + k);
      OPENK2_UNROLL
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(x_v, w_v[n], acc[m][n]);
    }
  }
  OPENK2_UNROLL
  for (int m = 0; m < MR; ++m)
    OPENK2_UNROLL
    for (int n = 0; n < NR; ++n) {
      float s = hsum(acc[m][n]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * ldx + kk] * w[n * ldw + kk];
      y[m * ldy + n] = s;
    }
}

}  // namespace openk2_kernels
