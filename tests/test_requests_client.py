"""requests and urllib3 with a federatls identity (``federatls.integrations.requests.Session``
and ``federatls.integrations.urllib3.PoolManager``): servers checked in the handshake (trust
bundle, name rules, authoriser) before a byte of a request, refusals raised as
``PeerNotAuthorisedError``, pools recycled after a renewal, arguments that would route around
the TLS refused, and live traffic through renewals and a root rotation.

Real federatls CAs (federated pair, 3-second certificates; tests/test_live_swap.py), real TLS
servers on 127.0.0.1 (its keep-alive ``streams_server``, which records each connection's
client serial and when it ends), real requests and urllib3; the blocking clients run on
worker threads.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import certifi
import pytest
import requests
import urllib3

import test_federated_rotation as rotation
from federatls import (
    BadMaterialError,
    ConfigError,
    Identity,
    PeerInfo,
    PeerNotAuthorisedError,
    RenewingIdentity,
    allow_names,
)
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import add_root, issue_from_new_root, retire_old_roots
from federatls.integrations import requests as frequests
from federatls.integrations import urllib3 as furllib3
from federatls.integrations._source import peer_refusal
from federatls.testing import TestCA, running_ca
from test_live_swap import LONG, SERVER_NAMES, Seen, enrol, pair, streams_server

import traffic
from harness import wait_until

pytestmark = pytest.mark.anyio
__all__ = ["pair"]  # the fixture, used by name

Source = Identity | RenewingIdentity


# Clients: one GET each, the same shape for requests and urllib3 ------------------------------
class Client:
    """A blocking client under test: ``get`` returns (status, body, the response)."""

    def __init__(self, kind: str, source: Source, authoriser: Any = None, **kw: Any) -> None:
        self.kind = kind
        self.http: frequests.Session | furllib3.PoolManager
        if kind == "requests":
            self.http = frequests.Session(source, authoriser=authoriser, **kw)
        else:
            kw.setdefault("retries", 0)  # a refused handshake tried once (else retried)
            self.http = furllib3.PoolManager(source, authoriser=authoriser, **kw)

    def get(self, url: str, **kw: Any) -> tuple[int, str, Any]:
        if isinstance(self.http, frequests.Session):
            response = self.http.get(url, timeout=10, **kw)
            return response.status_code, response.text, response
        answer = self.http.request("GET", url, timeout=10, **kw)
        return answer.status, answer.data.decode(), answer

    def close(self) -> None:
        if isinstance(self.http, frequests.Session):
            self.http.close()
        else:
            self.http.clear()


KINDS = ["requests", "urllib3"]


@contextlib.contextmanager
def client(kind: str, source: Source, authoriser: Any = None, **kw: Any) -> Iterator[Client]:
    made = Client(kind, source, authoriser, **kw)
    try:
        yield made
    finally:
        made.close()


async def get(http: Client, port: int, **kw: Any) -> tuple[int, str, Any]:
    return await anyio.to_thread.run_sync(functools.partial(http.get, _url(port), **kw))


def _url(port: int) -> str:
    return f"https://127.0.0.1:{port}/"


@pytest.fixture
def outsider(pair: tuple[TestCA, TestCA]) -> Iterator[TestCA]:
    """A third CA trusting cloud and kubernetes, which do not trust it."""
    with running_ca("elsewhere") as ca:
        ca.federate(*pair)
        yield ca


# 1. Federated servers reached, others refused -------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
async def test_federated_server_reached(pair: tuple[TestCA, TestCA], kind: str) -> None:
    """A kubernetes client reaches a cloud server: 200, the server saw the client's serial,
    and ``live.peer(response)`` names the server after the body was read."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal", lifetime=LONG))
    async with streams_server(server, seen, None) as port:
        with client(kind, live) as http:
            status, body, response = await get(http, port)
            peer = live.peer(response)
    assert (status, body) == (200, "1")
    assert isinstance(peer, PeerInfo)
    assert peer.serial == server.serial
    assert peer.anchor is not None
    assert peer.anchor.certificate == cloud.root
    assert seen.serials == {"client.k8s.internal": {live.current.serial}}


@pytest.mark.parametrize("kind", KINDS)
async def test_unfederated_server_refused(
    pair: tuple[TestCA, TestCA], outsider: TestCA, kind: str
) -> None:
    """Twin: a server of a CA kubernetes does not federate (it trusts the client) is refused
    in the handshake (CERTIFICATE_VERIFY_FAILED) and handles no request."""
    _, kubernetes = pair
    seen = Seen()
    stranger = await enrol(outsider, "server.elsewhere.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal", lifetime=LONG))
    async with streams_server(stranger, seen, None) as port:
        with client(kind, live) as http:
            errors = (requests.exceptions.SSLError, urllib3.exceptions.MaxRetryError)
            with pytest.raises(errors) as info:
                await get(http, port)
            await anyio.sleep(0.1)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert peer_refusal(info.value) is None
    assert seen.handled == 0


# 2. Refused by the authoriser or the name rules, before the request ------------------------
@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "refused"])
@pytest.mark.parametrize("kind", KINDS)
async def test_authoriser(
    pair: tuple[TestCA, TestCA], kind: str, allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A server the authoriser refuses raises ``PeerNotAuthorisedError`` (naming the rule,
    carrying the server's PeerInfo, logged once) and the server sees no request. Twin: the
    server it allows answers."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal", lifetime=LONG))
    rule = allow_names("server.cloud.internal" if allowed else "other.cloud.internal")
    async with streams_server(server, seen, None) as port:
        with client(kind, live, rule) as http:
            if allowed:
                status, _, _ = await get(http, port)
                assert status == 200
            else:
                with pytest.raises(PeerNotAuthorisedError, match=r"other\.cloud\.internal") as e:
                    await get(http, port)
                assert e.value.peer.serial == server.serial
            await anyio.sleep(0.1)  # a request wrongly sent would have been handled by now
    refusals = [r for r in caplog.records if r.name == "federatls.peer"]
    if allowed:
        assert seen.handled == 1
        assert refusals == []
    else:
        assert seen.handled == 0
        assert len(refusals) == 1
        assert "(authoriser)" in refusals[0].getMessage()


K8S_NAMES = ["*.k8s.internal", "127.0.0.1"]


@pytest.mark.parametrize("name", ["payments.cloud.internal", "api.k8s.internal"])
@pytest.mark.parametrize("kind", KINDS)
async def test_name_rules(kind: str, name: str) -> None:
    """Cloud follows kubernetes allowing it only *.k8s.internal: a cloud client refuses a
    kubernetes server naming itself payments.cloud.internal (``PeerNotAuthorisedError``, no
    request handled). Twin: the kubernetes server named api.k8s.internal answers."""
    async with traffic.federatls_ca("cloud") as cloud, traffic.federatls_ca("kubernetes") as k8s:
        await k8s.federate(cloud)
        await cloud.follow(k8s, K8S_NAMES)
        for _ in range(150):  # 30 s at most
            if fingerprint(k8s.root) in await cloud.federation():
                break
            await anyio.sleep(0.2)
        else:
            raise TimeoutError("cloud does not follow kubernetes")
        server = await traffic.enrol(k8s, name, [name, "127.0.0.1"], LONG)
        me = await traffic.enrol(cloud, "client.cloud.internal", lifetime=LONG)
        seen = Seen()
        async with streams_server(server, seen, None) as port:
            with client(kind, me) as http:
                if name.endswith(".k8s.internal"):
                    status, _, _ = await get(http, port)
                    assert status == 200
                else:
                    with pytest.raises(PeerNotAuthorisedError, match="may only vouch for"):
                        await get(http, port)
                await anyio.sleep(0.1)
    assert seen.handled == (1 if name.endswith(".k8s.internal") else 0)


# 3. Pools follow renewal ----------------------------------------------------------------------
@pytest.mark.parametrize("renew", [True, False], ids=["renewed", "not-renewed"])
@pytest.mark.parametrize("kind", KINDS)
async def test_pool_recycled_after_client_renewal(
    pair: tuple[TestCA, TestCA], kind: str, renew: bool
) -> None:
    """After the client renews, the next request goes over a new connection presenting the
    new certificate (the serial the server saw) and the old pool's idle connection is closed.
    Twin: without a renewal the second request reuses the first connection, left open."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "pooled.k8s.internal", lifetime=LONG))
    old = live.current.serial
    async with streams_server(server, seen, None) as port:
        with client(kind, live) as http:
            first = await get(http, port)
            if renew:
                await live.refresh()
            second = await get(http, port)
            if renew:
                conn1, conn2 = seen.connections
                with anyio.fail_after(10):
                    await conn1.closed.wait()
                assert not conn2.closed.is_set()
            else:
                (conn1,) = seen.connections
                await anyio.sleep(0.2)
                assert not conn1.closed.is_set()
    assert first[:2] == (200, "1")
    assert second[:2] == (200, "2" if renew else "1")
    assert [c.serial for c in seen.connections] == ([old, live.current.serial] if renew else [old])
    assert live.peer(second[2]).serial == server.serial
    assert seen.handled == 2


def _open_stream(http: Client, port: int) -> Any:
    """A request whose response body is not read yet (its connection held)."""
    if isinstance(http.http, frequests.Session):
        return http.http.get(_url(port), stream=True, timeout=10)
    return http.http.request("GET", _url(port), preload_content=False, timeout=10)


def _finish(response: Any) -> bytes:
    if isinstance(response, requests.Response):
        body = response.content
        response.close()
        return body
    body = response.read()
    response.release_conn()
    return bytes(body)


@pytest.mark.parametrize("kind", KINDS)
async def test_old_pool_closed_once_its_response_is_released(
    pair: tuple[TestCA, TestCA], kind: str
) -> None:
    """A response still being read when the client renews keeps the old pool (and its
    connection) open, while new requests go over a new connection with the new certificate;
    once that response is read and released, the old connection is closed. Its peer is
    known while it is held."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "pooled.k8s.internal", lifetime=LONG))
    old = live.current.serial
    async with streams_server(server, seen, None) as port:
        with client(kind, live) as http:
            held = await anyio.to_thread.run_sync(_open_stream, http, port)
            await live.refresh()
            fresh = await get(http, port)
            conn1, conn2 = seen.connections
            await anyio.sleep(0.3)
            open_while_held = not conn1.closed.is_set()
            held_peer = live.peer(held).serial
            body = await anyio.to_thread.run_sync(_finish, held)
            with anyio.fail_after(10):
                await conn1.closed.wait()
            assert not conn2.closed.is_set()
    assert open_while_held
    assert body == b"1"
    assert fresh[:2] == (200, "2")
    assert held_peer == server.serial
    assert (conn1.serial, conn2.serial) == (old, live.current.serial)


def _responses_in_cycles(http: Client, port: int, calls: int, planted: int) -> int:
    """How many urllib3 responses of ``calls`` calls (the last ``planted`` of them put in a
    reference cycle on purpose) only the garbage collector could free."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for n in range(calls):
            raw = http.get(_url(port))[2]
            raw = getattr(raw, "raw", raw)  # a requests response's urllib3 response
            if n >= calls - planted:
                raw.cycle = raw
            del raw
        gc.collect()
        return sum(isinstance(o, urllib3.response.HTTPResponse) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("kind", KINDS)
async def test_calls_leave_no_reference_cycles(pair: tuple[TestCA, TestCA], kind: str) -> None:
    """A call's urllib3 response is freed by reference counting, not left in a cycle for the
    garbage collector (a hook per response once made one, and the collector then ran every
    ~30 calls, holding the GIL). Twin: responses put in a cycle on purpose are found."""
    cloud, kubernetes = pair
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    me = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    async with streams_server(server, Seen(), None) as port:
        with client(kind, me) as http:
            clean = await anyio.to_thread.run_sync(_responses_in_cycles, http, port, 20, 0)
            twin = await anyio.to_thread.run_sync(_responses_in_cycles, http, port, 20, 2)
    assert clean == 0
    assert twin == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_threads_share_one_client_across_renewals(
    pair: tuple[TestCA, TestCA], kind: str
) -> None:
    """Eight threads share one client while the client identity renews twice: every request
    is answered, each by the cloud server, and the server saw exactly the three serials the
    client held, each connection presenting one of them."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "threads.k8s.internal", lifetime=LONG))
    serials = {live.current.serial}
    answers: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    async with streams_server(server, seen, None) as port:
        with client(kind, live, **{"pool_maxsize" if kind == "requests" else "maxsize": 8}) as http:
            renewed = threading.Event()

            def worker(n: int) -> None:
                for i in itertools.count():
                    if i >= 15 and renewed.is_set():
                        return
                    try:
                        status, _, response = http.get(_url(port))
                        with lock:
                            answers.append((status, live.peer(response).serial))
                    except Exception as exc:
                        with lock:
                            errors.append(exc)

            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(functools.partial(anyio.to_thread.run_sync, worker, n))
                for _ in range(2):
                    await anyio.sleep(0.3)
                    await live.refresh()
                    serials.add(live.current.serial)
                await anyio.sleep(0.3)
                renewed.set()
    assert errors == []
    assert len(answers) >= 8 * 15
    assert {a for a in answers} == {(200, server.serial)}
    assert seen.serials["threads.k8s.internal"] == serials
    assert len(serials) == 3


# 4. Arguments that would route around the TLS -------------------------------------------------
async def test_requests_session_refusals(pair: tuple[TestCA, TestCA]) -> None:
    """The session refuses http:// (also as a redirect target), proxies, verify= and cert=
    per request or on the session, adapter arguments it does not know, and an adapter of
    one's own mounted on https:// or http:// (or written into ``session.adapters``), each
    with a ConfigError naming it; nothing
    reaches the server. Twin: the same request without them is answered (by federatls's
    adapter: the refused mount changed nothing)."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    me = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    with pytest.raises(ConfigError, match="pool_size="):
        frequests.Session(me, pool_size=3)
    async with streams_server(server, seen, None) as port:
        url = _url(port)
        with frequests.Session(me) as session:
            attempts: list[tuple[str, Callable[[], object]]] = [
                ("only https://", lambda: session.get(f"http://127.0.0.1:{port}/")),
                ("proxies=", lambda: session.get(url, proxies={"https": "http://127.0.0.1:9"})),
                ("verify=False", lambda: session.get(url, verify=False)),
                ("verify='/etc/ssl", lambda: session.get(url, verify="/etc/ssl/certs")),
                ("cert=", lambda: session.get(url, cert=("/tmp/c.pem", "/tmp/k.pem"))),
            ]
            for match, attempt in attempts:
                with pytest.raises(ConfigError, match=match):
                    await anyio.to_thread.run_sync(attempt)
            session.verify = False
            with pytest.raises(ConfigError, match="verify=False"):
                await anyio.to_thread.run_sync(session.get, url)
            session.verify = True
            session.proxies = {"https": "http://127.0.0.1:9"}
            with pytest.raises(ConfigError, match="proxies="):
                await anyio.to_thread.run_sync(session.get, url)
            session.proxies = {}
            for prefix in ("https://", "HTTPS://127.0.0.1", "http://"):
                with pytest.raises(ConfigError, match=r"mount\(.*HTTPAdapter\(\.\.\.\)\)"):
                    session.mount(prefix, requests.adapters.HTTPAdapter())
            session.mount("file://", requests.adapters.HTTPAdapter())  # no TLS to route around
            # Written into the adapters directly (no mount): refused at the request, whether
            # it replaced federatls's or comes first for this host.
            ours = session.adapters["https://"]
            session.adapters["https://"] = requests.adapters.HTTPAdapter()
            with pytest.raises(ConfigError, match=r"HTTPAdapter, found in session\.adapters"):
                await anyio.to_thread.run_sync(session.get, url)
            session.adapters["https://"] = ours
            first = {"https://127.0.0.1": requests.adapters.HTTPAdapter()}
            session.adapters = collections.OrderedDict({**first, **session.adapters})
            with pytest.raises(ConfigError, match=r"HTTPAdapter, found in session\.adapters"):
                await anyio.to_thread.run_sync(session.get, url)
            del session.adapters["https://127.0.0.1"]
            # Other schemes' adapters are not federatls's business.
            assert isinstance(session.get_adapter("file:///x"), requests.adapters.HTTPAdapter)
            answered = await anyio.to_thread.run_sync(session.get, url)
    assert seen.handled == 1
    assert answered.status_code == 200


async def test_requests_redirect_to_http_refused(pair: tuple[TestCA, TestCA]) -> None:
    """A redirect to http:// is refused with ConfigError, not followed without TLS.
    Twin: the redirect itself was answered over https (the server handled it)."""
    cloud, kubernetes = pair
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    me = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    async with _redirecting_server(server, "http://127.0.0.1:9/plain") as (port, handled):
        for kind, kw in (("requests", {}), ("urllib3", {"retries": 3})):  # redirects allowed
            refused = r"only https://, not 'http://127\.0\.0\.1:9/plain'"  # the redirect, named
            with client(kind, me, **kw) as http, pytest.raises(ConfigError, match=refused):
                await get(http, port)
    assert handled == [b"GET / HTTP/1.1"] * 2


@contextlib.asynccontextmanager
async def _redirecting_server(
    source: Source, location: str
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """An https server answering every request with a 302 to ``location``; yields its port and
    the request lines it handled."""
    import asyncio

    from federatls.integrations import streams

    handled: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            handled.append(head.split(b"\r\n", 1)[0])
            writer.write(
                b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n" % location.encode()
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await streams.start_server(source, handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], handled


async def test_environment_proxy_and_ca_bundle_not_used(
    pair: tuple[TestCA, TestCA], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HTTPS_PROXY pointing at nothing and REQUESTS_CA_BUNDLE at a bundle without the
    federation's roots, the session still connects directly and verifies with the identity's
    bundle. Twin: a plain requests session with the same environment fails (through the
    dead proxy)."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    me = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with streams_server(server, seen, None) as port:
        with frequests.Session(me) as session:
            answered = await anyio.to_thread.run_sync(session.get, _url(port))
        with requests.Session() as plain, pytest.raises(requests.exceptions.ProxyError):
            await anyio.to_thread.run_sync(plain.get, _url(port))
    assert answered.status_code == 200
    assert seen.handled == 1


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("ssl_context", None),
        ("cert_reqs", "CERT_NONE"),
        ("ca_certs", "/etc/ssl/certs/ca-certificates.crt"),
        ("assert_hostname", False),
        ("proxy_url", "http://127.0.0.1:9"),
        ("pool_kwargs", {}),
    ],
)
def test_urllib3_pool_manager_refusals(argument: str, value: object) -> None:
    """PoolManager refuses urllib3's TLS and proxy arguments, and any it does not pass on,
    with a ConfigError naming the argument."""
    me = Identity.__new__(Identity)  # never used: the arguments are refused first
    with pytest.raises(ConfigError, match=f"{argument}="):
        furllib3.PoolManager(me, **{argument: value})  # type: ignore[arg-type]


async def test_urllib3_plain_http_refused(pair: tuple[TestCA, TestCA]) -> None:
    """PoolManager refuses an http:// URL with ConfigError before connecting. Twin: https://
    to the same server is answered."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    me = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    async with streams_server(server, seen, None) as port:
        with furllib3.PoolManager(me) as http:
            with pytest.raises(ConfigError, match="only https://"):
                http.request("GET", f"http://127.0.0.1:{port}/")
            answer = await anyio.to_thread.run_sync(http.request, "GET", _url(port))
    assert answer.status == 200
    assert seen.handled == 1


# 5. Live traffic through renewals on both sides and a root rotation ---------------------------
@dataclass
class Calls:
    """One blocking client's calls: the anchors of the servers it reached, what failed."""

    anchors: list[str] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)


async def _keep_calling(
    http: Client, live: RenewingIdentity, port: int, calls: Calls, stop: anyio.Event
) -> None:
    while not stop.is_set():
        try:
            status, body, response = await get(http, port)
            assert (status, body) == (200, "ok"), (status, body)
            anchor = live.peer(response).anchor
            calls.anchors.append(anchor.fingerprint if anchor else "")
        except Exception as exc:
            calls.failures.append(exc)
        await anyio.sleep(0.05)


async def test_live_traffic_through_renewals_and_a_root_rotation() -> None:
    """A requests Session and a urllib3 PoolManager of each CA keep calling the other CA's
    server while every client renews (3-second certificates), kubernetes' server renews, and
    kubernetes rotates its root (add B, issue from B, retire A; cloud follows it by URL):
    no call fails, every client made calls in every phase, and cloud's clients end up
    reaching kubernetes' server anchored in B."""
    async with (
        rotation.federation(traffic.federatls_ca, follow=True) as fed,
        anyio.create_task_group() as tg,
    ):
        lives = {
            ("cloud", kind): await traffic.renewing(
                tg,
                await traffic.enrol(fed.cloud, f"{kind}.cloud.internal"),
                rotation.TRUST_EVERY_SECOND,
            )
            for kind in KINDS
        } | {
            ("kubernetes", kind): await traffic.renewing(
                tg, await traffic.enrol(fed.kubernetes, f"{kind}.k8s.internal")
            )
            for kind in KINDS
        }
        calls = {key: Calls() for key in lives}
        stop = anyio.Event()
        other = {"cloud": "kubernetes", "kubernetes": "cloud"}
        with contextlib.ExitStack() as clients:
            for (ca, kind), live in lives.items():
                http = clients.enter_context(client(kind, live))
                port = fed.ports[other[ca]]
                tg.start_soon(_keep_calling, http, live, port, calls[ca, kind], stop)

            def made() -> list[int]:
                return [len(c.anchors) + len(c.failures) for c in calls.values()]

            async def more(count: int = 3) -> list[int]:
                target = [n + count for n in made()]
                await wait_until(
                    lambda: all(m >= t for m, t in zip(made(), target, strict=True)), 30
                )
                return [len(c.anchors) for c in calls.values()]

            served = [await more()]
            step = add_root(
                fed.kubernetes.directory, fed.kubernetes.password, now=datetime.now(UTC)
            )
            b = fingerprint(load_pem_certificate(step.roots[-1].read_bytes()))
            fed.names[b] = "B"
            await fed.kubernetes.reload()
            await wait_until(lambda: all("B" in fed.trust(w) for w in lives.values()), 30)
            served.append(await more())
            issue_from_new_root(fed.kubernetes.directory)
            await fed.kubernetes.reload()
            k8s = [w for (ca, _), w in lives.items() if ca == "kubernetes"]
            await wait_until(
                lambda: all(fed.anchor(w) == "B" for w in [*k8s, fed.servers["kubernetes"]]),
                30,
            )
            served.append(await more())
            retire_old_roots(fed.kubernetes.directory)
            await fed.kubernetes.reload()
            await wait_until(lambda: all("A" not in fed.trust(w) for w in lives.values()), 30)
            await traffic.renewals(*k8s, count=1, timeout=30)
            served.append(await more())
            stop.set()
        renewed = {key: live.renewals for key, live in lives.items()}
        tg.cancel_scope.cancel()
    failures = {key: c.failures[:3] for key, c in calls.items() if c.failures}
    assert failures == {}
    for earlier, later in itertools.pairwise(served):  # calls served in every phase
        assert all(a < b for a, b in zip(earlier, later, strict=True)), served
    for (ca, _), c in calls.items():
        if ca == "cloud":
            assert fed.names.get(c.anchors[-1]) == "B"
    assert all(n >= 2 for n in renewed.values()), renewed


async def test_peer_of_a_plain_requests_response(
    pair: tuple[TestCA, TestCA], tmp_path: Path
) -> None:
    """``live.peer`` finds the server of a plain requests response (cert= and verify= files)
    while the response holds its connection (stream=True, body unread). Twin: once the body
    is read the connection is back in the pool and the peer cannot be found
    (BadMaterialError saying so), unlike the Session's responses."""
    cloud, kubernetes = pair
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    me = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    chain, key, bundle = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "bundle.pem"
    chain.write_text(me.chain_pem)
    key.touch(0o600)
    key.write_bytes(me.export_private_key(password=None))  # the test's file, for requests
    bundle.write_text(me.trust.pem)
    async with streams_server(server, Seen(), None) as port:
        with requests.Session() as plain:
            plain.trust_env = False
            plain.cert, plain.verify = (str(chain), str(key)), str(bundle)
            held = await anyio.to_thread.run_sync(
                functools.partial(plain.get, _url(port), stream=True, timeout=10)
            )
            while_held = me.peer(held).serial
            assert held.content == b"1"
            with pytest.raises(BadMaterialError, match="cannot find a TLS connection"):
                me.peer(held)
            held.close()
            # urllib3 2's clear() (the session's close) forgets its pools without closing
            # them; close the idle connection here, or (Python 3.12+) the server's
            # wait_closed() waits for it.
            adapter = plain.get_adapter(_url(port))
            assert isinstance(adapter, requests.adapters.HTTPAdapter)
            pools = adapter.poolmanager.pools
            for pool_key in pools.keys():  # noqa: SIM118 (the container has no __iter__)
                pools[pool_key].close()
    assert while_held == server.serial


@pytest.mark.parametrize("kind", KINDS)
async def test_urllib3_http2_injection_refused(pair: tuple[TestCA, TestCA], kind: str) -> None:
    """With urllib3's experimental HTTP/2 injected (it makes urllib3 offer only h2), a
    request to a server speaking h2 is refused with a ConfigError naming it, before any
    connection: the app sees nothing (before, the HTTP/1.1 connection read the server's h2
    frames as a bad status line, three retries over). Twin: once it is extracted, the same
    client is served over HTTP/1.1."""
    import urllib3.http2

    from test_hypercorn import App
    from test_hypercorn import server as h2_server

    cloud, kubernetes = pair
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    me = await enrol(kubernetes, "client.k8s.internal", lifetime=LONG)
    app = App()
    async with h2_server(server, app) as url:
        with client(kind, me) as http:
            urllib3.http2.inject_into_urllib3()
            try:
                with pytest.raises(ConfigError, match=r"inject_into_urllib3\(\)"):
                    await anyio.to_thread.run_sync(http.get, url)
            finally:
                urllib3.http2.extract_from_urllib3()
            status, body, _ = await anyio.to_thread.run_sync(http.get, url)
    assert app.versions == ["1.1"]
    assert (status, body) == (200, "ok")
