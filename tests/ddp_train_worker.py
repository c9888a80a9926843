"""One rank of the two-process DDP test (tests/test_train.py::test_ddp_two_ranks); run by torchrun.

Usage: ``torchrun --nproc_per_node=2 ... tests/ddp_train_worker.py OUT_DIR``. Each rank trains
the tiny network of the test on its shard of a synthetic problem (rank 1's inputs scaled ×3, so
its batch maxima are larger), runs stage 1 then stage 2, and writes ``OUT_DIR/rank{r}.pt``:
states after each stage, and the running max each Rate Norm Layer held right after its last
training forward (before the cross-rank reduction).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from rnl_fast import data, train
from rnl_fast.nn import RateNorm

# Rank r's inputs are multiplied by 1 + 2·r.
INPUT_SCALE_PER_RANK = 2.0


def tiny_model() -> nn.Sequential:
    """``[B, 1, 8, 8]`` → logits ``[B, 4]``. The first Rate Norm Layer has no BatchNorm before
    it, so that a rank with larger inputs sees larger maxima there."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        RateNorm(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        RateNorm(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 4),
    )


class ScaledLoader:
    """The batches of ``loader`` with x multiplied by ``scale``."""

    def __init__(self, loader: data.ArrayLoader, scale: float) -> None:
        self.loader = loader
        self.scale = scale

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x * self.scale, y


def main(out_dir: Path) -> None:
    rank, world_size, device = train.setup_distributed()
    torch.manual_seed(rank)  # different initial weights per rank: DDP must make them equal
    model = tiny_model()
    last_local_max: dict[int, torch.Tensor] = {}

    def record(index: int):
        def hook(module: RateNorm, inputs: object, output: object) -> None:
            if module.training:
                last_local_max[index] = module.running_max.detach().clone()

        return hook

    for index, layer in enumerate(m for m in model.modules() if isinstance(m, RateNorm)):
        layer.register_forward_hook(record(index))

    dataset = data.make_synthetic(192, image_size=8, num_classes=4, noise=0.3)
    train_part, val_part = data.train_val_split(dataset, 0.25, seed=0)
    generator = torch.Generator().manual_seed(100 + rank)
    scale = 1.0 + INPUT_SCALE_PER_RANK * rank
    train_loader = ScaledLoader(
        data.make_loader(train.shard(train_part, rank, world_size), 16, shuffle=True, generator=generator), scale
    )
    val_loader = ScaledLoader(data.make_loader(train.shard(val_part, rank, world_size), 64, shuffle=False), scale)
    common = dict(device=device, generator=generator, progress=False, seed=0)
    history1 = train.train_stage1(
        model, train_loader, epochs=2, val_loader=val_loader, lr=0.05, checkpoint_path=out_dir / "stage1.pt", **common
    )
    after_stage1 = {k: v.clone() for k, v in model.state_dict().items()}
    local_stage1 = [last_local_max[i].clone() for i in sorted(last_local_max)]
    history2 = train.train_stage2(
        model,
        train_loader,
        val_loader,
        epochs=1,
        lam=0.5,
        tolerance=100.0,
        checkpoint_path=out_dir / "stage2.pt",
        **common,
    )
    torch.save(
        {
            "after_stage1": after_stage1,
            "local_max_stage1": local_stage1,
            "after_stage2": model.state_dict(),
            "history1": history1,
            "history2": history2,
        },
        out_dir / f"rank{rank}.pt",
    )
    train.cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
