"""The Rate Norm Layers of a model, their p logits, and the layers that read their rates, as
training, evaluation and the DDP reductions walk them (always in module order, so every rank
lists them alike)."""

from __future__ import annotations

from torch import fx, nn

from .._fx import trace_graph
from ..nn import RateNorm


def rate_norms(model: nn.Module) -> list[RateNorm]:
    """Every Rate Norm Layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, RateNorm)]


def unique_raw_ps(model: nn.Module) -> list[nn.Parameter]:
    """Each Rate Norm logit once (layers sharing one p give one entry), in module order."""
    return list({id(m.raw_p): m.raw_p for m in rate_norms(model)}.values())


#: Modules and tensor functions through which rates pass unchanged in scale (pooling, reshapes).
_SCALE_KEEPING_MODULES = (
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
)
_SCALE_KEEPING_CALLS = {"flatten", "view", "reshape", "contiguous"}


def rate_readouts(model: nn.Module) -> list[nn.Module]:
    """The readout layers of a Rate Norm network: the conv/linear layers that read a Rate Norm
    Layer's rates and feed the model's output, both through pooling and reshapes only (the
    classifier of every network here).

    Rates lie in [0, 1] with means of a few hundredths, an order of magnitude below the ReLU
    activations the same layer reads in a ReLU network. A BatchNorm after a hidden layer cancels
    the scale of its input; nothing does for the readout, so under the same learning rate it
    learns far more slowly. Found on the model's ``torch.fx`` graph; [] for a model that does not
    trace.
    """

    try:
        _, graph = trace_graph(model)  # safe beside other threads' forwards (rnl_fast._fx)
    except Exception:  # an untraceable model trains without the readout scaling
        return []
    modules = dict(model.named_modules())

    def module_of(node: fx.Node) -> nn.Module | None:
        return modules.get(node.target) if node.op == "call_module" else None

    def keeps_scale(node: fx.Node) -> bool:
        return isinstance(module_of(node), _SCALE_KEEPING_MODULES) or (
            node.op in ("call_function", "call_method")
            and getattr(node.target, "__name__", node.target) in _SCALE_KEEPING_CALLS
        )

    def through_scale_keeping(start: fx.Node) -> list[fx.Node]:
        """The nodes ``start``'s value reaches through scale-keeping nodes (those excluded)."""
        reached, frontier, seen = [], list(start.users), set()
        while frontier:
            node = frontier.pop()
            if node in seen:
                continue
            seen.add(node)
            if keeps_scale(node):
                frontier.extend(node.users)
            else:
                reached.append(node)
        return reached

    found: dict[int, nn.Module] = {}
    for node in graph.nodes:
        if not isinstance(module_of(node), RateNorm):
            continue
        for reader in through_scale_keeping(node):
            layer = module_of(reader)
            if isinstance(layer, (nn.Conv2d, nn.Linear)) and any(
                after.op == "output" for after in through_scale_keeping(reader)
            ):
                found[id(layer)] = layer
    return list(found.values())
