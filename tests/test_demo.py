"""`federatls demo` (README's first command) runs the federation tutorial end to end."""

from __future__ import annotations

import pytest

from harness import federatls

pytestmark = pytest.mark.anyio


async def test_demo_shows_refusal_then_federation() -> None:
    """The demo exits 0 after showing the refusal without federation and the answer with it."""
    run = await federatls("demo")
    assert run.code == 0, run.err
    steps = [line for line in run.out.splitlines() if line.startswith("[")]
    assert [s[:3] for s in steps] == ["[1]", "[2]", "[3]", "[4]"]
    assert "refused, as expected" in run.out
    assert "Hello sdk_client (cert issued by 'kubernetes Root CA')" in run.out
    assert run.out.rstrip().endswith("Demo complete: federation works both ways, and is required.")
