// A transposed fp32 matrix made contiguous, in 8 x 8 register blocks over torch's intra-op threads.
//
// Why: oneDNN's products copy a transposed left operand contiguous before they start, and a training step hands
// them one in every weight gradient (`matmul._weight_grad`: a.T @ grad, or (grad.T @ a).T). aten's copy of a
// transpose runs on one thread through 60 x 60 scalar blocks: a [2048, 128] gradient took 0.19 ms alone (a plain
// copy of it 0.03 ms) and ~0.4 ms inside a step, ~15 ms of a config-A training step in all (docs/benchmarks.md).
//
// x: [R, C] with unit stride along R (x = base.T, base [C, >= R] with unit stride along its rows); returns x
// contiguous. Any other layout is left to aten (`x.contiguous()`).
#include <immintrin.h>

#include <algorithm>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

// dst[i, j] = src[j, i] for an 8 x 8 block: src rows ld_src apart, dst rows ld_dst apart.
inline void transpose_8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));      // a0 b0 c0 d0 | a4 b4 c4 d4
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));  // a1 b1 c1 d1 | a5 ...
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

at::Tensor transpose_copy(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "transpose_copy: a 2-D fp32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t R = x.size(0), C = x.size(1), ld = x.stride(1);
  if (x.stride(0) != 1 || x.is_contiguous() || R == 0 || C == 0) return x.contiguous();
  at::Tensor out = at::empty({R, C}, x.options());
  const float* src = x.data_ptr<float>();  // element (r, c) at src[r + c * ld]
  float* dst = out.data_ptr<float>();
  // Blocks of 16 output rows: each source row contributes a whole 64-byte line. Threads take whole blocks, at
  // least ~32k elements each.
  constexpr int64_t kRows = 16;
  const int64_t blocks = (R + kRows - 1) / kRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 15) / (kRows * C)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRows, r1 = std::min(R, r0 + kRows);
      int64_t c = 0;
      if (r1 - r0 == kRows) {
        for (; c + 8 <= C; c += 8) {
          transpose_8x8(src + r0 + c * ld, ld, dst + r0 * C + c, C);
          transpose_8x8(src + r0 + 8 + c * ld, ld, dst + (r0 + 8) * C + c, C);
        }
      }
      for (int64_t r = r0; r < r1; ++r)  // the tails: last columns, a last partial block of rows
        for (int64_t cc = c; cc < C; ++cc) dst[r * C + cc] = src[r + cc * ld];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2_kernels, m) { m.def("transpose_copy(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(openk2_kernels, CPU, m) { m.impl("transpose_copy", transpose_copy); }
