"""bench/variant_sweep.py runs every variant it lists and prints one line each (tiny size)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import variant_sweep  # noqa: E402


def test_every_variant_runs_and_is_reported(capsys, monkeypatch):
    monkeypatch.setattr(variant_sweep, "median_ns", lambda run, elements, budget_s=0.3: (run(), 1.0)[1])
    assert variant_sweep.main(["--sizes", "1024"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("  ") for line in out.splitlines()) == 18 + 20 + 2  # IF, Rate Norm, QCFS
    assert "fwd+bwd sigmoid hard detach" in out and "fwd pool2x2 hard" in out and "cw q8 fwd+bwd both" in out


def test_sizes_must_be_multiples_of_1024(capsys):
    with pytest.raises(SystemExit):
        variant_sweep.main(["--sizes", "1000"])
    assert "multiples of 1024" in capsys.readouterr().err
