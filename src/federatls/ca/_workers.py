"""Worker processes (docs/ca.md, "Worker processes"): ``federatls ca serve CONFIG --workers N``.

A supervisor checks ca.json, the password and the database once, binds the listening sockets
itself and starts N worker processes that inherit them (docs/decisions.md says why inherited
sockets and not SO_REUSEPORT); each worker runs an ordinary ``CAServer`` on those sockets,
with the supervisor's start time for step-ca's "token issued before the CA started" rule.
The supervisor forwards SIGHUP and SIGTERM/SIGINT, restarts a worker that dies, and prints
nothing of its own until every worker serves.

Between the supervisor and a worker: the worker's standard input, on which the password
arrives (length first) and whose end tells the worker that its supervisor is gone; and a
status pipe on which the worker writes one line per event (``ready``, ``error REASON``,
``reloaded``, ``reload-failed REASON``). The password is never in argv, the environment or
a file.

Belongs here: starting, watching, signalling and restarting workers; a worker's entry point.
Not here: serving requests (``_server``), accepting connections (``_connections``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._errors import ConfigError, FederatlsError
from .._x509 import fingerprint
from ._config import CAConfig, split_address
from ._connections import bind_sockets
from ._database import Database, open_store
from ._material import load_material
from ._server import READY_RECORD, CAServer, Serving

__all__ = ["MAX_WORKERS", "Supervisor", "supervise", "worker_main"]

log = logging.getLogger("federatls.ca.workers")

MAX_WORKERS = 128
START_TIMEOUT = 60.0  # seconds a worker has to serve after it is started
STOP_GRACE = 30.0  # seconds workers have to finish running requests on SIGTERM, then SIGKILL
RELOAD_TIMEOUT = 30.0  # seconds a worker has to answer a reload
RESTART_PAUSE = (0.5, 30.0)  # first and longest pause before another attempt to start a worker
STABLE_AFTER = 10.0  # a worker that served this long is restarted at once when it dies


@dataclass(frozen=True)
class Announcement:
    """What ``ready`` is told once every worker serves (a ``Serving``)."""

    url: str
    root_fingerprint: str
    pids: tuple[int, ...]


class _StartFailed(Exception):
    """A worker did not come to serve; ``str()`` says why, in one line."""


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by signal {-code} ({name})"
    return f"exited with status {code}"


@dataclass
class _Worker:
    """One worker slot: its number (stable across restarts) and its current process."""

    index: int
    process: asyncio.subprocess.Process | None = None
    serving_since: float = 0.0  # monotonic; 0 while not serving
    answers: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


class Supervisor:
    """Starts ``count`` workers on ``sockets`` and keeps them running until ``stop``."""

    def __init__(
        self,
        config_path: Path,
        password: bytes,
        count: int,
        sockets: Sequence[socket.socket],
        *,
        started_at: datetime,
        verbose: bool = False,
        database: Database | None = None,
    ) -> None:
        self.config_path = config_path
        self._password = password
        self._database = database
        self._sockets = list(sockets)
        self._started_at = started_at
        self._verbose = verbose
        self.workers = [_Worker(i + 1) for i in range(count)]
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- one worker process ---------------------------------------------------------------------

    def _command(self, worker: _Worker, status_fd: int) -> list[str]:
        fds = ",".join(str(s.fileno()) for s in self._sockets)
        return [
            sys.executable,
            "-m",
            "federatls.ca._workers",
            "--index",
            str(worker.index),
            "--sockets",
            fds,
            "--status",
            str(status_fd),
            "--started-at",
            self._started_at.isoformat(),
            *(["--verbose"] if self._verbose else []),
            str(self.config_path),
        ]

    async def _start(self, worker: _Worker) -> None:
        """Start ``worker``'s process and wait until it serves; ``_StartFailed`` if it does
        not (it is then gone)."""
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        pipe = os.fdopen(read_fd, "rb", buffering=0)  # the transport closes it
        try:
            # Its own session: a Ctrl-C on the terminal reaches the supervisor alone, which
            # stops the workers in order. Its stdout goes to our stderr (it prints nothing).
            worker.process = await asyncio.create_subprocess_exec(
                *self._command(worker, write_fd),
                stdin=subprocess.PIPE,
                stdout=sys.stderr.fileno(),
                pass_fds=(*(s.fileno() for s in self._sockets), write_fd),
                start_new_session=True,
            )
        except OSError as exc:
            pipe.close()
            raise _StartFailed(f"cannot start a process: {exc.strerror or exc}") from exc
        finally:
            os.close(write_fd)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        assert worker.process.stdin is not None
        database = b"" if self._database is None else _encode_database(self._database)
        worker.process.stdin.write(_frame(self._password) + _frame(database))
        log.info("worker %d started (pid %d)", worker.index, worker.pid)
        try:
            line = await asyncio.wait_for(reader.readline(), START_TIMEOUT)
        except TimeoutError:
            worker.signal(signal.SIGKILL)
            await worker.process.wait()
            raise _StartFailed(f"not serving after {START_TIMEOUT:g} s (killed)") from None
        word, _, reason = line.decode(errors="replace").strip().partition(" ")
        if word != "ready":
            code = await worker.process.wait()
            raise _StartFailed(reason if word == "error" and reason else _exit_reason(code))
        worker.serving_since = time.monotonic()
        self._spawn(self._relay_answers(worker, reader))

    async def _relay_answers(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        """Hand the worker's later status lines (its reload answers) to ``_reload``."""
        while line := await reader.readline():
            worker.answers.put_nowait(line.decode(errors="replace").strip())
        worker.answers.put_nowait("gone")

    async def _keep(self, worker: _Worker) -> None:
        """Restart ``worker`` whenever it dies, until the supervisor stops: at once if it had
        served a while, else after a pause that doubles with each failed start."""
        pause = RESTART_PAUSE[0]
        failures = 0
        while True:
            assert worker.process is not None
            pid = worker.pid
            code = await worker.process.wait()
            if self._stopping.is_set():
                return
            served = time.monotonic() - worker.serving_since if worker.serving_since else 0.0
            worker.serving_since = 0.0
            log.error("worker %d (pid %d) %s; restarting it", worker.index, pid, _exit_reason(code))
            if served >= STABLE_AFTER:
                pause, failures = RESTART_PAUSE[0], 0
                wait = 0.0
            else:
                wait = pause
            while True:
                if wait and await self._stopped_within(wait):
                    return
                try:
                    await self._start(worker)
                except _StartFailed as exc:
                    if self._stopping.is_set():
                        return
                    failures += 1
                    pause = min(pause * 2, RESTART_PAUSE[1])
                    wait = pause
                    log.error(
                        "worker %d could not start (%d time(s) in a row): %s; next attempt in %g s",
                        worker.index,
                        failures,
                        exc,
                        wait,
                    )
                    continue
                log.info("worker %d (pid %d) serves again", worker.index, worker.pid)
                failures = 0
                if served < STABLE_AFTER:  # it died young: keep the pause growing
                    pause = min(pause * 2, RESTART_PAUSE[1])
                break

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- all of them ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; ``ConfigError`` (and none left running) if one cannot serve."""
        results = await asyncio.gather(
            *(self._start(w) for w in self.workers), return_exceptions=True
        )
        for worker, result in zip(self.workers, results, strict=True):
            if isinstance(result, BaseException):
                await self.terminate()
                if isinstance(result, _StartFailed):
                    raise ConfigError(f"worker {worker.index} could not start: {result}")
                raise result
        for worker in self.workers:
            self._spawn(self._keep(worker))

    def reload(self) -> None:
        """SIGHUP: every serving worker re-reads ca.json; one summary line when all answered."""
        self._spawn(self._reload())

    async def _reload(self) -> None:
        async with self._reload_lock:
            serving = [w for w in self.workers if w.serving_since and w.alive()]
            for worker in serving:
                while not worker.answers.empty():
                    worker.answers.get_nowait()
                worker.signal(signal.SIGHUP)
            log.info("reloading %s in %d worker(s)", self.config_path, len(serving))
            failed: list[str] = []
            for worker in serving:
                try:
                    answer = await asyncio.wait_for(worker.answers.get(), RELOAD_TIMEOUT)
                except TimeoutError:
                    answer = "reload-failed no answer"
                word, _, reason = answer.partition(" ")
                if word == "gone":
                    reason = "it died"
                if word != "reloaded":
                    failed.append(f"worker {worker.index}: {reason}")
            if failed:
                log.error(
                    "reload failed in %d of %d worker(s), which keep their running "
                    "configuration: %s",
                    len(failed),
                    len(serving),
                    "; ".join(failed),
                )
            else:
                log.info("configuration reloaded in all %d worker(s)", len(serving))

    def stop(self) -> None:
        """SIGTERM/SIGINT: stop (a second one kills the workers at once)."""
        if self._stopping.is_set():
            log.warning("stopping now: killing the workers")
            for worker in self.workers:
                worker.signal(signal.SIGKILL)
        self._stopping.set()

    async def wait(self) -> None:
        """Until ``stop`` is called."""
        await self._stopping.wait()

    async def terminate(self, *, grace: float = STOP_GRACE) -> None:
        """SIGTERM every worker (each finishes its running requests), SIGKILL those still
        there after ``grace`` seconds, and wait for all. The restarting stops first, so no
        worker is started meanwhile (one being started is ended with the others)."""
        self._stopping.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in self._sockets:  # new connections are refused once the workers close theirs
            sock.close()
        running = [w for w in self.workers if w.alive()]
        for worker in running:
            worker.signal(signal.SIGTERM)
        done = asyncio.gather(*(w.process.wait() for w in running if w.process is not None))
        try:
            await asyncio.wait_for(asyncio.shield(done), grace)
        except TimeoutError:
            for worker in running:
                if worker.alive():
                    log.warning(
                        "worker %d (pid %d) still running: killed", worker.index, worker.pid
                    )
                    worker.signal(signal.SIGKILL)
            await done


def _prepare(
    config_path: Path, password: bytes, database: Database | None
) -> tuple[list[socket.socket], str, str]:
    """What the supervisor checks before it starts any worker, each failure a ``ConfigError``
    in one line: ca.json, the password (the intermediate key decrypts), the database (it
    opens, and is created or migrated once here); then the listening sockets, bound. Returns
    them, the CA's URL and its root's fingerprint."""
    config = CAConfig.load(config_path)
    material = load_material(config, password)
    open_store(database or config.database).close()
    host, port = split_address(config.address)
    try:
        sockets = bind_sockets(host or None, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.address}: {exc.strerror}") from exc
    bound = sockets[0].getsockname()
    name, number = str(bound[0]), int(bound[1])
    url = f"https://{f'[{name}]' if ':' in name else name}:{number}"
    return sockets, url, fingerprint(material.roots[0])


async def supervise(
    config_path: Path | str,
    password: bytes,
    workers: int,
    ready: Callable[[Serving], None] | None = None,
    *,
    database: Database | None = None,
) -> None:
    """Run ``workers`` worker processes on ca.json until SIGTERM or SIGINT; SIGHUP reloads
    every one. ``database`` replaces ca.json's ``db`` block in every worker. ``ConfigError``
    before any worker starts for a bad ca.json, password, database or address, and when a
    worker cannot start at all."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be from 1 to {MAX_WORKERS}, not {workers}")
    started_at = datetime.now(UTC)
    config_path = Path(config_path)
    sockets, url, root = _prepare(config_path, password, database)
    loop = asyncio.get_running_loop()
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    supervisor = Supervisor(
        config_path,
        password,
        workers,
        sockets,
        started_at=started_at,
        verbose=verbose,
        database=database,
    )
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        loop.add_signal_handler(signal.SIGTERM, supervisor.stop)
        loop.add_signal_handler(signal.SIGINT, supervisor.stop)
        loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
        await supervisor.start()
        pids = tuple(w.pid for w in supervisor.workers)
        log.info("%d workers serving on %s (pids %s)", workers, url, ", ".join(map(str, pids)))
        if ready is not None:
            ready(Announcement(url, root, pids))
        await supervisor.wait()
        log.info("stopping %d workers", workers)
    finally:
        await supervisor.terminate()
        for sig in signals:
            loop.remove_signal_handler(sig)
        for sock in sockets:
            sock.close()  # also when the supervisor was never made


# The worker's side ------------------------------------------------------------------------------


class _NotTheReadyLine(logging.Filter):
    """Drops the server's own "serving HTTPS on" record (the supervisor announces readiness
    once, for all workers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, READY_RECORD, False)


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _encode_database(db: Database) -> bytes:
    """A ``--db`` override for a worker: on its standard input, as the password (a
    PostgreSQL URL may hold one), never in its argv."""
    return f"{db.kind} {db.location}".encode()


def _read_frame(fd: int) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise ConfigError("the supervisor closed the pipe before sending the settings")
            data += chunk
        return data

    return exactly(int.from_bytes(exactly(4), "big"))


def _read_settings(fd: int) -> tuple[bytes, Database | None]:
    """The password and the ``--db`` override (if any), as the supervisor sent them."""
    password = _read_frame(fd)
    database = _read_frame(fd).decode()
    if not database:
        return password, None
    kind, _, location = database.partition(" ")
    if kind not in ("sqlite", "postgresql"):  # the same federatls wrote it: cannot happen
        raise ConfigError(f"the supervisor sent an unknown database kind {kind!r}")
    if kind == "sqlite":
        return password, Database.sqlite(location)
    return password, Database("postgresql", location)


async def _work(
    config: Path,
    password: bytes,
    sockets: list[socket.socket],
    started_at: datetime,
    index: int,
    status: Callable[[str], None],
    database: Database | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    ca = CAServer(
        config,
        password,
        sockets=sockets,
        started_at=started_at,
        checkpoints=index == 1,
        database=database,
    )
    await ca.start()
    try:

        def reload() -> None:
            status("reloaded" if ca.reload() else f"reload-failed {ca.reload_error}")

        def supervisor_gone() -> None:
            if not os.read(0, 4096):  # end of file: the supervisor has gone
                loop.remove_reader(0)
                log.warning("the supervisor has gone: stopping")
                stop.set()

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        loop.add_reader(0, supervisor_gone)
        status("ready")
        await stop.wait()
        log.info("stopping")
    finally:
        await ca.stop()


def worker_main(argv: Sequence[str] | None = None) -> int:
    """A worker process (started by ``Supervisor``, not by hand)."""
    parser = argparse.ArgumentParser(prog="federatls-ca-worker")
    parser.add_argument("config", type=Path)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--sockets", required=True)
    parser.add_argument("--status", type=int, required=True)
    parser.add_argument("--started-at", type=datetime.fromisoformat, required=True)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {args.index}, pid {os.getpid()}]: "
        "%(message)s",
    )
    logging.getLogger("federatls").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NotTheReadyLine())
    with open(args.status, "w", buffering=1, closefd=True) as status_file:

        def status(line: str) -> None:
            status_file.write(" ".join(line.split()) + "\n")

        try:
            password, database = _read_settings(0)
            sockets = [socket.socket(fileno=int(fd)) for fd in args.sockets.split(",")]
            asyncio.run(
                _work(args.config, password, sockets, args.started_at, args.index, status, database)
            )
        except FederatlsError as exc:
            status(f"error {exc}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
