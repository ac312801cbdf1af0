"""The CA while another process holds its database's write lock.

A ``sqlite3`` process takes the write lock on the running CA's file (``BEGIN EXCLUSIVE``;
in WAL mode readers go on, and no other process can shut them out while the CA has the file
open, since every connection holds a shared lock on it). Meanwhile the CA must stay live
(``/health``, new TLS handshakes) and answer what needs the database with 503 and step-ca's
error body, issuing and recording nothing and spending no token; once the lock is gone, the
same request succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from federatls import CARefusedError
from federatls._client import CAClient
from federatls._errors import StoreBusyError
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import RekeyRequest, RevokeRequest, SignRequest
from federatls._token import Token, mint_renew_token
from federatls.ca import CAServer, SQLiteStore
from federatls.ca._store import IssuedCertificate, StoreWouldWait, TokenUse, without_waiting

from harness import PKI, start_serving

pytestmark = pytest.mark.anyio

LIVE = 3.0  # seconds: the liveness bound for /health and a handshake (the CA waits longer)

# Takes the lock, says so, and holds it until its stdin closes (or 60 s, a safety net).
_LOCKER = """
import sqlite3, sys, select
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO used_tokens VALUES ('locker', 'x', 'x', 'x')")
print("locked", flush=True)
select.select([sys.stdin], [], [], 60)
conn.execute("ROLLBACK")
"""


class Lock:
    """A process holding the write lock of a SQLite file until ``release``."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def release(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            await asyncio.wait_for(self.proc.wait(), 30)


async def hold_lock(db: Path) -> Lock:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _LOCKER,
        str(db),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)) == b"locked\n"
    return Lock(proc)


@pytest.fixture
async def ca_process(pki: PKI) -> AsyncIterator[PKI]:
    """``federatls ca serve`` on ``pki`` in its own process."""
    proc, line = await start_serving(pki)
    try:
        assert line.startswith("Serving HTTPS on "), line
        pki.url = line.split()[3]
        yield pki
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _client(
    pki: PKI, identity: tuple[list[x509.Certificate], PrivateKey] | None = None
) -> CAClient:
    return CAClient(pki.url, [pki.root], identity=identity, timeout=60)


def _rows(pki: PKI) -> dict[str, set[str]]:
    """The keys of every table, read from the file (after the lock is gone)."""
    with sqlite3.connect(pki.config.parent / "federatls.db") as conn:
        return {
            "used_tokens": {r[0] for r in conn.execute("SELECT token_id FROM used_tokens")},
            "certificates": {r[0] for r in conn.execute("SELECT serial FROM certificates")},
            "revocations": {r[0] for r in conn.execute("SELECT serial FROM revocations")},
        }


async def _assert_live(pki: PKI) -> None:
    """``/health`` answers and a new TLS handshake completes, each within ``LIVE``."""
    async with _client(pki) as client:
        assert await asyncio.wait_for(client.health(), LIVE) == "ok"
    ctx = ssl.create_default_context(cadata=pki.root.public_bytes(Encoding.PEM).decode())
    host, port = pki.url.removeprefix("https://").rsplit(":", 1)
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host), LIVE
    )
    writer.close()


def _assert_503(exc: CARefusedError) -> None:
    assert exc.status == 503
    assert exc.body is not None
    assert set(exc.body) == {"status", "message"}
    assert exc.body["status"] == 503
    assert "certificate authority" in exc.body["message"]


async def test_a_locked_database_answers_503_and_the_ca_stays_live(ca_process: PKI) -> None:
    """While another process holds the lock, ``/health`` and handshakes go on, and a sign
    answers 503 with step-ca's body, issuing nothing and leaving its token unspent."""
    pki = ca_process
    db = pki.config.parent / "federatls.db"
    claims = pki.claims("svc")
    token = pki.forge(claims)
    request = SignRequest(build_csr(new_private_key(), "svc", ["svc"]), token)
    before = _rows(pki)
    lock = await hold_lock(db)
    try:
        async with _client(pki) as client:
            sign = asyncio.ensure_future(client.sign(request))
            await asyncio.sleep(0.5)  # the sign is waiting for the lock by now
            assert not sign.done()
            await _assert_live(pki)
            with pytest.raises(CARefusedError) as refused:
                await sign
        _assert_503(refused.value)
    finally:
        await lock.release()
    assert _rows(pki) == before  # nothing issued, the token not spent
    async with _client(pki) as client:  # Twin: the same token signs once the lock is gone.
        answer = await client.sign(request)
    after = _rows(pki)
    assert after["certificates"] == before["certificates"] | {str(answer.leaf.serial_number)}
    assert claims["jti"] in after["used_tokens"]


async def test_renew_rekey_and_revoke_answer_503_under_the_lock(ca_process: PKI) -> None:
    """Renew (over mTLS and by token), rekey and revoke under the lock answer 503 and change
    nothing; the same requests, with the same renew and revoke tokens, succeed once the
    lock is released (twin)."""
    pki = ca_process
    db = pki.config.parent / "federatls.db"
    chain, key = await pki.enroll("svc")
    serial = str(chain[0].serial_number)
    renew_token = mint_renew_token(chain, key, audience=f"{pki.url}/1.0/renew", now=pki.clock())
    revoke_token = pki.token(serial, revoke=True)
    rekey = RekeyRequest(build_csr(new_private_key(), "svc", ["svc"]))
    before = _rows(pki)
    lock = await hold_lock(db)
    try:
        async with _client(pki, (chain, key)) as holder, _client(pki) as client:
            answers = await asyncio.gather(
                holder.renew(),
                holder.rekey(rekey),
                client.renew_with_token(renew_token),
                client.revoke(RevokeRequest(serial, ott=revoke_token)),
                return_exceptions=True,
            )
    finally:
        await lock.release()
    for answer in answers:
        assert isinstance(answer, CARefusedError), answer
        _assert_503(answer)
    assert _rows(pki) == before
    async with _client(pki, (chain, key)) as holder, _client(pki) as client:
        issued = [
            await holder.renew(),
            await holder.rekey(rekey),
            await client.renew_with_token(renew_token),
        ]
        await client.revoke(RevokeRequest(serial, ott=revoke_token))
    after = _rows(pki)
    new = {str(answer.leaf.serial_number) for answer in issued}
    assert len(new) == 3
    assert after["certificates"] == before["certificates"] | new
    assert after["revocations"] == {serial}


def _use(jti: str, *, durable: bool = False) -> TokenUse:
    now = datetime.now(UTC)
    cert = IssuedCertificate(jti, "svc", ("svc",), now, now, "p:k", b"der")
    return TokenUse(jti, "p:k", now + timedelta(minutes=5), now, cert, durable=durable)


async def test_the_store_waits_boundedly_or_not_at_all(tmp_path: Path) -> None:
    """Under another connection's write lock, a commit inside ``without_waiting()`` raises
    ``StoreWouldWait`` at once and one outside raises ``StoreBusyError`` after the busy
    timeout, both recording nothing; reads go on (WAL), and once the lock is gone the same
    commits succeed (twin)."""
    store = SQLiteStore(tmp_path / "federatls.db", busy_timeout=0.2)
    other = sqlite3.connect(tmp_path / "federatls.db", isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with without_waiting(), pytest.raises(StoreWouldWait):
            store.record_issuances([_use("a")])
        with pytest.raises(StoreBusyError) as busy:
            store.record_issuances([_use("a")])
        assert not isinstance(busy.value, StoreWouldWait)
        with without_waiting():
            assert not store.token_used("a")
        assert store.get_certificate("a") is None
        other.execute("ROLLBACK")
        with without_waiting():
            assert store.record_issuances([_use("a")]) == [True]
            with pytest.raises(StoreWouldWait):  # a sync to disk is a wait too
                store.record_issuances([_use("b", durable=True)])
        assert store.record_issuances([_use("b", durable=True)]) == [True]
        assert store.counts()["certificates"] == 2
    finally:
        other.close()
        store.close()


@contextlib.contextmanager
def _locked_after_first_write(store: SQLiteStore) -> Iterator[sqlite3.Connection]:
    """Another connection takes the file's write lock the moment the store's first write
    transaction ends: any second transaction of the same request finds the lock."""
    locker = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    transaction = store._transaction

    @contextlib.contextmanager
    def then_lock(*, durable: bool) -> Iterator[None]:
        with transaction(durable=durable):
            yield
        if not locker.in_transaction:
            locker.execute("BEGIN EXCLUSIVE")

    store._transaction = then_lock  # type: ignore[method-assign]
    store.busy_timeout = 0.5
    try:
        yield locker
    finally:
        del store._transaction
        store.busy_timeout = 5.0
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()


def _table_rows(store: SQLiteStore) -> dict[str, set[str]]:
    return {
        "used_tokens": {r[0] for r in store._conn.execute("SELECT token_id FROM used_tokens")},
        "certificates": {r[0] for r in store._conn.execute("SELECT serial FROM certificates")},
        "revocations": {r[0] for r in store._conn.execute("SELECT serial FROM revocations")},
    }


async def test_a_lock_after_one_write_leaves_nothing_half_done(ca: CAServer, pki: PKI) -> None:
    """A lock taken right after the first write of a renew or a revoke by token leaves it
    done whole (token spent with its certificate or revocation) or not at all (503, token
    unspent), never a spent token with nothing to show for it; twin: the tokens then work."""
    store = ca.authority.store
    assert isinstance(store, SQLiteStore)
    chain, key = await pki.enroll("svc")
    serial = str(chain[0].serial_number)
    renew_token = mint_renew_token(chain, key, audience=f"{pki.url}/1.0/renew", now=pki.clock())
    revoke_token = pki.token(serial, revoke=True)
    renew_id = Token.parse(renew_token).token_id
    revoke_id = Token.parse(revoke_token).token_id
    for what in ("renew", "revoke"):
        before = _table_rows(store)
        with _locked_after_first_write(store):
            async with _client(pki) as client:
                try:
                    if what == "renew":
                        await client.renew_with_token(renew_token)
                    else:
                        await client.revoke(RevokeRequest(serial, ott=revoke_token))
                except CARefusedError as exc:
                    _assert_503(exc)
        after = _table_rows(store)
        changed = {table for table in after if after[table] != before[table]}
        assert changed in (set(), {"used_tokens", "certificates"}, {"used_tokens", "revocations"})
    # Twin: once the lock is gone, the same tokens renew and revoke (once each).
    async with _client(pki) as client:
        if renew_id not in _table_rows(store)["used_tokens"]:
            await client.renew_with_token(renew_token)
        if serial not in _table_rows(store)["revocations"]:
            await client.revoke(RevokeRequest(serial, ott=revoke_token))
    rows = _table_rows(store)
    assert {renew_id, revoke_id} <= rows["used_tokens"]
    assert serial in rows["revocations"]


async def test_many_signs_under_a_long_lock_all_answer_503(ca_process: PKI) -> None:
    """Forty signs at once while the lock is held past the busy timeout: every one answers
    503 (none hangs, none is issued, no token is spent) and ``/health`` stays live; twin:
    once the lock is gone the same forty requests each get a certificate."""
    pki = ca_process
    db = pki.config.parent / "federatls.db"
    requests = [
        SignRequest(build_csr(new_private_key(), "svc", ["svc"]), pki.forge(pki.claims("svc")))
        for _ in range(40)
    ]
    before = _rows(pki)
    lock = await hold_lock(db)
    try:
        async with _client(pki) as client:
            signs = asyncio.gather(*(client.sign(r) for r in requests), return_exceptions=True)
            await asyncio.sleep(1.0)
            await _assert_live(pki)
            answers = await asyncio.wait_for(signs, 50)
    finally:
        await lock.release()
    for answer in answers:
        assert isinstance(answer, CARefusedError), answer
        _assert_503(answer)
    assert _rows(pki) == before
    async with _client(pki) as client:
        issued = await asyncio.gather(*(client.sign(r) for r in requests))
    assert len({answer.leaf.serial_number for answer in issued}) == 40
