"""Latency options of the conversion (issue 10): the initial membrane ``v_init`` for every method,
channel-wise thresholds for MaxNorm/RobustNorm (and the per-channel Rate Norm hook), checked
against the reference IF op layer by layer, against statistics computed here, and against the
ANN in the limit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rnl_fast
from rnl_fast import models, reference
from rnl_fast.conversion import MethodVariant, convert, initial_fraction
from rnl_fast.simulation import simulate

JUST_BELOW_ONE = math.nextafter(1.0, 0.0)


def _warm_up(model: nn.Module, shape=(16, 1, 28, 28), batches: int = 4) -> nn.Module:
    """Give BN statistics and RateNorm running maxima realistic values, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(shape))
    return model.eval()


def _tiny_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


# ─── arguments ───────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "v_init",
    [1.0, 1, -0.1, -1e-12, 1.5, float("nan"), float("inf"), True, False, "quarter", "0.5", [0.5]],
    ids=repr,
)
def test_bad_v_init_is_a_one_line_error_naming_it(v_init):
    # Catches: a start at θ (every neuron fires at step 1 whatever its input), a bool taken as
    # 0/1, NaN slipping through comparisons, a string other than "half" parsed as a number.
    with pytest.raises(ValueError, match="v_init") as info:
        convert(_tiny_relu(), "maxnorm", calibration=[(torch.randn(8, 3), None)], v_init=v_init)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "v_init, fraction",
    [(0, 0.0), (0.0, 0.0), ("half", 0.5), ("Half", 0.5), (0.25, 0.25), (JUST_BELOW_ONE, JUST_BELOW_ONE)],
    ids=repr,
)
def test_v_init_values_reach_every_layer(v_init, fraction):
    assert initial_fraction(v_init) == fraction
    model = _warm_up(models.cnn7("rnl"))
    snn = convert(model, "rnl", v_init=v_init)
    assert snn.v_init == fraction
    assert [layer.v_init for layer in snn.neuron_layers.values()] == [fraction] * 3


@pytest.mark.parametrize("channel_wise", ["yes", 1, None])
def test_bad_channel_wise_names_it(channel_wise):
    with pytest.raises(ValueError, match="channel_wise must be True or False"):
        convert(_tiny_relu(), "maxnorm", calibration=[(torch.randn(8, 3), None)], channel_wise=channel_wise)


def test_channel_wise_on_a_layer_without_channels_names_it():
    # The ReLU sees [B]: there is no dim 1 to give thresholds to.
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"channel_wise=True needs a channel dimension \(dim 1\) at ReLU '2'"):
        convert(model, "maxnorm", calibration=[(torch.randn(8, 3), None)], channel_wise=True)
    assert convert(model, "maxnorm", calibration=[(torch.randn(8, 3), None)]) is not None  # layer-wise is fine


def test_channel_wise_rate_norm_needs_a_channel_wise_network():
    model = _warm_up(models.cnn7("rnl"))
    with pytest.raises(ValueError, match=r"channel_wise=True with method 'rnl' needs .*RateNorm\(channel_wise=True\)"):
        convert(model, "rnl", channel_wise=True)


def test_method_variant_labels():
    assert MethodVariant("maxnorm").label == "maxnorm" and MethodVariant("maxnorm").uses_defaults
    assert MethodVariant("robustnorm", "half", True).label == "robustnorm+cw+half"
    assert MethodVariant("rnl_ril", 0.25).label == "rnl_ril+v0.25"
    assert MethodVariant("maxnorm", 0, True).label == "maxnorm+cw"
    with pytest.raises(ValueError, match="v_init"):
        MethodVariant("maxnorm", 1.0)


# ─── v_init: layer by layer against the reference ────────────────────────────────────────────


class _PerChannelRateNorm(rnl_fast.RateNorm):
    """Stands in for ``RateNorm(channel_wise=True)``: a threshold tensor with one value per
    channel (here shaped [C, 1, 1]; the recipe takes any shape that flattens to [C])."""

    def __init__(self, thresholds: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("per_channel", thresholds)

    @property
    def threshold(self) -> torch.Tensor:
        return self.per_channel


def _per_channel_rnl() -> nn.Module:
    conv = nn.Conv2d(1, 3, 3, padding=1)
    nn.init.uniform_(conv.weight, -0.5, 0.5)
    thresholds = torch.tensor([0.3, 0.7, 1.3]).view(3, 1, 1)
    return nn.Sequential(
        conv, _PerChannelRateNorm(thresholds), nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), _PerChannelRateNorm(torch.tensor([0.2, 0.5, 0.9, 0.4]).view(4, 1, 1)),
        nn.Flatten(), nn.Linear(4 * 14 * 14, 5),
    ).eval()  # fmt: skip


def _converted(kind: str, v_init: float):
    if kind == "rnl-per-channel":
        return convert(_per_channel_rnl(), "rnl", v_init=v_init, channel_wise=True)
    method, _, cw = kind.partition("+")
    model = _warm_up(models.cnn7("relu" if method in ("maxnorm", "robustnorm") else "rnl"))
    return convert(
        model, method, calibration=[(torch.rand(16, 1, 28, 28), None)], v_init=v_init, channel_wise=cw == "cw"
    )


def _record(snn):
    """Each neuron layer's input currents and spikes per chunk (observers make the spikes visible)."""
    currents = {name: [] for name in snn.neuron_names}
    spikes = {name: [] for name in snn.neuron_names}
    for name, layer in snn.neuron_layers.items():
        layer.register_forward_pre_hook(lambda _m, args, name=name: currents[name].append(args[0].clone()))
        layer.observer = lambda s, name=name: spikes[name].append(s.clone())
    return currents, spikes


@pytest.mark.parametrize("v_init", [0.0, 0.5, 0.999, JUST_BELOW_ONE], ids=["0", "half", "0.999", "just-below-1"])
@pytest.mark.parametrize("kind", ["maxnorm", "maxnorm+cw", "robustnorm+cw", "rnl", "rnl-per-channel"])
def test_each_layer_is_the_reference_if_started_at_v_init_theta(kind, v_init):
    """Catches: v_init taken as an absolute membrane (not ×θ), a [C] threshold or membrane
    broadcast against the wrong dim, v_init applied again at every chunk, a membrane carried
    from the previous input, v_init given to some layers only."""
    snn = _converted(kind, v_init)
    currents, spikes = _record(snn)
    for call, (B, T, chunk) in enumerate([(3, 20, 7), (2, 9, 9)]):  # two inputs: each starts afresh
        for records in (currents, spikes):
            for r in records.values():
                r.clear()
        snn(torch.rand(B, 1, 28, 28), T, chunk=chunk)
        for name, layer in snn.neuron_layers.items():
            x = torch.cat(currents[name])  # [T, B, ...]: the chunks' currents, one sequence
            theta = layer.threshold
            if isinstance(theta, torch.Tensor):
                theta = theta.view(-1, *[1] * (x.dim() - 3))
                start = theta * v_init
            else:
                start = v_init * theta
            expected, *_ = reference.if_sequence(x, theta, start)
            assert torch.equal(torch.cat(spikes[name]), expected), f"call {call}, layer {name}"


@pytest.mark.parametrize("kind", ["maxnorm+cw", "robustnorm", "rnl-per-channel"])
def test_fused_pool_and_chunks_keep_v_init(kind):
    """The fused IF + 2×2 pool kernel starts from v_init·θ too (bit for bit the unfused path),
    and a chunked run carries the membrane (only the first chunk starts at v_init·θ)."""
    snn = _converted(kind, 0.5)
    assert any(layer.fused_pool is not None for layer in snn.neuron_layers.values())
    x = torch.rand(3, 1, 28, 28)
    fused = snn(x, 16, chunk=16)
    torch.testing.assert_close(snn(x, 16, chunk=1), fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(snn(x, 16, chunk=5), fused, rtol=1e-5, atol=1e-6)
    for layer in snn.neuron_layers.values():
        layer.observer = lambda spikes: None  # the simulator then makes the spikes and pools them itself
    assert torch.equal(snn(x, 16, chunk=16), fused)


@pytest.mark.parametrize("method", ["maxnorm", "robustnorm", "rnl"])
def test_v_init_zero_is_the_default_conversion(method):
    model = _warm_up(models.cnn7("relu" if method != "rnl" else "rnl"))
    calibration = [(torch.rand(16, 1, 28, 28), None)]
    x = torch.rand(2, 1, 28, 28)
    torch.manual_seed(0)
    default = convert(model, method, calibration=calibration)(x, 12)
    torch.manual_seed(0)
    explicit = convert(model, method, calibration=calibration, v_init=0.0, channel_wise=False)(x, 12)
    assert torch.equal(default, explicit)  # a default other than 0 per layer would show (the layer tests say how)


def test_one_channel_rate_norm_threshold_is_per_channel():
    """A [1] threshold (a channel-wise layer over one channel) is per channel, not an error."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3), _PerChannelRateNorm(torch.tensor([0.4])), nn.Flatten(), nn.Linear(36, 2))
    snn = convert(model.eval(), "rnl", channel_wise=True)
    (layer,) = snn.neuron_layers.values()
    assert float(layer.threshold) == pytest.approx(0.4)
    assert snn(torch.rand(2, 1, 8, 8), 4).shape == (4, 2, 2)


def test_per_channel_rate_norm_thresholds_pass_through():
    model = _per_channel_rnl()
    for channel_wise in (False, True):
        snn = convert(model, "rnl", channel_wise=channel_wise)
        thresholds = [layer.threshold for layer in snn.neuron_layers.values()]
        assert torch.equal(thresholds[0], torch.tensor([0.3, 0.7, 1.3]))
        assert torch.equal(thresholds[1], torch.tensor([0.2, 0.5, 0.9, 0.4]))
        assert all(layer.spike_weight == 1.0 for layer in snn.neuron_layers.values())


# ─── channel-wise thresholds ────────────────────────────────────────────────────────────────


def _relu_outputs(model: nn.Module, names: list[str], batches: list) -> dict[str, torch.Tensor]:
    """The ReLU outputs of ``model`` over all calibration batches, concatenated over the batch."""
    outputs = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: outputs[name].append(out))
        for name in names
    ]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()
    return {name: torch.cat(parts) for name, parts in outputs.items()}


def _expected_scale(a: torch.Tensor, method: str) -> torch.Tensor:
    """λ per channel of ``a: [B, C, H, W]``, computed here without the library: max, or the
    99.9th percentile of the positive values; a never-positive channel takes the layer's value."""
    if method == "maxnorm":
        layer = a.max()
        per_channel = a.amax(dim=(0, 2, 3))
        return torch.where(per_channel > 0, per_channel, layer)
    layer = torch.quantile(a[a > 0], 0.999)
    values = []
    for c in range(a.shape[1]):
        channel = a[:, c]
        positive = channel[channel > 0]
        values.append(torch.quantile(positive, 0.999) if positive.numel() else layer)
    return torch.stack(values)


@pytest.mark.parametrize("method", ["maxnorm", "robustnorm"])
def test_channel_wise_thresholds_and_folded_weights_by_hand(method):
    """Catches: the statistic over the wrong dim, zeros counted in the percentile, λ = 0 or 1 for a
    silent channel (the documented choice is the layer's λ), λ folded per output instead of per
    input channel, the flatten expanding λ as repeat (c0, c1, …, c0, …) instead of each channel's
    H·W features together, λ folded into the wrong layer."""
    model = _warm_up(models.cnn7("relu"))
    with torch.no_grad():
        model[1].bias[5] = -1e4  # channel 5 of the first block never fires
    calibration = [(torch.rand(16, 1, 28, 28), None) for _ in range(2)]
    snn = convert(model, method, calibration=calibration, channel_wise=True)
    activations = _relu_outputs(model, ["2", "6", "10"], calibration)
    assert not (activations["2"][:, 5] > 0).any()
    scales = {name: _expected_scale(a, method) for name, a in activations.items()}
    for name, layer in snn.neuron_layers.items():
        assert torch.equal(layer.threshold, scales[name]), name
        assert layer.spike_weight == 1.0  # folded everywhere in cnn7
    assert scales["2"][5] == activations["2"].max() if method == "maxnorm" else scales["2"][5] > 0

    def bn_folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
        return conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)

    with torch.no_grad():
        expected = {
            "0": bn_folded(model[0], model[1]),  # the image feeds it: no λ
            "4": bn_folded(model[4], model[5]) * scales["2"].view(1, -1, 1, 1),
            "8": bn_folded(model[8], model[9]) * scales["6"].view(1, -1, 1, 1),
            "13": model[13].weight * scales["10"].repeat_interleave(3 * 3).view(1, -1),  # [32·3·3] after Flatten
        }
    for name, weight in expected.items():
        torch.testing.assert_close(snn.graph_module.get_submodule(name).weight, weight, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method, v_init", [("maxnorm", 0.0), ("robustnorm", "half")])
def test_channel_wise_rates_converge_to_the_ann(method, v_init):
    """Theorem 1 per channel: the output tends to the ANN's, and every layer's rates to the
    balanced ANN rates clip(a/λ_c, 0, 1) (K → 0: a [C] threshold broadcast wrongly would not)."""
    model = _warm_up(models.cnn7("relu"))
    calibration = [(torch.rand(16, 1, 28, 28), torch.zeros(16))]
    snn = convert(model, method, calibration=calibration, channel_wise=True, v_init=v_init)
    x = calibration[0][0][:4]
    torch.testing.assert_close(snn(x, 600)[-1], model(x), rtol=0.1, atol=0.1)  # RobustNorm clips the top 0.1 %
    result = simulate(snn, [(x, torch.zeros(4, dtype=torch.long))], T=300, ann=model, progress=False)
    assert all(curve[-1] < 0.05 for curve in result.k_curves.values()), result.k_curves


class _Small(nn.Module):
    """conv → ReLU → pool → conv → ReLU → view(B, −1) → linear → ReLU → linear. With
    ``through``, each ReLU's spikes pass an addition of 0 on their way on (exact, and the end of
    folding: the spike weights are then carried on the spikes)."""

    def __init__(self, through: bool) -> None:
        super().__init__()
        self.through = through
        self.conv1, self.act1, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)
        self.conv2, self.act2 = nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()
        self.fc1, self.act3, self.fc2 = nn.Linear(6 * 7 * 7, 10), nn.ReLU(), nn.Linear(10, 3)

    def _on(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0 if self.through else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._on(self.pool(self.act1(self.conv1(x))))
        x = self._on(self.act2(self.conv2(x)))
        x = x.view(x.size(0), -1)
        return self.fc2(self._on(self.act3(self.fc1(x))))


@pytest.mark.parametrize("method", ["maxnorm", "robustnorm"])
def test_carried_per_channel_spike_weights_equal_the_folded_ones(method):
    """Where λ_c cannot be folded (an addition on the way) the simulator multiplies the spikes by
    [C, 1, 1] or [F], also after the fused pool; the result is the folded network's.
    Catches: λ_c on the wrong axis, a tensor spike weight dropped on the fused path."""
    folded_model = _Small(through=False).eval()
    carried_model = _Small(through=True).eval()
    carried_model.load_state_dict(folded_model.state_dict())
    calibration = [(torch.rand(16, 1, 14, 14), None)]
    kwargs = dict(calibration=calibration, channel_wise=True, v_init="half")
    folded, carried = convert(folded_model, method, **kwargs), convert(carried_model, method, **kwargs)
    for a, b in zip(folded.neuron_layers.values(), carried.neuron_layers.values()):
        assert torch.equal(a.threshold, b.threshold) and a.threshold.numel() in (4, 6, 10)
        assert a.spike_weight == 1.0 and torch.equal(b.spike_weight, b.threshold)
    assert carried.neuron_layers["act1"].fused_pool is not None
    x = torch.rand(5, 1, 14, 14)
    torch.testing.assert_close(carried(x, 40), folded(x, 40), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x, 800)[-1], folded_model(x), rtol=0.1, atol=0.1)


def test_grouped_conv_keeps_the_spike_weight_on_the_spikes():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU()).eval()
    x = torch.rand(8, 1, 8, 8)
    snn = convert(model, "maxnorm", calibration=[(x, None)], channel_wise=True)
    first, last = snn.neuron_layers.values()
    assert torch.equal(first.spike_weight, first.threshold)  # not folded into the grouped conv
    assert torch.equal(last.spike_weight, last.threshold)  # reaches the output
    torch.testing.assert_close(snn(x, 1500)[-1], model(x), rtol=0.03, atol=0.03)


def test_residual_network_converts_channel_wise_with_half_start():
    model = _warm_up(models.preact_resnet18("relu", in_channels=1, input_size=28), shape=(8, 1, 28, 28), batches=2)
    snn = convert(model, "robustnorm", calibration=[(torch.rand(8, 1, 28, 28), None)], channel_wise=True, v_init=0.5)
    layers = list(snn.neuron_layers.values())
    assert all(layer.channel_wise for layer in layers)
    # Pre-activation: every ReLU feeds convs (or pool → flatten → the readout) directly, so every
    # λ_c is folded, through the global pooling and the flatten of [B, 512, 1, 1] too.
    assert all(layer.spike_weight == 1.0 for layer in layers)
    out = snn(torch.rand(2, 1, 28, 28), 8)
    assert out.shape == (8, 2, 10) and torch.isfinite(out).all()
