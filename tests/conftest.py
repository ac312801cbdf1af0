"""Shared fixtures: run-time PKIs, running federatls CAs and the real step-ca."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from federatls.ca import CAServer, Database, init_schema

from harness import (
    PKI,
    FakeClock,
    make_pki,
    serving,
    stepca_binary,
    stepca_process,
    use_postgres,
)
from postgres import PostgresCluster, session_cluster
from traffic import MakeCA, ca_maker


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    """A fresh 'cloud' PKI on disk (not running)."""
    return make_pki(tmp_path, "cloud")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def ca(pki: PKI, clock: FakeClock) -> AsyncIterator[CAServer]:
    """The 'cloud' PKI served by a federatls CA on 127.0.0.1 (port 0), with a fake clock."""
    async with serving(pki, clock) as server:
        yield server


@pytest.fixture(scope="session")
def stepca_bin() -> str:
    """The real step-ca binary; its absence skips, or fails when FEDERATLS_REQUIRE_STEPCA=1."""
    binary = stepca_binary()
    if binary is None:
        message = (
            "the real step-ca is not built: run bash ../shared/tools/stepca/build.sh "
            "(./scripts/test does it)"
        )
        if os.environ.get("FEDERATLS_REQUIRE_STEPCA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture(params=["federatls", "step-ca"])
async def any_ca(request: pytest.FixtureRequest, pki: PKI, clock: FakeClock) -> AsyncIterator[str]:
    """The same PKI served by the federatls CA, then by the real step-ca: yields the name."""
    if request.param == "federatls":
        async with serving(pki, clock):
            yield "federatls"
    else:
        binary = request.getfixturevalue("stepca_bin")
        with stepca_process(binary, pki):
            yield "step-ca"


@pytest.fixture(params=["federatls", pytest.param("step-ca", marks=pytest.mark.stepca)])
def make_ca(request: pytest.FixtureRequest, tmp_path: Path) -> MakeCA:
    """Starts CAs with 3-second certificates (tests/traffic.py): the federatls CA, then the
    real step-ca."""
    return ca_maker(request.param, request, tmp_path)


@pytest.fixture
def stepca(stepca_bin: str, pki: PKI) -> Iterator[PKI]:
    """The 'cloud' PKI served by the real step-ca."""
    with stepca_process(stepca_bin, pki):
        yield pki


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL 15 cluster for the session (tests/postgres.py), stopped and
    removed at its end; its absence skips, or fails when FEDERATLS_REQUIRE_POSTGRES=1."""
    with session_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    """A fresh, empty database (no schema) on the session's cluster."""
    return postgres.new_database()


@pytest.fixture
def pg(pki: PKI, pg_url: str) -> str:
    """``pki``'s ca.json pointed at a fresh database holding the federatls schema."""
    init_schema(Database("postgresql", pg_url))
    use_postgres(pki, pg_url)
    return pg_url
