"""Live swap everywhere the SDK hands out a context: asyncio servers, aiohttp servers, uvicorn;
httpx (sync and async) and aiohttp clients. New handshakes use the new snapshot; idle pooled
connections are recycled after a swap; TLS 1.3 session tickets cannot resume a session on a
root that was dropped.

Two real federatls CAs, "cloud" and "kubernetes", federated both ways and issuing certificates
of three seconds (renewed about every two), run in this process. Servers are enrolled with
cloud, clients with kubernetes; everything talks real TLS on 127.0.0.1 with port 0. Every
server speaks HTTP/1.1 (the asyncio ones a minimal HTTP of their own), so every client can
talk to every server.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

import aiohttp
import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import pytest
import uvicorn
from aiohttp import web
from anyio.abc import TaskGroup
from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol

import federatls
from federatls import (
    Authoriser,
    Identity,
    PeerInfo,
    PeerNotAuthorisedError,
    RenewingIdentity,
    allow_names,
)
from federatls._sslkeys import load_cert_chain_in_memory
from federatls.integrations import aiohttp as faiohttp
from federatls.integrations import httpx as fhttpx
from federatls.integrations import streams
from federatls.integrations import uvicorn as fuvicorn
from federatls.testing import TestCA, federated_pair, running_ca

from harness import SHORT, wait_until

pytestmark = pytest.mark.anyio

LONG = timedelta(minutes=10)  # for identities a test renews by hand, or never
SERVER_NAMES = ["server.cloud.internal", "127.0.0.1", "localhost"]
Source = Identity | RenewingIdentity


# CAs and identities ---------------------------------------------------------------------------
@pytest.fixture
def pair() -> Iterator[tuple[TestCA, TestCA]]:
    """cloud and kubernetes, federated both ways, issuing 3-second certificates."""
    with federated_pair("cloud", "kubernetes", claims=SHORT, backdate="1s") as both:
        yield both


async def enrol(
    ca: TestCA, subject: str, sans: list[str] | None = None, lifetime: timedelta | None = None
) -> Identity:
    """A new identity from ``ca`` (the CA's default 3-second lifetime unless ``lifetime``)."""
    return await federatls.bootstrap(ca.token(subject, sans=sans or [subject]), lifetime=lifetime)


async def renewing(tg: TaskGroup, identity: Identity) -> RenewingIdentity:
    """``identity`` kept renewed by a task in ``tg``."""
    live = RenewingIdentity(identity)
    await tg.start(live.run)
    return live


def fingerprints(identity: Identity) -> set[str]:
    return {root.fingerprint for root in identity.trust}


# Servers: each records what it saw -----------------------------------------------------------
@dataclass
class Conn:
    """One connection the application was given: its number, the client's serial, and
    whether it has ended."""

    number: int
    serial: int
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Seen:
    """What a server saw: client serials by common name, the connections the application was
    given, and the requests it answered."""

    serials: dict[str, set[int]] = field(default_factory=dict)
    connections: list[Conn] = field(default_factory=list)
    handled: int = 0

    def peer(self, peer: PeerInfo) -> None:
        self.serials.setdefault(peer.common_name, set()).add(peer.serial)

    def connection(self, peer: PeerInfo) -> Conn:
        self.peer(peer)
        conn = Conn(len(self.connections) + 1, peer.serial)
        self.connections.append(conn)
        return conn


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


def _http_on_streams(
    source: Source, seen: Seen
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A minimal HTTP/1.1 server over asyncio streams with keep-alive: each answer's body is
    the number of the connection it came over."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = seen.connection(source.peer(writer))
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    return
                seen.handled += 1
                close = b"connection: close" in head.lower()
                body = str(conn.number).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (len(body), b"Connection: close\r\n" if close else b"", body)
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            conn.closed.set()
            await _close(writer)

    return handle


ServerFactory = Callable[
    [Source, Seen, Authoriser | None], contextlib.AbstractAsyncContextManager[int]
]


@contextlib.asynccontextmanager
async def streams_server(
    source: Source, seen: Seen, authoriser: Authoriser | None
) -> AsyncIterator[int]:
    """``streams.start_server`` on 127.0.0.1:0; yields the port."""
    server = await streams.start_server(
        source, _http_on_streams(source, seen), "127.0.0.1", 0, authoriser=authoriser
    )
    async with server:
        yield server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def asyncio_server(
    source: Source, seen: Seen, authoriser: Authoriser | None
) -> AsyncIterator[int]:
    """Plain ``asyncio.start_server(ssl=source.server_context())``: no authoriser of its own."""
    assert authoriser is None, "a plain asyncio server has no authoriser"
    server = await asyncio.start_server(
        _http_on_streams(source, seen), "127.0.0.1", 0, ssl=source.server_context()
    )
    async with server:
        yield server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def aiohttp_server(
    source: Source, seen: Seen, authoriser: Authoriser | None
) -> AsyncIterator[int]:
    """An aiohttp app behind ``federatls.integrations.aiohttp.Site`` on 127.0.0.1:0."""

    async def hello(request: web.Request) -> web.Response:
        seen.peer(source.peer(request))
        seen.handled += 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = faiohttp.Site(runner, source, "127.0.0.1", 0, authoriser=authoriser)
        await site.start()
        yield site.port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def uvicorn_server(
    source: Source, seen: Seen, authoriser: Authoriser | None, *, alpn: list[str] | None = None
) -> AsyncIterator[int]:
    """An ASGI app served by ``uvicorn.Server`` with ``federatls.integrations.uvicorn.config``
    on 127.0.0.1:0; each connection's client is recorded by the HTTP protocol when uvicorn
    gets the connection. ``alpn``: the protocol class declares these ALPN protocols, as
    uvicorn's HTTP/2 protocols do."""

    class Recording(H11Protocol):
        alpn_protocols: ClassVar[list[str] | None] = alpn

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            seen.connection(source.peer(transport))
            super().connection_made(transport)

    async def app(
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        assert scope["type"] == "http"
        seen.handled += 1
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    config = fuvicorn.config(
        app,
        source,
        authoriser=authoriser,
        http=Recording,
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        try:
            await wait_until(lambda: server.started)
            yield server.servers[0].sockets[0].getsockname()[1]
        finally:
            server.should_exit = True


SERVERS: dict[str, ServerFactory] = {
    "streams": streams_server,
    "aiohttp-site": aiohttp_server,
    "uvicorn": uvicorn_server,
    "asyncio": asyncio_server,
}
GATED_SERVERS = ["streams", "aiohttp-site", "uvicorn"]  # those taking an authoriser


# Clients: each does one GET and says which server it talked to ------------------------------
@dataclass(frozen=True)
class Reply:
    status: int
    body: str
    server_serial: int


Get = Callable[[int], Awaitable[Reply]]
ClientFactory = Callable[[Source, Authoriser | None], contextlib.AbstractAsyncContextManager[Get]]
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def _http_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Reply:
    writer.write(REQUEST)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    assert found is not None, head
    body = await asyncio.wait_for(reader.readexactly(int(found[1])), 10)
    return Reply(int(head.split(b" ", 2)[1]), body.decode(), 0)


@contextlib.asynccontextmanager
async def streams_client(source: Source, authoriser: Authoriser | None) -> AsyncIterator[Get]:
    """``streams.open_connection``: a new connection (and handshake) for every request."""

    async def get(port: int) -> Reply:
        reader, writer = await streams.open_connection(
            source, "127.0.0.1", port, authoriser=authoriser
        )
        try:
            serial = source.peer(writer).serial
            reply = await _http_exchange(reader, writer)
        finally:
            await _close(writer)
        return Reply(reply.status, reply.body, serial)

    yield get


@contextlib.asynccontextmanager
async def httpx_async_client(source: Source, authoriser: Authoriser | None) -> AsyncIterator[Get]:
    """``federatls.integrations.httpx.AsyncClient`` (keep-alive pool)."""
    async with fhttpx.AsyncClient(source, authoriser=authoriser) as http:

        async def get(port: int) -> Reply:
            response = await http.get(f"https://127.0.0.1:{port}/")
            return Reply(response.status_code, response.text, source.peer(response).serial)

        yield get


@contextlib.asynccontextmanager
async def httpx_sync_client(source: Source, authoriser: Authoriser | None) -> AsyncIterator[Get]:
    """``federatls.integrations.httpx.Client`` (keep-alive pool), each request made from a
    worker thread."""
    with fhttpx.Client(source, authoriser=authoriser) as http:

        def blocking(port: int) -> Reply:
            response = http.get(f"https://127.0.0.1:{port}/")
            return Reply(response.status_code, response.text, source.peer(response).serial)

        async def get(port: int) -> Reply:
            return await anyio.to_thread.run_sync(blocking, port)

        yield get


@contextlib.asynccontextmanager
async def aiohttp_client(source: Source, authoriser: Authoriser | None) -> AsyncIterator[Get]:
    """``federatls.integrations.aiohttp.client_session`` (keep-alive pool)."""
    async with faiohttp.client_session(source, authoriser=authoriser) as session:

        async def get(port: int) -> Reply:
            async with session.get(f"https://127.0.0.1:{port}/") as response:
                serial = source.peer(response).serial
                return Reply(response.status, await response.text(), serial)

        yield get


CLIENTS: dict[str, ClientFactory] = {
    "streams": streams_client,
    "httpx-async": httpx_async_client,
    "httpx-sync": httpx_sync_client,
    "aiohttp": aiohttp_client,
}
POOLED_CLIENTS = ["httpx-async", "httpx-sync", "aiohttp"]


async def fetch_raw(source: Source, port: int) -> bytes:
    """One request over ``streams.open_connection``: everything that came back, b"" when the
    server cut the connection off (a reset or TLS alert counts as nothing)."""
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
        await _close(writer)
    return data


# 1. Continuous traffic across renewals --------------------------------------------------------
@dataclass
class Traffic:
    """One client's requests: the server serials it saw, how many succeeded, what failed."""

    server_serials: set[int] = field(default_factory=set)
    ok: int = 0
    failures: list[BaseException] = field(default_factory=list)


async def _drive(get: Get, port: int, traffic: Traffic, stop: anyio.Event) -> None:
    while not stop.is_set():
        try:
            reply = await get(port)
        except Exception as exc:
            traffic.failures.append(exc)
        else:
            if reply.status == 200 and reply.body:
                traffic.ok += 1
                traffic.server_serials.add(reply.server_serial)
            else:
                traffic.failures.append(AssertionError(f"bad reply {reply}"))
        await anyio.sleep(0.05)


async def _history(live: RenewingIdentity, serials: set[int]) -> None:
    serials.add(live.current.serial)
    async for identity in live.updates():
        serials.add(identity.serial)


@pytest.mark.parametrize("server", SERVERS)
async def test_live_traffic_follows_renewal(pair: tuple[TestCA, TestCA], server: str) -> None:
    """Every client integration keeps requesting from a live server while both sides renew
    every ~2 s: no request fails, the server sees at least three certificates of each client
    and each client at least three of the server, each one really issued to that peer."""
    cloud, kubernetes = pair
    seen = Seen()
    issued: dict[str, set[int]] = {}
    async with anyio.create_task_group() as tg:
        first = await enrol(cloud, "server.cloud.internal", SERVER_NAMES)
        issued["server.cloud.internal"] = {first.serial}
        server_live = await renewing(tg, first)
        tg.start_soon(_history, server_live, issued["server.cloud.internal"])
        clients: dict[str, RenewingIdentity] = {}
        for name in CLIENTS:
            cn = f"{name}.k8s.internal"
            first = await enrol(kubernetes, cn)
            issued[cn] = {first.serial}
            clients[name] = await renewing(tg, first)
            tg.start_soon(_history, clients[name], issued[cn])
        traffic = {name: Traffic() for name in CLIENTS}
        stop = anyio.Event()

        def enough() -> bool:
            return all(
                len(traffic[n].server_serials) >= 3
                and len(seen.serials.get(f"{n}.k8s.internal", ())) >= 3
                for n in CLIENTS
            )

        async with contextlib.AsyncExitStack() as stack:
            port = await stack.enter_async_context(SERVERS[server](server_live, seen, None))
            async with anyio.create_task_group() as drivers:
                for name, factory in CLIENTS.items():
                    get = await stack.enter_async_context(factory(clients[name], None))
                    drivers.start_soon(_drive, get, port, traffic[name], stop)
                with contextlib.suppress(TimeoutError):
                    await wait_until(enough, timeout=25)
                stop.set()
        tg.cancel_scope.cancel()

    assert server_live.stopped is None
    for name in CLIENTS:
        cn = f"{name}.k8s.internal"
        assert traffic[name].failures == [], (name, traffic[name].failures[:3])
        assert traffic[name].ok > 0
        assert len(traffic[name].server_serials) >= 3, (name, traffic[name])
        assert traffic[name].server_serials <= issued["server.cloud.internal"]
        assert len(seen.serials[cn]) >= 3, (name, seen.serials)
        assert seen.serials[cn] <= issued[cn]
        assert clients[name].renewals >= 2


async def test_without_renewal_one_serial_each(pair: tuple[TestCA, TestCA]) -> None:
    """Twin: with identities that are not renewed, the same traffic shows exactly one
    certificate per peer on both sides (the serial counts above come from renewal)."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    client = await enrol(kubernetes, "streams.k8s.internal", lifetime=LONG)
    traffic = Traffic()
    stop = anyio.Event()
    async with (
        streams_server(server, seen, None) as port,
        streams_client(client, None) as get,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_drive, get, port, traffic, stop)
        await anyio.sleep(1.5)
        stop.set()
    assert traffic.failures == []
    assert traffic.ok >= 5
    assert traffic.server_serials == {server.serial}
    assert seen.serials == {"streams.k8s.internal": {client.serial}}


# 2. Idle pooled connections are recycled after a swap ----------------------------------------
@pytest.mark.parametrize("client", POOLED_CLIENTS)
async def test_pooled_connection_recycled_after_client_renewal(
    pair: tuple[TestCA, TestCA], client: str
) -> None:
    """After the client identity renews, the next request goes over a new connection that
    presents the new certificate, and the idle connection of the old pool is closed."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "pooled.k8s.internal", lifetime=LONG))
    old = live.current.serial
    async with streams_server(server, seen, None) as port, CLIENTS[client](live, None) as get:
        first = await get(port)
        await live.refresh()
        second = await get(port)
        (conn1, conn2) = seen.connections
        await asyncio.wait_for(conn1.closed.wait(), 10)
        assert not conn2.closed.is_set()
    assert live.current.serial != old
    assert (first.body, second.body) == ("1", "2")
    assert (conn1.serial, conn2.serial) == (old, live.current.serial)
    assert seen.handled == 2


@pytest.mark.parametrize("client", POOLED_CLIENTS)
async def test_pooled_connection_kept_without_renewal(
    pair: tuple[TestCA, TestCA], client: str
) -> None:
    """Twin: without a renewal the second request reuses the first connection (keep-alive),
    which stays open."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "pooled.k8s.internal", lifetime=LONG))
    async with streams_server(server, seen, None) as port, CLIENTS[client](live, None) as get:
        first = await get(port)
        await anyio.sleep(0.2)
        second = await get(port)
        (conn1,) = seen.connections
        assert not conn1.closed.is_set()
    assert (first.body, second.body) == ("1", "1")
    assert conn1.serial == live.current.serial
    assert seen.handled == 2


async def test_httpx_async_new_network_stream_after_renewal(pair: tuple[TestCA, TestCA]) -> None:
    """httpx.AsyncClient: the response after a renewal comes over another network stream,
    whose TLS connection presents the renewed certificate; without renewal the stream is the
    same one."""
    cloud, kubernetes = pair
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "pooled.k8s.internal", lifetime=LONG))
    seen = Seen()
    old = live.current.serial
    async with (
        streams_server(server, seen, None) as port,
        fhttpx.AsyncClient(live) as http,
    ):
        url = f"https://127.0.0.1:{port}/"

        def ssl_object(response: httpx.Response) -> ssl.SSLObject:
            found = response.extensions["network_stream"].get_extra_info("ssl_object")
            assert isinstance(found, ssl.SSLObject)
            return found

        first = ssl_object(await http.get(url))
        again = ssl_object(await http.get(url))
        await live.refresh()
        renewed = ssl_object(await http.get(url))
    assert again is first
    assert renewed is not first
    assert [c.serial for c in seen.connections] == [old, live.current.serial]


# 3. Authorisers in every integration ----------------------------------------------------------
@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "refused"])
@pytest.mark.parametrize("server", GATED_SERVERS)
async def test_server_authoriser(pair: tuple[TestCA, TestCA], server: str, allowed: bool) -> None:
    """A server integration with a renewing identity serves a client its authoriser allows;
    a refused client is cut off: the application never sees it and the client gets no data."""
    cloud, kubernetes = pair
    seen = Seen()
    live = RenewingIdentity(await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG))
    client = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    rule = allow_names("*.k8s.internal" if allowed else "*.cloud.internal")
    async with SERVERS[server](live, seen, rule) as port:
        data = await fetch_raw(client, port)
        await anyio.sleep(0.1)  # an application wrongly reached would have run by now
    if allowed:
        assert data.startswith(b"HTTP/1.1 200 ")
        assert seen.handled == 1
        assert seen.serials == {"client.k8s.internal": {client.serial}}
    else:
        assert data == b""
        assert seen.handled == 0
        assert seen.serials == {}
        assert seen.connections == []


@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "refused"])
@pytest.mark.parametrize("client", CLIENTS)
async def test_client_authoriser(pair: tuple[TestCA, TestCA], client: str, allowed: bool) -> None:
    """A client integration with a renewing identity talks to a server its authoriser allows;
    a refused server raises ``PeerNotAuthorisedError`` before the request reaches it."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal", lifetime=LONG))
    rule = allow_names("server.cloud.internal" if allowed else "other.cloud.internal")
    async with streams_server(server, seen, None) as port, CLIENTS[client](live, rule) as get:
        if allowed:
            reply = await get(port)
            assert (reply.status, reply.server_serial) == (200, server.serial)
        else:
            with pytest.raises(PeerNotAuthorisedError, match=r"other\.cloud\.internal") as info:
                await get(port)
            assert isinstance(info.value.peer, PeerInfo)
            assert info.value.peer.serial == server.serial
        await anyio.sleep(0.1)
    assert seen.handled == (1 if allowed else 0)


# 4. Without federation every integration refuses ----------------------------------------------
@pytest.fixture
def outsider(pair: tuple[TestCA, TestCA]) -> Iterator[TestCA]:
    """A third CA trusting cloud and kubernetes, which do not trust it: whatever it issues is
    refused by them, while it would accept them."""
    with running_ca("elsewhere") as ca:
        ca.federate(*pair)
        yield ca


@pytest.mark.parametrize("server", SERVERS)
async def test_server_refuses_client_of_unfederated_ca(
    pair: tuple[TestCA, TestCA], outsider: TestCA, server: str
) -> None:
    """A client of a CA the server's CA does not federate (the client trusts the server) is
    refused in the handshake by every server integration; a kubernetes client is served."""
    cloud, kubernetes = pair
    seen = Seen()
    live = RenewingIdentity(await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG))
    stranger = await enrol(outsider, "client.elsewhere.internal", lifetime=LONG)
    friend = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    assert fingerprints(live.current) <= fingerprints(stranger)  # it does trust the server
    async with SERVERS[server](live, seen, None) as port:
        refused = await fetch_raw(stranger, port)
        await anyio.sleep(0.1)
        assert (seen.handled, seen.serials) == (0, {})
        served = await fetch_raw(friend, port)
    assert refused == b""
    assert served.startswith(b"HTTP/1.1 200 ")
    assert seen.serials == {"client.k8s.internal": {friend.serial}}


CERT_ERRORS = (ssl.SSLCertVerificationError, httpx.ConnectError, aiohttp.ClientSSLError)


@pytest.mark.parametrize("client", CLIENTS)
async def test_client_refuses_server_of_unfederated_ca(
    pair: tuple[TestCA, TestCA], outsider: TestCA, client: str
) -> None:
    """A server of a CA the client's CA does not federate (the server trusts the client) is
    refused in the handshake by every client integration; a cloud server is reached."""
    cloud, kubernetes = pair
    seen = Seen()
    stranger = await enrol(outsider, "server.elsewhere.internal", SERVER_NAMES, LONG)
    friend = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal", lifetime=LONG))
    assert fingerprints(live.current) <= fingerprints(stranger)  # it does trust the client
    async with (
        streams_server(stranger, seen, None) as bad,
        streams_server(friend, Seen(), None) as good,
        CLIENTS[client](live, None) as get,
    ):
        with pytest.raises(CERT_ERRORS) as info:
            await get(bad)
        reply = await get(good)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert seen.handled == 0
    assert (reply.status, reply.server_serial) == (200, friend.serial)


# 5. No TLS resumption -------------------------------------------------------------------------
@dataclass(frozen=True)
class Handshake:
    version: str | None
    reused: bool
    ticket: bool
    server_serial: int


def _connections(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, between: Callable[[], None]
) -> list[Handshake]:
    """Two blocking TLS connections to a server on a thread of its own, the second offering
    the first one's session; ``between`` runs between them."""
    out: list[Handshake] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]
        errors: list[BaseException] = []

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                        tls.recv(1)
                except (OSError, ssl.SSLError) as exc:
                    errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            session: ssl.SSLSession | None = None
            for i in range(2):
                if i == 1:
                    between()
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                    client_ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as t,
                ):
                    assert t.recv(2) == b"ok"
                    session = t.session
                    assert session is not None
                    der = t.getpeercert(binary_form=True)
                    assert der is not None
                    serial = x509.load_der_x509_certificate(der).serial_number
                    out.append(
                        Handshake(t.version(), t.session_reused is True, session.has_ticket, serial)
                    )
        finally:
            thread.join(10)
    assert errors == []
    return out


def _ticketing_context(identity: Identity) -> ssl.SSLContext:
    """A stdlib server context with the same certificate and roots, and its default session
    tickets."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_cert_chain_in_memory(ctx, identity.chain, identity._key)
    ctx.load_verify_locations(cadata=identity.trust.pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


VERSIONS = {"tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}


@pytest.mark.parametrize("renew", [False, True], ids=["identity", "renewing-across-a-swap"])
@pytest.mark.parametrize("version", VERSIONS)
async def test_no_session_resumption(
    pair: tuple[TestCA, TestCA], version: str, renew: bool
) -> None:
    """federatls server contexts (a plain identity's, and a renewing one's across a swap)
    issue no session tickets and resume no session: every connection is a full handshake
    with the peer's certificate checked again."""
    cloud, kubernetes = pair
    live = RenewingIdentity(await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG))
    client = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    server_ctx = live.server_context() if renew else live.current.server_context()
    client_ctx = client.client_context()
    client_ctx.maximum_version = VERSIONS[version]

    def between() -> None:
        if renew:
            anyio.from_thread.run(live.refresh)

    shakes = await anyio.to_thread.run_sync(_connections, server_ctx, client_ctx, between)
    expected = "TLSv1.2" if version == "tls1.2" else "TLSv1.3"
    assert [s.version for s in shakes] == [expected, expected]
    assert [s.reused for s in shakes] == [False, False]
    assert [s.ticket for s in shakes] == [False, False]
    assert server_ctx.session_stats()["hits"] == 0
    assert live.renewals == (1 if renew else 0)
    assert shakes[1].server_serial == live.current.serial  # the renewed one, after a swap


@pytest.mark.parametrize("version", VERSIONS)
async def test_ticketing_context_does_resume(pair: tuple[TestCA, TestCA], version: str) -> None:
    """Twin: a stdlib server context with the same certificate and its default tickets does
    resume the second connection, so the probe above would see a resumption."""
    cloud, kubernetes = pair
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    client = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    client_ctx = client.client_context()
    client_ctx.maximum_version = VERSIONS[version]
    shakes = await anyio.to_thread.run_sync(
        _connections, _ticketing_context(server), client_ctx, lambda: None
    )
    assert [s.reused for s in shakes] == [False, True]
    assert shakes[0].ticket


def _alpn_request(port: int, client: Identity) -> tuple[str | None, bytes]:
    """A blocking request offering ALPN h2 and http/1.1: the protocol chosen, and the answer."""
    ctx = client.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(REQUEST)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return tls.selected_alpn_protocol(), answer


@pytest.mark.parametrize(
    "renew",
    [
        False,
        True,
    ],
    ids=["identity", "renewing"],
)
async def test_uvicorn_negotiates_its_protocols_alpn(
    pair: tuple[TestCA, TestCA], renew: bool
) -> None:
    """uvicorn with a protocol declaring ALPN protocols (as its HTTP/2 ones do) negotiates
    them over federatls's context, renewing or not."""
    cloud, kubernetes = pair
    identity = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    source: Source = RenewingIdentity(identity) if renew else identity
    client = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    seen = Seen()
    async with uvicorn_server(source, seen, None, alpn=["http/1.1"]) as port:
        chosen, answer = await anyio.to_thread.run_sync(_alpn_request, port, client)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert seen.handled == 1
    assert chosen == "http/1.1"


# 6. A dropped root shuts out new connections --------------------------------------------------
def _kubernetes_root(pair: tuple[TestCA, TestCA]) -> str:
    return federatls.TrustedRoot.of(pair[1].root, federatls.Provenance.FEDERATED).fingerprint


async def test_server_drops_a_root(pair: tuple[TestCA, TestCA]) -> None:
    """Once cloud stops federating kubernetes and the live server has renewed, every server
    integration refuses a kubernetes client on new connections (also one offering the session
    of an earlier connection), although it served it before; a cloud client still gets in."""
    cloud, kubernetes = pair
    k8s_root = _kubernetes_root(pair)
    client = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    neighbour = await enrol(cloud, "worker.cloud.internal", lifetime=LONG)
    seens = {name: Seen() for name in SERVERS}
    async with anyio.create_task_group() as tg:
        live = await renewing(tg, await enrol(cloud, "server.cloud.internal", SERVER_NAMES))
        async with contextlib.AsyncExitStack() as stack:
            ports = {
                name: await stack.enter_async_context(factory(live, seens[name], None))
                for name, factory in SERVERS.items()
            }
            before = {name: await fetch_raw(client, port) for name, port in ports.items()}
            tls13 = client.client_context()
            tls13.minimum_version = ssl.TLSVersion.TLSv1_3
            session = await anyio.to_thread.run_sync(_tls13_session, tls13, ports["asyncio"])

            await anyio.to_thread.run_sync(cloud.federate)  # no federated roots any more
            with anyio.fail_after(15):
                while k8s_root in fingerprints(live.current):
                    await live.wait_for_update()
            after = {name: await fetch_raw(client, port) for name, port in ports.items()}
            resumed = await anyio.to_thread.run_sync(
                _tls13_session, tls13, ports["asyncio"], session
            )
            neighbours = {name: await fetch_raw(neighbour, port) for name, port in ports.items()}
            await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    for name in SERVERS:
        assert before[name].startswith(b"HTTP/1.1 200 "), name
        assert after[name] == b"", name
        assert neighbours[name].startswith(b"HTTP/1.1 200 "), name
        assert seens[name].serials["client.k8s.internal"] == {client.serial}
        assert seens[name].handled == 2 + (name == "asyncio"), name
    assert session is not None
    assert not session.has_ticket
    assert resumed is None


def _tls13_session(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None
) -> ssl.SSLSession | None:
    """A blocking TLS 1.3 request to "localhost" (so with SNI, unlike the requests to
    127.0.0.1) offering ``session``: the session after an answer, or None when the server cut
    the connection off."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        try:
            tls.sendall(REQUEST)
            answer = tls.recv(65536)
        except (ConnectionError, ssl.SSLError):
            return None
        if not answer:
            return None
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert not tls.session_reused
        return tls.session


async def test_client_drops_a_root(pair: tuple[TestCA, TestCA]) -> None:
    """Once kubernetes stops federating cloud and the live client has renewed, every client
    integration refuses the cloud server on its next request, pooled connections included,
    although it talked to it before."""
    cloud, kubernetes = pair
    seen = Seen()
    cloud_root = federatls.TrustedRoot.of(cloud.root, federatls.Provenance.OWN).fingerprint
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    errors: dict[str, BaseException | Reply] = {}
    async with anyio.create_task_group() as tg:
        live = await renewing(tg, await enrol(kubernetes, "client.k8s.internal"))
        async with streams_server(server, seen, None) as port, contextlib.AsyncExitStack() as st:
            gets = {n: await st.enter_async_context(f(live, None)) for n, f in CLIENTS.items()}
            before = {name: await get(port) for name, get in gets.items()}
            await anyio.to_thread.run_sync(kubernetes.federate)
            with anyio.fail_after(15):
                while cloud_root in fingerprints(live.current):
                    await live.wait_for_update()
            handled = seen.handled
            for name, get in gets.items():
                try:
                    errors[name] = await get(port)
                except CERT_ERRORS as exc:
                    errors[name] = exc
        tg.cancel_scope.cancel()
    for name in CLIENTS:
        assert before[name].status == 200, name
        assert isinstance(errors[name], CERT_ERRORS), (name, errors[name])
        assert "CERTIFICATE_VERIFY_FAILED" in str(errors[name])
    assert seen.handled == handled == len(CLIENTS)
