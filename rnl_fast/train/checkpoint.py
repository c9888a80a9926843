"""Training checkpoints: what a file holds, how it is written and read, and how a model is rebuilt
from one.

A checkpoint is written atomically after every epoch and holds everything a bit-exact resume needs
(weights, optimiser, schedule, history, every rank's random state) plus how to rebuild the model.
Format and resume rules: "Checkpoints" in docs/training.md.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._io import atomic_write
from ..models import build_model
from .distributed import rank_and_world

#: Written into every checkpoint; :func:`load_checkpoint` rejects files without it (or
#: :data:`OLD_FORMATS`'s).
CHECKPOINT_FORMAT = "rnl_fast-checkpoint-v2"
#: Formats still read: v1 has no checksum (loaded unverified) and no run record (see
#: "Checkpoints" in docs/training.md).
OLD_FORMATS = ("rnl_fast-checkpoint-v1",)
#: Keys outside the payload that the checksum covers.
_ENVELOPE = ("format", "checksum")
#: Keys every training checkpoint holds (besides the stage-specific ones).
TRAINING_KEYS = (
    "stage",
    "epoch",
    "epochs",
    "model_state",
    "optimizer_state",
    "scheduler_state",
    "history",
    "rng_states",
)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt, or not an rnl_fast checkpoint."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint does not belong to the run that would resume it (or to the use it is put to):
    another stage, model, dataset or setting, or an unfinished run."""


def first_difference(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """``"name=recorded, this run has name=given"`` for the first key whose values differ (a key
    missing on one side counts as None); None when they agree."""
    for key in (*recorded, *(k for k in given if k not in recorded)):
        if recorded.get(key) != given.get(key):
            return f"{key}={recorded.get(key)!r}, this run has {key}={given.get(key)!r}"
    return None


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` to ``digest`` in a form that survives torch.save/torch.load unchanged:
    tensors by dtype, shape and bytes; containers by their items in order; anything else by its
    type and repr (floats' repr round-trips exactly)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{%d:" % len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[%d:" % len(value) if isinstance(value, list) else b"(%d:" % len(value))
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def payload_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's payload (every key but ``format`` and ``checksum``), over the
    values as loaded, so that one byte changed in any tensor or value gives another digest."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in state.items() if key not in _ENVELOPE})
    return "sha256:" + digest.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], **state: Any) -> None:
    """Write ``state`` (tensors, state dicts, plain Python values) to ``path`` atomically, with
    the format tag and a checksum of the payload (:func:`payload_digest`) that
    :func:`load_checkpoint` verifies.

    An interruption at any point leaves the previous checkpoint intact (see
    :func:`rnl_fast._io.atomic_write`). Missing parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as file:
        torch.save({"format": CHECKPOINT_FORMAT, "checksum": payload_digest(state), **state}, file)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, tensors on the CPU.

    The payload's checksum is verified (format v2); a format-v1 file, written before
    checksums, is read unverified.

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt (its content does not match its
            checksum) or not an rnl_fast checkpoint; the one-line message names the file.
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
    if not isinstance(state, dict) or state.get("format") not in (CHECKPOINT_FORMAT, *OLD_FORMATS):
        raise CheckpointError(f"checkpoint {path} is not an rnl_fast checkpoint (no format {CHECKPOINT_FORMAT!r})")
    if state["format"] == CHECKPOINT_FORMAT and state.get("checksum") != payload_digest(state):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its content does not match the checksum it was written with"
        )
    return state


def model_from_state(
    state: dict[str, Any],
    device: torch.device | str = "cpu",
    *,
    source: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Rebuild the model of a loaded training checkpoint (:func:`load_checkpoint`'s dict) and load
    its weights, so that a caller reads the file once for both its metadata and its model.

    Uses ``build_model(model_name, **model_kwargs)`` as given to the training function; after
    stage 2 the weights are the selected (lowest-Ω) state.

    Args:
        state: the checkpoint's contents.
        device: where the model goes.
        source: the file ``state`` came from, named in the error message.

    Returns:
        The model on ``device``, in eval mode.

    Raises:
        CheckpointError: ``state`` has no ``model_name`` or ``model_state``.
    """
    if state.get("model_name") is None or "model_state" not in state:
        name = "checkpoint" if source is None else f"checkpoint {source}"
        raise CheckpointError(
            f"{name} has no model_name/model_state: pass model_name and model_kwargs "
            "to the training function to make it rebuildable"
        )
    model = build_model(state["model_name"], **state.get("model_kwargs", {}))
    model.load_state_dict(state["model_state"])
    return model.to(device).eval()


def model_from_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model a training checkpoint file was written for and load its weights
    (:func:`load_checkpoint` then :func:`model_from_state`). Returns the model in eval mode."""
    return model_from_state(load_checkpoint(path), device, source=path)


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """This process's random state: torch's CPU (and CUDA) generators and the loader's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    """Restore what :func:`rng_state` captured (``generator``'s state too, when given)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        if "generator" not in state:
            raise ValueError("generator was given but the checkpoint holds no generator state to restore")
        generator.set_state(state["generator"])


def gather_rng_states(generator: torch.Generator | None) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, indexed by rank (a collective under DDP)."""
    own = rng_state(generator)
    world_size = rank_and_world()[1]
    if world_size == 1:
        return [own]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, own)
    return gathered
