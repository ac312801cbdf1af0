"""Mutual-TLS handshakes with federatls contexts against stdlib contexts loaded from files:
same certificates, same server, same client, one run.

What is measured
----------------
Two identities are bootstrapped from a federated pair of federatls CAs
(``federatls.testing.federated_pair``): a server (``server.cloud.internal``, IP SAN
127.0.0.1) enrolled with the "cloud" CA and a client (``client.k8s.internal``) enrolled with
the "kubernetes" CA, so every handshake verifies a chain from the *other* CA against the
federation bundle. The CAs are stopped before anything is measured.

The same material is then used four ways (``--variants`` picks some):

* ``stdlib``, the baseline, built the ordinary way: the chains, the keys (plaintext PEM,
  mode 0600) and the federation bundle are written to a temporary directory, and the
  contexts are ``ssl.SSLContext(PROTOCOL_TLS_SERVER / PROTOCOL_TLS_CLIENT)`` with
  ``minimum_version = TLSv1_2``, ``verify_mode = CERT_REQUIRED`` (and the client's default
  host-name check), ``load_cert_chain(certfile, keyfile)`` and
  ``load_verify_locations(cafile)``. Default ciphers, default session tickets. The
  directory is deleted at the end.
* ``no-tickets``: the baseline with one change on the server, ``num_tickets = 0`` (and
  ``OP_NO_TICKET``), as federatls' server contexts have it. With TLS 1.3 a stdlib server
  sends two session tickets after every handshake; they cost it CPU and this client never
  uses them. This variant separates the tickets from everything else:
  ``federatls / no-tickets`` is the like-for-like ratio.
* ``federatls``: ``identity.server_context()`` and ``identity.client_context()``.
* ``streams``: ``federatls.integrations.streams`` (``start_server`` /
  ``open_connection``): the same contexts plus a peer check on both ends (the verified
  chain parsed, its anchor looked up), and ``open_connection`` builds a new client context
  on every call. It does more work than the others by design and is not part of the 0.97
  aim; it shows what the integration costs per connection.

One server process (its own process, so client and server do not share a GIL) bootstraps
the server identity itself, then listens on one port per variant with the same asyncio
handler; the client runs in this process with the same client code for every variant
(``streams`` aside). One request is: a new TCP connection, a full mutual-TLS handshake (no
resumption), a 56-byte HTTP/1.1 request, a 63-byte response, the server closes, the client
reads to EOF and closes. Latency runs from the connect call to the end of the response.

For each concurrency level (1 and 16 clients by default) the variants are measured in
alternating short segments (A B C D, then D C B A, and again: an ABBA order, so a linear
drift in outside load cancels out), and the figures are pooled per variant:
handshakes per second, p50/p99 latency, and the CPU milliseconds per handshake of the
server process and of the client process (from ``/proc`` and ``time.process_time()``: the
least noisy figures on a shared machine). The ratio federatls / stdlib is printed; the aim
is 0.97 or better for handshakes per second.

Separately, the one-off cost of making the contexts (what a renewal pays): median and p99
time of ``server_context()`` / ``client_context()`` against building the same contexts from
the files, interleaved call by call, with a breakdown of where federatls' time goes.

What is not measured
--------------------
* TLS session resumption, HTTP keep-alive, larger payloads (the connection is the unit).
* Network latency (everything is on 127.0.0.1), other key types (both identities P-256),
  other concurrency models (threads, blocking sockets).
* Bootstrapping (``bootstrap_latency.py``) and memory (``identity_memory.py``).

Run ``python bench/handshake.py --help``; bench/README.md explains how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing
import os
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path

from cryptography.hazmat.primitives import serialization

import federatls
from federatls import Identity
from federatls._contexts import _TLS12_CIPHERS
from federatls._sslkeys import load_cert_chain_in_memory
from federatls.integrations import streams
from federatls.testing import federated_pair
from sign_throughput import machine_busy_seconds, percentile, process_cpu_seconds, write_results

HOST = "127.0.0.1"
SERVER_NAME = "server.cloud.internal"
CLIENT_NAME = "client.k8s.internal"
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
REQUEST_TIMEOUT = 30.0  # seconds; a request slower than this counts as an error
MAX_ERROR_SAMPLES = 5
BASELINE, CONTENDER, STREAMS = "stdlib", "federatls", "streams"
NO_TICKETS = "no-tickets"  # the baseline without TLS 1.3 session tickets, like federatls
VARIANTS = (BASELINE, NO_TICKETS, CONTENDER, STREAMS)


# --- The baseline: the same material as files, contexts loaded the ordinary way -------------
@dataclass(frozen=True)
class Files:
    """An identity written out as an application without federatls would keep it."""

    chain: Path  # leaf and intermediate, PEM
    key: Path  # plaintext PKCS#8 PEM, mode 0600
    bundle: Path  # the federation bundle: every trusted root, PEM


def write_files(identity: Identity, directory: Path, name: str) -> Files:
    files = Files(directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.ca")
    files.chain.write_text(identity.chain_pem)
    descriptor = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(identity.export_private_key(password=None))
    files.bundle.write_text(identity.trust.pem)
    return files


def stdlib_server_context(files: Files, *, tickets: bool = True) -> ssl.SSLContext:
    """``tickets=False``: send no session tickets, as federatls' server contexts do (with
    TLS 1.3 the stdlib's server sends two after every handshake, unused here)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(files.chain, files.key)
    ctx.load_verify_locations(cafile=files.bundle)
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    return ctx


def stdlib_client_context(files: Files) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname already
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.chain, files.key)
    ctx.load_verify_locations(cafile=files.bundle)
    return ctx


# --- The server process ---------------------------------------------------------------------
async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The one handler every variant's port runs: read the request head, answer, close."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(RESPONSE)
        await writer.drain()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass  # the client sees the failure and counts it
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _serve(token: str, directory: Path, variants: Sequence[str], parent: Connection) -> None:
    identity = await federatls.bootstrap(token)
    files = write_files(identity, directory, "server")
    servers: dict[str, asyncio.Server] = {}
    for name in variants:
        if name in (BASELINE, NO_TICKETS):
            ctx = stdlib_server_context(files, tickets=name == BASELINE)
            servers[name] = await asyncio.start_server(handle, HOST, 0, ssl=ctx)
        elif name == CONTENDER:
            ctx = identity.server_context()
            servers[name] = await asyncio.start_server(handle, HOST, 0, ssl=ctx)
        else:
            servers[name] = await streams.start_server(identity, handle, HOST, 0)
    parent.send({name: s.sockets[0].getsockname()[1] for name, s in servers.items()})
    await asyncio.get_running_loop().run_in_executor(None, parent.recv)  # until told to stop
    for server in servers.values():
        server.close()


def serve(token: str, directory: Path, variants: Sequence[str], parent: Connection) -> None:
    """Entry point of the server process: enrol with ``token``, write the baseline's files,
    listen on one port per variant, send the ports to the parent, serve until it says stop."""
    asyncio.run(_serve(token, directory, variants, parent))


# --- The client (this process) --------------------------------------------------------------
Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class Variant:
    name: str
    port: int
    connect: Connect  # a new TCP connection with a full TLS handshake
    tls: str = ""  # negotiated protocol and cipher, for the report


def variants_for(client: Identity, files: Files, ports: dict[str, int]) -> list[Variant]:
    """How the client connects to each variant's port. The client contexts are made once,
    except by ``streams.open_connection``, which makes one per call."""
    out = []
    for name, port in ports.items():
        connect: Connect
        if name == STREAMS:
            connect = functools.partial(streams.open_connection, client, HOST, port)
        else:
            ctx = client.client_context() if name == CONTENDER else stdlib_client_context(files)
            connect = functools.partial(
                asyncio.open_connection, HOST, port, ssl=ctx, server_hostname=HOST
            )
        out.append(Variant(name, port, connect))
    return out


async def one_request(connect: Connect) -> None:
    """Connect (TCP + TLS handshake), send the request, read the response to EOF, close."""
    reader, writer = await connect()
    try:
        writer.write(REQUEST)
        response = await reader.read()
    finally:
        writer.close()
    if not response.startswith(b"HTTP/1.1 200 "):
        raise ValueError(f"unexpected response {response[:60]!r}")


async def describe_tls(variant: Variant) -> str:
    reader, writer = await variant.connect()
    try:
        tls = writer.get_extra_info("ssl_object")
        writer.write(REQUEST)
        await reader.read()
        version, cipher = tls.version(), tls.cipher()
        return f"{version} {cipher[0] if cipher else '?'}"
    finally:
        writer.close()


@dataclass
class Segment:
    """One variant, one concurrency level, one short window."""

    variant: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    seconds: float = 0.0  # first connect to last response
    client_cpu: float = 0.0  # seconds
    server_cpu: float = 0.0
    machine_busy: float = 0.0  # seconds, all cores


async def run_segment(
    variant: Variant, concurrency: int, seconds: float, server_pid: int
) -> Segment:
    """``concurrency`` clients each sending requests back to back for ``seconds``."""
    segment = Segment(variant.name, concurrency)
    stop_at = time.monotonic() + seconds
    last_end = 0.0

    async def client() -> None:
        nonlocal last_end
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await one_request(variant.connect)
            except (OSError, TimeoutError, ValueError, ssl.SSLError, federatls.FederatlsError) as e:
                segment.errors += 1
                if len(segment.error_samples) < MAX_ERROR_SAMPLES:
                    segment.error_samples.append(f"{type(e).__name__}: {e}")
            else:
                segment.latencies.append(time.monotonic() - started)
            last_end = max(last_end, time.monotonic())

    cpu, server, busy = time.process_time(), process_cpu_seconds(server_pid), machine_busy_seconds()
    start = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    segment.seconds = last_end - start
    segment.client_cpu = time.process_time() - cpu
    segment.server_cpu = process_cpu_seconds(server_pid) - server
    segment.machine_busy = machine_busy_seconds() - busy
    return segment


@dataclass
class LevelResult:
    """One variant at one concurrency level, its segments pooled."""

    variant: str
    concurrency: int
    requests: int  # successful ones
    errors: int
    seconds: float
    rps: float  # handshakes (= requests) per second
    p50_ms: float
    p99_ms: float
    server_ms: float  # server CPU milliseconds per handshake
    client_ms: float  # client CPU milliseconds per handshake
    other_cpu: float  # the rest of the machine, 1.0 = one core
    segment_rps: list[float]
    error_samples: list[str]


def pool(segments: Sequence[Segment]) -> LevelResult:
    latencies = sorted(x for s in segments for x in s.latencies)
    requests = len(latencies)
    seconds = sum(s.seconds for s in segments)
    server, client = sum(s.server_cpu for s in segments), sum(s.client_cpu for s in segments)
    busy = sum(s.machine_busy for s in segments)
    return LevelResult(
        variant=segments[0].variant,
        concurrency=segments[0].concurrency,
        requests=requests,
        errors=sum(s.errors for s in segments),
        seconds=seconds,
        rps=requests / seconds,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        server_ms=server / max(1, requests) * 1000,
        client_ms=client / max(1, requests) * 1000,
        other_cpu=max(0.0, busy - server - client) / seconds,
        segment_rps=[len(s.latencies) / s.seconds for s in segments],
        error_samples=[x for s in segments for x in s.error_samples][:MAX_ERROR_SAMPLES],
    )


async def measure_level(
    variants: Sequence[Variant], concurrency: int, settings: Settings, server_pid: int
) -> list[LevelResult]:
    """Warm every variant up, then alternate them segment by segment (ABBA...)."""
    for variant in variants:
        await run_segment(variant, concurrency, settings.warmup, server_pid)
    segments: dict[str, list[Segment]] = {v.name: [] for v in variants}
    for round_ in range(settings.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            segment = await run_segment(variant, concurrency, settings.segment, server_pid)
            segments[variant.name].append(segment)
    return [pool(segments[v.name]) for v in variants]


# --- Context creation: the one-off cost per renewal ------------------------------------------
@dataclass
class Timing:
    what: str
    calls: int
    median_us: float
    p99_us: float


def time_calls(makers: dict[str, Callable[[], object]], calls: int) -> list[Timing]:
    """Each maker called ``calls`` times, interleaved call by call; median and p99."""
    samples: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(calls):
        for name, make in makers.items():
            started = time.perf_counter()
            make()
            samples[name].append(time.perf_counter() - started)
    return [
        Timing(
            name,
            calls,
            statistics.median(values) * 1e6,
            percentile(sorted(values), 99) * 1e6,
        )
        for name, values in samples.items()
    ]


def context_steps(identity: Identity) -> dict[str, Callable[[], object]]:
    """What ``identity.client_context()`` does (``federatls._contexts``), one step at a time,
    to see where its time goes. The key and chain steps use the private key, which the
    public API does not expose; ``_key`` is read here for the breakdown only."""
    key, chain, trust = identity._key, identity.chain, identity.trust
    pem = trust.pem

    def settings() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(_TLS12_CIPHERS)
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        return ctx

    def key_pem() -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    return {
        "SSLContext(PROTOCOL_TLS_CLIENT) alone": lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
        "  + min version, set_ciphers, options": settings,
        "key to PKCS#8 PEM": key_pem,
        "load_cert_chain_in_memory (memfd)": lambda: load_cert_chain_in_memory(
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), chain, key
        ),
        "trust.pem (roots to PEM)": lambda: trust.pem,
        "load_verify_locations(cadata=...)": lambda: ssl.SSLContext(
            ssl.PROTOCOL_TLS_CLIENT
        ).load_verify_locations(cadata=pem),
    }


def measure_contexts(identity: Identity, files: Files, calls: int) -> dict[str, list[Timing]]:
    makers: dict[str, Callable[[], object]] = {
        "server: stdlib from files": lambda: stdlib_server_context(files),
        "server: identity.server_context()": identity.server_context,
        "client: stdlib from files": lambda: stdlib_client_context(files),
        "client: identity.client_context()": identity.client_context,
    }
    return {
        "contexts": time_calls(makers, calls),
        "breakdown": time_calls(context_steps(identity), calls),
    }


# --- Report ---------------------------------------------------------------------------------
def print_level_table(rows: Sequence[LevelResult]) -> None:
    print(
        f"\n{'variant':<11} {'clients':>7} {'hs/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'requests':>8} {'srv ms/hs':>9} {'cli ms/hs':>9} {'other':>6}"
    )
    for r in rows:
        print(
            f"{r.variant:<11} {r.concurrency:>7} {r.rps:>7.1f} {r.p50_ms:>7.2f} "
            f"{r.p99_ms:>7.2f} {r.errors:>6} {r.requests:>8} {r.server_ms:>9.3f} "
            f"{r.client_ms:>9.3f} {r.other_cpu:>6.0%}"
        )


def ratio_rows(rows: Sequence[LevelResult], name: str, baseline: str) -> list[dict[str, float]]:
    out = []
    for level in sorted({r.concurrency for r in rows}):
        base = next(r for r in rows if r.concurrency == level and r.variant == baseline)
        ours = next(r for r in rows if r.concurrency == level and r.variant == name)
        per_round = [a / b for a, b in zip(ours.segment_rps, base.segment_rps, strict=True)]
        out.append(
            {
                "concurrency": level,
                "hs_per_s": ours.rps / base.rps,
                "hs_per_s_min_round": min(per_round),
                "hs_per_s_max_round": max(per_round),
                "p50": ours.p50_ms / base.p50_ms,
                "p99": ours.p99_ms / base.p99_ms,
                "server_ms": ours.server_ms / base.server_ms,
                "client_ms": ours.client_ms / base.client_ms,
            }
        )
    return out


def print_ratios(name: str, baseline: str, rows: Sequence[dict[str, float]]) -> None:
    print(f"\n{name} / {baseline}: hs/s above 1 and the others below 1 favour {name}")
    print(
        f"{'clients':>7} {'hs/s':>7} {'rounds':>13} {'p50':>7} {'p99':>7} "
        f"{'srv ms/hs':>9} {'cli ms/hs':>9}"
    )
    for r in rows:
        spread = f"{r['hs_per_s_min_round']:.2f}-{r['hs_per_s_max_round']:.2f}"
        print(
            f"{r['concurrency']:>7} {r['hs_per_s']:>6.3f}x {spread:>13} {r['p50']:>6.3f}x "
            f"{r['p99']:>6.3f}x {r['server_ms']:>8.3f}x {r['client_ms']:>8.3f}x"
        )


def print_timings(title: str, rows: Sequence[Timing]) -> None:
    print(f"\n{title}")
    print(f"{'':<40} {'median us':>9} {'p99 us':>9}")
    for t in rows:
        print(f"{t.what:<40} {t.median_us:>9.1f} {t.p99_us:>9.1f}")


# --- Main -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    levels: tuple[int, ...]
    variants: tuple[str, ...]
    rounds: int  # segments per variant and level
    segment: float  # seconds
    warmup: float  # seconds per variant and level
    context_calls: int


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--levels", default="1,16", help="concurrent clients, comma-separated")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"which to run, comma-separated, of {', '.join(VARIANTS)}; {BASELINE} always runs",
    )
    p.add_argument("--rounds", type=int, default=8, help="segments per variant and level")
    p.add_argument("--segment", type=float, default=1.25, help="seconds per segment")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per variant")
    p.add_argument(
        "--context-calls", type=int, default=300, help="calls per kind when timing contexts"
    )
    p.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    return p.parse_args(argv)


async def run_all(
    client: Identity, files: Files, ports: dict[str, int], settings: Settings, server_pid: int
) -> tuple[list[LevelResult], list[Variant]]:
    variants = variants_for(client, files, ports)
    for v in variants:
        v.tls = await describe_tls(v)
    rows: list[LevelResult] = []
    for concurrency in settings.levels:
        print(f"  {concurrency} client(s) ...", end="", flush=True)
        level = await measure_level(variants, concurrency, settings, server_pid)
        rows += level
        print(" " + ", ".join(f"{r.variant} {r.rps:.0f} hs/s" for r in level), flush=True)
    return rows, variants


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [v for v in args.variants.split(",") if v]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        print(f"unknown variant(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    settings = Settings(
        levels=tuple(int(x) for x in args.levels.split(",")),
        variants=tuple(v for v in VARIANTS if v == BASELINE or v in chosen),
        rounds=args.rounds,
        segment=args.segment,
        warmup=args.warmup,
        context_calls=args.context_calls,
    )
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    directory = Path(tempfile.mkdtemp(prefix="federatls-bench-handshake-"))
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    server: SpawnProcess | None = None
    try:
        with federated_pair() as (cloud, kubernetes):
            token = cloud.token(SERVER_NAME, sans=[SERVER_NAME, HOST])
            server = spawn.Process(target=serve, args=(token, directory, settings.variants, theirs))
            server.start()
            client = kubernetes.identity(CLIENT_NAME)
            if not ours.poll(60):
                raise RuntimeError("the server process did not start within 60 s")
            ports: dict[str, int] = ours.recv()
        # The CAs are stopped: from here on this process is only the client.
        files = write_files(client, directory, "client")
        assert server.pid is not None
        rows, variants = asyncio.run(run_all(client, files, ports, settings, server.pid))
        print("\ntiming context creation ...", flush=True)
        contexts = measure_contexts(client, files, settings.context_calls)
    finally:
        if server is not None and server.is_alive():
            ours.send("stop")
            server.join(10)
            if server.is_alive():
                server.terminate()
        shutil.rmtree(directory, ignore_errors=True)  # the baseline's plaintext keys

    print(
        f"\n{os.cpu_count()} CPUs, load average before the run {load_before[0]:.2f}; "
        f"{settings.rounds} segments of {settings.segment:g} s per variant and level"
    )
    for v in variants:
        print(f"{v.name:<11} {v.tls}")
    print_level_table(rows)
    pairs = [(name, BASELINE) for name in settings.variants if name != BASELINE]
    if {CONTENDER, NO_TICKETS} <= set(settings.variants):
        pairs.append((CONTENDER, NO_TICKETS))  # like for like: neither sends tickets
    ratios = {f"{a}/{b}": ratio_rows(rows, a, b) for a, b in pairs}
    for a, b in pairs:
        print_ratios(a, b, ratios[f"{a}/{b}"])
    print_timings("Context creation (one-off per identity and renewal)", contexts["contexts"])
    print_timings("Where client_context()'s time goes", contexts["breakdown"])

    report = {
        "benchmark": "handshake",
        "started": started.isoformat(),
        "settings": asdict(settings),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "platform": platform.platform(),
        },
        "tls": {v.name: v.tls for v in variants},
        "federatls_version": federatls.__version__,
        "results": [asdict(r) for r in rows],
        "ratios": ratios,
        "context_creation": {k: [asdict(t) for t in v] for k, v in contexts.items()},
    }
    write_results("handshake", report, started, args.json)
    errors = sum(r.errors for r in rows)
    if errors:
        print(f"{errors} request(s) failed; see error_samples in the JSON", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
