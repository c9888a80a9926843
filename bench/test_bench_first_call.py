"""The first call of each op in a fresh process (bench/first_call.py), as a benchmark: the timed
round is one whole child process (import torch and rnl_fast, two calls of each op); the figures
that matter, each op's first call against the 0.2 s target, are in extra_info and printed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import first_call  # noqa: E402

ROUNDS = 3


def test_first_call(benchmark: Any, capsys: pytest.CaptureFixture[str]) -> None:
    runs: list[dict] = []
    benchmark.group = "first call [cpu]"
    benchmark.pedantic(lambda: runs.append(first_call.measure_once()), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(runs=runs, target_s=first_call.TARGET_S)
    with capsys.disabled():
        print("\n" + first_call.table(runs))
