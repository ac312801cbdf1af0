"""SPIFFE bundles and names: the JWK Set of the SPIFFE Trust Domain and Bundle specification
(section 4) holding X.509 roots as the X509-SVID specification (section 6) says, and the
checks of trust domain names and SPIFFE IDs. Pure: values, building and parsing; no I/O, no
clock. Fetching a peer's bundle is ``ca/_spiffe_peer.py``'s business, serving the CA's own
``ca/_server.py``'s; docs/spiffe.md states these rules for users.

Parsing follows the consumer rules of both specifications: a key whose ``use`` is missing or
not ``x509-svid``, or whose key type (or curve) is unknown, is ignored and noted; so is an
``x509-svid`` key without ``x5c``, and every ``x5c`` value after the first. What a key does
carry must be well formed: a certificate that does not decode, or whose public key is not the
JWK's, makes the whole bundle ``BadMaterialError`` (a publisher that gets this wrong must not
have its bundle half believed). Sizes are bounded before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey, OKPKey, RSAKey

from ._authorise import _TRUST_DOMAIN, _uri_problem
from ._errors import BadMaterialError
from ._jwk import _import_jwk
from ._keys import EC_CURVES
from ._x509 import fingerprint

__all__ = [
    "BUNDLE_PATH",
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_KEYS",
    "X509_SVID_USE",
    "SpiffeBundle",
    "ca_spiffe_id",
    "roots_digest",
    "spiffe_id_problem",
    "trust_domain_of",
    "trust_domain_problem",
]

X509_SVID_USE = "x509-svid"
BUNDLE_PATH = "/spiffe/bundle"  # where a federatls CA serves its own roots as a bundle
MAX_BUNDLE_BYTES = 1 << 20  # a bundle endpoint's whole answer
MAX_BUNDLE_KEYS = 256  # JWKs in one bundle, whatever their use
MAX_X5C_CHARS = 64 << 10  # one base64 certificate
MAX_SEQUENCE = (1 << 64) - 1  # the specification asks for at least 64 bits; no more here
MAX_REFRESH_HINT = (1 << 63) - 1  # seconds; consumers bound it further (ca/_spiffe_peer.py)
# The members of a public JWK, and those only a private (or symmetric) one has.
_PUBLIC_MEMBERS = frozenset({"kty", "crv", "x", "y", "n", "e"})
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# Key types and curves a root certificate can have here (RFC 7518 section 6, RFC 8037).
_CURVES = {"EC": tuple(EC_CURVES), "OKP": ("Ed25519", "Ed448"), "RSA": (None,)}


def trust_domain_problem(name: str) -> str | None:
    """Why ``name`` is not a SPIFFE trust domain name (SPIFFE ID specification, section 2),
    or None when it is one."""
    if not isinstance(name, str) or not _TRUST_DOMAIN.fullmatch(name):
        return "a trust domain is 1 to 255 lowercase letters, digits, '.', '-' or '_'"
    return None


def spiffe_id_problem(uri: str) -> str | None:
    """Why ``uri`` is not a SPIFFE ID (``spiffe://`` and a trust domain, then an optional
    path), or None when it is one. The rules are ``_authorise``'s, which name checks use."""
    if not isinstance(uri, str) or not uri.startswith("spiffe://"):
        return "a SPIFFE ID starts with 'spiffe://'"
    return _uri_problem(uri)


def ca_spiffe_id(trust_domain: str) -> str:
    """The SPIFFE ID a federatls CA's own HTTPS certificate carries when ca.json names its
    trust domain: so that its bundle endpoint is also an ``https_spiffe`` one."""
    return f"spiffe://{trust_domain}/federatls/ca"


def trust_domain_of(spiffe_id: str) -> str:
    """The trust domain of a SPIFFE ID; ``ValueError`` quoting it when it is not one."""
    problem = spiffe_id_problem(spiffe_id)
    if problem:
        raise ValueError(f"{spiffe_id!r} is not a SPIFFE ID: {problem}")
    return spiffe_id.removeprefix("spiffe://").partition("/")[0]


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _jwk_of(cert: x509.Certificate) -> dict[str, Any]:
    """The public JWK of ``cert``'s key (EC, RSA or OKP), as joserfc writes it."""
    key = cert.public_key()
    for kind in (ECKey, RSAKey, OKPKey):
        try:
            return dict(kind.import_key(key).as_dict(private=False))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            continue
    raise BadMaterialError(
        f"root {cert.subject.rfc4514_string()!r}: its {type(key).__name__} key has no JWK "
        "form in a SPIFFE bundle (EC, RSA or Ed25519 keys do)"
    )


@dataclass(frozen=True)
class SpiffeBundle:
    """A SPIFFE bundle's X.509 roots, its ``spiffe_sequence`` and ``spiffe_refresh_hint``
    (seconds; None when absent). ``roots`` empty means the trust domain is distrusted
    (``"keys": []``, or no usable key). ``notes`` says what parsing ignored, and why.

    Not checked here: that a root is a CA or self-signed, its validity period (a verifier's
    business), or which trust domain the bundle is for (a bundle does not say; the consumer
    knows it from its configuration)."""

    roots: tuple[x509.Certificate, ...]
    sequence: int | None = None
    refresh_hint: int | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sequence is not None and not 0 <= self.sequence <= MAX_SEQUENCE:
            raise ValueError(f"spiffe_sequence {self.sequence} is outside 0..2**64-1")
        if self.refresh_hint is not None and not 0 <= self.refresh_hint <= MAX_REFRESH_HINT:
            raise ValueError(f"spiffe_refresh_hint {self.refresh_hint} is not a valid hint")

    def to_json(self) -> dict[str, Any]:
        """The JWK Set: one ``x509-svid`` key per root, its ``x5c`` holding exactly that root
        (standard base64 DER), no ``kid`` (X509-SVID section 6.1); sequence and hint first."""
        out: dict[str, Any] = {}
        if self.sequence is not None:
            out["spiffe_sequence"] = self.sequence
        if self.refresh_hint is not None:
            out["spiffe_refresh_hint"] = self.refresh_hint
        keys = []
        for cert in self.roots:
            jwk = _jwk_of(cert)
            key: dict[str, Any] = {"use": X509_SVID_USE, "kty": jwk.pop("kty")}
            key.update(sorted(jwk.items()))
            der = cert.public_bytes(serialization.Encoding.DER)
            key["x5c"] = [base64.b64encode(der).decode("ascii")]
            keys.append(key)
        out["keys"] = keys
        return out

    def to_bytes(self) -> bytes:
        """The JWK Set as UTF-8 JSON, as a bundle endpoint serves it."""
        return json.dumps(self.to_json(), indent=2).encode("utf-8") + b"\n"

    @classmethod
    def parse(cls, data: bytes | str, what: str = "SPIFFE bundle") -> SpiffeBundle:
        """A bundle from its JSON text; ``BadMaterialError`` naming ``what`` and the field
        for anything malformed (see the module's docstring for what is ignored instead)."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        if len(raw) > MAX_BUNDLE_BYTES:
            raise BadMaterialError(f"{what}: {len(raw)} bytes, more than {MAX_BUNDLE_BYTES}")
        try:
            doc = json.loads(raw, object_pairs_hook=_unique_members)
        except _DuplicateMember as exc:
            raise BadMaterialError(f"{what}: member {exc.args[0]!r} appears twice") from exc
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BadMaterialError(f"{what}: not JSON ({exc})") from exc
        return cls.from_json(doc, what)

    @classmethod
    def from_json(cls, doc: object, what: str = "SPIFFE bundle") -> SpiffeBundle:
        """A bundle from decoded JSON (see ``parse``)."""
        if not isinstance(doc, dict):
            raise BadMaterialError(f"{what}: a JWK Set must be a JSON object")
        sequence = _integer(doc, "spiffe_sequence", MAX_SEQUENCE, what)
        hint = _integer(doc, "spiffe_refresh_hint", MAX_REFRESH_HINT, what)
        keys = doc.get("keys")
        if not isinstance(keys, list):
            raise BadMaterialError(f"{what}: 'keys' must be present and be a list of JWKs")
        if len(keys) > MAX_BUNDLE_KEYS:
            raise BadMaterialError(f"{what}: {len(keys)} keys, more than {MAX_BUNDLE_KEYS}")
        roots: dict[str, x509.Certificate] = {}
        notes: list[str] = []
        for i, key in enumerate(keys):
            where = f"{what}: keys[{i}]"
            cert = _x509_root(key, where, notes)
            if cert is None:
                continue
            if fingerprint(cert) in roots:
                notes.append(f"{where}: ignored, the same root as an earlier key")
                continue
            roots[fingerprint(cert)] = cert
        if keys and not roots:
            notes.append(f"{what}: no usable x509-svid key, so the trust domain is distrusted")
        return cls(tuple(roots.values()), sequence, hint, tuple(notes))


class _DuplicateMember(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _DuplicateMember(name)
        out[name] = value
    return out


def _integer(doc: Mapping[str, Any], name: str, most: int, what: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise BadMaterialError(f"{what}: {name} must be an integer from 0 to {most}")
    return value


def _x509_root(key: object, where: str, notes: list[str]) -> x509.Certificate | None:
    """The root an ``x509-svid`` JWK carries, None (with a note) when the specifications
    say to ignore the key, ``BadMaterialError`` when it is malformed."""
    if not isinstance(key, dict):
        raise BadMaterialError(f"{where}: a JWK must be a JSON object")
    use, kty = key.get("use"), key.get("kty")
    if use != X509_SVID_USE:
        shown = "no use" if use is None else f"use {_short(use)}"
        notes.append(f"{where}: ignored, {shown} (only {X509_SVID_USE!r} keys are read)")
        return None
    if not isinstance(kty, str):
        raise BadMaterialError(f"{where}: 'kty' must be present and be a string")
    if kty not in _CURVES:
        notes.append(f"{where}: ignored, unknown key type {_short(kty)}")
        return None
    if key.get("crv") not in _CURVES[kty]:
        notes.append(f"{where}: ignored, unknown {kty} curve {_short(key.get('crv'))}")
        return None
    x5c = key.get("x5c")
    if x5c is None or x5c == []:
        notes.append(f"{where}: ignored, an x509-svid key without 'x5c'")
        return None
    if not isinstance(x5c, list):
        raise BadMaterialError(f"{where}: 'x5c' must be a list of base64 certificates")
    if len(x5c) > 1:
        notes.append(f"{where}: {len(x5c) - 1} certificate(s) after the first in 'x5c' ignored")
    cert = _certificate(x5c[0], f"{where}: x5c[0]")
    if any(name in key for name in _PRIVATE_MEMBERS):
        raise BadMaterialError(f"{where}: holds a private key where a public one belongs")
    jwk = _import_jwk({k: v for k, v in key.items() if k in _PUBLIC_MEMBERS}, where)
    if _spki(jwk.public_key) != _spki(cert.public_key()):
        raise BadMaterialError(f"{where}: the JWK's public key is not its certificate's")
    return cert


def _certificate(value: object, where: str) -> x509.Certificate:
    if not isinstance(value, str) or len(value) > MAX_X5C_CHARS:
        raise BadMaterialError(f"{where}: must be a base64 string of at most {MAX_X5C_CHARS}")
    try:
        der = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadMaterialError(f"{where}: not standard base64 ({exc})") from exc
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        raise BadMaterialError(f"{where}: not a DER certificate ({exc})") from exc


def _short(value: object) -> str:
    """``value`` quoted for a note, at most 40 characters (a publisher chooses it)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def roots_digest(roots: Iterable[x509.Certificate]) -> str:
    """A SHA-256 over the sorted fingerprints of ``roots``: the same set, the same digest,
    whatever the order (what a bundle's sequence numbers)."""
    joined = "\n".join(sorted({fingerprint(c) for c in roots}))
    return hashlib.sha256(joined.encode("ascii")).hexdigest()
