"""Edge cases where a kernel once disagreed with the reference (issue 13): infinite inputs, strides
of size-1 dims, NaN membranes in the backward pass, NaN and inf in Rate Norm, half-precision sums,
extreme pooling scales. Expected values are written out, so the torch backend (the reference) is
checked too."""

from __future__ import annotations

import pytest
import torch

from rnl_fast import ops

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
