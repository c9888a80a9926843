"""Triton kernels for CUDA tensors (installed as ``rnl_fast.kernels``).

Launchers only: they take tensors that ``rnl_fast.ops`` has already validated, write into the
output tensors the caller passes, and return None. Under ``TRITON_INTERPRET=1`` (set before
import) they also run on CPU tensors, which is how the tests check them without a GPU.
"""

from triton.runtime.interpreter import InterpretedFunction

from .if_kernels import _if_step, if_bwd, if_fwd
from .if_pool_kernels import if_fwd_pool2x2
from .qcfs_kernels import qcfs_bwd, qcfs_fwd
from .rate_norm_kernels import rate_norm_bwd, rate_norm_fwd

#: Whether triton built these kernels for its interpreter (TRITON_INTERPRET=1 when it decorated
#: them, at this package's import): only then do they run on CPU tensors.
INTERPRETED = isinstance(_if_step, InterpretedFunction)

__all__ = [
    "INTERPRETED",
    "if_bwd",
    "if_fwd",
    "if_fwd_pool2x2",
    "qcfs_bwd",
    "qcfs_fwd",
    "rate_norm_bwd",
    "rate_norm_fwd",
]
