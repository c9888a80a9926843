"""The Triton kernels compile for a real GPU (sm_90), checked without one.

CI runs the kernels under the Triton interpreter, which accepts code that the GPU compiler
rejects; this compiles each kernel in its variants with the real compiler, in a subprocess
started without TRITON_INTERPRET and outside the source tree (the installed package).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAS_NVIDIA_BACKEND = importlib.util.find_spec("triton") is not None and (
    importlib.util.find_spec("triton.backends.nvidia") is not None
)


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton with its NVIDIA backend (ptxas)")
def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    worker = Path(__file__).with_name("sm90_compile_worker.py")
    out = subprocess.run(
        [sys.executable, str(worker)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    compiled = [line for line in out.stdout.splitlines() if "compiled for sm_90" in line]
    assert len(compiled) == 10, out.stdout
