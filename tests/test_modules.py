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
@pytest.mark.parametrize("detach_reset", [False, True], ids=["reset-grad", "detach-reset"])
@pytest.mark.parametrize(
    "kind, alpha",
    [("sigmoid", None), ("sigmoid", 1.5), ("atan", 2.0), ("atan", 3.0)],
    ids=["sigmoid-sj-default", "sigmoid-1.5", "atan-sj-default", "atan-3"],
)
def test_gradient_equals_spikingjelly_ifnode(backend, v_reset, detach_reset, kind, alpha):
    """surrogate="sigmoid", width=1/alpha is SpikingJelly's Sigmoid(alpha), "atan", width=2/alpha its
    ATan(alpha): spikes, and the gradients of a multi-step IFNode to 1e-6 relative (float64, so that
    only the surrogate can differ, not the order of the float32 additions). Sigmoid with alpha None:
    IFNode's default surrogate, which is Sigmoid(alpha=4), width 0.25."""
    from spikingjelly.activation_based import functional, neuron, surrogate

    x = torch.randn(40, 4, 33, dtype=torch.float64) * 0.7 + 0.3
    options = dict(v_threshold=0.9, v_reset=v_reset, detach_reset=detach_reset, step_mode="m")
    if alpha is None:
        sj = neuron.IFNode(**options)
        assert type(sj.surrogate_function) is surrogate.Sigmoid and sj.surrogate_function.alpha == 4.0
        width = 0.25
    elif kind == "sigmoid":
        sj = neuron.IFNode(**options, surrogate_function=surrogate.Sigmoid(alpha=alpha))
        width = 1.0 / alpha
    else:
        sj = neuron.IFNode(**options, surrogate_function=surrogate.ATan(alpha=alpha))
        width = 2.0 / alpha
    ours = rnl_fast.IFSequence(surrogate=kind, width=width, **options)
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    s_sj, s_ours = sj(xs), ours(xo)
    assert torch.equal(s_ours, s_sj)
    weight = torch.randn_like(x)
    (s_sj * weight).sum().backward()
    (s_ours * weight).sum().backward()
    assert xo.grad.dtype == torch.float64
    torch.testing.assert_close(xo.grad, xs.grad, rtol=1e-6, atol=1e-12)
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


def test_rate_norm_channel_wise_module(backend):
    """A running max per channel ([C] from the first input, each channel starting at 1.0 as the
    scalar layer does), θ of shape [C], one p; eval leaves the buffer alone."""
    layer = rnl_fast.RateNorm(momentum=0.5, channel_wise=True, levels=4)
    assert [name for name, _ in layer.named_parameters()] == ["raw_p"]
    x = torch.randn(8, 5, 3, 3) + 0.5
    y = layer(x)
    expected_max = 0.5 * 1.0 + 0.5 * x.clamp_min(0).amax(dim=(0, 2, 3))
    torch.testing.assert_close(layer.running_max, expected_max)
    assert layer.threshold.shape == (5,)
    torch.testing.assert_close(layer.threshold, layer.p * expected_max + 1e-6)
    assert set((y * 4).round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    torch.testing.assert_close(layer.omega, reference.omega(y), rtol=1e-5, atol=1e-6)
    layer.eval()
    before = layer.running_max.clone()
    layer(x * 10)
    assert torch.equal(layer.running_max, before)
    assert "channel_wise=True" in repr(layer) and "levels=4" in repr(layer)


def test_rate_norm_num_channels_and_mismatch():
    layer = rnl_fast.RateNorm(channel_wise=True, num_channels=6)
    assert torch.equal(layer.running_max, torch.ones(6))
    with pytest.raises(ValueError, match="running_max holds 6 channels but x has 4"):
        layer(torch.randn(2, 4, 3))


def test_rate_norm_state_dict_round_trip(backend):
    """A channel-wise quantized layer's state loads into a fresh (not yet sized) layer and gives the
    same outputs; pickles and deep copies keep the options."""
    import copy
    import pickle

    layer = rnl_fast.RateNorm(momentum=0.3, p_init=0.7, channel_wise=True, levels=3)
    x = torch.randn(4, 7, 5) + 0.5
    layer(x)
    fresh = rnl_fast.RateNorm(channel_wise=True, levels=3)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.running_max, layer.running_max) and torch.equal(fresh.raw_p, layer.raw_p)
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.channel_wise and clone.levels == 3 and torch.equal(clone(x), layer(x))
    sized = rnl_fast.RateNorm(channel_wise=True, num_channels=4)
    with pytest.raises(RuntimeError, match="running_max"):
        sized.load_state_dict(layer.state_dict())


def test_rate_norm_old_checkpoint_loads_into_default_layer(backend):
    """A checkpoint of the layer before channel_wise and levels existed (raw_p and a [] running
    max, nothing else) loads into today's default layer, which computes what it did."""
    old_state = {"raw_p": torch.tensor(1.25), "running_max": torch.tensor(2.5)}
    layer = rnl_fast.RateNorm()
    layer.load_state_dict(old_state)  # strict: no key missing, none unexpected
    assert set(layer.state_dict()) == set(old_state)
    layer.eval()
    x = torch.randn(6, 9) * 2
    r, *_ = reference.rate_norm(x, old_state["raw_p"], old_state["running_max"], training=False)
    torch.testing.assert_close(layer(x), r, rtol=1e-6, atol=1e-7)
    assert layer.threshold.shape == ()


def test_shared_p_across_channel_wise_layers(backend):
    """One p for layers with per-channel running maxima: its gradient sums both layers' terms."""
    first = rnl_fast.RateNorm(channel_wise=True)
    second = rnl_fast.RateNorm(p=first.raw_p, channel_wise=True, levels=2)
    model = nn.Sequential(nn.Linear(6, 5), first, nn.Linear(5, 4), second)
    model(torch.randn(7, 6)).sum().backward()
    assert first.running_max.shape == (5,) and second.running_max.shape == (4,)
    assert first.raw_p.grad is not None and first.raw_p.grad.item() != 0
