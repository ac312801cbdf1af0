"""The federatls CA over time: renewal rules, rekey, revocation, restarts and concurrency.

A fake clock drives the CA's notion of time (the TLS layer keeps real time), so expiry and
renewal rules are tested without waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federatls import CARefusedError, CAUnreachableError
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import RekeyRequest, RevokeRequest, SignRequest
from federatls.ca import CAServer
from federatls.ca._store import SQLiteStore

from harness import PKI, FakeClock, make_pki, serving, wait_until

pytestmark = pytest.mark.anyio


def _pub(cert_or_key: x509.Certificate | PrivateKey) -> bytes:
    key = cert_or_key.public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def _renew(
    pki: PKI, chain: Sequence[x509.Certificate], key: PrivateKey
) -> list[x509.Certificate]:
    async with pki.client(identity=(chain, key)) as ca:
        return list((await ca.renew()).chain)


async def test_renew_keeps_identity_and_lifetime(ca: CAServer, pki: PKI) -> None:
    """A renewal keeps subject, SANs and key, gets a new serial and the same 24h1m span."""
    chain, key = await pki.enroll("svc.cloud.internal", sans=["svc.cloud.internal", "10.0.0.7"])
    renewed = await _renew(pki, chain, key)
    old, new = chain[0], renewed[0]
    assert new.serial_number != old.serial_number
    assert new.subject == old.subject
    assert (
        new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        == old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    assert _pub(new) == _pub(key)
    assert new.not_valid_after_utc - new.not_valid_before_utc == timedelta(hours=24, minutes=1)
    stored = ca.authority.store.get_certificate(str(new.serial_number))
    assert stored is not None
    assert stored.renewed_from == str(old.serial_number)


async def test_renew_refused_without_client_certificate(ca: CAServer, pki: PKI) -> None:
    """Twin: /renew with no client certificate is a 400, as in step-ca."""
    async with pki.client() as client:
        with pytest.raises(CARefusedError) as info:
            await client.renew()
    assert info.value.status == 400
    assert info.value.message == ("The request could not be completed: missing client certificate.")


async def test_expired_certificate_cannot_renew(ca: CAServer, pki: PKI, clock: FakeClock) -> None:
    """Past notAfter (CA clock), renewal is refused with 401 unless the provisioner allows it."""
    chain, key = await pki.enroll("svc")
    clock.advance(25 * 3600)
    with pytest.raises(CARefusedError) as info:
        await _renew(pki, chain, key)
    assert info.value.status == 401


async def test_renewal_after_expiry_when_allowed(pki: PKI, clock: FakeClock) -> None:
    """Twin: with allowRenewalAfterExpiry the same expired certificate renews."""
    pki.set_claims(allowRenewalAfterExpiry=True)
    async with serving(pki, clock):
        chain, key = await pki.enroll("svc")
        clock.advance(25 * 3600)
        renewed = await _renew(pki, chain, key)
    assert renewed[0].serial_number != chain[0].serial_number


async def test_disabled_renewal_is_refused(pki: PKI, clock: FakeClock) -> None:
    """With disableRenewal a valid certificate cannot renew (401)."""
    pki.set_claims(disableRenewal=True)
    async with serving(pki, clock):
        chain, key = await pki.enroll("svc")
        with pytest.raises(CARefusedError) as info:
            await _renew(pki, chain, key)
    assert info.value.status == 401


async def test_foreign_client_certificate_fails_tls(
    ca: CAServer, pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate from another CA, even a federated one, cannot authenticate to this CA;
    the CA logs the refused handshake with its reason."""
    other = make_pki(tmp_path, "kubernetes")
    async with serving(other):
        chain, key = await other.enroll("intruder")
    caplog.set_level(logging.INFO, "federatls.ca")
    with pytest.raises(CAUnreachableError) as info:
        await _renew(pki, chain, key)
    assert "TLS failure" in str(info.value)
    await wait_until(lambda: "refused TLS connection from 127.0.0.1" in caplog.text)
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


async def test_rekey_changes_the_key_only(ca: CAServer, pki: PKI) -> None:
    """/rekey issues the same identity for a new public key (and a new SKI)."""
    chain, key = await pki.enroll("svc")
    fresh = new_private_key()
    async with pki.client(identity=(chain, key)) as client:
        answer = await client.rekey(RekeyRequest(build_csr(fresh, "svc", ["svc"])))
    new = answer.leaf
    assert _pub(new) == _pub(fresh)
    assert new.subject == chain[0].subject
    ski_new = new.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    ski_old = chain[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski_new != ski_old


async def test_rekey_refuses_weak_key(ca: CAServer, pki: PKI) -> None:
    """Twin: a rekey to a 1024-bit RSA key is refused with 403."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    chain, key = await pki.enroll("svc")
    weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 (the point of the test)
    async with pki.client(identity=(chain, key)) as client:
        with pytest.raises(CARefusedError) as info:
            await client.rekey(RekeyRequest(build_csr(weak, "svc", ["svc"])))
    assert info.value.status == 403
    assert "at least 2048 bits" in info.value.message


async def test_revoke_by_token_stops_renewal(ca: CAServer, pki: PKI) -> None:
    """A certificate revoked by token cannot renew any more (401)."""
    chain, key = await pki.enroll("svc")
    serial = str(chain[0].serial_number)
    async with pki.client() as client:
        await client.revoke(RevokeRequest(serial, ott=pki.token(serial, revoke=True)))
    assert ca.authority.store.is_revoked(serial)
    with pytest.raises(CARefusedError) as info:
        await _renew(pki, chain, key)
    assert info.value.status == 401


async def test_revoke_token_must_name_the_serial(ca: CAServer, pki: PKI) -> None:
    """A revoke token for one serial cannot revoke another (403, as step-ca 0.29), and is not
    spent by trying. Twin: the same token revokes its own serial afterwards."""
    chain, _ = await pki.enroll("svc")
    other, _ = await pki.enroll("other")
    serial, other_serial = str(chain[0].serial_number), str(other[0].serial_number)
    token = pki.token(other_serial, revoke=True)
    async with pki.client() as client:
        with pytest.raises(CARefusedError) as info:
            await client.revoke(RevokeRequest(serial, ott=token))
        assert info.value.status == 403
        assert info.value.message == (
            "The request was forbidden by the certificate authority: request serial number "
            f'"{serial}" and token subject "{other_serial}" do not match.'
        )
        assert not ca.authority.store.is_revoked(serial)
        await client.revoke(RevokeRequest(other_serial, ott=token))
    assert ca.authority.store.is_revoked(other_serial)


async def test_sign_token_cannot_revoke(ca: CAServer, pki: PKI) -> None:
    """A token minted for /sign has the wrong audience for /revoke (401)."""
    chain, _ = await pki.enroll("svc")
    serial = str(chain[0].serial_number)
    async with pki.client() as client:
        with pytest.raises(CARefusedError) as info:
            await client.revoke(RevokeRequest(serial, ott=pki.token(serial)))
    assert info.value.status == 401


async def test_revoke_over_mtls_and_twice(ca: CAServer, pki: PKI) -> None:
    """A holder revokes its own certificate over mTLS; revoking again is a 400."""
    chain, key = await pki.enroll("svc")
    serial = str(chain[0].serial_number)
    async with pki.client(identity=(chain, key)) as client:
        await client.revoke(RevokeRequest(serial, reason_code=1, reason="key compromise"))
        with pytest.raises(CARefusedError) as info:
            await client.revoke(RevokeRequest(serial))
    assert info.value.status == 400
    assert f"serial number '{serial}' is already revoked" in info.value.message


async def test_mtls_revoke_of_another_serial_is_refused(ca: CAServer, pki: PKI) -> None:
    """Over mTLS a holder can revoke only the certificate it presents (403, as step-ca
    0.29; 0.19 said 400). Twin: test_revoke_over_mtls_and_twice revokes its own."""
    chain, key = await pki.enroll("svc")
    other, _ = await pki.enroll("other")
    async with pki.client(identity=(chain, key)) as client:
        with pytest.raises(CARefusedError) as info:
            await client.revoke(RevokeRequest(str(other[0].serial_number)))
    assert info.value.status == 403
    assert "and certificate serial number" in info.value.message
    assert not ca.authority.store.is_revoked(str(other[0].serial_number))


async def test_unknown_serial_cannot_be_revoked(ca: CAServer, pki: PKI) -> None:
    """A serial this CA never issued is refused (403) instead of being recorded."""
    async with pki.client() as client:
        with pytest.raises(CARefusedError) as info:
            await client.revoke(RevokeRequest("12345", ott=pki.token("12345", revoke=True)))
    assert info.value.status == 403
    assert ca.authority.store.counts()["revocations"] == 0


async def test_non_passive_revocation_is_not_implemented(ca: CAServer, pki: PKI) -> None:
    """passive=false is step-ca's 501."""
    chain, key = await pki.enroll("svc")
    async with pki.client(identity=(chain, key)) as client:
        with pytest.raises(CARefusedError) as info:
            await client.revoke(RevokeRequest(str(chain[0].serial_number), passive=False))
    assert info.value.status == 501


async def test_state_survives_a_restart(pki: PKI) -> None:
    """Used tokens and revocations are remembered across a restart of the CA."""
    pki.edit(lambda d: d["authority"].__setitem__("disableIssuedAtCheck", True))
    async with serving(pki):
        used = pki.token("svc")
        fresh = pki.token("svc")
        key = new_private_key()
        async with pki.client() as client:
            answer = await client.sign(SignRequest(build_csr(key, "svc", ["svc"]), used))
            serial = str(answer.leaf.serial_number)
            await client.revoke(RevokeRequest(serial, ott=pki.token(serial, revoke=True)))
    async with serving(pki) as restarted:
        async with pki.client() as client:
            with pytest.raises(CARefusedError) as replay:
                await client.sign(SignRequest(build_csr(key, "svc", ["svc"]), used))
            # the twin: a token never used before the restart is accepted after it
            ok = await client.sign(SignRequest(build_csr(key, "svc", ["svc"]), fresh))
        assert restarted.authority.store.is_revoked(serial)
        with pytest.raises(CARefusedError) as revoked:
            await _renew(pki, list(answer.chain), key)
    assert replay.value.status == 401
    assert ok.leaf.subject == answer.leaf.subject
    assert revoked.value.status == 401


async def test_tokens_from_before_a_restart_are_refused_by_iat(pki: PKI) -> None:
    """By default (as step-ca) a token minted before the CA started is refused."""
    early = pki.token("svc")
    await asyncio.sleep(1.1)  # the CA's start time is compared to the second
    async with serving(pki), pki.client() as client:
        with pytest.raises(CARefusedError) as info:
            await client.sign(SignRequest(build_csr(new_private_key(), "svc", ["svc"]), early))
    assert info.value.status == 401


async def test_concurrent_signs_all_recorded(ca: CAServer, pki: PKI) -> None:
    """Fifty concurrent sign requests all succeed and are all recorded once."""
    results = await asyncio.gather(*(pki.enroll(f"svc-{i}") for i in range(50)))
    serials = {chain[0].serial_number for chain, _ in results}
    assert len(serials) == 50
    counts = ca.authority.store.counts()
    assert counts["certificates"] == 50
    assert counts["used_tokens"] == 50


async def test_one_token_sent_concurrently_is_used_once(ca: CAServer, pki: PKI) -> None:
    """The same token sent twenty times at once is honoured exactly once."""
    token = pki.token("svc")

    async def attempt() -> int:
        request = SignRequest(build_csr(new_private_key(), "svc", ["svc"]), token)
        async with pki.client() as client:
            try:
                await client.sign(request)
            except CARefusedError as exc:
                return exc.status
        return 201

    statuses = await asyncio.gather(*(attempt() for _ in range(20)))
    assert sorted(statuses) == [201] + [401] * 19
    assert ca.authority.store.counts()["certificates"] == 1


async def test_store_rejects_a_foreign_file(tmp_path: Path) -> None:
    """A database file that is not SQLite is a clear ConfigError, not a crash."""
    from federatls import ConfigError

    bad = tmp_path / "federatls.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError):
        SQLiteStore(bad)
