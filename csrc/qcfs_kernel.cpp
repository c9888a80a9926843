// QCFS: one elementwise pass each way; the backward's sum dL/dλ over chunks (chunked_sums.h).
// The per-element rate is rate_norm_rate.h's qcfs_rate, the one the quantized Rate Norm uses.
#include "qcfs_kernel.h"

#include <array>
#include <stdexcept>

#include "chunked_sums.h"
#include "rate_norm_rate.h"

namespace rnl_fast {
namespace {

// λ in the compute type, refused unless positive (x/λ needs λ > 0).
template <typename Acc>
Acc checked_lambda(double threshold) {
  const Acc lambda = static_cast<Acc>(threshold);
  if (!(lambda > Acc(0))) throw std::invalid_argument("rnl_fast._C: threshold must be > 0");
  return lambda;
}

// The elements [begin, end): writes grad_x, returns their terms of dL/dλ. Not inlined, over
// restrict pointers: a loop of its own, vectorised whatever the OpenMP outlining around it does.
template <typename In, typename Acc>
__attribute__((noinline)) Acc backward_chunk(const In* __restrict grad_y, const In* __restrict x, int64_t begin,
                                             int64_t end, Acc lambda, Acc levels, In* __restrict grad_x) {
  Acc part = 0;
#pragma omp simd reduction(+ : part)
  for (int64_t i = begin; i < end; ++i) {
    bool inside;
    Acc u;
    const Acc rate = qcfs_rate(load<Acc>(x + i), lambda, levels, inside, u);
    const Acc g = load<Acc>(grad_y + i);
    // Autograd's chain through y = clamp(k/L)·λ, k = floor(x/λ·L + ½) straight through: ·λ, the
    // clamp's window, /L, ·L, then /λ to x; λ also gets g·clamp(k/L) and −g_w·((x/λ)/λ).
    const Acc g_w = (inside ? g * lambda : Acc(0)) / levels * levels;
    store(grad_x + i, g_w / lambda);
    part += g * rate + -g_w * (u / lambda);
  }
  return part;
}

// y[begin, end) = λ·clamp(floor(x/λ·L + ½)/L, 0, 1); a loop of its own, like backward_chunk.
template <typename In, typename Acc>
__attribute__((noinline)) void forward_range(const In* __restrict x, int64_t begin, int64_t end, Acc lambda,
                                             Acc levels, In* __restrict y) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    bool inside;
    Acc u;
    store(y + i, qcfs_rate(load<Acc>(x + i), lambda, levels, inside, u) * lambda);
  }
}

}  // namespace

template <typename In, typename Acc>
void qcfs_forward(const In* x, int64_t M, double threshold, int levels, In* y, int num_threads) {
  const Acc lambda = checked_lambda<Acc>(threshold), L = Acc(levels);
  for_each_range(M, num_threads, [&](int64_t begin, int64_t end, int) {
    forward_range(x, begin, end, lambda, L, y);
  });
}

template <typename In, typename Acc>
double qcfs_backward(const In* grad_y, const In* x, int64_t M, double threshold, int levels, In* grad_x,
                     int num_threads) {
  const Acc lambda = checked_lambda<Acc>(threshold), L = Acc(levels);
  return chunked_sums<1>(M, num_threads, [&](int64_t begin, int64_t end) {
    return std::array<Acc, 1>{backward_chunk(grad_y, x, begin, end, lambda, L, grad_x)};
  })[0];
}

#define RNL_FAST_QCFS_TYPES(code, In, Acc)                                                 \
  template void qcfs_forward<In, Acc>(const In*, int64_t, double, int, In*, int);          \
  template double qcfs_backward<In, Acc>(const In*, const In*, int64_t, double, int, In*, int);

RNL_FAST_INPUT_TYPES(RNL_FAST_QCFS_TYPES)

}  // namespace rnl_fast
