"""Fetching a SPIFFE peer's bundle (``fetch_spiffe_peer``) from a real bundle endpoint on
127.0.0.1, in both profiles of the SPIFFE Federation specification: ``https_spiffe`` (the
endpoint's X509-SVID, its SPIFFE ID exactly the configured one, verified against the initial
bundle at first contact and the latest fetched one after) and ``https_web`` (Web PKI: the
system trust store, here replaced through SSL_CERT_FILE, with the hostname checked). Also the
bounds of the refresh hint the follower polls at (``hint_interval``).
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from federatls._errors import PeerFetchError
from federatls._spiffe import SpiffeBundle
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca._federation import PeerConfig
from federatls.ca._spiffe_peer import (
    MAX_HINT,
    MIN_HINT,
    fetch_spiffe_peer,
    foreign_trust_domains,
    hint_interval,
)
from spiffe_endpoint import BundleEndpoint, TrustDomain

pytestmark = pytest.mark.anyio

ENDPOINT_ID = "spiffe://spire.internal/spire/server"
TIMEOUT = 10.0


def prints(certs: Sequence[x509.Certificate]) -> list[str]:
    return [fingerprint(c) for c in certs]


def spiffe_peer(url: str, bundle: Path) -> PeerConfig:
    return PeerConfig(
        name="spire",
        profile="https_spiffe",
        url=url,
        names=("spiffe://spire.internal/*",),
        trust_domain="spire.internal",
        endpoint_spiffe_id=ENDPOINT_ID,
        bundle=bundle,
    )


@pytest.fixture
def spire() -> TrustDomain:
    return TrustDomain("spire.internal")


@pytest.fixture
def initial(tmp_path: Path, spire: TrustDomain) -> Path:
    """The operator's copy of the peer's bundle at the time of configuration."""
    path = tmp_path / "spire-bundle.json"
    path.write_text(json.dumps(spire.bundle()))
    return path


# https_spiffe ------------------------------------------------------------------------------
async def test_first_contact_is_authenticated_by_the_initial_bundle(
    spire: TrustDomain, initial: Path
) -> None:
    """The endpoint's SVID chains to the initial bundle's root and names ENDPOINT_ID: the
    fetched roots, sequence and hint come back. Twin: the wrong-ID and foreign-SVID tests."""
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), spire.bundle(5, 30)) as ep:
        got = await fetch_spiffe_peer(spiffe_peer(ep.url, initial), (), TIMEOUT)
    assert prints(got.roots) == prints(spire.roots)
    assert got.sequence == 5
    assert got.refresh_hint == timedelta(seconds=30)


async def test_later_contacts_are_authenticated_by_the_latest_bundle(
    spire: TrustDomain, initial: Path
) -> None:
    """After the peer rotates (new root B, its endpoint's SVID now from B), the fetch
    authenticated by the roots trusted now (A and B) succeeds. Twin: authenticated by the
    initial bundle alone (A: first contact again) it is refused."""
    old = tuple(spire.roots)
    spire.new_root()
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), spire.bundle(2)) as ep:
        got = await fetch_spiffe_peer(spiffe_peer(ep.url, initial), tuple(spire.roots), TIMEOUT)
        assert prints(got.roots) == prints(spire.roots)
        with pytest.raises(PeerFetchError, match="not authenticated"):
            await fetch_spiffe_peer(spiffe_peer(ep.url, initial), (), TIMEOUT)
        assert prints(old) != prints(got.roots)


async def test_a_wrong_endpoint_spiffe_id_is_refused(spire: TrustDomain, initial: Path) -> None:
    """An SVID of the right trust domain for another workload is refused right after the
    handshake, before the request is sent. Twin: the first test, the same endpoint with the
    right ID."""
    async with BundleEndpoint.running(
        spire.svid("spiffe://spire.internal/other"), spire.bundle()
    ) as ep:
        with pytest.raises(PeerFetchError, match="presented the SPIFFE ID") as info:
            await fetch_spiffe_peer(spiffe_peer(ep.url, initial), (), TIMEOUT)
        assert info.value.peer == "spire"
        assert ep.fetches == 0  # refused after the handshake: nothing was asked of it


async def test_a_ca_certificate_with_the_endpoint_id_is_refused(
    spire: TrustDomain, initial: Path
) -> None:
    """A CA certificate of the trust domain carrying the endpoint's SPIFFE ID is no X509-SVID
    leaf. Twin: the first test, an ordinary leaf with the same ID."""
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID, ca=True), spire.bundle()) as ep:
        with pytest.raises(PeerFetchError, match="is a CA certificate"):
            await fetch_spiffe_peer(spiffe_peer(ep.url, initial), (), TIMEOUT)


async def test_an_svid_from_another_trust_domain_is_refused(
    spire: TrustDomain, initial: Path
) -> None:
    """An endpoint whose SVID (even for the right SPIFFE ID) chains to another trust domain's
    root is not authenticated. Twin: the first test, the SVID from spire's own root."""
    other = TrustDomain("evil.internal")
    async with BundleEndpoint.running(other.svid(ENDPOINT_ID), other.bundle()) as ep:
        with pytest.raises(PeerFetchError, match="not authenticated"):
            await fetch_spiffe_peer(spiffe_peer(ep.url, initial), (), TIMEOUT)
        assert ep.fetches == 0


async def test_roots_naming_another_trust_domain_are_refused(
    spire: TrustDomain, initial: Path
) -> None:
    """A bundle whose root carries ``spiffe://evil.internal`` contradicts the peer's
    trustDomain. Twin: the same bundle's own roots (``spiffe://spire.internal``) pass."""
    evil_root = TrustDomain("spire.internal").new_root("evil.internal")
    body = SpiffeBundle((spire.roots[0], evil_root), 3).to_json()
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), body) as ep:
        with pytest.raises(PeerFetchError, match=re.escape("['evil.internal']")):
            await fetch_spiffe_peer(spiffe_peer(ep.url, initial), (), TIMEOUT)
    assert foreign_trust_domains(spire.roots, "spire.internal") == []
    assert foreign_trust_domains(spire.roots, "other.internal") == ["spire.internal"]


async def test_an_empty_keys_list_distrusts_the_peer(spire: TrustDomain, initial: Path) -> None:
    """``"keys": []`` is a successful fetch of no roots. Twin: the first test's roots."""
    async with BundleEndpoint.running(
        spire.svid(ENDPOINT_ID), {"spiffe_sequence": 9, "keys": []}
    ) as ep:
        got = await fetch_spiffe_peer(spiffe_peer(ep.url, initial), tuple(spire.roots), TIMEOUT)
    assert got.roots == ()
    assert got.sequence == 9


async def test_ignored_keys_are_logged_once_while_they_stay_the_same(
    spire: TrustDomain, initial: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A JWT-SVID key beside the x509-svid one is ignored (its roots are the x509 ones) and
    logged at the first fetch, not at the second; a bundle with another ignored key is
    logged again. Twin: the first test's bundle, with nothing to note."""
    body = spire.bundle(1)
    jwt_key = {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256"}
    body["keys"].append(jwt_key)
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), body) as ep:
        peer = spiffe_peer(ep.url, initial)
        with caplog.at_level(logging.INFO, logger="federatls.ca.federation"):
            got = await fetch_spiffe_peer(peer, (), TIMEOUT)
            assert prints(got.roots) == prints(spire.roots)
            assert caplog.text.count("use 'jwt-svid'") == 1
            await fetch_spiffe_peer(peer, (), TIMEOUT)
            assert caplog.text.count("use 'jwt-svid'") == 1
            ep.body = {**body, "keys": [*body["keys"], {"use": "x509-svid", "kty": "oct"}]}
            await fetch_spiffe_peer(peer, (), TIMEOUT)
            assert caplog.text.count("use 'jwt-svid'") == 2
            assert "unknown key type 'oct'" in caplog.text


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"{not json", 200, "not JSON"),
        ({"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": ["AA"]}]}, 200, "x5c"),
        ({"keys": []}, 404, "answered 404"),
        ({"keys": []}, 307, "answered 307"),  # a redirect is not followed
        (b"{" + b" " * (1 << 20) + b'"keys": []}', 200, "over 1048576 bytes"),
    ],
    ids=["not json", "bad x5c", "404", "redirect", "too big"],
)
async def test_a_bad_answer_is_a_peer_fetch_error(
    spire: TrustDomain, initial: Path, body: object, status: int, reason: str
) -> None:
    """Malformed, refused or oversized answers say why, naming the peer. Twin: the first
    test's good answer."""
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), body) as ep:
        ep.status = status
        with pytest.raises(PeerFetchError, match=reason) as info:
            await fetch_spiffe_peer(spiffe_peer(ep.url, initial), (), TIMEOUT)
    assert "federation peer 'spire'" in str(info.value)


async def test_a_bad_initial_bundle_is_a_peer_fetch_error(
    spire: TrustDomain, tmp_path: Path
) -> None:
    """A missing or malformed initial bundle file is reported, nothing is fetched. Twin: the
    first test's well-formed file."""
    async with BundleEndpoint.running(spire.svid(ENDPOINT_ID), spire.bundle()) as ep:
        with pytest.raises(PeerFetchError, match="cannot read its initial bundle"):
            await fetch_spiffe_peer(spiffe_peer(ep.url, tmp_path / "absent.json"), (), TIMEOUT)
        (tmp_path / "bad.json").write_text('{"keys": 3}')
        with pytest.raises(PeerFetchError, match="'keys' must be"):
            await fetch_spiffe_peer(spiffe_peer(ep.url, tmp_path / "bad.json"), (), TIMEOUT)
        assert ep.fetches == 0


async def test_an_endpoint_that_never_answers_is_cut_at_the_timeout(
    spire: TrustDomain, initial: Path
) -> None:
    """A listener that accepts and says nothing costs the fetch its timeout, no more. Twin:
    the first test's endpoint answers within it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/bundle"
        with pytest.raises(PeerFetchError, match=re.escape("no complete answer within 0.5 s")):
            await fetch_spiffe_peer(spiffe_peer(url, initial), (), 0.5)


# https_web ---------------------------------------------------------------------------------
@pytest.fixture
def web_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A Web PKI of the test's own, made the system trust store through SSL_CERT_FILE."""
    ca = trustme.CA()
    path = tmp_path / "web-roots.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return ca


def web_cert(ca: trustme.CA, *names: str) -> tuple[x509.Certificate, PrivateKeyTypes]:
    leaf = ca.issue_cert(*names)
    cert = load_pem_certificate(leaf.cert_chain_pems[0].bytes())
    key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    return cert, key


def web_peer(url: str) -> PeerConfig:
    return PeerConfig(
        name="web",
        profile="https_web",
        url=url,
        names=("spiffe://web.internal/*",),
        trust_domain="web.internal",
    )


async def test_https_web_is_authenticated_by_the_system_trust_store(
    web_ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint with a certificate for 127.0.0.1 from a CA in the trust store serves its
    bundle. Twin: with the trust store back to the system's, the same endpoint is refused."""
    web = TrustDomain("web.internal")
    async with BundleEndpoint.running(web_cert(web_ca, "127.0.0.1"), web.bundle(4, 60)) as ep:
        got = await fetch_spiffe_peer(web_peer(ep.url), (), TIMEOUT)
        assert prints(got.roots) == prints(web.roots)
        assert got.sequence == 4
        monkeypatch.delenv("SSL_CERT_FILE")
        with pytest.raises(PeerFetchError, match="not authenticated"):
            await fetch_spiffe_peer(web_peer(ep.url), (), TIMEOUT)


async def test_https_web_refuses_a_host_mismatch(web_ca: trustme.CA) -> None:
    """A trusted certificate for another host name is refused (hostname checking). Twin: the
    previous test's certificate for 127.0.0.1."""
    web = TrustDomain("web.internal")
    async with BundleEndpoint.running(web_cert(web_ca, "bundle.web.internal"), web.bundle()) as ep:
        with pytest.raises(PeerFetchError, match=r"not authenticated: .*(mismatch|match)"):
            await fetch_spiffe_peer(web_peer(ep.url), (), TIMEOUT)
        assert ep.fetches == 0


# The follower's rules ----------------------------------------------------------------------
def test_the_refresh_hint_is_followed_within_bounds() -> None:
    """A hint is followed between one second and one hour. Twin: no hint gives None (the
    peer's or the block's refresh then applies)."""
    assert hint_interval(30) == timedelta(seconds=30)
    assert hint_interval(0) == MIN_HINT
    assert hint_interval(2419200) == MAX_HINT
    assert hint_interval((1 << 63) - 1) == MAX_HINT
    assert hint_interval(None) is None
