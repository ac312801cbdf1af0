"""A throwaway PostgreSQL 15 cluster for tests and benchmarks: initdb into a temporary
directory, served on 127.0.0.1 (a free port) and a unix socket inside that directory, with
fsync on as in production. Not part of the library; nothing here is mocked.

PostgreSQL refuses to run as root: when the tests run as root, the cluster's files belong to
``nobody`` and initdb, pg_ctl and the server run as that user (``runuser``). A watchdog
process stops the cluster and removes its directory if the process that started it dies
without doing so (a killed pytest leaves no server listening).

    with PostgresCluster.started() as pg:
        url = pg.new_database()          # postgresql://federatls:...@127.0.0.1:PORT/db_1
        app = pg.new_role("replica", url)  # may read and write, may not CREATE

Roles made by ``new_role`` may SELECT, INSERT, UPDATE and DELETE on every table of the
database's ``public`` schema, those created later by the superuser included (``ALTER DEFAULT
PRIVILEGES``), and may not create anything in it (PostgreSQL 15 no longer grants CREATE on
``public`` to every role): how replicas run against a schema made by ``federatls ca db init``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

__all__ = ["PostgresCluster", "PostgresUnavailable", "find_bindir"]

SUPERUSER = "federatls"
DEBIAN_BINDIR = Path("/usr/lib/postgresql/15/bin")


class PostgresUnavailable(Exception):
    """No PostgreSQL 15 server binaries on this machine."""


def find_bindir() -> Path:
    """Where initdb, pg_ctl and postgres are: Debian's PostgreSQL 15 directory, else
    ``pg_config --bindir``; PostgresUnavailable when neither has them."""
    candidates = [DEBIAN_BINDIR]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, check=True)
            candidates.append(Path(out.stdout.decode().strip()))
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL 15 server binaries not found (/usr/lib/postgresql/15/bin or pg_config "
        "--bindir): apt-get install postgresql-15 (.ci/run does it)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Watches its parent through a pipe: when the pipe closes without "done" (the parent died),
# it stops the cluster at once and removes its directory.
_WATCHDOG = """
import shutil, subprocess, sys
pg_ctl, data, base, *prefix = sys.argv[1:]
if sys.stdin.read() != "done":
    subprocess.run([*prefix, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"],
                   capture_output=True)
    shutil.rmtree(base, ignore_errors=True)
"""


class PostgresCluster:
    """One PostgreSQL cluster in a temporary directory, owned by this object: ``started()``
    makes and starts it; ``stop()`` and ``start()`` (same port, same data) and ``kill()``
    (SIGKILL to the postmaster) are for fault tests; ``close()`` stops it for good and
    removes its files."""

    def __init__(self, bindir: Path | None = None, *, shared_buffers: str = "32MB") -> None:
        self.bindir = bindir if bindir is not None else find_bindir()
        self.password = secrets.token_hex(16)
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        # As root, under /tmp: ``nobody`` must be able to reach the directory, and TMPDIR may
        # be private to root.
        parent = "/tmp" if self._as_root and Path("/tmp").is_dir() else None
        self._base = Path(tempfile.mkdtemp(prefix="federatls-pg-", dir=parent))
        self.data = self._base / "data"
        self.socket_dir = self._base / "run"
        self.log_path = self._base / "server.log"
        self._prefix = ["runuser", "-u", "nobody", "--"] if self._as_root else []
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._running = False
        self._closed = False
        self._watchdog: subprocess.Popen[str] | None = None
        self.init_seconds = 0.0  # initdb, for reports
        self.start_seconds = 0.0  # the first start, for reports
        try:
            self._initdb(shared_buffers)
        except BaseException:
            shutil.rmtree(self._base, ignore_errors=True)
            raise

    @classmethod
    @contextlib.contextmanager
    def started(cls, bindir: Path | None = None) -> Iterator[PostgresCluster]:
        """A running cluster for the block; stopped and removed after it, whatever happens."""
        cluster = cls(bindir)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.close()

    @property
    def admin_url(self) -> str:
        """The superuser's URL for the ``postgres`` database."""
        return self.url(SUPERUSER, self.password, "postgres")

    def url(self, user: str, password: str, database: str) -> str:
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@127.0.0.1:{self.port}/{quote(database, safe='')}"
        )

    def _run(self, *args: str | Path, timeout: float = 120.0) -> None:
        cmd = [*self._prefix, *(str(a) for a in args)]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {output}")

    def _initdb(self, shared_buffers: str) -> None:
        self.socket_dir.mkdir()
        pwfile = self._base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            for path in (self._base, self.socket_dir, pwfile):
                os.chown(path, *_nobody())
        started = time.monotonic()
        self._run(
            self.bindir / "initdb",
            "-D",
            self.data,
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        )
        self.init_seconds = time.monotonic() - started
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# tests/postgres.py\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
                f"shared_buffers = {shared_buffers}\n"
                "max_connections = 100\n"
            )
        watchdog_argv = [sys.executable, "-c", _WATCHDOG, str(self.bindir / "pg_ctl")]
        watchdog_argv += [str(self.data), str(self._base), *self._prefix]
        self._watchdog = subprocess.Popen(
            watchdog_argv, stdin=subprocess.PIPE, text=True, start_new_session=True
        )

    def start(self) -> None:
        """Start the server (same port, same data) and wait until it accepts connections."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the cluster is closed")
            if self._running:
                return
            started = time.monotonic()
            for attempt in range(3):
                try:
                    self._run(
                        self.bindir / "pg_ctl", "-D", self.data, "-l", self.log_path, "-w",
                        "-t", "90", "start",
                    )  # fmt: skip
                    break
                except RuntimeError:
                    # The free port was taken meanwhile (a busy machine): before the first
                    # start only, another one will do.
                    log = (
                        self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                    )
                    if self.start_seconds or attempt == 2 or "could not bind" not in log:
                        raise
                    self.port = _free_port()
                    with (self.data / "postgresql.conf").open("a") as conf:
                        conf.write(f"port = {self.port}\n")
            if not self.start_seconds:
                self.start_seconds = time.monotonic() - started
            self._running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect every client, then a clean shutdown;
        ``immediate``: no shutdown checkpoint, as a crash)."""
        with self._lock:
            if not self._running:
                return
            self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")
            self._running = False

    def kill(self) -> None:
        """SIGKILL the postmaster, as a machine losing power would stop it; its backends
        exit by themselves, and ``start()`` recovers from the write-ahead log."""
        with self._lock:
            if not self._running:
                return
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)
            self._running = False
        self._wait_backends_gone()

    def freeze(self) -> list[int]:
        """SIGSTOP the postmaster and every process it started: a server that stalls without
        closing its connections (its kernel still accepts and acknowledges). Returns the
        stopped pids, for ``thaw``."""
        main = int((self.data / "postmaster.pid").read_text().split()[0])
        pids = [main]
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = proc.joinpath("stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == main:
                        pids.append(int(proc.name))
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    @staticmethod
    def thaw(pids: list[int]) -> None:
        """SIGCONT what ``freeze`` stopped."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _wait_backends_gone(self) -> None:
        """After a SIGKILL, backends notice their postmaster is gone and exit; a start before
        they have would find the old shared memory still in use."""
        deadline = time.monotonic() + 30
        data = str(self.data)
        while time.monotonic() < deadline:
            alive = False
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                with contextlib.suppress(OSError):
                    if proc.joinpath("cmdline").read_bytes().startswith(b"postgres:") and (
                        proc.joinpath("cwd").resolve() == Path(data).resolve()
                    ):
                        alive = True
                        break
            if not alive:
                return
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self._running

    def close(self) -> None:
        """Stop the server (immediately: its data is thrown away) and remove its files."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._running:
                with self._lock:
                    self._run(
                        self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"
                    )
                    self._running = False
        finally:
            if self._watchdog is not None:
                with contextlib.suppress(OSError):
                    assert self._watchdog.stdin is not None
                    self._watchdog.stdin.write("done")
                    self._watchdog.stdin.close()
                self._watchdog.wait(timeout=30)
            shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def admin(self, database: str = "postgres") -> psycopg.Connection[TupleRow]:
        """A superuser connection (autocommit) to ``database``."""
        return psycopg.connect(
            self.url(SUPERUSER, self.password, database), autocommit=True, connect_timeout=10
        )

    def new_database(self) -> str:
        """A fresh, empty database (owned by the superuser); its superuser URL."""
        name = f"db_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(SUPERUSER, self.password, name)

    def new_role(self, name: str, database_url: str) -> str:
        """A LOGIN role with a password that may read and write every table of the database's
        ``public`` schema, present and future (those the superuser creates), and may create
        nothing; its URL for that database."""
        database = urlsplit(database_url).path.lstrip("/")
        password = secrets.token_hex(12)
        role = sql.Identifier(name)
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password))
            )
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), role)
            )
        with self.admin(database) as conn:
            conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
            conn.execute(
                sql.SQL(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}"
                ).format(role)
            )
            conn.execute(
                sql.SQL(
                    "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public"
                    " GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}"
                ).format(sql.Identifier(SUPERUSER), role)
            )
        return self.url(name, password, database)


def _nobody() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def session_cluster() -> Iterator[PostgresCluster]:
    """The pytest session's cluster: skipped when PostgreSQL is not installed, a failure
    instead when FEDERATLS_REQUIRE_POSTGRES=1 (.ci/run)."""
    import pytest

    try:
        bindir = find_bindir()
    except PostgresUnavailable as exc:
        if os.environ.get("FEDERATLS_REQUIRE_POSTGRES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with PostgresCluster.started(bindir) as cluster:
        yield cluster
