"""The C++ backend converts fp16 by its bits (csrc/numeric.h, so that its loops vectorise): every
half must load as the same float torch gives, and computed values must round to the same half
(nearest even, subnormals, overflow to inf), NaN staying NaN."""

from __future__ import annotations

import torch

from rnl_fast import ops, reference


def test_every_half_loads_exactly(monkeypatch):
    monkeypatch.setenv("RNL_FAST_BACKEND", "cpp")
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    # One IF step that never fires (θ = inf is refused; 65504 is above every finite half but the
    # largest, checked apart): the final membrane is 0 + x, the loaded value in float32.
    finite = halves[halves.abs() < 65504]
    v = ops.if_sequence(finite.reshape(1, -1), v_th=70000.0).v
    assert torch.equal(v, finite.float())
    # inf, NaN and the largest halves: through the forward's spikes (x ≥ θ) and membrane.
    edges = torch.tensor([65504.0, -65504.0, float("inf"), -float("inf"), float("nan")], dtype=torch.float16)
    out = ops.if_sequence(edges.reshape(1, -1), v_th=60000.0, v_reset=0.0)
    assert out.spikes.flatten().tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert out.v[1].item() == -65504.0 and out.v[3].item() == -float("inf") and out.v[4].isnan()


def test_computed_values_round_to_the_same_half(monkeypatch):
    monkeypatch.setenv("RNL_FAST_BACKEND", "cpp")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200_000, generator=g, dtype=torch.float32).to(torch.float16)
    # QCFS writes λ·k/L, rounded to fp16 from float: λ spans the subnormal halves (< 6.1e-5), the
    # normal range and overflow (70000 > 65504), and L = 255 makes most products inexact.
    for lam in (3.7e-7, 2.9e-5, 0.013, 1.37, 300.3, 70000.0):
        threshold = torch.tensor(lam)
        fast = ops.qcfs(x, threshold, 255)
        ref = reference.qcfs(x, threshold, 255)
        assert torch.equal(fast, ref), lam
    nan = torch.tensor([float("nan"), 1.0], dtype=torch.float16)
    assert ops.qcfs(nan, torch.tensor(1.0), 8)[0].isnan()
