"""Attacks on what issue 16 added, by an outside client, a hostile peer and a hostile CA.

Each test plays one attack against a real federatls CA (or the rogue CA, for the SDK's side)
over real TLS and asserts that it holds, or pins the fix it needed; each names its twin, the
honest request that works. Targets: the ``cnf`` binding, revoke serials, ``X-Request-Id``,
``GET /crl``, renewal after expiry by a ``Bearer`` token, and ``/intermediates`` completing
a short chain in the SDK.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws

from federatls import BadMaterialError, CARefusedError, bootstrap
from federatls._jwk import ProvisionerKey
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import (
    CRL_PATH,
    REQUEST_ID_HEADER,
    REVOKE_PATH,
    RevokeRequest,
    SignRequest,
)
from federatls._token import (
    csr_fingerprint,
    mint_renew_token,
    mint_token,
    renew_audience,
    sign_audience,
)
from federatls.ca import CAServer
from federatls.ca._config import CAConfig, CRLConfig
from federatls.ca._crl import EXPIRED_KEPT, build_crl
from federatls.ca._material import load_material
from federatls.ca._store import RevokedEntry
from rogue_ca import Issue, RogueCA

from harness import PASSWORD, PKI, FakeClock, make_pki, serving

pytestmark = pytest.mark.anyio

SVC = "svc.cloud.internal"


def _csr(key: PrivateKey | None = None, subject: str = SVC) -> x509.CertificateSigningRequest:
    return build_csr(key or new_private_key(), subject, [subject])


def _cnf_token(pki: PKI, value: str, subject: str = SVC, **claims: Any) -> str:
    return pki.forge(pki.claims(subject, cnf={"x5rt#S256": value}, **claims))


async def _sign(pki: PKI, csr: x509.CertificateSigningRequest, token: str) -> x509.Certificate:
    async with pki.client() as client:
        return (await client.sign(SignRequest(csr, token))).leaf


async def _sign_status(pki: PKI, csr: x509.CertificateSigningRequest, token: str) -> int:
    try:
        await _sign(pki, csr, token)
    except CARefusedError as exc:
        return exc.status
    return 201


def _http(pki: PKI) -> httpx.AsyncClient:
    context = ssl.create_default_context(cadata=pki.root_path.read_text())
    return httpx.AsyncClient(base_url=pki.url + "/1.0", verify=context, timeout=30)


@contextlib.contextmanager
def _rogue(tmp_path: Path) -> Iterator[RogueCA]:
    rogue = RogueCA(make_pki(tmp_path, "cloud"))
    with rogue.running():
        yield rogue


# 1. cnf ----------------------------------------------------------------------------------------
async def test_cnf_in_another_case_does_not_confirm(ca: CAServer, pki: PKI) -> None:
    """The bound fingerprint with its letters' case flipped names other bytes: 403, not a
    signature (base64url is case-sensitive). Twin: the exact fingerprint signs the CSR."""
    csr = _csr()
    print_ = csr_fingerprint(csr)
    flipped = print_.swapcase()
    assert await _sign_status(pki, csr, _cnf_token(pki, flipped)) == 403
    assert (await _sign(pki, csr, _cnf_token(pki, print_))).public_key() == csr.public_key()


@pytest.mark.parametrize("cut", [1, 2, 11, 43 - 32])
async def test_cnf_truncated_or_short_does_not_confirm(ca: CAServer, pki: PKI, cut: int) -> None:
    """A prefix of the fingerprint (fewer digest bytes, even a well-formed one) never
    confirms: 403, whether it decodes or not. Twin: the whole fingerprint signs."""
    csr = _csr()
    print_ = csr_fingerprint(csr)
    assert await _sign_status(pki, csr, _cnf_token(pki, print_[:-cut])) == 403
    assert await _sign_status(pki, csr, _cnf_token(pki, print_)) == 201


@pytest.mark.parametrize("mangle", ["space", "tab", "padding", "standard-alphabet"])
async def test_cnf_with_whitespace_or_padding_is_403(ca: CAServer, pki: PKI, mangle: str) -> None:
    """Spaces, tabs, '=' padding or the standard alphabet's '+' and '/' are not unpadded
    base64url: 403 "error decoding fingerprint" as Go's RawURLEncoding. Twin: a line break,
    which Go's decoder skips, still confirms."""
    csr = _csr()
    print_ = csr_fingerprint(csr)
    digest = base64.urlsafe_b64decode(print_ + "=")
    bad = {
        "space": print_[:20] + " " + print_[20:],
        "tab": print_ + "\t",
        "padding": print_ + "=",
        "standard-alphabet": base64.b64encode(digest).decode().rstrip("="),
    }[mangle]
    if mangle == "standard-alphabet" and bad == print_:
        bad = "+" + bad[1:]  # no '-' or '_' in this digest: put a standard-only letter in
    assert await _sign_status(pki, csr, _cnf_token(pki, bad)) == 403
    broken = print_[:20] + "\r\n" + print_[20:]
    assert await _sign_status(pki, csr, _cnf_token(pki, broken)) == 201


async def test_cnf_token_used_with_another_csr_is_spent_for_the_right_one(
    ca: CAServer, pki: PKI
) -> None:
    """A thief of a bound token cannot buy a certificate for his CSR (403), and (as in
    step-ca, which burns a token on any CSR refusal) the token is spent: the owner's CSR then
    gets 401. Twin: an unspent bound token signs the owner's CSR."""
    owner = _csr()
    token = _cnf_token(pki, csr_fingerprint(owner))
    assert await _sign_status(pki, _csr(), token) == 403
    assert await _sign_status(pki, owner, token) == 401
    assert await _sign_status(pki, owner, _cnf_token(pki, csr_fingerprint(owner))) == 201


async def test_cnf_token_with_a_refused_key_is_not_spent(ca: CAServer, pki: PKI) -> None:
    """A bound token presented with a CSR whose key the CA never certifies (RSA 1024) is
    refused before it is spent: the bound CSR then signs. Twin: a CSR refusal after the key
    check spends it (test_cnf_token_used_with_another_csr_is_spent_for_the_right_one)."""
    owner = _csr()
    token = _cnf_token(pki, csr_fingerprint(owner))
    weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 (the key the CA must refuse)
    weak_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, SVC)]))
        .sign(weak, hashes.SHA256())
    )
    assert await _sign_status(pki, weak_csr, token) == 403
    assert await _sign_status(pki, owner, token) == 201


async def test_cnf_on_a_revoke_token_is_ignored(ca: CAServer, pki: PKI) -> None:
    """A revoke token binding some CSR (cnf) revokes as any revoke token: cnf binds a
    certificate request, and a revocation has none (step-ca checks it only when signing).
    Twin: the same binding on a sign token refuses another CSR."""
    chain, _ = await pki.enroll(SVC)
    serial = str(chain[0].serial_number)
    claims = pki.claims(serial, cnf={"x5rt#S256": csr_fingerprint(_csr())})
    claims["aud"] = pki.url + "/1.0" + REVOKE_PATH
    async with pki.client() as client:
        await client.revoke(RevokeRequest(serial, ott=pki.forge(claims)))
    assert ca.authority.store.is_revoked(serial)
    assert await _sign_status(pki, _csr(), _cnf_token(pki, csr_fingerprint(_csr()))) == 403


# 2. revoke serials -------------------------------------------------------------------------------
async def _revoke_raw(pki: PKI, serial: object, token: str) -> httpx.Response:
    async with _http(pki) as http:
        return await http.post(REVOKE_PATH, json={"serial": serial, "ott": token, "passive": True})


@pytest.mark.parametrize(
    "spelling", ["plus", "octal", "binary", "underscores", "hex-upper", "hex-underscore"]
)
async def test_serial_spellings_revoke_the_certificate(
    ca: CAServer, pki: PKI, spelling: str
) -> None:
    """Every spelling Go's big.Int reads (a '+', 0o, 0b, digits split by '_', 0X) names the
    certificate whose decimal serial the token's sub is. Twin:
    test_serial_spellings_go_does_not_read_are_400."""
    chain, _ = await pki.enroll(SVC)
    n = chain[0].serial_number
    digits = str(n)
    text = {
        "plus": f"+{n}",
        "octal": f"0o{n:o}",
        "binary": f"0b{n:b}",
        "underscores": "_".join(digits[i : i + 3] for i in range(0, len(digits), 3)),
        "hex-upper": f"0X{n:X}",
        "hex-underscore": f"0x_{n:x}",
    }[spelling]
    response = await _revoke_raw(pki, text, pki.token(digits, revoke=True))
    assert response.status_code == 200, response.text
    assert ca.authority.store.is_revoked(digits)


@pytest.mark.parametrize(
    "text",
    [" {n}", "{n} ", "{n}\n", "\u0663{n}", "{full}", "{n}__1", "_{n}", "{n}_", "0x{h}g", "--{n}"],
)
async def test_serial_spellings_go_does_not_read_are_400(ca: CAServer, pki: PKI, text: str) -> None:
    """Spaces, a line break, Arabic-Indic or fullwidth digits, misplaced underscores, a
    double sign: 400, nothing revoked, the token unspent. Twin: the token then revokes with
    the decimal serial."""
    chain, _ = await pki.enroll(SVC)
    n = chain[0].serial_number
    full = str(n).translate({ord(d): 0xFF10 + int(d) for d in "0123456789"})
    bad = text.format(n=n, h=f"{n:x}", full=full)
    token = pki.token(str(n), revoke=True)
    response = await _revoke_raw(pki, bad, token)
    assert response.status_code == 400, response.text
    assert "is not a valid serial number" in response.json()["message"]
    assert not ca.authority.store.is_revoked(str(n))
    assert (await _revoke_raw(pki, str(n), token)).status_code == 200


@pytest.mark.parametrize(
    "serial", [0, -1, 10**250, 16**254 - 1], ids=["zero", "negative", "decimal-251", "hex-254"]
)
async def test_serials_never_issued_are_403_and_spend_nothing(
    ca: CAServer, pki: PKI, serial: int
) -> None:
    """Zero, negative and huge serials (up to the 256 characters read), with a token naming
    them, are 403 "not issued by this certificate authority", never a 500, and revoke
    nothing. Twin: an issued serial revokes."""
    text = hex(serial) if serial == 16**254 - 1 else str(serial)  # at most 256 characters
    token = pki.token(str(serial), revoke=True)
    response = await _revoke_raw(pki, text, token)
    assert response.status_code == 403, response.text
    assert "was not issued by this certificate authority" in response.json()["message"]
    chain, _ = await pki.enroll(SVC)
    issued = str(chain[0].serial_number)
    assert (await _revoke_raw(pki, issued, pki.token(issued, revoke=True))).status_code == 200


async def test_negative_of_an_issued_serial_is_another_serial(ca: CAServer, pki: PKI) -> None:
    """'-N' (and a token whose sub is '-N') does not revoke certificate N: 403 not issued.
    Twin: 'N' with a token for 'N' revokes it."""
    chain, _ = await pki.enroll(SVC)
    n = str(chain[0].serial_number)
    response = await _revoke_raw(pki, "-" + n, pki.token("-" + n, revoke=True))
    assert response.status_code == 403
    assert not ca.authority.store.is_revoked(n)
    assert (await _revoke_raw(pki, n, pki.token(n, revoke=True))).status_code == 200


async def test_serial_as_a_json_number_is_400(ca: CAServer, pki: PKI) -> None:
    """A serial sent as a JSON number (not a string) is a 400, not read as the number.
    Twin: the same digits as a string revoke."""
    chain, _ = await pki.enroll(SVC)
    n = chain[0].serial_number
    token = pki.token(str(n), revoke=True)
    assert (await _revoke_raw(pki, n, token)).status_code == 400
    assert (await _revoke_raw(pki, str(n), token)).status_code == 200


async def test_token_for_one_serial_cannot_revoke_another(ca: CAServer, pki: PKI) -> None:
    """A revoke token whose sub is certificate A's serial, sent with B's serial (in any
    spelling), is 403 and spends nothing: A's revocation then works. Twin: that last one."""
    a, _ = await pki.enroll(SVC)
    b, _ = await pki.enroll(SVC)
    sa, sb = a[0].serial_number, b[0].serial_number
    token = pki.token(str(sa), revoke=True)
    for text in (str(sb), hex(sb), f"+{sb}"):
        assert (await _revoke_raw(pki, text, token)).status_code == 403
    assert not ca.authority.store.is_revoked(str(sb))
    assert (await _revoke_raw(pki, hex(sa), token)).status_code == 200


async def test_mtls_revoke_of_another_serial_in_any_spelling_is_403(ca: CAServer, pki: PKI) -> None:
    """Over mTLS, another certificate's serial (decimal, hex, '+', negative of one's own) is
    403 and revokes nothing. Twin: one's own serial with a '+' revokes it."""
    own, key = await pki.enroll(SVC)
    other, _ = await pki.enroll(SVC)
    mine, theirs = own[0].serial_number, other[0].serial_number
    async with pki.client(identity=(own, key)) as client:
        for text in (str(theirs), hex(theirs), f"+{theirs}", f"-{mine}"):
            with pytest.raises(CARefusedError) as info:
                await client.revoke(RevokeRequest(text))
            assert info.value.status == 403
        assert not ca.authority.store.is_revoked(str(theirs))
        await client.revoke(RevokeRequest(f"+{mine}"))
    assert ca.authority.store.is_revoked(str(mine))


# 3. X-Request-Id ---------------------------------------------------------------------------------
async def _raw_request(pki: PKI, head: bytes) -> tuple[int, list[tuple[str, str]]]:
    """Send ``head`` (a request's head, exactly these bytes) over TLS; the status and the
    answer's headers (each as sent)."""
    context = ssl.create_default_context(cadata=pki.root_path.read_text())
    host, port = pki.url.removeprefix("https://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        writer.write(head)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    lines = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = [(n.strip(), v.strip()) for n, _, v in (x.partition(":") for x in lines[1:])]
    return int(lines[0].split()[1]), headers


def _head(*request_ids: bytes, path: bytes = b"/1.0/no-such-route") -> bytes:
    extra = b"".join(b"X-Request-Id: " + rid + b"\r\n" for rid in request_ids)
    return b"GET " + path + b" HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n" + extra + b"\r\n"


def _ids(headers: list[tuple[str, str]]) -> list[str]:
    return [v for n, v in headers if n.lower() == REQUEST_ID_HEADER.lower()]


_HOSTILE_IDS = [
    b"a" * 129,
    b"<script>alert(1)</script>",
    b"id with spaces",
    b"id;rm -rf /",
    b'"quoted"',
    b"%0d%0aSet-Cookie:%20x=1",
    "caf\u00e9-id".encode(),
    b"-leading-dash",
    b"tab\there",
]


@pytest.mark.parametrize("hostile", _HOSTILE_IDS, ids=lambda b: b[:12].decode("latin-1"))
async def test_hostile_request_id_is_replaced_and_never_logged(
    ca: CAServer, pki: PKI, caplog: pytest.LogCaptureFixture, hostile: bytes
) -> None:
    """A request id that is too long or holds spaces, markup, quotes, escapes or non-ASCII
    letters is neither echoed nor logged: the answer (a refusal, logged) carries one fresh
    UUID. Twin: a plain 128-character id is echoed and logged as sent."""
    caplog.set_level(logging.INFO, "federatls.ca")
    status, headers = await _raw_request(pki, _head(hostile))
    assert status == 404
    (echoed,) = _ids(headers)
    assert echoed.encode() != hostile
    assert len(echoed) == 36
    text = hostile.decode("latin-1")
    assert all(text not in r.getMessage() for r in caplog.records)
    assert any(echoed in r.getMessage() for r in caplog.records)
    plain = b"P" + b"a" * 127
    status, headers = await _raw_request(pki, _head(plain))
    assert _ids(headers) == [plain.decode()]
    assert any(plain.decode() in r.getMessage() for r in caplog.records)


async def test_two_request_ids_give_one_echo(ca: CAServer, pki: PKI) -> None:
    """A request carrying X-Request-Id twice gets one X-Request-Id back, the first; never
    both, never a joined value. Twin: one id comes back as sent."""
    status, headers = await _raw_request(pki, _head(b"first-id", b"second-id"))
    assert status == 404
    assert _ids(headers) == ["first-id"]
    assert _ids((await _raw_request(pki, _head(b"only-id")))[1]) == ["only-id"]


async def test_folded_request_id_is_not_echoed_as_sent(ca: CAServer, pki: PKI) -> None:
    """A request id folded over two lines (obsolete HTTP line folding, a way to smuggle a
    line break) is refused or replaced, never echoed with its second line. Twin: the same
    id unfolded is echoed."""
    head = b"GET /1.0/health HTTP/1.1\r\nHost: ca\r\nX-Request-Id: abc\r\n Set-Cookie: x\r\n"
    status, headers = await _raw_request(pki, head + b"Connection: close\r\n\r\n")
    assert all("Set-Cookie" not in v and "cookie" not in n.lower() for n, v in headers)
    assert status == 400 or _ids(headers) != ["abc"]
    assert _ids((await _raw_request(pki, _head(b"abc", path=b"/health")))[1]) == ["abc"]


async def test_sdk_reads_no_id_from_a_doubled_echo(tmp_path: Path) -> None:
    """A hostile CA answering two X-Request-Id headers (its echo, then one of its own) gives
    the SDK no id to log or carry (httpx joins them with ', ', not a plain id). Twin: one
    plain echo is carried on the error."""
    with _rogue(tmp_path) as rogue:
        rogue.answer_id = "echo-one\r\nx-request-id: evil-two"
        async with rogue.pki.client() as ca:
            with pytest.raises(CARefusedError) as doubled:
                await ca.version()
        rogue.answer_id = "echo-one"
        async with rogue.pki.client() as ca:
            with pytest.raises(CARefusedError) as single:
                await ca.version()
    assert doubled.value.request_id is None
    assert "evil" not in str(doubled.value)
    assert single.value.request_id == "echo-one"


# 4. GET /crl -------------------------------------------------------------------------------------
def _intermediate(pki: PKI) -> x509.Certificate:
    return x509.load_pem_x509_certificate(
        (pki.directory / "certs" / "intermediate_ca.crt").read_bytes()
    )


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


async def test_concurrent_crl_requests_make_one_crl(pki: PKI, clock: FakeClock) -> None:
    """Forty requests at once when the CRL is due get the same CRL, made once (its number
    one more than the last); they do not each make one. Twin: the next renewal period makes
    exactly one more."""
    pki.edit(lambda d: d.__setitem__("crl", {"enabled": True}))
    async with serving(pki, clock), _http(pki) as http:
        first = x509.load_der_x509_crl((await http.get(CRL_PATH)).content)
        clock.advance(17 * 3600)  # past two thirds of the default 24h
        answers = await asyncio.gather(*(http.get(CRL_PATH) for _ in range(40)))
        assert {a.status_code for a in answers} == {200}
        assert len({a.content for a in answers}) == 1
        numbers = {_crl_number(x509.load_der_x509_crl(a.content)) for a in answers}
        assert numbers == {_crl_number(first) + 1}
        clock.advance(17 * 3600)
        again = x509.load_der_x509_crl((await http.get(CRL_PATH)).content)
    assert _crl_number(again) == _crl_number(first) + 2


def test_crl_of_thousands_of_revocations_signed_by_the_intermediate(
    pki: PKI, clock: FakeClock
) -> None:
    """Five thousand revocations make one CRL listing each (one pass, one signature), signed
    by the intermediate with its key id as AKI; entries expired more than an hour are left
    out and those expired less are kept. Twin: a CRL of none lists none."""
    material = load_material(CAConfig.load(pki.config), PASSWORD)
    now = datetime.now(UTC).replace(microsecond=0)
    live = [
        RevokedEntry(str(10**30 + i), now - timedelta(minutes=1), i % 11, now + timedelta(days=1))
        for i in range(5000)
    ]
    kept = RevokedEntry("7", now, 1, now - EXPIRED_KEPT + timedelta(seconds=1))
    gone = RevokedEntry("8", now, 1, now - EXPIRED_KEPT - timedelta(seconds=1))
    stored = build_crl(
        [*live, kept, gone],
        number=3,
        now=now,
        crl=CRLConfig(enabled=True),
        idp="x",
        material=material,
    )
    crl = x509.load_der_x509_crl(stored.der)
    inter = _intermediate(pki)
    assert crl.is_signature_valid(inter.public_key())  # type: ignore[arg-type]
    assert crl.issuer == inter.subject
    ski = inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert len(crl) == 5001
    assert crl.get_revoked_certificate_by_serial_number(7) is not None
    assert crl.get_revoked_certificate_by_serial_number(8) is None
    empty = build_crl(
        [], number=4, now=now, crl=CRLConfig(enabled=True), idp="x", material=material
    )
    assert len(x509.load_der_x509_crl(empty.der)) == 0


# 5. Renewal after expiry by a Bearer token -------------------------------------------------------
def _renew_token(
    chain: list[x509.Certificate], key: PrivateKey, pki: PKI, now: datetime, **overrides: Any
) -> str:
    """A renew token as step's clients make one (mint_renew_token), with claims replaced."""
    from federatls._token import _registry, _signing_jwk

    raw = mint_renew_token(chain, key, audience=renew_audience(pki.url), now=now)
    header = json.loads(base64.urlsafe_b64decode(raw.split(".")[0] + "=="))
    claims = json.loads(base64.urlsafe_b64decode(raw.split(".")[1] + "=="))
    claims.update(overrides)
    jwk, alg = _signing_jwk(key)
    return jws.serialize_compact(header, json.dumps(claims), jwk, registry=_registry(alg))


async def _bearer_status(pki: PKI, token: str) -> tuple[int, str]:
    async with pki.client() as client:
        try:
            await client.renew_with_token(token)
        except CARefusedError as exc:
            return exc.status, exc.message
    return 201, ""


@pytest.fixture
async def expired(
    pki: PKI, clock: FakeClock
) -> AsyncIterator[tuple[CAServer, list[x509.Certificate], PrivateKey]]:
    """A CA allowing renewal after expiry, and a certificate of it expired a day ago."""
    pki.set_claims(allowRenewalAfterExpiry=True)
    async with serving(pki, clock) as server:
        chain, key = await pki.enroll(SVC)
        clock.advance(25 * 3600)
        yield server, chain, key


async def test_expired_renew_token_is_spent_by_its_renewal(
    expired: tuple[CAServer, list[x509.Certificate], PrivateKey], pki: PKI, clock: FakeClock
) -> None:
    """A Bearer renew token that renewed an expired certificate cannot renew it again (401
    token already used). Twin: a fresh token renews it again."""
    _, chain, key = expired
    token = _renew_token(chain, key, pki, clock())
    assert (await _bearer_status(pki, token))[0] == 201
    assert await _bearer_status(pki, token) == (
        401,
        "The request lacked necessary authorization to be completed. "
        "Please see the certificate authority logs for more info.",
    )
    assert (await _bearer_status(pki, _renew_token(chain, key, pki, clock())))[0] == 201


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "other.cloud.internal"},
        {"aud": "https://elsewhere.example/1.0/renew"},
        {"aud": "sign"},
        {"iss": "someone-else"},
        {"exp": 1},
        {"nbf": 4102444800},
    ],
    ids=["sub", "aud", "aud-sign", "iss", "exp", "nbf"],
)
async def test_expired_renew_token_with_wrong_claims_is_401(
    expired: tuple[CAServer, list[x509.Certificate], PrivateKey],
    pki: PKI,
    clock: FakeClock,
    claims: dict[str, object],
) -> None:
    """A renew token signed by the expired certificate's key but naming another subject,
    audience or issuer, or outside its own times, is 401. Twin: the honest token renews."""
    _, chain, key = expired
    if claims.get("aud") == "sign":  # the CA's sign audience: a sign token's, not a renewal's
        claims = {"aud": pki.url + "/1.0/sign"}
    status, _ = await _bearer_status(pki, _renew_token(chain, key, pki, clock(), **claims))
    assert status == 401
    assert (await _bearer_status(pki, _renew_token(chain, key, pki, clock())))[0] == 201


async def test_expired_and_revoked_certificate_does_not_renew(
    expired: tuple[CAServer, list[x509.Certificate], PrivateKey], pki: PKI, clock: FakeClock
) -> None:
    """An expired certificate that was revoked does not renew through the Bearer path, even
    where renewal after expiry is allowed: 401 "certificate has been revoked" (in the log).
    Twin: another expired, unrevoked certificate renews."""
    _, chain, key = expired
    serial = str(chain[0].serial_number)
    async with pki.client() as client:
        await client.revoke(RevokeRequest(serial, ott=pki.token(serial, revoke=True)))
    assert (await _bearer_status(pki, _renew_token(chain, key, pki, clock())))[0] == 401
    clock.advance(-25 * 3600)
    other, other_key = await pki.enroll(SVC)
    clock.advance(25 * 3600)
    assert (await _bearer_status(pki, _renew_token(other, other_key, pki, clock())))[0] == 201


async def test_expired_chain_from_another_ca_does_not_renew(
    expired: tuple[CAServer, list[x509.Certificate], PrivateKey],
    pki: PKI,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """A certificate of another CA (its provisioner allowing renewal after expiry too, the
    same subject) presented by Bearer token to this CA is 401: its chain leads to no root of
    this one. Twin: this CA's own expired certificate renews."""
    _, chain, key = expired
    other = make_pki(tmp_path, "other")
    other.set_claims(allowRenewalAfterExpiry=True)
    async with serving(other):
        foreign, foreign_key = await other.enroll(SVC)
    status, _ = await _bearer_status(pki, _renew_token(foreign, foreign_key, pki, clock()))
    assert status == 401
    assert (await _bearer_status(pki, _renew_token(chain, key, pki, clock())))[0] == 201


async def test_renew_token_with_a_long_chain_is_401(ca: CAServer, pki: PKI) -> None:
    """An x5cInsecure chain of three hundred CA certificates is refused 401 for its length
    before any is parsed (a renew token's header holds at most 8 KiB), and a leaf copied
    (names, key) but signed by the bottom of five CA certificates all named as its issuer,
    for leading to no root of this CA. Twin: the real leaf with its intermediate is
    accepted."""
    from federatls.ca._authority import Refusal

    chain, key = await pki.enroll(SVC)
    authority, now = ca.authority, datetime.now(UTC)
    for count, reason in ((300, "characters long"), (5, "does not lead to a root")):
        junk, keys = _same_named_cas(chain[0].issuer, count)
        forged = _leaf_like(chain[0], keys[0])  # the same names and key, signed by the junk
        with pytest.raises(Refusal) as refused:
            authority.authorize_renew_token(_renew_token([forged, *junk], key, pki, now), now)
        assert refused.value.status == 401
        assert reason in refused.value.reason
    leaf, _ = authority.authorize_renew_token(_renew_token(chain, key, pki, now), now)
    assert leaf == chain[0]


def _leaf_like(leaf: x509.Certificate, signer: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A copy of ``leaf`` (subject, issuer name, key, extensions) signed by ``signer``."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
    )
    for extension in leaf.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return builder.sign(signer, hashes.SHA256())


# 6. /intermediates completing a short chain in the SDK --------------------------------------------
def _same_named_cas(
    name: x509.Name, count: int
) -> tuple[list[x509.Certificate], list[ec.EllipticCurvePrivateKey]]:
    """``count`` CA certificates all named ``name`` (subject and issuer), each signed by the
    next one's key: a chain that never ends at a root, listed top link first (the worst order
    for a walk from the bottom), and the keys, bottom link's first (``count + 1``: the last
    signed the top link)."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(count + 1)]
    now = datetime.now(UTC)
    certs = [
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys[i].public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(keys[i + 1], hashes.SHA256())
        for i in range(count)
    ]
    return certs[::-1], keys


def test_completing_a_chain_tries_each_published_certificate_once(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed: a CA publishing two hundred CA certificates under one name, each signing the
    next, made the SDK's chain completion check n²/2 signatures (minutes, on the event loop,
    for the ~1800 a 1 MiB answer holds); now each is checked at most once, and the chain,
    which reaches no root, is left as it was. Twin: a real short chain is completed with its
    intermediate in one check."""
    from federatls import _issuance, _x509
    from federatls._trust import TrustBundle

    checks: list[int] = []
    real = _x509.issued_by

    def counted(child: x509.Certificate, parent: x509.Certificate) -> bool:
        checks.append(1)
        return real(child, parent)

    monkeypatch.setattr(_x509, "issued_by", counted)  # the walk's checks (path_up)
    roots = TrustBundle.from_ca([pki.root], ())
    inter = _intermediate(pki)
    junk, keys = _same_named_cas(inter.subject, 200)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, SVC)]))
        .issuer_name(inter.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC))
        .not_valid_after(datetime.now(UTC) + timedelta(hours=1))
        .sign(keys[0], hashes.SHA256())
    )
    assert _issuance.complete_chain([leaf], junk, roots) == (leaf,)
    assert len(checks) <= len(junk)
    checks.clear()
    key = serialization.load_pem_private_key(
        (pki.directory / "secrets" / "intermediate_ca_key").read_bytes(), PASSWORD
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    honest = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(inter.subject)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC))
        .not_valid_after(datetime.now(UTC) + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    assert _issuance.complete_chain([honest], [*junk[:5], inter], roots) == (honest, inter)
    assert len(checks) <= 6


async def test_bootstrap_refuses_a_leaf_of_many_same_named_published_cas(
    tmp_path: Path,
) -> None:
    """A hostile CA answering a lone leaf signed by the bottom of a three-hundred-link chain
    of same-named CA certificates it publishes at /intermediates: bootstrap refuses it
    (BadMaterialError: no path to the pinned root), promptly. Twin: its real intermediate
    published completes the chain and enrols."""
    with _rogue(tmp_path) as rogue:
        rogue.issue = Issue(short_chain=True)
        junk, keys = _same_named_cas(rogue.intermediate.subject, 300)
        honest_key = rogue._key
        rogue._key = keys[0]
        rogue.published = (201, junk)
        with pytest.raises(BadMaterialError):
            await bootstrap(rogue.pki.token(SVC, sans=[SVC]))
        rogue._key = honest_key
        rogue.published = (201, [rogue.intermediate])
        identity = await bootstrap(rogue.pki.token(SVC, sans=[SVC]))
    assert identity.chain[1:] == (rogue.intermediate,)


async def test_bootstrap_refuses_a_leaf_of_a_foreign_intermediate_it_publishes(
    tmp_path: Path,
) -> None:
    """A hostile CA that signs with another CA's intermediate (same names, its own key) and
    publishes that intermediate: the SDK cannot reach the pinned root and refuses the
    certificate; nor does an intermediate of the right name but another key help. Twin: the
    CA's own intermediate completes the chain."""
    other = make_pki(tmp_path, "other")
    foreign = _intermediate(other)
    foreign_key = serialization.load_pem_private_key(
        (other.directory / "secrets" / "intermediate_ca_key").read_bytes(), PASSWORD
    )
    assert isinstance(foreign_key, ec.EllipticCurvePrivateKey)
    with _rogue(tmp_path) as rogue:
        rogue.issue = Issue(short_chain=True)
        honest_key, honest = rogue._key, rogue.intermediate
        rogue._key = foreign_key
        rogue.published = (201, [foreign, honest])
        with pytest.raises(BadMaterialError, match="chain"):
            await bootstrap(rogue.pki.token(SVC, sans=[SVC]))
        rogue._key = honest_key
        identity = await bootstrap(rogue.pki.token(SVC, sans=[SVC]))
    assert identity.chain[1:] == (honest,)


def test_crl_verification_is_bounded_against_many_same_named_cas(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed: a hostile CA's /intermediates holding a hundred certificates of the CRL's key
    under its issuer name, each issued by a link of a hundred-link chain of same-named CAs,
    made the CRL check walk every chain from every signer (a number of signature checks
    near the cube of their count: 700,000 for these, over a minute); now at most two per
    certificate, then BadMaterialError. Twin: the CRL verifies with its intermediate, alone
    or listed before the same crowd (a crowd listed first may spend the checks: a CA that
    publishes one makes its own CRL unverifiable, nothing more)."""
    from federatls import _x509

    checks: list[int] = []
    real = _x509.issued_by

    def counted(child: x509.Certificate, parent: x509.Certificate) -> bool:
        checks.append(1)
        return real(child, parent)

    monkeypatch.setattr(_x509, "issued_by", counted)
    inter = _intermediate(pki)
    inter_key = serialization.load_pem_private_key(
        (pki.directory / "secrets" / "intermediate_ca_key").read_bytes(), PASSWORD
    )
    assert isinstance(inter_key, ec.EllipticCurvePrivateKey)
    now = datetime.now(UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(inter.subject)
        .last_update(now)
        .next_update(now + timedelta(hours=1))
        .sign(inter_key, hashes.SHA256())
    )
    chain, keys = _same_named_cas(inter.subject, 100)
    signers = [_ca_certificate(inter.subject, inter_key.public_key(), k) for k in keys[:-1]]
    with pytest.raises(BadMaterialError):
        _x509.crl_signer(crl, [*signers, *chain], [pki.root])
    assert len(checks) <= 2 * (1 + len(signers) + len(chain)) + 8
    assert _x509.crl_signer(crl, [inter, *signers, *chain], [pki.root]) == inter
    assert _x509.crl_signer(crl, [inter], [pki.root]) == inter


def _ca_certificate(
    name: x509.Name, public_key: ec.EllipticCurvePublicKey, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    """A CA certificate named ``name`` (subject and issuer) for ``public_key``."""
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def test_crl_signer_reaches_the_old_root_through_a_root_rollover_certificate() -> None:
    """A CRL signed by an intermediate of a new root key verifies when the new root is known
    only as a certificate the old (trusted) root issued under the same name: the walk
    (``path_up``) stops at any certificate a trusted root issued, so the same-named old root
    is still reached. Twin: without the rollover certificate the CRL is refused."""
    from federatls import _x509

    root_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Root")])
    old_key, new_key, inter_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    old_root = _ca_certificate(root_name, old_key.public_key(), old_key)
    rollover = _ca_certificate(root_name, new_key.public_key(), old_key)
    now = datetime.now(UTC)
    inter_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Intermediate")])
    inter = (
        x509.CertificateBuilder()
        .subject_name(inter_name)
        .issuer_name(root_name)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(new_key, hashes.SHA256())
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(inter_name)
        .last_update(now)
        .next_update(now + timedelta(hours=1))
        .sign(inter_key, hashes.SHA256())
    )
    assert _x509.crl_signer(crl, [inter, rollover], [old_root]) == inter
    with pytest.raises(BadMaterialError, match="does not verify"):
        _x509.crl_signer(crl, [inter], [old_root])


async def test_expired_leaf_of_a_provisioner_without_the_claim_does_not_renew(
    pki: PKI, clock: FakeClock
) -> None:
    """With two provisioners, one allowing renewal after expiry and one not, an expired
    certificate of the second is 401 by Bearer token: the claim is read from the provisioner
    named in the certificate, not from any. Twin: the first one's expired certificate
    renews."""
    strict = ProvisionerKey.generate()

    def add(d: dict[str, Any]) -> None:
        provisioners = d["authority"]["provisioners"]
        provisioners[0]["claims"] = {"allowRenewalAfterExpiry": True}
        provisioners.append(
            {
                "type": "JWK",
                "name": "strict",
                "key": strict.public.as_dict(),
                "encryptedKey": strict.encrypt(PASSWORD),
            }
        )

    pki.edit(add)
    async with serving(pki, clock):
        allowed, allowed_key = await pki.enroll(SVC)
        key = new_private_key()
        token = mint_token(
            strict,
            issuer="strict",
            subject=SVC,
            audience=sign_audience(pki.url),
            now=clock(),
            sans=[SVC],
            root_fingerprint=pki.fingerprint,
        )
        async with pki.client() as client:
            refused = list((await client.sign(SignRequest(_csr(key), token))).chain)
        clock.advance(25 * 3600)
        status, _ = await _bearer_status(pki, _renew_token(refused, key, pki, clock()))
        assert status == 401
        renewed = await _bearer_status(pki, _renew_token(allowed, allowed_key, pki, clock()))
    assert renewed[0] == 201


_RFC5280_REASONS = dict(
    zip(
        (1, 2, 3, 4, 5, 6, 8, 9, 10),
        (
            x509.ReasonFlags.key_compromise,
            x509.ReasonFlags.ca_compromise,
            x509.ReasonFlags.affiliation_changed,
            x509.ReasonFlags.superseded,
            x509.ReasonFlags.cessation_of_operation,
            x509.ReasonFlags.certificate_hold,
            x509.ReasonFlags.remove_from_crl,
            x509.ReasonFlags.privilege_withdrawn,
            x509.ReasonFlags.aa_compromise,
        ),
        strict=True,
    )
)


async def test_crl_carries_each_reason_code_and_is_signed_by_the_intermediate(
    pki: PKI, clock: FakeClock
) -> None:
    """Revocations with every reasonCode step-ca takes (0-10) appear in the CRL served after
    them, with that reason (none for 0, unspecified; 7, unassigned, as its raw value), the
    CRL signed by the intermediate, its AKI the intermediate's key id. Twin: the live
    certificate enrolled alongside is not listed."""
    pki.edit(lambda d: d.__setitem__("crl", {"enabled": True, "generateOnRevoke": True}))
    async with serving(pki, clock), pki.client() as client:
        serials: dict[int, int] = {}
        for code in range(11):
            chain, _ = await pki.enroll(SVC)
            serial = str(chain[0].serial_number)
            token = pki.token(serial, revoke=True)
            await client.revoke(RevokeRequest(serial, ott=token, reason_code=code))
            serials[code] = chain[0].serial_number
        live, _ = await pki.enroll(SVC)
        _, crl = await client.crl()
    inter = _intermediate(pki)
    assert crl.is_signature_valid(inter.public_key())  # type: ignore[arg-type]
    ski = inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.get_revoked_certificate_by_serial_number(live[0].serial_number) is None
    for code, number in serials.items():
        entry = crl.get_revoked_certificate_by_serial_number(number)
        assert entry is not None
        oid = x509.oid.CRLEntryExtensionOID.CRL_REASON
        if code == 0:
            assert all(e.oid != oid for e in entry.extensions)
        elif code == 7:
            with pytest.raises(ValueError, match="7"):  # cryptography knows no reason 7
                entry.extensions.get_extension_for_oid(oid)
        else:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            assert reason == _RFC5280_REASONS[code]


@pytest.mark.parametrize("extra", ["forged-crl", "certificate-first", "markup"])
async def test_cli_crl_writes_nothing_unverified_around_the_crl(tmp_path: Path, extra: str) -> None:
    """Fixed: a CA whose PEM answer holds the CRL it signed plus more (a second CRL block of
    its own making, a certificate block before it, markup after it) had the CRL verified and
    the whole answer written; now such an answer is refused, one line, nothing written.
    Twin: the bare signed CRL is written."""
    from harness import assert_one_line_error, federatls

    out = tmp_path / "c.pem"
    with _rogue(tmp_path) as rogue:
        honest = rogue.signed_crl(serialization.Encoding.PEM)
        other = make_pki(tmp_path, "other")
        forged = RogueCA(other).signed_crl(serialization.Encoding.PEM)
        rogue.crl = {
            "forged-crl": honest + forged,
            "certificate-first": rogue.intermediate.public_bytes(serialization.Encoding.PEM)
            + honest,
            "markup": honest + b"<script>alert(1)</script>\n",
        }[extra]
        root = tmp_path / "root.crt"
        root.write_bytes(rogue.pki.root_path.read_bytes())
        inter = tmp_path / "inter.crt"
        inter.write_bytes(rogue.intermediate.public_bytes(serialization.Encoding.PEM))
        flags = ("--ca-url", rogue.url, "--root", root, "--intermediates", inter, "--pem")
        refused = await federatls("ca", "crl", *flags, "--out", out)
        assert_one_line_error(refused, "CRL")
        assert not out.exists()
        rogue.crl = honest
        written = await federatls("ca", "crl", *flags, "--out", out)
    assert written.code == 0, written
    assert out.read_bytes() == honest


async def test_client_crl_refuses_an_answer_past_its_cap(tmp_path: Path) -> None:
    """A CA answering /crl with more than MAX_CRL_BYTES is refused (BadMaterialError naming
    the cap) from its Content-Length, the body never buffered. Twin: its signed CRL is
    returned, verified."""
    from federatls._client import MAX_CRL_BYTES

    with _rogue(tmp_path) as rogue:
        rogue.crl = b"0" * (MAX_CRL_BYTES + 1)
        async with rogue.pki.client() as ca:
            with pytest.raises(BadMaterialError, match=f"larger than {MAX_CRL_BYTES} bytes"):
                await ca.crl(issuers=[rogue.intermediate])
        rogue.crl = rogue.signed_crl(serialization.Encoding.PEM)
        async with rogue.pki.client() as ca:
            body, crl = await ca.crl(pem=True, issuers=[rogue.intermediate])
    assert body == rogue.crl
    assert crl.issuer == rogue.intermediate.subject


async def test_hostile_legacy_request_id_is_replaced(ca: CAServer, pki: PKI) -> None:
    """The legacy X-Smallstep-Id (read when X-Request-Id is absent, as step-ca reads it) is
    held to the same rule: a hostile one is replaced by a fresh UUID. Twin: a plain one is
    echoed in X-Request-Id."""
    head = b"GET /health HTTP/1.1\r\nHost: ca\r\nConnection: close\r\nX-Smallstep-Id: %s\r\n\r\n"
    _, headers = await _raw_request(pki, head % b"<b>x y</b>")
    (echoed,) = _ids(headers)
    assert len(echoed) == 36
    assert "<" not in echoed
    _, headers = await _raw_request(pki, head % b"legacy-id-1")
    assert _ids(headers) == ["legacy-id-1"]


async def test_completed_chain_does_not_excuse_foreign_names(tmp_path: Path) -> None:
    """A hostile CA answering a lone leaf for names nobody asked for, its real intermediate
    published to complete the chain: the chain completes, and the names still refuse it
    (BadMaterialError). Twin: the leaf for the asked names enrols through the same
    completion."""
    with _rogue(tmp_path) as rogue:
        rogue.published = (201, [rogue.intermediate])
        rogue.issue = Issue(short_chain=True, names=("evil.example",))
        with pytest.raises(BadMaterialError, match=r"evil\.example"):
            await bootstrap(rogue.pki.token(SVC, sans=[SVC]))
        rogue.issue = Issue(short_chain=True)
        identity = await bootstrap(rogue.pki.token(SVC, sans=[SVC]))
    assert identity.chain[1:] == (rogue.intermediate,)


async def test_expired_identity_against_a_ca_refusing_the_renew_token(tmp_path: Path) -> None:
    """An identity expired by our clock, at a CA that answers the renew token with a 4xx
    (the rogue CA wants a client certificate): one POST /renew, then IdentityExpiredError
    saying to enrol again; no retry loop. Twin: with a token source, one new enrolment (one
    token drawn) gives a fresh certificate."""
    from federatls import IdentityExpiredError, RenewingIdentity

    clock = FakeClock()
    with _rogue(tmp_path) as rogue:
        identity = await bootstrap(rogue.pki.token(SVC, sans=[SVC]))
        clock.advance(25 * 3600)
        before = len(rogue.requests)
        live = RenewingIdentity(identity, clock=clock)
        with pytest.raises(IdentityExpiredError, match="enrol again"):
            await live.refresh()
        assert rogue.requests[before:] == ["POST /renew"]
        drawn: list[str] = []

        async def source() -> str:
            drawn.append(rogue.pki.token(SVC, sans=[SVC]))
            return drawn[-1]

        renewing = RenewingIdentity(identity, clock=clock, token_source=source)
        fresh = await renewing.refresh()
    assert len(drawn) == 1
    assert fresh.serial != identity.serial
