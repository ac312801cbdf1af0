"""aiohttp with mutual TLS from a federatls identity (the ``aiohttp`` extra).

Server: a site whose TLS context follows renewal, and whose peers are checked right after
the handshake; a refused client is cut off before aiohttp reads a request from it.

    runner = web.AppRunner(app)
    await runner.setup()
    await federatls.integrations.aiohttp.Site(runner, live, "0.0.0.0", 8443,
                                              authoriser=allow_names("*.k8s.internal")).start()

Client: a ``ClientSession`` whose new connections use the newest client context, whose
connections from before a renewal are closed instead of reused, and whose servers are
checked before the request is sent.

    async with federatls.integrations.aiohttp.client_session(live) as session:
        async with session.get("https://api.cloud.internal:8443/") as response: ...

Two hooks of aiohttp's connector are private API (``_wrap_create_connection``, ``_release``
and its pool ``_conns``); the tests pin their behaviour.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiohttp import ClientRequest, ClientSession, TCPConnector, web

from .._authorise import Authoriser
from .._errors import BadMaterialError, PeerNotAuthorisedError
from .._identity import TrustChoice
from ._source import Source, authorise, client_context

__all__ = ["Site", "client_session"]


# Server ---------------------------------------------------------------------------------------
class _Gate(asyncio.Protocol):
    """Stands in front of aiohttp's request handler: checks the peer once the TLS handshake
    is done, and only then lets the handler see the connection."""

    def __init__(
        self, inner: asyncio.Protocol, source: Source, authoriser: Authoriser | None
    ) -> None:
        self._inner = inner
        self._source = source
        self._authoriser = authoriser
        self._open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            authorise(self._source, transport, self._authoriser)
        except (PeerNotAuthorisedError, BadMaterialError):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._open = True
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._open:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._open else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._open:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._open:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._open:
            self._inner.resume_writing()


class Site(web.BaseSite):
    """An aiohttp site on ``host:port`` serving mutual TLS as ``source``: the context follows
    renewal (each new handshake uses the newest certificate and trust); every client is
    checked by ``authoriser`` before aiohttp reads from it."""

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
        super().__init__(runner, backlog=backlog)
        self._source = source
        self._host = host
        self._port = port
        self._authoriser = authoriser
        self._ssl = source.server_context(
            trust=trust, require_client_certificate=require_client_certificate
        )
        self._check = require_client_certificate or authoriser is not None
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

        def gate() -> asyncio.Protocol:
            handler = handlers()
            if not self._check:
                return handler
            return _Gate(handler, self._source, self._authoriser)

        self._server = await asyncio.get_running_loop().create_server(
            gate,
            self._host,
            self._port,
            ssl=self._ssl,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )


# Client ---------------------------------------------------------------------------------------
class _LiveConnector(TCPConnector):
    """Opens connections with the newest client context, checks the server right after the
    handshake, and closes connections of older contexts instead of pooling them."""

    def __init__(
        self, source: Source, authoriser: Authoriser | None, trust: TrustChoice, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._source = source
        self._authoriser = authoriser
        self._trust = trust
        self._last: ssl.SSLContext | None = None

    def current_context(self) -> ssl.SSLContext:
        ctx = client_context(self._source, self._trust)
        if ctx is not self._last:
            self._last = ctx
            self._close_stale(ctx)
        return ctx

    def _close_stale(self, current: ssl.SSLContext) -> None:
        pool = getattr(self, "_conns", None)
        if not pool:
            return
        for key in [k for k in pool if isinstance(k.ssl, ssl.SSLContext) and k.ssl is not current]:
            for protocol, _ in pool.pop(key):
                protocol.close()

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        if kwargs.get("ssl"):
            try:
                authorise(self._source, transport, self._authoriser)
            except BaseException:
                transport.abort()
                raise
        return transport, protocol

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
    ``RenewingIdentity``). ``connector_args`` go to the ``TCPConnector``, the rest to the
    session. A request given its own ``ssl=`` keeps it."""
    connector = _LiveConnector(source, authoriser, trust, **(connector_args or {}))

    class _Request(ClientRequest):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("ssl", True) is True:
                kwargs["ssl"] = connector.current_context()
            super().__init__(*args, **kwargs)

    return ClientSession(connector=connector, request_class=_Request, **session_args)
