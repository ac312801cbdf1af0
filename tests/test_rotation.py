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

import functools
import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

import federatls
from federatls import Identity, PeerInfo, RenewingIdentity
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import add_root, issue_from_new_root, retire_old_roots
from federatls.integrations import httpx as fhttpx

from harness import PASSWORD, make_pki, wait_until
from traffic import (
    LONG,
    SERVER_NAMES,
    MakeCA,
    Seen,
    Traffic,
    attempt,
    call,
    drive,
    enrol,
    http_server,
    renewals,
    renewing,
)

pytestmark = pytest.mark.anyio


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
                drivers.start_soon(drive, functools.partial(call, client, port), fresh, stop)
                drivers.start_soon(drive, keep_alive, pooled, stop)

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
