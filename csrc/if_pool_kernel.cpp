// IF neurons fused with the 2×2 average pooling that follows them in most converted CNNs.
//
// A task owns whole rows of its planes, so that every pooling window lies inside one task. For
// each group of kStepUnroll steps it runs the shared step loop (if_steps.h) with the spikes going
// to a task-local byte scratch (kStepUnroll rows of the block, in L1), then averages the scratch
// into the pooled rows. The full-size spike tensor is never written: per neuron and step the
// kernel moves the input current in and a quarter of an output element out, where IF then pooling
// moves the current in, a spike out, the spike in again and the quarter out.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "if_kernel.h"
#include "if_steps.h"

namespace rnl_fast {
namespace {

using detail::kForwardBlock;
using detail::kStepUnroll;

// What one task covers: `num_planes` planes from `plane`, rows [r0, r1) of each (r0 even). Either
// several whole planes (small planes) or a band of rows of one plane (planes over kForwardBlock).
struct Task {
  int64_t plane, num_planes, r0, r1;
};

struct Tiling {
  int64_t row;              // neurons per row of a plane: W·inner
  int64_t planes_per_task;  // > 1 only for whole planes
  int64_t rows_per_task;    // even, or H
  int64_t row_bands;        // tasks per plane
  int64_t num_tasks;
  int64_t max_neurons;      // neurons of the largest task

  explicit Tiling(const PoolShape& p) : row(p.W * p.inner) {
    const int64_t plane = p.H * row;
    if (plane <= kForwardBlock) {
      planes_per_task = std::max<int64_t>(1, kForwardBlock / plane);
      rows_per_task = p.H;
      row_bands = 1;
      num_tasks = (p.planes + planes_per_task - 1) / planes_per_task;
    } else {
      planes_per_task = 1;
      rows_per_task = std::max<int64_t>(2, (kForwardBlock / row) & ~int64_t{1});
      row_bands = (p.H + rows_per_task - 1) / rows_per_task;
      num_tasks = p.planes * row_bands;
    }
    max_neurons = planes_per_task * rows_per_task * row;
  }

  Task task(const PoolShape& p, int64_t i) const {
    if (row_bands == 1) {
      const int64_t plane = i * planes_per_task;
      return {plane, std::min(planes_per_task, p.planes - plane), 0, p.H};
    }
    const int64_t r0 = (i % row_bands) * rows_per_task;
    return {i / row_bands, 1, r0, std::min(p.H, r0 + rows_per_task)};
  }
};

// One output row from one or two rows of spikes (`bottom` null: ceil_mode's overhanging last
// row). A window's k spikes give k · (scale / neurons in the window): the same single rounding
// as avg_pool2d's exact k / count followed by × scale, so the result equals the reference's.
template <typename Out, typename Acc>
inline void pool_row(const uint8_t* __restrict top, const uint8_t* __restrict bottom, const PoolShape& p,
                     Acc scale, Out* __restrict out) {
  const int64_t W = p.W, inner = p.inner, full_cols = W / 2;
  const bool edge = p.ceil_mode && W % 2 == 1;  // a last window one column wide
  const Acc w_pair = scale * (bottom ? Acc(0.25) : Acc(0.5)), w_edge = scale * (bottom ? Acc(0.5) : Acc(1));
  if (inner == 1) {
    if (bottom) {
      for (int64_t c = 0; c < full_cols; ++c) {
        const int k = top[2 * c] + top[2 * c + 1] + bottom[2 * c] + bottom[2 * c + 1];
        store(out + c, static_cast<Acc>(k) * w_pair);
      }
    } else {
      for (int64_t c = 0; c < full_cols; ++c) store(out + c, static_cast<Acc>(top[2 * c] + top[2 * c + 1]) * w_pair);
    }
  } else {  // channels innermost: every window is `inner` contiguous lanes
    for (int64_t c = 0; c < full_cols; ++c) {
      const uint8_t* __restrict a = top + 2 * c * inner;
      const uint8_t* __restrict b = bottom ? bottom + 2 * c * inner : nullptr;
      Out* __restrict o = out + c * inner;
      if (b) {
        for (int64_t k = 0; k < inner; ++k) {
          store(o + k, static_cast<Acc>(a[k] + a[inner + k] + b[k] + b[inner + k]) * w_pair);
        }
      } else {
        for (int64_t k = 0; k < inner; ++k) store(o + k, static_cast<Acc>(a[k] + a[inner + k]) * w_pair);
      }
    }
  }
  if (edge) {
    const uint8_t* a = top + (W - 1) * inner;
    const uint8_t* b = bottom ? bottom + (W - 1) * inner : nullptr;
    for (int64_t k = 0; k < inner; ++k) store(out + full_cols * inner + k, static_cast<Acc>(a[k] + (b ? b[k] : 0)) * w_edge);
  }
}

// Averages `steps` scratch rows (one per step: the task's spikes, plane after plane, rows r0..r1)
// into the pooled output. `out` points at (first step, task.plane, r0 / 2, 0, 0).
template <typename Out, typename Acc>
void pool_scratch(const uint8_t* scratch, int64_t scratch_row, int steps, const PoolShape& p, const Tiling& tiling,
                  const Task& task, Acc scale, Out* out, int64_t out_step) {
  const int64_t out_row = p.out_w() * p.inner, out_plane = p.out_h() * out_row;
  const int64_t i0 = task.r0 / 2, i1 = p.ceil_mode ? (task.r1 + 1) / 2 : task.r1 / 2;
  const int64_t band = (task.r1 - task.r0) * tiling.row;
  for (int u = 0; u < steps; ++u) {
    for (int64_t g = 0; g < task.num_planes; ++g) {
      const uint8_t* s = scratch + u * scratch_row + g * band;
      Out* o = out + u * out_step + g * out_plane;
      for (int64_t i = i0; i < i1; ++i) {
        const uint8_t* top = s + (2 * i - task.r0) * tiling.row;
        const uint8_t* bottom = 2 * i + 1 < task.r1 ? top + tiling.row : nullptr;
        pool_row(top, bottom, p, scale, o + (i - i0) * out_row);
      }
    }
  }
}

template <bool HARD, typename In, typename Acc>
void pooled_task(const In* x, const IFShape& shape, const PoolShape& p, const Tiling& tiling, const Task& task,
                 const Acc* th, Acc v_reset, Acc scale, Acc* v, int32_t* count, uint8_t* scratch, In* pooled,
                 int64_t* step_counts) {
  const int64_t j0 = (task.plane * p.H + task.r0) * tiling.row;
  const int64_t n = task.num_planes * (task.r1 - task.r0) * tiling.row;
  const int64_t out_plane = p.out_h() * p.out_w() * p.inner, out_step = p.planes * out_plane;
  In* out = pooled + task.plane * out_plane + task.r0 / 2 * p.out_w() * p.inner;
  const int64_t x_stride = shape.t_stride;
  int64_t t = 0;
  for (; t + kStepUnroll <= shape.T; t += kStepUnroll) {
    detail::forward_steps<kStepUnroll, HARD>(x + t * x_stride + j0, x_stride, scratch, n, n, th, v_reset, v,
                                             count, step_counts + t);
    pool_scratch(scratch, n, kStepUnroll, p, tiling, task, scale, out + t * out_step, out_step);
  }
  for (; t < shape.T; ++t) {
    detail::forward_steps<1, HARD>(x + t * x_stride + j0, x_stride, scratch, n, n, th, v_reset, v, count,
                                   step_counts + t);
    pool_scratch(scratch, n, 1, p, tiling, task, scale, out + t * out_step, out_step);
  }
}

}  // namespace

template <typename In, typename Acc>
void if_forward_pool2x2(const In* x, IFShape shape, PoolShape pool, NeuronParam<Acc> v_th,
                        NeuronParam<Acc> v_init, Acc v_reset, Reset reset, Acc scale, In* pooled,
                        Acc* v_final, int64_t* step_counts, int32_t* neuron_counts,
                        int num_threads) {
  const Tiling tiling(pool);
  std::fill(step_counts, step_counts + shape.T, 0);
#pragma omp parallel num_threads(num_threads) if (shape.T * shape.N >= kParallelMinWork)
  {
    std::vector<int64_t> my_step_counts(shape.T, 0);  // per thread: no atomics in the loop
    std::vector<Acc> v(tiling.max_neurons), th(tiling.max_neurons);
    std::vector<int32_t> count(tiling.max_neurons);
    std::vector<uint8_t> scratch(kStepUnroll * tiling.max_neurons);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tiling.num_tasks; ++i) {
      const Task task = tiling.task(pool, i);
      const int64_t j0 = (task.plane * pool.H + task.r0) * tiling.row;
      const int64_t n = task.num_planes * (task.r1 - task.r0) * tiling.row;
      detail::load_block_state(v_th, v_init, j0, n, th.data(), v.data(), count.data());
      if (reset == Reset::kHard) {
        pooled_task<true>(x, shape, pool, tiling, task, th.data(), v_reset, scale, v.data(), count.data(),
                          scratch.data(), pooled, my_step_counts.data());
      } else {
        pooled_task<false>(x, shape, pool, tiling, task, th.data(), v_reset, scale, v.data(), count.data(),
                           scratch.data(), pooled, my_step_counts.data());
      }
      std::copy(v.begin(), v.begin() + n, v_final + j0);
      std::copy(count.begin(), count.begin() + n, neuron_counts + j0);
    }
#pragma omp critical
    for (int64_t t = 0; t < shape.T; ++t) step_counts[t] += my_step_counts[t];
  }
}

#define RNL_FAST_IF_POOL(In, Acc)                                                                      \
  template void if_forward_pool2x2<In, Acc>(const In*, IFShape, PoolShape, NeuronParam<Acc>,           \
                                            NeuronParam<Acc>, Acc, Reset, Acc, In*, Acc*, int64_t*,  \
                                            int32_t*, int);
RNL_FAST_IF_POOL(float, float)
RNL_FAST_IF_POOL(double, double)
RNL_FAST_IF_POOL(f16_t, float)
RNL_FAST_IF_POOL(bf16_t, float)

}  // namespace rnl_fast
