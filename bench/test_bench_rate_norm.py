"""Rate Norm Layer forward+backward with the Rate Inference Loss, x [128, 32, 28, 28] fp32.

The loss ``(r * w).sum() + Omega`` backpropagates into x and p; ours (rnl_fast.ops.rate_norm)
beside the eager reference and torch.compile of the whole reference loss (see benchlib/cases.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchlib import case_params


@pytest.mark.parametrize("device, group, impl", case_params("rate_norm"))
def test_rate_norm(bench: Callable[[str, str, str], None], device: str, group: str, impl: str) -> None:
    bench(device, group, impl)
