"""``rnl-fast``: train, evaluate and demo from the command line (the face: thin on purpose).

    rnl-fast train --stage 1 --model cnn7 --dataset mnist --epochs 4 --out runs/rnl.pt
    rnl-fast train --stage 1 --activation relu --out runs/relu.pt
    rnl-fast train --stage 1 --activation qcfs --levels 8 --out runs/qcfs.pt
    rnl-fast train --stage 2 --from runs/rnl.pt --lam 0.1 --tolerance 1 --out runs/rnl_ril.pt
    rnl-fast evaluate --checkpoint runs/rnl_ril.pt --method rnl_ril -T 256
    rnl-fast evaluate --checkpoint runs/relu.pt --method robustnorm --channel-wise --v-init half -T 32
    rnl-fast compare --relu runs/relu.pt --rnl-ril runs/rnl_ril.pt --qcfs runs/qcfs.pt -T 256 --out runs/table
    rnl-fast demo --out demo_out

Each command parses its arguments and calls the Python API (:mod:`rnl_fast.pipeline`,
:mod:`rnl_fast.train`). Errors a user can cause (unknown model, missing dataset, bad numbers, unreadable checkpoint)
end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import data, models, pipeline, report, train
from .conversion import METHODS, ConversionError, MethodVariant, initial_fraction
from .nn import QCFS_LEVELS
from .simulation import reuse_freed_memory


def _number(parse, accept, expected: str):
    """An argparse ``type`` reading a number with ``parse`` and keeping it if ``accept(value)``;
    anything else is answered "expected <expected>, got '<text>'" (argparse's own message would
    name this function)."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive finite number")
_non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
_int = _number(int, lambda v: True, "an integer")
_float = _number(float, lambda v: True, "a number")


def _v_init(text: str) -> float:
    """``--v-init``: 0, half or a fraction in [0, 1) (the conversion's own check and message)."""
    try:
        value: float | str = float(text)
    except ValueError:
        value = text
    try:
        return initial_fraction(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _device(text: str) -> torch.device:
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda requested but no CUDA device is available")
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda, got {text!r}")
    return torch.device(text)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="mnist",
        choices=data.DATASETS,
        help="mnist is embedded, synthetic generated, the others read from local files (nothing is downloaded)",
    )
    p.add_argument(
        "--data-dir", default=None, help="directory with the dataset files (CIFAR python batches, IDX files)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=128, help="images per batch")
    p.add_argument("--device", type=_device, default=torch.device("cpu"), help="cpu or cuda")
    p.add_argument("--seed", type=_int, default=0, help="seed of the data subsets, shuffling and training")
    p.add_argument("--train-images", type=_positive_int, default=None, help="use a random subset of the training set")
    p.add_argument("--test-images", type=_positive_int, default=None, help="use a random subset of the test set")


def _add_method_arguments(p: argparse.ArgumentParser, tolerance: float) -> None:
    """The training choices of the method (stage 1's readout, stage 2's loss and p's)."""
    p.add_argument(
        "--readout-lr-scale",
        type=_positive_float,
        default=train.READOUT_LR_SCALE,
        help="stage 1: learning-rate multiplier of the layer that reads Rate Norm rates into the output",
    )
    p.add_argument(
        "--lam",
        type=_non_negative_float,
        default=train.PAPER_LAMBDA,
        help="stage 2: λ of the Rate Inference Loss (the paper's Algorithm 1: 0.5; the official code: 0.1)",
    )
    p.add_argument(
        "--tolerance",
        type=_non_negative_float,
        default=tolerance,
        help="stage 2: validation accuracy points it may lose",
    )
    p.add_argument(
        "--checks-per-epoch",
        type=_positive_int,
        default=20,
        help="stage 2: how often per epoch the state is measured and considered for keeping",
    )
    p.add_argument(
        "--shared-p",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stage 2: one p shared by all layers (the paper's appendix), or one per layer (--no-shared-p)",
    )


def _add_latency_arguments(p: argparse.ArgumentParser, variants: bool) -> None:
    """``--v-init`` and ``--channel-wise``: of the method (evaluate), or of the latency variants
    run beside the paper's four methods (compare, demo; on by default there)."""
    if variants:
        v_help = "initial membrane of the latency variants, as a fraction of θ: 0, half or a number in [0, 1)"
        cw_help = "channel-wise thresholds in the MaxNorm/RobustNorm latency variants (--no-channel-wise: per layer)"
    else:
        v_help = (
            "initial membrane as a fraction of the threshold θ: 0, half (θ/2) or a number in [0, 1); "
            "None: the method's (0 as the paper for its four methods, half for qcfs and rnl_qcfs)"
        )
        cw_help = "one threshold per channel (MaxNorm, RobustNorm; Rate Norm needs RateNorm(channel_wise=True))"
    p.add_argument("--v-init", dest="v_init", type=_v_init, default=0.5 if variants else None, help=v_help)
    p.add_argument(
        "--channel-wise", action=argparse.BooleanOptionalAction, default=variants, dest="channel_wise", help=cw_help
    )


def _add_unfinished_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="accept checkpoints of runs that have not finished their epochs (default: refuse)",
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is none to show (None, required)
    or the help already says it in words ("default: refuse")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that shows every option's default in --help and answers a bad argument with one
    line (no usage block) and exit status 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnl-fast", description="ANN→SNN conversion with Rate Norm Layers (Ding et al. 2021)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = commands.add_parser("train", help="stage 1 (weights) or stage 2 (thresholds, with the Rate Inference Loss)")
    t.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1: the weights; 2: the thresholds (p)")
    t.add_argument("--model", default="cnn7", choices=tuple(models.MODELS), help="stage 1 only")
    t.add_argument(
        "--activation",
        default="rnl",
        choices=models.ACTIVATIONS,
        help="stage 1 only; relu trains a baseline, qcfs a QCFS network (Bu et al. 2022)",
    )
    t.add_argument(
        "--levels",
        type=_positive_int,
        default=None,
        help="stage 1 only: quantization levels L of qcfs (None: 8) or of the Rate Norm rates (None: not quantized)",
    )
    t.add_argument("--from", dest="source", default=None, help="stage 2: the stage-1 checkpoint to start from")
    t.add_argument("--epochs", type=_non_negative_int, default=4, help="training epochs")
    t.add_argument("--lr", type=_float, default=None, help="None: 0.1 (stage 1), 0.01 (stage 2)")
    _add_method_arguments(t, tolerance=0.5)
    existing = t.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", action="store_true", help="continue the run in --out if it exists (same settings required)"
    )
    existing.add_argument("--force", action="store_true", help="overwrite --out if it exists (default: refuse)")
    t.add_argument("--out", required=True, help="checkpoint file to write")
    _add_data_arguments(t)

    e = commands.add_parser(
        "evaluate", help="convert a checkpoint, simulate it and report accuracy, K curves and energy"
    )
    e.add_argument("--checkpoint", required=True, help="the checkpoint written by rnl-fast train")
    e.add_argument("--method", choices=METHODS, required=True, help="the conversion method")
    e.add_argument("-T", "--steps", dest="T", type=_positive_int, default=256, help="simulation time steps")
    e.add_argument("--out", default=None, help="directory for results.json and figures")
    _add_unfinished_argument(e)
    _add_latency_arguments(e, variants=False)
    _add_data_arguments(e)

    c = commands.add_parser("compare", help="convert and simulate the baselines and RNL/RNL+RIL side by side (Table 2)")
    c.add_argument("--relu", help="stage-1 checkpoint of the ReLU network (MaxNorm, RobustNorm)")
    c.add_argument("--rnl", help="stage-1 checkpoint of the Rate Norm network")
    c.add_argument("--rnl-ril", dest="rnl_ril", help="stage-2 checkpoint (after the Rate Inference Loss)")
    c.add_argument("--qcfs", help="checkpoint of the QCFS network (train --activation qcfs)")
    c.add_argument(
        "--rnl-qcfs", dest="rnl_qcfs", help="stage-2 checkpoint of a Rate Norm network trained with --levels"
    )
    c.add_argument("-T", "--steps", dest="T", type=_positive_int, default=256, help="simulation time steps")
    c.add_argument("--out", default=None, help="directory for results.json and figures")
    _add_unfinished_argument(c)
    _add_latency_arguments(c, variants=True)
    _add_data_arguments(c)

    d = commands.add_parser(
        "demo",
        help="the whole pipeline on MNIST with cnn7: train, convert 4 ways and the latency variants, simulate, report",
    )
    d.add_argument("--out", default="rnl_fast_demo", help="directory for results.json and the figures")
    d.add_argument("--model", default="cnn7", choices=tuple(models.MODELS), help="the network to train and convert")
    d.add_argument("--epochs", type=_positive_int, default=4, help="stage-1 epochs of each network")
    d.add_argument("--stage2-epochs", type=_positive_int, default=3, help="stage-2 epochs (the thresholds)")
    d.add_argument(
        "--qcfs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train and convert the QCFS network and the Rate Norm network with quantized rates (rnl_qcfs)",
    )
    d.add_argument("--levels", type=_positive_int, default=QCFS_LEVELS, help="quantization levels L of those two")
    _add_method_arguments(d, tolerance=1.0)
    d.add_argument("-T", "--steps", dest="T", type=_positive_int, default=256, help="simulation time steps")
    d.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI): small subsets, 1 epoch, T=32")
    _add_latency_arguments(d, variants=True)
    _add_data_arguments(d)
    d.set_defaults(test_images=1000)
    return parser


# ─── commands ───────────────────────────────────────────────────────────────────────────────


def _experiment(args, with_training: bool = True) -> pipeline.ExperimentData:
    return pipeline.prepare_data(
        args.dataset,
        args.batch_size,
        args.seed,
        args.data_dir,
        args.train_images,
        args.test_images,
        with_training,
        rank=getattr(args, "rank", 0),
        world_size=getattr(args, "world_size", 1),
    )


def _print_table(results: dict, model_name: str, experiment: pipeline.ExperimentData) -> list[str]:
    """Print Table 2 and the verdict under it, an ANN unfit to rank named before any figure;
    returns the verdict's sentences."""
    dataset = experiment.test_set.name
    chance = 100.0 / experiment.test_set.num_classes
    unfit = report.unfit_anns(results, chance)
    sentences = report.verdict(results, chance=chance)
    print(f"\nAccuracy (%) of the converted SNNs after T steps (the paper's Table 2), {model_name} on {dataset}:")
    for sentence in sentences[: len(unfit)]:
        print(f"WARNING: {sentence}")
    print("\n" + report.paper_table(results, unranked=unfit))
    print("\n" + "\n".join(sentences[len(unfit) :]))
    return sentences


def _checked(state: dict, path: str, args, stage: int, use: str) -> dict:
    """``state`` after :func:`rnl_fast.pipeline.check_checkpoint` for ``use`` on ``args.dataset``
    (its notes on stderr)."""
    allow = getattr(args, "allow_unfinished", False)
    for note in pipeline.check_checkpoint(
        state, path, stage=stage, dataset=args.dataset, allow_unfinished=allow, use=use
    ):
        print(f"rnl-fast {args.command}: note: {note}", file=sys.stderr)
    return state


def _write_report(out: Path, args, model_name: str, images: int, results: dict, verdict: list[str]) -> None:
    paths = pipeline.write_report(out, args.dataset, model_name, args.T, images, results, verdict)
    print(f"\nwrote {paths[0]}, " + ", ".join(path.name for path in paths[1:]))


def cmd_train(args) -> None:
    """Stage 1 or 2. Under ``torchrun --nproc_per_node=N -m rnl_fast.cli train ...`` every rank
    trains its share of the data with DDP (gloo on CPU, nccl on GPU; rnl_fast.train)."""
    args.rank, args.world_size, device = train.setup_distributed()
    if args.world_size > 1:
        args.device = device
    try:
        _train(args)
    finally:
        train.cleanup_distributed()


def _train(args) -> None:
    if args.stage == 2 and args.source is None:
        raise ValueError("stage 2 needs --from <stage-1 checkpoint>")
    if Path(args.out).exists() and not (args.resume or args.force):
        raise ValueError(f"{args.out} exists: --resume continues its run, --force overwrites it")
    source = None
    if args.stage == 2:  # checked before any data is loaded
        source = _checked(train.load_checkpoint(args.source), args.source, args, 1, "stage 2 --from")
    experiment = _experiment(args)
    data_info = {
        "dataset": args.dataset,
        "train_images": args.train_images,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    common = dict(
        data_info=data_info,
        device=args.device,
        seed=args.seed,
        generator=experiment.generator,
        checkpoint_path=args.out,
        resume=args.resume,
        progress=args.rank == 0,
    )
    if args.stage == 1:
        kwargs = pipeline.model_kwargs(args.activation, experiment.test_set)
        if args.levels is not None:
            kwargs["levels"] = args.levels
        model = models.build_model(args.model, seed=args.seed, **kwargs)
        history = train.train_stage1(
            model,
            experiment.train,
            epochs=args.epochs,
            val_loader=experiment.val,
            lr=args.lr or 0.1,
            readout_lr_scale=args.readout_lr_scale,
            model_name=args.model,
            model_kwargs=kwargs,
            **common,
        )
    else:
        model = train.model_from_state(source, args.device, source=args.source)
        kwargs = {**source.get("model_kwargs", {}), **({"shared_p": True} if args.shared_p else {})}
        history = train.train_stage2(
            model,
            experiment.train,
            experiment.val,
            epochs=args.epochs,
            lam=args.lam,
            tolerance=args.tolerance,
            shared_p=args.shared_p,
            checks_per_epoch=args.checks_per_epoch,
            lr=args.lr or 0.01,
            model_name=source.get("model_name"),
            model_kwargs=kwargs,
            **common,
        )
    last = {key: value for key, value in (history[-1] if history else {}).items() if key != "checks"}
    if args.rank == 0:
        print(json.dumps({"checkpoint": args.out, "last_epoch": last}, default=float))


def cmd_evaluate(args) -> None:
    state = train.load_checkpoint(args.checkpoint)
    stage = pipeline.STAGE_OF_METHOD[args.method]
    _checked(state, args.checkpoint, args, stage, f"method {args.method}")
    model = train.model_from_state(state, args.device, source=args.checkpoint)
    model_name = state.get("model_name", "model")
    experiment = _experiment(args, with_training=args.method in pipeline.CALIBRATED_METHODS)
    variant = MethodVariant(args.method, args.v_init, args.channel_wise)
    result = pipeline.evaluate_method(model, variant, args.T, experiment.test, experiment.train, args.device)
    results = {variant.label: result}
    verdict = _print_table(results, model_name, experiment)
    if args.out:
        _write_report(Path(args.out), args, model_name, len(experiment.test_set), results, verdict)


def cmd_demo(args) -> None:
    started = time.perf_counter()
    if args.tiny:
        args.train_images, args.test_images, args.T = args.train_images or 3000, 200, min(args.T, 32)
        args.epochs = args.stage2_epochs = 1
    model_name = args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    experiment = _experiment(args)
    images = len(experiment.test_set)
    print(
        f"rnl-fast demo: {model_name} on {args.dataset} ({images} test images), "
        f"{args.epochs} + {args.stage2_epochs} epochs, T = {args.T}"
    )
    plan = pipeline.TrainingPlan(
        model_name=model_name,
        epochs=args.epochs,
        stage2_epochs=args.stage2_epochs,
        lam=args.lam,
        tolerance=args.tolerance,
        shared_p=args.shared_p,
        checks_per_epoch=args.checks_per_epoch,
        readout_lr_scale=args.readout_lr_scale,
        seed=args.seed,
        levels=args.levels,
    )
    nets = pipeline.train_paper_networks(experiment, plan, out, args.device, log=print)
    if args.qcfs:
        nets.update(pipeline.train_latency_networks(experiment, plan, out, args.device, log=print))
    sources = pipeline.sources_with_variants(nets, args.v_init, args.channel_wise)
    results = pipeline.compare(sources, args.T, experiment.test, experiment.train, args.device, log=print)
    verdict = _print_table(results, model_name, experiment)
    _write_report(out, args, model_name, images, results, verdict)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")


def cmd_compare(args) -> None:
    checkpoints = {
        "relu": args.relu,
        "rnl": args.rnl,
        "rnl_ril": args.rnl_ril,
        "qcfs": args.qcfs,
        "rnl_qcfs": args.rnl_qcfs,
    }
    given = {kind: path for kind, path in checkpoints.items() if path}
    if not given:
        raise ValueError("give at least one of --relu, --rnl, --rnl-ril, --qcfs, --rnl-qcfs")
    states = {}
    for kind, path in given.items():
        method = next(m for m, source in pipeline.SOURCE_OF_METHOD.items() if source == kind)
        stage = pipeline.STAGE_OF_METHOD[method]
        states[kind] = _checked(train.load_checkpoint(path), path, args, stage, f"--{kind.replace('_', '-')}")
    nets = {kind: train.model_from_state(state, args.device, source=given[kind]) for kind, state in states.items()}
    model_name = next(iter(states.values())).get("model_name", "model")
    sources = pipeline.sources_with_variants(nets, args.v_init, args.channel_wise)
    experiment = _experiment(args)
    results = pipeline.compare(sources, args.T, experiment.test, experiment.train, args.device, log=print)
    verdict = _print_table(results, model_name, experiment)
    if args.out:
        _write_report(Path(args.out), args, model_name, len(experiment.test_set), results, verdict)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_freed_memory()  # training and simulation allocate the same large tensors again and again
    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "compare": cmd_compare, "demo": cmd_demo}
    try:
        handlers[args.command](args)
    except (data.DatasetNotFoundError, train.CheckpointError, ConversionError, ValueError, FileNotFoundError) as error:
        print(f"rnl-fast {args.command}: error: {error}".splitlines()[0], file=sys.stderr)
        return 2
    except train.TrainingInterrupted as interrupt:
        if getattr(args, "rank", 0) == 0:
            print(f"rnl-fast {args.command}: {interrupt.describe('the same command and --resume')}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"rnl-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
