"""gRPC client channels with mutual TLS from a federatls identity, sync and ``grpc.aio``
(not public: ``federatls.integrations.grpc.secure_channel`` and
``federatls.integrations.grpc.aio.secure_channel`` are the way in).

A channel here is a wrapper with gRPC's channel interface over ``Swapping``: each call goes
to the gRPC channel built for the source's newest snapshot; after a renewal the next call
builds a new one, and the old one is closed once its running calls (streams included) have
ended, never cut short. Two ways to check the server:

* no authoriser: gRPC's own TLS, with the identity's chain and key (handed over as PEM bytes,
  in memory) and, as roots, those of the bundle that may vouch for the target's host under
  the name rules. gRPC checks the host name, but cannot apply the name rules to the
  server's other names (they need the certificate, which gRPC does not show Python);
* an authoriser: gRPC speaks plaintext HTTP/2 to a local bridge (``_bridge``) that opens
  TLS itself with ``client_context(source, trust, authoriser)``, so every connection is
  checked (name rules on all names, then the authoriser) before a byte of a call is sent.
  A refused server fails the call with ``UNAVAILABLE`` and details naming the refusal.

Options that would move the host check elsewhere (``grpc.default_authority``) or send the
traffic through a proxy (``grpc.http_proxy``, ``grpc.enable_http_proxy``) are refused with
``ConfigError``, and proxies named in the environment are not used;
``grpc.ssl_target_name_override`` names the host to check when the target is an address.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from ..._authorise import Authoriser
from ..._errors import ConfigError
from ..._identity import Identity, TrustChoice
from ..._trust import TrustBundle
from ..._x509 import certs_to_pem
from .._source import Slot, Source, Swapping, check_common
from ._bridge import Bridge, Upstream

__all__ = ["AioChannel", "Channel", "aio_secure_channel", "secure_channel"]

Options = Sequence[tuple[str, Any]]
_NAME_OVERRIDE = "grpc.ssl_target_name_override"
_PROXY = (
    "would send the channel's traffic through a proxy; federatls's channels connect directly "
    "(and ignore https_proxy/grpc_proxy in the environment): instead use a plain gRPC channel "
    "for hosts outside the federation"
)
_REFUSED_OPTIONS = {
    "grpc.default_authority": "would change the name the server is checked against; instead "
    f"give the name to check as {_NAME_OVERRIDE} (or put it in the target)",
    "grpc.http_proxy": _PROXY,
    "grpc.enable_http_proxy": _PROXY,
}
# What a call on a closed channel raises (gRPC's own: ValueError, or grpc.aio.UsageError).
_CLOSED = "Cannot invoke RPC on a closed channel: make a new one with secure_channel"
# gRPC takes a proxy from the environment (https_proxy, grpc_proxy...) unless told not to.
_NO_PROXY = ("grpc.enable_http_proxy", 0)
# Each channel gets subchannels of its own, so a new channel makes new connections (with the
# new certificate) instead of sharing the old channel's.
_OWN_SUBCHANNELS = ("grpc.use_local_subchannel_pool", 1)


@dataclass(frozen=True)
class Target:
    """A gRPC target as ``host:port``, and the name the server must prove."""

    host: str
    port: int
    server_hostname: str

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_target(function: str, target: str, options: Options) -> Target:
    """``host:port`` (or ``dns:///host:port``; port 443 when absent); ``ConfigError`` for
    other schemes (Unix sockets, ``ipv4:`` lists...), which this channel does not dial."""
    rest = target.removeprefix("dns:///")
    if "://" in rest or rest.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")):
        raise ConfigError(
            f"{function}: target {target!r} is not host:port; this channel dials TCP to one "
            "host (give host:port, or dns:///host:port)"
        )
    if rest.startswith("["):
        host, _, port_text = rest[1:].partition("]")
        port_text = port_text.removeprefix(":")
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, ""
    try:
        port = int(port_text) if port_text else 443
    except ValueError:
        raise ConfigError(f"{function}: target {target!r} has no valid port") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"{function}: target {target!r} is not host:port")
    name = dict(options).get(_NAME_OVERRIDE, host)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{function}: {_NAME_OVERRIDE} must be a host name, not {name!r}")
    return Target(host, port, name.lower())


def checked_options(function: str, options: Options | None) -> list[tuple[str, Any]]:
    """``options`` as a list; ``ConfigError`` for one that would route around the check."""
    out = []
    for item in options or ():
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"{function}: options must be (name, value) pairs, not {item!r}")
        if item[0] in _REFUSED_OPTIONS:
            raise ConfigError(f"{function}: option {item[0]} {_REFUSED_OPTIONS[item[0]]}")
        out.append(item)
    return out


def vouching_roots(identity: Identity, trust: TrustChoice, host: str) -> TrustBundle:
    """The roots of ``identity``'s bundle (``trust``) that may vouch for ``host`` under its
    name rules (all of them when the identity does not apply name rules)."""
    bundle = identity.trust if trust == "federation" else identity.own_roots
    if not identity.name_rules:
        return bundle
    return TrustBundle(
        tuple(r for r in bundle if r.names is None or any(p.matches(host) for p in r.names))
    )


def native_credentials(
    identity: Identity, trust: TrustChoice, target: Target
) -> grpc.ChannelCredentials:
    """gRPC's own TLS credentials for ``identity`` reaching ``target``."""
    roots = vouching_roots(identity, trust, target.server_hostname)
    # Never empty in practice (own roots vouch for any name); gRPC would take no roots as
    # "the system's", so refuse here rather than trust the public web.
    if not roots.roots:
        raise ConfigError(f"no trusted root may vouch for {target.server_hostname}")
    return grpc.ssl_channel_credentials(
        root_certificates=certs_to_pem(roots.certificates).encode(),
        private_key=identity.export_private_key(password=None),  # bytes in memory, for gRPC
        certificate_chain=identity.chain_pem.encode(),
    )


# The wrapper, shared by both flavours -------------------------------------------------------
C = TypeVar("C")


class _Swapped(Generic[C]):
    """The gRPC channel of the newest snapshot (``Swapping``), its calls counted. Once
    closed, a call raises ``closed()``, as a closed gRPC channel does (instead of building a
    new channel, which nothing would close)."""

    def __init__(
        self,
        source: Source,
        build: Callable[[Identity], C],
        close: Callable[[C], None],
        closed: Callable[[], Exception],
    ) -> None:
        self._swapping: Swapping[C] = Swapping(source, build)
        self._close = close
        self._closed_error = closed  # what a call on the closed wrapper raises, as gRPC's
        self._closed = False

    def acquire(self) -> Slot[C]:
        if self._closed:  # else Swapping would build a new channel, never to be closed
            raise self._closed_error()
        slot, to_close = self._swapping.acquire()
        for channel in to_close:
            self._close(channel)
        return slot

    def release(self, slot: Slot[C]) -> None:
        done = self._swapping.release(slot)
        if done is not None:
            self._close(done)

    def close(self) -> list[C]:
        self._closed = True
        return self._swapping.close()

    def current(self) -> C:
        slot = self.acquire()
        self.release(slot)
        return slot.resource


class _Multi(Generic[C]):
    """One method of the wrapper: each invocation takes the newest channel's callable and
    counts the call until it ends."""

    def __init__(self, swapped: _Swapped[C], kind: str, method: str, kwargs: dict[str, Any]):
        self._swapped = swapped
        self._kind = kind
        self._method = method
        self._kwargs = kwargs
        self._cached: tuple[Slot[C], Any, Callable[[object], None]] | None = None

    def _take(self) -> tuple[Slot[C], Any, Callable[[object], None]]:
        """The newest channel's slot, counted as in use; this method's callable on that
        channel; and what gives the slot back (called with anything: gRPC's done-callbacks
        get the call). The last two are made once per channel, not at each call."""
        slot = self._swapped.acquire()
        cached = self._cached
        if cached is None or cached[0] is not slot:
            made = getattr(slot.resource, self._kind)(self._method, **self._kwargs)
            release = self._swapped.release
            cached = self._cached = (slot, made, lambda _: release(slot))
        return cached

    def _blocking(self, name: str, *args: Any, **kwargs: Any) -> Any:
        slot, multi, _ = self._take()
        try:
            return getattr(multi, name)(*args, **kwargs)
        finally:
            self._swapped.release(slot)

    def _counted(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Start a call that ends later (a future, a stream, an aio call); released when it
        terminates, however it does."""
        _, multi, release = self._take()
        try:
            call = getattr(multi, name)(*args, **kwargs)
        except BaseException:
            release(None)
            raise
        # gRPC runs a done-callback once, when the call terminates (at once if it has).
        call.add_done_callback(release)
        return call


class _UnaryUnary(_Multi[grpc.Channel], grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._blocking("__call__", *args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._blocking("with_call", *args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("future", *args, **kwargs)


class _StreamUnary(_Multi[grpc.Channel], grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._blocking("__call__", *args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._blocking("with_call", *args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("future", *args, **kwargs)


class _UnaryStream(_Multi[grpc.Channel], grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("__call__", *args, **kwargs)


class _StreamStream(_Multi[grpc.Channel], grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("__call__", *args, **kwargs)


# Sync ------------------------------------------------------------------------------------------
class Channel(grpc.Channel):  # type: ignore[misc]
    """A ``grpc.Channel`` following the source's renewal (see the module's docstring)."""

    def __init__(
        self, build: Callable[[Identity], grpc.Channel], source: Source, bridge: Bridge | None
    ) -> None:
        self._bridge = bridge
        self._unbridge = _bridge_finalizer(self, bridge)
        self._subscriptions: list[tuple[Callable[[grpc.ChannelConnectivity], None], bool]] = []

        def built(identity: Identity) -> grpc.Channel:
            channel = build(identity)
            for callback, try_to_connect in list(self._subscriptions):
                channel.subscribe(callback, try_to_connect)
            return channel

        self._swapped: _Swapped[grpc.Channel] = _Swapped(
            source, built, _close_in_thread, lambda: ValueError(_CLOSED)
        )

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _UnaryUnary(self._swapped, "unary_unary", method, _named(args, kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _UnaryStream(self._swapped, "unary_stream", method, _named(args, kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _StreamUnary(self._swapped, "stream_unary", method, _named(args, kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _StreamStream(self._swapped, "stream_stream", method, _named(args, kwargs))

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """Connectivity of the newest snapshot's channel (and of later ones)."""
        self._subscriptions.append((callback, try_to_connect))
        self._swapped.current().subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._subscriptions = [s for s in self._subscriptions if s[0] is not callback]
        self._swapped.current().unsubscribe(callback)

    def close(self) -> None:
        """Close every channel (running calls are cancelled, as gRPC's ``close`` does) and
        the bridge."""
        for channel in self._swapped.close():
            channel.close()
        self._unbridge()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _named(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A method's serialisers by name (gRPC takes them positionally too)."""
    names = ("request_serializer", "response_deserializer")
    if len(args) > len(names):
        raise TypeError(f"at most {len(names)} positional arguments after the method name")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _close_in_thread(channel: grpc.Channel) -> None:
    # The last call's done-callback runs on one of the channel's own threads, where closing
    # the channel would wait on itself; close it from a short thread of its own.
    threading.Thread(target=channel.close, name="federatls-grpc-close").start()


def _bridge_finalizer(channel: object, bridge: Bridge | None) -> Callable[[], object]:
    """What closes ``bridge`` (once): called by the channel's ``close``, or when the channel
    is garbage collected or the interpreter exits without it (else the bridge's thread,
    loop and socket would live on, and its directory outlive the process)."""
    if bridge is None:
        return lambda: None
    return weakref.finalize(channel, _close_bridge, bridge)


def _close_bridge(bridge: Bridge) -> None:
    if threading.current_thread() is bridge.thread:  # collected on the bridge's own loop
        threading.Thread(target=bridge.close, name="federatls-grpc-bridge-close").start()
    else:
        bridge.close()


def _check_common(
    function: str,
    source: Source,
    trust: TrustChoice,
    authoriser: Authoriser | None,
    options: Options | None,
) -> list[Any]:
    check_common(function, source, trust, authoriser)
    return checked_options(function, options)


def _open_bridge(
    source: Source, target: Target, trust: TrustChoice, authoriser: Authoriser | None
) -> Bridge | None:
    if authoriser is None:
        return None
    upstream = Upstream(target.host, target.port, target.server_hostname, trust, authoriser)
    return Bridge.open(source, upstream)


def secure_channel(
    source: Source,
    target: str,
    *,
    authoriser: Authoriser | None = None,
    trust: TrustChoice = "federation",
    options: Options | None = None,
    compression: grpc.Compression | None = None,
) -> Channel:
    """A ``grpc.Channel`` to ``target`` (``host:port``) with mutual TLS from ``source``,
    following its renewal: the server verified against the federation bundle (``trust="own"``:
    the own CA's roots) and, with ``authoriser``, checked by it before any call is sent.
    ``options`` go to gRPC (``grpc.default_authority`` is a ``ConfigError``)."""
    function = "federatls.integrations.grpc.secure_channel"
    opts = _check_common(function, source, trust, authoriser, options)
    where = parse_target(function, target, opts)
    bridge = _open_bridge(source, where, trust, authoriser)

    def build(identity: Identity) -> grpc.Channel:
        if bridge is None:
            creds = native_credentials(identity, trust, where)
            native = [*opts, _OWN_SUBCHANNELS, _NO_PROXY]
            return grpc.secure_channel(target, creds, native, compression)
        plain = [*opts, _OWN_SUBCHANNELS, ("grpc.default_authority", where.authority)]
        return grpc.insecure_channel(bridge.target, plain, compression)

    return Channel(build, source, bridge)


# grpc.aio --------------------------------------------------------------------------------------
class _AioUnaryUnary(_Multi[grpc.aio.Channel], grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("__call__", *args, **kwargs)


class _AioUnaryStream(_Multi[grpc.aio.Channel], grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("__call__", *args, **kwargs)


class _AioStreamUnary(_Multi[grpc.aio.Channel], grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("__call__", *args, **kwargs)


class _AioStreamStream(_Multi[grpc.aio.Channel], grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("__call__", *args, **kwargs)


class AioChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A ``grpc.aio.Channel`` following the source's renewal (see the module's docstring).
    Use it from the event loop it was first called in."""

    def __init__(
        self, build: Callable[[Identity], grpc.aio.Channel], source: Source, bridge: Bridge | None
    ) -> None:
        self._bridge = bridge
        self._unbridge = _bridge_finalizer(self, bridge)
        self._closing: set[asyncio.Task[None]] = set()
        self._swapped: _Swapped[grpc.aio.Channel] = _Swapped(
            source, build, self._close_later, lambda: grpc.aio.UsageError(_CLOSED)
        )

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        # Its calls have ended: nothing to wait for (grace None).
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _AioUnaryUnary(self._swapped, "unary_unary", method, _named(args, kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _AioUnaryStream(self._swapped, "unary_stream", method, _named(args, kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _AioStreamUnary(self._swapped, "stream_unary", method, _named(args, kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _AioStreamStream(self._swapped, "stream_stream", method, _named(args, kwargs))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The state of the newest snapshot's channel."""
        return self._swapped.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._swapped.current().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._swapped.current().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        """Close every channel (running calls get ``grace`` seconds, as in gRPC) and the
        bridge."""
        channels = self._swapped.close()
        await asyncio.gather(*(c.close(grace) for c in channels), *self._closing)
        self._unbridge()

    async def __aenter__(self) -> AioChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)


def aio_secure_channel(
    source: Source,
    target: str,
    *,
    authoriser: Authoriser | None = None,
    trust: TrustChoice = "federation",
    options: Options | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> AioChannel:
    """``secure_channel`` for ``grpc.aio``: the same checks and renewal; ``interceptors``
    go to each gRPC channel."""
    function = "federatls.integrations.grpc.aio.secure_channel"
    opts = _check_common(function, source, trust, authoriser, options)
    where = parse_target(function, target, opts)
    bridge = _open_bridge(source, where, trust, authoriser)

    def build(identity: Identity) -> grpc.aio.Channel:
        if bridge is None:
            creds = native_credentials(identity, trust, where)
            return grpc.aio.secure_channel(
                target, creds, [*opts, _OWN_SUBCHANNELS, _NO_PROXY], compression, interceptors
            )
        plain = [*opts, _OWN_SUBCHANNELS, ("grpc.default_authority", where.authority)]
        return grpc.aio.insecure_channel(bridge.target, plain, compression, interceptors)

    return AioChannel(build, source, bridge)
