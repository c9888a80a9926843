"""Shared pieces of the rnl_fast benchmarks: sizes, cases, timing, peak memory, targets, tables.

Two drivers run the same cases: the pytest-benchmark files (``pytest bench/ --benchmark-only``,
through ``conftest.py``) and ``gpu_bench.py`` (the one-shot GPU check). A *group* is one piece of
work (e.g. IF forward with fp32 spikes); its *impls* do that work on the same inputs: ours
(:mod:`rnl_fast.ops`), ``x.clone()``, the eager reference, ``torch.compile`` of it and SpikingJelly
2.0 (``cases.py``); end to end, a converted network simulated over T steps, ours beside one ANN
forward and SpikingJelly's ``ann2snn`` (``e2e.py``); time to accuracy, the wall time until a
converted MNIST cnn7 is within 1 point of its ANN, our best recipe beside SpikingJelly's (``tta.py``).

- ``groups.py``: scales, sizes, the groups, ``Case``, the pytest parameters;
- ``cases.py``: the op cases and ``CaseBuilder`` (builds any case, primes each impl once);
- ``e2e.py``: the end-to-end networks, conversions and cases;
- ``tta.py``: time to accuracy: the trained network, the steps search, the cases;
- ``measure.py``: warm-up, peak memory, timed rounds, ``Measurement``, ``Results``;
- ``targets.py``, ``tables.py``, ``profile.py``, ``env.py``: what is printed.

Absolute times on shared machines are noise: the figures are the ratios measured side by side in
one run, and achieved GB/s counted on the bytes the op must move.
"""

import os

from .cases import CaseBuilder
from .e2e import E2E_PROFILE_GROUP
from .env import environment_lines, thp_status, threading_line, usable_cores
from .groups import GROUPS, GROUPS_BY_NAME, SCALES, Unavailable, bench_scale, case_params, copy_bytes_for
from .measure import (
    Measurement,
    Results,
    copy_bandwidth_gbps,
    device_timer,
    mb_text,
    measure_case,
    ms_text,
    skipped,
    synced,
    time_alternating,
)
from .profile import profile_e2e
from .tables import e2e_summary, group_tables, summary_table
from .targets import alternated_baselines

# SpikingJelly 2.0's IFNode has no ``backend=`` argument: it dispatches by device, and on CUDA
# reads its implementation (auto | cuda | triton | torch) from this variable when it is imported
# (lazily, inside the functions of the modules above, so after this line). Triton is the GPU path
# to compare with: its native "cuda" path exists only in a wheel built with SJ_BUILD_NATIVE_CUDA=1,
# and its cupy backend is gone.
os.environ.setdefault("SJ_IF_CUDA_IMPLEMENTATION", "triton")

__all__ = [
    "E2E_PROFILE_GROUP",
    "GROUPS",
    "GROUPS_BY_NAME",
    "SCALES",
    "CaseBuilder",
    "Measurement",
    "Results",
    "Unavailable",
    "alternated_baselines",
    "bench_scale",
    "case_params",
    "copy_bandwidth_gbps",
    "copy_bytes_for",
    "device_timer",
    "e2e_summary",
    "environment_lines",
    "group_tables",
    "mb_text",
    "measure_case",
    "ms_text",
    "profile_e2e",
    "skipped",
    "summary_table",
    "synced",
    "thp_status",
    "threading_line",
    "time_alternating",
    "usable_cores",
]
