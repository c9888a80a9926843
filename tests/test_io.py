"""rnl_fast._io.atomic_write: content, permissions, and nothing left behind when a write fails."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from rnl_fast import data, report, train
from rnl_fast._io import atomic_write


class _Crash(Exception):
    """Stands in for a failure in the middle of writing."""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_the_content(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    with atomic_write(path) as file:
        file.write(b"first")
    assert path.read_bytes() == b"first"
    with atomic_write(str(path)) as file:  # replaces an existing file; str paths too
        file.write(b"second, longer")
    assert path.read_bytes() == b"second, longer"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_mode_follows_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "out.bin"
    previous = os.umask(umask)
    try:
        with atomic_write(path) as file:
            file.write(b"x")
        with open(tmp_path / "plain.bin", "wb") as file:
            file.write(b"x")
    finally:
        os.umask(previous)
    assert _mode(path) == 0o666 & ~umask == _mode(tmp_path / "plain.bin")


@pytest.mark.parametrize("error", [_Crash, KeyboardInterrupt])
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, error: type[BaseException]) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_write(path) as file:
            file.write(b"half of the new")
            raise error
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failed_first_write_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(_Crash):
        with atomic_write(tmp_path / "out.bin") as file:
            file.write(b"half")
            raise _Crash
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "absent" / "out.bin") as file:
            file.write(b"x")
    assert list(tmp_path.iterdir()) == []


def test_every_writer_of_the_package_is_atomic_with_the_umask_mode(tmp_path: Path) -> None:
    """The dataset cache, checkpoints and results.json all go through atomic_write."""
    previous = os.umask(0o022)
    try:
        data._save_npz_atomic(tmp_path / "cache.npz", labels=np.arange(3))
        train.save_checkpoint(tmp_path / "run.pt", weights=torch.arange(3.0))
        report.write_results(tmp_path / "results.json", "synthetic", "cnn7", 8, 10, {})
    finally:
        os.umask(previous)
    modes = {p.name: _mode(p) for p in tmp_path.iterdir()}  # and no temporary file
    assert modes == {"cache.npz": 0o644, "results.json": 0o644, "run.pt": 0o644}


_WRITER_KILLED_MID_WRITE = """
import sys
from rnl_fast._io import atomic_write
with atomic_write(sys.argv[1]) as file:
    file.write(b"half of a checkpoint")
    file.flush()
    print("writing", flush=True)
    sys.stdin.read()  # blocks until killed
"""


def _killed_writer(path: Path) -> None:
    """A process that dies by SIGKILL inside ``atomic_write(path)``, as `kill -9` mid-save."""
    import signal
    import subprocess
    import sys

    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER_KILLED_MID_WRITE, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline() == "writing\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)


def test_orphans_of_killed_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """kill -9 during a write leaves its temporary file; the next write of the same file removes
    it (and every other one whose writer is dead), so repeated kills do not pile files up."""
    path = tmp_path / "run.pt"
    path.write_bytes(b"old")
    for _ in range(3):  # each killed writer's own start removes its predecessor's orphan
        _killed_writer(path)
        orphans = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(orphans) == 1 and path.read_bytes() == b"old"
    with atomic_write(path) as file:
        file.write(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"] and path.read_bytes() == b"new"


def test_a_live_writers_temporary_and_other_files_are_kept(tmp_path: Path) -> None:
    """Cleaning up never touches a write in progress (its process is alive), the temporaries of
    another target, or files that only look similar."""
    path = tmp_path / "run.pt"
    _killed_writer(tmp_path / "other.pt")
    bystanders = {p.name for p in tmp_path.iterdir()} | {"run.pt.tmp", ".run.pt.notes.tmp", "run.pt.bak"}
    for name in ("run.pt.tmp", ".run.pt.notes.tmp", "run.pt.bak"):
        (tmp_path / name).write_bytes(b"keep")
    with atomic_write(path) as outer:
        outer.write(b"outer")
        in_progress = {p.name for p in tmp_path.iterdir()} - bystanders
        with atomic_write(path) as inner:  # a second writer of the same file in this live process
            inner.write(b"inner")
        assert in_progress <= {p.name for p in tmp_path.iterdir()}
    assert {p.name for p in tmp_path.iterdir()} == bystanders | {"run.pt"}
    assert path.read_bytes() == b"outer"
