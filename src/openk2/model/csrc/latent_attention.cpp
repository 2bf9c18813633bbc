// Absorbed MLA attention of a decode step over the latent cache, in fp32 on x86-64 with AVX2 and FMA.
//
// Why: compiled, this part of the step (scores, softmax, the probability-weighted sum of latents) is an Inductor
// reduction whose sum over keys runs as one chain of dependent adds per output vector: latency-bound, ~150 us per
// layer on config A at batch 8 where the arithmetic takes ~20 (docs/benchmarks.md, "Prefetching products, decode
// attention as a kernel"). Here each (row, head) pair runs its scores as dot products 4 keys at a time, its
// exponentials 8 at a time, and its sum over keys with the latent's vectors as independent accumulators.
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

using openk2_kernels::exp8;
using openk2_kernels::hsum;
using openk2_kernels::tile;

// out[:C] = sum_s p[s] * rows[s, :C] + p_last * last[:C], 64 columns at a time in 8 independent accumulators.
void weighted_sum(const float* p, const float* rows, int64_t ld, int64_t S, float p_last, const float* last,
                  int64_t C, float* out) {
  int64_t c = 0;
  for (; c + 64 <= C; c += 64) {
    __m256 acc[8];
    const __m256 pl = _mm256_set1_ps(p_last);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_mul_ps(pl, _mm256_loadu_ps(last + c + 8 * j));
    for (int64_t s = 0; s < S; ++s) {
      if (p[s] == 0.0f) continue;  // masked keys (left padding) and underflow
      const __m256 ps = _mm256_set1_ps(p[s]);
      const float* row = rows + s * ld + c;
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(row + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + c + 8 * j, acc[j]);
  }
  for (; c < C; ++c) {
    float acc = p_last * last[c];
    for (int64_t s = 0; s < S; ++s) acc += p[s] * rows[s * ld + c];
    out[c] = acc;
  }
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
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float sc = static_cast<float>(scale);
  // One (row, head) pair per unit of work: a row's latents are read by its H heads from cache.
  at::parallel_for(0, B * H, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> p(S);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / H;
      const float* q_r = q_p + u * L;
      const float* lat_r = lat_p + b * lat_b;
      const bool* valid_r = valid_p + b * S;
      // q against 4 keys at a time: one q load per 4 fused multiply-adds (the few-row products' tile, one input row)
      int64_t s = 0;
      for (; s + 4 <= S; s += 4) tile<1, 4>(q_r, 0, lat_r + s * lat_s, lat_s, L, p.data() + s, 0);
      for (; s < S; ++s) tile<1, 1>(q_r, 0, lat_r + s * lat_s, lat_s, L, p.data() + s, 0);
      float own;
      tile<1, 1>(q_r, 0, new_p + b * L, L, L, &own, 0);
      own *= sc;
      float top = own;
      for (s = 0; s < S; ++s) {
        p[s] = valid_r[s] ? sc * p[s] : neg_inf;
        top = std::max(top, p[s]);
      }
      // exp(score - max), 8 keys at a time (masked keys: exp8 of -inf is 0)
      const __m256 top_v = _mm256_set1_ps(top);
      __m256 total_v = _mm256_setzero_ps();
      for (s = 0; s + 8 <= S; s += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.data() + s), top_v));
        _mm256_storeu_ps(p.data() + s, e);
        total_v = _mm256_add_ps(total_v, e);
      }
      float total = hsum(total_v);
      for (; s < S; ++s) total += (p[s] = std::exp(p[s] - top));
      own = std::exp(own - top);
      total += own;
      const float inv = 1.0f / total;
      for (s = 0; s < S; ++s) p[s] *= inv;
      weighted_sum(p.data(), lat_r, lat_s, S, own * inv, new_p + b * L, C, out_p + u * C);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2_kernels, m) {
  m.def("latent_attention(Tensor q, Tensor latent, Tensor key_valid, Tensor new, float scale, int c) -> Tensor");
}
TORCH_LIBRARY_IMPL(openk2_kernels, CPU, m) { m.impl("latent_attention", latent_attention); }
