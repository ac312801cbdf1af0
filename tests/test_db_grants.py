"""The privileges docs/ca.md tells an operator to grant the role ``ca serve`` runs as, read
from the page itself: with exactly those, on a real PostgreSQL database whose schema
``init_schema`` made, every store call the CA makes works; without one of them, the call that
needs it fails in one line."""

from __future__ import annotations

import re
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from psycopg import sql

from federatls._errors import ConfigError, StoreUnavailableError
from federatls.ca import Database, IssuedCertificate, Revocation, TokenUse, init_schema, open_store

from postgres import PostgresCluster

DOC = Path(__file__).parent.parent / "docs" / "ca.md"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def documented_grants() -> list[str]:
    """The ``GRANT ... TO replica;`` lines of docs/ca.md, in order."""
    grants = re.findall(r"^GRANT [^;\n]+ TO replica;$", DOC.read_text(), flags=re.MULTILINE)
    assert grants, f"{DOC} grants nothing to the serving role"
    return grants


def serving_role(postgres: PostgresCluster, grants: list[str]) -> Database:
    """A fresh database with the federatls schema (made by its owner) and a new login role
    given exactly ``grants``; that role's database."""
    owner_url = postgres.new_database()
    assert "created" in init_schema(Database.postgresql(owner_url))
    name = urlsplit(owner_url).path.lstrip("/")
    role, password = f"serving_{secrets.token_hex(4)}", secrets.token_hex(12)
    with postgres.admin(name) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        for grant in grants:
            conn.execute(grant.replace(" TO replica;", f" TO {role}"))
    return Database.postgresql(postgres.url(role, password, name))


def _cert(serial: str, token_id: str) -> IssuedCertificate:
    return IssuedCertificate(
        serial, f"svc-{serial}", (f"svc-{serial}",), NOW, NOW + timedelta(hours=1),
        "admin:kid", b"\x30\x82" + serial.encode(), operation="sign", token_id=token_id,
    )  # fmt: skip


def _use(token_id: str, cert: IssuedCertificate | None, expires: datetime) -> TokenUse:
    return TokenUse(token_id, "admin:kid", expires, NOW, certificate=cert)


def test_the_documented_grants_serve_every_store_call(postgres: PostgresCluster) -> None:
    """With docs/ca.md's grants and no others, the role opens the store (the schema check),
    spends tokens once, records, reads, renews and revokes certificates, answers ``check``
    and purges an expired token id. Twin: ``test_without_a_documented_grant_its_call_fails``."""
    store = open_store(serving_role(postgres, documented_grants()))
    try:
        old = NOW - timedelta(days=2)
        assert store.record_issuances([_use("old", _cert("1", "old"), old)]) == [True]
        fresh = _use("new", _cert("2", "new"), NOW + timedelta(minutes=5))
        assert store.record_issuances([fresh]) == [True]
        assert store.record_issuances([fresh]) == [False]
        assert store.token_used("new")
        store.add_certificate(_cert("3", ""))
        assert store.get_certificate("3") is not None
        store.add_certificate(replace(_cert("4", ""), renewed_from="3", operation="renew"))
        assert store.get_certificate("4") is not None
        revocation = Revocation("2", 1, "key compromise", NOW, "admin:kid", "rev-2", False)
        spend = _use("rev-2", None, NOW + timedelta(minutes=5))
        assert store.revoke(revocation, spend) == "revoked"
        assert store.is_revoked("2")
        store.check()
        assert store.purge_expired(NOW) == 1
        assert not store.token_used("old")
        store.put_state("peer:kubernetes", b"1")
        store.put_state("peer:kubernetes", b"2")
        assert store.get_state("peer:kubernetes") == b"2"
    finally:
        store.close()


def test_without_a_documented_grant_its_call_fails(postgres: PostgresCluster) -> None:
    """Twin: without ``UPDATE`` on used_tokens the purge is refused (its rows are locked
    ``FOR UPDATE``) while spending still works; without ``UPDATE`` on certificates a renewal
    is (it locks its parent ``FOR SHARE``); without ``SELECT`` on the schema table the
    store does not open; without ``UPDATE`` on state no peer's state is stored (an upsert
    needs it). Each refusal names the table."""
    grants = documented_grants()
    no_update = [g.replace("SELECT, INSERT, UPDATE, DELETE ON used_tokens", "SELECT, INSERT, "
                           "DELETE ON used_tokens") for g in grants]  # fmt: skip
    assert no_update != grants, "docs/ca.md no longer grants UPDATE on used_tokens"
    store = open_store(serving_role(postgres, no_update))
    try:
        use = _use("t", _cert("1", "t"), NOW - timedelta(days=2))
        assert store.record_issuances([use]) == [True]
        with pytest.raises(StoreUnavailableError, match="permission denied for table used_tokens"):
            store.purge_expired(NOW)
    finally:
        store.close()
    no_update = [g.replace("SELECT, INSERT, UPDATE ON certificates", "SELECT, INSERT ON "
                           "certificates") for g in grants]  # fmt: skip
    assert no_update != grants, "docs/ca.md no longer grants UPDATE on certificates"
    store = open_store(serving_role(postgres, no_update))
    try:
        store.add_certificate(_cert("1", ""))
        renewal = replace(_cert("2", ""), renewed_from="1", operation="renew")
        with pytest.raises(StoreUnavailableError, match="permission denied for table certificates"):
            store.add_certificate(renewal)
    finally:
        store.close()
    no_update = [g.replace("SELECT, INSERT, UPDATE ON state", "SELECT, INSERT ON state")
                 for g in grants]  # fmt: skip
    assert no_update != grants, "docs/ca.md no longer grants UPDATE on state"
    store = open_store(serving_role(postgres, no_update))
    try:
        with pytest.raises(StoreUnavailableError, match="permission denied for table state"):
            store.put_state("peer:kubernetes", b"1")
        assert store.get_state("peer:kubernetes") is None
    finally:
        store.close()
    no_schema = [g for g in grants if "federatls_schema" not in g]
    assert len(no_schema) == len(grants) - 1
    with pytest.raises(ConfigError, match="permission denied for table federatls_schema"):
        open_store(serving_role(postgres, no_schema))
