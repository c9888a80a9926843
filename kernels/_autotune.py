"""Launch configs shared by the kernel families: the autotuner's candidates and key, and the one
fixed config of the kernels whose calls the host bounds."""

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


def fixed_block() -> dict:
    """``BLOCK`` and ``num_warps`` of the kernels launched without the autotuner (Rate Norm, QCFS): its
    Python wrapper cost ~55 µs of host time per launch on an H200's host, where a Rate Norm
    forward + backward at 51M elements runs ~0.4 ms of kernels but ~1.6 ms of host time per call
    (docs/gpu.md); and with BLOCK known before the launch, the per-program partial sums are sized
    exactly, every row written, nothing to zero-fill. 1024 elements in 4 warps: 8 per thread, the
    usual shape of a streaming kernel. One small block under the interpreter."""
    if interpreting():
        return {"BLOCK": 128, "num_warps": 4}
    return {"BLOCK": 1024, "num_warps": 4}


def fixed_programs(items: int) -> int:
    """Programs of a :func:`fixed_block` launch over ``items``: at least one even for no items, so
    that a kernel's scalar outputs are always written."""
    return max(triton.cdiv(items, fixed_block()["BLOCK"]), 1)


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
