"""Arguments are strict and checked where they are given: booleans must be bools, numbers must not
be bools and must survive the cast to the compute dtype, and every message is one line that names
the argument and the value (issue 13, "Arguments")."""

from __future__ import annotations

import re
import threading

import pytest
import torch
from torch import nn

import rnl_fast
from rnl_fast import ops

X = torch.ones(4, 3)


def _rate_norm(**kwargs):
    return ops.rate_norm(X, torch.tensor(0.0), torch.tensor(1.0), **kwargs)


def _one_line_naming(info: pytest.ExceptionInfo, name: str, value: object) -> None:
    message = str(info.value)
    assert "\n" not in message, message
    assert re.match(rf"^{re.escape(name)} must be", message), message
    assert repr(value) in message or str(value) in message, message


@pytest.mark.parametrize(
    "call, name, value",
    [
        pytest.param(
            lambda v: ops.if_sequence_pool2x2(torch.ones(2, 1, 3, 3), ceil_mode=v), "ceil_mode", "no", id="ceil_mode"
        ),
        pytest.param(
            lambda v: ops.if_sequence_pool2x2(torch.ones(2, 1, 4, 4), count_neurons=v),
            "count_neurons",
            "no",
            id="pool-count_neurons",
        ),
        pytest.param(lambda v: _rate_norm(training=v), "training", "no", id="training"),
        pytest.param(lambda v: ops.if_sequence(X, detach_reset=v), "detach_reset", None, id="detach_reset-None"),
        pytest.param(lambda v: ops.if_sequence(X, detach_reset=v), "detach_reset", 2, id="detach_reset-2"),
        pytest.param(lambda v: ops.if_sequence(X, count_neurons=v), "count_neurons", "no", id="count_neurons"),
        pytest.param(lambda v: rnl_fast.IFSequence(detach_reset=v), "detach_reset", 1, id="module-detach_reset"),
        pytest.param(lambda v: rnl_fast.IFSequence(count_neurons=v), "count_neurons", "no", id="module-count"),
    ],
)
def test_options_must_be_bools(backend, call, name, value):
    with pytest.raises(ValueError) as info:
        call(value)
    _one_line_naming(info, name, value)


@pytest.mark.parametrize(
    "call, name, error",
    [
        pytest.param(lambda v: ops.if_sequence(X, v_reset=v), "v_reset", ValueError, id="v_reset"),
        pytest.param(lambda v: ops.if_sequence(X, width=v), "width", ValueError, id="width"),
        pytest.param(lambda v: ops.if_sequence(X, v_th=v), "v_th", TypeError, id="v_th"),
        pytest.param(lambda v: ops.if_sequence(X, v_init=v), "v_init", TypeError, id="v_init"),
        pytest.param(
            lambda v: ops.if_sequence_pool2x2(torch.ones(2, 1, 4, 4), scale=v), "scale", ValueError, id="scale"
        ),
        pytest.param(lambda v: _rate_norm(momentum=v), "momentum", ValueError, id="momentum"),
        pytest.param(lambda v: rnl_fast.RateNorm(momentum=v), "momentum", ValueError, id="module-momentum"),
        pytest.param(lambda v: rnl_fast.RateNorm(p_init=v), "p_init", ValueError, id="p_init"),
        pytest.param(lambda v: rnl_fast.IFSequence(v_threshold=v), "v_threshold", ValueError, id="v_threshold"),
        pytest.param(lambda v: rnl_fast.QCFS(threshold_init=v), "threshold_init", ValueError, id="threshold_init"),
    ],
)
def test_numbers_must_not_be_bools(backend, call, name, error):
    with pytest.raises(error) as info:
        call(True)
    _one_line_naming(info, name, True)


@pytest.mark.parametrize(
    "kwargs, name, value",
    [
        pytest.param(dict(v_th=1e-50), "v_th", 1e-50, id="v_th-to-zero"),
        pytest.param(dict(v_th=1e-40), "v_th", 1e-40, id="v_th-subnormal"),
        pytest.param(dict(v_th=1e300), "v_th", 1e300, id="v_th-to-inf"),
        pytest.param(dict(v_th=torch.tensor([1.0, 1e-50, 1.0], dtype=torch.float64)), "v_th", 0.0, id="v_th-tensor"),
        pytest.param(dict(v_th=torch.tensor(1e300, dtype=torch.float64)), "v_th", "inf", id="v_th-tensor-inf"),
        pytest.param(dict(width=1e-300), "width", 1e-300, id="width-to-zero"),
        pytest.param(dict(width=1e300), "width", 1e300, id="width-to-inf"),
        pytest.param(dict(v_reset=1e300), "v_reset", 1e300, id="v_reset-to-inf"),
        pytest.param(dict(v_init=-1e300), "v_init", -1e300, id="v_init-to-inf"),
    ],
)
def test_values_that_do_not_survive_float32_are_rejected(backend, kwargs, name, value):
    with pytest.raises(ValueError) as info:
        ops.if_sequence(X, **kwargs)
    _one_line_naming(info, name, value)
    assert "float32" in str(info.value)


def test_values_that_survive_float64_are_accepted(backend):
    """The compute dtype of a float64 input is float64: 1e-50 is an ordinary threshold there."""
    x = torch.full((3, 2), 2e-50, dtype=torch.float64)
    spikes = ops.if_sequence(x, v_th=1e-50, width=1e-50).spikes
    assert spikes.tolist() == [[1.0, 1.0]] * 3


def test_width_that_does_not_survive_float32_gives_no_nan_gradient_anymore():
    """The case of the issue: width 1e-300 gave NaN gradients; it is refused before any kernel."""
    x = torch.rand(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"^width must be positive and finite in float32"):
        ops.if_sequence(x, width=1e-300).spikes.sum().backward()


@pytest.mark.parametrize(
    "kwargs, name, error",
    [
        pytest.param(dict(width=0.0), "width", ValueError, id="width-0"),
        pytest.param(dict(width=1e-300), "width", ValueError, id="width-tiny"),
        pytest.param(dict(width="1"), "width", ValueError, id="width-str"),
        pytest.param(dict(v_reset=float("nan")), "v_reset", ValueError, id="v_reset-nan"),
        pytest.param(dict(v_reset="0"), "v_reset", ValueError, id="v_reset-str"),
        pytest.param(dict(v_init=float("inf")), "v_init", ValueError, id="v_init-inf"),
        pytest.param(dict(v_init="0"), "v_init", ValueError, id="v_init-str"),
        pytest.param(dict(v_threshold=1e-50), "v_threshold", ValueError, id="v_threshold-tiny"),
        pytest.param(dict(spike_dtype=torch.int32), "spike_dtype", ValueError, id="spike_dtype"),
        pytest.param(dict(surrogate="erf"), "surrogate", ValueError, id="surrogate"),
    ],
)
def test_if_sequence_module_checks_at_construction(kwargs, name, error):
    with pytest.raises(error, match=rf"^{name} must be"):
        rnl_fast.IFSequence(**kwargs)


def test_if_sequence_module_still_checks_at_forward():
    """An attribute set after construction is checked by the op at the next call."""
    neurons = rnl_fast.IFSequence()
    neurons.width = True
    with pytest.raises(ValueError, match="^width must be"):
        neurons(X)


@pytest.mark.parametrize(
    "raw_p, running_max, match",
    [
        pytest.param(float("nan"), 1.0, r"^raw_p must be finite, got nan$", id="raw_p-nan"),
        pytest.param(0.0, -1.0, r"^running_max must be >= 0 .*got -1\.0$", id="negative-max"),
        pytest.param(0.0, float("nan"), r"^running_max must be >= 0 .*got nan$", id="nan-max"),
    ],
)
@pytest.mark.parametrize("channel_wise", [False, True])
def test_rate_norm_scalars_named_on_cpu(raw_p, running_max, match, channel_wise):
    """The C++ kernels need θ > 0; the values that break it are named (not "rnl_fast._C: theta")."""
    x = torch.rand(2, 3, 4)
    rm = torch.full((3,) if channel_wise else (), running_max)
    for training in (False, True):
        with pytest.raises(ValueError, match=match):
            ops.rate_norm(x, torch.tensor(raw_p), rm, training=training, channel_wise=channel_wise)


def test_sparse_x_is_named(backend):
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(TypeError, match=r"^x must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        ops.if_sequence(sparse)
    with pytest.raises(TypeError, match=r"^x must be a dense"):
        ops.rate_norm(sparse, torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"^x must be a dense"):
        ops.qcfs(sparse, torch.tensor(1.0), 4)


def _tiny_rnl_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), rnl_fast.RateNorm(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def test_convert_names_a_model_that_is_not_a_module():
    with pytest.raises(TypeError, match=r"^model must be an nn.Module .*got str 'net'$"):
        rnl_fast.convert("net", "rnl")


def test_snn_with_the_wrong_input_names_it_in_one_line(capfd):
    snn = rnl_fast.convert(_tiny_rnl_model(), "rnl")
    with pytest.raises(ValueError) as info:
        snn(torch.rand(2, 3, 6, 6), T=2)
    message = str(info.value)
    assert message.startswith("x of shape [B, 3, 6, 6] does not fit the network: node ")
    assert "\n" not in message
    assert capfd.readouterr().err == ""  # no traceback printed on the side


def test_simulate_names_a_missing_loader():
    snn = rnl_fast.convert(_tiny_rnl_model(), "rnl")
    with pytest.raises(TypeError, match=r"^loader must be an iterable of \(x, y\) batches, got NoneType None$"):
        rnl_fast.simulate(snn, None, T=4)
    with pytest.raises(TypeError, match=r"^snn must be a SpikingNetwork"):
        rnl_fast.simulate(_tiny_rnl_model(), [], T=4)


@pytest.mark.parametrize("tracing", ["convert", "training readouts"])
def test_tracing_leaves_module_calls_in_other_threads_alone(tracing):
    """torch.fx patches nn.Module.__call__ process-wide while it traces: plain forwards of an
    unrelated module in another thread must still return tensors (they got fx Proxies, or
    failed, during conversions) and the traced graphs must not record them. Both places that
    trace: convert(), and the training's search for the readout layers (rate_readouts)."""
    from rnl_fast.train._layers import rate_readouts

    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.rand(3, 4)
    expected = plain(x)
    stop = threading.Event()
    failures: list[str] = []
    calls = 0

    def infer() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                y = plain(x)
                if not (isinstance(y, torch.Tensor) and torch.equal(y, expected)):
                    failures.append(type(y).__name__)
            except Exception as error:  # noqa: BLE001 - any failure of the other thread counts
                failures.append(repr(error))
            calls += 1

    model = _tiny_rnl_model().eval()

    def traced() -> str:
        if tracing == "convert":
            return str(rnl_fast.convert(model, "rnl").graph_module.graph)
        return repr(rate_readouts(model))

    alone = traced()
    thread = threading.Thread(target=infer)
    thread.start()
    try:
        for _ in range(20):
            assert traced() == alone  # nothing from the thread
    finally:
        stop.set()
        thread.join()
    assert calls > 0
    assert failures == [], f"{len(failures)} of {calls} forwards failed, e.g. {failures[:3]}"


class _Rendezvous(nn.Module):
    """A convertible network whose forward, run once while it is traced, calls ``during_trace``."""

    def __init__(self, during_trace) -> None:
        super().__init__()
        self.body = _tiny_rnl_model()
        self.during_trace = during_trace

    def forward(self, x):
        self.during_trace()
        return self.body(x)


def test_overlapping_conversions_leave_nn_module_unpatched():
    """Two conversions in two threads, the second starting while the first traces and ending after
    it: without one trace at a time, the first restores nn.Module.__call__ and the second then puts
    the first's patch back for good (the patchers restore what each found)."""
    original = nn.Module.__call__
    second_tracing, first_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        def hold():
            second_tracing.set()
            first_done.wait(5)

        try:
            rnl_fast.convert(_Rendezvous(hold).eval(), "rnl")
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    thread = threading.Thread(target=second)
    rnl_fast.convert(_Rendezvous(lambda: (thread.start(), second_tracing.wait(2))).eval(), "rnl")
    first_done.set()
    thread.join()
    assert errors == []
    assert nn.Module.__call__ is original
