"""Unary gRPC calls per second through federatls's client channels against gRPC configured
from PEM files by hand, in one run; and the p99 of calls while the client renews every ~2 s
against steady state.

What is measured
----------------
Two federated federatls CAs run in this process (``federatls.testing.federated_pair``,
certificates of a few seconds allowed). Four sync gRPC servers in a process of their own
(its own GIL), all with one identity from "cloud" (``server.cloud.internal``, IP SAN 127.0.0.1),
client certificates required, answering ``/b/Echo`` (unary, bytes echoed) from a pool of 8
threads: one configured by hand (``grpc.ssl_server_credentials`` from PEM bytes), serving
the baseline; the same whose handler authorises its client by hand (the least a handler
can do: a suffix of the names in ``context.peer_identities()``); one with
``federatls.integrations.grpc.server_credentials`` and its ``Interceptor``
(``allow_names("*.k8s.internal")``), serving federatls's channels; and one
with ``server_credentials`` alone (what the hand-configured server does: the chain checked
in the handshake, no per-call check of name rules or authoriser). Two ``grpc.aio`` servers
in a third process, answering from a coroutine on one event loop: one configured by hand
from PEM bytes, one with ``server_credentials`` and ``AioInterceptor`` (the same
authoriser). The servers do not renew (the churn is the client's).

The client, enrolled with "kubernetes" (``client.k8s.internal``), runs ``--concurrency``
(16) ``grpc.aio`` tasks on one event loop, each sending its next 32-byte call as soon as the
last is answered, through one of:

* ``pem``: ``grpc.aio.secure_channel`` with ``ssl_channel_credentials`` read from PEM files
  the bench writes to a 0700 temporary directory (the key encrypted with a password, then
  decrypted when loaded, as a hand-written client would; removed at the end): the baseline;
* ``native``: ``federatls.integrations.grpc.aio.secure_channel(identity, target)``: gRPC's
  own TLS from the identity, every call counted for the channel's renewal;
* ``bridged``: the same with ``authoriser=allow_names("server.cloud.internal")``: gRPC's
  plaintext HTTP/2 over a Unix socket to the in-process TLS bridge;
* ``pem@checked``: the baseline's channel calling the server that authorises by hand: what
  checking each call costs gRPC without federatls;
* ``native@pem``: the ``native`` channel calling the server configured by hand, which
  separates the channel's cost from the server side's (credentials and interceptor);
* ``native@creds``: the ``native`` channel calling the server with ``server_credentials``
  alone: federatls configured as the baseline is (the interceptor's per-call check is what
  ``native`` adds to it);
* ``pem@aio``: the baseline's channel calling the ``grpc.aio`` server configured by hand:
  the baseline of the next one (run whenever it is);
* ``native@aio-federatls``: the ``native`` channel calling the ``grpc.aio`` server with
  federatls's credentials and ``AioInterceptor``.

Segments of ``--duration`` seconds (2) after ``--warmup`` (1), in rounds whose order is
reversed every other round (ABC CBA ..., so a linear drift in outside load cancels out),
``--rounds`` (4) rounds; ``--channels`` runs some of them only (the baseline always).
Steady segments use a 10-minute certificate. Churn segments
(``native`` and ``bridged`` only) use a ``RenewingIdentity`` of ``--lifetime`` (4 s)
certificates, so the client renews about every 2.7 s, each renewal moving new calls to a
new gRPC channel (a new connection and handshake) and closing the old one once idle.

Figures: calls per second (answered calls in the windows / their time), p50 and p99
latency, failed calls (must be 0), renewals during churn; CPU per call of the server process
and of the client process (all threads, from /proc, over the same windows: steadier than
calls/s when something else loads the machine); the ratios native / pem and bridged / pem
for calls/s and CPU per call (``native@aio-federatls`` against ``pem@aio``), and churn /
steady for p99; and round by round, each variant's calls/s against its baseline's of the
same round (the median, lowest and highest: slow changes in the machine's load cancel
within a round). A default run takes about 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent import futures
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography.hazmat.primitives import serialization

import federatls
from federatls import Identity, RenewingIdentity, allow_names
from federatls._x509 import certs_to_pem
from federatls.integrations.grpc import aio as fgrpc_aio
from federatls.testing import TestCA, federated_pair
from sign_throughput import process_cpu_seconds

SHORT = {"minTLSCertDuration": "1s", "defaultTLSCertDuration": "4s", "maxTLSCertDuration": "1h"}
LONG = timedelta(minutes=10)
PAYLOAD = b"x" * 32
METHOD = "/b/Echo"


# The servers, in a process of their own ---------------------------------------------------------
@dataclass(frozen=True)
class ServerMaterial:
    """The server identity's parts as PEM (the key in memory, through a pipe)."""

    chain: bytes
    key: bytes
    own_roots: bytes
    federated_roots: bytes


def _handler(checked: bool = False) -> Any:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def checked_echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        # Authorising clients by hand, the least a handler can do: gRPC's verified names of
        # the client (its certificate's SANs), without a look at the issuer or the roots.
        if not any(name.endswith(b".k8s.internal") for name in context.peer_identities() or ()):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not a kubernetes workload")
        return request

    behaviour = checked_echo if checked else echo
    return grpc.method_handlers_generic_handler(
        "b", {"Echo": grpc.unary_unary_rpc_method_handler(behaviour)}
    )


def _pem_credentials(material: ServerMaterial) -> Any:
    """The hand-configured servers' credentials: PEM bytes, client certificates required."""
    return grpc.ssl_server_credentials(
        [(material.key, material.chain)],
        root_certificates=material.own_roots + material.federated_roots,
        require_client_auth=True,
    )


def _identity(material: ServerMaterial) -> Identity:
    """The federatls servers' identity, rebuilt from the material."""
    from federatls import TrustBundle
    from federatls._keys import PrivateKey
    from federatls._x509 import load_pem_certificates

    key = serialization.load_pem_private_key(material.key, None)
    assert isinstance(key, PrivateKey)  # what federatls enrols: EC, Ed25519 or RSA
    trust = TrustBundle.from_ca(
        load_pem_certificates(material.own_roots), load_pem_certificates(material.federated_roots)
    )
    chain = load_pem_certificates(material.chain)
    return Identity.from_parts(chain, key, trust, "https://127.0.0.1:1")


def serve(conn: Connection, material: ServerMaterial) -> None:
    """Four gRPC servers from the same identity: one configured by hand from PEM bytes, the
    same with its handler authorising clients by hand, one with federatls's
    ``server_credentials`` and ``Interceptor``, one with the credentials alone. Sends their
    ports, runs until told to stop."""
    from federatls.integrations import grpc as fgrpc

    pem_server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[_handler()])
    creds = _pem_credentials(material)
    pem_port = pem_server.add_secure_port("127.0.0.1:0", creds)
    checked_server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[_handler(True)])
    checked_port = checked_server.add_secure_port("127.0.0.1:0", creds)
    identity = _identity(material)
    ours = grpc.server(
        futures.ThreadPoolExecutor(8),
        handlers=[_handler()],
        interceptors=[fgrpc.Interceptor(identity, authoriser=allow_names("*.k8s.internal"))],
    )
    our_port = ours.add_secure_port("127.0.0.1:0", fgrpc.server_credentials(identity))
    creds_only = grpc.server(futures.ThreadPoolExecutor(8), handlers=[_handler()])
    creds_port = creds_only.add_secure_port("127.0.0.1:0", fgrpc.server_credentials(identity))
    servers = [pem_server, checked_server, ours, creds_only]
    for server in servers:
        server.start()
    conn.send((pem_port, checked_port, our_port, creds_port))
    conn.recv()
    for server in servers:
        server.stop(None)


def serve_aio(conn: Connection, material: ServerMaterial) -> None:
    """Two ``grpc.aio`` servers from the same identity, in a process of their own: one
    configured by hand from PEM bytes, one with federatls's ``server_credentials`` and
    ``AioInterceptor``; both answer from coroutines on one event loop. Sends their ports,
    runs until told to stop."""
    asyncio.run(_serve_aio(conn, material))


async def _serve_aio(conn: Connection, material: ServerMaterial) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    handlers = [
        grpc.method_handlers_generic_handler(
            "b", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
    ]
    identity = _identity(material)
    pem_server = grpc.aio.server(handlers=handlers)
    pem_port = pem_server.add_secure_port("127.0.0.1:0", _pem_credentials(material))
    ours = grpc.aio.server(
        handlers=handlers,
        interceptors=[fgrpc_aio.Interceptor(identity, authoriser=allow_names("*.k8s.internal"))],
    )
    our_port = ours.add_secure_port("127.0.0.1:0", fgrpc_aio.server_credentials(identity))
    for server in (pem_server, ours):
        await server.start()
    conn.send((pem_port, our_port))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    for server in (pem_server, ours):
        await server.stop(None)


# The client ---------------------------------------------------------------------------------------
@dataclass
class Segment:
    channel: str
    condition: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    renewals: int = 0
    server_cpu: float = 0.0  # seconds, over the window
    client_cpu: float = 0.0
    round: int = 0


async def load(
    channel: Any, concurrency: int, warmup: float, duration: float, server_pid: int
) -> Segment:
    """``concurrency`` tasks calling back to back; latencies of the calls that start in the
    window after ``warmup``, and the CPU both processes spent in it."""
    method = channel.unary_unary(METHOD)
    seg = Segment("", "", duration)
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration

    async def measure() -> None:
        await asyncio.sleep(start - loop.time())
        server, client = process_cpu_seconds(server_pid), process_cpu_seconds(os.getpid())
        await asyncio.sleep(end - loop.time())
        seg.server_cpu = process_cpu_seconds(server_pid) - server
        seg.client_cpu = process_cpu_seconds(os.getpid()) - client

    async def worker() -> None:
        while (began := loop.time()) < end:
            try:
                answer = await method(PAYLOAD, timeout=10)
                if answer != PAYLOAD:
                    raise ValueError(f"wrong answer {answer[:16]!r}")
            except Exception as exc:
                if began >= start:
                    seg.failures.append(repr(exc)[:200])
                continue
            if began >= start:
                seg.latencies.append(loop.time() - began)

    await asyncio.gather(measure(), *(worker() for _ in range(concurrency)))
    return seg


def pem_channel(directory: Path, target: str) -> Any:
    """The baseline: credentials read from PEM files, the key decrypted with its password."""
    password = (directory / "password").read_bytes()
    key = serialization.load_pem_private_key((directory / "key.pem").read_bytes(), password)
    plain = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    creds = grpc.ssl_channel_credentials(
        root_certificates=(directory / "roots.pem").read_bytes(),
        private_key=plain,
        certificate_chain=(directory / "chain.pem").read_bytes(),
    )
    return grpc.aio.secure_channel(target, creds)


def write_pem_files(identity: Identity, directory: Path) -> None:
    password = os.urandom(16).hex().encode()
    (directory / "password").write_bytes(password)
    (directory / "key.pem").write_bytes(identity.export_private_key(password=password))
    (directory / "chain.pem").write_text(identity.chain_pem)
    (directory / "roots.pem").write_text(identity.trust.pem)


async def run_segment(
    name: str,
    condition: str,
    kubernetes: TestCA,
    target: str,
    files: Path,
    args: argparse.Namespace,
    server_pid: int,
) -> Segment:
    server_check = allow_names("server.cloud.internal")
    steady = await federatls.bootstrap(
        kubernetes.token("client.k8s.internal", sans=["client.k8s.internal"]), lifetime=LONG
    )
    if name.startswith("pem"):
        channel = pem_channel(files, target)
        seg = await load(channel, args.concurrency, args.warmup, args.duration, server_pid)
        await channel.close()
    elif condition == "steady":
        authoriser = server_check if name == "bridged" else None
        async with fgrpc_aio.secure_channel(steady, target, authoriser=authoriser) as channel:
            seg = await load(channel, args.concurrency, args.warmup, args.duration, server_pid)
    else:
        first = await federatls.bootstrap(
            kubernetes.token("client.k8s.internal", sans=["client.k8s.internal"]),
            lifetime=timedelta(seconds=args.lifetime),
        )
        live = RenewingIdentity(first)
        task = asyncio.get_running_loop().create_task(live.run())
        await asyncio.sleep(0)
        before = live.renewals
        authoriser = server_check if name == "bridged" else None
        async with fgrpc_aio.secure_channel(live, target, authoriser=authoriser) as channel:
            seg = await load(channel, args.concurrency, args.warmup, args.duration, server_pid)
        seg.renewals = live.renewals - before
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    seg.channel, seg.condition = name, condition
    return seg


def summary(segments: list[Segment]) -> dict[str, Any]:
    lat = sorted(x for s in segments for x in s.latencies)
    seconds = sum(s.seconds for s in segments)
    return {
        "calls_per_s": len(lat) / seconds,
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else None,
        "calls": len(lat),
        "failed": sum(len(s.failures) for s in segments),
        "failure_samples": [f for s in segments for f in s.failures][:3],
        "renewals": sum(s.renewals for s in segments),
        "server_cpu_us_per_call": 1e6 * sum(s.server_cpu for s in segments) / max(len(lat), 1),
        "client_cpu_us_per_call": 1e6 * sum(s.client_cpu for s in segments) / max(len(lat), 1),
    }


# The segments of a round, in order (reversed every other round).
PLAN = [
    ("pem", "steady"),
    ("native", "steady"),
    ("pem@checked", "steady"),
    ("bridged", "steady"),
    ("native@pem", "steady"),
    ("native@creds", "steady"),
    ("pem@aio", "steady"),
    ("native@aio-federatls", "steady"),
    ("native", "churn"),
    ("bridged", "churn"),
]
CHANNELS = sorted({name for name, _ in PLAN})
# The variants set against each baseline but "pem" (the sync servers' baseline).
BASELINES = {"native@aio-federatls": "pem@aio"}

# Ratio name -> (steady variant, figure) set against the baseline's figure.
RATIOS = {
    "native/pem calls/s": ("native", "calls_per_s"),
    "bridged/pem calls/s": ("bridged", "calls_per_s"),
    "native channel only/pem calls/s": ("native@pem", "calls_per_s"),
    "native, credentials only/pem calls/s": ("native@creds", "calls_per_s"),
    "credentials only/pem server CPU per call": ("native@creds", "server_cpu_us_per_call"),
    "native/pem server CPU per call": ("native", "server_cpu_us_per_call"),
    "native/pem client CPU per call": ("native", "client_cpu_us_per_call"),
    "bridged/pem client CPU per call": ("bridged", "client_cpu_us_per_call"),
    "native channel only/pem client CPU per call": ("native@pem", "client_cpu_us_per_call"),
    "checked by hand/pem calls/s": ("pem@checked", "calls_per_s"),
}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with federated_pair("cloud", "kubernetes", claims=SHORT, backdate="1s") as (cloud, k8s):
        server = cloud.identity(
            "server.cloud.internal", sans=["server.cloud.internal", "127.0.0.1"], lifetime=LONG
        )
        own = server.own_roots
        material = ServerMaterial(
            chain=server.chain_pem.encode(),
            key=server.export_private_key(password=None),  # to the server process, in memory
            own_roots=own.pem.encode(),
            federated_roots=certs_to_pem(
                r.certificate for r in server.trust if r not in own.roots
            ).encode(),
        )
        spawn = multiprocessing.get_context("spawn")
        pipes = [spawn.Pipe() for _ in range(2)]
        procs = [
            spawn.Process(target=target, args=(there, material))
            for target, (_, there) in zip((serve, serve_aio), pipes, strict=True)
        ]
        for proc in procs:
            proc.start()
        files = Path(tempfile.mkdtemp(prefix="grpc-bench-"))  # 0700
        try:
            pem_port, checked_port, our_port, creds_port = pipes[0][0].recv()
            aio_port, aio_our_port = pipes[1][0].recv()
            sync_pid, aio_pid = (proc.pid for proc in procs)
            assert sync_pid is not None  # started
            assert aio_pid is not None
            # Each server's address, and the process whose CPU it spends.
            targets = {
                "pem": (f"127.0.0.1:{pem_port}", sync_pid),
                "checked": (f"127.0.0.1:{checked_port}", sync_pid),
                "federatls": (f"127.0.0.1:{our_port}", sync_pid),
                "creds": (f"127.0.0.1:{creds_port}", sync_pid),
                "aio": (f"127.0.0.1:{aio_port}", aio_pid),
                "aio-federatls": (f"127.0.0.1:{aio_our_port}", aio_pid),
            }
            steady_client = await federatls.bootstrap(
                k8s.token("client.k8s.internal", sans=["client.k8s.internal"]), lifetime=LONG
            )
            write_pem_files(steady_client, files)
            wanted = {"pem", *args.channels}
            wanted |= {BASELINES[name] for name in wanted if name in BASELINES}
            plan = [p for p in PLAN if p[0] in wanted]
            segments: list[Segment] = []
            for round_ in range(args.rounds):
                order = plan if round_ % 2 == 0 else plan[::-1]
                for name, condition in order:
                    where = name.partition("@")[2] or (
                        "federatls" if name in ("native", "bridged") else name
                    )
                    target, server_pid = targets[where]
                    seg = await run_segment(name, condition, k8s, target, files, args, server_pid)
                    seg.round = round_
                    segments.append(seg)
                    print(
                        f"round {round_} {name:10} {condition:6} "
                        f"{len(seg.latencies) / seg.seconds:8.0f} calls/s "
                        f"failed {len(seg.failures)} renewals {seg.renewals} CPU/call server "
                        f"{1e6 * seg.server_cpu / max(len(seg.latencies), 1):4.0f} us",
                        flush=True,
                    )
        finally:
            for (here, _), proc in zip(pipes, procs, strict=True):
                here.send("stop")
                proc.join(10)
            shutil.rmtree(files, ignore_errors=True)
    results = {
        f"{n}-{c}": summary([s for s in segments if (s.channel, s.condition) == (n, c)])
        for n, c in plan
    }
    pem = results["pem-steady"]

    def per_call(variant: str, what: str) -> float:
        return float(results[f"{variant}-steady"][what] / pem[what])

    ratios = {
        name: per_call(variant, what)
        for name, (variant, what) in RATIOS.items()
        if f"{variant}-steady" in results
    }
    if "native-steady" in results and "pem@checked-steady" in results:
        ratios["native/checked by hand calls/s"] = (
            results["native-steady"]["calls_per_s"] / results["pem@checked-steady"]["calls_per_s"]
        )
    for variant, baseline in BASELINES.items():
        if f"{variant}-steady" in results:
            ours, theirs = results[f"{variant}-steady"], results[f"{baseline}-steady"]
            for what, label in (
                ("calls_per_s", "calls/s"),
                ("server_cpu_us_per_call", "server CPU per call"),
            ):
                ratios[f"{variant}/{baseline} {label}"] = ours[what] / theirs[what]
    for variant in ("native", "bridged"):
        if f"{variant}-churn" in results:
            ratios[f"{variant} p99 churn/steady"] = (
                results[f"{variant}-churn"]["p99_ms"] / results[f"{variant}-steady"]["p99_ms"]
            )
    return {
        "args": vars(args),
        "results": results,
        "ratios": ratios,
        "paired": paired(
            segments,
            [
                (n, BASELINES.get(n, "pem"))
                for n, c in plan
                if c == "steady" and n != "pem" and n not in BASELINES.values()
            ]
            + [("native", "pem@checked")] * ("pem@checked" in args.channels),
        ),
    }


def paired(segments: list[Segment], pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Each (variant, baseline) pair's calls/s set against each other in the same round (the
    two segments minutes apart at most, so slow changes in outside load cancel): the median
    of the rounds' ratios, and the lowest and highest."""
    rate = {
        (s.round, s.channel): len(s.latencies) / s.seconds
        for s in segments
        if s.condition == "steady"
    }
    out = {}
    for variant, baseline in pairs:
        each = sorted(
            rate[r, variant] / rate[r, baseline]
            for r, name in rate
            if name == variant and rate.get((r, baseline))
        )
        if each:
            out[f"{variant}/{baseline} calls/s"] = {
                "median": statistics.median(each),
                "lowest": each[0],
                "highest": each[-1],
                "rounds": len(each),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lifetime", type=float, default=4.0)
    parser.add_argument(
        "--channels",
        type=lambda text: text.split(","),
        default=CHANNELS,
        help=f"comma-separated, of {','.join(CHANNELS)} (pem is always run): all by default",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/grpc_calls.json"))
    args = parser.parse_args()
    unknown = sorted(set(args.channels) - set(CHANNELS))
    if unknown:
        parser.error(f"unknown channels {','.join(unknown)}: choose from {','.join(CHANNELS)}")
    began = time.monotonic()
    out = asyncio.run(bench(args))
    out["wall_s"] = time.monotonic() - began
    for name, figures in out["results"].items():
        print(
            f"{name:15} {figures['calls_per_s']:8.0f} calls/s  p50 {figures['p50_ms']:6.2f} ms"
            f"  p99 {figures['p99_ms']:6.2f} ms  failed {figures['failed']}"
            f"  renewals {figures['renewals']}  CPU/call server "
            f"{figures['server_cpu_us_per_call']:5.0f} us client "
            f"{figures['client_cpu_us_per_call']:5.0f} us"
        )
    for name, ratio in out["ratios"].items():
        print(f"{name:44} {ratio:5.3f}x")
    for name, spread in out["paired"].items():
        print(
            f"{name + ', round by round':44} median {spread['median']:5.3f}x "
            f"(lowest {spread['lowest']:5.3f}x, highest {spread['highest']:5.3f}x, "
            f"{spread['rounds']} rounds)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
