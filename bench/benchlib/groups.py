"""The benchmark registry: scales and problem sizes, the groups, and the ``Case`` every driver runs.

A *group* is one piece of work (e.g. IF forward with fp32 spikes); its *impls* do that work on the
same inputs. The pytest files turn every (device, group, impl) into one parameter
(:func:`case_params`); ``gpu_bench.py`` walks :data:`GROUPS` itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .tta import TimeToAccuracy

SCALES = ("full", "small", "tiny")
IMPLS = ("ours", "clone", "eager", "compile", "spikingjelly")
#: Impls of the fused IF + 2×2 average pooling group: also ours unfused (IF op, then pooling).
POOL_IMPLS = ("ours", "ours-unfused", "clone", "eager", "compile", "spikingjelly")
#: Impls of the IF forward + backward group: also ours with the persistent backward kernel
#: (``RNL_FAST_IF_BWD=slots``: the membrane through L2-sized slots instead of a [T, N] scratch).
IF_BWD_IMPLS = ("ours", "ours-slots", "clone", "eager", "compile", "spikingjelly")
#: Impls of the end-to-end groups; the ReLU-only ones for the nets whose RNL build is not timed.
#: ``ours-bf16``: ours after ``snn.to(torch.bfloat16)`` (bf16 convolutions, float32 IF integration).
E2E_IMPLS = ("ours", "ours-bf16", "ours-rnl", "spikingjelly", "ann")
E2E_RELU_IMPLS = ("ours", "ours-bf16", "ours-one-chunk", "spikingjelly", "ann")
#: Impls of the chunked long run: ours at T = 1024 (the engine's chunks, then 64-step chunks)
#: beside ours at T = 64 on the same batch.
E2E_LONG_IMPLS = ("ours", "ours-chunk64", "ours-T64")
#: Impls of the time-to-accuracy group (``tta.py``): our best conversion, our MaxNorm, SpikingJelly's
#: best, and one ANN forward over the same images (the unit of the "x ANN" column).
TTA_IMPLS = ("ours", "ours-maxnorm", "spikingjelly", "ann")
#: Seed of every input and of the end-to-end networks' weights: every impl sees the same tensors.
SEED = 20210801


class Unavailable(Exception):
    """A baseline that cannot run here (not installed, compile failed): skipped, not an error."""


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run."""

    steps: int  #: T of the IF benchmarks
    neurons: int  #: N of the IF benchmarks (x is [T, N])
    rnl_shape: tuple[int, ...]  #: input shape of the Rate Norm and QCFS benchmarks


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
        return Sizes(steps=32, neurons=2**16, rnl_shape=(16, 16, 16, 16))  # 64K of each: per-call costs count
    if device == "cuda":
        # Rate Norm / QCFS at 51M elements (205 MB, 3.4x an H200's L2): at [128, 32, 28, 28] (13 MB,
        # in L2) every implementation on an H200 was bound by its host's launches (docs/gpu.md).
        return Sizes(steps=32, neurons=2**24, rnl_shape=(256, 64, 56, 56))
    return Sizes(steps=32, neurons=2**21, rnl_shape=(128, 32, 28, 28))


def copy_bytes_for(device: str, scale: str) -> int:
    """Size of the copy-bandwidth probe: as big as an IF input, so caches do not flatter it."""
    sizes = sizes_for(device, scale)
    return max(2**20, sizes.steps * sizes.neurons * 4)


@dataclass(frozen=True)
class Group:
    """One piece of work, done by each of ``impls`` on the same inputs."""

    name: str
    title: str
    op: str  #: "if", "rate_norm", "qcfs", "e2e" or "tta" (time to accuracy)
    impls: tuple[str, ...]
    dtype: torch.dtype = torch.float32  #: dtype of x
    spike_dtype: torch.dtype | None = None  #: IF spike dtype (None: x.dtype)
    backward: bool = False  #: forward + backward instead of inference forward
    #: End-to-end groups only: the network (a key of ``e2e.E2E_MODELS``), the nominal T and batch.
    model: str = ""
    steps: int = 0
    batch: int = 0
    #: IF groups: the spikes averaged over 2×2 windows (x is [T, planes, H, W]), as a converted
    #: CNN's "neurons → AvgPool2d(2)"; ours runs the fused op.
    pool: bool = False
    #: Rate Norm groups: one running max and threshold per channel (dim 1 of x).
    channel_wise: bool = False
    #: Rate Norm groups: rates quantized to this many levels (QCFS), None for none; QCFS groups: L.
    levels: int | None = None


def _e2e_group(model: str, steps: int) -> Group:
    """A converted network simulated over T steps on a constant input (see ``e2e.py`` for the
    impls and for the batch and T actually run on each device and scale)."""
    impls = E2E_IMPLS if model == "cnn7" else E2E_RELU_IMPLS
    title = f"{model} end to end, T = {steps}"
    return Group(f"e2e-{model}-T{steps}", title, "e2e", impls, model=model, steps=steps, batch=128)


GROUPS: tuple[Group, ...] = (
    Group("if-fwd-fp32", "IF forward, fp32 spikes", "if", IMPLS),
    # SpikingJelly cannot write byte spikes; its fp32 figure is in if-fwd-fp32.
    Group("if-fwd-uint8", "IF forward, uint8 spikes", "if", IMPLS[:4], spike_dtype=torch.uint8),
    Group("if-fwd-bf16", "IF forward, bf16 in, bf16 spikes", "if", IMPLS, dtype=torch.bfloat16),
    Group("if-fwd-bwd-fp32", "IF forward+backward, fp32", "if", IF_BWD_IMPLS, backward=True),
    Group("if-pool-fwd-fp32", "IF forward then 2x2 average pooling of the spikes, fp32", "if", POOL_IMPLS, pool=True),
    Group(
        "rnl-fwd-bwd-fp32",
        "Rate Norm forward+backward, loss (r*w).sum() + Omega",
        "rate_norm",
        IMPLS[:4],
        backward=True,
    ),
    # The same work with the layer's options: per-channel thresholds, quantized rates, both.
    *(
        Group(
            f"rnl-{tag}-fwd-bwd-fp32",
            f"Rate Norm {words} forward+backward, loss (r*w).sum() + Omega",
            "rate_norm",
            IMPLS[:4],
            backward=True,
            channel_wise=channel_wise,
            levels=levels,
        )
        for tag, words, channel_wise, levels in (
            ("cw", "channel-wise", True, None),
            ("q8", "quantized (L = 8)", False, 8),
            ("cw-q8", "channel-wise quantized (L = 8)", True, 8),
        )
    ),
    # The QCFS activation on the Rate Norm groups' inputs: λ·clamp(floor(x/λ·L + ½)/L, 0, 1).
    Group(
        "qcfs-fwd-bwd-fp32",
        "QCFS (L = 8) forward+backward, loss (y*w).sum()",
        "qcfs",
        IMPLS[:4],
        backward=True,
        levels=8,
    ),
    *(_e2e_group(model, steps) for model in ("cnn7", "vgg16") for steps in (16, 64, 256)),
    Group(
        "e2e-cnn7-long",
        "cnn7 chunked long run, T = 1024 beside T = 64",
        "e2e",
        E2E_LONG_IMPLS,
        model="cnn7",
        steps=1024,
        batch=16,
    ),
    # The sizes of the time-to-accuracy run are in tta.TTA_PLANS (trained net, images, batch).
    Group(
        "tta-cnn7-mnist",
        "time to accuracy: MNIST cnn7 until the SNN is within 1 point of its ANN",
        "tta",
        TTA_IMPLS,
        model="cnn7",
    ),
)
GROUPS_BY_NAME = {group.name: group for group in GROUPS}


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
    #: End-to-end cases: what ``run`` computed last, [B, K] (ours' and SpikingJelly's mean output over
    #: the T steps, the ANN's logits); after the timed rounds, the last timed call's (``e2e_checks``).
    output: Tensor | None = None
    #: SpikingJelly's end-to-end cases: (λ per neuron layer of ours, of SpikingJelly's), graph order.
    thresholds: tuple[list[float], list[float]] | None = None
    #: Time-to-accuracy cases: what the steps search found (``steps`` is its steps to the target).
    time_to_accuracy: TimeToAccuracy | None = None
    #: Time-to-accuracy cases: test images the last call classified right (None before any call).
    timed_correct: int | None = None


def case_params(op: str) -> list[Any]:
    """pytest parameters ``(device, group, impl)`` of every case of ``op`` ("if", "rate_norm", "qcfs", "e2e",
    "tta").

    CUDA cases carry the ``gpu`` mark and skip without CUDA; on CPU the Triton kernels are not
    benchmarked (the interpreter is not a performance path).
    """
    import pytest  # here: gpu_bench.py uses this package where pytest may be missing

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
