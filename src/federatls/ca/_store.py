"""The CA's persistent state behind one small interface (``Store``): used token ids, issued
certificates, revocations, and small named states (a federation peer's last good roots).
``SQLiteStore`` is the embedded default (one file beside ca.json);
``PostgresStore`` (``_postgres``) is the shared database of several CA replicas. Which one a
CA uses is ``_database``'s business, not this module's.

Every method is one transaction, so a crash or a concurrent request never leaves half a
record behind. Several processes may share the file (SQLite's locking, WAL mode).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

from .._errors import ConfigError, StoreBusyError, StoreUnavailableError

__all__ = [
    "IssuedCertificate",
    "ParentRevoked",
    "Revocation",
    "RevokeOutcome",
    "RevokedEntry",
    "SQLiteStore",
    "Store",
    "StoreWouldWait",
    "TokenUse",
    "without_waiting",
]

log = logging.getLogger("federatls.ca")

_NO_WAIT: ContextVar[bool] = ContextVar("federatls_store_no_wait", default=False)


class StoreWouldWait(StoreBusyError):
    """A store call inside ``without_waiting()`` would have had to wait for the database;
    it did nothing."""


class ParentRevoked(Exception):
    """A renewal's or rekey's record was not written: the certificate it replaces
    (``renewed_from``) was revoked before the record's transaction. Checked in that
    transaction, which a revocation of the parent cannot interleave with, so no renewal
    is recorded after a revocation of its parent has been answered."""


@contextlib.contextmanager
def without_waiting() -> Iterator[None]:
    """Within the block (in this thread or task, with no ``await`` inside), a store call
    that would wait for a lock raises ``StoreWouldWait`` at once, having done nothing: how
    the CA's event loop calls the store. Stores that cannot tell may ignore it only if they
    never block."""
    token = _NO_WAIT.set(True)
    try:
        yield
    finally:
        _NO_WAIT.reset(token)


@dataclass(frozen=True)
class IssuedCertificate:
    """What the CA remembers of a certificate it issued, and what it was issued for (the
    audit trail): the token that bought it (``sign``), or the certificate it replaces
    (``renew``, ``rekey``: ``renewed_from``). Rows recorded before federatls kept the
    trail have ``operation`` and ``token_id`` empty."""

    serial: str  # decimal, as step-ca writes serials
    subject: str
    sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    provisioner: str  # "<name>:<kid>", or "" for the CA's own server certificate
    der: bytes
    renewed_from: str | None = None  # the parent's serial, for a renewal or a rekey
    operation: str = ""  # "sign", "renew" or "rekey"
    token_id: str = ""  # the spent token's id (``TokenUse.token_id``), for a sign


@dataclass(frozen=True)
class TokenUse:
    """A one-time token being spent, and the certificate it bought (if any)."""

    token_id: str  # the token's jti (or its SHA-256 when it has none, as step-ca)
    provisioner: str
    expires_at: datetime
    used_at: datetime
    certificate: IssuedCertificate | None = None
    # Whether the record must be on disk (fsync) before the CA answers: True unless a power
    # cut that lost it could not reopen the token's replay (see ``Authority``).
    durable: bool = True


RevokeOutcome = Literal["revoked", "already revoked", "token used"]


class _AlreadyRevoked(Exception):
    """Inside ``SQLiteStore._revoke``: undo the transaction, the serial was revoked before."""


@dataclass(frozen=True)
class Revocation:
    serial: str
    reason_code: int
    reason: str
    revoked_at: datetime
    provisioner: str = ""
    token_id: str = ""
    mtls: bool = False


@dataclass(frozen=True)
class RevokedEntry:
    """A revocation as a CRL lists it, with the revoked certificate's expiry when this CA
    has its record (a CRL leaves out certificates long expired)."""

    serial: str  # decimal
    revoked_at: datetime
    reason_code: int
    not_after: datetime | None


class Store(Protocol):
    """What the CA needs from its database. A call may block its thread, but only for a
    bounded time: one that cannot have the database in time raises ``StoreBusyError``
    having changed nothing, and the CA answers 503. Inside ``without_waiting()`` (the CA's
    event loop) a call must not block at all: where it would wait (for a lock, for a sync
    to disk) it raises ``StoreWouldWait`` having changed nothing, and the CA makes it again
    from a thread."""

    def token_used(self, token_id: str) -> bool:
        """Whether a token id has been used (a read; ``record_issuances`` decides)."""

    def record_issuances(self, issuances: Sequence[TokenUse]) -> list[bool]:
        """In one transaction, for each token use: mark the token used and record the
        certificate it bought, if any; False (and nothing recorded for it) if the token was
        used before (a replay). One transaction for many keeps a busy CA's commits cheap.
        The commit survives a crash of the CA process; it is also synced to disk (surviving
        a power cut) when any of the uses is ``durable``."""

    def add_certificate(self, cert: IssuedCertificate) -> None:
        """Record an issued certificate; ``ParentRevoked`` (nothing recorded) if it renews
        a certificate that has been revoked. ``record_issuances`` raises it likewise, the
        whole transaction undone."""

    def get_certificate(self, serial: str) -> IssuedCertificate | None:
        """The record of an issued certificate, or None."""

    def revoke(self, revocation: Revocation, spend: TokenUse | None = None) -> RevokeOutcome:
        """Record a revocation and spend its token (``spend``, if any) in one transaction,
        synced to disk: "revoked"; or record nothing and say why: "already revoked" (the
        serial), "token used" (a replay)."""

    def is_revoked(self, serial: str) -> bool:
        """Whether the serial has been revoked."""

    def revocations(self) -> list[RevokedEntry]:
        """Every revocation recorded, in no particular order (for the CRL)."""

    def purge_expired(self, now: datetime, *, limit: int = 1000) -> int:
        """Forget at most ``limit`` used token ids whose tokens expired before ``now`` minus
        the retention (a day: by then the token's own ``exp`` refuses it, so forgetting it
        cannot reopen a replay), oldest first, through an index on ``expires_at``; returns
        how many. Certificates and revocations are kept. The CA calls it in a loop while it
        serves, so that the table stays bounded."""

    def check(self) -> None:
        """Raise ``StoreUnavailableError`` saying what is wrong when the database cannot be
        used now (after a bounded wait); return None when it can."""

    def get_state(self, key: str) -> bytes | None:
        """The value last stored under ``key`` by ``put_state`` (by any process or replica
        sharing the database), or None."""

    def put_state(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing what was there, durably (synced to disk
        before it returns). Keys: ``peer:<name>`` (``_federation.PeerState``), ``spiffe:own``,
        ``crl`` (``_crl``)."""

    def swap_state(self, key: str, old: bytes | None, new: bytes) -> bool:
        """Store ``new`` under ``key`` only if the value there is still ``old`` (None: no
        value), in one transaction, durably: True; else change nothing: False. Processes
        sharing the database that replace a value at once: one of them wins."""

    def counts(self) -> dict[str, int]:
        """How many used tokens, certificates and revocations are recorded."""

    def close(self) -> None:
        """Release the database."""

    # True when every commit is durable on the database before a call returns (PostgreSQL
    # with synchronous_commit on), so a restarted CA needs no "token issued before I
    # started" rule (docs/ca.md); False when only some commits are (``TokenUse.durable``).
    every_commit_durable: bool
    # Every call waits (for a server across the network): the CA makes its calls from a
    # thread at once, never trying them on its event loop first (``without_waiting``).
    always_waits: bool


_TABLES = (
    """CREATE TABLE IF NOT EXISTS used_tokens (
    token_id    TEXT PRIMARY KEY,
    provisioner TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    used_at     TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS certificates (
    serial       TEXT PRIMARY KEY,
    subject      TEXT NOT NULL,
    sans         TEXT NOT NULL,
    not_before   TEXT NOT NULL,
    not_after    TEXT NOT NULL,
    provisioner  TEXT NOT NULL,
    renewed_from TEXT,
    der          BLOB NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS revocations (
    serial      TEXT PRIMARY KEY,
    reason_code INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    provisioner TEXT NOT NULL,
    token_id    TEXT NOT NULL,
    mtls        INTEGER NOT NULL,
    revoked_at  TEXT NOT NULL
)""",
    # Version 4: named states (federation peers' roots), one small value per key.
    """CREATE TABLE IF NOT EXISTS state (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
)""",
)
# Columns added since schema version 1, in place (ALTER TABLE), so that every version's file
# ends with the same columns. Version 2: the certificates' audit trail.
_ADDED_COLUMNS = (
    ("certificates", "operation", "TEXT NOT NULL DEFAULT ''"),
    ("certificates", "token_id", "TEXT NOT NULL DEFAULT ''"),
)
# Version 3: the index that purges expired token ids oldest first, in batches.
_INDEXES = ("CREATE INDEX IF NOT EXISTS used_tokens_expires_at ON used_tokens (expires_at)",)
_SCHEMA_VERSION = 4
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6  # primary result codes (sqlite3.h)
# A used token id is kept this long after its token expired; by then the token's own `exp`
# refuses it, so forgetting it cannot re-open a replay.
TOKEN_RETENTION = timedelta(days=1)


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


class SQLiteStore:
    """The embedded store: one SQLite file in WAL mode. A commit reaches the operating
    system before the CA answers, so it survives the CA process crashing or being killed;
    commits that must also survive a power cut (revocations, ``durable`` token uses) are
    synced to disk first (``synchronous=FULL`` for that transaction, NORMAL otherwise).

    Every call waits at most ``busy_timeout`` seconds for the database (another process
    holding its write lock, another thread's call on the same connection), then raises
    ``StoreBusyError`` having changed nothing; inside ``without_waiting()`` it waits not at
    all and raises ``StoreWouldWait`` instead. The CA's event loop makes only calls of the
    second kind (``_server``). In WAL mode reads never wait for a write.

    Checkpoints (copying the write-ahead log back into the database file) run in a thread
    of their own, every ``checkpoint_interval`` seconds, instead of inside whichever commit
    crosses SQLite's threshold: a checkpoint takes milliseconds, and it would hold up the
    commits queued behind it. ``checkpoint_interval=None`` leaves checkpoints to SQLite
    (``wal_autocheckpoint``), as for a short-lived store opened to read it."""

    every_commit_durable = False  # only revocations and ``durable`` token uses are synced
    always_waits = False  # reads and many commits need no wait

    def __init__(
        self,
        path: Path | str,
        *,
        checkpoint_interval: float | None = None,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.opened_version = 0  # the schema version the file had (0: a new file)
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the CA database {self.path}: {exc}") from exc
        self._conn = conn  # writes
        self._locks = {id(conn): threading.Lock()}
        self._busy_ms = {id(conn): int(busy_timeout * 1000)}
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":  # a file system without shared memory, for one
                log.warning("%s is in %s journal mode, not WAL: reads wait for writes", path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
            if checkpoint_interval is not None:
                conn.execute("PRAGMA wal_autocheckpoint=0")
            self._migrate()
            # Reads that may wait have a connection of their own, so that they do not queue
            # behind a write waiting for a lock; the others (the event loop's) share the
            # write connection, whose page cache a write of its own does not invalidate.
            self._read_conn = self._connect()
        except ConfigError:
            conn.close()
            raise
        except StoreBusyError as exc:
            conn.close()
            raise ConfigError(f"{self.path} is locked by another process: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ConfigError(f"{self.path} is not a usable federatls database: {exc}") from exc
        self._locks[id(self._read_conn)] = threading.Lock()
        self._busy_ms[id(self._read_conn)] = self._busy_ms[id(conn)]
        self._checkpointer = (
            _Checkpointer(self.path, checkpoint_interval)
            if checkpoint_interval is not None
            else None
        )

    def _migrate(self) -> None:
        """Create the tables, or bring an older version's up to this one, in one
        transaction (two CAs opening one old file at once migrate it once)."""
        with self._transaction(durable=True):
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            self.opened_version = version
            if version > _SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path} has schema version {version}; this federatls knows "
                    f"{_SCHEMA_VERSION} (a newer federatls wrote it)"
                )
            for table in _TABLES:
                self._conn.execute(table)
            for table, column, kind in _ADDED_COLUMNS:
                present = {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            for index in _INDEXES:
                self._conn.execute(index)
            if version != _SCHEMA_VERSION:
                self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path, isolation_level=None, timeout=self.busy_timeout, check_same_thread=False
        )

    def _connections(self) -> tuple[sqlite3.Connection, ...]:
        return (self._conn, self._read_conn)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        wait = not _NO_WAIT.get()
        conn = self._read_conn if wait else self._conn
        with self._using(conn, wait=wait):
            yield conn

    @contextlib.contextmanager
    def _using(self, conn: sqlite3.Connection, *, wait: bool) -> Iterator[None]:
        """Have ``conn`` for one call. With ``wait``, wait for it and then for SQLite's
        locks ``busy_timeout`` seconds in all, and raise ``StoreBusyError`` after that;
        without, raise ``StoreWouldWait`` instead of waiting at all."""
        lock = self._locks[id(conn)]
        if not wait:
            if not lock.acquire(blocking=False):
                raise StoreWouldWait(f"{self.path}: in use")
            busy_ms = 0
        else:
            started = time.monotonic()
            if not lock.acquire(timeout=self.busy_timeout):
                raise StoreBusyError(f"{self.path}: busy for {self.busy_timeout:g} s")
            waited = time.monotonic() - started
            busy_ms = int((self.busy_timeout - (waited if waited > 0.001 else 0)) * 1000)
        try:
            if self._busy_ms[id(conn)] != busy_ms:
                conn.execute(f"PRAGMA busy_timeout={max(busy_ms, 0)}")
                self._busy_ms[id(conn)] = busy_ms
            try:
                yield
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (_SQLITE_BUSY, _SQLITE_LOCKED):
                    raise
                if not wait:
                    raise StoreWouldWait(f"{self.path}: locked") from exc
                raise StoreBusyError(f"{self.path}: locked for {self.busy_timeout:g} s") from exc
        finally:
            lock.release()

    def prune(self, now: datetime) -> int:
        """Forget every used token id ``purge_expired`` would, batch after batch; returns
        how many."""
        total = 0
        while (n := self.purge_expired(now)) > 0:
            total += n
        return total

    def purge_expired(self, now: datetime, *, limit: int = 1000) -> int:
        # The index on expires_at finds the oldest `limit` ids without a scan; ISO 8601 in UTC
        # (``_ts``) sorts as the instants do.
        with self._transaction(durable=False):
            cur = self._conn.execute(
                "DELETE FROM used_tokens WHERE token_id IN (SELECT token_id FROM used_tokens"
                " WHERE expires_at < ? ORDER BY expires_at LIMIT ?)",
                (_ts(now - TOKEN_RETENTION), limit),
            )
            return cur.rowcount

    def check(self) -> None:
        try:
            with self._reading() as conn:
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except StoreWouldWait:
            raise
        except StoreBusyError as exc:
            raise StoreUnavailableError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"{self.path}: {exc}") from exc

    def token_used(self, token_id: str) -> bool:
        with self._reading() as conn:
            row = conn.execute(
                "SELECT 1 FROM used_tokens WHERE token_id = ?", (token_id,)
            ).fetchone()
        return row is not None

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool) -> Iterator[None]:
        """One write transaction on the write connection, all or nothing; with ``durable``
        its commit returns only once the WAL is on disk (a wait: never without waiting)."""
        if durable and _NO_WAIT.get():
            raise StoreWouldWait(f"{self.path}: a durable commit waits for the disk")
        with self._using(self._conn, wait=not _NO_WAIT.get()):
            if durable:
                self._conn.execute("PRAGMA synchronous=FULL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._conn.execute("COMMIT")  # may be busy too (a rollback journal)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            finally:
                if durable:
                    self._conn.execute("PRAGMA synchronous=NORMAL")

    def record_issuances(self, issuances: Sequence[TokenUse]) -> list[bool]:
        results: list[bool] = []
        with self._transaction(durable=any(u.durable for u in issuances)):
            for use in issuances:
                fresh = self._spend(use)
                if fresh and use.certificate is not None:
                    self._insert_certificate(use.certificate)
                results.append(fresh)
        return results

    def _spend(self, use: TokenUse) -> bool:
        """Mark a token used, inside a transaction; False if it was used before."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO used_tokens VALUES (?, ?, ?, ?)",
            (use.token_id, use.provisioner, _ts(use.expires_at), _ts(use.used_at)),
        )
        return cur.rowcount == 1

    def add_certificate(self, cert: IssuedCertificate) -> None:
        with self._transaction(durable=False):
            self._insert_certificate(cert)

    def _insert_certificate(self, cert: IssuedCertificate) -> None:
        """Inside a write transaction (writers take turns: a revocation cannot interleave)."""
        if cert.renewed_from is not None:
            sql = "SELECT 1 FROM revocations WHERE serial = ?"
            if self._conn.execute(sql, (cert.renewed_from,)).fetchone() is not None:
                raise ParentRevoked(cert.renewed_from)
        self._conn.execute(
            "INSERT INTO certificates (serial, subject, sans, not_before, not_after,"
            " provisioner, renewed_from, der, operation, token_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cert.serial,
                cert.subject,
                json.dumps(list(cert.sans)),
                _ts(cert.not_before),
                _ts(cert.not_after),
                cert.provisioner,
                cert.renewed_from,
                cert.der,
                cert.operation,
                cert.token_id,
            ),
        )

    def get_certificate(self, serial: str) -> IssuedCertificate | None:
        with self._reading() as conn:
            row = conn.execute(
                "SELECT serial, subject, sans, not_before, not_after, provisioner, der,"
                " renewed_from, operation, token_id FROM certificates WHERE serial = ?",
                (serial,),
            ).fetchone()
        if row is None:
            return None
        return IssuedCertificate(
            row[0],
            row[1],
            tuple(json.loads(row[2])),
            _dt(row[3]),
            _dt(row[4]),
            row[5],
            bytes(row[6]),
            row[7],
            row[8],
            row[9],
        )

    def revoke(self, revocation: Revocation, spend: TokenUse | None = None) -> RevokeOutcome:
        try:
            return self._revoke(revocation, spend)
        except _AlreadyRevoked:
            return "already revoked"

    def _revoke(self, revocation: Revocation, spend: TokenUse | None) -> RevokeOutcome:
        r = revocation
        with self._transaction(durable=True):
            if spend is not None and not self._spend(spend):
                return "token used"
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO revocations VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    r.serial,
                    r.reason_code,
                    r.reason,
                    r.provisioner,
                    r.token_id,
                    int(r.mtls),
                    _ts(r.revoked_at),
                ),
            )
            if cur.rowcount != 1:
                raise _AlreadyRevoked  # rolls the token's spending back
        return "revoked"

    def is_revoked(self, serial: str) -> bool:
        with self._reading() as conn:
            row = conn.execute("SELECT 1 FROM revocations WHERE serial = ?", (serial,)).fetchone()
        return row is not None

    def revocations(self) -> list[RevokedEntry]:
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT r.serial, r.revoked_at, r.reason_code, c.not_after FROM revocations r"
                " LEFT JOIN certificates c ON c.serial = r.serial"
            ).fetchall()
        return [
            RevokedEntry(r[0], _dt(r[1]), r[2], None if r[3] is None else _dt(r[3])) for r in rows
        ]

    def get_state(self, key: str) -> bytes | None:
        with self._reading() as conn:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put_state(self, key: str, value: bytes) -> None:
        with self._transaction(durable=True):
            self._conn.execute(
                "INSERT INTO state (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def swap_state(self, key: str, old: bytes | None, new: bytes) -> bool:
        with self._transaction(durable=True):
            if old is None:
                sql, args = "INSERT OR IGNORE INTO state (key, value) VALUES (?, ?)", (key, new)
            else:
                sql = "UPDATE state SET value = ? WHERE key = ? AND value = ?"
                args = (new, key, old)  # type: ignore[assignment]
            return bool(self._conn.execute(sql, args).rowcount == 1)

    def counts(self) -> dict[str, int]:
        """Rows per table (for operators and tests)."""
        with self._reading() as conn:
            return {
                t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608
                for t in ("used_tokens", "certificates", "revocations")
            }

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        for conn in reversed(self._connections()):  # the write connection last: the last
            with self._locks[id(conn)]:  # connection checkpoints and removes the log
                conn.close()


class _Checkpointer:
    """A thread with its own connection that checkpoints the write-ahead log: PASSIVE every
    ``interval`` seconds (it copies what it can and never holds up the CA's commits), and
    TRUNCATE, which holds them up while it runs, when the log has grown past
    ``max_wal_bytes`` anyway (commits so frequent that no passive checkpoint finished)."""

    def __init__(self, path: Path, interval: float, max_wal_bytes: int = 64 << 20) -> None:
        self._path = path
        self._wal = path.with_name(path.name + "-wal")
        self._interval = interval
        self._max_wal_bytes = max_wal_bytes
        self._stopping = threading.Event()
        self.checkpoints = 0  # completed checkpoint calls, for tests
        self._thread = threading.Thread(
            target=self._run, name=f"checkpoint {path.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=10.0)
        failing = False  # one warning per run of failures, not one every interval
        try:
            while not self._stopping.wait(self._interval):
                try:
                    size = self._wal.stat().st_size
                except FileNotFoundError:
                    continue
                mode = "TRUNCATE" if size > self._max_wal_bytes else "PASSIVE"
                try:
                    conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
                except sqlite3.Error as exc:  # I/O, for instance: the next turn tries again
                    if not failing:
                        log.warning("checkpoint of %s failed, retrying: %s", self._path, exc)
                    failing = True
                    continue
                if failing:
                    log.warning("checkpoint of %s works again", self._path)
                    failing = False
                self.checkpoints += 1
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
