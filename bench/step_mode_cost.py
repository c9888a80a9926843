"""What a per-step loop costs against one multi-step call of IFSequence (forward, no gradient).

    python bench/step_mode_cost.py [--steps 32] [--shape 128 32 28 28] [--runs 5] [--no-count-neurons]

Prints the median wall time of ``layer(x)`` with ``step_mode="m"`` (one kernel launch for all
steps) and of ``for t in range(T): layer(x[t])`` with ``step_mode="s"`` (one launch per step),
on the same input, after one warm-up run each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rnl_fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--shape", type=int, nargs="+", default=[128, 32, 28, 28])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-count-neurons", action="store_true", help="IFSequence(count_neurons=False)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rnl_fast.reuse_freed_memory()
    x = torch.rand(args.steps, *args.shape, device=args.device) * 0.5
    layer = rnl_fast.IFSequence(v_threshold=1.0, count_neurons=not args.no_count_neurons)

    def multi() -> None:
        layer.reset()
        layer.step_mode = "m"
        layer(x)

    def per_step() -> None:
        layer.reset()
        layer.step_mode = "s"
        for t in range(args.steps):
            layer(x[t])

    times: dict[str, list[float]] = {"m: one call": [], "s: per-step loop": []}
    with torch.no_grad():
        for name, fn in zip(times, (multi, per_step), strict=True):
            fn()  # warm-up
            for _ in range(args.runs):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    print(
        f"T={args.steps}, x {list(x.shape)}, {args.device}, {torch.get_num_threads()} threads, median of {args.runs}:"
    )
    for name, ts in times.items():
        print(f"  {name:18s} {statistics.median(ts) * 1e3:9.1f} ms  (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})")
    m, s = (statistics.median(ts) for ts in times.values())
    print(f"  per-step / one call: {s / m:.2f}x")


if __name__ == "__main__":
    main()
