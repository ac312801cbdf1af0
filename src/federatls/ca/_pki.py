"""Making a CA's PKI: a root, an intermediate (with the name constraints the operator gives,
if any), a JWK provisioner and a ca.json that both the federatls CA and the real step-ca run
(``federatls ca init``). Private keys are written only encrypted with the CA password; the
directory appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .._errors import ConfigError
from .._jwk import ProvisionerKey
from .._x509 import fingerprint, split_sans
from ._config import build_ca_json, split_address
from ._constraints import NameConstraints, constraints_refusal

__all__ = ["InitResult", "init_pki", "new_intermediate", "new_root"]

CA_VALIDITY = timedelta(days=3650)


def _name(org: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer_public_key: ec.EllipticCurvePublicKey,
    path_length: int,
    now: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False
        )
    )


def new_root(
    name: str, now: datetime, common_name: str | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed P-256 root ``O=<name>, CN=<name> Root CA`` valid ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name, common_name or f"{name} Root CA")
    cert = _ca_builder(subject, subject, key.public_key(), key.public_key(), 1, now).sign(
        key, hashes.SHA256()
    )
    return cert, key


def new_intermediate(
    name: str,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    common_name: str | None = None,
    name_constraints: x509.NameConstraints | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A P-256 intermediate ``O=<name>, CN=<name> Intermediate CA`` issued by ``root``, with
    ``name_constraints`` as a critical extension when given (RFC 5280 says critical)."""
    key = ec.generate_private_key(ec.SECP256R1())
    root_pub = root_key.public_key()
    builder = _ca_builder(
        _name(name, common_name or f"{name} Intermediate CA"),
        root.subject,
        key.public_key(),
        root_pub,
        0,
        now,
    )
    if name_constraints is not None:
        builder = builder.add_extension(name_constraints, critical=True)
    return builder.sign(root_key, hashes.SHA256()), key


def encrypted_key_pem(key: ec.EllipticCurvePrivateKey, password: bytes) -> bytes:
    """PKCS#8 ``ENCRYPTED PRIVATE KEY`` (PBES2, AES-256-CBC), which step-ca also reads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never readable by others, even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class InitResult:
    """What ``init_pki`` made."""

    directory: Path
    config: Path
    root: Path
    root_fingerprint: str
    provisioner: str
    provisioner_kid: str
    ca_url: str


def own_names_refusal(
    name_constraints: x509.NameConstraints | None, address: str, dns_names: Sequence[str]
) -> str | None:
    """Why the CA's own names (those of its HTTPS certificate: ``dns_names``, else the
    address's host) break ``name_constraints`` (clients would refuse the CA itself), or
    None."""
    if name_constraints is None:
        return None
    names = list(dns_names) or _default_dns(split_address(address)[0])
    constraints = NameConstraints.read(name_constraints, "the new intermediate")
    refusal = constraints_refusal([constraints], x509.Name([]), split_sans(names))
    if refusal is None:
        return None
    return (
        f"the CA's own name would be refused: {refusal}; name the CA inside the constraints "
        "(--dns) or permit its name too"
    )


def _default_dns(host: str) -> list[str]:
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 (a listen-anywhere address names no host)
        return ["localhost", "127.0.0.1"]
    return [host]


def init_pki(
    name: str,
    directory: Path,
    *,
    address: str,
    password: bytes,
    now: datetime,
    dns_names: Sequence[str] = (),
    provisioner: str = "admin",
    name_constraints: x509.NameConstraints | None = None,
) -> InitResult:
    """Write a new PKI for CA ``name`` into ``directory`` (which must not exist or be empty).

    Layout (step's): ``certs/root_ca.crt``, ``certs/intermediate_ca.crt``,
    ``secrets/root_ca_key``, ``secrets/intermediate_ca_key`` (both encrypted with
    ``password``), ``config/ca.json``, ``db/``. The files are made in a temporary sibling
    directory and moved into place at the end, so a failure leaves nothing behind.

    ``name_constraints`` (``_constraints.permitted_subtrees``) go into the intermediate; the
    CA's own names (``dns_names``) must lie inside them, else ``ConfigError``: clients would
    refuse the CA's own certificate.
    """
    if not name.strip():
        raise ConfigError("the CA name cannot be empty")
    if not password:
        raise ConfigError("the CA password cannot be empty")
    if not provisioner:
        raise ConfigError("the provisioner name cannot be empty")
    host, _port = split_address(address)
    dns = list(dns_names) or _default_dns(host)
    refusal = own_names_refusal(name_constraints, address, dns)
    if refusal is not None:
        raise ConfigError(refusal)
    directory = directory.absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(
            f"{directory} already exists and is not empty: refusing to overwrite a PKI"
        )
    parent = directory.parent
    if not parent.is_dir():
        raise ConfigError(f"{parent} does not exist")

    root, root_key = new_root(name, now)
    inter, inter_key = new_intermediate(
        name, root, root_key, now, name_constraints=name_constraints
    )
    prov_key = ProvisionerKey.generate()
    prov = {
        "type": "JWK",
        "name": provisioner,
        "key": prov_key.public.as_dict(),
        "encryptedKey": prov_key.encrypt(password),
    }
    final = {
        "root": directory / "certs" / "root_ca.crt",
        "crt": directory / "certs" / "intermediate_ca.crt",
        "root_key": directory / "secrets" / "root_ca_key",
        "key": directory / "secrets" / "intermediate_ca_key",
        "config": directory / "config" / "ca.json",
        "db": directory / "db",
    }
    ca_json = build_ca_json(
        roots=[final["root"]],
        crt=final["crt"],
        key=final["key"],
        address=address,
        dns_names=dns,
        provisioner=prov,
        db_dir=final["db"],
    )

    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.init-", dir=parent))
    except OSError as exc:
        raise ConfigError(f"cannot write into {parent}: {exc.strerror or exc}") from exc
    try:
        for sub in ("certs", "secrets", "config", "db"):
            (staging / sub).mkdir(mode=0o700 if sub in ("secrets", "db") else 0o755)
        (staging / "certs" / "root_ca.crt").write_bytes(
            root.public_bytes(serialization.Encoding.PEM)
        )
        (staging / "certs" / "intermediate_ca.crt").write_bytes(
            inter.public_bytes(serialization.Encoding.PEM)
        )
        write_private(staging / "secrets" / "root_ca_key", encrypted_key_pem(root_key, password))
        write_private(
            staging / "secrets" / "intermediate_ca_key", encrypted_key_pem(inter_key, password)
        )
        (staging / "config" / "ca.json").write_text(json.dumps(ca_json, indent=2) + "\n")
        staging.chmod(0o755)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        staging.rename(directory)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"cannot write the PKI into {directory}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    scheme_host = host if host not in ("", "0.0.0.0", "::") else dns[0]  # noqa: S104
    return InitResult(
        directory=directory,
        config=final["config"],
        root=final["root"],
        root_fingerprint=fingerprint(root),
        provisioner=provisioner,
        provisioner_kid=prov_key.kid,
        ca_url=f"https://{_url_host(scheme_host)}:{_port}",
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
