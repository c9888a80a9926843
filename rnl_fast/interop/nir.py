"""NIR (Neuromorphic Intermediate Representation, ``nir`` 1.0.8) export and import of converted
networks: :func:`to_nir` and :func:`from_nir`.

A :class:`~rnl_fast.SpikingNetwork` maps onto NIR node by node (the names are the ``torch.fx``
node names of the converted network):

==============================  ===============================================================
ours                            NIR
==============================  ===============================================================
graph input ``[B, *shape]``     ``Input(shape)`` (the input current, the same at every step)
``nn.Conv2d``                   ``Conv2d`` (``bias`` zeros when the layer has none)
``nn.Linear``                   ``Affine`` (``Linear`` when it has no bias)
``nn.AvgPool2d``, 2×2 pools     ``AvgPool2d`` (``ceil_mode`` in metadata, see below)
``nn.AdaptiveAvgPool2d``        ``AvgPool2d`` with the kernel it amounts to for that input
``nn.Flatten(1, -1)``           ``Flatten(start_dim=0)`` (NIR shapes have no batch dim)
IF neurons (``SpikingNeurons``) ``IF`` [→ ``Scale`` (spike weight ≠ 1)] [→ ``AvgPool2d`` fused]
``a + b`` (residual)            ``Scale`` of ones with two incoming edges (NIR sums inputs)
graph output                    ``Output`` (the last layer's current at each step)
==============================  ===============================================================

The IF neurons. Ours integrate ``v ← v + I[t]``, fire when ``v ≥ θ`` and reset by subtraction
(``v ← v − θ``), starting at ``v_init·θ``. NIR 1.0.8's ``IF`` is ``dv/dt = r·I``, fires when
``v > v_threshold`` and resets *to* ``v_reset``: it has no reset by subtraction and no initial
membrane. The export writes ``r = 1/dt`` (one Euler step of ``dt`` then adds ``I[t]``),
``v_threshold = θ`` and ``v_reset = 0`` in float32, and keeps the rest in the node's metadata:
``rnl_fast.reset = "subtract"``, ``rnl_fast.threshold`` (θ exactly: a float64 scalar or the
float32 per-channel ``[C]``), ``rnl_fast.v_init`` (the fraction of θ the membrane starts at).
:func:`from_nir` reads those back, so ours → NIR → file → ours simulates exactly as before.
Other importers ignore the metadata and simulate what the plain fields say: **hard reset to 0**
(the charge above θ is lost at each spike, so rates come out lower), a membrane starting at 0
(QCFS and ``rnl_qcfs`` start at θ/2 by default) and, in NIR's own definition, firing on ``v > θ``
rather than ``v ≥ θ`` (SpikingJelly fires on ``≥``, as we do).

A spike weight other than 1 (carried on the spikes where conversion could not fold it into the
next weights, e.g. before a residual addition) is a ``Scale`` node after the ``IF``; the spike
weights of the paper's sequential networks (cnn7, vgg16, …) are all folded, so their graphs have
no ``Scale``. A pooling fused into a neuron layer is exported as the ``AvgPool2d`` after it (and
fused again by the importer). ``AvgPool2d`` has no ``ceil_mode`` in NIR: it is kept in metadata
for our importer, and the export refuses a ``ceil_mode`` pool on an odd plane (where it changes the
output). What the export cannot represent (an unfolded BatchNorm, any other module or function)
raises a one-line :class:`ValueError` naming the node.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

try:
    import nir
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("rnl_fast.to_nir / from_nir need the nir package: pip install 'rnl_fast[nir]'") from error

from ..simulation.network import AvgPool2x2, SpikingNetwork, SpikingNeurons

#: Metadata keys (the prefix keeps them apart from other tools' keys).
RESET = "rnl_fast.reset"
THRESHOLD = "rnl_fast.threshold"
V_INIT = "rnl_fast.v_init"
SPIKE_WEIGHT = "rnl_fast.spike_weight"
OP = "rnl_fast.op"
MODULE = "rnl_fast.module"
CEIL_MODE = "rnl_fast.ceil_mode"
HAS_BIAS = "rnl_fast.has_bias"
METHOD = "rnl_fast.method"
DT = "rnl_fast.dt"

_ADD_FUNCTIONS = (operator.add, torch.add)


# --------------------------------------------------------------------------------------- export


def to_nir(snn: SpikingNetwork, example_input: Tensor, dt: float = 1.0) -> nir.NIRGraph:
    """The converted network ``snn`` as a NIR graph (see the module docstring for the mapping).

    Args:
        snn: a :class:`~rnl_fast.SpikingNetwork` (what :func:`rnl_fast.convert` returns).
        example_input: a batch ``[B, *shape]`` of inputs, for the shapes NIR needs (``Input``,
            ``IF``, ``Conv2d.input_shape``, ``Flatten``); one image is enough.
        dt: the time step the ``IF`` nodes are written for: ``r = 1/dt``, so that one Euler step of
            ``dt`` adds the input current once, as one of our steps does. Importers that take a
            ``dt`` (SpikingJelly's ``import_from_nir(graph, dt=...)``) must be given the same.

    Returns:
        a ``nir.NIRGraph`` (type-checked by ``nir``); ``nir.write(path, graph)`` saves it.

    Raises:
        TypeError: ``snn`` is not a SpikingNetwork.
        ValueError: ``dt`` not positive, or a part with no NIR equivalent, named.
    """
    if not isinstance(snn, SpikingNetwork):
        raise TypeError(f"to_nir exports a converted SpikingNetwork (rnl_fast.convert), got {type(snn).__name__}")
    if not (isinstance(dt, (int, float)) and dt > 0 and np.isfinite(dt)):
        raise ValueError(f"dt must be a positive finite float, got {dt!r}")
    shapes = _shapes(snn, example_input)
    gm = snn.graph_module
    modules = dict(gm.named_modules())
    nodes: dict[str, nir.NIRNode] = {}
    edges: list[tuple[str, str]] = []
    produced: dict[str, str] = {}  # fx node name → the NIR node whose output is its value

    def chain(name: str, sources: list[fx.Node], *parts: tuple[str, nir.NIRNode]) -> None:
        """Add ``parts`` as a chain fed by ``sources``; the last is the value of fx node ``name``."""
        previous = [produced[s.name] for s in sources]
        for part_name, part in parts:
            nodes[part_name] = part
            edges.extend((p, part_name) for p in previous)
            previous = [part_name]
        produced[name] = previous[0]

    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            if node.name in produced:
                raise ValueError(f"to_nir: the network has more than one input (node '{node.name}')")
            chain(node.name, [], (node.name, nir.Input(input_type=np.array(shapes[node.name]))))
        elif node.op == "output":
            (result,) = node.args
            chain(node.name, [result], (node.name, nir.Output(output_type=np.array(shapes[result.name]))))
        elif node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.Identity):
                produced[node.name] = produced[inputs[0].name]
                continue
            parts = _export_module(node, module, shapes, dt)
            chain(node.name, inputs, *parts)
        elif node.op == "call_function" and node.target in _ADD_FUNCTIONS and _is_plain_add(node):
            ones = np.ones(shapes[node.name], dtype=np.float32)
            chain(node.name, inputs, (node.name, nir.Scale(scale=ones, metadata={OP: "add"})))
        else:
            what = getattr(node.target, "__name__", str(node.target))
            raise ValueError(f"to_nir: node '{node.name}' ({node.op} {what}) has no NIR equivalent")

    metadata = {METHOD: snn.method, DT: float(dt), V_INIT: float(snn.v_init)}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)


def _shapes(snn: SpikingNetwork, example_input: Tensor) -> dict[str, tuple[int, ...]]:
    """fx node name → shape of its value for one image (no batch dim), the neuron layers' values
    being their inputs' (a fused pool's output is the pool node's, added by the export)."""
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise ValueError("example_input must be a batch tensor [B, *shape]")
    return snn._shape_pass(example_input, what="example_input").shapes


def _is_plain_add(node: fx.Node) -> bool:
    """``a + b`` of two graph values, nothing else (no scalar, no ``alpha``)."""
    return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def _export_module(
    node: fx.Node, module: nn.Module, shapes: Mapping[str, tuple[int, ...]], dt: float
) -> list[tuple[str, nir.NIRNode]]:
    """The NIR node(s) for one ``call_module`` node, in data-flow order, as (name, node)."""
    name = node.name
    in_shape = shapes[node.all_input_nodes[0].name]
    if isinstance(module, SpikingNeurons):
        return _export_neurons(name, module, in_shape, shapes[name], dt)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(f"to_nir: conv '{name}' pads with {module.padding_mode!r}; NIR's Conv2d pads with zeros")
        bias = module.bias if module.bias is not None else torch.zeros(module.out_channels)
        conv = nir.Conv2d(
            input_shape=tuple(in_shape[1:]),
            weight=_array(module.weight),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
            bias=_array(bias),
            metadata={HAS_BIAS: module.bias is not None},
        )
        return [(name, conv)]
    if isinstance(module, nn.Linear):
        if len(in_shape) != 1:
            raise ValueError(f"to_nir: linear layer '{name}' sees {in_shape} features; NIR's Affine takes [F]")
        if module.bias is None:
            return [(name, nir.Linear(weight=_array(module.weight)))]
        return [(name, nir.Affine(weight=_array(module.weight), bias=_array(module.bias)))]
    if isinstance(module, (nn.AvgPool2d, AvgPool2x2)):
        return [(name, _export_pool(name, module, in_shape))]
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return [(name, _export_adaptive_pool(name, module, in_shape))]
    if isinstance(module, nn.Flatten):
        if module.start_dim < 1:
            raise ValueError(f"to_nir: flatten '{name}' flattens the batch dim (start_dim={module.start_dim})")
        end = module.end_dim - 1 if module.end_dim > 0 else module.end_dim
        return [
            (name, nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=module.start_dim - 1, end_dim=end))
        ]
    raise ValueError(f"to_nir: node '{name}' ({type(module).__name__}) has no NIR equivalent")


def _export_neurons(
    name: str, neurons: SpikingNeurons, shape: tuple[int, ...], out_shape: tuple[int, ...], dt: float
) -> list[tuple[str, nir.NIRNode]]:
    """``IF`` [→ ``Scale``] [→ ``AvgPool2d``] for one neuron layer of neurons ``shape``."""
    threshold = neurons.threshold
    exact_threshold = _array(threshold) if isinstance(threshold, Tensor) else np.float64(threshold)
    if_node = nir.IF(
        r=np.full(shape, 1.0 / dt, dtype=np.float32),
        v_threshold=_broadcast(threshold, shape),
        v_reset=np.zeros(shape, dtype=np.float32),
        metadata={RESET: "subtract", THRESHOLD: exact_threshold, V_INIT: float(neurons.v_init)},
    )
    parts: list[tuple[str, nir.NIRNode]] = [(name, if_node)]
    weight = neurons.spike_weight
    if isinstance(weight, Tensor) or weight != 1.0:
        exact_weight = _array(weight) if isinstance(weight, Tensor) else np.float64(weight)
        scale = nir.Scale(scale=_broadcast(weight, shape), metadata={SPIKE_WEIGHT: exact_weight})
        parts.append((f"{name}_spike_weight", scale))
    if neurons.fused_pool is not None:
        parts.append((f"{name}_pool", _export_pool(name, neurons.fused_pool, shape)))
    return parts


def _export_pool(name: str, pool: nn.Module, in_shape: tuple[int, ...]) -> nir.AvgPool2d:
    """An ``nn.AvgPool2d`` (or our 2×2 :class:`AvgPool2x2`) as NIR's ``AvgPool2d``."""
    if isinstance(pool, AvgPool2x2):
        kernel, stride, padding, ceil_mode = (2, 2), (2, 2), (0, 0), False
    else:
        kernel, stride, padding = (_pair(v) for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding))
        ceil_mode = bool(pool.ceil_mode)
        if pool.divisor_override is not None or (any(padding) and not pool.count_include_pad):
            raise ValueError(f"to_nir: pool '{name}' (divisor_override / count_include_pad) has no NIR equivalent")
        if ceil_mode and any((size + 2 * p - k) % s for size, p, k, s in zip(in_shape[-2:], padding, kernel, stride)):
            raise ValueError(
                f"to_nir: pool '{name}' uses ceil_mode on a {in_shape[-2]}x{in_shape[-1]} plane, where it "
                "changes the output; NIR's AvgPool2d has no ceil_mode"
            )
    return nir.AvgPool2d(
        kernel_size=np.array(kernel),
        stride=np.array(stride),
        padding=np.array(padding),
        metadata={CEIL_MODE: ceil_mode},
    )


def _export_adaptive_pool(name: str, pool: nn.AdaptiveAvgPool2d, in_shape: tuple[int, ...]) -> nir.AvgPool2d:
    """``AdaptiveAvgPool2d(out)`` on ``[C, H, W]`` as the ``AvgPool2d(H/out)`` it amounts to."""
    out = _pair(pool.output_size)
    size = in_shape[-2:]
    if any(o is None or s % o for s, o in zip(size, out)):
        raise ValueError(f"to_nir: adaptive pool '{name}' maps {size} to {out}, not a whole kernel; no NIR equivalent")
    kernel = tuple(s // o for s, o in zip(size, out))
    return nir.AvgPool2d(
        kernel_size=np.array(kernel),
        stride=np.array(kernel),
        padding=np.array((0, 0)),
        metadata={MODULE: "AdaptiveAvgPool2d", "rnl_fast.output_size": np.array(out)},
    )


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _array(t: Tensor) -> np.ndarray:
    """``t`` as a numpy array of its dtype; bf16 (which numpy lacks, a network after
    ``snn.to(torch.bfloat16)``) widened to float32, exactly."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


def _broadcast(value: float | Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """A float, or a per-channel ``[C]`` tensor (channel = dim 0 of ``shape``), as a float32 array
    of ``shape``."""
    if isinstance(value, Tensor):
        v = value.detach().cpu().float().numpy()
        return np.ascontiguousarray(np.broadcast_to(v.reshape(-1, *[1] * (len(shape) - 1)), shape))
    return np.full(shape, value, dtype=np.float32)


# --------------------------------------------------------------------------------------- import


def from_nir(
    graph_or_path: nir.NIRGraph | str | PathLike, dt: float | None = None, spike_dtype: torch.dtype | None = None
) -> SpikingNetwork:
    """A NIR graph (or a file ``nir.write`` made) as a :class:`~rnl_fast.SpikingNetwork` that runs
    on rnl_fast's kernels: ``snn(x: [B, *shape], T) → [T, B, K]`` as for a converted network.

    The graph may hold ``Input``, ``Output``, ``Conv2d``, ``Affine``, ``Linear``, ``AvgPool2d``,
    ``Flatten``, ``Scale`` and ``IF`` nodes; a node with several incoming edges gets their sum.
    ``IF`` nodes must reset by subtraction, as those :func:`to_nir` writes do (metadata
    ``rnl_fast.reset = "subtract"``); their ``r·dt`` must be 1 and their threshold the same for
    every neuron or for every neuron of a channel (dim 0 of the node's shape). A graph written by
    :func:`to_nir` comes back with the thresholds, spike weights, initial membrane and pools it
    had, and simulates to the same outputs bit for bit.

    Args:
        graph_or_path: a ``nir.NIRGraph``, or the path of a NIR HDF5 file.
        dt: the time step of the ``IF`` nodes' ``r = 1/dt``; None: the one :func:`to_nir` recorded
            in the graph's metadata, else 1.
        spike_dtype: dtype of the spikes between layers (as :func:`rnl_fast.convert` takes it).

    Raises:
        ValueError: a node rnl_fast cannot run (its name and type in the message), or a graph
            that is not one input → … → one output.
    """
    graph = graph_or_path if isinstance(graph_or_path, nir.NIRGraph) else nir.read(graph_or_path)
    if not isinstance(graph, nir.NIRGraph):
        raise ValueError(f"from_nir takes a nir.NIRGraph or a NIR file, got {type(graph_or_path).__name__}")
    metadata = graph.metadata or {}
    if dt is None:
        dt = float(metadata.get(DT, 1.0))
    builder = _Builder(graph, dt)
    gm, thresholds, spike_weights, v_init = builder.build()
    method = str(metadata.get(METHOD, "nir"))
    return SpikingNetwork(gm, thresholds, spike_weights, method=method, spike_dtype=spike_dtype, v_init=v_init)


class _Builder:
    """Builds the ``torch.fx`` graph of a NIR graph, one module per node, in topological order."""

    def __init__(self, graph: nir.NIRGraph, dt: float) -> None:
        self.graph = graph
        self.dt = dt
        self.root = nn.Module()
        self.fx_graph = fx.Graph()
        self.values: dict[str, fx.Node] = {}
        self.thresholds: dict[str, float | Tensor] = {}
        self.spike_weights: dict[str, float | Tensor] = {}
        self.v_inits: dict[str, float] = {}
        self.predecessors: dict[str, list[str]] = {name: [] for name in graph.nodes}
        for source, target in graph.edges:
            self.predecessors[target].append(source)

    def build(self) -> tuple[fx.GraphModule, dict, dict, float]:
        inputs = [n for n, node in self.graph.nodes.items() if isinstance(node, nir.Input)]
        outputs = [n for n, node in self.graph.nodes.items() if isinstance(node, nir.Output)]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"from_nir runs graphs of one Input and one Output, got {inputs} and {outputs}")
        for name in self._order():
            self._add(name, self.graph.nodes[name])
        if not self.thresholds:
            raise ValueError("from_nir: the graph has no IF node: nothing to simulate on spikes")
        v_inits = set(self.v_inits.values())
        if len(v_inits) > 1:
            raise ValueError(
                f"from_nir: the IF nodes start at different fractions of θ {sorted(v_inits)}; one is supported"
            )
        gm = fx.GraphModule(self.root, self.fx_graph, "NIRGraph")
        return gm, self.thresholds, self.spike_weights, v_inits.pop() if v_inits else 0.0

    def _order(self) -> list[str]:
        """The node names in topological order (ties in the graph's own order)."""
        remaining = {name: len(set(p)) for name, p in self.predecessors.items()}
        users: dict[str, set[str]] = {name: set() for name in self.graph.nodes}
        for source, target in self.graph.edges:
            users[source].add(target)
        order = []
        ready = [name for name in self.graph.nodes if remaining[name] == 0]
        while ready:
            name = ready.pop(0)
            order.append(name)
            for user in self.graph.nodes:
                if user in users[name]:
                    remaining[user] -= 1
                    if remaining[user] == 0:
                        ready.append(user)
        if len(order) != len(self.graph.nodes):
            raise ValueError("from_nir: the graph has a cycle (recurrent graphs are not supported)")
        return order

    def _input_value(self, name: str) -> fx.Node:
        """The value flowing into node ``name``: its one predecessor's, or their sum."""
        sources = self.predecessors[name]
        if not sources:
            raise ValueError(f"from_nir: node '{name}' has no incoming edge")
        value = self.values[sources[0]]
        for source in sources[1:]:
            value = self.fx_graph.call_function(operator.add, (value, self.values[source]))
        return value

    def _module(self, name: str, module: nn.Module) -> fx.Node:
        target = _module_name(name)
        self.root.add_module(target, module)
        return self.fx_graph.call_module(target, (self._input_value(name),))

    def _add(self, name: str, node: nir.NIRNode) -> None:
        meta = node.metadata or {}
        if isinstance(node, nir.Input):
            self.values[name] = self.fx_graph.placeholder("input")
        elif isinstance(node, nir.Output):
            self.fx_graph.output(self._input_value(name))
        elif isinstance(node, nir.Conv2d):
            self.values[name] = self._module(name, _conv(name, node, meta))
        elif isinstance(node, (nir.Affine, nir.Linear)):
            self.values[name] = self._module(name, _linear(node))
        elif isinstance(node, nir.AvgPool2d):
            self.values[name] = self._module(name, _pool(node, meta))
        elif isinstance(node, nir.Flatten):
            start, end = int(node.start_dim), int(node.end_dim)
            self.values[name] = self._module(name, nn.Flatten(start + 1, end + 1 if end >= 0 else end))
        elif isinstance(node, nir.IF):
            self._neurons(name, node, meta)
        elif isinstance(node, nir.Scale):
            self._scale(name, node, meta)
        else:
            raise ValueError(
                f"from_nir: cannot run node '{name}' of type {type(node).__name__} "
                "(rnl_fast runs Conv2d, Affine, Linear, AvgPool2d, Flatten, Scale and soft-reset IF nodes)"
            )

    def _neurons(self, name: str, node: nir.IF, meta: Mapping[str, Any]) -> None:
        if str(meta.get(RESET, "")) != "subtract":
            raise ValueError(
                f"from_nir: cannot run node '{name}' of type IF: it resets to v_reset (hard reset); rnl_fast's "
                "IF neurons reset by subtraction (metadata rnl_fast.reset='subtract', as to_nir writes)"
            )
        r_dt = np.asarray(node.r, dtype=np.float64) * self.dt
        if not np.allclose(r_dt, 1.0, rtol=1e-6, atol=0.0):
            raise ValueError(f"from_nir: IF node '{name}' has r·dt ≠ 1 (dt={self.dt}); rnl_fast adds I[t] per step")
        if THRESHOLD in meta:
            exact = np.asarray(meta[THRESHOLD])
            threshold = float(exact) if exact.ndim == 0 else torch.from_numpy(exact.astype(np.float32))
        else:
            threshold = _per_channel(name, "v_threshold", np.asarray(node.v_threshold))
        target = _module_name(name)
        self.thresholds[target] = threshold
        self.spike_weights[target] = 1.0
        self.v_inits[target] = float(meta.get(V_INIT, 0.0))
        self.values[name] = self._module(name, nn.Identity())  # SpikingNetwork puts the neurons here

    def _scale(self, name: str, node: nir.Scale, meta: Mapping[str, Any]) -> None:
        scale = np.asarray(node.scale)
        sources = self.predecessors[name]
        if str(meta.get(OP, "")) == "add" or (np.all(scale == 1.0) and len(sources) > 1):
            self.values[name] = self._input_value(name)  # the sum of the incoming edges, times 1
            return
        neuron = sources[0] if len(sources) == 1 else None
        target = _module_name(neuron) if neuron is not None else None
        carried = self.spike_weights.get(target)
        if isinstance(carried, float) and carried == 1.0 and len(self._users(neuron)) == 1:
            # A spike weight: carried by the neurons themselves, as conversion made it.
            if SPIKE_WEIGHT in meta:
                exact = np.asarray(meta[SPIKE_WEIGHT])
                weight = float(exact) if exact.ndim == 0 else torch.from_numpy(exact.astype(np.float32))
            else:
                weight = _per_channel(name, "scale", scale)
            self.spike_weights[target] = weight
            self.values[name] = self.values[neuron]
            return
        self.values[name] = self._module(name, _Scale(torch.from_numpy(scale.astype(np.float32))))

    def _users(self, name: str) -> set[str]:
        return {target for source, target in self.graph.edges if source == name}


class _Scale(nn.Module):
    """NIR's ``Scale``: ``x ⊙ scale``, ``scale`` of the per-image shape (broadcast over the batch)."""

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype)


def _module_name(name: str) -> str:
    """A NIR node name as a submodule name (no dots)."""
    return name.replace(".", "_")


def _per_channel(node: str, field: str, value: np.ndarray) -> float | Tensor:
    """A NIR parameter array as ours: one float when all equal, a float32 ``[C]`` when constant
    within each channel (dim 0), else a ValueError naming the node."""
    if value.size and np.all(value == value.flat[0]):
        return float(value.flat[0])
    if value.ndim >= 1:
        per_channel = value.reshape(value.shape[0], -1)
        if np.all(per_channel == per_channel[:, :1]):
            return torch.from_numpy(per_channel[:, 0].astype(np.float32))
    raise ValueError(
        f"from_nir: node '{node}' has a {field} that varies within a channel; rnl_fast takes one per channel"
    )


def _conv(name: str, node: nir.Conv2d, meta: Mapping[str, Any]) -> nn.Conv2d:
    weight = torch.from_numpy(np.asarray(node.weight, dtype=np.float32))
    padding = node.padding if isinstance(node.padding, str) else tuple(int(p) for p in np.atleast_1d(node.padding))
    has_bias = bool(meta.get(HAS_BIAS, True))
    conv = nn.Conv2d(
        weight.shape[1] * int(node.groups),
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=tuple(int(s) for s in np.atleast_1d(node.stride)),
        padding=padding,
        dilation=tuple(int(d) for d in np.atleast_1d(node.dilation)),
        groups=int(node.groups),
        bias=has_bias,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if has_bias:
            conv.bias.copy_(torch.from_numpy(np.asarray(node.bias, dtype=np.float32)))
    return conv.eval()


def _linear(node: nir.Affine | nir.Linear) -> nn.Linear:
    weight = torch.from_numpy(np.asarray(node.weight, dtype=np.float32))
    if weight.dim() != 2:
        raise ValueError(
            f"from_nir: an {type(node).__name__} weight of shape {tuple(weight.shape)}; rnl_fast takes [out, in]"
        )
    has_bias = isinstance(node, nir.Affine)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if has_bias:
            linear.bias.copy_(torch.from_numpy(np.asarray(node.bias, dtype=np.float32)))
    return linear.eval()


def _pool(node: nir.AvgPool2d, meta: Mapping[str, Any]) -> nn.Module:
    if str(meta.get(MODULE, "")) == "AdaptiveAvgPool2d":
        return nn.AdaptiveAvgPool2d(tuple(int(o) for o in np.atleast_1d(meta["rnl_fast.output_size"])))

    def pair(v: Any) -> tuple[int, int]:
        values = tuple(int(x) for x in np.atleast_1d(v))
        return values * 2 if len(values) == 1 else values

    return nn.AvgPool2d(
        pair(node.kernel_size), pair(node.stride), pair(node.padding), ceil_mode=bool(meta.get(CEIL_MODE, False))
    )
