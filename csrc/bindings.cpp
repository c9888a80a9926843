// Python bindings (module rnl_fast._C). Tensors arrive as data pointers with their element
// counts; rnl_fast.ops has validated dtypes, devices and shapes, and every entry point here
// checks again that the sizes it is told fit the buffers it is given before touching memory.
// Every argument is keyword-only (py::arg names), and the codes (DType, Reset, Surrogate) are
// enums that Python finds by name: nothing is mirrored by hand on the Python side.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "huge_page_buffer.h"
#include "if_kernel.h"
#include "qcfs_kernel.h"
#include "rate_norm_channel_kernel.h"
#include "rate_norm_kernel.h"
#include "rate_norm_scalars.h"

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

// The element type In of an input and the type Acc its arithmetic runs in.
template <typename In_, typename Acc_>
struct Types {
  using In = In_;
  using Acc = Acc_;
};

// Calls fn(Types<In, Acc>{}) for the input dtype: the one place where a DType becomes C++ types
// (RNL_FAST_INPUT_TYPES, numeric.h). Every branch of fn must return the same type.
template <typename Fn>
decltype(auto) by_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
#define RNL_FAST_DTYPE_CASE(code, In, Acc) \
  case DType::code:                        \
    return fn(Types<In, Acc>{});
    RNL_FAST_INPUT_TYPES(RNL_FAST_DTYPE_CASE)
#undef RNL_FAST_DTYPE_CASE
    default:
      throw std::invalid_argument("rnl_fast._C: x must be float32, float64, float16 or bfloat16");
  }
}

template <typename Acc>
NeuronParam<Acc> neuron_param(uintptr_t address, int64_t len, int64_t N, const char* name) {
  require(address != 0, std::string(name) + " is a null pointer");
  require(len == 1 || len == N, std::string(name) + " must hold 1 or N = " + std::to_string(N) +
                                    " values, got " + std::to_string(len));
  return {as_ptr<const Acc>(address), len};
}

// by_dtype for the IF entry points: fn(types, v_th, v_init) gets the thresholds and initial
// membranes (1 or N values of Acc each) checked and typed, and runs without the GIL.
template <typename Fn>
void by_dtype_with_params(DType dtype, int64_t N, uintptr_t v_th, int64_t v_th_len, uintptr_t v_init,
                          int64_t v_init_len, Fn&& fn) {
  by_dtype(dtype, [&](auto types) {
    using Acc = typename decltype(types)::Acc;
    const auto th = neuron_param<Acc>(v_th, v_th_len, N, "v_th");
    const auto v0 = neuron_param<Acc>(v_init, v_init_len, N, "v_init");
    py::gil_scoped_release release;
    fn(types, th, v0);
  });
}

void check_if_shape(const IFShape& s, uintptr_t x, int64_t x_len) {
  require(x != 0, "x is a null pointer");
  require(s.T >= 1, "T must be >= 1, got " + std::to_string(s.T));
  require(s.N >= 1, "N must be >= 1, got " + std::to_string(s.N));
  require(s.t_stride == 0 || s.t_stride == s.N,
          "the time stride of x must be 0 or N, got " + std::to_string(s.t_stride));
  require(x_len >= (s.T - 1) * s.t_stride + s.N,
          "x holds " + std::to_string(x_len) + " elements, fewer than T, N and its stride need");
}

// The per-neuron and per-step outputs of both forward ops.
void check_state_outputs(const IFShape& s, uintptr_t v_final, int64_t v_final_len, uintptr_t step_counts,
                         int64_t step_counts_len, uintptr_t neuron_counts, int64_t neuron_counts_len) {
  require(v_final && v_final_len >= s.N, "v_final needs N elements");
  require(step_counts && step_counts_len >= s.T, "step_counts needs T elements");
  require(!neuron_counts || neuron_counts_len >= s.N, "neuron_counts needs N elements (or a null pointer)");
}

void py_if_forward(uintptr_t x, int64_t x_len, DType dtype, int64_t T, int64_t N, int64_t t_stride,
                   uintptr_t v_th, int64_t v_th_len, uintptr_t v_init, int64_t v_init_len, double v_reset,
                   Reset reset, uintptr_t spikes, int64_t spikes_len, DType spike_dtype, uintptr_t v_final,
                   int64_t v_final_len, uintptr_t step_counts, int64_t step_counts_len, uintptr_t neuron_counts,
                   int64_t neuron_counts_len, int num_threads) {
  const IFShape shape{T, N, t_stride};
  check_if_shape(shape, x, x_len);
  require(spikes && spikes_len >= T * N, "spikes must hold T*N elements");
  check_state_outputs(shape, v_final, v_final_len, step_counts, step_counts_len, neuron_counts, neuron_counts_len);
  require(spike_dtype == dtype || spike_dtype == DType::kUInt8, "spikes must be in the dtype of x or uint8");
  by_dtype_with_params(dtype, N, v_th, v_th_len, v_init, v_init_len, [&](auto types, auto th, auto v0) {
    using In = typename decltype(types)::In;
    using Acc = typename decltype(types)::Acc;
    const auto run = [&](auto* spikes_out) {  // spikes in the input's type, or as bytes
      using Out = std::remove_pointer_t<decltype(spikes_out)>;
      if_forward<In, Out, Acc>(as_ptr<const In>(x), shape, th, v0, static_cast<Acc>(v_reset), reset, spikes_out,
                               as_ptr<Acc>(v_final), as_ptr<int64_t>(step_counts), as_ptr<int32_t>(neuron_counts),
                               num_threads);
    };
    if (spike_dtype == DType::kUInt8) {
      run(as_ptr<uint8_t>(spikes));
    } else {
      run(as_ptr<In>(spikes));
    }
  });
}

void py_if_forward_pool2x2(uintptr_t x, int64_t x_len, DType dtype, int64_t T, int64_t N, int64_t t_stride,
                           uintptr_t v_th, int64_t v_th_len, uintptr_t v_init, int64_t v_init_len, int64_t planes,
                           int64_t H, int64_t W, int64_t inner, bool ceil_mode, double v_reset, Reset reset,
                           double scale, uintptr_t pooled, int64_t pooled_len, uintptr_t v_final,
                           int64_t v_final_len, uintptr_t step_counts, int64_t step_counts_len,
                           uintptr_t neuron_counts, int64_t neuron_counts_len, int num_threads) {
  const IFShape shape{T, N, t_stride};
  const PoolShape pool{planes, H, W, inner, ceil_mode};
  check_if_shape(shape, x, x_len);
  require(planes >= 1 && H >= 1 && W >= 1 && inner >= 1 && planes * H * W * inner == N,
          "the planes must tile the neurons: planes*H*W*inner == N");
  require(pool.out_h() >= 1 && pool.out_w() >= 1, "the planes are too small for a 2x2 window");
  require(pooled && pooled_len >= T * planes * pool.out_h() * pool.out_w() * inner,
          "pooled must hold T*planes*out_h*out_w*inner elements");
  check_state_outputs(shape, v_final, v_final_len, step_counts, step_counts_len, neuron_counts, neuron_counts_len);
  by_dtype_with_params(dtype, N, v_th, v_th_len, v_init, v_init_len, [&](auto types, auto th, auto v0) {
    using In = typename decltype(types)::In;
    using Acc = typename decltype(types)::Acc;
    if_forward_pool2x2<In, Acc>(as_ptr<const In>(x), shape, pool, th, v0, static_cast<Acc>(v_reset), reset,
                                static_cast<Acc>(scale), as_ptr<In>(pooled), as_ptr<Acc>(v_final),
                                as_ptr<int64_t>(step_counts), as_ptr<int32_t>(neuron_counts), num_threads);
  });
}

void py_if_backward(uintptr_t grad_spikes, int64_t grad_spikes_len, uintptr_t grad_v_final,
                    int64_t grad_v_final_len, uintptr_t x, int64_t x_len, DType dtype, int64_t T, int64_t N,
                    int64_t t_stride, uintptr_t v_th, int64_t v_th_len, uintptr_t v_init, int64_t v_init_len,
                    double v_reset, Reset reset, Surrogate surrogate, double width, bool detach_reset,
                    uintptr_t grad_x, int64_t grad_x_len, uintptr_t grad_v_init, int64_t grad_v_init_len,
                    int num_threads) {
  const IFShape shape{T, N, t_stride};
  check_if_shape(shape, x, x_len);
  require(!grad_spikes || grad_spikes_len >= T * N, "grad_spikes must hold T*N elements");
  require(!grad_v_final || grad_v_final_len >= N, "grad_v_final must hold N elements");
  require(grad_x && grad_x_len >= T * N, "grad_x must hold T*N elements");
  require(grad_v_init && grad_v_init_len >= N, "grad_v_init must hold N elements");
  require(width > 0, "width must be > 0");
  by_dtype_with_params(dtype, N, v_th, v_th_len, v_init, v_init_len, [&](auto types, auto th, auto v0) {
    using In = typename decltype(types)::In;
    using Acc = typename decltype(types)::Acc;
    if_backward<In, Acc>(as_ptr<const In>(grad_spikes), as_ptr<const Acc>(grad_v_final), as_ptr<const In>(x),
                         shape, th, v0, static_cast<Acc>(v_reset), reset, surrogate, static_cast<Acc>(width),
                         detach_reset, as_ptr<In>(grad_x), as_ptr<Acc>(grad_v_init), num_threads);
  });
}

void check_rate_norm_buffers(uintptr_t x, int64_t x_len, uintptr_t out, int64_t out_len, const char* out_name) {
  require(x != 0 && x_len >= 1, "x must be a non-empty buffer");
  require(out != 0 && out_len >= x_len, std::string(out_name) + " must hold x_len elements");
}

// Returns (the running max used, Σr, Σr²).
py::tuple py_rate_norm_forward(uintptr_t x, int64_t x_len, DType dtype, double raw_p, float running_max,
                               double momentum, bool training, double theta_eps, int levels, uintptr_t r,
                               int64_t r_len, int num_threads) {
  check_rate_norm_buffers(x, x_len, r, r_len, "r");
  require(levels >= 0, "levels must be >= 0 (0: no quantization)");
  const RateNormForward out = by_dtype(dtype, [&](auto types) {
    using In = typename decltype(types)::In;
    using Acc = typename decltype(types)::Acc;
    py::gil_scoped_release release;
    return rate_norm_forward<In, Acc>(as_ptr<const In>(x), x_len, raw_p, running_max, momentum, training,
                                      theta_eps, levels, as_ptr<In>(r), num_threads);
  });
  return py::make_tuple(out.running_max, out.sum_r, out.sum_r2);
}

// Returns dL/draw_p, a value of the compute dtype.
double py_rate_norm_backward(uintptr_t grad_r, int64_t grad_r_len, double grad_sum_r, double grad_sum_r2,
                             uintptr_t x, int64_t x_len, DType dtype, double raw_p, float running_max,
                             double theta_eps, int levels, uintptr_t grad_x, int64_t grad_x_len, int num_threads) {
  check_rate_norm_buffers(x, x_len, grad_x, grad_x_len, "grad_x");
  require(!grad_r || grad_r_len >= x_len, "grad_r must hold x_len elements");
  require(levels >= 0, "levels must be >= 0 (0: no quantization)");
  return by_dtype(dtype, [&](auto types) {
    using In = typename decltype(types)::In;
    using Acc = typename decltype(types)::Acc;
    py::gil_scoped_release release;
    return static_cast<double>(rate_norm_backward<In, Acc>(
        as_ptr<const In>(grad_r), static_cast<Acc>(grad_sum_r), static_cast<Acc>(grad_sum_r2), as_ptr<const In>(x),
        x_len, raw_p, running_max, theta_eps, levels, as_ptr<In>(grad_x), num_threads));
  });
}

// The layout of a channel-wise call: x_len = (x_len / (C·inner))·C·inner, and the running max
// buffers hold C values.
void check_channels(int64_t x_len, int64_t channels, int64_t inner, int levels) {
  require(channels >= 1 && inner >= 1, "channels and inner must be >= 1");
  require(x_len % (channels * inner) == 0, "x_len must be a multiple of channels*inner");
  require(levels >= 0, "levels must be >= 0 (0: no quantization)");
}

// Returns (Σr, Σr²); writes r and the running max used, [channels] float32.
py::tuple py_rate_norm_channel_forward(uintptr_t x, int64_t x_len, DType dtype, int64_t channels, int64_t inner,
                                       double raw_p, uintptr_t running_max, int64_t running_max_len, double momentum,
                                       bool training, double theta_eps, int levels, uintptr_t r, int64_t r_len,
                                       uintptr_t running_max_out, int64_t running_max_out_len, int num_threads) {
  check_rate_norm_buffers(x, x_len, r, r_len, "r");
  check_channels(x_len, channels, inner, levels);
  require(running_max && running_max_len == channels, "running_max must hold channels values");
  require(running_max_out && running_max_out_len == channels, "running_max_out must hold channels values");
  const RateNormSums out = by_dtype(dtype, [&](auto types) {
    using In = typename decltype(types)::In;
    using Acc = typename decltype(types)::Acc;
    py::gil_scoped_release release;
    return rate_norm_channel_forward<In, Acc>(as_ptr<const In>(x), x_len, channels, inner, raw_p,
                                              as_ptr<const float>(running_max), momentum, training, theta_eps, levels,
                                              as_ptr<In>(r), as_ptr<float>(running_max_out), num_threads);
  });
  return py::make_tuple(out.sum_r, out.sum_r2);
}

// Returns dL/draw_p, a value of the compute dtype.
double py_rate_norm_channel_backward(uintptr_t grad_r, int64_t grad_r_len, double grad_sum_r, double grad_sum_r2,
                                     uintptr_t x, int64_t x_len, DType dtype, int64_t channels, int64_t inner,
                                     double raw_p, uintptr_t running_max, int64_t running_max_len, double theta_eps,
                                     int levels, uintptr_t grad_x, int64_t grad_x_len, int num_threads) {
  check_rate_norm_buffers(x, x_len, grad_x, grad_x_len, "grad_x");
  check_channels(x_len, channels, inner, levels);
  require(!grad_r || grad_r_len >= x_len, "grad_r must hold x_len elements");
  require(running_max && running_max_len == channels, "running_max must hold channels values");
  return by_dtype(dtype, [&](auto types) {
    using In = typename decltype(types)::In;
    using Acc = typename decltype(types)::Acc;
    py::gil_scoped_release release;
    return static_cast<double>(rate_norm_channel_backward<In, Acc>(
        as_ptr<const In>(grad_r), static_cast<Acc>(grad_sum_r), static_cast<Acc>(grad_sum_r2), as_ptr<const In>(x),
        x_len, channels, inner, raw_p, as_ptr<const float>(running_max), theta_eps, levels, as_ptr<In>(grad_x),
        num_threads));
  });
}

void py_qcfs_forward(uintptr_t x, int64_t x_len, DType dtype, double threshold, int levels, uintptr_t y,
                     int64_t y_len, int num_threads) {
  check_rate_norm_buffers(x, x_len, y, y_len, "y");
  require(levels >= 1, "levels must be >= 1");
  by_dtype(dtype, [&](auto types) {
    using In = typename decltype(types)::In;
    using Acc = typename decltype(types)::Acc;
    py::gil_scoped_release release;
    qcfs_forward<In, Acc>(as_ptr<const In>(x), x_len, threshold, levels, as_ptr<In>(y), num_threads);
  });
}

// Returns dL/dthreshold, a value of the compute dtype.
double py_qcfs_backward(uintptr_t grad_y, int64_t grad_y_len, uintptr_t x, int64_t x_len, DType dtype,
                        double threshold, int levels, uintptr_t grad_x, int64_t grad_x_len, int num_threads) {
  check_rate_norm_buffers(x, x_len, grad_x, grad_x_len, "grad_x");
  require(grad_y && grad_y_len >= x_len, "grad_y must hold x_len elements");
  require(levels >= 1, "levels must be >= 1");
  return by_dtype(dtype, [&](auto types) {
    using In = typename decltype(types)::In;
    using Acc = typename decltype(types)::Acc;
    py::gil_scoped_release release;
    return static_cast<double>(static_cast<Acc>(qcfs_backward<In, Acc>(
        as_ptr<const In>(grad_y), as_ptr<const In>(x), x_len, threshold, levels, as_ptr<In>(grad_x), num_threads)));
  });
}

double py_rate_norm_threshold(double raw_p, float running_max, double theta_eps, DType dtype) {
  return by_dtype(dtype, [&](auto types) {
    using Acc = typename decltype(types)::Acc;
    return static_cast<double>(rate_norm_threshold<Acc>(raw_p, running_max, theta_eps).theta);
  });
}

double py_rate_norm_grad_raw_p(double grad_theta, double raw_p, float running_max, DType dtype) {
  return by_dtype(dtype, [&](auto types) {
    using Acc = typename decltype(types)::Acc;
    return static_cast<double>(grad_raw_p<Acc>(grad_theta, running_max, sigmoid(static_cast<Acc>(raw_p))));
  });
}

// Binds fn with keyword-only arguments of these names, in the order of its C++ parameters.
template <typename Fn, typename... Names>
void def_keywords(py::module_& m, const char* name, Fn&& fn, const char* doc, Names... names) {
  m.def(name, std::forward<Fn>(fn), doc, py::kw_only(), py::arg(names)...);
}

// Argument names that several entry points share: an IF input with its thresholds and initial
// membranes, and the per-neuron and per-step outputs of the IF forward ops.
#define RNL_FAST_IF_INPUT \
  "x", "x_len", "dtype", "T", "N", "t_stride", "v_th", "v_th_len", "v_init", "v_init_len"
#define RNL_FAST_IF_STATE \
  "v_final", "v_final_len", "step_counts", "step_counts_len", "neuron_counts", "neuron_counts_len"

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rnl_fast CPU kernels (plain C++, no torch headers). Call through rnl_fast.ops.";

  py::enum_<DType>(m, "DType", "Storage type of a tensor: torch's dtype names.")
      .value("float32", DType::kFloat32)
      .value("float64", DType::kFloat64)
      .value("float16", DType::kFloat16)
      .value("bfloat16", DType::kBFloat16)
      .value("uint8", DType::kUInt8);
  py::enum_<Reset>(m, "Reset", "The membrane reset after a spike.")
      .value("soft", Reset::kSoft)
      .value("hard", Reset::kHard);
  py::enum_<Surrogate>(m, "Surrogate", "The surrogate spike derivative: rnl_fast.numerics.SURROGATES.")
      .value("atan", Surrogate::kAtan)
      .value("rectangle", Surrogate::kRectangle)
      .value("sigmoid", Surrogate::kSigmoid);

  def_keywords(m, "if_forward", &py_if_forward, "IF neurons over T steps: spikes, final membrane, spike counts.",
               RNL_FAST_IF_INPUT, "v_reset", "reset", "spikes", "spikes_len", "spike_dtype", RNL_FAST_IF_STATE,
               "num_threads");
  def_keywords(m, "if_forward_pool2x2", &py_if_forward_pool2x2,
               "IF neurons with their spikes averaged over 2x2 windows: pooled spikes, final membrane, counts.",
               RNL_FAST_IF_INPUT, "planes", "H", "W", "inner", "ceil_mode", "v_reset", "reset", "scale", "pooled",
               "pooled_len", RNL_FAST_IF_STATE, "num_threads");
  def_keywords(m, "if_backward", &py_if_backward, "Backpropagation through time of if_forward.", "grad_spikes",
               "grad_spikes_len", "grad_v_final", "grad_v_final_len", RNL_FAST_IF_INPUT, "v_reset", "reset",
               "surrogate", "width", "detach_reset", "grad_x", "grad_x_len", "grad_v_init", "grad_v_init_len",
               "num_threads");
  def_keywords(m, "rate_norm_forward", &py_rate_norm_forward,
               "Rate Norm forward: writes r, returns (running max used, sum r, sum r^2).", "x", "x_len", "dtype",
               "raw_p", "running_max", "momentum", "training", "theta_eps", "levels", "r", "r_len", "num_threads");
  def_keywords(m, "rate_norm_backward", &py_rate_norm_backward, "Rate Norm backward: writes grad_x, returns dL/draw_p.",
               "grad_r", "grad_r_len", "grad_sum_r", "grad_sum_r2", "x", "x_len", "dtype", "raw_p", "running_max",
               "theta_eps", "levels", "grad_x", "grad_x_len", "num_threads");
  def_keywords(m, "rate_norm_channel_forward", &py_rate_norm_channel_forward,
               "Channel-wise Rate Norm forward: writes r and the running max used, returns (sum r, sum r^2).", "x",
               "x_len", "dtype", "channels", "inner", "raw_p", "running_max", "running_max_len", "momentum",
               "training", "theta_eps", "levels", "r", "r_len", "running_max_out", "running_max_out_len",
               "num_threads");
  def_keywords(m, "rate_norm_channel_backward", &py_rate_norm_channel_backward,
               "Channel-wise Rate Norm backward: writes grad_x, returns dL/draw_p.", "grad_r", "grad_r_len",
               "grad_sum_r", "grad_sum_r2", "x", "x_len", "dtype", "channels", "inner", "raw_p", "running_max",
               "running_max_len", "theta_eps", "levels", "grad_x", "grad_x_len", "num_threads");

  def_keywords(m, "qcfs_forward", &py_qcfs_forward, "QCFS activation: writes y.", "x", "x_len", "dtype",
               "threshold", "levels", "y", "y_len", "num_threads");
  def_keywords(m, "qcfs_backward", &py_qcfs_backward, "QCFS backward: writes grad_x, returns dL/dthreshold.",
               "grad_y", "grad_y_len", "x", "x_len", "dtype", "threshold", "levels", "grad_x", "grad_x_len",
               "num_threads");

  // The Rate Norm scalars on their own, for the tests that compare their bits with the spec's.
  def_keywords(m, "rate_norm_threshold", &py_rate_norm_threshold, "theta = sigmoid(raw_p)*running_max + theta_eps.",
               "raw_p", "running_max", "theta_eps", "dtype");
  def_keywords(m, "blend_running_max", &blend_running_max,
               "(1 - momentum)*running_max + momentum*batch_max in float32.", "running_max", "batch_max",
               "momentum");
  def_keywords(m, "rate_norm_grad_raw_p", &py_rate_norm_grad_raw_p,
               "dL/draw_p = grad_theta*running_max*p*(1 - p), p = sigmoid(raw_p).", "grad_theta", "raw_p",
               "running_max", "dtype");
  m.def("max_threads", []() { return omp_get_max_threads(); });

  // The memory of a large CPU output (rnl_fast/ops/_pages.py wraps it in a tensor).
  py::class_<HugePageBuffer>(m, "HugePageBuffer", py::buffer_protocol(),
                             "nbytes of writable memory on a 2 MiB boundary, advised to huge pages.")
      .def(py::init<std::size_t, bool>(), py::kw_only(), py::arg("nbytes"), py::arg("advise"))
      .def_property_readonly("address", [](const HugePageBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("nbytes", &HugePageBuffer::nbytes)
      .def_property_readonly("advised", &HugePageBuffer::advised)
      .def_buffer([](HugePageBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {1}, /*readonly=*/false);
      });
}
