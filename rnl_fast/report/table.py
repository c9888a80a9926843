"""The paper's Table 2 as text, and the verdict in plain words: which method got there first, on
how many spikes, and whether that agrees with the paper."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from ..energy import energy_to_accuracy
from .results import TARGET_MARGIN, MethodResult

#: The latencies of the table (the paper's Table 2 starts at 16; MNIST converges faster).
TABLE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: An ANN this close to chance (points above it) is not trained: its methods are not ranked.
NEAR_CHANCE_POINTS = 10.0
#: An ANN this far below the best ANN of the comparison (points) is not ranked either: its
#: latency would say more about its training than about its conversion.
FAR_BELOW_POINTS = 5.0


def paper_table(
    methods: Mapping[str, MethodResult], steps: tuple[int, ...] = TABLE_STEPS, unranked: Collection[str] = ()
) -> str:
    """Table 2 of the paper (accuracy after T steps) with the ANN accuracy, Ω, and the steps and
    spikes per image each method needs to reach its ANN accuracy − 1 point (the energy of paper
    Eq. 14 at α = 1 J per spike), also relative to MaxNorm's. Methods in ``unranked`` (an unfit
    ANN, :func:`unfit_anns`) get no steps or spikes figure."""
    T = max(len(r.snn_accuracy) for r in methods.values())
    shown = [t for t in steps if t <= T]
    if T not in shown:
        shown.append(T)
    baseline = methods.get("maxnorm") if "maxnorm" not in unranked else None
    width = max(11, *(len(name) + 1 for name in methods))
    head = f"{'method':<{width}}{'ANN %':>7}{'Ω':>7} |" + "".join(f"{'T=' + str(t):>8}" for t in shown)
    head += f" |{'steps to ANN−1':>15}{'spikes/image':>13}{'vs maxnorm':>11}"
    lines = [head, "-" * len(head)]
    for name, r in methods.items():
        row = f"{name:<{width}}{r.ann_accuracy:>7.2f}{r.omega:>7.2f} |" + "".join(
            f"{r.snn_accuracy[t - 1]:>8.2f}" for t in shown
        )
        steps_text = f"{r.steps_to_target}" if r.steps_to_target is not None else f">{T}"
        energy_text = f"{r.energy_to_target:.0f}" if r.energy_to_target is not None else "—"
        ratio = (
            f"{r.energy_to_target / baseline.energy_to_target:.3f}×"
            if baseline and r.energy_to_target is not None and baseline.energy_to_target
            else "—"
        )
        if name in unranked:
            steps_text, energy_text, ratio = "not ranked", "—", "—"
        lines.append(row + f" |{steps_text:>15}{energy_text:>13}{ratio:>11}")
    return "\n".join(lines)


def unfit_anns(methods: Mapping[str, MethodResult], chance: float) -> dict[str, str]:
    """Methods whose ANN is near chance or far below the best ANN, with the reason in words."""
    best = max(r.ann_accuracy for r in methods.values())
    reasons = {}
    for name, r in methods.items():
        if r.ann_accuracy < chance + NEAR_CHANCE_POINTS:
            reasons[name] = f"its ANN is at {r.ann_accuracy:.1f}%, near chance ({chance:.0f}%)"
        elif r.ann_accuracy < best - FAR_BELOW_POINTS:
            reasons[name] = f"its ANN is at {r.ann_accuracy:.1f}%, {best - r.ann_accuracy:.1f} points below the best"
    return reasons


def verdict(methods: Mapping[str, MethodResult], chance: float = 10.0) -> list[str]:
    """What the table says, in sentences: unfit ANNs first (their methods are not ranked), then
    the methods in the order they reached their ANN accuracy − 1 point, the spikes they spent
    until then, whether the paper's claim holds here, the fastest of all when latency variants
    ran too, and each conversion loss.

    The order, the common target and the paper's claim are about the paper's methods (the
    results that are not latency variants, :attr:`MethodResult.is_variant`), so that variants
    never change what is said about the paper; with only variants they are about those."""
    T = max(len(r.snn_accuracy) for r in methods.values())
    unfit = unfit_anns(methods, chance)
    lines = [f"{name} is not ranked: {reason}." for name, reason in unfit.items()]
    every = {name: r for name, r in methods.items() if name not in unfit}
    ranked = {name: r for name, r in every.items() if not r.is_variant} or every
    if not every:
        return lines
    order = sorted(ranked, key=lambda name: (ranked[name].steps_to_target or T + 1, name))
    reached = [name for name in order if ranked[name].steps_to_target is not None]
    missed = [name for name in order if ranked[name].steps_to_target is None]
    target = f"its ANN accuracy − {TARGET_MARGIN:g} point"
    if reached:
        first, *rest = reached
        steps = ", ".join(f"{name} ({ranked[name].steps_to_target})" for name in rest)
        lines.append(
            f"First to {target}: {first}, after {ranked[first].steps_to_target} steps"
            + (f"; then {steps}." if rest else ".")
        )
        lines.append(
            "Spikes per image until then (energy at α = 1 J per spike): "
            + ", ".join(f"{name} {ranked[name].energy_to_target:,.0f}" for name in reached)
            + "."
        )
    if missed:
        lines.append(f"Not within {T} steps: {', '.join(missed)}.")
    common = min(r.ann_accuracy for r in ranked.values()) - TARGET_MARGIN
    lines.append(
        f"To one common target ({common:.2f}%, the lowest ranked ANN − {TARGET_MARGIN:g} point, so that a weaker ANN "
        "gains no easier target): " + "; ".join(f"{name} {_steps_to(ranked[name], common, T)}" for name in order) + "."
    )
    lines.append(_paper_claim(ranked, T))
    if len(every) > len(ranked):
        lines.append(_fastest_of_all(every, ranked, T))
    lines.append(
        f"Conversion loss at T = {T} (ANN − SNN, points): "
        + ", ".join(f"{name} {r.conversion_loss:+.2f}" for name, r in methods.items())
        + "."
    )
    return lines


_FASTEST = "Fastest of all, the later methods (QCFS) and latency variants included:"


def _fastest_of_all(every: Mapping[str, MethodResult], paper: Mapping[str, MethodResult], T: int) -> str:
    """One sentence: which ranked method, later methods and latency variants included, reached its
    ANN accuracy − 1 point in the fewest steps (fewer spikes break a tie), beside the paper's fastest."""

    def key(name: str) -> tuple:
        r = every[name]
        return (r.steps_to_target or T + 1, r.energy_to_target or float("inf"), name)

    best = min(every, key=key)
    paper_best = min(paper, key=key)
    if every[best].steps_to_target is None:
        return f"{_FASTEST} none reached its ANN accuracy − {TARGET_MARGIN:g} point."
    r = every[best]
    paper_steps = paper[paper_best].steps_to_target
    paper_text = f"{paper_steps} steps" if paper_steps is not None else f"not within {T} steps"
    return (
        f"{_FASTEST} {best}, {r.steps_to_target} steps to its ANN accuracy − "
        f"{TARGET_MARGIN:g} point ({r.energy_to_target:,.0f} spikes per image); the paper's fastest, "
        f"{paper_best}: {paper_text}."
    )


def _steps_to(result: MethodResult, target: float, T: int) -> str:
    """``"N steps, S spikes"`` until ``result`` first reaches ``target`` percent, or ``">T steps"``."""
    reached = energy_to_accuracy(result.snn_accuracy, result.spikes_per_step, target)
    if reached.steps is None:
        return f">{T} steps"
    return f"{reached.steps} steps, {reached.energy:,.0f} spikes"


def _paper_claim(ranked: Mapping[str, MethodResult], T: int) -> str:
    """Whether RNL+RIL reached its target in fewer steps than MaxNorm and RobustNorm and on fewer
    spikes than MaxNorm (Ding et al. §3.3–3.4), among the ranked methods."""
    needed = ("rnl_ril", "maxnorm", "robustnorm")
    if any(name not in ranked for name in needed):
        return "The paper's claim cannot be checked here: it needs rnl_ril, maxnorm and robustnorm, all ranked."

    def steps(name: str) -> int:
        return ranked[name].steps_to_target or T + 1

    ours, maxnorm = ranked["rnl_ril"], ranked["maxnorm"]
    failures = [
        f"{other} reached its target in {steps(other)} steps, rnl_ril in {steps('rnl_ril')}"
        for other in ("maxnorm", "robustnorm")
        if steps("rnl_ril") >= steps(other)
    ]
    if ours.energy_to_target is None or (
        maxnorm.energy_to_target is not None and ours.energy_to_target >= maxnorm.energy_to_target
    ):
        spent = "never got there" if ours.energy_to_target is None else f"spent {ours.energy_to_target:,.0f}"
        failures.append(f"rnl_ril {spent} spikes per image against maxnorm's {maxnorm.energy_to_target or 0:,.0f}")
    claim = "RNL+RIL reaches its accuracy in fewer steps than MaxNorm and RobustNorm, on less energy than MaxNorm"
    if not failures:
        return f"This agrees with the paper's claim ({claim})." + _common_target_caveat(ranked, T)
    return f"This does not agree with the paper's claim ({claim}): " + "; ".join(failures) + "."


def _common_target_caveat(ranked: Mapping[str, MethodResult], T: int) -> str:
    """When RNL+RIL wins on its own target but not to the common one (its weaker ANN gave it an
    easier target), a sentence that says so; else ``""``."""
    common = min(r.ann_accuracy for r in ranked.values()) - TARGET_MARGIN

    def steps(name: str) -> int:
        reached = energy_to_accuracy(ranked[name].snn_accuracy, ranked[name].spikes_per_step, common)
        return reached.steps or T + 1

    faster = [f"{other} {steps(other)}" for other in ("maxnorm", "robustnorm") if steps(other) <= steps("rnl_ril")]
    if not faster:
        return ""
    return (
        f" But to the common target ({common:.2f}%) it does not hold: rnl_ril {steps('rnl_ril')} steps, "
        + ", ".join(faster)
        + " (rnl_ril's weaker ANN gave it an easier target)."
    )
