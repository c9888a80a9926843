"""Multi-step IF neurons (T = 32, 2M neurons on CPU, 16M on CUDA): ours against the baselines.

Groups: forward with fp32 spikes, forward with uint8 spikes, forward with bf16 input,
forward+backward; each beside x.clone(), the eager reference, torch.compile of the reference and
SpikingJelly 2.0's IFNode, on the same inputs (see benchlib/cases.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from benchlib import case_params


@pytest.mark.parametrize("device, group, impl", case_params("if"))
def test_if(bench: Callable[[str, str, str], None], device: str, group: str, impl: str) -> None:
    bench(device, group, impl)
