"""The Triton kernels compiled for a real GPU, against the reference and SpikingJelly.

Marked ``gpu``: skipped without CUDA; ``bench/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import rnl_fast
from rnl_fast import ops, reference
from rnl_fast.numerics import SURROGATES
from rnl_fast.ops import IFResult, RateNormResult

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("RNL_FAST_BACKEND", raising=False)  # CUDA tensors → Triton


@pytest.mark.parametrize(
    "T, neurons, v_reset, spike_dtype",
    [
        pytest.param(1, (37,), None, None, id="T1-N37-soft"),
        pytest.param(32, (128, 1000), None, None, id="T32-N128k-soft"),
        pytest.param(64, (3, 5, 7), 0.0, None, id="T64-odd-hard"),
        pytest.param(1000, (513,), None, torch.uint8, id="T1000-N513-uint8"),
        pytest.param(16, (4096,), None, torch.bool, id="T16-N4096-bool"),
    ],
)
def test_if_forward_matches_reference_spike_for_spike(T, neurons, v_reset, spike_dtype):
    x = torch.randn(T, *neurons, device="cuda") * 0.8 + 0.3
    v_th = torch.rand(neurons[-1], device="cuda") + 0.4
    fast = ops.if_sequence(x, v_th=v_th, v_init=0.1, v_reset=v_reset, spike_dtype=spike_dtype)
    ref = IFResult(*reference.if_sequence(x, v_th=v_th, v_init=0.1, v_reset=v_reset, spike_dtype=spike_dtype))
    assert torch.equal(fast.spikes, ref.spikes)
    torch.testing.assert_close(fast.v, ref.v, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.step_counts, ref.step_counts)
    assert torch.equal(fast.neuron_counts, ref.neuron_counts)


def test_if_constant_input_and_bf16():
    current = torch.rand(64, 300, device="cuda")
    fast = ops.if_sequence(current.expand(50, 64, 300), v_th=0.7)
    ref = reference.if_sequence(current.expand(50, 64, 300).contiguous(), v_th=0.7)
    assert torch.equal(fast.spikes, ref[0])
    xb = torch.randn(20, 1000, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(ops.if_sequence(xb).spikes.float(), reference.if_sequence(xb.float())[0])


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_if_pool_matches_reference(ceil_mode, dtype):
    current = (torch.randn(16, 32, 15, 15, device="cuda") * 0.6 + 0.3).to(dtype)
    x = current.expand(24, *current.shape)  # constant coding, as the simulator's first layer
    v_th = torch.rand(32, 1, 1, device="cuda") + 0.4
    fast = ops.if_sequence_pool2x2(x, v_th, scale=0.7, ceil_mode=ceil_mode)
    ref = IFResult(*reference.if_sequence_pool2x2(x, v_th.expand(x.shape[1:]), scale=0.7, ceil_mode=ceil_mode))
    assert torch.equal(fast.spikes, ref.spikes)
    torch.testing.assert_close(fast.v, ref.v, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.step_counts, ref.step_counts)
    assert torch.equal(fast.neuron_counts, ref.neuron_counts)


@pytest.mark.parametrize("v_reset", [None, 0.0], ids=["soft", "hard"])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_if_backward_matches_reference(v_reset, surrogate):
    x = (torch.randn(40, 8, 300, device="cuda") * 0.8 + 0.3).requires_grad_()
    w = torch.randn_like(x)
    kwargs = dict(v_th=0.8, v_reset=v_reset, surrogate=surrogate)
    grads = [
        torch.autograd.grad((fn(x, **kwargs)[0] * w).sum(), x)[0] for fn in (ops.if_sequence, reference.if_sequence)
    ]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "T, neurons, dtype, fits",
    [
        pytest.param(32, 2**22, torch.float32, True, id="T32-4M-fp32"),
        pytest.param(8, 2**21, torch.float64, True, id="T8-2M-fp64"),
        pytest.param(200, 2**20, torch.float32, False, id="T200-1M-fp32-full-scratch"),
    ],
)
def test_if_backward_slots_equal_scratch_bit_for_bit(monkeypatch, T, neurons, dtype, fits):
    """RNL_FAST_IF_BWD=slots against the default kernel: at T = 32, 16k blocks of 256 over the
    792 programs an H200's L2 gives (~20 blocks each, each through the same slot). Here programs
    run at once, unlike under the interpreter: a missing barrier between a block's two passes or
    before a slot takes the next block, or two programs' slots that overlap, would show as other
    bits. At T = 200 the slots would not fit L2 and the launcher runs the full-scratch kernel."""
    from rnl_fast.kernels._autotune import device_slot_programs, persistent_block

    block = persistent_block()["BLOCK"]
    slot_bytes = T * block * (8 if dtype == torch.float64 else 4)
    programs = device_slot_programs(-(-neurons // block), slot_bytes, torch.device("cuda"))
    if fits and programs is None:
        pytest.skip(f"this GPU's L2 holds too few {slot_bytes >> 10} KiB slots: slots and scratch would be one kernel")
    assert fits or programs is None
    torch.manual_seed(6)
    x = (torch.randn(T, neurons, device="cuda", dtype=dtype) * 0.8 + 0.3).requires_grad_()
    v_init = (torch.randn(neurons, device="cuda", dtype=dtype) * 0.3).requires_grad_()
    w_s, w_v = torch.randn_like(x), torch.randn_like(v_init)
    grads = {}
    for kernel in ("scratch", "slots"):
        monkeypatch.setenv("RNL_FAST_IF_BWD", kernel)
        out = ops.if_sequence(x, v_th=0.8, v_init=v_init, v_reset=0.0, surrogate="sigmoid")
        grads[kernel] = torch.autograd.grad((out.spikes * w_s).sum() + (out.v * w_v).sum(), [x, v_init])
    for slots, scratch in zip(grads["slots"], grads["scratch"]):
        assert torch.equal(slots, scratch)


def _assert_rate_norm_matches_reference(x, raw_p, running_max, options: tuple, grad_atol: float) -> None:
    """ops.rate_norm against reference.rate_norm with ``options`` after the three tensors: outputs,
    and the gradients of x and raw_p under the loss ``(r*w).sum() + Σr/(Σr² + 1e-5)``."""
    w = torch.randn_like(x)
    outs, grads = [], []
    for fn in (ops.rate_norm, reference.rate_norm):
        out = RateNormResult(*fn(x, raw_p, running_max, *options))
        outs.append(out)
        loss = (out.r * w).sum() + out.sum_r / (out.sum_r2 + 1e-5)
        grads.append(torch.autograd.grad(loss, [x, raw_p]))
    torch.testing.assert_close(outs[0].r, outs[1].r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].running_max, outs[1].running_max)
    torch.testing.assert_close(outs[0].sum_r, outs[1].sum_r, rtol=1e-4, atol=1e-3)
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-3, atol=grad_atol)


@pytest.mark.parametrize("levels", [None, 8])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_rate_norm_matches_reference(training, levels):
    x = (torch.randn(64, 32, 14, 14, device="cuda") * 1.5 + 0.3).requires_grad_()
    raw_p = torch.tensor(1.2, device="cuda", requires_grad=True)
    running_max = torch.tensor(2.0, device="cuda")
    _assert_rate_norm_matches_reference(
        x, raw_p, running_max, (0.1, training, False, levels), grad_atol=1e-5 if levels is None else 1e-4
    )


@pytest.mark.parametrize(
    "layout, dtype, levels",
    [
        pytest.param("nchw", torch.float32, 255, id="nchw-fp32-L255"),
        pytest.param("channels-last", torch.float32, 255, id="channels-last-fp32-L255"),
        pytest.param("nchw", torch.float32, 1, id="nchw-fp32-L1"),
        pytest.param("channels-last", torch.bfloat16, 8, id="channels-last-bf16-L8"),
        pytest.param("nchw", torch.float64, 255, id="nchw-fp64-L255"),
    ],
)
def test_qcfs_matches_reference_bit_for_bit(layout, dtype, levels):
    """y and grad_x equal the reference's on CUDA too (its x/λ, ·L, + ½, floor, /L as torch does a
    CUDA tensor over a Python int: times 1/L), dL/dλ to the summation order; and no host sync.
    L = 255 is where 1/L is not exact; few (dtype, L) pairs, as each one compiles and autotunes
    both kernels anew."""
    x = (torch.randn(64, 32, 14, 14, device="cuda") * 2.5 + 0.8).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels-last" else x
    threshold = torch.tensor(1.37, device="cuda")
    grad_y = torch.randn(x.shape, device="cuda").to(dtype)
    results = []
    for fn in (ops.qcfs, reference.qcfs):
        xg, lam = x.clone().requires_grad_(), threshold.clone().requires_grad_()
        torch.cuda.set_sync_debug_mode("error" if fn is ops.qcfs else "default")
        try:
            y = fn(xg, lam, levels)
            results.append((y, *torch.autograd.grad(y, [xg, lam], grad_y)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    (y, grad_x, grad_lam), (y_ref, grad_x_ref, grad_lam_ref) = results
    assert y.stride() == y_ref.stride()
    assert torch.equal(y, y_ref)
    assert torch.equal(grad_x, grad_x_ref)
    torch.testing.assert_close(grad_lam, grad_lam_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None, reason="spikingjelly not installed")
def test_equals_spikingjelly_on_cuda(monkeypatch):
    # SpikingJelly 2.0's IFNode takes no backend= argument: on CUDA it picks its implementation
    # from SJ_IF_CUDA_IMPLEMENTATION when its ops module is first imported (auto: native CUDA
    # if the wheel was built with it, else Triton). Ask for Triton, the benchmarks' baseline;
    # if another test imported SpikingJelly first, whichever CUDA path it chose must agree too.
    monkeypatch.setenv("SJ_IF_CUDA_IMPLEMENTATION", "triton")
    from spikingjelly.activation_based import neuron

    x = torch.randn(32, 16, 4096, device="cuda") * 0.7 + 0.3
    ours = rnl_fast.IFSequence(v_threshold=1.0)(x)
    sj = neuron.IFNode(v_reset=None, step_mode="m").cuda()
    spikes = sj(x)
    assert spikes.is_cuda
    assert torch.equal(ours, spikes)


def test_simulation_on_gpu_matches_cpu(monkeypatch):
    from rnl_fast import conversion, models

    # cuDNN convolves fp32 in TF32 by default (10-bit mantissa): outputs then differ from the CPU's
    # by ~1e-3 and the tolerance below fails now and then (seen on an H200, 2026-12-04). The
    # question here is whether the simulation computes the same thing, so compare in full fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    torch.manual_seed(0)
    model = models.cnn7("rnl")
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.rand(16, 1, 28, 28))
    model.eval()
    x = torch.rand(8, 1, 28, 28)
    cpu = conversion.convert(model, "rnl")(x, 32)
    gpu = conversion.convert(model.cuda(), "rnl")(x.cuda(), 32)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("levels", [None, 8])
def test_rate_norm_channel_wise_matches_reference(layout, levels):
    x = torch.randn(64, 32, 14, 14, device="cuda") * 1.5 + 0.3
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels-last" else x
    x.requires_grad_()
    raw_p = torch.tensor(1.2, device="cuda", requires_grad=True)
    running_max = torch.rand(32, device="cuda") + 1.0
    _assert_rate_norm_matches_reference(x, raw_p, running_max, (0.1, True, True, levels), grad_atol=1e-4)


@pytest.mark.parametrize("pool", [False, True], ids=["if", "if-pool"])
def test_step_counts_summed_over_many_programs(pool):
    """Each program stores its spike count per step and the wrapper sums them: with thousands of
    programs, a column left from a smaller autotuning block or a missed program would show here."""
    torch.manual_seed(3)
    x = torch.randn(8, 64, 128, 32, 32, device="cuda") * 0.8 + 0.3  # 8M neurons: 32k programs of 256
    if pool:
        fast = ops.if_sequence_pool2x2(x, 0.9, scale=1.0)
        ref = IFResult(*reference.if_sequence_pool2x2(x, torch.full(x.shape[1:], 0.9, device="cuda"), scale=1.0))
    else:
        fast = ops.if_sequence(x, v_th=0.9)
        ref = IFResult(*reference.if_sequence(x, v_th=0.9))
    assert torch.equal(fast.spikes, ref.spikes)
    assert torch.equal(fast.step_counts, ref.step_counts)
    assert fast.step_counts.sum() > 0


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_rate_norm_channel_wise_at_100m_elements(layout):
    """[256, 128, 56, 56]: the size at which the first GPU run's channel-wise max failed to launch."""
    torch.manual_seed(4)
    x = torch.randn(256, 128, 56, 56, device="cuda") * 1.5 + 0.3
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels-last" else x
    raw_p = torch.tensor(1.2, device="cuda")
    running_max = torch.rand(128, device="cuda") + 1.0
    fast = ops.rate_norm(x, raw_p, running_max, 0.1, True, True)
    ref = RateNormResult(*reference.rate_norm(x, raw_p, running_max, 0.1, True, True))
    assert torch.equal(fast.running_max, ref.running_max)
    torch.testing.assert_close(fast.r, ref.r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast.sum_r, ref.sum_r, rtol=1e-5, atol=0)


def test_ops_and_modules_never_synchronise_the_host():
    """A call queues its kernels and returns: no value is read back, no pageable copy waits for
    the queue (a Python float threshold once became a host→device copy that drained it each call)."""
    x = (torch.randn(16, 8, 32, 10, 10, device="cuda") * 0.8 + 0.3).requires_grad_()
    v_th = torch.rand(32, 1, 1, device="cuda") + 0.5
    xr = (torch.randn(8, 32, 10, 10, device="cuda") * 1.5).requires_grad_()
    raw_p = torch.tensor(1.2, device="cuda", requires_grad=True)
    running_max = torch.tensor(2.0, device="cuda")  # made here: torch.tensor(..., device) itself waits
    layer = rnl_fast.RateNorm(num_channels=32, channel_wise=True).cuda()
    neurons = rnl_fast.IFSequence(v_threshold=v_th)
    calls = {
        "if float": lambda: ops.if_sequence(x, v_th=0.8, v_init=0.1).spikes,
        "if tensor": lambda: ops.if_sequence(x, v_th=v_th, v_reset=0.0).spikes,
        "if pool": lambda: ops.if_sequence_pool2x2(x.detach(), v_th, scale=0.5).spikes,  # inference only
        "IFSequence": lambda: neurons(x),
        "rate norm": lambda: ops.rate_norm(xr, raw_p, running_max, 0.1, True).r,
        "RateNorm cw": lambda: layer(xr),
        "qcfs": lambda: ops.qcfs(xr, raw_p, 8),
    }
    for name, call in calls.items():
        call()  # first call: autotuning and compilation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = call()
            if out.requires_grad:
                torch.autograd.grad(out.sum(), [x, xr, raw_p], allow_unused=True)
        except RuntimeError as error:
            raise AssertionError(f"{name}: {error}") from error
        finally:
            torch.cuda.set_sync_debug_mode("default")
