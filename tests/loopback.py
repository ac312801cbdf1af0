"""Servers the integration tests point clients at, all on 127.0.0.1 with port 0: an HTTPS
origin with an identity's server context, a CONNECT proxy and a plain-HTTP server, each
recording what it got; and the two identities they are tried with. Shared by the tests of
the HTTP client integrations (httpx, aiohttp), so each is tried against the same servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from federatls import Identity, PeerInfo
from federatls.testing import federated_pair

# The variables that send an https:// request through a proxy (HTTP_PROXY applies to http://).
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def clear_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable from the machine's environment leaks into a test."""
    for name in (*PROXY_VARIABLES, "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class Pair:
    server: Identity  # cloud: server.cloud.internal, 127.0.0.1
    client: Identity  # kubernetes: client.k8s.internal


@contextlib.contextmanager
def federated_parties() -> Iterator[Pair]:
    """A cloud server and a kubernetes client of two federated CAs (running while in use)."""
    with federated_pair("cloud", "kubernetes") as (cloud, kubernetes):
        yield Pair(
            server=cloud.identity(
                "server.cloud.internal", sans=["server.cloud.internal", "127.0.0.1", "localhost"]
            ),
            client=kubernetes.identity("client.k8s.internal"),
        )


# The HTTPS origin ------------------------------------------------------------------------------
@dataclass
class Origin:
    """The HTTPS origin: its URL and the peers of the requests it answered."""

    url: str
    seen: list[PeerInfo] = field(default_factory=list)


@contextlib.asynccontextmanager
async def origin(identity: Identity, redirect_to: str = "") -> AsyncIterator[Origin]:
    """An aiohttp HTTPS server with ``identity``'s server context: ``/`` answers "hello" and
    records the client, ``/away`` redirects to ``redirect_to``, ``/ws`` is a WebSocket that
    records the client and echoes one text message."""
    served = Origin("")

    async def hello(request: web.Request) -> web.Response:
        served.seen.append(identity.peer(request))
        return web.Response(text="hello")

    async def away(request: web.Request) -> web.Response:
        raise web.HTTPFound(redirect_to)

    async def echo(request: web.Request) -> web.WebSocketResponse:
        served.seen.append(identity.peer(request))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(await ws.receive_str())
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/away", away)
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=identity.server_context())
        await site.start()
        served.url = f"https://127.0.0.1:{runner.addresses[0][1]}/"
        yield served
    finally:
        await runner.cleanup()


# Servers of the tests' own ---------------------------------------------------------------------
@dataclass
class Listener:
    """A server of the test's own: its URL and the first line of every request it got."""

    url: str
    lines: list[bytes] = field(default_factory=list)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def serve(handle: Any, scheme: str) -> AsyncIterator[tuple[Listener, asyncio.AbstractServer]]:
    """``handle(listener, reader, writer)`` served on 127.0.0.1:0; its tasks are cancelled
    on the way out."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(listener, reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # cancelled below, on the way out: end quietly
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    listener = Listener(f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
    try:
        yield listener, server
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def _connect_proxy(
    listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A CONNECT proxy: records the request line, then tunnels bytes both ways."""
    head = await reader.readuntil(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0]
    listener.lines.append(line)
    method, target, _ = line.split(b" ", 2)
    if method != b"CONNECT":
        writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
        return
    host, port = target.decode().rsplit(":", 1)
    up_reader, up_writer = await asyncio.open_connection(host, int(port))
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _plain_http(
    listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A plain-HTTP server: records the request line, answers "plain"."""
    head = await reader.readuntil(b"\r\n\r\n")
    listener.lines.append(head.split(b"\r\n", 1)[0])
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nplain")
    await writer.drain()


@contextlib.asynccontextmanager
async def connect_proxy() -> AsyncIterator[Listener]:
    """A CONNECT proxy on 127.0.0.1 (its URL is ``http://``); ``lines`` are the CONNECTs."""
    async with serve(_connect_proxy, "http") as (listener, _):
        yield listener


@contextlib.asynccontextmanager
async def plain_http() -> AsyncIterator[Listener]:
    """A plain-HTTP server on 127.0.0.1 answering "plain"; ``lines`` are its request lines."""
    async with serve(_plain_http, "http") as (listener, _):
        yield listener


def connect_line(url: str) -> bytes:
    """The CONNECT request line a client sends a proxy for ``url`` (https://127.0.0.1:port/)."""
    port = url.rsplit(":", 1)[1].rstrip("/")
    return f"CONNECT 127.0.0.1:{port} HTTP/1.1".encode()
