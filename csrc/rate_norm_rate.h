// The per-element arithmetic of the Rate Norm kernels (scalar θ and channel-wise θ_c alike), as
// rnl_fast/reference.py rounds it: every op in Acc, divisions correctly rounded, and no FMA
// (setup.py builds with -ffp-contract=off, so r·L + ½ rounds twice, as torch does).
#pragma once

#include <cmath>

namespace rnl_fast {

// r = clip(v, 0, θ)/θ, the clip written so that NaN stays NaN (std::min/max would drop it).
template <typename Acc>
inline Acc clipped_rate(Acc v, Acc theta) {
  return (v < Acc(0) ? Acc(0) : (v > theta ? theta : v)) / theta;
}

// floor(r·L + ½)/L for r in [0, 1] (NaN stays NaN): QCFS's quantization-clip-floor-shift.
template <typename Acc>
inline Acc quantize(Acc rate, Acc levels) {
  return std::floor(rate * levels + Acc(0.5)) / levels;
}

// The rate of the forward pass: plain, or quantized when QUANT.
template <bool QUANT, typename Acc>
inline Acc forward_rate(Acc v, Acc theta, Acc levels) {
  const Acc rate = clipped_rate(v, theta);
  return QUANT ? quantize(rate, levels) : rate;
}

// QCFS's rate in the spec's order (reference.quantized_rate): u = v/θ unclipped,
// k = floor(u·L + ½), returns clamp(k/L, 0, 1) (NaN stays NaN); `inside` is QCFS's gradient
// window 0 ≤ k ≤ L, the same as 0 ≤ k/L ≤ 1 (torch.clamp's backward) for integers k and L ≤ 2^24.
// The value equals quantize(clipped_rate(v, θ), L); the QCFS op and the backward passes use this.
template <typename Acc>
inline Acc qcfs_rate(Acc v, Acc theta, Acc levels, bool& inside, Acc& u) {
  u = v / theta;
  const Acc k = std::floor(u * levels + Acc(0.5));
  const Acc q = k / levels;
  inside = k >= Acc(0) && k <= levels;
  return q < Acc(0) ? Acc(0) : (q > Acc(1) ? Acc(1) : q);
}

// What the backward pass needs of one element: returns the forward rate r (for the gradient of
// Σr²) and sets `inside` (whether d r/dx = 1/θ, else 0) and u (d r/dθ = −u/θ inside). Out
// parameters, not a returned struct: GCC kept a {float, bool, float} struct in memory and left the
// float loops scalar (38 ms instead of 2.5 ms for 3.2M elements).
//
// Plain rate: inside is 0 ≤ v ≤ θ (inclusive, like torch.clamp's backward), u = v/θ there.
// Quantized: qcfs_rate (QCFS's gradient window; r = clamp(k/L, 0, 1), the forward value).
template <bool QUANT, typename Acc>
inline Acc rate_grad(Acc v, Acc theta, Acc levels, bool& inside, Acc& u) {
  if (QUANT) return qcfs_rate(v, theta, levels, inside, u);
  const Acc rate = v < Acc(0) ? Acc(0) : (v > theta ? Acc(1) : v / theta);
  inside = v >= Acc(0) && v <= theta;
  u = rate;
  return rate;
}

}  // namespace rnl_fast
