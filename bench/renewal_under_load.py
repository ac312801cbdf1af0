"""Requests per second from an httpx client to an aiohttp server while both renew their
certificates every few seconds and the server's CA rotates its root, against the same load
with long-lived certificates.

What is measured
----------------
Two federated federatls CAs run in this process (``federatls.testing.federated_pair``, with
claims that allow certificates of a few seconds and ``backdate`` 1 s). Two workload
processes, started once and reused for every segment, each with its own event loop and GIL:

* the server: enrolled with the "cloud" CA (``server.cloud.internal``, IP SAN 127.0.0.1),
  its identity kept renewed by a ``RenewingIdentity`` (what ``keep_renewed`` runs), serving
  ``GET /`` (a 3-byte answer) with aiohttp through ``federatls.integrations.aiohttp.Site``,
  clients checked with ``allow_names("*.k8s.internal")``;
* the client: enrolled with the "kubernetes" CA (``client.k8s.internal``), kept renewed the
  same way, sending requests with ``federatls.integrations.httpx.AsyncClient`` (server
  checked with ``allow_names("server.cloud.internal")``, httpx's default 5 s timeout) from a
  fixed number of loops (8 and 32 by default), each sending its next request as soon as the
  last one is answered. Keep-alive as httpx does it. By default (``--pool shared``) all
  loops share one client whose pool holds one connection per loop
  (``max_connections = max_keepalive_connections = loops``); ``--pool per-loop`` gives each
  loop a client of its own with one connection, which takes httpcore's shared pool (its
  CPU cost and its unfair hand-over of connections, see bench/README.md) out of the
  figures. Either way connections are opened at the start and after each of the client's
  renewals (its transport retires the previous snapshot's pool), not otherwise.

Two conditions, in alternating segments (steady, churn, churn, steady for each level: ABBA,
so a linear drift in outside load cancels out); every segment enrols both workloads afresh
(outside the clock), warms up for ``--warmup`` seconds, then measures for ``--duration``:

* ``steady``: certificates of 24 hours; nothing renews during the window.
* ``churn``: certificates of ``--lifetime`` seconds (4), so each side renews every 2 to
  2.7 s (at two thirds of the life left, less up to 5% jitter: ``RenewalPolicy``'s
  defaults); a renewal fetches ``/roots`` and ``/federation``, renews over mutual TLS, builds
  the new contexts in a worker thread and swaps them in. The client enrols a third of a
  lifetime after the server so that their renewals alternate rather than coincide. And
  during the window the cloud CA rotates its root, one full cycle per segment: ``add_root``
  (the kubernetes CA federates the new root too), ``issue_from_new_root``,
  ``retire_old_roots`` (the kubernetes CA drops the old root), each followed by a reload
  (SIGHUP's work), at 1/8 of the window and then every third of it, so each step comes at
  least one certificate lifetime (1.5 renewal periods) after the one before.

Figures, per condition and level (segments pooled): successful requests per second; p50, p99
and max latency (from the ``client.get`` call to the whole body read); failed requests (any
exception, non-200 status or wrong body, in the window; must be 0; samples printed); the
renewals each side swapped in during the window; connections the server saw; CPU
milliseconds per request of both processes; and the ratio churn / steady. Where the time
went: an httpcore ``trace`` callback notes when each request reached a connection, which
splits its latency into the wait in httpx and its pool, and the rest (connecting, if the
request opened the connection, then the exchange); and the p99 of the requests that started
within 250 ms after one of the client's swaps.

Event-loop stalls: in both workload processes a ticker task sleeps 5 ms in a loop and
records how late each wake-up is; ``gc.callbacks`` record every garbage collection (they
run on the loop's thread). Reported per process: the longest lateness overall; the longest
whose late interval lies within 50 ms of a swap of this process (the moment the new
snapshot is installed) and of the other process (for the server that is when the client
reconnects); the longest during one of its refreshes (from its start to its swap); the
longest with no collection of 2 ms or more in it; and the collections themselves. Swap
times come from a ``RenewingIdentity`` subclass that notes the start of each refresh, the
start of ``_install`` and its end (the swap), and each failed refresh; it is otherwise the
library's class, run as ``keep_renewed`` runs it. Its refresh and install durations are
reported, with the time to build the same two contexts inline (the worker thread's work)
and the TLS context of the CA client each refresh makes (built on the event loop).

What is not measured
--------------------
* Network latency (everything is on 127.0.0.1), HTTP/2, request or response bodies of any
  size, other servers (uvicorn) and clients (aiohttp's, the sync httpx ``Client``).
* Renewal failing: the CAs stay reachable; an unreachable CA, revocation and expiry are the
  test suite's business.
* The CAs' own cost beyond CPU: they share this process with the rotation steps.
* Long-run effects (memory growth over thousands of renewals): a segment sees a handful.

Run ``python bench/renewal_under_load.py --help``; bench/README.md explains how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import platform
import ssl
import statistics
import sys
import time
import traceback
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import httpx
from aiohttp import web

import federatls
from federatls import Identity, RenewingIdentity, allow_names
from federatls._client import client_tls_context
from federatls.ca import RotationStep, add_root, issue_from_new_root, retire_old_roots
from federatls.integrations.aiohttp import Site
from federatls.integrations.httpx import AsyncClient
from federatls.testing import TestCA, federated_pair
from sign_throughput import machine_busy_seconds, percentile, process_cpu_seconds, write_results

HOST = "127.0.0.1"
SERVER_NAME = "server.cloud.internal"
CLIENT_NAME = "client.k8s.internal"
BODY = b"ok\n"
STEADY, CHURN = "steady", "churn"
SHARED, PER_LOOP = "shared", "per-loop"  # how the client's loops share httpx clients
# Certificates of a few seconds must be allowed; without a requested lifetime, 24 hours.
CLAIMS = {"minTLSCertDuration": "2s", "defaultTLSCertDuration": "24h", "maxTLSCertDuration": "24h"}
BACKDATE = "1s"
TICK = 0.005  # seconds the ticker asks to sleep
NEAR_SWAP = 0.050  # seconds either side of a swap
GC_PAUSE = 0.002  # garbage collections at least this long count as explaining a stall
REQUEST_TIMEOUT = 5.0  # httpx's default: a slower request fails
MAX_ERROR_SAMPLES = 5
STEP_NAMES = ("add_root", "issue_from_new_root", "retire_old_roots")


# --- In both workloads: renewal with timestamps, and the ticker ------------------------------
@dataclass(frozen=True)
class Refresh:
    """One successful refresh, ``time.monotonic()`` seconds (the same clock in every
    process of the machine)."""

    started: float  # refresh() called: /roots, /federation, /renew over mutual TLS
    install: float  # _install() called: contexts built in a worker thread, then swapped
    swapped: float  # _install() done: new handshakes use the new snapshot


class TimedRenewingIdentity(RenewingIdentity):
    """``RenewingIdentity`` noting when each refresh starts, installs and swaps, and each
    failed refresh. ``run()`` is the library's: the same policy, thread and swap."""

    def __init__(self, identity: Identity) -> None:
        super().__init__(identity)
        self.refreshes: list[Refresh] = []
        self.failures: list[tuple[float, str]] = []
        self._refresh_started = 0.0
        self._install_started = 0.0

    async def refresh(self) -> Identity:
        self._refresh_started = time.monotonic()
        try:
            return await super().refresh()
        except federatls.FederatlsError as exc:
            self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
            raise

    async def _install(self, identity: Identity) -> None:
        self._install_started = time.monotonic()
        await super()._install(identity)
        self.refreshes.append(
            Refresh(self._refresh_started, self._install_started, time.monotonic())
        )


# The records are kept in arrays of floats, which the garbage collector does not track: lists
# of tuples would be tracked, and would make its full collections (themselves loop stalls)
# longer than the application alone makes them.
def floats() -> array[float]:
    return array("d")


class Ticker:
    """Sleeps ``TICK`` seconds in a loop; records each wake-up and how late it was."""

    def __init__(self) -> None:
        self.woke, self.late = floats(), floats()  # time.monotonic(), seconds

    async def run(self) -> None:
        while True:
            due = time.monotonic() + TICK
            await asyncio.sleep(TICK)
            woke = time.monotonic()
            self.woke.append(woke)
            self.late.append(woke - due)


class GCWatch:
    """Notes every garbage collection (``gc.callbacks``): when, how long, which generation.
    A collection runs on the event loop's thread and stops it."""

    def __init__(self) -> None:
        self.at, self.seconds, self.generation = floats(), floats(), floats()
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.monotonic()
        else:
            self.at.append(self._started)
            self.seconds.append(time.monotonic() - self._started)
            self.generation.append(info["generation"])

    @classmethod
    @contextlib.contextmanager
    def watching(cls) -> Iterator[GCWatch]:
        watch = cls()
        gc.callbacks.append(watch)
        try:
            yield watch
        finally:
            gc.callbacks.remove(watch)


def median_ms(make: Callable[[], object], calls: int = 10) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        make()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def build_contexts_ms(identity: Identity) -> float:
    """Median milliseconds to build a server and a client context inline: the work
    ``_install`` hands to its worker thread (both kinds are in use in each process)."""
    return median_ms(lambda: (identity.server_context(), identity.client_context()))


def ca_context_ms(identity: Identity) -> float:
    """Median milliseconds to build the TLS context a refresh's ``CAClient`` gets (own roots,
    the identity's chain and key): built on the event loop, at the start of each refresh."""
    roots, chain, key = identity.trust.own().certificates, identity.chain, identity._key
    return median_ms(lambda: client_tls_context(roots, (chain, key)))


@dataclass
class WorkloadResult:
    """What a workload process reports after a segment."""

    ticker: Ticker
    gc: GCWatch
    refreshes: list[Refresh]
    failures: list[tuple[float, str]]
    anchor: str  # common name of the root the final certificate chains to
    trusted: list[str]  # common names of the roots trusted at the end
    build_ms: float
    ca_context_ms: float
    # client only
    latencies: RequestLog = field(default_factory=lambda: RequestLog())  # successful, in window
    errors: list[tuple[float, str]] = field(default_factory=list)  # (started, what), warm-up too
    window: tuple[float, float] = (0.0, 0.0)
    cpu: float = 0.0  # client CPU seconds in the window
    # server only
    requests: int = 0
    connections: int = 0


def summary_of(live: TimedRenewingIdentity, ticker: Ticker, watch: GCWatch) -> WorkloadResult:
    current = live.current
    anchor = current.trust.anchor_of(current.chain[-1])
    return WorkloadResult(
        ticker=ticker,
        gc=watch,
        refreshes=live.refreshes,
        failures=live.failures,
        anchor=anchor.common_name if anchor else "?",
        trusted=sorted(root.common_name for root in current.trust.roots),
        build_ms=build_contexts_ms(current),
        ca_context_ms=ca_context_ms(current),
    )


async def receive(conn: Connection) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


def workload(main: Callable[[Any, Connection], Any], conn: Connection) -> None:
    """A workload process: run ``main`` for each job the orchestrator sends, until ``None``.
    A failure is sent back as ``("error", traceback)``."""

    async def serve_jobs() -> None:
        while (job := await receive(conn)) is not None:
            try:
                conn.send(("done", await main(job, conn)))
            except Exception:
                conn.send(("error", traceback.format_exc()))

    asyncio.run(serve_jobs())


# --- The server process ---------------------------------------------------------------------
@dataclass(frozen=True)
class ServerJob:
    token: str
    lifetime: float | None  # seconds; None: the CA's default (24 h)


async def server_segment(job: ServerJob, conn: Connection) -> WorkloadResult:
    """Enrol, keep renewed, serve until told to stop; send the port first."""
    with GCWatch.watching() as watch:
        return await _server_segment(job, conn, watch)


async def _server_segment(job: ServerJob, conn: Connection, watch: GCWatch) -> WorkloadResult:
    lifetime = timedelta(seconds=job.lifetime) if job.lifetime else None
    identity = await federatls.bootstrap(job.token, lifetime=lifetime)
    live, ticker = TimedRenewingIdentity(identity), Ticker()
    peers: set[Any] = set()
    served = 0

    async def hello(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        transport = request.transport
        peers.add(transport.get_extra_info("peername") if transport else None)
        return web.Response(body=BODY)

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await tg.start(live.run)
        site = Site(runner, live, HOST, 0, authoriser=allow_names("*.k8s.internal"))
        await site.start()
        conn.send(("ready", site.port))
        await receive(conn)  # "stop", once the client is done
        await runner.cleanup()
        tg.cancel_scope.cancel()
    result = summary_of(live, ticker, watch)
    result.requests, result.connections = served, len(peers)
    return result


def serve(conn: Connection) -> None:
    """Entry point of the server process."""
    workload(server_segment, conn)


# --- The client process ---------------------------------------------------------------------
class Request(NamedTuple):
    """One successful request, seconds."""

    started: float  # time.monotonic() when client.get was called
    seconds: float  # to the whole body read
    waited: float  # until it reached a connection (see FirstEvent)
    connected: bool  # it opened a new connection (TCP, TLS handshake, peer check)


class RequestLog:
    """Successful requests, one array per field (see ``floats``)."""

    def __init__(self) -> None:
        self.started, self.seconds, self.waited, self.connected = (
            floats(),
            floats(),
            floats(),
            floats(),
        )

    def add(self, started: float, seconds: float, waited: float, connected: bool) -> None:
        self.started.append(started)
        self.seconds.append(seconds)
        self.waited.append(waited)
        self.connected.append(1.0 if connected else 0.0)

    def __len__(self) -> int:
        return len(self.started)

    def __iter__(self) -> Iterator[Request]:
        for started, seconds, waited, connected in zip(
            self.started, self.seconds, self.waited, self.connected, strict=True
        ):
            yield Request(started, seconds, waited, connected > 0)


class FirstEvent:
    """An httpcore ``trace`` callback noting when a request reached a connection: the time
    of its first event, ``connection.connect_tcp.started`` when it opens a new connection,
    ``http11.send_request_headers.started`` when it reuses one. Before that the request was
    in httpx (building it) and in the connection pool (waiting to be given a connection)."""

    __slots__ = ("at", "connected")

    def __init__(self) -> None:
        self.at = 0.0
        self.connected = False

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        if not self.at:
            self.at = time.monotonic()
            self.connected = name.startswith("connection.")


@dataclass(frozen=True)
class ClientJob:
    token: str
    lifetime: float | None
    port: int
    concurrency: int
    warmup: float  # seconds
    duration: float  # seconds
    pool: str  # SHARED or PER_LOOP


async def client_segment(job: ClientJob, conn: Connection) -> WorkloadResult:
    """Enrol, keep renewed, warm up, say "started", send requests for the duration."""
    with GCWatch.watching() as watch:
        return await _client_segment(job, conn, watch)


async def _client_segment(job: ClientJob, conn: Connection, watch: GCWatch) -> WorkloadResult:
    lifetime = timedelta(seconds=job.lifetime) if job.lifetime else None
    identity = await federatls.bootstrap(job.token, lifetime=lifetime)
    live, ticker = TimedRenewingIdentity(identity), Ticker()
    url = f"https://{HOST}:{job.port}/"
    latencies = RequestLog()
    errors: list[tuple[float, str]] = []
    # SHARED: one client, one connection per loop in its pool; PER_LOOP: a client each.
    clients, size = (1, job.concurrency) if job.pool == SHARED else (job.concurrency, 1)
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)

    async def loop(client: httpx.AsyncClient, until: float, record: bool) -> None:
        while time.monotonic() < until:
            started, trace = time.monotonic(), FirstEvent()
            try:
                response = await client.get(url, extensions={"trace": trace})
                if response.status_code != 200 or response.content != BODY:
                    raise ValueError(f"status {response.status_code}, {response.content[:40]!r}")
            except Exception as exc:
                errors.append((started, f"{type(exc).__name__}: {exc}"))
            else:
                if record:
                    ended = time.monotonic()
                    waited = (trace.at or ended) - started
                    latencies.add(started, ended - started, waited, trace.connected)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await tg.start(live.run)
        async with contextlib.AsyncExitStack() as stack:
            pool = [
                await stack.enter_async_context(
                    AsyncClient(
                        live,
                        authoriser=allow_names(SERVER_NAME),
                        limits=limits,
                        timeout=REQUEST_TIMEOUT,
                    )
                )
                for _ in range(clients)
            ]
            loops = [pool[n % clients] for n in range(job.concurrency)]
            warm_until = time.monotonic() + job.warmup
            await asyncio.gather(*(loop(client, warm_until, False) for client in loops))
            cpu, start = time.process_time(), time.monotonic()
            conn.send(("started", start))
            until = start + job.duration
            await asyncio.gather(*(loop(client, until, True) for client in loops))
            end, cpu = time.monotonic(), time.process_time() - cpu
        tg.cancel_scope.cancel()
    result = summary_of(live, ticker, watch)
    result.latencies, result.errors, result.window, result.cpu = (
        latencies,
        errors,
        (start, end),
        cpu,
    )
    return result


def load(conn: Connection) -> None:
    """Entry point of the client process."""
    workload(client_segment, conn)


# --- The orchestrator: CAs, rotation, segments ------------------------------------------------
class Rotation:
    """Root rotation of the cloud CA, one full cycle per churn segment; the kubernetes CA
    federates whatever roots the cloud CA trusts."""

    def __init__(self, cloud: TestCA, kubernetes: TestCA) -> None:
        self.cloud, self.kubernetes = cloud, kubernetes

    def step(self, n: int) -> RotationStep:
        directory = self.cloud.directory
        if n == 0:
            done = add_root(directory, self.cloud.password, now=datetime.now(UTC))
        elif n == 1:
            done = issue_from_new_root(directory)
        else:
            done = retire_old_roots(directory)
        self.cloud.reload()
        if n != 1:  # the kubernetes CA's federation follows the cloud CA's roots
            data = json.loads(self.kubernetes.config.read_text())
            data["federatedRoots"] = [str(root) for root in done.roots]
            self.kubernetes.config.write_text(json.dumps(data, indent=2))
            self.kubernetes.reload()
        return done


@dataclass
class StepDone:
    step: str
    at: float  # seconds into the window
    ms: float  # how long the step (files, reloads) took
    summary: str


@dataclass
class Segment:
    condition: str
    concurrency: int
    client: WorkloadResult
    server: WorkloadResult
    server_cpu: float = 0.0  # seconds in the window
    ca_cpu: float = 0.0  # this process: both CAs and the rotation steps
    machine_busy: float = 0.0
    steps: list[StepDone] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.client.window[1] - self.client.window[0]

    @property
    def errors(self) -> int:
        """Failed requests in the window (warm-up failures are reported apart)."""
        return sum(t >= self.client.window[0] for t, _ in self.client.errors)


def expect(conn: Connection, process: SpawnProcess, what: str, timeout: float = 120.0) -> Any:
    """The next message from a workload, which must be ``what``."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.5):
        if not process.is_alive():
            raise RuntimeError(f"the {process.name} process died (exit code {process.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what!r} from the {process.name} process in {timeout:g} s")
    kind, payload = conn.recv()
    if kind == "error":
        raise RuntimeError(f"the {process.name} process failed:\n{payload}")
    if kind != what:
        raise RuntimeError(f"expected {what!r} from the {process.name} process, got {kind!r}")
    return payload


@dataclass
class Workers:
    server: SpawnProcess
    server_conn: Connection
    client: SpawnProcess
    client_conn: Connection


def run_segment(
    condition: str,
    concurrency: int,
    settings: Settings,
    cas: tuple[TestCA, TestCA],
    rotation: Rotation,
    workers: Workers,
) -> Segment:
    cloud, kubernetes = cas
    lifetime = settings.lifetime if condition == CHURN else None
    workers.server_conn.send(
        ServerJob(cloud.token(SERVER_NAME, sans=[SERVER_NAME, HOST]), lifetime)
    )
    port = expect(workers.server_conn, workers.server, "ready")
    if condition == CHURN:
        # Enrol the client a third of a lifetime (half a renewal period) after the server,
        # so that their renewals alternate instead of coinciding.
        time.sleep(settings.lifetime / 3)
    job = ClientJob(
        kubernetes.token(CLIENT_NAME),
        lifetime,
        port,
        concurrency,
        settings.warmup,
        settings.duration,
        settings.pool,
    )
    workers.client_conn.send(job)
    start = expect(workers.client_conn, workers.client, "started")
    assert workers.server.pid is not None
    server_cpu, ca_cpu = process_cpu_seconds(workers.server.pid), time.process_time()
    busy = machine_busy_seconds()
    steps: list[StepDone] = []
    if condition == CHURN:
        for n, at in enumerate(step_offsets(settings.duration)):
            time.sleep(max(0.0, start + at - time.monotonic()))
            began = time.monotonic()
            done = rotation.step(n)
            ended = time.monotonic()
            steps.append(
                StepDone(STEP_NAMES[n], began - start, (ended - began) * 1000, done.summary)
            )
    client: WorkloadResult = expect(workers.client_conn, workers.client, "done")
    server_cpu = process_cpu_seconds(workers.server.pid) - server_cpu
    ca_cpu, busy = time.process_time() - ca_cpu, machine_busy_seconds() - busy
    workers.server_conn.send("stop")
    server: WorkloadResult = expect(workers.server_conn, workers.server, "done")
    return Segment(condition, concurrency, client, server, server_cpu, ca_cpu, busy, steps)


def step_offsets(duration: float) -> list[float]:
    """When the three rotation steps start, seconds into the window."""
    return [duration / 8 + k * duration / 3 for k in range(3)]


# --- Figures ----------------------------------------------------------------------------------
def in_window(t: float, window: tuple[float, float]) -> bool:
    return window[0] <= t <= window[1]


@dataclass
class Stalls:
    """Event-loop lateness of one process, one condition and level, segments pooled (ms)."""

    process: str
    condition: str
    concurrency: int
    ticks: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    near_swap_ms: float  # within NEAR_SWAP of one of its own swaps; NaN if none
    near_peer_swap_ms: float  # within NEAR_SWAP of one of the other process's swaps
    in_refresh_ms: float  # from the start of one of its own refreshes to its swap
    no_gc_max_ms: float  # the longest whose late interval saw no collection of GC_PAUSE or more
    swaps: int
    gc_max_ms: float  # the longest garbage collection
    gc_full: int  # full (generation 2) collections
    gc_share: float  # the window's time spent collecting, 1.0 = all of it
    refresh_ms: list[float]  # start to swap, each refresh
    install_ms: list[float]  # _install: thread build and swap
    build_ms: float  # inline, median over the segments
    ca_context_ms: float  # the same
    failures: list[str]


def stalls_of(process: str, segments: Sequence[Segment]) -> Stalls:
    late: list[float] = []
    near: list[float] = []
    near_peer: list[float] = []
    during: list[float] = []
    no_gc: list[float] = []
    gc_pauses: list[float] = []
    gc_full = 0
    refresh_ms: list[float] = []
    install_ms: list[float] = []
    failures: list[str] = []
    for s in segments:
        result, peer = (s.client, s.server) if process == "client" else (s.server, s.client)
        window = s.client.window
        refreshes = [r for r in result.refreshes if in_window(r.swapped, window)]
        peer_swaps = [r.swapped for r in peer.refreshes if in_window(r.swapped, window)]

        def near_one(swaps: Sequence[float], since: float, until: float) -> bool:
            return any(since <= t + NEAR_SWAP and until >= t - NEAR_SWAP for t in swaps)

        refresh_ms += [(r.swapped - r.started) * 1000 for r in refreshes]
        install_ms += [(r.swapped - r.install) * 1000 for r in refreshes]
        failures += [f"{t - window[0]:+.2f} s {what}" for t, what in result.failures]
        collections = [
            (at, seconds, generation)
            for at, seconds, generation in zip(
                result.gc.at, result.gc.seconds, result.gc.generation, strict=True
            )
            if in_window(at, window)
        ]
        gc_pauses += [seconds for _, seconds, _ in collections]
        gc_full += sum(generation == 2 for _, _, generation in collections)
        long_pauses = [(at, at + seconds) for at, seconds, _ in collections if seconds >= GC_PAUSE]
        for woke, lateness in zip(result.ticker.woke, result.ticker.late, strict=True):
            if not in_window(woke, window):
                continue
            late.append(lateness)
            blocked_from = woke - lateness - TICK  # the loop was busy somewhere in here
            if near_one([r.swapped for r in refreshes], blocked_from, woke):
                near.append(lateness)
            if near_one(peer_swaps, blocked_from, woke):
                near_peer.append(lateness)
            if any(blocked_from <= r.swapped and woke >= r.started for r in refreshes):
                during.append(lateness)
            if not any(blocked_from <= end and woke >= begin for begin, end in long_pauses):
                no_gc.append(lateness)
    late.sort()
    first = segments[0]
    return Stalls(
        process=process,
        condition=first.condition,
        concurrency=first.concurrency,
        ticks=len(late),
        p50_ms=percentile(late, 50) * 1000,
        p99_ms=percentile(late, 99) * 1000,
        max_ms=max(late, default=float("nan")) * 1000,
        near_swap_ms=max(near, default=float("nan")) * 1000,
        near_peer_swap_ms=max(near_peer, default=float("nan")) * 1000,
        in_refresh_ms=max(during, default=float("nan")) * 1000,
        no_gc_max_ms=max(no_gc, default=float("nan")) * 1000,
        swaps=len(refresh_ms),
        gc_max_ms=max(gc_pauses, default=float("nan")) * 1000,
        gc_full=gc_full,
        gc_share=sum(gc_pauses) / sum(s.seconds for s in segments),
        refresh_ms=refresh_ms,
        install_ms=install_ms,
        build_ms=statistics.median(
            (s.client if process == "client" else s.server).build_ms for s in segments
        ),
        ca_context_ms=statistics.median(
            (s.client if process == "client" else s.server).ca_context_ms for s in segments
        ),
        failures=failures,
    )


@dataclass
class Row:
    """One condition at one level, its segments pooled."""

    condition: str
    concurrency: int
    requests: int  # successful ones
    errors: int  # in the window
    warmup_errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_renewals: int
    client_renewals: int
    connections: int  # as the server saw them
    server_ms: float  # CPU per request
    client_ms: float
    ca_ms: float
    other_cpu: float  # the rest of the machine, 1.0 = one core
    segment_rps: list[float]
    segment_p99_ms: list[float]
    error_samples: list[str]


def row_of(segments: Sequence[Segment]) -> Row:
    latencies = sorted(x for s in segments for x in s.client.latencies.seconds)
    requests, seconds = len(latencies), sum(s.seconds for s in segments)
    server_cpu = sum(s.server_cpu for s in segments)
    client_cpu = sum(s.client.cpu for s in segments)
    ca_cpu = sum(s.ca_cpu for s in segments)
    busy = sum(s.machine_busy for s in segments)
    samples = []
    errors = warmup_errors = 0
    for s in segments:
        window = s.client.window
        for t, what in s.client.errors:
            samples.append(f"{s.condition} {s.concurrency}: {t - window[0]:+.3f} s {what}")
            if t >= window[0]:
                errors += 1
            else:
                warmup_errors += 1

    def renewals(result: Callable[[Segment], WorkloadResult]) -> int:
        return sum(
            sum(in_window(r.swapped, s.client.window) for r in result(s).refreshes)
            for s in segments
        )

    return Row(
        condition=segments[0].condition,
        concurrency=segments[0].concurrency,
        requests=requests,
        errors=errors,
        warmup_errors=warmup_errors,
        seconds=seconds,
        rps=requests / seconds,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        max_ms=max(latencies, default=float("nan")) * 1000,
        server_renewals=renewals(lambda s: s.server),
        client_renewals=renewals(lambda s: s.client),
        connections=sum(s.server.connections for s in segments),
        server_ms=server_cpu / max(1, requests) * 1000,
        client_ms=client_cpu / max(1, requests) * 1000,
        ca_ms=ca_cpu / max(1, requests) * 1000,
        other_cpu=max(0.0, busy - server_cpu - client_cpu - ca_cpu) / seconds,
        segment_rps=[len(s.client.latencies) / s.seconds for s in segments],
        segment_p99_ms=[
            percentile(sorted(s.client.latencies.seconds), 99) * 1000 for s in segments
        ],
        error_samples=samples[:MAX_ERROR_SAMPLES],
    )


def swap_latency(segments: Sequence[Segment], after: float = 0.25) -> dict[str, float]:
    """p99 of the requests that started within ``after`` seconds after one of the client's
    swaps (when its pool is replaced) against the others, churn segments only; and for the
    former, the p99 of their wait for a connection and of the rest (see ``Split``)."""
    near: list[Request] = []
    others: list[float] = []
    for s in segments:
        swaps = [r.swapped for r in s.client.refreshes]
        for r in s.client.latencies:
            if any(0 <= r.started - t <= after for t in swaps):
                near.append(r)
            else:
                others.append(r.seconds)
    return {
        "after_s": after,
        "near_requests": len(near),
        "near_p99_ms": percentile(sorted(r.seconds for r in near), 99) * 1000,
        "near_wait_p99_ms": percentile(sorted(r.waited for r in near), 99) * 1000,
        "near_rest_p99_ms": percentile(sorted(r.seconds - r.waited for r in near), 99) * 1000,
        "others_p99_ms": percentile(sorted(others), 99) * 1000,
    }


@dataclass
class Split:
    """Where the requests' time went, one condition and level (ms): waiting to reach a
    connection (httpx and its pool), and the rest (connecting if the request opened the
    connection, then the request on the wire and the server's work)."""

    condition: str
    concurrency: int
    wait_p50_ms: float
    wait_p99_ms: float
    wait_max_ms: float
    rest_p99_ms: float
    rest_max_ms: float
    new_connections: int  # requests that opened one
    new_connection_p99_ms: float  # their total latency
    new_connection_max_ms: float


def split_of(segments: Sequence[Segment]) -> Split:
    requests = [r for s in segments for r in s.client.latencies]
    waits = sorted(r.waited for r in requests)
    rest = sorted(r.seconds - r.waited for r in requests)
    fresh = sorted(r.seconds for r in requests if r.connected)
    return Split(
        condition=segments[0].condition,
        concurrency=segments[0].concurrency,
        wait_p50_ms=percentile(waits, 50) * 1000,
        wait_p99_ms=percentile(waits, 99) * 1000,
        wait_max_ms=max(waits, default=float("nan")) * 1000,
        rest_p99_ms=percentile(rest, 99) * 1000,
        rest_max_ms=max(rest, default=float("nan")) * 1000,
        new_connections=len(fresh),
        new_connection_p99_ms=percentile(fresh, 99) * 1000,
        new_connection_max_ms=max(fresh, default=float("nan")) * 1000,
    )


# --- Report -----------------------------------------------------------------------------------
def ms(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN: nothing to show


def print_rows(rows: Sequence[Row]) -> None:
    print(
        f"\n{'condition':<9} {'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'errors':>6} {'requests':>8} {'renewals s/c':>12} {'conns':>5} "
        f"{'srv ms/req':>10} {'cli ms/req':>10} {'other':>6}"
    )
    for r in rows:
        renewals = f"{r.server_renewals}/{r.client_renewals}"
        print(
            f"{r.condition:<9} {r.concurrency:>7} {r.rps:>7.1f} {r.p50_ms:>7.2f} "
            f"{r.p99_ms:>7.2f} {r.max_ms:>7.2f} {r.errors:>6} {r.requests:>8} {renewals:>12} "
            f"{r.connections:>5} {r.server_ms:>10.3f} {r.client_ms:>10.3f} {r.other_cpu:>6.0%}"
        )


def ratios_of(rows: Sequence[Row]) -> list[dict[str, float]]:
    out = []
    for level in sorted({r.concurrency for r in rows}):
        steady = next(r for r in rows if r.concurrency == level and r.condition == STEADY)
        churn = next(r for r in rows if r.concurrency == level and r.condition == CHURN)
        out.append(
            {
                "concurrency": level,
                "rps": churn.rps / steady.rps,
                "p50": churn.p50_ms / steady.p50_ms,
                "p99": churn.p99_ms / steady.p99_ms,
                "max": churn.max_ms / steady.max_ms,
                "server_ms": churn.server_ms / steady.server_ms,
                "client_ms": churn.client_ms / steady.client_ms,
            }
        )
    return out


def print_ratios(ratios: Sequence[dict[str, float]]) -> None:
    print("\nchurn / steady (req/s below 1 and the others above 1 are what churn costs)")
    print(
        f"{'clients':>7} {'req/s':>7} {'p50':>7} {'p99':>7} {'max':>7} "
        f"{'srv ms/req':>10} {'cli ms/req':>10}"
    )
    for r in ratios:
        print(
            f"{r['concurrency']:>7} {r['rps']:>6.3f}x {r['p50']:>6.3f}x {r['p99']:>6.3f}x "
            f"{r['max']:>6.3f}x {r['server_ms']:>9.3f}x {r['client_ms']:>9.3f}x"
        )


def print_splits(splits: Sequence[Split]) -> None:
    print(
        "\nWhere the time went, ms (wait: from client.get to reaching a connection, in httpx"
        "\nand its pool; rest: connecting if the request opened one, then the exchange)"
    )
    print(
        f"{'condition':<9} {'clients':>7} {'wait p50':>8} {'wait p99':>8} {'wait max':>8} "
        f"{'rest p99':>8} {'rest max':>8} {'new conns':>9} {'their p99':>9} {'their max':>9}"
    )
    for s in splits:
        print(
            f"{s.condition:<9} {s.concurrency:>7} {s.wait_p50_ms:>8.2f} {s.wait_p99_ms:>8.2f} "
            f"{s.wait_max_ms:>8.2f} {s.rest_p99_ms:>8.2f} {s.rest_max_ms:>8.2f} "
            f"{s.new_connections:>9} {ms(s.new_connection_p99_ms):>9} "
            f"{ms(s.new_connection_max_ms):>9}"
        )


def print_stalls(stalls: Sequence[Stalls]) -> None:
    print(
        f"\nEvent-loop lateness of a {TICK * 1000:g} ms sleep, ms. own swap / peer swap: the"
        f"\nlongest within {NEAR_SWAP * 1000:g} ms of a swap of this process / of the other one;"
        "\nrefresh: from the start of one of this process's refreshes to its swap; no GC: the"
        f"\nlongest with no garbage collection of {GC_PAUSE * 1000:g} ms or more in it. GC: the"
        "\nlongest collection, full collections, share of the window spent collecting."
    )
    print(
        f"{'process':<7} {'clients':>7} {'condition':<9} {'ticks':>6} {'p99':>6} {'max':>6} "
        f"{'own swap':>8} {'peer swap':>9} {'refresh':>7} {'no GC':>6} {'swaps':>5} "
        f"{'GC max':>6} {'full':>4} {'GC %':>5}"
    )
    for s in stalls:
        print(
            f"{s.process:<7} {s.concurrency:>7} {s.condition:<9} {s.ticks:>6} "
            f"{ms(s.p99_ms):>6} {ms(s.max_ms):>6} {ms(s.near_swap_ms):>8} "
            f"{ms(s.near_peer_swap_ms):>9} {ms(s.in_refresh_ms):>7} {ms(s.no_gc_max_ms):>6} "
            f"{s.swaps:>5} {ms(s.gc_max_ms):>6} {s.gc_full:>4} {s.gc_share:>5.1%}"
        )


def print_refreshes(stalls: Sequence[Stalls]) -> None:
    print(
        "\nRefreshes in the churn windows, ms (refresh: start to swap; install: worker-thread"
        "\nbuild and swap; inline, median: building a server and a client context, the"
        "\nthread's work; CA ctx: the CA client's context, built on the event loop)"
    )
    print(
        f"{'process':<7} {'clients':>7} {'count':>5} {'failed':>6} {'refresh p50':>11} "
        f"{'max':>6} {'install p50':>11} {'max':>6} {'inline':>6} {'CA ctx':>6}"
    )
    for s in stalls:
        if s.condition != CHURN:
            continue
        print(
            f"{s.process:<7} {s.concurrency:>7} {s.swaps:>5} {len(s.failures):>6} "
            f"{ms(statistics.median(s.refresh_ms) if s.refresh_ms else float('nan')):>11} "
            f"{ms(max(s.refresh_ms, default=float('nan'))):>6} "
            f"{ms(statistics.median(s.install_ms) if s.install_ms else float('nan')):>11} "
            f"{ms(max(s.install_ms, default=float('nan'))):>6} {s.build_ms:>6.2f} "
            f"{s.ca_context_ms:>6.2f}"
        )
        for failure in s.failures[:MAX_ERROR_SAMPLES]:
            print(f"    failed refresh {failure}")


def print_rotations(segments: Sequence[Segment]) -> None:
    print("\nRoot rotations of the cloud CA (step: seconds into the window, ms it took)")
    for s in segments:
        if s.condition != CHURN:
            continue
        steps = ", ".join(f"{d.step} {d.at:.2f} s ({d.ms:.0f} ms)" for d in s.steps)
        print(f"  {s.concurrency:>3} clients: {steps}")
        print(
            f"      server certificate at the end from {s.server.anchor!r}, server trusts "
            f"{s.server.trusted}, client trusts {s.client.trusted}"
        )


# --- Main -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    levels: tuple[int, ...]
    rounds: int  # segments per condition and level
    duration: float  # seconds per segment, measured
    warmup: float  # seconds per segment, before the window
    lifetime: float  # seconds, churn certificates
    pool: str  # SHARED or PER_LOOP


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--levels", default="8,32", help="concurrent request loops, comma-separated")
    p.add_argument(
        "--rounds", type=int, default=2, help="segments per condition and level (ABBA order)"
    )
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per segment")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per segment")
    p.add_argument(
        "--lifetime", type=float, default=4.0, help="certificate lifetime in churn, seconds"
    )
    p.add_argument(
        "--pool",
        choices=(SHARED, PER_LOOP),
        default=SHARED,
        help=f"{SHARED}: one AsyncClient for all loops, one pooled connection per loop; "
        f"{PER_LOOP}: an AsyncClient of one connection per loop",
    )
    p.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    return p.parse_args(argv)


def start_workers(spawn: Any) -> Workers:
    server_conn, server_end = spawn.Pipe()
    client_conn, client_end = spawn.Pipe()
    server = spawn.Process(target=serve, args=(server_end,), name="server")
    client = spawn.Process(target=load, args=(client_end,), name="client")
    server.start()
    client.start()
    return Workers(server, server_conn, client, client_conn)


def stop_workers(workers: Workers) -> None:
    for conn, process in (
        (workers.server_conn, workers.server),
        (workers.client_conn, workers.client),
    ):
        if process.is_alive():
            with contextlib.suppress(OSError):
                conn.send(None)
            process.join(10)
            if process.is_alive():
                process.terminate()


def run_all(settings: Settings) -> list[Segment]:
    segments: list[Segment] = []
    spawn = multiprocessing.get_context("spawn")
    with federated_pair(claims=CLAIMS, backdate=BACKDATE) as cas:
        rotation = Rotation(*cas)
        workers = start_workers(spawn)
        try:
            for concurrency in settings.levels:
                print(f"  {concurrency} clients:", end="", flush=True)
                for round_ in range(settings.rounds):
                    order = (STEADY, CHURN) if round_ % 2 == 0 else (CHURN, STEADY)
                    for condition in order:
                        s = run_segment(condition, concurrency, settings, cas, rotation, workers)
                        segments.append(s)
                        print(
                            f" {condition} {len(s.client.latencies) / s.seconds:.0f} req/s"
                            f" ({s.errors} failed)",
                            end=",",
                            flush=True,
                        )
                print(flush=True)
        finally:
            stop_workers(workers)
    return segments


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        levels=tuple(int(x) for x in args.levels.split(",")),
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        lifetime=args.lifetime,
        pool=args.pool,
    )
    spacing = settings.duration / 3
    if spacing < settings.lifetime:
        print(
            f"--duration {settings.duration:g} spaces the rotation steps {spacing:g} s apart, "
            f"less than one certificate lifetime ({settings.lifetime:g} s): workloads might "
            "not have renewed between two steps. Use --duration "
            f"{3 * settings.lifetime:g} or more.",
            file=sys.stderr,
        )
        return 2
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    segments = run_all(settings)

    groups: dict[tuple[str, int], list[Segment]] = {}
    for s in segments:
        groups.setdefault((s.condition, s.concurrency), []).append(s)
    keys = [(c, n) for n in settings.levels for c in (STEADY, CHURN)]
    rows = [row_of(groups[k]) for k in keys]
    stalls = [stalls_of(p, groups[k]) for p in ("server", "client") for k in keys]
    ratios = ratios_of(rows)
    splits = [split_of(groups[k]) for k in keys]
    near_swap = {
        n: swap_latency(groups[(CHURN, n)]) for n in settings.levels if (CHURN, n) in groups
    }

    print(
        f"\n{os.cpu_count()} CPUs, load average before the run {load_before[0]:.2f}; "
        f"{settings.rounds} segments of {settings.duration:g} s per condition and level; "
        f"churn certificates live {settings.lifetime:g} s; httpx pool {settings.pool}"
    )
    print_rows(rows)
    print_ratios(ratios)
    for n, figures in near_swap.items():
        print(
            f"  churn, {n} clients: p99 of the {figures['near_requests']} requests started "
            f"within {figures['after_s'] * 1000:g} ms after a client swap "
            f"{figures['near_p99_ms']:.2f} ms (wait p99 {figures['near_wait_p99_ms']:.2f}, "
            f"rest p99 {figures['near_rest_p99_ms']:.2f}), of the others "
            f"{figures['others_p99_ms']:.2f} ms"
        )
    print_splits(splits)
    print_stalls(stalls)
    print_refreshes(stalls)
    print_rotations(segments)
    errors = sum(r.errors for r in rows)
    for r in rows:
        if r.warmup_errors:
            print(f"  {r.warmup_errors} failed in the warm-ups ({r.condition}, {r.concurrency})")
        for sample in r.error_samples:
            print(f"  failed: {sample} (seconds into the window)")

    report = {
        "benchmark": "renewal_under_load",
        "started": started.isoformat(),
        "settings": asdict(settings),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "platform": platform.platform(),
        },
        "federatls_version": federatls.__version__,
        "results": [asdict(r) for r in rows],
        "ratios": ratios,
        "near_swap_latency": near_swap,
        "latency_split": [asdict(s) for s in splits],
        "stalls": [asdict(s) for s in stalls],
        "segments": [
            {
                "condition": s.condition,
                "concurrency": s.concurrency,
                "seconds": s.seconds,
                "requests": len(s.client.latencies),
                "errors": s.errors,
                "steps": [asdict(d) for d in s.steps],
                "server_swaps_s": [r.swapped - s.client.window[0] for r in s.server.refreshes],
                "client_swaps_s": [r.swapped - s.client.window[0] for r in s.client.refreshes],
                "server_anchor": s.server.anchor,
                "server_trusts": s.server.trusted,
                "client_trusts": s.client.trusted,
            }
            for s in segments
        ],
    }
    write_results("renewal_under_load", report, started, args.json)
    if errors:
        print(f"{errors} request(s) failed; see error_samples in the JSON", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
