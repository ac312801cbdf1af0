"""urllib3 with mutual TLS from a federatls identity (the ``requests`` extra):

    with federatls.integrations.urllib3.PoolManager(live, authoriser=...) as http:
        response = http.request("GET", "https://api.cloud.internal:8443/")
        print(live.peer(response).anchor)

``PoolManager`` has urllib3's request interface (``request``, ``urlopen``, ``clear``) over
one urllib3 pool manager per snapshot of the identity (``_source.Swapping``):

* every connection is opened with the snapshot's client context, which verifies the server
  against the trust bundle, checks its name and then runs the name rules and the authoriser
  right after the handshake, before a byte of the request is sent; a refused server raises
  ``PeerNotAuthorisedError`` (unwrapped from urllib3's ``MaxRetryError``/``SSLError``);
* after a renewal new requests go to a new pool manager; the old one is closed (its idle
  connections with it) as soon as no request is being sent through it. A response still
  being read keeps its connection (a closed pool does not take a connection back, it closes
  it when the response releases it), so nothing follows responses: a hook on each one
  would cost every call a reference cycle, and so the garbage collector's time;
* only ``https://`` is spoken, redirects included (``ConfigError`` otherwise), and only
  directly: urllib3's TLS and proxy arguments are refused with ``ConfigError`` (only those
  in ``_PASSED_ON`` are passed on to urllib3's connection pools).

A server refused by the name rules or the authoriser is contacted once, whatever
``retries=`` says (a refusal could only repeat); other failed handshakes (a certificate that
does not verify, a timeout) are retried as urllib3 retries any connection error (3 by
default: pass ``retries=0`` to try once).

``peer(response)`` works for every response of this pool manager, after its body was read
and its connection released too (the peer is recorded when the response arrives).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any, cast

try:
    import urllib3
    import urllib3.connection
    import urllib3.util.ssl_
    from urllib3._request_methods import RequestMethods  # urllib3.PoolManager's base (2.x)
    from urllib3.connectionpool import HTTPConnectionPool
    from urllib3.response import BaseHTTPResponse, HTTPResponse
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    from .._errors import MissingExtraError

    raise MissingExtraError("federatls.integrations.urllib3", "requests", exc.name) from exc

from .._authorise import Authoriser
from .._errors import ConfigError
from .._identity import Identity, TrustChoice
from .._peer import TLSObject, TLSRecord, remember
from ._source import (
    Arguments,
    Source,
    Swapping,
    check_common,
    client_context,
    passed_on,
    peer_refusal,
    require_https,
)

__all__ = ["PoolManager"]

# urllib3's pool arguments that would choose TLS or a route of their own: refused.
_TLS = (
    "would be ignored or replace federatls's TLS: the server is verified against the "
    "identity's trust bundle and the client certificate is the identity's; instead choose the "
    "bundle with trust='own' or 'federation' and narrow it with authoriser="
)
_REFUSED: dict[str, str] = {
    **{
        name: _TLS
        for name in (
            "ssl_context",
            "cert_reqs",
            "ca_certs",
            "ca_cert_dir",
            "ca_cert_data",
            "cert_file",
            "key_file",
            "key_password",
            "ssl_version",
            "ssl_minimum_version",
            "ssl_maximum_version",
            "assert_hostname",
            "assert_fingerprint",
            "server_hostname",
        )
    },
    **{
        name: "would send requests through a proxy; federatls's pool manager connects "
        "directly: instead use a plain urllib3.ProxyManager for hosts outside the federation"
        for name in ("proxy", "proxy_url", "proxy_headers", "proxy_ssl_context", "_proxy")
    },
}
# What is passed on to urllib3's connection pools (none of it touches TLS).
_ARGS = Arguments(
    where="federatls.integrations.urllib3.PoolManager",
    library="urllib3",
    refused=_REFUSED,
    passed_on=frozenset(
        {"timeout", "retries", "maxsize", "block", "headers", "socket_options", "source_address"}
    ),
    otherwise="a plain urllib3.PoolManager",
)


def raise_refusal(exc: BaseException) -> None:
    """Raise ``PeerNotAuthorisedError`` (from ``exc``) if ``exc`` comes from a refusal."""
    refusal = peer_refusal(exc)
    if refusal is not None:
        raise refusal from exc


class _RecordingConnection(urllib3.connection.HTTPSConnection):
    """urllib3's HTTPS connection, recording its server once connected, and handing that
    record to each response (whose body may be read and whose connection may be released,
    or closed, before the application asks who answered)."""

    peer: TLSRecord | None = None

    def connect(self) -> None:
        # urllib3 offers its module-wide ALPN_PROTOCOLS at each connection; its experimental
        # HTTP/2 (urllib3.http2.inject_into_urllib3()) makes that ["h2"], which this
        # HTTP/1.1 connection cannot speak: refused before connecting, not retried.
        if list(urllib3.util.ssl_.ALPN_PROTOCOLS) != ["http/1.1"]:
            raise ConfigError(
                f"federatls's urllib3 and requests integrations speak HTTP/1.1, but urllib3 "
                f"offers {urllib3.util.ssl_.ALPN_PROTOCOLS} (its experimental HTTP/2, "
                "urllib3.http2.inject_into_urllib3()): undo it with "
                "urllib3.http2.extract_from_urllib3(), or use federatls.integrations.httpx "
                "with http2=True"
            )
        try:
            super().connect()
        except ssl.SSLCertVerificationError as exc:
            # A refusal by the name rules or the authoriser is final: raised as itself,
            # which urllib3 does not take for a connection error to retry.
            raise_refusal(exc)
            raise
        self.peer = TLSRecord.of(cast(TLSObject, self.sock))

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        response = super().getresponse()
        remember(response, self.peer)
        return response


class _RecordingPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _RecordingConnection


class HTTPSOnly(urllib3.PoolManager):
    """One snapshot's urllib3 pool manager: connections with that snapshot's client context,
    to ``https://`` only (redirects, which urllib3 follows inside, included)."""

    def __init__(self, ctx: ssl.SSLContext, num_pools: int, pool_kw: dict[str, Any]) -> None:
        super().__init__(num_pools=num_pools, ssl_context=ctx, **pool_kw)
        self.pool_classes_by_scheme = {**self.pool_classes_by_scheme, "https": _RecordingPool}

    def connection_from_host(
        self,
        host: str | None,
        port: int | None = None,
        scheme: str | None = "http",
        pool_kwargs: dict[str, Any] | None = None,
    ) -> HTTPConnectionPool:
        require_https("federatls's urllib3/requests client", f"{scheme}://{host}")
        if pool_kwargs:  # requests' per-request TLS choices: refused before they get here
            raise ConfigError(f"federatls's pool manager takes no pool_kwargs: {pool_kwargs}")
        return super().connection_from_host(host, port, scheme)

    def urlopen(  # type: ignore[override]
        self, method: str, url: str, redirect: bool = True, **kw: Any
    ) -> BaseHTTPResponse:
        # urllib3 follows a redirect by calling this again with the absolute new URL: refuse
        # an http:// one here, naming it whole (connection_from_host sees only the host).
        require_https(_ARGS.where, url)
        return super().urlopen(method, url, redirect=redirect, **kw)

    def close(self) -> None:
        """Close every pool now: idle connections at once, those in use when released.
        (urllib3's ``clear`` only forgets the pools, which close their connections when
        garbage collected; a response still referenced keeps its pool alive.)"""
        pools = [pool for key in self.pools.keys() if (pool := self.pools.get(key))]  # noqa: SIM118 (no __iter__)
        self.clear()
        for pool in pools:
            pool.close()


def swapping(
    source: Source, trust: TrustChoice, authoriser: Authoriser | None, num_pools: int, **kw: Any
) -> Swapping[HTTPSOnly]:
    """A pool manager per snapshot of ``source``."""

    def build(identity: Identity) -> HTTPSOnly:
        # urllib3 sets its ALPN_PROTOCOLS on the context at each connection.
        alpn = tuple(urllib3.util.ssl_.ALPN_PROTOCOLS)
        return HTTPSOnly(client_context(source, trust, authoriser, alpn), num_pools, kw)

    return Swapping(source, build)


class PoolManager(RequestMethods):
    """urllib3's pool manager interface speaking mutual TLS as ``source`` (an ``Identity`` or
    a ``RenewingIdentity``), servers checked by ``authoriser`` before anything is sent;
    ``connection_pool_kw`` go to urllib3 if they are in ``_PASSED_ON``."""

    def __init__(
        self,
        source: Source,
        *,
        authoriser: Authoriser | None = None,
        trust: TrustChoice = "federation",
        num_pools: int = 10,
        headers: Mapping[str, str] | None = None,
        **connection_pool_kw: Any,
    ) -> None:
        check_common(_ARGS.where, source, trust, authoriser)
        super().__init__(headers)
        kw = passed_on(_ARGS, connection_pool_kw)
        self._managers = swapping(source, trust, authoriser, num_pools, **kw)

    def urlopen(  # type: ignore[override]
        self, method: str, url: str, redirect: bool = True, **kw: Any
    ) -> BaseHTTPResponse:
        require_https(_ARGS.where, url)
        slot, to_close = self._managers.acquire()
        for old in to_close:
            old.close()
        try:
            return slot.resource.urlopen(method, url, redirect=redirect, **kw)
        except BaseException as exc:
            raise_refusal(exc)
            raise
        finally:
            self._release(slot)  # used until urlopen returns: see the module's docstring

    def _release(self, slot: Any) -> None:
        done = self._managers.release(slot)
        if done is not None:
            done.close()

    def clear(self) -> None:
        """Close every pool (idle connections now; connections in use when released)."""
        for manager in self._managers.close():
            manager.close()

    def __enter__(self) -> PoolManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.clear()
