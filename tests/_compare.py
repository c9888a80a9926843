"""Comparisons the op tests share (imported by name: conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import torch

from rnl_fast.ops import IFResult


def assert_if_same(fast: IFResult, ref: IFResult, exact_v: bool = False, what: str = "spikes") -> None:
    """An IF op's outputs equal the reference's: spikes (or pooled rates) and counts bit for bit, the
    final membrane bit for bit with ``exact_v`` (else to 1e-6; NaN where the reference has NaN)."""
    assert fast.spikes.dtype == ref.spikes.dtype and fast.spikes.shape == ref.spikes.shape
    assert torch.equal(fast.spikes, ref.spikes), f"{what} differ from the reference"
    assert fast.v.dtype == ref.v.dtype
    if exact_v:
        assert torch.equal(fast.v, ref.v) or torch.allclose(fast.v, ref.v, rtol=0, atol=0, equal_nan=True), (
            "final membrane differs from the reference"
        )
    else:
        torch.testing.assert_close(fast.v, ref.v, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(fast.step_counts, ref.step_counts)
    assert torch.equal(fast.neuron_counts, ref.neuron_counts)
