"""The public surface: each package's ``__all__`` is exactly what docs/api.md documents."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

import federatls
import federatls.ca
import federatls.integrations.aiohttp
import federatls.integrations.httpx
import federatls.integrations.streams
import federatls.integrations.uvicorn
import federatls.testing

MODULES = [
    federatls,
    federatls.ca,
    federatls.integrations.aiohttp,
    federatls.integrations.httpx,
    federatls.integrations.streams,
    federatls.integrations.uvicorn,
    federatls.testing,
]

API_DOC = Path(__file__).parent.parent / "docs" / "api.md"


def _documented(package: str) -> set[str]:
    pattern = r"^- `" + re.escape(package) + r"\.([A-Za-z_][A-Za-z0-9_]*)`"
    names = re.findall(pattern, API_DOC.read_text(), flags=re.MULTILINE)
    return set(names)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_all_matches_documentation(module: ModuleType) -> None:
    """Every exported name is documented and every documented name is exported."""
    assert set(module.__all__) == _documented(module.__name__)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_exported_name_resolves(module: ModuleType) -> None:
    """Each name in ``__all__`` is really there (lazy ones included)."""
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_core_import_does_not_pull_optional_extras() -> None:
    """Importing the core, the CA's init side, streams and httpx pulls neither aiohttp nor
    uvicorn (the twin below shows the check sees them when they are imported)."""
    assert (
        _imports(
            "federatls, federatls.ca, federatls.integrations.streams, federatls.integrations.httpx"
        )
        == set()
    )


def test_optional_extras_show_when_imported() -> None:
    """Twin: importing the aiohttp and uvicorn integrations does pull them in."""
    assert _imports("federatls.integrations.aiohttp, federatls.integrations.uvicorn") == {
        "aiohttp",
        "uvicorn",
    }


def _imports(modules: str) -> set[str]:
    import json
    import subprocess
    import sys

    code = (
        f"import json, sys, {modules}; "
        "print(json.dumps(sorted({'aiohttp', 'uvicorn'} & set(sys.modules))))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return set(json.loads(out.stdout))
