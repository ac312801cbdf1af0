"""A federatls CA following SPIFFE bundle endpoints (ca.json ``federation.peers`` with
``"profile": "https_spiffe"`` or ``"https_web"``): the peer's roots reach ``/federation`` and
follow its rotation, a peer that is not the configured one is never trusted, a lower
``spiffe_sequence`` is ignored, ``"keys": []`` distrusts the peer. The peers are a test bundle
endpoint on 127.0.0.1 (tests/spiffe_endpoint.py) and another federatls CA's
``/spiffe/bundle``; the follower polls every second (the bundles hint 1 s).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from federatls._client import client_tls_context
from federatls._x509 import fingerprint, load_pem_certificate, load_pem_certificates
from federatls.ca import CAServer, add_root
from spiffe_endpoint import BundleEndpoint, TrustDomain

from harness import PASSWORD, PKI, make_pki, serving, wait_until

pytestmark = pytest.mark.anyio

ENDPOINT_ID = "spiffe://spire.internal/spire/server"
WAIT = 30.0  # seconds: generous, for a loaded machine; each wait ends as soon as it holds


async def federation(ca: CAServer) -> set[str]:
    """The fingerprints ``GET /federation`` answers."""
    async with httpx.AsyncClient(
        verify=client_tls_context(ca.authority.roots()), trust_env=False
    ) as client:
        answer = await client.get(ca.url + "/federation")
    assert answer.status_code == 201
    return {fingerprint(c) for c in load_pem_certificates("".join(answer.json()["crts"]))}


async def until(check: Callable[[], Any], what: str) -> None:
    """Wait (at most WAIT seconds) until the async ``check()`` is true."""
    with anyio.fail_after(WAIT):
        while True:
            if await check():
                return
            await anyio.sleep(0.1)


async def fetched_again(endpoint: BundleEndpoint, times: int = 2) -> None:
    """Wait until the endpoint has answered ``times`` more fetches."""
    target = endpoint.fetches + times
    await wait_until(lambda: endpoint.fetches >= target, WAIT)


def prints(certs: list[x509.Certificate]) -> set[str]:
    return {fingerprint(c) for c in certs}


def follow(pki: PKI, peer: dict[str, Any]) -> None:
    """``pki``'s CA follows ``peer`` (refresh 1 s), with the names of its trust domain."""
    entry = {"name": "spire", "names": [f"spiffe://{peer['trustDomain']}/*"], **peer}
    pki.edit(lambda d: d.__setitem__("federation", {"refresh": "1s", "peers": [entry]}))


def spiffe_peer(url: str, bundle: Path, endpoint_id: str = ENDPOINT_ID) -> dict[str, Any]:
    return {
        "profile": "https_spiffe",
        "url": url,
        "trustDomain": "spire.internal",
        "endpointSpiffeId": endpoint_id,
        "bundle": str(bundle),
    }


@pytest.fixture
def spire() -> TrustDomain:
    return TrustDomain("spire.internal")


@pytest.fixture
def initial(tmp_path: Path, spire: TrustDomain) -> Path:
    path = tmp_path / "spire-bundle.json"
    path.write_text(json.dumps(spire.bundle()))
    return path


@pytest.fixture
def web_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A Web PKI of the test's own, the CA process's system trust store (SSL_CERT_FILE)."""
    ca = trustme.CA()
    path = tmp_path / "web-roots.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return ca


def web_cert(ca: trustme.CA, host: str) -> tuple[x509.Certificate, Any]:
    leaf = ca.issue_cert(host)
    cert = load_pem_certificate(leaf.cert_chain_pems[0].bytes())
    return cert, load_pem_private_key(leaf.private_key_pem.bytes(), None)


@pytest.mark.parametrize("profile", ["https_spiffe", "https_web"])
async def test_a_spiffe_peer_is_followed_through_its_rotation(
    pki: PKI, spire: TrustDomain, initial: Path, profile: str, request: pytest.FixtureRequest
) -> None:
    """The peer's root reaches /federation; the peer publishes root B, then (its endpoint now
    presenting an SVID from B) withdraws A: /federation follows with no edit, each fetch
    authenticated by the roots trusted then. Twin: A is gone after the withdrawal, and the
    next tests, where the endpoint is not the configured one."""
    a = spire.roots[0]
    if profile == "https_spiffe":
        certificate = spire.svid(ENDPOINT_ID)
    else:
        certificate = web_cert(request.getfixturevalue("web_ca"), "127.0.0.1")
    async with BundleEndpoint.running(certificate, spire.bundle(1)) as endpoint:
        if profile == "https_spiffe":
            follow(pki, spiffe_peer(endpoint.url, initial))
        else:
            follow(
                pki, {"profile": "https_web", "url": endpoint.url, "trustDomain": "spire.internal"}
            )
        async with serving(pki) as ca:
            await until(lambda: _has(ca, a), "root A followed")
            b = spire.new_root()  # published before it issues (SPIFFE Federation 4.1)
            endpoint.body = spire.bundle(2)
            await until(lambda: _has(ca, a, b), "roots A and B followed")
            if profile == "https_spiffe":
                endpoint.present(*spire.svid(ENDPOINT_ID))
            endpoint.body = {**spire.bundle(3), "keys": spire.bundle()["keys"][1:]}
            await until(lambda: _lacks(ca, a), "root A dropped")
            assert fingerprint(b) in await federation(ca)
            assert fingerprint(pki.root) in await federation(ca)


async def _has(ca: CAServer, *roots: x509.Certificate) -> bool:
    return prints(list(roots)) <= await federation(ca)


async def _lacks(ca: CAServer, root: x509.Certificate) -> bool:
    return fingerprint(root) not in await federation(ca)


async def test_a_wrong_endpoint_spiffe_id_is_never_followed(
    pki: PKI, spire: TrustDomain, initial: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint of the right trust domain presenting another workload's SVID is asked
    nothing (refused right after the handshake), its roots never reach /federation and the
    refusal is logged. Twin: the previous test, with the right ID."""
    async with BundleEndpoint.running(
        spire.svid("spiffe://spire.internal/other"), spire.bundle()
    ) as endpoint:
        follow(pki, spiffe_peer(endpoint.url, initial))
        with caplog.at_level(logging.INFO, logger="federatls.ca"):
            async with serving(pki) as ca:
                await wait_until(lambda: "presented the SPIFFE ID" in caplog.text, WAIT)
                assert fingerprint(spire.roots[0]) not in await federation(ca)
    assert "presented the SPIFFE ID 'spiffe://spire.internal/other'" in caplog.text
    assert endpoint.fetches == 0


async def test_an_svid_from_another_trust_domain_is_never_followed(
    pki: PKI, spire: TrustDomain, initial: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint with the right SPIFFE ID from another trust domain's root fails its
    handshake: no root of its bundle is trusted. Twin: the first test."""
    evil = TrustDomain("evil.internal")
    async with BundleEndpoint.running(evil.svid(ENDPOINT_ID), evil.bundle()) as endpoint:
        follow(pki, spiffe_peer(endpoint.url, initial))
        with caplog.at_level(logging.INFO, logger="federatls.ca"):
            async with serving(pki) as ca:
                await wait_until(lambda: "not authenticated" in caplog.text, WAIT)
                assert fingerprint(evil.roots[0]) not in await federation(ca)
                assert fingerprint(spire.roots[0]) not in await federation(ca)
    assert endpoint.fetches == 0


async def test_a_web_pki_host_mismatch_is_never_followed(
    pki: PKI, spire: TrustDomain, web_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """An https_web endpoint whose trusted certificate names another host is refused (host
    name checked). Twin: the first test's https_web case, a certificate for 127.0.0.1."""
    certificate = web_cert(web_ca, "bundle.web.internal")
    async with BundleEndpoint.running(certificate, spire.bundle()) as endpoint:
        follow(pki, {"profile": "https_web", "url": endpoint.url, "trustDomain": "spire.internal"})
        with caplog.at_level(logging.INFO, logger="federatls.ca"):
            async with serving(pki) as ca:
                await wait_until(lambda: "not authenticated" in caplog.text, WAIT)
                assert fingerprint(spire.roots[0]) not in await federation(ca)
    assert endpoint.fetches == 0


async def test_a_lower_spiffe_sequence_is_ignored(
    pki: PKI, spire: TrustDomain, initial: Path
) -> None:
    """Followed at sequence 5 (root A), the peer then serves sequence 4 with root B only: two
    fetches later /federation still has A and not B. Twin: sequence 6 with B is adopted."""
    a = spire.roots[0]
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), spire.bundle(5)) as endpoint:
        follow(pki, spiffe_peer(endpoint.url, initial))
        async with serving(pki) as ca:
            await until(lambda: _has(ca, a), "root A followed")
            b = spire.new_root()
            endpoint.body = {**spire.bundle(4), "keys": spire.bundle()["keys"][1:]}
            await fetched_again(endpoint, 2)
            held = await federation(ca)
            assert fingerprint(a) in held
            assert fingerprint(b) not in held
            endpoint.body = {**spire.bundle(6), "keys": spire.bundle()["keys"][1:]}
            await until(lambda: _has(ca, b), "root B adopted")
            assert fingerprint(a) not in await federation(ca)


async def test_an_empty_keys_list_distrusts_the_peer(
    pki: PKI, spire: TrustDomain, initial: Path
) -> None:
    """``"keys": []`` from the peer takes its roots out of /federation. Twin: they were
    there before, and the CA's own root stays."""
    a = spire.roots[0]
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), spire.bundle(1)) as endpoint:
        follow(pki, spiffe_peer(endpoint.url, initial))
        async with serving(pki) as ca:
            await until(lambda: _has(ca, a), "root A followed")
            endpoint.body = {"spiffe_sequence": 2, "spiffe_refresh_hint": 1, "keys": []}
            await until(lambda: _lacks(ca, a), "root A distrusted")
            assert fingerprint(pki.root) in await federation(ca)


async def test_a_federatls_ca_follows_another_through_its_spiffe_bundle(
    tmp_path: Path, pki: PKI
) -> None:
    """The kubernetes CA serves /spiffe/bundle (trust domain k8s.internal); the cloud CA
    follows it in the https_spiffe profile, bootstrapped by a copy of that bundle. The
    kubernetes CA then adds a root and reloads: the cloud CA's /federation has it within a
    few refreshes, with no edit. Twin: not before the rotation."""
    k8s = make_pki(tmp_path, "kubernetes")
    k8s.edit(
        lambda d: d.update(spiffe={"trustDomain": "k8s.internal"}, federation={"refresh": "1s"})
    )
    async with serving(k8s) as k8s_ca:
        async with httpx.AsyncClient(
            verify=client_tls_context([k8s.root]), trust_env=False
        ) as client:
            answer = await client.get(k8s_ca.url + "/spiffe/bundle")
        initial = tmp_path / "k8s-bundle.json"
        initial.write_bytes(answer.content)
        follow(
            pki,
            {
                "profile": "https_spiffe",
                "url": k8s_ca.url + "/spiffe/bundle",
                "trustDomain": "k8s.internal",
                "endpointSpiffeId": "spiffe://k8s.internal/federatls/ca",
                "bundle": str(initial),
            },
        )
        async with serving(pki) as cloud:
            await until(lambda: _has(cloud, k8s.root), "the kubernetes root followed")
            step = add_root(k8s.directory, PASSWORD, now=datetime.now(UTC))
            new_root = load_pem_certificate(step.roots[-1].read_bytes())
            assert fingerprint(new_root) not in await federation(cloud)
            assert k8s_ca.reload()
            await until(lambda: _has(cloud, k8s.root, new_root), "the new root followed")


async def test_the_peer_is_polled_at_its_refresh_hint(
    pki: PKI, spire: TrustDomain, initial: Path
) -> None:
    """With the block's refresh at one hour, a bundle hinting 1 s is fetched every second;
    once the peer serves a bundle without a hint, the hour applies again. Twin: that second
    half, where three seconds pass with no fetch."""
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), spire.bundle(1, 1)) as endpoint:
        follow(pki, spiffe_peer(endpoint.url, initial))
        pki.edit(lambda d: d["federation"].__setitem__("refresh", "1h"))
        async with serving(pki) as ca:
            await wait_until(lambda: endpoint.fetches >= 3, WAIT)
            endpoint.body = spire.bundle(2, None)
            await fetched_again(endpoint, 1)
            answered = endpoint.fetches
            await anyio.sleep(3)
            assert endpoint.fetches == answered
            assert fingerprint(spire.roots[0]) in await federation(ca)


async def test_the_latest_bundle_authenticates_the_peer_after_a_restart(
    pki: PKI, spire: TrustDomain, initial: Path
) -> None:
    """The CA learns roots A and B, then stops; meanwhile the peer's endpoint moves to an SVID
    from B and withdraws A. Restarted, the CA authenticates it with the A and B it stored, not
    the initial bundle (A only), and follows it to B alone. Twin: test_spiffe_peer's
    test_later_contacts_are_authenticated_by_the_latest_bundle, where the initial bundle
    alone refuses that endpoint."""
    a = spire.roots[0]
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), spire.bundle(1)) as endpoint:
        follow(pki, spiffe_peer(endpoint.url, initial))
        async with serving(pki) as ca:
            await until(lambda: _has(ca, a), "root A followed")
            b = spire.new_root()
            endpoint.body = spire.bundle(2)
            await until(lambda: _has(ca, a, b), "roots A and B followed")
        endpoint.present(*spire.svid(ENDPOINT_ID))
        endpoint.body = {**spire.bundle(3), "keys": spire.bundle()["keys"][1:]}
        async with serving(pki) as ca:
            await until(lambda: _lacks(ca, a), "root A dropped after the restart")
            assert fingerprint(b) in await federation(ca)
