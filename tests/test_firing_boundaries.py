"""The rules at their boundaries, where random continuous inputs never land (issue 13): IF neurons
fire at m ≥ θ (paper Eq. 3, SpikingJelly), and dyadic inputs reach θ exactly in every dtype;
Rate Norm's clip and gradient window are inclusive at 0 and θ; QCFS rounds ties up; the running
max blends with the momentum. Expected values come from a few lines of plain-Python arithmetic
(exact for these dyadic numbers), not from the reference, so every backend, the reference too, is
checked against the rule itself. docs/mutation.md lists the kernel mutants these tests kill."""

from __future__ import annotations

import pytest
import torch

from rnl_fast import ops, reference

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
RESETS = [pytest.param(None, id="soft"), pytest.param(0.0, id="hard0"), pytest.param(-0.5, id="hard-half")]


def _simulate(xs: list[float], v_th: float, v_reset: float | None, v: float = 0.0) -> tuple[list[int], float]:
    """One neuron, scalar by scalar: fire at m >= v_th, then subtract v_th or set v_reset."""
    spikes = []
    for x in xs:
        m = v + x
        fired = m >= v_th
        spikes.append(int(fired))
        v = (m - v_th if v_reset is None else v_reset) if fired else m
    return spikes, v


def test_the_example_of_the_issue(backend):
    out = ops.if_sequence(torch.tensor([[1.0], [0.5], [0.5]]), 1.0)
    assert out.spikes.flatten().tolist() == [1, 0, 1] and out.v.item() == 0.0


# Columns of x (one neuron each), chosen so that m hits θ = 1 exactly at some steps and, for the
# hard resets, so that a wrong reset value changes what follows.
COLUMNS = [
    [1.0, 0.5, 0.5, 0.25, 0.75, 0.0, 1.0],
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    [0.25, 0.25, 0.25, 0.25, 0.75, 0.25, 0.5],
    [0.75, 0.25, 1.5, -0.5, 0.5, 1.0, 0.25],
    [2.0, -1.0, 1.0, 0.0, 0.5, 0.5, 0.75],
]


def _columns(dtype) -> torch.Tensor:
    return torch.tensor(COLUMNS, dtype=dtype).T.contiguous()  # [T = 7, N = 5]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v_reset", RESETS)
def test_membrane_reaching_the_threshold_fires(backend, dtype, v_reset):
    out = ops.if_sequence(_columns(dtype), 1.0, v_reset=v_reset)
    expected = [_simulate(col, 1.0, v_reset) for col in COLUMNS]
    assert out.spikes.T.tolist() == [s for s, _ in expected]
    assert out.v.tolist() == [v for _, v in expected]
    assert out.neuron_counts.tolist() == [sum(s) for s, _ in expected]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v_reset", RESETS)
@pytest.mark.parametrize("expanded", [False, True], ids=["materialised", "stride-0"])
def test_constant_quarter_fires_every_fourth_step(backend, dtype, v_reset, expanded):
    """0.25 for 32 steps reaches θ = 1 exactly at every fourth step: 8 spikes per neuron, 8000
    over 1000 neurons (7000 with m > θ). The hard reset to −0.5 needs 6 steps: 5 spikes."""
    row = torch.full((1000,), 0.25, dtype=dtype)
    x = row.expand(32, 1000) if expanded else row.repeat(32, 1)
    out = ops.if_sequence(x, 1.0, v_reset=v_reset)
    spikes, v = _simulate([0.25] * 32, 1.0, v_reset)
    assert out.step_counts.tolist() == [1000 * s for s in spikes]
    assert out.neuron_counts.eq(sum(spikes)).all() and out.v.eq(v).all()
    assert int(out.spikes.double().sum()) == 1000 * sum(spikes)


@pytest.mark.parametrize("v_reset", RESETS)
def test_per_neuron_threshold_and_initial_membrane_at_the_boundary(backend, v_reset):
    """θ and v_init per neuron: v_init + x = θ exactly at the first step."""
    v_th = torch.tensor([0.5, 1.0, 2.0, 0.25])
    v_init = torch.tensor([0.25, 0.5, 1.5, 0.0])
    x = torch.tensor([[0.25, 0.5, 0.5, 0.25], [0.5, 1.0, 2.0, 0.25], [0.0, 0.0, 0.0, 0.0]])
    out = ops.if_sequence(x, v_th, v_init, v_reset=v_reset)
    for n in range(4):
        s, v = _simulate(x[:, n].tolist(), v_th[n].item(), v_reset, v_init[n].item())
        assert out.spikes[:, n].tolist() == s and out.v[n].item() == v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v_reset", RESETS)
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
def test_pooled_op_fires_at_the_threshold(backend, dtype, v_reset, ceil_mode):
    """The five columns on a 3×2 plane (one neuron per column, one always silent): each window's
    rate is its neurons' spikes over the neurons it covers."""
    x = torch.cat([_columns(dtype), torch.zeros(7, 1, dtype=dtype)], 1).reshape(7, 1, 3, 2)
    out = ops.if_sequence_pool2x2(x, 1.0, v_reset=v_reset, ceil_mode=ceil_mode, scale=2.0)
    spikes = torch.tensor([_simulate(col, 1.0, v_reset)[0] for col in COLUMNS] + [[0] * 7]).T.reshape(7, 1, 3, 2)
    expected = reference.avg_pool2x2(spikes.double(), ceil_mode) * 2.0
    assert out.spikes.double().tolist() == expected.tolist()
    assert out.neuron_counts.flatten().tolist()[:5] == [sum(_simulate(c, 1.0, v_reset)[0]) for c in COLUMNS]


@pytest.mark.parametrize("v_reset", [None, 0.0], ids=["soft", "hard"])
def test_surrogate_gradient_at_the_threshold(backend, v_reset):
    """At m = θ the spike's surrogate slope is its peak 1/w (atan): dL/dx of s_0 is 1 for w = 1."""
    x = torch.tensor([[1.0], [0.0]], requires_grad=True)
    out = ops.if_sequence(x, 1.0, v_reset=v_reset)
    out.spikes[0].sum().backward()
    assert x.grad.flatten().tolist() == [1.0, 0.0]


def _theta(raw_p: float, running_max: float) -> torch.Tensor:
    return reference.rate_norm_threshold(torch.tensor(raw_p), torch.tensor(running_max), torch.float32)


def test_rate_norm_clip_and_window_are_inclusive(backend):
    """x = 0 and x = θ are inside the clip window (gradient 1/θ, like torch.clamp's backward);
    one ulp outside either end the rate is 0 or 1 and the gradient 0."""
    theta = _theta(0.5, 2.0)
    below, above = torch.nextafter(torch.tensor(0.0), torch.tensor(-1.0)), torch.nextafter(theta, theta + 1)
    x = torch.stack([below, torch.tensor(0.0), theta / 2, theta, above, theta * 4]).requires_grad_()
    out = ops.rate_norm(x, torch.tensor(0.5), torch.tensor(2.0), 0.1, training=False)
    assert out[0].tolist() == [0.0, 0.0, (theta / 2 / theta).item(), 1.0, 1.0, 1.0]
    out[0].sum().backward()
    g = (1.0 / theta).item()
    assert x.grad.tolist() == [0.0, g, g, g, 0.0, 0.0]
    assert out[2].item() == sum(out[0].tolist()) and out[3].item() == sum(r * r for r in out[0].tolist())


def test_rate_norm_running_max_blends_with_the_momentum(backend):
    """(1 − m)·running_max + m·max(relu(x)) with dyadic values: 0.75·2 + 0.25·6 = 3."""
    x = torch.tensor([[-9.0, 6.0, 1.0, float("nan")]])
    out = ops.rate_norm(x, torch.tensor(0.0), torch.tensor(2.0), 0.25, training=True)
    assert out[1].item() == 3.0
    channel = ops.rate_norm(x, torch.tensor(0.0), torch.tensor([2.0]), 0.25, training=True, channel_wise=False)
    assert channel[1].item() == 3.0


def test_rate_norm_channel_wise_running_max_blends_with_the_momentum(backend):
    x = torch.tensor([[6.0, -2.0], [2.0, 10.0]])  # [B = 2, C = 2]: channel maxima 6 and 10
    out = ops.rate_norm(x, torch.tensor(0.0), torch.tensor([2.0, 2.0]), 0.25, training=True, channel_wise=True)
    assert out[1].tolist() == [3.0, 4.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_qcfs_rounds_ties_up(backend, dtype):
    """floor(x/λ·L + ½) at exact halves (λ = 1, L = 4): x = 0.125 → 1/4 and 0.375 → 2/4 (round
    half to even would give 0 and 2/4), −0.125 → 0, and 1.125 (k = L + ½ → 5) clips to 1."""
    x = torch.tensor([0.125, 0.375, 0.625, -0.125, 1.125, 0.0], dtype=dtype)
    y = ops.qcfs(x, torch.tensor(1.0), 4)
    assert y.tolist() == [0.25, 0.5, 0.75, 0.0, 1.0, 0.0]


def test_quantized_rate_norm_rounds_ties_up(backend):
    """Rate Norm with levels = 4 at rates that are exact halves of a level: x = θ/8 → 1/4."""
    theta = _theta(0.0, 2.0)
    x = torch.stack([theta / 8, theta * 3 / 8, theta / 2])
    out = ops.rate_norm(x, torch.tensor(0.0), torch.tensor(2.0), 0.1, training=False, levels=4)
    assert out[0].tolist() == [0.25, 0.5, 0.5]


@pytest.mark.parametrize("v_reset", RESETS)
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
@pytest.mark.parametrize("surrogate", ["atan", "rectangle"])
def test_backward_through_membranes_at_the_threshold(backend, v_reset, detach_reset, surrogate):
    """The backward pass recomputes the membrane and gates the hard reset by the spike: both must
    fire at m = θ as the forward did, or the surrogate is taken at the wrong membrane."""
    x = _columns(torch.float64).requires_grad_()
    weights = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64).reshape(x.shape)
    kwargs = dict(v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate, width=0.75)
    out = ops.if_sequence(x, 1.0, **kwargs)
    ((out.spikes * weights).sum() + out.v.sum()).backward()
    xr = x.detach().clone().requires_grad_()
    spikes, v, _, _ = reference.if_sequence(xr, 1.0, **kwargs)
    ((spikes * weights).sum() + v.sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
