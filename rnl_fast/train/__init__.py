"""Two-stage training of Rate Norm networks (Ding et al. 2021, §2.4, Algorithm 1, Eq. 12–13), on one
process or data-parallel under torchrun, with atomic checkpoints and a bit-exact resume.

- :mod:`.stages`: :func:`train_stage1` (weights, p frozen) and :func:`train_stage2` (the p's, with
  the Rate Inference Loss), built on the epoch loop of :mod:`.loop`;
- :mod:`.evaluation`: accuracy and mean Ω (:func:`evaluate_ann`);
- :mod:`.checkpoint`: the checkpoint file and rebuilding a model from it;
- :mod:`.distributed`: process group, shards, and the DDP buffer reductions.

How to use it, the design decisions, the λ measurements and the DDP and checkpoint rules:
docs/training.md.
"""

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    model_from_checkpoint,
    model_from_state,
    save_checkpoint,
)
from .distributed import (
    all_reduce_running_max,
    average_batch_norm_stats,
    cleanup_distributed,
    setup_distributed,
    shard,
)
from .evaluation import Batches, evaluate_ann
from .loop import HistoryEntry, StepFn, TrainingInterrupted
from .stages import PAPER_LAMBDA, READOUT_LR_SCALE, tie_rate_norm_p, train_stage1, train_stage2

__all__ = [
    "PAPER_LAMBDA",
    "READOUT_LR_SCALE",
    "CHECKPOINT_FORMAT",
    "Batches",
    "CheckpointError",
    "CheckpointMismatchError",
    "HistoryEntry",
    "StepFn",
    "TrainingInterrupted",
    "all_reduce_running_max",
    "average_batch_norm_stats",
    "cleanup_distributed",
    "evaluate_ann",
    "load_checkpoint",
    "model_from_checkpoint",
    "model_from_state",
    "save_checkpoint",
    "setup_distributed",
    "shard",
    "tie_rate_norm_p",
    "train_stage1",
    "train_stage2",
]
