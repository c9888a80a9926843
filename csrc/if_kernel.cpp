// Multi-step IF neurons: the forward walks one span of neurons per task (if_forward), the backward
// one block per task with all T steps in a thread-local scratch (if_backward); the neuron index is
// innermost so that the compiler vectorises it. (Neuron-outer / time-inner would stride N elements
// per step: ~10× slower on a 2-core build machine.)
#include "if_kernel.h"
#include "exp_nonpositive.h"
#include "if_steps.h"

#include <omp.h>

#include <algorithm>
#include <functional>
#include <tuple>
#include <cmath>
#include <type_traits>
#include <vector>

namespace rnl_fast {
namespace {

using detail::kForwardBlock;
using detail::kForwardSpan;
using detail::kSpanSteps;
// The backward keeps T × block membranes in a thread-local scratch: the block is as wide as fits
// kBackwardScratch bytes (a core's L2), between 64 and kBackwardMaxBlock neurons. (Backward op,
// fp32 on 2 cores, median: T = 32 × 2M 35.7 ms with fixed 256-neuron blocks, 25.5 ms now;
// T = 256 × 256K 29.2 → 25.6 ms; a clone of the T = 32 input takes 12 ms.)
constexpr int64_t kBackwardMaxBlock = 1024;
constexpr int64_t kBackwardScratch = 1024 * 1024;

template <typename Acc>
int64_t backward_block_size(int64_t T) {
  const int64_t fit = kBackwardScratch / (T * static_cast<int64_t>(sizeof(Acc)));
  return std::clamp<int64_t>(fit & ~int64_t{63}, 64, kBackwardMaxBlock);
}

template <typename Acc>
inline Acc surrogate_grad(Acc u, Surrogate surrogate, Acc width) {
  if (surrogate == Surrogate::kAtan) {
    const Acc z = static_cast<Acc>(M_PI) * u / width;
    return (Acc(1) / width) / (Acc(1) + z * z);
  }
  if (surrogate == Surrogate::kSigmoid) {
    // (1/w)·S(u/w)·(1 − S(u/w)) as (1/w)·e/(1 + e)², e = exp(−|u/w|) ≤ 1 (reference.py).
    const Acc e = detail::exp_nonpositive(-std::abs(u / width));
    return (Acc(1) / width) * e / ((Acc(1) + e) * (Acc(1) + e));
  }
  return std::abs(u) < Acc(0.5) * width ? Acc(1) / width : Acc(0);
}

// A span of if_forward: neurons [first, first + n) in the rotated order of SpanCuts, which is at
// most two runs of the neuron index: [j, j + n1) and, when it wraps past N, [0, n − n1).
struct Span {
  int64_t j[2];  // first neuron of each run
  int64_t n[2];  // neurons in each run (n[1] = 0: one run)
};

// One span, all T steps: kSpanSteps steps per pass over the whole span (each run in kForwardBlock
// pieces, see forward_steps), the membrane in v_final, thresholds (unless one for all) and spike
// counts in span-local arrays indexed in span order; the counts are bytes, stored into
// neuron_counts (if wanted) at the first flush and added at later ones, before they could wrap
// (the first flush stores: neuron_counts, a fresh output, is then written once, not zeroed first).
template <bool HARD, bool TH_SCALAR, typename In, typename Out, typename Acc>
void forward_span(const In* x, const IFShape& shape, const Span& span, const Acc* th, Acc v_reset, Acc* v_final,
                  uint8_t* count, int32_t* neuron_counts, Out* spikes, int64_t* step_counts) {
  const int64_t x_stride = shape.t_stride, s_stride = shape.N, n = span.n[0] + span.n[1];
  int since_flush = 0;  // steps counted in `count` since it was last added to neuron_counts
  bool flushed = false;
  auto flush = [&] {
    if (neuron_counts) {
      for (int r = 0, c = 0; r < 2; c += span.n[r++]) {
        int32_t* out = neuron_counts + span.j[r];
        const uint8_t* in = count + c;
        if (flushed) {
          for (int64_t i = 0; i < span.n[r]; ++i) out[i] += in[i];
        } else {
          for (int64_t i = 0; i < span.n[r]; ++i) out[i] = in[i];
        }
      }
    }
    flushed = true;
    std::fill(count, count + n, uint8_t{0});
    since_flush = 0;
  };
  auto pass = [&](auto steps, int64_t t) {
    constexpr int U = decltype(steps)::value;
    if (since_flush + U > 255) flush();
    for (int r = 0, c = 0; r < 2; c += span.n[r++]) {
      const int64_t j0 = span.j[r];
      for (int64_t k = 0; k < span.n[r]; k += kForwardBlock) {
        const int64_t m = std::min(kForwardBlock, span.n[r] - k);
        detail::forward_steps<U, HARD, TH_SCALAR>(
            x + t * x_stride + j0 + k, x_stride, spikes + t * s_stride + j0 + k, s_stride, m,
            TH_SCALAR ? th : th + c + k, v_reset, v_final + j0 + k, count + c + k, step_counts + t);
      }
    }
    since_flush += U;
  };
  int64_t t = 0;
  for (; t + kSpanSteps <= shape.T; t += kSpanSteps) pass(std::integral_constant<int, kSpanSteps>{}, t);
  for (; t < shape.T; ++t) pass(std::integral_constant<int, 1>{}, t);
  flush();
}

// How if_forward cuts the neurons: each thread a contiguous share, each share in spans of at most
// kForwardSpan. Where the shares are at least a huge page of a spike row (`grid` neurons: 2 MiB of
// Out), shares and spans end on the 2 MiB boundaries of the spike tensor, so that each huge page
// of a row is written by one span, right after the OS zeroed it (kForwardSpan). rnl_fast's own
// outputs start on a boundary (huge_page_buffer.h); torch's allocator, which gives the spikes under
// RNL_FAST_HUGE_PAGES=0, does not align them to 2 MiB even with THP_MEM_ALLOC_ENABLE=1: the neurons
// are then taken in a rotated order that starts at the first boundary (`head` neurons in) and
// wraps around, so the span that ends a row also begins the next one, and the page that holds
// both is written by that span. (Spans counted from neuron 0 left such pages to two spans: at
// T = 32 × 2M fp32 with the spikes 4 KB short of a boundary, the C++ call into fresh huge pages
// took 28.3 ms against 23.6 when aligned.) Smaller shares split the neurons evenly in multiples
// of kForwardBlock, in plain order.
struct SpanCuts {
  int64_t N, grid, head;
  bool on_grid;
  SpanCuts(int64_t N, const void* spikes, size_t out_size, int threads)
      : N(N), grid(static_cast<int64_t>(kHugePage / out_size)), on_grid(N / threads >= grid) {
    const uintptr_t to_boundary = (kHugePage - reinterpret_cast<uintptr_t>(spikes) % kHugePage) % kHugePage;
    head = on_grid ? std::min(N, static_cast<int64_t>(to_boundary / out_size)) : 0;
  }
  // Where thread `tid`'s share begins, in the rotated order (tid == threads: N).
  int64_t share_start(int tid, int threads) const {
    const int64_t even = N * tid / threads;
    if (tid == 0 || tid == threads) return even;
    const int64_t step = on_grid ? grid : kForwardBlock;
    const int64_t rounded = on_grid ? (even + grid / 2) / grid * grid : (even + step - 1) / step * step;
    return std::min(N, rounded);
  }
  // The span that begins at rotated position r0 in a share that ends at hi; sets r1, its end.
  Span span_at(int64_t r0, int64_t hi, int64_t& r1) const {
    const int64_t boundary = on_grid ? (r0 / grid + 1) * grid : hi;
    r1 = std::min({hi, r0 + kForwardSpan, boundary});
    const int64_t j0 = r0 + head < N ? r0 + head : r0 + head - N;  // neuron at r0
    const int64_t first_run = std::min(r1 - r0, N - j0);
    return Span{{j0, 0}, {first_run, r1 - r0 - first_run}};
  }
};

}  // namespace

template <typename In, typename Out, typename Acc>
void if_forward(const In* x, IFShape shape, NeuronParam<Acc> v_th, NeuronParam<Acc> v_init,
                Acc v_reset, Reset reset, Out* spikes, Acc* v_final, int64_t* step_counts,
                int32_t* neuron_counts, int num_threads) {
  const bool parallel = shape.T * shape.N >= kParallelMinWork && num_threads > 1;
  const bool th_scalar = v_th.len == 1;
  const int64_t max_span = std::min(kForwardSpan, shape.N);
  std::fill(step_counts, step_counts + shape.T, 0);
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    const int tid = omp_get_thread_num(), threads = omp_get_num_threads();
    const SpanCuts cuts(shape.N, spikes, sizeof(Out), threads);
    std::vector<int64_t> my_step_counts(shape.T, 0);  // per thread: no atomics in the loop
    std::vector<Acc> th(th_scalar ? 1 : max_span);
    std::vector<uint8_t> count(max_span);  // zero here, and again after each span (its last flush)
    const int64_t hi = cuts.share_start(tid + 1, threads);
    for (int64_t r0 = cuts.share_start(tid, threads), r1 = 0; r0 < hi; r0 = r1) {
      const Span span = cuts.span_at(r0, hi, r1);
      for (int r = 0, c = 0; r < 2; c += span.n[r++]) {
        const int64_t j0 = span.j[r], n = span.n[r];
        for (int64_t i = 0; i < n; ++i) v_final[j0 + i] = v_init.at(j0 + i);
        if (!th_scalar) {
          for (int64_t i = 0; i < n; ++i) th[c + i] = v_th.at(j0 + i);
        }
      }
      if (th_scalar) th[0] = v_th.at(0);
      const auto args = std::make_tuple(x, std::cref(shape), std::cref(span), th.data(), v_reset, v_final,
                                        count.data(), neuron_counts, spikes, my_step_counts.data());
      if (reset == Reset::kHard) {
        th_scalar ? std::apply(forward_span<true, true, In, Out, Acc>, args)
                  : std::apply(forward_span<true, false, In, Out, Acc>, args);
      } else {
        th_scalar ? std::apply(forward_span<false, true, In, Out, Acc>, args)
                  : std::apply(forward_span<false, false, In, Out, Acc>, args);
      }
    }
#pragma omp critical
    for (int64_t t = 0; t < shape.T; ++t) step_counts[t] += my_step_counts[t];
  }
}

namespace {

// One block of the backward pass. The reset kind, detach_reset and the surrogate are template
// arguments so that the per-element loops carry no branch and vectorise.
template <bool HARD, bool DETACH, Surrogate SG, typename In, typename Acc>
void backward_block(const In* grad_spikes, const In* x, const IFShape& shape, int64_t j0, int64_t n,
                    int64_t block, const Acc* __restrict th, Acc v_reset, Acc width, Acc* __restrict v,
                    Acc* __restrict grad_v, Acc* __restrict membrane, In* grad_x) {
  // Recompute the pre-spike membrane exactly as the forward pass did.
  for (int64_t t = 0; t < shape.T; ++t) {
    const In* __restrict xt = x + t * shape.t_stride + j0;
    Acc* __restrict mt = membrane + t * block;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc m = v[j] + load<Acc>(xt + j);
      const bool fired = m >= th[j];
      mt[j] = m;
      if constexpr (HARD) {
        v[j] = fired ? v_reset : m;
      } else {
        v[j] = fired ? m - th[j] : m;
      }
    }
  }
  // Sweep back in time: dL/dm_t = dL/ds_t·σ'(m_t − θ) + dL/dv_t·dv_t/dm_t, dL/dv_{t−1} = dL/dm_t.
  for (int64_t t = shape.T - 1; t >= 0; --t) {
    const Acc* __restrict mt = membrane + t * block;
    const In* __restrict gst = grad_spikes ? grad_spikes + t * shape.N + j0 : nullptr;
    In* __restrict gxt = grad_x + t * shape.N + j0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc m = mt[j];
      const Acc sg = surrogate_grad(m - th[j], SG, width);
      // Summed in autograd's order on the reference (so an overflow gives the same inf or NaN):
      // dL/dm = (direct path through v) + (dL/ds from the spike and the reset)·σ'. The spike term
      // is left out when nothing reaches s: σ' is NaN at a NaN membrane, and 0·NaN would turn a
      // finite gradient through v (detach_reset) into NaN where the reference has none.
      Acc direct;
      if constexpr (HARD) {
        direct = grad_v[j] * (Acc(1) - (m >= th[j] ? Acc(1) : Acc(0)));
      } else {
        direct = grad_v[j];
      }
      Acc gm = direct;
      if (!DETACH) {
        const Acc through_reset = HARD ? grad_v[j] * (v_reset - m) : -grad_v[j] * th[j];
        gm = direct + (gst ? load<Acc>(gst + j) + through_reset : through_reset) * sg;
      } else if (gst) {
        gm = direct + load<Acc>(gst + j) * sg;
      }
      store(gxt + j, gm);
      grad_v[j] = gm;
    }
  }
}

template <bool HARD, bool DETACH, typename In, typename Acc>
void backward_block_sg(Surrogate surrogate, const In* grad_spikes, const In* x, const IFShape& shape, int64_t j0,
                       int64_t n, int64_t block, const Acc* th, Acc v_reset, Acc width, Acc* v, Acc* grad_v,
                       Acc* membrane, In* grad_x) {
  if (surrogate == Surrogate::kAtan) {
    backward_block<HARD, DETACH, Surrogate::kAtan>(grad_spikes, x, shape, j0, n, block, th, v_reset, width, v,
                                                   grad_v, membrane, grad_x);
  } else if (surrogate == Surrogate::kSigmoid) {
    backward_block<HARD, DETACH, Surrogate::kSigmoid>(grad_spikes, x, shape, j0, n, block, th, v_reset, width, v,
                                                      grad_v, membrane, grad_x);
  } else {
    backward_block<HARD, DETACH, Surrogate::kRectangle>(grad_spikes, x, shape, j0, n, block, th, v_reset, width, v,
                                                        grad_v, membrane, grad_x);
  }
}

}  // namespace

template <typename In, typename Acc>
void if_backward(const In* grad_spikes, const Acc* grad_v_final, const In* x, IFShape shape,
                 NeuronParam<Acc> v_th, NeuronParam<Acc> v_init, Acc v_reset, Reset reset,
                 Surrogate surrogate, Acc width, bool detach_reset, In* grad_x, Acc* grad_v_init,
                 int num_threads) {
  const int64_t block = backward_block_size<Acc>(shape.T);
  const int64_t num_blocks = (shape.N + block - 1) / block;
  const bool hard = reset == Reset::kHard;
#pragma omp parallel num_threads(num_threads) if (shape.T * shape.N >= kParallelMinWork)
  {
    std::vector<Acc> membrane(static_cast<size_t>(shape.T) * block);  // m[t][j]
    alignas(64) Acc v[kBackwardMaxBlock];
    alignas(64) Acc th[kBackwardMaxBlock];
    alignas(64) Acc grad_v[kBackwardMaxBlock];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int64_t j0 = b * block;
      const int64_t n = std::min(block, shape.N - j0);
      detail::load_block_state<Acc>(v_th, v_init, j0, n, th, v, nullptr);
      for (int64_t j = 0; j < n; ++j) grad_v[j] = grad_v_final ? grad_v_final[j0 + j] : Acc(0);
      const auto args = std::make_tuple(surrogate, grad_spikes, x, std::cref(shape), j0, n, block, th, v_reset,
                                        width, v, grad_v, membrane.data(), grad_x);
      if (hard && detach_reset) {
        std::apply(backward_block_sg<true, true, In, Acc>, args);
      } else if (hard) {
        std::apply(backward_block_sg<true, false, In, Acc>, args);
      } else if (detach_reset) {
        std::apply(backward_block_sg<false, true, In, Acc>, args);
      } else {
        std::apply(backward_block_sg<false, false, In, Acc>, args);
      }
      std::copy(grad_v, grad_v + n, grad_v_init + j0);
    }
  }
}

// Instantiations: spikes come out in the input's dtype or as bytes (uint8 / bool).
#define RNL_FAST_IF_FORWARD(In, Out, Acc)                                                      \
  template void if_forward<In, Out, Acc>(const In*, IFShape, NeuronParam<Acc>,                 \
                                         NeuronParam<Acc>, Acc, Reset, Out*, Acc*, int64_t*,   \
                                         int32_t*, int);
#define RNL_FAST_IF_TYPES(code, In, Acc)                                                       \
  RNL_FAST_IF_FORWARD(In, In, Acc)                                                             \
  RNL_FAST_IF_FORWARD(In, uint8_t, Acc)                                                        \
  template void if_backward<In, Acc>(const In*, const Acc*, const In*, IFShape,                \
                                     NeuronParam<Acc>, NeuronParam<Acc>, Acc, Reset, Surrogate, \
                                     Acc, bool, In*, Acc*, int);

RNL_FAST_INPUT_TYPES(RNL_FAST_IF_TYPES)

}  // namespace rnl_fast
