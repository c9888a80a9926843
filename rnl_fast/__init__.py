"""rnl_fast: fast, exact ANN→SNN conversion with Rate Norm Layers (Ding et al., IJCAI 2021).

The layers: :class:`IFSequence` (multi-step integrate-and-fire, one fused kernel per call) and
:class:`RateNorm` (fused Rate Norm Layer with the Rate Inference Loss sums), and :class:`QCFS`
(quantized clipped ReLU with a trainable bound, Bu et al. 2022). The ops underneath are
:func:`if_sequence`, :func:`if_sequence_pool2x2` (IF fused with 2×2 average pooling), :func:`rate_norm`
and :func:`qcfs` (:mod:`rnl_fast.ops`); their pure-PyTorch definitions are in
:mod:`rnl_fast.reference`. The method on top: :func:`convert` (ANN → SNN, :mod:`rnl_fast.conversion`)
and :func:`simulate` (accuracy, spikes, K curves per step, :mod:`rnl_fast.simulation`); training in
:mod:`rnl_fast.train`; the whole experiment in :mod:`rnl_fast.pipeline`; the CLI in :mod:`rnl_fast.cli`. Exchange with
other toolchains (:mod:`rnl_fast.interop`): :func:`to_nir` and :func:`from_nir` (NIR) and
:func:`from_spikingjelly` (SpikingJelly models in); they import the optional ``nir`` /
``spikingjelly`` packages on first use, never at ``import rnl_fast``.
"""

from .conversion import ConversionError, convert
from .nn import QCFS, IFSequence, RateNorm, rate_inference_loss
from .ops import backend_for, if_sequence, if_sequence_pool2x2, qcfs, rate_norm
from .reference import omega
from .simulation import SimulationResult, SpikingNetwork, reuse_freed_memory, simulate

__version__ = "0.1.0"

#: Names served on first use (:func:`__getattr__`): they import optional packages.
_LAZY = {"to_nir": "rnl_fast.interop", "from_nir": "rnl_fast.interop", "from_spikingjelly": "rnl_fast.interop"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConversionError",
    "IFSequence",
    "QCFS",
    "RateNorm",
    "backend_for",
    "convert",
    "from_nir",
    "from_spikingjelly",
    "if_sequence",
    "if_sequence_pool2x2",
    "omega",
    "qcfs",
    "rate_inference_loss",
    "rate_norm",
    "reuse_freed_memory",
    "SimulationResult",
    "simulate",
    "SpikingNetwork",
    "to_nir",
]
