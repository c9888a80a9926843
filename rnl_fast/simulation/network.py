"""The converted SNN: the traced ANN graph run on IF neurons over all T steps at once.

:class:`SpikingNetwork` runs the graph layer by layer: every conv/linear sees a ``[T·B, ...]``
batch, every neuron layer one fused :class:`rnl_fast.IFSequence` call over ``[T, B, ...]``. Under
constant coding the image is the input current at every step, so whatever comes before the first
neuron (the first conv + BN) is computed once per image, not T times, and reaches the first
neurons as a stride-0 view. Long simulations run in chunks of steps with every membrane carried
over, so memory stays bounded for T in the thousands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, fx, nn

from ..nn import IFSequence, NeuronParameters
from .memory import chunk_budget


class SpikingNeurons(NeuronParameters):
    """IF neurons standing where an ANN activation stood.

    ``forward(x)`` takes the input current either as ``[T, B, ...]`` (any strides, a stride-0
    constant input included) and returns the spikes as ``[T·B, ...]`` in the dtype the next
    layer computes in, each spike carrying ``spike_weight`` (1 for RNL; λ for threshold
    balancing, which is Theorem 1's weight scaling moved onto the spike).

    ``threshold`` and ``spike_weight`` are floats, or float32 ``[C]`` tensors with one value per
    channel: dim 1 of the neurons ``[B, C, ...]``; they are broadcast as ``[C, 1, 1]`` for
    ``[B, C, H, W]`` and ``[F]`` for ``[B, F]`` (:meth:`per_channel`). After each reset the
    membrane starts at ``v_init · threshold`` (per channel when the threshold is).

    With ``fused_pool`` (the ``nn.AvgPool2d(2)`` that followed the activation, set by
    :class:`SpikingNetwork`) it returns the pooled rates ``[T·B, C, H', W']`` instead, from one
    kernel that never stores the spikes (:meth:`rnl_fast.IFSequence.forward_pool2x2`); while an
    observer watches, the spikes are made, shown to it and pooled by that ``nn.AvgPool2d`` itself,
    with the same result to the bit.
    """

    def __init__(
        self,
        threshold: float | Tensor,
        spike_weight: float | Tensor = 1.0,
        spike_dtype: torch.dtype | None = None,
        v_init: float = 0.0,
    ) -> None:
        super().__init__()
        if not (isinstance(v_init, (int, float)) and not isinstance(v_init, bool) and 0.0 <= v_init < 1.0):
            raise ValueError(f"v_init must be a fraction of the threshold in [0, 1), got {v_init!r}")
        self.threshold = _channel_vector("threshold", threshold)
        self.spike_weight = _channel_vector("spike_weight", spike_weight)
        for name in ("threshold", "spike_weight"):
            value = getattr(self, name)
            if isinstance(value, Tensor):
                delattr(self, name)
                self.register_buffer(name, value)
        #: Fraction of the threshold the membrane starts at after each reset.
        self.v_init = float(v_init)
        # Spikes per neuron are not kept: simulate() needs the totals per step only, and the
        # per-neuron counts cost a write and an accumulation of the largest layer every chunk.
        # A per-channel threshold is given its broadcast shape at the first forward, which shows
        # the neurons' rank (_shape_parameters); until then the IF module holds it as [C].
        self.neurons = IFSequence(
            v_threshold=self.threshold,
            v_init=0.0 if self.channel_wise else self.v_init * self.threshold,
            spike_dtype=spike_dtype,
            count_neurons=False,
        )
        # The neuron dims and device the per-channel IF parameters were last shaped for.
        self._shaped_for: tuple[int, torch.device] | None = None
        #: The 2×2 average pooling fused into this layer, or None.
        self.fused_pool: nn.AvgPool2d | None = None
        #: Called with each chunk's spikes ``[T, B, ...]`` (for K curves); None when unused.
        self.observer: Callable[[Tensor], None] | None = None

    @property
    def channel_wise(self) -> bool:
        """Whether the threshold is per channel."""
        return isinstance(self.threshold, Tensor)

    def per_channel(self, value: float | Tensor, ndim: int) -> float | Tensor:
        """``value`` broadcastable to neurons ``[B, C, ...]`` of ``ndim`` dims: a float as it is,
        a ``[C]`` tensor as ``[C, 1, …]`` (``ndim − 2`` ones)."""
        if not isinstance(value, Tensor):
            return value
        if ndim < 2:
            raise ValueError(f"per-channel neurons need a channel dimension (dim 1); got neurons of {ndim} dims")
        return value.view(-1, *[1] * (ndim - 2))

    def threshold_for(self, activation: Tensor) -> float | Tensor:
        """The threshold broadcastable to ``activation: [B, C, ...]`` (the ANN's activation)."""
        return self.per_channel(self.threshold, activation.dim())

    def _shape_parameters(self, current: Tensor) -> None:
        """Give the IF neurons the per-channel threshold and initial membrane in the broadcast shape
        of ``current: [T, B, C, ...]`` (once per neuron rank and device)."""
        if not self.channel_wise:
            return
        key = (current.dim() - 1, current.device)
        if key == self._shaped_for:
            return
        ndim = current.dim() - 1
        if ndim < 2 or current.shape[2] != self.threshold.numel():
            raise ValueError(
                f"{self.threshold.numel()} per-channel thresholds but the neurons have shape "
                f"{tuple(current.shape[1:])} (channels are dim 1)"
            )
        threshold = self.per_channel(self.threshold, ndim).to(current.device)
        self.neurons.v_threshold = threshold
        self.neurons.v_init = threshold * self.v_init if self.v_init else 0.0
        self._shaped_for = key

    def forward(self, current: Tensor) -> Tensor:
        self._shape_parameters(current)
        pool = self.fused_pool
        weight = self.spike_weight
        if pool is not None and self.observer is None:
            if isinstance(weight, Tensor):  # λ_c commutes with the pooling inside channel c
                pooled = self.neurons.forward_pool2x2(current, 1.0, pool.ceil_mode).flatten(0, 1)
                return pooled * self.per_channel(weight, pooled.dim()).to(pooled.dtype)
            return self.neurons.forward_pool2x2(current, weight, pool.ceil_mode).flatten(0, 1)
        # Multi-step whatever neurons.step_mode says: this layer steps time itself ([T·B, ...] in,
        # T from the network's call), so SpikingJelly's set_step_mode on a SpikingNetwork is inert.
        spikes = self.neurons.forward_steps(current)
        if self.observer is not None:
            self.observer(spikes)
        out = spikes.flatten(0, 1)
        if out.dtype != current.dtype:
            out = out.to(current.dtype)
        if pool is not None:
            out = pool(out)
        if isinstance(weight, Tensor):
            return out * self.per_channel(weight, out.dim()).to(out.dtype)
        return out * weight if weight != 1.0 else out

    def extra_repr(self) -> str:
        def text(value: float | Tensor) -> str:
            return f"[{value.numel()} channels]" if isinstance(value, Tensor) else f"{value:.4g}"

        pool = ", fused 2x2 average pooling" if self.fused_pool is not None else ""
        start = f", v_init={self.v_init:g}·threshold" if self.v_init else ""
        return f"threshold={text(self.threshold)}, spike_weight={text(self.spike_weight)}{start}{pool}"


def _channel_vector(name: str, value: float | Tensor) -> float | Tensor:
    """A float as it is; a tensor as a float32 ``[C]`` copy (a one-element tensor as a float)."""
    if not isinstance(value, Tensor):
        return float(value)
    if value.numel() == 1:
        return float(value)
    if value.dim() != 1:
        raise ValueError(f"a per-channel {name} must be a 1-D tensor [C], got shape {tuple(value.shape)}")
    return value.detach().float().clone()


class AvgPool2x2(nn.Module):
    """``nn.AvgPool2d(2)`` as four strided adds: on CPU NCHW tensors ~1.5× faster than
    ``avg_pool2d`` (measured on [8192, 32, 28, 28] spikes: 88 ms against 132 ms). Exact on
    spikes (sums of at most four 0/1 values); on other values it may differ in the last bit.
    Used where no neuron layer comes right before the pooling (those pools are fused)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return nn.functional.avg_pool2d(x, 2)
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        return (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]).mul_(0.25)


def _is_2x2_pool(m: nn.Module, ceil_mode_ok: bool) -> bool:
    """Whether ``m`` is ``nn.AvgPool2d(2)`` (kernel 2, stride 2, no padding; ceil_mode if allowed)."""
    return (
        isinstance(m, nn.AvgPool2d)
        and m.kernel_size in (2, (2, 2))
        and m.stride in (2, (2, 2))
        and m.padding in (0, (0, 0))
        and (ceil_mode_ok or not m.ceil_mode)
        and m.divisor_override is None
    )


def _fuse_pools(gm: fx.GraphModule, neuron_names: Iterable[str]) -> None:
    """Moves each 2×2 average pooling that is the only consumer of a neuron layer into it."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in neuron_names or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op == "call_module" and _is_2x2_pool(modules[user.target], ceil_mode_ok=True):
            modules[node.target].fused_pool = modules[user.target]
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            gm.delete_submodule(user.target)
    gm.graph.lint()
    gm.recompile()


class SpikingNetwork(nn.Module):
    """A converted SNN (made by :func:`rnl_fast.convert`).

    ``forward(x: [B, ...], T) → [T, B, K]``: the output estimate after each step, i.e. the last
    layer's output current averaged over steps 1..t (constant coding: ``x`` is the input current
    at every step). The membranes are reset at the start of each call, to ``v_init·θ`` of each
    layer (only the first chunk of a long simulation starts there; the rest carry the membrane,
    so the result does not depend on the chunk: to the bit on CPU).

    Args:
        graph_module: the traced ANN graph; the modules named in ``thresholds`` become neurons.
        thresholds, spike_weights: per neuron layer, a float or a float32 ``[C]`` tensor (per
            channel, dim 1 of the activation; see :class:`SpikingNeurons`).
        method: the conversion method that built it (for progress bars and reports).
        spike_dtype: dtype of the spikes between layers (None: the current's dtype).
        v_init: fraction of each layer's threshold the membranes start at, in [0, 1).

    Attributes:
        neuron_layers: name → :class:`SpikingNeurons`, in graph order.
        method: the conversion method that built it.
        v_init: the initial membrane, as a fraction of the threshold.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        thresholds: dict[str, float | Tensor],
        spike_weights: dict[str, float | Tensor],
        method: str,
        spike_dtype: torch.dtype | None = None,
        v_init: float = 0.0,
    ) -> None:
        super().__init__()
        for name, threshold in thresholds.items():
            neurons = SpikingNeurons(threshold, spike_weights[name], spike_dtype, v_init=v_init)
            graph_module.set_submodule(name, neurons)
        _fuse_pools(graph_module, set(thresholds))
        for node in graph_module.graph.nodes:  # the pools left in the graph
            if node.op == "call_module" and _is_2x2_pool(graph_module.get_submodule(node.target), ceil_mode_ok=False):
                graph_module.set_submodule(node.target, AvgPool2x2())
        self.graph_module = graph_module
        self.method = method
        self.v_init = float(v_init)
        self._activation_bytes_per_image: dict[tuple[int, ...], int] = {}
        self.neuron_names = list(thresholds)
        # The node after which each value is read no more: _run_graph drops it there, so that a
        # chunk holds about two activations at a time instead of all of them.
        # By name, not by Node: names survive a deepcopy of the module, Node objects do not.
        self._last_reader = {a.name: node.name for node in graph_module.graph.nodes for a in node.all_input_nodes}
        self.eval()  # an inference network (torch.export and torch.onnx.export warn on training mode)

    @property
    def neuron_layers(self) -> dict[str, SpikingNeurons]:
        return {name: self.graph_module.get_submodule(name) for name in self.neuron_names}

    @property
    def channel_wise(self) -> bool:
        """Whether any neuron layer has a threshold per channel."""
        return any(layer.channel_wise for layer in self.neuron_layers.values())

    def layer_labels(self) -> dict[str, str]:
        """A readable name for each neuron layer: ``conv3`` or ``fc1`` after the conv/linear layer
        (counted in graph order) whose output current it integrates, else its module name (the
        neurons after a residual addition, say)."""
        modules = dict(self.graph_module.named_modules())
        counts = {nn.Conv2d: 0, nn.Linear: 0}
        number: dict[str, str] = {}
        for node in self.graph_module.graph.nodes:
            kind = type(modules.get(node.target)) if node.op == "call_module" else None
            if kind in counts:
                counts[kind] += 1
                number[node.name] = f"{'conv' if kind is nn.Conv2d else 'fc'}{counts[kind]}"
        labels = {}
        for node in self.graph_module.graph.nodes:
            if node.op == "call_module" and node.target in self.neuron_names:
                (source,) = node.args
                labels[node.target] = number.get(source.name, node.target)
        return labels

    def reset(self) -> None:
        for layer in self.neuron_layers.values():
            layer.neurons.reset()

    def forward(self, x: Tensor, T: int, chunk: int | None = None) -> Tensor:
        """``x: [B, ...]`` images → ``[T, B, K]``: the output estimate after each of T steps (no
        gradient).

        ``torch.export.export(snn, (x,), {"T": T})`` exports it (T, and the chunk, are fixed in
        the exported graph): under export the whole run is one chunk unless ``chunk`` is given,
        since the memory budget of this machine says nothing of where the program will run; the
        grad mode is left to the caller (a ``no_grad`` region would become a higher-order op that
        ``torch.export.save`` cannot serialize), and the neurons' membranes and counts are left as
        they were before the export.
        """
        if isinstance(T, bool) or not isinstance(T, int) or T <= 0:
            raise ValueError(f"T must be a positive int, got {T!r}")
        if not torch.compiler.is_exporting():
            with torch.no_grad():
                return torch.cat(list(self._chunks(x, T, chunk)))
        # torch.export restores the module attributes a traced call assigned, but warns about each;
        # the exported program carries the membranes inside its graph.
        saved = [vars(layer.neurons).copy() for layer in self.neuron_layers.values()]
        try:
            with torch.no_grad():
                return torch.cat(list(self._chunks(x, T, chunk or T)))
        finally:
            for layer, state in zip(self.neuron_layers.values(), saved, strict=True):
                vars(layer.neurons).update(state)

    @torch.no_grad()
    def run(self, x: Tensor, T: int, chunk: int | None = None):
        """Yield the output estimate ``[t_chunk, B, K]`` chunk by chunk (membranes carried over)."""
        yield from self._chunks(x, T, chunk)

    def _chunks(self, x: Tensor, T: int, chunk: int | None):
        """:meth:`run` in the caller's grad mode."""
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
            raise ValueError(f"chunk must be None or a positive int, got {chunk!r}")
        chunk = chunk or self.chunk_size(x, T)
        x = x.to(self.dtype)  # images as the layers' dtype: snn.to(torch.bfloat16) takes float32 images
        out_dtype = torch.promote_types(self.dtype, torch.float32)  # bf16/fp16 layers: float32 estimates
        self.reset()
        static: dict[str, Tensor] = {}
        total = None
        done = 0
        while done < T:
            steps = min(chunk, T - done)
            current = self._run_graph(x, steps, static)  # [steps, B, K]
            # The running sum in float64, carried from chunk to chunk unrounded, as one float64
            # cumsum over all T steps would be (what a CPU float32 cumsum accumulates in): chunked
            # and whole runs agree to the bit on CPU.
            running = current.double() if total is None else torch.cat([total[None], current.double()])
            running = torch.cumsum(running, 0)
            running = running if total is None else running[1:]
            total = running[-1]
            summed = running.to(out_dtype)
            t = torch.arange(done + 1, done + steps + 1, device=x.device, dtype=out_dtype)
            yield summed / t.view(-1, *[1] * (summed.dim() - 1))
            done += steps

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the convolutions and linear layers (``snn.to(torch.bfloat16)`` sets it)."""
        return next(self.graph_module.parameters()).dtype

    def chunk_size(self, x: Tensor, T: int, budget_bytes: int | None = None) -> int:
        """Steps per chunk such that the largest activation of a chunk stays within the budget
        (default: :func:`chunk_budget` of x's device, i.e. chosen from the free memory)."""
        budget_bytes = budget_bytes or chunk_budget(x.device)
        per_step = self._largest_activation_bytes(x)
        return max(1, min(T, budget_bytes // max(per_step, 1)))

    def _largest_activation_bytes(self, x: Tensor) -> int:
        """Bytes of the largest activation of one step for the batch ``x``. The per-image figure
        comes from one shape-propagation pass per image shape, cached: simulate() asks per batch."""
        key = tuple(x.shape[1:])
        if key not in self._activation_bytes_per_image:
            self._activation_bytes_per_image[key] = self._shape_pass(x).largest * 4
        return self._activation_bytes_per_image[key] * x.shape[0]

    def _shape_pass(self, x: Tensor, what: str = "x") -> _Shapes:
        """One image of ``x`` through the graph with each neuron layer as an identity (or its fused
        pool), in the layers' dtype (``snn.to(torch.bfloat16)`` takes float32 images): every
        node's shape, or a one-line error naming ``what`` and the node where ``x`` does not fit."""
        shapes = _Shapes(_ann_view(self.graph_module), what)
        with torch.no_grad():
            shapes.run(x[:1].to(self.dtype))
        return shapes

    def _run_graph(self, x: Tensor, steps: int, static: dict[str, Tensor]) -> Tensor:
        """One chunk of ``steps`` steps. Values that depend only on the image ("static": the
        layers before the first neurons) are computed once per image and cached in ``static``;
        the rest are ``[steps·B, ...]``."""
        B = x.shape[0]
        values: dict[str, Tensor] = {}
        dynamic: set[str] = set()
        modules = dict(self.graph_module.named_modules())

        def load(a: fx.Node) -> Tensor:
            # No closure here may refer to itself: a reference cycle would keep `values` (the
            # chunk's activations, gigabytes) alive until Python's cyclic GC happened to run.
            value = values[a.name]
            if any_dynamic and a.name not in dynamic:  # a static value repeated over the steps
                return value.unsqueeze(0).expand(steps, *value.shape).reshape(steps * B, *value.shape[1:])
            return value

        for node in self.graph_module.graph.nodes:
            if node.op == "output":
                (result,) = node.args
                out = values[result.name]
                if result.name not in dynamic:
                    return out.unsqueeze(0).expand(steps, *out.shape)
                return out.reshape(steps, B, *out.shape[1:])
            inputs = node.all_input_nodes
            any_dynamic = any(a.name in dynamic for a in inputs)
            if node.op == "placeholder":
                values[node.name] = x
            elif node.name in static:
                values[node.name] = static[node.name]
            elif node.op == "call_module" and isinstance(modules[node.target], SpikingNeurons):
                (source,) = node.args
                if source.name in dynamic:
                    current = values[source.name].reshape(steps, B, *values[source.name].shape[1:])
                else:  # constant coding: the same current every step, never materialised
                    current = values[source.name].unsqueeze(0).expand(steps, *values[source.name].shape)
                values[node.name] = modules[node.target](current)
                del current
                dynamic.add(node.name)
            else:
                args, kwargs = fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)
                if node.op == "call_module":
                    values[node.name] = modules[node.target](*args, **kwargs)
                elif node.op == "call_function":
                    values[node.name] = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    values[node.name] = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "get_attr":
                    values[node.name] = self.graph_module.get_parameter(node.target)
                del args, kwargs
                if any_dynamic:
                    dynamic.add(node.name)
                else:
                    static[node.name] = values[node.name]
            for a in inputs:
                if self._last_reader[a.name] == node.name:
                    values.pop(a.name)
        raise RuntimeError("the graph has no output node")


class _Shapes(fx.Interpreter):
    """Runs a graph on one image and keeps each node's tensor shape without the batch dim
    (``shapes``, by node name) and the element count of its largest tensor (``largest``); an input
    that does not fit the network fails with one line naming the input's shape and the node."""

    def __init__(self, gm: fx.GraphModule, what: str = "x") -> None:
        super().__init__(gm)
        self.what = what  #: the argument's name in the error message
        self.extra_traceback = False  # else fx appends the graph to the message of run_node's error
        self.largest = 0
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as error:  # torch raises many types; what the user needs is where and why
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"{self.what} of shape [B, {', '.join(map(str, self.args_shape))}] does not fit the network: "
                f"node '{n.name}' ({n.op} {n.target}) failed: {reason}"
            ) from error
        if isinstance(result, Tensor):
            self.largest = max(self.largest, result.numel())
            self.shapes[n.name] = tuple(int(d) for d in result.shape[1:])
        return result

    def run(self, x: Tensor):  # type: ignore[override]
        self.args_shape = tuple(x.shape[1:])
        return super().run(x)


def _ann_view(gm: fx.GraphModule) -> fx.GraphModule:
    """The same graph with each neuron layer as an identity (or its fused pooling): for shape
    propagation only."""
    shapes = fx.GraphModule(gm, gm.graph)
    for name, m in list(shapes.named_modules()):
        if isinstance(m, SpikingNeurons):
            shapes.set_submodule(name, m.fused_pool if m.fused_pool is not None else nn.Identity())
    return shapes
