// Python bindings (module rnl_fast._C). Tensors arrive as data pointers with their element
// counts; rnl_fast/ops.py has validated dtypes, devices and shapes, and every entry point here
// checks again that the sizes it is told fit the buffers it is given before touching memory.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include <omp.h>
#include <string>

#include "if_kernel.h"
#include "rate_norm_kernel.h"

namespace py = pybind11;
using namespace rnl_fast;

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("rnl_fast._C: " + message);
}

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <typename Acc>
NeuronParam<Acc> neuron_param(uintptr_t address, int64_t len, int64_t N, const char* name) {
  require(address != 0, std::string(name) + " is a null pointer");
  require(len == 1 || len == N, std::string(name) + " must hold 1 or N = " + std::to_string(N) +
                                    " values, got " + std::to_string(len));
  return {as_ptr<const Acc>(address), len};
}

void check_if_shape(const IFShape& s, int64_t x_len) {
  require(s.T >= 1, "T must be >= 1, got " + std::to_string(s.T));
  require(s.N >= 1, "N must be >= 1, got " + std::to_string(s.N));
  require(s.t_stride == 0 || s.t_stride == s.N,
          "the time stride of x must be 0 or N, got " + std::to_string(s.t_stride));
  require(x_len >= (s.T - 1) * s.t_stride + s.N,
          "x holds " + std::to_string(x_len) + " elements, fewer than T, N and its stride need");
}

template <typename In, typename Acc>
void if_forward_typed(uintptr_t x, IFShape shape, uintptr_t v_th, int64_t v_th_len,
                      uintptr_t v_init, int64_t v_init_len, double v_reset, int reset,
                      uintptr_t spikes, bool byte_spikes, uintptr_t v_final,
                      uintptr_t step_counts, uintptr_t neuron_counts, int num_threads) {
  const auto th = neuron_param<Acc>(v_th, v_th_len, shape.N, "v_th");
  const auto v0 = neuron_param<Acc>(v_init, v_init_len, shape.N, "v_init");
  py::gil_scoped_release release;
  if (byte_spikes) {
    if_forward<In, uint8_t, Acc>(as_ptr<const In>(x), shape, th, v0, static_cast<Acc>(v_reset),
                                 static_cast<Reset>(reset), as_ptr<uint8_t>(spikes),
                                 as_ptr<Acc>(v_final), as_ptr<int64_t>(step_counts),
                                 as_ptr<int32_t>(neuron_counts), num_threads);
  } else {
    if_forward<In, In, Acc>(as_ptr<const In>(x), shape, th, v0, static_cast<Acc>(v_reset),
                            static_cast<Reset>(reset), as_ptr<In>(spikes), as_ptr<Acc>(v_final),
                            as_ptr<int64_t>(step_counts), as_ptr<int32_t>(neuron_counts),
                            num_threads);
  }
}

void py_if_forward(uintptr_t x, int64_t x_len, int dtype, int64_t T, int64_t N, int64_t t_stride,
                   uintptr_t v_th, int64_t v_th_len, uintptr_t v_init, int64_t v_init_len,
                   double v_reset, int reset, uintptr_t spikes, int64_t spikes_len,
                   int spike_dtype, uintptr_t v_final, int64_t v_final_len,
                   uintptr_t step_counts, int64_t step_counts_len, uintptr_t neuron_counts,
                   int64_t neuron_counts_len, int num_threads) {
  const IFShape shape{T, N, t_stride};
  check_if_shape(shape, x_len);
  require(spikes_len >= T * N, "spikes must hold T*N elements");
  require(v_final_len >= N, "v_final needs N elements");
  require(!neuron_counts || neuron_counts_len >= N, "neuron_counts needs N elements (or a null pointer)");
  require(step_counts_len >= T, "step_counts needs T elements");
  require(x && spikes && v_final && step_counts, "null output pointer");
  require(reset == 0 || reset == 1, "reset must be 0 (soft) or 1 (hard)");
  require(spike_dtype == dtype || spike_dtype == static_cast<int>(DType::kUInt8),
          "spikes must be in the dtype of x or uint8");
  const bool bytes = spike_dtype == static_cast<int>(DType::kUInt8);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return if_forward_typed<float, float>(x, shape, v_th, v_th_len, v_init, v_init_len, v_reset,
                                            reset, spikes, bytes, v_final, step_counts,
                                            neuron_counts, num_threads);
    case DType::kFloat64:
      return if_forward_typed<double, double>(x, shape, v_th, v_th_len, v_init, v_init_len,
                                              v_reset, reset, spikes, bytes, v_final,
                                              step_counts, neuron_counts, num_threads);
    case DType::kFloat16:
      return if_forward_typed<f16_t, float>(x, shape, v_th, v_th_len, v_init, v_init_len, v_reset,
                                            reset, spikes, bytes, v_final, step_counts,
                                            neuron_counts, num_threads);
    case DType::kBFloat16:
      return if_forward_typed<bf16_t, float>(x, shape, v_th, v_th_len, v_init, v_init_len,
                                             v_reset, reset, spikes, bytes, v_final, step_counts,
                                             neuron_counts, num_threads);
    default:
      require(false, "x must be float32, float64, float16 or bfloat16 (dtype code " +
                         std::to_string(dtype) + ")");
  }
}

template <typename In, typename Acc>
void if_backward_typed(uintptr_t grad_spikes, uintptr_t grad_v_final, uintptr_t x, IFShape shape,
                       uintptr_t v_th, int64_t v_th_len, uintptr_t v_init, int64_t v_init_len,
                       double v_reset, int reset, int surrogate, double width, bool detach_reset,
                       uintptr_t grad_x, uintptr_t grad_v_init, int num_threads) {
  const auto th = neuron_param<Acc>(v_th, v_th_len, shape.N, "v_th");
  const auto v0 = neuron_param<Acc>(v_init, v_init_len, shape.N, "v_init");
  py::gil_scoped_release release;
  if_backward<In, Acc>(as_ptr<const In>(grad_spikes), as_ptr<const Acc>(grad_v_final),
                       as_ptr<const In>(x), shape, th, v0, static_cast<Acc>(v_reset),
                       static_cast<Reset>(reset), static_cast<Surrogate>(surrogate),
                       static_cast<Acc>(width), detach_reset, as_ptr<In>(grad_x),
                       as_ptr<Acc>(grad_v_init), num_threads);
}

void py_if_backward(uintptr_t grad_spikes, int64_t grad_spikes_len, uintptr_t grad_v_final,
                    int64_t grad_v_final_len, uintptr_t x, int64_t x_len, int dtype, int64_t T,
                    int64_t N, int64_t t_stride, uintptr_t v_th, int64_t v_th_len,
                    uintptr_t v_init, int64_t v_init_len, double v_reset, int reset,
                    int surrogate, double width, bool detach_reset, uintptr_t grad_x,
                    int64_t grad_x_len, uintptr_t grad_v_init, int64_t grad_v_init_len,
                    int num_threads) {
  const IFShape shape{T, N, t_stride};
  check_if_shape(shape, x_len);
  require(!grad_spikes || grad_spikes_len >= T * N, "grad_spikes must hold T*N elements");
  require(!grad_v_final || grad_v_final_len >= N, "grad_v_final must hold N elements");
  require(grad_x && grad_x_len >= T * N, "grad_x must hold T*N elements");
  require(grad_v_init && grad_v_init_len >= N, "grad_v_init must hold N elements");
  require(reset == 0 || reset == 1, "reset must be 0 (soft) or 1 (hard)");
  require(surrogate == 0 || surrogate == 1, "surrogate must be 0 (atan) or 1 (rectangle)");
  require(width > 0, "width must be > 0");
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return if_backward_typed<float, float>(grad_spikes, grad_v_final, x, shape, v_th, v_th_len,
                                             v_init, v_init_len, v_reset, reset, surrogate, width,
                                             detach_reset, grad_x, grad_v_init, num_threads);
    case DType::kFloat64:
      return if_backward_typed<double, double>(grad_spikes, grad_v_final, x, shape, v_th,
                                               v_th_len, v_init, v_init_len, v_reset, reset,
                                               surrogate, width, detach_reset, grad_x,
                                               grad_v_init, num_threads);
    case DType::kFloat16:
      return if_backward_typed<f16_t, float>(grad_spikes, grad_v_final, x, shape, v_th, v_th_len,
                                             v_init, v_init_len, v_reset, reset, surrogate, width,
                                             detach_reset, grad_x, grad_v_init, num_threads);
    case DType::kBFloat16:
      return if_backward_typed<bf16_t, float>(grad_spikes, grad_v_final, x, shape, v_th,
                                              v_th_len, v_init, v_init_len, v_reset, reset,
                                              surrogate, width, detach_reset, grad_x,
                                              grad_v_init, num_threads);
    default:
      require(false, "x must be float32, float64, float16 or bfloat16");
  }
}

// Dispatches an entry point on the input dtype; Acc is double for float64, else float.
template <typename Fn>
auto by_dtype(int dtype, Fn&& fn) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return fn(static_cast<float*>(nullptr), 0.0f);
    case DType::kFloat64:
      return fn(static_cast<double*>(nullptr), 0.0);
    case DType::kFloat16:
      return fn(static_cast<f16_t*>(nullptr), 0.0f);
    case DType::kBFloat16:
      return fn(static_cast<bf16_t*>(nullptr), 0.0f);
    default:
      throw std::invalid_argument("rnl_fast._C: x must be float32, float64, float16 or bfloat16");
  }
}

void py_if_forward_pool2x2(uintptr_t x, int64_t x_len, int dtype, int64_t T, int64_t N,
                           int64_t t_stride, int64_t planes, int64_t H, int64_t W, int64_t inner,
                           bool ceil_mode,
                           uintptr_t v_th, int64_t v_th_len, uintptr_t v_init, int64_t v_init_len,
                           double v_reset, int reset, double scale, uintptr_t pooled,
                           int64_t pooled_len, uintptr_t v_final, int64_t v_final_len,
                           uintptr_t step_counts, int64_t step_counts_len, uintptr_t neuron_counts,
                           int64_t neuron_counts_len, int num_threads) {
  const IFShape shape{T, N, t_stride};
  const PoolShape pool{planes, H, W, inner, ceil_mode};
  check_if_shape(shape, x_len);
  require(planes >= 1 && H >= 1 && W >= 1 && inner >= 1 && planes * H * W * inner == N,
          "the planes must tile the neurons: planes*H*W*inner == N");
  require(pool.out_h() >= 1 && pool.out_w() >= 1, "the planes are too small for a 2x2 window");
  require(pooled && pooled_len >= T * planes * pool.out_h() * pool.out_w() * inner,
          "pooled must hold T*planes*out_h*out_w*inner elements");
  require(v_final_len >= N, "v_final needs N elements");
  require(!neuron_counts || neuron_counts_len >= N, "neuron_counts needs N elements (or a null pointer)");
  require(step_counts_len >= T, "step_counts needs T elements");
  require(x && v_final && step_counts, "null pointer");
  require(reset == 0 || reset == 1, "reset must be 0 (soft) or 1 (hard)");
  by_dtype(dtype, [&](auto* tag, auto acc) {
    using In = std::remove_pointer_t<decltype(tag)>;
    using Acc = decltype(acc);
    const auto th = neuron_param<Acc>(v_th, v_th_len, N, "v_th");
    const auto v0 = neuron_param<Acc>(v_init, v_init_len, N, "v_init");
    py::gil_scoped_release release;
    if_forward_pool2x2<In, Acc>(as_ptr<const In>(x), shape, pool, th, v0, static_cast<Acc>(v_reset),
                                static_cast<Reset>(reset), static_cast<Acc>(scale), as_ptr<In>(pooled),
                                as_ptr<Acc>(v_final), as_ptr<int64_t>(step_counts),
                                as_ptr<int32_t>(neuron_counts), num_threads);
    return 0;
  });
}

double py_relu_max(uintptr_t x, int64_t M, int dtype, int num_threads) {
  require(x != 0 && M >= 1, "x must be a non-empty buffer");
  return by_dtype(dtype, [&](auto* tag, auto) {
    using In = std::remove_pointer_t<decltype(tag)>;
    py::gil_scoped_release release;
    return relu_max<In>(as_ptr<const In>(x), M, num_threads);
  });
}

py::tuple py_rate_norm_forward(uintptr_t x, int64_t M, int dtype, double theta, uintptr_t r,
                               int64_t r_len, int num_threads) {
  require(x != 0 && M >= 1, "x must be a non-empty buffer");
  require(r != 0 && r_len >= M, "r must hold M elements");
  require(theta > 0, "theta must be > 0");
  const RateSums sums = by_dtype(dtype, [&](auto* tag, auto acc) {
    using In = std::remove_pointer_t<decltype(tag)>;
    using Acc = decltype(acc);
    py::gil_scoped_release release;
    return rate_norm_forward<In, Acc>(as_ptr<const In>(x), M, static_cast<Acc>(theta),
                                      as_ptr<In>(r), num_threads);
  });
  return py::make_tuple(sums.sum_r, sums.sum_r2);
}

double py_rate_norm_backward(uintptr_t grad_r, int64_t grad_r_len, double grad_sum_r,
                             double grad_sum_r2, uintptr_t x, int64_t M, int dtype, double theta,
                             uintptr_t grad_x, int64_t grad_x_len, int num_threads) {
  require(x != 0 && M >= 1, "x must be a non-empty buffer");
  require(!grad_r || grad_r_len >= M, "grad_r must hold M elements");
  require(grad_x != 0 && grad_x_len >= M, "grad_x must hold M elements");
  require(theta > 0, "theta must be > 0");
  return by_dtype(dtype, [&](auto* tag, auto acc) {
    using In = std::remove_pointer_t<decltype(tag)>;
    using Acc = decltype(acc);
    py::gil_scoped_release release;
    return rate_norm_backward<In, Acc>(as_ptr<const In>(grad_r), static_cast<Acc>(grad_sum_r),
                                       static_cast<Acc>(grad_sum_r2), as_ptr<const In>(x), M,
                                       static_cast<Acc>(theta), as_ptr<In>(grad_x), num_threads);
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rnl_fast CPU kernels (plain C++, no torch headers). Call through rnl_fast.ops.";
  m.def("if_forward", &py_if_forward);
  m.def("if_forward_pool2x2", &py_if_forward_pool2x2);
  m.def("if_backward", &py_if_backward);
  m.def("relu_max", &py_relu_max);
  m.def("rate_norm_forward", &py_rate_norm_forward);
  m.def("rate_norm_backward", &py_rate_norm_backward);
  m.def("max_threads", []() { return omp_get_max_threads(); });
}
