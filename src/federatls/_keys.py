"""Workload keys and certificate requests: a new private key in memory (P-256 by default;
Ed25519, RSA-2048 and RSA-3072 on request) and the CSR a token asks for. No I/O here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ._x509 import split_sans

__all__ = ["KeyType", "PrivateKey", "build_csr", "new_private_key"]

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


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
