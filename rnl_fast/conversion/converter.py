"""``convert``: a trained ANN → :class:`~rnl_fast.simulation.SpikingNetwork`, by any recipe."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..simulation import SpikingNetwork
from .graph import activation_nodes, check_convertible, drop_dropout, fold_all_batchnorms, trace
from .options import check_channel_wise, initial_fraction
from .registry import methods_by_activation, recipe_for


def convert(
    model: nn.Module,
    method: str = "rnl",
    calibration: Iterable | None = None,
    device: torch.device | str = "cpu",
    calibration_batches: int | None = None,
    spike_dtype: torch.dtype | None = None,
    v_init: float | str | None = None,
    channel_wise: bool = False,
) -> SpikingNetwork:
    """Convert a trained ANN to a :class:`~rnl_fast.simulation.SpikingNetwork`.

    The ANN is traced with ``torch.fx``; every part is checked to run on spikes; each BatchNorm
    is folded into the conv/linear before it and dropout is dropped; each activation becomes
    integrate-and-fire neurons (soft reset) with the threshold and spike weight the method's
    recipe gives (:mod:`rnl_fast.conversion.registry`):

    - ``"rnl"`` / ``"rnl_ril"``: a Rate Norm Layer's threshold θ = p·running_max, weights as
      they are (Theorem 1);
    - ``"maxnorm"`` / ``"robustnorm"`` (Rueckauer et al. 2017), for the same architecture with
      ReLU: thresholds balanced on calibration data;
    - ``"qcfs"`` (Bu et al., ICLR 2022), for the architecture with :class:`~rnl_fast.QCFS`
      layers: threshold = the trained clipping bound λ, spikes weighted by λ, membrane from θ/2;
    - ``"rnl_qcfs"``: a Rate Norm network trained with quantized rates (``RateNorm(levels=L)``)
      and the Rate Inference Loss, converted as ``"rnl"`` but from θ/2.

    Two options serve every method (:mod:`rnl_fast.conversion.options`): ``v_init``, the
    membrane each neuron layer starts at after a reset, as a fraction of its threshold
    (``"half"``: θ/2, which removes most of the first steps' error), and ``channel_wise``, one
    threshold per output channel (dim 1 of the activation) instead of one per layer.

    Args:
        model: the ANN (RateNorm activations for "rnl"/"rnl_ril"/"rnl_qcfs", nn.ReLU for the
            baselines, QCFS for "qcfs"); it is not modified.
        method: one of :data:`~rnl_fast.conversion.METHODS`.
        calibration: batches ``(x, y)`` for the baselines' λ (ignored by the RNL methods).
        device: where calibration batches go.
        calibration_batches: use at most this many calibration batches.
        spike_dtype: dtype of the spikes between layers inside the simulator (None: float32).
        v_init: initial membrane as a fraction of the threshold, a float in [0, 1) or ``"half"``
            (0.5); every layer starts at ``v_init·θ`` (per channel when θ is) at the start of
            each simulation. None: the method's default, 0 (the paper's start) for the paper's
            four methods, ``"half"`` for ``"qcfs"`` and ``"rnl_qcfs"``.
        channel_wise: MaxNorm/RobustNorm: λ per output channel (max or 99.9th percentile of that
            channel's activations), folded per input channel into the next conv/linear (or
            carried on the spikes where it cannot be folded). The Rate Norm methods need a
            network whose RateNorm layers have a threshold per channel (and use it whether or not
            ``channel_wise`` is set).

    Raises:
        ConversionError: a part of the model that cannot run on spikes, named.
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown method, a method that needs calibration data without it, a bad
            ``v_init`` or ``channel_wise``, or ``channel_wise`` where a layer has no channels
            or the Rate Norm network has one threshold per layer; the message names the argument.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (the trained ANN), got {type(model).__name__} {model!r}")
    recipe = recipe_for(method)
    fraction = initial_fraction(recipe.default_v_init if v_init is None else v_init)
    check_channel_wise(channel_wise)
    ann = copy.deepcopy(model).eval()
    gm = trace(ann)
    check_convertible(gm, recipe.activation, methods_by_activation())
    if recipe.needs_calibration and calibration is None:
        raise ValueError(f"method {method!r} needs calibration data: pass calibration=<loader of (x, y)>")
    statistics = recipe.calibrate(gm, calibration, device, calibration_batches, channel_wise)
    drop_dropout(gm)
    fold_all_batchnorms(gm)
    layers = {
        node.target: recipe.neuron_layer(gm, node, statistics, channel_wise)
        for node in activation_nodes(gm, recipe.activation)
    }
    thresholds = {name: spec.threshold for name, spec in layers.items()}
    spike_weights = {name: spec.spike_weight for name, spec in layers.items()}
    return SpikingNetwork(gm, thresholds, spike_weights, method=method, spike_dtype=spike_dtype, v_init=fraction)
