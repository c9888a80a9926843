"""Data-parallel training under torchrun: process group, data shards, the DDP wrapper, and the two
reductions that keep every rank's buffers equal (running maxima: MAX after every step; BatchNorm
statistics: mean at each epoch's end). The running max equals what one process on the global batch
would hold only for a Rate Norm Layer with no batch statistics before it: a BatchNorm in train mode
normalises each rank's share by its own statistics (see :func:`all_reduce_running_max`).

Why these and not DDP's own buffer sync: see "Data parallel" in docs/training.md.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from ._layers import rate_norms


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


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(data: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s share of ``data``: items ``rank, rank + world_size, …`` of the first
    ``N − N mod world_size``, so every rank gets exactly ``N // world_size`` items (DDP needs the
    same number of steps on every rank).

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


def wrap_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP that never syncs buffers in forward (running maxima are MAX-reduced instead, see
    :func:`all_reduce_running_max`); all buffers start from rank 0's values."""
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


def all_reduce_running_max(model: nn.Module) -> None:
    """Set every Rate Norm ``running_max`` to its maximum over all ranks (one collective).

    Called after every training step, every rank then holds the MAX over ranks of their local
    updates ``(1 − m)·M + m·max(local input)`` from the shared ``M``, which is
    ``(1 − m)·M + m·max(all ranks' inputs)``. That is exactly the running max of single-process
    training on the global batch when each rank's input to the layer is what one process would
    compute for the same samples, i.e. no layer before it uses batch statistics. Behind a
    BatchNorm in train mode (per-rank batch statistics, as standard DDP; every Rate Norm Layer of
    cnn7) it is the max of what the ranks' networks saw, which differs from the single-process
    value (issue 13: 3.13 against 2.58 on cnn7; tested in
    tests/test_train.py::test_ddp_running_max_is_single_process_only_without_batch_norm_before).
    No-op outside a process group or without Rate Norm Layers. Every rank must call it.
    """
    layers = rate_norms(model)
    if not layers or rank_and_world()[1] == 1:
        return
    # One flat buffer: a channel-wise layer's running max is [C], the others' [].
    maxima = torch.cat([m.running_max.reshape(-1) for m in layers])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    for layer, value in zip(layers, maxima.split([m.running_max.numel() for m in layers])):
        layer.running_max.copy_(value.view_as(layer.running_max))


def average_batch_norm_stats(model: nn.Module) -> None:
    """Average every BatchNorm ``running_mean`` and ``running_var`` over all ranks (one collective).

    No-op outside a process group or without tracked BN statistics. Every rank must call it.
    """
    world_size = rank_and_world()[1]
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
