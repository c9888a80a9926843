"""Property-based tests (hypothesis): every backend against the reference on drawn inputs.

What is drawn: T, shapes (size-1, odd, empty), dtypes, layouts (transposed, a stride-0 time dim,
a one-element slice with a stride, channels-last), per-channel and scalar parameters, tensor
initial membranes, soft and hard reset, spike dtypes, values on the rules' boundaries (exact
dyadic multiples of θ, zero) and extreme ones (±1e30, ±inf, NaN), and the backward with every
surrogate. Bounded so that the suite stays within CI's time: ``RNL_FAST_FUZZ_EXAMPLES`` (default
50) examples per test and backend; a failure prints the drawn case, and hypothesis replays it.
"""

from __future__ import annotations

import os

import pytest
import torch
from _compare import assert_if_same
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rnl_fast import ops, reference
from rnl_fast.numerics import SURROGATES
from rnl_fast.ops import IFResult, RateNormResult

EXAMPLES = int(os.environ.get("RNL_FAST_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Values a neuron's input may take: ordinary ones, exact multiples of ¼ (which reach θ = 1 or
# θ = 0.5 exactly), zero, large ones, and the non-finite ones.
BOUNDARY = [0.0, 0.25, 0.5, 0.75, 1.0, -0.25, -0.5]
EXTREME = [1e30, -1e30, float("inf"), float("-inf"), float("nan")]


@st.composite
def currents(draw, max_dims: int = 3, min_size: int = 0, finite: bool = False):
    """An input current ``[T, *neurons]`` in some dtype and memory layout."""
    T = draw(st.integers(1, 9))
    neurons = draw(st.lists(st.integers(min_size, 5), min_size=1, max_size=max_dims))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["normal", "boundary", "mixed"] + ([] if finite else ["extreme"])))
    n = T * int(torch.tensor(neurons).prod())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))  # replayable: drawn, not global
    values = torch.randn(n, dtype=torch.float64, generator=g) * 0.7 + 0.3
    special = BOUNDARY + ([] if finite else EXTREME)
    if kind == "boundary":
        values = torch.tensor(special[:7], dtype=torch.float64)[torch.randint(0, 7, (n,), generator=g)]
    elif kind in ("mixed", "extreme") and n:
        picks = torch.rand(n, generator=g) < (0.3 if kind == "mixed" else 0.1)
        pool = torch.tensor(special, dtype=torch.float64)
        values[picks] = pool[torch.randint(0, len(special), (int(picks.sum()),), generator=g)]
    x = values.reshape(T, *neurons).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "time-stride-0", "strided-slice"]))
    if layout == "transposed" and x.dim() >= 3:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "time-stride-0":
        x = x[:1].expand(T, *x.shape[1:])
    elif layout == "strided-slice":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    return x


@st.composite
def if_options(draw, x: torch.Tensor):
    """Threshold, initial membrane and reset for neurons ``x.shape[1:]``."""
    _seed_from(draw)
    neuron_shape = x.shape[1:]
    if draw(st.booleans()):
        v_th = draw(st.sampled_from([1.0, 0.5, 0.3, 2.0]))
    else:  # per last dim, broadcast over the rest
        v_th = torch.rand(neuron_shape[-1]) * 1.5 + 0.2
    v_init = draw(st.sampled_from(["zero", "float", "tensor"]))
    v_init = {"zero": 0.0, "float": 0.25, "tensor": torch.randn(neuron_shape) * 0.3}[v_init]
    v_reset = draw(st.sampled_from([None, None, 0.0, -0.3]))
    return dict(v_th=v_th, v_init=v_init, v_reset=v_reset)


def _seed_from(draw) -> None:
    """Seeds torch's global generator from a drawn integer: every tensor of the example is then a
    function of hypothesis's draws, so a failure replays (and shrinks)."""
    torch.manual_seed(draw(st.integers(0, 2**32 - 1)))


@FUZZ
@given(data=st.data())
def test_if_forward(backend, data):
    x = data.draw(currents())
    options = data.draw(if_options(x))
    spike_dtype = data.draw(st.sampled_from([None, torch.uint8, torch.bool]))
    if x.numel() == 0:  # documented: no neurons is an error, not an empty result
        with pytest.raises(ValueError, match="at least one neuron"):
            ops.if_sequence(x, spike_dtype=spike_dtype, **options)
        return
    fast = ops.if_sequence(x, spike_dtype=spike_dtype, **options)
    ref = IFResult(*reference.if_sequence(x, spike_dtype=spike_dtype, **options))
    assert_if_same(fast, ref, exact_v=True)


@FUZZ
@given(data=st.data())
def test_if_backward(backend, data):
    """Every surrogate, both resets, detach_reset, a loss through the spikes and the membrane."""
    _seed_from(data.draw)
    x = data.draw(currents(finite=True, min_size=1))
    assume(x.dtype in (torch.float32, torch.float64))
    options = data.draw(if_options(x))
    surrogate = data.draw(st.sampled_from(SURROGATES))
    width = data.draw(st.sampled_from([0.25, 1.0, 1.7]))
    detach_reset = data.draw(st.booleans())
    w_spikes = torch.randn(x.shape, dtype=x.dtype)
    w_v = torch.randn(x.shape[1:], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    grads = []
    for fn in (ops.if_sequence, reference.if_sequence):
        xg = x.detach().clone().requires_grad_()
        spikes, v, _, _ = fn(xg, surrogate=surrogate, width=width, detach_reset=detach_reset, **options)
        ((spikes * w_spikes).sum() + (v * w_v).sum()).backward()
        grads.append(xg.grad)
    tol = dict(rtol=1e-9, atol=1e-12) if x.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], **tol)


@FUZZ
@given(data=st.data())
def test_if_pool_forward(backend, data):
    _seed_from(data.draw)
    T = data.draw(st.integers(1, 6))
    H, W = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7))
    ceil_mode = data.draw(st.booleans())
    assume((H >= 2 and W >= 2) or ceil_mode)
    dtype = data.draw(st.sampled_from(DTYPES))
    x = (torch.randn(T, 2, 3, H, W) * 0.7 + 0.3).to(dtype)
    if data.draw(st.booleans()):  # channels-last planes
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    if data.draw(st.booleans()):  # exact quarters: membranes that reach θ = 1 exactly
        x = (torch.randint(-2, 5, x.shape) * 0.25).to(dtype)
    v_reset = data.draw(st.sampled_from([None, 0.0]))
    scale = data.draw(st.sampled_from([1.0, 0.37, 2.5]))
    with torch.no_grad():
        fast = IFResult(*ops.if_sequence_pool2x2(x, 0.9, 0.1, v_reset, scale=scale, ceil_mode=ceil_mode))
        ref = IFResult(*reference.if_sequence_pool2x2(x, 0.9, 0.1, v_reset, scale=scale, ceil_mode=ceil_mode))
    torch.testing.assert_close(fast.spikes, ref.spikes, rtol=0, atol=0)  # pooled spikes · scale
    torch.testing.assert_close(fast.v, ref.v, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast.step_counts, ref.step_counts)


@FUZZ
@given(data=st.data())
def test_rate_norm_forward_and_backward(backend, data):
    _seed_from(data.draw)
    channel_wise = data.draw(st.booleans())
    B, C = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    inner = data.draw(st.lists(st.integers(1, 6), min_size=0, max_size=2))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    levels = data.draw(st.sampled_from([None, 1, 2, 8]))
    training = data.draw(st.booleans())
    momentum = data.draw(st.sampled_from([0.1, 0.5, 1.0]))
    x = torch.randn(B, C, *inner, dtype=torch.float64) * 1.5 + 0.4
    if data.draw(st.booleans()):  # values on the clip points: 0 and multiples of ¼ around θ
        x = torch.randint(-2, 9, x.shape).double() * 0.25
    x = x.to(dtype)
    if channel_wise and x.dim() == 4 and data.draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    raw_p = torch.tensor(data.draw(st.sampled_from([10.0, 0.0, -1.5, 2.0])))
    shape = (C,) if channel_wise else ()
    running_max = torch.rand(shape) * 2 + 0.25
    weight = torch.randn(x.shape, dtype=dtype)
    results, grads = [], []
    for fn in (ops.rate_norm, reference.rate_norm):
        xg, pg = x.detach().clone().requires_grad_(), raw_p.clone().requires_grad_()
        out = RateNormResult(*fn(xg, pg, running_max, momentum, training, channel_wise, levels))
        loss = (out.r * weight).sum() + 0.3 * out.sum_r / (out.sum_r2 + 1e-5)
        grads.append(torch.autograd.grad(loss, [xg, pg]))
        results.append(out)
    fast, ref = results
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.running_max, ref.running_max, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast.r, ref.r, **tol)
    torch.testing.assert_close(fast.sum_r, ref.sum_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.sum_r2, ref.sum_r2, rtol=1e-5, atol=1e-6)
    gtol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for g_fast, g_ref in zip(*grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, **gtol)


@FUZZ
@given(data=st.data())
def test_qcfs_forward_and_backward(backend, data):
    _seed_from(data.draw)
    shape = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    dtype = data.draw(st.sampled_from(DTYPES))
    levels = data.draw(st.sampled_from([1, 2, 4, 8, 255]))
    threshold = torch.tensor(data.draw(st.sampled_from([1.0, 0.7, 3.0])))
    x = torch.randn(shape, dtype=torch.float64) * 1.2 + 0.3
    if data.draw(st.booleans()):  # rounding ties x/λ·L + ½ = k exactly
        x = (torch.randint(-4, 4 * levels + 4, shape).double() / (2 * levels)) * threshold.double()
    x = x.to(dtype)
    out = []
    for fn in (ops.qcfs, reference.qcfs):
        xg, tg = x.detach().clone().requires_grad_(), threshold.clone().requires_grad_()
        y = fn(xg, tg, levels)
        gx, gt = torch.autograd.grad((y.float() * torch.arange(y.numel()).reshape(y.shape).float()).sum(), [xg, tg])
        out.append((y, gx, gt))
    (y_fast, gx_fast, gt_fast), (y_ref, gx_ref, gt_ref) = out
    assert torch.equal(y_fast, y_ref)
    assert torch.equal(gx_fast, gx_ref)
    # dλ sums over every element (in double in C++, float32 in the reference): rounding only.
    torch.testing.assert_close(gt_fast, gt_ref, rtol=1e-4, atol=1e-4 * float(gt_ref.abs().max().clamp_min(1)))
