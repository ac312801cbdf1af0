"""hypercorn (asyncio) serving an ASGI app with federatls's server context: federated clients
are served over HTTP/1.1 and HTTP/2, others are refused in the handshake; the authoriser
refuses before the app sees a request; hypercorn's own TLS settings are refused; the context
follows renewal; and live traffic survives renewals on both sides and a root rotation.

Real federatls CAs (``federatls.testing``, tests/traffic.py), real hypercorn on 127.0.0.1
(a socket bound to port 0 handed over as ``fd://``), clients from
``federatls.integrations.httpx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import hypercorn.asyncio
import pytest
from anyio.abc import TaskGroup
from hypercorn.config import Config
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

import federatls
from federatls import (
    ConfigError,
    Identity,
    PeerInfo,
    RenewalPolicy,
    RenewingIdentity,
    allow_names,
)
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import add_root, issue_from_new_root, retire_old_roots
from federatls.integrations import httpx as fhttpx
from federatls.integrations import hypercorn as fhypercorn
from federatls.testing import TestCA, federated_pair, running_ca

from harness import SHORT, wait_until
from traffic import CA, Traffic, federatls_ca

pytestmark = pytest.mark.anyio

LOGGER = "federatls.peer"
LONG = timedelta(minutes=10)
SERVER_NAMES = ["server.cloud.internal", "127.0.0.1", "localhost"]
WAIT = 30.0  # seconds for any one condition, on a loaded machine
Source = Identity | RenewingIdentity


# CAs and identities ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Parties:
    server: Identity  # cloud: server.cloud.internal, 127.0.0.1
    client: Identity  # kubernetes: client.k8s.internal
    stranger: Identity  # a CA neither federates; it trusts both


@pytest.fixture(scope="module")
def parties() -> Iterator[Parties]:
    """cloud and kubernetes, federated both ways, and "elsewhere", trusting them (they do not
    trust it): one identity of each (the CAs run only while the module does)."""
    with (
        federated_pair("cloud", "kubernetes") as (cloud, kubernetes),
        running_ca("elsewhere") as elsewhere,
    ):
        elsewhere.federate(cloud, kubernetes)
        yield Parties(
            server=cloud.identity("server.cloud.internal", sans=SERVER_NAMES),
            client=kubernetes.identity("client.k8s.internal"),
            stranger=elsewhere.identity("client.elsewhere.internal"),
        )


@pytest.fixture
def short_pair() -> Iterator[tuple[TestCA, TestCA]]:
    """cloud and kubernetes, federated both ways, issuing 3-second certificates."""
    with federated_pair("cloud", "kubernetes", claims=SHORT, backdate="1s") as both:
        yield both


async def enrol(ca: TestCA, subject: str, sans: list[str] | None = None) -> Identity:
    return await federatls.bootstrap(ca.token(subject, sans=sans or [subject]), lifetime=LONG)


# The server -------------------------------------------------------------------------------------
@dataclass
class App:
    """An ASGI app answering "ok" and recording the HTTP version of each request it saw."""

    versions: list[str] = field(default_factory=list)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert scope["type"] == "http"
        self.versions.append(scope["http_version"])
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
        await send(
            {"type": "http.response.start", "status": 200, "headers": headers, "trailers": False}
        )
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})


@dataclass(eq=False)  # hashable: contexts are cached per authoriser
class Clients:
    """An authoriser that allows every client and records it (the app cannot see it)."""

    seen: list[PeerInfo] = field(default_factory=list)

    def __call__(self, peer: PeerInfo) -> None:
        self.seen.append(peer)


def bound_socket() -> tuple[int, str]:
    """A listening socket on 127.0.0.1:0 handed to hypercorn as ``fd://``: its port and the
    bind string (hypercorn owns the socket from then on)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    return port, f"fd://{sock.detach()}"


@contextlib.asynccontextmanager
async def serving(config: Config, app: App) -> AsyncIterator[None]:
    """``hypercorn.asyncio.serve(app, config)`` until the block ends."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(hypercorn.asyncio.serve(app, config, shutdown_trigger=stop.wait))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@contextlib.asynccontextmanager
async def server(source: Source, app: App, **kwargs: Any) -> AsyncIterator[str]:
    """``source`` serving ``app`` through ``federatls.integrations.hypercorn.config``; yields
    the URL."""
    port, bind = bound_socket()
    config = fhypercorn.config(source, bind=bind, graceful_timeout=1, **kwargs)
    async with serving(config, app):
        yield f"https://127.0.0.1:{port}/"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING
    ]


# 1. Who is served --------------------------------------------------------------------------------
@pytest.mark.parametrize(("http2", "version"), [(False, "1.1"), (True, "2")])
async def test_federated_client_served(
    parties: Parties, http2: bool, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client of the federated CA is served over HTTP/1.1, and over HTTP/2 when it offers
    it (ALPN), past an authoriser that allows it; the client sees the server's certificate.
    Twin: test_unfederated_client_refused_in_the_handshake."""
    caplog.set_level(logging.WARNING, LOGGER)
    app, clients = App(), Clients()
    async with (
        server(parties.server, app, authoriser=clients) as url,
        fhttpx.AsyncClient(parties.client, http2=http2) as http,
    ):
        response = await http.get(url)
    assert (response.status_code, response.text) == (200, "ok")
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert app.versions == [version]
    assert parties.client.peer(response).serial == parties.server.serial
    assert [peer.serial for peer in clients.seen] == [parties.client.serial]
    assert warnings(caplog) == []


async def test_unfederated_client_refused_in_the_handshake(
    parties: Parties, caplog: pytest.LogCaptureFixture
) -> None:
    """A client of a CA the server's CA does not federate (the client trusts the server) is
    refused in the handshake: the app never runs, the refusal is logged once; a federated
    client is served by the same server right after."""
    caplog.set_level(logging.WARNING, LOGGER)
    app = App()
    async with server(parties.server, app) as url:
        async with fhttpx.AsyncClient(parties.stranger) as http:
            with pytest.raises(httpx.TransportError):
                await http.get(url)
        await asyncio.sleep(0.1)  # an app wrongly reached would have run by now
        assert app.versions == []
        async with fhttpx.AsyncClient(parties.client) as http:
            served = await http.get(url)
    assert served.status_code == 200
    assert warnings(caplog) == [
        "refused a TLS client in the TLS handshake: its certificate failed verification "
        "(unable to get local issuer certificate)"
    ]


# 2. The authoriser ------------------------------------------------------------------------------
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
async def test_authoriser_refuses_before_the_app(
    parties: Parties, http2: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A federated client the authoriser refuses is cut off in the handshake: the app is
    never called and one line says why. Twin: test_federated_client_served (allowed)."""
    caplog.set_level(logging.DEBUG, LOGGER)
    app = App()
    async with (
        server(parties.server, app, authoriser=allow_names("*.cloud.internal")) as url,
        fhttpx.AsyncClient(parties.client, http2=http2) as http,
    ):
        with pytest.raises(httpx.TransportError):
            await http.get(url)
        await asyncio.sleep(0.1)
    assert app.versions == []
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    assert lines[0].startswith("refused a TLS client after the TLS handshake (authoriser): ")
    assert "client.k8s.internal" in lines[0]
    assert "*.cloud.internal" in lines[0]


async def test_client_without_certificate_refused_with_an_authoriser(parties: Parties) -> None:
    """With client certificates optional, a client sending none is still refused when there
    is an authoriser (it has nobody to check); twin: the same client is served without one."""
    app = App()
    anonymous = httpx.create_ssl_context()
    anonymous.load_verify_locations(cadata=parties.client.trust.pem)
    async with (
        server(parties.server, app, authoriser=Clients(), require_client_certificate=False) as url,
        httpx.AsyncClient(verify=anonymous) as http,
    ):
        with pytest.raises(httpx.TransportError):
            await http.get(url)
    assert app.versions == []
    async with (
        server(parties.server, app, require_client_certificate=False) as url,
        httpx.AsyncClient(verify=anonymous) as http,
    ):
        served = await http.get(url)
    assert served.status_code == 200
    assert app.versions == ["1.1"]


# 3. hypercorn's own TLS settings ----------------------------------------------------------------
REFUSED: dict[str, Any] = {
    "certfile": "server.pem",
    "keyfile": "server.key",
    "keyfile_password": "secret",
    "ca_certs": "roots.pem",
    "ciphers": "ECDHE+AESGCM",
    "verify_mode": 0,
    "verify_flags": 0,
    "cert_reqs": 0,
    "insecure_bind": "127.0.0.1:8080",
    "quic_bind": "127.0.0.1:8443",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hypercorn_tls_setting_refused(parties: Parties, name: str) -> None:
    """Each of hypercorn's TLS settings (and plain or QUIC sockets beside the TLS ones) would
    be ignored or route around the identity's context: ``ConfigError`` naming it."""
    with pytest.raises(ConfigError, match=rf"{name}= "):
        fhypercorn.config(parties.server, **{name: REFUSED[name]})


@pytest.mark.parametrize(
    ("name", "value"),
    [("certfile", "server.pem"), ("verify_mode", 0), ("insecure_bind", ["127.0.0.1:8080"])],
)
def test_tls_setting_changed_later_refused(parties: Parties, name: str, value: Any) -> None:
    """A TLS setting set on the config after it was made is refused when hypercorn asks for
    its sockets or its context, rather than silently ignored."""
    config = fhypercorn.config(parties.server)
    config.create_ssl_context()  # twin: untouched, the context is made
    setattr(config, name, value)
    with pytest.raises(ConfigError, match=rf"{name}= "):
        config.create_ssl_context()
    with pytest.raises(ConfigError, match=rf"{name}= "):
        config.create_sockets()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"no_such_setting": 1}, "not a hypercorn setting"),
        ({"_bind": ["127.0.0.1:1"]}, "not a hypercorn setting"),
        ({"alpn_protocols": ["h3"]}, "alpn_protocols"),
        ({"alpn_protocols": []}, "alpn_protocols"),
    ],
)
def test_unknown_or_bad_settings_refused(
    parties: Parties, kwargs: dict[str, Any], match: str
) -> None:
    """A name hypercorn does not know would be ignored, and ALPN other than h2/http1.1
    cannot be served: ``ConfigError``."""
    with pytest.raises(ConfigError, match=match):
        fhypercorn.config(parties.server, **kwargs)


async def test_other_settings_passed_on(parties: Parties) -> None:
    """Twin: hypercorn's other settings reach it: ``alpn_protocols=["http/1.1"]`` serves an
    HTTP/2-offering client over HTTP/1.1, and the context is a federatls server context."""
    app = App()
    async with (
        server(parties.server, app, alpn_protocols=["http/1.1"], keep_alive_timeout=3) as url,
        fhttpx.AsyncClient(parties.client, http2=True) as http,
    ):
        response = await http.get(url)
    assert response.http_version == "HTTP/1.1"
    assert app.versions == ["1.1"]
    config = fhypercorn.config(parties.server, keep_alive_timeout=3)
    assert config.keep_alive_timeout == 3
    assert config.ssl_enabled
    assert config.create_ssl_context().verify_mode.name == "CERT_REQUIRED"


def test_missing_hypercorn_names_the_extra() -> None:
    """Without hypercorn installed, importing the integration raises ``MissingExtraError``
    naming the ``hypercorn`` extra (hypercorn hidden from a fresh interpreter). Twin: with
    it, the import succeeds (this module imported it)."""
    code = (
        "import sys; sys.modules['hypercorn'] = None\n"
        "from federatls import MissingExtraError\n"
        "try:\n"
        "    import federatls.integrations.hypercorn\n"
        "except MissingExtraError as exc:\n"
        "    print(exc.extra, exc.missing)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    extra, missing = out.stdout.split()
    assert (extra, missing.split(".")[0]) == ("hypercorn", "hypercorn")
    assert fhypercorn.config.__module__ == "federatls.integrations.hypercorn"


# 4. Renewal -------------------------------------------------------------------------------------
async def test_new_connections_follow_renewal(short_pair: tuple[TestCA, TestCA]) -> None:
    """After the server renews, its next new connection (once the idle keep-alive connection
    is closed, keep_alive_timeout=1) presents the new certificate; after the client renews,
    the server sees the new client certificate on its next request (the client's pool is
    recycled). Twin: right after the server's renewal, the kept-alive connection still shows
    the old certificate."""
    cloud, kubernetes = short_pair
    live_server = RenewingIdentity(await enrol(cloud, "server.cloud.internal", SERVER_NAMES))
    live_client = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal"))
    clients, app = Clients(), App()
    async with (
        server(live_server, app, authoriser=clients, keep_alive_timeout=1) as url,
        fhttpx.AsyncClient(live_client) as http,
    ):

        async def server_serial() -> int:
            response = await http.get(url)
            assert response.status_code == 200
            return live_client.peer(response).serial

        old_server = live_server.current.serial
        first = await server_serial()
        await live_server.refresh()
        kept_alive = await server_serial()
        await anyio.sleep(2.5)  # one idle period and more: hypercorn closes the connection
        after_idle = await server_serial()

        old_client = live_client.current.serial
        await live_client.refresh()
        await server_serial()
    assert (first, kept_alive) == (old_server, old_server)
    assert after_idle == live_server.current.serial != old_server
    assert clients.seen[-1].serial == live_client.current.serial != old_client
    assert {p.serial for p in clients.seen} == {old_client, live_client.current.serial}


# 5. Live traffic through renewals and a root rotation -------------------------------------------
K8S_NAMES = ["*.k8s.internal", "127.0.0.1"]  # what cloud lets kubernetes' roots vouch for
K8S_SERVER_NAMES = ["server.k8s.internal", "127.0.0.1"]
TRUST_EVERY_SECOND = RenewalPolicy(trust_refresh=timedelta(seconds=1))
# Renewed every 2.5 to 2.7 s (at two thirds of the life left), with 5 s to spare before
# expiry: a 3-second certificate left 2 s, which a loaded 2-core machine sometimes overran.
RENEWED = timedelta(seconds=8)


async def _eventually(check: Callable[[], Any], what: str) -> None:
    deadline = anyio.current_time() + WAIT
    while not await check():
        if anyio.current_time() > deadline:
            raise TimeoutError(f"{what}: not within {WAIT:.0f} s")
        await anyio.sleep(0.2)


async def _renewing(tg: TaskGroup, identity: Identity) -> RenewingIdentity:
    live = RenewingIdentity(identity, policy=TRUST_EVERY_SECOND)
    await tg.start(live.run)
    return live


async def _drive(
    http: httpx.AsyncClient, client: RenewingIdentity, url: str, traffic: Traffic, stop: anyio.Event
) -> None:
    """Requests until ``stop``, each recorded in ``traffic`` (the server's anchor, or the
    failure)."""
    while not stop.is_set():
        try:
            response = await http.get(url)
            assert response.status_code == 200, response
            server = client.peer(response)
        except Exception as exc:
            traffic.failures.append(exc)
        else:
            traffic.ok += 1
            traffic.server_anchors.append(server.anchor.fingerprint if server.anchor else "")
        await anyio.sleep(0.05)


async def _status(client: Identity, url: str) -> int | str:
    """One request on a new connection: the status, or "refused"."""
    async with fhttpx.AsyncClient(client) as http:
        try:
            return (await http.get(url)).status_code
        except httpx.TransportError:
            return "refused"


def _anchor(live: RenewingIdentity) -> str:
    identity = live.current
    anchor = identity.trust.anchor_of(identity.chain[-1])
    return anchor.fingerprint if anchor else ""


async def test_live_traffic_through_renewals_and_a_rotation() -> None:
    """Kubernetes rotates its root (add B, issue from B, retire A) while cloud follows it by
    URL; hypercorn servers of each CA serve httpx clients of the other (HTTP/2 one way,
    HTTP/1.1 the other), every workload renewing every few seconds: no request fails,
    traffic flows in every phase, kubernetes' workloads end anchored in B as the other side
    sees them, and an identity still anchored in A is refused on a new connection once A is
    retired (the twin: the same identity is served before)."""
    async with (
        federatls_ca("cloud") as cloud,
        federatls_ca("kubernetes") as kubernetes,
        anyio.create_task_group() as tg,
    ):
        await kubernetes.federate(cloud)
        await cloud.follow(kubernetes, K8S_NAMES)
        root_a = fingerprint(kubernetes.root)
        await _eventually(lambda: _has(cloud, root_a), "cloud federates with A")

        async def enrol_in(ca: CA, subject: str, sans: list[str] | None = None) -> Identity:
            token = ca.mint(subject, sans or [subject])
            return await federatls.bootstrap(token, lifetime=RENEWED)

        servers = {
            "cloud": await _renewing(
                tg, await enrol_in(cloud, "server.cloud.internal", SERVER_NAMES)
            ),
            "kubernetes": await _renewing(
                tg, await enrol_in(kubernetes, "server.k8s.internal", K8S_SERVER_NAMES)
            ),
        }
        clients = {
            "cloud": await _renewing(tg, await enrol_in(cloud, "client.cloud.internal")),
            "kubernetes": await _renewing(tg, await enrol_in(kubernetes, "client.k8s.internal")),
        }
        old = await federatls.bootstrap(
            kubernetes.mint("old.k8s.internal", ["old.k8s.internal"]), lifetime=LONG
        )
        seen = {"cloud": Clients(), "kubernetes": Clients()}
        traffic = {"cloud": Traffic(), "kubernetes": Traffic()}
        stop = anyio.Event()
        async with (
            server(servers["cloud"], App(), authoriser=seen["cloud"]) as cloud_url,
            server(servers["kubernetes"], App(), authoriser=seen["kubernetes"]) as k8s_url,
            fhttpx.AsyncClient(clients["kubernetes"], http2=True) as k8s_http,
            fhttpx.AsyncClient(clients["cloud"]) as cloud_http,
            anyio.create_task_group() as drivers,
        ):
            drivers.start_soon(
                _drive, k8s_http, clients["kubernetes"], cloud_url, traffic["kubernetes"], stop
            )
            drivers.start_soon(
                _drive, cloud_http, clients["cloud"], k8s_url, traffic["cloud"], stop
            )

            async def more(count: int = 3) -> tuple[int, int]:
                target = {ca: t.ok + len(t.failures) + count for ca, t in traffic.items()}
                await wait_until(
                    lambda: all(t.ok + len(t.failures) >= target[ca] for ca, t in traffic.items()),
                    WAIT,
                )
                return traffic["cloud"].ok, traffic["kubernetes"].ok

            counts = [await more()]
            renewed = {ca: live.renewals for ca, live in {**servers, **clients}.items()}

            # Phase 1: kubernetes trusts A and B, issues from A; cloud learns B.
            step = add_root(kubernetes.directory, kubernetes.password, now=datetime.now(UTC))
            root_b = fingerprint(load_pem_certificate(step.roots[-1].read_bytes()))
            await kubernetes.reload()
            await _eventually(lambda: _has(cloud, root_b), "cloud learns B")
            lives = [*servers.values(), *clients.values()]
            await wait_until(lambda: all(_trusts(w, root_b) for w in lives), WAIT)
            counts.append(await more())
            served_with_a = await _status(old, cloud_url)

            # Phase 2: kubernetes issues from B; its workloads renew onto B.
            issue_from_new_root(kubernetes.directory)
            await kubernetes.reload()
            k8s = [servers["kubernetes"], clients["kubernetes"]]
            await wait_until(lambda: all(_anchor(w) == root_b for w in k8s), WAIT)
            counts.append(await more())

            # Phase 3: kubernetes retires A; cloud drops it, and so do the workloads.
            retire_old_roots(kubernetes.directory)
            await kubernetes.reload()
            await _eventually(lambda: _lacks(cloud, root_a), "cloud drops A")
            await wait_until(lambda: not any(_trusts(w, root_a) for w in lives), WAIT)
            counts.append(await more())
            refused_with_a = await _status(old, cloud_url)

            # And on: every workload renews at least twice while the traffic flows.
            everyone = {**servers, **clients}
            await wait_until(
                lambda: all(w.renewals >= renewed[ca] + 2 for ca, w in everyone.items()), WAIT
            )
            counts.append(await more())
            stop.set()
        renewals_during = {
            ca: live.renewals - renewed[ca] for ca, live in {**servers, **clients}.items()
        }
        for live in [*servers.values(), *clients.values()]:
            assert live.stopped is None, live.stopped
        tg.cancel_scope.cancel()

    failures = {ca: t.failures for ca, t in traffic.items()}
    assert failures == {"cloud": [], "kubernetes": []}, failures
    for earlier, later in itertools.pairwise(counts):  # traffic in every phase, both ways
        assert earlier[0] < later[0]
        assert earlier[1] < later[1]
    assert all(n >= 2 for n in renewals_during.values()), renewals_during  # both sides renewed
    assert (served_with_a, refused_with_a) == (200, "refused")
    k8s_client_seen = seen["cloud"].seen[-1]
    assert k8s_client_seen.common_name == "client.k8s.internal"
    assert k8s_client_seen.anchor is not None
    assert k8s_client_seen.anchor.fingerprint == root_b  # cloud's server saw it anchored in B
    assert traffic["cloud"].server_anchors[-1] == root_b  # cloud's client saw k8s' server in B


async def _has(ca: CA, root: str) -> bool:
    return root in await ca.federation()


async def _lacks(ca: CA, root: str) -> bool:
    return root not in await ca.federation()


def _trusts(live: RenewingIdentity, root: str) -> bool:
    return any(r.fingerprint == root for r in live.current.trust)
