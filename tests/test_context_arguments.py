"""The asyncio streams and uvicorn integrations keep the identity's TLS context: an ``ssl=``
passed on to asyncio (``start_server``, ``open_connection``) and uvicorn's ``ssl_*``
arguments (files, versions, client-certificate mode, its context factory) are refused with
``ConfigError`` instead of replacing the context or being silently ignored. The arguments
they do pass on keep working.

Two real federated CAs (``federatls.testing``) issue the certificates; every server runs on
127.0.0.1 with port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
import uvicorn

import federatls.integrations.aiohttp as faiohttp
import federatls.integrations.uvicorn as fuvicorn
from federatls import ConfigError, Identity, allow_names
from federatls.integrations import streams

from harness import wait_until
from loopback import Pair, federated_parties

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """A cloud server and a kubernetes client (the CAs run only while the module does)."""
    with federated_parties() as parties:
        yield parties


def _ssl_values(identity: Identity) -> dict[str, Any]:
    """What a caller might pass as asyncio's ``ssl=``: no TLS, or a context of their own."""
    return {
        "None": None,
        "False": False,
        "context": identity.client_context(),
        "server context": identity.server_context(require_client_certificate=False),
    }


# asyncio streams --------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def echo_server(identity: Identity, **kwargs: Any) -> AsyncIterator[tuple[int, list[bytes]]]:
    """``streams.start_server`` echoing one line per connection; yields the port and the
    lines its handler got."""
    lines: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        lines.append(line)
        writer.write(line)
        await writer.drain()
        writer.close()

    server = await streams.start_server(identity, handle, "127.0.0.1", 0, **kwargs)
    async with server:
        yield server.sockets[0].getsockname()[1], lines


@pytest.mark.parametrize("value", ["None", "False", "context", "server context"])
async def test_start_server_ssl_refused(pair: Pair, value: str) -> None:
    """``start_server(ssl=...)`` would serve without TLS or with another context: a
    ``ConfigError`` naming ``ssl=`` and saying what to do instead; nothing listens."""
    with pytest.raises(ConfigError, match="ssl=") as info:
        await streams.start_server(
            pair.server, _never, "127.0.0.1", 0, ssl=_ssl_values(pair.server)[value]
        )
    assert "instead" in str(info.value)


async def _never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    raise AssertionError("no connection was expected")


@pytest.mark.parametrize("value", ["None", "False", "context"])
async def test_open_connection_ssl_refused(pair: Pair, value: str) -> None:
    """``open_connection(ssl=...)`` would connect without TLS or with another context (and so
    without the live one): a ``ConfigError`` naming ``ssl=``; the server gets nothing."""
    async with echo_server(pair.server) as (port, lines):
        with pytest.raises(ConfigError, match="ssl=") as info:
            await streams.open_connection(
                pair.client, "127.0.0.1", port, ssl=_ssl_values(pair.client)[value]
            )
        assert "instead" in str(info.value)
    assert lines == []


async def test_streams_pass_other_arguments_on(pair: Pair) -> None:
    """Twin: asyncio's other arguments (``backlog``, ``limit``, ``ssl_handshake_timeout``...)
    are passed on, and the connection is mutual TLS checked by the authoriser."""
    async with echo_server(
        pair.server,
        authoriser=allow_names("client.k8s.internal"),
        backlog=8,
        limit=2**16,
        ssl_handshake_timeout=30,
        reuse_address=True,
    ) as (port, lines):
        reader, writer = await streams.open_connection(
            pair.client,
            "127.0.0.1",
            port,
            authoriser=allow_names("server.cloud.internal"),
            limit=2**16,
            ssl_handshake_timeout=30,
            ssl_shutdown_timeout=30,
        )
        try:
            assert pair.client.peer(writer).common_name == "server.cloud.internal"
            writer.write(b"ping\n")
            assert await reader.readline() == b"ping\n"
        finally:
            writer.close()
    assert lines == [b"ping\n"]


# uvicorn ----------------------------------------------------------------------------------------
UVICORN_SSL_ARGUMENTS = sorted(
    name for name in inspect.signature(uvicorn.Config).parameters if name.startswith("ssl")
)


def test_uvicorn_has_the_ssl_arguments_we_know() -> None:
    """The list below comes from uvicorn itself; it holds at least the arguments known today
    (so a new ``ssl_*`` argument of uvicorn's is refused too, without a change here)."""
    assert {
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_keyfile_password",
        "ssl_version",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ciphers",
        "ssl_context_factory",
    } <= set(UVICORN_SSL_ARGUMENTS)


def _uvicorn_value(argument: str) -> Any:
    values: dict[str, Any] = {
        "ssl_keyfile": "/nonexistent/server.key",
        "ssl_certfile": "/nonexistent/server.pem",
        "ssl_keyfile_password": "password",
        "ssl_version": ssl.PROTOCOL_TLS_SERVER,
        "ssl_cert_reqs": ssl.CERT_NONE,
        "ssl_ca_certs": "/nonexistent/ca.pem",
        "ssl_ciphers": "ALL",
        "ssl_context_factory": lambda config, default: default(),
    }
    return values.get(argument)


@pytest.mark.parametrize("argument", UVICORN_SSL_ARGUMENTS)
def test_uvicorn_ssl_argument_refused(pair: Pair, argument: str) -> None:
    """Each of uvicorn's ``ssl_*`` arguments would be ignored (the context is the identity's:
    ``ssl_cert_reqs=CERT_NONE`` would not make client certificates optional) or replace the
    context: a ``ConfigError`` naming it and saying what to do instead."""
    with pytest.raises(ConfigError, match=f"{argument}=") as info:
        fuvicorn.config(_app, pair.server, host="127.0.0.1", **{argument: _uvicorn_value(argument)})
    assert "instead" in str(info.value)


async def _app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    assert scope["type"] == "http"
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_uvicorn_passes_other_arguments_on(pair: Pair) -> None:
    """Twin: uvicorn's other arguments (``host``, ``port``, ``limit_concurrency``,
    ``timeout_keep_alive``...) are passed on, and the server speaks mutual TLS as the
    identity, its client checked by the authoriser."""
    config = fuvicorn.config(
        _app,
        pair.server,
        authoriser=allow_names("client.k8s.internal"),
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_config=None,
        access_log=False,
        limit_concurrency=10,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        try:
            await wait_until(lambda: server.started, timeout=30)
            port = server.servers[0].sockets[0].getsockname()[1]
            async with (
                faiohttp.client_session(
                    pair.client, authoriser=allow_names("server.cloud.internal")
                ) as session,
                session.get(f"https://127.0.0.1:{port}/") as response,
            ):
                assert await response.text() == "ok"
                assert pair.client.peer(response).common_name == "server.cloud.internal"
        finally:
            server.should_exit = True
