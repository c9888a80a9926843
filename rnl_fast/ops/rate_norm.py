"""The Rate Norm Layer as custom ops (paper Eq. 6), with the Rate Inference Loss sums (Eq. 8).

``rnl_fast::rate_norm_forward`` updates the running max, computes θ and r̂ and the sums Σr̂, Σr̂²
in one pass; ``rnl_fast::rate_norm_backward`` recomputes r̂ from x and gives the gradients to x
and to ``raw_p``. Both backends compute the scalars (running max, θ, dL/draw_p) themselves, op by
op as the spec rounds them. Two options change what the pass computes: ``channel_wise`` (one
running max and θ_c per channel, dim 1) and ``levels`` (the rate quantized to L levels, QCFS).

The kernels walk x in memory order (:func:`.layout.flat_in_memory_order`): a channels-last input
is used as it lies and r̂ and grad_x are given its layout; a channel-wise kernel finds the channel
of element i as ``(i // inner) % C``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional  # Optional: the spelling torch.library's schema inference documents

import torch
from torch import Tensor

from .. import reference
from ..numerics import THETA_EPS, compute_dtype_of
from . import _pages
from ._backend import backend_for, cpp, cpp_dtype, threads, triton
from ._checks import (
    check_bool,
    check_channel_wise,
    check_float_tensor,
    check_fraction,
    check_levels,
    check_one_element,
    check_rate_norm_scalars,
    check_running_max,
)
from ._library import custom_op
from .layout import channel_inner, flat_in_memory_order, flat_like


class RateNormResult(NamedTuple):
    """Outputs of :func:`rnl_fast.ops.rate_norm`."""

    r: Tensor  #: rates r̂ in [0, 1], shape and dtype of x
    running_max: Tensor  #: float32, the running max θ was computed from: ``[]``, or ``[C]`` channel-wise
    sum_r: Tensor  #: ``[]`` Σr̂ over all elements (float32, float64 for float64 x)
    sum_r2: Tensor  #: ``[]`` Σr̂² over all elements


def _channels(x: Tensor, order: tuple[int, ...], channel_wise: bool) -> tuple[int, int]:
    """``(C, inner)`` of a channel-wise call (:func:`.layout.channel_inner`); ``(1, M)`` otherwise."""
    if not channel_wise:
        return 1, x.numel()
    return x.shape[1], channel_inner(x, order)


def _cpp_input(x1: Tensor, raw_p: Tensor, running_max: Tensor) -> dict:
    """The flat input and raw_p as the C++ entry points take them: raw_p's value is exact as a
    Python float. raw_p and the running max, read on the host here, are checked (by name) so that
    θ > 0, which the C++ kernels require; a scalar running max is passed by value."""
    raw = raw_p.item()
    scalar = running_max.dim() == 0
    peak = running_max.item() if scalar else running_max.min().item()
    check_rate_norm_scalars(raw, peak)
    common = dict(x=x1.data_ptr(), x_len=x1.numel(), dtype=cpp_dtype(x1.dtype), raw_p=raw, theta_eps=THETA_EPS)
    if scalar:
        return dict(common, running_max=peak)
    running_max = running_max.contiguous()
    return dict(common, running_max=running_max.data_ptr(), running_max_len=running_max.numel())


@custom_op("rnl_fast::rate_norm_forward")
def _rate_norm_forward(
    x: Tensor,
    raw_p: Tensor,
    running_max: Tensor,
    momentum: float,
    training: bool,
    channel_wise: bool = False,
    levels: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, x1, order = flat_in_memory_order(x)
    channels, inner = _channels(x, order, channel_wise)
    cdt = compute_dtype_of(x.dtype)
    r = _pages.empty_like(x)
    r1 = flat_like(r, order)  # a view: r lies as x does
    running_max_out = torch.empty(running_max.shape, dtype=torch.float32, device=x.device)
    if backend_for(x) == "triton":
        sum_r, sum_r2 = torch.empty((), dtype=cdt, device=x.device), torch.empty((), dtype=cdt, device=x.device)
        triton(x.device.type == "cpu").rate_norm_fwd(
            x1, raw_p, running_max, momentum, training, THETA_EPS, r1, running_max_out, sum_r, sum_r2,
            channels=channels, inner=inner, levels=levels,
        )  # fmt: skip
        return r, running_max_out, sum_r, sum_r2
    # CPU tensors: reading the scalars on the host costs no device synchronisation.
    common = dict(
        **_cpp_input(x1, raw_p, running_max), momentum=momentum, training=training, levels=levels, r=r1.data_ptr()
    )
    if channel_wise:
        sum_r, sum_r2 = cpp().rate_norm_channel_forward(
            **common,
            channels=channels,
            inner=inner,
            r_len=r1.numel(),
            running_max_out=running_max_out.data_ptr(),
            running_max_out_len=running_max_out.numel(),
            num_threads=threads(),
        )
    else:
        running_max_used, sum_r, sum_r2 = cpp().rate_norm_forward(**common, r_len=r1.numel(), num_threads=threads())
        running_max_out.fill_(running_max_used)
    return r, running_max_out, torch.tensor(sum_r, dtype=cdt), torch.tensor(sum_r2, dtype=cdt)


@_rate_norm_forward.register_fake
def _(x, raw_p, running_max, momentum, training, channel_wise=False, levels=0):
    cdt = compute_dtype_of(x.dtype)
    return (
        torch.empty_like(x),
        x.new_empty(running_max.shape, dtype=torch.float32),
        x.new_empty((), dtype=cdt),
        x.new_empty((), dtype=cdt),
    )


@custom_op("rnl_fast::rate_norm_backward")
def _rate_norm_backward(
    grad_r: Optional[Tensor],  # noqa: UP045
    grad_sum_r: Optional[Tensor],  # noqa: UP045
    grad_sum_r2: Optional[Tensor],  # noqa: UP045
    x: Tensor,
    raw_p: Tensor,
    running_max: Tensor,
    channel_wise: bool = False,
    levels: int = 0,
) -> tuple[Tensor, Tensor]:
    x, x1, order = flat_in_memory_order(x)
    channels, inner = _channels(x, order, channel_wise)
    cdt = compute_dtype_of(x.dtype)
    g1 = None if grad_r is None else flat_like(grad_r.to(x.dtype), order)
    grad_x = _pages.empty_like(x)
    grad_x1 = flat_like(grad_x, order)  # a view: grad_x lies as x does
    if backend_for(x) == "triton":
        grad_raw = torch.empty((), dtype=cdt, device=x.device)
        triton(x.device.type == "cpu").rate_norm_bwd(
            g1, grad_sum_r, grad_sum_r2, x1, raw_p, running_max, THETA_EPS, grad_x1, grad_raw,
            channels=channels, inner=inner, levels=levels,
        )  # fmt: skip
        return grad_x, grad_raw.to(raw_p.dtype)
    common = dict(
        grad_r=0 if g1 is None else g1.data_ptr(),
        grad_r_len=0 if g1 is None else g1.numel(),
        grad_sum_r=0.0 if grad_sum_r is None else grad_sum_r.to(cdt).item(),
        grad_sum_r2=0.0 if grad_sum_r2 is None else grad_sum_r2.to(cdt).item(),
        **_cpp_input(x1, raw_p, running_max),
        levels=levels,
        grad_x=grad_x1.data_ptr(),
        grad_x_len=grad_x1.numel(),
        num_threads=threads(),
    )
    if channel_wise:
        grad_raw = cpp().rate_norm_channel_backward(**common, channels=channels, inner=inner)
    else:
        grad_raw = cpp().rate_norm_backward(**common)
    return grad_x, torch.tensor(grad_raw, dtype=cdt).to(raw_p.dtype)


@_rate_norm_backward.register_fake
def _(grad_r, grad_sum_r, grad_sum_r2, x, raw_p, running_max, channel_wise=False, levels=0):
    return torch.empty_like(x), torch.empty_like(raw_p)


def _rate_norm_setup_context(ctx, inputs, output) -> None:
    x, raw_p, _running_max, _momentum, _training, channel_wise, levels = inputs
    ctx.save_for_backward(x, raw_p, output[1])  # r̂ is recomputed from x: nothing else is kept
    ctx.channel_wise, ctx.levels = channel_wise, levels
    ctx.set_materialize_grads(False)


def _rate_norm_autograd_backward(ctx, grad_r, _grad_running_max, grad_sum_r, grad_sum_r2):
    x, raw_p, running_max = ctx.saved_tensors
    if grad_r is None and grad_sum_r is None and grad_sum_r2 is None:
        return None, None, None, None, None, None, None
    grad_x, grad_raw = _rate_norm_backward(
        grad_r, grad_sum_r, grad_sum_r2, x, raw_p, running_max, ctx.channel_wise, ctx.levels
    )
    return grad_x, grad_raw.reshape(raw_p.shape), None, None, None, None, None


_rate_norm_forward.register_autograd(_rate_norm_autograd_backward, setup_context=_rate_norm_setup_context)


def rate_norm(
    x: Tensor,
    raw_p: Tensor,
    running_max: Tensor,
    momentum: float = 0.1,
    training: bool = True,
    channel_wise: bool = False,
    levels: int | None = None,
) -> RateNormResult:
    """Fused Rate Norm Layer (paper Eq. 6) with the Rate Inference Loss sums (Eq. 8).

    In training mode the running max is first updated, on the device and without a host sync:
    ``running_max ← (1 − momentum)·running_max + momentum·max(relu(x))`` over the whole tensor
    (NaN elements skipped, no gradient through the max); the new value is returned, not written.
    Then ``θ = sigmoid(raw_p)·running_max + 1e-6`` and ``r̂ = clip(x, 0, θ)/θ``; the same pass
    yields Σr̂ and Σr̂², so Ω = Σr̂ / (Σr̂² + 1e-5) costs no extra pass and its gradient joins
    the fused backward (to x and to ``raw_p``). NaN in x gives NaN in r̂ and in the sums.

    ``channel_wise``: x is ``[B, C, *]`` and ``running_max`` is ``[C]``; the max, θ_c and the
    clip are per channel (dim 1), p is still the one ``raw_p``, the sums still run over all
    elements. ``levels = L``: ``r̂ = floor(clip(x, 0, θ)/θ·L + ½)/L`` (QCFS, Bu et al. 2022), with
    QCFS's straight-through gradient (:func:`rnl_fast.reference.quantized_rate`); the sums are
    over the quantized rates.

    Args:
        x: ``[*]`` pre-activation (``[B, C, *]`` with ``channel_wise``), float32/float64/float16/
            bfloat16, any strides (r̂ keeps a dense layout such as channels-last).
        raw_p: ``[]`` (or one element) trainable logit of p.
        running_max: float32 buffer (not modified): one element, or ``[C]`` with ``channel_wise``.
        raw_p, running_max: on CPU tensors raw_p must be finite and the running max >= 0 (so that
            θ > 0), else ValueError naming them; on a GPU they are not read (no host sync).
        momentum: in (0, 1].
        training: update the running max from this batch before using it.
        channel_wise: one running max and threshold per channel (dim 1).
        levels: None, or the positive int L of quantized rates.
    """
    x = check_float_tensor("x", x)
    if x.numel() == 0:
        raise ValueError(f"x must have at least one element, got shape {tuple(x.shape)}")
    check_channel_wise(channel_wise, x)
    levels = check_levels(levels)
    check_one_element("raw_p", raw_p, x)
    check_running_max(running_max, x, channel_wise)
    momentum = check_fraction("momentum", momentum)
    training = check_bool("training", training)
    shape = (x.shape[1],) if channel_wise else ()
    raw_p, running_max = raw_p.reshape(()), running_max.detach().reshape(shape).to(torch.float32)
    if backend_for(x) == "torch":  # the torch backend is the spec itself
        return RateNormResult(*reference.rate_norm(x, raw_p, running_max, momentum, training, channel_wise, levels))
    return RateNormResult(*_rate_norm_forward(x, raw_p, running_max, momentum, training, channel_wise, levels or 0))
