"""Per-root name rules from a CA's structured federation (``/federatls/federation``): the trust
bundle built from it (each federated root with the names it may vouch for), and the check
every federatls TLS context runs on its peer right after the handshake.

Pure: values and checks, no I/O and no logging (the CA client fetches and logs what it left
out; ``_contexts`` runs ``NameRules.refusal`` in the handshake and logs the refusal). Name
matching is ``_authorise``'s (``NamePattern``, ``root_may_vouch_for``); docs/security.md
("Name rules") states the rules for users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509

from ._authorise import Authoriser, NamePattern, root_may_vouch_for
from ._errors import BadMaterialError, PeerNotAuthorisedError
from ._peer import peer_info, ssl_object_of
from ._protocol import FederationEntry
from ._trust import Provenance, TrustBundle, TrustedRoot
from ._x509 import fingerprint

__all__ = ["NameRules", "structured_bundle"]


@dataclass
class _Listed:
    """What the structured federation says of one root, over every source listing it."""

    certificate: x509.Certificate
    any_name: bool = False  # an own or static source lists it
    names: list[NamePattern] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)


def _patterns(entry: FederationEntry) -> tuple[NamePattern, ...]:
    try:
        return tuple(NamePattern.parse(n) for n in entry.names or ())
    except ValueError as exc:
        raise BadMaterialError(f"federation sources: {entry.name or entry.kind}: {exc}") from exc


def structured_bundle(
    own: Sequence[x509.Certificate],
    federation: Sequence[x509.Certificate],
    sources: Sequence[FederationEntry],
) -> tuple[TrustBundle, tuple[str, ...]]:
    """The bundle a CA's ``/roots``, ``/federation`` and ``/federatls/federation`` describe,
    and a sentence for each root left out.

    Own roots (``/roots``) vouch for any name, as do roots an own or static source lists. A
    root only peers list vouches for the union of their names (``Provenance.PEER``); if
    that union is empty it is left out. The two answers must agree, and trust is never
    widened where they do not: a root in ``/federation`` that no source lists, or listed by
    a source but missing from ``/federation``, is left out (they differ for a moment when a
    peer's roots change between the two fetches; the next refresh mends it). A name pattern
    that does not parse refuses the whole answer (``BadMaterialError``)."""
    listed: dict[str, _Listed] = {}
    for entry in sources:
        patterns = _patterns(entry)
        for cert in entry.roots:
            item = listed.setdefault(fingerprint(cert), _Listed(cert))
            if entry.names is None:
                item.any_name = True
            item.names += patterns
            if entry.kind == "peer" and entry.name and entry.name not in item.peers:
                item.peers.append(entry.name)
    bundle = TrustBundle.from_ca(own, ())
    roots = list(bundle.roots)
    seen = {r.fingerprint for r in roots}
    left_out: list[str] = []
    for cert in federation:
        fp = fingerprint(cert)
        if fp in seen:
            continue
        seen.add(fp)
        found = listed.get(fp)
        what = TrustedRoot.of(cert, Provenance.FEDERATED)
        if found is None:
            left_out.append(f"{what} is in /federation but no source lists it")
        elif found.any_name:
            roots.append(what)
        elif not found.names:
            left_out.append(f"{what} may vouch for no name (peer {', '.join(found.peers)})")
        else:
            names = tuple(dict.fromkeys(found.names))
            roots.append(
                TrustedRoot.of(cert, Provenance.PEER, names=names, peers=tuple(found.peers))
            )
    for fp, item in listed.items():
        if fp not in seen:
            what = TrustedRoot.of(item.certificate, Provenance.FEDERATED)
            left_out.append(f"{what} is listed as a source's but missing from /federation")
    return TrustBundle(tuple(roots)), tuple(left_out)


@dataclass(frozen=True)
class NameRules:
    """The name rules of one trust bundle, as a context enforces them on its peers."""

    trust: TrustBundle
    authorise: Authoriser

    @classmethod
    def of(cls, trust: TrustBundle) -> NameRules | None:
        """The rules of ``trust``; None when no root of it is restricted (a plain step-ca's
        bundle, or only own and static roots): then nothing is checked."""
        rules: dict[str | TrustedRoot, Sequence[str | NamePattern]] = {
            r.fingerprint: r.names for r in trust if r.names is not None
        }
        if not rules:
            return None
        # Roots without a rule here may vouch for any name (own, static), by the CA's word.
        return cls(trust, root_may_vouch_for(rules, allow_unruled_federated_roots=True))

    def refusal(self, conn: object) -> PeerNotAuthorisedError | None:
        """Why the verified peer of ``conn`` (its handshake done) is refused, or None.

        A peer anchored in a restricted root is refused unless every one of its names (DNS,
        IP, URI, email SANs) matches that root's patterns; one with no SAN is refused (its
        common name is not taken for a name). A peer that sent no certificate (a server
        whose client certificates are optional) vouches for nothing and is not checked."""
        if ssl_object_of(conn).getpeercert(True) is None:
            return None
        try:
            peer = peer_info(conn, self.trust)
        except BadMaterialError as exc:  # a certificate, but no verified chain: refuse
            return PeerNotAuthorisedError(f"the peer cannot be name-checked: {exc}")
        try:
            self.authorise(peer)
        except PeerNotAuthorisedError as exc:
            return exc
        return None
