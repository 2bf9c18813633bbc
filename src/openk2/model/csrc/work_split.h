// Splitting uneven units of work over torch's intra-op threads (few_rows.cpp, masked_attention.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

namespace openk2_kernels {

// fn(i0, i1) on contiguous runs of units of about equal work, one run per thread. work_end[i] is the work of
// units 0..i together (a running sum). A thread takes at least min_work: less is not worth a fork. at::parallel_for
// splits by unit count, which leaves a thread idle while another finishes a heavier half (experts chosen by more
// tokens, a causal prefill's later query blocks).
template <class Fn>
void parallel_by_work(const std::vector<int64_t>& work_end, int64_t min_work, const Fn& fn) {
  if (work_end.empty()) return;
  const int64_t total = work_end.back();
  const int64_t threads = std::clamp<int64_t>(total / std::max<int64_t>(1, min_work), 1, at::get_num_threads());
  const int64_t units = static_cast<int64_t>(work_end.size());
  const auto bound = [&](int64_t w) {  // the first unit of thread w's run
    if (w == 0) return int64_t{0};
    if (w == threads) return units;
    return static_cast<int64_t>(std::upper_bound(work_end.begin(), work_end.end(), total * w / threads) -
                                work_end.begin());
  };
  at::parallel_for(0, threads, 1, [&](int64_t w0, int64_t w1) {
    const int64_t i0 = bound(w0), i1 = bound(w1);
    if (i0 < i1) fn(i0, i1);
  });
}

}  // namespace openk2_kernels
