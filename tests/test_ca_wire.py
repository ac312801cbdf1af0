"""The federatls CA on today's step-ca wire (0.20 to 0.30; docs/protocol.md): X-Request-Id,
/intermediates, the /root/{sha} 404 body, the expired-renewal 401, renewal after expiry by a
Bearer token, and root bundles in ca.json. Each against a real CA on 127.0.0.1, with its twin.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from federatls import CARefusedError, CAUnreachableError
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import SignRequest
from federatls._token import mint_renew_token, renew_audience
from federatls._x509 import certs_to_pem, fingerprint, load_pem_certificates
from federatls.ca import CAServer

from harness import PKI, FakeClock, make_pki, serving

pytestmark = pytest.mark.anyio

EXPIRED_PREFIX = (
    "The request lacked necessary authorization to be completed: certificate expired on "
)


def _http(pki: PKI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=pki.url,
        verify=ssl.create_default_context(cadata=pki.root_path.read_text()),
        timeout=30,
    )


def _intermediate(pki: PKI) -> x509.Certificate:
    return load_pem_certificates((pki.directory / "certs" / "intermediate_ca.crt").read_bytes())[0]


def _is_fresh_uuid(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _go_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


# X-Request-Id ----------------------------------------------------------------------------------
async def test_client_request_id_is_echoed_and_logged(
    ca: CAServer, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's X-Request-Id comes back on a success and on a refusal, and the CA's log
    line for the request names it."""
    caplog.set_level(logging.INFO, "federatls.ca")
    rid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    async with _http(pki) as http:
        ok = await http.get("/roots", headers={"X-Request-Id": rid})
        refused = await http.get("/1.0/root/abc", headers={"X-Request-Id": "trace.42:b"})
    assert (ok.status_code, ok.headers["x-request-id"]) == (201, rid)
    assert (refused.status_code, refused.headers["x-request-id"]) == (404, "trace.42:b")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(lines) == 1, lines
    assert "(request trace.42:b): 404" in lines[0]


async def test_signed_log_line_names_the_request_id(
    ca: CAServer, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """Twin of the refusal: a sign's "signed" line names the id its client sent."""
    caplog.set_level(logging.INFO, "federatls.ca")
    key = new_private_key()
    body = {
        "csr": build_csr(key, "svc", ["svc"]).public_bytes(Encoding.PEM).decode(),
        "ott": pki.token("svc", sans=["svc"]),
    }
    async with _http(pki) as http:
        answer = await http.post("/1.0/sign", json=body, headers={"X-Request-Id": "sign-1"})
    assert (answer.status_code, answer.headers["x-request-id"]) == (201, "sign-1")
    signed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("signed")]
    assert len(signed) == 1, signed
    assert "(request sign-1)" in signed[0]


async def test_absent_request_id_is_generated(ca: CAServer, pki: PKI) -> None:
    """Without X-Request-Id each answer (a 404 for an unknown path too) carries a fresh
    UUIDv4; X-Smallstep-Id, step-ca's older header, is echoed when X-Request-Id is absent."""
    async with _http(pki) as http:
        first = await http.get("/health")
        second = await http.get("/nothing/here")
        legacy = await http.get("/health", headers={"X-Smallstep-Id": "legacy-7"})
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(_is_fresh_uuid(i) for i in ids), ids
    assert ids[0] != ids[1]
    assert second.status_code == 404
    assert legacy.headers["x-request-id"] == "legacy-7"


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("a" * 60_000, id="60k-long"),
        pytest.param("a" * 129, id="one-past-128"),
        pytest.param("abc\tdef", id="tab"),
        pytest.param("abc def", id="space"),
        pytest.param('x"<script>', id="markup"),
        pytest.param("-leading-dash", id="leading-dash"),
    ],
)
async def test_hostile_request_id_is_replaced(
    ca: CAServer, pki: PKI, hostile: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A request id too long or outside the sane characters is replaced by a fresh UUIDv4,
    never echoed, and never reaches the log."""
    caplog.set_level(logging.INFO, "federatls.ca")
    async with _http(pki) as http:
        answer = await http.get("/1.0/root/abc", headers={"X-Request-Id": hostile})
    assert answer.status_code == 404
    assert _is_fresh_uuid(answer.headers["x-request-id"])
    assert hostile not in caplog.text
    assert f"(request {answer.headers['x-request-id']})" in caplog.text


async def test_control_character_request_id_never_reaches_the_ca(
    ca: CAServer, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """A control character in X-Request-Id is refused by the HTTP parser (400, as Go's
    server refuses it) and comes back in no header."""
    async with _http(pki) as http:
        answer = await http.get("/health", headers={"X-Request-Id": "abc\x01def"})
    assert answer.status_code == 400
    assert "abc" not in answer.headers.get("x-request-id", "")
    assert "abc\x01def" not in caplog.text


async def test_longest_sane_request_id_is_echoed(ca: CAServer, pki: PKI) -> None:
    """Twin of the hostile ones: 128 characters of letters, digits and separators come back."""
    rid = ("A1._:/+=@~-" * 12)[:128]
    async with _http(pki) as http:
        answer = await http.get("/health", headers={"X-Request-Id": rid})
    assert answer.headers["x-request-id"] == rid


# /intermediates ---------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "/1.0"])
async def test_intermediates_list_the_intermediate(ca: CAServer, pki: PKI, prefix: str) -> None:
    """/intermediates answers 201 {"crts": [...]} with the intermediate (the root is not in
    it, twin of /roots); /intermediates.pem the same certificate as application/x-pem-file."""
    async with _http(pki) as http:
        listed = await http.get(prefix + "/intermediates")
        pem = await http.get(prefix + "/intermediates.pem")
    assert listed.status_code == 201
    certs = load_pem_certificates("".join(listed.json()["crts"]))
    assert certs == [_intermediate(pki)]
    assert pki.root not in certs
    assert pem.status_code == 200
    assert pem.headers["content-type"] == "application/x-pem-file"  # step-ca's, no charset
    assert load_pem_certificates(pem.text) == [_intermediate(pki)]


async def test_intermediates_refuse_other_methods(ca: CAServer, pki: PKI) -> None:
    """Twin: POST /intermediates is 405 and /intermediates/ 404, with step-ca's JSON body."""
    async with _http(pki) as http:
        posted = await http.post("/intermediates", json={})
        slashed = await http.get("/intermediates/")
    assert (posted.status_code, posted.json()["status"]) == (405, 405)
    assert (slashed.status_code, slashed.json()["status"]) == (404, 404)


# /root/{sha} -------------------------------------------------------------------------------
async def test_unknown_root_404_names_the_fingerprint(ca: CAServer, pki: PKI) -> None:
    """An unknown fingerprint is 404 with step-ca 0.30's body, naming it in lower case and
    without dashes; a known one in the same spelling is found (twin)."""
    unknown = "AB-" + "c" * 62
    odd = "-".join([pki.fingerprint.upper()[:32], pki.fingerprint.upper()[32:]])
    async with _http(pki) as http:
        missing = await http.get(f"/1.0/root/{unknown}")
        found = await http.get(f"/1.0/root/{odd}")
    assert missing.json() == {
        "status": 404,
        "message": f'root certificate with fingerprint "ab{"c" * 62}" was not found',
    }
    assert found.status_code == 200


async def test_root_404_body_quotes_and_bounds_a_hostile_path(ca: CAServer, pki: PKI) -> None:
    """A newline in the path is quoted as Go quotes it (\\n), and a 6,000-character one is
    cut to 128 characters in the body."""
    async with _http(pki) as http:
        newline = await http.get("/root/abc%0aFORGED")
        long = await http.get("/root/" + "b" * 6000)
    assert (
        newline.json()["message"]
        == 'root certificate with fingerprint "abc\\nforged" was not found'
    )
    message = long.json()["message"]
    assert message == f'root certificate with fingerprint "{"b" * 128}..." was not found'


# Expired certificates ----------------------------------------------------------------------
async def _renew_by_bearer(
    pki: PKI, chain: list[x509.Certificate], key: PrivateKey, clock: FakeClock
) -> x509.Certificate:
    token = mint_renew_token(chain, key, audience=renew_audience(pki.url), now=clock())
    async with pki.client() as ca:
        return (await ca.renew_with_token(token)).leaf


async def test_expired_certificate_renewal_is_401_with_step_ca_message(
    ca: CAServer, pki: PKI, clock: FakeClock
) -> None:
    """Past notAfter (the CA's clock), renewal over mTLS and by a Bearer token are both 401
    with step-ca 0.20's message, which names notAfter as Go prints it."""
    chain, key = await pki.enroll("svc")
    clock.advance(25 * 3600)
    want = EXPIRED_PREFIX + _go_time(chain[0].not_valid_after_utc)
    async with pki.client(identity=(chain, key)) as client:
        with pytest.raises(CARefusedError) as by_mtls:
            await client.renew()
    with pytest.raises(CARefusedError) as by_bearer:
        await _renew_by_bearer(pki, chain, key, clock)
    for refused in (by_mtls.value, by_bearer.value):
        assert (refused.status, refused.message) == (401, want)


async def test_renewal_just_before_expiry_is_not_refused(
    ca: CAServer, pki: PKI, clock: FakeClock
) -> None:
    """Twin: a second before notAfter (the CA's clock) the same Bearer renewal works."""
    chain, key = await pki.enroll("svc")
    left = chain[0].not_valid_after_utc - clock()
    clock.advance(left.total_seconds() - 1)
    renewed = await _renew_by_bearer(pki, chain, key, clock)
    assert renewed.serial_number != chain[0].serial_number


async def test_expired_certificate_renews_by_bearer_when_allowed(
    pki: PKI, clock: FakeClock
) -> None:
    """With allowRenewalAfterExpiry an expired certificate renews by a Bearer x5cInsecure
    token signed by its key: same subject and key, a new serial, recorded as its renewal."""
    pki.set_claims(allowRenewalAfterExpiry=True)
    async with serving(pki, clock) as ca:
        chain, key = await pki.enroll("svc")
        clock.advance(25 * 3600)
        renewed = await _renew_by_bearer(pki, chain, key, clock)
        stored = ca.authority.store.get_certificate(str(renewed.serial_number))
    assert renewed.subject == chain[0].subject
    assert renewed.public_key() == chain[0].public_key()
    assert renewed.not_valid_after_utc > clock()
    assert stored is not None
    assert stored.renewed_from == str(chain[0].serial_number)


async def test_expired_certificate_bearer_refused_without_the_claim(
    ca: CAServer, pki: PKI, clock: FakeClock
) -> None:
    """Twin: without allowRenewalAfterExpiry the same Bearer renewal is 401 and nothing is
    issued (the token stays unspent: a retry is refused for the expiry again, not reuse)."""
    chain, key = await pki.enroll("svc")
    clock.advance(25 * 3600)
    token = mint_renew_token(chain, key, audience=renew_audience(pki.url), now=clock())
    async with pki.client() as client:
        for _ in range(2):
            with pytest.raises(CARefusedError) as info:
                await client.renew_with_token(token)
            assert info.value.status == 401
            assert info.value.message.startswith(EXPIRED_PREFIX)


async def test_really_expired_client_certificate_fails_tls(
    pki: PKI, clock: FakeClock, tmp_path: Path
) -> None:
    """Over mTLS a certificate expired in real time never reaches the renewal rules (the
    handshake refuses it), even with allowRenewalAfterExpiry: the Bearer path is the way."""
    pki.set_claims(allowRenewalAfterExpiry=True)
    past = FakeClock()
    past.advance(-25 * 3600)  # a day's certificate signed then ended an hour ago
    old_key = new_private_key()
    async with serving(pki, past) as ca:  # signed in the CA, past the SDK's checks
        request = SignRequest(build_csr(old_key, "svc", ["svc"]), pki.token("svc", sans=["svc"]))
        old_chain = ca.authority.sign(request, past())
    assert old_chain[0].not_valid_after_utc < datetime.now(UTC)
    async with serving(pki, clock):
        async with pki.client(identity=(old_chain, old_key)) as client:
            with pytest.raises(CAUnreachableError) as info:
                await client.renew()
        renewed = await _renew_by_bearer(pki, old_chain, old_key, clock)
    assert "TLS failure" in str(info.value)
    assert renewed.not_valid_after_utc > datetime.now(UTC)


def _fingerprints(pems: list[str]) -> set[str]:
    return {fingerprint(c) for c in load_pem_certificates("".join(pems))}


# Root bundles ------------------------------------------------------------------------------
def _bundle(path: Path, *pkis: PKI) -> Path:
    path.write_text(certs_to_pem([p.root for p in pkis]))
    return path


async def test_root_bundle_file_trusts_every_root(
    pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `root` file holding two roots: /roots lists both, /root/{sha} finds the second, and
    a client certificate from the second root's PKI passes the TLS handshake (refused after
    it, by the renewal rules: its provisioner is not this CA's)."""
    nxt = make_pki(tmp_path, "next")
    async with serving(nxt):
        chain, key = await nxt.enroll("svc")
    bundle = _bundle(tmp_path / "roots.pem", pki, nxt)
    pki.edit(lambda d: d.__setitem__("root", str(bundle)))
    async with serving(pki), _http(pki) as http:
        roots = await http.get("/roots")
        second = await http.get(f"/root/{nxt.fingerprint}")
        async with pki.client(identity=(chain, key)) as client:
            with pytest.raises(CARefusedError) as info:
                await client.renew()
    assert {fingerprint(c) for c in load_pem_certificates("".join(roots.json()["crts"]))} == {
        pki.fingerprint,
        nxt.fingerprint,
    }
    assert second.status_code == 200
    assert info.value.status == 401  # past the handshake: the second root is trusted


async def test_root_in_no_file_is_refused(pki: PKI, tmp_path: Path) -> None:
    """Twin: a root in no file of ca.json is 404 at /root/{sha}, absent from /roots, and a
    client certificate under it fails the TLS handshake."""
    stranger = make_pki(tmp_path, "stranger")
    async with serving(stranger):
        chain, key = await stranger.enroll("svc")
    bundle = _bundle(tmp_path / "roots.pem", pki, make_pki(tmp_path, "next"))
    pki.edit(lambda d: d.__setitem__("root", str(bundle)))
    async with serving(pki), _http(pki) as http:
        roots = await http.get("/roots")
        missing = await http.get(f"/root/{stranger.fingerprint}")
        async with pki.client(identity=(chain, key)) as client:
            with pytest.raises(CAUnreachableError):
                await client.renew()
    assert stranger.fingerprint not in {
        fingerprint(c) for c in load_pem_certificates("".join(roots.json()["crts"]))
    }
    assert missing.status_code == 404


async def test_federated_roots_bundle_loaded_and_reloaded(pki: PKI, tmp_path: Path) -> None:
    """A `federatedRoots` file holding two roots: /federation lists both and /root/{sha}
    finds the second; a third added to the file is served after a reload (SIGHUP's path),
    and a root dropped from it is then 404 (twin)."""
    kube, edge, extra = (make_pki(tmp_path, n) for n in ("kubernetes", "edge", "extra"))
    bundle = _bundle(tmp_path / "federated.pem", kube, edge)
    pki.edit(lambda d: d.__setitem__("federatedRoots", [str(bundle)]))
    async with serving(pki) as ca, _http(pki) as http:
        before = (await http.get("/federation")).json()["crts"]
        second = await http.get(f"/root/{edge.fingerprint}")
        _bundle(bundle, kube, extra)
        assert ca.reload(), ca.reload_error
        after = (await http.get("/federation")).json()["crts"]
        dropped = await http.get(f"/root/{edge.fingerprint}")
        added = await http.get(f"/root/{extra.fingerprint}")
    assert _fingerprints(before) == {pki.fingerprint, kube.fingerprint, edge.fingerprint}
    assert second.status_code == 200
    assert _fingerprints(after) == {pki.fingerprint, kube.fingerprint, extra.fingerprint}
    assert (dropped.status_code, added.status_code) == (404, 200)
