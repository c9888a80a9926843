"""Huge pages for the kernels' large CPU outputs (rnl_fast/ops/_pages.py): which outputs start on a
2 MiB boundary and keep torch.empty's contract, that they end up on huge pages where Linux offers
them on request, and the switch."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnl_fast import _C, ops, reference
from rnl_fast.ops import _pages
from rnl_fast.ops._pages import HUGE_PAGE, MIN_BYTES

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
    """The /proc/self/smaps entries of the mappings that hold the whole huge pages of ``t``'s bytes
    (madvise splits a mapping: the advised range becomes a mapping of its own)."""
    start, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + nbytes) // HUGE_PAGE * HUGE_PAGE
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


def _from_buffer(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory came from a HugePageBuffer (torch.frombuffer: a storage that cannot grow)."""
    return not t.untyped_storage().resizable()


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        pytest.param((MIN_BYTES // 4,), torch.float32, id="exactly-the-smallest"),
        pytest.param((3, MIN_BYTES // 2 + 7), torch.bfloat16, id="odd-tail-bf16"),
        pytest.param((5, 1 << 20), torch.uint8, id="uint8"),
        pytest.param((2, 3, 1 << 20), torch.bool, id="bool"),
        pytest.param((1 << 20,), torch.float64, id="float64"),
    ],
)
def test_large_outputs_start_on_a_huge_page(shape, dtype):
    out = _pages.empty(shape, dtype, torch.device("cpu"))
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
    assert out.data_ptr() % HUGE_PAGE == 0 and _from_buffer(out)
    assert out.untyped_storage().nbytes() == out.numel() * dtype.itemsize  # the exact size, no slack
    assert out.stride() == torch.empty(shape, dtype=dtype).stride()
    assert out._base is None and not out.requires_grad  # a tensor of its own, not a view of a byte tensor


def test_small_outputs_come_from_torch():
    small = _pages.empty((MIN_BYTES // 4 - 1,), torch.float32, torch.device("cpu"))  # one element short
    assert not _from_buffer(small)
    assert _from_buffer(_pages.empty((MIN_BYTES // 4,), torch.float32, torch.device("cpu")))
    assert _pages.empty((0, 7), torch.float32, torch.device("cpu")).shape == (0, 7)


def test_strides_are_kept():
    x = torch.empty(4, 64, 128, 128).to(memory_format=torch.channels_last)  # 16 MiB, channels last
    out = _pages.empty_like(x)
    assert out.stride() == x.stride() and out.is_contiguous(memory_format=torch.channels_last)
    assert out.data_ptr() % HUGE_PAGE == 0 and out.untyped_storage().nbytes() == x.numel() * 4
    with pytest.raises(ValueError, match="not dense"):
        _pages.empty((4, 1 << 20), torch.float32, torch.device("cpu"), stride=(2 << 20, 1))


def test_out_of_memory_says_what_it_tried():
    with pytest.raises(MemoryError, match=r"cannot allocate 4,611,686,018,427,387,904 bytes for a \[2, 1, 2305843"):
        _pages.empty((2, 1, 1 << 61), torch.uint8, torch.device("cpu"))  # 4 EiB: beyond any address space


def test_the_buffer_lives_as_long_as_the_tensor():
    buffer = _C.HugePageBuffer(nbytes=MIN_BYTES, advise=False)
    assert buffer.address % HUGE_PAGE == 0 and buffer.nbytes == MIN_BYTES and not buffer.advised
    alone = sys.getrefcount(buffer)
    t = torch.frombuffer(buffer, dtype=torch.uint8)
    view = t[7:]
    assert sys.getrefcount(buffer) == alone + 1  # the storage holds it
    del t
    gc.collect()
    assert sys.getrefcount(buffer) == alone + 1  # the view's storage still does
    del view
    gc.collect()
    assert sys.getrefcount(buffer) == alone  # the last tensor gave it back


def test_op_outputs_survive_and_equal_the_reference():
    """Large outputs written by the kernels outlive the op's locals: compute, collect, then compare
    with the reference (a buffer freed too early would read back as garbage, or crash)."""
    x = torch.rand(8, 1 << 18) * 1.6 - 0.3  # 8 MiB in: spikes 8 MiB, membrane and counts 1 MiB each
    out = ops.if_sequence(x, v_th=1.0, count_neurons=True)
    xc = (torch.rand(4, 64, 64, 64) * 3 - 1).to(memory_format=torch.channels_last)  # 4 MiB, channels last
    y = ops.qcfs(xc, torch.tensor(1.5), 8)
    gc.collect()
    spikes, v, steps, counts = reference.if_sequence(x, v_th=1.0)
    assert torch.equal(out.spikes, spikes) and torch.equal(out.step_counts, steps)
    assert torch.equal(out.v, v) and torch.equal(out.neuron_counts, counts)
    assert out.spikes.data_ptr() % HUGE_PAGE == 0 and _from_buffer(out.spikes)
    assert not _from_buffer(out.v)  # 1 MiB: below MIN_BYTES, from torch
    assert torch.equal(y, reference.qcfs(xc, torch.tensor(1.5), 8))
    assert y.stride() == xc.stride() and y.data_ptr() % HUGE_PAGE == 0  # the layout kept, on huge pages


def test_backward_outputs_start_on_a_huge_page():
    """The IF backward's two gradients: dL/dx [T, N] and dL/dv_init [N] (4 MiB here)."""
    x = (torch.rand(4, 1 << 20) * 1.2).requires_grad_()
    v_init = torch.zeros(1 << 20, requires_grad=True)
    ops.if_sequence(x, v_th=1.0, v_init=v_init).spikes.sum().backward()
    for grad in (x.grad, v_init.grad):  # the backward op's outputs themselves: the first gradient is not copied
        assert grad.data_ptr() % HUGE_PAGE == 0 and _from_buffer(grad)


def test_a_large_output_cannot_grow_in_place():
    """The one difference from torch.empty, stated in the module's docstring."""
    out = ops.if_sequence(torch.rand(4, 1 << 20), v_th=1.0).spikes
    out.resize_(2, 1 << 20)  # shrinking needs no new memory
    grown = out.clone().resize_(8, 1 << 20)  # a copy can grow
    assert grown.shape == (8, 1 << 20)
    with pytest.raises(RuntimeError, match="not resizable"):
        out.resize_(8, 1 << 20)
    # torch has set the new shape before it found that the storage cannot grow (as for
    # torch.from_numpy's tensors): `out` must not be read any more.
    assert out.untyped_storage().nbytes() == 4 * 4 << 20  # the buffer, as allocated


def test_switch(monkeypatch):
    monkeypatch.setenv("RNL_FAST_HUGE_PAGES", "0")
    assert not _pages.huge_pages_wanted()
    assert not _from_buffer(_pages.empty((MIN_BYTES,), torch.uint8, torch.device("cpu")))
    assert not _from_buffer(ops.if_sequence(torch.rand(4, 1 << 20), v_th=1.0).spikes)
    monkeypatch.setenv("RNL_FAST_HUGE_PAGES", "1")
    assert _pages.huge_pages_wanted()
    assert _from_buffer(ops.if_sequence(torch.rand(4, 1 << 20), v_th=1.0).spikes)
    monkeypatch.setenv("RNL_FAST_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match=r"RNL_FAST_HUGE_PAGES must be one of \('0', '1'\), got 'yes'"):
        ops.if_sequence(torch.rand(4, 3), v_th=1.0)  # a bad value fails every op, not only large ones
    with pytest.raises(ValueError, match="RNL_FAST_HUGE_PAGES"):
        _pages.empty((MIN_BYTES,), torch.uint8, torch.device("cpu"))


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
