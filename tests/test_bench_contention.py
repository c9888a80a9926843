"""bench/contention.py: the busy processes start and stop, ours and the baseline alternate, the
table and the targets come out (at tiny sizes: what is measured is the script, not the machine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import contention  # noqa: E402


def test_runs_under_load_and_reports(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--scales", "tiny", "--loads", "0,1", "--seconds", "0.05", "--groups", "rnl-fwd-bwd-fp32"]
    assert contention.main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OpenMP runtimes loaded:" in text
    assert "| rnl-fwd-bwd-fp32 | tiny | [2, 3, 5, 7] |" in text
    rows = json.loads(out.read_text())
    assert [(row["load"], row["busy"]) for row in rows] == [("0", 0), ("1", 1)]
    assert all(row["ours_ms"] > 0 and row["baseline"] == "eager" and row["calls"] >= 5 for row in rows)


def test_busy_processes_end_with_the_block():
    with contention.BackgroundLoad(2, seconds=60) as load:
        assert all(process.poll() is None for process in load.processes)
    assert all(process.poll() is not None for process in load.processes)


@pytest.mark.parametrize("bad", ["two", "-1", "1,x"])
def test_bad_load_is_refused(bad, capsys):
    with pytest.raises(SystemExit):
        contention.main(["--loads", bad])
    assert "a load is 'all' or a number of busy processes" in capsys.readouterr().err
