"""asyncio streams with mutual TLS from a federatls identity, and an authoriser applied to
every peer before any application data is exchanged.

    server = await streams.start_server(identity, handle, "127.0.0.1", 8443,
                                        authoriser=allow_names("*.k8s.internal"))
    reader, writer = await streams.open_connection(identity, "127.0.0.1", 8443)

Other keyword arguments go to asyncio as they are, except ``ssl=``: the context is the
identity's, so ``ssl=`` (another context, or ``None``/``False`` for none) is a
``ConfigError`` rather than a way around it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from .._authorise import Authoriser
from .._identity import TrustChoice
from ._source import (
    Arguments,
    Source,
    check_common,
    client_context,
    passed_on,
    peer_refusal,
)

__all__ = ["open_connection", "start_server"]

log = logging.getLogger("federatls.peer")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _without_ssl(function: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for ``asyncio.{function}``; ``ConfigError`` if they choose TLS themselves."""
    why = (
        "would replace the identity's TLS context (and with None or False, TLS itself), so "
        "the peer would not be checked as the identity checks it; instead choose the peers' "
        f"trust with trust= and narrow it with authoriser= (or call asyncio.{function} "
        "yourself for plain TCP)"
    )
    table = Arguments(f"federatls.integrations.streams.{function}", "asyncio", {"ssl": why})
    return passed_on(table, kwargs)


async def start_server(
    identity: Source,
    handler: Handler,
    host: str | None = None,
    port: int | None = None,
    *,
    authoriser: Authoriser | None = None,
    trust: TrustChoice = "federation",
    require_client_certificate: bool = True,
    **kwargs: Any,
) -> asyncio.Server:
    """``asyncio.start_server`` with ``identity``'s server context (a ``RenewingIdentity``'s
    follows renewal: each new handshake uses the newest certificate and trust). Each peer is
    checked by the context in the handshake (name rules, then ``authoriser``); a refused peer
    is logged and cut off before ``handler`` ever sees it. ``kwargs`` go to asyncio
    (``ssl=`` is a ``ConfigError``)."""
    check_common("federatls.integrations.streams.start_server", identity, trust, authoriser)
    options = _without_ssl("start_server", kwargs)
    ctx = identity.server_context(
        trust=trust, require_client_certificate=require_client_certificate, authoriser=authoriser
    )
    return await asyncio.start_server(handler, host, port, ssl=ctx, **options)


async def open_connection(
    identity: Source,
    host: str,
    port: int,
    *,
    authoriser: Authoriser | None = None,
    trust: TrustChoice = "federation",
    server_hostname: str | None = None,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` with ``identity``'s client context (mutual TLS; the server
    verified against the federation bundle and its name rules, its name checked, then
    checked by ``authoriser``, all in the handshake): a refused server (by either) is cut
    off and ``PeerNotAuthorisedError`` raised before anything is sent. ``kwargs`` go to
    asyncio (``ssl=`` is a ``ConfigError``)."""
    check_common("federatls.integrations.streams.open_connection", identity, trust, authoriser)
    options = _without_ssl("open_connection", kwargs)
    ctx = client_context(identity, trust, authoriser)
    try:
        return await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=server_hostname or host, **options
        )
    except ssl.SSLCertVerificationError as exc:
        refusal = peer_refusal(exc)  # refused in the handshake (logged)
        if refusal is not None:
            raise refusal from exc
        raise
