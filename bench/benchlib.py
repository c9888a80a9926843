"""Shared pieces of the rnl_fast benchmarks: sizes, cases, timing, peak memory, targets, tables.

Two drivers run the same cases: the pytest-benchmark files (``pytest bench/ --benchmark-only``,
through ``conftest.py``) and ``gpu_bench.py`` (the one-shot GPU check). A *group* is one piece
of work (e.g. IF forward with fp32 spikes); its *impls* do that work on the same inputs:

- ``ours``: :mod:`rnl_fast.ops` (C++ on CPU tensors, Triton on CUDA tensors);
- ``clone``: ``x.clone()``, the cost of a fresh output of the input's size;
- ``eager``: the pure-PyTorch definition in :mod:`rnl_fast.reference`;
- ``compile``: ``torch.compile`` of that definition (compile time excluded);
- ``spikingjelly``: SpikingJelly 2.0's ``IFNode(v_reset=None, step_mode="m")``.

The end-to-end groups (``op="e2e"``: a converted network simulated over T steps) have their own
impls: ``ours`` (``rnl_fast.convert(relu_model, "maxnorm")`` then ``snn(x, T)``), ``ours-rnl``
(the same net built with Rate Norm Layers, ``convert(rnl_model, "rnl")``), ``ann`` (one forward
of the ANN: the unit of the end-to-end figures) and ``spikingjelly`` (SpikingJelly 2.0's
``ann2snn`` rate-coding conversion of the same ReLU net, stepped T times).

Absolute times on shared machines are noise (DESIGN.md §5): the figures are the ratios measured
side by side in one run, and achieved GB/s counted on the bytes the op must move.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rnl_fast import ops, reference
from rnl_fast.reference import OMEGA_EPS

# SpikingJelly 2.0's IFNode has no ``backend=`` argument: it dispatches by device, and on CUDA
# reads its implementation (auto | cuda | triton | torch) from this variable when it is imported
# (here, lazily, after this line). Triton is the GPU path to compare with: its native "cuda" path
# exists only in a wheel built with SJ_BUILD_NATIVE_CUDA=1, and its cupy backend is gone.
os.environ.setdefault("SJ_IF_CUDA_IMPLEMENTATION", "triton")

SCALES = ("full", "small", "tiny")
IMPLS = ("ours", "clone", "eager", "compile", "spikingjelly")
#: Impls of the fused IF + 2×2 average pooling group: also ours unfused (IF op, then pooling).
POOL_IMPLS = ("ours", "ours-unfused", "clone", "eager", "compile", "spikingjelly")
#: Impls of the end-to-end groups; the ReLU-only ones for the nets whose RNL build is not timed.
E2E_IMPLS = ("ours", "ours-rnl", "spikingjelly", "ann")
E2E_RELU_IMPLS = ("ours", "ours-one-chunk", "spikingjelly", "ann")
#: Impls of the chunked long run: ours at T = 1024 (the engine's chunks, then 64-step chunks)
#: beside ours at T = 64 on the same batch.
E2E_LONG_IMPLS = ("ours", "ours-chunk64", "ours-T64")
#: Rate Norm momentum and input seed, the same for every impl.
RNL_MOMENTUM = 0.1
SEED = 20210801


class Unavailable(Exception):
    """A baseline that cannot run here (not installed, compile failed): skipped, not an error."""


# ─── sizes ──────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run."""

    steps: int  #: T of the IF benchmarks
    neurons: int  #: N of the IF benchmarks (x is [T, N])
    rnl_shape: tuple[int, ...]  #: input shape of the Rate Norm benchmark


def bench_scale() -> str:
    """``RNL_FAST_BENCH_SCALE``: ``full`` (default), ``small`` (quick run) or ``tiny`` (dry run)."""
    scale = os.environ.get("RNL_FAST_BENCH_SCALE", "full").strip().lower() or "full"
    if scale not in SCALES:
        raise ValueError(f"RNL_FAST_BENCH_SCALE must be one of {SCALES}, got {scale!r}")
    return scale


def sizes_for(device: str, scale: str) -> Sizes:
    """T = 32 everywhere but ``tiny``; 2M neurons on CPU and 16M on CUDA at ``full`` scale."""
    if scale == "tiny":  # odd sizes and few steps: exercises every code path in seconds
        return Sizes(steps=4, neurons=1000, rnl_shape=(2, 3, 5, 7))
    if scale == "small":
        return Sizes(steps=32, neurons=2**16, rnl_shape=(16, 32, 28, 28))
    return Sizes(steps=32, neurons=2**24 if device == "cuda" else 2**21, rnl_shape=(128, 32, 28, 28))


# ─── groups and cases ───────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Group:
    """One piece of work, done by each of ``impls`` on the same inputs."""

    name: str
    title: str
    op: str  #: "if" or "rate_norm"
    dtype: torch.dtype  #: dtype of x
    spike_dtype: torch.dtype | None  #: IF spike dtype (None: x.dtype)
    backward: bool  #: forward + backward instead of inference forward
    impls: tuple[str, ...]
    #: End-to-end groups only: the network (a key of E2E_MODELS), the nominal T and batch.
    model: str = ""
    steps: int = 0
    batch: int = 0
    #: IF groups: the spikes averaged over 2×2 windows (x is [T, planes, H, W]), as a converted
    #: CNN's "neurons → AvgPool2d(2)"; ours runs the fused op.
    pool: bool = False


GROUPS: tuple[Group, ...] = (
    Group("if-fwd-fp32", "IF forward, fp32 spikes", "if", torch.float32, None, False, IMPLS),
    # SpikingJelly cannot write byte spikes; its fp32 figure is in if-fwd-fp32.
    Group("if-fwd-uint8", "IF forward, uint8 spikes", "if", torch.float32, torch.uint8, False, IMPLS[:4]),
    Group("if-fwd-bf16", "IF forward, bf16 in, bf16 spikes", "if", torch.bfloat16, None, False, IMPLS),
    Group("if-fwd-bwd-fp32", "IF forward+backward, fp32", "if", torch.float32, None, True, IMPLS),
    Group("if-pool-fwd-fp32", "IF forward then 2x2 average pooling of the spikes, fp32", "if", torch.float32,
          None, False, POOL_IMPLS, pool=True),
    Group("rnl-fwd-bwd-fp32", "Rate Norm forward+backward, loss (r*w).sum() + Omega", "rate_norm",
          torch.float32, None, True, IMPLS[:4]),
    # End to end: a converted network simulated over T steps on a constant input (see the e2e
    # section below for the impls and for the batch and T actually run on each device and scale).
    *(Group(f"e2e-{model}-T{steps}", f"{model} end to end, T = {steps}", "e2e", torch.float32, None, False,
            E2E_IMPLS if model == "cnn7" else E2E_RELU_IMPLS, model, steps, 128)
      for model in ("cnn7", "vgg16") for steps in (16, 64, 256)),
    Group("e2e-cnn7-long", "cnn7 chunked long run, T = 1024 beside T = 64", "e2e", torch.float32, None, False,
          E2E_LONG_IMPLS, "cnn7", 1024, 16),
)  # fmt: skip
GROUPS_BY_NAME = {group.name: group for group in GROUPS}


def bytes_moved(group: Group, x: Tensor) -> int:
    """Bytes the op must move at the least (the GB/s figures count these).

    - IF forward: read x once, write the spikes once; with pooling, write a quarter of them.
    - IF forward+backward: the forward above, then the backward reads x (to recompute the
      membrane) and the spike gradient and writes grad_x.
    - Rate Norm forward+backward: the forward reads x twice (max pass, then output pass) and
      writes r; the backward reads x and grad_r and writes grad_x.
    """
    n, x_bytes = x.numel(), x.element_size()
    if group.op == "rate_norm":
        return 6 * n * x_bytes
    spike_bytes = (group.spike_dtype or group.dtype).itemsize
    forward = n * x_bytes + (n // 4 if group.pool else n) * spike_bytes
    return forward + 3 * n * x_bytes if group.backward else forward


@dataclass
class Case:
    """One impl of one group, ready to run: ``run()`` does one call and returns its outputs."""

    group: Group
    impl: str
    device: str
    shape: tuple[int, ...]
    run: Callable[[], Any]
    bytes_moved: int
    #: torch.compile and Triton autotuning happen on the first call: keep it out of every figure.
    needs_warmup: bool
    steps: int = 0  #: T of an end-to-end case (0 elsewhere)
    chunk: int | None = None  #: steps per chunk of an end-to-end case (None: the engine's choice)


@functools.lru_cache(maxsize=2)  # consecutive cases of one group share their inputs (+ the priming ones)
def _inputs(group_name: str, device: str, sizes: Sizes) -> dict[str, Tensor]:
    """The inputs of a group, drawn from a fixed seed: every impl sees the same tensors."""
    group = GROUPS_BY_NAME[group_name]
    generator = torch.Generator(device=device).manual_seed(SEED)

    def randn(shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), generator=generator, device=device)

    if group.op == "if":
        # Mean 0.3 per step: most neurons fire now and then (rates near 0.3), as in a converted net.
        shape = (sizes.steps, *_pool_planes(sizes.neurons)) if group.pool else (sizes.steps, sizes.neurons)
        x = (randn(shape) * 0.5 + 0.3).to(group.dtype)
        inputs = {"x": x.requires_grad_(group.backward)}
        if group.backward:
            inputs["grad_spikes"] = randn(x.shape).to(group.dtype)
        return inputs
    return {
        "x": randn(sizes.rnl_shape).requires_grad_(True),
        "weight": randn(sizes.rnl_shape),  # the loss (r * weight).sum() gives a dense grad_r
        "raw_p": torch.tensor(2.0, device=device, requires_grad=True),  # p ≈ 0.88: some x clip
        "running_max": torch.tensor(1.0, device=device),
    }


def _spikingjelly_if() -> Callable[[Tensor], Tensor]:
    """SpikingJelly 2.0's soft-reset IF node, reset before each call like ours starts from v = 0."""
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate
    except ImportError as error:
        raise Unavailable(f"spikingjelly is not importable ({error})") from error
    # ATan(alpha=2) is the surrogate of ours with surrogate="atan", width=1: same gradients.
    node = neuron.IFNode(v_reset=None, step_mode="m", surrogate_function=surrogate.ATan())

    def run(x: Tensor) -> Tensor:
        functional.reset_net(node)
        return node(x)

    return run


def _if_spikes_fn(impl: str, spike_dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    """``x [T, N] → spikes [T, N]`` for one impl; all use v_th = 1, v_init = 0, soft reset, atan."""
    if impl == "ours":
        return lambda x: ops.if_sequence(x, spike_dtype=spike_dtype).spikes
    if impl == "eager":
        return lambda x: reference.if_sequence(x, spike_dtype=spike_dtype)[0]
    if impl == "compile":
        # dynamic=False: a second shape (CPU then CUDA sizes) must not switch to symbolic shapes.
        compiled = torch.compile(reference.if_sequence, dynamic=False)
        return lambda x: compiled(x, spike_dtype=spike_dtype)[0]
    if impl == "spikingjelly":
        return _spikingjelly_if()
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _pool_planes(neurons: int) -> tuple[int, int, int]:
    """The neurons of the pooling group as [planes, H, W]: 32 × 32 planes (odd 7 × 9 ones when tiny)."""
    return (neurons // 1024, 32, 32) if neurons >= 1024 else (max(1, neurons // 63), 7, 9)


def _if_pool_fn(impl: str) -> Callable[[Tensor], Tensor]:
    """``x [T, P, H, W] → avg_pool2d(spikes, 2) [T, P, H/2, W/2]`` for one impl (v_th = 1, soft reset)."""
    pool = reference.avg_pool2x2  # the unfused impls' spikes are fp32, as x
    if impl == "ours":
        return lambda x: ops.if_sequence_pool2x2(x).spikes
    if impl == "ours-unfused":
        return lambda x: pool(ops.if_sequence(x).spikes)
    if impl == "eager":
        return lambda x: reference.if_sequence_pool2x2(x)[0]
    if impl == "compile":
        compiled = torch.compile(reference.if_sequence_pool2x2, dynamic=False)
        return lambda x: compiled(x)[0]
    if impl == "spikingjelly":
        node = _spikingjelly_if()
        return lambda x: pool(node(x))
    raise ValueError(f"impl must be one of {POOL_IMPLS}, got {impl!r}")


def _rnl_loss(rate_norm_fn: Callable, x: Tensor, raw_p: Tensor, running_max: Tensor, weight: Tensor) -> Tensor:
    """A training step's loss through one Rate Norm Layer: ``(r̂·weight).sum() + Ω`` (paper Eq. 8)."""
    r, _, sum_r, sum_r2 = rate_norm_fn(x, raw_p, running_max, RNL_MOMENTUM, True)
    return (r * weight).sum() + sum_r / (sum_r2 + OMEGA_EPS)


def _rnl_loss_fn(impl: str) -> Callable[..., Tensor]:
    if impl == "ours":
        return functools.partial(_rnl_loss, ops.rate_norm)
    if impl == "eager":
        return functools.partial(_rnl_loss, reference.rate_norm)
    if impl == "compile":  # the whole loss, so that inductor may fuse it with the layer
        return torch.compile(functools.partial(_rnl_loss, reference.rate_norm), dynamic=False)
    raise ValueError(f"Rate Norm impl must be ours, eager or compile, got {impl!r}")


#: (group, impl, device) already called once in this process (see build_case).
_PRIMED: set[tuple[str, str, str]] = set()


def build_case(group_name: str, impl: str, device: str, scale: str) -> Case:
    """The callable of one impl of one group; raises :class:`Unavailable` for a missing baseline."""
    if group_name not in GROUPS_BY_NAME:
        raise ValueError(f"group must be one of {sorted(GROUPS_BY_NAME)}, got {group_name!r}")
    group = GROUPS_BY_NAME[group_name]
    if impl not in group.impls:
        raise ValueError(f"impl of {group_name} must be one of {group.impls}, got {impl!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("CUDA is not available")
    if group.op == "e2e":
        return _build_e2e_case(group, impl, device, scale)
    inputs = _inputs(group_name, device, sizes_for(device, scale))
    x = inputs["x"]
    run: Callable[[], Any]
    if impl == "clone":
        x_value = x.detach()
        run = x_value.clone
        moved = 2 * x_value.nbytes
    elif group.op == "if":
        spikes_of = _if_pool_fn(impl) if group.pool else _if_spikes_fn(impl, group.spike_dtype)
        if group.backward:
            grad_spikes = inputs["grad_spikes"]

            def run() -> Tensor:
                return torch.autograd.grad(spikes_of(x), x, grad_spikes)[0]

        else:

            def run() -> Tensor:
                with torch.no_grad():
                    return spikes_of(x)

        moved = bytes_moved(group, x)
    else:
        loss_of = _rnl_loss_fn(impl)
        raw_p, running_max, weight = inputs["raw_p"], inputs["running_max"], inputs["weight"]

        def run() -> tuple[Tensor, ...]:
            return torch.autograd.grad(loss_of(x, raw_p, running_max, weight), (x, raw_p))

        moved = bytes_moved(group, x)
    if impl != "compile" and (group_name, impl, device) not in _PRIMED:
        # The first call of an impl in a process loads modules, starts thread pools and fills
        # caches (ours: +160 MB of RSS on CPU); a tiny call takes that out of every figure.
        # Not for compile: its warm-up on the real inputs is the compilation itself.
        _PRIMED.add((group_name, impl, device))
        build_case(group_name, impl, device, "tiny").run()
    return Case(
        group=group,
        impl=impl,
        device=device,
        shape=tuple(x.shape),
        run=run,
        bytes_moved=moved,
        needs_warmup=impl == "compile" or device == "cuda",
    )



# ─── end to end ─────────────────────────────────────────────────────────────────────────────
#
# A converted network simulated over T steps on a constant input (every step sees the image),
# the same batch for every impl. ``ours``: ``rnl_fast.convert(relu_net, "maxnorm")`` then
# ``snn(x, T)``; ``ours-rnl``: the same net built with Rate Norm Layers, ``convert(rnl_net,
# "rnl")``; ``ann``: one forward of the ReLU net (the unit of the "x ANN fwd" column);
# ``spikingjelly``: SpikingJelly 2.0's ``FXConverter(RateCodingRecipe(loader, mode="Max"))`` of
# the same ReLU net, stepped T times (``out += snn(x)``) after ``functional.reset_net``. Ours and
# SpikingJelly's are the same algorithm (MaxNorm threshold balancing, soft-reset IF neurons), so
# the work is the same; their calibrations differ in a detail (SpikingJelly's "Max" is a
# momentum average of the batch maxima, ours the plain maximum), hence the agreement figures of
# :func:`e2e_checks` rather than an equality check.

#: Input image ``[C, H, W]`` of each network of the end-to-end groups.
E2E_MODELS: dict[str, tuple[int, int, int]] = {"cnn7": (1, 28, 28), "vgg16": (3, 32, 32)}
#: Calibration batches of both conversions (the same ones): (number of batches, batch size).
E2E_CALIBRATION = {"cnn7": (4, 64), "vgg16": (2, 32)}
#: Batch of the vgg16 groups on CPU by scale: one vgg16 forward at batch 128 takes ~10 s on 2 cores.
E2E_CPU_VGG16_BATCH = {"full": 8, "small": 2}
#: Set to 1 to run vgg16 at T = 256 on CPU too (CUDA-only by default: ~1 min on 2 cores).
E2E_CPU_ALL_ENV = "RNL_FAST_BENCH_E2E_CPU_ALL"
#: An end-to-end call longer than this (seconds) gets a single timed round (see measure_case).
E2E_SLOW_CALL_S = 5.0
#: The case whose time :func:`profile_e2e` breaks down by op.
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


def _e2e_builder(model: str) -> Callable[..., torch.nn.Module]:
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
def _e2e_net(model: str, activation: str) -> torch.nn.Module:
    """The network on CPU, random weights from a fixed seed, realistic BN statistics, eval mode.
    The RNL build has the ReLU build's weights and BN statistics (BN frozen while its Rate Norm
    running maxima are set)."""
    build, shape = _e2e_builder(model), E2E_MODELS[model]
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
def _e2e_ann(model: str, device: str, activation: str = "relu") -> torch.nn.Module:
    import copy

    return copy.deepcopy(_e2e_net(model, activation)).to(device)


@functools.cache
def _e2e_calibration(model: str) -> list[tuple[Tensor, Tensor]]:
    """Calibration batches ``(x, y)`` on CPU, the same for ours and SpikingJelly's conversion."""
    batches, size = E2E_CALIBRATION[model]
    generator = torch.Generator().manual_seed(SEED + 2)
    return [(torch.rand(size, *E2E_MODELS[model], generator=generator), torch.zeros(size, dtype=torch.long))
            for _ in range(batches)]  # fmt: skip


@functools.lru_cache(maxsize=4)
def _e2e_input(model: str, device: str, batch: int) -> Tensor:
    """The images every impl simulates (drawn on CPU: CPU and CUDA runs see the same ones)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.rand(batch, *E2E_MODELS[model], generator=generator).to(device)


@functools.cache
def _e2e_ours(model: str, device: str, method: str) -> Any:
    """``rnl_fast.convert`` of the ReLU net ("maxnorm") or of the RNL net ("rnl")."""
    import rnl_fast

    if method == "rnl":
        return rnl_fast.convert(_e2e_ann(model, device, "rnl"), "rnl", device=device)
    return rnl_fast.convert(_e2e_ann(model, device), method, calibration=_e2e_calibration(model), device=device)


#: (model, device) → (λ per neuron layer of ours, of SpikingJelly's), in graph order.
_E2E_LAMBDAS: dict[tuple[str, str], tuple[list[float], list[float]]] = {}


@functools.cache
def _e2e_spikingjelly(model: str, device: str) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], None]]:
    """SpikingJelly 2.0's rate-coding conversion of the ReLU net, and its ``reset_net``."""
    import contextlib
    import copy
    import io

    try:
        from spikingjelly.activation_based import ann2snn, functional
        from spikingjelly.activation_based.ann2snn.modules import VoltageScaler
    except ImportError as error:
        raise Unavailable(f"spikingjelly.activation_based.ann2snn is not importable ({error})") from error
    recipe = ann2snn.RateCodingRecipe(_e2e_calibration(model), mode="Max")
    with contextlib.redirect_stderr(io.StringIO()):  # its calibration progress bar
        snn = ann2snn.FXConverter(recipe, device=device).convert(copy.deepcopy(_e2e_ann(model, device)))
    # Each ReLU became scaler0 (×1/λ) → IFNode(v_th = 1, soft reset) → scaler1 (×λ).
    sj_lambdas = [float(m.scale) for name, m in snn.named_modules()
                  if isinstance(m, VoltageScaler) and name.endswith("scaler1")]  # fmt: skip
    ours_lambdas = [layer.neurons.v_threshold for layer in _e2e_ours(model, device, "maxnorm").neuron_layers.values()]
    _E2E_LAMBDAS[(model, device)] = (ours_lambdas, sj_lambdas)
    return snn, functional.reset_net


#: (group, device, impl) → (x shape, T, output of the last call: ours' and SpikingJelly's mean
#: output over the T steps, the ANN's logits), for :func:`e2e_checks`: the timed calls are the checked ones.
_E2E_OUTPUTS: dict[tuple[str, str, str], tuple[tuple[int, ...], int, Tensor]] = {}


def _build_e2e_case(group: Group, impl: str, device: str, scale: str) -> Case:
    plan = e2e_plan(group, impl, device, scale)
    if plan.skip:
        raise Unavailable(plan.skip)
    x = _e2e_input(group.model, device, plan.batch)
    steps, key = plan.steps, (group.name, device, impl)
    chunk: int | None = None
    run: Callable[[], Tensor]
    if impl == "ann":
        ann = _e2e_ann(group.model, device)

        def run() -> Tensor:
            with torch.no_grad():
                out = ann(x)
            _E2E_OUTPUTS[key] = (tuple(x.shape), steps, out)
            return out

    elif impl == "spikingjelly":
        sj, reset_net = _e2e_spikingjelly(group.model, device)

        def run() -> Tensor:
            with torch.no_grad():
                reset_net(sj)
                total = sj(x)
                for _ in range(steps - 1):
                    total += sj(x)
                out = total / steps
            _E2E_OUTPUTS[key] = (tuple(x.shape), steps, out)
            return out

    else:  # ours, ours-rnl, ours-chunk64, ours-T64, ours-one-chunk
        snn = _e2e_ours(group.model, device, "rnl" if impl == "ours-rnl" else "maxnorm")
        chunk = plan.chunk or snn.chunk_size(x, steps)  # the engine's choice when not asked

        def run() -> Tensor:
            out = snn(x, steps, plan.chunk)
            _E2E_OUTPUTS[key] = (tuple(x.shape), steps, out[-1])
            return out

    if (group.name, impl, device) not in _PRIMED:  # see build_case: a tiny call first
        _PRIMED.add((group.name, impl, device))
        _build_e2e_case(group, impl, device, "tiny").run()
    return Case(group, impl, device, tuple(x.shape), run, bytes_moved=0, needs_warmup=device == "cuda",
                steps=steps, chunk=chunk)  # fmt: skip


def e2e_sizes_text(device: str, scale: str) -> str:
    """One line: the batch and the T's of the end-to-end groups on ``device`` at ``scale``."""
    runs: dict[str, list[str]] = {}
    for group in (g for g in GROUPS if g.op == "e2e"):
        plan = e2e_plan(group, group.impls[0], device, scale)
        label = f"{'long ' if group.impls == E2E_LONG_IMPLS else ''}{group.model} B={plan.batch}"
        runs.setdefault(label, []).append(f"{plan.steps}" + (" (skipped)" if plan.skip else ""))
    return f"end to end [{device}]: " + "; ".join(f"{label} T={', '.join(ts)}" for label, ts in runs.items())


def _centred_corr(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two [B, K] outputs, each centred per class over the batch (so that
    a bias common to all images does not count as agreement)."""
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def e2e_checks(measurements: Sequence[Measurement]) -> list[str]:
    """Agreement of the outputs of the timed calls (same images, same T): argmax predictions of
    ours / SpikingJelly's / the ANN's, centred correlation of the outputs, and how far apart the
    two conversions' thresholds λ are. Printed, not asserted."""
    table = []
    for device, group, rows in _by_group(measurements):
        if group.op != "e2e" or "spikingjelly" not in group.impls:
            continue
        outs: dict[str, Tensor] = {}
        for impl in ("ours", "spikingjelly", "ann"):
            m, record = rows.get(impl), _E2E_OUTPUTS.get((group.name, device, impl))
            if m and m.median_s and record and record[:2] == (m.shape, m.steps):
                outs[impl] = record[2].detach().float().cpu()
        if len(outs) < 2:
            continue

        def agree(a: str, b: str) -> str:
            if a not in outs or b not in outs:
                return "-"
            return f"{(outs[a].argmax(-1) == outs[b].argmax(-1)).float().mean().item():.1%}"

        def corr(a: str, b: str) -> str:
            return "-" if a not in outs or b not in outs else f"{_centred_corr(outs[a], outs[b]):.3f}"

        lambdas = _E2E_LAMBDAS.get((group.model, device))
        if lambdas and len(lambdas[0]) == len(lambdas[1]):
            gap = max(abs(sj / ours - 1) for ours, sj in zip(*lambdas))
            lam = f"{gap:.1%} ({len(lambdas[0])} layers)"
        else:
            lam = "-" if not lambdas else f"layer counts differ: {len(lambdas[0])} vs {len(lambdas[1])}"
        first = next(iter(outs.values()))
        table.append([
            f"{group.name} [{device}]", f"B={first.shape[0]}",
            agree("ours", "spikingjelly"), agree("ours", "ann"), agree("spikingjelly", "ann"),
            corr("ours", "spikingjelly"), corr("ours", "ann"), corr("spikingjelly", "ann"), lam,
        ])  # fmt: skip
    if not table:
        return []
    header = ["run", "batch", "argmax ours=SJ", "ours=ANN", "SJ=ANN", "r ours~SJ", "r ours~ANN", "r SJ~ANN",
              "max |λ_SJ/λ_ours - 1|"]  # fmt: skip
    return [
        *_format_table(header, table),
        "",
        "argmax: share of images with the same prediction; r: correlation of the outputs (mean output over",
        "the T steps; the ANN's logits), centred per class over the batch. The outputs are the timed calls'.",
    ]


def _e2e_group_table(device: str, group: Group, rows: dict[str, Measurement]) -> list[str]:
    ours, ann = rows.get("ours"), rows.get("ann")
    notes = {m.note for m in rows.values()}
    if not any(m.median_s for m in rows.values()) and len(notes) == 1:  # the whole group skipped here
        return ["", f"### {group.name} [{device}]: {group.title}: skipped: {notes.pop()}"]
    table = []
    for impl in (impl for impl in group.impls if impl in rows):
        m = rows[impl]
        table.append([
            impl,
            "1 fwd" if impl == "ann" else m.steps or "-",
            m.chunk or "-",
            ms_text(m.median_s),
            "-" if not (m.median_s and m.steps and impl != "ann") else ms_text(m.median_s / m.steps),
            "-" if not (m.median_s and ours and ours.median_s) else f"{m.median_s / ours.median_s:.2f}",
            "-" if not (m.median_s and ann and ann.median_s) else f"{m.median_s / ann.median_s:.1f}",
            mb_text(m.peak_bytes),
            m.rounds or "-",
            m.note,
        ])  # fmt: skip
    shape = next((shape_text(m) for m in rows.values() if m.shape), "-")
    header = ["impl", "T", "chunk", "median ms", "ms / step", "t / t_ours", "x ANN fwd", "peak MB", "rounds", "note"]
    return [
        "",
        f"### {group.name} [{device}]: {group.title}; {shape}",
        *_format_table(header, table),
        *[f"- target: {evaluate_target(t, rows, None)}" for t in _targets_of(group, device)],
    ]


def e2e_summary(measurements: Sequence[Measurement]) -> list[str]:
    """The end-to-end figures in one table (times as multiples of one ANN forward), the long run,
    the agreement checks, and the end-to-end targets."""
    table, long_lines, targets = [], [], []
    for device, group, rows in _by_group(measurements):
        if group.op != "e2e":
            continue
        targets += [f"- {group.name} [{device}] {evaluate_target(t, rows, None)}" for t in _targets_of(group, device)]
        ours, ann = rows.get("ours"), rows.get("ann")
        notes = {m.note for m in rows.values()}
        if not any(m.median_s for m in rows.values()) and len(notes) == 1:  # the whole group skipped here
            table.append([f"{group.name} [{device}]", f"skipped: {notes.pop()}", *["-"] * 7])
            continue
        if group.impls == E2E_LONG_IMPLS:
            for impl in group.impls:
                m = rows.get(impl)
                if m is not None:
                    figure = m.note if not m.median_s else (
                        f"{ms_text(m.median_s)} ms ({ms_text(m.median_s / m.steps)} ms / step), "
                        f"peak {mb_text(m.peak_bytes)} MB")  # fmt: skip
                    where = f"{group.name} [{device}] {impl}: T = {m.steps}, chunk {m.chunk or '-'}"
                    long_lines.append(f"- {where}: {figure}")
            continue

        def versus_ann(impl: str) -> str:
            m = rows.get(impl)
            if m is None:
                return "-"
            if not m.median_s:
                return f"n/a ({m.note[:40]})"
            return ms_text(m.median_s) + (f" ({m.median_s / ann.median_s:.1f}x)" if ann and ann.median_s else "")

        sj = rows.get("spikingjelly")
        table.append([
            f"{group.name} [{device}]",
            next((shape_text(m) for m in rows.values() if m.shape), "-"),
            ms_text(ann.median_s) if ann else "-",
            versus_ann("ours"),
            versus_ann("ours-rnl"),
            versus_ann("spikingjelly"),
            "-" if not (sj and sj.median_s and ours and ours.median_s) else f"{sj.median_s / ours.median_s:.2f}",
            mb_text(ours.peak_bytes if ours else None),
            mb_text(sj.peak_bytes if sj else None),
        ])  # fmt: skip
    header = ["run", "x", "ANN fwd ms", "ours ms (x ANN)", "ours-rnl ms (x ANN)", "SJ ms (x ANN)", "SJ / ours",
              "peak MB ours", "peak MB SJ"]  # fmt: skip
    lines = []
    if table:
        lines += [*_format_table(header, table), "",
                  "(x ANN) = time / one ANN forward on the same batch. SJ / ours: above 1, ours is faster."]
    if long_lines:
        lines += ["", "Chunked long run (cnn7; ours at T = 1024 beside ours at T = 64, same batch):", *long_lines]
    checks = e2e_checks(measurements)
    if checks:
        lines += ["", "Agreement of the outputs (not timed; the same images and T):", *checks]
    if targets:
        lines += ["", "End-to-end targets (printed, not asserted):", *targets]
    return lines


_PROFILE_CATEGORIES = (  # first match wins: (label, regex on the lower-cased op or kernel name)
    ("conv", r"conv|cudnn|winograd|implicit_gemm|xmma|mkldnn"),
    ("IF", r"if_forward|if_sequence|rnl_fast"),
    ("avgpool", r"avg_pool|avgpool"),
    ("copies", r"copy|clone|\bcat\b|contiguous|_to_copy|empty_strided|fill_"),
    ("linear", r"addmm|gemm|linear|matmul|\bmm\b"),
    ("elementwise", r"mul|div|add|cumsum|arange|elementwise"),
)


def profile_e2e(group_name: str, device: str, scale: str, top: int = 10) -> list[str]:
    """Where the time of one call of ours goes: torch.profiler over one call (after a warm-up),
    the top ops by self CPU time (CUDA: self device time) and the share of each kind of op."""
    from torch.profiler import ProfilerActivity, profile

    case = build_case(group_name, "ours", device, scale)
    case.run()
    synchronize(device)
    gc.collect()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        case.run()
        synchronize(device)
    wall = time.perf_counter() - start
    attr, what = ("self_device_time_total", "self CUDA") if device == "cuda" else ("self_cpu_time_total", "self CPU")
    events = [e for e in prof.key_averages(group_by_input_shape=True) if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) or 1.0
    shares: dict[str, float] = {}
    for e in events:
        label = next((label for label, pattern in _PROFILE_CATEGORIES if re.search(pattern, e.key.lower())), "other")
        shares[label] = shares.get(label, 0.0) + getattr(e, attr) / total

    def first_input(e: Any) -> str:  # the shape of the op's first tensor input
        shapes = [shape for shape in (getattr(e, "input_shapes", None) or []) if shape]
        return f"[{', '.join(map(str, shapes[0]))}]" if shapes else "-"

    rows = [[e.key[:60], first_input(e), f"{getattr(e, attr) / 1e3:.1f}", f"{getattr(e, attr) / total:.1%}", e.count]
            for e in events[:top]]  # fmt: skip
    by_kind = ", ".join(f"{label} {share:.0%}" for label, share in sorted(shares.items(), key=lambda kv: -kv[1]))
    return [
        f"ours, {group_name} [{device}], x [{', '.join(map(str, case.shape))}], T = {case.steps} "
        f"(chunk {case.chunk}): one call under torch.profiler, {wall * 1e3:.0f} ms wall, {what} time "
        f"{total / 1e3:.0f} ms in all",
        f"- by kind: {by_kind}",
        *_format_table(["op", "first input", f"{what} ms", "share", "calls"], rows),
    ]



# ─── timing and memory ──────────────────────────────────────────────────────────────────────


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synced(run: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``run`` that returns only when the device is done: what a host-side timer must time."""
    if device != "cuda":
        return run

    def run_synced() -> Any:
        out = run()
        torch.cuda.synchronize()
        return out

    return run_synced


def _proc_status_kb(name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{name}:\s+(\d+) kB", status.read(), re.M).group(1))


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)``: hands freed heap pages back to the system (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_memory(run: Callable[[], Any], device: str) -> tuple[int | None, float]:
    """Runs ``run`` once; returns (peak memory growth in bytes or None, seconds the call took).

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call. CPU:
    peak resident set (VmHWM, reset through /proc/self/clear_refs) above the RSS before the
    call, after handing freed heap pages back so that reused free memory cannot hide growth.
    The outputs are alive at the end of the call, so they count.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before
    else:
        _malloc_trim()
        can_measure = _reset_peak_rss()
        before_kb = _proc_status_kb("VmRSS")
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        peak = (_proc_status_kb("VmHWM") - before_kb) * 1024 if can_measure else None
    del out
    return peak, seconds


def rounds_for(first_call_s: float, budget_s: float, min_rounds: int = 2, max_rounds: int = 50) -> int:
    """Timed rounds that fit ``budget_s``: many for fast calls, ``min_rounds`` for slow baselines."""
    return max(min_rounds, min(max_rounds, int(budget_s / max(first_call_s, 1e-9))))


def time_calls(run: Callable[[], Any], device: str, rounds: int) -> float:
    """Median seconds of one call over ``rounds`` calls (CUDA events on CUDA, no host sync between)."""
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        torch.cuda.synchronize()
        for start, end in zip(starts, ends):
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends)) / 1e3
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def copy_bandwidth_gbps(device: str, nbytes: int, rounds: int = 20) -> float:
    """Achieved GB/s of ``dst.copy_(src)`` into a preallocated buffer, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # fill: fault its pages in before timing
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    seconds = time_calls(lambda: dst.copy_(src), device, rounds)
    return 2 * src.nbytes / seconds / 1e9


@dataclass
class Measurement:
    """The figures of one case."""

    group: str
    impl: str
    device: str
    shape: tuple[int, ...]
    dtype: str
    median_s: float | None
    bytes_moved: int
    peak_bytes: int | None
    rounds: int = 0
    note: str = ""  #: why there is no figure (skipped baseline, error)
    steps: int = 0  #: T of an end-to-end case (0 elsewhere)
    chunk: int | None = None  #: steps per chunk of an end-to-end case (None: the engine's choice)

    @property
    def gbps(self) -> float | None:
        return None if not self.median_s else self.bytes_moved / self.median_s / 1e9


def measure_case(
    case: Case, time_rounds: Callable[[Callable[[], Any], int], float | None], budget_s: float
) -> Measurement:
    """Warm-up (when needed), one call for peak memory, then the timed rounds.

    ``time_rounds(run, rounds)`` returns the median seconds of one call: pytest-benchmark's
    pedantic mode on ``synced(run)`` (a host timer), or :func:`time_calls` (CUDA events).
    A failing ``torch.compile`` raises :class:`Unavailable`: the baseline is skipped.
    """
    if case.needs_warmup:
        try:
            case.run()
            synchronize(case.device)
        except Exception as error:
            if case.impl != "compile":
                raise
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            raise Unavailable(f"torch.compile failed: {type(error).__name__}: {first_line}") from error
    # Without a separate warm-up, the peak-memory call is the warm-up (first-call page faults and
    # lazy initialisation stay out of the timed rounds); its duration sizes the rounds.
    peak, first_s = peak_memory(case.run, case.device)
    # An end-to-end call of seconds (SpikingJelly at T = 256 on CPU: ~4 s, a minute on busy
    # cores) gets one timed round after the peak-memory call, which was its warm-up.
    slow = case.group.op == "e2e" and first_s > E2E_SLOW_CALL_S
    rounds = rounds_for(first_s, budget_s, min_rounds=1 if slow else 2)
    median_s = time_rounds(case.run, rounds)
    return Measurement(
        group=case.group.name,
        impl=case.impl,
        device=case.device,
        shape=case.shape,
        dtype=str(case.group.dtype).removeprefix("torch."),
        median_s=median_s,
        bytes_moved=case.bytes_moved,
        peak_bytes=peak,
        rounds=rounds,
        steps=case.steps,
        chunk=case.chunk,
    )


def skipped(group: Group, impl: str, device: str, note: str) -> Measurement:
    """The table row of a case that could not run."""
    dtype = str(group.dtype).removeprefix("torch.")
    return Measurement(group.name, impl, device, (), dtype, median_s=None, bytes_moved=0, peak_bytes=None, note=note)


# ─── targets ────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Target:
    """A figure to print beside the measurement; not an assertion (benchmarks are not tests)."""

    group: str
    device: str
    #: "time_at_most": t_ours / t_baseline ≤ value; "faster_by": t_baseline / t_ours ≥ value;
    #: "copy_bw": GB/s of ours ≥ value × copy bandwidth; "peak_at_most": peak ours ≤ value × baseline's
    #: "linear_in_T_at_most": (t / t_baseline) / (T / T_baseline) ≤ value (end to end);
    #: "peak_above_at_most": peak − baseline's peak ≤ value MB (end to end)
    kind: str
    value: float
    baseline: str = ""
    subject: str = "ours"  #: the impl held to the target


TARGETS: tuple[Target, ...] = (
    Target("if-fwd-fp32", "cpu", "time_at_most", 1.2, "clone"),
    Target("if-fwd-uint8", "cpu", "time_at_most", 0.6, "clone"),
    Target("if-fwd-fp32", "cpu", "faster_by", 3.0, "spikingjelly"),
    Target("if-fwd-bwd-fp32", "cpu", "faster_by", 3.0, "spikingjelly"),
    Target("rnl-fwd-bwd-fp32", "cpu", "faster_by", 4.0, "eager"),
    Target("if-fwd-fp32", "cuda", "copy_bw", 0.8),
    Target("if-fwd-uint8", "cuda", "copy_bw", 0.8),
    Target("if-fwd-fp32", "cuda", "faster_by", 1.5, "spikingjelly"),
    Target("if-fwd-bwd-fp32", "cuda", "faster_by", 1.2, "spikingjelly"),
    Target("if-fwd-bwd-fp32", "cuda", "peak_at_most", 1.0, "spikingjelly"),
    Target("rnl-fwd-bwd-fp32", "cuda", "faster_by", 3.0, "eager"),
    Target("e2e-cnn7-T64", "cpu", "faster_by", 3.0, "spikingjelly"),
    Target("e2e-cnn7-T64", "cpu", "time_at_most", 40.0, "ann"),
    Target("e2e-vgg16-T64", "cuda", "faster_by", 3.0, "spikingjelly"),
    *(Target("e2e-cnn7-long", device, kind, value, "ours-T64", subject)
      for device in ("cpu", "cuda")
      for kind, value in (("peak_above_at_most", 200.0), ("linear_in_T_at_most", 1.5))
      for subject in ("ours", "ours-chunk64")),
)  # fmt: skip


def evaluate_target(target: Target, rows: dict[str, Measurement], copy_gbps: float | None) -> str:
    """One line: the target, the measured figure, and ok / MISS (with the shortfall) / n/a."""
    ours, base, who = rows.get(target.subject), rows.get(target.baseline), target.subject
    want = {
        "time_at_most": f"t_{who} / t_{target.baseline} <= {target.value:g}",
        "faster_by": f"{who} >= {target.value:g}x faster than {target.baseline}",
        "copy_bw": f"{who} >= {target.value:.0%} of copy bandwidth",
        "peak_at_most": f"peak memory {who} <= {target.value:g}x {target.baseline}'s",
        "linear_in_T_at_most": f"time {who} <= {target.value:g}x linear in T from {target.baseline}",
        "peak_above_at_most": f"peak memory {who} <= {target.value:g} MB above {target.baseline}'s",
    }[target.kind]
    figure, score = None, 0.0  # score: measured / required on a higher-is-better scale
    if target.kind == "linear_in_T_at_most":
        if ours and base and ours.median_s and base.median_s and ours.steps and base.steps:
            time_ratio, steps_ratio = ours.median_s / base.median_s, ours.steps / base.steps
            excess = time_ratio / steps_ratio
            figure = f"{excess:.2f}x (t ratio {time_ratio:.1f} for T ratio {steps_ratio:g})"
            score = target.value / excess
    elif target.kind == "peak_above_at_most":
        if ours and base and ours.peak_bytes is not None and base.peak_bytes is not None:
            above = (ours.peak_bytes - base.peak_bytes) / 2**20
            figure = f"{above:.0f} MB ({mb_text(ours.peak_bytes)} vs {mb_text(base.peak_bytes)} MB)"
            score = target.value / above if above > 0 else float("inf")
    elif target.kind == "copy_bw":
        if ours and ours.gbps and copy_gbps:
            share = ours.gbps / copy_gbps
            figure, score = f"{share:.0%} ({ours.gbps:.0f} of {copy_gbps:.0f} GB/s)", share / target.value
    elif target.kind == "peak_at_most":
        if ours and base and ours.peak_bytes and base.peak_bytes:
            ratio = ours.peak_bytes / base.peak_bytes
            figure, score = f"{ratio:.2f}x", target.value / ratio
    elif ours and base and ours.median_s and base.median_s:
        ratio = ours.median_s / base.median_s
        if target.kind == "time_at_most":
            figure, score = f"{ratio:.2f}x", target.value / ratio
        else:
            figure, score = f"{1 / ratio:.2f}x", 1 / ratio / target.value
    if figure is None:
        missing = ours if not (ours and ours.median_s) else base
        return f"{want}: n/a ({(missing.note if missing else '') or 'not measured'})"
    return f"{want}: {figure} " + ("ok" if score >= 1 else f"MISS (reaches {score:.0%} of the target)")


# ─── tables ─────────────────────────────────────────────────────────────────────────────────


def ms_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def mb_text(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table, columns padded so that it also reads as plain text."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)]


def shape_text(m: Measurement) -> str:
    return f"x [{', '.join(map(str, m.shape))}] {m.dtype}" if m.shape else "-"


def _by_group(measurements: Sequence[Measurement]) -> Iterator[tuple[str, Group, dict[str, Measurement]]]:
    """(device, group, {impl: measurement}) in device, then GROUPS order."""
    for device in dict.fromkeys(m.device for m in measurements):
        for group in GROUPS:
            rows = {m.impl: m for m in measurements if m.device == device and m.group == group.name}
            if rows:
                yield device, group, rows


def _targets_of(group: Group, device: str) -> list[Target]:
    return [t for t in TARGETS if t.group == group.name and t.device == device]


def group_tables(measurements: Sequence[Measurement], copy_gbps: dict[str, float]) -> list[str]:
    """One table per (device, group): each impl's time, time over ours, GB/s, peak memory; then targets."""
    lines: list[str] = []
    for device, group, rows in _by_group(measurements):
        if group.op == "e2e":
            lines += _e2e_group_table(device, group, rows)
            continue
        ours, copy = rows.get("ours"), copy_gbps.get(device)
        shape = next((shape_text(m) for m in rows.values() if m.shape), "-")
        table = []
        for impl in (impl for impl in group.impls if impl in rows):
            m = rows[impl]
            table.append([
                impl,
                ms_text(m.median_s),
                "-" if not (m.median_s and ours and ours.median_s) else f"{m.median_s / ours.median_s:.2f}",
                "-" if m.gbps is None else f"{m.gbps:.1f}",
                "-" if not (m.gbps and copy) else f"{m.gbps / copy:.0%}",
                mb_text(m.peak_bytes),
                m.rounds or "-",
                m.note,
            ])  # fmt: skip
        lines += ["", f"### {group.name} [{device}]: {group.title}; {shape}"]
        header = ["impl", "median ms", "t / t_ours", "GB/s", "% copy", "peak MB", "rounds", "note"]
        lines += _format_table(header, table)
        lines += [f"- target: {evaluate_target(t, rows, copy)}" for t in _targets_of(group, device)]
    return lines


def summary_table(measurements: Sequence[Measurement], copy_gbps: dict[str, float]) -> list[str]:
    """One row per (device, group): ours against every baseline; then every target (the
    end-to-end groups are in :func:`e2e_summary`)."""
    table, targets = [], []
    for device, group, rows in _by_group(measurements):
        if group.op == "e2e":
            continue
        ours, copy = rows.get("ours"), copy_gbps.get(device)
        ours_s = ours.median_s if ours else None
        gbps = ours.gbps if ours else None

        def versus(impl: str) -> str:
            m = rows.get(impl)
            if m is None:
                return "-"
            if not m.median_s:
                return f"n/a ({m.note[:40]})"
            return ms_text(m.median_s) + (f" ({m.median_s / ours_s:.2f}x)" if ours_s else "")

        table.append([
            f"{group.name} [{device}]",
            next((shape_text(m) for m in rows.values() if m.shape), "-"),
            ms_text(ours_s) if ours else "-",
            versus("eager"),
            versus("compile"),
            versus("spikingjelly"),
            versus("clone"),
            "-" if gbps is None else f"{gbps:.0f}",
            "-" if not (gbps and copy) else f"{gbps / copy:.0%}",
            mb_text(ours.peak_bytes if ours else None),
            mb_text(rows["spikingjelly"].peak_bytes if "spikingjelly" in rows else None),
        ])  # fmt: skip
        targets += [f"- {group.name} [{device}] {evaluate_target(t, rows, copy)}" for t in _targets_of(group, device)]
    header = ["op", "shape", "ours ms", "eager ms (x)", "compile ms (x)", "SpikingJelly ms (x)", "clone ms (x)",
              "ours GB/s", "% copy bw", "peak MB ours", "peak MB SJ"]  # fmt: skip
    return [
        *_format_table(header, table),
        "",
        "(x) = baseline time / ours time: above 1, ours is faster. GB/s on the bytes the op must move.",
        "",
        "Targets (printed, not asserted):",
        *targets,
    ]


# ─── environment ────────────────────────────────────────────────────────────────────────────


@functools.cache  # torch read the variable at start-up: the answer holds for the whole process
def thp_status() -> str:
    """Whether fresh large CPU tensors get transparent huge pages (DESIGN.md §3: page-fault cost).

    ``THP_MEM_ALLOC_ENABLE=1`` is read by torch when it starts, so it is tested here by its effect:
    the huge pages backing a fresh 64 MiB tensor (above glibc's largest mmap threshold, so it
    is a fresh mapping, never reused heap).
    """
    requested = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        mode = "unknown"
    try:
        before = _smaps_huge_kb()
        probe = torch.empty(2**24, dtype=torch.float32).fill_(1.0)
        huge_kb = _smaps_huge_kb() - before
        del probe
        effect = f"huge pages {'ON' if huge_kb > 0 else 'OFF'} for fresh tensors"
    except (OSError, AttributeError):
        effect = "huge-page use unknown"
    return f"THP_MEM_ALLOC_ENABLE={requested}, kernel THP mode [{mode}]: {effect}"


def _smaps_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return int(re.search(r"^AnonHugePages:\s+(\d+) kB", f.read(), re.M).group(1))


def environment_lines(scale: str) -> list[str]:
    """What the figures depend on: versions, threads, devices, THP, sizes."""
    try:
        import spikingjelly

        sj = getattr(spikingjelly, "__version__", None) or _dist_version("spikingjelly")
    except ImportError:
        sj = "not importable (its rows are skipped)"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    busy = " (BUSY: other processes compete for the cores; figures are noisier)" if load > 0.75 * cores else ""
    return [
        f"load average {load:.1f} on {cores} cores{busy}",
        f"rnl_fast bench: scale={scale} {sizes_for('cpu', scale)} (CUDA neurons: {sizes_for('cuda', scale).neurons})",
        *(e2e_sizes_text(device, scale) for device in ("cpu", "cuda")),
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA device: {cuda}, "
        f"spikingjelly {sj} (CUDA implementation: {os.environ.get('SJ_IF_CUDA_IMPLEMENTATION')})",
        thp_status(),
    ]


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def copy_bytes_for(device: str, scale: str) -> int:
    """Size of the copy-bandwidth probe: as big as an IF input, so caches do not flatter it."""
    sizes = sizes_for(device, scale)
    return max(2**20, sizes.steps * sizes.neurons * 4)


@dataclass
class Results:
    """Measurements collected in one session, and the copy bandwidth of each device seen."""

    measurements: list[Measurement] = field(default_factory=list)
    copy_gbps: dict[str, float] = field(default_factory=dict)
    #: "group [device]" → the lines of :func:`profile_e2e`
    profiles: dict[str, list[str]] = field(default_factory=dict)


def case_params(op: str) -> list[Any]:
    """pytest parameters ``(device, group, impl)`` of every case of ``op`` ("if", "rate_norm", "e2e").

    CUDA cases carry the ``gpu`` mark and skip without CUDA; on CPU the Triton kernels are not
    benchmarked (the interpreter is not a performance path).
    """
    import pytest  # here: gpu_bench.py uses this module where pytest may be missing

    if op not in {group.op for group in GROUPS}:
        raise ValueError(f"op must be one of {sorted({group.op for group in GROUPS})}, got {op!r}")
    cuda_marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

    def marks(device: str, group: Group) -> list[Any]:  # end to end at T >= 256: also "slow"
        return ([] if device == "cpu" else cuda_marks) + ([pytest.mark.slow] if group.steps >= 256 else [])

    return [
        pytest.param(device, group.name, impl, id=f"{device}-{group.name}-{impl}", marks=marks(device, group))
        for device in ("cpu", "cuda")
        for group in GROUPS
        if group.op == op
        for impl in group.impls
    ]
