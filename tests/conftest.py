"""Shared test fixtures: the backends to compare, and the Triton interpreter on CPU machines."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors; the variable must
# be set before triton compiles (decorates) any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The shared comparisons (_compare.py) are imported by name: --import-mode=importlib leaves
# sys.path alone, so this folder goes on it here, before any test module is imported.
sys.path.insert(0, str(Path(__file__).parent))

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = [
    pytest.param("cpp", id="cpp"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")),
    pytest.param("torch", id="torch"),
]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch) -> str:
    """Each CPU-runnable backend in turn, selected through RNL_FAST_BACKEND."""
    monkeypatch.setenv("RNL_FAST_BACKEND", request.param)
    return request.param


# Inputs are drawn fresh each run (a fast path must be right on any valid input); the seed is
# printed in the header, and RNL_FAST_TEST_SEED=<seed> replays a failing run.
SEED = int(os.environ.get("RNL_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config) -> str:
    return f"rnl_fast test seed: {SEED} (replay with RNL_FAST_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seed(request) -> None:
    torch.manual_seed(SEED + sum(map(ord, request.node.nodeid)))


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """A context manager: inside it, ``torch.empty``/``empty_like`` return tensors filled with NaN
    (floats) or 77 (integers), so that an output element the kernel forgot to write shows."""
    import contextlib

    real = {"empty": torch.empty, "empty_like": torch.empty_like}

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else 77)

    @contextlib.contextmanager
    def poisoned():
        for name, fn in real.items():
            monkeypatch.setattr(torch, name, lambda *a, _fn=fn, **k: poison(_fn(*a, **k)))
        try:
            yield
        finally:
            for name, fn in real.items():
                monkeypatch.setattr(torch, name, fn)

    return poisoned


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT handled as Python does in a terminal (KeyboardInterrupt), here and in the children
    this test starts, restored afterwards. A shell starts a background job (``.ci/test &``) with
    SIGINT ignored, and Python then keeps it ignored: a Ctrl-C test would see nothing arrive.
    Yields the ``preexec_fn`` that gives a child process the default action back."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGINT, previous)
