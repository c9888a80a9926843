"""The fused ops as torch custom ops: validation, backend choice, fake kernels and autograd.

Dispatch lives here and only here (docs/architecture.md): CUDA tensors run the Triton kernels
(``rnl_fast.kernels``), CPU tensors the C++ kernels (``rnl_fast._C``); ``RNL_FAST_BACKEND=
triton|cpp|torch`` overrides the choice on every call (:mod:`._backend`). ``torch`` runs the
pure-PyTorch definitions in :mod:`rnl_fast.reference`. The kernels are called only inside custom
ops, so ``torch.compile`` sees one opaque node per op and never a graph break.

One file per op family: :mod:`.if_` (IF neurons), :mod:`.if_pool` (IF fused with 2×2 pooling),
:mod:`.rate_norm` (Rate Norm Layer), :mod:`.qcfs` (QCFS activation); :mod:`.layout` lays the inputs out for the kernels
(memory order, time-major ``[T, N]``) and :mod:`._checks` validates the arguments.
"""

from ..numerics import FLOAT_DTYPES
from ._backend import BACKENDS, backend_for
from ._if_io import IFResult
from .if_ import if_sequence
from .if_pool import if_sequence_pool2x2
from .qcfs import qcfs
from .rate_norm import RateNormResult, rate_norm

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "IFResult",
    "RateNormResult",
    "backend_for",
    "if_sequence",
    "if_sequence_pool2x2",
    "qcfs",
    "rate_norm",
]
