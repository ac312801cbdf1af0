"""Authorisers: which verified peers may talk to us. A flat federation bundle lets any
federated CA vouch for any name; authorisers narrow that down by name (DNS, IP, URI such as
SPIFFE IDs, with wildcards), by anchoring root, and per root ("the kubernetes root may only
vouch for ``*.k8s.internal``").

An authoriser is a callable taking a ``PeerInfo`` and raising ``PeerNotAuthorisedError``.
Pure: no I/O; where connections are cut off is ``authorise_connection``'s business.

Names are compared in one canonical spelling, and a name that has none matches nothing: URIs
follow the SPIFFE ID rules (https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md,
section 2), so ``spiffe://td/ns/web/../prod`` is not below ``spiffe://td/ns/web/``; DNS names
are ASCII host names (IDNs as A-labels), compared without letter case or one trailing dot.
docs/sdk.md ("Authorisation") and docs/security.md state these rules for users.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

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
    email address. A pattern only matches names of its own kind.

    Checked when built (``ValueError`` quoting it): a misplaced wildcard, a URI that breaks
    the SPIFFE ID rules, a DNS name with an empty label, a space or a non-ASCII character."""

    text: str
    kind: str  # "dns", "ip", "uri" or "email" (step's rule for SANs)

    def __post_init__(self) -> None:
        text, kind = self.text, self.kind
        if not text or text != text.strip() or _kind(text) != kind:
            raise ValueError(f"invalid name pattern {text!r}")
        if "*" in text:
            ok = (kind == "dns" and text.startswith("*.") and "*" not in text[2:]) or (
                kind == "uri" and text.endswith("/*") and text.count("*") == 1
            )
            if not ok:
                raise ValueError(
                    f"name pattern {text!r}: a wildcard must be one leading "
                    "'*.' label, or a URI's trailing '/*'"
                )
        if kind == "uri":
            problem = _uri_problem(text.removesuffix("/*"))
            if problem:
                raise ValueError(f"name pattern {text!r} is not a well-formed ID: {problem}")
        if kind == "dns" and _dns_key(text.removeprefix("*.")) is None:
            raise ValueError(
                f"name pattern {text!r} is not a DNS name: ASCII letters, digits, '-' and "
                "'_' in non-empty labels (give an IDN as its A-label, 'xn--...')"
            )

    @classmethod
    def parse(cls, text: str) -> NamePattern:
        """A pattern; ``ValueError`` quoting it when it is malformed."""
        return cls(text, _kind(text))

    def matches(self, name: str) -> bool:
        """Whether ``name`` (one SAN, as a string) matches; only names of the same kind
        (DNS, IP, URI) can match, and only names spelled canonically."""
        if _kind(name) != self.kind:
            return False
        if self.kind == "uri":
            if _uri_problem(name) is not None:
                return False
            if self.text.endswith("/*"):
                return name.startswith(self.text[:-1])  # a well-formed name: a segment follows
            return name == self.text
        if self.kind == "ip":
            try:
                return ipaddress.ip_address(name) == ipaddress.ip_address(self.text)
            except ValueError:
                return False
        if self.kind == "email":
            return name.lower().rstrip(".") == self.text.lower().rstrip(".")
        key = _dns_key(name)
        if key is None:
            return False
        if self.text.startswith("*."):
            _, _, rest = key.partition(".")
            return bool(rest) and rest == _dns_key(self.text[2:])
        return key == _dns_key(self.text)


# SPIFFE ID rules: a lowercase scheme, "://", a trust domain of lowercase letters, digits, '.',
# '-' and '_'; path segments of letters, digits, '.', '-' and '_', none empty, '.' or '..'; no
# query, fragment, port, userinfo or percent-encoding; at most 2048 bytes.
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def _uri_problem(uri: str) -> str | None:
    """Why ``uri`` is not a well-formed SPIFFE-style ID, or None when it is one."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return "it must start with a lowercase scheme and '://'"
    if len(uri.encode()) > 2048:
        return "it is longer than 2048 bytes"
    for char, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if char in uri:
            return f"it has {what}"
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        return "it has userinfo"
    if ":" in authority:
        return "it has a port"
    if not _TRUST_DOMAIN.fullmatch(authority):
        return "its trust domain must be 1 to 255 lowercase letters, digits, '.', '-' or '_'"
    if not slash:
        return None
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            return f"it has {'an empty' if not segment else 'a dot'} path segment"
        if not _SEGMENT.fullmatch(segment):
            return f"path segment {segment!r} has characters other than letters, digits, '.-_'"
    return None


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _dns_key(name: str) -> str | None:
    """``name`` in lower case without one trailing dot, or None if it is not an ASCII host
    name (labels of letters, digits, '-' and '_', none empty)."""
    key = name.lower().removesuffix(".")
    if not key or len(key) > 253 or not key.isascii():
        return None
    return key if all(_LABEL.fullmatch(label) for label in key.split(".")) else None


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


def apply_authoriser(authoriser: Authoriser, peer: PeerInfo) -> None:
    """Run ``authoriser`` on ``peer``: it admits by returning None and refuses by raising
    ``PeerNotAuthorisedError``. One that raises anything else (a bug, or a ``ValueError``
    meant as a refusal) or returns anything but None (a predicate's ``False``) refuses the
    peer too, with a ``PeerNotAuthorisedError`` saying what it did (``from`` what it raised):
    a broken check must not let a peer in, nor end as a traceback inside asyncio's or
    gRPC's TLS."""
    name = getattr(authoriser, "__qualname__", type(authoriser).__qualname__)
    try:
        # Typed to return None, but a predicate returns a bool: look at what came back.
        verdict: object = cast(Callable[[PeerInfo], object], authoriser)(peer)
    except PeerNotAuthorisedError:
        raise
    except Exception as exc:
        raise _refuse(
            peer,
            f"the authoriser {name!r} raised {type(exc).__name__}({str(exc)!r}): the "
            "authoriser failed, so the peer is refused (an authoriser refuses a peer by "
            "raising federatls.PeerNotAuthorisedError)",
        ) from exc
    if verdict is not None:
        raise _refuse(
            peer,
            f"the authoriser {name!r} returned {verdict!r}: an authoriser admits by returning "
            "None and refuses by raising federatls.PeerNotAuthorisedError (as "
            "federatls.allow_names and the others do)",
        )


def _malformed_spiffe_id(peer: PeerInfo) -> None:
    """Refuse a peer that carries a ``spiffe:`` URI breaking the SPIFFE ID rules: whatever
    its other names, it is not a peer to name-check (nor to hand to code that reads IDs)."""
    for uri in peer.sans.uris:
        problem = _uri_problem(uri) if uri[:7].lower() == "spiffe:" else None
        if problem:
            raise _refuse(peer, f"its URI name {uri!r} is not a well-formed SPIFFE ID: {problem}")


def allow_names(*patterns: str | NamePattern) -> Authoriser:
    """Allow a peer when one of its subject alternative names matches one of ``patterns``
    (and none of its names is a malformed SPIFFE ID)."""
    allowed = _patterns(patterns)

    def authorise(peer: PeerInfo) -> None:
        _malformed_spiffe_id(peer)
        names = peer.sans.as_strings()
        if not any(p.matches(n) for p in allowed for n in names):
            raise _refuse(peer, f"none of its names {names} matches {[p.text for p in allowed]}")

    return authorise


RootSpec = str | TrustedRoot | Provenance


_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def _fingerprint(spec: str | TrustedRoot) -> str:
    """A root's SHA-256 fingerprint as ``TrustedRoot`` spells it; ``ValueError`` quoting
    ``spec`` when it is not one (a typo must not make a rule that never applies)."""
    if isinstance(spec, TrustedRoot):
        return spec.fingerprint
    text = spec.lower().replace(":", "").replace("-", "")
    if not _FINGERPRINT.fullmatch(text):
        raise ValueError(f"root {spec!r} is not a SHA-256 fingerprint (64 hex digits)")
    return text


def _root_matcher(specs: Sequence[RootSpec]) -> Callable[[TrustedRoot], bool]:
    prints = {_fingerprint(s) for s in specs if not isinstance(s, Provenance)}
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


def root_may_vouch_for(
    rules: Mapping[str | TrustedRoot, Sequence[str | NamePattern]],
    *,
    allow_unruled_federated_roots: bool = False,
) -> Authoriser:
    """Per-root name rules: a peer anchored in a listed root must have *every* one of its
    names matched by that root's patterns.

    A peer of a root without a rule passes if the root is one of the workload's own CA's
    (``Provenance.OWN``), and is refused if it is federated, unless
    ``allow_unruled_federated_roots=True``: a federated CA can issue any name, so a root
    nobody wrote a rule for must not vouch for ours. Rules are keyed by fingerprint or
    ``TrustedRoot``; a key that is not a fingerprint is a ``ValueError``."""
    table = {_fingerprint(k): _patterns(v) for k, v in rules.items()}

    def authorise(peer: PeerInfo) -> None:
        if peer.anchor is None:
            raise _refuse(peer, "it has no known anchoring root")
        allowed = table.get(peer.anchor.fingerprint)
        if allowed is None:
            if peer.anchor.provenance is Provenance.OWN or allow_unruled_federated_roots:
                return
            raise _refuse(
                peer,
                f"its root {peer.anchor} is federated and has no rule in root_may_vouch_for "
                "(give that root a rule, or pass allow_unruled_federated_roots=True)",
            )
        _malformed_spiffe_id(peer)
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
            apply_authoriser(authoriser, peer)
        except PeerNotAuthorisedError as exc:
            log.warning("refused TLS peer: %s", exc)
            raise
    return peer
