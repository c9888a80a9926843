"""The sigmoid surrogate's exp(−|u/w|) is computed by the C++ backend's own vectorisable exp
(csrc/exp_nonpositive.h), not libm's: its gradients must stay within a few ulp of the reference's
over the whole range of u, underflow, infinities and NaN included."""

from __future__ import annotations

import pytest
import torch

from rnl_fast import ops, reference

#: Relative tolerance: a few ulp of the dtype (the exp is within 2 ulp; the rest rounds as the reference).
RTOL = {torch.float32: 4e-6, torch.float64: 2e-14}
#: Absolute floor: the smallest subnormal (both round into the subnormals, each once).
ATOL = {torch.float32: 1.5e-45, torch.float64: 5e-324}


def _sigmoid_grad(backend_x: torch.Tensor, width: float, fn) -> torch.Tensor:
    """σ'(x − θ) for every element: one step, one neuron each, θ = 1, dL/ds = 1."""
    x = backend_x.clone().requires_grad_()
    spikes = fn(x.reshape(1, -1), v_th=1.0, surrogate="sigmoid", width=width)[0]
    return torch.autograd.grad(spikes, x, torch.ones_like(spikes))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("width", [0.25, 1.0, 3.7])
def test_sigmoid_surrogate_matches_reference_over_the_range(monkeypatch, dtype, width):
    monkeypatch.setenv("RNL_FAST_BACKEND", "cpp")
    u = torch.cat(
        [
            torch.linspace(-40, 40, 200_001, dtype=torch.float64),  # e from 1e-18 to 1 at w = 1
            -torch.logspace(-30, 3, 2_001, dtype=torch.float64),  # tiny to huge |u|: underflow
            torch.logspace(-30, 3, 2_001, dtype=torch.float64),
            torch.tensor([0.0, -0.0, 87.3, 87.4, 708.3, 708.5, float("inf"), -float("inf"), float("nan")]),
        ]
    )
    x = (u * width + 1.0).to(dtype)  # u = (x − θ)/w with θ = 1
    fast = _sigmoid_grad(x, width, ops.if_sequence)
    ref = _sigmoid_grad(x, width, reference.if_sequence)
    torch.testing.assert_close(fast, ref, rtol=RTOL[dtype], atol=ATOL[dtype], equal_nan=True)
    assert fast.isnan().sum() == ref.isnan().sum() == 1
