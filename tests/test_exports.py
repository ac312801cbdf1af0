"""The public surface: each package's ``__all__`` is exactly what docs/api.md documents."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

import federatls
import federatls.ca
import federatls.integrations.aiohttp
import federatls.integrations.grpc
import federatls.integrations.grpc.aio
import federatls.integrations.httpx
import federatls.integrations.hypercorn
import federatls.integrations.requests
import federatls.integrations.streams
import federatls.integrations.urllib3
import federatls.integrations.uvicorn
import federatls.testing

MODULES = [
    federatls,
    federatls.ca,
    federatls.integrations.aiohttp,
    federatls.integrations.grpc,
    federatls.integrations.grpc.aio,
    federatls.integrations.httpx,
    federatls.integrations.hypercorn,
    federatls.integrations.requests,
    federatls.integrations.streams,
    federatls.integrations.urllib3,
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


# The optional packages the integrations use: only a user's import of an integration may
# import one of them.
OPTIONAL = {"aiohttp", "grpc", "hypercorn", "requests", "urllib3", "uvicorn"}


def test_core_and_integrations_package_import_no_optional_package() -> None:
    """``import federatls`` and ``import federatls.integrations`` (in a fresh interpreter)
    import none of grpc, requests, urllib3, hypercorn, uvicorn, aiohttp. Twin:
    test_optional_packages_show_when_imported."""
    assert _imports("federatls, federatls.integrations", OPTIONAL) == set()


def test_optional_packages_show_when_imported() -> None:
    """Twin: importing the packages themselves shows each of them to the same check."""
    assert _imports(", ".join(sorted(OPTIONAL)), OPTIONAL) == OPTIONAL


def test_optional_extras_show_when_imported() -> None:
    """Twin: importing the aiohttp and uvicorn integrations does pull them in."""
    assert _imports("federatls.integrations.aiohttp, federatls.integrations.uvicorn") == {
        "aiohttp",
        "uvicorn",
    }


def _imports(modules: str, watched: set[str] | None = None) -> set[str]:
    """Which of ``watched`` (aiohttp and uvicorn by default) a fresh interpreter has imported
    after ``import {modules}``."""
    import json
    import subprocess
    import sys

    names = sorted(watched or {"aiohttp", "uvicorn"})
    seen = f"sorted(set({names}) & set(sys.modules))"
    code = f"import json, sys, {modules}; print(json.dumps({seen}))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return set(json.loads(out.stdout))
