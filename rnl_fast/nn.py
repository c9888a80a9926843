"""The layers as nn.Modules: :class:`IFSequence` (spiking), :class:`RateNorm` and :class:`QCFS` (ANN).

Modules hold state (membrane, spike counts, running max) and call :mod:`rnl_fast.ops`; they
know nothing of training, conversion or simulation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import ops
from .numerics import OMEGA_EPS, THETA_EPS
from .ops._checks import (
    check_bool,
    check_channel_wise,
    check_fraction,
    check_levels,
    check_number,
    check_qcfs_levels,
    check_spike_dtype,
    check_surrogate,
    check_v_reset,
)

#: The raw logit that ``p_init = 1.0`` maps to: p = sigmoid(10) ≈ 0.99995, as the official code.
RAW_P_MAX = 10.0

#: :attr:`IFSequence.step_mode` values, SpikingJelly's: multi-step ``[T, B, ...]``, single-step ``[B, ...]``.
STEP_MODES = ("m", "s")


class NeuronParameters(nn.Module):
    """A module whose buffers are neuron parameters (thresholds, spike weights): ``.to(device)``
    moves them, a dtype cast (``net.to(torch.bfloat16)``) leaves them float32. The kernels
    integrate in float32 (float64 for float64 input) whatever the input dtype, and a threshold
    rounded to bfloat16 would change which steps fire."""

    def _apply(self, fn, recurse=True):
        kept = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            self._buffers[name] = before.to(self._buffers[name].device)
        return self


class IFSequence(NeuronParameters):
    """Multi-step integrate-and-fire neurons with soft (or hard) reset, one kernel per call.

    A drop-in for SpikingJelly's ``IFNode(v_reset=None, step_mode=...)``. The membrane ``.v``
    carries over between calls until :meth:`reset`, so feeding x in chunks of steps gives exactly
    the spikes of one call (and, with gradients, exact backpropagation through time across the
    chunks). ``step_mode`` (SpikingJelly's meaning, settable at any time) says what one call takes:

    - ``"m"`` (default): ``x: [T, B, ...]`` → spikes ``[T, B, ...]``, all T steps in one kernel.
    - ``"s"``: one step, ``x: [B, ...]`` → spikes ``[B, ...]``; a loop ``for t in range(T):
      y[t] = layer(x[t])`` gives exactly the spikes, ``.v`` and counts of one ``"m"`` call on x
      (and the same gradients), at one kernel launch per step instead of one per call.

    The layer cannot tell a ``[T, B, ...]`` input from a ``[B, ...]`` one: in ``"s"`` mode a
    multi-step input is taken as one step of a larger batch (and, with a carried membrane, fails
    its shape check). :meth:`forward_steps` and :meth:`forward_pool2x2` are multi-step in both modes.

    Attributes:
        v: ``[B, ...]`` membrane after the last step (float32; None before the first call).
        step_mode: ``"m"`` or ``"s"`` (see above); anything else raises ValueError on set.
        step_spike_counts: ``[steps]`` int64, one entry per step simulated since reset: spikes
            summed over batch and neurons (the input of the energy model, paper Eq. 14).
        neuron_spike_counts: ``[B, ...]`` int64, spikes per neuron summed over steps since reset.

    Args:
        v_threshold: positive float, or a tensor broadcastable to the neuron shape ``[B, ...]``
            (e.g. ``[C, 1, 1]`` per channel); stored as a buffer.
        v_reset: None for soft reset (reset by subtraction, paper Eq. 3), else hard reset to it.
        v_init: initial membrane after reset (e.g. ``0.5 * v_threshold`` as QCFS uses).
        surrogate, width: surrogate gradient (:func:`rnl_fast.reference.surrogate_grad`);
            ``"sigmoid"``, 0.25 gives the gradients of SpikingJelly 2.0's ``IFNode`` default,
            ``Sigmoid(alpha=4)``.
        detach_reset: no gradient through the reset.
        spike_dtype: None (the input's dtype), ``torch.uint8`` or ``torch.bool`` for inference.
        count_neurons: keep ``neuron_spike_counts`` (False: it stays None and the kernels skip
            the per-neuron counts; the step counts, all the energy model needs, are kept).
        step_mode: ``"m"`` (``[T, B, ...]`` per call) or ``"s"`` (``[B, ...]`` per call).

    SpikingJelly: ``functional.set_step_mode(net, mode)`` and ``functional.reset_net(net)`` work on
    nets holding these layers without rnl_fast importing SpikingJelly (an optional dependency). Both
    find modules by duck typing: set_step_mode assigns ``m.step_mode`` on every module that has
    the attribute, reset_net calls ``m.reset()`` on every module that has the method (and
    ``detach_net`` calls :meth:`detach`). Their
    ``isinstance(m, base.StepModule / MemoryModule)`` checks only choose whether to log a warning
    (plain classes, not ABCs, so no registration could satisfy them short of inheriting them);
    the warning goes to SpikingJelly's logger, disabled unless the user enables it.
    """

    # Class-level default: instances unpickled from before step_mode existed are multi-step.
    _step_mode: str = "m"

    def __init__(
        self,
        v_threshold: float | Tensor = 1.0,
        v_reset: float | None = None,
        v_init: float | Tensor = 0.0,
        surrogate: str = "atan",
        width: float = 1.0,
        detach_reset: bool = False,
        spike_dtype: torch.dtype | None = None,
        count_neurons: bool = True,
        step_mode: str = "m",
    ) -> None:
        super().__init__()
        # Checked here, where they are given, in float32 (the compute dtype of every input but
        # float64); the op checks them again at each call against the input's compute dtype, since
        # an attribute may be set after construction.
        self.step_mode = step_mode
        self.width = check_surrogate(surrogate, width, torch.float32)
        self.surrogate = surrogate
        if isinstance(v_threshold, Tensor):
            self.register_buffer("v_threshold", v_threshold.detach().clone().float())
        else:
            self.v_threshold = check_number("v_threshold", v_threshold, positive=True, dtype=torch.float32)
        self.v_reset = check_v_reset(v_reset, torch.float32)
        if not isinstance(v_init, Tensor):
            v_init = check_number("v_init", v_init, dtype=torch.float32)
        self.v_init = v_init
        self.detach_reset = check_bool("detach_reset", detach_reset)
        check_spike_dtype(spike_dtype)
        self.spike_dtype = spike_dtype
        self.count_neurons = check_bool("count_neurons", count_neurons)
        self.v: Tensor | None = None
        self.step_spike_counts: Tensor | None = None
        self._neuron_counts: Tensor | None = None

    def __getstate__(self) -> dict:
        # The carried state may hang on an autograd graph: copies and pickles start reset.
        return {**super().__getstate__(), "v": None, "step_spike_counts": None, "_neuron_counts": None}

    @property
    def step_mode(self) -> str:
        """``"m"``: a call takes ``[T, B, ...]``; ``"s"``: a call takes one step ``[B, ...]``."""
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        if value not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {value!r}")
        self._step_mode = value

    def reset(self) -> None:
        """Forget the membrane and the spike counts (call between independent inputs)."""
        self.v = None
        self.step_spike_counts = None
        self._neuron_counts = None

    def detach(self) -> None:
        """Cut the carried membrane from the autograd graph of earlier calls (truncated BPTT:
        later calls backpropagate no further than here); spikes and counts are unchanged. What
        SpikingJelly's ``functional.detach_net`` calls."""
        if self.v is not None:
            self.v = self.v.detach()

    def forward(self, x: Tensor) -> Tensor:
        """``"m"``: ``x: [T, B, ...]`` input current → spikes ``[T, B, ...]``; ``"s"``: one step,
        ``x: [B, ...]`` → spikes ``[B, ...]`` (the same kernel on ``x.unsqueeze(0)``)."""
        if self._step_mode == "s":
            return self.forward_steps(x.unsqueeze(0)).squeeze(0)
        return self.forward_steps(x)

    def forward_steps(self, x: Tensor) -> Tensor:
        """``x: [T, B, ...]`` → spikes ``[T, B, ...]`` in either step mode: :meth:`forward` in
        ``"m"``, for callers that step time themselves (the simulator, whose network a user may
        hand to SpikingJelly's ``set_step_mode``)."""
        result = ops.if_sequence(
            x,
            v_th=self.v_threshold,
            v_init=self._initial_membrane(x),
            v_reset=self.v_reset,
            surrogate=self.surrogate,
            width=self.width,
            detach_reset=self.detach_reset,
            spike_dtype=self.spike_dtype,
            count_neurons=self.count_neurons,
        )
        return self._carry(result)

    def forward_pool2x2(self, x: Tensor, scale: float = 1.0, ceil_mode: bool = False) -> Tensor:
        """``x: [T, B, ..., H, W]`` → ``avg_pool2d(forward(x), 2, ceil_mode=ceil_mode) · scale``,
        ``[T, B, ..., H', W']`` in ``x.dtype``, in one kernel that never stores the spikes
        (:func:`rnl_fast.ops.if_sequence_pool2x2`). Membrane and counts advance exactly as in
        :meth:`forward`. Inference only (no gradient)."""
        result = ops.if_sequence_pool2x2(
            x,
            v_th=self.v_threshold,
            v_init=self._initial_membrane(x),
            v_reset=self.v_reset,
            scale=scale,
            ceil_mode=ceil_mode,
            count_neurons=self.count_neurons,
        )
        return self._carry(result)

    def _initial_membrane(self, x: Tensor) -> Tensor | float:
        """The carried membrane (checked against x's neuron shape), or v_init after a reset."""
        if self.v is None:
            return self.v_init
        if x.dim() >= 1 and self.v.shape != x.shape[1:]:
            raise ValueError(
                f"x has neuron shape {tuple(x.shape[1:])} but the carried membrane has "
                f"{tuple(self.v.shape)}: call reset() between inputs of different shapes"
            )
        return self.v

    def _carry(self, result: ops.IFResult) -> Tensor:
        """Keeps the membrane, appends the step counts, adds the neuron counts; returns the spikes."""
        self.v = result.v
        if self.step_spike_counts is None:
            self.step_spike_counts = result.step_counts
            self._neuron_counts = result.neuron_counts  # int32, the op's own fresh tensor
        else:
            self.step_spike_counts = torch.cat([self.step_spike_counts, result.step_counts])
            if self._neuron_counts is not None:
                # In place and in int32 (a neuron spikes at most once a step): a new int64 sum per
                # chunk cost 8% of a cnn7 simulation (12 bytes per neuron instead of 28, no page faults).
                self._neuron_counts.add_(result.neuron_counts)
        return result.spikes

    @property
    def neuron_spike_counts(self) -> Tensor | None:
        """``[B, ...]`` int64: spikes per neuron summed over the steps since reset (None before)."""
        return None if self._neuron_counts is None else self._neuron_counts.to(torch.int64)

    def extra_repr(self) -> str:
        th = self.v_threshold
        th_text = f"tensor{tuple(th.shape)}" if isinstance(th, Tensor) else f"{th:g}"
        reset = "soft" if self.v_reset is None else f"hard to {self.v_reset:g}"
        mode = "" if self._step_mode == "m" else f", step_mode={self._step_mode}"
        return f"v_threshold={th_text}, reset={reset}, surrogate={self.surrogate}(width={self.width:g}){mode}"


def raw_from_p(p: float) -> float:
    """The logit stored for a value p in (0, 1]; p = 1 maps to :data:`RAW_P_MAX` (p ≈ 0.99995)."""
    return min(math.log(p / (1.0 - p)), RAW_P_MAX) if p < 1.0 else RAW_P_MAX


class RateNorm(nn.Module):
    """Rate Norm Layer (paper Eq. 6): ``r̂ = clip(x, 0, θ)/θ``, ``θ = p·running_max``.

    Replaces ReLU in the ANN; its output is the firing rate the converted IF neuron (threshold θ)
    reaches (Theorem 1). In training mode the running max is updated from each batch before θ is
    used (``running_max ← (1−m)·running_max + m·max(relu(x))``, no host sync). Each forward also
    leaves the layer's Rate Inference Loss ``Ω = Σr̂ / (Σr̂² + 1e-5)`` in :attr:`omega`, computed
    in the same fused pass and differentiable.

    Args:
        momentum: running-max momentum m in (0, 1].
        p_init: initial p in (0, 1]; 1.0 gives p ≈ 1 (raw logit 10), as the paper's stage 1.
        p: a shared raw-logit ``nn.Parameter`` (one p for several layers, paper appendix);
            when None the layer owns exactly one parameter, ``raw_p``.
        channel_wise: one running max per channel (dim 1 of the input), hence one threshold
            ``θ_c = p·running_max_c`` per channel; still one p. Each channel starts at 1.0, as the
            whole layer does otherwise; the buffer takes its size ``[C]`` from the first input
            (or from ``num_channels``).
        levels: None, or L: quantized rates ``floor(clip(x, 0, θ)/θ·L + ½)/L`` (QCFS, Bu et al.
            2022) with QCFS's straight-through gradient; Ω is taken over the quantized rates.
        num_channels: with ``channel_wise``, C up front (else the first input's dim 1).

    Shape: any ``[*]`` → same shape, dtype (and memory layout); ``[B, C, *]`` with ``channel_wise``.
    """

    def __init__(
        self,
        momentum: float = 0.1,
        p_init: float = 1.0,
        p: nn.Parameter | None = None,
        channel_wise: bool = False,
        levels: int | None = None,
        num_channels: int | None = None,
    ) -> None:
        super().__init__()
        momentum = check_fraction("momentum", momentum)
        p_init = check_fraction("p_init", p_init)
        if p is not None and not (isinstance(p, nn.Parameter) and p.numel() == 1):
            raise ValueError("p must be a one-element nn.Parameter (the shared raw logit of p) or None")
        check_channel_wise(channel_wise)
        if num_channels is not None and (
            not channel_wise or isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1
        ):
            raise ValueError(
                f"num_channels must be None or a positive int with channel_wise=True, got {num_channels!r}"
            )
        self.momentum = momentum
        self.channel_wise = channel_wise
        self.levels = check_levels(levels)
        self.raw_p = p if p is not None else nn.Parameter(torch.tensor(raw_from_p(p_init)))
        # Channel-wise without num_channels: [] until the first input gives C (see _sized_running_max).
        self.register_buffer("running_max", torch.ones(num_channels) if num_channels else torch.tensor(1.0))
        self.omega: Tensor | None = None

    def __getstate__(self) -> dict:
        # Ω of the last forward hangs on its autograd graph: copies and pickles drop it.
        return {**super().__getstate__(), "omega": None}

    def __setstate__(self, state: dict) -> None:
        # Layers pickled before channel_wise and levels existed are plain Rate Norm Layers.
        super().__setstate__({"channel_wise": False, "levels": None, **state})

    @property
    def p(self) -> Tensor:
        """``[]`` p = sigmoid(raw_p), in (0, 1) (detached)."""
        return torch.sigmoid(self.raw_p.detach())

    @property
    def threshold(self) -> Tensor:
        """θ = p·running_max + 1e-6, the IF threshold of the converted neuron: ``[]``, or ``[C]``
        per channel for a channel-wise layer (``[]`` until its first input sized the buffer)."""
        return self.p * self.running_max + THETA_EPS

    def _sized_running_max(self, x: Tensor) -> Tensor:
        """The running max; a channel-wise layer's first input replaces the ``[]`` buffer by ``[C]``
        copies of its value (1.0 for a new layer: every channel starts where a scalar layer does)."""
        if self.channel_wise and self.running_max.dim() == 0 and x.dim() >= 2:
            self.running_max = self.running_max.expand(x.shape[1]).clone()
        return self.running_max

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A channel-wise layer not yet sized takes the size of the checkpoint's [C] running max.
        saved = state_dict.get(prefix + "running_max")
        if self.channel_wise and self.running_max.dim() == 0 and isinstance(saved, Tensor) and saved.dim() == 1:
            self.running_max = torch.empty_like(saved, dtype=self.running_max.dtype, device=self.running_max.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        running_max = self._sized_running_max(x)
        result = ops.rate_norm(
            x, self.raw_p, running_max, self.momentum, self.training, channel_wise=self.channel_wise, levels=self.levels
        )
        if self.training:
            with torch.no_grad():
                self.running_max.copy_(result.running_max)
        self.omega = result.sum_r / (result.sum_r2 + OMEGA_EPS)
        return result.r

    def extra_repr(self) -> str:
        rm = self.running_max
        rm_text = (
            f"{rm.item():.4g}"
            if rm.numel() == 1 and rm.dim() == 0
            else f"[{rm.numel()} channels, max {rm.max().item():.4g}]"
        )
        text = f"momentum={self.momentum:g}, p={self.p.item():.4f}, running_max={rm_text}"
        if self.channel_wise:
            text += ", channel_wise=True"
        if self.levels is not None:
            text += f", levels={self.levels}"
        return text


#: QCFS's quantization levels L when none is given (Bu et al. 2022 train with L = 4…16).
QCFS_LEVELS = 8
#: The clipping bound λ a QCFS layer starts from. QCFS's code starts at 4 or 8 and trains for
#: hundreds of epochs; here each QCFS layer follows a BatchNorm, so its input starts near unit
#: scale, and λ rises quickly when too low (its gradient above the window is 1) but hardly falls
#: when too high (inside the window it is the quantization error, about 0 on average). Measured
#: on MNIST cnn7 after 1 epoch (1000 test images): from 8, λ ≈ 7.9 and the SNN is never within
#: 1 point of its ANN in 32 steps; from 4, the same; from 2, 5 steps; from 1 (λ → 1.1, 1.2, 2.7),
#: 4 steps.
QCFS_THRESHOLD_INIT = 1.0


class QCFS(nn.Module):
    """QCFS activation (Bu et al., ICLR 2022): ``λ·clamp(floor(x/λ·L + ½)/L, 0, 1)``.

    A ReLU clipped at a trainable bound λ (:attr:`threshold`, one per layer) and quantized to L
    levels with the shift ½, trained in one stage with the weights (straight-through floor; the
    gradients of :func:`rnl_fast.reference.qcfs`). Converted, it becomes IF neurons with threshold
    λ whose spikes carry the weight λ, starting at θ/2 (method ``"qcfs"``); QCFS's analysis shows
    the expected conversion error is then zero at any number of steps.

    Args:
        levels: L, a positive int.
        threshold_init: initial λ, positive and finite.

    Shape: any ``[*]`` → same shape and dtype.
    """

    def __init__(self, levels: int = QCFS_LEVELS, threshold_init: float = QCFS_THRESHOLD_INIT) -> None:
        super().__init__()
        levels = check_qcfs_levels(levels)
        threshold_init = check_number("threshold_init", threshold_init, positive=True, dtype=torch.float32)
        self.levels = levels
        self.threshold = nn.Parameter(torch.tensor(threshold_init))

    def forward(self, x: Tensor) -> Tensor:
        return ops.qcfs(x, self.threshold, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, threshold={self.threshold.item():.4g}"


def rate_inference_loss(model: nn.Module) -> Tensor:
    """Mean Rate Inference Loss Ω over the model's Rate Norm Layers (paper Eq. 9), from their
    last forward pass; differentiable w.r.t. the weights and the p's."""
    omegas = [m.omega for m in model.modules() if isinstance(m, RateNorm)]
    if not omegas:
        raise ValueError("the model has no RateNorm layers: the Rate Inference Loss needs at least one")
    if any(o is None for o in omegas):
        raise RuntimeError("run a forward pass before rate_inference_loss(): some RateNorm layers have no Ω yet")
    return torch.stack(omegas).mean()
