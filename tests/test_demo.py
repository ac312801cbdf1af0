"""`federatls demo` (README's first command) and the tutorial's example server and client."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from federatls.testing import TestCA, federated_pair, running_ca

from harness import federatls

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).parent.parent / "examples"
DEMO_TIMEOUT = 240  # the whole tutorial, on a loaded machine
STEPS = ["[1]", "[2]", "[3]", "[4]", "[5]", "[6]", "[7]", "[8]", "[9]"]


@pytest.mark.timeout(300)
async def test_demo_runs_the_whole_tutorial() -> None:
    """The demo shows every step: CAs, server, refusal, federation, client, curl, renewal,
    CAs following each other by URL, and a root rotation at kubernetes that cloud and its
    server follow with no edit while the client's calls all succeed (the static twin, which
    breaks, is in test_federated_rotation.py)."""
    run = await federatls("demo")
    assert run.code == 0, run.out + run.err
    assert [line[:3] for line in run.out.splitlines() if line.startswith("[")] == STEPS
    out = run.out
    assert "curl: (" in out  # step 3: curl refused without federation
    assert "refused, as expected" in out
    # The server logs why: the client's certificate does not chain to its bundle yet.
    assert (
        "server | refused a TLS client in the TLS handshake: its certificate failed "
        "verification (unable to get local issuer certificate)"
    ) in out
    assert "Now accepting certs anchored in CN=kubernetes Root CA" in out  # live bundle update
    assert "Server responded: Hello sdk_client (cert issued by 'kubernetes Root CA')" in out
    assert "Hello kube_client (cert issued by 'kubernetes Root CA')" in out  # curl, step 6
    assert "renewals so far, same process" in out
    # Step 8: the CAs follow each other by URL.
    lines = out.splitlines()
    assert "    cloud's /federation: cloud Root CA, kubernetes Root CA" in lines
    assert "    kubernetes's /federation: kubernetes Root CA, cloud Root CA" in lines
    # Step 9: cloud learns the new root and drops the old one by itself; so does its server;
    # the client's certificate moves to the new root; no call fails.
    step_9 = lines[next(i for i, line in enumerate(lines) if line.startswith("[9] ")) :]
    learnt = "    cloud's /federation: cloud Root CA, kubernetes Root CA, kubernetes Root CA 2"
    assert any(line.startswith(learnt + "   (fetched from kubernetes") for line in step_9)
    assert (
        "    server | Now accepting certs anchored in CN=kubernetes Root CA 2,O=kubernetes"
        in step_9
    )
    assert any(
        "client | Server responded: Hello sdk_client (cert issued by 'kubernetes Root CA 2')"
        in line
        for line in step_9
    )
    dropped = "    cloud's /federation: cloud Root CA, kubernetes Root CA 2"
    assert dropped in step_9
    after = step_9[step_9.index(dropped) :]
    assert (
        "    server | Now accepting certs anchored in CN=kubernetes Root CA,O=kubernetes"
        not in after
    )
    calls = re.search(
        r"(\d+) calls during the rotation, 0 failed; cloud's ca.json never edited", out
    )
    assert calls is not None
    assert int(calls[1]) >= 10  # twice a second through three reloads
    assert "    $ federatls ca peers cloud/config/ca.json" in step_9
    assert out.rstrip().endswith(
        "Demo complete: federation works both ways, is required, renews live, and follows "
        "a root rotation with no edit."
    )


@pytest.fixture
def pair() -> Iterator[tuple[TestCA, TestCA]]:
    with federated_pair() as cas:
        yield cas


async def _example(script: str, *args: str) -> anyio.abc.Process:
    return await anyio.open_process(
        [sys.executable, str(EXAMPLES / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def _read_until(proc: anyio.abc.Process, text: str, timeout: float = 30) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    buffer = b""
    with anyio.fail_after(timeout):
        async for chunk in proc.stdout:
            buffer += chunk
            *done, buffer = buffer.split(b"\n")
            lines += [d.decode() for d in done]
            if any(text in line for line in lines):
                return lines
    raise AssertionError(f"{text!r} never printed: {lines}")


async def _serve_and_call(server_ca: TestCA, client_ca: TestCA) -> list[str]:
    port = _free_port()
    server = await _example("server/server.py", server_ca.token("127.0.0.1"), "--port", str(port))
    try:
        banner = await _read_until(server, "Listening on")
        client = await _example(
            "client/client.py",
            client_ca.token("sdk_client"),
            f"https://127.0.0.1:{port}/",
            "--every",
            "0.2",
            "--count",
            "2",
        )
        async with client:
            lines = await _read_until(client, "Server responded")
            await client.wait()
        return banner + lines
    finally:
        server.terminate()
        await server.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_examples_talk_across_federated_cas(pair: tuple[TestCA, TestCA]) -> None:
    """The example server (cloud) answers the example client (kubernetes) with its name and
    the root that vouched for it, and lists both roots it accepts."""
    cloud, kubernetes = pair
    lines = await _serve_and_call(cloud, kubernetes)
    assert "Accepting certs anchored in CN=kubernetes Root CA,O=kubernetes" in lines
    assert any(
        "Server responded: Hello sdk_client (cert issued by 'kubernetes Root CA')" in line
        for line in lines
    )


async def test_example_client_refused_without_federation() -> None:
    """Twin: with two CAs that do not federate, the example client gets no answer."""
    with running_ca("cloud") as cloud, running_ca("kubernetes") as kubernetes:
        port = _free_port()
        server = await _example("server/server.py", cloud.token("127.0.0.1"), "--port", str(port))
        try:
            await _read_until(server, "Listening on")
            run = await anyio.run_process(
                [
                    sys.executable,
                    str(EXAMPLES / "client" / "client.py"),
                    kubernetes.token("sdk_client"),
                    f"https://127.0.0.1:{port}/",
                    "--count",
                    "1",
                ],
                check=False,
            )
        finally:
            server.terminate()
            await server.wait()
    assert run.returncode != 0
    assert b"Server responded" not in run.stdout
    assert b"CERTIFICATE_VERIFY_FAILED" in run.stderr


@pytest.mark.timeout(300)
async def test_demo_keep_leaves_it_running_until_interrupted() -> None:
    """`demo --keep` keeps everything up and prints how to reach it (the printed commands
    work); Ctrl-C then stops every process and removes the workspace."""
    proc = await anyio.open_process(
        [sys.executable, "-m", "federatls", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        lines = await _read_until(proc, "    curl --cacert federated.pem", DEMO_TIMEOUT)
    finally:
        if proc.returncode is not None:
            raise AssertionError("the demo ended instead of staying up")
    workspace = Path(next(line.split()[1] for line in lines if line.startswith("    cd ")))
    fresh = next(
        line.split()
        for line in lines
        if line.startswith("    federatls ca certificate kube_client")
    )
    curl = next(line.split() for line in lines if line.startswith("    curl --cacert"))
    await anyio.run_process([sys.executable, "-m", *fresh], cwd=workspace)
    answer = await anyio.run_process(curl, cwd=workspace)
    # The certificate is fresh: from kubernetes' new root (step 9 rotated it).
    assert b"Hello kube_client (cert issued by 'kubernetes Root CA 2')" in answer.stdout
    proc.send_signal(signal.SIGINT)
    with anyio.fail_after(30):
        code = await proc.wait()
    assert code == 130
    assert not workspace.exists()


def _children(pid: int) -> set[int]:
    """Every live process descended from ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, waiting to be reaped, has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


STOPS: dict[str, list[int]] = {
    "SIGTERM": [signal.SIGTERM],
    "SIGHUP": [signal.SIGHUP],
    "SIGINT": [signal.SIGINT],
    "SIGINT twice": [signal.SIGINT, signal.SIGINT, signal.SIGINT],
    "SIGINT to the group": [-signal.SIGINT],
    "SIGQUIT to the group": [-signal.SIGQUIT],  # Ctrl-\ in a terminal
}


async def _stop_demo(signals: list[int], wait_for: str) -> tuple[int, str, set[int], Path]:
    """Start `demo --keep` in a process group of its own, wait for ``wait_for``, send
    ``signals`` (negative: to the whole group, as a terminal's Ctrl-C does) a moment apart;
    its exit code, everything it printed, the processes it had started and its workspace."""
    proc = await anyio.open_process(
        [sys.executable, "-m", "federatls", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        lines = await _read_until(proc, wait_for, DEMO_TIMEOUT)
        workspace = Path(
            next(line.split()[-1].rstrip(")") for line in lines if "(workspace: " in line)
        )
        started = _children(proc.pid)
        assert started, "the demo had started no process"
        for sig in signals:
            with contextlib.suppress(ProcessLookupError):  # it may be gone already
                if sig < 0:
                    os.killpg(proc.pid, -sig)
                else:
                    os.kill(proc.pid, sig)
            await anyio.sleep(0.05)  # "within a moment": while it is cleaning up
        assert proc.stdout is not None
        rest = b""
        with anyio.fail_after(60):
            async for chunk in proc.stdout:
                rest += chunk
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return code, "\n".join(lines) + "\n" + rest.decode(errors="replace"), started, workspace


def _assert_cleaned_up(started: set[int], workspace: Path) -> None:
    deadline = time.monotonic() + 15
    while any(map(_alive, started)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in started if _alive(pid)], "processes left running"
    assert not workspace.exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "how", ["SIGHUP", "SIGINT", "SIGINT twice", "SIGINT to the group", "SIGQUIT to the group"]
)
async def test_demo_stopped_midway_cleans_up(how: str) -> None:
    """However it is stopped while its CAs and server run, the demo stops every process it
    started, removes its workspace (CA keys, password) and prints no traceback."""
    signals = STOPS[how]
    code, out, started, workspace = await _stop_demo(signals, "[3] ")
    assert code == 128 + abs(signals[0]), out
    assert "Traceback" not in out, out
    _assert_cleaned_up(started, workspace)


@pytest.mark.timeout(300)
async def test_demo_keep_stopped_by_sigterm_cleans_up() -> None:
    """`kill -TERM` of `demo --keep` once it is ready: both CAs and the server are stopped,
    the workspace is gone, no traceback."""
    code, out, started, workspace = await _stop_demo(
        STOPS["SIGTERM"], "    curl --cacert federated.pem"
    )
    assert code == 128 + signal.SIGTERM, out
    assert "Traceback" not in out, out
    assert len(started) >= 3  # two CAs and the server
    _assert_cleaned_up(started, workspace)
