"""The authoriser inside the context: every integration's one way of checking peers.

A server context given an authoriser refuses a client it does not allow in the handshake, and
a client context refuses a server it does not allow, before a byte of application data; the
refusal is logged once and raised as ``ssl.SSLCertVerificationError`` whose ``__cause__`` is
the ``PeerNotAuthorisedError``. Real CAs (``federatls.testing``), real sockets on 127.0.0.1.
Also ``Swapping``, the integrations' one way of following renewal.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import federatls
from federatls import Identity, PeerInfo, PeerNotAuthorisedError, allow_names
from federatls._renewal import _MAX_AUTHORISED_CONTEXTS
from federatls.integrations._source import _CLIENT_CONTEXTS, Swapping, client_context
from federatls.testing import TestCA, federated_pair

SERVER = "server.cloud.internal"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[TestCA, TestCA]]:
    with federated_pair() as cas:
        yield cas


def _serve_once(ctx: ssl.SSLContext) -> tuple[int, list[object]]:
    """A TLS server on 127.0.0.1 that accepts one connection, answers b"ok" to what it reads,
    and records what happened (b"..." read, or the handshake's exception)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[object] = []

    def run() -> None:
        with listener:
            raw, _ = listener.accept()
            try:
                with ctx.wrap_socket(raw, server_side=True) as tls:
                    seen.append(tls.recv(100))
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                seen.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _SERVERS[id(seen)] = thread
    return listener.getsockname()[1], seen


_SERVERS: dict[int, threading.Thread] = {}


def _done(seen: list[object]) -> list[object]:
    """``seen`` once its server has finished with its one connection."""
    _SERVERS.pop(id(seen)).join(10)
    return seen


def _talk(ctx: ssl.SSLContext, port: int) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"hello")
        return tls.recv(100)


def _answer(ctx: ssl.SSLContext, port: int) -> object:
    """What the server answered, or the exception that ended the exchange."""
    try:
        return _talk(ctx, port)
    except (ssl.SSLError, OSError) as exc:
        return exc


def _identities(pair: tuple[TestCA, TestCA]) -> tuple[Identity, Identity]:
    cloud, k8s = pair
    return cloud.identity(SERVER, sans=[SERVER, "127.0.0.1"]), k8s.identity("client.k8s.internal")


def test_server_context_authoriser_admits_an_allowed_client(pair: tuple[TestCA, TestCA]) -> None:
    server, client = _identities(pair)
    seen_peers: list[PeerInfo] = []

    def allow(peer: PeerInfo) -> None:
        seen_peers.append(peer)
        allow_names("*.k8s.internal")(peer)

    port, seen = _serve_once(server.server_context(authoriser=allow))
    assert _talk(client.client_context(), port) == b"ok"
    assert _done(seen) == [b"hello"]
    assert [p.common_name for p in seen_peers] == ["client.k8s.internal"]
    assert seen_peers[0].anchor is not None


def test_server_context_authoriser_refuses_a_client_before_its_data(
    pair: tuple[TestCA, TestCA], caplog: pytest.LogCaptureFixture
) -> None:
    server, client = _identities(pair)
    port, seen = _serve_once(server.server_context(authoriser=allow_names("*.aws.internal")))
    with caplog.at_level(logging.WARNING, "federatls.peer"):
        answer = _answer(client.client_context(), port)
    assert answer != b"ok"  # TLS 1.3: the client's handshake ends first, then it is cut off
    assert len(_done(seen)) == 1
    assert isinstance(seen[0], ssl.SSLCertVerificationError)
    assert isinstance(seen[0].__cause__, PeerNotAuthorisedError)
    assert seen[0].reason == "PEER_NOT_AUTHORISED"
    refused = [r.getMessage() for r in caplog.records if "(authoriser)" in r.getMessage()]
    assert len(refused) == 1
    assert "client.k8s.internal" in refused[0]


def test_server_context_authoriser_refuses_a_client_without_a_certificate(
    pair: tuple[TestCA, TestCA],
) -> None:
    server, _ = _identities(pair)
    ctx = server.server_context(
        require_client_certificate=False, authoriser=allow_names("*.internal")
    )
    port, seen = _serve_once(ctx)
    anonymous = ssl.create_default_context(cadata=server.trust.pem)
    assert _answer(anonymous, port) != b"ok"
    refusal = _done(seen)[0]
    assert isinstance(refusal, ssl.SSLCertVerificationError)
    assert "no certificate" in str(refusal.__cause__)


def test_client_context_authoriser_refuses_a_server_before_sending(
    pair: tuple[TestCA, TestCA],
) -> None:
    server, client = _identities(pair)
    port, seen = _serve_once(server.server_context())
    ctx = client.client_context(authoriser=allow_names("*.aws.internal"))
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        _talk(ctx, port)
    assert isinstance(caught.value.__cause__, PeerNotAuthorisedError)
    assert b"hello" not in _done(seen)  # nothing reached the server


def test_client_context_authoriser_admits_an_allowed_server(pair: tuple[TestCA, TestCA]) -> None:
    server, client = _identities(pair)
    port, _ = _serve_once(server.server_context())
    assert _talk(client.client_context(authoriser=allow_names("*.cloud.internal")), port) == b"ok"


def test_renewing_identity_contexts_carry_the_authoriser(pair: tuple[TestCA, TestCA]) -> None:
    server, client = _identities(pair)
    live = federatls.RenewingIdentity(client)
    refuse = allow_names("*.aws.internal")
    port, _ = _serve_once(federatls.RenewingIdentity(server).server_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        _talk(live.client_context(authoriser=refuse), port)
    # One context per argument set: the same authoriser object gives the same context.
    assert live.client_context(authoriser=refuse) is live.client_context(authoriser=refuse)
    assert live.client_context(authoriser=refuse) is not live.client_context()
    assert client_context(client, "federation", refuse) is client_context(
        client, "federation", refuse
    )


def test_swapping_retires_the_old_resource_once_unused(pair: tuple[TestCA, TestCA]) -> None:
    first, _ = _identities(pair)
    second = pair[0].identity(SERVER, sans=[SERVER, "127.0.0.1"])
    live = federatls.RenewingIdentity(first)
    built: list[Identity] = []

    def build(identity: Identity) -> str:
        built.append(identity)
        return f"pool-{len(built)}"

    swapping: Swapping[str] = Swapping(live, build)
    slot, closing = swapping.acquire()
    assert (slot.resource, closing) == ("pool-1", [])
    again, closing = swapping.acquire()  # the same snapshot: the same pool
    assert (again.resource, closing) == ("pool-1", [])
    live._snapshot = type(live._snapshot)(second, {})  # as a renewal swaps it in
    newer, closing = swapping.acquire()
    assert (newer.resource, closing) == ("pool-2", [])  # pool-1 still in use twice
    assert swapping.release(slot) is None
    assert swapping.release(again) == "pool-1"  # its last use: close it now
    assert swapping.release(newer) is None  # the current pool stays open
    assert built == [first, second]
    assert swapping.close() == ["pool-2"]


def test_swapping_closes_an_idle_pool_at_the_swap(pair: tuple[TestCA, TestCA]) -> None:
    first, _ = _identities(pair)
    live = federatls.RenewingIdentity(first)
    swapping: Swapping[int] = Swapping(live, lambda identity: identity.serial)
    slot, _ = swapping.acquire()
    assert swapping.release(slot) is None
    second = pair[0].identity(SERVER, sans=[SERVER, "127.0.0.1"])
    live._snapshot = type(live._snapshot)(second, {})
    newer, closing = swapping.acquire()
    assert closing == [first.serial]
    assert newer.resource == second.serial


@dataclass
class _Unhashable:
    """An authoriser that is a plain dataclass (eq without frozen: not hashable)."""

    allowed: str

    def __call__(self, peer: PeerInfo) -> None:
        allow_names(self.allowed)(peer)


def test_an_unhashable_authoriser_works_on_live_contexts(pair: tuple[TestCA, TestCA]) -> None:
    """A renewing server context and client context take an authoriser that cannot be
    hashed (compared by identity). Twin: the same kind of authoriser refusing."""
    server, client = _identities(pair)
    live_server = federatls.RenewingIdentity(server)
    port, seen = _serve_once(live_server.server_context(authoriser=_Unhashable("*.k8s.internal")))
    live_client = federatls.RenewingIdentity(client)
    ctx = live_client.client_context(authoriser=_Unhashable("*.cloud.internal"))
    assert _talk(ctx, port) == b"ok"
    assert _done(seen) == [b"hello"]
    port, seen = _serve_once(live_server.server_context(authoriser=_Unhashable("*.aws.internal")))
    assert _answer(live_client.client_context(), port) != b"ok"
    assert isinstance(_done(seen)[0], ssl.SSLCertVerificationError)


def test_contexts_for_new_authorisers_are_bounded(pair: tuple[TestCA, TestCA]) -> None:
    """A program that makes a new authoriser for every client does not grow a snapshot's
    contexts (nor what a renewal rebuilds) without bound. Twin: one authoriser reused keeps
    its one context."""
    _, client = _identities(pair)
    live = federatls.RenewingIdentity(client)
    for _ in range(_MAX_AUTHORISED_CONTEXTS + 20):
        live.client_context(authoriser=allow_names("*.cloud.internal"))
        client_context(client, "federation", allow_names("*.cloud.internal"))
    assert len(live._snapshot.contexts) <= _MAX_AUTHORISED_CONTEXTS
    assert len(_CLIENT_CONTEXTS[client]) <= _MAX_AUTHORISED_CONTEXTS
    kept = allow_names("*.cloud.internal")
    assert live.client_context(authoriser=kept) is live.client_context(authoriser=kept)
