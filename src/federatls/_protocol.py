"""step-ca's wire protocol (docs/protocol.md): paths, request and response bodies, error bodies.

The SDK's CA client and the federatls CA both use this module, so they cannot drift apart.
Requests are parsed here with step-ca's own 400 messages; responses are parsed with errors
that quote what is wrong. Not here: sockets, HTTP, the clock, any decision of the CA.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ._duration import format_go_duration, parse_go_duration
from ._errors import BadMaterialError
from ._keys import csr_key_refusal
from ._x509 import load_pem_certificate, load_pem_csr

__all__ = [
    "API_PREFIX",
    "CRL_DISABLED_MESSAGE",
    "CRL_PATH",
    "CRL_PEM_QUERY",
    "ENCRYPTED_KEY_PATH",
    "FEDERATION_PATH",
    "FEDERATION_SOURCES_PATH",
    "HEALTH_PATH",
    "INTERMEDIATES_PATH",
    "INTERMEDIATES_PEM_PATH",
    "LEGACY_RENEW_PATH",
    "LEGACY_REQUEST_ID_HEADER",
    "MAX_BODY_BYTES",
    "MAX_REQUEST_ID",
    "MAX_SERIAL_LENGTH",
    "PROVISIONERS_PATH",
    "REKEY_PATH",
    "RENEW_PATH",
    "REQUEST_ID_HEADER",
    "REVOKE_PATH",
    "ROOTS_PATH",
    "ROOTS_PEM_PATH",
    "ROOT_PATH",
    "SIGN_PATH",
    "SSH_SIGN_PATH",
    "VERSION_PATH",
    "CRLResponse",
    "ErrorBody",
    "FederationEntry",
    "FederationSourcesResponse",
    "HealthResponse",
    "ProtocolError",
    "ProvisionerKeyResponse",
    "ProvisionersResponse",
    "RekeyRequest",
    "RevokeRequest",
    "RevokeResponse",
    "RootResponse",
    "RootsResponse",
    "SignRequest",
    "SignResponse",
    "TimeDuration",
    "VersionResponse",
    "encrypted_key_path",
    "error_message",
    "new_request_id",
    "parse_serial",
    "read_request_id",
    "root_path",
    "token_audience",
]

API_PREFIX = "/1.0"  # every route is served at /X and at /1.0/X

# Paths (docs/protocol.md, "Endpoints"). Clients call the unversioned ones, as step's do;
# tokens name the versioned ones in ``aud``.
HEALTH_PATH = "/health"
VERSION_PATH = "/version"
ROOTS_PATH = "/roots"
ROOTS_PEM_PATH = "/roots.pem"
FEDERATION_PATH = "/federation"
INTERMEDIATES_PATH = "/intermediates"  # step-ca 0.27.3 and later
INTERMEDIATES_PEM_PATH = "/intermediates.pem"
CRL_PATH = "/crl"  # step-ca 0.23 and later, when ca.json's crl block enables it
CRL_PEM_QUERY = "pem"  # GET /crl?pem (any value, or none) asks for PEM
ROOT_PATH = "/root/{sha}"
PROVISIONERS_PATH = "/provisioners"
ENCRYPTED_KEY_PATH = "/provisioners/{kid}/encrypted-key"
SIGN_PATH = "/sign"
RENEW_PATH = "/renew"
LEGACY_RENEW_PATH = "/re-sign"  # step-ca's old name for /renew
REKEY_PATH = "/rekey"
REVOKE_PATH = "/revoke"
SSH_SIGN_PATH = "/ssh/sign"  # not served; a sign token may name it in ``aud``
REQUEST_ID_HEADER = "X-Request-Id"  # step-ca 0.26 and later: sent by clients, echoed back


# What a client takes from a CA's X-Request-Id answer header (docs/protocol.md, "Request
# ids"): step's ids are UUIDs (clients) or xids (0.19's logs); anything longer or with other
# characters is not a request id, and is neither logged nor quoted in an error.
LEGACY_REQUEST_ID_HEADER = "X-Smallstep-Id"  # what step-ca reads when X-Request-Id is absent
MAX_REQUEST_ID = 128  # characters of a request id either side keeps
# A plain token: what step's clients and the CA generate (UUIDs, xids) fits, and no id with
# spaces, markup or control characters reaches a log line or a header.
_REQUEST_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:/+=@~-]{{0,{MAX_REQUEST_ID - 1}}}")


def new_request_id() -> str:
    """A fresh request id for one call: a random UUID, as step's clients send."""
    return str(uuid.uuid4())


def read_request_id(value: str | None) -> str | None:
    """A request id read from a header (docs/protocol.md, "Request ids"): the id a CA echoed
    (None when it sent none, as step-ca before 0.26) or a client's; None too when it is not a
    plain id of at most ``MAX_REQUEST_ID`` characters."""
    if value is None:
        return None
    value = value.strip()
    return value if _REQUEST_ID.fullmatch(value) else None


def root_path(sha: str) -> str:
    """``/root/{sha}`` for a root's SHA-256 fingerprint (hex)."""
    return ROOT_PATH.format(sha=sha)


def encrypted_key_path(kid: str) -> str:
    """``/provisioners/{kid}/encrypted-key`` for a provisioner's key id."""
    return ENCRYPTED_KEY_PATH.format(kid=kid)


def token_audience(ca_url: str, path: str) -> str:
    """The ``aud`` a step token names for an operation at a CA: ``<ca-url>/1.0<path>``
    (``SIGN_PATH``, ``REVOKE_PATH`` or ``RENEW_PATH``)."""
    return ca_url.rstrip("/") + API_PREFIX + path


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_BODY_BYTES = 64 * 1024  # a CSR and a token are a few KiB; the CA refuses more

# step-ca's generic messages (errs/error.go); the specific reason goes to the CA log only.
_SEE_LOGS = "Please see the certificate authority logs for more info."
_MESSAGES = {
    400: "The request could not be completed; malformed or missing data. " + _SEE_LOGS,
    401: "The request lacked necessary authorization to be completed. " + _SEE_LOGS,
    403: "The request was forbidden by the certificate authority. " + _SEE_LOGS,
    404: "The requested resource could not be found. " + _SEE_LOGS,
    405: "The request method is not allowed for this resource. " + _SEE_LOGS,
    413: f"The request body is larger than {MAX_BODY_BYTES} bytes. " + _SEE_LOGS,
    500: "The certificate authority encountered an Internal Server Error. " + _SEE_LOGS,
    501: "The requested method is not implemented by the certificate authority. " + _SEE_LOGS,
    # federatls's own (its database was busy; nothing was done): the same shape and tone.
    503: "The certificate authority is temporarily unavailable; retry later. " + _SEE_LOGS,
}


# GET /crl while ca.json's crl block does not enable it: step-ca wraps a 404 that its error
# package has no text for, and says so (errs.UnexpectedErr).
CRL_DISABLED_MESSAGE = (
    "The certificate authority received an unexpected HTTP status code - '404'. " + _SEE_LOGS
)


def error_message(status: int, reason: str | None = None) -> str:
    """The message step-ca puts in an error body for ``status``.

    400 and 403 carry the reason (``"The request could not be completed: <reason>."``);
    every other status has a fixed text, so a reason given for them stays in the log.
    """
    if reason and status == 400:
        return f"The request could not be completed: {reason}."
    if reason and status == 403:
        return f"The request was forbidden by the certificate authority: {reason}."
    return _MESSAGES.get(status, _MESSAGES[500])


class ProtocolError(BadMaterialError):
    """A body does not follow the protocol, or carries a CSR key the CA does not certify.
    ``status`` is what the CA answers (400, 403 or 501)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


def _json_object(body: bytes | str) -> dict[str, Any]:
    """A request's JSON object. A lone surrogate escape (``"\\ud800"``) in a field's string
    becomes U+FFFD, as Go's decoder (step-ca's) makes it: Python keeps it, and a string
    holding one cannot be encoded for the store or the log. Only top-level fields are
    read, so only they are mended."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("error reading request body") from exc
    if not isinstance(data, dict):
        raise ProtocolError("error reading request body")
    # In UTF-8 bytes a surrogate can only arrive escaped.
    if not isinstance(body, bytes) or b"\\u" in body:
        data = {
            k: _LONE_SURROGATE.sub("\ufffd", v) if isinstance(v, str) else v
            for k, v in data.items()
        }
    return data


def _opt_str(data: Mapping[str, Any], name: str) -> str:
    """A string field as Go decodes it: absent or null is "", any other type is an error."""
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError("error reading request body")
    return value


@functools.lru_cache(maxsize=64)  # the CA's own certificates recur in every answer
def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _request_csr(data: Mapping[str, Any]) -> x509.CertificateSigningRequest:
    pem = _opt_str(data, "csr")
    if pem in ("", "null"):
        raise ProtocolError("missing csr")
    try:
        csr = load_pem_csr(pem)
    except BadMaterialError as exc:
        raise ProtocolError("error reading request body") from exc
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ProtocolError("invalid csr") from exc
    # The key's type and size first: verifying the signature of a huge RSA key would cost.
    refusal = csr_key_refusal(key)
    if refusal is not None:
        raise ProtocolError(refusal, 403)
    try:
        valid = csr.is_signature_valid
        _ = csr.extensions  # a malformed extension shows here, not later
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension) as exc:
        raise ProtocolError("invalid csr") from exc
    if not valid:
        raise ProtocolError("invalid csr")
    return csr


@dataclass(frozen=True)
class TimeDuration:
    """A ``notBefore``/``notAfter`` value: an absolute RFC 3339 time or a Go duration from now."""

    absolute: datetime | None = None
    relative: timedelta | None = None

    @classmethod
    def parse(cls, value: object) -> TimeDuration | None:
        """None for absent/empty; raises ``ValueError`` for anything else that is not valid."""
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ValueError(f"time or duration must be a string, got {value!r}")
        if value[:1].isdigit() and "T" in value:
            try:
                when = datetime.fromisoformat(value)
            except ValueError as exc:
                raise ValueError(f"invalid RFC 3339 time {value!r}") from exc
            if when.tzinfo is None:
                raise ValueError(f"RFC 3339 time {value!r} has no time zone")
            return cls(absolute=when)
        return cls(relative=parse_go_duration(value))

    def resolve(self, base: datetime) -> datetime:
        """The absolute time: itself, or ``base`` plus the duration."""
        if self.absolute is not None:
            return self.absolute
        return base + (self.relative or timedelta(0))

    def to_json(self) -> str:
        if self.absolute is not None:
            return self.absolute.isoformat().replace("+00:00", "Z")
        return format_go_duration(self.relative or timedelta(0))


def _time_field(data: Mapping[str, Any], name: str) -> TimeDuration | None:
    try:
        return TimeDuration.parse(data.get(name))
    except ValueError as exc:
        raise ProtocolError("error reading request body") from exc


@dataclass(frozen=True)
class SignRequest:
    """``POST /sign``: a CSR, the one-time token, optional validity bounds."""

    csr: x509.CertificateSigningRequest
    ott: str
    not_before: TimeDuration | None = None
    not_after: TimeDuration | None = None
    template_data: Any = None

    @classmethod
    def parse(cls, body: bytes | str) -> SignRequest:
        """Validate as step-ca does: 400 ``error reading request body`` / ``missing csr`` /
        ``invalid csr`` / ``missing ott``."""
        data = _json_object(body)
        ott = _opt_str(data, "ott")
        not_before = _time_field(data, "notBefore")
        not_after = _time_field(data, "notAfter")
        csr = _request_csr(data)
        if not ott:
            raise ProtocolError("missing ott")
        return cls(csr, ott, not_before, not_after, data.get("templateData"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"csr": _csr_pem(self.csr), "ott": self.ott}
        if self.not_before is not None:
            out["notBefore"] = self.not_before.to_json()
        if self.not_after is not None:
            out["notAfter"] = self.not_after.to_json()
        if self.template_data is not None:
            out["templateData"] = self.template_data
        return out


@dataclass(frozen=True)
class RekeyRequest:
    """``POST /rekey`` (mTLS): a CSR carrying the new public key."""

    csr: x509.CertificateSigningRequest

    @classmethod
    def parse(cls, body: bytes | str) -> RekeyRequest:
        return cls(_request_csr(_json_object(body)))

    def to_json(self) -> dict[str, Any]:
        return {"csr": _csr_pem(self.csr)}


MAX_SERIAL_LENGTH = 256  # characters; a certificate's serial has at most 20 octets (RFC 5280)
_SERIAL = re.compile(
    r"[+-]?(?:0[xX](?:_?[0-9a-fA-F])+|0[bB](?:_?[01])+|0[oO](?:_?[0-7])+|0(?:_?[0-7])*"
    r"|[1-9](?:_?[0-9])*)"
)
_SERIAL_BASES = {"x": 16, "b": 2, "o": 8}


def parse_serial(text: str) -> str | None:
    """A revoke request's serial in decimal, read as step-ca (0.22 on) reads it: Go's
    ``big.Int.SetString(s, 0)``. An optional sign, then ``0x``/``0X`` hex, ``0b`` binary,
    ``0o`` or a bare leading ``0`` octal, else decimal; an underscore may stand between
    digits or after a prefix. None when the text is none of these, or longer than
    ``MAX_SERIAL_LENGTH`` (Go reads any length; no serial that long was ever issued)."""
    if len(text) > MAX_SERIAL_LENGTH or not _SERIAL.fullmatch(text):
        return None
    negative = text[0] == "-"
    digits = text.lstrip("+-").replace("_", "")
    base = 10
    if len(digits) > 1 and digits[0] == "0":
        prefixed = digits[1].lower() in _SERIAL_BASES
        base = _SERIAL_BASES[digits[1].lower()] if prefixed else 8
        digits = digits[2:] if prefixed else digits[1:]
    value = int(digits, base)
    return str(-value if negative else value)


@dataclass(frozen=True)
class RevokeRequest:
    """``POST /revoke``: the decimal serial, and a token unless the call is over mTLS."""

    serial: str
    ott: str = ""
    reason_code: int = 0
    reason: str = ""
    passive: bool = True

    @classmethod
    def parse(cls, body: bytes | str) -> RevokeRequest:
        """step-ca's checks in its order: ``missing serial``, a malformed serial (0.22), then
        ``reasonCode out of bounds``, and 501 for a non-passive revocation. ``serial`` comes
        out in decimal (``parse_serial``)."""
        data = _json_object(body)
        serial = _opt_str(data, "serial")
        ott = _opt_str(data, "ott")
        reason = _opt_str(data, "reason")
        code = data.get("reasonCode", 0)
        if code is None:
            code = 0
        if isinstance(code, bool) or not isinstance(code, int):
            raise ProtocolError("error reading request body")
        passive = data.get("passive", False)
        if passive is None:
            passive = False
        if not isinstance(passive, bool):
            raise ProtocolError("error reading request body")
        if not serial:
            raise ProtocolError("missing serial")
        decimal = parse_serial(serial)
        if decimal is None:
            raise ProtocolError(
                f"'{serial}' is not a valid serial number - use a base 10 representation or a "
                "base 16 representation with '0x' prefix"
            )
        serial = decimal
        if not 0 <= code <= 10:
            raise ProtocolError("reasonCode out of bounds")
        if not passive:
            raise ProtocolError("non-passive revocation not implemented", status=501)
        return cls(serial, ott, code, reason, passive)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "serial": self.serial,
            "reasonCode": self.reason_code,
            "reason": self.reason,
            "passive": self.passive,
        }
        if self.ott:
            out["ott"] = self.ott
        return out


def _answer_object(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise BadMaterialError(f"{what}: the CA's answer is not a JSON object")
    return data


def _answer_str(data: Mapping[str, Any], name: str, what: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise BadMaterialError(f"{what}: field '{name}' must be a string")
    return value


def _answer_certs(data: Mapping[str, Any], name: str, what: str) -> list[x509.Certificate]:
    items = data.get(name)
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise BadMaterialError(f"{what}: field {name!r} must be a list of PEM certificates")
    return [load_pem_certificate(pem, f"{what}: {name}[{i}]") for i, pem in enumerate(items)]


@dataclass(frozen=True)
class SignResponse:
    """The answer of ``/sign``, ``/renew`` and ``/rekey`` (201).

    ``chain`` is leaf first then intermediates (step's ``certChain``), never the root.
    """

    chain: tuple[x509.Certificate, ...]
    tls_options: Mapping[str, Any] | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def to_json(self) -> dict[str, Any]:
        pems = [_cert_pem(c) for c in self.chain]
        out: dict[str, Any] = {
            "crt": pems[0],
            "ca": pems[1] if len(pems) > 1 else None,
            "certChain": pems,
        }
        if self.tls_options is not None:
            out["tlsOptions"] = dict(self.tls_options)
        return out

    @classmethod
    def parse(cls, data: object) -> SignResponse:
        what = "sign response"
        obj = _answer_object(data, what)
        crt = obj.get("crt")
        if not isinstance(crt, str):
            raise BadMaterialError(f"{what}: field 'crt' must be a PEM certificate")
        leaf = load_pem_certificate(crt, f"{what}: crt")
        if "certChain" in obj and obj["certChain"] is not None:
            chain = _answer_certs(obj, "certChain", what)
            if not chain or chain[0] != leaf:
                raise BadMaterialError(f"{what}: certChain does not start with crt")
        else:  # step-ca before 0.15 sent only crt and ca
            ca = obj.get("ca")
            chain = [leaf] + (
                [load_pem_certificate(ca, f"{what}: ca")] if isinstance(ca, str) else []
            )
        opts = obj.get("tlsOptions")
        return cls(tuple(chain), opts if isinstance(opts, Mapping) else None)


@dataclass(frozen=True)
class RootsResponse:
    """``/roots`` (own roots) and ``/federation`` (own roots + federated roots): 201."""

    certificates: tuple[x509.Certificate, ...]

    def to_json(self) -> dict[str, Any]:
        return {"crts": [_cert_pem(c) for c in self.certificates]}

    @classmethod
    def parse(cls, data: object, what: str = "roots response") -> RootsResponse:
        certs = _answer_certs(_answer_object(data, what), "crts", what)
        if not certs:
            raise BadMaterialError(f"{what}: the CA sent no certificate")
        return cls(tuple(certs))


@dataclass(frozen=True)
class RootResponse:
    """``/root/{sha}``: one root certificate."""

    certificate: x509.Certificate

    def to_json(self) -> dict[str, Any]:
        return {"ca": _cert_pem(self.certificate)}

    @classmethod
    def parse(cls, data: object) -> RootResponse:
        obj = _answer_object(data, "root response")
        pem = obj.get("ca")
        if not isinstance(pem, str):
            raise BadMaterialError("root response: field 'ca' must be a PEM certificate")
        return cls(load_pem_certificate(pem, "root response: ca"))


# federatls's own route, beside step's flat /federation: the federation with its structure
# (docs/protocol.md, "federatls endpoints"). A plain step-ca answers it 404.
FEDERATION_SOURCES_PATH = "/federatls/federation"
_SOURCE_KINDS = ("own", "static", "peer")


@dataclass(frozen=True)
class FederationEntry:
    """One source of a CA's federation: its own roots (``own``), its static
    ``federatedRoots`` (``static``), or the current roots of the peer ``name`` (``peer``).
    ``names`` are the name patterns (NamePattern syntax, not parsed here) its roots may vouch
    for; None (own and static) means any name."""

    kind: str
    name: str | None
    roots: tuple[x509.Certificate, ...]
    names: tuple[str, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "roots": [_cert_pem(c) for c in self.roots],
            "names": None if self.names is None else list(self.names),
        }

    @classmethod
    def parse(cls, data: object, where: str) -> FederationEntry:
        obj = _answer_object(data, where)
        kind, name, names = obj.get("kind"), obj.get("name"), obj.get("names")
        if kind not in _SOURCE_KINDS:
            raise BadMaterialError(f"{where}: 'kind' must be one of {_SOURCE_KINDS}, not {kind!r}")
        if not (name is None or isinstance(name, str)):
            raise BadMaterialError(f"{where}: 'name' must be a string or null")
        if kind == "peer" and not name:
            raise BadMaterialError(f"{where}: a peer source must have a 'name'")
        if names is not None and not (
            isinstance(names, list) and all(isinstance(n, str) for n in names)
        ):
            raise BadMaterialError(f"{where}: 'names' must be a list of strings or null")
        if kind == "peer" and names is None:  # a peer never vouches for any name at all
            raise BadMaterialError(f"{where}: peer {name!r} has no 'names'")
        roots = _answer_certs(obj, "roots", where)
        return cls(kind, name, tuple(roots), None if names is None else tuple(names))


@dataclass(frozen=True)
class FederationSourcesResponse:
    """``/federatls/federation`` (200, federatls only): the federation with its structure,
    each source's roots and the names they may vouch for. Unknown fields are ignored; an
    unknown ``kind`` or a peer without ``names`` refuses the whole answer."""

    sources: tuple[FederationEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"sources": [s.to_json() for s in self.sources]}

    @classmethod
    def parse(cls, data: object) -> FederationSourcesResponse:
        what = "federation sources response"
        items = _answer_object(data, what).get("sources")
        if not isinstance(items, list):
            raise BadMaterialError(f"{what}: field 'sources' must be a list")
        entries = (FederationEntry.parse(x, f"{what}: sources[{i}]") for i, x in enumerate(items))
        return cls(tuple(entries))


@dataclass(frozen=True)
class VersionResponse:
    version: str
    require_client_authentication: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        if self.require_client_authentication:  # omitempty, as step-ca
            out["requireClientAuthentication"] = True
        return out

    @classmethod
    def parse(cls, data: object) -> VersionResponse:
        obj = _answer_object(data, "version response")
        version = _answer_str(obj, "version", "version response")
        return cls(version, obj.get("requireClientAuthentication") is True)


@dataclass(frozen=True)
class HealthResponse:
    status: str = "ok"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status}

    @classmethod
    def parse(cls, data: object) -> HealthResponse:
        obj = _answer_object(data, "health response")
        return cls(_answer_str(obj, "status", "health response"))


@dataclass(frozen=True)
class RevokeResponse:
    status: str = "ok"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status}


@dataclass(frozen=True)
class ProvisionersResponse:
    """``/provisioners``: one page of provisioners (as in ca.json) and the next cursor."""

    provisioners: tuple[Mapping[str, Any], ...]
    next_cursor: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "provisioners": [dict(p) for p in self.provisioners],
            "nextCursor": self.next_cursor,
        }

    @classmethod
    def parse(cls, data: object) -> ProvisionersResponse:
        obj = _answer_object(data, "provisioners response")
        items = obj.get("provisioners")
        if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
            raise BadMaterialError(
                "provisioners response: 'provisioners' must be a list of objects"
            )
        cursor = obj.get("nextCursor") or ""
        if not isinstance(cursor, str):
            raise BadMaterialError("provisioners response: 'nextCursor' must be a string")
        return cls(tuple(items), cursor)


@dataclass(frozen=True)
class ProvisionerKeyResponse:
    """``/provisioners/{kid}/encrypted-key``: the provisioner's encrypted private JWK."""

    key: str

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key}

    @classmethod
    def parse(cls, data: object) -> ProvisionerKeyResponse:
        obj = _answer_object(data, "encrypted-key response")
        return cls(_answer_str(obj, "key", "encrypted-key response"))


@dataclass(frozen=True)
class ErrorBody:
    """step-ca's error body ``{"status": N, "message": "..."}``."""

    status: int
    message: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def for_status(cls, status: int, reason: str | None = None) -> ErrorBody:
        return cls(status, error_message(status, reason))

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message}

    @classmethod
    def parse(cls, status: int, body: bytes) -> ErrorBody:
        """Tolerant: a CA (or a proxy) may answer an error with anything at all."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            text = body[:200].decode("utf-8", "replace").strip()
            return cls(status, text or f"HTTP {status} with an empty body")
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return cls(status, data["message"], data)
        return cls(status, json.dumps(data)[:200])


@dataclass(frozen=True)
class CRLResponse:
    """``GET /crl``'s answer (docs/protocol.md, "CRL"): the CRL in DER, or in PEM (``X509
    CRL``, 64-character lines) when the query has ``pem``; its ``nextUpdate`` in ``Expires``
    (HTTP's date format); the headers step-ca 0.30 sends (0.23 to 0.29 named the DER file
    ``crl.der``; 0.23 to 0.25 sent no ``Expires``)."""

    der: bytes
    next_update: datetime

    def body(self, pem: bool) -> bytes:
        if not pem:
            return self.der
        b64 = base64.b64encode(self.der).decode()
        lines = "".join(b64[i : i + 64] + "\n" for i in range(0, len(b64), 64))
        return f"-----BEGIN X509 CRL-----\n{lines}-----END X509 CRL-----\n".encode()

    def headers(self, pem: bool) -> dict[str, str]:
        kind, name = (_PEM_FILE, "crl.pem") if pem else (_PKIX_CRL, "crl.crl")
        return {
            "Content-Type": kind,
            "Content-Disposition": f'attachment; filename="{name}"',
            "Expires": format_datetime(self.next_update.astimezone(UTC), usegmt=True),
        }

    @staticmethod
    def parse(body: bytes) -> x509.CertificateRevocationList:
        """The CRL in an answer, DER or PEM; ``BadMaterialError`` when it is neither (its
        signature is not checked here). A PEM answer is one ``X509 CRL`` block and nothing
        else but whitespace: the PEM loader reads the first such block and skips the rest
        (other blocks, markup), and the answer is written as served once its CRL verifies."""
        try:
            if body.lstrip().startswith(b"-----BEGIN"):
                if not _ONE_PEM_CRL.fullmatch(body):
                    raise ValueError("a PEM answer must be one X509 CRL block and nothing else")
                return x509.load_pem_x509_crl(body)
            return x509.load_der_x509_crl(body)
        except ValueError as exc:
            raise BadMaterialError(f"the CA's answer is not a CRL: {exc}") from exc


_ONE_PEM_CRL = re.compile(
    rb"\s*-----BEGIN X509 CRL-----\r?\n[A-Za-z0-9+/=\r\n]+-----END X509 CRL-----\s*"
)


_PKIX_CRL, _PEM_FILE = "application/pkix-crl", "application/x-pem-file"
