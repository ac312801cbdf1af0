"""The pure modules (_duration, _token, _jwk, _protocol, _x509) without any network.

Expected values for Go behaviour (durations, SAN splitting) were taken from Go 1.19 itself:
``time.ParseDuration`` / ``Duration.String`` and the ``net.ParseIP`` + ``url.Parse`` rule of
step's ``x509util.SplitSANs``. Hypothesis checks that hostile input only ever raises the
module's own error type.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import string
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import ECKey

from federatls._client import _base_url
from federatls._duration import format_go_duration, parse_go_duration
from federatls._errors import BadMaterialError, TokenError
from federatls._jwk import ProvisionerKey, PublicJWK, jwk_thumbprint
from federatls._keys import build_csr, new_private_key
from federatls._protocol import (
    MAX_BODY_BYTES,
    ErrorBody,
    ProtocolError,
    RekeyRequest,
    RevokeRequest,
    SignRequest,
    SignResponse,
)
from federatls._token import (
    LEEWAY,
    MAX_VALIDITY,
    MIN_VALIDITY,
    Token,
    mint_renew_token,
    mint_token,
    renew_audience,
    sign_audience,
)
from federatls._x509 import split_sans

FAST = settings(max_examples=150, deadline=None, database=None)
NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
CA_URL = "https://127.0.0.1:1443"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a compact JWS, decoded by hand (not through joserfc)."""
    header, payload, _ = token.split(".")
    return json.loads(_unb64(header)), json.loads(_unb64(payload))


# JSON values as any peer may send them. Integers stay within 64 bits and nesting stays
# shallow; larger integers and deep nesting have tests of their own.
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
TIMEISH = st.text(alphabet="0123456789.hmsuµnT:-+Z ", max_size=30)


# _duration --------------------------------------------------------------------------------
GO_PARSE = [
    ("5m", timedelta(minutes=5), "5m0s"),
    ("24h1m0s", timedelta(hours=24, minutes=1), "24h1m0s"),
    ("1.5h", timedelta(hours=1, minutes=30), "1h30m0s"),
    ("300ms", timedelta(milliseconds=300), "300ms"),
    ("-5m", timedelta(minutes=-5), "-5m0s"),
    ("0", timedelta(0), "0s"),
    ("1h30m", timedelta(hours=1, minutes=30), "1h30m0s"),
    ("+5m", timedelta(minutes=5), "5m0s"),
    ("-0", timedelta(0), "0s"),
    (".5s", timedelta(milliseconds=500), "500ms"),
    ("1.s", timedelta(seconds=1), "1s"),
    ("1us", timedelta(microseconds=1), "1µs"),
    ("1µs", timedelta(microseconds=1), "1µs"),
    ("1500us", timedelta(microseconds=1500), "1.5ms"),
    ("1.5s", timedelta(seconds=1.5), "1.5s"),
    ("90s", timedelta(seconds=90), "1m30s"),
]


@pytest.mark.parametrize(("text", "value", "go_string"), GO_PARSE)
def test_go_durations_parse_and_format_like_go(text: str, value: timedelta, go_string: str) -> None:
    """Each string parses to Go's value and formats back as Go's Duration.String()."""
    assert parse_go_duration(text) == value
    assert format_go_duration(value) == go_string


@pytest.mark.parametrize(
    "text",
    ["", "5", "00", "0.5", "-", "+", "m", "1d", "1e3s", ".s", "1..2s", " 5m", "5m ", "--5m",
     "5 m", "9223372036854775808ns", "1h-5m", "\u0661h", "\uff11h", "1.\u0665s"],
)  # fmt: skip
def test_invalid_go_durations_raise_value_error(text: str) -> None:
    """Strings Go's time.ParseDuration refuses raise ValueError quoting the text."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)


def test_non_string_duration_raises_value_error() -> None:
    """A non-string is refused with ValueError, not TypeError."""
    with pytest.raises(ValueError, match="must be a string"):
        parse_go_duration(5)  # type: ignore[arg-type]


TEN_YEARS = timedelta(days=3653)


@FAST
@given(st.timedeltas(min_value=-TEN_YEARS, max_value=TEN_YEARS))
def test_duration_format_parse_round_trip(value: timedelta) -> None:
    """format(parse(format(td))) == format(td), and parse(format(td)) == td, to the µs."""
    text = format_go_duration(value)
    assert parse_go_duration(text) == value
    assert format_go_duration(parse_go_duration(text)) == text


@FAST
@given(st.text(max_size=30) | TIMEISH)
def test_duration_parser_raises_only_value_error(text: str) -> None:
    """Any text either parses to a timedelta or raises ValueError."""
    try:
        value = parse_go_duration(text)
    except ValueError:
        return
    assert isinstance(value, timedelta)


# _token -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key() -> ProvisionerKey:
    return ProvisionerKey.generate()


@pytest.fixture(scope="module")
def issued() -> Any:
    """A real leaf + intermediate chain from trustme (its leaf key included)."""
    root = trustme.CA()
    return root.create_child_ca().issue_cert("svc.cloud.internal")


@pytest.fixture(scope="module")
def chain_pems(issued: Any) -> list[str]:
    """The leaf + intermediate PEMs, as step's certChain carries them."""
    return [cast(bytes, blob.bytes()).decode() for blob in issued.cert_chain_pems]


@pytest.fixture(scope="module")
def leaf_key(issued: Any) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)


def _mint(key: ProvisionerKey, **kwargs: Any) -> str:
    args: dict[str, Any] = {
        "issuer": "admin",
        "subject": "svc.cloud.internal",
        "audience": sign_audience(CA_URL),
        "now": NOW,
    }
    args.update(kwargs)
    return mint_token(key, **args)


def _sign_claims(key: ProvisionerKey, claims: dict[str, Any]) -> str:
    header = {"alg": "ES256", "kid": key.kid, "typ": "JWT"}
    return jws.serialize_compact(header, json.dumps(claims), key.key, algorithms=["ES256"])


def test_mint_token_has_exactly_steps_claims_and_header(key: ProvisionerKey) -> None:
    """mint_token emits step ca token's header and claim set: string aud, 5 min, 256-bit jti."""
    sha = "AB" * 32
    token = _mint(key, sans=["svc.cloud.internal", "127.0.0.1"], root_fingerprint=sha)
    header, claims = _segments(token)
    assert header == {"alg": "ES256", "kid": key.kid, "typ": "JWT"}
    iat = int(NOW.timestamp())
    jti = claims.pop("jti")
    assert claims == {
        "aud": "https://127.0.0.1:1443/1.0/sign",
        "exp": iat + 300,
        "iat": iat,
        "iss": "admin",
        "nbf": iat,
        "sans": ["svc.cloud.internal", "127.0.0.1"],
        "sha": sha.lower(),
        "sub": "svc.cloud.internal",
    }
    assert len(jti) == 64
    assert set(jti) <= set(string.hexdigits.lower())


def test_mint_token_defaults_sans_to_subject_and_omits_sha(key: ProvisionerKey) -> None:
    """Without sans and root the token carries sans=[sub] and no sha (twin of the above)."""
    _, claims = _segments(_mint(key))
    assert claims["sans"] == ["svc.cloud.internal"]
    assert "sha" not in claims
    assert _segments(_mint(key))[1]["jti"] != claims["jti"]


@pytest.mark.parametrize(
    "validity", [MIN_VALIDITY - timedelta(seconds=1), MAX_VALIDITY + timedelta(seconds=1)]
)
def test_mint_refuses_validity_outside_step_bounds(
    key: ProvisionerKey, validity: timedelta
) -> None:
    """step allows token validities of 10 s to 1 h only; outside that mint raises TokenError."""
    with pytest.raises(TokenError, match="validity"):
        _mint(key, validity=validity)


@pytest.mark.parametrize("validity", [MIN_VALIDITY, MAX_VALIDITY])
def test_mint_accepts_validity_bounds(key: ProvisionerKey, validity: timedelta) -> None:
    """The bounds themselves are allowed (twin of the refusal)."""
    _, claims = _segments(_mint(key, validity=validity))
    assert claims["exp"] - claims["iat"] == validity.total_seconds()


def test_verify_with_the_right_key_passes(key: ProvisionerKey) -> None:
    """A minted token parses, and its signature verifies with the provisioner's public key."""
    token = Token.parse(_mint(key))
    token.verify(key.public)
    assert token.kid == key.kid
    assert token.subject == "svc.cloud.internal"
    assert token.ca_url() == CA_URL


def test_verify_with_another_key_raises_token_error(key: ProvisionerKey) -> None:
    """The same token verified with any other key raises TokenError."""
    token = Token.parse(_mint(key))
    with pytest.raises(TokenError, match="does not verify"):
        token.verify(ProvisionerKey.generate().public)


def _at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def test_check_times_exp_leeway(key: ProvisionerKey) -> None:
    """exp + 59 s is inside the one-minute leeway; exp + 61 s is refused."""
    token = Token.parse(_mint(key))  # iat = nbf = NOW, exp = NOW + 300
    token.check_times(_at(300 + 59))
    with pytest.raises(TokenError, match="expired"):
        token.check_times(_at(300 + 61))
    assert timedelta(minutes=1) == LEEWAY


def test_check_times_nbf_leeway(key: ProvisionerKey) -> None:
    """nbf - 59 s is accepted, nbf - 61 s is refused as not valid yet."""
    start = int(NOW.timestamp())
    token = Token.parse(_sign_claims(key, {"nbf": start, "exp": start + 300, "sub": "x"}))
    token.check_times(_at(-59))
    with pytest.raises(TokenError, match="not valid yet"):
        token.check_times(_at(-61))


def test_check_times_iat_in_the_future(key: ProvisionerKey) -> None:
    """iat more than the leeway in the future is refused; within the leeway it is accepted."""
    start = int(NOW.timestamp())
    token = Token.parse(_sign_claims(key, {"iat": start, "exp": start + 300, "sub": "x"}))
    token.check_times(_at(-59))
    with pytest.raises(TokenError, match="future"):
        token.check_times(_at(-61))


def test_token_without_exp_is_refused(key: ProvisionerKey) -> None:
    """A token without exp fails check_times at any time, even with valid iat and nbf."""
    start = int(NOW.timestamp())
    token = Token.parse(_sign_claims(key, {"iat": start, "nbf": start, "sub": "x"}))
    with pytest.raises(TokenError, match="no expiry"):
        token.check_times(NOW)


def _exercise(token: Token) -> None:
    """Every typed view of a parsed token works or raises TokenError."""
    _ = (token.issuer, token.subject, token.audience, token.token_id, token.sans)
    _ = (token.root_fingerprint, token.kid, token.alg)
    _ = (token.issued_at, token.expires_at, token.not_before)
    for call in (token.ca_url, lambda: token.check_times(NOW)):
        with contextlib.suppress(TokenError):
            call()


def _parse_only_token_error(raw: str) -> None:
    try:
        token = Token.parse(raw)
    except TokenError:
        return
    _exercise(token)


@FAST
@given(st.text(max_size=200))
def test_token_parse_of_random_text_raises_only_token_error(raw: str) -> None:
    """Token.parse of arbitrary text raises TokenError or gives a usable token."""
    _parse_only_token_error(raw)


@FAST
@given(st.lists(st.binary(max_size=80), min_size=3, max_size=3))
def test_token_parse_of_random_base64_parts_raises_only_token_error(parts: list[bytes]) -> None:
    """Three random base64url parts raise TokenError (or parse), never anything else."""
    _parse_only_token_error(".".join(_b64(p) for p in parts))


CLAIM_NAMES = st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sans", "sha"])


@FAST
@given(
    header=st.fixed_dictionaries(
        {"alg": JSON_VALUES}, optional={"kid": JSON_VALUES, "typ": JSON_VALUES}
    ),
    payload=JSON_VALUES | st.dictionaries(CLAIM_NAMES, JSON_VALUES),
    signature=st.binary(max_size=64),
)
def test_token_parse_of_random_json_raises_only_token_error(
    header: dict[str, Any], payload: Any, signature: bytes
) -> None:
    """Random JSON in the header and payload raises TokenError or gives a usable token."""
    raw = ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature)]
    )
    _parse_only_token_error(raw)


def test_token_parse_of_huge_integer_time_claim_raises_token_error() -> None:
    """A time claim that is an integer too large for a float is refused with TokenError."""
    header = _b64(json.dumps({"alg": "ES256"}).encode())
    payload = _b64(b'{"exp": 1' + b"0" * 400 + b"}")
    with pytest.raises(TokenError):
        Token.parse(f"{header}.{payload}.{_b64(b'sig')}")


def test_token_parse_of_deeply_nested_payload_raises_token_error() -> None:
    """A payload of 3000 nested arrays (well under the 16 KiB token limit) is a TokenError."""
    header = _b64(json.dumps({"alg": "ES256"}).encode())
    payload = _b64(b"[" * 3000 + b"]" * 3000)
    with pytest.raises(TokenError):
        Token.parse(f"{header}.{payload}.{_b64(b'sig')}")


def test_token_parse_of_a_renew_token(chain_pems: list[str], leaf_key: PrivateKeyTypes) -> None:
    """A renew token minted by mint_renew_token for a real leaf + intermediate parses and
    verifies with the leaf's key."""
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in chain_pems]
    raw = mint_renew_token(chain, leaf_key, audience=renew_audience(CA_URL), now=NOW)
    header, claims = _segments(raw)
    assert len(header["x5cInsecure"]) == 2
    assert claims["iss"] == "step-ca-client/1.0"
    token = Token.parse(raw)
    token.verify_with_certificate(chain[0])
    assert token.subject == claims["sub"]


# _jwk -------------------------------------------------------------------------------------
PASSWORD = b"correct horse battery staple"


@pytest.fixture(scope="module")
def encrypted(key: ProvisionerKey) -> str:
    return key.encrypt(PASSWORD)


def test_provisioner_key_round_trip(key: ProvisionerKey, encrypted: str) -> None:
    """encrypt then decrypt with the password gives back the same private key and kid."""
    header = json.loads(_unb64(encrypted.split(".")[0]))
    assert header["alg"] == "PBES2-HS256+A128KW"
    assert header["enc"] == "A256GCM"
    assert header["cty"] == "jwk+json"
    assert header["p2c"] == 100_000
    back = ProvisionerKey.decrypt(encrypted, PASSWORD)
    assert back.kid == key.kid
    assert back.alg == "ES256"
    material = ("kty", "crv", "x", "y", "d")
    mine, theirs = key.key.as_dict(private=True), back.key.as_dict(private=True)
    assert {k: theirs[k] for k in material} == {k: mine[k] for k in material}


def test_provisioner_key_wrong_password(encrypted: str) -> None:
    """The wrong password raises BadMaterialError."""
    with pytest.raises(BadMaterialError, match="wrong password"):
        ProvisionerKey.decrypt(encrypted, b"wrong horse battery staple")


@pytest.mark.parametrize("part", [1, 3, 4], ids=["wrapped-key", "ciphertext", "tag"])
def test_provisioner_key_tampered(encrypted: str, part: int) -> None:
    """Changing one byte of the wrapped key, ciphertext or tag raises BadMaterialError."""
    parts = encrypted.split(".")
    raw = bytearray(_unb64(parts[part]))
    raw[len(raw) // 2] ^= 0x01
    parts[part] = _b64(bytes(raw))
    with pytest.raises(BadMaterialError):
        ProvisionerKey.decrypt(".".join(parts), PASSWORD)


def test_kid_is_the_rfc7638_thumbprint(key: ProvisionerKey) -> None:
    """kid equals joserfc's thumbprint and the RFC 7638 SHA-256 computed by hand."""
    public = key.public.as_dict()
    assert key.kid == ECKey.import_key(public).thumbprint()
    assert key.kid == jwk_thumbprint(public)
    members = {k: public[k] for k in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    assert key.kid == _b64(hashlib.sha256(canonical).digest())


def test_public_jwk_from_dict_accepts_a_public_key(key: ProvisionerKey) -> None:
    """A public JWK as in ca.json is accepted with its kid and alg (twin of the refusals)."""
    public = PublicJWK.from_dict(key.public.as_dict())
    assert (public.kid, public.alg) == (key.kid, "ES256")


def test_public_jwk_from_dict_rejects_private_key(key: ProvisionerKey) -> None:
    """A JWK that holds the private part 'd' is refused where a public key belongs."""
    with pytest.raises(BadMaterialError, match="private"):
        PublicJWK.from_dict(key.key.as_dict(private=True))


@pytest.mark.parametrize("kty", ["oct", "XYZ", None])
def test_public_jwk_from_dict_rejects_unknown_kty(key: ProvisionerKey, kty: str | None) -> None:
    """A JWK whose kty is not EC, RSA or OKP is refused."""
    data = {**key.public.as_dict(), "kty": kty}
    with pytest.raises(BadMaterialError, match="key type"):
        PublicJWK.from_dict(data)


# _protocol --------------------------------------------------------------------------------
def _csr_pem(tamper: bool = False) -> str:
    csr = build_csr(new_private_key(), "svc.cloud.internal", ["svc.cloud.internal"])
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    if tamper:
        der[-5] ^= 0x01  # inside the signature value
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


GOOD_CSR = _csr_pem()


def test_sign_request_parses_a_good_body() -> None:
    """A step-shaped body parses, with the CSR, token and time bounds (twin of the refusals)."""
    body = json.dumps({"csr": GOOD_CSR, "ott": "a.b.c", "notAfter": "1h", "notBefore": ""})
    request = SignRequest.parse(body)
    assert request.ott == "a.b.c"
    assert request.not_after is not None
    assert request.not_after.relative == timedelta(hours=1)
    assert request.not_before is None
    assert request.to_json()["csr"] == GOOD_CSR


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"ott": "a.b.c"}, "missing csr"),
        ({"csr": None, "ott": "a.b.c"}, "missing csr"),
        ({"csr": _csr_pem(tamper=True), "ott": "a.b.c"}, "invalid csr"),
        ({"csr": GOOD_CSR}, "missing ott"),
        ({"csr": GOOD_CSR, "ott": ""}, "missing ott"),
        ({"csr": "not a pem", "ott": "a.b.c"}, "error reading request body"),
        ({"csr": 5, "ott": "a.b.c"}, "error reading request body"),
        ({"csr": GOOD_CSR, "ott": ["a.b.c"]}, "error reading request body"),
        ({"csr": GOOD_CSR, "ott": "a.b.c", "notAfter": 3600}, "error reading request body"),
        ({"csr": GOOD_CSR, "ott": "a.b.c", "notBefore": "soon"}, "error reading request body"),
        ([GOOD_CSR, "a.b.c"], "error reading request body"),
        ("not json {", "error reading request body"),
    ],
    ids=[
        "no-csr", "null-csr", "csr-bad-signature", "no-ott", "empty-ott", "csr-not-pem",
        "csr-number", "ott-list", "notAfter-number", "notBefore-word", "json-array", "not-json",
    ],
)  # fmt: skip
def test_sign_request_refusals(body: Any, reason: str) -> None:
    """Each defective /sign body raises ProtocolError with step-ca's 400 reason."""
    raw = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(ProtocolError) as refused:
        SignRequest.parse(raw)
    assert (refused.value.status, refused.value.reason) == (400, reason)


def _broken_csr(where: str) -> str:
    """A good P-256 CSR with one byte changed: its version, its key type OID, or its EC point
    (then off the curve)."""
    key = new_private_key()
    der = bytearray(build_csr(key, "svc", ["svc"]).public_bytes(serialization.Encoding.DER))
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    at = {
        "version": der.index(b"\x02\x01\x00") + 2,
        "key-type": der.index(b"\x2a\x86\x48\xce\x3d\x02\x01") + 6,
        "point": der.index(point) + 10,
    }[where]
    der[at] ^= 0x02
    return _pem("CERTIFICATE REQUEST", bytes(der))


def _pem(label: str, der: bytes) -> str:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


@pytest.mark.parametrize("where", ["version", "key-type", "point"])
def test_sign_request_with_damaged_csr_is_protocol_error(where: str) -> None:
    """A CSR damaged in its version or public key is a 400 ProtocolError like any bad CSR."""
    with pytest.raises(ProtocolError) as refused:
        SignRequest.parse(json.dumps({"csr": _broken_csr(where), "ott": "a.b.c"}))
    assert refused.value.status == 400


def test_rekey_request_parses_and_refuses() -> None:
    """A rekey body with a CSR parses; one without a CSR is 400 missing csr."""
    assert RekeyRequest.parse(json.dumps({"csr": GOOD_CSR})).to_json() == {"csr": GOOD_CSR}
    with pytest.raises(ProtocolError, match="missing csr"):
        RekeyRequest.parse(b"{}")


def test_revoke_request_parses_a_good_body() -> None:
    """A passive revoke with a reason code in 0..10 parses (twin of the refusals)."""
    body = {"serial": "123", "ott": "a.b.c", "reasonCode": 10, "reason": "r", "passive": True}
    request = RevokeRequest.parse(json.dumps(body))
    assert request == RevokeRequest("123", "a.b.c", 10, "r", True)
    assert RevokeRequest.parse(json.dumps(request.to_json())) == request


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"serial": "1", "reasonCode": 11, "passive": True}, 400, "reasonCode out of bounds"),
        ({"serial": "1", "reasonCode": -1, "passive": True}, 400, "reasonCode out of bounds"),
        ({"serial": "1", "passive": False}, 501, "non-passive revocation not implemented"),
        ({"serial": "1"}, 501, "non-passive revocation not implemented"),
        ({"passive": True}, 400, "missing serial"),
        ({"serial": 1, "passive": True}, 400, "error reading request body"),
        ({"serial": "1", "reasonCode": "1", "passive": True}, 400, "error reading request body"),
        ({"serial": "1", "reasonCode": 1.5, "passive": True}, 400, "error reading request body"),
        ({"serial": "1", "reasonCode": True, "passive": True}, 400, "error reading request body"),
        ({"serial": "1", "passive": "yes"}, 400, "error reading request body"),
    ],
    ids=[
        "code-11", "code-minus-1", "passive-false", "passive-absent", "no-serial",
        "serial-number", "code-string", "code-float", "code-bool", "passive-string",
    ],
)  # fmt: skip
def test_revoke_request_refusals(body: dict[str, Any], status: int, reason: str) -> None:
    """Each defective /revoke body raises ProtocolError with step-ca's status and reason."""
    with pytest.raises(ProtocolError) as refused:
        RevokeRequest.parse(json.dumps(body))
    assert (refused.value.status, refused.value.reason) == (status, reason)


def test_sign_response_round_trip(chain_pems: list[str]) -> None:
    """A step-shaped answer parses to the chain, and to_json gives the same fields back."""
    tls = {"minVersion": 1.2, "maxVersion": 1.3}
    body = {"crt": chain_pems[0], "ca": chain_pems[1], "certChain": chain_pems, "tlsOptions": tls}
    parsed = SignResponse.parse(body)
    assert [c.public_bytes(serialization.Encoding.PEM).decode() for c in parsed.chain] == chain_pems
    assert parsed.to_json() == body
    assert SignResponse.parse(parsed.to_json()) == parsed
    legacy = SignResponse.parse({"crt": chain_pems[0], "ca": chain_pems[1]})
    assert legacy.chain == parsed.chain


def test_sign_response_rejects_chain_not_starting_with_crt(chain_pems: list[str]) -> None:
    """A certChain whose first element is not crt is refused with BadMaterialError."""
    body = {"crt": chain_pems[0], "certChain": [chain_pems[1], chain_pems[0]]}
    with pytest.raises(BadMaterialError, match="does not start with crt"):
        SignResponse.parse(body)
    with pytest.raises(BadMaterialError, match="crt"):
        SignResponse.parse({"certChain": chain_pems})


def test_sign_response_with_invalid_certificate_version(chain_pems: list[str]) -> None:
    """A crt whose X.509 version is invalid is refused with BadMaterialError."""
    der = bytearray(
        x509.load_pem_x509_certificate(chain_pems[0].encode()).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[der.index(b"\xa0\x03\x02\x01\x02") + 4] = 0x05
    with pytest.raises(BadMaterialError):
        SignResponse.parse({"crt": _pem("CERTIFICATE", bytes(der))})


def test_error_body_parses_steps_error() -> None:
    """step's JSON error body gives its message (twin of the tolerant cases)."""
    body = json.dumps({"status": 401, "message": "nope"}).encode()
    assert ErrorBody.parse(401, body).message == "nope"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>502 Bad Gateway</html>", "<html>502 Bad Gateway</html>"),
        (b"", "HTTP 502 with an empty body"),
        (b"\xff\xfe broken", "\ufffd\ufffd broken"),
        (b"[1, 2]", "[1, 2]"),
        (b'{"message": 5}', '{"message": 5}'),
    ],
)
def test_error_body_is_tolerant(body: bytes, message: str) -> None:
    """Whatever a CA or proxy answers, ErrorBody.parse gives a message and never raises."""
    parsed = ErrorBody.parse(502, body)
    assert (parsed.status, parsed.message) == (502, message)


def test_error_body_of_deeply_nested_json() -> None:
    """A hostile error body of 5000 nested arrays still gives a message."""
    assert ErrorBody.parse(502, b"[" * 5000 + b"]" * 5000).status == 502


@pytest.mark.parametrize("parse", [SignRequest.parse, RevokeRequest.parse, RekeyRequest.parse])
def test_request_of_deeply_nested_json_is_protocol_error(parse: Any) -> None:
    """A 6 KiB body of nested arrays (far below the 64 KiB limit) is a 400 ProtocolError."""
    body = b"[" * 3000 + b"]" * 3000
    assert len(body) < MAX_BODY_BYTES
    with pytest.raises(ProtocolError):
        parse(body)


PARSERS = [SignRequest.parse, RevokeRequest.parse, RekeyRequest.parse]
SIGN_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "csr": JSON_VALUES | st.just(GOOD_CSR) | st.just(_csr_pem(tamper=True)),
        "ott": JSON_VALUES,
        "notBefore": JSON_VALUES | TIMEISH,
        "notAfter": JSON_VALUES | TIMEISH,
        "templateData": JSON_VALUES,
    },
)
REVOKE_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "serial": JSON_VALUES,
        "ott": JSON_VALUES,
        "reasonCode": JSON_VALUES,
        "reason": JSON_VALUES,
        "passive": JSON_VALUES,
    },
)


def _parse_only_protocol_error(body: bytes) -> None:
    for parse in PARSERS:
        status = 0
        try:
            parse(body)
        except ProtocolError as exc:
            status = exc.status
        assert status in (0, 400, 501)


@FAST
@given(JSON_VALUES | SIGN_FIELDS | REVOKE_FIELDS)
def test_request_parsers_on_random_json_raise_only_protocol_error(value: Any) -> None:
    """Any JSON value given to the sign, revoke and rekey parsers raises only ProtocolError."""
    _parse_only_protocol_error(json.dumps(value).encode())


@FAST
@given(st.binary(max_size=300))
def test_request_parsers_on_random_bytes_raise_only_protocol_error(body: bytes) -> None:
    """Arbitrary bytes given to the request parsers raise only ProtocolError."""
    _parse_only_protocol_error(body)


# _x509 ------------------------------------------------------------------------------------
SPLIT = [
    ("127.0.0.1", "ips"),
    ("::1", "ips"),
    ("::ffff:1.2.3.4", "ips"),
    ("spiffe://cloud/ns/svc", "uris"),
    ("mailto:a@b", "uris"),
    ("urn:x", "uris"),
    ("A:b", "uris"),
    ("host:80", "uris"),
    ("a@b.c", "emails"),
    ("user@host:80", "emails"),
    ("svc.cloud.internal", "dns"),
    ("*.cloud.internal", "dns"),
    ("1host:80", "dns"),
    ("1.2.3.4:80", "dns"),
    ("a b:c", "dns"),
    ("a%zz:b", "dns"),
]


@pytest.mark.parametrize(("san", "kind"), SPLIT)
def test_split_sans_follows_steps_rule(san: str, kind: str) -> None:
    """IP first, then anything with a URI scheme, then anything with @, else DNS (Go's answer)."""
    sans = split_sans([san])
    got = {k for k in ("dns", "ips", "emails", "uris") if getattr(sans, k)}
    assert got == {kind}


def test_split_sans_zoned_ipv6_is_a_uri_like_step() -> None:
    """step-ca (Go 1.19) classifies 'fe80::1%eth0' as a URI SAN, not an IP."""
    assert split_sans(["fe80::1%eth0"]).uris == ("fe80::1%eth0",)


@FAST
@given(st.lists(st.text(max_size=20), max_size=6))
def test_split_sans_of_a_list_is_the_split_of_each_name(sans: list[str]) -> None:
    """Splitting a list equals splitting each name alone and concatenating, bucket by bucket."""
    split = split_sans(sans)
    singles = [split_sans([s]) for s in sans]
    for bucket in ("dns", "ips", "emails", "uris"):
        assert getattr(split, bucket) == tuple(n for one in singles for n in getattr(one, bucket))
    assert sum(len(one.as_strings()) for one in singles) == len(sans)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://127.0.0.1:99999", "invalid port"),
        ("https://127.0.0.1:-1", "invalid port"),
        ("https://[::1", "is not a URL"),
        ("https://:9000", "has no host"),
        ("http://127.0.0.1:9000", "must be an https:// URL"),
    ],
)
def test_a_ca_url_that_cannot_be_reached_is_bad_material(url: str, problem: str) -> None:
    """A CA URL with a port out of range, no host, or unparsable: BadMaterialError naming it
    when the client is made, not an OverflowError or ValueError from the socket later."""
    with pytest.raises(BadMaterialError, match=problem):
        _base_url(url)


@pytest.mark.parametrize("url", ["https://127.0.0.1:9000", "https://[::1]:443/x", "https://ca"])
def test_a_good_ca_url_gives_its_base(url: str) -> None:
    """Twin: an https:// URL with a host (and a port, if any, in range) gives its base."""
    assert _base_url(url) == url.removesuffix("/x")
