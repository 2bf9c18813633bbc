// SwiGLU's elementwise part for training, forward and backward, in fp32 on x86-64 with AVX2 and FMA:
//   h = silu(gate) * up,  silu(g) = g * sigmoid(g)
//   d_gate = grad * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  d_up = grad * silu(g)
// (aten's silu and silu_backward formulas).
//
// Why: through aten the forward is two passes over [S, F] tensors (silu, mul) and the backward three (mul,
// silu_backward, mul) with two temporaries; here each is one pass, and the backward recomputes the sigmoid from the
// saved gate instead of reading a saved silu (`moe._SwiGLUHalves`, `moe.MLP`).
//
// gate, up, grad: [S, F] with unit stride along F and any row stride (the halves of a fused gate-up product's
// output); the forward returns h [S, F] contiguous, the backward writes d_gate and d_up (same layout rules).
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "tiles.h"

namespace {

using openk2_kernels::exp8;
using openk2_kernels::swiglu_row;

// sigmoid(g) for 8 lanes: 1 / (1 + exp(-g)).
inline __m256 sigmoid8(__m256 g) {
  return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f),
                                                           exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.device().is_cpu(), "swiglu: ", name,
              " must be a 2-D fp32 CPU tensor, got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "swiglu: ", name, " has shape ", t.sizes(), ", gate ", like.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "swiglu: ", name, " needs unit stride along its last dim");
}

// Rows [r0, r1) of fn(row), rows split over torch's threads, each thread at least ~16k elements.
template <class Fn>
void over_rows(int64_t S, int64_t F, const Fn& fn) {
  at::parallel_for(0, S, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, F)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r);
  });
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, gate, "gate");
  check_rows(up, gate, "up");
  const int64_t S = gate.size(0), F = gate.size(1), ldg = gate.stride(0), ldu = up.stride(0);
  at::Tensor h = at::empty({S, F}, gate.options());
  const float* g_p = gate.data_ptr<float>();
  const float* u_p = up.data_ptr<float>();
  float* h_p = h.data_ptr<float>();
  over_rows(S, F, [&](int64_t r) { swiglu_row(g_p + r * ldg, u_p + r * ldu, h_p + r * F, F, 1.0f); });
  return h;
}

void swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                     const at::Tensor& grad_gate, const at::Tensor& grad_up) {
  check_rows(gate, gate, "gate");
  for (const auto& [t, name] : {std::pair{&grad, "grad"}, {&up, "up"}, {&grad_gate, "grad_gate"},
                                {&grad_up, "grad_up"}})
    check_rows(*t, gate, name);
  const int64_t S = gate.size(0), F = gate.size(1);
  const int64_t ld_dh = grad.stride(0), ldg = gate.stride(0), ldu = up.stride(0), ld_dg = grad_gate.stride(0),
                ld_du = grad_up.stride(0);
  const float* dh_p = grad.data_ptr<float>();
  const float* g_p = gate.data_ptr<float>();
  const float* u_p = up.data_ptr<float>();
  float* dg_p = grad_gate.data_ptr<float>();
  float* du_p = grad_up.data_ptr<float>();
  over_rows(S, F, [&](int64_t r) {
    const float* dh = dh_p + r * ld_dh;
    const float* g = g_p + r * ldg;
    const float* u = u_p + r * ldu;
    float* dg = dg_p + r * ld_dg;
    float* du = du_p + r * ld_du;
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= F; i += 8) {
      const __m256 g8 = _mm256_loadu_ps(g + i), dh8 = _mm256_loadu_ps(dh + i);
      const __m256 s8 = sigmoid8(g8);
      // sigmoid * (1 + g * (1 - sigmoid))
      const __m256 dsilu8 = _mm256_mul_ps(s8, _mm256_fmadd_ps(g8, _mm256_sub_ps(one, s8), one));
      _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(dh8, _mm256_loadu_ps(u + i)), dsilu8));
      _mm256_storeu_ps(du + i, _mm256_mul_ps(dh8, _mm256_mul_ps(g8, s8)));
    }
    for (; i < F; ++i) {
      const float s = 1.0f / (1.0f + std::exp(-g[i]));
      dg[i] = dh[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
      du[i] = dh[i] * (g[i] * s);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2_kernels, m) {
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up, Tensor(a!) grad_gate, Tensor(b!) grad_up) -> ()");
}
TORCH_LIBRARY_IMPL(openk2_kernels, CPU, m) {
  m.impl("swiglu", swiglu);
  m.impl("swiglu_backward", swiglu_backward);
}
