"""QCFS conversion (Bu et al., ICLR 2022): each QCFS layer ``λ·clamp(floor(x/λ·L + ½)/L, 0, 1)``
becomes IF neurons with threshold λ whose spikes carry the weight λ (folded into the next
conv/linear where only pooling and reshapes lie between, as threshold balancing folds its λ),
starting at θ/2: the method's default ``v_init`` is ``"half"``, the start QCFS's analysis pairs
with the shift ½ of its quantization. No calibration: λ was trained with the weights.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..nn import QCFS
from .options import HALF
from .recipe import NeuronLayerSpec, Recipe
from .threshold_balancing import fold_spike_weight


class QCFSRecipe(Recipe):
    """Method ``"qcfs"``: the trained clipping bound λ of each QCFS layer is its neurons' threshold."""

    name = "qcfs"
    activation = QCFS
    needs_calibration = False
    default_v_init = HALF

    def neuron_layer(
        self, gm: fx.GraphModule, node: fx.Node, statistics: dict[str, Any], channel_wise: bool = False
    ) -> NeuronLayerSpec:
        if channel_wise:
            raise ValueError(
                f"channel_wise=True does not apply to method 'qcfs': the QCFS layer '{node.target}' "
                "trained one clipping bound λ for the layer"
            )
        lam = float(gm.get_submodule(node.target).threshold.detach())
        folded = fold_spike_weight(gm, node, lam)
        return NeuronLayerSpec(threshold=lam, spike_weight=1.0 if folded else lam)
