"""Threshold balancing (Rueckauer et al. 2017), the baselines MaxNorm and RobustNorm, for the
same architecture with ReLU.

Layer l's threshold is λ_l, the maximum (MaxNorm) or the 99.9th percentile of the non-zero
activations (RobustNorm) of its ReLU over the calibration set; the spikes it emits carry the
weight λ_l into the next layer, which is Theorem 1's ``W_SNN = W_ANN·λ_{l−1}`` with
``v_th,l = λ_l``. Where only pooling and reshapes lie between a neuron layer and the next
conv/linear, λ is folded into that layer's weights so that the simulator does not multiply every
spike tensor by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, fx, nn

from .recipe import NeuronLayerSpec, Recipe

#: RobustNorm's percentile of the non-zero activations (Rueckauer et al. 2017).
ROBUST_PERCENTILE = 99.9
#: Activations sampled per layer for the percentile (torch.quantile's input limit is 2**24).
_PERCENTILE_SAMPLE = 4_000_000
#: Modules through which a factor on the input comes out unchanged on the output (linear, no bias).
_SCALE_COMMUTING = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


@torch.no_grad()
def activation_scales(
    model: nn.Module, loader: Iterable, method: str, device: torch.device | str = "cpu", max_batches: int | None = None
) -> dict[str, float]:
    """λ per ReLU (qualified name → value): max or 99.9th percentile of its non-zero outputs over
    the calibration batches (x, y); MaxNorm (``method="maxnorm"``) uses the max, RobustNorm
    (``"robustnorm"``) the percentile."""
    relus = {name: m for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
    collected: dict[str, list[Tensor]] = {name: [] for name in relus}
    maxima: dict[str, float] = dict.fromkeys(relus, 0.0)

    def hook(name: str):
        def record(_module, _inputs, output: Tensor) -> None:
            maxima[name] = max(maxima[name], float(output.max()))
            if method == "robustnorm":
                positive = output[output > 0].float().cpu()
                # Keep a bounded uniform sample so memory stays flat on big calibration sets.
                if positive.numel() > _PERCENTILE_SAMPLE // 8:
                    positive = positive[torch.randint(positive.numel(), (_PERCENTILE_SAMPLE // 8,))]
                collected[name].append(positive)

        return record

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(hook(name)) for name, m in relus.items()]
    try:
        for i, (x, _y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if method == "maxnorm":
        return {name: value if value > 0 else 1.0 for name, value in maxima.items()}
    scales = {}
    for name, parts in collected.items():
        values = torch.cat(parts) if parts else torch.zeros(0)
        if values.numel() > _PERCENTILE_SAMPLE:
            values = values[torch.randperm(values.numel())[:_PERCENTILE_SAMPLE]]
        scales[name] = float(torch.quantile(values, ROBUST_PERCENTILE / 100)) if values.numel() else 1.0
    return scales


class ThresholdBalancing(Recipe):
    """MaxNorm (``"maxnorm"``) or RobustNorm (``"robustnorm"``): λ per ReLU from calibration data."""

    activation = nn.ReLU
    needs_calibration = True

    def __init__(self, name: str) -> None:
        if name not in ("maxnorm", "robustnorm"):
            raise ValueError(f"threshold balancing is maxnorm or robustnorm, got {name!r}")
        self.name = name

    def calibrate(
        self, gm: fx.GraphModule, calibration: Iterable | None, device: torch.device | str, max_batches: int | None
    ) -> dict[str, Any]:
        return activation_scales(gm, calibration, self.name, device, max_batches)

    def neuron_layer(self, gm: fx.GraphModule, node: fx.Node, statistics: dict[str, Any]) -> NeuronLayerSpec:
        scale = statistics[node.target]
        folded = fold_spike_weight(gm, node, scale)
        return NeuronLayerSpec(threshold=scale, spike_weight=1.0 if folded else scale)


def fold_spike_weight(gm: fx.GraphModule, neuron: fx.Node, weight: float) -> bool:
    """Move a spike weight λ into the weights of the conv/linear layers the spikes reach
    through pooling and reshapes only (Theorem 1's ``W_SNN = W_ANN·λ``), so that the simulator
    does not multiply every spike tensor by λ. Returns False, changing nothing, when any path
    meets something else (a residual addition, a BatchNorm, the output)."""
    modules = dict(gm.named_modules())
    consumers: list[nn.Module] = []
    frontier = list(neuron.users)
    while frontier:
        node = frontier.pop()
        if node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            consumers.append(modules[node.target])
        elif (node.op == "call_module" and isinstance(modules[node.target], _SCALE_COMMUTING)) or (
            node.op in ("call_function", "call_method")
            and getattr(node.target, "__name__", node.target) in ("flatten", "view", "reshape")
        ):
            frontier.extend(node.users)
        else:
            return False
    with torch.no_grad():
        for module in consumers:
            module.weight.mul_(weight)
    return bool(consumers)
