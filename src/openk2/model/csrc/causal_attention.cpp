// Causal softmax attention for training, forward and backward, in fp32 on x86-64 with AVX2 and FMA: the expanded
// MLA form of a training step (`attention.MLA.forward` without a cache).
//
// Why: as batched matmuls (`attention.blocked_causal_attention`, which stays the reference) MLA's small heads (48
// query-key and 32 value dims on the bench configs) run each product at half the host's fp32 peak, and the scores
// pass through memory several times a step (bias, product, softmax, its backward, four more products). Here one
// head at a time runs in a thread's cache: a block of 6 query rows scores its keys in registers against keys packed
// once per head (`attention_tiles.h`, as the cached prefill's `masked_attention`), exponentiates 8 at a time and
// sums the values; the backward recomputes the probabilities from the forward's log-sum-exp (FlashAttention's
// recipe), keeps the head's [T, T] probabilities and score gradients in the thread's scratch, and reads them along
// rows for the queries' gradients and along columns for the keys' and values'. The upper-right (future) keys are
// never read.
//
// For each batch row b, head h and query t (s <= t):
//   p[t, s] = softmax_s(scale * q[t] . k[s]),  out[t] = sum_s p[t, s] v[s],  lse[t] = log sum_s exp(scale q[t].k[s])
// and the head's largest logit, max_{t, s} scale * q[t] . k[s] (QK-Clip's input, free here).
// Backward, with D[t] = dout[t] . out[t] and ds[t, s] = p[t, s] (dout[t] . v[s] - D[t]):
//   dq[t] = scale sum_s ds[t, s] k[s],  dk[s] = scale sum_t ds[t, s] q[t],  dv[s] = sum_t p[t, s] dout[t]
// q, k, v, dout: [B, H, T, *] with unit stride along the last dim. out, dq, dk, dv are laid out [B, T, H, *] (views
// [B, H, T, *]), as the output projection reads them and the input projections' gradients are assembled.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include "attention_tiles.h"
#include "tiles.h"

namespace {

using openk2_kernels::exp8;
using openk2_kernels::exp_sum;
using openk2_kernels::hmax;
using openk2_kernels::hsum;
using openk2_kernels::kKeyStep;
using openk2_kernels::pack_key_panels;
using openk2_kernels::scores_rows;
using openk2_kernels::weighted_values_rows;

// Query rows per block: the scores' register tile is 6 rows x 16 keys (12 accumulators).
constexpr int64_t kRows = 6;

int64_t padded_keys(int64_t n) { return (n + kKeyStep - 1) / kKeyStep * kKeyStep; }

// p[s] = scale * p[s] for s < n; returns their max.
float scale_max(float* p, int64_t n, float scale) {
  const __m256 scale_v = _mm256_set1_ps(scale);
  __m256 top_v = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 x = _mm256_mul_ps(scale_v, _mm256_loadu_ps(p + s));
    _mm256_storeu_ps(p + s, x);
    top_v = _mm256_max_ps(top_v, x);
  }
  float top = hmax(top_v);
  for (; s < n; ++s) top = std::max(top, p[s] *= scale);
  return top;
}

// p[s] = exp(scale * p[s] - shift) for s < n (the forward's probabilities again, from its log-sum-exp).
void exp_scaled(float* p, int64_t n, float scale, float shift) {
  const __m256 scale_v = _mm256_set1_ps(scale), shift_v = _mm256_set1_ps(shift);
  int64_t s = 0;
  for (; s + 8 <= n; s += 8)
    _mm256_storeu_ps(p + s, exp8(_mm256_fmsub_ps(scale_v, _mm256_loadu_ps(p + s), shift_v)));
  for (; s < n; ++s) p[s] = std::exp(scale * p[s] - shift);
}

// ds[s] = p[s] * (ds[s] - d) for s < n (ds holds dout . v[s] on entry).
void score_grads(const float* p, float* ds, int64_t n, float d) {
  const __m256 d_v = _mm256_set1_ps(d);
  int64_t s = 0;
  for (; s + 8 <= n; s += 8)
    _mm256_storeu_ps(ds + s, _mm256_mul_ps(_mm256_loadu_ps(p + s), _mm256_sub_ps(_mm256_loadu_ps(ds + s), d_v)));
  for (; s < n; ++s) ds[s] = p[s] * (ds[s] - d);
}

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void scale_rows(float* x, int64_t rows, int64_t ld, int64_t n, float scale) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) x[r * ld + c] *= scale;
}

// A [B, H, T, *] view of a new [B, T, H, *] tensor.
at::Tensor heads_view_of_rows(int64_t B, int64_t H, int64_t T, int64_t n, const at::TensorOptions& options) {
  return at::empty({B, T, H, n}, options).transpose(1, 2);
}

void check_operands(const char* name, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, name, ": expected q, k [B, H, T, Q] and v [B, H, T, V]");
  TORCH_CHECK(k.sizes() == q.sizes() && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              name, ": shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_cpu(), name, ": fp32 CPU tensors only");
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                const at::Tensor& v_in, double scale) {
  check_operands("causal_attention", q_in, k_in, v_in);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Q = q.size(3), V = v.size(3);
  at::Tensor out = heads_view_of_rows(B, H, T, V, q.options());
  at::Tensor lse = at::empty({B, H, T}, q.options());
  at::Tensor max_logit = at::full({B, H}, -std::numeric_limits<float>::infinity(), q.options());
  if (out.numel() == 0) return {out, lse, max_logit};
  const int64_t Tp = padded_keys(T);
  // Per thread: the head's key panels and one block's scores.
  const int64_t per_thread = Tp * Q + kRows * Tp;
  at::Tensor scratch = at::empty({at::get_num_threads(), per_thread}, q.options());
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    float* panels = scratch.data_ptr<float>() + at::get_thread_num() * per_thread;
    float* p = panels + Tp * Q;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const float* q_h = q.data_ptr<float>() + b * q.stride(0) + h * q.stride(1);
      const float* v_h = v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1);
      float* out_h = out.data_ptr<float>() + b * out.stride(0) + h * out.stride(1);
      float* lse_h = lse.data_ptr<float>() + i * T;
      float head_max = -std::numeric_limits<float>::infinity();
      pack_key_panels(k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1), k.stride(2), T, Q, panels);
      for (int64_t t0 = 0; t0 < T; t0 += kRows) {
        const int64_t rows = std::min(kRows, T - t0), keys = t0 + rows;
        scores_rows(static_cast<int>(rows), q_h + t0 * q.stride(2), q.stride(2), panels, Q, padded_keys(keys), p, Tp);
        float inv[kRows];
        for (int64_t r = 0; r < rows; ++r) {
          float* p_r = p + r * Tp;
          const int64_t seen = t0 + r + 1;
          const float top = scale_max(p_r, seen, sc);
          head_max = std::max(head_max, top);
          const float total = exp_sum(p_r, seen, top);
          std::fill(p_r + seen, p_r + keys, 0.0f);
          inv[r] = 1.0f / total;
          lse_h[t0 + r] = top + std::log(total);
        }
        float* out_r = out_h + t0 * out.stride(2);
        weighted_values_rows(static_cast<int>(rows), p, Tp, 1, v_h, v.stride(2), keys, V, out_r, out.stride(2));
        for (int64_t r = 0; r < rows; ++r) scale_rows(out_r + r * out.stride(2), 1, 0, V, inv[r]);
      }
      max_logit.data_ptr<float>()[i] = head_max;
    }
  });
  return {out, lse, max_logit};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  check_operands("causal_attention_backward", q_in, k_in, v_in);
  TORCH_CHECK(dout_in.sizes() == v_in.sizes() && out_in.sizes() == v_in.sizes() &&
                  lse_in.sizes() == q_in.sizes().slice(0, 3),
              "causal_attention_backward: dout and out must be [B, H, T, V], lse [B, H, T]");
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in),
                   dout = unit_last_stride(dout_in), out = unit_last_stride(out_in), lse = lse_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Q = q.size(3), V = v.size(3);
  at::Tensor dq = heads_view_of_rows(B, H, T, Q, q.options()), dk = heads_view_of_rows(B, H, T, Q, q.options()),
             dv = heads_view_of_rows(B, H, T, V, q.options());
  if (dq.numel() == 0 || V == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }
  const int64_t Tp = padded_keys(T);
  // Per thread: key and value panels, the head's probabilities and score gradients [T, Tp], D [T].
  const int64_t per_thread = Tp * (Q + V) + 2 * T * Tp + T;
  at::Tensor scratch = at::empty({at::get_num_threads(), per_thread}, q.options());
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    float* k_panels = scratch.data_ptr<float>() + at::get_thread_num() * per_thread;
    float* v_panels = k_panels + Tp * Q;
    float* p = v_panels + Tp * V;
    float* ds = p + T * Tp;
    float* d = ds + T * Tp;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const auto at_head = [&](const at::Tensor& t) { return t.data_ptr<float>() + b * t.stride(0) + h * t.stride(1); };
      const float *q_h = at_head(q), *k_h = at_head(k), *v_h = at_head(v), *dout_h = at_head(dout),
                  *out_h = at_head(out), *lse_h = lse.data_ptr<float>() + i * T;
      float *dq_h = at_head(dq), *dk_h = at_head(dk), *dv_h = at_head(dv);
      const int64_t ldq = q.stride(2), ldo = dout.stride(2), ldq_grad = dq.stride(2), ldv_grad = dv.stride(2);
      pack_key_panels(k_h, k.stride(2), T, Q, k_panels);
      pack_key_panels(v_h, v.stride(2), T, V, v_panels);
      for (int64_t t = 0; t < T; ++t) d[t] = dot(dout_h + t * ldo, out_h + t * out.stride(2), V);
      // Rows of p and ds, and the queries' gradients, one block of query rows at a time. Row t is written up to
      // its block's padded key count, zeros past t: the column pass below reads rows t >= its keys' block, whose
      // padded key counts reach past those keys.
      for (int64_t t0 = 0; t0 < T; t0 += kRows) {
        const int64_t rows = std::min(kRows, T - t0), keys = t0 + rows, width = padded_keys(keys);
        float *p_r = p + t0 * Tp, *ds_r = ds + t0 * Tp;
        scores_rows(static_cast<int>(rows), q_h + t0 * ldq, ldq, k_panels, Q, width, p_r, Tp);
        scores_rows(static_cast<int>(rows), dout_h + t0 * ldo, ldo, v_panels, V, width, ds_r, Tp);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t seen = t0 + r + 1;
          exp_scaled(p_r + r * Tp, seen, sc, lse_h[t0 + r]);
          std::fill(p_r + r * Tp + seen, p_r + r * Tp + width, 0.0f);
          score_grads(p_r + r * Tp, ds_r + r * Tp, width, d[t0 + r]);
        }
        float* dq_r = dq_h + t0 * ldq_grad;
        weighted_values_rows(static_cast<int>(rows), ds_r, Tp, 1, k_h, k.stride(2), keys, Q, dq_r, ldq_grad);
        scale_rows(dq_r, rows, ldq_grad, Q, sc);
      }
      // Columns: keys s0..s0 + rows - 1 against the queries t >= s0 (p and ds are zero where t < s).
      for (int64_t s0 = 0; s0 < T; s0 += kRows) {
        const int64_t rows = std::min(kRows, T - s0);
        weighted_values_rows(static_cast<int>(rows), p + s0 * Tp + s0, 1, Tp, dout_h + s0 * ldo, ldo, T - s0, V,
                             dv_h + s0 * ldv_grad, ldv_grad);
        float* dk_r = dk_h + s0 * ldq_grad;
        weighted_values_rows(static_cast<int>(rows), ds + s0 * Tp + s0, 1, Tp, q_h + s0 * ldq, ldq, T - s0, Q, dk_r,
                             ldq_grad);
        scale_rows(dk_r, rows, ldq_grad, Q, sc);
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2_kernels, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(openk2_kernels, CPU, m) {
  m.impl("causal_attention", causal_attention);
  m.impl("causal_attention_backward", causal_attention_backward);
}
