// RMSNorm for training, forward and backward, in fp32 on x86-64 with AVX2 and FMA (`openk2.model.norm`):
//   rstd[n] = 1 / sqrt(mean_d x[n, d]^2 + eps),  y[n, d] = x[n, d] * rstd[n] * w[d]
//   dx[n, d] = rstd[n] * (g[n, d] w[d] - xhat[n, d] * mean_d(g[n, d] w[d] xhat[n, d])),  xhat = x * rstd
//   dw[d] = sum_n g[n, d] xhat[n, d]
//
// Why: through aten the forward is four passes over the residual stream and the backward six (each product, the
// row and column dot products), each over a tensor that has left the cache. Here a row stays in L1 from its first
// read to its last write: one pass forward, one backward, and the backward takes x (alive anyway as the residual
// stream) instead of a saved x * rstd.
//
// x, g: [N, D] with unit stride along D and any row stride; w: [D] contiguous. The weight gradient sums fixed blocks
// of rows, then the blocks in order: the same numbers on any number of threads.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "tiles.h"

namespace {

using openk2_kernels::hsum;

constexpr int64_t kBlockRows = 64;  // rows per weight-gradient partial sum

void check(const at::Tensor& x, const at::Tensor& w, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.stride(1) == 1,
              "rms_norm: ", what, " must be a 2-D fp32 CPU tensor with unit stride along its last dim, got ", x.sizes(),
              " ", x.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(0) == x.size(1),
              "rms_norm: weight must be a contiguous fp32 [", x.size(1), "], got ", w.sizes());
}

// sum_d a[d] * b[d]
inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  for (; d + 8 <= D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  float total = hsum(_mm256_add_ps(acc0, acc1));
  for (; d < D; ++d) total += a[d] * b[d];
  return total;
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check(x, w, "x");
  const int64_t N = x.size(0), D = x.size(1), ldx = x.stride(0);
  at::Tensor y = at::empty({N, D}, x.options()), rstd = at::empty({N}, x.options());
  const float* x_p = x.data_ptr<float>();
  const float* w_p = w.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  float* r_p = rstd.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, D)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* row = x_p + n * ldx;
      float* out = y_p + n * D;
      const float r = 1.0f / std::sqrt(dot(row, row, D) / static_cast<float>(D) + static_cast<float>(eps));
      r_p[n] = r;
      const __m256 r8 = _mm256_set1_ps(r);
      int64_t d = 0;
      for (; d + 8 <= D; d += 8)
        _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + d), r8), _mm256_loadu_ps(w_p + d)));
      for (; d < D; ++d) out[d] = row[d] * r * w_p[d];
    }
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                      const at::Tensor& rstd, const at::Tensor& w, bool need_dx,
                                                      bool need_dw) {
  check(x, w, "x");
  check(grad, w, "grad");
  TORCH_CHECK(grad.size(0) == x.size(0) && rstd.dim() == 1 && rstd.size(0) == x.size(0) && rstd.is_contiguous(),
              "rms_norm_backward: grad ", grad.sizes(), ", x ", x.sizes(), " and rstd ", rstd.sizes(), " do not match");
  const int64_t N = x.size(0), D = x.size(1), ldx = x.stride(0), ldg = grad.stride(0);
  const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
  // Gradients not asked for come back empty.
  at::Tensor dx = at::empty({need_dx ? N : 0, D}, x.options());
  at::Tensor partial = at::empty({need_dw ? blocks : 0, D}, x.options());
  const float* x_p = x.data_ptr<float>();
  const float* g_p = grad.data_ptr<float>();
  const float* r_p = rstd.data_ptr<float>();
  const float* w_p = w.data_ptr<float>();
  float* dx_p = need_dx ? dx.data_ptr<float>() : nullptr;
  float* part_p = need_dw ? partial.data_ptr<float>() : nullptr;
  const float inv_D = 1.0f / static_cast<float>(D);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* part = need_dw ? part_p + b * D : nullptr;
      if (need_dw) std::fill_n(part, D, 0.0f);
      for (int64_t n = b * kBlockRows; n < std::min(N, (b + 1) * kBlockRows); ++n) {
        const float* xr = x_p + n * ldx;
        const float* gr = g_p + n * ldg;
        const float r = r_p[n];
        const __m256 r8 = _mm256_set1_ps(r);
        if (need_dx) {
          // mean(g w xhat) = r * mean(g w x)
          __m256 acc = _mm256_setzero_ps();
          int64_t d = 0;
          for (; d + 8 <= D; d += 8)
            acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(gr + d), _mm256_loadu_ps(w_p + d)),
                                  _mm256_loadu_ps(xr + d), acc);
          float gwx = hsum(acc);
          for (; d < D; ++d) gwx += gr[d] * w_p[d] * xr[d];
          const float minus_mean = -gwx * r * inv_D;
          const __m256 mm8 = _mm256_set1_ps(minus_mean);
          float* out = dx_p + n * D;
          for (d = 0; d + 8 <= D; d += 8) {
            const __m256 xhat = _mm256_mul_ps(_mm256_loadu_ps(xr + d), r8);
            const __m256 gw = _mm256_mul_ps(_mm256_loadu_ps(gr + d), _mm256_loadu_ps(w_p + d));
            _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_fmadd_ps(xhat, mm8, gw), r8));
          }
          for (; d < D; ++d) out[d] = (gr[d] * w_p[d] + xr[d] * r * minus_mean) * r;
        }
        if (need_dw) {
          int64_t d = 0;
          for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(part + d, _mm256_fmadd_ps(_mm256_loadu_ps(gr + d),
                                                       _mm256_mul_ps(_mm256_loadu_ps(xr + d), r8),
                                                       _mm256_loadu_ps(part + d)));
          for (; d < D; ++d) part[d] += gr[d] * (xr[d] * r);
        }
      }
    }
  });
  at::Tensor dw = at::zeros({need_dw ? D : 0}, x.options());
  if (need_dw) {
    float* dw_p = dw.data_ptr<float>();
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t d = 0; d < D; ++d) dw_p[d] += part_p[b * D + d];
  }
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor rstd, Tensor w, bool need_dx, bool need_dw) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(openk2_kernels, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rms_norm_backward", rms_norm_backward);
}
