"""The fused Rate Norm op against its pure-PyTorch definition, on every CPU-runnable backend."""

from __future__ import annotations

import math

import pytest
import torch

from rnl_fast import _C, ops, reference
from rnl_fast.numerics import THETA_EPS, compute_dtype_of
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


def _assert_gradients_match_reference(loss_of, training: bool = True) -> None:
    """Gradients to x and raw_p of ``loss_of(r, sum_r, sum_r2, weight)``, ours against the reference."""
    x, raw_p, running_max = _inputs((9, 31))
    x.requires_grad_()
    raw_p.requires_grad_()
    weight = torch.randn(9, 31)
    grads = []
    for fn in (ops.rate_norm, reference.rate_norm):
        r, _, sum_r, sum_r2 = fn(x, raw_p, running_max, 0.2, training)
        grads.append(torch.autograd.grad(loss_of(r, sum_r, sum_r2, weight), [x, raw_p]))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_matches_reference(backend, training):
    def loss_of(r, sum_r, sum_r2, weight):
        return (r * weight).sum() + 0.7 * (sum_r / (sum_r2 + 1e-5)) + 0.01 * sum_r2

    _assert_gradients_match_reference(loss_of, training)


@pytest.mark.parametrize("terms", ["r", "sum_r", "sum_r2", "r+sum_r", "r+sum_r2", "sum_r+sum_r2"])
def test_backward_of_each_subset_of_the_outputs(backend, terms):
    """Autograd hands the backward op None for each output the loss leaves out (the kernels drop
    that term at compile time): every subset of r̂, Σr̂ and Σr̂² gives the reference's gradients."""

    def loss_of(r, sum_r, sum_r2, weight):
        parts = {"r": (r * weight).sum(), "sum_r": 0.3 * sum_r, "sum_r2": -0.02 * sum_r2}
        return sum(parts[term] for term in terms.split("+"))

    _assert_gradients_match_reference(loss_of)


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


def _bits(t: torch.Tensor) -> int:
    return t.reshape(1).view(torch.int64 if t.dtype == torch.float64 else torch.int32).item()


def _scalar_cases(n: int) -> list[tuple[float, float, float, float, float]]:
    """(raw_p, running_max, batch_max, momentum, dL/dθ), random over wide ranges, plus the edges:
    saturated and underflowing sigmoids, a zero or subnormal running max, momentum 1."""
    raw_p = torch.cat([torch.randn(n) * 4, (torch.rand(n) - 0.5) * 250]).double() * (1 + torch.rand(2 * n).double())
    running_max = (torch.rand(2 * n) * 3).float() * torch.exp(torch.randn(2 * n) * 4)
    batch_max = torch.rand(2 * n) * torch.exp(torch.randn(2 * n) * 2)
    momentum = torch.rand(2 * n, dtype=torch.float64).clamp_min(1e-9)
    grad_theta = torch.randn(2 * n, dtype=torch.float64) * torch.exp(torch.randn(2 * n, dtype=torch.float64) * 6)
    cases = list(zip(*(t.tolist() for t in (raw_p, running_max, batch_max, momentum, grad_theta))))
    edges = [0.0, 1e-8, -1e-8, 10.0, 20.0, -20.0, 88.5, -88.5, 90.0, -90.0, -104.0, 104.0, 745.0, -745.0, 1e4]
    cases += [(r, m, 2.5, 1.0, 0.75) for r in edges for m in (0.0, 1.0, 1e-40, 3.0e38)]
    cases += [(0.3, 1.7, 2.2, mom, -1.25) for mom in (0.1, 0.2, 0.3, 0.05, 1.0 / 3.0)]
    return cases


@pytest.mark.parametrize(
    "x_dtype, raw_p_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float16),
        (torch.float64, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_cpp_rate_norm_scalars_are_the_specs_bit_for_bit(x_dtype, raw_p_dtype):
    """The C++ path computes the running max, θ and dL/draw_p itself (with FMA contraction kept
    out); each equals the spec's torch expression on ``[]`` tensors, bit for bit. (A vectorised
    torch.sigmoid would not serve as the spec: its last bit differs on ~2% of float32 inputs.)"""
    cdt = compute_dtype_of(x_dtype)
    code = getattr(_C.DType, str(x_dtype).removeprefix("torch."))
    for raw_p_value, running_max_value, batch_max_value, momentum, grad_theta in _scalar_cases(1500):
        raw_p = torch.tensor(raw_p_value, dtype=raw_p_dtype)
        if not math.isfinite(raw_p.item()):
            continue
        running_max = torch.tensor(running_max_value, dtype=torch.float32)
        batch_max = torch.tensor(batch_max_value, dtype=torch.float32)
        case = (raw_p.item(), running_max.item(), batch_max.item(), momentum, grad_theta)

        blended = reference.blend_running_max(running_max, batch_max, momentum)
        fast = _C.blend_running_max(running_max=running_max.item(), batch_max=batch_max.item(), momentum=momentum)
        assert _bits(torch.tensor(fast, dtype=torch.float32)) == _bits(blended), case

        theta = reference.rate_norm_threshold(raw_p, running_max, cdt)
        fast = _C.rate_norm_threshold(
            raw_p=raw_p.item(), running_max=running_max.item(), theta_eps=THETA_EPS, dtype=code
        )
        assert _bits(torch.tensor(fast, dtype=cdt)) == _bits(theta), case

        # dL/draw_p as the ops computed it from the C++ dL/dθ before the C++ took it over.
        p = torch.sigmoid(raw_p.to(cdt))
        grad_raw = grad_theta * running_max.to(cdt) * p * (1 - p)
        fast = _C.rate_norm_grad_raw_p(
            grad_theta=grad_theta, raw_p=raw_p.item(), running_max=running_max.item(), dtype=code
        )
        assert _bits(torch.tensor(fast, dtype=cdt)) == _bits(grad_raw), case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpp_running_max_is_the_specs_bit_for_bit(dtype, monkeypatch):
    monkeypatch.setenv("RNL_FAST_BACKEND", "cpp")
    x = (torch.randn(3, 1000) * 2).to(dtype)
    x[0, 5] = float("nan")
    raw_p, running_max = torch.tensor(0.4), torch.rand(()) * 3
    for momentum in (0.1, 0.37, 1.0):
        fast = ops.rate_norm(x, raw_p, running_max, momentum, training=True)
        assert _bits(fast.running_max) == _bits(reference.running_max_update(x, running_max, momentum))
