// Rate Norm: elementwise passes, split statically over threads; each reduction is a per-thread
// double accumulator, so the sums do not depend on the schedule beyond rounding order.
#include "rate_norm_kernel.h"

#include <omp.h>

#include <algorithm>
#include <stdexcept>

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

// Writes r [M] and returns (Σr, Σr²), accumulated in double.
template <typename In, typename Acc>
RateSums forward_pass(const In* x, int64_t M, Acc theta, In* r, int num_threads) {
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
        const Acc v = load<Acc>(x + i);
        // clip(v, 0, θ) written so that NaN stays NaN (std::min/max would drop it).
        const Acc clipped = v < Acc(0) ? Acc(0) : (v > theta ? theta : v);
        const Acc rate = clipped / theta;
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
template <bool HAS_GRAD_R, typename In, typename Acc>
double backward_pass(const In* __restrict grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* __restrict x,
                     int64_t M, Acc theta, In* __restrict grad_x, int num_threads) {
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
        const Acc v = load<Acc>(x + i);
        const bool inside = v >= Acc(0) && v <= theta;  // inclusive, like torch.clamp's backward
        const Acc rate = v < Acc(0) ? Acc(0) : (v > theta ? Acc(1) : v / theta);
        const Acc upstream = HAS_GRAD_R ? load<Acc>(grad_r + i) : Acc(0);
        const Acc g = upstream + grad_sum_r + Acc(2) * rate * grad_sum_r2;
        store(grad_x + i, inside ? g / theta : Acc(0));
        chunk += inside ? -g * rate / theta : Acc(0);
      }
      mine += chunk;
    }
#pragma omp atomic
    grad_theta += mine;
  }
  return grad_theta;
}

// θ of the call (rate_norm_scalars.h), refused unless positive: r = clip(x, 0, θ)/θ needs θ > 0.
template <typename Acc>
RateNormThreshold<Acc> checked_threshold(double raw_p, float running_max, double theta_eps) {
  const auto threshold = rate_norm_threshold<Acc>(raw_p, running_max, theta_eps);
  if (!(threshold.theta > Acc(0))) {
    throw std::invalid_argument("rnl_fast._C: theta = sigmoid(raw_p)*running_max + theta_eps must be > 0");
  }
  return threshold;
}

}  // namespace

template <typename In, typename Acc>
RateNormForward rate_norm_forward(const In* x, int64_t M, double raw_p, float running_max, double momentum,
                                  bool training, double theta_eps, In* r, int num_threads) {
  if (training) running_max = blend_running_max(running_max, relu_max(x, M, num_threads), momentum);
  const Acc theta = checked_threshold<Acc>(raw_p, running_max, theta_eps).theta;
  const RateSums sums = forward_pass(x, M, theta, r, num_threads);
  return {running_max, sums.sum_r, sums.sum_r2};
}

template <typename In, typename Acc>
Acc rate_norm_backward(const In* grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* x, int64_t M, double raw_p,
                       float running_max, double theta_eps, In* grad_x, int num_threads) {
  const auto threshold = checked_threshold<Acc>(raw_p, running_max, theta_eps);
  const double grad_theta =
      grad_r ? backward_pass<true>(grad_r, grad_sum_r, grad_sum_r2, x, M, threshold.theta, grad_x, num_threads)
             : backward_pass<false>(grad_r, grad_sum_r, grad_sum_r2, x, M, threshold.theta, grad_x, num_threads);
  return grad_raw_p(grad_theta, running_max, threshold.p);
}

#define RNL_FAST_RATE_NORM_TYPES(code, In, Acc)                                                             \
  template RateNormForward rate_norm_forward<In, Acc>(const In*, int64_t, double, float, double, bool, double, \
                                                      In*, int);                                          \
  template Acc rate_norm_backward<In, Acc>(const In*, Acc, Acc, const In*, int64_t, double, float, double,  \
                                           In*, int);

RNL_FAST_INPUT_TYPES(RNL_FAST_RATE_NORM_TYPES)

}  // namespace rnl_fast
