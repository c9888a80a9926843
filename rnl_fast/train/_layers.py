"""The Rate Norm Layers of a model and their p logits, as training, evaluation and the DDP
reductions walk them (always in module order, so every rank lists them alike)."""

from __future__ import annotations

from torch import nn

from ..nn import RateNorm


def rate_norms(model: nn.Module) -> list[RateNorm]:
    """Every Rate Norm Layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, RateNorm)]


def unique_raw_ps(model: nn.Module) -> list[nn.Parameter]:
    """Each Rate Norm logit once (layers sharing one p give one entry), in module order."""
    return list({id(m.raw_p): m.raw_p for m in rate_norms(model)}.values())
