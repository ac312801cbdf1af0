"""``federatls demo``: the step-ca federation tutorial, on this machine, in about a minute.

Every step runs what a person would type in a terminal (the ``federatls`` CLI, the example
server and client from ``examples/``, curl) and shows the command and what it printed.
The package ships the examples as ``federatls/_examples`` (in a checkout, a symbolic link to
``examples/``; in the wheel, copies of those files), so the demo runs from an installed
package too, and the examples are written in one place only:

1. two autonomous CAs, "cloud" and "kubernetes" (short-lived certificates, so renewals show);
2. the demo server, enrolled with cloud;
3. curl with a kubernetes certificate: refused (no federation yet);
4. federation: each CA lists the other's root in ``federatedRoots``, then SIGHUP; the running
   server picks up the new bundle at its next renewal, without a restart;
5. the demo client, enrolled with kubernetes, calls the server;
6. curl with files from ``federatls ca certificate`` and ``federatls ca federation``;
7. the live renewals that happened meanwhile;
8. federation that keeps itself current: each CA follows the other by URL (a ``federation``
   peer pinned to the other's root fingerprint) instead of a copy of its root, then SIGHUP;
9. kubernetes rotates its root (``federatls ca rotate``: add-root, issue-from-new-root,
   retire-old-roots, each applied by SIGHUP) while the demo client calls the server twice a
   second: cloud's ``/federation`` gains the new root and drops the old one by itself, the
   server follows at its renewals, and no call fails; cloud's ca.json is never edited.

Everything lives in a temporary directory and is stopped at the end, unless ``--keep``.
However the demo is stopped (SIGINT once or repeatedly, SIGTERM, SIGHUP, SIGQUIT, or Ctrl-C
or Ctrl-backslash in a terminal, which signal the whole foreground process group), it stops
every process it started and removes the directory (CA keys, password), without a traceback.
Its children run in sessions of their own, so a terminal's Ctrl-C reaches the demo only,
which then stops them itself (SIGTERM, then SIGKILL for any still there after a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from ._x509 import common_name, fingerprint, load_pem_certificate, load_pem_certificates

__all__ = ["run_demo"]

CLAIMS = {"minTLSCertDuration": "5s", "defaultTLSCertDuration": "12s", "maxTLSCertDuration": "1h"}
EXAMPLES = (Path(__file__).parent / "_examples").resolve()  # examples/ in a checkout
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
STOP_GRACE = 10.0  # seconds a child has to exit after SIGTERM before SIGKILL
PEER_REFRESH = "2s"  # how often each CA fetches the other's roots, from step 8 on
PAIRS = (("cloud", "kubernetes"), ("kubernetes", "cloud"))
NAMES = {  # the names each CA's roots may vouch for, in the other CA's ca.json
    "cloud": ["127.0.0.1", "*.cloud.internal"],
    "kubernetes": ["sdk_client", "kube_client", "*.k8s.internal"],
}
OLD_ROOT, NEW_ROOT = "kubernetes Root CA", "kubernetes Root CA 2"  # step 9


class DemoFailed(Exception):
    """A step did not show what it should."""


def _say(step: int, text: str) -> None:
    print(f"\n[{step}] {text}", flush=True)


def _show(text: str) -> None:
    print(f"    {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Process:
    """A long-running process whose output lines are collected (and echoed if asked)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, echo: bool) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self._echo = echo
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if self._echo:
                _show(f"{self.name} | {line}")
            self._new.set()

    async def wait_for(self, text: str | tuple[str, ...], timeout: float, since: int = 0) -> str:
        """The first line containing ``text`` (every one of them, for a tuple), already
        printed or to come, from line number ``since`` on."""
        return self.lines[await self.wait_for_index(text, timeout, since)]

    async def wait_for_index(
        self, text: str | tuple[str, ...], timeout: float, since: int = 0
    ) -> int:
        """The number of the line ``wait_for`` returns."""
        parts = (text,) if isinstance(text, str) else text
        deadline = time.monotonic() + timeout
        while True:
            for number in range(since, len(self.lines)):
                if all(part in self.lines[number] for part in parts):
                    return number
            if self.proc.returncode is not None:
                raise DemoFailed(f"{self.name} exited: {self.lines[-5:]}")
            self._new.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoFailed(f"{self.name} never printed {text!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), remaining)

    async def close(self) -> None:
        """Stop reading (the process itself is stopped by ``Demo.stop_all``)."""
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


def _signal_group(proc: asyncio.subprocess.Process, signum: int) -> None:
    """``signum`` to ``proc``'s process group (it leads a session of its own)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)


class Demo:
    """The commands of the tutorial, run for real."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.password = base / "password.txt"
        self.password.write_text(secrets.token_urlsafe(24) + "\n")
        self.processes: list[Process] = []
        self.children: list[asyncio.subprocess.Process] = []  # every one started, short or long

    def _shown(self, argv: Sequence[str]) -> str:
        """The command as a person would type it (short names, relative paths)."""
        words = list(argv)
        if words[:3] == [sys.executable, "-m", "federatls"]:
            words = ["federatls", *words[3:]]
        elif words[:1] == [sys.executable]:
            words = ["python", *words[1:]]
        out = []
        for word in words:
            word = word.replace(str(EXAMPLES.parent) + "/", "").replace(str(self.base) + "/", "")
            out.append(word if len(word) < 60 else word[:20] + "...")
        return " ".join(out)

    async def run(self, *argv: str, show: bool = True, check: bool = True) -> str:
        """Run a command to its end; its output (stdout and stderr together)."""
        if show:
            _show(f"$ {self._shown(argv)}")
        proc = await self._spawn(argv)
        out, _ = await proc.communicate()
        text = out.decode(errors="replace").strip()
        if check and proc.returncode != 0:
            raise DemoFailed(f"{self._shown(argv)} exited {proc.returncode}: {text}")
        return text

    async def start(self, name: str, *argv: str, echo: bool = True) -> Process:
        _show(f"$ {self._shown(argv)} &")
        proc = await self._spawn(argv)
        process = Process(name, proc, echo)
        self.processes.append(process)
        return process

    async def _spawn(self, argv: Sequence[str]) -> asyncio.subprocess.Process:
        """A child in a session of its own (a terminal's Ctrl-C is for the demo, which stops
        its children itself), remembered so that it is stopped whatever happens."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.base,
            start_new_session=True,
        )
        self.children.append(proc)
        return proc

    async def federatls(self, *args: str, show: bool = True) -> str:
        return await self.run(sys.executable, "-m", "federatls", *args, show=show)

    async def stop_all(self) -> None:
        """SIGTERM to every child still running, SIGKILL to those still there after
        ``STOP_GRACE`` seconds; returns when all have exited."""
        for proc in self.children:
            _signal_group(proc, signal.SIGTERM)
        waits = [asyncio.ensure_future(proc.wait()) for proc in self.children]
        if waits:
            _, late = await asyncio.wait(waits, timeout=STOP_GRACE)
            if late:
                for proc in self.children:
                    _signal_group(proc, signal.SIGKILL)
                await asyncio.wait(late)
        for process in self.processes:
            await process.close()


async def _make_ca(demo: Demo, name: str) -> tuple[Path, str]:
    port = _free_port()
    directory = demo.base / name
    await demo.federatls(
        "ca",
        "init",
        name,
        "--dir",
        str(directory),
        "--address",
        f"127.0.0.1:{port}",
        "--dns",
        "127.0.0.1",
        "--dns",
        "localhost",
        "--password-file",
        str(demo.password),
    )
    config = directory / "config" / "ca.json"
    data = json.loads(config.read_text())
    data["authority"]["provisioners"][0]["claims"] = CLAIMS
    data["authority"]["backdate"] = "1s"
    config.write_text(json.dumps(data, indent=2))
    return config, f"https://127.0.0.1:{port}"


async def _steps(demo: Demo, keep: bool) -> None:
    if not (EXAMPLES / "server" / "server.py").exists():
        raise DemoFailed(f"the example programs are missing from the package ({EXAMPLES})")
    _say(1, "Two autonomous CAs, 'cloud' and 'kubernetes', each with its own root")
    _show(f"(certificates live {CLAIMS['defaultTLSCertDuration']} here, so renewals show)")
    cas: dict[str, tuple[Path, str, Process]] = {}
    for name in ("cloud", "kubernetes"):
        config, url = await _make_ca(demo, name)
        ca = await demo.start(
            f"{name} CA",
            sys.executable,
            "-m",
            "federatls",
            "ca",
            "serve",
            str(config),
            "--password-file",
            str(demo.password),
            echo=False,
        )
        _show((await ca.wait_for("Serving HTTPS", 30)).strip())
        cas[name] = (config, url, ca)
    root = {name: str(cas[name][0].parent.parent / "certs" / "root_ca.crt") for name in cas}
    ca_flags = {name: ["--ca-url", cas[name][1], "--root", root[name]] for name in cas}
    mint = {name: [*ca_flags[name], "--password-file", str(demo.password)] for name in cas}

    _say(2, "The demo server, enrolled with the cloud CA")
    port = _free_port()
    token = await demo.federatls("ca", "token", "127.0.0.1", *mint["cloud"])
    server = await demo.start(
        "server", sys.executable, str(EXAMPLES / "server" / "server.py"), token, "--port", str(port)
    )
    await server.wait_for("Listening on", 30)
    url = f"https://127.0.0.1:{port}/"

    async def kube_certificate(*, force: bool = False) -> None:
        """`federatls ca certificate kube_client ...` from the kubernetes CA."""
        extra = ["--force"] if force else []
        await demo.federatls(
            "ca",
            "certificate",
            "kube_client",
            "kube_client.crt",
            "kube_client.key",
            *extra,
            *mint["kubernetes"],
        )

    async def curl(cacert: str, *, check: bool = True, show: bool = True) -> str:
        """curl to the demo server with the kubernetes client certificate."""
        return await demo.run(
            "curl",
            "-sS",
            "--cacert",
            cacert,
            "--cert",
            "kube_client.crt",
            "--key",
            "kube_client.key",
            url,
            check=check,
            show=show,
        )

    _say(3, "curl with a certificate from the kubernetes CA: refused, no federation yet")
    await kube_certificate()
    await demo.federatls("ca", "roots", "cloud_roots.pem", *ca_flags["cloud"])
    refused = await curl("cloud_roots.pem", check=False)
    _show(refused.splitlines()[-1] if refused else "(no answer)")
    if "Hello" in refused:
        raise DemoFailed("the server accepted a kubernetes client without federation")
    await server.wait_for("refused a TLS client", 10)  # the server's log says why
    _show("refused, as expected: the server trusts only the cloud root")

    _say(4, "Federation: each CA lists the other's root under federatedRoots, then SIGHUP")
    for name, other in PAIRS:
        config, _, ca = cas[name]
        data = json.loads(config.read_text())
        data["federatedRoots"] = [root[other]]
        config.write_text(json.dumps(data, indent=2))
        _show(f'{name}: "federatedRoots": ["{root[other]}"]')
        _show(f"$ kill -HUP {ca.proc.pid}   # {name} CA reloads ca.json")
        ca.proc.send_signal(signal.SIGHUP)
    _show("the running server picks the new bundle up at its next renewal (no restart):")
    await server.wait_for("Now accepting certs anchored in CN=kubernetes Root CA", 40)

    _say(5, "The demo client, enrolled with the kubernetes CA, calls the server")
    token = await demo.federatls("ca", "token", "sdk_client", *mint["kubernetes"])
    client = await demo.start(
        "client",
        sys.executable,
        str(EXAMPLES / "client" / "client.py"),
        token,
        url,
        "--every",
        "2",
        "--count",
        "3",
    )
    answer = await client.wait_for("Server responded:", 30)
    if "Hello sdk_client (cert issued by 'kubernetes Root CA')" not in answer:
        raise DemoFailed(f"unexpected answer: {answer}")
    await client.proc.wait()

    _say(6, "curl with the federation bundle and a kubernetes certificate")
    await kube_certificate(force=True)
    await demo.federatls("ca", "federation", "federated.pem", *ca_flags["cloud"])
    hello = await curl("federated.pem")
    _show(hello)
    if "Hello kube_client (cert issued by 'kubernetes Root CA')" not in hello:
        raise DemoFailed(f"unexpected answer: {hello}")

    _say(7, "Live renewal: the server keeps renewing while it serves, never restarted")
    seen = sum(line.startswith("Renewed:") for line in server.lines)
    deadline = time.monotonic() + 40
    while seen < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        seen = sum(line.startswith("Renewed:") for line in server.lines)
    if seen < 2:
        raise DemoFailed("the server did not renew again while the demo ran")
    hello = await curl("federated.pem", show=False)
    _show(f"{seen} renewals so far, same process; it still answers: {hello}")

    await _follow_each_other(demo, cas, root, ca_flags, server)
    root["kubernetes"] = await _rotate(demo, cas, ca_flags, mint, server, url)
    ca_flags["kubernetes"] = ["--ca-url", cas["kubernetes"][1], "--root", root["kubernetes"]]
    mint["kubernetes"] = [*ca_flags["kubernetes"], "--password-file", str(demo.password)]

    if keep:
        _say(10, "Everything keeps running (Ctrl-C to stop)")
        _show(f"server: {url}")
        for name in cas:
            _show(f"{name} CA: {cas[name][1]}  root {root[name]}")
        _show(f"(certificates live {CLAIMS['defaultTLSCertDuration']}: get a fresh one first)")
        _show(f"cd {demo.base}")
        fresh = " ".join(
            [
                "federatls",
                "ca",
                "certificate",
                "kube_client",
                "kube_client.crt",
                "kube_client.key",
                "--force",
                *mint["kubernetes"],
            ]
        )
        _show(fresh.replace(str(demo.base) + "/", ""))
        _show(f"curl --cacert federated.pem --cert kube_client.crt --key kube_client.key {url}")
        await asyncio.Event().wait()  # until Ctrl-C; the workspace is cleaned up on the way out


def _accepted(server: Process) -> set[str]:
    """The roots the demo server accepts now (common names), from what it printed: its first
    list ("Accepting certs anchored in ..."), replaced by the list ("Now accepting ...") that
    follows a renewal whenever its trust changed."""
    current: set[str] = set()
    renewed = False
    for line in server.lines:
        if line.startswith("Renewed:"):
            renewed = True
        elif "ccepting certs anchored in " in line:
            if renewed:
                current, renewed = set(), False
            subject = line.partition(" anchored in ")[2]
            current.add(common_name(x509.Name.from_rfc4514_string(subject)))
    return current


async def _until(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float) -> None:
    """Look again every half second until ``check()`` holds; ``DemoFailed`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if done if isinstance(done, bool) else await done:
            return
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def _federation(demo: Demo, flags: Sequence[str]) -> list[str]:
    """The roots a CA's /federation answers now (common names): ``federatls ca federation``."""
    pem = await demo.federatls("ca", "federation", *flags, show=False)
    return [common_name(root.subject) for root in load_pem_certificates(pem, "/federation")]


async def _federation_when(
    demo: Demo, flags: Sequence[str], what: str, *, present: str = "", absent: str = ""
) -> list[str]:
    """A CA's /federation (common names), once it lists ``present`` and not ``absent``."""
    roots: list[str] = []

    async def check() -> bool:
        roots[:] = await _federation(demo, flags)
        return (not present or present in roots) and absent not in roots

    await _until(check, what, 40)
    return roots


async def _follow_each_other(
    demo: Demo,
    cas: dict[str, tuple[Path, str, Process]],
    root: dict[str, str],
    flags: dict[str, list[str]],
    server: Process,
) -> None:
    """Step 8: each CA's ``federatedRoots`` replaced by the other CA as a federation peer."""
    _say(8, "The CAs follow each other by URL instead of copies of each other's root")
    _show(f"each fetches the other's /roots every {PEER_REFRESH}: the first time pinned to the")
    _show("fingerprint below, then authenticated by the roots it trusts already; 'names' are")
    _show("the names the other's roots may vouch for")
    for name, other in PAIRS:
        config, _, ca = cas[name]
        peer = {
            "name": other,
            "url": cas[other][1],
            "fingerprint": fingerprint(load_pem_certificate(Path(root[other]).read_bytes())),
            "names": NAMES[other],
        }
        data = json.loads(config.read_text())
        data.pop("federatedRoots", None)
        data["federation"] = {"refresh": PEER_REFRESH, "peers": [peer]}
        config.write_text(json.dumps(data, indent=2))
        short = str(peer["fingerprint"])[:16] + "..."  # shown; ca.json has all 64 digits
        _show(f'{name}: "federation": {{"refresh": "{PEER_REFRESH}", "peers": [')
        _show(f"    {json.dumps({**peer, 'fingerprint': short})}]}}")
        _show(f"$ kill -HUP {ca.proc.pid}   # {name} CA reloads ca.json (no federatedRoots now)")
        ca.proc.send_signal(signal.SIGHUP)
    for name, other in PAIRS:
        roots = await _federation_when(
            demo, flags[name], f"{name} following {other}", present=f"{other} Root CA"
        )
        _show(f"{name}'s /federation: {', '.join(roots)}")
    # Had the server renewed between cloud's reload and its first fetch of kubernetes' roots,
    # it would accept kubernetes' root again at its next renewal: wait for that.
    await _until(lambda: OLD_ROOT in _accepted(server), "the server accepting kubernetes", 40)


async def _rotate(
    demo: Demo,
    cas: dict[str, tuple[Path, str, Process]],
    flags: dict[str, list[str]],
    mint: dict[str, list[str]],
    server: Process,
    url: str,
) -> str:
    """Step 9: the kubernetes CA rotates its root in three steps (each applied by SIGHUP) while
    the demo client calls the server twice a second; cloud and the server follow by
    themselves. Returns the path of kubernetes' new root."""
    _say(9, "kubernetes rotates its root while the client keeps calling; cloud follows, no edit")
    k8s_config, _, k8s = cas["kubernetes"]
    directory = k8s_config.parent.parent
    cloud_config = cas["cloud"][0].read_text()
    token = await demo.federatls("ca", "token", "sdk_client", *mint["kubernetes"])
    client = await demo.start(
        "client",
        sys.executable,
        str(EXAMPLES / "client" / "client.py"),
        token,
        url,
        "--every",
        "0.5",
        echo=False,
    )
    _show(f"client | {await client.wait_for('Server responded:', 30)}")
    _show(f"cloud's /federation: {', '.join(await _federation(demo, flags['cloud']))}")

    async def rotate(step: str, *extra: str) -> int:
        """``federatls ca rotate kubernetes STEP`` and SIGHUP; the CA log's length before."""
        said = await demo.federatls("ca", "rotate", str(directory), step, *extra)
        _show(said.splitlines()[0])
        mark = len(k8s.lines)
        _show(f"$ kill -HUP {k8s.proc.pid}")
        k8s.proc.send_signal(signal.SIGHUP)
        await k8s.wait_for("configuration reloaded", 30, mark)
        return mark

    # (1) kubernetes trusts both roots; cloud fetches the new one, its server takes it up.
    mark = await rotate("add-root", "--password-file", str(demo.password))
    roots = await _federation_when(
        demo, flags["cloud"], "cloud learning the new root", present=NEW_ROOT
    )
    _show(f"cloud's /federation: {', '.join(roots)}   (fetched from kubernetes, no edit)")
    await _until(lambda: NEW_ROOT in _accepted(server), "the server accepting the new root", 40)
    # Two renewals of the client since the reload: it trusts the new root for its CA too.
    renewed = ("renewed /", "CN=sdk_client")
    first = await k8s.wait_for_index(renewed, 40, mark)
    await k8s.wait_for_index(renewed, 40, first + 1)

    # (2) kubernetes issues from the new root: the client's next certificate is anchored in it.
    await rotate("issue-from-new-root")
    anchored = await client.wait_for(f"(cert issued by '{NEW_ROOT}')", 40)
    _show(f"client | {anchored}")

    # (3) kubernetes retires the old root; cloud and the server drop it by themselves.
    await rotate("retire-old-roots")
    roots = await _federation_when(
        demo, flags["cloud"], "cloud dropping the old root", absent=OLD_ROOT
    )
    _show(f"cloud's /federation: {', '.join(roots)}")
    await _until(lambda: OLD_ROOT not in _accepted(server), "the server dropping the old root", 40)
    await client.wait_for("Server responded:", 20, len(client.lines))  # still answered

    _signal_group(client.proc, signal.SIGINT)  # stop the client (Ctrl-C): quietly, status 130
    try:
        code = await asyncio.wait_for(client.proc.wait(), 20)
    except TimeoutError:
        raise DemoFailed("the client did not stop on SIGINT") from None
    calls = sum(line.startswith("Server responded:") for line in client.lines)
    if code != 130:  # it ends at its first failed call
        raise DemoFailed(f"the client failed during the rotation: {client.lines[-3:]}")
    if cas["cloud"][0].read_text() != cloud_config:
        raise DemoFailed("cloud's ca.json changed during the rotation")
    _show(f"{calls} calls during the rotation, 0 failed; cloud's ca.json never edited")
    for line in (await demo.federatls("ca", "peers", str(cas["cloud"][0]))).splitlines():
        _show(line)
    data = json.loads(k8s_config.read_text())
    return str(data["root"])


async def _run(keep: bool, stopped: asyncio.Future[int]) -> int:
    """The steps in a workspace that is removed, its processes stopped, whatever happens:
    the steps end, fail, raise, or a stop signal arrives (``stopped`` is then its number)."""
    base = Path(tempfile.mkdtemp(prefix="federatls-demo-"))
    try:
        demo = Demo(base)
        _show(f"(workspace: {base})")
        steps = asyncio.ensure_future(_steps(demo, keep))
        try:
            either: list[asyncio.Future[Any]] = [steps, stopped]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not steps.done():
                steps.cancel()
                await asyncio.gather(steps, return_exceptions=True)
                name = signal.Signals(stopped.result()).name
                print(f"\nfederatls demo: {name}: stopping", file=sys.stderr, flush=True)
                return 128 + stopped.result()
            try:
                steps.result()
            except DemoFailed as exc:
                print(f"\nDEMO FAILED: {exc}", flush=True)
                return 1
        finally:
            await demo.stop_all()  # not cancellable: nothing cancels this task
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        "\nDemo complete: federation works both ways, is required, renews live, and follows "
        "a root rotation with no edit."
    )
    return 0


async def run_demo(*, keep: bool = False) -> int:
    """Run the demo; 0 when every step showed what it should, 128 + N when stopped by
    signal N (SIGINT, SIGTERM, SIGHUP or SIGQUIT; further ones while it cleans up are
    ignored)."""
    if shutil.which("curl") is None:
        print("federatls: error: the demo needs curl (apt-get install curl)", file=sys.stderr)
        return 1
    print("federatls demo: the step-ca federation tutorial, on this machine")
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[int] = loop.create_future()

    def on_signal(signum: int) -> None:
        if not stopped.done():
            stopped.set_result(signum)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await _run(keep, stopped)
    finally:
        # The demo is its process's last act: a stop signal arriving after the cleanup (a
        # repeated Ctrl-C) must not turn into a KeyboardInterrupt or a death by signal on the
        # way out, so the stop signals stay ignored rather than going back to their defaults.
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
