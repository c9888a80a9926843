"""Tests of rnl_fast.models: shapes, activation modules, shared p, pooling, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnl_fast import models
from rnl_fast.nn import RateNorm

# Rate Norm Layers per network: one per activation site.
EXPECTED_RATE_NORMS = {"cnn7": 3, "alexnet_mnist": 7, "vgg16": 15, "preact_resnet18": 17, "preact_resnet34": 33}
# (input_size, in_channels): the MNIST-like and the CIFAR-like input.
INPUTS = [pytest.param(28, 1, id="28px-1ch"), pytest.param(32, 3, id="32px-3ch")]


@pytest.fixture
def rate_norm_class() -> type[nn.Module]:
    """The RateNorm class the models build."""
    return RateNorm


def _build(name: str, activation: str, input_size: int, in_channels: int, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return models.build_model(
        name, activation=activation, in_channels=in_channels, input_size=input_size, num_classes=7, **kwargs
    )


@pytest.mark.parametrize("input_size, in_channels", INPUTS)
@pytest.mark.parametrize("activation", models.ACTIVATIONS)
@pytest.mark.parametrize("name", list(models.MODELS))
def test_forward_backward(name: str, activation: str, input_size: int, in_channels: int) -> None:
    model = _build(name, activation, input_size, in_channels)
    x = torch.rand(3, in_channels, input_size, input_size)
    logits = model(x)
    assert logits.shape == (3, 7) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    model.eval()
    assert model(x).shape == (3, 7)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_activation_counts_match_between_rnl_and_relu(name: str, rate_norm_class: type[nn.Module]) -> None:
    rnl = _build(name, "rnl", 32, 3)
    relu = _build(name, "relu", 32, 3)
    assert sum(isinstance(m, rate_norm_class) for m in rnl.modules()) == EXPECTED_RATE_NORMS[name]
    assert sum(isinstance(m, nn.ReLU) for m in rnl.modules()) == 0
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == EXPECTED_RATE_NORMS[name]
    # Same architecture: the same parameters apart from the Rate Norm raw p's.
    relu_shapes = {n: p.shape for n, p in relu.named_parameters()}
    rnl_shapes = {n: p.shape for n, p in rnl.named_parameters() if not n.endswith("raw_p")}
    assert rnl_shapes == relu_shapes


@pytest.mark.parametrize("name", list(models.MODELS))
def test_shared_p_is_one_parameter(name: str, rate_norm_class: type[nn.Module]) -> None:
    shared = _build(name, "rnl", 32, 3, shared_p=True)
    layers = [m for m in shared.modules() if isinstance(m, rate_norm_class)]
    assert all(layer.raw_p is layers[0].raw_p for layer in layers)
    assert sum(n.endswith("raw_p") for n, _ in shared.named_parameters()) == 1

    separate = _build(name, "rnl", 32, 3, shared_p=False)
    raw_ps = [m.raw_p for m in separate.modules() if isinstance(m, rate_norm_class)]
    assert len({id(p) for p in raw_ps}) == EXPECTED_RATE_NORMS[name]


@pytest.mark.parametrize("name", list(models.MODELS))
def test_average_pooling_only(name: str) -> None:
    model = _build(name, "rnl", 32, 3)
    max_pools = (
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d,
    )
    assert not [m for m in model.modules() if isinstance(m, max_pools)]
    assert any(isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) for m in model.modules())


def _replace_modules(model: nn.Module, kind: type[nn.Module], make: type[nn.Module]) -> int:
    """Replace every submodule of type ``kind`` with ``make()`` in place; return how many."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, kind):
                setattr(parent, child_name, make())
                replaced += 1
    return replaced


@pytest.mark.parametrize("input_size, in_channels", INPUTS)
@pytest.mark.parametrize("name", list(models.MODELS))
def test_all_nonlinearity_lives_in_activation_modules(name: str, input_size: int, in_channels: int) -> None:
    """With every activation module swapped for Identity (what a converter does, with spiking
    modules), the eval-mode network must be affine: any hidden functional ReLU, max or other
    nonlinearity would break f(a) + f(b) = f(a + b) + f(0)."""
    model = _build(name, "relu", input_size, in_channels)
    with torch.no_grad():
        model(torch.rand(4, in_channels, input_size, input_size))  # non-trivial BatchNorm statistics
    assert _replace_modules(model, nn.ReLU, nn.Identity) == EXPECTED_RATE_NORMS[name]
    model.eval()
    a, b = torch.randn(2, 1, in_channels, input_size, input_size, dtype=torch.float64)
    model.double()
    with torch.no_grad():
        lhs = model(a) + model(b)
        rhs = model(a + b) + model(torch.zeros_like(a))
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)


def test_cnn7_linear_features_follow_input_size() -> None:
    assert models.cnn7(activation="relu", input_size=28)[-1].in_features == 32 * 3 * 3
    assert models.cnn7(activation="relu", in_channels=3, input_size=32)[-1].in_features == 32 * 4 * 4


def test_vgg16_reaches_one_pixel_at_both_sizes() -> None:
    for input_size in (28, 32):
        model = models.vgg16(activation="relu", input_size=input_size)
        features = model[: [type(m) for m in model].index(nn.Flatten)]
        assert features(torch.rand(2, 3, input_size, input_size)).shape == (2, 512, 1, 1)


@pytest.mark.parametrize(
    "in_channels, out_channels, stride, projection",
    [
        pytest.param(16, 16, 1, False, id="identity"),
        pytest.param(16, 32, 1, True, id="widen"),
        pytest.param(16, 32, 2, True, id="downsample"),
    ],
)
def test_preact_block(in_channels: int, out_channels: int, stride: int, projection: bool) -> None:
    torch.manual_seed(0)
    block = models.PreActBlock(in_channels, out_channels, stride, nn.ReLU).eval()
    assert (block.shortcut is not None) == projection
    x = torch.randn(2, in_channels, 9, 9)
    pre = block.act1(block.bn1(x))
    shortcut = block.shortcut(pre) if projection else x
    expected = block.conv2(block.act2(block.bn2(block.conv1(pre)))) + shortcut
    out = block(x)
    assert out.shape == (2, out_channels, -(-9 // stride), -(-9 // stride))
    torch.testing.assert_close(out, expected)


def test_errors_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="activation must be one of .*'rnl'.*'relu'.*'gelu'"):
        models.cnn7(activation="gelu")
    with pytest.raises(ValueError, match="model name must be one of .*cnn7.*preact_resnet34.*'lenet'"):
        models.build_model("lenet")
    with pytest.raises(ValueError, match="input_size must be at least 8"):
        models.cnn7(activation="relu", input_size=7)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        models.vgg16(activation="relu", num_classes=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        models.alexnet_mnist(activation="relu", dropout=1.0)


def test_dropout_only_when_asked() -> None:
    assert not any(isinstance(m, nn.Dropout) for m in models.vgg16(activation="relu"))
    assert sum(isinstance(m, nn.Dropout) for m in models.vgg16(activation="relu", dropout=0.5)) == 2
    assert sum(isinstance(m, nn.Dropout) for m in models.alexnet_mnist(activation="relu", dropout=0.5)) == 2


def test_rate_norm_arguments_reach_the_layers(rate_norm_class: type[nn.Module]) -> None:
    model = models.cnn7(momentum=0.25, p_init=0.5)
    layers = [m for m in model.modules() if isinstance(m, rate_norm_class)]
    assert all(layer.momentum == 0.25 for layer in layers)
    torch.testing.assert_close(torch.sigmoid(layers[0].raw_p.detach()), torch.tensor(0.5), atol=1e-4, rtol=0)
