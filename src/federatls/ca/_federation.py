"""The CA's federation as values: the peers ca.json's ``federation`` block names (followed by
URL), what one fetch of a peer brought (``Fetched``), the sources ``/federation`` is made of
(``FederationSource``), and what the CA remembers of each peer in its store (``PeerState``).
Pure: no sockets, no clock reads, no store calls; fetching lives in ``_step_peer`` (and
``_spiffe_peer``), polling in ``_follower``, parsing of ca.json in ``_config``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .._errors import BadMaterialError
from .._x509 import certs_to_pem, fingerprint, load_pem_certificates

__all__ = [
    "DEFAULT_REFRESH",
    "MIN_REFRESH",
    "FederationConfig",
    "FederationSource",
    "Fetched",
    "Fetcher",
    "PeerConfig",
    "PeerRoots",
    "PeerState",
    "Profile",
    "dedupe",
    "peer_status",
    "pin_of",
    "printable",
    "shadows",
    "state_key",
]

Profile = Literal["step", "https_spiffe", "https_web"]
DEFAULT_REFRESH = timedelta(minutes=5)
MIN_REFRESH = timedelta(seconds=1)


@dataclass(frozen=True)
class PeerConfig:
    """One peer of ca.json's ``federation.peers``, validated (``_config``).

    ``refresh`` None means the block's default (for the SPIFFE profiles, the bundle's
    ``spiffe_refresh_hint`` when it gives one); ``fingerprint`` is the step profile's pin
    (lower-case hex SHA-256); ``trust_domain``, ``endpoint_spiffe_id`` and ``bundle`` (an
    absolute path, or relative to ca.json's directory as written) are the SPIFFE profiles'.
    """

    name: str
    profile: Profile
    url: str
    names: tuple[str, ...]
    refresh: timedelta | None = None
    fingerprint: str | None = None
    trust_domain: str | None = None
    endpoint_spiffe_id: str | None = None
    bundle: Path | None = None


@dataclass(frozen=True)
class FederationConfig:
    """ca.json's ``federation`` block: the default refresh interval and the peers (none when
    the block is absent)."""

    refresh: timedelta = DEFAULT_REFRESH
    peers: tuple[PeerConfig, ...] = ()

    def interval(self, peer: PeerConfig, hint: timedelta | None = None) -> timedelta:
        """How often ``peer`` is polled: its own ``refresh``, else the peer's hint (a SPIFFE
        bundle's ``spiffe_refresh_hint``), else the block's; never below ``MIN_REFRESH``."""
        chosen = peer.refresh or hint or self.refresh
        return max(chosen, MIN_REFRESH)


@dataclass(frozen=True)
class Fetched:
    """What one successful fetch of a peer brought: its roots (empty: the peer distrusted,
    as a SPIFFE bundle with ``"keys": []``), the bundle's sequence number and refresh hint
    when the peer gives them (SPIFFE)."""

    roots: tuple[x509.Certificate, ...]
    sequence: int | None = None
    refresh_hint: timedelta | None = None


# A fetcher: one fetch of ``peer``, authenticated by ``trusted`` (the peer's roots trusted
# now; empty at first contact), over within ``timeout`` seconds; PeerFetchError otherwise.
Fetcher = Callable[[PeerConfig, tuple[x509.Certificate, ...], float], Awaitable[Fetched]]


@dataclass(frozen=True)
class FederationSource:
    """One source of the roots ``/federation`` answers: the CA's own roots, its static
    ``federatedRoots``, or one peer's current roots with the names that peer may vouch for
    (``names`` None: any name, for own and static roots)."""

    kind: Literal["own", "static", "peer"]
    roots: tuple[x509.Certificate, ...]
    peer: str | None = None
    names: tuple[str, ...] | None = None


class PeerRoots:
    """The roots each peer vouches with now, by peer name: written by the follower (on the
    CA's event loop, one whole tuple at a time), read by the authority for ``/federation``.
    A peer absent here has no roots yet (never reached, and nothing stored)."""

    def __init__(self) -> None:
        self._roots: dict[str, tuple[x509.Certificate, ...]] = {}

    def get(self, peer: str) -> tuple[x509.Certificate, ...]:
        return self._roots.get(peer, ())

    def set(self, peer: str, roots: tuple[x509.Certificate, ...]) -> None:
        self._roots[peer] = roots

    def forget(self, keep: frozenset[str]) -> None:
        """Drop every peer not in ``keep`` (peers removed from ca.json by a reload)."""
        for name in set(self._roots) - keep:
            del self._roots[name]


def dedupe(certs: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, ...]:
    """``certs`` in order, each fingerprint once (step-ca de-duplicates its bundles too)."""
    seen: set[str] = set()
    out: list[x509.Certificate] = []
    for cert in certs:
        fp = fingerprint(cert)
        if fp not in seen:
            seen.add(fp)
            out.append(cert)
    return tuple(out)


def _key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _spki_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def shadows(root: x509.Certificate, ours: tuple[x509.Certificate, ...]) -> x509.Certificate | None:
    """The certificate of ``ours`` (the CA's own roots and intermediates, its static
    ``federatedRoots``) that a peer's ``root`` passes for in chain building, or None.

    OpenSSL looks an issuer up in the trust store first, by subject and key identifier, and
    does not try another candidate when the signature then fails: a trusted "root" with our
    intermediate's subject and key identifier but another key breaks every chain through
    that intermediate. A peer publishes what it likes, so such a root is not followed."""
    key_id, key = _key_id(root), _spki_der(root)
    for cert in ours:
        if cert.subject != root.subject or _spki_der(cert) == key:
            continue
        theirs = _key_id(cert)
        if key_id is None or theirs is None or key_id == theirs:
            return cert
    return None


MAX_REASON = 500  # characters of a peer's error kept in logs, the store and `ca peers`


def printable(text: str, most: int = MAX_REASON) -> str:
    """``text`` safe for one log line or terminal: each control character escaped (a peer
    chooses its error messages and its roots' names), clipped to ``most`` characters."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: most + 1])
    return shown if len(shown) <= most else shown[:most] + "…"


def pin_of(peer: PeerConfig) -> str:
    """What a peer's roots are learnt under besides its URL: the step profile's fingerprint,
    a SPIFFE peer's trust domain and endpoint ID. A change starts from first contact again."""
    if peer.profile == "step":
        return peer.fingerprint or ""
    return f"{peer.trust_domain or ''} {peer.endpoint_spiffe_id or ''}".strip()


def state_key(peer: str) -> str:
    """The store key of a peer's state (``Store.get_state``)."""
    return f"peer:{peer}"


@dataclass(frozen=True)
class PeerState:
    """What the CA remembers of one peer, in its store under ``state_key``: the last good
    roots and when they were fetched, the last failure (when and why; cleared by the next
    success), the bundle's sequence, and the URL and pin the roots were learnt under (a
    changed ``url`` or ``fingerprint`` in ca.json starts again from first contact).
    ``checked_at`` is the last attempt's time, success or failure: a process that finds a
    state checked since its own last look adopts it instead of fetching too; ``claimed_at``
    says that a process started a fetch then (a claim live until that fetch's ``checked_at``
    or its deadline), so that the others wait for its result instead of fetching too."""

    roots: tuple[x509.Certificate, ...] = ()
    last_success: datetime | None = None
    last_error: str = ""
    last_error_at: datetime | None = None
    checked_at: datetime | None = None
    claimed_at: datetime | None = None
    sequence: int | None = None
    refresh_hint: timedelta | None = None
    url: str = ""
    pin: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def learnt_under(self, peer: PeerConfig) -> bool:
        """Whether these roots were learnt for this peer's URL and pin (else: first contact)."""
        return self.url == peer.url and self.pin == pin_of(peer)

    def to_bytes(self) -> bytes:
        data: dict[str, Any] = {
            "roots": certs_to_pem(self.roots),
            "lastSuccess": _time(self.last_success),
            "lastError": self.last_error,
            "lastErrorAt": _time(self.last_error_at),
            "checkedAt": _time(self.checked_at),
            "claimedAt": _time(self.claimed_at),
            "sequence": self.sequence,
            "refreshHint": None if self.refresh_hint is None else self.refresh_hint.total_seconds(),
            "url": self.url,
            "fingerprint": self.pin,
        }
        return json.dumps({**self.extra, **data}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, what: str) -> PeerState:
        """A stored state; ``BadMaterialError`` naming ``what`` when it cannot be read."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            pem = data.get("roots") or ""
            roots = tuple(load_pem_certificates(pem, what)) if pem else ()
            sequence = data.get("sequence")
            if isinstance(sequence, bool) or not isinstance(sequence, int | None):
                raise ValueError("sequence is not an integer")
            hint = data.get("refreshHint")
            if isinstance(hint, bool) or not isinstance(hint, int | float | None):
                raise ValueError("refreshHint is not a number of seconds")
            return cls(
                roots=roots,
                last_success=_parse_time(data.get("lastSuccess")),
                last_error=str(data.get("lastError") or ""),
                last_error_at=_parse_time(data.get("lastErrorAt")),
                checked_at=_parse_time(data.get("checkedAt")),
                claimed_at=_parse_time(data.get("claimedAt")),
                sequence=sequence,
                refresh_hint=None if hint is None else timedelta(seconds=hint),
                url=str(data.get("url") or ""),
                pin=str(data.get("fingerprint") or ""),
                extra={k: v for k, v in data.items() if k not in _STATE_FIELDS},
            )
        except (ValueError, TypeError, BadMaterialError) as exc:
            raise BadMaterialError(f"{what}: the stored state is unreadable: {exc}") from exc


_STATE_FIELDS = frozenset(
    {"roots", "lastSuccess", "lastError", "lastErrorAt", "checkedAt", "claimedAt",
     "sequence", "refreshHint", "url", "fingerprint"}
)  # fmt: skip


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"time {value!r} is not a string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return parsed


def peer_status(peer: PeerConfig, state: PeerState | None) -> dict[str, Any]:
    """What ``federatls ca peers --json`` says of one peer: its configuration, the roots
    trusted for it now (none when they were learnt under another URL or pin), its last
    success and its last error."""
    usable = state is not None and state.learnt_under(peer)
    held = state if state is not None and usable else PeerState()
    return {
        "name": peer.name,
        "profile": peer.profile,
        "url": peer.url,
        "names": list(peer.names),
        "roots": [
            {
                "fingerprint": fingerprint(root),
                "subject": printable(root.subject.rfc4514_string()),
                "notAfter": root.not_valid_after_utc.isoformat(),
            }
            for root in held.roots
        ],
        "lastSuccess": _time(held.last_success),
        # Escaped when stored; again here, for a state another program wrote to the store.
        "lastError": printable(held.last_error) or None,
        "lastErrorAt": _time(held.last_error_at),
        "checkedAt": _time(held.checked_at),
        "sequence": held.sequence,
    }
