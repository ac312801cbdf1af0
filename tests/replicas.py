"""Test harness for CA replicas: several ``federatls ca serve`` processes on one CA directory
(one ca.json, its keys) and one database, each on its own loopback port with its own server
certificate for the same names; a TCP balancer that gives them one address (TLS passed
through); and a bounded concurrent load that records every answer.

What the replicas share is the database; what each keeps is its process. Faults (SIGTERM,
kill -9) are made to the processes here; the database's own faults belong to
``tests/postgres.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federatls._client import client_tls_context
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import error_message
from federatls._x509 import load_pem_certificate

from harness import PKI

SUBJECT = "svc.replicas.internal"
# What every client of the cluster dials: the replicas' server certificates all carry it
# (ca.json's dnsNames), whatever port (replica) is behind it.
NAME = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds for a replica to print its ready line on a loaded machine


@dataclass
class Replica:
    """One ``federatls ca serve`` process of the cluster, and where its output goes."""

    index: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    starts: int = 0

    @property
    def stdout(self) -> Path:
        return self.directory / f"replica{self.index}.out"

    @property
    def stderr(self) -> Path:
        return self.directory / f"replica{self.index}.err"

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """N replicas of the CA made by ``pki`` (``federatls ca init``), sharing ``db`` (a
    PostgreSQL URL passed with ``--db``; None: the SQLite file beside ca.json). ca.json's
    address is ``127.0.0.1:0``: each process binds a free port and prints its URL."""

    def __init__(self, pki: PKI, count: int, *, db: str | None = None) -> None:
        self.pki = pki
        self.db = db
        self.replicas = [Replica(i, pki.directory) for i in range(count)]
        # Tokens name the cluster (one name), not a replica: audiences match without ports.
        pki.url = f"https://{NAME}"

    def __getitem__(self, i: int) -> Replica:
        return self.replicas[i]

    def urls(self) -> list[str]:
        """The URLs of the replicas serving now (running, and ready since their start)."""
        return [r.url for r in self.replicas if r.running and r.url]

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "federatls", "ca", "serve", str(self.pki.config)]
        command += ["--password-file", str(self.pki.password_file)]
        return command + (["--db", self.db] if self.db is not None else [])

    def _spawn(self, replica: Replica) -> None:
        assert not replica.running, f"replica {replica.index} is running"
        replica.url = ""
        replica.starts += 1
        with replica.stdout.open("wb") as out, replica.stderr.open("ab") as err:
            replica.proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )

    async def _ready(self, replica: Replica) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        assert replica.proc is not None
        while True:
            line = replica.stdout.read_text(errors="replace")
            if line.startswith("Serving HTTPS on ") and line.endswith("\n"):
                replica.url = line.split()[3]
                assert replica.url.startswith(f"https://{NAME}:"), line
                return
            if replica.proc.poll() is not None:
                raise RuntimeError(
                    f"replica {replica.index} exited with {replica.proc.returncode}: "
                    + replica.log()[-3000:]
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.index} did not serve in {START_TIMEOUT}s")
            await asyncio.sleep(0.05)

    async def start(self, *indexes: int) -> None:
        """Start these replicas (all when none are named) and wait until each serves."""
        chosen = [self.replicas[i] for i in indexes] if indexes else self.replicas
        for replica in chosen:
            self._spawn(replica)
        for replica in chosen:
            await self._ready(replica)

    async def stop(self, i: int, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` to replica ``i`` and wait for it to exit; its exit status."""
        replica = self.replicas[i]
        proc = replica.proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"replica {i} did not stop in {timeout}s on signal {sig}")
            await asyncio.sleep(0.05)
        return proc.returncode

    async def kill(self, i: int) -> None:
        """kill -9: no chance to finish anything."""
        await self.stop(i, signal.SIGKILL)

    async def restart(self, i: int) -> None:
        code = await self.stop(i)
        assert code == 0, f"replica {i} exited with {code}: {self.replicas[i].log()[-2000:]}"
        await self.start(i)

    def close(self) -> None:
        """Stop every replica still running (SIGTERM, then SIGKILL after a while)."""
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.terminate()
        for replica in self.replicas:
            if replica.proc is None:
                continue
            try:
                replica.proc.wait(30)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait()

    # Clients -------------------------------------------------------------------------------
    def client(
        self,
        *,
        identity: tuple[Sequence[x509.Certificate], PrivateKey] | None = None,
        connections: int = 64,
        timeout: float = 60.0,
    ) -> httpx.AsyncClient:
        """One client for the whole cluster: the same root and name whatever replica it
        dials; ``identity`` for mTLS."""
        return httpx.AsyncClient(
            verify=client_tls_context([self.pki.root], identity),
            timeout=timeout,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )


@contextlib.asynccontextmanager
async def cluster(pki: PKI, count: int, *, db: str | None = None) -> AsyncIterator[Cluster]:
    """``count`` replicas started and serving; all stopped when the block ends."""
    made = Cluster(pki, count, db=db)
    try:
        await made.start()
        yield made
    finally:
        made.close()


class Balancer:
    """One address in front of the cluster, as a TCP load balancer gives it: each
    connection is passed, bytes as they are (TLS through, not ended), to the next serving
    replica in turn. ``served`` counts the connections each replica got."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.served: Counter[str] = Counter()
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, NAME, 0)
        self.url = f"https://{NAME}:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        urls = self.cluster.urls()
        self._turn += 1
        url = urls[self._turn % len(urls)]
        port = int(url.rsplit(":", 1)[1])
        try:
            up_reader, up_writer = await asyncio.open_connection(NAME, port)
        except OSError:
            writer.close()
            return
        self.served[url] += 1
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._pipes.discard(task)
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


# Requests and their answers -------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """What one request got: the replica's URL, the status (0: no HTTP answer at all, the
    connection failed), the certificate's serial for a 201, the body otherwise."""

    url: str
    status: int
    serial: int | None = None
    body: Any = None
    error: str = ""

    @property
    def step_body(self) -> bool:
        """Whether the body is step-ca's error body for the status."""
        return bool(self.body == {"status": self.status, "message": error_message(self.status)})


def _csr_pem(subject: str) -> str:
    csr = build_csr(new_private_key(), subject, [subject])
    return csr.public_bytes(serialization.Encoding.PEM).decode()


CSR = _csr_pem(SUBJECT)


def leaf_of(response: httpx.Response) -> x509.Certificate:
    return load_pem_certificate(response.json()["crt"].encode())


def chain_of(response: httpx.Response) -> list[x509.Certificate]:
    data = response.json()
    return [load_pem_certificate(p.encode()) for p in data["certChain"]]


def answer_of(url: str, response: httpx.Response) -> Answer:
    if response.status_code in (200, 201):
        return Answer(url, response.status_code, leaf_of(response).serial_number)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return Answer(url, response.status_code, body=body)


async def sign(client: httpx.AsyncClient, url: str, token: str, csr: str = CSR) -> Answer:
    """POST /1.0/sign; a failed connection is an Answer with status 0."""
    try:
        response = await client.post(url + "/1.0/sign", json={"csr": csr, "ott": token})
    except httpx.HTTPError as exc:
        return Answer(url, 0, error=f"{type(exc).__name__}: {exc}")
    return answer_of(url, response)


@dataclass(repr=False)
class Load:
    """A bounded concurrent sign load over whatever replicas ``targets()`` names at each
    request (round robin), each request with a fresh token (or the next of ``tokens``).
    Every answer is kept, in order of arrival."""

    cluster: Cluster
    targets: Callable[[], Sequence[str]]
    concurrency: int = 8
    tokens: Iterator[str] | None = None
    pause: float = 0.0  # seconds each worker waits after an answer (keeps the load bounded)
    # The statuses the test expects: ``wait_for`` fails as soon as another one arrives.
    expect: frozenset[int] | None = None
    answers: list[Answer] = field(default_factory=list)
    _turn: int = 0

    def _next_url(self) -> str | None:
        urls = self.targets()
        if not urls:
            return None
        self._turn += 1
        return urls[self._turn % len(urls)]

    def _token(self) -> str | None:
        if self.tokens is None:
            return self.cluster.pki.token(SUBJECT)
        return next(self.tokens, None)

    async def run(self, *, total: int | None = None, until: asyncio.Event | None = None) -> None:
        """Send ``total`` requests, or until ``until`` is set (and no more tokens), with at
        most ``concurrency`` in flight."""
        sent = 0
        lock = asyncio.Lock()

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal sent
            while True:
                async with lock:
                    if (total is not None and sent >= total) or (until and until.is_set()):
                        return
                    token = self._token()
                    if token is None:
                        return
                    sent += 1
                url = self._next_url()
                if url is None:
                    await asyncio.sleep(0.05)
                    continue
                self.answers.append(await sign(client, url, token))
                if self.pause:
                    await asyncio.sleep(self.pause)

        async with self.cluster.client(connections=self.concurrency) as client:
            await asyncio.gather(*(worker(client) for _ in range(self.concurrency)))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        """Run the load in the background during the block; stop it (and wait) at its end."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.run(until=stop))
        try:
            yield self
        finally:
            stop.set()
            await asyncio.wait_for(task, 120)

    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.answers)

    def serials(self) -> list[int]:
        return [a.serial for a in self.answers if a.serial is not None]

    async def wait_for(
        self, count: int, status: int = 201, *, url: str | None = None, timeout: float = 60.0
    ) -> None:
        """Wait until ``count`` more answers with ``status`` (from ``url``, if given) have
        arrived."""

        def seen() -> int:
            return sum(1 for a in self.answers if a.status == status and url in (None, a.url))

        goal = seen() + count
        deadline = time.monotonic() + timeout
        while seen() < goal:
            if self.expect is not None and not set(self.statuses()) <= self.expect:
                raise AssertionError(f"unexpected answers: {self!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} more {status}s in {timeout}s: {self!r}")
            await asyncio.sleep(0.05)

    def __repr__(self) -> str:
        failed = [a for a in self.answers if a.status not in (200, 201)][:2]
        return f"load answers {dict(self.statuses())}, first failures {failed}"


def fresh_tokens(pki: PKI, *, issued: datetime | None = None) -> Iterator[str]:
    """Tokens the cluster has never seen, minted on demand, all issued at ``issued`` (now
    by default) and valid for ten minutes from then."""
    now = issued or datetime.now(UTC)
    while True:
        yield pki.token(SUBJECT, now=now, validity=timedelta(minutes=10))


# The database, read from outside the CA ------------------------------------------------------
def db_rows(where: Cluster | str, query: str) -> list[tuple[Any, ...]]:
    """Run one read-only query on a cluster's database (PostgreSQL or the SQLite file
    beside ca.json), or on the PostgreSQL database at URL ``where``."""
    url = where if isinstance(where, str) else where.db
    if url is None:
        assert isinstance(where, Cluster)
        with contextlib.closing(sqlite3.connect(where.pki.config.parent / "federatls.db")) as c:
            return list(c.execute(query).fetchall())
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        return [tuple(row) for row in conn.execute(query).fetchall()]


def recorded_serials(where: Cluster | str) -> set[int]:
    return {int(row[0]) for row in db_rows(where, "SELECT serial FROM certificates")}


def count(where: Cluster | str, table: str) -> int:
    return int(db_rows(where, f"SELECT count(*) FROM {table}")[0][0])  # noqa: S608
