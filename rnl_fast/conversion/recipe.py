"""What a conversion method is: a recipe with two hooks that :func:`rnl_fast.convert` calls.

:func:`~rnl_fast.convert` does the graph work every method shares (trace, checks, dropout out,
BatchNorm folded, :mod:`.graph`) and asks the method's :class:`Recipe` for the rest: statistics
of the ANN on calibration data (before any folding), then, for each activation node, the
threshold and spike weight of the IF neurons that replace it, one value per layer or one per
channel (``channel_wise``). New methods subclass :class:`Recipe` and join the registry
(:mod:`.registry`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn


class ConversionError(ValueError):
    """A part of the network cannot run on spikes; the message names it."""


@dataclass(frozen=True)
class NeuronLayerSpec:
    """The IF neurons that replace one activation: threshold, and the weight each spike carries
    into the next layer (1 when the weights already expect rates in [0, 1]).

    Each is a float (one value for the layer) or a 1-D float32 tensor ``[C]``, one value per
    channel, the channel being dim 1 of the activation (``[B, C, H, W]`` for a conv, the feature
    of ``[B, F]`` for a linear layer); the simulator broadcasts it as ``[C, 1, 1]`` or ``[F]``.
    """

    threshold: float | Tensor
    spike_weight: float | Tensor = 1.0

    def __post_init__(self) -> None:
        for name in ("threshold", "spike_weight"):
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.dim() != 1:
                raise ValueError(f"a per-channel {name} must be a 1-D tensor [C], got shape {tuple(value.shape)}")

    @property
    def channel_wise(self) -> bool:
        """Whether the threshold is per channel."""
        return isinstance(self.threshold, Tensor)


class Recipe:
    """One conversion method. Subclasses set :attr:`name`, :attr:`activation` and
    :attr:`needs_calibration` and implement :meth:`neuron_layer`."""

    #: The method's name, as :func:`rnl_fast.convert` takes it.
    name: str
    #: The activation module type whose instances become IF neurons.
    activation: type[nn.Module]
    #: Whether :meth:`calibrate` needs batches ``(x, y)`` of data.
    needs_calibration: bool = False
    #: The initial membrane :func:`rnl_fast.convert` uses when given none (``v_init=None``): a
    #: fraction of θ, or ``"half"``. 0 for the paper's methods; θ/2 for those trained for it (QCFS).
    default_v_init: float | str = 0.0

    def calibrate(
        self,
        gm: fx.GraphModule,
        calibration: Iterable | None,
        device: torch.device | str,
        max_batches: int | None,
        channel_wise: bool = False,
    ) -> dict[str, Any]:
        """Statistics of the traced ANN (eval mode, BatchNorm not yet folded), per activation
        name (per channel with ``channel_wise``); the default gathers none."""
        return {}

    def neuron_layer(
        self, gm: fx.GraphModule, node: fx.Node, statistics: dict[str, Any], channel_wise: bool = False
    ) -> NeuronLayerSpec:
        """The neurons for the activation at ``node`` (after BatchNorm folding), with a threshold
        per channel when ``channel_wise``. May rewrite the weights of ``gm`` (threshold balancing
        folds a spike weight into the next layer). A ValueError naming ``channel_wise`` when the
        method cannot give per-channel thresholds for this layer."""
        raise NotImplementedError
