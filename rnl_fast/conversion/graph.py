"""The graph side of conversion: trace the ANN with ``torch.fx``, check that every part can run
on spikes, fold BatchNorm into the conv/linear before it, and drop dropout.

Every conversion method goes through these steps; what differs between methods (the threshold
and spike weight of each neuron layer) is in the recipes (:mod:`.recipe`).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn

from .._fx import trace_graph
from .recipe import ConversionError

#: Modules that are linear in their input (or reshape it): they run on spike tensors as they are.
LINEAR_MODULES = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
DROPPED_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)
#: Functions and tensor methods that a converted graph may call (linear or shape-only).
LINEAR_FUNCTIONS = {operator.add, torch.add, torch.flatten, torch.reshape, operator.getitem}
LINEAR_METHODS = {"view", "reshape", "flatten", "size", "add", "contiguous"}


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a ``torch.fx`` graph whose Rate Norm and QCFS layers stay single (leaf) nodes.

    Safe beside inference in other threads (module calls there are not traced) and beside other
    conversions (they trace one at a time): :func:`rnl_fast._fx.trace_graph`."""
    try:
        root, graph = trace_graph(model)
    except Exception as error:  # fx raises many types; the message is what matters
        raise ConversionError(f"cannot trace {type(model).__name__} with torch.fx: {error}") from error
    return fx.GraphModule(root, graph, type(model).__name__)


def check_convertible(
    gm: fx.GraphModule, activation: type[nn.Module], known_activations: Mapping[type[nn.Module], Sequence[str]]
) -> None:
    """Raise :class:`ConversionError` naming the first part that cannot run on spikes when the
    activation modules of type ``activation`` become neurons.

    ``known_activations``: every activation type some method converts → the names of those
    methods (for the message when the model has the other kind).
    """
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)):
                raise ConversionError(
                    f"max pooling at '{node.target}' cannot be converted: an SNN cannot max-pool "
                    "rates; build the model with average pooling"
                )
            kind = next((a for a in known_activations if isinstance(m, a)), None)
            if kind is not None and not isinstance(m, activation):
                raise ConversionError(
                    f"'{node.target}' is {type(m).__name__} but this method converts "
                    f"{activation.__name__} activations ({', '.join(known_activations[kind])} fit it)"
                )
            if kind is None and not isinstance(m, LINEAR_MODULES + NORM_MODULES + DROPPED_MODULES):
                raise ConversionError(f"'{node.target}' ({type(m).__name__}) has no spiking equivalent")
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if node.target not in LINEAR_FUNCTIONS:
                kind = "a functional ReLU" if "relu" in name else f"the function {name}"
                raise ConversionError(
                    f"{kind} at node '{node.name}' cannot be converted: use module activations "
                    "(nn.ReLU / RateNorm / QCFS) and linear operations only"
                )
        elif node.op == "call_method" and node.target not in LINEAR_METHODS:
            raise ConversionError(f"the tensor method .{node.target}() at node '{node.name}' cannot be converted")
    uses = [node.target for node in activation_nodes(gm, activation)]
    if not uses:
        raise ConversionError(f"the model has no {activation.__name__} activations to convert")
    reused = sorted({name for name in uses if uses.count(name) > 1})
    if reused:
        raise ConversionError(
            f"activation module(s) {reused} are called more than once: each place needs its own "
            "neurons (its own membrane), so give each call its own module"
        )


def activation_nodes(gm: fx.GraphModule, activation: type[nn.Module]) -> list[fx.Node]:
    """The nodes that call a module of type ``activation``, in graph order."""
    return [
        node
        for node in gm.graph.nodes
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), activation)
    ]


def drop_dropout(gm: fx.GraphModule) -> None:
    """Replace every dropout module by the identity (inference: dropout does nothing)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), DROPPED_MODULES):
            gm.set_submodule(node.target, nn.Identity())


def fold_batchnorm(weight_module: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Module:
    """A copy of ``weight_module`` that computes ``bn(weight_module(x))`` (BN in eval mode)."""
    folded = copy.deepcopy(weight_module)
    if bn.affine:
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    else:
        scale = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
    with torch.no_grad():
        folded.weight.mul_(scale.reshape(-1, *([1] * (folded.weight.dim() - 1))))
        bias = folded.bias.detach() if folded.bias is not None else torch.zeros_like(shift)
        folded.bias = nn.Parameter(bias * scale + shift)
    return folded


def fold_all_batchnorms(gm: fx.GraphModule) -> int:
    """Fold each BN whose input is a conv/linear used by nothing else; the rest stay as per-step
    affine maps (e.g. the BN after a residual addition). Returns how many were folded."""
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], NORM_MODULES):
            continue
        (source,) = node.args
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        producer = modules[source.target]
        if not isinstance(producer, (nn.Conv2d, nn.Linear)):
            continue
        gm.set_submodule(source.target, fold_batchnorm(producer, modules[node.target]))
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return folded
