"""Keeping an identity fresh: a renewal task in the caller's anyio task group, and the
``RenewingIdentity`` that live servers and clients draw their TLS contexts from.

One refresh renews the certificate over mutual TLS (``POST /renew``, same key), then fetches
``/roots`` and ``/federation`` in what is left of its deadline (a failure keeps the last good
bundle and does not stop the certificate), checks what the CA issued (``_issuance``: same
key, same names, valid now, not a CA, chained to the CA's own roots), builds the new
contexts, and swaps identity and contexts in as one snapshot. New handshakes use the new
snapshot; connections already open keep theirs. When to refresh, and how long a refresh may
take, is ``RenewalPolicy``'s business (``_policy.py``); a refresh past its deadline is a
failure like any other, retried with backoff. A chain the CA sends short of its intermediate
is completed from ``/intermediates`` where the CA has it (``completed_chain``).

A certificate that has expired (by our clock, or by the CA's: a 401 "certificate expired on
...", or a TLS alert) is renewed with a renew token signed by its key instead
(``Authorization: Bearer``, docs/protocol.md "Renew"), which a CA accepts only where the
provisioner allows renewal after expiry; the SDK learns that from the answer. Refused, the
identity enrols again through its token source, or renewal stops with
``IdentityExpiredError``. A CA that does not answer is retried with backoff, as always.

Between renewals the same task refreshes trust on its own schedule (``trust_refresh``, 5
minutes): ``/roots`` and ``/federation`` over server-authenticated TLS pinned to the
identity's own roots, no client certificate. A changed bundle is swapped in as a renewal's
is (same certificate, new trust); an unchanged one changes nothing; a failed fetch keeps
the last good bundle, sets ``last_error`` and is logged once per run of failures. One lock
makes renewals and trust refreshes take turns, so neither swaps over the other's snapshot;
a renewal that fetched trust counts as a trust refresh.

    async with anyio.create_task_group() as tg:
        live = await tg.start(federatls.keep_renewed, identity)
        server = await streams.start_server(live, handle, "0.0.0.0", 8443)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskStatus

from ._authorise import Authoriser
from ._bootstrap import bootstrap, completed_chain
from ._client import CAClient, Deadline, refused_as_expired
from ._contexts import new_server_context
from ._errors import (
    BadMaterialError,
    CARefusedError,
    CAUnreachableError,
    ConfigError,
    FederatlsError,
    IdentityExpiredError,
)
from ._identity import Identity, TrustChoice
from ._issuance import check_renewed
from ._keys import key_type_of
from ._peer import PeerInfo
from ._policy import RenewalPolicy
from ._sync import background
from ._token import mint_renew_token, renew_audience
from ._trust import TrustBundle

__all__ = [
    "LiveServerContext",
    "RenewingIdentity",
    "TokenSource",
    "keep_renewed",
    "keep_renewed_sync",
]

log = logging.getLogger("federatls.renewal")

TokenSource = Callable[[], Awaitable[str]]
Clock = Callable[[], datetime]


class AuthoriserKey:
    """An authoriser as part of a cache key: compared by identity, so an authoriser need not
    be hashable (a plain dataclass instance, say)."""

    __slots__ = ("authoriser",)

    def __init__(self, authoriser: Authoriser) -> None:
        self.authoriser = authoriser

    def __hash__(self) -> int:
        return id(self.authoriser)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AuthoriserKey) and other.authoriser is self.authoriser

    @classmethod
    def of(cls, authoriser: Authoriser | None) -> AuthoriserKey | None:
        return None if authoriser is None else cls(authoriser)


# ("server" | "client", trust, flag, ALPN protocols, authoriser): one context per kind in each
# snapshot.
_ContextKey = tuple[str, str, bool, tuple[str, ...], AuthoriserKey | None]
# Contexts with an authoriser or ALPN protocols kept per snapshot, at most: one per
# authoriser object and list, and a program that makes a new authoriser for every client must
# not make every renewal rebuild all the contexts it ever asked for. The oldest is dropped
# (its holders keep it working).
_MAX_AUTHORISED_CONTEXTS = 32


def _now() -> datetime:
    return datetime.now(UTC)


class _Snapshot:
    """An identity and the contexts built for it: swapped in as one."""

    def __init__(self, identity: Identity, contexts: dict[_ContextKey, ssl.SSLContext]) -> None:
        self.identity = identity
        self.contexts = contexts


def _same_trust(a: TrustBundle, b: TrustBundle) -> bool:
    """Whether two bundles hold the same roots with the same facts (provenance...), in any
    order: a CA that lists its roots in another order has changed nothing."""
    return sorted(a.roots, key=lambda r: r.fingerprint) == sorted(
        b.roots, key=lambda r: r.fingerprint
    )


def _difference(old: TrustBundle, new: TrustBundle) -> str:
    """What changed between two bundles, for the log: roots added and dropped."""
    before = {r.fingerprint: r for r in old}
    after = {r.fingerprint: r for r in new}
    added = [str(r) for fp, r in after.items() if fp not in before]
    dropped = [str(r) for fp, r in before.items() if fp not in after]
    parts = []
    if added:
        parts.append("added " + ", ".join(added))
    if dropped:
        parts.append("dropped " + ", ".join(dropped))
    return "; ".join(parts) or "the same roots with other facts"


def _build(identity: Identity, key: _ContextKey) -> ssl.SSLContext:
    side, trust, flag, alpn, keyed = key
    authoriser = keyed.authoriser if keyed is not None else None
    choice: TrustChoice = "own" if trust == "own" else "federation"
    if side == "server":
        ctx = identity.server_context(
            trust=choice, require_client_certificate=flag, authoriser=authoriser
        )
    else:
        ctx = identity.client_context(trust=choice, check_hostname=flag, authoriser=authoriser)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class LiveServerContext(ssl.SSLContext):
    """A real server ``ssl.SSLContext`` whose every handshake switches (in ``sni_callback``)
    to the newest snapshot's context: the newest certificate and trust bundle.

    ALPN protocols set on it with ``set_alpn_protocols`` are carried to the snapshots'
    contexts; other settings changed after it was handed out apply to no handshake."""

    alpn: tuple[str, ...] = ()

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        protocols = tuple(alpn_protocols)
        super().set_alpn_protocols(list(protocols))
        self.alpn = protocols


class RenewingIdentity:
    """An identity kept fresh by ``run()`` (see ``keep_renewed``). ``current`` is always the
    newest snapshot; contexts handed out here follow it."""

    def __init__(
        self,
        identity: Identity,
        *,
        policy: RenewalPolicy | None = None,
        token_source: TokenSource | None = None,
        clock: Clock = _now,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if isinstance(identity, RenewingIdentity):
            raise ConfigError(
                "keep_renewed takes the Identity that bootstrap returned, and this is already a "
                "RenewingIdentity (kept renewed by its own keep_renewed): use it as it is"
            )
        if not isinstance(identity, Identity):
            raise ConfigError(
                "keep_renewed takes an Identity (identity = await federatls.bootstrap(token)), "
                f"not {type(identity).__name__}"
            )
        self.policy = policy or RenewalPolicy()
        self._token_source = token_source
        self._clock = clock
        self._rand = rand
        self._snapshot = _Snapshot(identity, {})
        self._contexts_lock = threading.Lock()  # adding to a snapshot's contexts (_context)
        self._next: datetime = self._due(identity)
        self._failures = 0
        self._updated: anyio.Event | None = None
        self._ended = False  # run() returned or was cancelled
        self._lock: anyio.Lock | None = None  # one refresh (renewal or trust) at a time
        self._trust_next = self.policy.trust_refresh_due(clock(), rand())
        self._trust_failures = 0  # trust fetches failed in a row
        self._trust_error: FederatlsError | None = None  # the last of them
        self.renewals = 0
        self.trust_refreshes = 0  # successful trust fetches, a renewal's included
        self.trust_changes = 0  # changed bundles swapped in by trust refreshes
        self.trust_refreshed_at: datetime | None = None  # the last successful trust fetch
        self.last_error: FederatlsError | None = None
        self.stopped: FederatlsError | None = None

    # What observers see ------------------------------------------------------------------------
    @property
    def current(self) -> Identity:
        return self._snapshot.identity

    @property
    def expires_at(self) -> datetime:
        return self.current.not_after

    @property
    def next_renewal_at(self) -> datetime | None:
        """When the next refresh is planned; None once renewal has stopped or its task has
        ended (cancelled)."""
        return None if self.stopped is not None or self._ended else self._next

    @property
    def next_trust_refresh_at(self) -> datetime | None:
        """When trust is next fetched (a renewal before then fetches it too and moves this
        on); None when the trust refresh is off, renewal has stopped or its task has ended."""
        return None if self.stopped is not None or self._ended else self._trust_next

    def _due(self, identity: Identity) -> datetime:
        received = max(self._clock(), identity.not_before)
        return self.policy.renewal_due(received, identity.not_after, self._rand())

    async def wait_for_update(self) -> Identity:
        """Wait for the next swap and return the new identity; once renewal has stopped (or
        when it stops meanwhile), return the current one at once."""
        if self.stopped is not None:
            return self.current
        if self._updated is None:
            self._updated = anyio.Event()
        await self._updated.wait()
        return self.current

    async def updates(self) -> AsyncIterator[Identity]:
        """Each new identity as it is swapped in, until renewal stops."""
        while self.stopped is None:
            identity = await self.wait_for_update()
            if self.stopped is not None:
                return
            yield identity

    # Contexts ----------------------------------------------------------------------------------
    def _context(self, key: _ContextKey) -> ssl.SSLContext:
        snapshot = self._snapshot
        ctx = snapshot.contexts.get(key)
        if ctx is not None:
            return ctx
        built = _build(snapshot.identity, key)
        # Threads add contexts at once (clients made on many threads): the addition and the
        # bound's eviction under a lock, or one thread's eviction meets another's key
        # (RuntimeError) or two evict the same one (KeyError).
        with self._contexts_lock:
            ctx = snapshot.contexts.setdefault(key, built)
            # Keys a program may vary without end: the authoriser, the ALPN list.
            varied = [k for k in snapshot.contexts if k[4] is not None or k[3]]
            if len(varied) > _MAX_AUTHORISED_CONTEXTS:
                del snapshot.contexts[varied[0]]
        return ctx

    def server_context(
        self,
        *,
        trust: TrustChoice = "federation",
        require_client_certificate: bool = True,
        authoriser: Authoriser | None = None,
    ) -> ssl.SSLContext:
        """A server context that follows renewal: every new handshake uses the newest
        certificate and trust bundle (switched in ``sni_callback``, called for every
        ClientHello), and its client is checked by ``authoriser`` right after the handshake
        (see ``Identity.server_context``). Hand it to asyncio, aiohttp, uvicorn, hypercorn
        as any context; ALPN set on it is kept (``LiveServerContext``)."""
        current = self.current
        listening = new_server_context(
            current.chain,
            current._key,
            current._bundle(trust),
            require_client_certificate=require_client_certificate,
            name_rules=current.name_rules,
            authoriser=authoriser,
            cls=LiveServerContext,
        )

        def switch(
            conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext
        ) -> None:
            newest = self._context(
                ("server", trust, require_client_certificate, listening.alpn, keyed)
            )
            if newest is not ctx:
                conn.context = newest

        keyed = AuthoriserKey.of(authoriser)
        listening.sni_callback = switch
        return listening

    def client_context(
        self,
        *,
        trust: TrustChoice = "federation",
        check_hostname: bool = True,
        authoriser: Authoriser | None = None,
        alpn: Sequence[str] = (),
    ) -> ssl.SSLContext:
        """The newest snapshot's client context (servers checked by ``authoriser`` right
        after the handshake; ``alpn``, the protocols offered). A client context cannot
        switch by itself: take it again for each new connection (the integrations do).
        Contexts are kept per snapshot and per argument set, so pass the same authoriser
        object each time, not a new one. Libraries that set their ALPN protocols on the
        context at each connection (httpx, urllib3) are given one made with those
        protocols, so none of them changes what another offers."""
        key = ("client", trust, check_hostname, tuple(alpn), AuthoriserKey.of(authoriser))
        return self._context(key)

    def peer(self, conn: object) -> PeerInfo:
        """``current.peer(conn)``: the verified peer, anchored in the newest trust bundle."""
        return self.current.peer(conn)

    def authorise(self, conn: object, authoriser: Authoriser | None) -> PeerInfo:
        """``current.authorise(conn, authoriser)``."""
        return self.current.authorise(conn, authoriser)

    # Refreshing --------------------------------------------------------------------------------
    def _turn(self) -> anyio.Lock:
        """The lock renewals and trust refreshes take turns with (made on first use, inside
        the event loop)."""
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    async def refresh(self) -> Identity:
        """Refresh now: trust bundle and certificate, then swap. Raises on failure.

        ``last_error`` is cleared first: after a refresh it holds only what went wrong in it
        (a bundle fetch that failed, though the certificate renewed), or the failure."""
        async with self._turn():
            self.last_error = None
            old = self.current
            if self._clock() >= old.not_after:
                new, trusted = await self._after_expiry(old, "by our clock")
            else:
                try:
                    new, trusted = await self._renew(old)
                except IdentityExpiredError as exc:  # the CA's clock is ahead of ours
                    new, trusted = await self._after_expiry(old, f"the CA says so: {exc}")
            await self._install(new)
            if trusted:
                self._trust_fetched(new.trust)
            return new

    async def refresh_trust(self) -> bool:
        """Fetch the trust bundle now (``/roots`` and ``/federation``) and, if it changed,
        swap it in with the current certificate. Returns whether it changed; raises
        (``CAUnreachableError``, ``CARefusedError``, ``BadMaterialError``) on failure,
        keeping the current bundle. The task calls it every ``RenewalPolicy.trust_refresh``."""
        async with self._turn():
            current = self.current
            try:
                trust = await self._fetch_trust(current)
                changed = not _same_trust(trust, current.trust)
                if changed:
                    new = dataclasses.replace(current, trust=trust)  # name_rules kept
                    await self._swap(new)
            except FederatlsError as exc:
                self._trust_failed(exc)
                raise
            if changed:
                self.trust_changes += 1
                log.info(
                    "trust bundle of %s changed: %d root(s), %s",
                    current.common_name,
                    len(trust),
                    _difference(current.trust, trust),
                )
                self._notify()
            self._trust_fetched(trust)
            return changed

    async def _fetch_trust(self, current: Identity) -> TrustBundle:
        """``CAClient.trust_bundle`` over server-authenticated TLS pinned to the identity's
        own roots. No client certificate: the two endpoints are public, and a certificate
        past its end (or one the CA has revoked) must not stop trust from being fetched."""
        seconds = self.policy.timeout.total_seconds()
        deadline = Deadline.after(seconds, "the trust refresh")
        roots = current.trust.own().certificates
        client = await anyio.to_thread.run_sync(
            lambda: CAClient(current.ca_url, roots, timeout=seconds, deadline=deadline)
        )
        async with client as ca:
            return await ca.trust_bundle()

    def _trust_fetched(self, trust: TrustBundle) -> None:
        """A trust fetch succeeded (and its bundle is in use): count it, plan the next one,
        and end a run of failures with one line."""
        if self._trust_failures:
            log.info(
                "trust bundle of %s refreshed again after %d failed attempt(s): %d root(s)",
                self.current.common_name,
                self._trust_failures,
                len(trust),
            )
            if self.last_error is self._trust_error:
                self.last_error = None
        self._trust_failures, self._trust_error = 0, None
        self.trust_refreshes += 1
        now = self._clock()
        self.trust_refreshed_at = now
        self._trust_next = self.policy.trust_refresh_due(now, self._rand())

    def _trust_failed(self, error: FederatlsError) -> None:
        """A trust fetch failed: the last good bundle stays. Logged once per run of failures
        (then at DEBUG), and the next attempt planned as usual."""
        self._trust_failures += 1
        self._trust_error = self.last_error = error
        if self._trust_failures == 1:
            log.warning("trust bundle not refreshed, keeping the last good one: %s", error)
        else:
            log.debug(
                "trust bundle still not refreshed (%d failures in a row): %s",
                self._trust_failures,
                error,
            )
        self._trust_next = self.policy.trust_refresh_due(self._clock(), self._rand())

    async def _renew(self, old: Identity, *, by_token: bool = False) -> tuple[Identity, bool]:
        """The renewed identity, and whether its trust bundle was fetched (else the last
        good one is kept). Over mutual TLS; or, ``by_token``, with a renew token signed by
        the certificate's key (``Authorization: Bearer``, no client certificate): the way a
        CA renews an expired certificate, where its provisioner allows that."""
        key = old._key
        seconds = self.policy.timeout.total_seconds()
        deadline = Deadline.after(seconds, "the renewal")
        # Its TLS context (about a millisecond of OpenSSL) is built off the event loop.
        client = await anyio.to_thread.run_sync(
            lambda: CAClient(
                old.ca_url,
                old.trust.own().certificates,
                identity=None if by_token else (old.chain, key),
                timeout=seconds,
                deadline=deadline,
            )
        )
        async with client as ca:
            # The certificate first: a CA slow to answer /roots or /federation must not use
            # up the deadline the renewal needs. The bundle gets what is left.
            if by_token:
                token = mint_renew_token(
                    old.chain, key, audience=renew_audience(old.ca_url), now=self._clock()
                )
                signed = await ca.renew_with_token(token)
            else:
                try:
                    signed = await ca.renew()
                except (CARefusedError, CAUnreachableError) as exc:
                    if not refused_as_expired(exc):
                        raise
                    raise IdentityExpiredError(
                        f"the CA refuses to renew the certificate of {old.common_name} over "
                        f"mutual TLS: it has expired ({exc})"
                    ) from exc
            trust, trusted = old.trust, True
            try:
                trust = await ca.trust_bundle()
            except (CAUnreachableError, CARefusedError, BadMaterialError) as exc:
                self._trust_failed(exc)
                trusted = False
            chain = await completed_chain(ca, signed.chain, trust.own())
        check_renewed(chain, old=old.chain[0], roots=trust.own(), now=self._clock())
        return (
            Identity.from_parts(chain, key, trust, old.ca_url, name_rules=old.name_rules),
            trusted,
        )

    async def _after_expiry(self, old: Identity, why: str) -> tuple[Identity, bool]:
        """Renew an expired certificate (``why`` says how we know): with a renew token,
        which a CA accepts where the provisioner allows renewal after expiry; a refusal
        (4xx: not allowed, or no such way at this CA) leaves enrolling again with the token
        source, else ``IdentityExpiredError``. A CA that does not answer (or answers 5xx)
        raises as any renewal does, and is retried with backoff."""
        name = old.common_name
        # Once per run of attempts (a CA down is retried with backoff: its own warning says so).
        log.log(
            logging.WARNING if self._failures == 0 else logging.DEBUG,
            "certificate of %s expired at %s (%s): renewing it with a renew token, as a CA "
            "whose provisioner allows renewal after expiry does",
            name,
            old.not_after.isoformat(),
            why,
        )
        try:
            return await self._renew(old, by_token=True)
        except CARefusedError as exc:
            if exc.status >= 500:
                raise
            refusal = exc
        log.warning("the CA does not renew %s after expiry: %s", name, refusal)
        return await self._rebootstrap(old, refusal), True

    async def _rebootstrap(self, old: Identity, refusal: CARefusedError) -> Identity:
        if self._token_source is None:
            raise IdentityExpiredError(
                f"the certificate of {old.common_name} expired at {old.not_after.isoformat()} "
                f"before it could be renewed, and the CA does not renew it after expiry "
                f"({refusal.status}: {refusal.message}): enrol again with a new token, or "
                "give the renewal a token source"
            ) from refusal
        log.warning("certificate of %s expired: enrolling again with a new token", old.common_name)
        token = await self._token_source()
        return await bootstrap(
            token,
            key_type=key_type_of(old._key),
            timeout=self.policy.timeout.total_seconds(),
            name_rules=old.name_rules,
        )

    async def _swap(self, identity: Identity) -> None:
        """Build the new snapshot's contexts (off the event loop: OpenSSL's loading is the
        slow part) for every kind handed out so far, then swap it in as one."""
        keys = list(self._snapshot.contexts)

        def build() -> dict[_ContextKey, ssl.SSLContext]:
            return {key: _build(identity, key) for key in keys}

        try:
            contexts = await anyio.to_thread.run_sync(build)
        except (ssl.SSLError, ValueError) as exc:  # a root OpenSSL will not load, say
            raise BadMaterialError(
                f"cannot build TLS contexts for the new snapshot: {exc}"
            ) from exc
        self._snapshot = _Snapshot(identity, contexts)

    async def _install(self, identity: Identity) -> None:
        """Swap in a renewed identity, plan the next renewal, tell the waiters."""
        await self._swap(identity)
        self.renewals += 1
        self._failures = 0
        self._next = self._due(identity)
        log.info(
            "renewed %s: serial %d, valid until %s, %d root(s); next renewal at %s",
            identity.common_name,
            identity.serial,
            identity.not_after.isoformat(),
            len(identity.trust),
            self._next.isoformat(),
        )
        self._notify()

    def _notify(self) -> None:
        if self._updated is not None:
            event, self._updated = self._updated, anyio.Event()
            event.set()

    def _stop(self, error: FederatlsError) -> None:
        self.stopped = self.last_error = error
        log.error("renewal of %s stopped: %s", self.current.common_name, error)
        self._notify()

    # The task ----------------------------------------------------------------------------------
    async def run(
        self, *, task_status: TaskStatus[RenewingIdentity] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Refresh whenever the policy says, until renewal stops (revoked, refused, expired
        without a token source) or the task is cancelled. Failures to reach the CA are
        retried with backoff while the current certificate keeps serving. Between renewals,
        trust is refreshed every ``policy.trust_refresh`` (``refresh_trust``); its failures
        keep the last good bundle and never stop or delay renewal."""
        if self._updated is None:
            self._updated = anyio.Event()
        task_status.started(self)
        try:
            await self._loop()
        finally:
            self._ended = True

    async def _loop(self) -> None:
        while self.stopped is None:
            now = self._clock()
            if now >= self._next:
                await self._renewal()
            elif self._trust_next is not None and now >= self._trust_next:
                # A failure is logged and kept in last_error by refresh_trust: the last good
                # bundle stays, and neither renewal nor the next trust refresh is held up.
                with contextlib.suppress(FederatlsError):
                    await self.refresh_trust()
            else:
                wake = self._next if self._trust_next is None else min(self._next, self._trust_next)
                await anyio.sleep(self.policy.sleep_for(now, wake))

    async def _renewal(self) -> None:
        """One renewal from the task: failures retried or, when final, stopping renewal."""
        try:
            await self.refresh()
        except (CAUnreachableError, BadMaterialError) as exc:
            self._retry(exc)
        except CARefusedError as exc:
            if exc.status >= 500:
                self._retry(exc)
            else:
                self._stop(exc)
        except IdentityExpiredError as exc:
            self._stop(exc)

    def _retry(self, error: FederatlsError) -> None:
        self._failures += 1
        self.last_error = error
        now = self._clock()
        self._next = self.policy.retry_at(self._failures, now, self.current.not_after, self._rand())
        log.warning(
            "renewal of %s failed (%d in a row), retrying at %s: %s",
            self.current.common_name,
            self._failures,
            self._next.isoformat(),
            error,
        )


async def keep_renewed(
    identity: Identity,
    policy: RenewalPolicy | None = None,
    token_source: TokenSource | None = None,
    *,
    task_status: TaskStatus[RenewingIdentity] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``identity`` renewed; start it in your task group to get the live identity:

    live = await task_group.start(federatls.keep_renewed, identity)
    """
    live = RenewingIdentity(identity, policy=policy, token_source=token_source)
    await live.run(task_status=task_status)


@contextlib.contextmanager
def keep_renewed_sync(
    identity: Identity,
    *,
    policy: RenewalPolicy | None = None,
    token_source: TokenSource | None = None,
) -> Iterator[RenewingIdentity]:
    """For blocking code: keep ``identity`` renewed on a background event loop thread while
    the block runs, and yield the live identity.

        with federatls.keep_renewed_sync(identity) as live:
            serve_forever(live.server_context())
    """
    with background(keep_renewed, identity, policy, token_source) as live:
        yield live
