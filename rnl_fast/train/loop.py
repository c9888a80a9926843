"""The epoch loop both training stages run: steps, the DDP reductions, the epoch's history entry,
the learning-rate schedule, a checkpoint after every epoch, and a bit-exact resume.

The stages differ only in what they pass in: a step (the loss), a summary (validation figures)
and the extra state their checkpoints carry. How the loop behaves under DDP and on resume:
docs/training.md.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import (
    TRAINING_KEYS,
    CheckpointError,
    CheckpointMismatchError,
    first_difference,
    gather_rng_states,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .distributed import all_reduce_running_max, average_batch_norm_stats, rank_and_world, wrap_ddp
from .evaluation import Batches

#: One epoch's figures in the history a stage returns.
HistoryEntry = dict[str, Any]
#: A training step: ``(x, y)`` on the device → (logits ``[B, classes]``, named scalar losses;
#: ``"loss"`` is the one minimised). The loop averages every named loss over the epoch's samples.
StepFn = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]

# Progress-bar postfix refreshed every this many steps: each refresh syncs the device.
_POSTFIX_EVERY = 10


@contextmanager
def _ctrl_c_after_block() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt: a checkpoint
    being written is finished and recorded, so that what the interruption reports is what the
    file holds. Only in the main thread with Python's default handler; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a stage's epochs, with what the checkpoint holds: raised from the
    KeyboardInterrupt, so ``except KeyboardInterrupt`` still catches it."""

    def __init__(self, stage: int, epoch: int, epochs: int, checkpoint_path, saved_epoch: int | None) -> None:
        #: The stage, the epoch in progress (1-based) and the run's number of epochs.
        self.stage, self.epoch, self.epochs = stage, epoch, epochs
        #: The checkpoint file (None: the run writes none) and the last epoch it holds from this
        #: run or the one it resumed (None: nothing saved yet).
        self.checkpoint_path, self.saved_epoch = checkpoint_path, saved_epoch
        super().__init__(self.describe())

    def describe(self, resume_hint: str = "resume=True") -> str:
        """One line: where it stopped, what is saved, and how to continue."""
        where = f"interrupted in epoch {self.epoch} of {self.epochs} (stage {self.stage})"
        if self.checkpoint_path is None:
            return f"{where}; no checkpoint is written by this run"
        if self.saved_epoch is None:
            return f"{where}, before the first checkpoint: nothing saved to {self.checkpoint_path}"
        return (
            f"{where}; {self.checkpoint_path} holds epoch {self.saved_epoch} of {self.epochs}: "
            f"rerun with {resume_hint} to continue from there"
        )


@dataclass(frozen=True)
class LoopOptions:
    """How one stage's epoch loop runs, starts and checkpoints (the stages' keyword arguments of
    the same names, see :func:`rnl_fast.train.train_stage1`)."""

    #: 1 or 2: written into the checkpoint; a resume must find the same stage.
    stage: int
    #: Total number of epochs (a resumed run continues up to it).
    epochs: int
    #: Where the batches go (the model is already there).
    device: torch.device
    #: Seeds torch's global generator (plus the rank) at a fresh start.
    seed: int = 0
    #: The generator the training loader shuffles with (its state is checkpointed), or None.
    generator: torch.Generator | None = None
    #: Written after every epoch by rank 0; None: no checkpoint.
    checkpoint_path: str | os.PathLike[str] | None = None
    #: Continue from ``checkpoint_path`` when it exists.
    resume: bool = False
    #: How :func:`rnl_fast.models.build_model` rebuilds the model, stored in the checkpoint.
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: How the training data was made (dataset name, subset size, seed, batch size, …), as the
    #: caller describes it: recorded in the checkpoint, must match to resume.
    data: dict[str, Any] = field(default_factory=dict)
    #: The stage's own settings (learning rate, schedule, λ, …): recorded, must match to resume.
    settings: dict[str, Any] = field(default_factory=dict)
    #: A tqdm bar per epoch (rank 0 only).
    progress: bool = True


class EpochLoop:
    """One stage's training run: the model (plain and as trained, DDP-wrapped under a process
    group), its optimiser and schedule, the history so far, and the :class:`LoopOptions`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        options: LoopOptions,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.options = options
        self.rank, self.world_size = rank_and_world()
        self.progress = options.progress and self.rank == 0
        self.history: list[HistoryEntry] = []
        self.start_epoch = 0
        #: The last epoch the checkpoint holds from this run or the one it resumed (None: none).
        self.saved_epoch: int | None = None
        #: What the steps call: the model itself, or its DDP wrapper.
        self.net = wrap_ddp(model, options.device) if self.world_size > 1 else model

    def start(self) -> dict[str, Any] | None:
        """Resume from the checkpoint when asked and it exists (returns it), else seed and
        start fresh (returns None)."""
        options = self.options
        path = options.checkpoint_path
        if options.resume and path is not None and Path(path).is_file():
            state = load_checkpoint(path)
            missing = [key for key in TRAINING_KEYS if key not in state]
            if missing:
                raise CheckpointError(f"checkpoint {path} lacks {missing}: not a training checkpoint")
            self._check_resumable(state, path)
            try:
                self.model.load_state_dict(state["model_state"])
                self.optimizer.load_state_dict(state["optimizer_state"])
            except (RuntimeError, ValueError, KeyError) as error:
                # torch's first line only names the module class; the second says what is wrong.
                reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:2]) or type(error).__name__
                reason = reason if len(reason) <= 300 else reason[:297] + "..."
                raise CheckpointMismatchError(f"resume: checkpoint {path} does not fit this model: {reason}") from error
            self.scheduler.load_state_dict(state["scheduler_state"])
            set_rng_state(state["rng_states"][self.rank], options.generator)
            self.history = list(state["history"])
            self.start_epoch = self.saved_epoch = state["epoch"]
            return state
        # Ranks draw different dropout masks; the data order comes from each rank's generator.
        torch.manual_seed(options.seed + self.rank)
        return None

    def _check_resumable(self, state: dict[str, Any], path: str | os.PathLike[str]) -> None:
        """Raise :class:`CheckpointMismatchError` (one line, naming the file and the first
        difference) unless ``state`` was written by this same run: stage, epochs, ranks, model,
        data and settings. A format-v1 checkpoint records no data or settings: those are not
        checked."""
        options = self.options
        if state["stage"] != options.stage:
            raise CheckpointMismatchError(
                f"resume: checkpoint {path} is from stage {state['stage']}, not {options.stage}"
            )
        if state["epochs"] != options.epochs:
            raise CheckpointMismatchError(
                f"resume: epochs must match the checkpoint's ({state['epochs']}) to resume {path}, got {options.epochs}"
            )
        if len(state["rng_states"]) != self.world_size:
            raise CheckpointMismatchError(
                f"resume: checkpoint {path} was written by {len(state['rng_states'])} "
                f"ranks, this run has {self.world_size}"
            )
        recorded_model = {"model": state.get("model_name"), **state.get("model_kwargs", {})}
        comparisons = [(recorded_model, {"model": options.model_name, **options.model_kwargs})]
        comparisons += [(state[key], getattr(options, key)) for key in ("data", "settings") if key in state]
        for recorded, given in comparisons:
            difference = first_difference(recorded, given)
            if difference is not None:
                raise CheckpointMismatchError(f"resume: checkpoint {path} belongs to another run: it has {difference}")

    def train_epochs(
        self,
        step: StepFn,
        summarize: Callable[[dict[str, float]], HistoryEntry],
        extra_state: Callable[[], dict[str, Any]],
        loader: Batches,
        check: Callable[[int], None] | None = None,
        checks_per_epoch: int = 1,
        final: bool = True,
    ) -> None:
        """Run the remaining epochs. Each: steps (with the running-max reduction under DDP), BN
        statistics averaged, ``summarize(train_stats)`` → history entry, schedule, checkpoint
        (with ``extra_state()``). With ``check``, ``check(steps_done)`` also runs after
        ``checks_per_epoch − 1`` evenly spaced steps inside each epoch (the epoch's end is
        ``summarize``'s); every rank calls it at the same steps. ``final``: the last epoch's
        checkpoint is the run's result (``finished``); False when the stage writes its result
        after the loop. Ctrl-C raises :class:`TrainingInterrupted` (what the checkpoint holds)."""
        total = len(loader) if hasattr(loader, "__len__") else None
        check_after = set()
        if check is not None and total:
            check_after = {round(total * k / checks_per_epoch) for k in range(1, checks_per_epoch)} - {0, total}
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch, self.options.epochs):
                self._train_epoch(epoch, step, summarize, extra_state, loader, check, check_after, total, final)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt as interrupt:
            options = self.options
            in_progress = epoch + 1
            if self.saved_epoch is not None and self.saved_epoch >= in_progress:  # between two epochs
                in_progress = min(self.saved_epoch + 1, options.epochs)
            raise TrainingInterrupted(
                options.stage, in_progress, options.epochs, options.checkpoint_path, self.saved_epoch
            ) from interrupt

    def _train_epoch(
        self,
        epoch: int,
        step: StepFn,
        summarize: Callable[[dict[str, float]], HistoryEntry],
        extra_state: Callable[[], dict[str, Any]],
        loader: Batches,
        check: Callable[[int], None] | None,
        check_after: set[int],
        total: int | None,
        final: bool,
    ) -> None:
        """Epoch ``epoch`` (0-based) of :meth:`train_epochs`, its history entry and checkpoint."""
        device = self.options.device
        sums: dict[str, Tensor] = {}
        correct = torch.zeros((), dtype=torch.float64, device=device)
        samples = 0
        desc = f"stage {self.options.stage} epoch {epoch + 1}/{self.options.epochs}"
        # Updated by hand: a tqdm that wraps the loader closes itself when the loader ends,
        # before the epoch's validation figures can join its postfix.
        with tqdm(total=total, desc=desc, disable=not self.progress, dynamic_ncols=True) as bar:
            for index, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits, losses = step(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                self.optimizer.step()
                if self.model.training:
                    all_reduce_running_max(self.model)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().double() * y.numel()
                correct += (logits.detach().argmax(dim=1) == y).sum()
                samples += y.numel()
                bar.update()
                if index + 1 in check_after:
                    check(index + 1)
                if self.progress and index % _POSTFIX_EVERY == 0:
                    mean_loss = (sums["loss"] / samples).item()
                    bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{100 * correct.item() / samples:.2f}")
            if samples == 0:
                raise ValueError("train_loader must yield at least one non-empty batch per epoch")
            if self.model.training:
                average_batch_norm_stats(self.model)
            train_stats = self._reduce_stats(sums, correct, samples)
            lr = self.optimizer.param_groups[0]["lr"]
            entry = {"epoch": epoch + 1, "lr": lr, **summarize(train_stats)}
            bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if isinstance(v, float) and k != "lr"})
        self.history.append(entry)
        self.scheduler.step()
        self.save(epoch + 1, extra_state(), finished=final and epoch + 1 == self.options.epochs)

    def _reduce_stats(self, sums: dict[str, Tensor], correct: Tensor, samples: int) -> dict[str, float]:
        """Sample-weighted epoch means of the named losses and the training accuracy, over all ranks."""
        names = sorted(sums)
        count = torch.tensor(float(samples), dtype=torch.float64, device=self.options.device)
        totals = torch.stack([sums[name] for name in names] + [correct, count])
        if self.world_size > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        values = totals.tolist()
        stats = {name: value / values[-1] for name, value in zip(names, values)}
        stats["train_acc"] = 100.0 * values[-2] / values[-1]
        return stats

    def save(
        self,
        epoch: int,
        extra: dict[str, Any],
        model_state: dict[str, Tensor] | None = None,
        finished: bool = False,
    ) -> None:
        """Checkpoint after ``epoch`` completed epochs (rank 0 writes; every rank must call);
        ``finished``: the file holds the run's result. Ctrl-C during the write takes effect once
        the file is complete."""
        options = self.options
        if options.checkpoint_path is None:
            return
        rng_states = gather_rng_states(options.generator)
        with _ctrl_c_after_block():
            self._write(epoch, extra, model_state, finished, rng_states)
            self.saved_epoch = epoch

    def _write(
        self,
        epoch: int,
        extra: dict[str, Any],
        model_state: dict[str, Tensor] | None,
        finished: bool,
        rng_states: list[dict[str, Any]],
    ) -> None:
        options = self.options
        if self.rank == 0:
            save_checkpoint(
                options.checkpoint_path,
                stage=options.stage,
                epoch=epoch,
                epochs=options.epochs,
                model_state=model_state if model_state is not None else self.model.state_dict(),
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                history=self.history,
                rng_states=rng_states,
                finished=finished,
                model_name=options.model_name,
                model_kwargs=options.model_kwargs,
                data=options.data,
                settings=options.settings,
                **extra,
            )
