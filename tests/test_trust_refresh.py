"""The trust refresh: a workload fetches ``/roots`` and ``/federation`` on its own schedule
(``RenewalPolicy.trust_refresh``), apart from certificate renewal, and swaps a changed bundle
into its live servers and clients.

The policy's numbers are checked without sleeping; the task against real federatls CAs on
127.0.0.1 whose federation an operator changes (``federatedRoots`` edited, then reloaded, as
SIGHUP does), with trust refreshed every fraction of a second and certificates that live for
minutes, so that no renewal happens in between (the serial stays the same). A CA that is
down is a real CA stopped; one that answers garbage is ``rogue_ca.RogueCA``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import federatls
from federatls import (
    BadMaterialError,
    CAUnreachableError,
    Identity,
    RenewalPolicy,
    RenewingIdentity,
)
from federatls._client import CAClient
from federatls._renewal import _ContextKey
from federatls._sslkeys import load_cert_chain_in_memory
from federatls.integrations import httpx as fhttpx
from federatls.integrations import streams
from federatls.testing import TestCA, running_ca
from rogue_ca import Behaviour, Issue, RogueCA

from harness import PKI, SHORT, free_port, make_pki, serving, wait_until

pytestmark = pytest.mark.anyio

LOGGER = "federatls.renewal"
T0 = datetime(2030, 1, 1, tzinfo=UTC)
LONG = timedelta(minutes=10)  # certificates that renew long after any test has ended
SERVER_NAMES = ["server.cloud.internal", "127.0.0.1"]
# Trust refreshed every 0.3 s; renewal as by default (at two thirds of ten minutes).
QUICK = RenewalPolicy(trust_refresh=timedelta(milliseconds=300))
OFF = RenewalPolicy(trust_refresh=None)
WAIT = 20.0  # seconds: the bound of every wait for something that takes a fraction of one
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
CERT_ERRORS = (ssl.SSLCertVerificationError, httpx.ConnectError)
Source = Identity | RenewingIdentity


# Helpers ---------------------------------------------------------------------------------------
def _records(caplog: pytest.LogCaptureFixture, level: int, start: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == level and r.getMessage().startswith(start)
    ]


def _prints(identity: Identity) -> set[str]:
    return {root.fingerprint for root in identity.trust}


def _fingerprint(ca: TestCA | PKI) -> str:
    return ca.root_fingerprint if isinstance(ca, TestCA) else ca.fingerprint


async def _enrol(ca: TestCA, subject: str, sans: list[str] | None = None) -> Identity:
    return await federatls.bootstrap(ca.token(subject, sans=sans or [subject]), lifetime=LONG)


@contextlib.asynccontextmanager
async def _live(identity: Identity, policy: RenewalPolicy) -> AsyncIterator[RenewingIdentity]:
    """``identity`` kept renewed (and its trust refreshed) by a task for the block."""
    live = RenewingIdentity(identity, policy=policy)
    async with anyio.create_task_group() as tg:
        await tg.start(live.run)
        yield live
        tg.cancel_scope.cancel()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive: every request answered ``200 ok``."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            close = b"connection: close" in head.lower()
            extra = b"Connection: close\r\n" if close else b""
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n%s\r\nok" % extra)
            await writer.drain()
            if close:
                return
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        return
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def _server(source: Source) -> AsyncIterator[int]:
    """``streams.start_server`` on 127.0.0.1:0; yields the port."""
    server = await streams.start_server(source, _handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def _fetch(source: Source, port: int) -> bytes:
    """One request on a new connection: the answer, or b"" when the server cut it off."""
    reader, writer = await streams.open_connection(source, "127.0.0.1", port)
    data = b""
    try:
        writer.write(REQUEST)
        await writer.drain()
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return data


async def _get(http: fhttpx.AsyncClient, port: int) -> int | BaseException:
    """One GET through the pooled client: the status, or what it raised."""
    try:
        return (await http.get(f"https://127.0.0.1:{port}/")).status_code
    except (httpx.HTTPError, ssl.SSLError) as exc:
        return exc


async def _until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    await wait_until(predicate, timeout=timeout)


async def _reconfigure(change: Callable[[], None]) -> None:
    """An operator's change at a CA (ca.json edited and reloaded), off the event loop."""
    await anyio.to_thread.run_sync(change)


# 1. The policy --------------------------------------------------------------------------------
def test_trust_is_refreshed_every_five_minutes_by_default_never_later() -> None:
    """By default trust is fetched again 5 minutes after the last fetch, up to 10% sooner at
    random, never later. Twin: ``test_none_or_zero_turns_the_trust_refresh_off``."""
    policy = RenewalPolicy()
    assert policy.trust_refresh == timedelta(minutes=5)
    assert policy.trust_refresh_due(T0, 0.0) == T0 + timedelta(minutes=5)
    assert policy.trust_refresh_due(T0, 0.5) == T0 + timedelta(minutes=4, seconds=45)
    earliest = policy.trust_refresh_due(T0, 0.999999)
    assert earliest is not None
    assert T0 + timedelta(minutes=4, seconds=30) <= earliest < T0 + timedelta(minutes=5)
    custom = RenewalPolicy(trust_refresh=timedelta(seconds=30), trust_jitter=0.0)
    assert custom.trust_refresh_due(T0, 0.9) == T0 + timedelta(seconds=30)


@pytest.mark.parametrize("off", [None, 0, timedelta(0)])
def test_none_or_zero_turns_the_trust_refresh_off(off: timedelta | None) -> None:
    """Twin: None, 0 and a zero timedelta all turn it off: no fetch is ever planned."""
    policy = RenewalPolicy(trust_refresh=off)
    assert policy.trust_refresh is None
    assert policy.trust_refresh_due(T0, 0.5) is None
    assert policy == OFF


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trust_refresh": timedelta(seconds=-1)}, "trust_refresh must be a positive"),
        ({"trust_refresh": 300}, "trust_refresh must be a positive timedelta.*not 300"),
        ({"trust_refresh": "5m"}, "trust_refresh must be a positive timedelta.*not '5m'"),
        ({"trust_refresh": True}, "trust_refresh must be a positive timedelta.*not True"),
        ({"trust_refresh": False}, "trust_refresh must be a positive timedelta.*not False"),
        ({"trust_jitter": -0.1}, "trust_jitter"),
        ({"trust_jitter": 1.0}, "trust_jitter"),
    ],
)
def test_policy_refuses_an_impossible_trust_refresh(
    kwargs: dict[str, object], message: str
) -> None:
    """A negative duration, a number of seconds, a string or a bool is a ValueError saying
    what trust_refresh must be; a jitter outside [0, 1) one naming trust_jitter. Twin: the
    valid values of the two tests above."""
    with pytest.raises(ValueError, match=message):
        RenewalPolicy(**kwargs)  # type: ignore[arg-type]


# 2. A federation change reaches live servers and clients ---------------------------------------
async def _federation_added(policy: RenewalPolicy) -> dict[str, object]:
    """Two CAs that do not federate each other; a live cloud server and a live kubernetes
    client (pooled httpx) with ``policy``; then kubernetes federates cloud, and later cloud
    federates kubernetes. What the client's requests gave at each stage, the serials and the
    counters."""
    out: dict[str, object] = {}
    # Off, the change is given ten times its twin's interval to show (it must not).
    settle = WAIT if policy.trust_refresh is not None else 3.0
    with running_ca("cloud") as cloud, running_ca("kubernetes") as kubernetes:
        server_identity = await _enrol(cloud, "server.cloud.internal", SERVER_NAMES)
        client_identity = await _enrol(kubernetes, "client.k8s.internal")
        with anyio.fail_after(4 * WAIT):
            async with (
                _live(server_identity, policy) as server,
                _live(client_identity, policy) as client,
                _server(server) as port,
                fhttpx.AsyncClient(client) as http,
            ):
                out["before"] = await _get(http, port)
                await _reconfigure(lambda: kubernetes.federate(cloud))
                with contextlib.suppress(TimeoutError):
                    await _until(lambda: cloud.root_fingerprint in _prints(client.current), settle)
                out["client_side"] = await _get(http, port)
                await _reconfigure(lambda: cloud.federate(kubernetes))
                with contextlib.suppress(TimeoutError):
                    await _until(
                        lambda: kubernetes.root_fingerprint in _prints(server.current), settle
                    )
                out["both_sides"] = await _get(http, port)
                if policy.trust_refresh is None:  # then a renewal brings the change
                    await server.refresh()
                    await client.refresh()
                    out["after_renewal"] = await _get(http, port)
    out["serials"] = (server.current.serial, client.current.serial)
    out["enrolled"] = (server_identity.serial, client_identity.serial)
    out["renewals"] = (server.renewals, client.renewals)
    out["changes"] = (server.trust_changes, client.trust_changes)
    out["refreshes"] = (server.trust_refreshes, client.trust_refreshes)
    return out


async def test_federation_change_reaches_live_server_and_pooled_client_without_renewal() -> None:
    """A root federated at the CA reaches, within the trust interval and with no renewal (same
    serials), a live client's new handshakes (it then accepts the server, which still refuses
    it) and a live server's (it then serves the client). Twin:
    ``test_without_trust_refresh_a_federation_change_waits_for_the_renewal``."""
    out = await _federation_added(QUICK)
    before, client_side, both_sides = out["before"], out["client_side"], out["both_sides"]
    assert isinstance(before, CERT_ERRORS), before  # the client refuses the server
    assert "CERTIFICATE_VERIFY_FAILED" in str(before)
    # The client accepts the server now; the server cuts the handshake off (no verify error
    # on the client's side: a reset or a closed connection).
    assert isinstance(client_side, httpx.HTTPError), client_side
    assert "CERTIFICATE_VERIFY_FAILED" not in str(client_side)
    assert both_sides == 200
    assert out["serials"] == out["enrolled"]
    assert out["renewals"] == (0, 0)
    assert out["changes"] == (1, 1)
    refreshes = out["refreshes"]
    assert isinstance(refreshes, tuple)
    assert min(refreshes) >= 1


async def test_without_trust_refresh_a_federation_change_waits_for_the_renewal() -> None:
    """Twin: with the trust refresh off, neither side sees the change (the client keeps
    refusing the server, past many intervals of its twin); the next renewal brings it."""
    out = await _federation_added(OFF)
    for stage in ("before", "client_side", "both_sides"):
        error = out[stage]
        assert isinstance(error, CERT_ERRORS), (stage, error)
        assert "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert out["after_renewal"] == 200
    assert out["renewals"] == (1, 1)
    assert out["changes"] == (0, 0)
    assert out["refreshes"] == (1, 1)  # the renewal's fetch, and no other


# 3. A root dropped from the federation ----------------------------------------------------------
async def test_a_dropped_root_is_refused_by_live_server_and_pooled_client() -> None:
    """Once cloud stops federating kubernetes (and kubernetes cloud), the trust refresh drops
    the root: a kubernetes client, served before, is refused by the live cloud server, and the
    live kubernetes client's pool refuses the cloud server it talked to; no renewal needed.
    Twin: the same clients before the change, and cloud's own client after it, are served."""
    with running_ca("cloud") as cloud, running_ca("kubernetes") as kubernetes:
        cloud.federate(kubernetes)
        kubernetes.federate(cloud)
        server_identity = await _enrol(cloud, "server.cloud.internal", SERVER_NAMES)
        client_identity = await _enrol(kubernetes, "client.k8s.internal")
        k8s_client = await _enrol(kubernetes, "other.k8s.internal")
        cloud_client = await _enrol(cloud, "worker.cloud.internal")
        cloud_server = await _enrol(cloud, "other.cloud.internal", SERVER_NAMES)
        with anyio.fail_after(4 * WAIT):
            async with (
                _live(server_identity, QUICK) as server,
                _live(client_identity, QUICK) as client,
                _server(server) as port,
                _server(cloud_server) as other_port,
                fhttpx.AsyncClient(client) as http,
            ):
                served_before = await _fetch(k8s_client, port)
                pooled_before = await _get(http, other_port)
                await _reconfigure(cloud.federate)  # no federated roots any more
                await _reconfigure(kubernetes.federate)
                await _until(lambda: kubernetes.root_fingerprint not in _prints(server.current))
                await _until(lambda: cloud.root_fingerprint not in _prints(client.current))
                served_after = await _fetch(k8s_client, port)
                neighbour = await _fetch(cloud_client, port)
                pooled_after = await _get(http, other_port)
    assert served_before.startswith(b"HTTP/1.1 200 ")
    assert served_after == b""
    assert neighbour.startswith(b"HTTP/1.1 200 ")  # its own CA's clients still get in
    assert pooled_before == 200
    assert isinstance(pooled_after, CERT_ERRORS), pooled_after
    assert "CERTIFICATE_VERIFY_FAILED" in str(pooled_after)
    assert (server.current.serial, client.current.serial) == (
        server_identity.serial,
        client_identity.serial,
    )
    assert (server.renewals, client.renewals) == (0, 0)
    assert (server.trust_changes, client.trust_changes) == (1, 1)


# 4. Nothing changed: nothing swapped ----------------------------------------------------------
async def test_an_unchanged_bundle_swaps_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Trust fetched again and again with nothing changed at the CA: the same identity, the
    same contexts, no update for waiters, no INFO line; the fetches are counted and dated.
    Twin: ``test_a_changed_bundle_swaps_contexts_and_tells_waiters``."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with running_ca("cloud") as cloud, running_ca("partner") as partner:
        cloud.federate(partner)
        identity = await _enrol(cloud, "svc.cloud.internal")
        with anyio.fail_after(2 * WAIT):
            async with _live(identity, QUICK) as live:
                client_ctx = live.client_context()
                live.server_context()
                server_snapshot = live._context(("server", "federation", True, (), None))
                updated: list[Identity] = []

                async def watch() -> None:
                    updated.append(await live.wait_for_update())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    await _until(lambda: live.trust_refreshes >= 4)
                    tg.cancel_scope.cancel()
                planned = live.next_trust_refresh_at
                refreshed_at = live.trust_refreshed_at
                same_client = live.client_context() is client_ctx
                same_server = (
                    live._context(("server", "federation", True, (), None)) is server_snapshot
                )
    assert live.current is identity
    assert same_client
    assert same_server
    assert updated == []
    assert live.trust_changes == 0
    assert live.renewals == 0
    assert live.last_error is None
    assert refreshed_at is not None
    assert planned is not None
    assert refreshed_at < planned <= refreshed_at + timedelta(milliseconds=300)
    assert live.next_trust_refresh_at is None  # the task has ended
    assert _records(caplog, logging.INFO, "") == []
    assert _records(caplog, logging.WARNING, "") == []


async def test_a_changed_bundle_swaps_contexts_and_tells_waiters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Twin: a root federated meanwhile gives a new identity (same certificate, new bundle)
    to waiters, new contexts, and one INFO line naming the root added."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with running_ca("cloud") as cloud, running_ca("partner") as partner:
        identity = await _enrol(cloud, "svc.cloud.internal")
        with anyio.fail_after(2 * WAIT):
            async with _live(identity, QUICK) as live:
                client_ctx = live.client_context()
                await _reconfigure(lambda: cloud.federate(partner))
                updated = await live.wait_for_update()
                new_ctx = live.client_context()
    assert updated is live.current
    assert updated is not identity
    assert updated.chain == identity.chain
    assert partner.root_fingerprint in _prints(updated)
    assert new_ctx is not client_ctx
    assert live.trust_changes == 1
    assert live.renewals == 0
    changed = _records(caplog, logging.INFO, "trust bundle of svc.cloud.internal changed: 2 root")
    assert len(changed) == 1
    assert "added partner Root CA (federated" in changed[0].getMessage()


# 5. Renewal and the trust refresh -------------------------------------------------------------
FAST = RenewalPolicy(
    first_retry=timedelta(milliseconds=200),
    max_retry=timedelta(seconds=1),
    recheck=timedelta(seconds=1),
    trust_refresh=timedelta(seconds=5),
)


async def test_a_renewal_counts_as_a_trust_refresh() -> None:
    """With certificates renewed every ~2 s and trust due every 5 s, every trust fetch is a
    renewal's: each renewal moves the next trust refresh on, so it never runs by itself.
    Twin: ``test_without_renewals_the_trust_refresh_runs_by_itself``."""
    with running_ca("cloud", claims=SHORT, backdate="1s") as cloud:
        identity = await federatls.bootstrap(cloud.token("svc.cloud.internal"))
        with anyio.fail_after(2 * WAIT):
            async with _live(identity, FAST) as live:
                planned = []
                for _ in range(4):
                    await live.wait_for_update()
                    planned.append(live.next_trust_refresh_at)
    assert live.renewals == 4
    assert live.trust_refreshes == 4
    assert live.trust_changes == 0
    assert all(p is not None for p in planned)
    assert planned == sorted(planned, key=lambda p: p or T0)
    assert len(set(planned)) == 4


async def test_without_renewals_the_trust_refresh_runs_by_itself() -> None:
    """Twin: a certificate of ten minutes does not renew, and trust is fetched every 0.3 s
    all the same."""
    with running_ca("cloud") as cloud:
        identity = await _enrol(cloud, "svc.cloud.internal")
        with anyio.fail_after(WAIT):
            async with _live(identity, QUICK) as live:
                await _until(lambda: live.trust_refreshes >= 3)
    assert live.renewals == 0


# 6. The CA down or answering garbage ------------------------------------------------------------
async def test_ca_down_keeps_the_last_good_bundle_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the CA stopped every trust fetch fails: the last good bundle stays, last_error is
    the CAUnreachableError, one WARNING for the whole run of failures (the rest at DEBUG),
    renewal untouched (still planned, not stopped); the CA back with a new federated root,
    the next fetch swaps it in, logs one recovery line and clears last_error."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    pki = make_pki(tmp_path, "cloud", address=f"127.0.0.1:{free_port()}")
    partner = make_pki(tmp_path, "partner")
    with anyio.fail_after(4 * WAIT):
        async with serving(pki):
            identity = await federatls.bootstrap(pki.token("svc.cloud.internal"), lifetime=LONG)
        live = RenewingIdentity(identity, policy=QUICK)
        async with anyio.create_task_group() as tg:
            await tg.start(live.run)
            planned_renewal = live.next_renewal_at
            await _until(
                lambda: len(_records(caplog, logging.DEBUG, "trust bundle still not")) >= 3
            )
            during = (live.current, live.last_error, live.stopped, live.next_renewal_at)
            pki.federate(partner)
            async with serving(pki):
                await _until(lambda: live.trust_changes == 1)
            tg.cancel_scope.cancel()
    current, error, stopped, renewal = during
    assert current is identity
    assert isinstance(error, CAUnreachableError)
    assert error.url.startswith(pki.url)
    assert stopped is None
    assert renewal == planned_renewal
    warned = _records(caplog, logging.WARNING, "trust bundle not refreshed, keeping the last good")
    assert len(warned) == 1
    assert "cannot reach the CA" in warned[0].getMessage()
    recovered = _records(caplog, logging.INFO, "trust bundle of svc.cloud.internal refreshed again")
    assert len(recovered) == 1
    assert re.search(r"after \d+ failed attempt\(s\): 2 root\(s\)", recovered[0].getMessage())
    assert partner.fingerprint in _prints(live.current)
    assert live.current.serial == identity.serial
    assert live.last_error is None
    assert live.renewals == 0
    assert _records(caplog, logging.WARNING, "renewal of") == []


async def test_garbage_from_the_ca_keeps_the_last_good_bundle_while_renewal_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA whose /federation answers garbage: the bundle stays the enrolment's through trust
    refreshes and renewals alike, last_error is the BadMaterialError, one WARNING in all, and
    the certificate keeps renewing; the answers mended, the next fetch recovers (one line)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    rogue = RogueCA(make_pki(tmp_path, "cloud"))
    # Certificates of 3 s, backdated 1 s: renewed every ~2.7 s by FAST.
    rogue.issue = Issue(not_before=timedelta(seconds=-1), not_after=timedelta(seconds=3))
    policy = RenewalPolicy(
        first_retry=timedelta(milliseconds=200),
        max_retry=timedelta(seconds=1),
        recheck=timedelta(seconds=1),
        trust_refresh=timedelta(milliseconds=300),
    )
    with rogue.running():
        identity = await federatls.bootstrap(rogue.pki.token("svc.cloud.internal"))
        rogue.behaviour["/federation"] = Behaviour(body=b"<html>not json</html>")
        with anyio.fail_after(4 * WAIT):
            async with _live(identity, policy) as live:
                await _until(lambda: live.renewals >= 2)
                during = (live.current, live.last_error, live.trust_refreshes)
                del rogue.behaviour["/federation"]
                await _until(lambda: live.trust_refreshes > during[2])
    current, error, refreshes = during
    assert current.serial != identity.serial  # renewed
    assert current.trust is identity.trust  # the last good bundle, kept by every renewal
    assert isinstance(error, BadMaterialError)
    assert "not JSON" in str(error)
    assert refreshes == 0
    warned = _records(caplog, logging.WARNING, "trust bundle not refreshed, keeping the last good")
    assert len(warned) == 1
    assert _records(caplog, logging.WARNING, "renewal of") == []
    recovered = _records(caplog, logging.INFO, "trust bundle of svc.cloud.internal refreshed again")
    assert len(recovered) == 1
    assert live.last_error is None
    assert live.stopped is None


async def test_refresh_trust_raises_and_keeps_the_bundle(tmp_path: Path) -> None:
    """Called by hand, refresh_trust() raises what went wrong and keeps the bundle; once the
    CA answers again it returns whether the bundle changed."""
    rogue = RogueCA(make_pki(tmp_path, "cloud"))
    with rogue.running():
        identity = await federatls.bootstrap(rogue.pki.token("svc.cloud.internal"))
        live = RenewingIdentity(identity, policy=OFF)
        rogue.behaviour["/roots"] = Behaviour(body=b"garbage")
        with pytest.raises(BadMaterialError, match="not JSON"):
            await live.refresh_trust()
        assert live.current is identity
        del rogue.behaviour["/roots"]
        assert await live.refresh_trust() is False
        assert live.current is identity
        other = make_pki(tmp_path, "other")
        rogue.roots = [rogue.pki.root, other.root]
        assert await live.refresh_trust() is True
    assert _fingerprint(other) in _prints(live.current)
    assert live.current.chain == identity.chain
    assert (live.trust_refreshes, live.trust_changes) == (2, 1)


# 7. One swap at a time ------------------------------------------------------------------------
class _Gated(RenewingIdentity):
    """A ``RenewingIdentity`` whose trust fetch, once it has its answer, waits at a gate the
    test opens; with ``exclusive=False`` renewals and trust refreshes do not take turns (the
    lock each takes is a new one), to show what the lock prevents."""

    def __init__(self, identity: Identity, *, exclusive: bool) -> None:
        super().__init__(identity, policy=OFF)
        self.exclusive = exclusive
        self.fetched, self.gate = anyio.Event(), anyio.Event()

    def _turn(self) -> anyio.Lock:
        return super()._turn() if self.exclusive else anyio.Lock()

    async def _fetch_trust(self, current: Identity) -> federatls.TrustBundle:
        trust = await super()._fetch_trust(current)
        self.fetched.set()
        await self.gate.wait()
        return trust


@pytest.mark.parametrize("exclusive", [True, False])
async def test_renewal_waits_for_a_trust_refresh_in_flight(exclusive: bool) -> None:
    """A renewal asked for while a trust refresh is in flight waits its turn, and the
    identity ends with the renewed certificate and the new bundle. Twin: without the lock
    the renewal swaps in first and the trust refresh then swaps the old certificate back."""
    with running_ca("cloud") as cloud, running_ca("partner") as partner:
        identity = await _enrol(cloud, "svc.cloud.internal")
        live = _Gated(identity, exclusive=exclusive)
        await _reconfigure(lambda: cloud.federate(partner))
        renewed: list[Identity] = []

        async def renew() -> None:
            renewed.append(await live.refresh())

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(live.refresh_trust)
                await live.fetched.wait()
                tg.start_soon(renew)
                await anyio.sleep(1.0)  # ample for a renewal that does not wait
                renewals_at_gate = live.renewals
                live.gate.set()
    assert partner.root_fingerprint in _prints(live.current)
    assert len(renewed) == 1
    if exclusive:
        assert renewals_at_gate == 0
        assert live.current is renewed[0]
        assert live.current.serial != identity.serial
        assert live.trust_refreshes == 2
        return
    assert renewals_at_gate == 1
    assert live.current.serial == identity.serial  # the renewal was undone


# 8. Blocking code -------------------------------------------------------------------------------
def _wait_sync(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("policy", [QUICK, OFF], ids=["quick", "off"])
def test_keep_renewed_sync_takes_the_trust_refresh_from_its_policy(policy: RenewalPolicy) -> None:
    """keep_renewed_sync(identity, policy=...) refreshes trust on the policy's schedule: a
    root federated meanwhile is trusted without a renewal. Twin (``off``): with the refresh
    off it is not, in ten of its twin's intervals."""
    with running_ca("cloud") as cloud, running_ca("partner") as partner:
        identity = cloud.identity("svc.cloud.internal", lifetime=LONG)
        with federatls.keep_renewed_sync(identity, policy=policy) as live:
            cloud.federate(partner)
            seen = _wait_sync(
                lambda: partner.root_fingerprint in _prints(live.current),
                WAIT if policy.trust_refresh else 3.0,
            )
    assert seen is (policy.trust_refresh is not None)
    assert live.renewals == 0
    assert live.current.serial == identity.serial


async def test_a_bundle_openssl_cannot_load_keeps_the_last_good_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A new bundle whose contexts cannot be built (OpenSSL refusing a root: the context
    builder, a seam of our own, made to fail for it) is a trust refresh failure like a
    fetch's: the bundle in use stays, last_error is a BadMaterialError, the task runs on.
    Twin: test_a_changed_bundle_swaps_contexts_and_tells_waiters."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    build = federatls._renewal._build

    with running_ca("cloud") as cloud, running_ca("partner") as partner:

        def refusing(identity: Identity, key: _ContextKey) -> ssl.SSLContext:
            if partner.root_fingerprint in _prints(identity):
                raise ssl.SSLError("injected: OpenSSL refuses the partner's root")
            return build(identity, key)

        monkeypatch.setattr(federatls._renewal, "_build", refusing)
        identity = await _enrol(cloud, "svc.cloud.internal")
        with anyio.fail_after(2 * WAIT):
            async with _live(identity, QUICK) as live:
                live.client_context()
                await _reconfigure(lambda: cloud.federate(partner))
                warned = "trust bundle not refreshed, keeping the last good"
                await _until(lambda: bool(_records(caplog, logging.WARNING, warned)))
                during = (live.current, live.last_error, live.stopped, live.next_renewal_at)
    current, error, stopped, planned = during
    assert current is identity
    assert isinstance(error, BadMaterialError)
    assert "injected: OpenSSL refuses" in str(error)
    assert stopped is None
    assert planned is not None
    assert live.trust_changes == 0


async def test_trust_is_fetched_without_a_client_certificate(tmp_path: Path) -> None:
    """refresh_trust() presents no client certificate, so a workload whose certificate has
    expired still gets the CA's new roots. Twin: the same fetch presenting that certificate
    (as a renewal's connection does) is refused in the TLS handshake."""
    rogue = RogueCA(make_pki(tmp_path, "cloud"))  # it verifies a client certificate if sent
    rogue.issue = Issue(not_before=timedelta(seconds=-2), not_after=timedelta(seconds=1))
    other = make_pki(tmp_path, "other")
    with rogue.running():
        identity = await federatls.bootstrap(rogue.pki.token("svc.cloud.internal"))
        left = (identity.not_after - datetime.now(UTC)).total_seconds()
        await anyio.sleep(max(left, 0.0) + 0.2)
        rogue.roots = [rogue.pki.root, other.root]
        live = RenewingIdentity(identity, policy=OFF)
        changed = await live.refresh_trust()
        presenting = CAClient(
            identity.ca_url,
            identity.trust.own().certificates,
            identity=(identity.chain, identity._key),
        )
        async with presenting as ca:
            with pytest.raises(CAUnreachableError, match="TLS") as refused:
                await ca.trust_bundle()
    assert datetime.now(UTC) > identity.not_after
    assert changed is True
    assert _fingerprint(other) in _prints(live.current)
    assert refused.value.url.endswith("/roots")


def _impostor(pki: PKI, port: int, roots: list[x509.Certificate], tls_names: list[str]) -> RogueCA:
    """A server at the CA's address listing ``roots`` at ``/roots``, its TLS certificate
    issued by ``pki``'s intermediate for ``tls_names``."""
    rogue = RogueCA(pki, roots=roots, port=port)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = rogue.certificate("impostor", tls_names, key.public_key(), Issue())
    rogue._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_cert_chain_in_memory(rogue._tls, [cert, rogue.intermediate], key)
    return rogue


async def test_a_man_in_the_middle_cannot_swap_the_own_roots(tmp_path: Path) -> None:
    """A server at the CA's address answering ``/roots`` with an attacker's root is refused
    by the trust refresh (the bundle stays) when its TLS certificate comes from another CA,
    or from this CA for a workload's name, not the CA's address. Twin: the same answer from
    a server this CA certified for its address is taken (it is the CA's word)."""
    cloud, attacker = make_pki(tmp_path, "cloud"), make_pki(tmp_path, "attacker")
    port = free_port()
    with RogueCA(cloud, port=port).running():
        identity = await federatls.bootstrap(cloud.token("svc.cloud.internal"))
    live = RenewingIdentity(identity, policy=OFF)
    swapped = [cloud.root, attacker.root]
    for pki, names in ((attacker, ["127.0.0.1"]), (cloud, ["svc.cloud.internal"])):
        with (
            _impostor(pki, port, swapped, names).running(),
            pytest.raises(CAUnreachableError, match="TLS"),
        ):
            await live.refresh_trust()
        assert live.current is identity
    with _impostor(cloud, port, swapped, ["127.0.0.1"]).running():
        assert await live.refresh_trust() is True
    assert _fingerprint(attacker) in _prints(live.current)
