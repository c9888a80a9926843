"""The steps search of the time-to-accuracy benchmark (bench/benchlib/tta.py): the first step within
1 point of the ANN, decided on counts so that the exact boundary counts, and the doubling search."""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from benchlib.tta import FIRST_STEPS, search_steps, steps_within  # noqa: E402


@pytest.mark.parametrize(
    "ann_correct, images, correct_per_step, expected",
    [
        # 98.7 % → the target is 97.7 %: 977 of 1000 is exactly on it, 976 is not.
        pytest.param(987, 1000, [900, 976, 977, 990], 3, id="exactly-1-point-below"),
        pytest.param(987, 1000, [976, 976, 976], None, id="1.1-points-below-never"),
        # 64.9 − 1.0 is 63.900000000000006 in floating point, above 100·639/1000 = 63.9.
        pytest.param(649, 1000, [600, 639, 640], 2, id="boundary-percentages-would-miss"),
        # 1 point of 500 images is 5 images; of 100 images, 1 image.
        pytest.param(400, 500, [394, 395], 2, id="500-images"),
        pytest.param(26, 100, [24, 25], 2, id="100-images"),
        pytest.param(987, 1000, [995, 900], 1, id="above-the-ANN-at-step-1"),
        pytest.param(987, 1000, [], None, id="no-steps"),
    ],
)
def test_steps_within(ann_correct: int, images: int, correct_per_step: list[int], expected: int | None) -> None:
    assert steps_within(correct_per_step, ann_correct, images) == expected


def test_the_float_boundary_case_is_real() -> None:
    """The case above is one percentages get wrong: the test would not tell counts from them otherwise."""
    assert 100 * 639 / 1000 < 100 * 649 / 1000 - 1.0
    assert steps_within([639], 649, 1000) == 1


def test_steps_within_matches_exact_arithmetic() -> None:
    """Random runs (most never on the boundary; seeded by tests/conftest.py) against the rule in
    exact rational arithmetic."""
    for _ in range(200):
        images = int(torch.randint(1, 2001, ()))
        ann_correct = int(torch.randint(0, images + 1, ()))
        correct = torch.randint(0, images + 1, (int(torch.randint(1, 40, ())),)).tolist()
        target = Fraction(ann_correct) - Fraction(images, 100)
        expected = next((t for t, c in enumerate(correct, start=1) if c >= target), None)
        assert steps_within(correct, ann_correct, images) == expected


def test_steps_within_rejects_no_images() -> None:
    with pytest.raises(ValueError, match="images"):
        steps_within([1], 1, 0)


class _Run:
    """Correct images after each of T steps, from a fixed curve; records the T's asked for."""

    def __init__(self, curve: list[int]) -> None:
        self.curve = curve
        self.asked: list[int] = []

    def __call__(self, steps: int) -> list[int]:
        self.asked.append(steps)
        return self.curve[:steps]


def test_search_doubles_until_the_target_is_met() -> None:
    curve = [0] * 10 + [990] * 100  # 99.0 % from step 11 on, against an ANN at 99.5 %
    run = _Run(curve)
    found = search_steps(run, ann_correct=995, images=1000, max_steps=128)
    assert run.asked == [FIRST_STEPS, 2 * FIRST_STEPS]
    assert (found.steps, found.snn_correct, found.searched_steps) == (11, 990, 16)
    assert found.target_correct == 985 and found.ann_accuracy == 99.5 and found.snn_accuracy == 99.0


def test_search_gives_up_at_max_steps() -> None:
    run = _Run([500 + t for t in range(100)])
    found = search_steps(run, ann_correct=995, images=1000, max_steps=20)
    assert run.asked == [FIRST_STEPS, 16, 20]
    assert found.steps is None and found.snn_correct == 519 and found.searched_steps == 20


def test_search_within_the_first_steps() -> None:
    run = _Run([985, 990, 995])
    found = search_steps(run, ann_correct=995, images=1000, max_steps=3)
    assert run.asked == [3] and found.steps == 1 and found.snn_correct == 985
