"""The token and revocation rules step-ca added after 0.19, on the federatls CA.

A token may bind one certificate request (``cnf``, 0.27.3); a CSR's common name may be the
token's subject or any of its names (0.25.1); a revoke request's serial is read with base
prefixes and normalised to decimal (0.22); a revoke token's subject must be that decimal serial
and an mTLS revocation must name the client's own serial (0.29). Where the real step-ca 0.19
answers otherwise, ``any_ca`` tests pin both answers and say why.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from federatls import CARefusedError, bootstrap_sync
from federatls._errors import TokenError
from federatls._jwk import ProvisionerKey
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import REVOKE_PATH, RevokeRequest, SignRequest, parse_serial
from federatls._token import Token, csr_fingerprint, mint_token, sign_audience
from federatls._x509 import common_name
from federatls.ca import CAServer
from federatls.testing import running_ca

from harness import PKI, federatls

pytestmark = pytest.mark.anyio

SVC = "svc.cloud.internal"
API = "api.cloud.internal"
FORBIDDEN = "The request was forbidden by the certificate authority: "
BAD_REQUEST = "The request could not be completed: "


def _csr(subject: str = SVC, sans: tuple[str, ...] = (SVC,)) -> x509.CertificateSigningRequest:
    return build_csr(new_private_key(), subject, list(sans))


def _bound_token(
    pki: PKI, csr: x509.CertificateSigningRequest | None, subject: str = SVC, **kw: Any
) -> str:
    return mint_token(
        pki.key,
        issuer=pki.provisioner,
        subject=subject,
        audience=sign_audience(pki.url),
        now=pki.clock(),
        root_fingerprint=pki.fingerprint,
        csr=csr,
        **kw,
    )


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return data


def _sha256_b64url(csr: x509.CertificateSigningRequest) -> str:
    digest = hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


async def _sign(pki: PKI, csr: x509.CertificateSigningRequest, token: str) -> x509.Certificate:
    async with pki.client() as client:
        return (await client.sign(SignRequest(csr, token))).leaf


async def _refused(pki: PKI, csr: x509.CertificateSigningRequest, token: str) -> CARefusedError:
    with pytest.raises(CARefusedError) as info:
        await _sign(pki, csr, token)
    return info.value


# cnf: the token's binding to one CSR (pure) -------------------------------------------------
def _minted(csr: x509.CertificateSigningRequest | None) -> str:
    return mint_token(
        ProvisionerKey.generate(),
        issuer="admin",
        subject=SVC,
        audience="https://127.0.0.1:1/1.0/sign",
        now=datetime.now(UTC),
        csr=csr,
    )


def test_minted_cnf_is_the_csrs_sha256() -> None:
    """mint_token(csr=...) puts base64url(SHA-256(CSR DER)) in cnf and Token reads it back.
    Twin: without csr the token has no cnf, binds nothing and confirms any request."""
    csr, other = _csr(), _csr()
    raw = _minted(csr)
    token = Token.parse(raw)
    assert _claims(raw)["cnf"] == {"x5rt#S256": _sha256_b64url(csr)}
    assert token.confirmation == csr_fingerprint(csr) == _sha256_b64url(csr)
    assert token.confirms(csr)
    assert not token.confirms(other)
    unbound = _minted(None)
    assert "cnf" not in _claims(unbound)
    assert Token.parse(unbound).confirmation is None
    assert Token.parse(unbound).confirms(other)


@pytest.mark.parametrize(
    "cnf", ["x", [], {"x5rt#S256": 5}, {"x5rt#S256": None}], ids=["text", "list", "int", "null"]
)
def test_cnf_of_the_wrong_shape_is_a_token_error(pki: PKI, cnf: object) -> None:
    """A cnf that is not an object holding a string is refused when the token is parsed (the
    CA's 401, as Go's decoder fails on it). Twin: an empty cnf object binds nothing."""
    with pytest.raises(TokenError, match="'cnf'"):
        Token.parse(pki.forge(pki.claims(SVC, cnf=cnf)))
    assert Token.parse(pki.forge(pki.claims(SVC, cnf={}))).confirmation is None


_ANY_CSR = build_csr(new_private_key(), SVC, [SVC])


def _unsigned(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'ES256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


@given(st.one_of(st.text(), st.from_regex(r"[A-Za-z0-9_-]{0,50}", fullmatch=True)))
def test_any_cnf_value_confirms_or_is_a_token_error(value: str) -> None:
    """Whatever string cnf holds, checking a CSR against it answers True/False or raises
    TokenError, nothing else; only the request's own fingerprint confirms it. Twin: the
    request's fingerprint itself confirms (test_minted_cnf_is_the_csrs_sha256)."""
    token = Token.parse(_unsigned({"sub": SVC, "cnf": {"x5rt#S256": value}}))
    try:
        confirmed = token.confirms(_ANY_CSR)
    except TokenError:
        return
    unbroken = value.replace("\r", "").replace("\n", "")  # Go's decoder skips line breaks
    assert confirmed == (not value or unbroken == csr_fingerprint(_ANY_CSR))


# cnf against the federatls CA -----------------------------------------------------------------
async def test_token_bound_to_a_csr_signs_that_csr(ca: CAServer, pki: PKI) -> None:
    """A token whose cnf is a CSR's fingerprint buys a certificate for that CSR."""
    csr = _csr()
    leaf = await _sign(pki, csr, _bound_token(pki, csr))
    assert leaf.public_key() == csr.public_key()


async def test_token_bound_to_another_csr_is_403_and_spent(ca: CAServer, pki: PKI) -> None:
    """A token bound to one CSR presented with another gets step-ca's 403 naming the bound
    fingerprint, and is spent as every CSR refusal is (step-ca does the same). Twin: the
    token bound to the CSR it comes with signs (test_token_bound_to_a_csr_signs_that_csr)."""
    bound, other = _csr(), _csr()
    token = _bound_token(pki, bound)
    refused = await _refused(pki, other, token)
    assert refused.status == 403
    assert refused.message == (
        f'{FORBIDDEN}certificate request fingerprint does not match "{csr_fingerprint(bound)}".'
    )
    assert (await _refused(pki, bound, token)).status == 401  # spent


async def test_cnf_that_is_not_base64url_is_403(ca: CAServer, pki: PKI) -> None:
    """A cnf value that does not decode as unpadded base64url: 403 "error decoding
    fingerprint". Twin: the same CSR with a well-formed cnf of its own signs."""
    csr = _csr()
    token = pki.forge(pki.claims(SVC, cnf={"x5rt#S256": _sha256_b64url(csr) + "="}))
    refused = await _refused(pki, csr, token)
    assert (refused.status, refused.message) == (403, f"{FORBIDDEN}error decoding fingerprint.")
    token = pki.forge(pki.claims(SVC, cnf={"x5rt#S256": _sha256_b64url(csr)}))
    assert (await _sign(pki, csr, token)).public_key() == csr.public_key()


async def test_cnf_differs_in_019(any_ca: str, pki: PKI) -> None:
    """differs_in_019: step-ca 0.19 ignores cnf (it came in 0.27.3, PR #1660) and signs
    another CSR; the federatls CA, as today's step-ca, refuses it (403)."""
    token = _bound_token(pki, _csr())
    if any_ca == "step-ca":
        assert common_name((await _sign(pki, _csr(), token)).subject) == SVC
    else:
        assert (await _refused(pki, _csr(), token)).status == 403


# The common name (0.25.1) ---------------------------------------------------------------------
async def test_cn_may_be_any_of_the_tokens_sans(ca: CAServer, pki: PKI) -> None:
    """A CSR whose CN is one of the token's sans (not its sub) is signed; the certificate's
    CN is still the token's subject, as in step-ca."""
    token = pki.token(SVC, sans=[SVC, API])
    leaf = await _sign(pki, _csr(API, (SVC, API)), token)
    assert common_name(leaf.subject) == SVC


async def test_cn_equal_to_neither_sub_nor_a_san_is_403(ca: CAServer, pki: PKI) -> None:
    """Twin of the above: a CN that is neither sub nor a san gets step-ca 0.25.1's 403, which
    lists sub and then every san."""
    refused = await _refused(
        pki, _csr("other.cloud.internal", (SVC, API)), pki.token(SVC, sans=[SVC, API])
    )
    assert refused.status == 403
    assert refused.message == (
        f"{FORBIDDEN}certificate request does not contain the valid common name - got "
        f"other.cloud.internal, want [{SVC} {SVC} {API}]."
    )


async def test_cn_equal_to_a_san_differs_in_019(any_ca: str, pki: PKI) -> None:
    """differs_in_019: step-ca 0.19 wants the CN to be sub (403); 0.25.1 (PR #1609) and the
    federatls CA accept any of the token's sans."""
    token = pki.token(SVC, sans=[SVC, API])
    if any_ca == "step-ca":
        refused = await _refused(pki, _csr(API, (SVC, API)), token)
        assert refused.status == 403
        assert f"got {API}, want {SVC}." in refused.message
    else:
        assert common_name((await _sign(pki, _csr(API, (SVC, API)), token)).subject) == SVC


# Revocation serials (0.22) and subjects (0.29) ------------------------------------------------
GO_SERIALS = [  # each checked against Go's big.Int.SetString(s, 0)
    ("31", "31"),
    ("0x1f", "31"),
    ("0X1F", "31"),
    ("0x_1f", "31"),
    ("037", "31"),
    ("0o37", "31"),
    ("0b11111", "31"),
    ("3_1", "31"),
    ("+31", "31"),
    ("-0x1f", "-31"),
    ("0", "0"),
    ("00", "0"),
    ("-0", "0"),
    ("0x", None),
    ("08", None),
    ("0_", None),
    ("_1", None),
    ("1__2", None),
    ("1_", None),
    ("0x1g", None),
    ("12ab", None),
    (" 31", None),
    ("31 ", None),
    ("--1", None),
    ("+", None),
    ("1e3", None),
    ("0b2", None),
    ("0o8", None),
    ("١٢", None),  # Arabic-Indic digits: Go reads ASCII digits only
]


@pytest.mark.parametrize(("text", "decimal"), GO_SERIALS, ids=[t for t, _ in GO_SERIALS])
def test_serial_is_read_as_go_reads_it(text: str, decimal: str | None) -> None:
    """parse_serial answers what Go's big.Int.SetString(s, 0) does (the table was run
    through Go): a decimal string, or None for what Go refuses."""
    assert parse_serial(text) == decimal


@given(st.integers(min_value=0, max_value=2**160))
def test_every_base_reads_back_the_same_serial(n: int) -> None:
    """Decimal, 0x hex, 0o and bare-0 octal and 0b binary of one serial all normalise to
    its decimal. Twin: the same text with a stray character appended is refused."""
    for text in (str(n), hex(n), oct(n), "0" + oct(n)[2:], bin(n), hex(n).upper()):
        assert parse_serial(text) == str(n)
        assert parse_serial(text + "g") is None


@given(st.text(max_size=300))
def test_any_serial_text_is_decimal_or_refused(text: str) -> None:
    """parse_serial never raises: any text is refused (None) or comes out as a canonical
    decimal. Twin: the Go table above, where valid texts come out."""
    decimal = parse_serial(text)
    assert decimal is None or decimal == str(int(decimal))


def test_serial_longer_than_the_limit_is_refused() -> None:
    """A serial text of more than 256 characters is malformed here (no certificate has
    one). Twin: 256 characters are read."""
    assert parse_serial("1" * 256) == "1" * 256
    assert parse_serial("1" * 257) is None


async def _enrolled_serial(pki: PKI) -> tuple[int, list[x509.Certificate], PrivateKey]:
    chain, key = await pki.enroll(SVC)
    return chain[0].serial_number, chain, key


async def _revoke(pki: PKI, body: dict[str, object]) -> httpx.Response:
    context = ssl.create_default_context(cadata=pki.root_path.read_text())
    async with httpx.AsyncClient(verify=context) as http:
        return await http.post(pki.url + "/1.0" + REVOKE_PATH, json=body)


async def test_revoke_accepts_a_hex_serial(ca: CAServer, pki: PKI) -> None:
    """A 0x serial with a token whose sub is the decimal serial revokes that certificate."""
    serial, _, _ = await _enrolled_serial(pki)
    token = pki.token(str(serial), revoke=True)
    response = await _revoke(pki, {"serial": hex(serial), "ott": token, "passive": True})
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert ca.authority.store.is_revoked(str(serial))


async def test_revoke_token_sub_must_be_the_decimal_serial(ca: CAServer, pki: PKI) -> None:
    """Twin of the above: a token whose sub is the serial as sent (0x...), not its decimal,
    gets step-ca 0.29's 403; nothing is revoked and the token stays unspent."""
    serial, _, _ = await _enrolled_serial(pki)
    token = pki.token(hex(serial), revoke=True)
    response = await _revoke(pki, {"serial": hex(serial), "ott": token, "passive": True})
    assert response.status_code == 403
    assert response.json()["message"] == (
        f'{FORBIDDEN}request serial number "{serial}" and token subject "{hex(serial)}" '
        "do not match."
    )
    assert not ca.authority.store.is_revoked(str(serial))


@pytest.mark.parametrize("bad", ["0x", "12ab", "0x1g", "1_", "08"])
async def test_malformed_serial_is_400(ca: CAServer, pki: PKI, bad: str) -> None:
    """A serial Go cannot read is step-ca 0.22's 400, before the token is looked at (it stays
    unspent). Twin: the same token then revokes with the decimal serial."""
    serial, _, _ = await _enrolled_serial(pki)
    token = pki.token(str(serial), revoke=True)
    response = await _revoke(pki, {"serial": bad, "ott": token, "passive": True})
    assert response.status_code == 400
    assert response.json()["message"] == (
        f"{BAD_REQUEST}'{bad}' is not a valid serial number - use a base 10 representation or "
        "a base 16 representation with '0x' prefix."
    )
    response = await _revoke(pki, {"serial": str(serial), "ott": token, "passive": True})
    assert response.status_code == 200, response.text


async def test_mtls_revoke_of_own_serial_in_hex(ca: CAServer, pki: PKI) -> None:
    """Over mTLS the holder's own serial may be sent in hex: it is compared in decimal.
    Twin: test_mtls_revoke_of_another_serial_is_refused (403)."""
    serial, chain, key = await _enrolled_serial(pki)
    async with pki.client(identity=(chain, key)) as client:
        await client.revoke(RevokeRequest(hex(serial)))
    assert ca.authority.store.is_revoked(str(serial))


# federatls ca token --cnf-file ----------------------------------------------------------------
def _mint_flags(pki: PKI) -> list[str]:
    """The flags to mint from ``pki``'s CA; a CA that is not running gets a port nothing
    answers on (the usage errors below stop before any connection)."""
    url = pki.url or "https://127.0.0.1:1"
    return [
        "--ca-url",
        url,
        "--root",
        str(pki.root_path),
        "--password-file",
        str(pki.password_file),
    ]


@pytest.mark.parametrize(
    "encoding", [serialization.Encoding.PEM, serialization.Encoding.DER], ids=["PEM", "DER"]
)
async def test_cli_token_cnf_file_binds_the_csr(
    ca: CAServer, pki: PKI, tmp_path: Path, encoding: serialization.Encoding
) -> None:
    """`federatls ca token --cnf-file CSR` (PEM or DER) mints a token bound to that CSR: it
    signs it. Twin: the token from the same command refuses another CSR (403)."""
    csr = _csr()
    path = tmp_path / "svc.csr"
    path.write_bytes(csr.public_bytes(encoding))
    runs = [
        await federatls("ca", "token", SVC, "--cnf-file", path, *_mint_flags(pki)) for _ in "ab"
    ]
    for run in runs:
        assert (run.code, run.err) == (0, ""), run
    first, second = (run.out.strip() for run in runs)
    assert _claims(first)["cnf"] == {"x5rt#S256": _sha256_b64url(csr)}
    assert (await _sign(pki, csr, first)).public_key() == csr.public_key()
    assert (await _refused(pki, _csr(), second)).status == 403


def _tampered_der(tmp_path: Path) -> Path:
    der = bytearray(_csr().public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    path = tmp_path / "tampered.csr"
    path.write_bytes(bytes(der))
    return path


def _certificate_pem(pki: PKI, tmp_path: Path) -> Path:
    path = tmp_path / "root.crt"
    path.write_bytes(pki.root.public_bytes(serialization.Encoding.PEM))
    return path


BAD_CNF_FILES: list[tuple[str, Callable[[PKI, Path], Path], str]] = [
    ("missing", lambda p, t: t / "none.csr", "cannot read certificate request"),
    (
        "garbage",
        lambda p, t: _write(t / "junk.csr", b"\x00\x01junk"),
        "is not a certificate request",
    ),
    ("a certificate", _certificate_pem, "no PEM CERTIFICATE REQUEST block"),
    ("bad signature", lambda p, t: _tampered_der(t), "signature does not verify"),
    ("a directory", lambda p, t: t, "cannot read certificate request"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("what", "make", "fragment"), BAD_CNF_FILES, ids=[b[0] for b in BAD_CNF_FILES]
)
async def test_cli_bad_cnf_file_is_one_line_exit_1(
    pki: PKI, tmp_path: Path, what: str, make: Callable[[PKI, Path], Path], fragment: str
) -> None:
    """A --cnf-file that is missing, not a CSR or badly signed: one stderr line naming the
    file, exit 1 (a file that cannot be used, as for --root), no token, no parser internals.
    Twin: test_cli_token_cnf_file_binds_the_csr (a good one mints)."""
    path = make(pki, tmp_path)
    run = await federatls("ca", "token", SVC, "--cnf-file", path, *_mint_flags(pki))
    assert run.code == 1, run
    assert run.out == ""
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith(f"federatls: error: {path}") or lines[0].startswith(
        "federatls: error: cannot read certificate request"
    ), lines
    assert fragment in lines[0]
    assert "ParseError" not in lines[0]


async def test_cli_cnf_file_with_revoke_is_a_usage_error(pki: PKI, tmp_path: Path) -> None:
    """--cnf-file binds sign tokens only: with --revoke it is a one-line usage error (exit 2).
    Twin: test_cli_token_cnf_file_binds_the_csr."""
    path = _write(tmp_path / "svc.csr", _csr().public_bytes(serialization.Encoding.PEM))
    run = await federatls("ca", "token", "31", "--revoke", "--cnf-file", path, *_mint_flags(pki))
    assert run.code == 2, run
    assert run.err.count("\n") == 1
    assert "not with --revoke" in run.err


# federatls.testing -----------------------------------------------------------------------------
def test_testing_ca_token_binds_a_csr() -> None:
    """``TestCA.token(csr=...)`` binds the token to that CSR: the CA signs it. Twin: the same
    kind of token, bound to a CSR bootstrap does not send, is refused (403)."""
    csr = _csr("svc.test", ("svc.test",))
    with running_ca("test") as ca:
        context = ssl.create_default_context(cafile=str(ca.root_path))
        body = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "ott": ca.token("svc.test", csr=csr),
        }
        response = httpx.post(ca.url + "/1.0/sign", json=body, verify=context)
        assert response.status_code == 201, response.text
        with pytest.raises(CARefusedError) as refused:
            bootstrap_sync(ca.token("svc.test", csr=csr))
    assert refused.value.status == 403
    assert "fingerprint does not match" in refused.value.message
