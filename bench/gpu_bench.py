"""The GPU benchmarks of ``bench/gpu_check.sh``: every case on CUDA, the copy bandwidth, one table.

    python bench/gpu_bench.py [--log-dir DIR] [--budget-s SECONDS]
    python bench/gpu_bench.py --cpu-dry-run     # the same code paths on CPU at tiny sizes
    python bench/gpu_bench.py --only 'if-|e2e-vgg16'   # the groups whose name matches a regex

Runs the cases of ``benchlib`` (the ones ``pytest bench/`` runs), timed by
``triton.testing.do_bench`` (CUDA events; a host clock with ``--cpu-dry-run``):
IF at T = 32 and 16M neurons, Rate Norm at [256, 64, 56, 56] (plain, channel-wise, quantized,
both) and QCFS (L = 8) on the same x, ours beside x.clone(), the eager reference, SpikingJelly 2.0's Triton backend and
torch.compile of the reference (IF forward + backward: also ours with the persistent backward kernel, ``ours-slots``,
RNL_FAST_IF_BWD=slots); then end to end (cnn7 and vgg16 converted and simulated at batch
128, T = 16, 64, 256, beside one ANN forward and SpikingJelly's ann2snn conversion stepped T
times; the chunked long run at T = 1024) and one profiled call of ours (cnn7, T = 64); the
time-to-accuracy group is CPU only (skipped on CUDA, run by ``--cpu-dry-run``). The compile
cases come last and no baseline starts after ``--budget-s`` seconds, so the script fits its time
slot; on SIGTERM (``timeout``) it stops and still prints the table of what it measured.

stdout: one progress line per case, then the final table and the targets. ``--log-dir`` also
receives gpu_bench.md (the per-group tables and the final table) and gpu_bench.json.
Exit status: 0, or 1 when one of *ours* failed (a failing baseline is a note in the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

import torch

import benchlib
from rnl_fast.simulation import reuse_freed_memory

#: Seconds of timed rounds per case: CUDA calls take milliseconds, so this buys ~50 rounds.
ROUND_BUDGET_S = {"cuda": 1.0, "cpu": 0.2}
#: Note of a case that raised (a failing baseline is reported; a failing ours fails the script).
ERROR = "ERROR"


class _Stop(Exception):
    """SIGTERM arrived (the caller's time limit): stop measuring and report."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def _release(device: str) -> None:
    """Frees the previous case's tensors so that peak-memory figures start from a clean device."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_cases(
    device: str,
    cases: benchlib.CaseBuilder,
    budget_s: float,
    results: benchlib.Results,
    log: list[str],
    groups: tuple[benchlib.Group, ...] = benchlib.GROUPS,
) -> None:
    """Measures every case of ``groups`` into ``results`` (in place: a SIGTERM keeps what was measured)."""
    deadline = time.monotonic() + budget_s
    timer = benchlib.device_timer(device)
    # Compile cases last: each costs tens of seconds of compilation before its first figure.
    order = [(g, i) for g in groups for i in g.impls if i != "compile"]
    order += [(g, "compile") for g in groups if "compile" in g.impls]
    for group, impl in order:
        label = f"{group.name} [{device}] {impl}"
        if impl != "ours" and time.monotonic() > deadline:
            results.add(benchlib.skipped(group, impl, device, "time budget spent"))
            print(f"  skip {label}: time budget spent", flush=True)
            continue
        if group.op in ("e2e", "tta") and device == "cpu":
            # What conftest.py does before its end-to-end cases (see _before_e2e there). Process-wide
            # and for good: the compile cases, last, run under it, as when the simulator applied it.
            reuse_freed_memory()
        start = time.monotonic()
        case = None
        try:
            case = cases.build(group.name, impl, device)
            m = benchlib.measure_case(case, timer, ROUND_BUDGET_S[device])
        except benchlib.Unavailable as reason:
            m = benchlib.skipped(group, impl, device, str(reason))
        except _Stop:
            raise
        except Exception as error:  # one broken case must not hide the others' figures
            log += ["", f"ERROR in {label}:", "```", traceback.format_exc(), "```"]
            first_line = (str(error).strip().splitlines() or [""])[0][:120]
            m = benchlib.skipped(group, impl, device, f"{ERROR} {type(error).__name__}: {first_line}")
        results.add(m, case)
        case = None
        _release(device)
        if m.median_s is None:
            figure = m.note
        else:
            figure = f"{benchlib.ms_text(m.median_s)} ms, peak {benchlib.mb_text(m.peak_bytes)} MB"
        print(f"  {label}: {figure}  ({time.monotonic() - start:.0f} s)", flush=True)


def profile_lines(device: str, cases: benchlib.CaseBuilder, log: list[str]) -> list[str]:
    """The breakdown by op of one call of ours end to end (``benchlib.profile_e2e``); a failure
    is a line of the report (with its traceback in the log), not an error of the script."""
    start = time.monotonic()
    try:
        lines = benchlib.profile_e2e(cases, benchlib.E2E_PROFILE_GROUP, device)
    except _Stop:
        raise
    except Exception as error:
        log += ["", f"ERROR in the profile of {benchlib.E2E_PROFILE_GROUP}:", "```", traceback.format_exc(), "```"]
        lines = [f"profile of ours on {benchlib.E2E_PROFILE_GROUP} failed: {type(error).__name__}: {error}"[:200]]
    finally:
        _release(device)
    print(f"  profile {benchlib.E2E_PROFILE_GROUP} [{device}] ours  ({time.monotonic() - start:.0f} s)", flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the same code on CPU at tiny sizes")
    parser.add_argument("--log-dir", type=Path, help="where gpu_bench.md and gpu_bench.json go")
    parser.add_argument("--budget-s", type=float, default=180.0, help="no baseline starts after this many seconds")
    parser.add_argument("--only", metavar="REGEX", help="run only the groups whose name matches (re.search)")
    args = parser.parse_args(argv)
    groups = benchlib.GROUPS
    if args.only is not None:
        try:
            pattern = re.compile(args.only)
        except re.error as error:
            parser.error(f"--only: not a regular expression: {error}")
        groups = tuple(group for group in groups if pattern.search(group.name))
        if not groups:
            parser.error(f"--only {args.only!r} matches no group; groups: {', '.join(g.name for g in benchlib.GROUPS)}")

    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("ERROR: torch sees no CUDA device; on a CPU machine use --cpu-dry-run", file=sys.stderr)
        return 2
    scale = "tiny" if args.cpu_dry_run else benchlib.bench_scale()
    signal.signal(signal.SIGTERM, _on_sigterm)

    log = ["# rnl_fast GPU benchmarks", "", *benchlib.environment_lines(scale)]
    print("\n".join(log[2:]), flush=True)
    results = benchlib.Results()
    cases = benchlib.CaseBuilder(scale)
    profile: list[str] = []
    try:
        copy_bytes = benchlib.copy_bytes_for(device, scale)
        results.copy_gbps[device] = benchlib.copy_bandwidth_gbps(device, copy_bytes)
        print(
            f"copy bandwidth ({device}, copy_ of {copy_bytes / 2**20:.0f} MiB, read + write): "
            f"{results.copy_gbps[device]:.1f} GB/s",
            flush=True,
        )
        run_cases(device, cases, args.budget_s, results, log, groups)
        if any(group.name == benchlib.E2E_PROFILE_GROUP for group in groups):
            profile = profile_lines(device, cases, log)
    except _Stop:
        print("stopped by SIGTERM (time limit): reporting what was measured", flush=True)

    final = benchlib.summary_table(results)
    e2e = benchlib.e2e_summary(results)
    if e2e:
        final += ["", "End to end (a converted network simulated over T steps, same images for every impl):", *e2e]
    if profile:
        final += ["", "Where the time goes (torch.profiler):", *profile]
    log += ["", "## Per group", *benchlib.group_tables(results), "", "## Summary", "", *final]
    print("\n" + "\n".join(final), flush=True)
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        (args.log_dir / "gpu_bench.md").write_text("\n".join(log) + "\n")
        records = [dataclasses.asdict(m) | {"gbps": m.gbps} for m in results.measurements]
        summary = {"copy_gbps": results.copy_gbps, "cases": records}
        (args.log_dir / "gpu_bench.json").write_text(json.dumps(summary, indent=1))
        print(f"\nlogs: {args.log_dir}/gpu_bench.md, gpu_bench.json")
    return 1 if any(m.impl == "ours" and m.note.startswith(ERROR) for m in results.measurements) else 0


if __name__ == "__main__":
    sys.exit(main())
