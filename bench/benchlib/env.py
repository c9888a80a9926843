"""What the figures depend on, as lines to print before them: load, sizes, versions, threads,
devices, and whether fresh CPU tensors get transparent huge pages (page faults dominate the cost
of fresh large outputs on CPU: a 256 MB ``clone`` costs several times more with 4 KiB pages)."""

from __future__ import annotations

import functools
import os
import re

import torch

from .e2e import e2e_sizes_text
from .groups import sizes_for


@functools.cache  # torch read the variable at start-up: the answer holds for the whole process
def thp_status() -> str:
    """Whether fresh large CPU tensors get transparent huge pages.

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


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


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
        *(e2e_sizes_text(device, scale) for device in ("cpu", "cuda")),
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA device: {cuda}, "
        f"spikingjelly {sj} (CUDA implementation: {os.environ.get('SJ_IF_CUDA_IMPLEMENTATION')})",
        thp_status(),
    ]
