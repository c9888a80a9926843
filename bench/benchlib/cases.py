"""The op cases (IF, IF + 2×2 pooling, Rate Norm, QCFS): their inputs and each impl's call; and
:class:`CaseBuilder`, which builds any case, end to end and time to accuracy included, and primes
each impl once.

The impls of an op group:

- ``ours``: :mod:`rnl_fast.ops` (C++ on CPU tensors, Triton on CUDA tensors);
- ``clone``: ``x.clone()``, the cost of a fresh output of the input's size;
- ``eager``: the pure-PyTorch definition in :mod:`rnl_fast.reference`;
- ``compile``: ``torch.compile`` of that definition (compile time excluded);
- ``spikingjelly``: SpikingJelly 2.0's ``IFNode(v_reset=None, step_mode="m")``;
- ``ours-slots`` (IF forward + backward, CUDA): ours with ``RNL_FAST_IF_BWD=slots``, the
  persistent backward kernel, beside ``ours`` and its default kernel.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rnl_fast import ops, reference
from rnl_fast.reference import OMEGA_EPS

from .e2e import build_e2e_case
from .groups import GROUPS_BY_NAME, IF_BWD_IMPLS, POOL_IMPLS, SEED, Case, Group, Sizes, Unavailable, sizes_for
from .tta import build_tta_case

#: Rate Norm momentum, the same for every impl.
RNL_MOMENTUM = 0.1


def bytes_moved(group: Group, x: Tensor) -> int:
    """Bytes the op must move at the least (the GB/s figures count these).

    - IF forward: read x once, write the spikes once; with pooling, write a quarter of them.
    - IF forward+backward: the forward above, then the backward reads x (to recompute the
      membrane) and the spike gradient and writes grad_x.
    - Rate Norm forward+backward: the forward reads x twice (max pass, then output pass) and
      writes r; the backward reads x and grad_r and writes grad_x.
    - QCFS forward+backward: the forward reads x and writes y; the backward reads x and grad_y
      and writes grad_x.
    """
    n, x_bytes = x.numel(), x.element_size()
    if group.op == "rate_norm":
        return 6 * n * x_bytes
    if group.op == "qcfs":
        return 5 * n * x_bytes
    spike_bytes = (group.spike_dtype or group.dtype).itemsize
    forward = n * x_bytes + (n // 4 if group.pool else n) * spike_bytes
    return forward + 3 * n * x_bytes if group.backward else forward


def _pool_planes(neurons: int) -> tuple[int, int, int]:
    """The neurons of the pooling group as [planes, H, W]: 32 × 32 planes (odd 7 × 9 ones when tiny)."""
    return (neurons // 1024, 32, 32) if neurons >= 1024 else (max(1, neurons // 63), 7, 9)


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
    if group.op == "qcfs":
        return {
            "x": randn(sizes.rnl_shape).requires_grad_(True),
            "weight": randn(sizes.rnl_shape),  # the loss (y * weight).sum() gives a dense grad_y
            "threshold": torch.tensor(1.5, device=device, requires_grad=True),  # some x above λ
        }
    return {
        "x": randn(sizes.rnl_shape).requires_grad_(True),
        "weight": randn(sizes.rnl_shape),  # the loss (r * weight).sum() gives a dense grad_r
        "raw_p": torch.tensor(2.0, device=device, requires_grad=True),  # p ≈ 0.88: some x clip
        # Channel-wise: every channel's running max at 1.0 too, so that the same x clip.
        "running_max": torch.ones(sizes.rnl_shape[1] if group.channel_wise else (), device=device),
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
    if impl in ("ours", "ours-slots"):  # the same forward; their backward kernels differ
        return lambda x: ops.if_sequence(x, spike_dtype=spike_dtype).spikes
    if impl == "eager":
        return lambda x: reference.if_sequence(x, spike_dtype=spike_dtype)[0]
    if impl == "compile":
        # dynamic=False: a second shape (CPU then CUDA sizes) must not switch to symbolic shapes.
        compiled = torch.compile(reference.if_sequence, dynamic=False)
        return lambda x: compiled(x, spike_dtype=spike_dtype)[0]
    if impl == "spikingjelly":
        return _spikingjelly_if()
    raise ValueError(f"impl must be one of {IF_BWD_IMPLS}, got {impl!r}")


def _with_if_bwd(kernel: str, call: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``call`` run with ``RNL_FAST_IF_BWD=kernel`` (read by the IF backward on every call), then the
    variable as it was, so that the other impls keep the default. Costs a few µs of host time
    per call, against the ~3.7 ms of an IF forward + backward at [32, 16M] on an H200."""

    def run() -> Tensor:
        before = os.environ.get("RNL_FAST_IF_BWD")
        os.environ["RNL_FAST_IF_BWD"] = kernel
        try:
            return call()
        finally:
            if before is None:
                del os.environ["RNL_FAST_IF_BWD"]
            else:
                os.environ["RNL_FAST_IF_BWD"] = before

    return run


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


def _rnl_loss(
    rate_norm_fn: Callable,
    channel_wise: bool,
    levels: int | None,
    x: Tensor,
    raw_p: Tensor,
    running_max: Tensor,
    weight: Tensor,
) -> Tensor:
    """A training step's loss through one Rate Norm Layer: ``(r̂·weight).sum() + Ω`` (paper Eq. 8)."""
    r, _, sum_r, sum_r2 = rate_norm_fn(x, raw_p, running_max, RNL_MOMENTUM, True, channel_wise, levels)
    return (r * weight).sum() + sum_r / (sum_r2 + OMEGA_EPS)


def _rnl_loss_fn(impl: str, group: Group) -> Callable[..., Tensor]:
    options = (group.channel_wise, group.levels)
    if impl == "ours":
        return functools.partial(_rnl_loss, ops.rate_norm, *options)
    if impl == "eager":
        return functools.partial(_rnl_loss, reference.rate_norm, *options)
    if impl == "compile":  # the whole loss, so that inductor may fuse it with the layer
        return torch.compile(functools.partial(_rnl_loss, reference.rate_norm, *options), dynamic=False)
    raise ValueError(f"Rate Norm impl must be ours, eager or compile, got {impl!r}")


def _qcfs_loss(qcfs_fn: Callable, levels: int, x: Tensor, threshold: Tensor, weight: Tensor) -> Tensor:
    """A training step's loss through one QCFS activation: ``(y·weight).sum()``."""
    return (qcfs_fn(x, threshold, levels) * weight).sum()


def _qcfs_loss_fn(impl: str, group: Group) -> Callable[..., Tensor]:
    if impl == "ours":
        return functools.partial(_qcfs_loss, ops.qcfs, group.levels)
    if impl == "eager":
        return functools.partial(_qcfs_loss, reference.qcfs, group.levels)
    if impl == "compile":  # the whole loss, so that inductor may fuse it with the activation
        return torch.compile(functools.partial(_qcfs_loss, reference.qcfs, group.levels), dynamic=False)
    raise ValueError(f"QCFS impl must be ours, eager or compile, got {impl!r}")


def build_op_case(group: Group, impl: str, device: str, scale: str) -> Case:
    """The callable of one impl of an IF, Rate Norm or QCFS group, on the group's inputs at ``scale``."""
    inputs = _inputs(group.name, device, sizes_for(device, scale))
    x = inputs["x"]
    run: Callable[[], Any]
    if impl == "ours-slots" and device != "cuda":
        raise Unavailable("the persistent backward is a Triton kernel: CUDA only (CPU runs the C++ backward)")
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

            if impl == "ours-slots":
                run = _with_if_bwd("slots", run)

        else:

            def run() -> Tensor:
                with torch.no_grad():
                    return spikes_of(x)

        moved = bytes_moved(group, x)
    elif group.op == "qcfs":
        qcfs_loss_of = _qcfs_loss_fn(impl, group)
        threshold, weight = inputs["threshold"], inputs["weight"]

        def run() -> tuple[Tensor, ...]:
            return torch.autograd.grad(qcfs_loss_of(x, threshold, weight), (x, threshold))

        moved = bytes_moved(group, x)
    else:
        loss_of = _rnl_loss_fn(impl, group)
        raw_p, running_max, weight = inputs["raw_p"], inputs["running_max"], inputs["weight"]

        def run() -> tuple[Tensor, ...]:
            return torch.autograd.grad(loss_of(x, raw_p, running_max, weight), (x, raw_p))

        moved = bytes_moved(group, x)
    needs_warmup = impl == "compile" or device == "cuda"
    return Case(group, impl, device, tuple(x.shape), run, bytes_moved=moved, needs_warmup=needs_warmup)


class CaseBuilder:
    """Builds the cases of one run at one scale, and primes each (group, impl, device) once.

    The first call of an impl in a process loads modules, starts thread pools and fills caches
    (ours: +160 MB of RSS on CPU); a call of the impl at ``tiny`` size, right after its first
    case is built, takes that out of every figure. Not for compile: its warm-up on the real
    inputs is the compilation itself. The builder remembers what it primed: one builder per run.
    """

    def __init__(self, scale: str) -> None:
        self.scale = scale
        self._primed: set[tuple[str, str, str]] = set()

    def build(self, group_name: str, impl: str, device: str) -> Case:
        """The case of one impl of one group; raises :class:`Unavailable` for a missing baseline."""
        if group_name not in GROUPS_BY_NAME:
            raise ValueError(f"group must be one of {sorted(GROUPS_BY_NAME)}, got {group_name!r}")
        group = GROUPS_BY_NAME[group_name]
        if impl not in group.impls:
            raise ValueError(f"impl of {group_name} must be one of {group.impls}, got {impl!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable("CUDA is not available")
        build = {"e2e": build_e2e_case, "tta": build_tta_case}.get(group.op, build_op_case)
        case = build(group, impl, device, self.scale)
        # A time-to-accuracy case has run its impl many times already, in its steps search.
        if impl != "compile" and group.op != "tta" and (group_name, impl, device) not in self._primed:
            self._primed.add((group_name, impl, device))
            build(group, impl, device, "tiny").run()
        return case
