"""Issue 17 attacked from outside: the authoriser inside the TLS context, the gRPC server and
channels (native and bridged), requests/urllib3. Each test is one attack; where the attack
worked the fix came with it, and the test stays as the regression that it no longer does.

Real CAs (``federatls.testing``, three-second certificates from harness.SHORT), real TLS and
gRPC servers on 127.0.0.1, real urllib3/requests/grpc clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.to_thread
import grpc
import pytest
import requests.adapters
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import federatls.integrations.grpc as fgrpc
import federatls.integrations.grpc._bridge as _bridge
import federatls.integrations.urllib3 as furllib3
from federatls import (
    Authoriser,
    Identity,
    PeerInfo,
    PeerNotAuthorisedError,
    RenewingIdentity,
    allow_names,
)
from federatls._errors import BadMaterialError
from federatls._peer import peer_from_chain
from federatls._renewal import _MAX_AUTHORISED_CONTEXTS
from federatls._sslkeys import load_cert_chain_in_memory
from federatls._x509 import certs_to_pem
from federatls.testing import TestCA, federated_pair, running_ca
from test_grpc_server import (
    SERVICE,
    Handled,
    channel_credentials,
    serving,
    tls_session,
)

from harness import SHORT
from traffic import LONG, SERVER_NAMES

pytestmark = pytest.mark.anyio

SERVER = "server.cloud.internal"
WAIT = 30.0  # seconds for any one condition, on a loaded machine


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[TestCA, TestCA]]:
    with federated_pair() as cas:
        yield cas


def _identities(pair: tuple[TestCA, TestCA]) -> tuple[Identity, Identity]:
    cloud, k8s = pair
    return cloud.identity(SERVER, sans=SERVER_NAMES), k8s.identity("client.k8s.internal")


def _broken(peer: PeerInfo) -> None:
    """An authoriser with a bug: it raises something other than PeerNotAuthorisedError."""
    raise KeyError("tenant")


# 1. An authoriser that fails ----------------------------------------------------------------------
def _serve(ctx: ssl.SSLContext, connections: int = 1) -> tuple[int, list[object], threading.Thread]:
    """A blocking TLS server on 127.0.0.1 for ``connections`` connections: what each read
    (bytes, after answering b"ok") or the exception its handshake or read ended with
    (anything, not only TLS errors: what leaks out of the context is the point)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[object] = []

    def run() -> None:
        with listener:
            for _ in range(connections):
                raw, _ = listener.accept()
                item: object
                try:
                    with ctx.wrap_socket(raw, server_side=True) as tls:
                        item = (tls.session_reused, tls.recv(100))
                        with contextlib.suppress(OSError):
                            tls.sendall(b"ok")
                except Exception as exc:
                    item = exc
                finally:
                    raw.close()
                seen.append(item)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener.getsockname()[1], seen, thread


def _talk(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None
) -> tuple[bytes | Exception, ssl.SSLSession | None]:
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
        ):
            tls.sendall(b"hello")
            return tls.recv(100), tls.session
    except (ssl.SSLError, OSError) as exc:
        return exc, None


def test_broken_authoriser_on_a_server_context_refuses_and_logs(
    pair: tuple[TestCA, TestCA], caplog: pytest.LogCaptureFixture
) -> None:
    """A server context whose authoriser raises KeyError refuses the client as a refusal
    (SSLCertVerificationError from a PeerNotAuthorisedError caused by the KeyError), logged
    once on federatls.peer. Twin: test_context_authoriser's allowed client, admitted."""
    server, client = _identities(pair)
    port, seen, thread = _serve(server.server_context(authoriser=_broken))
    with caplog.at_level(logging.WARNING, "federatls.peer"):
        answer, _ = _talk(client.client_context(), port)
        thread.join(WAIT)
    assert answer != b"ok"
    assert len(seen) == 1
    refusal = seen[0]
    assert isinstance(refusal, ssl.SSLCertVerificationError), refusal
    assert isinstance(refusal.__cause__, PeerNotAuthorisedError)
    assert isinstance(refusal.__cause__.__cause__, KeyError)
    logged = [r.getMessage() for r in caplog.records if "(authoriser)" in r.getMessage()]
    assert len(logged) == 1
    assert "authoriser failed" in logged[0]


async def test_broken_authoriser_on_an_asyncio_server_refuses_and_logs(
    pair: tuple[TestCA, TestCA], caplog: pytest.LogCaptureFixture
) -> None:
    """Under asyncio (aiohttp, uvicorn, hypercorn, streams) a failing authoriser cuts the
    client before its data and says why on federatls.peer (asyncio itself reports a failed
    handshake only in debug mode). Twin: the same server with a working authoriser answers."""
    server, client = _identities(pair)
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read(100))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    answers = []
    with caplog.at_level(logging.WARNING, "federatls.peer"):
        for authoriser in (_broken, allow_names("*.k8s.internal")):
            ctx = server.server_context(authoriser=authoriser)
            listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
            port = listener.sockets[0].getsockname()[1]
            async with listener:
                answer, _ = await anyio.to_thread.run_sync(_talk, client.client_context(), port)
                answers.append(answer)
    assert answers[0] != b"ok"
    assert answers[1] == b"ok"
    assert got == [b"hello"]
    logged = [r.getMessage() for r in caplog.records if "authoriser failed" in r.getMessage()]
    assert len(logged) == 1
    assert "KeyError" in logged[0]


def test_broken_authoriser_on_a_client_raises_peer_not_authorised(
    pair: tuple[TestCA, TestCA],
) -> None:
    """urllib3 with an authoriser that raises KeyError: PeerNotAuthorisedError (not a bare
    KeyError out of urllib3's depths), nothing sent. Twin: a working authoriser gets the
    answer (the server answers b"ok" to any request)."""
    server, client = _identities(pair)
    port, seen, thread = _serve(server.server_context(), connections=2)
    url = f"https://127.0.0.1:{port}/"
    with (
        furllib3.PoolManager(client, authoriser=_broken, retries=0) as http,
        pytest.raises(PeerNotAuthorisedError, match="authoriser failed") as caught,
    ):
        http.request("GET", url)
    assert isinstance(caught.value.__cause__, BaseException)
    with (
        furllib3.PoolManager(client, authoriser=allow_names(SERVER), retries=0) as http,
        pytest.raises(urllib3.exceptions.HTTPError),  # b"ok" is no HTTP response
    ):
        http.request("GET", url)
    thread.join(WAIT)
    assert len(seen) == 2
    assert not isinstance(seen[0], tuple) or seen[0][1] == b""  # nothing of the request sent
    assert isinstance(seen[1], tuple)
    assert seen[1][1].startswith(b"GET / HTTP/1.1")


async def test_broken_authoriser_on_a_bridged_grpc_channel_fails_the_call_clearly(
    pair: tuple[TestCA, TestCA],
) -> None:
    """A gRPC channel whose authoriser raises KeyError: the call fails at once with
    UNAVAILABLE naming the authoriser's failure (before: the bridge task died, gRPC saw the
    socket closed with no reason). Twin: a working authoriser's call is served."""
    server, client = _identities(pair)
    outcomes = []
    async with serving("sync", server, Handled()) as port:
        for authoriser in (_broken, allow_names(SERVER)):
            with fgrpc.secure_channel(client, f"127.0.0.1:{port}", authoriser=authoriser) as ch:
                outcomes.append(await anyio.to_thread.run_sync(attempt_with_deadline, ch))
    assert outcomes[0].code is grpc.StatusCode.UNAVAILABLE
    assert "authoriser failed" in outcomes[0].details
    assert outcomes[1].answer == b"uu:hi"


def attempt_with_deadline(channel: grpc.Channel, timeout: float = WAIT) -> _Outcome:
    """One unary call with a deadline (a hung bridge must not hang the test)."""
    method = channel.unary_unary(f"/{SERVICE}/unary_unary")
    try:
        return _Outcome(method(b"hi", timeout=timeout), None, "")
    except grpc.RpcError as exc:
        return _Outcome(None, exc.code(), exc.details() or "")


class _Outcome:
    def __init__(self, answer: object, code: object, details: str) -> None:
        self.answer, self.code, self.details = answer, code, details


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_broken_authoriser_in_the_grpc_interceptor_denies(
    pair: tuple[TestCA, TestCA], flavour: str
) -> None:
    """The server interceptor with an authoriser that raises KeyError denies the call with
    PERMISSION_DENIED naming the failure (before: UNKNOWN, gRPC's "exception calling
    application"), handler not run. Twin: a working authoriser's call is served."""
    server, client = _identities(pair)
    outcomes, shapes = [], []
    for authoriser in (_broken, allow_names("*.k8s.internal")):
        handled = Handled()
        async with serving(flavour, server, handled, authoriser=authoriser) as port:
            creds = channel_credentials(client)
            with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
                outcomes.append(await anyio.to_thread.run_sync(attempt_with_deadline, ch))
        shapes.append(handled.shapes())
    assert outcomes[0].code is grpc.StatusCode.PERMISSION_DENIED
    assert "authoriser failed" in outcomes[0].details
    assert outcomes[1].answer == b"uu:hi"
    assert shapes == [[], ["unary_unary"]]


# 2. A client certificate that expired while its connection (or TLS session) lives on --------------
@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_grpc_call_from_an_expired_client_certificate_denied(flavour: str) -> None:
    """A client whose certificate expired keeps calling on the HTTP/2 connection it opened
    while valid, and can open new ones by resuming its TLS session (gRPC's tickets: no
    certificate check in that handshake): the interceptor, which re-checks every call's
    chain against the roots trusted now, denies the call once the leaf has expired. Twin:
    the same connection's call before expiry is served."""
    with federated_pair(claims=SHORT, backdate="1s") as (cloud, kubernetes):
        client = kubernetes.identity("client.k8s.internal", lifetime=timedelta(seconds=4))
        server = cloud.identity(SERVER, sans=SERVER_NAMES, lifetime=LONG)
        ctx = client.client_context()
        ctx.set_alpn_protocols(["h2"])
        handled = Handled()
        async with serving(flavour, server, handled) as port:
            with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(client)) as ch:
                before = await anyio.to_thread.run_sync(attempt_with_deadline, ch)
                session, _ = await anyio.to_thread.run_sync(tls_session, ctx, port)
                expired = client.not_after + timedelta(seconds=1)
                await anyio.sleep(max(0.0, (expired - datetime.now(UTC)).total_seconds()))
                after = await anyio.to_thread.run_sync(attempt_with_deadline, ch)
                resumed = await anyio.to_thread.run_sync(tls_session, ctx, port, session)
    assert before.answer == b"uu:hi"
    assert after.code is grpc.StatusCode.PERMISSION_DENIED
    assert "expired" in after.details
    assert handled.shapes() == ["unary_unary"]
    # Why the interceptor must look: the expired client's session is still resumed.
    assert resumed[1] is True


# 3. The bridge's Unix socket ----------------------------------------------------------------------
def _bridge_of(channel: object) -> tuple[str, threading.Thread]:
    bridge = channel._bridge  # type: ignore[attr-defined]
    assert bridge is not None
    return os.path.dirname(bridge.path), bridge._thread


def test_bridged_channel_never_closed_is_cleaned_up_when_collected(
    pair: tuple[TestCA, TestCA],
) -> None:
    """A bridged channel its owner drops without close(): once collected, its bridge stops
    (thread, loop, socket) and its directory is removed, as close() would (before: one thread
    and one socket left in /tmp per channel, for good). Twin: a channel still referenced
    keeps its bridge."""
    _, client = _identities(pair)
    kept = fgrpc.secure_channel(client, "127.0.0.1:1", authoriser=allow_names(SERVER))
    dropped = fgrpc.secure_channel(client, "127.0.0.1:1", authoriser=allow_names(SERVER))
    for channel in (kept, dropped):
        outcome = attempt_with_deadline(channel, timeout=5)  # builds its gRPC channel
        assert outcome.code is not None
    kept_dir, kept_thread = _bridge_of(kept)
    directory, thread = _bridge_of(dropped)
    del channel, dropped
    gc.collect()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert not os.path.exists(directory)
    assert kept_thread.is_alive()
    assert os.path.exists(kept_dir)
    kept.close()
    assert not os.path.exists(kept_dir)


async def test_bridged_aio_channel_never_closed_is_cleaned_up_when_collected(
    pair: tuple[TestCA, TestCA],
) -> None:
    """``test_bridged_channel_never_closed_is_cleaned_up_when_collected`` for grpc.aio.
    Twin: a channel still referenced keeps its bridge."""
    import federatls.integrations.grpc.aio as faio

    _, client = _identities(pair)
    kept = faio.secure_channel(client, "127.0.0.1:1", authoriser=allow_names(SERVER))
    dropped = faio.secure_channel(client, "127.0.0.1:1", authoriser=allow_names(SERVER))
    for channel in (kept, dropped):
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(f"/{SERVICE}/unary_unary")(b"hi", timeout=5)
    kept_dir, kept_thread = _bridge_of(kept)
    directory, thread = _bridge_of(dropped)
    del channel, dropped
    gc.collect()
    await anyio.to_thread.run_sync(thread.join, WAIT)
    assert not thread.is_alive()
    assert not os.path.exists(directory)
    assert kept_thread.is_alive()
    await kept.close()
    assert not os.path.exists(kept_dir)


@pytest.mark.parametrize("kind", ["refused", "served"])
async def test_bridged_channel_close_does_not_wait_out_its_timeout(
    pair: tuple[TestCA, TestCA], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """close() of a bridged channel stops the bridge at once: before, the bridge's loop was
    stopped from inside its shutdown, so close() always waited out its whole 10 s timeout
    (and AioChannel.close blocked the event loop that long). A hang check, not a speed
    measure: the bound is the bridge's own stop timeout. Twin: a call through the bridge,
    refused (nothing listening) or served, works before close()."""
    from federatls.integrations.grpc._bridge import _STOP_TIMEOUT

    server, client = _identities(pair)
    async with serving("sync", server, Handled()) as port:
        target = f"127.0.0.1:{port if kind == 'served' else 1}"
        channel = fgrpc.secure_channel(client, target, authoriser=allow_names(SERVER))
        outcome = await anyio.to_thread.run_sync(attempt_with_deadline, channel)
        directory, thread = _bridge_of(channel)
        with caplog.at_level(logging.WARNING, "federatls"):
            started = time.monotonic()
            await anyio.to_thread.run_sync(channel.close)
            took = time.monotonic() - started
    if kind == "served":
        assert outcome.answer == b"uu:hi"
    else:
        assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert took < _STOP_TIMEOUT
    assert not [r for r in caplog.records if "did not stop" in r.getMessage()]
    assert not thread.is_alive()
    assert not os.path.exists(directory)


# 4. requests and urllib3 --------------------------------------------------------------------------
@contextlib.contextmanager
def _http_server(
    ctx: ssl.SSLContext, reply: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
) -> Iterator[tuple[int, list[object]]]:
    """A blocking HTTPS server on 127.0.0.1 answering ``reply`` (200 "ok") to one request per
    connection, until the block ends; its port, and per connection what it read or how it
    ended."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    seen: list[object] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(WAIT)
            item: object
            try:
                with ctx.wrap_socket(raw, server_side=True) as tls:
                    item = tls.recv(4096)
                    if item:
                        tls.sendall(reply)
            except Exception as exc:
                item = exc
            finally:
                raw.close()
            seen.append(item)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        stop.set()
        thread.join(WAIT)
        listener.close()


@pytest.mark.parametrize("kind", ["urllib3", "requests"])
def test_refused_server_contacted_once_whatever_the_retries(
    pair: tuple[TestCA, TestCA], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server the authoriser refuses is contacted once: with urllib3's default retries (3)
    or requests' max_retries=3 each refusal was followed by another handshake (four
    handshakes, four refusal lines) when a refusal can only repeat. Twin: an allowed server,
    the same retries, answers on the first connection."""
    import federatls.integrations.requests as frequests

    server, client = _identities(pair)

    def get(url: str, authoriser: Authoriser) -> object:
        try:
            if kind == "urllib3":
                with furllib3.PoolManager(client, authoriser=authoriser, retries=3) as http:
                    return http.request("GET", url, timeout=WAIT).data
            with frequests.Session(client, authoriser=authoriser, max_retries=3) as session:
                return session.get(url, timeout=WAIT).content
        except Exception as exc:
            return exc

    with _http_server(server.server_context()) as (port, seen):
        url = f"https://127.0.0.1:{port}/"
        with caplog.at_level(logging.WARNING, "federatls.peer"):
            refused = get(url, allow_names("*.aws.internal"))
            allowed = get(url, allow_names(SERVER))
    lines = [r for r in caplog.records if "(authoriser)" in r.getMessage()]
    assert isinstance(refused, PeerNotAuthorisedError)
    assert len(lines) == 1
    assert allowed == b"ok"
    assert len(seen) == 2
    assert seen[0] == b""  # the refused client sent nothing
    assert isinstance(seen[1], bytes)
    assert seen[1].startswith(b"GET / HTTP/1.1")


# 5. TLS session resumption ------------------------------------------------------------------------
def _plain_server_context(identity: Identity) -> ssl.SSLContext:
    """A server context as a plain ssl user would make it (session cache and tickets on)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_cert_chain_in_memory(ctx, identity.chain, identity._key)
    ctx.load_verify_locations(cadata=identity.trust.pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("kind", ["identity", "renewing", "plain-ssl"])
def test_server_context_never_resumes_a_session(
    pair: tuple[TestCA, TestCA], kind: str, version: str
) -> None:
    """A client offering the session of its previous connection is not resumed by a
    federatls server context (Identity's or RenewingIdentity's: the latter's switches
    contexts in sni_callback, the session cache staying with the first), so its certificate
    is verified against the roots trusted now and the authoriser sees every connection.
    Twin: a plain ssl server context resumes that session (the check would be skipped)."""
    server, client = _identities(pair)
    calls: list[PeerInfo] = []

    def authoriser(peer: PeerInfo) -> None:
        calls.append(peer)

    if kind == "identity":
        ctx = server.server_context(authoriser=authoriser)
    elif kind == "renewing":
        ctx = RenewingIdentity(server).server_context(authoriser=authoriser)
    else:
        ctx = _plain_server_context(server)
    cctx = client.client_context()
    cctx.maximum_version = cctx.minimum_version = ssl.TLSVersion[version]
    port, seen, thread = _serve(ctx, connections=2)
    first, session = _talk(cctx, port)
    second, _ = _talk(cctx, port, session)
    thread.join(WAIT)
    assert first == second == b"ok"
    assert session is not None
    resumed = [item[0] for item in seen if isinstance(item, tuple)]
    if kind == "plain-ssl":
        assert resumed == [False, True]
        return
    assert resumed == [False, False]
    assert len(calls) == 2


# 6. Impostor gRPC servers -------------------------------------------------------------------------
async def call_impostor(
    client: Identity, impostor: Identity, authoriser: Authoriser | None, name: str
) -> tuple[_Outcome, Handled]:
    """One call through a channel from ``client`` (bridged when there is an ``authoriser``)
    to a sync server presenting ``impostor``'s certificate, the target's host taken to be
    ``name`` (ssl_target_name_override, as for a target given as an address); what the call
    got, and what the server's handlers saw."""
    handled = Handled()
    async with serving("sync", impostor, handled) as port:
        with fgrpc.secure_channel(
            client,
            f"127.0.0.1:{port}",
            authoriser=authoriser,
            options=[("grpc.ssl_target_name_override", name)],
        ) as channel:
            outcome = await anyio.to_thread.run_sync(attempt_with_deadline, channel)
    return outcome, handled


@pytest.mark.parametrize("path", ["native", "bridged"])
@pytest.mark.parametrize("override", ["server.cloud.internal", "payments.cloud.internal"])
async def test_grpc_impostor_with_a_valid_federated_certificate_for_another_name(
    pair: tuple[TestCA, TestCA], path: str, override: str
) -> None:
    """A server with a valid certificate from the federated CA, but for
    payments.cloud.internal (and 127.0.0.1), answering where the channel expects
    server.cloud.internal (ssl_target_name_override, as for a target given as an address):
    refused on both paths, its handler never called. Twin: the name it does hold is
    reached."""
    cloud, _ = pair
    _, client = _identities(pair)
    impostor = cloud.identity("payments.cloud.internal", sans=["payments.cloud.internal"])
    authoriser = allow_names("*.cloud.internal") if path == "bridged" else None
    outcome, handled = await call_impostor(client, impostor, authoriser, override)
    if override == "payments.cloud.internal":
        assert outcome.answer == b"uu:hi"
        assert handled.shapes() == ["unary_unary"]
        return
    assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert handled.shapes() == []
    if path == "bridged":
        assert "federatls refused the server" in outcome.details


@pytest.mark.parametrize("path", ["native", "bridged"])
@pytest.mark.parametrize("rule", ["*.k8s.internal", "*.cloud.internal"])
async def test_grpc_impostor_anchored_in_a_root_that_may_not_vouch_for_the_host(
    pair: tuple[TestCA, TestCA], path: str, rule: str
) -> None:
    """kubernetes' CA issues a valid certificate for server.cloud.internal, a name the
    client's bundle lets kubernetes' root vouch for only under "*.k8s.internal": refused on
    both paths (native: that root is not among gRPC's roots for the host; bridged: the name
    rules), its handler never called. Twin: with the rule "*.cloud.internal" it is reached."""
    from test_grpc_client import _with_rules

    cloud, kubernetes = pair
    client = _with_rules(cloud.identity("client.cloud.internal"), kubernetes.root, [rule])
    impostor = kubernetes.identity(SERVER, sans=[SERVER])
    authoriser = allow_names("*.cloud.internal") if path == "bridged" else None
    outcome, handled = await call_impostor(client, impostor, authoriser, SERVER)
    if rule == "*.cloud.internal":
        assert outcome.answer == b"uu:hi", outcome.details
        assert handled.shapes() == ["unary_unary"]
        return
    assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert handled.shapes() == []
    if path == "bridged":
        assert "may only vouch for ['*.k8s.internal']" in outcome.details


@pytest.mark.parametrize(
    "prefix", ["https://", "http://", "https://127.0.0.1", "HTTPS://", "http", ""]
)
def test_requests_session_refuses_a_plain_adapter_over_its_own(
    pair: tuple[TestCA, TestCA], prefix: str
) -> None:
    """The common retry idiom ``session.mount("https://", HTTPAdapter(max_retries=...))``
    (or any prefix of http(s) URLs) would silently replace federatls's adapter: requests
    would then verify the server with certifi, present no certificate and skip the
    authoriser, or speak plain http. Refused with ConfigError naming max_retries=. Twin: a
    mount for another scheme is kept, and the session still answers over its identity."""
    import federatls.integrations.requests as frequests
    from federatls import ConfigError

    server, client = _identities(pair)
    with (
        _http_server(server.server_context()) as (port, _),
        frequests.Session(client, authoriser=allow_names(SERVER)) as session,
    ):
        with pytest.raises(ConfigError, match="max_retries="):
            session.mount(prefix, requests.adapters.HTTPAdapter(max_retries=3))
        session.mount("file://", _FileAdapter())
        answered = session.get(f"https://127.0.0.1:{port}/", timeout=WAIT)
    assert answered.content == b"ok"
    assert isinstance(session.adapters["file://"], _FileAdapter)


class _FileAdapter(requests.adapters.BaseAdapter):
    """An adapter for another scheme (it is never sent anything here)."""

    def close(self) -> None:
        pass


# 7. Crafted chains presented to the gRPC server -----------------------------------------------
def _crowd(named: x509.Name, count: int, chained: bool) -> list[x509.Certificate]:
    """``count`` CA certificates all named ``named``, each with a key of its own: signed by
    themselves, or (``chained``) each by the next one's key (a same-named chain that looks
    worth walking)."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(count + 1)]
    now = datetime.now(UTC)
    certs = []
    for i in range(count):
        signer = keys[i + 1] if chained else keys[i]
        certs.append(
            x509.CertificateBuilder()
            .subject_name(named)
            .issuer_name(named)
            .public_key(keys[i].public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )
    return certs


@pytest.mark.parametrize("chained", [False, True])
def test_peer_from_chain_through_a_same_named_crowd(
    pair: tuple[TestCA, TestCA], chained: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client presenting its leaf, 400 CA certificates named as its intermediate (self-
    signed, or each signed by the next) and then its real intermediate: its chain is still
    rebuilt to kubernetes' root, at the cost of one signature check per certificate
    presented (counted), not one per pair. Twin: the crowd without the real intermediate is
    refused (no path to a root trusted now)."""
    import federatls._x509 as x509_module

    server, client = _identities(pair)
    leaf, intermediate = client.chain
    crowd = _crowd(intermediate.subject, 400, chained)
    checks = 0
    real_issued_by = x509_module.issued_by

    def counted(cert: x509.Certificate, by: x509.Certificate) -> bool:
        nonlocal checks
        checks += 1
        return real_issued_by(cert, by)

    monkeypatch.setattr(x509_module, "issued_by", counted)
    found = peer_from_chain([leaf, *crowd, intermediate], server.trust)
    assert found.anchor is not None
    assert found.anchor.fingerprint == pair[1].root_fingerprint
    assert checks <= len(crowd) + 1 + len(server.trust) * 2
    with pytest.raises(BadMaterialError, match="root trusted now"):
        peer_from_chain([leaf, *crowd], server.trust)


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_grpc_client_presenting_a_same_named_crowd(
    pair: tuple[TestCA, TestCA], flavour: str
) -> None:
    """Over gRPC: a client whose chain carries extra CA certificates named as its
    intermediate after the real one is admitted by the interceptor (the crowd costs it
    nothing: the first candidate verifies), anchored in kubernetes' root. Twin: with the
    crowd before its intermediate gRPC's own handshake refuses it (BoringSSL does not search
    a crowd; nor does it take a chain with 20 such extras anywhere), so the interceptor
    never walks a crowd bigger than BoringSSL lets through."""
    server, client = _identities(pair)
    leaf, intermediate = client.chain
    crowd = _crowd(intermediate.subject, 3, chained=False)
    key = client.export_private_key(password=None)
    outcomes, handled = [], Handled()
    async with serving(flavour, server, handled) as port:
        for chain in ([leaf, intermediate, *crowd], [leaf, *crowd, intermediate]):
            creds = grpc.ssl_channel_credentials(
                root_certificates=client.trust.pem.encode(),
                private_key=key,
                certificate_chain=certs_to_pem(chain).encode(),
            )
            with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
                outcomes.append(await anyio.to_thread.run_sync(attempt_with_deadline, ch))
    assert outcomes[0].answer == b"uu:hi", outcomes[0].details
    assert outcomes[1].code is grpc.StatusCode.UNAVAILABLE
    assert [p.anchor.fingerprint for _, p in handled.calls if p.anchor] == [
        pair[1].root_fingerprint
    ]


# 8. A new authoriser object per client --------------------------------------------------------
def _live_contexts() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, ssl.SSLContext))


@pytest.mark.parametrize("kind", ["identity", "renewing"])
def test_a_new_authoriser_per_client_does_not_pile_up_contexts(
    pair: tuple[TestCA, TestCA], kind: str
) -> None:
    """Code that makes a client per request with a new authoriser object
    (``Session(live, authoriser=allow_names(...))``) got a new client context cached for
    each, forever (and a RenewingIdentity rebuilt every one of them at each renewal): the
    cache is bounded now (integ's 17917c3, found here independently). Twin: the same
    authoriser object gets the same context back."""
    from federatls.integrations._source import client_context

    _, client = _identities(pair)
    source: Identity | RenewingIdentity = client if kind == "identity" else RenewingIdentity(client)
    same = allow_names(SERVER)
    first = client_context(source, "federation", same)
    assert client_context(source, "federation", same) is first
    before = _live_contexts()
    for _ in range(300):
        client_context(source, "federation", allow_names(SERVER))
    assert _live_contexts() - before <= _MAX_AUTHORISED_CONTEXTS


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_client_context_resuming_a_session_still_checks_the_server(
    pair: tuple[TestCA, TestCA], version: str
) -> None:
    """A client context with an authoriser, offering its previous session to a server that
    resumes sessions (a plain ssl server): the resumed handshake does not skip the check;
    the authoriser sees the server again, or the connection is refused (no verified chain
    to check), never admitted unchecked. Twin: the first connection, a full handshake, is
    checked and answered."""
    server, client = _identities(pair)
    calls: list[PeerInfo] = []

    def authoriser(peer: PeerInfo) -> None:
        calls.append(peer)

    cctx = client.client_context(authoriser=authoriser)
    cctx.maximum_version = cctx.minimum_version = ssl.TLSVersion[version]
    port, seen, thread = _serve(_plain_server_context(server), connections=2)
    first, session = _talk(cctx, port)
    second, _ = _talk(cctx, port, session)
    thread.join(WAIT)
    assert first == b"ok"
    assert len(calls) >= 1
    assert session is not None
    resumed = [item[0] for item in seen if isinstance(item, tuple)]
    if second == b"ok":
        assert len(calls) == 2, f"resumed={resumed}: the authoriser was skipped"
    else:
        assert isinstance(second, ssl.SSLCertVerificationError)


@pytest.mark.parametrize("kind", ["urllib3", "requests"])
def test_redirect_to_a_refused_server_is_refused(pair: tuple[TestCA, TestCA], kind: str) -> None:
    """An allowed server redirects (302) to another host whose certificate is valid and
    federated but which the authoriser refuses (payments.cloud.internal at localhost):
    PeerNotAuthorisedError, and that server gets nothing of the request (nor the
    Authorization header). Twin: the allowed server handled the first request."""
    import federatls.integrations.requests as frequests

    cloud, _ = pair
    server, client = _identities(pair)
    other = cloud.identity("payments.cloud.internal", sans=["payments.cloud.internal", "localhost"])
    authoriser = allow_names(SERVER)
    headers = {"Authorization": "Bearer secret"}
    with _http_server(other.server_context()) as (other_port, other_seen):
        location = f"https://localhost:{other_port}/next"
        redirect = (
            f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        with _http_server(server.server_context(), redirect) as (port, seen):
            url = f"https://127.0.0.1:{port}/"
            try:
                if kind == "urllib3":
                    with furllib3.PoolManager(client, authoriser=authoriser) as http:
                        outcome: object = http.request("GET", url, headers=headers, timeout=WAIT)
                else:
                    with frequests.Session(client, authoriser=authoriser) as session:
                        outcome = session.get(url, headers=headers, timeout=WAIT)
            except Exception as exc:
                outcome = exc
    assert isinstance(outcome, PeerNotAuthorisedError)
    assert "payments.cloud.internal" in str(outcome)
    assert len(seen) == 1
    assert isinstance(seen[0], bytes)
    assert seen[0].startswith(b"GET / HTTP/1.1")
    assert other_seen == [b""]


# 9. A channel used after close -----------------------------------------------------------------
@pytest.mark.parametrize("path", ["native", "bridged"])
async def test_grpc_channel_refuses_calls_after_close(
    pair: tuple[TestCA, TestCA], path: str
) -> None:
    """A call on a closed channel raises ValueError, as on gRPC's own closed channel: the
    wrapper used to build a new channel (one its owner believes closed, never closed again:
    a connection presenting the identity for good), or dial the bridge's removed socket.
    Twin: the same call before close() is served."""
    server, client = _identities(pair)
    authoriser = allow_names(SERVER) if path == "bridged" else None
    async with serving("sync", server, Handled()) as port:
        channel = fgrpc.secure_channel(client, f"127.0.0.1:{port}", authoriser=authoriser)
        before = await anyio.to_thread.run_sync(attempt_with_deadline, channel)
        channel.close()
        with pytest.raises(ValueError, match="closed channel"):
            await anyio.to_thread.run_sync(attempt_with_deadline, channel)
    assert before.answer == b"uu:hi"


async def test_grpc_aio_channel_refuses_calls_after_close(pair: tuple[TestCA, TestCA]) -> None:
    """``test_grpc_channel_refuses_calls_after_close`` for grpc.aio: grpc.aio's UsageError.
    Twin: the call before close() is served."""
    import federatls.integrations.grpc.aio as faio

    server, client = _identities(pair)
    async with serving("aio", server, Handled()) as port:
        channel = faio.secure_channel(client, f"127.0.0.1:{port}")
        method = f"/{SERVICE}/unary_unary"
        before = await channel.unary_unary(method)(b"hi", timeout=WAIT)
        await channel.close()
        with pytest.raises(grpc.aio.UsageError):
            await channel.unary_unary(method)(b"hi", timeout=WAIT)
    assert before == b"uu:hi"


_AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
_CONNECT = (
    "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"
)


_SYSTEM_PYTHON = "/usr/bin/python3"  # one another user may run (a venv's may live in /root)


# A process holding a bridged channel: prints the bridge's socket path, then waits.
_BRIDGE_HOLDER = """
import time
import federatls.integrations.grpc as fgrpc
from federatls import allow_names
from federatls.testing import running_ca

with running_ca("orphans") as ca:
    client = ca.identity("client.orphans.internal")
    channel = fgrpc.secure_channel(client, "127.0.0.1:1", authoriser=allow_names("x"))
    print(channel._bridge.path, flush=True)
    time.sleep(120)
"""


def test_bridge_directory_of_a_killed_process_removed_by_the_next(
    pair: tuple[TestCA, TestCA], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed (SIGKILL) while holding a bridged channel leaves its bridge's
    directory; the next bridge this user opens (here, in another process) removes it.
    Twin: the directory of a live process's bridge is left alone, and so is this process's
    own new one."""
    holders = [
        subprocess.Popen([sys.executable, "-c", _BRIDGE_HOLDER], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        killed, alive = holders
        assert killed.stdout is not None
        assert alive.stdout is not None
        killed_dir = os.path.dirname(killed.stdout.readline().strip())
        alive_dir = os.path.dirname(alive.stdout.readline().strip())
        killed.send_signal(signal.SIGKILL)
        killed.wait(WAIT)
        assert os.path.isdir(killed_dir)  # what SIGKILL leaves
        monkeypatch.setattr(_bridge, "_swept", False, raising=False)  # as in a new process
        _, client = _identities(pair)
        with fgrpc.secure_channel(client, "127.0.0.1:1", authoriser=allow_names(SERVER)) as ch:
            assert ch._bridge is not None
            assert os.path.isdir(os.path.dirname(ch._bridge.path))
            assert not os.path.exists(killed_dir)
            assert os.path.isdir(alive_dir)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait(WAIT)
            if holder.stdout is not None:
                holder.stdout.close()


def test_orphan_sweep_leaves_what_is_not_a_dead_process_bridge(tmp_path: Path) -> None:
    """What the sweep of dead processes' bridge directories leaves, without failing the
    bridge being opened: a file under such a name, a directory naming a pid too large to be
    one, a directory of a dead process whose socket something still listens on (a process
    of another PID namespace), and an unreadable directory to sweep. Twin: the dead
    process's directory with no listener is removed."""
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait(WAIT)
    dead = finished.pid
    (tmp_path / f"federatls-grpc-{dead}-file").write_text("")
    (tmp_path / "federatls-grpc-99999999999999999999999-big").mkdir()
    orphan = tmp_path / f"federatls-grpc-{dead}-orphan"
    orphan.mkdir()
    (orphan / "bridge.sock").write_text("")  # not a socket: nobody listens
    listened = tmp_path / f"federatls-grpc-{dead}-listened"
    listened.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(listened / "bridge.sock"))
        listener.listen(1)
        _bridge._remove_orphans(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {
        "federatls-grpc-99999999999999999999999-big",
        f"federatls-grpc-{dead}-file",
        f"federatls-grpc-{dead}-listened",
    }
    _bridge._remove_orphans(str(tmp_path / "missing"))  # unreadable: nothing done, no error


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists(_SYSTEM_PYTHON),
    reason="needs root, setpriv and /usr/bin/python3 to act as another user",
)
def test_bridge_socket_refuses_another_local_user(pair: tuple[TestCA, TestCA]) -> None:
    """Another local user (nobody) cannot connect to a bridged channel's Unix socket (which
    would let it call the server as this identity): the socket's directory is 0700. Twins:
    this user connects to it, and nobody connects to a socket in an open directory (so the
    refusal is the directory's doing)."""
    _, client = _identities(pair)

    def connect(path: str, *, as_nobody: bool) -> subprocess.CompletedProcess[str]:
        command = [_SYSTEM_PYTHON, "-c", _CONNECT, path]
        return subprocess.run(
            [*_AS_NOBODY, *command] if as_nobody else command,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )

    open_dir = tempfile.mkdtemp(prefix="federatls-test-open-")
    try:
        os.chmod(open_dir, 0o755)  # noqa: S103 (the twin: a directory others may enter)
        open_path = os.path.join(open_dir, "open.sock")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(open_path)
            os.chmod(open_path, 0o777)  # noqa: S103 (as above)
            listener.listen(1)
            control = connect(open_path, as_nobody=True)
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
    with fgrpc.secure_channel(client, "127.0.0.1:1", authoriser=allow_names(SERVER)) as ch:
        path = ch._bridge.path  # type: ignore[union-attr]
        mine = connect(path, as_nobody=False)
        other = connect(path, as_nobody=True)
    assert control.stdout.strip() == "connected", control.stderr
    assert mine.stdout.strip() == "connected", mine.stderr
    assert other.returncode != 0
    assert "PermissionError" in other.stderr


# 10. Proxies from the environment ----------------------------------------------------------------
@pytest.mark.parametrize("path", ["native", "bridged"])
async def test_grpc_channel_ignores_proxies_from_the_environment(
    pair: tuple[TestCA, TestCA], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With https_proxy / grpc_proxy pointing at nothing, a federatls channel still connects
    directly (as the requests Session does): gRPC would otherwise tunnel the federation's
    traffic through whatever proxy the environment names. Twin: a plain gRPC channel with
    the same environment goes to the dead proxy and fails."""
    server, client = _identities(pair)
    for name in ("https_proxy", "grpc_proxy", "http_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        monkeypatch.delenv(name, raising=False)
    authoriser = allow_names(SERVER) if path == "bridged" else None
    async with serving("sync", server, Handled()) as port:
        with fgrpc.secure_channel(client, f"127.0.0.1:{port}", authoriser=authoriser) as ch:
            ours = await anyio.to_thread.run_sync(attempt_with_deadline, ch)
        with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(client)) as ch:
            plain = await anyio.to_thread.run_sync(attempt_with_deadline, ch)
    assert ours.answer == b"uu:hi", ours.details
    assert plain.code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("option", ["grpc.http_proxy", "grpc.enable_http_proxy"])
def test_grpc_channel_refuses_proxy_options(pair: tuple[TestCA, TestCA], option: str) -> None:
    """A proxy asked for in the channel's options is a ConfigError naming it, not a silent
    detour. Twin: test_grpc_channel_ignores_proxies_from_the_environment's direct call."""
    from federatls import ConfigError

    _, client = _identities(pair)
    with pytest.raises(ConfigError, match=option):
        fgrpc.secure_channel(client, "127.0.0.1:1", options=[(option, "http://127.0.0.1:9")])


async def test_grpc_aio_channel_ignores_proxies_from_the_environment(
    pair: tuple[TestCA, TestCA], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``test_grpc_channel_ignores_proxies_from_the_environment`` for grpc.aio's native
    channel. Twin: a plain grpc.aio channel goes to the dead proxy and fails."""
    import federatls.integrations.grpc.aio as faio

    server, client = _identities(pair)
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("grpc_proxy", "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        monkeypatch.delenv(name, raising=False)
    method = f"/{SERVICE}/unary_unary"
    async with serving("aio", server, Handled()) as port:
        async with faio.secure_channel(client, f"127.0.0.1:{port}") as ch:
            ours = await ch.unary_unary(method)(b"hi", timeout=WAIT)
        creds = channel_credentials(client)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as plain:
                await ch.unary_unary(method)(b"hi", timeout=WAIT)
    assert ours == b"uu:hi"
    assert plain.value.code() is grpc.StatusCode.UNAVAILABLE


# 11. A handshake done implicitly by the first read or write --------------------------------------
def _serve_lazily(ctx: ssl.SSLContext) -> tuple[int, list[object], threading.Thread]:
    """A server wrapping with do_handshake_on_connect=False and reading at once (as gunicorn
    does by default): OpenSSL then does the handshake inside the first read."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[object] = []

    def run() -> None:
        with listener:
            raw, _ = listener.accept()
            raw.settimeout(WAIT)
            try:
                with ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False) as tls:
                    seen.append(tls.recv(100))
                    tls.sendall(b"ok")
            except Exception as exc:
                seen.append(exc)
            finally:
                raw.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener.getsockname()[1], seen, thread


@pytest.mark.parametrize("by", ["authoriser", "allowed"])
def test_server_handshake_done_by_the_first_read_is_checked(
    pair: tuple[TestCA, TestCA], by: str
) -> None:
    """A server that wraps with do_handshake_on_connect=False and reads straight away (no
    do_handshake call: gunicorn's default) still checks the client: the authoriser refuses
    it before the read returns a byte (before: the read did the handshake inside OpenSSL,
    the check never ran, the refused client's data was read). Twin: an allowed client's
    data is read."""
    server, client = _identities(pair)
    authoriser = allow_names("*.aws.internal" if by == "authoriser" else "*.k8s.internal")
    port, seen, thread = _serve_lazily(server.server_context(authoriser=authoriser))
    answer, _ = _talk(client.client_context(), port)
    thread.join(WAIT)
    if by == "allowed":
        assert seen == [b"hello"]
        assert answer == b"ok"
        return
    assert len(seen) == 1
    assert isinstance(seen[0], ssl.SSLCertVerificationError), seen
    assert isinstance(seen[0].__cause__, PeerNotAuthorisedError)


@pytest.mark.parametrize("by", ["authoriser", "allowed"])
def test_client_handshake_done_by_the_first_write_is_checked(
    pair: tuple[TestCA, TestCA], by: str
) -> None:
    """A client that wraps with do_handshake_on_connect=False and writes at once: the
    authoriser refuses the server before a byte is sent (before: the write did the handshake
    and sent the secret to the refused server). Twin: an allowed server gets the bytes."""
    server, client = _identities(pair)
    authoriser = allow_names("*.aws.internal" if by == "authoriser" else SERVER)
    port, seen, thread = _serve(server.server_context())
    ctx = client.client_context(authoriser=authoriser)
    outcome: object
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False) as tls,
        ):
            tls.sendall(b"secret")
            outcome = tls.recv(100)
    except ssl.SSLError as exc:
        outcome = exc
    thread.join(WAIT)
    if by == "allowed":
        assert outcome == b"ok"
        assert seen == [(False, b"secret")]
        return
    assert isinstance(outcome, ssl.SSLCertVerificationError)
    assert isinstance(outcome.__cause__, PeerNotAuthorisedError)
    assert b"secret" not in repr(seen).encode()


# 12. A predicate for an authoriser -------------------------------------------------------------
def _predicate(peer: PeerInfo) -> bool:
    """A common mistake: an authoriser written as a predicate (False meant to refuse)."""
    return peer.common_name.endswith(".aws.internal")


@pytest.mark.parametrize("authoriser", ["predicate", "allow_names"])
def test_predicate_authoriser_on_a_server_context_refuses(
    pair: tuple[TestCA, TestCA], authoriser: str
) -> None:
    """An authoriser that returns False instead of raising refused nobody: now anything but
    None returned refuses, the refusal saying how authorisers admit and refuse. Twin:
    allow_names("*.k8s.internal") admits the client."""
    server, client = _identities(pair)
    check = _predicate if authoriser == "predicate" else allow_names("*.k8s.internal")
    port, seen, thread = _serve(server.server_context(authoriser=check))  # type: ignore[arg-type]
    answer, _ = _talk(client.client_context(), port)
    thread.join(WAIT)
    if authoriser == "allow_names":
        assert seen == [(False, b"hello")]
        assert answer == b"ok"
        return
    assert isinstance(seen[0], ssl.SSLCertVerificationError)
    assert "returned False" in str(seen[0].__cause__)


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_predicate_authoriser_in_the_grpc_interceptor_denies(
    pair: tuple[TestCA, TestCA], flavour: str
) -> None:
    """The same predicate in the gRPC interceptor: PERMISSION_DENIED, handler not run
    (before: every client served). Twin: allow_names("*.k8s.internal") is served."""
    server, client = _identities(pair)
    outcomes, shapes = [], []
    for check in (_predicate, allow_names("*.k8s.internal")):
        handled = Handled()
        async with serving(flavour, server, handled, authoriser=check) as port:  # type: ignore[arg-type]
            creds = channel_credentials(client)
            with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
                outcomes.append(await anyio.to_thread.run_sync(attempt_with_deadline, ch))
        shapes.append(handled.shapes())
    assert outcomes[0].code is grpc.StatusCode.PERMISSION_DENIED
    assert "returned False" in outcomes[0].details
    assert outcomes[1].answer == b"uu:hi"
    assert shapes == [[], ["unary_unary"]]


# 13. Optional client certificates ----------------------------------------------------------------
@pytest.mark.parametrize("who", ["federated", "stranger", "impostor", "anonymous"])
def test_optional_client_certificates_with_an_authoriser(
    pair: tuple[TestCA, TestCA], who: str
) -> None:
    """A server context with optional client certificates and an authoriser: a certificate
    that is sent is verified and then authorised (a stranger CA's is refused in the
    handshake, a federated one outside the authoriser after it), and a client sending none
    is refused. Twin: the federated client the authoriser allows gets its answer, the
    authoriser having seen it."""
    kubernetes = pair[1]
    server, _ = _identities(pair)
    calls: list[str] = []
    allowed = allow_names("client.k8s.internal")

    def authoriser(peer: PeerInfo) -> None:
        calls.append(peer.common_name)
        allowed(peer)

    ctx = server.server_context(require_client_certificate=False, authoriser=authoriser)
    if who == "stranger":
        with running_ca("partner") as partner:
            cctx = partner.identity("client.k8s.internal").client_context()
    elif who == "anonymous":
        cctx = ssl.create_default_context(cadata=server.trust.pem)
    else:
        name = "client.k8s.internal" if who == "federated" else "payments.k8s.internal"
        cctx = kubernetes.identity(name).client_context()
    if who == "stranger":  # its own bundle does not trust cloud: let it reach the server
        cctx.load_verify_locations(cadata=server.trust.pem)
    port, seen, thread = _serve(ctx)
    answer, _ = _talk(cctx, port)
    thread.join(WAIT)
    if who == "federated":
        assert answer == b"ok"
        assert calls == ["client.k8s.internal"]
        return
    assert answer != b"ok"
    assert isinstance(seen[0], ssl.SSLError)
    assert calls == (["payments.k8s.internal"] if who == "impostor" else [])


# 14. The bridge's relay ------------------------------------------------------------------------
@contextlib.contextmanager
def _hanging_up_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """A TLS server on 127.0.0.1 that completes each handshake and hangs up at once (a
    server restarting, or one that drops connections it does not want); its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(WAIT)
            with contextlib.suppress(Exception), ctx.wrap_socket(raw, server_side=True):
                pass
            raw.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(WAIT)
        listener.close()


@pytest.mark.parametrize("server_kind", ["hanging_up", "serving"])
async def test_bridge_upstream_lost_before_it_is_linked_ends_the_call(
    pair: tuple[TestCA, TestCA], server_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target hangs up right after the handshake, and the bridge's loop (slow, loaded
    machine) learns it before linking the two ends: gRPC's connection must be closed, so the
    call fails at once (before: the lost upstream had no partner to close, gRPC's end was
    linked to a dead one and every call on it hung until its deadline). Twin: with the same
    slow loop a serving target answers."""
    real_wait_for = asyncio.wait_for

    async def slow_wait_for(aw: object, timeout: float | None) -> object:
        result: object = await real_wait_for(aw, timeout)  # type: ignore[arg-type]
        await asyncio.sleep(0.3)  # the loop runs other callbacks before _open goes on
        return result

    monkeypatch.setattr(asyncio, "wait_for", slow_wait_for)  # the bridge's, on its loop
    server, client = _identities(pair)
    deadline = 8.0
    if server_kind == "serving":
        async with serving("sync", server, Handled()) as port:
            with fgrpc.secure_channel(
                client, f"127.0.0.1:{port}", authoriser=allow_names(SERVER)
            ) as ch:
                outcome = await anyio.to_thread.run_sync(attempt_with_deadline, ch, deadline)
        assert outcome.answer == b"uu:hi"
        return
    with (
        _hanging_up_server(server.server_context()) as port,
        fgrpc.secure_channel(client, f"127.0.0.1:{port}", authoriser=allow_names(SERVER)) as ch,
    ):
        started = time.monotonic()
        outcome = await anyio.to_thread.run_sync(attempt_with_deadline, ch, deadline)
        took = time.monotonic() - started
    assert outcome.code is grpc.StatusCode.UNAVAILABLE, (outcome.code, outcome.details)
    assert took < deadline / 2


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("by", ["authoriser", "allowed"])
def test_tls_object_handshake_done_by_the_first_read_or_write_is_checked(
    pair: tuple[TestCA, TestCA], side: str, by: str
) -> None:
    """An ``ssl.SSLObject`` (memory BIOs, as anyio or a custom transport use them) whose
    owner never calls do_handshake: the checking side writes its secret at once (a client)
    or reads at once (a server), so OpenSSL would do the handshake inside that call; the
    authoriser must still refuse the peer before the secret is written or the peer's data is
    read. Twin: an allowed peer's bytes go through."""
    server, client = _identities(pair)
    refusing = by == "authoriser"
    if side == "server":
        authoriser = allow_names("*.aws.internal" if refusing else "*.k8s.internal")
        sctx, cctx = server.server_context(authoriser=authoriser), client.client_context()
    else:
        authoriser = allow_names("*.aws.internal" if refusing else SERVER)
        sctx, cctx = server.server_context(), client.client_context(authoriser=authoriser)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    tls_server = sctx.wrap_bio(s_in, s_out, server_side=True)
    tls_client = cctx.wrap_bio(c_in, c_out, server_hostname=SERVER)
    got: list[bytes] = []
    failure: Exception | None = None
    sent = False
    for _ in range(20):
        try:
            if side == "client":
                if not sent:
                    tls_client.write(b"secret")  # the checking side's first call: a write
                    sent = True
            else:
                tls_client.do_handshake()
                if not sent:
                    tls_client.write(b"secret")
                    sent = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            failure = exc
        try:
            if side == "server":
                got.append(tls_server.read(100))  # the checking side's first call: a read
            else:
                tls_server.do_handshake()
                got.append(tls_server.read(100))
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            failure = failure or exc
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if got or failure is not None:
            break
    if not refusing:
        assert got == [b"secret"], failure
        return
    assert got == []
    assert isinstance(failure, ssl.SSLCertVerificationError), failure
    assert isinstance(failure.__cause__, PeerNotAuthorisedError)


class _SlowKeys(dict):  # type: ignore[type-arg]
    """A dict whose iteration lets other threads run between keys (as the GIL may)."""

    def __iter__(self) -> Iterator[object]:
        for key in list(dict.keys(self)):
            time.sleep(0.0005)
            if key in self:
                yield key
            else:  # what a plain dict's iterator raises when the dict changed under it
                raise RuntimeError("dictionary changed size during iteration")


@pytest.mark.parametrize("threads", [4, 1])
@pytest.mark.parametrize("kind", ["renewing", "identity"])
def test_contexts_made_by_many_threads_at_once_stay_bounded_without_errors(
    pair: tuple[TestCA, TestCA], kind: str, threads: int
) -> None:
    """Threads making client contexts for new authorisers at once (a new authoriser per
    client, past the bound): none of them fails (before: the bound's eviction, unlocked, met
    the keys another thread was adding: "dictionary changed size during iteration", or two
    threads evicting the same key: KeyError) and the bound holds. Twin: one thread."""
    from federatls.integrations import _source

    _, client = _identities(pair)
    contexts = _SlowKeys()
    if kind == "renewing":
        source: Identity | RenewingIdentity = RenewingIdentity(client)
        source._snapshot.contexts = contexts  # type: ignore[union-attr]
    else:
        source = client
        _source._CLIENT_CONTEXTS[client] = contexts
    errors: list[str] = []

    def work() -> None:
        for _ in range(10):
            try:
                _source.client_context(source, "federation", allow_names("x.example"))
            except Exception as exc:
                errors.append(repr(exc))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT)
    assert errors == []
    assert 10 <= len(contexts) <= _MAX_AUTHORISED_CONTEXTS + 1


@pytest.mark.parametrize("gives_up", [True, False])
def test_bridge_drops_the_pending_upstream_when_grpc_gives_up(
    pair: tuple[TestCA, TestCA], gives_up: bool
) -> None:
    """gRPC's end of a bridged connection closes while the TLS connection to a silent target
    (TCP accepted, no handshake answer) is still being opened: the bridge drops that
    connection at once, not at its 20 s connect timeout nor never (a leaked upstream
    connection per abandoned attempt). Twin: while gRPC's end stays open, so does the
    pending upstream connection."""
    _, client = _identities(pair)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(WAIT)
    with (
        listener,
        fgrpc.secure_channel(client, f"127.0.0.1:{port}", authoriser=allow_names(SERVER)) as ch,
    ):
        bridge = ch._bridge
        assert bridge is not None
        grpc_end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        grpc_end.connect(bridge.path)
        upstream, _ = listener.accept()
        with upstream:
            upstream.settimeout(1.0)
            hello = upstream.recv(65536)  # the bridge's ClientHello
            if gives_up:
                grpc_end.close()
            try:
                rest = upstream.recv(65536)
                ended = rest == b""
            except TimeoutError:
                ended = False
        if not gives_up:
            grpc_end.close()
    assert hello
    assert ended is gives_up
