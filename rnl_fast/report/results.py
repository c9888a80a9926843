"""What one conversion method measured (:class:`MethodResult`), and ``results.json``.

``results.json`` layout (one file per run)::

    {"dataset": "mnist", "model": "cnn7", "T": 256, "test_images": 1000,
     "methods": {NAME: {"ann_accuracy": percent, "snn_accuracy": [percent after step 1..T],
                        "spikes_per_step": [mean spikes per image at each step],
                        "omega": mean Ω of the ANN's activations (rates r̂),
                        "k_curves": {layer: [K(t) for t = 1..T]}, "k_images": images K is over,
                        "layer_labels": {layer: "conv1", ...},
                        "steps_to_target": t or null,
                        "energy_to_target": spikes per image until then (joules at α = 1 J per
                                            spike, paper Eq. 14) or null,
                        "target_accuracy": ANN accuracy − 1 point,
                        "method": the conversion method (maxnorm, robustnorm, rnl, rnl_ril, qcfs,
                                  rnl_qcfs),
                        "v_init": initial membrane as a fraction of the threshold (0: the paper's),
                        "channel_wise": thresholds per channel (false: per layer, the paper's),
                        "levels": quantization levels L of the network's activations (QCFS,
                                  Rate Norm with levels) or null}},
     "verdict": [the sentences the demo prints after its table]}

for NAME in maxnorm, robustnorm, rnl, rnl_ril (the paper's settings) and the latency methods and
variants, named by their label: the method, ``+cw`` when channel-wise, ``+half`` (or ``+v0.25``)
for an initial membrane other than the method's default, e.g. ``robustnorm+cw+half``, ``qcfs``
(which starts from θ/2 by default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._io import atomic_write
from ..energy import energy_to_accuracy
from ..simulation import SimulationResult

#: A method "has converged" when it reaches its ANN accuracy minus this many points.
TARGET_MARGIN = 1.0
#: The methods of the paper's Table 2 (Ding et al. 2021); QCFS (2022) and the rest came later.
PAPER_METHODS = ("maxnorm", "robustnorm", "rnl", "rnl_ril")


@dataclass
class MethodResult:
    """Everything measured for one conversion method."""

    ann_accuracy: float
    snn_accuracy: list[float]
    spikes_per_step: list[float]
    omega: float
    k_curves: dict[str, list[float]] = field(default_factory=dict)
    k_images: int = 0
    layer_labels: dict[str, str] = field(default_factory=dict)
    target_accuracy: float = 0.0
    steps_to_target: int | None = None
    energy_to_target: float | None = None
    #: The conversion method ("" when not recorded: the results' name is then the method).
    method: str = ""
    #: Initial membrane as a fraction of the threshold (0: the paper's start).
    v_init: float = 0.0
    #: Thresholds per channel (False: one per layer, the paper's).
    channel_wise: bool = False
    #: Quantization levels L of the ANN's activations (QCFS, quantized Rate Norm); None: not quantized.
    levels: int | None = None

    @classmethod
    def from_simulation(
        cls,
        ann_accuracy: float,
        omega: float,
        sim: SimulationResult,
        method: str = "",
        v_init: float = 0.0,
        channel_wise: bool = False,
        levels: int | None = None,
    ) -> MethodResult:
        target = ann_accuracy - TARGET_MARGIN
        reached = energy_to_accuracy(sim.accuracy, sim.spikes_per_step, target)
        return cls(
            ann_accuracy=ann_accuracy,
            snn_accuracy=sim.accuracy,
            spikes_per_step=sim.spikes_per_step,
            omega=omega,
            k_curves=sim.k_curves,
            k_images=sim.k_images,
            layer_labels=sim.layer_labels,
            target_accuracy=target,
            steps_to_target=reached.steps,
            energy_to_target=reached.energy,
            method=method,
            v_init=v_init,
            channel_wise=channel_wise,
            levels=levels,
        )

    @property
    def is_variant(self) -> bool:
        """Whether this is not one of the paper's methods as the paper runs it: a method the paper
        does not have (QCFS, ...), or one of its methods with other settings (a latency variant).
        A result that records no method is taken for one of the paper's."""
        return (self.method not in ("", *PAPER_METHODS)) or self.v_init != 0.0 or self.channel_wise

    @property
    def conversion_loss(self) -> float:
        """ANN accuracy − SNN accuracy after the last simulated step, in points."""
        return self.ann_accuracy - self.snn_accuracy[-1]


def write_results(
    path: str | Path,
    dataset: str,
    model: str,
    T: int,
    test_images: int,
    methods: dict[str, MethodResult],
    verdict: list[str] | None = None,
) -> None:
    """Write ``results.json`` atomically: readers see the previous file or the complete new one."""
    payload = {
        "dataset": dataset,
        "model": model,
        "T": T,
        "test_images": test_images,
        "methods": {name: asdict(result) for name, result in methods.items()},
        "verdict": list(verdict or []),
    }
    with atomic_write(path) as file:
        file.write(json.dumps(payload, indent=1).encode())
