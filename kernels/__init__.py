"""Triton kernels for CUDA tensors (installed as ``rnl_fast.kernels``).

Launchers only: they take tensors that ``rnl_fast/ops.py`` has already validated, write into the
output tensors the caller passes, and return None. Under ``TRITON_INTERPRET=1`` (set before
import) they also run on CPU tensors, which is how the tests check them without a GPU.
"""

from .if_kernels import if_bwd, if_fwd
from .if_pool_kernels import if_fwd_pool2x2
from .rate_norm_kernels import rate_norm_bwd, rate_norm_fwd

__all__ = ["if_bwd", "if_fwd", "if_fwd_pool2x2", "rate_norm_bwd", "rate_norm_fwd"]
