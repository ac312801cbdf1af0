"""scripts/_venv.sh, which ./scripts/demo and ./scripts/test source: it installs federatls
into the virtual environment only when something is missing, so the two scripts do not
reinstall each other.

The environment's ``python`` is a stand-in that records each ``pip install`` it is asked for
(the script's decisions are what is tested; a real install is left to ./scripts/test).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BASH = shutil.which("bash") or "/bin/bash"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of scripts/_venv.sh and pyproject.toml, with a virtual environment whose
    python logs its arguments to install.log."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "_venv.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/install.log\n')
    python.chmod(0o755)
    return tmp_path


def _source(checkout: Path, extras: str) -> list[str]:
    """Source _venv.sh as scripts/demo or scripts/test do; the installs asked for so far."""
    subprocess.run(
        [BASH, "-c", f'FEDERATLS_EXTRAS="{extras}"; source "{checkout}/scripts/_venv.sh"'],
        check=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(checkout), "PYTHON": sys.executable},
    )
    log = checkout / "install.log"
    return log.read_text().splitlines() if log.exists() else []


def test_demo_and_test_do_not_reinstall_each_other(checkout: Path) -> None:
    """demo, test, demo, test: one install for the first, one for what `test` adds, then
    none (each script finds what it needs already there)."""
    _source(checkout, "ca")
    installs = _source(checkout, "ca,test")
    assert len(installs) == 2, installs
    assert installs[-1].endswith(f"-e {checkout}[ca,test]")
    _source(checkout, "ca")
    assert _source(checkout, "ca,test") == installs


def test_a_changed_pyproject_reinstalls_with_every_extra(checkout: Path) -> None:
    """Twin: when pyproject.toml changes, the next run installs again, keeping the extras
    installed before."""
    _source(checkout, "ca,test")
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n# changed\n")
    installs = _source(checkout, "ca")
    assert len(installs) == 2, installs
    assert installs[-1].endswith(f"-e {checkout}[ca,test]")
