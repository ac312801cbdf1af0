"""The httpx integration cannot be routed around: arguments that would hand requests to
httpx's own transports (``proxy=``, ``mounts=``, ``transport=``) or that its transport would
silently ignore (``verify=``, ``cert=``) are refused; proxies from the environment are not
used; plain ``http://`` is refused. The plain client keeps working.

Two real federated CAs (``federatls.testing``) issue the certificates; the origin server, a
CONNECT proxy and a plain HTTP server (tests/loopback.py) run on 127.0.0.1 with port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio.to_thread
import httpx
import pytest

import federatls.integrations.httpx as fhttpx
import federatls.integrations.streams as streams
import federatls.integrations.urllib3 as furllib3
from federatls import (
    Authoriser,
    ConfigError,
    Identity,
    PeerInfo,
    PeerNotAuthorisedError,
    allow_names,
)

from loopback import (
    PROXY_VARIABLES,
    Pair,
    clear_proxy_variables,
    connect_line,
    connect_proxy,
    federated_parties,
    origin,
    plain_http,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """A cloud server and a kubernetes client (the CAs run only while the module does)."""
    with federated_parties() as parties:
        yield parties


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable from the machine's environment leaks into these tests."""
    clear_proxy_variables(monkeypatch)


# Clients ---------------------------------------------------------------------------------------
async def get(flavour: str, source: Identity, url: str, **kwargs: Any) -> httpx.Response:
    """GET ``url`` with federatls's async client, or its sync client on a worker thread."""
    if flavour == "async":
        async with fhttpx.AsyncClient(source, **kwargs) as http:
            response = await http.get(url)
            await response.aread()
            return response

    def blocking() -> httpx.Response:
        with fhttpx.Client(source, **kwargs) as http:
            response = http.get(url)
            response.read()
            return response

    return await anyio.to_thread.run_sync(blocking)


FLAVOURS = ["async", "sync"]
CLIENTS = {"async": fhttpx.AsyncClient, "sync": fhttpx.Client}


# 1. Arguments that route around federatls -----------------------------------------------------
def _refused_arguments(client: Identity, proxy_url: str, flavour: str) -> dict[str, Any]:
    """One value for each refused argument, each a way a caller might try to use it."""
    transport = httpx.AsyncHTTPTransport if flavour == "async" else httpx.HTTPTransport
    return {
        "verify": client.client_context(),
        "cert": "/nonexistent/client.pem",
        "proxy": proxy_url,
        "proxies": proxy_url,
        "mounts": {"https://": transport(verify=client.client_context())},
        "transport": transport(verify=client.client_context()),
        "app": object(),
        "http1": False,
        "uds": "/tmp/socket",
    }


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    "argument",
    ["verify", "cert", "proxy", "proxies", "mounts", "transport", "app", "http1", "uds"],
)
def test_argument_refused(pair: Pair, flavour: str, argument: str) -> None:
    """Each argument that would bypass federatls's transport (or that it would ignore) is a
    ``ConfigError`` naming it and saying what to do instead."""
    value = _refused_arguments(pair.client, "http://127.0.0.1:9/", flavour)[argument]
    with pytest.raises(ConfigError, match=f"{argument}=") as info:
        CLIENTS[flavour](pair.client, **{argument: value})
    assert "instead" in str(info.value) or "use " in str(info.value)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("argument", ["proxy", "mounts"])
async def test_bypass_would_skip_the_authoriser(pair: Pair, flavour: str, argument: str) -> None:
    """``proxy=`` or ``mounts=`` with a ``verify=`` context would reach a server the
    authoriser refuses, through httpx's own transport: refused before any connection."""
    async with origin(pair.server) as served, connect_proxy() as proxy:
        value = _refused_arguments(pair.client, proxy.url, flavour)[argument]
        options = {argument: value, "verify": pair.client.client_context()}
        with pytest.raises(ConfigError):
            await get(flavour, pair.client, served.url, authoriser=allow_names("nobody"), **options)
    assert served.seen == []
    assert proxy.lines == []


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_plain_client_with_passed_on_arguments(pair: Pair, flavour: str) -> None:
    """Twin: the client with the arguments it does pass on to httpx (headers, timeout,
    base_url, follow_redirects, trust_env...) reaches the server with mutual TLS."""
    async with origin(pair.server) as served:
        response = await get(
            flavour,
            pair.client,
            "/",
            authoriser=allow_names("server.cloud.internal"),
            base_url=served.url,
            headers={"x-test": "1"},
            timeout=httpx.Timeout(20),
            follow_redirects=True,
            max_redirects=2,
            trust_env=True,
            params={"a": "b"},
        )
    assert response.text == "hello"
    assert [p.common_name for p in served.seen] == ["client.k8s.internal"]


# 2. Proxies from the environment ---------------------------------------------------------------
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("variable", PROXY_VARIABLES)
async def test_environment_proxy_not_used(
    pair: Pair, flavour: str, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a CONNECT proxy in ``HTTPS_PROXY``/``ALL_PROXY`` and ``trust_env`` on, the
    client still connects with federatls's transport: directly, and the authoriser runs."""
    async with origin(pair.server) as served, connect_proxy() as proxy:
        monkeypatch.setenv(variable, proxy.url)
        response = await get(flavour, pair.client, served.url, trust_env=True)
        assert response.text == "hello"
        with pytest.raises(PeerNotAuthorisedError, match="nobody"):
            await get(flavour, pair.client, served.url, authoriser=allow_names("nobody"))
    assert proxy.lines == []
    assert len(served.seen) == 1


@pytest.mark.parametrize("variable", PROXY_VARIABLES)
async def test_environment_proxy_is_live(
    pair: Pair, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twin: the same variable does send a plain ``httpx.AsyncClient`` through the proxy
    (so the test above would see a proxied request, were one made)."""
    async with origin(pair.server) as served, connect_proxy() as proxy:
        monkeypatch.setenv(variable, proxy.url)
        async with httpx.AsyncClient(verify=pair.client.client_context()) as http:
            assert (await http.get(served.url)).text == "hello"
    assert proxy.lines == [connect_line(served.url)]


# 3. Plain http:// ------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_plain_http_refused(pair: Pair, flavour: str) -> None:
    """An ``http://`` URL would go without TLS and without the authoriser: ``ConfigError``
    naming it, and the plain server gets nothing."""
    async with plain_http() as plain:
        with pytest.raises(ConfigError, match="https://") as info:
            await get(flavour, pair.client, plain.url)
        assert plain.url in str(info.value)
    assert plain.lines == []


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_redirect_to_plain_http_refused(pair: Pair, flavour: str) -> None:
    """A server's redirect to ``http://`` (``follow_redirects=True``) is refused the same
    way: the plain server gets nothing."""
    async with plain_http() as plain, origin(pair.server, redirect_to=plain.url) as served:
        with pytest.raises(ConfigError, match="https://"):
            await get(flavour, pair.client, served.url + "away", follow_redirects=True)
    assert plain.lines == []


async def test_plain_http_server_is_live(pair: Pair) -> None:
    """Twin: the plain server does answer a plain httpx client."""
    async with plain_http() as plain, httpx.AsyncClient() as http:
        assert (await http.get(plain.url)).text == "plain"
    assert plain.lines == [b"GET / HTTP/1.1"]


def _authoriser_seen(calls: list[PeerInfo]) -> Authoriser:
    def authorise(peer: PeerInfo) -> None:
        calls.append(peer)

    return authorise


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_https_redirect_followed_and_checked(pair: Pair, flavour: str) -> None:
    """Twin: a redirect to ``https://`` is followed, over a connection the authoriser saw."""
    calls: list[PeerInfo] = []
    async with origin(pair.server) as target, origin(pair.server, redirect_to=target.url) as first:
        response = await get(
            flavour,
            pair.client,
            first.url + "away",
            follow_redirects=True,
            authoriser=_authoriser_seen(calls),
        )
    assert response.text == "hello"
    assert len(target.seen) == 1
    assert calls
    assert {p.common_name for p in calls} == {"server.cloud.internal"}


# ALPN: one library's protocols are never offered by another -------------------------------------
@contextlib.asynccontextmanager
async def alpn_recorder(identity: Identity) -> AsyncIterator[tuple[int, list[str | None]]]:
    """A TLS server offering h2 and http/1.1 that records the protocol each connection chose
    (None: the client offered none), answers HTTP/1.1 over http/1.1, and hangs up on
    anything else; its port and the record."""
    chosen: list[str | None] = []
    ctx = identity.server_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        chosen.append(protocol)
        if protocol == "http/1.1":
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1], chosen
    finally:
        server.close()
        await server.wait_closed()


async def test_http2_alpn_not_offered_by_other_integrations(pair: Pair) -> None:
    """An httpx client with http2 offers h2, and the same identity's other clients made
    after it (asyncio streams, an HTTP/1.1 httpx client, urllib3) do not: httpcore sets
    its ALPN on the context at each connection, and a context shared with them would make
    a streams connection speak HTTP/1.1 into an h2 server. Twin: the http2 client's own
    connection, which does choose h2."""
    async with alpn_recorder(pair.server) as (port, chosen):
        url = f"https://127.0.0.1:{port}/"
        async with fhttpx.AsyncClient(pair.client, http2=True) as h2:
            with contextlib.suppress(httpx.HTTPError):  # the recorder does not speak h2
                await h2.get(url)
        _, writer = await streams.open_connection(pair.client, "127.0.0.1", port)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        async with fhttpx.AsyncClient(pair.client) as h1:
            assert (await h1.get(url)).text == "ok"

        def with_urllib3() -> bytes:
            with furllib3.PoolManager(pair.client) as pool:
                return bytes(pool.request("GET", url).data)

        assert await anyio.to_thread.run_sync(with_urllib3) == b"ok"
    assert chosen == ["h2", None, "http/1.1", "http/1.1"]
