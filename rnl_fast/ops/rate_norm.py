"""The Rate Norm Layer as custom ops (paper Eq. 6), with the Rate Inference Loss sums (Eq. 8).

``rnl_fast::rate_norm_forward`` updates the running max, computes θ and r̂ and the sums Σr̂, Σr̂²
in one pass; ``rnl_fast::rate_norm_backward`` recomputes r̂ from x and gives the gradients to x
and to ``raw_p``. Both backends compute the scalars (running max, θ, dL/draw_p) themselves, op by
op as the spec rounds them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional  # Optional: the spelling torch.library's schema inference documents

import torch
from torch import Tensor

from .. import reference
from ..numerics import THETA_EPS, compute_dtype_of
from ._backend import backend_for, cpp, cpp_dtype, threads, triton
from ._checks import check_float_tensor, check_momentum, check_one_element


class RateNormResult(NamedTuple):
    """Outputs of :func:`rnl_fast.ops.rate_norm`."""

    r: Tensor  #: rates r̂ in [0, 1], shape and dtype of x
    running_max: Tensor  #: ``[]`` float32, the running max θ was computed from
    sum_r: Tensor  #: ``[]`` Σr̂ over all elements (float32, float64 for float64 x)
    sum_r2: Tensor  #: ``[]`` Σr̂² over all elements


def _cpp_args(x1: Tensor, raw_p: Tensor, running_max: Tensor) -> dict:
    """The flat input and the scalars θ is computed from, as the C++ entry points take them: the
    values of raw_p and of the float32 running max are exact as Python floats."""
    return dict(
        x=x1.data_ptr(),
        x_len=x1.numel(),
        dtype=cpp_dtype(x1.dtype),
        raw_p=raw_p.item(),
        running_max=running_max.item(),
        theta_eps=THETA_EPS,
    )


@torch.library.custom_op("rnl_fast::rate_norm_forward", mutates_args=())
def _rate_norm_forward(
    x: Tensor, raw_p: Tensor, running_max: Tensor, momentum: float, training: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x1 = x.contiguous().view(-1)
    cdt = compute_dtype_of(x.dtype)
    r = torch.empty_like(x1)
    if backend_for(x) == "triton":
        running_max_out = torch.empty((), dtype=torch.float32, device=x.device)
        sums = torch.empty(2, dtype=cdt, device=x.device)
        triton(x.device.type == "cpu").rate_norm_fwd(
            x1, raw_p, running_max, momentum, training, THETA_EPS, r, running_max_out, sums
        )
        return r.view(x.shape), running_max_out, sums[0].clone(), sums[1].clone()  # no aliased outputs
    # CPU tensors: reading the scalars on the host costs no device synchronisation.
    running_max_used, sum_r, sum_r2 = cpp().rate_norm_forward(
        **_cpp_args(x1, raw_p, running_max),
        momentum=momentum,
        training=training,
        r=r.data_ptr(),
        r_len=r.numel(),
        num_threads=threads(),
    )
    return (
        r.view(x.shape),
        torch.tensor(running_max_used, dtype=torch.float32),
        torch.tensor(sum_r, dtype=cdt),
        torch.tensor(sum_r2, dtype=cdt),
    )


@_rate_norm_forward.register_fake
def _(x, raw_p, running_max, momentum, training):
    cdt = compute_dtype_of(x.dtype)
    return (
        torch.empty_like(x),
        x.new_empty((), dtype=torch.float32),
        x.new_empty((), dtype=cdt),
        x.new_empty((), dtype=cdt),
    )


@torch.library.custom_op("rnl_fast::rate_norm_backward", mutates_args=())
def _rate_norm_backward(
    grad_r: Optional[Tensor],  # noqa: UP045
    grad_sums: Tensor,
    x: Tensor,
    raw_p: Tensor,
    running_max: Tensor,
) -> tuple[Tensor, Tensor]:
    x1 = x.contiguous().view(-1)
    cdt = compute_dtype_of(x.dtype)
    g1 = None if grad_r is None else grad_r.to(x.dtype).contiguous().view(-1)
    grad_x = torch.empty_like(x1)
    if backend_for(x) == "triton":
        grad_raw = torch.empty((), dtype=raw_p.dtype, device=x.device)
        triton(x.device.type == "cpu").rate_norm_bwd(
            g1, grad_sums.to(cdt).contiguous(), x1, raw_p, running_max, THETA_EPS, grad_x, grad_raw
        )
        return grad_x.view(x.shape), grad_raw
    grad_sum_r, grad_sum_r2 = grad_sums.tolist()
    grad_raw = cpp().rate_norm_backward(
        grad_r=0 if g1 is None else g1.data_ptr(),
        grad_r_len=0 if g1 is None else g1.numel(),
        grad_sum_r=grad_sum_r,
        grad_sum_r2=grad_sum_r2,
        **_cpp_args(x1, raw_p, running_max),
        grad_x=grad_x.data_ptr(),
        grad_x_len=grad_x.numel(),
        num_threads=threads(),
    )
    return grad_x.view(x.shape), torch.tensor(grad_raw, dtype=cdt).to(raw_p.dtype)


@_rate_norm_backward.register_fake
def _(grad_r, grad_sums, x, raw_p, running_max):
    return torch.empty_like(x), torch.empty_like(raw_p)


def _rate_norm_setup_context(ctx, inputs, output) -> None:
    x, raw_p, _running_max, _momentum, _training = inputs
    ctx.save_for_backward(x, raw_p, output[1])  # r̂ is recomputed from x: nothing else is kept
    ctx.set_materialize_grads(False)


def _rate_norm_autograd_backward(ctx, grad_r, _grad_running_max, grad_sum_r, grad_sum_r2):
    x, raw_p, running_max = ctx.saved_tensors
    if grad_r is None and grad_sum_r is None and grad_sum_r2 is None:
        return None, None, None, None, None
    cdt = compute_dtype_of(x.dtype)
    zero = torch.zeros((), dtype=cdt, device=x.device)
    grad_sums = torch.stack(
        [zero if grad_sum_r is None else grad_sum_r.to(cdt), zero if grad_sum_r2 is None else grad_sum_r2.to(cdt)]
    )
    grad_x, grad_raw = _rate_norm_backward(grad_r, grad_sums, x, raw_p, running_max)
    return grad_x, grad_raw.reshape(raw_p.shape), None, None, None


_rate_norm_forward.register_autograd(_rate_norm_autograd_backward, setup_context=_rate_norm_setup_context)


def rate_norm(
    x: Tensor, raw_p: Tensor, running_max: Tensor, momentum: float = 0.1, training: bool = True
) -> RateNormResult:
    """Fused Rate Norm Layer (paper Eq. 6) with the Rate Inference Loss sums (Eq. 8).

    In training mode the running max is first updated, on the device and without a host sync:
    ``running_max ← (1 − momentum)·running_max + momentum·max(relu(x))`` over the whole tensor
    (NaN elements skipped, no gradient through the max); the new value is returned, not written.
    Then ``θ = sigmoid(raw_p)·running_max + 1e-6`` and ``r̂ = clip(x, 0, θ)/θ``; the same pass
    yields Σr̂ and Σr̂², so Ω = Σr̂ / (Σr̂² + 1e-5) costs no extra pass and its gradient joins
    the fused backward (to x and to ``raw_p``). NaN in x gives NaN in r̂ and in the sums.

    Args:
        x: ``[*]`` pre-activation, float32/float64/float16/bfloat16, any strides.
        raw_p: ``[]`` (or one element) trainable logit of p.
        running_max: ``[]`` float32 buffer (not modified).
        momentum: in (0, 1].
        training: update the running max from this batch before using it.
    """
    x = check_float_tensor("x", x)
    if x.numel() == 0:
        raise ValueError(f"x must have at least one element, got shape {tuple(x.shape)}")
    check_one_element("raw_p", raw_p, x)
    check_one_element("running_max", running_max, x)
    check_momentum(momentum)
    raw_p, running_max = raw_p.reshape(()), running_max.detach().reshape(()).to(torch.float32)
    if backend_for(x) == "torch":  # the torch backend is the spec itself
        return RateNormResult(*reference.rate_norm(x, raw_p, running_max, float(momentum), bool(training)))
    return RateNormResult(*_rate_norm_forward(x, raw_p, running_max, float(momentum), bool(training)))
