"""pytest-benchmark plumbing: runs each case, keeps its figures, prints the ratio tables at the end.

``pytest bench/ --benchmark-only`` (``RNL_FAST_BENCH_SCALE=small`` for a quick run). Each case is
timed by pytest-benchmark's pedantic mode, so ``--benchmark-json`` holds the times, and the
figures this file adds (bytes moved, GB/s, peak memory) are in each benchmark's ``extra_info``.
At the end of the session one table per group gives the ratios measured side by side; the
end-to-end groups add a summary (times as multiples of one ANN forward), the agreement of the
outputs, and where ours spends its time (torch.profiler).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import benchlib
from rnl_fast.simulation import reuse_freed_memory

SCALE = benchlib.bench_scale()
#: Seconds of timed rounds per case (at least 2 rounds): slow eager baselines get few rounds.
ROUND_BUDGET_S = {"cpu": {"full": 3.0, "small": 1.0, "tiny": 0.2}[SCALE], "cuda": 1.0}
RESULTS = benchlib.Results()
CASES = benchlib.CaseBuilder(SCALE)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return benchlib.environment_lines(SCALE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end benchmarks run last: before the first of them on CPU, :func:`_before_e2e`
    tunes glibc's allocator for the whole process, which would take the page faults out of the
    op benchmarks' fresh outputs (and out of ``clone``)."""
    items.sort(key=lambda item: item.path.name == "test_bench_e2e.py")  # stable: the rest keep their order


def _before_e2e(device: str) -> None:
    """Lets glibc keep freed blocks for reuse instead of unmapping them, before the CPU end-to-end cases.

    A simulation allocates the same large activations chunk after chunk: without this, every chunk
    pays the page faults of all its outputs again. The CLI opts in for its runs
    (``rnl_fast.simulation.reuse_freed_memory``), and so does the bench, so that ours is timed as
    the CLI runs it and every impl of a group under the same setting. The setting is process-wide
    and stays, hence the end-to-end cases run last (see above). CPU only (CUDA tensors do not come
    from glibc); idempotent, so each end-to-end case may ask for it.
    """
    if device == "cpu":
        reuse_freed_memory()


def _time_in_alternation(measurement: benchlib.Measurement, case: Any) -> None:
    """Times the case and each baseline its targets want alternated with (``Target.alternate``),
    call after call, for the round budget; the figures go to ``measurement.alternated``."""
    for baseline in benchlib.alternated_baselines(measurement.group, measurement.device, measurement.impl):
        try:
            other = CASES.build(measurement.group, baseline, measurement.device)
        except benchlib.Unavailable:
            continue  # the target says n/a, as when the baseline's own test skips
        budget = ROUND_BUDGET_S[measurement.device]
        measurement.alternated[baseline] = benchlib.time_alternating(case.run, other.run, budget)


@pytest.fixture
def bench(benchmark: Any) -> Callable[[str, str, str], None]:
    """``bench(device, group, impl)``: measures one case and keeps its figures for the tables."""

    def run_case(device: str, group: str, impl: str) -> None:
        def time_rounds(run: Callable[[], Any], rounds: int, call_s: float) -> tuple[float | None, int]:
            benchmark.pedantic(benchlib.synced(run, device), rounds=rounds, iterations=1, warmup_rounds=0)
            stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
            return (stats.stats.median if stats is not None else None), rounds

        benchmark.group = f"{group} [{device}]"
        if benchlib.GROUPS_BY_NAME[group].op in ("e2e", "tta"):  # time to accuracy is end to end too
            _before_e2e(device)
        try:
            case = CASES.build(group, impl, device)
            measurement = benchlib.measure_case(case, time_rounds, ROUND_BUDGET_S[device])
            if measurement.median_s:  # not under --benchmark-disable
                _time_in_alternation(measurement, case)
        except benchlib.Unavailable as reason:
            RESULTS.add(benchlib.skipped(benchlib.GROUPS_BY_NAME[group], impl, device, str(reason)))
            pytest.skip(str(reason))
        RESULTS.add(measurement, case)
        benchmark.extra_info.update(
            impl=impl,
            device=device,
            scale=SCALE,
            shape=list(measurement.shape),
            dtype=measurement.dtype,
            bytes_moved=measurement.bytes_moved,
            gbps=measurement.gbps,
            peak_bytes=measurement.peak_bytes,
            steps=measurement.steps or None,
            chunk=measurement.chunk,
            thp=benchlib.thp_status() if device == "cpu" else None,
        )

    return run_case


@pytest.fixture
def bench_profile(benchmark: Any) -> Callable[[str, str], None]:
    """``bench_profile(device, group)``: one call of ours under torch.profiler (after a warm-up);
    the breakdown by op is printed at the end. Goes through ``benchmark`` so that
    ``--benchmark-only`` runs it (its time there includes the profiler's overhead)."""

    def run_profile(device: str, group: str) -> None:
        benchmark.group = f"profile {group} [{device}]"
        _before_e2e(device)
        try:
            lines = benchmark.pedantic(benchlib.profile_e2e, args=(CASES, group, device), rounds=1, iterations=1)
        except benchlib.Unavailable as reason:
            pytest.skip(str(reason))
        RESULTS.profiles[f"{group} [{device}]"] = lines

    return run_profile


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
    for line in benchlib.group_tables(RESULTS):
        write(line)
    e2e = benchlib.e2e_summary(RESULTS)
    if e2e:
        write("")
        write("## End to end: a converted network simulated over T steps, same images for every impl")
        for line in e2e:
            write(line)
    for lines in RESULTS.profiles.values():
        write("")
        write("## Where the time goes (torch.profiler)")
        for line in lines:
            write(line)
