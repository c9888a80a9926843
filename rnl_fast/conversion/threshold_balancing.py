"""Threshold balancing (Rueckauer et al. 2017), the baselines MaxNorm and RobustNorm, for the
same architecture with ReLU.

Layer l's threshold is λ_l, the maximum (MaxNorm) or the 99.9th percentile of the non-zero
activations (RobustNorm) of its ReLU over the calibration set; the spikes it emits carry the
weight λ_l into the next layer, which is Theorem 1's ``W_SNN = W_ANN·λ_{l−1}`` with
``v_th,l = λ_l``. Where only pooling and reshapes lie between a neuron layer and the next
conv/linear, λ is folded into that layer's weights so that the simulator does not multiply every
spike tensor by it.

Channel-wise (``channel_wise=True``, Kim et al. 2020): λ_c per output channel c (dim 1 of the
activation: ``[B, C, H, W]`` for a conv, the feature of ``[B, F]`` for a linear layer), the same
statistic over that channel's activations only. Channel c's neurons get the threshold λ_c and
their spikes the weight λ_c, folded into the next layer's weights per *input* channel
(``W[:, c] · λ_c``; through a flatten, each of the C·H·W features of channel c). A channel that is
never positive on the calibration data takes the layer's λ (its scale is unknown there, and the
layer's is the best guess of it); a layer never positive takes 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from .recipe import NeuronLayerSpec, Recipe

#: RobustNorm's percentile of the non-zero activations (Rueckauer et al. 2017).
ROBUST_PERCENTILE = 99.9
#: Activations sampled per layer for the percentile (torch.quantile's input limit is 2**24).
_PERCENTILE_SAMPLE = 4_000_000
#: Seed of the generator that draws that sample (the calibration is deterministic).
SAMPLE_SEED = 0
#: Modules through which a factor on the input comes out unchanged on the output (linear, no bias).
_SCALE_COMMUTING = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


@dataclass(frozen=True)
class LayerScale:
    """λ of one ReLU: a float, or a float32 ``[C]`` tensor per channel; and the number of dims of
    its activation (``[B, C, H, W]``: 4), which tells a per-channel fold where channels are."""

    scale: float | Tensor
    ndim: int


@torch.no_grad()
def activation_scales(
    model: nn.Module,
    loader: Iterable,
    method: str,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    channel_wise: bool = False,
) -> dict[str, float | Tensor]:
    """λ per ReLU (qualified name → value): max or 99.9th percentile of its non-zero outputs over
    the calibration batches (x, y); MaxNorm (``method="maxnorm"``) uses the max, RobustNorm
    (``"robustnorm"``) the percentile. With ``channel_wise`` each value is a float32 ``[C]``
    tensor, the statistic per channel (dim 1 of the activation)."""
    return {
        name: s.scale for name, s in calibrate_scales(model, loader, method, device, max_batches, channel_wise).items()
    }


@torch.no_grad()
def calibrate_scales(
    model: nn.Module,
    loader: Iterable,
    method: str,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    channel_wise: bool = False,
) -> dict[str, LayerScale]:
    """:func:`activation_scales` with each activation's number of dims (:class:`LayerScale`).

    RobustNorm keeps a bounded uniform sample of the positive activations of each layer (at most
    :data:`_PERCENTILE_SAMPLE`); channel-wise, each sampled value keeps its channel, so the
    per-channel percentiles come from the same sample. Below the bound every value is kept and
    the percentiles are exact. The sample is drawn from a generator of its own seeded with
    :data:`SAMPLE_SEED`, so one network and one calibration set always give the same λ whatever
    torch's global generator holds.
    """
    sampler = torch.Generator().manual_seed(SAMPLE_SEED)
    relus = {name: m for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
    collected: dict[str, list[Tensor]] = {name: [] for name in relus}
    channels_of: dict[str, list[Tensor]] = {name: [] for name in relus}
    maxima: dict[str, float] = dict.fromkeys(relus, 0.0)
    channel_maxima: dict[str, Tensor] = {}
    ndims: dict[str, int] = {}

    def hook(name: str):
        def record(_module, _inputs, output: Tensor) -> None:
            ndims[name] = output.dim()
            maxima[name] = max(maxima[name], float(output.max()))
            if channel_wise:
                if output.dim() < 2:
                    raise ValueError(
                        f"channel_wise=True needs a channel dimension (dim 1) at ReLU '{name}', whose activation "
                        f"has shape {tuple(output.shape)}"
                    )
                per_channel = output.detach().transpose(0, 1).reshape(output.shape[1], -1).amax(1).float().cpu()
                previous = channel_maxima.get(name)
                channel_maxima[name] = per_channel if previous is None else torch.maximum(previous, per_channel)
            if method == "robustnorm":
                mask = output > 0
                positive = output[mask].float().cpu()
                channels = _channel_index(output)[mask].cpu() if channel_wise else None
                # Keep a bounded uniform sample so memory stays flat on big calibration sets.
                if positive.numel() > _PERCENTILE_SAMPLE // 8:
                    keep = torch.randint(positive.numel(), (_PERCENTILE_SAMPLE // 8,), generator=sampler)
                    positive = positive[keep]
                    channels = channels[keep] if channels is not None else None
                collected[name].append(positive)
                if channels is not None:
                    channels_of[name].append(channels)

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
    scales: dict[str, LayerScale] = {}
    for name in relus:
        if method == "maxnorm":
            layer = maxima[name] if maxima[name] > 0 else 1.0
            per_channel = channel_maxima.get(name)
            if channel_wise and per_channel is not None:
                scales[name] = LayerScale(_or_layer(per_channel, per_channel > 0, layer), ndims[name])
            else:
                scales[name] = LayerScale(layer, ndims.get(name, 0))
            continue
        parts = collected[name]
        values = torch.cat(parts) if parts else torch.zeros(0)
        channels = torch.cat(channels_of[name]) if channels_of[name] else None
        if values.numel() > _PERCENTILE_SAMPLE:
            keep = torch.randperm(values.numel(), generator=sampler)[:_PERCENTILE_SAMPLE]
            values = values[keep]
            channels = channels[keep] if channels is not None else None
        layer = float(torch.quantile(values, ROBUST_PERCENTILE / 100)) if values.numel() else 1.0
        if channel_wise and name in channel_maxima:
            scales[name] = LayerScale(
                _channel_percentiles(values, channels, len(channel_maxima[name]), layer), ndims[name]
            )
        else:
            scales[name] = LayerScale(layer, ndims.get(name, 0))
    return scales


def _channel_index(output: Tensor) -> Tensor:
    """``[B, C, ...]`` int32: the channel (dim 1) of each element of ``output``."""
    C = output.shape[1]
    shape = (1, C) + (1,) * (output.dim() - 2)
    return torch.arange(C, dtype=torch.int32, device=output.device).view(shape).expand_as(output)


def _or_layer(per_channel: Tensor, known: Tensor, layer: float) -> Tensor:
    """``per_channel`` where ``known``, the layer's value elsewhere (float32 ``[C]``)."""
    return torch.where(known, per_channel, torch.full_like(per_channel, layer)).float()


def _channel_percentiles(values: Tensor, channels: Tensor | None, C: int, layer: float) -> Tensor:
    """RobustNorm's percentile of each channel's positive activations (float32 ``[C]``); the
    layer's value for a channel without any."""
    result = torch.full((C,), layer, dtype=torch.float32)
    if channels is None or values.numel() == 0:
        return result
    order = torch.argsort(channels, stable=True)
    counts = torch.bincount(channels.long(), minlength=C).tolist()
    for c, group in enumerate(values[order].split(counts)):
        if group.numel():
            result[c] = torch.quantile(group, ROBUST_PERCENTILE / 100)
    return result


class ThresholdBalancing(Recipe):
    """MaxNorm (``"maxnorm"``) or RobustNorm (``"robustnorm"``): λ per ReLU (or per channel of
    it) from calibration data."""

    activation = nn.ReLU
    needs_calibration = True

    def __init__(self, name: str) -> None:
        if name not in ("maxnorm", "robustnorm"):
            raise ValueError(f"threshold balancing is maxnorm or robustnorm, got {name!r}")
        self.name = name

    def calibrate(
        self,
        gm: fx.GraphModule,
        calibration: Iterable | None,
        device: torch.device | str,
        max_batches: int | None,
        channel_wise: bool = False,
    ) -> dict[str, Any]:
        return calibrate_scales(gm, calibration, self.name, device, max_batches, channel_wise)

    def neuron_layer(
        self, gm: fx.GraphModule, node: fx.Node, statistics: dict[str, Any], channel_wise: bool = False
    ) -> NeuronLayerSpec:
        layer: LayerScale = statistics[node.target]
        folded = fold_spike_weight(gm, node, layer.scale, layer.ndim)
        return NeuronLayerSpec(threshold=layer.scale, spike_weight=1.0 if folded else layer.scale)


def fold_spike_weight(gm: fx.GraphModule, neuron: fx.Node, weight: float | Tensor, ndim: int | None = None) -> bool:
    """Move a spike weight λ into the weights of the conv/linear layers the spikes reach
    through pooling and reshapes only (Theorem 1's ``W_SNN = W_ANN·λ``), so that the simulator
    does not multiply every spike tensor by λ. Returns False, changing nothing, when any path
    meets something else (a residual addition, a BatchNorm, the output) or a layer also called
    elsewhere in the graph (its weights serve other inputs too).

    A per-channel ``weight`` (float32 ``[C]``, channel = dim 1 of the ``ndim``-dim activation)
    multiplies each consumer's weights per *input* channel: ``W[:, c]·λ_c`` for a conv (groups 1)
    fed ``[B, C, H, W]`` or a linear layer fed ``[B, C]``; through one flatten of dims 1.. to
    ``[B, C·H·W]``, each of channel c's H·W features. Any other way to a consumer (a grouped conv,
    another reshape, a linear layer on a last dim that is not the channel) returns False: the
    simulator then multiplies the spikes by ``[C, 1, …]`` itself.
    """
    per_channel = isinstance(weight, Tensor)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    consumers: list[tuple[nn.Module, Tensor | float]] = []
    frontier: list[tuple[fx.Node, bool]] = [(user, False) for user in neuron.users]
    while frontier:
        node, flattened = frontier.pop()
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if calls[node.target] > 1:
                return False
            factor = _input_channel_factor(module, weight, ndim, flattened) if per_channel else weight
            if factor is None:
                return False
            consumers.append((module, factor))
        elif node.op == "call_method" and node.target == "size":
            continue  # reads the shape only (x.view(x.size(0), -1))
        elif isinstance(module, _SCALE_COMMUTING) and not isinstance(module, nn.Flatten):
            frontier.extend((user, flattened) for user in node.users)
        elif isinstance(module, nn.Flatten) or (
            node.op in ("call_function", "call_method")
            and getattr(node.target, "__name__", node.target) in ("flatten", "view", "reshape")
        ):
            if per_channel and (flattened or not _flattens_channels(node, module)):
                return False
            frontier.extend((user, True) for user in node.users)
        else:
            return False
    with torch.no_grad():
        for module, factor in consumers:
            module.weight.mul_(factor)
    return bool(consumers)


def _input_channel_factor(module: nn.Module, weight: Tensor, ndim: int | None, flattened: bool) -> Tensor | None:
    """What multiplies ``module.weight`` so that its input channel c is scaled by ``weight[c]``
    (broadcastable to the weight), or None when the layer does not see the channels as inputs."""
    C = weight.numel()
    if isinstance(module, nn.Conv2d):
        if flattened or ndim != 4 or module.groups != 1 or module.weight.shape[1] != C:
            return None
        return weight.to(module.weight).view(1, C, 1, 1)
    in_features = module.weight.shape[1]
    if flattened:
        if in_features % C:
            return None
        return weight.to(module.weight).repeat_interleave(in_features // C).view(1, in_features)
    if ndim != 2 or in_features != C:
        return None
    return weight.to(module.weight).view(1, C)


def _flattens_channels(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether ``node`` flattens dims 1.. of its input into one (``[B, C, …] → [B, C·…]``, channel
    major): ``nn.Flatten()``, ``flatten(x, 1)``, ``x.flatten(1)``, ``x.view(B, -1)``, ``x.reshape(B, -1)``."""
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    name = getattr(node.target, "__name__", node.target)
    args = list(node.args[1:])
    if name == "flatten":
        start = node.kwargs.get("start_dim", args[0] if args else 0)
        end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return start == 1 and end == -1
    sizes = node.kwargs.get("shape", args[0] if len(args) == 1 else args)
    if isinstance(sizes, (tuple, list)) and len(sizes) == 2 and sizes[1] == -1:
        return True
    return False
