"""Multi-step integrate-and-fire neurons as custom ops: forward, backward, fake kernels, autograd.

``rnl_fast::if_forward`` runs all T steps in one kernel and saves only x for the backward pass;
``rnl_fast::if_backward`` recomputes the membrane and backpropagates through time with a
surrogate spike derivative. :func:`if_sequence` validates, chooses the backend and calls them.
"""

from __future__ import annotations

from typing import Optional  # Optional: the spelling torch.library's schema inference documents

import torch
from torch import Tensor

from .. import reference
from ..numerics import compute_dtype_of
from . import _pages
from ._backend import backend_for, cpp, cpp_dtype, cpp_reset, threads, triton
from ._checks import check_bool, check_if_input, check_spike_dtype, check_surrogate, check_v_reset, neuron_param
from ._if_io import ForwardIO, IFResult, cpp_param_args, cpp_x_args, fake_state_outputs, if_result
from ._library import custom_op
from .layout import in_order, logical, neuron_order, time_major


@custom_op("rnl_fast::if_forward")
def _if_forward(
    x: Tensor,
    v_th: Tensor,
    v_init: Tensor,
    v_reset: float,
    hard_reset: bool,
    surrogate: str,
    width: float,
    detach_reset: bool,
    spike_dtype: torch.dtype,
    count_neurons: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    io = ForwardIO.of(x, v_th, v_init, count_neurons)
    T, N = io.x2.shape
    spikes = _pages.empty((T, N), spike_dtype, x.device)
    spike_store = spikes.view(torch.uint8) if spike_dtype == torch.bool else spikes
    if backend_for(x) == "triton":
        triton(x.device.type == "cpu").if_fwd(
            io.x2,
            io.v_th.reshape(-1),
            io.v_init.reshape(-1),
            v_reset,
            hard_reset,
            spike_store,
            io.v_final,
            io.step_counts,
            io.counted(),
        )
    else:
        cpp().if_forward(
            **io.cpp_in_args(),
            v_reset=v_reset,
            reset=cpp_reset(hard_reset),
            spikes=spike_store.data_ptr(),
            spikes_len=spike_store.numel(),
            spike_dtype=cpp_dtype(spike_store.dtype),
            **io.cpp_out_args(),
            num_threads=threads(),
        )
    return (logical(spikes.view(T, *io.neuron_shape), io.order, lead=1), *io.outputs())


@_if_forward.register_fake
def _(x, v_th, v_init, v_reset, hard_reset, surrogate, width, detach_reset, spike_dtype, count_neurons):
    order = neuron_order(x)
    neuron_shape = in_order(x, order, lead=1).shape[1:]
    spikes = logical(x.new_empty((x.shape[0], *neuron_shape), dtype=spike_dtype), order, lead=1)
    return (spikes, *fake_state_outputs(x, neuron_shape, order, count_neurons))


@custom_op("rnl_fast::if_backward")
def _if_backward(
    grad_spikes: Optional[Tensor],  # noqa: UP045
    grad_v_final: Optional[Tensor],  # noqa: UP045
    x: Tensor,
    v_th: Tensor,
    v_init: Tensor,
    v_reset: float,
    hard_reset: bool,
    surrogate: str,
    width: float,
    detach_reset: bool,
) -> tuple[Tensor, Tensor]:
    T, neuron_shape = x.shape[0], x.shape[1:]
    x2 = time_major(x)
    N = x2.shape[1]
    cdt = compute_dtype_of(x.dtype)
    gs = None if grad_spikes is None else grad_spikes.to(x.dtype).contiguous().view(T, N)
    gv = None if grad_v_final is None else grad_v_final.to(cdt).contiguous().view(N)
    grad_x = _pages.empty((T, N), x.dtype, x.device)
    grad_v_init = _pages.empty((N,), cdt, x.device)
    if backend_for(x) == "triton":
        triton(x.device.type == "cpu").if_bwd(
            gs,
            gv,
            x2,
            v_th.reshape(-1),
            v_init.reshape(-1),
            v_reset,
            hard_reset,
            surrogate,
            width,
            detach_reset,
            grad_x,
            grad_v_init,
        )
    else:
        cpp().if_backward(
            grad_spikes=0 if gs is None else gs.data_ptr(),
            grad_spikes_len=0 if gs is None else gs.numel(),
            grad_v_final=0 if gv is None else gv.data_ptr(),
            grad_v_final_len=0 if gv is None else gv.numel(),
            **cpp_x_args(x2),
            **cpp_param_args(v_th, v_init),
            v_reset=v_reset,
            reset=cpp_reset(hard_reset),
            surrogate=getattr(cpp().Surrogate, surrogate),
            width=width,
            detach_reset=detach_reset,
            grad_x=grad_x.data_ptr(),
            grad_x_len=grad_x.numel(),
            grad_v_init=grad_v_init.data_ptr(),
            grad_v_init_len=grad_v_init.numel(),
            num_threads=threads(),
        )
    return grad_x.view(x.shape), grad_v_init.view(neuron_shape)


@_if_backward.register_fake
def _(grad_spikes, grad_v_final, x, v_th, v_init, v_reset, hard_reset, surrogate, width, detach_reset):
    return x.new_empty(x.shape), x.new_empty(x.shape[1:], dtype=compute_dtype_of(x.dtype))


def _if_setup_context(ctx, inputs, output) -> None:
    x, v_th, v_init, v_reset, hard_reset, surrogate, width, detach_reset, _, _ = inputs
    ctx.save_for_backward(x, v_th, v_init)  # x only: the backward recomputes the membrane
    ctx.set_materialize_grads(False)  # unused outputs (membrane, counts) cost no zero-filled [T, N]
    ctx.options = (v_reset, hard_reset, surrogate, width, detach_reset)
    ctx.v_init_shape = v_init.shape


def _if_autograd_backward(ctx, grad_spikes, grad_v_final, _grad_steps, _grad_neurons):
    x, v_th, v_init = ctx.saved_tensors
    if grad_spikes is not None and not grad_spikes.is_floating_point():
        grad_spikes = None  # uint8/bool spikes carry no gradient
    if grad_spikes is None and grad_v_final is None:
        return None, None, None, None, None, None, None, None, None, None
    grad_x, grad_v_init = _if_backward(grad_spikes, grad_v_final, x, v_th, v_init, *ctx.options)
    if ctx.v_init_shape != grad_v_init.shape:  # a scalar initial membrane: sum over neurons
        grad_v_init = grad_v_init.sum().reshape(ctx.v_init_shape)
    return grad_x, None, grad_v_init, None, None, None, None, None, None, None


_if_forward.register_autograd(_if_autograd_backward, setup_context=_if_setup_context)


def if_sequence(
    x: Tensor,
    v_th: Tensor | float = 1.0,
    v_init: Tensor | float = 0.0,
    v_reset: float | None = None,
    surrogate: str = "atan",
    width: float = 1.0,
    detach_reset: bool = False,
    spike_dtype: torch.dtype | None = None,
    count_neurons: bool = True,
) -> IFResult:
    """Integrate-and-fire neurons over all T steps in one fused kernel (paper Eq. 3).

    For t = 0..T−1: ``m = v + x[t]; s[t] = (m >= v_th)``; soft reset ``v = m − v_th·s[t]`` when
    ``v_reset is None`` (the paper's), else hard reset ``v = v_reset if s[t] else m``. Arithmetic
    and membrane in float32 (float64 for float64 x). A NaN in ``x`` makes that neuron's membrane
    NaN from that step on, and a NaN membrane never fires (``NaN >= v_th`` is false).

    Args:
        x: ``[T, *]`` input current, float32/float64/float16/bfloat16, any strides; an input
            expanded over time (stride 0 in T, constant coding) is read once per neuron.
        v_th: threshold, positive float or tensor broadcastable to ``x.shape[1:]`` (per channel);
            a CPU tensor's values are checked (positive, finite), a GPU tensor's are not read (no host sync).
        v_init: initial membrane, float or tensor broadcastable to ``x.shape[1:]``; gradients
            flow into a tensor ``v_init``, so chunked calls backpropagate through time exactly.
            A float must be finite; a tensor is not value-checked, since it is usually the
            membrane carried from an earlier call (NaN there: a neuron silenced by a NaN input).
        v_reset: ``None`` for soft reset, else the hard-reset potential.
        surrogate, width: surrogate derivative of the Heaviside step in the backward pass,
            ``"atan"`` (width w = SpikingJelly's ``ATan(alpha=2/w)``), ``"rectangle"``
            (``Rect(alpha=1/w)``) or ``"sigmoid"`` (``Sigmoid(alpha=1/w)``; width 0.25 is
            SpikingJelly's ``IFNode`` default, ``Sigmoid(alpha=4)``); see
            :func:`rnl_fast.reference.surrogate_grad`.
        detach_reset: no gradient through the reset term.
        spike_dtype: ``None`` (= ``x.dtype``), ``x.dtype``, ``torch.uint8`` or ``torch.bool``;
            byte spikes cut the bytes written for inference and carry no gradient.
        count_neurons: also return the spikes per neuron (else ``neuron_counts`` is None and
            the kernels skip writing them: a simulator needs only the counts per step).

    Memory saved for backward: only the input x (by reference, no copy) and the per-neuron
    initial membrane; the backward pass recomputes the membrane. SpikingJelly's IF node saves the
    float32 pre-spike membrane ``h_seq`` (4 bytes per element) besides its spikes.
    """
    x = check_if_input(x)
    cdt = compute_dtype_of(x.dtype)
    width = check_surrogate(surrogate, width, cdt)
    v_reset = check_v_reset(v_reset, cdt)
    check_bool("detach_reset", detach_reset)
    check_bool("count_neurons", count_neurons)
    check_spike_dtype(spike_dtype, x.dtype)
    spike_dtype = spike_dtype or x.dtype
    v_th_t = neuron_param("v_th", v_th, x, positive=True)
    v_init_t = neuron_param("v_init", v_init, x, positive=False)
    if backend_for(x) == "torch":  # the torch backend is the spec itself
        result = reference.if_sequence(x, v_th_t, v_init_t, v_reset, surrogate, width, detach_reset, spike_dtype)
    else:
        hard = v_reset is not None
        result = _if_forward(
            x,
            v_th_t,
            v_init_t,
            v_reset or 0.0,
            hard,
            surrogate,
            width,
            detach_reset,
            spike_dtype,
            count_neurons,
        )
    return if_result(result, count_neurons)
