"""Pure-PyTorch definitions of every rnl_fast op: the specification.

Every fast backend (C++ in ``csrc/``, Triton in ``kernels/``) is tested against these functions
element for element, the benchmarks use them as the eager baseline, and
``RNL_FAST_BACKEND=torch`` runs them instead of the kernels. They are written for clarity,
not speed: one Python-level loop over time, autograd for the backward pass.

Shapes: ``T`` time steps, ``N`` (or ``*``) neurons; the neuron shape is whatever follows T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The shared conventions (numerics.py); reference.THETA_EPS etc. stay importable from here too.
from .numerics import OMEGA_EPS, SURROGATES, THETA_EPS, compute_dtype_of


def surrogate_grad(u: Tensor, surrogate: str, width: float) -> Tensor:
    """Derivative of the smooth stand-in for the Heaviside step H(u), u = m − v_th.

    Every shape integrates to 1 over u, and ``width`` w (in the units of the membrane potential)
    scales it along u; each is one of SpikingJelly 2.0's surrogates with alpha a function of w:

    - ``"atan"``: σ'(u) = (1/w) / (1 + (π·u/w)²), the derivative of ½ + atan(π·u/w)/π.
      SpikingJelly's ``surrogate.ATan(alpha)`` with w = 2/alpha (``width = 1``: its ``ATan()``,
      alpha = 2).
    - ``"rectangle"``: σ'(u) = 1/w where |u| < w/2, else 0 (straight-through within a window).
      SpikingJelly's ``surrogate.Rect(alpha)`` with w = 1/alpha.
    - ``"sigmoid"``: σ'(u) = (1/w)·S(u/w)·(1 − S(u/w)), S the logistic sigmoid, the derivative
      of S(u/w). SpikingJelly's ``surrogate.Sigmoid(alpha)`` with w = 1/alpha (``width = 0.25``:
      its ``Sigmoid()``, alpha = 4, the default surrogate of its ``IFNode``). Evaluated as
      (1/w)·e/(1 + e)² with e = exp(−|u/w|) ≤ 1: no overflow, no cancellation in 1 − S, exactly
      1/(4w) at u = 0, and 0 rather than NaN far from the threshold.
    """
    if surrogate == "atan":
        return (1.0 / width) / (1.0 + (math.pi * u / width) ** 2)
    if surrogate == "rectangle":
        return (u.abs() < 0.5 * width).to(u.dtype) / width
    if surrogate == "sigmoid":
        e = torch.exp(-(u / width).abs())
        return (1.0 / width) * e / ((1.0 + e) * (1.0 + e))
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


class _Heaviside(torch.autograd.Function):
    """H(u) = (u >= 0) forward, the surrogate derivative backward."""

    @staticmethod
    def forward(ctx, u: Tensor, surrogate: str, width: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(u)
        ctx.surrogate, ctx.width = surrogate, width
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_spike: Tensor):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        return grad_spike * surrogate_grad(u, ctx.surrogate, ctx.width), None, None


class _HardReset(torch.autograd.Function):
    """``v_reset if s else m`` forward (an infinite m too); backward as the product form
    ``m·(1 − s) + v_reset·s``: dv/dm = 1 − s, dv/ds = v_reset − m."""

    @staticmethod
    def forward(ctx, m: Tensor, s: Tensor, v_reset: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(m, s)
        ctx.v_reset = v_reset
        return torch.where(s != 0, torch.full_like(m, v_reset), m)

    @staticmethod
    def backward(ctx, grad_v: Tensor):  # type: ignore[override]
        m, s = ctx.saved_tensors
        return grad_v * (1.0 - s), grad_v * (ctx.v_reset - m), None


def if_sequence(
    x: Tensor,
    v_th: Tensor | float = 1.0,
    v_init: Tensor | float = 0.0,
    v_reset: float | None = None,
    surrogate: str = "atan",
    width: float = 1.0,
    detach_reset: bool = False,
    spike_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Multi-step integrate-and-fire neurons (paper Eq. 3), one step at a time.

    For t = 0..T−1: ``m = v + x[t]``; ``s[t] = (m >= v_th)``; then soft reset ``v = m − v_th·s[t]``
    (``v_reset is None``) or hard reset ``v = v_reset if s[t] else m``.

    Arithmetic runs in float32 (float64 for float64 input). A NaN in ``x`` makes ``m`` NaN: that
    neuron does not fire at that step and its membrane stays NaN (silent) from then on. The resets
    apply as written whatever ``m`` is: a +inf membrane fires; the hard reset then sets v_reset
    (the neuron carries on), the soft reset leaves inf − v_th = inf (it fires at every step). A
    −inf membrane never fires and stays −inf.

    Args:
        x: ``[T, *]`` input current per step.
        v_th: threshold, a positive float or a tensor broadcastable to ``x.shape[1:]``.
        v_init: initial membrane, a float or a tensor broadcastable to ``x.shape[1:]``.
        v_reset: ``None`` for soft reset (reset by subtraction), else the hard-reset potential.
        surrogate, width: the surrogate gradient of the Heaviside step (see :func:`surrogate_grad`).
        detach_reset: if True, no gradient flows through the reset term.
        spike_dtype: dtype of the spikes; ``None`` means ``x.dtype``.

    Returns:
        spikes ``[T, *]`` (0/1 in ``spike_dtype``), final membrane ``[*]`` (float32, float64 for
        float64 input), spikes per step ``[T]`` (int64, summed over neurons), spikes per neuron
        ``[*]`` (int32, summed over steps).
    """
    compute_dtype = compute_dtype_of(x.dtype)
    neuron_shape = x.shape[1:]
    v_th_t = torch.as_tensor(v_th, dtype=compute_dtype, device=x.device).expand(neuron_shape)
    v = torch.as_tensor(v_init, dtype=compute_dtype, device=x.device).expand(neuron_shape)
    spikes = []
    for t in range(x.shape[0]):
        m = v + x[t].to(compute_dtype)
        s = _Heaviside.apply(m - v_th_t, surrogate, width)
        reset = s.detach() if detach_reset else s
        if v_reset is None:
            v = m - v_th_t * reset
        else:
            v = _HardReset.apply(m, reset, v_reset)
        spikes.append(s)
    s_all = torch.stack(spikes)
    step_counts = s_all.detach().flatten(1).sum(1, dtype=torch.int64)
    neuron_counts = s_all.detach().sum(0, dtype=torch.int64).to(torch.int32)
    return s_all.to(spike_dtype or x.dtype), v, step_counts, neuron_counts


def avg_pool2x2(x: Tensor, ceil_mode: bool = False) -> Tensor:
    """``avg_pool2d(kernel 2, stride 2)`` over the last two dims of ``[*, H, W]``; with
    ``ceil_mode`` a window overhanging an odd last row or column averages the values it covers."""
    H, W = x.shape[-2:]
    pooled = torch.nn.functional.avg_pool2d(x.reshape(-1, 1, H, W), 2, ceil_mode=ceil_mode)
    return pooled.reshape(*x.shape[:-2], *pooled.shape[-2:])


def if_sequence_pool2x2(
    x: Tensor,
    v_th: Tensor | float = 1.0,
    v_init: Tensor | float = 0.0,
    v_reset: float | None = None,
    scale: float = 1.0,
    ceil_mode: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """IF neurons followed by 2×2 average pooling of their spikes, times ``scale``.

    ``x: [T, *, H, W]`` → ``(avg_pool2x2(spikes) · scale`` ``[T, *, H', W']`` in ``x.dtype``,
    final membrane, spikes per step, spikes per neuron``)``, the last three as :func:`if_sequence`
    (every neuron counted, those outside all windows too). Inference only: no gradient.
    """
    spikes, v, step_counts, neuron_counts = if_sequence(x.detach(), v_th, v_init, v_reset)
    pooled = avg_pool2x2(spikes, ceil_mode)
    return (pooled * scale if scale != 1.0 else pooled), v, step_counts, neuron_counts


def rate_norm_threshold(raw_p: Tensor, running_max: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """θ = sigmoid(raw_p)·running_max + THETA_EPS in ``compute_dtype``, of the running max's shape
    (``[]``, or ``[C]`` for a channel-wise layer)."""
    return torch.sigmoid(raw_p.to(compute_dtype)) * running_max.to(compute_dtype) + THETA_EPS


def running_max_update(x: Tensor, running_max: Tensor, momentum: float, channel_wise: bool = False) -> Tensor:
    """``(1 − m)·running_max + m·max(relu(x))``, NaN elements skipped.

    The max is over the whole tensor (``running_max: []``), or with ``channel_wise`` over every
    dim but dim 1, one max per channel (``x: [B, C, *]``, ``running_max: [C]``). Skipping NaN
    keeps one corrupt batch from poisoning the layer's threshold for good; the output r̂ and the
    sums are NaN for that batch anyway. No gradient flows through the max.
    """
    x = torch.where(torch.isnan(x.detach()), 0.0, x.detach()).clamp_min(0)
    if channel_wise:
        batch_max = x.transpose(0, 1).reshape(x.shape[1], -1).amax(dim=1)
    else:
        batch_max = x.amax()
    return blend_running_max(running_max, batch_max.to(running_max.dtype), momentum)


def blend_running_max(running_max: Tensor, batch_max: Tensor, momentum: float) -> Tensor:
    """``(1 − momentum)·running_max + momentum·batch_max`` in the running max's dtype and shape."""
    return (1.0 - momentum) * running_max + momentum * batch_max.to(running_max.dtype)


class _FloorSTE(torch.autograd.Function):
    """floor(v) forward, the identity backward (QCFS's ``GradFloor``: a straight-through floor)."""

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:  # type: ignore[override]
        return v.floor()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad


def quantized_rate(x: Tensor, theta: Tensor, levels: int) -> Tensor:
    """QCFS's quantization-clip-floor-shift (Bu et al., ICLR 2022) as a rate in [0, 1]:
    ``clamp(floor(x/θ·L + ½)/L, 0, 1)``, equal value for value to ``floor(clip(x, 0, θ)/θ·L + ½)/L``.

    Written in QCFS's order (clamp after the floor, the floor straight-through) so that autograd
    gives QCFS's own gradient: with ``k = floor(x/θ·L + ½)``, inside the window 0 ≤ k ≤ L (x in
    [−θ/2L, θ(1 + 1/2L)) up to rounding) d r̂/dx = 1/θ and d r̂/dθ = −x/θ², else both 0. That is
    QCFS's d(λ·r̂)/dλ = r̂ − x/λ inside the window, 1 above it, as its official code's autograd
    gives it, divided through by λ for a layer whose output is r̂ itself.
    """
    k = _FloorSTE.apply(x / theta * levels + 0.5)
    return torch.clamp(k / levels, 0.0, 1.0)


def qcfs(x: Tensor, threshold: Tensor, levels: int) -> Tensor:
    """QCFS activation (Bu et al., ICLR 2022): ``λ·clamp(floor(x/λ·L + ½)/L, 0, 1)``, λ = ``threshold``.

    The quantization-clip-floor-shift of a ReLU with a trainable clipping bound λ, as the official
    code computes it (divide, straight-through floor, clamp, multiply), so autograd gives its
    gradients: with ``k = floor(x/λ·L + ½)``, inside the window 0 ≤ k ≤ L (x in
    [−λ/2L, λ(1 + 1/2L)) up to rounding) dy/dx = 1 and dy/dλ = k/L − x/λ; above it dy/dλ = 1,
    below it both are 0. Computed in the compute dtype (float32 for half inputs).

    Args:
        x: ``[*]`` any shape, floating.
        threshold: ``[]`` λ > 0 (a trainable parameter in :class:`rnl_fast.QCFS`).
        levels: L, a positive int: the output takes the L + 1 values λ·k/L, k = 0…L.

    Returns:
        ``[*]`` in ``x.dtype``.
    """
    xc = x.to(compute_dtype_of(x.dtype))
    lam = threshold.to(xc.dtype)
    return (quantized_rate(xc, lam, levels) * lam).to(x.dtype)


def rate_norm(
    x: Tensor,
    raw_p: Tensor,
    running_max: Tensor,
    momentum: float = 0.1,
    training: bool = True,
    channel_wise: bool = False,
    levels: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rate Norm Layer (paper Eq. 6, official code): ``r̂ = clip(x, 0, θ) / θ``.

    ``θ = sigmoid(raw_p)·running_max + THETA_EPS``; in training mode ``running_max`` is first
    replaced by :func:`running_max_update` (the new value is returned, not written in place).
    With ``channel_wise`` there is one running max, hence one θ_c, per channel (dim 1 of x), p
    still one per layer. With ``levels = L`` the rate is quantized to L + 1 levels as QCFS does
    (:func:`quantized_rate`): ``r̂ = floor(clip(x, 0, θ)/θ·L + ½)/L``.

    Args:
        x: ``[*]`` any shape, floating; ``[B, C, *]`` (at least 2-D) with ``channel_wise``.
        raw_p: ``[]`` the trainable logit of p (p = sigmoid(raw_p)).
        running_max: ``[]`` float32 buffer; ``[C]`` with ``channel_wise``.
        levels: None (no quantization) or a positive int L.

    Returns:
        r̂ ``[*]`` in ``x.dtype``; the running max used (``[]`` or ``[C]``); Σr̂ ``[]`` and Σr̂²
        ``[]`` over all elements (float32, float64 for float64 input), for the Rate Inference Loss.

    NaN: a NaN element has a NaN rate, gradient 0, and makes the gradient of ``raw_p`` NaN
    through its term −g·clip(x)/θ² whatever the loss reads (a corrupt batch gives no finite step);
    the kernels follow. Quantized, so does an infinite x, or one whose x/θ overflows: the
    straight-through floor passes 0·(x/θ)/θ back to θ outside the window, NaN there (plain, such
    an x is clipped and dL/draw_p stays finite). The sums are float32 pairwise sums of the
    float32 rates (half inputs too).
    """
    compute_dtype = compute_dtype_of(x.dtype)
    if training:
        running_max = running_max_update(x, running_max, momentum, channel_wise)
    theta = rate_norm_threshold(raw_p, running_max, compute_dtype)
    if channel_wise:
        theta = theta.reshape(-1, *([1] * (x.dim() - 2)))  # [C, 1, …]: broadcasts along dim 1
    xc = x.to(compute_dtype)
    if levels is None:
        r = torch.clamp(xc, torch.zeros_like(theta), theta) / theta
    else:
        r = quantized_rate(xc, theta, levels)
    return r.to(x.dtype), running_max, r.sum(), (r * r).sum()


def omega(r: Tensor) -> Tensor:
    """Rate Inference Loss of one layer (paper Eq. 8): ``Ω = ‖r̂‖₁ / (‖r̂‖₂² + OMEGA_EPS)``.

    ``r``: rates r̂ ≥ 0 of any shape; all elements (the whole batch) count, as in the official code.
    """
    r = r.to(compute_dtype_of(r.dtype))
    return r.sum() / ((r * r).sum() + OMEGA_EPS)
