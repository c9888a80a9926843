// The QCFS activation on CPU tensors (Bu et al., ICLR 2022): y = λ·clamp(floor(x/λ·L + ½)/L, 0, 1),
// each op rounded as rnl_fast/reference.py's qcfs rounds it, and its straight-through gradients.
#pragma once

#include <cstdint>

#include "numeric.h"

namespace rnl_fast {

// Writes y [M]. threshold: λ as Python holds it, rounded to Acc as torch's .to(compute dtype)
// rounds it; levels: L ≥ 1. Throws std::invalid_argument unless λ > 0 after that rounding.
template <typename In, typename Acc>
void qcfs_forward(const In* x, int64_t M, double threshold, int levels, In* y, int num_threads);

// Writes grad_x [M] and returns dL/dλ summed over all elements (in double across chunks), each
// term as torch's autograd of the spec computes it: with g = grad_y and the window 0 ≤ k ≤ L,
// g_w = (inside ? g·λ : 0)/L·L, grad_x = g_w/λ, dL/dλ = Σ g·clamp(k/L, 0, 1) − g_w·((x/λ)/λ).
template <typename In, typename Acc>
double qcfs_backward(const In* grad_y, const In* x, int64_t M, double threshold, int levels, In* grad_x,
                     int num_threads);

}  // namespace rnl_fast
