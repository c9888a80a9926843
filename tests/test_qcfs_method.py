"""QCFS networks and the two quantized conversion methods (issue 10): ``activation="qcfs"`` and
``levels`` in the model builders, method ``"qcfs"`` (threshold λ, spikes weighted by λ, membrane
from θ/2 by default) and ``"rnl_qcfs"`` (a quantized Rate Norm network, from θ/2), their labels,
what results record, and the command line.

The exactness test rests on QCFS's own identity: an IF neuron with threshold λ that starts at λ/2
and integrates a constant current x has fired ``clamp(floor(T·x/λ + ½), 0, T)`` times after T
steps, so at T = L its rate·λ is the QCFS output ``λ·clamp(floor(x/λ·L + ½)/L, 0, 1)`` exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import rnl_fast
from rnl_fast import cli, models, pipeline, reference
from rnl_fast.conversion import ConversionError, MethodVariant, convert
from rnl_fast.report import MethodResult


def _with_threshold(levels: int, lam: float) -> rnl_fast.QCFS:
    layer = rnl_fast.QCFS(levels)
    with torch.no_grad():
        layer.threshold.fill_(lam)
    return layer


def _one_hidden_layer(kind: str, levels: int, lam: float) -> nn.Module:
    torch.manual_seed(3)
    if kind == "linear":
        return nn.Sequential(nn.Linear(6, 5), _with_threshold(levels, lam), nn.Linear(5, 3)).eval()
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        _with_threshold(levels, lam),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).eval()


# ─── the module and the builders ─────────────────────────────────────────────────────────────


def test_qcfs_module_is_the_reference_and_trains_its_bound():
    layer = _with_threshold(4, 2.0)
    x = torch.tensor([-1.0, -0.25, 0.0, 0.24, 0.26, 1.0, 1.9, 2.24, 2.26, 5.0], requires_grad=True)
    y = layer(x)
    # λ/L = 0.5: the steps sit at 0.25, 0.75, …; ReLU below, λ above.
    assert y.tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    expected = reference.qcfs(x.detach(), torch.tensor(2.0), 4)
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    assert layer.threshold.grad is not None and layer.threshold.grad.item() != 0.0
    assert "levels=4" in repr(layer) and "threshold=2" in repr(layer)


@pytest.mark.parametrize("levels", [0, -1, 1.5, True, "8"])
def test_bad_levels_name_the_argument(levels):
    with pytest.raises(ValueError, match="levels"):
        rnl_fast.QCFS(levels)
    with pytest.raises(ValueError, match="levels"):
        models.build_model("cnn7", activation="qcfs", levels=levels)


@pytest.mark.parametrize("threshold_init", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_threshold_init_names_it(threshold_init):
    with pytest.raises(ValueError, match="threshold_init"):
        rnl_fast.QCFS(8, threshold_init)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_builder_takes_qcfs_and_levels(name):
    shape = (1, 28, 28) if name in ("cnn7", "alexnet_mnist") else (3, 32, 32)
    kwargs = dict(in_channels=shape[0], input_size=shape[1])
    qcfs = models.build_model(name, activation="qcfs", levels=4, seed=0, **kwargs)
    layers = [m for m in qcfs.modules() if isinstance(m, rnl_fast.QCFS)]
    assert layers and all(m.levels == 4 for m in layers)
    assert len({id(m.threshold) for m in layers}) == len(layers)  # one bound per layer
    rnl = models.build_model(name, activation="rnl", levels=4, seed=0, **kwargs)
    assert all(m.levels == 4 for m in rnl.modules() if isinstance(m, rnl_fast.RateNorm))
    relu = models.build_model(name, activation="relu", seed=0, **kwargs)
    # Same initial weights whatever the activation: only the activations differ.
    weights = {k: v for k, v in relu.state_dict().items()}
    for k, v in qcfs.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_qcfs_default_levels_and_relu_refuses_levels():
    net = models.build_model("cnn7", activation="qcfs")
    assert {m.levels for m in net.modules() if isinstance(m, rnl_fast.QCFS)} == {rnl_fast.nn.QCFS_LEVELS}
    with pytest.raises(ValueError, match="levels"):
        models.build_model("cnn7", activation="relu", levels=8)


# ─── conversion ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("levels, lam", [(4, 1.0), (8, 0.5), (2, 4.0)])
def test_qcfs_conversion_is_exact_at_T_equal_L(kind, levels, lam):
    # Catches: a threshold other than λ, spikes not weighted by λ (or weighted twice), a start
    # other than θ/2 (0 gives floor(T·x/λ), off by one level for half the inputs), a fold into the
    # wrong layer; the BatchNorm of the conv case must be folded before λ is read.
    net = _one_hidden_layer(kind, levels, lam)
    x = torch.randn(7, 6) if kind == "linear" else torch.randn(5, 2, 8, 8)
    net.train()
    with torch.no_grad():
        net(x)  # BN statistics that are not the identity
    net.eval()
    snn = convert(net, "qcfs")
    out = snn(x, 2 * levels)
    with torch.no_grad():
        ann = net(x)
    torch.testing.assert_close(out[levels - 1], ann, rtol=0, atol=1e-5)
    # From 0 instead of θ/2 the rates round down: not the QCFS output.
    late = convert(net, "qcfs", v_init=0.0)(x, levels)[-1]
    assert not torch.allclose(late, ann, atol=1e-3)


def test_qcfs_thresholds_and_spike_weight():
    net = _one_hidden_layer("linear", 4, 1.5)
    snn = convert(net, "qcfs")
    (layer,) = snn.neuron_layers.values()
    assert layer.threshold == 1.5
    # λ folded into the next linear layer: spikes carry 1, the weights carry λ.
    assert layer.spike_weight == 1.0
    assert torch.equal(snn.graph_module.get_submodule("2").weight, net[2].weight.detach() * 1.5)


def test_qcfs_refuses_channel_wise_and_other_methods_refuse_qcfs():
    net = _one_hidden_layer("conv", 4, 1.0)
    with pytest.raises(ValueError, match="channel_wise") as info:
        convert(net, "qcfs", channel_wise=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ConversionError, match="qcfs"):
        convert(net, "rnl")
    relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(ConversionError):
        convert(relu, "qcfs")


def test_rnl_qcfs_starts_from_half_and_rnl_from_zero():
    net = models.build_model("cnn7", activation="rnl", levels=8, seed=0).eval()
    assert convert(net, "rnl_qcfs").v_init == 0.5
    assert convert(net, "rnl").v_init == 0.0
    assert convert(net, "rnl_qcfs", v_init=0).v_init == 0.0


def test_labels_name_only_what_differs_from_the_method_default():
    assert MethodVariant("qcfs").label == "qcfs" and MethodVariant("qcfs").v_init == 0.5
    assert MethodVariant("qcfs", 0.0).label == "qcfs+v0"
    assert MethodVariant("rnl_qcfs").uses_defaults
    assert MethodVariant("rnl_ril", "half").label == "rnl_ril+half"
    with pytest.raises(ValueError, match="method"):
        MethodVariant("qcfs2")


def test_results_record_levels_and_qcfs_is_not_one_of_the_papers():
    sim_like = dict(ann_accuracy=99.0, snn_accuracy=[50.0, 98.5], spikes_per_step=[1.0, 1.0], omega=1.0)
    assert MethodResult(**sim_like, method="qcfs", v_init=0.5, levels=8).is_variant
    assert not MethodResult(**sim_like, method="rnl_ril").is_variant
    assert not MethodResult(**sim_like).is_variant  # results without a method: the paper's
    net = models.build_model("cnn7", activation="qcfs", levels=4)
    assert pipeline.activation_levels(net) == 4
    assert pipeline.activation_levels(models.build_model("cnn7", activation="relu")) is None


# ─── the command line ────────────────────────────────────────────────────────────────────────


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_qcfs_then_evaluate_and_compare(capsys, tmp_path):
    common = ["--dataset", "synthetic", "--batch-size", "64", "--train-images", "640", "--test-images", "64"]
    ckpt = tmp_path / "qcfs.pt"
    train = ["train", "--stage", "1", "--epochs", "1", "--activation", "qcfs", "--levels", "4", "--out", str(ckpt)]
    assert _run(capsys, *train, *common)[0] == 0
    code, out, err = _run(capsys, "evaluate", "--checkpoint", str(ckpt), "--method", "qcfs", "-T", "8", *common)
    assert code == 0, err
    assert "qcfs" in out and "qcfs+" not in out  # θ/2 is qcfs's own default: no suffix
    out_dir = tmp_path / "cmp"
    code, out, err = _run(capsys, "compare", "--qcfs", str(ckpt), "-T", "8", "--out", str(out_dir), *common)
    assert code == 0, err
    method = json.loads((out_dir / "results.json").read_text())["methods"]["qcfs"]
    assert (method["method"], method["v_init"], method["channel_wise"], method["levels"]) == ("qcfs", 0.5, False, 4)
    code, _out, err = _run(capsys, "evaluate", "--checkpoint", str(ckpt), "--method", "maxnorm", *common)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "QCFS" in err
