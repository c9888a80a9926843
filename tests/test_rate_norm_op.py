"""The fused Rate Norm op against its pure-PyTorch definition, on every CPU-runnable backend."""

from __future__ import annotations

import pytest
import torch

from rnl_fast import ops, reference
from rnl_fast.ops import RateNormResult

SHAPES = [
    pytest.param((1,), id="one"),
    pytest.param((7, 13), id="7x13"),
    pytest.param((4, 3, 9, 11), id="4x3x9x11"),
    pytest.param((5000,), id="5000"),
]


def _inputs(shape, dtype=torch.float32):
    x = (torch.randn(shape) * 1.5 + 0.4).to(dtype)
    raw_p = torch.randn(()) * 0.5 + 1.0
    running_max = torch.rand(()) * 2 + 0.5
    return x, raw_p, running_max


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_matches_reference(backend, shape, training):
    x, raw_p, running_max = _inputs(shape)
    fast = ops.rate_norm(x, raw_p, running_max, momentum=0.3, training=training)
    ref = RateNormResult(*reference.rate_norm(x, raw_p, running_max, momentum=0.3, training=training))
    torch.testing.assert_close(fast.running_max, ref.running_max, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast.r, ref.r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast.sum_r, ref.sum_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.sum_r2, ref.sum_r2, rtol=1e-5, atol=1e-6)
    assert fast.r.min() >= 0 and fast.r.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_dtypes(backend, dtype):
    x, raw_p, running_max = _inputs((6, 50), dtype)
    fast = ops.rate_norm(x, raw_p, running_max)
    ref_x = x if dtype == torch.float64 else x.float()
    ref = RateNormResult(*reference.rate_norm(ref_x, raw_p, running_max))
    assert fast.r.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fast.r, ref.r.to(dtype), **tol)
    torch.testing.assert_close(fast.sum_r, ref.sum_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_matches_reference(backend, training):
    x, raw_p, running_max = _inputs((9, 31))
    x.requires_grad_()
    raw_p.requires_grad_()
    weight = torch.randn(9, 31)
    grads = []
    for fn in (ops.rate_norm, reference.rate_norm):
        r, _, sum_r, sum_r2 = fn(x, raw_p, running_max, 0.2, training)
        omega = sum_r / (sum_r2 + 1e-5)
        grads.append(torch.autograd.grad((r * weight).sum() + 0.7 * omega + 0.01 * sum_r2, [x, raw_p]))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_gradcheck_fp64(backend):
    x = (torch.randn(4, 7, dtype=torch.float64) * 1.5 + 0.4).requires_grad_()
    raw_p = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    running_max = torch.tensor(1.7)

    def f(x, raw_p):
        r, _, sum_r, sum_r2 = ops.rate_norm(x, raw_p, running_max, training=False)
        return r, sum_r / (sum_r2 + 1e-5)

    assert torch.autograd.gradcheck(f, (x, raw_p), eps=1e-7, atol=1e-6)


def test_running_max_update_and_no_gradient_through_max(backend):
    x = torch.tensor([-3.0, 0.5, 2.0, float("nan"), 1.0])
    running_max = torch.tensor(1.0)
    out = ops.rate_norm(x, torch.tensor(10.0), running_max, momentum=0.1, training=True)
    torch.testing.assert_close(out.running_max, torch.tensor(0.9 * 1.0 + 0.1 * 2.0))  # NaN skipped
    assert running_max.item() == 1.0, "the op must not write the buffer it is given"
    assert torch.isnan(out.r[3]) and torch.isnan(out.sum_r)
    assert not torch.isnan(out.r[[0, 1, 2, 4]]).any()
    eval_out = ops.rate_norm(x, torch.tensor(10.0), running_max, training=False)
    assert eval_out.running_max.item() == 1.0


def test_outputs_are_fully_written(backend, poisoned_allocations):
    x, raw_p, running_max = _inputs((3, 333))
    with poisoned_allocations():
        fast = ops.rate_norm(x, raw_p, running_max)
    ref = RateNormResult(*reference.rate_norm(x, raw_p, running_max))
    torch.testing.assert_close(fast.r, ref.r)
    torch.testing.assert_close(fast.sum_r2, ref.sum_r2)
