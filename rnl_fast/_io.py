"""The one atomic file writer of rnl_fast: dataset cache, training checkpoints and results.json.

A reader (or a run resumed after a crash) must find either the previous file or the complete new
one, never half of one; this module is the single place that knows how.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary stream whose bytes replace ``path`` when the ``with`` block ends without error.

    The stream is a temporary file in ``path``'s directory (``os.replace`` is atomic only within
    one file system), created exclusively under a fresh name with the permissions the umask gives,
    as ``open(path, "wb")`` would (``tempfile.mkstemp`` would give 0600). After the block it is
    flushed to disk and renamed over ``path``. If anything is raised, KeyboardInterrupt included,
    the temporary file is removed, ``path`` keeps its previous content and the exception
    propagates. The directory must exist.
    """
    path = Path(path)
    temp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp_path, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
