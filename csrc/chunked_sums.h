// The parallel skeleton of the elementwise passes (Rate Norm, QCFS): the work cut
// in items (chunks of kSumChunk elements, or the channel-wise kernels' lines and blocks of rows),
// the items split statically over the threads. An item's partial sums are taken in the arithmetic
// type (a vectorisable loop); they are added in double across items, per thread, then across
// threads, so a sum depends on the schedule only through the rounding order.
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>

#include "numeric.h"

namespace rnl_fast {

// Elements summed in the arithmetic type before the sums move on in double.
constexpr int64_t kSumChunk = 4096;

// Calls item_sums(item) once for each item = 0…items−1, the items split statically over the
// threads (over one thread unless `parallel`): it does the item's work (writes its outputs) and
// returns the item's K partial sums (an array of K values of any float type). Returns the K
// totals, added in double per thread, then across threads.
template <std::size_t K, typename ItemSums>
std::array<double, K> parallel_sums(int64_t items, bool parallel, int num_threads, ItemSums&& item_sums) {
  std::array<double, K> total{};
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    std::array<double, K> mine{};
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const auto part = item_sums(item);
      for (std::size_t j = 0; j < K; ++j) mine[j] += part[j];
    }
    for (std::size_t j = 0; j < K; ++j) {
#pragma omp atomic
      total[j] += mine[j];
    }
  }
  return total;
}

// Calls range(begin, end) on [0, M) cut into one contiguous range per thread, in parallel from
// kParallelMinWork elements on; below that, once over [0, M) with no OpenMP region at all. (The
// serial branch GCC made of `#pragma omp parallel for simd ... if (M >= kParallelMinWork)` was a
// scalar loop: QCFS forward of 261,120 fp32 took 2.8 ms, 79 µs for 262,144, which ran in parallel;
// `range` should be a noinline loop of its own, as rate_norm_lines.h explains.) Ranges are passed
// with the thread's index in [0, threads) for per-thread results.
template <typename Range>
void for_each_range(int64_t M, int num_threads, Range&& range) {
  if (M < kParallelMinWork || num_threads <= 1) {
    range(int64_t{0}, M, 0);
    return;
  }
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
    range(M * thread / threads, M * (thread + 1) / threads, static_cast<int>(thread));
  }
}

// parallel_sums over the chunks of [0, M): chunk_sums(begin, end) for each [begin, end) of
// kSumChunk elements (the last one shorter), in parallel from kParallelMinWork elements on.
template <std::size_t K, typename ChunkSums>
std::array<double, K> chunked_sums(int64_t M, int num_threads, ChunkSums&& chunk_sums) {
  return parallel_sums<K>((M + kSumChunk - 1) / kSumChunk, M >= kParallelMinWork, num_threads, [&](int64_t c) {
    return chunk_sums(c * kSumChunk, std::min(M, (c + 1) * kSumChunk));
  });
}

}  // namespace rnl_fast
