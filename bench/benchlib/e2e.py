"""The end-to-end cases: a converted network simulated over T steps, ours beside SpikingJelly 2.0.

A constant input (every step sees the image), the same batch for every impl. ``ours``:
``rnl_fast.convert(relu_net, "maxnorm")`` then ``snn(x, T)``; ``ours-rnl``: the same net built with
Rate Norm Layers, ``convert(rnl_net, "rnl")``; ``ann``: one forward of the ReLU net (the unit of
the "x ANN fwd" column); ``spikingjelly``: SpikingJelly 2.0's
``FXConverter(RateCodingRecipe(loader, mode="Max"))`` of the same ReLU net, stepped T times
(``out += snn(x)``) after ``functional.reset_net``. Ours and SpikingJelly's are the same algorithm
(MaxNorm threshold balancing, soft-reset IF neurons), so the work is the same; their calibrations
differ in a detail (SpikingJelly's "Max" is a momentum average of the batch maxima, ours the plain
maximum), hence agreement figures (``tables.e2e_checks``) rather than an equality check: each case
keeps its last output, and SpikingJelly's case both conversions' thresholds λ.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .groups import E2E_LONG_IMPLS, GROUPS, SEED, Case, Group, Unavailable

#: Input image ``[C, H, W]`` of each network of the end-to-end groups.
E2E_MODELS: dict[str, tuple[int, int, int]] = {"cnn7": (1, 28, 28), "vgg16": (3, 32, 32)}
#: Calibration batches of both conversions (the same ones): (number of batches, batch size).
E2E_CALIBRATION = {"cnn7": (4, 64), "vgg16": (2, 32)}
#: Batch of the vgg16 groups on CPU by scale: one vgg16 forward at batch 128 takes ~10 s on 2 cores.
E2E_CPU_VGG16_BATCH = {"full": 8, "small": 2}
#: Set to 1 to run vgg16 at T = 256 on CPU too (CUDA-only by default: ~1 min on 2 cores).
E2E_CPU_ALL_ENV = "RNL_FAST_BENCH_E2E_CPU_ALL"
#: The case whose time ``profile.profile_e2e`` breaks down by op.
E2E_PROFILE_GROUP = "e2e-cnn7-T64"


@dataclass(frozen=True)
class E2EPlan:
    """Batch, T and chunk of one end-to-end case on one device and scale."""

    batch: int
    steps: int
    chunk: int | None  #: steps per chunk asked of ours (None: the engine's choice)
    skip: str = ""  #: why the case does not run here ("" when it does)


def e2e_plan(group: Group, impl: str, device: str, scale: str) -> E2EPlan:
    """The batch and T one end-to-end case runs at here: the nominal ones on CUDA; on CPU vgg16 at
    a small batch, and not at T = 256 (unless ``RNL_FAST_BENCH_E2E_CPU_ALL=1``); ``small``
    divides the CPU batch by 4; ``tiny`` runs T / 32 steps at batch 2 (a dry run)."""
    steps = 64 if impl == "ours-T64" else group.steps
    # ours-one-chunk (CUDA): all T steps in one chunk, to see what the engine's chunking costs
    # there (its per-chunk budget was sized on CPU; on CPU vgg16 runs one chunk anyway).
    chunk = {"ours-chunk64": 64, "ours-one-chunk": steps}.get(impl)
    if scale == "tiny":  # every code path, several chunks included, in seconds
        tiny_steps = max(2, steps // 32)
        if impl == "ours-one-chunk":
            return E2EPlan(2, tiny_steps, tiny_steps)
        return E2EPlan(2, tiny_steps, None if chunk is None else max(1, chunk // 32))
    batch = group.batch
    if device == "cpu":
        if impl == "ours-one-chunk":
            return E2EPlan(batch, steps, chunk, skip="CUDA only (on CPU ours already runs vgg16 in one chunk)")
        batch = E2E_CPU_VGG16_BATCH[scale] if group.model == "vgg16" else batch // (4 if scale == "small" else 1)
        if group.model == "vgg16" and group.steps == 256 and os.environ.get(E2E_CPU_ALL_ENV, "") != "1":
            return E2EPlan(batch, steps, chunk, skip=f"CUDA only ({E2E_CPU_ALL_ENV}=1 runs it on CPU)")
    return E2EPlan(batch, steps, chunk)


def e2e_sizes_text(device: str, scale: str) -> str:
    """One line: the batch and the T's of the end-to-end groups on ``device`` at ``scale``."""
    runs: dict[str, list[str]] = {}
    for group in (g for g in GROUPS if g.op == "e2e"):
        plan = e2e_plan(group, group.impls[0], device, scale)
        label = f"{'long ' if group.impls == E2E_LONG_IMPLS else ''}{group.model} B={plan.batch}"
        runs.setdefault(label, []).append(f"{plan.steps}" + (" (skipped)" if plan.skip else ""))
    return f"end to end [{device}]: " + "; ".join(f"{label} T={', '.join(ts)}" for label, ts in runs.items())


def _builder(model: str) -> Callable[..., torch.nn.Module]:
    from rnl_fast import models

    channels, side, _ = E2E_MODELS[model]
    return functools.partial(models.MODELS[model], in_channels=channels, input_size=side)


def _set_statistics(
    net: torch.nn.Module, shape: tuple[int, ...], freeze_bn: bool = False, batches: int = 4, size: int = 32
) -> None:
    """Realistic BatchNorm statistics (and Rate Norm running maxima): train-mode forwards on
    random data, BN averaging all batches (momentum None), Rate Norm keeping the last batch's max.
    ``freeze_bn``: BN stays in eval mode (its statistics as they are)."""
    from rnl_fast.nn import RateNorm

    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    rate_norms = [m for m in net.modules() if isinstance(m, RateNorm)]
    saved = [m.momentum for m in norms + rate_norms]
    for m in norms:
        m.momentum = None
    for m in rate_norms:
        m.momentum = 1.0
    net.train()
    for m in norms if freeze_bn else ():
        m.eval()
    with torch.no_grad():
        for _ in range(batches):
            net(torch.rand(size, *shape))
    for m, momentum in zip(norms + rate_norms, saved):
        m.momentum = momentum
    net.eval()


@functools.cache
def _net(model: str, activation: str) -> torch.nn.Module:
    """The network on CPU, random weights from a fixed seed, realistic BN statistics, eval mode.
    The RNL build has the ReLU build's weights and BN statistics (BN frozen while its Rate Norm
    running maxima are set)."""
    build, shape = _builder(model), E2E_MODELS[model]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        net = build("relu")
        _set_statistics(net, shape)
        if activation == "rnl":
            relu_net, net = net, build("rnl")
            net.load_state_dict(relu_net.state_dict(), strict=False)  # all but the raw p's and running maxima
            _set_statistics(net, shape, freeze_bn=True)
    return net


@functools.cache
def _ann(model: str, device: str, activation: str = "relu") -> torch.nn.Module:
    import copy

    return copy.deepcopy(_net(model, activation)).to(device)


@functools.cache
def _calibration(model: str) -> list[tuple[Tensor, Tensor]]:
    """Calibration batches ``(x, y)`` on CPU, the same for ours and SpikingJelly's conversion."""
    batches, size = E2E_CALIBRATION[model]
    generator = torch.Generator().manual_seed(SEED + 2)
    shape = E2E_MODELS[model]
    return [
        (torch.rand(size, *shape, generator=generator), torch.zeros(size, dtype=torch.long)) for _ in range(batches)
    ]


@functools.lru_cache(maxsize=4)
def _input(model: str, device: str, batch: int) -> Tensor:
    """The images every impl simulates (drawn on CPU: CPU and CUDA runs see the same ones)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.rand(batch, *E2E_MODELS[model], generator=generator).to(device)


@functools.cache
def _ours(model: str, device: str, method: str) -> Any:
    """``rnl_fast.convert`` of the ReLU net ("maxnorm") or of the RNL net ("rnl")."""
    import rnl_fast

    if method == "rnl":
        return rnl_fast.convert(_ann(model, device, "rnl"), "rnl", device=device)
    return rnl_fast.convert(_ann(model, device), method, calibration=_calibration(model), device=device)


@functools.cache
def _ours_bf16(model: str, device: str) -> Any:
    """The MaxNorm conversion of :func:`_ours` in bf16 (``snn.to(torch.bfloat16)`` on a copy)."""
    import copy

    return copy.deepcopy(_ours(model, device, "maxnorm")).to(torch.bfloat16)


@functools.cache
def _spikingjelly(model: str, device: str) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], None], list[float]]:
    """SpikingJelly 2.0's rate-coding conversion of the ReLU net, its ``reset_net``, and its
    threshold λ per neuron layer (graph order)."""
    import contextlib
    import copy
    import io

    try:
        from spikingjelly.activation_based import ann2snn, functional
        from spikingjelly.activation_based.ann2snn.modules import VoltageScaler
    except ImportError as error:
        raise Unavailable(f"spikingjelly.activation_based.ann2snn is not importable ({error})") from error
    recipe = ann2snn.RateCodingRecipe(_calibration(model), mode="Max")
    with contextlib.redirect_stderr(io.StringIO()):  # its calibration progress bar
        snn = ann2snn.FXConverter(recipe, device=device).convert(copy.deepcopy(_ann(model, device)))
    # Each ReLU became scaler0 (×1/λ) → IFNode(v_th = 1, soft reset) → scaler1 (×λ).
    lambdas = [
        float(m.scale) for name, m in snn.named_modules() if isinstance(m, VoltageScaler) and name.endswith("scaler1")
    ]
    return snn, functional.reset_net, lambdas


def build_e2e_case(group: Group, impl: str, device: str, scale: str) -> Case:
    """The callable of one impl of an end-to-end group at the batch and T of :func:`e2e_plan`.

    Each call stores its output, [B, K], on the case (``case.output``: the mean output over the
    T steps, or the ANN's logits); SpikingJelly's case also carries both conversions' λ's.
    """
    plan = e2e_plan(group, impl, device, scale)
    if plan.skip:
        raise Unavailable(plan.skip)
    x = _input(group.model, device, plan.batch)
    steps = plan.steps
    chunk: int | None = None
    thresholds: tuple[list[float], list[float]] | None = None
    # The closures below store their output on ``case``, which is bound at the end, before any call.
    run: Callable[[], Tensor]
    if impl == "ann":
        ann = _ann(group.model, device)

        def run() -> Tensor:
            with torch.no_grad():
                case.output = ann(x)
            return case.output

    elif impl == "spikingjelly":
        sj, reset_net, sj_lambdas = _spikingjelly(group.model, device)
        ours = _ours(group.model, device, "maxnorm")
        thresholds = ([layer.neurons.v_threshold for layer in ours.neuron_layers.values()], sj_lambdas)

        def run() -> Tensor:
            with torch.no_grad():
                reset_net(sj)
                total = sj(x)
                for _ in range(steps - 1):
                    total += sj(x)
                case.output = total / steps
            return case.output

    else:  # ours, ours-bf16, ours-rnl, ours-chunk64, ours-T64, ours-one-chunk
        snn = _ours(group.model, device, "rnl" if impl == "ours-rnl" else "maxnorm")
        if impl == "ours-bf16":  # the same conversion in bf16 (fp32 images in, fp32 estimates out)
            snn = _ours_bf16(group.model, device)
        chunk = plan.chunk or snn.chunk_size(x, steps)  # the engine's choice when not asked

        def run() -> Tensor:
            out = snn(x, steps, plan.chunk)
            case.output = out[-1]
            return out

    case = Case(
        group,
        impl,
        device,
        tuple(x.shape),
        run,
        bytes_moved=0,
        needs_warmup=device == "cuda",
        steps=steps,
        chunk=chunk,
        thresholds=thresholds,
    )
    return case
