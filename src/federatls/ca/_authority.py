"""The CA's decisions: which token, CSR, renewal or revocation to accept, in step-ca's order
and with step-ca's answers (docs/protocol.md, "Tokens" to "Revoke"), plus what federatls
checks better:

* a token's signature is verified *before* its ``jti`` is burnt, so nobody can burn other
  people's tokens with forged ones;
* a token must carry ``exp``; a revoke token whose ``sub`` is not the serial it revokes
  (403, as step-ca 0.29) is not spent;
* a token without ``jti`` is spent under a digest of its decoded content, not of its
  encoding, so no re-encoding of it buys a second certificate;
* a token whose names no certificate can carry, and a CSR key outside P-256, P-384, P-521,
  Ed25519 and RSA 2048-8192, get 403 before the token is spent;
* a sign, renewal or rekey whose names lie outside the name constraints of the CA
  certificates above the leaf (read from them at load) gets 403 (``_constraints``);
* only certificates this CA issued can be revoked.

Every refusal is a ``Refusal`` carrying the status, the specific reason (for the log) and, for
400/403, the reason step-ca also puts in the body. No HTTP, no sockets here; the time is
passed in. State goes through the ``Store``.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from .._duration import format_go_duration
from .._errors import TokenError
from .._keys import PublicKey, csr_key_refusal
from .._protocol import (
    API_PREFIX,
    RENEW_PATH,
    REVOKE_PATH,
    SIGN_PATH,
    SSH_SIGN_PATH,
    ErrorBody,
    RevokeRequest,
    SignRequest,
    TimeDuration,
)
from .._token import RENEW_TOKEN_ISSUER, Token
from .._version import __version__
from .._x509 import SANs, cert_sans, common_name, issued_by, may_sign, path_up, split_sans
from ._config import CAConfig, DurationClaims, JWKProvisioner
from ._constraints import constraints_refusal
from ._federation import FederationSource, PeerRoots, dedupe, shadows
from ._issuer import ProvisionerRef, issue_leaf, read_provisioner_extension, renew_leaf
from ._material import CAMaterial
from ._store import IssuedCertificate, ParentRevoked, Revocation, Store, TokenUse

__all__ = ["Authority", "Refusal"]

LEGACY_AUDIENCE = "step-certificate-authority"
MAX_COMMON_NAME_BYTES = 64  # X.520's upper bound, as cryptography applies it (UTF-8 bytes)
_DEFAULT_PAGE, _MAX_PAGE = 20, 100
_EXPIRED_PREFIX = "The request lacked necessary authorization to be completed"
_MAX_QUOTED = 128  # characters of a client's value a body quotes whole

TokenKind = Literal["sign", "revoke"]


class Refusal(Exception):
    """A request the CA refuses: ``status``, the specific ``reason`` for the log, and the
    body's ``message`` where step-ca words one of its own for this refusal."""

    def __init__(self, status: int, reason: str, *, message: str | None = None) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status}: {reason}")

    @property
    def body(self) -> ErrorBody:
        """step-ca's body: 400 and 403 say why; every other status says "see the logs",
        unless step-ca has a message of its own for the refusal (``message``)."""
        if self.message is not None:
            return ErrorBody(self.status, self.message)
        return ErrorBody.for_status(self.status, self.reason)


def _unauthorized(reason: str) -> Refusal:
    return Refusal(401, reason)


def _strip_port(url: str) -> tuple[str, str, str] | str:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return url
    if not parts.scheme or host is None:
        return url
    return (parts.scheme, host, parts.path)


class _AudienceSet:
    """Audiences a token may carry; step-ca's rule: equal, or equal once ports are removed."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._exact = frozenset(self.names)
        self._stripped = frozenset(_strip_port(n) for n in self.names)

    def matches(self, token_aud: Sequence[str]) -> bool:
        return any(a in self._exact or _strip_port(a) in self._stripped for a in token_aud)

    def __str__(self) -> str:
        return _go_list(self.names)


def _go_list(items: Sequence[object]) -> str:
    return "[" + " ".join(str(i) for i in items) + "]"


_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    '"': '\\"',
    "\\": "\\\\",
}


def _go_quote(text: str | None) -> str:
    """``text`` as Go's ``%q`` shows it (step-ca's bodies quote so): quoted, printable
    characters as they are, the rest escaped (so no control character reaches a body or the
    log raw), cut to ``_MAX_QUOTED`` characters first (a body never carries a client's
    kilobytes back)."""
    text = text or ""
    if len(text) > _MAX_QUOTED:
        text = text[:_MAX_QUOTED] + "..."
    out = []
    for ch in text:
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _serial(cert: x509.Certificate) -> str:
    return str(cert.serial_number)


@dataclass(frozen=True)
class _Audiences:
    sign: _AudienceSet
    revoke: _AudienceSet
    renew: _AudienceSet
    any_token: _AudienceSet  # where a provisioner is looked up (sign or revoke)

    @classmethod
    def for_hosts(cls, hosts: Sequence[str]) -> _Audiences:
        sign, revoke, renew = [LEGACY_AUDIENCE], [LEGACY_AUDIENCE], []
        for h in hosts:
            base = f"https://{h}"
            sign += [
                base + API_PREFIX + SIGN_PATH,
                base + SIGN_PATH,
                base + API_PREFIX + SSH_SIGN_PATH,
                base + SSH_SIGN_PATH,
            ]
            revoke += [base + API_PREFIX + REVOKE_PATH, base + REVOKE_PATH]
            renew += [base + API_PREFIX + RENEW_PATH, base + RENEW_PATH]
        return cls(
            _AudienceSet(sign),
            _AudienceSet(revoke),
            _AudienceSet(renew),
            _AudienceSet(sign + revoke),
        )


def _token_use(token: Token, provisioner: str, now: datetime, *, iat_checked: bool) -> TokenUse:
    """What spending a token records: its id, its provisioner and when it expires.

    The id is the ``jti``; without one (or with an empty one) it is ``Token.digest``, a
    digest of the decoded header and payload. step-ca hashes the raw token string instead,
    so whitespace around a token or its ECDSA signature re-encoded as (r, n - s) buys one
    more certificate there; here every encoding of one token has one id.

    The record is ``durable`` (synced to disk before the answer) unless losing it in a power
    cut could not reopen a replay: with ``iat_checked`` the CA refuses, after any restart,
    tokens issued before it started, and restarting after a power cut takes more than a
    second, so a token whose ``iat`` is at or before the current second stays refused."""
    token_id = token.token_id or token.digest
    expires = datetime.fromtimestamp(token.expires_at or now.timestamp(), tz=now.tzinfo)
    iat = token.issued_at
    durable = not iat_checked or iat is None or iat > math.floor(now.timestamp())
    return TokenUse(token_id, provisioner, expires, now, durable=durable)


@dataclass(frozen=True)
class Issuance:
    """A signed certificate waiting to be recorded (``Authority.commit``)."""

    chain: tuple[x509.Certificate, ...]
    spend: TokenUse  # the token, and the record of the certificate it buys


class Authority:
    """One CA's policy over its material, configuration and store."""

    def __init__(
        self,
        config: CAConfig,
        material: CAMaterial,
        store: Store,
        *,
        started_at: datetime,
        peer_roots: PeerRoots | None = None,
    ) -> None:
        self.config = config
        self.material = material
        self.store = store
        # The federation peers' current roots (``_follower`` keeps them current); shared
        # by the authorities a reload makes, so a reload loses none of them.
        self.peer_roots = peer_roots if peer_roots is not None else PeerRoots()
        # step-ca truncates its start time to the second before comparing token `iat`s.
        self.started_at = started_at.replace(microsecond=0)
        # step-ca's rule: tokens issued before the CA started are refused. A store whose
        # every commit is durable (PostgreSQL) keeps every spent token across restarts and
        # replicas, so the rule is dropped there: a replica's restart refuses no fresh
        # token (docs/ca.md, "Which replay rule holds for which store").
        self.iat_checked = not config.disable_issued_at_check and not store.every_commit_durable
        self._by_id = {p.id: p for p in config.provisioners}
        self._by_kid = {p.key.kid: p for p in config.provisioners}
        self._audiences = _Audiences.for_hosts(config.audience_hosts)

    # Read-only answers ---------------------------------------------------------------------
    def version(self) -> str:
        return f"federatls/{__version__}"

    def roots(self) -> tuple[x509.Certificate, ...]:
        return self.material.roots

    def federation_sources(self) -> tuple[FederationSource, ...]:
        """Where the federation's roots come from: the own roots first, then the static
        ``federatedRoots`` (if any), then each configured peer's current roots (empty for a
        peer never reached, or distrusted) with the names it may vouch for. A peer's root
        that would pass for one of this CA's own certificates in chain building is left out
        (``_federation.shadows``)."""
        sources = [FederationSource("own", self.material.roots)]
        if self.material.federated_roots:
            sources.append(FederationSource("static", self.material.federated_roots))
        ours = (*self.material.roots, *self.material.intermediates, *self.material.federated_roots)
        for peer in self.config.federation.peers:
            roots = tuple(r for r in self.peer_roots.get(peer.name) if shadows(r, ours) is None)
            sources.append(FederationSource("peer", roots, peer.name, peer.names))
        return tuple(sources)

    def federation(self) -> tuple[x509.Certificate, ...]:
        """What ``/federation`` answers: every source's roots, each root once."""
        return dedupe(tuple(c for source in self.federation_sources() for c in source.roots))

    def root(self, sha: str) -> x509.Certificate:
        """An own or federated root by fingerprint (any case, dashes ignored); else 404 with
        step-ca 0.30's body naming the fingerprint asked for (docs/protocol.md, "Endpoints")."""
        wanted = sha.lower().replace("-", "")
        cert = self.material.root_by_fingerprint(wanted)
        if cert is None:
            raise Refusal(
                404,
                f"certificate with fingerprint {sha} was not found",
                message=f"root certificate with fingerprint {_go_quote(wanted)} was not found",
            )
        return cert

    def provisioners(self, cursor: str, limit_text: str) -> tuple[list[JWKProvisioner], str]:
        """A page of provisioners; the cursor is the index of the first one, as text."""
        limit = _DEFAULT_PAGE
        if limit_text:
            try:
                limit = int(limit_text)
            except ValueError:
                raise Refusal(400, f"limit '{limit_text}' is not an integer") from None
            limit = _DEFAULT_PAGE if limit <= 0 else min(limit, _MAX_PAGE)
        start = int(cursor) if re.fullmatch(r"[0-9]{1,9}", cursor) else 0
        items = list(self.config.provisioners)
        page = items[start : start + limit]
        following = start + limit
        return page, (str(following) if following < len(items) else "")

    def encrypted_key(self, kid: str) -> str:
        prov = self._by_kid.get(kid)
        if prov is None or not prov.encrypted_key:
            raise Refusal(404, f"encrypted key with kid {kid} was not found")
        return prov.encrypted_key

    def chain_of(self, leaf: x509.Certificate) -> list[x509.Certificate]:
        return [leaf, *self.material.intermediates]

    # Tokens --------------------------------------------------------------------------------
    def _validate_token(
        self, raw: str, kind: TokenKind, now: datetime
    ) -> tuple[JWKProvisioner, Token, TokenUse]:
        """Validate a one-time token, without burning it yet. Order: parse, ``iat`` against
        the CA's start (if ``iat_checked``), audience and provisioner, **signature**, times,
        subject, replay."""
        try:
            token = Token.parse(raw)
        except TokenError as exc:
            raise _unauthorized(f"error parsing token: {exc}") from exc
        iat = token.issued_at
        if self.iat_checked and iat is not None and iat < self.started_at.timestamp():
            raise _unauthorized("token issued before the bootstrap of certificate authority")
        prov = self._by_id.get(f"{token.issuer}:{token.kid}")
        if not self._audiences.any_token.matches(token.audience) or prov is None:
            raise _unauthorized(
                f"provisioner not found or invalid audience ({', '.join(token.audience)})"
            )
        try:
            token.verify(prov.key)
        except TokenError as exc:
            raise _unauthorized(f"error parsing jwk claims: {exc}") from exc
        try:
            token.check_times(now)
        except TokenError as exc:
            raise _unauthorized(f"invalid jwk claims: {exc}") from exc
        wanted = self._audiences.sign if kind == "sign" else self._audiences.revoke
        if not wanted.matches(token.audience):
            raise _unauthorized(
                f"invalid jwk token audience claim (aud); want {wanted}, "
                f"but got {_go_list(token.audience)}"
            )
        if not token.subject:
            raise _unauthorized("jwk token subject cannot be empty")
        spend = _token_use(token, prov.id, now, iat_checked=self.iat_checked)
        if self.store.token_used(spend.token_id):
            raise _unauthorized("token already used")
        return prov, token, spend

    def _spend(self, spend: TokenUse) -> None:
        if not self.store.record_issuances([spend])[0]:
            raise _unauthorized("token already used")

    # Sign ----------------------------------------------------------------------------------
    def sign(self, request: SignRequest, now: datetime) -> list[x509.Certificate]:
        """Issue a certificate for a CSR and a one-time token (``prepare_sign`` then
        ``commit``)."""
        issuance = self.prepare_sign(request, now)
        if not self.commit([issuance])[0]:
            raise _unauthorized("token already used")
        return list(issuance.chain)

    def prepare_sign(self, request: SignRequest, now: datetime) -> Issuance:
        """Validate the token and the CSR and sign the certificate, without recording it.

        A valid token is spent whatever happens to the CSR: a refused CSR spends it here (as
        in step-ca); a signed certificate spends it in ``commit``, in the same transaction
        that records the certificate, so no certificate is handed out unrecorded. That spend
        is its one write, and its last store call: the server may make this call again from a
        thread when the first attempt would have waited for the store (``_State.soon``).
        Refused before it is spent (403): a CSR key the CA does not certify, and a token whose
        own names no certificate can carry, or none from this CA's intermediate (outside its
        name constraints): it can never buy one; nothing is gained by burning it."""
        public_key = _checked_public_key(request.csr.public_key())
        prov, token, spend = self._validate_token(request.ott, "sign", now)
        names = _certifiable_names(token)
        subject, sans = names
        self._check_constraints(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]), sans)
        try:
            leaf, sans = self._issue(request, prov, token, names, public_key, now)
        except Refusal:
            self._spend(spend)
            raise
        record = self._record_of(
            leaf, prov.id, sans.as_strings(), operation="sign", token_id=spend.token_id
        )
        return Issuance(tuple(self.chain_of(leaf)), replace(spend, certificate=record))

    def _check_constraints(self, subject: x509.Name, sans: SANs) -> None:
        """403 when a leaf with these names would break the name constraints of the CA
        certificates above it: verifiers would refuse it (docs/ca.md, "Name constraints")."""
        refusal = constraints_refusal(self.material.name_constraints, subject, sans)
        if refusal is not None:
            raise Refusal(403, refusal)

    def commit(self, issuances: Sequence[Issuance]) -> list[bool]:
        """Record certificates and spend their tokens, all in one transaction (the only
        write of a successful sign). False for an issuance whose token a concurrent request
        spent first: that certificate is not recorded and must not be handed out (401)."""
        return self.store.record_issuances([i.spend for i in issuances])

    def _issue(
        self,
        request: SignRequest,
        prov: JWKProvisioner,
        token: Token,
        names: tuple[str, SANs],
        public_key: CertificateIssuerPublicKeyTypes,
        now: datetime,
    ) -> tuple[x509.Certificate, SANs]:
        """The certificate request's checks, in step-ca's order (the token's binding ``cnf``,
        the common name, the SANs, the validity), then the certificate."""
        subject, sans = names
        csr = request.csr
        try:
            bound = token.confirms(csr)
        except TokenError:
            raise Refusal(403, "error decoding fingerprint") from None
        if not bound:
            raise Refusal(
                403,
                f"certificate request fingerprint does not match {_go_quote(token.confirmation)}",
            )
        # step-ca 0.25.1: the CN may be the subject or any of the token's names.
        allowed = [subject, *(token.sans or [subject])]
        cn = common_name(csr.subject)
        if cn and cn not in allowed:
            raise Refusal(
                403,
                "certificate request does not contain the valid common name"
                f" - got {cn}, want {_go_list(allowed)}",
            )
        _check_csr_sans(cert_sans(csr), sans)
        not_before, not_after = self._validity(
            request.not_before, request.not_after, prov.claims, now
        )
        leaf = issue_leaf(
            self.material,
            public_key=public_key,
            common_name=subject,
            sans=sans,
            not_before=not_before,
            not_after=not_after,
            provisioner=ProvisionerRef(prov.name, prov.key.kid),
        )
        return leaf, sans

    def _validity(
        self,
        req_nb: TimeDuration | None,
        req_na: TimeDuration | None,
        claims: DurationClaims,
        now: datetime,
    ) -> tuple[datetime, datetime]:
        backdate = self.config.backdate
        try:
            if req_nb is None:
                base, shift = now, backdate
            else:
                base, shift = req_nb.resolve(now), timedelta(0)
            not_after = req_na.resolve(base) if req_na is not None else base + claims.default_tls
            not_before = base - shift
        except OverflowError:
            raise Refusal(400, "notBefore or notAfter is out of range") from None
        na, nb = _trunc(not_after), _trunc(not_before)
        if na < _trunc(now):
            raise Refusal(400, f"notAfter cannot be in the past; na={_go_time(na)}")
        if na < nb:
            raise Refusal(
                400, f"notAfter cannot be before notBefore; na={_go_time(na)}, nb={_go_time(nb)}"
            )
        span = na - nb
        if span < claims.min_tls:
            raise Refusal(
                403,
                f"requested duration of {format_go_duration(span)} is less than "
                "the authorized minimum certificate duration of "
                f"{format_go_duration(claims.min_tls)}",
            )
        if span > claims.max_tls + backdate:
            raise Refusal(
                403,
                f"requested duration of {format_go_duration(span)} is more than "
                "the authorized maximum certificate duration of "
                f"{format_go_duration(claims.max_tls + backdate)}",
            )
        if not_after > self.material.issuer.not_valid_after_utc:
            raise Refusal(403, "requested notAfter is after the intermediate certificate expires")
        return not_before, not_after

    @staticmethod
    def _record_of(
        leaf: x509.Certificate,
        provisioner: str,
        sans: Sequence[str],
        renewed_from: str | None = None,
        *,
        operation: str,
        token_id: str = "",
    ) -> IssuedCertificate:
        """The store's record of ``leaf``, with its audit trail: what it was issued for
        (``operation``) and the token it spent or the certificate it replaces."""
        return IssuedCertificate(
            serial=_serial(leaf),
            subject=common_name(leaf.subject),
            sans=tuple(sans),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            provisioner=provisioner,
            der=leaf.public_bytes(Encoding.DER),
            renewed_from=renewed_from,
            operation=operation,
            token_id=token_id,
        )

    # Renew and rekey -----------------------------------------------------------------------
    def _authorize_renew(self, cert: x509.Certificate, now: datetime) -> str:
        serial = _serial(cert)
        if self.store.is_revoked(serial):
            raise _unauthorized("certificate has been revoked")
        ref = read_provisioner_extension(cert)
        claims = DurationClaims()
        prov_id = ""
        if ref is not None:
            prov = self._by_id.get(ref.id)
            if prov is None:
                raise _unauthorized(f"provisioner not found ({ref.id})")
            claims, prov_id = prov.claims, prov.id
            if claims.disable_renewal:
                raise _unauthorized(f"renew is disabled for provisioner '{prov.name}'")
        if _trunc(now) < cert.not_valid_before_utc:
            raise _unauthorized("certificate is not yet valid")
        if _trunc(now) > cert.not_valid_after_utc and not claims.allow_renewal_after_expiry:
            # step-ca 0.20 and later say so in the body too (docs/protocol.md, "Renew").
            expired = f"certificate expired on {_go_time(cert.not_valid_after_utc)}"
            raise Refusal(401, expired, message=f"{_EXPIRED_PREFIX}: {expired}")
        return prov_id

    def renew(
        self,
        peer: x509.Certificate,
        now: datetime,
        public_key: CertificateIssuerPublicKeyTypes | None = None,
        *,
        spend: TokenUse | None = None,
    ) -> list[x509.Certificate]:
        """Renew (or rekey, given a new public key) a certificate presented by its holder,
        or by a renew token (``spend``, from ``authorize_renew_token``). Recording the new
        certificate, and spending the token with it, is its one write and last store call
        (``_State.soon`` may make the call again), so a failed write spends nothing."""
        prov_id = self._authorize_renew(peer, now)
        # The intermediate may have changed since (a rotation, a reload): the names it
        # may certify are today's.
        self._check_constraints(peer.subject, cert_sans(peer))
        if public_key is not None:
            public_key = _checked_public_key(public_key)
        else:  # a certificate issued before the key rule is not renewed for a refused key
            _checked_public_key(peer.public_key())
        leaf = renew_leaf(
            self.material, peer, now=now, backdate=self.config.backdate, public_key=public_key
        )
        record = self._record_of(
            leaf,
            prov_id,
            cert_sans(leaf).as_strings(),
            _serial(peer),
            operation="renew" if public_key is None else "rekey",
            token_id=spend.token_id if spend is not None else "",
        )
        try:
            if spend is None:
                self.store.add_certificate(record)
            elif not self.store.record_issuances([replace(spend, certificate=record)])[0]:
                raise _unauthorized("token already used")
        except ParentRevoked:  # since the check above: nothing recorded, nothing spent
            raise _unauthorized("certificate has been revoked") from None
        return self.chain_of(leaf)

    def authorize_renew_token(self, raw: str, now: datetime) -> tuple[x509.Certificate, TokenUse]:
        """The certificate a ``Bearer`` renew token (``x5cInsecure`` header) stands for, and
        the spending of the token, which ``renew`` records with the new certificate.

        The chain must lead to one of this CA's roots (validity periods are not checked here:
        the renewal rules decide about expiry); the token must be signed by the leaf's key.
        """
        try:
            token = Token.parse(raw)
            chain_b64 = token.header.get("x5cInsecure")
            if not isinstance(chain_b64, list) or not chain_b64:
                raise TokenError("renew token has no x5cInsecure header")
            chain = [
                x509.load_der_x509_certificate(base64.b64decode(c, validate=True))
                for c in chain_b64
            ]
        except (TokenError, ValueError, TypeError) as exc:
            raise _unauthorized(f"error validating renew token: {exc}") from exc
        for cert in chain:
            # Before any signature is checked with them: a key outside the accepted set (an
            # RSA exponent as long as the modulus, say) makes each check cost a private-key
            # operation, and no certificate this CA issued carries one.
            refusal = csr_key_refusal(cert.public_key())
            if refusal is not None:
                raise _unauthorized(
                    "error validating renew token: x5cInsecure chain holds a key this CA does "
                    f"not accept ({refusal.removeprefix('certificate request ')})"
                )
        if not self._chains_to_root(chain):
            raise _unauthorized(
                "error validating renew token: x5cInsecure chain does not lead to a root of this CA"
            )
        leaf = chain[0]
        try:
            token.verify_with_certificate(leaf)
        except TokenError as exc:
            raise _unauthorized(f"error validating renew token: {exc}") from exc
        ref = read_provisioner_extension(leaf)
        prov = self._by_id.get(ref.id) if ref is not None else None
        if prov is None:
            raise _unauthorized(
                "error validating renew token: cannot get provisioner from certificate"
            )
        try:
            token.check_times(now)
        except TokenError as exc:
            raise _unauthorized(f"error validating renew token: {exc}") from exc
        if token.subject != common_name(leaf.subject):
            raise _unauthorized("error validating renew token: invalid subject claim (sub)")
        if not self._audiences.renew.matches(token.audience):
            raise _unauthorized("error validating renew token: invalid audience claim (aud)")
        if token.issuer not in (RENEW_TOKEN_ISSUER, prov.name):
            raise _unauthorized("error validating renew token: invalid issuer claim (iss)")
        # Renew tokens are not checked against the CA's start time: always durable.
        spend = _token_use(token, prov.id, now, iat_checked=False)
        if self.store.token_used(spend.token_id):
            raise _unauthorized("token already used")
        return leaf, spend

    def _chains_to_root(self, chain: Sequence[x509.Certificate]) -> bool:
        """Whether ``chain[0]`` leads to a root through the chain's and the CA's own
        intermediates (``path_up``). Each step tries only certificates named as its issuer,
        each at most once, so a crafted chain costs at most one signature check per
        certificate (and one per root at each step)."""
        roots = self.material.roots
        path = path_up(
            chain[0],
            [*chain[1:], *self.material.intermediates],
            lambda cert: any(issued_by(cert, root) for root in roots),
            signer=may_sign,
        )
        return path is not None

    # Revoke --------------------------------------------------------------------------------
    def revoke(self, request: RevokeRequest, peer: x509.Certificate | None, now: datetime) -> None:
        """Passively revoke a certificate this CA issued, by token or by its holder over mTLS.

        A revoke token is spent in the transaction that records the revocation (its one
        write, last store call), so a write that fails (503) spends nothing, and a refusal
        (a certificate not issued here, or already revoked) leaves the token unspent."""
        provisioner, spend, mtls = "", None, False
        if request.ott:
            prov, token, spend = self._validate_token(request.ott, "revoke", now)
            if token.subject != request.serial:  # step-ca 0.29: 403, was accepted
                raise Refusal(
                    403,
                    f"request serial number {_go_quote(request.serial)} and token subject "
                    f"{_go_quote(token.subject)} do not match",
                )
            provisioner = prov.id
        elif peer is None:
            raise Refusal(400, "missing ott or client certificate")
        else:
            if _serial(peer) != request.serial:  # step-ca 0.29: 403, was 400
                raise Refusal(
                    403,
                    f"request serial number {_go_quote(request.serial)} and certificate "
                    f"serial number {_go_quote(_serial(peer))} do not match",
                )
            ref = read_provisioner_extension(peer)
            provisioner, mtls = (ref.id if ref else ""), True
        if self.store.get_certificate(request.serial) is None:
            raise Refusal(
                403,
                f"certificate with serial number '{request.serial}' was not "
                "issued by this certificate authority",
            )
        outcome = self.store.revoke(
            Revocation(
                serial=request.serial,
                reason_code=request.reason_code,
                reason=request.reason,
                revoked_at=now,
                provisioner=provisioner,
                token_id=spend.token_id if spend is not None else "",
                mtls=mtls,
            ),
            spend,
        )
        if outcome == "token used":
            raise _unauthorized("token already used")
        if outcome == "already revoked":
            raise Refusal(
                400, f"certificate with serial number '{request.serial}' is already revoked"
            )


# Helpers ------------------------------------------------------------------------------------
def _trunc(dt: datetime) -> datetime:
    return dt.replace(microsecond=0)


def _go_time(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def _checked_public_key(key: object) -> CertificateIssuerPublicKeyTypes:
    """The key, if the CA certifies it (``csr_key_refusal``); else a 403 ``Refusal``."""
    reason = csr_key_refusal(key)
    if reason is None and isinstance(key, PublicKey):
        return key
    raise Refusal(403, reason or f"certificate request key of type {type(key).__name__}")


def _shown(value: str) -> str:
    """A claim value quoted for a message: escaped (no control character reaches the log)
    and cut to a readable length."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


_GENERAL_NAMES: tuple[tuple[str, str, Callable[[str], x509.GeneralName]], ...] = (
    ("dns", "DNS name", x509.DNSName),
    ("emails", "email address", x509.RFC822Name),
    ("uris", "URI", x509.UniformResourceIdentifier),
)


def _certifiable_names(token: Token) -> tuple[str, SANs]:
    """The token's subject and SANs (``[sub]`` when it has none), if a certificate can carry
    them; else a 403 ``Refusal`` that names the value.

    The subject becomes the common name: at most 64 bytes of UTF-8. DNS names, email
    addresses and URIs are IA5 strings: ASCII, so an internationalised name travels as its
    A-label (``xn--...``). No name may be empty, nor hold control or other unprintable
    characters (they would reach logs and peers' name checks). step-ca issues over-long
    common names and control characters and answers U-labels with a 500."""
    subject = token.subject
    if not subject.isprintable():
        raise Refusal(
            403, f"token subject {_shown(subject)} holds control or other unprintable characters"
        )
    size = len(subject.encode("utf-8"))
    if size > MAX_COMMON_NAME_BYTES:
        raise Refusal(
            403,
            f"token subject {_shown(subject)} is {size} bytes long; a certificate's common "
            f"name holds at most {MAX_COMMON_NAME_BYTES}",
        )
    names = list(token.sans) or [subject]
    for name in names:
        if not name:
            raise Refusal(403, "token subject alternative names cannot be empty")
        if not name.isprintable():
            raise Refusal(
                403, f"token name {_shown(name)} holds control or other unprintable characters"
            )
    sans = split_sans(names)
    for field, kind, general_name in _GENERAL_NAMES:
        for value in getattr(sans, field):
            if not value.isascii():
                raise Refusal(
                    403,
                    f"token {kind} {_shown(value)} is not ASCII: a certificate carries an "
                    "internationalised name as its A-label (xn--...)",
                )
            try:
                general_name(value)
            except ValueError as exc:
                raise Refusal(403, f"token {kind} {_shown(value)} is not valid: {exc}") from exc
    return subject, sans


def _check_csr_sans(csr: SANs, token: SANs) -> None:
    """step-ca's per-type rule: a type absent from the CSR passes; a type present must equal
    the token's set of that type."""
    checks: list[tuple[str, Sequence[object], Sequence[object]]] = [
        ("DNS names", csr.dns, token.dns),
        ("email addresses", csr.emails, token.emails),
        ("IP addresses", csr.ips, token.ips),
        ("URIs", csr.uris, token.uris),
    ]
    for label, got, want in checks:
        if got and {str(g) for g in got} != {str(w) for w in want}:
            raise Refusal(
                403,
                f"certificate request does not contain the valid {label} - "
                f"got {_go_list(got)}, want {_go_list(want)}",
            )
