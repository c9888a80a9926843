"""Two-stage training of Rate Norm networks (Ding et al. 2021, §2.4, Algorithm 1, Eq. 12–13).

- **Stage 1** (:func:`train_stage1`, Eq. 12): the weights learn the task with cross-entropy while
  every Rate Norm ``raw_p`` stays frozen at its initial value (p ≈ 1, the layer clips at its
  running max). The same function trains the ReLU baselines (a model without Rate Norm Layers).
  SGD with momentum and weight decay and a step schedule, as the official code.
- **Stage 2** (:func:`train_stage2`, Eq. 13): only the p's learn, with
  ``1 − cos(r*, r′) + λ·mean Ω``: r′ is the trained network's output ``[B, classes]`` and r* the
  output of a *frozen copy* of the stage-1 network. The official code takes r* from the same
  network one forward earlier (detached), so r′ ≈ r*, the cosine sits at its maximum and gives
  (almost) no gradient: only λ·Ω moves p there. With a fixed stage-1 target the cosine term
  pulls the p's back toward the stage-1 function as they drift from it. The epoch with the
  lowest validation mean Ω whose validation accuracy stays within ``tolerance`` points of
  stage 1's is kept and loaded at the end.

Decisions
---------
- **Stage 2 runs the whole network in eval mode.** BatchNorm uses (and keeps) its running
  statistics, Dropout is off, and every Rate Norm Layer uses its stored running max, which no
  longer moves; it still computes Ω in every forward (``RateNorm.omega``) and the gradient to
  ``raw_p``. The official code stays in train mode, so its BN statistics and running maxima
  drift with every batch while the thresholds are tuned. Freezing them makes stage 2 a clean
  optimisation over the p's of one fixed function: the validation accuracy and Ω measured at an
  epoch's end are exactly those of the state that is kept, and θ = p·running_max changes only
  through p.
- **Stage 2 starts from p = ``p_init``** (default 0.95). Stage 1 leaves p ≈ 0.99995 (logit 10),
  where dp/draw = p(1 − p) ≈ 5e-5 and the p's cannot move; the official code likewise restarts
  the logits at ``--init`` (3 for MNIST → p ≈ 0.95). The stage-1 state itself (original p's)
  is the fallback if no epoch stays within the tolerance.
- **λ default 0.1**, the official code's default (the paper's Algorithm 1 states 0.5). Measured
  on MNIST with cnn7 (stage 1: 4 epochs, batch 128, lr 0.05 on 50k images; 10k validation
  images at 98.47 %, mean Ω 6.02), stage 2 on 20k training images, batch 128, lr 0.01,
  p_init 0.95, one p per layer:

  - λ = 0: 98.38 %, Ω 5.52 after 2 epochs (p_init alone; the p's stay at ≈ 0.95);
  - λ = 0.1: 98.26 %, Ω 5.33 after 2 epochs; 98.05 %, Ω 5.01 after 5 (every epoch within 0.5
    points, converging);
  - λ = 0.2: 98.05 %, Ω 5.02 after epoch 1; a second epoch at lr 0.01 runs away (90.4 %, Ω 3.1);
  - λ = 0.3: 96.33 %, Ω 4.18 after epoch 1; λ = 0.5: 58.8 %, Ω 1.92; λ = 1: 14.5 %.

  λ = 0.1 lowers Ω by 17 % at −0.42 points and is stable; from 0.2 the Ω gradient outgrows the
  cosine term once the p's have fallen a little and they run away within an epoch, so only
  the selection rule saves the result. One shared p at λ = 0.1 moves faster (its gradient is the
  sum over layers): 98.05 %, Ω 4.86 after 2 epochs. Without ``p_init`` nothing moves (Ω 6.02).

Data parallel (torchrun + DDP)
------------------------------
Call :func:`setup_distributed` first (torchrun sets ``RANK``/``WORLD_SIZE``/...; gloo on CPU,
nccl on GPU), give each rank its own share of the training data (:func:`shard`) and its own
seeded generator, and call the stage functions on every rank: they wrap the model in DDP.

- **No buffer sync in DDP's forward** (``forward_sync_buffers=False``, ``broadcast_buffers=False``
  before torch 2.13): DDP would otherwise copy rank 0's buffers over every other rank at each
  forward, throwing away the running maxima the other ranks saw. Buffers are broadcast from
  rank 0 once when the model is wrapped.
- **Running max: MAX all-reduce after every training step** (one collective for all layers).
  Each rank's update is ``0.9·M + 0.1·max(local batch)`` from a shared M, and the max over ranks
  of that is ``0.9·M + 0.1·max(global batch)``: after every step the stored running max is
  exactly the one single-process training on the global batch would store. Reducing only at the
  epoch's end would not be: the max of per-rank moving averages is not the moving average of the
  maxima. (Within a step each rank's forward still uses its local update; that differs by
  ``0.1·(global − local max)`` and is corrected by the reduction before the next step.)
- **BatchNorm: running mean and variance averaged over ranks at each epoch's end** (before any
  evaluation or checkpoint). A moving average is linear in its inputs, so averaging the per-rank
  averages once per epoch (all ranks start the epoch equal) gives the same result as averaging
  every step: the moving average of the ranks' mean batch statistics. Batch statistics during
  training stay per rank (standard DDP); SyncBatchNorm would cost one collective per BN layer per
  forward for no gain in the converted thresholds.
- Only rank 0 shows progress and writes checkpoints; every rank's RNG state is gathered into the
  checkpoint so that a resumed run continues every rank's shuffling. Evaluation all-reduces its
  counts: every rank must call it, with its share of the validation data (the full set on every
  rank also gives the right figure, only slower).
- Shards have equal size (the last ``N mod world_size`` samples are dropped) so that every rank
  runs the same number of steps, which DDP requires.

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) are written atomically (temporary
file in the same directory, then ``os.replace``) after every epoch and hold everything needed to
resume bit-exactly and to rebuild the model (:func:`model_from_checkpoint`).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ._io import atomic_write
from .models import build_model
from .nn import RateNorm, raw_from_p, rate_inference_loss

#: Written into every checkpoint; :func:`load_checkpoint` rejects files without it.
CHECKPOINT_FORMAT = "rnl_fast-checkpoint-v1"
#: Keys every training checkpoint holds (besides the stage-specific ones).
_TRAINING_KEYS = (
    "stage", "epoch", "epochs", "model_state", "optimizer_state", "scheduler_state", "history", "rng_states"
)
# Progress-bar postfix refreshed every this many steps: each refresh syncs the device.
_POSTFIX_EVERY = 10
# ε of the cosine similarity of Eq. 13 (official code).
_COSINE_EPS = 1e-6

Batches = Iterable[tuple[Tensor, Tensor]]
HistoryEntry = dict[str, Any]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt, or not an rnl_fast checkpoint."""


# ───────────────────────────── distributed helpers ─────────────────────────────


def setup_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes in the environment.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. With
    ``WORLD_SIZE`` unset or 1 (and no group yet) nothing is initialised.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available, else gloo.

    Returns:
        ``(rank, world_size, device)``: the device is ``cuda:LOCAL_RANK`` (made current) when
        CUDA is available, else the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1, device
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        # Every rank reaches this point before any tears its connections down: a rank that
        # destroys the group while a peer still talks to it can make gloo abort that peer.
        dist.barrier()
        dist.destroy_process_group()


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(data: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s share of ``data``: items ``rank, rank + world_size, …`` of the first
    ``N − N mod world_size``, so every rank gets exactly ``N // world_size`` items.

    Args:
        data: an :class:`rnl_fast.data.ImageDataset` (anything with ``select(indices)``), a 1-D
            index tensor, a list/tuple/range, or any map-style dataset (→ ``torch.utils.data.Subset``).
        rank: in ``0..world_size-1``.
        world_size: number of ranks, positive.

    Returns:
        The same kind of object (a ``Subset`` for generic datasets).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    num_items = len(data)
    if num_items < world_size:
        raise ValueError(f"data must hold at least world_size = {world_size} items, got {num_items}")
    positions = range(rank, num_items - num_items % world_size, world_size)
    if isinstance(data, (Tensor, list, tuple, range)):
        return data[positions.start : positions.stop : positions.step]
    if hasattr(data, "select"):
        return data.select(torch.tensor(positions, dtype=torch.int64))
    return torch.utils.data.Subset(data, list(positions))


def _wrap_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP that never syncs buffers in forward (running maxima are MAX-reduced instead, see the
    module docstring); all buffers start from rank 0's values."""
    # torch ≥ 2.13 names the forward-only switch `forward_sync_buffers` and deprecates
    # `broadcast_buffers`, whose False there also skips the initial buffer sync.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        no_forward_sync = {"forward_sync_buffers": False}
    else:
        no_forward_sync = {"broadcast_buffers": False}
    wrapped = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **no_forward_sync
    )
    # Explicitly, whatever the version does at init: every rank must start from equal thresholds.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return wrapped


def _rate_norms(model: nn.Module) -> list[RateNorm]:
    return [m for m in model.modules() if isinstance(m, RateNorm)]


def _unique_raw_ps(model: nn.Module) -> list[nn.Parameter]:
    """Each Rate Norm logit once (layers sharing one p give one entry), in module order."""
    return list({id(m.raw_p): m.raw_p for m in _rate_norms(model)}.values())


def all_reduce_running_max(model: nn.Module) -> None:
    """Set every Rate Norm ``running_max`` to its maximum over all ranks (one collective).

    No-op outside a process group or without Rate Norm Layers. Every rank must call it.
    """
    layers = _rate_norms(model)
    if not layers or _rank_and_world()[1] == 1:
        return
    maxima = torch.stack([m.running_max for m in layers])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    for layer, value in zip(layers, maxima.unbind()):
        layer.running_max.copy_(value)


def average_batch_norm_stats(model: nn.Module) -> None:
    """Average every BatchNorm ``running_mean`` and ``running_var`` over all ranks (one collective).

    No-op outside a process group or without tracked BN statistics. Every rank must call it.
    """
    world_size = _rank_and_world()[1]
    stats = [
        buffer
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
        for buffer in (m.running_mean, m.running_var)
    ]
    if not stats or world_size == 1:
        return
    flat = torch.cat([s.reshape(-1) for s in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    for buffer, values in zip(stats, flat.split([s.numel() for s in stats])):
        buffer.copy_(values.view_as(buffer))


# ───────────────────────────────── checkpoints ─────────────────────────────────


def save_checkpoint(path: str | os.PathLike[str], **state: Any) -> None:
    """Write ``state`` (tensors, state dicts, plain Python values) to ``path`` atomically.

    The file is written to a temporary file in the same directory, flushed to disk, then renamed
    over ``path``: an interruption at any point leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as file:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, file)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, tensors on the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt or not an rnl_fast
            checkpoint; the one-line message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint is data; never run code found in a file.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # The first sentence only: torch's messages run on for paragraphs.
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {reason}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an rnl_fast checkpoint (no format {CHECKPOINT_FORMAT!r})")
    return state


def model_from_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model a training checkpoint was written for and load its weights.

    Uses ``build_model(model_name, **model_kwargs)`` as given to the training function; after
    stage 2 the weights are the selected (lowest-Ω) state. Returns the model in eval mode.
    """
    state = load_checkpoint(path)
    if state.get("model_name") is None or "model_state" not in state:
        raise CheckpointError(
            f"checkpoint {path} has no model_name/model_state: pass model_name and model_kwargs "
            "to the training function to make it rebuildable"
        )
    model = build_model(state["model_name"], **state.get("model_kwargs", {}))
    model.load_state_dict(state["model_state"])
    return model.to(device).eval()


def _rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """This process's random state: torch's CPU (and CUDA) generators and the loader's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        if "generator" not in state:
            raise ValueError("generator was given but the checkpoint holds no generator state to restore")
        generator.set_state(state["generator"])


def _gather_rng_states(generator: torch.Generator | None) -> list[dict[str, Any]]:
    """Every rank's :func:`_rng_state`, indexed by rank (a collective under DDP)."""
    own = _rng_state(generator)
    world_size = _rank_and_world()[1]
    if world_size == 1:
        return [own]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, own)
    return gathered


# ───────────────────────────────── evaluation ─────────────────────────────────


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


@torch.no_grad()
def _accuracy_and_omega(model: nn.Module, loader: Batches, device: torch.device | str) -> tuple[float, float | None]:
    """Accuracy in percent and the mean over batches of the mean Ω over Rate Norm Layers
    (None without Rate Norm Layers), in eval mode; summed over ranks under DDP."""
    device = _as_device(device)
    has_rate_norm = bool(_rate_norms(model))
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct, samples, Σ Ω, batches
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        totals[0] += (logits.argmax(dim=1) == y).sum()
        totals[1] += y.numel()
        if has_rate_norm:
            totals[2] += rate_inference_loss(model)
        totals[3] += 1
    model.train(was_training)
    if _rank_and_world()[1] > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    correct, samples, omega_sum, batches = totals.tolist()
    if samples == 0:
        raise ValueError("loader must yield at least one non-empty batch")
    return 100.0 * correct / samples, (omega_sum / batches if has_rate_norm else None)


def evaluate_ann(model: nn.Module, loader: Batches, device: torch.device | str = "cpu") -> float:
    """Classification accuracy in percent of ``model`` on ``loader``'s ``(x, y)`` batches.

    Eval mode and no gradients (the model's mode is restored afterwards). Under DDP every rank
    must call it; correct and total counts are summed over ranks.

    Args:
        model: maps ``x: [B, ...]`` to logits ``[B, classes]``; already on ``device``.
        loader: any iterable of ``(x float [B, ...], y int64 [B])``.
        device: where the batches are moved.
    """
    return _accuracy_and_omega(model, loader, device)[0]


# ─────────────────────────────── the training loop ───────────────────────────────


def _check_common(epochs: int, lr: float, momentum: float, milestones: Sequence[float], gamma: float) -> None:
    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite float, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not all(0.0 < f <= 1.0 for f in milestones):
        raise ValueError(f"milestones must be fractions of the epochs in (0, 1], got {tuple(milestones)!r}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")


def _scheduler(
    optimizer: torch.optim.Optimizer, epochs: int, milestones: Sequence[float], gamma: float
) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply the learning rate by ``gamma`` at each fraction of ``epochs`` in ``milestones``."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, sorted({round(f * epochs) for f in milestones}), gamma)


# A training step: (x, y) on the device → (logits [B, classes], named scalar losses; "loss" is
# the one minimised). The loop averages every named loss over the epoch's samples.
StepFn = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


class _Run:
    """What one stage's epoch loop needs: the model (plain and as trained), optimiser, scheduler,
    checkpoint settings; shared by both stages so they differ only in their step and summary."""

    def __init__(
        self,
        stage: int,
        model: nn.Module,
        epochs: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        generator: torch.Generator | None,
        checkpoint_path: str | os.PathLike[str] | None,
        model_name: str | None,
        model_kwargs: dict[str, Any] | None,
        progress: bool,
    ) -> None:
        self.stage = stage
        self.model = model
        self.epochs = epochs
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.generator = generator
        self.checkpoint_path = checkpoint_path
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        self.rank, self.world_size = _rank_and_world()
        self.progress = progress and self.rank == 0
        self.history: list[HistoryEntry] = []
        self.start_epoch = 0
        self.net = _wrap_ddp(model, device) if self.world_size > 1 else model

    def start(self, resume: bool, seed: int) -> dict[str, Any] | None:
        """Resume from the checkpoint when asked and it exists (returns it), else seed and
        start fresh (returns None)."""
        if resume and self.checkpoint_path is not None and Path(self.checkpoint_path).is_file():
            state = load_checkpoint(self.checkpoint_path)
            missing = [key for key in _TRAINING_KEYS if key not in state]
            if missing:
                raise CheckpointError(
                    f"checkpoint {self.checkpoint_path} lacks {missing}: not a training checkpoint"
                )
            if state["stage"] != self.stage:
                raise ValueError(
                    f"resume: checkpoint {self.checkpoint_path} is from stage {state['stage']}, not {self.stage}"
                )
            if state["epochs"] != self.epochs:
                raise ValueError(f"epochs must match the checkpoint's ({state['epochs']}) to resume, got {self.epochs}")
            if len(state["rng_states"]) != self.world_size:
                raise ValueError(
                    f"resume: checkpoint {self.checkpoint_path} was written by {len(state['rng_states'])} "
                    f"ranks, this run has {self.world_size}"
                )
            self.model.load_state_dict(state["model_state"])
            self.optimizer.load_state_dict(state["optimizer_state"])
            self.scheduler.load_state_dict(state["scheduler_state"])
            _set_rng_state(state["rng_states"][self.rank], self.generator)
            self.history = list(state["history"])
            self.start_epoch = state["epoch"]
            return state
        # Ranks draw different dropout masks; the data order comes from each rank's generator.
        torch.manual_seed(seed + self.rank)
        return None

    def train_epochs(
        self,
        step: StepFn,
        summarize: Callable[[dict[str, float]], HistoryEntry],
        extra_state: Callable[[], dict[str, Any]],
        loader: Batches,
    ) -> None:
        """Run the remaining epochs. Each: steps (with the running-max reduction under DDP), BN
        statistics averaged, ``summarize(train_stats)`` → history entry, schedule, checkpoint."""
        for epoch in range(self.start_epoch, self.epochs):
            sums: dict[str, Tensor] = {}
            correct = torch.zeros((), dtype=torch.float64, device=self.device)
            samples = 0
            total = len(loader) if hasattr(loader, "__len__") else None
            desc = f"stage {self.stage} epoch {epoch + 1}/{self.epochs}"
            # Updated by hand: a tqdm that wraps the loader closes itself when the loader ends,
            # before the epoch's validation figures can join its postfix.
            with tqdm(total=total, desc=desc, disable=not self.progress, dynamic_ncols=True) as bar:
                for index, (x, y) in enumerate(loader):
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
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
            self.save(epoch + 1, extra_state())

    def _reduce_stats(self, sums: dict[str, Tensor], correct: Tensor, samples: int) -> dict[str, float]:
        """Sample-weighted epoch means of the named losses and the training accuracy, over all ranks."""
        names = sorted(sums)
        count = torch.tensor(float(samples), dtype=torch.float64, device=self.device)
        totals = torch.stack([sums[name] for name in names] + [correct, count])
        if self.world_size > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        values = totals.tolist()
        stats = {name: value / values[-1] for name, value in zip(names, values)}
        stats["train_acc"] = 100.0 * values[-2] / values[-1]
        return stats

    def save(self, epoch: int, extra: dict[str, Any], model_state: dict[str, Tensor] | None = None) -> None:
        """Checkpoint after ``epoch`` completed epochs (rank 0 writes; every rank must call)."""
        if self.checkpoint_path is None:
            return
        rng_states = _gather_rng_states(self.generator)
        if self.rank != 0:
            return
        save_checkpoint(
            self.checkpoint_path,
            stage=self.stage,
            epoch=epoch,
            epochs=self.epochs,
            model_state=model_state if model_state is not None else self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            history=self.history,
            rng_states=rng_states,
            model_name=self.model_name,
            model_kwargs=self.model_kwargs,
            **extra,
        )


def _clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _mean_p(model: nn.Module) -> float:
    """Mean p = sigmoid(raw_p) over the Rate Norm Layers (shared p counted once per layer)."""
    return torch.stack([m.p for m in _rate_norms(model)]).mean().item()


# ─────────────────────────────────── stage 1 ───────────────────────────────────


def train_stage1(
    model: nn.Module,
    train_loader: Batches,
    *,
    epochs: int,
    val_loader: Batches | None = None,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    generator: torch.Generator | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[HistoryEntry]:
    """Stage 1 (Eq. 12): train the weights with cross-entropy, every Rate Norm p frozen.

    Each ``raw_p`` gets ``requires_grad = False`` (and stays so) and keeps its value (p ≈ 1 for
    layers built with ``p_init = 1``). The model trains in train mode: BN batch statistics and
    the Rate Norm running maxima update every step. Also trains ReLU baselines. The model is
    moved to ``device`` and trained in place; the last epoch's weights are kept.

    Args:
        model: maps ``x: [B, ...]`` to logits ``[B, classes]``.
        train_loader: iterable of ``(x float [B, ...], y int64 [B])``, re-iterated each epoch
            (under DDP: this rank's shard, see :func:`shard`).
        epochs: number of epochs (0 trains nothing).
        val_loader: evaluated after every epoch (accuracy and mean Ω in the history), optional.
        lr, momentum, weight_decay: SGD settings (official code: 0.1, 0.9, 1e-4; decay applies
            to all trained parameters; frozen p's are not in the optimiser).
        milestones, gamma: the learning rate is multiplied by ``gamma`` after each fraction
            ``milestones`` of ``epochs``.
        device: where the model and batches go.
        seed: seeds torch's global generator (plus the rank under DDP) at a fresh start.
        generator: the generator ``train_loader`` shuffles with, so its state is checkpointed
            and restored (the caller seeds it); None if the loader uses torch's global one.
        checkpoint_path: written atomically after every epoch (None: no checkpoint).
        resume: continue from ``checkpoint_path`` when it exists (same ``epochs`` required);
            the result is bit-identical to an uninterrupted run.
        model_name, model_kwargs: how :func:`rnl_fast.models.build_model` rebuilds the model,
            stored in the checkpoint for :func:`model_from_checkpoint`.
        progress: show a tqdm bar per epoch (rank 0 only).

    Returns:
        One dict per epoch: ``epoch``, ``lr``, ``loss`` (mean cross-entropy), ``train_acc`` (%),
        ``val_acc`` (%, None without ``val_loader``), ``omega`` (validation mean Ω, None without
        ``val_loader`` or Rate Norm Layers).
    """
    _check_common(epochs, lr, momentum, milestones, gamma)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
    device = _as_device(device)
    model.to(device).train()
    for raw_p in _unique_raw_ps(model):
        raw_p.requires_grad_(False)
    weights = [p for p in model.parameters() if p.requires_grad]
    if not weights:
        raise ValueError("model must have trainable parameters besides the Rate Norm p's")
    optimizer = torch.optim.SGD(weights, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = _scheduler(optimizer, epochs, milestones, gamma)
    run = _Run(
        1, model, epochs, optimizer, scheduler, device, generator, checkpoint_path, model_name, model_kwargs, progress
    )
    run.start(resume, seed)

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = run.net(x)
        return logits, {"loss": F.cross_entropy(logits, y)}

    def summarize(train_stats: dict[str, float]) -> HistoryEntry:
        val_acc, omega = _accuracy_and_omega(model, val_loader, device) if val_loader is not None else (None, None)
        return {**train_stats, "val_acc": val_acc, "omega": omega}

    run.train_epochs(step, summarize, dict, train_loader)
    return run.history


# ─────────────────────────────────── stage 2 ───────────────────────────────────


def tie_rate_norm_p(model: nn.Module) -> nn.Parameter:
    """Make every Rate Norm Layer share one new ``raw_p`` (paper appendix: one p for all layers),
    initialised from the mean of their current logits. Returns the shared parameter."""
    layers = _rate_norms(model)
    if not layers:
        raise ValueError("model has no RateNorm layers to share a p between")
    with torch.no_grad():
        shared = nn.Parameter(torch.stack([m.raw_p.detach().reshape(()) for m in layers]).mean())
    for layer in layers:
        layer.raw_p = shared
    return shared


def train_stage2(
    model: nn.Module,
    train_loader: Batches,
    val_loader: Batches,
    *,
    epochs: int,
    lam: float = 0.1,
    tolerance: float = 0.5,
    p_init: float | None = 0.95,
    shared_p: bool = False,
    lr: float = 0.01,
    momentum: float = 0.9,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    generator: torch.Generator | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[HistoryEntry]:
    """Stage 2 (Eq. 13): train only the Rate Norm p's for fast inference.

    Minimises ``1 − mean_b cos(r*_b, r′_b) + λ · mean_l Ω_l``: r′ ``[B, classes]`` is the
    model's output, r* that of a frozen copy of the model as passed in (the stage-1 network),
    cosine over the class dimension, mean over the batch; Ω from the model's Rate Norm Layers
    in the same forward. All weights, BN statistics and running maxima are frozen (eval mode,
    see the module docstring); only the ``raw_p`` logits train (SGD, no weight decay).

    After each epoch the validation accuracy and mean Ω are measured; the state with the lowest
    Ω whose accuracy is at least (stage-1 validation accuracy − ``tolerance``) is kept, starting
    from the stage-1 state itself, and is loaded into ``model`` at the end (and written as the
    checkpoint's ``model_state``).

    Args:
        model: a stage-1-trained network with Rate Norm Layers; modified in place.
        train_loader, val_loader: iterables of ``(x float [B, ...], y int64 [B])``.
        epochs: number of epochs.
        lam: λ ≥ 0, the weight of the Rate Inference Loss (default 0.1: see the module docstring).
        tolerance: accuracy drop allowed for the kept state, in percentage points, ≥ 0.
        p_init: p every layer restarts from, in (0, 1] (None keeps the stage-1 p's, whose
            gradient is ~0 at p ≈ 1).
        shared_p: one p for all layers (:func:`tie_rate_norm_p`): the fallback state gets the
            mean of the stage-1 logits, training starts from ``p_init`` (or that mean if None).
        lr, momentum, milestones, gamma: SGD on the logits and its step schedule (official code:
            lr 0.01, momentum 0.9).
        device, seed, generator, checkpoint_path, resume, model_name, model_kwargs, progress:
            as :func:`train_stage1`.

    Returns:
        One dict per epoch: ``epoch``, ``lr``, ``loss`` (mean of Eq. 13), ``cos_loss``
        (mean 1 − cos), ``train_omega`` (mean Ω on the training batches), ``train_acc``,
        ``val_acc`` (%), ``omega`` (validation mean Ω), ``mean_p``, ``selected`` (this epoch
        became the kept state).
    """
    _check_common(epochs, lr, momentum, milestones, gamma)
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a non-negative finite float, got {lam!r}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a non-negative finite number of accuracy points, got {tolerance!r}")
    if p_init is not None and not 0.0 < p_init <= 1.0:
        raise ValueError(f"p_init must be in (0, 1] or None, got {p_init!r}")
    if not _rate_norms(model):
        raise ValueError("model has no RateNorm layers: stage 2 trains their p's")
    device = _as_device(device)
    model.to(device).eval()
    teacher = copy.deepcopy(model).requires_grad_(False)
    if shared_p:
        tie_rate_norm_p(model)
    model.requires_grad_(False)
    raw_ps = _unique_raw_ps(model)
    for raw_p in raw_ps:
        raw_p.requires_grad_(True)
    optimizer = torch.optim.SGD(raw_ps, lr=lr, momentum=momentum, weight_decay=0.0)
    scheduler = _scheduler(optimizer, epochs, milestones, gamma)
    run = _Run(
        2, model, epochs, optimizer, scheduler, device, generator, checkpoint_path, model_name, model_kwargs, progress
    )
    state = run.start(resume, seed)
    if state is not None:
        teacher.load_state_dict(state["teacher_state"])
        reference_acc, best_omega, best_state = state["reference_acc"], state["best_omega"], state["best_state"]
        best_state = {name: value.to(device) for name, value in best_state.items()}
    else:
        reference_acc = evaluate_ann(teacher, val_loader, device)
        _, best_omega = _accuracy_and_omega(model, val_loader, device)
        best_state = _clone_state(model)
        if p_init is not None:
            with torch.no_grad():
                for raw_p in raw_ps:
                    raw_p.fill_(raw_from_p(p_init))

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            target = teacher(x).flatten(1)
        output = run.net(x)
        cos_loss = 1.0 - F.cosine_similarity(output.flatten(1), target, dim=1, eps=_COSINE_EPS).mean()
        omega = rate_inference_loss(model)
        return output, {"loss": cos_loss + lam * omega, "cos_loss": cos_loss, "train_omega": omega}

    def summarize(train_stats: dict[str, float]) -> HistoryEntry:
        nonlocal best_omega, best_state
        val_acc, omega = _accuracy_and_omega(model, val_loader, device)
        selected = val_acc >= reference_acc - tolerance and omega < best_omega
        if selected:
            best_omega, best_state = omega, _clone_state(model)
        return {**train_stats, "val_acc": val_acc, "omega": omega, "mean_p": _mean_p(model), "selected": selected}

    def extra_state() -> dict[str, Any]:
        return {
            "teacher_state": teacher.state_dict(),
            "reference_acc": reference_acc,
            "best_omega": best_omega,
            "best_state": best_state,
            "lam": lam,
            "tolerance": tolerance,
        }

    run.train_epochs(step, summarize, extra_state, train_loader)
    model.load_state_dict(best_state)
    run.save(epochs, extra_state(), model_state=best_state)
    return run.history
