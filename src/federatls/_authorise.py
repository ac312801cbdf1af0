"""Authorisers: which verified peers may talk to us. A flat federation bundle lets any
federated CA vouch for any name; authorisers narrow that down by name (DNS, IP, URI such as
SPIFFE IDs, with wildcards), by anchoring root, and per root ("the kubernetes root may only
vouch for ``*.k8s.internal``").

An authoriser is a callable taking a ``PeerInfo`` and raising ``PeerNotAuthorisedError``.
Pure: no I/O; where connections are cut off is ``authorise_connection``'s business.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ._errors import PeerNotAuthorisedError
from ._peer import PeerInfo, peer_info
from ._trust import Provenance, TrustBundle, TrustedRoot
from ._x509 import split_sans

__all__ = [
    "Authoriser",
    "NamePattern",
    "all_of",
    "allow_names",
    "allow_roots",
    "any_of",
    "authorise_connection",
    "root_may_vouch_for",
]

log = logging.getLogger("federatls.peer")

Authoriser = Callable[[PeerInfo], None]


@dataclass(frozen=True)
class NamePattern:
    """One allowed name: a DNS name (``*.example.com`` matches exactly one more label), an IP
    address, a URI (``spiffe://td/ns/*`` matches anything below ``spiffe://td/ns/``) or an
    email address. A pattern only matches names of its own kind."""

    text: str
    kind: str  # "dns", "ip", "uri" or "email" (step's rule for SANs)

    @classmethod
    def parse(cls, text: str) -> NamePattern:
        """A pattern; ``ValueError`` quoting it when a wildcard is misplaced."""
        if not text or text != text.strip():
            raise ValueError(f"invalid name pattern {text!r}")
        kind = _kind(text)
        if "*" in text:
            ok = (kind == "dns" and text.startswith("*.") and "*" not in text[2:]) or (
                kind == "uri" and text.endswith("/*") and text.count("*") == 1
            )
            if not ok:
                raise ValueError(
                    f"name pattern {text!r}: a wildcard must be one leading "
                    "'*.' label, or a URI's trailing '/*'"
                )
        return cls(text, kind)

    def matches(self, name: str) -> bool:
        """Whether ``name`` (one SAN, as a string) matches; only names of the same kind
        (DNS, IP, URI) can match."""
        if _kind(name) != self.kind:
            return False
        if self.kind == "uri":
            if self.text.endswith("/*"):
                prefix = self.text[:-1]
                return name.startswith(prefix) and len(name) > len(prefix)
            return name == self.text
        if self.kind == "ip":
            try:
                return ipaddress.ip_address(name) == ipaddress.ip_address(self.text)
            except ValueError:
                return False
        name, pattern = name.lower().rstrip("."), self.text.lower().rstrip(".")
        if pattern.startswith("*."):
            head, _, rest = name.partition(".")
            return bool(head) and head != "*" and rest == pattern[2:]
        return name == pattern


def _kind(name: str) -> str:
    """A name's kind by step's rule: an IP literal, anything with a URI scheme, an email
    (``@``), else a DNS name."""
    sans = split_sans([name])
    return "ip" if sans.ips else "uri" if sans.uris else "email" if sans.emails else "dns"


def _patterns(patterns: Iterable[str | NamePattern]) -> tuple[NamePattern, ...]:
    out = tuple(p if isinstance(p, NamePattern) else NamePattern.parse(p) for p in patterns)
    if not out:
        raise ValueError("give at least one name pattern")
    return out


def _refuse(peer: PeerInfo, reason: str) -> PeerNotAuthorisedError:
    return PeerNotAuthorisedError(f"peer {peer} is not authorised: {reason}", peer=peer)


def allow_names(*patterns: str | NamePattern) -> Authoriser:
    """Allow a peer when one of its subject alternative names matches one of ``patterns``."""
    allowed = _patterns(patterns)

    def authorise(peer: PeerInfo) -> None:
        names = peer.sans.as_strings()
        if not any(p.matches(n) for p in allowed for n in names):
            raise _refuse(peer, f"none of its names {names} matches {[p.text for p in allowed]}")

    return authorise


RootSpec = str | TrustedRoot | Provenance


def _root_matcher(specs: Sequence[RootSpec]) -> Callable[[TrustedRoot], bool]:
    prints = {
        s.fingerprint if isinstance(s, TrustedRoot) else s.lower()
        for s in specs
        if not isinstance(s, Provenance)
    }
    provenances = {s for s in specs if isinstance(s, Provenance)}
    return lambda root: root.fingerprint in prints or root.provenance in provenances


def allow_roots(*roots: RootSpec) -> Authoriser:
    """Allow a peer anchored in one of ``roots``: fingerprints, ``TrustedRoot``s, or a
    ``Provenance`` (``Provenance.OWN`` = only peers of our own CA)."""
    if not roots:
        raise ValueError("give at least one root")
    matches = _root_matcher(roots)

    def authorise(peer: PeerInfo) -> None:
        if peer.anchor is None or not matches(peer.anchor):
            raise _refuse(peer, "its anchoring root is not allowed")

    return authorise


def root_may_vouch_for(rules: Mapping[str | TrustedRoot, Sequence[str]]) -> Authoriser:
    """Per-root name rules: a peer anchored in a listed root must have *every* one of its
    names matched by that root's patterns. Peers of roots without a rule pass."""
    table = {
        (k.fingerprint if isinstance(k, TrustedRoot) else k.lower()): _patterns(v)
        for k, v in rules.items()
    }

    def authorise(peer: PeerInfo) -> None:
        if peer.anchor is None:
            raise _refuse(peer, "it has no known anchoring root")
        allowed = table.get(peer.anchor.fingerprint)
        if allowed is None:
            return
        names = peer.sans.as_strings()
        outside = [n for n in names if not any(p.matches(n) for p in allowed)]
        if not names or outside:
            raise _refuse(
                peer,
                f"root {peer.anchor} may only vouch for "
                f"{[p.text for p in allowed]}, not {outside or 'no name'}",
            )

    return authorise


def all_of(*authorisers: Authoriser) -> Authoriser:
    """Allow a peer only if every authoriser allows it (and refuse to be built empty: an
    empty rule list must not quietly allow everyone)."""
    if not authorisers:
        raise ValueError("give at least one authoriser")

    def authorise(peer: PeerInfo) -> None:
        for check in authorisers:
            check(peer)

    return authorise


def any_of(*authorisers: Authoriser) -> Authoriser:
    """Allow a peer if at least one authoriser allows it (the first refusal is reported)."""
    if not authorisers:
        raise ValueError("give at least one authoriser")

    def authorise(peer: PeerInfo) -> None:
        first: PeerNotAuthorisedError | None = None
        for check in authorisers:
            try:
                check(peer)
            except PeerNotAuthorisedError as exc:
                first = first or exc
            else:
                return
        assert first is not None
        raise first

    return authorise


def authorise_connection(
    conn: object, trust: TrustBundle, authoriser: Authoriser | None
) -> PeerInfo:
    """The peer of ``conn``, checked by ``authoriser``; a refusal is logged and raised
    (``PeerNotAuthorisedError``) so the caller closes the connection before any data."""
    peer = peer_info(conn, trust)
    if authoriser is not None:
        try:
            authoriser(peer)
        except PeerNotAuthorisedError as exc:
            log.warning("refused TLS peer: %s", exc)
            raise
    return peer
