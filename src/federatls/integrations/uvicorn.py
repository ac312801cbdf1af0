"""uvicorn serving an ASGI app with mutual TLS from a federatls identity (the ``uvicorn``
extra). The TLS context follows renewal and checks every client in the handshake (name
rules, then the authoriser), before uvicorn reads a request from it.

    config = federatls.integrations.uvicorn.config(app, live, host="0.0.0.0", port=8443,
                                                   authoriser=allow_names("*.k8s.internal"))
    await uvicorn.Server(config).serve()

Built on uvicorn's public hook ``ssl_context_factory``; ``http=`` (a name or a protocol
class) is uvicorn's, passed on.
uvicorn's own TLS arguments (every ``ssl_*``: files, version, ciphers, client-certificate
mode, the context factory) are refused with ``ConfigError``: the context is the identity's,
so they would be ignored or replace it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import uvicorn

from .._authorise import Authoriser
from .._identity import TrustChoice
from ._source import Arguments, Source, check_common, passed_on

__all__ = ["config"]


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
    check_common("federatls.integrations.uvicorn.config", source, trust, authoriser)
    options = passed_on(_ARGS, kwargs)

    def context(cfg: uvicorn.Config, default: Any) -> ssl.SSLContext:
        ctx = source.server_context(
            trust=trust,
            require_client_certificate=require_client_certificate,
            authoriser=authoriser,
        )
        alpn = getattr(cfg.http_protocol_class, "alpn_protocols", None)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    return uvicorn.Config(app, http=http, ssl_context_factory=context, **options)
