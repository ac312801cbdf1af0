"""The federatls client code and the federatls CA against the real step-ca 0.19.

Every test here runs the same client code against a federatls CA and against the real
step-ca serving the same PKI (``any_ca``), or runs both side by side. In this module the
'cloud' PKI federates a second, 'kubernetes' PKI, so federation is configured everywhere.

One difference is intended (DESIGN.md §2): step-ca burns a token's ``jti`` before it checks
the signature, so a forged token can burn a genuine one; the federatls CA checks the
signature first. ``test_forged_token_cannot_burn_a_genuine_jti`` pins both behaviours.
Where step-ca changed after 0.19 the federatls CA follows 0.30: those rows expect each CA's
own answer and name the upstream change.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federatls._errors import CARefusedError, CAUnreachableError
from federatls._jwk import ProvisionerKey
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import RekeyRequest, RevokeRequest
from federatls._sslkeys import load_cert_chain_in_memory
from federatls._token import mint_renew_token, renew_audience
from federatls._x509 import cert_sans, certs_to_pem, load_pem_certificates, split_sans
from federatls.ca._config import CAConfig
from federatls.ca._issuer import renew_leaf
from federatls.ca._material import load_material

from harness import PASSWORD, PKI, make_pki, serving, stepca_process

pytestmark = [pytest.mark.anyio, pytest.mark.stepca]

SUBJECT = "svc.cloud.internal"
DAY_AND_BACKDATE = timedelta(hours=24, minutes=1)
NOT_FOUND = {
    "status": 404,
    "message": "The requested resource could not be found. "
    "Please see the certificate authority logs for more info.",
}
UNAUTHORIZED = (
    "The request lacked necessary authorization to be completed. "
    "Please see the certificate authority logs for more info."
)
Identity = tuple[list[x509.Certificate], PrivateKey]


@pytest.fixture
def other(tmp_path: Path) -> PKI:
    """A second, 'kubernetes' PKI (not running unless a test serves it)."""
    return make_pki(tmp_path, "kubernetes")


@pytest.fixture
def pki(tmp_path: Path, other: PKI) -> PKI:
    """The 'cloud' PKI with the kubernetes root in its federatedRoots (set before any start)."""
    cloud = make_pki(tmp_path, "cloud")
    cloud.federate(other)
    return cloud


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _verify(pki: PKI) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pki.root_path.read_text())


def _intermediate(pki: PKI) -> x509.Certificate:
    path = pki.directory / "certs" / "intermediate_ca.crt"
    return load_pem_certificates(path.read_bytes())[0]


async def _renew(pki: PKI, identity: Identity) -> x509.Certificate:
    async with pki.client(identity) as ca:
        return (await ca.renew()).leaf


# Sign, renew, rekey, revoke ----------------------------------------------------------------
async def test_lifecycle_with_revoke_by_token(any_ca: str, pki: PKI) -> None:
    """Sign, renew over mTLS, rekey and revoke by token succeed; then renew is refused (401)."""
    chain, key = await pki.enroll(SUBJECT)
    async with pki.client((chain, key)) as ca:
        renewed = await ca.renew()
    assert renewed.leaf.serial_number != chain[0].serial_number

    new_key = new_private_key()
    async with pki.client((list(renewed.chain), key)) as ca:
        rekeyed = await ca.rekey(RekeyRequest(build_csr(new_key, SUBJECT, [SUBJECT])))
    assert _spki(rekeyed.leaf) != _spki(renewed.leaf)
    assert rekeyed.leaf.public_key() == new_key.public_key()
    assert rekeyed.leaf.subject == renewed.leaf.subject

    serial = str(rekeyed.leaf.serial_number)
    async with pki.client() as ca:
        await ca.revoke(
            RevokeRequest(serial, ott=pki.token(serial, revoke=True), reason_code=4, reason="test")
        )
    with pytest.raises(CARefusedError) as refused:
        await _renew(pki, (list(rekeyed.chain), new_key))
    assert refused.value.status == 401
    # the certificate renewed before the rekey is still good
    assert (await _renew(pki, (list(renewed.chain), key))).subject == renewed.leaf.subject


async def test_revoke_by_mtls(any_ca: str, pki: PKI) -> None:
    """A holder revokes its own certificate over mTLS; afterwards renewing it is refused (401)."""
    identity = await pki.enroll(SUBJECT)
    assert (await _renew(pki, identity)).subject == identity[0][0].subject
    async with pki.client(identity) as ca:
        await ca.revoke(RevokeRequest(str(identity[0][0].serial_number)))
    with pytest.raises(CARefusedError) as refused:
        await _renew(pki, identity)
    assert refused.value.status == 401


async def test_revoke_by_mtls_of_another_serial_is_refused(any_ca: str, pki: PKI) -> None:
    """Over mTLS a holder may revoke only its own serial: another one is refused by both CAs
    (403 on the federatls CA as on step-ca 0.29+, PR #2491; 0.19 said 400)."""
    identity = await pki.enroll(SUBJECT)
    victim, victim_key = await pki.enroll("victim.cloud.internal")
    async with pki.client(identity) as ca:
        with pytest.raises(CARefusedError) as refused:
            await ca.revoke(RevokeRequest(str(victim[0].serial_number)))
    if any_ca == "step-ca":  # differs_in_019: 0.29 made this 403 with the serials quoted
        assert refused.value.status == 400
        assert refused.value.message == (
            "The request could not be completed: "
            "serial number in client certificate different than body."
        )
    else:
        assert refused.value.status == 403
        assert refused.value.message == (
            "The request was forbidden by the certificate authority: request serial number "
            f'"{victim[0].serial_number}" and certificate serial number '
            f'"{identity[0][0].serial_number}" do not match.'
        )
    # the victim was not revoked
    assert (await _renew(pki, (victim, victim_key))).subject == victim[0].subject


async def test_renewal_keeps_identity_and_lifetime(any_ca: str, pki: PKI) -> None:
    """A renewal keeps subject, SANs and key, gets a new serial, starts now-1m, lasts 24h1m."""
    sans = [SUBJECT, "127.0.0.1", "spiffe://cloud/svc"]
    chain, key = await pki.enroll(SUBJECT, sans=sans)
    old = chain[0]
    assert old.not_valid_after_utc - old.not_valid_before_utc == DAY_AND_BACKDATE
    new = await _renew(pki, (chain, key))
    now = datetime.now(UTC)
    assert new.subject == old.subject
    assert cert_sans(new) == cert_sans(old) == split_sans(sans)
    assert _spki(new) == _spki(old)
    assert new.serial_number != old.serial_number
    assert new.not_valid_after_utc - new.not_valid_before_utc == DAY_AND_BACKDATE
    expected_start = (now - timedelta(minutes=1)).timestamp()
    assert new.not_valid_before_utc.timestamp() == pytest.approx(expected_start, abs=5)


async def test_renew_without_client_certificate_is_400(any_ca: str, pki: PKI) -> None:
    """POST /renew with neither a client certificate nor a Bearer token is 400 on both CAs."""
    async with pki.client() as ca:
        with pytest.raises(CARefusedError) as refused:
            await ca.renew()
    assert refused.value.status == 400
    assert refused.value.message == (
        "The request could not be completed: missing client certificate."
    )


async def test_renew_with_bearer_token_works_once(
    any_ca: str, pki: PKI, request: pytest.FixtureRequest
) -> None:
    """An x5cInsecure Bearer token renews without mTLS (201); its replay is refused (401)."""
    chain, key = await pki.enroll(SUBJECT)
    token = mint_renew_token(chain, key, audience=renew_audience(pki.url), now=datetime.now(UTC))
    async with pki.client() as ca:
        renewed = await ca.renew_with_token(token)
        with pytest.raises(CARefusedError) as replay:
            await ca.renew_with_token(token)
    assert replay.value.status == 401
    assert renewed.leaf.subject == chain[0].subject
    assert renewed.leaf.serial_number != chain[0].serial_number
    assert _spki(renewed.leaf) == _spki(chain[0])


# Roots and federation ----------------------------------------------------------------------
def _ders(pems: list[str]) -> set[bytes]:
    return {_der(c) for pem in pems for c in load_pem_certificates(pem)}


async def _bundles(url: str, pki: PKI) -> dict[str, tuple[object, ...]]:
    """Status (and content type) and certificate set of /roots, /federation, /roots.pem."""
    out: dict[str, tuple[object, ...]] = {}
    async with httpx.AsyncClient(verify=_verify(pki)) as http:
        for path in ("/roots", "/federation", "/1.0/federation"):
            r = await http.get(url + path)
            out[path] = (r.status_code, _ders(r.json()["crts"]))
        r = await http.get(url + "/roots.pem")
        content_type = r.headers["content-type"]  # step-ca: exactly application/x-pem-file
        out["/roots.pem"] = (r.status_code, content_type, _ders([r.text]))
    return out


async def test_roots_and_federation_same_sets_side_by_side(
    pki: PKI, other: PKI, stepca_bin: str
) -> None:
    """Run at once on the same ca.json, both CAs answer /roots, /federation, /roots.pem alike."""
    async with serving(pki) as server:
        federatls = await _bundles(server.url, pki)
        with stepca_process(stepca_bin, pki):
            stepca = await _bundles(pki.url, pki)
    own, both = {_der(pki.root)}, {_der(pki.root), _der(other.root)}
    assert federatls == stepca
    assert stepca == {
        "/roots": (201, own),
        "/federation": (201, both),
        "/1.0/federation": (201, both),
        "/roots.pem": (200, "application/x-pem-file", own),
    }


async def test_unfederated_ca_answers_only_its_own_root(other: PKI, stepca_bin: str) -> None:
    """Twin of the federation test: kubernetes federates nobody, so on both CAs its
    /federation is just its own root, like /roots."""
    own = {_der(other.root)}
    async with serving(other):
        federatls = await _bundles(other.url, other)
    with stepca_process(stepca_bin, other):
        stepca = await _bundles(other.url, other)
    assert federatls == stepca
    assert stepca["/federation"] == (201, own)
    assert stepca["/roots"] == (201, own)


async def test_root_by_fingerprint(any_ca: str, pki: PKI, other: PKI) -> None:
    """/root/{sha} resolves own and federated roots (any case, dashes ignored); unknown is 404."""
    async with httpx.AsyncClient(verify=_verify(pki)) as http:
        for root, sha in [
            (pki.root, pki.fingerprint),
            (other.root, other.fingerprint),
            (other.root, other.fingerprint.upper()),
            (pki.root, "-".join([pki.fingerprint[:32], pki.fingerprint[32:]])),
        ]:
            r = await http.get(f"{pki.url}/root/{sha}")
            assert r.status_code == 200, sha
            assert load_pem_certificates(r.json()["ca"]) == [root]
        unknown = hashlib.sha256(b"no such root").hexdigest()
        # Differs in 0.19: step-ca 0.30 (PR #1893) names the fingerprint in the 404 body, and
        # the federatls CA follows 0.30; 0.19's body is the generic one.
        missing = NOT_FOUND
        if any_ca == "federatls":
            message = f'root certificate with fingerprint "{unknown}" was not found'
            missing = {"status": 404, "message": message}
        r = await http.get(f"{pki.url}/root/{unknown}")
        assert (r.status_code, r.json()) == (404, missing)
        r = await http.get(f"{pki.url}/1.0/root/{unknown}")
        assert (r.status_code, r.json()) == (404, missing)


# The CA's own TLS --------------------------------------------------------------------------
def _presented_chain(url: str, pki: PKI, server_hostname: str) -> list[x509.Certificate]:
    """The certificate chain the CA presents in a TLS handshake (verified against pki.root)."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    assert host is not None
    assert port is not None
    ctx = _verify(pki)
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        # SSLSocket.get_unverified_chain is public from 3.13; 3.11/3.12 have it on _sslobj.
        sslobj: Any = getattr(tls, "_sslobj", tls)
        pems: list[str] = [c.public_bytes() for c in sslobj.get_unverified_chain()]
    return [load_pem_certificates(p)[0] for p in pems]


async def test_server_certificate_chain_and_names(any_ca: str, pki: PKI) -> None:
    """The CA presents leaf + intermediate; the leaf's SANs are ca.json's dnsNames."""
    for name in ("localhost", "127.0.0.1"):
        chain = await anyio.to_thread.run_sync(_presented_chain, pki.url, pki, name)
        assert len(chain) == 2
        assert chain[1] == _intermediate(pki)
        leaf = chain[0]
        assert cert_sans(leaf) == split_sans(["127.0.0.1", "localhost"])
        assert leaf.issuer == chain[1].subject


async def test_server_certificate_refused_for_other_names(any_ca: str, pki: PKI) -> None:
    """Twin: the CA's certificate does not verify for a name outside dnsNames."""
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await anyio.to_thread.run_sync(_presented_chain, pki.url, pki, "other.example")


async def test_mtls_trusts_only_own_roots(
    any_ca: str, pki: PKI, other: PKI, request: pytest.FixtureRequest
) -> None:
    """The CA's own certificate renews over mTLS, but a client certificate from the federated
    kubernetes CA is refused at TLS level (CAUnreachableError) on /renew."""
    own = await pki.enroll(SUBJECT)
    assert (await _renew(pki, own)).subject == own[0][0].subject
    async with serving(other):
        foreign = await other.enroll("svc.k8s.internal")
    # Plain httpx first: the refusal happens in TLS, whatever the client makes of it.
    ctx = _verify(pki)
    load_cert_chain_in_memory(ctx, foreign[0], foreign[1])
    async with httpx.AsyncClient(verify=ctx) as http:
        with pytest.raises((httpx.TransportError, ssl.SSLError)):
            await http.post(pki.url + "/renew")
    with pytest.raises(CAUnreachableError, match="TLS"):
        await _renew(pki, foreign)


# The intended difference -------------------------------------------------------------------
GENUINE_AFTER_FORGERY = {"federatls": 201, "step-ca": 401}


async def test_forged_token_cannot_burn_a_genuine_jti(any_ca: str, pki: PKI) -> None:
    """A forged token (other key, right kid) with jti X is 401 on both; then the genuine token
    with jti X is accepted by federatls (signature checked before the jti is burnt) but
    refused by step-ca (jti burnt first): the one intended difference."""
    jti = secrets.token_hex(32)
    claims = pki.claims(SUBJECT, jti=jti)
    forged = pki.forge(claims, key=ProvisionerKey.generate())
    genuine = pki.forge(claims)

    def body(token: str) -> dict[str, str]:
        csr = build_csr(new_private_key(), SUBJECT, [SUBJECT])
        return {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "ott": token}

    async with httpx.AsyncClient(verify=_verify(pki)) as http:
        first = await http.post(pki.url + "/1.0/sign", json=body(forged))
        second = await http.post(pki.url + "/1.0/sign", json=body(genuine))
        third = await http.post(pki.url + "/1.0/sign", json=body(genuine))
    assert first.status_code == 401
    assert second.status_code == GENUINE_AFTER_FORGERY[any_ca], second.text
    assert third.status_code == 401  # and once used, the genuine token is spent on both


# What changed after 0.19 (the federatls CA follows step-ca 0.30) -----------------------------
INTERMEDIATES_019 = {"federatls": 201, "step-ca": 404}  # 0.27.3, PR #1962


async def test_intermediates_only_on_the_newer_wire(any_ca: str, pki: PKI) -> None:
    """GET /intermediates: the federatls CA answers 201 with the intermediate (step-ca 0.27.3
    and later); step-ca 0.19 has no such route (404), which the SDK reads as absent."""
    async with httpx.AsyncClient(verify=_verify(pki)) as http:
        r = await http.get(f"{pki.url}/1.0/intermediates")
    assert r.status_code == INTERMEDIATES_019[any_ca]
    if any_ca == "federatls":  # 0.19's 404 is its router's plain text, not JSON
        assert load_pem_certificates("".join(r.json()["crts"])) == [_intermediate(pki)]


async def test_request_id_echoed_only_on_the_newer_wire(any_ca: str, pki: PKI) -> None:
    """X-Request-Id: the federatls CA echoes a client's (step-ca 0.26 and later, PR #1743);
    step-ca 0.19 answers without one, so a client cannot count on it."""
    async with httpx.AsyncClient(verify=_verify(pki)) as http:
        r = await http.get(f"{pki.url}/health", headers={"X-Request-Id": "interop-1"})
    assert r.status_code == 200
    echoed = "interop-1" if any_ca == "federatls" else None
    assert r.headers.get("x-request-id") == echoed


def _expired_twin(pki: PKI, leaf: x509.Certificate) -> x509.Certificate:
    """``leaf`` again (same key, names and provisioner extension), signed by the PKI's
    intermediate to have ended a minute ago: neither CA signs one itself. (step-ca checks
    the x5cInsecure chain as of a minute before the leaf's end: the PKI began before.)"""
    material = load_material(CAConfig.load(pki.config), PASSWORD)
    lived = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    then = datetime.now(UTC) - lived - timedelta(minutes=1)
    return renew_leaf(material, leaf, now=then, backdate=timedelta(0))


@pytest.mark.parametrize("allowed", [False, True], ids=["not-allowed", "allowed"])
@pytest.mark.parametrize("backend", ["federatls", "step-ca"])
async def test_expired_certificate_renews_by_bearer_only_when_allowed(
    backend: str, allowed: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A certificate that expired an hour ago renews by a Bearer x5cInsecure token when the
    provisioner has allowRenewalAfterExpiry (201 on both CAs), else 401. The 401's body
    differs in 0.19: step-ca 0.20 (PR #940) says "certificate expired on <notAfter>" in it,
    which the federatls CA follows; 0.19's is the generic 401 text."""
    pki = make_pki(tmp_path, "older", now=datetime.now(UTC) - timedelta(days=2))
    if allowed:
        pki.set_claims(allowRenewalAfterExpiry=True)
    async with contextlib.AsyncExitStack() as stack:
        if backend == "federatls":
            await stack.enter_async_context(serving(pki))
        else:
            stack.enter_context(stepca_process(request.getfixturevalue("stepca_bin"), pki))
        chain, key = await pki.enroll(SUBJECT)
        expired = _expired_twin(pki, chain[0])
        assert expired.not_valid_after_utc < datetime.now(UTC)
        old = [expired, *chain[1:]]
        token = mint_renew_token(old, key, audience=renew_audience(pki.url), now=datetime.now(UTC))
        async with pki.client() as ca:
            if allowed:
                renewed = (await ca.renew_with_token(token)).leaf
            else:
                with pytest.raises(CARefusedError) as refused:
                    await ca.renew_with_token(token)
    if allowed:
        assert renewed.subject == expired.subject
        assert renewed.not_valid_after_utc > datetime.now(UTC)
        return
    assert refused.value.status == 401
    if backend == "federatls":
        when = expired.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
        assert refused.value.message == (
            "The request lacked necessary authorization to be completed: "
            f"certificate expired on {when}"
        )
    else:
        assert refused.value.message == UNAUTHORIZED


@pytest.mark.parametrize("backend", ["federatls", "step-ca"])
async def test_root_bundle_file(
    backend: str, pki: PKI, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A `root` file holding two PEM certificates: the federatls CA serves both (step-ca 0.23,
    PR #1169, reads bundles); step-ca 0.19 refuses to start ("contains more than one PEM
    encoded block"). Twin of the several-files case, which both CAs serve."""
    nxt = make_pki(tmp_path, "next")
    bundle = tmp_path / "roots.pem"
    bundle.write_text(certs_to_pem([pki.root, nxt.root]))
    pki.edit(lambda d: d.__setitem__("root", str(bundle)))
    if backend == "step-ca":
        with (
            pytest.raises(RuntimeError, match="contains more than one PEM encoded block"),
            stepca_process(request.getfixturevalue("stepca_bin"), pki),
        ):
            pass
        return
    async with serving(pki), httpx.AsyncClient(verify=_verify(pki)) as http:
        roots = await http.get(f"{pki.url}/roots")
    assert _ders(roots.json()["crts"]) == {_der(pki.root), _der(nxt.root)}
