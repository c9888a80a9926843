"""The experiment as a Python API: data → training → conversion → simulation → report.

What ``rnl-fast evaluate``, ``compare`` and ``demo`` do, callable from Python: :func:`prepare_data`
(the loaders of one experiment), :func:`train_paper_networks` (the ReLU and Rate Norm networks
and stage 2), :func:`train_latency_networks` (the QCFS network, and the Rate Norm network with
quantized rates and its stage 2), :func:`evaluate_method` (convert one network, simulate it,
measure it), :func:`compare` (several methods side by side, the paper's Table 2, with the
latency methods and variants of :func:`latency_variants` beside them) and :func:`write_report`
(results.json and the figures).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import data, models, report, train
from .conversion import MethodVariant, convert
from .nn import QCFS, QCFS_LEVELS, RateNorm
from .simulation import mean_omega, simulate

#: Validation images held out of the training set (stage 2 selects its checkpoint on them).
VAL_FRACTION = 1 / 12
#: Calibration batches the threshold-balancing methods read.
CALIBRATION_BATCHES = 10
#: Which trained network each method converts: the ReLU network, the Rate Norm network before
#: ("rnl") or after ("rnl_ril") stage 2, the QCFS network, or the Rate Norm network trained with
#: quantized rates after its stage 2 ("rnl_qcfs"; "rnl_q" is its stage 1, converted by no method).
SOURCE_OF_METHOD = {
    "maxnorm": "relu",
    "robustnorm": "relu",
    "rnl": "rnl",
    "rnl_ril": "rnl_ril",
    "qcfs": "qcfs",
    "rnl_qcfs": "rnl_qcfs",
}
#: The training stage of the checkpoint each method converts: the Rate Norm methods after stage 2
#: ("rnl_ril", "rnl_qcfs") or before it ("rnl"); the others convert networks that have one stage.
STAGE_OF_METHOD = {"maxnorm": 1, "robustnorm": 1, "rnl": 1, "rnl_ril": 2, "qcfs": 1, "rnl_qcfs": 2}
#: The methods whose thresholds come from calibration data, and so can be made channel-wise from
#: a network as it is trained (the Rate Norm methods need RateNorm layers trained per channel).
CALIBRATED_METHODS = ("maxnorm", "robustnorm")

Log = Callable[[str], None]


def _silent(_message: str) -> None:
    pass


@dataclass
class ExperimentData:
    """The loaders of one experiment (see :func:`prepare_data`)."""

    train: data.ArrayLoader | None  #: shuffled with :attr:`generator` (None: test split only)
    val: data.ArrayLoader | None
    test: data.ArrayLoader
    test_set: data.ImageDataset
    #: Shuffles the training loader; the training functions checkpoint its state (exact resume).
    generator: torch.Generator


def prepare_data(
    dataset: str,
    batch_size: int,
    seed: int = 0,
    data_dir: str | None = None,
    train_images: int | None = None,
    test_images: int | None = None,
    with_training: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> ExperimentData:
    """Load ``dataset`` and make its loaders: test (``test_images`` drawn at random when given),
    and, ``with_training``, training and validation (:data:`VAL_FRACTION` of the training
    images held out; under DDP each rank trains on its own share, shuffled from ``seed + rank``).
    CIFAR trains with random crops and flips."""
    generator = torch.Generator().manual_seed(seed)
    test_set = data.load_dataset(dataset, "test", data_dir)
    if test_images:
        test_set = data.subset(test_set, min(test_images, len(test_set)), seed=seed)
    test_loader = data.make_loader(test_set, batch_size, shuffle=False)
    if not with_training:
        return ExperimentData(None, None, test_loader, test_set, generator)
    full = data.load_dataset(dataset, "train", data_dir)
    if train_images:
        full = data.subset(full, min(train_images, len(full)), seed=seed)
    train_set, val_set = data.train_val_split(full, VAL_FRACTION, seed=seed)
    if world_size > 1:  # under torchrun: each rank trains on its own share
        train_set = train.shard(train_set, rank, world_size)
        generator.manual_seed(seed + rank)
    augment = dataset.startswith("cifar")
    train_loader = data.make_loader(train_set, batch_size, shuffle=True, augment=augment, generator=generator)
    val_loader = data.make_loader(val_set, batch_size, shuffle=False)
    return ExperimentData(train_loader, val_loader, test_loader, test_set, generator)


def check_checkpoint(
    state: Mapping,
    path: str | Path,
    *,
    stage: int | None = None,
    dataset: str | None = None,
    allow_unfinished: bool = False,
    use: str = "",
) -> list[str]:
    """Check that a loaded training checkpoint fits its use: written by ``stage`` (1 or 2), on
    ``dataset``, and finished (the last epoch of its run written as its result) unless
    ``allow_unfinished``. ``use`` (e.g. ``"method rnl_ril"``) is named in the message.

    Returns notes on what could not be checked: a format-v1 checkpoint records neither its
    dataset nor whether it finished (it counts as finished when its last epoch was written).

    Raises:
        rnl_fast.train.CheckpointMismatchError: one line naming the file and the mismatch.
    """
    notes = []
    purpose = f" ({use})" if use else ""
    if stage is not None and state.get("stage") != stage:
        hint = f": train stage 2 --from {path} first" if stage == 2 and state.get("stage") == 1 else ""
        raise train.CheckpointMismatchError(
            f"checkpoint {path} is from stage {state.get('stage')}, a stage-{stage} checkpoint is needed{purpose}{hint}"
        )
    recorded = state.get("data", {}).get("dataset")
    if dataset is not None and recorded is not None and recorded != dataset:
        raise train.CheckpointMismatchError(
            f"checkpoint {path} was trained on {recorded}, not {dataset} (give --dataset {recorded})"
        )
    finished = state.get("finished")
    if finished is None:
        finished = state.get("epoch") == state.get("epochs")
        notes.append(
            f"checkpoint {path} ({state.get('format')}) does not record its dataset or whether it finished; "
            "neither was checked"
        )
    if not finished and not allow_unfinished:
        raise train.CheckpointMismatchError(
            f"checkpoint {path} is an unfinished run (epoch {state.get('epoch')} of {state.get('epochs')}): "
            "finish it with train --resume, or allow it explicitly (--allow-unfinished)"
        )
    return notes


def model_kwargs(activation: str, dataset: data.ImageDataset) -> dict:
    """The builder arguments of a network for ``dataset``'s images and classes."""
    return dict(
        activation=activation,
        in_channels=dataset.in_channels,
        num_classes=dataset.num_classes,
        input_size=dataset.image_size,
    )


@dataclass(frozen=True)
class TrainingPlan:
    """How :func:`train_paper_networks` trains; the defaults are the demo's."""

    model_name: str = "cnn7"
    #: Stage-1 epochs of each network (ReLU and Rate Norm).
    epochs: int = 4
    #: Stage-2 epochs (the p's, with the Rate Inference Loss).
    stage2_epochs: int = 3
    #: λ of the Rate Inference Loss; the paper's Algorithm 1 uses 0.5.
    lam: float = train.PAPER_LAMBDA
    #: Validation accuracy points stage 2 may lose for a lower Ω.
    tolerance: float = 1.0
    #: One p shared by all layers in stage 2, as the paper's appendix does.
    shared_p: bool = True
    #: How often per stage-2 epoch the state is measured and considered for keeping.
    checks_per_epoch: int = 20
    #: Stage 1's learning-rate multiplier for the readout of the Rate Norm network.
    readout_lr_scale: float = train.READOUT_LR_SCALE
    #: Initial weights (the ReLU and the Rate Norm network start from the same ones) and shuffling.
    seed: int = 0
    #: Quantization levels L of the QCFS network and of the quantized Rate Norm network.
    levels: int = QCFS_LEVELS


def _train_stage1(
    name: str, kwargs: dict, experiment: ExperimentData, plan: TrainingPlan, out: Path, common: dict
) -> nn.Module:
    """Build ``plan.model_name`` with ``kwargs`` from ``plan.seed``'s initial weights and run stage 1;
    the checkpoint goes to ``out/{name}.pt``."""
    net = models.build_model(plan.model_name, seed=plan.seed, **kwargs)
    train.train_stage1(
        net,
        experiment.train,
        epochs=plan.epochs,
        val_loader=experiment.val,
        readout_lr_scale=plan.readout_lr_scale,
        checkpoint_path=out / f"{name}.pt",
        model_name=plan.model_name,
        model_kwargs=kwargs,
        data_info={"dataset": experiment.test_set.name},
        **common,
    )
    return net


def _train_stage2(
    source: str, name: str, kwargs: dict, experiment: ExperimentData, plan: TrainingPlan, out: Path, common: dict
) -> nn.Module:
    """Stage 2 (the Rate Inference Loss) on the stage-1 checkpoint ``out/{source}.pt``; the result
    goes to ``out/{name}.pt``, recorded as built with ``kwargs`` and ``plan.shared_p``."""
    net = train.model_from_checkpoint(out / f"{source}.pt", common["device"])
    train.train_stage2(
        net,
        experiment.train,
        experiment.val,
        epochs=plan.stage2_epochs,
        lam=plan.lam,
        tolerance=plan.tolerance,
        shared_p=plan.shared_p,
        checks_per_epoch=plan.checks_per_epoch,
        checkpoint_path=out / f"{name}.pt",
        model_name=plan.model_name,
        model_kwargs={**kwargs, "shared_p": plan.shared_p},
        data_info={"dataset": experiment.test_set.name},
        **common,
    )
    return net


def train_paper_networks(
    experiment: ExperimentData,
    plan: TrainingPlan,
    out: Path,
    device: torch.device | str = "cpu",
    log: Log = _silent,
) -> dict[str, nn.Module]:
    """Train what the paper compares: ``plan.model_name`` with ReLU and with Rate Norm Layers
    (stage 1, from the same initial weights), then the Rate Norm network's thresholds with the
    Rate Inference Loss (stage 2). Checkpoints go to ``out/{relu,rnl,rnl_ril}.pt``. Returns the
    networks by their source name: ``"relu"``, ``"rnl"``, ``"rnl_ril"`` (see
    :data:`SOURCE_OF_METHOD`)."""
    common = dict(device=device, seed=plan.seed, generator=experiment.generator, progress=True)
    nets: dict[str, nn.Module] = {}
    for activation in ("relu", "rnl"):
        log(f"\n[stage 1] training {plan.model_name} with {activation.upper()} activations")
        kwargs = model_kwargs(activation, experiment.test_set)
        nets[activation] = _train_stage1(activation, kwargs, experiment, plan, out, common)
    p_kind = "one p shared by all layers" if plan.shared_p else "one p per layer"
    log(f"\n[stage 2] training the thresholds with the Rate Inference Loss (λ = {plan.lam}, {p_kind})")
    kwargs = model_kwargs("rnl", experiment.test_set)
    nets["rnl_ril"] = _train_stage2("rnl", "rnl_ril", kwargs, experiment, plan, out, common)
    return nets


def train_latency_networks(
    experiment: ExperimentData,
    plan: TrainingPlan,
    out: Path,
    device: torch.device | str = "cpu",
    log: Log = _silent,
) -> dict[str, nn.Module]:
    """Train the networks of the two quantized methods, from the same initial weights as
    :func:`train_paper_networks`: ``plan.model_name`` with QCFS layers (``plan.levels`` levels,
    trainable clipping bounds, one stage with the weights: Bu et al. 2022), and with Rate Norm
    Layers whose rates are quantized to ``plan.levels`` levels (stage 1), then that network's
    thresholds with the Rate Inference Loss (stage 2, as the paper's). Checkpoints go to
    ``out/{qcfs,rnl_q,rnl_qcfs}.pt``. Returns ``{"qcfs": ..., "rnl_qcfs": ...}`` (see
    :data:`SOURCE_OF_METHOD`)."""
    common = dict(device=device, seed=plan.seed, generator=experiment.generator, progress=True)
    nets: dict[str, nn.Module] = {}
    for source, activation in (("qcfs", "qcfs"), ("rnl_q", "rnl")):
        what = "QCFS layers" if activation == "qcfs" else "Rate Norm Layers with quantized rates"
        log(f"\n[stage 1] training {plan.model_name} with {what} (L = {plan.levels})")
        kwargs = {**model_kwargs(activation, experiment.test_set), "levels": plan.levels}
        nets[source] = _train_stage1(source, kwargs, experiment, plan, out, common)
    log(f"\n[stage 2] training the quantized network's thresholds with the Rate Inference Loss (λ = {plan.lam})")
    kwargs = {**model_kwargs("rnl", experiment.test_set), "levels": plan.levels}
    nets["rnl_qcfs"] = _train_stage2("rnl_q", "rnl_qcfs", kwargs, experiment, plan, out, common)
    return {"qcfs": nets["qcfs"], "rnl_qcfs": nets["rnl_qcfs"]}


def activation_levels(model: nn.Module) -> int | None:
    """The quantization levels L of ``model``'s QCFS or quantized Rate Norm layers (the largest
    if they differ); None when no activation is quantized."""
    levels = [m.levels for m in model.modules() if isinstance(m, (QCFS, RateNorm)) and m.levels is not None]
    return max(levels) if levels else None


def evaluate_method(
    model: nn.Module,
    method: str | MethodVariant,
    T: int,
    test_loader: data.ArrayLoader,
    calibration: data.ArrayLoader | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> report.MethodResult:
    """Convert ``model`` by ``method`` (a name, or a :class:`~rnl_fast.conversion.MethodVariant`
    with its ``v_init`` and ``channel_wise``), simulate it for T steps on ``test_loader``, and
    measure the ANN's accuracy and Ω beside the SNN's accuracy, spikes and K curves per step. The
    result records the method and its settings (and the network's quantization levels)."""
    variant = method if isinstance(method, MethodVariant) else MethodVariant(method)
    snn = convert(
        model,
        variant.method,
        calibration=calibration,
        device=device,
        calibration_batches=CALIBRATION_BATCHES,
        v_init=variant.v_init,
        channel_wise=variant.channel_wise,
    )
    sim = simulate(snn, test_loader, T, ann=model, device=device, progress=progress)
    ann_accuracy = train.evaluate_ann(model, test_loader, device)
    return report.MethodResult.from_simulation(
        ann_accuracy,
        mean_omega(snn, model, test_loader, device),
        sim,
        method=variant.method,
        v_init=variant.v_init,
        channel_wise=variant.channel_wise,
        levels=activation_levels(model),
    )


def latency_variants(
    methods: Iterable[str], v_init: float | str = "half", channel_wise: bool = True
) -> list[MethodVariant]:
    """The latency variants run beside the methods as they are: each calibrated method of
    ``methods`` (MaxNorm, RobustNorm) with ``v_init`` and ``channel_wise``, and RNL+RIL with
    ``v_init`` (channel-wise Rate Norm needs a network trained for it). Variants that would only
    repeat a method's default settings are left out."""
    variants = [MethodVariant(m, v_init, channel_wise) for m in CALIBRATED_METHODS if m in methods]
    if "rnl_ril" in methods:
        variants.append(MethodVariant("rnl_ril", v_init))
    return [v for v in variants if not v.uses_defaults]


def compare(
    sources: Mapping[str | MethodVariant, nn.Module],
    T: int,
    test_loader: data.ArrayLoader,
    calibration: data.ArrayLoader | None,
    device: torch.device | str = "cpu",
    log: Log = _silent,
) -> dict[str, report.MethodResult]:
    """:func:`evaluate_method` for each (method or variant → network) of ``sources``, in order;
    the results are keyed by the variant's label (the method's name for the paper's settings)."""
    results = {}
    for method, model in sources.items():
        variant = method if isinstance(method, MethodVariant) else MethodVariant(method)
        log(f"\n[convert + simulate] {variant.label}, T = {T}")
        results[variant.label] = evaluate_method(model.eval(), variant, T, test_loader, calibration, device)
    return results


def sources_with_variants(
    nets: Mapping[str, nn.Module], v_init: float | str = "half", channel_wise: bool = True
) -> dict[MethodVariant, nn.Module]:
    """What ``compare`` and the demo run: each method whose network (by source name,
    :data:`SOURCE_OF_METHOD`) is in ``nets`` (the paper's four, then QCFS and RNL-QCFS with their
    own defaults, from θ/2), then the :func:`latency_variants` of the paper's."""
    methods = [method for method, source in SOURCE_OF_METHOD.items() if source in nets]
    sources = {MethodVariant(method): nets[SOURCE_OF_METHOD[method]] for method in methods}
    for variant in latency_variants(methods, v_init, channel_wise):
        sources[variant] = nets[SOURCE_OF_METHOD[variant.method]]
    return sources


def write_report(
    out: Path,
    dataset: str,
    model_name: str,
    T: int,
    images: int,
    results: Mapping[str, report.MethodResult],
    verdict: list[str] | None = None,
) -> list[Path]:
    """Write ``results.json`` (with the ``verdict`` sentences, :func:`rnl_fast.report.verdict`)
    and the three figures into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model_name} on {dataset}, {images} test images"
    paths = [out / name for name in ("results.json", "accuracy_vs_T.png", "k_curves.png", "power_per_step.png")]
    report.write_results(paths[0], dataset, model_name, T, images, dict(results), verdict)
    report.plot_accuracy(results, paths[1], title)
    report.plot_k_curves(results, paths[2], title)
    report.plot_power(results, paths[3], title)
    return paths
