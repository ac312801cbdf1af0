"""The federatls CA's own SPIFFE bundle (``GET /spiffe/bundle``), checked against the SPIFFE
Trust Domain and Bundle specification (section 4) and the X509-SVID specification (section
6.1), and its ``spiffe_sequence``: it grows with each change of the CA's roots (a rotation and
a reload) and survives a restart (kept in the store), not reset.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federatls._client import client_tls_context
from federatls._errors import ConfigError, PeerFetchError
from federatls._protocol import ErrorBody
from federatls._spiffe import SpiffeBundle
from federatls._x509 import fingerprint
from federatls.ca import CAServer, add_root, issue_from_new_root, retire_old_roots
from federatls.ca._config import CAConfig
from federatls.ca._federation import PeerConfig
from federatls.ca._spiffe_peer import fetch_spiffe_peer
from test_docs import code_blocks

from harness import PASSWORD, PKI, serving

pytestmark = pytest.mark.anyio


def with_spiffe(pki: PKI, trust_domain: str = "cloud.internal", refresh: str | None = None) -> None:
    def change(data: dict[str, Any]) -> None:
        data["spiffe"] = {"trustDomain": trust_domain}
        if refresh is not None:
            data["federation"] = {"refresh": refresh}

    pki.edit(change)


async def get_bundle(ca: CAServer, path: str = "/spiffe/bundle") -> httpx.Response:
    """A GET without a client certificate, trusting the CA's first root."""
    roots = ca.authority.roots()
    async with httpx.AsyncClient(verify=client_tls_context(roots), trust_env=False) as client:
        return await client.get(ca.url + path)


async def sequence(ca: CAServer) -> int:
    answer = await get_bundle(ca)
    assert answer.status_code == 200
    value = answer.json()["spiffe_sequence"]
    assert isinstance(value, int)
    return value


@pytest.fixture
async def spiffe_ca(pki: PKI) -> AsyncIterator[CAServer]:
    with_spiffe(pki)
    async with serving(pki) as ca:
        yield ca


async def test_the_served_bundle_meets_the_specification(spiffe_ca: CAServer, pki: PKI) -> None:
    """A JSON JWK Set, no client certificate needed: one x509-svid key per root, kty/crv of
    the root's key, an x5c of exactly that root in standard base64, no kid, a sequence and a
    refresh hint in seconds (the federation refresh, 5 minutes by default). Twin: the CA
    without a ``spiffe`` block answers 404 (next test)."""
    answer = await get_bundle(spiffe_ca)
    assert answer.status_code == 200
    assert answer.headers["content-type"].split(";")[0] == "application/json"
    doc = json.loads(answer.content.decode("utf-8"))
    assert set(doc) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert doc["spiffe_sequence"] >= 1
    assert doc["spiffe_refresh_hint"] == 300
    roots = spiffe_ca.authority.roots()
    assert len(doc["keys"]) == len(roots) == 1
    key = doc["keys"][0]
    assert key["use"] == "x509-svid"
    assert key["kty"] == "EC"
    assert key["crv"] == "P-256"
    assert {"x", "y"} <= set(key)
    assert "kid" not in key
    assert "d" not in key
    der = pki.root.public_bytes(serialization.Encoding.DER)
    assert key["x5c"] == [base64.b64encode(der).decode("ascii")]
    parsed = SpiffeBundle.parse(answer.content)
    assert [fingerprint(r) for r in parsed.roots] == [pki.fingerprint]
    assert parsed.notes == ()
    versioned = await get_bundle(spiffe_ca, "/1.0/spiffe/bundle")
    assert versioned.content == answer.content


async def test_without_a_spiffe_block_the_bundle_is_a_step_ca_404(ca: CAServer) -> None:
    """A CA whose ca.json has no ``spiffe`` block serves no bundle: 404 with step-ca's error
    body. Twin: the previous test's CA with the block serves it."""
    answer = await get_bundle(ca)
    assert answer.status_code == 404
    assert answer.json() == ErrorBody.for_status(404).to_json()
    assert answer.json() == (await get_bundle(ca, "/no/such/route")).json()


async def test_the_refresh_hint_follows_the_federation_refresh(pki: PKI) -> None:
    """``federation.refresh`` of 1m30s is a hint of 90 seconds. Twin: the default, 300, in
    the first test."""
    with_spiffe(pki, refresh="1m30s")
    async with serving(pki) as ca:
        assert (await get_bundle(ca)).json()["spiffe_refresh_hint"] == 90


async def test_the_sequence_grows_with_every_change_of_the_roots(
    spiffe_ca: CAServer, pki: PKI
) -> None:
    """Through a whole rotation (root B added, issued from, root A retired; each step a
    reload), the sequence grows exactly when the roots served change. Twin: reloads and
    requests that change no root leave it as it was."""
    first = await sequence(spiffe_ca)
    assert await sequence(spiffe_ca) == first
    assert spiffe_ca.reload()
    assert await sequence(spiffe_ca) == first  # same roots, same number
    add_root(pki.directory, PASSWORD, now=datetime.now(UTC))
    assert spiffe_ca.reload()
    both = await get_bundle(spiffe_ca)
    assert len(both.json()["keys"]) == 2
    assert both.json()["spiffe_sequence"] == first + 1
    issue_from_new_root(pki.directory)
    assert spiffe_ca.reload()
    assert await sequence(spiffe_ca) == first + 1  # the issuer changed, not the roots
    retire_old_roots(pki.directory)
    assert spiffe_ca.reload()
    last = await get_bundle(spiffe_ca)
    assert last.json()["spiffe_sequence"] == first + 2
    assert [fingerprint(r) for r in SpiffeBundle.parse(last.content).roots] != [pki.fingerprint]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_the_sequence_survives_a_restart(
    pki: PKI, store: str, request: pytest.FixtureRequest
) -> None:
    """After a root change (sequence 2) the CA stops and starts again: it still serves 2 for
    the same roots (a sequence kept only in memory would restart at 1), and 3 after the next
    change; on either store. Twin: the first serve of a new CA starts at 1."""
    if store == "postgresql":
        request.getfixturevalue("pg")
    with_spiffe(pki)
    async with serving(pki) as ca:
        assert await sequence(ca) == 1
        add_root(pki.directory, PASSWORD, now=datetime.now(UTC))
        assert ca.reload()
        assert await sequence(ca) == 2
    async with serving(pki) as ca:
        assert await sequence(ca) == 2
        issue_from_new_root(pki.directory)
        retire_old_roots(pki.directory)
        assert ca.reload()
        assert await sequence(ca) == 3
    async with serving(pki) as ca:
        assert await sequence(ca) == 3


def uri_names(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


async def test_the_ca_is_an_https_spiffe_bundle_endpoint(
    spiffe_ca: CAServer, pki: PKI, tmp_path: Path
) -> None:
    """With a trust domain, the CA's HTTPS certificate carries its SPIFFE ID, so another CA
    can follow it in the https_spiffe profile, first contact authenticated by a copy of its
    bundle. Twin: a CA without the block has no URI name, and the wrong endpoint ID is
    refused."""
    assert spiffe_ca.server_certificate is not None
    assert uri_names(spiffe_ca.server_certificate) == ["spiffe://cloud.internal/federatls/ca"]
    initial = tmp_path / "cloud-bundle.json"
    initial.write_bytes((await get_bundle(spiffe_ca)).content)
    peer = PeerConfig(
        name="cloud",
        profile="https_spiffe",
        url=spiffe_ca.url + "/spiffe/bundle",
        names=("spiffe://cloud.internal/*",),
        trust_domain="cloud.internal",
        endpoint_spiffe_id="spiffe://cloud.internal/federatls/ca",
        bundle=initial,
    )
    got = await fetch_spiffe_peer(peer, (), 10.0)
    assert [fingerprint(r) for r in got.roots] == [pki.fingerprint]
    assert got.refresh_hint == timedelta(minutes=5)
    wrong = replace(peer, endpoint_spiffe_id="spiffe://cloud.internal/spire/server")
    with pytest.raises(PeerFetchError, match="presented the SPIFFE ID"):
        await fetch_spiffe_peer(wrong, (), 10.0)


async def test_without_a_trust_domain_the_ca_certificate_has_no_spiffe_id(ca: CAServer) -> None:
    """No ``spiffe`` block, no URI name in the CA's certificate. Twin: the previous test."""
    assert ca.server_certificate is not None
    assert not any(
        isinstance(name, x509.UniformResourceIdentifier)
        for name in ca.server_certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    )


async def test_the_store_is_asked_off_the_event_loop_once_per_configuration(
    spiffe_ca: CAServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty concurrent first requests make one ``get_state`` call, from a store worker
    thread, never the event loop's; after a reload, one more. Twin: requests between reloads
    make none."""
    store = spiffe_ca.authority.store
    threads: list[str] = []
    real = store.get_state

    def get_state(key: str) -> bytes | None:
        threads.append(threading.current_thread().name)
        return real(key)

    monkeypatch.setattr(store, "get_state", get_state)
    answers = await asyncio.gather(*(get_bundle(spiffe_ca) for _ in range(20)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert len(threads) == 1
    assert threads[0].startswith("federatls-ca-store")
    assert threading.current_thread().name not in threads
    await get_bundle(spiffe_ca)
    assert len(threads) == 1
    assert spiffe_ca.reload()
    await get_bundle(spiffe_ca)
    assert len(threads) == 2


def test_the_documented_blocks_are_accepted_in_ca_json(pki: PKI) -> None:
    """docs/spiffe.md's ``spiffe`` and ``federation`` blocks, put into a real ca.json, load
    (the SPIFFE peers with their profiles and fields). Twin: a peer field the docs do not
    document is a ConfigError."""
    blocks = [
        json.loads(b.code)
        for b in code_blocks(Path(__file__).parent.parent / "docs" / "spiffe.md")
        if b.info == "json"
    ]
    config_blocks = [b for b in blocks if "spiffe" in b or "federation" in b]
    assert len(config_blocks) == 2
    for block in config_blocks:
        pki.edit(lambda d, block=block: d.update(block))  # type: ignore[misc]
    config = CAConfig.load(pki.config)
    assert config.spiffe_trust_domain == "cloud.internal"
    assert [p.profile for p in config.federation.peers] == ["https_spiffe", "https_web"]
    assert config.federation.peers[0].bundle == pki.config.parent / "spire-bundle.json"
    pki.edit(lambda d: d["federation"]["peers"][1].__setitem__("endpointSpiffeId", "x"))
    with pytest.raises(ConfigError, match="unknown fields"):
        CAConfig.load(pki.config)
