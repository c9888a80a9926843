"""Integrate-and-fire neurons fused with the 2×2 average pooling of their spikes (inference).

``rnl_fast::if_pool_forward`` is a converted network's "neurons → AvgPool2d(2)" in one pass over
the input current: the spikes are pooled where they are made and never stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..numerics import compute_dtype_of
from . import _pages
from ._backend import backend_for, cpp, cpp_reset, threads, triton
from ._checks import check_bool, check_if_input, check_number, check_v_reset, neuron_param
from ._if_io import ForwardIO, IFResult, fake_state_outputs, if_result
from ._library import custom_op
from .layout import logical, neuron_order, pool_geometry, pool_out_size


@custom_op("rnl_fast::if_pool_forward")
def _if_pool_forward(
    x: Tensor,
    v_th: Tensor,
    v_init: Tensor,
    v_reset: float,
    hard_reset: bool,
    scale: float,
    ceil_mode: bool,
    count_neurons: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    io = ForwardIO.of(x, v_th, v_init, count_neurons, pool_dims=True)
    _, pooled_shape, (planes, H, W, inner) = pool_geometry(x, io.order, ceil_mode)
    T = x.shape[0]
    pooled = _pages.empty((T, math.prod(pooled_shape)), x.dtype, x.device)
    if backend_for(x) == "triton":
        triton(x.device.type == "cpu").if_fwd_pool2x2(
            io.x2,
            (planes, H, W, inner),
            ceil_mode,
            io.v_th.reshape(-1),
            io.v_init.reshape(-1),
            v_reset,
            hard_reset,
            scale,
            pooled,
            io.v_final,
            io.step_counts,
            io.counted(),
        )
    else:
        cpp().if_forward_pool2x2(
            **io.cpp_in_args(),
            planes=planes,
            H=H,
            W=W,
            inner=inner,
            ceil_mode=ceil_mode,
            v_reset=v_reset,
            reset=cpp_reset(hard_reset),
            scale=scale,
            pooled=pooled.data_ptr(),
            pooled_len=pooled.numel(),
            **io.cpp_out_args(),
            num_threads=threads(),
        )
    return (logical(pooled.view(T, *pooled_shape), io.order, lead=1), *io.outputs())


@_if_pool_forward.register_fake
def _(x, v_th, v_init, v_reset, hard_reset, scale, ceil_mode, count_neurons):
    order = neuron_order(x, pool_dims=True)
    neuron_shape, pooled_shape, _ = pool_geometry(x, order, ceil_mode)
    pooled = logical(x.new_empty((x.shape[0], *pooled_shape)), order, lead=1)
    return (pooled, *fake_state_outputs(x, neuron_shape, order, count_neurons))


def if_sequence_pool2x2(
    x: Tensor,
    v_th: Tensor | float = 1.0,
    v_init: Tensor | float = 0.0,
    v_reset: float | None = None,
    scale: float = 1.0,
    ceil_mode: bool = False,
    count_neurons: bool = True,
) -> IFResult:
    """IF neurons (as :func:`rnl_fast.ops.if_sequence`) whose spikes are averaged over 2×2 windows, in one kernel.

    ``x: [T, *, H, W]`` → ``IFResult`` whose ``spikes`` field holds the pooled rates
    ``avg_pool2d(spikes, 2, ceil_mode=ceil_mode) · scale``, ``[T, *, H', W']`` in ``x.dtype``
    (H' = H // 2, or ⌈H/2⌉ with ``ceil_mode``); the membrane and the counts are those of
    :func:`rnl_fast.ops.if_sequence` over every neuron. The spikes themselves are never stored: this
    is the converted network's "neurons → AvgPool2d(2)" in one pass over the input current, for
    simulation. Bit-identical to :func:`rnl_fast.reference.if_sequence_pool2x2`.

    Inference only: raises if a gradient would be needed (train with :func:`rnl_fast.ops.if_sequence`
    and ``avg_pool2d``).

    Args:
        x: ``[T, *, H, W]`` input current, any strides;
            stride 0 in T (constant coding) is read once per neuron.
        v_th, v_init, v_reset: as in :func:`rnl_fast.ops.if_sequence`.
        scale: finite float multiplying every pooled value (a converted layer's spike weight λ).
        ceil_mode: as ``nn.AvgPool2d``: keep windows overhanging an odd last row or column.
        count_neurons: as in :func:`rnl_fast.ops.if_sequence`.
    """
    x = check_if_input(x)
    if x.dim() < 3:
        raise ValueError(f"x must be [T, *, H, W], got shape {tuple(x.shape)}")
    check_bool("ceil_mode", ceil_mode)
    check_bool("count_neurons", count_neurons)
    H, W = x.shape[-2:]
    if pool_out_size(H, ceil_mode) == 0 or pool_out_size(W, ceil_mode) == 0:
        raise ValueError(f"a 2x2 window does not fit in H x W = {H} x {W} (ceil_mode={ceil_mode})")
    cdt = compute_dtype_of(x.dtype)
    v_reset = check_v_reset(v_reset, cdt)
    scale = check_number("scale", scale, dtype=cdt)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (x, v_init)):
        raise RuntimeError(
            "if_sequence_pool2x2 is inference only and gives no gradient: run it under torch.no_grad(), "
            "or train with if_sequence followed by avg_pool2d"
        )
    v_th_t = neuron_param("v_th", v_th, x, positive=True)
    v_init_t = neuron_param("v_init", v_init, x, positive=False)
    if backend_for(x) == "torch":  # the torch backend is the spec itself
        result = reference.if_sequence_pool2x2(x, v_th_t, v_init_t, v_reset, scale, ceil_mode)
    else:
        hard = v_reset is not None
        result = _if_pool_forward(x, v_th_t, v_init_t, v_reset or 0.0, hard, scale, ceil_mode, count_neurons)
    return if_result(result, count_neurons)
