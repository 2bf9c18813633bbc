// y = x @ w.T for a few rows of x (decode: one row per sequence) in fp32 on x86-64 with AVX2 and FMA.
//
// Why: at 1-8 rows a product reads each weight element once and does 2-16 FLOPs with it, so it should run at the
// memory bandwidth (large weights) or the FMA peak (8 rows). oneDNN's and MKL's GEMMs, tuned for many rows, stream
// the weight at a third to a half of that at 8 rows (docs/benchmarks.md, "Few-row products"); llama.cpp's kernels
// do not. Here every weight row is loaded once per block of 4 input rows and used for all of them from registers.
//
// Layout: x [M, K] and w [N, K] with unit stride along K (nn.Linear's weight as it is); y [M, N] contiguous.
// Threads: the weight's rows are split over torch's intra-op pool (at::parallel_for, torch's own OpenMP).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "tiles.h"
#include "work_split.h"

namespace {

using openk2_kernels::exp8;
using openk2_kernels::parallel_by_work;
using openk2_kernels::swiglu_row;
using openk2_kernels::tile;

// All M rows of x against NR rows of w, 4 input rows at a time; the first block of input rows prefetches the next
// weight rows (the later blocks find these rows in L1). Prefetching pays whatever the weight's size: a decode step
// streams every weight of a model larger than the last-level cache from DRAM, small ones included (config A's
// 128 x 256 weights at 8 rows: 15 vs 22 us cold, 2 threads; the step 1.035x; docs/benchmarks.md). A weight already
// in cache pays 3-7% for the prefetches. One input row streams at the bandwidth without them.
template <int NR>
inline void rows_tile(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t K, float* y,
                      int64_t ldy) {
  int64_t m = 0;
  if (M >= 4) {
    tile<4, NR, true>(x, ldx, w, ldw, K, y, ldy);
    for (m = 4; m + 4 <= M; m += 4) tile<4, NR>(x + m * ldx, ldx, w, ldw, K, y + m * ldy, ldy);
  }
  const bool first = m == 0;
  switch (M - m) {
    case 3:
      if (first) tile<3, NR, true>(x, ldx, w, ldw, K, y, ldy);
      else tile<3, NR>(x + m * ldx, ldx, w, ldw, K, y + m * ldy, ldy);
      break;
    case 2:
      if (first) tile<2, NR, true>(x, ldx, w, ldw, K, y, ldy);
      else tile<2, NR>(x + m * ldx, ldx, w, ldw, K, y + m * ldy, ldy);
      break;
    case 1: tile<1, NR>(x + m * ldx, ldx, w, ldw, K, y + m * ldy, ldy); break;
    default: break;
  }
}

// At one input row, weight rows of up to this many floats (1 KiB) are read one after another, a single linear stream:
// 8 rows at a time are 8 streams of 16 cache lines each, too short for the hardware prefetcher to ramp up. Cold
// (2 threads, AMD EPYC): 8192 x 256 (config A's LM head) 440 vs 560-630 us, 1536 x 128 53 vs 65 us; at 1,024 floats
// and more, 8 rows at a time stream faster (1032 x 1024: 212 vs 240 us). Config A's batch-1 decode: 1.13x. Each
// output is the same single-accumulator sum either way.
constexpr int64_t kShortRowFloats = 256;

// Weight rows [n0, n1) for all M rows of x.
void rows_range(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t K, float* y,
                int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (M == 1 && K <= kShortRowFloats) {  // bandwidth-bound: one linear stream of short rows
    for (; n < n1; ++n) tile<1, 1>(x, ldx, w + n * ldw, ldw, K, y + n, ldy);
  } else if (M == 1) {  // bandwidth-bound: 8 weight rows in flight, one accumulator each
    for (; n + 8 <= n1; n += 8) tile<1, 8>(x, ldx, w + n * ldw, ldw, K, y + n, ldy);
  } else {
    for (; n + 3 <= n1; n += 3) rows_tile<3>(x, ldx, M, w + n * ldw, ldw, K, y + n, ldy);
  }
  for (; n < n1; ++n) rows_tile<1>(x, ldx, M, w + n * ldw, ldw, K, y + n, ldy);
}

// Weight rows per unit of work: a multiple of both tile widths (8 and 3).
constexpr int64_t kBlockRows = 24;
// A thread's share of a product is at least this many multiply-adds (one input row against 256 KiB of weight):
// below that, forking costs more. Counted in multiply-adds, not weight elements: at 8 rows a 128 x 256 weight is
// worth both threads (config A's decode step at batch 8: 1.07x).
constexpr int64_t kMinFmasPerThread = 1 << 16;

at::Tensor few_rows_mm(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1),
              "few_rows_mm: expected x [M, K] and w [N, K], got ", x_in.sizes(), " and ", w_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat && x_in.is_cpu() && w_in.is_cpu(),
              "few_rows_mm: fp32 CPU tensors only");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor w = w_in.stride(1) == 1 ? w_in : w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* x_p = x.data_ptr<float>();
  const float* w_p = w.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldw = w.stride(0);
  const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
  const int64_t grain = std::max<int64_t>(1, kMinFmasPerThread / std::max<int64_t>(1, kBlockRows * K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    rows_range(x_p, ldx, M, w_p, ldw, K, y_p, N, b0 * kBlockRows, std::min(N, b1 * kBlockRows));
  });
  return y;
}

// A weight-row block of one expert: the unit of work of the routed experts' products.
struct ExpertBlock {
  int64_t expert, n0, n1;
};

std::vector<ExpertBlock> expert_blocks(const std::vector<int64_t>& experts, int64_t rows) {
  std::vector<ExpertBlock> blocks;
  for (int64_t e : experts)
    for (int64_t n = 0; n < rows; n += kBlockRows) blocks.push_back({e, n, std::min(rows, n + kBlockRows)});
  return blocks;
}

// Reading a weight element from L3 or DRAM takes about as long as this many multiply-adds (one thread's share of
// ~18 GB/s against ~14 G multiply-adds/s, AMD EPYC): below this many rows an expert's block costs its weight bytes.
constexpr int64_t kFmasPerWeightRead = 8;

// Running sums of the blocks' costs in multiply-adds: the block's weight elements (rows x K) times its expert's
// input rows, or the time to read them, whichever is more.
std::vector<int64_t> work_ends(const std::vector<ExpertBlock>& blocks, const std::vector<int64_t>& count,
                               int64_t K) {
  std::vector<int64_t> ends(blocks.size());
  int64_t total = 0;
  for (size_t b = 0; b < blocks.size(); ++b)
    ends[b] = (total += (blocks[b].n1 - blocks[b].n0) * K * std::max(count[blocks[b].expert], kFmasPerWeightRead));
  return ends;
}

// The routed experts of a few tokens: y[t] = sum_k gates[t, k] * expert_{ids[t, k]}(x[t]), where expert e is
// down_e @ (silu(gate_e @ x) * (up_e @ x)). Slots are grouped by expert, so each chosen expert's three matrices
// are read once for all the tokens that chose it, at the few-row kernel's speed; the threads split the chosen
// experts' weight rows (one pass for gate and up, one for down). Sums over a token's experts run in a fixed
// order (by expert), so the result does not depend on the thread count.
at::Tensor few_rows_experts(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& gates_in,
                            const at::Tensor& gate_w_in, const at::Tensor& up_w_in, const at::Tensor& down_w_in) {
  TORCH_CHECK(x_in.dim() == 2 && ids_in.dim() == 2 && gates_in.sizes() == ids_in.sizes() &&
                  ids_in.size(0) == x_in.size(0),
              "few_rows_experts: expected x [T, D], ids and gates [T, K]");
  TORCH_CHECK(gate_w_in.dim() == 3 && up_w_in.sizes() == gate_w_in.sizes() && down_w_in.dim() == 3 &&
                  down_w_in.size(0) == gate_w_in.size(0) && down_w_in.size(1) == gate_w_in.size(2) &&
                  down_w_in.size(2) == gate_w_in.size(1) && gate_w_in.size(2) == x_in.size(1),
              "few_rows_experts: expected gate_w, up_w [E, F, D] and down_w [E, D, F]");
  for (const at::Tensor* t : {&x_in, &gate_w_in, &up_w_in, &down_w_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_cpu(), "few_rows_experts: fp32 CPU tensors only");
  const at::Tensor x = x_in.contiguous(), gate_w = gate_w_in.contiguous(), up_w = up_w_in.contiguous(),
                   down_w = down_w_in.contiguous();
  const at::Tensor ids = ids_in.to(at::kLong).contiguous(), gates = gates_in.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), D = x.size(1), K = ids.size(1), E = gate_w.size(0), F = gate_w.size(1);
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const float* gates_p = gates.data_ptr<float>();

  // Slots grouped by expert, in expert order, each expert's rows contiguous from row_start[e].
  std::vector<int64_t> count(E, 0);
  for (int64_t s = 0; s < T * K; ++s) {
    TORCH_CHECK(ids_p[s] >= 0 && ids_p[s] < E, "few_rows_experts: expert id ", ids_p[s], " out of range");
    ++count[ids_p[s]];
  }
  std::vector<int64_t> row_start(E + 1, 0), experts;
  for (int64_t e = 0; e < E; ++e) {
    row_start[e + 1] = row_start[e] + count[e];
    if (count[e]) experts.push_back(e);
  }
  std::vector<int64_t> token_of_row(T * K), row_of_slot(T * K), fill(row_start.begin(), row_start.end() - 1);
  std::vector<float> gate_of_row(T * K);
  for (int64_t s = 0; s < T * K; ++s) {
    const int64_t r = fill[ids_p[s]]++;
    row_of_slot[s] = r;
    token_of_row[r] = s / K;
    gate_of_row[r] = gates_p[s];
  }
  const int64_t R = T * K;
  at::Tensor x_rows = at::empty({R, D}, x.options()), h_rows = at::empty({R, 2 * F}, x.options()),
             y_rows = at::empty({R, D}, x.options());
  const float* x_p = x.data_ptr<float>();
  float* xr_p = x_rows.data_ptr<float>();
  float* hr_p = h_rows.data_ptr<float>();
  float* yr_p = y_rows.data_ptr<float>();
  const int64_t copy_grain = std::max<int64_t>(1, kMinFmasPerThread / D);
  at::parallel_for(0, R, copy_grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::copy_n(x_p + token_of_row[r] * D, D, xr_p + r * D);
  });

  const float* gw_p = gate_w.data_ptr<float>();
  const float* uw_p = up_w.data_ptr<float>();
  const float* dw_p = down_w.data_ptr<float>();
  // gate and up: h_rows[:, :F] = gate, h_rows[:, F:] = up, then h = silu(gate) * up * the slot's gate weight.
  // Threads split each pass by cost, not block count: at a prefill an expert's blocks weigh as many as its rows.
  const std::vector<ExpertBlock> up_blocks = expert_blocks(experts, F);
  parallel_by_work(work_ends(up_blocks, count, 2 * D), kMinFmasPerThread, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto [e, n0, n1] = up_blocks[b];
      const int64_t r0 = row_start[e], M = count[e];
      rows_range(xr_p + r0 * D, D, M, gw_p + e * F * D, D, D, hr_p + r0 * 2 * F, 2 * F, n0, n1);
      rows_range(xr_p + r0 * D, D, M, uw_p + e * F * D, D, D, hr_p + r0 * 2 * F + F, 2 * F, n0, n1);
      for (int64_t r = r0; r < r0 + M; ++r)
        swiglu_row(hr_p + r * 2 * F + n0, hr_p + r * 2 * F + F + n0, hr_p + r * 2 * F + n0, n1 - n0,
                   gate_of_row[r]);
    }
  });
  // down: y_rows = h @ down_e.T per expert.
  const std::vector<ExpertBlock> down_blocks = expert_blocks(experts, D);
  parallel_by_work(work_ends(down_blocks, count, F), kMinFmasPerThread, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto [e, n0, n1] = down_blocks[b];
      const int64_t r0 = row_start[e];
      rows_range(hr_p + r0 * 2 * F, 2 * F, count[e], dw_p + e * D * F, F, F, yr_p + r0 * D, D, n0, n1);
    }
  });
  // Each token's rows summed in row order (by expert), so the result does not depend on the threads.
  at::Tensor y = at::empty({T, D}, x.options());
  float* y_p = y.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, copy_grain / K), [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> rows(K);
    for (int64_t t = t0; t < t1; ++t) {
      std::copy_n(row_of_slot.begin() + t * K, K, rows.begin());
      std::sort(rows.begin(), rows.end());
      float* dst = y_p + t * D;
      std::fill_n(dst, D, 0.0f);
      for (const int64_t r : rows)
        for (int64_t d = 0; d < D; ++d) dst[d] += yr_p[r * D + d];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(openk2_kernels, m) {
  m.def("few_rows_mm(Tensor x, Tensor w) -> Tensor");
  m.def("few_rows_experts(Tensor x, Tensor ids, Tensor gates, Tensor gate_w, Tensor up_w, Tensor down_w) -> Tensor");
}
TORCH_LIBRARY_IMPL(openk2_kernels, CPU, m) {
  m.impl("few_rows_mm", few_rows_mm);
  m.impl("few_rows_experts", few_rows_experts);
}
