"""IFSequence and RateNorm as nn.Modules: state across calls, counts, shared p, the RIL."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import rnl_fast
from rnl_fast import reference
from rnl_fast.nn import RAW_P_MAX


def test_if_sequence_carries_membrane_and_counts(backend):
    layer = rnl_fast.IFSequence(v_threshold=0.8)
    x = torch.rand(24, 3, 5) * 0.9
    whole = reference.if_sequence(x, v_th=0.8)[0]
    out = torch.cat([layer(chunk) for chunk in x.split([5, 11, 8])])
    assert torch.equal(out, whole)
    assert layer.step_spike_counts.shape == (24,)
    assert torch.equal(layer.step_spike_counts, whole.flatten(1).sum(1).long())
    assert torch.equal(layer.neuron_spike_counts, whole.sum(0).long())
    layer.reset()
    assert layer.v is None and layer.step_spike_counts is None
    assert torch.equal(layer(x), whole)


def test_if_sequence_shape_change_needs_reset():
    layer = rnl_fast.IFSequence()
    layer(torch.rand(3, 2, 4))
    with pytest.raises(ValueError, match="reset"):
        layer(torch.rand(3, 5, 4))


def test_if_sequence_per_channel_threshold_is_a_buffer():
    layer = rnl_fast.IFSequence(v_threshold=torch.tensor([0.5, 1.0, 2.0]).view(3, 1))
    assert "v_threshold" in dict(layer.named_buffers())
    x = torch.rand(9, 2, 3, 4)
    assert torch.equal(layer(x), reference.if_sequence(x, v_th=layer.v_threshold)[0])
    assert "tensor(3, 1)" in repr(layer)


@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="spikingjelly not installed")
@pytest.mark.parametrize("v_reset", [None, 0.0], ids=["soft", "hard"])
def test_equals_spikingjelly_ifnode(v_reset):
    from spikingjelly.activation_based import functional, neuron, surrogate

    x = torch.randn(40, 4, 33) * 0.7 + 0.3
    sj = neuron.IFNode(v_threshold=0.9, v_reset=v_reset, step_mode="m", surrogate_function=surrogate.ATan())
    ours = rnl_fast.IFSequence(v_threshold=0.9, v_reset=v_reset)
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    s_sj, s_ours = sj(xs), ours(xo)
    assert torch.equal(s_ours, s_sj)
    weight = torch.randn_like(x)
    (s_sj * weight).sum().backward()
    (s_ours * weight).sum().backward()
    torch.testing.assert_close(xo.grad, xs.grad, rtol=1e-4, atol=1e-5)  # same ATan surrogate
    functional.reset_net(sj)


def test_rate_norm_module_state(backend):
    layer = rnl_fast.RateNorm(momentum=0.5)
    assert [name for name, _ in layer.named_parameters()] == ["raw_p"]
    assert layer.raw_p.item() == RAW_P_MAX and layer.p.item() > 0.9999
    x = torch.randn(8, 16) + 1
    y = layer(x)
    expected_max = 0.5 * 1.0 + 0.5 * x.clamp_min(0).max()
    torch.testing.assert_close(layer.running_max, expected_max)
    torch.testing.assert_close(layer.threshold, layer.p * expected_max + 1e-6)
    torch.testing.assert_close(layer.omega, reference.omega(y), rtol=1e-5, atol=1e-6)
    layer.eval()
    before = layer.running_max.clone()
    layer(x * 10)
    assert torch.equal(layer.running_max, before)


def test_p_init_sets_p():
    layer = rnl_fast.RateNorm(p_init=0.6)
    torch.testing.assert_close(layer.p, torch.tensor(0.6))


def test_shared_p_across_layers(backend):
    first = rnl_fast.RateNorm()
    second = rnl_fast.RateNorm(p=first.raw_p)
    model = nn.Sequential(nn.Linear(6, 6), first, nn.Linear(6, 6), second)
    assert len([p for p in model.parameters() if p.dim() == 0]) == 1
    out = model(torch.randn(5, 6))
    loss = out.sum() + rnl_fast.rate_inference_loss(model)
    loss.backward()
    assert first.raw_p.grad is not None and first.raw_p.grad.item() != 0


def test_rate_inference_loss_is_mean_omega(backend):
    model = nn.Sequential(nn.Linear(4, 8), rnl_fast.RateNorm(), nn.Linear(8, 8), rnl_fast.RateNorm())
    with pytest.raises(RuntimeError, match="forward"):
        rnl_fast.rate_inference_loss(model)
    model(torch.randn(10, 4))
    omegas = [m.omega for m in model if isinstance(m, rnl_fast.RateNorm)]
    torch.testing.assert_close(rnl_fast.rate_inference_loss(model), (omegas[0] + omegas[1]) / 2)
    with pytest.raises(ValueError, match="no RateNorm"):
        rnl_fast.rate_inference_loss(nn.Linear(2, 2))


def test_omega_formula():
    r = torch.tensor([0.0, 0.5, 1.0, 0.25])
    torch.testing.assert_close(rnl_fast.omega(r), torch.tensor(1.75 / (0.25 + 1.0 + 0.0625 + 1e-5)))
