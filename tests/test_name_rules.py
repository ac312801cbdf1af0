"""Per-peer name rules, applied by default: the structured federation a CA publishes at
``/federatls/federation`` and the SDK contexts that enforce it on every peer.

Real CAs issue every certificate: "cloud" (the workloads' own CA), "kubernetes" (a peer whose
roots may vouch only for ``*.k8s.internal`` and ``spiffe://k8s.internal/*``) and "partner"
(a static ``federatedRoots`` entry: any name). The kubernetes CA issues an impostor naming
itself ``payments.cloud.internal`` and twins with names of its own; real TLS on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

import federatls
from federatls import (
    BadMaterialError,
    Identity,
    NamePattern,
    PeerNotAuthorisedError,
    Provenance,
    TrustBundle,
)
from federatls._contexts import _CHECKS
from federatls._namerules import structured_bundle
from federatls._protocol import FederationEntry, FederationSourcesResponse
from federatls._x509 import fingerprint
from federatls.integrations import aiohttp as faiohttp
from federatls.integrations import httpx as fhttpx
from federatls.integrations import streams
from federatls.integrations._source import Source
from rogue_ca import Issue, RogueCA

from harness import PKI, make_pki, serving, stepca_log, stepca_process

pytestmark = pytest.mark.anyio

K8S_NAMES = ("*.k8s.internal", "spiffe://k8s.internal/*")
IMPOSTOR = "payments.cloud.internal"


# The world -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class World:
    """The CAs' roots and what they issued. The cloud CA follows the kubernetes CA as a peer
    (``federation`` block, names K8S_NAMES) and lists the partner root in its static
    ``federatedRoots``; the "union" CA follows the kubernetes CA twice, under two names with
    different names each."""

    cloud_root: x509.Certificate
    k8s_root: x509.Certificate
    partner_root: x509.Certificate
    server: Identity  # cloud: server.cloud.internal, localhost, 127.0.0.1
    client: Identity  # cloud: client.cloud.internal
    server_off: Identity  # cloud, enrolled with name_rules=False
    client_off: Identity  # cloud, enrolled with name_rules=False
    union_server: Identity  # union: server.union.internal, localhost, 127.0.0.1
    k8s_client: Identity  # kubernetes: svc.k8s.internal
    k8s_impostor: Identity  # kubernetes: payments.cloud.internal
    k8s_server: Identity  # kubernetes: api.k8s.internal
    k8s_impostor_server: Identity  # kubernetes: payments.cloud.internal
    k8s_straddler: Identity  # kubernetes: svc.k8s.internal and payments.cloud.internal
    partner_impostor: Identity  # partner (static): payments.cloud.internal
    k8s_no_san: Identity  # kubernetes: a certificate whose only name is its CN (no SAN)


def follow(follower: PKI, peer: PKI, *names_by_peer: tuple[str, tuple[str, ...]]) -> None:
    """Make ``follower``'s ca.json follow ``peer`` (pinned to its root), once per (name,
    names) given, refreshing every second."""
    peers = [
        {"name": name, "url": peer.url, "fingerprint": peer.fingerprint, "names": list(names)}
        for name, names in names_by_peer
    ]
    follower.edit(lambda d: d.__setitem__("federation", {"refresh": "1s", "peers": peers}))


async def until_following(follower: PKI, root: x509.Certificate) -> None:
    """Wait (30 s at most) until ``follower``'s CA lists ``root`` at /federation."""
    with anyio.fail_after(30):
        while True:
            async with follower.client() as ca:
                if root in await ca.federation():
                    return
            await anyio.sleep(0.1)


async def _build_world(base: Path) -> World:
    cloud, union, k8s, partner = (
        make_pki(base, n) for n in ("cloud", "union", "kubernetes", "partner")
    )
    cloud.federate(partner)
    k8s.federate(cloud, union)
    partner.federate(cloud)
    async with serving(k8s), serving(partner):
        follow(cloud, k8s, ("kubernetes", K8S_NAMES))
        follow(union, k8s, ("kubernetes", ("*.k8s.internal",)), ("payments", (IMPOSTOR,)))
        async with serving(cloud), serving(union):
            await until_following(cloud, k8s.root)
            await until_following(union, k8s.root)

            async def enrol(ca: PKI, subject: str, *sans: str, rules: bool = True) -> Identity:
                token = ca.token(subject, sans=sans or (subject,))
                return await federatls.bootstrap(token, name_rules=rules)

            server_names = ("localhost", "127.0.0.1")
            return World(
                cloud_root=cloud.root,
                k8s_root=k8s.root,
                partner_root=partner.root,
                server=await enrol(cloud, "server.cloud.internal", *server_names),
                client=await enrol(cloud, "client.cloud.internal"),
                server_off=await enrol(cloud, "server.cloud.internal", *server_names, rules=False),
                client_off=await enrol(cloud, "client.cloud.internal", rules=False),
                union_server=await enrol(union, "server.union.internal", *server_names),
                k8s_client=await enrol(k8s, "svc.k8s.internal"),
                k8s_impostor=await enrol(k8s, IMPOSTOR),
                k8s_server=await enrol(k8s, "api.k8s.internal"),
                k8s_impostor_server=await enrol(k8s, IMPOSTOR),
                k8s_straddler=await enrol(k8s, "svc.k8s.internal", "svc.k8s.internal", IMPOSTOR),
                partner_impostor=await enrol(partner, IMPOSTOR),
                k8s_no_san=await _no_san(k8s, "svc.k8s.internal"),
            )


async def _no_san(ca: PKI, subject: str) -> Identity:
    """An identity whose certificate has no SAN at all (a CA may issue one; step's CSRs carry
    names, so it is forged here under the CA's intermediate)."""
    identity = await federatls.bootstrap(ca.token(subject, sans=(subject,)))
    forged = RogueCA(ca).chain(subject, [], identity.certificate.public_key(), Issue(names=()))
    return Identity.from_parts(forged, identity._key, identity.trust, identity.ca_url)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The four CAs served on a private event loop in a worker thread, just long enough to
    enrol."""
    base = tmp_path_factory.mktemp("names")
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, _build_world, base).result(timeout=120)


# Exchanges -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Heard:
    lines: list[bytes]


@contextlib.asynccontextmanager
async def line_server(identity: Source) -> AsyncIterator[tuple[int, Heard]]:
    """``streams.start_server`` on 127.0.0.1:0 answering each line with "ok"; yields the port
    and the lines its handler read."""
    heard = Heard([])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heard.lines.append(await reader.readline())
            writer.write(b"ok\n")
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    server = await streams.start_server(identity, handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], heard


async def ask(client: Source, port: int, server_name: str = "localhost") -> bytes:
    """One line over ``streams.open_connection``; the answer, or b"" when cut off."""
    reader, writer = await streams.open_connection(
        client, "127.0.0.1", port, server_hostname=server_name
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


@contextlib.asynccontextmanager
async def https_server(identity: Identity) -> AsyncIterator[int]:
    """An aiohttp HTTPS server with ``identity``'s server context on 127.0.0.1:0 answering
    "hello"; yields the port."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=identity.server_context())
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def httpx_get(client: Identity, port: int, server_name: str) -> str:
    """GET / with the httpx integration, the server's name given as SNI (checked)."""
    async with fhttpx.AsyncClient(client, timeout=10) as http:
        response = await http.get(
            f"https://127.0.0.1:{port}/", extensions={"sni_hostname": server_name}
        )
        return response.text


def blocking_exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str = "localhost"
) -> tuple[object, object]:
    """One connection between blocking sockets (raw contexts, ``SSLSocket``): what each
    side's ``wrap_socket`` made of it: "ok" for the server, the bytes read for the client,
    or the exception."""
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> object:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
                    return "ok"
            except OSError as exc:  # ssl.SSLError, or the client gone
                return exc

        served = pool.submit(serve)
        got: object
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                    got = tls.recv(2)
            except ssl.SSLCertVerificationError as exc:
                got = exc
            except (ConnectionError, ssl.SSLError):
                got = b""
        return served.result(timeout=10), got


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "federatls.peer" and "(name rules)" in r.getMessage()
    ]


# The structured bundle (pure) ----------------------------------------------------------------
def _entry(kind: str, name: str | None, roots: list[x509.Certificate], names: Any) -> Any:
    return FederationEntry(kind, name, tuple(roots), None if names is None else tuple(names))


def test_structured_bundle_gives_peer_roots_their_names(world: World) -> None:
    """A peer's root carries its names and ``Provenance.PEER``; own and static roots vouch
    for any name. Twin: the flat bundle of the same roots (a plain step-ca) has no rule."""
    own, k8s, partner = world.cloud_root, world.k8s_root, world.partner_root
    sources = [
        _entry("own", None, [own], None),
        _entry("static", None, [partner], None),
        _entry("peer", "kubernetes", [k8s], K8S_NAMES),
    ]
    trust, left_out = structured_bundle([own], [own, partner, k8s], sources)
    assert left_out == ()
    assert [(r.provenance, r.names) for r in trust] == [
        (Provenance.OWN, None),
        (Provenance.FEDERATED, None),
        (Provenance.PEER, tuple(NamePattern.parse(p) for p in K8S_NAMES)),
    ]
    assert trust.roots[2].peers == ("kubernetes",)
    assert "peer kubernetes" in str(trust.roots[2])
    assert trust.has_name_rules
    flat = TrustBundle.from_ca([own], [own, partner, k8s])
    assert not flat.has_name_rules
    assert all(r.names is None for r in flat)


def test_root_listed_by_two_peers_vouches_for_the_union(world: World) -> None:
    """A root two peers list may vouch for the names of both. Twin: listed by one, only its."""
    own, k8s = world.cloud_root, world.k8s_root
    both = [
        _entry("peer", "kubernetes", [k8s], ["*.k8s.internal"]),
        _entry("peer", "payments", [k8s], [IMPOSTOR]),
    ]
    trust, _ = structured_bundle([own], [own, k8s], both)
    assert [p.text for p in trust.roots[1].names or ()] == ["*.k8s.internal", IMPOSTOR]
    assert trust.roots[1].peers == ("kubernetes", "payments")
    one, _ = structured_bundle([own], [own, k8s], both[:1])
    assert [p.text for p in one.roots[1].names or ()] == ["*.k8s.internal"]


def test_static_listing_of_a_peer_root_vouches_for_any_name(world: World) -> None:
    """A root both a static source and a peer list vouches for any name (the operator's
    static entry says so). Twin: the peer's listing alone restricts it."""
    own, k8s = world.cloud_root, world.k8s_root
    peer = _entry("peer", "kubernetes", [k8s], K8S_NAMES)
    trust, _ = structured_bundle([own], [own, k8s], [_entry("static", None, [k8s], None), peer])
    assert trust.roots[1].names is None
    assert trust.roots[1].provenance is Provenance.FEDERATED
    alone, _ = structured_bundle([own], [own, k8s], [peer])
    assert alone.roots[1].names is not None


def test_roots_the_answers_disagree_on_are_left_out(world: World) -> None:
    """A root in ``/federation`` that no source lists, and a root a source lists that
    ``/federation`` lacks, are both left out, each with a sentence. Twin: when they agree,
    both roots are in."""
    own, k8s, partner = world.cloud_root, world.k8s_root, world.partner_root
    sources = [_entry("peer", "kubernetes", [k8s], K8S_NAMES)]
    trust, left_out = structured_bundle([own], [own, partner], sources)
    assert [r.certificate for r in trust] == [own]
    assert len(left_out) == 2
    assert "partner" in left_out[0]
    assert "no source lists it" in left_out[0]
    assert "kubernetes" in left_out[1]
    assert "missing from /federation" in left_out[1]
    sources.append(_entry("static", None, [partner], None))
    agreed, none = structured_bundle([own], [own, partner, k8s], sources)
    assert [r.certificate for r in agreed] == [own, partner, k8s]
    assert none == ()


def test_peer_with_no_name_is_not_trusted(world: World) -> None:
    """A peer listed with ``names: []`` may vouch for nothing: its root is left out. Twin:
    with one name it is in."""
    own, k8s = world.cloud_root, world.k8s_root
    trust, left_out = structured_bundle([own], [own, k8s], [_entry("peer", "k", [k8s], [])])
    assert len(trust) == 1
    assert "may vouch for no name" in left_out[0]
    trust, _ = structured_bundle([own], [own, k8s], [_entry("peer", "k", [k8s], ["a.b"])])
    assert len(trust) == 2


def test_malformed_pattern_refuses_the_answer(world: World) -> None:
    """A name pattern that does not parse refuses the whole answer, naming the peer."""
    own, k8s = world.cloud_root, world.k8s_root
    with pytest.raises(BadMaterialError, match=r"kubernetes.*a\.\*\.b"):
        structured_bundle([own], [own, k8s], [_entry("peer", "kubernetes", [k8s], ["a.*.b"])])


# The wire shape (pure) -----------------------------------------------------------------------
def test_federation_sources_round_trip(world: World) -> None:
    """``to_json`` and ``parse`` round-trip, with the documented field names."""
    answer = FederationSourcesResponse(
        (
            _entry("own", None, [world.cloud_root], None),
            _entry("peer", "kubernetes", [world.k8s_root], K8S_NAMES),
        )
    )
    data = json.loads(json.dumps(answer.to_json()))
    assert [sorted(s) for s in data["sources"]] == [["kind", "name", "names", "roots"]] * 2
    assert data["sources"][1]["names"] == list(K8S_NAMES)
    assert data["sources"][0]["roots"][0].startswith("-----BEGIN CERTIFICATE-----")
    assert FederationSourcesResponse.parse(data) == answer


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda s: s.update(kind="friend"), "'kind' must be one of"),
        (lambda s: s.update(names=None), "has no 'names'"),
        (lambda s: s.update(name=None), "must have a 'name'"),
        (lambda s: s.update(names="*.k8s.internal"), "'names' must be a list"),
        (lambda s: s.update(roots=["not a PEM"]), "roots"),
        (lambda s: s.pop("roots"), "roots"),
    ],
)
def test_malformed_source_is_refused(
    world: World, change: Callable[[dict[str, Any]], object], complaint: str
) -> None:
    """A source the SDK cannot read refuses the whole answer (``BadMaterialError``). Twin:
    the same source unchanged parses."""
    good = _entry("peer", "kubernetes", [world.k8s_root], K8S_NAMES).to_json()
    FederationSourcesResponse.parse({"sources": [good]})
    bad = dict(good)
    change(bad)
    with pytest.raises(BadMaterialError, match=complaint):
        FederationSourcesResponse.parse({"sources": [bad]})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(["own", "static", "peer", "other"]) | JSON,
        "name": st.none() | st.text(max_size=10) | JSON,
        "roots": st.lists(st.text(max_size=10), max_size=2) | JSON,
        "names": st.none() | st.lists(st.text(max_size=10), max_size=3) | JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(data=JSON | st.fixed_dictionaries({"sources": st.lists(FIELDS, max_size=3) | JSON}))
def test_federation_sources_parser_refuses_anything_else_cleanly(data: object) -> None:
    """Whatever JSON a CA sends, the parser returns a value or raises ``BadMaterialError``."""
    with contextlib.suppress(BadMaterialError):
        FederationSourcesResponse.parse(data)


# Enforcement, with a bundle a structured federation gives -----------------------------------
async def test_streams_server_refuses_impostor_of_a_peer(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A cloud server refuses a client of the kubernetes peer naming itself
    payments.cloud.internal: its handler never runs, and who and why are logged. Twin: the
    kubernetes client named svc.k8s.internal is served."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    async with line_server(world.server) as (port, heard):
        assert await ask(world.k8s_impostor, port) == b""
        assert await ask(world.k8s_client, port) == b"ok\n"
    assert heard.lines == [b"hello\n"]
    [line] = refusals(caplog)
    assert line.startswith("refused a TLS client after the TLS handshake (name rules)")
    for part in (IMPOSTOR, "peer kubernetes", "may only vouch for ['*.k8s.internal'"):
        assert part in line


async def test_streams_client_refuses_impostor_server(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A cloud client refuses a server of the kubernetes peer that names itself
    payments.cloud.internal (``PeerNotAuthorisedError``, logged; the server reads nothing).
    Twin: the server named api.k8s.internal answers."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    client = world.client
    async with line_server(world.k8s_impostor_server) as (port, heard):
        with pytest.raises(PeerNotAuthorisedError, match="may only vouch for") as info:
            await ask(client, port, IMPOSTOR)
        assert info.value.peer.common_name == IMPOSTOR
    assert heard.lines in ([], [b""])
    async with line_server(world.k8s_server) as (port, heard):
        assert await ask(client, port, "api.k8s.internal") == b"ok\n"
    assert heard.lines == [b"hello\n"]
    [line] = refusals(caplog)
    assert line.startswith("refused a TLS server after the TLS handshake (name rules)")


async def test_httpx_client_refuses_impostor_server(world: World) -> None:
    """The httpx integration refuses the kubernetes server named payments.cloud.internal
    with ``PeerNotAuthorisedError`` (as every integration's client does, for the name rules
    as for the authoriser). Twin: api.k8s.internal answers."""
    client = world.client
    async with https_server(world.k8s_impostor_server) as port:
        with pytest.raises(PeerNotAuthorisedError, match="may only vouch for") as info:
            await httpx_get(client, port, IMPOSTOR)
    assert info.value.peer is not None
    assert info.value.peer.common_name is not None
    async with https_server(world.k8s_server) as port:
        assert await httpx_get(client, port, "api.k8s.internal") == "hello"


async def test_aiohttp_integration_refuses_impostors_both_ways(world: World) -> None:
    """The aiohttp integration's ``Site`` (cloud) cuts off the kubernetes client named
    payments.cloud.internal, and its client session refuses the kubernetes server of that
    name (``PeerNotAuthorisedError``). Twins: the kubernetes names are served and
    answered."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def get(client: Identity, port: int, server_name: str) -> str:
        async with faiohttp.client_session(client) as session:
            url = f"https://127.0.0.1:{port}/"
            async with session.get(url, server_hostname=server_name) as response:
                return await response.text()

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = faiohttp.Site(runner, world.server, "127.0.0.1", 0)
        await site.start()
        with pytest.raises(aiohttp.ClientError):
            await get(world.k8s_impostor, site.port, "localhost")
        assert await get(world.k8s_client, site.port, "localhost") == "hello"
    finally:
        await runner.cleanup()
    async with https_server(world.k8s_impostor_server) as port:
        with pytest.raises(PeerNotAuthorisedError, match="may only vouch for"):
            await get(world.client, port, IMPOSTOR)
    async with https_server(world.k8s_server) as port:
        assert await get(world.client, port, "api.k8s.internal") == "hello"


async def test_raw_server_context_refuses_impostor(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A raw ``server_context()`` on blocking sockets refuses the impostor in ``wrap_socket``
    (an ``ssl.SSLCertVerificationError``) and logs the client's address. Twin: the kubernetes
    client with its own name gets "ok"."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    server = world.server.server_context()
    served, got = await anyio.to_thread.run_sync(
        blocking_exchange, server, world.k8s_impostor.client_context()
    )
    assert isinstance(served, ssl.SSLCertVerificationError)
    assert isinstance(served.__cause__, PeerNotAuthorisedError)
    assert got == b""
    [line] = refusals(caplog)
    assert line.startswith("refused the TLS client at 127.0.0.1:")
    served, got = await anyio.to_thread.run_sync(
        blocking_exchange, server, world.k8s_client.client_context()
    )
    assert (served, got) == ("ok", b"ok")


async def test_raw_client_context_refuses_impostor_server(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A raw ``client_context()`` on a blocking socket refuses the kubernetes server named
    payments.cloud.internal in ``wrap_socket`` (logged with its address). Twin: the server
    named api.k8s.internal sends "ok"."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    client = world.client.client_context()
    _, got = await anyio.to_thread.run_sync(
        blocking_exchange, world.k8s_impostor_server.server_context(), client, IMPOSTOR
    )
    assert isinstance(got, ssl.SSLCertVerificationError)
    assert isinstance(got.__cause__, PeerNotAuthorisedError)
    assert got.verify_message == str(got.__cause__)
    [line] = refusals(caplog)
    assert line.startswith("refused the TLS server at 127.0.0.1:")
    served, got = await anyio.to_thread.run_sync(
        blocking_exchange, world.k8s_server.server_context(), client, "api.k8s.internal"
    )
    assert (served, got) == ("ok", b"ok")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_rules_hold_on_each_tls_version(world: World, version: ssl.TLSVersion) -> None:
    """With both sides held to TLS 1.2 (or 1.3), the raw contexts still refuse the kubernetes
    impostor both ways: the check runs when the handshake is done, whichever version made
    it. Twin: the kubernetes names are served and answered on the same version."""

    def pinned(ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.minimum_version = ctx.maximum_version = version
        return ctx

    server = pinned(world.server.server_context())
    served, got = await anyio.to_thread.run_sync(
        blocking_exchange, server, pinned(world.k8s_impostor.client_context())
    )
    assert isinstance(served, ssl.SSLCertVerificationError)
    served, got = await anyio.to_thread.run_sync(
        blocking_exchange, server, pinned(world.k8s_client.client_context())
    )
    assert (served, got) == ("ok", b"ok")
    client = pinned(world.client.client_context())
    _, got = await anyio.to_thread.run_sync(
        blocking_exchange, pinned(world.k8s_impostor_server.server_context()), client, IMPOSTOR
    )
    assert isinstance(got, ssl.SSLCertVerificationError)
    assert isinstance(got.__cause__, PeerNotAuthorisedError)
    served, got = await anyio.to_thread.run_sync(
        blocking_exchange,
        pinned(world.k8s_server.server_context()),
        client,
        "api.k8s.internal",
    )
    assert (served, got) == ("ok", b"ok")


async def test_sync_httpx_client_refuses_impostor_server(world: World) -> None:
    """A plain synchronous ``httpx.Client`` given a cloud client context (blocking sockets,
    httpcore's sync backend) refuses the kubernetes server named payments.cloud.internal.
    Twin: the server named api.k8s.internal answers."""

    def get(port: int, server_name: str) -> str:
        with httpx.Client(verify=world.client.client_context(), timeout=10) as http:
            url = f"https://127.0.0.1:{port}/"
            return http.get(url, extensions={"sni_hostname": server_name}).text

    async with https_server(world.k8s_impostor_server) as port:
        with pytest.raises(httpx.ConnectError) as info:
            await anyio.to_thread.run_sync(get, port, IMPOSTOR)
    cause: BaseException | None = info.value
    while cause is not None and not isinstance(cause, PeerNotAuthorisedError):
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, PeerNotAuthorisedError)
    async with https_server(world.k8s_server) as port:
        assert await anyio.to_thread.run_sync(get, port, "api.k8s.internal") == "hello"


async def test_option_off_admits_both(world: World) -> None:
    """With ``name_rules=False`` the impostor and its twin are both admitted, by servers and
    clients alike (behaviour as with a flat bundle)."""
    server = world.server_off
    client = world.client_off
    async with line_server(server) as (port, heard):
        assert await ask(world.k8s_impostor, port) == b"ok\n"
        assert await ask(world.k8s_client, port) == b"ok\n"
    assert heard.lines == [b"hello\n", b"hello\n"]
    async with line_server(world.k8s_impostor_server) as (port, _):
        assert await ask(client, port, IMPOSTOR) == b"ok\n"
    async with https_server(world.k8s_impostor_server) as port:
        assert await httpx_get(client, port, IMPOSTOR) == "hello"
    assert "name_rules=False" in repr(client)


async def test_static_root_vouches_for_any_name(world: World) -> None:
    """A client of the partner CA (a static ``federatedRoots`` entry, no rule) naming itself
    payments.cloud.internal is admitted. Twin: the kubernetes impostor is refused."""
    async with line_server(world.server) as (port, _):
        assert await ask(world.partner_impostor, port) == b"ok\n"
        assert await ask(world.k8s_impostor, port) == b""


async def test_certificate_without_san_is_refused(world: World) -> None:
    """A kubernetes client whose certificate has no SAN (only a CN inside the rules) is
    refused: its common name is not taken for a name. Twin: with a SAN it is admitted."""
    async with line_server(world.server) as (port, heard):
        assert await ask(world.k8s_no_san, port) == b""
        assert await ask(world.k8s_client, port) == b"ok\n"
    assert heard.lines == [b"hello\n"]


async def test_renewing_identity_contexts_enforce_the_rules(world: World) -> None:
    """A ``RenewingIdentity``'s live server context (switching to its snapshot's context in
    the handshake) and client context enforce the rules. Twin: the kubernetes names pass."""
    live_server = federatls.RenewingIdentity(world.server)
    live_client = federatls.RenewingIdentity(world.client)
    async with line_server(live_server) as (port, _):
        assert await ask(world.k8s_impostor, port) == b""
        assert await ask(world.k8s_client, port) == b"ok\n"
    async with line_server(world.k8s_impostor_server) as (port, _):
        with pytest.raises(PeerNotAuthorisedError):
            await ask(live_client, port, IMPOSTOR)
    async with line_server(world.k8s_server) as (port, _):
        assert await ask(live_client, port, "api.k8s.internal") == b"ok\n"


# End to end: the bundle a CA with a peer gives, the union, step-ca, the endpoint -----------
def test_enrolled_bundle_carries_the_peer_rules(world: World) -> None:
    """A workload of the cloud CA trusts its own root and the static partner root for any
    name and the kubernetes root (a peer's) for K8S_NAMES only. Twin: a kubernetes workload
    (its CA publishes only own and static sources) has no rule."""
    by_root = {r.fingerprint: r for r in world.server.trust}
    own = by_root[fingerprint(world.cloud_root)]
    partner = by_root[fingerprint(world.partner_root)]
    k8s = by_root[fingerprint(world.k8s_root)]
    assert (own.provenance, own.names) == (Provenance.OWN, None)
    assert (partner.provenance, partner.names) == (Provenance.FEDERATED, None)
    assert k8s.provenance is Provenance.PEER
    assert [p.text for p in k8s.names or ()] == list(K8S_NAMES)
    assert k8s.peers == ("kubernetes",)
    assert world.server.name_rules
    assert not world.server_off.name_rules
    assert not world.k8s_client.trust.has_name_rules


async def test_root_of_two_peers_admits_the_union(world: World) -> None:
    """A kubernetes client named svc.k8s.internal and payments.cloud.internal is admitted by a
    server whose CA lists the kubernetes root under two peers, one for each name. Twin: the
    cloud CA's server (one peer, K8S_NAMES) refuses it."""
    union = world.union_server.trust.by_fingerprint(fingerprint(world.k8s_root))
    assert union is not None
    assert union.peers == ("kubernetes", "payments")
    async with line_server(world.union_server) as (port, _):
        assert await ask(world.k8s_straddler, port) == b"ok\n"
    async with line_server(world.server) as (port, _):
        assert await ask(world.k8s_straddler, port) == b""


async def test_ca_serves_the_structured_federation(tmp_path: Path) -> None:
    """``GET /federatls/federation`` (and under ``/1.0``) answers 200 without a client
    certificate: the own, static and peer sources, each with its roots and names, the same
    roots as ``/federation``. Twin: before the peer is reached its source lists no root."""
    cloud, k8s, partner = (make_pki(tmp_path, n) for n in ("cloud", "kubernetes", "partner"))
    cloud.federate(partner)
    pem = [c.public_bytes(serialization.Encoding.PEM).decode() for c in (cloud.root, partner.root)]
    follow(cloud, k8s, ("kubernetes", K8S_NAMES))  # k8s not served yet: unreachable
    cloud.edit(lambda d: d["federation"]["peers"][0].__setitem__("url", "https://127.0.0.1:9"))
    async with serving(cloud):
        before = await get_structure(cloud, "/federatls/federation")
    assert before["sources"][2] == {
        "kind": "peer",
        "name": "kubernetes",
        "roots": [],
        "names": list(K8S_NAMES),
    }
    async with serving(k8s):
        follow(cloud, k8s, ("kubernetes", K8S_NAMES))
        async with serving(cloud):
            await until_following(cloud, k8s.root)
            answers = [await get_structure(cloud, p) for p in FEDERATION_PATHS]
            async with cloud.client() as ca:
                flat = await ca.federation()
    k8s_pem = k8s.root.public_bytes(serialization.Encoding.PEM).decode()
    expected = {
        "sources": [
            {"kind": "own", "name": None, "roots": [pem[0]], "names": None},
            {"kind": "static", "name": None, "roots": [pem[1]], "names": None},
            {"kind": "peer", "name": "kubernetes", "roots": [k8s_pem], "names": list(K8S_NAMES)},
        ]
    }
    assert answers == [expected, expected]
    assert flat == (cloud.root, partner.root, k8s.root)


FEDERATION_PATHS = ("/federatls/federation", "/1.0/federatls/federation")


async def get_structure(pki: PKI, path: str) -> Any:
    """``path`` of ``pki``'s CA over TLS trusting its root, with no client certificate."""
    ctx = ssl.create_default_context(
        cadata=pki.root.public_bytes(serialization.Encoding.PEM).decode()
    )
    async with httpx.AsyncClient(verify=ctx, timeout=10) as http:
        response = await http.get(pki.url + path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


async def test_plain_stepca_keeps_todays_behaviour(tmp_path: Path, stepca_bin: str) -> None:
    """Against the real step-ca (flat ``federatedRoots`` only; ``/federatls/federation`` is a
    404) a workload trusts the kubernetes root for any name and admits its impostor, as
    before. Twin: the same ca.json run by the federatls CA, with kubernetes as a peer instead,
    gives a workload that refuses it."""
    cloud, k8s = make_pki(tmp_path, "cloud"), make_pki(tmp_path, "kubernetes")
    cloud.federate(k8s)
    k8s.federate(cloud)
    async with serving(k8s):
        impostor = await federatls.bootstrap(k8s.token(IMPOSTOR, sans=[IMPOSTOR]))
        with stepca_process(stepca_bin, cloud):
            server = await federatls.bootstrap(
                cloud.token("server.cloud.internal", sans=["localhost", "127.0.0.1"])
            )
            async with cloud.client() as ca:
                assert await ca.federation_sources() is None
        assert not server.trust.has_name_rules
        async with line_server(server) as (port, _):
            assert await ask(impostor, port) == b"ok\n"
        assert "/federatls/federation" in stepca_log(cloud)

        cloud.federate()
        follow(cloud, k8s, ("kubernetes", K8S_NAMES))
        async with serving(cloud):
            await until_following(cloud, k8s.root)
            server = await federatls.bootstrap(
                cloud.token("server.cloud.internal", sans=["localhost", "127.0.0.1"])
            )
        assert server.trust.has_name_rules
        async with line_server(server) as (port, _):
            assert await ask(impostor, port) == b""


# The CA client: what /federatls/federation's answer does to the bundle ----------------------
@contextlib.contextmanager
def rogue_with_peer(tmp_path: Path) -> Iterator[tuple[RogueCA, x509.Certificate]]:
    """A CA (``rogue_ca``, honest unless told) whose ``/federation`` lists a peer's root as
    well; it publishes no structure until a test sets ``structure``."""
    peer_root = make_pki(tmp_path, "kubernetes").root
    rogue = RogueCA(make_pki(tmp_path, "cloud"))
    rogue.federated = [peer_root]
    with rogue.running():
        yield rogue, peer_root


def structure(rogue: RogueCA, peer_root: x509.Certificate) -> tuple[int, dict[str, object]]:
    sources = (
        _entry("own", None, [rogue.pki.root], None),
        _entry("peer", "kubernetes", [peer_root], K8S_NAMES),
    )
    return 200, FederationSourcesResponse(sources).to_json()


async def test_structure_served_gives_the_bundle_its_rules(tmp_path: Path) -> None:
    """A CA that serves ``/federatls/federation`` gives its workloads the peer's root with
    its names. Twin: a CA answering it 404 (as step-ca does) gives the flat bundle."""
    with rogue_with_peer(tmp_path) as (rogue, peer_root):
        flat = await federatls.bootstrap(rogue.pki.token("svc", sans=["svc"]))
        rogue.structure = structure(rogue, peer_root)
        ruled = await federatls.bootstrap(rogue.pki.token("svc", sans=["svc"]))
        assert rogue.requests.count("GET /federatls/federation") == 2
    assert [r.names for r in flat.trust] == [None, None]
    assert [r.provenance for r in flat.trust] == [Provenance.OWN, Provenance.FEDERATED]
    peer = ruled.trust.by_fingerprint(fingerprint(peer_root))
    assert peer is not None
    assert peer.provenance is Provenance.PEER
    assert [p.text for p in peer.names or ()] == list(K8S_NAMES)


@pytest.mark.parametrize("status", [403, 500, 503])
async def test_failing_structure_fails_bootstrap(tmp_path: Path, status: int) -> None:
    """Any failure of ``/federatls/federation`` but a 404 fails the bootstrap (rules are not
    dropped silently), naming the endpoint. Twin: with a 404 it enrols (previous test)."""
    with rogue_with_peer(tmp_path) as (rogue, _):
        rogue.structure = (status, {"status": status, "message": "no"})
        with pytest.raises(federatls.CARefusedError) as info:
            await federatls.bootstrap(rogue.pki.token("svc", sans=["svc"]))
    assert info.value.status == status
    assert info.value.url == f"{rogue.url}/federatls/federation"


async def test_renewal_keeps_the_rules_when_the_structure_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal whose ``/federatls/federation`` fails (500, or an answer that does not
    parse) keeps the last good bundle and its rules, and says why; the certificate still
    renews. Twin: with the structure served again, the renewal takes the new bundle."""
    caplog.set_level(logging.WARNING, logger="federatls.renewal")
    with rogue_with_peer(tmp_path) as (rogue, peer_root):
        rogue.structure = structure(rogue, peer_root)
        identity = await federatls.bootstrap(rogue.pki.token("svc", sans=["svc"]))
        live = federatls.RenewingIdentity(identity)
        failures: list[tuple[int, dict[str, object]]] = [
            (500, {"status": 500, "message": "boom"}),
            (200, {"sources": "x"}),
        ]
        for broken in failures:
            rogue.structure = broken
            renewed = await live.refresh()
            assert renewed.serial != identity.serial
            assert renewed.trust is identity.trust
            assert live.last_error is not None
        assert "keeping the last good one" in caplog.text
        rogue.structure = structure(rogue, peer_root)
        rogue.federated = []  # the peer's root is gone
        renewed = await live.refresh()
    assert live.last_error is None
    assert renewed.trust is not identity.trust
    assert renewed.trust.by_fingerprint(fingerprint(peer_root)) is None


async def test_option_off_survives_renewal(tmp_path: Path) -> None:
    """An identity enrolled with ``name_rules=False`` keeps the option through a renewal
    (its contexts still built without the rules) while the bundle keeps its rules. Twin:
    one enrolled by default renews with the option on."""
    with rogue_with_peer(tmp_path) as (rogue, peer_root):
        rogue.structure = structure(rogue, peer_root)
        for rules in (False, True):
            token = rogue.pki.token("svc", sans=["svc"])
            live = federatls.RenewingIdentity(await federatls.bootstrap(token, name_rules=rules))
            renewed = await live.refresh()
            assert live.renewals == 1
            assert renewed.name_rules is rules
            assert renewed.trust.has_name_rules
            assert (getattr(_CHECKS.get(live.client_context()), "rules", None) is None) is not rules


async def test_disagreeing_answers_trust_neither_extra_root(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A root in ``/federation`` that the structure does not list is not trusted, and the
    CA's URL and the root are logged. Twin: listed, it is trusted with its names."""
    caplog.set_level(logging.WARNING, logger="federatls")
    with rogue_with_peer(tmp_path) as (rogue, peer_root):
        own_only = _entry("own", None, [rogue.pki.root], None)
        rogue.structure = 200, {"sources": [own_only.to_json()]}
        identity = await federatls.bootstrap(rogue.pki.token("svc", sans=["svc"]))
        rogue.structure = structure(rogue, peer_root)
        twin = await federatls.bootstrap(rogue.pki.token("svc", sans=["svc"]))
    assert [r.certificate for r in identity.trust] == [rogue.pki.root]
    [line] = [r.getMessage() for r in caplog.records if "not trusted" in r.getMessage()]
    assert line.startswith(f"{rogue.url}: not trusted: ")
    assert "kubernetes" in line
    assert [r.certificate for r in twin.trust] == [rogue.pki.root, peer_root]


async def test_option_off_survives_a_trust_refresh(tmp_path: Path) -> None:
    """An identity enrolled with ``name_rules=False`` keeps the option through a trust
    refresh that swaps in a changed bundle with rules (its contexts still built without
    them). Twin: one enrolled by default has the rules in its new contexts."""
    with rogue_with_peer(tmp_path) as (rogue, peer_root):
        for rules in (False, True):
            own_only = _entry("own", None, [rogue.pki.root], None)
            rogue.structure = 200, {"sources": [own_only.to_json()]}
            token = rogue.pki.token("svc", sans=["svc"])
            live = federatls.RenewingIdentity(await federatls.bootstrap(token, name_rules=rules))
            live.client_context()  # a context handed out before the swap is rebuilt by it
            rogue.structure = structure(rogue, peer_root)
            assert await live.refresh_trust()
            assert live.current.name_rules is rules
            assert live.current.trust.has_name_rules
            assert (getattr(_CHECKS.get(live.client_context()), "rules", None) is None) is not rules
