"""Huge pages for the kernels' large CPU outputs (rnl_fast/ops/_pages.py): which bytes are advised,
that the ops' outputs end up on huge pages where Linux offers them on request, and the switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnl_fast import ops
from rnl_fast.ops import _pages
from rnl_fast.ops._pages import HUGE_PAGE, MIN_BYTES, advise_huge_pages, aligned_interior

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")


def _thp_mode() -> str | None:
    """The bracketed choice of ``enabled`` (``always``, ``madvise``, ``never``), None without THP."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def _mappings(t: torch.Tensor) -> list[dict[str, str]]:
    """The /proc/self/smaps entries of the mappings that hold the 2 MiB-aligned interior of ``t``'s
    bytes (madvise splits a mapping: the advised interior becomes a mapping of its own)."""
    lo, hi = aligned_interior(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    assert hi > lo, "the tensor holds no whole huge page"
    found: list[dict[str, str]] = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            entry: dict[str, str] | None = {} if start < hi and lo < end else None
            if entry is not None:
                found.append(entry)
        elif entry is not None:
            entry[head.rstrip(":")] = rest.strip()
    assert found, f"no mapping of this process holds {lo:#x}"
    return found


@pytest.mark.parametrize(
    ("start", "nbytes", "expected"),
    [
        pytest.param(0, 2 * HUGE_PAGE, (0, 2 * HUGE_PAGE), id="aligned-both-ends"),
        pytest.param(1, 2 * HUGE_PAGE, (HUGE_PAGE, 2 * HUGE_PAGE), id="one-byte-past-a-boundary"),
        pytest.param(HUGE_PAGE - 1, HUGE_PAGE + 1, (HUGE_PAGE, 2 * HUGE_PAGE), id="from-one-byte-before"),
        pytest.param(HUGE_PAGE - 1, HUGE_PAGE, (HUGE_PAGE, HUGE_PAGE), id="one-byte-short-of-a-page"),
        pytest.param(16, HUGE_PAGE, (HUGE_PAGE, 0), id="less-than-a-page-inside"),
        pytest.param(3 * HUGE_PAGE + 64, 5 * HUGE_PAGE, (4 * HUGE_PAGE, 8 * HUGE_PAGE), id="interior-only"),
    ],
)
def test_aligned_interior(start, nbytes, expected):
    lo, hi = aligned_interior(start, nbytes)
    if expected[1] <= expected[0]:
        assert hi <= lo  # nothing to advise
    else:
        assert (lo, hi) == expected
    assert lo % HUGE_PAGE == 0 and hi % HUGE_PAGE == 0


@linux_only
def test_advice_only_for_large_cpu_outputs():
    assert advise_huge_pages(torch.empty(MIN_BYTES // 4, dtype=torch.float32))  # exactly the smallest
    assert not advise_huge_pages(torch.empty(MIN_BYTES // 4 - 1, dtype=torch.float32))
    assert not advise_huge_pages(torch.empty(0))


def test_switch(monkeypatch):
    monkeypatch.setenv("RNL_FAST_HUGE_PAGES", "0")
    assert not _pages.huge_pages_wanted()
    assert not advise_huge_pages(torch.empty(MIN_BYTES))
    monkeypatch.setenv("RNL_FAST_HUGE_PAGES", "1")
    assert _pages.huge_pages_wanted()
    monkeypatch.setenv("RNL_FAST_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match=r"RNL_FAST_HUGE_PAGES must be one of \('0', '1'\), got 'yes'"):
        ops.if_sequence(torch.rand(4, 3), v_th=1.0)  # a bad value fails every op, not only large ones
    with pytest.raises(ValueError, match="RNL_FAST_HUGE_PAGES"):
        advise_huge_pages(torch.empty(MIN_BYTES))


# 8 × 1M fp32 neurons: 32 MiB, whose interior holds 15 or 16 huge pages.
T_BIG, N_BIG = 8, 1 << 20


FRESH_PROCESS = f"""
import ctypes, json, os, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import rnl_fast
from rnl_fast import ops
from test_huge_pages import _mappings
# A fixed mmap threshold of 1 MiB: every output below is a fresh mapping, never reused heap.
assert ctypes.CDLL(None).mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD
x = torch.rand({T_BIG}, {N_BIG}) * 0.7
outs = {{}}
outs["if_sequence"] = ops.if_sequence(x, v_th=1.0).spikes
outs["rate_norm"] = rnl_fast.RateNorm()(x)
outs["qcfs"] = rnl_fast.QCFS(levels=8)(x)
outs["if_pool"] = rnl_fast.if_sequence_pool2x2(x.view({T_BIG}, 4, 4, 256, 256), v_th=1.0)[0]
for name, layer in (("if", lambda x: ops.if_sequence(x, v_th=1.0).spikes), ("rate_norm", rnl_fast.RateNorm()),
                    ("qcfs", rnl_fast.QCFS(levels=8))):
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    outs[name + "_backward"] = xg.grad  # the backward op's grad_x itself: the first gradient is not copied
os.environ["RNL_FAST_HUGE_PAGES"] = "0"
outs["switched_off"] = ops.if_sequence(x, v_th=1.0).spikes
report = {{}}
for name, out in outs.items():
    maps = _mappings(out)
    report[name] = (all("hg" in m["VmFlags"].split() for m in maps),
                    sum(int(m["AnonHugePages"].split()[0]) for m in maps))
print(json.dumps(report))
"""


@linux_only
@pytest.mark.skipif(_thp_mode() is None, reason="this kernel has no transparent huge pages")
@pytest.mark.skipif(os.environ.get("THP_MEM_ALLOC_ENABLE") == "1", reason="torch asks for huge pages itself")
def test_fresh_outputs_land_on_huge_pages(tmp_path):
    """In a fresh process (this one's allocator may hand out heap blocks whose pages are in place,
    advised or not by earlier tests), each op's large output is advised (VmFlags ``hg``) and,
    where the kernel's THP mode allows, backed by huge pages; with the switch off it is neither."""
    env = {k: v for k, v in os.environ.items() if k not in ("RNL_FAST_HUGE_PAGES", "RNL_FAST_BACKEND")}
    done = subprocess.run(  # not from the repository root, where `-c` would import the unbuilt sources
        [sys.executable, "-c", FRESH_PROCESS], env=env, cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    offered = _thp_mode() in ("always", "madvise")
    for op in ("if_sequence", "if_pool", "rate_norm", "qcfs", "if_backward", "rate_norm_backward", "qcfs_backward"):
        advised, huge_kb = report[op]
        assert advised, op
        # Some huge pages at least: the host may be short of free 2 MiB blocks for a few of them.
        assert huge_kb >= HUGE_PAGE // 1024 or not offered, op
    advised, huge_kb = report["switched_off"]
    assert not advised
    if _thp_mode() == "madvise":  # with "always" every fresh mapping gets them anyway
        assert huge_kb == 0
