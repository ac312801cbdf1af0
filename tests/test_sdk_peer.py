"""Peer provenance and authorisers: who is on the other end of a real mutual-TLS connection,
which root anchored it (own CA or federated), and which peers may talk to us at all.

Two real CAs, "cloud" and "kubernetes", federated both ways, issue every certificate used
here. A server enrolled with cloud and a client enrolled with kubernetes talk over every kind
of connection the SDK claims to support: blocking ``ssl.SSLSocket``s, asyncio streams, httpx
(sync and async) and aiohttp (client and server), all on 127.0.0.1 with port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.to_thread
import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import federatls
from federatls import (
    BadMaterialError,
    Identity,
    NamePattern,
    PeerInfo,
    PeerNotAuthorisedError,
    Provenance,
    TrustedRoot,
    all_of,
    allow_names,
    allow_roots,
    any_of,
    root_may_vouch_for,
)
from federatls.integrations import streams

from harness import PKI, make_pki, serving

pytestmark = pytest.mark.anyio

FAST = settings(max_examples=150, deadline=None, database=None)
SERVER_NAMES = ["server.cloud.internal", "localhost", "127.0.0.1", "::1"]
CLIENT_NAMES = ["client.k8s.internal", "spiffe://k8s.internal/ns/default/sa/client"]
WORKER_NAMES = ["worker.cloud.internal", "spiffe://cloud.internal/ns/jobs/sa/worker"]


# The world: two federated CAs and the identities they issued ----------------------------------
@dataclass(frozen=True)
class World:
    """Roots of both CAs and identities they issued (the CAs are stopped afterwards: an
    identity needs its CA only to enrol and renew)."""

    cloud_root: x509.Certificate
    kubernetes_root: x509.Certificate
    server: Identity  # cloud: server.cloud.internal, localhost, 127.0.0.1, ::1
    client: Identity  # kubernetes: client.k8s.internal + a SPIFFE ID
    worker: Identity  # cloud: worker.cloud.internal + a SPIFFE ID (a peer of the server's own CA)
    k8s_svc: Identity  # kubernetes: svc.k8s.internal only
    straddler: Identity  # kubernetes: svc.k8s.internal AND payments.cloud.internal
    spiffe_only: Identity  # kubernetes: one URI SAN, spiffe://k8s/ns/x.payments.internal


async def _build_world(base: Path) -> World:
    cloud, kubernetes = make_pki(base, "cloud"), make_pki(base, "kubernetes")
    cloud.federate(kubernetes)
    kubernetes.federate(cloud)
    async with serving(cloud), serving(kubernetes):

        async def enrol(ca: PKI, subject: str, sans: list[str]) -> Identity:
            return await federatls.bootstrap(ca.token(subject, sans=sans))

        return World(
            cloud_root=cloud.root,
            kubernetes_root=kubernetes.root,
            server=await enrol(cloud, "server.cloud.internal", SERVER_NAMES),
            client=await enrol(kubernetes, "client.k8s.internal", CLIENT_NAMES),
            worker=await enrol(cloud, "worker.cloud.internal", WORKER_NAMES),
            k8s_svc=await enrol(kubernetes, "svc.k8s.internal", ["svc.k8s.internal"]),
            straddler=await enrol(
                kubernetes, "svc.k8s.internal", ["svc.k8s.internal", "payments.cloud.internal"]
            ),
            spiffe_only=await enrol(kubernetes, "x", ["spiffe://k8s/ns/x.payments.internal"]),
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Both CAs served on a private event loop in a worker thread, just long enough to enrol."""
    base = tmp_path_factory.mktemp("federation")
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, _build_world, base).result(timeout=60)


def _fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, computed here rather than by federatls."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    """The one value of ``oid`` in ``name``, read by cryptography."""
    (attribute,) = name.get_attributes_for_oid(oid)
    assert isinstance(attribute.value, str)
    return attribute.value


def assert_peer(
    peer: object, expected: Identity, root: x509.Certificate, provenance: Provenance
) -> None:
    """``peer`` is a ``PeerInfo`` for exactly ``expected``'s certificate (fields checked against
    the certificate as cryptography reads it), anchored in ``root`` with ``provenance``."""
    assert isinstance(peer, PeerInfo), peer
    cert = expected.certificate
    assert peer.certificate == cert
    cn = _attribute(cert.subject, NameOID.COMMON_NAME)
    assert peer.common_name == cn == expected.common_name
    assert peer.subject == f"CN={cn}" == expected.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(peer.sans.as_strings()) == sorted(str(name.value) for name in san)
    assert peer.sans == expected.sans
    assert peer.serial == cert.serial_number == expected.serial
    assert peer.not_after == cert.not_valid_after_utc == expected.not_after
    assert len(peer.chain) == 3  # leaf, intermediate, root: the chain as verified
    assert peer.chain[0] == cert
    assert peer.chain[1] == expected.chain[1]
    assert peer.chain[-1] == root
    org = _attribute(root.subject, NameOID.ORGANIZATION_NAME)
    anchor = peer.anchor
    assert anchor is not None
    assert anchor.certificate == root
    assert anchor.fingerprint == _fingerprint(root)
    assert anchor.subject == root.subject.rfc4514_string() == f"CN={org} Root CA,O={org}"
    assert anchor.common_name == f"{org} Root CA"
    assert anchor.provenance is provenance
    assert f"anchored in {org} Root CA ({provenance.value}" in str(peer)


def peer_of(issued: Identity, seen_by: Identity) -> PeerInfo:
    """The ``PeerInfo`` a handshake with ``issued`` would give ``seen_by``: the same real
    certificates, the anchor looked up in ``seen_by``'s real trust bundle."""
    root = issued.own_roots.roots[0].certificate
    return PeerInfo(
        certificate=issued.certificate,
        chain=(*issued.chain, root),
        anchor=seen_by.trust.anchor_of(root),
    )


# Connections ----------------------------------------------------------------------------------
Outcome = Any  # what a probe returned, or the exception it raised


def _outcome(probe: Callable[[], Any]) -> Outcome:
    try:
        return probe()
    except Exception as exc:
        return exc


def _blocking_exchange(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_probe: Callable[[ssl.SSLSocket], Any],
    client_probe: Callable[[ssl.SSLSocket], Any],
) -> tuple[Outcome, Outcome]:
    """One TLS connection between blocking sockets (the server on a thread of its own);
    each side runs its probe on its ``ssl.SSLSocket`` after the handshake."""
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> Outcome:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen = _outcome(lambda: server_probe(tls))
                tls.sendall(b"ok")
                return seen

        served = pool.submit(serve)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            seen = _outcome(lambda: client_probe(tls))
            assert tls.recv(2) == b"ok"
        return served.result(timeout=10), seen


async def _stream_exchange(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_probe: Callable[[asyncio.StreamWriter], Any],
    client_probe: Callable[[asyncio.StreamWriter], Any],
) -> tuple[Outcome, Outcome]:
    """One TLS connection between asyncio streams; each side runs its probe on its writer
    after the handshake."""
    served: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.set_result(_outcome(lambda: server_probe(writer)))
        writer.write(b"ok")
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        try:
            seen = _outcome(lambda: client_probe(writer))
            assert await reader.read() == b"ok"
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        return await asyncio.wait_for(served, 10), seen


@contextlib.asynccontextmanager
async def https_server(
    identity: Identity,
    seen: list[PeerInfo],
    gate: asyncio.Event | None = None,
    *,
    tls: bool = True,
) -> AsyncIterator[str]:
    """An aiohttp HTTPS server with ``identity``'s server context on 127.0.0.1:0 (plain HTTP
    with ``tls=False``); each TLS request's peer is appended to ``seen``. Yields the URL.
    ``/`` answers "hello" at once; ``/stream`` sends "hel", waits for ``gate``, then "lo"."""

    async def hello(request: web.Request) -> web.Response:
        seen.append(identity.peer(request))
        return web.Response(text="hello")

    async def stream(request: web.Request) -> web.StreamResponse:
        if tls:
            seen.append(identity.peer(request))
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"hel")
        assert gate is not None
        await gate.wait()
        await response.write(b"lo")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        ctx = identity.server_context() if tls else None
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = runner.addresses[0][1]
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


# 1. Provenance from every kind of connection -------------------------------------------------
async def test_peer_of_blocking_ssl_sockets_both_sides(world: World) -> None:
    """Blocking ``ssl.SSLSocket``s: the server sees the kubernetes client anchored in the
    federated kubernetes root, the client sees the server anchored in the federated cloud root."""
    server, client = world.server, world.client
    seen_by_server, seen_by_client = await anyio.to_thread.run_sync(
        _blocking_exchange,
        server.server_context(),
        client.client_context(),
        server.peer,
        lambda tls: federatls.peer_info(tls, client.trust),
    )
    assert_peer(seen_by_server, client, world.kubernetes_root, Provenance.FEDERATED)
    assert_peer(seen_by_client, server, world.cloud_root, Provenance.FEDERATED)


async def test_plain_blocking_socket_has_no_peer(world: World) -> None:
    """Twin: a plain (non-TLS) socket is refused with ``BadMaterialError`` naming its type."""
    with socket.socket() as plain, pytest.raises(BadMaterialError, match="in socket:"):
        world.server.peer(plain)


STREAM_VIEWS: dict[str, tuple[Callable[[asyncio.StreamWriter], object], type]] = {
    "StreamWriter": (lambda writer: writer, asyncio.StreamWriter),
    "transport": (lambda writer: writer.transport, asyncio.Transport),
    "SSLObject": (lambda writer: writer.get_extra_info("ssl_object"), ssl.SSLObject),
}


@pytest.mark.parametrize("view", STREAM_VIEWS)
@pytest.mark.parametrize("own", [False, True], ids=["federated-client", "own-client"])
async def test_peer_of_asyncio_streams(world: World, view: str, own: bool) -> None:
    """asyncio streams, seen as the StreamWriter, its transport or its ``ssl.SSLObject``:
    peers of the other CA are FEDERATED, peers of one's own CA are OWN."""
    server = world.server
    client = world.worker if own else world.client
    access, kind = STREAM_VIEWS[view]

    def conn(writer: asyncio.StreamWriter) -> object:
        found = access(writer)
        assert isinstance(found, kind), found
        return found

    seen_by_server, seen_by_client = await _stream_exchange(
        server.server_context(),
        client.client_context(),
        lambda w: server.peer(conn(w)),
        lambda w: federatls.peer_info(conn(w), client.trust),
    )
    client_root = world.cloud_root if own else world.kubernetes_root
    provenance = Provenance.OWN if own else Provenance.FEDERATED
    assert_peer(seen_by_server, client, client_root, provenance)
    assert_peer(seen_by_client, server, world.cloud_root, provenance)


async def test_plain_tcp_stream_and_other_objects_have_no_peer(world: World) -> None:
    """Twin: a plain TCP asyncio writer, its transport and a string have no TLS peer: each
    gives ``BadMaterialError`` saying what was passed and what would do."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    plain = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with plain:
        port = plain.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            with pytest.raises(BadMaterialError, match=r"cannot find a TLS connection in"):
                world.client.peer(writer)
            with pytest.raises(BadMaterialError, match=r"asyncio StreamWriter or transport"):
                world.client.peer(writer.transport)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    with pytest.raises(BadMaterialError, match=r"cannot find a TLS connection in str"):
        federatls.peer_info("https://server.cloud.internal", world.client.trust)


async def test_client_without_certificate_has_no_peer(world: World) -> None:
    """Twin: with ``require_client_certificate=False`` a client without a certificate gets
    through the handshake, but ``peer()`` says it presented no certificate."""
    server = world.server
    server_ctx = server.server_context(require_client_certificate=False)
    anonymous = ssl.create_default_context(cadata=world.client.trust.pem)
    seen_by_server, seen_by_client = await _stream_exchange(
        server_ctx, anonymous, server.peer, world.client.peer
    )
    assert isinstance(seen_by_server, BadMaterialError)
    assert "presented no certificate" in str(seen_by_server)
    # The anonymous client still verified the server, and the same server context still
    # verifies and reports a client that does send a certificate.
    assert_peer(seen_by_client, server, world.cloud_root, Provenance.FEDERATED)
    with_cert, _ = await _stream_exchange(
        server_ctx, world.client.client_context(), server.peer, world.client.peer
    )
    assert_peer(with_cert, world.client, world.kubernetes_root, Provenance.FEDERATED)


async def test_peer_of_aiohttp_server_request(world: World) -> None:
    """aiohttp web server: the handler's ``web.Request`` gives the kubernetes client,
    anchored in the federated kubernetes root."""
    seen: list[PeerInfo] = []
    async with (
        https_server(world.server, seen) as url,
        httpx.AsyncClient(verify=world.client.client_context()) as http,
    ):
        response = await http.get(url)
    assert response.text == "hello"
    assert len(seen) == 1
    assert_peer(seen[0], world.client, world.kubernetes_root, Provenance.FEDERATED)


async def test_aiohttp_server_refuses_client_without_certificate(world: World) -> None:
    """Twin: the same aiohttp server refuses a client without a certificate in the handshake,
    so the handler never runs."""
    seen: list[PeerInfo] = []
    anonymous = ssl.create_default_context(cadata=world.client.trust.pem)
    async with https_server(world.server, seen) as url, httpx.AsyncClient(verify=anonymous) as http:
        with pytest.raises(httpx.HTTPError):
            await http.get(url)
    assert seen == []


async def test_peer_of_httpx_async_response(world: World) -> None:
    """``httpx.AsyncClient``: the response gives the cloud server, anchored in the federated
    cloud root."""
    async with (
        https_server(world.server, []) as url,
        httpx.AsyncClient(verify=world.client.client_context()) as http,
    ):
        response = await http.get(url)
        peer = world.client.peer(response)
    assert response.text == "hello"
    assert_peer(peer, world.server, world.cloud_root, Provenance.FEDERATED)


async def test_peer_of_httpx_sync_response(world: World) -> None:
    """Sync ``httpx.Client(verify=identity.client_context())``: the response gives the cloud
    server, anchored in the federated cloud root."""
    client = world.client

    def get(url: str) -> tuple[str, PeerInfo]:
        with httpx.Client(verify=client.client_context()) as http:
            response = http.get(url)
            return response.text, client.peer(response)

    async with https_server(world.server, []) as url:
        text, peer = await anyio.to_thread.run_sync(get, url)
    assert text == "hello"
    assert_peer(peer, world.server, world.cloud_root, Provenance.FEDERATED)


async def test_httpx_sync_client_reaches_the_server(world: World) -> None:
    """Twin of the sync httpx peer test: the sync client does complete mutual TLS with the
    server (so a failure to read its peer is the SDK's, not the connection's), and a client
    trusting only its own CA cannot reach it."""
    client = world.client

    def get(url: str, ctx: ssl.SSLContext) -> str:
        with httpx.Client(verify=ctx) as http:
            return http.get(url).text

    seen: list[PeerInfo] = []
    async with https_server(world.server, seen) as url:
        assert await anyio.to_thread.run_sync(get, url, client.client_context()) == "hello"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await anyio.to_thread.run_sync(get, url, client.client_context(trust="own"))
    assert_peer(seen[0], client, world.kubernetes_root, Provenance.FEDERATED)


async def test_peer_of_aiohttp_client_response(world: World) -> None:
    """aiohttp ``ClientResponse`` while the body is still arriving: the cloud server, anchored
    in the federated cloud root."""
    client = world.client
    gate = asyncio.Event()
    async with (
        https_server(world.server, [], gate) as url,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client.client_context())) as s,
        s.get(url + "stream") as response,
    ):
        peer = client.peer(response)
        gate.set()
        assert await response.text() == "hello"
    assert_peer(peer, world.server, world.cloud_root, Provenance.FEDERATED)


async def test_plain_http_aiohttp_client_response_has_no_peer(world: World) -> None:
    """Twin: the same aiohttp response over plain HTTP, body still arriving, has no TLS peer:
    ``BadMaterialError`` naming the ClientResponse."""
    gate = asyncio.Event()
    async with (
        https_server(world.server, [], gate, tls=False) as url,
        aiohttp.ClientSession() as s,
        s.get(url + "stream") as response,
    ):
        assert response.connection is not None  # the connection is there, TLS is not
        with pytest.raises(BadMaterialError, match="cannot find a TLS connection in ClientResp"):
            world.client.peer(response)
        gate.set()
        assert await response.text() == "hello"


async def test_peer_of_complete_aiohttp_client_response(world: World) -> None:
    """aiohttp ``ClientResponse`` of a small answer, before ``read()``: the cloud server,
    anchored in the federated cloud root."""
    client = world.client
    async with (
        https_server(world.server, []) as url,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client.client_context())) as s,
        s.get(url) as response,
    ):
        peer = client.peer(response)
        assert await response.text() == "hello"
    assert_peer(peer, world.server, world.cloud_root, Provenance.FEDERATED)


_ENCODING_DER = 2  # _ssl.ENCODING_DER


class _SSLObject313(ssl.SSLObject):
    """A real ``ssl.SSLObject`` as Python 3.13 shows it: a public ``get_verified_chain()``
    returning DER bytes, and ``getpeercert``, both delegating to the real object; no private
    ``_sslobj`` to fall back on. (A subclass, since the SDK checks ``isinstance``.)"""

    def __init__(self, real: ssl.SSLObject) -> None:  # SSLObject has no public constructor
        self._real = real

    def get_verified_chain(self) -> list[bytes]:  # CPython 3.13's Lib/ssl.py, word for word
        chain = self._real._sslobj.get_verified_chain()  # type: ignore[attr-defined]
        if chain is None:
            return []
        return [cert.public_bytes(_ENCODING_DER) for cert in chain]

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._real.getpeercert(binary_form)


async def test_python_313_verified_chain_path(world: World) -> None:
    """With Python 3.13's public ``get_verified_chain()`` (DER bytes) the SDK gives the same
    ``PeerInfo`` as through the 3.11/3.12 private ``_sslobj``."""
    server = world.server

    def both(writer: asyncio.StreamWriter) -> tuple[PeerInfo, Outcome]:
        real = writer.get_extra_info("ssl_object")
        assert isinstance(real, ssl.SSLObject)
        assert not hasattr(_SSLObject313(real), "_sslobj")
        return server.peer(real), _outcome(lambda: server.peer(_SSLObject313(real)))

    seen, _ = await _stream_exchange(
        server.server_context(), world.client.client_context(), both, lambda w: None
    )
    assert not isinstance(seen, Exception), seen
    via_private, via_public = seen
    assert_peer(via_private, world.client, world.kubernetes_root, Provenance.FEDERATED)
    if isinstance(via_public, Exception):
        raise via_public
    assert via_public == via_private


# 2. Authorisers (pure) ------------------------------------------------------------------------
def test_name_pattern_dns() -> None:
    """A DNS pattern matches its name case-insensitively; ``*.`` stands for exactly one label."""
    exact = NamePattern.parse("svc.k8s.internal")
    assert exact.kind == "dns"
    assert exact.matches("svc.k8s.internal")
    assert exact.matches("SVC.K8s.Internal")
    assert not exact.matches("svc.k8s.internal.evil")
    assert not exact.matches("a.svc.k8s.internal")
    wild = NamePattern.parse("*.k8s.internal")
    assert wild.matches("svc.k8s.internal")
    assert wild.matches("Svc.K8S.INTERNAL")
    assert not wild.matches("a.b.k8s.internal")
    assert not wild.matches("k8s.internal")
    assert not wild.matches(".k8s.internal")
    assert not wild.matches("svc.k8s.internal.evil")
    assert not wild.matches("svck8s.internal")


def test_name_pattern_ip() -> None:
    """An IP pattern matches the same address however it is spelled, and nothing else."""
    v4 = NamePattern.parse("127.0.0.1")
    assert v4.kind == "ip"
    assert v4.matches("127.0.0.1")
    assert not v4.matches("127.0.0.2")
    assert not v4.matches("localhost")
    v6 = NamePattern.parse("2001:db8::1")
    assert v6.kind == "ip"
    assert v6.matches("2001:0DB8:0000:0000:0000:0000:0000:0001")
    assert v6.matches("2001:db8:0:0::1")
    assert not v6.matches("2001:db8::2")
    assert not NamePattern.parse("::1").matches("127.0.0.1")


def test_name_pattern_uri() -> None:
    """A URI pattern matches exactly, or with a trailing ``/*`` anything below that path."""
    exact = NamePattern.parse("spiffe://td/ns/a/sa/b")
    assert exact.kind == "uri"
    assert exact.matches("spiffe://td/ns/a/sa/b")
    assert not exact.matches("spiffe://td/ns/a/sa/b/c")
    assert not exact.matches("spiffe://td/ns/a/sa")
    below = NamePattern.parse("spiffe://td/ns/*")
    assert below.kind == "uri"
    assert below.matches("spiffe://td/ns/a")
    assert below.matches("spiffe://td/ns/a/sa/b")
    assert not below.matches("spiffe://td/ns/")
    assert not below.matches("spiffe://td/ns")
    assert not below.matches("spiffe://td/nsx/a")
    assert not below.matches("spiffe://other/ns/a")


@pytest.mark.parametrize(
    "bad", ["a.*.b", "*", "**.x", " x", "x ", "", "*x.k8s.internal", "spiffe://td/*/x", "1.2.*.4"]
)
def test_name_pattern_refuses_misplaced_wildcards(bad: str) -> None:
    """Twin: a misplaced wildcard or stray whitespace is a ``ValueError`` quoting the pattern."""
    with pytest.raises(ValueError, match="pattern") as info:
        NamePattern.parse(bad)
    assert repr(bad) in str(info.value)


LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
DNS_NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


def _recase(name: str, flips: list[bool]) -> str:
    flips = (flips + [False] * len(name))[: len(name)]
    return "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))


@FAST
@given(name=DNS_NAME, other=DNS_NAME, flips=st.lists(st.booleans(), max_size=60))
def test_dns_pattern_matches_exactly_itself(name: str, other: str, flips: list[bool]) -> None:
    """A DNS pattern without a wildcard matches itself in any letter case, and no other name."""
    pattern = NamePattern.parse(name)
    assert pattern.kind == "dns"
    assert pattern.matches(_recase(name, flips))
    assert NamePattern.parse(_recase(name, flips)).matches(name)
    assert pattern.matches(other) == (other == name)
    assert not pattern.matches("x." + name)


@FAST
@given(label=LABEL, extra=LABEL, suffix=DNS_NAME)
def test_wildcard_matches_exactly_one_more_label(label: str, extra: str, suffix: str) -> None:
    """``*.suffix`` matches one label before ``suffix``, never the suffix itself or two labels."""
    pattern = NamePattern.parse("*." + suffix)
    assert pattern.matches(f"{label}.{suffix}")
    assert pattern.matches(f"{label}.{suffix}".upper())
    assert not pattern.matches(suffix)
    assert not pattern.matches(f"{extra}.{label}.{suffix}")


@FAST
@given(ip=st.ip_addresses(), other=st.ip_addresses())
def test_ip_pattern_matches_every_spelling(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    other: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    """An IP pattern matches the same address compressed or exploded, and no other address."""
    pattern = NamePattern.parse(str(ip))
    assert pattern.kind == "ip"
    assert pattern.matches(ip.compressed)
    assert pattern.matches(ip.exploded)
    assert NamePattern.parse(ip.exploded).matches(ip.compressed)
    assert pattern.matches(str(other)) == (other == ip)


@FAST
@given(path=st.lists(LABEL, min_size=1, max_size=4).map("/".join))
def test_uri_prefix_pattern_matches_below_only(path: str) -> None:
    """``spiffe://td/ns/*`` matches any path below ``spiffe://td/ns/``, not beside it."""
    pattern = NamePattern.parse("spiffe://td/ns/*")
    assert pattern.matches(f"spiffe://td/ns/{path}")
    assert not pattern.matches(f"spiffe://td/{path}")
    assert not pattern.matches(f"spiffe://td/ns{path}")


def test_allow_names(world: World) -> None:
    """``allow_names`` lets a peer through when one of its names (DNS, IP, URI) matches,
    and refuses it otherwise with a ``PeerNotAuthorisedError`` carrying the peer."""
    server = peer_of(world.server, seen_by=world.client)
    client = peer_of(world.client, seen_by=world.server)
    allow_names("*.cloud.internal")(server)
    allow_names("0:0:0:0:0:0:0:1")(server)  # ::1, spelled out
    allow_names("127.0.0.1", "nothing.example")(server)
    allow_names("spiffe://k8s.internal/ns/*")(client)
    allow_names(NamePattern.parse("CLIENT.k8s.internal"))(client)
    with pytest.raises(PeerNotAuthorisedError, match="none of its names") as info:
        allow_names("*.cloud.internal", "spiffe://cloud.internal/*")(client)
    assert info.value.peer is client
    assert "client.k8s.internal" in str(info.value)
    with pytest.raises(PeerNotAuthorisedError):
        allow_names("10.0.0.1")(server)
    with pytest.raises(ValueError, match="at least one"):
        allow_names()


def test_dns_pattern_does_not_match_uri_names(world: World) -> None:
    """A DNS pattern matches DNS names only: a kubernetes certificate whose one name is the URI
    ``spiffe://k8s/ns/x.payments.internal`` is not ``*.payments.internal``."""
    sneaky = peer_of(world.spiffe_only, seen_by=world.server)
    assert sneaky.sans.dns == ()
    assert sneaky.sans.uris == ("spiffe://k8s/ns/x.payments.internal",)
    with pytest.raises(PeerNotAuthorisedError):
        allow_names("*.payments.internal")(sneaky)


def test_allow_roots(world: World) -> None:
    """``allow_roots`` by fingerprint, by ``TrustedRoot`` and by provenance: the server (cloud)
    allows its own CA's worker and, separately, the federated kubernetes client."""
    seen_by = world.server
    worker = peer_of(world.worker, seen_by=seen_by)
    client = peer_of(world.client, seen_by=seen_by)
    k8s_fp = _fingerprint(world.kubernetes_root)
    cloud_root = seen_by.trust.by_fingerprint(_fingerprint(world.cloud_root))
    assert isinstance(cloud_root, TrustedRoot)
    assert cloud_root.provenance is Provenance.OWN
    allow_roots(k8s_fp)(client)
    allow_roots(k8s_fp.upper())(client)
    allow_roots(cloud_root)(worker)
    allow_roots(Provenance.OWN)(worker)
    allow_roots(Provenance.FEDERATED)(client)
    allow_roots(cloud_root, Provenance.FEDERATED)(client)
    for authoriser, refused in [
        (allow_roots(k8s_fp), worker),
        (allow_roots(cloud_root), client),
        (allow_roots(Provenance.OWN), client),
        (allow_roots(Provenance.FEDERATED), worker),
    ]:
        with pytest.raises(PeerNotAuthorisedError, match="anchoring root is not allowed") as info:
            authoriser(refused)
        assert info.value.peer is refused
    unanchored = PeerInfo(client.certificate, client.chain, anchor=None)
    with pytest.raises(PeerNotAuthorisedError):
        allow_roots(Provenance.OWN, Provenance.FEDERATED)(unanchored)
    with pytest.raises(ValueError, match="at least one root"):
        allow_roots()


def test_root_may_vouch_for(world: World) -> None:
    """The kubernetes root may only vouch for ``*.k8s.internal``: ``svc.k8s.internal`` passes,
    a kubernetes certificate that also names ``payments.cloud.internal`` is refused (every name
    must match), and cloud peers are not concerned by the rule."""
    seen_by = world.server
    k8s_root = seen_by.trust.by_fingerprint(_fingerprint(world.kubernetes_root))
    assert k8s_root is not None
    for key in (k8s_root.fingerprint, k8s_root):
        rule = root_may_vouch_for({key: ["*.k8s.internal"]})
        rule(peer_of(world.k8s_svc, seen_by))
        rule(peer_of(world.worker, seen_by))  # cloud: no rule for its root
        straddler = peer_of(world.straddler, seen_by)
        with pytest.raises(
            PeerNotAuthorisedError, match=re.escape("payments.cloud.internal")
        ) as info:
            rule(straddler)
        assert info.value.peer is straddler
        assert "kubernetes Root CA" in str(info.value)
    # The client also has a SPIFFE ID, which the DNS-only rule does not cover: refused.
    with pytest.raises(
        PeerNotAuthorisedError, match=re.escape("spiffe://k8s.internal/ns/default/sa/client")
    ):
        root_may_vouch_for({k8s_root: ["*.k8s.internal"]})(peer_of(world.client, seen_by))
    root_may_vouch_for({k8s_root: ["*.k8s.internal", "spiffe://k8s.internal/*"]})(
        peer_of(world.client, seen_by)
    )
    unanchored = PeerInfo(world.worker.certificate, world.worker.chain, anchor=None)
    with pytest.raises(PeerNotAuthorisedError, match="no known anchoring root"):
        root_may_vouch_for({k8s_root: ["*.k8s.internal"]})(unanchored)


def test_all_of_and_any_of(world: World) -> None:
    """``all_of`` needs every authoriser, ``any_of`` one; their refusals carry the peer
    (``any_of`` reports the first refusal)."""
    seen_by = world.server
    client = peer_of(world.client, seen_by)
    worker = peer_of(world.worker, seen_by)
    k8s_only = root_may_vouch_for({_fingerprint(world.kubernetes_root): ["*.k8s.internal"]})
    both = all_of(allow_roots(Provenance.FEDERATED), allow_names("client.k8s.internal"))
    both(client)
    with pytest.raises(PeerNotAuthorisedError, match="anchoring root") as info:
        both(worker)
    assert info.value.peer is worker
    with pytest.raises(PeerNotAuthorisedError, match="may only vouch for"):
        all_of(allow_names("client.k8s.internal"), k8s_only)(client)

    either = any_of(allow_names("*.cloud.internal"), allow_roots(Provenance.FEDERATED))
    either(client)  # the second allows it
    either(worker)  # the first allows it
    neither = any_of(allow_names("nobody.example"), allow_roots(Provenance.OWN))
    with pytest.raises(PeerNotAuthorisedError, match="none of its names") as info:
        neither(client)
    assert info.value.peer is client
    with pytest.raises(ValueError, match="at least one authoriser"):
        any_of()


def test_all_of_refuses_to_be_empty() -> None:
    """``all_of()`` with nothing to check is a ``ValueError``, not an allow-everything rule."""
    with pytest.raises(ValueError, match="at least one authoriser"):
        all_of()


# 3. Cut off before any application data -------------------------------------------------------
@dataclass
class Heard:
    """What a handler read, one entry per call (b"" for EOF or a reset), and when it ended."""

    lines: list[bytes]
    done: asyncio.Event


@contextlib.asynccontextmanager
async def streams_server(
    identity: Identity, answer: bytes, **kwargs: Any
) -> AsyncIterator[tuple[int, Heard]]:
    """``streams.start_server`` on 127.0.0.1:0 whose handler records the line it read (b""
    on EOF or a reset) and answers ``answer``. Yields the port and the handler's records."""
    heard = Heard([], asyncio.Event())

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heard.lines.append(await reader.readline())
            writer.write(answer)
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            heard.lines.append(b"")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            heard.done.set()

    server = await streams.start_server(identity, handle, "127.0.0.1", 0, **kwargs)
    async with server:
        yield server.sockets[0].getsockname()[1], heard


async def _ask(client: Identity, port: int) -> bytes:
    """Send one line over ``streams.open_connection`` and read everything that comes back
    (a reset or TLS error counts as nothing)."""
    reader, writer = await streams.open_connection(
        client, "127.0.0.1", port, server_hostname="localhost"
    )
    try:
        writer.write(b"hello\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_server_refuses_peer_before_the_handler(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A client the server's authoriser refuses is cut off after the handshake: the handler
    never runs, the client receives nothing, and the context's refusal is logged once with the
    reason."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    async with streams_server(
        world.server, b"secret\n", authoriser=allow_names("*.cloud.internal")
    ) as (port, heard):
        got = await _ask(world.client, port)
        await asyncio.sleep(0.1)  # a handler, were one wrongly started, would have run by now
    assert got == b""
    assert heard.lines == []
    assert not heard.done.is_set()
    refusals = [r for r in caplog.records if r.name == "federatls.peer"]
    assert len(refusals) == 1
    message = refusals[0].getMessage()
    assert message.startswith("refused a TLS client after the TLS handshake (authoriser): ")
    assert "client.k8s.internal" in message
    assert "none of its names" in message
    assert "*.cloud.internal" in message


async def test_server_serves_an_allowed_peer(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Twin: a client the authoriser allows reaches the handler and gets its answer; no
    refusal is logged."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    async with streams_server(
        world.server, b"secret\n", authoriser=allow_names("*.k8s.internal")
    ) as (port, heard):
        got = await _ask(world.client, port)
    assert got == b"secret\n"
    assert heard.lines == [b"hello\n"]
    assert "refused" not in caplog.text


async def test_client_refuses_server_before_sending(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """``open_connection`` with an authoriser that does not match the server raises
    ``PeerNotAuthorisedError`` from the handshake, before sending anything: the server's
    handler reads nothing (with TLS 1.3 it is not even called), and the refusal is logged
    once. Twin: test_client_talks_to_an_allowed_server."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    async with streams_server(world.server, b"secret\n") as (port, heard):
        with pytest.raises(PeerNotAuthorisedError, match=re.escape("other.name")) as info:
            await streams.open_connection(
                world.client,
                "127.0.0.1",
                port,
                server_hostname="localhost",
                authoriser=allow_names("other.name"),
            )
        assert isinstance(info.value.peer, PeerInfo)
        assert info.value.peer.common_name == "server.cloud.internal"
    assert heard.lines in ([], [b""])
    refused = [r.getMessage() for r in caplog.records if r.name == "federatls.peer"]
    assert len(refused) == 1
    assert refused[0].startswith("refused a TLS server after the TLS handshake (authoriser)")


async def test_client_talks_to_an_allowed_server(world: World) -> None:
    """Twin: with a pattern the server's certificate matches, the client's line reaches the
    handler and the answer comes back."""
    async with streams_server(world.server, b"secret\n") as (port, heard):
        reader, writer = await streams.open_connection(
            world.client,
            "127.0.0.1",
            port,
            server_hostname="localhost",
            authoriser=allow_names("server.cloud.internal"),
        )
        try:
            writer.write(b"hello\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"secret\n"
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    assert heard.lines == [b"hello\n"]
