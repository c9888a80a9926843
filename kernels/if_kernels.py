"""Triton kernels for multi-step integrate-and-fire neurons (paper Eq. 3) on CUDA tensors.

Layout (docs/architecture.md): time-major ``[T, N]``, neuron stride 1. One program owns ``BLOCK``
neurons and loops over all ``T`` steps with the membrane in registers, so every element of
``x`` and ``spikes`` moves through memory exactly once per pass. (The persistent backward kernel's
programs own several blocks in turn: :func:`if_bwd`.)

The arithmetic mirrors :func:`rnl_fast.reference.if_sequence` operation by operation
(``u = m − v_th``, spike iff ``u >= 0``, the soft reset written as the same product), so fp32 spikes
are bit-identical to the reference, NaN and infinite inputs included. Python scalars that enter
the arithmetic (``v_reset``, ``width``) are constexprs: Triton then rounds them to the compute
dtype exactly as PyTorch rounds a Python scalar, whereas a runtime float argument would always be
passed as float32 and lose precision in float64 kernels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._autotune import block_configs, device_slot_programs, persistent_block, program_partials, size_class

_PI = tl.constexpr(math.pi)


@triton.jit
def _if_step(
    v,  # [BLOCK] membrane after the previous step, compute dtype
    x_t,  # [BLOCK] input current of this step, compute dtype
    v_th,  # [BLOCK] or scalar threshold, compute dtype
    HARD_RESET: tl.constexpr,  # reset to V_RESET instead of subtracting v_th
    V_RESET: tl.constexpr,  # hard-reset potential (unused for soft reset)
):
    """One IF step: returns (pre-spike membrane m, spike mask, next membrane v)."""
    m = v + x_t
    # Spike iff m − v_th >= 0 (not m >= v_th): identical for finite values, and it also matches the
    # reference when m and v_th are both infinite (inf − inf is NaN: no spike).
    fired = (m - v_th) >= 0
    s = fired.to(m.dtype)
    # v_th·s with s ∈ {0, 1} is exact, so the soft reset matches the reference bit for bit (FMA
    # included). The hard reset selects v_reset after a spike whatever m was (an infinite m too).
    if HARD_RESET:
        v_next = tl.where(fired, V_RESET, m)
    else:
        v_next = m - v_th * s
    return m, fired, v_next


@triton.jit
def _load_neuron_state(
    v_th_ptr,  # [N] or [] threshold
    v_init_ptr,  # [N] or [] initial membrane
    neurons,  # [BLOCK] neuron indices of this program
    in_range,  # [BLOCK] neurons < N
    compute_dtype: tl.constexpr,  # dtype of the membrane
    V_TH_PER_NEURON: tl.constexpr,  # v_th has N elements (else one for all neurons)
    V_INIT_PER_NEURON: tl.constexpr,  # v_init has N elements (else one for all neurons)
    BLOCK: tl.constexpr,  # neurons per program
):
    """The block's thresholds and initial membrane (both kernels start from the same state)."""
    if V_TH_PER_NEURON:
        v_th = tl.load(v_th_ptr + neurons, mask=in_range, other=1.0)
    else:
        v_th = tl.load(v_th_ptr)
    if V_INIT_PER_NEURON:
        v = tl.load(v_init_ptr + neurons, mask=in_range, other=0.0)
    else:
        # The membrane is a loop-carried [BLOCK] tensor, so a scalar v_init must be broadcast.
        v = tl.zeros([BLOCK], dtype=compute_dtype) + tl.load(v_init_ptr)
    return v_th, v


@triton.jit
def _surrogate_grad(
    u,  # [BLOCK] m − v_th, compute dtype
    SURROGATE: tl.constexpr,  # its name: "atan", "rectangle" or "sigmoid" (rnl_fast.numerics.SURROGATES)
    WIDTH: tl.constexpr,  # full width w of the surrogate, in membrane units
):
    """σ'(u), written in the same order of operations as ``reference.surrogate_grad``."""
    if SURROGATE == "atan":
        z = _PI * u / WIDTH
        grad = (1.0 / WIDTH) / (1.0 + z * z)
    elif SURROGATE == "sigmoid":
        # (1/w)·S(u/w)·(1 − S(u/w)) as (1/w)·e/(1 + e)², e = exp(−|u/w|) ≤ 1: no overflow.
        e = tl.exp(-tl.abs(u / WIDTH))
        grad = (1.0 / WIDTH) * e / ((1.0 + e) * (1.0 + e))
    else:
        # Cast the mask before dividing so that 1/w is computed in the compute dtype (float64 too).
        grad = (tl.abs(u) < 0.5 * WIDTH).to(u.dtype) / WIDTH
    return grad


@triton.autotune(configs=block_configs(), key=["size_class"], reset_to_zero=["step_partials_ptr"])
@triton.jit
def _if_fwd_kernel(
    x_ptr,  # [T, N] input current, neuron stride 1, time stride x_time_stride; any float dtype
    v_th_ptr,  # [N] or [] threshold, compute dtype
    v_init_ptr,  # [N] or [] initial membrane, compute dtype
    spikes_ptr,  # [T, N] contiguous out: 0/1 in any float dtype or uint8 (bool viewed as uint8)
    v_final_ptr,  # [N] out: membrane after step T−1; its dtype is the compute dtype
    step_partials_ptr,  # [programs, T] int32, zero-filled: program p writes its spike count of step t at [p, t]
    neuron_counts_ptr,  # [N] int32 out: spikes per neuron over all T steps (if COUNT_NEURONS)
    T,  # number of time steps
    N,  # number of neurons
    x_time_stride,  # elements between x[t] and x[t+1]: N, or 0 for an expanded constant input
    size_class,  # autotune key only (see _autotune.size_class); unused by the kernel
    V_TH_PER_NEURON: tl.constexpr,  # v_th has N elements (else one for all neurons)
    V_INIT_PER_NEURON: tl.constexpr,  # v_init has N elements (else one for all neurons)
    HARD_RESET: tl.constexpr,  # hard reset to V_RESET instead of soft reset by subtraction
    V_RESET: tl.constexpr,  # hard-reset potential
    COUNT_NEURONS: tl.constexpr,  # write neuron_counts (else it is not touched)
    BLOCK: tl.constexpr,  # neurons per program
):
    compute_dtype = v_final_ptr.dtype.element_ty
    neurons = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = neurons < N

    v_th, v = _load_neuron_state(
        v_th_ptr, v_init_ptr, neurons, in_range, compute_dtype, V_TH_PER_NEURON, V_INIT_PER_NEURON, BLOCK
    )
    neuron_spike_count = tl.zeros([BLOCK], dtype=tl.int32)

    # Pointers advance by one row per step instead of computing t·stride, which could overflow
    # int32 for T·N ≥ 2³¹; pointer arithmetic is 64-bit.
    x_ptrs = x_ptr + neurons
    spike_ptrs = spikes_ptr + neurons
    partial_ptr = step_partials_ptr + tl.program_id(0).to(tl.int64) * T
    for _t in range(T):
        x_t = tl.load(x_ptrs, mask=in_range, other=0.0).to(compute_dtype)
        _, fired, v = _if_step(v, x_t, v_th, HARD_RESET, V_RESET)
        fired = fired & in_range
        # Through the compute dtype: exact for 0/1, and the interpreter cannot cast int1 to bfloat16.
        tl.store(spike_ptrs, fired.to(compute_dtype).to(spikes_ptr.dtype.element_ty), mask=in_range)
        neuron_spike_count += fired.to(tl.int32)
        # A plain store per program and step, summed by the host wrapper: atomic adds of every
        # program into the T counters of one cache line serialise there (measured on an H200:
        # ~0.5 ms of a 1.6 ms forward at T = 32, N = 16M, whatever the bytes moved).
        tl.store(partial_ptr, tl.sum(fired.to(tl.int32), axis=0))
        x_ptrs += x_time_stride
        spike_ptrs += N
        partial_ptr += 1

    tl.store(v_final_ptr + neurons, v, mask=in_range)
    if COUNT_NEURONS:
        tl.store(neuron_counts_ptr + neurons, neuron_spike_count, mask=in_range)


@triton.jit
def _if_bwd_block(
    neurons,  # [BLOCK] neuron indices of the block (≥ N: past the end, masked)
    membrane_ptr,  # the block's scratch, compute dtype: m_t of its neuron i at t·membrane_row + membrane_columns[i]
    membrane_columns,  # [BLOCK] columns of the block's neurons in the scratch: neurons, or 0..BLOCK−1 in a slot
    membrane_row,  # elements per scratch row: N (the full [T, N] scratch) or BLOCK (a [T, BLOCK] slot)
    grad_spikes_ptr,  # [T, N] contiguous gradient of the spikes (float dtype), if HAS_GRAD_SPIKES
    grad_v_final_ptr,  # [N] gradient of the final membrane, compute dtype, if HAS_GRAD_V_FINAL
    x_ptr,  # [T, N] input current, neuron stride 1, time stride x_time_stride
    v_th_ptr,  # [N] or [] threshold, compute dtype
    v_init_ptr,  # [N] or [] initial membrane, compute dtype
    grad_x_ptr,  # [T, N] contiguous out, x's dtype
    grad_v_init_ptr,  # [N] out; its dtype is the compute dtype
    T,  # number of time steps
    N,  # number of neurons
    x_time_stride,  # elements between x[t] and x[t+1]: N, or 0 for an expanded constant input
    HAS_GRAD_SPIKES: tl.constexpr,  # else the spikes' gradient is zero
    HAS_GRAD_V_FINAL: tl.constexpr,  # else the final membrane's gradient is zero
    V_TH_PER_NEURON: tl.constexpr,  # v_th has N elements (else one for all neurons)
    V_INIT_PER_NEURON: tl.constexpr,  # v_init has N elements (else one for all neurons)
    HARD_RESET: tl.constexpr,  # hard reset to V_RESET instead of soft reset by subtraction
    V_RESET: tl.constexpr,  # hard-reset potential
    SURROGATE: tl.constexpr,  # surrogate name, "atan", "rectangle" or "sigmoid"
    WIDTH: tl.constexpr,  # surrogate width w > 0
    DETACH_RESET: tl.constexpr,  # no gradient through the reset term
    BLOCK: tl.constexpr,  # neurons per block
    STAGES: tl.constexpr,  # time steps whose loads are in flight at once (1: each step's in turn)
):
    """BPTT of one block of neurons through a scratch of its membrane (both backward kernels).

    ``STAGES`` > 1 has Triton pipeline each pass's loads that many steps ahead (asynchronous copies
    into shared memory on sm_80+; their values do not depend on the membrane); 1 compiles to the
    same code as a plain ``range`` loop."""
    compute_dtype = grad_v_init_ptr.dtype.element_ty
    in_range = neurons < N

    v_th, v = _load_neuron_state(
        v_th_ptr, v_init_ptr, neurons, in_range, compute_dtype, V_TH_PER_NEURON, V_INIT_PER_NEURON, BLOCK
    )

    # Pass 1, forward in time: recompute the membrane (same _if_step as the forward kernel, so the
    # same values) and keep m_t, which is all the reverse sweep needs.
    x_ptrs = x_ptr + neurons
    membrane_ptrs = membrane_ptr + membrane_columns
    for _t in tl.range(T, num_stages=STAGES):
        x_t = tl.load(x_ptrs, mask=in_range, other=0.0).to(compute_dtype)
        m, _, v = _if_step(v, x_t, v_th, HARD_RESET, V_RESET)
        tl.store(membrane_ptrs, m, mask=in_range)
        x_ptrs += x_time_stride
        membrane_ptrs += membrane_row
    # Pass 2 reads back what pass 1 wrote; order the two even if threads hold different elements.
    tl.debug_barrier()

    # Pass 2, backward in time from row T−1 (int64: (T−1)·N can exceed int32).
    last_row = tl.cast(T - 1, tl.int64) * N
    membrane_ptrs = membrane_ptr + tl.cast(T - 1, tl.int64) * membrane_row + membrane_columns
    grad_spike_ptrs = grad_spikes_ptr + last_row + neurons
    grad_x_ptrs = grad_x_ptr + last_row + neurons
    if HAS_GRAD_V_FINAL:
        grad_v = tl.load(grad_v_final_ptr + neurons, mask=in_range, other=0.0)
    else:
        grad_v = tl.zeros([BLOCK], dtype=compute_dtype)
    for _ in tl.range(T, num_stages=STAGES):
        m = tl.load(membrane_ptrs, mask=in_range, other=0.0)
        u = m - v_th
        surrogate = _surrogate_grad(u, SURROGATE, WIDTH)
        # Summed in autograd's order on the reference (so an overflow gives the same inf or NaN):
        # dL/dm = (direct path through v) + (dL/ds from the spike and the reset)·σ'.
        if HARD_RESET:
            grad_m = grad_v * (1.0 - (u >= 0).to(compute_dtype))
        else:
            grad_m = grad_v
        if not DETACH_RESET:
            if HARD_RESET:
                grad_s = grad_v * (V_RESET - m)
            else:
                grad_s = -grad_v * v_th
            if HAS_GRAD_SPIKES:
                grad_s = tl.load(grad_spike_ptrs, mask=in_range, other=0.0).to(compute_dtype) + grad_s
            grad_m += grad_s * surrogate
        elif HAS_GRAD_SPIKES:
            grad_m += tl.load(grad_spike_ptrs, mask=in_range, other=0.0).to(compute_dtype) * surrogate
        tl.store(grad_x_ptrs, grad_m.to(grad_x_ptr.dtype.element_ty), mask=in_range)
        # m_t = v_{t−1} + x_t, so dL/dv_{t−1} = dL/dx_t = dL/dm_t.
        grad_v = grad_m
        membrane_ptrs -= membrane_row
        grad_spike_ptrs -= N
        grad_x_ptrs -= N

    tl.store(grad_v_init_ptr + neurons, grad_v, mask=in_range)


@triton.autotune(configs=block_configs(), key=["size_class"])
@triton.jit
def _if_bwd_kernel(
    grad_spikes_ptr,  # [T, N] contiguous gradient of the spikes (float dtype), if HAS_GRAD_SPIKES
    grad_v_final_ptr,  # [N] gradient of the final membrane, compute dtype, if HAS_GRAD_V_FINAL
    x_ptr,  # [T, N] input current, neuron stride 1, time stride x_time_stride
    v_th_ptr,  # [N] or [] threshold, compute dtype
    v_init_ptr,  # [N] or [] initial membrane, compute dtype
    membrane_ptr,  # [T, N] contiguous scratch, compute dtype: pre-spike membrane m_t per step
    grad_x_ptr,  # [T, N] contiguous out, x's dtype
    grad_v_init_ptr,  # [N] out; its dtype is the compute dtype
    T,  # number of time steps
    N,  # number of neurons
    x_time_stride,  # elements between x[t] and x[t+1]: N, or 0 for an expanded constant input
    size_class,  # autotune key only (see _autotune.size_class); unused by the kernel
    HAS_GRAD_SPIKES: tl.constexpr,  # else the spikes' gradient is zero
    HAS_GRAD_V_FINAL: tl.constexpr,  # else the final membrane's gradient is zero
    V_TH_PER_NEURON: tl.constexpr,  # v_th has N elements (else one for all neurons)
    V_INIT_PER_NEURON: tl.constexpr,  # v_init has N elements (else one for all neurons)
    HARD_RESET: tl.constexpr,  # hard reset to V_RESET instead of soft reset by subtraction
    V_RESET: tl.constexpr,  # hard-reset potential
    SURROGATE: tl.constexpr,  # surrogate name, "atan", "rectangle" or "sigmoid"
    WIDTH: tl.constexpr,  # surrogate width w > 0
    DETACH_RESET: tl.constexpr,  # no gradient through the reset term
    BLOCK: tl.constexpr,  # neurons per program
):
    """One program per block; block b keeps its membrane in columns b·BLOCK.. of the [T, N] scratch."""
    neurons = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _if_bwd_block(
        neurons,
        membrane_ptr,
        neurons,
        N,
        grad_spikes_ptr,
        grad_v_final_ptr,
        x_ptr,
        v_th_ptr,
        v_init_ptr,
        grad_x_ptr,
        grad_v_init_ptr,
        T,
        N,
        x_time_stride,
        HAS_GRAD_SPIKES,
        HAS_GRAD_V_FINAL,
        V_TH_PER_NEURON,
        V_INIT_PER_NEURON,
        HARD_RESET,
        V_RESET,
        SURROGATE,
        WIDTH,
        DETACH_RESET,
        BLOCK,
        1,  # one step at a time: the code the GPU runs measured (docs/gpu.md)
    )


#: Time steps whose loads each thread of the persistent kernel has in flight (x in pass 1; the
#: membrane and grad_spikes in pass 2). Its slots cap the neurons in flight at what half the L2
#: holds: 202,752 at T = 32 fp32 on an H200 (792 programs of 256, 6 of 4 warps per SM), so one
#: step's loads put ~6 KB in flight per SM, where keeping an SM's share of the DRAM bandwidth
#: (4.8 TB/s / 132 ≈ 36 GB/s) busy across a ~0.7 µs load latency (an estimate) takes ~25 KB
#: (Little's law). Three steps ahead (Triton's default stage count on sm_90) makes it ~18 KB. The
#: full-scratch kernel loads one step at a time (its measured code): with a program per block, up
#: to 64 warps per SM hold up to ~10x the neurons (BLOCK 1024 at full occupancy).
_SLOT_STAGES = tl.constexpr(3)  # a constexpr: a jitted function may read no other global


@triton.jit
def _if_bwd_slots_kernel(
    grad_spikes_ptr,  # [T, N] contiguous gradient of the spikes (float dtype), if HAS_GRAD_SPIKES
    grad_v_final_ptr,  # [N] gradient of the final membrane, compute dtype, if HAS_GRAD_V_FINAL
    x_ptr,  # [T, N] input current, neuron stride 1, time stride x_time_stride
    v_th_ptr,  # [N] or [] threshold, compute dtype
    v_init_ptr,  # [N] or [] initial membrane, compute dtype
    membrane_ptr,  # [programs, T, BLOCK] contiguous scratch, compute dtype: program p's slot at p·T·BLOCK
    grad_x_ptr,  # [T, N] contiguous out, x's dtype
    grad_v_init_ptr,  # [N] out; its dtype is the compute dtype
    T,  # number of time steps
    N,  # number of neurons
    x_time_stride,  # elements between x[t] and x[t+1]: N, or 0 for an expanded constant input
    HAS_GRAD_SPIKES: tl.constexpr,  # else the spikes' gradient is zero
    HAS_GRAD_V_FINAL: tl.constexpr,  # else the final membrane's gradient is zero
    V_TH_PER_NEURON: tl.constexpr,  # v_th has N elements (else one for all neurons)
    V_INIT_PER_NEURON: tl.constexpr,  # v_init has N elements (else one for all neurons)
    HARD_RESET: tl.constexpr,  # hard reset to V_RESET instead of soft reset by subtraction
    V_RESET: tl.constexpr,  # hard-reset potential
    SURROGATE: tl.constexpr,  # surrogate name, "atan", "rectangle" or "sigmoid"
    WIDTH: tl.constexpr,  # surrogate width w > 0
    DETACH_RESET: tl.constexpr,  # no gradient through the reset term
    BLOCK: tl.constexpr,  # neurons per block
):
    """Persistent: program p of P takes blocks p, p + P, p + 2P, … in turn, each through the same
    [T, BLOCK] slot of the scratch, so that the whole scratch (P·T·BLOCK) can stay in L2."""
    program = tl.program_id(0)
    # int64: P·T·BLOCK stays small here, but a slot offset must not wrap if the sizing changes.
    slot_ptr = membrane_ptr + program.to(tl.int64) * T * BLOCK
    for block in range(program, tl.cdiv(N, BLOCK), tl.num_programs(0)):
        # The threads that read the slot's rows in the previous block's pass 2 need not be those
        # that write them now in pass 1: finish those reads first.
        tl.debug_barrier()
        _if_bwd_block(
            block * BLOCK + tl.arange(0, BLOCK),
            slot_ptr,
            tl.arange(0, BLOCK),
            BLOCK,
            grad_spikes_ptr,
            grad_v_final_ptr,
            x_ptr,
            v_th_ptr,
            v_init_ptr,
            grad_x_ptr,
            grad_v_init_ptr,
            T,
            N,
            x_time_stride,
            HAS_GRAD_SPIKES,
            HAS_GRAD_V_FINAL,
            V_TH_PER_NEURON,
            V_INIT_PER_NEURON,
            HARD_RESET,
            V_RESET,
            SURROGATE,
            WIDTH,
            DETACH_RESET,
            BLOCK,
            _SLOT_STAGES,
        )


def _grid(N: int) -> Callable[[dict], tuple[int]]:
    """One program per BLOCK neurons; BLOCK is the autotuner's choice."""

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(N, meta["BLOCK"]),)

    return grid


def sum_step_partials(partials: torch.Tensor, step_counts: torch.Tensor) -> None:
    """``step_counts [T]`` int64 ← the spike counts of every program (``partials [programs, T]``) summed."""
    torch.sum(partials, dim=0, dtype=torch.int64, out=step_counts)


def _spike_storage(spikes: torch.Tensor) -> torch.Tensor:
    """A torch.bool tensor is written through a uint8 view, whose 0/1 bytes are valid booleans."""
    return spikes.view(torch.uint8) if spikes.dtype == torch.bool else spikes


def if_fwd(
    x: torch.Tensor,
    v_th: torch.Tensor,
    v_init: torch.Tensor,
    v_reset: float,
    hard_reset: bool,
    spikes: torch.Tensor,
    v_final: torch.Tensor,
    step_counts: torch.Tensor,
    neuron_counts: torch.Tensor | None,
) -> None:
    """Runs T steps of IF neurons; writes into the caller's output tensors (``rnl_fast.ops`` validates).

    Args:
        x: ``[T, N]`` float32/float16/bfloat16/float64, ``x.stride(1) == 1`` and
            ``x.stride(0)`` ``N`` or ``0`` (an expanded constant input, read, never materialised).
        v_th, v_init: ``[N]`` or ``[]`` (one value for all neurons), compute dtype (float32,
            float64 for float64 ``x``).
        v_reset: hard-reset potential; ignored unless ``hard_reset``.
        hard_reset: reset to ``v_reset`` after a spike instead of subtracting ``v_th``.
        spikes: ``[T, N]`` contiguous out, 0/1 in float32/float16/bfloat16/float64/uint8/bool.
        v_final: ``[N]`` out, compute dtype.
        step_counts: ``[T]`` int64 out, spikes per step summed over neurons.
        neuron_counts: ``[N]`` int32 out, spikes per neuron summed over steps; None: not counted.
    """
    T, N = x.shape
    partials = program_partials(N, T, torch.int32, x.device)

    _if_fwd_kernel[_grid(N)](
        x,
        v_th,
        v_init,
        _spike_storage(spikes),
        v_final,
        partials,
        neuron_counts if neuron_counts is not None else partials,  # placeholder, never written
        T,
        N,
        x.stride(0),
        size_class(N),
        V_TH_PER_NEURON=v_th.numel() != 1,
        V_INIT_PER_NEURON=v_init.numel() != 1,
        HARD_RESET=hard_reset,
        # A fixed value for soft reset, so that v_reset does not trigger a recompile there.
        V_RESET=float(v_reset) if hard_reset else 0.0,
        COUNT_NEURONS=neuron_counts is not None,
    )
    sum_step_partials(partials, step_counts)


#: Values of ``RNL_FAST_IF_BWD``, the IF backward's kernel (:func:`if_bwd_kernel_choice`).
IF_BWD_KERNELS = ("scratch", "slots")


def if_bwd_kernel_choice() -> str:
    """``RNL_FAST_IF_BWD``, read on every call: ``scratch`` (default: one program per block, the
    membrane through a full ``[T, N]`` scratch) or ``slots`` (persistent programs, the membrane
    through one L2-sized slot per program). Both give the same bits; which is faster is for a GPU
    run to show (docs/gpu.md), and the default stays the measured one until then."""
    choice = os.environ.get("RNL_FAST_IF_BWD", "").strip().lower() or "scratch"
    if choice not in IF_BWD_KERNELS:
        raise ValueError(f"RNL_FAST_IF_BWD must be one of {IF_BWD_KERNELS}, got {choice!r}")
    return choice


def if_bwd(
    grad_spikes: torch.Tensor | None,
    grad_v_final: torch.Tensor | None,
    x: torch.Tensor,
    v_th: torch.Tensor,
    v_init: torch.Tensor,
    v_reset: float,
    hard_reset: bool,
    surrogate: str,
    width: float,
    detach_reset: bool,
    grad_x: torch.Tensor,
    grad_v_init: torch.Tensor,
) -> None:
    """Backpropagation through time for :func:`if_fwd` with a surrogate spike derivative.

    Recomputes the membrane from ``x`` (nothing else is saved by the forward pass) into a
    compute-dtype scratch, then sweeps t = T−1..0. The scratch (:func:`if_bwd_kernel_choice`):
    ``[T, N]`` (``scratch``), or with ``RNL_FAST_IF_BWD=slots`` ``[P, T, BLOCK]``, one slot per
    program of a persistent launch, P sized so that all slots fit half the device's L2
    (:func:`._autotune.l2_slot_programs`). Where the slots of enough programs to fill the SMs
    would not fit (T above 48 at fp32 on an H200 with a 50 MiB L2), they would spill to DRAM, and
    the full-scratch kernel runs instead: the measured one, whose DRAM traffic they would then
    match.

    Args:
        grad_spikes: ``[T, N]`` contiguous float gradient of the spikes, or None for zeros.
        grad_v_final: ``[N]`` compute-dtype gradient of the final membrane, or None for zeros.
        x, v_th, v_init, v_reset, hard_reset: as in :func:`if_fwd`.
        surrogate: ``"atan"``, ``"rectangle"`` or ``"sigmoid"`` (``reference.surrogate_grad``).
        width: surrogate width w > 0, in membrane units.
        detach_reset: no gradient through the reset term.
        grad_x: ``[T, N]`` contiguous out in ``x.dtype`` (full size even when ``x.stride(0) == 0``).
        grad_v_init: ``[N]`` out, compute dtype.
    """
    T, N = x.shape
    inputs = (
        grad_spikes if grad_spikes is not None else x,  # placeholder pointer, never read
        grad_v_final if grad_v_final is not None else grad_v_init,  # placeholder, never read
        x,
        v_th,
        v_init,
    )
    options = dict(
        HAS_GRAD_SPIKES=grad_spikes is not None,
        HAS_GRAD_V_FINAL=grad_v_final is not None,
        V_TH_PER_NEURON=v_th.numel() != 1,
        V_INIT_PER_NEURON=v_init.numel() != 1,
        HARD_RESET=hard_reset,
        V_RESET=float(v_reset) if hard_reset else 0.0,
        SURROGATE=surrogate,
        WIDTH=float(width),
        DETACH_RESET=detach_reset,
        enable_fp_fusion=False,  # no FMA: the sums round as autograd's separate ops on the reference
    )
    config, programs = persistent_block(), None
    if if_bwd_kernel_choice() == "slots":
        slot_bytes = T * config["BLOCK"] * grad_v_init.element_size()
        programs = device_slot_programs(triton.cdiv(N, config["BLOCK"]), slot_bytes, x.device)
    if programs is None:  # the default, or slots too many for L2: the full scratch (docstring)
        membrane = torch.empty((T, N), dtype=grad_v_init.dtype, device=x.device)
        _if_bwd_kernel[_grid(N)](*inputs, membrane, grad_x, grad_v_init, T, N, x.stride(0), size_class(N), **options)
    else:
        membrane = torch.empty((programs, T, config["BLOCK"]), dtype=grad_v_init.dtype, device=x.device)
        _if_bwd_slots_kernel[(programs,)](
            *inputs, membrane, grad_x, grad_v_init, T, N, x.stride(0), **options, **config
        )
