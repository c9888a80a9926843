"""Edge cases where a kernel once disagreed with the reference (issue 13): infinite inputs, strides
of size-1 dims, NaN membranes in the backward pass, NaN and inf in Rate Norm, half-precision sums,
extreme pooling scales. Expected values are written out, so the torch backend (the reference) is
checked too."""

from __future__ import annotations

import pytest
import torch

from rnl_fast import ops, reference

INF, NAN = float("inf"), float("nan")


def _col(*values: float, dtype=torch.float32) -> torch.Tensor:
    """One neuron over len(values) steps: ``[T, 1]``."""
    return torch.tensor(values, dtype=dtype).reshape(-1, 1)


# Rule: a reset is applied as defined whatever the membrane: hard reset sets v = v_reset after any
# spike (an infinite input fires once and the neuron carries on from v_reset), soft reset subtracts
# θ (inf − θ = inf: a +inf membrane fires at every step). −inf never fires and stays −inf.
INF_CASES = [
    pytest.param(INF, 0.0, [1, 0, 1], 0.0, id="hard+inf"),
    pytest.param(-INF, 0.0, [0, 0, 0], -INF, id="hard-inf"),
    pytest.param(INF, None, [1, 1, 1], INF, id="soft+inf"),
    pytest.param(-INF, None, [0, 0, 0], -INF, id="soft-inf"),
]


@pytest.mark.parametrize("first, v_reset, spikes, v", INF_CASES)
def test_infinite_input(backend, first, v_reset, spikes, v):
    out = ops.if_sequence(_col(first, 0.5, 0.6), 1.0, 0.0, v_reset=v_reset)
    assert out.spikes.flatten().tolist() == spikes
    assert out.v.item() == v
    assert out.step_counts.tolist() == spikes


@pytest.mark.parametrize("first, v_reset, spikes, v", INF_CASES)
def test_infinite_input_pooled(backend, first, v_reset, spikes, v):
    """The infinite neuron shares a window with three neurons that never fire: each of its spikes
    is a pooled 1/4."""
    x = torch.zeros(3, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([first, 0.5, 0.6])
    out = ops.if_sequence_pool2x2(x, 1.0, 0.0, v_reset=v_reset)
    assert out.spikes.flatten().tolist() == [s / 4 for s in spikes]
    assert out.v[0, 0, 0].item() == v and out.v.flatten()[1:].eq(0).all()


def test_infinite_initial_membrane_hard_reset(backend):
    out = ops.if_sequence(_col(0.5, 0.5), 1.0, torch.tensor([INF]), v_reset=-0.5)
    assert out.spikes.flatten().tolist() == [1, 0] and out.v.item() == 0.0


def _one_element_views() -> list:
    """Valid inputs whose size-1 dims have strides no dense layout would give them."""
    return [
        pytest.param(lambda: torch.rand(1, 2)[:, ::2], id="T1-N1-stride2"),
        pytest.param(lambda: torch.rand(2, 1)[::2], id="T1-time-stride2"),
        pytest.param(lambda: torch.rand(3, 4)[:, 1:2], id="N1-time-stride4"),
        pytest.param(lambda: torch.rand(3, 2, 5)[:, :1], id="size1-neuron-dim-stride5"),
        pytest.param(lambda: torch.rand(1, 3, 4).transpose(0, 1)[:1], id="T1-transposed"),
    ]


@pytest.mark.parametrize("make", _one_element_views())
def test_size_one_dims_with_any_stride(backend, make):
    x = make()
    out = ops.if_sequence(x, 0.5)
    ref = reference.if_sequence(x.contiguous(), 0.5)
    assert torch.equal(out.spikes, ref[0]) and torch.equal(out.v, ref[1])


@pytest.mark.parametrize("make", _one_element_views())
def test_size_one_dims_with_any_stride_backward(backend, make):
    x = make().requires_grad_()
    out = ops.if_sequence(x, 0.5)
    (out.spikes.sum() + out.v.sum()).backward()
    xr = x.detach().contiguous().requires_grad_()
    s, v, _, _ = reference.if_sequence(xr, 0.5)
    (s.sum() + v.sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_size_one_dims_with_any_stride_pooled(backend):
    x = torch.rand(2, 1, 2, 2)[::2]  # T = 1, time stride 8
    out = ops.if_sequence_pool2x2(x, 0.5)
    ref = reference.if_sequence_pool2x2(x.contiguous(), 0.5)
    assert torch.equal(out.spikes, ref[0])


@pytest.mark.parametrize("v_reset", [None, 0.0], ids=["soft", "hard"])
def test_nan_membrane_detached_reset_gradient_through_v_only(backend, v_reset):
    """v_T = m_T − θ·sg(s_T) (or the hard-reset form with a detached s): dv/dx = 1 at every step
    even when m is NaN, and no spike gradient is asked for, so no surrogate (NaN at a NaN
    membrane) may enter the sum. The hard reset passes 1 − s = 1 (a NaN membrane never fires)."""
    x = _col(NAN, 0.3).requires_grad_()
    out = ops.if_sequence(x, 1.0, detach_reset=True, v_reset=v_reset)
    out.v.sum().backward()
    assert x.grad.flatten().tolist() == [1.0, 1.0]
