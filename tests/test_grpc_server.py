"""gRPC servers, sync (``grpc.server``) and asyncio (``grpc.aio.server``), with mutual TLS from a
federatls identity: ``server_credentials`` (gRPC's own TLS, fed the live certificate and the
roots trusted now) and the interceptor that checks every call's client before its handler
runs (chain against the roots trusted now, name rules, authoriser; ``PERMISSION_DENIED``).

Real CAs (``federatls.testing``, and tests/traffic.py's CAs with three-second certificates)
issue every certificate; real gRPC servers on 127.0.0.1; the clients are plain
``grpc.secure_channel``s from PEM bytes of a client identity, rebuilt for each new snapshot.
Handlers are generic (bytes in, bytes out), one per call shape, and record who called them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.to_thread
import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import federatls.integrations.grpc as fgrpc
import federatls.integrations.grpc.aio as faio
from federatls import (
    Authoriser,
    BadMaterialError,
    ConfigError,
    Identity,
    PeerInfo,
    Provenance,
    RenewalPolicy,
    RenewingIdentity,
    TrustBundle,
    TrustedRoot,
    allow_names,
)
from federatls._authorise import NamePattern
from federatls._peer import grpc_presented_pem, peer_from_chain
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import add_root, issue_from_new_root, retire_old_roots
from federatls.integrations.grpc import _server
from federatls.testing import TestCA, federated_pair, running_ca

from harness import SHORT, wait_until
from traffic import LONG, SERVER_NAMES, enrol, federatls_ca, renewals, renewing

pytestmark = pytest.mark.anyio

SERVICE = "federatls.test.Echo"
SHAPES = ["unary_unary", "unary_stream", "stream_unary", "stream_stream"]
FLAVOURS = ["sync", "aio", "aio-sync"]  # aio-sync: sync handlers on a grpc.aio server
WAIT = 30.0  # seconds for any one condition, on a loaded machine
Source = Identity | RenewingIdentity


# Handlers that record who called them ---------------------------------------------------------
@dataclasses.dataclass
class Handled:
    """Every call a handler ran: its shape and its client as ``peer(context)`` gave it."""

    calls: list[tuple[str, PeerInfo]] = dataclasses.field(default_factory=list)

    def shapes(self) -> list[str]:
        return [shape for shape, _ in self.calls]


def sync_handlers(handled: Handled) -> Any:
    def unary_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        handled.calls.append(("unary_unary", fgrpc.peer(context)))
        return b"uu:" + request

    def unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        handled.calls.append(("unary_stream", fgrpc.peer(context)))
        for i in range(3):
            yield request + str(i).encode()

    def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        handled.calls.append(("stream_unary", fgrpc.peer(context)))
        return b"+".join(requests)

    def stream_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        handled.calls.append(("stream_stream", fgrpc.peer(context)))
        for request in requests:
            yield request.upper()

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "unary_unary": grpc.unary_unary_rpc_method_handler(unary_unary),
            "unary_stream": grpc.unary_stream_rpc_method_handler(unary_stream),
            "stream_unary": grpc.stream_unary_rpc_method_handler(stream_unary),
            "stream_stream": grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )


def aio_handlers(handled: Handled) -> Any:
    async def unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        handled.calls.append(("unary_unary", faio.peer(context)))
        return b"uu:" + request

    async def unary_stream(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        handled.calls.append(("unary_stream", faio.peer(context)))
        for i in range(3):
            yield request + str(i).encode()

    async def stream_unary(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        handled.calls.append(("stream_unary", faio.peer(context)))
        return b"+".join([r async for r in requests])

    async def stream_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        handled.calls.append(("stream_stream", faio.peer(context)))
        async for request in requests:
            yield request.upper()

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "unary_unary": grpc.unary_unary_rpc_method_handler(unary_unary),
            "unary_stream": grpc.unary_stream_rpc_method_handler(unary_stream),
            "stream_unary": grpc.stream_unary_rpc_method_handler(stream_unary),
            "stream_stream": grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )


@contextlib.asynccontextmanager
async def serving(
    flavour: str,
    source: Source,
    handled: Handled,
    *,
    authoriser: Authoriser | None = None,
    trust: Any = "federation",
) -> AsyncIterator[int]:
    """A gRPC server of ``flavour`` for ``source`` on 127.0.0.1; its port."""
    credentials = fgrpc.server_credentials(source, trust=trust)
    if flavour == "sync":
        server = grpc.server(
            ThreadPoolExecutor(8),
            handlers=[sync_handlers(handled)],
            interceptors=[fgrpc.Interceptor(source, authoriser=authoriser, trust=trust)],
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        try:
            yield port
        finally:
            server.stop(None).wait()
        return
    aserver = grpc.aio.server(
        ThreadPoolExecutor(8) if flavour == "aio-sync" else None,
        handlers=[sync_handlers(handled) if flavour == "aio-sync" else aio_handlers(handled)],
        interceptors=[faio.Interceptor(source, authoriser=authoriser, trust=trust)],
    )
    port = aserver.add_secure_port("127.0.0.1:0", credentials)
    await aserver.start()
    try:
        yield port
    finally:
        await aserver.stop(None)


# Plain gRPC clients ---------------------------------------------------------------------------
def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """Plain gRPC client credentials from ``identity``'s PEM (the test's client side)."""
    return grpc.ssl_channel_credentials(
        root_certificates=identity.trust.pem.encode(),
        private_key=identity.export_private_key(password=None),
        certificate_chain=identity.chain_pem.encode(),
    )


def invoke(channel: grpc.Channel, shape: str) -> Any:
    """One call of ``shape``; its answer (responses as a list for response streams)."""
    method = f"/{SERVICE}/{shape}"
    if shape == "unary_unary":
        return channel.unary_unary(method)(b"hi", timeout=10)
    if shape == "unary_stream":
        return list(channel.unary_stream(method)(b"hi", timeout=10))
    if shape == "stream_unary":
        return channel.stream_unary(method)(iter([b"a", b"b"]), timeout=10)
    return list(channel.stream_stream(method)(iter([b"a", b"b"]), timeout=10))


ANSWERS = {
    "unary_unary": b"uu:hi",
    "unary_stream": [b"hi0", b"hi1", b"hi2"],
    "stream_unary": b"a+b",
    "stream_stream": [b"A", b"B"],
}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A call's answer, or its status code and details."""

    answer: Any = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


def attempt(channel: grpc.Channel, shape: str) -> Outcome:
    try:
        return Outcome(invoke(channel, shape))
    except grpc.RpcError as exc:
        return Outcome(None, exc.code(), exc.details() or "")


async def call_once(identity: Identity, port: int, shape: str) -> Outcome:
    """One call of ``shape`` on a new channel from ``identity`` (on a worker thread)."""

    def blocking() -> Outcome:
        with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(identity)) as channel:
            return attempt(channel, shape)

    return await anyio.to_thread.run_sync(blocking)


async def call_twice(identity: Identity, port: int, shape: str) -> list[Outcome]:
    """Two calls of ``shape`` on one new channel from ``identity``: the second finds the
    verdict the server remembered from the first."""

    def blocking() -> list[Outcome]:
        with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(identity)) as channel:
            return [attempt(channel, shape), attempt(channel, shape)]

    return await anyio.to_thread.run_sync(blocking)


def served_serial(identity: Identity, port: int) -> int:
    """The serial of the certificate the server on ``port`` presents to a new connection."""
    ctx = identity.client_context()
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# The world of the short tests -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class World:
    cloud: TestCA
    kubernetes: TestCA
    server: Identity  # cloud: server.cloud.internal, 127.0.0.1, localhost
    client: Identity  # kubernetes: client.k8s.internal
    impostor: Identity  # kubernetes: payments.cloud.internal
    stranger: Identity  # a CA nobody federates with: client.partner.internal


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with federated_pair() as (cloud, kubernetes), running_ca("partner") as partner:
        yield World(
            cloud,
            kubernetes,
            cloud.identity("server.cloud.internal", sans=SERVER_NAMES),
            kubernetes.identity("client.k8s.internal"),
            kubernetes.identity("payments.cloud.internal"),
            partner.identity("client.partner.internal"),
        )


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "federatls.peer" and "refused the gRPC call" in r.getMessage()
    ]


# 1. Who gets in -------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_federated_client_admitted_all_shapes(world: World, flavour: str) -> None:
    """A client of the federated kubernetes CA is served in every call shape, and each
    handler gets its PeerInfo (serial, anchored in kubernetes' root, federated). Twin:
    test_non_federated_client_refused_in_handshake."""
    handled = Handled()
    async with serving(flavour, world.server, handled) as port:
        outcomes = {shape: await call_once(world.client, port, shape) for shape in SHAPES}
    assert {s: o.answer for s, o in outcomes.items()} == ANSWERS
    assert sorted(handled.shapes()) == sorted(SHAPES)
    for _, peer in handled.calls:
        assert peer.common_name == "client.k8s.internal"
        assert peer.serial == world.client.serial
        assert peer.anchor is not None
        assert peer.anchor.fingerprint == world.kubernetes.root_fingerprint
        assert peer.anchor.provenance is Provenance.FEDERATED
        assert [c.serial_number for c in peer.chain[:2]] == [
            c.serial_number for c in world.client.chain
        ]


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_identity_peer_of_a_call(world: World, flavour: str) -> None:
    """``identity.peer(context)`` in a handler gives the PeerInfo ``peer(context)`` gives
    (as ``live.peer(x)`` does for other integrations). Twin: without a client certificate
    (a plaintext port) it is a ``BadMaterialError``."""
    seen: list[tuple[PeerInfo, PeerInfo]] = []

    def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append((world.server.peer(context), fgrpc.peer(context)))
        return request

    async def hello_async(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append((world.server.peer(context), faio.peer(context)))
        return request

    behaviour = hello if flavour == "sync" else hello_async
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"unary_unary": grpc.unary_unary_rpc_method_handler(behaviour)}
    )
    credentials = fgrpc.server_credentials(world.server)
    if flavour == "sync":
        server = grpc.server(
            ThreadPoolExecutor(2),
            handlers=[handler],
            interceptors=[fgrpc.Interceptor(world.server)],
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        outcome = await call_once(world.client, port, "unary_unary")
        server.stop(None).wait()
    else:
        aserver = grpc.aio.server(handlers=[handler], interceptors=[faio.Interceptor(world.server)])
        port = aserver.add_secure_port("127.0.0.1:0", credentials)
        await aserver.start()
        outcome = await call_once(world.client, port, "unary_unary")
        await aserver.stop(None)
    assert outcome.answer == b"hi"
    assert len(seen) == 1
    assert seen[0][0] == seen[0][1]
    assert seen[0][0].common_name == "client.k8s.internal"

    # The twin: a plaintext call (no interceptor on this server to refuse it first).
    errors: list[Exception] = []

    def plain(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            world.server.peer(context)
        except BadMaterialError as exc:
            errors.append(exc)
        return request

    bare = grpc.server(
        ThreadPoolExecutor(2),
        handlers=[
            grpc.method_handlers_generic_handler(
                SERVICE, {"unary_unary": grpc.unary_unary_rpc_method_handler(plain)}
            )
        ],
    )
    plain_port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()

    def plaintext_call() -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{plain_port}") as channel:
            return channel.unary_unary(f"/{SERVICE}/unary_unary")(b"hi", timeout=10)

    try:
        assert await anyio.to_thread.run_sync(plaintext_call) == b"hi"
    finally:
        bare.stop(None).wait()
    assert len(errors) == 1
    assert "no certificate" in str(errors[0])


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_non_federated_client_refused_in_handshake(world: World, flavour: str) -> None:
    """A client of a CA the server's bundle does not hold fails gRPC's handshake
    (UNAVAILABLE) and no handler runs. Twin: test_federated_client_admitted_all_shapes."""
    handled = Handled()
    async with serving(flavour, world.server, handled) as port:
        outcome = await call_once(world.stranger, port, "unary_unary")
        admitted = await call_once(world.client, port, "unary_unary")
    assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert admitted.answer == b"uu:hi"
    assert [p.common_name for _, p in handled.calls] == ["client.k8s.internal"]


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_own_trust_refuses_federated_client(world: World, flavour: str) -> None:
    """With ``trust="own"`` the server trusts only cloud's roots: the kubernetes client fails
    the handshake, a cloud client is served. Twin: the federated client admitted above."""
    neighbour = world.cloud.identity("worker.cloud.internal")
    handled = Handled()
    async with serving(flavour, world.server, handled, trust="own") as port:
        refused = await call_once(world.client, port, "unary_unary")
        served = await call_once(neighbour, port, "unary_unary")
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert served.answer == b"uu:hi"
    assert [p.common_name for _, p in handled.calls] == ["worker.cloud.internal"]


# 2. The authoriser ----------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("shape", SHAPES)
async def test_authoriser_refusal(
    world: World, flavour: str, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client the authoriser refuses gets PERMISSION_DENIED naming the refusal, in every
    call shape, at its first call and at the next on the same connection (the refusal
    remembered is a refusal still); its handler never runs; one log line per call. Twin:
    the same client with an authoriser allowing ``*.k8s.internal`` is served."""
    caplog.set_level(logging.WARNING, "federatls.peer")
    handled = Handled()
    async with serving(
        flavour, world.server, handled, authoriser=allow_names("*.cloud.internal")
    ) as port:
        outcomes = await call_twice(world.client, port, shape)
    for refused in outcomes:
        assert refused.code is grpc.StatusCode.PERMISSION_DENIED
        assert "authoriser" in refused.details
        assert "client.k8s.internal" in refused.details
    assert handled.calls == []
    lines = refusals(caplog)
    assert len(lines) == 2, lines
    assert all(f"/{SERVICE}/{shape}" in line for line in lines)

    allowed = Handled()
    async with serving(
        flavour, world.server, allowed, authoriser=allow_names("*.k8s.internal")
    ) as port:
        served = await call_once(world.client, port, shape)
    assert served.answer == ANSWERS[shape]
    assert allowed.shapes() == [shape]


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_unknown_method_refused_before_it_is_named(world: World, flavour: str) -> None:
    """A method no handler serves is PERMISSION_DENIED for a client the authoriser refuses,
    so it cannot learn which methods exist. Twin: an admitted client gets UNIMPLEMENTED."""

    def unknown(identity: Identity, port: int) -> Outcome:
        target = f"127.0.0.1:{port}"
        with grpc.secure_channel(target, channel_credentials(identity)) as channel:
            try:
                return Outcome(channel.unary_unary(f"/{SERVICE}/nothing")(b"hi", timeout=10))
            except grpc.RpcError as exc:
                return Outcome(None, exc.code(), exc.details() or "")

    async with serving(
        flavour, world.server, Handled(), authoriser=allow_names("*.cloud.internal")
    ) as port:
        refused = await anyio.to_thread.run_sync(unknown, world.client, port)
        neighbour = world.cloud.identity("worker.cloud.internal")
        admitted = await anyio.to_thread.run_sync(unknown, neighbour, port)
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert admitted.code is grpc.StatusCode.UNIMPLEMENTED


def test_checked_handlers_reused_and_every_call_still_checked(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interceptor makes a method's checked handler once and reuses it, yet checks every
    call: an admitted client, then a refused one on the same method (PERMISSION_DENIED),
    then the admitted one again. A generic handler making a new handler object per call
    keeps the interceptor's memory bounded. Twin: the refused call in the middle."""
    monkeypatch.setattr(fgrpc._server._Wrapped, "_SIZE", 4)

    class Fresh(grpc.GenericRpcHandler):  # type: ignore[misc]
        """A new handler object at every call (as some frameworks' dispatchers do)."""

        def service(self, details: Any) -> Any:
            if details.method != f"/{SERVICE}/fresh":
                return None
            return grpc.unary_unary_rpc_method_handler(lambda request, context: b"f:" + request)

    interceptor = fgrpc.Interceptor(world.server, authoriser=allow_names("*.cloud.internal"))
    wrapped: list[str] = []  # the methods whose checked handler was made, once per making
    make = interceptor._sync._wrap

    def counted(checker: Any, handler: Any, method: str) -> Any:
        wrapped.append(method)
        return make(checker, handler, method)

    interceptor._sync._wrap = counted
    server = grpc.server(
        ThreadPoolExecutor(4),
        handlers=[sync_handlers(Handled()), Fresh()],
        interceptors=[interceptor],
    )
    port = server.add_secure_port("127.0.0.1:0", fgrpc.server_credentials(world.server))
    server.start()
    neighbour = world.cloud.identity("worker.cloud.internal")
    try:
        with (
            grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(neighbour)) as ok,
            grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(world.client)) as no,
        ):
            before = [attempt(ok, "unary_unary") for _ in range(3)]
            refused = attempt(no, "unary_unary")
            after = attempt(ok, "unary_unary")
            fresh = [ok.unary_unary(f"/{SERVICE}/fresh")(b"x", timeout=10) for _ in range(10)]
    finally:
        server.stop(None).wait()
    assert [o.answer for o in before] == [b"uu:hi"] * 3
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert "client.k8s.internal" in refused.details
    assert after.answer == b"uu:hi"
    assert fresh == [b"f:x"] * 10
    assert wrapped.count(f"/{SERVICE}/unary_unary") == 1
    assert wrapped.count(f"/{SERVICE}/fresh") == 10
    assert len(interceptor._sync._made) == 4


def test_remembered_verdict_used_only_for_the_same_certificates(world: World) -> None:
    """Verdicts are filed under the end of the presented leaf, and one is used only when the
    certificates presented are the same byte for byte: a refused client whose leaf's end
    finds an admitted client's verdict there (as a collision would) is still refused, and
    the admitted client is admitted. Twin: the admitted client's own calls, before and
    after."""
    interceptor = fgrpc.Interceptor(world.server, authoriser=allow_names("*.cloud.internal"))
    server = grpc.server(
        ThreadPoolExecutor(2), handlers=[sync_handlers(Handled())], interceptors=[interceptor]
    )
    port = server.add_secure_port("127.0.0.1:0", fgrpc.server_credentials(world.server))
    server.start()
    neighbour = world.cloud.identity("worker.cloud.internal")
    verdicts = interceptor._checker._verdicts
    try:
        with (
            grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(neighbour)) as ok,
            grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(world.client)) as no,
        ):
            before = attempt(ok, "unary_unary")
            (admitted,) = verdicts.values()
            refused_leaf = world.client.certificate.public_bytes(serialization.Encoding.PEM)
            verdicts[refused_leaf[-64:]] = admitted  # the admitted client's verdict
            refused = attempt(no, "unary_unary")
            after = attempt(ok, "unary_unary")
    finally:
        server.stop(None).wait()
    assert before.answer == after.answer == b"uu:hi"
    assert admitted[2].peer is not None
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert "client.k8s.internal" in refused.details
    assert verdicts[refused_leaf[-64:]][2].peer is None  # judged afresh


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_presented_certificates_read_as_grpc_gives_them(world: World, flavour: str) -> None:
    """What the interceptor reads of the client's certificates (a sync server: gRPC's raw
    call properties; grpc.aio: its public ``auth_context()``) is what the public
    ``auth_context()`` gives, and is the client's chain; on a sync server the raw way is the
    one taken with this gRPC (else the speed it buys would be lost unnoticed). Twin:
    test_authoriser_refusal (what is read this way refuses a client the authoriser does not
    allow)."""
    read: list[tuple[Any, tuple[bytes, bytes], tuple[bytes, bytes]]] = []

    def record(context: Any) -> bytes:
        raw_call = _server._raw_call(context)
        read.append((raw_call, _server._presented(context), grpc_presented_pem(context)))
        return b"ok"

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return record(context)

    async def unary_async(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return record(context)

    behaviour = unary if flavour == "sync" else unary_async
    handlers = [
        grpc.method_handlers_generic_handler(
            SERVICE, {"read": grpc.unary_unary_rpc_method_handler(behaviour)}
        )
    ]
    credentials = fgrpc.server_credentials(world.server)
    method = f"/{SERVICE}/read"
    if flavour == "sync":
        server = grpc.server(ThreadPoolExecutor(2), handlers=handlers)
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        try:
            with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(world.client)) as ch:
                await anyio.to_thread.run_sync(lambda: ch.unary_unary(method)(b"", timeout=10))
        finally:
            server.stop(None).wait()
    else:
        aserver = grpc.aio.server(handlers=handlers)
        port = aserver.add_secure_port("127.0.0.1:0", credentials)
        await aserver.start()
        try:
            target = f"127.0.0.1:{port}"
            async with grpc.aio.secure_channel(target, channel_credentials(world.client)) as ch:
                await ch.unary_unary(method)(b"", timeout=10)
        finally:
            await aserver.stop(None)
    [(raw_call, presented, public)] = read
    assert (raw_call is not None) == (flavour == "sync")
    assert presented == public
    leaf, rest = presented
    assert load_pem_certificate(leaf.decode()).serial_number == world.client.serial
    assert rest  # the client sent its intermediate


# 3. Name rules --------------------------------------------------------------------------------
def with_k8s_rule(identity: Identity, names: tuple[str, ...], *, rules: bool = True) -> Identity:
    """``identity`` trusting kubernetes' root only for ``names`` (as a CA following kubernetes
    by URL publishes it); ``rules=False``: the same, enrolled with name_rules=False."""
    roots = tuple(
        root
        if root.provenance is Provenance.OWN
        else TrustedRoot.of(
            root.certificate,
            Provenance.PEER,
            names=tuple(NamePattern.parse(n) for n in names),
            peers=("kubernetes",),
        )
        for root in identity.trust
    )
    return dataclasses.replace(identity, trust=TrustBundle(roots), name_rules=rules)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_name_rules_enforced(
    world: World, flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Kubernetes' root may vouch only for ``*.k8s.internal``: its impostor naming itself
    ``payments.cloud.internal`` passes gRPC's handshake but every call is refused by the name
    rules (PERMISSION_DENIED, no handler run). Twins: client.k8s.internal is served; with
    name rules off, the impostor is served."""
    caplog.set_level(logging.WARNING, "federatls.peer")
    server = with_k8s_rule(world.server, ("*.k8s.internal",))
    handled = Handled()
    async with serving(flavour, server, handled) as port:
        impostor = await call_once(world.impostor, port, "unary_unary")
        client = await call_once(world.client, port, "unary_unary")
    assert impostor.code is grpc.StatusCode.PERMISSION_DENIED
    assert "name rules" in impostor.details
    assert "payments.cloud.internal" in impostor.details
    assert client.answer == b"uu:hi"
    assert [p.common_name for _, p in handled.calls] == ["client.k8s.internal"]
    assert len(refusals(caplog)) == 1

    off = Handled()
    async with serving(
        flavour, with_k8s_rule(world.server, ("*.k8s.internal",), rules=False), off
    ) as port:
        unchecked = await call_once(world.impostor, port, "unary_unary")
    assert unchecked.answer == b"uu:hi"
    assert [p.common_name for _, p in off.calls] == ["payments.cloud.internal"]


# 4. A root dropped while a connection is open -------------------------------------------------
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_dropped_root_refused_on_open_connection(flavour: str) -> None:
    """Once cloud stops federating kubernetes and the live server has renewed, a call on a
    connection opened before (its handshake done against the old bundle) is refused with
    PERMISSION_DENIED (its chain no longer reaches a root trusted now), and a new connection
    fails the handshake. Twin: the same connection's call before the drop is served."""
    with federated_pair(claims=SHORT, backdate="1s") as (cloud, kubernetes):
        client = kubernetes.identity("client.k8s.internal", lifetime=LONG)
        k8s_root = kubernetes.root_fingerprint
        handled = Handled()
        async with anyio.create_task_group() as tg:
            live = await renewing(tg, cloud.identity("server.cloud.internal", sans=SERVER_NAMES))
            async with serving(flavour, live, handled) as port:
                channel = grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(client))
                try:
                    before = await anyio.to_thread.run_sync(attempt, channel, "unary_stream")
                    await anyio.to_thread.run_sync(cloud.federate)  # no federated roots
                    await wait_until(
                        lambda: live.current.trust.by_fingerprint(k8s_root) is None, WAIT
                    )
                    after = await anyio.to_thread.run_sync(attempt, channel, "unary_stream")
                    fresh = await call_once(client, port, "unary_unary")
                finally:
                    channel.close()
            tg.cancel_scope.cancel()
    assert before.answer == ANSWERS["unary_stream"]
    assert after.code is grpc.StatusCode.PERMISSION_DENIED
    assert "root trusted now" in after.details
    assert fresh.code is grpc.StatusCode.UNAVAILABLE
    assert handled.shapes() == ["unary_stream"]


def tls_session(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSession | None, bool]:
    """A TLS connection speaking HTTP/2's preface to the gRPC server on ``port``, offering
    ``session``: the session (its ticket read with the server's first frames), None when the
    server refused the client, and whether the session was resumed."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
                tls.sendall(preface)
                # The server's SETTINGS frame (the ticket comes before it); nothing when it
                # refused the client after the client's side of a TLS 1.3 handshake ended.
                answer = tls.recv(9)
                return (tls.session if answer else None), bool(tls.session_reused)
        except (ssl.SSLError, ConnectionError):
            return None, False


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
async def test_no_resumption_across_a_dropped_root(version: str) -> None:
    """gRPC's server issues session tickets and resumes sessions (federatls cannot turn that
    off), but a new snapshot hands gRPC a new configuration, whose handshakes do not accept
    tickets from before: after cloud stops federating kubernetes, a kubernetes client
    offering its earlier session is not resumed, and fails the handshake. Twin: before the
    drop the same session is resumed."""
    with federated_pair(claims=SHORT, backdate="1s") as (cloud, kubernetes):
        client = kubernetes.identity("client.k8s.internal", lifetime=LONG)
        ctx = client.client_context()
        ctx.maximum_version = ctx.minimum_version = ssl.TLSVersion[version]
        ctx.set_alpn_protocols(["h2"])
        server = cloud.identity("server.cloud.internal", sans=SERVER_NAMES, lifetime=LONG)
        async with anyio.create_task_group() as tg:
            # Not renewed while the test runs: only the trust refresh makes a new snapshot.
            live = await renewing(tg, server, RenewalPolicy(trust_refresh=timedelta(seconds=1)))
            async with serving("sync", live, Handled()) as port:
                session, _ = await anyio.to_thread.run_sync(tls_session, ctx, port)
                resumed_before = await anyio.to_thread.run_sync(tls_session, ctx, port, session)
                await anyio.to_thread.run_sync(cloud.federate)  # no federated roots
                k8s_root = kubernetes.root_fingerprint
                await wait_until(lambda: live.current.trust.by_fingerprint(k8s_root) is None, WAIT)
                resumed_after = await anyio.to_thread.run_sync(tls_session, ctx, port, session)
            tg.cancel_scope.cancel()
    assert session is not None
    assert session.has_ticket
    assert resumed_before[1] is True
    assert resumed_after == (None, False)


# 5. Misuse ------------------------------------------------------------------------------------
async def test_plaintext_port_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A call on an insecure port of a server with the interceptor is refused (no client
    certificate): the interceptor does not trust a port it cannot see the TLS of. Twin: the
    secure port serves (test_federated_client_admitted_all_shapes)."""
    caplog.set_level(logging.WARNING, "federatls.peer")
    handled = Handled()
    server = grpc.server(
        ThreadPoolExecutor(2),
        handlers=[sync_handlers(handled)],
        interceptors=[fgrpc.Interceptor(world.server)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:

        def blocking() -> Outcome:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                return attempt(channel, "unary_unary")

        outcome = await anyio.to_thread.run_sync(blocking)
    finally:
        server.stop(None).wait()
    assert outcome.code is grpc.StatusCode.PERMISSION_DENIED
    assert "no certificate" in outcome.details
    assert handled.calls == []
    assert len(refusals(caplog)) == 1


def test_bad_arguments(world: World) -> None:
    """A trust choice other than "federation" or "own", or an authoriser that is not
    callable, is a ``ConfigError`` when the credentials or interceptor are built."""
    with pytest.raises(ConfigError, match="trust must be"):
        fgrpc.server_credentials(world.server, trust="everyone")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="trust must be"):
        fgrpc.Interceptor(world.server, trust="everyone")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="authoriser must be callable"):
        faio.Interceptor(world.server, authoriser="*.k8s.internal")  # type: ignore[arg-type]


def test_peer_outside_an_admitted_call() -> None:
    """``peer(context)`` for a call no federatls interceptor admitted is a
    ``BadMaterialError`` saying to add the interceptor."""
    with pytest.raises(BadMaterialError, match="interceptors="):
        fgrpc.peer(object())


def test_peer_from_chain(world: World) -> None:
    """``peer_from_chain`` rebuilds leaf, intermediate, root from what a client presented (in
    any order, with extras); twin: the same chain against a bundle without its root, or
    without its intermediate, is a ``BadMaterialError``."""
    leaf, intermediate = world.client.chain
    stranger = world.stranger.chain[1]
    found = peer_from_chain([leaf, stranger, intermediate, leaf], world.server.trust)
    assert found.anchor is not None
    assert found.anchor.fingerprint == world.kubernetes.root_fingerprint
    assert [fingerprint(c) for c in found.chain] == [
        fingerprint(leaf),
        fingerprint(intermediate),
        world.kubernetes.root_fingerprint,
    ]
    with pytest.raises(BadMaterialError, match="root trusted now"):
        peer_from_chain([leaf, intermediate], world.server.own_roots)
    with pytest.raises(BadMaterialError, match="root trusted now"):
        peer_from_chain([leaf], world.server.trust)
    with pytest.raises(BadMaterialError, match="no certificate"):
        peer_from_chain([], world.server.trust)


# 6. Live traffic: renewals on both sides and a root rotation ----------------------------------
class Caller:
    """A plain gRPC client that keeps calling both servers in every shape from a worker
    thread, its channel rebuilt for each new snapshot of ``live``: what it got, and failures."""

    def __init__(self, live: RenewingIdentity, ports: list[int]) -> None:
        self.live = live
        self.ports = ports
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        identity: Identity | None = None
        channels: list[grpc.Channel] = []
        try:
            while not self.stop.is_set():
                if self.live.current is not identity:
                    identity = self.live.current
                    for channel in channels:
                        channel.close()
                    credentials = channel_credentials(identity)
                    channels = [
                        grpc.secure_channel(f"127.0.0.1:{port}", credentials) for port in self.ports
                    ]
                for channel in channels:
                    for shape in SHAPES:
                        outcome = attempt(channel, shape)
                        if outcome.answer == ANSWERS[shape]:
                            self.ok += 1
                        else:
                            self.failures.append(f"{shape}: {outcome}")
                self.stop.wait(0.02)
        finally:
            for channel in channels:
                channel.close()

    async def more(self, count: int = 8) -> None:
        target = self.ok + len(self.failures) + count
        await wait_until(lambda: self.ok + len(self.failures) >= target, WAIT)


@pytest.mark.timeout(240)
async def test_live_traffic_through_renewals_and_a_rotation() -> None:
    """Kubernetes rotates its root (add B, issue from B, retire A) while cloud follows it by
    URL (name rules: ``*.k8s.internal``); a cloud server renewing every ~2 s (sync and aio
    servers on the same live identity) and a kubernetes client renewing as often (a plain
    channel rebuilt per snapshot) keep calling in every shape: no call fails, the server
    presents its renewed certificate to a new connection, sees the client's renewed
    certificates and ends seeing it anchored in B. Twin: test_dropped_root_refused_on_open_
    connection (a root gone is refused on the same server)."""
    sync_seen, aio_seen = Handled(), Handled()
    async with federatls_ca("cloud") as cloud, federatls_ca("kubernetes") as kubernetes:
        await kubernetes.federate(cloud)
        await cloud.follow(kubernetes, ["*.k8s.internal"])
        a = fingerprint(kubernetes.root)
        names = {a: "A"}
        async with anyio.create_task_group() as tg:
            server = await renewing(tg, await enrol(cloud, "server.cloud.internal", SERVER_NAMES))
            await wait_until(
                lambda: any(r.provenance is Provenance.PEER for r in server.current.trust), WAIT
            )
            client = await renewing(tg, await enrol(kubernetes, "client.k8s.internal"))
            async with (
                serving("sync", server, sync_seen) as sync_port,
                serving("aio", server, aio_seen) as aio_port,
                anyio.create_task_group() as drivers,
            ):
                caller = Caller(client, [sync_port, aio_port])
                drivers.start_soon(anyio.to_thread.run_sync, caller.run)
                await caller.more()

                # The server's renewal reaches new connections.
                old_serial = server.current.serial
                await wait_until(lambda: server.current.serial != old_serial, WAIT)
                newer = server.current.serial
                presented = [
                    await anyio.to_thread.run_sync(served_serial, client.current, p)
                    for p in (sync_port, aio_port)
                ]
                newest = server.current.serial

                # Phase 1: kubernetes trusts A and B and issues from A; cloud learns B.
                step = add_root(kubernetes.directory, kubernetes.password, now=datetime.now(UTC))
                b = fingerprint(load_pem_certificate(step.roots[-1].read_bytes()))
                names[b] = "B"
                await kubernetes.reload()
                await wait_until(lambda: server.current.trust.by_fingerprint(b) is not None, WAIT)
                await renewals(server, client, count=1)
                await caller.more()
                # Phase 2: kubernetes issues from B; its client renews onto B.
                issue_from_new_root(kubernetes.directory)
                await kubernetes.reload()
                await wait_until(lambda: _anchor(client.current) == b, WAIT)
                await renewals(server, client, count=1)
                await caller.more()
                # Phase 3: kubernetes retires A; cloud's server drops it.
                retire_old_roots(kubernetes.directory)
                await kubernetes.reload()
                await wait_until(lambda: server.current.trust.by_fingerprint(a) is None, WAIT)
                await renewals(server, client, count=1)
                await caller.more()
                caller.stop.set()
            server_renewals, client_renewals = server.renewals, client.renewals
            assert server.stopped is None
            assert client.stopped is None
            tg.cancel_scope.cancel()

    assert caller.failures == [], caller.failures[:3]
    assert caller.ok >= 32
    assert server_renewals >= 3
    assert client_renewals >= 3
    assert all(s in (newer, newest) for s in presented), (presented, old_serial)
    for seen in (sync_seen, aio_seen):
        serials = {p.serial for _, p in seen.calls}
        assert len(serials) >= 3  # the client's renewed certificates reached the server
        last = seen.calls[-1][1]
        assert last.anchor is not None
        assert names.get(last.anchor.fingerprint) == "B"
        assert last.anchor.provenance is Provenance.PEER
        assert set(seen.shapes()) == set(SHAPES)


def _anchor(identity: Identity) -> str:
    anchor = identity.trust.anchor_of(identity.chain[-1])
    return anchor.fingerprint if anchor else ""


def test_grpc_not_imported_by_federatls() -> None:
    """Importing federatls (and its integrations package) does not import grpc: only
    ``federatls.integrations.grpc`` does. Twin: that module brings it in."""
    import subprocess
    import sys

    code = (
        "import sys, federatls, federatls.integrations; a = 'grpc' in sys.modules; "
        "import federatls.integrations.grpc; print(a, 'grpc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_missing_grpc_names_the_extra() -> None:
    """Without grpcio, importing the integration (sync or aio) is a ``MissingExtraError``
    naming the ``grpc`` extra. Twin: test_grpc_not_imported_by_federatls imports it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['grpc'] = None\n"
        "from federatls import MissingExtraError\n"
        "for name in ('federatls.integrations.grpc', 'federatls.integrations.grpc.aio'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except MissingExtraError as exc:\n"
        "        print(exc.extra, exc.missing)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["grpc", "grpc", "grpc", "grpc"]
