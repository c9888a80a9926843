// Rate Norm: elementwise passes, split statically over threads; the reductions go through
// chunked_sums.h, so the sums do not depend on the schedule beyond rounding order.
#include "rate_norm_kernel.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <vector>

#include "chunked_sums.h"
#include "rate_norm_lines.h"
#include "rate_norm_scalars.h"

namespace rnl_fast {
namespace {

// max(relu(x)) over x[begin, end), NaN elements skipped; a loop of its own (chunked_sums.h).
template <typename In>
__attribute__((noinline)) float relu_max_range(const In* __restrict x, int64_t begin, int64_t end) {
  float best = 0.0f;  // relu: the max is never below 0
#pragma omp simd reduction(max : best)
  for (int64_t i = begin; i < end; ++i) {
    const float v = load<float>(x + i);
    best = v > best ? v : best;  // false for NaN: NaN is skipped
  }
  return best;
}

// max(relu(x)) over all M elements, NaN elements skipped.
template <typename In>
float relu_max(const In* x, int64_t M, int num_threads) {
  std::vector<float> best(std::max(num_threads, 1), 0.0f);
  for_each_range(M, num_threads, [&](int64_t begin, int64_t end, int thread) {
    best[thread] = relu_max_range(x, begin, end);
  });
  return *std::max_element(best.begin(), best.end());
}

struct RateSums {
  double sum_r;
  double sum_r2;
};

// Writes r [M] and returns (Σr, Σr²), accumulated in double. QUANT: r quantized to `levels`.
template <bool QUANT, typename In, typename Acc>
RateSums forward_pass(const In* x, int64_t M, Acc theta, Acc levels, In* r, int num_threads) {
  const auto sums = chunked_sums<2>(M, num_threads, [&](int64_t begin, int64_t end) {
    return forward_line<QUANT>(x, begin, end, theta, levels, r);
  });
  return {sums[0], sums[1]};
}

// Writes grad_x [M] and returns dL/dθ, accumulated in double (rate_norm_lines.h).
template <bool HAS_GRAD_R, bool SUM_R2, bool QUANT, typename In, typename Acc>
double backward_pass(const In* grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* x, int64_t M, Acc theta,
                     Acc levels, In* grad_x, int num_threads) {
  return chunked_sums<1>(M, num_threads, [&](int64_t begin, int64_t end) {
    return std::array<double, 1>{backward_line<HAS_GRAD_R, SUM_R2, QUANT>(grad_r, grad_sum_r, grad_sum_r2, x, begin,
                                                                         end, theta, levels, grad_x)};
  })[0];
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
  double grad_theta = 0;
  with_backward_variant(grad_r != nullptr, grad_sum_r2 != Acc(0), levels > 0, [&](auto g, auto s, auto q) {
    grad_theta = backward_pass<decltype(g)::value, decltype(s)::value, decltype(q)::value>(
        grad_r, grad_sum_r, grad_sum_r2, x, M, theta, L, grad_x, num_threads);
  });
  return grad_raw_p(grad_theta, running_max, threshold.p);
}

#define RNL_FAST_RATE_NORM_TYPES(code, In, Acc)                                                             \
  template RateNormForward rate_norm_forward<In, Acc>(const In*, int64_t, double, float, double, bool, double, \
                                                      int, In*, int);                                     \
  template Acc rate_norm_backward<In, Acc>(const In*, Acc, Acc, const In*, int64_t, double, float, double,  \
                                           int, In*, int);

RNL_FAST_INPUT_TYPES(RNL_FAST_RATE_NORM_TYPES)

}  // namespace rnl_fast
