"""Registration checks: opcheck on each op, and torch.compile(fullgraph=True) with no graph break."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnl_fast
import rnl_fast.ops  # noqa: F401  (registers the ops)
from rnl_fast import _C
from rnl_fast.numerics import FLOAT_DTYPES, SURROGATES


def _if_args(requires_grad: bool, surrogate: str = "atan"):
    x = (torch.randn(6, 3, 5) * 0.8 + 0.3).requires_grad_(requires_grad)
    v_th, v_init = torch.tensor(0.7), (torch.randn(3, 5) * 0.1).requires_grad_(requires_grad)
    return (x, v_th, v_init, 0.0, False, surrogate, 1.0, False, torch.float32, True)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("count_neurons", [True, False], ids=["counts", "no-counts"])
def test_opcheck_if(requires_grad, count_neurons):
    args = _if_args(requires_grad)[:-1] + (count_neurons,)
    torch.library.opcheck(torch.ops.rnl_fast.if_forward.default, args)


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_opcheck_if_grad_each_surrogate(surrogate):
    """The autograd registration with each surrogate (the forward is the same for all)."""
    torch.library.opcheck(torch.ops.rnl_fast.if_forward.default, _if_args(True, surrogate))


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_opcheck_if_backward(surrogate):
    x, v_th, v_init, *rest = _if_args(False)
    args = (torch.randn(6, 3, 5), torch.randn(3, 5), x, v_th, v_init, 0.0, False, surrogate, 1.0, False)
    torch.library.opcheck(torch.ops.rnl_fast.if_backward.default, args)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``[T, B, C, H, W]`` laid out as ``[T, B, H, W, C]``: the kernels keep it, so must the fakes."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_opcheck_if_pool(ceil_mode, layout):
    x = torch.randn(6, 2, 3, 5, 7) * 0.8 + 0.3
    x = _channels_last(x) if layout == "channels-last" else x
    args = (x, torch.tensor(0.7), torch.randn(2, 3, 5, 7) * 0.1, 0.0, False, 0.5, ceil_mode, layout == "nchw")
    torch.library.opcheck(torch.ops.rnl_fast.if_pool_forward.default, args)


def test_opcheck_if_channels_last():
    x = _channels_last(torch.randn(6, 2, 3, 5, 7) * 0.8 + 0.3)
    torch.library.opcheck(
        torch.ops.rnl_fast.if_forward.default,
        (x, torch.tensor(0.7), torch.tensor(0.0), 0.0, False, "atan", 1.0, False, torch.float32, True),
    )


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_rate_norm(requires_grad, training):
    x = torch.randn(4, 9).requires_grad_(requires_grad)
    raw_p = torch.tensor(1.5, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.rnl_fast.rate_norm_forward.default, (x, raw_p, torch.tensor(1.2), 0.1, training))


def test_opcheck_rate_norm_backward():
    grad_sums = (torch.randn(()), torch.randn(()))
    args = (torch.randn(4, 9), *grad_sums, torch.randn(4, 9), torch.tensor(1.5), torch.tensor(1.2))
    torch.library.opcheck(torch.ops.rnl_fast.rate_norm_backward.default, args)
    no_sums = (torch.randn(4, 9), None, None, torch.randn(4, 9), torch.tensor(1.5), torch.tensor(1.2))
    torch.library.opcheck(torch.ops.rnl_fast.rate_norm_backward.default, no_sums)


def test_cpp_codes_are_found_by_name():
    """Python passes the C++ codes by name: every name it may pass is bound, and only those."""
    assert tuple(_C.Surrogate.__members__) == SURROGATES
    assert tuple(_C.Reset.__members__) == ("soft", "hard")
    names = [str(dtype).removeprefix("torch.") for dtype in (*FLOAT_DTYPES, torch.uint8)]
    assert sorted(_C.DType.__members__) == sorted(names)


class _TinyAnnSnn(nn.Module):
    """A Rate Norm MLP whose output also drives an IF layer: both ops in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.rnl, self.fc2 = nn.Linear(12, 16), rnl_fast.RateNorm(), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rates = self.rnl(self.fc1(x))
        current = self.fc2(rates)
        out = rnl_fast.if_sequence(current.expand(5, *current.shape), v_th=0.5)
        return out.spikes.mean(0) + rnl_fast.rate_inference_loss(self)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _TinyAnnSnn().eval()
    x = torch.randn(3, 12)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


def test_compile_fullgraph_modules_training():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 10), rnl_fast.RateNorm())
    spiking = rnl_fast.IFSequence(v_threshold=0.4)
    x = torch.randn(4, 6)

    def step(x):
        rates = model(x)
        return spiking(rates.expand(7, *rates.shape)).sum() + rnl_fast.rate_inference_loss(model)

    expected = step(x)
    spiking.reset()
    model[1].running_max.fill_(1.0)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "bf"])
@pytest.mark.parametrize("channel_wise, levels", [(True, 0), (False, 4), (True, 3)], ids=["cw", "L4", "cw-L3"])
def test_opcheck_rate_norm_options(requires_grad, layout, channel_wise, levels):
    """The fake kernel gives the real one's shapes and strides (r̂ channels-last for a channels-last
    x; the running max [C] channel-wise), and the registered autograd the real gradients."""
    x = torch.randn(4, 3, 5, 6) if layout != "bf" else torch.randn(6, 3)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels-last" else x
    x.requires_grad_(requires_grad)
    raw_p = torch.tensor(1.5, requires_grad=requires_grad)
    running_max = torch.rand(3) + 0.5 if channel_wise else torch.tensor(1.2)
    args = (x, raw_p, running_max, 0.1, True, channel_wise, levels)
    torch.library.opcheck(torch.ops.rnl_fast.rate_norm_forward.default, args)
    grad_sums = (torch.randn(()), torch.randn(()))
    grad_args = (torch.randn_like(x), *grad_sums, x.detach(), raw_p.detach(), running_max, channel_wise, levels)
    torch.library.opcheck(torch.ops.rnl_fast.rate_norm_backward.default, grad_args)


class _ChannelWiseNet(nn.Module):
    """A conv net whose Rate Norm Layer is channel-wise and quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.rnl = rnl_fast.RateNorm(channel_wise=True, levels=4, num_channels=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnl(self.conv(x)).mean() + rnl_fast.rate_inference_loss(self)


def test_compile_fullgraph_channel_wise_quantized():
    torch._dynamo.reset()
    model = _ChannelWiseNet()
    x = torch.randn(3, 2, 6, 6)
    expected = model(x)
    expected_max = model.rnl.running_max.clone()
    model.rnl.running_max.fill_(1.0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.rnl.running_max, expected_max)
    got.backward()
    assert model.rnl.raw_p.grad is not None and model.conv.weight.grad is not None
    assert torch._dynamo.explain(model)(x).graph_break_count == 0


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "bf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_qcfs(requires_grad, layout, dtype):
    """The fake kernels give the real ones' shapes, dtypes and strides (y and grad_x channels-last
    for a channels-last x), and the registered autograd the real gradients to x and λ."""
    x = torch.randn(4, 3, 5, 6) * 2 if layout != "bf" else torch.randn(6, 3) * 2
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels-last" else x
    x = x.to(dtype).requires_grad_(requires_grad)
    threshold = torch.tensor(1.3, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.rnl_fast.qcfs_forward.default, (x, threshold, 8))
    grad_args = (torch.randn_like(x), x.detach(), threshold.detach(), 8)
    torch.library.opcheck(torch.ops.rnl_fast.qcfs_backward.default, grad_args)


class _QcfsNet(nn.Module):
    """A conv net with QCFS activations, channels-last as a CPU convolution leaves its output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act1 = nn.Conv2d(2, 4, 3, padding=1), rnl_fast.QCFS(levels=4, threshold_init=1.0)
        self.fc, self.act2 = nn.Linear(4 * 6 * 6, 5), rnl_fast.QCFS(levels=8, threshold_init=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.fc(self.act1(self.conv(x)).flatten(1))).sum()


def test_compile_fullgraph_qcfs_training():
    """QCFS under torch.compile(fullgraph=True): no graph break, the eager value and gradients."""
    torch._dynamo.reset()
    model = _QcfsNet()
    x = torch.randn(3, 2, 6, 6).contiguous(memory_format=torch.channels_last)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected, [model.act1.threshold, model.act2.threshold, model.conv.weight])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got, [model.act1.threshold, model.act2.threshold, model.conv.weight])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
