"""The CA's own roots as a SPIFFE bundle (``GET /spiffe/bundle``): its ``spiffe_sequence``
grows with every change of the roots served and survives a restart, because the number and
a digest of the roots it numbered are kept in the store (``Store.get_state``, key
``spiffe:own``). ``next_sequence`` is the pure rule; ``OwnBundle`` makes the store calls, in
the server's worker threads (never on the event loop), once per loaded configuration.

Not guaranteed: two processes sharing one store (workers, replicas) that serve different
roots at the same instant may each number their bundle with the same next value; once both
serve the same roots they agree again. docs/spiffe.md says so.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta

from cryptography import x509

from .._errors import BadMaterialError
from .._spiffe import SpiffeBundle, roots_digest
from ._store import Store

__all__ = ["STATE_KEY", "OwnBundle", "next_sequence", "own_bundle"]

STATE_KEY = "spiffe:own"


def next_sequence(stored: bytes | None, digest: str) -> tuple[int, bytes | None]:
    """The sequence of a bundle of roots with ``digest``, given the stored state: the stored
    sequence when it numbered the same roots, else one more (1 for the first bundle); and
    the state to store, None when it is unchanged. ``BadMaterialError`` when the stored
    state cannot be read (the CA would not know which numbers it has used)."""
    if stored is None:
        sequence = 1
    else:
        try:
            data = json.loads(stored)
            last, last_digest = data["sequence"], data["digest"]
            if isinstance(last, bool) or not isinstance(last, int) or last < 0:
                raise ValueError(f"sequence {last!r} is not a non-negative integer")
        except (ValueError, TypeError, KeyError) as exc:
            raise BadMaterialError(f"the store's {STATE_KEY!r} state is unreadable: {exc}") from exc
        if last_digest == digest:
            return last, None
        sequence = last + 1
    state = json.dumps({"sequence": sequence, "digest": digest}, sort_keys=True)
    return sequence, state.encode()


def own_bundle(store: Store, roots: tuple[x509.Certificate, ...], hint: timedelta) -> bytes:
    """The served bundle of ``roots``, numbered by (and recorded in) ``store``. Makes store
    calls that may wait: call it from a worker thread."""
    digest = roots_digest(roots)
    sequence, state = next_sequence(store.get_state(STATE_KEY), digest)
    if state is not None:
        store.put_state(STATE_KEY, state)
    hint_seconds = max(1, int(hint.total_seconds()))
    return SpiffeBundle(roots, sequence, hint_seconds).to_bytes()


class OwnBundle:
    """The served bundle, made once for each loaded configuration (a reload, which may change
    the roots, makes it again on the next request) and shared by concurrent requests."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._made_for: object = None
        self._body = b""

    async def body(
        self,
        key: object,
        make: Callable[[], bytes],
        off_loop: Callable[[Callable[[], bytes]], Awaitable[bytes]],
    ) -> bytes:
        """The bundle for configuration ``key`` (the authority object): ``make()`` run by
        ``off_loop`` the first time, the same bytes after."""
        async with self._lock:
            if self._made_for is not key:
                self._body = await off_loop(make)
                self._made_for = key
            return self._body
