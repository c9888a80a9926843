"""The QCFS activation (Bu et al., ICLR 2022) as an op: a ReLU quantized to L levels under a
trainable clipping bound λ, ``λ·clamp(floor(x/λ·L + ½)/L, 0, 1)``
(:func:`rnl_fast.reference.qcfs` is its definition and gradient)."""

from __future__ import annotations

from torch import Tensor

from .. import reference
from ._checks import check_float_tensor, check_levels, check_one_element


def qcfs(x: Tensor, threshold: Tensor, levels: int) -> Tensor:
    """QCFS activation ``λ·clamp(floor(x/λ·L + ½)/L, 0, 1)`` with QCFS's straight-through
    gradients to x and to λ (:func:`rnl_fast.reference.qcfs`).

    Args:
        x: ``[*]`` pre-activation, float32/float64/float16/bfloat16, any strides.
        threshold: ``[]`` (or one element) λ > 0, the trainable clipping bound (its sign is not
            checked: reading it would synchronise a GPU on every call).
        levels: L, a positive int.

    Returns:
        ``[*]``, x's shape and dtype.
    """
    x = check_float_tensor("x", x)
    if x.numel() == 0:
        raise ValueError(f"x must have at least one element, got shape {tuple(x.shape)}")
    levels = check_levels(levels)
    if levels is None:
        raise ValueError("levels must be a positive int for QCFS, got None")
    check_one_element("threshold", threshold, x)
    return reference.qcfs(x, threshold.reshape(()), levels)
