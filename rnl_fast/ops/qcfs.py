"""The QCFS activation (Bu et al., ICLR 2022) as custom ops: a ReLU quantized to L levels under a
trainable clipping bound λ, ``λ·clamp(floor(x/λ·L + ½)/L, 0, 1)``
(:func:`rnl_fast.reference.qcfs` is its definition and gradient).

``rnl_fast::qcfs_forward`` computes y; ``rnl_fast::qcfs_backward`` recomputes the rate from x and
gives the gradients to x and to λ, so autograd saves only x and λ. Both backends round every op as
the reference does, so y and grad_x equal the reference's element for element; dL/dλ, a sum over
all elements, differs from autograd's only by the order of the additions.

The kernels walk x in memory order (:func:`.layout.flat_in_memory_order`): a channels-last input
is used as it lies, and y and grad_x are given its layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..numerics import compute_dtype_of
from . import _pages
from ._backend import backend_for, cpp, cpp_dtype, threads, triton
from ._checks import check_float_tensor, check_one_element, check_qcfs_levels
from ._library import custom_op
from .layout import flat_in_memory_order, flat_like


def _cpp_input(x1: Tensor, threshold: Tensor, levels: int) -> dict:
    """The arguments every C++ entry point takes: the flat input, λ read on the host (a CPU tensor:
    no device to wait for; exact as a Python float), L and the threads."""
    return dict(
        x=x1.data_ptr(),
        x_len=x1.numel(),
        dtype=cpp_dtype(x1.dtype),
        threshold=threshold.item(),
        levels=levels,
        num_threads=threads(),
    )


@custom_op("rnl_fast::qcfs_forward")
def _qcfs_forward(x: Tensor, threshold: Tensor, levels: int) -> Tensor:
    x, x1, order = flat_in_memory_order(x)
    y = _pages.empty_like(x)
    y1 = flat_like(y, order)  # a view: y lies as x does
    if backend_for(x) == "triton":  # λ stays on the device: the kernel reads it
        triton(x.device.type == "cpu").qcfs_fwd(x1, threshold.to(compute_dtype_of(x.dtype)), y1, levels)
        return y
    cpp().qcfs_forward(**_cpp_input(x1, threshold, levels), y=y1.data_ptr(), y_len=y1.numel())
    return y


@_qcfs_forward.register_fake
def _(x, threshold, levels):
    return torch.empty_like(x)


@custom_op("rnl_fast::qcfs_backward")
def _qcfs_backward(grad_y: Tensor, x: Tensor, threshold: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    x, x1, order = flat_in_memory_order(x)
    cdt = compute_dtype_of(x.dtype)
    g1 = flat_like(grad_y.to(x.dtype), order)
    grad_x = _pages.empty_like(x)
    grad_x1 = flat_like(grad_x, order)  # a view: grad_x lies as x does
    if backend_for(x) == "triton":
        grad_threshold = torch.empty((), dtype=cdt, device=x.device)
        triton(x.device.type == "cpu").qcfs_bwd(g1, x1, threshold.to(cdt), grad_x1, grad_threshold, levels)
    else:
        grad_lambda = cpp().qcfs_backward(
            **_cpp_input(x1, threshold, levels),
            grad_y=g1.data_ptr(),
            grad_y_len=g1.numel(),
            grad_x=grad_x1.data_ptr(),
            grad_x_len=grad_x1.numel(),
        )
        grad_threshold = torch.tensor(grad_lambda, dtype=cdt)
    # As the reference's λ.to(compute dtype) passes its gradient back: in λ's own dtype.
    return grad_x, grad_threshold.to(threshold.dtype).reshape(threshold.shape)


@_qcfs_backward.register_fake
def _(grad_y, x, threshold, levels):
    return torch.empty_like(x), torch.empty_like(threshold)


def _qcfs_setup_context(ctx, inputs, output) -> None:
    x, threshold, levels = inputs
    ctx.save_for_backward(x, threshold)  # y is recomputed from x: nothing else is kept
    ctx.levels = levels


def _qcfs_autograd_backward(ctx, grad_y):
    x, threshold = ctx.saved_tensors
    grad_x, grad_threshold = _qcfs_backward(grad_y, x, threshold, ctx.levels)
    return grad_x, grad_threshold, None


_qcfs_forward.register_autograd(_qcfs_autograd_backward, setup_context=_qcfs_setup_context)


def qcfs(x: Tensor, threshold: Tensor, levels: int) -> Tensor:
    """QCFS activation ``λ·clamp(floor(x/λ·L + ½)/L, 0, 1)`` with QCFS's straight-through
    gradients to x and to λ (:func:`rnl_fast.reference.qcfs`), fused: one pass each way.

    Args:
        x: ``[*]`` pre-activation with at least one element, float32/float64/float16/bfloat16,
            any strides (y keeps a dense layout such as channels-last).
        threshold: ``[]`` (or one element) λ > 0, the trainable clipping bound, on x's device, any
            float dtype (its sign is checked only by the C++ backend: reading a CUDA λ would
            synchronise the GPU on every call).
        levels: L, a positive int.

    Returns:
        ``[*]``, x's shape and dtype, computed in float32 (float64 for float64 x).
    """
    x = check_float_tensor("x", x)
    if x.numel() == 0:
        raise ValueError(f"x must have at least one element, got shape {tuple(x.shape)}")
    levels = check_qcfs_levels(levels)
    check_one_element("threshold", threshold, x)
    threshold = threshold.reshape(())
    if backend_for(x) == "torch":  # the torch backend is the spec itself
        return reference.qcfs(x, threshold, levels)
    return _qcfs_forward(x, threshold, levels)
