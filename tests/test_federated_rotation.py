"""Root rotation across a federation: CA "kubernetes" rotates its root through the four phases
of tests/test_rotation.py (trust A; A+B issuing from A; A+B issuing from B; B only) while CA
"cloud", a federatls CA, follows it by URL (a federation peer pinned to A's fingerprint,
fetched every second). All the while a client of each CA calls a server of the other over
new connections (a new handshake each time): no request fails, and cloud's ca.json is never
touched. Kubernetes is a federatls CA, then the real step-ca 0.19 (its ``root`` list edited
by the rotation steps and SIGHUP, as an operator would); it lists cloud's root in
``federatedRoots`` (cloud does not rotate here).

Twin: with kubernetes' root A listed statically in cloud's ``federatedRoots`` instead, the
same rotation breaks the traffic both ways once kubernetes issues from B, until an operator
adds B to cloud's ca.json and reloads it.

Kubernetes' workloads hold three-second certificates, renewed about every two seconds (they
must move to B). Cloud's hold ten-minute certificates, never renewed here, and fetch their
trust bundle every second (``RenewalPolicy.trust_refresh``): they follow kubernetes' rotation
by the trust refresh alone. Every wait is for a condition, bounded generously.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from federatls import RenewalPolicy, RenewingIdentity
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import add_root, issue_from_new_root, retire_old_roots

from harness import wait_until
from traffic import (
    CA,
    LONG,
    SERVER_NAMES,
    MakeCA,
    Seen,
    Traffic,
    attempt,
    call,
    drive,
    enrol,
    federatls_ca,
    http_server,
    renewals,
    renewing,
)

pytestmark = pytest.mark.anyio

K8S_NAMES = ["*.k8s.internal", "127.0.0.1"]  # what cloud lets kubernetes' roots vouch for
K8S_SERVER_NAMES = ["server.k8s.internal", "127.0.0.1"]
TRUST_EVERY_SECOND = RenewalPolicy(trust_refresh=timedelta(seconds=1))  # cloud's workloads
WAIT = 30.0  # seconds for any one condition, on a loaded machine


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds, for at most ``WAIT`` seconds (else ``what`` failed)."""
    deadline = anyio.current_time() + WAIT
    while True:
        if await check():
            return
        if anyio.current_time() > deadline:
            raise TimeoutError(f"{what}: not within {WAIT:.0f} s")
        await anyio.sleep(0.2)


async def trust_refreshes(*lives: RenewingIdentity, count: int = 2) -> None:
    """Wait until each of ``lives`` has fetched its trust bundle ``count`` more times."""
    targets = [(live, live.trust_refreshes + count) for live in lives]
    await wait_until(lambda: all(live.trust_refreshes >= n for live, n in targets), WAIT)


async def _has(ca: CA, root: str) -> bool:
    return root in await ca.federation()


async def _lacks(ca: CA, root: str) -> bool:
    return root not in await ca.federation()


def _newest_root(roots: tuple[Path, ...]) -> str:
    return fingerprint(load_pem_certificate(roots[-1].read_bytes()))


@dataclass
class Federation:
    """Both CAs, a server and a client enrolled with each, the client of each CA calling the
    server of the other; roots named "A", "B" (kubernetes) and "C" (cloud)."""

    cloud: CA
    kubernetes: CA
    servers: dict[str, RenewingIdentity]  # by the name of the CA they enrolled with
    clients: dict[str, RenewingIdentity]
    seen: dict[str, Seen]  # what each CA's server saw
    traffic: dict[str, Traffic]  # each CA's client's requests to the other CA's server
    ports: dict[str, int]
    names: dict[str, str] = field(default_factory=dict)

    @property
    def workloads(self) -> list[RenewingIdentity]:
        return [*self.servers.values(), *self.clients.values()]

    def of(self, ca: str) -> list[RenewingIdentity]:
        return [self.servers[ca], self.clients[ca]]

    def name(self, fingerprints: Iterable[str]) -> frozenset[str]:
        return frozenset(self.names.get(f, "?") for f in fingerprints)

    def trust(self, live: RenewingIdentity) -> frozenset[str]:
        return self.name(r.fingerprint for r in live.current.trust)

    def anchor(self, live: RenewingIdentity) -> str:
        identity = live.current
        anchor = identity.trust.anchor_of(identity.chain[-1])
        return self.names.get(anchor.fingerprint, "?") if anchor else "?"

    async def federation(self) -> frozenset[str]:
        """The roots cloud's ``/federation`` answers now."""
        return self.name(await self.cloud.federation())

    def counts(self) -> dict[str, tuple[int, int]]:
        """Requests served and failed so far, by the CA of the client."""
        return {ca: (t.ok, len(t.failures)) for ca, t in self.traffic.items()}

    async def more_requests(self, count: int = 3) -> None:
        """Wait until every client has made ``count`` more requests (served or not)."""
        target = {ca: t.ok + len(t.failures) + count for ca, t in self.traffic.items()}
        await wait_until(
            lambda: all(t.ok + len(t.failures) >= target[ca] for ca, t in self.traffic.items()),
            WAIT,
        )


@contextlib.asynccontextmanager
async def federation(make_ca: MakeCA, *, follow: bool) -> AsyncIterator[Federation]:
    """Cloud (federatls) and kubernetes (``make_ca``), kubernetes listing cloud's root in
    ``federatedRoots``; cloud following kubernetes by URL (``follow``) or listing its root A in
    ``federatedRoots``; then the four workloads, renewing, with traffic both ways."""
    async with federatls_ca("cloud") as cloud, make_ca("kubernetes") as kubernetes:
        await kubernetes.federate(cloud)
        if follow:
            await cloud.follow(kubernetes, K8S_NAMES)
        else:
            await cloud.federate(kubernetes)
        names = {fingerprint(kubernetes.root): "A", fingerprint(cloud.root): "C"}
        await eventually(
            lambda: _has(cloud, fingerprint(kubernetes.root)), "cloud federates with A"
        )
        async with anyio.create_task_group() as tg:
            cloud_server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
            cloud_client = await enrol(cloud, "client.cloud.internal", lifetime=LONG)
            servers = {
                "cloud": await renewing(tg, cloud_server, TRUST_EVERY_SECOND),
                "kubernetes": await renewing(
                    tg, await enrol(kubernetes, "server.k8s.internal", K8S_SERVER_NAMES)
                ),
            }
            clients = {
                "cloud": await renewing(tg, cloud_client, TRUST_EVERY_SECOND),
                "kubernetes": await renewing(tg, await enrol(kubernetes, "client.k8s.internal")),
            }
            seen = {"cloud": Seen(), "kubernetes": Seen()}
            traffic = {"cloud": Traffic(), "kubernetes": Traffic()}
            async with (
                http_server(servers["cloud"], seen["cloud"]) as cloud_port,
                http_server(servers["kubernetes"], seen["kubernetes"]) as k8s_port,
                anyio.create_task_group() as drivers,
            ):
                ports = {"cloud": cloud_port, "kubernetes": k8s_port}
                stop = anyio.Event()
                for ca, other in (("cloud", "kubernetes"), ("kubernetes", "cloud")):
                    get = functools.partial(call, clients[ca], ports[other])
                    drivers.start_soon(drive, get, traffic[ca], stop)
                yield Federation(cloud, kubernetes, servers, clients, seen, traffic, ports, names)
                stop.set()
            for live in [*servers.values(), *clients.values()]:
                assert live.stopped is None, live.stopped
            tg.cancel_scope.cancel()


async def test_peer_rotation_followed_with_live_traffic(make_ca: MakeCA) -> None:
    """Kubernetes rotates its root (add B, issue from B, retire A, each applied by a reload)
    while cloud follows it by URL: cloud's /federation goes from {C, A} to {C, B}, cloud's
    workloads follow by their trust refresh alone and kubernetes' at their renewals, no
    request fails either way, kubernetes' workloads end anchored in B, and cloud's ca.json
    is never edited."""
    async with federation(make_ca, follow=True) as fed:
        cloud_config = fed.cloud.config.read_text()
        old = await enrol(fed.kubernetes, "old.k8s.internal", lifetime=LONG)  # never renewed
        await renewals(*fed.of("kubernetes"), count=1)
        await trust_refreshes(*fed.of("cloud"), count=1)
        await fed.more_requests()
        history = [await fed.federation()]
        counts = [fed.counts()]

        # Phase 1: kubernetes trusts A and B, issues from A; cloud learns B by itself.
        step = add_root(fed.kubernetes.directory, fed.kubernetes.password, now=datetime.now(UTC))
        b = _newest_root(step.roots)
        fed.names[b] = "B"
        await fed.kubernetes.reload()
        await eventually(lambda: _has(fed.cloud, b), "cloud learns B")
        await wait_until(lambda: all("B" in fed.trust(w) for w in fed.workloads), WAIT)
        await fed.more_requests()
        history.append(await fed.federation())
        counts.append(fed.counts())
        served_in_phase_1 = await attempt(old, fed.ports["cloud"])

        # Phase 2: kubernetes issues from B; its workloads renew onto B.
        issue_from_new_root(fed.kubernetes.directory)
        await fed.kubernetes.reload()
        await wait_until(lambda: all(fed.anchor(w) == "B" for w in fed.of("kubernetes")), WAIT)
        await fed.more_requests()
        history.append(await fed.federation())
        counts.append(fed.counts())

        # Phase 3: kubernetes retires A; cloud drops it by itself, and so do the workloads.
        retire_old_roots(fed.kubernetes.directory)
        await fed.kubernetes.reload()
        await eventually(
            lambda: _lacks(fed.cloud, fingerprint(fed.kubernetes.root)), "cloud drops A"
        )
        await wait_until(lambda: all("A" not in fed.trust(w) for w in fed.workloads), WAIT)
        await fed.more_requests()
        history.append(await fed.federation())
        counts.append(fed.counts())
        refused_in_phase_3 = await attempt(old, fed.ports["cloud"])

        final_trust = {ca: fed.trust(fed.servers[ca]) for ca in fed.servers}
        final_anchors = {ca: fed.anchor(fed.clients[ca]) for ca in fed.clients}
        k8s_client_seen = fed.seen["cloud"].of("client.k8s.internal")[-1].anchor
        k8s_server_seen = fed.traffic["cloud"].server_anchors[-1]
        unchanged = fed.cloud.config.read_text() == cloud_config
        cloud_renewals = [w.renewals for w in fed.of("cloud")]
        failures = {ca: t.failures for ca, t in fed.traffic.items()}

    assert history == [
        frozenset("CA"),
        frozenset("CAB"),
        frozenset("CAB"),
        frozenset("CB"),
    ]
    assert failures == {"cloud": [], "kubernetes": []}, failures
    for earlier, later in itertools.pairwise(counts):  # traffic in every phase
        for ca in ("cloud", "kubernetes"):
            assert earlier[ca][0] < later[ca][0]
    assert final_anchors == {"cloud": "C", "kubernetes": "B"}
    assert k8s_client_seen is not None
    assert fed.names.get(k8s_client_seen.fingerprint) == "B"  # cloud's server saw it
    assert fed.names.get(k8s_server_seen) == "B"  # and cloud's client saw kubernetes' server
    assert final_trust == {"cloud": frozenset("CB"), "kubernetes": frozenset("BC")}
    assert served_in_phase_1 == "served"
    assert refused_in_phase_3 == "cut-off"  # cloud's server no longer trusts A
    assert unchanged
    assert cloud_renewals == [0, 0]  # cloud's workloads followed by the trust refresh alone


async def test_static_federation_breaks_when_the_peer_rotates(make_ca: MakeCA) -> None:
    """Twin: with kubernetes' root A in cloud's static federatedRoots, cloud never learns B, so
    once kubernetes issues from B its client is refused by cloud's server and its server by
    cloud's client, until B is added to cloud's ca.json by hand and cloud reloaded."""
    async with federation(make_ca, follow=False) as fed:
        await renewals(*fed.of("kubernetes"), count=1)
        await trust_refreshes(*fed.of("cloud"), count=1)
        await fed.more_requests()
        before = fed.counts()

        step = add_root(fed.kubernetes.directory, fed.kubernetes.password, now=datetime.now(UTC))
        b = _newest_root(step.roots)
        fed.names[b] = "B"
        await fed.kubernetes.reload()
        await wait_until(lambda: all("B" in fed.trust(w) for w in fed.of("kubernetes")), WAIT)
        await trust_refreshes(*fed.of("cloud"))  # cloud's workloads looked again: no B there
        cloud_trust_in_phase_1 = {fed.trust(w) for w in fed.of("cloud")}
        federation_in_phase_1 = await fed.federation()
        await fed.more_requests()
        phase_1 = fed.counts()

        issue_from_new_root(fed.kubernetes.directory)
        await fed.kubernetes.reload()
        await wait_until(lambda: all(fed.anchor(w) == "B" for w in fed.of("kubernetes")), WAIT)
        await wait_until(lambda: all(t.failures for t in fed.traffic.values()), WAIT)
        broken = {ca: list(t.failures) for ca, t in fed.traffic.items()}

        # The edit an operator must make, in step: B in cloud's federatedRoots, and a reload.
        fed.cloud.edit(
            lambda d: d.__setitem__(
                "federatedRoots", [str(fed.kubernetes.root_path), str(step.roots[-1])]
            )
        )
        await fed.cloud.reload()
        await wait_until(lambda: all("B" in fed.trust(w) for w in fed.of("cloud")), WAIT)
        mended = fed.counts()
        await fed.more_requests()
        final = fed.counts()

    assert before["cloud"][1] == before["kubernetes"][1] == 0
    assert federation_in_phase_1 == frozenset("CA")
    assert cloud_trust_in_phase_1 == {frozenset("CA")}
    assert phase_1["cloud"][1] == phase_1["kubernetes"][1] == 0  # phase 1 still fine
    # Cloud's client refuses kubernetes' server (anchored in B, unknown to cloud) ...
    assert all(isinstance(e, ssl.SSLCertVerificationError) for e in broken["cloud"]), broken
    # ... and cloud's server refuses kubernetes' client: cut off after the handshake (TLS 1.3),
    # no answer at all.
    assert all(isinstance(e, AssertionError) and e.args == (b"",) for e in broken["kubernetes"])
    # With the edit, traffic flows again both ways: every request since is served.
    for ca in ("cloud", "kubernetes"):
        assert final[ca][0] >= mended[ca][0] + 3
        assert final[ca][1] == mended[ca][1]
