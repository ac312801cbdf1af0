"""uvicorn serving an ASGI app with mutual TLS from a federatls identity (the ``uvicorn``
extra). The TLS context follows renewal; every client is checked by the authoriser right
after the handshake, before uvicorn reads a request from it.

    config = federatls.integrations.uvicorn.config(app, live, host="0.0.0.0", port=8443,
                                                   authoriser=allow_names("*.k8s.internal"))
    await uvicorn.Server(config).serve()

Built on uvicorn's public hooks: ``ssl_context_factory`` and a protocol class for ``http``.
uvicorn's own TLS arguments (every ``ssl_*``: files, version, ciphers, client-certificate
mode, the context factory) are refused with ``ConfigError``: the context is the identity's,
so they would be ignored or replace it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from .._authorise import Authoriser
from .._errors import BadMaterialError, PeerNotAuthorisedError
from .._identity import TrustChoice
from ._source import Arguments, Source, authorise, passed_on

__all__ = ["config"]


def _gated(
    base: type[asyncio.Protocol], source: Source, authoriser: Authoriser | None
) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's HTTP protocol), checking each peer when the connection opens."""

    class Gated(base):  # type: ignore[valid-type, misc]
        _refused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            try:
                authorise(source, transport, authoriser)
            except (PeerNotAuthorisedError, BadMaterialError):
                self._refused = True
                transport.abort()  # type: ignore[attr-defined]
                return
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def eof_received(self) -> Any:
            return None if self._refused else super().eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self._refused:
                super().connection_lost(exc)

    Gated.__name__ = Gated.__qualname__ = f"Federatls{base.__name__}"
    return Gated


# uvicorn's own TLS arguments (any name starting with ``ssl``, so ones uvicorn adds later
# too) are refused; the rest go to ``uvicorn.Config``.
_ARGS = Arguments(
    "federatls.integrations.uvicorn.config",
    "uvicorn",
    refused={
        "ssl*": "would be ignored or replace the identity's TLS context (its certificate, the "
        "trust bundle, renewal, client certificates); instead choose trust= and "
        "require_client_certificate=, and narrow clients with authoriser="
    },
)


def config(
    app: Any,
    source: Source,
    *,
    authoriser: Authoriser | None = None,
    trust: TrustChoice = "federation",
    require_client_certificate: bool = True,
    http: str | type[asyncio.Protocol] = "auto",
    **kwargs: Any,
) -> uvicorn.Config:
    """A ``uvicorn.Config`` for ``app`` serving mutual TLS as ``source`` (an ``Identity`` or a
    ``RenewingIdentity``); other keyword arguments are uvicorn's (``host``, ``port``...),
    except its ``ssl_*`` arguments (a ``ConfigError``)."""
    options = passed_on(_ARGS, kwargs)
    base = import_from_string(HTTP_PROTOCOLS[http]) if isinstance(http, str) else http
    protocol = _gated(base, source, authoriser)

    def context(cfg: uvicorn.Config, default: Any) -> ssl.SSLContext:
        ctx = source.server_context(
            trust=trust, require_client_certificate=require_client_certificate
        )
        alpn = getattr(cfg.http_protocol_class, "alpn_protocols", None)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    return uvicorn.Config(app, http=protocol, ssl_context_factory=context, **options)
