// Absorbed MLA attention of a decode step over the latent cache, in fp32 on x86-64 with AVX2 and FMA.
//
// Why: compiled, this part of the step (scores, softmax, the probability-weighted sum of latents) is an Inductor
// reduction whose sum over keys runs as one chain of dependent adds per output vector: latency-bound, ~150 us per
// layer on config A at batch 8 where the arithmetic takes ~20 (docs/benchmarks.md, "Prefetching products, decode
// attention as a kernel"). Here a row's heads, which share its latents, run together: scores as dot products of up
// to 4 heads x 3 keys per tile, exponentials 8 at a time, the sum over keys for 3 heads x 32 latent dims per pass
// with each latent vector loaded once; keys outside the row's valid range (the cache window past its length, left
// padding) are not read.
//
// For each row b and head h, with q [B, H, L], latents [B, S, L], key_valid [B, S], the row's new latent [B, L]:
//   scores[s] = scale * q[b, h] . latent[b, s]   (-inf where !key_valid[b, s]),  own = scale * q[b, h] . new[b]
//   p = softmax([scores, own]),  out[b, h] = sum_s p[s] * latent[b, s, :C] + p_own * new[b, :C]
// (`openk2.model.decode._attention_step`, which stays the reference). Latents may be strided along B and S (a slot
// cache's live rows) but unit-stride along L.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "tiles.h"

namespace {

using openk2_kernels::exp_sum;
using openk2_kernels::mask_scale_max;
using openk2_kernels::tile;

// out[g, :C] = sum_s p[g, s] * rows[s, :C] + p_last[g] * last[:C] for G heads (G <= 3): 32 columns at a time,
// G x 4 accumulators, each latent vector loaded once for the G heads.
template <int G>
void weighted_sum(const float* p, int64_t ldp, const float* rows, int64_t ld, int64_t S, const float* p_last,
                  const float* last, int64_t C, float* out, int64_t ldo) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m256 acc[G][4];
    for (int g = 0; g < G; ++g) {
      const __m256 pl = _mm256_set1_ps(p_last[g]);
      for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_mul_ps(pl, _mm256_loadu_ps(last + c + 8 * j));
    }
    for (int64_t s = 0; s < S; ++s) {
      const float* row = rows + s * ld + c;
      __m256 r_v[4];
      for (int j = 0; j < 4; ++j) r_v[j] = _mm256_loadu_ps(row + 8 * j);
      for (int g = 0; g < G; ++g) {
        const __m256 ps = _mm256_set1_ps(p[g * ldp + s]);
        for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_fmadd_ps(ps, r_v[j], acc[g][j]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + g * ldo + c + 8 * j, acc[g][j]);
  }
  for (; c < C; ++c)
    for (int g = 0; g < G; ++g) {
      float acc = p_last[g] * last[c];
      for (int64_t s = 0; s < S; ++s) acc += p[g * ldp + s] * rows[s * ld + c];
      out[g * ldo + c] = acc;
    }
}

// p[g, s] = q[g] . rows[s] for G heads (G <= 4) and keys [0, S): 3 keys at a time, each latent row loaded once for
// the G heads (the few-row products' tile, G input rows).
template <int G>
void scores(const float* q, int64_t L, const float* rows, int64_t ld, int64_t S, float* p, int64_t ldp) {
  int64_t s = 0;
  for (; s + 3 <= S; s += 3) tile<G, 3>(q, L, rows + s * ld, ld, L, p + s, ldp);
  for (; s < S; ++s) tile<G, 1>(q, L, rows + s * ld, ld, L, p + s, ldp);
}

at::Tensor latent_attention(const at::Tensor& q_in, const at::Tensor& latent, const at::Tensor& key_valid_in,
                            const at::Tensor& new_in, double scale, int64_t C) {
  TORCH_CHECK(q_in.dim() == 3 && latent.dim() == 3 && key_valid_in.dim() == 2 && new_in.dim() == 2,
              "latent_attention: expected q [B, H, L], latent [B, S, L], key_valid [B, S], new [B, L]");
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), S = latent.size(1);
  TORCH_CHECK(latent.size(0) == B && latent.size(2) == L && key_valid_in.size(0) == B && key_valid_in.size(1) == S &&
                  new_in.size(0) == B && new_in.size(1) == L && C > 0 && C <= L,
              "latent_attention: shapes do not match: q ", q_in.sizes(), ", latent ", latent.sizes(), ", key_valid ",
              key_valid_in.sizes(), ", new ", new_in.sizes(), ", C ", C);
  for (const at::Tensor* t : {&q_in, &latent, &new_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_cpu(), "latent_attention: fp32 CPU tensors only");
  TORCH_CHECK(key_valid_in.scalar_type() == at::kBool, "latent_attention: key_valid must be bool");
  const at::Tensor lat = latent.stride(2) == 1 ? latent : latent.contiguous();
  const at::Tensor q = q_in.contiguous(), new_lat = new_in.contiguous(), valid = key_valid_in.contiguous();
  at::Tensor out = at::empty({B, H, C}, q.options());
  const float* q_p = q.data_ptr<float>();
  const float* lat_p = lat.data_ptr<float>();
  const float* new_p = new_lat.data_ptr<float>();
  const bool* valid_p = valid.data_ptr<bool>();
  float* out_p = out.data_ptr<float>();
  const int64_t lat_b = lat.stride(0), lat_s = lat.stride(1);
  const float sc = static_cast<float>(scale);
  // A unit of work: one row's group of up to 4 heads, which share the row's latents (multi-query attention); groups
  // of fewer heads where that gives every thread a unit (batch 1).
  int64_t group = std::min<int64_t>(4, H);
  while (group > 1 && B * ((H + group - 1) / group) < at::get_num_threads()) group = (group + 1) / 2;
  const int64_t groups = (H + group - 1) / group;
  at::parallel_for(0, B * groups, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> p(4 * S), own(4), inv(4);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / groups, h0 = u % groups * group, G = std::min(group, H - h0);
      const float* q_r = q_p + (b * H + h0) * L;
      const bool* valid_r = valid_p + b * S;
      // Only keys [first, last) can be valid: a cache's window past its length and a row's left padding are not read.
      int64_t first = 0, last = S;
      while (first < last && !valid_r[first]) ++first;
      while (last > first && !valid_r[last - 1]) --last;
      const int64_t n = last - first;
      const float* lat_r = lat_p + b * lat_b + first * lat_s;
      switch (G) {
        case 4: scores<4>(q_r, L, lat_r, lat_s, n, p.data(), S); break;
        case 3: scores<3>(q_r, L, lat_r, lat_s, n, p.data(), S); break;
        case 2: scores<2>(q_r, L, lat_r, lat_s, n, p.data(), S); break;
        default: scores<1>(q_r, L, lat_r, lat_s, n, p.data(), S); break;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* p_g = p.data() + g * S;
        float own_g;
        tile<1, 1>(q_r + g * L, 0, new_p + b * L, L, L, &own_g, 0);
        own_g *= sc;
        const float top = std::max(own_g, mask_scale_max(p_g, valid_r + first, n, sc));
        const float total = exp_sum(p_g, n, top);
        own[g] = std::exp(own_g - top);
        inv[g] = 1.0f / (total + own[g]);
      }
      float* out_r = out_p + (b * H + h0) * C;
      const float* new_r = new_p + b * L;
      int64_t g = 0;
      for (; g + 3 <= G; g += 3)
        weighted_sum<3>(p.data() + g * S, S, lat_r, lat_s, n, own.data() + g, new_r, C, out_r + g * C, C);
      for (; g < G; ++g)
        weighted_sum<1>(p.data() + g * S, S, lat_r, lat_s, n, own.data() + g, new_r, C, out_r + g * C, C);
      for (g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) out_r[g * C + c] *= inv[g];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2_kernels, m) {
  m.def("latent_attention(Tensor q, Tensor latent, Tensor key_valid, Tensor new, float scale, int c) -> Tensor");
}
TORCH_LIBRARY_IMPL(openk2_kernels, CPU, m) { m.impl("latent_attention", latent_attention); }
