"""Files written whole or not at all: each through a temporary file in the same directory,
flushed to disk, then renamed over its target, so a reader sees the old file or the new one,
never half of one. The CLI's certificates and keys and the CA's ca.json are written here.
What to write, with which mode, and whether a target may be overwritten are the callers'
business; nothing here reads a file or decides a policy.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["write_all_atomic", "write_atomic"]


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` with permissions ``mode``, as ``write_all_atomic`` does."""
    write_all_atomic([(path, data, mode)])


def write_all_atomic(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write each ``(path, data, mode)``, all or none: every file is written whole to a
    temporary file beside its target (created 0600, then given ``mode`` before any byte is
    written) and flushed to disk first, then each is renamed into place; a failure removes
    the temporary files and whatever was already renamed (a key without its certificate is
    of no use)."""
    staged: list[tuple[str, Path]] = []
    placed: list[Path] = []
    try:
        for path, data, mode in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        for path in placed:
            path.unlink(missing_ok=True)
        raise
