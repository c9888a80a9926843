"""The benchmarks' alternated timing (bench/benchlib): the two callables take turns, and a target
that asks for it is judged on the alternated ratio, with the two tests' ratio printed beside it."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from benchlib import measure  # noqa: E402
from benchlib.measure import Measurement, time_alternating  # noqa: E402
from benchlib.targets import Target, alternated_baselines, evaluate_target, targets_of  # noqa: E402


def test_the_two_take_turns_and_each_is_timed_alone(monkeypatch):
    """A fake clock that advances 1 s per subject call and 3 s per baseline call: the medians are
    exactly 1 and 3 (a timer that mixed up the lists or timed both calls together would not give
    them), and the calls alternate, subject first, after one warm-up call of each."""
    now = itertools.count()
    clock = {"t": 0.0}
    calls: list[str] = []

    def subject() -> None:
        calls.append("s")
        clock["t"] += 1.0

    def baseline() -> None:
        calls.append("b")
        clock["t"] += 3.0

    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(measure.time, "monotonic", lambda: float(next(now)))
    subject_s, baseline_s, pairs = time_alternating(subject, baseline, seconds=0.0, min_calls=4)
    assert (subject_s, baseline_s, pairs) == (1.0, 3.0, 4)
    assert "".join(calls) == "sb" + "sb" * 4


def _measurement(impl: str, median_s: float | None, **alternated: tuple[float, float, int]) -> Measurement:
    return Measurement("g", impl, "cpu", (4,), "float32", median_s, 0, None, alternated=dict(alternated))


AT_MOST = Target("g", "cpu", "time_at_most", 1.3, "clone", alternate=True)
FASTER = Target("g", "cpu", "faster_by", 2.0, "clone", alternate=True)


@pytest.mark.parametrize(
    "target, alternated, expected",
    [
        # Apart 1.40 (a slow spell in ours' test), alternated 1.25: judged on 1.25.
        (AT_MOST, (1.25, 1.0, 60), "1.25x in alternation (60 calls each, 1.40x from the two tests) ok"),
        # Exactly on the line is met; one percent over is not.
        (AT_MOST, (1.3, 1.0, 9), "1.30x in alternation (9 calls each, 1.40x from the two tests) ok"),
        (AT_MOST, (1.313, 1.0, 9), "1.31x in alternation (9 calls each, 1.40x from the two tests) MISS (reaches 99%"),
        # faster_by states the inverse ratio, in both figures.
        (FASTER, (0.5, 1.0, 7), "2.00x in alternation (7 calls each, 0.71x from the two tests) ok"),
    ],
)
def test_a_target_that_asks_for_it_is_judged_in_alternation(target, alternated, expected):
    rows = {"ours": _measurement("ours", 1.4, clone=alternated), "clone": _measurement("clone", 1.0)}
    assert evaluate_target(target, rows, None).split(": ", 1)[1].startswith(expected)


def test_without_alternated_figures_the_two_tests_decide():
    """Under --benchmark-disable, or where the baseline could not be built: the medians."""
    rows = {"ours": _measurement("ours", 1.4), "clone": _measurement("clone", 1.0)}
    assert evaluate_target(AT_MOST, rows, None).endswith(": 1.40x MISS (reaches 93% of the target)")
    plain = Target("g", "cpu", "time_at_most", 1.3, "clone")  # not alternated: its figures are ignored
    rows["ours"].alternated["clone"] = (1.0, 1.0, 5)
    assert evaluate_target(plain, rows, None).endswith(": 1.40x MISS (reaches 93% of the target)")


def test_the_if_forward_is_timed_in_alternation_with_clone_on_cpu_only():
    assert alternated_baselines("if-fwd-fp32", "cpu", "ours") == ["clone"]
    assert alternated_baselines("if-fwd-fp32", "cpu", "clone") == []
    assert alternated_baselines("if-fwd-fp32", "cuda", "ours") == []
    assert any(t.alternate for t in targets_of("if-fwd-uint8", "cpu"))
