"""Bad input gets a clear exception that names the argument and what was expected."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

import rnl_fast
from rnl_fast import _C, ops


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        pytest.param(torch.ones(4, 3, dtype=torch.int64), {}, TypeError, "x must be float32", id="int-x"),
        pytest.param(torch.ones(4, 3, dtype=torch.bool), {}, TypeError, "x must be float32", id="bool-x"),
        pytest.param([1.0, 2.0], {}, TypeError, "x must be a torch.Tensor", id="list-x"),
        pytest.param(torch.tensor(1.0), {}, ValueError, "0-dim", id="0-dim-x"),
        pytest.param(torch.ones(0, 3), {}, ValueError, "T = 0", id="T0"),
        pytest.param(torch.ones(4, 0), {}, ValueError, "at least one neuron", id="no-neurons"),
        pytest.param(torch.ones(4, 3), dict(v_th=0.0), ValueError, "v_th must be positive", id="v_th-0"),
        pytest.param(torch.ones(4, 3), dict(v_th=-1.0), ValueError, "v_th must be positive", id="v_th-neg"),
        pytest.param(torch.ones(4, 3), dict(v_th=math.nan), ValueError, "v_th must be positive", id="v_th-nan"),
        pytest.param(torch.ones(4, 3), dict(v_th=math.inf), ValueError, "v_th must be positive", id="v_th-inf"),
        pytest.param(
            torch.ones(4, 3),
            dict(v_th=torch.tensor([1.0, -1.0, 1.0])),
            ValueError,
            "v_th must be positive",
            id="v_th-tensor-neg",
        ),
        pytest.param(torch.ones(4, 3), dict(v_th=torch.ones(2)), ValueError, "does not broadcast", id="v_th-shape"),
        pytest.param(torch.ones(4, 3), dict(v_init=torch.ones(5, 3)), ValueError, "v_init of shape", id="v_init-shape"),
        pytest.param(torch.ones(4, 3), dict(v_init=math.nan), ValueError, "v_init must be finite", id="v_init-nan"),
        pytest.param(torch.ones(4, 3), dict(spike_dtype=torch.int32), ValueError, "spike_dtype", id="spike-dtype"),
        pytest.param(torch.ones(4, 3), dict(surrogate="erf"), ValueError, "surrogate must be one of", id="surrogate"),
        pytest.param(torch.ones(4, 3), dict(width=0.0), ValueError, "width", id="width"),
        pytest.param(torch.ones(4, 3), dict(v_reset=math.inf), ValueError, "v_reset", id="v_reset-inf"),
    ],
)
def test_if_sequence_bad_input(backend, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.if_sequence(x, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_if_sequence_devices_differ():
    with pytest.raises(ValueError, match="v_th is on"):
        ops.if_sequence(torch.ones(3, 2, device="cuda"), v_th=torch.ones(2))


def test_devices_differ_on_meta():
    """Device mismatch is caught before any kernel runs (meta stands in for a second device)."""
    with pytest.raises(ValueError, match="v_th is on meta but x is on cpu"):
        ops.if_sequence(torch.ones(3, 2), v_th=torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match="raw_p is on meta"):
        ops.rate_norm(torch.ones(3), torch.tensor(1.0, device="meta"), torch.tensor(1.0))


@pytest.mark.parametrize(
    "args, error, match",
    [
        pytest.param(
            (torch.ones(3, dtype=torch.int32), torch.tensor(1.0), torch.tensor(1.0)),
            TypeError,
            "x must be float32",
            id="int-x",
        ),
        pytest.param(
            (torch.ones(0), torch.tensor(1.0), torch.tensor(1.0)), ValueError, "at least one element", id="empty"
        ),
        pytest.param((torch.ones(3), torch.ones(2), torch.tensor(1.0)), ValueError, "raw_p must be", id="raw-p-shape"),
        pytest.param(
            (torch.ones(3), torch.tensor(1.0), torch.tensor(1)), ValueError, "running_max must be", id="running-max-int"
        ),
    ],
)
def test_rate_norm_bad_input(backend, args, error, match):
    with pytest.raises(error, match=match):
        ops.rate_norm(*args)


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5, math.nan])
def test_momentum_out_of_range(momentum):
    with pytest.raises(ValueError, match="momentum must be in"):
        rnl_fast.RateNorm(momentum=momentum)
    with pytest.raises(ValueError, match="momentum must be in"):
        ops.rate_norm(torch.ones(3), torch.tensor(1.0), torch.tensor(1.0), momentum=momentum)


@pytest.mark.parametrize("p_init", [0.0, -0.5, 1.01, math.nan])
def test_p_init_out_of_range(p_init):
    with pytest.raises(ValueError, match="p_init must be in"):
        rnl_fast.RateNorm(p_init=p_init)


def test_module_threshold_checked_at_construction():
    with pytest.raises(ValueError, match="v_threshold must be positive"):
        rnl_fast.IFSequence(v_threshold=-1.0)
    with pytest.raises(ValueError, match="surrogate must be one of"):
        rnl_fast.IFSequence(surrogate="nope")


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("RNL_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="RNL_FAST_BACKEND must be one of"):
        ops.if_sequence(torch.ones(2, 2))


def test_cpp_entry_points_check_sizes_before_touching_memory():
    """Lies about buffer sizes are refused by the C++ layer itself (no crash, no overrun)."""
    x, out = torch.ones(4, 8), torch.empty(4, 8)
    small = torch.empty(3)
    th, v0 = torch.tensor(1.0), torch.tensor(0.0)
    vf, sc, nc = torch.empty(8), torch.empty(4, dtype=torch.int64), torch.empty(8, dtype=torch.int32)

    def call(T=4, N=8, x_len=32, stride=8, spikes_len=32, th_len=1, sc_len=4):
        _C.if_forward(
            x=x.data_ptr(),
            x_len=x_len,
            dtype=_C.DType.float32,
            T=T,
            N=N,
            t_stride=stride,
            v_th=th.data_ptr(),
            v_th_len=th_len,
            v_init=v0.data_ptr(),
            v_init_len=1,
            v_reset=0.0,
            reset=_C.Reset.soft,
            spikes=out.data_ptr(),
            spikes_len=spikes_len,
            spike_dtype=_C.DType.float32,
            v_final=vf.data_ptr(),
            v_final_len=8,
            step_counts=sc.data_ptr(),
            step_counts_len=sc_len,
            neuron_counts=nc.data_ptr(),
            neuron_counts_len=8,
            num_threads=1,
        )

    call()  # the honest call works
    for bad, match in [
        (dict(x_len=31), "x holds 31 elements"),
        (dict(spikes_len=31), "spikes must hold"),
        (dict(T=0), "T must be >= 1"),
        (dict(stride=3), "time stride"),
        (dict(th_len=5), "v_th must hold 1 or N"),
        (dict(sc_len=3), "step_counts"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(**bad)
    with pytest.raises(ValueError, match="r must hold"):
        _C.rate_norm_forward(
            x=x.data_ptr(),
            x_len=32,
            dtype=_C.DType.float32,
            raw_p=1.0,
            running_max=1.0,
            momentum=0.1,
            training=False,
            theta_eps=1e-6,
            levels=0,
            r=small.data_ptr(),
            r_len=3,
            num_threads=1,
        )
    rm, rm_out = torch.ones(8), torch.empty(8)

    def channel_call(channels=8, inner=1, rm_len=8, rm_out_len=8, levels=0):
        _C.rate_norm_channel_forward(
            x=x.data_ptr(),
            x_len=32,
            dtype=_C.DType.float32,
            channels=channels,
            inner=inner,
            raw_p=1.0,
            running_max=rm.data_ptr(),
            running_max_len=rm_len,
            momentum=0.1,
            training=True,
            theta_eps=1e-6,
            levels=levels,
            r=out.data_ptr(),
            r_len=32,
            running_max_out=rm_out.data_ptr(),
            running_max_out_len=rm_out_len,
            num_threads=1,
        )

    channel_call()
    for bad, match in [
        (dict(channels=5), "multiple of channels"),
        (dict(inner=3), "multiple of channels"),
        (dict(rm_len=4), "running_max must hold"),
        (dict(rm_out_len=9), "running_max_out must hold"),
        (dict(levels=-1), "levels must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            channel_call(**bad)


@pytest.mark.parametrize("levels", [True, 0, -2, 2.0, 4.5, "8", 2**24 + 1])
def test_levels_not_a_positive_int(levels):
    x, raw_p, running_max = torch.ones(4, 3), torch.tensor(1.0), torch.tensor(1.0)
    with pytest.raises(ValueError, match="^levels must be None or a positive int") as info:
        ops.rate_norm(x, raw_p, running_max, levels=levels)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="^levels must be"):
        rnl_fast.RateNorm(levels=levels)


@pytest.mark.parametrize("channel_wise", [1, 0, "yes", None])
def test_channel_wise_not_a_bool(channel_wise):
    with pytest.raises(ValueError, match="^channel_wise must be a bool"):
        ops.rate_norm(torch.ones(4, 3), torch.tensor(1.0), torch.ones(3), channel_wise=channel_wise)
    with pytest.raises(ValueError, match="^channel_wise must be a bool"):
        rnl_fast.RateNorm(channel_wise=channel_wise)


def test_channel_wise_needs_a_channel_dim(backend):
    with pytest.raises(ValueError, match="^channel_wise=True needs x with a channel dim"):
        ops.rate_norm(torch.ones(5), torch.tensor(1.0), torch.ones(1), channel_wise=True)
    with pytest.raises(ValueError, match="^channel_wise=True needs x with a channel dim"):
        rnl_fast.RateNorm(channel_wise=True)(torch.ones(5))


def test_channel_wise_running_max_must_match_channels(backend):
    x = torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match="running_max holds 4 channels but x has 3"):
        ops.rate_norm(x, torch.tensor(1.0), torch.ones(4), channel_wise=True)
    with pytest.raises(ValueError, match="running_max must be a floating \\[C\\] tensor"):
        ops.rate_norm(x, torch.tensor(1.0), torch.ones(3, 1), channel_wise=True)
    with pytest.raises(ValueError, match="running_max must be a floating"):
        ops.rate_norm(x, torch.tensor(1.0), torch.ones(3, dtype=torch.int64), channel_wise=True)
    with pytest.raises(ValueError, match="num_channels must be"):
        rnl_fast.RateNorm(num_channels=3)


def _run_python(code: str, cwd) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh Python without RNL_FAST_BACKEND and TRITON_INTERPRET; cwd away from
    the source tree (``python -c`` puts the cwd first on sys.path). Asserts that it exits cleanly."""
    env = {k: v for k, v in os.environ.items() if k not in ("RNL_FAST_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out


def test_import_and_cpu_path_without_triton(tmp_path):
    """triton is optional: rnl_fast imports and runs on CPU without it, and asking for the
    Triton backend then says what to install."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import os, torch, rnl_fast\n"
        "assert rnl_fast.if_sequence(torch.rand(4, 3)).spikes.shape == (4, 3)\n"
        "os.environ['RNL_FAST_BACKEND'] = 'triton'\n"
        "try:\n    rnl_fast.if_sequence(torch.rand(4, 3))\nexcept RuntimeError as e:\n    print(e)\n"
    )
    out = _run_python(code, tmp_path)
    assert "needs triton" in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_backend_on_cpu_needs_the_interpreter(tmp_path):
    """Without TRITON_INTERPRET=1 the Triton kernels cannot run on CPU tensors: asking for them says
    how to switch the interpreter on, and the library does not switch it on by itself."""
    code = (
        "import os, torch, rnl_fast\n"
        "os.environ['RNL_FAST_BACKEND'] = 'triton'\n"
        "try:\n    rnl_fast.if_sequence(torch.rand(4, 3))\nexcept RuntimeError as e:\n    print(e)\n"
        "print('TRITON_INTERPRET' in os.environ)\n"
    )
    out = _run_python(code, tmp_path)
    message, interpret_set = out.stdout.strip().splitlines()
    assert "set TRITON_INTERPRET=1 in the environment before the process imports triton" in message
    assert interpret_set == "False"


def test_missing_extension_says_what_to_do(monkeypatch):
    """A source tree imported without its built extension (python started in the repository root):
    the first op says what happened and how to install, instead of "cannot import name '_C'"."""
    monkeypatch.delattr(rnl_fast, "_C")
    monkeypatch.setitem(sys.modules, "rnl_fast._C", None)  # import rnl_fast._C now fails
    monkeypatch.setenv("RNL_FAST_BACKEND", "cpp")
    with pytest.raises(ImportError) as info:
        ops.if_sequence(torch.ones(2, 3))
    message = str(info.value)
    assert message.startswith("rnl_fast's C++ kernels (rnl_fast._C) are not built in ")
    assert "pip install ." in message and "pip install -e . --no-build-isolation" in message
