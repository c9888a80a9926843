"""The paper's figures for one comparison: accuracy against T (Fig. 6b), the K curves per layer
(Fig. 4 / 6a) and the power per step with the energy until each method's target (Fig. 7a)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .results import TARGET_MARGIN, MethodResult

_COLORS = {"maxnorm": "tab:blue", "robustnorm": "tab:orange", "rnl": "tab:green", "rnl_ril": "tab:red"}
_DPI = 130


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(name: str, index: int) -> str:
    return _COLORS.get(name, f"C{index % 10}")


def _ann_lines(methods: Mapping[str, MethodResult]) -> dict[float, list[str]]:
    """Each distinct ANN accuracy → the methods converting that ANN (MaxNorm and RobustNorm
    share theirs), so that one dashed line is drawn and labelled per ANN."""
    lines: dict[float, list[str]] = {}
    for name, r in methods.items():
        lines.setdefault(round(r.ann_accuracy, 4), []).append(name)
    return lines


def plot_accuracy(methods: Mapping[str, MethodResult], path: str | Path, title: str) -> None:
    """SNN accuracy after t steps, one line per method: the whole range (left) and zoomed on the
    top (right), where the dashed ANN lines and the dots (first step within one point of the
    ANN) can be told apart."""
    plt = _pyplot()
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {name: _color(name, i) for i, name in enumerate(methods)}
    top = max(r.ann_accuracy for r in methods.values())
    low = min(r.target_accuracy for r in methods.values())
    zoom_floor = max(0.0, min(low, top - 3 * TARGET_MARGIN) - 2.0)
    legends = {}
    for ax in (full, zoom):
        curves = []
        for name, r in methods.items():
            steps = range(1, len(r.snn_accuracy) + 1)
            curves += ax.plot(steps, r.snn_accuracy, label=f"{name} (SNN)", color=colors[name], lw=1.8)
            if r.steps_to_target is not None:
                ax.plot([r.steps_to_target], [r.snn_accuracy[r.steps_to_target - 1]], "o", color=colors[name], ms=6)
        ann_lines = [
            ax.axhline(accuracy, color=colors[names[0]], ls="--", lw=1.0, label=f"{', '.join(names)}: {accuracy:.2f}%")
            for accuracy, names in sorted(_ann_lines(methods).items(), reverse=True)
        ]
        legends[ax] = curves if ax is full else ann_lines
        ax.set_xscale("log", base=2)
        ax.set_xlabel("time step t")
        ax.grid(alpha=0.3, which="both")
    full.set_ylim(0, 100)
    full.set_ylabel("accuracy after t steps (%)")
    full.set_title("all steps", fontsize=10)
    zoom.set_ylim(zoom_floor, min(100.0, top + 1.0))
    entered = [next((t for t, a in enumerate(r.snn_accuracy, 1) if a >= zoom_floor), None) for r in methods.values()]
    entered = [t for t in entered if t is not None]
    if entered:  # the zoom starts a little before the first curve enters it
        zoom.set_xlim(max(1.0, min(entered) / 1.5), max(len(r.snn_accuracy) for r in methods.values()) * 1.1)
    zoom.set_title(f"near the top (dashed: ANN; dot: first step within {TARGET_MARGIN:g} point of it)", fontsize=10)
    full.legend(handles=legends[full], loc="lower right", fontsize=8)
    # The ANN lines are named in a legend, not beside the lines: ANNs 0.2 points apart would
    # put their labels on top of each other. Late in the run every curve is near the top, so
    # the lower right of the zoom is free.
    zoom.legend(handles=legends[zoom], loc="lower right", fontsize=8, title="ANN accuracy (dashed)", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def plot_k_curves(methods: Mapping[str, MethodResult], path: str | Path, title: str) -> None:
    """K(t) = ‖r(t) − r̂‖² / ‖r̂‖² per neuron layer (paper Eq. 7), one panel per method, log-log;
    above the dotted line K = 1 a layer's rates are further from the ANN's than silence would be."""
    plt = _pyplot()
    with_k = {name: r for name, r in methods.items() if r.k_curves}
    if not with_k:
        return
    # A near-square grid: nine methods in one row made panels too thin to read.
    cols = math.ceil(math.sqrt(len(with_k)))
    rows = math.ceil(len(with_k) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(with_k) :]:
        ax.set_visible(False)
    for ax, (name, r) in zip(axes.flat, with_k.items()):
        cmap = plt.get_cmap("viridis", max(len(r.k_curves), 2))
        for i, (layer, curve) in enumerate(r.k_curves.items()):
            label = r.layer_labels.get(layer, layer)
            ax.plot(range(1, len(curve) + 1), [max(k, 1e-6) for k in curve], color=cmap(i), label=label)
        ax.axhline(1.0, color="0.4", ls=":", lw=1.0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("time step t")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title="neurons after", title_fontsize=7, ncol=2 if len(r.k_curves) > 6 else 1)
    for row in axes:
        row[0].set_ylabel("K(t) = ‖r(t) − r̂‖² / ‖r̂‖²")
    k_images = max(r.k_images for r in with_k.values())
    fig.suptitle(f"{title}; K over the first {k_images} images (dotted: K = 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def log_binned(values: Sequence[float], bins_per_octave: int = 2) -> tuple[list[float], list[float]]:
    """``values[t−1]`` for t = 1..T averaged over bins of steps that widen with t
    (``bins_per_octave`` per doubling of t): the per-step noise is averaged out and the early steps
    keep their resolution. A last bin under half its neighbour's width joins it. Returns the
    bins' geometric centres and their means."""
    T = len(values)
    if T == 0:
        return [], []
    edges = sorted({round(2 ** (k / bins_per_octave)) for k in range(int(bins_per_octave * math.log2(T)) + 1)})
    edges = [e for e in edges if e <= T] + [T + 1]
    if len(edges) > 2 and (edges[-1] - edges[-2]) * 2 < edges[-2] - edges[-3]:
        del edges[-2]
    centres, means = [], []
    for start, stop in zip(edges, edges[1:]):
        chunk = values[start - 1 : stop - 1]
        centres.append(math.sqrt(start * (stop - 1)))
        means.append(sum(chunk) / len(chunk))
    return centres, means


def plot_power(methods: Mapping[str, MethodResult], path: str | Path, title: str) -> None:
    """The energy model of paper §3.4 in spikes per image: the spikes spent until step t (left;
    the dot marks each method's ANN accuracy − 1 point, the energy of Fig. 7a) and the spikes per
    step, averaged over bins that widen with t (right; the power of Eq. 14 at α = 1 J per spike
    and 1 ms per step)."""
    plt = _pyplot()
    fig, (energy, power) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, (name, r) in enumerate(methods.items()):
        color = _color(name, i)
        spent, total = [], 0.0
        for spikes in r.spikes_per_step:
            total += spikes
            spent.append(total)
        steps = range(1, len(spent) + 1)
        to_target = f"{r.energy_to_target:,.0f} spikes to target" if r.energy_to_target is not None else "no target"
        energy.plot(steps, spent, color=color, lw=1.8, label=f"{name}: {to_target}")
        if r.steps_to_target is not None:
            energy.plot([r.steps_to_target], [spent[r.steps_to_target - 1]], "o", color=color, ms=6)
        centres, means = log_binned(r.spikes_per_step)
        power.plot(centres, means, color=color, lw=1.6, marker=".", label=name)
    for ax in (energy, power):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("time step t")
        ax.grid(alpha=0.3, which="both")
    energy.set_ylim(bottom=0)
    energy.set_ylabel("spikes per image spent until t")
    energy.set_title(f"energy (dot: ANN accuracy − {TARGET_MARGIN:g} point reached)", fontsize=10)
    power.set_ylabel("spikes per image per step (binned)")
    power.set_title("power (energy per step)", fontsize=10)
    energy.legend(fontsize=8)
    fig.suptitle(f"{title}; α = 1 J per spike, 1 ms per step (paper Eq. 14)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
