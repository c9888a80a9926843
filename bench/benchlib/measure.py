"""Timing and peak memory of a case, its figures (:class:`Measurement`) and a run's :class:`Results`.

A case is warmed up (when it needs it), called once for its peak memory, then timed over rounds
sized to a time budget. The rounds are timed by a :data:`Timer`: pytest-benchmark in
``conftest.py``, else :func:`device_timer`: ``triton.testing.do_bench`` on CUDA (warm-up, L2
flush, CUDA events), a host clock on CPU (no triton needed there).
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .groups import Case, Group, Unavailable
from .tta import TimeToAccuracy

#: An end-to-end call longer than this (seconds) gets a single timed round (see measure_case).
E2E_SLOW_CALL_S = 5.0

#: ``timer(run, rounds, call_s)`` → (median seconds of one call, or None when not timed; the rounds
#: timed): times about ``rounds`` calls of ``run``, one of which took ``call_s`` seconds.
Timer = Callable[[Callable[[], Any], int, float], tuple[float | None, int]]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synced(run: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``run`` that returns only when the device is done: what a host-side timer must time."""
    if device != "cuda":
        return run

    def run_synced() -> Any:
        out = run()
        torch.cuda.synchronize()
        return out

    return run_synced


def _proc_status_kb(name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{name}:\s+(\d+) kB", status.read(), re.M).group(1))


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)``: hands freed heap pages back to the system (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_memory(run: Callable[[], Any], device: str) -> tuple[int | None, float]:
    """Runs ``run`` once; returns (peak memory growth in bytes or None, seconds the call took).

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call. CPU:
    peak resident set (VmHWM, reset through /proc/self/clear_refs) above the RSS before the
    call, after handing freed heap pages back so that reused free memory cannot hide growth.
    The outputs are alive at the end of the call, so they count.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before
    else:
        _malloc_trim()
        can_measure = _reset_peak_rss()
        before_kb = _proc_status_kb("VmRSS")
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        peak = (_proc_status_kb("VmHWM") - before_kb) * 1024 if can_measure else None
    del out
    return peak, seconds


def rounds_for(first_call_s: float, budget_s: float, min_rounds: int = 2, max_rounds: int = 50) -> int:
    """Timed rounds that fit ``budget_s``: many for fast calls, ``min_rounds`` for slow baselines."""
    return max(min_rounds, min(max_rounds, int(budget_s / max(first_call_s, 1e-9))))


def time_on_host(run: Callable[[], Any], rounds: int, call_s: float = 0.0) -> tuple[float, int]:
    """Median seconds of one call over ``rounds`` calls, on the host clock (a :data:`Timer`)."""
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), rounds


def time_alternating(
    subject: Callable[[], Any], baseline: Callable[[], Any], seconds: float, min_calls: int = 5
) -> tuple[float, float, int]:
    """Calls ``subject``, then ``baseline``, again and again for about ``seconds`` (at least
    ``min_calls`` each), after one warm-up call of each: (median seconds of subject, of baseline,
    calls of each). Both see the machine in the same moments: a slow spell of the host (seconds
    long on a shared VM) slows both, where timing one after the other would charge it to one."""
    subject(), baseline()
    times: tuple[list[float], list[float]] = ([], [])
    end = time.monotonic() + seconds
    while len(times[0]) < min_calls or time.monotonic() < end:
        for run, spent in ((subject, times[0]), (baseline, times[1])):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1]), len(times[0])


def time_on_cuda(run: Callable[[], Any], rounds: int, call_s: float) -> tuple[float, int]:
    """Median seconds of one call by ``triton.testing.do_bench`` (a :data:`Timer`): it warms up,
    flushes the L2 cache before each call and times each call by CUDA events, with no host sync
    between calls. It runs as many calls as fit its repetition time by its own estimate of a call
    (flush included): ``rounds`` calls of ``call_s`` seconds, and half a call more, so that an
    estimate a little above ``call_s`` does not round the count down (2 rounds to 1)."""
    from triton.testing import do_bench

    times_ms = do_bench(run, rep=(rounds + 0.5) * call_s * 1e3, return_mode="all")
    return statistics.median(times_ms) / 1e3, len(times_ms)


def device_timer(device: str) -> Timer:
    """The :data:`Timer` of ``device`` when no pytest-benchmark times the rounds."""
    return time_on_cuda if device == "cuda" else time_on_host


def copy_bandwidth_gbps(device: str, nbytes: int, rounds: int = 20) -> float:
    """Achieved GB/s of ``dst.copy_(src)`` into a preallocated buffer, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # fill: fault its pages in before timing
    start = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    call_s = (time.perf_counter() - start) / 3
    seconds, _ = device_timer(device)(lambda: dst.copy_(src), rounds, call_s)
    return 2 * src.nbytes / seconds / 1e9


@dataclass
class Measurement:
    """The figures of one case."""

    group: str
    impl: str
    device: str
    shape: tuple[int, ...]
    dtype: str
    median_s: float | None
    bytes_moved: int
    peak_bytes: int | None
    rounds: int = 0
    note: str = ""  #: why there is no figure (skipped baseline, error)
    steps: int = 0  #: T of an end-to-end case (0 elsewhere)
    chunk: int | None = None  #: steps per chunk of an end-to-end case (None: the engine's choice)
    #: baseline impl → (median seconds of this case, of the baseline, calls of each) timed in
    #: alternation (:func:`time_alternating`), for the targets that ask for it (``Target.alternate``)
    alternated: dict[str, tuple[float, float, int]] = field(default_factory=dict)

    @property
    def gbps(self) -> float | None:
        return None if not self.median_s else self.bytes_moved / self.median_s / 1e9


def ms_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def mb_text(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def measure_case(case: Case, timer: Timer, budget_s: float) -> Measurement:
    """Warm-up (when needed), one call for peak memory, then the timed rounds.

    ``timer`` times the rounds: pytest-benchmark's pedantic mode on ``synced(run)`` (a host
    timer), or :func:`device_timer`. A failing ``torch.compile`` raises :class:`Unavailable`:
    the baseline is skipped.
    """
    if case.needs_warmup:
        try:
            case.run()
            synchronize(case.device)
        except Exception as error:
            if case.impl != "compile":
                raise
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            raise Unavailable(f"torch.compile failed: {type(error).__name__}: {first_line}") from error
    # Without a separate warm-up, the peak-memory call is the warm-up (first-call page faults and
    # lazy initialisation stay out of the timed rounds); its duration sizes the rounds.
    peak, first_s = peak_memory(case.run, case.device)
    # An end-to-end call of seconds (SpikingJelly at T = 256 on CPU: ~4 s, a minute on busy
    # cores) gets one timed round after the peak-memory call, which was its warm-up.
    slow = case.group.op in ("e2e", "tta") and first_s > E2E_SLOW_CALL_S
    median_s, rounds = timer(case.run, rounds_for(first_s, budget_s, min_rounds=1 if slow else 2), first_s)
    return Measurement(
        group=case.group.name,
        impl=case.impl,
        device=case.device,
        shape=case.shape,
        dtype=str(case.group.dtype).removeprefix("torch."),
        median_s=median_s,
        bytes_moved=case.bytes_moved,
        peak_bytes=peak,
        rounds=rounds,
        steps=case.steps,
        chunk=case.chunk,
    )


def skipped(group: Group, impl: str, device: str, note: str) -> Measurement:
    """The table row of a case that could not run."""
    dtype = str(group.dtype).removeprefix("torch.")
    return Measurement(group.name, impl, device, (), dtype, median_s=None, bytes_moved=0, peak_bytes=None, note=note)


@dataclass
class Results:
    """What one run collects, for the tables: the measurements, the copy bandwidth of each device,
    the profiles, what the end-to-end agreement checks compare, and the time-to-accuracy cases."""

    measurements: list[Measurement] = field(default_factory=list)
    copy_gbps: dict[str, float] = field(default_factory=dict)
    #: "group [device]" → the lines of ``profile.profile_e2e``
    profiles: dict[str, list[str]] = field(default_factory=dict)
    #: (group, device, impl) → the output of an end-to-end case's last timed call, [B, K]
    outputs: dict[tuple[str, str, str], Tensor] = field(default_factory=dict)
    #: (model, device) → (λ per neuron layer of ours, of SpikingJelly's), in graph order
    thresholds: dict[tuple[str, str], tuple[list[float], list[float]]] = field(default_factory=dict)
    #: (group, device, impl) → what a time-to-accuracy case's steps search found, and the test
    #: images its last timed call classified right
    time_to_accuracy: dict[tuple[str, str, str], tuple[TimeToAccuracy, int | None]] = field(default_factory=dict)

    def add(self, measurement: Measurement, case: Case | None = None) -> None:
        """Keeps ``measurement``, and what its measured ``case`` computed for the checks."""
        self.measurements.append(measurement)
        if case is None:
            return
        if case.output is not None:
            self.outputs[(case.group.name, case.device, case.impl)] = case.output
        if case.thresholds is not None:
            self.thresholds[(case.group.model, case.device)] = case.thresholds
        if case.time_to_accuracy is not None:
            key = (case.group.name, case.device, case.impl)
            self.time_to_accuracy[key] = (case.time_to_accuracy, case.timed_correct)
