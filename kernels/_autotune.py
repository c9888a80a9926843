"""Launch configs shared by the kernel families: the autotuner's candidates and key, the one
fixed config of the kernels whose calls the host bounds, and the config and program count of the
persistent kernels whose scratch is sized to stay in L2."""

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


def persistent_block() -> dict:
    """``BLOCK`` and ``num_warps`` of a persistent kernel (a fixed number of programs that loop
    over the blocks, each through one private scratch slot), fixed, not autotuned: the program
    count follows from BLOCK (:func:`l2_slot_programs`), so BLOCK must be known before the launch.
    The slots that fit half an L2 hold a fixed number of neurons in all (P·BLOCK ≈ budget / (T ·
    itemsize): ~200k at T = 32 fp32 on a 50 MiB L2), whatever BLOCK; 256 neurons in 4 warps
    (2 per thread, 8-byte fp32 accesses) splits them into twice the programs, so twice the warps
    per SM, of BLOCK 512: more warps to hide the latency of each time step's loads. One small
    block under the interpreter."""
    if interpreting():
        return {"BLOCK": 128, "num_warps": 4}
    return {"BLOCK": 256, "num_warps": 4}


#: Programs of a persistent launch under the interpreter (CPU tensors: no device to size for),
#: whatever the size: with BLOCK 128 the tests then see programs that take several blocks and the
#: last, partial one (N = 1000: 8 blocks over 3 programs) and programs that take none (N ≤ 256).
INTERPRETER_PROGRAMS = 3
#: Fewest programs of 4 warps per SM for a persistent launch to take: 16 of an H100/H200 SM's 64
#: warp slots. A streaming loop hides its loads' latency with other warps' loads (and, pipelined,
#: with its own next steps'): a quarter occupancy is where this guess draws the line, for a GPU
#: run to confirm (docs/gpu.md).
MIN_PROGRAMS_PER_SM = 4


def l2_slot_programs(blocks: int, slot_bytes: int, l2_bytes: int, sms: int) -> int | None:
    """Programs P of a persistent launch over ``blocks`` blocks, each program holding one scratch
    slot of ``slot_bytes``, all slots within half of the ``l2_bytes`` L2 (the other half caches
    the tensors streamed through it, and what other work left there).

    One program per block when they all fit. Else the same number on every SM, ``sms`` times the
    slots per SM that fit: the programs take equal shares of the blocks, so an SM with one program
    more than the others may finish last (800 programs on 132 SMs: 8 SMs with 7, the rest 6; where
    an SM's own throughput bounds its programs, those 8 take up to 7/6 as long). None when that is
    fewer than :data:`MIN_PROGRAMS_PER_SM` per SM: the slots of enough programs would spill to
    DRAM, and the caller must do without them. On an H200 (132 SMs, 50 MiB L2: 25 MiB for slots) with BLOCK 256
    at fp32: T = 32 gives 32 KiB slots, 800 fit, P = 792; T = 48 is the largest T with 4 per SM
    (P = 528; T = 256: 100 slots, None)."""
    fit = l2_bytes // 2 // max(slot_bytes, 1)
    if blocks <= fit:
        return max(blocks, 1)
    per_sm = fit // sms
    return per_sm * sms if per_sm >= MIN_PROGRAMS_PER_SM else None


def device_slot_programs(blocks: int, slot_bytes: int, device: torch.device) -> int | None:
    """:func:`l2_slot_programs` for ``device``'s L2 and SMs; :data:`INTERPRETER_PROGRAMS` under the
    interpreter. (The device's properties are cached by torch: no device call per launch.)"""
    if interpreting():
        return INTERPRETER_PROGRAMS
    props = torch.cuda.get_device_properties(device)
    return l2_slot_programs(blocks, slot_bytes, props.L2_cache_size, props.multi_processor_count)


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
