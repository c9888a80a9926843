"""End-to-end SNN simulation: a converted network run over T steps, ours against SpikingJelly 2.0.

cnn7 (28×28, 1 channel) and vgg16 (32×32, 3 channels) with random weights and realistic BN
statistics, batch 128, T = 16, 64, 256, on the same random images for every impl: ours
(``rnl_fast.convert(relu_net, "maxnorm")`` then ``snn(x, T)``; on cnn7 also the RNL build,
``convert(rnl_net, "rnl")``), one ANN forward (the unit of the figures) and SpikingJelly's
``ann2snn`` rate-coding conversion of the same ReLU net, stepped T times. On CPU vgg16 runs at
batch 8 and the T = 256 groups are skipped (``RNL_FAST_BENCH_E2E_CPU_ALL=1`` runs them); on CUDA
everything runs at the sizes above. Then the chunked long run (cnn7, batch 16, T = 1024 beside
T = 64: peak memory and time per step) and one profiled call of ours (cnn7, T = 64). See
benchlib/e2e.py.

Time to accuracy (``tta-cnn7-mnist``, CPU): a ReLU cnn7 trained for one epoch on MNIST (cached),
converted by our best recipe (robustnorm, channel-wise, v_init=half), by our maxnorm with the same
options and by SpikingJelly's best (99.9%, channel-wise, half threshold); each runs exactly its steps
to ANN − 1 over 1000 test images. See benchlib/tta.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchlib import E2E_PROFILE_GROUP, case_params


@pytest.mark.parametrize("device, group, impl", case_params("e2e"))
def test_e2e(bench: Callable[[str, str, str], None], device: str, group: str, impl: str) -> None:
    bench(device, group, impl)


@pytest.mark.parametrize("device, group, impl", case_params("tta"))
def test_time_to_accuracy(bench: Callable[[str, str, str], None], device: str, group: str, impl: str) -> None:
    bench(device, group, impl)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_e2e_profile(bench_profile: Callable[[str, str], None], device: str) -> None:
    bench_profile(device, E2E_PROFILE_GROUP)
