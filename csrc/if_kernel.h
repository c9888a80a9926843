// Multi-step integrate-and-fire neurons on CPU tensors (paper Eq. 3).
#pragma once

#include <cstdint>

#include "numeric.h"

namespace rnl_fast {

// Which membrane reset follows a spike.
enum class Reset : int { kSoft = 0, kHard = 1 };
// The surrogate derivative of the Heaviside step used by the backward pass (reference.py).
enum class Surrogate : int { kAtan = 0, kRectangle = 1 };

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
// (summed over neurons) and spikes per neuron [N] (summed over steps).
template <typename In, typename Out, typename Acc>
void if_forward(const In* x, IFShape shape, NeuronParam<Acc> v_th, NeuronParam<Acc> v_init,
                Acc v_reset, Reset reset, Out* spikes, Acc* v_final, int64_t* step_counts,
                int32_t* neuron_counts, int num_threads);

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
