// Element types the kernels read and write, and their conversions to the arithmetic type.
//
// No torch headers here (docs/architecture.md): tensors reach us as raw pointers, and fp16/bf16 are
// plain 16-bit storage types converted by hand.
#pragma once

#include <cstdint>
#include <cstring>

namespace rnl_fast {

// Storage types of the tensors the entry points take. Python finds them by name, as
// rnl_fast._C.DType.float32 etc. (torch's dtype names, bound in bindings.cpp).
enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16, kUInt8 };

// Every input type of the kernels: X(DType code, storage type In, arithmetic type Acc), Acc being
// double for float64 and float otherwise (rnl_fast.numerics.compute_dtype_of). The kernels are
// instantiated from this one list, and bindings.cpp's by_dtype dispatches on it.
#define RNL_FAST_INPUT_TYPES(X) \
  X(kFloat32, float, float)     \
  X(kFloat64, double, double)   \
  X(kFloat16, f16_t, float)     \
  X(kBFloat16, bf16_t, float)

// Below this many elements one thread does the work: waking an OpenMP team costs more than it
// saves, and on a loaded machine a spinning team can stall a tiny call for milliseconds.
constexpr int64_t kParallelMinWork = 1 << 18;

struct bf16_t {
  uint16_t bits;
};

#if defined(__FLT16_MAX__)
using f16_t = _Float16;  // GCC ≥ 12 on x86-64: hardware (F16C) conversions where available
#else
#error "rnl_fast needs a compiler with _Float16 (GCC >= 12 or Clang >= 15 on x86-64 / aarch64)"
#endif

template <typename Acc, typename T>
inline Acc load(const T* p) {
  return static_cast<Acc>(*p);
}

template <typename Acc>
inline Acc load(const bf16_t* p) {
  uint32_t bits = static_cast<uint32_t>(p->bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return static_cast<Acc>(f);
}

template <typename T, typename Acc>
inline void store(T* p, Acc v) {
  *p = static_cast<T>(v);
}

template <typename Acc>
inline void store(bf16_t* p, Acc v) {
  // Round to nearest even, as torch does; NaN stays a quiet NaN.
  float f = static_cast<float>(v);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    p->bits = 0x7fc0;
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  p->bits = static_cast<uint16_t>(bits >> 16);
}

// fp16 by its bits too. GCC 12 does not vectorise conversions of _Float16 without AVX512-FP16,
// so every loop that loaded or stored fp16 ran scalar (IF forward 7.4 ns per neuron-step against
// fp32's 0.6 and bf16's 0.5; bench/variant_sweep.py --dtype float16). Both are the exact IEEE
// conversions (round to nearest even on the way down, overflow to inf, subnormals rounded once);
// NaN becomes the quiet 0x7e00 with its sign, as torch's own conversion gives
// (tests/test_fp16_bits.py).
template <typename Acc>
inline Acc load(const f16_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  const uint32_t magnitude = h & 0x7fffu;
  const uint32_t shifted = magnitude << 13;  // the half's exponent and mantissa in a float's place
  float f;
  std::memcpy(&f, &shifted, sizeof f);
  f *= 0x1p112f;  // rebias the exponent by 127 − 15: exact for normal and subnormal halves
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (magnitude >= 0x7c00u) bits = shifted | 0x7f800000u;  // inf and NaN, payload kept
  bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof f);
  return static_cast<Acc>(f);
}

template <typename Acc>
inline void store(f16_t* p, Acc v) {
  const float x = static_cast<float>(v);
  uint32_t f;
  std::memcpy(&f, &x, sizeof f);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t o;
  if (f >= 0x47800000u) {  // ≥ 2^16 before rounding, inf or NaN
    o = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (f < 0x38800000u) {  // under 2^−14: a subnormal half or zero, rounded by one float add
    float t;
    std::memcpy(&t, &f, sizeof t);
    t += 0.5f;  // 2^−1: the half's last subnormal bit (2^−24) becomes the float's last mantissa bit
    uint32_t tb;
    std::memcpy(&tb, &t, sizeof tb);
    o = tb - 0x3f000000u;
  } else {  // normal: rebias, round to nearest even on the 13 dropped bits
    const uint32_t odd = (f >> 13) & 1u;
    o = (f + 0xc8000fffu + odd) >> 13;  // 0xc8000fff: (15 − 127) << 23, plus half an ulp less one
  }
  const uint16_t h = static_cast<uint16_t>(o | (sign >> 16));
  std::memcpy(p, &h, sizeof h);
}

// A spike (0 or 1) in each storage type; spikes never need rounding.
template <typename T>
inline T spike_value(bool fired) {
  return static_cast<T>(fired ? 1 : 0);
}

template <>
inline bf16_t spike_value<bf16_t>(bool fired) {
  return bf16_t{static_cast<uint16_t>(fired ? 0x3f80 : 0)};
}

// Whether a stored spike is a 1 (spikes are exactly 0 or 1 in every storage type).
template <typename T>
inline int32_t is_spike(T v) {
  return v != T(0);
}

template <>
inline int32_t is_spike<bf16_t>(bf16_t v) {
  return v.bits != 0;
}

template <>
inline f16_t spike_value<f16_t>(bool fired) {  // by its bits, as the conversions above
  const uint16_t bits = fired ? 0x3c00 : 0;
  f16_t v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

template <>
inline int32_t is_spike<f16_t>(f16_t v) {
  uint16_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits != 0;
}

}  // namespace rnl_fast
