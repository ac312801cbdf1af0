"""A federatls server says why it refused a client in the TLS handshake.

asyncio's TLS (under the streams, aiohttp and uvicorn integrations) reports a failed
handshake only in debug mode, so a server context from federatls logs each refusal itself on
``federatls.peer``, with OpenSSL's reason. Real CAs, real TLS on 127.0.0.1: a server enrolled
with 'cloud' (which federates 'kubernetes'), clients enrolled with 'kubernetes' (accepted),
'elsewhere' (not federated), with an expired certificate, or with none.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives import serialization

import federatls
from federatls import Identity
from federatls.integrations import streams

from harness import FakeClock, make_pki, serving, wait_until

pytestmark = pytest.mark.anyio

LOGGER = "federatls.peer"


@dataclass(frozen=True)
class Parties:
    server: Identity  # cloud, 127.0.0.1
    federated: Identity  # kubernetes: cloud federates it
    stranger: Identity  # elsewhere: nobody federates it
    expired: ssl.SSLContext  # kubernetes, but its certificate expired an hour ago
    cloud_root: str  # PEM


async def _parties(base: Path) -> Parties:
    cloud, kubernetes, elsewhere = (make_pki(base, n) for n in ("cloud", "kubernetes", "elsewhere"))
    cloud.federate(kubernetes)
    kubernetes.federate(cloud)
    two_hours_ago = FakeClock()
    two_hours_ago.advance(-7200)
    async with serving(cloud), serving(kubernetes), serving(elsewhere):
        server = await federatls.bootstrap(cloud.token("127.0.0.1"))
        federated = await federatls.bootstrap(kubernetes.token("client.k8s.internal"))
        stranger = await federatls.bootstrap(elsewhere.token("client.elsewhere.internal"))
    async with serving(kubernetes, two_hours_ago):
        chain, key = await kubernetes.enroll("old.k8s.internal", not_after="1h")
    expired = federated.client_context()
    pem = serialization.Encoding.PEM
    (base / "expired.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + b"".join(c.public_bytes(pem) for c in chain)
    )
    # A test's own client file (the library never writes a key): removed right after loading.
    expired.load_cert_chain(base / "expired.pem")
    (base / "expired.pem").unlink()
    return Parties(server, federated, stranger, expired, cloud.root_path.read_text())


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> Parties:
    base = tmp_path_factory.mktemp("handshake-logs")
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, _parties, base).result(timeout=60)


def _client_context(parties: Parties, who: str) -> ssl.SSLContext:
    """A client that trusts the server (cloud's root) and presents ``who``'s certificate."""
    if who == "federated":
        return parties.federated.client_context()
    if who == "expired":
        ctx = parties.expired
    elif who == "stranger":
        ctx = parties.stranger.client_context()
    else:  # no certificate at all
        ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=parties.cloud_root)
    return ctx


# who connects -> the WARNING the server logs (None: accepted, nothing logged)
CASES = [
    pytest.param("federated", None, id="federated-client"),
    pytest.param(
        "stranger",
        "its certificate failed verification (unable to get local issuer certificate)",
        id="unfederated-client",
    ),
    pytest.param(
        "expired", "its certificate failed verification (certificate has expired)", id="expired"
    ),
    pytest.param("none", "it sent no certificate", id="no-certificate"),
]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize(("who", "expected"), CASES)
async def test_asyncio_server_logs_why_it_refused(
    parties: Parties, who: str, expected: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A streams server (asyncio's TLS): the federated client is served and nothing is
    logged; every other client is cut off in the handshake, and the server logs why."""
    served: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(str(parties.server.peer(writer).common_name))
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()

    caplog.set_level(logging.DEBUG, LOGGER)
    server = await streams.start_server(parties.server, handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=_client_context(parties, who)
        )
        answer = await reader.read()  # the answer, or b"" once the server has cut us off
        writer.close()
    if expected is None:
        assert answer == b"hello\n"
        assert served == ["client.k8s.internal"]
        assert _warnings(caplog) == []
    else:
        assert answer == b""
        assert served == []
        assert _warnings(caplog) == [f"refused a TLS client in the TLS handshake: {expected}"]


def _blocking_server(ctx: ssl.SSLContext) -> tuple[int, Callable[[], Awaitable[str]]]:
    """A blocking TLS server for one connection, on a thread; returns its port and an
    awaitable for what happened ('served' or the handshake's exception name)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> str:
        with listener:
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello\n")
                    return "served"
            except ssl.SSLError as exc:
                return type(exc).__name__

    async def outcome() -> str:
        return await anyio.to_thread.run_sync(serve)

    return listener.getsockname()[1], outcome


@pytest.mark.parametrize(("who", "expected"), CASES)
async def test_blocking_server_logs_why_and_who(
    parties: Parties, who: str, expected: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A blocking ``ssl.SSLSocket`` server: the same refusals, with the client's address."""
    caplog.set_level(logging.DEBUG, LOGGER)
    port, outcome = _blocking_server(parties.server.server_context())
    async with anyio.create_task_group() as tg:
        result: list[str] = []

        async def run() -> None:
            result.append(await outcome())

        tg.start_soon(run)

        def connect() -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                ctx = _client_context(parties, who)
                try:
                    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        return (tls.recv(100) or b"").decode()
                except (ssl.SSLError, OSError) as exc:
                    return type(exc).__name__

        client_saw = await anyio.to_thread.run_sync(connect)
    warnings = _warnings(caplog)
    if expected is None:
        assert result == ["served"]
        assert client_saw == "hello\n"
        assert warnings == []
    else:
        assert result in (["SSLCertVerificationError"], ["SSLError"])
        [line] = warnings
        assert line.startswith("refused the TLS client at 127.0.0.1:")
        assert line.endswith(f" in the TLS handshake: {expected}")


async def test_server_logs_a_client_that_refused_it(
    parties: Parties, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that does not trust the server (its own CA does not federate cloud) aborts
    the handshake with an alert; the server logs that the client refused it."""
    caplog.set_level(logging.DEBUG, LOGGER)

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("the handshake cannot succeed")

    server = await streams.start_server(parties.server, never, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]

        def connect() -> str:  # blocking: OpenSSL sends its alert before the socket closes
            ctx = parties.stranger.client_context()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                try:
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                except ssl.SSLCertVerificationError as exc:
                    return str(exc.verify_message)
            return "connected"

        refused = await anyio.to_thread.run_sync(connect)
        await wait_until(lambda: bool(_warnings(caplog)))
    assert refused == "unable to get local issuer certificate"
    assert _warnings(caplog) == [
        "a TLS client refused this server in the TLS handshake (alert: unknown ca)"
    ]
