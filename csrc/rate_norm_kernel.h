// Rate Norm Layer on CPU tensors (paper Eq. 6): r = clip(x, 0, θ) / θ, with the sums that the
// Rate Inference Loss needs (Eq. 8) taken in the same pass.
#pragma once

#include <cstdint>

#include "numeric.h"

namespace rnl_fast {

// max(relu(x)) over all M elements, NaN elements skipped.
template <typename In>
double relu_max(const In* x, int64_t M, int num_threads);

// Writes r [M] and returns (Σr, Σr²), accumulated in double.
struct RateSums {
  double sum_r;
  double sum_r2;
};
template <typename In, typename Acc>
RateSums rate_norm_forward(const In* x, int64_t M, Acc theta, In* r, int num_threads);

// grad_x = g/θ inside [0, θ] (else 0), g = grad_r + grad_sum_r + 2·r·grad_sum_r2; returns
// dL/dθ = Σ_inside −g·r/θ. grad_r may be null (zero).
template <typename In, typename Acc>
double rate_norm_backward(const In* grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* x,
                          int64_t M, Acc theta, In* grad_x, int num_threads);

}  // namespace rnl_fast
