"""QCFS activation (L = 8) forward+backward, x [128, 32, 28, 28] fp32, beside the Rate Norm groups.

The loss ``(y * w).sum()`` backpropagates into x and λ; ours (rnl_fast.ops.qcfs) beside the eager
reference and torch.compile of the whole reference loss (see benchlib/cases.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchlib import case_params


@pytest.mark.parametrize("device, group, impl", case_params("qcfs"))
def test_qcfs(bench: Callable[[str, str, str], None], device: str, group: str, impl: str) -> None:
    bench(device, group, impl)
