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
#include <cstring>
#include <vector>

#include "if_kernel.h"
#include "if_steps.h"

namespace rnl_fast {
namespace {

using detail::kForwardBlock;
using detail::kStepUnroll;

// What one task covers: `num_planes` planes from `plane`, rows [r0, r1) of each (r0 even). Either
// several whole planes (small planes) or a band of rows of one plane (planes over kForwardBlock).
// Its neurons are the contiguous range [first, first + size).
struct Task {
  int64_t plane, num_planes, r0, r1;
  int64_t first, size;
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
    int64_t plane = i / row_bands, num_planes = 1, r0 = (i % row_bands) * rows_per_task;
    if (row_bands == 1) {
      plane = i * planes_per_task;
      num_planes = std::min(planes_per_task, p.planes - plane);
    }
    const int64_t r1 = std::min(p.H, r0 + rows_per_task);
    return {plane, num_planes, r0, r1, (plane * p.H + r0) * row, num_planes * (r1 - r0) * row};
  }
};

// A window's k spikes over its n neurons (`inverse` = 1/n: 1, ½ or ¼): k·(1/n) is exact, then
// one rounding × scale, as avg_pool2d's k / n followed by × scale. (k · (scale/n) rounds scale/n
// first, which loses bits for a subnormal scale/n and broke bit-identity.)
template <typename Acc>
inline Acc pooled_value(int k, Acc inverse, Acc scale) {
  return static_cast<Acc>(k) * inverse * scale;
}

// One output row from one or two rows of spikes (`bottom` null: ceil_mode's overhanging last
// row), each window through pooled_value.
template <typename Out, typename Acc>
inline void pool_row(const uint8_t* __restrict top, const uint8_t* __restrict bottom, const PoolShape& p,
                     Acc scale, Out* __restrict out) {
  const int64_t W = p.W, inner = p.inner, full_cols = W / 2;
  const bool edge = p.ceil_mode && W % 2 == 1;  // a last window one column wide
  const Acc inv_pair = bottom ? Acc(0.25) : Acc(0.5), inv_edge = bottom ? Acc(0.5) : Acc(1);
  if (inner == 1) {
    if (bottom) {
      for (int64_t c = 0; c < full_cols; ++c) {
        const int k = top[2 * c] + top[2 * c + 1] + bottom[2 * c] + bottom[2 * c + 1];
        store(out + c, pooled_value(k, inv_pair, scale));
      }
    } else {
      for (int64_t c = 0; c < full_cols; ++c) store(out + c, pooled_value(top[2 * c] + top[2 * c + 1], inv_pair, scale));
    }
  } else {  // channels innermost: every window is `inner` contiguous lanes
    for (int64_t c = 0; c < full_cols; ++c) {
      const uint8_t* __restrict a = top + 2 * c * inner;
      const uint8_t* __restrict b = bottom ? bottom + 2 * c * inner : nullptr;
      Out* __restrict o = out + c * inner;
      if (b) {
        for (int64_t k = 0; k < inner; ++k) {
          store(o + k, pooled_value(a[k] + a[inner + k] + b[k] + b[inner + k], inv_pair, scale));
        }
      } else {
        for (int64_t k = 0; k < inner; ++k) store(o + k, pooled_value(a[k] + a[inner + k], inv_pair, scale));
      }
    }
  }
  if (edge) {
    const uint8_t* a = top + (W - 1) * inner;
    const uint8_t* b = bottom ? bottom + (W - 1) * inner : nullptr;
    for (int64_t k = 0; k < inner; ++k) {
      store(out + full_cols * inner + k, pooled_value(a[k] + (b ? b[k] : 0), inv_edge, scale));
    }
  }
}

// NCHW planes with an even W take a faster road than pool_row, in two loops over all the
// task's row pairs at once (14 or 16 windows per row are too few to fill a vector):
// add_row_pairs adds the two rows of each pair, 8 bytes per 64-bit word (sums ≤ 2: no carries);
// windows_to_out then reads a window's two columns as one 16-bit lane, whose bytes add up to the
// window's count, and the windows of consecutive pairs are consecutive outputs. (Time of the
// fused op over the IF op with uint8 spikes, cnn7's first layer: 1.94 with pool_row, 1.49.)
inline void add_row_pairs(const uint8_t* __restrict s, int64_t pairs, int64_t W, uint8_t* __restrict sums) {
  for (int64_t pp = 0; pp < pairs; ++pp) {
    const uint8_t* __restrict top = s + 2 * pp * W;
    uint8_t* __restrict out = sums + pp * W;
    if (W >= 8) {  // the last word may overlap the one before: it writes the same bytes again
      for (int64_t j = 0; j < W; j += 8) {
        const int64_t at = std::min(j, W - 8);
        uint64_t a, b;
        std::memcpy(&a, top + at, 8);
        std::memcpy(&b, top + W + at, 8);
        a += b;
        std::memcpy(out + at, &a, 8);
      }
    } else {
      for (int64_t j = 0; j < W; ++j) out[j] = top[j] + top[W + j];
    }
  }
}

template <typename Out, typename Acc>
inline void windows_to_out(const uint8_t* __restrict sums, int64_t windows, Acc scale, Out* __restrict out) {
  for (int64_t q = 0; q < windows; ++q) {
    uint16_t both;
    std::memcpy(&both, sums + 2 * q, 2);
    store(out + q, pooled_value(static_cast<int>((both & 0xFFu) + (both >> 8)), Acc(0.25), scale));
  }
}

// Averages `steps` scratch rows (one per step: the task's spikes, plane after plane, rows r0..r1)
// into the pooled output. `out` points at (first step, task.plane, r0 / 2, 0, 0).
template <typename Out, typename Acc>
void pool_scratch(const uint8_t* scratch, int64_t scratch_row, int steps, const PoolShape& p, const Tiling& tiling,
                  const Task& task, Acc scale, uint8_t* pair_sums, Out* out, int64_t out_step) {
  const int64_t out_row = p.out_w() * p.inner, out_plane = p.out_h() * out_row;
  const int64_t i0 = task.r0 / 2, i1 = p.ceil_mode ? (task.r1 + 1) / 2 : task.r1 / 2;
  const int64_t band = (task.r1 - task.r0) * tiling.row;
  const bool flat = p.inner == 1 && p.W % 2 == 0;
  const int64_t flat_pairs = flat ? (task.r1 - task.r0) / 2 : 0;  // pairs with both rows in the band
  for (int u = 0; u < steps; ++u) {
    for (int64_t g = 0; g < task.num_planes; ++g) {
      const uint8_t* s = scratch + u * scratch_row + g * band;
      Out* o = out + u * out_step + g * out_plane;
      if (flat) {
        add_row_pairs(s, flat_pairs, p.W, pair_sums);
        windows_to_out(pair_sums, flat_pairs * (p.W / 2), scale, o);
      }
      for (int64_t i = i0 + flat_pairs; i < i1; ++i) {  // the rest: odd W, channels-last, ceil's last row
        const uint8_t* top = s + (2 * i - task.r0) * tiling.row;
        const uint8_t* bottom = 2 * i + 1 < task.r1 ? top + tiling.row : nullptr;
        pool_row(top, bottom, p, scale, o + (i - i0) * out_row);
      }
    }
  }
}

template <bool HARD, typename In, typename Acc>
void pooled_task(const In* x, const IFShape& shape, const PoolShape& p, const Tiling& tiling, const Task& task,
                 const Acc* th, Acc v_reset, Acc scale, Acc* v, int32_t* count, uint8_t* scratch, uint8_t* pair_sums,
                 In* pooled, int64_t* step_counts) {
  const int64_t j0 = task.first, n = task.size;
  const int64_t out_plane = p.out_h() * p.out_w() * p.inner, out_step = p.planes * out_plane;
  In* out = pooled + task.plane * out_plane + task.r0 / 2 * p.out_w() * p.inner;
  const int64_t x_stride = shape.t_stride;
  int64_t t = 0;
  for (; t + kStepUnroll <= shape.T; t += kStepUnroll) {
    detail::forward_steps<kStepUnroll, HARD>(x + t * x_stride + j0, x_stride, scratch, n, n, th, v_reset, v,
                                             count, step_counts + t);
    pool_scratch(scratch, n, kStepUnroll, p, tiling, task, scale, pair_sums, out + t * out_step, out_step);
  }
  for (; t < shape.T; ++t) {
    detail::forward_steps<1, HARD>(x + t * x_stride + j0, x_stride, scratch, n, n, th, v_reset, v, count,
                                   step_counts + t);
    pool_scratch(scratch, n, 1, p, tiling, task, scale, pair_sums, out + t * out_step, out_step);
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
    std::vector<uint8_t> pair_sums(tiling.max_neurons / 2 + 1);  // one plane's row pairs, summed
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tiling.num_tasks; ++i) {
      const Task task = tiling.task(pool, i);
      detail::load_block_state(v_th, v_init, task.first, task.size, th.data(), v.data(), count.data());
      if (reset == Reset::kHard) {
        pooled_task<true>(x, shape, pool, tiling, task, th.data(), v_reset, scale, v.data(), count.data(),
                          scratch.data(), pair_sums.data(), pooled, my_step_counts.data());
      } else {
        pooled_task<false>(x, shape, pool, tiling, task, th.data(), v_reset, scale, v.data(), count.data(),
                           scratch.data(), pair_sums.data(), pooled, my_step_counts.data());
      }
      std::copy(v.begin(), v.begin() + task.size, v_final + task.first);
      if (neuron_counts) std::copy(count.begin(), count.begin() + task.size, neuron_counts + task.first);
    }
#pragma omp critical
    for (int64_t t = 0; t < shape.T; ++t) step_counts[t] += my_step_counts[t];
  }
}

#define RNL_FAST_IF_POOL(code, In, Acc)                                                                \
  template void if_forward_pool2x2<In, Acc>(const In*, IFShape, PoolShape, NeuronParam<Acc>,           \
                                            NeuronParam<Acc>, Acc, Reset, Acc, In*, Acc*, int64_t*,  \
                                            int32_t*, int);
RNL_FAST_INPUT_TYPES(RNL_FAST_IF_POOL)

}  // namespace rnl_fast
