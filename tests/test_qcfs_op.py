"""The fused QCFS op against its pure-PyTorch definition (rnl_fast.reference.qcfs), on every
CPU-runnable backend: y and grad_x element for element, dL/dλ (a sum) to a tolerance; the rule's
boundaries on purpose; the errors; the module.

What each test would catch in a wrong kernel is said in its docstring.
"""

from __future__ import annotations

import pytest
import torch

import rnl_fast
from rnl_fast import ops, reference
from rnl_fast.numerics import compute_dtype_of

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
LEVELS = [1, 2, 8, 255]
SHAPES = {
    "one": lambda: torch.randn(1),
    "37": lambda: torch.randn(37),
    "4x3x9x11": lambda: torch.randn(4, 3, 9, 11),
    "channels-last": lambda: torch.randn(4, 3, 9, 11).contiguous(memory_format=torch.channels_last),
    "strided": lambda: torch.randn(4, 6, 10, 7)[:, ::2, ::3],  # not dense: copied in its stride order
    "5000": lambda: torch.randn(5000),  # more than one C++ chunk of 4096 and many Triton programs
}


def _grad_tol(dtype: torch.dtype, n: int) -> dict:
    """Tolerance of dL/dλ, a sum of n terms added in another order than autograd's."""
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12 * n)
    return dict(rtol=1e-5, atol=2e-6 * n**0.5)


def _both(x: torch.Tensor, lam: torch.Tensor, levels: int, grad_y: torch.Tensor):
    """(y, grad_x, dL/dλ) of ops.qcfs and of reference.qcfs under the loss (y·grad_y).sum()."""
    out = []
    for fn in (ops.qcfs, reference.qcfs):
        xg, lg = x.detach().requires_grad_(), lam.detach().requires_grad_()
        y = fn(xg, lg, levels)
        out.append((y, *torch.autograd.grad(y, [xg, lg], grad_y)))
    return out


@pytest.mark.parametrize("levels", LEVELS, ids=lambda L: f"L{L}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference(backend, shape, dtype, levels):
    """y and grad_x bit for bit, dL/dλ to the summation order, in x's dtype and layout. Catches a
    rounding step left out or fused (x/λ·L + ½ as one FMA), a compute dtype other than the spec's
    (half inputs computed in half), a store that truncates instead of rounding (bf16), a wrong
    element order for channels-last or strided x, and outputs not given x's layout."""
    x = (SHAPES[shape]() * 2.5 + 0.8).to(dtype)
    lam = torch.rand(()) * 2 + 0.5
    grad_y = torch.randn(x.shape).to(dtype)
    (y, grad_x, grad_lam), (y_ref, grad_x_ref, grad_lam_ref) = _both(x, lam, levels, grad_y)
    assert y.dtype == dtype and grad_x.dtype == dtype and grad_lam.dtype == lam.dtype
    assert y.stride() == y_ref.stride() and grad_x.stride() == grad_x_ref.stride()
    assert torch.equal(y, y_ref)
    assert torch.equal(grad_x, grad_x_ref)
    torch.testing.assert_close(grad_lam, grad_lam_ref, **_grad_tol(dtype, x.numel()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_many_threads(backend, dtype):
    """More elements than one C++ thread takes (2^18): the threads' shares of x and of dL/dλ.
    Catches a thread that skips or repeats a chunk, and a lost update of the shared sum."""
    if backend == "triton":
        pytest.skip("the interpreter is not threaded; test_matches_reference covers many programs")
    x = (torch.randn(3, 100_001) * 2.5 + 0.8).to(dtype)
    lam, grad_y = torch.tensor(1.3, dtype=dtype), torch.randn(x.shape, dtype=dtype)
    (y, grad_x, grad_lam), (y_ref, grad_x_ref, grad_lam_ref) = _both(x, lam, 8, grad_y)
    assert torch.equal(y, y_ref) and torch.equal(grad_x, grad_x_ref)
    torch.testing.assert_close(grad_lam, grad_lam_ref, **_grad_tol(dtype, x.numel()))


@pytest.mark.parametrize("lam_dtype", [torch.float64, torch.float16], ids=["lam-fp64", "lam-fp16"])
def test_threshold_of_another_dtype(backend, lam_dtype):
    """λ in float64 (or float16) with float32 x: λ is rounded to float32 as the spec's .to() does,
    and dL/dλ comes back in λ's dtype. Catches λ used unrounded (float64 arithmetic on float32 x)."""
    x = torch.randn(7, 13) * 2.5 + 0.8
    lam = torch.tensor(1.1, dtype=torch.float64).to(lam_dtype)
    (y, grad_x, grad_lam), (y_ref, grad_x_ref, grad_lam_ref) = _both(x, lam, 255, torch.randn(7, 13))
    assert torch.equal(y, y_ref) and torch.equal(grad_x, grad_x_ref)
    assert grad_lam.dtype == lam_dtype
    torch.testing.assert_close(grad_lam, grad_lam_ref, rtol=1e-3, atol=1e-3)


def _level_start(target: int, lam: torch.Tensor, levels: int) -> torch.Tensor:
    """The lowest x (in λ's dtype) with x/λ·L + ½ ≥ target, near λ·(target − ½)/L: where the spec's
    own rounding starts level ``target`` (for dyadic L the sum is then exactly ``target``), found
    by stepping one ulp at a time; one ulp below it the spec is a level lower."""

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x / lam * levels + 0.5

    x = lam * (target - 0.5) / levels
    for _ in range(1000):
        if scaled(x) < target:
            x = torch.nextafter(x, x + 1)
        elif scaled(torch.nextafter(x, x - 1)) >= target:
            x = torch.nextafter(x, x - 1)
        else:
            return x
    raise AssertionError(f"no start of level {target} near x = {x.item()}")


def _boundary_points(lam: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, the expected level k where x is on a step or an edge, whether x is in the gradient window).

    The window's lower edge (x/λ·L + ½ reaches 0: k = 0, inside) and one ulp below it (k = −1,
    outside); every step (reaches k for k = 1…L: the higher level, k) and one ulp below it
    (k − 1); the upper edge (reaches L + 1, at λ(1 + 1/2L): k = L + 1, outside) and one ulp below
    it (k = L, inside); x = 0 and x = λ (k = 0 and k = L, inside). For L a power of 2 (λ dyadic)
    also the exact points λ(k − ½)/L, −λ/2L and λ(1 + 1/2L) themselves (the spec's rounding of
    + ½ may start a level an ulp lower)."""
    points: list[tuple[torch.Tensor, int]] = []
    for target in range(0, levels + 2):
        x = _level_start(target, lam, levels)
        if levels & (levels - 1) == 0:  # L a power of 2, λ dyadic: λ(k − ½)/L exactly, itself level k
            points.append((lam * (target - 0.5) / levels, target))
        points += [(x, target), (torch.nextafter(x, x - 1), target - 1)]
    points += [(torch.zeros_like(lam), 0), (lam.clone(), levels)]
    x = torch.stack([p for p, _ in points])
    k = torch.tensor([level for _, level in points], dtype=lam.dtype)
    return x, k, (k >= 0) & (k <= levels)


@pytest.mark.parametrize("levels", LEVELS, ids=lambda L: f"L{L}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_boundaries(backend, dtype, levels):
    """Every step boundary λ(k + ½)/L, the window's edges −λ/2L and λ(1 + 1/2L) and one ulp below
    each, x = 0 and x = λ, each in its own call so that dL/dλ is per element: y = λ·clamp(k/L),
    dy/dx = 1 and dy/dλ = k/L − x/λ inside the window 0 ≤ k ≤ L, dy/dλ = 1 above it, 0 below.
    Catches round-half-even instead of floor(· + ½) (a step one level low), a window off by one
    level (k < L, k > 0), a clamp before the floor (the window [0, λ]: same y, other gradients),
    and rounding that drifts from the spec's at a boundary."""
    cdt = compute_dtype_of(dtype)
    lam = torch.tensor(1.375, dtype=cdt)  # dyadic
    x, k, inside = _boundary_points(lam, levels)
    for i in range(x.numel()):
        xi = x[i].reshape(1).to(dtype)
        (y, grad_x, grad_lam), (y_ref, grad_x_ref, grad_lam_ref) = _both(xi, lam, levels, torch.ones(1, dtype=dtype))
        where = f"x = {x[i].item()!r}, k = {int(k[i])}"
        assert torch.equal(y, y_ref) and torch.equal(grad_x, grad_x_ref), where
        torch.testing.assert_close(grad_lam, grad_lam_ref, rtol=0, atol=0, msg=where)
        expected_y = lam * (k[i] / levels).clamp(0, 1)
        assert y.item() == expected_y.item(), where
        assert grad_x.item() == (1.0 if inside[i] else 0.0), where
        expected_grad_lam = k[i] / levels - x[i] / lam if inside[i] else float(k[i] > levels)
        torch.testing.assert_close(grad_lam.to(cdt), torch.as_tensor(expected_grad_lam, dtype=cdt), msg=where)


@pytest.mark.parametrize("levels", [1, 8], ids=lambda L: f"L{L}")
def test_extreme_and_nan_inputs(backend, levels):
    """Huge, infinite and NaN x as the spec gives them: λ above, 0 below, NaN for NaN with
    grad_x = 0; dL/dλ = 1 for a huge x, NaN where the spec's −0·(∞/λ) is NaN (x = ±∞) or x is NaN.
    Catches a clip written with min/max (which drops NaN) and a guard the spec does not have."""
    x = torch.tensor([1e30, -1e30, 3e38, float("inf"), float("-inf"), float("nan"), 0.5, -0.5])
    lam = torch.tensor(2.0)
    for i in range(x.numel()):
        (y, grad_x, grad_lam), (y_ref, grad_x_ref, grad_lam_ref) = _both(x[i : i + 1], lam, levels, torch.ones(1))
        where = f"x = {x[i].item()}"
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True, msg=where)
        assert torch.equal(grad_x, grad_x_ref), where
        torch.testing.assert_close(grad_lam, grad_lam_ref, rtol=0, atol=0, equal_nan=True, msg=where)
    (y, grad_x, _), _ = _both(x[:3], lam, levels, torch.ones(3))
    assert y.tolist() == [2.0, 0.0, 2.0] and grad_x.tolist() == [0.0, 0.0, 0.0]


def test_outputs_are_fully_written(backend, poisoned_allocations):
    """y and grad_x come from torch.empty: with NaN-filled allocations, an element the kernel
    forgot to write (a tail past the last full block) shows."""
    x = torch.randn(3, 333) * 2.5 + 0.8
    lam, grad_y = torch.tensor(1.3), torch.randn(3, 333)
    with poisoned_allocations():
        (y, grad_x, grad_lam), _ = _both(x, lam, 8, grad_y)
    _, (y_ref, grad_x_ref, grad_lam_ref) = _both(x, lam, 8, grad_y)
    assert torch.equal(y, y_ref) and torch.equal(grad_x, grad_x_ref)
    torch.testing.assert_close(grad_lam, grad_lam_ref)


def test_no_gradient_asked(backend):
    """Under no_grad, and for an x that does not need a gradient, only λ's."""
    x, lam = torch.randn(5, 7), torch.tensor(0.9, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(ops.qcfs(x, lam, 4), reference.qcfs(x, lam, 4))
    (grad_lam,) = torch.autograd.grad(ops.qcfs(x, lam, 4).sum(), [lam])
    (grad_lam_ref,) = torch.autograd.grad(reference.qcfs(x, lam, 4).sum(), [lam])
    torch.testing.assert_close(grad_lam, grad_lam_ref)


@pytest.mark.parametrize(
    "levels", [0, -3, True, 2.0, "8", None, 2**24 + 1], ids=["0", "neg", "bool", "float", "str", "None", "huge"]
)
def test_levels_not_a_positive_int(backend, levels):
    with pytest.raises(ValueError, match="^levels must be a positive int") as info:
        ops.qcfs(torch.ones(3), torch.tensor(1.0), levels)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="^levels must be a positive int"):
        rnl_fast.QCFS(levels=levels)


@pytest.mark.parametrize(
    "threshold",
    [torch.ones(2), torch.ones(0), 1.0, torch.tensor(1)],
    ids=["two-elements", "empty", "float", "int-tensor"],
)
def test_threshold_not_one_floating_element(backend, threshold):
    with pytest.raises(ValueError, match="^threshold must be a floating tensor with one element") as info:
        ops.qcfs(torch.ones(3), threshold, 4)
    assert "\n" not in str(info.value)


def test_empty_x_and_wrong_dtype(backend):
    with pytest.raises(ValueError, match=r"^x must have at least one element, got shape \(0, 3\)$"):
        ops.qcfs(torch.ones(0, 3), torch.tensor(1.0), 4)
    with pytest.raises(TypeError, match="^x must be float32, float64, float16 or bfloat16"):
        ops.qcfs(torch.ones(3, dtype=torch.int64), torch.tensor(1.0), 4)


def test_cpp_refuses_a_threshold_that_is_not_positive(monkeypatch):
    """The C++ backend reads λ on the host anyway, so it refuses λ ≤ 0 instead of dividing by it."""
    monkeypatch.setenv("RNL_FAST_BACKEND", "cpp")
    with pytest.raises(ValueError, match="threshold must be > 0"):
        ops.qcfs(torch.ones(3), torch.tensor(0.0), 4)


def test_module_trains_and_round_trips(backend):
    """rnl_fast.QCFS in a small net: the loss reaches λ (a nonzero gradient, a changed value after
    a step) and the weights; its state_dict restores a module that gives the same outputs."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 10), rnl_fast.QCFS(levels=4, threshold_init=1.5))
    x, target = torch.randn(16, 6), torch.randn(16, 10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before = net[1].threshold.detach().clone()
    loss = torch.nn.functional.mse_loss(net(x), target)
    loss.backward()
    assert net[1].threshold.grad is not None and net[1].threshold.grad.item() != 0
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    optimizer.step()
    assert net[1].threshold.item() != before.item()
    copy = torch.nn.Sequential(torch.nn.Linear(6, 10), rnl_fast.QCFS(levels=4))
    copy.load_state_dict(net.state_dict())
    assert copy[1].threshold.item() == net[1].threshold.item()
    assert torch.equal(copy(x), net(x))
    assert "levels=4" in repr(copy[1])
