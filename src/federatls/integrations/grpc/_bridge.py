"""The local TLS bridge of a gRPC channel with an authoriser (not public): gRPC cannot show
Python the server's certificate, so such a channel speaks plaintext HTTP/2 to a Unix socket
in a private (0700) temporary directory, and this bridge opens, for each connection gRPC
makes, a TLS connection to the target with the source's newest client context (ALPN "h2").
That context checks the server right after the handshake (name rules, then the authoriser:
``_contexts``), so a refused server never gets a byte of a call.

A connection the bridge cannot open (refused server, unreachable target) is answered in
HTTP/2 by the bridge itself: every call gRPC sent on it ends with ``UNAVAILABLE`` and details
naming the refusal, then GOAWAY, so gRPC opens a new connection (checked again) for the next
call. The bridge runs an asyncio loop on a thread of its own, the only thread this
integration starts; ``close`` stops it and removes the directory. A process killed before
it could close its bridges leaves their directories behind: the next process of the same
user to open a bridge removes them (they are named after their process). What it does not
do: look inside the HTTP/2 it relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import tempfile
import threading
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from ..._authorise import Authoriser
from ..._identity import Identity, TrustChoice
from .._source import Source, snapshot

__all__ = ["Bridge", "Upstream"]

log = logging.getLogger("federatls")

_CONNECT_TIMEOUT = 20.0  # seconds for TCP connect plus TLS handshake to the target
_STOP_TIMEOUT = 10.0  # seconds for close() to stop the bridge
_CHUNK = 65536
_UNAVAILABLE = "14"


# A bridge's directory: made by the process whose id it carries.
_DIRECTORY = re.compile(r"federatls-grpc-(\d+)-[^/]*")
_swept = False  # whether this process removed the directories of dead ones yet


def _remove_orphans(parent: str) -> None:
    """Remove from ``parent`` the bridge directories this user's processes left when they
    died without closing their bridges (``SIGKILL``). Another user's, or a live bridge's,
    are left alone."""
    try:
        names = os.listdir(parent)
    except OSError:  # unreadable: nothing to clean up that this user could see
        return
    for name in names:
        path = os.path.join(parent, name)
        if _orphan(name, path):
            shutil.rmtree(path, ignore_errors=True)


def _orphan(name: str, path: str) -> bool:
    """Whether ``path`` (named ``name``) is a bridge directory of this user's that its
    process left: that process does not exist, and nobody listens on its socket (a process
    of another PID namespace sharing the directory may be alive)."""
    match = _DIRECTORY.fullmatch(name)
    if match is None or int(match[1]) == os.getpid():
        return False
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        os.kill(int(match[1]), 0)  # raises ProcessLookupError when it is gone
    except ProcessLookupError:
        return not _listening(os.path.join(path, "bridge.sock"))
    except (OSError, OverflowError):  # gone already, another user's process, no pid
        return False
    return False  # its process is alive


def _listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:  # refused (nobody listens), or no socket there
            return False
    return True


@dataclass(frozen=True)
class Upstream:
    """Where the bridge connects and how: the target's address, the name its certificate
    must carry (SNI and host check), and the checks of the client context."""

    host: str
    port: int
    server_hostname: str
    trust: TrustChoice
    authoriser: Authoriser | None


def _grpc_message(text: str) -> str:
    """``text`` percent-encoded as gRPC's ``grpc-message`` trailer wants it."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode()
    )


class Bridge:
    """A Unix socket (``path``) whose connections are relayed over TLS to ``upstream``.

    Made by ``Bridge.open`` (listening at once, so gRPC may connect as soon as it likes);
    ``close`` stops it."""

    def __init__(self, source: Source, upstream: Upstream, directory: str, sock: socket.socket):
        self.source = source
        self.upstream = upstream
        self.path = sock.getsockname()
        self._directory = directory
        self._sock = sock
        self._loop = asyncio.new_event_loop()
        self._context: tuple[Identity, ssl.SSLContext] | None = None
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._stopped = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.Transport] = set()  # both ends of every relayed connection
        self._thread = threading.Thread(
            target=self._run,
            name=f"federatls-grpc-bridge {upstream.host}:{upstream.port}",
            # Daemon: a channel its owner never closed must not keep the process alive (gRPC's
            # own threads behave alike); close() stops it.
            daemon=True,
        )

    @classmethod
    def open(cls, source: Source, upstream: Upstream) -> Bridge:
        """A bridge listening on a new socket in a new 0700 temporary directory."""
        global _swept
        if not _swept:
            _swept = True
            _remove_orphans(tempfile.gettempdir())
        directory = tempfile.mkdtemp(prefix=f"federatls-grpc-{os.getpid()}-")  # mode 0700
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.path.join(directory, "bridge.sock"))
            sock.listen(128)
        except OSError:
            sock.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        bridge = cls(source, upstream, directory, sock)
        bridge._thread.start()
        bridge._started.wait()
        return bridge

    @property
    def thread(self) -> threading.Thread:
        """The thread running the bridge's event loop."""
        return self._thread

    @property
    def target(self) -> str:
        """The gRPC target of the socket."""
        return f"unix:{self.path}"

    def close(self) -> None:
        """Stop relaying (open connections are cut), remove the socket and its directory."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        stopping = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            stopping.result(_STOP_TIMEOUT)
        except Exception as exc:  # whatever went wrong, the loop is stopped below
            log.warning("gRPC bridge to %s did not stop cleanly: %r", _at(self.upstream), exc)
        # Stopped only now: stopping the loop inside _shutdown ended it before the future
        # above got the result (a 10 s wait in every close).
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_STOP_TIMEOUT)
        shutil.rmtree(self._directory, ignore_errors=True)

    # The loop's thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                self._loop.create_unix_server(self._downstream, sock=self._sock)
            )
        finally:
            self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _shutdown(self) -> None:
        """Stop listening and cut every relayed connection (``close`` then stops the loop)."""
        if self._server is not None:
            self._server.close()
        for transport in list(self._open):
            transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(2):  # let the aborted transports' connection_lost callbacks run
            await asyncio.sleep(0)

    def _client_context(self) -> ssl.SSLContext:
        """The newest snapshot's client context with ALPN h2 (one per snapshot: the shared
        cached contexts are not ours to change)."""
        identity = snapshot(self.source)
        cached = self._context
        if cached is not None and cached[0] is identity:
            return cached[1]
        up = self.upstream
        ctx = identity.client_context(trust=up.trust, authoriser=up.authoriser)
        ctx.set_alpn_protocols(["h2"])
        self._context = (identity, ctx)
        return ctx

    def _downstream(self) -> _Downstream:
        return _Downstream(self)


def _at(up: Upstream) -> str:
    return f"{up.server_hostname} at {up.host}:{up.port}"


# The relay: two protocols, each writing what it receives to the other's transport (no
# stream buffers or tasks per chunk: this runs for every call of the channel). Flow control:
# when one side's write buffer fills, the other side stops reading until it drains.
class _Half(asyncio.Protocol):
    """One end of a relayed connection."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.transport: asyncio.Transport | None = None
        self.partner: _Half | None = None
        self._early: list[bytes] = []  # received before the partner was linked
        self.lost = False  # the connection is gone (maybe before the partner was linked)
        self.full = False  # its write buffer is full (between pause_ and resume_writing)

    def link(self, partner: _Half) -> None:
        """Relay to ``partner`` from now on, starting with what came before; if this end
        was lost meanwhile (the target hung up before the loop got to link them), the
        partner is closed once that is written, as ``connection_lost`` would have."""
        self.partner = partner
        assert partner.transport is not None
        for data in self._early:
            partner.transport.write(data)
        self._early.clear()
        if self.lost:
            partner.transport.close()
        elif self.full:  # filled before it had a partner to pause (the early bytes)
            partner.transport.pause_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.bridge._open.add(transport)

    def data_received(self, data: bytes) -> None:
        if self.partner is None:  # the server spoke first (its HTTP/2 settings)
            self._early.append(data)
        elif self.partner.transport is not None:
            self.partner.transport.write(data)

    def eof_received(self) -> bool | None:
        return None  # close this end; connection_lost closes the other

    def pause_writing(self) -> None:
        self.full = True
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        self.full = False
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.transport is not None:
            self.bridge._open.discard(self.transport)
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.close()


class _Downstream(_Half):
    """The end gRPC connected to on the Unix socket: what gRPC sends before the TLS
    connection to the target is open and its server admitted is kept (``_early``; up to
    ``_EARLY_LIMIT`` bytes, then reading pauses), and sent only to an admitted server; if it
    cannot be, it answers gRPC itself (``_Refusal``). It reads meanwhile so that gRPC giving
    up is seen at once (a paused transport would not notice its peer closing) and the
    pending upstream connection dropped with it."""

    _EARLY_LIMIT = 1 << 20  # bytes; HTTP/2's windows keep gRPC's far below it

    def __init__(self, bridge: Bridge) -> None:
        super().__init__(bridge)
        self._opening: asyncio.Task[None] | None = None
        self._refusal: _Refusal | None = None
        self._early_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._opening = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        assert self.transport is not None
        up = self.bridge.upstream
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Half(self.bridge),
                    up.host,
                    up.port,
                    ssl=self.bridge._client_context(),
                    server_hostname=up.server_hostname,
                ),
                _CONNECT_TIMEOUT,
            )
        except ssl.SSLCertVerificationError as exc:
            why = exc.__cause__ or f"its certificate failed verification ({exc.verify_message})"
            self._refuse(f"federatls refused the server {_at(up)}: {why}")
            return
        except (OSError, TimeoutError) as exc:
            self._refuse(f"federatls could not connect to {_at(up)}: {exc!r}")
            return
        if self.transport.is_closing():  # gRPC gave up on this connection meanwhile
            assert upstream.transport is not None
            upstream.transport.close()
            return
        self.link(upstream)
        upstream.link(self)
        if not upstream.full:  # else its resume_writing resumes (paused: _EARLY_LIMIT)
            self.transport.resume_reading()

    def _refuse(self, why: str) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self._refusal = _Refusal(self.transport, why)
        early, self._early = b"".join(self._early), []
        if early:
            self._refusal.received(early)
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            self._refusal.received(data)
            return
        super().data_received(data)
        if self.partner is None:
            self._early_size += len(data)
            if self._early_size > self._EARLY_LIMIT and self.transport is not None:
                self.transport.pause_reading()  # resumed once linked or refused

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._opening is not None:
            self._opening.cancel()
        if self._refusal is not None:
            self._refusal.timer.cancel()


class _Refusal:
    """gRPC's connection to a bridge that could not open (or admit) the target: every call
    sent on it is answered with UNAVAILABLE and ``why``, then GOAWAY, and it is closed
    (after at most ``_CONNECT_TIMEOUT`` seconds in any case)."""

    def __init__(self, transport: asyncio.Transport, why: str) -> None:
        self._transport = transport
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self._conn.initiate_connection()
        self._trailers = [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", _UNAVAILABLE),
            ("grpc-message", _grpc_message(why)),
        ]
        transport.write(self._conn.data_to_send())
        self.timer = asyncio.get_running_loop().call_later(_CONNECT_TIMEOUT, transport.close)

    def received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._transport.close()
            return
        answered = False
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._conn.send_headers(event.stream_id, self._trailers, end_stream=True)
                answered = True
        if answered:
            self._conn.close_connection(last_stream_id=self._conn.highest_inbound_stream_id)
        self._transport.write(self._conn.data_to_send())
        if answered:
            self._transport.close()  # after the buffered answer is written
