// Rate Norm Layer on CPU tensors (paper Eq. 6): r = clip(x, 0, θ) / θ with
// θ = sigmoid(raw_p)·running_max + eps, and the sums that the Rate Inference Loss needs (Eq. 8)
// taken in the same pass. The scalars (running max, θ, dL/draw_p) are rate_norm_scalars.h's.
#pragma once

#include <cstdint>

#include "numeric.h"

namespace rnl_fast {

struct RateNormForward {
  float running_max;  // the running max θ was computed from
  double sum_r;       // Σr, accumulated in double
  double sum_r2;      // Σr²
};

// In training mode the running max is first blended with max(relu(x)) over the M elements (NaN
// skipped); then θ is computed and r [M] written, quantized to `levels` (QCFS) when levels > 0.
// raw_p (any float dtype) and the float32 running max come as Python holds them. Throws
// std::invalid_argument unless θ > 0.
template <typename In, typename Acc>
RateNormForward rate_norm_forward(const In* x, int64_t M, double raw_p, float running_max, double momentum,
                                  bool training, double theta_eps, int levels, In* r, int num_threads);

// Writes grad_x = g/θ inside [0, θ] (else 0), g = grad_r + grad_sum_r + 2·r·grad_sum_r2, with θ
// recomputed from raw_p and the running max the forward pass used; returns dL/draw_p, from
// dL/dθ = Σ_inside −g·r/θ. grad_r may be null (zero). With levels > 0, r is the quantized rate and
// "inside" and the gradient are QCFS's (rate_norm_rate.h). Throws std::invalid_argument unless θ > 0.
template <typename In, typename Acc>
Acc rate_norm_backward(const In* grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* x, int64_t M, double raw_p,
                       float running_max, double theta_eps, int levels, In* grad_x, int num_threads);

}  // namespace rnl_fast
