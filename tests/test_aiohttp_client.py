"""The aiohttp client integration cannot be routed around: session and connector arguments
that would replace its connector or TLS context (``connector=``, ``proxy=``, ``ssl=``...),
a request's own ``proxy=`` or ``ssl=`` (``verify_ssl=``, ``ssl_context=``, ``fingerprint=``),
``trust_env=True`` (proxies from the environment) and plain ``http://`` are refused; proxies
from the environment are not used. The plain session, with the arguments it passes on, keeps
working.

Two real federated CAs (``federatls.testing``) issue the certificates; the origin server, a
CONNECT proxy and a plain HTTP server (tests/loopback.py) run on 127.0.0.1 with port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import federatls.integrations.aiohttp as faiohttp
from federatls import (
    Authoriser,
    ConfigError,
    Identity,
    PeerInfo,
    PeerNotAuthorisedError,
    allow_names,
)

from loopback import (
    Pair,
    clear_proxy_variables,
    connect_line,
    connect_proxy,
    federated_parties,
    origin,
    plain_http,
)

pytestmark = pytest.mark.anyio

# The variables aiohttp takes an https:// request's proxy from (it ignores ALL_PROXY).
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy")


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """A cloud server and a kubernetes client (the CAs run only while the module does)."""
    with federated_parties() as parties:
        yield parties


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable from the machine's environment leaks into these tests."""
    clear_proxy_variables(monkeypatch)


async def get(
    source: Identity, url: str, request: dict[str, Any] | None = None, **session_args: Any
) -> str:
    """GET ``url`` with federatls's session (``session_args`` to ``client_session``,
    ``request`` to ``session.get``): the body."""
    async with (
        faiohttp.client_session(source, **session_args) as session,
        session.get(url, **(request or {})) as response,
    ):
        return await response.text()


def nobody() -> Authoriser:
    """An authoriser that refuses every server."""
    return allow_names("nobody.invalid")


# 1. Session and connector arguments -------------------------------------------------------------
async def _session_value(argument: str, pair: Pair) -> tuple[Any, aiohttp.BaseConnector | None]:
    """A value a caller might pass for ``argument``, and a connector to close afterwards."""
    if argument == "connector":
        connector = aiohttp.TCPConnector(ssl=pair.client.client_context())
        return connector, connector
    if argument == "proxy_auth":
        with pytest.warns(DeprecationWarning, match="BasicAuth"):  # aiohttp's own warning
            return aiohttp.BasicAuth("user", "password"), None
    values: dict[str, Any] = {
        "connector_owner": False,
        "request_class": aiohttp.ClientRequest,
        "proxy": "http://127.0.0.1:9/",
        "trust_env": True,
        "loop": asyncio.get_running_loop(),
        "no_such_argument": 1,
    }
    return values[argument], None


@pytest.mark.parametrize(
    "argument",
    [
        "connector",
        "connector_owner",
        "request_class",
        "proxy",
        "proxy_auth",
        "trust_env",
        "loop",
        "no_such_argument",
    ],
)
async def test_session_argument_refused(pair: Pair, argument: str) -> None:
    """Each session argument that would replace federatls's connector or request class, send
    requests through a proxy, or is not known to be harmless, is a ``ConfigError`` naming it
    and saying what to do instead."""
    value, connector = await _session_value(argument, pair)
    try:
        with pytest.raises(ConfigError, match=f"{argument}=") as info:
            faiohttp.client_session(pair.client, **{argument: value})
        assert "instead" in str(info.value)
    finally:
        if connector is not None:
            await connector.close()


@pytest.mark.parametrize(
    ("argument", "value"),
    [("ssl", False), ("verify_ssl", False), ("fingerprint", b"\0" * 32), ("ssl_context", None)],
)
async def test_connector_argument_refused(pair: Pair, argument: str, value: Any) -> None:
    """``connector_args`` that choose the connector's TLS (``ssl=``, ``verify_ssl=``,
    ``fingerprint=``, ``ssl_context=``) are a ``ConfigError`` naming them: federatls's context
    decides, and they would be ignored or weaken it."""
    value = pair.client.client_context() if argument == "ssl_context" else value
    with pytest.raises(ConfigError, match=f"{argument}=") as info:
        faiohttp.client_session(pair.client, connector_args={argument: value})
    assert "instead" in str(info.value)


async def test_passed_on_arguments(pair: Pair) -> None:
    """Twin: the session with the arguments it passes on (``base_url``, ``headers``,
    ``timeout``, ``cookies``, ``raise_for_status``, connector limits, and a request's own
    ``headers``, ``params``, ``server_hostname``, ``ssl=True``) reaches the server with mutual
    TLS."""
    async with origin(pair.server) as served:
        body = await get(
            pair.client,
            "/",
            request={
                "headers": {"x-request": "1"},
                "params": {"a": "b"},
                "server_hostname": "server.cloud.internal",
                "ssl": True,
            },
            authoriser=allow_names("server.cloud.internal"),
            base_url=served.url,
            headers={"x-session": "1"},
            timeout=aiohttp.ClientTimeout(total=30),
            cookies={"c": "d"},
            raise_for_status=True,
            trust_env=False,
            connector_args={"limit": 4, "keepalive_timeout": 5.0},
        )
    assert body == "hello"
    assert [p.common_name for p in served.seen] == ["client.k8s.internal"]


# 2. Proxies -------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["session", "request"])
async def test_proxy_would_skip_the_authoriser(pair: Pair, where: str) -> None:
    """A ``proxy=`` (the session's or a request's) would reach a server the authoriser
    refuses, through a CONNECT tunnel the authoriser never sees: refused before any
    connection."""
    async with origin(pair.server) as served, connect_proxy() as proxy:
        session = {"proxy": proxy.url} if where == "session" else {}
        request = {"proxy": proxy.url} if where == "request" else {}
        with pytest.raises(ConfigError, match="proxy="):
            await get(pair.client, served.url, request, authoriser=nobody(), **session)
    assert served.seen == []
    assert proxy.lines == []


async def test_trust_env_would_skip_the_authoriser(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``trust_env=True`` with ``HTTPS_PROXY`` set would reach a server the authoriser refuses
    through that proxy: refused before any connection."""
    async with origin(pair.server) as served, connect_proxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        with pytest.raises(ConfigError, match="trust_env="):
            await get(pair.client, served.url, authoriser=nobody(), trust_env=True)
    assert served.seen == []
    assert proxy.lines == []


@pytest.mark.parametrize("variable", PROXY_VARIABLES)
async def test_environment_proxy_not_used(
    pair: Pair, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a CONNECT proxy in ``HTTPS_PROXY``/``ALL_PROXY``, the session still connects
    directly, and the authoriser runs."""
    async with origin(pair.server) as served, connect_proxy() as proxy:
        monkeypatch.setenv(variable, proxy.url)
        assert await get(pair.client, served.url) == "hello"
        with pytest.raises(PeerNotAuthorisedError, match="nobody"):
            await get(pair.client, served.url, authoriser=nobody())
    assert proxy.lines == []
    assert len(served.seen) == 1


@pytest.mark.parametrize("variable", PROXY_VARIABLES)
async def test_environment_proxy_is_live(
    pair: Pair, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twin: the same variable does send a plain ``aiohttp.ClientSession(trust_env=True)``
    through the proxy (so the test above would see a proxied request, were one made)."""
    async with origin(pair.server) as served, connect_proxy() as proxy:
        monkeypatch.setenv(variable, proxy.url)
        async with (
            aiohttp.ClientSession(trust_env=True) as session,
            session.get(served.url, ssl=pair.client.client_context()) as response,
        ):
            assert await response.text() == "hello"
    assert proxy.lines == [connect_line(served.url)]


# 3. A request's own TLS -------------------------------------------------------------------------
def _fingerprint(identity: Identity) -> bytes:
    return hashlib.sha256(identity.chain[0].public_bytes(Encoding.DER)).digest()


def _request_tls(pair: Pair, argument: str) -> dict[str, Any]:
    """A request's own TLS choice: another context (one that trusts the federation), none,
    or a fingerprint, each way aiohttp takes it."""
    context = pair.client.client_context(trust="federation")
    ways: dict[str, dict[str, Any]] = {
        "ssl=context": {"ssl": context},
        "ssl=False": {"ssl": False},
        "ssl=Fingerprint": {"ssl": aiohttp.Fingerprint(_fingerprint(pair.server))},
        "ssl_context=": {"ssl_context": context},
        "verify_ssl=": {"verify_ssl": False},
        "fingerprint=": {"fingerprint": _fingerprint(pair.server)},
    }
    return ways[argument]


@pytest.mark.parametrize(
    "argument",
    ["ssl=context", "ssl=False", "ssl=Fingerprint", "ssl_context=", "verify_ssl=", "fingerprint="],
)
async def test_request_tls_refused(pair: Pair, argument: str) -> None:
    """A request's own ``ssl=`` (or the deprecated ``ssl_context=``, ``verify_ssl=``,
    ``fingerprint=``) would replace the live context: with ``trust="own"``, which does not
    trust the cloud server, a federation context reached it. Refused before any connection."""
    async with origin(pair.server) as served:
        request = _request_tls(pair, argument)
        name = argument.split("=")[0]
        warns: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if name in {"ssl_context", "verify_ssl", "fingerprint"}:
            warns = pytest.warns(DeprecationWarning, match=name)  # aiohttp's own warning
        with warns, pytest.raises(ConfigError, match="ssl=") as info:
            await get(pair.client, served.url, request, trust="own")
        assert "instead" in str(info.value)
    assert served.seen == []


async def test_own_trust_refuses_the_cloud_server(pair: Pair) -> None:
    """Twin: without a request's own ``ssl=``, the ``trust="own"`` session refuses the cloud
    server in the handshake (what the refused arguments would have replaced)."""
    async with origin(pair.server) as served:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(pair.client, served.url, trust="own")
    assert served.seen == []


async def test_borrowed_connector_refused(pair: Pair) -> None:
    """A plain session borrowing federatls's connector (so aiohttp's default TLS instead of
    the live context) is refused by the connector itself, before any connection."""
    async with origin(pair.server) as served, faiohttp.client_session(pair.client) as ours:
        async with aiohttp.ClientSession(connector=ours.connector, connector_owner=False) as s:
            with pytest.raises(ConfigError, match="ssl="):
                await s.get(served.url)
        async with ours.get(served.url) as response:  # the session itself still works
            assert await response.text() == "hello"
    assert len(served.seen) == 1


# 4. Plain http:// -------------------------------------------------------------------------------
async def test_plain_http_refused(pair: Pair) -> None:
    """An ``http://`` URL would go without TLS and without the authoriser: ``ConfigError``
    naming it, and the plain server gets nothing."""
    async with plain_http() as plain:
        with pytest.raises(ConfigError, match="https://") as info:
            await get(pair.client, plain.url)
        assert plain.url in str(info.value)
    assert plain.lines == []


async def test_plain_websocket_refused(pair: Pair) -> None:
    """A ``ws://`` WebSocket would go without TLS as well: refused the same way."""
    async with plain_http() as plain, faiohttp.client_session(pair.client) as session:
        with pytest.raises(ConfigError, match="wss://"):
            await session.ws_connect(plain.url.replace("http://", "ws://"))
    assert plain.lines == []


async def test_websocket_over_tls(pair: Pair) -> None:
    """Twin: a ``wss://`` WebSocket goes through, with mutual TLS and the authoriser."""
    calls: list[PeerInfo] = []

    def authoriser(peer: PeerInfo) -> None:
        calls.append(peer)

    async with (
        origin(pair.server) as served,
        faiohttp.client_session(pair.client, authoriser=authoriser) as session,
        session.ws_connect(served.url.replace("https://", "wss://") + "ws") as ws,
    ):
        await ws.send_str("hi")
        assert await ws.receive_str() == "hi"
    assert [p.common_name for p in calls] == ["server.cloud.internal"]
    assert [p.common_name for p in served.seen] == ["client.k8s.internal"]


async def test_redirect_to_plain_http_refused(pair: Pair) -> None:
    """A server's redirect to ``http://`` is refused the same way: the plain server gets
    nothing."""
    async with plain_http() as plain, origin(pair.server, redirect_to=plain.url) as served:
        with pytest.raises(ConfigError, match="https://"):
            await get(pair.client, served.url + "away")
    assert plain.lines == []


async def test_plain_http_server_is_live(pair: Pair) -> None:
    """Twin: the plain server does answer a plain aiohttp session."""
    async with (
        plain_http() as plain,
        aiohttp.ClientSession() as session,
        session.get(plain.url) as response,
    ):
        assert await response.text() == "plain"
    assert plain.lines == [b"GET / HTTP/1.1"]


async def test_https_redirect_followed_and_checked(pair: Pair) -> None:
    """Twin: a redirect to ``https://`` is followed, over a connection the authoriser saw."""
    calls: list[PeerInfo] = []

    def authoriser(peer: PeerInfo) -> None:
        calls.append(peer)

    async with origin(pair.server) as target, origin(pair.server, redirect_to=target.url) as first:
        body = await get(pair.client, first.url + "away", authoriser=authoriser)
    assert body == "hello"
    assert len(target.seen) == 1
    assert len(calls) == 2
    assert {p.common_name for p in calls} == {"server.cloud.internal"}
