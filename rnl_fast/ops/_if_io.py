"""What the two IF op families share: their result type, and how a forward op hands its input to
the kernels and takes back the per-neuron outputs (final membrane, spike counts).

The forward kernels walk the neurons in memory order (:mod:`rnl_fast.ops.layout`), so the
input is viewed, not copied, and every per-neuron output is given back in x's own layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..numerics import compute_dtype_of
from . import _pages
from ._backend import cpp_dtype
from .layout import in_order, logical, neuron_order, param_in_order, time_major


class IFResult(NamedTuple):
    """Outputs of :func:`rnl_fast.ops.if_sequence` (shapes for an input ``x: [T, *]``)."""

    spikes: Tensor  #: ``[T, *]`` 0/1 in ``spike_dtype``
    v: Tensor  #: ``[*]`` final membrane, float32 (float64 for float64 x)
    step_counts: Tensor  #: ``[T]`` int64, spikes per step summed over all neurons
    neuron_counts: Tensor | None  #: ``[*]`` int32, spikes per neuron over the T steps (None: not counted)


def if_result(outputs: tuple[Tensor, ...], count_neurons: bool) -> IFResult:
    """A forward op's four outputs as an :class:`IFResult` (no neuron counts unless asked for)."""
    spikes, v, step_counts, neuron_counts = outputs
    return IFResult(spikes, v, step_counts, neuron_counts if count_neurons else None)


def cpp_x_args(x2: Tensor) -> dict:
    """How the C++ entry points take a time-major ``[T, N]`` input (as keywords): its pointer, its
    length in elements, its dtype, T, N and the time stride (N, or 0 for a constant input)."""
    T, N = x2.shape
    x_len = x2[0].numel() + (T - 1) * x2.stride(0)
    return dict(x=x2.data_ptr(), x_len=x_len, dtype=cpp_dtype(x2.dtype), T=T, N=N, t_stride=x2.stride(0))


def cpp_param_args(v_th: Tensor, v_init: Tensor) -> dict:
    """The thresholds and initial membranes (``[]`` or ``[N]``) as the C++ entry points take them."""
    return dict(v_th=v_th.data_ptr(), v_th_len=v_th.numel(), v_init=v_init.data_ptr(), v_init_len=v_init.numel())


class ForwardIO(NamedTuple):
    """An IF forward op's input as its kernels take it, with the per-neuron outputs they fill."""

    order: tuple[int, ...]  #: the neuron dims in memory order (:func:`rnl_fast.ops.layout.neuron_order`)
    neuron_shape: torch.Size  #: the neuron shape in that order
    x2: Tensor  #: ``[T, N]`` time-major view of x
    v_th: Tensor  #: ``[]`` or contiguous in ``order``
    v_init: Tensor  #: ``[]`` or contiguous in ``order``
    v_final: Tensor  #: ``[N]`` out, compute dtype
    step_counts: Tensor  #: ``[T]`` int64 out
    neuron_counts: Tensor  #: ``[N]`` int32 out, or empty when the counts are not wanted

    @staticmethod
    def of(x: Tensor, v_th: Tensor, v_init: Tensor, count_neurons: bool, pool_dims: bool = False) -> ForwardIO:
        order = neuron_order(x, pool_dims=pool_dims)
        xo = in_order(x, order, lead=1)
        x2 = time_major(xo)
        T, N = x2.shape
        return ForwardIO(
            order,
            xo.shape[1:],
            x2,
            param_in_order(v_th, order),
            param_in_order(v_init, order),
            _pages.empty((N,), compute_dtype_of(x.dtype), x.device),
            torch.empty(T, dtype=torch.int64, device=x.device),
            _pages.empty((N if count_neurons else 0,), torch.int32, x.device),
        )

    def counted(self) -> Tensor | None:
        """``neuron_counts`` for the Triton launchers: None when the counts are not wanted."""
        return self.neuron_counts if self.neuron_counts.numel() else None

    def cpp_in_args(self) -> dict:
        """The input, thresholds and initial membranes as the C++ forward entry points take them."""
        return {**cpp_x_args(self.x2), **cpp_param_args(self.v_th, self.v_init)}

    def cpp_out_args(self) -> dict:
        """The final membrane, the step counts and the neuron counts (null when not wanted) as the
        C++ forward entry points take them."""
        counts = self.neuron_counts
        return dict(
            v_final=self.v_final.data_ptr(),
            v_final_len=self.v_final.numel(),
            step_counts=self.step_counts.data_ptr(),
            step_counts_len=self.step_counts.numel(),
            neuron_counts=counts.data_ptr() if counts.numel() else 0,
            neuron_counts_len=counts.numel(),
        )

    def outputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Final membrane, step counts, neuron counts, with x's logical neuron shape and layout."""
        return _state_outputs(self.v_final, self.step_counts, self.neuron_counts, self.neuron_shape, self.order)


def _state_outputs(
    v_final: Tensor, step_counts: Tensor, neuron_counts: Tensor, neuron_shape: torch.Size, order: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    counts = logical(neuron_counts.view(neuron_shape), order) if neuron_counts.numel() else neuron_counts
    return logical(v_final.view(neuron_shape), order), step_counts, counts


def fake_state_outputs(
    x: Tensor, neuron_shape: torch.Size, order: tuple[int, ...], count_neurons: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """What :meth:`ForwardIO.outputs` returns, for the fake kernels."""
    N = math.prod(neuron_shape)
    return _state_outputs(
        x.new_empty((N,), dtype=compute_dtype_of(x.dtype)),
        x.new_empty(x.shape[:1], dtype=torch.int64),
        x.new_empty((N if count_neurons else 0,), dtype=torch.int32),
        neuron_shape,
        order,
    )
