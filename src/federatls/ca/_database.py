"""Which database holds a CA's state, and the operator's actions on it: open it as a ``Store``,
create or upgrade its schema, copy an embedded SQLite file into PostgreSQL. The stores
themselves live in ``_store`` (SQLite) and ``_postgres``; psycopg is imported only when a
PostgreSQL database is used, so the embedded CA needs none of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .._errors import ConfigError, MissingExtraError
from ._store import _SCHEMA_VERSION, SQLiteStore, Store

__all__ = ["Database", "copy_store", "init_schema", "open_store"]


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
    def postgresql(
        cls, url: str, database: str | None = None, *, what: str = "the database URL"
    ) -> Database:
        """A PostgreSQL database from a URL (``postgresql://`` or ``postgres://``), with its
        user name and password percent-encoded as libpq reads them; ``database`` (ca.json's
        ``db.database``, beside step-ca's ``dataSource``) replaces the URL's database name.
        With neither, libpq connects to the database named as the user, as step-ca does.
        ``ConfigError`` names ``what`` (never the password). Key=value connection strings
        are not read: give the same settings as a URL."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in ("postgresql", "postgres"):
            raise ConfigError(
                f"{what} must be a postgresql:// URL, for example "
                "postgresql://USER:PASSWORD@HOST:5432/NAME"
            )
        try:
            parts = urlsplit("postgresql://" + rest)
        except ValueError as exc:
            raise ConfigError(f"{what} is not a URL libpq can read ({exc})") from None
        if parts.fragment:
            raise ConfigError(f"{what}: a database URL has no #fragment")
        # A password may hold "@": Go's URL parser (step-ca's) splits at the last one. libpq
        # splits at the first, so the user name and password are written back percent-encoded.
        userinfo, at, hosts = parts.netloc.rpartition("@")
        netloc, password = hosts, ""
        if at:
            user, colon, password = userinfo.partition(":")
            user = quote(_decoded(user, f"{what}: the user name"), safe="")
            password = quote(_decoded(password, f"{what}: the password"), safe="")
            netloc = f"{user}:{password}@{hosts}" if colon else f"{user}@{hosts}"
        for host in hosts.split(","):
            port = host.rpartition("]")[2].partition(":")[2] if host else ""
            if port and (not port.isdigit() or not 0 < int(port) < 65536):
                raise ConfigError(f"{what}: port {port!r} is not a number from 1 to 65535")
        path = parts.path
        if database is not None:
            path = "/" + quote(database, safe="")
        elif path not in ("", "/"):
            name = _decoded(path[1:], f"{what}: the database name")
            path = "/" + quote(name, safe="")
        # Written out, not urlunsplit: that drops the "//" of a URL without a host
        # (postgresql:///NAME, libpq's default host), which libpq then cannot read.
        location = f"postgresql://{netloc}{path}" + (f"?{parts.query}" if parts.query else "")
        _libpq_reads(location, what)
        return cls("postgresql", location)

    def describe(self) -> str:
        """The database for messages and logs: the file, or the URL without its password
        and query (``postgresql://USER@HOST:PORT/NAME``)."""
        if self.kind == "sqlite":
            return self.location
        return _describe(self.location)

    @property
    def endpoint(self) -> str:
        """PostgreSQL's ``HOST:PORT`` for messages: the URL's, or its ``host`` and ``port``
        parameters (a socket directory, say), libpq's defaults otherwise."""
        parts = urlsplit(self.location)
        query = parse_qs(parts.query)
        hostport = parts.netloc.rpartition("@")[2]
        host, colon, port = hostport.rpartition(":")
        if not colon or not port.isdigit() or host.endswith(":"):  # no port, or bare IPv6
            host, port = hostport, ""
        host = host or query.get("host", ["localhost"])[0]
        port = port or query.get("port", ["5432"])[0]
        return f"{host}:{port}"


def _decoded(text: str, what: str) -> str:
    """Percent-decoded ``text``; a malformed escape (``%zz``) is a ``ConfigError``."""
    if re.search(r"%(?![0-9A-Fa-f]{2})", text):
        raise ConfigError(f"{what} holds a malformed percent-escape (write % as %25)")
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 once percent-decoded") from None


def _libpq_reads(location: str, what: str) -> None:
    """ConfigError unless libpq's own parser reads ``location`` (an unknown query parameter,
    say), with every password in it masked; nothing to check without the driver, which
    ``open_store`` asks for anyway."""
    try:
        from psycopg import Error
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return
    try:
        conninfo_to_dict(location)
    except Error as exc:
        parts = urlsplit(location)
        secrets = [parts.netloc.rpartition("@")[0].partition(":")[2]]
        secrets += [
            v for k, _, v in (p.partition("=") for p in parts.query.split("&")) if k == "password"
        ]
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        for secret in filter(None, secrets):
            message = message.replace(secret, "***").replace(unquote(secret), "***")
        raise ConfigError(f"{what} is not a URL libpq can read: {message}") from None


def _describe(url: str) -> str:
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}@{hostport}" if user else hostport
    return f"{parts.scheme}://{netloc}{parts.path}"


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
