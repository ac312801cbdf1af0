"""httpx clients with mutual TLS from a federatls identity:

    async with federatls.integrations.httpx.AsyncClient(live, authoriser=...) as client:
        response = await client.get("https://api.cloud.internal:8443/")
        print(live.peer(response).anchor)

``Client`` and ``AsyncClient`` are httpx's own, with a transport that

* opens every new connection with the source's newest client context, so a
  ``RenewingIdentity``'s renewals (certificate and trust bundle) reach new connections;
* retires the pool of the previous snapshot after a swap: its idle connections are closed
  as soon as no request is using it, so no connection keeps presenting an old certificate;
* checks the server with the authoriser right after the TLS handshake, before a byte of
  the request is sent (a refused server raises ``PeerNotAuthorisedError``);
* refuses ``http://`` URLs (redirects included) with ``ConfigError``: they would go without
  TLS and without the authoriser.

That transport is the only one: arguments that would give httpx another (``proxy=``,
``mounts=``, ``transport=``) or that it would ignore (``verify=``, ``cert=``, ``http1=``)
are refused with ``ConfigError``, as is anything not in ``_PASSED_ON``. Proxies from the
environment (``HTTPS_PROXY``, ``ALL_PROXY``) are not used: httpx skips them when given a
transport (tests/test_httpx_client.py checks it).

HTTP/1.1 and HTTP/2 as httpx does them (``http2=True`` needs the ``h2`` package).
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpcore
import httpx

from .._authorise import Authoriser
from .._errors import ConfigError
from .._identity import TrustChoice
from .._netstream import ClosingBackend
from ._source import Source, authorise, client_context

__all__ = ["AsyncClient", "Client"]

# httpx's client arguments that do not reach federatls's transport: each would route requests
# around its TLS context and authoriser, or be silently ignored. Refused, saying what to do.
_AROUND = "would send requests through httpx's own transport, around federatls's TLS and authoriser"
_REFUSED: dict[str, str] = {
    "verify": "would be ignored: the server is verified against the identity's trust bundle; "
    "instead choose it with trust='own' or 'federation' and narrow it with authoriser=",
    "cert": "would be ignored: the client certificate is the identity's; instead enrol the "
    "identity you mean to present",
    "proxy": f"{_AROUND}; federatls's client does not use proxies: instead connect directly "
    "(or use a plain httpx client for hosts outside the federation)",
    "proxies": f"{_AROUND}; federatls's client does not use proxies: instead connect directly",
    "mounts": f"{_AROUND}; instead use a separate plain httpx client for other hosts",
    "transport": "would replace federatls's transport; instead use a plain httpx client with "
    "verify=identity.client_context() if you need your own transport",
    "app": f"{_AROUND}; instead call the app with a plain httpx client",
    "uds": "is not supported; instead connect over TCP",
    "http1": "would be ignored: the client always speaks HTTP/1.1; instead pass http2=True to "
    "add HTTP/2",
}
# What is passed on to httpx unchanged (none of it touches connections).
_PASSED_ON = frozenset(
    {
        "auth",
        "params",
        "headers",
        "cookies",
        "timeout",
        "follow_redirects",
        "max_redirects",
        "event_hooks",
        "base_url",
        "trust_env",
        "default_encoding",
    }
)


def _passed_on(client: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` if every one may go to httpx; else ``ConfigError`` naming the first that
    may not, and what to do instead."""
    for name in kwargs:
        if name in _REFUSED:
            raise ConfigError(f"federatls.integrations.httpx.{client}: {name}= {_REFUSED[name]}")
        if name not in _PASSED_ON:
            raise ConfigError(
                f"federatls.integrations.httpx.{client}: {name}= is not passed on to httpx; "
                f"use only {', '.join(sorted(_PASSED_ON))} (or a plain httpx client instead)"
            )
    return kwargs


def _require_https(request: httpx.Request) -> None:
    """``ConfigError`` for a URL that is not ``https://``: it would go without TLS, so
    without the identity and without the authoriser."""
    if request.url.scheme != "https":
        raise ConfigError(
            f"federatls's httpx client speaks only https://, not {str(request.url)!r}: a plain "
            "request would go without mutual TLS and without the authoriser; use https:// "
            "instead (or a plain httpx client for plain HTTP)"
        )


# httpcore's errors as httpx's, so callers catch what httpx documents.
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.TimeoutException, httpx.TimeoutException),
)


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except httpcore.TimeoutException as exc:  # before its base classes below
        raise _translate(exc, request) from exc
    except (
        httpcore.NetworkError,
        httpcore.ProtocolError,
        httpcore.ProxyError,
        httpcore.UnsupportedProtocol,
    ) as exc:
        raise _translate(exc, request) from exc


def _translate(exc: Exception, request: httpx.Request) -> httpx.TransportError:
    for theirs, ours in _ERRORS:
        if isinstance(exc, theirs):
            return ours(str(exc), request=request)
    return httpx.TransportError(str(exc), request=request)


def _core_request(request: httpx.Request, stream: Any) -> httpcore.Request:
    url = request.url
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        ),
        headers=request.headers.raw,
        content=stream,
        extensions=request.extensions,
    )


class _Check:
    """Runs the authoriser on a connection's TLS stream right after the handshake."""

    def __init__(self, source: Source, authoriser: Authoriser | None) -> None:
        self.source = source
        self.authoriser = authoriser

    def __call__(self, stream: httpcore.AsyncNetworkStream | httpcore.NetworkStream) -> None:
        authorise(self.source, stream.get_extra_info("ssl_object"), self.authoriser)


# Async ----------------------------------------------------------------------------------------
class _AsyncPool:
    """One snapshot's connection pool, and how many requests still use it."""

    def __init__(
        self, ctx: ssl.SSLContext, check: _Check, http2: bool, limits: httpx.Limits
    ) -> None:
        self.ctx = ctx
        self.in_use = 0
        self.retired = False
        self.pool = httpcore.AsyncConnectionPool(
            ssl_context=ctx,
            http1=True,
            http2=http2,
            network_backend=ClosingBackend(check),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
        )

    async def release(self) -> None:
        self.in_use -= 1
        if self.retired and self.in_use == 0:
            await self.pool.aclose()


class _AsyncResponseStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, pool: _AsyncPool, request: httpx.Request) -> None:
        self._inner = inner
        self._pool = pool
        self._request = request
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request):
            async for part in self._inner:
                yield part

    async def aclose(self) -> None:
        try:
            with _httpx_errors(self._request):
                await self._inner.aclose()
        finally:
            if not self._released:
                self._released = True
                await self._pool.release()


class _AsyncLiveTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        source: Source,
        authoriser: Authoriser | None,
        trust: TrustChoice,
        http2: bool,
        limits: httpx.Limits,
    ) -> None:
        self._source = source
        self._trust = trust
        self._check = _Check(source, authoriser)
        self._http2 = http2
        self._limits = limits
        self._current: _AsyncPool | None = None
        self._retired: list[_AsyncPool] = []

    async def _pool(self) -> _AsyncPool:
        ctx = client_context(self._source, self._trust)
        current = self._current
        if current is None or current.ctx is not ctx:
            if current is not None:  # a renewal happened: retire the old snapshot's pool
                current.retired = True
                if current.in_use == 0:
                    await current.pool.aclose()
                else:
                    self._retired.append(current)
            current = self._current = _AsyncPool(ctx, self._check, self._http2, self._limits)
        self._retired = [p for p in self._retired if p.in_use]
        return current

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        _require_https(request)
        pool = await self._pool()
        pool.in_use += 1
        try:
            with _httpx_errors(request):
                response = await pool.pool.handle_async_request(
                    _core_request(request, request.stream)
                )
        except BaseException:
            await pool.release()
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_AsyncResponseStream(response.stream, pool, request),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        for pool in [*self._retired, *([self._current] if self._current else [])]:
            await pool.pool.aclose()
        self._current, self._retired = None, []


class AsyncClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` speaking mutual TLS as ``source`` (an ``Identity`` or a
    ``RenewingIdentity``), servers checked by ``authoriser`` before anything is sent.
    ``kwargs`` go to httpx if they are in ``_PASSED_ON``; others are a ``ConfigError``."""

    def __init__(
        self,
        source: Source,
        *,
        authoriser: Authoriser | None = None,
        trust: TrustChoice = "federation",
        http2: bool = False,
        limits: httpx.Limits | None = None,
        **kwargs: Any,
    ) -> None:
        options = _passed_on("AsyncClient", kwargs)
        transport = _AsyncLiveTransport(source, authoriser, trust, http2, limits or httpx.Limits())
        super().__init__(transport=transport, **options)


# Sync ---------------------------------------------------------------------------------------
class _CheckedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, check: _Check) -> None:
        self._inner = inner
        self._check = check

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._check(tls)
        except BaseException:
            tls.close()
            raise
        return tls

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _CheckedBackend(httpcore.NetworkBackend):
    def __init__(self, check: _Check) -> None:
        self._inner = httpcore.SyncBackend()
        self._check = check

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _CheckedStream(stream, self._check)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _CheckedStream(stream, self._check)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _Pool:
    def __init__(
        self, ctx: ssl.SSLContext, check: _Check, http2: bool, limits: httpx.Limits
    ) -> None:
        self.ctx = ctx
        self.in_use = 0
        self.retired = False
        self.pool = httpcore.ConnectionPool(
            ssl_context=ctx,
            http1=True,
            http2=http2,
            network_backend=_CheckedBackend(check),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
        )


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, inner: Any, release: Any, request: httpx.Request) -> None:
        self._inner = inner
        self._release = release
        self._request = request
        self._released = False

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors(self._request):
            yield from self._inner

    def close(self) -> None:
        try:
            with _httpx_errors(self._request):
                self._inner.close()
        finally:
            if not self._released:
                self._released = True
                self._release()


class _LiveTransport(httpx.BaseTransport):
    def __init__(
        self,
        source: Source,
        authoriser: Authoriser | None,
        trust: TrustChoice,
        http2: bool,
        limits: httpx.Limits,
    ) -> None:
        self._source = source
        self._trust = trust
        self._check = _Check(source, authoriser)
        self._http2 = http2
        self._limits = limits
        self._lock = threading.Lock()  # sync clients may be shared between threads
        self._current: _Pool | None = None
        self._retired: list[_Pool] = []

    def _acquire(self) -> _Pool:
        ctx = client_context(self._source, self._trust)
        to_close: list[_Pool] = []
        with self._lock:
            current = self._current
            if current is None or current.ctx is not ctx:
                if current is not None:
                    current.retired = True
                    (self._retired if current.in_use else to_close).append(current)
                current = self._current = _Pool(ctx, self._check, self._http2, self._limits)
            current.in_use += 1
        for pool in to_close:
            pool.pool.close()
        return current

    def _release(self, pool: _Pool) -> None:
        with self._lock:
            pool.in_use -= 1
            done = pool.retired and pool.in_use == 0
            if done and pool in self._retired:
                self._retired.remove(pool)
        if done:
            pool.pool.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _require_https(request)
        pool = self._acquire()
        try:
            with _httpx_errors(request):
                response = pool.pool.handle_request(_core_request(request, request.stream))
        except BaseException:
            self._release(pool)
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream, lambda: self._release(pool), request),
            extensions=response.extensions,
        )

    def close(self) -> None:
        with self._lock:
            pools = [*self._retired, *([self._current] if self._current else [])]
            self._current, self._retired = None, []
        for pool in pools:
            pool.pool.close()


class Client(httpx.Client):
    """``httpx.Client`` speaking mutual TLS as ``source`` (an ``Identity`` or a
    ``RenewingIdentity``), servers checked by ``authoriser`` before anything is sent.
    ``kwargs`` go to httpx if they are in ``_PASSED_ON``; others are a ``ConfigError``."""

    def __init__(
        self,
        source: Source,
        *,
        authoriser: Authoriser | None = None,
        trust: TrustChoice = "federation",
        http2: bool = False,
        limits: httpx.Limits | None = None,
        **kwargs: Any,
    ) -> None:
        options = _passed_on("Client", kwargs)
        transport = _LiveTransport(source, authoriser, trust, http2, limits or httpx.Limits())
        super().__init__(transport=transport, **options)
