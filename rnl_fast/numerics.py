"""The numerical conventions that the spec (:mod:`rnl_fast.reference`) and every backend share.

Declared once, here on the bottom floor, so that the spec, the ops, the modules and the kernels'
callers read the same values: the compute dtype of an input, the two epsilons of the official RNL
code, the surrogate names the IF backward pass knows, and the float dtypes the ops accept.
"""

from __future__ import annotations

import torch

#: Added to the Rate Norm threshold θ (official RNL code) so that θ never divides by zero.
THETA_EPS = 1e-6
#: Added to ‖r̂‖₂² in the Rate Inference Loss Ω = ‖r̂‖₁ / (‖r̂‖₂² + OMEGA_EPS) (official RNL code).
OMEGA_EPS = 1e-5
#: Names of the surrogate derivatives of the Heaviside step that the IF backward pass can use.
SURROGATES = ("atan", "rectangle", "sigmoid")
#: The input dtypes of every op.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of every op: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
