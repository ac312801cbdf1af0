"""Root rotation under live traffic, shared by the rotation tests: CAs that a test drives
alike (the federatls CA and the real step-ca: ca.json edited, then reloaded, SIGHUP for
step-ca), workloads that renew every couple of seconds, a minimal HTTP server that records
who called it, and clients that keep calling it and count what failed.

What a test asserts stays in the test; nothing here decides that a rotation went well.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import pytest
from anyio.abc import TaskGroup
from cryptography import x509

import federatls
from federatls import Identity, PeerInfo, RenewalPolicy, RenewingIdentity
from federatls._client import CAClient
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.integrations import streams
from federatls.testing import running_ca

from harness import PASSWORD, SHORT, make_pki, stepca_process

LONG = timedelta(minutes=10)  # identities renewed by hand, or never
SERVER_NAMES = ["server.cloud.internal", "127.0.0.1", "localhost"]
Source = Identity | RenewingIdentity


# CAs under test: the federatls CA and the real step-ca, driven alike -------------------------
def _served_serial(url: str) -> int:
    """The serial of the TLS certificate the CA serves right now (no verification)."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    pem = ssl.get_server_certificate((parts.hostname, parts.port), timeout=5)
    return load_pem_certificate(pem.encode()).serial_number


@dataclass
class CA:
    """A running CA whose ca.json a test edits: its files, its URL, tokens minted now, and a
    reload that returns once the CA serves the new configuration."""

    name: str
    directory: Path
    password: bytes
    root_path: Path
    url: str
    mint: Callable[[str, Sequence[str]], str]
    signal_reload: Callable[[], None]  # TestCA.reload, or SIGHUP to step-ca

    @property
    def config(self) -> Path:
        return self.directory / "config" / "ca.json"

    @property
    def root(self) -> x509.Certificate:
        return load_pem_certificate(self.root_path.read_bytes())

    async def reload(self) -> None:
        """Apply ca.json; wait until the CA serves with it (both CAs issue themselves a new
        TLS certificate when they reload)."""
        before = await anyio.to_thread.run_sync(_served_serial, self.url)
        await anyio.to_thread.run_sync(self.signal_reload)
        served = [before]

        def reloaded() -> bool:
            try:
                served.append(_served_serial(self.url))
            except OSError:
                return False
            return served[-1] != before

        with anyio.fail_after(20):
            while True:
                if await anyio.to_thread.run_sync(reloaded):
                    return
                await anyio.sleep(0.1)

    def edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Change ca.json as an operator would (the CA sees it at its next reload)."""
        data = json.loads(self.config.read_text())
        change(data)
        self.config.write_text(json.dumps(data, indent=2))

    async def federate(self, *others: CA) -> None:
        """List ``others``' roots in ``federatedRoots`` and reload."""
        self.edit(lambda d: d.__setitem__("federatedRoots", [str(o.root_path) for o in others]))
        await self.reload()

    async def follow(self, peer: CA, names: Sequence[str], refresh: str = "1s") -> None:
        """Follow ``peer`` by URL (a federation peer pinned to the fingerprint of its root
        now, allowed ``names``, fetched every ``refresh``) and reload."""
        block = {
            "refresh": refresh,
            "peers": [
                {
                    "name": peer.name,
                    "url": peer.url,
                    "fingerprint": fingerprint(peer.root),
                    "names": list(names),
                }
            ],
        }
        self.edit(lambda d: d.__setitem__("federation", block))
        await self.reload()

    async def federation(self) -> frozenset[str]:
        """The fingerprints of the roots the CA's ``/federation`` answers now."""
        async with CAClient(self.url, [self.root]) as client:
            return frozenset(map(fingerprint, await client.federation()))


MakeCA = Callable[[str], contextlib.AbstractAsyncContextManager[CA]]


@contextlib.asynccontextmanager
async def federatls_ca(name: str) -> AsyncIterator[CA]:
    """A federatls CA (in this process, on a thread of its own) with 3-second certificates."""
    with running_ca(name, claims=SHORT, backdate="1s") as ca:
        yield CA(
            name,
            ca.directory,
            ca.password,
            ca.root_path,
            ca.url,
            lambda subject, sans: ca.token(subject, sans=sans),
            ca.reload,
        )


def _stepca_maker(binary: str, base: Path) -> MakeCA:
    @contextlib.asynccontextmanager
    async def make(name: str) -> AsyncIterator[CA]:
        pki = make_pki(base, name)
        pki.set_claims(**SHORT)
        pki.edit(lambda data: data["authority"].__setitem__("backdate", "1s"))
        with stepca_process(binary, pki) as proc:
            yield CA(
                name,
                pki.directory,
                PASSWORD,
                pki.root_path,
                pki.url,
                lambda subject, sans: pki.token(subject, sans=sans),
                lambda: proc.send_signal(signal.SIGHUP),
            )

    return make


def ca_maker(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> MakeCA:
    """Starts a CA with 3-second certificates: ``kind`` "federatls", or "step-ca" (the real
    one, from the ``stepca_bin`` fixture)."""
    if kind == "federatls":
        return federatls_ca
    return _stepca_maker(request.getfixturevalue("stepca_bin"), tmp_path)


async def enrol(
    ca: CA, subject: str, sans: list[str] | None = None, lifetime: timedelta | None = None
) -> Identity:
    return await federatls.bootstrap(ca.mint(subject, sans or [subject]), lifetime=lifetime)


async def renewing(
    tg: TaskGroup, identity: Identity, policy: RenewalPolicy | None = None
) -> RenewingIdentity:
    live = RenewingIdentity(identity, policy=policy)
    await tg.start(live.run)
    return live


async def renewals(*lives: RenewingIdentity, count: int = 2, timeout: float = 20) -> None:
    """Wait until each of ``lives`` has renewed ``count`` more times (so at least one whole
    refresh began after whatever the caller just changed)."""
    targets = [(live, live.renewals + count) for live in lives]
    with anyio.fail_after(timeout):
        for live, target in targets:
            while live.renewals < target:
                assert live.stopped is None, live.stopped
                await live.wait_for_update()


# A server and clients that say what they saw --------------------------------------------------
@dataclass
class Seen:
    """What the server saw: each connection's client (common name, serial, anchor) and the
    requests it answered."""

    clients: list[PeerInfo] = field(default_factory=list)
    handled: int = 0

    def of(self, common_name: str) -> list[PeerInfo]:
        return [p for p in self.clients if p.common_name == common_name]


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def http_server(source: Source, seen: Seen) -> AsyncIterator[int]:
    """A minimal keep-alive HTTP/1.1 server on ``streams.start_server`` (127.0.0.1:0)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.clients.append(source.peer(writer))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.handled += 1
                close = b"connection: close" in head.lower()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n%s\r\nok"
                    % (b"Connection: close\r\n" if close else b"")
                )
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return
        finally:
            await close_quietly(writer)

    server = await streams.start_server(source, handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Send one request; everything that comes back (b"" if the server cut us off)."""
    data = b""
    try:
        writer.write(REQUEST)
        await writer.drain()
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return data


async def attempt(client: Source | ssl.SSLContext, port: int) -> str:
    """One request: "served", "cut-off" (the server refused us after the handshake), or
    "server-unknown" (we refused the server's certificate)."""
    try:
        if isinstance(client, ssl.SSLContext):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
            )
        else:
            reader, writer = await streams.open_connection(client, "127.0.0.1", port)
    except ssl.SSLCertVerificationError:
        return "server-unknown"
    try:
        data = await exchange(reader, writer)
    finally:
        await close_quietly(writer)
    if data.startswith(b"HTTP/1.1 200 OK"):
        return "served"
    assert data == b"", data
    return "cut-off"


async def call(client: Source, port: int) -> PeerInfo:
    """One request on a new connection (so a new handshake) to the server on ``port``,
    answered 200; the server as the client saw it."""
    reader, writer = await streams.open_connection(client, "127.0.0.1", port)
    try:
        peer = client.peer(writer)
        answer = await exchange(reader, writer)
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    finally:
        await close_quietly(writer)
    return peer


@dataclass
class Traffic:
    """A client's continuous requests: anchors of the servers it reached, successes, failures."""

    server_anchors: list[str] = field(default_factory=list)
    ok: int = 0
    failures: list[BaseException] = field(default_factory=list)


Get = Callable[[], Awaitable[PeerInfo]]


async def drive(get: Get, traffic: Traffic, stop: anyio.Event) -> None:
    while not stop.is_set():
        try:
            server = await get()
        except Exception as exc:
            traffic.failures.append(exc)
        else:
            traffic.ok += 1
            traffic.server_anchors.append(server.anchor.fingerprint if server.anchor else "")
        await anyio.sleep(0.05)
