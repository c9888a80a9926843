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
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout} (use .to_dense())")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}"
            " (convert spikes or counts with .float() first)"
        )
    return x


#: ``(smallest normal, largest finite)`` of each compute dtype: a positive parameter must lie in
#: between once cast, or it would become 0, a subnormal (flushed to 0 by vectorised kernels, and
#: whose reciprocal overflows) or inf.
_RANGE = {dt: (torch.finfo(dt).tiny, torch.finfo(dt).max) for dt in (torch.float32, torch.float64)}


def check_bool(name: str, value: object) -> bool:
    """``value`` itself if it is a bool: a truthy string or a number is a mistake, not an option
    (ValueError, as for every option of the ops)."""
    if value is not True and value is not False:
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_number(
    name: str, value: object, positive: bool = False, dtype: torch.dtype = torch.float64, none: str = ""
) -> float:
    """``value`` as a float, if it is an int or float (not a bool) that stays finite (and, if
    ``positive``, positive and normal) in ``dtype``: what the kernels compute with.

    ``none``: what None would have meant, named in the message when None is allowed (the caller
    handles None itself)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # ValueError, as for every option
        what = "a positive finite float" if positive else "a finite float"
        raise ValueError(f"{name} must be {none}{what}, got {value!r}")
    tiny, largest = _RANGE[dtype]
    if not (tiny <= value <= largest if positive else -largest <= value <= largest):
        bounds = f"from {tiny:.3g} to {largest:.3g}" if positive else f"at most {largest:.3g} in magnitude"
        what = "positive and finite" if positive else "finite"
        raise ValueError(
            f"{name} must be {none}{what} in {str(dtype).removeprefix('torch.')} ({bounds}), got {value!r}"
        )
    return float(value)


def _check_positive_finite(name: str, t: Tensor) -> None:
    """Positive, normal, finite values in ``t``'s dtype (the compute dtype: ``t`` is already cast);
    CPU tensors only: reading a GPU tensor's values would synchronise the host with the device on
    every call (as Rate Norm's raw_p and running max, they are not read there). Skipped while
    torch.compile traces the graph."""
    if torch.compiler.is_compiling() or t.device.type != "cpu":
        return
    tiny, largest = _RANGE[t.dtype]
    bad = ~((t >= tiny) & (t <= largest))
    if bool(bad.any()):
        raise ValueError(
            f"{name} must be positive and finite in {str(t.dtype).removeprefix('torch.')}, "
            f"got {t.flatten()[bad.flatten()][:4].tolist()}"
        )


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
        value = (value.detach() if name == "v_th" else value).to(cdt)
        if positive:  # a tensor v_init is taken as it is: it may be a carried NaN (silent) membrane
            _check_positive_finite(name, value.detach())  # after the cast: 1e-50 is 0 in float32
        if value.numel() == 1:
            return value.reshape(())
        return value.expand(neuron_shape).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__} {value!r}")
    # torch.full, not torch.tensor: on a GPU, torch.tensor copies from pageable host memory, which
    # waits for the device's queue to drain on every call; a fill kernel is queued like the rest.
    return torch.full((), check_number(name, value, positive, cdt), dtype=cdt, device=x.device)


def check_if_input(x: object) -> Tensor:
    """An IF input current: a dense float tensor ``[T, *neurons]`` with T ≥ 1 and at least one neuron."""
    x = check_float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a time dimension first, [T, *neurons]; got a 0-dim tensor")
    if x.shape[0] == 0:
        raise ValueError(f"x must have at least one time step, got shape {tuple(x.shape)} (T = 0)")
    if x.numel() == 0:
        raise ValueError(f"x must have at least one neuron, got shape {tuple(x.shape)}")
    return x


def check_v_reset(v_reset: object, dtype: torch.dtype = torch.float64) -> float | None:
    """None (soft reset) or a hard-reset potential finite in ``dtype``, as a float."""
    return None if v_reset is None else check_number("v_reset", v_reset, dtype=dtype, none="None (soft reset) or ")


def check_surrogate(surrogate: object, width: object, dtype: torch.dtype = torch.float64) -> float:
    """A surrogate name of :data:`rnl_fast.numerics.SURROGATES` and a width positive and finite in
    ``dtype`` (the backward divides by it), returned as a float."""
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    return check_number("width", width, positive=True, dtype=dtype)


def check_spike_dtype(spike_dtype: object, x_dtype: torch.dtype | None = None) -> None:
    """None (x's dtype), a float dtype (``x_dtype`` when given), ``torch.uint8`` or ``torch.bool``."""
    allowed = (torch.uint8, torch.bool, x_dtype) if x_dtype is not None else (torch.uint8, torch.bool, *FLOAT_DTYPES)
    if spike_dtype is not None and spike_dtype not in allowed:
        same = f"x.dtype ({x_dtype})" if x_dtype is not None else "a float dtype"
        raise ValueError(f"spike_dtype must be None, {same}, torch.uint8 or torch.bool; got {spike_dtype}")


def check_one_element(name: str, t: object, x: Tensor) -> None:
    """A floating tensor with one element, on x's device (raw_p, running_max of Rate Norm)."""
    if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor with one element, got {t!r}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_fraction(name: str, value: object) -> float:
    """A float in (0, 1] (not a bool), as a float: a running-max momentum, a Rate Norm p."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1] (a float), got {value!r}")
    return float(value)


def check_rate_norm_scalars(raw_p: float, running_max: float) -> None:
    """raw_p finite and the running max ≥ 0 (not NaN), so that θ = sigmoid(raw_p)·running_max + ε > 0:
    for the backends that read them on the host (CPU tensors); on a GPU no value is read."""
    if not math.isfinite(raw_p):
        raise ValueError(f"raw_p must be finite, got {raw_p}")
    if not running_max >= 0:
        raise ValueError(f"running_max must be >= 0 (a max of ReLU outputs), got {running_max}")


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
    check_bool("channel_wise", channel_wise)
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
