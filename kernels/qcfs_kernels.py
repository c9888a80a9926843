"""Triton kernels for the QCFS activation (Bu et al., ICLR 2022) on CUDA tensors.

``y = λ·clamp(floor(x/λ·L + ½)/L, 0, 1)`` and its straight-through gradients, each op rounded as
``rnl_fast.reference.qcfs`` rounds it on the tensor's device (the launches disable FMA). λ is read
through a pointer, never on the host. The gradient of λ, a sum over all elements, goes through one
partial sum per program and a torch sum, not float atomics: the same result from run to run. As
Rate Norm's, the kernels launch with one fixed config (:func:`._autotune.fixed_block`).

Division by L follows PyTorch on the device of the tensors: on CUDA, ``tensor / L`` (L a Python
int) is a product with 1/L, taken in double and rounded to the compute dtype; on CPU (these kernels
under the Triton interpreter) a correctly rounded division (``BY_RECIPROCAL``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import fixed_block, fixed_programs
from .rate_norm_kernels import _div_ieee


@triton.jit
def _to_storage(
    v,  # [BLOCK] compute dtype
    DTYPE: tl.constexpr,  # the dtype of the output tensor
):
    """v in DTYPE, rounded to nearest even as torch rounds it. bfloat16 is rounded by hand first
    (then the conversion is exact): the Triton interpreter's own float32 → bfloat16 truncates."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return v.to(DTYPE)


@triton.jit
def _over_levels(
    v,  # [BLOCK] compute dtype
    LEVELS: tl.constexpr,  # L > 0
    BY_RECIPROCAL: tl.constexpr,  # v·(1/L) as PyTorch divides a CUDA tensor by a Python int; else v/L
):
    """v / L, rounded as the reference's ``tensor / L`` on the tensor's device."""
    if BY_RECIPROCAL:
        inverse = (tl.full((), 1.0, tl.float64) / LEVELS).to(v.dtype)
        return v * inverse
    else:
        return _div_ieee(v, tl.full(v.shape, LEVELS, v.dtype))


@triton.jit
def _qcfs_rate(
    x,  # [BLOCK] input, compute dtype
    lam,  # scalar λ > 0, compute dtype
    LEVELS: tl.constexpr,  # L > 0
    BY_RECIPROCAL: tl.constexpr,  # see _over_levels
):
    """(clamp(k/L, 0, 1) with k = floor(x/λ·L + ½), QCFS's gradient window 0 ≤ k/L ≤ 1 as
    torch.clamp's backward sees it, u = x/λ). NaN stays NaN and is outside the window."""
    u = _div_ieee(x, lam)
    k = tl.floor(u * LEVELS + 0.5)
    q = _over_levels(k, LEVELS, BY_RECIPROCAL)
    rate = tl.where(q < 0, 0.0, tl.where(q > 1, 1.0, q))
    return rate, (q >= 0) & (q <= 1), u


@triton.jit
def _qcfs_fwd_kernel(
    x_ptr,  # [M] contiguous input, any float dtype
    threshold_ptr,  # [] λ in the compute dtype
    y_ptr,  # [M] out, x's dtype
    M,  # number of elements
    LEVELS: tl.constexpr,  # L > 0
    BY_RECIPROCAL: tl.constexpr,  # see _over_levels
    BLOCK: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < M
    lam = tl.load(threshold_ptr)
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(lam.dtype)
    rate, _, _ = _qcfs_rate(x, lam, LEVELS, BY_RECIPROCAL)
    tl.store(y_ptr + offsets, _to_storage(rate * lam, y_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _qcfs_bwd_kernel(
    grad_y_ptr,  # [M] gradient of y, x's dtype
    x_ptr,  # [M] contiguous input, any float dtype
    threshold_ptr,  # [] λ in the compute dtype
    grad_x_ptr,  # [M] out, x's dtype
    partials_ptr,  # [programs] compute dtype: dL/dλ of each program's block
    M,  # number of elements
    LEVELS: tl.constexpr,  # L > 0
    BY_RECIPROCAL: tl.constexpr,  # see _over_levels
    BLOCK: tl.constexpr,  # elements per program
):
    program = tl.program_id(0)
    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < M
    lam = tl.load(threshold_ptr)
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(lam.dtype)
    g = tl.load(grad_y_ptr + offsets, mask=in_range, other=0.0).to(lam.dtype)
    # Recompute the rate rather than save it: one read of x instead of a write and a read of y.
    rate, inside, u = _qcfs_rate(x, lam, LEVELS, BY_RECIPROCAL)
    # Autograd's chain through y = clamp(k/L)·λ with the floor straight through: ·λ, the clamp's
    # window, /L, ·L, then /λ to x; λ also gets g·clamp(k/L) and −g_w·((x/λ)/λ).
    g_w = _over_levels(tl.where(inside, g * lam, 0.0), LEVELS, BY_RECIPROCAL) * LEVELS
    tl.store(grad_x_ptr + offsets, _to_storage(_div_ieee(g_w, lam), grad_x_ptr.dtype.element_ty), mask=in_range)
    # Out-of-range lanes have g = 0 and x = 0: they add nothing.
    tl.store(partials_ptr + program, tl.sum(g * rate + -g_w * _div_ieee(u, lam), axis=0))


def qcfs_fwd(x: torch.Tensor, threshold: torch.Tensor, y: torch.Tensor, levels: int) -> None:
    """QCFS forward into ``y``; ``rnl_fast.ops`` validates.

    Args:
        x: ``[M]`` contiguous, float32/float64/float16/bfloat16, M ≥ 1.
        threshold: ``[]`` λ > 0 in the compute dtype (float32, float64 for float64 ``x``).
        y: ``[M]`` out, ``x.dtype``: ``λ·clamp(floor(x/λ·L + ½)/L, 0, 1)``.
        levels: L > 0.
    """
    M = x.numel()
    _qcfs_fwd_kernel[(fixed_programs(M),)](
        x,
        threshold,
        y,
        M,
        LEVELS=int(levels),
        BY_RECIPROCAL=x.device.type == "cuda",
        enable_fp_fusion=False,  # no FMA: x/λ·L + ½ rounds twice, as the reference's separate ops
        **fixed_block(),
    )


def qcfs_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    threshold: torch.Tensor,
    grad_x: torch.Tensor,
    grad_threshold: torch.Tensor,
    levels: int,
) -> None:
    """QCFS backward; recomputes the rate from ``x``.

    Args:
        grad_y: ``[M]`` gradient of y, ``x.dtype``.
        x, threshold, levels: as in :func:`qcfs_fwd`.
        grad_x: ``[M]`` out, ``x.dtype``.
        grad_threshold: ``[]`` out, compute dtype: dL/dλ summed over all elements.
    """
    M = x.numel()
    programs = fixed_programs(M)
    partials = torch.empty(programs, dtype=threshold.dtype, device=x.device)  # every program writes its own
    _qcfs_bwd_kernel[(programs,)](
        grad_y,
        x,
        threshold,
        grad_x,
        partials,
        M,
        LEVELS=int(levels),
        BY_RECIPROCAL=x.device.type == "cuda",
        enable_fp_fusion=False,  # the same rate as the forward kernel, and autograd's products
        **fixed_block(),
    )
    torch.sum(partials, dim=0, out=grad_threshold)
