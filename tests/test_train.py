"""Tests of rnl_fast.train: the two stages, checkpoints and resume, determinism, DDP on 2 CPU ranks."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rnl_fast import data, models, train
from rnl_fast.nn import RateNorm
from rnl_fast.train._layers import rate_readouts
from rnl_fast.train.evaluation import accuracy_and_omega

sys.path.insert(0, str(Path(__file__).parent))
from ddp_channel_wise_worker import channel_wise_model  # noqa: E402  (the network of the DDP test)
from ddp_train_worker import tiny_model  # noqa: E402  (the same network in one and two processes)

NUM_CLASSES = 4
IMAGE_SIZE = 8


class _Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of training."""


class _StopAfter:
    """Yields ``loader``'s batches for ``passes`` epochs, then raises :class:`_Interrupted`."""

    def __init__(self, loader: data.ArrayLoader, passes: int) -> None:
        self.loader = loader
        self.passes = passes

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.passes == 0:
            raise _Interrupted
        self.passes -= 1
        yield from self.loader


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waits cost more than the work; restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def splits() -> tuple[data.ImageDataset, data.ImageDataset]:
    dataset = data.make_synthetic(192, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES, noise=0.3)
    return data.train_val_split(dataset, 0.25, seed=0)


def _loaders(splits, seed: int = 0) -> tuple[data.ArrayLoader, data.ArrayLoader, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    train_part, val_part = splits
    return (
        data.make_loader(train_part, 16, shuffle=True, generator=generator),
        data.make_loader(val_part, 64, shuffle=False),
        generator,
    )


def _new_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return tiny_model()


def _stage1(model: nn.Module, splits, epochs: int = 4, **kwargs) -> list[dict]:
    train_loader, val_loader, generator = _loaders(splits)
    kwargs = {"lr": 0.05, "progress": False, **kwargs}
    return train.train_stage1(model, train_loader, epochs=epochs, val_loader=val_loader, generator=generator, **kwargs)


@pytest.fixture(scope="module")
def stage1_model(splits) -> nn.Sequential:
    """The tiny network after stage 1 (copy it before changing it)."""
    model = _new_model()
    _stage1(model, splits)
    return model


def _stage2(model: nn.Module, splits, epochs: int = 3, **kwargs) -> list[dict]:
    train_loader, val_loader, generator = _loaders(splits)
    kwargs = {"lam": 0.5, "tolerance": 5.0, **kwargs}
    return train.train_stage2(
        model, train_loader, val_loader, epochs=epochs, generator=generator, progress=False, **kwargs
    )


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ─────────────────────────────── evaluation ───────────────────────────────


def test_evaluate_ann_counts_and_restores_mode() -> None:
    model = nn.Identity()  # logits = x: the prediction is the hot index
    model.train()
    x = torch.eye(4).repeat(3, 1)  # 12 samples, classes 0..3
    y = torch.arange(4).repeat(3)
    y[:3] = (y[:3] + 1) % 4  # 3 of 12 wrong
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    assert train.evaluate_ann(model, batches) == pytest.approx(75.0)
    assert model.training


# ─────────────────────────────── stage 1 ───────────────────────────────


def test_stage1_lowers_loss_and_freezes_p(splits) -> None:
    model = _new_model()
    raw_before = [m.raw_p.detach().clone() for m in model.modules() if isinstance(m, RateNorm)]
    history = _stage1(model, splits)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_acc"] > 100.0 / NUM_CLASSES + 20
    assert history[-1]["omega"] is not None
    layers = [m for m in model.modules() if isinstance(m, RateNorm)]
    for layer, raw in zip(layers, raw_before):
        assert not layer.raw_p.requires_grad
        assert torch.equal(layer.raw_p.detach(), raw)  # neither gradient nor weight decay moved it
        assert layer.running_max.item() != 1.0  # the running max did learn


def test_stage1_trains_relu_baseline(splits) -> None:
    torch.manual_seed(0)
    model = models.cnn7(activation="relu", input_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
    history = _stage1(model, splits, epochs=2)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["omega"] is None


def test_stage1_learning_rate_schedule(splits) -> None:
    history = _stage1(_new_model(), splits, epochs=4, milestones=(0.5, 0.75), gamma=0.1)
    assert [entry["lr"] for entry in history] == pytest.approx([0.05, 0.05, 0.005, 0.0005])


def test_progress_bar_shows_epoch_figures(splits, capsys: pytest.CaptureFixture[str]) -> None:
    _stage1(_new_model(), splits, epochs=1, progress=True)
    shown = capsys.readouterr().err
    assert "stage 1 epoch 1/1" in shown and "val_acc=" in shown and "loss=" in shown


@pytest.mark.parametrize("name", list(models.MODELS))
def test_readout_is_the_layer_that_reads_rates_into_the_output(name: str) -> None:
    """Only the classifier: hidden convs/linears feed a BatchNorm (or a residual sum)."""
    rnl = models.build_model(name, activation="rnl")
    classifier = [m for m in rnl.modules() if isinstance(m, nn.Linear)][-1]
    assert rate_readouts(rnl) == [classifier]
    assert rate_readouts(models.build_model(name, activation="relu")) == []


def test_readout_of_an_untraceable_model_is_empty() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act, self.fc = RateNorm(), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.act(x)) if x.sum() > 0 else x  # data-dependent control flow

    assert rate_readouts(Untraceable()) == []


def test_stage1_readout_learns_at_a_scaled_rate(splits, monkeypatch: pytest.MonkeyPatch) -> None:
    """The readout's parameters get lr × readout_lr_scale, every other weight lr; ReLU nets one group."""
    seen: list[torch.optim.Optimizer] = []
    real_sgd = torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda *a, **k: seen.append(real_sgd(*a, **k)) or seen[-1])
    model = _new_model()
    _stage1(model, splits, epochs=1, lr=0.05, readout_lr_scale=7.0)
    readout = {id(p) for layer in rate_readouts(model) for p in layer.parameters()}
    assert readout
    (optimizer,) = seen
    rates = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(rates[i] == pytest.approx(0.35) for i in readout)
    assert all(lr == pytest.approx(0.05) for i, lr in rates.items() if i not in readout)
    assert len(rates) == sum(p.requires_grad for p in model.parameters())
    seen.clear()
    relu = models.cnn7("relu", input_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
    _stage1(relu, splits, epochs=1, readout_lr_scale=7.0)
    assert len(seen[0].param_groups) == 1
    with pytest.raises(ValueError, match="readout_lr_scale must be a positive finite float"):
        _stage1(_new_model(), splits, epochs=1, readout_lr_scale=0.0)


def test_build_model_with_a_seed() -> None:
    """Same seed → same weights, the ReLU and RNL builds alike; torch's global generator untouched."""
    state = torch.get_rng_state()
    a = models.build_model("cnn7", seed=3, activation="rnl")
    b = models.build_model("cnn7", seed=3, activation="relu")
    c = models.build_model("cnn7", seed=4, activation="relu")
    assert torch.equal(torch.get_rng_state(), state)
    shared = [name for name in b.state_dict() if name in a.state_dict()]
    assert shared and all(torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in shared)
    assert not torch.equal(b[0].weight, c[0].weight)


# ─────────────────────────────── stage 2 ───────────────────────────────


@pytest.mark.parametrize("shared_p", [True, False], ids=["shared-p", "p-per-layer"])
def test_stage2_trains_only_p_and_lowers_omega(stage1_model, splits, shared_p: bool) -> None:
    model = copy.deepcopy(stage1_model)
    before = _clone_state(model)
    _, val_loader, _ = _loaders(splits)
    reference_acc = train.evaluate_ann(stage1_model, val_loader)
    reference_omega = accuracy_and_omega(stage1_model, val_loader, "cpu")[1]
    tolerance = 5.0
    history = _stage2(model, splits, tolerance=tolerance, shared_p=shared_p)
    after = model.state_dict()
    raw_names = [name for name in before if name.endswith("raw_p")]
    assert raw_names
    for name in before:
        if name in raw_names:
            assert not torch.equal(before[name], after[name]), name
        else:  # weights, BN statistics and running maxima: bit for bit
            assert torch.equal(before[name], after[name]), name
    assert any(entry["selected"] for entry in history)
    acc, omega = accuracy_and_omega(model, val_loader, "cpu")
    assert omega < reference_omega
    assert acc >= reference_acc - tolerance
    assert omega == pytest.approx(min(e["omega"] for e in history if e["selected"]))


def test_stage2_cosine_term_has_gradient_wrt_p(stage1_model, splits) -> None:
    """λ = 0 leaves only 1 − cos(r*, r′): p moves only if r* is a fixed target that r′ can
    approach (a network compared with itself would give a zero gradient)."""
    model = copy.deepcopy(stage1_model)
    history = _stage2(model, splits, epochs=2, lam=0.0, tolerance=100.0, p_init=0.9)
    assert all(entry["train_omega"] > 0 for entry in history)
    assert history[-1]["cos_loss"] < history[0]["cos_loss"]
    # The cosine term pulls p back toward the stage-1 network's p ≈ 1.
    assert all(layer.p.item() > 0.9 for layer in model.modules() if isinstance(layer, RateNorm))


def test_stage2_keeps_stage1_state_when_nothing_is_within_tolerance(stage1_model, splits) -> None:
    """p_init so low that accuracy collapses: no epoch qualifies, the stage-1 state comes back."""
    model = copy.deepcopy(stage1_model)
    history = _stage2(model, splits, epochs=1, p_init=0.01, lr=1e-6, tolerance=0.0)
    assert not any(entry["selected"] for entry in history)
    _assert_states_equal(model.state_dict(), stage1_model.state_dict())


def test_stage2_shared_p_ties_all_layers(stage1_model, splits) -> None:
    model = copy.deepcopy(stage1_model)
    raw_ps = torch.stack([m.raw_p.detach() for m in model.modules() if isinstance(m, RateNorm)])
    assert train.tie_rate_norm_p(copy.deepcopy(model)).item() == pytest.approx(raw_ps.mean().item())
    _stage2(model, splits, shared_p=True)
    layers = [m for m in model.modules() if isinstance(m, RateNorm)]
    assert len({id(layer.raw_p) for layer in layers}) == 1
    assert layers[0].p.item() < 0.999
    # The state dict of a shared-p model loads into one with separate p's: same function.
    unshared = copy.deepcopy(stage1_model)
    unshared.load_state_dict(model.state_dict())
    x = torch.rand(5, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(unshared.eval()(x), model.eval()(x), rtol=0, atol=0)


# ─────────────────────────── checkpoints and resume ───────────────────────────


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.pt"
    train.save_checkpoint(path, epoch=1, weights=torch.arange(3.0))
    real_save = torch.save

    def crash_mid_write(obj: object, file) -> None:
        file.write(b"half a checkpoint")
        raise _Interrupted("killed while writing")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(_Interrupted):
        train.save_checkpoint(path, epoch=2, weights=torch.arange(5.0))
    monkeypatch.setattr(torch, "save", real_save)
    state = train.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"\x00not a checkpoint\xff" * 10, id="garbage"),
        pytest.param(None, id="truncated"),
        pytest.param("foreign", id="foreign-torch-file"),
    ],
)
def test_corrupt_checkpoint_raises_clear_error(tmp_path: Path, content) -> None:
    path = tmp_path / "bad.pt"
    if content is None:
        train.save_checkpoint(path, weights=torch.randn(1000))
        path.write_bytes(path.read_bytes()[:1000])
    elif content == "foreign":
        torch.save({"weights": torch.randn(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(train.CheckpointError) as info:
        train.load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def _realistic_state() -> dict:
    """What a training checkpoint holds, in miniature: weights, optimiser state, history, RNG."""
    torch.manual_seed(0)
    model = tiny_model()
    return {
        "stage": 1,
        "epoch": 1,
        "epochs": 2,
        "model_state": model.state_dict(),
        "big": torch.randn(20_000),
        "history": [{"epoch": 1, "lr": 0.1, "val_acc": 50.0, "omega": None, "checks": []}],
        "rng_states": [{"torch": torch.get_rng_state()}],
        "model_kwargs": {"activation": "rnl", "levels": None},
    }


def _flip(path: Path, offset: int, count: int) -> None:
    content = bytearray(path.read_bytes())
    content[offset : offset + count] = bytes(b ^ 0xFF for b in content[offset : offset + count])
    path.write_bytes(bytes(content))


def test_flipped_bytes_in_the_middle_are_caught(tmp_path: Path) -> None:
    """Issue 13: 400 bytes flipped in the middle of a checkpoint loaded and evaluated at 3 %."""
    path = tmp_path / "run.pt"
    train.save_checkpoint(path, **_realistic_state())
    _flip(path, path.stat().st_size // 2 - 200, 400)
    with pytest.raises(train.CheckpointError) as info:
        train.load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "checksum" in message and "\n" not in message


def test_no_flip_anywhere_loads_as_different_content(tmp_path: Path) -> None:
    """16 bytes flipped at 40 places across the file: each either fails to load with a
    CheckpointError or (zip padding, unused metadata) loads exactly what was saved."""
    clean = tmp_path / "clean.pt"
    saved = _realistic_state()
    train.save_checkpoint(clean, **saved)
    size = clean.stat().st_size
    caught = 0
    for offset in range(0, size - 16, size // 40):
        path = tmp_path / "flipped.pt"
        path.write_bytes(clean.read_bytes())
        _flip(path, offset, 16)
        try:
            state = train.load_checkpoint(path)
        except train.CheckpointError:
            caught += 1
            continue
        assert train.checkpoint.payload_digest(state) == train.checkpoint.payload_digest(saved), offset
    assert caught >= 30


def test_checkpoints_before_checksums_still_load(tmp_path: Path) -> None:
    """Format v1 (no checksum) is read without verification, and says so in its format."""
    path = tmp_path / "v1.pt"
    torch.save({"format": "rnl_fast-checkpoint-v1", **_realistic_state()}, path)
    state = train.load_checkpoint(path)
    assert state["format"] == "rnl_fast-checkpoint-v1" and torch.equal(state["big"], _realistic_state()["big"])


def test_missing_checkpoint_raises_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(train.CheckpointError, match="does not exist"):
        train.load_checkpoint(tmp_path / "absent.pt")


def test_resume_with_corrupt_checkpoint_fails_loudly(tmp_path: Path, splits) -> None:
    path = tmp_path / "run.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(train.CheckpointError, match="run.pt"):
        _stage1(_new_model(), splits, epochs=1, checkpoint_path=path, resume=True)


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_equals_uninterrupted(stage: int, stage1_model, splits, tmp_path: Path) -> None:
    epochs = 3

    def run(model: nn.Module, loader_seed: int, passes: int | None, **kwargs) -> list[dict]:
        train_loader, val_loader, generator = _loaders(splits, seed=loader_seed)
        loader = train_loader if passes is None else _StopAfter(train_loader, passes)
        common = dict(epochs=epochs, generator=generator, progress=False, seed=7, **kwargs)
        if stage == 1:
            # dropout-free model: the torch RNG state matters only through the generator here
            return train.train_stage1(model, loader, val_loader=val_loader, lr=0.05, **common)
        return train.train_stage2(model, loader, val_loader, lam=0.5, tolerance=5.0, **common)

    start = (lambda: _new_model()) if stage == 1 else (lambda: copy.deepcopy(stage1_model))
    uninterrupted = start()
    history = run(uninterrupted, 0, None)

    path = tmp_path / "run.pt"
    with pytest.raises(_Interrupted):
        run(start(), 0, passes=2, checkpoint_path=path)
    assert train.load_checkpoint(path)["epoch"] == 2
    # A different model and a differently seeded generator: everything must come from the file.
    resumed = _new_model(seed=123)
    resumed_history = run(resumed, 999, None, checkpoint_path=path, resume=True)

    _assert_states_equal(resumed.state_dict(), uninterrupted.state_dict())
    assert resumed_history == history
    assert train.load_checkpoint(path)["epoch"] == epochs
    # Resuming a finished run trains nothing and gives back its result.
    again = _new_model(seed=5)
    assert run(again, 0, passes=0, checkpoint_path=path, resume=True) == history
    _assert_states_equal(again.state_dict(), uninterrupted.state_dict())


def test_resume_rejects_other_stage_or_epochs(tmp_path: Path, splits) -> None:
    path = tmp_path / "run.pt"
    _stage1(_new_model(), splits, epochs=1, checkpoint_path=path)
    with pytest.raises(ValueError, match="epochs"):
        _stage1(_new_model(), splits, epochs=2, checkpoint_path=path, resume=True)
    with pytest.raises(ValueError, match="stage 1"):
        _stage2(_new_model(), splits, epochs=1, checkpoint_path=path, resume=True)


@pytest.mark.parametrize(
    "change, difference",
    [
        pytest.param(
            {"model_kwargs": {"activation": "relu"}}, "activation=None, this run has activation='relu'", id="model"
        ),
        pytest.param({"model_name": "vgg"}, "model=None, this run has model='vgg'", id="model-name"),
        pytest.param(
            {"data_info": {"dataset": "synthetic", "train_images": 320}},
            "train_images=640, this run has train_images=320",
            id="train-images",
        ),
        pytest.param({"data_info": {"dataset": "mnist", "train_images": 640}}, "dataset='synthetic'", id="dataset"),
        pytest.param({"lr": 0.1}, "lr=0.05, this run has lr=0.1", id="lr"),
        pytest.param({"readout_lr_scale": 1.0}, "readout_lr_scale=10.0", id="readout"),
    ],
)
def test_resume_rejects_another_run(tmp_path: Path, splits, change: dict, difference: str) -> None:
    """A checkpoint resumes only the run that wrote it: the first difference in model, data or
    settings is named in one line (before, another --train-images was accepted silently and
    another --model/--activation gave a raw state_dict traceback)."""
    path = tmp_path / "run.pt"
    data_info = {"dataset": "synthetic", "train_images": 640}
    _stage1(_new_model(), splits, epochs=1, checkpoint_path=path, data_info=data_info)
    written = path.read_bytes()
    with pytest.raises(train.CheckpointMismatchError) as info:
        _stage1(_new_model(), splits, epochs=1, checkpoint_path=path, resume=True, **{"data_info": data_info, **change})
    message = str(info.value)
    assert f"checkpoint {path} belongs to another run" in message and difference in message, message
    assert "\n" not in message and path.read_bytes() == written  # nothing trained, nothing written


def test_resume_into_a_model_the_weights_do_not_fit(tmp_path: Path, splits) -> None:
    path = tmp_path / "run.pt"
    _stage1(_new_model(), splits, epochs=1, checkpoint_path=path)
    other = nn.Sequential(nn.Conv2d(1, 2, 3), RateNorm(), nn.Flatten(), nn.LazyLinear(NUM_CLASSES))
    with pytest.raises(train.CheckpointMismatchError) as info:
        _stage1(other, splits, epochs=1, checkpoint_path=path, resume=True)
    message = str(info.value)
    assert f"checkpoint {path} does not fit this model" in message and "\n" not in message
    assert "Missing key" in message or "Unexpected key" in message or "size mismatch" in message


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpoint_records_whether_the_run_finished(stage: int, stage1_model, splits, tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    train_loader, val_loader, generator = _loaders(splits)
    common = dict(epochs=2, generator=generator, progress=False, checkpoint_path=path, data_info={"dataset": "x"})

    def run(loader) -> None:
        if stage == 1:
            train.train_stage1(_new_model(), loader, val_loader=val_loader, lr=0.05, **common)
        else:
            train.train_stage2(copy.deepcopy(stage1_model), loader, val_loader, tolerance=5.0, **common)

    with pytest.raises(_Interrupted):
        run(_StopAfter(train_loader, 1))
    state = train.load_checkpoint(path)
    assert (state["epoch"], state["finished"], state["data"]) == (1, False, {"dataset": "x"})
    run(train_loader)
    state = train.load_checkpoint(path)
    assert (state["epoch"], state["finished"]) == (2, True)
    assert state["settings"]["lr"] == (0.05 if stage == 1 else 0.01)


class _CtrlCAfter(_StopAfter):
    """Like :class:`_StopAfter`, with Ctrl-C (KeyboardInterrupt) instead of a crash."""

    def __iter__(self):
        if self.passes == 0:
            raise KeyboardInterrupt
        self.passes -= 1
        yield from self.loader


def test_ctrl_c_reports_what_the_checkpoint_holds(tmp_path: Path, splits) -> None:
    path = tmp_path / "run.pt"
    train_loader, val_loader, generator = _loaders(splits)
    common = dict(epochs=3, val_loader=val_loader, generator=generator, lr=0.05, progress=False)
    with pytest.raises(train.TrainingInterrupted) as info:
        train.train_stage1(_new_model(), _CtrlCAfter(train_loader, 0), checkpoint_path=path, **common)
    assert (info.value.epoch, info.value.saved_epoch) == (1, None) and not path.exists()
    assert "before the first checkpoint: nothing saved" in str(info.value)
    with pytest.raises(KeyboardInterrupt) as info:  # still a KeyboardInterrupt
        train.train_stage1(_new_model(), _CtrlCAfter(train_loader, 2), checkpoint_path=path, **common)
    assert (info.value.epoch, info.value.saved_epoch, info.value.epochs) == (3, 2, 3)
    assert f"{path} holds epoch 2 of 3: rerun with resume=True" in str(info.value)
    with pytest.raises(train.TrainingInterrupted) as info:  # a resumed run holds its start
        train.train_stage1(_new_model(), _CtrlCAfter(train_loader, 0), checkpoint_path=path, resume=True, **common)
    assert (info.value.epoch, info.value.saved_epoch) == (3, 2)


def test_ctrl_c_during_a_checkpoint_write_waits_for_the_file(
    tmp_path: Path, splits, monkeypatch: pytest.MonkeyPatch, ctrl_c_as_in_a_terminal
) -> None:
    """SIGINT arriving while the checkpoint is written: the write completes, then training stops,
    and the report names the epoch just written (not the one before)."""
    import signal

    from rnl_fast.train import loop

    real_save = loop.save_checkpoint

    def save_with_ctrl_c(path, **state) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real_save(path, **state)

    monkeypatch.setattr(loop, "save_checkpoint", save_with_ctrl_c)
    path = tmp_path / "run.pt"
    with pytest.raises(train.TrainingInterrupted) as info:
        _stage1(_new_model(), splits, epochs=3, checkpoint_path=path)
    assert info.value.saved_epoch == 1 and train.load_checkpoint(path)["epoch"] == 1


def test_model_from_checkpoint_rebuilds_the_model(tmp_path: Path, splits) -> None:
    kwargs = {"activation": "rnl", "in_channels": 1, "num_classes": NUM_CLASSES, "input_size": IMAGE_SIZE}
    torch.manual_seed(0)
    model = models.build_model("cnn7", **kwargs)
    path = tmp_path / "cnn7.pt"
    _stage1(model, splits, epochs=1, checkpoint_path=path, model_name="cnn7", model_kwargs=kwargs)
    rebuilt = train.model_from_checkpoint(path)
    x = torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
    from_state = train.model_from_state(train.load_checkpoint(path), "cpu")  # one read for metadata and model
    assert not from_state.training
    _assert_states_equal(from_state.state_dict(), rebuilt.state_dict())


def test_model_from_state_needs_the_model_name(tmp_path: Path, splits) -> None:
    path = tmp_path / "anonymous.pt"
    _stage1(_new_model(), splits, epochs=1, checkpoint_path=path)
    with pytest.raises(train.CheckpointError, match="anonymous.pt has no model_name"):
        train.model_from_checkpoint(path)
    with pytest.raises(train.CheckpointError, match="checkpoint has no model_name"):
        train.model_from_state(train.load_checkpoint(path))


def test_same_seed_same_result(splits) -> None:
    first, second = _new_model(), _new_model()
    assert _stage1(first, splits, epochs=2) == _stage1(second, splits, epochs=2)
    _assert_states_equal(first.state_dict(), second.state_dict())


# ─────────────────────────────── arguments ───────────────────────────────


@pytest.mark.parametrize(
    "stage, kwargs, match",
    [
        pytest.param(1, {"epochs": -1}, "epochs", id="negative-epochs"),
        pytest.param(1, {"epochs": 1, "lr": 0.0}, "lr", id="zero-lr"),
        pytest.param(1, {"epochs": 1, "weight_decay": -1e-4}, "weight_decay", id="negative-decay"),
        pytest.param(1, {"epochs": 1, "milestones": (1.5,)}, "milestones", id="milestone-past-end"),
        pytest.param(2, {"epochs": -2}, "epochs", id="stage2-negative-epochs"),
        pytest.param(2, {"epochs": 1, "lam": -0.1}, "lam", id="negative-lambda"),
        pytest.param(2, {"epochs": 1, "tolerance": -1.0}, "tolerance", id="negative-tolerance"),
        pytest.param(2, {"epochs": 1, "p_init": 1.5}, "p_init", id="p-init-above-1"),
    ],
)
def test_bad_arguments(stage: int, kwargs: dict, match: str) -> None:
    batches = [(torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=match):
        if stage == 1:
            train.train_stage1(_new_model(), batches, progress=False, **kwargs)
        else:
            train.train_stage2(_new_model(), batches, batches, progress=False, **kwargs)


def test_stage2_needs_rate_norm_layers() -> None:
    batches = [(torch.rand(2, 3), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="RateNorm"):
        train.train_stage2(nn.Linear(3, 2), batches, batches, epochs=1, progress=False)


# ─────────────────────────────── data parallel ───────────────────────────────


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_splits_evenly_and_disjointly(world_size: int, splits) -> None:
    train_part, _ = splits
    n = len(train_part)
    indices = torch.arange(n)
    parts = [train.shard(indices, rank, world_size) for rank in range(world_size)]
    assert {len(part) for part in parts} == {n // world_size}
    together = torch.cat(parts)
    assert together.unique().numel() == together.numel() == n - n % world_size
    datasets = [train.shard(train_part, rank, world_size) for rank in range(world_size)]
    for dataset, part in zip(datasets, parts):
        assert torch.equal(dataset.labels, train_part.labels[part])
    subset = train.shard(torch.utils.data.TensorDataset(indices), world_size - 1, world_size)
    assert [subset[i][0].item() for i in range(len(subset))] == parts[-1].tolist()
    assert train.shard(list(range(n)), 0, world_size) == parts[0].tolist()


def test_shard_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        train.shard(list(range(10)), 2, 2)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun_two_ranks(worker_file: str, out_dir: Path) -> list[dict]:
    """Runs ``tests/<worker_file> out_dir`` on 2 CPU ranks (gloo) under torchrun; returns what
    each rank saved to ``out_dir/rank{r}.pt``."""
    worker = Path(__file__).with_name(worker_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(worker),
        str(out_dir),
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ddp_two_ranks(tmp_path: Path) -> None:
    """torchrun, 2 CPU ranks (gloo): identical weights and running maxima on both ranks, the
    running max the MAX over ranks of their local values; only rank 0 checkpoints."""
    ranks = _torchrun_two_ranks("ddp_train_worker.py", tmp_path)
    for key in ("after_stage1", "after_stage2"):
        _assert_states_equal(ranks[0][key], ranks[1][key])
    assert ranks[0]["history1"] == ranks[1]["history1"]
    assert ranks[0]["history2"] == ranks[1]["history2"]

    state1 = ranks[0]["after_stage1"]
    stored = [value for name, value in state1.items() if name.endswith("running_max")]  # module order
    local = [ranks[r]["local_max_stage1"] for r in range(2)]
    for layer, value in enumerate(stored):
        assert torch.equal(value, torch.maximum(local[0][layer], local[1][layer])), layer
    # The first layer sees the raw (×3 on rank 1) inputs: rank 1's larger maximum wins there.
    assert torch.equal(stored[0], local[1][0]) and stored[0] > local[0][0]
    # Stage 2 kept the running maxima and weights, and moved p identically on both ranks.
    for name, value in ranks[0]["after_stage2"].items():
        if not name.endswith("raw_p"):
            assert torch.equal(value, ranks[0]["after_stage1"][name]), name

    checkpoint = train.load_checkpoint(tmp_path / "stage2.pt")
    assert checkpoint["epoch"] == 1 and len(checkpoint["rng_states"]) == 2
    _assert_states_equal(checkpoint["model_state"], ranks[0]["after_stage2"])


def test_ddp_running_max_is_single_process_only_without_batch_norm_before() -> None:
    """What ``all_reduce_running_max`` gives, on two "ranks" simulated in one process (two copies
    of one network, each trained on its share of a global batch) against one process on the whole
    batch (docs/training.md, "Data parallel"):

    - a Rate Norm Layer with no batch statistics before it (tiny_model's first): the MAX over
      ranks of their local updates is exactly the single-process running max;
    - one behind a BatchNorm in train mode (its second; every Rate Norm Layer of cnn7): each rank
      normalises its share by its own statistics, so the MAX over ranks is what the ranks saw, not
      what one process would (issue 13 measured 3.13 against 2.58 on cnn7)."""
    torch.manual_seed(0)
    single = tiny_model().train()
    ranks = [copy.deepcopy(single) for _ in range(2)]
    x = torch.rand(32, 1, IMAGE_SIZE, IMAGE_SIZE)
    x[16:] *= 3.0  # rank 1's share is brighter, as in ddp_train_worker
    with torch.no_grad():
        single(x)
        for rank, model in enumerate(ranks):
            model(x[16 * rank : 16 * (rank + 1)])
    layers = [[m for m in model.modules() if isinstance(m, RateNorm)] for model in (single, *ranks)]
    reduced = [torch.maximum(a.running_max, b.running_max) for a, b in zip(layers[1], layers[2])]
    assert torch.equal(reduced[0], layers[0][0].running_max)
    assert not torch.allclose(reduced[1], layers[0][1].running_max, rtol=1e-3)


def test_ddp_channel_wise_running_max(tmp_path: Path) -> None:
    """torchrun, 2 CPU ranks (gloo), stage 1 with channel-wise Rate Norm Layers beside a
    per-layer one: after every training step each running max is the same on both ranks and is
    what one process would hold after the same step on the global batch (both ranks' shares),
    i.e. per channel the MAX over ranks of their local updates (``all_reduce_running_max``).

    The first layer's channel 0 is won by rank 0 and its channel 1 by rank 1: maxima reduced as
    one scalar per layer, or not reduced, fail here."""
    ranks = _torchrun_two_ranks("ddp_channel_wise_worker.py", tmp_path)
    _assert_states_equal(ranks[0]["state"], ranks[1]["state"])
    final = [value for name, value in ranks[0]["state"].items() if name.endswith("running_max")]  # module order
    assert [tuple(value.shape) for value in final] == [(2,), (4,), ()]

    first_local = [ranks[r]["forwards"][0][0]["local_after"] for r in range(2)]
    assert first_local[0][0] > first_local[1][0] and first_local[1][1] > first_local[0][1]

    fresh_layers = [m for m in channel_wise_model().modules() if isinstance(m, RateNorm)]
    for layer, (fresh, steps0, steps1) in enumerate(zip(fresh_layers, *(r["forwards"] for r in ranks))):
        assert len(steps0) == len(steps1) == 2 * 4, layer  # 2 epochs of 48 images per rank in batches of 12
        # What the layer held after each step's reduction: the next step's starting value, then the final state.
        reduced = [step["before"] for step in steps0[1:]] + [final[layer]]
        for step, (on0, on1, after) in enumerate(zip(steps0, steps1, reduced)):
            where = f"layer {layer}, step {step}"
            assert torch.equal(on0["before"], on1["before"]), where
            assert torch.equal(after, torch.maximum(on0["local_after"], on1["local_after"])), where
            single = copy.deepcopy(fresh).train()
            single.running_max = on0["before"].clone()
            single(torch.cat([on0["x"], on1["x"]]))
            assert torch.equal(single.running_max, after), where


def test_stage2_keeps_a_state_met_inside_an_epoch(stage1_model, splits) -> None:
    """A λ so strong that the p's collapse within the epoch: at the epoch's end no state is within
    the tolerance, but one measured inside the epoch is, and it is the one kept."""
    _, val_loader, _ = _loaders(splits)
    stage1_omega = accuracy_and_omega(stage1_model, val_loader, "cpu")[1]
    reference_acc = train.evaluate_ann(stage1_model, val_loader)
    strong = dict(epochs=1, lam=20.0, lr=0.2, tolerance=2.0, p_init=0.95)
    at_end_only = copy.deepcopy(stage1_model)
    history = _stage2(at_end_only, splits, checks_per_epoch=1, **strong)
    assert not history[0]["selected"] and history[0]["checks"] == []
    model = copy.deepcopy(stage1_model)
    (entry,) = _stage2(model, splits, checks_per_epoch=9, **strong)
    assert len(entry["checks"]) == 8 and any(c["selected"] for c in entry["checks"])
    acc, omega = accuracy_and_omega(model, val_loader, "cpu")
    assert omega < stage1_omega and acc >= reference_acc - 2.0
    assert omega == pytest.approx(min(c["omega"] for c in entry["checks"] if c["selected"]))
