"""How fast a federation change reaches live workloads through the trust refresh, and what a
bundle refresh costs a live server.

What is measured
----------------
Federated federatls CAs run in this process (``federatls.testing.running_ca``): "cloud",
whose workloads are measured, and partner CAs whose roots cloud federates or stops
federating (``federatedRoots`` edited, then a reload: what SIGHUP does).

Part 1, propagation. A live server enrolled with cloud (``RenewingIdentity``, what
``keep_renewed`` runs, with ``RenewalPolicy(trust_refresh=--interval)`` and a certificate of
a day, so nothing renews) serves on 127.0.0.1 through ``federatls.integrations.streams``.
Two partners, A and B, each with a client enrolled; cloud federates one of them at a time.
A rotation switches cloud's federation to the other partner, then two probes each open a
new mutual-TLS connection every ``--probe`` seconds: the newly federated partner's client
until the server serves it (the root is trusted), the dropped partner's until the server
refuses it (the root is dropped). Reported: seconds from the CA's reload returning to the
first served (and first refused) probe, and to the workload's swap; median and max over
``--rotations`` rotations. Between rotations a random pause (up to one interval) puts each
change at a random point of the workload's schedule. The aim: at most one interval plus one
second for this half. Baseline in the same run: the same rotations with the trust refresh
off and certificates of ``--baseline-lifetime`` seconds, so that only renewals (every two
thirds of a lifetime) carry the change, as before the trust refresh.

Part 1b, CA to CA. The cloud CA follows the kubernetes CA by URL (ca.json's ``federation``
block, first contact pinned to kubernetes's root, a fetch every ``--peer-interval`` s), and
the live cloud server refreshes trust every ``--interval`` s. The kubernetes CA rotates its
root ``--peer-rotations`` times as an operator would, each step applied by a reload: add a
root (timed: until cloud's ``/federation`` lists it, and until the workload's bundle holds
it), issue from it, retire the old one (timed: until cloud's ``/federation`` and the
workload drop it, and until the server refuses a client whose certificate chains to the
retired root). Each timed step comes after a random pause. Aim: at most the two intervals
plus one second.

Part 2, the cost of a bundle refresh on a live server. The server runs in a process of its
own (its own event loop and GIL), a handshake load in another: ``--clients`` loops each
opening a new mutual-TLS connection (full handshake, no resumption: the server sends no
session tickets), sending one request and reading the answer, as fast as answered. Three
conditions in rotating segments (``--rounds`` of each, ``--segment`` seconds): ``off`` (no
trust refresh), ``unchanged`` (trust fetched every ``--cost-interval`` seconds, the bundle
the same: no swap) and ``changing`` (the same interval while the orchestrator changes
cloud's federation every ``--cost-interval``/2.5 seconds, cycling through eight extra
roots, so that nearly every fetch finds a new bundle: new contexts built in a worker thread,
then swapped in). Reported per condition: handshakes per second, failed handshakes, and the
server's event-loop lag (a ticker sleeps 5 ms in a loop and records how late it wakes):
overall, and for wake-ups whose late interval overlaps a trust refresh (from its start to
50 ms after it ended) and a swap (the same, from the new contexts' build to the swap); the
refreshes, swaps and their durations. Ratios against ``off``. Before the segments, with no
load, the server process times 50 trust refreshes of an unchanged bundle and 50 swaps (its
CPU, all threads, and wall time): what one refresh costs a workload, apart from the CA's
share of the machine, which the segments' handshake rates include (the CAs run in the
orchestrating process on the same two cores).

Not measured: a step-ca or SPIFFE peer (the CA-to-CA half is federatls to federatls); network
latency (everything is on 127.0.0.1); larger bundles; clients' own swaps (they take the
newest context for each connection, which costs nothing until a connection is opened).

Run ``python bench/federation_propagation.py --help``; bench/README.md explains the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import random
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import anyio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import federatls
from federatls import Identity, RenewalPolicy, RenewingIdentity
from federatls._client import CAClient
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import add_root, issue_from_new_root, retire_old_roots
from federatls.integrations import streams
from federatls.testing import TestCA, running_ca
from renewal_under_load import Ticker, expect, floats, receive, workload
from sign_throughput import machine_busy_seconds, percentile, process_cpu_seconds, write_results

HOST = "127.0.0.1"
SERVER_NAME = "server.cloud.internal"
# Certificates of a few seconds must be allowed (the baseline); without a lifetime, a day.
CLAIMS = {"minTLSCertDuration": "2s", "defaultTLSCertDuration": "24h", "maxTLSCertDuration": "24h"}
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
NEAR = 0.050  # seconds after a refresh still counted as its own
EXTRA_ROOTS = 8  # roots the changing condition cycles through
OFF, UNCHANGED, CHANGING = "off", "unchanged", "changing"
CONDITIONS = (OFF, UNCHANGED, CHANGING)


# --- Shared: serving and probing ------------------------------------------------------------
async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one request with ``200 ok`` and close."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWER)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def exchange(identity: Identity, port: int, timeout: float = 5.0) -> bool:
    """One request on a new mutual-TLS connection: True when it was answered ``200``."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await streams.open_connection(identity, HOST, port)
            writer.write(REQUEST)
            await writer.drain()
            data = b""
            while chunk := await reader.read(4096):
                data += chunk
            return data.startswith(b"HTTP/1.1 200 ")
    except (OSError, ssl.SSLError, TimeoutError, federatls.FederatlsError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


class TimedLive(RenewingIdentity):
    """``RenewingIdentity`` noting each trust refresh (start, end, whether it swapped) and
    each swap (start, end), ``time.monotonic()`` seconds. Otherwise the library's class."""

    def __init__(self, identity: Identity, policy: RenewalPolicy) -> None:
        super().__init__(identity, policy=policy)
        self.refresh_start, self.refresh_end, self.refresh_changed = floats(), floats(), floats()
        self.swap_start, self.swap_end = floats(), floats()
        self.failed = 0

    async def refresh_trust(self) -> bool:
        started = time.monotonic()
        try:
            changed = await super().refresh_trust()
        except federatls.FederatlsError:
            self.failed += 1
            raise
        self.refresh_start.append(started)
        self.refresh_end.append(time.monotonic())
        self.refresh_changed.append(1.0 if changed else 0.0)
        return changed

    async def _swap(self, identity: Identity) -> None:
        started = time.monotonic()
        await super()._swap(identity)
        self.swap_start.append(started)
        self.swap_end.append(time.monotonic())


@contextlib.asynccontextmanager
async def live_server(live: RenewingIdentity) -> AsyncIterator[int]:
    """The live identity kept renewed and serving on 127.0.0.1:0; yields the port."""
    async with anyio.create_task_group() as tg:
        await tg.start(live.run)
        server = await streams.start_server(live, _handle, HOST, 0)
        async with server:
            yield server.sockets[0].getsockname()[1]
        tg.cancel_scope.cancel()


def federate(ca: TestCA, roots: Sequence[Path]) -> None:
    """Set ``ca``'s ``federatedRoots`` and reload, as an operator would (then SIGHUP)."""
    data = json.loads(ca.config.read_text())
    data["federatedRoots"] = [str(p) for p in roots]
    ca.config.write_text(json.dumps(data, indent=2))
    ca.reload()


# --- Part 1: propagation ----------------------------------------------------------------------
@dataclass(frozen=True)
class Rotation:
    """Seconds from the CA's reload returning to: the workload's swap, the first probe the
    server served with the new root, the first it refused with the dropped one (inf: not
    within the bound)."""

    swap: float
    trusted: float
    dropped: float
    reload_ms: float


@dataclass
class Propagation:
    mode: str  # "trust refresh" or "renewal only"
    interval: float  # seconds: the trust refresh interval, or the renewal period
    rotations: list[Rotation] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        out: dict[str, float] = {"interval_s": self.interval, "rotations": len(self.rotations)}
        for name in ("swap", "trusted", "dropped"):
            values = sorted(getattr(r, name) for r in self.rotations)
            out[f"{name}_median_s"] = statistics.median(values) if values else float("nan")
            out[f"{name}_max_s"] = values[-1] if values else float("nan")
        out["reload_ms_median"] = statistics.median(r.reload_ms for r in self.rotations)
        return out


async def _first(
    identity: Identity, port: int, want: bool, since: float, probe: float, bound: float
) -> float:
    """Seconds from ``since`` to the first exchange whose success is ``want``."""
    while time.monotonic() - since < bound:
        if await exchange(identity, port) == want:
            return time.monotonic() - since
        await asyncio.sleep(probe)
    return float("inf")


async def propagate(
    cloud: TestCA,
    partners: Sequence[tuple[TestCA, Identity]],
    policy: RenewalPolicy,
    lifetime: timedelta,
    rotations: int,
    probe: float,
    period: float,
) -> list[Rotation]:
    """``rotations`` switches of cloud's federation between the two partners, each timed
    from the reload to the live server trusting the new root and refusing the old one."""
    await anyio.to_thread.run_sync(federate, cloud, [partners[0][0].root_path])
    token = cloud.token(SERVER_NAME, sans=[SERVER_NAME, HOST])
    identity = await federatls.bootstrap(token, lifetime=lifetime)
    live = TimedLive(identity, policy)
    out: list[Rotation] = []
    bound = 3 * period + 10
    async with live_server(live) as port:
        if not await exchange(partners[0][1], port):
            raise RuntimeError("the first partner's client is not served before any change")
        for n in range(rotations):
            new, old = partners[(n + 1) % 2], partners[n % 2]
            await asyncio.sleep(random.uniform(0, period))  # a random point of the schedule
            began = time.monotonic()
            await anyio.to_thread.run_sync(federate, cloud, [new[0].root_path])
            since = time.monotonic()
            swaps = len(live.swap_end)
            trusted, dropped = await asyncio.gather(
                _first(new[1], port, True, since, probe, bound),
                _first(old[1], port, False, since, probe, bound),
            )
            swap = live.swap_end[swaps] - since if len(live.swap_end) > swaps else float("inf")
            out.append(Rotation(swap, trusted, dropped, (since - began) * 1000))
            print(f" {trusted:.2f}", end="", flush=True)
    print(flush=True)
    return out


async def propagation_runs(args: argparse.Namespace) -> list[Propagation]:
    with (
        running_ca("cloud", claims=CLAIMS, backdate="1s") as cloud,
        running_ca("partner-a") as a,
        running_ca("partner-b") as b,
    ):
        partners = []
        for ca in (a, b):
            ca.federate(cloud)  # its clients trust cloud's servers all along
            client = await federatls.bootstrap(ca.token(f"client.{ca.name}.internal"))
            partners.append((ca, client))
        results = []
        print(f"  trust refresh every {args.interval:g} s, seconds to trust:", end="")
        policy = RenewalPolicy(trust_refresh=timedelta(seconds=args.interval))
        rotations = await propagate(
            cloud, partners, policy, timedelta(hours=24), args.rotations, args.probe, args.interval
        )
        results.append(Propagation("trust refresh", args.interval, rotations))
        if args.baseline_rotations:
            period = args.baseline_lifetime * 2 / 3
            print(f"  renewal only, every {period:g} s, seconds to trust:", end="")
            rotations = await propagate(
                cloud,
                partners,
                RenewalPolicy(trust_refresh=None),
                timedelta(seconds=args.baseline_lifetime),
                args.baseline_rotations,
                args.probe,
                period,
            )
            results.append(Propagation("renewal only", period, rotations))
    return results


# --- Part 1b: CA to CA: a peer's root rotation, followed by URL ------------------------------
@dataclass(frozen=True)
class PeerChange:
    """One step of the peer's rotation (a root added, old roots retired): seconds from the
    peer's reload returning to the following CA's /federation showing it, to the workload's
    bundle showing it (its swap), and, for a retirement, to the first handshake refused with
    a certificate from the retired root (inf: not within the bound)."""

    step: str  # "add" or "retire"
    ca: float
    workload: float
    refused: float


async def _until_seen(
    check: Callable[[str, bool], Awaitable[bool]],
    fp: str,
    present: bool,
    since: float,
    probe: float,
    bound: float,
) -> float:
    """Seconds from ``since`` until ``check(fp, present)`` holds."""
    while time.monotonic() - since < bound:
        if await check(fp, present):
            return time.monotonic() - since
        await asyncio.sleep(probe)
    return float("inf")


async def peer_runs(args: argparse.Namespace) -> list[PeerChange]:
    """The kubernetes CA rotates its root ``--peer-rotations`` times (add a root, issue from
    it, retire the old ones, each applied by a reload); the cloud CA follows it by URL every
    ``--peer-interval`` s; a live server of cloud refreshes trust every ``--interval`` s."""
    out: list[PeerChange] = []
    bound = 3 * (args.interval + args.peer_interval) + 10
    with running_ca("cloud") as cloud, running_ca("kubernetes") as kube:
        await anyio.to_thread.run_sync(federate, kube, [cloud.root_path])
        block = {
            "refresh": f"{args.peer_interval:g}s",
            "peers": [
                {
                    "name": "kubernetes",
                    "url": kube.url,
                    "fingerprint": kube.root_fingerprint,
                    "names": ["*.k8s.internal"],
                }
            ],
        }
        data = json.loads(cloud.config.read_text())
        data["federation"] = block
        cloud.config.write_text(json.dumps(data, indent=2))
        await anyio.to_thread.run_sync(cloud.reload)
        token = cloud.token(SERVER_NAME, sans=[SERVER_NAME, HOST])
        identity = await federatls.bootstrap(token, lifetime=timedelta(hours=24))
        policy = RenewalPolicy(trust_refresh=timedelta(seconds=args.interval))
        live = TimedLive(identity, policy)
        async with live_server(live) as port, CAClient(cloud.url, [cloud.root]) as ca:

            async def at_ca(fp: str, present: bool) -> bool:
                return (fp in {fingerprint(c) for c in await ca.federation()}) is present

            async def in_workload(fp: str, present: bool) -> bool:
                return (live.current.trust.by_fingerprint(fp) is not None) is present

            first = kube.root_fingerprint
            since = time.monotonic()
            trusted = await _until_seen(in_workload, first, True, since, args.probe, bound)
            if trusted == float("inf"):
                raise RuntimeError("the workload never trusted the peer's first root")
            for n in range(args.peer_rotations):
                client = await federatls.bootstrap(kube.token(f"probe-{n}.k8s.internal"))
                if not await exchange(client, port):
                    raise RuntimeError("the peer's client is not served before the rotation")
                old = [r.fingerprint for r in client.trust.own()]
                # Step 1, at a random point of both schedules: a new root.
                await asyncio.sleep(random.uniform(0, args.interval))
                step = await anyio.to_thread.run_sync(
                    lambda: add_root(kube.directory, kube.password, now=datetime.now(UTC))
                )
                new = fingerprint(load_pem_certificate(step.roots[-1].read_bytes()))
                await anyio.to_thread.run_sync(kube.reload)
                since = time.monotonic()
                seen_ca, seen_workload = await asyncio.gather(
                    _until_seen(at_ca, new, True, since, args.probe, bound),
                    _until_seen(in_workload, new, True, since, args.probe, bound),
                )
                out.append(PeerChange("add", seen_ca, seen_workload, float("nan")))
                # Step 2: issue from it (the follower's next fetches are anchored in it).
                await anyio.to_thread.run_sync(lambda: issue_from_new_root(kube.directory))
                await anyio.to_thread.run_sync(kube.reload)
                await asyncio.sleep(1.5 * args.peer_interval + random.uniform(0, args.interval))
                # Step 3: retire the old roots.
                await anyio.to_thread.run_sync(lambda: retire_old_roots(kube.directory))
                await anyio.to_thread.run_sync(kube.reload)
                since = time.monotonic()
                gone_ca, gone_workload, refused = await asyncio.gather(
                    _until_seen(at_ca, old[0], False, since, args.probe, bound),
                    _until_seen(in_workload, old[0], False, since, args.probe, bound),
                    _first(client, port, False, since, args.probe, bound),
                )
                out.append(PeerChange("retire", gone_ca, gone_workload, refused))
                print(f" +{seen_workload:.2f} -{gone_workload:.2f}", end="", flush=True)
    print(flush=True)
    return out


def peer_figures(changes: Sequence[PeerChange], step: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in ("ca", "workload", "refused"):
        values = sorted(getattr(c, name) for c in changes if c.step == step)
        values = [v for v in values if v == v]  # no NaN
        out[f"{name}_median_s"] = statistics.median(values) if values else float("nan")
        out[f"{name}_max_s"] = values[-1] if values else float("nan")
    return out


# --- Part 2: the cost of a refresh on a live server -------------------------------------------
@dataclass(frozen=True)
class ServerJob:
    token: str
    interval: float | None  # seconds between trust refreshes; None: off


@dataclass
class ServerResult:
    woke: Any  # array of time.monotonic() wake-ups
    late: Any  # how late each was, seconds
    refreshes: list[tuple[float, float, bool]]  # (start, end, changed)
    swaps: list[tuple[float, float]]
    failed: int


@dataclass(frozen=True)
class QuietJob:
    """Time trust refreshes one after another in the server process, with no load."""

    token: str
    count: int


@dataclass(frozen=True)
class QuietCost:
    """Milliseconds per trust refresh of an unchanged bundle (a fetch) and per swap of a
    changed one (both contexts built in a worker thread, then swapped): the server process's
    CPU (all its threads) and wall time, with nothing else running in it."""

    fetch_cpu_ms: float
    fetch_wall_ms: float
    swap_cpu_ms: float
    swap_wall_ms: float


async def quiet_cost(job: QuietJob) -> QuietCost:
    identity = await federatls.bootstrap(job.token)
    live = RenewingIdentity(identity, policy=RenewalPolicy(trust_refresh=None))
    live.server_context()
    live.client_context()  # the two kinds a server and its clients use: a swap builds both
    await live.refresh_trust()  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(job.count):
        if await live.refresh_trust():
            raise RuntimeError("the bundle changed during the quiet fetches")
    fetch = (time.process_time() - cpu, time.perf_counter() - wall)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(job.count):
        await live._swap(
            Identity.from_parts(identity.chain, identity._key, identity.trust, identity.ca_url)
        )
    swap = (time.process_time() - cpu, time.perf_counter() - wall)
    per = 1000 / job.count
    return QuietCost(fetch[0] * per, fetch[1] * per, swap[0] * per, swap[1] * per)


async def server_segment(job: ServerJob | QuietJob, conn: Connection) -> ServerResult | QuietCost:
    """Enrol, serve with the trust refresh as the job says until told to stop (or time
    refreshes with no load)."""
    if isinstance(job, QuietJob):
        return await quiet_cost(job)
    identity = await federatls.bootstrap(job.token)
    interval = timedelta(seconds=job.interval) if job.interval else None
    live = TimedLive(identity, RenewalPolicy(trust_refresh=interval))
    ticker = Ticker()
    async with anyio.create_task_group() as tg, live_server(live) as port:
        tg.start_soon(ticker.run)
        conn.send(("ready", port))
        await receive(conn)  # "stop"
        tg.cancel_scope.cancel()
    return ServerResult(
        ticker.woke,
        ticker.late,
        [
            (s, e, c > 0)
            for s, e, c in zip(
                live.refresh_start, live.refresh_end, live.refresh_changed, strict=True
            )
        ],
        list(zip(live.swap_start, live.swap_end, strict=True)),
        live.failed,
    )


def serve(conn: Connection) -> None:
    """Entry point of the server process."""
    workload(server_segment, conn)


@dataclass(frozen=True)
class LoadJob:
    token: str
    port: int
    clients: int
    warmup: float
    duration: float


@dataclass
class LoadResult:
    window: tuple[float, float]
    handshakes: int
    failed: int


async def load_segment(job: LoadJob, conn: Connection) -> LoadResult:
    """Open connections from ``clients`` loops; count those answered in the window."""
    identity = await federatls.bootstrap(job.token)
    done, failed = floats(), floats()
    stop = time.monotonic() + job.warmup + job.duration

    async def loop() -> None:
        while time.monotonic() < stop:
            ok = await exchange(identity, job.port)
            (done if ok else failed).append(time.monotonic())

    start = time.monotonic() + job.warmup
    conn.send(("started", start))
    async with anyio.create_task_group() as tg:
        for _ in range(job.clients):
            tg.start_soon(loop)
    window = (start, stop)
    return LoadResult(
        window,
        sum(start <= t <= stop for t in done),
        sum(start <= t <= stop for t in failed),
    )


def load(conn: Connection) -> None:
    """Entry point of the load process."""
    workload(load_segment, conn)


def extra_roots(directory: Path, count: int) -> list[Path]:
    """``count`` self-signed root certificates (no CA behind them): what cloud's changing
    federation cycles through."""
    paths = []
    now = datetime.now(UTC)
    for n in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"extra {n} Root CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .sign(key, hashes.SHA256())
        )
        path = directory / f"extra-{n}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths.append(path)
    return paths


@dataclass
class CostSegment:
    condition: str
    load: LoadResult
    server: ServerResult
    changes: int  # federation changes made at the CA in the window
    server_cpu: float
    machine_busy: float


def cost_segment(
    condition: str,
    args: argparse.Namespace,
    cloud: TestCA,
    kubernetes: TestCA,
    roots: Sequence[Path],
    workers: dict[str, tuple[SpawnProcess, Connection]],
) -> CostSegment:
    (server, server_conn), (client, client_conn) = workers["server"], workers["load"]
    federate(cloud, [kubernetes.root_path])
    interval = None if condition == OFF else args.cost_interval
    server_conn.send(ServerJob(cloud.token(SERVER_NAME, sans=[SERVER_NAME, HOST]), interval))
    port = expect(server_conn, server, "ready")
    job = LoadJob(kubernetes.token("client.k8s.internal"), port, args.clients, 1.0, args.segment)
    client_conn.send(job)
    start = expect(client_conn, client, "started")
    time.sleep(max(0.0, start - time.monotonic()))
    assert server.pid is not None
    cpu, busy = process_cpu_seconds(server.pid), machine_busy_seconds()
    changes = 0
    if condition == CHANGING:
        every = args.cost_interval / 2.5
        while time.monotonic() < start + args.segment:
            federate(cloud, [kubernetes.root_path, roots[changes % len(roots)]])
            changes += 1
            time.sleep(every)
    result: LoadResult = expect(client_conn, client, "done")
    cpu, busy = process_cpu_seconds(server.pid) - cpu, machine_busy_seconds() - busy
    server_conn.send("stop")
    served: ServerResult = expect(server_conn, server, "done")
    return CostSegment(condition, result, served, changes, cpu, busy)


def cost_runs(args: argparse.Namespace) -> tuple[list[CostSegment], QuietCost]:
    spawn = multiprocessing.get_context("spawn")
    workers: dict[str, tuple[SpawnProcess, Connection]] = {}
    segments: list[CostSegment] = []
    with (
        tempfile.TemporaryDirectory(prefix="federation-propagation-") as tmp,
        running_ca("cloud") as cloud,
        running_ca("kubernetes") as kubernetes,
    ):
        federate(kubernetes, [cloud.root_path])
        roots = extra_roots(Path(tmp), EXTRA_ROOTS)
        for name, target in (("server", serve), ("load", load)):
            mine, theirs = spawn.Pipe()
            process = spawn.Process(target=target, args=(theirs,), name=name)
            process.start()
            workers[name] = (process, mine)
        try:
            server, server_conn = workers["server"]
            server_conn.send(QuietJob(cloud.token(SERVER_NAME, sans=[SERVER_NAME, HOST]), 50))
            quiet: QuietCost = expect(server_conn, server, "done")
            for round_ in range(args.rounds):
                print(f"  round {round_ + 1}:", end="", flush=True)
                shift = round_ % len(CONDITIONS)
                for condition in CONDITIONS[shift:] + CONDITIONS[:shift]:
                    s = cost_segment(condition, args, cloud, kubernetes, roots, workers)
                    segments.append(s)
                    rate = s.load.handshakes / (s.load.window[1] - s.load.window[0])
                    print(f" {condition} {rate:.0f} hs/s", end=",", flush=True)
                print(flush=True)
        finally:
            for process, conn in workers.values():
                if process.is_alive():
                    with contextlib.suppress(OSError):
                        conn.send(None)
                    process.join(10)
                    if process.is_alive():
                        process.terminate()
    return segments, quiet


@dataclass
class CostRow:
    condition: str
    segments: int
    hs_per_s: float
    failed: int
    refreshes: int
    swaps: int
    refresh_ms_median: float
    swap_ms_median: float
    lag_ms_median: float
    lag_ms_p99: float
    lag_ms_max: float
    near_refresh_ticks: int
    near_refresh_lag_ms_median: float
    near_refresh_lag_ms_max: float
    near_swap_ticks: int
    near_swap_lag_ms_median: float
    near_swap_lag_ms_max: float
    server_cpu_ms_per_hs: float
    machine_busy: float  # cores busy on average


def cost_row(condition: str, segments: Sequence[CostSegment]) -> CostRow:
    seconds = sum(s.load.window[1] - s.load.window[0] for s in segments)
    handshakes = sum(s.load.handshakes for s in segments)
    lags: list[float] = []
    near: list[float] = []
    near_swap: list[float] = []
    refresh_ms: list[float] = []
    swap_ms: list[float] = []
    refreshes = swaps = 0
    for s in segments:
        lo, hi = s.load.window
        windows = [(a, b + NEAR) for a, b, _ in s.server.refreshes if lo <= a <= hi]
        refreshes += len(windows)
        refresh_ms += [(b - a) * 1000 for a, b, _ in s.server.refreshes if lo <= a <= hi]
        in_window = [(a, b) for a, b in s.server.swaps if lo <= a <= hi]
        swaps += len(in_window)
        swap_ms += [(b - a) * 1000 for a, b in in_window]
        for woke, late in zip(s.server.woke, s.server.late, strict=True):
            if not lo <= woke <= hi:
                continue
            lags.append(late * 1000)
            # The late interval [woke - late, woke] overlaps a refresh window.
            if any(woke - late <= b and woke >= a for a, b in windows):
                near.append(late * 1000)
            if any(woke - late <= b + NEAR and woke >= a for a, b in in_window):
                near_swap.append(late * 1000)
    lags.sort()
    near.sort()
    near_swap.sort()

    def med(values: Sequence[float]) -> float:
        return statistics.median(values) if values else float("nan")

    handshakes_or_one = max(handshakes, 1)
    return CostRow(
        condition=condition,
        segments=len(segments),
        hs_per_s=handshakes / seconds,
        failed=sum(s.load.failed for s in segments),
        refreshes=refreshes,
        swaps=swaps,
        refresh_ms_median=med(refresh_ms),
        swap_ms_median=med(swap_ms),
        lag_ms_median=med(lags),
        lag_ms_p99=percentile(lags, 99),
        lag_ms_max=lags[-1] if lags else float("nan"),
        near_refresh_ticks=len(near),
        near_refresh_lag_ms_median=med(near),
        near_refresh_lag_ms_max=near[-1] if near else float("nan"),
        near_swap_ticks=len(near_swap),
        near_swap_lag_ms_median=med(near_swap),
        near_swap_lag_ms_max=near_swap[-1] if near_swap else float("nan"),
        server_cpu_ms_per_hs=sum(s.server_cpu for s in segments) * 1000 / handshakes_or_one,
        machine_busy=sum(s.machine_busy for s in segments) / seconds,
    )


# --- Report -----------------------------------------------------------------------------------
def print_propagation(results: Sequence[Propagation]) -> None:
    print(
        f"\n{'mode':<14} {'every s':>7} {'n':>3} {'trust med':>9} {'trust max':>9} "
        f"{'swap med':>8} {'swap max':>8} {'drop med':>8} {'drop max':>8} {'reload ms':>9}"
    )
    for p in results:
        f = p.figures()
        print(
            f"{p.mode:<14} {p.interval:>7.2f} {len(p.rotations):>3} "
            f"{f['trusted_median_s']:>9.2f} {f['trusted_max_s']:>9.2f} "
            f"{f['swap_median_s']:>8.2f} {f['swap_max_s']:>8.2f} "
            f"{f['dropped_median_s']:>8.2f} {f['dropped_max_s']:>8.2f} "
            f"{f['reload_ms_median']:>9.1f}"
        )
    main = results[0].figures()
    aim = results[0].interval + 1
    print(
        f"trust refresh: max {main['trusted_max_s']:.2f} s to trust, "
        f"{main['dropped_max_s']:.2f} s to drop, against the aim of one interval plus one "
        f"second ({aim:.2f} s): {max(main['trusted_max_s'], main['dropped_max_s']) / aim:.2f}x"
    )
    if len(results) > 1:
        base = results[1].figures()
        print(
            "trust refresh / renewal only: median to trust "
            f"{main['trusted_median_s'] / base['trusted_median_s']:.2f}x, max "
            f"{main['trusted_max_s'] / base['trusted_max_s']:.2f}x"
        )


def print_peers(changes: Sequence[PeerChange], args: argparse.Namespace) -> None:
    aim = args.peer_interval + args.interval + 1
    print(
        f"\n{'step':<7} {'n':>3} {'CA med':>7} {'CA max':>7} {'wl med':>7} {'wl max':>7} "
        f"{'refused med':>11} {'refused max':>11}"
    )
    worst = 0.0
    for step in ("add", "retire"):
        f = peer_figures(changes, step)
        n = sum(c.step == step for c in changes)
        worst = max(worst, f["workload_max_s"], f["refused_max_s"] if step == "retire" else 0)
        print(
            f"{step:<7} {n:>3} {f['ca_median_s']:>7.2f} {f['ca_max_s']:>7.2f} "
            f"{f['workload_median_s']:>7.2f} {f['workload_max_s']:>7.2f} "
            f"{f['refused_median_s']:>11.2f} {f['refused_max_s']:>11.2f}"
        )
    print(
        f"peer refresh every {args.peer_interval:g} s, workload every {args.interval:g} s: max "
        f"{worst:.2f} s from the peer's change to the workload, against the aim of both "
        f"intervals plus one second ({aim:.2f} s): {worst / aim:.2f}x"
    )


def print_cost(rows: Sequence[CostRow]) -> None:
    print(
        f"\n{'condition':<10} {'hs/s':>7} {'failed':>6} {'refr':>5} {'swaps':>5} "
        f"{'refr ms':>7} {'swap ms':>7} {'lag med':>7} {'lag p99':>7} {'lag max':>7} "
        f"{'near med':>8} {'near max':>8} {'srv ms/hs':>9} {'busy':>5}"
    )
    for r in rows:
        print(
            f"{r.condition:<10} {r.hs_per_s:>7.0f} {r.failed:>6} {r.refreshes:>5} {r.swaps:>5} "
            f"{r.refresh_ms_median:>7.2f} {r.swap_ms_median:>7.2f} {r.lag_ms_median:>7.2f} "
            f"{r.lag_ms_p99:>7.2f} {r.lag_ms_max:>7.2f} {r.near_refresh_lag_ms_median:>8.2f} "
            f"{r.near_refresh_lag_ms_max:>8.2f} {r.server_cpu_ms_per_hs:>9.3f} "
            f"{r.machine_busy:>5.2f}"
        )
    base = rows[0]
    for r in rows[1:]:
        print(
            f"{r.condition} / off: hs/s {r.hs_per_s / base.hs_per_s:.3f}x, server CPU per "
            f"handshake {r.server_cpu_ms_per_hs / base.server_cpu_ms_per_hs:.3f}x, loop lag "
            f"p99 {r.lag_ms_p99 / base.lag_ms_p99:.2f}x, max lag near a refresh "
            f"{r.near_refresh_lag_ms_max:.2f} ms (off: max {base.lag_ms_max:.2f} ms)"
        )
        if r.swaps:
            print(
                f"  {r.condition}: {r.near_swap_ticks} wake-ups within a swap (start to 50 ms "
                f"after its end): lag median {r.near_swap_lag_ms_median:.2f} ms, max "
                f"{r.near_swap_lag_ms_max:.2f} ms (off: median {base.lag_ms_median:.2f} ms)"
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=("all", "propagation", "peers", "cost"), default="all")
    p.add_argument("--interval", type=float, default=1.0, help="trust refresh, seconds")
    p.add_argument("--rotations", type=int, default=20, help="federation changes timed")
    p.add_argument("--probe", type=float, default=0.02, help="seconds between probes")
    p.add_argument(
        "--baseline-lifetime",
        type=float,
        default=6.0,
        help="certificate lifetime, seconds, when only renewals carry the change",
    )
    p.add_argument("--baseline-rotations", type=int, default=8, help="0: no baseline")
    p.add_argument("--peer-interval", type=float, default=1.0, help="CA follows its peer, s")
    p.add_argument("--peer-rotations", type=int, default=8, help="full rotations of the peer")
    p.add_argument("--cost-interval", type=float, default=0.5, help="trust refresh, seconds")
    p.add_argument("--clients", type=int, default=8, help="handshake loops")
    p.add_argument("--segment", type=float, default=8.0, help="measured seconds per segment")
    p.add_argument("--rounds", type=int, default=3, help="segments per condition")
    p.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The probes of dropped roots are refused on purpose: one WARNING each otherwise.
    logging.getLogger("federatls.peer").setLevel(logging.ERROR)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "benchmark": "federation_propagation",
        "started": started.isoformat(),
        "settings": vars(args) | {"json": str(args.json) if args.json else None},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "platform": platform.platform(),
        },
        "federatls_version": federatls.__version__,
    }
    failed = 0
    if args.part in ("all", "propagation"):
        print("Part 1: propagation of a federation change to a live server")
        results = anyio.run(propagation_runs, args)
        print_propagation(results)
        report["propagation"] = [
            {"mode": p.mode, **p.figures(), "rotations": [asdict(r) for r in p.rotations]}
            for p in results
        ]
        failed += sum(
            r.trusted == float("inf") or r.dropped == float("inf") for r in results[0].rotations
        )
    if args.part in ("all", "peers"):
        print("\nPart 1b: a peer's root rotation, followed by URL, reaching a live server")
        print("  seconds to the workload, added root +, retired root -:", end="")
        changes = anyio.run(peer_runs, args)
        print_peers(changes, args)
        report["peers"] = {step: peer_figures(changes, step) for step in ("add", "retire")} | {
            "changes": [asdict(c) for c in changes]
        }
        failed += sum(
            c.workload == float("inf") or c.ca == float("inf") or c.refused == float("inf")
            for c in changes
        )
    if args.part in ("all", "cost"):
        print("\nPart 2: the cost of bundle refreshes on a live server")
        segments, quiet = cost_runs(args)
        rows = [cost_row(c, [s for s in segments if s.condition == c]) for c in CONDITIONS]
        print_cost(rows)
        print(
            f"one trust refresh, no load: {quiet.fetch_cpu_ms:.2f} ms CPU "
            f"({quiet.fetch_wall_ms:.2f} ms wall) to fetch an unchanged bundle, "
            f"{quiet.swap_cpu_ms:.2f} ms CPU ({quiet.swap_wall_ms:.2f} ms wall) more to swap a "
            f"changed one; every 5 minutes (the default) that is "
            f"{quiet.fetch_cpu_ms / 300 / 10:.4f}% of a core"
        )
        report["cost"] = [asdict(r) for r in rows]
        report["quiet_refresh"] = asdict(quiet)
        report["cost_segments"] = [
            {
                "condition": s.condition,
                "handshakes": s.load.handshakes,
                "failed": s.load.failed,
                "changes": s.changes,
                "refreshes": len(s.server.refreshes),
                "swaps": len(s.server.swaps),
                "server_cpu": s.server_cpu,
            }
            for s in segments
        ]
        failed += sum(r.failed for r in rows)
    print(f"\n{os.cpu_count()} CPUs, load average before the run {load_before[0]:.2f}")
    write_results("federation_propagation", report, started, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
