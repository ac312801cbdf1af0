"""What a client can hold on the federatls CA: the connection limit below the descriptor
limit, the handshake, request-head, body and idle deadlines, idle connections evicted first,
quiet refusals (docs/ca.md, "Connection limits").

Each test runs ``federatls ca serve`` as a real process on 127.0.0.1, most with its
descriptor limit lowered by ``resource.setrlimit`` in the child before it starts, its log
written to a file; the attackers are TLS connections made by this process, and the good
client is ``federatls ca certificate`` (a process of its own) or a keep-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import signal
import socket
import ssl
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from federatls._errors import ConfigError
from federatls.ca import CAConfig, CAServer, ConnectionLimits
from federatls.ca._connections import DESCRIPTOR_RESERVE, connection_limit

from harness import PASSWORD, PKI, spawn_serve, stepca_process, wait_until

pytestmark = pytest.mark.anyio

SVC = "svc.cloud.internal"
HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
ROOTS = b"GET /roots HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
BODY_HEAD = b"POST /1.0/sign HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
DRIBBLE = b"POST /1.0/sign HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 60000


@pytest.fixture(autouse=True)
def _enough_descriptors() -> None:
    """This process holds thousands of attacking connections: raise its own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# The CA under test ----------------------------------------------------------------------------
@dataclass
class RunningCA:
    proc: asyncio.subprocess.Process
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def limited_ca(
    pki: PKI, tmp_path: Path, *, nofile: int, connections: dict[str, Any] | None = None
) -> AsyncIterator[RunningCA]:
    """``federatls ca serve`` with RLIMIT_NOFILE set to ``nofile`` in its own process and
    ca.json's ``federatls.connections`` block set to ``connections``."""
    if connections is not None:
        pki.edit(lambda d: d.__setitem__("federatls", {"connections": connections}))

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = tmp_path / "ca.log"
    with log.open("wb") as sink:
        proc = await spawn_serve(pki, stderr=sink, preexec_fn=lower_limit)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("Serving HTTPS on https://127.0.0.1:"), log.read_text()
        port = int(line.split()[3].rsplit(":", 1)[1])
        pki.url = f"https://127.0.0.1:{port}"
        await asyncio.sleep(1.0)  # tokens are refused when issued in the CA's start second
        yield RunningCA(proc, port, log)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _attack_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


ATTACK = _attack_context()


async def tls_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
    async with asyncio.timeout(20):
        return await asyncio.open_connection(
            "127.0.0.1", port, ssl=ATTACK, ssl_handshake_timeout=15
        )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True if the CA ends the connection (EOF or reset) within ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(65536), timeout) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


async def certificate(pki: PKI, tmp_path: Path, name: str) -> tuple[int, float, str]:
    """``federatls ca certificate`` with a fresh token, as its own process: exit status,
    seconds taken (from token to files written) and stderr. Killed after 60 s."""
    token = pki.token(SVC, sans=[SVC])
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "federatls",
        "ca",
        "certificate",
        SVC,
        str(tmp_path / f"{name}.crt"),
        str(tmp_path / f"{name}.key"),
        "--token",
        token,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, time.monotonic() - started, "killed after 60 s"
    assert proc.returncode is not None
    return proc.returncode, time.monotonic() - started, err.decode()


def assert_quiet_log(text: str, most: int) -> None:
    """No traceback, no asyncio accept complaint, at most ``most`` lines."""
    assert "Traceback" not in text, text[:3000]
    assert "out of system resource" not in text, text[:3000]
    assert len(text.splitlines()) <= most, text[:3000]


# Attackers ------------------------------------------------------------------------------------
@dataclass
class Crowd:
    """Connections this process holds open against the CA."""

    port: int
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    failed: int = 0

    async def open(self, count: int, after: Callable[..., Any] | None = None) -> None:
        """Open ``count`` TLS connections, 32 at a time; ``after(reader, writer)`` runs on
        each once it is up (a keep-alive request, say)."""
        gate = asyncio.Semaphore(32)

        async def one() -> None:
            async with gate:
                try:
                    reader, writer = await tls_connect(self.port)
                    if after is not None:
                        async with asyncio.timeout(20):
                            await after(reader, writer)
                except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
                    self.failed += 1
                    return
                self.held.append((reader, writer))

        await asyncio.gather(*(one() for _ in range(count)))

    async def count_closed(self, timeout: float) -> int:
        """How many of the held connections the CA has ended, waiting up to ``timeout``."""
        results = await asyncio.gather(*(closed_by_peer(r, timeout) for r, _ in self.held))
        return sum(results)

    def close(self) -> None:
        for _, writer in self.held:
            writer.transport.abort()


async def keep_alive_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(HEALTH)
    status, _ = await read_response(reader)
    assert status == 200


class Dribblers:
    """``count`` connections that send a request head one byte every ``pace`` seconds,
    reconnecting whenever the CA closes them; counts the closes and the bytes each had sent."""

    def __init__(self, port: int, count: int, pace: float) -> None:
        self.port = port
        self.count = count
        self.pace = pace
        self.closed: list[int] = []  # bytes sent before each close
        self.up = 0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._one(i)) for i in range(self.count)]

    async def _one(self, index: int) -> None:
        await asyncio.sleep(index * 0.004)  # spread the connects a little
        while not self._stopping:
            try:
                reader, writer = await tls_connect(self.port)
            except (OSError, ssl.SSLError, TimeoutError):
                await asyncio.sleep(0.2)
                continue
            self.up += 1
            reading = asyncio.ensure_future(reader.read(65536))
            sent = 0
            try:
                while not self._stopping:
                    writer.write(DRIBBLE[sent : sent + 1])
                    sent += 1
                    done, _ = await asyncio.wait({reading}, timeout=self.pace)
                    if done:
                        break
            finally:
                self.up -= 1
                reading.cancel()
                writer.transport.abort()
            self.closed.append(sent)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# (a) the descriptor limit -----------------------------------------------------------------------
async def test_idle_connections_past_the_descriptor_limit_do_not_lock_out_a_good_client(
    pki: PKI, tmp_path: Path
) -> None:
    """With RLIMIT_NOFILE at 160 and 240 idle TLS connections opened, the oldest idle ones are
    evicted, a good client gets its certificate, and the log stays a handful of lines."""
    connections = {"maxConnections": 100000, "requestHeadTimeout": "60s", "idleTimeout": "60s"}
    async with limited_ca(pki, tmp_path, nofile=160, connections=connections) as ca:
        crowd = Crowd(ca.port)
        try:
            await crowd.open(240)
            code, took, err = await certificate(pki, tmp_path, "good")
            assert code == 0, (err, ca.log_text()[:3000])
            evicted = await crowd.count_closed(5)
        finally:
            crowd.close()
        text = ca.log_text()
    print(f"good client under 240 idle connections at RLIMIT_NOFILE=160: {took:.2f} s")
    assert evicted >= 240 - 160, evicted  # beyond the limit, older idle ones made room
    assert "maxConnections 100000 is above what the descriptor limit allows" in text, text
    assert "evicted" in text, text
    assert_quiet_log(text, 15)


async def test_accept_failures_back_off_quietly(pki: PKI, tmp_path: Path) -> None:
    """When accept() itself runs out of descriptors (the limit lowered under the running CA
    with prlimit), the CA pauses accepting and logs a line or two instead of a flood; once
    descriptors are back, a good client is served."""
    connections = {"requestHeadTimeout": "60s", "idleTimeout": "60s"}
    async with limited_ca(pki, tmp_path, nofile=400, connections=connections) as ca:
        crowd = Crowd(ca.port)
        try:
            resource.prlimit(ca.proc.pid, resource.RLIMIT_NOFILE, (120, 400))
            opening = asyncio.create_task(crowd.open(200))
            await asyncio.sleep(6)
            resource.prlimit(ca.proc.pid, resource.RLIMIT_NOFILE, (400, 400))
            crowd.close()
            await opening
            code, _, err = await certificate(pki, tmp_path, "good")
            assert code == 0, (err, ca.log_text()[:3000])
        finally:
            crowd.close()
        text = ca.log_text()
    assert "accepting paused" in text, text[:3000]
    assert_quiet_log(text, 20)


# (b) dribbling request heads --------------------------------------------------------------------
async def test_dribbled_request_heads_are_closed_while_a_keep_alive_client_is_served(
    pki: PKI, tmp_path: Path
) -> None:
    """Connections sending their head one byte at a time are closed after the head timeout
    (each sent more bytes than the timeout allows to matter), while a keep-alive client
    making requests in between is served on its one connection."""
    async with limited_ca(
        pki, tmp_path, nofile=1024, connections={"requestHeadTimeout": "2s"}
    ) as ca:
        dribblers = Dribblers(ca.port, 30, pace=0.2)
        dribblers.start()
        try:
            reader, writer = await tls_connect(ca.port)
            for _ in range(4):
                await asyncio.sleep(1.0)
                writer.write(HEALTH)
                status, _ = await asyncio.wait_for(read_response(reader), 20)
                assert status == 200
            writer.close()
            with contextlib.suppress(TimeoutError):
                await wait_until(lambda: len(dribblers.closed) >= 30, 30)
        finally:
            await dribblers.stop()
        text = ca.log_text()
    assert len(dribblers.closed) >= 30, dribblers.closed
    assert min(dribblers.closed) >= 5, dribblers.closed  # they were dribbling, not idle
    assert "request head timeout" in text, text
    assert_quiet_log(text, 10)


async def test_at_the_limit_with_nothing_idle_the_oldest_unfinished_request_is_evicted(
    pki: PKI, tmp_path: Path
) -> None:
    """With every slot held by a connection mid-request (head or body), a new connection
    evicts the oldest of them and is served; the others stay until their deadline."""
    connections = {
        "maxConnections": 8,
        "requestHeadTimeout": "60s",
        "requestBodyTimeout": "60s",
    }
    async with limited_ca(pki, tmp_path, nofile=1024, connections=connections) as ca:
        crowd = Crowd(ca.port)

        async def start_head(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(DRIBBLE[:10])
            await writer.drain()

        async def start_body(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(BODY_HEAD + b"{")
            await writer.drain()

        try:
            await crowd.open(1, start_body)
            await asyncio.sleep(0.2)
            await crowd.open(7, start_head)
            assert len(crowd.held) == 8
            await asyncio.sleep(0.5)
            reader, writer = await tls_connect(ca.port)
            await keep_alive_health(reader, writer)
            writer.close()
            oldest, *others = crowd.held
            assert await closed_by_peer(oldest[0], 10)
            assert not any(await asyncio.gather(*(closed_by_peer(r, 0.5) for r, _ in others)))
        finally:
            crowd.close()
        text = ca.log_text()
    assert "unfinished requests evicted at the limit of 8 (none idle)" in text, text
    assert_quiet_log(text, 10)


async def test_silent_connections_at_the_limit_do_not_lock_out_a_good_client(
    pki: PKI, tmp_path: Path
) -> None:
    """Every slot held by a TCP connection that never starts its TLS handshake: a good client
    still gets its certificate, evicting the oldest of them."""
    connections = {"maxConnections": 50}
    async with limited_ca(pki, tmp_path, nofile=1024, connections=connections) as ca:
        silent: list[socket.socket] = []
        try:
            for _ in range(50):
                silent.append(socket.create_connection(("127.0.0.1", ca.port), timeout=20))
            await asyncio.sleep(1.0)  # all accepted: a 51st is past the limit
            code, _, err = await certificate(pki, tmp_path, "good")
            assert code == 0, (err, ca.log_text()[:3000])
        finally:
            for sock in silent:
                sock.close()
        text = ca.log_text()
    assert "unfinished requests evicted at the limit of 50" in text, text
    assert_quiet_log(text, 10)


# (c) the load of the issue ------------------------------------------------------------------------
async def test_good_client_is_served_under_2000_idle_and_500_dribbling(
    pki: PKI, tmp_path: Path
) -> None:
    """With 2,000 idle keep-alive connections and 500 dribbling ones held (reopened when the
    CA closes them), a good client gets its certificate; the dribblers are closed by the
    default head timeout and the log stays small."""
    async with limited_ca(pki, tmp_path, nofile=4096) as ca:
        crowd = Crowd(ca.port)
        dribblers = Dribblers(ca.port, 500, pace=0.5)
        try:
            await asyncio.wait_for(crowd.open(2000, keep_alive_health), 90)
            assert len(crowd.held) >= 1900, crowd.failed
            dribblers.start()
            with contextlib.suppress(TimeoutError):
                await wait_until(lambda: dribblers.up >= 490, 30)
            dribbling = dribblers.up
            code, took, err = await certificate(pki, tmp_path, "good")
            assert code == 0, (err, ca.log_text()[:3000])
            with contextlib.suppress(TimeoutError):
                await wait_until(lambda: len(dribblers.closed) >= 500, 30)
        finally:
            await dribblers.stop()
            crowd.close()
        text = ca.log_text()
    print(
        f"good client under {len(crowd.held)} idle + {dribbling} dribbling: {took:.2f} s;"
        f" {len(dribblers.closed)} dribblers closed; CA log {len(text.splitlines())} lines"
    )
    assert dribbling >= 450
    assert len(dribblers.closed) >= 500
    assert_quiet_log(text, 20)


# (d) twins: legitimate clients --------------------------------------------------------------------
async def test_keep_alive_client_is_served_on_one_connection_then_closed_when_idle(
    pki: PKI, tmp_path: Path
) -> None:
    """Twin: several requests on one connection within the idle timeout are all served on
    it; left idle longer than the idle timeout, the CA closes it."""
    connections = {"idleTimeout": "3s", "requestHeadTimeout": "2s"}
    async with limited_ca(pki, tmp_path, nofile=1024, connections=connections) as ca:
        reader, writer = await tls_connect(ca.port)
        try:
            for _ in range(4):
                writer.write(HEALTH)
                status, _ = await asyncio.wait_for(read_response(reader), 20)
                assert status == 200
                await asyncio.sleep(1.5)  # longer than the head timeout, within the idle one
            assert await closed_by_peer(reader, 20)
        finally:
            writer.transport.abort()
        text = ca.log_text()
    assert_quiet_log(text, 5)


async def test_slow_client_with_a_timely_head_is_served(pki: PKI, tmp_path: Path) -> None:
    """Twin: a client that sends its head in pieces but completes it before the head timeout,
    and its body likewise, gets its answer."""
    connections = {"requestHeadTimeout": "4s", "requestBodyTimeout": "4s"}
    async with limited_ca(pki, tmp_path, nofile=1024, connections=connections) as ca:
        reader, writer = await tls_connect(ca.port)
        try:
            body = b'{"ott": "x", "csr": "y"}'
            head = (
                b"POST /1.0/sign HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            )
            for i in range(0, len(head), len(head) // 4 + 1):
                writer.write(head[i : i + len(head) // 4 + 1])
                await asyncio.sleep(0.5)
            for i in range(0, len(body), len(body) // 3 + 1):
                writer.write(body[i : i + len(body) // 3 + 1])
                await asyncio.sleep(0.5)
            status, answer = await asyncio.wait_for(read_response(reader), 20)
        finally:
            writer.transport.abort()
    assert status == 400, answer  # the CA read it all and judged the (bad) CSR


# The body deadline and malformed requests ---------------------------------------------------------
async def test_dribbled_body_is_closed_after_the_body_timeout(pki: PKI, tmp_path: Path) -> None:
    """A whole head followed by a body sent one byte at a time is closed when the body
    timeout has passed since the head, however steadily the bytes come."""
    async with limited_ca(
        pki, tmp_path, nofile=1024, connections={"requestBodyTimeout": "2s"}
    ) as ca:
        reader, writer = await tls_connect(ca.port)
        sent = 0
        try:
            writer.write(
                b"POST /1.0/sign HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            )
            reading = asyncio.ensure_future(reader.read(65536))
            while sent < 200:  # 200 bytes at 0.1 s: 20 s if nothing stops it
                writer.write(b" ")
                sent += 1
                done, _ = await asyncio.wait({reading}, timeout=0.1)
                if done:
                    break
            reading.cancel()
        finally:
            writer.transport.abort()
        text = ca.log_text()
    assert 10 <= sent < 200, sent  # it sent for a while, and was cut off
    assert "closed on request body timeout" in text, text
    assert_quiet_log(text, 6)


async def test_sigterm_closes_a_request_whose_body_is_still_arriving(
    pki: PKI, tmp_path: Path
) -> None:
    """SIGTERM while a client is half-way through a request body: the CA closes that
    connection (it would never be answered: the server reads nothing more once it stops)
    and exits 0 at once, not when the body timeout or the server's 60 s grace runs out.
    Twin: tests/test_ca_workers.py::test_sigterm_lets_a_running_request_finish, a request
    the CA is already answering gets its answer."""
    connections = {"requestBodyTimeout": "120s"}
    async with limited_ca(pki, tmp_path, nofile=1024, connections=connections) as ca:
        reader, writer = await tls_connect(ca.port)
        try:
            writer.write(
                b"POST /1.0/sign HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            await writer.drain()
            await asyncio.sleep(0.5)
            ca.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(ca.proc.wait(), 20) == 0, ca.log_text()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                assert await asyncio.wait_for(reader.read(65536), 5) == b""
        finally:
            writer.transport.abort()


async def test_malformed_requests_are_counted_not_logged_with_tracebacks(
    pki: PKI, tmp_path: Path
) -> None:
    """Malformed requests get aiohttp's 400 and one summary line between them, not one
    traceback each; twin: a well-formed request on the same CA is answered 200."""
    async with limited_ca(pki, tmp_path, nofile=1024) as ca:
        for _ in range(20):
            reader, writer = await tls_connect(ca.port)
            try:
                writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n")
                status, _ = await asyncio.wait_for(read_response(reader), 20)
                assert status == 400
            finally:
                writer.transport.abort()
        reader, writer = await tls_connect(ca.port)
        try:
            await keep_alive_health(reader, writer)
        finally:
            writer.transport.abort()
        await asyncio.sleep(0.5)
        text = ca.log_text()
    assert "malformed HTTP requests answered 400" in text, text
    assert_quiet_log(text, 6)


# Settings ----------------------------------------------------------------------------------------
def test_limits_are_read_from_the_federatls_block(pki: PKI) -> None:
    """ca.json's ``federatls.connections`` sets the limit and the deadlines (Go durations);
    twin: without the block, the defaults."""
    data = json.loads(pki.config.read_text())
    assert CAConfig.from_json(data, pki.config).limits == ConnectionLimits()
    data["federatls"] = {
        "connections": {
            "maxConnections": 500,
            "handshakeTimeout": "3s",
            "requestHeadTimeout": "1500ms",
            "requestBodyTimeout": "7s",
            "idleTimeout": "1m",
        }
    }
    limits = CAConfig.from_json(data, pki.config).limits
    assert limits == ConnectionLimits(500, 3.0, 1.5, 7.0, 60.0)


@pytest.mark.parametrize(
    ("block", "fragment"),
    [
        ({"connections": {"idleTimout": "5s"}}, "unknown fields ['idleTimout']"),
        ({"connection": {}}, "unknown fields ['connection'] in 'federatls'"),
        ({"connections": {"maxConnections": 0}}, "maxConnections must be a positive integer"),
        ({"connections": {"maxConnections": "9"}}, "maxConnections must be a positive integer"),
        ({"connections": {"requestHeadTimeout": 5}}, "requestHeadTimeout must be a duration"),
        ({"connections": {"idleTimeout": "0s"}}, "idleTimeout must be greater than 0"),
        ({"connections": []}, "federatls.connections must be an object"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(
    pki: PKI, block: dict[str, Any], fragment: str
) -> None:
    """A wrong or misspelt setting stops the CA with the field named, rather than leaving a
    deadline silently at its default."""
    data = json.loads(pki.config.read_text())
    data["federatls"] = block
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        CAConfig.from_json(data, pki.config)


def test_connection_limit_follows_the_descriptor_limit(caplog: pytest.LogCaptureFixture) -> None:
    """By default the descriptor limit less the reserve, capped; a setting above it is
    lowered with a warning; below it, kept; a descriptor limit with no room is refused."""
    caplog.set_level(logging.WARNING, "federatls.ca")
    assert connection_limit(None, 1024) == 1024 - DESCRIPTOR_RESERVE
    assert connection_limit(None, 1_048_576) == 10_000
    assert connection_limit(None, resource.RLIM_INFINITY) == 10_000
    assert connection_limit(100, 1024) == 100
    assert caplog.text == ""
    assert connection_limit(5000, 1024) == 1024 - DESCRIPTOR_RESERVE
    assert "maxConnections 5000 is above what the descriptor limit allows" in caplog.text
    with pytest.raises(ConfigError, match="ulimit -n"):
        connection_limit(None, DESCRIPTOR_RESERVE)


async def test_ca_server_takes_limits_as_an_argument(pki: PKI) -> None:
    """``CAServer(..., limits=...)`` replaces the ca.json block: an in-process CA with a 1 s
    idle timeout closes a kept-alive connection; twin: it served it first."""
    limits = ConnectionLimits(max_connections=50, idle_timeout=1.0)
    async with CAServer.running(pki.config, PASSWORD, limits=limits) as ca:
        reader, writer = await tls_connect(ca.address[1])
        try:
            await keep_alive_health(reader, writer)
            assert await closed_by_peer(reader, 20)
        finally:
            writer.transport.abort()


async def test_sighup_reload_applies_new_limits(pki: PKI) -> None:
    """A reload reads the block again: after ``idleTimeout`` is set to 1 s and the CA
    reloaded, a kept-alive connection is closed; twin: before, it stayed open."""
    async with CAServer.running(pki.config, PASSWORD) as ca:
        reader, writer = await tls_connect(ca.address[1])
        try:
            await keep_alive_health(reader, writer)
            assert not await closed_by_peer(reader, 2)  # default idle timeout: 30 s
        finally:
            writer.transport.abort()
        pki.edit(lambda d: d.__setitem__("federatls", {"connections": {"idleTimeout": "1s"}}))
        assert ca.reload()
        reader, writer = await tls_connect(ca.address[1])
        try:
            await keep_alive_health(reader, writer)
            assert await closed_by_peer(reader, 20)
        finally:
            writer.transport.abort()


@pytest.mark.stepca
def test_step_ca_runs_a_ca_json_with_the_federatls_block(pki: PKI, stepca_bin: str) -> None:
    """Twin of the settings: the real step-ca starts on the same ca.json, block and all."""
    pki.edit(lambda d: d.__setitem__("federatls", {"connections": {"idleTimeout": "5s"}}))
    with stepca_process(stepca_bin, pki):
        assert httpx.get(pki.url + "/health", verify=False, timeout=10).json() == {"status": "ok"}  # noqa: S501


async def test_client_that_does_not_read_its_answers_is_dropped(pki: PKI) -> None:
    """A client that pipelines requests and never reads the answers cannot hold the
    connection (nor its descriptor, through a close waiting on unread data): once the
    answers back up and the deadline passes, the CA drops it; it gets far fewer answers
    than it asked for."""
    limits = ConnectionLimits(idle_timeout=1.0)
    request = b"GET /roots.pem HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    async with CAServer.running(pki.config, PASSWORD, limits=limits) as ca:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", ca.address[1]))
        raw.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=raw, ssl=ATTACK, server_hostname="")
        try:
            writer.write(request * 20000)
            await asyncio.sleep(4)  # the answers back up; the deadline passes
            answers, closed = 0, False
            try:
                async with asyncio.timeout(30):
                    while chunk := await reader.read(65536):
                        answers += chunk.count(b"HTTP/1.1 200")
                closed = True
            except (ConnectionError, ssl.SSLError):
                closed = True
            except TimeoutError:
                pass
        finally:
            writer.transport.abort()
    assert closed, answers
    assert answers < 20000, answers


async def test_a_flood_of_refused_handshakes_is_counted_not_logged_per_connection(
    pki: PKI, tmp_path: Path
) -> None:
    """300 plain-HTTP connections fail the TLS handshake: the first few are logged with the
    peer and OpenSSL's reason, the rest counted in a summary line that keeps the reason; twin:
    a good client on the same CA gets its certificate."""

    async def plain_http() -> None:
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", ca.port)
        try:
            writer.write(HEALTH)
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(reader.read(100), 20)
        finally:
            writer.transport.abort()

    async with limited_ca(pki, tmp_path, nofile=1024) as ca:
        gate = asyncio.Semaphore(32)

        async def one() -> None:
            async with gate:
                await plain_http()

        await asyncio.gather(*(one() for _ in range(300)))
        code, _, err = await certificate(pki, tmp_path, "good")
        assert code == 0, (err, ca.log_text()[:3000])
        # The summary comes at once, or within LOG_INTERVAL (20 s) of the last line.
        await wait_until(lambda: "TLS handshakes refused" in ca.log_text(), 45)
        text = ca.log_text()
    assert "refused TLS connection from 127.0.0.1" in text  # the first ones, with the peer
    assert "TLS handshakes refused (HTTP_REQUEST)" in text, text[-3000:]  # the rest, counted
    assert_quiet_log(text, 15)


def _junk_after_handshake(port: int) -> None:
    """A TLS connection that completes its handshake, then sends a record no key decrypts."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        ATTACK.wrap_socket(raw) as tls,
    ):
        os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + os.urandom(32))
        with contextlib.suppress(OSError, ssl.SSLError):
            tls.recv(100)


async def test_tls_errors_after_the_handshake_are_counted_not_logged_per_connection(
    pki: PKI, tmp_path: Path
) -> None:
    """100 connections send a forged record after their handshake: each is closed, and the
    log counts them in a summary line with OpenSSL's reason instead of a line each; twin: a
    good client on the same CA gets its certificate."""
    async with limited_ca(pki, tmp_path, nofile=1024) as ca:
        for _ in range(100):
            await asyncio.to_thread(_junk_after_handshake, ca.port)
        code, _, err = await certificate(pki, tmp_path, "good")
        assert code == 0, (err, ca.log_text()[:3000])
        await wait_until(lambda: "TLS errors after the handshake" in ca.log_text(), 45)
        text = ca.log_text()
    assert "BAD_RECORD_MAC" in text, text[-3000:]
    assert_quiet_log(text, 15)


async def test_pipelining_clients_that_never_read_do_not_lock_out_a_good_client(
    pki: PKI, tmp_path: Path
) -> None:
    """Every slot held by a client that pipelines thousands of requests and never reads the
    answers (the CA's writes blocked on the client): a good client still gets its
    certificate, evicting the oldest of them."""
    connections = {"maxConnections": 10}
    async with limited_ca(pki, tmp_path, nofile=1024, connections=connections) as ca:
        crowd = Crowd(ca.port)

        async def flood(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            transport = writer.transport
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # never read: the CA's answers pile up
            for _round in range(40):
                writer.write(ROOTS * 500)
                await writer.drain()

        try:
            await crowd.open(10, flood)
            assert len(crowd.held) == 10, crowd.failed
            await asyncio.sleep(2.0)  # the CA has written what the sockets hold and waits
            code, _, err = await certificate(pki, tmp_path, "good")
            assert code == 0, (err, ca.log_text()[:3000])
        finally:
            crowd.close()
        text = ca.log_text()
    assert "evicted at the limit of 10" in text, text
    assert_quiet_log(text, 10)


def _zeros(encoding: str, size: int) -> bytes:
    """``size`` zero bytes compressed with ``wbits`` for gzip (31) or zlib (15) framing."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    return packer.compress(bytes(size)) + packer.flush()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [("gzip", _zeros("gzip", 16 << 20)), ("deflate", _zeros("gzip", 1 << 20))],
    ids=["gzip bomb", "mislabelled deflate"],
)
async def test_compressed_request_bodies_are_not_inflated(
    pki: PKI, tmp_path: Path, encoding: str, body: bytes
) -> None:
    """A sign request whose body claims a Content-Encoding (16 KB inflating to 16 MB, or gzip
    bytes labelled deflate) is read as the bytes it is, as step-ca reads a body: 400, not a
    413 after inflating past the limit, nor a 500 and a traceback; twin: /health on the same
    connection afterwards is answered."""
    async with limited_ca(pki, tmp_path, nofile=1024) as ca:
        reader, writer = await tls_connect(ca.port)
        try:
            for _ in range(3):
                writer.write(
                    b"POST /1.0/sign HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Encoding: "
                    + encoding.encode()
                    + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                    + body
                )
                status, answer = await asyncio.wait_for(read_response(reader), 20)
                assert status == 400, answer
            await keep_alive_health(reader, writer)
        finally:
            writer.transport.abort()
        await asyncio.sleep(0.5)
        text = ca.log_text()
    assert_quiet_log(text, 8)
