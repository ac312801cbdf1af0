"""The CA's TLS connection layer (``federatls.ca._tlsconn``) on real sockets.

A TLS server on 127.0.0.1 (port 0) runs ``TLSServerConnection`` with a small recording
protocol in place of aiohttp's handler; the client is a blocking ``ssl`` socket in a thread,
with ``suppress_ragged_eofs=False`` so that a clean close (close_notify) and a dropped
connection look different to it. One test runs against a real federatls CA: its context
issues no session tickets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trustme

from federatls.ca import CAServer
from federatls.ca._config import ConnectionLimits
from federatls.ca._connections import ConnectionTable, Phase
from federatls.ca._tlsconn import TLSServerConnection

from harness import PKI, wait_until

pytestmark = pytest.mark.anyio


class Recorder(asyncio.Protocol):
    """The HTTP handler's stand-in: records what it is told; ``reply`` answers b"ping"."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.eof = False
        self.lost = False
        self.reply = b""
        self.pause_at_first_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.pause_at_first_data and not self.received:
            assert self.transport is not None
            self.transport.pause_reading()
        self.received += data
        if self.reply and self.received.endswith(b"ping"):
            assert self.transport is not None
            self.transport.write(self.reply)

    def eof_received(self) -> None:
        self.eof = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@dataclass
class Server:
    port: int
    client_context: ssl.SSLContext
    handlers: list[Recorder] = field(default_factory=list)
    table: ConnectionTable = field(
        default_factory=lambda: ConnectionTable(ConnectionLimits(handshake_timeout=0.3), 100)
    )
    reply: bytes = b"pong"
    pause_at_first_data: bool = False

    def connect(self) -> ssl.SSLSocket:
        """A blocking TLS client connection (call it in a thread)."""
        return self.connect_with(None)

    def connect_with(self, session: ssl.SSLSession | None) -> ssl.SSLSocket:
        """The same, offering ``session`` for resumption."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return self.client_context.wrap_socket(
            raw, server_hostname="localhost", suppress_ragged_eofs=False, session=session
        )

    def send_with_finished(self, payload: bytes) -> socket.socket:
        """Handshake by hand, then send the client's Finished and ``payload`` (as TLS
        records) in one TCP write, so that one read on the server holds all of them."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        tls.write(payload)
        raw.sendall(outgoing.read())
        return raw

    @property
    def handshaking(self) -> list[TLSServerConnection]:
        """Connections still in their handshake (the table's view)."""
        return self.table.in_phase(Phase.HANDSHAKE)  # type: ignore[return-value]

    @property
    def handler(self) -> Recorder:
        assert len(self.handlers) == 1, self.handlers
        return self.handlers[0]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    authority = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    state = Server(port=0, client_context=client_context)

    def make_handler() -> Recorder:
        handler = Recorder()
        handler.reply = state.reply
        handler.pause_at_first_data = state.pause_at_first_data
        state.handlers.append(handler)
        return handler

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: TLSServerConnection(make_handler, lambda: server_context, state.table),
        "127.0.0.1",
        0,
    )
    state.port = listener.sockets[0].getsockname()[1]
    state.table.start()
    try:
        yield state
    finally:
        state.table.stop()
        listener.close()
        for connection in list(state.handshaking):
            connection.abort()
        await listener.wait_closed()


async def ping(server: Server) -> tuple[ssl.SSLSocket, asyncio.Transport]:
    """Connect, exchange ping and pong; the client socket and the handler's transport."""
    tls = await asyncio.to_thread(server.connect)
    await asyncio.to_thread(tls.sendall, b"ping")
    assert await asyncio.to_thread(tls.recv, 100) == b"pong"
    transport = server.handler.transport
    assert transport is not None
    return tls, transport


async def test_round_trip_and_connection_facts(server: Server) -> None:
    """Plaintext goes both ways once the handshake is done; the handler sees the TLS facts
    (aiohttp reads ``sslcontext``; the CA reads ``ssl_object`` for client certificates)."""
    tls, transport = await ping(server)
    with tls:
        assert isinstance(transport.get_extra_info("ssl_object"), ssl.SSLObject)
        assert isinstance(transport.get_extra_info("sslcontext"), ssl.SSLContext)
        assert transport.get_extra_info("cipher")[1] == tls.version()
        assert transport.get_extra_info("peername")[0] == "127.0.0.1"
        assert transport.get_extra_info("no such thing", "default") == "default"
        assert not server.handshaking
        transport.write(b"later")  # a write outside data_received is sent at once
        assert await asyncio.to_thread(tls.recv, 100) == b"later"


async def test_handler_close_sends_close_notify(server: Server) -> None:
    """The handler's ``close`` ends TLS cleanly: the client reads close_notify, an EOF."""
    tls, transport = await ping(server)
    with tls:
        transport.close()
        assert transport.is_closing()
        assert await asyncio.to_thread(tls.recv, 100) == b""
    await wait_until(lambda: server.handler.lost)


async def test_handler_abort_drops_without_close_notify(server: Server) -> None:
    """Twin of the clean close: ``abort`` drops TCP, and the client sees a truncated stream."""
    tls, transport = await ping(server)
    with tls:
        transport.abort()
        with pytest.raises((ssl.SSLEOFError, ConnectionResetError)):
            await asyncio.to_thread(tls.recv, 100)
    await wait_until(lambda: server.handler.lost)


async def test_client_close_notify_reaches_the_handler(server: Server) -> None:
    """A client's close_notify is an EOF for the handler, and the server closes in turn."""
    tls, _ = await ping(server)
    raw = await asyncio.to_thread(tls.unwrap)  # sends close_notify, waits for the server's
    raw.close()
    await wait_until(lambda: server.handler.eof and server.handler.lost)


async def test_paused_reading_holds_data_until_resumed(server: Server) -> None:
    """While the handler has paused reading it receives nothing; on resume it gets what
    arrived meanwhile, in order."""
    server.reply = b""
    tls = await asyncio.to_thread(server.connect)
    with tls:
        await asyncio.to_thread(tls.sendall, b"first")
        await wait_until(lambda: bytes(server.handler.received) == b"first")
        transport = server.handler.transport
        assert transport is not None
        transport.pause_reading()
        assert not transport.is_reading()
        await asyncio.to_thread(tls.sendall, b"second")
        await asyncio.sleep(0.3)
        assert bytes(server.handler.received) == b"first"
        transport.resume_reading()
        assert transport.is_reading()
        await wait_until(lambda: bytes(server.handler.received) == b"firstsecond")


async def test_records_decrypted_after_a_pause_wait_for_resume(server: Server) -> None:
    """A handler that pauses in ``data_received`` gets nothing more until it resumes, even
    records that came in the same TCP read (they are decrypted and held), then all of them,
    in order."""
    server.reply = b""
    server.pause_at_first_data = True
    payload = bytes(range(256)) * 160  # 40 KiB: three TLS records
    raw = await asyncio.to_thread(server.send_with_finished, payload)
    with raw:
        await wait_until(lambda: bool(server.handlers and server.handler.received))
        await asyncio.sleep(0.3)
        assert 0 < len(server.handler.received) < len(payload)
        transport = server.handler.transport
        assert transport is not None
        transport.resume_reading()
        await wait_until(lambda: len(server.handler.received) == len(payload))
        assert bytes(server.handler.received) == payload


async def test_large_writes_arrive_whole(server: Server) -> None:
    """A write far larger than a TLS record or a socket buffer arrives complete and intact."""
    server.reply = bytes(range(256)) * 8192  # 2 MiB
    tls = await asyncio.to_thread(server.connect)
    with tls:
        await asyncio.to_thread(tls.sendall, b"ping")

        def read_all() -> bytes:
            out = bytearray()
            while len(out) < len(server.reply):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                out += chunk
            return bytes(out)

        assert await asyncio.to_thread(read_all) == server.reply


async def test_silent_connection_times_out_in_the_handshake(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that connects and never finishes the handshake is dropped after the
    handshake timeout (0.3 s here) and counted in the log; no handler is ever made for it."""
    caplog.set_level(logging.INFO, "federatls.ca")
    raw = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", server.port), 10)
    with raw:
        assert await asyncio.to_thread(raw.recv, 100) == b""  # closed by the server
    await wait_until(lambda: "1 closed on handshake timeout" in caplog.text)
    assert not server.handlers
    await wait_until(lambda: not server.handshaking)


async def test_handshake_timeout_spares_finished_handshakes(server: Server) -> None:
    """Twin: the timeout covers the handshake only; an idle connection after it stays open
    (until the request-head timeout, 5 s by default)."""
    tls = await asyncio.to_thread(server.connect)
    with tls:
        await asyncio.sleep(0.8)
        await asyncio.to_thread(tls.sendall, b"ping")
        assert await asyncio.to_thread(tls.recv, 100) == b"pong"


async def test_refused_handshake_is_logged_with_its_reason(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain HTTP on the TLS port fails the handshake: logged with OpenSSL's reason, closed,
    no handler made."""
    caplog.set_level(logging.INFO, "federatls.ca")

    def plain_http() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                return raw.recv(100)
            return b""

    await asyncio.to_thread(plain_http)
    await wait_until(lambda: "refused TLS connection from 127.0.0.1" in caplog.text)
    assert "HTTP_REQUEST" in caplog.text  # OpenSSL recognised plain HTTP
    assert not server.handlers
    await wait_until(lambda: not server.handshaking)


async def test_client_leaving_mid_handshake_is_logged(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends part of a ClientHello and goes away: logged, nothing made."""
    caplog.set_level(logging.INFO, "federatls.ca")

    def half_hello() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01")  # a record header and one byte

    await asyncio.to_thread(half_hello)
    await wait_until(lambda: "1 ended by the client during the TLS handshake" in caplog.text)
    assert not server.handlers
    await wait_until(lambda: not server.handshaking)


async def test_aborting_unfinished_handshakes(server: Server) -> None:
    """What a stopping CA does: connections still in their handshake are tracked and can be
    aborted; the client sees its connection end."""
    raw = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", server.port), 10)
    with raw:
        await wait_until(lambda: len(server.handshaking) == 1)
        for connection in list(server.handshaking):
            connection.abort()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.to_thread(raw.recv, 100) == b""
    await wait_until(lambda: not server.handshaking)
    assert not server.handlers


def _get_health(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool]:
    """GET /health on a new connection: the session it leaves and whether it resumed one."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        return tls.session, tls.session_reused is True


async def test_the_ca_issues_no_session_tickets(ca: CAServer, pki: PKI) -> None:
    """The CA's context issues no TLS session tickets, so no connection skips the full
    handshake (and its client-certificate check) by resuming."""
    client = ssl.create_default_context(cafile=str(pki.root_path))
    session, _ = await asyncio.to_thread(_get_health, ca.address[1], client, None)
    assert session is not None
    assert not session.has_ticket
    _, resumed = await asyncio.to_thread(_get_health, ca.address[1], client, session)
    assert not resumed


async def test_tickets_would_resume_through_the_layer(server: Server) -> None:
    """Twin: with a context that issues tickets (the stdlib default), the same checks see a
    ticket and a resumed session, through the same connection layer."""
    tls, _ = await ping(server)
    with tls:
        session = tls.session
    assert session is not None
    assert session.has_ticket
    again = await asyncio.to_thread(server.connect_with, session)
    with again:
        await asyncio.to_thread(again.sendall, b"ping")
        assert await asyncio.to_thread(again.recv, 100) == b"pong"
        assert again.session_reused


def _read_answer(tls: ssl.SSLSocket) -> bytes:
    """One HTTP/1.1 answer with a Content-Length body, read exactly (nothing beyond it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(1)
        assert chunk, f"the connection ended after {data!r}"
        data += chunk
    head = data.decode("latin-1").lower()
    length = int(head.split("content-length:")[1].split("\r\n")[0])
    body = b""
    while len(body) < length:
        chunk = tls.recv(length - len(body))
        assert chunk, f"the connection ended after {data + body!r}"
        body += chunk
    return data + body


def _health_then_end(port: int, context: ssl.SSLContext, close: bool) -> bool:
    """GET /health with ``Connection: close`` if ``close``, else a keep-alive GET /health and
    a second one on the same connection with ``Connection: close``. Each must be answered;
    True if the connection then ended with close_notify."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
        header = b"Connection: close\r\n" if close else b""
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % header)
        assert _read_answer(tls).startswith(b"HTTP/1.1 200 ")
        if not close:
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert _read_answer(tls).startswith(b"HTTP/1.1 200 ")
        # A clean end reads as b"" here; a TCP close without close_notify raises SSLEOFError.
        return tls.recv(4096) == b""


async def test_connection_close_ends_with_close_notify(ca: CAServer, pki: PKI) -> None:
    """A client that asks for ``Connection: close`` (as bootstrapping clients do) gets its
    answer and then a clean TLS close; a keep-alive client's connection stays open for its
    next request (the twin: the prompt close applies only when the client asked for it)."""
    client = ssl.create_default_context(cafile=str(pki.root_path))
    port = ca.address[1]
    assert await asyncio.to_thread(_health_then_end, port, client, True)
    assert await asyncio.to_thread(_health_then_end, port, client, False)
