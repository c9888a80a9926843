// Channel-wise Rate Norm Layer on CPU tensors: one running max, hence one threshold
// θ_c = sigmoid(raw_p)·running_max_c + eps, per channel; r = clip(x, 0, θ_c)/θ_c (quantized to L
// levels when levels > 0, as rate_norm_kernel.h) and the sums Σr, Σr² over all elements.
//
// x is walked in memory order: element i belongs to channel (i / inner) % C. A contiguous NCHW
// tensor has inner = H·W; channels-last [B, H, W, C] in memory and [B, F] have inner = 1.
#pragma once

#include <cstdint>

#include "numeric.h"

namespace rnl_fast {

struct RateNormSums {
  double sum_r;   // Σr, accumulated in double
  double sum_r2;  // Σr²
};

// running_max [C] float32 in; running_max_out [C] out: in training mode running_max blended with
// the per-channel max(relu(x)) (NaN skipped), else a copy. r [M] out. Throws
// std::invalid_argument unless every θ_c > 0.
template <typename In, typename Acc>
RateNormSums rate_norm_channel_forward(const In* x, int64_t M, int64_t C, int64_t inner, double raw_p,
                                       const float* running_max, double momentum, bool training, double theta_eps,
                                       int levels, In* r, float* running_max_out, int num_threads);

// grad_x [M] out (grad_r may be null: zero), with the running max [C] the forward pass used;
// returns dL/draw_p = Σ_c dL/dθ_c · running_max_c · p(1 − p).
template <typename In, typename Acc>
Acc rate_norm_channel_backward(const In* grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* x, int64_t M, int64_t C,
                               int64_t inner, double raw_p, const float* running_max, double theta_eps, int levels,
                               In* grad_x, int num_threads);

}  // namespace rnl_fast
