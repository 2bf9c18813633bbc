// Register tiles of the attention kernels (masked_attention.cpp, causal_attention.cpp): scores against keys packed
// in panels, and probability-weighted sums of value rows, in fp32 with AVX2 and FMA.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "tiles.h"

namespace openk2_kernels {

// Keys per panel (a score tile's width); packed keys are padded with zero keys to a multiple of it.
constexpr int64_t kKeyStep = 16;

// Keys [0, S) of one head (rows of k, unit stride along the Q dims) into panels of 16 keys: panel j is [Q, 16],
// keys 16 j to 16 j + 15 transposed, so a score tile reads one contiguous panel. Keys from S up to the next
// multiple of 16 are zeros.
inline void pack_key_panels(const float* k, int64_t ldk, int64_t S, int64_t Q, float* panels) {
  const int64_t padded = (S + kKeyStep - 1) / kKeyStep * kKeyStep;
  for (int64_t s0 = 0; s0 < padded; s0 += kKeyStep) {
    float* panel = panels + s0 * Q;
    const int64_t n = std::min(kKeyStep, S - s0);
    for (int64_t d = 0; d < Q; ++d) {
      for (int64_t j = 0; j < n; ++j) panel[d * kKeyStep + j] = k[(s0 + j) * ldk + d];
      for (int64_t j = n; j < kKeyStep; ++j) panel[d * kKeyStep + j] = 0.0f;
    }
  }
}

// p[r, s] = q[r] . k[s] for R query rows and keys [0, S) (S a multiple of 16), the keys packed in panels
// (`pack_key_panels`).
template <int R>
void scores_tile(const float* q, int64_t ldq, const float* panels, int64_t Q, int64_t S, float* p, int64_t ldp) {
  for (int64_t s = 0; s < S; s += kKeyStep) {
    const float* panel = panels + s * Q;
    __m256 acc[R][2];
    OPENK2_UNROLL
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < Q; ++d) {
      const __m256 k0 = _mm256_loadu_ps(panel + d * kKeyStep), k1 = _mm256_loadu_ps(panel + d * kKeyStep + 8);
      OPENK2_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m256 q_v = _mm256_broadcast_ss(q + r * ldq + d);
        acc[r][0] = _mm256_fmadd_ps(q_v, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(q_v, k1, acc[r][1]);
      }
    }
    OPENK2_UNROLL
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(p + r * ldp + s, acc[r][0]);
      _mm256_storeu_ps(p + r * ldp + s + 8, acc[r][1]);
    }
  }
}

// `scores_tile` for 1 to 6 rows.
inline void scores_rows(int R, const float* q, int64_t ldq, const float* panels, int64_t Q, int64_t S, float* p,
                        int64_t ldp) {
  switch (R) {
    case 6: scores_tile<6>(q, ldq, panels, Q, S, p, ldp); break;
    case 5: scores_tile<5>(q, ldq, panels, Q, S, p, ldp); break;
    case 4: scores_tile<4>(q, ldq, panels, Q, S, p, ldp); break;
    case 3: scores_tile<3>(q, ldq, panels, Q, S, p, ldp); break;
    case 2: scores_tile<2>(q, ldq, panels, Q, S, p, ldp); break;
    default: scores_tile<1>(q, ldq, panels, Q, S, p, ldp); break;
  }
}

// out[r, :NV*8] = sum_s p[r, s] * v[s, :NV*8] for R rows (R * NV <= 12 accumulators), p[r, s] at
// p + r * p_row + s * p_key: p_key = 1 for rows of probabilities, p_row = 1 for their columns (a transposed product,
// P^T V, as attention's backward needs for the keys' gradients).
template <int R, int NV>
void weighted_values(const float* p, int64_t p_row, int64_t p_key, const float* v, int64_t ldv, int64_t S,
                     float* out, int64_t ldo) {
  __m256 acc[R][NV];
  OPENK2_UNROLL
  for (int r = 0; r < R; ++r)
    OPENK2_UNROLL
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    __m256 v_v[NV];
    OPENK2_UNROLL
    for (int j = 0; j < NV; ++j) v_v[j] = _mm256_loadu_ps(v + s * ldv + 8 * j);
    OPENK2_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 p_v = _mm256_broadcast_ss(p + r * p_row + s * p_key);
      OPENK2_UNROLL
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_fmadd_ps(p_v, v_v[j], acc[r][j]);
    }
  }
  OPENK2_UNROLL
  for (int r = 0; r < R; ++r)
    OPENK2_UNROLL
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + r * ldo + 8 * j, acc[r][j]);
}

// All V columns of R rows: 32 columns (3 rows at a time), then 16 and 8 (6 rows at a time), then the scalar rest.
inline void weighted_values_rows(int R, const float* p, int64_t p_row, int64_t p_key, const float* v, int64_t ldv,
                                 int64_t S, int64_t V, float* out, int64_t ldo) {
  int64_t c = 0;
  for (; c + 32 <= V; c += 32) {
    int r = 0;
    for (; r + 3 <= R; r += 3)
      weighted_values<3, 4>(p + r * p_row, p_row, p_key, v + c, ldv, S, out + r * ldo + c, ldo);
    for (; r < R; ++r) weighted_values<1, 4>(p + r * p_row, p_row, p_key, v + c, ldv, S, out + r * ldo + c, ldo);
  }
  for (; c + 16 <= V; c += 16) {
    int r = 0;
    for (; r + 6 <= R; r += 6)
      weighted_values<6, 2>(p + r * p_row, p_row, p_key, v + c, ldv, S, out + r * ldo + c, ldo);
    for (; r < R; ++r) weighted_values<1, 2>(p + r * p_row, p_row, p_key, v + c, ldv, S, out + r * ldo + c, ldo);
  }
  for (; c + 8 <= V; c += 8) {
    int r = 0;
    for (; r + 6 <= R; r += 6)
      weighted_values<6, 1>(p + r * p_row, p_row, p_key, v + c, ldv, S, out + r * ldo + c, ldo);
    for (; r < R; ++r) weighted_values<1, 1>(p + r * p_row, p_row, p_key, v + c, ldv, S, out + r * ldo + c, ldo);
  }
  for (; c < V; ++c)
    OPENK2_UNROLL
    for (int r = 0; r < R; ++r) {
      float sum = 0.0f;
      for (int64_t s = 0; s < S; ++s) sum += p[r * p_row + s * p_key] * v[s * ldv + c];
      out[r * ldo + c] = sum;
    }
}

}  // namespace openk2_kernels
