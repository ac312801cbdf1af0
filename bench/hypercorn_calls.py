"""Requests per second through hypercorn served with federatls's identity
(``federatls.integrations.hypercorn.config``) against hypercorn configured from PEM files by
hand, in one run; and the p99 of requests while the server renews against steady state.

What is measured
----------------
Two federated federatls CAs run in this process (``federatls.testing.federated_pair``,
certificates of a few seconds allowed, ``backdate`` 1 s). Each segment starts a server
process (spawn; its own event loop and GIL) that enrols ``server.cloud.internal`` with the
"cloud" CA and serves a 3-byte ASGI answer with ``hypercorn.asyncio.serve``, one of:

* ``federatls``: ``config(live, authoriser=allow_names("*.k8s.internal"))``, ``live`` a
  ``RenewingIdentity`` running its renewal task; the key stays in memory;
* ``files``: a plain ``hypercorn.config.Config`` with ``certfile`` (the chain),
  ``keyfile`` (the key encrypted with a password, exported by the bench into a 0700
  temporary directory removed at the end) and ``keyfile_password``, ``ca_certs`` (the
  federation bundle) and ``verify_mode=CERT_REQUIRED``: what one writes by hand. It has no
  authoriser (hypercorn has none) and does not follow renewal.

The load runs in this process: ``--loops`` (8) loops, each sending its next request as soon
as the last is answered, through one ``federatls.integrations.httpx.AsyncClient`` as
``client.k8s.internal`` (the "kubernetes" CA, 24-hour certificate) whose pool holds one
connection per loop: the same client for both servers. Two windows per segment, each after
a ``--warmup``: ``keep-alive`` (connections opened once and reused: the HTTP path) and
``new connection`` (``Connection: close`` on every request: a full mutual-TLS handshake,
with the federatls context's switch to the newest snapshot and its after-handshake check,
per request).

An unmeasured segment runs first (imports, caches). Throughput: ``federatls`` and ``files``
segments alternate (ABBA over ``--rounds``), both
with 24-hour certificates. Figures per server and window (segments pooled): successful
requests per second, p50/p99 latency (from ``get`` to the body read), failed requests (any
exception, non-200 or wrong body: must be 0), and the server process's CPU milliseconds per
request (the least noisy figure on a shared machine); then ratios federatls / files.

Renewal: the ``federatls`` server with certificates of ``--lifetime`` seconds (4: a renewal
every 2 to 2.7 s, each fetching ``/roots`` and ``/federation``, renewing over mutual TLS and
building the new contexts in a worker thread) against the same server with 24-hour
certificates (``steady``), alternating; p99 churn / steady per window and the renewals the
server swapped in during its segments (a segment: warm-up and window, twice).

What is not measured
--------------------
* Network latency (everything on 127.0.0.1), bodies of any size, HTTP/2 (the client speaks
  HTTP/1.1; hypercorn's HTTP/2 path does not touch the TLS context after the handshake).
* The client's renewal (httpx's pool recycling is bench/renewal_under_load.py's business)
  and root rotation (the test suite's: tests/test_hypercorn.py).

Run ``python bench/hypercorn_calls.py --help``. The default run takes about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import hypercorn.asyncio
from hypercorn.config import Config
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

import federatls
from federatls import Identity, RenewingIdentity, allow_names
from federatls.integrations import hypercorn as fhypercorn
from federatls.integrations.httpx import AsyncClient
from federatls.testing import TestCA, federated_pair
from sign_throughput import percentile, process_cpu_seconds, write_results

HOST = "127.0.0.1"
SERVER_NAME = "server.cloud.internal"
CLIENT_NAME = "client.k8s.internal"
BODY = b"ok\n"
FEDERATLS, FILES = "federatls", "files"
STEADY, CHURN = "steady", "churn"
KEEP_ALIVE, NEW_CONNECTION = "keep-alive", "new connection"
WINDOWS = (KEEP_ALIVE, NEW_CONNECTION)
CLAIMS = {"minTLSCertDuration": "2s", "defaultTLSCertDuration": "24h", "maxTLSCertDuration": "24h"}
LONG = timedelta(hours=24)
MAX_ERROR_SAMPLES = 5


# --- The server process ------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerJob:
    kind: str  # FEDERATLS or FILES
    token: str
    lifetime: float  # seconds


async def _app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))]
    await send(
        {"type": "http.response.start", "status": 200, "headers": headers, "trailers": False}
    )
    await send({"type": "http.response.body", "body": BODY, "more_body": False})


def _bind() -> tuple[int, str]:
    """A listening socket on 127.0.0.1:0, handed to hypercorn as ``fd://``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    sock.listen(512)
    return sock.getsockname()[1], f"fd://{sock.detach()}"


@contextlib.contextmanager
def _pem_files(identity: Identity, password: str) -> Iterator[dict[str, Any]]:
    """hypercorn's TLS settings from files, as one writes them by hand: the chain, the key
    encrypted with ``password``, the federation bundle, in a 0700 directory removed after."""
    directory = Path(tempfile.mkdtemp(prefix="hypercorn-bench-"))
    directory.chmod(0o700)
    try:
        (directory / "chain.pem").write_text(identity.chain_pem)
        (directory / "key.pem").write_bytes(identity.export_private_key(password=password.encode()))
        (directory / "roots.pem").write_text(identity.trust.pem)
        yield {
            "certfile": str(directory / "chain.pem"),
            "keyfile": str(directory / "key.pem"),
            "keyfile_password": password,
            "ca_certs": str(directory / "roots.pem"),
            "verify_mode": ssl.CERT_REQUIRED,
        }
    finally:
        shutil.rmtree(directory)


async def _serve(conn: Connection) -> None:
    job: ServerJob = conn.recv()
    identity = await federatls.bootstrap(job.token, lifetime=timedelta(seconds=job.lifetime))
    port, bind = _bind()
    stop = asyncio.Event()
    async with anyio.create_task_group() as tg:
        live: RenewingIdentity | None = None
        with contextlib.ExitStack() as stack:
            config: Config
            if job.kind == FEDERATLS:
                live = RenewingIdentity(identity)
                await tg.start(live.run)
                config = fhypercorn.config(
                    live, authoriser=allow_names("*.k8s.internal"), bind=bind, errorlog=None
                )
            else:
                config = Config()
                for name, value in stack.enter_context(_pem_files(identity, "bench")).items():
                    setattr(config, name, value)
                config.bind, config.errorlog = [bind], None
            config.graceful_timeout = 1
            tg.start_soon(lambda: hypercorn.asyncio.serve(_app, config, shutdown_trigger=stop.wait))
            conn.send(("ready", port, os.getpid()))
            command = await anyio.to_thread.run_sync(conn.recv)
            assert command == "renewals", command
            conn.send(live.renewals if live else 0)
            assert await anyio.to_thread.run_sync(conn.recv) == "stop"
            stop.set()
            await anyio.sleep(0.5)
        tg.cancel_scope.cancel()


def serve(conn: Connection) -> None:
    """The server process's entry point."""
    asyncio.run(_serve(conn))


# --- The load, in this process -------------------------------------------------------------------
@dataclass
class Window:
    """One window's requests: latencies of the successful ones, failures, server CPU."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds
    failures: list[str] = field(default_factory=list)
    server_cpu: float = 0.0  # seconds


async def _window(
    http: httpx.AsyncClient, url: str, close: bool, seconds: float, loops: int, pid: int
) -> Window:
    window = Window(seconds=seconds)
    headers = {"Connection": "close"} if close else {}
    end = time.perf_counter() + seconds

    async def loop() -> None:
        while (started := time.perf_counter()) < end:
            try:
                response = await http.get(url, headers=headers)
                if response.status_code != 200 or response.content != BODY:
                    raise AssertionError(f"{response.status_code} {response.content!r}")
            except Exception as exc:
                window.failures.append(f"{type(exc).__name__}: {exc}")
            else:
                window.latencies.append(time.perf_counter() - started)

    cpu = process_cpu_seconds(pid)
    async with anyio.create_task_group() as tg:
        for _ in range(loops):
            tg.start_soon(loop)
    window.server_cpu = process_cpu_seconds(pid) - cpu
    return window


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    rounds: int
    loops: int
    lifetime: float


async def _segment(
    spawn: Any, cloud: TestCA, client: Identity, kind: str, lifetime: float, settings: Settings
) -> tuple[dict[str, Window], int]:
    """One server process of ``kind``; both windows against it; the renewals it swapped."""
    parent, child = spawn.Pipe()
    process = spawn.Process(target=serve, args=(child,), name=f"server-{kind}")
    process.start()
    try:
        parent.send(ServerJob(kind, cloud.token(SERVER_NAME, sans=[SERVER_NAME, HOST]), lifetime))
        ready, port, pid = await anyio.to_thread.run_sync(parent.recv)
        assert ready == "ready"
        url = f"https://{HOST}:{port}/"
        limits = httpx.Limits(max_connections=settings.loops)
        windows: dict[str, Window] = {}
        async with AsyncClient(client, limits=limits) as http:
            for name in WINDOWS:
                close = name == NEW_CONNECTION
                await _window(http, url, close, settings.warmup, settings.loops, pid)
                windows[name] = await _window(
                    http, url, close, settings.duration, settings.loops, pid
                )
        parent.send("renewals")
        renewals: int = await anyio.to_thread.run_sync(parent.recv)
        parent.send("stop")
        return windows, renewals
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


def _pool(windows: list[Window]) -> dict[str, Any]:
    latencies = sorted(x for w in windows for x in w.latencies)
    seconds = sum(w.seconds for w in windows)
    failures = [f for w in windows for f in w.failures]
    ok = len(latencies)
    return {
        "requests_per_s": ok / seconds,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "failed": len(failures),
        "failure_samples": failures[:MAX_ERROR_SAMPLES],
        "server_cpu_ms_per_request": sum(w.server_cpu for w in windows) / max(ok, 1) * 1000,
        "per_window_requests_per_s": [len(w.latencies) / w.seconds for w in windows],
    }


async def _run(settings: Settings) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    collected: dict[str, dict[str, list[Window]]] = {}
    renewals: dict[str, int] = {STEADY: 0, CHURN: 0}
    with federated_pair("cloud", "kubernetes", claims=CLAIMS, backdate="1s") as (cloud, k8s):
        client = k8s.identity(CLIENT_NAME, lifetime=LONG)
        long = LONG.total_seconds()
        plan: list[tuple[str, str, float]] = []  # (figure, condition, lifetime)
        for i in range(settings.rounds):  # ABBA
            pair = [(FEDERATLS, long), (FILES, long)]
            plan += [("throughput", k, life) for k, life in (pair if i % 2 == 0 else pair[::-1])]
        for i in range(settings.rounds):
            pair = [(STEADY, long), (CHURN, settings.lifetime)]
            plan += [("renewal", c, life) for c, life in (pair if i % 2 == 0 else pair[::-1])]
        # One unmeasured segment first: the first server and the client's first connections
        # pay for imports and caches that later segments do not.
        first = Settings(settings.warmup, settings.warmup, 1, settings.loops, settings.lifetime)
        await _segment(spawn, cloud, client, FEDERATLS, long, first)
        for figure, condition, lifetime in plan:
            kind = FILES if condition == FILES else FEDERATLS
            windows, swapped = await _segment(spawn, cloud, client, kind, lifetime, settings)
            key = f"{figure}/{condition}"
            for name, window in windows.items():
                collected.setdefault(key, {}).setdefault(name, []).append(window)
            if figure == "renewal":
                renewals[condition] += swapped
            print(
                f"  {key:22} "
                + "  ".join(
                    f"{n}: {len(w.latencies) / w.seconds:7.1f} req/s, {len(w.failures)} failed"
                    for n, w in windows.items()
                )
                + (f"  (renewals {swapped})" if figure == "renewal" else ""),
                flush=True,
            )
    pooled = {key: {n: _pool(ws) for n, ws in by.items()} for key, by in collected.items()}
    ratios: dict[str, dict[str, float]] = {}
    for name in WINDOWS:
        ours, files = pooled["throughput/federatls"][name], pooled["throughput/files"][name]
        steady, churn = pooled["renewal/steady"][name], pooled["renewal/churn"][name]
        ratios[name] = {
            "requests_per_s federatls/files": ours["requests_per_s"] / files["requests_per_s"],
            "server_cpu_per_request federatls/files": ours["server_cpu_ms_per_request"]
            / files["server_cpu_ms_per_request"],
            "p99 federatls/files": ours["p99_ms"] / files["p99_ms"],
            "p99 churn/steady": churn["p99_ms"] / steady["p99_ms"],
            "requests_per_s churn/steady": churn["requests_per_s"] / steady["requests_per_s"],
        }
    return {"pooled": pooled, "ratios": ratios, "renewals": renewals}


def _print(report: dict[str, Any]) -> None:
    print(
        f"\n{'segment':22} {'window':15} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'failed':>6} {'srv ms/req':>10}"
    )
    for key, by in report["pooled"].items():
        for name, row in by.items():
            print(
                f"{key:22} {name:15} {row['requests_per_s']:8.1f} {row['p50_ms']:7.2f} "
                f"{row['p99_ms']:7.2f} {row['failed']:6d} {row['server_cpu_ms_per_request']:10.3f}"
            )
            for sample in row["failure_samples"]:
                print(f"    failed: {sample}")
    print(f"\nrenewals swapped in by the server during its segments: {report['renewals']}")
    for name, ratios in report["ratios"].items():
        print(f"\n{name}:")
        for what, value in ratios.items():
            print(f"  {what:42} {value:6.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per window")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    parser.add_argument("--rounds", type=int, default=2, help="segments per condition (ABBA)")
    parser.add_argument("--loops", type=int, default=8, help="concurrent request loops")
    parser.add_argument("--lifetime", type=float, default=4.0, help="churn certificates, s")
    parser.add_argument("--json", type=Path, help="where to write the results")
    args = parser.parse_args(argv)
    settings = Settings(args.duration, args.warmup, args.rounds, args.loops, args.lifetime)
    started = datetime.now(UTC)
    print(f"hypercorn_calls: {settings}", flush=True)
    report = anyio.run(_run, settings)
    _print(report)
    write_results(
        "hypercorn_calls",
        {"settings": asdict(settings), "started": started.isoformat(), **report},
        started,
        args.json,
    )
    failed = sum(row["failed"] for by in report["pooled"].values() for row in by.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
