"""The one atomic file writer of rnl_fast: dataset cache, training checkpoints and results.json.

A reader (or a run resumed after a crash) must find either the previous file or the complete new
one, never half of one; this module is the single place that knows how.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _host_tag() -> str:
    """This machine, short: a temporary on a shared file system is judged only by its own host."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temp_pattern(path: Path) -> re.Pattern[str]:
    """The names :func:`atomic_write` gives ``path``'s temporaries: ``.{name}.{hex}.{pid}-{host}.tmp``."""
    return re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{{8}})\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_orphans(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that died inside :func:`atomic_write`
    (``kill -9``, a power cut: nothing ran to remove them). A temporary is an orphan when its name
    carries this host and a process id that no longer exists; live writers' temporaries, other
    hosts' and every other file are kept. Returns the removed paths."""
    path = Path(path)
    pattern, host = _temp_pattern(path), _host_tag()
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        try:
            candidate.unlink()
        except FileNotFoundError:  # another writer removed it first
            continue
        removed.append(candidate)
    return removed


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary stream whose bytes replace ``path`` when the ``with`` block ends without error.

    The stream is a temporary file in ``path``'s directory (``os.replace`` is atomic only within
    one file system), created exclusively under a fresh name with the permissions the umask gives,
    as ``open(path, "wb")`` would (``tempfile.mkstemp`` would give 0600). After the block it is
    flushed to disk and renamed over ``path``. If anything is raised, KeyboardInterrupt included,
    the temporary file is removed, ``path`` keeps its previous content and the exception
    propagates. A process killed outright (SIGKILL) cannot remove its temporary; its name holds
    the process id, and the next write of ``path`` removes it (:func:`remove_orphans`). The
    directory must exist.
    """
    path = Path(path)
    remove_orphans(path)
    temp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.{os.getpid()}-{_host_tag()}.tmp")
    try:
        with open(temp_path, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
