// Rate Norm: elementwise passes, split statically over threads; each reduction is a per-thread
// double accumulator, so the sums do not depend on the schedule beyond rounding order.
#include "rate_norm_kernel.h"

#include <omp.h>

#include <algorithm>

#include "rate_norm_rate.h"
#include "rate_norm_scalars.h"

namespace rnl_fast {
namespace {

// max(relu(x)) over all M elements, NaN elements skipped.
template <typename In>
float relu_max(const In* x, int64_t M, int num_threads) {
  float best = 0.0f;  // relu: the max is never below 0
#pragma omp parallel for simd num_threads(num_threads) if (M >= kParallelMinWork) reduction(max : best) schedule(static)
  for (int64_t i = 0; i < M; ++i) {
    const float v = load<float>(x + i);
    best = v > best ? v : best;  // false for NaN: NaN is skipped
  }
  return best;
}

struct RateSums {
  double sum_r;
  double sum_r2;
};

// Writes r [M] and returns (Σr, Σr²), accumulated in double. QUANT: r quantized to `levels`.
template <bool QUANT, typename In, typename Acc>
RateSums forward_pass(const In* x, int64_t M, Acc theta, Acc levels, In* r, int num_threads) {
  double sum_r = 0.0, sum_r2 = 0.0;
#pragma omp parallel num_threads(num_threads) if (M >= kParallelMinWork)
  {
    // Accumulate in Acc within chunks of 4096 (vectorisable), then in double across chunks.
    constexpr int64_t kChunk = 4096;
    double my_r = 0.0, my_r2 = 0.0;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < (M + kChunk - 1) / kChunk; ++c) {
      const int64_t end = std::min(M, (c + 1) * kChunk);
      Acc chunk_r = 0, chunk_r2 = 0;
#pragma omp simd reduction(+ : chunk_r, chunk_r2)
      for (int64_t i = c * kChunk; i < end; ++i) {
        const Acc rate = forward_rate<QUANT>(load<Acc>(x + i), theta, levels);
        store(r + i, rate);
        chunk_r += rate;
        chunk_r2 += rate * rate;
      }
      my_r += chunk_r;
      my_r2 += chunk_r2;
    }
#pragma omp atomic
    sum_r += my_r;
#pragma omp atomic
    sum_r2 += my_r2;
  }
  return {sum_r, sum_r2};
}

// HAS_GRAD_R is a template argument so that the loop carries no null check on grad_r. (With
// -ftrapping-math GCC left this loop scalar: 8.4 ms instead of 0.8 ms for 3.2M fp32; setup.py.)
template <bool HAS_GRAD_R, bool QUANT, typename In, typename Acc>
double backward_pass(const In* __restrict grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* __restrict x,
                     int64_t M, Acc theta, Acc levels, In* __restrict grad_x, int num_threads) {
  double grad_theta = 0.0;
#pragma omp parallel num_threads(num_threads) if (M >= kParallelMinWork)
  {
    constexpr int64_t kChunk = 4096;
    double mine = 0.0;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < (M + kChunk - 1) / kChunk; ++c) {
      const int64_t begin = c * kChunk, end = std::min(M, (c + 1) * kChunk);
      Acc chunk = 0;
#pragma omp simd reduction(+ : chunk)
      for (int64_t i = begin; i < end; ++i) {
        bool inside;
        Acc u;
        const Acc rate = rate_grad<QUANT>(load<Acc>(x + i), theta, levels, inside, u);
        const Acc upstream = HAS_GRAD_R ? load<Acc>(grad_r + i) : Acc(0);
        const Acc g = upstream + grad_sum_r + Acc(2) * rate * grad_sum_r2;
        store(grad_x + i, inside ? g / theta : Acc(0));
        chunk += inside ? -g * u / theta : Acc(0);
      }
      mine += chunk;
    }
#pragma omp atomic
    grad_theta += mine;
  }
  return grad_theta;
}

}  // namespace

template <typename In, typename Acc>
RateNormForward rate_norm_forward(const In* x, int64_t M, double raw_p, float running_max, double momentum,
                                  bool training, double theta_eps, int levels, In* r, int num_threads) {
  if (training) running_max = blend_running_max(running_max, relu_max(x, M, num_threads), momentum);
  const Acc theta = checked_threshold<Acc>(raw_p, running_max, theta_eps).theta;
  const RateSums sums = levels > 0 ? forward_pass<true>(x, M, theta, Acc(levels), r, num_threads)
                                   : forward_pass<false>(x, M, theta, Acc(0), r, num_threads);
  return {running_max, sums.sum_r, sums.sum_r2};
}

template <typename In, typename Acc>
Acc rate_norm_backward(const In* grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* x, int64_t M, double raw_p,
                       float running_max, double theta_eps, int levels, In* grad_x, int num_threads) {
  const auto threshold = checked_threshold<Acc>(raw_p, running_max, theta_eps);
  const Acc theta = threshold.theta, L = Acc(levels);
  double grad_theta;
  if (levels > 0) {
    grad_theta = grad_r ? backward_pass<true, true>(grad_r, grad_sum_r, grad_sum_r2, x, M, theta, L, grad_x, num_threads)
                        : backward_pass<false, true>(grad_r, grad_sum_r, grad_sum_r2, x, M, theta, L, grad_x, num_threads);
  } else {
    grad_theta = grad_r ? backward_pass<true, false>(grad_r, grad_sum_r, grad_sum_r2, x, M, theta, L, grad_x, num_threads)
                        : backward_pass<false, false>(grad_r, grad_sum_r, grad_sum_r2, x, M, theta, L, grad_x, num_threads);
  }
  return grad_raw_p(grad_theta, running_max, threshold.p);
}

#define RNL_FAST_RATE_NORM_TYPES(code, In, Acc)                                                             \
  template RateNormForward rate_norm_forward<In, Acc>(const In*, int64_t, double, float, double, bool, double, \
                                                      int, In*, int);                                     \
  template Acc rate_norm_backward<In, Acc>(const In*, Acc, Acc, const In*, int64_t, double, float, double,  \
                                           int, In*, int);

RNL_FAST_INPUT_TYPES(RNL_FAST_RATE_NORM_TYPES)

}  // namespace rnl_fast
