"""The PostgreSQL store: the state that several CA replicas (and worker processes) share, behind
the same ``Store`` interface as the embedded SQLite file. Also the schema's creation
(``federatls ca db init``) and the copy of a SQLite file into PostgreSQL (``db migrate``).
Which database a CA uses is decided in ``_database``; nothing here reads ca.json.

The guarantees, and how they are kept (docs/ca.md says the same to operators):
- a token is spent by ``INSERT ... ON CONFLICT DO NOTHING`` on its id, the primary key: among
  any number of concurrent copies, on any connection of any replica, exactly one inserts the
  row (the others wait for its transaction, then do nothing); never read-then-write;
- every commit is durable on the server before a call returns (``synchronous_commit = on``,
  set by the store on each connection, so a server or role default of ``off`` cannot weaken
  it): a CA that restarts needs no "token issued before I started" rule;
- a call never waits long for a database that is gone: a lost connection is retried once
  when nothing of the call can have been committed, then the store is "down" and every
  call raises ``StoreUnavailableError`` at once, but for one call at a time that tries a
  fresh connection (``connect_timeout``); when that succeeds the store serves again, the
  same object. A commit whose answer is lost raises too (its outcome is unknown: the CA
  hands out nothing for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from .._errors import ConfigError, StoreBusyError, StoreUnavailableError
from ._store import (
    _NO_WAIT,
    TOKEN_RETENTION,
    IssuedCertificate,
    ParentRevoked,
    Revocation,
    RevokedEntry,
    RevokeOutcome,
    StoreWouldWait,
    TokenUse,
)

if TYPE_CHECKING:
    from ._database import Database

__all__ = ["PostgresStore", "copy_sqlite_into", "init_postgres_schema"]

log = logging.getLogger("federatls.ca")

T = TypeVar("T")
Conn = psycopg.Connection[Any]

SCHEMA_VERSION = 2  # 2: the state table (federation peers' roots)
_TABLES = ("used_tokens", "certificates", "revocations")
_COUNT_ROWS = (
    "SELECT (SELECT count(*) FROM used_tokens), (SELECT count(*) FROM certificates),"
    " (SELECT count(*) FROM revocations)"
)
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS federatls_schema (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   integer NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS used_tokens (
    token_id    text PRIMARY KEY,
    provisioner text NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS used_tokens_expires_at ON used_tokens (expires_at)",
    """CREATE TABLE IF NOT EXISTS certificates (
    serial       text PRIMARY KEY,
    subject      text NOT NULL,
    sans         text[] NOT NULL,
    not_before   timestamptz NOT NULL,
    not_after    timestamptz NOT NULL,
    provisioner  text NOT NULL,
    renewed_from text,
    der          bytea NOT NULL,
    operation    text NOT NULL DEFAULT '',
    token_id     text NOT NULL DEFAULT ''
)""",
    """CREATE TABLE IF NOT EXISTS revocations (
    serial      text PRIMARY KEY,
    reason_code integer NOT NULL,
    reason      text NOT NULL,
    provisioner text NOT NULL,
    token_id    text NOT NULL,
    mtls        boolean NOT NULL,
    revoked_at  timestamptz NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS state (
    key   text PRIMARY KEY,
    value bytea NOT NULL
)""",
)
# Two `db init` at once take turns (CREATE TABLE IF NOT EXISTS is not safe against itself).
_INIT_LOCK = 0x6665_6474_6C73  # "federatls", roughly: any constant of our own
_CERT_COLUMNS = (
    "serial, subject, sans, not_before, not_after, provisioner, renewed_from, der,"
    " operation, token_id"
)
_INIT_HINT = "run `federatls ca db init CONFIG` (as a role that may create tables)"

# libpq settings the store adds to the URL's, unless the URL sets them: a bounded wait for a
# server that does not answer, and keepalives so that a vanished server is noticed within
# seconds rather than after TCP's quarter of an hour.
_CONNECT_DEFAULTS = {
    "connect_timeout": "3",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "15000",
    "application_name": "federatls-ca",
}
_SESSION = (
    "SET synchronous_commit = on",  # durable before the answer, whatever the server default
    "SET TimeZone = 'UTC'",
)
_BOUNDED = (  # the CA's calls, not an operator's copy of a million rows
    "SET statement_timeout = '15s'",  # no call holds a thread for ever (StoreBusyError)
    # A lock held elsewhere (an operator's transaction, say) is waited for briefly: the
    # CA's few store threads would otherwise queue requests behind 15 s waits, answering
    # them long after their clients gave up. Its own locks are held for milliseconds.
    "SET lock_timeout = '3s'",
    "SET idle_in_transaction_session_timeout = '60s'",
)


# A call's deadline on this side of the network, past the server's own statement_timeout: a
# server that stops answering without closing its connections (stalled, frozen, its host
# unresponsive while its kernel still acknowledges packets) trips none of the server's or
# TCP's timeouts, and would hold a CA thread, and a request, for as long as it stays so.
CALL_DEADLINE = 20.0


class _Watchdog:
    """Cuts the connection of a call that is still waiting for the server past its deadline
    (``shutdown`` of the socket: the blocked read returns, and the driver raises). One
    thread per store, started with it; it wakes four times a second."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._lock = threading.Lock()
        self._calls: dict[int, tuple[float, int]] = {}  # thread id: (deadline, socket fd)
        self._cut: set[int] = set()  # thread ids whose call was cut
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="federatls-pg-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, conn: Conn) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            self._cut.discard(me)
            self._calls[me] = (time.monotonic() + self.deadline, conn.fileno())
        try:
            yield
        finally:
            with self._lock:
                del self._calls[me]

    def was_cut(self) -> bool:
        """Whether this thread's last call was cut at its deadline."""
        with self._lock:
            return threading.get_ident() in self._cut

    def _run(self) -> None:
        while not self._stopping.wait(0.25):
            now = time.monotonic()
            with self._lock:  # the connection cannot be closed meanwhile: its call holds it
                for thread, (deadline, fd) in list(self._calls.items()):
                    if now >= deadline:
                        _shut(fd)
                        self._cut.add(thread)
                        self._calls[thread] = (float("inf"), fd)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


def _shut(fd: int) -> None:
    """Shut a connection's socket down in both directions, through a duplicate of its
    descriptor (the driver still owns, and later closes, the original)."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class _CommitUnknown(Exception):
    """The connection was lost while COMMIT was on its way: the outcome is unknown."""


class PostgresStore:
    """A CA's state in a PostgreSQL database whose schema ``init_postgres_schema`` made (see
    the module's docstring for the guarantees). Opening it checks the server and the schema
    version and creates nothing, so replicas may run as a role that cannot create tables.

    Calls block their thread on the network: inside ``without_waiting()`` each raises
    ``StoreWouldWait`` at once, and the CA makes it from a thread. A small bounded pool
    (``pool_size`` connections) serves the CA's threads; a call waits at most ``timeout``
    seconds for a connection, and at most ``deadline`` seconds for the server's answer
    (``_Watchdog``), so that no call outlasts a bounded time, even against a server that
    has stalled without closing its connections."""

    every_commit_durable = True
    always_waits = True  # every call is a round trip to the server

    def __init__(
        self,
        db: Database,
        *,
        pool_size: int = 8,
        timeout: float = 5.0,
        deadline: float = CALL_DEADLINE,
    ) -> None:
        self.database = db
        self.timeout = timeout
        self._pool_size = pool_size
        self._conninfo = _conninfo(db.location)
        self._password = _password(db)
        self._verify(db)
        self._state = threading.Lock()  # guards _pool and _down
        self._gate = threading.Lock()  # held by the one call that tries a down server
        self._down: str | None = None  # why the database is unusable, while it is
        self._closed = False
        self._pool: ConnectionPool[Conn] | None = self._new_pool()
        self._watchdog = _Watchdog(deadline)
        try:
            self._pool.wait(timeout=timeout + 5)
        except (PoolTimeout, psycopg.Error) as exc:
            self._pool.close()
            self._watchdog.stop()
            raise ConfigError(
                f"cannot reach PostgreSQL at {db.endpoint} ({db.describe()}): {self._scrub(exc)}"
            ) from exc

    def _new_pool(self) -> ConnectionPool[Conn]:
        pool: ConnectionPool[Conn] = ConnectionPool(
            self._conninfo,
            kwargs={"autocommit": True},
            min_size=1,
            max_size=self._pool_size,
            open=False,
            configure=_configure,
            timeout=self.timeout,
            name=f"federatls {self.database.describe()}",
        )
        pool.open(wait=False)
        return pool

    def _verify(self, db: Database) -> None:
        """Open one connection: the server answers, and holds a schema this federatls knows."""
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise ConfigError(
                f"cannot reach PostgreSQL at {db.endpoint} ({db.describe()}): {self._scrub(exc)}"
            ) from exc
        try:
            with conn:
                _configure(conn)  # the CA's bounds: a lock held elsewhere is not waited out
                version = _schema_version(conn)
        except pgerrors.InsufficientPrivilege as exc:
            raise ConfigError(f"{db.describe()}: {self._scrub(exc)}") from exc
        except (pgerrors.LockNotAvailable, pgerrors.QueryCanceled) as exc:
            raise ConfigError(
                f"{db.describe()}: the federatls schema is locked by another transaction "
                f"(an operator's?), or too slow to read: {self._scrub(exc)}"
            ) from exc
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError) or not exc.sqlstate:
                raise ConfigError(
                    f"cannot reach PostgreSQL at {db.endpoint} ({db.describe()}): "
                    f"{self._scrub(exc)}"
                ) from exc
            # The server answered and refused the query: a federatls_schema not of ours.
            raise ConfigError(
                f"{db.describe()} has no federatls schema ({self._scrub(exc)}): {_INIT_HINT}"
            ) from exc
        if version == 0:
            raise ConfigError(f"{db.describe()} has no federatls schema: {_INIT_HINT}")
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{db.describe()} has schema version {version}; this federatls knows "
                f"{SCHEMA_VERSION} (a newer federatls wrote it)"
            )
        if version < SCHEMA_VERSION:
            raise ConfigError(
                f"{db.describe()} has schema version {version}, older than this federatls's "
                f"{SCHEMA_VERSION}: {_INIT_HINT}"
            )

    def _scrub(self, exc: BaseException) -> str:
        return _first_line(exc, self._password)

    # -- calls ---------------------------------------------------------------------------

    def _call(self, body: Callable[[Conn], T], *, transaction: bool = False) -> T:
        """Run ``body`` on a pooled connection (in one transaction with ``transaction``),
        translating every driver error. A connection found lost before anything of the
        call could be committed is retried once if the server answers; otherwise the store
        is down until a later call finds it back."""
        if _NO_WAIT.get():
            raise StoreWouldWait(f"{self.database.describe()}: a PostgreSQL call waits")
        for attempt in (1, 2):
            pool = self._usable_pool()
            try:
                with pool.connection(timeout=self.timeout) as conn, self._watchdog.watching(conn):
                    return _run(conn, body, transaction)
            except _CommitUnknown as exc:
                if self._watchdog.was_cut():
                    raise self._stalled(exc, "; the outcome of its commit is unknown") from exc
                cause = exc.__cause__ or exc
                self._fail(cause)
                raise StoreUnavailableError(
                    f"{self.database.describe()}: the connection was lost during a commit, "
                    f"whose outcome is unknown: {self._scrub(cause)}"
                ) from exc
            except PoolTimeout as exc:
                if self._probe() is None:  # the server answers: the pool is busy
                    raise StoreUnavailableError(
                        f"{self.database.describe()}: no connection within {self.timeout:g} s"
                    ) from exc
                raise StoreUnavailableError(self._fail(exc)) from exc
            except psycopg.Error as exc:
                if self._watchdog.was_cut():
                    raise self._stalled(exc, "") from exc
                if not _lost(exc):
                    raise self._translated(exc) from exc
                if attempt == 1 and self._probe() is None:
                    with contextlib.suppress(psycopg.Error):  # closed meanwhile, say
                        pool.check()  # drop the other connections the server lost
                    continue
                raise StoreUnavailableError(self._fail(exc)) from exc
        raise AssertionError("unreachable")

    def _stalled(self, exc: BaseException, outcome: str) -> StoreUnavailableError:
        """A call cut at its deadline: the server is down (until a probe finds it back)."""
        self._fail(exc)
        return StoreUnavailableError(
            f"PostgreSQL at {self.database.endpoint} gave no answer within "
            f"{self._watchdog.deadline:g} s{outcome}"
        )

    def _usable_pool(self) -> ConnectionPool[Conn]:
        """The pool, or while the database is down: for one call at a time, a new pool if a
        fresh connection succeeds; for the others, ``StoreUnavailableError`` at once."""
        pool = self._pool
        if pool is not None:
            return pool
        if self._closed:
            raise StoreUnavailableError(f"{self.database.describe()}: the store is closed")
        if not self._gate.acquire(blocking=False):
            raise StoreUnavailableError(self._down or "PostgreSQL is unreachable")
        try:
            with self._state:
                if self._pool is not None:
                    return self._pool
            failure = self._probe()
            if failure is not None:
                raise StoreUnavailableError(self._fail(failure)) from failure
            with self._state:
                if self._closed:
                    raise StoreUnavailableError(f"{self.database.describe()}: closed")
                self._pool = self._new_pool()
                self._down = None
            log.warning("PostgreSQL at %s is reachable again", self.database.endpoint)
            return self._pool
        finally:
            self._gate.release()

    def _probe(self) -> psycopg.Error | None:
        """Try a fresh connection (at most ``connect_timeout``): None if the server answers."""
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            return exc
        return None

    def _fail(self, exc: BaseException) -> str:
        """The database is down: drop the pool (its reconnection backoff would outlast the
        outage), and say why from now until it is back."""
        reason = f"PostgreSQL at {self.database.endpoint} is unreachable: {self._scrub(exc)}"
        with self._state:
            pool, self._pool = self._pool, None
            first = self._down is None
            self._down = reason
        if first:
            log.warning("%s (%s)", reason, self.database.describe())
        if pool is not None:
            pool.close(timeout=1.0)  # its idle workers stop within milliseconds
        return reason

    def _translated(self, exc: psycopg.Error) -> StoreBusyError:
        what = f"{self.database.describe()}: {self._scrub(exc)}"
        if isinstance(
            exc,
            pgerrors.QueryCanceled
            | pgerrors.LockNotAvailable
            | pgerrors.DeadlockDetected
            | pgerrors.SerializationFailure,
        ):
            return StoreBusyError(what)
        return StoreUnavailableError(what)

    # -- the Store interface --------------------------------------------------------------

    def token_used(self, token_id: str) -> bool:
        def body(conn: Conn) -> bool:
            sql = "SELECT 1 FROM used_tokens WHERE token_id = %s"
            return conn.execute(sql, (_key(token_id),)).fetchone() is not None

        return self._call(body)

    def record_issuances(self, issuances: Sequence[TokenUse]) -> list[bool]:
        def body(conn: Conn) -> list[bool]:
            results = []
            for use in issuances:
                results.append(_spend(conn, use))
            return results

        return self._call(body, transaction=True)

    def add_certificate(self, cert: IssuedCertificate) -> None:
        self._call(lambda conn: _insert_certificate(conn, cert), transaction=True)

    def get_certificate(self, serial: str) -> IssuedCertificate | None:
        def body(conn: Conn) -> IssuedCertificate | None:
            sql = f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = %s"  # noqa: S608
            row = conn.execute(sql, (_key(serial),)).fetchone()
            if row is None:
                return None
            return IssuedCertificate(
                serial=row[0],
                subject=row[1],
                sans=tuple(row[2]),
                not_before=row[3],
                not_after=row[4],
                provisioner=row[5],
                renewed_from=row[6],
                der=bytes(row[7]),
                operation=row[8],
                token_id=row[9],
            )

        return self._call(body)

    def revoke(self, revocation: Revocation, spend: TokenUse | None = None) -> RevokeOutcome:
        r = revocation

        def body(conn: Conn) -> RevokeOutcome:
            if spend is not None and not _spend(conn, spend):
                return "token used"  # nothing written
            # Taken before the revocation is written: a renewal of this certificate whose
            # record is being written (FOR SHARE, _parent_not_revoked) commits first, and
            # one that comes later waits for this commit, then sees the revocation.
            sql = "SELECT 1 FROM certificates WHERE serial = %s FOR UPDATE"
            conn.execute(sql, (_key(r.serial),))
            cur = conn.execute(
                "INSERT INTO revocations VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (serial) DO NOTHING",
                (_key(r.serial), r.reason_code, _text(r.reason), _text(r.provisioner),
                 _key(r.token_id), r.mtls, r.revoked_at),
            )  # fmt: skip
            if cur.rowcount != 1:
                raise _Undo("already revoked")  # the token's spending is rolled back
            return "revoked"

        try:
            return self._call(body, transaction=True)
        except _Undo:
            return "already revoked"

    def is_revoked(self, serial: str) -> bool:
        def body(conn: Conn) -> bool:
            sql = "SELECT 1 FROM revocations WHERE serial = %s"
            return conn.execute(sql, (_key(serial),)).fetchone() is not None

        return self._call(body)

    def revocations(self) -> list[RevokedEntry]:
        def body(conn: Conn) -> list[RevokedEntry]:
            rows = conn.execute(
                "SELECT r.serial, r.revoked_at, r.reason_code, c.not_after FROM revocations r"
                " LEFT JOIN certificates c ON c.serial = r.serial"
            ).fetchall()
            return [RevokedEntry(r[0], r[1], r[2], r[3]) for r in rows]

        return self._call(body)

    def purge_expired(self, now: datetime, *, limit: int = 1000) -> int:
        # One statement, one short transaction; SKIP LOCKED lets replicas purging at once
        # take different rows instead of queueing behind each other.
        def body(conn: Conn) -> int:
            cur = conn.execute(
                "DELETE FROM used_tokens WHERE token_id IN (SELECT token_id FROM used_tokens"
                " WHERE expires_at < %s ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED)",
                (now - TOKEN_RETENTION, limit),
            )
            return cur.rowcount

        return self._call(body)

    def check(self) -> None:
        def body(conn: Conn) -> None:
            version = _schema_version(conn)
            if version != SCHEMA_VERSION:
                raise StoreUnavailableError(
                    f"{self.database.describe()} has schema version {version}, not {SCHEMA_VERSION}"
                )

        self._call(body)

    def get_state(self, key: str) -> bytes | None:
        def body(conn: Conn) -> bytes | None:
            row = conn.execute("SELECT value FROM state WHERE key = %s", (_key(key),)).fetchone()
            return None if row is None else bytes(row[0])

        return self._call(body)

    def put_state(self, key: str, value: bytes) -> None:
        sql = (
            "INSERT INTO state (key, value) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        self._call(lambda conn: conn.execute(sql, (_key(key), value)), transaction=True)

    def swap_state(self, key: str, old: bytes | None, new: bytes) -> bool:
        if old is None:
            sql = "INSERT INTO state (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING"
            args: tuple[object, ...] = (_key(key), new)
        else:
            sql = "UPDATE state SET value = %s WHERE key = %s AND value = %s"
            args = (new, _key(key), old)
        return self._call(lambda conn: conn.execute(sql, args).rowcount == 1, transaction=True)

    def counts(self) -> dict[str, int]:
        def body(conn: Conn) -> dict[str, int]:
            row = conn.execute(_COUNT_ROWS).fetchone()
            assert row is not None
            return dict(zip(_TABLES, row, strict=True))

        return self._call(body)

    def close(self) -> None:
        with self._state:
            pool, self._pool = self._pool, None
            self._closed = True
        if pool is not None:
            pool.close()
        self._watchdog.stop()


class _Undo(Exception):
    """Raised inside a transaction's body: roll it back, and let the caller answer."""


def _run(conn: Conn, body: Callable[[Conn], T], transaction: bool) -> T:
    """``body`` on ``conn``; with ``transaction``, in one transaction whose COMMIT, if the
    connection is lost during it, raises ``_CommitUnknown``."""
    if not transaction:
        return body(conn)
    committing = False
    try:
        with conn.transaction():
            result = body(conn)
            committing = True
    except psycopg.Error as exc:
        if committing and _lost(exc):
            raise _CommitUnknown from exc
        raise
    return result


def _lost(exc: psycopg.Error) -> bool:
    """Whether ``exc`` means the connection is gone (the server down, restarting, or out
    of reach), as opposed to a statement the server refused."""
    if isinstance(exc, pgerrors.AdminShutdown | pgerrors.CrashShutdown):
        return True
    if isinstance(exc, pgerrors.CannotConnectNow):
        return True
    return isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None


def _configure(conn: Conn) -> None:
    for statement in (*_SESSION, *_BOUNDED):
        conn.execute(statement)  # constant SQL


def _password(db: Database) -> str | None:
    return str(conninfo_to_dict(db.location).get("password") or "") or None


def _first_line(exc: BaseException, password: str | None) -> str:
    """The first line of a driver error, never the password."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text.replace(password, "***") if password else text


def _conninfo(url: str) -> str:
    given = conninfo_to_dict(url)
    extra = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in given}
    return make_conninfo(url, **extra)


def _schema_version(conn: Conn) -> int:
    """The federatls schema version of the database, 0 when it has none."""
    row = conn.execute("SELECT to_regclass('federatls_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT version FROM federatls_schema").fetchone()
    return 0 if row is None else int(row[0])


# PostgreSQL's text cannot hold NUL, which a token id (a signed token's jti), a serial asked
# for, or a revocation's reason may; nor can its index hold a key of more than about 2,700
# bytes, which a jti of a few thousand random characters is. Such a key is stored as a
# digest under a prefix no id the CA makes has (ids that happen to start with it are
# digested too, so the mapping stays one-to-one), and free text has U+FFFD in place of each
# NUL, as for a lone surrogate.
_DIGESTED = "\x01federatls-sha256:"
_LONGEST_KEY = 512  # characters: at most 2,048 bytes of UTF-8, within the index's limit


def _key(value: str) -> str:
    """``value`` as a key PostgreSQL's text and index can hold: itself, or its digest."""
    if len(value) <= _LONGEST_KEY and "\x00" not in value and not value.startswith(_DIGESTED):
        return value
    return _DIGESTED + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _text(value: str) -> str:
    """Free text as PostgreSQL's text can hold it: each NUL replaced by U+FFFD."""
    return value.replace("\x00", "\ufffd")


_SPEND = "INSERT INTO used_tokens VALUES (%s, %s, %s, %s) ON CONFLICT (token_id) DO NOTHING"
# The spend and the certificate it bought in one statement (one round trip): the certificate
# is inserted only from the spend's RETURNING row, so a replay records nothing.
_SPEND_AND_RECORD = (
    "WITH spent AS (" + _SPEND + " RETURNING 1),"  # noqa: S608 (constants only)
    f" recorded AS (INSERT INTO certificates ({_CERT_COLUMNS})"
    "  SELECT %s, %s, %s::text[], %s, %s, %s, %s, %s, %s, %s FROM spent)"
    " SELECT count(*) FROM spent"
)


def _spend(conn: Conn, use: TokenUse) -> bool:
    """Mark a token used, and record the certificate it bought if any: True for the one
    insert that wins, False (nothing recorded) for every replay."""
    token = (_key(use.token_id), _text(use.provisioner), use.expires_at, use.used_at)
    cert = use.certificate
    if cert is None:
        return conn.execute(_SPEND, token).rowcount == 1
    if cert.renewed_from is not None:  # a renewal: spent, then its parent checked
        if conn.execute(_SPEND, token).rowcount != 1:
            return False
        _insert_certificate(conn, cert)
        return True
    row = conn.execute(_SPEND_AND_RECORD, (*token, *_certificate_row(cert))).fetchone()
    return row is not None and row[0] == 1


def _certificate_row(cert: IssuedCertificate) -> tuple[object, ...]:
    return (
        _key(cert.serial),
        _text(cert.subject),
        [_text(name) for name in cert.sans],
        cert.not_before,
        cert.not_after,
        _text(cert.provisioner),
        None if cert.renewed_from is None else _key(cert.renewed_from),
        cert.der,
        _text(cert.operation),
        _key(cert.token_id),
    )


def _parent_not_revoked(conn: Conn, cert: IssuedCertificate) -> None:
    """Inside the transaction recording a renewal: ``ParentRevoked`` if the certificate it
    replaces is revoked. The parent's row is locked FOR SHARE first, so a revocation in
    progress (which holds it FOR UPDATE) is waited for, and then seen by the next
    statement's snapshot (READ COMMITTED)."""
    if cert.renewed_from is None:
        return
    parent = _key(cert.renewed_from)
    conn.execute("SELECT 1 FROM certificates WHERE serial = %s FOR SHARE", (parent,))
    sql = "SELECT 1 FROM revocations WHERE serial = %s"
    if conn.execute(sql, (parent,)).fetchone() is not None:
        raise ParentRevoked(cert.renewed_from)


def _insert_certificate(conn: Conn, cert: IssuedCertificate) -> None:
    _parent_not_revoked(conn, cert)
    conn.execute(
        f"INSERT INTO certificates ({_CERT_COLUMNS})"  # noqa: S608
        " VALUES (%s, %s, %s::text[], %s, %s, %s, %s, %s, %s, %s)",
        _certificate_row(cert),
    )


# -- schema and migration -------------------------------------------------------------------


@contextlib.contextmanager
def _admin(db: Database) -> Iterator[Conn]:
    """One connection for an operator's command; unreachable is a one-line ConfigError."""
    try:
        conn = psycopg.connect(_conninfo(db.location), autocommit=True)
    except psycopg.Error as exc:
        raise ConfigError(
            f"cannot reach PostgreSQL at {db.endpoint} ({db.describe()}): "
            f"{_first_line(exc, _password(db))}"
        ) from exc
    user = conn.info.user
    try:
        with conn:
            for statement in _SESSION:
                conn.execute(statement)  # constant SQL
            yield conn
    except pgerrors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"{db.describe()}: role {user!r} may not create the federatls schema "
            f"({str(exc).splitlines()[0]}): run `federatls ca db init` as the database's "
            "owner"
        ) from exc
    except psycopg.Error as exc:  # whatever else the server refused: one line
        raise ConfigError(f"{db.describe()}: {_first_line(exc, _password(db))}") from exc


_TSTZ = "timestamp with time zone"
# Each table's columns (as format_type names their types) and its primary key: what
# `db init` checks of a table it finds, since CREATE TABLE IF NOT EXISTS keeps any table of
# that name, someone else's or a half-made one, which the CA would then fail on at run time.
_SHAPES: dict[str, tuple[dict[str, str], str]] = {
    "federatls_schema": ({"singleton": "boolean", "version": "integer"}, "singleton"),
    "used_tokens": (
        {"token_id": "text", "provisioner": "text", "expires_at": _TSTZ, "used_at": _TSTZ},
        "token_id",
    ),
    "certificates": (
        {
            "serial": "text",
            "subject": "text",
            "sans": "text[]",
            "not_before": _TSTZ,
            "not_after": _TSTZ,
            "provisioner": "text",
            "renewed_from": "text",
            "der": "bytea",
            "operation": "text",
            "token_id": "text",
        },
        "serial",
    ),
    "revocations": (
        {
            "serial": "text",
            "reason_code": "integer",
            "reason": "text",
            "provisioner": "text",
            "token_id": "text",
            "mtls": "boolean",
            "revoked_at": _TSTZ,
        },
        "serial",
    ),
    "state": ({"key": "text", "value": "bytea"}, "key"),
}
_COLUMNS_OF = (
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod), coalesce(i.indisprimary, false)"
    " FROM pg_attribute a LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary"
    " AND i.indnatts = 1 AND i.indkey[0] = a.attnum"
    " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"
)


def _check_shapes(conn: Conn, db: Database) -> None:
    """ConfigError (one line) if a table of federatls's name is not of federatls's shape."""
    for table, (columns, key) in _SHAPES.items():
        found = conn.execute(_COLUMNS_OF, (table,)).fetchall()
        if not found:
            continue  # absent: CREATE TABLE makes it
        shape = {name: kind for name, kind, _ in found}
        keys = [name for name, _, primary in found if primary]
        if shape != columns or keys != [key]:
            have = ", ".join(f"{n} {k}" for n, k in shape.items())
            raise ConfigError(
                f"{db.describe()}: table {table} ({have}"
                f"{'' if keys == [key] else '; ' + (keys[0] if keys else 'no') + ' primary key'})"
                " is not federatls's: give federatls a database of its own"
            )


def _ensure_schema(conn: Conn, db: Database) -> tuple[int, int]:
    """Inside a transaction: create or upgrade the schema; (version before, version now).
    A table of federatls's name that is not of its shape is refused (ConfigError)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INIT_LOCK,))
    _check_shapes(conn, db)
    was = _schema_version(conn)
    if was > SCHEMA_VERSION:
        raise ConfigError(
            f"{db.describe()} has schema version {was}; this federatls knows "
            f"{SCHEMA_VERSION} (a newer federatls wrote it)"
        )
    if was == SCHEMA_VERSION:
        return was, was  # nothing to do, nothing needing CREATE
    for statement in _SCHEMA:
        conn.execute(statement)  # constant SQL
    conn.execute(
        "INSERT INTO federatls_schema (version) VALUES (%s)"
        " ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
        (SCHEMA_VERSION,),
    )
    return was, SCHEMA_VERSION


def init_postgres_schema(db: Database) -> tuple[int, int]:
    """Create or upgrade the federatls schema (idempotent); (version before, version now)."""
    with _admin(db) as conn, conn.transaction():
        return _ensure_schema(conn, db)


def copy_sqlite_into(source: Path, target: Database) -> dict[str, int]:
    """Copy a SQLite store's rows into an empty PostgreSQL database, in one transaction
    (the schema created if absent); how many of each. ConfigError if the target holds
    any row. The SQLite file is only read."""
    started = time.monotonic()
    try:
        lite = sqlite3.connect(source, isolation_level=None)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open {source}: {exc}") from exc
    try:
        with _admin(target) as conn, conn.transaction():
            _ensure_schema(conn, target)
            conn.execute("LOCK TABLE used_tokens, certificates, revocations IN EXCLUSIVE MODE")
            row = conn.execute(_COUNT_ROWS).fetchone()
            assert row is not None
            held = {t: n for t, n in zip(_TABLES, row, strict=True) if n}
            if held:
                what = ", ".join(f"{n} {t.replace('_', ' ')}" for t, n in held.items())
                raise ConfigError(
                    f"{target.describe()} is not empty (it holds {what}): the copy goes "
                    "only into an empty database"
                )
            lite.execute("BEGIN")  # one snapshot of the three tables
            try:
                counts = _copy_rows(lite, conn, source)
            finally:
                lite.execute("ROLLBACK")
    except psycopg.Error as exc:
        raise ConfigError(f"copying into {target.describe()} failed: {exc}") from exc
    except (sqlite3.Error, ValueError, TypeError) as exc:  # a row that cannot be read
        raise ConfigError(f"{source} is not a usable federatls database: {exc}") from exc
    finally:
        lite.close()
    log.info("copied %s into %s in %.1f s", counts, target.describe(), time.monotonic() - started)
    return counts


def _copy_rows(lite: sqlite3.Connection, conn: Conn, source: Path) -> dict[str, int]:
    version = lite.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 or version > 4:
        raise ConfigError(f"{source} has schema version {version}: not a federatls database")
    columns = {r[1] for r in lite.execute("PRAGMA table_info(certificates)")}
    trail = "operation, token_id" if "operation" in columns else "'', ''"  # schema 1: none
    listed = _CERT_COLUMNS.replace("operation, token_id", trail)
    certificates = f"SELECT {listed} FROM certificates"  # noqa: S608
    counts = dict.fromkeys(_TABLES, 0)
    with conn.cursor().copy(
        "COPY used_tokens (token_id, provisioner, expires_at, used_at) FROM STDIN"
    ) as copy:
        for token_id, provisioner, expires_at, used_at in lite.execute(
            "SELECT token_id, provisioner, expires_at, used_at FROM used_tokens"
        ):
            copy.write_row((_key(token_id), _text(provisioner), _dt(expires_at), _dt(used_at)))
            counts["used_tokens"] += 1
    import json

    with conn.cursor().copy(f"COPY certificates ({_CERT_COLUMNS}) FROM STDIN") as copy:
        for row in lite.execute(certificates):
            copy.write_row(
                (_key(row[0]), _text(row[1]), [_text(n) for n in json.loads(row[2])],
                 _dt(row[3]), _dt(row[4]), _text(row[5]),
                 None if row[6] is None else _key(row[6]), bytes(row[7]), _text(row[8]),
                 _key(row[9]))
            )  # fmt: skip
            counts["certificates"] += 1
    with conn.cursor().copy(
        "COPY revocations (serial, reason_code, reason, provisioner, token_id, mtls,"
        " revoked_at) FROM STDIN"
    ) as copy:
        for row in lite.execute(
            "SELECT serial, reason_code, reason, provisioner, token_id, mtls, revoked_at"
            " FROM revocations"
        ):
            copy.write_row(
                (_key(row[0]), row[1], _text(row[2]), _text(row[3]), _key(row[4]),
                 bool(row[5]), _dt(row[6]))
            )  # fmt: skip
            counts["revocations"] += 1
    if version >= 4:  # named states (federation peers' last good roots): not counted
        rows = lite.execute("SELECT key, value FROM state").fetchall()
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO state (key, value) VALUES (%s, %s)",
                [(_key(key), bytes(value)) for key, value in rows],
            )
    return counts


def _dt(text: str) -> datetime:
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
