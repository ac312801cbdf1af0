"""Atomic file writes (``federatls._files``), which the CLI's outputs and the CA's ca.json go
through: all files or none, each with its mode, no temporary file left behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from federatls._files import write_all_atomic, write_atomic


def test_files_are_written_whole_with_their_modes(tmp_path: Path) -> None:
    """Each file holds its data with its own mode, an existing one is replaced, and only the
    targets are left in the directory. Twin: ``test_a_failure_writes_nothing``."""
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    crt.write_bytes(b"old")
    write_all_atomic([(key, b"key", 0o600), (crt, b"certificate", 0o644)])
    assert (key.read_bytes(), crt.read_bytes()) == (b"key", b"certificate")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(crt.stat().st_mode) == 0o644
    write_atomic(crt, b"new", mode=0o644)
    assert crt.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pem", "k.pem"]


def test_a_failure_writes_nothing(tmp_path: Path) -> None:
    """When one file cannot be written (its directory is missing), none is: the first
    file's temporary copy is removed and the existing target keeps its old content. Twin:
    ``test_files_are_written_whole_with_their_modes``."""
    key = tmp_path / "k.pem"
    key.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        write_all_atomic([(key, b"key", 0o600), (tmp_path / "missing" / "c.pem", b"c", 0o644)])
    assert key.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]
