"""Connections for httpx that close when their TLS handshake is cut short.

httpcore closes a TCP stream whose handshake fails with an exception, but not one whose
handshake is cancelled (a deadline passing, a task group shutting down): that socket stays
open until the garbage collector finds it. ``ClosingBackend`` wraps httpcore's own backend so
that a handshake ended by anything closes its socket at once, and can run a check on the TLS
stream right after the handshake (the httpx integration's authoriser), closing it when the
check refuses.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import anyio
import httpcore
import httpx

__all__ = ["Check", "ClosingBackend", "closing_transport"]

Check = Callable[[httpcore.AsyncNetworkStream], None]


class _ClosingStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, check: Check | None) -> None:
        self._inner = inner
        self._check = check

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._inner.aclose()
            raise
        if self._check is not None:
            try:
                self._check(tls)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await tls.aclose()
                raise
        return tls

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class ClosingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's anyio backend, its streams closed when a handshake is cut short, and
    ``check`` (when given) run on each TLS stream after its handshake."""

    def __init__(self, check: Check | None = None) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._check = check

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _ClosingStream(stream, self._check)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _ClosingStream(stream, self._check)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def closing_transport(
    ssl_context: ssl.SSLContext, check: Check | None = None
) -> httpx.AsyncHTTPTransport:
    """httpx's own transport (its error mapping, its response streams) over a connection
    pool that uses ``ClosingBackend(check)``. httpx does not take a network backend, so its
    pool is replaced; a future httpx that keeps it elsewhere is refused here, not ignored."""
    transport = httpx.AsyncHTTPTransport(verify=ssl_context)
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise RuntimeError("this httpx keeps its connection pool elsewhere: update federatls")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        network_backend=ClosingBackend(check),
        max_connections=100,  # httpx's default limits
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
    )
    return transport
