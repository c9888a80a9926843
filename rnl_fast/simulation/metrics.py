"""What one pass of a converted SNN over a dataset measures: accuracy, spikes and K curves per step.

:func:`simulate` runs :class:`~rnl_fast.simulation.SpikingNetwork` on every batch once and
records, for every step t = 1..T, the accuracy of the output estimate, the spikes of every neuron
layer, and (given the source ANN) the K curve of paper Eq. 7 per layer. :func:`mean_omega` gives
the Rate Inference Loss Ω (Eq. 8) of the ANN's rates at the converted layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..nn import RateNorm
from ..reference import omega
from .network import SpikingNetwork, SpikingNeurons


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
    #: A readable name per neuron layer (``conv1``, ``fc1``…, see ``SpikingNetwork.layer_labels``).
    layer_labels: dict[str, str] = field(default_factory=dict)


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
    counts on the device, with one host synchronisation per batch: no spike train is kept.
    """
    if isinstance(T, bool) or not isinstance(T, int) or T <= 0:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if not isinstance(snn, SpikingNetwork):
        raise TypeError(f"snn must be a SpikingNetwork (from rnl_fast.convert), got {type(snn).__name__}")
    if not isinstance(loader, Iterable):
        raise TypeError(f"loader must be an iterable of (x, y) batches, got {type(loader).__name__} {loader!r}")
    layers = snn.neuron_layers
    correct = torch.zeros(T, dtype=torch.float64)
    layer_spikes = {name: torch.zeros(T, dtype=torch.float64) for name in layers}
    k_num = {name: torch.zeros(T, dtype=torch.float64) for name in layers}
    k_den = dict.fromkeys(layers, 0.0)
    images = k_counted = 0
    batches = loader if max_batches is None else itertools.islice(loader, max_batches)
    total = len(loader) if max_batches is None and hasattr(loader, "__len__") else max_batches
    if ann is not None:
        ann = ann.to(device).eval()
    for x, y in tqdm(batches, total=total, desc=f"simulate {snn.method} T={T}", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        observers: dict[str, _KCurve] = {}
        if ann is not None and (k_images is None or k_counted < k_images):
            targets = _target_rates(ann, x, layers)
            for name, layer in layers.items():
                k_den[name] += float(targets[name].double().pow(2).sum())
                observers[name] = layer.observer = _KCurve(targets[name], T)
            k_counted += x.shape[0]
        done = 0
        for estimate in snn.run(x, T, chunk):
            steps = estimate.shape[0]
            correct[done : done + steps] += (estimate.argmax(-1) == y).sum(-1).double().cpu()
            done += steps
        for name, layer in layers.items():
            layer_spikes[name] += layer.neurons.step_spike_counts.double().cpu()
            layer.observer = None
            if name in observers:
                k_num[name] += observers[name].k_num.cpu()
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
        layer_labels=snn.layer_labels(),
    )


def _target_rates(ann: nn.Module, x: Tensor, layers: dict[str, SpikingNeurons]) -> dict[str, Tensor]:
    """r̂ per neuron layer: the RateNorm output, or clip(a/λ, 0, 1) for a balanced ReLU."""
    raw = ann_rates(ann, x, layers)
    missing = set(layers) - set(raw)
    if missing:
        raise ValueError(f"the ANN given for the K curves has no activations named {sorted(missing)}")
    return {
        name: raw[name]
        if isinstance(ann.get_submodule(name), RateNorm)
        else (raw[name] / layer.threshold_for(raw[name])).clamp(0, 1)
        for name, layer in layers.items()
    }


class _KCurve:
    """Observer of one neuron layer: accumulates ``Σ_i (c_i(t)/t − r̂_i)²`` for every step t into
    :attr:`k_num` (float64 ``[T]``, on the rates' device).

    With running counts c(t) = c(t−1) + s(t) the sum expands to ``A(t)/t² − 2·B(t)/t + Σr̂²``,
    where ``A(t) = Σ c_i(t)²`` grows by ``Σ s_i(t)·(2c_i(t−1) + 1)`` (spikes are 0/1) and
    ``B(t) = Σ c_i(t)·r̂_i`` by ``Σ s_i(t)·r̂_i``: two dot products per step over the layer, and
    the counts are the only state kept (no spike train). Everything stays on the device: the
    caller reads :attr:`k_num` once, after the batch.
    """

    def __init__(self, target: Tensor, T: int) -> None:
        self.rates = target.reshape(-1).to(torch.float32)
        self.counts = torch.zeros_like(self.rates)
        self.rates_sq = self.rates.double().pow(2).sum()
        self.k_num = torch.zeros(T, dtype=torch.float64, device=self.rates.device)
        self.a = torch.zeros((), dtype=torch.float64, device=self.rates.device)
        self.b = torch.zeros((), dtype=torch.float64, device=self.rates.device)
        self.t = 0

    def __call__(self, spikes: Tensor) -> None:
        """``spikes: [steps, B, ...]``, the chunk's spikes of this layer (0/1)."""
        for step in spikes.reshape(spikes.shape[0], -1):
            s = step.to(torch.float32)
            self.a += 2.0 * torch.dot(s, self.counts).double() + s.sum().double()
            self.b += torch.dot(s, self.rates).double()
            self.counts.add_(s)
            self.t += 1
            t = self.t
            self.k_num[t - 1] += (self.a / t**2 - 2.0 * self.b / t + self.rates_sq).clamp_min(0.0)


@torch.no_grad()
def mean_omega(snn: SpikingNetwork, ann: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> float:
    """Mean Rate Inference Loss Ω (Eq. 8) of the ANN's rates r̂ at the converted layers, per
    layer over each whole batch, averaged over layers and batches (for ReLU baselines r̂ is
    clip(a/λ, 0, 1), the rate the balanced IF neuron tends to)."""
    ann = ann.to(device).eval()
    layers = snn.neuron_layers
    values = [
        float(torch.stack([omega(r) for r in _target_rates(ann, x.to(device), layers).values()]).mean())
        for x, _y in loader
    ]
    if not values:
        raise ValueError("the loader gave no batches")
    return sum(values) / len(values)
