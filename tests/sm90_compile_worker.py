"""Compiles every Triton kernel of rnl_fast for an H100/H200 (sm_90) with the real compiler.

Run by tests/test_triton_compile.py in a subprocess without TRITON_INTERPRET: the interpreter
that runs the kernels in CI accepts code the GPU compiler rejects (types, pointer arithmetic,
constexpr branches), and no GPU is needed to compile. Each kernel is compiled in a few variants
(dtypes and the constexpr switches that change the code); prints one line per kernel and exits
non-zero on the first failure.
"""

from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rnl_fast.kernels import if_kernels, if_pool_kernels, qcfs_kernels, rate_norm_kernels
from rnl_fast.numerics import SURROGATES

TARGET = GPUTarget("cuda", 90, 32)
# (storage dtype of x and of the tensors shaped like it, compute dtype)
DTYPES = (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64"))
# Pointers whose dtype does not follow x: by name.
FIXED_POINTERS = {
    "step_partials_ptr": "i32",
    "neuron_counts_ptr": "i32",
    "batch_max_ptr": "fp32",
    "running_max_ptr": "fp32",
    "running_max_out_ptr": "fp32",
    "raw_p_ptr": "fp32",
}
# Pointers to tensors shaped and typed like x (the rest are in the compute dtype).
LIKE_X = {
    "x_ptr",
    "spikes_ptr",
    "pooled_ptr",
    "r_ptr",
    "grad_r_ptr",
    "grad_x_ptr",
    "grad_spikes_ptr",
    "y_ptr",
    "grad_y_ptr",
}


def signature(fn, storage: str, compute: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FIXED_POINTERS:
            sig[name] = "*" + FIXED_POINTERS[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + (storage if name in LIKE_X else compute)
        else:
            sig[name] = "i32"
    return sig


def variants(switches: dict[str, tuple]) -> list[dict]:
    names = list(switches)
    return [dict(zip(names, values)) for values in itertools.product(*switches.values())]


KERNELS = {
    "if_fwd": (
        if_kernels._if_fwd_kernel,
        dict(
            V_TH_PER_NEURON=(False, True),
            V_INIT_PER_NEURON=(True,),
            HARD_RESET=(False, True),
            V_RESET=(0.0,),
            COUNT_NEURONS=(False, True),
            BLOCK=(1024,),
        ),
    ),
    "if_bwd": (
        if_kernels._if_bwd_kernel,
        dict(
            HAS_GRAD_SPIKES=(True,),
            HAS_GRAD_V_FINAL=(False, True),
            V_TH_PER_NEURON=(True,),
            V_INIT_PER_NEURON=(False,),
            HARD_RESET=(False, True),
            V_RESET=(0.0,),
            SURROGATE=SURROGATES,
            WIDTH=(1.0,),
            DETACH_RESET=(False, True),
            BLOCK=(512,),
        ),
    ),
    # The per-block body is shared with if_bwd (_if_bwd_block), compiled above in all its switches;
    # here the persistent loop and the slot addressing, in each dtype (the slot's element size)
    # with the switches that change which pointers the loop carries.
    "if_bwd_slots": (
        if_kernels._if_bwd_slots_kernel,
        dict(
            HAS_GRAD_SPIKES=(False, True),
            HAS_GRAD_V_FINAL=(True,),
            V_TH_PER_NEURON=(False, True),
            V_INIT_PER_NEURON=(True,),
            HARD_RESET=(False, True),
            V_RESET=(0.0,),
            SURROGATE=("sigmoid",),
            WIDTH=(1.0,),
            DETACH_RESET=(False,),
            BLOCK=(256,),
        ),
    ),
    "if_pool_fwd": (
        if_pool_kernels._if_fwd_pool_kernel,
        dict(
            V_TH_PER_NEURON=(True,),
            V_INIT_PER_NEURON=(False, True),
            HARD_RESET=(False, True),
            V_RESET=(0.0,),
            COUNT_NEURONS=(False, True),
            BLOCK=(256,),
        ),
    ),
    "rate_norm_max": (rate_norm_kernels._rate_norm_max_kernel, dict(BLOCK=(1024,))),
    "rate_norm_channel_max": (
        rate_norm_kernels._rate_norm_channel_max_kernel,
        dict(BY_COLUMNS=(False, True), BLOCK_R=(4,), BLOCK_W=(256,)),
    ),
    "rate_norm_fwd": (
        rate_norm_kernels._rate_norm_fwd_kernel,
        dict(
            TRAINING=(False, True),
            KEEP=(0.9,),
            MOMENTUM=(0.1,),
            EPS=(1e-6,),
            CHANNEL_WISE=(False, True),
            LEVELS=(0, 8),
            BLOCK=(1024,),
        ),
    ),
    "rate_norm_bwd": (
        rate_norm_kernels._rate_norm_bwd_kernel,
        dict(
            HAS_GRAD_R=(False, True),
            HAS_GRAD_SUM_R=(True,),
            HAS_GRAD_SUM_R2=(False, True),
            EPS=(1e-6,),
            CHANNEL_WISE=(False, True),
            LEVELS=(0, 8),
            BLOCK=(1024,),
        ),
    ),
    "qcfs_fwd": (qcfs_kernels._qcfs_fwd_kernel, dict(LEVELS=(1, 255), BY_RECIPROCAL=(False, True), BLOCK=(1024,))),
    "qcfs_bwd": (qcfs_kernels._qcfs_bwd_kernel, dict(LEVELS=(1, 255), BY_RECIPROCAL=(False, True), BLOCK=(1024,))),
}


def main() -> int:
    for name, (autotuned, switches) in KERNELS.items():
        # The JITFunction under an autotuner (a JITFunction's own .fn is the Python function).
        fn = autotuned.fn if isinstance(autotuned, triton.runtime.Autotuner) else autotuned
        count = 0
        for (storage, compute), constexprs in itertools.product(DTYPES, variants(switches)):
            sig = signature(fn, storage, compute, constexprs)
            try:
                triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET)
            except Exception as error:  # noqa: BLE001 (report any compiler failure with its variant)
                print(f"FAILED {name} {storage}/{compute} {constexprs}: {type(error).__name__}: {error}")
                return 1
            count += 1
        print(f"{name}: {count} variants compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
