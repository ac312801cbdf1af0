"""Root rotation on the CA: ca.json holds several roots; the intermediate can be replaced; the
four phases: (0) root A; (1) bundle A+B, certificates from A; (2) bundle A+B, certificates
from B; (3) bundle B only. A live server and client keep talking through every phase with no
restart and no failed request; after phase 3 a certificate anchored in A is refused.
Federation changes reach live workloads: a root added to federatedRoots (then a reload, as
SIGHUP does) lets the other side in at the next refresh; a root removed shuts it out at the
next refresh.

Every scenario runs on the federatls CA and on the real step-ca 0.19 (SIGHUP), with the same
ca.json edits made by ``federatls.ca``'s rotation steps. Certificates last three seconds and
renew about every two, so each phase sees a couple of renewals of every workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import pytest
from anyio.abc import TaskGroup
from cryptography import x509

import federatls
from federatls import Identity, PeerInfo, RenewingIdentity
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import add_root, issue_from_new_root, retire_old_roots
from federatls.integrations import httpx as fhttpx
from federatls.integrations import streams
from federatls.testing import running_ca

from harness import PASSWORD, make_pki, stepca_process, wait_until

pytestmark = pytest.mark.anyio

SHORT = {"minTLSCertDuration": "1s", "defaultTLSCertDuration": "3s", "maxTLSCertDuration": "1h"}
LONG = timedelta(minutes=10)  # identities renewed by hand, or never
SERVER_NAMES = ["server.cloud.internal", "127.0.0.1", "localhost"]
Source = Identity | RenewingIdentity


# CAs under test: the federatls CA and the real step-ca, driven alike -------------------------
def _served_serial(url: str) -> int:
    """The serial of the TLS certificate the CA serves right now (no verification)."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    pem = ssl.get_server_certificate((parts.hostname, parts.port), timeout=5)
    return load_pem_certificate(pem.encode()).serial_number


@dataclass
class CA:
    """A running CA whose ca.json a test edits: its files, its URL, tokens minted now, and a
    reload that returns once the CA serves the new configuration."""

    name: str
    directory: Path
    password: bytes
    root_path: Path
    url: str
    mint: Callable[[str, Sequence[str]], str]
    signal_reload: Callable[[], None]  # TestCA.reload, or SIGHUP to step-ca

    @property
    def config(self) -> Path:
        return self.directory / "config" / "ca.json"

    @property
    def root(self) -> x509.Certificate:
        return load_pem_certificate(self.root_path.read_bytes())

    async def reload(self) -> None:
        """Apply ca.json; wait until the CA serves with it (both CAs issue themselves a new
        TLS certificate when they reload)."""
        before = await anyio.to_thread.run_sync(_served_serial, self.url)
        await anyio.to_thread.run_sync(self.signal_reload)
        served = [before]

        def reloaded() -> bool:
            try:
                served.append(_served_serial(self.url))
            except OSError:
                return False
            return served[-1] != before

        with anyio.fail_after(20):
            while True:
                if await anyio.to_thread.run_sync(reloaded):
                    return
                await anyio.sleep(0.1)

    async def federate(self, *others: CA) -> None:
        """List ``others``' roots in ``federatedRoots`` and reload."""
        data = json.loads(self.config.read_text())
        data["federatedRoots"] = [str(o.root_path) for o in others]
        self.config.write_text(json.dumps(data, indent=2))
        await self.reload()


MakeCA = Callable[[str], contextlib.AbstractAsyncContextManager[CA]]


@contextlib.asynccontextmanager
async def _federatls_ca(name: str) -> AsyncIterator[CA]:
    with running_ca(name, claims=SHORT, backdate="1s") as ca:
        yield CA(
            name,
            ca.directory,
            ca.password,
            ca.root_path,
            ca.url,
            lambda subject, sans: ca.token(subject, sans=sans),
            ca.reload,
        )


def _stepca_maker(binary: str, base: Path) -> MakeCA:
    @contextlib.asynccontextmanager
    async def make(name: str) -> AsyncIterator[CA]:
        pki = make_pki(base, name)
        pki.set_claims(**SHORT)
        pki.edit(lambda data: data["authority"].__setitem__("backdate", "1s"))
        with stepca_process(binary, pki) as proc:
            yield CA(
                name,
                pki.directory,
                PASSWORD,
                pki.root_path,
                pki.url,
                lambda subject, sans: pki.token(subject, sans=sans),
                lambda: proc.send_signal(signal.SIGHUP),
            )

    return make


@pytest.fixture(
    params=["federatls", pytest.param("step-ca", marks=pytest.mark.stepca)],
)
def make_ca(request: pytest.FixtureRequest, tmp_path: Path) -> MakeCA:
    """Starts a CA with 3-second certificates: the federatls CA, or the real step-ca."""
    if request.param == "federatls":
        return _federatls_ca
    return _stepca_maker(request.getfixturevalue("stepca_bin"), tmp_path)


async def enrol(
    ca: CA, subject: str, sans: list[str] | None = None, lifetime: timedelta | None = None
) -> Identity:
    return await federatls.bootstrap(ca.mint(subject, sans or [subject]), lifetime=lifetime)


async def renewing(tg: TaskGroup, identity: Identity) -> RenewingIdentity:
    live = RenewingIdentity(identity)
    await tg.start(live.run)
    return live


async def renewals(*lives: RenewingIdentity, count: int = 2, timeout: float = 20) -> None:
    """Wait until each of ``lives`` has renewed ``count`` more times (so at least one whole
    refresh began after whatever the caller just changed)."""
    targets = [(live, live.renewals + count) for live in lives]
    with anyio.fail_after(timeout):
        for live, target in targets:
            while live.renewals < target:
                assert live.stopped is None, live.stopped
                await live.wait_for_update()


# A server and clients that say what they saw --------------------------------------------------
@dataclass
class Seen:
    """What the server saw: each connection's client (common name, serial, anchor) and the
    requests it answered."""

    clients: list[PeerInfo] = field(default_factory=list)
    handled: int = 0

    def of(self, common_name: str) -> list[PeerInfo]:
        return [p for p in self.clients if p.common_name == common_name]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def http_server(source: Source, seen: Seen) -> AsyncIterator[int]:
    """A minimal keep-alive HTTP/1.1 server on ``streams.start_server`` (127.0.0.1:0)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.clients.append(source.peer(writer))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.handled += 1
                close = b"connection: close" in head.lower()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n%s\r\nok"
                    % (b"Connection: close\r\n" if close else b"")
                )
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return
        finally:
            await _close(writer)

    server = await streams.start_server(source, handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Send one request; everything that comes back (b"" if the server cut us off)."""
    data = b""
    try:
        writer.write(REQUEST)
        await writer.drain()
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return data


async def attempt(client: Source | ssl.SSLContext, port: int) -> str:
    """One request: "served", "cut-off" (the server refused us after the handshake), or
    "server-unknown" (we refused the server's certificate)."""
    try:
        if isinstance(client, ssl.SSLContext):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
            )
        else:
            reader, writer = await streams.open_connection(client, "127.0.0.1", port)
    except ssl.SSLCertVerificationError:
        return "server-unknown"
    try:
        data = await _exchange(reader, writer)
    finally:
        await _close(writer)
    if data.startswith(b"HTTP/1.1 200 OK"):
        return "served"
    assert data == b"", data
    return "cut-off"


@dataclass
class Traffic:
    """A client's continuous requests: anchors of the servers it reached, successes, failures."""

    server_anchors: list[str] = field(default_factory=list)
    ok: int = 0
    failures: list[BaseException] = field(default_factory=list)


Get = Callable[[], Awaitable[PeerInfo]]


async def _drive(get: Get, traffic: Traffic, stop: anyio.Event) -> None:
    while not stop.is_set():
        try:
            server = await get()
        except Exception as exc:
            traffic.failures.append(exc)
        else:
            traffic.ok += 1
            traffic.server_anchors.append(server.anchor.fingerprint if server.anchor else "")
        await anyio.sleep(0.05)


# 1. The four phases of a root rotation --------------------------------------------------------
@dataclass(frozen=True)
class State:
    """A phase as the workloads saw it, roots named "A" and "B"."""

    server_trust: frozenset[str]
    server_anchor: str
    client_trust: frozenset[str]
    client_anchor: str
    client_as_seen_by_server: str  # the anchor of the client on the newest connection
    server_as_seen_by_client: str  # the anchor of the server on the newest request


EXPECTED = [
    State(frozenset("A"), "A", frozenset("A"), "A", "A", "A"),
    State(frozenset("AB"), "A", frozenset("AB"), "A", "A", "A"),
    State(frozenset("AB"), "B", frozenset("AB"), "B", "B", "B"),
    State(frozenset("B"), "B", frozenset("B"), "B", "B", "B"),
]


async def test_four_phases_with_live_traffic(make_ca: MakeCA) -> None:
    """A live server and client keep talking through the four phases of a root rotation
    (trust A; A+B issuing from A; A+B issuing from B; B) with no failed request, each phase
    reaching both within a couple of renewals; after it, an identity anchored in A that was
    served in phase 1 is refused."""
    states: list[State] = []
    ok_by_phase: list[tuple[int, int]] = []
    seen = Seen()
    async with make_ca("cloud") as ca:
        names = {fingerprint(ca.root): "A"}
        old = await enrol(ca, "old.cloud.internal", lifetime=LONG)  # never renewed
        async with anyio.create_task_group() as tg:
            server = await renewing(tg, await enrol(ca, "server.cloud.internal", SERVER_NAMES))
            client = await renewing(tg, await enrol(ca, "client.cloud.internal"))

            def name(identity: Identity) -> str:
                anchor = identity.trust.anchor_of(identity.chain[-1])
                assert anchor is not None
                return names.get(anchor.fingerprint, "?")

            def trust(identity: Identity) -> frozenset[str]:
                return frozenset(names.get(r.fingerprint, "?") for r in identity.trust)

            fresh = Traffic()  # a new connection, so a new handshake, for every request
            pooled = Traffic()  # httpx keep-alive, the pool recycled after each renewal

            async def new_connection() -> PeerInfo:
                reader, writer = await streams.open_connection(client, "127.0.0.1", port)
                try:
                    peer = client.peer(writer)
                    assert (await _exchange(reader, writer)).startswith(b"HTTP/1.1 200 OK")
                finally:
                    await _close(writer)
                return peer

            async def state() -> State:
                # A few more new connections, all made after the last swap of either side.
                target = fresh.ok + len(fresh.failures) + 3
                await wait_until(lambda: fresh.ok + len(fresh.failures) >= target)
                newest = seen.of("client.cloud.internal")[-1]
                assert newest.anchor is not None
                return State(
                    trust(server.current),
                    name(server.current),
                    trust(client.current),
                    name(client.current),
                    names.get(newest.anchor.fingerprint, "?"),
                    names.get(fresh.server_anchors[-1], "?"),
                )

            async with (
                http_server(server, seen) as port,
                fhttpx.AsyncClient(client) as http,
                anyio.create_task_group() as drivers,
            ):

                async def keep_alive() -> PeerInfo:
                    response = await http.get(f"https://127.0.0.1:{port}/")
                    assert (response.status_code, response.text) == (200, "ok")
                    return client.peer(response)

                stop = anyio.Event()
                drivers.start_soon(_drive, new_connection, fresh, stop)
                drivers.start_soon(_drive, keep_alive, pooled, stop)

                await renewals(server, client, count=1)
                states.append(await state())
                ok_by_phase.append((fresh.ok, pooled.ok))

                step = add_root(ca.directory, ca.password, now=datetime.now(UTC))
                names[fingerprint(load_pem_certificate(step.roots[-1].read_bytes()))] = "B"
                roots_in_config = json.loads(ca.config.read_text())["root"]
                await ca.reload()
                await renewals(server, client)
                states.append(await state())
                ok_by_phase.append((fresh.ok, pooled.ok))
                # Phase 1: the never-renewed identity (anchored in A) is still served.
                before = old.client_context()
                before.load_verify_locations(cadata=step.roots[-1].read_text())
                served_in_phase_1 = await attempt(before, port)

                issue_from_new_root(ca.directory)
                await ca.reload()
                await renewals(server, client)
                states.append(await state())
                ok_by_phase.append((fresh.ok, pooled.ok))

                retire_old_roots(ca.directory)
                await ca.reload()
                await renewals(server, client)
                states.append(await state())
                ok_by_phase.append((fresh.ok, pooled.ok))
                after = old.client_context()
                after.load_verify_locations(cadata=step.roots[-1].read_text())
                refused_in_phase_3 = await attempt(after, port)
                stop.set()
            tg.cancel_scope.cancel()

    assert isinstance(roots_in_config, list)
    assert len(roots_in_config) == 2
    assert states == EXPECTED
    assert fresh.failures == [], fresh.failures[:3]
    assert pooled.failures == [], pooled.failures[:3]
    for earlier, later in itertools.pairwise(ok_by_phase):  # both kept talking in every phase
        assert earlier[0] < later[0]
        assert earlier[1] < later[1]
    assert served_in_phase_1 == "served"
    assert refused_in_phase_3 == "cut-off"
    assert [p.serial for p in seen.of("old.cloud.internal")] == [old.serial]  # once, in phase 1
    assert server.stopped is None
    assert client.stopped is None


# 2. Federation changes reach live workloads ---------------------------------------------------
async def test_federation_change_waits_for_the_next_refresh(make_ca: MakeCA) -> None:
    """A root added to (or removed from) federatedRoots changes nothing for a workload until
    its next refresh, and then takes effect on new connections at once."""
    async with make_ca("cloud") as cloud, make_ca("kubernetes") as kubernetes:
        server = RenewingIdentity(await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG))
        client = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal", lifetime=LONG))
        seen = Seen()
        outcomes: list[str] = []
        async with http_server(server, seen) as port:
            outcomes.append(await attempt(client, port))
            await cloud.federate(kubernetes)
            await kubernetes.federate(cloud)
            outcomes.append(await attempt(client, port))  # CAs reloaded, workloads not yet
            await client.refresh()
            outcomes.append(await attempt(client, port))  # the client now trusts cloud
            await server.refresh()
            outcomes.append(await attempt(client, port))  # and the server kubernetes
            await cloud.federate()
            outcomes.append(await attempt(client, port))  # until the server's next refresh
            await server.refresh()
            outcomes.append(await attempt(client, port))
    assert outcomes == [
        "server-unknown",
        "server-unknown",
        "cut-off",
        "served",
        "served",
        "cut-off",
    ]
    assert seen.handled == 2
    assert [p.serial for p in seen.of("client.k8s.internal")] == [client.current.serial] * 2


async def test_federation_added_and_removed_with_renewing_workloads(make_ca: MakeCA) -> None:
    """With both workloads renewing on their own, cross-CA traffic is refused before
    federation, served within two refreshes of federating both ways, and refused again
    within two refreshes of cloud dropping kubernetes."""
    async with make_ca("cloud") as cloud, make_ca("kubernetes") as kubernetes:
        k8s_root = fingerprint(kubernetes.root)
        cloud_root = fingerprint(cloud.root)
        seen = Seen()
        async with anyio.create_task_group() as tg:
            server = await renewing(tg, await enrol(cloud, "server.cloud.internal", SERVER_NAMES))
            client = await renewing(tg, await enrol(kubernetes, "client.k8s.internal"))
            async with http_server(server, seen) as port:
                before = await attempt(client, port)
                await cloud.federate(kubernetes)
                await kubernetes.federate(cloud)
                await renewals(server, client)
                server_trusts = {r.fingerprint for r in server.current.trust}
                client_trusts = {r.fingerprint for r in client.current.trust}
                federated = [await attempt(client, port) for _ in range(3)]
                await cloud.federate()
                await renewals(server)
                server_trusts_after = {r.fingerprint for r in server.current.trust}
                removed = [await attempt(client, port) for _ in range(3)]
            tg.cancel_scope.cancel()
    assert before == "server-unknown"
    assert server_trusts == {cloud_root, k8s_root}
    assert client_trusts == {cloud_root, k8s_root}
    assert federated == ["served"] * 3
    assert server_trusts_after == {cloud_root}
    assert removed == ["cut-off"] * 3
    assert seen.handled == 3
    assert server.stopped is None
    assert client.stopped is None


# 3. The rotation steps themselves ------------------------------------------------------------
def test_rotation_steps_in_order(tmp_path: Path) -> None:
    """add_root, issue_from_new_root, retire_old_roots in order take ca.json from root A to
    root B only, issuing from B's intermediate."""
    pki = make_pki(tmp_path, "cloud")
    first = add_root(pki.directory, PASSWORD, now=datetime.now(UTC))
    second = issue_from_new_root(pki.directory)
    third = retire_old_roots(pki.directory)
    data = json.loads(pki.config.read_text())
    assert [p.name for p in first.roots] == ["root_ca.crt", "root_ca-2.crt"]
    assert second.issuer.name == "intermediate_ca-2.crt"
    assert [p.name for p in third.roots] == ["root_ca-2.crt"]
    assert "retired root_ca.crt; trusting root_ca-2.crt only" in third.summary
    assert Path(data["root"]).name == "root_ca-2.crt"
    assert Path(data["crt"]).name == "intermediate_ca-2.crt"
    assert Path(data["key"]).name == "intermediate_ca-2_key"


def test_rotation_steps_refuse_to_run_early(tmp_path: Path) -> None:
    """Twin: issuing from a new root before one is added, or retiring while every root is the
    issuer's, is refused and leaves ca.json untouched."""
    pki = make_pki(tmp_path, "cloud")
    original = pki.config.read_text()
    with pytest.raises(federatls.ConfigError, match="run the add-root step first"):
        issue_from_new_root(pki.directory)
    with pytest.raises(federatls.ConfigError, match="nothing to retire"):
        retire_old_roots(pki.directory)
    assert pki.config.read_text() == original


def test_retiring_before_issuing_from_the_new_root_is_refused(tmp_path: Path) -> None:
    """Skipping phase 2 (retire_old_roots straight after add_root) is refused, as the error
    text of the step ("run the add-root and issue-from-new-root steps first") promises,
    rather than quietly dropping the root just added."""
    pki = make_pki(tmp_path, "cloud")
    add_root(pki.directory, PASSWORD, now=datetime.now(UTC))
    phase_1 = pki.config.read_text()
    try:
        with pytest.raises(federatls.ConfigError, match="run issue-from-new-root first"):
            retire_old_roots(pki.directory)
    finally:
        assert pki.config.read_text() == phase_1
