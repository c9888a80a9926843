"""The fused ops as torch custom ops: validation, backend choice, fake kernels and autograd.

Dispatch lives here and only here (DESIGN.md §2): CUDA tensors run the Triton kernels
(``rnl_fast.kernels``), CPU tensors the C++ kernels (``rnl_fast._C``); the environment variable
``RNL_FAST_BACKEND=triton|cpp|torch`` overrides the choice on every call. ``triton`` on CPU
tensors runs the Triton kernels under the interpreter (``TRITON_INTERPRET=1``), which is how CI
tests them; ``torch`` runs the pure-PyTorch definitions in :mod:`rnl_fast.reference`.

The kernels are called only inside custom ops, so ``torch.compile`` sees one opaque node per op
and never a graph break. How the inputs are laid out for the kernels (memory order, time-major
``[T, N]``) is in :mod:`rnl_fast.layout`.
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import reference
from .layout import in_order, logical, neuron_order, param_in_order, pool_geometry, pool_out_size, time_major
from .reference import SURROGATES, THETA_EPS, compute_dtype_of

BACKENDS = ("cpp", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Storage codes of csrc/numeric.h (enum DType): keep the two in sync.
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.uint8: 4}


# ─── backend choice ─────────────────────────────────────────────────────────────────────────


def backend_for(x: Tensor) -> str:
    """The backend that runs an op on ``x``: ``RNL_FAST_BACKEND`` if set, else by device."""
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


def _cpp() -> ModuleType:
    from . import _C

    return _C


def _triton(on_cpu: bool) -> ModuleType:
    """The Triton launchers; on CPU tensors they must run under the Triton interpreter."""
    if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        import sys

        if "rnl_fast.kernels" in sys.modules:
            raise RuntimeError(
                "the Triton kernels were compiled for the GPU in this process and cannot run on "
                "CPU tensors: set TRITON_INTERPRET=1 before the first rnl_fast call"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from . import kernels
    except ImportError as error:
        raise RuntimeError(
            "the Triton backend needs triton (pip install 'triton>=3'); "
            f"CPU tensors can use RNL_FAST_BACKEND=cpp instead ({error})"
        ) from error
    return kernels


def _threads() -> int:
    return torch.get_num_threads()


def _code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES[dtype]


# ─── validation (errors name the argument and what was expected) ──────────────────────────────


def _check_float_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}"
            " (convert spikes or counts with .float() first)"
        )
    return x


def _check_positive_finite(name: str, t: Tensor) -> None:
    """Positive, finite values; skipped while torch.compile traces the graph."""
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(t) | (t <= 0)
    if bool(bad.any()):
        raise ValueError(f"{name} must be positive and finite, got {t.flatten()[bad.flatten()][:4].tolist()}")


def _neuron_param(name: str, value: Tensor | float, x: Tensor, positive: bool) -> Tensor:
    """A threshold or initial membrane as a ``[]`` or ``x.shape[1:]`` tensor in the compute dtype."""
    neuron_shape = x.shape[1:]
    cdt = compute_dtype_of(x.dtype)
    if isinstance(value, Tensor):
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
        try:
            broadcast = torch.broadcast_shapes(value.shape, neuron_shape)
        except RuntimeError:
            broadcast = None
        if broadcast != neuron_shape:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to the neuron shape "
                f"x.shape[1:] = {tuple(neuron_shape)}"
            )
        value = value.detach() if name == "v_th" else value
        if positive:  # a tensor v_init is taken as it is: it may be a carried NaN (silent) membrane
            _check_positive_finite(name, value.detach())
        if value.numel() == 1:
            return value.to(cdt).reshape(())
        return value.to(cdt).expand(neuron_shape).contiguous()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'positive and finite' if positive else 'finite'}, got {value}")
    return torch.tensor(float(value), dtype=cdt, device=x.device)


def _check_if_input(x: object) -> Tensor:
    """An IF input current: a float tensor ``[T, *neurons]`` with T ≥ 1 and at least one neuron."""
    x = _check_float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a time dimension first, [T, *neurons]; got a 0-dim tensor")
    if x.shape[0] == 0:
        raise ValueError(f"x must have at least one time step, got shape {tuple(x.shape)} (T = 0)")
    if x.numel() == 0:
        raise ValueError(f"x must have at least one neuron, got shape {tuple(x.shape)}")
    return x


def _check_v_reset(v_reset: object) -> None:
    if v_reset is not None and not (isinstance(v_reset, (int, float)) and math.isfinite(v_reset)):
        raise ValueError(f"v_reset must be None (soft reset) or a finite float, got {v_reset!r}")


class IFResult(NamedTuple):
    """Outputs of :func:`if_sequence` (shapes for an input ``x: [T, *]``)."""

    spikes: Tensor  #: ``[T, *]`` 0/1 in ``spike_dtype``
    v: Tensor  #: ``[*]`` final membrane, float32 (float64 for float64 x)
    step_counts: Tensor  #: ``[T]`` int64, spikes per step summed over all neurons
    neuron_counts: Tensor | None  #: ``[*]`` int32, spikes per neuron over the T steps (None: not counted)


class RateNormResult(NamedTuple):
    """Outputs of :func:`rate_norm`."""

    r: Tensor  #: rates r̂ in [0, 1], shape and dtype of x
    running_max: Tensor  #: ``[]`` float32, the running max θ was computed from
    sum_r: Tensor  #: ``[]`` Σr̂ over all elements (float32, float64 for float64 x)
    sum_r2: Tensor  #: ``[]`` Σr̂² over all elements


def _x_args(x2: Tensor, dtype: torch.dtype) -> tuple:
    """How the C++ entry points take a time-major ``[T, N]`` input: its pointer, its length in
    elements, the dtype code, T, N and the time stride (N, or 0 for a constant input)."""
    T, N = x2.shape
    return x2.data_ptr(), x2[0].numel() + (T - 1) * x2.stride(0), _code(dtype), T, N, x2.stride(0)


def _param_args(v_th: Tensor, v_init: Tensor) -> tuple:
    """The thresholds and initial membranes (``[]`` or ``[N]``) as the C++ entry points take them."""
    return v_th.data_ptr(), v_th.numel(), v_init.data_ptr(), v_init.numel()


class _ForwardIO(NamedTuple):
    """An IF forward op's input as its kernels take it, with the per-neuron outputs they fill."""

    order: tuple[int, ...]  #: the neuron dims in memory order (:func:`rnl_fast.layout.neuron_order`)
    neuron_shape: torch.Size  #: the neuron shape in that order
    x2: Tensor  #: ``[T, N]`` time-major view of x
    v_th: Tensor  #: ``[]`` or contiguous in ``order``
    v_init: Tensor  #: ``[]`` or contiguous in ``order``
    v_final: Tensor  #: ``[N]`` out, compute dtype
    step_counts: Tensor  #: ``[T]`` int64 out
    neuron_counts: Tensor  #: ``[N]`` int32 out, or empty when the counts are not wanted

    @staticmethod
    def of(x: Tensor, v_th: Tensor, v_init: Tensor, count_neurons: bool, pool_dims: bool = False) -> _ForwardIO:
        order = neuron_order(x, pool_dims=pool_dims)
        xo = in_order(x, order, lead=1)
        x2 = time_major(xo)
        T, N = x2.shape
        return _ForwardIO(
            order, xo.shape[1:], x2, param_in_order(v_th, order), param_in_order(v_init, order),
            torch.empty(N, dtype=compute_dtype_of(x.dtype), device=x.device),
            torch.empty(T, dtype=torch.int64, device=x.device),
            torch.empty(N if count_neurons else 0, dtype=torch.int32, device=x.device),
        )  # fmt: skip

    def counted(self) -> Tensor | None:
        """``neuron_counts`` for the Triton launchers: None when the counts are not wanted."""
        return self.neuron_counts if self.neuron_counts.numel() else None

    def cpp_out_args(self) -> tuple:
        """The final membrane, the step counts and the neuron counts (null when not wanted) as the
        C++ entry points take them."""
        counts = self.neuron_counts
        return (
            self.v_final.data_ptr(), self.v_final.numel(), self.step_counts.data_ptr(), self.step_counts.numel(),
            counts.data_ptr() if counts.numel() else 0, counts.numel(),
        )  # fmt: skip

    def outputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Final membrane, step counts, neuron counts, with x's logical neuron shape and layout."""
        return _state_outputs(self.v_final, self.step_counts, self.neuron_counts, self.neuron_shape, self.order)


def _state_outputs(
    v_final: Tensor, step_counts: Tensor, neuron_counts: Tensor, neuron_shape: torch.Size, order: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    counts = logical(neuron_counts.view(neuron_shape), order) if neuron_counts.numel() else neuron_counts
    return logical(v_final.view(neuron_shape), order), step_counts, counts


def _fake_state_outputs(x: Tensor, neuron_shape: torch.Size, order: tuple[int, ...], count_neurons: bool):
    """What :meth:`_ForwardIO.outputs` returns, for the fake kernels."""
    N = math.prod(neuron_shape)
    return _state_outputs(
        x.new_empty((N,), dtype=compute_dtype_of(x.dtype)),
        x.new_empty(x.shape[:1], dtype=torch.int64),
        x.new_empty((N if count_neurons else 0,), dtype=torch.int32),
        neuron_shape,
        order,
    )


def _if_result(outputs: tuple[Tensor, ...], count_neurons: bool) -> IFResult:
    spikes, v, step_counts, neuron_counts = outputs
    return IFResult(spikes, v, step_counts, neuron_counts if count_neurons else None)


# ─── op 1: multi-step integrate-and-fire ──────────────────────────────────────────────────────


@torch.library.custom_op("rnl_fast::if_forward", mutates_args=())
def _if_forward(
    x: Tensor,
    v_th: Tensor,
    v_init: Tensor,
    v_reset: float,
    hard_reset: bool,
    surrogate: str,
    width: float,
    detach_reset: bool,
    spike_dtype: torch.dtype,
    count_neurons: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    io = _ForwardIO.of(x, v_th, v_init, count_neurons)
    T, N = io.x2.shape
    spikes = torch.empty((T, N), dtype=spike_dtype, device=x.device)
    spike_store = spikes.view(torch.uint8) if spike_dtype == torch.bool else spikes
    if backend_for(x) == "triton":
        _triton(x.device.type == "cpu").if_fwd(
            io.x2, io.v_th.reshape(-1), io.v_init.reshape(-1), v_reset, hard_reset, spike_store, io.v_final,
            io.step_counts, io.counted(),
        )  # fmt: skip
    else:
        _cpp().if_forward(
            *_x_args(io.x2, x.dtype), *_param_args(io.v_th, io.v_init), v_reset, int(hard_reset),
            spike_store.data_ptr(), spike_store.numel(), _code(spike_store.dtype), *io.cpp_out_args(), _threads(),
        )  # fmt: skip
    return (logical(spikes.view(T, *io.neuron_shape), io.order, lead=1), *io.outputs())


@_if_forward.register_fake
def _(x, v_th, v_init, v_reset, hard_reset, surrogate, width, detach_reset, spike_dtype, count_neurons):
    order = neuron_order(x)
    neuron_shape = in_order(x, order, lead=1).shape[1:]
    spikes = logical(x.new_empty((x.shape[0], *neuron_shape), dtype=spike_dtype), order, lead=1)
    return (spikes, *_fake_state_outputs(x, neuron_shape, order, count_neurons))


@torch.library.custom_op("rnl_fast::if_backward", mutates_args=())
def _if_backward(
    grad_spikes: Optional[Tensor],
    grad_v_final: Optional[Tensor],
    x: Tensor,
    v_th: Tensor,
    v_init: Tensor,
    v_reset: float,
    hard_reset: bool,
    surrogate: str,
    width: float,
    detach_reset: bool,
) -> tuple[Tensor, Tensor]:
    T, neuron_shape = x.shape[0], x.shape[1:]
    x2 = time_major(x)
    N = x2.shape[1]
    cdt = compute_dtype_of(x.dtype)
    gs = None if grad_spikes is None else grad_spikes.to(x.dtype).contiguous().view(T, N)
    gv = None if grad_v_final is None else grad_v_final.to(cdt).contiguous().view(N)
    grad_x = torch.empty((T, N), dtype=x.dtype, device=x.device)
    grad_v_init = torch.empty(N, dtype=cdt, device=x.device)
    if backend_for(x) == "triton":
        _triton(x.device.type == "cpu").if_bwd(
            gs, gv, x2, v_th.reshape(-1), v_init.reshape(-1), v_reset, hard_reset, surrogate, width, detach_reset, grad_x, grad_v_init
        )
    else:
        _cpp().if_backward(
            0 if gs is None else gs.data_ptr(), 0 if gs is None else gs.numel(),
            0 if gv is None else gv.data_ptr(), 0 if gv is None else gv.numel(),
            *_x_args(x2, x.dtype), *_param_args(v_th, v_init), v_reset, int(hard_reset),
            SURROGATES.index(surrogate), width, detach_reset,
            grad_x.data_ptr(), grad_x.numel(), grad_v_init.data_ptr(), grad_v_init.numel(), _threads(),
        )  # fmt: skip
    return grad_x.view(x.shape), grad_v_init.view(neuron_shape)


@_if_backward.register_fake
def _(grad_spikes, grad_v_final, x, v_th, v_init, v_reset, hard_reset, surrogate, width, detach_reset):
    return x.new_empty(x.shape), x.new_empty(x.shape[1:], dtype=compute_dtype_of(x.dtype))


def _if_setup_context(ctx, inputs, output) -> None:
    x, v_th, v_init, v_reset, hard_reset, surrogate, width, detach_reset, _, _ = inputs
    ctx.save_for_backward(x, v_th, v_init)  # x only: the backward recomputes the membrane
    ctx.set_materialize_grads(False)  # unused outputs (membrane, counts) cost no zero-filled [T, N]
    ctx.options = (v_reset, hard_reset, surrogate, width, detach_reset)
    ctx.v_init_shape = v_init.shape


def _if_autograd_backward(ctx, grad_spikes, grad_v_final, _grad_steps, _grad_neurons):
    x, v_th, v_init = ctx.saved_tensors
    if grad_spikes is not None and not grad_spikes.is_floating_point():
        grad_spikes = None  # uint8/bool spikes carry no gradient
    if grad_spikes is None and grad_v_final is None:
        return None, None, None, None, None, None, None, None, None, None
    grad_x, grad_v_init = _if_backward(grad_spikes, grad_v_final, x, v_th, v_init, *ctx.options)
    if ctx.v_init_shape != grad_v_init.shape:  # a scalar initial membrane: sum over neurons
        grad_v_init = grad_v_init.sum().reshape(ctx.v_init_shape)
    return grad_x, None, grad_v_init, None, None, None, None, None, None, None


_if_forward.register_autograd(_if_autograd_backward, setup_context=_if_setup_context)


def if_sequence(
    x: Tensor,
    v_th: Tensor | float = 1.0,
    v_init: Tensor | float = 0.0,
    v_reset: float | None = None,
    surrogate: str = "atan",
    width: float = 1.0,
    detach_reset: bool = False,
    spike_dtype: torch.dtype | None = None,
    count_neurons: bool = True,
) -> IFResult:
    """Integrate-and-fire neurons over all T steps in one fused kernel (paper Eq. 3).

    For t = 0..T−1: ``m = v + x[t]; s[t] = (m >= v_th)``; soft reset ``v = m − v_th·s[t]`` when
    ``v_reset is None`` (the paper's), else hard reset ``v = v_reset if s[t] else m``. Arithmetic
    and membrane in float32 (float64 for float64 x). A NaN in ``x`` makes that neuron's membrane
    NaN from that step on, and a NaN membrane never fires (``NaN >= v_th`` is false).

    Args:
        x: ``[T, *]`` input current, float32/float64/float16/bfloat16, any strides; an input
            expanded over time (stride 0 in T, constant coding) is read once per neuron.
        v_th: threshold, positive float or tensor broadcastable to ``x.shape[1:]`` (per channel).
        v_init: initial membrane, float or tensor broadcastable to ``x.shape[1:]``; gradients
            flow into a tensor ``v_init``, so chunked calls backpropagate through time exactly.
            A float must be finite; a tensor is not value-checked, since it is usually the
            membrane carried from an earlier call (NaN there: a neuron silenced by a NaN input).
        v_reset: ``None`` for soft reset, else the hard-reset potential.
        surrogate, width: surrogate derivative of the Heaviside step in the backward pass,
            ``"atan"`` (width 1 = SpikingJelly's ``ATan(alpha=2)``) or ``"rectangle"``
            (:func:`rnl_fast.reference.surrogate_grad`).
        detach_reset: no gradient through the reset term.
        spike_dtype: ``None`` (= ``x.dtype``), ``x.dtype``, ``torch.uint8`` or ``torch.bool``;
            byte spikes cut the bytes written for inference and carry no gradient.
        count_neurons: also return the spikes per neuron (else ``neuron_counts`` is None and
            the kernels skip writing them: a simulator needs only the counts per step).

    Memory saved for backward: only the input x (by reference, no copy) and the per-neuron
    initial membrane; the backward pass recomputes the membrane. SpikingJelly's IF node saves the
    float32 pre-spike membrane ``h_seq`` (4 bytes per element) besides its spikes.
    """
    x = _check_if_input(x)
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive finite float, got {width!r}")
    _check_v_reset(v_reset)
    spike_dtype = spike_dtype or x.dtype
    if spike_dtype not in (x.dtype, torch.uint8, torch.bool):
        raise ValueError(f"spike_dtype must be None, x.dtype ({x.dtype}), torch.uint8 or torch.bool; got {spike_dtype}")
    v_th_t = _neuron_param("v_th", v_th, x, positive=True)
    v_init_t = _neuron_param("v_init", v_init, x, positive=False)
    backend = backend_for(x)
    if backend == "torch":
        result = reference.if_sequence(x, v_th_t, v_init_t, v_reset, surrogate, width, detach_reset, spike_dtype)
    else:
        hard = v_reset is not None
        result = _if_forward(
            x, v_th_t, v_init_t, float(v_reset or 0.0), hard, surrogate, float(width), detach_reset, spike_dtype,
            bool(count_neurons),
        )  # fmt: skip
    return _if_result(result, count_neurons)


# ─── op 1b: integrate-and-fire fused with 2×2 average pooling (inference) ─────────────────────


@torch.library.custom_op("rnl_fast::if_pool_forward", mutates_args=())
def _if_pool_forward(
    x: Tensor,
    v_th: Tensor,
    v_init: Tensor,
    v_reset: float,
    hard_reset: bool,
    scale: float,
    ceil_mode: bool,
    count_neurons: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    io = _ForwardIO.of(x, v_th, v_init, count_neurons, pool_dims=True)
    _, pooled_shape, (planes, H, W, inner) = pool_geometry(x, io.order, ceil_mode)
    T = x.shape[0]
    pooled = torch.empty((T, math.prod(pooled_shape)), dtype=x.dtype, device=x.device)
    if backend_for(x) == "triton":
        _triton(x.device.type == "cpu").if_fwd_pool2x2(
            io.x2, (planes, H, W, inner), ceil_mode, io.v_th.reshape(-1), io.v_init.reshape(-1), v_reset, hard_reset,
            scale, pooled, io.v_final, io.step_counts, io.counted(),
        )  # fmt: skip
    else:
        _cpp().if_forward_pool2x2(
            *_x_args(io.x2, x.dtype), planes, H, W, inner, ceil_mode, *_param_args(io.v_th, io.v_init),
            v_reset, int(hard_reset), scale, pooled.data_ptr(), pooled.numel(), *io.cpp_out_args(), _threads(),
        )  # fmt: skip
    return (logical(pooled.view(T, *pooled_shape), io.order, lead=1), *io.outputs())


@_if_pool_forward.register_fake
def _(x, v_th, v_init, v_reset, hard_reset, scale, ceil_mode, count_neurons):
    order = neuron_order(x, pool_dims=True)
    neuron_shape, pooled_shape, _ = pool_geometry(x, order, ceil_mode)
    pooled = logical(x.new_empty((x.shape[0], *pooled_shape)), order, lead=1)
    return (pooled, *_fake_state_outputs(x, neuron_shape, order, count_neurons))


def if_sequence_pool2x2(
    x: Tensor,
    v_th: Tensor | float = 1.0,
    v_init: Tensor | float = 0.0,
    v_reset: float | None = None,
    scale: float = 1.0,
    ceil_mode: bool = False,
    count_neurons: bool = True,
) -> IFResult:
    """IF neurons (as :func:`if_sequence`) whose spikes are averaged over 2×2 windows, in one kernel.

    ``x: [T, *, H, W]`` → ``IFResult`` whose ``spikes`` field holds the pooled rates
    ``avg_pool2d(spikes, 2, ceil_mode=ceil_mode) · scale``, ``[T, *, H', W']`` in ``x.dtype``
    (H' = H // 2, or ⌈H/2⌉ with ``ceil_mode``); the membrane and the counts are those of
    :func:`if_sequence` over every neuron. The spikes themselves are never stored: this is the
    converted network's "neurons → AvgPool2d(2)" in one pass over the input current, for
    simulation. Bit-identical to :func:`rnl_fast.reference.if_sequence_pool2x2`.

    Inference only: raises if a gradient would be needed (train with :func:`if_sequence` and
    ``avg_pool2d``).

    Args:
        x: ``[T, *, H, W]`` input current, any strides;
            stride 0 in T (constant coding) is read once per neuron.
        v_th, v_init, v_reset: as in :func:`if_sequence`.
        scale: finite float multiplying every pooled value (a converted layer's spike weight λ).
        ceil_mode: as ``nn.AvgPool2d``: keep windows overhanging an odd last row or column.
        count_neurons: as in :func:`if_sequence`.
    """
    x = _check_if_input(x)
    if x.dim() < 3:
        raise ValueError(f"x must be [T, *, H, W], got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if pool_out_size(H, ceil_mode) == 0 or pool_out_size(W, ceil_mode) == 0:
        raise ValueError(f"a 2x2 window does not fit in H x W = {H} x {W} (ceil_mode={ceil_mode})")
    _check_v_reset(v_reset)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (x, v_init)):
        raise RuntimeError(
            "if_sequence_pool2x2 is inference only and gives no gradient: run it under torch.no_grad(), "
            "or train with if_sequence followed by avg_pool2d"
        )
    v_th_t = _neuron_param("v_th", v_th, x, positive=True)
    v_init_t = _neuron_param("v_init", v_init, x, positive=False)
    if backend_for(x) == "torch":
        result = reference.if_sequence_pool2x2(x, v_th_t, v_init_t, v_reset, float(scale), bool(ceil_mode))
    else:
        hard = v_reset is not None
        result = _if_pool_forward(
            x, v_th_t, v_init_t, float(v_reset or 0.0), hard, float(scale), bool(ceil_mode), bool(count_neurons)
        )
    return _if_result(result, count_neurons)


# ─── op 2: Rate Norm Layer ────────────────────────────────────────────────────────────────────


@torch.library.custom_op("rnl_fast::rate_norm_forward", mutates_args=())
def _rate_norm_forward(
    x: Tensor, raw_p: Tensor, running_max: Tensor, momentum: float, training: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x1 = x.contiguous().view(-1)
    cdt = compute_dtype_of(x.dtype)
    r = torch.empty_like(x1)
    if backend_for(x) == "triton":
        running_max_out = torch.empty((), dtype=torch.float32, device=x.device)
        sums = torch.empty(2, dtype=cdt, device=x.device)
        _triton(x.device.type == "cpu").rate_norm_fwd(
            x1, raw_p, running_max, momentum, training, THETA_EPS, r, running_max_out, sums
        )
        return r.view(x.shape), running_max_out, sums[0].clone(), sums[1].clone()  # no aliased outputs
    C = _cpp()
    running_max_out = running_max.detach().to(torch.float32).clone()
    if training:  # CPU tensors: reading the max on the host costs no device synchronisation
        batch_max = C.relu_max(x1.data_ptr(), x1.numel(), _code(x.dtype), _threads())
        running_max_out = reference.blend_running_max(running_max_out, torch.tensor(batch_max), momentum)
    theta = reference.rate_norm_threshold(raw_p.detach(), running_max_out, cdt)
    sum_r, sum_r2 = C.rate_norm_forward(
        x1.data_ptr(), x1.numel(), _code(x.dtype), float(theta), r.data_ptr(), r.numel(), _threads()
    )
    return r.view(x.shape), running_max_out, torch.tensor(sum_r, dtype=cdt), torch.tensor(sum_r2, dtype=cdt)


@_rate_norm_forward.register_fake
def _(x, raw_p, running_max, momentum, training):
    cdt = compute_dtype_of(x.dtype)
    return torch.empty_like(x), x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=cdt), x.new_empty((), dtype=cdt)


@torch.library.custom_op("rnl_fast::rate_norm_backward", mutates_args=())
def _rate_norm_backward(
    grad_r: Optional[Tensor], grad_sums: Tensor, x: Tensor, raw_p: Tensor, running_max: Tensor
) -> tuple[Tensor, Tensor]:
    x1 = x.contiguous().view(-1)
    cdt = compute_dtype_of(x.dtype)
    g1 = None if grad_r is None else grad_r.to(x.dtype).contiguous().view(-1)
    grad_x = torch.empty_like(x1)
    if backend_for(x) == "triton":
        grad_raw = torch.empty((), dtype=raw_p.dtype, device=x.device)
        _triton(x.device.type == "cpu").rate_norm_bwd(
            g1, grad_sums.to(cdt).contiguous(), x1, raw_p, running_max, THETA_EPS, grad_x, grad_raw
        )
        return grad_x.view(x.shape), grad_raw
    theta = reference.rate_norm_threshold(raw_p.detach(), running_max, cdt)
    grad_sum_r, grad_sum_r2 = grad_sums.tolist()
    grad_theta = _cpp().rate_norm_backward(
        0 if g1 is None else g1.data_ptr(), 0 if g1 is None else g1.numel(), grad_sum_r, grad_sum_r2,
        x1.data_ptr(), x1.numel(), _code(x.dtype), float(theta), grad_x.data_ptr(), grad_x.numel(), _threads(),
    )  # fmt: skip
    p = torch.sigmoid(raw_p.detach().to(cdt))
    grad_raw = (grad_theta * running_max.to(cdt) * p * (1 - p)).to(raw_p.dtype)
    return grad_x.view(x.shape), grad_raw


@_rate_norm_backward.register_fake
def _(grad_r, grad_sums, x, raw_p, running_max):
    return torch.empty_like(x), torch.empty_like(raw_p)


def _rate_norm_setup_context(ctx, inputs, output) -> None:
    x, raw_p, _running_max, _momentum, _training = inputs
    ctx.save_for_backward(x, raw_p, output[1])  # r̂ is recomputed from x: nothing else is kept
    ctx.set_materialize_grads(False)


def _rate_norm_autograd_backward(ctx, grad_r, _grad_running_max, grad_sum_r, grad_sum_r2):
    x, raw_p, running_max = ctx.saved_tensors
    if grad_r is None and grad_sum_r is None and grad_sum_r2 is None:
        return None, None, None, None, None
    cdt = compute_dtype_of(x.dtype)
    zero = torch.zeros((), dtype=cdt, device=x.device)
    grad_sums = torch.stack(
        [zero if grad_sum_r is None else grad_sum_r.to(cdt), zero if grad_sum_r2 is None else grad_sum_r2.to(cdt)]
    )
    grad_x, grad_raw = _rate_norm_backward(grad_r, grad_sums, x, raw_p, running_max)
    return grad_x, grad_raw.reshape(raw_p.shape), None, None, None


_rate_norm_forward.register_autograd(_rate_norm_autograd_backward, setup_context=_rate_norm_setup_context)


def rate_norm(
    x: Tensor, raw_p: Tensor, running_max: Tensor, momentum: float = 0.1, training: bool = True
) -> RateNormResult:
    """Fused Rate Norm Layer (paper Eq. 6) with the Rate Inference Loss sums (Eq. 8).

    In training mode the running max is first updated, on the device and without a host sync:
    ``running_max ← (1 − momentum)·running_max + momentum·max(relu(x))`` over the whole tensor
    (NaN elements skipped, no gradient through the max); the new value is returned, not written.
    Then ``θ = sigmoid(raw_p)·running_max + 1e-6`` and ``r̂ = clip(x, 0, θ)/θ``; the same pass
    yields Σr̂ and Σr̂², so Ω = Σr̂ / (Σr̂² + 1e-5) costs no extra pass and its gradient joins
    the fused backward (to x and to ``raw_p``). NaN in x gives NaN in r̂ and in the sums.

    Args:
        x: ``[*]`` pre-activation, float32/float64/float16/bfloat16, any strides.
        raw_p: ``[]`` (or one element) trainable logit of p.
        running_max: ``[]`` float32 buffer (not modified).
        momentum: in (0, 1].
        training: update the running max from this batch before using it.
    """
    x = _check_float_tensor("x", x)
    if x.numel() == 0:
        raise ValueError(f"x must have at least one element, got shape {tuple(x.shape)}")
    for name, t in (("raw_p", raw_p), ("running_max", running_max)):
        if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor with one element, got {t!r}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not (isinstance(momentum, (int, float)) and 0.0 < momentum <= 1.0):
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    raw_p, running_max = raw_p.reshape(()), running_max.detach().reshape(()).to(torch.float32)
    if backend_for(x) == "torch":
        return RateNormResult(*reference.rate_norm(x, raw_p, running_max, float(momentum), bool(training)))
    return RateNormResult(*_rate_norm_forward(x, raw_p, running_max, float(momentum), bool(training)))
