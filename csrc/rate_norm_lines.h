// The loops over one stretch of elements that share one threshold, for the Rate Norm kernels: a
// chunk of the scalar-θ kernel, a line of one channel of the channel-wise kernel. Each is a
// function of its own, not inlined, over restrict pointers and scalars passed by value: GCC then
// vectorises it whatever the caller's OpenMP outlining or lambdas do (inlined into a lambda that
// captured θ by reference, the loop stayed scalar, ten times slower).
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>

#include "numeric.h"
#include "rate_norm_rate.h"

namespace rnl_fast {

// Writes r[begin, end) and returns its (Σr, Σr²), accumulated in double: a float running sum of
// 4096 rates near ½ drifts by ~3e-5 relative (the reference sums pairwise, ~1e-7).
// QUANT: r quantized to `levels`.
template <bool QUANT, typename In, typename Acc>
__attribute__((noinline)) std::array<double, 2> forward_line(const In* __restrict x, int64_t begin, int64_t end,
                                                             Acc theta, Acc levels, In* __restrict r) {
  double sum_r = 0, sum_r2 = 0;
#pragma omp simd reduction(+ : sum_r, sum_r2)
  for (int64_t i = begin; i < end; ++i) {
    const Acc rate = forward_rate<QUANT>(load<Acc>(x + i), theta, levels);
    store(r + i, rate);
    sum_r += rate;
    sum_r2 += rate * rate;  // the square rounded in Acc, as the reference's r * r
  }
  return {sum_r, sum_r2};
}

// The gradient of one element: writes grad_x[i], returns its term of dL/dθ. grad_x = g/θ inside
// the window (else 0), g = grad_r + grad_sum_r + 2·r·grad_sum_r2, the last term only when
// grad_sum_r2 ≠ 0 (SUM_R2) (autograd adds nothing for an unused Σr², and 0·r is NaN where r is, e.g. at
// x = θ = inf). A NaN element (u NaN) gives a NaN term, as the reference's −g·clip(x)/θ² does:
// a NaN in x makes dL/draw_p NaN like Σr, never a finite value that skips it. HAS_GRAD_R and SUM_R2 are
// template arguments so that the loop carries neither test: with `grad_sum_r2 != 0` tested in the
// loop, GCC unswitched it and left the grad_sum_r2 = 0 copy scalar (10x slower: 473 µs instead of
// 41 for 64K fp32; a loss without Ω has grad_sum_r2 = 0). (With -ftrapping-math GCC left this
// loop scalar: 8.4 ms instead of 0.8 ms for 3.2M fp32; setup.py.)
template <bool HAS_GRAD_R, bool SUM_R2, bool QUANT, typename In, typename Acc>
inline Acc backward_element(const In* __restrict grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* __restrict x,
                            int64_t i, Acc theta, Acc levels, In* __restrict grad_x) {
  bool inside;
  Acc u;
  const Acc rate = rate_grad<QUANT>(load<Acc>(x + i), theta, levels, inside, u);
  const Acc upstream = HAS_GRAD_R ? load<Acc>(grad_r + i) : Acc(0);
  const Acc g = SUM_R2 ? upstream + grad_sum_r + Acc(2) * rate * grad_sum_r2 : upstream + grad_sum_r + Acc(0);
  store(grad_x + i, inside ? g / theta : Acc(0));
  if constexpr (QUANT) {
    // The reference's chain through the straight-through floor: −g_w·(u/θ), g_w = g inside the
    // window and 0 outside it, where 0·(u/θ) is NaN when u/θ is: x = ±inf (or u/θ overflowing)
    // makes dL/draw_p NaN, as x = NaN does (it gave a finite value that skipped the element).
    return -(inside ? g : Acc(0)) * (u / theta);
  }
  return inside ? -g * u / theta : (u != u ? u : Acc(0));
}

// Writes grad_x[begin, end) and returns their dL/dθ, accumulated in double.
template <bool HAS_GRAD_R, bool SUM_R2, bool QUANT, typename In, typename Acc>
__attribute__((noinline)) double backward_line(const In* __restrict grad_r, Acc grad_sum_r, Acc grad_sum_r2,
                                            const In* __restrict x, int64_t begin, int64_t end, Acc theta,
                                            Acc levels, In* __restrict grad_x) {
  double part = 0;
#pragma omp simd reduction(+ : part)
  for (int64_t i = begin; i < end; ++i) {
    part += backward_element<HAS_GRAD_R, SUM_R2, QUANT>(grad_r, grad_sum_r, grad_sum_r2, x, i, theta, levels, grad_x);
  }
  return part;
}

// Calls body(has_grad_r, sum_r2, quant) with the three as std::bool_constant values, so that each
// backward variant is its own branch-free loop (see backward_element).
template <typename Body>
void with_backward_variant(bool has_grad_r, bool sum_r2, bool quant, Body&& body) {
  const auto with_quant = [&](auto g, auto s) {
    quant ? body(g, s, std::true_type{}) : body(g, s, std::false_type{});
  };
  const auto with_sum_r2 = [&](auto g) { sum_r2 ? with_quant(g, std::true_type{}) : with_quant(g, std::false_type{}); };
  has_grad_r ? with_sum_r2(std::true_type{}) : with_sum_r2(std::false_type{});
}

}  // namespace rnl_fast
