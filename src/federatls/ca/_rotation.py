"""Root rotation of a CA directory made by ``init_pki``, in three steps from phase (0), one
root A, to phase (3), root B only:

1. ``add_root``: make root B and its intermediate (with the name constraints of the current
   one, so the names the CA may issue stay the same); ca.json trusts A and B, still issues
   from A. Workloads learn B at their next refresh (``/roots``, ``/federation``).
2. ``issue_from_new_root``: ca.json issues from B's intermediate. Renewals now give
   certificates anchored in B; both roots are still trusted.
3. ``retire_old_roots``: ca.json trusts B only. Certificates anchored in A are refused.

Each step rewrites ca.json atomically and works for the federatls CA and step-ca alike; send
the CA SIGHUP (or call ``CAServer.reload``) to apply it. Between steps wait at least one full
renewal period of every workload, so that all have the new bundle before step 2 and a
certificate from B before step 3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .._errors import ConfigError
from .._files import write_atomic
from .._x509 import common_name, fingerprint, issued_by, load_pem_certificate
from ._config import CAConfig
from ._material import load_signing_key
from ._pki import encrypted_key_pem, new_intermediate, new_root, write_private

__all__ = ["RotationStep", "add_root", "issue_from_new_root", "retire_old_roots"]


@dataclass(frozen=True)
class RotationStep:
    """What a rotation step changed: the roots ca.json now trusts and the issuer it uses."""

    config: Path
    roots: tuple[Path, ...]
    issuer: Path
    summary: str


def _config_of(directory: Path) -> tuple[Path, dict[str, Any]]:
    path = directory / "config" / "ca.json"
    CAConfig.load(path)  # validates, with errors naming the field
    data: dict[str, Any] = json.loads(path.read_text())
    return path, data


def _write_config(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)


def _roots(data: dict[str, Any]) -> list[Path]:
    root = data["root"]
    return [Path(root)] if isinstance(root, str) else [Path(r) for r in root]


def _set_roots(data: dict[str, Any], roots: list[Path]) -> None:
    data["root"] = str(roots[0]) if len(roots) == 1 else [str(r) for r in roots]


def _cert(path: Path) -> x509.Certificate:
    return load_pem_certificate(path.read_bytes(), str(path))


def _name_constraints(issuer: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return issuer.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def _generation(directory: Path) -> int:
    n = 2
    while (directory / "certs" / f"root_ca-{n}.crt").exists():
        n += 1
    return n


def add_root(directory: Path, password: bytes, *, now: datetime) -> RotationStep:
    """Step 1: a new root and intermediate (keys encrypted with the CA password; the name
    constraints of the current intermediate carried over); ca.json trusts old and new roots
    and still issues from the old intermediate."""
    path, data = _config_of(directory)
    load_signing_key(Path(data["key"]), password, "intermediate key")  # the right password
    old = _cert(_roots(data)[0])
    org = old.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
    name = str(org[0].value) if org else common_name(old.subject) or directory.name
    n = _generation(directory)
    root, root_key = new_root(name, now, common_name=f"{name} Root CA {n}")
    inter, inter_key = new_intermediate(
        name,
        root,
        root_key,
        now,
        common_name=f"{name} Intermediate CA {n}",
        name_constraints=_name_constraints(_cert(Path(data["crt"]))),
    )
    files = {
        "root": directory / "certs" / f"root_ca-{n}.crt",
        "crt": directory / "certs" / f"intermediate_ca-{n}.crt",
        "root_key": directory / "secrets" / f"root_ca-{n}_key",
        "key": directory / "secrets" / f"intermediate_ca-{n}_key",
    }
    files["root"].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    files["crt"].write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    write_private(files["root_key"], encrypted_key_pem(root_key, password))
    write_private(files["key"], encrypted_key_pem(inter_key, password))
    roots = [*_roots(data), files["root"].absolute()]
    _set_roots(data, roots)
    _write_config(path, data)
    return RotationStep(
        path,
        tuple(roots),
        Path(data["crt"]),
        f"added root {fingerprint(root)} ({common_name(root.subject)}); "
        f"still issuing from {Path(data['crt']).name}",
    )


def issue_from_new_root(directory: Path) -> RotationStep:
    """Step 2: issue from the intermediate of the newest root (both roots still trusted)."""
    path, data = _config_of(directory)
    roots = _roots(data)
    newest = roots[-1]
    suffix = newest.name.removeprefix("root_ca").removesuffix(".crt")  # "-2", "-3", ...
    crt = newest.parent / f"intermediate_ca{suffix}.crt"
    key = directory / "secrets" / f"intermediate_ca{suffix}_key"
    if not suffix or not crt.exists() or not key.exists():
        raise ConfigError(
            f"no intermediate of the newest root {newest} to issue from: "
            "run the add-root step first"
        )
    if not issued_by(_cert(crt), _cert(newest)):
        raise ConfigError(f"{crt} was not issued by {newest}")
    data["crt"], data["key"] = str(crt.absolute()), str(key.absolute())
    _write_config(path, data)
    return RotationStep(
        path, tuple(roots), crt, f"issuing from {crt.name}; still trusting {len(roots)} roots"
    )


def retire_old_roots(directory: Path) -> RotationStep:
    """Step 3: trust only the root of the current intermediate."""
    path, data = _config_of(directory)
    issuer = _cert(Path(data["crt"]))
    keep = [r for r in _roots(data) if issued_by(issuer, _cert(r))]
    if not keep:
        raise ConfigError("the current intermediate chains to none of the configured roots")
    dropped = [r for r in _roots(data) if r not in keep]
    newest = _roots(data)[-1]
    if newest in dropped:
        raise ConfigError(
            f"the CA still issues from {Path(data['crt']).name}, not from the "
            f"newest root {newest.name}: run issue-from-new-root first (and wait "
            "one renewal period)"
        )
    if not dropped:
        raise ConfigError(
            "nothing to retire: every root is the current issuer's; run the "
            "add-root and issue-from-new-root steps first"
        )
    _set_roots(data, keep)
    _write_config(path, data)
    return RotationStep(
        path,
        tuple(keep),
        Path(data["crt"]),
        f"retired {', '.join(r.name for r in dropped)}; trusting "
        f"{', '.join(r.name for r in keep)} only",
    )
