"""Workload keys and certificate requests: a new private key in memory (P-256 by default;
Ed25519, RSA-2048 and RSA-3072 on request), the kind of an existing key, the CSR a token asks
for, which public keys a CSR may carry for the CA to certify them, and the one table of the
elliptic curves used here (their JWK ``crv`` names and JWS algorithms). No I/O here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ._errors import BadMaterialError
from ._x509 import split_sans

__all__ = [
    "EC_CURVES",
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "build_csr",
    "csr_key_refusal",
    "ec_jws_algorithm",
    "key_type_of",
    "new_private_key",
]

# The key types the SDK, the CA and the CLI accept (private: workloads' and the CA's own;
# public: what the CA certifies). ``isinstance(key, PrivateKey)`` checks one.
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
# The elliptic curves accepted anywhere here, by JWK ``crv`` name, with the JWS algorithm
# that signs with each (RFC 7518 section 3.4: the hash follows the curve).
EC_CURVES: dict[str, tuple[type[ec.EllipticCurve], str]] = {
    "P-256": (ec.SECP256R1, "ES256"),
    "P-384": (ec.SECP384R1, "ES384"),
    "P-521": (ec.SECP521R1, "ES512"),
}
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 8192
# Go's crypto/rsa refuses public exponents above 2**31 - 1 (so Go peers cannot use such a
# certificate), and a longer one makes every verification cost up to a private-key operation.
MAX_RSA_EXPONENT = 2**31 - 1
ACCEPTED_KEYS = "P-256, P-384, P-521, Ed25519 or RSA of 2048 to 8192 bits"
_ACCEPTED_CURVES = tuple(curve for curve, _ in EC_CURVES.values())


class KeyType(enum.Enum):
    """The kinds of workload key federatls makes."""

    P256 = "P-256"
    ED25519 = "Ed25519"
    RSA2048 = "RSA-2048"
    RSA3072 = "RSA-3072"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        """``P-256``, ``Ed25519``, ``RSA-2048`` or ``RSA-3072`` (case-insensitive)."""
        for member in cls:
            if member.value.lower() == text.lower():
                return member
        raise ValueError(
            f"unknown key type {text!r}; choose one of " + ", ".join(m.value for m in cls)
        )


def new_private_key(kind: KeyType = KeyType.P256) -> PrivateKey:
    """A fresh private key, generated in this process and kept in memory."""
    if kind is KeyType.P256:
        return ec.generate_private_key(ec.SECP256R1())
    if kind is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if kind is KeyType.RSA2048:
        return rsa.generate_private_key(65537, 2048)
    if kind is KeyType.RSA3072:
        return rsa.generate_private_key(65537, 3072)
    raise TypeError(f"key type must be a federatls.KeyType, not {kind!r}")


def key_type_of(key: object) -> KeyType:
    """The ``KeyType`` a renewal makes for a key like ``key`` (an RSA key of more than 2048
    bits gives RSA-3072, any curve P-256); ``BadMaterialError`` for another kind of key."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return KeyType.ED25519
    if isinstance(key, rsa.RSAPrivateKey):
        return KeyType.RSA2048 if key.key_size <= 2048 else KeyType.RSA3072
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return KeyType.P256
    raise BadMaterialError(f"unsupported key type {type(key).__name__}")


def ec_jws_algorithm(curve: ec.EllipticCurve) -> str | None:
    """The JWS algorithm that signs with a key on ``curve`` (``ES256`` for P-256...), or None
    for a curve not in ``EC_CURVES``."""
    return next((alg for cls, alg in EC_CURVES.values() if isinstance(curve, cls)), None)


def build_csr(key: PrivateKey, subject: str, sans: Sequence[str]) -> x509.CertificateSigningRequest:
    """A CSR with ``CN=<subject>`` and the SANs split by type, as step's clients make it."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    )
    names = split_sans(list(sans))
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names.general_names()), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def csr_key_refusal(key: object) -> str | None:
    """Why the CA does not certify this public key, or None if it does.

    Accepted: P-256, P-384, P-521, Ed25519 and RSA of 2048 to 8192 bits with an odd public
    exponent from 3 to 2**31 - 1. Smaller curves (P-192, P-224) and RSA keys are weak; other
    curves (secp256k1, brainpool) are not what TLS peers expect; a larger RSA key, or a
    longer exponent, makes its verifiers (the CA first, then every peer) pay for nothing.
    The short-RSA reason is step-ca's. Only the key's type, size and exponent are read: no
    signature is checked, so this is cheap enough to run before anything else.
    """
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return (
                f"certificate request RSA key must be at least {MIN_RSA_BITS} bits "
                f"({MIN_RSA_BITS // 8} bytes)"
            )
        if key.key_size > MAX_RSA_BITS:
            return (
                f"certificate request RSA key must be at most {MAX_RSA_BITS} bits "
                f"({MAX_RSA_BITS // 8} bytes)"
            )
        e = key.public_numbers().e
        if e % 2 == 0 or not 3 <= e <= MAX_RSA_EXPONENT:
            return (
                "certificate request RSA key must have an odd public exponent from 3 to "
                f"{MAX_RSA_EXPONENT} (65537 is usual)"
            )
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, _ACCEPTED_CURVES):
            return None
        return (
            f"certificate request key on curve {key.curve.name} is not supported; "
            f"use {ACCEPTED_KEYS}"
        )
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return (
        f"certificate request key of type {type(key).__name__} is not supported; "
        f"use {ACCEPTED_KEYS}"
    )
