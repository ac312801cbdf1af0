"""What clients can hold on the CA (docs/ca.md, "Connection limits"): a connection limit kept
below the descriptor limit, a total deadline for each phase of a connection, idle
connections evicted first when the limit is reached (then the oldest unfinished request),
and an accept loop that pauses, and logs a line, when the process runs out of descriptors.

Belongs here: counting, timing and choosing connections to close; the listening sockets.
Not here: TLS (``_tlsconn``), HTTP (``_server``), reading ca.json (``_config``).

The deadlines cost no timer per connection: each connection carries its deadline, set at
each change of phase, and one sweep every ``SWEEP_INTERVAL`` closes those past it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import resource
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Protocol

from .._errors import ConfigError
from ._config import ConnectionLimits

__all__ = [
    "DESCRIPTOR_RESERVE",
    "ConnectionTable",
    "Listener",
    "Phase",
    "bind_sockets",
    "connection_limit",
]

log = logging.getLogger("federatls.ca")

DESCRIPTOR_RESERVE = 64  # descriptors kept for the store, logs, listeners, reloads
DEFAULT_CEILING = 10_000  # the default limit never exceeds this (memory, not descriptors)
ANSWER_TIMEOUT = 60.0  # whole request to the answer written (the CA's work, a slow reader)
SWEEP_INTERVAL = 0.5  # seconds between two sweeps for connections past their deadline
LOG_INTERVAL = 20.0  # at most one summary line about closed or refused connections this often
REFUSAL_LINES = 5  # refused handshakes logged one by one (with the peer) per LOG_INTERVAL
ACCEPT_BATCH = 32  # connections accepted per readiness of a listening socket
ACCEPT_PAUSE = (0.1, 2.0)  # first and longest pause of accepting after a descriptor shortage
_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Phase:
    """Where a connection is. At the limit ``WAITING`` and ``IDLE`` connections are evicted
    first, then those whose client is still sending (``HANDSHAKE``, ``HEAD``, ``BODY``),
    oldest first; never one the CA is answering (``BUSY``)."""

    HANDSHAKE = 0  # TCP accepted, TLS handshake running: handshake deadline
    WAITING = 1  # handshake done, no byte of a request yet: head deadline (evictable)
    HEAD = 2  # part of a request head received: head deadline
    BODY = 3  # whole head received, body arriving: body deadline
    BUSY = 4  # the CA works on the request and writes its answer: ANSWER_TIMEOUT
    IDLE = 5  # answered, kept alive, nothing of the next request yet: idle deadline (evictable)
    CLOSED = 6


class Tracked(Protocol):
    """What the table needs of a connection (``TLSServerConnection``)."""

    phase: int
    deadline: float

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def get_write_buffer_size(self) -> int: ...


def connection_limit(configured: int | None, descriptors: int | None = None) -> int:
    """The connection limit for a process whose soft RLIMIT_NOFILE is ``descriptors`` (read
    now when None): ``configured``, or by default the descriptors left after
    ``DESCRIPTOR_RESERVE`` (at most ``DEFAULT_CEILING``). A configured limit above that is
    lowered, with a warning; ``ConfigError`` if the descriptor limit leaves no room at all."""
    if descriptors is None:
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = math.inf if descriptors == resource.RLIM_INFINITY else descriptors - DESCRIPTOR_RESERVE
    if room < 1:
        raise ConfigError(
            f"the descriptor limit (ulimit -n) is {descriptors}: the CA needs more than "
            f"{DESCRIPTOR_RESERVE} for itself; raise it"
        )
    if configured is None:
        return int(min(room, DEFAULT_CEILING))
    if configured > room:
        log.warning(
            "federatls.connections.maxConnections %d is above what the descriptor limit "
            "allows (ulimit -n %d, %d kept for the CA): lowered to %d",
            configured,
            descriptors,
            DESCRIPTOR_RESERVE,
            room,
        )
        return int(room)
    return configured


class _Summary:
    """Counts what the table closed or refused and logs it in one line, at once after a
    quiet spell, then at most once per ``LOG_INTERVAL``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._level = logging.INFO
        self._last = -math.inf

    def note(self, what: str, now: float, level: int = logging.WARNING) -> None:
        self.counts[what] += 1
        self._level = max(self._level, level)
        self.tick(now)

    def tick(self, now: float) -> None:
        """Log what was counted if the last line is old enough."""
        if not self.counts or now - self._last < LOG_INTERVAL:
            return
        since = "" if self._last == -math.inf else f" in the last {now - self._last:.0f} s"
        parts = ", ".join(f"{count} {what}" for what, count in self.counts.items())
        log.log(self._level, "connections%s: %s", since, parts)
        self.counts.clear()
        self._level = logging.INFO
        self._last = now


_TIMEOUTS = {Phase.BODY: "request body timeout", Phase.BUSY: "answer timeout"}


def _end(conn: Tracked) -> None:
    """Close cleanly, or drop at once if the client is not reading what was written (a
    clean close would hold the descriptor until the client reads)."""
    if conn.get_write_buffer_size():
        conn.abort()
    else:
        conn.close()


class ConnectionTable:
    """Every connection the CA holds, its phase and deadline, and the limit on their number.

    Connections report their phase changes (``opened`` to ``closed``); ``admit`` decides on a
    new connection before anything is made for it; ``start`` runs the sweep.
    """

    def __init__(self, limits: ConnectionLimits, max_connections: int) -> None:
        self.limits = limits
        self.max_connections = max_connections
        self._live: set[Tracked] = set()
        self._admitted = 0  # admitted, not yet opened
        self._idle: OrderedDict[Tracked, None] = OrderedDict()  # oldest idle first
        # Handshake, head or body still arriving, oldest first: evicted after the idle ones.
        self._unfinished: OrderedDict[Tracked, None] = OrderedDict()
        self._summary = _Summary()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refusal_lines = 0  # refused handshakes logged one by one in this window
        self._refusal_window = -math.inf

    def configure(self, limits: ConnectionLimits, max_connections: int) -> None:
        """New limits (a reload): deadlines set from now on use them."""
        self.limits = limits
        self.max_connections = max_connections

    def __len__(self) -> int:
        """Connections held, counting those admitted whose transport is still being made."""
        return len(self._live) + self._admitted

    def in_phase(self, phase: int) -> list[Tracked]:
        return [c for c in self._live if c.phase == phase]

    # -- admission -------------------------------------------------------------------------

    def admit(self) -> bool:
        """Room for one more connection? At the limit the oldest idle connection is closed to
        make room; with none idle, the oldest one whose handshake or request is still
        arriving (a client that holds its slot without finishing a request: a good client
        finishes in moments, so it is the youngest); with none of those either (every slot
        busy with an answer) the answer is no (the caller closes the new socket)."""
        if len(self) < self.max_connections:
            self._admitted += 1
            return True
        now = self._now()
        if self._idle:
            oldest, _ = self._idle.popitem(last=False)
            self._summary.note(
                f"idle connections evicted at the limit of {self.max_connections}", now
            )
            self._drop(oldest)
            _end(oldest)
            self._admitted += 1
            return True
        if self._unfinished:
            oldest, _ = self._unfinished.popitem(last=False)
            self._summary.note(
                f"unfinished requests evicted at the limit of {self.max_connections} (none idle)",
                now,
            )
            phase = oldest.phase
            self._drop(oldest)
            if phase == Phase.HANDSHAKE:
                oldest.abort()
            else:
                _end(oldest)
            self._admitted += 1
            return True
        self._summary.note(
            f"new connections refused at the limit of {self.max_connections} (none idle)", now
        )
        return False

    # -- phases, reported by the connections -------------------------------------------------

    def abandoned(self) -> None:
        """An admitted connection that never opened (the client left first)."""
        self._admitted = max(self._admitted - 1, 0)

    def opened(self, conn: Tracked) -> None:
        self._admitted = max(self._admitted - 1, 0)
        conn.phase = Phase.HANDSHAKE
        conn.deadline = self._now() + self.limits.handshake_timeout
        self._live.add(conn)
        self._unfinished[conn] = None

    def established(self, conn: Tracked) -> None:
        conn.phase = Phase.WAITING
        conn.deadline = self._now() + self.limits.head_timeout
        self._unfinished.pop(conn, None)
        self._idle[conn] = None

    def reading(self, conn: Tracked) -> None:
        """The first bytes of a request after ``established`` or ``answered``."""
        if conn.phase == Phase.IDLE:  # after the handshake, the head deadline runs already
            conn.deadline = self._now() + self.limits.head_timeout
        conn.phase = Phase.HEAD
        self._idle.pop(conn, None)
        self._unfinished[conn] = None

    def requested(self, conn: Tracked) -> None:
        """A whole request head has arrived; its body has the body timeout."""
        conn.phase = Phase.BODY
        conn.deadline = self._now() + self.limits.body_timeout
        self._idle.pop(conn, None)
        self._unfinished.setdefault(conn, None)

    def working(self, conn: Tracked) -> None:
        """The whole request has arrived: the CA works on it and writes the answer."""
        conn.phase = Phase.BUSY
        conn.deadline = self._now() + ANSWER_TIMEOUT
        self._unfinished.pop(conn, None)

    def answered(self, conn: Tracked) -> None:
        """The answer is written and the connection kept alive: idle until the next request."""
        if conn.phase == Phase.CLOSED:
            return
        conn.phase = Phase.IDLE
        conn.deadline = self._now() + self.limits.idle_timeout
        self._unfinished.pop(conn, None)
        self._idle[conn] = None

    def closed(self, conn: Tracked) -> None:
        self._drop(conn)

    def _drop(self, conn: Tracked) -> None:
        conn.phase = Phase.CLOSED
        self._live.discard(conn)
        self._idle.pop(conn, None)
        self._unfinished.pop(conn, None)

    # -- the sweep ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        now = self._now()
        late = [c for c in self._live if c.deadline <= now]
        for conn in late:
            phase = conn.phase
            self._drop(conn)
            if phase == Phase.HANDSHAKE:
                self._summary.note("closed on handshake timeout", now)
                conn.abort()
            elif phase == Phase.IDLE:
                _end(conn)  # an ordinary end of keep-alive: not worth a line
            else:
                what = _TIMEOUTS.get(phase, "request head timeout")
                self._summary.note(f"closed on {what}", now)
                _end(conn)
        self._summary.tick(now)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

    def refused_handshake(self, peer: str, reason: str) -> None:
        """A TLS handshake refused (a bad client certificate, plain HTTP, junk): logged with
        the peer, up to ``REFUSAL_LINES`` per ``LOG_INTERVAL``; past that, counted by reason
        in the summary line, so that a flood of bad handshakes cannot flood the log."""
        now = self._now()
        if now - self._refusal_window >= LOG_INTERVAL:
            self._refusal_window, self._refusal_lines = now, 0
        if self._refusal_lines < REFUSAL_LINES:
            self._refusal_lines += 1
            log.warning("refused TLS connection from %s: %s", peer, reason)
        else:
            self._summary.note(f"TLS handshakes refused ({reason})", now)

    def note(self, what: str, level: int = logging.WARNING) -> None:
        """Count ``what`` in the next summary line (logged at the highest level noted)."""
        self._summary.note(what, self._now(), level)

    def _now(self) -> float:
        loop = self._loop or asyncio.get_running_loop()
        return loop.time()


def bind_sockets(host: str | None, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (all interfaces when None), made as
    ``create_server`` makes them: SO_REUSEADDR, IPv6 sockets IPv6-only, non-blocking.
    ``OSError`` if one cannot be bound (and none is left open)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Listener:
    """The CA's listening sockets and its own accept loop.

    asyncio's accept loop (``loop.create_server``) reports each ``EMFILE`` through the loop's
    exception handler with a traceback and, in CPython 3.11, keeps calling ``accept()`` for
    the rest of its batch, scheduling one retry per failure: at the descriptor limit it logs
    megabytes a second at full CPU. This one asks the table before making anything for a new
    connection, closes a refused one at once, and on a descriptor shortage stops accepting
    for a while (doubling up to ``ACCEPT_PAUSE[1]``) with one summary line.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        make_connection: Callable[[], asyncio.Protocol],
        table: ConnectionTable,
    ) -> None:
        self.sockets = sockets
        self._make = make_connection
        self._table = table
        self._loop = asyncio.get_running_loop()
        self._pause = ACCEPT_PAUSE[0]
        self._resume: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def bind(
        cls,
        host: str | None,
        port: int,
        make_connection: Callable[[], asyncio.Protocol],
        table: ConnectionTable,
        backlog: int = 1024,
    ) -> Listener:
        """Listen on every address of ``host`` (``bind_sockets``) and accept on them."""
        return cls.serving(bind_sockets(host, port, backlog), make_connection, table)

    @classmethod
    def serving(
        cls,
        sockets: list[socket.socket],
        make_connection: Callable[[], asyncio.Protocol],
        table: ConnectionTable,
    ) -> Listener:
        """Accept on sockets already listening (``bind_sockets``, maybe in another process:
        worker processes share their supervisor's). Closing the listener closes them."""
        for sock in sockets:
            sock.setblocking(False)
        listener = cls(sockets, make_connection, table)
        listener._start()
        return listener

    def _start(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop_accepting(self) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._stop_accepting()
        for sock in self.sockets:
            sock.close()
        for task in self._tasks:
            task.cancel()

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _SHORTAGE:
                    self._paused(exc)
                else:
                    self._table.note(f"accept failures ({exc.strerror or exc})")
                return
            self._pause = ACCEPT_PAUSE[0]
            if not self._table.admit():
                conn.close()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._make, conn)
        except OSError:  # the client left before its transport was made
            conn.close()
            self._table.abandoned()

    def _paused(self, exc: OSError) -> None:
        self._stop_accepting()
        self._table.note(f"accept failures ({exc.strerror or exc}): accepting paused")
        self._resume = self._loop.call_later(self._pause, self._resumed)
        self._pause = min(self._pause * 2, ACCEPT_PAUSE[1])

    def _resumed(self) -> None:
        self._resume = None
        self._start()
