"""The CA's TLS listener: it accepts TCP connections and runs each TLS handshake itself, so
that a refused handshake (a client certificate from an untrusted CA, an old protocol) is
logged with its reason, as every other refusal is; then it hands the connection to aiohttp.

asyncio's own ``ssl=`` server path reports handshake failures only in debug mode.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

__all__ = ["TLSAcceptor"]

log = logging.getLogger("federatls.ca")
HANDSHAKE_TIMEOUT = 30.0


class TLSAcceptor(asyncio.Protocol):
    """The protocol of a freshly accepted TCP connection, until its TLS handshake is done.

    ``make_handler`` builds the HTTP protocol (aiohttp's request handler); ``context`` gives
    the server context to handshake with (read at accept time, so a reload applies at once).
    """

    def __init__(
        self,
        make_handler: Callable[[], asyncio.Protocol],
        context: Callable[[], ssl.SSLContext],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._make_handler = make_handler
        self._context = context
        self._tasks = tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello waits in the socket for start_tls
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown peer"
        handler = self._make_handler()
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                handler,
                self._context(),
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except ssl.SSLError as exc:
            log.warning("refused TLS connection from %s: %s", where, exc.reason or exc)
            transport.close()
            return
        except (OSError, TimeoutError) as exc:
            log.info(
                "TLS connection from %s ended during the handshake: %s",
                where,
                exc or type(exc).__name__,
            )
            transport.close()
            return
        if tls is None:  # the peer went away meanwhile
            transport.close()
            return
        handler.connection_made(tls)
