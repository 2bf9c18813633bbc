// Softmax attention under a boolean mask, forward only, in fp32 on x86-64 with AVX2 and FMA: a cached prefill's
// attention in the expanded MLA form (`attention.MLA._expanded_cached`).
//
// Why: as batched matmuls (`attention.blocked_masked_attention`, which stays the reference) a prefill's attention
// runs at a fifth of the host's fp32 peak: with heads of 48-96 dims each product is small, and the scores make
// five passes through memory (bias, product, softmax, copy, product). Here a block of 6 query rows scores its keys
// in registers (6 rows x 16 keys per step, outer products over the head dim against keys packed once per
// head), exponentiates 8 at a time and sums the values with the rows' probabilities from L1.
//
// For each batch row b, head h and query t:
//   s = scale * q[b, h, t] . k[b, h, :]   (-inf where !mask[b, t, :]),   out[b, h, t] = softmax(s) @ v[b, h]
// A row that sees no key gets zeros. The keys past the last one any row of a block may see are never read: a causal
// prefill computes half the score matrix.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "attention_tiles.h"
#include "tiles.h"
#include "work_split.h"

namespace {

using openk2_kernels::exp_sum;
using openk2_kernels::kKeyStep;
using openk2_kernels::pack_key_panels;
using openk2_kernels::mask_scale_max;
using openk2_kernels::parallel_by_work;
using openk2_kernels::scores_rows;
using openk2_kernels::weighted_values_rows;

// Query rows per block: the scores' register tile is 6 rows x 16 keys (12 accumulators).
constexpr int kRows = 6;
// A thread's share is at least this many multiply-adds: less is not worth a fork (as in few_rows.cpp).
constexpr int64_t kMinFmasPerThread = 1 << 16;

// Masks a row's scores, exponentiates them in place (minus the row's max) and returns 1 / their sum (0 when the
// row sees no key).
float softmax_row(float* p, const bool* mask, int64_t S, float scale) {
  const float top = mask_scale_max(p, mask, S, scale);
  if (top == -std::numeric_limits<float>::infinity()) {
    std::fill_n(p, S, 0.0f);
    return 0.0f;
  }
  return 1.0f / exp_sum(p, S, top);
}

// One unit of work: query rows [t0, t0 + rows) of head h of batch row b, against keys [0, keys).
struct Block {
  int64_t b, h, t0, rows, keys;
};

at::Tensor masked_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4 && mask_in.dim() == 3,
              "masked_attention: expected q [B, H, T, Q], k [B, H, S, Q], v [B, H, S, V], mask [B, T, S]");
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), Q = q_in.size(3), S = k_in.size(2),
                V = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == Q && v_in.size(0) == B &&
                  v_in.size(1) == H && v_in.size(2) == S && mask_in.size(0) == B && mask_in.size(1) == T &&
                  mask_in.size(2) == S,
              "masked_attention: shapes do not match: q ", q_in.sizes(), ", k ", k_in.sizes(), ", v ", v_in.sizes(),
              ", mask ", mask_in.sizes());
  for (const at::Tensor* t : {&q_in, &k_in, &v_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_cpu(), "masked_attention: fp32 CPU tensors only");
  TORCH_CHECK(mask_in.scalar_type() == at::kBool, "masked_attention: mask must be bool");
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor out = at::empty({B, H, T, V}, q.options());
  if (out.numel() == 0) return out;
  const bool* mask_p = mask.data_ptr<bool>();

  // The last key each query row sees, + 1 (0: none); a block reads keys up to its rows' largest.
  std::vector<int64_t> seen(B * T);
  at::parallel_for(0, B * T, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const bool* row = mask_p + i * S;
      int64_t s = S;
      while (s > 0 && !row[s - 1]) --s;
      seen[i] = s;
    }
  });
  std::vector<Block> blocks;
  bool skipped = false;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t0 = 0; t0 < T; t0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, T - t0);
      const int64_t keys = *std::max_element(seen.begin() + b * T + t0, seen.begin() + b * T + t0 + rows);
      if (keys == 0) {
        skipped = true;
        continue;
      }
      for (int64_t h = 0; h < H; ++h) blocks.push_back({b, h, t0, rows, keys});
    }
  // Rows that see no key are zeros; every other row is written by its block.
  if (skipped) out.zero_();

  // Keys in panels of 16 per head (`pack_key_panels`, S padded with zero keys): a score tile reads one panel.
  const int64_t ldk = (S + kKeyStep - 1) / kKeyStep * kKeyStep;
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  at::Tensor panels = at::empty({B * H, ldk * Q}, q.options());
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      pack_key_panels(k.data_ptr<float>() + i / H * k.stride(0) + i % H * k.stride(1), k.stride(2), S, Q,
                      panels.data_ptr<float>() + i * ldk * Q);
  });

  // Threads take runs of blocks of about equal multiply-adds (a causal block's grow with its keys).
  std::vector<int64_t> work_end(blocks.size());
  int64_t total = 0;
  for (size_t i = 0; i < blocks.size(); ++i) work_end[i] = (total += blocks[i].rows * blocks[i].keys * (Q + V));
  const float* q_p = q.data_ptr<float>();
  const float* panels_p = panels.data_ptr<float>();
  const float* v_p = v.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  parallel_by_work(work_end, kMinFmasPerThread, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(kRows * ldk);
    std::vector<float> inv(kRows);
    for (int64_t i = i0; i < i1; ++i) {
      const auto [b, h, t0, rows, keys] = blocks[i];
      const int64_t keys_padded = (keys + kKeyStep - 1) / kKeyStep * kKeyStep;
      const float* q_r = q_p + b * q.stride(0) + h * q.stride(1) + t0 * q.stride(2);
      const float* panels_h = panels_p + (b * H + h) * ldk * Q;
      scores_rows(static_cast<int>(rows), q_r, q.stride(2), panels_h, Q, keys_padded, p.data(), ldk);
      for (int64_t r = 0; r < rows; ++r)
        inv[r] = softmax_row(p.data() + r * ldk, mask_p + (b * T + t0 + r) * S, keys, sc);
      float* out_r = out_p + ((b * H + h) * T + t0) * V;
      weighted_values_rows(static_cast<int>(rows), p.data(), ldk, 1, v_p + b * v.stride(0) + h * v.stride(1),
                           v.stride(2), keys, V, out_r, V);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < V; ++c) out_r[r * V + c] *= inv[r];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openk2_kernels, m) {
  m.def("masked_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(openk2_kernels, CPU, m) { m.impl("masked_attention", masked_attention); }
