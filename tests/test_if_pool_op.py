"""IF neurons fused with 2×2 average pooling (ops.if_sequence_pool2x2) against the reference,
on every CPU-runnable backend, and the same op as IFSequence.forward_pool2x2."""

from __future__ import annotations

import pytest
import torch
from _compare import assert_if_same

import rnl_fast
from rnl_fast import ops, reference
from rnl_fast.ops import IFResult


def _reference(x, v_th=1.0, **kwargs) -> IFResult:
    # The threshold as the op hands it to its kernels: the reference takes it already broadcast.
    v_th = v_th if not isinstance(v_th, torch.Tensor) else v_th.expand(x.shape[1:])
    return IFResult(*reference.if_sequence_pool2x2(x, v_th, **kwargs))


def _assert_same(fast: IFResult, ref: IFResult) -> None:
    assert_if_same(fast, ref, exact_v=True, what="pooled rates")


def _current(T: int, *neurons: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(T, *neurons) * 0.6 + 0.3).to(dtype)


SHAPES = [
    pytest.param((9, 2, 3, 8, 6), id="even"),
    pytest.param((11, 2, 3, 7, 9), id="odd-H-W"),
    pytest.param((5, 1, 3, 3), id="no-batch-dim"),
    pytest.param((3, 2, 1, 2, 2), id="one-window"),
    pytest.param((17, 1, 2, 28, 28), id="mnist-plane-T17"),
    pytest.param((4, 1, 2, 67, 65), id="planes-over-4096-split-in-row-bands"),
    pytest.param((4, 1, 2, 69, 64), id="row-bands-even-W-odd-H"),
    pytest.param((6, 2, 3, 6, 4), id="W4-narrower-than-a-word"),
    pytest.param((6, 2, 3, 5, 10), id="W10-overlapping-words"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("v_reset", [None, -0.1], ids=["soft", "hard"])
def test_matches_reference(backend, shape, ceil_mode, v_reset):
    x = _current(*shape)
    kwargs = dict(v_init=0.2, v_reset=v_reset, scale=0.37, ceil_mode=ceil_mode)
    _assert_same(ops.if_sequence_pool2x2(x, 0.8, **kwargs), _reference(x, 0.8, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["fp64", "fp16", "bf16"])
def test_other_dtypes(backend, dtype):
    x = _current(10, 2, 3, 7, 6, dtype=dtype)
    kwargs = dict(scale=1.7, ceil_mode=True)
    fast = ops.if_sequence_pool2x2(x, 0.6, **kwargs)
    _assert_same(fast, _reference(x, 0.6, **kwargs))
    assert fast.spikes.dtype == dtype


def test_per_channel_threshold_constant_input_and_membrane(backend):
    current = torch.rand(2, 4, 6, 5)
    x = current.expand(21, *current.shape)  # constant coding: stride 0 in T
    v_th = torch.rand(4, 1, 1) + 0.3
    v_init = torch.randn(2, 4, 6, 5) * 0.2
    fast = ops.if_sequence_pool2x2(x, v_th, v_init=v_init, scale=2.5)
    _assert_same(fast, _reference(x.contiguous(), v_th, v_init=v_init, scale=2.5))


def test_equals_if_sequence_then_avg_pool(backend):
    """The op's definition in terms of the public unfused op and torch's own pooling."""
    x = _current(13, 3, 2, 9, 10)
    fused = ops.if_sequence_pool2x2(x, 0.7, scale=0.5, ceil_mode=True)
    plain = ops.if_sequence(x, 0.7)
    pooled = torch.nn.functional.avg_pool2d(plain.spikes.flatten(0, 1), 2, ceil_mode=True) * 0.5
    assert torch.equal(fused.spikes, pooled.view_as(fused.spikes))
    for name in ("v", "step_counts", "neuron_counts"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name


def test_chunked_calls_equal_one_call(backend):
    x = _current(30, 2, 2, 5, 6)
    whole = ops.if_sequence_pool2x2(x, 0.7)
    v, pooled = torch.tensor(0.0), []
    for chunk in x.split([1, 9, 13, 7]):
        out = ops.if_sequence_pool2x2(chunk, 0.7, v_init=v)
        v = out.v
        pooled.append(out.spikes)
    assert torch.equal(torch.cat(pooled), whole.spikes)
    assert torch.equal(v, whole.v)


def test_outputs_are_fully_written(backend, poisoned_allocations):
    x = _current(9, 2, 3, 7, 7)
    with poisoned_allocations():
        out = ops.if_sequence_pool2x2(x, 0.8)
    _assert_same(out, _reference(x, 0.8))


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        pytest.param(torch.ones(4, 5), {}, ValueError, r"\[T, \*, H, W\]", id="too-few-dims"),
        pytest.param(torch.ones(4, 3, 1, 5), {}, ValueError, "does not fit", id="H1-floor"),
        pytest.param(torch.ones(4, 3, 6, 5), dict(scale=float("inf")), ValueError, "scale", id="inf-scale"),
        pytest.param(torch.ones(4, 3, 6, 5), dict(v_reset=float("nan")), ValueError, "v_reset", id="nan-reset"),
        pytest.param(torch.ones(4, 3, 6, 5).requires_grad_(), {}, RuntimeError, "inference only", id="grad"),
        pytest.param(torch.ones(4, 3, 6, 5, dtype=torch.int32), {}, TypeError, "float32", id="int-input"),
    ],
)
def test_bad_inputs(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.if_sequence_pool2x2(x, **kwargs)


def test_no_grad_context_allows_inputs_that_require_grad():
    x = _current(4, 1, 3, 4, 4).requires_grad_()
    with torch.no_grad():
        out = ops.if_sequence_pool2x2(x, 0.5)
    assert out.spikes.shape == (4, 1, 3, 2, 2) and not out.spikes.requires_grad


def test_module_method_carries_state_like_forward(backend):
    x = _current(12, 2, 3, 6, 7)
    fused, plain = rnl_fast.IFSequence(v_threshold=0.6), rnl_fast.IFSequence(v_threshold=0.6)
    pooled = [fused.forward_pool2x2(c, scale=3.0) for c in x.split([5, 7])]
    spikes = torch.cat([plain(c) for c in x.split([5, 7])])
    expected = reference.avg_pool2x2(spikes) * 3.0
    assert torch.equal(torch.cat(pooled), expected)
    assert torch.equal(fused.v, plain.v)
    assert torch.equal(fused.step_spike_counts, plain.step_spike_counts)
    assert torch.equal(fused.neuron_spike_counts, plain.neuron_spike_counts)


def _channels_last(T: int, B: int, C: int, H: int, W: int) -> torch.Tensor:
    """``[T, B, C, H, W]`` whose memory is ``[T, B, H, W, C]`` (a channels-last conv output)."""
    return _current(T, B, H, W, C).permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
def test_channels_last_input(backend, ceil_mode):
    x = _channels_last(7, 2, 5, 7, 6)
    v_th = torch.rand(5, 1, 1) + 0.3
    fast = ops.if_sequence_pool2x2(x, v_th, scale=0.6, ceil_mode=ceil_mode)
    _assert_same(fast, _reference(x.contiguous(), v_th, scale=0.6, ceil_mode=ceil_mode))
    if backend != "torch":  # the kernels keep the layout: no copy in, channels-last out
        assert fast.spikes.permute(0, 1, 3, 4, 2).is_contiguous()
        assert fast.v.permute(0, 2, 3, 1).is_contiguous()


def test_channels_last_constant_input_and_chunks(backend):
    current = _channels_last(1, 3, 4, 6, 5)[0]
    x = current.expand(20, *current.shape)
    whole = ops.if_sequence_pool2x2(x, 0.7)
    _assert_same(whole, _reference(x.contiguous(), 0.7))
    first = ops.if_sequence_pool2x2(x[:8], 0.7)
    second = ops.if_sequence_pool2x2(x[8:], 0.7, v_init=first.v)  # the carried channels-last membrane
    assert torch.equal(torch.cat([first.spikes, second.spikes]), whole.spikes)
    assert torch.equal(second.v, whole.v)


def test_layout_the_kernels_cannot_use_in_place_is_copied(backend):
    x = _current(5, 2, 3, 8, 12)[..., ::2]  # not dense in any order
    _assert_same(ops.if_sequence_pool2x2(x, 0.5), _reference(x.contiguous(), 0.5))
    y = _current(5, 2, 6, 4, 3).permute(0, 1, 3, 2, 4)  # dense, but W lies next to C, not to H
    _assert_same(ops.if_sequence_pool2x2(y, 0.5), _reference(y.contiguous(), 0.5))


def test_neuron_counts_can_be_skipped(backend):
    x = _current(9, 2, 3, 6, 8)
    full = ops.if_sequence_pool2x2(x, 0.6)
    lean = ops.if_sequence_pool2x2(x, 0.6, count_neurons=False)
    assert lean.neuron_counts is None
    for name in ("spikes", "v", "step_counts"):
        assert torch.equal(getattr(lean, name), getattr(full, name)), name
    module = rnl_fast.IFSequence(v_threshold=0.6, count_neurons=False)
    module.forward_pool2x2(x[:4])
    module.forward_pool2x2(x[4:])
    assert module.neuron_spike_counts is None
    assert torch.equal(module.step_spike_counts, full.step_counts)
