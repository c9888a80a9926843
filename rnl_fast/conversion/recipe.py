"""What a conversion method is: a recipe with two hooks that :func:`rnl_fast.convert` calls.

:func:`~rnl_fast.convert` does the graph work every method shares (trace, checks, dropout out,
BatchNorm folded, :mod:`.graph`) and asks the method's :class:`Recipe` for the rest: statistics
of the ANN on calibration data (before any folding), then, for each activation node, the
threshold and spike weight of the IF neurons that replace it. New methods subclass
:class:`Recipe` and join the registry (:mod:`.registry`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn


class ConversionError(ValueError):
    """A part of the network cannot run on spikes; the message names it."""


@dataclass(frozen=True)
class NeuronLayerSpec:
    """The IF neurons that replace one activation: threshold, and the weight each spike carries
    into the next layer (1 when the weights already expect rates in [0, 1])."""

    threshold: float
    spike_weight: float = 1.0


class Recipe:
    """One conversion method. Subclasses set :attr:`name`, :attr:`activation` and
    :attr:`needs_calibration` and implement :meth:`neuron_layer`."""

    #: The method's name, as :func:`rnl_fast.convert` takes it.
    name: str
    #: The activation module type whose instances become IF neurons.
    activation: type[nn.Module]
    #: Whether :meth:`calibrate` needs batches ``(x, y)`` of data.
    needs_calibration: bool = False

    def calibrate(
        self, gm: fx.GraphModule, calibration: Iterable | None, device: torch.device | str, max_batches: int | None
    ) -> dict[str, Any]:
        """Statistics of the traced ANN (eval mode, BatchNorm not yet folded), per activation
        name; the default gathers none."""
        return {}

    def neuron_layer(self, gm: fx.GraphModule, node: fx.Node, statistics: dict[str, Any]) -> NeuronLayerSpec:
        """The neurons for the activation at ``node`` (after BatchNorm folding). May rewrite the
        weights of ``gm`` (threshold balancing folds a spike weight into the next layer)."""
        raise NotImplementedError
