"""A TLS server connection for the CA: TLS over a plain asyncio TCP transport, written for
the CA's traffic (one small request and one small answer per connection).

asyncio's own TLS layer (``loop.start_tls``, ``create_server(ssl=...)``) is general: it
buffers both directions, supports half-closes, times the shutdown, and reports handshake
failures only in debug mode. The CA needs less and needs it cheaper, because
every bootstrapping client opens a new connection: this class is the TCP protocol *and*
the TLS transport that aiohttp's request handler writes to.

- The handshake runs on an :class:`ssl.SSLObject` with memory BIOs, fed by
  ``data_received``; a failed handshake is logged with its reason and the connection
  closed; the HTTP handler is made only after the handshake succeeds.
- Each connection reports its phases (accepted, handshake done, first bytes of a request,
  closed) to the ``ConnectionTable`` (``_connections``), which holds the deadlines (the
  handshake's among them) and closes the connections past them.
- Plaintext is decrypted as records arrive and handed to the handler at once; what the
  handler writes is encrypted at once and passed to the TCP transport, whose buffer and
  flow control (``pause_writing``) apply unchanged.
- ``close`` sends close_notify then closes TCP; a peer's close_notify or TCP EOF ends the
  connection (no half-close: HTTP/1.1 over TLS does not need it).
- Reading pauses are passed to the TCP transport; decrypted data that arrived before a
  pause is kept and delivered on resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections.abc import Callable
from typing import Any

from ._connections import ConnectionTable, Phase

__all__ = ["TLSServerConnection"]

log = logging.getLogger("federatls.ca")
_READ_SIZE = 65536
_WAITING = (Phase.WAITING, Phase.IDLE)
_ENDED = "ended by the client during the TLS handshake"


class TLSServerConnection(asyncio.Protocol, asyncio.Transport):
    """One accepted TCP connection: TLS server side, then the HTTP protocol on top.

    ``make_handler`` builds the HTTP protocol once the handshake is done; ``context`` gives
    the server context, read when the connection is accepted (so a reload or a renewed
    server certificate applies to the next handshake at once). ``table`` is told of each
    phase (``phase`` and ``deadline`` are its to set), so that it can close the connection
    when a deadline passes, and a stopping server can abort the handshakes still running.
    The HTTP layer reports the phases it sees through ``requested``, ``working`` and
    ``answered``.
    """

    phase: int = Phase.HANDSHAKE
    deadline: float = math.inf

    def __init__(
        self,
        make_handler: Callable[[], asyncio.Protocol],
        context: Callable[[], ssl.SSLContext],
        table: ConnectionTable,
    ) -> None:
        super().__init__()
        self._make_handler = make_handler
        self.table = table
        self._context = context()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._tcp: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None  # set when the handshake is done
        self._closing = False
        self._reading_paused = False
        self._pending: list[bytes] = []  # plaintext held while reading is paused
        self._peer = "unknown peer"
        self._end_logged = False  # True once a failed handshake has been logged

    # -- the TCP side (asyncio.Protocol) ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._tcp = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._peer = f"{peer[0]}:{peer[1]}"
        self.table.opened(self)

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._app is None and not self._handshake():
            return
        self._read_plaintext()

    def eof_received(self) -> bool:
        if self._app is None:
            self._end_logged = True
            self.table.note(_ENDED, logging.INFO)  # counted: a client can make many
        else:
            self._app.eof_received()
        self._closing = True
        return False  # the TCP transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        app, self._app = self._app, None
        self._pending.clear()
        self._tcp = None
        self.table.closed(self)
        if app is not None:
            app.connection_lost(exc)
        elif exc is not None and not self._end_logged:
            self.table.note(_ENDED, logging.INFO)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # -- the handshake -----------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Advance the handshake with what has arrived; True once it is done."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as exc:
            self.table.refused_handshake(self._peer, str(exc.reason or exc))
            self._flush()  # the alert tells the client why
            self._abort_handshake()
            return False
        self.table.established(self)
        self._flush()
        self._app = self._make_handler()
        self._app.connection_made(self)
        return True

    def _abort_handshake(self) -> None:
        self._end_logged = True
        self._closing = True
        if self._tcp is not None:
            self._tcp.close()

    # -- plaintext in --------------------------------------------------------------------------

    def _read_plaintext(self) -> None:
        while not self._closing:
            try:
                data = self._ssl.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                self._peer_closed()
                return
            except ssl.SSLError as exc:
                # Counted: any client can make one per connection.
                self.table.note(
                    f"TLS errors after the handshake ({exc.reason or exc})", logging.INFO
                )
                self.abort()
                return
            if not data:  # the peer's close_notify (SSLObject.read returns b"" for it)
                self._peer_closed()
                return
            self._deliver(data)
        self._flush()  # post-handshake messages (alerts, key updates) the read produced

    def _deliver(self, data: bytes) -> None:
        if self.phase in _WAITING:
            self.table.reading(self)
        if self._reading_paused or self._pending:
            self._pending.append(data)
        elif self._app is not None:
            self._app.data_received(data)

    # -- phases the HTTP layer sees ------------------------------------------------------------

    def requested(self) -> None:
        """A whole request head has arrived (the body may follow)."""
        self.table.requested(self)

    def working(self) -> None:
        """The whole request has arrived."""
        self.table.working(self)

    def answered(self) -> None:
        """The answer is out and the connection stays open for the next request."""
        self.table.answered(self)

    def _peer_closed(self) -> None:
        if self._app is not None:
            self._app.eof_received()
        self.close()

    # -- the TLS transport the HTTP handler writes to (asyncio.Transport) ---------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._tcp is None:
            return
        view = memoryview(data)
        while view:
            written = self._ssl.write(view)
            view = view[written:]
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections do not support half-closes")

    def close(self) -> None:
        if self._closing or self._tcp is None:
            self._closing = True
            return
        self._closing = True
        # Queue close_notify; the SSLWantReadError says the peer's is not awaited.
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()
        self._flush()
        self._tcp.close()

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._reading_paused = True
        if self._tcp is not None:
            self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        while self._pending and not self._reading_paused and self._app is not None:
            self._app.data_received(self._pending.pop(0))
        if self._tcp is not None and not self._reading_paused:
            self._tcp.resume_reading()

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tcp.get_write_buffer_size() if self._tcp is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tcp.get_write_buffer_limits() if self._tcp is not None else (0, 0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if name == "compression":
            return self._ssl.compression()
        if self._tcp is None:
            return default
        return self._tcp.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app if self._app is not None else self

    # -- helpers -------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._outgoing.pending and self._tcp is not None:
            self._tcp.write(self._outgoing.read())
