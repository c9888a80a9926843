"""Where the time of one end-to-end call of ours goes: torch.profiler over one call, the top ops
and the share of each kind of op (conv, IF, pooling, copies, ...), as lines to print."""

from __future__ import annotations

import gc
import re
import time
from typing import Any

from .cases import CaseBuilder
from .measure import synchronize
from .tables import format_table

#: First match wins: (label, regex on the lower-cased op or kernel name).
_PROFILE_CATEGORIES = (
    ("conv", r"conv|cudnn|winograd|implicit_gemm|xmma|mkldnn"),
    ("IF", r"if_forward|if_sequence|rnl_fast"),
    ("avgpool", r"avg_pool|avgpool"),
    ("copies", r"copy|clone|\bcat\b|contiguous|_to_copy|empty_strided|fill_"),
    ("linear", r"addmm|gemm|linear|matmul|\bmm\b"),
    ("elementwise", r"mul|div|add|cumsum|arange|elementwise"),
)


def _first_input(event: Any) -> str:
    """The shape of the op's first tensor input."""
    shapes = [shape for shape in (getattr(event, "input_shapes", None) or []) if shape]
    return f"[{', '.join(map(str, shapes[0]))}]" if shapes else "-"


def profile_e2e(cases: CaseBuilder, group_name: str, device: str, top: int = 10) -> list[str]:
    """Where the time of one call of ours goes: torch.profiler over one call (after a warm-up),
    the top ops by self CPU time (CUDA: self device time) and the share of each kind of op."""
    from torch.profiler import ProfilerActivity, profile

    case = cases.build(group_name, "ours", device)
    case.run()
    synchronize(device)
    gc.collect()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        case.run()
        synchronize(device)
    wall = time.perf_counter() - start
    attr, what = ("self_device_time_total", "self CUDA") if device == "cuda" else ("self_cpu_time_total", "self CPU")
    events = [e for e in prof.key_averages(group_by_input_shape=True) if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) or 1.0
    shares: dict[str, float] = {}
    for e in events:
        label = next((label for label, pattern in _PROFILE_CATEGORIES if re.search(pattern, e.key.lower())), "other")
        shares[label] = shares.get(label, 0.0) + getattr(e, attr) / total
    rows = [
        [e.key[:60], _first_input(e), f"{getattr(e, attr) / 1e3:.1f}", f"{getattr(e, attr) / total:.1%}", e.count]
        for e in events[:top]
    ]
    by_kind = ", ".join(f"{label} {share:.0%}" for label, share in sorted(shares.items(), key=lambda kv: -kv[1]))
    return [
        f"ours, {group_name} [{device}], x [{', '.join(map(str, case.shape))}], T = {case.steps} "
        f"(chunk {case.chunk}): one call under torch.profiler, {wall * 1e3:.0f} ms wall, {what} time "
        f"{total / 1e3:.0f} ms in all",
        f"- by kind: {by_kind}",
        *format_table(["op", "first input", f"{what} ms", "share", "calls"], rows),
    ]
