"""Validation during training: accuracy and the mean Rate Inference Loss Ω of a model, summed over
ranks under DDP, which stage 2 uses to pick the state it keeps."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..nn import rate_inference_loss
from ._layers import rate_norms
from .distributed import rank_and_world

#: Batches ``(x float [B, ...], y int64 [B])``, as the data loaders yield them.
Batches = Iterable[tuple[Tensor, Tensor]]


@torch.no_grad()
def accuracy_and_omega(model: nn.Module, loader: Batches, device: torch.device | str) -> tuple[float, float | None]:
    """Accuracy in percent and the mean over batches of the mean Ω over Rate Norm Layers
    (None without Rate Norm Layers), in eval mode; summed over ranks under DDP (every rank must
    call it). The model's mode is restored afterwards."""
    device = torch.device(device)
    has_rate_norm = bool(rate_norms(model))
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
    if rank_and_world()[1] > 1:
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
    return accuracy_and_omega(model, loader, device)[0]
