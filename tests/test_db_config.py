"""ca.json's ``db`` block as step-ca writes it, and the command line's ``--db`` and ``--to``:
which database a CA uses, and the one-line refusals of malformed ones (no database needed).

The URLs the CA hands to libpq are read back with libpq's own parser (psycopg's
``conninfo_to_dict``), so what is checked is what the server would be asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from federatls._errors import ConfigError
from federatls.ca._config import CAConfig
from federatls.ca._database import Database

from harness import PKI, assert_one_line_error, federatls

pytestmark = pytest.mark.anyio

SECRET = "s3cr@t/pa:ss%word"  # every character a URL gives a meaning to
ENCODED = "s3cr%40t%2Fpa%3Ass%25word"


def _config(pki: PKI, db: Any) -> CAConfig:
    pki.edit(lambda d: d.__setitem__("db", db))
    return CAConfig.load(pki.config)


def _libpq(location: str) -> dict[str, Any]:
    return {k: v for k, v in conninfo_to_dict(location).items() if v is not None}


def test_postgresql_block_as_step_ca_writes_it(pki: PKI) -> None:
    """``{"type": "postgresql", "dataSource": URL ending in "/", "database": NAME}`` is that
    database on that server, user and percent-encoded password as libpq reads them. Twin:
    the badgerv2 block ``ca init`` writes keeps the SQLite file beside ca.json."""
    db = _config(
        pki,
        {
            "type": "postgresql",
            "dataSource": f"postgresql://ca:{ENCODED}@db.internal:5433/",
            "database": "federatls",
        },
    ).database
    assert db.kind == "postgresql"
    assert _libpq(db.location) == {
        "user": "ca",
        "password": SECRET,
        "host": "db.internal",
        "port": "5433",
        "dbname": "federatls",
    }
    pki.edit(lambda d: d.__setitem__("db", {"type": "badgerv2", "dataSource": "/x/db"}))
    db = CAConfig.load(pki.config).database
    assert (db.kind, db.location) == ("sqlite", str(pki.config.parent / "federatls.db"))


@pytest.mark.parametrize("db", [None, {"type": "none"}, {"type": "bbolt", "dataSource": "x"}])
def test_every_other_db_type_is_sqlite_beside_ca_json(pki: PKI, db: Any) -> None:
    """No block, step's "none" and any other type than postgresql: the embedded SQLite store
    beside ca.json, as before. Twin: the same blocks typed postgresql (above, below) are not."""
    config = _config(pki, db)
    assert config.database.kind == "sqlite"
    assert config.database.location == str(config.store_path)


def test_database_in_the_data_source_and_postgres_scheme(pki: PKI) -> None:
    """A ``postgres://`` dataSource naming its database in its path, with no ``database``
    field, is that database (step-ca 0.19's driver, pgx, reads it so); query parameters
    stay. Twin: a ``database`` field replaces the path's name, as in step-ca."""
    source = "postgres://ca:pw@127.0.0.1:5432/from_path?sslmode=disable"
    db = _config(pki, {"type": "PostgreSQL", "dataSource": source}).database
    assert db.location.startswith("postgresql://")
    assert _libpq(db.location)["dbname"] == "from_path"
    assert _libpq(db.location)["sslmode"] == "disable"
    db = _config(pki, {"type": "postgresql", "dataSource": source, "database": "ca db"}).database
    assert _libpq(db.location)["dbname"] == "ca db"


def test_a_socket_directory_url_without_host(pki: PKI) -> None:
    """``postgresql:///NAME?host=/socket/dir`` (no host before the path: libpq's unix
    socket) is handed to libpq as that database in that directory, the "//" kept. Twin:
    the same URL with a host reads as that host."""
    source = "postgresql:///ca_db?host=/run/postgresql"
    db = _config(pki, {"type": "postgresql", "dataSource": source}).database
    assert _libpq(db.location) == {"dbname": "ca_db", "host": "/run/postgresql"}
    db = _config(pki, {"type": "postgresql", "dataSource": "postgresql://h/ca_db"}).database
    assert _libpq(db.location) == {"dbname": "ca_db", "host": "h"}


def test_an_unencoded_at_sign_in_the_password(pki: PKI) -> None:
    """A password holding a bare "@" is read as step-ca (Go's URL parser) reads it, up to
    the last "@", and handed to libpq encoded. Twin: the encoded form gives the same."""
    bare = _config(pki, {"type": "postgresql", "dataSource": "postgresql://ca:p@ss@h/db"})
    encoded = _config(pki, {"type": "postgresql", "dataSource": "postgresql://ca:p%40ss@h/db"})
    assert _libpq(bare.database.location)["password"] == "p@ss"
    assert bare.database == encoded.database


MALFORMED = [
    ({"type": "postgresql"}, "db.dataSource must be a URL"),
    ({"type": "postgresql", "dataSource": ""}, "db.dataSource must be a URL"),
    ({"type": "postgresql", "dataSource": 5432}, "db.dataSource must be a URL"),
    ({"type": "postgresql", "dataSource": "host=h user=ca"}, "must be a postgresql:// URL"),
    ({"type": "postgresql", "dataSource": "mysql://ca@h/"}, "must be a postgresql:// URL"),
    ({"type": "postgresql", "dataSource": "postgresql://h:99999/"}, "port '99999'"),
    ({"type": "postgresql", "dataSource": "postgresql://h:x/"}, "port 'x'"),
    ({"type": "postgresql", "dataSource": "postgresql://ca:%zz@h/"}, "password holds a malformed"),
    ({"type": "postgresql", "dataSource": "postgresql://ca:%ff@h/"}, "password is not UTF-8"),
    ({"type": "postgresql", "dataSource": "postgresql://h/", "database": 1}, "db.database must"),
    ({"type": "postgresql", "dataSource": "postgresql://h/db?nosuch=1"}, 'parameter: "nosuch"'),
    ({"type": "postgresql", "dataSource": "postgresql://h/?bogus=1"}, 'parameter: "bogus"'),
    ({"type": "postgresql", "dataSource": "postgresql://ca:pw@[::1/"}, "is not a URL libpq"),
    ("postgresql://h/", "'db' must be an object"),
]


@pytest.mark.parametrize(("db", "fragment"), MALFORMED, ids=[f for _, f in MALFORMED])
def test_a_malformed_postgresql_block_is_refused(pki: PKI, db: Any, fragment: str) -> None:
    """A postgresql block that names no usable database is a ``ConfigError`` naming the
    file and the field (twin of the blocks read above)."""
    with pytest.raises(ConfigError) as caught:
        _config(pki, db)
    assert str(pki.config) in str(caught.value)
    assert fragment in str(caught.value)


def test_a_refused_url_never_shows_its_password() -> None:
    """The message of a refused URL names the problem, not the password. Twin: the same
    URL with a good port is read, password included."""
    with pytest.raises(ConfigError) as caught:
        Database.postgresql(f"postgresql://ca:{ENCODED}@h:0/db", what="--db")
    assert "port '0'" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert ENCODED not in str(caught.value)
    assert _libpq(Database.postgresql(f"postgresql://ca:{ENCODED}@h:1/db", what="--db").location)[
        "password"
    ] == (SECRET)


HOSTLESS = [
    ("postgresql:///federatls", {"dbname": "federatls"}),
    ("postgresql:///?service=ca", {"service": "ca"}),
    ("postgres:///federatls?host=/run/postgresql&port=5433", {"host": "/run/postgresql"}),
]


@pytest.mark.parametrize(("url", "wanted"), HOSTLESS, ids=[u for u, _ in HOSTLESS])
def test_a_url_without_a_host_reaches_libpq_as_written(url: str, wanted: dict[str, str]) -> None:
    """A URL without a host (``postgresql:///NAME``: libpq's defaults, a ``host`` parameter or
    a ``service`` from pg_service.conf) is read by libpq as the same settings, ``database``
    replacing the name. Twin: a parameter libpq does not know is refused in one line
    (``test_db_usage_error_is_one_line_exit_2``)."""
    read = _libpq(Database.postgresql(url).location)
    assert wanted.items() <= read.items(), read
    assert _libpq(Database.postgresql(url, "other").location)["dbname"] == "other"


@pytest.mark.parametrize(
    "path",
    [["ca", "db"], ["ca", "db", "init"], ["ca", "db", "migrate"]],
    ids=lambda p: " ".join(p),
)
async def test_db_help_exits_zero(path: list[str]) -> None:
    """``ca db`` and its verbs print their usage for --help and exit 0 (twin below)."""
    run = await federatls(*path, "--help")
    assert (run.code, run.err) == (0, "")
    assert run.out.startswith("usage: federatls " + " ".join(path))


USAGE_ERRORS = [
    (["ca", "db"], "required: db_verb"),
    (["ca", "db", "bogus"], "invalid choice: 'bogus'"),
    (["ca", "db", "init"], "required: config"),
    (["ca", "db", "migrate", "ca.json"], "required: --to"),
    (["ca", "db", "migrate", "ca.json", "--to", "/var/lib/x.db"], "must be a postgresql:// URL"),
    (["ca", "db", "init", "ca.json", "--db", "postgresql://h:0/x"], "port '0'"),
    (["ca", "serve", "ca.json", "--db", "mysql://ca:pw@h/"], "argument --db: the database URL"),
    (["ca", "serve", "ca.json", "--db", f"postgresql://ca:{ENCODED}@h:0/"], "port '0'"),
    (["ca", "serve", "ca.json", "--db", "postgresql://h/db?nosuch=1"], 'parameter: "nosuch"'),
    (["ca", "db", "init", "ca.json", "--db", "postgresql:///db?sslmode"], "separator"),
    (["ca", "serve", "ca.json", "--db", f"postgresql://h/?password={SECRET}"], "percent-encoded"),
    (["ca", "serve", "ca.json", "--db", f"postgresql://ca:{ENCODED}@[::1/"], "not a URL"),
    (["ca", "db", "init", "ca.json", "--db", f"postgresql://ca:{ENCODED}@h/?bogus=1"], "bogus"),
    (["ca", "db", "migrate", "ca.json", "--to", f"postgresql://ca:{ENCODED}@[h/"], "not a URL"),
]


@pytest.mark.parametrize(
    ("argv", "fragment"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS]
)
async def test_db_usage_error_is_one_line_exit_2(argv: list[str], fragment: str) -> None:
    """A missing or malformed database argument is a usage mistake: one line, exit 2, no
    password in it."""
    run = await federatls(*argv)
    assert (run.code, run.out) == (2, ""), run
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert fragment in lines[0]
    assert lines[0].endswith("(see --help)")
    assert SECRET not in run.err
    assert ENCODED not in run.err


async def test_db_init_with_a_malformed_block_is_one_line(pki: PKI) -> None:
    """``ca db init`` on a ca.json whose db block is malformed: one line naming the field,
    exit 1. Twin: ``test_a_malformed_postgresql_block_is_refused`` reads the same block."""
    pki.edit(lambda d: d.__setitem__("db", {"type": "postgresql", "dataSource": "h:5432"}))
    run = await federatls("ca", "db", "init", pki.config)
    assert_one_line_error(run, "db.dataSource must be a postgresql:// URL")


async def test_migrate_without_sqlite_state_is_one_line(pki: PKI, tmp_path: Path) -> None:
    """``ca db migrate`` beside a ca.json that never ran has nothing to copy: one line naming
    the file, exit 1, and the target is not touched (an unreachable one would be a different
    message)."""
    run = await federatls(
        "ca", "db", "migrate", pki.config, "--to", "postgresql://ca:pw@127.0.0.1:1/db"
    )
    assert_one_line_error(run, str(pki.config.parent / "federatls.db"), "does not exist")
    assert "pw@" not in run.err


async def test_db_init_on_sqlite_creates_then_finds_it_current(pki: PKI) -> None:
    """``ca db init`` on ca.json's default block makes the SQLite file beside it and says so
    in one line; run again it changes nothing and says the schema is up to date (the twin:
    the same command, a different line)."""
    store = pki.config.parent / "federatls.db"
    run = await federatls("ca", "db", "init", pki.config)
    assert (run.code, run.err) == (0, ""), run
    assert run.out == f"{store}: created the federatls schema (version 4)\n"
    again = await federatls("ca", "db", "init", pki.config)
    assert again.out == f"{store}: the federatls schema is up to date (version 4)\n", again
