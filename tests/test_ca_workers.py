"""`federatls ca serve --workers N`: real worker processes started through the command line,
sharing one port and one SQLite database; which process answered a connection is read from
/proc (the worker that holds the server side of the TCP connection)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from federatls._keys import build_csr, new_private_key
from federatls._protocol import SignRequest
from federatls._x509 import certs_to_pem
from federatls.ca import Database, SQLiteStore, init_schema, open_store

from harness import PKI, federatls, make_pki, spawn_serve
from postgres import PostgresCluster

pytestmark = pytest.mark.anyio


@dataclass
class Supervised:
    """A running `federatls ca serve --workers N` and everything it wrote on stderr."""

    process: asyncio.subprocess.Process
    url: str
    lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    def workers(self) -> list[int]:
        """The supervisor's child processes now (its workers)."""
        pid = self.process.pid
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]

    async def logged(self, pattern: str, *, after: int = 0, timeout: float = 60) -> re.Match[str]:
        """The first stderr line from index ``after`` on matching ``pattern`` (waited for)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[after:]:
                if found := re.search(pattern, line):
                    return found
            if time.monotonic() > deadline or self.process.returncode is not None:
                raise AssertionError(f"no line matches {pattern!r}:\n" + "\n".join(self.lines))
            await asyncio.sleep(0.05)


async def _collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode(errors="replace").rstrip("\n"))


@contextlib.asynccontextmanager
async def supervised(
    pki: PKI, workers: int = 2, *, db: str | None = None
) -> AsyncIterator[Supervised]:
    """`federatls ca serve CONFIG --workers N [--db URL]` until the block ends (then SIGTERM,
    and kill whatever is left); ``pki.url`` points at it."""
    process = await spawn_serve(
        pki, "--workers", str(workers), *(["--db", db] if db is not None else [])
    )
    assert process.stdout is not None
    assert process.stderr is not None
    lines: list[str] = []
    reader = asyncio.create_task(_collect(process.stderr, lines))
    started: list[int] = []
    try:
        ready = (await asyncio.wait_for(process.stdout.readline(), 90)).decode()
        found = re.match(r"Serving HTTPS on (https://\S+) ", ready)
        assert found, (ready, lines)
        pki.url = found.group(1)
        supervisor = Supervised(process, pki.url, lines)
        started = supervisor.workers()
        yield supervisor
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                started += Supervised(process, "", lines).workers()
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(reader, 30)


def _tls(pki: PKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.root_path))


def _answered_by(pki: PKI, port: int, candidates: Sequence[int]) -> int | None:
    """GET /health on a new connection; the process among ``candidates`` that holds the
    server side of that connection once it has answered (None if none of them)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        client_port = raw.getsockname()[1]
        with _tls(pki).wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while b'"ok"' not in answer:
                chunk = conn.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer
            inode = _server_socket_inode(port, client_port)
            for pid in candidates:
                with contextlib.suppress(FileNotFoundError):
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        with contextlib.suppress(FileNotFoundError):
                            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                                return pid
    return None


def _server_socket_inode(port: int, client_port: int) -> str:
    """The inode of the server's end of 127.0.0.1:client_port -> 127.0.0.1:port."""
    local, remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return fields[9]
    raise AssertionError(f"no server socket for client port {client_port}")


async def _pids_answering(
    pki: PKI, ca: Supervised, want: set[int], *, most: int = 300
) -> dict[int, int]:
    """How many of up to ``most`` new connections each process answered, stopping once
    every process in ``want`` has answered at least one."""
    seen: dict[int, int] = {}
    candidates = sorted({ca.process.pid, *want, *ca.workers()})
    for _ in range(most):
        pid = await asyncio.to_thread(_answered_by, pki, ca.port, candidates)
        assert pid is not None, "no candidate process holds the connection"
        seen[pid] = seen.get(pid, 0) + 1
        if want <= seen.keys():
            break
    return seen


def _sign_body(token: str, subject: str) -> dict[str, object]:
    key = new_private_key()
    return SignRequest(build_csr(key, subject, [subject]), token).to_json()


async def _sign_all(pki: PKI, tokens: Sequence[str], subject: str) -> list[int]:
    """Each token (all for ``subject``) sent at once on its own new connection; the
    status codes."""
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=len(tokens))
    bodies = [_sign_body(token, subject) for token in tokens]
    async with httpx.AsyncClient(verify=_tls(pki), limits=limits, timeout=60) as http:
        answers = await asyncio.gather(*(http.post(pki.url + "/sign", json=b) for b in bodies))
    return [a.status_code for a in answers]


async def _federation_sizes(pki: PKI, count: int) -> list[int]:
    """How many roots /federation lists, on ``count`` new connections."""
    sizes = []
    for _ in range(count):
        async with httpx.AsyncClient(verify=_tls(pki), timeout=30) as http:
            answer = await http.get(pki.url + "/federation")
        assert answer.status_code == 201, answer.text
        sizes.append(len(answer.json()["crts"]))
    return sizes


def _worker_of(line: str) -> str:
    found = re.search(r"\[worker (\d+), pid \d+\]", line)
    return found.group(1) if found else ""


# ----------------------------------------------------------------------------------------------
async def test_two_workers_both_answer(pki: PKI) -> None:
    """With --workers 2, connections to the one port are answered by both worker processes,
    neither of which is the supervisor."""
    async with supervised(pki, 2) as ca:
        workers = ca.workers()
        assert len(workers) == 2
        seen = await _pids_answering(pki, ca, set(workers))
        assert set(seen) == set(workers), (seen, workers)
        assert ca.process.pid not in seen


async def test_one_worker_is_the_process_itself(pki: PKI) -> None:
    """Twin: with --workers 1 (the default) the CA is one process, with no children, and it
    answers every connection itself."""
    async with supervised(pki, 1) as ca:
        assert ca.workers() == []
        for _ in range(10):
            pid = await asyncio.to_thread(_answered_by, pki, ca.port, [ca.process.pid])
            assert pid == ca.process.pid


async def test_a_token_copied_across_workers_is_spent_once(pki: PKI) -> None:
    """Twenty copies of one token sent at once, spread over two workers: exactly one 201,
    nineteen 401s and one record, storm after storm, until a storm reached both workers."""
    async with supervised(pki, 2) as ca:
        for storm in range(1, 11):
            before = len(ca.lines)
            token = pki.token(f"storm-{storm}.internal")
            codes = await _sign_all(pki, [token] * 20, f"storm-{storm}.internal")
            assert sorted(codes) == [201] + [401] * 19, codes
            await ca.logged("token already used", after=before)
            await asyncio.sleep(0.2)  # the last refusals' lines
            workers = {
                _worker_of(line)
                for line in ca.lines[before:]
                if "token already used" in line or "signed /sign" in line
            }
            if workers == {"1", "2"}:
                break
        else:
            raise AssertionError("no storm reached both workers")
    store = SQLiteStore(pki.config.parent / "federatls.db")
    try:
        assert store.counts()["used_tokens"] == storm
        assert store.counts()["certificates"] == storm
    finally:
        store.close()


async def test_distinct_tokens_across_workers_are_all_signed(pki: PKI) -> None:
    """Twin: twenty different tokens sent at once to two workers: twenty 201s, twenty
    records (the shared database's write lock makes no request fail)."""
    async with supervised(pki, 2):
        tokens = [pki.token("many.internal") for _ in range(20)]
        codes = await _sign_all(pki, tokens, "many.internal")
        assert codes == [201] * 20, codes
    store = SQLiteStore(pki.config.parent / "federatls.db")
    try:
        assert store.counts()["certificates"] == 20
    finally:
        store.close()


async def test_workers_serve_the_database_given_by_db(pki: PKI, postgres: PostgresCluster) -> None:
    """With ``--db``, every worker serves from that PostgreSQL database, whose URL (and
    password) reaches them on their standard input, never in their argv. Twin: nothing is
    written to the SQLite file beside ca.json (workers that ignored --db would fill it)."""
    url = postgres.new_database()
    init_schema(Database.postgresql(url))
    async with supervised(pki, 2, db=url) as ca:
        for pid in ca.workers():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert postgres.password.encode() not in argv
            assert b"postgresql" not in argv
        tokens = [pki.token("pg-workers.internal") for _ in range(12)]
        codes = await _sign_all(pki, tokens, "pg-workers.internal")
        assert codes == [201] * 12, codes
    store = open_store(Database.postgresql(url))
    try:
        assert store.counts()["certificates"] == 12
    finally:
        store.close()
    assert not (pki.config.parent / "federatls.db").exists()


async def test_sighup_reloads_every_worker(pki: PKI, tmp_path: Path) -> None:
    """SIGHUP to the supervisor: every worker re-reads ca.json, so every one of many new
    connections sees the federated root added to it."""
    other = make_pki(tmp_path, "kubernetes")
    async with supervised(pki, 2) as ca:
        assert await _federation_sizes(pki, 4) == [1] * 4
        pki.federate(other)
        before = len(ca.lines)
        ca.process.send_signal(signal.SIGHUP)
        await ca.logged(r"configuration reloaded in all 2 worker\(s\)", after=before)
        reloaded = {_worker_of(line) for line in ca.lines[before:] if "reloaded from" in line}
        assert reloaded == {"1", "2"}
        assert await _federation_sizes(pki, 20) == [2] * 20


async def test_sighup_reloads_a_federated_roots_bundle_in_every_worker(
    pki: PKI, tmp_path: Path
) -> None:
    """A `federatedRoots` file holding two roots (a bundle, step-ca 0.23) is served whole by
    every worker; after a third root joins the file, SIGHUP makes every worker serve it
    (and before the SIGHUP none does)."""
    kube, edge, extra = (make_pki(tmp_path, name) for name in ("kubernetes", "edge", "extra"))
    bundle = tmp_path / "federated.pem"
    bundle.write_text(certs_to_pem([kube.root, edge.root]))
    pki.edit(lambda d: d.__setitem__("federatedRoots", [str(bundle)]))
    async with supervised(pki, 2) as ca:
        assert await _federation_sizes(pki, 8) == [3] * 8
        bundle.write_text(certs_to_pem([kube.root, edge.root, extra.root]))
        assert await _federation_sizes(pki, 4) == [3] * 4
        before = len(ca.lines)
        ca.process.send_signal(signal.SIGHUP)
        await ca.logged(r"configuration reloaded in all 2 worker\(s\)", after=before)
        assert await _federation_sizes(pki, 20) == [4] * 20


async def test_sighup_with_a_broken_config_keeps_every_worker_running(pki: PKI) -> None:
    """Twin: SIGHUP after ca.json was broken: the supervisor logs that the reload failed in
    both workers, and every new connection still gets the running configuration."""
    async with supervised(pki, 2) as ca:
        pki.config.write_text('{"root": ')
        before = len(ca.lines)
        ca.process.send_signal(signal.SIGHUP)
        found = await ca.logged(r"reload failed in (\d) of 2 worker\(s\)", after=before)
        assert found.group(1) == "2", ca.lines[before:]
        assert await _federation_sizes(pki, 20) == [1] * 20
        async with httpx.AsyncClient(verify=_tls(pki)) as http:
            assert (await http.get(pki.url + "/health")).status_code == 200


async def test_sigterm_stops_every_worker(pki: PKI) -> None:
    """SIGTERM to the supervisor: it exits 0 and no worker is left."""
    async with supervised(pki, 2) as ca:
        workers = ca.workers()
        assert len(workers) == 2
        ca.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(ca.process.wait(), 60) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists(), pid
        await ca.logged(r"stopping 2 workers")


async def test_sigterm_lets_a_running_request_finish(pki: PKI) -> None:
    """A sign request that is running when the supervisor gets SIGTERM (its commit waits for
    the database, locked by the test): new connections are refused from then on, the
    request is answered 201 once the lock is released, and the supervisor then exits 0."""
    async with supervised(pki, 2) as ca:
        body = json.dumps(_sign_body(pki.token("late.internal"), "late.internal")).encode()
        lock = sqlite3.connect(pki.config.parent / "federatls.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", ca.port, ssl=_tls(pki), server_hostname="127.0.0.1"
            )
            head = (
                "POST /sign HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            await asyncio.sleep(1.0)  # the worker has the request; its commit waits
            ca.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 1.5
            while True:
                try:
                    socket.create_connection(("127.0.0.1", ca.port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, "new connections still accepted"
                await asyncio.sleep(0.02)
            assert ca.process.returncode is None
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
        assert await asyncio.wait_for(ca.process.wait(), 60) == 0


async def test_a_killed_supervisor_leaves_no_worker(pki: PKI) -> None:
    """Twin: the supervisor killed with SIGKILL cannot stop its workers; each sees its
    supervisor gone (the end of its input pipe), says so and stops by itself."""
    async with supervised(pki, 2) as ca:
        workers = ca.workers()
        ca.process.kill()
        await ca.process.wait()
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, "workers still running"
            await asyncio.sleep(0.1)
        await ca.logged(r"the supervisor has gone: stopping")


async def test_a_killed_worker_is_restarted(pki: PKI) -> None:
    """kill -9 of a worker: requests made at once are answered by the other worker (the
    accept queue is shared), the supervisor logs the death with its pid and signal, starts
    a new worker that answers connections, and no request after the restart fails."""
    async with supervised(pki, 2) as ca:
        victim, survivor = ca.workers()
        before = len(ca.lines)
        os.kill(victim, signal.SIGKILL)
        tokens = [pki.token("meanwhile.internal") for _ in range(10)]
        assert await _sign_all(pki, tokens, "meanwhile.internal") == [201] * 10
        await ca.logged(
            rf"worker \d \(pid {victim}\) was killed by signal 9 \(SIGKILL\); restarting",
            after=before,
        )
        found = await ca.logged(r"worker \d \(pid (\d+)\) serves again", after=before)
        fresh = int(found.group(1))
        assert set(ca.workers()) == {survivor, fresh}
        seen = await _pids_answering(pki, ca, {fresh})
        assert fresh in seen, seen
        tokens = [pki.token("after.internal") for _ in range(10)]
        assert await _sign_all(pki, tokens, "after.internal") == [201] * 10


async def test_a_restarted_worker_accepts_tokens_issued_since_the_supervisor_started(
    pki: PKI,
) -> None:
    """A token issued after the supervisor started but before both workers were killed and
    restarted is accepted: the workers use the supervisor's start time, not their own."""
    async with supervised(pki, 2) as ca:
        token = pki.token("fresh.internal")
        await asyncio.sleep(1.1)  # the restarted workers start in a later second
        before = len(ca.lines)
        for pid in ca.workers():
            os.kill(pid, signal.SIGKILL)
        for index in ("1", "2"):
            await ca.logged(rf"worker {index} \(pid \d+\) serves again", after=before)
        assert await _sign_all(pki, [token], "fresh.internal") == [201]


async def test_a_restarted_worker_refuses_tokens_from_before_the_supervisor_started(
    pki: PKI,
) -> None:
    """Twin: a token issued before the supervisor started is refused by a restarted worker
    too (step-ca's rule), with step-ca's reason in the log."""
    minted = datetime.now(UTC) - timedelta(seconds=30)
    async with supervised(pki, 2) as ca:
        token = pki.token("stale.internal", now=minted, validity=timedelta(minutes=10))
        before = len(ca.lines)
        for pid in ca.workers():
            os.kill(pid, signal.SIGKILL)
        for index in ("1", "2"):
            await ca.logged(rf"worker {index} \(pid \d+\) serves again", after=before)
        assert await _sign_all(pki, [token], "stale.internal") == [401]
        await ca.logged("token issued before the bootstrap", after=before)


async def test_a_worker_that_cannot_start_is_retried_with_a_pause(pki: PKI) -> None:
    """A worker killed while ca.json is broken cannot start: each attempt is one error line
    with the reason and a growing pause, the other worker serves meanwhile, and the worker
    comes back once ca.json is mended."""
    async with supervised(pki, 2) as ca:
        good = pki.config.read_text()
        victim, survivor = ca.workers()
        pki.config.write_text("{")
        before = len(ca.lines)
        os.kill(victim, signal.SIGKILL)
        first = await ca.logged(
            r"worker \d could not start \(1 time\(s\) in a row\): .*; next attempt in ([\d.]+) s",
            after=before,
        )
        second = await ca.logged(
            r"could not start \(2 time\(s\) in a row\): .*; next attempt in ([\d.]+) s",
            after=before,
        )
        assert float(second.group(1)) == 2 * float(first.group(1))
        assert await _pids_answering(pki, ca, {survivor}, most=3) == {survivor: 1}
        pki.config.write_text(good)
        await ca.logged(r"worker \d \(pid \d+\) serves again", after=before, timeout=90)
        assert len(ca.workers()) == 2


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", "129", "1000000000000"])
async def test_bad_worker_counts_are_usage_errors(pki: PKI, value: str) -> None:
    """--workers must be a whole number from 1 to 128: anything else is one line, exit 2,
    and nothing starts."""
    run = await federatls(
        "ca", "serve", pki.config, "--password-file", pki.password_file, f"--workers={value}"
    )
    assert run.code == 2, run
    assert run.out == ""
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert "--workers" in lines[0], run.err
    assert "from 1 to 128" in lines[0], run.err


async def test_a_wrong_password_stops_the_supervisor_before_any_worker(
    pki: PKI, tmp_path: Path
) -> None:
    """A wrong password with --workers 2: one error line, exit 1, no worker started."""
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the password\n")
    run = await federatls("ca", "serve", pki.config, "--password-file", wrong, "--workers", "2")
    assert run.code == 1, run
    assert run.err.splitlines() == [run.err.strip()], run.err
    assert "cannot decrypt intermediate key" in run.err
    assert "worker" not in run.err


async def test_a_busy_port_stops_the_supervisor_before_any_worker(pki: PKI) -> None:
    """A port someone else listens on, with --workers 2: one error line, exit 1."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        pki.edit(lambda d: d.__setitem__("address", f"127.0.0.1:{port}"))
        run = await federatls(
            "ca", "serve", pki.config, "--password-file", pki.password_file, "--workers", "2"
        )
    assert run.code == 1, run
    assert run.err.splitlines() == [run.err.strip()], run.err
    assert f"cannot listen on 127.0.0.1:{port}" in run.err
