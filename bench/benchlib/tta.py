"""Time to accuracy: the wall time a converted SNN needs to come within 1 point of its ANN.

One ReLU cnn7 trained briefly on MNIST (1 epoch, seeded; the checkpoint is cached under
:func:`bench_cache_dir`, keyed by seed and training set, so reruns do not retrain), the same test
images and the same calibration images for every impl:

- ``ours``: ``rnl_fast.convert(net, "robustnorm", channel_wise=True, v_init="half")``;
- ``ours-maxnorm``: the same with ``"maxnorm"``;
- ``spikingjelly``: SpikingJelly 2.0's
  ``FXConverter(RateCodingRecipe(mode="99.9%", channel_wise=True, half_threshold=True))``;
- ``ann``: one forward of the ANN over the same images (the unit of the "x ANN" column).

Each impl's steps to ANN − 1 are found first (not timed): ours from :func:`rnl_fast.simulate`'s
accuracy after every step, SpikingJelly's by stepping it as its users do (``reset_net``, then
``out += snn(x)`` once per step) and scoring ``out`` after every step; T doubles from
:data:`FIRST_STEPS` until the target is met or :attr:`TTAPlan.max_steps` is passed. The timed
call is then one run of exactly that many steps over all the test images, in batches of
:attr:`TTAPlan.batch` (the CLI's default batch): ``snn(x, steps)`` per batch for ours, the
stepping loop for SpikingJelly's, each ending with the predicted classes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rnl_fast.energy import steps_to_accuracy

from .groups import SEED, Case, Group, Unavailable

#: How close to the ANN the SNN must come, in accuracy points.
MARGIN_POINTS = 1.0
#: T of the first search for the steps to the target; it doubles until the target is met.
FIRST_STEPS = 8
#: Training epochs of the ReLU cnn7.
EPOCHS = 1
#: Each impl's conversion: (method, options) of ``rnl_fast.convert``; "spikingjelly" is apart.
OUR_CONVERSIONS: dict[str, tuple[str, dict]] = {
    "ours": ("robustnorm", {"channel_wise": True, "v_init": "half"}),
    "ours-maxnorm": ("maxnorm", {"channel_wise": True, "v_init": "half"}),
}
#: Each impl in words (the table's "conversion" column).
CONVERSION_TEXT = {
    "ours": "robustnorm, channel-wise, v_init=half",
    "ours-maxnorm": "maxnorm, channel-wise, v_init=half",
    "spikingjelly": 'RateCodingRecipe(mode="99.9%", channel_wise, half_threshold)',
    "ann": "none: one forward of the ReLU ANN",
}
#: Where the trained network is cached, when set (default: ``rnl_fast.data.cache_dir()/bench``).
CACHE_ENV = "RNL_FAST_BENCH_CACHE"


@dataclass(frozen=True)
class TTAPlan:
    """The sizes of a time-to-accuracy run at one scale."""

    train_images: int | None  #: MNIST training images the cnn7 trains on (None: all 60000)
    train_batch: int  #: its training batch (SGD, lr 0.1: smaller sets take smaller batches, more steps)
    test_images: int  #: test images drawn at random from the seed: the accuracy is over all of them
    calibration_images: int  #: training images both conversions calibrate on
    batch: int  #: images per simulated batch (ours and SpikingJelly's)
    max_steps: int  #: the steps search gives up past this T


TTA_PLANS = {
    "full": TTAPlan(None, train_batch=128, test_images=1000, calibration_images=1280, batch=128, max_steps=128),
    "small": TTAPlan(12000, train_batch=64, test_images=500, calibration_images=512, batch=32, max_steps=128),
    "tiny": TTAPlan(3000, train_batch=32, test_images=100, calibration_images=64, batch=16, max_steps=32),
}


@dataclass(frozen=True)
class TimeToAccuracy:
    """What the steps search of one impl found (``steps`` None: the target was not met)."""

    images: int
    ann_correct: int
    target_correct: float  #: ``ann_correct − MARGIN_POINTS·images/100``: at least this many correct
    steps: int | None  #: the first step within MARGIN_POINTS of the ANN
    snn_correct: int  #: correct after ``steps`` steps (after the last searched step when not met)
    searched_steps: int  #: T of the last search

    @property
    def ann_accuracy(self) -> float:
        return 100.0 * self.ann_correct / self.images

    @property
    def snn_accuracy(self) -> float:
        return 100.0 * self.snn_correct / self.images


def steps_within(
    correct_per_step: Sequence[int], ann_correct: int, images: int, margin: float = MARGIN_POINTS
) -> int | None:
    """The first step t (1-based) whose SNN is within ``margin`` accuracy points of the ANN on
    ``images`` images (``correct_per_step[t−1]`` correct against the ANN's ``ann_correct``); None
    when no step is. The library's own rule (:func:`rnl_fast.energy.steps_to_accuracy`, what the
    demo's tables use) decides, so that the bench and the tables can never disagree; a step
    exactly ``margin`` points below the ANN counts (with 649 of 1000 correct, ``64.9 − 1.0`` is
    63.900000000000006 in floating point, and 639 correct must reach it).
    """
    if images <= 0:
        raise ValueError(f"images must be positive, got {images}")
    accuracy = [100.0 * correct / images for correct in correct_per_step]
    return steps_to_accuracy(accuracy, 100.0 * ann_correct / images - margin)


def search_steps(
    correct_per_step: Callable[[int], list[int]], ann_correct: int, images: int, max_steps: int
) -> TimeToAccuracy:
    """Runs ``correct_per_step(T)`` (correct images after each of T steps) at T = FIRST_STEPS,
    doubling while the target is not met, up to ``max_steps``; the first step within
    :data:`MARGIN_POINTS` of the ANN's ``ann_correct`` of ``images``."""
    steps = min(FIRST_STEPS, max_steps)
    while True:
        correct = correct_per_step(steps)
        reached = steps_within(correct, ann_correct, images)
        if reached is not None or steps >= max_steps:
            return TimeToAccuracy(
                images=images,
                ann_correct=ann_correct,
                target_correct=ann_correct - MARGIN_POINTS * images / 100,
                steps=reached,
                snn_correct=correct[(reached or steps) - 1],
                searched_steps=steps,
            )
        steps = min(2 * steps, max_steps)


def bench_cache_dir() -> Path:
    """Where the benchmarks keep what they train: ``$RNL_FAST_BENCH_CACHE``, else
    ``rnl_fast.data.cache_dir()/bench``."""
    from rnl_fast import data

    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else data.cache_dir() / "bench"


def _mnist(split: str):
    from rnl_fast import data

    try:
        return data.load_dataset("mnist", split)
    except data.DatasetNotFoundError as error:
        raise Unavailable(str(error)) from error


def _batches(dataset, batch: int) -> list[tuple[Tensor, Tensor]]:
    """The dataset as a list of ``(x, y)`` batches in order: every impl reads the same tensors,
    and no impl's time includes decoding them."""
    from rnl_fast import data

    return list(data.make_loader(dataset, batch, shuffle=False))


@functools.cache
def trained_cnn7(scale: str) -> nn.Module:
    """The ReLU cnn7 trained for :data:`EPOCHS` on the plan's MNIST training images from
    :data:`SEED`, in eval mode on the CPU: read from the cache, else trained and cached."""
    from rnl_fast import data, models, pipeline, train

    plan = TTA_PLANS[scale]
    images = plan.train_images or "all"
    name = f"tta-cnn7-relu-mnist-seed{SEED}-train{images}-batch{plan.train_batch}-epochs{EPOCHS}.pt"
    path = bench_cache_dir() / name
    if path.is_file():
        return train.model_from_checkpoint(path)
    train_set = _mnist("train")
    if plan.train_images:
        train_set = data.subset(train_set, plan.train_images, seed=SEED)
    kwargs = pipeline.model_kwargs("relu", train_set)
    net = models.build_model("cnn7", seed=SEED, **kwargs)
    generator = torch.Generator().manual_seed(SEED)
    loader = data.make_loader(train_set, plan.train_batch, shuffle=True, generator=generator)
    train.train_stage1(
        net,
        loader,
        epochs=EPOCHS,
        seed=SEED,
        generator=generator,
        checkpoint_path=path,
        model_name="cnn7",
        model_kwargs=kwargs,
        progress=False,
    )
    return net.eval()


@functools.cache
def scored_batches(scale: str) -> list[tuple[Tensor, Tensor]]:
    """The test images every impl is scored on (drawn from :data:`SEED`), in simulation batches."""
    from rnl_fast import data

    plan = TTA_PLANS[scale]
    return _batches(data.subset(_mnist("test"), plan.test_images, seed=SEED), plan.batch)


@functools.cache
def calibration_batches(scale: str) -> list[tuple[Tensor, Tensor]]:
    """The training images every conversion calibrates on (drawn from ``SEED + 1``)."""
    from rnl_fast import data

    plan = TTA_PLANS[scale]
    return _batches(data.subset(_mnist("train"), plan.calibration_images, seed=SEED + 1), 128)


@functools.cache
def ann_correct_count(scale: str) -> int:
    """Test images the ANN classifies right."""
    net = trained_cnn7(scale)
    with torch.no_grad():
        return sum(int((net(x).argmax(-1) == y).sum()) for x, y in scored_batches(scale))


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """torch's global generator seeded from :data:`SEED` inside, restored after: RobustNorm's
    calibration samples the activations of big batches from it, so without a seed its thresholds,
    hence the steps to the target, change from run to run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def _ours(scale: str, impl: str) -> tuple[Callable[[int], list[int]], Callable[[int], int]]:
    """(correct after each of T steps, from ``rnl_fast.simulate``; one timed run of T steps
    returning the correct count) of one of our conversions."""
    import rnl_fast

    method, options = OUR_CONVERSIONS[impl]
    with _seeded():
        snn = rnl_fast.convert(trained_cnn7(scale), method, calibration=calibration_batches(scale), **options)
    batches = scored_batches(scale)
    images = sum(len(y) for _, y in batches)

    def correct_per_step(steps: int) -> list[int]:
        accuracy = rnl_fast.simulate(snn, batches, steps, progress=False).accuracy
        return [round(a * images / 100) for a in accuracy]

    def run(steps: int) -> int:
        return sum(int((snn(x, steps)[-1].argmax(-1) == y).sum()) for x, y in batches)

    return correct_per_step, run


def _spikingjelly(scale: str) -> tuple[Callable[[int], list[int]], Callable[[int], int]]:
    """The same pair for SpikingJelly's conversion, stepped as its users step it."""
    try:
        from spikingjelly.activation_based import ann2snn, functional
    except ImportError as error:
        raise Unavailable(f"spikingjelly.activation_based.ann2snn is not importable ({error})") from error
    recipe = ann2snn.RateCodingRecipe(calibration_batches(scale), mode="99.9%", channel_wise=True, half_threshold=True)
    with _seeded(), contextlib.redirect_stderr(io.StringIO()):  # its calibration progress bar
        snn = ann2snn.FXConverter(recipe, device="cpu").convert(copy.deepcopy(trained_cnn7(scale)))
    batches = scored_batches(scale)

    @torch.no_grad()
    def correct_per_step(steps: int) -> list[int]:
        correct = [0] * steps
        for x, y in batches:
            functional.reset_net(snn)
            out = snn(x)
            for t in range(steps):
                if t:
                    out += snn(x)
                correct[t] += int((out.argmax(-1) == y).sum())
        return correct

    @torch.no_grad()
    def run(steps: int) -> int:
        correct = 0
        for x, y in batches:
            functional.reset_net(snn)
            out = snn(x)
            for _ in range(steps - 1):
                out += snn(x)
            correct += int((out.argmax(-1) == y).sum())
        return correct

    return correct_per_step, run


def build_tta_case(group: Group, impl: str, device: str, scale: str) -> Case:
    """One impl of the time-to-accuracy group: its steps to ANN − 1 searched here, then a call
    that runs exactly that many steps over all the test images. CPU only."""
    if device != "cpu":
        raise Unavailable("CPU only (the cnn7 is trained and cached on the CPU)")
    batches = scored_batches(scale)
    if impl == "ann":
        return _ann_case(group, device, scale)
    correct_per_step, run_steps = _spikingjelly(scale) if impl == "spikingjelly" else _ours(scale, impl)
    images = sum(len(y) for _, y in batches)
    found = search_steps(correct_per_step, ann_correct_count(scale), images, TTA_PLANS[scale].max_steps)
    if found.steps is None:
        raise Unavailable(
            f"not within {MARGIN_POINTS:g} point of the ANN ({found.ann_accuracy:.1f}%) in "
            f"{found.searched_steps} steps: {found.snn_accuracy:.1f}% at the last step"
        )
    steps = found.steps

    def run() -> int:
        case.timed_correct = run_steps(steps)
        return case.timed_correct

    case = Case(
        group,
        impl,
        device,
        tuple(batches[0][0].shape),
        run,
        bytes_moved=0,
        needs_warmup=False,
        steps=steps,
        time_to_accuracy=found,
    )
    return case


def _ann_case(group: Group, device: str, scale: str) -> Case:
    """One forward of the ANN over all the test images, in the same batches."""
    net = trained_cnn7(scale)
    batches = scored_batches(scale)

    @torch.no_grad()
    def run() -> int:
        case.timed_correct = sum(int((net(x).argmax(-1) == y).sum()) for x, y in batches)
        return case.timed_correct

    case = Case(group, "ann", device, tuple(batches[0][0].shape), run, bytes_moved=0, needs_warmup=False)
    return case
