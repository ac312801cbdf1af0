"""The audit trail of the CA's certificates table: what each certificate was issued for (the
token it spent, or the certificate it replaces), and databases written before the trail."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey
from joserfc.registry import HeaderParameter

from federatls._errors import ConfigError
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import RekeyRequest, RevokeRequest, SignRequest
from federatls._token import Token, mint_renew_token
from federatls.ca import CAServer, IssuedCertificate, SQLiteStore

from harness import PKI, serving

pytestmark = pytest.mark.anyio

# The schema federatls wrote before the audit trail (schema version 1), as it was.
_V1_SCHEMA = """
CREATE TABLE used_tokens (
    token_id    TEXT PRIMARY KEY,
    provisioner TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    used_at     TEXT NOT NULL
);
CREATE TABLE certificates (
    serial       TEXT PRIMARY KEY,
    subject      TEXT NOT NULL,
    sans         TEXT NOT NULL,
    not_before   TEXT NOT NULL,
    not_after    TEXT NOT NULL,
    provisioner  TEXT NOT NULL,
    renewed_from TEXT,
    der          BLOB NOT NULL
);
CREATE TABLE revocations (
    serial      TEXT PRIMARY KEY,
    reason_code INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    provisioner TEXT NOT NULL,
    token_id    TEXT NOT NULL,
    mtls        INTEGER NOT NULL,
    revoked_at  TEXT NOT NULL
);
PRAGMA journal_mode=WAL;
PRAGMA user_version=1;
INSERT INTO used_tokens VALUES ('old-jti', 'p:k', '2026-01-01T00:05:00+00:00',
    '2026-01-01T00:00:00+00:00');
INSERT INTO certificates VALUES ('12345', 'old', '["old"]', '2026-01-01T00:00:00+00:00',
    '2026-01-02T00:00:00+00:00', 'p:k', NULL, x'3082');
INSERT INTO revocations VALUES ('12345', 1, 'key compromise', 'p:k', 'old-rev', 0,
    '2026-01-01T01:00:00+00:00');
"""


def _old_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_V1_SCHEMA)
    finally:
        conn.close()


def _record(ca: CAServer, serial: int) -> IssuedCertificate:
    record = ca.authority.store.get_certificate(str(serial))
    assert record is not None
    return record


def _spent(ca: CAServer) -> set[str]:
    store = ca.authority.store
    assert isinstance(store, SQLiteStore)
    return {r[0] for r in store._conn.execute("SELECT token_id FROM used_tokens")}


async def test_sign_records_its_token_and_provisioner(ca: CAServer, pki: PKI) -> None:
    """A signed certificate's record names the token it spent (its ``jti``) and the
    provisioner that signed that token."""
    claims = pki.claims("svc")
    async with pki.client() as client:
        answer = await client.sign(
            SignRequest(build_csr(new_private_key(), "svc", ["svc"]), pki.forge(claims))
        )
    record = _record(ca, answer.leaf.serial_number)
    assert (record.operation, record.token_id, record.renewed_from) == ("sign", claims["jti"], None)
    assert record.provisioner == f"{pki.provisioner}:{pki.key.kid}"


async def test_sign_without_jti_records_the_key_it_spent(ca: CAServer, pki: PKI) -> None:
    """Twin: a token without ``jti`` is recorded under the replay key the CA spent for it,
    a different one for each of two such tokens (they differ in their subject: two tokens
    with the same claims are one token, docs/security.md)."""
    serials = []
    for name in ("svc-a", "svc-b"):
        token = pki.forge(pki.claims(name, jti=None))
        async with pki.client() as client:
            answer = await client.sign(
                SignRequest(build_csr(new_private_key(), name, [name]), token)
            )
        serials.append(answer.leaf.serial_number)
    ids = [_record(ca, s).token_id for s in serials]
    assert "" not in ids
    assert ids[0] != ids[1]
    assert set(ids) <= _spent(ca)


async def test_renew_and_rekey_record_their_parent(ca: CAServer, pki: PKI) -> None:
    """A renewal and a rekey name the certificate they replace and the provisioner of the
    first certificate; neither spends a token, so none is named."""
    chain, key = await pki.enroll("svc")
    async with pki.client((chain, key)) as holder:
        renewed = await holder.renew()
    new_key = new_private_key()
    async with pki.client((list(renewed.chain), key)) as holder:
        rekeyed = await holder.rekey(RekeyRequest(build_csr(new_key, "svc", ["svc"])))
    first = _record(ca, chain[0].serial_number)
    renewal = _record(ca, renewed.leaf.serial_number)
    rekey = _record(ca, rekeyed.leaf.serial_number)
    assert (renewal.operation, renewal.renewed_from, renewal.token_id) == (
        "renew",
        first.serial,
        "",
    )
    assert (rekey.operation, rekey.renewed_from, rekey.token_id) == (
        "rekey",
        renewal.serial,
        "",
    )
    assert renewal.provisioner == rekey.provisioner == first.provisioner != ""


def test_an_old_database_is_migrated_in_place(tmp_path: Path) -> None:
    """A database written before the audit trail opens, keeps every row (its certificates
    with an empty trail) and records new certificates with theirs; reopened, it stays."""
    path = tmp_path / "federatls.db"
    _old_database(path)
    store = SQLiteStore(path)
    try:
        old = store.get_certificate("12345")
        assert old is not None
        assert (old.subject, old.sans, old.der, old.operation, old.token_id) == (
            "old",
            ("old",),
            b"\x30\x82",
            "",
            "",
        )
        assert store.token_used("old-jti")
        assert store.is_revoked("12345")
        assert store.counts() == {"used_tokens": 1, "certificates": 1, "revocations": 1}
        store.add_certificate(
            IssuedCertificate(
                "678", "new", ("new",), old.not_before, old.not_after, "p:k", b"\x30",
                renewed_from="999", operation="renew",  # 12345 is revoked: not renewable
            )
        )  # fmt: skip
    finally:
        store.close()
    reopened = SQLiteStore(path)
    try:
        new = reopened.get_certificate("678")
        assert new is not None
        assert (new.operation, new.renewed_from) == ("renew", "999")
        assert reopened._conn.execute("PRAGMA user_version").fetchone()[0] == 4
    finally:
        reopened.close()


def _purge_plan(conn: sqlite3.Connection) -> str:
    rows = conn.execute(
        "EXPLAIN QUERY PLAN SELECT token_id FROM used_tokens WHERE expires_at < ?"
        " ORDER BY expires_at LIMIT 1000",
        ("2026-01-02T00:00:00+00:00",),
    ).fetchall()
    return " ".join(row[-1] for row in rows)


def test_an_old_database_gains_the_purge_index(tmp_path: Path) -> None:
    """Opening a database of schema version 1 adds the index on the tokens' expiry (version
    3), which the purge's query then uses, and purges through it. Twin: before, the same
    query scans the table."""
    path = tmp_path / "federatls.db"
    _old_database(path)
    with sqlite3.connect(path) as conn:
        assert "used_tokens_expires_at" not in _purge_plan(conn)
    store = SQLiteStore(path)
    try:
        assert store.opened_version == 1
        assert "USING INDEX used_tokens_expires_at" in _purge_plan(store._conn)
        assert store.purge_expired(datetime(2026, 1, 3, tzinfo=UTC)) == 1
        assert not store.token_used("old-jti")
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    """Twin: a database from a newer federatls (a higher schema version) is refused with a
    ``ConfigError`` naming the version, and left as it was."""
    path = tmp_path / "federatls.db"
    _old_database(path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=5")
    with pytest.raises(ConfigError, match="schema version 5"):
        SQLiteStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
        columns = {r[1] for r in conn.execute("PRAGMA table_info(certificates)")}
    assert "token_id" not in columns


async def test_a_ca_serves_from_an_old_database(pki: PKI) -> None:
    """A CA started on a database written before the audit trail keeps its old records and
    signs, recording the new certificate's trail."""
    _old_database(pki.config.parent / "federatls.db")
    async with serving(pki) as ca:
        claims = pki.claims("svc")
        async with pki.client() as client:
            answer = await client.sign(
                SignRequest(build_csr(new_private_key(), "svc", ["svc"]), pki.forge(claims))
            )
        assert _record(ca, answer.leaf.serial_number).token_id == claims["jti"]
        assert _record(ca, 12345).subject == "old"
        assert ca.authority.store.is_revoked("12345")


async def test_renew_by_token_records_the_token_it_spent(ca: CAServer, pki: PKI) -> None:
    """A renewal bought with a ``Bearer`` renew token names that token (its ``jti``, or the
    replay key spent for it) beside the certificate it replaces."""
    chain, key = await pki.enroll("svc")
    for drop_jti in (False, True):
        token = mint_renew_token(chain, key, audience=f"{pki.url}/1.0/renew", now=pki.clock())
        if drop_jti:
            token = _without_jti(token, key)
        async with pki.client() as client:
            renewed = await client.renew_with_token(token)
        record = _record(ca, renewed.leaf.serial_number)
        spent = Token.parse(token).token_id or Token.parse(token).digest
        assert (record.operation, record.renewed_from) == ("renew", str(chain[0].serial_number))
        assert record.token_id == spent != ""
        assert spent in _spent(ca)


def _without_jti(token: str, key: PrivateKey) -> str:
    """The same renew token re-signed with its ``jti`` removed."""
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    parsed = Token.parse(token)
    claims = {k: v for k, v in parsed.claims.items() if k != "jti"}
    registry = jws.JWSRegistry(header_registry={"x5cInsecure": HeaderParameter("x5c", "list[str]")})
    registry.max_header_length = 8 * 1024
    return jws.serialize_compact(
        dict(parsed.header), json.dumps(claims), ECKey.import_key(key), registry=registry
    )


async def test_revoke_by_token_records_the_token_it_spent(ca: CAServer, pki: PKI) -> None:
    """A revocation by a token without ``jti`` names the replay key it spent, not an empty
    id; with a ``jti`` it names the ``jti`` (twin)."""
    for jti in (None, "revoke-jti"):
        chain, _ = await pki.enroll("svc")
        serial = str(chain[0].serial_number)
        token = pki.forge(pki.claims(serial, jti=jti, aud=f"{pki.url}/1.0/revoke", sans=None))
        async with pki.client() as client:
            await client.revoke(RevokeRequest(serial, ott=token))
        store = ca.authority.store
        assert isinstance(store, SQLiteStore)
        row = store._conn.execute(
            "SELECT token_id FROM revocations WHERE serial = ?", (serial,)
        ).fetchone()
        spent = jti or Token.parse(token).digest
        assert row == (spent,)
        assert spent in _spent(ca)
