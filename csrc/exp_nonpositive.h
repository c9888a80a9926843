// exp(a) for a ≤ 0, in plain arithmetic the compiler vectorises: the sigmoid surrogate's
// e = exp(−|u/w|). std::exp is a libm call that GCC leaves scalar without -ffast-math, which made
// that surrogate's backward 3.3–4× slower per element than atan's (bench/variant_sweep.py).
// Internal to the kernels, not part of the entry points.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace rnl_fast {
namespace detail {

// a = k·ln 2 + r with k = round(a·log2 e) (Cody–Waite: ln 2 in two parts, so k·ln2_hi is exact),
// exp(r) by its Taylor polynomial (|r| ≤ ln2/2: degree 7 for float, 13 for double, truncation
// below 1e-8 and 5e-18 relative), times 2^k built in the exponent field: as 2^(k+S)·2^−S, so that
// results under the smallest normal number round once into the subnormals, as libm's do. Within
// a few ulp of glibc's exp (tests/test_surrogate_exp.py); −inf gives 0, NaN gives NaN. T is float
// or double.
template <typename T>
inline T exp_nonpositive(T a) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  static_assert(kFloat || std::is_same_v<T, double>, "exp_nonpositive<float> or <double>");
  using Bits = std::conditional_t<kFloat, uint32_t, uint64_t>;
  constexpr int kMantissaBits = kFloat ? 23 : 52;
  constexpr Bits kBias = kFloat ? 127 : 1023;
  constexpr T kLowest = kFloat ? T(-104.0f) : T(-746.0);  // below ln(smallest subnormal / 2): exp is 0
  constexpr Bits kScaleShift = kFloat ? 64 : 128;          // S: 2^(k+S) is normal for every k ≥ kLowest·log2 e
  constexpr T kUnscale = kFloat ? T(5.42101086242752217e-20f) : T(2.93873587705571876992e-39);  // 2^−S
  constexpr T kShift = kFloat ? T(12582912.0f) : T(6755399441055744.0);      // 1.5·2^mantissa bits
  constexpr T kLog2e = T(1.44269504088896340736);
  constexpr T kLn2Hi = kFloat ? T(0.693145751953125f) : T(6.93147180369123816490e-01);
  constexpr T kLn2Lo = kFloat ? T(1.428606765330187045e-06f) : T(1.90821492927058770002e-10);

  const bool underflow = a < kLowest;  // −inf too; NaN compares false and stays NaN below
  const T b = underflow ? T(0) : a;
  const T shifted = b * kLog2e + kShift;  // round(b·log2 e) lands in the low mantissa bits
  const T k = shifted - kShift;
  const T r = (b - k * kLn2Hi) - k * kLn2Lo;
  T p;
  if constexpr (kFloat) {
    p = T(1) / T(5040);
    for (const T c : {T(1) / T(720), T(1) / T(120), T(1) / T(24), T(1) / T(6), T(0.5), T(1), T(1)}) p = p * r + c;
  } else {
    p = T(1) / T(6227020800.0);  // 1/13!
    for (const T c : {T(1) / T(479001600.0), T(1) / T(39916800.0), T(1) / T(3628800.0), T(1) / T(362880.0),
                      T(1) / T(40320.0), T(1) / T(5040.0), T(1) / T(720.0), T(1) / T(120.0), T(1) / T(24.0),
                      T(1) / T(6.0), T(0.5), T(1), T(1)}) {
      p = p * r + c;
    }
  }
  Bits shifted_bits, shift_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof shifted);
  std::memcpy(&shift_bits, &kShift, sizeof kShift);
  const Bits scale_bits = (shifted_bits - shift_bits + kBias + kScaleShift) << kMantissaBits;  // 2^(k+S)
  T scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const T result = (p * scale) * kUnscale;  // the first product is exact; the second rounds once
  return underflow ? T(0) : result;
}

}  // namespace detail
}  // namespace rnl_fast
