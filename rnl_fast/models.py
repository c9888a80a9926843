"""The paper's networks (Ding et al. 2021, §4), each built with Rate Norm Layers or with ReLU.

Every network follows the same rules, so that a converter can swap each activation module for a
spiking one and run the very same forward pass:

- each nonlinearity is its own module (``RateNorm`` or ``nn.ReLU``), never a functional call;
- BatchNorm right before each activation (foldable into the preceding conv/linear);
- average pooling only: an SNN can average spike rates but not max-pool them;
- the only operation outside modules is the residual addition in :class:`PreActBlock`.

The RNL, ReLU and QCFS versions of a network have the same layers and the same parameters apart
from the Rate Norm raw p's (QCFS: the clipping bounds λ).

Builders share one signature: ``NAME(activation, in_channels, num_classes, input_size, shared_p,
momentum, p_init, levels)`` (plus ``dropout`` for the two nets with hidden fully connected
layers); ``activation`` is ``"rnl"``, ``"relu"`` or ``"qcfs"`` (QCFS layers, Bu et al. 2022, with
``levels`` L, default 8); ``levels`` with ``"rnl"`` quantizes the Rate Norm Layers' rates. All
take a ``[B, in_channels, input_size, input_size]`` float batch and return logits
``[B, num_classes]``. ``build_model(name, **kwargs)`` looks a builder up in :data:`MODELS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .nn import QCFS, QCFS_LEVELS, RateNorm

#: Values accepted by the ``activation`` argument of every builder.
ACTIVATIONS = ("rnl", "relu", "qcfs")

# Channels of the 13 convolutions of VGG-16, grouped into the five stages that end in a pooling.
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Width of the two hidden fully connected layers of VGG-16 (small, as suits 32×32 inputs).
_VGG16_HIDDEN = 512
# Channels of the four PreAct ResNet stages; each stage after the first halves the image size.
_RESNET_WIDTHS = (64, 128, 256, 512)


class _ActivationFactory:
    """Makes the activation modules of one network, one call per activation site.

    ``"rnl"`` gives ``RateNorm(momentum, p_init, levels=levels)``; with ``shared_p`` the first
    layer creates the raw p parameter and every later layer reuses it (one p for the whole
    network, paper appendix). ``"relu"`` gives ``nn.ReLU()`` and ignores the Rate Norm arguments
    (``levels`` must be None). ``"qcfs"`` gives ``QCFS(levels)`` (L = 8 when ``levels`` is None),
    each layer with its own clipping bound.
    """

    def __init__(
        self, activation: str, shared_p: bool, momentum: float, p_init: float, levels: int | None = None
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if activation == "relu" and levels is not None:
            raise ValueError(f"levels quantizes Rate Norm or QCFS layers, not ReLU: got levels={levels!r}")
        self.activation = activation
        self.shared_p = shared_p
        self.momentum = momentum
        self.p_init = p_init
        self.levels = levels
        self._shared_raw_p: nn.Parameter | None = None

    def __call__(self) -> nn.Module:
        if self.activation == "relu":
            return nn.ReLU()
        if self.activation == "qcfs":
            return QCFS(QCFS_LEVELS if self.levels is None else self.levels)
        layer = RateNorm(momentum=self.momentum, p_init=self.p_init, p=self._shared_raw_p, levels=self.levels)
        if self.shared_p and self._shared_raw_p is None:
            self._shared_raw_p = layer.raw_p
        return layer


def _conv_bn_act(in_channels: int, out_channels: int, activation: nn.Module, kernel_size: int = 3) -> list[nn.Module]:
    """Conv (same padding, stride 1, no bias: the BatchNorm shift replaces it) → BatchNorm2d → act."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        activation,
    ]


def _linear_bn_act(in_features: int, out_features: int, activation: nn.Module, dropout: float) -> list[nn.Module]:
    """Linear (no bias) → BatchNorm1d → act, then Dropout when ``dropout > 0``."""
    layers = [nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features), activation]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


def _pooled_size(input_size: int, num_pools: int, ceil_mode: bool) -> int:
    """Side length after ``num_pools`` 2×2 stride-2 poolings of an ``input_size`` image."""
    size = input_size
    for _ in range(num_pools):
        size = -(-size // 2) if ceil_mode else size // 2
    if size < 1:
        raise ValueError(f"input_size must be at least {2**num_pools} for {num_pools} poolings, got {input_size}")
    return size


def _check_common(in_channels: int, num_classes: int, input_size: int, dropout: float = 0.0) -> None:
    """Raise ValueError naming the first builder argument out of range."""
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("input_size", input_size)):
        if value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def cnn7(
    activation: str = "rnl",
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int = 28,
    shared_p: bool = False,
    momentum: float = 0.1,
    p_init: float = 1.0,
    levels: int | None = None,
) -> nn.Sequential:
    """The paper's 7-layered CNN for MNIST: 3 × [Conv3×3 32 → BN → act → AvgPool2] → Flatten → Linear.

    Input ``[B, in_channels, input_size, input_size]`` → logits ``[B, num_classes]``. The
    convolutions are padded, so the linear layer sees ``32·s·s`` features with
    ``s = input_size // 8`` (288 for 28×28, 512 for 32×32). The official code leaves them
    unpadded (28 → 1×1, the "32FC10" of the paper's Table 1). Three Rate Norm Layers.
    """
    _check_common(in_channels, num_classes, input_size)
    side = _pooled_size(input_size, 3, ceil_mode=False)
    make_activation = _ActivationFactory(activation, shared_p, momentum, p_init, levels)
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(3):
        layers += [*_conv_bn_act(channels, 32, make_activation()), nn.AvgPool2d(2)]
        channels = 32
    layers += [nn.Flatten(), nn.Linear(32 * side * side, num_classes)]
    return nn.Sequential(*layers)


def alexnet_mnist(
    activation: str = "rnl",
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int = 28,
    shared_p: bool = False,
    momentum: float = 0.1,
    p_init: float = 1.0,
    dropout: float = 0.0,
    levels: int | None = None,
) -> nn.Sequential:
    """AlexNet-style net of the official RNL code for MNIST: five 3×3 convolutions and three
    fully connected layers.

    Conv 32 → pool → Conv 64 → pool → Conv 128 → Conv 256 → Conv 256 → pool → Flatten →
    FC 1024 → FC 512 → FC ``num_classes``; each hidden layer is followed by BN → act (and
    Dropout when ``dropout > 0``), pools are AvgPool2 (floor). Input
    ``[B, in_channels, input_size, input_size]`` → logits ``[B, num_classes]``; the first FC
    layer sees ``256·s·s`` features, ``s = input_size // 8`` (2304 for 28×28). Seven Rate Norm
    Layers; about 54 MMAC per 28×28 image.
    """
    _check_common(in_channels, num_classes, input_size, dropout)
    side = _pooled_size(input_size, 3, ceil_mode=False)
    make_activation = _ActivationFactory(activation, shared_p, momentum, p_init, levels)
    return nn.Sequential(
        *_conv_bn_act(in_channels, 32, make_activation()),
        nn.AvgPool2d(2),
        *_conv_bn_act(32, 64, make_activation()),
        nn.AvgPool2d(2),
        *_conv_bn_act(64, 128, make_activation()),
        *_conv_bn_act(128, 256, make_activation()),
        *_conv_bn_act(256, 256, make_activation()),
        nn.AvgPool2d(2),
        nn.Flatten(),
        *_linear_bn_act(256 * side * side, 1024, make_activation(), dropout),
        *_linear_bn_act(1024, 512, make_activation(), dropout),
        nn.Linear(512, num_classes),
    )


def vgg16(
    activation: str = "rnl",
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int = 32,
    shared_p: bool = False,
    momentum: float = 0.1,
    p_init: float = 1.0,
    dropout: float = 0.0,
    levels: int | None = None,
) -> nn.Sequential:
    """VGG-16 with average pooling: 13 × [Conv3×3 → BN → act] in five stages, each ending in an
    AvgPool2, then FC 512 → FC 512 → FC ``num_classes`` (16 weight layers, 15 Rate Norm Layers).

    The pools use ``ceil_mode=True`` so that odd sizes keep their last row and column (an edge
    window averages the pixels it covers): 32 → 16 → 8 → 4 → 2 → 1 and 28 → 14 → 7 → 4 → 2 → 1,
    so 28×28 and 32×32 inputs both reach the classifier as 512 features. The hidden layers are
    512 wide (the official code's are 4096; a 512-feature input does not need more). Input
    ``[B, in_channels, input_size, input_size]`` → logits ``[B, num_classes]``.
    """
    _check_common(in_channels, num_classes, input_size, dropout)
    side = _pooled_size(input_size, len(_VGG16_STAGES), ceil_mode=True)
    make_activation = _ActivationFactory(activation, shared_p, momentum, p_init, levels)
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in _VGG16_STAGES:
        for width in stage:
            layers += _conv_bn_act(channels, width, make_activation())
            channels = width
        layers.append(nn.AvgPool2d(2, ceil_mode=True))
    layers += [
        nn.Flatten(),
        *_linear_bn_act(channels * side * side, _VGG16_HIDDEN, make_activation(), dropout),
        *_linear_bn_act(_VGG16_HIDDEN, _VGG16_HIDDEN, make_activation(), dropout),
        nn.Linear(_VGG16_HIDDEN, num_classes),
    ]
    return nn.Sequential(*layers)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): ``bn1 → act1 → conv1 → bn2 → act2 → conv2``
    plus a shortcut, added at the end.

    The shortcut is the identity on the block input ``x`` when shape is kept, else a 1×1 conv
    (stride ``stride``) on the pre-activated input ``act1(bn1(x))``, as in the standard PreAct
    ResNet code (the official RNL code adds ``act1(bn1(x))`` on the identity path too). The
    addition is the block's only operation outside modules.

    Args:
        in_channels, out_channels: channels of the input and output.
        stride: stride of ``conv1`` (and of the projection shortcut).
        activation: makes one activation module per call (e.g. ``nn.ReLU``).

    Shape: ``[B, in_channels, H, W]`` → ``[B, out_channels, ⌈H/stride⌉, ⌈W/stride⌉]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = activation()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = activation()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre_activated = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre_activated)
        residual = self.conv2(self.act2(self.bn2(self.conv1(pre_activated))))
        return residual + shortcut


def _preact_resnet(
    blocks_per_stage: tuple[int, int, int, int],
    activation: str,
    in_channels: int,
    num_classes: int,
    input_size: int,
    shared_p: bool,
    momentum: float,
    p_init: float,
    levels: int | None,
) -> nn.Sequential:
    """Stem Conv3×3 64 → PreAct blocks (stages of 64/128/256/512 channels, stride 2 at the start of
    each stage after the first) → BN → act → global AvgPool → Flatten → Linear."""
    _check_common(in_channels, num_classes, input_size)
    make_activation = _ActivationFactory(activation, shared_p, momentum, p_init, levels)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, _RESNET_WIDTHS[0], 3, padding=1, bias=False)]
    channels = _RESNET_WIDTHS[0]
    for stage, (width, num_blocks) in enumerate(zip(_RESNET_WIDTHS, blocks_per_stage)):
        for block in range(num_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(PreActBlock(channels, width, stride, make_activation))
            channels = width
    layers += [
        nn.BatchNorm2d(channels),
        make_activation(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    ]
    return nn.Sequential(*layers)


def preact_resnet18(
    activation: str = "rnl",
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int = 32,
    shared_p: bool = False,
    momentum: float = 0.1,
    p_init: float = 1.0,
    levels: int | None = None,
) -> nn.Sequential:
    """PreActResNet-18: blocks (2, 2, 2, 2), 17 Rate Norm Layers.

    Input ``[B, in_channels, H, W]`` → logits ``[B, num_classes]``; the global average pool makes
    it work for any image size (``input_size`` is only checked: 32 → 4×4 and 28 → 4×4 before the
    pool).
    """
    return _preact_resnet(
        (2, 2, 2, 2), activation, in_channels, num_classes, input_size, shared_p, momentum, p_init, levels
    )


def preact_resnet34(
    activation: str = "rnl",
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int = 32,
    shared_p: bool = False,
    momentum: float = 0.1,
    p_init: float = 1.0,
    levels: int | None = None,
) -> nn.Sequential:
    """PreActResNet-34: blocks (3, 4, 6, 3), 33 Rate Norm Layers.

    Input ``[B, in_channels, H, W]`` → logits ``[B, num_classes]``, any image size (see
    :func:`preact_resnet18`).
    """
    return _preact_resnet(
        (3, 4, 6, 3), activation, in_channels, num_classes, input_size, shared_p, momentum, p_init, levels
    )


#: Model builders by name, for :func:`build_model` and the command line.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn7": cnn7,
    "alexnet_mnist": alexnet_mnist,
    "vgg16": vgg16,
    "preact_resnet18": preact_resnet18,
    "preact_resnet34": preact_resnet34,
}


def build_model(name: str, *, seed: int | None = None, **kwargs: object) -> nn.Module:
    """Build the network ``name`` (a key of :data:`MODELS`) with the builder's keyword arguments.

    With ``seed`` the initial weights are drawn from it (torch's global generator is left as it
    was): the same seed gives the same network, and the ReLU and Rate Norm builds of one
    architecture start from the same weights.
    """
    if name not in MODELS:
        raise ValueError(f"model name must be one of {tuple(MODELS)}, got {name!r}")
    if seed is None:
        return MODELS[name](**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](**kwargs)
