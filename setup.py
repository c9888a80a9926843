"""Builds the C++ CPU kernels (csrc/ → rnl_fast._C); everything else is in pyproject.toml.

The extension is plain C++ with pybind11: no torch headers, hence no torch in the build
environment (docs/architecture.md). Flags: -O3 with OpenMP for the cores and, unless
RNL_FAST_PORTABLE=1, -march=native so the compiler uses every vector unit of the build machine
(build where you run; set RNL_FAST_PORTABLE=1 for a wheel that must run elsewhere).
"""

import os

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

portable = os.environ.get("RNL_FAST_PORTABLE", "0") == "1"
# -fno-trapping-math: lets GCC if-convert (and so vectorise) selects around divisions; results
# and NaN propagation are unchanged, only floating-point exception flags are not honoured.
# -ffp-contract=off: no FMA contraction, so that a·b + c rounds twice as torch rounds it (the
# quantized Rate Norm's floor(r·L + 1/2) must see the spec's r·L + 1/2, not a fused one).
compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
if not portable:
    compile_args.append("-march=native")

setup(
    ext_modules=[
        Pybind11Extension(
            "rnl_fast._C",
            sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
            # A changed header rebuilds the extension (else a stale build hides the change).
            depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")),
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
)
