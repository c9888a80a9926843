"""rnl_fast.from_spikingjelly: a SpikingJelly model with its IF neurons swapped for IFSequence
gives SpikingJelly's spikes and outputs exactly and its gradients to 1e-6 relative, per step and
multi-step, hand-built or made by SpikingJelly's ann2snn; anything it cannot swap exactly is
refused with a one-line error naming the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnl_fast

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import ann2snn, functional, layer, neuron, surrogate  # noqa: E402

T = 10

# SpikingJelly surrogate → what the swapped layer must carry.
SURROGATES = {
    "sigmoid-default": (lambda: surrogate.Sigmoid(), ("sigmoid", 0.25)),
    "atan-3": (lambda: surrogate.ATan(alpha=3.0), ("atan", 2.0 / 3.0)),
    "rect-0.8": (lambda: surrogate.Rect(alpha=0.8), ("rectangle", 1.25)),
}


def _sj_net(v_reset, detach_reset, make_surrogate, step_mode, half_threshold=False) -> nn.Module:
    """conv → IF → flatten → linear → IF, in SpikingJelly's own layers (float64)."""

    def if_node(threshold):
        options = dict(surrogate_function=make_surrogate(), detach_reset=detach_reset, step_mode=step_mode)
        if half_threshold:
            return neuron.HalfThresholdIFNode(v_threshold=threshold, **options)
        return neuron.IFNode(v_threshold=threshold, v_reset=v_reset, **options)

    net = nn.Sequential(
        layer.Conv2d(2, 3, 3, padding=1, step_mode=step_mode),
        if_node(0.7),
        layer.Flatten(step_mode=step_mode),
        layer.Linear(3 * 5 * 5, 4, step_mode=step_mode),
        if_node(0.4),
    )
    with torch.no_grad():  # weights that keep both layers firing, neither silent nor saturated
        net[0].weight.uniform_(-0.2, 0.5)
        net[3].weight.uniform_(-0.05, 0.12)
    return net.double()


def _run(net: nn.Module, x: torch.Tensor, step_mode: str) -> torch.Tensor:
    """Spikes of the last layer ``[T, B, 4]``, the way SpikingJelly's users step either mode."""
    functional.reset_net(net)
    if step_mode == "m":
        return net(x)
    return torch.stack([net(x[t]) for t in range(x.shape[0])])


def _grads(net: nn.Module, x: torch.Tensor, step_mode: str, weight: torch.Tensor):
    x = x.clone().requires_grad_()
    out = _run(net, x, step_mode)
    (out * weight).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("step_mode", ["m", "s"])
@pytest.mark.parametrize("kind", ["soft", "hard", "hard-negative", "half-threshold"])
@pytest.mark.parametrize("detach_reset", [False, True], ids=["reset-grad", "detach-reset"])
@pytest.mark.parametrize("surrogate_name", list(SURROGATES))
def test_swapped_net_gives_spikingjelly_outputs_and_gradients(backend, step_mode, kind, detach_reset, surrogate_name):
    make_surrogate, (ours_surrogate, ours_width) = SURROGATES[surrogate_name]
    v_reset = {"soft": None, "hard": 0.0, "hard-negative": -0.2, "half-threshold": None}[kind]
    sj = _sj_net(v_reset, detach_reset, make_surrogate, step_mode, half_threshold=kind == "half-threshold")
    ours = rnl_fast.from_spikingjelly(sj)

    swapped = [m for m in ours.modules() if isinstance(m, rnl_fast.IFSequence)]
    assert len(swapped) == 2 and not any(isinstance(m, neuron.BaseNode) for m in ours.modules())
    assert all(isinstance(m, neuron.BaseNode) for m in (sj[1], sj[4]))  # the original is untouched
    assert [(m.surrogate, m.width, m.step_mode, m.detach_reset) for m in swapped] == [
        (ours_surrogate, ours_width, step_mode, detach_reset)
    ] * 2
    expected_init = {"soft": 0.0, "hard": 0.0, "hard-negative": -0.2, "half-threshold": 0.35}[kind]
    assert swapped[0].v_init == expected_init and swapped[0].v_reset == v_reset

    x = torch.rand(T, 3, 2, 5, 5, dtype=torch.float64) * 0.9
    weight = torch.randn(T, 3, 4, dtype=torch.float64)
    out_sj, gx_sj, gp_sj = _grads(sj, x, step_mode, weight)
    out_ours, gx_ours, gp_ours = _grads(ours, x, step_mode, weight)
    assert out_sj.abs().sum() > 0  # the last layer fires: its gradients are not all zero by silence
    assert torch.equal(out_ours, out_sj)
    torch.testing.assert_close(gx_ours, gx_sj, rtol=1e-6, atol=1e-12)
    for g_ours, g_sj in zip(gp_ours, gp_sj, strict=True):
        torch.testing.assert_close(g_ours, g_sj, rtol=1e-6, atol=1e-12)


def test_reset_net_set_step_mode_and_detach_net_work_on_the_swapped_net():
    sj = _sj_net(None, False, surrogate.Sigmoid, "m")
    ours = rnl_fast.from_spikingjelly(sj)
    x = torch.rand(T, 3, 2, 5, 5, dtype=torch.float64)
    whole = _run(ours, x, "m")
    assert ours[4].v is not None
    functional.reset_net(ours)
    assert all(m.v is None and m.step_spike_counts is None for m in (ours[1], ours[4]))

    functional.set_step_mode(ours, "s")
    assert ours[1].step_mode == "s" and ours[4].step_mode == "s"
    assert torch.equal(_run(ours, x, "s"), whole)
    assert ours[4].step_spike_counts.shape == (T,)

    # detach_net cuts the carried membrane from the graph of earlier steps (truncated BPTT).
    functional.reset_net(ours)
    xg = x.clone().requires_grad_()
    ours(xg[0])
    assert ours[1].v.grad_fn is not None
    functional.detach_net(ours)
    assert ours[1].v.grad_fn is None and ours[4].v.grad_fn is None
    ours(xg[1]).sum().backward()
    assert xg.grad[0].abs().sum() == 0 and xg.grad[1].abs().sum() > 0


def _ann() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 10),
    ).eval()


@pytest.mark.parametrize(
    "recipe",
    [dict(mode="max"), dict(mode="99.9%", channel_wise=True, half_threshold=True)],
    ids=["max", "99.9%-channel-wise-half-threshold"],
)
def test_ann2snn_model_runs_with_spikingjelly_outputs(backend, recipe):
    """FXConverter(RateCodingRecipe(...)).convert(ann), stepped as SpikingJelly's users step it
    (reset_net, then out += snn(x) once per step), then the same net in multi-step mode."""
    ann = _ann()
    images = torch.rand(8, 1, 12, 12)  # small: the Triton backend runs in its interpreter here
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        ann[1].running_mean.uniform_(-0.2, 0.2)
        ann[1].running_var.uniform_(0.5, 2.0)
    sj = ann2snn.FXConverter(ann2snn.RateCodingRecipe([(images, None)], **recipe), device="cpu").convert(ann)
    ours = rnl_fast.from_spikingjelly(sj)
    assert sum(isinstance(m, rnl_fast.IFSequence) for m in ours.modules()) == 2

    functional.reset_net(sj)
    functional.reset_net(ours)
    out_sj = out_ours = 0
    with torch.no_grad():
        for step in range(16):
            out_sj = out_sj + sj(images)
            out_ours = out_ours + ours(images)
            assert torch.equal(out_ours, out_sj), f"step {step}"
    assert out_sj.std(0).min() > 0  # every class output moved: spikes reached the last layer

    for net in (sj, ours):
        functional.reset_net(net)
        functional.set_step_mode(net, "m")
    sequence = images.expand(16, *images.shape)
    with torch.no_grad():
        multi_ours, multi_sj = ours(sequence), sj(sequence)
    assert torch.equal(multi_ours, multi_sj)
    torch.testing.assert_close(multi_ours.sum(0), out_ours)  # one multi-step call = the per-step loop


def test_a_single_neuron_is_swapped_for_one_layer():
    ours = rnl_fast.from_spikingjelly(neuron.IFNode(v_threshold=0.5, step_mode="m"))
    assert isinstance(ours, rnl_fast.IFSequence) and ours.v_reset == 0.0 and ours.v_threshold == 0.5


def test_a_shared_neuron_stays_shared():
    node = neuron.IFNode(v_reset=None, step_mode="m")
    ours = rnl_fast.from_spikingjelly(nn.Sequential(nn.Linear(4, 4), node, nn.Linear(4, 4), node))
    assert isinstance(ours[1], rnl_fast.IFSequence) and ours[1] is ours[3]


@pytest.mark.parametrize(
    "model, message",
    [
        ("net", "must be an nn.Module, got str"),
        (nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "holds no SpikingJelly neuron"),
        (nn.Sequential(nn.Linear(2, 2), neuron.LIFNode()), "module '1' is a SpikingJelly LIFNode"),
        (nn.Sequential(nn.Sequential(neuron.IFNode(), neuron.ParametricLIFNode())), "'0.1' is a SpikingJelly Parame"),
        (nn.Sequential(neuron.IFNode(surrogate_function=surrogate.PiecewiseQuadratic())), "surrogate PiecewiseQuad"),
        (nn.Sequential(neuron.IFNode(surrogate_function=surrogate.Sigmoid(spiking=False))), "spiking=False"),
        (nn.Sequential(neuron.IFNode(store_v_seq=True)), "'0' has store_v_seq=True"),
    ],
    ids=["not-a-module", "no-neuron", "lif", "nested-plif", "surrogate", "non-spiking", "store-v-seq"],
)
def test_what_cannot_be_swapped_exactly_is_refused(model, message):
    with pytest.raises((TypeError, ValueError)) as error:
        rnl_fast.from_spikingjelly(model)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_subclass_of_ifnode_is_refused():
    class Leaky(neuron.IFNode):  # may change the dynamics: not swapped silently
        pass

    with pytest.raises(ValueError, match="module '0' is a SpikingJelly Leaky"):
        rnl_fast.from_spikingjelly(nn.Sequential(Leaky()))


def test_single_step_input_of_the_wrong_shape_is_refused():
    ours = rnl_fast.from_spikingjelly(neuron.IFNode(v_reset=None))  # SpikingJelly's default: step_mode "s"
    ours(torch.rand(4, 3))
    with pytest.raises(ValueError, match=r"neuron shape \(5, 3\) but the carried membrane has \(4, 3\)"):
        ours(torch.rand(5, 3))
