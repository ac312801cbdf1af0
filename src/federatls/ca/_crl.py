"""The CA's certificate revocation list (``GET /crl``, step-ca 0.23+; docs/protocol.md,
"CRL"): ``build_crl`` and ``renewal_due`` are the pure rules; ``current_crl`` makes the store
calls (from a worker thread, never on the event loop). Serving it is ``_server``'s work.

As step-ca, the CRL is made from the store's revocations, signed by the CA's intermediate, and
kept in the store (``Store.get_state``, key ``crl``), so that the worker processes and the
replicas sharing one database serve the same CRL; a new one is made when the kept one is
older than ``CRLConfig.renew_after`` (step-ca's ticker, here on the first request after it),
after a revocation when ``generateOnRevoke`` is set, and when the CA signs with another
intermediate or its ``crl`` block changed. Its number grows by one each time: two processes
making one at once both try to store number N+1 with ``Store.swap_state``, one wins, and the
other serves the winner's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import CRLEntryExtensionOID

from .._errors import BadMaterialError
from .._protocol import API_PREFIX, CRL_PATH
from ._config import CAConfig, CRLConfig
from ._issuer import _hash_for
from ._material import CAMaterial
from ._store import RevokedEntry, Store

__all__ = [
    "EXPIRED_KEPT",
    "STATE_KEY",
    "StoredCRL",
    "build_crl",
    "current_crl",
    "idp_url",
    "renewal_due",
]

log = logging.getLogger("federatls.ca")

STATE_KEY = "crl"
# A revoked certificate stays in the CRL until an hour after it expired (step-ca's
# DefaultCRLExpiredDuration); one whose record the CA lacks stays for ever.
EXPIRED_KEPT = timedelta(hours=1)
# Attempts at storing a new CRL while other processes store theirs (Store.swap_state).
_ATTEMPTS = 5

# RFC 5280 5.3.1 CRLReason codes (step-ca's reasonCode); 7 is unassigned and written as is.
_REASONS = {
    1: x509.ReasonFlags.key_compromise,
    2: x509.ReasonFlags.ca_compromise,
    3: x509.ReasonFlags.affiliation_changed,
    4: x509.ReasonFlags.superseded,
    5: x509.ReasonFlags.cessation_of_operation,
    6: x509.ReasonFlags.certificate_hold,
    8: x509.ReasonFlags.remove_from_crl,
    9: x509.ReasonFlags.privilege_withdrawn,
    10: x509.ReasonFlags.aa_compromise,
}


@dataclass(frozen=True)
class StoredCRL:
    """A signed CRL as the store keeps it: its number, its validity, what it was made for
    (``made_for``: the signing certificate and the ``crl`` block) and its DER."""

    number: int
    this_update: datetime
    next_update: datetime
    made_for: str
    der: bytes

    def to_bytes(self) -> bytes:
        """A JSON line, then the DER (no base64: a CRL of many revocations is large)."""
        head = {
            "number": self.number,
            "thisUpdate": self.this_update.isoformat(),
            "nextUpdate": self.next_update.isoformat(),
            "madeFor": self.made_for,
        }
        return json.dumps(head, sort_keys=True).encode() + b"\n" + self.der

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredCRL:
        """``BadMaterialError`` when the stored value cannot be read."""
        head, sep, der = data.partition(b"\n")
        try:
            if not sep or not der:
                raise ValueError("no CRL after the header line")
            fields = json.loads(head)
            number = fields["number"]
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise ValueError(f"number {number!r} is not a non-negative integer")
            this_update = datetime.fromisoformat(fields["thisUpdate"])
            next_update = datetime.fromisoformat(fields["nextUpdate"])
            made_for = fields["madeFor"]
            if this_update.tzinfo is None or next_update.tzinfo is None:
                raise ValueError("times without a time zone")
            if not isinstance(made_for, str):
                raise ValueError("madeFor is not a string")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            raise BadMaterialError(f"the store's {STATE_KEY!r} state is unreadable: {exc}") from exc
        return cls(number, this_update, next_update, made_for, der)


def idp_url(config: CAConfig, crl: CRLConfig) -> str:
    """The issuing distribution point written in the CRL: ``idpURL``, else step-ca's
    default, ``https://<first dnsName>/1.0/crl`` (no port: step-ca writes none either)."""
    return crl.idp_url or f"https://{config.audience_hosts[0]}{API_PREFIX}{CRL_PATH}"


def made_for(material: CAMaterial, crl: CRLConfig, idp: str) -> str:
    """A digest of what a CRL depends on besides the revocations: a CRL made for another
    signing certificate, distribution point or lifetime is not served."""
    seconds = crl.cache_duration.total_seconds()
    blob = material.issuer.public_bytes(Encoding.DER)
    return hashlib.sha256(blob + f"\n{idp}\n{seconds!r}".encode()).hexdigest()


def renewal_due(stored: StoredCRL | None, made: str, crl: CRLConfig, now: datetime) -> bool:
    """Whether a new CRL must be made before one is served."""
    if stored is None or stored.made_for != made:
        return True
    return now >= stored.this_update + crl.renew_after or now >= stored.next_update


def _entry(entry: RevokedEntry) -> x509.RevokedCertificate | None:
    try:
        serial = int(entry.serial, 10)
    except ValueError:
        log.warning("CRL: revoked serial %r is not a decimal number: left out", entry.serial)
        return None
    builder = (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(entry.revoked_at.astimezone(UTC))
    )
    code = entry.reason_code
    if code in _REASONS:
        builder = builder.add_extension(x509.CRLReason(_REASONS[code]), critical=False)
    elif code != 0:  # 0 (unspecified) is left out, as step-ca (Go's x509) leaves it out
        value = x509.UnrecognizedExtension(CRLEntryExtensionOID.CRL_REASON, bytes((10, 1, code)))
        builder = builder.add_extension(value, critical=False)
    return builder.build()


def build_crl(
    entries: Iterable[RevokedEntry],
    *,
    number: int,
    now: datetime,
    crl: CRLConfig,
    idp: str,
    material: CAMaterial,
) -> StoredCRL:
    """The CRL numbered ``number`` listing ``entries`` but those whose certificate expired
    more than ``EXPIRED_KEPT`` before ``now``, valid from ``now`` (to the second) for
    ``crl.cache_duration``, with the issuing distribution point ``idp`` (critical), signed
    by the intermediate. Costs one signature and one pass over the entries."""
    this_update = now.astimezone(UTC).replace(microsecond=0)
    next_update = this_update + crl.cache_duration
    issuer = material.issuer
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(material.key.public_key())
    point = x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier(idp)],
        relative_name=None,
        only_contains_user_certs=False,
        only_contains_ca_certs=False,
        only_some_reasons=None,
        indirect_crl=False,
        only_contains_attribute_certs=False,
    )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(aki, critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(point, critical=True)
    )
    oldest = this_update - EXPIRED_KEPT
    for entry in entries:
        if entry.not_after is not None and entry.not_after < oldest:
            continue
        revoked = _entry(entry)
        if revoked is not None:
            builder = builder.add_revoked_certificate(revoked)
    signed = builder.sign(material.key, _hash_for(material.key))  # type: ignore[arg-type]
    der = signed.public_bytes(Encoding.DER)
    return StoredCRL(number, this_update, next_update, made_for(material, crl, idp), der)


def current_crl(
    store: Store,
    config: CAConfig,
    material: CAMaterial,
    now: datetime,
    *,
    fresh: bool = False,
) -> StoredCRL:
    """The CRL to serve: the stored one while it is not due (``renewal_due``), else a new
    one numbered one more, stored. ``fresh``: a new one in any case (after a revocation).
    Makes store calls that may wait: call it from a worker thread. When another process
    stores its CRL first, this one is thrown away and the other's served if it is not due
    (``fresh``: made again over the other's, at most ``_ATTEMPTS`` times in all)."""
    crl = config.crl
    if crl is None or not crl.enabled:
        raise ValueError("the CA's crl block does not enable CRLs")
    idp = idp_url(config, crl)
    made = made_for(material, crl, idp)
    for _ in range(_ATTEMPTS):
        raw = store.get_state(STATE_KEY)
        stored = None if raw is None else StoredCRL.from_bytes(raw)
        if stored is not None and not fresh and not renewal_due(stored, made, crl, now):
            return stored
        number = 0 if stored is None else stored.number + 1  # step-ca's first CRL is 0
        new = build_crl(
            store.revocations(), number=number, now=now, crl=crl, idp=idp, material=material
        )
        if store.swap_state(STATE_KEY, raw, new.to_bytes()):
            return new
    raw = store.get_state(STATE_KEY)
    if raw is None:  # pragma: no cover - a store that keeps losing its state
        raise BadMaterialError("the CRL could not be stored")
    return StoredCRL.from_bytes(raw)
