"""Hypothesis throws hostile requests at a running federatls CA.

The CA serves in the test's event loop; hypothesis runs in a worker thread
(``anyio.to_thread``) with a plain synchronous httpx client, so each test starts the CA once
and sends every example to it. For every request the CA must answer a 4xx (501 only for a
non-passive revoke) with step-ca's JSON error body ``{"status": <same code>, "message": str}``,
and afterwards its store must show that nothing was issued or revoked. Below HTTP, random
bytes and malformed TLS records sent to the port must end each connection with nothing
logged as an error. Tokens validly signed by the provisioner with any names at all may also
be issued (201); refused, they get a 403 and stay unspent, never a 5xx.

The inputs that once made the CA fail (found by these runs) are pinned at the end of this file
as explicit regression cases, so they are tried on every run, not only when hypothesis draws
them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import ssl
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federatls._jwk import ProvisionerKey
from federatls._keys import build_csr, new_private_key
from federatls._protocol import MAX_BODY_BYTES
from federatls._token import revoke_audience, sign_audience
from federatls.ca import CAServer, SQLiteStore

from harness import PKI

pytestmark = pytest.mark.anyio

SUBJECT = "svc.cloud.internal"
CSR_CN = "fuzz.invalid"  # no token the fuzzer sends has this subject: nothing can be issued


# FEDERATLS_FUZZ_SCALE=10 runs ten times the examples (for a long local hunt).
SCALE = int(os.environ.get("FEDERATLS_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pem(label: str, der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


_CSR_KEY = new_private_key()
_CSR_DER = build_csr(_CSR_KEY, CSR_CN, [CSR_CN]).public_bytes(serialization.Encoding.DER)
GOOD_CSR = _pem("CERTIFICATE REQUEST", _CSR_DER)
_SPKI = _CSR_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
_VERSION_AT = _CSR_DER.index(b"\x02\x01\x00") + 2  # CertificationRequestInfo.version
_SPKI_AT = range(_CSR_DER.index(_SPKI), _CSR_DER.index(_SPKI) + len(_SPKI))


def _flipped_der(at: int, mask: int) -> bytes:
    der = bytearray(_CSR_DER)
    der[at] ^= mask
    return bytes(der)


def _flip(at: int, mask: int) -> str:
    """The good CSR with one byte changed anywhere."""
    return _pem("CERTIFICATE REQUEST", _flipped_der(at % len(_CSR_DER), mask))


# JSON as any peer may send it. Integers stay within 64 bits and nesting stays shallow here;
# huge integers and deep nesting are regression cases at the end of the file.
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
CSRS = st.one_of(
    st.just(GOOD_CSR),
    st.text(max_size=120),
    st.binary(max_size=300).map(lambda der: _pem("CERTIFICATE REQUEST", der)),
    st.builds(_flip, st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    JSON_VALUES,
)
TIMES = st.one_of(
    st.text(alphabet="0123456789.hmsuµnT:-+Z", max_size=25),
    st.sampled_from(["1h", "48h", "-5m", "5m", "2030-01-01T00:00:00Z", "0"]),
    JSON_VALUES,
)
CLAIM_NAMES = ["aud", "exp", "iat", "iss", "jti", "nbf", "sans", "sha", "sub"]


@dataclass
class Fuzzer:
    """What the strategies need from the running CA, and what the run has sent."""

    pki: PKI
    foreign: ProvisionerKey  # signs forged tokens under the provisioner's kid
    http: httpx.Client
    real_tokens: int = 0  # validly-signed tokens sent (each may burn one jti)

    # Tokens ---------------------------------------------------------------------------------
    def bounded_numbers(self) -> st.SearchStrategy[Any]:
        # Times near now, and far from it in both directions.
        now = int(self.pki.clock().timestamp())
        return (
            st.integers(-(10**10), 10**10)
            | st.integers(now - 400, now + 400)
            | st.floats(-1e10, 1e10)
        )

    def overrides(self) -> st.SearchStrategy[dict[str, Any]]:
        """Random replacements for some claims of an otherwise valid sign token."""
        values = st.one_of(
            self.bounded_numbers(),
            st.text(max_size=30).filter(lambda s: s != CSR_CN),
            st.sampled_from(
                [sign_audience(self.pki.url), revoke_audience(self.pki.url), self.pki.provisioner]
            ),
            st.lists(st.text(max_size=20), max_size=3),
            st.none(),  # removes the claim
            st.booleans(),
        )
        return st.dictionaries(st.sampled_from([*CLAIM_NAMES, "extra"]), values, max_size=3)

    def tokens(self) -> st.SearchStrategy[str]:
        """Random strings, random three-part base64, random JSON, forged and huge tokens."""
        header = st.fixed_dictionaries(
            {"alg": st.sampled_from(["ES256", "none", "HS256"]) | JSON_VALUES},
            optional={"kid": st.just(self.pki.key.kid) | JSON_VALUES, "typ": JSON_VALUES},
        )
        claims = st.dictionaries(st.sampled_from(CLAIM_NAMES), JSON_VALUES) | JSON_VALUES
        unsigned = st.builds(
            lambda h, c, sig: (
                f"{_b64(json.dumps(h).encode())}.{_b64(json.dumps(c).encode())}.{sig}"
            ),
            header,
            claims,
            st.binary(max_size=70).map(_b64),
        )
        return st.one_of(
            st.text(max_size=80),
            st.lists(st.binary(max_size=60).map(_b64), min_size=3, max_size=3).map(".".join),
            unsigned,
            self.overrides().map(self.forged),
            self.overrides().map(self.signed),
            st.tuples(st.integers(1_000, 30_000), st.booleans()).map(self.huge),
        )

    def forged(self, overrides: dict[str, Any]) -> str:
        return self.pki.forge(self.pki.claims(SUBJECT, **overrides), key=self.foreign)

    def signed(self, overrides: dict[str, Any]) -> str:
        self.real_tokens += 1
        return self.pki.forge(self.pki.claims(SUBJECT, **overrides))

    def huge(self, size_and_real: tuple[int, bool]) -> str:
        size, real = size_and_real
        claims = self.pki.claims(SUBJECT, extra="x" * size)
        if real:
            self.real_tokens += 1
            return self.pki.forge(claims)
        return self.pki.forge(claims, key=self.foreign)

    def authorization(self) -> st.SearchStrategy[dict[str, str]]:
        """No header, random header text, or a Bearer with a random or x5cInsecure token."""
        ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
        x5c_entry = st.one_of(
            st.binary(max_size=120).map(lambda b: base64.b64encode(b).decode()),
            st.text(max_size=20),
            JSON_VALUES,
            st.just(base64.b64encode(_CSR_DER).decode()),
        )
        x5c_header = st.fixed_dictionaries(
            {"alg": st.sampled_from(["ES256", "RS256", "EdDSA"]), "x5cInsecure": JSON_VALUES}
        ) | st.fixed_dictionaries(
            {"alg": st.just("ES256"), "x5cInsecure": st.lists(x5c_entry, max_size=2)}
        )
        x5c = st.builds(
            lambda h, c: f"{_b64(json.dumps(h).encode())}.{_b64(json.dumps(c).encode())}.c2ln",
            x5c_header,
            st.dictionaries(st.sampled_from(CLAIM_NAMES), JSON_VALUES),
        )
        # Printable ASCII only: control characters are malformed HTTP, which aiohttp refuses
        # before the CA sees it. A header over 8 KiB is a regression case below.
        bearer = (
            (self.tokens() | x5c | ascii_text)
            .filter(lambda t: len(t) < 8000 and all(" " <= c <= "~" for c in t))
            .map(lambda t: "Bearer " + t)
        )
        return st.one_of(
            st.just({}),
            (ascii_text | bearer).map(lambda value: {"Authorization": value.strip()}),
        )

    # Requests -------------------------------------------------------------------------------
    def bodies(self) -> st.SearchStrategy[bytes]:
        """Random bytes, random JSON, and objects with step's fields holding random values."""
        fields = st.fixed_dictionaries(
            {},
            optional={
                "csr": CSRS,
                "ott": self.tokens() | JSON_VALUES,
                "notBefore": TIMES,
                "notAfter": TIMES,
                "templateData": JSON_VALUES,
                "serial": st.integers(min_value=0).map(str) | JSON_VALUES,
                "reasonCode": st.integers(-3, 13) | JSON_VALUES,
                "reason": JSON_VALUES,
                "passive": st.booleans() | JSON_VALUES,
            },
        )
        return st.one_of(
            st.binary(max_size=600),
            JSON_VALUES.map(lambda v: json.dumps(v).encode()),
            fields.map(lambda f: json.dumps(f).encode()),
        )

    def check(self, response: httpx.Response, *, non_passive_revoke: bool = False) -> None:
        """A 4xx (501 only for a non-passive revoke) with exactly step's error body."""
        status = response.status_code
        allowed = 400 <= status < 500 or (status == 501 and non_passive_revoke)
        assert allowed, (status, response.request.method, response.request.url, response.text)
        body = response.json()
        assert set(body) == {"status", "message"}, body
        assert body["status"] == status
        assert isinstance(body["message"], str)
        assert body["message"]


def _non_passive_revoke(path: str, body: bytes) -> bool:
    if "revoke" not in path:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("passive") is not True


@pytest.fixture
def fuzzer(ca: CAServer, pki: PKI) -> Iterator[Fuzzer]:
    ctx = ssl.create_default_context(cafile=str(pki.root_path))
    with httpx.Client(verify=ctx, base_url=pki.url, timeout=20) as http:
        yield Fuzzer(pki, ProvisionerKey.generate(), http)


def _store(ca: CAServer) -> SQLiteStore:
    store = ca.authority.store
    assert isinstance(store, SQLiteStore)
    return store


async def _in_thread(run: Callable[[], None]) -> None:
    await anyio.to_thread.run_sync(run)


POST_PATHS = [
    "/sign",
    "/1.0/sign",
    "/revoke",
    "/1.0/revoke",
    "/rekey",
    "/1.0/rekey",
    "/renew",
    "/1.0/renew",
    "/re-sign",
]


# The random runs -----------------------------------------------------------------------------
async def test_random_posts_get_4xx_and_change_nothing(ca: CAServer, fuzzer: Fuzzer) -> None:
    """Random bodies, tokens, CSRs and Authorization headers on every POST route get a 4xx
    (501 for non-passive revokes) with step's JSON body; nothing is issued or revoked."""
    assert _store(ca).counts() == {"used_tokens": 0, "certificates": 0, "revocations": 0}

    @fuzz_settings(1000)
    @given(
        path=st.sampled_from(POST_PATHS),
        body=fuzzer.bodies(),
        headers=fuzzer.authorization(),
    )
    def run(path: str, body: bytes, headers: dict[str, str]) -> None:
        response = fuzzer.http.post(path, content=body, headers=headers)
        fuzzer.check(response, non_passive_revoke=_non_passive_revoke(path, body))

    await _in_thread(run)
    counts = _store(ca).counts()
    assert counts["certificates"] == 0
    assert counts["revocations"] == 0
    assert counts["used_tokens"] <= fuzzer.real_tokens


# What reaches the TLS port before any handshake: random bytes, and TLS records with random
# contents (a record header, then anything), as scanners and broken clients send them.
TLS_JUNK = st.binary(max_size=600) | st.builds(
    lambda kind, version, body: bytes([kind, 3, version]) + len(body).to_bytes(2, "big") + body,
    st.sampled_from([0x14, 0x15, 0x16, 0x17, 0x80]),
    st.integers(min_value=0, max_value=4),
    st.binary(max_size=600),
)


def _send_and_half_close(port: int, junk: bytes) -> None:
    """Send ``junk`` to the CA's port, end our side, and read until the CA closes."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        contextlib.suppress(ConnectionResetError, BrokenPipeError),
    ):
        raw.sendall(junk)
        raw.shutdown(socket.SHUT_WR)
        while raw.recv(4096):
            pass  # an alert, perhaps: the CA must end the connection (recv times out)


async def test_random_bytes_at_the_tls_port(
    ca: CAServer, fuzzer: Fuzzer, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are not a TLS handshake never crash a connection's code: each connection
    ends (refused, or ended by the client) with nothing logged as an error, and a real
    client is served afterwards."""
    caplog.set_level(logging.INFO)

    @fuzz_settings(300)
    @given(junk=TLS_JUNK)
    def run(junk: bytes) -> None:
        _send_and_half_close(ca.address[1], junk)

    await _in_thread(run)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert "refused TLS connection" in caplog.text  # the junk reached the handshake
    response = await anyio.to_thread.run_sync(lambda: fuzzer.http.get("/health"))
    assert response.status_code == 200


async def test_sign_with_validly_signed_random_claims(ca: CAServer, fuzzer: Fuzzer) -> None:
    """Tokens signed by the real provisioner key with random claims, with a CSR for another
    name: always 401 or 403, never a certificate; only validly-signed tokens burn a jti."""

    @fuzz_settings(300)
    @given(overrides=fuzzer.overrides(), path=st.sampled_from(["/sign", "/1.0/sign"]))
    def run(overrides: dict[str, Any], path: str) -> None:
        body = {"csr": GOOD_CSR, "ott": fuzzer.signed(overrides)}
        response = fuzzer.http.post(path, json=body)
        fuzzer.check(response)
        assert response.status_code in (401, 403)

    await _in_thread(run)
    counts = _store(ca).counts()
    assert counts["certificates"] == 0
    assert counts["revocations"] == 0
    assert 0 < counts["used_tokens"] <= fuzzer.real_tokens


async def test_clean_request_is_issued_twin(ca: CAServer, fuzzer: Fuzzer, pki: PKI) -> None:
    """Twin of the random runs: the same client and CA issue for a matching CSR and a clean
    token (201), and the store records exactly that."""
    key = new_private_key()
    csr = build_csr(key, SUBJECT, [SUBJECT]).public_bytes(serialization.Encoding.PEM).decode()

    def run() -> None:
        response = fuzzer.http.post("/1.0/sign", json={"csr": csr, "ott": pki.token(SUBJECT)})
        assert response.status_code == 201, response.text

    await _in_thread(run)
    assert _store(ca).counts() == {"used_tokens": 1, "certificates": 1, "revocations": 0}


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"]
SUCCESSFUL_GETS = {
    f"{prefix}/{name}"
    for prefix in ("", "/1.0")
    for name in ("health", "version", "roots", "roots.pem", "federation", "provisioners")
}
SEGMENTS = st.text(min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


async def test_random_paths_and_methods(ca: CAServer, fuzzer: Fuzzer) -> None:
    """Random paths under / and /1.0/ with random methods get a 4xx with step's JSON body."""

    @fuzz_settings(400)
    @given(
        method=st.sampled_from(METHODS),
        prefix=st.sampled_from(["", "/1.0"]),
        segments=st.lists(SEGMENTS, min_size=1, max_size=4)
        | st.tuples(st.sampled_from(["root", "provisioners", "sign", "renew"]), SEGMENTS).map(list),
    )
    def run(method: str, prefix: str, segments: list[str]) -> None:
        path = prefix + "/" + "/".join(quote(s, safe="") for s in segments)
        if method == "GET" and unquote(path) in SUCCESSFUL_GETS:
            return
        fuzzer.check(fuzzer.http.request(method, path))

    await _in_thread(run)
    assert _store(ca).counts()["certificates"] == 0


async def test_random_provisioner_queries(ca: CAServer, fuzzer: Fuzzer) -> None:
    """GET /provisioners with random cursor and limit answers 200 with a page, or a 400 body."""
    query_text = st.text(max_size=12)

    @fuzz_settings(200)
    @given(cursor=query_text, limit=query_text | st.integers().map(str))
    def run(cursor: str, limit: str) -> None:
        response = fuzzer.http.get("/provisioners", params={"cursor": cursor, "limit": limit})
        if response.status_code == 200:
            assert isinstance(response.json()["provisioners"], list)
        else:
            fuzzer.check(response)
            assert response.status_code == 400

    await _in_thread(run)


# Oversized bodies ----------------------------------------------------------------------------
def _chunks(total: int) -> Iterator[bytes]:
    """A body without Content-Length (chunked), so the server must count while reading: a
    first small chunk, a pause, then the rest."""
    yield b"x" * 100
    time.sleep(0.5)
    sent = 100
    while sent < total:
        piece = min(8192, total - sent)
        sent += piece
        yield b"x" * piece


@pytest.mark.parametrize("path", ["/sign", "/1.0/revoke"])
@pytest.mark.parametrize(
    "chunked",
    [
        False,
        pytest.param(
            True,
        ),
    ],
    ids=["content-length", "chunked"],
)
async def test_oversized_body_is_413(
    ca: CAServer, fuzzer: Fuzzer, path: str, chunked: bool
) -> None:
    """A body one byte over 64 KiB gets 413 with step's JSON error body."""
    size = MAX_BODY_BYTES + 1

    def run() -> None:
        content = _chunks(size) if chunked else b"x" * size
        response = fuzzer.http.post(path, content=content)
        assert response.status_code == 413
        fuzzer.check(response)

    await _in_thread(run)


def _slowly(body: bytes) -> Iterator[bytes]:
    """The body in two chunks half a second apart, as a slow network delivers it."""
    half = len(body) // 2
    yield body[:half]
    time.sleep(0.5)
    yield body[half:]


async def test_sign_body_in_one_piece(ca: CAServer, fuzzer: Fuzzer, pki: PKI) -> None:
    """Twin of the next test: a valid sign request sent at once (Content-Length) gets 201."""
    body = _matching_sign_body(pki)

    def run() -> None:
        response = fuzzer.http.post("/sign", content=body)
        assert response.status_code == 201, response.text

    await _in_thread(run)


async def test_sign_body_in_two_pieces(ca: CAServer, fuzzer: Fuzzer, pki: PKI) -> None:
    """A valid sign request whose body arrives in two chunks is read whole (201)."""
    body = _matching_sign_body(pki)

    def run() -> None:
        response = fuzzer.http.post("/sign", content=_slowly(body))
        assert response.status_code == 201, response.text

    await _in_thread(run)


async def test_body_of_exactly_64_kib_is_not_413(ca: CAServer, fuzzer: Fuzzer) -> None:
    """Twin of the 413 test: a body of exactly 64 KiB is read and refused as malformed (400)."""

    def run() -> None:
        response = fuzzer.http.post("/sign", content=b"x" * MAX_BODY_BYTES)
        assert response.status_code == 400
        fuzzer.check(response)

    await _in_thread(run)


# Requests that once made the CA fail, found by fuzzing (one each) ------------------------
def _unsigned_token(payload: bytes) -> str:
    return ".".join([_b64(b'{"alg":"ES256"}'), _b64(payload), _b64(b"signature")])


def _sign_body(ott: str) -> bytes:
    return json.dumps({"csr": GOOD_CSR, "ott": ott}).encode()


def _csr_body(csr_pem: str) -> bytes:
    return json.dumps({"csr": csr_pem, "ott": "a.b.c"}).encode()


def _matching_sign_body(pki: PKI, **extra: str) -> bytes:
    csr = build_csr(new_private_key(), SUBJECT, [SUBJECT])
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    return json.dumps({"csr": pem, "ott": pki.token(SUBJECT), **extra}).encode()


def _nothing(pki: PKI) -> bytes:
    return b""


def _no_headers(pki: PKI) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Regression:
    method: str
    path: str
    statuses: tuple[int, ...]  # what the CA may answer
    body: Callable[[PKI], bytes] = _nothing
    headers: Callable[[PKI], dict[str, str]] = _no_headers


NESTED = b"[" * 3000 + b"]" * 3000  # 6 KB, far below the 64 KiB body limit
REGRESSIONS = [
    pytest.param(
        Regression("POST", "/sign", (400,), body=lambda p: NESTED),
        id="A-nested-json-body",
    ),
    pytest.param(
        Regression("POST", "/sign", (401,), body=lambda p: _sign_body(_unsigned_token(NESTED))),
        id="B-nested-token-payload",
    ),
    pytest.param(
        Regression(
            "POST",
            "/sign",
            (401,),
            body=lambda p: _sign_body(_unsigned_token(b'{"exp":1' + b"0" * 400 + b"}")),
        ),
        id="C-huge-integer-claim",
    ),
    pytest.param(
        Regression("GET", "/provisioners?cursor=%C2%B2", (200, 400)),
        id="D-superscript-cursor",
    ),
    pytest.param(
        Regression(
            "POST",
            "/sign",
            (400, 403),
            body=lambda p: _matching_sign_body(p, notBefore="9999-12-31T23:59:59Z"),
        ),
        id="G-notBefore-9999",
    ),
    pytest.param(
        Regression(
            "POST",
            "/sign",
            (401, 403),
            body=lambda p: _sign_body(p.forge(p.claims(SUBJECT, exp=10**12))),
        ),
        id="H-validly-signed-exp-year-33658",
    ),
    pytest.param(
        Regression(
            "POST",
            "/renew",
            (401,),
            headers=lambda p: {"Authorization": "Bearer " + _unsigned_token(b"x" * 7000)},
        ),
        id="I-9k-bearer-header",
    ),
    pytest.param(
        Regression(
            "POST",
            "/sign",
            (400,),
            body=lambda p: _csr_body(_pem("CERTIFICATE REQUEST", _flipped_der(_VERSION_AT, 1))),
        ),
        id="K-csr-version-1",
    ),
    pytest.param(
        Regression(
            "POST",
            "/sign",
            (400,),
            body=lambda p: _csr_body(_pem("CERTIFICATE REQUEST", _flipped_der(_SPKI_AT[-5], 1))),
        ),
        id="K-csr-point-off-curve",
    ),
]


@pytest.mark.parametrize("case", REGRESSIONS)
async def test_requests_that_once_failed(
    ca: CAServer, fuzzer: Fuzzer, pki: PKI, case: Regression
) -> None:
    """Each request, found by the fuzzer, gets a 4xx JSON answer and changes no certificate."""
    content, headers = case.body(pki), case.headers(pki)

    def run() -> None:
        response = fuzzer.http.request(
            case.method, case.path, content=content or None, headers=headers
        )
        assert response.status_code in case.statuses, response.text
        if response.status_code >= 400:
            fuzzer.check(response)

    await _in_thread(run)
    assert _store(ca).counts()["certificates"] == 0


# Validly signed tokens with any names ---------------------------------------------------------
# A CSR with no subject and no SANs passes step-ca's name checks for any token, so the token's
# `sub` and `sans` alone decide what is certified.
NAMELESS_CSR = (
    x509.CertificateSigningRequestBuilder()
    .subject_name(x509.Name([]))
    .sign(_CSR_KEY, hashes.SHA256())
    .public_bytes(serialization.Encoding.PEM)
    .decode()
)
ODD_NAMES = [
    "",
    " ",
    "a" * 64,
    "a" * 65,
    "ü" * 32,
    "ü" * 33,
    "bücher.cloud.internal",
    "xn--bcher-kva.cloud.internal",
    "ü@cloud.internal",
    "spiffe://cloud/bücher",
    "fe80::1%eth0",
    "1.2.3.4.5",
    "\x00",
    "\ud800",
    "svc\ninjected log line",
    "*.cloud.internal",
    "a@b@c",
    "Name <a@b.c>",
]
NAMES = st.one_of(
    st.text(max_size=40),
    st.text(min_size=60, max_size=200),
    st.ip_addresses().map(str),
    st.from_regex(r"\A[0-9a-f.:%]{1,40}\Z"),
    st.builds(
        lambda scheme, rest: f"{scheme}:{rest}",
        st.from_regex(r"\A[A-Za-z][A-Za-z0-9+.\-]{0,8}\Z"),
        st.text(max_size=40),
    ),
    st.builds(lambda user, host: f"{user}@{host}", st.text(max_size=20), st.text(max_size=20)),
    st.sampled_from(ODD_NAMES),
)


async def test_sign_with_validly_signed_arbitrary_names(
    ca: CAServer, fuzzer: Fuzzer, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens signed by the real provisioner key with any ``sub`` and ``sans`` get 201, or
    403 with the token left unspent; never a 5xx, never an error in the CA's log."""
    caplog.set_level(logging.WARNING)
    store = _store(ca)

    @fuzz_settings(300)
    @given(subject=NAMES.filter(bool), sans=st.none() | st.lists(NAMES, max_size=4))
    def run(subject: str, sans: list[str] | None) -> None:
        before = store.counts()
        ott = fuzzer.pki.forge(fuzzer.pki.claims(subject, sans=sans))
        response = fuzzer.http.post("/1.0/sign", json={"csr": NAMELESS_CSR, "ott": ott})
        after = store.counts()
        if response.status_code == 201:
            assert after["certificates"] == before["certificates"] + 1
            return
        fuzzer.check(response)
        assert response.status_code == 403, response.text
        assert after == before  # refused before the token is spent

    await _in_thread(run)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


UNCERTIFIABLE = {
    "sub of 65 characters": ("a" * 65, ["svc.cloud.internal"], "at most 64"),
    "sub of 33 two-byte characters": ("ü" * 33, ["svc.cloud.internal"], "at most 64"),
    "U-label DNS name": ("svc", ["bücher.cloud.internal"], "xn--"),
    "U-label email": ("svc", ["ü@cloud.internal"], "ASCII"),
    "U-label URI": ("svc", ["spiffe://cloud/bücher"], "ASCII"),
    "U-label sub as the only name": ("bücher.cloud.internal", None, "xn--"),
    "control character in sub": ("svc\ninjected", ["svc.cloud.internal"], "control"),
    "control character in a DNS name": ("svc", ["svc\x00.cloud.internal"], "control"),
    "empty name": ("svc", ["svc.cloud.internal", ""], "empty"),
    "malformed email": ("svc", ["Name <a@b.c>"], "email"),
}


@pytest.mark.parametrize("case", UNCERTIFIABLE.values(), ids=list(UNCERTIFIABLE))
async def test_uncertifiable_names_get_403_and_spend_nothing(
    ca: CAServer,
    fuzzer: Fuzzer,
    pki: PKI,
    caplog: pytest.LogCaptureFixture,
    case: tuple[str, list[str] | None, str],
) -> None:
    """A validly signed token whose names cannot go into a certificate gets 403 naming the
    reason, in the body and the log, and stays unspent (sent again, 403 again)."""
    subject, sans, reason = case
    caplog.set_level(logging.WARNING)
    ott = pki.forge(pki.claims(subject, sans=sans))

    def run() -> None:
        for _ in range(2):
            response = fuzzer.http.post("/1.0/sign", json={"csr": NAMELESS_CSR, "ott": ott})
            fuzzer.check(response)
            assert response.status_code == 403, response.text
            assert reason in response.json()["message"]

    await _in_thread(run)
    assert _store(ca).counts() == {"used_tokens": 0, "certificates": 0, "revocations": 0}
    refusals = [r.getMessage() for r in caplog.records if "403" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert reason in refusals[0], refusals
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


CERTIFIABLE = {
    "sub of 64 characters": ("a" * 64, ["svc.cloud.internal"]),
    "sub of 32 two-byte characters": ("ü" * 32, ["svc.cloud.internal"]),
    "A-label DNS name": ("svc", ["xn--bcher-kva.cloud.internal"]),
    "ASCII email, URI and IP": ("svc", ["a@cloud.internal", "spiffe://cloud/svc", "::1"]),
    "A-label sub as the only name": ("xn--bcher-kva.cloud.internal", None),
}


@pytest.mark.parametrize("case", CERTIFIABLE.values(), ids=list(CERTIFIABLE))
async def test_certifiable_names_at_the_limits_are_issued(
    ca: CAServer, fuzzer: Fuzzer, pki: PKI, case: tuple[str, list[str] | None]
) -> None:
    """Twin: names just inside the limits (64 bytes, A-labels, ASCII) are issued (201) as
    the token asks."""
    subject, sans = case
    ott = pki.forge(pki.claims(subject, sans=sans))

    def run() -> None:
        response = fuzzer.http.post("/1.0/sign", json={"csr": NAMELESS_CSR, "ott": ott})
        assert response.status_code == 201, response.text
        leaf = x509.load_pem_x509_certificate(response.json()["crt"].encode())
        assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == subject
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(map(str, (n.value for n in names))) == sorted(sans or [subject])

    await _in_thread(run)
    assert _store(ca).counts()["used_tokens"] == 1


async def test_revoke_with_validly_signed_arbitrary_serials(
    ca: CAServer, fuzzer: Fuzzer, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """Revoke tokens signed by the real provisioner key for any serial text (the same in the
    body) get a 4xx, never a 5xx, and revoke nothing."""
    caplog.set_level(logging.WARNING)
    serials = NAMES | st.sampled_from(["\ud800", "1\ud800", "\uff11\uff12", "\u00b2", "007"])

    @fuzz_settings(200)
    @given(serial=serials.filter(bool))
    def run(serial: str) -> None:
        ott = pki.forge(pki.claims(serial, aud=revoke_audience(pki.url)))
        body = {"serial": serial, "ott": ott, "passive": True}
        fuzzer.check(fuzzer.http.post("/1.0/revoke", content=json.dumps(body).encode()))

    await _in_thread(run)
    assert _store(ca).counts()["revocations"] == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


async def test_revoke_reason_with_a_lone_surrogate_is_recorded(
    ca: CAServer, fuzzer: Fuzzer, pki: PKI
) -> None:
    """A revocation whose reason holds an escaped lone surrogate is recorded with U+FFFD in
    its place, as step-ca's Go decoder reads it (it was a 500)."""
    chain, _ = await pki.enroll(SUBJECT)
    serial = str(chain[0].serial_number)
    body = {"serial": serial, "ott": pki.token(serial, revoke=True), "passive": True}
    content = json.dumps({**body, "reason": "key lost \ud800"}).encode()
    assert b"\\ud800" in content

    def run() -> None:
        response = fuzzer.http.post("/1.0/revoke", content=content)
        assert response.status_code == 200, response.text

    await _in_thread(run)
    assert _store(ca).counts()["revocations"] == 1
    assert _store(ca).is_revoked(serial)
