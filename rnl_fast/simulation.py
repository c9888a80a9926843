"""The converted SNN and its simulation: accuracy, spikes and K curves per step in one pass.

:class:`SpikingNetwork` runs the traced ANN graph on spikes, layer by layer over all T steps
at once: every conv/linear sees a ``[T·B, ...]`` batch, every neuron layer one fused
:class:`rnl_fast.IFSequence` call over ``[T, B, ...]``. Under constant coding the image is the
input current at every step, so whatever comes before the first neuron (the first conv + BN)
is computed once per image, not T times, and reaches the first neurons as a stride-0 view.
Long simulations run in chunks of steps with every membrane carried over, so memory stays
bounded for T in the thousands.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from .nn import IFSequence, RateNorm
from .reference import avg_pool2x2

#: Bounds on the largest activation of one chunk, in bytes; between them the simulator takes an
#: eighth of the memory available on the device (a chunk holds a few such tensors at once).
#: Larger chunks gain little once a chunk's convolutions see thousands of images (cnn7, batch
#: 128: 10 steps per chunk), and memory then stays flat in T.
MIN_CHUNK_BYTES = 16 * 2**20
MAX_CHUNK_BYTES = 128 * 2**20


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@functools.cache
def reuse_freed_memory() -> bool:
    """Let glibc keep freed blocks up to 1 GiB for reuse instead of returning them to the OS.

    A simulation allocates the same large activations chunk after chunk; by default glibc maps
    each block over 32 MB afresh and unmaps it on free, so every chunk pays the page faults of
    all its outputs again (on a 2-core VM: cnn7, T = 64, batch 128 took 5.3 s, 0.8 s with this).
    Process-wide and idempotent; called by :meth:`SpikingNetwork.run` on CPU tensors. Set
    ``RNL_FAST_REUSE_FREED_MEMORY=0`` to leave the allocator alone. Returns whether it applied.
    """
    if os.environ.get("RNL_FAST_REUSE_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 2**30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):  # not glibc
        return False


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * MAX_CHUNK_BYTES  # unknown: assume the largest budget is affordable


def chunk_budget(device: torch.device) -> int:
    """The per-chunk activation budget on ``device`` (see :data:`MIN_CHUNK_BYTES`)."""
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, available_memory(device) // 8))


class SpikingNeurons(nn.Module):
    """IF neurons standing where an ANN activation stood.

    ``forward(x)`` takes the input current either as ``[T, B, ...]`` (any strides, a stride-0
    constant input included) and returns the spikes as ``[T·B, ...]`` in the dtype the next
    layer computes in, each spike carrying ``spike_weight`` (1 for RNL; λ for threshold
    balancing, which is Theorem 1's weight scaling moved onto the spike).

    With ``fused_pool`` (the ``nn.AvgPool2d(2)`` that followed the activation, set by
    :class:`SpikingNetwork`) it returns the pooled rates ``[T·B, C, H', W']`` instead, from one
    kernel that never stores the spikes (:meth:`rnl_fast.IFSequence.forward_pool2x2`); while an
    observer watches, the spikes are made, shown to it and pooled by the reference, with the
    same result to the bit.
    """

    def __init__(self, threshold: float, spike_weight: float, spike_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        # Spikes per neuron are not kept: simulate() needs the totals per step only, and the
        # per-neuron counts cost a write and an accumulation of the largest layer every chunk.
        self.neurons = IFSequence(v_threshold=threshold, spike_dtype=spike_dtype, count_neurons=False)
        self.spike_weight = spike_weight
        #: The 2×2 average pooling fused into this layer, or None.
        self.fused_pool: nn.AvgPool2d | None = None
        #: Called with each chunk's spikes ``[T, B, ...]`` (for K curves); None when unused.
        self.observer: Callable[[Tensor], None] | None = None

    def forward(self, current: Tensor) -> Tensor:
        pool = self.fused_pool
        if pool is not None and self.observer is None:
            return self.neurons.forward_pool2x2(current, self.spike_weight, pool.ceil_mode).flatten(0, 1)
        spikes = self.neurons(current)
        if self.observer is not None:
            self.observer(spikes)
        out = spikes.flatten(0, 1)
        if out.dtype != current.dtype:
            out = out.to(current.dtype)
        if pool is not None:
            out = avg_pool2x2(out, pool.ceil_mode)
        return out * self.spike_weight if self.spike_weight != 1.0 else out

    def extra_repr(self) -> str:
        pool = ", fused 2x2 average pooling" if self.fused_pool is not None else ""
        return f"threshold={self.neurons.v_threshold:.4g}, spike_weight={self.spike_weight:.4g}{pool}"


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
    at every step). The membranes are reset at the start of each call.

    Attributes:
        neuron_layers: name → :class:`SpikingNeurons`, in graph order.
        method: the conversion method that built it.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        thresholds: dict[str, float],
        spike_weights: dict[str, float],
        method: str,
        spike_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, threshold in thresholds.items():
            _replace(graph_module, name, SpikingNeurons(threshold, spike_weights[name], spike_dtype))
        _fuse_pools(graph_module, set(thresholds))
        for node in graph_module.graph.nodes:  # the pools left in the graph
            if node.op == "call_module" and _is_2x2_pool(graph_module.get_submodule(node.target), ceil_mode_ok=False):
                _replace(graph_module, node.target, AvgPool2x2())
        self.graph_module = graph_module
        self.method = method
        self._activation_bytes_per_image: dict[tuple[int, ...], int] = {}
        self.neuron_names = list(thresholds)
        # The node after which each value is read no more: _run_graph drops it there, so that a
        # chunk holds about two activations at a time instead of all of them.
        # By name, not by Node: names survive a deepcopy of the module, Node objects do not.
        self._last_reader = {a.name: node.name for node in graph_module.graph.nodes for a in node.all_input_nodes}

    @property
    def neuron_layers(self) -> dict[str, SpikingNeurons]:
        return {name: self.graph_module.get_submodule(name) for name in self.neuron_names}

    def reset(self) -> None:
        for layer in self.neuron_layers.values():
            layer.neurons.reset()

    @torch.no_grad()
    def forward(self, x: Tensor, T: int, chunk: int | None = None) -> Tensor:
        if not isinstance(T, int) or T <= 0:
            raise ValueError(f"T must be a positive int, got {T!r}")
        return torch.cat(list(self.run(x, T, chunk)))

    @torch.no_grad()
    def run(self, x: Tensor, T: int, chunk: int | None = None):
        """Yield the output estimate ``[t_chunk, B, K]`` chunk by chunk (membranes carried over)."""
        if x.device.type == "cpu":
            reuse_freed_memory()
        chunk = chunk or self.chunk_size(x, T)
        self.reset()
        static: dict[str, Tensor] = {}
        total = None
        done = 0
        while done < T:
            steps = min(chunk, T - done)
            current = self._run_graph(x, steps, static)  # [steps, B, K]
            summed = torch.cumsum(current, 0) if total is None else torch.cumsum(current, 0) + total
            total = summed[-1]
            t = torch.arange(done + 1, done + steps + 1, device=x.device, dtype=summed.dtype)
            yield summed / t.view(-1, *[1] * (summed.dim() - 1))
            done += steps

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
            from torch.fx.passes.shape_prop import ShapeProp

            gm = _ann_view(self.graph_module)
            with torch.no_grad():
                ShapeProp(gm).propagate(x[:1])
            shapes = [node.meta["tensor_meta"].shape for node in gm.graph.nodes if hasattr(node.meta.get("tensor_meta"), "shape")]
            self._activation_bytes_per_image[key] = max((math.prod(shape) * 4 for shape in shapes), default=0)
        return self._activation_bytes_per_image[key] * x.shape[0]

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


def _replace(gm: fx.GraphModule, qualname: str, module: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, child, module)


def _ann_view(gm: fx.GraphModule) -> fx.GraphModule:
    """The same graph with each neuron layer as an identity (or its fused pooling): for shape
    propagation only."""
    shapes = fx.GraphModule(gm, gm.graph)
    for name, m in list(shapes.named_modules()):
        if isinstance(m, SpikingNeurons):
            _replace(shapes, name, m.fused_pool if m.fused_pool is not None else nn.Identity())
    return shapes


# ─── simulation over a dataset ───────────────────────────────────────────────────────────────


@dataclass
class SimulationResult:
    """What one pass over a dataset measures (t = 1..T)."""

    T: int
    images: int
    accuracy: list[float]  #: percent correct after each step
    spikes_per_step: list[float]  #: mean spikes per image at each step, all layers together
    layer_spikes_per_step: dict[str, list[float]]  #: the same, per neuron layer
    k_curves: dict[str, list[float]] = field(default_factory=dict)  #: K(t) per layer (paper Eq. 7)
    k_images: int = 0  #: images the K curves were measured on


def ann_rates(model: nn.Module, x: Tensor, names: Iterable[str]) -> dict[str, Tensor]:
    """The ANN's rates r̂ at the named activations for input ``x``: RateNorm outputs as they are;
    a ReLU's output a is given as the rate clip(a/λ, 0, 1) by :func:`simulate` (see ``scales``)."""
    wanted = set(names)
    rates: dict[str, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: rates.__setitem__(name, out.detach()))
        for name, m in model.named_modules()
        if name in wanted
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return rates


@torch.no_grad()
def simulate(
    snn: SpikingNetwork,
    loader: Iterable,
    T: int,
    ann: nn.Module | None = None,
    device: torch.device | str = "cpu",
    chunk: int | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    k_images: int | None = 128,
) -> SimulationResult:
    """Simulate ``snn`` for T steps on every batch ``(x, y)`` of ``loader``, in one pass.

    Returns the accuracy after every step, the spikes per step (mean per image, per layer and
    in all), and, when the source ``ann`` is given, the K curve of every neuron layer at every
    step: ``K(t) = Σ‖r(t) − r̂‖² / Σ‖r̂‖²`` (r(t) = spikes so far / t, r̂ the ANN's rate of the
    same neuron on the same image), over the images of the first batches up to ``k_images``
    (None: all; the paper shows one image). K is accumulated step by step from running spike
    counts: no spike train is kept.
    """
    if not isinstance(T, int) or T <= 0:
        raise ValueError(f"T must be a positive int, got {T!r}")
    layers = snn.neuron_layers
    correct = torch.zeros(T, dtype=torch.float64)
    layer_spikes = {name: torch.zeros(T, dtype=torch.float64) for name in layers}
    k_num = {name: torch.zeros(T, dtype=torch.float64) for name in layers}
    k_den = dict.fromkeys(layers, 0.0)
    images = k_counted = 0
    batches = loader if max_batches is None else _take(loader, max_batches)
    total = len(loader) if max_batches is None and hasattr(loader, "__len__") else max_batches
    if ann is not None:
        ann = ann.to(device).eval()
    for x, y in tqdm(batches, total=total, desc=f"simulate {snn.method} T={T}", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        if ann is not None and (k_images is None or k_counted < k_images):
            targets = _target_rates(ann, x, layers)
            for name, layer in layers.items():
                k_den[name] += float(targets[name].double().pow(2).sum())
                layer.observer = _k_observer(targets[name], k_num[name])
            k_counted += x.shape[0]
        done = 0
        for estimate in snn.run(x, T, chunk):
            steps = estimate.shape[0]
            correct[done : done + steps] += (estimate.argmax(-1) == y).sum(-1).double().cpu()
            done += steps
        for name, layer in layers.items():
            layer_spikes[name] += layer.neurons.step_spike_counts.double().cpu()
            layer.observer = None
        images += x.shape[0]
        snn.reset()
    if images == 0:
        raise ValueError("the loader gave no batches to simulate")
    per_layer = {name: (s / images).tolist() for name, s in layer_spikes.items()}
    return SimulationResult(
        T=T,
        images=images,
        accuracy=(100.0 * correct / images).tolist(),
        spikes_per_step=(sum(layer_spikes.values()) / images).tolist(),
        layer_spikes_per_step=per_layer,
        k_curves={name: (k_num[name] / max(k_den[name], 1e-30)).tolist() for name in layers} if ann is not None else {},
        k_images=k_counted,
    )


def _take(loader: Iterable, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


def _target_rates(ann: nn.Module, x: Tensor, layers: dict[str, SpikingNeurons]) -> dict[str, Tensor]:
    """r̂ per neuron layer: the RateNorm output, or clip(a/λ, 0, 1) for a balanced ReLU."""
    raw = ann_rates(ann, x, layers)
    missing = set(layers) - set(raw)
    if missing:
        raise ValueError(f"the ANN given for the K curves has no activations named {sorted(missing)}")
    return {
        name: raw[name]
        if isinstance(ann.get_submodule(name), RateNorm)
        else (raw[name] / layer.neurons.v_threshold).clamp(0, 1)
        for name, layer in layers.items()
    }


def _k_observer(target: Tensor, k_num: Tensor) -> Callable[[Tensor], None]:
    """Accumulates ``Σ_i (c_i(t)/t − r̂_i)²`` for every step into ``k_num`` (float64 ``[T]``).

    With running counts c(t) = c(t−1) + s(t) the sum expands to ``A(t)/t² − 2·B(t)/t + Σr̂²``,
    where ``A(t) = Σ c_i(t)²`` grows by ``Σ s_i(t)·(2c_i(t−1) + 1)`` (spikes are 0/1) and
    ``B(t) = Σ c_i(t)·r̂_i`` by ``Σ s_i(t)·r̂_i``: two dot products per step over the layer,
    and the counts are the only state kept (no spike train, no per-chunk cumulative tensor).
    """
    rates = target.reshape(-1).to(torch.float32)
    counts = torch.zeros_like(rates)
    state = {"t": 0, "A": 0.0, "B": 0.0}
    rates_sq = float(rates.double().pow(2).sum())

    def observe(spikes: Tensor) -> None:
        flat = spikes.reshape(spikes.shape[0], -1)
        for step in flat:
            s = step.to(torch.float32)
            state["A"] += 2.0 * float(torch.dot(s, counts)) + float(s.sum())
            state["B"] += float(torch.dot(s, rates))
            counts.add_(s)
            state["t"] += 1
            t = state["t"]
            k_num[t - 1] += max(state["A"] / t**2 - 2.0 * state["B"] / t + rates_sq, 0.0)

    return observe


@torch.no_grad()
def mean_omega(snn: SpikingNetwork, ann: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> float:
    """Mean Rate Inference Loss Ω (Eq. 8) of the ANN's rates r̂ at the converted layers, per
    layer over each whole batch, averaged over layers and batches (for ReLU baselines r̂ is
    clip(a/λ, 0, 1), the rate the balanced IF neuron tends to)."""
    from .reference import omega

    ann = ann.to(device).eval()
    layers = snn.neuron_layers
    values = [
        float(torch.stack([omega(r) for r in _target_rates(ann, x.to(device), layers).values()]).mean())
        for x, _y in loader
    ]
    if not values:
        raise ValueError("the loader gave no batches")
    return sum(values) / len(values)
