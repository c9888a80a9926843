"""Triton kernels for the Rate Norm Layer (paper Eq. 6) on CUDA tensors.

``r̂ = clip(x, 0, θ) / θ`` with ``θ = sigmoid(raw_p)·running_max + eps``, plus the sums Σr̂ and Σr̂²
that the Rate Inference Loss needs, in one pass over ``x``. In training mode the running max is
first updated with the batch max, computed on the device: the kernels read every scalar
(``raw_p``, ``running_max``, the batch max) through pointers, so nothing ever waits on the host.

Channel-wise (``CHANNEL_WISE``): one running max and θ_c per channel, element i of the flat input
(in memory order) belonging to channel ``(i // inner) % C``; the kernels look θ_c up per element.
Quantized (``LEVELS = L > 0``): the rate becomes ``floor(r̂·L + ½)/L`` with QCFS's gradient
(``rnl_fast.reference.quantized_rate``).

Reductions (the sums, the gradient of θ) go through one partial result per program and a torch
sum, not float atomics: the result is then the same from run to run. The kernels launch with one
fixed config (:func:`._autotune.fixed_block`), not through the autotuner: their calls are bound by
the host's time, not the device's.
Python scalars (``momentum``, ``eps``) are constexprs, rounded to the compute dtype as PyTorch rounds
a Python scalar (a runtime float argument would be float32 even in float64 kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import fixed_block, fixed_programs


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


@triton.jit
def _quantize(
    r,  # [BLOCK] rates in [0, 1] (or NaN), compute dtype
    LEVELS: tl.constexpr,  # L > 0
):
    """floor(r·L + ½)/L, rounded op by op as the reference (the launch disables FMA)."""
    q = tl.floor(r * LEVELS + 0.5)
    return _div_ieee(q, tl.full(q.shape, LEVELS, q.dtype))


@triton.jit
def _rate_and_grad(
    x,  # [BLOCK] input, compute dtype
    theta,  # θ (scalar or [BLOCK]) > 0, compute dtype
    LEVELS: tl.constexpr,  # 0: plain rate; L > 0: quantized
):
    """(r̂ as the forward pass gives it, where the gradient passes, u with d r̂/dθ = −u/θ there).

    Plain: inside is 0 ≤ x ≤ θ (inclusive, as torch.clamp's backward), u = r̂. Quantized (QCFS):
    u = x/θ unclipped, k = floor(u·L + ½), inside is 0 ≤ k ≤ L, r̂ = clamp(k/L, 0, 1)."""
    if LEVELS > 0:
        u = _div_ieee(x, theta)
        k = tl.floor(u * LEVELS + 0.5)
        q = _div_ieee(k, tl.full(k.shape, LEVELS, k.dtype))
        rate = tl.where(q < 0, 0.0, tl.where(q > 1, 1.0, q))
        return rate, (k >= 0) & (k <= LEVELS), u
    else:
        rate = _rate(x, theta)
        return rate, (x >= 0) & (x <= theta), rate


@triton.jit
def _rate_norm_max_kernel(
    x_ptr,  # [M] contiguous input, any float dtype
    batch_max_ptr,  # [1] float32, zero-filled: max over all x of relu(x), NaN counted as 0
    M,  # number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < M, other=0.0).to(tl.float32)
    # NaN > 0 is false, so this is relu with NaN skipped. Converting to float32 first gives the same
    # max as the reference's max in x's dtype followed by a cast (rounding is monotonic).
    x = tl.where(x > 0, x, 0.0)
    # Every value is >= 0, where the float order is the integer order: float atomic_max is exact.
    tl.atomic_max(batch_max_ptr, tl.max(x, axis=0), sem="relaxed")


@triton.jit
def _rate_norm_channel_max_kernel(
    x_ptr,  # [R, W] contiguous input, any float dtype
    batch_max_ptr,  # [C] float32, zero-filled: per channel max of relu(x), NaN counted as 0
    R,  # rows
    W,  # columns
    C,  # channels
    BY_COLUMNS: tl.constexpr,  # the channel is the column ([outer, C], inner = 1), else row % C
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < R) & (cols[None, :] < W)
    x = tl.load(x_ptr + rows[:, None] * W + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.where(x > 0, x, 0.0)  # relu with NaN skipped, as _rate_norm_max_kernel
    # Every value is >= 0: float atomic_max is exact (see _rate_norm_max_kernel).
    if BY_COLUMNS:
        tl.atomic_max(batch_max_ptr + cols, tl.max(x, axis=0), mask=cols < W, sem="relaxed")
    else:
        tl.atomic_max(batch_max_ptr + rows % C, tl.max(x, axis=1), mask=rows < R, sem="relaxed")


@triton.jit
def _rate_norm_fwd_kernel(
    x_ptr,  # [M] contiguous input, any float dtype
    raw_p_ptr,  # [] logit of p, any float dtype
    running_max_ptr,  # [] float32 running max before this batch
    batch_max_ptr,  # [1] float32 batch max from _rate_norm_max_kernel, if TRAINING
    r_ptr,  # [M] out: rates r̂ in x's dtype
    running_max_out_ptr,  # [] float32 out: the running max used for θ
    partials_ptr,  # [2, programs] compute dtype: Σr̂ (row 0) and Σr̂² (row 1) of each program's block
    M,  # number of elements
    C,  # channels (CHANNEL_WISE; else 1)
    inner,  # elements of one channel next to each other in memory (CHANNEL_WISE)
    TRAINING: tl.constexpr,  # update the running max with the batch max before using it
    KEEP: tl.constexpr,  # 1 − momentum, computed in Python double precision like the reference
    MOMENTUM: tl.constexpr,  # weight of the batch max in the running max update
    EPS: tl.constexpr,  # added to θ so that it is never zero
    CHANNEL_WISE: tl.constexpr,  # running max, batch max and running max out are [C]
    LEVELS: tl.constexpr,  # 0, or L: quantized rates
    BLOCK: tl.constexpr,  # elements per program
):
    compute_dtype = partials_ptr.dtype.element_ty
    program = tl.program_id(0)
    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < M
    if CHANNEL_WISE:
        # θ_c per element, from its channel's running max (a gather from C values, cached).
        channel = (offsets // inner) % C
        running_max = tl.load(running_max_ptr + channel, mask=in_range, other=1.0)
        if TRAINING:
            running_max = KEEP * running_max + MOMENTUM * tl.load(batch_max_ptr + channel, mask=in_range, other=0.0)
        if program == 0:
            for first in range(0, C, BLOCK):
                channels = first + tl.arange(0, BLOCK)
                used = tl.load(running_max_ptr + channels, mask=channels < C, other=0.0)
                if TRAINING:
                    used = KEEP * used + MOMENTUM * tl.load(batch_max_ptr + channels, mask=channels < C, other=0.0)
                tl.store(running_max_out_ptr + channels, used, mask=channels < C)
    else:
        # Every program computes the (same) running max and θ from the scalars; only one stores it.
        running_max = tl.load(running_max_ptr)
        if TRAINING:
            running_max = KEEP * running_max + MOMENTUM * tl.load(batch_max_ptr)
        if program == 0:
            tl.store(running_max_out_ptr, running_max)
    _, theta = _theta(raw_p_ptr, running_max, EPS, compute_dtype)

    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(compute_dtype)
    r = _rate(x, theta)
    if LEVELS > 0:
        r = _quantize(r, LEVELS)
    tl.store(r_ptr + offsets, r.to(r_ptr.dtype.element_ty), mask=in_range)
    # Out-of-range lanes loaded x = 0, hence r = 0: they add nothing to the sums.
    tl.store(partials_ptr + program, tl.sum(r, axis=0))
    tl.store(partials_ptr + tl.num_programs(0) + program, tl.sum(r * r, axis=0))


@triton.jit
def _rate_norm_bwd_kernel(
    grad_r_ptr,  # [M] gradient of r̂ (x's dtype), if HAS_GRAD_R
    grad_sum_r_ptr,  # [] gradient of Σr̂, any float dtype, if HAS_GRAD_SUM_R (else 0)
    grad_sum_r2_ptr,  # [] gradient of Σr̂², any float dtype, if HAS_GRAD_SUM_R2 (else 0)
    x_ptr,  # [M] contiguous input, any float dtype
    raw_p_ptr,  # [] logit of p, any float dtype
    running_max_ptr,  # [] float32 running max the forward pass used ([C] if CHANNEL_WISE)
    grad_x_ptr,  # [M] out, x's dtype
    partials_ptr,  # [programs] compute dtype: dL/draw_p of each program's block
    M,  # number of elements
    C,  # channels (CHANNEL_WISE; else 1)
    inner,  # elements of one channel next to each other in memory (CHANNEL_WISE)
    HAS_GRAD_R: tl.constexpr,  # else the gradient of r̂ is zero
    HAS_GRAD_SUM_R: tl.constexpr,  # else the gradient of Σr̂ is zero
    HAS_GRAD_SUM_R2: tl.constexpr,  # else the gradient of Σr̂² is zero
    EPS: tl.constexpr,  # added to θ in the forward pass
    CHANNEL_WISE: tl.constexpr,  # the running max is [C]
    LEVELS: tl.constexpr,  # 0, or L: quantized rates
    BLOCK: tl.constexpr,  # elements per program
):
    compute_dtype = partials_ptr.dtype.element_ty
    program = tl.program_id(0)
    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < M
    if CHANNEL_WISE:
        running_max = tl.load(running_max_ptr + (offsets // inner) % C, mask=in_range, other=1.0)
    else:
        running_max = tl.load(running_max_ptr)
    p, theta = _theta(raw_p_ptr, running_max, EPS, compute_dtype)

    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(compute_dtype)
    # Recompute r̂ rather than save it: one read of x instead of a write and a read of r̂.
    r, inside, u = _rate_and_grad(x, theta, LEVELS)

    # dL/dr̂ from r̂ itself and from the sums Σr̂, Σr̂²; the Σr̂² term only when its gradient is not 0,
    # as autograd adds nothing for an unused sum (0·r̂ is NaN where r̂ is, e.g. at x = θ = inf).
    grad = tl.zeros_like(r)
    if HAS_GRAD_SUM_R:
        grad += tl.load(grad_sum_r_ptr).to(compute_dtype)
    if HAS_GRAD_SUM_R2:
        grad_sum_r2 = tl.load(grad_sum_r2_ptr).to(compute_dtype)
        grad += tl.where(grad_sum_r2 != 0, 2.0 * r * grad_sum_r2, 0.0)
    if HAS_GRAD_R:
        grad += tl.load(grad_r_ptr + offsets, mask=in_range, other=0.0).to(compute_dtype)
    # Inside the clip range (inclusive, as torch.clamp's backward) r̂ = x/θ; outside it is 0 or
    # θ/θ, which depends on neither x nor θ (quantized: QCFS's window, see _rate_and_grad).
    # Out-of-range lanes have x = 0: they add nothing to dL/dθ (u = 0), and are not stored. A NaN
    # x (u NaN) adds NaN, as the reference's −g·clip(x)/θ² does: dL/draw_p is NaN like Σr̂.
    grad_x = tl.where(inside, grad / theta, 0.0)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_range)
    # θ = sigmoid(raw_p)·running_max + eps: chain rule to raw_p (the running max gets no gradient).
    # Quantized: the reference's chain through the straight-through floor, −g_w·(u/θ) with g_w = 0
    # outside the window, where 0·(u/θ) is NaN when u/θ is (x = ±inf): dL/draw_p NaN, as for NaN x.
    if LEVELS > 0:
        term = -tl.where(inside, grad, 0.0) * _div_ieee(u, theta)
    else:
        term = tl.where(inside, -grad * u / theta, tl.where(u != u, u, 0.0))
    if CHANNEL_WISE:  # dL/dp = Σ_c dL/dθ_c·running_max_c, taken element by element
        grad_p = tl.sum(term * running_max.to(compute_dtype), axis=0)
        tl.store(partials_ptr + program, grad_p * p * (1.0 - p))
    else:
        grad_theta = tl.sum(term, axis=0)
        tl.store(partials_ptr + program, grad_theta * running_max.to(compute_dtype) * p * (1.0 - p))


def _channel_max(x: torch.Tensor, batch_max: torch.Tensor, channels: int, inner: int) -> None:
    """Per-channel max of relu(x) into the zero-filled ``batch_max [channels]``: x as ``[outer, C]``
    tiles reduced over rows when inner = 1, else as ``[outer·C, inner]`` tiles reduced over columns."""
    by_columns = inner == 1
    rows, width = (x.numel() // channels, channels) if by_columns else (x.numel() // inner, inner)
    block_w = min(triton.next_power_of_2(width), 1024)
    block_r = max(1024 // block_w, 1)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(width, block_w))
    _rate_norm_channel_max_kernel[grid](
        x, batch_max, rows, width, channels, BY_COLUMNS=by_columns, BLOCK_R=block_r, BLOCK_W=block_w
    )


def rate_norm_fwd(
    x: torch.Tensor,
    raw_p: torch.Tensor,
    running_max: torch.Tensor,
    momentum: float,
    training: bool,
    eps: float,
    r: torch.Tensor,
    running_max_out: torch.Tensor,
    sum_r: torch.Tensor,
    sum_r2: torch.Tensor,
    channels: int = 1,
    inner: int | None = None,
    levels: int = 0,
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
        sum_r, sum_r2: ``[]`` out, compute dtype (float32, float64 for float64 ``x``): Σr̂, Σr̂² of
            the compute-dtype rates, before rounding to ``x.dtype``.
        channels, inner: ``inner`` given: channel-wise, element i of ``x`` (memory order) in
            channel ``(i // inner) % channels``, ``running_max`` and ``running_max_out`` ``[channels]``.
        levels: 0, or L > 0: rates quantized to ``floor(r̂·L + ½)/L``.
    """
    M = x.numel()
    channel_wise = inner is not None
    config, programs = fixed_block(), fixed_programs(M)
    if training and channel_wise:
        batch_max = torch.zeros(channels, dtype=torch.float32, device=x.device)
        _channel_max(x, batch_max, channels, inner)
    elif training:
        batch_max = torch.zeros(1, dtype=torch.float32, device=x.device)
        _rate_norm_max_kernel[(programs,)](x, batch_max, M, **config)
    else:
        batch_max = running_max  # placeholder pointer, never read
    partials = torch.empty((2, programs), dtype=sum_r.dtype, device=x.device)  # every program writes its column
    _rate_norm_fwd_kernel[(programs,)](
        x,
        raw_p,
        running_max,
        batch_max,
        r,
        running_max_out,
        partials,
        M,
        channels,
        inner or M,
        TRAINING=training,
        KEEP=1.0 - momentum,
        MOMENTUM=float(momentum),
        EPS=float(eps),
        CHANNEL_WISE=channel_wise,
        LEVELS=int(levels),
        enable_fp_fusion=False,  # no FMA: running max and θ round as the reference's separate ops do
        **config,
    )
    torch.sum(partials[0], dim=0, out=sum_r)
    torch.sum(partials[1], dim=0, out=sum_r2)


def rate_norm_bwd(
    grad_r: torch.Tensor | None,
    grad_sum_r: torch.Tensor | None,
    grad_sum_r2: torch.Tensor | None,
    x: torch.Tensor,
    raw_p: torch.Tensor,
    running_max_used: torch.Tensor,
    eps: float,
    grad_x: torch.Tensor,
    grad_raw: torch.Tensor,
    channels: int = 1,
    inner: int | None = None,
    levels: int = 0,
) -> None:
    """Rate Norm backward; recomputes θ and r̂ from ``x``.

    Args:
        grad_r: ``[M]`` gradient of r̂ in ``x.dtype``, or None for zeros.
        grad_sum_r, grad_sum_r2: ``[]`` gradients of Σr̂ and Σr̂² (any float dtype, rounded to the
            compute dtype), or None for zero.
        x, raw_p, eps: as in :func:`rate_norm_fwd`.
        running_max_used: ``[]`` float32 (``[channels]`` channel-wise), the ``running_max_out`` of
            the forward pass.
        grad_x: ``[M]`` out, ``x.dtype``.
        grad_raw: ``[]`` out, compute dtype (float32, float64 for float64 ``x``): dL/draw_p.
        channels, inner, levels: as in :func:`rate_norm_fwd`.
    """
    M = x.numel()
    config, programs = fixed_block(), fixed_programs(M)
    partials = torch.empty(programs, dtype=grad_raw.dtype, device=x.device)  # every program writes its own
    _rate_norm_bwd_kernel[(programs,)](
        grad_r if grad_r is not None else x,  # placeholder pointers, never read
        grad_sum_r if grad_sum_r is not None else x,
        grad_sum_r2 if grad_sum_r2 is not None else x,
        x,
        raw_p,
        running_max_used,
        grad_x,
        partials,
        M,
        channels,
        inner or M,
        HAS_GRAD_R=grad_r is not None,
        HAS_GRAD_SUM_R=grad_sum_r is not None,
        HAS_GRAD_SUM_R2=grad_sum_r2 is not None,
        EPS=float(eps),
        CHANNEL_WISE=inner is not None,
        LEVELS=int(levels),
        enable_fp_fusion=False,  # the same θ and r̂ as the forward kernel
        **config,
    )
    torch.sum(partials, dim=0, out=grad_raw)
