"""The fused IF op against its pure-PyTorch definition, on every CPU-runnable backend."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _compare import assert_if_same

from rnl_fast import ops, reference
from rnl_fast.numerics import SURROGATES
from rnl_fast.ops import IFResult


def _reference(x, **kwargs) -> IFResult:
    return IFResult(*reference.if_sequence(x, **kwargs))


def _current(T: int, *neurons: int, dtype=torch.float32) -> torch.Tensor:
    """Random input current of mean ~0.3 so that neurons fire at assorted rates."""
    return (torch.randn(T, *neurons) * 0.8 + 0.3).to(dtype)


CASES = [
    pytest.param(dict(T=1, neurons=(5,)), id="T1"),
    pytest.param(dict(T=7, neurons=(1,)), id="one-neuron"),
    pytest.param(dict(T=13, neurons=(3, 37)), id="T13-odd"),
    pytest.param(dict(T=33, neurons=(2, 3, 5, 7)), id="T33-4d"),
    pytest.param(dict(T=9, neurons=(1100,)), id="T9-N1100-two-blocks"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("v_reset", [None, -0.2], ids=["soft", "hard"])
def test_forward_matches_reference(backend, case, v_reset):
    x = _current(case["T"], *case["neurons"])
    kwargs = dict(v_th=0.9, v_init=0.25, v_reset=v_reset)
    assert_if_same(ops.if_sequence(x, **kwargs), _reference(x, **kwargs))


def test_long_sequence(backend):
    T = 1000 if backend != "triton" else 1200
    x = _current(T, 3, 7) * 0.3
    assert_if_same(ops.if_sequence(x, v_th=0.7), _reference(x, v_th=0.7))


def test_per_channel_threshold_and_membrane(backend):
    x = _current(11, 4, 3, 5)
    v_th = torch.rand(3, 1) + 0.3  # per channel, broadcast over the last dim
    v_init = torch.randn(4, 3, 5) * 0.2
    assert_if_same(ops.if_sequence(x, v_th=v_th, v_init=v_init), _reference(x, v_th=v_th, v_init=v_init))


def test_constant_input_stride_zero(backend):
    current = torch.rand(6, 17)
    x = current.expand(40, 6, 17)
    assert x.stride(0) == 0
    assert_if_same(ops.if_sequence(x, v_th=0.8), _reference(x.contiguous(), v_th=0.8))


def test_non_contiguous_input(backend):
    x = _current(12, 9, 8).transpose(1, 2)
    assert not x.is_contiguous()
    assert_if_same(ops.if_sequence(x), _reference(x.contiguous()))


def test_channels_last_input_keeps_its_layout(backend):
    x = _current(9, 2, 6, 5, 4).permute(0, 1, 4, 2, 3)  # [T, B, C, H, W] lying as [T, B, H, W, C]
    v_th = torch.rand(4, 1, 1) + 0.3
    fast = ops.if_sequence(x, v_th=v_th)
    assert_if_same(fast, _reference(x.contiguous(), v_th=v_th))
    if backend != "torch":
        assert fast.spikes.permute(0, 1, 3, 4, 2).is_contiguous()
    second = ops.if_sequence(x, v_th=v_th, v_init=fast.v)  # the carried membrane, same layout
    assert_if_same(second, _reference(x.contiguous(), v_th=v_th, v_init=fast.v))


@pytest.mark.parametrize("spike_dtype", [torch.uint8, torch.bool], ids=["uint8", "bool"])
def test_byte_spikes(backend, spike_dtype):
    x = _current(10, 3, 11)
    fast = ops.if_sequence(x, spike_dtype=spike_dtype)
    ref = _reference(x, spike_dtype=spike_dtype)
    assert_if_same(fast, ref)
    assert fast.spikes.dtype == spike_dtype
    assert set(fast.spikes.view(torch.uint8).unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_low_and_high_precision_inputs(backend, dtype):
    """fp16/bf16 inputs are computed in fp32: they match the fp32 reference of the same values."""
    x = _current(15, 4, 9, dtype=dtype)
    fast = ops.if_sequence(x, v_th=0.75)
    ref = _reference(x if dtype == torch.float64 else x.float(), v_th=0.75)
    assert fast.spikes.dtype == dtype
    assert torch.equal(fast.spikes.to(ref.spikes.dtype), ref.spikes)
    assert fast.v.dtype == ref.v.dtype
    torch.testing.assert_close(fast.v, ref.v)


def test_counts_are_sums_of_spikes(backend):
    x = _current(21, 5, 6)
    out = ops.if_sequence(x, v_th=0.6)
    assert torch.equal(out.step_counts, out.spikes.flatten(1).sum(1).long())
    assert torch.equal(out.neuron_counts.long(), out.spikes.sum(0).long())
    assert out.step_counts.dtype == torch.int64 and out.neuron_counts.dtype == torch.int32


def test_neuron_counts_can_be_skipped(backend):
    x = _current(12, 3, 17)
    full = ops.if_sequence(x, v_th=0.7)
    lean = ops.if_sequence(x, v_th=0.7, count_neurons=False)
    assert lean.neuron_counts is None
    assert torch.equal(lean.spikes, full.spikes) and torch.equal(lean.v, full.v)
    assert torch.equal(lean.step_counts, full.step_counts)


def test_chunked_calls_equal_one_call(backend):
    x = _current(30, 4, 5)
    whole = ops.if_sequence(x, v_th=0.7)
    v, spikes = torch.tensor(0.0), []
    for chunk in x.split([1, 9, 13, 7]):
        out = ops.if_sequence(chunk, v_th=0.7, v_init=v)
        v = out.v
        spikes.append(out.spikes)
    assert torch.equal(torch.cat(spikes), whole.spikes)
    assert torch.equal(v, whole.v)


def test_nan_input_silences_the_neuron(backend):
    """Documented: NaN makes the membrane NaN from that step on; a NaN membrane never fires."""
    x = torch.full((8, 3), 0.6)
    x[2, 1] = float("nan")
    out = ops.if_sequence(x, v_th=1.0)
    assert_if_same(out, _reference(x, v_th=1.0))
    assert out.spikes[2:, 1].sum() == 0
    assert torch.isnan(out.v[1]) and not torch.isnan(out.v[[0, 2]]).any()
    assert out.spikes[:, 0].sum() > 0


def test_nan_membrane_carries_over_chunks(backend):
    """A membrane silenced by NaN is a valid state: the next chunk takes it as v_init."""
    x = torch.full((8, 3), 0.6)
    x[2, 1] = float("nan")
    whole = ops.if_sequence(x, v_th=1.0)
    first = ops.if_sequence(x[:4], v_th=1.0)
    second = ops.if_sequence(x[4:], v_th=1.0, v_init=first.v)
    assert torch.equal(torch.cat([first.spikes, second.spikes]), whole.spikes)
    assert torch.isnan(second.v[1])


def test_outputs_are_fully_written(backend, poisoned_allocations):
    """Every output element comes from the kernel: allocations are poisoned before it runs."""
    x = _current(9, 3, 41)
    with poisoned_allocations():
        out = ops.if_sequence(x, v_th=0.8)
    assert_if_same(out, _reference(x, v_th=0.8))


# ─── backward ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("v_reset", [None, 0.1], ids=["soft", "hard"])
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("detach_reset", [False, True], ids=["reset-grad", "detach-reset"])
def test_backward_matches_reference(backend, v_reset, surrogate, detach_reset):
    x = _current(17, 3, 13).requires_grad_()
    v_init = (torch.randn(3, 13) * 0.3).requires_grad_()
    kwargs = dict(v_th=0.8, v_reset=v_reset, surrogate=surrogate, width=0.7, detach_reset=detach_reset)
    weight_s, weight_v = torch.randn(17, 3, 13), torch.randn(3, 13)
    grads = []
    for fn in (ops.if_sequence, reference.if_sequence):
        spikes, v, *_ = fn(x, v_init=v_init, **kwargs)
        grads.append(torch.autograd.grad((spikes * weight_s).sum() + (v * weight_v).sum(), [x, v_init]))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("v_reset", [None, 0.1], ids=["soft", "hard"])
def test_gradcheck_fp64(backend, v_reset):
    """Where the true derivative exists it is exact: with the reset detached, the final membrane
    is piecewise linear in x and in v_init (no surrogate enters), so finite differences apply.
    (Through the spikes the derivative is a surrogate by design: the test above covers it.)"""
    x = (torch.randn(6, 2, 5, dtype=torch.float64) * 0.8 + 0.3).requires_grad_()
    v_init = (torch.randn(2, 5, dtype=torch.float64) * 0.2).requires_grad_()

    def final_membrane(x, v_init):
        return ops.if_sequence(x, v_th=0.7, v_init=v_init, v_reset=v_reset, detach_reset=True).v

    assert torch.autograd.gradcheck(final_membrane, (x, v_init), eps=1e-7, atol=1e-6)


def test_backward_through_chunks_equals_one_call(backend):
    x = _current(20, 3, 4).requires_grad_()
    weight = torch.randn(20, 3, 4)
    (g_whole,) = torch.autograd.grad((ops.if_sequence(x, v_th=0.6).spikes * weight).sum(), x)
    v, loss = torch.tensor(0.0), 0.0
    for chunk, w in zip(x.split(7), weight.split(7)):
        out = ops.if_sequence(chunk, v_th=0.6, v_init=v)
        v, loss = out.v, loss + (out.spikes * w).sum()
    (g_chunks,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g_chunks, g_whole, rtol=1e-5, atol=1e-6)


def test_stride_zero_input_backward(backend):
    current = torch.rand(4, 6).requires_grad_()
    weight = torch.randn(25, 4, 6)
    grads = []
    for fn in (ops.if_sequence, reference.if_sequence):
        (g,) = torch.autograd.grad((fn(current.expand(25, 4, 6), v_th=0.5)[0] * weight).sum(), current)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_byte_spikes_carry_no_gradient(backend):
    x = _current(5, 7).requires_grad_()
    out = ops.if_sequence(x, spike_dtype=torch.uint8)
    assert not out.spikes.requires_grad
    out.v.sum().backward()  # the membrane still carries a gradient
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_backward_fp64_matches_reference(backend, surrogate):
    """float64 input: the surrogate is evaluated in float64 on every backend."""
    x = _current(12, 2, 9, dtype=torch.float64).requires_grad_()
    weight = torch.randn(12, 2, 9, dtype=torch.float64)
    kwargs = dict(v_th=0.8, surrogate=surrogate, width=0.3)
    grads = [
        torch.autograd.grad((fn(x, **kwargs)[0] * weight).sum(), x)[0]
        for fn in (ops.if_sequence, reference.if_sequence)
    ]
    assert grads[0].dtype == torch.float64
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def _spike_grad_of_one_step(u: torch.Tensor, width: float) -> torch.Tensor:
    """d spikes[0] / d x[0] with T = 1, v_th = 1, v_init = 0: σ'(x − 1), the sigmoid surrogate alone."""
    x = (1.0 + u).unsqueeze(0).requires_grad_()
    out = ops.if_sequence(x, v_th=1.0, surrogate="sigmoid", width=width)
    (grad,) = torch.autograd.grad(out.spikes.sum(), x)
    return grad[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("width", [0.25, 0.7])
def test_sigmoid_surrogate_at_the_threshold(backend, dtype, width):
    """m − θ = 0 exactly (1 + 0 − 1): σ'(0) = S(0)·(1 − S(0))/w = 1/(4w), SpikingJelly's alpha/4."""
    grad = _spike_grad_of_one_step(torch.zeros(3, dtype=dtype), width)
    expected = torch.full((3,), (1.0 / width) / 4, dtype=dtype)
    torch.testing.assert_close(grad, expected, rtol=1e-7 if dtype == torch.float32 else 1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sigmoid_surrogate_far_from_the_threshold(backend, dtype):
    """|m − θ|/w from 100 to 1e30: the gradient is 0 (or a subnormal at 100/w), never NaN or inf;
    an exp(+|z|) or a 1 − S(z) would overflow or cancel here."""
    width = 0.5
    z = torch.tensor([100.0, 1e3, 1e4, 1e30], dtype=dtype)
    grad = _spike_grad_of_one_step(torch.cat([z, -z]) * width, width)
    assert torch.isfinite(grad).all() and (grad >= 0).all()
    assert (grad <= 1e-40).all(), grad  # true value 2·exp(−100) ≈ 7e−44 at |z| = 100
    assert (grad[[1, 2, 3, 5, 6, 7]] == 0).all()


@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="spikingjelly not installed")
def test_sigmoid_surrogate_equals_spikingjelly_sigmoid():
    """reference.surrogate_grad(u, "sigmoid", 1/alpha) is SpikingJelly 2.0's sigmoid_backward(u, alpha),
    alpha·S(alpha·u)·(1 − S(alpha·u)), to 1e-6 relative in float64 over |alpha·u| ≤ 20. (Not to the last
    bit: SpikingJelly's 1 − S(alpha·u) cancels for large alpha·u, 5e-8 relative at 20; ours does not.)"""
    from spikingjelly.activation_based.surrogate import sigmoid_backward

    for alpha in (4.0, 1.0, 2.5, 10.0):
        u = torch.linspace(-20.0, 20.0, 4001, dtype=torch.float64) / alpha
        ours = reference.surrogate_grad(u, "sigmoid", 1.0 / alpha)
        theirs, _ = sigmoid_backward(torch.ones_like(u), u, alpha)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="spikingjelly not installed")
def test_atan_and_rectangle_equal_spikingjelly_atan_and_rect():
    """The README's table: "atan" with width w is SpikingJelly's ATan(alpha=2/w), "rectangle" is
    Rect(alpha=1/w) (alpha/2/(1 + (π/2·alpha·u)²) and alpha·[|u| < 0.5/alpha] in its source)."""
    from spikingjelly.activation_based.surrogate import atan_backward, rect_backward

    u = torch.linspace(-3.0, 3.0, 6001, dtype=torch.float64)
    for width in (1.0, 0.5, 0.7, 2.0):
        theirs, _ = atan_backward(torch.ones_like(u), u, 2.0 / width)
        torch.testing.assert_close(reference.surrogate_grad(u, "atan", width), theirs, rtol=1e-12, atol=0)
    for width in (1.0, 0.5, 0.25, 2.0):  # dyadic: 0.5/alpha is then exactly w/2, the same window edge
        theirs, _ = rect_backward(torch.ones_like(u), u, 1.0 / width)
        assert torch.equal(reference.surrogate_grad(u, "rectangle", width), theirs)
