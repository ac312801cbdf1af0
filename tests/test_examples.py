"""The example server and client as a user runs them: a bad token, an unreachable CA or server,
a spent token and Ctrl-C each end with one line on stderr (Ctrl-C: none, status 130), never a
traceback. The good path is tests/test_demo.py's test_examples_talk_across_federated_cas."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from federatls import bootstrap
from federatls.testing import TestCA, running_ca

from harness import free_port

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).parent.parent / "examples"
SERVER = EXAMPLES / "server" / "server.py"
CLIENT = EXAMPLES / "client" / "client.py"


@pytest.fixture(scope="module")
def cloud() -> Iterator[TestCA]:
    with running_ca("cloud") as ca:
        yield ca


async def _run(script: Path, *args: str) -> tuple[int, str, str]:
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, str(script), *args], check=False, stdin=subprocess.DEVNULL
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], err


def _unreachable_token() -> str:
    """A well-formed token for a CA that is no longer running."""
    with running_ca("gone") as gone:
        return gone.token("127.0.0.1")


def _spent_token(ca: TestCA, subject: str) -> str:
    token = ca.token(subject)
    anyio.run(bootstrap, token)
    return token


@pytest.mark.parametrize("script", [SERVER, CLIENT], ids=["server", "client"])
async def test_bad_token_is_one_line(script: Path) -> None:
    """A token that is not a JWT: one line naming the token, no traceback."""
    extra = [] if script == SERVER else ["https://127.0.0.1:1/"]
    code, _, err = await _run(script, "not-a-token", *extra)
    _assert_one_line(code, err, "token")


@pytest.mark.parametrize("script", [SERVER, CLIENT], ids=["server", "client"])
async def test_unreachable_ca_is_one_line(script: Path) -> None:
    """The CA the token names does not answer: one line, no traceback."""
    extra = [] if script == SERVER else ["https://127.0.0.1:1/"]
    code, _, err = await _run(script, _unreachable_token(), *extra)
    _assert_one_line(code, err)


@pytest.mark.parametrize("script", [SERVER, CLIENT], ids=["server", "client"])
async def test_spent_token_is_one_line(script: Path, cloud: TestCA) -> None:
    """A token used once already: one line with the CA's refusal, no traceback."""
    extra = [] if script == SERVER else ["https://127.0.0.1:1/"]
    token = await anyio.to_thread.run_sync(_spent_token, cloud, "127.0.0.1")
    code, _, err = await _run(script, token, *extra)
    _assert_one_line(code, err)


async def test_client_with_unreachable_server_is_one_line(cloud: TestCA) -> None:
    """The client enrolls, but nothing listens at the URL: one line, no traceback."""
    url = f"https://127.0.0.1:{free_port()}/"
    code, _, err = await _run(CLIENT, cloud.token("sdk_client"), url, "--count", "1")
    _assert_one_line(code, err, url.removesuffix("/").removeprefix("https://"))


async def test_server_on_a_busy_port_is_one_line(cloud: TestCA) -> None:
    """The port is taken: the server enrolls, then ends with one line, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        code, _, err = await _run(SERVER, cloud.token("127.0.0.1"), "--port", port)
    _assert_one_line(code, err, port)


BAD_ARGUMENTS = {
    "server port too large": (SERVER, "127.0.0.1", ["--port", "99999"], "--port"),
    "server port negative": (SERVER, "127.0.0.1", ["--port", "-5"], "--port"),
    "client port too large": (CLIENT, "sdk_client", ["https://127.0.0.1:70000/"], "url"),
    "client URL unparsable": (CLIENT, "sdk_client", ["https://[::1"], "url"),
    "client URL without https": (CLIENT, "sdk_client", ["127.0.0.1:8443"], "https://"),
    "client URL plain http": (CLIENT, "sdk_client", ["http://127.0.0.1:8443/"], "https://"),
    "client URL without host": (CLIENT, "sdk_client", ["https:///x"], "url"),
    "client count negative": (CLIENT, "sdk_client", ["https://a:1/", "--count", "-1"], "count"),
    "client every negative": (CLIENT, "sdk_client", ["https://a:1/", "--every", "-1"], "every"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
async def test_bad_arguments_are_usage_errors_that_spend_no_token(case: str, cloud: TestCA) -> None:
    """A port out of range, a URL that is not https:// with a host and a valid port, or a
    negative count or interval: exit 2 naming it, no traceback, and the token is not spent."""
    script, subject, args, fragment = BAD_ARGUMENTS[case]
    token = cloud.token(subject)
    code, _, err = await _run(script, token, *args)
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"{script.name}: error: "), err
    assert fragment in err.splitlines()[-1], err
    identity = await bootstrap(token)  # still unspent
    assert identity.common_name == subject


async def _interrupt_after(args: list[str], ready: str) -> tuple[int, str]:
    proc = await anyio.open_process(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    seen = b""
    try:
        with anyio.fail_after(60):
            async for chunk in proc.stdout:
                seen += chunk
                if ready.encode() in seen:
                    break
            assert ready.encode() in seen, seen.decode()
            proc.send_signal(signal.SIGINT)
            err = b"".join([chunk async for chunk in proc.stderr])
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return code, err.decode()


async def test_ctrl_c_stops_the_server_quietly(cloud: TestCA) -> None:
    """SIGINT (Ctrl-C) stops a serving example server with status 130 and nothing on stderr."""
    args = [str(SERVER), cloud.token("127.0.0.1"), "--port", str(free_port())]
    code, err = await _interrupt_after(args, "Listening on")
    assert code == 130, err
    assert err == ""


@contextlib.asynccontextmanager
async def _serving(ca: TestCA) -> AsyncIterator[str]:
    """The example server enrolled with ``ca``, listening: yields its URL."""
    port = free_port()
    server = await anyio.open_process(
        [sys.executable, str(SERVER), ca.token("127.0.0.1"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert server.stdout is not None
        seen = b""
        with anyio.fail_after(60):
            async for chunk in server.stdout:
                seen += chunk
                if b"Listening on" in seen:
                    break
        yield f"https://127.0.0.1:{port}/"
    finally:
        server.terminate()
        await server.wait()


async def test_ctrl_c_stops_the_client_quietly(cloud: TestCA) -> None:
    """SIGINT (Ctrl-C) stops a calling example client with status 130 and nothing on stderr."""
    async with _serving(cloud) as url:
        args = [str(CLIENT), cloud.token("sdk_client"), url, "--every", "0.2"]
        code, err = await _interrupt_after(args, "Server responded")
    assert code == 130, err
    assert err == ""


async def test_good_tokens_serve_and_call_quietly(cloud: TestCA) -> None:
    """Twin: with fresh tokens the client gets its answers and exits 0, nothing on stderr."""
    async with _serving(cloud) as url:
        args = [cloud.token("sdk_client"), url, "--every", "0.1", "--count", "2"]
        code, out, err = await _run(CLIENT, *args)
    assert (code, err) == (0, "")
    assert out.count("Server responded: Hello sdk_client (cert issued by 'cloud Root CA')") == 2
