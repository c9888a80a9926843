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
