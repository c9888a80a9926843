// Multi-step integrate-and-fire neurons on CPU tensors (paper Eq. 3).
#pragma once

#include <cstdint>

#include "numeric.h"

namespace rnl_fast {

// Which membrane reset follows a spike (rnl_fast._C.Reset.soft / .hard in Python).
enum class Reset { kSoft, kHard };
// The surrogate derivative of the Heaviside step used by the backward pass (reference.py); Python
// passes it by name, rnl_fast._C.Surrogate.atan / .rectangle / .sigmoid (rnl_fast.numerics.SURROGATES).
enum class Surrogate { kAtan, kRectangle, kSigmoid };

// A per-neuron parameter given either once for all neurons (len 1) or per neuron (len N).
template <typename Acc>
struct NeuronParam {
  const Acc* data;
  int64_t len;
  Acc at(int64_t j) const { return len == 1 ? data[0] : data[j]; }
};

struct IFShape {
  int64_t T;         // time steps
  int64_t N;         // neurons
  int64_t t_stride;  // elements between x[t] and x[t+1]: N, or 0 for a constant input
};

// Runs all T steps. Writes spikes [T, N], the final membrane [N], spikes per step [T]
// (summed over neurons) and, unless neuron_counts is null, spikes per neuron [N] (over steps).
template <typename In, typename Out, typename Acc>
void if_forward(const In* x, IFShape shape, NeuronParam<Acc> v_th, NeuronParam<Acc> v_init,
                Acc v_reset, Reset reset, Out* spikes, Acc* v_final, int64_t* step_counts,
                int32_t* neuron_counts, int num_threads);

// Where the fused IF + 2×2 average pooling finds its planes: the N neurons lie as
// [planes, H, W, inner] (NCHW: planes = B·C, inner = 1; channels-last: planes = B, inner = C).
// Each output averages the spikes of one 2×2 window of (H, W), stride 2 (avg_pool2d(kernel 2,
// stride 2, padding 0)); with ceil_mode the windows that overhang an odd last row or column are
// kept and averaged over the neurons they cover. Outputs lie as [planes, out_h, out_w, inner].
struct PoolShape {
  int64_t planes;
  int64_t H;
  int64_t W;
  int64_t inner;
  bool ceil_mode;
  int64_t out_h() const { return ceil_mode ? (H + 1) / 2 : H / 2; }
  int64_t out_w() const { return ceil_mode ? (W + 1) / 2 : W / 2; }
};

// if_forward whose spikes are not stored but pooled: writes pooled [T, planes, out_h, out_w, inner] in
// the input's type, each value (the spikes of its window averaged) × scale, and, as if_forward,
// the final membrane [N], the spikes per step [T] and per neuron [N] (all neurons, those left out
// of every window included). Requires N == planes·H·W·inner.
template <typename In, typename Acc>
void if_forward_pool2x2(const In* x, IFShape shape, PoolShape pool, NeuronParam<Acc> v_th,
                        NeuronParam<Acc> v_init, Acc v_reset, Reset reset, Acc scale, In* pooled,
                        Acc* v_final, int64_t* step_counts, int32_t* neuron_counts,
                        int num_threads);

// Backpropagation through time with a surrogate gradient. Saves nothing from the forward
// pass but x: the membrane is recomputed block by block into a thread-local scratch.
// grad_spikes [T, N] and grad_v_final [N] may be null (zero). Writes grad_x [T, N] and
// grad_v_init [N].
template <typename In, typename Acc>
void if_backward(const In* grad_spikes, const Acc* grad_v_final, const In* x, IFShape shape,
                 NeuronParam<Acc> v_th, NeuronParam<Acc> v_init, Acc v_reset, Reset reset,
                 Surrogate surrogate, Acc width, bool detach_reset, In* grad_x, Acc* grad_v_init,
                 int num_threads);

}  // namespace rnl_fast
