"""Where the kernels' large CPU outputs live: on 2 MiB boundaries, asked of the OS as huge pages.

A fresh CPU tensor of more than a few MB is memory that the OS fills page by page as the kernel
first writes it: with 4 KB pages a 256 MB spike tensor takes 65,536 page faults, which cost more
than the IF arithmetic and as much as the copy itself (``clone`` of the same bytes: ~60 ms on a
2-core VM, ~20 ms when torch backs it with huge pages). Where Linux offers transparent huge pages
on request (``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``madvise``, the common
default), 2 MiB pages take 512 times fewer faults.

Asking is not enough: torch's allocator places a large tensor some hundred KB past a 2 MiB
boundary (glibc's choice, with or without torch's own ``THP_MEM_ALLOC_ENABLE=1``), and the partial
huge pages at both ends, or all of a 4–8 MiB per-neuron output, still fault 4 KB at a time:
~1,500 extra faults per IF forward call at T = 32 and 2M neurons. So :func:`empty` takes an output
of :data:`MIN_BYTES` or more from ``rnl_fast._C.HugePageBuffer``: glibc's ``posix_memalign`` on a
2 MiB boundary, the exact size (the tail after the last whole huge page stays on 4 KB pages), and
``MADV_HUGEPAGE`` on the whole huge pages before any kernel touches them. The IF forward went from
1.25× to 1.13× the time of a ``clone`` into fresh huge pages with it (README, Performance).

What a user sees of it: nothing in values, shapes, strides or dtypes. The tensor owns its memory
through that buffer (``torch.frombuffer``) and frees it with its last reference; glibc's heap keeps
and reuses it as any other block (:func:`rnl_fast.reuse_freed_memory`). One difference from
``torch.empty``: its storage cannot grow in place (``resize_`` to more elements raises "Trying to
resize storage that is not resizable", and leaves the tensor unusable, as for a tensor of
``torch.from_numpy``; ``clone()`` it first). ``RNL_FAST_HUGE_PAGES=0`` turns all of it off
and the outputs come from ``torch.empty`` (for instance where the kernel's THP defragmentation
makes faults stall on a fragmented host); with ``enabled`` set to ``never`` the memory is aligned
but the advice refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ._backend import cpp

#: The huge page size on x86-64 and arm64 Linux.
HUGE_PAGE = 2 << 20
#: Outputs smaller than this come from ``torch.empty``: below two huge pages the faults are few.
MIN_BYTES = 2 * HUGE_PAGE
#: Values of ``RNL_FAST_HUGE_PAGES``.
CHOICES = ("0", "1")


def huge_pages_wanted() -> bool:
    """``RNL_FAST_HUGE_PAGES``, read on every call: ``1`` (default) or ``0``; anything else is an error."""
    choice = os.environ.get("RNL_FAST_HUGE_PAGES", "").strip() or "1"
    if choice not in CHOICES:
        raise ValueError(f"RNL_FAST_HUGE_PAGES must be one of {CHOICES}, got {choice!r}")
    return choice == "1"


def on_huge_pages(numel: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`empty` takes an output of ``numel`` elements of ``dtype`` on ``device`` from
    huge pages: a CPU output of :data:`MIN_BYTES` or more, with ``RNL_FAST_HUGE_PAGES`` not ``0``."""
    wanted = huge_pages_wanted()  # first: a bad value fails every op, not only the large ones
    return wanted and device.type == "cpu" and numel * dtype.itemsize >= MIN_BYTES


def empty(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, stride: Sequence[int] | None = None
) -> Tensor:
    """An uninitialised output for a kernel to write: ``torch.empty(shape)`` (or
    ``torch.empty_strided(shape, stride)`` for a dense ``stride``, one that covers ``prod(shape)``
    elements without gaps), from 2 MiB-aligned huge pages when :func:`on_huge_pages` says so."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if not on_huge_pages(numel, dtype, torch.device(device)):
        if stride is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty_strided(shape, tuple(stride), dtype=dtype, device=device)
    if stride is None:
        stride = _contiguous_strides(shape)
    elif 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) != numel:
        raise ValueError(f"rnl_fast: stride {tuple(stride)} is not dense for shape {shape}")
    try:
        buffer = cpp().HugePageBuffer(nbytes=numel * dtype.itemsize, advise=True)
    except MemoryError:
        raise MemoryError(
            f"rnl_fast: cannot allocate {numel * dtype.itemsize:,} bytes for a {list(shape)} {dtype} output "
            "(the process is out of memory: a smaller batch, or a chunk size for long simulations, needs less)"
        ) from None
    storage = torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()  # holds the buffer
    return torch.empty(0, dtype=dtype, device="cpu").set_(storage, 0, shape, tuple(stride))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of ``torch.empty(shape)``: row-major, a dim of size 0 or 1 counted as 1."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def empty_like(x: Tensor) -> Tensor:
    """``torch.empty_like(x)`` for a dense ``x`` (same shape, strides, dtype, device), as :func:`empty`."""
    return empty(x.shape, x.dtype, x.device, x.stride())
