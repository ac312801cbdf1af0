"""Hostile inputs against the CA on PostgreSQL and its ``ca db`` commands, against a real
throwaway cluster (the ``postgres`` fixture): databases holding tables that are not
federatls's, values PostgreSQL's text refuses, SQLite files with rows that cannot be read.
Each attack has its twin that the same path serves."""

from __future__ import annotations

import socket

import psycopg
import pytest

from federatls.ca._database import Database, init_schema
from test_ca_database import password_of, tables, use_postgres

from harness import PKI, assert_one_line_error, federatls
from postgres import PostgresCluster

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    """A fresh, empty database (no schema) on the session's cluster."""
    return postgres.new_database()


@pytest.fixture
def pg(pki: PKI, pg_url: str) -> str:
    """``pki``'s ca.json pointed at a fresh database holding the federatls schema."""
    init_schema(Database("postgresql", pg_url))
    use_postgres(pki, pg_url)
    return pg_url


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
    assert tables(pg_url) == {"federatls_schema", "used_tokens", "certificates", "revocations"}


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
