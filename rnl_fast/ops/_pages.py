"""Huge pages for the large outputs the C++ kernels write.

A fresh CPU tensor of more than a few MB is a new anonymous mapping that the OS fills page by page
as the kernel first writes it: with 4 KB pages a 256 MB spike tensor takes 65,536 page faults,
which cost more than the IF arithmetic and as much as the copy itself (``clone`` of the same
bytes: ~60 ms on a 2-core VM, ~20 ms when torch backs it with huge pages). Where Linux offers
transparent huge pages on request (``/sys/kernel/mm/transparent_hugepage/enabled`` set to
``madvise``, the common default), :func:`advise_huge_pages` asks for them on the 2 MiB-aligned
interior of an output before the kernel touches it: 512 times fewer faults.

It is a hint about one tensor's memory, not an allocator setting: the tensor is allocated as usual
(the same allocator, size and layout), and what it advises is the address range of that tensor.
Where the allocator keeps freed memory for reuse (glibc's heap, and every block under
:func:`rnl_fast.reuse_freed_memory`), the advice stays on the range, so a later tensor placed there
may get huge pages too; a block glibc mapped afresh (over 32 MB by default) goes back to the OS
with its advice. It is what torch's own ``THP_MEM_ALLOC_ENABLE=1`` does for every tensor of 2 MB
or more. ``RNL_FAST_HUGE_PAGES=0`` turns
it off (for instance where the kernel's THP defragmentation makes faults stall on a fragmented
host); with ``enabled`` set to ``never`` it has no effect, with ``always`` the pages were huge anyway.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

from torch import Tensor

#: The huge page size on x86-64 and arm64 Linux.
HUGE_PAGE = 2 << 20
#: Outputs smaller than this are left alone: two huge pages' worth always holds one aligned huge
#: page, and below that the faults are few.
MIN_BYTES = 2 * HUGE_PAGE
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux, every architecture
#: Values of ``RNL_FAST_HUGE_PAGES``.
CHOICES = ("0", "1")


@functools.cache
def _madvise():
    """libc's ``madvise``, or None where there is none to call (not Linux, not glibc/musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def huge_pages_wanted() -> bool:
    """``RNL_FAST_HUGE_PAGES``, read on every call: ``1`` (default) or ``0``; anything else is an error."""
    choice = os.environ.get("RNL_FAST_HUGE_PAGES", "").strip() or "1"
    if choice not in CHOICES:
        raise ValueError(f"RNL_FAST_HUGE_PAGES must be one of {CHOICES}, got {choice!r}")
    return choice == "1"


def aligned_interior(start: int, nbytes: int) -> tuple[int, int]:
    """The 2 MiB-aligned ``[lo, hi)`` inside the bytes ``[start, start + nbytes)`` (``lo >= hi``: none)."""
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    return lo, hi


def advise_huge_pages(out: Tensor) -> bool:
    """Asks Linux to back the aligned interior of a fresh CPU output with huge pages, before any
    kernel writes it. Returns whether the advice was given and taken (False: a CUDA tensor, fewer
    than :data:`MIN_BYTES`, ``RNL_FAST_HUGE_PAGES=0``, no ``madvise``, or the OS refused it, as
    one built without transparent huge pages does). A hint: pages already in place stay as they are.
    """
    if not huge_pages_wanted() or out.device.type != "cpu" or out.numel() * out.element_size() < MIN_BYTES:
        return False
    madvise = _madvise()
    if madvise is None:
        return False
    storage = out.untyped_storage()
    lo, hi = aligned_interior(storage.data_ptr(), storage.nbytes())
    return hi > lo and madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0
