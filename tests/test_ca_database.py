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
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
import psycopg
import pytest
from cryptography import x509

from federatls import CARefusedError
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import ErrorBody, RekeyRequest, RevokeRequest, SignRequest
from federatls._x509 import common_name, fingerprint
from federatls.ca import CAServer
from federatls.ca._database import Database, init_schema
from federatls.ca._store import TokenUse

from harness import (
    PASSWORD,
    PKI,
    FakeClock,
    assert_one_line_error,
    federatls,
    free_port,
    spawn_serve,
    use_postgres,
    wait_until,
)
from postgres import PostgresCluster

pytestmark = pytest.mark.anyio

UNAVAILABLE = ErrorBody.for_status(503).to_json()  # step-ca's body, as for a busy database


# Helpers -----------------------------------------------------------------------------------------
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


def password_of(url: str) -> str:
    password = urlsplit(url).password
    assert password
    return password


def elsewhere(url: str) -> str:
    """``url`` with another port, where nothing listens."""
    parts = urlsplit(url)
    netloc = parts.netloc.replace(f":{parts.port}", f":{free_port()}")
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def cli_serving(pki: PKI, *extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``federatls ca serve`` as a process until the block ends (SIGTERM, exit 0)."""
    proc = await spawn_serve(pki, *extra)
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


async def sign(
    pki: PKI, token: str, subject: str = "svc"
) -> tuple[list[x509.Certificate], PrivateKey]:
    key = new_private_key()
    async with pki.client() as client:
        answer = await client.sign(SignRequest(build_csr(key, subject, [subject]), token))
    return list(answer.chain), key


async def refused(call: Awaitable[object]) -> CARefusedError:
    with pytest.raises(CARefusedError) as caught:
        await call
    return caught.value


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
    assert run.out.endswith(": created the federatls schema (version 2)\n")
    assert len(run.out.splitlines()) == 1
    assert password_of(pg_url) not in run.out
    again = await federatls("ca", "db", "init", pki.config)
    assert again.out.endswith(": the federatls schema is up to date (version 2)\n"), again

    async with cli_serving(pki):
        await sign(pki, pki.token("svc"))
        assert rows(pg_url, "certificates") == 1
        assert rows(pg_url, "used_tokens") == 1
    assert not (pki.config.parent / "federatls.db").exists()


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
    line = assert_one_line_error(run, "schema version 99", "this federatls knows 2")
    assert password_of(pg) not in line
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("UPDATE federatls_schema SET version = 2")
    async with cli_serving(pki):
        await sign(pki, pki.token("svc"))


async def test_serve_refuses_schema_1_until_db_init_upgrades_it(pki: PKI, pg: str) -> None:
    """A database of schema version 1 (before the state table of federation peers): ``ca
    serve`` refuses in one line telling to run ``ca db init``, exit 1; ``ca db init`` says it
    upgraded it from 1 to 2, keeping its rows. Twin: after that the same command serves."""
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("DROP TABLE state")
        conn.execute("UPDATE federatls_schema SET version = 1")
        conn.execute("INSERT INTO used_tokens VALUES ('kept', 'p:k', now(), now())")
    run = await federatls("ca", "serve", pki.config, "--password-file", pki.password_file)
    assert_one_line_error(run, "schema version 1, older than", "run `federatls ca db init")
    assert "state" not in tables(pg)
    run = await federatls("ca", "db", "init", pki.config)
    assert (run.code, run.err) == (0, ""), run
    assert run.out.endswith(": upgraded the federatls schema from version 1 to 2\n"), run.out
    assert rows(pg, "used_tokens") == 1
    async with cli_serving(pki):
        await sign(pki, pki.token("svc"))
    assert rows(pg, "state") == 0


async def test_serve_with_postgresql_unreachable_is_one_line(pki: PKI, pg: str) -> None:
    """PostgreSQL unreachable at start (nothing listens on the port): one line naming
    HOST:PORT and not the password, exit 1, promptly. Twin: the right port serves."""
    nowhere = elsewhere(pg)
    use_postgres(pki, nowhere)
    with anyio.fail_after(60):
        run = await federatls("ca", "serve", pki.config, "--password-file", pki.password_file)
    port = urlsplit(nowhere).port
    line = assert_one_line_error(run, "cannot reach PostgreSQL", f"127.0.0.1:{port}")
    assert password_of(pg) not in line
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
    assert password_of(replica) not in line
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
    assert password_of(pg_url) not in run.out

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


# The database lost while serving ---------------------------------------------------------------
async def test_database_lost_while_serving_then_back(
    pki: PKI, clock: FakeClock, postgres: PostgresCluster, pg: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL stopped under a serving CA: sign, renew, rekey and revoke answer 503 with
    step-ca's body and spend nothing; /roots, /federation, /root/{sha}, /provisioners and
    /version answer as before; /health is 503 saying what is wrong; the purge logs its
    failure once. Twin: once the server is back, with no restart of the CA, /health is 200
    and the very same requests (same tokens) succeed; every certificate handed out has its
    record."""
    caplog.set_level(logging.INFO, "federatls.ca")
    async with serving(pki, clock, purge_interval=0.2) as ca:
        chain, key = await sign(pki, pki.token("held"), "held")
        token, revoke_token = pki.token("svc"), pki.token(str(chain[0].serial_number), revoke=True)
        csr_key = new_private_key()
        request = SignRequest(build_csr(csr_key, "svc", ["svc"]), token)
        rekey = RekeyRequest(build_csr(new_private_key(), "held", ["held"]))
        revoke = RevokeRequest(str(chain[0].serial_number), ott=revoke_token)
        postgres.stop()
        try:
            async with pki.client() as client:
                for call in (client.sign(request), client.revoke(revoke)):
                    refusal = await refused(call)
                    assert (refusal.status, refusal.body) == (503, UNAVAILABLE)
            async with pki.client((chain, key)) as client:
                for call in (client.renew(), client.rekey(rekey)):
                    refusal = await refused(call)
                    assert (refusal.status, refusal.body) == (503, UNAVAILABLE)
            await _read_only_routes_answer(pki)
            health = await _health(pki)
            assert health.status_code == 503
            assert health.json()["status"] == 503
            assert "cannot use its database" in health.json()["message"]
            assert f"127.0.0.1:{postgres.port}" in health.json()["message"]
            assert postgres.password not in health.text
            said = await federatls("ca", "health", "--ca-url", pki.url, "--root", pki.root_path)
            assert_one_line_error(said, "503", "cannot use its database")
            assert ca.purge is not None
            runs = ca.purge.runs
            await asyncio.sleep(1.0)  # several purge runs fail meanwhile
            assert ca.purge.runs == runs
        finally:
            postgres.start()
        await _until_healthy(pki)
        async with pki.client() as client:
            signed = await client.sign(request)
        async with pki.client((chain, key)) as client:
            renewed = await client.renew()
            await client.rekey(rekey)
        async with pki.client() as client:
            await client.revoke(revoke)
        await wait_until(lambda: ca.purge is not None and ca.purge.runs > runs, 30)
    served = {c.serial_number for c in (chain[0], signed.chain[0], renewed.chain[0])}
    with psycopg.connect(pg, autocommit=True) as conn:
        recorded = {int(r[0]) for r in conn.execute("SELECT serial FROM certificates")}
    assert served <= recorded
    assert len(recorded) == 4  # held, svc, its renewal and its rekey: nothing else
    assert rows(pg, "revocations") == 1
    failures = [r for r in caplog.records if "purging expired token ids failed" in r.message]
    assert len(failures) == 1
    assert any("purging expired token ids works again" in r.message for r in caplog.records)


async def _read_only_routes_answer(pki: PKI) -> None:
    async with httpx.AsyncClient(base_url=pki.url, verify=_verify(pki), timeout=10) as http:
        for path, status in [
            ("/roots", 201),
            ("/federation", 201),
            (f"/root/{fingerprint(pki.root)}", 200),
            ("/provisioners", 200),
            ("/version", 200),
            ("/1.0/roots", 201),
        ]:
            answer = await http.get(path)
            assert answer.status_code == status, (path, answer.text)


def _verify(pki: PKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.root_path))


async def _health(pki: PKI) -> httpx.Response:
    async with httpx.AsyncClient(verify=_verify(pki), timeout=30) as http:
        return await http.get(pki.url + "/health")


async def _until_healthy(pki: PKI) -> None:
    """Until /health is 200 (bounded: the store tries the server again at most every few
    seconds)."""
    deadline = time.monotonic() + 60
    while (health := await _health(pki)).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"/health still {health.status_code}: {health.text}")
        await asyncio.sleep(0.2)
    assert health.json() == {"status": "ok"}


# Which replay rule holds for which store --------------------------------------------------------
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_token_issued_before_a_restart(
    pki: PKI, clock: FakeClock, postgres: PostgresCluster, store: str
) -> None:
    """On PostgreSQL (every commit durable) a restarted CA accepts a fresh token issued
    before its restart: a replica's restart refuses nothing the cluster has not seen.
    Twin: on SQLite it is refused, as step-ca refuses it ("issued before the bootstrap")."""
    if store == "postgresql":
        url = postgres.new_database()
        init_schema(Database("postgresql", url))
        use_postgres(pki, url)
    async with serving(pki, clock):
        token = pki.token("svc")
    clock.advance(5)  # the CA restarts some seconds later
    async with serving(pki, clock) as ca:
        assert ca.authority.iat_checked == (store == "sqlite")
        if store == "postgresql":
            await sign(pki, token)
        else:
            refusal = await refused(sign(pki, token))
            assert refusal.status == 401


# The purge of expired token ids ----------------------------------------------------------------
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_expired_token_ids_are_purged_while_serving(
    pki: PKI, clock: FakeClock, postgres: PostgresCluster, store: str
) -> None:
    """While the CA serves, token ids past their ``exp`` and the day of retention go, in
    batches (2,500 of them: ten batches of 250), and certificates stay. Twin: ids spent
    within the retention stay, the last one spent at the moment the purge runs included."""
    database: Database | None = None
    if store == "postgresql":
        url = postgres.new_database()
        database = Database("postgresql", url)
        init_schema(database)
    async with serving(pki, clock, database=database) as ca:
        await sign(pki, pki.token("old"), "old")
        long_ago = clock() - timedelta(days=3)
        expired = [
            TokenUse(f"expired-{i}", "admin:kid", long_ago, long_ago - timedelta(minutes=5))
            for i in range(2500)
        ]
        await asyncio.to_thread(ca.authority.store.record_issuances, expired)
        assert ca.purge is not None
        assert ca.purge.purged == 0  # the first run is a minute after the start
    async with serving(pki, clock, database=database, purge_interval=0.5) as ca:
        purge, store_ = ca.purge, ca.authority.store
        assert purge is not None
        assert store_.counts()["used_tokens"] == 2501
        await wait_until(lambda: purge.purged >= 2500)
        assert purge.runs <= 1  # one run went on, batch after batch, until none was left
        assert store_.counts() == {"used_tokens": 1, "certificates": 1, "revocations": 0}
        clock.advance(24 * 3600 + 5 * 60 - 30)  # "old" expires in 5 min: within retention
        await sign(pki, pki.token("new"), "new")
        runs = purge.runs
        await wait_until(lambda: purge.runs >= runs + 2)
        assert store_.counts()["used_tokens"] == 2
        clock.advance(60)  # now "old" is past exp + retention; "new" is not
        await wait_until(lambda: purge.purged == 2501)
        assert store_.counts()["used_tokens"] == 1
        assert store_.counts()["certificates"] == 2


async def test_the_database_cannot_change_on_reload(
    pki: PKI, clock: FakeClock, postgres: PostgresCluster, pg: str
) -> None:
    """A reload (SIGHUP) whose db block names another database is refused and logged; the
    CA keeps serving from the first. Twin: a reload with the same block is applied."""
    async with serving(pki, clock) as ca:
        assert ca.reload()
        other = postgres.new_database()
        init_schema(Database("postgresql", other))
        use_postgres(pki, other)
        assert not ca.reload()
        await sign(pki, pki.token("svc"))
    assert (rows(pg, "certificates"), rows(other, "certificates")) == (1, 0)


async def test_a_commit_that_fails_hands_out_nothing(pki: PKI, clock: FakeClock, pg: str) -> None:
    """Certificates signed together whose transaction fails at COMMIT (a deferred trigger
    raises there) are answered 503 with step-ca's body: none is handed out, none recorded,
    no token spent. Twin: with the trigger gone, the very same tokens buy their
    certificates, each with its record."""
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'injected failure at commit'; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON certificates"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    names = [f"svc-{i}" for i in range(4)]
    async with serving(pki, clock):
        requests = [SignRequest(build_csr(new_private_key(), n, [n]), pki.token(n)) for n in names]
        async with pki.client() as client:
            answers = await asyncio.gather(
                *(client.sign(r) for r in requests), return_exceptions=True
            )
            for answer in answers:
                assert isinstance(answer, CARefusedError), answer
                assert (answer.status, answer.body) == (503, UNAVAILABLE)
            assert (rows(pg, "certificates"), rows(pg, "used_tokens")) == (0, 0)
            with psycopg.connect(pg, autocommit=True) as conn:
                conn.execute("DROP TRIGGER refuse_at_commit ON certificates")
            signed = await asyncio.gather(*(client.sign(r) for r in requests))
    assert [common_name(s.chain[0].subject) for s in signed] == names
    assert (rows(pg, "certificates"), rows(pg, "used_tokens")) == (4, 4)


async def test_one_refused_record_fails_only_its_own_sign(
    pki: PKI, clock: FakeClock, pg: str
) -> None:
    """Signs committed in one group with one certificate row the database refuses (a
    trigger raises for one subject): the others get their 201 and records, the refused one
    a 503 with step-ca's body and nothing recorded, its token unspent. Twin: with the
    trigger gone, the refused one's very token buys its certificate."""
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.subject = 'svc-slow' THEN PERFORM pg_sleep(2); END IF;"
            " IF NEW.subject = 'svc-bad' THEN RAISE EXCEPTION 'refused row'; END IF;"
            " RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_bad BEFORE INSERT ON certificates"
            " FOR EACH ROW EXECUTE FUNCTION refuse_bad()"
        )
    names = ["svc-0", "svc-bad", "svc-1", "svc-2"]
    async with serving(pki, clock):
        bad = SignRequest(
            build_csr(new_private_key(), "svc-bad", ["svc-bad"]), pki.token("svc-bad")
        )
        requests = [
            bad
            if n == "svc-bad"
            else SignRequest(build_csr(new_private_key(), n, [n]), pki.token(n))
            for n in names
        ]
        async with pki.client() as client:
            # The slow one holds the commit thread, so the others are committed as one group.
            slow = asyncio.ensure_future(sign(pki, pki.token("svc-slow"), "svc-slow"))
            await wait_until(lambda: rows(pg, "used_tokens") == 0 and _waiting(pg), timeout=30)
            answers = await asyncio.gather(
                *(client.sign(r) for r in requests), return_exceptions=True
            )
            await slow
            by_name = dict(zip(names, answers, strict=True))
            refusal = by_name.pop("svc-bad")
            assert isinstance(refusal, CARefusedError), refusal
            assert (refusal.status, refusal.body) == (503, UNAVAILABLE)
            for name, answer in by_name.items():
                assert not isinstance(answer, BaseException), (name, answer)
                assert common_name(answer.chain[0].subject) == name
            with psycopg.connect(pg, autocommit=True) as conn:
                found = conn.execute("SELECT subject FROM certificates").fetchall()
                assert sorted(r[0] for r in found) == ["svc-0", "svc-1", "svc-2", "svc-slow"]
                assert rows(pg, "used_tokens") == 4
                conn.execute("DROP TRIGGER refuse_bad ON certificates")
            again = await client.sign(bad)
    assert common_name(again.chain[0].subject) == "svc-bad"
    assert (rows(pg, "certificates"), rows(pg, "used_tokens")) == (5, 5)


def _waiting(url: str) -> bool:
    """Whether a session other than this one is inside pg_sleep (the slow insert)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
            " AND pid <> pg_backend_pid() AND datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0]) > 0
