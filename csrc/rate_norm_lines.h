// The loops over one stretch of elements that share one threshold, for the Rate Norm kernels: a
// chunk of the scalar-θ kernel, a line of one channel of the channel-wise kernel. Each is a
// function of its own, not inlined, over restrict pointers and scalars passed by value: GCC then
// vectorises it whatever the caller's OpenMP outlining or lambdas do (inlined into a lambda that
// captured θ by reference, the loop stayed scalar, ten times slower).
#pragma once

#include <array>
#include <cstdint>

#include "numeric.h"
#include "rate_norm_rate.h"

namespace rnl_fast {

// Writes r[begin, end) and returns its (Σr, Σr²) in Acc. QUANT: r quantized to `levels`.
template <bool QUANT, typename In, typename Acc>
__attribute__((noinline)) std::array<Acc, 2> forward_line(const In* __restrict x, int64_t begin, int64_t end,
                                                          Acc theta, Acc levels, In* __restrict r) {
  Acc sum_r = 0, sum_r2 = 0;
#pragma omp simd reduction(+ : sum_r, sum_r2)
  for (int64_t i = begin; i < end; ++i) {
    const Acc rate = forward_rate<QUANT>(load<Acc>(x + i), theta, levels);
    store(r + i, rate);
    sum_r += rate;
    sum_r2 += rate * rate;
  }
  return {sum_r, sum_r2};
}

// The gradient of one element: writes grad_x[i], returns its term of dL/dθ. grad_x = g/θ inside
// the window (else 0), g = grad_r + grad_sum_r + 2·r·grad_sum_r2; HAS_GRAD_R is a template
// argument so that the loop carries no null check on grad_r. (With -ftrapping-math GCC left this
// loop scalar: 8.4 ms instead of 0.8 ms for 3.2M fp32; setup.py.)
template <bool HAS_GRAD_R, bool QUANT, typename In, typename Acc>
inline Acc backward_element(const In* __restrict grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* __restrict x,
                            int64_t i, Acc theta, Acc levels, In* __restrict grad_x) {
  bool inside;
  Acc u;
  const Acc rate = rate_grad<QUANT>(load<Acc>(x + i), theta, levels, inside, u);
  const Acc upstream = HAS_GRAD_R ? load<Acc>(grad_r + i) : Acc(0);
  const Acc g = upstream + grad_sum_r + Acc(2) * rate * grad_sum_r2;
  store(grad_x + i, inside ? g / theta : Acc(0));
  return inside ? -g * u / theta : Acc(0);
}

// Writes grad_x[begin, end) and returns their dL/dθ in Acc.
template <bool HAS_GRAD_R, bool QUANT, typename In, typename Acc>
__attribute__((noinline)) Acc backward_line(const In* __restrict grad_r, Acc grad_sum_r, Acc grad_sum_r2,
                                            const In* __restrict x, int64_t begin, int64_t end, Acc theta,
                                            Acc levels, In* __restrict grad_x) {
  Acc part = 0;
#pragma omp simd reduction(+ : part)
  for (int64_t i = begin; i < end; ++i) {
    part += backward_element<HAS_GRAD_R, QUANT>(grad_r, grad_sum_r, grad_sum_r2, x, i, theta, levels, grad_x);
  }
  return part;
}

}  // namespace rnl_fast
