"""What the figures depend on, as lines to print before them: load, sizes, versions, threads,
devices, and whether fresh CPU tensors get transparent huge pages (page faults dominate the cost
of fresh large outputs on CPU: a 256 MB ``clone`` costs several times more with 4 KiB pages)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

from .e2e import e2e_sizes_text
from .groups import sizes_for


@functools.cache  # torch read the variable at start-up: the answer holds for the whole process
def torch_huge_pages() -> bool | None:
    """Whether torch gives fresh large CPU tensors transparent huge pages (None: cannot tell).

    ``THP_MEM_ALLOC_ENABLE=1`` is read by torch when it starts, so it is tested here by its effect:
    the huge pages backing a fresh 64 MiB tensor (above glibc's largest mmap threshold, so it
    is a fresh mapping, never reused heap). Our kernels' own outputs ask for huge pages either way
    (``RNL_FAST_HUGE_PAGES``); this is about everyone else's, ``clone``'s among them.
    """
    try:
        before = _smaps_huge_kb()
        probe = torch.empty(2**24, dtype=torch.float32).fill_(1.0)
        huge_kb = _smaps_huge_kb() - before
        del probe
    except (OSError, AttributeError):
        return None
    return huge_kb > 0


def thp_status() -> str:
    """Whether fresh large CPU tensors get transparent huge pages, as a line to print."""
    requested = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        mode = "unknown"
    on = torch_huge_pages()
    effect = "huge-page use unknown" if on is None else f"huge pages {'ON' if on else 'OFF'} for fresh tensors"
    ours = os.environ.get("RNL_FAST_HUGE_PAGES", "1")
    return f"THP_MEM_ALLOC_ENABLE={requested}, kernel THP mode [{mode}]: {effect}; RNL_FAST_HUGE_PAGES={ours}"


def _smaps_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return int(re.search(r"^AnonHugePages:\s+(\d+) kB", f.read(), re.M).group(1))


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cgroup_quota() -> str:
    """The cgroup CPU quota of the machine's root group ("none" when unlimited; v2, else v1), or "unknown"."""
    root = Path("/sys/fs/cgroup")
    try:
        quota, period = (root / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return "unknown"
    return "none" if quota in ("max", "-1") else f"{int(quota) / int(period):.2f} cores"


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (two would mean two thread pools)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return ["unknown"]
    names = {line.split()[-1] for line in maps if line.split() and "omp" in Path(line.split()[-1]).name}
    return sorted(names)


def threading_line() -> str:
    """Threads against the cores this process may use, the cgroup quota, the OpenMP runtimes and
    settings: what decides how ours and the baselines share the cores (bench/contention.py)."""
    runtimes = ", ".join(openmp_runtimes()) or "none"
    return (
        f"{torch.get_num_threads()} threads, {usable_cores()} of {os.cpu_count()} cores usable (affinity), "
        f"cgroup quota {cgroup_quota()}, OpenMP runtimes loaded: {runtimes}; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


def environment_lines(scale: str) -> list[str]:
    """What the figures depend on: versions, threads, devices, THP, sizes."""
    try:
        import spikingjelly

        sj = getattr(spikingjelly, "__version__", None) or _dist_version("spikingjelly")
    except ImportError:
        sj = "not importable (its rows are skipped)"
    cuda = "none"
    if torch.cuda.is_available():  # SMs and L2: what the IF backward's slots are sized by
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        cuda = f"{props.name} ({props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB)"
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    busy = " (BUSY: other processes compete for the cores; figures are noisier)" if load > 0.75 * cores else ""
    return [
        f"load average {load:.1f} on {cores} cores{busy}",
        f"rnl_fast bench: scale={scale} {sizes_for('cpu', scale)} (CUDA neurons: {sizes_for('cuda', scale).neurons})",
        *(e2e_sizes_text(device, scale) for device in ("cpu", "cuda")),
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA device: {cuda}, "
        f"spikingjelly {sj} (CUDA implementation: {os.environ.get('SJ_IF_CUDA_IMPLEMENTATION')})",
        threading_line(),
        thp_status(),
    ]
