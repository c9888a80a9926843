"""What ``rnl_fast.from_spikingjelly`` buys, by step mode.

    python bench/spikingjelly_swap_cost.py [--batch 32] [-T 32] [--runs 7]

SpikingJelly 2.0's ann2snn conversion (``RateCodingRecipe(mode="max")``) of a cnn7 with random
weights, against the same model after ``from_spikingjelly``: stepped one step per call as
ann2snn's users step it (``reset_net``, then ``out += snn(x)`` T times) and in one multi-step call
after ``set_step_mode(snn, "m")``. The outputs are checked equal first; then medians of interleaved
runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import time
from collections.abc import Callable

import torch
from spikingjelly.activation_based import ann2snn, functional

import rnl_fast
from rnl_fast import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("-T", type=int, default=32)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    ann = models.build_model("cnn7", activation="relu", seed=0).eval()
    x = torch.rand(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with contextlib.redirect_stderr(io.StringIO()):  # its calibration progress bar
        sj = ann2snn.FXConverter(ann2snn.RateCodingRecipe([(x, None)], mode="max"), device="cpu").convert(
            copy.deepcopy(ann)
        )
    ours = rnl_fast.from_spikingjelly(sj)

    def per_step(net: torch.nn.Module) -> torch.Tensor:
        functional.reset_net(net)
        with torch.no_grad():
            out = net(x)
            for _ in range(args.T - 1):
                out = out + net(x)
        return out

    def multi_step(net: torch.nn.Module) -> torch.Tensor:
        functional.reset_net(net)
        with torch.no_grad():
            return net(x.unsqueeze(0).expand(args.T, *x.shape)).sum(0)

    runs: dict[str, Callable[[torch.nn.Module], torch.Tensor]] = {"s": per_step, "m": multi_step}
    for mode, run in runs.items():
        for net in (sj, ours):
            functional.set_step_mode(net, mode)
        if not torch.equal(run(sj), run(ours)):
            raise SystemExit(f"step mode {mode}: the swapped model's outputs differ from SpikingJelly's")
        times: dict[str, list[float]] = {"SpikingJelly": [], "swapped": []}
        for _ in range(args.runs):
            for name, net in (("SpikingJelly", sj), ("swapped", ours)):
                start = time.perf_counter()
                run(net)
                times[name].append(time.perf_counter() - start)
        sj_ms, ours_ms = (1e3 * statistics.median(times[name]) for name in ("SpikingJelly", "swapped"))
        ratio = sj_ms / ours_ms
        print(f"step mode {mode}: SpikingJelly {sj_ms:.0f} ms, swapped {ours_ms:.0f} ms, SJ / swapped {ratio:.2f}")


if __name__ == "__main__":
    main()
