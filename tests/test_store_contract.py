"""The ``Store`` contract, the same tests on both stores: the embedded SQLite file and a real
PostgreSQL 15 database (tests/postgres.py). Then what only PostgreSQL has: a schema made by
``init_schema`` and checked at open, a role that may not create tables, the server going away
and coming back under the same store, and the copy of a SQLite file into it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from federatls._errors import ConfigError, StoreUnavailableError
from federatls.ca import (
    Database,
    IssuedCertificate,
    PostgresStore,
    Revocation,
    SQLiteStore,
    Store,
    StoreWouldWait,
    TokenUse,
    copy_store,
    init_schema,
    open_store,
    without_waiting,
)
from federatls.ca._store import TOKEN_RETENTION, ParentRevoked

from harness import free_port
from postgres import PostgresCluster

NOW = datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)

Opener = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """A fresh database of each kind, its schema made by ``init_schema``."""
    if request.param == "sqlite":
        db = Database.sqlite(tmp_path / "federatls.db")
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        db = Database.postgresql(cluster.new_database())
    assert "created" in init_schema(db)
    return db


@pytest.fixture
def stores(database: Database) -> Iterator[Opener]:
    """Opens another store object on the database (a replica, for PostgreSQL); all are
    closed after the test."""
    opened: list[Store] = []

    def opener() -> Store:
        store = open_store(database)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def store(stores: Opener) -> Store:
    return stores()


def _cert(serial: str, token_id: str = "", **fields: object) -> IssuedCertificate:
    values: dict[str, object] = {
        "serial": serial,
        "subject": f"svc-{serial}",
        "sans": (f"svc-{serial}", "10.0.0.1"),
        "not_before": NOW,
        "not_after": NOW + timedelta(hours=24),
        "provisioner": "admin:kid",
        "der": b"\x30\x82" + serial.encode(),
        "operation": "sign" if token_id else "",
        "token_id": token_id,
    }
    values.update(fields)
    return IssuedCertificate(**values)  # type: ignore[arg-type]


def _use(
    token_id: str, cert: IssuedCertificate | None = None, *, expires: datetime | None = None
) -> TokenUse:
    return TokenUse(
        token_id, "admin:kid", expires or NOW + timedelta(minutes=5), NOW, certificate=cert
    )


def _revocation(serial: str) -> Revocation:
    return Revocation(serial, 1, "key compromise", NOW, "admin:kid", f"rev-{serial}", False)


# -- the contract, on both stores -----------------------------------------------------------


def test_a_token_is_spent_once(store: Store) -> None:
    """The first use of a token is recorded, with its certificate; the second is refused and
    records nothing. Twin: a token never spent reads as unused."""
    assert not store.token_used("jti-1")
    assert store.record_issuances([_use("jti-1", _cert("1", "jti-1"))]) == [True]
    assert store.token_used("jti-1")
    assert store.record_issuances([_use("jti-1", _cert("2", "jti-1"))]) == [False]
    assert store.get_certificate("2") is None
    assert store.counts() == {"used_tokens": 1, "certificates": 1, "revocations": 0}


def test_concurrent_copies_of_one_token_have_one_winner(stores: Opener) -> None:
    """40 copies of one token, from 8 threads over two store objects (two replicas on
    PostgreSQL), each with its own certificate: exactly one is accepted and one row of each
    is recorded. Twin: 40 different tokens the same way are all accepted."""
    replicas = [stores(), stores()]

    def spend(i: int, token_id: str) -> bool:
        use = _use(token_id, _cert(str(1000 + i), token_id))
        return replicas[i % 2].record_issuances([use])[0]

    with ThreadPoolExecutor(8) as pool:
        same = list(pool.map(lambda i: spend(i, "storm"), range(40)))
    assert same.count(True) == 1
    assert replicas[1].counts() == {"used_tokens": 1, "certificates": 1, "revocations": 0}
    with ThreadPoolExecutor(8) as pool:
        different = list(pool.map(lambda i: spend(100 + i, f"jti-{i}"), range(40)))
    assert different == [True] * 40
    assert replicas[0].counts() == {"used_tokens": 41, "certificates": 41, "revocations": 0}


def test_a_batch_records_its_fresh_uses_and_not_its_replays(store: Store) -> None:
    """In one batch, a replay (a token spent before) records nothing, not even its
    certificate, while the fresh uses around it are recorded. Twin: the token spent before
    is what makes the difference (the same batch without it records all three)."""
    store.record_issuances([_use("spent")])
    batch = [_use("a", _cert("10", "a")), _use("spent", _cert("11", "spent")), _use("b")]
    assert store.record_issuances(batch) == [True, False, True]
    assert store.get_certificate("10") is not None
    assert store.get_certificate("11") is None
    assert store.counts() == {"used_tokens": 3, "certificates": 1, "revocations": 0}
    again = [_use("c", _cert("12", "c")), _use("d", _cert("13", "d")), _use("e")]
    assert store.record_issuances(again) == [True, True, True]


def test_a_batch_that_fails_records_nothing(store: Store) -> None:
    """A batch whose last certificate cannot be recorded (its serial is taken) fails as a
    whole: its first token stays unspent. Twin: the same batch with distinct serials is
    recorded."""
    store.add_certificate(_cert("20"))
    batch = [_use("x", _cert("21", "x")), _use("y", _cert("20", "y"))]
    with pytest.raises((sqlite3.IntegrityError, StoreUnavailableError)):
        store.record_issuances(batch)
    assert not store.token_used("x")
    assert store.get_certificate("21") is None
    assert store.record_issuances([_use("x", _cert("21", "x")), _use("y", _cert("22", "y"))])
    assert store.token_used("y")


def test_revoke_outcomes(store: Store) -> None:
    """A revocation with its token is recorded; revoking the serial again is "already
    revoked" and does not spend the second token; a spent token is "token used" and revokes
    nothing. Twin: a serial never revoked reads as not revoked."""
    store.add_certificate(_cert("30"))
    store.add_certificate(_cert("31"))
    assert not store.is_revoked("30")
    assert store.revoke(_revocation("30"), _use("rev-1")) == "revoked"
    assert store.is_revoked("30")
    assert store.revoke(_revocation("30"), _use("rev-2")) == "already revoked"
    assert not store.token_used("rev-2")  # rolled back with the refused revocation
    assert store.revoke(_revocation("31"), _use("rev-1")) == "token used"
    assert not store.is_revoked("31")
    assert store.revoke(_revocation("31")) == "revoked"  # mTLS revocations spend no token
    assert store.counts() == {"used_tokens": 1, "certificates": 2, "revocations": 2}


def test_a_revoked_certificate_cannot_be_renewed_in_the_store(store: Store) -> None:
    """Recording a renewal of a revoked certificate raises ``ParentRevoked`` and records
    nothing: alone, or with its token (the token stays unspent). Twin: the renewal of a
    certificate not revoked is recorded, token spent."""
    store.add_certificate(_cert("50"))
    store.add_certificate(_cert("51"))
    assert store.revoke(_revocation("50")) == "revoked"
    with pytest.raises(ParentRevoked):
        store.add_certificate(_cert("52", renewed_from="50", operation="renew"))
    with pytest.raises(ParentRevoked):
        store.record_issuances([_use("jti-53", _cert("53", "jti-53", renewed_from="50"))])
    assert not store.token_used("jti-53")
    assert store.record_issuances([_use("jti-54", _cert("54", "jti-54", renewed_from="51"))])
    store.add_certificate(_cert("55", renewed_from="51", operation="renew"))
    assert store.counts() == {"used_tokens": 1, "certificates": 4, "revocations": 1}


def test_a_certificate_round_trips_with_its_audit_trail(store: Store) -> None:
    """What is recorded is what is read back: subject, SANs (none, too), validity to the
    microsecond, provisioner, DER, operation, token and parent. Twin: an unknown serial reads
    as None."""
    sign = _cert("40", "jti-40")
    renew = _cert("41", sans=(), renewed_from="40", operation="renew", der=b"\x00\xff" * 50)
    store.record_issuances([_use("jti-40", sign)])
    store.add_certificate(renew)
    assert store.get_certificate("40") == sign
    assert store.get_certificate("41") == renew
    assert store.get_certificate("42") is None


def test_purge_forgets_only_tokens_past_retention_oldest_first(store: Store) -> None:
    """``purge_expired`` deletes at most ``limit`` token ids expired longer than the
    retention, the oldest first, and keeps the others, the certificates and the revocations.
    Twin: ids expired within the retention, and unexpired ones, stay."""
    cutoff = NOW - TOKEN_RETENTION
    old = [f"old-{i}" for i in range(5)]
    for i, token_id in enumerate(old):
        store.record_issuances([_use(token_id, expires=cutoff - timedelta(hours=5 - i))])
    store.record_issuances([_use("recent", expires=cutoff + timedelta(seconds=1))])
    store.record_issuances([_use("live", _cert("50", "live"))])
    store.revoke(_revocation("50"))
    assert store.purge_expired(NOW, limit=2) == 2
    assert [store.token_used(t) for t in old] == [False, False, True, True, True]
    assert store.purge_expired(NOW, limit=2) == 2
    assert store.purge_expired(NOW, limit=2) == 1
    assert store.purge_expired(NOW, limit=2) == 0
    assert store.token_used("recent")
    assert store.token_used("live")
    assert store.counts() == {"used_tokens": 2, "certificates": 1, "revocations": 1}


def test_purging_in_batches_bounds_the_table(stores: Opener) -> None:
    """Tokens keep expiring while two replicas purge in small batches at once: the table
    never holds more than the ids not yet past retention plus a batch. Twin: without the
    purge it grows with every round."""
    first, second = stores(), stores()
    cutoff = NOW - TOKEN_RETENTION
    sizes = []
    for round_ in range(6):
        uses = [
            _use(f"r{round_}-{i}", expires=cutoff - timedelta(seconds=i + 1)) for i in range(30)
        ]
        first.record_issuances(uses)
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda s: s.purge_expired(NOW, limit=10), [first, second]))
        while (n := second.purge_expired(NOW, limit=10)) > 0:
            done.append(n)
        assert sum(done) == 30
        sizes.append(first.counts()["used_tokens"])
    assert sizes == [0] * 6
    first.record_issuances(
        [_use(f"kept-{i}", expires=cutoff - timedelta(seconds=1)) for i in range(30)]
    )
    first.record_issuances(
        [_use(f"more-{i}", expires=cutoff - timedelta(seconds=1)) for i in range(30)]
    )
    assert first.counts()["used_tokens"] == 60


def test_a_state_is_stored_replaced_and_read_by_another_store(stores: Opener) -> None:
    """``put_state`` stores a value under its key, a second ``put_state`` replaces it, and
    another store object on the database (another process, or a replica) reads the last one;
    keys are kept apart, and one holding a NUL or thousands of characters works too. Twin: a
    key never stored reads as None."""
    one, other = stores(), stores()
    assert one.get_state("peer:kubernetes") is None
    one.put_state("peer:kubernetes", b'{"roots": "A"}')
    one.put_state("peer:spire", b"\x00binary\xff")
    assert other.get_state("peer:kubernetes") == b'{"roots": "A"}'
    other.put_state("peer:kubernetes", b'{"roots": "A B"}')
    assert one.get_state("peer:kubernetes") == b'{"roots": "A B"}'
    assert one.get_state("peer:spire") == b"\x00binary\xff"
    odd = "peer:" + "x" * 3000 + "\x00"
    one.put_state(odd, b"odd")
    assert other.get_state(odd) == b"odd"
    assert other.get_state("peer:" + "x" * 3000) is None
    assert one.counts() == {"used_tokens": 0, "certificates": 0, "revocations": 0}


def test_a_state_is_never_written_on_the_event_loop(store: Store) -> None:
    """Inside ``without_waiting()`` (the CA's event loop) ``put_state``, a durable commit,
    raises ``StoreWouldWait`` having written nothing. Twin: outside, it is written."""
    with without_waiting(), pytest.raises(StoreWouldWait):
        store.put_state("peer:p", b"v")
    assert store.get_state("peer:p") is None
    store.put_state("peer:p", b"v")
    assert store.get_state("peer:p") == b"v"


def test_check_passes_on_a_usable_store(store: Store) -> None:
    """``check`` returns on a store that works (its failing twin, PostgreSQL stopped, is
    ``test_postgres_down_and_back``)."""
    store.check()


def test_check_fails_on_a_closed_store(database: Database) -> None:
    """Twin of the above: ``check`` on a store that was closed raises
    ``StoreUnavailableError``."""
    store = open_store(database)
    store.close()
    with pytest.raises(StoreUnavailableError):
        store.check()


def test_a_newer_schema_version_is_refused(database: Database, store: Store) -> None:
    """A database whose schema a newer federatls wrote is refused at open with a one-line
    ConfigError naming the version. Twin: the same database at this version opens (the
    fixture's store)."""
    store.close()
    if database.kind == "sqlite":
        with sqlite3.connect(database.location) as conn:
            conn.execute("PRAGMA user_version=99")
    else:
        with psycopg.connect(database.location, autocommit=True) as conn:
            conn.execute("UPDATE federatls_schema SET version = 99")
    with pytest.raises(ConfigError, match="schema version 99") as refused:
        open_store(database)
    assert "\n" not in str(refused.value)


def test_init_schema_is_idempotent(database: Database, store: Store) -> None:
    """``init_schema`` on an initialised database changes nothing and says so; the rows stay.
    Twin: on a new database it creates the schema (the fixture's assertion)."""
    store.record_issuances([_use("kept")])
    assert "up to date" in init_schema(database)
    assert store.token_used("kept")


def test_a_sqlite_file_of_schema_3_gains_the_state_table(tmp_path: Path) -> None:
    """A SQLite file of schema version 3 (before the state table) is migrated in place when
    opened: its rows kept, version 4, states stored. Twin: before, the file has no such
    table."""
    path = tmp_path / "federatls.db"
    store = SQLiteStore(path)
    store.record_issuances([_use("kept")])
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE state")
        conn.execute("PRAGMA user_version=3")
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "state" not in names
    store = SQLiteStore(path)
    try:
        assert store.opened_version == 3
        store.put_state("peer:p", b"v")
        assert store.get_state("peer:p") == b"v"
        assert store.token_used("kept")
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4


def test_postgres_schema_1_is_upgraded_by_init_schema(postgres: PostgresCluster) -> None:
    """A PostgreSQL database of schema version 1 (before the state table) is refused at open
    in one line telling to run ``federatls ca db init``; ``init_schema`` upgrades it to 2,
    keeping its rows, and states are then stored. Twin: the refusal before the upgrade."""
    db = Database.postgresql(postgres.new_database())
    init_schema(db)
    store = open_store(db)
    store.record_issuances([_use("kept")])
    store.close()
    with psycopg.connect(db.location, autocommit=True) as conn:
        conn.execute("DROP TABLE state")
        conn.execute("UPDATE federatls_schema SET version = 1")
    with pytest.raises(ConfigError, match=r"schema version 1, older .*federatls ca db init"):
        open_store(db)
    assert init_schema(db).endswith("upgraded the federatls schema from version 1 to 2")
    store = open_store(db)
    try:
        store.put_state("peer:p", b"v")
        assert store.get_state("peer:p") == b"v"
        assert store.token_used("kept")
    finally:
        store.close()


# -- PostgreSQL only ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "described", "endpoint"),
    [
        (
            "postgresql://ca:pw@db.example:5433/federatls",
            "postgresql://ca@db.example:5433/federatls",
            "db.example:5433",
        ),
        (
            "postgres://ca:pw@db.example/federatls?sslmode=verify-full&password=pw",
            "postgresql://ca@db.example/federatls",
            "db.example:5432",
        ),
        (
            "postgresql:///federatls?host=/run/postgresql",
            "postgresql:///federatls",
            "/run/postgresql:5432",
        ),
        (
            "postgresql://ca:pw@[::1]:6432/federatls",
            "postgresql://ca@[::1]:6432/federatls",
            "[::1]:6432",
        ),
    ],
)
def test_a_database_is_described_without_its_password(
    url: str, described: str, endpoint: str
) -> None:
    """A PostgreSQL database is described by its URL without password or parameters, and
    its server by HOST:PORT. Twin: the location itself still holds the password."""
    db = Database.postgresql(url)
    assert (db.describe(), db.endpoint) == (described, endpoint)
    assert "pw" not in db.describe()
    assert db.kind == "postgresql"
    assert ":pw@" in db.location or "?host=" in db.location


@pytest.mark.parametrize("driver", [True, False], ids=["with-psycopg", "without-psycopg"])
def test_postgres_without_its_driver_names_the_extra(driver: bool) -> None:
    """Without psycopg, opening a PostgreSQL database raises MissingExtraError naming
    federatls[ca], and importing federatls.ca never needed it. Twin: with psycopg, the same
    call gets as far as the (absent) server."""
    block = "" if driver else "sys.modules['psycopg'] = None; "
    code = (
        f"import sys; {block}import federatls.ca as ca\n"
        "try:\n"
        f"    ca.open_store(ca.Database.postgresql('postgresql://u:p@127.0.0.1:{free_port()}/d'))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if driver:
        assert run.stdout.startswith("ConfigError cannot reach PostgreSQL at 127.0.0.1:")
    else:
        assert run.stdout.startswith("MissingExtraError a PostgreSQL database needs the 'ca'")
        assert "federatls[ca]" in run.stdout


def test_step_cas_data_source_and_database_make_one_url() -> None:
    """ca.json's ``dataSource`` (no database) and ``database`` make one URL. Twin: another
    scheme is refused, without the password."""
    db = Database.postgresql("postgresql://ca:pw@127.0.0.1:5432/", "federatls")
    assert db.describe() == "postgresql://ca@127.0.0.1:5432/federatls"
    with pytest.raises(ConfigError, match="must be a postgresql:// URL") as refused:
        Database.postgresql("mysql://ca:pw@127.0.0.1:3306/federatls")
    assert "pw" not in str(refused.value)


def test_postgres_without_schema_is_refused(postgres: PostgresCluster) -> None:
    """A database without the federatls schema is refused with one line saying to run
    `federatls ca db init`, and nothing is created in it. Twin: after init_schema it
    opens."""
    db = Database.postgresql(postgres.new_database())
    with pytest.raises(ConfigError, match=r"has no federatls schema: run `federatls ca db init"):
        open_store(db)
    with psycopg.connect(db.location) as conn:
        row = conn.execute("SELECT to_regclass('used_tokens')").fetchone()
    assert row == (None,)
    init_schema(db)
    open_store(db).close()


def test_postgres_unreachable_is_one_line_without_password(postgres: PostgresCluster) -> None:
    """A server that does not answer is a one-line ConfigError naming HOST:PORT, never the
    password. Twin: the running cluster, same password, opens."""
    port = free_port()
    secret = "s3cret-never-shown"
    db = Database.postgresql(f"postgresql://federatls:{secret}@127.0.0.1:{port}/federatls")
    with pytest.raises(ConfigError) as refused:
        open_store(db)
    message = str(refused.value)
    assert f"127.0.0.1:{port}" in message
    assert secret not in message
    assert "\n" not in message
    assert secret not in db.describe()
    wrong = Database.postgresql(postgres.url("federatls", secret, "postgres"))
    with pytest.raises(ConfigError, match="password authentication failed") as refused:
        open_store(wrong)
    assert secret not in str(refused.value)


def test_a_restricted_role_serves_but_cannot_init(postgres: PostgresCluster) -> None:
    """A role that may read and write but not create serves from a database the owner
    initialised; ``init_schema`` as that role on a new database is a clear ConfigError and
    creates nothing. Twin: the owner's ``init_schema`` on that database succeeds."""
    served = postgres.new_database()
    init_schema(Database.postgresql(served))
    replica = postgres.new_role("replica_a", served)
    store = open_store(Database.postgresql(replica))
    try:
        assert store.record_issuances([_use("r", _cert("60", "r"))]) == [True]
        assert store.revoke(_revocation("60")) == "revoked"
        assert store.purge_expired(NOW + timedelta(days=2)) == 1
    finally:
        store.close()
    fresh = postgres.new_database()
    restricted = Database.postgresql(postgres.new_role("replica_b", fresh))
    with pytest.raises(ConfigError, match=r"may not create the federatls schema") as refused:
        init_schema(restricted)
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="has no federatls schema"):
        open_store(restricted)
    assert "created" in init_schema(Database.postgresql(fresh))
    open_store(restricted).close()


def test_postgres_commits_are_durable_whatever_the_default(postgres: PostgresCluster) -> None:
    """The store sets ``synchronous_commit = on`` on its connections, so a database whose
    default is off cannot weaken its commits. Twin: a plain connection to that database
    has it off."""
    url = postgres.new_database()
    name = url.rsplit("/", 1)[1]
    with postgres.admin() as conn:
        conn.execute(f"ALTER DATABASE {name} SET synchronous_commit = off")
    db = Database.postgresql(url)
    init_schema(db)
    store = open_store(db)
    assert isinstance(store, PostgresStore)
    try:
        assert store.every_commit_durable
        setting = store._call(lambda c: c.execute("SHOW synchronous_commit").fetchone())
        assert setting == ("on",)
    finally:
        store.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)


def test_postgres_purge_skips_rows_another_replica_holds(postgres: PostgresCluster) -> None:
    """While another session (a replica purging too) holds the oldest expired ids, a purge
    takes the others at once instead of queueing behind it. Twin: once that session ends,
    the next purge takes the ids it held."""
    url = postgres.new_database()
    db = Database.postgresql(url)
    init_schema(db)
    store = open_store(db)
    cutoff = NOW - TOKEN_RETENTION
    try:
        store.record_issuances(
            [_use(f"old-{i}", expires=cutoff - timedelta(minutes=10 - i)) for i in range(10)]
        )
        with psycopg.connect(url) as other:
            held = other.execute(
                "SELECT token_id FROM used_tokens ORDER BY expires_at LIMIT 4 FOR UPDATE"
            ).fetchall()
            assert [row[0] for row in held] == ["old-0", "old-1", "old-2", "old-3"]
            assert store.purge_expired(NOW, limit=100) == 6
            assert all(store.token_used(f"old-{i}") for i in range(4))
        assert store.purge_expired(NOW, limit=100) == 4
        assert store.counts()["used_tokens"] == 0
    finally:
        store.close()


def test_postgres_calls_never_wait_inside_without_waiting(postgres: PostgresCluster) -> None:
    """Inside ``without_waiting()`` every PostgreSQL call raises ``StoreWouldWait`` and does
    nothing (it would block on the network). Twin: outside, the same calls work."""
    db = Database.postgresql(postgres.new_database())
    init_schema(db)
    store = open_store(db)
    calls: list[Callable[[], object]] = [
        lambda: store.token_used("t"),
        lambda: store.record_issuances([_use("t")]),
        lambda: store.add_certificate(_cert("70")),
        lambda: store.get_certificate("70"),
        lambda: store.revoke(_revocation("70"), _use("u")),
        lambda: store.is_revoked("70"),
        lambda: store.purge_expired(NOW),
        store.check,
        store.counts,
    ]
    try:
        with without_waiting():
            for call in calls:
                with pytest.raises(StoreWouldWait):
                    call()
        assert store.counts() == {"used_tokens": 0, "certificates": 0, "revocations": 0}
        for call in calls:
            call()
        assert store.counts() == {"used_tokens": 2, "certificates": 1, "revocations": 1}
    finally:
        store.close()


def test_postgres_down_and_back(postgres: PostgresCluster) -> None:
    """With the server stopped, every call raises ``StoreUnavailableError`` at once (well
    within the pool's wait) and ``check`` says the server is unreachable; once it is started
    again the same store object serves, with nothing lost. Twin: before the stop, the
    same calls work."""
    db = Database.postgresql(postgres.new_database())
    init_schema(db)
    store = open_store(db)
    assert isinstance(store, PostgresStore)
    store.timeout = 60.0  # a call that waited for the pool would take a minute
    try:
        assert store.record_issuances([_use("before", _cert("80", "before"))]) == [True]
        store.check()
        postgres.stop()
        try:
            for call in (
                lambda: store.token_used("before"),
                lambda: store.record_issuances([_use("during")]),
                lambda: store.revoke(_revocation("80")),
                store.counts,
            ):
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="unreachable"):
                    call()
                assert time.monotonic() - started < 30
            with pytest.raises(StoreUnavailableError, match=f"{postgres.port} is unreachable"):
                store.check()
        finally:
            postgres.start()
        store.check()
        assert store.token_used("before")
        assert not store.token_used("during")
        assert store.record_issuances([_use("after")]) == [True]
        assert not store.is_revoked("80")
    finally:
        store.close()


def test_postgres_stalled_is_unavailable_after_the_deadline_and_recovers(
    postgres: PostgresCluster,
) -> None:
    """A server that stops answering without closing its connections (SIGSTOP: its kernel
    still acknowledges) trips no server or TCP timeout: a call is cut at the store's
    deadline and raises ``StoreUnavailableError``, instead of holding its thread for as
    long as the stall lasts; once the server runs again the same store serves. Twin:
    before the stall, the same calls are answered."""
    db = Database.postgresql(postgres.new_database())
    init_schema(db)
    store = PostgresStore(db, deadline=2.0)
    try:
        assert store.record_issuances([_use("before")]) == [True]
        assert store.token_used("before")
        outcomes: list[BaseException | bool] = []

        def spend() -> None:
            try:
                outcomes.append(store.record_issuances([_use("stalled")])[0])
            except BaseException as exc:
                outcomes.append(exc)

        frozen = postgres.freeze()
        try:
            caller = threading.Thread(target=spend)
            caller.start()
            caller.join(60)  # a bound for the test; the store's own deadline is 2 s
            assert not caller.is_alive(), "the call was not cut at its deadline"
        finally:
            postgres.thaw(frozen)
        assert len(outcomes) == 1
        assert isinstance(outcomes[0], StoreUnavailableError), outcomes
        assert "gave no answer within 2 s" in str(outcomes[0])
        deadline = time.monotonic() + 60
        while True:
            try:
                store.check()
                break
            except StoreUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert store.token_used("before")
        assert store.record_issuances([_use("after")]) == [True]
    finally:
        store.close()


def test_postgres_killed_under_load_keeps_every_acknowledged_commit(
    postgres: PostgresCluster,
) -> None:
    """Four threads spend tokens through one store while the server is killed (SIGKILL) and
    started again: every spend the store acknowledged is there after the crash recovery,
    every call in between raised ``StoreUnavailableError`` (never a driver error), and the
    same store serves again. Twin: a token the threads never sent reads as unused."""
    db = Database.postgresql(postgres.new_database())
    init_schema(db)
    store = open_store(db)
    acknowledged: list[str] = []
    refused: list[BaseException] = []
    stop = threading.Event()

    def spend(worker: int) -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            token_id = f"w{worker}-{i}"
            try:
                if store.record_issuances([_use(token_id, _cert(f"{worker}{i:06d}", token_id))]):
                    acknowledged.append(token_id)
            except StoreUnavailableError as exc:
                refused.append(exc)
                time.sleep(0.01)
            except BaseException as exc:  # a driver error would end up here
                refused.append(exc)
                raise

    threads = [threading.Thread(target=spend, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(acknowledged) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        postgres.kill()
        postgres.start()
        after = len(acknowledged)
        while len(acknowledged) < after + 50 and time.monotonic() < deadline + 30:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    try:
        assert refused, "the kill was not noticed"
        assert all(isinstance(exc, StoreUnavailableError) for exc in refused)
        assert len(acknowledged) >= after + 50  # served again, by the same store
        missing = [t for t in acknowledged if not store.token_used(t)]
        assert missing == []
        assert store.counts()["certificates"] >= len(acknowledged)
        assert not store.token_used("w9-0")
    finally:
        store.close()


def test_a_commit_lost_in_flight_raises(postgres: PostgresCluster) -> None:
    """When the connection is lost while COMMIT is on its way (here: a deferred trigger holds
    the commit, and the server ends the session), the call raises ``StoreUnavailableError``
    saying the outcome is unknown; the store serves again afterwards. Twin: the same commit
    left alone succeeds."""
    url = postgres.new_database()
    db = Database.postgresql(url)
    init_schema(db)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.token_id LIKE 'slow%' THEN PERFORM pg_sleep(3); END IF;"
            " RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON used_tokens"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow()"
        )
    store = open_store(db)
    stop = threading.Event()

    def terminate() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.wait(0.05):
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE query LIKE 'COMMIT%' AND pid <> pg_backend_pid()"
                )

    killer = threading.Thread(target=terminate)
    killer.start()
    try:
        with pytest.raises(StoreUnavailableError, match="outcome is unknown"):
            store.record_issuances([_use("slow-1")])
    finally:
        stop.set()
        killer.join()
    try:
        assert store.record_issuances([_use("fast")]) == [True]
        assert store.record_issuances([_use("slow-2")]) == [True]  # nobody ends it this time
        assert store.token_used("slow-2")
    finally:
        store.close()


def _sqlite_with_state(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    store.record_issuances(
        [_use("t1", _cert("90", "t1")), _use("t2", _cert("91", "t2")), _use("t3")]
    )
    store.add_certificate(_cert("92", sans=(), renewed_from="90", operation="renew"))
    store.revoke(_revocation("91"), _use("rev-91"))
    return store


def test_copy_store_copies_everything(tmp_path: Path, postgres: PostgresCluster) -> None:
    """``copy_store`` copies a SQLite file's tokens, certificates (their trail too),
    revocations and federation peers' states into an empty PostgreSQL database, creating the
    schema; a PostgreSQL store then reads the same. Twin: a token the file never saw reads
    as unused there, a state it never held as None."""
    source = tmp_path / "federatls.db"
    lite = _sqlite_with_state(source)
    lite.put_state("peer:kubernetes", b'{"roots": "..."}')
    expected = lite.counts()
    certs = {s: lite.get_certificate(s) for s in ("90", "91", "92")}
    lite.close()
    target = Database.postgresql(postgres.new_database())
    assert copy_store(source, target) == expected
    store = open_store(target)
    try:
        assert store.counts() == expected == {
            "used_tokens": 4, "certificates": 3, "revocations": 1
        }  # fmt: skip
        for serial, cert in certs.items():
            assert store.get_certificate(serial) == cert
        assert store.is_revoked("91")
        assert not store.is_revoked("90")
        assert all(store.token_used(t) for t in ("t1", "t2", "t3", "rev-91"))
        assert not store.token_used("t4")
        assert store.get_state("peer:kubernetes") == b'{"roots": "..."}'
        assert store.get_state("peer:spire") is None
    finally:
        store.close()


def test_copy_store_reads_a_schema_1_file(tmp_path: Path, postgres: PostgresCluster) -> None:
    """A SQLite file from before the audit trail (schema 1) is copied as it is, its
    certificates with an empty trail, and is not changed. Twin: a SQLite file that is not a
    federatls database (schema 0) is refused and copies nothing."""
    source = tmp_path / "old.db"
    with sqlite3.connect(source) as conn:
        conn.executescript(
            "CREATE TABLE used_tokens (token_id TEXT PRIMARY KEY, provisioner TEXT,"
            " expires_at TEXT, used_at TEXT);"
            "CREATE TABLE certificates (serial TEXT PRIMARY KEY, subject TEXT, sans TEXT,"
            " not_before TEXT, not_after TEXT, provisioner TEXT, renewed_from TEXT, der BLOB);"
            "CREATE TABLE revocations (serial TEXT PRIMARY KEY, reason_code INTEGER,"
            " reason TEXT, provisioner TEXT, token_id TEXT, mtls INTEGER, revoked_at TEXT);"
            "INSERT INTO certificates VALUES ('7', 'old', '[\"old\"]',"
            " '2026-01-01T00:00:00+00:00', '2026-01-02T00:00:00+00:00', 'p:k', NULL, x'3082');"
            "PRAGMA user_version=1;"
        )
    target = Database.postgresql(postgres.new_database())
    assert copy_store(source, target) == {"used_tokens": 0, "certificates": 1, "revocations": 0}
    store = open_store(target)
    try:
        old = store.get_certificate("7")
        assert old is not None
        assert (old.sans, old.der, old.operation, old.token_id) == (("old",), b"\x30\x82", "", "")
    finally:
        store.close()
    with sqlite3.connect(source) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        conn.execute("PRAGMA user_version=0")
    empty = Database.postgresql(postgres.new_database())
    with pytest.raises(ConfigError, match="schema version 0: not a federatls database"):
        copy_store(source, empty)
    with psycopg.connect(empty.location) as conn:
        assert conn.execute("SELECT to_regclass('used_tokens')").fetchone() == (None,)


def test_copy_store_refuses_a_database_with_rows(tmp_path: Path, postgres: PostgresCluster) -> None:
    """A target holding any row is refused with a ConfigError naming what it holds, and is
    left as it was. Twin: the same copy into an empty database succeeds (above)."""
    source = tmp_path / "federatls.db"
    _sqlite_with_state(source).close()
    target = Database.postgresql(postgres.new_database())
    init_schema(target)
    store = open_store(target)
    try:
        store.record_issuances([_use("already-here")])
        with pytest.raises(ConfigError, match=r"not empty \(it holds 1 used tokens\)"):
            copy_store(source, target)
        assert store.counts() == {"used_tokens": 1, "certificates": 0, "revocations": 0}
    finally:
        store.close()
