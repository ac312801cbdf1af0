"""gRPC client channels (``federatls.integrations.grpc.secure_channel`` and its ``aio`` twin)
against real gRPC servers on 127.0.0.1 with certificates from real federatls CAs: both ways
of checking the server (gRPC's own TLS with no authoriser; the local TLS bridge with one),
refusals (a server of a CA not federated, the authoriser, the name rules), a channel
following its client's renewal without cutting a running stream, and live traffic through a
federated pair while both sides renew and one CA rotates its root.

The servers are ``grpc.server`` with federatls's ``server_credentials`` and ``Interceptor``
(what each call's client presented recorded with ``peer(context)``), and generic handlers on
bytes (no protobuf code generation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import queue
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.to_thread
import grpc
import grpc.aio
import pytest
from cryptography import x509

from federatls import (
    Authoriser,
    ConfigError,
    Identity,
    NamePattern,
    Provenance,
    RenewalPolicy,
    RenewingIdentity,
    TrustBundle,
    TrustedRoot,
    allow_names,
)
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import add_root, issue_from_new_root, retire_old_roots
from federatls.integrations import grpc as fgrpc
from federatls.integrations.grpc import aio as fgrpc_aio
from federatls.testing import TestCA, federated_pair, running_ca

from harness import wait_until
from traffic import CA, enrol, federatls_ca, renewing

pytestmark = pytest.mark.anyio

LONG = timedelta(minutes=10)
SERVER_NAMES = ["server.cloud.internal", "127.0.0.1", "localhost"]
CLOUD_SERVERS = allow_names("*.cloud.internal")
Source = Identity | RenewingIdentity
PATHS = ["native", "bridged"]


# A gRPC server that records who called ---------------------------------------------------------
@dataclass
class Seen:
    """Each call the server's handlers ran: the client's common name and serial."""

    calls: list[tuple[str, int]] = field(default_factory=list)

    def serials(self, cn: str) -> set[int]:
        return {serial for name, serial in self.calls if name == cn}


def _record(seen: Seen, context: grpc.ServicerContext) -> None:
    client = fgrpc.peer(context)
    seen.calls.append((client.common_name, client.serial))


@contextlib.contextmanager
def grpc_server(source: Source, seen: Seen) -> Iterator[int]:
    """Unary ``/t/Unary`` (answers b"ok") and bidirectional ``/t/Echo`` (echoes each
    message), on 127.0.0.1:0."""

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        _record(seen, context)
        return b"ok"

    def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        _record(seen, context)
        yield from requests

    handler = grpc.method_handlers_generic_handler(
        "t",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Echo": grpc.stream_stream_rpc_method_handler(echo),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(16), handlers=[handler], interceptors=[fgrpc.Interceptor(source)]
    )
    port = server.add_secure_port("127.0.0.1:0", fgrpc.server_credentials(source))
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait(10)


# CAs and identities ------------------------------------------------------------------------------
@pytest.fixture
def pair() -> Iterator[tuple[TestCA, TestCA]]:
    """cloud and kubernetes, federated both ways."""
    with federated_pair("cloud", "kubernetes") as both:
        yield both


@pytest.fixture
def outsider(pair: tuple[TestCA, TestCA]) -> Iterator[TestCA]:
    """A CA trusting cloud and kubernetes, which do not trust it."""
    with running_ca("elsewhere") as ca:
        ca.federate(*pair)
        yield ca


def _server(ca: TestCA, cn: str = "server.cloud.internal") -> Identity:
    return ca.identity(cn, sans=[cn, "127.0.0.1", "localhost"])


def _client(ca: TestCA, cn: str = "client.k8s.internal") -> Identity:
    return ca.identity(cn, sans=[cn])


def _authoriser(path: str) -> Authoriser | None:
    return CLOUD_SERVERS if path == "bridged" else None


def unary(source: Source, port: int, authoriser: Authoriser | None, **options: Any) -> bytes:
    """One unary call on a new channel."""
    opts = list(options.items())
    with fgrpc.secure_channel(
        source, f"127.0.0.1:{port}", authoriser=authoriser, options=opts
    ) as channel:
        answer: bytes = channel.unary_unary("/t/Unary")(b"hi", timeout=20)
        return answer


# 1. Reached, or refused -------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_federated_server_reached(pair: tuple[TestCA, TestCA], path: str) -> None:
    """A kubernetes client reaches a cloud server (cloud's root is federated) on both paths,
    and the server sees the client's certificate. Twin: test_unfederated_server_refused."""
    cloud, kubernetes = pair
    seen = Seen()
    client = _client(kubernetes)
    with grpc_server(_server(cloud), seen) as port:
        assert unary(client, port, _authoriser(path)) == b"ok"
    assert seen.calls == [("client.k8s.internal", client.serial)]


@pytest.mark.parametrize("path", PATHS)
def test_large_messages_both_ways(pair: tuple[TestCA, TestCA], path: str) -> None:
    """Megabytes of messages both ways on one stream arrive whole and in order (on the
    bridged path, the relay stops reading one side while the other's buffer is full, and
    resumes). Twin: test_unfederated_server_refused (nothing is relayed)."""
    cloud, kubernetes = pair
    messages = [bytes([i]) * (3 * 1024 * 1024) for i in range(8)]
    with (
        grpc_server(_server(cloud), Seen()) as port,
        fgrpc.secure_channel(
            _client(kubernetes), f"127.0.0.1:{port}", authoriser=_authoriser(path)
        ) as channel,
    ):
        echoed = list(channel.stream_stream("/t/Echo")(iter(messages), timeout=60))
    assert [len(m) for m in echoed] == [len(m) for m in messages]
    assert echoed == messages


@pytest.mark.parametrize("path", PATHS)
def test_unfederated_server_refused(
    pair: tuple[TestCA, TestCA], outsider: TestCA, path: str
) -> None:
    """A server of a CA the client's CA does not federate (it trusts the client) is refused
    on both paths: UNAVAILABLE, the handler never called. Twin: test_federated_server_reached."""
    _, kubernetes = pair
    seen = Seen()
    with (
        grpc_server(_server(outsider, "server.elsewhere.internal"), seen) as port,
        pytest.raises(grpc.RpcError) as info,
    ):
        unary(_client(kubernetes), port, _authoriser(path))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    if path == "bridged":
        assert "federatls refused the server" in info.value.details()
        assert "certificate failed verification" in info.value.details()
    assert seen.calls == []


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_authoriser_refusal(pair: tuple[TestCA, TestCA], flavour: str) -> None:
    """A server the authoriser refuses gets nothing of the call (its handler never runs);
    the call fails with UNAVAILABLE and details naming the refusal. Twin:
    test_federated_server_reached[bridged] (an authoriser that allows it)."""
    cloud, kubernetes = pair
    seen = Seen()
    refuse = allow_names("*.payments.internal")
    client = _client(kubernetes)
    with grpc_server(_server(cloud), seen) as port:
        target = f"127.0.0.1:{port}"
        if flavour == "sync":
            with pytest.raises(grpc.RpcError) as info:
                await anyio.to_thread.run_sync(unary, client, port, refuse)
        else:
            async with fgrpc_aio.secure_channel(client, target, authoriser=refuse) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary("/t/Unary")(b"hi", timeout=20)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = info.value.details()
    assert details.startswith("federatls refused the server 127.0.0.1 at 127.0.0.1:")
    assert "is not authorised" in details
    assert "matches ['*.payments.internal']" in details
    assert seen.calls == []


def _with_rules(identity: Identity, root: x509.Certificate, names: list[str]) -> Identity:
    """``identity`` whose bundle lets ``root`` vouch only for ``names`` (as a CA following
    that root's CA would say)."""
    rules = tuple(NamePattern.parse(n) for n in names)
    roots = tuple(
        TrustedRoot.of(r.certificate, Provenance.PEER, names=rules, peers=("cloud",))
        if r.fingerprint == fingerprint(root)
        else r
        for r in identity.trust
    )
    return dataclasses.replace(identity, trust=TrustBundle(roots))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("allowed", [True, False])
def test_name_rules(pair: tuple[TestCA, TestCA], path: str, allowed: bool) -> None:
    """A server whose names the federated root may not vouch for (127.0.0.1 outside
    "*.cloud.internal") is refused on both paths, the handler never called; with the names
    allowed it is reached (the twin)."""
    cloud, kubernetes = pair
    seen = Seen()
    names = ["*.cloud.internal", *(["127.0.0.1", "localhost"] if allowed else [])]
    client = _with_rules(_client(kubernetes), cloud.root, names)
    with grpc_server(_server(cloud), seen) as port:
        if allowed:
            assert unary(client, port, _authoriser(path)) == b"ok"
        else:
            with pytest.raises(grpc.RpcError) as info:
                unary(client, port, _authoriser(path))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            if path == "bridged":
                assert "federatls refused the server" in info.value.details()
                assert "127.0.0.1" in info.value.details()
    assert len(seen.calls) == (1 if allowed else 0)


# 2. Arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "options", "match"),
    [
        ("unix:/tmp/x.sock", [], "not host:port"),
        ("127.0.0.1:notaport", [], "no valid port"),
        ("127.0.0.1:1", [("grpc.default_authority", "a.cloud.internal")], "ssl_target_name"),
        ("127.0.0.1:1", ["grpc.max_send_message_length"], r"\(name, value\) pairs"),
    ],
)
def test_arguments_refused(
    pair: tuple[TestCA, TestCA], target: str, options: list[Any], match: str
) -> None:
    """Targets this channel does not dial and options that would move the host check are
    ConfigErrors, on both flavours. Twin: test_federated_server_reached."""
    client = _client(pair[1])
    for make in (fgrpc.secure_channel, fgrpc_aio.secure_channel):
        with pytest.raises(ConfigError, match=match):
            make(client, target, options=options)
    with pytest.raises(ConfigError, match="trust must be"):
        fgrpc.secure_channel(client, "127.0.0.1:1", trust="everyone")  # type: ignore[arg-type]


@pytest.mark.parametrize("path", PATHS)
async def test_call_on_a_closed_channel_refused(pair: tuple[TestCA, TestCA], path: str) -> None:
    """A call on a closed channel raises what gRPC raises for its own closed channels
    (``ValueError``; ``grpc.aio.UsageError`` for aio) and reaches no server, instead of a new
    channel being built behind the user's back (never closed; through a removed bridge).
    ``close`` returns at once (a bridged one took 10 s: the bound is generous, not a speed
    test). Twin: the same call before ``close`` is answered."""
    cloud, kubernetes = pair
    seen = Seen()
    client = _client(kubernetes)
    with grpc_server(_server(cloud), seen) as port:
        target = f"127.0.0.1:{port}"
        channel = fgrpc.secure_channel(client, target, authoriser=_authoriser(path))
        call = channel.unary_unary("/t/Unary")
        assert await anyio.to_thread.run_sync(functools.partial(call, b"hi", timeout=20)) == b"ok"
        started = time.monotonic()
        channel.close()
        assert time.monotonic() - started < 5
        with pytest.raises(ValueError, match="closed channel: make a new one"):
            call(b"hi", timeout=20)
        with pytest.raises(ValueError, match="closed channel"):
            channel.unary_unary("/t/Unary")(b"hi", timeout=20)

        aio = fgrpc_aio.secure_channel(client, target, authoriser=_authoriser(path))
        assert await aio.unary_unary("/t/Unary")(b"hi", timeout=20) == b"ok"
        started = time.monotonic()
        await aio.close()
        assert time.monotonic() - started < 5
        with pytest.raises(grpc.aio.UsageError, match="closed channel: make a new one"):
            await aio.unary_unary("/t/Unary")(b"hi", timeout=20)
    assert len(seen.calls) == 2


def test_bridge_directory_private(pair: tuple[TestCA, TestCA]) -> None:
    """The bridge's socket lives in a directory only this user may enter, removed on close.
    Twin: a channel without an authoriser has no bridge."""
    client = _client(pair[1])
    channel = fgrpc.secure_channel(client, "127.0.0.1:1", authoriser=CLOUD_SERVERS)
    bridge = channel._bridge
    assert bridge is not None
    import os
    import stat

    directory = os.path.dirname(bridge.path)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(bridge.path).st_mode)
    channel.close()
    assert not os.path.exists(directory)
    with fgrpc.secure_channel(client, "127.0.0.1:1") as native:
        assert native._bridge is None


# 3. Renewal: new calls move, a running stream ends on the old channel ---------------------------
def _closed(channel: Any) -> bool:
    """Whether a gRPC channel (sync or aio) is closed."""
    if isinstance(channel, grpc.aio.Channel):
        return bool(channel._channel.closed())
    try:
        channel.unary_unary("/t/Unary")(b"probe", timeout=20)
    except ValueError:  # "Cannot invoke RPC on closed channel!"
        return True
    return False


class Feed:
    """A request stream the test writes to."""

    def __init__(self) -> None:
        self.items: queue.Queue[bytes | None] = queue.Queue()

    def __iter__(self) -> Iterator[bytes]:
        while (item := self.items.get()) is not None:
            yield item


@pytest.mark.parametrize("path", PATHS)
async def test_renewal_sync(pair: tuple[TestCA, TestCA], path: str) -> None:
    """After the client renews, new calls present the new certificate while a stream opened
    before keeps going on the old channel; when it ends (OK, not cancelled) the old channel
    is closed. Twin: before the stream ends the old channel is still open."""
    cloud, kubernetes = pair
    seen = Seen()
    live = RenewingIdentity(await enrol_long(kubernetes))
    old_serial = live.current.serial
    with grpc_server(_server(cloud), seen) as port:
        channel = fgrpc.secure_channel(live, f"127.0.0.1:{port}", authoriser=_authoriser(path))
        with channel:
            echo = channel.stream_stream("/t/Echo")
            call = channel.unary_unary("/t/Unary")
            feed = Feed()
            feed.items.put(b"one")
            stream = echo(iter(feed), timeout=60)
            assert await anyio.to_thread.run_sync(next, stream) == b"one"
            old = channel._swapped.current()
            await live.refresh()
            assert await anyio.to_thread.run_sync(functools.partial(call, b"x", timeout=20))
            feed.items.put(b"two")
            assert await anyio.to_thread.run_sync(next, stream) == b"two"
            open_during_stream = not await anyio.to_thread.run_sync(_closed, old)
            feed.items.put(None)
            rest = await anyio.to_thread.run_sync(list, stream)
            await wait_until(lambda: _closed_quietly(old), 20)
            assert stream.code() == grpc.StatusCode.OK
    assert rest == []
    assert open_during_stream
    new_serial = live.current.serial
    assert new_serial != old_serial
    names = [c for c in seen.calls if c[0] == "client.k8s.internal"]
    assert names[0] == ("client.k8s.internal", old_serial)  # the stream
    assert ("client.k8s.internal", new_serial) in names  # the call after renewal


def _closed_quietly(channel: grpc.Channel) -> bool:
    try:
        channel.unary_unary("/t/Unary")(b"probe", timeout=0.001)
    except ValueError:
        return True
    except grpc.RpcError:
        return False
    return False


@pytest.mark.parametrize("path", PATHS)
async def test_renewal_aio(pair: tuple[TestCA, TestCA], path: str) -> None:
    """grpc.aio: after the client renews, new calls present the new certificate; a stream
    opened before ends normally on the old channel, which is then closed. Twin: before the
    stream ends the old channel is still open."""
    cloud, kubernetes = pair
    seen = Seen()
    live = RenewingIdentity(await enrol_long(kubernetes))
    old_serial = live.current.serial
    with grpc_server(_server(cloud), seen) as port:
        target = f"127.0.0.1:{port}"
        async with fgrpc_aio.secure_channel(live, target, authoriser=_authoriser(path)) as ch:
            stream = ch.stream_stream("/t/Echo")(timeout=60)
            await stream.write(b"one")
            assert await stream.read() == b"one"
            old = ch._swapped.current()
            await live.refresh()
            assert await ch.unary_unary("/t/Unary")(b"x", timeout=20) == b"ok"
            await stream.write(b"two")
            assert await stream.read() == b"two"
            open_during_stream = not old._channel.closed()
            await stream.done_writing()
            code = await stream.code()
            await wait_until(lambda: bool(old._channel.closed()), 20)
    assert code == grpc.StatusCode.OK
    assert open_during_stream
    new_serial = live.current.serial
    assert new_serial != old_serial
    assert seen.calls[0] == ("client.k8s.internal", old_serial)
    assert ("client.k8s.internal", new_serial) in seen.calls


async def enrol_long(ca: TestCA) -> Identity:
    return await anyio.to_thread.run_sync(
        functools.partial(ca.identity, "client.k8s.internal", lifetime=LONG)
    )


# 4. Live traffic: renewals on both sides and a root rotation ------------------------------------
K8S_NAMES = ["*.k8s.internal", "127.0.0.1"]  # what cloud lets kubernetes' roots vouch for
K8S_SERVERS = allow_names("*.k8s.internal")
TRUST_EVERY_SECOND = RenewalPolicy(trust_refresh=timedelta(seconds=1))
WAIT = 30.0


@dataclass
class Driven:
    """One client's calls: answered, and what failed."""

    ok: int = 0
    failures: list[BaseException] = field(default_factory=list)


async def _drive(call: Callable[[], Awaitable[bytes]], out: Driven, stop: anyio.Event) -> None:
    while not stop.is_set():
        try:
            assert await call() == b"ok"
        except Exception as exc:
            out.failures.append(exc)
        else:
            out.ok += 1
        await anyio.sleep(0.02)


def _names(live: RenewingIdentity, names: dict[str, str]) -> frozenset[str]:
    return frozenset(names.get(r.fingerprint, "?") for r in live.current.trust)


def _anchor(live: RenewingIdentity, names: dict[str, str]) -> str:
    anchor = live.current.trust.anchor_of(live.current.chain[-1])
    return names.get(anchor.fingerprint, "?") if anchor else "?"


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    with anyio.fail_after(WAIT):
        while True:
            if await check():
                return
            await anyio.sleep(0.2)


async def test_live_traffic_renewals_and_rotation() -> None:
    """Cloud's client calls kubernetes' gRPC server on all four channels (sync and aio,
    native and bridged) while both renew every ~2 s and kubernetes rotates its root (add B,
    issue from B, retire A) with cloud following it by URL: no call fails, calls are
    answered in every phase, the server ends anchored in B and the client trusting B but not
    A, and the server saw at least three certificates of the client, each really issued.
    Twins: test_unfederated_server_refused and test_name_rules[False] (the same channels do
    fail calls when the server is not to be trusted)."""
    async with federatls_ca("cloud") as cloud, federatls_ca("kubernetes") as kubernetes:
        await kubernetes.federate(cloud)
        await cloud.follow(kubernetes, K8S_NAMES)
        names = {fingerprint(kubernetes.root): "A", fingerprint(cloud.root): "C"}
        await _until(async_has(cloud, fingerprint(kubernetes.root)))
        seen = Seen()
        issued: set[int] = set()
        driven = {
            name: Driven() for name in ("sync-native", "sync-bridged", "aio-native", "aio-bridged")
        }
        async with anyio.create_task_group() as tg:
            server = await renewing(
                tg,
                await enrol(
                    kubernetes, "server.k8s.internal", ["server.k8s.internal", "127.0.0.1"]
                ),
            )
            first = await enrol(cloud, "client.cloud.internal")
            client = await renewing(tg, first, TRUST_EVERY_SECOND)
            issued.add(first.serial)

            async def history() -> None:
                async for identity in client.updates():
                    issued.add(identity.serial)

            tg.start_soon(history)
            with grpc_server(server, seen) as port:
                target = f"127.0.0.1:{port}"
                with (
                    fgrpc.secure_channel(client, target) as sync_native,
                    fgrpc.secure_channel(client, target, authoriser=K8S_SERVERS) as sync_bridged,
                ):
                    async with (
                        fgrpc_aio.secure_channel(client, target) as aio_native,
                        fgrpc_aio.secure_channel(
                            client, target, authoriser=K8S_SERVERS
                        ) as aio_bridged,
                    ):
                        calls: dict[str, Callable[[], Awaitable[bytes]]] = {
                            "sync-native": _sync_call(sync_native),
                            "sync-bridged": _sync_call(sync_bridged),
                            "aio-native": _aio_call(aio_native),
                            "aio-bridged": _aio_call(aio_bridged),
                        }
                        stop = anyio.Event()
                        counts = []
                        async with anyio.create_task_group() as drivers:
                            for name, call in calls.items():
                                drivers.start_soon(_drive, call, driven[name], stop)

                            async def more() -> None:
                                target_counts = {n: d.ok + 3 for n, d in driven.items()}
                                await wait_until(
                                    lambda: (
                                        all(d.ok >= target_counts[n] for n, d in driven.items())
                                        or any(d.failures for d in driven.values())
                                    ),
                                    WAIT,
                                )
                                counts.append({n: d.ok for n, d in driven.items()})

                            await more()
                            step = add_root(
                                kubernetes.directory, kubernetes.password, now=datetime.now(UTC)
                            )
                            b = fingerprint(load_pem_certificate(step.roots[-1].read_bytes()))
                            names[b] = "B"
                            await kubernetes.reload()
                            await wait_until(
                                lambda: all("B" in _names(w, names) for w in (client, server)),
                                WAIT,
                            )
                            await more()
                            issue_from_new_root(kubernetes.directory)
                            await kubernetes.reload()
                            await wait_until(lambda: _anchor(server, names) == "B", WAIT)
                            await more()
                            retire_old_roots(kubernetes.directory)
                            await kubernetes.reload()
                            await wait_until(lambda: "A" not in _names(client, names), WAIT)
                            await more()
                            await wait_until(
                                lambda: len(seen.serials("client.cloud.internal")) >= 3, WAIT
                            )
                            stop.set()
            final = (_anchor(server, names), _names(client, names))
            renewals = (server.renewals, client.renewals)
            stopped = (server.stopped, client.stopped)
            tg.cancel_scope.cancel()
    assert {n: d.failures for n, d in driven.items()} == {n: [] for n in driven}
    for earlier, later in itertools.pairwise(counts):  # answered in every phase
        assert all(earlier[n] < later[n] for n in driven), counts
    assert final == ("B", frozenset("CB"))
    assert stopped == (None, None)
    assert min(renewals) >= 2, renewals
    served = seen.serials("client.cloud.internal")
    assert len(served) >= 3
    assert served <= issued


def async_has(ca: CA, root: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return root in await ca.federation()

    return check


def _sync_call(channel: fgrpc.Channel) -> Callable[[], Awaitable[bytes]]:
    method = channel.unary_unary("/t/Unary")

    async def call() -> bytes:
        answer: bytes = await anyio.to_thread.run_sync(functools.partial(method, b"hi", timeout=20))
        return answer

    return call


def _aio_call(channel: fgrpc_aio.Channel) -> Callable[[], Awaitable[bytes]]:
    method = channel.unary_unary("/t/Unary")

    async def call() -> bytes:
        answer: bytes = await method(b"hi", timeout=20)
        return answer

    return call
