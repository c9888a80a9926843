"""SpikingJelly models in: :func:`from_spikingjelly` swaps every SpikingJelly 2.0 IF neuron of a
model for an :class:`~rnl_fast.IFSequence` that behaves the same, forward and backward.

What is swapped, and for what:

==========================================  ==================================================
SpikingJelly 2.0                            rnl_fast
==========================================  ==================================================
``neuron.IFNode(v_reset=None)``             ``IFSequence(v_reset=None)`` (soft reset, from 0)
``neuron.IFNode(v_reset=r)``                ``IFSequence(v_reset=r, v_init=r)`` (hard reset;
                                            SpikingJelly's membrane starts at v_reset)
``neuron.HalfThresholdIFNode``              ``IFSequence(v_init=θ/2)`` (soft reset, from θ/2)
``surrogate.Sigmoid(alpha)``                ``surrogate="sigmoid", width=1/alpha``
``surrogate.ATan(alpha)``                   ``surrogate="atan", width=2/alpha``
``surrogate.Rect(alpha)``                   ``surrogate="rectangle", width=1/alpha``
``v_threshold``, ``detach_reset``,          the same values
``step_mode``
==========================================  ==================================================

Everything else in the model (SpikingJelly's ``layer.*`` containers, ``ann2snn``'s voltage
scalers, plain torch modules) is kept as it is and keeps running in PyTorch, so a model produced
by SpikingJelly's ``ann2snn.FXConverter`` runs the same way after the swap: stepped one step per
call as its users step it (``functional.reset_net(snn)``, then ``out += snn(x)`` per step), or in
multi-step mode after ``functional.set_step_mode(snn, "m")``.

Refused, with a one-line error naming the module: anything that is not an ``nn.Module``, a model
without any SpikingJelly neuron, any other SpikingJelly neuron (LIF, PLIF, subclasses of
``IFNode`` that may change its dynamics, ...), a surrogate without an exact counterpart here,
``store_v_seq=True`` (an IFSequence keeps only the final membrane) and SpikingJelly's reduced
neuron precisions.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

from ..nn import IFSequence

#: SpikingJelly surrogate class name → (our surrogate, width as a function of its alpha).
_SURROGATES = {
    "Sigmoid": ("sigmoid", lambda alpha: 1.0 / alpha),
    "ATan": ("atan", lambda alpha: 2.0 / alpha),
    "Rect": ("rectangle", lambda alpha: 1.0 / alpha),
}

#: The module path prefix of SpikingJelly's spiking neurons.
_NEURON_MODULES = "spikingjelly.activation_based.neuron"


def from_spikingjelly(model: nn.Module) -> nn.Module:
    """A copy of a SpikingJelly model with every IF neuron replaced by an :class:`IFSequence`.

    Args:
        model: an ``nn.Module`` holding SpikingJelly 2.0 ``IFNode`` / ``HalfThresholdIFNode``
            neurons (a hand-built net in either step mode, or the output of
            ``spikingjelly.activation_based.ann2snn.FXConverter(...).convert(ann)``); the model
            itself may be one such neuron.

    Returns:
        A deep copy of ``model`` (the original is not touched) whose neurons are IFSequence
        layers with the same threshold, reset, initial membrane, surrogate gradient, detach_reset
        and step mode, starting reset. It takes the inputs the original takes (``[B, ...]`` per
        step in ``"s"`` mode, ``[T, B, ...]`` in ``"m"``) and gives the same spikes and outputs;
        the gradients agree to rounding. ``functional.reset_net``, ``set_step_mode`` and
        ``detach_net`` keep working on it.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ImportError: SpikingJelly is not installed.
        ValueError: no SpikingJelly neuron in ``model``, or one that cannot be swapped exactly
            (the message names the module and says why).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_spikingjelly: model must be an nn.Module, got {type(model).__name__}")
    try:
        from spikingjelly.activation_based import neuron
    except ImportError as error:
        raise ImportError("from_spikingjelly needs SpikingJelly 2.0: pip install spikingjelly") from error
    swappable = (neuron.IFNode, neuron.HalfThresholdIFNode)

    # Check every neuron before copying anything: one error names the first that cannot be swapped.
    # A neuron reachable under several names stays one (shared) layer.
    replacements: dict[str, IFSequence] = {}
    by_id: dict[int, IFSequence] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in by_id:
            replacements[name] = by_id[id(module)]
        elif _is_spikingjelly_neuron(module, neuron):
            where = f"module {name!r}" if name else "the model"
            if type(module) not in swappable:
                raise ValueError(
                    f"from_spikingjelly: {where} is a SpikingJelly {type(module).__name__}; only IFNode and "
                    "HalfThresholdIFNode (integrate-and-fire) can be replaced by rnl_fast.IFSequence"
                )
            replacements[name] = _if_sequence_like(module, where, half_threshold=type(module) is swappable[1])
            by_id[id(module)] = replacements[name]
    if not replacements:
        raise ValueError(
            f"from_spikingjelly: {type(model).__name__} holds no SpikingJelly neuron (IFNode): nothing to replace"
        )
    if "" in replacements:
        return replacements[""]
    swapped = copy.deepcopy(model)
    for name, layer in replacements.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(swapped.get_submodule(parent_name), leaf, layer)
    return swapped


def _is_spikingjelly_neuron(module: nn.Module, neuron: Any) -> bool:
    """SpikingJelly's neurons: its BaseNode family, and whatever else its neuron package defines."""
    return isinstance(module, neuron.BaseNode) or type(module).__module__.startswith(_NEURON_MODULES)


def _if_sequence_like(node: nn.Module, where: str, half_threshold: bool) -> IFSequence:
    """The IFSequence that behaves as the SpikingJelly IF neuron ``node`` (see the module docs)."""
    if getattr(node, "store_v_seq", False):
        raise ValueError(
            f"from_spikingjelly: {where} has store_v_seq=True; IFSequence keeps only the final membrane "
            "(set store_v_seq=False first)"
        )
    if getattr(node, "_neuron_precision", None) is not None:
        raise ValueError(
            f"from_spikingjelly: {where} uses SpikingJelly's reduced neuron precision "
            f"{node._neuron_precision}; IFSequence integrates in float32 (or float64): clear it first"
        )
    threshold = float(node.v_threshold)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"from_spikingjelly: {where} has v_threshold={threshold!r}; it must be positive and finite")
    surrogate, width = _surrogate_like(node.surrogate_function, where)
    v_reset = None if node.v_reset is None else float(node.v_reset)
    if half_threshold:
        v_init = threshold / 2.0
    else:
        v_init = 0.0 if v_reset is None else v_reset
    return IFSequence(
        v_threshold=threshold,
        v_reset=v_reset,
        v_init=v_init,
        surrogate=surrogate,
        width=width,
        detach_reset=bool(node.detach_reset),
        step_mode=node.step_mode,
    )


def _surrogate_like(function: nn.Module, where: str) -> tuple[str, float]:
    """(surrogate, width) of ours equal to SpikingJelly's surrogate ``function``."""
    kind = type(function).__name__
    from_module = type(function).__module__ == "spikingjelly.activation_based.surrogate"
    if not from_module or kind not in _SURROGATES:
        raise ValueError(
            f"from_spikingjelly: {where} uses surrogate {kind}; rnl_fast has exact counterparts of "
            f"SpikingJelly's {', '.join(_SURROGATES)} only"
        )
    if not getattr(function, "spiking", True):
        raise ValueError(f"from_spikingjelly: {where} has a {kind} surrogate with spiking=False (no spikes)")
    alpha = float(function.alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"from_spikingjelly: {where} has a {kind} surrogate with alpha={alpha!r}; it must be > 0")
    name, width_of = _SURROGATES[kind]
    return name, width_of(alpha)
