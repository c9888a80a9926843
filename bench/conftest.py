"""pytest-benchmark plumbing: runs each case, keeps its figures, prints the ratio tables at the end.

``pytest bench/ --benchmark-only`` (``RNL_FAST_BENCH_SCALE=small`` for a quick run). Each case is
timed by pytest-benchmark's pedantic mode, so ``--benchmark-json`` holds the times, and the
figures this file adds (bytes moved, GB/s, peak memory) are in each benchmark's ``extra_info``.
At the end of the session one table per group gives the ratios measured side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import benchlib

SCALE = benchlib.bench_scale()
#: Seconds of timed rounds per case (at least 2 rounds): slow eager baselines get few rounds.
ROUND_BUDGET_S = {"cpu": {"full": 3.0, "small": 1.0, "tiny": 0.2}[SCALE], "cuda": 1.0}
RESULTS = benchlib.Results()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return benchlib.environment_lines(SCALE)


@pytest.fixture
def bench(benchmark: Any) -> Callable[[str, str, str], None]:
    """``bench(device, group, impl)``: measures one case and keeps its figures for the tables."""

    def run_case(device: str, group: str, impl: str) -> None:
        def time_rounds(run: Callable[[], Any], rounds: int) -> float | None:
            benchmark.pedantic(benchlib.synced(run, device), rounds=rounds, iterations=1, warmup_rounds=0)
            stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
            return stats.stats.median if stats is not None else None

        benchmark.group = f"{group} [{device}]"
        try:
            case = benchlib.build_case(group, impl, device, SCALE)
            measurement = benchlib.measure_case(case, time_rounds, ROUND_BUDGET_S[device])
        except benchlib.Unavailable as reason:
            RESULTS.measurements.append(benchlib.skipped(benchlib.GROUPS_BY_NAME[group], impl, device, str(reason)))
            pytest.skip(str(reason))
        RESULTS.measurements.append(measurement)
        benchmark.extra_info.update(
            impl=impl,
            device=device,
            scale=SCALE,
            shape=list(measurement.shape),
            dtype=measurement.dtype,
            bytes_moved=measurement.bytes_moved,
            gbps=measurement.gbps,
            peak_bytes=measurement.peak_bytes,
            thp=benchlib.thp_status() if device == "cpu" else None,
        )

    return run_case


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables, so that ours end the output
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not any(m.median_s for m in RESULTS.measurements):
        return
    for device in dict.fromkeys(m.device for m in RESULTS.measurements):
        RESULTS.copy_gbps[device] = benchlib.copy_bandwidth_gbps(device, benchlib.copy_bytes_for(device, SCALE))
    copies = ", ".join(f"{device} {gbps:.1f} GB/s" for device, gbps in RESULTS.copy_gbps.items())
    write = terminalreporter.write_line
    terminalreporter.section("rnl_fast benchmarks: ratios measured side by side in this run")
    for line in benchlib.environment_lines(SCALE):
        write(line)
    write(f"copy bandwidth (copy_ into a warm buffer, read + write): {copies}")
    write("t / t_ours: above 1, ours is faster. GB/s: on the bytes the op must move (clone: read + write of x).")
    write("peak MB: peak memory growth during one call (CPU: resident set; CUDA: max_memory_allocated).")
    for line in benchlib.group_tables(RESULTS.measurements, RESULTS.copy_gbps):
        write(line)
