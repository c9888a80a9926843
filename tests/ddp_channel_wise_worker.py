"""One rank of the two-process channel-wise DDP test
(tests/test_train.py::test_ddp_channel_wise_running_max); run by torchrun.

Usage: ``torchrun --nproc_per_node=2 ... tests/ddp_channel_wise_worker.py OUT_DIR``. Each rank
trains :func:`channel_wise_model` (stage 1) on its shard of a synthetic 2-channel problem in which
rank r's channel r is brighter, so that the per-channel batch maxima of the first Rate Norm Layer
are won by rank 0 on channel 0 and by rank 1 on channel 1. It writes ``OUT_DIR/rank{r}.pt``: the
final state, and for every training forward of every Rate Norm Layer the layer's input (this
rank's share of the global batch), its running max before the forward, and the running max right
after it (this rank's local update, before the cross-rank reduction).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from rnl_fast import data, train
from rnl_fast.nn import RateNorm

#: On rank r, input channel r is multiplied by this.
BRIGHT_CHANNEL_SCALE = 3.0
IMAGE_SIZE = 8
NUM_CLASSES = 4


def channel_wise_model() -> nn.Sequential:
    """``[B, 2, 8, 8]`` → logits ``[B, 4]``, with the three kinds of running max the cross-rank
    reduction concatenates: ``[2]`` sized up front (on the raw input, so each rank's per-channel
    maxima are known), ``[4]`` sized by the first input (``[]`` until then), and ``[]``."""
    return nn.Sequential(
        RateNorm(channel_wise=True, num_channels=2),
        nn.Conv2d(2, 4, 3, padding=1),
        RateNorm(channel_wise=True),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        RateNorm(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, NUM_CLASSES),
    )


class BrightChannelLoader:
    """2-channel batches from a 1-channel loader: ``[x, x.flip(-1)]``, channel ``bright`` × the scale."""

    def __init__(self, loader: data.ArrayLoader, bright: int) -> None:
        self.loader = loader
        self.bright = bright

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            both = torch.cat([x, x.flip(-1)], dim=1)
            both[:, self.bright] *= BRIGHT_CHANNEL_SCALE
            yield both, y


def main(out_dir: Path) -> None:
    rank, world_size, device = train.setup_distributed()
    torch.manual_seed(rank)  # different initial weights per rank: DDP must make them equal
    model = channel_wise_model()
    # Per layer, one entry per training forward: {"x", "before", "local_after"}.
    forwards: list[list[dict[str, Tensor]]] = []
    for layer in (m for m in model.modules() if isinstance(m, RateNorm)):
        records: list[dict[str, Tensor]] = []
        forwards.append(records)

        def before(module: RateNorm, inputs: tuple[Tensor], records=records) -> None:
            if module.training:
                records.append({"x": inputs[0].detach().clone(), "before": module.running_max.detach().clone()})

        def after(module: RateNorm, inputs: object, output: object, records=records) -> None:
            if module.training:
                records[-1]["local_after"] = module.running_max.detach().clone()

        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)

    dataset = data.make_synthetic(96, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES, noise=0.3)
    generator = torch.Generator().manual_seed(100 + rank)
    loader = BrightChannelLoader(
        data.make_loader(train.shard(dataset, rank, world_size), 12, shuffle=True, generator=generator), bright=rank
    )
    train.train_stage1(model, loader, epochs=2, lr=0.05, device=device, generator=generator, progress=False, seed=0)
    torch.save({"state": model.state_dict(), "forwards": forwards}, out_dir / f"rank{rank}.pt")
    train.cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
