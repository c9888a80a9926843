"""Which backend runs an op, and the two compiled backends as modules.

CUDA tensors run the Triton kernels (``rnl_fast.kernels``), CPU tensors the C++ kernels
(``rnl_fast._C``); ``RNL_FAST_BACKEND=triton|cpp|torch`` overrides the choice on every call, and
an ONNX export traces the reference (``torch``).
Nothing here changes the process: the Triton interpreter, with which the Triton kernels run on CPU
tensors (how CI tests them), is switched on by whoever starts the process, with
``TRITON_INTERPRET=1`` in the environment before triton is imported.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("cpp", "triton", "torch")


def backend_for(x: Tensor) -> str:
    """The backend that runs an op on ``x``: ``RNL_FAST_BACKEND`` if set, else by device; during
    ``torch.onnx.export`` the pure-PyTorch reference, which ONNX can express (our kernels are custom
    ops that ONNX has no form for; the reference is the spec they equal)."""
    if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
        return "torch"
    forced = os.environ.get("RNL_FAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"RNL_FAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if forced == "cpp" and x.device.type != "cpu":
            raise ValueError(f"RNL_FAST_BACKEND=cpp runs on CPU tensors only, got a tensor on {x.device}")
        return forced
    if x.device.type == "cpu":
        return "cpp"
    if x.device.type == "cuda":
        return "triton"
    raise ValueError(f"rnl_fast runs on CPU and CUDA tensors, got a tensor on {x.device}")


def cpp() -> ModuleType:
    """The C++ extension ``rnl_fast._C`` (its entry points take keyword arguments)."""
    try:
        from .. import _C
    except ImportError as error:  # the common first-use mistake: the source tree, never built
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        raise ImportError(
            f"rnl_fast's C++ kernels (rnl_fast._C) are not built in {package}: Python imported rnl_fast from "
            "there, probably a source checkout on the path (e.g. python started in the repository root). "
            "Install the package with `pip install .` and run from another directory, or build it in place for "
            f"development with `pip install -e . --no-build-isolation` (README, Install). ({error})"
        ) from error
    return _C


def cpp_dtype(dtype: torch.dtype):
    """The C++ extension's ``DType`` for a torch dtype, found by name (``torch.float32`` → ``DType.float32``)."""
    return getattr(cpp().DType, str(dtype).removeprefix("torch."))


def cpp_reset(hard_reset: bool):
    """The C++ extension's ``Reset`` (``Reset.hard`` or ``Reset.soft``)."""
    return cpp().Reset.hard if hard_reset else cpp().Reset.soft


def triton(on_cpu: bool) -> ModuleType:
    """The Triton launchers ``rnl_fast.kernels``; for CPU tensors they must have been built for the
    Triton interpreter, which this library does not switch on by itself (a process-wide setting)."""
    try:
        from .. import kernels
    except ImportError as error:
        raise RuntimeError(
            "the Triton backend needs triton (pip install 'triton>=3'); "
            f"CPU tensors can use RNL_FAST_BACKEND=cpp instead ({error})"
        ) from error
    if on_cpu and not kernels.INTERPRETED:
        raise RuntimeError(
            "the Triton kernels run on CPU tensors only under the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before the process imports triton (e.g. TRITON_INTERPRET=1 python script.py), "
            "or leave CPU tensors to the C++ backend (RNL_FAST_BACKEND unset or cpp)"
        )
    return kernels


def threads() -> int:
    """The threads a C++ kernel may use: torch's own setting."""
    return torch.get_num_threads()
