// Shared AVX2 + FMA building blocks of the kernel library (few_rows.cpp, latent_attention.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace openk2_kernels {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m, n] = dot(x[m, :], w[n, :]) for MR rows of x and NR rows of w: MR * NR accumulators in registers
// (AVX2 has 16: MR = 4, NR = 3 uses 12, plus 3 weight vectors and 1 input vector).
// PREFETCH: also ask for the next tile's weight rows (the NR rows after these, at the same k), one cache line per
// row every 16 floats. At several input rows a tile computes long enough that the hardware prefetcher, left alone,
// lets the weight stream stall between bursts: a weight read from DRAM ran at half the bandwidth of one input row.
template <int MR, int NR, bool PREFETCH = false>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K, float* y, int64_t ldy) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 w_v[NR];
    for (int n = 0; n < NR; ++n) w_v[n] = _mm256_loadu_ps(w + n * ldw + k);
    if constexpr (PREFETCH)
      if ((k & 15) == 0)
        for (int n = 0; n < NR; ++n) _mm_prefetch(reinterpret_cast<const char*>(w + (n + NR) * ldw + k), _MM_HINT_T0);
    for (int m = 0; m < MR; ++m) {
      const __m256 x_v = _mm256_loadu_ps(x + m * ldx + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(x_v, w_v[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float s = hsum(acc[m][n]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * ldx + kk] * w[n * ldw + kk];
      y[m * ldy + n] = s;
    }
}

}  // namespace openk2_kernels
