// The parallel walk of the elementwise passes that also reduce: [0, M) cut in chunks of kChunk
// elements, the chunks split statically over the threads. A chunk's partial sums are taken in the
// arithmetic type (a vectorisable loop); they are added in double across chunks, per thread, then
// across threads, so a sum depends on the schedule only through the rounding order.
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

// Calls chunk_sums(begin, end) once for each chunk [begin, end) of [0, M): it does the chunk's
// work (writes its outputs) and returns its K partial sums (an array of K values of any float
// type). Returns the K totals, accumulated in double.
template <std::size_t K, typename ChunkSums>
std::array<double, K> chunked_sums(int64_t M, int num_threads, ChunkSums&& chunk_sums) {
  std::array<double, K> total{};
#pragma omp parallel num_threads(num_threads) if (M >= kParallelMinWork)
  {
    std::array<double, K> mine{};
#pragma omp for schedule(static)
    for (int64_t c = 0; c < (M + kSumChunk - 1) / kSumChunk; ++c) {
      const auto part = chunk_sums(c * kSumChunk, std::min(M, (c + 1) * kSumChunk));
      for (std::size_t j = 0; j < K; ++j) mine[j] += part[j];
    }
    for (std::size_t j = 0; j < K; ++j) {
#pragma omp atomic
      total[j] += mine[j];
    }
  }
  return total;
}

}  // namespace rnl_fast
