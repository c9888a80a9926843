// The scalars of the Rate Norm Layer: the running-max update, θ and dL/draw_p, each bit for bit
// as the spec computes it (rnl_fast/reference.py, torch ops on [] tensors).
//
// torch rounds every op of those expressions to the compute type on its own, after casting each
// Python float to that type. Here every op result passes through `rounded`, so that the compiler
// can neither fuse a product into the sum that follows (an FMA: -march=native allows it and GCC
// contracts by default) nor carry an intermediate in a wider type. tests/test_rate_norm_op.py
// checks the bits against the spec's expressions.
#pragma once

#include <cmath>
#include <stdexcept>

namespace rnl_fast {

// v rounded to T and opaque to the optimiser: stored to, and read back from, a volatile.
template <typename T>
inline T rounded(T v) {
  volatile T kept = v;
  return kept;
}

// sigmoid(a) = 1 / (1 + exp(−a)), the order of operations of torch's CPU sigmoid on one element.
template <typename Acc>
inline Acc sigmoid(Acc a) {
  const Acc e = rounded(std::exp(-a));
  return rounded(Acc(1) / rounded(Acc(1) + e));
}

// (1 − momentum)·running_max + momentum·batch_max in float32, the running max's type; 1 − momentum
// is taken in double, as Python computes it, and each Python float is then cast to float32.
inline float blend_running_max(float running_max, float batch_max, double momentum) {
  const float keep = static_cast<float>(1.0 - momentum);
  const float kept = rounded(keep * running_max);
  return rounded(kept + rounded(static_cast<float>(momentum) * batch_max));
}

template <typename Acc>
struct RateNormThreshold {
  Acc p;      // sigmoid(raw_p)
  Acc theta;  // p·running_max + theta_eps
};

// θ = sigmoid(raw_p)·running_max + theta_eps in Acc. raw_p (of any float dtype) and the float32
// running max arrive as exact doubles; raw_p is rounded to Acc as torch's .to(compute dtype) does.
template <typename Acc>
inline RateNormThreshold<Acc> rate_norm_threshold(double raw_p, float running_max, double theta_eps) {
  const Acc p = sigmoid(static_cast<Acc>(raw_p));
  const Acc scaled = rounded(p * static_cast<Acc>(running_max));
  return {p, rounded(scaled + static_cast<Acc>(theta_eps))};
}

// θ of a call, refused unless positive: r = clip(x, 0, θ)/θ needs θ > 0.
template <typename Acc>
inline RateNormThreshold<Acc> checked_threshold(double raw_p, float running_max, double theta_eps) {
  const auto threshold = rate_norm_threshold<Acc>(raw_p, running_max, theta_eps);
  if (!(threshold.theta > Acc(0))) {
    throw std::invalid_argument("rnl_fast._C: theta = sigmoid(raw_p)*running_max + theta_eps must be > 0");
  }
  return threshold;
}

// dL/draw_p = dL/dθ · running_max · p · (1 − p), multiplied left to right (the running max gets no
// gradient); dL/dθ is the double sum of the backward pass, cast to Acc first.
template <typename Acc>
inline Acc grad_raw_p(double grad_theta, float running_max, Acc p) {
  const Acc scaled = rounded(static_cast<Acc>(grad_theta) * static_cast<Acc>(running_max));
  const Acc times_p = rounded(scaled * p);
  return rounded(times_p * rounded(Acc(1) - p));
}

// dL/draw_p = dL/dp · p · (1 − p) for a channel-wise layer, where dL/dp = Σ_c dL/dθ_c·running_max_c
// arrives as a double sum; multiplied left to right like grad_raw_p.
template <typename Acc>
inline Acc grad_raw_p_from_grad_p(double grad_p, Acc p) {
  const Acc times_p = rounded(static_cast<Acc>(grad_p) * p);
  return rounded(times_p * rounded(Acc(1) - p));
}

}  // namespace rnl_fast
