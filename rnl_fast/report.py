"""Results of a conversion study as the paper shows them: Table 2, accuracy vs T, K curves,
power per step (Fig. 6–7), and ``results.json``.

``results.json`` layout (one file per run)::

    {"dataset": "mnist", "model": "cnn7", "T": 256, "test_images": 1000,
     "methods": {NAME: {"ann_accuracy": percent, "snn_accuracy": [percent after step 1..T],
                        "spikes_per_step": [mean spikes per image at each step],
                        "omega": mean Ω of the ANN's activations (rates r̂),
                        "k_curves": {layer: [K(t) for t = 1..T]}, "k_images": images K is over,
                        "steps_to_target": t or null, "energy_to_target": joules per image or null,
                        "target_accuracy": ANN accuracy − 1 point}}}

for NAME in maxnorm, robustnorm, rnl, rnl_ril.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._io import atomic_write
from .energy import energy_to_accuracy, power_per_step
from .simulation import SimulationResult

#: The latencies of the paper's Table 2 (plus 8, for MNIST's faster convergence).
TABLE_STEPS = (8, 16, 32, 64, 128, 256)
#: A method "has converged" when it reaches its ANN accuracy minus this many points.
TARGET_MARGIN = 1.0


@dataclass
class MethodResult:
    """Everything measured for one conversion method."""

    ann_accuracy: float
    snn_accuracy: list[float]
    spikes_per_step: list[float]
    omega: float
    k_curves: dict[str, list[float]] = field(default_factory=dict)
    k_images: int = 0
    target_accuracy: float = 0.0
    steps_to_target: int | None = None
    energy_to_target: float | None = None

    @classmethod
    def from_simulation(cls, ann_accuracy: float, omega: float, sim: SimulationResult) -> MethodResult:
        target = ann_accuracy - TARGET_MARGIN
        reached = energy_to_accuracy(sim.accuracy, sim.spikes_per_step, target)
        return cls(
            ann_accuracy=ann_accuracy,
            snn_accuracy=sim.accuracy,
            spikes_per_step=sim.spikes_per_step,
            omega=omega,
            k_curves=sim.k_curves,
            k_images=sim.k_images,
            target_accuracy=target,
            steps_to_target=reached.steps,
            energy_to_target=reached.energy,
        )


def write_results(
    path: str | Path, dataset: str, model: str, T: int, test_images: int, methods: dict[str, MethodResult]
) -> None:
    """Write ``results.json`` atomically: readers see the previous file or the complete new one."""
    payload = {
        "dataset": dataset,
        "model": model,
        "T": T,
        "test_images": test_images,
        "methods": {name: asdict(result) for name, result in methods.items()},
    }
    with atomic_write(path) as file:
        file.write(json.dumps(payload, indent=1).encode())


def paper_table(methods: dict[str, MethodResult], steps: tuple[int, ...] = TABLE_STEPS) -> str:
    """Table 2 of the paper (accuracy at T = 8…256) with the ANN accuracy, Ω, and the steps and
    energy (spikes per image, α = 1) each method needs to reach its ANN accuracy − 1 point."""
    T = max(len(r.snn_accuracy) for r in methods.values())
    shown = [t for t in steps if t <= T]
    baseline = methods.get("maxnorm")
    head = f"{'method':<11}{'ANN %':>7}{'Ω':>7} |" + "".join(f"{'T=' + str(t):>8}" for t in shown)
    head += f" |{'steps to ANN−1':>15}{'energy':>10}{'vs maxnorm':>11}"
    lines = [head, "-" * len(head)]
    for name, r in methods.items():
        row = f"{name:<11}{r.ann_accuracy:>7.2f}{r.omega:>7.2f} |" + "".join(
            f"{r.snn_accuracy[t - 1]:>8.2f}" for t in shown
        )
        steps_text = f"{r.steps_to_target}" if r.steps_to_target is not None else f">{T}"
        energy_text = f"{r.energy_to_target:.0f}" if r.energy_to_target is not None else "—"
        ratio = (
            f"{r.energy_to_target / baseline.energy_to_target:.3f}×"
            if baseline and r.energy_to_target is not None and baseline.energy_to_target
            else "—"
        )
        lines.append(row + f" |{steps_text:>15}{energy_text:>10}{ratio:>11}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_COLORS = {"maxnorm": "tab:blue", "robustnorm": "tab:orange", "rnl": "tab:green", "rnl_ril": "tab:red"}


def plot_accuracy(methods: dict[str, MethodResult], path: str | Path, title: str) -> None:
    """SNN accuracy against time steps, one line per method, the ANN accuracies dashed (Fig. 6b)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in methods.items():
        steps = range(1, len(r.snn_accuracy) + 1)
        color = _COLORS.get(name)
        ax.plot(steps, r.snn_accuracy, label=f"{name} (SNN)", color=color, lw=1.8)
        ax.axhline(r.ann_accuracy, color=color, ls="--", lw=0.8)
        if r.steps_to_target is not None:
            ax.plot([r.steps_to_target], [r.snn_accuracy[r.steps_to_target - 1]], "o", color=color, ms=5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("time step t")
    ax.set_ylabel("accuracy after t steps (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title + "\n(dashed: ANN accuracy; dot: first step within 1 point of it)", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_k_curves(methods: dict[str, MethodResult], path: str | Path, title: str) -> None:
    """K(t) per layer (Eq. 7), one panel per method, log-log (Fig. 4 / 6a)."""
    plt = _pyplot()
    with_k = {name: r for name, r in methods.items() if r.k_curves}
    if not with_k:
        return
    fig, axes = plt.subplots(1, len(with_k), figsize=(4 * len(with_k), 3.8), sharey=True, squeeze=False)
    for ax, (name, r) in zip(axes[0], with_k.items()):
        cmap = plt.get_cmap("viridis", max(len(r.k_curves), 2))
        for i, (layer, curve) in enumerate(r.k_curves.items()):
            ax.plot(range(1, len(curve) + 1), curve, color=cmap(i), label=f"layer {layer}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("time step t")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("K(t) = ‖r(t) − r̂‖² / ‖r̂‖²")
    axes[0][-1].legend(fontsize=8)
    k_images = max(r.k_images for r in with_k.values())
    fig.suptitle(f"{title}; K over the first {k_images} images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_power(methods: dict[str, MethodResult], path: str | Path, title: str) -> None:
    """Power per step P(t) (Eq. 14, α = 1 J, 1 ms steps); the shaded area is the energy spent
    until each method reaches its ANN accuracy − 1 point (Fig. 7a)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in methods.items():
        power = power_per_step(r.spikes_per_step)
        steps = list(range(1, len(power) + 1))
        color = _COLORS.get(name)
        ax.plot(steps, power, color=color, lw=1.2, label=name)
        if r.steps_to_target is not None:
            ax.fill_between(steps[: r.steps_to_target], power[: r.steps_to_target], color=color, alpha=0.25)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("time step t (1 ms)")
    ax.set_ylabel("power per image (W, α = 1 J per spike)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title + "\n(shaded: energy until ANN accuracy − 1 point)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
