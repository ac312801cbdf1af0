"""One fetch of a step-style federation peer (a step-ca or a federatls CA): its ``/roots``,
authenticated as the SDK's bootstrap authenticates a CA. Nothing else belongs here: when to
fetch and what to keep is ``_follower``'s, the SPIFFE profiles are ``_spiffe_peer``'s.

- First contact (no roots trusted for the peer yet): ``/root/{fingerprint}`` is fetched
  without TLS verification and must have the pinned fingerprint (``_client.fetch_root``);
  then ``/roots`` is fetched over TLS verified against that root alone (the server's chain
  must lead to it, and its name must be the URL's host), and must list it.
- Every later fetch: ``/roots`` over TLS verified against the roots trusted for the peer
  now, so a peer that adds a root, issues from it and retires the old one is followed
  without any edit, and a server at the peer's URL that none of them vouches for is not.

Answers are bounded in size (``_client.MAX_ANSWER_BYTES``) and every fetch in time.
"""

from __future__ import annotations

from cryptography import x509

from .._client import CAClient, Deadline, fetch_root
from .._errors import CAUnreachableError, FederatlsError, PeerFetchError
from .._x509 import fingerprint
from ._federation import Fetched, PeerConfig, dedupe

__all__ = ["MAX_PEER_ROOTS", "fetch_step_peer"]

MAX_PEER_ROOTS = 32  # far above any rotation's overlap; more is refused, not truncated


async def fetch_step_peer(
    peer: PeerConfig, trusted: tuple[x509.Certificate, ...], timeout: float
) -> Fetched:
    """The peer's current roots, authenticated as the module says; ``PeerFetchError``
    naming the peer and the reason (unreachable, TLS refused, wrong fingerprint, the
    pinned root missing from ``/roots``, a malformed answer) otherwise."""
    if peer.fingerprint is None:
        raise PeerFetchError(peer.name, "a step peer needs a fingerprint")
    deadline = Deadline.after(timeout, f"the fetch of federation peer {peer.name!r}")
    try:
        # First contact: the pinned root alone, as bootstrap trusts /root/{sha}.
        anchors = trusted or (await fetch_root(peer.url, peer.fingerprint, deadline=deadline),)
        async with CAClient(peer.url, anchors, timeout=timeout, deadline=deadline) as ca:
            roots = dedupe(await ca.roots_bundle())
    except CAUnreachableError as exc:
        reason = str(exc)
        if exc.reason.startswith("TLS failure"):
            whom = "the roots trusted for this peer" if trusted else "the pinned root"
            reason = f"the server at {exc.url} is not authenticated by {whom}: {exc.reason}"
        raise PeerFetchError(peer.name, _first(peer, trusted) + reason) from exc
    except FederatlsError as exc:
        raise PeerFetchError(peer.name, _first(peer, trusted) + str(exc)) from exc
    if len(roots) > MAX_PEER_ROOTS:
        raise PeerFetchError(
            peer.name, f"{peer.url}/roots lists {len(roots)} roots, more than {MAX_PEER_ROOTS}"
        )
    if not trusted and peer.fingerprint not in {fingerprint(root) for root in roots}:
        raise PeerFetchError(
            peer.name,
            f"the pinned root {peer.fingerprint} is not among the roots {peer.url}/roots "
            "lists: refusing them",
        )
    return Fetched(roots)


def _first(peer: PeerConfig, trusted: tuple[x509.Certificate, ...]) -> str:
    return "" if trusted else f"first contact, pinned to root {peer.fingerprint}: "
