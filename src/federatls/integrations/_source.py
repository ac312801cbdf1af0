"""What every integration shares (not public): what it takes (an ``Identity``, fixed, or a
``RenewingIdentity``, kept fresh), how it gets its contexts, and how it follows renewal.

One mechanism for all of them:

* contexts: ``client_context`` / ``source.server_context`` with the integration's
  ``authoriser``; the context itself checks the peer right after the handshake (name rules,
  then the authoriser), so no integration checks peers by hand (``_contexts``);
* renewal: ``Swapping`` holds the resource (connection pool, gRPC channel) built for the
  newest snapshot, and hands back the previous one to close once nothing uses it.
"""

from __future__ import annotations

import ssl
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from .._authorise import Authoriser
from .._identity import Identity, TrustChoice
from .._peer import PeerInfo
from .._renewal import RenewingIdentity

__all__ = ["Slot", "Source", "Swapping", "authorise", "client_context", "snapshot"]

Source = Identity | RenewingIdentity

# One client context per identity and argument set, reused across connections: building one
# costs about a millisecond (bench/handshake.py); a connection should not pay it each time.
_ContextKey = tuple[TrustChoice, Authoriser | None]
_CLIENT_CONTEXTS: weakref.WeakKeyDictionary[Identity, dict[_ContextKey, ssl.SSLContext]] = (
    weakref.WeakKeyDictionary()
)


def snapshot(source: Source) -> Identity:
    """The identity ``source`` presents now: a ``RenewingIdentity``'s newest snapshot."""
    return source.current if isinstance(source, RenewingIdentity) else source


def client_context(
    source: Source, trust: TrustChoice, authoriser: Authoriser | None = None
) -> ssl.SSLContext:
    """The client context to open a new connection with: for a ``RenewingIdentity`` the
    newest snapshot's, so new connections follow renewal. Servers are checked by
    ``authoriser`` in the handshake."""
    if isinstance(source, RenewingIdentity):
        return source.client_context(trust=trust, authoriser=authoriser)
    contexts = _CLIENT_CONTEXTS.setdefault(source, {})
    key = (trust, authoriser)
    if key not in contexts:
        contexts[key] = source.client_context(trust=trust, authoriser=authoriser)
    return contexts[key]


def authorise(source: Source, conn: object, authoriser: Authoriser | None) -> PeerInfo:
    """The verified peer of ``conn`` (anchored in the newest trust), checked by
    ``authoriser``; ``PeerNotAuthorisedError`` (logged) when refused."""
    return source.authorise(conn, authoriser)


R = TypeVar("R")


class Slot(Generic[R]):
    """One snapshot's resource and how many calls use it now."""

    __slots__ = ("identity", "in_use", "resource", "retired")

    def __init__(self, identity: Identity, resource: R) -> None:
        self.identity = identity
        self.resource = resource
        self.in_use = 0
        self.retired = False


class Swapping(Generic[R]):
    """The resource (a connection pool, a gRPC channel) built by ``build`` for the source's
    newest snapshot. Each call takes a slot with ``acquire`` and gives it back with
    ``release``; after a swap the next ``acquire`` builds the new snapshot's resource, and
    the old one is handed back for closing as soon as no call uses it (at once if none
    does), so no connection keeps presenting an old certificate or trusting old roots.

    Safe to share between threads. It closes nothing itself: every method returns the
    resources to close now, and the caller closes them (``close()`` or ``await aclose()``).
    """

    def __init__(self, source: Source, build: Callable[[Identity], R]) -> None:
        self._source = source
        self._build = build
        self._lock = threading.Lock()
        self._current: Slot[R] | None = None
        self._retired: list[Slot[R]] = []

    def acquire(self) -> tuple[Slot[R], list[R]]:
        """The newest snapshot's slot, counted as in use until ``release``; and the
        resources this call retired that nothing uses (close them)."""
        identity = snapshot(self._source)
        to_close: list[R] = []
        with self._lock:
            current = self._current
            if current is None or current.identity is not identity:
                if current is not None:
                    current.retired = True
                    if current.in_use:
                        self._retired.append(current)
                    else:
                        to_close.append(current.resource)
                current = self._current = Slot(identity, self._build(identity))
            current.in_use += 1
        return current, to_close

    def release(self, slot: Slot[R]) -> R | None:
        """Give ``slot`` back; its resource if that was its last use after retirement
        (close it)."""
        with self._lock:
            slot.in_use -= 1
            if not (slot.retired and slot.in_use == 0) or slot not in self._retired:
                return None
            self._retired.remove(slot)
        return slot.resource

    def current(self) -> R | None:
        """The resource built for the snapshot last acquired, if any (for inspection)."""
        slot = self._current
        return slot.resource if slot is not None else None

    def close(self) -> list[R]:
        """Every resource held, to close; a later ``acquire`` builds anew."""
        with self._lock:
            slots = [*self._retired, *([self._current] if self._current else [])]
            for slot in slots:
                slot.retired = True
            self._current, self._retired = None, []
        return [slot.resource for slot in slots]
