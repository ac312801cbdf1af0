"""What a user installs: the wheel's contents, the demo run from an installed wheel (not the
checkout), and what the CLI and ``federatls.testing`` say when the ``ca`` extra is missing.

The wheel is built with pip from a copy of this checkout's sources (pip fetches the build
backend from the package index, as any install from a checkout does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from harness import make_pki

ROOT = Path(__file__).parent.parent

# Makes `import aiohttp` fail as it does where the `ca` extra is not installed, then runs the
# code that follows it in this string.
NO_AIOHTTP = """
import sys

class NoAiohttp:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] == "aiohttp":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoAiohttp())
"""
RUN_CLI = "from federatls._cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _without_aiohttp(code: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_AIOHTTP + code, *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy, so that the build leaves nothing (build/, *.egg-info) in the checkout.
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree)
    for name in ("src", "examples"):
        shutil.copytree(
            ROOT / name,
            tree / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"),
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(tree),
        ],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("federatls-*.whl")
    return built


def test_wheel_ships_license_typing_marker_and_demo_programs(wheel: Path) -> None:
    """The wheel holds the Apache-2.0 LICENSE, py.typed and the programs `demo` runs."""
    names = set(zipfile.ZipFile(wheel).namelist())
    licenses = [n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n]
    assert licenses, sorted(names)
    text = zipfile.ZipFile(wheel).read(licenses[0]).decode()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert (ROOT / "LICENSE").read_text() == text
    assert "federatls/py.typed" in names
    assert "federatls/_examples/server/server.py" in names
    assert "federatls/_examples/client/client.py" in names
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    )
    assert b"License-Expression: Apache-2.0" in metadata or b"License: Apache-2.0" in metadata


@pytest.mark.timeout(400)
def test_demo_runs_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    """`federatls demo` from a virtual environment holding the wheel, run outside the
    checkout, goes through every step."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not this checkout
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        timeout=120,
        env=env,
    )
    # The dependencies come from this interpreter's site-packages; a path in a .pth file adds
    # that directory only (its own .pth files, such as an editable federatls, are not read).
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run(
        [str(python), "-c", "import federatls; print(federatls.__file__)"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)), where
    run = subprocess.run(
        [str(venv / "bin" / "federatls"), "demo"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Demo complete" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


def test_ca_serve_without_the_ca_extra_names_it(tmp_path: Path) -> None:
    """Without aiohttp, `ca serve` says in one line which extra to install, and exits 1."""
    pki = make_pki(tmp_path, "cloud")
    run = _without_aiohttp(RUN_CLI, "ca", "serve", pki.config, "--password-file", pki.password_file)
    assert run.returncode == 1, run
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("federatls: error: ")
    assert "federatls[ca]" in lines[0]


def test_demo_without_the_ca_extra_names_it() -> None:
    """Without aiohttp, `demo` says in one line which extra to install, before starting."""
    run = _without_aiohttp(RUN_CLI, "demo")
    assert run.returncode == 1, run
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert "federatls[ca]" in run.stderr


def test_core_verbs_work_without_the_ca_extra(tmp_path: Path) -> None:
    """Twin: without aiohttp, `ca init` and an offline `ca token` still work."""
    password = tmp_path / "pw.txt"
    password.write_text("a long CA password\n")
    init = _without_aiohttp(
        RUN_CLI,
        "ca",
        "init",
        "cloud",
        "--dir",
        tmp_path / "cloud",
        "--address",
        "127.0.0.1:9000",
        "--password-file",
        password,
    )
    assert init.returncode == 0, init
    token = _without_aiohttp(
        RUN_CLI,
        "ca",
        "token",
        "svc",
        "--offline",
        tmp_path / "cloud" / "config" / "ca.json",
        "--password-file",
        password,
    )
    assert token.returncode == 0, token
    assert token.stdout.count(".") == 2


def test_testing_without_the_ca_extra_raises_an_import_error_naming_it() -> None:
    """Without aiohttp, importing federatls.testing raises an ImportError (a FederatlsError
    too) that names the extra to install."""
    code = (
        "from federatls import FederatlsError\n"
        "try:\n"
        "    import federatls.testing\n"
        "except ImportError as exc:\n"
        "    print(isinstance(exc, FederatlsError), exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    run = _without_aiohttp(code)
    assert run.returncode == 0, run
    assert run.stdout.startswith("True "), run.stdout
    assert "federatls[ca]" in run.stdout


def test_testing_imports_with_the_ca_extra() -> None:
    """Twin: with aiohttp, federatls.testing imports (the guard only fires on its absence)."""
    run = subprocess.run(
        [sys.executable, "-c", "import federatls.testing; print('imported')"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.stdout == "imported\n", run
