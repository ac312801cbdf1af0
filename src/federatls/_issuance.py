"""What a CA issued, checked before anything is built from it: the leaf is for our key and
exactly the names asked for, valid now, not a CA, good for TLS, and chained link by link, each
link signed by a CA, to one of the CA's own roots. Used at bootstrap and at every renewal.
Pure: the time is passed in, no I/O.
Not here: parsing the CA's answer (``_protocol``), or TLS verification of peers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from ._errors import BadMaterialError
from ._trust import TrustBundle
from ._x509 import SANs, cert_sans, common_name, issued_by, may_sign, path_up

__all__ = ["CLOCK_SKEW", "check_issued", "check_renewed", "complete_chain", "needs_completing"]

# How far ahead of our clock a new certificate may start. step-ca backdates by a minute, so an
# honest CA's certificate starts in the past; this allows for our clock running behind.
CLOCK_SKEW = timedelta(minutes=5)


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _normal(names: SANs) -> frozenset[str]:
    """The names as comparable strings: a DNS name's case does not matter, the type does."""
    return frozenset(
        [f"DNS:{d.lower().rstrip('.')}" for d in names.dns]
        + [f"IP:{ip}" for ip in names.ips]
        + [f"email:{e}" for e in names.emails]
        + [f"URI:{u}" for u in names.uris]
    )


def _not_a_ca(leaf: x509.Certificate, what: str) -> None:
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise BadMaterialError(f"{what} is a CA certificate (basicConstraints CA:TRUE): refused")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if usage.key_cert_sign or usage.crl_sign:
        raise BadMaterialError(f"{what} may sign certificates or CRLs (keyUsage): refused")


# What a TLS certificate may be for: a leaf whose extended key usage allows none of these is of
# no use to a TLS client or server (peers refuse it at the handshake).
_TLS_PURPOSES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


def _tls_purposes(leaf: x509.Certificate) -> frozenset[str]:
    """The TLS uses ``leaf`` allows: both without an extended key usage (any use), or with
    anyExtendedKeyUsage; else those it lists."""
    try:
        usages = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return frozenset(_TLS_PURPOSES.values())
    if ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages:
        return frozenset(_TLS_PURPOSES.values())
    return frozenset(name for oid, name in _TLS_PURPOSES.items() if oid in usages)


def _chain(chain: Sequence[x509.Certificate], roots: TrustBundle, what: str) -> None:
    for child, parent in itertools.pairwise(chain):
        if not issued_by(child, parent):
            raise BadMaterialError(f"the CA's certificate chain for {what} is broken")
        if not may_sign(parent):
            signer = parent.subject.rfc4514_string()
            raise BadMaterialError(
                f"the CA's certificate chain for {what} is signed by {signer!r}, which is not "
                "a CA (basicConstraints CA:TRUE with keyCertSign): refused"
            )
    if roots.anchor_of(chain[-1]) is None:
        raise BadMaterialError(f"{what} does not chain to a root of its CA")


def needs_completing(chain: Sequence[x509.Certificate], roots: TrustBundle) -> bool:
    """Whether a CA's chain (leaf first) lacks a link: a certificate not signed by the next
    one, or a last one that no root in ``roots`` is or signed. A chain that only
    ``check_issued`` would refuse for other reasons (a signer that is no CA, say) is
    complete here."""
    if not chain:
        return False
    broken = any(not issued_by(c, p) for c, p in itertools.pairwise(chain))
    return broken or roots.anchor_of(chain[-1]) is None


def complete_chain(
    chain: Sequence[x509.Certificate],
    candidates: Sequence[x509.Certificate],
    roots: TrustBundle,
) -> tuple[x509.Certificate, ...]:
    """The leaf of ``chain`` followed by the path of certificates from ``chain[1:]`` and
    ``candidates`` (a CA's ``/intermediates``), each signing the one before, up to one that
    a root of ``roots`` is or signed. Where no such path exists, ``chain`` as it was (and
    ``check_issued`` says what is wrong with it). Each step tries only the certificates
    named as its issuer and drops them all from the pool, so a CA publishing many
    certificates under one name costs at most one signature check per certificate (tried
    again at every step, a chain of n such certificates cost n²/2 checks: minutes for the
    ~1800 a 1 MiB answer holds), and the walk ends."""
    if not chain:
        return tuple(chain)
    path = path_up(chain[0], [*chain[1:], *candidates], lambda c: roots.anchor_of(c) is not None)
    return tuple(chain) if path is None else tuple(path)


def check_issued(
    chain: Sequence[x509.Certificate],
    *,
    key: PublicKeyTypes,
    subject: str,
    names: SANs,
    roots: TrustBundle,
    now: datetime,
    what: str = "the issued certificate",
) -> None:
    """Refuse (``BadMaterialError`` naming the problem) a chain whose leaf is not for ``key``,
    not for exactly ``names`` (compared by type, in any order; a subject CN, if any, must be
    ``subject``), not valid at ``now`` (a start up to ``CLOCK_SKEW`` ahead is allowed), that
    is a CA or may sign certificates, or that does not chain to ``roots`` (the CA's own).

    Also refused: a leaf whose extended key usage allows neither serverAuth nor clientAuth,
    and a chain in which a certificate is signed by one that is not a CA (basicConstraints
    CA:TRUE, keyCertSign): peers would refuse either at every handshake. Not checked:
    extensions beyond these; TLS verification does its own checks when the certificate is
    used.
    """
    if not chain:
        raise BadMaterialError(f"the CA sent no certificate as {what}")
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(key):
        raise BadMaterialError(f"{what} is for another key than ours: refused")
    got, want = _normal(cert_sans(leaf)), _normal(names)
    if got != want:
        raise BadMaterialError(
            f"{what} is for other names: {sorted(got)} instead of the {sorted(want)} "
            "asked for: refused"
        )
    cn = common_name(leaf.subject)
    if cn and cn != subject:
        raise BadMaterialError(f"{what} has subject CN {cn!r}, not the {subject!r} asked for")
    if leaf.not_valid_after_utc <= now:
        raise BadMaterialError(
            f"{what} expired at {leaf.not_valid_after_utc.isoformat()} "
            f"(now {now.isoformat()}): refused"
        )
    if leaf.not_valid_before_utc > now + CLOCK_SKEW:
        raise BadMaterialError(
            f"{what} is not valid before {leaf.not_valid_before_utc.isoformat()} "
            f"(now {now.isoformat()}): refused"
        )
    _not_a_ca(leaf, what)
    if not _tls_purposes(leaf):
        raise BadMaterialError(
            f"{what} allows neither serverAuth nor clientAuth (extended key usage): refused"
        )
    _chain(chain, roots, what)


def check_renewed(
    chain: Sequence[x509.Certificate],
    *,
    old: x509.Certificate,
    roots: TrustBundle,
    now: datetime,
) -> None:
    """``check_issued`` for a renewal of ``old``: the same key, subject and names, and every
    TLS use (serverAuth, clientAuth) that ``old`` allowed."""
    what = "the renewed certificate"
    check_issued(
        chain,
        key=old.public_key(),
        subject=common_name(old.subject),
        names=cert_sans(old),
        roots=roots,
        now=now,
        what=what,
    )
    lost = _tls_purposes(old) - _tls_purposes(chain[0])
    if lost:
        raise BadMaterialError(
            f"{what} no longer allows {' or '.join(sorted(lost))} (extended key usage), as "
            "the old one did: refused"
        )
