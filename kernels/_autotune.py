"""Autotuning shared by the kernel families: the candidate configs and the key."""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """TRITON_INTERPRET=1 (read by Triton at import): kernels run on CPU tensors via numpy."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older versions only read the variable
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def block_configs() -> list[triton.Config]:
    """Autotuning candidates; one small block under the interpreter, where every config runs on the CPU."""
    if interpreting():
        return [triton.Config({"BLOCK": 128}, num_warps=4)]
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block, warps in ((256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8))
    ]


def min_block() -> int:
    """The smallest BLOCK of :func:`block_configs`: buffers with a row per program are sized by it."""
    return min(config.kwargs["BLOCK"] for config in block_configs())


def size_class(n: int) -> int:
    """Autotune key: one bucket per factor of 16 in ``n``, so a new shape rarely triggers a retune."""
    return n.bit_length() // 4
