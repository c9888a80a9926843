"""Edge cases where a kernel once disagreed with the reference (issue 13): infinite inputs, strides
of size-1 dims, NaN membranes in the backward pass, NaN and inf in Rate Norm, half-precision sums,
extreme pooling scales. Expected values are written out, so the torch backend (the reference) is
checked too."""

from __future__ import annotations

import pytest
import torch

from rnl_fast import ops, reference

INF, NAN = float("inf"), float("nan")


def _col(*values: float, dtype=torch.float32) -> torch.Tensor:
    """One neuron over len(values) steps: ``[T, 1]``."""
    return torch.tensor(values, dtype=dtype).reshape(-1, 1)


# Rule: a reset is applied as defined whatever the membrane: hard reset sets v = v_reset after any
# spike (an infinite input fires once and the neuron carries on from v_reset), soft reset subtracts
# θ (inf − θ = inf: a +inf membrane fires at every step). −inf never fires and stays −inf.
INF_CASES = [
    pytest.param(INF, 0.0, [1, 0, 1], 0.0, id="hard+inf"),
    pytest.param(-INF, 0.0, [0, 0, 0], -INF, id="hard-inf"),
    pytest.param(INF, None, [1, 1, 1], INF, id="soft+inf"),
    pytest.param(-INF, None, [0, 0, 0], -INF, id="soft-inf"),
]


@pytest.mark.parametrize("first, v_reset, spikes, v", INF_CASES)
def test_infinite_input(backend, first, v_reset, spikes, v):
    out = ops.if_sequence(_col(first, 0.5, 0.6), 1.0, 0.0, v_reset=v_reset)
    assert out.spikes.flatten().tolist() == spikes
    assert out.v.item() == v
    assert out.step_counts.tolist() == spikes


@pytest.mark.parametrize("first, v_reset, spikes, v", INF_CASES)
def test_infinite_input_pooled(backend, first, v_reset, spikes, v):
    """The infinite neuron shares a window with three neurons that never fire: each of its spikes
    is a pooled 1/4."""
    x = torch.zeros(3, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([first, 0.5, 0.6])
    out = ops.if_sequence_pool2x2(x, 1.0, 0.0, v_reset=v_reset)
    assert out.spikes.flatten().tolist() == [s / 4 for s in spikes]
    assert out.v[0, 0, 0].item() == v and out.v.flatten()[1:].eq(0).all()


def test_infinite_initial_membrane_hard_reset(backend):
    out = ops.if_sequence(_col(0.5, 0.5), 1.0, torch.tensor([INF]), v_reset=-0.5)
    assert out.spikes.flatten().tolist() == [1, 0] and out.v.item() == 0.0


def _one_element_views() -> list:
    """Valid inputs whose size-1 dims have strides no dense layout would give them."""
    return [
        pytest.param(lambda: torch.rand(1, 2)[:, ::2], id="T1-N1-stride2"),
        pytest.param(lambda: torch.rand(2, 1)[::2], id="T1-time-stride2"),
        pytest.param(lambda: torch.rand(3, 4)[:, 1:2], id="N1-time-stride4"),
        pytest.param(lambda: torch.rand(3, 2, 5)[:, :1], id="size1-neuron-dim-stride5"),
        pytest.param(lambda: torch.rand(1, 3, 4).transpose(0, 1)[:1], id="T1-transposed"),
    ]


@pytest.mark.parametrize("make", _one_element_views())
def test_size_one_dims_with_any_stride(backend, make):
    x = make()
    out = ops.if_sequence(x, 0.5)
    ref = reference.if_sequence(x.contiguous(), 0.5)
    assert torch.equal(out.spikes, ref[0]) and torch.equal(out.v, ref[1])


@pytest.mark.parametrize("make", _one_element_views())
def test_size_one_dims_with_any_stride_backward(backend, make):
    x = make().requires_grad_()
    out = ops.if_sequence(x, 0.5)
    (out.spikes.sum() + out.v.sum()).backward()
    xr = x.detach().contiguous().requires_grad_()
    s, v, _, _ = reference.if_sequence(xr, 0.5)
    (s.sum() + v.sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_size_one_dims_with_any_stride_pooled(backend):
    x = torch.rand(2, 1, 2, 2)[::2]  # T = 1, time stride 8
    out = ops.if_sequence_pool2x2(x, 0.5)
    ref = reference.if_sequence_pool2x2(x.contiguous(), 0.5)
    assert torch.equal(out.spikes, ref[0])


@pytest.mark.parametrize("v_reset", [None, 0.0], ids=["soft", "hard"])
def test_nan_membrane_detached_reset_gradient_through_v_only(backend, v_reset):
    """v_T = m_T − θ·sg(s_T) (or the hard-reset form with a detached s): dv/dx = 1 at every step
    even when m is NaN, and no spike gradient is asked for, so no surrogate (NaN at a NaN
    membrane) may enter the sum. The hard reset passes 1 − s = 1 (a NaN membrane never fires)."""
    x = _col(NAN, 0.3).requires_grad_()
    out = ops.if_sequence(x, 1.0, detach_reset=True, v_reset=v_reset)
    out.v.sum().backward()
    assert x.grad.flatten().tolist() == [1.0, 1.0]


def _rate_norm_grads(x, running_max, loss, **kwargs):
    x = x.clone().requires_grad_()
    raw_p = torch.tensor(0.3, requires_grad=True)
    out = ops.rate_norm(x, raw_p, running_max, 0.1, training=False, **kwargs)
    loss(out).backward()
    return x.grad, raw_p.grad


LOSSES = [
    pytest.param(lambda out: out[0].sum(), id="r"),
    pytest.param(lambda out: out[0][..., 0].sum(), id="r-of-the-finite-element"),
    pytest.param(lambda out: out[2], id="sum_r"),
    pytest.param(lambda out: out[3], id="sum_r2"),
]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("levels", [None, 4], ids=["plain", "quantized"])
@pytest.mark.parametrize("channel_wise", [False, True], ids=["scalar", "channel-wise"])
def test_rate_norm_nan_element_makes_grad_raw_p_nan(backend, loss, levels, channel_wise):
    """Rule (the reference's −g·clip(x)/θ² at a NaN x): a NaN in x makes dL/draw_p NaN, like Σr̂,
    whatever the loss reads; the NaN element's own gradient is 0, the others' are untouched."""
    x = torch.tensor([[0.5, NAN]])
    running_max = torch.ones(2) if channel_wise else torch.tensor(1.0)
    grad_x, grad_p = _rate_norm_grads(x, running_max, loss, channel_wise=channel_wise, levels=levels)
    clean_x, _ = _rate_norm_grads(
        x[:, :1], running_max[:1] if channel_wise else running_max, loss, channel_wise=channel_wise, levels=levels
    )
    assert torch.isnan(grad_p)
    assert grad_x[0, 1] == 0 and grad_x[0, 0] == clean_x[0, 0]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("levels", [None, 4], ids=["plain", "quantized"])
@pytest.mark.parametrize("channel_wise", [False, True], ids=["scalar", "channel-wise"])
@pytest.mark.parametrize("special", [INF, -INF, 3e38], ids=["+inf", "-inf", "huge"])
def test_rate_norm_infinite_element_grad_raw_p_as_the_reference(backend, loss, levels, channel_wise, special):
    """Rule (the reference's chain, θ finite): plain, an infinite x is clipped to 0 or θ and
    dL/draw_p stays finite; quantized, the straight-through floor passes 0·(x/θ)/θ back to θ, NaN
    at x = ±inf (or where x/θ overflows: x = 3e38, θ ≈ 0.57), as at a NaN x. The element's own
    gradient is 0. Catches a quantized kernel that skipped the element outside the window (it gave
    a finite dL/draw_p) and one that poisoned the plain rate."""
    x = torch.tensor([[0.5, special]])
    running_max = torch.ones(2) if channel_wise else torch.tensor(1.0)
    grad_x, grad_p = _rate_norm_grads(x, running_max, loss, channel_wise=channel_wise, levels=levels)
    xr = x.clone().requires_grad_()
    raw_p = torch.tensor(0.3, requires_grad=True)
    loss(reference.rate_norm(xr, raw_p, running_max, 0.1, False, channel_wise, levels)).backward()
    assert bool(torch.isnan(grad_p)) == bool(torch.isnan(raw_p.grad)) == (levels is not None)
    if levels is None:
        torch.testing.assert_close(grad_p, raw_p.grad)
    assert grad_x[0, 1] == 0 and torch.equal(grad_x, xr.grad)


@pytest.mark.parametrize("loss", [LOSSES[0], LOSSES[2]])
@pytest.mark.parametrize("channel_wise", [False, True], ids=["scalar", "channel-wise"])
def test_rate_norm_infinite_running_max(backend, loss, channel_wise):
    """θ = inf: every rate is 0 (inf/inf = NaN at an inf x), dr̂/dx = 1/θ = 0 at every element, the
    inf one too (no 0·NaN from an unused Σr̂²), and dL/draw_p is NaN (−g·inf/inf² at the inf x)."""
    x = torch.tensor([[0.5, INF]])
    running_max = torch.full((2,), INF) if channel_wise else torch.tensor(INF)
    grad_x, grad_p = _rate_norm_grads(x, running_max, loss, channel_wise=channel_wise)
    assert grad_x.tolist() == [[0.0, 0.0]] and torch.isnan(grad_p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channel_wise", [False, True], ids=["scalar", "channel-wise"])
@pytest.mark.parametrize("x_value, raw_p", [(0.5, 10.0), (0.3, 0.3)])
def test_rate_norm_half_precision_sums_are_fp32_accurate(backend, dtype, channel_wise, x_value, raw_p):
    """Σr̂ and Σr̂² of 3·4096 + 17 equal rates (0.50002 for x = ½, θ = sigmoid(10); 0.52 for the
    other), to 1e-6 relative of the float64 spec: a float running sum over 4096-element chunks
    drifted by 3e-5, the reference's pairwise float sum stays near 1e-7."""
    x = torch.full((3 * 4096 + 17, 1), x_value, dtype=dtype)
    running_max = torch.ones(1) if channel_wise else torch.tensor(1.0)
    kwargs = dict(momentum=0.1, training=False, channel_wise=channel_wise)
    out = ops.rate_norm(x, torch.tensor(raw_p), running_max, **kwargs)
    ref = reference.rate_norm(x.double(), torch.tensor(raw_p), running_max, **kwargs)
    torch.testing.assert_close(out[2].double(), ref[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(out[3].double(), ref[3], rtol=1e-6, atol=0)


TINY_SCALES = [
    pytest.param(torch.float32, 3 * 2.0**-149, id="fp32-3-subnormal-units"),
    pytest.param(torch.float32, 2.0**-127 + 2.0**-149, id="fp32-subnormal"),
    pytest.param(torch.float64, 3 * 2.0**-1074, id="fp64-3-subnormal-units"),
]


@pytest.mark.parametrize("dtype, scale", TINY_SCALES)
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_pool_subnormal_scale_is_bit_identical(backend, dtype, scale, ceil_mode, channels_last):
    """Windows with 0…4 spikes (and ceil_mode's narrow edge windows) times a subnormal scale:
    (k/n)·scale rounds once, as the reference; k·(scale/n) rounded scale/n first."""
    fire = torch.tensor(
        [[1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 1], [1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 1]]
    )
    x = fire.to(dtype).expand(2, 2, 3, 11)  # [T=2, C=2, H=3, W=11]: θ = 1 is reached at each step
    x = x.contiguous().unsqueeze(1)  # [T, B=1, C, H, W]
    if channels_last:
        x = x[:, 0].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).unsqueeze(1)
    out = ops.if_sequence_pool2x2(x, 1.0, scale=scale, ceil_mode=ceil_mode)
    ref = reference.if_sequence_pool2x2(x, 1.0, scale=scale, ceil_mode=ceil_mode)
    assert torch.equal(out.spikes, ref[0]) and out.spikes.ne(0).any()


@pytest.mark.parametrize("v_reset", [None, 0.0], ids=["soft", "hard"])
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
def test_overflowing_backward_gives_the_references_inf_and_nan(backend, v_reset, detach_reset):
    """Rule: the kernels sum dL/dm in autograd's order on the reference, (direct path through v)
    + (dL/ds from the spike and the reset)·σ', so gradients near the float32 limit overflow into
    the same +inf, −inf or NaN (they gave ±inf where the reference's inf − inf is NaN)."""
    gen = torch.Generator().manual_seed(0)  # fixed: overflow is decided at the last bit
    x = torch.randn(4, 64, generator=gen) * 0.7 + 0.5
    grad_spikes = torch.randn(4, 64, generator=gen) * 3e38
    grad_v = torch.randn(64, generator=gen) * 3e38
    kwargs = dict(v_reset=v_reset, detach_reset=detach_reset, width=0.5)
    xk = x.clone().requires_grad_()
    out = ops.if_sequence(xk, 1.0, **kwargs)
    torch.autograd.backward([out.spikes, out.v], [grad_spikes, grad_v])
    xr = x.clone().requires_grad_()
    spikes, v, _, _ = reference.if_sequence(xr, 1.0, **kwargs)
    torch.autograd.backward([spikes, v], [grad_spikes, grad_v])
    assert not torch.isfinite(xr.grad).all() or detach_reset  # the case overflows
    assert torch.equal(torch.isnan(xk.grad), torch.isnan(xr.grad))
    assert torch.equal(torch.isposinf(xk.grad), torch.isposinf(xr.grad))
    assert torch.equal(torch.isneginf(xk.grad), torch.isneginf(xr.grad))
    finite = torch.isfinite(xr.grad)
    torch.testing.assert_close(xk.grad[finite], xr.grad[finite], rtol=1e-5, atol=0)


# The C++ passes run on one thread below 2**18 elements and split over threads from there on
# (numeric.h's kParallelMinWork): both sides of the line, the running max's element and a NaN in
# the last thread's range (QCFS's forward once ran 35x slower just below the line, a scalar loop).
@pytest.mark.parametrize("elements", [2**18 - 64, 2**18 + 64], ids=["one-thread", "threads"])
def test_rate_norm_and_qcfs_on_both_sides_of_the_parallel_line(backend, elements):
    g = torch.Generator().manual_seed(elements)
    x = torch.randn(elements, generator=g) * 1.5 + 0.3
    x[-7] = 9.5  # the batch max, in the last thread's range
    x[-3] = NAN  # skipped by the max
    raw_p, running_max = torch.tensor(0.4), torch.tensor(2.0)
    fast = ops.rate_norm(x, raw_p, running_max, 0.5, True)
    ref = reference.rate_norm(x, raw_p, running_max, 0.5, True)
    assert fast.running_max.item() == ref[1].item() == 0.5 * 2.0 + 0.5 * 9.5
    assert torch.equal(fast.r[:-3], ref[0][:-3]) and fast.r[-3].isnan()
    xq = torch.nan_to_num(x)
    assert torch.equal(ops.qcfs(xq, torch.tensor(1.3), 8), reference.qcfs(xq, torch.tensor(1.3), 8))
