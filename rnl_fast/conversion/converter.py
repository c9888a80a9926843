"""``convert``: a trained ANN → :class:`~rnl_fast.simulation.SpikingNetwork`, by any recipe."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..simulation import SpikingNetwork
from .graph import activation_nodes, check_convertible, drop_dropout, fold_all_batchnorms, trace
from .registry import methods_by_activation, recipe_for


def convert(
    model: nn.Module,
    method: str = "rnl",
    calibration: Iterable | None = None,
    device: torch.device | str = "cpu",
    calibration_batches: int | None = None,
    spike_dtype: torch.dtype | None = None,
) -> SpikingNetwork:
    """Convert a trained ANN to a :class:`~rnl_fast.simulation.SpikingNetwork`.

    The ANN is traced with ``torch.fx``; every part is checked to run on spikes; each BatchNorm
    is folded into the conv/linear before it and dropout is dropped; each activation becomes
    integrate-and-fire neurons (soft reset) with the threshold and spike weight the method's
    recipe gives (:mod:`rnl_fast.conversion.registry`):

    - ``"rnl"`` / ``"rnl_ril"``: a Rate Norm Layer's threshold θ = p·running_max, weights as
      they are (Theorem 1);
    - ``"maxnorm"`` / ``"robustnorm"`` (Rueckauer et al. 2017), for the same architecture with
      ReLU: thresholds balanced on calibration data.

    Args:
        model: the ANN (RateNorm activations for "rnl"/"rnl_ril", nn.ReLU for the baselines);
            it is not modified.
        method: one of :data:`~rnl_fast.conversion.METHODS`.
        calibration: batches ``(x, y)`` for the baselines' λ (ignored by the RNL methods).
        device: where calibration batches go.
        calibration_batches: use at most this many calibration batches.
        spike_dtype: dtype of the spikes between layers inside the simulator (None: float32).

    Raises:
        ConversionError: a part of the model that cannot run on spikes, named.
        ValueError: an unknown method, or a method that needs calibration data without it.
    """
    recipe = recipe_for(method)
    ann = copy.deepcopy(model).eval()
    gm = trace(ann)
    check_convertible(gm, recipe.activation, methods_by_activation())
    if recipe.needs_calibration and calibration is None:
        raise ValueError(f"method {method!r} needs calibration data: pass calibration=<loader of (x, y)>")
    statistics = recipe.calibrate(gm, calibration, device, calibration_batches)
    drop_dropout(gm)
    fold_all_batchnorms(gm)
    layers = {
        node.target: recipe.neuron_layer(gm, node, statistics) for node in activation_nodes(gm, recipe.activation)
    }
    thresholds = {name: spec.threshold for name, spec in layers.items()}
    spike_weights = {name: spec.spike_weight for name, spec in layers.items()}
    return SpikingNetwork(gm, thresholds, spike_weights, method=method, spike_dtype=spike_dtype)
