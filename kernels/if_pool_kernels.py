"""Triton kernel for IF neurons fused with the 2×2 average pooling after them (inference).

One program owns ``BLOCK`` 2×2 windows ("quads") of the ``[planes, H, W, inner]`` neurons (NCHW:
``inner`` = 1; channels-last: ``planes`` = B, ``inner`` = C, windows of neighbouring channels in
neighbouring lanes) and loops
over all ``T`` steps with the four membranes of each quad in registers; per step it reads the
four input currents and writes one pooled value, so the spike tensor is never stored. The quads
tile every neuron: with an odd H or W the last quad row/column holds fewer neurons, which are
simulated and counted, and pooled only under ``ceil_mode`` (averaged over the neurons they hold,
as ``avg_pool2d``). The step is :func:`if_kernels._if_step`, so spikes equal the reference's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._autotune import block_configs, program_partials, size_class
from .if_kernels import _if_step, _load_neuron_state, sum_step_partials


@triton.jit
def _fire(
    v, x_ptrs, time_offset, mask, v_th, compute_dtype: tl.constexpr, HARD_RESET: tl.constexpr, V_RESET: tl.constexpr
):
    """One step of one neuron of each quad: returns (spike as int32, 0 where masked; next membrane)."""
    x_t = tl.load(x_ptrs + time_offset, mask=mask, other=0.0).to(compute_dtype)
    _, fired, v = _if_step(v, x_t, v_th, HARD_RESET, V_RESET)
    return (fired & mask).to(tl.int32), v


@triton.jit
def _to_output(value, out_dtype: tl.constexpr):
    """``value`` (compute dtype) cast to ``out_dtype``, rounded to nearest even. bfloat16 is rounded
    by hand first: the interpreter truncates float32 → bfloat16 casts where GPUs round, and after
    the rounding both casts are exact."""
    if out_dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    return value.to(out_dtype)


@triton.autotune(configs=block_configs(), key=["size_class"], reset_to_zero=["step_partials_ptr"])
@triton.jit
def _if_fwd_pool_kernel(
    x_ptr,  # [T, N] input current, neuron stride 1, time stride x_time_stride; N = planes·H·W·inner
    v_th_ptr,  # [N] or [] threshold, compute dtype
    v_init_ptr,  # [N] or [] initial membrane, compute dtype
    scale_ptr,  # [] compute dtype: factor of every pooled value (a pointer: no recompile per value)
    pooled_ptr,  # [T, planes, OH, OW, inner] contiguous out, x's dtype
    v_final_ptr,  # [N] out: membrane after step T−1, compute dtype
    step_partials_ptr,  # [programs, T] int32, zero-filled: program p writes its spike count of step t at [p, t]
    neuron_counts_ptr,  # [N] int32 out: spikes per neuron over all T steps (if COUNT_NEURONS)
    T,  # number of time steps
    H,  # plane height
    W,  # plane width
    INNER,  # neurons per (plane, row, column): the dims after W, e.g. channels-last C
    OH,  # pooled height (H // 2, or ⌈H/2⌉ with ceil_mode)
    OW,  # pooled width
    QH,  # quad rows per plane, ⌈H/2⌉
    QW,  # quad columns per plane, ⌈W/2⌉
    num_quads,  # planes · QH · QW · inner
    pooled_step,  # planes · OH · OW · inner: elements between pooled[t] and pooled[t+1]
    x_time_stride,  # elements between x[t] and x[t+1]: N, or 0 for an expanded constant input
    size_class,  # autotune key only (see _autotune.size_class); unused by the kernel
    V_TH_PER_NEURON: tl.constexpr,  # v_th has N elements (else one for all neurons)
    V_INIT_PER_NEURON: tl.constexpr,  # v_init has N elements (else one for all neurons)
    HARD_RESET: tl.constexpr,  # hard reset to V_RESET instead of soft reset by subtraction
    V_RESET: tl.constexpr,  # hard-reset potential
    COUNT_NEURONS: tl.constexpr,  # write neuron_counts (else it is not touched)
    BLOCK: tl.constexpr,  # quads per program
):
    compute_dtype = v_final_ptr.dtype.element_ty
    quads = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = quads < num_quads
    k = quads % INNER
    qj = (quads // INNER) % QW
    qi = (quads // (INNER * QW)) % QH
    plane = quads // (INNER * QW * QH)
    # The quad's top-left neuron and its neighbours; int64: planes·H·W·inner may pass 2³¹.
    n00 = ((plane.to(tl.int64) * H + 2 * qi) * W + 2 * qj) * INNER + k
    right = INNER
    below = W * INNER
    has_right = 2 * qj + 1 < W
    has_bottom = 2 * qi + 1 < H
    m00 = in_range
    m01 = in_range & has_right
    m10 = in_range & has_bottom
    m11 = m01 & has_bottom

    th00, v00 = _load_neuron_state(
        v_th_ptr, v_init_ptr, n00, m00, compute_dtype, V_TH_PER_NEURON, V_INIT_PER_NEURON, BLOCK
    )
    th01, v01 = _load_neuron_state(
        v_th_ptr, v_init_ptr, n00 + right, m01, compute_dtype, V_TH_PER_NEURON, V_INIT_PER_NEURON, BLOCK
    )
    th10, v10 = _load_neuron_state(
        v_th_ptr, v_init_ptr, n00 + below, m10, compute_dtype, V_TH_PER_NEURON, V_INIT_PER_NEURON, BLOCK
    )
    th11, v11 = _load_neuron_state(
        v_th_ptr, v_init_ptr, n00 + below + right, m11, compute_dtype, V_TH_PER_NEURON, V_INIT_PER_NEURON, BLOCK
    )
    c00 = tl.zeros([BLOCK], dtype=tl.int32)
    c01 = tl.zeros([BLOCK], dtype=tl.int32)
    c10 = tl.zeros([BLOCK], dtype=tl.int32)
    c11 = tl.zeros([BLOCK], dtype=tl.int32)

    # k spikes of a window of n neurons give (k · 1/n) · scale: k/n is exact (1/n is 1, ½ or ¼),
    # then one rounding, as avg_pool2d then × scale (scale/n first would lose a subnormal's bits).
    neurons_in_quad = 1 + has_right.to(tl.int32) + has_bottom.to(tl.int32) + (has_right & has_bottom).to(tl.int32)
    inverse = tl.where(neurons_in_quad == 4, 0.25, tl.where(neurons_in_quad == 2, 0.5, 1.0))
    scale = tl.load(scale_ptr)
    inverse = inverse.to(compute_dtype)
    out_mask = in_range & (qi < OH) & (qj < OW)
    out_ptrs = pooled_ptr + ((plane.to(tl.int64) * OH + qi) * OW + qj) * INNER + k

    x_ptrs = x_ptr + n00
    time_offset = tl.cast(0, tl.int64)
    partial_ptr = step_partials_ptr + tl.program_id(0).to(tl.int64) * T
    for _t in range(T):
        s00, v00 = _fire(v00, x_ptrs, time_offset, m00, th00, compute_dtype, HARD_RESET, V_RESET)
        s01, v01 = _fire(v01, x_ptrs + right, time_offset, m01, th01, compute_dtype, HARD_RESET, V_RESET)
        s10, v10 = _fire(v10, x_ptrs + below, time_offset, m10, th10, compute_dtype, HARD_RESET, V_RESET)
        s11, v11 = _fire(v11, x_ptrs + below + right, time_offset, m11, th11, compute_dtype, HARD_RESET, V_RESET)
        c00 += s00
        c01 += s01
        c10 += s10
        c11 += s11
        k = s00 + s01 + s10 + s11
        pooled = k.to(compute_dtype) * inverse * scale
        tl.store(out_ptrs, _to_output(pooled, pooled_ptr.dtype.element_ty), mask=out_mask)
        tl.store(partial_ptr, tl.sum(k, axis=0))  # no atomics: see _if_fwd_kernel
        time_offset += x_time_stride
        out_ptrs += pooled_step
        partial_ptr += 1

    tl.store(v_final_ptr + n00, v00, mask=m00)
    tl.store(v_final_ptr + n00 + right, v01, mask=m01)
    tl.store(v_final_ptr + n00 + below, v10, mask=m10)
    tl.store(v_final_ptr + n00 + below + right, v11, mask=m11)
    if COUNT_NEURONS:
        tl.store(neuron_counts_ptr + n00, c00, mask=m00)
        tl.store(neuron_counts_ptr + n00 + right, c01, mask=m01)
        tl.store(neuron_counts_ptr + n00 + below, c10, mask=m10)
        tl.store(neuron_counts_ptr + n00 + below + right, c11, mask=m11)


def _grid(num_quads: int) -> Callable[[dict], tuple[int]]:
    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(num_quads, meta["BLOCK"]),)

    return grid


def if_fwd_pool2x2(
    x: torch.Tensor,
    geometry: tuple[int, int, int, int],
    ceil_mode: bool,
    v_th: torch.Tensor,
    v_init: torch.Tensor,
    v_reset: float,
    hard_reset: bool,
    scale: float,
    pooled: torch.Tensor,
    v_final: torch.Tensor,
    step_counts: torch.Tensor,
    neuron_counts: torch.Tensor | None,
) -> None:
    """T steps of IF neurons with their spikes averaged over 2×2 windows; writes the caller's outputs.

    Args:
        x: ``[T, N]``, ``N = planes·H·W·inner``, neuron stride 1, time stride ``N`` or ``0``.
        geometry: ``(planes, H, W, inner)``: the neurons lie as ``[planes, H, W, inner]``.
        ceil_mode: keep the windows overhanging an odd last row or column (``nn.AvgPool2d``).
        v_th, v_init, v_reset, hard_reset: as in :func:`rnl_fast.kernels.if_fwd`.
        scale: factor of every pooled value.
        pooled: ``[T, planes·OH·OW·inner]`` contiguous out, ``x.dtype``.
        v_final, step_counts, neuron_counts: as in :func:`rnl_fast.kernels.if_fwd` (None: not counted).
    """
    T, _N = x.shape
    planes, H, W, inner = geometry
    QH, QW = (H + 1) // 2, (W + 1) // 2
    OH, OW = (QH, QW) if ceil_mode else (H // 2, W // 2)
    num_quads = planes * QH * QW * inner
    partials = program_partials(num_quads, T, torch.int32, x.device)
    scale_t = torch.full((), scale, dtype=v_final.dtype, device=x.device)  # a queued fill: no host sync
    _if_fwd_pool_kernel[_grid(num_quads)](
        x,
        v_th,
        v_init,
        scale_t,
        pooled,
        v_final,
        partials,
        neuron_counts if neuron_counts is not None else partials,  # placeholder, never written
        T,
        H,
        W,
        inner,
        OH,
        OW,
        QH,
        QW,
        num_quads,
        planes * OH * OW * inner,
        x.stride(0),
        size_class(num_quads),
        V_TH_PER_NEURON=v_th.numel() != 1,
        V_INIT_PER_NEURON=v_init.numel() != 1,
        HARD_RESET=hard_reset,
        V_RESET=float(v_reset) if hard_reset else 0.0,
        COUNT_NEURONS=neuron_counts is not None,
    )
    sum_step_partials(partials, step_counts)
