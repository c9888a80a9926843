"""ANN → SNN conversion (paper §2.1–2.2, Theorem 1) and the classic baselines.

:func:`convert` traces the trained ANN with ``torch.fx``, checks that every part can run on
spikes, folds each BatchNorm into the conv/linear before it, drops dropout, and replaces each
activation by integrate-and-fire neurons (:class:`rnl_fast.IFSequence`, soft reset):

- ``"rnl"`` / ``"rnl_ril"``: a Rate Norm Layer becomes IF neurons with threshold θ = p·running_max;
  the weights stay as they are (Theorem 1: the next layer already sees rates in [0, 1]).
  (The two names differ only in the network they are given: before or after stage 2.)
- ``"maxnorm"`` / ``"robustnorm"`` (Rueckauer et al. 2017), for the same architecture with ReLU:
  threshold balancing from calibration data. Layer l's threshold is λ_l, the maximum (MaxNorm)
  or the 99.9th percentile of the non-zero activations (RobustNorm) of its ReLU over the
  calibration set; the spikes it emits carry the weight λ_l into the next layer, which is
  Theorem 1's ``W_SNN = W_ANN·λ_{l−1}`` with ``v_th,l = λ_l``.

The result is a :class:`rnl_fast.simulation.SpikingNetwork`.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable

import torch
from torch import Tensor, fx, nn

from .nn import RateNorm

METHODS = ("maxnorm", "robustnorm", "rnl", "rnl_ril")
#: RobustNorm's percentile of the non-zero activations (Rueckauer et al. 2017).
ROBUST_PERCENTILE = 99.9
#: Activations sampled per layer for the percentile (torch.quantile's input limit is 2**24).
_PERCENTILE_SAMPLE = 4_000_000

_LINEAR_MODULES = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_DROPPED_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_ACTIVATIONS = (RateNorm, nn.ReLU)
_LINEAR_FUNCTIONS = {operator.add, torch.add, torch.flatten, torch.reshape, operator.getitem}
_LINEAR_METHODS = {"view", "reshape", "flatten", "size", "add", "contiguous"}


class ConversionError(ValueError):
    """A part of the network cannot run on spikes; the message names it."""


def _trace(model: nn.Module) -> fx.GraphModule:
    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, RateNorm) or super().is_leaf_module(m, qualname)

    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many types; the message is what matters
        raise ConversionError(f"cannot trace {type(model).__name__} with torch.fx: {error}") from error
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def check_convertible(gm: fx.GraphModule, activation: type[nn.Module]) -> None:
    """Raise :class:`ConversionError` naming the first part that cannot run on spikes."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)):
                raise ConversionError(
                    f"max pooling at '{node.target}' cannot be converted: an SNN cannot max-pool "
                    "rates; build the model with average pooling"
                )
            if isinstance(m, _ACTIVATIONS) and not isinstance(m, activation):
                raise ConversionError(
                    f"'{node.target}' is {type(m).__name__} but this method converts "
                    f"{activation.__name__} activations ({'rnl, rnl_ril' if activation is nn.ReLU else 'maxnorm, robustnorm'} fit it)"
                )
            if not isinstance(m, _LINEAR_MODULES + _NORM_MODULES + _DROPPED_MODULES + _ACTIVATIONS):
                raise ConversionError(f"'{node.target}' ({type(m).__name__}) has no spiking equivalent")
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if node.target not in _LINEAR_FUNCTIONS:
                kind = "a functional ReLU" if "relu" in name else f"the function {name}"
                raise ConversionError(
                    f"{kind} at node '{node.name}' cannot be converted: use module activations "
                    "(nn.ReLU / RateNorm) and linear operations only"
                )
        elif node.op == "call_method" and node.target not in _LINEAR_METHODS:
            raise ConversionError(f"the tensor method .{node.target}() at node '{node.name}' cannot be converted")
    uses = [node.target for node in gm.graph.nodes if node.op == "call_module" and isinstance(modules[node.target], activation)]
    if not uses:
        raise ConversionError(f"the model has no {activation.__name__} activations to convert")
    reused = sorted({name for name in uses if uses.count(name) > 1})
    if reused:
        raise ConversionError(
            f"activation module(s) {reused} are called more than once: each place needs its own "
            "neurons (its own membrane), so give each call its own module"
        )


def fold_batchnorm(weight_module: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Module:
    """A copy of ``weight_module`` that computes ``bn(weight_module(x))`` (BN in eval mode)."""
    folded = copy.deepcopy(weight_module)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
    with torch.no_grad():
        folded.weight.mul_(scale.reshape(-1, *([1] * (folded.weight.dim() - 1))))
        bias = folded.bias.detach() if folded.bias is not None else torch.zeros_like(shift)
        folded.bias = nn.Parameter(bias * scale + shift)
    return folded


def _fold_all_batchnorms(gm: fx.GraphModule) -> int:
    """Fold each BN whose input is a conv/linear used by nothing else; the rest stay as per-step
    affine maps (e.g. the BN after a residual addition). Returns how many were folded."""
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _NORM_MODULES):
            continue
        (source,) = node.args
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        producer = modules[source.target]
        if not isinstance(producer, (nn.Conv2d, nn.Linear)):
            continue
        _set_submodule(gm, source.target, fold_batchnorm(producer, modules[node.target]))
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return folded


def _set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@torch.no_grad()
def activation_scales(
    model: nn.Module, loader: Iterable, method: str, device: torch.device | str = "cpu", max_batches: int | None = None
) -> dict[str, float]:
    """λ per ReLU (qualified name → value): max or 99.9th percentile of its non-zero outputs over
    the calibration batches (x, y); MaxNorm uses the max, RobustNorm the percentile."""
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


def convert(
    model: nn.Module,
    method: str = "rnl",
    calibration: Iterable | None = None,
    device: torch.device | str = "cpu",
    calibration_batches: int | None = None,
    spike_dtype: torch.dtype | None = None,
):
    """Convert a trained ANN to a :class:`~rnl_fast.simulation.SpikingNetwork`.

    Args:
        model: the ANN (RateNorm activations for "rnl"/"rnl_ril", nn.ReLU for the baselines);
            it is not modified.
        method: one of :data:`METHODS`.
        calibration: batches ``(x, y)`` for the baselines' λ (ignored by the RNL methods).
        calibration_batches: use at most this many calibration batches.
        spike_dtype: dtype of the spikes between layers inside the simulator (None: float32).

    Raises:
        ConversionError: a part of the model that cannot run on spikes, named.
    """
    from .simulation import SpikingNetwork  # the floor above: imported late to keep the layering

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    activation = RateNorm if method.startswith("rnl") else nn.ReLU
    ann = copy.deepcopy(model).eval()
    gm = _trace(ann)
    check_convertible(gm, activation)
    if activation is nn.ReLU:
        if calibration is None:
            raise ValueError(f"method {method!r} needs calibration data: pass calibration=<loader of (x, y)>")
        scales = activation_scales(gm, calibration, method, device, calibration_batches)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _DROPPED_MODULES):
            _set_submodule(gm, node.target, nn.Identity())
    _fold_all_batchnorms(gm)
    thresholds: dict[str, float] = {}
    spike_weights: dict[str, float] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], activation):
            if activation is RateNorm:
                thresholds[node.target] = float(modules[node.target].threshold)
                spike_weights[node.target] = 1.0
            else:
                thresholds[node.target] = spike_weights[node.target] = scales[node.target]
                if _fold_spike_weight(gm, node, scales[node.target]):
                    spike_weights[node.target] = 1.0
    return SpikingNetwork(gm, thresholds, spike_weights, method=method, spike_dtype=spike_dtype)


#: Modules through which a factor on the input comes out unchanged on the output (linear, no bias).
_SCALE_COMMUTING = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def _fold_spike_weight(gm: fx.GraphModule, neuron: fx.Node, weight: float) -> bool:
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
