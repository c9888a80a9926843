"""Triton kernels for the Rate Norm Layer (paper Eq. 6) on CUDA tensors.

``r̂ = clip(x, 0, θ) / θ`` with ``θ = sigmoid(raw_p)·running_max + eps``, plus the sums Σr̂ and Σr̂²
that the Rate Inference Loss needs, in one pass over ``x``. In training mode the running max is
first updated with the batch max, computed on the device: the kernels read every scalar
(``raw_p``, ``running_max``, the batch max) through pointers, so nothing ever waits on the host.

Reductions (the sums, the gradient of θ) go through one row of partial results per program and a
torch sum, not float atomics: the result is then the same from run to run.
Python scalars (``momentum``, ``eps``) are constexprs, rounded to the compute dtype as PyTorch rounds
a Python scalar (a runtime float argument would be float32 even in float64 kernels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._autotune import block_configs, size_class

_CONFIGS = block_configs()
#: The partial-sum buffers have a row for every program of the smallest block in _CONFIGS.
_MIN_BLOCK = min(config.kwargs["BLOCK"] for config in _CONFIGS)


@triton.jit
def _theta(
    raw_p_ptr,  # [] logit of p, any float dtype
    running_max,  # scalar float32 running max in use
    EPS: tl.constexpr,  # added to θ so that it is never zero
    COMPUTE_DTYPE: tl.constexpr,  # float32, or float64 for float64 x
):
    """θ = sigmoid(raw_p)·running_max + eps, in the order of operations of ``reference.rate_norm``."""
    raw_p = tl.load(raw_p_ptr).to(COMPUTE_DTYPE)
    p = _div_ieee(1.0, 1.0 + tl.exp(-raw_p))
    return p, p * running_max.to(COMPUTE_DTYPE) + EPS


@triton.jit
def _div_ieee(
    numerator,  # float32 or float64
    denominator,  # same dtype as numerator
):
    """Correctly rounded division, as PyTorch divides: Triton's float32 ``/`` is approximate (2 ulp
    on NVIDIA), with which a saturated rate θ/θ need not come out as exactly 1."""
    if denominator.dtype == tl.float32:
        return tl.div_rn(numerator, denominator)
    else:
        return numerator / denominator


@triton.jit
def _rate(
    x,  # [BLOCK] input, compute dtype
    theta,  # scalar threshold θ > 0, compute dtype
):
    """r̂ = clamp(x, 0, θ) / θ, with the clamp spelled as comparisons so that a NaN x stays NaN
    (tl.minimum/maximum need not propagate it)."""
    return _div_ieee(tl.where(x < 0, 0.0, tl.where(x > theta, theta, x)), theta)


@triton.autotune(configs=_CONFIGS, key=["size_class"], reset_to_zero=["batch_max_ptr"])
@triton.jit
def _rate_norm_max_kernel(
    x_ptr,  # [M] contiguous input, any float dtype
    batch_max_ptr,  # [1] float32, zero-filled: max over all x of relu(x), NaN counted as 0
    M,  # number of elements
    size_class,  # autotune key only (see _autotune.size_class); unused by the kernel
    BLOCK: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < M, other=0.0).to(tl.float32)
    # NaN > 0 is false, so this is relu with NaN skipped. Converting to float32 first gives the same
    # max as the reference's max in x's dtype followed by a cast (rounding is monotonic).
    x = tl.where(x > 0, x, 0.0)
    # Every value is >= 0, where the float order is the integer order: float atomic_max is exact.
    tl.atomic_max(batch_max_ptr, tl.max(x, axis=0), sem="relaxed")


@triton.autotune(configs=_CONFIGS, key=["size_class"], reset_to_zero=["partials_ptr"])
@triton.jit
def _rate_norm_fwd_kernel(
    x_ptr,  # [M] contiguous input, any float dtype
    raw_p_ptr,  # [] logit of p, any float dtype
    running_max_ptr,  # [] float32 running max before this batch
    batch_max_ptr,  # [1] float32 batch max from _rate_norm_max_kernel, if TRAINING
    r_ptr,  # [M] out: rates r̂ in x's dtype
    running_max_out_ptr,  # [] float32 out: the running max used for θ
    partials_ptr,  # [programs, 2] zero-filled, compute dtype: (Σr̂, Σr̂²) of each program's block
    M,  # number of elements
    size_class,  # autotune key only (see _autotune.size_class); unused by the kernel
    TRAINING: tl.constexpr,  # update the running max with the batch max before using it
    KEEP: tl.constexpr,  # 1 − momentum, computed in Python double precision like the reference
    MOMENTUM: tl.constexpr,  # weight of the batch max in the running max update
    EPS: tl.constexpr,  # added to θ so that it is never zero
    BLOCK: tl.constexpr,  # elements per program
):
    compute_dtype = partials_ptr.dtype.element_ty
    program = tl.program_id(0)
    # Every program computes the (same) running max and θ from the scalars; only one stores it.
    running_max = tl.load(running_max_ptr)
    if TRAINING:
        running_max = KEEP * running_max + MOMENTUM * tl.load(batch_max_ptr)
    if program == 0:
        tl.store(running_max_out_ptr, running_max)
    _, theta = _theta(raw_p_ptr, running_max, EPS, compute_dtype)

    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < M
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(compute_dtype)
    r = _rate(x, theta)
    tl.store(r_ptr + offsets, r.to(r_ptr.dtype.element_ty), mask=in_range)
    # Out-of-range lanes loaded x = 0, hence r = 0: they add nothing to the sums.
    tl.store(partials_ptr + program * 2, tl.sum(r, axis=0))
    tl.store(partials_ptr + program * 2 + 1, tl.sum(r * r, axis=0))


@triton.autotune(configs=_CONFIGS, key=["size_class"], reset_to_zero=["partials_ptr"])
@triton.jit
def _rate_norm_bwd_kernel(
    grad_r_ptr,  # [M] gradient of r̂ (x's dtype), if HAS_GRAD_R
    grad_sums_ptr,  # [2] compute dtype: gradients of Σr̂ and Σr̂²
    x_ptr,  # [M] contiguous input, any float dtype
    raw_p_ptr,  # [] logit of p, any float dtype
    running_max_ptr,  # [] float32 running max the forward pass used
    grad_x_ptr,  # [M] out, x's dtype
    partials_ptr,  # [programs, 1] zero-filled, compute dtype: dL/draw_p of each program's block
    M,  # number of elements
    size_class,  # autotune key only (see _autotune.size_class); unused by the kernel
    HAS_GRAD_R: tl.constexpr,  # else the gradient of r̂ is zero
    EPS: tl.constexpr,  # added to θ in the forward pass
    BLOCK: tl.constexpr,  # elements per program
):
    compute_dtype = partials_ptr.dtype.element_ty
    program = tl.program_id(0)
    running_max = tl.load(running_max_ptr)
    p, theta = _theta(raw_p_ptr, running_max, EPS, compute_dtype)

    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < M
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(compute_dtype)
    # Recompute r̂ rather than save it: one read of x instead of a write and a read of r̂.
    r = _rate(x, theta)

    # dL/dr̂ from r̂ itself and from the sums Σr̂, Σr̂².
    grad = tl.load(grad_sums_ptr) + 2.0 * r * tl.load(grad_sums_ptr + 1)
    if HAS_GRAD_R:
        grad += tl.load(grad_r_ptr + offsets, mask=in_range, other=0.0).to(compute_dtype)
    # Inside the clip range (inclusive, as torch.clamp's backward) r̂ = x/θ; outside it is 0 or
    # θ/θ, which depends on neither x nor θ. Out-of-range lanes have x = 0, r̂ = 0: they add nothing.
    inside = (x >= 0) & (x <= theta)
    grad_x = tl.where(inside, grad / theta, 0.0)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_range)
    grad_theta = tl.sum(tl.where(inside, -grad * r / theta, 0.0), axis=0)
    # θ = sigmoid(raw_p)·running_max + eps: chain rule to raw_p (the running max gets no gradient).
    tl.store(partials_ptr + program, grad_theta * running_max.to(compute_dtype) * p * (1.0 - p))


def _partials(M: int, columns: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero-filled rows for every program of the smallest block: autotuning picks BLOCK at launch,
    after this buffer exists, and rows of programs that do not exist must add nothing."""
    return torch.zeros((max(triton.cdiv(M, _MIN_BLOCK), 1), columns), dtype=dtype, device=device)


def _grid(M: int) -> Callable[[dict], tuple[int]]:
    """At least one program even for M = 0, so that the scalar outputs are always written."""

    def grid(meta: dict) -> tuple[int]:
        return (max(triton.cdiv(M, meta["BLOCK"]), 1),)

    return grid


def rate_norm_fwd(
    x: torch.Tensor,
    raw_p: torch.Tensor,
    running_max: torch.Tensor,
    momentum: float,
    training: bool,
    eps: float,
    r: torch.Tensor,
    running_max_out: torch.Tensor,
    sums: torch.Tensor,
) -> None:
    """Rate Norm forward; writes into the caller's output tensors (``rnl_fast.ops`` validates).

    Args:
        x: ``[M]`` contiguous, float32/float16/bfloat16/float64.
        raw_p: ``[]`` logit of p, any float dtype.
        running_max: ``[]`` float32 running max before this batch (not modified).
        momentum: weight of the batch max in the running max update (training only).
        training: update the running max with ``max(relu(x))`` (NaN skipped) before using it.
        eps: added to θ (``rnl_fast.numerics.THETA_EPS``).
        r: ``[M]`` out, ``x.dtype``: ``clamp(x, 0, θ) / θ``.
        running_max_out: ``[]`` float32 out: the running max used for θ.
        sums: ``[2]`` out, compute dtype (float32, float64 for float64 ``x``): Σr̂, Σr̂² of the
            compute-dtype rates, before rounding to ``x.dtype``.
    """
    M = x.numel()
    if training:
        batch_max = torch.zeros(1, dtype=torch.float32, device=x.device)
        _rate_norm_max_kernel[_grid(M)](x, batch_max, M, size_class(M))
    else:
        batch_max = running_max  # placeholder pointer, never read
    partials = _partials(M, 2, sums.dtype, x.device)
    _rate_norm_fwd_kernel[_grid(M)](
        x,
        raw_p,
        running_max,
        batch_max,
        r,
        running_max_out,
        partials,
        M,
        size_class(M),
        TRAINING=training,
        KEEP=1.0 - momentum,
        MOMENTUM=float(momentum),
        EPS=float(eps),
        enable_fp_fusion=False,  # no FMA: running max and θ round as the reference's separate ops do
    )
    torch.sum(partials, dim=0, out=sums)


def rate_norm_bwd(
    grad_r: torch.Tensor | None,
    grad_sums: torch.Tensor,
    x: torch.Tensor,
    raw_p: torch.Tensor,
    running_max_used: torch.Tensor,
    eps: float,
    grad_x: torch.Tensor,
    grad_raw: torch.Tensor,
) -> None:
    """Rate Norm backward; recomputes θ and r̂ from ``x``.

    Args:
        grad_r: ``[M]`` gradient of r̂ in ``x.dtype``, or None for zeros.
        grad_sums: ``[2]`` compute dtype: gradients of Σr̂ and Σr̂².
        x, raw_p, eps: as in :func:`rate_norm_fwd`.
        running_max_used: ``[]`` float32, the ``running_max_out`` of the forward pass.
        grad_x: ``[M]`` out, ``x.dtype``.
        grad_raw: ``[]`` out, ``raw_p.dtype``.
    """
    M = x.numel()
    partials = _partials(M, 1, grad_sums.dtype, x.device)
    _rate_norm_bwd_kernel[_grid(M)](
        grad_r if grad_r is not None else x,  # placeholder pointer, never read
        grad_sums,
        x,
        raw_p,
        running_max_used,
        grad_x,
        partials,
        M,
        size_class(M),
        HAS_GRAD_R=grad_r is not None,
        EPS=float(eps),
        enable_fp_fusion=False,  # the same θ and r̂ as the forward kernel
    )
    grad_raw.copy_(partials.sum())
