// Channel-wise Rate Norm: the per-element arithmetic of rate_norm_rate.h with θ looked up per
// channel. Memory is walked in one of two ways: lines of `inner` elements of one channel (NCHW,
// inner = H·W), split in chunks of at most kSumChunk; or, when inner = 1 (channels-last, [B, F]),
// blocks of rows of C elements, one per channel, vectorised over the channels. Per-channel
// reductions (the batch max, dL/dθ_c) go through per-thread arrays of C values.
#include "rate_norm_channel_kernel.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "chunked_sums.h"
#include "rate_norm_lines.h"
#include "rate_norm_scalars.h"

namespace rnl_fast {
namespace {

// A stretch of elements of one channel: [begin, end).
struct Line {
  int64_t begin, end, channel;
};

// The work items the threads share: with inner > 1, chunks of lines; with inner = 1, blocks of rows.
struct Walk {
  int64_t M, C, inner;

  bool by_rows() const { return inner == 1; }
  int64_t parts_per_line() const { return (inner + kSumChunk - 1) / kSumChunk; }
  int64_t rows_per_item() const { return std::max<int64_t>(1, kSumChunk / C); }
  int64_t items() const {
    if (by_rows()) return (M / C + rows_per_item() - 1) / rows_per_item();
    return (M / inner) * parts_per_line();
  }
  // Lines: the chunk `item` of line item / parts_per_line, whose channel is line % C.
  Line line(int64_t item) const {
    const int64_t j = item / parts_per_line(), begin = j * inner + (item % parts_per_line()) * kSumChunk;
    return {begin, std::min(j * inner + inner, begin + kSumChunk), j % C};
  }
  // Rows: the rows [first, last) of block `item`.
  int64_t first_row(int64_t item) const { return item * rows_per_item(); }
  int64_t last_row(int64_t item) const { return std::min(M / C, (item + 1) * rows_per_item()); }
};

// max(relu(x[0..n))), NaN skipped.
template <typename In>
inline float relu_max_of(const In* __restrict x, int64_t n) {
  float best = 0.0f;
#pragma omp simd reduction(max : best)
  for (int64_t i = 0; i < n; ++i) {
    const float v = load<float>(x + i);
    best = v > best ? v : best;  // false for NaN: NaN is skipped
  }
  return best;
}

// best[c] = max(relu(x)) over the elements of channel c, NaN skipped.
template <typename In>
void channel_relu_max(const In* x, const Walk& w, float* best, int num_threads) {
  std::fill(best, best + w.C, 0.0f);  // relu: the max is never below 0
  const int64_t items = w.items(), C = w.C;
#pragma omp parallel num_threads(num_threads) if (w.M >= kParallelMinWork)
  {
    std::vector<float> mine(C, 0.0f);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      if (w.by_rows()) {
        for (int64_t o = w.first_row(item); o < w.last_row(item); ++o) {
          const In* xo = x + o * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float v = load<float>(xo + c);
            mine[c] = v > mine[c] ? v : mine[c];  // false for NaN: NaN is skipped
          }
        }
      } else {
        const Line line = w.line(item);
        mine[line.channel] = std::max(mine[line.channel], relu_max_of(x + line.begin, line.end - line.begin));
      }
    }
#pragma omp critical
    for (int64_t c = 0; c < C; ++c) best[c] = std::max(best[c], mine[c]);
  }
}

// Writes the rows [first, last) of C elements, one per channel (offset o·C), and returns their
// (Σr, Σr²) accumulated in double; not inlined, as rate_norm_lines.h's loops.
template <bool QUANT, typename In, typename Acc>
__attribute__((noinline)) std::array<double, 2> forward_rows(const In* __restrict x, int64_t first, int64_t last,
                                                             int64_t C, const Acc* __restrict theta, Acc levels,
                                                             In* __restrict r) {
  double sum_r = 0, sum_r2 = 0;
  for (int64_t o = first; o < last; ++o) {
    const In* xo = x + o * C;
    In* ro = r + o * C;
#pragma omp simd reduction(+ : sum_r, sum_r2)
    for (int64_t c = 0; c < C; ++c) {
      const Acc rate = forward_rate<QUANT>(load<Acc>(xo + c), theta[c], levels);
      store(ro + c, rate);
      sum_r += rate;
      sum_r2 += rate * rate;
    }
  }
  return {sum_r, sum_r2};
}

// Writes r [M] and returns (Σr, Σr²).
template <bool QUANT, typename In, typename Acc>
RateNormSums forward_pass(const In* x, const Walk& w, const Acc* theta, Acc levels, In* r, int num_threads) {
  const auto sums = parallel_sums<2>(w.items(), w.M >= kParallelMinWork, num_threads, [&](int64_t item) {
    if (w.by_rows()) return forward_rows<QUANT>(x, w.first_row(item), w.last_row(item), w.C, theta, levels, r);
    const Line line = w.line(item);
    return forward_line<QUANT>(x, line.begin, line.end, theta[line.channel], levels, r);
  });
  return {sums[0], sums[1]};
}

// One row of C elements, one per channel (offset o·C); adds each channel's dL/dθ to chunk[c].
template <bool HAS_GRAD_R, bool SUM_R2, bool QUANT, typename In, typename Acc>
__attribute__((noinline)) void backward_row(const In* __restrict grad_r, Acc grad_sum_r, Acc grad_sum_r2,
                                            const In* __restrict x, int64_t offset, int64_t C,
                                            const Acc* __restrict theta, Acc levels, In* __restrict grad_x,
                                            double* __restrict chunk) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    chunk[c] += backward_element<HAS_GRAD_R, SUM_R2, QUANT>(grad_r, grad_sum_r, grad_sum_r2, x, offset + c, theta[c],
                                                            levels, grad_x);
  }
}

// Writes grad_x [M] and grad_theta [C] (dL/dθ_c, summed in double across chunks).
template <bool HAS_GRAD_R, bool SUM_R2, bool QUANT, typename In, typename Acc>
void backward_pass(const In* __restrict grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* __restrict x,
                   const Walk& w, const Acc* theta, Acc levels, In* __restrict grad_x, double* grad_theta,
                   int num_threads) {
  const int64_t items = w.items(), C = w.C;
  std::fill(grad_theta, grad_theta + C, 0.0);
#pragma omp parallel num_threads(num_threads) if (w.M >= kParallelMinWork)
  {
    std::vector<double> mine(C, 0.0);
    std::vector<double> chunk(w.by_rows() ? C : 0);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      if (w.by_rows()) {
        std::fill(chunk.begin(), chunk.end(), 0.0);
        for (int64_t o = w.first_row(item); o < w.last_row(item); ++o) {
          backward_row<HAS_GRAD_R, SUM_R2, QUANT>(grad_r, grad_sum_r, grad_sum_r2, x, o * C, C, theta, levels, grad_x,
                                          chunk.data());
        }
        for (int64_t c = 0; c < C; ++c) mine[c] += chunk[c];
      } else {
        const Line line = w.line(item);
        mine[line.channel] += backward_line<HAS_GRAD_R, SUM_R2, QUANT>(
            grad_r, grad_sum_r, grad_sum_r2, x, line.begin, line.end, theta[line.channel], levels, grad_x);
      }
    }
#pragma omp critical
    for (int64_t c = 0; c < C; ++c) grad_theta[c] += mine[c];
  }
}

// θ_c for every channel (rate_norm_scalars.h, each > 0 or std::invalid_argument); returns p.
template <typename Acc>
Acc channel_thresholds(double raw_p, const float* running_max, int64_t C, double theta_eps, Acc* theta) {
  Acc p = 0;
  for (int64_t c = 0; c < C; ++c) {
    const auto threshold = checked_threshold<Acc>(raw_p, running_max[c], theta_eps);
    theta[c] = threshold.theta;
    p = threshold.p;
  }
  return p;
}

}  // namespace

template <typename In, typename Acc>
RateNormSums rate_norm_channel_forward(const In* x, int64_t M, int64_t C, int64_t inner, double raw_p,
                                       const float* running_max, double momentum, bool training, double theta_eps,
                                       int levels, In* r, float* running_max_out, int num_threads) {
  const Walk walk{M, C, inner};
  if (training) {
    channel_relu_max(x, walk, running_max_out, num_threads);
    for (int64_t c = 0; c < C; ++c) running_max_out[c] = blend_running_max(running_max[c], running_max_out[c], momentum);
  } else {
    std::copy(running_max, running_max + C, running_max_out);
  }
  std::vector<Acc> theta(C);
  channel_thresholds<Acc>(raw_p, running_max_out, C, theta_eps, theta.data());
  return levels > 0 ? forward_pass<true>(x, walk, theta.data(), Acc(levels), r, num_threads)
                    : forward_pass<false>(x, walk, theta.data(), Acc(0), r, num_threads);
}

template <typename In, typename Acc>
Acc rate_norm_channel_backward(const In* grad_r, Acc grad_sum_r, Acc grad_sum_r2, const In* x, int64_t M, int64_t C,
                               int64_t inner, double raw_p, const float* running_max, double theta_eps, int levels,
                               In* grad_x, int num_threads) {
  const Walk walk{M, C, inner};
  std::vector<Acc> theta(C);
  const Acc p = channel_thresholds<Acc>(raw_p, running_max, C, theta_eps, theta.data());
  std::vector<double> grad_theta(C);
  const Acc L = Acc(levels);
  with_backward_variant(grad_r != nullptr, grad_sum_r2 != Acc(0), levels > 0, [&](auto g, auto s, auto q) {
    backward_pass<decltype(g)::value, decltype(s)::value, decltype(q)::value>(
        grad_r, grad_sum_r, grad_sum_r2, x, walk, theta.data(), L, grad_x, grad_theta.data(), num_threads);
  });
  // dL/dp = Σ_c dL/dθ_c · running_max_c (θ_c = p·running_max_c + eps; the running max gets none).
  double grad_p = 0.0;
  for (int64_t c = 0; c < C; ++c) grad_p += grad_theta[c] * static_cast<double>(running_max[c]);
  return grad_raw_p_from_grad_p(grad_p, p);
}

#define RNL_FAST_RATE_NORM_CHANNEL_TYPES(code, In, Acc)                                                          \
  template RateNormSums rate_norm_channel_forward<In, Acc>(const In*, int64_t, int64_t, int64_t, double,          \
                                                           const float*, double, bool, double, int, In*, float*, \
                                                           int);                                                \
  template Acc rate_norm_channel_backward<In, Acc>(const In*, Acc, Acc, const In*, int64_t, int64_t, int64_t,     \
                                                   double, const float*, double, int, In*, int);

RNL_FAST_INPUT_TYPES(RNL_FAST_RATE_NORM_CHANNEL_TYPES)

}  // namespace rnl_fast
