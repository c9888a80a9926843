"""Argument validation of the public ops: every error names the argument and what was expected.

The ops check their arguments here, before any kernel runs, so that the kernels may trust what
they are given (the C++ entry points still check that buffer sizes fit, as a last guard).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..numerics import FLOAT_DTYPES, SURROGATES, compute_dtype_of


def check_float_tensor(name: str, x: object) -> Tensor:
    """``x`` itself, if it is a tensor of one of :data:`rnl_fast.numerics.FLOAT_DTYPES`."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}"
            " (convert spikes or counts with .float() first)"
        )
    return x


def _check_positive_finite(name: str, t: Tensor) -> None:
    """Positive, finite values; skipped while torch.compile traces the graph."""
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(t) | (t <= 0)
    if bool(bad.any()):
        raise ValueError(f"{name} must be positive and finite, got {t.flatten()[bad.flatten()][:4].tolist()}")


def neuron_param(name: str, value: Tensor | float, x: Tensor, positive: bool) -> Tensor:
    """A threshold or initial membrane as a ``[]`` or ``x.shape[1:]`` tensor in the compute dtype."""
    neuron_shape = x.shape[1:]
    cdt = compute_dtype_of(x.dtype)
    if isinstance(value, Tensor):
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
        try:
            broadcast = torch.broadcast_shapes(value.shape, neuron_shape)
        except RuntimeError:
            broadcast = None
        if broadcast != neuron_shape:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to the neuron shape "
                f"x.shape[1:] = {tuple(neuron_shape)}"
            )
        value = value.detach() if name == "v_th" else value
        if positive:  # a tensor v_init is taken as it is: it may be a carried NaN (silent) membrane
            _check_positive_finite(name, value.detach())
        if value.numel() == 1:
            return value.to(cdt).reshape(())
        return value.to(cdt).expand(neuron_shape).contiguous()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'positive and finite' if positive else 'finite'}, got {value}")
    return torch.tensor(float(value), dtype=cdt, device=x.device)


def check_if_input(x: object) -> Tensor:
    """An IF input current: a float tensor ``[T, *neurons]`` with T ≥ 1 and at least one neuron."""
    x = check_float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a time dimension first, [T, *neurons]; got a 0-dim tensor")
    if x.shape[0] == 0:
        raise ValueError(f"x must have at least one time step, got shape {tuple(x.shape)} (T = 0)")
    if x.numel() == 0:
        raise ValueError(f"x must have at least one neuron, got shape {tuple(x.shape)}")
    return x


def check_v_reset(v_reset: object) -> None:
    """None (soft reset) or a finite hard-reset potential."""
    if v_reset is not None and not (isinstance(v_reset, (int, float)) and math.isfinite(v_reset)):
        raise ValueError(f"v_reset must be None (soft reset) or a finite float, got {v_reset!r}")


def check_surrogate(surrogate: object, width: object) -> None:
    """A surrogate name of :data:`rnl_fast.numerics.SURROGATES` and a positive finite width."""
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive finite float, got {width!r}")


def check_one_element(name: str, t: object, x: Tensor) -> None:
    """A floating tensor with one element, on x's device (raw_p, running_max of Rate Norm)."""
    if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor with one element, got {t!r}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_momentum(momentum: object) -> None:
    """A running-max momentum in (0, 1]."""
    if not (isinstance(momentum, (int, float)) and 0.0 < momentum <= 1.0):
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")


#: The largest number of quantization levels: L must be exact in float32 arithmetic (r·L + ½).
MAX_LEVELS = 2**24


def check_levels(levels: object) -> int | None:
    """None (no quantization) or a positive int L ≤ :data:`MAX_LEVELS`, returned as an int."""
    if levels is None:
        return None
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be None or a positive int (at most 2**24), got {levels!r}")
    return int(levels)


def check_qcfs_levels(levels: object) -> int:
    """QCFS's L: a positive int ≤ :data:`MAX_LEVELS` (None, no quantization, is not QCFS)."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be a positive int (at most 2**24) for QCFS, got {levels!r}")
    return int(levels)


def check_channel_wise(channel_wise: object, x: Tensor | None = None) -> None:
    """A bool; when True, ``x`` (if given) must have a channel dim: ``[B, C, *]``, at least 2-D."""
    if not isinstance(channel_wise, bool):
        raise ValueError(f"channel_wise must be a bool, got {channel_wise!r}")
    if channel_wise and x is not None and x.dim() < 2:
        raise ValueError(
            f"channel_wise=True needs x with a channel dim, [B, C, *] (channels are dim 1); got shape {tuple(x.shape)}"
        )


def check_running_max(running_max: object, x: Tensor, channel_wise: bool) -> None:
    """A floating tensor on x's device with one value, or with ``channel_wise`` one per channel of x."""
    if not channel_wise:
        check_one_element("running_max", running_max, x)
        return
    channels = x.shape[1]
    if not isinstance(running_max, Tensor) or not running_max.is_floating_point() or running_max.dim() > 1:
        raise ValueError(f"running_max must be a floating [C] tensor with channel_wise=True, got {running_max!r}")
    if running_max.numel() != channels:
        raise ValueError(
            f"running_max holds {running_max.numel()} channels but x has {channels} (dim 1 of shape "
            f"{tuple(x.shape)}): a channel-wise layer keeps one running max per channel of its input"
        )
    if running_max.device != x.device:
        raise ValueError(f"running_max is on {running_max.device} but x is on {x.device}")
