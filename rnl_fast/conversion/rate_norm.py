"""Rate Norm conversion (paper §2.2, Theorem 1): each Rate Norm Layer becomes IF neurons with
threshold θ = p·running_max, and the weights stay as they are, since the next layer already sees
rates in [0, 1]. ``"rnl"`` and ``"rnl_ril"`` are the same recipe; they differ only in the network
they are given (before or after stage 2, the Rate Inference Loss). ``"rnl_qcfs"`` is the recipe
again for a Rate Norm network trained with quantized rates (``RateNorm(levels=L)``, QCFS's
quantization inside the Rate Norm Layer) and tuned by the Rate Inference Loss; it starts the
membrane at θ/2, as QCFS does, unless told otherwise.

A Rate Norm Layer with one threshold per channel (a tensor ``threshold`` of at least one dim,
``[C]`` or any shape that flattens to it) gives per-channel neurons ``θ_c`` as it is, whatever
``channel_wise`` says: the network was trained with those thresholds (a 0-dim threshold is one
for the layer: a plain layer, or a channel-wise one that never saw an input). ``channel_wise=True``
asks for per-channel thresholds and so needs such a layer.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..nn import RateNorm
from .recipe import NeuronLayerSpec, Recipe


class RateNormRecipe(Recipe):
    activation = RateNorm
    needs_calibration = False

    def __init__(self, name: str, default_v_init: float | str = 0.0) -> None:
        self.name = name
        self.default_v_init = default_v_init

    def neuron_layer(
        self, gm: fx.GraphModule, node: fx.Node, statistics: dict[str, Any], channel_wise: bool = False
    ) -> NeuronLayerSpec:
        threshold = gm.get_submodule(node.target).threshold.detach()
        if threshold.dim() > 0:  # a Rate Norm Layer with a threshold per channel ([C], or [C, 1, 1])
            return NeuronLayerSpec(threshold=threshold.reshape(-1).float().clone())
        if channel_wise:
            raise ValueError(
                f"channel_wise=True with method {self.name!r} needs a network trained with "
                f"RateNorm(channel_wise=True); the Rate Norm Layer '{node.target}' has one threshold for the layer"
            )
        return NeuronLayerSpec(threshold=float(threshold))
