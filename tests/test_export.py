"""Export for deployment: torch.export of a converted network (fresh, never run before) gives the
simulation bit for bit, saves and loads, takes any batch size with a dynamic batch dim, and
leaves the network's state alone; torch.onnx.export traces the pure-PyTorch reference, and
onnxruntime runs the file with the simulation's outputs (bit for bit on inputs and weights whose
sums are exact in float32)."""

from __future__ import annotations

import importlib.util
import io
import warnings

import pytest
import torch

import rnl_fast
from rnl_fast import models

T = 6


def _converted(name: str, method: str, shape: tuple[int, ...], **options) -> rnl_fast.SpikingNetwork:
    activation = {"maxnorm": "relu", "qcfs": "qcfs"}.get(method, "rnl")
    net = models.build_model(name, activation=activation, seed=0, p_init=0.5)
    net.train()
    with torch.no_grad():  # running maxima of the Rate Norm Layers that make every layer spike
        for _ in range(3):
            net(torch.rand(shape))
    net.eval()
    calibration = [(torch.rand(shape), None)] if activation == "relu" else None
    return rnl_fast.convert(net, method, calibration=calibration, **options)


CASES = {
    "cnn7-rnl": ("cnn7", "rnl", (4, 1, 28, 28), {}),
    "cnn7-maxnorm-cw-half": ("cnn7", "maxnorm", (4, 1, 28, 28), dict(channel_wise=True, v_init="half")),
    "cnn7-qcfs": ("cnn7", "qcfs", (4, 1, 28, 28), {}),
    "vgg16-rnl": ("vgg16", "rnl", (2, 3, 32, 32), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_export_of_a_fresh_network_is_exact_and_round_trips_through_a_file(case):
    name, method, shape, options = CASES[case]
    snn = _converted(name, method, shape, **options)
    x = torch.rand(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tensor attributes were assigned during export"
        program = torch.export.export(snn, (x,), {"T": T})  # before the network ever ran
    assert all(layer.neurons.v is None for layer in snn.neuron_layers.values())  # state left alone
    expected = snn(x, T)
    assert sum(int(layer.neurons.step_spike_counts.sum()) for layer in snn.neuron_layers.values()) > 0
    assert torch.equal(program.module()(x, T=T), expected)

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    out = loaded.module()(x, T=T)
    assert torch.equal(out, expected) and not out.requires_grad


def test_torch_export_with_a_dynamic_batch():
    snn = _converted("cnn7", "rnl", (4, 1, 28, 28))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        snn, (torch.rand(4, 1, 28, 28),), {"T": T}, dynamic_shapes={"x": {0: batch}, "T": None}
    )
    for size in (1, 7):
        x = torch.rand(size, 1, 28, 28)
        assert torch.equal(program.module()(x, T=T), snn(x, T))


def test_an_exported_run_in_chunks_carries_the_membrane():
    snn = _converted("cnn7", "rnl", (4, 1, 28, 28))
    x = torch.rand(4, 1, 28, 28)
    program = torch.export.export(snn, (x,), {"T": 7, "chunk": 3})
    assert torch.equal(program.module()(x, T=7, chunk=3), snn(x, 7))


@pytest.mark.parametrize("bad", [True, 0, -2, 2.0, "4"])
def test_steps_and_chunk_must_be_positive_ints(bad):
    snn = _converted("cnn7", "rnl", (4, 1, 28, 28))
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="T must be a positive int"):
        snn(x, bad)
    with pytest.raises(ValueError, match="chunk must be None or a positive int"):
        snn(x, 4, chunk=bad)


HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra is not installed (pip install '.[onnx]')")
@pytest.mark.parametrize("case", ["cnn7-rnl", "cnn7-maxnorm-cw-half", "cnn7-qcfs"])
def test_onnx_export_runs_in_onnxruntime_with_the_simulation_outputs(case, tmp_path):
    import onnx
    import onnxruntime

    name, method, shape, options = CASES[case]
    snn = _converted(name, method, shape, **options)
    # onnxruntime sums a convolution in another order than torch (~1e-8 apart), and a membrane that
    # close to its threshold then spikes in one and not the other (a whole weight / T in the output:
    # seed 2995985617 drew one). Weights in 1/64ths and inputs in 1/8ths make every sum exact in
    # float32 in any order, so both must give the same outputs bit for bit: only a wrong graph differs.
    with torch.no_grad():
        for parameter in snn.parameters():
            parameter.copy_(torch.round(parameter * 64) / 64)
    x = torch.randint(0, 9, shape).float() / 8
    path = tmp_path / "snn.onnx"
    torch.onnx.export(snn, (x,), path, kwargs={"T": T}, dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    expected = snn(x, T)
    assert sum(int(layer.neurons.step_spike_counts.sum()) for layer in snn.neuron_layers.values()) > 0
    assert torch.equal(torch.from_numpy(out), expected)
    # The ops themselves are not in the file: it holds the reference's unrolled steps.
    assert "rnl_fast" not in {node.domain for node in onnx.load(path).graph.node}


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra is not installed (pip install '.[onnx]')")
@pytest.mark.parametrize("activation", ["rnl", "qcfs"])
def test_onnx_export_of_the_ann_with_rate_norm_or_qcfs(activation, tmp_path):
    import onnxruntime

    net = models.build_model("cnn7", activation=activation, seed=0, p_init=0.5).eval()
    x = torch.rand(4, 1, 28, 28)
    path = tmp_path / "ann.onnx"
    torch.onnx.export(net, (x,), path, dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(x), rtol=1e-5, atol=1e-6)
