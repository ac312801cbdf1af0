"""Certificate construction: leaves from a CSR, renewals and rekeys of a leaf, and the CA's own
TLS server certificate, all shaped as step-ca shapes them (docs/protocol.md, "Sign", "Renew").
Pure: the time and the key material are passed in; no decision about *whether* to issue is
taken here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .._x509 import SANs, split_sans
from ._material import CAMaterial, SigningKey

__all__ = [
    "STEP_PROVISIONER_OID",
    "ProvisionerRef",
    "issue_leaf",
    "read_provisioner_extension",
    "renew_leaf",
    "server_certificate",
]

# step's provisioner extension: SEQUENCE { INTEGER type, OCTET STRING name, OCTET STRING kid }.
STEP_PROVISIONER_OID = x509.ObjectIdentifier("1.3.6.1.4.1.37476.9000.64.1")
_TYPE_JWK = 1
SERVER_COMMON_NAME = "federatls Online CA"
SERVER_LIFETIME = timedelta(hours=24)


@dataclass(frozen=True)
class ProvisionerRef:
    """Which provisioner authorised a certificate (carried in step's extension)."""

    name: str
    credential_id: str
    type: int = _TYPE_JWK

    @property
    def id(self) -> str:
        return f"{self.name}:{self.credential_id}"


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(body)) + body


def _provisioner_extension(ref: ProvisionerRef) -> x509.UnrecognizedExtension:
    body = (
        _der(0x02, ref.type.to_bytes(1, "big"))
        + _der(0x04, ref.name.encode())
        + _der(0x04, ref.credential_id.encode())
    )
    return x509.UnrecognizedExtension(STEP_PROVISIONER_OID, _der(0x30, body))


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos:end], end


def read_provisioner_extension(cert: x509.Certificate) -> ProvisionerRef | None:
    """The provisioner recorded in a certificate, or None if absent or malformed."""
    try:
        ext = cert.extensions.get_extension_for_oid(STEP_PROVISIONER_OID).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(ext, x509.UnrecognizedExtension):
        return None
    try:
        tag, seq, end = _read_tlv(ext.value, 0)
        if tag != 0x30 or end != len(ext.value):
            return None
        t1, kind, p = _read_tlv(seq, 0)
        t2, name, p = _read_tlv(seq, p)
        t3, cred, p = _read_tlv(seq, p)
    except (ValueError, IndexError):
        return None
    if (t1, t2, t3) != (0x02, 0x04, 0x04) or p != len(seq):
        return None
    return ProvisionerRef(
        name.decode("utf-8", "replace"),
        cred.decode("utf-8", "replace"),
        int.from_bytes(kind, "big", signed=True),
    )


def _hash_for(key: SigningKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384() if key.curve.key_size <= 384 else hashes.SHA512()
    return hashes.SHA256()


def _key_usage(public_key: CertificateIssuerPublicKeyTypes) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(builder: x509.CertificateBuilder, material: CAMaterial) -> x509.Certificate:
    return builder.sign(material.key, _hash_for(material.key))  # type: ignore[arg-type]


def _aki(material: CAMaterial) -> x509.AuthorityKeyIdentifier:
    try:
        ski = material.issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(material.issuer.public_key())  # type: ignore[arg-type]


def issue_leaf(
    material: CAMaterial,
    *,
    public_key: CertificateIssuerPublicKeyTypes,
    common_name: str,
    sans: SANs,
    not_before: datetime,
    not_after: datetime,
    provisioner: ProvisionerRef | None,
) -> x509.Certificate:
    """A TLS leaf: ``CN=<common_name>``, the given SANs, serverAuth+clientAuth, step's
    provisioner extension; signed by the intermediate."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(material.issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_key_usage(public_key), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(material), critical=False)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans.general_names()), critical=False
        )
    if provisioner is not None:
        builder = builder.add_extension(_provisioner_extension(provisioner), critical=False)
    return _sign(builder, material)


def renew_leaf(
    material: CAMaterial,
    old: x509.Certificate,
    *,
    now: datetime,
    backdate: timedelta,
    public_key: CertificateIssuerPublicKeyTypes | None = None,
) -> x509.Certificate:
    """The renewal (or, with ``public_key``, the rekey) of ``old``: same subject and
    extensions, new serial, new AKI, lifetime = old lifetime minus the backdate, starting now.
    """
    lifetime = old.not_valid_after_utc - old.not_valid_before_utc - backdate
    key = public_key if public_key is not None else old.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(material.issuer.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + lifetime)
    )
    for ext in old.extensions:
        if isinstance(ext.value, x509.AuthorityKeyIdentifier):
            continue
        if isinstance(ext.value, x509.SubjectKeyIdentifier) and public_key is not None:
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
            )
            continue
        builder = builder.add_extension(ext.value, critical=ext.critical)
    builder = builder.add_extension(_aki(material), critical=False)
    return _sign(builder, material)


def server_certificate(
    material: CAMaterial, dns_names: Sequence[str], now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA's own HTTPS certificate: a fresh P-256 key, SANs = ``dns_names`` (ca.json's
    dnsNames, and the CA's SPIFFE ID when ca.json names its trust domain), 24 h."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_leaf(
        material,
        public_key=key.public_key(),
        common_name=SERVER_COMMON_NAME,
        sans=split_sans(list(dns_names)),
        not_before=now - timedelta(minutes=1),
        not_after=now + SERVER_LIFETIME,
        provisioner=None,
    )
    return cert, key
