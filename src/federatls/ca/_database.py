"""Which database holds a CA's state, and the operator's actions on it: open it as a ``Store``,
create or upgrade its schema, copy an embedded SQLite file into PostgreSQL. The stores
themselves live in ``_store`` (SQLite) and ``_postgres``; psycopg is imported only when a
PostgreSQL database is used, so the embedded CA needs none of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from .._errors import ConfigError, MissingExtraError
from ._store import _SCHEMA_VERSION, SQLiteStore, Store

__all__ = ["Database", "copy_store", "init_schema", "open_store"]

_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class Database:
    """Where a CA keeps its state: ``kind`` "sqlite" with ``location`` the file's path, or
    "postgresql" with ``location`` a libpq URL (``postgresql://USER:PASSWORD@HOST:PORT/NAME``,
    query parameters such as ``sslmode`` passed on to libpq)."""

    kind: Literal["sqlite", "postgresql"]
    location: str

    @classmethod
    def sqlite(cls, path: Path | str) -> Database:
        return cls("sqlite", str(path))

    @classmethod
    def postgresql(cls, url: str, database: str | None = None) -> Database:
        """A PostgreSQL database from a URL; ``database`` (ca.json's ``db.database``, beside
        step-ca's ``dataSource``) names the database when given, replacing the URL's path.
        ConfigError for another scheme, or a URL that names no database."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigError(f"not a PostgreSQL URL: {exc}") from exc
        if parts.scheme not in _SCHEMES:
            raise ConfigError(
                f"not a PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/NAME): "
                f"scheme {parts.scheme!r}"
            )
        if database is not None:
            parts = parts._replace(path="/" + quote(database, safe=""))
        if not unquote(parts.path.lstrip("/")):
            raise ConfigError(
                f"{_describe(parts.geturl())} names no database (…/NAME, or ca.json's db.database)"
            )
        return cls("postgresql", urlunsplit(parts))

    @classmethod
    def from_url(cls, text: str) -> Database:
        """``--db``: a PostgreSQL URL (postgresql:// or postgres://)."""
        return cls.postgresql(text)

    def describe(self) -> str:
        """The database for messages and logs: the file, or the URL without its password
        and query (``postgresql://USER@HOST:PORT/NAME``)."""
        if self.kind == "sqlite":
            return self.location
        return _describe(self.location)

    @property
    def endpoint(self) -> str:
        """PostgreSQL's ``HOST:PORT`` (5432 when the URL gives none)."""
        netloc = urlsplit(self.location).netloc.rsplit("@", 1)[-1]
        if not netloc:
            return "localhost:5432"
        return netloc if netloc.rsplit(":", 1)[-1].isdigit() else f"{netloc}:5432"


def _describe(url: str) -> str:
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}@{hostport}" if user else hostport
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def open_store(db: Database, *, checkpoint_interval: float | None = None) -> Store:
    """The store of ``db``. SQLite: the file, created or migrated as needed. PostgreSQL: never
    creates anything; ConfigError (one line) for a database without the federatls schema
    (``federatls ca db init``), with a schema version this federatls does not know, or a
    server that cannot be reached (its HOST:PORT, never the password)."""
    if db.kind == "sqlite":
        return SQLiteStore(Path(db.location), checkpoint_interval=checkpoint_interval)
    _need_driver()
    from ._postgres import PostgresStore

    return PostgresStore(db)


def init_schema(db: Database) -> str:
    """Create the schema of ``db``, or bring an older one up to this federatls's version
    (again and again: idempotent); one line saying what it did. PostgreSQL: the role must
    be allowed to create tables (the database's owner, typically), else ConfigError."""
    if db.kind == "sqlite":
        store = SQLiteStore(Path(db.location))
        try:
            was = store.opened_version
        finally:
            store.close()
        return _said(db, was, _SCHEMA_VERSION)
    _need_driver()
    from ._postgres import init_postgres_schema

    was, now = init_postgres_schema(db)
    return _said(db, was, now)


def _said(db: Database, was: int, now: int) -> str:
    if was == 0:
        return f"{db.describe()}: created the federatls schema (version {now})"
    if was != now:
        return f"{db.describe()}: upgraded the federatls schema from version {was} to {now}"
    return f"{db.describe()}: the federatls schema is up to date (version {now})"


def copy_store(source: Path, target: Database) -> dict[str, int]:
    """Copy a SQLite file's used tokens, certificates and revocations into an empty
    PostgreSQL database, its schema created if absent, in one transaction; how many rows
    of each. ConfigError if the target holds any row (naming what), or is not PostgreSQL."""
    if target.kind != "postgresql":
        raise ConfigError(f"copy_store copies into PostgreSQL, not {target.describe()}")
    if not source.is_file():
        raise ConfigError(f"{source}: no such SQLite database")
    _need_driver()
    from ._postgres import copy_sqlite_into

    return copy_sqlite_into(source, target)


def _need_driver() -> None:
    """PostgreSQL's driver comes with the ``ca`` extra: MissingExtraError without it."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("a PostgreSQL database", "ca", exc.name) from exc
