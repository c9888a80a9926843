"""Conversion (BN folding, thresholds, unconvertible parts) and simulation bookkeeping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnl_fast
from rnl_fast import conversion as conv
from rnl_fast import energy, models
from rnl_fast.conversion import ConversionError, convert, fold_batchnorm
from rnl_fast.simulation import simulate


def _warm_up(model: nn.Module, shape=(16, 1, 28, 28), batches: int = 8) -> nn.Module:
    """Give BN statistics and RateNorm running maxima realistic values, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(shape))
    return model.eval()


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 5, 3, padding=1), nn.Linear(7, 4)], ids=["conv", "linear"])
def test_fold_batchnorm_equals_unfolded(layer):
    bn = nn.BatchNorm2d(5) if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.eval()
    x = torch.randn(6, 3, 8, 8) if isinstance(layer, nn.Conv2d) else torch.randn(6, 7)
    torch.testing.assert_close(fold_batchnorm(layer, bn)(x), bn(layer(x)), rtol=1e-5, atol=1e-5)


def test_converted_network_folds_bn_and_keeps_weights_scaled_by_nothing():
    model = _warm_up(models.cnn7("rnl"))
    snn = convert(model, "rnl")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in snn.modules())
    thresholds = [layer.neurons.v_threshold for layer in snn.neuron_layers.values()]
    expected = [float(m.threshold) for m in model.modules() if isinstance(m, rnl_fast.RateNorm)]
    assert thresholds == pytest.approx(expected)
    assert all(layer.spike_weight == 1.0 for layer in snn.neuron_layers.values())


def test_snn_rates_converge_to_rnl_rates_layer_by_layer():
    model = _warm_up(models.cnn7("rnl"))
    snn = convert(model, "rnl")
    x = torch.rand(4, 1, 28, 28)
    result = simulate(snn, [(x, torch.zeros(4, dtype=torch.long))], T=200, ann=model, progress=False)
    for name, curve in result.k_curves.items():
        assert curve[-1] < 0.1 * max(curve[9], 1e-3), f"K did not shrink in layer {name}"
        assert curve[-1] < 0.1, f"layer {name}: K(200) = {curve[-1]}"
    # Theorem 2 holds exactly for the first layer, whose input current is constant: K(t) < 2Ω/t.
    first = next(m for m in model.modules() if isinstance(m, rnl_fast.RateNorm))
    with torch.no_grad():
        model(x)
    omega_1 = float(first.omega)
    k_1 = result.k_curves[snn.neuron_names[0]]
    assert all(k < 2 * omega_1 / t for t, k in enumerate(k_1, start=1))
    # Theorem 1: the output estimate tends to the ANN output.
    out = snn(x, 400)
    torch.testing.assert_close(out[-1], model(x), rtol=0.05, atol=0.05)


def test_chunked_simulation_equals_one_pass():
    model = _warm_up(models.cnn7("rnl"))
    snn = convert(model, "rnl")
    x = torch.rand(3, 1, 28, 28)
    whole = snn(x, 50, chunk=50)
    # To the bit: the membranes carry over, and the running sum of the output is carried in
    # float64 as one float64 cumsum would (a float32 total rounded at each chunk was off by 1 ulp).
    for chunk in (1, 7, 49):
        assert torch.equal(snn(x, 50, chunk=chunk), whole), chunk


def _unfused(snn) -> None:
    """With an observer on every layer the simulator makes the spikes and pools them by the reference."""
    for layer in snn.neuron_layers.values():
        layer.observer = lambda spikes: None


def test_pools_after_neurons_are_fused_and_exact():
    model = _warm_up(models.cnn7("rnl"))
    snn = convert(model, "rnl")
    assert all(layer.fused_pool is not None for layer in snn.neuron_layers.values())
    assert not any(isinstance(m, nn.AvgPool2d) for m in snn.graph_module.children())
    x = torch.rand(3, 1, 28, 28)
    fused = snn(x, 12, chunk=12)
    _unfused(snn)
    assert torch.equal(fused, snn(x, 12, chunk=12))


def test_ceil_mode_pool_on_odd_planes_is_fused():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True),  # 7 → 4
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),  # 4 → 2, not the only consumer below
        nn.Flatten(), nn.Linear(16, 3),
    ).eval()  # fmt: skip
    x = torch.rand(5, 1, 7, 7)
    snn = convert(model, "maxnorm", [(x, None)])
    pools = [layer.fused_pool for layer in snn.neuron_layers.values()]
    assert all(p is not None for p in pools) and pools[0].ceil_mode
    fused = snn(x, 9, chunk=9)
    _unfused(snn)
    assert torch.equal(fused, snn(x, 9, chunk=9))
    assert fused.shape == (9, 5, 3)


def test_neuron_layer_with_two_consumers_keeps_its_pool_separate():
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)
            self.skip = nn.Conv2d(2, 2, 2, stride=2)
            self.fc = nn.Linear(2 * 3 * 3, 3)

        def forward(self, x):
            a = self.act(self.conv(x))
            return self.fc((self.pool(a) + self.skip(a)).flatten(1))

    snn = convert(TwoUsers().eval(), "maxnorm", [(torch.rand(4, 1, 6, 6), None)])
    assert all(layer.fused_pool is None for layer in snn.neuron_layers.values())
    assert snn(torch.rand(2, 1, 6, 6), 5).shape == (5, 2, 3)


def test_residual_network_converts_and_approaches_ann():
    model = _warm_up(models.preact_resnet18("rnl", in_channels=1, input_size=28), shape=(8, 1, 28, 28), batches=4)
    snn = convert(model, "rnl")
    x = torch.rand(2, 1, 28, 28)
    out = snn(x, 64)
    assert out.shape == (64, 2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["maxnorm", "robustnorm"])
def test_threshold_balancing_baselines(method):
    model = _warm_up(models.cnn7("relu"))
    calibration = [(torch.rand(16, 1, 28, 28), torch.zeros(16))]
    snn = convert(model, method, calibration=calibration)
    scales = conv.activation_scales(model, calibration, method)
    for name, layer in snn.neuron_layers.items():
        assert layer.neurons.v_threshold == pytest.approx(scales[name])
        # λ rides on the spikes (Theorem 1's W·λ), folded into the next conv/linear where only
        # pooling and reshapes lie between: everywhere in cnn7.
        assert layer.spike_weight == 1.0
    x = calibration[0][0][:4]
    torch.testing.assert_close(snn(x, 600)[-1], model(x), rtol=0.1, atol=0.1)  # MaxNorm converges, slowly
    # The K curves compare with the balanced rates clip(a/λ, 0, 1) (whether or not λ was folded).
    result = simulate(snn, [(x, torch.zeros(4, dtype=torch.long))], T=300, ann=model, progress=False)
    assert all(curve[-1] < 0.05 for curve in result.k_curves.values()), result.k_curves


def test_spike_weight_folds_into_the_next_weights_only_through_linear_paths():
    model = _warm_up(models.cnn7("relu"))
    calibration = [(torch.rand(16, 1, 28, 28), torch.zeros(16))]
    snn = convert(model, "maxnorm", calibration=calibration)
    scales = conv.activation_scales(model, calibration, "maxnorm")
    folded_conv = snn.graph_module.get_submodule("4")  # conv after neurons '2' and the pool '3'
    bn = model[5]
    bn_scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected = model[4].weight * bn_scale.view(-1, 1, 1, 1) * scales["2"]
    torch.testing.assert_close(folded_conv.weight, expected.detach(), rtol=1e-5, atol=1e-6)
    # Spikes that reach the output (or an addition, a BN) directly keep their weight.
    relu_out = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval()
    x = torch.randn(8, 3)
    snn = convert(relu_out, "maxnorm", calibration=[(x, None)])
    (layer,) = snn.neuron_layers.values()
    assert layer.spike_weight == pytest.approx(conv.activation_scales(relu_out, [(x, None)], "maxnorm")["1"])
    torch.testing.assert_close(snn(x, 2000)[-1], relu_out(x), rtol=0.02, atol=0.02)


def test_max_scale_is_the_calibration_max():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 4), relu, nn.Linear(4, 2)).eval()
    x = torch.randn(50, 3)
    scales = conv.activation_scales(model, [(x, None)], "maxnorm")
    with torch.no_grad():
        expected = float(relu(model[0](x)).max())
    assert scales["1"] == pytest.approx(expected)


class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.fc(x))


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), rnl_fast.RateNorm()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.act(x))))


@pytest.mark.parametrize(
    "model, method, match",
    [
        pytest.param(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2)), "maxnorm", "max pooling at '2'", id="maxpool"
        ),
        pytest.param(_FunctionalRelu(), "maxnorm", "functional ReLU", id="functional-relu"),
        pytest.param(
            nn.Sequential(nn.Linear(4, 4), nn.GELU()),
            "maxnorm",
            r"'1' \(GELU\) has no spiking equivalent",
            id="unknown",
        ),
        pytest.param(
            nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
            "rnl",
            "ReLU but this method converts RateNorm",
            id="relu-for-rnl",
        ),
        pytest.param(_Reused(), "rnl", "called more than once", id="reused-activation"),
        pytest.param(nn.Sequential(nn.Linear(4, 4)), "rnl", "no RateNorm activations", id="no-activation"),
    ],
)
def test_unconvertible_parts_are_named(model, method, match):
    with pytest.raises(ConversionError, match=match):
        convert(model, method, calibration=[(torch.randn(2, 1, 8, 8), None)])


def test_unknown_method_and_missing_calibration():
    with pytest.raises(ValueError, match="method must be one of"):
        convert(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "spikenorm")
    with pytest.raises(ValueError, match="needs calibration data"):
        convert(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "maxnorm")


class _OneNeuron(nn.Module):
    """Input → identity current into 2 IF neurons → identity readout: countable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.act = rnl_fast.RateNorm()
        self.out = nn.Linear(2, 2)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(2))
            self.out.bias.zero_()
            self.act.running_max.fill_(1.0)

    def forward(self, x):
        return self.out(self.act(x))


def test_bookkeeping_by_hand():
    """Neuron 0 gets 0.5 per step (spikes at t = 2, 4, …), neuron 1 gets 0.25 (t = 4, 8, …)."""
    model = _OneNeuron().eval()
    snn = convert(model, "rnl")
    x = torch.tensor([[0.5, 0.25], [0.25, 0.5]])
    y = torch.tensor([0, 1])
    res = simulate(snn, [(x, y)], T=8, ann=model, progress=False)
    # spikes per image per step: t=1: 0; t=2: 1 (one neuron at 0.5 in each image); t=3: 0; t=4: 2
    assert res.spikes_per_step == pytest.approx([0, 1, 0, 2, 0, 1, 0, 2])
    # Output = mean current so far; nothing fires at t = 1 → ties → argmax 0: image 0 right only.
    assert res.accuracy[0] == 50.0 and res.accuracy[1] == 100.0 and res.accuracy[3] == 100.0
    # K at t = 4: rates (0.5, 0.25) exactly equal r̂ (up to θ's 1e-6) → K ≈ 0; at t = 1: rates 0 → K = 1.
    curve = res.k_curves["act"]
    assert curve[0] == pytest.approx(1.0, abs=1e-5) and curve[3] == pytest.approx(0.0, abs=1e-5)
    reached = energy.energy_to_accuracy(res.accuracy, res.spikes_per_step, target=100.0)
    assert reached.steps == 2 and reached.energy == pytest.approx(1.0)


def test_energy_model():
    assert energy.power_per_step([2.0, 0.0], alpha=1e-9) == pytest.approx([2e-6, 0.0])
    a = energy.energy_to_accuracy([10, 50, 91, 95], [5, 5, 5, 5], target=90)
    b = energy.energy_to_accuracy([10, 20, 30, 91], [2, 2, 2, 2], target=90)
    assert (a.steps, a.energy, b.steps, b.energy) == (3, 15, 4, 8)
    assert energy.energy_ratio(a, b) == pytest.approx(15 / 8)
    assert energy.energy_to_accuracy([1, 2], [1, 1], 99).steps is None
    with pytest.raises(ValueError, match="differ in length"):
        energy.energy_to_accuracy([1], [1, 2], 50)


def test_bad_T():
    snn = convert(_OneNeuron().eval(), "rnl")
    for T in (0, -3, 2.5):
        with pytest.raises(ValueError, match="T must be a positive int"):
            snn(torch.ones(1, 2), T)


def test_a_deep_copy_simulates_like_the_original():
    import copy

    snn = convert(_warm_up(models.cnn7("rnl")), "rnl")
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(copy.deepcopy(snn)(x, 6, chunk=3), snn(x, 6, chunk=3))


def test_layer_labels_name_the_layer_feeding_each_neuron_layer():
    snn = convert(_warm_up(models.alexnet_mnist("rnl")), "rnl")
    labels = snn.layer_labels()
    assert list(labels.values()) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2"]
    result = simulate(snn, [(torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))], T=2, progress=False)
    assert result.layer_labels == labels


def test_a_step_exactly_one_point_below_the_ann_reaches_the_target():
    # 639 of 1000 correct against an ANN at 64.9%: 64.9 − 1.0 is 63.900000000000006 in floating
    # point. Catches a comparison without slack (the step would be missed) and one too loose.
    from rnl_fast.energy import steps_to_accuracy

    assert steps_to_accuracy([60.0, 100 * 639 / 1000], 64.9 - 1.0) == 2
    assert steps_to_accuracy([60.0, 100 * 638 / 1000], 64.9 - 1.0) is None


def test_robustnorm_calibration_does_not_depend_on_the_global_generator():
    # More positive activations than one batch keeps (500k): RobustNorm samples them. Catches a
    # sample drawn from torch's global generator (other λ, hence other steps, from run to run).
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 48 * 48, 3)).eval()
    with torch.no_grad():
        net[0].bias.fill_(1.0)  # every activation positive
    batches = [(torch.rand(16, 1, 48, 48), None)]
    thresholds = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        snn = rnl_fast.convert(net, "robustnorm", calibration=batches)
        thresholds.append([layer.threshold for layer in snn.neuron_layers.values()])
    assert thresholds[0] == thresholds[1]


@pytest.mark.parametrize(
    "device, free, budget",
    [
        ("cpu", 64 * 2**30, 128 * 2**20),  # CPU: at most 128 MiB whatever the memory
        ("cpu", 256 * 2**20, 32 * 2**20),  # an eighth of what is free
        ("cpu", 2**20, 16 * 2**20),  # never under 16 MiB
        ("cuda", 139 * 2**30, 2 * 2**30),  # a GPU: up to 2 GiB (fewer chunks, fewer host launches)
        ("cuda", 8 * 2**30, 2**29),  # a sixteenth of what is free on a GPU
    ],
)
def test_chunk_budget_by_device_and_free_memory(monkeypatch, device, free, budget):
    from rnl_fast.simulation import memory

    monkeypatch.setattr(memory, "available_memory", lambda _device: free)
    assert memory.chunk_budget(torch.device(device)) == budget
