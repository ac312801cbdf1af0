"""The CA's key material as ca.json names it: roots, federated roots, the intermediate chain
and its password-encrypted key. Loading checks that the pieces fit together (the key matches
the intermediate, the intermediate chains to a root, the CA's own names are inside the name
constraints above it) so a broken PKI fails at start, not at the first request.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .._errors import BadMaterialError, ConfigError
from .._keys import PrivateKey
from .._spiffe import ca_spiffe_id
from .._x509 import fingerprint, issued_by, load_pem_certificates, split_sans
from ._config import CAConfig
from ._constraints import NameConstraints, constraints_refusal
from ._federation import dedupe

__all__ = ["CAMaterial", "SigningKey", "load_material"]

SigningKey = PrivateKey


@dataclass(frozen=True)
class CAMaterial:
    """Everything the CA signs with and vouches for, loaded and checked."""

    roots: tuple[x509.Certificate, ...]
    federated_roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]  # the signing certificate first
    key: SigningKey

    @property
    def issuer(self) -> x509.Certificate:
        return self.intermediates[0]

    @cached_property
    def name_constraints(self) -> tuple[NameConstraints, ...]:
        """The name constraints of every CA certificate above the CA's leaves: the
        intermediates and the root that issued the last of them (RFC 5280 applies them all).
        Read from the certificates, so constraints written by another tool count too;
        ``ValueError`` for one the CA cannot read."""
        top = self.intermediates[-1]
        above = [*self.intermediates, *(r for r in self.roots if issued_by(top, r))]
        return tuple(c for c in map(NameConstraints.of, above) if c is not None)

    def federation(self) -> tuple[x509.Certificate, ...]:
        """Own roots then federated roots, without duplicates (step-ca de-duplicates too)."""
        return dedupe((*self.roots, *self.federated_roots))

    def root_by_fingerprint(self, sha: str) -> x509.Certificate | None:
        """An own or federated root by hex SHA-256 (step-ca's ``/root/{sha}`` matches both)."""
        for cert in self.federation():
            if fingerprint(cert) == sha:
                return cert
        return None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _certs(path: Path, what: str) -> list[x509.Certificate]:
    try:
        return load_pem_certificates(_read(path, what), f"{what} {path}")
    except BadMaterialError as exc:
        raise ConfigError(str(exc)) from exc


def load_signing_key(path: Path, password: bytes | None, what: str) -> SigningKey:
    """A PEM private key, encrypted (PKCS#8) or not; ``ConfigError`` says why it failed."""
    data = _read(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=password or None)
    except TypeError as exc:
        if password:
            raise ConfigError(f"{what} {path} is not encrypted, but a password was given") from exc
        raise ConfigError(f"{what} {path} is encrypted: a password is needed") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"cannot decrypt {what} {path}: wrong password or not a PEM private key"
        ) from exc
    if not isinstance(key, PrivateKey):
        raise ConfigError(f"{what} {path}: unsupported key type {type(key).__name__}")
    return key


def load_material(config: CAConfig, password: bytes | None) -> CAMaterial:
    """Load and cross-check the files ca.json names; ``ConfigError`` on any problem."""
    roots: list[x509.Certificate] = []
    for path in config.roots:
        roots += _certs(path, "root certificate")
    federated: list[x509.Certificate] = []
    for path in config.federated_roots:
        federated += _certs(path, "federated root certificate")
    intermediates = _certs(config.crt, "intermediate certificate")
    key = load_signing_key(config.key, password, "intermediate key")
    issuer = intermediates[0]
    own_pub = issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if own_pub != key_pub:
        raise ConfigError(f"intermediate key {config.key} does not match certificate {config.crt}")
    top = intermediates[-1]
    if not any(issued_by(top, root) for root in roots):
        raise ConfigError(
            f"intermediate certificate {config.crt} was not issued by any configured root"
        )
    material = CAMaterial(tuple(roots), tuple(federated), tuple(intermediates), key)
    try:
        constraints = material.name_constraints
    except ValueError as exc:
        raise ConfigError(f"intermediate certificate {config.crt}: {exc}") from exc
    # The CA's own HTTPS certificate comes from the same intermediate: a name of it outside
    # the constraints would make every client refuse the CA itself.
    refusal = constraints_refusal(constraints, x509.Name([]), split_sans(config.dns_names))
    if refusal is not None:
        raise ConfigError(
            f"{config.path}: dnsNames: {refusal}; clients would refuse the CA's own certificate"
        )
    if config.spiffe_trust_domain is not None:  # the certificate carries its SPIFFE ID too
        spiffe_id = ca_spiffe_id(config.spiffe_trust_domain)
        refusal = constraints_refusal(constraints, x509.Name([]), split_sans([spiffe_id]))
        if refusal is not None:
            raise ConfigError(
                f"{config.path}: spiffe.trustDomain: {refusal}; clients would refuse the CA's "
                "own certificate, which carries that SPIFFE ID"
            )
    return material
