"""The op benchmarks on a busy machine: idle, then with busy processes beside us, ratios side by side.

    python bench/contention.py                         # IF forward and Rate Norm fwd+bwd, full and small
    python bench/contention.py --loads 0,all --seconds 3 --json out.json

A researcher's machine is rarely idle: a data loader, a second experiment or a compiler share the
cores. For each background load (``0``: idle; ``N``: N processes spinning in pure Python, each
wanting one core; ``all``: one per core this process may use) and each scale (``full``: the
benchmarks' sizes; ``small``: 64K neurons or elements, where per-call costs count), ours and the
baseline (SpikingJelly for IF, the eager reference for Rate Norm) run in alternation, call after
call, for ``--seconds`` each: both see the same load at the same moments. The medians and their
ratio are printed as one table, with the machine's thread settings (threads, cores allowed,
cgroup quota, OpenMP runtimes loaded, wait policy) and the targets of issue 12.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import benchlib

#: (group, baseline impl): the groups measured and what ours is compared with.
GROUPS = {"if-fwd-fp32": "spikingjelly", "rnl-fwd-bwd-fp32": "eager"}
#: Issue 12's targets: (group, scale, load) → least ratio baseline/ours ("all": every core busy).
TARGETS = {
    ("rnl-fwd-bwd-fp32", "small", "0"): 1.0,
    ("if-fwd-fp32", "small", "all"): 2.5,
    ("rnl-fwd-bwd-fp32", "full", "all"): 3.0,
}
#: Busy processes by kind. ``python``: a pure-Python loop, wanting exactly one core and no memory
#: bandwidth. ``torch``: another experiment, matrix products and large elementwise ops on torch's
#: default thread pool (one OpenMP thread per core, as a second training run would have).
LOADS = {
    "python": "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n",
    "torch": (
        "import time, torch\nend = time.monotonic() + {seconds}\n"
        "a, b, c = torch.randn(256, 256), torch.randn(256, 256), torch.randn(2**22)\n"
        "while time.monotonic() < end:\n    a @ b\n    c.mul_(0.999).add_(1e-3)\n"
    ),
}


@dataclass
class Row:
    group: str
    scale: str
    load: str  #: "0", a number of busy processes, or "all"
    busy: int  #: the busy processes that ran beside the measurement
    shape: tuple[int, ...]
    ours_ms: float
    baseline: str
    baseline_ms: float
    calls: int  #: calls of each, alternated

    @property
    def ratio(self) -> float:
        return self.baseline_ms / self.ours_ms


def environment() -> list[str]:
    return [
        f"machine: {platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f} at start",
        f"torch {torch.__version__}: {benchlib.threading_line()}",
    ]


class BackgroundLoad:
    """``count`` busy processes for the duration of a ``with`` block (each ends by itself too)."""

    def __init__(self, count: int, seconds: float, kind: str = "python") -> None:
        self.count, self.seconds, self.kind = count, seconds, kind
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> BackgroundLoad:
        code = LOADS[self.kind].format(seconds=self.seconds)
        self.processes = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.count)]
        if self.count:
            time.sleep(0.3 if self.kind == "python" else 3.0)  # let them start (torch imports first)
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()


def parse_loads(text: str) -> list[str]:
    loads = [part.strip() for part in text.split(",") if part.strip()]
    for load in loads:
        if load != "all" and not (load.isdigit() and int(load) <= 64):
            raise argparse.ArgumentTypeError(f"a load is 'all' or a number of busy processes (0..64), got {load!r}")
    return loads or ["0"]


def measure(loads: list[str], scales: list[str], groups: list[str], seconds: float, kind: str) -> list[Row]:
    builder = benchlib.CaseBuilder("tiny")
    cases = {}  # built once, idle: building (and priming) is not what is measured
    for scale in scales:
        builder.scale = scale
        for group in groups:
            baseline = GROUPS[group]
            try:
                cases[group, scale] = (builder.build(group, "ours", "cpu"), builder.build(group, baseline, "cpu"))
            except benchlib.Unavailable as reason:
                print(f"  skip {group} {scale}: {baseline} unavailable ({reason})", flush=True)
    rows = []
    for load in loads:
        busy = benchlib.usable_cores() if load == "all" else int(load)
        with BackgroundLoad(busy, seconds * len(cases) * 3 + 60, kind):
            for (group, scale), (ours, base) in cases.items():
                ours_s, base_s, calls = benchlib.time_alternating(ours.run, base.run, seconds)
                row = Row(group, scale, load, busy, ours.shape, ours_s * 1e3, base.impl, base_s * 1e3, calls)
                rows.append(row)
                print(
                    f"  load {load:>3} ({busy} busy) {group:18s} {scale:5s}: ours {row.ours_ms:8.3f} ms, "
                    f"{row.baseline} {row.baseline_ms:8.3f} ms, {row.ratio:5.2f}x  ({calls} calls each)",
                    flush=True,
                )
    return rows


def table(rows: list[Row], loads: list[str]) -> list[str]:
    """One line per (group, scale): ours ms and the ratio under each load."""
    header = ["op", "scale", "shape", *[f"load {load}: ours ms (x baseline)" for load in loads]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = list(dict.fromkeys((row.group, row.scale) for row in rows))
    for group, scale in keys:
        cells = []
        by_load = {row.load: row for row in rows if (row.group, row.scale) == (group, scale)}
        for load in loads:
            row = by_load.get(load)
            cells.append("-" if row is None else f"{row.ours_ms:.3f} ({row.ratio:.2f}x {row.baseline})")
        shape = next(row.shape for row in rows if (row.group, row.scale) == (group, scale))
        lines.append(f"| {group} | {scale} | {list(shape)} | " + " | ".join(cells) + " |")
    return lines


def target_lines(rows: list[Row]) -> list[str]:
    lines = []
    for (group, scale, load), least in TARGETS.items():
        for row in rows:
            if (row.group, row.scale, row.load) == (group, scale, load):
                verdict = "ok" if row.ratio >= least else "MISS"
                lines.append(
                    f"- {group} {scale}, load {load}: ours >= {least}x {row.baseline}: {row.ratio:.2f}x {verdict}"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--loads",
        type=parse_loads,
        default=parse_loads("0,1,all"),
        help="comma-separated background loads: busy processes, or 'all' (default 0,1,all)",
    )
    parser.add_argument("--scales", default="full,small", help="full, small, tiny, comma-separated")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument(
        "--load-kind",
        choices=sorted(LOADS),
        default="python",
        help="what each busy process runs: python (a CPU loop) or torch (another experiment)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="alternated calls per measurement (default 2)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)  # fmt: skip
    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if bad := [s for s in scales if s not in benchlib.SCALES]:
        parser.error(f"--scales: unknown {bad}; choose from {benchlib.SCALES}")
    if bad := [g for g in groups if g not in GROUPS]:
        parser.error(f"--groups: unknown {bad}; choose from {list(GROUPS)}")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")

    print("\n".join(environment()), flush=True)
    print(f"background load: {args.load_kind} processes", flush=True)
    rows = measure(args.loads, scales, groups, args.seconds, args.load_kind)
    print("\n" + "\n".join(table(rows, args.loads)))
    print("\n(x baseline) = baseline time / ours time, alternated calls under the same load: above 1, ours is faster.")
    if targets := target_lines(rows):
        print("Targets (issue 12, printed, not asserted):\n" + "\n".join(targets))
    if args.json:
        args.json.write_text(json.dumps([asdict(row) | {"ratio": row.ratio} for row in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
