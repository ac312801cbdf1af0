"""What the CA's store syncs to disk.

Every commit reaches the operating system before the CA answers, so it survives the CA process
being killed. A commit is also synced to disk (``synchronous=FULL`` for that transaction) when
a power cut that lost it could reopen a replay or undo a revocation: a revocation, a token the
CA's start-time check would not refuse after a restart (no ``iat``, an ``iat`` in the future,
``disableIssuedAtCheck``), and a renew token. Statements are observed with SQLite's own trace
hook on the running CA's connection.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from federatls import CARefusedError
from federatls._keys import build_csr, new_private_key
from federatls._protocol import RevokeRequest, SignRequest
from federatls._token import mint_renew_token
from federatls.ca import CAServer, SQLiteStore
from federatls.ca._store import IssuedCertificate, TokenUse, _Checkpointer

from harness import PKI, serving, start_serving, wait_until

pytestmark = pytest.mark.anyio


@dataclass
class Commit:
    synced: bool  # committed under synchronous=FULL
    statements: list[str]

    def writes(self, table: str) -> bool:
        return any(f"INTO {table}" in s for s in self.statements)


@contextmanager
def commits(ca: CAServer) -> Iterator[list[Commit]]:
    """The write transactions the CA commits inside the block."""
    store = ca.authority.store
    assert isinstance(store, SQLiteStore)
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    done: list[Commit] = []
    try:
        yield done
    finally:
        store._conn.set_trace_callback(None)
        level, current = "NORMAL", list[str]()
        for s in statements:
            if s.startswith("PRAGMA synchronous="):
                level = s.split("=", 1)[1]
            elif s == "BEGIN IMMEDIATE":
                current = []
            elif s == "COMMIT":
                done.append(Commit(level == "FULL", current))
            else:
                current.append(s)


async def _sign(pki: PKI, token: str, subject: str = "svc") -> None:
    async with pki.client() as client:
        await client.sign(SignRequest(build_csr(new_private_key(), subject, [subject]), token))


async def test_a_sign_token_with_a_past_iat_is_not_synced(ca: CAServer, pki: PKI) -> None:
    """The common case: ``step ca token`` sets ``iat``; after a restart the CA refuses tokens
    issued before it started, so a power cut losing this record cannot reopen a replay."""
    with commits(ca) as done:
        await _sign(pki, pki.token("svc"))
    assert len(done) == 1
    assert done[0].writes("used_tokens")
    assert done[0].writes("certificates")
    assert not done[0].synced


@pytest.mark.parametrize(
    "claims",
    [{"iat": None}, {"iat": "future"}],
    ids=["no-iat", "iat-in-the-future"],
)
async def test_a_sign_token_the_restart_check_would_miss_is_synced(
    ca: CAServer, pki: PKI, claims: dict[str, object]
) -> None:
    """The twins: without an ``iat``, or with one after this second (within the leeway),
    nothing but the store refuses a replay after a power cut and a restart."""
    if claims["iat"] == "future":
        claims = {"iat": int(pki.clock().timestamp()) + 30}
    with commits(ca) as done:
        await _sign(pki, pki.forge(pki.claims("svc", **claims)))
    assert [c.synced for c in done] == [True]
    assert done[0].writes("certificates")


async def test_every_token_is_synced_when_the_iat_check_is_off(pki: PKI) -> None:
    pki.edit(lambda d: d["authority"].__setitem__("disableIssuedAtCheck", True))
    async with serving(pki) as ca:
        with commits(ca) as done:
            await _sign(pki, pki.token("svc"))
    assert [c.synced for c in done] == [True]


async def test_a_refused_csr_spends_its_token_without_sync(ca: CAServer, pki: PKI) -> None:
    """A refused request still spends its token (as step-ca), under the same rule."""
    token = pki.token("svc")
    with commits(ca) as done, pytest.raises(CARefusedError):
        await _sign(pki, token, subject="someone-else")
    assert [(c.synced, c.writes("used_tokens"), c.writes("certificates")) for c in done] == [
        (False, True, False)
    ]


async def test_revocations_are_synced(ca: CAServer, pki: PKI) -> None:
    """A revocation by token is one synced commit: the token spent with the revocation."""
    chain, _ = await pki.enroll("svc")
    serial = str(chain[0].serial_number)
    with commits(ca) as done:
        async with pki.client() as client:
            await client.revoke(RevokeRequest(serial, ott=pki.token(serial, revoke=True)))
    revocation = [c for c in done if c.writes("revocations")]
    # One commit spends the revoke token and records the revocation, synced (the token's
    # past iat alone would not need it, the revocation does).
    assert [c.synced for c in revocation] == [True]
    assert revocation[0].writes("used_tokens")
    assert [c for c in done if c.writes("used_tokens")] == revocation


async def test_renew_tokens_are_synced(ca: CAServer, pki: PKI) -> None:
    """Renew tokens are not checked against the CA's start time, so their records are."""
    chain, key = await pki.enroll("svc")
    token = mint_renew_token(chain, key, audience=f"{pki.url}/1.0/renew", now=pki.clock())
    with commits(ca) as done:
        async with pki.client() as client:
            await client.renew_with_token(token)
    spend = [c for c in done if c.writes("used_tokens")]
    assert [c.synced for c in spend] == [True]


async def test_a_killed_ca_keeps_what_it_answered(pki: PKI) -> None:
    """Unsynced commits still reach the operating system before the answer: SIGKILL right
    after a certificate is handed out loses neither it nor its spent token."""
    proc, line = await start_serving(pki)
    assert line.startswith("Serving HTTPS on "), line
    pki.url = line.split()[3]
    claims = pki.claims("svc")
    try:
        async with pki.client() as client:
            key = new_private_key()
            answer = await client.sign(
                SignRequest(build_csr(key, "svc", ["svc"]), pki.forge(claims))
            )
    finally:
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == -signal.SIGKILL
    store = SQLiteStore(pki.config.parent / "federatls.db")
    try:
        record = store.get_certificate(str(answer.leaf.serial_number))
        assert record is not None
        assert record.subject == "svc"
        assert store.token_used(claims["jti"])
        assert not store.token_used(pki.claims("svc")["jti"])  # the twin: a token never sent
    finally:
        store.close()


# --- Checkpoints of the write-ahead log -----------------------------------------------------
def _record(store: SQLiteStore, count: int) -> None:
    """``count`` sign commits, each a spent token and a 2 KiB certificate record."""
    now = datetime.now(UTC)
    for i in range(count):
        cert = IssuedCertificate(
            f"{now.timestamp()}{i}", "svc", ("svc",), now, now, "p", os.urandom(2048)
        )
        use = TokenUse(f"jti-{now.timestamp()}-{i}", "p", now + timedelta(minutes=5), now, cert)
        assert store.record_issuances([use]) == [True]


@pytest.mark.parametrize("interval", [0.02, None], ids=["thread", "sqlite-default"])
async def test_checkpoints_run_in_their_own_thread(tmp_path: Path, interval: float | None) -> None:
    """The CA's store checkpoints from a thread of its own: 50 commits (under SQLite's
    1,000-page threshold) reach the database file without another commit. The twin, the
    default store, checkpoints only inside a commit that crosses the threshold, so the same
    50 commits stay in the log."""
    path = tmp_path / "federatls.db"
    store = SQLiteStore(path, checkpoint_interval=interval)
    try:
        empty = path.stat().st_size
        automatic = store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        assert automatic == (1000 if interval is None else 0)  # 0: no checkpoint in a commit
        _record(store, 50)
        if interval is None:
            await asyncio.sleep(0.2)  # ten of the other store's checkpoint intervals
            assert path.stat().st_size == empty
        else:
            checkpointer = store._checkpointer
            assert checkpointer is not None
            # The pages reach the file during the checkpoint call, which is counted after it
            # returns: wait for both.
            await wait_until(
                lambda: checkpointer.checkpoints >= 1 and path.stat().st_size > empty + 50 * 2048
            )
    finally:
        store.close()
    assert not (tmp_path / "federatls.db-wal").exists()  # the last connection cleaned up
    reopened = SQLiteStore(path)
    try:
        assert reopened.counts()["certificates"] == 50
    finally:
        reopened.close()


async def test_a_grown_log_is_truncated(tmp_path: Path) -> None:
    """When the log has grown past its limit (commits so frequent that no passive
    checkpoint completed), the checkpointer truncates it to nothing; below the limit it
    keeps the file for reuse (the twin)."""
    path = tmp_path / "federatls.db"
    wal = tmp_path / "federatls.db-wal"
    store = SQLiteStore(path)  # SQLite's own checkpoints: none within 20 commits
    try:
        _record(store, 20)
        grown = wal.stat().st_size
        keeper = _Checkpointer(path, 0.02, max_wal_bytes=grown + 1)
        try:
            await wait_until(lambda: keeper.checkpoints >= 2)
            assert wal.stat().st_size == grown  # passive: copied back, file kept
        finally:
            keeper.stop()
        truncator = _Checkpointer(path, 0.02, max_wal_bytes=grown - 1)
        try:
            await wait_until(lambda: wal.stat().st_size == 0)
        finally:
            truncator.stop()
        _record(store, 1)  # the store goes on writing into the truncated log
        assert store.counts()["certificates"] == 21
    finally:
        store.close()


def _chattr(flag: str, path: Path) -> bool:
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, flag, str(path)], capture_output=True).returncode == 0


async def test_a_failing_checkpoint_is_logged_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint that cannot write the database file (made immutable here) is logged
    once, not every interval, and the commits go on into the log; once the file is
    writable again the next checkpoint succeeds, says so and copies them back."""
    path = tmp_path / "federatls.db"
    store = SQLiteStore(path, checkpoint_interval=0.02)
    try:
        if not _chattr("+i", path):
            pytest.skip("chattr +i is not available here (needs root on ext2/3/4)")
        try:
            empty = path.stat().st_size
            _record(store, 20)
            await wait_until(lambda: "failed, retrying" in caplog.text)
            await asyncio.sleep(0.2)  # ten more intervals, all failing
            assert caplog.text.count("failed, retrying") == 1
            assert path.stat().st_size == empty
        finally:
            assert _chattr("-i", path)
        await wait_until(lambda: "works again" in caplog.text)
        await wait_until(lambda: path.stat().st_size > empty + 20 * 2048)
    finally:
        store.close()
    assert caplog.text.count("failed, retrying") == 1
