"""The sync httpx client is generated from the async one (scripts/unasync.py), so the two
transports cannot drift: the committed ``_httpx_sync`` must be what the script makes now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "unasync.py"
GENERATED = ROOT / "src" / "federatls" / "integrations" / "_httpx_sync.py"


def _check(target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--target", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sync_client_matches_its_source() -> None:
    """``_httpx_sync.py`` is exactly what scripts/unasync.py generates from
    ``_httpx_async.py`` (run ``python scripts/unasync.py`` after editing the async one).
    Twin: test_hand_edit_is_caught."""
    result = _check(GENERATED)
    assert result.returncode == 0, result.stderr


def test_hand_edit_is_caught(tmp_path: Path) -> None:
    """A hand edit of the generated module (here: one changed line) fails the check, which
    names the stale file and shows the line."""
    edited = tmp_path / "_httpx_sync.py"
    text = GENERATED.read_text()
    assert "self._pools = Swapping(source, build)" in text
    edited.write_text(text.replace("Swapping(source, build)", "Swapping(source, build)  # mine"))
    result = _check(edited)
    assert result.returncode == 1
    assert "is stale: run python scripts/unasync.py" in result.stderr
    assert "-        self._pools = Swapping(source, build)  # mine" in result.stderr


def test_sync_client_has_no_async_left() -> None:
    """The generated module has no ``async``, ``await`` or ``Async`` name left over, and
    says it is generated. Twin: the async source it comes from has them."""
    generated = GENERATED.read_text()
    source = (GENERATED.parent / "_httpx_async.py").read_text()
    for word in ("async def", "await ", "AsyncConnectionPool", "aclose"):
        assert word not in generated
        assert word in source
    assert "GENERATED from _httpx_async.py by scripts/unasync.py" in generated
