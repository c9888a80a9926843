"""The converted SNN and its simulation.

- :mod:`.network`: :class:`SpikingNetwork`, the traced ANN graph run on IF neurons over all T
  steps at once (what :func:`rnl_fast.convert` returns);
- :mod:`.metrics`: :func:`simulate`, one pass over a dataset measuring accuracy, spikes and K
  curves per step, and :func:`mean_omega`;
- :mod:`.memory`: the per-chunk memory budget and the opt-in allocator setting
  :func:`reuse_freed_memory`.
"""

from .memory import (
    MAX_CHUNK_BYTES,
    MAX_CHUNK_BYTES_GPU,
    MIN_CHUNK_BYTES,
    available_memory,
    chunk_budget,
    reuse_freed_memory,
)
from .metrics import SimulationResult, ann_rates, mean_omega, simulate
from .network import AvgPool2x2, SpikingNetwork, SpikingNeurons

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_CHUNK_BYTES_GPU",
    "MIN_CHUNK_BYTES",
    "AvgPool2x2",
    "SimulationResult",
    "SpikingNetwork",
    "SpikingNeurons",
    "ann_rates",
    "available_memory",
    "chunk_budget",
    "mean_omega",
    "reuse_freed_memory",
    "simulate",
]
