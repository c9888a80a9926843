"""The two options of the Rate Norm op, channel-wise thresholds and quantized rates (QCFS), against
the spec (rnl_fast.reference.rate_norm) on every CPU-runnable backend, boundaries on purpose.

What each test would catch in a wrong kernel is said in its docstring.
"""

from __future__ import annotations

import math

import pytest
import torch

from rnl_fast import ops, reference
from rnl_fast.numerics import compute_dtype_of
from rnl_fast.ops import RateNormResult


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


#: Inputs whose channel (dim 1) lies differently in memory: the kernels find it as (i // inner) % C.
LAYOUTS = {
    "nchw": lambda: torch.randn(4, 3, 9, 11),  # inner = 99
    "channels-last": lambda: _channels_last(torch.randn(4, 3, 9, 11)),  # inner = 1, rows of C
    "bf": lambda: torch.randn(7, 13),  # [B, F]: inner = 1
    "bcl": lambda: torch.randn(5, 6, 2),  # inner = 2: short lines
    "one-channel": lambda: torch.randn(6, 1, 5, 5),
    "strided": lambda: torch.randn(4, 6, 10, 7)[:, ::2, ::3],  # not dense: copied in its stride order
    "long-lines": lambda: torch.randn(2, 3, 65, 65),  # lines longer than the C++ chunk of 4096
    "many-rows": lambda: _channels_last(torch.randn(3, 8, 15, 15)),  # rows of C in more than one C++ block
}
LEVELS = [None, 1, 3]


def _inputs(layout: str, dtype=torch.float32):
    x = (LAYOUTS[layout]() * 1.5 + 0.4).to(dtype)
    raw_p = torch.randn(()) * 0.5 + 1.0
    running_max = torch.rand(x.shape[1]) * 2 + 0.5
    return x, raw_p, running_max


def _both(x, raw_p, running_max, **kwargs):
    fast = ops.rate_norm(x, raw_p, running_max, **kwargs)
    ref_x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    ref = RateNormResult(*reference.rate_norm(ref_x, raw_p, running_max, **kwargs))
    return fast, ref


@pytest.mark.parametrize("levels", LEVELS, ids=lambda L: f"L{L}")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_channel_wise_forward_matches_reference(backend, layout, training, levels):
    """Per-channel running max, θ_c, r̂ and the sums, element for element. Catches a channel index
    computed with the wrong stride (channels-last, [B, F], short lines, one channel, a strided
    input), a max over the wrong axis, a chunk that crosses into the next line's channel, and r̂
    not written back in x's layout."""
    x, raw_p, running_max = _inputs(layout)
    fast, ref = _both(x, raw_p, running_max, momentum=0.3, training=training, channel_wise=True, levels=levels)
    assert fast.running_max.shape == (x.shape[1],)
    torch.testing.assert_close(fast.running_max, ref.running_max, rtol=1e-6, atol=0)
    if levels is None:
        torch.testing.assert_close(fast.r, ref.r, rtol=1e-6, atol=1e-7)
    else:  # quantized rates are k/L: exactly the spec's
        assert torch.equal(fast.r, ref.r)
    torch.testing.assert_close(fast.sum_r, ref.sum_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.sum_r2, ref.sum_r2, rtol=1e-5, atol=1e-5)
    assert fast.r.stride() == torch.empty_like(x).stride(), "r̂ keeps the (dense) layout of x"


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 8, 255])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_quantized_forward_matches_reference(backend, training, levels):
    """Scalar θ, quantized: every r̂ exactly k/L as the spec's floor(r·L + ½)/L. Catches round
    instead of floor-plus-half, L − 1 or L + 1 levels, and a shift of ½ forgotten."""
    x = torch.randn(9, 331) * 1.5 + 0.4
    raw_p, running_max = torch.tensor(0.9), torch.tensor(1.7)
    fast, ref = _both(x, raw_p, running_max, momentum=0.2, training=training, levels=levels)
    assert torch.equal(fast.r, ref.r)
    assert torch.equal(fast.running_max, ref.running_max)
    assert set((fast.r * levels).round().unique().tolist()) <= set(range(levels + 1))
    torch.testing.assert_close(fast.sum_r, ref.sum_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.sum_r2, ref.sum_r2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
@pytest.mark.parametrize("channel_wise, levels", [(True, None), (False, 4), (True, 5)], ids=["cw", "L4", "cw-L5"])
def test_dtypes(backend, dtype, channel_wise, levels):
    """Half and double inputs: loads, stores and the compute dtype of each option."""
    x, raw_p, running_max = _inputs("nchw", dtype)
    if not channel_wise:
        running_max = running_max[0]
    fast, ref = _both(x, raw_p, running_max, channel_wise=channel_wise, levels=levels)
    assert fast.r.dtype == dtype and fast.sum_r.dtype == compute_dtype_of(dtype)
    if dtype == torch.float64:
        tol = dict(rtol=1e-12, atol=1e-12)
    else:
        tol = dict(rtol=1e-2, atol=1e-2)
    if levels is not None and dtype == torch.float64:
        assert torch.equal(fast.r, ref.r)
    torch.testing.assert_close(fast.r, ref.r.to(dtype), **tol)
    torch.testing.assert_close(fast.running_max, ref.running_max, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast.sum_r, ref.sum_r, rtol=1e-5, atol=1e-4)


def _grads(fn, x, raw_p, running_max, weight, **kwargs):
    r, _, sum_r, sum_r2 = fn(x, raw_p, running_max, **kwargs)
    omega = sum_r / (sum_r2 + 1e-5)
    return torch.autograd.grad((r * weight).sum() + 0.7 * omega + 0.01 * sum_r2, [x, raw_p])


@pytest.mark.parametrize("levels", LEVELS, ids=lambda L: f"L{L}")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "bf", "bcl", "strided", "many-rows"])
def test_channel_wise_backward_matches_reference(backend, layout, training, levels):
    """grad x and grad raw_p (a sum over channels of dL/dθ_c·running_max_c·p(1 − p)), the upstream
    gradient in the other layout (NCHW against channels-last x and the reverse). Catches grad_r
    read in the wrong order, dL/dθ_c gathered to the wrong channel, the RIL gradient taken from the
    unquantized rate, and a straight-through window that is not QCFS's."""
    x, raw_p, running_max = _inputs(layout)
    x.requires_grad_()
    raw_p.requires_grad_()
    weight = torch.randn(x.shape)
    weight = weight if x.is_contiguous() else _channels_last(weight) if weight.dim() == 4 else weight
    kwargs = dict(momentum=0.2, training=training, channel_wise=True, levels=levels)
    fast = _grads(ops.rate_norm, x, raw_p, running_max, weight, **kwargs)
    ref = _grads(reference.rate_norm, x, raw_p, running_max, weight, **kwargs)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("levels", [1, 4, 7])
def test_quantized_backward_matches_reference(backend, levels):
    """Scalar θ, quantized: QCFS's straight-through gradient to x and raw_p, the RIL's through the
    quantized rates."""
    x = (torch.randn(9, 31) * 1.5 + 0.4).requires_grad_()
    raw_p = torch.tensor(0.6, requires_grad=True)
    weight = torch.randn(9, 31)
    kwargs = dict(momentum=0.2, training=True, levels=levels)
    fast = _grads(ops.rate_norm, x, raw_p, torch.tensor(1.4), weight, **kwargs)
    ref = _grads(reference.rate_norm, x, raw_p, torch.tensor(1.4), weight, **kwargs)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels-last", "bf"])
def test_channel_wise_gradcheck_fp64(backend, layout):
    """Finite differences in float64 (unquantized: the quantized rate is a step function); small
    inputs, one forward per element under the Triton interpreter."""
    x = torch.randn(4, 3) if layout == "bf" else torch.randn(2, 3, 2, 3)
    x = _channels_last(x) if layout == "channels-last" else x
    x = (x.double() * 1.5 + 0.4).requires_grad_()
    raw_p = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    running_max = torch.rand(x.shape[1]) + 0.8

    def f(x, raw_p):
        r, _, sum_r, sum_r2 = ops.rate_norm(x, raw_p, running_max, training=False, channel_wise=True)
        return r, sum_r / (sum_r2 + 1e-5)

    assert torch.autograd.gradcheck(f, (x, raw_p), eps=1e-7, atol=1e-6)


def test_quantized_gradient_is_qcfs_straight_through(backend):
    """QCFS's rule by hand, in float64 with dyadic θ-multiples: inside the window 0 ≤ floor(x/θ·L
    + ½) ≤ L, d r̂/dx = 1/θ and d r̂/dθ = −x/θ² (so d(θ·r̂)/dθ = r̂ − x/θ, QCFS's d out/dλ); outside,
    both 0. The window reaches below 0 and above θ by θ/2L. Catches an STE window of [0, θ] (the
    unquantized one) and a gradient to θ taken from the quantized rate."""
    L = 4
    raw_p, running_max = torch.tensor(0.25, dtype=torch.float64, requires_grad=True), torch.tensor(2.0)
    theta = reference.rate_norm_threshold(raw_p.detach(), running_max, torch.float64)
    # In units of θ: below the window, its lower edge region, inside, at θ, above θ inside the window, beyond.
    u = torch.tensor([-0.25, -0.0625, 0.0, 0.3, 1.0, 1.0625, 1.25], dtype=torch.float64)
    inside = torch.tensor([False, True, True, True, True, True, False])
    x = (u * theta).requires_grad_()
    r, _, _, _ = ops.rate_norm(x, raw_p, running_max, training=False, levels=L)
    grad_x, grad_raw = torch.autograd.grad(r.sum(), [x, raw_p])
    torch.testing.assert_close(grad_x, torch.where(inside, 1 / theta, 0.0).to(torch.float64))
    p = torch.sigmoid(raw_p.detach())
    expected = (torch.where(inside, -x.detach() / theta**2, 0.0)).sum() * running_max.double() * p * (1 - p)
    torch.testing.assert_close(grad_raw, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("levels", [1, 2, 4, 5])
@pytest.mark.parametrize("channel_wise", [False, True], ids=["scalar", "cw"])
def test_quantization_step_boundaries(backend, dtype, levels, channel_wise):
    """x where clip(x)/θ·L + ½ is exactly an integer k (found by stepping x one ulp at a time):
    floor gives k, the higher level (round-half-even would give k − 1 for odd k − ½·2); and x = 0,
    x = θ exactly, one ulp either side of θ. Catches round-to-nearest-even instead of
    floor(· + ½), a rate compared against θ instead of computed, and a fused r·L + ½."""
    cdt = compute_dtype_of(dtype)
    raw_p = torch.tensor(1.3)
    running_max = torch.tensor([1.7, 0.6, 2.3]) if channel_wise else torch.tensor(1.1)
    theta = reference.rate_norm_threshold(raw_p, running_max, cdt)
    thetas = theta if channel_wise else theta.reshape(1)
    rows = []
    for th in thetas:
        values = [torch.zeros((), dtype=cdt), th, torch.nextafter(th, th + 1), torch.nextafter(th, th - 1)]
        for k in range(1, levels + 1):
            x = th * (k - 0.5) / levels
            found = 0
            for _ in range(200):  # walk ulps up from just below the ideal point
                if (x / th * levels + 0.5) == k:
                    values.append(x.clone())
                    found += 1
                    break
                x = torch.nextafter(x, x + 1) if (x / th * levels + 0.5) < k else torch.nextafter(x, x - 1)
            values.append(torch.nextafter(x, x - 1))
        rows.append(torch.stack(values))
    width = min(len(row) for row in rows)
    x = torch.stack([row[:width] for row in rows], dim=1).to(dtype)  # [width, C]: channel is dim 1
    if not channel_wise:
        x = x.reshape(-1, 1)
    fast, ref = _both(x, raw_p, running_max, training=False, channel_wise=channel_wise, levels=levels)
    assert torch.equal(fast.r, ref.r)
    assert (fast.r[1] == 1).all(), "x = θ is the top level"
    # At the exact boundaries the spec itself goes up a level: floor(k) = k.
    exact = x.to(cdt) / (theta if channel_wise else theta) * levels + 0.5
    on_step = exact == exact.floor()
    assert torch.equal(fast.r[on_step], (exact[on_step] / levels).clamp(0, 1).to(dtype))


@pytest.mark.parametrize("levels", [None, 2])
def test_channel_with_zero_max(backend, levels):
    """A channel whose inputs are all ≤ 0 with momentum 1: its running max is exactly 0, θ_c = 1e-6,
    its rates 0, nothing NaN; in eval a zero running max with positive x saturates at 1. Catches a
    zero θ_c dividing (NaN) and the 0 channel borrowing another channel's θ."""
    x = torch.randn(6, 3, 4) + 1
    x[:, 1] = -x[:, 1].abs()
    out = ops.rate_norm(
        x, torch.tensor(0.3), torch.ones(3), momentum=1.0, training=True, channel_wise=True, levels=levels
    )
    assert out.running_max[1].item() == 0.0 and out.running_max[0] > 0
    assert (out.r[:, 1] == 0).all() and not torch.isnan(out.r).any()
    eval_out = ops.rate_norm(
        x.abs(), torch.tensor(0.3), out.running_max, training=False, channel_wise=True, levels=levels
    )
    assert (eval_out.r[:, 1][x[:, 1] != 0] == 1).all()
    xg = x.clone().requires_grad_()
    raw_p = torch.tensor(0.3, requires_grad=True)
    r = ops.rate_norm(xg, raw_p, out.running_max, training=False, channel_wise=True, levels=levels).r
    grads = torch.autograd.grad(r.sum(), [xg, raw_p])
    assert all(torch.isfinite(g).all() for g in grads)


def test_channel_wise_running_max_nan_skipped(backend):
    """NaN elements do not enter their channel's max; the other channels are untouched by it."""
    x = torch.tensor([[-3.0, 0.5], [2.0, float("nan")], [1.0, 0.25]])  # [B=3, C=2]
    out = ops.rate_norm(x, torch.tensor(10.0), torch.ones(2), momentum=0.5, training=True, channel_wise=True)
    torch.testing.assert_close(out.running_max, torch.tensor([0.5 + 0.5 * 2.0, 0.5 + 0.5 * 0.5]))
    assert torch.isnan(out.r[1, 1]) and not torch.isnan(out.r[[0, 2]]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpp_channel_running_max_is_the_specs_bit_for_bit(dtype, monkeypatch):
    """Each channel's blend rounds as the spec's torch ops on [C] tensors."""
    monkeypatch.setenv("RNL_FAST_BACKEND", "cpp")
    x = (torch.randn(3, 40, 50) * 2).to(dtype)
    running_max = torch.rand(40) * 3
    for momentum in (0.1, 0.37, 1.0):
        fast = ops.rate_norm(x, torch.tensor(0.4), running_max, momentum, training=True, channel_wise=True)
        want = reference.running_max_update(x, running_max, momentum, channel_wise=True)
        assert torch.equal(fast.running_max, want)


def test_levels_none_and_one_channel_are_todays_layer(backend):
    """levels=None and channel_wise=False is the scalar layer; a channel-wise layer with one channel
    gives the same rates as the scalar layer with that channel's running max."""
    x, raw_p = torch.randn(5, 1, 6, 7) + 0.3, torch.tensor(0.7)
    scalar = ops.rate_norm(x, raw_p, torch.tensor(1.3), training=False)
    default = ops.rate_norm(x, raw_p, torch.tensor(1.3), training=False, channel_wise=False, levels=None)
    assert torch.equal(scalar.r, default.r) and torch.equal(scalar.sum_r, default.sum_r)
    per_channel = ops.rate_norm(x, raw_p, torch.tensor([1.3]), training=False, channel_wise=True)
    assert torch.equal(per_channel.r, scalar.r)


@pytest.mark.parametrize("levels", [None, 5])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_cpp_threaded_channel_wise_matches_reference(layout, levels, monkeypatch):
    """Above the C++ kernels' parallel threshold (2^18 elements): the per-thread channel maxima
    and dL/dθ_c arrays, combined across threads. Catches a thread's partial lost or added twice."""
    monkeypatch.setenv("RNL_FAST_BACKEND", "cpp")
    x = torch.randn(12, 32, 28, 28) * 1.5 + 0.4
    x = _channels_last(x) if layout == "channels-last" else x
    x.requires_grad_()
    raw_p, running_max = torch.tensor(0.9, requires_grad=True), torch.rand(32) + 0.5
    weight = torch.randn(x.shape)
    kwargs = dict(momentum=0.4, training=True, channel_wise=True, levels=levels)
    fast, ref = _both(x.detach(), raw_p.detach(), running_max, **kwargs)
    assert torch.equal(fast.running_max, ref.running_max)
    torch.testing.assert_close(fast.r, ref.r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast.sum_r, ref.sum_r, rtol=1e-5, atol=1e-3)
    got = _grads(ops.rate_norm, x, raw_p, running_max, weight, **kwargs)
    want = _grads(reference.rate_norm, x, raw_p, running_max, weight, **kwargs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_outputs_are_fully_written(backend, poisoned_allocations):
    x, raw_p, running_max = _inputs("channels-last")
    with poisoned_allocations():
        fast = ops.rate_norm(x, raw_p, running_max, channel_wise=True, levels=3)
    ref = RateNormResult(*reference.rate_norm(x, raw_p, running_max, channel_wise=True, levels=3))
    assert torch.equal(fast.r, ref.r) and torch.equal(fast.running_max, ref.running_max)
    assert not math.isnan(fast.sum_r2.item())
