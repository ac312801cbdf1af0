"""The CA's follower of its federation peers: one task per peer of ca.json's ``federation``
block, fetching the peer's roots every refresh interval (with jitter) and keeping the last
good ones (``PeerRoots``, which ``/federation`` serves) in memory and in the store, so that a
restart serves them at once, peer down or not. How a fetch is made and authenticated is the
fetchers' business (``_step_peer``, ``_spiffe_peer``); nothing here parses an answer.

Rules kept here:
- a failed or unauthenticated fetch changes no root: the last good ones stay, and the
  failure (time, reason) is recorded; one warning per run of failures, one info line when
  the peer answers again or its roots change;
- store calls are made from a thread, never on the event loop;
- processes sharing one database (worker processes, replicas on one PostgreSQL) share the
  work: each looks at the stored state before it fetches. One that finds a check made by
  another since its own takes that check's result instead of fetching, and waits one
  (jittered) interval from it; one that finds another's fetch under way (a live claim)
  waits for its result; else it stores its own claim and fetches. So the peer is asked
  about once per interval whatever the number of processes, and the others serve the
  result at most the jitter (15 % of an interval) after it was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .._errors import BadMaterialError, PeerFetchError, StoreBusyError
from .._x509 import common_name, fingerprint
from ._federation import (
    FederationConfig,
    Fetched,
    Fetcher,
    PeerConfig,
    PeerRoots,
    PeerState,
    pin_of,
    printable,
    state_key,
)
from ._step_peer import fetch_step_peer
from ._store import Store

__all__ = ["MAX_PEER_ROOTS_BYTES", "Follower", "describe_roots", "fetcher_for"]

log = logging.getLogger("federatls.ca")

Clock = Callable[[], datetime]
# Seconds one fetch may take: its refresh interval, but at least 5 s and at most 30 s.
MAX_FETCH_TIMEOUT = 30.0
MIN_FETCH_TIMEOUT = 5.0
JITTER = 0.15  # a fetch comes after 85 to 100 % of the interval
MAX_CLAIM_POLL = 1.0  # seconds between two looks at another process's fetch under way
# DER bytes of one peer's roots (32 roots of 2 KiB): the CA serves them again in /federation
# and /federatls/federation, which workloads read at most _client.MAX_ANSWER_BYTES of; a
# peer must not be able to fill that answer alone and so break every workload's trust fetch.
MAX_PEER_ROOTS_BYTES = 64 << 10


def fetcher_for(peer: PeerConfig) -> Fetcher:
    """The fetcher of the peer's profile: ``fetch_step_peer``, or ``fetch_spiffe_peer``
    (``_spiffe_peer``) for both SPIFFE profiles."""
    if peer.profile == "step":
        return fetch_step_peer
    try:  # imported when first needed: the SPIFFE side is a module of its own
        module = importlib.import_module("._spiffe_peer", __package__)
    except ImportError:
        return _no_spiffe
    fetch: Fetcher = module.fetch_spiffe_peer
    return fetch


async def _no_spiffe(
    peer: PeerConfig, trusted: tuple[x509.Certificate, ...], timeout: float
) -> Fetched:
    raise PeerFetchError(peer.name, f"profile {peer.profile!r} is not supported by this CA")


def describe_roots(roots: tuple[x509.Certificate, ...]) -> str:
    """``fingerprint (common name)`` of each root, for log lines."""
    if not roots:
        return "none"
    return ", ".join(
        f"{fingerprint(r)[:16]}… ({printable(common_name(r.subject), 80)})" for r in roots
    )


@dataclass(frozen=True)
class _Plan:
    peer: PeerConfig
    # The peer's own or the block's; a SPIFFE peer's refresh hint replaces the block's.
    interval: timedelta


class Follower:
    """The peers' tasks of one CA process. ``start`` loads every peer's stored state (the
    last good roots are served before the CA answers its first request) and starts the
    tasks; ``reconfigure`` (a reload) stops the tasks of peers removed or changed and starts
    new ones; ``stop`` stops them all. ``fetchers`` replaces the profile's fetcher (tests)."""

    def __init__(
        self,
        store: Store,
        roots: PeerRoots,
        clock: Clock,
        *,
        fetchers: Callable[[PeerConfig], Fetcher] = fetcher_for,
    ) -> None:
        self._store = store
        self.roots = roots
        self._clock = clock
        self._fetchers = fetchers
        self._tasks: dict[str, tuple[_Plan, asyncio.Task[None]]] = {}
        self._store_failing = False
        self.fetches = 0  # fetches made by this process (tests, the shared-work rule)

    async def start(self, config: FederationConfig) -> None:
        plans = self._plans(config)
        states = await asyncio.gather(*(self._load(plan.peer) for plan in plans))
        for plan, state in zip(plans, states, strict=True):
            self.roots.set(plan.peer.name, _usable(state, plan.peer).roots)
        self.roots.forget(frozenset(p.peer.name for p in plans))
        for plan, state in zip(plans, states, strict=True):
            self._spawn(plan, state)

    def reconfigure(self, config: FederationConfig) -> None:
        """Follow ``config``'s peers from now on (on the event loop, from a reload)."""
        plans = {plan.peer.name: plan for plan in self._plans(config)}
        for name, (plan, task) in list(self._tasks.items()):
            if plans.get(name) != plan:
                task.cancel()
                del self._tasks[name]
                if name not in plans or pin_of(plans[name].peer) != pin_of(plan.peer):
                    self.roots.set(name, ())  # not trusted under the new pin until fetched
        self.roots.forget(frozenset(plans))
        for name, plan in plans.items():
            if name not in self._tasks:
                self._spawn(plan, None)

    async def stop(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _plans(self, config: FederationConfig) -> list[_Plan]:
        return [_Plan(peer, config.interval(peer)) for peer in config.peers]

    def _spawn(self, plan: _Plan, state: PeerState | None) -> None:
        task = asyncio.create_task(self._follow(plan, state), name=f"peer {plan.peer.name}")
        self._tasks[plan.peer.name] = (plan, task)

    # -- one peer -------------------------------------------------------------------------

    async def _follow(self, plan: _Plan, state: PeerState | None) -> None:
        peer = plan.peer
        if state is None:  # started by a reload: what the store holds, read now
            state = await self._load(peer)
            self.roots.set(peer.name, _usable(state, peer).roots)
        state = _usable(state, peer)
        failing = False  # a run of failures that began before this process is logged anew
        while True:
            wait = self._due(state, plan)
            if wait > 0:
                await asyncio.sleep(wait)
            stored = _usable(await self._load(peer), peer)
            if _later(stored, state):  # another process checked meanwhile: its result
                state = self._adopt(peer, stored)
                continue
            if self._claimed(stored, plan):  # another process is fetching: wait for it
                await asyncio.sleep(min(MAX_CLAIM_POLL, plan.interval.total_seconds() / 4))
                continue
            await self._save(peer, replace(state, claimed_at=self._clock()))
            try:
                state, failing = await self._fetch(plan, state, failing)
            except Exception:  # a bug must not end the following for good
                log.exception("federation peer %r: unexpected failure; retrying", peer.name)
                await asyncio.sleep(plan.interval.total_seconds())

    def _due(self, state: PeerState, plan: _Plan) -> float:
        """Seconds until the next check: at once for a peer never checked; else when the
        last check (by any process) is one interval old, less some jitter."""
        if state.checked_at is None:
            return 0.0
        interval = FederationConfig(plan.interval).interval(plan.peer, state.refresh_hint)
        # Never negative: a check stamped in the future (a clock set back, a replica's
        # clock ahead) delays this process's next check by one interval at most.
        age = max((self._clock() - state.checked_at).total_seconds(), 0.0)
        jittered = interval.total_seconds() * (1 - JITTER * random.random())  # noqa: S311
        return max(jittered - age, 0.0)

    def _claimed(self, stored: PeerState, plan: _Plan) -> bool:
        """Whether ``stored`` holds another process's claim on a fetch still under way: made
        after the last check, and younger than a fetch's deadline (a claimant that died
        holds the peer up for that long at most; a claim stamped in the future, none)."""
        claimed = stored.claimed_at
        if claimed is None or (stored.checked_at is not None and claimed <= stored.checked_at):
            return False
        age = (self._clock() - claimed).total_seconds()
        return 0 <= age < _timeout(plan)

    def _adopt(self, peer: PeerConfig, stored: PeerState) -> PeerState:
        if stored.roots != self.roots.get(peer.name):
            log.info(
                "federation peer %r: roots now %s (fetched by another process)",
                peer.name,
                describe_roots(stored.roots),
            )
            self.roots.set(peer.name, stored.roots)
        return stored

    async def _fetch(self, plan: _Plan, state: PeerState, failing: bool) -> tuple[PeerState, bool]:
        """One fetch, its outcome applied and saved: (the new state, whether failing)."""
        peer = plan.peer
        trusted = self.roots.get(peer.name)
        self.fetches += 1
        try:
            fetched = await self._fetchers(peer)(peer, trusted, _timeout(plan))
            refusal = _older(fetched, state) or _oversized(fetched)
            if refusal:
                raise PeerFetchError(peer.name, refusal)
        except PeerFetchError as exc:
            now = self._clock()
            reason = printable(exc.reason)  # the peer's own words, in part
            if not failing:
                log.warning(
                    "federation peer %r: %s; keeping its last good roots (%s) until it "
                    "answers again",
                    peer.name,
                    reason,
                    describe_roots(trusted),
                )
            stored = _usable(await self._load(peer), peer)
            if _later(stored, state):  # a success elsewhere meanwhile: its roots are kept
                state = self._adopt(peer, stored)
            state = replace(state, last_error=reason, last_error_at=now, checked_at=now)
            await self._save(peer, state)
            return state, True
        now = self._clock()
        state = PeerState(
            roots=fetched.roots,
            last_success=now,
            checked_at=now,
            sequence=fetched.sequence if fetched.sequence is not None else state.sequence,
            refresh_hint=fetched.refresh_hint,
            url=peer.url,
            pin=pin_of(peer),
        )
        # Stored first, then served: a restart never serves roots older than were served.
        await self._save(peer, state)
        self.roots.set(peer.name, fetched.roots)
        if failing:
            log.info("federation peer %r answers again", peer.name)
        if fetched.roots != trusted:
            log.info("federation peer %r: roots now %s", peer.name, describe_roots(fetched.roots))
        return state, False

    # -- the store, from a thread -----------------------------------------------------------

    async def _load(self, peer: PeerConfig) -> PeerState | None:
        key = state_key(peer.name)
        try:
            raw = await asyncio.to_thread(self._store.get_state, key)
            return None if raw is None else PeerState.from_bytes(raw, key)
        except (StoreBusyError, BadMaterialError) as exc:
            self._store_problem(f"cannot read the state of federation peer {peer.name!r}", exc)
            return None

    async def _save(self, peer: PeerConfig, state: PeerState) -> None:
        try:
            await asyncio.to_thread(self._store.put_state, state_key(peer.name), state.to_bytes())
        except StoreBusyError as exc:
            self._store_problem(f"cannot save the state of federation peer {peer.name!r}", exc)
            return
        if self._store_failing:
            log.info("the federation peers' states are saved again")
            self._store_failing = False

    def _store_problem(self, what: str, exc: Exception) -> None:
        if not self._store_failing:
            log.warning("%s (the roots in memory are still served): %s", what, exc)
        self._store_failing = True


def _timeout(plan: _Plan) -> float:
    """Seconds one fetch of the plan's peer may take."""
    return min(MAX_FETCH_TIMEOUT, max(MIN_FETCH_TIMEOUT, plan.interval.total_seconds()))


def _usable(state: PeerState | None, peer: PeerConfig) -> PeerState:
    """``state`` if it was learnt under this peer's URL and pin; else a blank one (first
    contact again, trusting nothing until it succeeds)."""
    if state is None or not state.learnt_under(peer):
        return PeerState(url=peer.url, pin=pin_of(peer))
    return state


def _later(stored: PeerState, mine: PeerState) -> bool:
    """Whether ``stored`` records a check made after the one ``mine`` records."""
    if stored.checked_at is None:
        return False
    return mine.checked_at is None or stored.checked_at > mine.checked_at


def _oversized(fetched: Fetched) -> str:
    """Why ``fetched`` is refused as too large to serve again (``MAX_PEER_ROOTS_BYTES``)."""
    size = sum(len(root.public_bytes(Encoding.DER)) for root in fetched.roots)
    if size <= MAX_PEER_ROOTS_BYTES:
        return ""
    return (
        f"its roots take {size} bytes, more than {MAX_PEER_ROOTS_BYTES}: refused (the CA's "
        "/federation would outgrow what workloads read)"
    )


def _older(fetched: Fetched, state: PeerState) -> str:
    """Why ``fetched`` is refused as older than what is held (a lower SPIFFE sequence)."""
    if fetched.sequence is None or state.sequence is None or fetched.sequence >= state.sequence:
        return ""
    return (
        f"the bundle's sequence {fetched.sequence} is lower than {state.sequence}, the last "
        "one accepted: an old bundle, refused"
    )
