"""The two training stages of Rate Norm networks (Ding et al. 2021, §2.4, Algorithm 1, Eq. 12–13).

Stage 1 (:func:`train_stage1`) trains the weights with cross-entropy, every Rate Norm p frozen;
stage 2 (:func:`train_stage2`) trains only the p's with ``1 − cos(r*, r′) + λ·mean Ω`` against a
frozen copy of the stage-1 network and keeps the lowest-Ω epoch within an accuracy tolerance.
Both run the same :class:`~rnl_fast.train.loop.EpochLoop`. Why stage 2 runs in eval mode, starts
from ``p_init`` and defaults to λ = 0.1 (with the λ sweep): docs/training.md.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import rate_inference_loss, raw_from_p
from ._layers import rate_norms, rate_readouts, unique_raw_ps
from .evaluation import Batches, accuracy_and_omega, evaluate_ann
from .loop import EpochLoop, HistoryEntry, LoopOptions

#: Stage 1's learning-rate multiplier for the layers that read Rate Norm rates into the output
#: (measured on MNIST cnn7: docs/training.md).
READOUT_LR_SCALE = 10.0
#: λ of the Rate Inference Loss in the paper's Algorithm 1 (the official code's default is 0.1).
PAPER_LAMBDA = 0.5
# ε of the cosine similarity of Eq. 13 (official code).
_COSINE_EPS = 1e-6


def _check_common(epochs: int, lr: float, momentum: float, milestones: Sequence[float], gamma: float) -> None:
    """Reject the settings both stages take when out of range, naming the argument."""
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


def _clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _mean_p(model: nn.Module) -> float:
    """Mean p = sigmoid(raw_p) over the Rate Norm Layers (shared p counted once per layer)."""
    return torch.stack([m.p for m in rate_norms(model)]).mean().item()


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
    readout_lr_scale: float = READOUT_LR_SCALE,
    device: torch.device | str = "cpu",
    seed: int = 0,
    generator: torch.Generator | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    data_info: Mapping[str, Any] | None = None,
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
        readout_lr_scale: learning-rate multiplier of the layers that read Rate Norm rates into
            the output with no BatchNorm in between (the classifier; see
            :func:`~rnl_fast.train._layers.rate_readouts`). Their inputs, rates in [0, 1], are
            about 10× smaller than the ReLU activations of the same layer in a ReLU network, so
            at one learning rate they learn slower and the RNL network ends below the ReLU
            network after the same epochs (docs/training.md has the measurements). 1 disables
            it; networks without Rate Norm Layers are not affected.
        device: where the model and batches go.
        seed: seeds torch's global generator (plus the rank under DDP) at a fresh start.
        generator: the generator ``train_loader`` shuffles with, so its state is checkpointed
            and restored (the caller seeds it); None if the loader uses torch's global one.
        checkpoint_path: written atomically after every epoch (None: no checkpoint).
        resume: continue from ``checkpoint_path`` when it exists; the result is bit-identical to
            an uninterrupted run. The checkpoint must be this run's: the same stage, ``epochs``,
            number of ranks, ``model_name``/``model_kwargs``, ``data_info`` and settings (lr,
            schedule, …), else :class:`~rnl_fast.train.CheckpointMismatchError` names the first
            difference. Without ``resume`` an existing file is overwritten at the first epoch's end.
        model_name, model_kwargs: how :func:`rnl_fast.models.build_model` rebuilds the model,
            stored in the checkpoint for :func:`model_from_checkpoint`.
        data_info: how the training data was made, e.g. ``{"dataset": "mnist", "train_images":
            None, "batch_size": 128, "seed": 0}`` (plain values); stored in the checkpoint as
            ``data`` (``rnl-fast evaluate`` checks ``data["dataset"]``), must match to resume.
        progress: show a tqdm bar per epoch (rank 0 only).

    Returns:
        One dict per epoch: ``epoch``, ``lr``, ``loss`` (mean cross-entropy), ``train_acc`` (%),
        ``val_acc`` (%, None without ``val_loader``), ``omega`` (validation mean Ω, None without
        ``val_loader`` or Rate Norm Layers).
    """
    _check_common(epochs, lr, momentum, milestones, gamma)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
    device = torch.device(device)
    model.to(device).train()
    for raw_p in unique_raw_ps(model):
        raw_p.requires_grad_(False)
    if not (readout_lr_scale > 0 and math.isfinite(readout_lr_scale)):
        raise ValueError(f"readout_lr_scale must be a positive finite float, got {readout_lr_scale!r}")
    weights = [p for p in model.parameters() if p.requires_grad]
    if not weights:
        raise ValueError("model must have trainable parameters besides the Rate Norm p's")
    readout = {id(p) for layer in rate_readouts(model) for p in layer.parameters() if p.requires_grad}
    groups = [{"params": [p for p in weights if id(p) not in readout]}]
    if readout and readout_lr_scale != 1.0:
        groups.append({"params": [p for p in weights if id(p) in readout], "lr": lr * readout_lr_scale})
    else:
        groups[0]["params"] = weights
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = _scheduler(optimizer, epochs, milestones, gamma)
    run = EpochLoop(
        model,
        optimizer,
        scheduler,
        LoopOptions(
            stage=1,
            epochs=epochs,
            device=device,
            seed=seed,
            generator=generator,
            checkpoint_path=checkpoint_path,
            resume=resume,
            model_name=model_name,
            model_kwargs=dict(model_kwargs or {}),
            data=dict(data_info or {}),
            settings={
                "lr": lr,
                "momentum": momentum,
                "weight_decay": weight_decay,
                "milestones": sorted(milestones),
                "gamma": gamma,
                "readout_lr_scale": readout_lr_scale,
            },
            progress=progress,
        ),
    )
    run.start()

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = run.net(x)
        return logits, {"loss": F.cross_entropy(logits, y)}

    def summarize(train_stats: dict[str, float]) -> HistoryEntry:
        val_acc, omega = accuracy_and_omega(model, val_loader, device) if val_loader is not None else (None, None)
        return {**train_stats, "val_acc": val_acc, "omega": omega}

    run.train_epochs(step, summarize, dict, train_loader)
    return run.history


def tie_rate_norm_p(model: nn.Module) -> nn.Parameter:
    """Make every Rate Norm Layer share one new ``raw_p`` (paper appendix: one p for all layers),
    initialised from the mean of their current logits. Returns the shared parameter."""
    layers = rate_norms(model)
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
    lam: float = PAPER_LAMBDA,
    tolerance: float = 0.5,
    p_init: float | None = 0.95,
    shared_p: bool = True,
    checks_per_epoch: int = 20,
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
    data_info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[HistoryEntry]:
    """Stage 2 (Eq. 13): train only the Rate Norm p's for fast inference.

    Minimises ``1 − mean_b cos(r*_b, r′_b) + λ · mean_l Ω_l``: r′ ``[B, classes]`` is the
    model's output, r* that of a frozen copy of the model as passed in (the stage-1 network),
    cosine over the class dimension, mean over the batch; Ω from the model's Rate Norm Layers
    in the same forward. All weights, BN statistics and running maxima are frozen (eval mode,
    see docs/training.md); only the ``raw_p`` logits train (SGD, no weight decay).

    After each epoch the validation accuracy and mean Ω are measured; the state with the lowest
    Ω whose accuracy is at least (stage-1 validation accuracy − ``tolerance``) is kept, starting
    from the stage-1 state itself, and is loaded into ``model`` at the end (and written as the
    checkpoint's ``model_state``).

    Args:
        model: a stage-1-trained network with Rate Norm Layers; modified in place.
        train_loader, val_loader: iterables of ``(x float [B, ...], y int64 [B])``.
        epochs: number of epochs.
        lam: λ ≥ 0, the weight of the Rate Inference Loss (default 0.5, the paper's Algorithm 1;
            the official code uses 0.1; measurements of both in docs/training.md).
        tolerance: accuracy drop allowed for the kept state, in percentage points, ≥ 0.
        p_init: p every layer restarts from, in (0, 1] (None keeps the stage-1 p's, whose
            gradient is ~0 at p ≈ 1).
        shared_p: one p for all layers (:func:`tie_rate_norm_p`; the default, as the paper's
            appendix); the fallback state gets the mean of the stage-1 logits, training starts
            from ``p_init`` (or that mean if None). False: one p per layer.
        checks_per_epoch: how often per epoch the state is measured on ``val_loader`` and
            considered for keeping (evenly spaced; the last at the epoch's end). The p's move
            fast: with the paper's λ = 0.5 and one shared p they reach their equilibrium (far
            below the tolerance on MNIST cnn7) within a tenth of an epoch, passing states that
            only checks inside the epoch see (docs/training.md).
        lr, momentum, milestones, gamma: SGD on the logits and its step schedule (official code:
            lr 0.01, momentum 0.9).
        device, seed, generator, checkpoint_path, resume, model_name, model_kwargs, data_info,
            progress: as :func:`train_stage1`.

    Returns:
        One dict per epoch: ``epoch``, ``lr``, ``loss`` (mean of Eq. 13), ``cos_loss``
        (mean 1 − cos), ``train_omega`` (mean Ω on the training batches), ``train_acc``,
        ``val_acc`` (%), ``omega`` (validation mean Ω), ``mean_p`` at the epoch's end,
        ``selected`` (a state of this epoch became the kept one), and ``checks``: the same
        measurements (``step``, ``val_acc``, ``omega``, ``mean_p``, ``selected``) inside the epoch.
    """
    _check_common(epochs, lr, momentum, milestones, gamma)
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a non-negative finite float, got {lam!r}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a non-negative finite number of accuracy points, got {tolerance!r}")
    if p_init is not None and not 0.0 < p_init <= 1.0:
        raise ValueError(f"p_init must be in (0, 1] or None, got {p_init!r}")
    if not (isinstance(checks_per_epoch, int) and not isinstance(checks_per_epoch, bool) and checks_per_epoch >= 1):
        raise ValueError(f"checks_per_epoch must be a positive integer, got {checks_per_epoch!r}")
    if not rate_norms(model):
        raise ValueError("model has no RateNorm layers: stage 2 trains their p's")
    device = torch.device(device)
    model.to(device).eval()
    teacher = copy.deepcopy(model).requires_grad_(False)
    if shared_p:
        tie_rate_norm_p(model)
    model.requires_grad_(False)
    raw_ps = unique_raw_ps(model)
    for raw_p in raw_ps:
        raw_p.requires_grad_(True)
    optimizer = torch.optim.SGD(raw_ps, lr=lr, momentum=momentum, weight_decay=0.0)
    scheduler = _scheduler(optimizer, epochs, milestones, gamma)
    run = EpochLoop(
        model,
        optimizer,
        scheduler,
        LoopOptions(
            stage=2,
            epochs=epochs,
            device=device,
            seed=seed,
            generator=generator,
            checkpoint_path=checkpoint_path,
            resume=resume,
            model_name=model_name,
            model_kwargs=dict(model_kwargs or {}),
            data=dict(data_info or {}),
            settings={
                "lam": lam,
                "tolerance": tolerance,
                "p_init": p_init,
                "shared_p": shared_p,
                "checks_per_epoch": checks_per_epoch,
                "lr": lr,
                "momentum": momentum,
                "milestones": sorted(milestones),
                "gamma": gamma,
            },
            progress=progress,
        ),
    )
    state = run.start()
    if state is not None:
        teacher.load_state_dict(state["teacher_state"])
        reference_acc, best_omega, best_state = state["reference_acc"], state["best_omega"], state["best_state"]
        best_state = {name: value.to(device) for name, value in best_state.items()}
    else:
        reference_acc = evaluate_ann(teacher, val_loader, device)
        _, best_omega = accuracy_and_omega(model, val_loader, device)
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

    checks: list[dict[str, Any]] = []  # this epoch's measurements inside it

    def consider() -> dict[str, Any]:
        """Measure the current state on the validation set; keep it if it is the lowest Ω so far
        within the tolerance."""
        nonlocal best_omega, best_state
        val_acc, omega = accuracy_and_omega(model, val_loader, device)
        selected = val_acc >= reference_acc - tolerance and omega < best_omega
        if selected:
            best_omega, best_state = omega, _clone_state(model)
        return {"val_acc": val_acc, "omega": omega, "mean_p": _mean_p(model), "selected": selected}

    def check(steps_done: int) -> None:
        checks.append({"step": steps_done, **consider()})

    def summarize(train_stats: dict[str, float]) -> HistoryEntry:
        end = consider()
        entry = {**train_stats, **end, "checks": list(checks)}
        entry["selected"] = end["selected"] or any(c["selected"] for c in checks)
        checks.clear()
        return entry

    def extra_state() -> dict[str, Any]:
        return {
            "teacher_state": teacher.state_dict(),
            "reference_acc": reference_acc,
            "best_omega": best_omega,
            "best_state": best_state,
            "lam": lam,
            "tolerance": tolerance,
        }

    run.train_epochs(step, summarize, extra_state, train_loader, check, checks_per_epoch, final=False)
    model.load_state_dict(best_state)
    run.save(epochs, extra_state(), model_state=best_state, finished=True)
    return run.history
