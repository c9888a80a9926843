"""How much memory a simulation chunk may take, and the opt-in allocator setting that makes
repeated chunks cheap on CPU.

The simulator splits long runs into chunks of steps whose largest activation fits a budget taken
from the free memory of the device (:func:`chunk_budget`). On CPU the same large activations are
allocated chunk after chunk; :func:`reuse_freed_memory` lets glibc keep them for reuse. It changes
the whole process, so the library never calls it on its own: the command line does, the
benchmarks do, and a Python user who simulates on CPU calls it once at start-up.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

#: Bounds on the largest activation of one chunk, in bytes; between them the simulator takes an
#: eighth of the memory available on the device (a chunk holds a few such tensors at once).
#: On CPU, larger chunks gain little once a chunk's convolutions see thousands of images (cnn7,
#: batch 128: 10 steps per chunk), and memory then stays flat in T.
MIN_CHUNK_BYTES = 16 * 2**20
MAX_CHUNK_BYTES = 128 * 2**20
#: The upper bound on a GPU. There every chunk pays the host's launch overhead of all its layers:
#: on an H200, vgg16 at batch 128 and T = 64 took 220 ms in 128 MiB chunks (4 steps) and 44 ms in
#: 2 GiB chunks (all 64 steps). A chunk's peak memory was 6.5 times its largest activation there,
#: so on a GPU, where running out of memory is an error rather than swapping, the budget is a
#: sixteenth of the free memory, not an eighth.
MAX_CHUNK_BYTES_GPU = 2 * 2**30

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@functools.cache
def reuse_freed_memory() -> bool:
    """Let glibc keep freed blocks up to 1 GiB for reuse instead of returning them to the OS.

    A process-wide allocator setting, applied only when called (idempotent). A simulation
    allocates the same large activations chunk after chunk; by default glibc maps each block
    over 32 MB afresh and unmaps it on free, so every chunk pays the page faults of all its
    outputs again (on a 2-core VM: cnn7, T = 64, batch 128 took 5.3 s, 0.8 s with this). The
    ``rnl-fast`` command calls it at start-up; call it yourself once before simulating on CPU.
    Set ``RNL_FAST_REUSE_FREED_MEMORY=0`` to make it a no-op. Returns whether it applied.
    """
    if os.environ.get("RNL_FAST_REUSE_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 2**30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):  # not glibc
        return False


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * MAX_CHUNK_BYTES  # unknown: assume the largest budget is affordable


def chunk_budget(device: torch.device) -> int:
    """The per-chunk activation budget on ``device``: an eighth of its free memory (a sixteenth on
    a GPU), within :data:`MIN_CHUNK_BYTES` and :data:`MAX_CHUNK_BYTES` (:data:`MAX_CHUNK_BYTES_GPU`)."""
    if device.type == "cuda":
        return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES_GPU, available_memory(device) // 16))
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, available_memory(device) // 8))
