"""One-time tokens (OTT): the ES256 JWTs of step's JWK provisioners.

Here: parse a token without verifying it (what a client does to find its CA), mint one
(exactly the claims of ``step ca token``), verify its signature and time claims, and check
its binding to one certificate request, ``cnf`` (what the CA does). Not here: which
provisioner a token belongs to, replay protection, I/O. Pure: the time is always passed in.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.registry import HeaderParameter

from ._errors import TokenError
from ._jwk import ProvisionerKey, PublicJWK
from ._keys import ec_jws_algorithm
from ._protocol import RENEW_PATH, REVOKE_PATH, SIGN_PATH, token_audience

__all__ = [
    "DEFAULT_VALIDITY",
    "LEEWAY",
    "MAX_VALIDITY",
    "MIN_VALIDITY",
    "Token",
    "csr_fingerprint",
    "mint_renew_token",
    "mint_token",
    "renew_audience",
    "revoke_audience",
    "sign_audience",
]

DEFAULT_VALIDITY = timedelta(minutes=5)  # step's token.DefaultValidity
MIN_VALIDITY = timedelta(seconds=10)  # step's token.MinValidity
MAX_VALIDITY = timedelta(hours=1)  # step's token.MaxValidity
LEEWAY = timedelta(minutes=1)  # step-ca validates exp/nbf/iat with one minute of leeway
MAX_TOKEN_LENGTH = 16 * 1024  # far above any real token; refuses absurd input early
_MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z: the last second a datetime can hold
_MAX_HEADER = 8 * 1024  # renew tokens carry a certificate chain in their header


def sign_audience(ca_url: str) -> str:
    """The ``aud`` of a sign token for a CA URL: ``<ca-url>/1.0/sign``."""
    return token_audience(ca_url, SIGN_PATH)


def revoke_audience(ca_url: str) -> str:
    """The ``aud`` of a revoke token for a CA URL: ``<ca-url>/1.0/revoke``."""
    return token_audience(ca_url, REVOKE_PATH)


def _epoch(dt: datetime) -> int:
    if dt.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return math.floor(dt.timestamp())


CONFIRMATION_CLAIM = "x5rt#S256"  # cnf's member: the bound request's SHA-256 (RFC 8705)
_BASE64URL = re.compile("[A-Za-z0-9_-]*")


def csr_fingerprint(csr: x509.CertificateSigningRequest) -> str:
    """What a token's ``cnf.x5rt#S256`` holds to bind it to ``csr``: the unpadded base64url
    SHA-256 of the request's DER (as ``step ca token --cnf-file`` computes it)."""
    digest = hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _mended(value: Any) -> Any:
    """A claim as Go's decoder (step-ca's) reads it: a lone surrogate escape ("\\ud800")
    in a string, or in a list's strings, becomes U+FFFD. Python keeps it, and a string
    holding one cannot be encoded for the store or the log (a ``jti`` of one was a 500)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_mended(v) for v in value]
    return value


@dataclass(frozen=True)
class Token:
    """A parsed, *unverified* one-time token. ``verify`` and ``check_times`` validate it."""

    raw: str
    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    _signed: Any = field(repr=False, compare=False)

    @classmethod
    def parse(cls, raw: str) -> Token:
        """Decode a compact JWS without verifying it; ``TokenError`` says what is wrong."""
        if not isinstance(raw, str):
            raise TokenError("token must be a string")
        raw = raw.strip()
        if len(raw) > MAX_TOKEN_LENGTH:
            raise TokenError(f"token is {len(raw)} characters long, more than {MAX_TOKEN_LENGTH}")
        if raw.count(".") != 2:
            raise TokenError("token is not a compact JWS: it must have three dot-separated parts")
        try:
            signed = jws.extract_compact(raw.encode("ascii"), registry=_registry(None))
            header = signed.headers()
            claims = json.loads(signed.payload)
        except (JoseError, ValueError, TypeError, UnicodeError, RecursionError) as exc:
            raise TokenError(f"token cannot be decoded: {exc}") from exc
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise TokenError("token header and claims must be JSON objects")
        if b"\\u" in signed.payload:  # in UTF-8 a lone surrogate can only arrive escaped
            claims = {k: _mended(v) for k, v in claims.items()}
        token = cls(raw=raw, header=header, claims=claims, _signed=signed)
        token._check_types()
        return token

    def _check_types(self) -> None:
        for name in ("iss", "sub", "jti", "sha"):
            if name in self.claims and not isinstance(self.claims[name], str):
                raise TokenError(f"token claim {name!r} must be a string")
        for name in ("exp", "nbf", "iat"):
            value = self.claims.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TokenError(f"token claim {name!r} must be a number of seconds")
            # A float compare never overflows (huge ints compare exactly); NaN fails it.
            if not 0 <= value <= _MAX_TIME:
                raise TokenError(f"token claim {name!r} is out of range")
        aud = self.claims.get("aud")
        if aud is not None and not (
            isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
        ):
            raise TokenError("token claim 'aud' must be a string or a list of strings")
        sans = self.claims.get("sans")
        if sans is not None and not (
            isinstance(sans, list) and all(isinstance(s, str) for s in sans)
        ):
            raise TokenError("token claim 'sans' must be a list of strings")
        if not isinstance(self.header.get("alg"), str):
            raise TokenError("token header has no 'alg'")
        if "kid" in self.header and not isinstance(self.header["kid"], str):
            raise TokenError("token header 'kid' must be a string")
        cnf = self.claims.get("cnf")
        if cnf is not None and not (
            isinstance(cnf, dict) and isinstance(cnf.get(CONFIRMATION_CLAIM, ""), str)
        ):
            raise TokenError(
                f"token claim 'cnf' must be an object whose {CONFIRMATION_CLAIM!r} is a string"
            )

    # Typed views of the claims.
    @property
    def issuer(self) -> str:
        return str(self.claims.get("iss", ""))

    @property
    def subject(self) -> str:
        return str(self.claims.get("sub", ""))

    @property
    def audience(self) -> tuple[str, ...]:
        aud = self.claims.get("aud")
        if aud is None:
            return ()
        return (aud,) if isinstance(aud, str) else tuple(aud)

    @property
    def token_id(self) -> str:
        return str(self.claims.get("jti", ""))

    @property
    def sans(self) -> tuple[str, ...]:
        return tuple(self.claims.get("sans") or ())

    @property
    def digest(self) -> str:
        """Hex SHA-256 of what the signature covers, decoded: the protected header's bytes
        (length-prefixed) and the payload's bytes. It names the token, not its encoding:
        whitespace around it (``parse`` strips it), how its segments are base64-encoded and
        its signature (ECDSA's (r, s) and (r, n - s) both verify) leave it unchanged. The CA
        spends a token without ``jti`` under this digest."""
        header = base64.urlsafe_b64decode(_padded(self._signed.segments["header"]))
        payload: bytes = self._signed.payload
        digest = hashlib.sha256(len(header).to_bytes(8, "big"))
        digest.update(header)
        digest.update(payload)
        return digest.hexdigest()

    @property
    def root_fingerprint(self) -> str | None:
        """The ``sha`` claim: hex SHA-256 of the CA's root, lower-cased, or None."""
        sha = self.claims.get("sha")
        return sha.lower().replace("-", "") if isinstance(sha, str) and sha else None

    @property
    def kid(self) -> str:
        return str(self.header.get("kid", ""))

    @property
    def confirmation(self) -> str | None:
        """The ``cnf`` claim's ``x5rt#S256``: the base64url SHA-256 of the one certificate
        request the token may buy a certificate for (``csr_fingerprint``), or None when the
        token binds none (an empty value binds none, as in step-ca). Not decoded here:
        ``confirms`` does that."""
        cnf = self.claims.get("cnf")
        value = cnf.get(CONFIRMATION_CLAIM) if isinstance(cnf, dict) else None
        return value if isinstance(value, str) and value else None

    def confirms(self, csr: x509.CertificateSigningRequest) -> bool:
        """Whether the token may buy a certificate for ``csr``: True when it binds no
        request, else whether the bound fingerprint is this request's. ``TokenError`` when
        the bound value is not unpadded base64url (step-ca's 403 "error decoding
        fingerprint")."""
        bound = self.confirmation
        if bound is None:
            return True
        text = bound.replace("\r", "").replace("\n", "")  # Go's decoder skips line breaks
        if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
            raise TokenError(f"token claim 'cnf' holds {bound!r}, not unpadded base64url")
        expected = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        actual = hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).digest()
        return hmac.compare_digest(expected, actual)

    @property
    def alg(self) -> str:
        return str(self.header["alg"])

    def _time(self, name: str) -> float | None:
        value = self.claims.get(name)
        return None if value is None else float(value)

    @property
    def issued_at(self) -> float | None:
        return self._time("iat")

    @property
    def expires_at(self) -> float | None:
        return self._time("exp")

    @property
    def not_before(self) -> float | None:
        return self._time("nbf")

    def ca_url(self) -> str:
        """The CA's base URL (scheme, host, port) from the first audience.

        Raises ``TokenError`` when the token has no ``aud`` or it is not an http(s) URL.
        """
        if not self.audience:
            raise TokenError("token has no 'aud' claim: the CA URL travels in it")
        aud = self.audience[0]
        parts = urlsplit(aud)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise TokenError(f"token audience {aud!r} is not an https URL of a CA")
        try:
            _ = parts.port
        except ValueError as exc:
            raise TokenError(f"token audience {aud!r} has an invalid port") from exc
        return f"{parts.scheme}://{parts.netloc}"

    def verify(self, key: PublicJWK) -> None:
        """Check the signature with a provisioner's public key (``TokenError`` if it fails)."""
        if self.alg != key.alg:
            raise TokenError(
                f"token is signed with {self.alg!r} but the provisioner key uses {key.alg!r}"
            )
        self._verify(key.key, key.alg)

    def verify_with_certificate(self, cert: x509.Certificate) -> None:
        """Check the signature with a certificate's public key (renew tokens)."""
        jwk, alg = _public_jwk(cert.public_key())
        if self.alg != alg:
            raise TokenError(
                f"token is signed with {self.alg!r}, the certificate key needs {alg!r}"
            )
        self._verify(jwk, alg)

    def _verify(self, key: ECKey | RSAKey | OKPKey, alg: str) -> None:
        try:
            ok = jws.validate_compact(self._signed, key, registry=_registry(alg))
        except (JoseError, ValueError, TypeError) as exc:
            raise TokenError(f"token signature cannot be checked: {exc}") from exc
        if not ok:
            raise TokenError("token signature does not verify")

    def check_times(self, now: datetime, leeway: timedelta = LEEWAY) -> None:
        """Check ``exp``, ``nbf`` and ``iat`` against ``now`` with step-ca's leeway.

        Unlike go-jose, a token without ``exp`` is refused: a one-time token must expire.
        """
        t = now.timestamp()
        lw = leeway.total_seconds()
        exp = self.expires_at
        if exp is None:
            raise TokenError("token has no expiry (exp)")
        if t - lw > exp:
            raise TokenError("token is expired (exp)")
        nbf = self.not_before
        if nbf is not None and t + lw < nbf:
            raise TokenError("token not valid yet (nbf)")
        iat = self.issued_at
        if iat is not None and t + lw < iat:
            raise TokenError("token issued in the future (iat)")


def mint_token(
    key: ProvisionerKey,
    *,
    issuer: str,
    subject: str,
    audience: str,
    now: datetime,
    sans: Sequence[str] = (),
    root_fingerprint: str | None = None,
    validity: timedelta = DEFAULT_VALIDITY,
    token_id: str | None = None,
    csr: x509.CertificateSigningRequest | None = None,
) -> str:
    """Sign a one-time token with exactly the claims ``step ca token`` puts in one.

    ``iat`` = ``nbf`` = now, ``exp`` = now + validity (10 s to 1 h, as step allows),
    ``sans`` defaults to ``[subject]``, ``jti`` is 256 random bits in hex. With ``csr`` the
    token binds that request (``cnf``, as ``step ca token --cnf-file``): a CA of step-ca
    0.27.3 or later, or federatls, signs no other request with it; step-ca 0.19 ignores it.
    """
    if not issuer:
        raise TokenError("token issuer (provisioner name) cannot be empty")
    if not subject:
        raise TokenError("token subject cannot be empty")
    if not audience:
        raise TokenError("token audience cannot be empty")
    if not MIN_VALIDITY <= validity <= MAX_VALIDITY:
        raise TokenError(
            f"token validity must be between {MIN_VALIDITY} and {MAX_VALIDITY}, not {validity}"
        )
    iat = _epoch(now)
    claims: dict[str, Any] = {
        "aud": audience,
        "exp": iat + math.floor(validity.total_seconds()),
        "iat": iat,
        "iss": issuer,
        "jti": token_id or secrets.token_hex(32),
        "nbf": iat,
        "sans": list(sans) or [subject],
    }
    if root_fingerprint:
        claims["sha"] = root_fingerprint.lower()
    claims["sub"] = subject
    if csr is not None:
        claims["cnf"] = {CONFIRMATION_CLAIM: csr_fingerprint(csr)}
    header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
    payload = json.dumps(claims, separators=(",", ":"))
    return jws.serialize_compact(header, payload, key.key, algorithms=[key.alg])


def renew_audience(ca_url: str) -> str:
    """The ``aud`` of a renew token for a CA URL: ``<ca-url>/1.0/renew``."""
    return token_audience(ca_url, RENEW_PATH)


def mint_renew_token(
    chain: Sequence[x509.Certificate],
    key: PrivateKeyTypes,
    *,
    audience: str,
    now: datetime,
    validity: timedelta = DEFAULT_VALIDITY,
) -> str:
    """A ``Bearer`` renew token (step-ca 0.19): signed by the certificate's own key, the chain
    in the ``x5cInsecure`` header, ``iss`` = ``step-ca-client/1.0``, ``sub`` = the leaf's CN.

    It lets a certificate be renewed without mTLS (for example behind a TLS-terminating
    proxy, or after expiry where the CA allows it).
    """
    if not chain:
        raise TokenError("a renew token needs the certificate chain")
    jwk, alg = _signing_jwk(key)
    iat = _epoch(now)
    cn = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    claims = {
        "aud": audience,
        "exp": iat + math.floor(validity.total_seconds()),
        "iat": iat,
        "iss": RENEW_TOKEN_ISSUER,
        "jti": secrets.token_hex(32),
        "nbf": iat,
        "sub": str(cn[0].value) if cn else "",
    }
    header = {
        "alg": alg,
        "typ": "JWT",
        "x5cInsecure": [
            base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain
        ],
    }
    payload = json.dumps(claims, separators=(",", ":"))
    return jws.serialize_compact(header, payload, jwk, registry=_registry(alg))


def _padded(segment: bytes) -> bytes:
    return segment + b"=" * (-len(segment) % 4)


RENEW_TOKEN_ISSUER = "step-ca-client/1.0"  # noqa: S105 (an issuer name, not a secret)
_X5C_HEADER = HeaderParameter("step's certificate chain, not verified by JOSE", "list[str]")


@functools.lru_cache(maxsize=16)
def _registry(alg: str | None) -> jws.JWSRegistry:
    """Only ``alg`` is allowed; step's ``x5cInsecure`` header is known, not refused, and may
    be longer than joserfc's default 512 bytes (it holds a certificate chain)."""
    registry = jws.JWSRegistry(
        header_registry={"x5cInsecure": _X5C_HEADER}, algorithms=[alg] if alg else None
    )
    registry.max_header_length = _MAX_HEADER
    return registry


def _public_jwk(key: object) -> tuple[ECKey | RSAKey | OKPKey, str]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = ec_jws_algorithm(key.curve)
        if alg is None:
            raise TokenError(f"unsupported curve {key.curve.name}")
        return ECKey.import_key(key), alg
    if isinstance(key, rsa.RSAPublicKey):
        return RSAKey.import_key(key), "RS256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return OKPKey.import_key(key), "EdDSA"
    raise TokenError(f"unsupported key type {type(key).__name__}")


def _signing_jwk(key: PrivateKeyTypes) -> tuple[ECKey | RSAKey | OKPKey, str]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(key), _public_jwk(key.public_key())[1]
    if isinstance(key, rsa.RSAPrivateKey):
        return RSAKey.import_key(key), "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return OKPKey.import_key(key), "EdDSA"
    raise TokenError(f"unsupported key type {type(key).__name__}")
