"""Autotuning shared by the kernel families: the candidate configs and the key."""

from __future__ import annotations

import os

import torch
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


def program_partials(items: int, columns: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero-filled ``[programs, columns]``: a row for every program that the smallest BLOCK of
    :func:`block_configs` would launch over ``items``. Autotuning picks BLOCK at launch, after this
    buffer exists (zeroing it before each trial: ``reset_to_zero``), and the rows of programs that
    do not exist must add nothing to the caller's sum over them."""
    smallest = min(config.kwargs["BLOCK"] for config in block_configs())
    return torch.zeros((max(triton.cdiv(items, smallest), 1), columns), dtype=dtype, device=device)


def size_class(n: int) -> int:
    """Autotune key: one bucket per factor of 16 in ``n``, so a new shape rarely triggers a retune."""
    return n.bit_length() // 4
