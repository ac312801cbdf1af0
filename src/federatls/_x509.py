"""X.509 helpers shared by the SDK and the CA: PEM parsing with clear errors, fingerprints,
subject alternative names split the way step-ca splits them, whether one certificate issued
another and the one walk up a chain to an anchor. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ._errors import BadMaterialError

__all__ = [
    "CertificateFacts",
    "SANs",
    "cert_sans",
    "certs_to_pem",
    "crl_signer",
    "fingerprint",
    "issued_by",
    "load_pem_certificate",
    "load_pem_certificates",
    "load_pem_csr",
    "may_sign",
    "path_up",
    "split_sans",
]

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
# A URI SAN needs a scheme (Go's url.Parse rule): a letter, then letters, digits, + - .
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def fingerprint(cert: x509.Certificate) -> str:
    """The lower-case hex SHA-256 of the certificate's DER: step's root fingerprint."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _as_bytes(data: str | bytes) -> bytes:
    return data.encode("utf-8", "replace") if isinstance(data, str) else data


def load_pem_certificates(
    data: str | bytes, what: str = "certificate bundle"
) -> list[x509.Certificate]:
    """Every certificate in a PEM text; ``BadMaterialError`` if there is none or one is bad."""
    raw = _as_bytes(data)
    blocks = _PEM_CERT.findall(raw)
    if not blocks:
        raise BadMaterialError(f"{what}: no PEM CERTIFICATE block found")
    certs = []
    for i, block in enumerate(blocks):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
            raise BadMaterialError(f"{what}: certificate #{i + 1} is not valid: {exc}") from exc
    return certs


def load_pem_certificate(data: str | bytes, what: str = "certificate") -> x509.Certificate:
    """The first certificate of a PEM text (``BadMaterialError`` if there is none)."""
    return load_pem_certificates(data, what)[0]


def load_pem_csr(data: str | bytes) -> x509.CertificateSigningRequest:
    """A PEM CERTIFICATE REQUEST; raises ``BadMaterialError`` if absent or malformed."""
    raw = _as_bytes(data)
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in raw:
        raise BadMaterialError("csr: no PEM CERTIFICATE REQUEST block found")
    try:
        return x509.load_pem_x509_csr(raw)
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        raise BadMaterialError(f"csr: not a valid certificate request: {exc}") from exc


def certs_to_pem(certs: Iterable[x509.Certificate]) -> str:
    """Concatenated PEM of the certificates, in order."""
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


@dataclass(frozen=True)
class SANs:
    """Subject alternative names by type, in the order they were given."""

    dns: tuple[str, ...] = ()
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    emails: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()

    def general_names(self) -> list[x509.GeneralName]:
        """The names as ``x509.GeneralName`` values, DNS, IP, email, URI in that order."""
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns]
        names += [x509.IPAddress(ip) for ip in self.ips]
        names += [x509.RFC822Name(e) for e in self.emails]
        names += [x509.UniformResourceIdentifier(u) for u in self.uris]
        return names

    def as_strings(self) -> list[str]:
        """Every name as a plain string, DNS, IP, email, URI in that order."""
        return [*self.dns, *(str(ip) for ip in self.ips), *self.emails, *self.uris]

    def __bool__(self) -> bool:
        return bool(self.dns or self.ips or self.emails or self.uris)


def split_sans(sans: Sequence[str]) -> SANs:
    """Split strings into DNS names, IPs, emails and URIs as step-ca does.

    An IP literal is an IP; anything with a URI scheme is a URI; anything with ``@`` is an
    email; the rest are DNS names. (Same rule as step's ``x509util.SplitSANs``.)
    """
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    emails: list[str] = []
    uris: list[str] = []
    for san in sans:
        if "%" not in san:  # Go's net.ParseIP refuses zoned IPv6 ("fe80::1%eth0")
            try:
                ips.append(ipaddress.ip_address(san))
                continue
            except ValueError:
                pass
        if _SCHEME.match(san):
            uris.append(san)
        elif "@" in san:
            emails.append(san)
        else:
            dns.append(san)
    return SANs(tuple(dns), tuple(ips), tuple(emails), tuple(uris))


def _sans_from_extension(ext: x509.SubjectAlternativeName) -> SANs:
    return SANs(
        dns=tuple(ext.get_values_for_type(x509.DNSName)),
        ips=tuple(
            ip
            for ip in ext.get_values_for_type(x509.IPAddress)
            if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
        ),
        emails=tuple(ext.get_values_for_type(x509.RFC822Name)),
        uris=tuple(ext.get_values_for_type(x509.UniformResourceIdentifier)),
    )


def cert_sans(obj: x509.Certificate | x509.CertificateSigningRequest) -> SANs:
    """The subject alternative names of a certificate or CSR (empty if it has none)."""
    try:
        ext = obj.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return SANs()
    return _sans_from_extension(ext.value)


def common_name(name: x509.Name) -> str:
    """The first CN of a name, or ``""``."""
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not attrs:
        return ""
    value = attrs[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class CertificateFacts:
    """The facts of a leaf certificate, for classes that hold one as ``certificate``."""

    certificate: x509.Certificate

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def common_name(self) -> str:
        return common_name(self.certificate.subject)

    @property
    def sans(self) -> SANs:
        return cert_sans(self.certificate)

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


def may_sign(cert: x509.Certificate, usage: str = "key_cert_sign") -> bool:
    """Whether ``cert`` is a CA certificate (basicConstraints CA:TRUE) whose keyUsage, if it
    has one, allows ``usage`` (``key_cert_sign`` for certificates, ``crl_sign`` for CRLs)."""
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return bool(getattr(cert.extensions.get_extension_for_class(x509.KeyUsage).value, usage))
    except x509.ExtensionNotFound:
        return True


def issued_by(cert: x509.Certificate, by: x509.Certificate) -> bool:
    """Whether ``by`` issued ``cert``: its subject is ``cert``'s issuer and its key made
    ``cert``'s signature (validity periods and extensions are not looked at)."""
    try:
        cert.verify_directly_issued_by(by)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def path_up(
    cert: x509.Certificate,
    pool: Iterable[x509.Certificate],
    anchored: Callable[[x509.Certificate], bool],
    *,
    signer: Callable[[x509.Certificate], bool] = lambda parent: True,
    issued: Callable[[x509.Certificate, x509.Certificate], bool] | None = None,
) -> list[x509.Certificate] | None:
    """The path from ``cert`` (first) up through ``pool``, each certificate issued by the
    next, to the first one ``anchored`` accepts (``cert`` alone if it does); None when there
    is no such path. The one chain walk of the SDK and the CA.

    Each step looks, in pool order, only at the certificates named as the issuer that
    ``signer`` accepts, takes the first that issued the last one (``issued``, by default
    ``issued_by``), then drops all it looked at from the pool. So a certificate costs at most
    one signature check however many share a name (tried again at every step, n such
    certificates each signing the next cost n²/2 checks, n³ from n starting points: minutes
    for what a 1 MiB answer holds), and the walk ends. Not followed: a path that names the
    same issuer twice (a self-issued cross-certificate in the middle of a chain), and a
    second candidate once the first that verified leads nowhere (no backtracking).
    Validity periods are not looked at."""
    check = issued if issued is not None else issued_by
    left = list(pool)
    path = [cert]
    while not anchored(path[-1]):
        named = [c for c in left if c.subject == path[-1].issuer and signer(c)]
        parent = next((c for c in named if check(path[-1], c)), None)
        if parent is None:
            return None
        looked = {id(c) for c in named}
        left = [c for c in left if id(c) not in looked]
        path.append(parent)
    return path


def crl_signer(
    crl: x509.CertificateRevocationList,
    issuers: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> x509.Certificate:
    """The certificate among ``issuers`` and ``roots`` whose key signed ``crl``: a CA
    certificate allowed to sign CRLs (cRLSign), itself one of ``roots`` or issued by one
    through ``issuers`` (``path_up``: signatures checked, validity periods not; each
    signer a CA allowed to sign certificates). ``BadMaterialError`` naming the CRL's issuer
    when there is none.

    At most two signature checks per certificate offered (and a few more) are made in all:
    ``issuers`` may come from the CA's ``/intermediates``, and a CA publishing many CA
    certificates under the CRL's issuer name, each signing the next, would otherwise cost a
    number of checks in the cube of their count (minutes for what a 1 MiB answer holds)."""
    pool = [*roots, *issuers]
    trusted = {fingerprint(r) for r in roots}
    signing_roots = [r for r in roots if may_sign(r, "key_cert_sign")]
    budget = 2 * len(pool) + 8

    def spend() -> None:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise BadMaterialError(
                f"the CRL's signature does not verify with the CA's certificates (issuer "
                f"{crl.issuer.rfc4514_string()!r}): {len(pool)} certificates, more than "
                f"{2 * len(pool) + 8} signature checks"
            )

    def issued(child: x509.Certificate, parent: x509.Certificate) -> bool:
        spend()
        return issued_by(child, parent)

    def anchored(link: x509.Certificate) -> bool:
        # A root itself, or issued by one: a root is never a step of the walk, so a
        # self-issued cross-certificate of a root (root rollover) still reaches the old root.
        return fingerprint(link) in trusted or any(
            r.subject == link.issuer and issued(link, r) for r in signing_roots
        )

    for cert in pool:
        if cert.subject != crl.issuer or not may_sign(cert, "crl_sign"):
            continue
        spend()
        try:
            if not crl.is_signature_valid(cert.public_key()):  # type: ignore[arg-type]
                continue
        except (TypeError, UnsupportedAlgorithm):
            continue
        if path_up(cert, issuers, anchored, signer=may_sign, issued=issued) is not None:
            return cert
    raise BadMaterialError(
        f"the CRL's signature does not verify with the CA's certificates "
        f"(issuer {crl.issuer.rfc4514_string()!r})"
    )
