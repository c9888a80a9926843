"""Rate Norm conversion (paper §2.2, Theorem 1): each Rate Norm Layer becomes IF neurons with
threshold θ = p·running_max, and the weights stay as they are, since the next layer already sees
rates in [0, 1]. ``"rnl"`` and ``"rnl_ril"`` are the same recipe; they differ only in the network
they are given (before or after stage 2, the Rate Inference Loss)."""

from __future__ import annotations

from typing import Any

from torch import fx

from ..nn import RateNorm
from .recipe import NeuronLayerSpec, Recipe


class RateNormRecipe(Recipe):
    activation = RateNorm
    needs_calibration = False

    def __init__(self, name: str) -> None:
        self.name = name

    def neuron_layer(self, gm: fx.GraphModule, node: fx.Node, statistics: dict[str, Any]) -> NeuronLayerSpec:
        return NeuronLayerSpec(threshold=float(gm.get_submodule(node.target).threshold))
