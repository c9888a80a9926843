"""``rnl-fast``: train, evaluate and demo from the command line (the face: thin on purpose).

    rnl-fast train --stage 1 --model cnn7 --dataset mnist --epochs 4 --out runs/rnl.pt
    rnl-fast train --stage 1 --activation relu --out runs/relu.pt
    rnl-fast train --stage 2 --from runs/rnl.pt --lam 0.1 --tolerance 1 --out runs/rnl_ril.pt
    rnl-fast evaluate --checkpoint runs/rnl_ril.pt --method rnl_ril -T 256
    rnl-fast compare --relu runs/relu.pt --rnl runs/rnl.pt --rnl-ril runs/rnl_ril.pt -T 256 --out runs/table
    rnl-fast demo --out demo_out

Errors a user can cause (unknown model, missing dataset, bad numbers, unreadable checkpoint)
end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import data, models, report, train
from .conversion import METHODS, ConversionError, convert
from .simulation import SimulationResult, mean_omega, reuse_freed_memory, simulate

#: Validation images held out of the training set (stage 2 selects its checkpoint on them).
VAL_FRACTION = 1 / 12


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _device(text: str) -> torch.device:
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda requested but no CUDA device is available")
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda, got {text!r}")
    return torch.device(text)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", choices=data.DATASETS, help="default: mnist (embedded)")
    p.add_argument("--data-dir", default=None, help="directory with the dataset files (CIFAR python batches, IDX files)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--device", type=_device, default=torch.device("cpu"), help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=_positive_int, default=None, help="use a random subset of the training set")
    p.add_argument("--test-images", type=_positive_int, default=None, help="use a random subset of the test set")


class _Parser(argparse.ArgumentParser):
    """argparse that answers a bad argument with one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnl-fast", description="ANN→SNN conversion with Rate Norm Layers (Ding et al. 2021)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = commands.add_parser("train", help="stage 1 (weights) or stage 2 (thresholds, with the Rate Inference Loss)")
    t.add_argument("--stage", type=int, choices=(1, 2), default=1)
    t.add_argument("--model", default="cnn7", choices=tuple(models.MODELS), help="stage 1 only")
    t.add_argument("--activation", default="rnl", choices=("rnl", "relu"), help="stage 1 only; relu trains a baseline")
    t.add_argument("--from", dest="source", default=None, help="stage 2: the stage-1 checkpoint to start from")
    t.add_argument("--epochs", type=_non_negative_int, default=4)
    t.add_argument("--lr", type=float, default=None, help="default: 0.1 (stage 1), 0.01 (stage 2)")
    t.add_argument("--lam", type=_non_negative_float, default=0.1, help="λ of the Rate Inference Loss (stage 2)")
    t.add_argument("--tolerance", type=_non_negative_float, default=0.5, help="stage 2: validation accuracy points it may lose")
    t.add_argument("--shared-p", action="store_true", help="stage 2: one p shared by all layers")
    t.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    t.add_argument("--out", required=True, help="checkpoint file to write")
    _add_data_arguments(t)

    e = commands.add_parser("evaluate", help="convert a checkpoint, simulate it and report accuracy, K curves and energy")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--method", choices=METHODS, required=True)
    e.add_argument("-T", "--steps", dest="T", type=_positive_int, default=256)
    e.add_argument("--out", default=None, help="directory for results.json and figures")
    _add_data_arguments(e)

    c = commands.add_parser("compare", help="convert and simulate the baselines and RNL/RNL+RIL side by side (Table 2)")
    c.add_argument("--relu", help="stage-1 checkpoint of the ReLU network (MaxNorm, RobustNorm)")
    c.add_argument("--rnl", help="stage-1 checkpoint of the Rate Norm network")
    c.add_argument("--rnl-ril", dest="rnl_ril", help="stage-2 checkpoint (after the Rate Inference Loss)")
    c.add_argument("-T", "--steps", dest="T", type=_positive_int, default=256)
    c.add_argument("--out", default=None, help="directory for results.json and figures")
    _add_data_arguments(c)

    d = commands.add_parser("demo", help="the whole pipeline on MNIST with cnn7: train, convert 4 ways, simulate, report")
    d.add_argument("--out", default="rnl_fast_demo", help="directory for results.json and the figures")
    d.add_argument("--epochs", type=_positive_int, default=4, help="stage-1 epochs of each network")
    d.add_argument("--stage2-epochs", type=_positive_int, default=3, help="stage-2 epochs (the thresholds)")
    d.add_argument("--lam", type=_non_negative_float, default=0.1, help="λ of the Rate Inference Loss (stage 2)")
    d.add_argument("--tolerance", type=_non_negative_float, default=1.0, help="stage 2: validation accuracy points it may lose")
    d.add_argument("--shared-p", action="store_true", help="stage 2: one p shared by all layers")
    d.add_argument("-T", "--steps", dest="T", type=_positive_int, default=256)
    d.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI): small subsets, 1 epoch, T=32")
    _add_data_arguments(d)
    d.set_defaults(test_images=1000)
    return parser


# ─── shared pieces ───────────────────────────────────────────────────────────────────────────


def _loaders(args, train_split: bool = True):
    """(train, val, test) loaders and the test set; train/val are None when ``train_split`` is
    False. The training loader shuffles with ``args.generator`` (seeded), which the training
    functions checkpoint so that a resumed run is exact."""
    args.generator = torch.Generator().manual_seed(args.seed)
    generator = args.generator
    test = data.load_dataset(args.dataset, "test", args.data_dir)
    if args.test_images:
        test = data.subset(test, min(args.test_images, len(test)), seed=args.seed)
    test_loader = data.make_loader(test, args.batch_size, shuffle=False)
    if not train_split:
        return None, None, test_loader, test
    full = data.load_dataset(args.dataset, "train", args.data_dir)
    if args.train_images:
        full = data.subset(full, min(args.train_images, len(full)), seed=args.seed)
    train_set, val_set = data.train_val_split(full, VAL_FRACTION, seed=args.seed)
    rank, world_size = getattr(args, "rank", 0), getattr(args, "world_size", 1)
    if world_size > 1:  # under torchrun: each rank trains on its own share
        train_set = train.shard(train_set, rank, world_size)
        args.generator.manual_seed(args.seed + rank)
    augment = args.dataset.startswith("cifar")
    train_loader = data.make_loader(train_set, args.batch_size, shuffle=True, augment=augment, generator=generator)
    val_loader = data.make_loader(val_set, args.batch_size, shuffle=False)
    return train_loader, val_loader, test_loader, test


def _model_kwargs(name: str, activation: str, test: data.ImageDataset) -> dict:
    return dict(activation=activation, in_channels=test.in_channels, num_classes=test.num_classes, input_size=test.image_size)


def _evaluate_method(model, method: str, T: int, test_loader, calibration, device, progress: bool = True) -> report.MethodResult:
    snn = convert(model, method, calibration=calibration, device=device, calibration_batches=10)
    sim: SimulationResult = simulate(snn, test_loader, T, ann=model, device=device, progress=progress)
    ann_accuracy = train.evaluate_ann(model, test_loader, device)
    return report.MethodResult.from_simulation(ann_accuracy, mean_omega(snn, model, test_loader, device), sim)


def _write_report(out: Path, args, T: int, images: int, results: dict[str, report.MethodResult]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.model_name} on {args.dataset}, {images} test images"
    report.write_results(out / "results.json", args.dataset, args.model_name, T, images, results)
    report.plot_accuracy(results, out / "accuracy_vs_T.png", title)
    report.plot_k_curves(results, out / "k_curves.png", title)
    report.plot_power(results, out / "power_per_step.png", title)
    print(f"\nwrote {out / 'results.json'}, accuracy_vs_T.png, k_curves.png, power_per_step.png")


# ─── commands ───────────────────────────────────────────────────────────────────────────────


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
    train_loader, val_loader, _test_loader, test = _loaders(args)
    common = dict(device=args.device, seed=args.seed, generator=args.generator, checkpoint_path=args.out,
                  resume=args.resume, progress=args.rank == 0)  # fmt: skip
    if args.stage == 1:
        kwargs = _model_kwargs(args.model, args.activation, test)
        model = models.build_model(args.model, **kwargs)
        history = train.train_stage1(
            model, train_loader, epochs=args.epochs, val_loader=val_loader, lr=args.lr or 0.1,
            model_name=args.model, model_kwargs=kwargs, **common,
        )  # fmt: skip
    else:
        if args.source is None:
            raise ValueError("stage 2 needs --from <stage-1 checkpoint>")
        source = train.load_checkpoint(args.source)
        model = train.model_from_checkpoint(args.source, args.device)
        kwargs = {**source.get("model_kwargs", {}), **({"shared_p": True} if args.shared_p else {})}
        history = train.train_stage2(
            model, train_loader, val_loader, epochs=args.epochs, lam=args.lam, tolerance=args.tolerance,
            shared_p=args.shared_p, lr=args.lr or 0.01, model_name=source.get("model_name"), model_kwargs=kwargs, **common,
        )  # fmt: skip
    last = history[-1] if history else {}
    if args.rank == 0:
        print(json.dumps({"checkpoint": args.out, "last_epoch": last}, default=float))


def cmd_evaluate(args) -> None:
    model = train.model_from_checkpoint(args.checkpoint, args.device)
    state = train.load_checkpoint(args.checkpoint)
    args.model_name = state.get("model_name", "model")
    calibration = None
    if args.method in ("maxnorm", "robustnorm"):
        train_loader, _val, test_loader, test = _loaders(args)
        calibration = train_loader
    else:
        _t, _v, test_loader, test = _loaders(args, train_split=False)
    result = _evaluate_method(model, args.method, args.T, test_loader, calibration, args.device)
    print(report.paper_table({args.method: result}))
    if args.out:
        _write_report(Path(args.out), args, args.T, len(test), {args.method: result})


def cmd_demo(args) -> None:
    started = time.perf_counter()
    if args.tiny:
        args.train_images, args.test_images, args.T = args.train_images or 3000, 200, min(args.T, 32)
        args.epochs = args.stage2_epochs = 1
    args.model_name = "cnn7"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_loader, val_loader, test_loader, test = _loaders(args)
    print(f"rnl-fast demo: cnn7 on {args.dataset} ({len(test)} test images), {args.epochs} + {args.stage2_epochs} epochs, T = {args.T}")
    common = dict(epochs=args.epochs, device=args.device, seed=args.seed, generator=args.generator, progress=True)
    nets = {}
    for activation in ("relu", "rnl"):
        print(f"\n[stage 1] training cnn7 with {activation.upper()} activations")
        kwargs = _model_kwargs("cnn7", activation, test)
        nets[activation] = models.build_model("cnn7", **kwargs)
        train.train_stage1(nets[activation], train_loader, val_loader=val_loader, checkpoint_path=out / f"{activation}.pt",
                           model_name="cnn7", model_kwargs=kwargs, **common)  # fmt: skip
    print(f"\n[stage 2] training the thresholds with the Rate Inference Loss (λ = {args.lam})")
    nets["rnl_ril"] = train.model_from_checkpoint(out / "rnl.pt", args.device)
    train.train_stage2(nets["rnl_ril"], train_loader, val_loader, lam=args.lam, tolerance=args.tolerance,
                       shared_p=args.shared_p, checkpoint_path=out / "rnl_ril.pt",
                       model_name="cnn7", model_kwargs=_model_kwargs("cnn7", "rnl", test),
                       **{**common, "epochs": args.stage2_epochs})  # fmt: skip
    sources = {"maxnorm": nets["relu"], "robustnorm": nets["relu"], "rnl": nets["rnl"], "rnl_ril": nets["rnl_ril"]}
    _compare(sources, args, test_loader, train_loader, len(test), out)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")


def _compare(sources: dict, args, test_loader, calibration, images: int, out: Path | None) -> None:
    """Convert and simulate each (method → ANN), print Table 2, write the report."""
    results = {}
    for method, model in sources.items():
        print(f"\n[convert + simulate] {method}, T = {args.T}")
        results[method] = _evaluate_method(model.eval(), method, args.T, test_loader, calibration, args.device)
    print(f"\nAccuracy (%) of the converted SNNs after T steps (the paper's Table 2), {args.model_name} on {args.dataset}:\n")
    print(report.paper_table(results))
    if out is not None:
        _write_report(out, args, args.T, images, results)


def cmd_compare(args) -> None:
    checkpoints = {"relu": args.relu, "rnl": args.rnl, "rnl_ril": args.rnl_ril}
    given = {kind: path for kind, path in checkpoints.items() if path}
    if not given:
        raise ValueError("give at least one of --relu, --rnl, --rnl-ril")
    nets = {kind: train.model_from_checkpoint(path, args.device) for kind, path in given.items()}
    args.model_name = train.load_checkpoint(next(iter(given.values()))).get("model_name", "model")
    methods = {"maxnorm": "relu", "robustnorm": "relu", "rnl": "rnl", "rnl_ril": "rnl_ril"}
    sources = {method: nets[kind] for method, kind in methods.items() if kind in nets}
    train_loader, _val, test_loader, test = _loaders(args)
    _compare(sources, args, test_loader, train_loader, len(test), Path(args.out) if args.out else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_freed_memory()  # training and simulation allocate the same large tensors again and again
    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "compare": cmd_compare, "demo": cmd_demo}
    try:
        handlers[args.command](args)
    except (data.DatasetNotFoundError, train.CheckpointError, ConversionError, ValueError, FileNotFoundError) as error:
        print(f"rnl-fast {args.command}: error: {error}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rnl-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
