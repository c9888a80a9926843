"""Shared pieces of the rnl_fast benchmarks: sizes, cases, timing, peak memory, targets, tables.

Two drivers run the same cases: the pytest-benchmark files (``pytest bench/ --benchmark-only``,
through ``conftest.py``) and ``gpu_bench.py`` (the one-shot GPU check). A *group* is one piece
of work (e.g. IF forward with fp32 spikes); its *impls* do that work on the same inputs:

- ``ours``: :mod:`rnl_fast.ops` (C++ on CPU tensors, Triton on CUDA tensors);
- ``clone``: ``x.clone()``, the cost of a fresh output of the input's size;
- ``eager``: the pure-PyTorch definition in :mod:`rnl_fast.reference`;
- ``compile``: ``torch.compile`` of that definition (compile time excluded);
- ``spikingjelly``: SpikingJelly 2.0's ``IFNode(v_reset=None, step_mode="m")``.

Absolute times on shared machines are noise (DESIGN.md §5): the figures are the ratios measured
side by side in one run, and achieved GB/s counted on the bytes the op must move.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rnl_fast import ops, reference
from rnl_fast.reference import OMEGA_EPS

# SpikingJelly 2.0's IFNode has no ``backend=`` argument: it dispatches by device, and on CUDA
# reads its implementation (auto | cuda | triton | torch) from this variable when it is imported
# (here, lazily, after this line). Triton is the GPU path to compare with: its native "cuda" path
# exists only in a wheel built with SJ_BUILD_NATIVE_CUDA=1, and its cupy backend is gone.
os.environ.setdefault("SJ_IF_CUDA_IMPLEMENTATION", "triton")

SCALES = ("full", "small", "tiny")
IMPLS = ("ours", "clone", "eager", "compile", "spikingjelly")
#: Rate Norm momentum and input seed, the same for every impl.
RNL_MOMENTUM = 0.1
SEED = 20210801


class Unavailable(Exception):
    """A baseline that cannot run here (not installed, compile failed): skipped, not an error."""


# ─── sizes ──────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run."""

    steps: int  #: T of the IF benchmarks
    neurons: int  #: N of the IF benchmarks (x is [T, N])
    rnl_shape: tuple[int, ...]  #: input shape of the Rate Norm benchmark


def bench_scale() -> str:
    """``RNL_FAST_BENCH_SCALE``: ``full`` (default), ``small`` (quick run) or ``tiny`` (dry run)."""
    scale = os.environ.get("RNL_FAST_BENCH_SCALE", "full").strip().lower() or "full"
    if scale not in SCALES:
        raise ValueError(f"RNL_FAST_BENCH_SCALE must be one of {SCALES}, got {scale!r}")
    return scale


def sizes_for(device: str, scale: str) -> Sizes:
    """T = 32 everywhere but ``tiny``; 2M neurons on CPU and 16M on CUDA at ``full`` scale."""
    if scale == "tiny":  # odd sizes and few steps: exercises every code path in seconds
        return Sizes(steps=4, neurons=1000, rnl_shape=(2, 3, 5, 7))
    if scale == "small":
        return Sizes(steps=32, neurons=2**16, rnl_shape=(16, 32, 28, 28))
    return Sizes(steps=32, neurons=2**24 if device == "cuda" else 2**21, rnl_shape=(128, 32, 28, 28))


# ─── groups and cases ───────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Group:
    """One piece of work, done by each of ``impls`` on the same inputs."""

    name: str
    title: str
    op: str  #: "if" or "rate_norm"
    dtype: torch.dtype  #: dtype of x
    spike_dtype: torch.dtype | None  #: IF spike dtype (None: x.dtype)
    backward: bool  #: forward + backward instead of inference forward
    impls: tuple[str, ...]


GROUPS: tuple[Group, ...] = (
    Group("if-fwd-fp32", "IF forward, fp32 spikes", "if", torch.float32, None, False, IMPLS),
    # SpikingJelly cannot write byte spikes; its fp32 figure is in if-fwd-fp32.
    Group("if-fwd-uint8", "IF forward, uint8 spikes", "if", torch.float32, torch.uint8, False, IMPLS[:4]),
    Group("if-fwd-bf16", "IF forward, bf16 in, bf16 spikes", "if", torch.bfloat16, None, False, IMPLS),
    Group("if-fwd-bwd-fp32", "IF forward+backward, fp32", "if", torch.float32, None, True, IMPLS),
    Group("rnl-fwd-bwd-fp32", "Rate Norm forward+backward, loss (r*w).sum() + Omega", "rate_norm",
          torch.float32, None, True, IMPLS[:4]),
)  # fmt: skip
GROUPS_BY_NAME = {group.name: group for group in GROUPS}


def bytes_moved(group: Group, x: Tensor) -> int:
    """Bytes the op must move at the least (the GB/s figures count these).

    - IF forward: read x once, write the spikes once.
    - IF forward+backward: the forward above, then the backward reads x (to recompute the
      membrane) and the spike gradient and writes grad_x.
    - Rate Norm forward+backward: the forward reads x twice (max pass, then output pass) and
      writes r; the backward reads x and grad_r and writes grad_x.
    """
    n, x_bytes = x.numel(), x.element_size()
    if group.op == "rate_norm":
        return 6 * n * x_bytes
    spike_bytes = (group.spike_dtype or group.dtype).itemsize
    forward = n * (x_bytes + spike_bytes)
    return forward + 3 * n * x_bytes if group.backward else forward


@dataclass
class Case:
    """One impl of one group, ready to run: ``run()`` does one call and returns its outputs."""

    group: Group
    impl: str
    device: str
    shape: tuple[int, ...]
    run: Callable[[], Any]
    bytes_moved: int
    #: torch.compile and Triton autotuning happen on the first call: keep it out of every figure.
    needs_warmup: bool


@functools.lru_cache(maxsize=2)  # consecutive cases of one group share their inputs (+ the priming ones)
def _inputs(group_name: str, device: str, sizes: Sizes) -> dict[str, Tensor]:
    """The inputs of a group, drawn from a fixed seed: every impl sees the same tensors."""
    group = GROUPS_BY_NAME[group_name]
    generator = torch.Generator(device=device).manual_seed(SEED)

    def randn(shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), generator=generator, device=device)

    if group.op == "if":
        # Mean 0.3 per step: most neurons fire now and then (rates near 0.3), as in a converted net.
        x = (randn((sizes.steps, sizes.neurons)) * 0.5 + 0.3).to(group.dtype)
        inputs = {"x": x.requires_grad_(group.backward)}
        if group.backward:
            inputs["grad_spikes"] = randn(x.shape).to(group.dtype)
        return inputs
    return {
        "x": randn(sizes.rnl_shape).requires_grad_(True),
        "weight": randn(sizes.rnl_shape),  # the loss (r * weight).sum() gives a dense grad_r
        "raw_p": torch.tensor(2.0, device=device, requires_grad=True),  # p ≈ 0.88: some x clip
        "running_max": torch.tensor(1.0, device=device),
    }


def _spikingjelly_if() -> Callable[[Tensor], Tensor]:
    """SpikingJelly 2.0's soft-reset IF node, reset before each call like ours starts from v = 0."""
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate
    except ImportError as error:
        raise Unavailable(f"spikingjelly is not importable ({error})") from error
    # ATan(alpha=2) is the surrogate of ours with surrogate="atan", width=1: same gradients.
    node = neuron.IFNode(v_reset=None, step_mode="m", surrogate_function=surrogate.ATan())

    def run(x: Tensor) -> Tensor:
        functional.reset_net(node)
        return node(x)

    return run


def _if_spikes_fn(impl: str, spike_dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    """``x [T, N] → spikes [T, N]`` for one impl; all use v_th = 1, v_init = 0, soft reset, atan."""
    if impl == "ours":
        return lambda x: ops.if_sequence(x, spike_dtype=spike_dtype).spikes
    if impl == "eager":
        return lambda x: reference.if_sequence(x, spike_dtype=spike_dtype)[0]
    if impl == "compile":
        # dynamic=False: a second shape (CPU then CUDA sizes) must not switch to symbolic shapes.
        compiled = torch.compile(reference.if_sequence, dynamic=False)
        return lambda x: compiled(x, spike_dtype=spike_dtype)[0]
    if impl == "spikingjelly":
        return _spikingjelly_if()
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _rnl_loss(rate_norm_fn: Callable, x: Tensor, raw_p: Tensor, running_max: Tensor, weight: Tensor) -> Tensor:
    """A training step's loss through one Rate Norm Layer: ``(r̂·weight).sum() + Ω`` (paper Eq. 8)."""
    r, _, sum_r, sum_r2 = rate_norm_fn(x, raw_p, running_max, RNL_MOMENTUM, True)
    return (r * weight).sum() + sum_r / (sum_r2 + OMEGA_EPS)


def _rnl_loss_fn(impl: str) -> Callable[..., Tensor]:
    if impl == "ours":
        return functools.partial(_rnl_loss, ops.rate_norm)
    if impl == "eager":
        return functools.partial(_rnl_loss, reference.rate_norm)
    if impl == "compile":  # the whole loss, so that inductor may fuse it with the layer
        return torch.compile(functools.partial(_rnl_loss, reference.rate_norm), dynamic=False)
    raise ValueError(f"Rate Norm impl must be ours, eager or compile, got {impl!r}")


#: (group, impl, device) already called once in this process (see build_case).
_PRIMED: set[tuple[str, str, str]] = set()


def build_case(group_name: str, impl: str, device: str, scale: str) -> Case:
    """The callable of one impl of one group; raises :class:`Unavailable` for a missing baseline."""
    if group_name not in GROUPS_BY_NAME:
        raise ValueError(f"group must be one of {sorted(GROUPS_BY_NAME)}, got {group_name!r}")
    group = GROUPS_BY_NAME[group_name]
    if impl not in group.impls:
        raise ValueError(f"impl of {group_name} must be one of {group.impls}, got {impl!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available")
    inputs = _inputs(group_name, device, sizes_for(device, scale))
    x = inputs["x"]
    run: Callable[[], Any]
    if impl == "clone":
        x_value = x.detach()
        run = x_value.clone
        moved = 2 * x_value.nbytes
    elif group.op == "if":
        spikes_of = _if_spikes_fn(impl, group.spike_dtype)
        if group.backward:
            grad_spikes = inputs["grad_spikes"]

            def run() -> Tensor:
                return torch.autograd.grad(spikes_of(x), x, grad_spikes)[0]

        else:

            def run() -> Tensor:
                with torch.no_grad():
                    return spikes_of(x)

        moved = bytes_moved(group, x)
    else:
        loss_of = _rnl_loss_fn(impl)
        raw_p, running_max, weight = inputs["raw_p"], inputs["running_max"], inputs["weight"]

        def run() -> tuple[Tensor, ...]:
            return torch.autograd.grad(loss_of(x, raw_p, running_max, weight), (x, raw_p))

        moved = bytes_moved(group, x)
    if impl != "compile" and (group_name, impl, device) not in _PRIMED:
        # The first call of an impl in a process loads modules, starts thread pools and fills
        # caches (ours: +160 MB of RSS on CPU); a tiny call takes that out of every figure.
        # Not for compile: its warm-up on the real inputs is the compilation itself.
        _PRIMED.add((group_name, impl, device))
        build_case(group_name, impl, device, "tiny").run()
    return Case(
        group=group,
        impl=impl,
        device=device,
        shape=tuple(x.shape),
        run=run,
        bytes_moved=moved,
        needs_warmup=impl == "compile" or device == "cuda",
    )



# ─── timing and memory ──────────────────────────────────────────────────────────────────────


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


def time_calls(run: Callable[[], Any], device: str, rounds: int) -> float:
    """Median seconds of one call over ``rounds`` calls (CUDA events on CUDA, no host sync between)."""
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        torch.cuda.synchronize()
        for start, end in zip(starts, ends):
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends)) / 1e3
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def copy_bandwidth_gbps(device: str, nbytes: int, rounds: int = 20) -> float:
    """Achieved GB/s of ``dst.copy_(src)`` into a preallocated buffer, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # fill: fault its pages in before timing
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    seconds = time_calls(lambda: dst.copy_(src), device, rounds)
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

    @property
    def gbps(self) -> float | None:
        return None if not self.median_s else self.bytes_moved / self.median_s / 1e9


def measure_case(
    case: Case, time_rounds: Callable[[Callable[[], Any], int], float | None], budget_s: float
) -> Measurement:
    """Warm-up (when needed), one call for peak memory, then the timed rounds.

    ``time_rounds(run, rounds)`` returns the median seconds of one call: pytest-benchmark's
    pedantic mode on ``synced(run)`` (a host timer), or :func:`time_calls` (CUDA events).
    A failing ``torch.compile`` raises :class:`Unavailable`: the baseline is skipped.
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
    rounds = rounds_for(first_s, budget_s)
    median_s = time_rounds(case.run, rounds)
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
    )


def skipped(group: Group, impl: str, device: str, note: str) -> Measurement:
    """The table row of a case that could not run."""
    dtype = str(group.dtype).removeprefix("torch.")
    return Measurement(group.name, impl, device, (), dtype, median_s=None, bytes_moved=0, peak_bytes=None, note=note)


# ─── targets ────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Target:
    """A figure to print beside the measurement; not an assertion (benchmarks are not tests)."""

    group: str
    device: str
    #: "time_at_most": t_ours / t_baseline ≤ value; "faster_by": t_baseline / t_ours ≥ value;
    #: "copy_bw": GB/s of ours ≥ value × copy bandwidth; "peak_at_most": peak ours ≤ value × baseline's
    kind: str
    value: float
    baseline: str = ""


TARGETS: tuple[Target, ...] = (
    Target("if-fwd-fp32", "cpu", "time_at_most", 1.2, "clone"),
    Target("if-fwd-uint8", "cpu", "time_at_most", 0.6, "clone"),
    Target("if-fwd-fp32", "cpu", "faster_by", 3.0, "spikingjelly"),
    Target("if-fwd-bwd-fp32", "cpu", "faster_by", 3.0, "spikingjelly"),
    Target("rnl-fwd-bwd-fp32", "cpu", "faster_by", 4.0, "eager"),
    Target("if-fwd-fp32", "cuda", "copy_bw", 0.8),
    Target("if-fwd-uint8", "cuda", "copy_bw", 0.8),
    Target("if-fwd-fp32", "cuda", "faster_by", 1.5, "spikingjelly"),
    Target("if-fwd-bwd-fp32", "cuda", "faster_by", 1.2, "spikingjelly"),
    Target("if-fwd-bwd-fp32", "cuda", "peak_at_most", 1.0, "spikingjelly"),
    Target("rnl-fwd-bwd-fp32", "cuda", "faster_by", 3.0, "eager"),
)


def evaluate_target(target: Target, rows: dict[str, Measurement], copy_gbps: float | None) -> str:
    """One line: the target, the measured figure, and ok / MISS (with the shortfall) / n/a."""
    ours, base = rows.get("ours"), rows.get(target.baseline)
    want = {
        "time_at_most": f"t_ours / t_{target.baseline} <= {target.value:g}",
        "faster_by": f"ours >= {target.value:g}x faster than {target.baseline}",
        "copy_bw": f"ours >= {target.value:.0%} of copy bandwidth",
        "peak_at_most": f"peak memory ours <= {target.value:g}x {target.baseline}'s",
    }[target.kind]
    figure, score = None, 0.0  # score: measured / required on a higher-is-better scale
    if target.kind == "copy_bw":
        if ours and ours.gbps and copy_gbps:
            share = ours.gbps / copy_gbps
            figure, score = f"{share:.0%} ({ours.gbps:.0f} of {copy_gbps:.0f} GB/s)", share / target.value
    elif target.kind == "peak_at_most":
        if ours and base and ours.peak_bytes and base.peak_bytes:
            ratio = ours.peak_bytes / base.peak_bytes
            figure, score = f"{ratio:.2f}x", target.value / ratio
    elif ours and base and ours.median_s and base.median_s:
        ratio = ours.median_s / base.median_s
        if target.kind == "time_at_most":
            figure, score = f"{ratio:.2f}x", target.value / ratio
        else:
            figure, score = f"{1 / ratio:.2f}x", 1 / ratio / target.value
    if figure is None:
        missing = ours if not (ours and ours.median_s) else base
        return f"{want}: n/a ({(missing.note if missing else '') or 'not measured'})"
    return f"{want}: {figure} " + ("ok" if score >= 1 else f"MISS (reaches {score:.0%} of the target)")


# ─── tables ─────────────────────────────────────────────────────────────────────────────────


def ms_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def mb_text(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table, columns padded so that it also reads as plain text."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)]


def shape_text(m: Measurement) -> str:
    return f"x [{', '.join(map(str, m.shape))}] {m.dtype}" if m.shape else "-"


def _by_group(measurements: Sequence[Measurement]) -> Iterator[tuple[str, Group, dict[str, Measurement]]]:
    """(device, group, {impl: measurement}) in device, then GROUPS order."""
    for device in dict.fromkeys(m.device for m in measurements):
        for group in GROUPS:
            rows = {m.impl: m for m in measurements if m.device == device and m.group == group.name}
            if rows:
                yield device, group, rows


def _targets_of(group: Group, device: str) -> list[Target]:
    return [t for t in TARGETS if t.group == group.name and t.device == device]


def group_tables(measurements: Sequence[Measurement], copy_gbps: dict[str, float]) -> list[str]:
    """One table per (device, group): each impl's time, time over ours, GB/s, peak memory; then targets."""
    lines: list[str] = []
    for device, group, rows in _by_group(measurements):
        ours, copy = rows.get("ours"), copy_gbps.get(device)
        shape = next((shape_text(m) for m in rows.values() if m.shape), "-")
        table = []
        for impl in (impl for impl in group.impls if impl in rows):
            m = rows[impl]
            table.append([
                impl,
                ms_text(m.median_s),
                "-" if not (m.median_s and ours and ours.median_s) else f"{m.median_s / ours.median_s:.2f}",
                "-" if m.gbps is None else f"{m.gbps:.1f}",
                "-" if not (m.gbps and copy) else f"{m.gbps / copy:.0%}",
                mb_text(m.peak_bytes),
                m.rounds or "-",
                m.note,
            ])  # fmt: skip
        lines += ["", f"### {group.name} [{device}]: {group.title}; {shape}"]
        header = ["impl", "median ms", "t / t_ours", "GB/s", "% copy", "peak MB", "rounds", "note"]
        lines += _format_table(header, table)
        lines += [f"- target: {evaluate_target(t, rows, copy)}" for t in _targets_of(group, device)]
    return lines


def summary_table(measurements: Sequence[Measurement], copy_gbps: dict[str, float]) -> list[str]:
    """One row per (device, group): ours against every baseline; then every target."""
    table, targets = [], []
    for device, group, rows in _by_group(measurements):
        ours, copy = rows.get("ours"), copy_gbps.get(device)
        ours_s = ours.median_s if ours else None
        gbps = ours.gbps if ours else None

        def versus(impl: str) -> str:
            m = rows.get(impl)
            if m is None:
                return "-"
            if not m.median_s:
                return f"n/a ({m.note[:40]})"
            return ms_text(m.median_s) + (f" ({m.median_s / ours_s:.2f}x)" if ours_s else "")

        table.append([
            f"{group.name} [{device}]",
            next((shape_text(m) for m in rows.values() if m.shape), "-"),
            ms_text(ours_s) if ours else "-",
            versus("eager"),
            versus("compile"),
            versus("spikingjelly"),
            versus("clone"),
            "-" if gbps is None else f"{gbps:.0f}",
            "-" if not (gbps and copy) else f"{gbps / copy:.0%}",
            mb_text(ours.peak_bytes if ours else None),
            mb_text(rows["spikingjelly"].peak_bytes if "spikingjelly" in rows else None),
        ])  # fmt: skip
        targets += [f"- {group.name} [{device}] {evaluate_target(t, rows, copy)}" for t in _targets_of(group, device)]
    header = ["op", "shape", "ours ms", "eager ms (x)", "compile ms (x)", "SpikingJelly ms (x)", "clone ms (x)",
              "ours GB/s", "% copy bw", "peak MB ours", "peak MB SJ"]  # fmt: skip
    return [
        *_format_table(header, table),
        "",
        "(x) = baseline time / ours time: above 1, ours is faster. GB/s on the bytes the op must move.",
        "",
        "Targets (printed, not asserted):",
        *targets,
    ]


# ─── environment ────────────────────────────────────────────────────────────────────────────


@functools.cache  # torch read the variable at start-up: the answer holds for the whole process
def thp_status() -> str:
    """Whether fresh large CPU tensors get transparent huge pages (DESIGN.md §3: page-fault cost).

    ``THP_MEM_ALLOC_ENABLE=1`` is read by torch when it starts, so it is tested here by its effect:
    the huge pages backing a fresh 64 MiB tensor (above glibc's largest mmap threshold, so it
    is a fresh mapping, never reused heap).
    """
    requested = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        mode = "unknown"
    try:
        before = _smaps_huge_kb()
        probe = torch.empty(2**24, dtype=torch.float32).fill_(1.0)
        huge_kb = _smaps_huge_kb() - before
        del probe
        effect = f"huge pages {'ON' if huge_kb > 0 else 'OFF'} for fresh tensors"
    except (OSError, AttributeError):
        effect = "huge-page use unknown"
    return f"THP_MEM_ALLOC_ENABLE={requested}, kernel THP mode [{mode}]: {effect}"


def _smaps_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return int(re.search(r"^AnonHugePages:\s+(\d+) kB", f.read(), re.M).group(1))


def environment_lines(scale: str) -> list[str]:
    """What the figures depend on: versions, threads, devices, THP, sizes."""
    try:
        import spikingjelly

        sj = getattr(spikingjelly, "__version__", None) or _dist_version("spikingjelly")
    except ImportError:
        sj = "not importable (its rows are skipped)"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    busy = " (BUSY: other processes compete for the cores; figures are noisier)" if load > 0.75 * cores else ""
    return [
        f"load average {load:.1f} on {cores} cores{busy}",
        f"rnl_fast bench: scale={scale} {sizes_for('cpu', scale)} (CUDA neurons: {sizes_for('cuda', scale).neurons})",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA device: {cuda}, "
        f"spikingjelly {sj} (CUDA implementation: {os.environ.get('SJ_IF_CUDA_IMPLEMENTATION')})",
        thp_status(),
    ]


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def copy_bytes_for(device: str, scale: str) -> int:
    """Size of the copy-bandwidth probe: as big as an IF input, so caches do not flatter it."""
    sizes = sizes_for(device, scale)
    return max(2**20, sizes.steps * sizes.neurons * 4)


@dataclass
class Results:
    """Measurements collected in one session, and the copy bandwidth of each device seen."""

    measurements: list[Measurement] = field(default_factory=list)
    copy_gbps: dict[str, float] = field(default_factory=dict)


def case_params(op: str) -> list[Any]:
    """pytest parameters ``(device, group, impl)`` of every case of ``op`` ("if" or "rate_norm").

    CUDA cases carry the ``gpu`` mark and skip without CUDA; on CPU the Triton kernels are not
    benchmarked (the interpreter is not a performance path).
    """
    import pytest  # here: gpu_bench.py uses this module where pytest may be missing

    if op not in {group.op for group in GROUPS}:
        raise ValueError(f"op must be one of {sorted({group.op for group in GROUPS})}, got {op!r}")
    cuda_marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    return [
        pytest.param(
            device, group.name, impl, id=f"{device}-{group.name}-{impl}", marks=[] if device == "cpu" else cuda_marks
        )
        for device in ("cpu", "cuda")
        for group in GROUPS
        if group.op == op
        for impl in group.impls
    ]
