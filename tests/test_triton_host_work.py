"""The Rate Norm and QCFS launchers do no host work beyond their kernels and the sums of the
per-program partials: no autotuner, no zero-filled buffers, no stacks or clones; the IF backward
launches its one kernel.

On a GPU these calls are bound by the host, not the device (docs/gpu.md: a Rate Norm forward +
backward at 51M elements ran ~0.4 ms of kernels and ~1.6 ms of host time on an H200's host), and
there every torch op below is a kernel launch with its ~10 µs of host time, the autotuner's Python
wrapper ~55 µs per launch. A test fails here when a change adds one; it counts the torch ops of
the launchers themselves (the interpreter's own copies while a kernel runs are left out).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

# Ops that only allocate or re-view memory: no device work.
_NO_DEVICE_WORK = ("empty", "view", "select", "permute", "reshape", "as_strided", "detach", "alias")


class _DeviceWork(TorchDispatchMode):
    """Counts the torch ops that run device work, and the Triton launches and autotuner runs."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.launches: collections.Counter[str] = collections.Counter()
        self._in_kernel = 0
        interpreter = pytest.importorskip("triton.runtime.interpreter")
        run = interpreter.InterpretedFunction.run

        def counted_run(kernel, *args, **kwargs):
            self.launches[kernel.fn.__name__] += 1
            self._in_kernel += 1
            try:
                return run(kernel, *args, **kwargs)
            finally:
                self._in_kernel -= 1

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted_run)
        autotune = triton.runtime.Autotuner.run

        def counted_autotune(tuner, *args, **kwargs):
            self.launches["autotuner"] += 1
            return autotune(tuner, *args, **kwargs)

        monkeypatch.setattr(triton.runtime.Autotuner, "run", counted_autotune)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__  # e.g. "sum.IntList_out"
        if not self._in_kernel and not any(word in name for word in _NO_DEVICE_WORK):
            self.ops[name.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def kernels():
    from rnl_fast.ops._backend import triton as triton_kernels

    return triton_kernels(on_cpu=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channel_wise", [False, True], ids=["tensor", "channel-wise"])
def test_rate_norm_forward_launches_its_kernels_and_two_sums(kernels, monkeypatch, training, channel_wise):
    x = torch.randn(4, 3, 5, 5)
    running_max = torch.rand(3) + 0.5 if channel_wise else torch.tensor(1.2)
    outputs = (torch.empty_like(x).view(-1), torch.empty_like(running_max), torch.empty(()), torch.empty(()))
    options = dict(channels=3, inner=25) if channel_wise else {}
    raw_p = torch.tensor(0.4)
    with _DeviceWork(monkeypatch) as work:
        kernels.rate_norm_fwd(x.view(-1), raw_p, running_max, 0.1, training, 1e-6, *outputs, **options)
    max_kernel = "_rate_norm_channel_max_kernel" if channel_wise else "_rate_norm_max_kernel"
    expected = {"_rate_norm_fwd_kernel": 1} | ({max_kernel: 1} if training else {})
    assert dict(work.launches) == expected
    # The batch max needs its zero (the kernels take the max by atomics); Σr̂ and Σr̂² one sum each.
    assert dict(work.ops) == {"sum": 2} | ({"zeros": 1} if training else {})


@pytest.mark.parametrize("grad_r", [True, False], ids=["grad-r", "no-grad-r"])
@pytest.mark.parametrize("grad_sums", [(True, True), (True, False), (False, False)], ids=["both", "sum-r", "none"])
def test_rate_norm_backward_launches_one_kernel_and_one_sum(kernels, monkeypatch, grad_r, grad_sums):
    x = torch.randn(6, 7)
    given = [torch.tensor(0.5) if wanted else None for wanted in grad_sums]
    grad_x, grad_raw = torch.empty(42), torch.empty(())
    scalars = (torch.tensor(0.4), torch.tensor(1.2))  # raw_p, running max
    g = torch.randn(42) if grad_r else None
    with _DeviceWork(monkeypatch) as work:
        kernels.rate_norm_bwd(g, *given, x.view(-1), *scalars, 1e-6, grad_x, grad_raw)
    assert dict(work.launches) == {"_rate_norm_bwd_kernel": 1}
    assert dict(work.ops) == {"sum": 1}


def test_qcfs_launches_its_kernels_and_one_sum(kernels, monkeypatch):
    x, threshold, grad_y = torch.randn(50), torch.tensor(1.3), torch.randn(50)
    with _DeviceWork(monkeypatch) as work:
        kernels.qcfs_fwd(x, threshold, torch.empty(50), 8)
        kernels.qcfs_bwd(grad_y, x, threshold, torch.empty(50), torch.empty(()), 8)
    assert dict(work.launches) == {"_qcfs_fwd_kernel": 1, "_qcfs_bwd_kernel": 1}
    assert dict(work.ops) == {"sum": 1}


@pytest.mark.parametrize("kernel", ["scratch", "slots"])
def test_if_backward_launches_one_kernel(kernels, monkeypatch, kernel):
    """The IF backward, either kernel (RNL_FAST_IF_BWD): one launch and no other device work (its
    scratch is an empty tensor); the persistent one without the autotuner (its program count is
    sized from a BLOCK fixed before the launch)."""
    x, grad_spikes = torch.randn(6, 300), torch.randn(6, 300)
    v_th, v_init = torch.tensor(0.8), torch.tensor(0.0)
    grad_x, grad_v_init = torch.empty(6, 300), torch.empty(300)
    monkeypatch.setenv("RNL_FAST_IF_BWD", kernel)
    with _DeviceWork(monkeypatch) as work:
        kernels.if_bwd(grad_spikes, None, x, v_th, v_init, 0.0, False, "atan", 1.0, False, grad_x, grad_v_init)
    expected = {"_if_bwd_slots_kernel": 1} if kernel == "slots" else {"_if_bwd_kernel": 1, "autotuner": 1}
    assert dict(work.launches) == expected
    assert dict(work.ops) == {}


def test_the_counter_sees_what_the_old_launchers_did(kernels, monkeypatch):
    """The counter itself: a zero-fill, a stack and a clone each count (what the launchers used to
    do around their kernels); allocations and views do not."""
    with _DeviceWork(monkeypatch) as work:
        sums = torch.stack([torch.zeros(()), torch.empty(())])
        sums[0].clone(), sums.view(2, 1).permute(1, 0), torch.empty(3)
    assert dict(work.ops) == {"zeros": 1, "stack": 1, "clone": 1}
