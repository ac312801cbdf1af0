"""What every integration shares (not public): what it takes (an ``Identity``, fixed, or a
``RenewingIdentity``, kept fresh), how it gets its contexts, and how it follows renewal.

One mechanism for all of them:

* contexts: ``client_context`` / ``source.server_context`` with the integration's
  ``authoriser``; the context itself checks the peer right after the handshake (name rules,
  then the authoriser), so no integration checks peers by hand (``_contexts``);
* renewal: ``Swapping`` holds the resource (connection pool, gRPC channel) built for the
  newest snapshot, and hands back the previous one to close once nothing uses it;
* refusals: ``peer_refusal`` finds the ``PeerNotAuthorisedError`` behind the library's
  handshake error, so callers get federatls's error whatever library wraps it;
* arguments: ``Arguments`` (one table per integration) and ``passed_on`` (the one check) say
  which keyword arguments go on to the library and refuse the others with ``ConfigError``;
  ``check_common`` refuses a bad ``source``, ``trust`` or ``authoriser`` when the
  integration is made, not at its first connection.
"""

from __future__ import annotations

import ssl
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._authorise import (
    Authoriser,
    all_of,
    allow_names,
    allow_roots,
    any_of,
    root_may_vouch_for,
)
from .._errors import ConfigError, PeerNotAuthorisedError
from .._identity import Identity, TrustChoice
from .._renewal import _MAX_AUTHORISED_CONTEXTS, AuthoriserKey, RenewingIdentity

__all__ = [
    "Arguments",
    "Slot",
    "Source",
    "Swapping",
    "check_common",
    "client_context",
    "passed_on",
    "peer_refusal",
    "require_https",
    "snapshot",
]

Source = Identity | RenewingIdentity

# What makes authorisers: passed uncalled (authoriser=allow_names), each would be called with
# the peer as its pattern and refuse everyone with a puzzling error.
_AUTHORISER_MAKERS: tuple[object, ...] = (
    allow_names,
    allow_roots,
    root_may_vouch_for,
    all_of,
    any_of,
)

if TYPE_CHECKING:
    pass

# One client context per identity and argument set, reused across connections: building one
# costs about a millisecond (bench/handshake.py); a connection should not pay it each time.
_ContextKey = tuple[TrustChoice, AuthoriserKey | None, tuple[str, ...]]
_CLIENT_CONTEXTS: weakref.WeakKeyDictionary[Identity, dict[_ContextKey, ssl.SSLContext]] = (
    weakref.WeakKeyDictionary()
)
_CLIENT_CONTEXTS_LOCK = threading.Lock()


def snapshot(source: Source) -> Identity:
    """The identity ``source`` presents now: a ``RenewingIdentity``'s newest snapshot."""
    return source.current if isinstance(source, RenewingIdentity) else source


def check_common(where: str, source: object, trust: object, authoriser: object) -> None:
    """``ConfigError`` (naming ``where`` and what to give instead) unless ``source`` is an
    ``Identity`` or a ``RenewingIdentity``, ``trust`` is "federation" or "own", and
    ``authoriser`` is None or callable. Every integration calls it first, so a mistake shows
    where it is made rather than deep inside a library at the first connection."""
    if not isinstance(source, Identity | RenewingIdentity):
        hint = (
            ": a token must be enrolled first (identity = await federatls.bootstrap(token))"
            if isinstance(source, str)
            else ""
        )
        raise ConfigError(
            f"{where}: the source must be a federatls Identity (from bootstrap) or a "
            f"RenewingIdentity (from keep_renewed), not {type(source).__name__}{hint}"
        )
    if trust not in ("federation", "own"):
        raise ConfigError(f"{where}: trust must be 'federation' or 'own', not {trust!r}")
    if authoriser is not None and not callable(authoriser):
        raise ConfigError(
            f"{where}: authoriser must be callable (such as federatls.allow_names(...)), "
            f"not {authoriser!r}"
        )
    if authoriser in _AUTHORISER_MAKERS:
        name = getattr(authoriser, "__name__", "")
        raise ConfigError(
            f"{where}: authoriser={name} is what makes an authoriser, not one: call it, "
            f"as in authoriser=federatls.{name}(...)"
        )


def client_context(
    source: Source,
    trust: TrustChoice,
    authoriser: Authoriser | None = None,
    alpn: tuple[str, ...] = (),
) -> ssl.SSLContext:
    """The client context to open a new connection with: for a ``RenewingIdentity`` the
    newest snapshot's, so new connections follow renewal. Servers are checked by
    ``authoriser`` in the handshake. ``alpn``: the protocols the library sets on the
    context at each connection (httpcore and urllib3 do; contexts are shared, so one
    library's list must not be what another offers: each list has its own context)."""
    if isinstance(source, RenewingIdentity):
        return source.client_context(trust=trust, authoriser=authoriser, alpn=alpn)
    key = (trust, AuthoriserKey.of(authoriser), alpn)
    contexts = _CLIENT_CONTEXTS.get(source)
    ctx = contexts.get(key) if contexts is not None else None
    if ctx is not None:
        return ctx
    built = source.client_context(trust=trust, authoriser=authoriser, alpn=alpn)
    # Threads add contexts at once: the addition and the bound's eviction under a lock (or
    # two threads evict the same key, or one evicts the key another is about to return).
    with _CLIENT_CONTEXTS_LOCK:
        contexts = _CLIENT_CONTEXTS.setdefault(source, {})
        ctx = contexts.setdefault(key, built)
        if len(contexts) > _MAX_AUTHORISED_CONTEXTS:  # a new authoriser per client: bounded
            del contexts[next(iter(contexts))]
    return ctx


def peer_refusal(exc: BaseException) -> PeerNotAuthorisedError | None:
    """The refusal behind ``exc``, a library's error for a handshake a federatls context
    refused (by the name rules or the authoriser: an ``ssl.SSLCertVerificationError`` whose
    ``__cause__`` is the ``PeerNotAuthorisedError``), as a new ``PeerNotAuthorisedError`` to
    raise ``from exc``; None for any other error. Libraries wrap it as their ``__cause__``
    or ``__context__`` (httpcore, aiohttp, asyncio), a ``reason`` (urllib3's
    ``MaxRetryError``) or an argument (requests' ``SSLError``): all are followed."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        refusal = item if isinstance(item, PeerNotAuthorisedError) else None
        if isinstance(item, ssl.SSLCertVerificationError) and isinstance(
            item.__cause__, PeerNotAuthorisedError
        ):
            refusal = item.__cause__
        if refusal is not None:
            return PeerNotAuthorisedError(str(refusal), peer=refusal.peer)
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return None


def require_https(where: str, url: str, *, otherwise: str = "a plain client") -> None:
    """``ConfigError`` for a URL that is not ``https://``: it would go without TLS, so
    without the identity and without the authoriser."""
    if url.partition(":")[0].lower() != "https":
        raise ConfigError(
            f"{where} speaks only https://, not {url!r}: a plain request would go without "
            "mutual TLS and without the authoriser; use https:// instead (or "
            f"{otherwise} for plain HTTP)"
        )


@dataclass(frozen=True)
class Arguments:
    """One integration's keyword arguments: those it refuses, each with why and what to do
    instead, and those it passes on to its library unchanged.

    A key of ``refused`` is a name (refused whatever its value), ``name=True`` (refused
    when its value is true: ``trust_env=True``), or ``prefix*`` (every name starting with
    ``prefix``, ones the library adds later included: ``ssl*``). ``passed_on`` None passes
    on every name not refused (for libraries with many harmless options: uvicorn, asyncio);
    otherwise a name in neither table is refused too, as not known to be harmless."""

    where: str  # the call, for messages: "federatls.integrations.httpx.Client"
    library: str  # where the rest go, for messages: "httpx"
    refused: Mapping[str, str]  # see above -> "would ...; instead ..."
    passed_on: frozenset[str] | None = None
    otherwise: str = ""  # the alternative for what is not passed on: "a plain httpx client"


def _refusal(refused: Mapping[str, str], name: str, value: Any) -> str | None:
    """What to say about ``name=value`` if ``refused`` refuses it: "name= why"."""
    if name in refused:
        return f"{name}= {refused[name]}"
    if value and f"{name}=True" in refused:
        return f"{name}=True {refused[f'{name}=True']}"
    for key, why in refused.items():
        if key.endswith("*") and name.startswith(key[:-1]):
            return f"{name}= {why}"
    return None


def passed_on(table: Arguments, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` if ``table`` lets each go on to the library; else ``ConfigError`` naming the
    first that may not, why, and what to do instead."""
    for name, value in kwargs.items():
        refusal = _refusal(table.refused, name, value)
        if refusal is not None:
            raise ConfigError(f"{table.where}: {refusal}")
        if table.passed_on is not None and name not in table.passed_on:
            otherwise = f" (or {table.otherwise})" if table.otherwise else ""
            raise ConfigError(
                f"{table.where}: {name}= is not passed on to {table.library}; use only "
                f"{', '.join(sorted(table.passed_on))} instead{otherwise}"
            )
    return dict(kwargs)


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
