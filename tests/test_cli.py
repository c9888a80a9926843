"""The rnl-fast command line: error paths (one line, exit 2) and the whole pipeline, tiny."""

from __future__ import annotations

import json

import pytest
import torch

from rnl_fast import cli


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, match",
    [
        pytest.param(["train", "--model", "resnet9", "--out", "x.pt"], "invalid choice: 'resnet9'", id="unknown-model"),
        pytest.param(
            ["train", "--dataset", "imagenet", "--out", "x.pt"], "invalid choice: 'imagenet'", id="unknown-dataset"
        ),
        pytest.param(
            ["train", "--dataset", "cifar10", "--out", "x.pt"], "CIFAR-10 needs a data directory", id="missing-dataset"
        ),
        pytest.param(["demo", "-T", "0"], "argument -T/--steps: expected a positive integer, got '0'", id="T-zero"),
        pytest.param(
            ["evaluate", "--checkpoint", "c.pt", "--method", "rnl", "-T", "abc"],
            "rnl-fast evaluate: error: argument -T/--steps: expected a positive integer, got 'abc' (see",
            id="T-not-a-number",
        ),
        pytest.param(["demo", "--seed", "x"], "argument --seed: expected an integer, got 'x'", id="seed-not-a-number"),
        pytest.param(
            ["demo", "--lam", "inf"], "argument --lam: expected a finite number >= 0, got 'inf'", id="lam-inf"
        ),
        pytest.param(
            ["evaluate", "--checkpoint", "c.pt", "--method", "rnl", "-T", "-5"],
            "expected a positive integer, got '-5'",
            id="T-negative",
        ),
        pytest.param(
            ["train", "--epochs", "-1", "--out", "x.pt"], "expected an integer >= 0, got '-1'", id="negative-epochs"
        ),
        pytest.param(
            ["train", "--stage", "2", "--lam", "-0.5", "--out", "x.pt"],
            "expected a finite number >= 0, got '-0.5'",
            id="negative-lambda",
        ),
        pytest.param(["train", "--stage", "2", "--out", "x.pt"], "stage 2 needs --from", id="stage2-without-source"),
        pytest.param(
            ["evaluate", "--checkpoint", "c.pt", "--method", "maxnorm", "--v-init", "1"],
            "argument --v-init: v_init must be a fraction of the threshold in [0, 1) or 'half', got 1.0",
            id="v-init-one",
        ),
        pytest.param(
            ["compare", "--relu", "r.pt", "--v-init", "quarter"],
            "argument --v-init: v_init must be a fraction of the threshold in [0, 1) or 'half', got the string",
            id="v-init-word",
        ),
        pytest.param(["demo", "--v-init", "nan"], "argument --v-init: v_init must be", id="v-init-nan"),
        pytest.param(["demo", "--v-init", "-0.25"], "argument --v-init: v_init must be", id="v-init-negative"),
        pytest.param(
            ["evaluate", "--checkpoint", "c.pt", "--method", "maxnorm", "--channel-wise=yes"],
            "ignored explicit argument 'yes'",
            id="channel-wise-value",
        ),
        pytest.param(
            ["evaluate", "--checkpoint", "missing.pt", "--method", "rnl"],
            "missing.pt does not exist",
            id="missing-checkpoint",
        ),
    ],
)
def test_errors_are_one_line_with_exit_status_2(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    code, _out, err = _run(capsys, *argv)
    assert code == 2
    assert match in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert "_int" not in err and "_float" not in err  # no helper's name


@pytest.mark.parametrize("command", ["train", "evaluate", "compare", "demo"])
def test_help_shows_the_defaults(capsys, command):
    code, out, _err = _run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps and breaks lines as it likes
    assert "--batch-size BATCH_SIZE images per batch (default: 128)" in text
    assert "(nothing is downloaded) (default: mnist)" in text
    if command != "train":
        assert "-T T, --steps T simulation time steps (default: 256)" in text
    if command == "demo":
        assert "--tiny a seconds-long smoke run" in text
        assert "use a random subset of the test set (default: 1000)" in text  # the demo's own default
    assert "(default: None)" not in out


@pytest.mark.parametrize(
    "argv, v_init, channel_wise",
    [
        (["evaluate", "--checkpoint", "c.pt", "--method", "maxnorm"], None, False),  # the method's default
        (["evaluate", "--checkpoint", "c.pt", "--method", "maxnorm", "--v-init", "half", "--channel-wise"], 0.5, True),
        (["evaluate", "--checkpoint", "c.pt", "--method", "rnl", "--v-init", "0.25"], 0.25, False),
        (["compare", "--relu", "r.pt"], 0.5, True),  # the latency variants' defaults
        (["compare", "--relu", "r.pt", "--v-init", "0", "--no-channel-wise"], 0.0, False),
        (["demo", "--v-init", "0.75"], 0.75, True),
    ],
)
def test_latency_options_parse(argv, v_init, channel_wise):
    args = cli.build_parser().parse_args(argv)
    assert (args.v_init, args.channel_wise) == (v_init, channel_wise)


def test_unreadable_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, _out, err = _run(capsys, "evaluate", "--checkpoint", str(bad), "--method", "rnl")
    assert code == 2 and "unreadable or corrupt" in err and len(err.strip().splitlines()) == 1


def test_train_then_evaluate_on_synthetic_data(capsys, tmp_path):
    ckpt = tmp_path / "s1.pt"
    common = ["--dataset", "synthetic", "--batch-size", "64", "--train-images", "640", "--test-images", "64"]
    assert _run(capsys, "train", "--stage", "1", "--epochs", "1", "--out", str(ckpt), *common)[0] == 0
    ckpt2 = tmp_path / "s2.pt"
    assert (
        _run(capsys, "train", "--stage", "2", "--from", str(ckpt), "--epochs", "1", "--out", str(ckpt2), *common)[0]
        == 0
    )
    out_dir = tmp_path / "eval"
    code, out, _err = _run(
        capsys,
        "evaluate",
        "--checkpoint",
        str(ckpt2),
        "--method",
        "rnl_ril",
        "-T",
        "16",
        "--out",
        str(out_dir),
        *common,
    )
    assert code == 0 and "rnl_ril" in out
    results = json.loads((out_dir / "results.json").read_text())
    assert results["T"] == 16 and len(results["methods"]["rnl_ril"]["snn_accuracy"]) == 16
    evaluate = ["evaluate", "--checkpoint", str(ckpt2), "-T", "8", *common]
    code, out, _err = _run(capsys, *evaluate, "--method", "rnl_ril", "--v-init", "half", "--out", str(out_dir))
    assert code == 0 and "rnl_ril+half" in out
    method = json.loads((out_dir / "results.json").read_text())["methods"]["rnl_ril+half"]
    assert (method["method"], method["v_init"], method["channel_wise"]) == ("rnl_ril", 0.5, False)
    # The stage-1 network (method rnl converts it; a stage-2 checkpoint is refused for rnl).
    evaluate[2] = str(ckpt)
    code, _out, err = _run(capsys, *evaluate, "--method", "rnl", "--channel-wise")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "channel_wise=True with method 'rnl' needs a network trained with RateNorm(channel_wise=True)" in err


@pytest.mark.slow
def test_demo_tiny(capsys, tmp_path):
    """The whole demo in its tiny mode: every method, the table, results.json and the figures."""
    code, out, err = _run(capsys, "demo", "--tiny", "--out", str(tmp_path))
    assert code == 0, err
    assert "T=8" in out and "steps to ANN−1" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"] == "mnist" and results["model"] == "cnn7"
    # The paper's four methods as the paper converts them, and the latency variants beside them.
    # Then QCFS and RNL-QCFS (trained with L = 8 levels, from θ/2 by default).
    settings = {
        name: (m["method"], m["v_init"], m["channel_wise"], m["levels"]) for name, m in results["methods"].items()
    }
    assert settings == {
        "maxnorm": ("maxnorm", 0.0, False, None),
        "robustnorm": ("robustnorm", 0.0, False, None),
        "rnl": ("rnl", 0.0, False, None),
        "rnl_ril": ("rnl_ril", 0.0, False, None),
        "qcfs": ("qcfs", 0.5, False, 8),
        "rnl_qcfs": ("rnl_qcfs", 0.5, False, 8),
        "maxnorm+cw+half": ("maxnorm", 0.5, True, None),
        "robustnorm+cw+half": ("robustnorm", 0.5, True, None),
        "rnl_ril+half": ("rnl_ril", 0.5, False, None),
    }
    assert "robustnorm+cw+half" in out  # a row of the table (the tiny ANNs are too weak to be ranked)
    for name, method in results["methods"].items():
        assert len(method["snn_accuracy"]) == results["T"] == len(method["spikes_per_step"]), name
        assert 0 <= method["ann_accuracy"] <= 100 and method["omega"] > 0
        assert method["k_curves"], name
    for figure in ("accuracy_vs_T.png", "k_curves.png", "power_per_step.png"):
        assert (tmp_path / figure).stat().st_size > 10_000


@pytest.mark.slow
def test_train_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m rnl_fast.cli train` trains with DDP and writes one checkpoint."""
    import os
    import shutil
    import socket
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckpt = tmp_path / "ddp.pt"
    cmd = [torchrun, "--nproc_per_node=2", f"--master_port={port}", "--master_addr=127.0.0.1", "-m", "rnl_fast.cli",
           "train", "--dataset", "synthetic", "--train-images", "640", "--test-images", "64", "--batch-size", "32",
           "--epochs", "1", "--out", str(ckpt)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count('"checkpoint"') == 1  # rank 0 reports, rank 1 stays quiet
    from rnl_fast import train

    state = train.load_checkpoint(ckpt)
    assert state["epoch"] == 1 and state["model_name"] == "cnn7"


def test_same_seed_same_network_in_two_processes(tmp_path):
    """`rnl-fast train --seed 5` twice, in two fresh processes: the same weights to the bit (the
    network is built from the seed, not from whatever state torch's generator is in)."""
    import subprocess
    import sys

    from rnl_fast import train

    states = []
    for run in range(2):
        out = tmp_path / f"run{run}.pt"
        cmd = [sys.executable, "-m", "rnl_fast.cli", "train", "--dataset", "synthetic", "--train-images", "320"]
        cmd += ["--test-images", "32", "--batch-size", "64", "--epochs", "1", "--seed", "5", "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        states.append(train.load_checkpoint(out)["model_state"])
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


# ─── checkpoints that catch misuse (issue 13) ───

_TINY = ["--dataset", "synthetic", "--batch-size", "64", "--train-images", "320", "--test-images", "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One stage-1 and one stage-2 checkpoint of the tiny synthetic run (written once)."""
    directory = tmp_path_factory.mktemp("trained")
    paths = {"s1": directory / "s1.pt", "s2": directory / "s2.pt"}
    assert cli.main(["train", "--epochs", "1", "--out", str(paths["s1"]), *_TINY]) == 0
    argv = ["train", "--stage", "2", "--from", str(paths["s1"]), "--epochs", "1", "--checks-per-epoch", "1"]
    assert cli.main([*argv, "--out", str(paths["s2"]), *_TINY]) == 0
    return paths


def _one_line_exit_2(result: tuple[int, str, str], *parts: str) -> str:
    code, _out, err = result
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


def test_train_refuses_to_overwrite_a_checkpoint_without_force(capsys, tmp_path, trained):
    out = tmp_path / "s1.pt"
    out.write_bytes(trained["s1"].read_bytes())
    before = out.read_bytes()
    argv = ["train", "--epochs", "1", "--out", str(out), *_TINY]
    _one_line_exit_2(_run(capsys, *argv), f"{out} exists", "--resume", "--force")
    assert out.read_bytes() == before
    assert _run(capsys, *argv, "--resume", "--force")[0] == 2  # one or the other
    argv[2] = "2"  # another run (the same one would write the same bytes: training is deterministic)
    assert _run(capsys, *argv, "--force")[0] == 0
    assert train_state(out)["epoch"] == 2


def train_state(path):
    from rnl_fast import train

    return train.load_checkpoint(path)


@pytest.mark.parametrize(
    "change, parts",
    [
        (["--activation", "relu"], ["activation='rnl', this run has activation='relu'"]),
        (["--model", "alexnet_mnist"], ["model='cnn7', this run has model='alexnet_mnist'"]),
        (["--train-images", "640"], ["train_images=320, this run has train_images=640"]),
        (["--lr", "0.05"], ["lr=0.1, this run has lr=0.05"]),
    ],
    ids=["activation", "model", "train-images", "lr"],
)
def test_resume_of_another_run_is_one_line(capsys, tmp_path, trained, change, parts):
    out = tmp_path / "s1.pt"
    out.write_bytes(trained["s1"].read_bytes())
    argv = ["train", "--epochs", "1", "--out", str(out), "--resume", *_TINY, *change]
    _one_line_exit_2(_run(capsys, *argv), f"checkpoint {out} belongs to another run", *parts)


def test_checkpoint_records_its_run(trained):
    state = train_state(trained["s2"])
    assert state["stage"] == 2 and state["finished"] is True and state["model_name"] == "cnn7"
    assert state["data"] == {"dataset": "synthetic", "train_images": 320, "batch_size": 64, "seed": 0}
    assert state["model_kwargs"]["activation"] == "rnl" and state["model_kwargs"]["shared_p"] is True


@pytest.mark.parametrize(
    "which, method, extra, parts",
    [
        ("s1", "rnl_ril", [], ["s1.pt is from stage 1, a stage-2 checkpoint is needed (method rnl_ril)"]),
        ("s2", "rnl", [], ["s2.pt is from stage 2, a stage-1 checkpoint is needed (method rnl)"]),
        ("s2", "rnl_ril", ["--dataset", "mnist"], ["s2.pt was trained on synthetic, not mnist"]),
    ],
    ids=["stage1-as-rnl_ril", "stage2-as-rnl", "other-dataset"],
)
def test_evaluate_checks_stage_and_dataset(capsys, trained, which, method, extra, parts):
    argv = ["evaluate", "--checkpoint", str(trained[which]), "--method", method, "-T", "4", *_TINY, *extra]
    _one_line_exit_2(_run(capsys, *argv), *parts)


def test_compare_and_stage2_check_their_checkpoints(capsys, tmp_path, trained):
    compare = ["compare", "--rnl-ril", str(trained["s1"]), "-T", "4", *_TINY]
    _one_line_exit_2(_run(capsys, *compare), "s1.pt is from stage 1", "(--rnl-ril)")
    stage2 = ["train", "--stage", "2", "--from", str(trained["s2"]), "--epochs", "1", "--out", str(tmp_path / "x.pt")]
    _one_line_exit_2(_run(capsys, *stage2, *_TINY), "s2.pt is from stage 2", "stage 2 --from")
    _one_line_exit_2(_run(capsys, *stage2[:4], str(trained["s1"]), *stage2[5:], *_TINY[2:]), "not mnist")


def test_unfinished_and_old_checkpoints(capsys, tmp_path, trained):
    from rnl_fast import train

    state = {k: v for k, v in train_state(trained["s1"]).items() if k not in ("format", "checksum")}
    unfinished = tmp_path / "unfinished.pt"
    train.save_checkpoint(unfinished, **{**state, "epoch": 9, "epochs": 50, "finished": False})
    argv = ["evaluate", "--method", "rnl", "-T", "4", *_TINY, "--checkpoint"]
    _one_line_exit_2(_run(capsys, *argv, str(unfinished)), "unfinished run (epoch 9 of 50)", "--allow-unfinished")
    code, out, err = _run(capsys, *argv, str(unfinished), "--allow-unfinished")
    assert code == 0 and "rnl" in out, err
    # Format v1: no checksum, data, settings or finished flag; loaded, not checked, and said so.
    old = tmp_path / "v1.pt"
    v1 = {k: v for k, v in state.items() if k not in ("data", "settings", "finished")}
    torch.save({"format": "rnl_fast-checkpoint-v1", **v1}, old)
    code, out, err = _run(capsys, *argv, str(old))
    assert code == 0 and "note: checkpoint" in err and "does not record its dataset" in err, err


def test_flipped_checkpoint_is_refused_by_evaluate(capsys, tmp_path, trained):
    path = tmp_path / "flipped.pt"
    content = bytearray(trained["s1"].read_bytes())
    middle = len(content) // 2
    content[middle - 200 : middle + 200] = bytes(b ^ 0xFF for b in content[middle - 200 : middle + 200])
    path.write_bytes(bytes(content))
    argv = ["evaluate", "--checkpoint", str(path), "--method", "rnl", "-T", "4", *_TINY]
    _one_line_exit_2(_run(capsys, *argv), f"checkpoint {path} is corrupt", "checksum")


def test_ctrl_c_says_which_epoch_is_saved_and_how_to_continue(tmp_path, ctrl_c_as_in_a_terminal):
    """SIGINT in the middle of a run: exit 130, and one line saying what the checkpoint holds and
    that --resume continues; the file holds that epoch, and --resume does continue it."""
    import signal
    import subprocess
    import sys
    import time

    from rnl_fast import train

    out = tmp_path / "run.pt"
    argv = [sys.executable, "-m", "rnl_fast.cli", "train", "--epochs", "50", "--out", str(out), *_TINY]
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=ctrl_c_as_in_a_terminal,
    )
    deadline = time.monotonic() + 240
    while not out.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert out.exists(), process.communicate()[1][-2000:]
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    saved = train.load_checkpoint(out)["epoch"]
    assert 1 <= saved < 50
    assert f"interrupted in epoch {saved + 1} of 50" in last, last
    assert f"{out} holds epoch {saved} of 50" in last and "--resume" in last, last
