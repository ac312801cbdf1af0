"""What every integration takes: an ``Identity`` (fixed) or a ``RenewingIdentity`` (kept
fresh), and how to get contexts and check peers from either. Not public."""

from __future__ import annotations

import ssl
import weakref

from .._authorise import Authoriser
from .._identity import Identity, TrustChoice
from .._peer import PeerInfo
from .._renewal import RenewingIdentity

__all__ = ["Source", "authorise", "client_context"]

Source = Identity | RenewingIdentity

# One client context per identity and trust choice, reused across connections: building one
# costs about a millisecond (bench/handshake.py); a connection should not pay it each time.
_CLIENT_CONTEXTS: weakref.WeakKeyDictionary[Identity, dict[str, ssl.SSLContext]] = (
    weakref.WeakKeyDictionary()
)


def client_context(source: Source, trust: TrustChoice) -> ssl.SSLContext:
    """The client context to open a new connection with: for a ``RenewingIdentity`` the
    newest snapshot's, so new connections follow renewal."""
    if isinstance(source, RenewingIdentity):
        return source.client_context(trust=trust)
    contexts = _CLIENT_CONTEXTS.setdefault(source, {})
    if trust not in contexts:
        contexts[trust] = source.client_context(trust=trust)
    return contexts[trust]


def authorise(source: Source, conn: object, authoriser: Authoriser | None) -> PeerInfo:
    """The verified peer of ``conn`` (anchored in the newest trust), checked by
    ``authoriser``; ``PeerNotAuthorisedError`` (logged) when refused."""
    return source.authorise(conn, authoriser)
