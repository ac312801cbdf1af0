"""What federatls's two httpx clients share (not public): their arguments, the https-only
rule, and httpcore's errors as httpx's (a server the authoriser refused as
``PeerNotAuthorisedError``).
Nothing here awaits: the async transport (``_httpx_async``) and the sync one generated from
it (``_httpx_sync``) both use it as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpcore
import httpx

from ._source import Arguments, passed_on, peer_refusal
from ._source import require_https as https_only

__all__ = ["arguments", "core_request", "httpx_errors", "pool_limits", "require_https"]

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


def arguments(client: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` if every one may go to httpx's ``client``; else ``ConfigError``."""
    table = Arguments(
        f"federatls.integrations.httpx.{client}",
        "httpx",
        _REFUSED,
        _PASSED_ON,
        otherwise="a plain httpx client",
    )
    return passed_on(table, kwargs)


def pool_limits(given: httpx.Limits | None) -> dict[str, Any]:
    """httpcore's pool arguments for httpx's ``limits``."""
    chosen = given or httpx.Limits()
    return {
        "max_connections": chosen.max_connections,
        "max_keepalive_connections": chosen.max_keepalive_connections,
        "keepalive_expiry": chosen.keepalive_expiry,
    }


def alpn(http2: bool) -> tuple[str, ...]:
    """The ALPN protocols httpcore sets on the context at each connection."""
    return ("http/1.1", "h2") if http2 else ("http/1.1",)


def require_https(request: httpx.Request) -> None:
    """``ConfigError`` for a URL that is not ``https://`` (``_source.require_https``)."""
    https_only("federatls's httpx client", str(request.url), otherwise="a plain httpx client")


def core_request(request: httpx.Request) -> httpcore.Request:
    """``request`` as httpcore takes it."""
    url = request.url
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        ),
        headers=request.headers.raw,
        content=request.stream,
        extensions=request.extensions,
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
def httpx_errors(request: httpx.Request) -> Iterator[None]:
    """httpcore's errors raised as httpx's; a server the context's authoriser refused in the
    handshake as ``PeerNotAuthorisedError`` (``_source.peer_refusal``)."""
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
        raise (peer_refusal(exc) or _translate(exc, request)) from exc


def _translate(exc: Exception, request: httpx.Request) -> httpx.TransportError:
    for theirs, ours in _ERRORS:
        if isinstance(exc, theirs):
            return ours(str(exc), request=request)
    return httpx.TransportError(str(exc), request=request)
