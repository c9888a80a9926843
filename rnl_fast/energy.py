"""The energy model of paper §3.4 (Cao et al. 2015): spikes cost energy, steps cost time.

Each spike costs α joules and one step lasts ``dt`` seconds (1 ms in the paper), so the power at
step t is ``P(t) = spikes(t)/dt · α`` watts (Eq. 14). What matters in practice is the energy spent
until the SNN reaches a usable accuracy: :func:`energy_to_accuracy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Energy of one spike in joules (a unit value: ratios between methods do not depend on it).
ALPHA = 1.0
#: Duration of one time step in seconds (paper: 1 ms).
STEP_SECONDS = 1e-3


def power_per_step(spikes_per_step: Sequence[float], alpha: float = ALPHA, dt: float = STEP_SECONDS) -> list[float]:
    """P(t) in watts for each step: ``spikes(t) / dt · alpha`` (spikes per image per step)."""
    if alpha <= 0 or dt <= 0:
        raise ValueError(f"alpha and dt must be positive, got alpha={alpha}, dt={dt}")
    return [s / dt * alpha for s in spikes_per_step]


#: Slack (percentage points) of the comparison with a target: accuracies are counts·100/images
#: and targets ``ann − 1``, and 64.9 − 1 is 63.900000000000006 in floating point, which 639 correct
#: of 1000 (63.9) must reach. Far below the 1e-4 points one image of a million is worth.
TARGET_SLACK = 1e-9


def steps_to_accuracy(accuracy: Sequence[float], target: float) -> int | None:
    """The first step t (1-based) whose accuracy is ≥ target (up to :data:`TARGET_SLACK`), or
    None if it never gets there."""
    for t, acc in enumerate(accuracy, start=1):
        if acc >= target - TARGET_SLACK:
            return t
    return None


@dataclass(frozen=True)
class EnergyToTarget:
    """Steps and energy (joules per image, with α = :data:`ALPHA`) to reach a target accuracy."""

    target: float  #: percent
    steps: int | None  #: None: not reached within the simulated steps
    energy: float | None  #: Σ_{t ≤ steps} spikes(t)·α, None when not reached


def energy_to_accuracy(
    accuracy: Sequence[float], spikes_per_step: Sequence[float], target: float, alpha: float = ALPHA
) -> EnergyToTarget:
    """Energy spent until the accuracy first reaches ``target`` (the dark area of Fig. 7a)."""
    if len(accuracy) != len(spikes_per_step):
        raise ValueError(
            f"accuracy ({len(accuracy)} steps) and spikes_per_step ({len(spikes_per_step)}) differ in length"
        )
    steps = steps_to_accuracy(accuracy, target)
    if steps is None:
        return EnergyToTarget(target, None, None)
    return EnergyToTarget(target, steps, alpha * sum(spikes_per_step[:steps]))


def energy_ratio(ours: EnergyToTarget, baseline: EnergyToTarget) -> float | None:
    """ours / baseline energy to the same target (paper: 0.265 for RNL+RIL vs MaxNorm at 90%)."""
    if ours.energy is None or baseline.energy is None or baseline.energy == 0:
        return None
    return ours.energy / baseline.energy
