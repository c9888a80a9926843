"""Every variant of the C++ passes on one thread, in nanoseconds per element: a cliff finder.

    python bench/variant_sweep.py [--sizes 65536 1048576] [--dtype float32]

The C++ kernels are compiled once per variant (reset kind, surrogate, detach_reset, quantized,
channel-wise, with or without each gradient term, ...), and each variant is a loop the compiler
may or may not vectorise. A variant that falls back to scalar code does not show in the
benchmarks, which run one variant each: twice GCC left one scalar (QCFS's forward below 2**18
elements, 31x; the Rate Norm backward of a loss without Ω, 11x). This script times each op's
variants on the same input, one thread (``torch.set_num_threads(1)``), through ``rnl_fast.ops``,
and prints ns per element (per neuron-step for IF) with each variant's ratio to the fastest of
its kind (the same work but for one option: forward, forward + backward, the same loss): a
variant several times its peers is worth a look at the disassembly.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from rnl_fast import ops
from rnl_fast.numerics import SURROGATES

T = 8  #: time steps of the IF variants (elements = T x neurons)


def median_ns(run: Callable[[], object], elements: int, budget_s: float = 0.3) -> float:
    run()
    times: list[float] = []
    end = time.monotonic() + budget_s
    while len(times) < 5 or time.monotonic() < end:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / elements * 1e9


def if_variants(elements: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    x = (torch.randn(T, elements // T) * 0.8 + 0.3).to(dtype)
    grad = torch.randn(x.shape, dtype=dtype)
    variants: dict[str, Callable[[], object]] = {
        "fwd soft": lambda: ops.if_sequence(x, count_neurons=False),
        "fwd hard": lambda: ops.if_sequence(x, v_reset=0.0, count_neurons=False),
        "fwd counts": lambda: ops.if_sequence(x),
        "fwd uint8": lambda: ops.if_sequence(x, spike_dtype=torch.uint8, count_neurons=False),
        # The fused IF + 2x2 pooling runs the same step loop into a scratch (planes of 8 x 8).
        "fwd pool2x2 soft": lambda: ops.if_sequence_pool2x2(x.view(T, -1, 8, 8), count_neurons=False),
        "fwd pool2x2 hard": lambda: ops.if_sequence_pool2x2(x.view(T, -1, 8, 8), v_reset=0.0, count_neurons=False),
    }
    xg = x.clone().requires_grad_()
    for surrogate in SURROGATES:
        for v_reset in (None, 0.0):
            for detach in (False, True):
                name = f"fwd+bwd {surrogate} {'hard' if v_reset is not None else 'soft'}{' detach' if detach else ''}"
                variants[name] = lambda s=surrogate, r=v_reset, d=detach: torch.autograd.grad(
                    ops.if_sequence(xg, v_reset=r, surrogate=s, detach_reset=d, count_neurons=False).spikes, xg, grad
                )
    return variants


def rate_norm_variants(elements: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    x = (torch.randn(16, 64, elements // 1024) * 1.5 + 0.3).to(dtype).requires_grad_()
    raw_p = torch.tensor(1.2, requires_grad=True)
    w = torch.randn(x.shape, dtype=dtype)
    variants: dict[str, Callable[[], object]] = {}
    for channel_wise in (False, True):
        running_max = torch.rand(64) + 1.0 if channel_wise else torch.tensor(2.0)
        for levels in (None, 8):
            tag = f"{'cw ' if channel_wise else ''}{'q8 ' if levels else ''}"

            def result(training: bool, cw=channel_wise, rm=running_max, lv=levels):
                return ops.rate_norm(x, raw_p, rm, 0.1, training, cw, lv)

            variants[f"{tag}fwd eval"] = lambda r=result: r(False)
            variants[f"{tag}fwd train"] = lambda r=result: r(True)
            variants[f"{tag}fwd+bwd (r*w).sum()"] = lambda r=result: torch.autograd.grad((r(True).r * w).sum(), x)
            variants[f"{tag}fwd+bwd Ω only"] = lambda r=result: torch.autograd.grad(
                (lambda o: o.sum_r / (o.sum_r2 + 1e-5))(r(True)), x
            )
            variants[f"{tag}fwd+bwd both"] = lambda r=result: torch.autograd.grad(
                (lambda o: (o.r * w).sum() + o.sum_r / (o.sum_r2 + 1e-5))(r(True)), x
            )
    return variants


def qcfs_variants(elements: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    x = (torch.randn(elements) * 2 + 0.5).to(dtype).requires_grad_()
    lam = torch.tensor(1.3, requires_grad=True)
    return {
        "fwd": lambda: ops.qcfs(x.detach(), lam.detach(), 8),
        "fwd+bwd": lambda: torch.autograd.grad(ops.qcfs(x, lam, 8).sum(), (x, lam)),
    }


def kind(name: str) -> str:
    """The work a variant does, without its options: what its speed is compared with."""
    works = ("fwd+bwd (r*w).sum()", "fwd+bwd Ω only", "fwd+bwd both", "fwd+bwd", "fwd eval", "fwd train", "fwd pool2x2")
    for work in works:
        if work in name:
            return work
    return "fwd"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 1048576], help="elements (multiples of 1024)")
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    if any(size < 1024 or size % 1024 for size in args.sizes):
        parser.error("--sizes must be positive multiples of 1024")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    print(f"one thread, {args.dtype}; ns per element (IF: per neuron-step, T = {T}); x = / fastest of its kind")
    for op, variants_of in (("IF", if_variants), ("Rate Norm", rate_norm_variants), ("QCFS", qcfs_variants)):
        for size in args.sizes:
            figures = {name: median_ns(run, size) for name, run in variants_of(size, dtype).items()}
            fastest: dict[str, float] = {}
            for name, ns in figures.items():
                fastest[kind(name)] = min(ns, fastest.get(kind(name), ns))
            print(f"\n{op}, {size} elements")
            for name, ns in figures.items():
                ratio = ns / fastest[kind(name)]
                flag = "   <-- look" if ratio > 3 else ""
                print(f"  {name:34s} {ns:8.2f} ns  {ratio:5.1f}x {kind(name)}{flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
