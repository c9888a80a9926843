"""IFSequence.step_mode: a per-step ("s") loop is exactly one multi-step ("m") call, forward and
backward; the attribute is validated; SpikingJelly's set_step_mode / reset_net drive it."""

from __future__ import annotations

import copy
import importlib.util
import pickle

import pytest
import torch
from torch import nn

import rnl_fast

HAS_SPIKINGJELLY = importlib.util.find_spec("spikingjelly") is not None

# (v_threshold, v_reset, v_init): soft and hard reset, a per-channel tensor threshold, a v_init.
CASES = {
    "soft": (0.8, None, 0.0),
    "hard": (0.8, 0.0, 0.0),
    "hard-nonzero": (0.8, -0.2, 0.0),
    "tensor-threshold": (torch.tensor([0.5, 1.0, 1.5]).view(3, 1), None, 0.0),
    "v-init": (1.0, None, 0.5),
    "tensor-threshold-hard-v-init": (torch.tensor([0.5, 1.0, 1.5]).view(3, 1), 0.0, 0.3),
}


def _per_step(layer: rnl_fast.IFSequence, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([layer(x[t]) for t in range(x.shape[0])])


@pytest.mark.parametrize("case", list(CASES))
def test_per_step_loop_equals_one_call(backend, case):
    v_th, v_reset, v_init = CASES[case]
    x = torch.randn(12, 2, 3, 5) * 0.6 + 0.3
    multi = rnl_fast.IFSequence(v_threshold=v_th, v_reset=v_reset, v_init=v_init)
    single = rnl_fast.IFSequence(v_threshold=v_th, v_reset=v_reset, v_init=v_init, step_mode="s")
    whole = multi(x)
    steps = _per_step(single, x)
    assert steps.shape == whole.shape
    assert torch.equal(steps, whole)
    assert torch.equal(single.v, multi.v)
    assert single.step_spike_counts.shape == (12,)
    assert torch.equal(single.step_spike_counts, multi.step_spike_counts)
    assert torch.equal(single.neuron_spike_counts, multi.neuron_spike_counts)


@pytest.mark.parametrize("case", ["soft", "hard", "tensor-threshold", "v-init"])
def test_per_step_loop_gradients_equal_one_call(backend, case):
    """Backpropagation through a per-step loop (autograd chains the steps through .v) gives
    exactly the gradient of the fused multi-step backward: the same per-neuron recurrence, step
    by step, in the same order (checked bit-exact on cpp, triton and torch)."""
    v_th, v_reset, v_init = CASES[case]
    x = torch.randn(10, 2, 3, 4) * 0.6 + 0.3
    weight = torch.randn_like(x)
    xm, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    multi = rnl_fast.IFSequence(v_threshold=v_th, v_reset=v_reset, v_init=v_init)
    single = rnl_fast.IFSequence(v_threshold=v_th, v_reset=v_reset, v_init=v_init, step_mode="s")
    out_m, out_s = multi(xm), _per_step(single, xs)
    assert torch.equal(out_s, out_m)
    ((out_m * weight).sum() + multi.v.sum()).backward()
    ((out_s * weight).sum() + single.v.sum()).backward()
    assert torch.equal(xs.grad, xm.grad)


def test_step_mode_validated_on_set():
    with pytest.raises(ValueError, match=r"^step_mode must be one of \('m', 's'\), got 'multi'$"):
        rnl_fast.IFSequence(step_mode="multi")
    layer = rnl_fast.IFSequence()
    assert layer.step_mode == "m"
    layer.step_mode = "s"
    assert layer.step_mode == "s" and "step_mode=s" in repr(layer)
    for bad in ("S", None, 1):
        with pytest.raises(ValueError, match="step_mode"):
            layer.step_mode = bad
    assert layer.step_mode == "s"


def test_switching_mode_keeps_the_membrane(backend):
    """Steps fed as one "s" step, then a "m" chunk, then "s" again continue one simulation."""
    x = torch.rand(9, 4, 6)
    whole = rnl_fast.IFSequence(v_threshold=0.7)(x)
    layer = rnl_fast.IFSequence(v_threshold=0.7, step_mode="s")
    first = layer(x[0])
    layer.step_mode = "m"
    middle = layer(x[1:5])
    layer.step_mode = "s"
    rest = _per_step(layer, x[5:])
    assert torch.equal(torch.cat([first[None], middle, rest]), whole)
    assert layer.step_spike_counts.shape == (9,)


def test_single_step_shape_change_needs_reset():
    layer = rnl_fast.IFSequence(step_mode="s")
    layer(torch.rand(2, 4))
    with pytest.raises(ValueError, match="reset"):
        layer(torch.rand(3, 2, 4))  # a [T, B, ...] input in "s" mode, caught by the carried membrane


def test_copies_keep_step_mode():
    layer = rnl_fast.IFSequence(step_mode="s")
    layer(torch.rand(2, 3))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.step_mode == "s" and clone.v is None


def test_converted_network_ignores_step_mode(backend):
    """A SpikingNetwork steps time itself (snn(x, T)): its neurons stay multi-step when a user sets
    step_mode on every module (as SpikingJelly's set_step_mode does)."""
    ann = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        rnl_fast.RateNorm(),
        nn.AvgPool2d(2),
        nn.Flatten(),  # fused pooling
        nn.Linear(36, 5),
        rnl_fast.RateNorm(),
        nn.Linear(5, 3),  # plain neurons
    )
    with torch.no_grad():  # both kinds of neurons spike in 5 steps, whatever the random weights
        ann[0].bias.fill_(0.6)
        ann[4].bias.fill_(0.6)
    snn = rnl_fast.convert(ann, "rnl")
    x = torch.rand(2, 1, 8, 8)
    before = snn(x, 5)
    neurons = [m for m in snn.modules() if isinstance(m, rnl_fast.IFSequence)]
    assert len(neurons) == 2 and all(m.step_spike_counts.sum() > 0 for m in neurons)
    for m in neurons:
        m.step_mode = "s"
    assert torch.equal(snn(x, 5), before)


@pytest.mark.skipif(not HAS_SPIKINGJELLY, reason="spikingjelly not installed")
def test_spikingjelly_set_step_mode_and_reset_net():
    from spikingjelly.activation_based import functional

    net = nn.Sequential(
        nn.Linear(6, 8), rnl_fast.IFSequence(v_threshold=0.5), nn.Linear(8, 4), rnl_fast.IFSequence(v_threshold=0.5)
    )
    neurons = [net[1], net[3]]
    x = torch.randn(7, 3, 6)
    whole = net(x)
    functional.reset_net(net)
    assert all(m.v is None and m.step_spike_counts is None for m in neurons)
    functional.set_step_mode(net, "s")
    assert all(m.step_mode == "s" for m in neurons)
    steps = torch.stack([net(x[t]) for t in range(7)])
    assert torch.equal(steps, whole)
    assert all(m.step_spike_counts.shape == (7,) for m in neurons)
    functional.reset_net(net)
    assert all(m.v is None for m in neurons)
    functional.set_step_mode(net, "m")
    assert all(m.step_mode == "m" for m in neurons)
    assert torch.equal(net(x), whole)
    with pytest.raises(ValueError, match="step_mode"):
        functional.set_step_mode(net, "x")


@pytest.mark.skipif(not HAS_SPIKINGJELLY, reason="spikingjelly not installed")
@pytest.mark.parametrize("v_reset", [None, 0.0], ids=["soft", "hard"])
def test_single_step_equals_spikingjelly_ifnode(v_reset):
    """A per-step loop of ours against SpikingJelly's single-step IFNode: the same spikes (forward
    only; the default surrogates differ)."""
    from spikingjelly.activation_based import functional, neuron

    x = torch.randn(30, 4, 17) * 0.7 + 0.3
    sj = neuron.IFNode(v_threshold=0.9, v_reset=v_reset, step_mode="s")
    ours = rnl_fast.IFSequence(v_threshold=0.9, v_reset=v_reset, step_mode="s")
    with torch.no_grad():
        for t in range(x.shape[0]):
            assert torch.equal(ours(x[t]), sj(x[t])), f"step {t}"
    torch.testing.assert_close(ours.v, sj.v, rtol=0, atol=1e-6)
    functional.reset_net(sj)
