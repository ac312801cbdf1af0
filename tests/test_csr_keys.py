"""Which CSR keys the CA certifies: P-256, P-384, P-521, Ed25519 and RSA of 2048 to 8192 bits.

Every other key gets step-ca's answer for a 1024-bit RSA key (403, the reason in the body),
on /sign and /rekey alike, before the CSR's signature is checked (so an oversized RSA key
costs nothing) and before the token is looked at (so it stays unspent).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import secrets
import ssl
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from federatls import CARefusedError
from federatls._errors import TokenError
from federatls._keys import csr_key_refusal
from federatls._protocol import RekeyRequest
from federatls._token import mint_renew_token
from federatls._x509 import split_sans
from federatls.ca import CAServer, SQLiteStore
from federatls.ca._issuer import ProvisionerRef, issue_leaf

from harness import PKI

pytestmark = pytest.mark.anyio

SUBJECT = "svc.cloud.internal"
SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


def _csr(key: SigningKey) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, SUBJECT)])
    )
    digest = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    return builder.sign(key, digest)


def _pem(label: str, der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def _rsa_modulus(bits: int) -> rsa.RSAPublicKey:
    """A public key with a random odd modulus of exactly ``bits`` bits (no private half)."""
    n = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    return rsa.RSAPublicNumbers(65537, n).public_key()


def oversized_rsa_csr(bits: int) -> str:
    """A CSR for a ``bits``-bit RSA key whose signature is zeros: only a CA that looks at the
    key before the signature can tell that the key is what is wrong."""
    spki = _rsa_modulus(bits).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = _der(0x30, _der(0x02, b"\x00") + _der(0x30, b"") + spki + b"\xa0\x00")
    sha256_with_rsa = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d01010b")) + b"\x05\x00")
    signature = _der(0x03, b"\x00" + bytes(bits // 8))
    return _pem("CERTIFICATE REQUEST", _der(0x30, info + sha256_with_rsa + signature))


def _int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def rsa_exponent_csr(exponent: int, bits: int = 2048) -> str:
    """A CSR for an RSA key with public exponent ``exponent``, its signature zeros."""
    n = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    rsa_encryption = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
    key = _der(0x30, _int(n) + _int(exponent))
    spki = _der(0x30, rsa_encryption + _der(0x03, b"\x00" + key))
    info = _der(0x30, _der(0x02, b"\x00") + _der(0x30, b"") + spki + b"\xa0\x00")
    sha256_with_rsa = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d01010b")) + b"\x05\x00")
    signature = _der(0x03, b"\x00" + bytes(bits // 8))
    return _pem("CERTIFICATE REQUEST", _der(0x30, info + sha256_with_rsa + signature))


def huge_exponent_key() -> rsa.RSAPrivateKey:
    """A 3072-bit RSA key whose public exponent is as long as its modulus (a short private
    exponent): validly signs, and every verification with it costs a private-key operation."""
    base = rsa.generate_private_key(65537, 3072).private_numbers()
    p, q = base.p, base.q
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    while True:
        d = secrets.randbits(320) | 1
        if math.gcd(d, lam) == 1:
            break
    e = pow(d, -1, lam)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


def _signed_csr(make: Callable[[], SigningKey]) -> Callable[[], str]:
    return lambda: _csr(make()).public_bytes(serialization.Encoding.PEM).decode()


WEAK: dict[str, tuple[Callable[[], str], str]] = {
    "P-192": (_signed_csr(lambda: ec.generate_private_key(ec.SECP192R1())), "secp192r1"),
    "P-224": (_signed_csr(lambda: ec.generate_private_key(ec.SECP224R1())), "secp224r1"),
    "secp256k1": (_signed_csr(lambda: ec.generate_private_key(ec.SECP256K1())), "secp256k1"),
    "brainpoolP256r1": (
        _signed_csr(lambda: ec.generate_private_key(ec.BrainpoolP256R1())),
        "brainpoolP256r1",
    ),
    "RSA-1024": (
        _signed_csr(lambda: rsa.generate_private_key(65537, 1024)),  # noqa: S505 (the point)
        "RSA key must be at least 2048 bits (256 bytes)",
    ),
    "Ed448": (_signed_csr(ed448.Ed448PrivateKey.generate), "Ed448PublicKey"),
    "DSA": (_signed_csr(lambda: dsa.generate_private_key(1024)), "DSAPublicKey"),  # noqa: S505
    "RSA, 3069-bit exponent": (
        _signed_csr(huge_exponent_key),
        "RSA key must have an odd public exponent from 3 to 2147483647",
    ),
    "RSA, exponent 2**31 + 1, zero signature": (
        lambda: rsa_exponent_csr(2**31 + 1),
        "RSA key must have an odd public exponent from 3 to 2147483647",
    ),
    "RSA-8200, zero signature": (
        lambda: oversized_rsa_csr(8200),
        "RSA key must be at most 8192 bits (1024 bytes)",
    ),
    "RSA-16384, zero signature": (
        lambda: oversized_rsa_csr(16384),
        "RSA key must be at most 8192 bits (1024 bytes)",
    ),
}
ACCEPTED: dict[str, Callable[[], SigningKey]] = {
    "P-256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "P-384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "P-521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "Ed25519": ed25519.Ed25519PrivateKey.generate,
    "RSA-2048": lambda: rsa.generate_private_key(65537, 2048),
    "RSA-4096": lambda: rsa.generate_private_key(65537, 4096),
}


@pytest.fixture
def http(ca: CAServer, pki: PKI) -> Iterator[httpx.Client]:
    ctx = ssl.create_default_context(cafile=str(pki.root_path))
    with httpx.Client(verify=ctx, base_url=pki.url, timeout=30) as client:
        yield client


def _store(ca: CAServer) -> SQLiteStore:
    store = ca.authority.store
    assert isinstance(store, SQLiteStore)
    return store


@pytest.mark.parametrize("case", WEAK.values(), ids=list(WEAK))
async def test_weak_or_oversized_key_is_refused_and_spends_nothing(
    ca: CAServer,
    pki: PKI,
    http: httpx.Client,
    caplog: pytest.LogCaptureFixture,
    case: tuple[Callable[[], str], str],
) -> None:
    """A CSR key outside the accepted set gets 403 with the reason, in the body and the log;
    nothing is stored and the same token then buys a certificate for an accepted key."""
    make_csr, reason = case
    caplog.set_level(logging.WARNING, "federatls.ca")
    token = pki.token(SUBJECT)
    csr = make_csr()

    def run() -> None:
        refused = http.post("/1.0/sign", json={"csr": csr, "ott": token})
        assert refused.status_code == 403, refused.text
        message = refused.json()["message"]
        assert message.startswith("The request was forbidden by the certificate authority: ")
        assert reason in message
        assert _store(ca).counts() == {"used_tokens": 0, "certificates": 0, "revocations": 0}
        good = _signed_csr(ACCEPTED["P-256"])()
        issued = http.post("/1.0/sign", json={"csr": good, "ott": token})
        assert issued.status_code == 201, issued.text

    await anyio.to_thread.run_sync(run)
    assert reason in caplog.text


@pytest.mark.parametrize("make_key", ACCEPTED.values(), ids=list(ACCEPTED))
async def test_accepted_key_types_are_issued(
    ca: CAServer, pki: PKI, http: httpx.Client, make_key: Callable[[], SigningKey]
) -> None:
    """Twin: P-256, P-384, P-521, Ed25519 and RSA keys of 2048 and 4096 bits are certified,
    for that very key."""
    key = make_key()
    csr = _csr(key).public_bytes(serialization.Encoding.PEM).decode()

    def run() -> None:
        response = http.post("/1.0/sign", json={"csr": csr, "ott": pki.token(SUBJECT)})
        assert response.status_code == 201, response.text
        leaf = x509.load_pem_x509_certificate(response.json()["crt"].encode())
        assert leaf.public_key() == key.public_key()

    await anyio.to_thread.run_sync(run)
    assert _store(ca).counts()["certificates"] == 1


@pytest.mark.parametrize(
    ("bits", "accepted"), [(2047, False), (2048, True), (8192, True), (8193, False)]
)
def test_rsa_size_limits(bits: int, accepted: bool) -> None:
    """RSA moduli of 2048 and 8192 bits are the accepted bounds; one bit beyond either is
    refused."""
    assert (csr_key_refusal(_rsa_modulus(bits)) is None) is accepted


@pytest.mark.parametrize(
    ("exponent", "accepted"), [(3, True), (65537, True), (2**31 - 1, True), (2**31 + 1, False)]
)
def test_rsa_exponent_limits(exponent: int, accepted: bool) -> None:
    """Odd public exponents from 3 to 2**31 - 1 (what Go peers parse) are accepted; a larger
    one is refused."""
    n = _rsa_modulus(2048).public_numbers().n
    key = rsa.RSAPublicNumbers(exponent, n).public_key()
    assert (csr_key_refusal(key) is None) is accepted


@pytest.mark.parametrize(
    ("curve", "algorithm"),
    [
        (ec.SECP256R1(), "ES256"),
        (ec.SECP384R1(), "ES384"),
        (ec.SECP521R1(), "ES512"),
        (ec.SECP256K1(), None),
        (ec.BrainpoolP256R1(), None),
    ],
)
def test_renew_token_algorithm_follows_the_curve(
    curve: ec.EllipticCurve, algorithm: str | None
) -> None:
    """A renew token's JWS algorithm is the one its key's curve has (P-256 ES256, P-384
    ES384, P-521 ES512). Twin: a 256-bit key on a curve without one (secp256k1,
    brainpoolP256r1) is refused with TokenError, not signed as ES256."""
    key = ec.generate_private_key(curve)
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, SUBJECT)]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, SUBJECT)]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    mint = functools.partial(mint_renew_token, [cert], key, audience="https://ca/1.0/renew")
    if algorithm is None:
        with pytest.raises(TokenError, match=f"unsupported curve {curve.name}"):
            mint(now=now)
        return
    header = json.loads(base64.urlsafe_b64decode(mint(now=now).split(".")[0] + "=="))
    assert header["alg"] == algorithm


@pytest.mark.parametrize(
    "case",
    [
        WEAK["P-192"],
        WEAK["brainpoolP256r1"],
        WEAK["RSA-16384, zero signature"],
        WEAK["RSA, 3069-bit exponent"],
        WEAK["RSA, exponent 2**31 + 1, zero signature"],
    ],
    ids=[
        "P-192",
        "brainpoolP256r1",
        "RSA-16384, zero signature",
        "RSA, 3069-bit exponent",
        "RSA, exponent 2**31 + 1",
    ],
)
async def test_rekey_to_a_weak_or_oversized_key_is_refused(
    ca: CAServer, pki: PKI, case: tuple[Callable[[], str], str]
) -> None:
    """/rekey applies the same rule: 403 with the reason, and nothing new is stored."""
    make_csr, reason = case
    chain, key = await pki.enroll(SUBJECT)
    csr = x509.load_pem_x509_csr(make_csr().encode())
    async with pki.client(identity=(chain, key)) as client:
        with pytest.raises(CARefusedError) as info:
            await client.rekey(RekeyRequest(csr))
    assert info.value.status == 403
    assert reason in info.value.message
    assert _store(ca).counts()["certificates"] == 1


async def test_rekey_to_p384_is_issued(ca: CAServer, pki: PKI) -> None:
    """Twin: a rekey to an accepted key of another type (P-384) is certified."""
    chain, key = await pki.enroll(SUBJECT)
    fresh = ec.generate_private_key(ec.SECP384R1())
    async with pki.client(identity=(chain, key)) as client:
        answer = await client.rekey(RekeyRequest(_csr(fresh)))
    assert answer.leaf.public_key() == fresh.public_key()
    assert _store(ca).counts()["certificates"] == 2


async def test_renew_token_chain_with_a_costly_key_is_refused_before_any_check(
    ca: CAServer, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """A renew token whose ``x5cInsecure`` chain carries a CA certificate with a huge-exponent
    RSA key (each signature check with it a private-key operation) is refused (401) naming the
    key, before the chain is walked; twin: the holder's real chain renews."""
    caplog.set_level(logging.WARNING, "federatls.ca")
    costly = huge_exponent_key()
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, SUBJECT)])
    now = pki.clock()

    def certificate(key: SigningKey, issuer_key: rsa.RSAPrivateKey, ca_: bool) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca_, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256())
        )

    chain = [certificate(leaf_key, costly, False), certificate(costly, costly, True)]
    audience = f"{pki.url}/1.0/renew"
    async with pki.client() as client:
        with pytest.raises(CARefusedError) as refused:
            await client.renew_with_token(
                mint_renew_token(chain, leaf_key, audience=audience, now=now)
            )
        assert refused.value.status == 401
        assert "x5cInsecure chain holds a key this CA does not accept" in caplog.text
        real_chain, real_key = await pki.enroll(SUBJECT)
        renewed = await client.renew_with_token(
            mint_renew_token(real_chain, real_key, audience=audience, now=now)
        )
    assert renewed.leaf.serial_number != real_chain[0].serial_number


def _issued_before_the_rule(ca: CAServer, pki: PKI, key: rsa.RSAPrivateKey) -> x509.Certificate:
    """A leaf for ``key`` signed by the running CA's own material, as a federatls that did
    not check keys yet could have issued it, and recorded in its store."""
    now = pki.clock()
    leaf = issue_leaf(
        ca.authority.material,
        public_key=key.public_key(),
        common_name=SUBJECT,
        sans=split_sans([SUBJECT]),
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(hours=1),
        provisioner=ProvisionerRef(pki.provisioner, pki.key.kid),
    )
    _store(ca).add_certificate(
        ca.authority._record_of(
            leaf, f"{pki.provisioner}:{pki.key.kid}", [SUBJECT], operation="sign"
        )
    )
    return leaf


async def test_a_certificate_with_a_refused_key_is_not_renewed_but_may_be_rekeyed(
    ca: CAServer, pki: PKI
) -> None:
    """A certificate issued before the key rule, for a key the CA now refuses (a huge RSA
    exponent), is not renewed for that key again (403, nothing stored); twin: its holder
    may rekey it to an accepted key."""
    key = huge_exponent_key()
    leaf = _issued_before_the_rule(ca, pki, key)
    holder = ([leaf, *ca.authority.material.intermediates], key)
    async with pki.client(identity=holder) as client:
        with pytest.raises(CARefusedError) as refused:
            await client.renew()
        assert refused.value.status == 403
        assert "public exponent" in refused.value.message
        assert _store(ca).counts()["certificates"] == 1
        fresh = ec.generate_private_key(ec.SECP256R1())
        answer = await client.rekey(RekeyRequest(_csr(fresh)))
    assert answer.leaf.public_key() == fresh.public_key()
