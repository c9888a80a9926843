// The IF step loop shared by the forward kernels (if_kernel.cpp, if_pool_kernel.cpp): internal,
// not part of the entry points' interface.
#pragma once

#include <cstdint>

#include "huge_page_buffer.h"  // kHugePage, the size the span walk aligns to
#include "if_kernel.h"

namespace rnl_fast {
namespace detail {

// Steps per pass of the pooled forward's walk (if_pool_kernel.cpp: all T steps of a block of
// neurons; if_forward's span walk takes kSpanSteps), and the neurons of one forward_steps call: a
// pooled forward task keeps them in block-local arrays (membrane, threshold, count: 48 KB, L1/L2).
// Measured on that walk, when if_forward used it too: four steps, not eight: a pass reads U rows of
// x and writes U rows of spikes, 2·U streams of 16 KB each that the hardware prefetchers must pick
// up before the walk moves on, and with eight GCC also ran out of vector registers for the row
// pointers (spilled to xmm). C++ model of the forward, T = 32 × 2M fp32, medians of interleaved
// runs: into a warm output 27.7 → 22.1 ms on 1 thread (memcpy 19.1), 20.5 → 15.7 on 2 (plain copy
// 17.4); into fresh huge pages, 2 threads, 26.0–28.1 → 24.8–26.5 (plain copy 18.9–19.1); into fresh
// 4 KB pages no clear change.
constexpr int kStepUnroll = 4;
constexpr int64_t kForwardBlock = 4096;
// The most neurons if_forward walks together, a few steps per pass over all of them: 2 MiB of
// each fp32 spike row, one huge page. A fresh output page is zeroed by the OS at its first touch;
// the span walk writes the rest of that row's page right after (the zeroed lines still in cache,
// as `clone` does), where walking all T steps of 4096 neurons at a time finished each page 128
// blocks later, its zeroed lines long written back to memory and read again (SpanCuts aligns the
// spans to the pages). The span's membrane (2 MiB, in v_final) and byte counts (512 KiB) stay in
// L2/L3, and a scalar threshold is not copied per neuron. C++ model, T = 32 × 2M fp32, 2 threads,
// fresh huge pages, interleaved medians: 24.6–27.8 ms for the 4096-neuron walk, 20.5–21.3 for the
// span walk, 17.9–19.7 for a plain copy. The C++ call, one thread, in cache, minimum of 200–600
// calls: T = 32 × 65,536 fp32 595–653 µs (4096-neuron walk) → 353–396 (spans, four steps per
// pass) and, in another run, 387–416 → 287–364 (two steps per pass); T = 32 × 8192 67–77 → 45–52
// → 40–45 µs (README, Performance).
constexpr int64_t kForwardSpan = int64_t{1} << 19;
// Steps per pass of the span walk: two rows of the span in and out per pass (4 MiB of fresh pages
// per thread at fp32), which the shared L3 keeps hot when neighbours crowd it (C++ model, fresh huge
// pages, 2 threads, a slow run: 21.3–22.4 ms with two, 24.2–26.4 with four, a plain copy 19.2–19.9).
constexpr int kSpanSteps = 2;

// A block's starting state: thresholds and initial membranes of neurons [j0, j0 + n), counts 0.
template <typename Acc>
inline void load_block_state(NeuronParam<Acc> v_th, NeuronParam<Acc> v_init, int64_t j0, int64_t n,
                             Acc* th, Acc* v, int32_t* count) {
  for (int64_t j = 0; j < n; ++j) {
    v[j] = v_init.at(j0 + j);
    th[j] = v_th.at(j0 + j);
    if (count) count[j] = 0;
  }
}

// U consecutive steps for a block of `n` neurons: `xt` and `st` point at the block's first
// neuron in the first of the U steps; rows of x are `x_stride` apart (0 for a constant input),
// rows of the spikes `s_stride` apart (N for the spike tensor, n for a block-local scratch).
// The U steps are unrolled inside the neuron loop so that a neuron's membrane, threshold and
// count stay in registers for U steps: one pass over the block-local arrays per U steps instead
// of per step. (Measured on one core of an EPYC, T = 32 × 1M fp32, before the step totals joined
// the loop: 17.5 ms with U = 1, 10.8 ms with U = 8; a memcpy of the same bytes 6.6 ms.) HARD is a
// template argument so that the inner loop carries no branch on the reset kind. Adds each step's spike total to step_counts[u], summed
// in the same loop in eight named reductions, which GCC vectorises (an array-section reduction
// `fired[:U]` it left scalar, 8× slower). It replaced a second pass over the U rows just written:
// one thread, T = 32 × 8192 fp32, 53–61 → 42–47 µs; × 65,536, 458–471 → 335–394 µs.
// TH_SCALAR: `th` points at one threshold for all n neurons (not n). Count: the per-neuron count
// type, int32_t (pooled forward) or uint8_t (if_forward, which adds them up before they wrap).
template <int U, bool HARD, bool TH_SCALAR = false, typename In, typename Out, typename Acc, typename Count>
inline void forward_steps(const In* __restrict xt, int64_t x_stride, Out* __restrict st, int64_t s_stride,
                          int64_t n, const Acc* __restrict th, Acc v_reset, Acc* __restrict v,
                          Count* __restrict count, int64_t* step_counts) {
  static_assert(U <= 8, "eight step totals at most");
  int32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0, c7 = 0;
#pragma omp simd reduction(+ : c0, c1, c2, c3, c4, c5, c6, c7)
  for (int64_t j = 0; j < n; ++j) {
    Acc vj = v[j];
    const Acc thj = TH_SCALAR ? th[0] : th[j];
    Count cj = count[j];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const Acc m = vj + load<Acc>(xt + u * x_stride + j);
      const bool fired = m >= thj;
      if constexpr (HARD) {
        vj = fired ? v_reset : m;
      } else {
        vj = fired ? m - thj : m;
      }
      st[u * s_stride + j] = spike_value<Out>(fired);
      cj += fired;
      (u == 0 ? c0 : u == 1 ? c1 : u == 2 ? c2 : u == 3 ? c3 : u == 4 ? c4 : u == 5 ? c5 : u == 6 ? c6 : c7) += fired;
    }
    v[j] = vj;
    count[j] = cj;
  }
  const int32_t fired_now[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
  for (int u = 0; u < U; ++u) step_counts[u] += fired_now[u];
}

}  // namespace detail
}  // namespace rnl_fast
