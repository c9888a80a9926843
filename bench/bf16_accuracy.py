"""bf16 simulation against fp32 on real data: accuracy, argmax agreement and speed.

    python bench/bf16_accuracy.py --demo-dir D [--vgg16] [--images 1000] [-T 64]

``D`` is the folder of ``rnl-fast demo --out D`` (its trained ``rnl.pt`` and ``relu.pt``): cnn7
converted by ``rnl`` and by ``robustnorm`` channel-wise with v_init = θ/2 is simulated on
``--images`` MNIST test images for T steps, once as converted (fp32) and once after
``snn.to(torch.bfloat16)``. ``--vgg16`` also trains a vgg16 (Rate Norm, one input channel) on
12000 MNIST training images padded to 32×32 for one epoch and compares it the same way (slow on
a CPU: the bf16 and fp32 simulations of vgg16 are ~20 TFLOP each at 1000 images, T = 64).
Prints one JSON line per network.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rnl_fast
from rnl_fast import data, models
from rnl_fast.train.checkpoint import load_checkpoint, model_from_state


def simulate_batches(snn, batches, T: int, pad: int) -> tuple[float, torch.Tensor, float]:
    """Accuracy (%) after T steps, the predictions, and the seconds it took."""
    correct, predictions, start = 0, [], time.perf_counter()
    for x, y in batches:
        estimate = snn(F.pad(x, (pad,) * 4) if pad else x, T)[-1]
        predictions.append(estimate.argmax(1))
        correct += int((predictions[-1] == y).sum())
    images = sum(len(y) for _, y in batches)
    return 100.0 * correct / images, torch.cat(predictions), time.perf_counter() - start


def compare(name: str, snn, batches, T: int, pad: int = 0) -> dict:
    """fp32 against ``snn.to(torch.bfloat16)`` on the same batches."""
    acc32, pred32, t32 = simulate_batches(snn, batches, T, pad)
    acc16, pred16, t16 = simulate_batches(copy.deepcopy(snn).to(torch.bfloat16), batches, T, pad)
    return {
        "network": name,
        "T": T,
        "accuracy_fp32": acc32,
        "accuracy_bf16": acc16,
        "argmax_agreement": 100.0 * float((pred32 == pred16).float().mean()),
        "seconds_fp32": round(t32, 1),
        "seconds_bf16": round(t16, 1),
        "bf16_speedup": round(t32 / t16, 2),
    }


def trained_vgg16(images: int = 12000, seed: int = 0) -> torch.nn.Module:
    """vgg16 (Rate Norm) trained one epoch on MNIST padded to 32×32 (SGD 0.05, momentum 0.9)."""
    net = models.build_model("vgg16", activation="rnl", in_channels=1, input_size=32, seed=seed)
    train_set = data.subset(data.load_dataset("mnist", "train"), images, seed=seed)
    loader = data.make_loader(train_set, 64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    net.train()
    for x, y in loader:
        loss = F.cross_entropy(net(F.pad(x, (2, 2, 2, 2))), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, required=True, help="output folder of `rnl-fast demo --out`")
    parser.add_argument("--vgg16", action="store_true", help="also train and compare a vgg16 (slow)")
    parser.add_argument("--images", type=int, default=1000, help="MNIST test images (default: 1000)")
    parser.add_argument("-T", type=int, default=64, help="steps (default: 64)")
    args = parser.parse_args()
    test_set = data.subset(data.load_dataset("mnist", "test"), args.images, seed=0)
    batches = list(data.make_loader(test_set, 100, shuffle=False))
    calibration = data.make_loader(data.subset(data.load_dataset("mnist", "train"), 512, seed=1), 128, shuffle=False)

    rnl = model_from_state(load_checkpoint(args.demo_dir / "rnl.pt"))
    print(json.dumps(compare("cnn7 rnl", rnl_fast.convert(rnl, "rnl"), batches, args.T)), flush=True)
    relu = model_from_state(load_checkpoint(args.demo_dir / "relu.pt"))
    best = rnl_fast.convert(relu, "robustnorm", calibration=calibration, channel_wise=True, v_init="half")
    print(json.dumps(compare("cnn7 robustnorm+cw+half", best, batches, args.T)), flush=True)
    if args.vgg16:
        print(json.dumps(compare("vgg16 rnl", rnl_fast.convert(trained_vgg16(), "rnl"), batches, args.T, pad=2)))


if __name__ == "__main__":
    main()
