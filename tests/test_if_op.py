"""The fused IF op against its pure-PyTorch definition, on every CPU-runnable backend."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _compare import assert_if_same

from rnl_fast import ops, reference
from rnl_fast.numerics import SURROGATES
from rnl_fast.ops import IFResult


def _reference(x, **kwargs) -> IFResult:
    return IFResult(*reference.if_sequence(x, **kwargs))


def _current(T: int, *neurons: int, dtype=torch.float32) -> torch.Tensor:
    """Random input current of mean ~0.3 so that neurons fire at assorted rates."""
    return (torch.randn(T, *neurons) * 0.8 + 0.3).to(dtype)


CASES = [
    pytest.param(dict(T=1, neurons=(5,)), id="T1"),
    pytest.param(dict(T=7, neurons=(1,)), id="one-neuron"),
    pytest.param(dict(T=13, neurons=(3, 37)), id="T13-odd"),
    pytest.param(dict(T=33, neurons=(2, 3, 5, 7)), id="T33-4d"),
    pytest.param(dict(T=9, neurons=(1100,)), id="T9-N1100-two-blocks"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("v_reset", [None, -0.2], ids=["soft", "hard"])
def test_forward_matches_reference(backend, case, v_reset):
    x = _current(case["T"], *case["neurons"])
    kwargs = dict(v_th=0.9, v_init=0.25, v_reset=v_reset)
    assert_if_same(ops.if_sequence(x, **kwargs), _reference(x, **kwargs))


def test_long_sequence(backend):
    T = 1000 if backend != "triton" else 1200
    x = _current(T, 3, 7) * 0.3
    assert_if_same(ops.if_sequence(x, v_th=0.7), _reference(x, v_th=0.7))


def test_neuron_counts_past_255(backend):
    """The C++ forward counts each neuron's spikes in a byte and adds them up before they wrap:
    a neuron that fires at every one of 601 steps (4 steps per pass, then single steps) must count
    601, one that fires every other step 300, and the step totals must not lose them."""
    T = 601
    x = torch.empty(T, 3)
    x[:, 0], x[:, 1], x[:, 2] = 1.0, 0.5, 0.0  # v_th = 1: fires every step, every other step, never
    out = ops.if_sequence(x, v_th=1.0)
    assert out.neuron_counts.tolist() == [601, 300, 0]
    assert out.step_counts.sum().item() == 901
    assert_if_same(out, _reference(x, v_th=1.0))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("v_reset", [None, -0.2], ids=["soft", "hard"])
def test_several_spans_per_thread(backend, threads, v_reset):
    """The C++ forward walks at most 2**19 neurons together: 1,100,001 neurons are three spans (the
    last one partial), shared by one or two threads; per-neuron thresholds and initial membranes
    must follow their neurons across the span boundaries, T = 6 runs one pass of 4 and two single
    steps."""
    if backend != "cpp":
        pytest.skip("spans and threads are the C++ forward's (and a million neurons are slow elsewhere)")
    N = 1_100_001
    x = _current(6, N)
    v_th, v_init = torch.rand(N) + 0.4, torch.randn(N) * 0.3
    kwargs = dict(v_th=v_th, v_init=v_init, v_reset=v_reset)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.if_sequence(x, **kwargs)
    finally:
        torch.set_num_threads(before)
    assert_if_same(out, _reference(x, **kwargs))


@pytest.mark.parametrize("threads", [1, 2])
def test_spans_at_every_offset_from_a_huge_page(threads):
    """The C++ forward cuts the neurons at the 2 MiB boundaries of the spike tensor, in an order
    that starts at the first boundary and wraps around (csrc/if_kernel.cpp, SpanCuts): every
    offset of the spikes from a boundary must give the reference's outputs (0: no wrap; 1 float:
    a one-neuron run at the end of the wrap; 524,287: a one-neuron run at its start). Calls the
    entry point directly, since the op allocates its spikes wherever the allocator puts them."""
    from rnl_fast.ops._backend import cpp, cpp_dtype, cpp_reset

    T, N, page = 5, 1_100_001, (2 << 20) // 4
    x = _current(T, N)
    v_th, v_init = torch.rand(N) + 0.4, torch.randn(N) * 0.3
    expected = _reference(x, v_th=v_th, v_init=v_init)
    for offset in (0, 1, 1024, 300_000, page - 1):
        buffer = torch.full((T * N + 2 * page,), 7.0)
        start = (page - buffer.data_ptr() // 4 % page) % page + offset
        spikes = buffer[start : start + T * N].view(T, N)
        v, steps = torch.empty(N), torch.empty(T, dtype=torch.int64)
        counts = torch.full((N,), 99, dtype=torch.int32)
        cpp().if_forward(
            x=x.data_ptr(), x_len=x.numel(), dtype=cpp_dtype(x.dtype), T=T, N=N, t_stride=N,
            v_th=v_th.data_ptr(), v_th_len=N, v_init=v_init.data_ptr(), v_init_len=N, v_reset=0.0,
            reset=cpp_reset(False), spikes=spikes.data_ptr(), spikes_len=spikes.numel(),
            spike_dtype=cpp_dtype(spikes.dtype), v_final=v.data_ptr(), v_final_len=N,
            step_counts=steps.data_ptr(), step_counts_len=T, neuron_counts=counts.data_ptr(),
            neuron_counts_len=N, num_threads=threads,
        )  # fmt: skip
        assert_if_same(IFResult(spikes, v, steps, counts), expected)
        assert torch.equal(counts, expected.spikes.sum(0).int())


def test_per_channel_threshold_and_membrane(backend):
    x = _current(11, 4, 3, 5)
    v_th = torch.rand(3, 1) + 0.3  # per channel, broadcast over the last dim
    v_init = torch.randn(4, 3, 5) * 0.2
    assert_if_same(ops.if_sequence(x, v_th=v_th, v_init=v_init), _reference(x, v_th=v_th, v_init=v_init))


def test_constant_input_stride_zero(backend):
    current = torch.rand(6, 17)
    x = current.expand(40, 6, 17)
    assert x.stride(0) == 0
    assert_if_same(ops.if_sequence(x, v_th=0.8), _reference(x.contiguous(), v_th=0.8))


def test_non_contiguous_input(backend):
    x = _current(12, 9, 8).transpose(1, 2)
    assert not x.is_contiguous()
    assert_if_same(ops.if_sequence(x), _reference(x.contiguous()))


def test_channels_last_input_keeps_its_layout(backend):
    x = _current(9, 2, 6, 5, 4).permute(0, 1, 4, 2, 3)  # [T, B, C, H, W] lying as [T, B, H, W, C]
    v_th = torch.rand(4, 1, 1) + 0.3
    fast = ops.if_sequence(x, v_th=v_th)
    assert_if_same(fast, _reference(x.contiguous(), v_th=v_th))
    if backend != "torch":
        assert fast.spikes.permute(0, 1, 3, 4, 2).is_contiguous()
    second = ops.if_sequence(x, v_th=v_th, v_init=fast.v)  # the carried membrane, same layout
    assert_if_same(second, _reference(x.contiguous(), v_th=v_th, v_init=fast.v))


@pytest.mark.parametrize("spike_dtype", [torch.uint8, torch.bool], ids=["uint8", "bool"])
def test_byte_spikes(backend, spike_dtype):
    x = _current(10, 3, 11)
    fast = ops.if_sequence(x, spike_dtype=spike_dtype)
    ref = _reference(x, spike_dtype=spike_dtype)
    assert_if_same(fast, ref)
    assert fast.spikes.dtype == spike_dtype
    assert set(fast.spikes.view(torch.uint8).unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_low_and_high_precision_inputs(backend, dtype):
    """fp16/bf16 inputs are computed in fp32: they match the fp32 reference of the same values."""
    x = _current(15, 4, 9, dtype=dtype)
    fast = ops.if_sequence(x, v_th=0.75)
    ref = _reference(x if dtype == torch.float64 else x.float(), v_th=0.75)
    assert fast.spikes.dtype == dtype
    assert torch.equal(fast.spikes.to(ref.spikes.dtype), ref.spikes)
    assert fast.v.dtype == ref.v.dtype
    torch.testing.assert_close(fast.v, ref.v)


def test_counts_are_sums_of_spikes(backend):
    x = _current(21, 5, 6)
    out = ops.if_sequence(x, v_th=0.6)
    assert torch.equal(out.step_counts, out.spikes.flatten(1).sum(1).long())
    assert torch.equal(out.neuron_counts.long(), out.spikes.sum(0).long())
    assert out.step_counts.dtype == torch.int64 and out.neuron_counts.dtype == torch.int32


def test_neuron_counts_can_be_skipped(backend):
    x = _current(12, 3, 17)
    full = ops.if_sequence(x, v_th=0.7)
    lean = ops.if_sequence(x, v_th=0.7, count_neurons=False)
    assert lean.neuron_counts is None
    assert torch.equal(lean.spikes, full.spikes) and torch.equal(lean.v, full.v)
    assert torch.equal(lean.step_counts, full.step_counts)


def test_chunked_calls_equal_one_call(backend):
    x = _current(30, 4, 5)
    whole = ops.if_sequence(x, v_th=0.7)
    v, spikes = torch.tensor(0.0), []
    for chunk in x.split([1, 9, 13, 7]):
        out = ops.if_sequence(chunk, v_th=0.7, v_init=v)
        v = out.v
        spikes.append(out.spikes)
    assert torch.equal(torch.cat(spikes), whole.spikes)
    assert torch.equal(v, whole.v)


def test_nan_input_silences_the_neuron(backend):
    """Documented: NaN makes the membrane NaN from that step on; a NaN membrane never fires."""
    x = torch.full((8, 3), 0.6)
    x[2, 1] = float("nan")
    out = ops.if_sequence(x, v_th=1.0)
    assert_if_same(out, _reference(x, v_th=1.0))
    assert out.spikes[2:, 1].sum() == 0
    assert torch.isnan(out.v[1]) and not torch.isnan(out.v[[0, 2]]).any()
    assert out.spikes[:, 0].sum() > 0


def test_nan_membrane_carries_over_chunks(backend):
    """A membrane silenced by NaN is a valid state: the next chunk takes it as v_init."""
    x = torch.full((8, 3), 0.6)
    x[2, 1] = float("nan")
    whole = ops.if_sequence(x, v_th=1.0)
    first = ops.if_sequence(x[:4], v_th=1.0)
    second = ops.if_sequence(x[4:], v_th=1.0, v_init=first.v)
    assert torch.equal(torch.cat([first.spikes, second.spikes]), whole.spikes)
    assert torch.isnan(second.v[1])


def test_outputs_are_fully_written(backend, poisoned_allocations):
    """Every output element comes from the kernel: allocations are poisoned before it runs."""
    x = _current(9, 3, 41)
    with poisoned_allocations():
        out = ops.if_sequence(x, v_th=0.8)
    assert_if_same(out, _reference(x, v_th=0.8))


# ─── backward ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("v_reset", [None, 0.1], ids=["soft", "hard"])
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("detach_reset", [False, True], ids=["reset-grad", "detach-reset"])
def test_backward_matches_reference(backend, v_reset, surrogate, detach_reset):
    x = _current(17, 3, 13).requires_grad_()
    v_init = (torch.randn(3, 13) * 0.3).requires_grad_()
    kwargs = dict(v_th=0.8, v_reset=v_reset, surrogate=surrogate, width=0.7, detach_reset=detach_reset)
    weight_s, weight_v = torch.randn(17, 3, 13), torch.randn(3, 13)
    grads = []
    for fn in (ops.if_sequence, reference.if_sequence):
        spikes, v, *_ = fn(x, v_init=v_init, **kwargs)
        grads.append(torch.autograd.grad((spikes * weight_s).sum() + (v * weight_v).sum(), [x, v_init]))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("v_reset", [None, 0.1], ids=["soft", "hard"])
def test_gradcheck_fp64(backend, v_reset):
    """Where the true derivative exists it is exact: with the reset detached, the final membrane
    is piecewise linear in x and in v_init (no surrogate enters), so finite differences apply.
    (Through the spikes the derivative is a surrogate by design: the test above covers it.)"""
    x = (torch.randn(6, 2, 5, dtype=torch.float64) * 0.8 + 0.3).requires_grad_()
    v_init = (torch.randn(2, 5, dtype=torch.float64) * 0.2).requires_grad_()

    def final_membrane(x, v_init):
        return ops.if_sequence(x, v_th=0.7, v_init=v_init, v_reset=v_reset, detach_reset=True).v

    assert torch.autograd.gradcheck(final_membrane, (x, v_init), eps=1e-7, atol=1e-6)


def test_backward_through_chunks_equals_one_call(backend):
    x = _current(20, 3, 4).requires_grad_()
    weight = torch.randn(20, 3, 4)
    (g_whole,) = torch.autograd.grad((ops.if_sequence(x, v_th=0.6).spikes * weight).sum(), x)
    v, loss = torch.tensor(0.0), 0.0
    for chunk, w in zip(x.split(7), weight.split(7)):
        out = ops.if_sequence(chunk, v_th=0.6, v_init=v)
        v, loss = out.v, loss + (out.spikes * w).sum()
    (g_chunks,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g_chunks, g_whole, rtol=1e-5, atol=1e-6)


def test_stride_zero_input_backward(backend):
    current = torch.rand(4, 6).requires_grad_()
    weight = torch.randn(25, 4, 6)
    grads = []
    for fn in (ops.if_sequence, reference.if_sequence):
        (g,) = torch.autograd.grad((fn(current.expand(25, 4, 6), v_th=0.5)[0] * weight).sum(), current)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_byte_spikes_carry_no_gradient(backend):
    x = _current(5, 7).requires_grad_()
    out = ops.if_sequence(x, spike_dtype=torch.uint8)
    assert not out.spikes.requires_grad
    out.v.sum().backward()  # the membrane still carries a gradient
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_backward_fp64_matches_reference(backend, surrogate):
    """float64 input: the surrogate is evaluated in float64 on every backend."""
    x = _current(12, 2, 9, dtype=torch.float64).requires_grad_()
    weight = torch.randn(12, 2, 9, dtype=torch.float64)
    kwargs = dict(v_th=0.8, surrogate=surrogate, width=0.3)
    grads = [
        torch.autograd.grad((fn(x, **kwargs)[0] * weight).sum(), x)[0]
        for fn in (ops.if_sequence, reference.if_sequence)
    ]
    assert grads[0].dtype == torch.float64
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def _spike_grad_of_one_step(u: torch.Tensor, width: float) -> torch.Tensor:
    """d spikes[0] / d x[0] with T = 1, v_th = 1, v_init = 0: σ'(x − 1), the sigmoid surrogate alone."""
    x = (1.0 + u).unsqueeze(0).requires_grad_()
    out = ops.if_sequence(x, v_th=1.0, surrogate="sigmoid", width=width)
    (grad,) = torch.autograd.grad(out.spikes.sum(), x)
    return grad[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("width", [0.25, 0.7])
def test_sigmoid_surrogate_at_the_threshold(backend, dtype, width):
    """m − θ = 0 exactly (1 + 0 − 1): σ'(0) = S(0)·(1 − S(0))/w = 1/(4w), SpikingJelly's alpha/4."""
    grad = _spike_grad_of_one_step(torch.zeros(3, dtype=dtype), width)
    expected = torch.full((3,), (1.0 / width) / 4, dtype=dtype)
    torch.testing.assert_close(grad, expected, rtol=1e-7 if dtype == torch.float32 else 1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sigmoid_surrogate_far_from_the_threshold(backend, dtype):
    """|m − θ|/w from 100 to 1e30: the gradient is 0 (or a subnormal at 100/w), never NaN or inf;
    an exp(+|z|) or a 1 − S(z) would overflow or cancel here."""
    width = 0.5
    z = torch.tensor([100.0, 1e3, 1e4, 1e30], dtype=dtype)
    grad = _spike_grad_of_one_step(torch.cat([z, -z]) * width, width)
    assert torch.isfinite(grad).all() and (grad >= 0).all()
    assert (grad <= 1e-40).all(), grad  # true value 2·exp(−100) ≈ 7e−44 at |z| = 100
    assert (grad[[1, 2, 3, 5, 6, 7]] == 0).all()


@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="spikingjelly not installed")
def test_sigmoid_surrogate_equals_spikingjelly_sigmoid():
    """reference.surrogate_grad(u, "sigmoid", 1/alpha) is SpikingJelly 2.0's sigmoid_backward(u, alpha),
    alpha·S(alpha·u)·(1 − S(alpha·u)), to 1e-6 relative in float64 over |alpha·u| ≤ 20. (Not to the last
    bit: SpikingJelly's 1 − S(alpha·u) cancels for large alpha·u, 5e-8 relative at 20; ours does not.)"""
    from spikingjelly.activation_based.surrogate import sigmoid_backward

    for alpha in (4.0, 1.0, 2.5, 10.0):
        u = torch.linspace(-20.0, 20.0, 4001, dtype=torch.float64) / alpha
        ours = reference.surrogate_grad(u, "sigmoid", 1.0 / alpha)
        theirs, _ = sigmoid_backward(torch.ones_like(u), u, alpha)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="spikingjelly not installed")
def test_atan_and_rectangle_equal_spikingjelly_atan_and_rect():
    """The README's table: "atan" with width w is SpikingJelly's ATan(alpha=2/w), "rectangle" is
    Rect(alpha=1/w) (alpha/2/(1 + (π/2·alpha·u)²) and alpha·[|u| < 0.5/alpha] in its source)."""
    from spikingjelly.activation_based.surrogate import atan_backward, rect_backward

    u = torch.linspace(-3.0, 3.0, 6001, dtype=torch.float64)
    for width in (1.0, 0.5, 0.7, 2.0):
        theirs, _ = atan_backward(torch.ones_like(u), u, 2.0 / width)
        torch.testing.assert_close(reference.surrogate_grad(u, "atan", width), theirs, rtol=1e-12, atol=0)
    for width in (1.0, 0.5, 0.25, 2.0):  # dyadic: 0.5/alpha is then exactly w/2, the same window edge
        theirs, _ = rect_backward(torch.ones_like(u), u, 1.0 / width)
        assert torch.equal(reference.surrogate_grad(u, "rectangle", width), theirs)


# ─── the persistent backward kernel (RNL_FAST_IF_BWD=slots, Triton) ─────────────────────────────
# Under the interpreter it runs P = 3 programs of BLOCK = 128 neurons whatever N
# (kernels/_autotune.py): N = 1000 gives 8 blocks, programs 0 and 1 taking 3 each (the last one
# partial, 104 neurons) and program 2 taking 2; N = 256 leaves program 2 without a block, N = 50
# (< BLOCK) programs 1 and 2. The interpreter runs programs one after another, so the races a
# missing barrier would cause show on a GPU only (test_gpu.py); the slot layout is checked below.


@pytest.fixture
def triton_backend(monkeypatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("RNL_FAST_BACKEND", "triton")


def _grads_of_both_kernels(monkeypatch, grads_of) -> tuple:
    """``grads_of()`` under RNL_FAST_IF_BWD=scratch, then under =slots."""
    results = []
    for kernel in ("scratch", "slots"):
        monkeypatch.setenv("RNL_FAST_IF_BWD", kernel)
        results.append(grads_of())
    return tuple(results)


def _if_grads(fn, x, v_init, weight_s, weight_v, **kwargs) -> tuple[torch.Tensor, ...]:
    """Gradients of ``(spikes·weight_s).sum() + (v·weight_v).sum()`` w.r.t. x and v_init (those
    that require grad); a None weight leaves its term out, so that term's gradient reaches the
    backward as None (no zero-filled tensor)."""
    spikes, v, *_ = fn(x, v_init=v_init, **kwargs)
    loss = sum((out * w).sum() for out, w in ((spikes, weight_s), (v, weight_v)) if w is not None)
    return torch.autograd.grad(loss, [t for t in (x, v_init) if isinstance(t, torch.Tensor) and t.requires_grad])


def _assert_slots_equal_scratch_and_reference(monkeypatch, x, v_init, weight_s, weight_v, exact_ref, **kwargs):
    scratch, slots = _grads_of_both_kernels(
        monkeypatch, lambda: _if_grads(ops.if_sequence, x, v_init, weight_s, weight_v, **kwargs)
    )
    ref = _if_grads(reference.if_sequence, x, v_init, weight_s, weight_v, **kwargs)
    for fast, other, expected in zip(slots, scratch, ref):
        assert fast.dtype == expected.dtype
        assert torch.equal(fast, other), "the slots kernel differs from the scratch kernel"
        if exact_ref:
            assert torch.equal(fast, expected), "the slots kernel differs from the reference"
        else:
            torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("v_reset", [None, 0.1], ids=["soft", "hard"])
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("detach_reset", [False, True], ids=["reset-grad", "detach-reset"])
def test_slots_backward_matches_scratch_and_reference(triton_backend, monkeypatch, v_reset, surrogate, detach_reset):
    """Every branch of the shared per-block body, through slots, over 8 blocks in 3 programs with a
    partial last block. Catches a slot kernel that reads back another row than it wrote (a row
    stride of N, a pass 2 that starts one row off), or that skips a block (its grad_x would be the
    allocator's garbage). Bit for bit against the scratch kernel; against the reference too for
    the rectangle (atan and sigmoid differ there by an ulp in σ', as the scratch kernel's do)."""
    x = _current(9, 1000).requires_grad_()
    v_init = (torch.randn(1000) * 0.3).requires_grad_()
    kwargs = dict(v_th=torch.rand(1000) + 0.5, v_reset=v_reset, surrogate=surrogate, width=0.7)
    weights = (torch.randn(9, 1000), torch.randn(1000))
    exact = surrogate == "rectangle"
    _assert_slots_equal_scratch_and_reference(
        monkeypatch, x, v_init, *weights, exact, detach_reset=detach_reset, **kwargs
    )


@pytest.mark.parametrize("neurons", [50, 256, 1000], ids=["N50-below-block", "N256-idle-program", "N1000"])
@pytest.mark.parametrize("per_neuron", [True, False], ids=["per-neuron", "scalar"])
def test_slots_backward_block_counts_and_scalar_state(triton_backend, monkeypatch, neurons, per_neuron):
    """N below one block and N leaving programs without a block (P > blocks: such a program must
    write nothing, and the loop bound must not let it into a block past the end); a scalar v_th
    and v_init (one value broadcast in the shared body) beside per-neuron ones."""
    x = _current(6, neurons).requires_grad_()
    if per_neuron:
        v_th, v_init = torch.rand(neurons) + 0.5, (torch.randn(neurons) * 0.3).requires_grad_()
    else:
        v_th, v_init = torch.tensor(0.8), torch.tensor(0.2).requires_grad_()
    _assert_slots_equal_scratch_and_reference(
        monkeypatch, x, v_init, torch.randn(6, neurons), torch.randn(neurons), True, v_th=v_th, surrogate="rectangle"
    )


@pytest.mark.parametrize("term", ["spikes", "membrane"], ids=["no-grad-v-final", "no-grad-spikes"])
def test_slots_backward_with_one_output_in_the_loss(triton_backend, monkeypatch, term):
    """Only the spikes or only the final membrane in the loss: the other gradient is None, the
    kernel's HAS_GRAD_* switch off (a placeholder pointer that must not be read)."""
    x = _current(8, 700).requires_grad_()
    v_init = (torch.randn(700) * 0.3).requires_grad_()
    weight_s, weight_v = torch.randn(8, 700), torch.randn(700)
    weights = (weight_s, None) if term == "spikes" else (None, weight_v)
    _assert_slots_equal_scratch_and_reference(
        monkeypatch, x, v_init, *weights, True, v_th=0.7, v_reset=-0.1, surrogate="rectangle"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_slots_backward_dtypes(triton_backend, monkeypatch, dtype):
    """A slot holds the compute dtype (float64 for float64 x, 8-byte elements: a slot offset or row
    sized for 4 would overlap); grad_x comes out in x's dtype. bf16 against the reference only to
    its rounding: the reference rounds the spikes' gradient to bf16 where the kernels keep fp32."""
    x = _current(7, 600, dtype=dtype).requires_grad_()
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    v_init = (torch.randn(600, dtype=compute) * 0.3).requires_grad_()
    weights = (torch.randn(7, 600).to(dtype), torch.randn(600, dtype=compute))
    scratch, slots = _grads_of_both_kernels(
        monkeypatch, lambda: _if_grads(ops.if_sequence, x, v_init, *weights, v_th=0.8, surrogate="sigmoid")
    )
    ref = _if_grads(reference.if_sequence, x, v_init, *weights, v_th=0.8, surrogate="sigmoid")
    assert slots[0].dtype == dtype and slots[1].dtype == compute
    for fast, other, expected in zip(slots, scratch, ref):
        assert torch.equal(fast, other)
        tolerance = {} if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.to(expected.dtype), expected, **tolerance)


def test_slots_backward_constant_input(triton_backend, monkeypatch):
    """x expanded over time (stride 0 in T): every block of every program reads its row of x at
    each step; the gradient of the expanded input sums grad_x over T (autograd)."""
    current = (torch.rand(5, 130) * 0.6).requires_grad_()
    weight = torch.randn(20, 5, 130)

    def grads():
        return torch.autograd.grad(
            (ops.if_sequence(current.expand(20, 5, 130), v_th=0.7).spikes * weight).sum(), current
        )

    scratch, slots = _grads_of_both_kernels(monkeypatch, grads)
    assert torch.equal(slots[0], scratch[0])
    (ref,) = torch.autograd.grad(
        (reference.if_sequence(current.expand(20, 5, 130), v_th=0.7)[0] * weight).sum(), current
    )
    torch.testing.assert_close(slots[0], ref, rtol=1e-4, atol=1e-5)


def _scratch_of_if_bwd(monkeypatch, kernel: str, x: torch.Tensor, grad_spikes: torch.Tensor) -> torch.Tensor:
    """The scratch of one launcher call with RNL_FAST_IF_BWD=``kernel`` (its one allocation),
    NaN-filled before the kernel runs, as ``poisoned_allocations`` does."""
    from rnl_fast.kernels import if_bwd

    monkeypatch.setenv("RNL_FAST_IF_BWD", kernel)
    T, N = x.shape
    grad_x, grad_v_init = torch.empty(T, N), torch.empty(N)
    created, real_empty = [], torch.empty

    def recording_empty(*args, **kwargs):
        created.append(real_empty(*args, **kwargs).fill_(float("nan")))
        return created[-1]

    monkeypatch.setattr(torch, "empty", recording_empty)
    try:
        if_bwd(
            grad_spikes,
            None,
            x,
            torch.tensor(0.8),
            torch.tensor(0.0),
            0.0,
            False,
            "atan",
            1.0,
            False,
            grad_x,
            grad_v_init,
        )
    finally:
        monkeypatch.setattr(torch, "empty", real_empty)
    (scratch,) = created
    return scratch


def test_slots_hold_the_membrane_of_their_programs_last_block(triton_backend, monkeypatch):
    """The scratch itself, after a slots call: slot p = rows t = 0..T−1 of m_t for the last block
    that program p took (as the scratch kernel's [T, N] scratch has them). Catches
    slots that overlap (an offset of p·BLOCK or p·T, where the interpreter, running programs in
    turn, would still give right gradients: a later program overwrites an earlier one's slot), a
    slot written with another row stride, a block loop that visits other blocks than p, p + P, …
    (the last one would differ), and a partial block that writes its slot past N."""
    from rnl_fast.kernels._autotune import INTERPRETER_PROGRAMS, persistent_block

    block, programs = persistent_block()["BLOCK"], INTERPRETER_PROGRAMS
    T, N = 5, 4 * block + 40  # 5 blocks over 3 programs: 0 takes 0 and 3, 1 takes 1 and 4 (partial), 2 takes 2
    blocks = -(-N // block)
    x, grad_spikes = _current(T, N), torch.randn(T, N)
    membrane = _scratch_of_if_bwd(monkeypatch, "scratch", x, grad_spikes)
    slots = _scratch_of_if_bwd(monkeypatch, "slots", x, grad_spikes)
    assert membrane.shape == (T, N) and slots.shape == (programs, T, block)
    for program in range(programs):
        last = program + (blocks - 1 - program) // programs * programs
        columns = membrane[:, last * block : (last + 1) * block]
        width = columns.shape[1]  # < block for the last, partial block
        assert torch.equal(slots[program, :, :width], columns), f"slot {program}"
        # Past N the partial block writes nothing: what the program's previous block left, or NaN.
        earlier = membrane[:, (last - programs) * block + width : (last - programs + 1) * block]
        beyond = slots[program, :, width:]
        assert torch.equal(beyond, earlier) if last >= programs else beyond.isnan().all()


def test_slots_backward_many_blocks_per_program(triton_backend, monkeypatch):
    """N = 3000: 24 blocks, 8 per program: a block loop that stops one short (range to blocks − 1)
    or strides by 1 instead of P would leave or double-process blocks, seen in grad_x."""
    x = _current(4, 3000).requires_grad_()
    _assert_slots_equal_scratch_and_reference(
        monkeypatch, x, 0.0, torch.randn(4, 3000), None, True, v_th=0.9, surrogate="rectangle"
    )


@pytest.mark.parametrize("value", ["slot", "SCRATCHY", "1"])
def test_invalid_if_backward_kernel_is_named(triton_backend, monkeypatch, value):
    monkeypatch.setenv("RNL_FAST_IF_BWD", value)
    x = _current(3, 10).requires_grad_()
    out = ops.if_sequence(x)
    with pytest.raises(ValueError, match=r"RNL_FAST_IF_BWD must be one of \('scratch', 'slots'\)"):
        out.spikes.sum().backward()


def test_slot_programs_sizing_rule():
    """The launch sizing on an H200 (132 SMs, 50 MiB L2: half, 25 MiB, for slots) with 256-neuron
    fp32 slots of T rows: at T = 32, 800 slots of 32 KiB fit, 6 per SM: 792 programs (an SM with a
    7th may finish last); T = 48 is the largest T that still gives 4 programs per SM; above it,
    or at T = 256 (100 slots), the caller falls back (None); fewer blocks than slots take a
    program each, even at large T."""
    pytest.importorskip("triton")
    from rnl_fast.kernels._autotune import l2_slot_programs

    l2, sms = 50 * 2**20, 132
    blocks = 2**24 // 256  # N = 16M

    def slot(T: int) -> int:
        return T * 256 * 4

    assert l2_slot_programs(blocks, slot(32), l2, sms) == 792
    assert l2_slot_programs(blocks, slot(48), l2, sms) == 528
    assert l2_slot_programs(blocks, slot(49), l2, sms) is None
    assert l2_slot_programs(blocks, slot(256), l2, sms) is None
    assert l2_slot_programs(10, slot(256), l2, sms) == 10
    assert l2_slot_programs(2000, slot(4), l2, sms) == 2000
    assert l2_slot_programs(7000, slot(4), l2, sms) == 6336  # 6400 fit: 48 per SM
