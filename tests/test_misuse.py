"""What a first-time user gets wrong, and the one clear error each gets: every integration
refuses a source that is not an identity, a bad ``trust=`` or an authoriser that is not
callable with ``ConfigError`` when it is made (not deep inside a library at the first
connection); ``keep_renewed`` refuses what is not a plain ``Identity``; and an authoriser
that raises something other than ``PeerNotAuthorisedError`` refuses its peer with a
``PeerNotAuthorisedError`` naming what it raised, never a traceback inside asyncio's or
gRPC's TLS, nor a peer let through.

Real federated CAs (``federatls.testing``), real servers on 127.0.0.1 (hypercorn, gRPC),
real clients (requests, gRPC).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import anyio.to_thread
import grpc
import pytest
import requests

import federatls
from federatls import ConfigError, Identity, PeerInfo, PeerNotAuthorisedError, RenewingIdentity
from federatls.integrations import grpc as fgrpc
from federatls.integrations import httpx as fhttpx
from federatls.integrations import hypercorn as fhypercorn
from federatls.integrations import requests as frequests
from federatls.integrations import streams as fstreams
from federatls.integrations import urllib3 as furllib3
from federatls.integrations import uvicorn as fuvicorn
from federatls.integrations.grpc import aio as fgrpc_aio
from federatls.testing import federated_pair
from test_hypercorn import App, bound_socket, serving

pytestmark = pytest.mark.anyio

LOGGER = "federatls.peer"
SERVER_NAMES = ["server.cloud.internal", "127.0.0.1"]


@pytest.fixture(scope="module")
def parties() -> Iterator[tuple[Identity, Identity]]:
    """A cloud server and a kubernetes client (the CAs run only while the module does)."""
    with federated_pair("cloud", "kubernetes") as (cloud, kubernetes):
        yield (
            cloud.identity("server.cloud.internal", sans=SERVER_NAMES),
            kubernetes.identity("client.k8s.internal"),
        )


async def _close(made: Any) -> None:
    """Close what an integration made, whatever its kind."""
    if isinstance(made, asyncio.Server):
        made.close()
        await made.wait_closed()
    elif isinstance(made, fgrpc_aio.Channel):
        await made.close()
    elif isinstance(made, fhttpx.AsyncClient):
        await made.aclose()
    elif hasattr(made, "close"):
        made.close()
    elif hasattr(made, "clear"):
        made.clear()


async def _ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _start_server(source: Any, **kw: Any) -> Any:
    return await fstreams.start_server(source, _ignore, "127.0.0.1", 0, **kw)


async def _aio_channel(source: Any, **kw: Any) -> Any:
    return fgrpc_aio.secure_channel(source, "127.0.0.1:1", **kw)


Make = Callable[..., Any]
MAKERS: dict[str, Make] = {
    "requests.Session": frequests.Session,
    "urllib3.PoolManager": furllib3.PoolManager,
    "hypercorn.config": lambda source, **kw: fhypercorn.config(source, bind="127.0.0.1:0", **kw),
    "grpc.server_credentials": lambda source, authoriser=None, **kw: fgrpc.server_credentials(
        source, **kw
    ),
    "grpc.Interceptor": fgrpc.Interceptor,
    "grpc.aio.Interceptor": fgrpc_aio.Interceptor,
    "grpc.secure_channel": lambda source, **kw: fgrpc.secure_channel(source, "127.0.0.1:1", **kw),
    "grpc.aio.secure_channel": _aio_channel,
    "httpx.Client": fhttpx.Client,
    "httpx.AsyncClient": fhttpx.AsyncClient,
    "uvicorn.config": lambda source, **kw: fuvicorn.config(App(), source, **kw),
    "streams.start_server": _start_server,
}


async def _make(name: str, source: Any, **kw: Any) -> Any:
    made = MAKERS[name](source, **kw)
    return await made if isinstance(made, Awaitable) else made


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "a token as source": ({"source": "eyJhbGciOi.token"}, r"source must be .*not str: a token"),
    "None as source": ({"source": None}, r"source must be .*not NoneType"),
    "trust": ({"trust": "everyone"}, r"trust must be 'federation' or 'own', not 'everyone'"),
    "authoriser": ({"authoriser": "*.k8s.internal"}, r"authoriser must be callable"),
    "uncalled allow_names": (
        {"authoriser": federatls.allow_names},
        r"authoriser=allow_names is what makes an authoriser.*federatls\.allow_names\(\.\.\.\)",
    ),
}


# server_credentials takes no authoriser (the interceptor does).
CASES = [
    (name, case)
    for name in MAKERS
    for case in BAD
    if not (name == "grpc.server_credentials" and "authoriser" in BAD[case][0])
]


@pytest.mark.parametrize(("name", "case"), CASES)
async def test_bad_common_argument_refused_when_made(
    parties: tuple[Identity, Identity], name: str, case: str
) -> None:
    """A source that is not an identity, a trust other than "federation"/"own", or an
    authoriser that is not callable is a ``ConfigError`` naming the integration, when it is
    made. Twin: test_identity_and_renewing_identity_accepted."""
    arguments, message = BAD[case]
    kw: dict[str, Any] = {"source": parties[1], **arguments}
    with pytest.raises(ConfigError, match=message) as refused:
        await _make(name, kw.pop("source"), **kw)
    assert str(refused.value).startswith(f"federatls.integrations.{name}: ")


@pytest.mark.parametrize("renewing", [False, True], ids=["Identity", "RenewingIdentity"])
@pytest.mark.parametrize("name", MAKERS)
async def test_identity_and_renewing_identity_accepted(
    parties: tuple[Identity, Identity], name: str, renewing: bool
) -> None:
    """Every integration is made from an ``Identity`` or a ``RenewingIdentity`` with
    ``trust="own"`` and a callable authoriser. Twin: test_bad_common_argument_refused_when_made."""
    identity = parties[1]
    source = RenewingIdentity(identity) if renewing else identity
    kw: dict[str, Any] = {"trust": "own"}
    if name != "grpc.server_credentials":
        kw["authoriser"] = federatls.allow_names("*.cloud.internal")
    made = await _make(name, source, **kw)
    assert made is not None
    await _close(made)


def test_keep_renewed_refuses_what_is_not_an_identity(
    parties: tuple[Identity, Identity],
) -> None:
    """``keep_renewed`` given a ``RenewingIdentity`` (already renewed) or a token is a
    ``ConfigError`` saying what to pass instead. Twin: the plain ``Identity`` is accepted."""
    live = RenewingIdentity(parties[1])
    with pytest.raises(ConfigError, match=r"already a RenewingIdentity.*use it as it is"):
        RenewingIdentity(live)  # type: ignore[arg-type]
    with (
        pytest.raises(ConfigError, match=r"takes an Identity \(identity = await"),
        federatls.keep_renewed_sync("eyJhbGciOi.token"),  # type: ignore[arg-type]
    ):
        pass
    assert live.current is parties[1]


# An authoriser that raises something else ---------------------------------------------------
def _raising(peer: PeerInfo) -> None:
    raise ValueError("no idea who this is")


def _allowing(peer: PeerInfo) -> None:
    return None


def _problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records above a warning (a traceback logged by asyncio or gRPC would be one)."""
    return [r.getMessage() for r in caplog.records if r.levelno > logging.WARNING]


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


REFUSED_BY_VALUEERROR = r"the authoriser '_raising' raised ValueError\('no idea who this is'\)"


@pytest.mark.parametrize("authoriser", [_raising, _allowing], ids=["raising", "allowing"])
async def test_raising_client_authoriser_refuses_the_server(
    parties: tuple[Identity, Identity], authoriser: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A requests session whose authoriser raises ``ValueError`` refuses the server with a
    ``PeerNotAuthorisedError`` naming it (one log line, no traceback logged); the app is
    never called. Twin: an authoriser returning None reaches the app."""
    caplog.set_level(logging.WARNING)
    server, client = parties
    app = App()
    port, bind = bound_socket()
    async with serving(fhypercorn.config(server, bind=bind, graceful_timeout=1), app):

        def get() -> int:
            with frequests.Session(client, authoriser=authoriser) as session:
                return session.get(f"https://127.0.0.1:{port}/", timeout=10).status_code

        if authoriser is _raising:
            with pytest.raises(PeerNotAuthorisedError, match=REFUSED_BY_VALUEERROR) as refused:
                await anyio.to_thread.run_sync(get)
            assert refused.value.peer.common_name == "server.cloud.internal"
            await anyio.sleep(0.1)  # a request wrongly sent would have been answered by now
            assert app.versions == []
            assert len(_refusals(caplog)) == 1
        else:
            assert await anyio.to_thread.run_sync(get) == 200
            assert app.versions == ["1.1"]
    assert _problems(caplog) == []


@pytest.mark.parametrize("authoriser", [_raising, _allowing], ids=["raising", "allowing"])
async def test_raising_server_authoriser_refuses_the_client(
    parties: tuple[Identity, Identity], authoriser: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """hypercorn with an authoriser that raises ``ValueError`` cuts the client off in the
    handshake with one line naming it, and no traceback from asyncio's TLS; the app is
    never called. Twin: an authoriser returning None lets the client through."""
    caplog.set_level(logging.WARNING)
    server, client = parties
    app = App()
    port, bind = bound_socket()
    config = fhypercorn.config(server, bind=bind, graceful_timeout=1, authoriser=authoriser)
    async with serving(config, app):

        def get() -> int:
            with frequests.Session(client) as session:
                return session.get(f"https://127.0.0.1:{port}/", timeout=10).status_code

        if authoriser is _raising:
            with pytest.raises(requests.ConnectionError):
                await anyio.to_thread.run_sync(get)
            await anyio.sleep(0.1)
            assert app.versions == []
            lines = _refusals(caplog)
            assert len(lines) == 1, lines
            assert "refused a TLS client after the TLS handshake (authoriser)" in lines[0]
            assert "ValueError('no idea who this is')" in lines[0]
        else:
            assert await anyio.to_thread.run_sync(get) == 200
    assert _problems(caplog) == []


@pytest.mark.parametrize("authoriser", [_raising, _allowing], ids=["raising", "allowing"])
def test_raising_grpc_interceptor_authoriser_denies_the_call(
    parties: tuple[Identity, Identity], authoriser: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A gRPC interceptor whose authoriser raises ``ValueError`` ends the call with
    ``PERMISSION_DENIED`` naming it (not ``UNKNOWN`` and gRPC's traceback); the handler never
    runs. Twin: an authoriser returning None lets the call through."""
    caplog.set_level(logging.WARNING)
    server_identity, client = parties
    handled: list[bytes] = []

    def hello(request: bytes, context: Any) -> bytes:
        handled.append(request)
        return b"hello"

    server = grpc.server(
        ThreadPoolExecutor(2),
        interceptors=[fgrpc.Interceptor(server_identity, authoriser=authoriser)],
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "demo.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(hello)}
            )
        ]
    )
    port = server.add_secure_port("127.0.0.1:0", fgrpc.server_credentials(server_identity))
    server.start()
    name = [("grpc.ssl_target_name_override", "server.cloud.internal")]
    try:
        with fgrpc.secure_channel(client, f"127.0.0.1:{port}", options=name) as channel:
            call = channel.unary_unary("/demo.Greeter/Hello")
            if authoriser is _raising:
                with pytest.raises(grpc.RpcError) as refused:
                    call(b"hi", timeout=30)
                assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
                assert "ValueError('no idea who this is')" in refused.value.details()
                assert handled == []
                assert len(_refusals(caplog)) == 1
            else:
                assert call(b"hi", timeout=30) == b"hello"
                assert handled == [b"hi"]
    finally:
        server.stop(None)
    assert _problems(caplog) == []


# The other flavour's interceptor ------------------------------------------------------------
def _greeter(handled: list[bytes]) -> Any:
    def hello(request: bytes, context: Any) -> bytes:
        handled.append(request)
        return b"hello " + fgrpc.peer(context).common_name.encode()

    return grpc.method_handlers_generic_handler(
        "demo.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(hello)}
    )


@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "refused"])
@pytest.mark.parametrize("server_kind", ["grpc.server", "grpc.aio.server"])
async def test_either_interceptor_serves_either_server(
    parties: tuple[Identity, Identity], server_kind: str, allowed: bool
) -> None:
    """``grpc.server`` given the aio ``Interceptor`` and ``grpc.aio.server`` given the sync
    one (an easy slip: both are called ``Interceptor``) still check every call: a client the
    authoriser allows is served and its handler sees its peer; twin: a client it refuses
    gets ``PERMISSION_DENIED`` (was: gRPC's server thread died on an unawaited coroutine, or
    grpc.aio's ValueError "Interceptor must be ServerInterceptor")."""
    server_identity, client = parties
    rule = federatls.allow_names("*.k8s.internal" if allowed else "*.cloud.internal")
    handled: list[bytes] = []
    name = [("grpc.ssl_target_name_override", "server.cloud.internal")]
    credentials = fgrpc.server_credentials(server_identity)
    if server_kind == "grpc.server":
        interceptor = fgrpc_aio.Interceptor(server_identity, authoriser=rule)
        server = grpc.server(ThreadPoolExecutor(2), interceptors=[interceptor])
        server.add_generic_rpc_handlers([_greeter(handled)])
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
    else:
        interceptor = fgrpc.Interceptor(server_identity, authoriser=rule)
        aio_server = grpc.aio.server(interceptors=[interceptor])
        aio_server.add_generic_rpc_handlers([_greeter(handled)])
        port = aio_server.add_secure_port("127.0.0.1:0", credentials)
        await aio_server.start()
    try:
        async with fgrpc_aio.secure_channel(client, f"127.0.0.1:{port}", options=name) as channel:
            call = channel.unary_unary("/demo.Greeter/Hello")
            if allowed:
                assert await call(b"hi", timeout=30) == b"hello client.k8s.internal"
                assert handled == [b"hi"]
            else:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(b"hi", timeout=30)
                assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
                assert handled == []
    finally:
        if server_kind == "grpc.server":
            server.stop(None)
        else:
            await aio_server.stop(None)
