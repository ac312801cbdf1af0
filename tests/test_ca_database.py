"""The CA on PostgreSQL, against a real throwaway cluster (the ``postgres`` fixture): serving
from ca.json's ``db`` block or ``--db``, the schema made by ``ca db init`` and checked by
``serve``, ``ca db migrate`` from the SQLite file, the database lost and found again while
serving, which replay rule holds for which store, and the purge of expired token ids while
the CA serves (on both stores).

``federatls ca serve`` and ``ca db`` run as real processes where the command line is what is
tested; the fault, rule and purge tests run the CA in the test's event loop (``CAServer``),
which lets them move its clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import psycopg
import pytest
from cryptography import x509

from federatls import CARefusedError
from federatls._keys import build_csr, new_private_key
from federatls._protocol import ErrorBody, RevokeRequest, SignRequest
from federatls.ca import CAServer
from federatls.ca._database import Database, init_schema

from harness import PASSWORD, PKI, FakeClock, assert_one_line_error, federatls, free_port
from postgres import PostgresCluster

pytestmark = pytest.mark.anyio

UNAVAILABLE = ErrorBody.for_status(503).to_json()  # step-ca's body, as for a busy database


# Helpers -----------------------------------------------------------------------------------------
def use_postgres(pki: PKI, url: str) -> None:
    """Point ca.json's db block at ``url`` the way step-ca's docs write it: the server in
    ``dataSource`` (ending in "/"), the database's name in ``database``."""
    parts = urlsplit(url)
    source = urlunsplit((parts.scheme, parts.netloc, "/", "", ""))
    block = {"type": "postgresql", "dataSource": source, "database": parts.path.lstrip("/")}
    pki.edit(lambda d: d.__setitem__("db", block))


def rows(url: str, table: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
    assert row is not None
    return int(row[0])


def tables(url: str) -> set[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in found}


def without_password(url: str) -> tuple[str, str]:
    """The password of ``url``, and ``url`` with another port (nothing listens there)."""
    parts = urlsplit(url)
    assert parts.password is not None
    netloc = parts.netloc.replace(f":{parts.port}", f":{free_port()}")
    return parts.password, urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def cli_serving(pki: PKI, *extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``federatls ca serve`` as a process until the block ends (SIGTERM, exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "federatls",
        "ca",
        "serve",
        str(pki.config),
        "--password-file",
        str(pki.password_file),
        *extra,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("Serving HTTPS on https://"), line + await _stderr(proc)
        pki.url = line.split()[3]
        yield proc
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            _, err = await proc.communicate()
        assert proc.returncode == 0, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def _stderr(proc: asyncio.subprocess.Process) -> str:
    with anyio.fail_after(30):
        _, err = await proc.communicate()
    return err.decode()


@contextlib.asynccontextmanager
async def serving(pki: PKI, clock: FakeClock, **kwargs: Any) -> AsyncIterator[CAServer]:
    """The CA in this event loop, on the fake clock; ``pki.url`` points at it."""
    async with CAServer.running(pki.config, PASSWORD, clock=clock, **kwargs) as ca:
        pki.url, pki.clock = ca.url, clock
        yield ca


async def sign(pki: PKI, token: str, subject: str = "svc") -> tuple[list[x509.Certificate], Any]:
    key = new_private_key()
    async with pki.client() as client:
        answer = await client.sign(SignRequest(build_csr(key, subject, [subject]), token))
    return list(answer.chain), key


async def refused(call: Any) -> CARefusedError:
    with pytest.raises(CARefusedError) as caught:
        await call
    return caught.value


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


# Serving from PostgreSQL ------------------------------------------------------------------------
async def test_serve_refuses_a_database_without_schema_until_db_init(pki: PKI, pg_url: str) -> None:
    """``ca serve`` on a db block naming a database without the schema: one line saying to
    run ``ca db init``, exit 1, and no table created. Twin: after ``ca db init`` (one line,
    what it did) the same command serves and records what it signs there."""
    use_postgres(pki, pg_url)
    run = await federatls("ca", "serve", pki.config, "--password-file", pki.password_file)
    assert_one_line_error(run, "has no federatls schema", "federatls ca db init")
    assert tables(pg_url) == set()

    run = await federatls("ca", "db", "init", pki.config)
    assert (run.code, run.err) == (0, ""), run
    assert run.out.endswith(": created the federatls schema (version 1)\n")
    assert len(run.out.splitlines()) == 1
    assert urlsplit(pg_url).password not in run.out  # type: ignore[operator]
    again = await federatls("ca", "db", "init", pki.config)
    assert again.out.endswith(": the federatls schema is up to date (version 1)\n"), again

    async with cli_serving(pki):
        chain, _ = await sign(pki, pki.token("svc"))
        assert rows(pg_url, "certificates") == 1
        assert rows(pg_url, "used_tokens") == 1
    assert not (pki.config.parent / "federatls.db").exists()
    assert chain[0].serial_number


async def test_serve_with_db_flag_overrides_the_block(pki: PKI, pg_url: str) -> None:
    """``ca serve --db URL`` serves from that PostgreSQL database although ca.json's block is
    step's badgerv2 (the SQLite file is not even created). Twin: without ``--db`` the same
    ca.json serves from the SQLite file beside it, and PostgreSQL gets nothing."""
    run = await federatls("ca", "db", "init", pki.config, "--db", pg_url)
    assert run.code == 0, run
    async with cli_serving(pki, "--db", pg_url):
        await sign(pki, pki.token("svc"))
    assert rows(pg_url, "certificates") == 1
    assert not (pki.config.parent / "federatls.db").exists()

    async with cli_serving(pki):
        await sign(pki, pki.token("svc"))
    assert rows(pg_url, "certificates") == 1
    assert (pki.config.parent / "federatls.db").is_file()


async def test_serve_refuses_a_newer_schema_version(pki: PKI, pg: str) -> None:
    """A database whose schema a newer federatls wrote: one line naming both versions, exit
    1, nothing changed. Twin: the version this federatls knows serves (``pg`` fixtures
    serve in every other test)."""
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("UPDATE federatls_schema SET version = 99")
    run = await federatls("ca", "serve", pki.config, "--password-file", pki.password_file)
    line = assert_one_line_error(run, "schema version 99", "this federatls knows 1")
    assert urlsplit(pg).password not in line  # type: ignore[operator]
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("UPDATE federatls_schema SET version = 1")
    async with cli_serving(pki):
        await sign(pki, pki.token("svc"))


async def test_serve_with_postgresql_unreachable_is_one_line(pki: PKI, pg: str) -> None:
    """PostgreSQL unreachable at start (nothing listens on the port): one line naming
    HOST:PORT and not the password, exit 1, promptly. Twin: the right port serves."""
    password, elsewhere = without_password(pg)
    use_postgres(pki, elsewhere)
    with anyio.fail_after(60):
        run = await federatls("ca", "serve", pki.config, "--password-file", pki.password_file)
    port = urlsplit(elsewhere).port
    line = assert_one_line_error(run, "cannot reach PostgreSQL", f"127.0.0.1:{port}")
    assert password not in line
    use_postgres(pki, pg)
    async with cli_serving(pki):
        await sign(pki, pki.token("svc"))


async def test_a_role_that_cannot_create_serves_an_initialised_database(
    pki: PKI, postgres: PostgresCluster, pg_url: str
) -> None:
    """A replica's role may read and write but not CREATE: ``ca db init`` with it fails
    with one line (exit 1, no table made), the database's owner initialises, and then
    ``ca serve`` with that role serves (serve creates nothing)."""
    replica = postgres.new_role("replica_role", pg_url)
    run = await federatls("ca", "db", "init", pki.config, "--db", replica)
    line = assert_one_line_error(run, "permission denied")
    assert urlsplit(replica).password not in line  # type: ignore[operator]
    assert tables(pg_url) == set()

    init = await federatls("ca", "db", "init", pki.config, "--db", pg_url)
    assert init.code == 0, init
    use_postgres(pki, replica)
    async with cli_serving(pki):
        await sign(pki, pki.token("svc"))
    assert rows(pg_url, "certificates") == 1


# Migration ------------------------------------------------------------------------------------
async def test_migrate_keeps_spent_tokens_and_revocations(
    pki: PKI, clock: FakeClock, pg_url: str
) -> None:
    """``ca db migrate`` copies the SQLite state: a token spent on SQLite is refused on
    PostgreSQL, a certificate revoked on SQLite cannot renew there, one line says what was
    copied. Twins: a token minted as long ago but never spent signs on PostgreSQL (no
    issued-at rule there: the migrated record is what refuses the first), and the
    certificate not revoked renews."""
    async with serving(pki, clock):
        spent = pki.token("spent")
        unspent = pki.token("unspent")
        await sign(pki, spent, "spent")
        kept, kept_key = await sign(pki, pki.token("kept"), "kept")
        gone, gone_key = await sign(pki, pki.token("gone"), "gone")
        async with pki.client((gone, gone_key)) as client:
            await client.revoke(RevokeRequest(str(gone[0].serial_number)))

    run = await federatls("ca", "db", "migrate", pki.config, "--to", pg_url)
    assert (run.code, run.err) == (0, ""), run
    source = pki.config.parent / "federatls.db"
    assert run.out.startswith("Copied 3 used tokens, 3 certificates, 1 revocations from ")
    assert f" from {source} to " in run.out
    assert urlsplit(pg_url).password not in run.out  # type: ignore[operator]

    clock.advance(5)  # a later start: SQLite's issued-at rule would refuse both tokens
    async with serving(pki, clock, database=Database("postgresql", pg_url)):
        refusal = await refused(sign(pki, spent, "spent"))
        assert refusal.status == 401
        await sign(pki, unspent, "unspent")
        async with pki.client((gone, gone_key)) as client:
            assert (await refused(client.renew())).status == 401
        async with pki.client((kept, kept_key)) as client:
            await client.renew()
    assert rows(pg_url, "revocations") == 1


async def test_migrate_refuses_a_database_that_is_not_empty(
    pki: PKI, clock: FakeClock, pg_url: str
) -> None:
    """A target holding any record is refused with one line naming what it holds, and
    nothing is copied into it. Twin: the empty database of
    ``test_migrate_keeps_spent_tokens_and_revocations``."""
    async with serving(pki, clock):  # ca init's block: the SQLite file
        await sign(pki, pki.token("svc"))
    init_schema(Database("postgresql", pg_url))
    async with serving(pki, clock, database=Database("postgresql", pg_url)):
        await sign(pki, pki.token("other"), "other")
    run = await federatls("ca", "db", "migrate", pki.config, "--to", pg_url)
    assert_one_line_error(run, "is not empty", "1 certificates")
    assert rows(pg_url, "certificates") == 1
