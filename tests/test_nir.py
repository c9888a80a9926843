"""NIR export and import (issue 11 item 4): ours → NIR → HDF5 file → ours simulates to the same
outputs bit for bit, for cnn7 and vgg16 converted by every method, per-channel thresholds, spike
weights carried on the spikes and residual additions; bad input is named in one line; the
export runs in SpikingJelly 2.0's importer (hard reset there)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import rnl_fast
from rnl_fast import models
from rnl_fast.conversion import METHODS

nir = pytest.importorskip("nir")

T = 24


def _warm_up(model: nn.Module, shape: tuple[int, ...], batches: int = 4) -> nn.Module:
    """BN statistics and Rate Norm / QCFS state from random batches, then eval (no training)."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(shape))
    return model.eval()


def _converted(name: str, method: str, shape: tuple[int, ...], **options) -> rnl_fast.SpikingNetwork:
    activation = {"maxnorm": "relu", "robustnorm": "relu", "qcfs": "qcfs"}.get(method, "rnl")
    levels = {"levels": 4} if method == "rnl_qcfs" else {}
    # p = 0.5: Rate Norm thresholds at half the running max, so that every layer spikes in T steps.
    net = _warm_up(models.build_model(name, activation=activation, seed=0, p_init=0.5, **levels), shape)
    calibration = [(torch.rand(shape), None)] if activation == "relu" else None
    return rnl_fast.convert(net, method, calibration=calibration, **options)


def _spikes(snn: rnl_fast.SpikingNetwork) -> list[int]:
    """Spikes of each neuron layer in the last simulation."""
    return [int(layer.neurons.step_spike_counts.sum()) for layer in snn.neuron_layers.values()]


def _round_trip(snn: rnl_fast.SpikingNetwork, x: torch.Tensor, path) -> rnl_fast.SpikingNetwork:
    graph = rnl_fast.to_nir(snn, x)
    nir.write(path, graph)
    return rnl_fast.from_nir(path)


def _assert_same_simulation(snn, back, x) -> None:
    expected = snn(x, T)
    assert min(_spikes(snn)) > 0, _spikes(snn)  # every layer spikes: the outputs are not only biases
    got = back(x, T)
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert back.method == snn.method and back.v_init == snn.v_init
    for (name, ours), (_, theirs) in zip(snn.neuron_layers.items(), back.neuron_layers.items()):
        assert type(theirs.threshold) is type(ours.threshold), name
        assert (theirs.fused_pool is None) == (ours.fused_pool is None), name


@pytest.mark.parametrize(
    "model, calibration_shape, x_shape",
    [
        pytest.param("cnn7", (8, 1, 28, 28), (3, 1, 28, 28), id="cnn7"),
        pytest.param("vgg16", (4, 3, 32, 32), (2, 3, 32, 32), id="vgg16", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_round_trips_exactly_through_a_file(model, calibration_shape, x_shape, method, tmp_path):
    snn = _converted(model, method, calibration_shape)
    x = torch.rand(x_shape)
    back = _round_trip(snn, x, tmp_path / f"{model}.nir")
    _assert_same_simulation(snn, back, x)


def test_channel_wise_thresholds_round_trip(tmp_path):
    snn = _converted("cnn7", "maxnorm", (8, 1, 28, 28), channel_wise=True, v_init="half")
    x = torch.rand(3, 1, 28, 28)
    back = _round_trip(snn, x, tmp_path / "cw.nir")
    _assert_same_simulation(snn, back, x)
    # The plain NIR field holds θ_c on every neuron of channel c.
    graph = rnl_fast.to_nir(snn, x)
    first_if = next(node for node in graph.nodes.values() if isinstance(node, nir.IF))
    first_layer = next(iter(snn.neuron_layers.values()))
    np.testing.assert_array_equal(first_if.v_threshold[:, 0, 0], first_layer.threshold.numpy())


class _Residual(nn.Module):
    """conv → BN → ReLU → (conv → BN → ReLU) + itself → global pool → linear: both neuron layers
    feed the addition, so their spike weights cannot be folded and ride on the spikes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)

    def forward(self, x):
        a = self.act1(self.bn1(self.conv1(x)))
        b = self.act2(self.bn2(self.conv2(a)))
        return self.fc(self.flatten(self.pool(a + b)))


@pytest.mark.parametrize("channel_wise", [False, True], ids=["per_layer", "per_channel"])
def test_spike_weights_and_residual_additions_round_trip(channel_wise, tmp_path):
    shape = (8, 1, 6, 6)
    model = _warm_up(_Residual(), shape)
    snn = rnl_fast.convert(model, "maxnorm", calibration=[(torch.rand(shape), None)], channel_wise=channel_wise)
    assert all(  # the case under test: spike weights carried, not folded
        isinstance(layer.spike_weight, torch.Tensor) or layer.spike_weight != 1.0
        for layer in snn.neuron_layers.values()
    )
    x = torch.rand(3, 1, 6, 6)
    graph = rnl_fast.to_nir(snn, x)
    kinds = {name: type(node).__name__ for name, node in graph.nodes.items()}
    assert kinds["add"] == "Scale" and sorted(src for src, dst in graph.edges if dst == "add") == [
        "act1_spike_weight",
        "act2_spike_weight",
    ]
    assert kinds["pool"] == "AvgPool2d"
    back = _round_trip(snn, x, tmp_path / "residual.nir")
    _assert_same_simulation(snn, back, x)


def test_import_does_not_need_nir():
    assert "nir" not in rnl_fast.__dict__  # the names are lazy
    code = "import sys, rnl_fast; assert 'nir' not in sys.modules; rnl_fast.to_nir; assert 'nir' in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_to_nir_refuses_what_is_not_a_converted_network():
    with pytest.raises(TypeError, match="SpikingNetwork.*got Sequential"):
        rnl_fast.to_nir(nn.Sequential(nn.Linear(2, 2)), torch.rand(1, 2))
    snn = _converted("cnn7", "rnl", (8, 1, 28, 28))
    with pytest.raises(ValueError, match="dt must be"):
        rnl_fast.to_nir(snn, torch.rand(1, 1, 28, 28), dt=0.0)


def test_an_example_input_that_does_not_fit_is_named_in_one_line():
    """The shape pass is the simulator's: its one-line error, with the argument's name (fx's
    ShapeProp raised a RuntimeError with the graph dumped into it)."""
    snn = _converted("cnn7", "rnl", (8, 1, 28, 28))
    with pytest.raises(ValueError, match=r"^example_input of shape \[B, 3, 28, 28\] does not fit the network") as info:
        rnl_fast.to_nir(snn, torch.rand(2, 3, 28, 28))
    assert "\n" not in str(info.value) and "expected input[1, 3, 28, 28] to have 1 channels" in str(info.value)
    with pytest.raises(ValueError, match=r"^x of shape \[B, 3, 28, 28\] does not fit"):  # the simulator's own
        snn(torch.rand(2, 3, 28, 28), 2)


def test_a_bf16_network_exports_its_weights_widened_to_float32(tmp_path):
    """numpy has no bf16: the weights go out as the float32 values of the bf16 ones (exact), and
    the shape pass runs in bf16 (float32 images through bf16 convolutions failed)."""
    import copy

    snn = _converted("cnn7", "rnl", (8, 1, 28, 28))
    x = torch.rand(2, 1, 28, 28)
    full, low = rnl_fast.to_nir(snn, x), rnl_fast.to_nir(copy.deepcopy(snn).to(torch.bfloat16), x)
    assert sorted(full.nodes) == sorted(low.nodes)
    weighted = [name for name, node in full.nodes.items() if hasattr(node, "weight")]
    assert weighted
    for name in weighted:
        ours, theirs = low.nodes[name].weight, full.nodes[name].weight
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, torch.from_numpy(theirs).bfloat16().float().numpy())
        assert not np.array_equal(ours, theirs)  # rounded: the bf16 network's own weights
    nir.write(tmp_path / "low.nir", low)
    assert rnl_fast.from_nir(tmp_path / "low.nir")(x, 4).shape == (4, 2, 10)


def test_to_nir_names_the_part_it_cannot_export():
    # preact_resnet's BatchNorm after each residual addition stays a module (nothing to fold into).
    snn = rnl_fast.convert(_warm_up(models.preact_resnet18("rnl", in_channels=1, input_size=8), (4, 1, 8, 8)), "rnl")
    with pytest.raises(ValueError, match=r"node '.*bn1' \(BatchNorm2d\) has no NIR equivalent") as info:
        rnl_fast.to_nir(snn, torch.rand(1, 1, 8, 8))
    assert "\n" not in str(info.value)
    # vgg16's ceil_mode pools on an odd plane change the output size: NIR has no ceil_mode.
    snn = _converted("vgg16", "rnl", (2, 3, 28, 28))
    with pytest.raises(ValueError, match="ceil_mode on a 7x7 plane"):
        rnl_fast.to_nir(snn, torch.rand(1, 3, 28, 28))


def _small_graph(neuron: nir.NIRNode) -> nir.NIRGraph:
    nodes = {
        "input": nir.Input(input_type=np.array([3])),
        "fc": nir.Affine(weight=np.eye(3, dtype=np.float32), bias=np.zeros(3, dtype=np.float32)),
        "neurons": neuron,
        "output": nir.Output(output_type=np.array([3])),
    }
    return nir.NIRGraph(nodes=nodes, edges=[("input", "fc"), ("fc", "neurons"), ("neurons", "output")])


def test_from_nir_names_the_node_it_cannot_run():
    ones = np.ones(3, dtype=np.float32)
    lif = nir.LIF(tau=ones, r=ones, v_leak=0 * ones, v_threshold=ones)
    with pytest.raises(ValueError, match="cannot run node 'neurons' of type LIF") as info:
        rnl_fast.from_nir(_small_graph(lif))
    assert "\n" not in str(info.value)
    # An IF from elsewhere resets to v_reset: we do not silently run it with soft reset.
    with pytest.raises(ValueError, match="node 'neurons' of type IF: it resets to v_reset"):
        rnl_fast.from_nir(_small_graph(nir.IF(r=ones, v_threshold=ones)))
    marked = {"rnl_fast.reset": "subtract"}
    with pytest.raises(ValueError, match="'neurons' has r·dt ≠ 1"):
        rnl_fast.from_nir(_small_graph(nir.IF(r=2 * ones, v_threshold=ones, metadata=marked)))
    varying = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    snn = rnl_fast.from_nir(_small_graph(nir.IF(r=ones, v_threshold=varying, metadata=marked)))
    assert torch.equal(snn.neuron_layers["neurons"].threshold, torch.tensor([1.0, 2.0, 3.0]))  # one per feature


def test_a_soft_reset_graph_from_elsewhere_runs_as_written():
    """A hand-made NIR graph with our reset marker: threshold 1, r = 1, identity weights; the
    output after T steps is the rate floor(x·T)/T, counted by hand."""
    ones = np.ones(3, dtype=np.float32)
    graph = _small_graph(nir.IF(r=ones, v_threshold=ones, metadata={"rnl_fast.reset": "subtract"}))
    graph.nodes["readout"] = nir.Linear(weight=np.eye(3, dtype=np.float32))
    graph.edges = [("input", "fc"), ("fc", "neurons"), ("neurons", "readout"), ("readout", "output")]
    snn = rnl_fast.from_nir(graph)
    x = torch.tensor([[0.25, 0.5, 0.9]])
    out = snn(x, 8)[-1]
    torch.testing.assert_close(out, torch.floor(x * 8 + 1e-6) / 8)


def test_spikingjelly_imports_and_runs_the_export(tmp_path):
    """SpikingJelly 2.0's NIR importer reads our file; it simulates hard reset to 0 from v = 0
    (see README "NIR"), so its outputs are close to ours but not equal."""
    pytest.importorskip("nirtorch")
    nir_exchange = pytest.importorskip("spikingjelly.activation_based.nir_exchange")
    snn = _converted("cnn7", "rnl", (8, 1, 28, 28))
    x = torch.rand(4, 1, 28, 28)
    path = tmp_path / "cnn7.nir"
    nir.write(path, rnl_fast.to_nir(snn, x, dt=1.0))
    sj = nir_exchange.import_from_nir(path, dt=1.0, step_mode="m")
    with torch.no_grad():
        currents, _ = sj(x.unsqueeze(0).repeat(T, 1, 1, 1, 1))
    theirs = currents.cumsum(0) / torch.arange(1, T + 1).view(-1, 1, 1)
    ours = snn(x, T)
    assert theirs.shape == ours.shape and torch.isfinite(theirs).all()
    assert min(_spikes(snn)) > 0, _spikes(snn)
    assert not torch.equal(theirs, ours)  # hard reset loses the charge above θ at every spike
    print(
        f"SpikingJelly vs rnl_fast after {T} steps: max |Δ| {(theirs[-1] - ours[-1]).abs().max():.3g}, "
        f"max |ours| {ours[-1].abs().max():.3g}"
    )
