"""Hostile inputs against the CA on PostgreSQL and its ``ca db`` commands, against a real
throwaway cluster (the ``postgres`` fixture): databases holding tables that are not
federatls's, values PostgreSQL's text refuses, SQLite files with rows that cannot be read.
Each attack has its twin that the same path serves."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import socket
import sqlite3
import ssl
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from joserfc import jws

from federatls import CARefusedError
from federatls._keys import build_csr, new_private_key
from federatls._protocol import RevokeRequest, SignRequest, SignResponse
from federatls._token import mint_renew_token
from federatls._x509 import common_name
from federatls.ca import CAServer
from federatls.ca._database import Database, init_schema
from test_ca_database import (
    UNAVAILABLE,
    password_of,
    refused,
    rows,
    serving,
    sign,
    tables,
)

from harness import PASSWORD, PKI, FakeClock, assert_one_line_error, federatls, use_postgres
from postgres import PostgresCluster

pytestmark = pytest.mark.anyio


# Databases that hold someone else's tables ------------------------------------------------------
FOREIGN = [
    ("used_tokens", "CREATE TABLE used_tokens (token_id text PRIMARY KEY)"),
    ("certificates", "CREATE TABLE certificates (x integer); INSERT INTO certificates VALUES (1)"),
    ("federatls_schema", "CREATE TABLE federatls_schema (foo integer)"),
    (
        "revocations",
        "CREATE TABLE revocations (serial text, reason_code integer, reason text,"
        " provisioner text, token_id text, mtls boolean, revoked_at timestamptz)",
    ),  # the columns, but no primary key: ON CONFLICT (serial) would fail on every revoke
    ("state", "CREATE TABLE state (key text PRIMARY KEY, value text)"),  # text, not bytea
]


@pytest.mark.parametrize(("table", "ddl"), FOREIGN, ids=[t for t, _ in FOREIGN])
async def test_db_init_refuses_a_table_that_is_not_federatls(
    pki: PKI, pg_url: str, table: str, ddl: str
) -> None:
    """``ca db init`` on a database where a table of federatls's name has another shape
    (half-made, someone else's) is one line naming the table, exit 1, and creates nothing
    (``ca serve`` then refuses the database as having no schema). Twin: with that table
    dropped, the same command creates the schema."""
    use_postgres(pki, pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(ddl)
    run = await federatls("ca", "db", "init", pki.config)
    assert_one_line_error(run, f"table {table} ", "not federatls's")
    assert password_of(pg_url) not in run.err
    assert tables(pg_url) == {table}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table}")
    run = await federatls("ca", "db", "init", pki.config)
    assert (run.code, run.err) == (0, ""), run
    assert "created the federatls schema" in run.out
    assert tables(pg_url) == {
        "federatls_schema", "used_tokens", "certificates", "revocations", "state"
    }  # fmt: skip


async def test_serve_names_a_foreign_schema_table_not_an_unreachable_server(
    pki: PKI, pg_url: str
) -> None:
    """``ca serve`` on a database whose ``federatls_schema`` table is someone else's: one
    line saying the database holds no federatls schema, not that the server cannot be
    reached (it answered). Twin: once ``ca db init`` made the schema in a database of its
    own, the same serve command gets past the check (refused later only by its port)."""
    use_postgres(pki, pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE federatls_schema (foo integer)")
    serve = ("ca", "serve", pki.config, "--password-file", pki.password_file)
    run = await federatls(*serve)
    line = assert_one_line_error(run, "no federatls schema", "federatls ca db init")
    assert "cannot reach" not in line
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE federatls_schema")
    init_schema(Database("postgresql", pg_url))
    with socket.socket() as held:  # the CA's port taken: serve stops after the database
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        pki.edit(lambda d: d.__setitem__("address", f"127.0.0.1:{port}"))
        run = await federatls(*serve)
    assert_one_line_error(run, str(port))


async def test_serve_with_the_schema_table_locked_is_one_line_not_a_hang(pki: PKI, pg: str) -> None:
    """``ca serve`` while an operator's transaction holds the schema's table locked stops
    after the CA's bounded lock wait with one line saying so (it waited for as long as the
    lock was held, silently: a replica restarted during an operator's work hung). Twin:
    once the lock is released, the same serve command gets past the check (refused later
    only by its port)."""
    serve = ("ca", "serve", pki.config, "--password-file", pki.password_file)
    operator = psycopg.connect(pg)
    try:
        operator.execute("LOCK TABLE federatls_schema IN ACCESS EXCLUSIVE MODE")
        with anyio.fail_after(60):
            run = await federatls(*serve)
        line = assert_one_line_error(run, "locked")
        assert "no federatls schema" not in line
    finally:
        operator.rollback()
        operator.close()
    with socket.socket() as held:  # the CA's port taken: serve stops after the database
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        pki.edit(lambda d: d.__setitem__("address", f"127.0.0.1:{port}"))
        run = await federatls(*serve)
    assert_one_line_error(run, str(port))


# Values PostgreSQL's text refuses, on both stores -----------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, pki: PKI, postgres: PostgresCluster) -> str:
    """``pki``'s ca.json on its SQLite file, or on a fresh PostgreSQL database."""
    if request.param == "postgresql":
        url = postgres.new_database()
        init_schema(Database("postgresql", url))
        use_postgres(pki, url)
    return str(request.param)


async def _sign_with(pki: PKI, claims: dict[str, Any]) -> SignResponse:
    subject = claims["sub"]
    request = SignRequest(build_csr(new_private_key(), subject, [subject]), pki.forge(claims))
    async with pki.client() as client:
        return await client.sign(request)


@pytest.mark.parametrize(
    "jti",
    ["a\x00b", "\x00", "'); DELETE FROM used_tokens; --", secrets.token_urlsafe(6000)],
    ids=["nul-inside", "nul-alone", "sql-shaped", "8000-random-chars"],
)
async def test_a_token_id_postgresql_text_refuses_is_spent_once(
    pki: PKI, clock: FakeClock, store: str, jti: str
) -> None:
    """A validly signed token whose ``jti`` holds a NUL (which PostgreSQL's text refuses),
    or is too long for PostgreSQL's index (both were 503s there), or is SQL-shaped, buys its
    certificate once on either store, and another id differing only after the NUL buys its
    own, as do the id with U+FFFD for its NULs and the id written as its own digest (what
    PostgreSQL keeps for it). Twin: the very same token again is refused as used (401), not
    mistaken for another id nor accepted twice."""
    async with serving(pki, clock):
        claims = pki.claims("svc", jti=jti)
        await _sign_with(pki, claims)
        refusal = await refused(_sign_with(pki, claims))
        assert refusal.status == 401
        await _sign_with(pki, pki.claims("svc", jti=jti + "\x00more"))
        # Nor does an id collide with what the store keeps for this one: its NULs as
        # U+FFFD (free text's mending), or its digest written out as the id itself.
        if "\x00" in jti:
            await _sign_with(pki, pki.claims("svc", jti=jti.replace("\x00", "\ufffd")))
        digest = hashlib.sha256(jti.encode()).hexdigest()
        await _sign_with(pki, pki.claims("svc", jti="\x01federatls-sha256:" + digest))


async def test_a_token_id_with_a_lone_surrogate_is_spent_once(
    pki: PKI, clock: FakeClock, store: str
) -> None:
    """A validly signed token whose ``jti`` is an escaped lone surrogate (valid JSON,
    not encodable for a store or a log; it was a 500 on both stores) is read as step-ca's
    Go decoder reads it, U+FFFD, and buys its certificate once. Twin: again, 401."""
    async with serving(pki, clock):
        claims = pki.claims("svc")
        payload = json.dumps({**claims, "jti": "\ud800"})
        assert "\\ud800" in payload
        header = {"alg": "ES256", "kid": pki.key.kid, "typ": "JWT"}
        token = jws.serialize_compact(header, payload, pki.key.key, algorithms=["ES256"])
        request = SignRequest(build_csr(new_private_key(), "svc", ["svc"]), token)
        async with pki.client() as client:
            await client.sign(request)
            refusal = await refused(client.sign(request))
        assert refusal.status == 401


async def test_a_revocation_reason_holding_nul_is_honoured(
    pki: PKI, clock: FakeClock, store: str
) -> None:
    """A revocation whose free-text reason holds a NUL is recorded on either store (it
    was a 503 on PostgreSQL, which left the certificate unrevoked). Twin: renewing the
    revoked certificate is then refused, and revoking it again is a 400."""
    async with serving(pki, clock):
        chain, key = await pki.enroll("svc")
        serial = str(chain[0].serial_number)
        revoke = RevokeRequest(serial, ott=pki.token(serial, revoke=True), reason="lost\x00key")
        async with pki.client() as client:
            await client.revoke(revoke)
        async with pki.client((chain, key)) as client:
            assert (await refused(client.renew())).status == 401
        again = RevokeRequest(serial, ott=pki.token(serial, revoke=True))
        async with pki.client() as client:
            assert (await refused(client.revoke(again))).status == 400


async def test_a_serial_holding_nul_is_not_issued_here(
    pki: PKI, clock: FakeClock, store: str
) -> None:
    """Revoking serial "1<NUL>" with a validly signed token for it is refused on either store
    (it was a 503 on PostgreSQL, whose text cannot hold it): since step-ca 0.22 a serial is
    read as a number, so it is a 400 malformed serial before any store sees it. Twin: the
    certificate's real serial, same path, is revoked."""
    async with serving(pki, clock):
        chain, _ = await pki.enroll("svc")
        serial = str(chain[0].serial_number)
        async with pki.client() as client:
            odd = serial + "\x00"
            refusal = await refused(
                client.revoke(RevokeRequest(odd, ott=pki.token(odd, revoke=True)))
            )
            assert refusal.status == 400
            assert "is not a valid serial number" in str(refusal.body)
            await client.revoke(RevokeRequest(serial, ott=pki.token(serial, revoke=True)))


# ca db migrate from a SQLite file with odd rows ------------------------------------------------
async def test_migrate_a_sqlite_row_that_cannot_be_read_is_one_line(
    pki: PKI, clock: FakeClock, pg_url: str
) -> None:
    """A SQLite file whose used-token row has an unreadable expiry is refused in one line
    naming the file (it was a traceback), and nothing is written to the target, not even
    the schema. Twin: with the row mended, and a token id holding a NUL beside it, the copy
    succeeds; the NUL id's token is then refused as used on PostgreSQL."""
    async with serving(pki, clock):
        await sign(pki, pki.token("svc"), "svc")
    source = pki.config.parent / "federatls.db"
    with sqlite3.connect(source) as lite:
        lite.execute(
            "INSERT INTO used_tokens VALUES ('odd', 'p', 'not a time', '2026-01-01T00:00:00')"
        )
    run = await federatls("ca", "db", "migrate", pki.config, "--to", pg_url)
    assert_one_line_error(run, str(source), "not a time")
    assert tables(pg_url) == set()
    clock.advance(5)
    async with serving(pki, clock):
        nul = pki.claims("nul", jti="spent\x00id")
        await _sign_with(pki, nul)
    with sqlite3.connect(source) as lite:
        lite.execute("UPDATE used_tokens SET expires_at = used_at WHERE token_id = 'odd'")
    run = await federatls("ca", "db", "migrate", pki.config, "--to", pg_url)
    assert (run.code, run.err) == (0, ""), run
    assert run.out.startswith("Copied 3 used tokens, 2 certificates, 0 revocations")
    async with serving(pki, clock, database=Database("postgresql", pg_url)):
        assert (await refused(_sign_with(pki, nul))).status == 401


# A revocation racing a renewal ------------------------------------------------------------------
async def _waiting_on_a_lock(url: str) -> None:
    """Until a backend of the database waits for a lock (bounded)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(600):
            sql = "SELECT count(*) FROM pg_locks WHERE NOT granted"
            row = conn.execute(sql).fetchone()
            if row is not None and row[0] > 0:
                return
            await asyncio.sleep(0.05)
    raise TimeoutError("no request came to wait for the lock")


async def test_a_renewal_whose_parent_is_revoked_meanwhile_is_refused(
    pki: PKI, clock: FakeClock, pg: str
) -> None:
    """A renewal that passed its "not revoked" check and is then held (an operator's lock
    on used_tokens stalls its token's spending) while the holder revokes the certificate
    (answered 200 meanwhile) is refused once it goes on, and records nothing: from the
    moment a revocation is answered no renewal of that certificate succeeds (it was a
    201). Twin: the same renewal with no revocation in between is a 201."""
    async with serving(pki, clock):
        for revoked_meanwhile in (True, False):
            chain, key = await pki.enroll("svc")
            token = mint_renew_token(chain, key, audience=f"{pki.url}/1.0/renew", now=clock())
            operator = psycopg.connect(pg)
            try:
                operator.execute("LOCK TABLE used_tokens IN EXCLUSIVE MODE")
                async with pki.client() as client:
                    renewal = asyncio.ensure_future(client.renew_with_token(token))
                    await _waiting_on_a_lock(pg)
                    if revoked_meanwhile:
                        async with pki.client((chain, key)) as holder:
                            await holder.revoke(RevokeRequest(str(chain[0].serial_number)))
                    operator.rollback()
                    if revoked_meanwhile:
                        assert (await refused(renewal)).status == 401
                    else:
                        await renewal
            finally:
                operator.close()
        assert rows(pg, "certificates") == 3  # two enrolled, one renewed
        assert rows(pg, "revocations") == 1


# An operator's lock ------------------------------------------------------------------------------
async def test_a_lock_held_by_an_operator_is_a_503_not_a_hang(
    pki: PKI, clock: FakeClock, pg: str
) -> None:
    """While an operator's transaction holds used_tokens locked, more signs than the CA has
    store threads are each answered 503 with step-ca's body within the client's deadline
    (they were queued behind 15 s waits, past it), and /health answers meanwhile (it was
    queued behind them). Twin: once the lock is released, the very same requests sign."""
    names = [f"svc-{i}" for i in range(8)]
    async with serving(pki, clock):
        requests = [SignRequest(build_csr(new_private_key(), n, [n]), pki.token(n)) for n in names]
        operator = psycopg.connect(pg)
        try:
            operator.execute("LOCK TABLE used_tokens IN ACCESS EXCLUSIVE MODE")
            async with pki.client() as client:
                signing = asyncio.gather(
                    *(client.sign(r) for r in requests), return_exceptions=True
                )
                verify = ssl.create_default_context(cafile=str(pki.root_path))
                async with httpx.AsyncClient(verify=verify, timeout=10) as http:
                    await asyncio.sleep(0.5)
                    health = await http.get(pki.url + "/health")
                assert health.status_code in (200, 503), health.text
                for answer in await signing:
                    assert isinstance(answer, CARefusedError), answer
                    assert (answer.status, answer.body) == (503, UNAVAILABLE)
        finally:
            operator.rollback()
            operator.close()
        async with pki.client() as client:
            signed = await asyncio.gather(*(client.sign(r) for r in requests))
    assert [common_name(s.chain[0].subject) for s in signed] == names


async def _waiting_or_done(url: str, count: int, call: asyncio.Future[Any]) -> None:
    """Until ``count`` backends of the database wait for a lock, or ``call`` is answered
    (it did not wait), bounded."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(600):
            sql = "SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted"
            row = conn.execute(sql).fetchone()
            if (row is not None and row[0] >= count) or call.done():
                return
            await asyncio.sleep(0.02)
    raise TimeoutError(f"{count} requests did not come to wait for a lock")


async def test_a_renewal_on_one_ca_behind_a_revocation_in_progress_on_another_is_refused(
    pki: PKI, clock: FakeClock, pg: str
) -> None:
    """Two CAs on one database: a revocation in progress on the first (held at its write
    by an operator's lock on revocations, the certificate's row already locked) and an mTLS
    renewal of that certificate reaching the second meanwhile (past its "not revoked"
    read): once the revocation is answered, the renewal is refused 401 and records
    nothing. Twin: the same, the revocation being another certificate's: the renewal
    is a 201."""
    async with (
        CAServer.running(pki.config, PASSWORD, clock=clock) as first,
        CAServer.running(pki.config, PASSWORD, clock=clock) as second,
    ):
        pki.clock = clock
        for same in (True, False):
            pki.url = first.url
            chain, key = await pki.enroll("svc")
            other, other_key = await pki.enroll("other")
            target = (chain, key) if same else (other, other_key)
            operator = psycopg.connect(pg)
            try:
                operator.execute("LOCK TABLE revocations IN EXCLUSIVE MODE")
                async with pki.client(target) as holder:
                    revoking = asyncio.ensure_future(
                        holder.revoke(RevokeRequest(str(target[0][0].serial_number)))
                    )
                    await _waiting_or_done(pg, 1, revoking)
                    pki.url = second.url
                    async with pki.client((chain, key)) as client:
                        renewal = asyncio.ensure_future(client.renew())
                        # The same certificate's renewal waits for the revocation's row lock.
                        await _waiting_or_done(pg, 2, renewal)
                        operator.rollback()
                        await revoking
                        if same:
                            assert (await refused(renewal)).status == 401
                        else:
                            await renewal
            finally:
                operator.close()
        assert rows(pg, "certificates") == 5  # four enrolled, one renewed
        assert rows(pg, "revocations") == 2
