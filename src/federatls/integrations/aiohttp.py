"""aiohttp with mutual TLS from a federatls identity (the ``aiohttp`` extra).

Server: a site whose TLS context follows renewal, and whose peers are checked by the context
in the handshake (name rules, then the authoriser); a refused client is cut off before
aiohttp reads a request from it.

    runner = web.AppRunner(app)
    await runner.setup()
    await federatls.integrations.aiohttp.Site(runner, live, "0.0.0.0", 8443,
                                              authoriser=allow_names("*.k8s.internal")).start()

Client: a ``ClientSession`` whose new connections use the newest client context, whose
connections from before a renewal are closed instead of reused, and whose servers are
checked before the request is sent.

    async with federatls.integrations.aiohttp.client_session(live) as session:
        async with session.get("https://api.cloud.internal:8443/") as response: ...

The session's connector is the only way out, and it opens nothing but direct ``https://``
(``wss://``) connections with federatls's live context: a request that reaches it with a
proxy, its own TLS choice (``ssl=``, ``verify_ssl=``, ``ssl_context=``, ``fingerprint=``) or a
plain ``http://`` (``ws://``) URL, a redirect's included, is refused with ``ConfigError``
before any connection. Session arguments that would replace the connector or the request
class, set a proxy, or take proxies from the environment (``trust_env=True``), and
connector arguments that choose TLS, are refused when the session is made; only the
arguments listed in ``_SESSION_ARGS`` and ``_CONNECTOR_ARGS`` reach aiohttp
(tests/test_aiohttp_client.py).

One hook of aiohttp's connector is private API (``_release`` and its pool ``_conns``); the
tests pin its behaviour.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from typing import Any

from aiohttp import ClientConnectorError, ClientRequest, ClientSession, TCPConnector, web

from .._authorise import Authoriser
from .._errors import ConfigError
from .._identity import TrustChoice
from ._source import (
    Arguments,
    Source,
    check_common,
    client_context,
    passed_on,
    peer_refusal,
)

__all__ = ["Site", "client_session"]


# Server ---------------------------------------------------------------------------------------
class Site(web.BaseSite):
    """An aiohttp site on ``host:port`` serving mutual TLS as ``source``: the context follows
    renewal (each new handshake uses the newest certificate and trust); every client is
    checked by ``authoriser`` in the handshake (the context's check), before aiohttp reads
    from it."""

    def __init__(
        self,
        runner: web.BaseRunner,
        source: Source,
        host: str | None = None,
        port: int = 8443,
        *,
        authoriser: Authoriser | None = None,
        trust: TrustChoice = "federation",
        require_client_certificate: bool = True,
        backlog: int = 128,
        reuse_address: bool | None = None,
    ) -> None:
        check_common("federatls.integrations.aiohttp.Site", source, trust, authoriser)
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._ssl = source.server_context(
            trust=trust,
            require_client_certificate=require_client_certificate,
            authoriser=authoriser,
        )
        self._reuse_address = reuse_address

    @property
    def name(self) -> str:
        host = self._host or "0.0.0.0"  # noqa: S104 (what None means to asyncio)
        return f"https://{host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is not None and getattr(self._server, "sockets", None):
            port: int = self._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            return port
        return self._port

    async def start(self) -> None:
        await super().start()
        handlers = self._runner.server
        assert handlers is not None
        self._server = await asyncio.get_running_loop().create_server(
            handlers,
            self._host,
            self._port,
            ssl=self._ssl,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )


# Client ---------------------------------------------------------------------------------------
_NO_PROXY = (
    "would send requests through a proxy, where the CONNECT tunnel is not checked by the "
    "authoriser; federatls's session does not use proxies: instead connect directly (or use a "
    "plain aiohttp session for hosts outside the federation)"
)
_OWN_TLS = (
    "would replace federatls's live TLS context (the identity's certificate, the trust "
    "bundle, renewal); instead choose the servers' trust with trust= and narrow it with "
    "authoriser="
)
_WHERE = "federatls.integrations.aiohttp.client_session"
# aiohttp's session arguments: those that would route requests around federatls's connector
# or its context, refused, saying what to do instead; and those passed on to
# ``ClientSession`` unchanged (none of them opens or wraps connections).
_SESSION_ARGS = Arguments(
    _WHERE,
    "aiohttp",
    refused={
        "connector": "would replace federatls's connector, which applies the identity's "
        "context and the authoriser; instead pass connection limits in connector_args=",
        "connector_owner": "would leave federatls's connector open after the session; the "
        "session owns it: instead make one session per connector",
        "request_class": "would replace federatls's request class, which applies the live "
        "context; instead use middlewares= or a plain aiohttp session",
        "proxy": _NO_PROXY,
        "proxy_auth": _NO_PROXY,
        "trust_env=True": "would take proxies from HTTPS_PROXY and the like and send requests "
        "through them, around the authoriser; instead leave trust_env off (federatls's "
        "session does not use proxies)",
    },
    passed_on=frozenset(
        {
            "base_url",
            "cookies",
            "headers",
            "skip_auto_headers",
            "auth",
            "json_serialize",
            "json_serialize_bytes",
            "response_class",
            "ws_response_class",
            "version",
            "cookie_jar",
            "raise_for_status",
            "timeout",
            "auto_decompress",
            "trust_env",  # only False: True is refused above
            "requote_redirect_url",
            "trace_configs",
            "read_bufsize",
            "max_line_size",
            "max_field_size",
            "max_headers",
            "fallback_charset_resolver",
            "middlewares",
        }
    ),
    otherwise="a plain aiohttp session",
)
# ``TCPConnector`` arguments: those that choose TLS are refused (the connector's TLS is the
# identity's); limits, DNS and sockets are passed on (TLS is applied on top).
_CONNECTOR_ARGS = Arguments(
    f"{_WHERE} connector_args",
    "aiohttp",
    refused=dict.fromkeys(("ssl", "verify_ssl", "fingerprint", "ssl_context"), _OWN_TLS),
    passed_on=frozenset(
        {
            "limit",
            "limit_per_host",
            "keepalive_timeout",
            "force_close",
            "enable_cleanup_closed",
            "use_dns_cache",
            "ttl_dns_cache",
            "dns_cache_max_size",
            "family",
            "local_addr",
            "resolver",
            "happy_eyeballs_delay",
            "interleave",
            "timeout_ceil_threshold",
            "socket_factory",
            "ssl_shutdown_timeout",
        }
    ),
)


class _LiveConnector(TCPConnector):
    """Opens connections with the newest client context (which checks the server with the
    authoriser in the handshake), and closes connections of older contexts instead of
    pooling them. Refuses any request that would not go directly, over TLS, with one of its
    contexts."""

    def __init__(
        self, source: Source, authoriser: Authoriser | None, trust: TrustChoice, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._source = source
        self._authoriser = authoriser
        self._trust = trust
        self._last: ssl.SSLContext | None = None
        self._handed_out: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()

    def current_context(self) -> ssl.SSLContext:
        ctx = client_context(self._source, self._trust, self._authoriser)
        if ctx is not self._last:
            self._last = ctx
            self._handed_out.add(ctx)
            self._close_stale(ctx)
        return ctx

    def _close_stale(self, current: ssl.SSLContext) -> None:
        pool = getattr(self, "_conns", None)
        if not pool:
            return
        for key in [k for k in pool if isinstance(k.ssl, ssl.SSLContext) and k.ssl is not current]:
            for protocol, _ in pool.pop(key):
                protocol.close()

    def _refuse_detours(self, req: ClientRequest) -> None:
        """``ConfigError`` for a request that would not go directly, over TLS, with a context
        of this connector: whatever built it (a request's arguments, a redirect, another
        session given this connector), nothing is opened for it."""
        if not req.is_ssl():
            raise ConfigError(
                f"federatls's aiohttp session speaks only https:// and wss://, not "
                f"{str(req.url)!r}: a plain request would go without mutual TLS and without "
                "the authoriser; use https:// instead (or a plain aiohttp session for plain HTTP)"
            )
        if req.proxy is not None:
            raise ConfigError(f"{_WHERE}: proxy= {_NO_PROXY}")
        if not (isinstance(req.ssl, ssl.SSLContext) and req.ssl in self._handed_out):
            raise ConfigError(
                f"{_WHERE}: a request's own ssl= (or verify_ssl=, ssl_context=, fingerprint=) "
                f"{_OWN_TLS}"
            )

    async def connect(self, req: ClientRequest, *args: Any, **kwargs: Any) -> Any:
        self._refuse_detours(req)
        try:
            return await super().connect(req, *args, **kwargs)
        except ClientConnectorError as exc:  # aiohttp's wrapping of a refused handshake
            refusal = peer_refusal(exc)
            if refusal is not None:
                raise refusal from exc
            raise

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        stale = isinstance(key.ssl, ssl.SSLContext) and key.ssl is not self._last
        super()._release(key, protocol, should_close=should_close or stale)


def client_session(
    source: Source,
    *,
    authoriser: Authoriser | None = None,
    trust: TrustChoice = "federation",
    connector_args: dict[str, Any] | None = None,
    **session_args: Any,
) -> ClientSession:
    """An ``aiohttp.ClientSession`` speaking mutual TLS as ``source`` (an ``Identity`` or a
    ``RenewingIdentity``), servers checked by ``authoriser`` before anything is sent.
    ``connector_args`` go to the ``TCPConnector`` if ``_CONNECTOR_ARGS`` passes them on, the
    rest to the session if ``_SESSION_ARGS`` does; others are a ``ConfigError``, and
    so is a request with its own ``proxy=`` or ``ssl=``, or an ``http://`` URL."""
    check_common("federatls.integrations.aiohttp.client_session", source, trust, authoriser)
    options = passed_on(_SESSION_ARGS, session_args)
    connector_options = passed_on(_CONNECTOR_ARGS, connector_args or {})
    connector = _LiveConnector(source, authoriser, trust, **connector_options)

    class _Request(ClientRequest):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("ssl", True) is True:  # aiohttp's default: the live context
                kwargs["ssl"] = connector.current_context()
            super().__init__(*args, **kwargs)

    return ClientSession(connector=connector, request_class=_Request, **options)
