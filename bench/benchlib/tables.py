"""The printed tables of a run: one per (device, group), the op summary, the end-to-end summary and
the end-to-end agreement checks; each ends with the targets it covers.

Markdown tables padded so that they also read as plain text. The figures are the ratios measured
side by side in one run: absolute times on a shared machine are noise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor

from .groups import E2E_LONG_IMPLS, GROUPS, Group
from .measure import Measurement, Results, mb_text, ms_text
from .targets import evaluate_target, targets_of
from .tta import CONVERSION_TEXT


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table, columns padded so that it also reads as plain text."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)]


def _shape_text(rows: dict[str, Measurement]) -> str:
    """The input of a group: the shape and dtype of x in its first measured row."""
    m = next((m for m in rows.values() if m.shape), None)
    return "-" if m is None else f"x [{', '.join(map(str, m.shape))}] {m.dtype}"


def _by_group(measurements: Sequence[Measurement]) -> Iterator[tuple[str, Group, dict[str, Measurement]]]:
    """(device, group, {impl: measurement}) in device, then GROUPS order."""
    for device in dict.fromkeys(m.device for m in measurements):
        for group in GROUPS:
            rows = {m.impl: m for m in measurements if m.device == device and m.group == group.name}
            if rows:
                yield device, group, rows


def _ratio(m: Measurement | None, unit: Measurement | None, digits: int) -> str:
    """``m``'s time over ``unit``'s, or "-" when either is missing."""
    if not (m and m.median_s and unit and unit.median_s):
        return "-"
    return f"{m.median_s / unit.median_s:.{digits}f}"


def _time_versus(m: Measurement | None, unit: Measurement | None, digits: int) -> str:
    """A summary cell: ``m``'s time in ms and, in brackets, its multiple of ``unit``'s time."""
    if m is None:
        return "-"
    if not m.median_s:
        return f"n/a ({m.note[:40]})"
    ratio = _ratio(m, unit, digits)
    return ms_text(m.median_s) + ("" if ratio == "-" else f" ({ratio}x)")


def _whole_group_skipped(rows: dict[str, Measurement]) -> str | None:
    """The one note of a group none of whose impls ran here (e.g. "CUDA only"), else None."""
    notes = {m.note for m in rows.values()}
    return notes.pop() if not any(m.median_s for m in rows.values()) and len(notes) == 1 else None


def _target_lines(
    prefix: str, group: Group, device: str, rows: dict[str, Measurement], copy: float | None
) -> list[str]:
    return [f"{prefix}{evaluate_target(t, rows, copy)}" for t in targets_of(group.name, device)]


def _op_group_table(device: str, group: Group, rows: dict[str, Measurement], copy: float | None) -> list[str]:
    ours = rows.get("ours")
    table = []
    for impl in (impl for impl in group.impls if impl in rows):
        m = rows[impl]
        table.append(
            [
                impl,
                ms_text(m.median_s),
                _ratio(m, ours, 2),
                "-" if m.gbps is None else f"{m.gbps:.1f}",
                "-" if not (m.gbps and copy) else f"{m.gbps / copy:.0%}",
                mb_text(m.peak_bytes),
                m.rounds or "-",
                m.note,
            ]
        )
    header = ["impl", "median ms", "t / t_ours", "GB/s", "% copy", "peak MB", "rounds", "note"]
    return [
        "",
        f"### {group.name} [{device}]: {group.title}; {_shape_text(rows)}",
        *format_table(header, table),
        *_target_lines("- target: ", group, device, rows, copy),
    ]


def _e2e_group_table(device: str, group: Group, rows: dict[str, Measurement]) -> list[str]:
    skip = _whole_group_skipped(rows)
    if skip is not None:
        return ["", f"### {group.name} [{device}]: {group.title}: skipped: {skip}"]
    ours, ann = rows.get("ours"), rows.get("ann")
    table = []
    for impl in (impl for impl in group.impls if impl in rows):
        m = rows[impl]
        table.append(
            [
                impl,
                "1 fwd" if impl == "ann" else m.steps or "-",
                m.chunk or "-",
                ms_text(m.median_s),
                "-" if not (m.median_s and m.steps and impl != "ann") else ms_text(m.median_s / m.steps),
                _ratio(m, ours, 2),
                _ratio(m, ann, 1),
                mb_text(m.peak_bytes),
                m.rounds or "-",
                m.note,
            ]
        )
    header = ["impl", "T", "chunk", "median ms", "ms / step", "t / t_ours", "x ANN fwd", "peak MB", "rounds", "note"]
    return [
        "",
        f"### {group.name} [{device}]: {group.title}; {_shape_text(rows)}",
        *format_table(header, table),
        *_target_lines("- target: ", group, device, rows, None),
    ]


def _tta_group_table(device: str, group: Group, rows: dict[str, Measurement], results: Results) -> list[str]:
    """Time to accuracy: per impl its steps to ANN − 1, the accuracy there, the time of a run of
    that many steps over all the test images, per step and in all, and SpikingJelly's total time
    over the impl's."""
    skip = _whole_group_skipped(rows)
    if skip is not None:
        return ["", f"### {group.name} [{device}]: {group.title}: skipped: {skip}"]
    found = {
        impl: results.time_to_accuracy[(group.name, device, impl)]
        for impl in rows
        if (group.name, device, impl) in results.time_to_accuracy
    }
    sj, ann = rows.get("spikingjelly"), rows.get("ann")
    any_search = next(iter(found.values()))[0] if found else None
    table = []
    for impl in (impl for impl in group.impls if impl in rows):
        m = rows[impl]
        search, timed_correct = found.get(impl, (None, None))
        if search is not None and search.steps is not None:
            accuracy = f"{search.snn_accuracy:.1f}"
        elif impl == "ann" and any_search is not None:
            accuracy = f"{any_search.ann_accuracy:.1f}"
        else:
            accuracy = "-"
        notes = [m.note] if m.note else []
        if search is not None and timed_correct is not None and timed_correct != search.snn_correct:
            notes.append(f"the timed run scored {100 * timed_correct / search.images:.1f}%")
        table.append(
            [
                impl,
                CONVERSION_TEXT.get(impl, "-"),
                m.steps or "-",
                accuracy,
                "-" if not (m.median_s and m.steps) else ms_text(m.median_s / m.steps),
                ms_text(m.median_s),
                _ratio(m, ann, 1),
                _ratio(sj, m, 2),
                m.rounds or "-",
                "; ".join(notes),
            ]
        )
    header = [
        "impl",
        "conversion",
        "steps to ANN-1",
        "SNN acc %",
        "ms / step",
        "total ms",
        "x ANN",
        "t_SJ / t",
        "rounds",
        "note",
    ]
    if any_search is not None:
        images = any_search.images
        about = (
            f"{images} MNIST test images in batches of {rows[next(iter(found))].shape[0]}; ANN "
            f"{any_search.ann_accuracy:.1f}% ({any_search.ann_correct}/{images}), target >= "
            f"{100 * any_search.target_correct / images:.1f}%"
        )
    else:
        about = _shape_text(rows)
    return [
        "",
        f"### {group.name} [{device}]: {group.title}; {about}",
        *format_table(header, table),
        "total ms: one run of exactly the steps to ANN-1 over all the test images (steps search not timed);",
        "x ANN: total over one ANN forward of the same images; t_SJ / t: SpikingJelly's total over the row's.",
        *_target_lines("- target: ", group, device, rows, None),
    ]


def group_tables(results: Results) -> list[str]:
    """One table per (device, group): each impl's time, time over ours, GB/s (end to end: T, chunk,
    ms per step, multiple of one ANN forward; time to accuracy: steps to ANN − 1, accuracy, time
    per step and in all), peak memory; then the group's targets."""
    lines: list[str] = []
    for device, group, rows in _by_group(results.measurements):
        if group.op == "e2e":
            lines += _e2e_group_table(device, group, rows)
        elif group.op == "tta":
            lines += _tta_group_table(device, group, rows, results)
        else:
            lines += _op_group_table(device, group, rows, results.copy_gbps.get(device))
    return lines


def summary_table(results: Results) -> list[str]:
    """One row per (device, group): ours against every baseline; then every target (the
    end-to-end groups are in :func:`e2e_summary`, time to accuracy in :func:`group_tables`)."""
    table, targets = [], []
    for device, group, rows in _by_group(results.measurements):
        if group.op in ("e2e", "tta"):
            continue
        ours, copy = rows.get("ours"), results.copy_gbps.get(device)
        gbps = ours.gbps if ours else None
        table.append(
            [
                f"{group.name} [{device}]",
                _shape_text(rows),
                ms_text(ours.median_s) if ours else "-",
                *(_time_versus(rows.get(impl), ours, 2) for impl in ("eager", "compile", "spikingjelly", "clone")),
                "-" if gbps is None else f"{gbps:.0f}",
                "-" if not (gbps and copy) else f"{gbps / copy:.0%}",
                mb_text(ours.peak_bytes if ours else None),
                mb_text(rows["spikingjelly"].peak_bytes if "spikingjelly" in rows else None),
            ]
        )
        targets += _target_lines(f"- {group.name} [{device}] ", group, device, rows, copy)
    header = [
        "op",
        "shape",
        "ours ms",
        "eager ms (x)",
        "compile ms (x)",
        "SpikingJelly ms (x)",
        "clone ms (x)",
        "ours GB/s",
        "% copy bw",
        "peak MB ours",
        "peak MB SJ",
    ]
    return [
        *format_table(header, table),
        "",
        "(x) = baseline time / ours time: above 1, ours is faster. GB/s on the bytes the op must move.",
        "",
        "Targets (printed, not asserted):",
        *targets,
    ]


def _long_run_lines(device: str, group: Group, rows: dict[str, Measurement]) -> list[str]:
    """The chunked long run, one line per impl: T, chunk, time, time per step, peak memory."""
    lines = []
    for m in (rows[impl] for impl in group.impls if impl in rows):
        if m.median_s:
            figure = (
                f"{ms_text(m.median_s)} ms ({ms_text(m.median_s / m.steps)} ms / step), peak {mb_text(m.peak_bytes)} MB"
            )
        else:
            figure = m.note
        lines.append(f"- {group.name} [{device}] {m.impl}: T = {m.steps}, chunk {m.chunk or '-'}: {figure}")
    return lines


def e2e_summary(results: Results) -> list[str]:
    """The end-to-end figures in one table (times as multiples of one ANN forward), the long run,
    the agreement checks, and the end-to-end targets."""
    table, long_lines, targets = [], [], []
    for device, group, rows in _by_group(results.measurements):
        if group.op != "e2e":
            continue
        targets += _target_lines(f"- {group.name} [{device}] ", group, device, rows, None)
        skip = _whole_group_skipped(rows)
        if skip is not None:
            table.append([f"{group.name} [{device}]", f"skipped: {skip}", *["-"] * 7])
            continue
        if group.impls == E2E_LONG_IMPLS:
            long_lines += _long_run_lines(device, group, rows)
            continue
        ours, ann, sj = rows.get("ours"), rows.get("ann"), rows.get("spikingjelly")
        table.append(
            [
                f"{group.name} [{device}]",
                _shape_text(rows),
                ms_text(ann.median_s) if ann else "-",
                *(_time_versus(rows.get(impl), ann, 1) for impl in ("ours", "ours-rnl", "spikingjelly")),
                _ratio(sj, ours, 2),
                mb_text(ours.peak_bytes if ours else None),
                mb_text(sj.peak_bytes if sj else None),
            ]
        )
    header = [
        "run",
        "x",
        "ANN fwd ms",
        "ours ms (x ANN)",
        "ours-rnl ms (x ANN)",
        "SJ ms (x ANN)",
        "SJ / ours",
        "peak MB ours",
        "peak MB SJ",
    ]
    lines = []
    if table:
        lines += [
            *format_table(header, table),
            "",
            "(x ANN) = time / one ANN forward on the same batch. SJ / ours: above 1, ours is faster.",
        ]
    if long_lines:
        lines += ["", "Chunked long run (cnn7; ours at T = 1024 beside ours at T = 64, same batch):", *long_lines]
    checks = e2e_checks(results)
    if checks:
        lines += ["", "Agreement of the outputs (not timed; the same images and T):", *checks]
    if targets:
        lines += ["", "End-to-end targets (printed, not asserted):", *targets]
    return lines


#: The pairs of impls whose outputs the agreement checks compare, in column order.
_COMPARED = (("ours", "spikingjelly"), ("ours", "ann"), ("spikingjelly", "ann"), ("ours-bf16", "ours"))


def _centred_corr(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two [B, K] outputs, each centred per class over the batch (so that
    a bias common to all images does not count as agreement)."""
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def _argmax_agreement(outs: dict[str, Tensor], a: str, b: str) -> str:
    """Share of images on which ``a`` and ``b`` predict the same class."""
    if a not in outs or b not in outs:
        return "-"
    return f"{(outs[a].argmax(-1) == outs[b].argmax(-1)).float().mean().item():.1%}"


def _correlation(outs: dict[str, Tensor], a: str, b: str) -> str:
    return "-" if a not in outs or b not in outs else f"{_centred_corr(outs[a], outs[b]):.3f}"


def _threshold_gap(thresholds: tuple[list[float], list[float]] | None) -> str:
    """The largest relative gap between SpikingJelly's λ and ours over the neuron layers."""
    if not thresholds:
        return "-"
    ours, sj = thresholds
    if len(ours) != len(sj):
        return f"layer counts differ: {len(ours)} vs {len(sj)}"
    return f"{max(abs(s / o - 1) for o, s in zip(ours, sj)):.1%} ({len(ours)} layers)"


def e2e_checks(results: Results) -> list[str]:
    """Agreement of the outputs of the timed calls (same images, same T): argmax predictions of
    ours / SpikingJelly's / the ANN's, centred correlation of the outputs, and how far apart the
    two conversions' thresholds λ are. Printed, not asserted."""
    table = []
    for device, group, rows in _by_group(results.measurements):
        if group.op != "e2e" or "spikingjelly" not in group.impls:
            continue
        outs: dict[str, Tensor] = {}
        for impl in ("ours", "ours-bf16", "spikingjelly", "ann"):
            m, output = rows.get(impl), results.outputs.get((group.name, device, impl))
            if m and m.median_s and output is not None:
                outs[impl] = output.detach().float().cpu()
        if len(outs) < 2:
            continue
        table.append(
            [
                f"{group.name} [{device}]",
                f"B={next(iter(outs.values())).shape[0]}",
                *(_argmax_agreement(outs, a, b) for a, b in _COMPARED),
                *(_correlation(outs, a, b) for a, b in _COMPARED),
                _threshold_gap(results.thresholds.get((group.model, device))),
            ]
        )
    if not table:
        return []
    header = [
        "run",
        "batch",
        "argmax ours=SJ",
        "ours=ANN",
        "SJ=ANN",
        "bf16=ours",
        "r ours~SJ",
        "r ours~ANN",
        "r SJ~ANN",
        "r bf16~ours",
        "max |λ_SJ/λ_ours - 1|",
    ]
    return [
        *format_table(header, table),
        "",
        "argmax: share of images with the same prediction; r: correlation of the outputs (mean output over",
        "the T steps; the ANN's logits), centred per class over the batch. The outputs are the timed calls'.",
    ]
