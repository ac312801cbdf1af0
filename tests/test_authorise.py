"""Authorisers against a federation of three CAs: federated roots without a name rule, SPIFFE
ID rules for URI names and patterns, and the spelling of DNS names.

Three real CAs issue every certificate used here: "cloud" (the server's own CA), "kubernetes"
(federated, and given a rule) and "partner" (federated, given no rule). A federated CA can
issue any name; what a server admits is what its authoriser says.
"""

from __future__ import annotations

import datetime
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import federatls
from federatls import (
    Authoriser,
    Identity,
    NamePattern,
    PeerInfo,
    PeerNotAuthorisedError,
    Provenance,
    all_of,
    allow_names,
    root_may_vouch_for,
)
from test_sdk_peer import _ask, peer_of, streams_server

from harness import PKI, make_pki, serving

pytestmark = pytest.mark.anyio

WEB_ID = "spiffe://k8s/ns/web/frontend"
# Each one textually starts with the pattern's prefix ``spiffe://k8s/ns/web/``, or spells the
# scheme or trust domain in a way the SPIFFE ID rules forbid.
MALFORMED_IDS = [
    "spiffe://k8s/ns/web/../../../prod/ns/payments",  # dot segments
    "spiffe://k8s/ns/web/./frontend",
    "spiffe://k8s/ns/web/..",
    "spiffe://k8s/ns/web//frontend",  # an empty segment
    "spiffe://k8s/ns/web/frontend/",  # a trailing slash
    "spiffe://k8s/ns/web/%2e%2e/%2e%2e/prod",  # percent-encoding
    "spiffe://k8s/ns/web/a%2Fb",
    "spiffe://k8s/ns/web/frontend?as=prod",  # a query
    "spiffe://k8s/ns/web/frontend#prod",  # a fragment
    "spiffe://k8s/ns/web/front end",  # a character outside the allowed set
    "spiffe://k8s/ns/web/front\\..\\prod",
    "SPIFFE://k8s/ns/web/frontend",  # the scheme in upper case
    "spiffe://K8S/ns/web/frontend",  # the trust domain in upper case
    "spiffe://k8s:443/ns/web/frontend",  # a port
    "spiffe://admin@k8s/ns/web/frontend",  # userinfo
]


# The world: three CAs, and what they issued ---------------------------------------------------
@dataclass(frozen=True)
class World:
    """The server (cloud) and the peers that knock on its door."""

    server: Identity  # cloud: server.cloud.internal, localhost, 127.0.0.1
    payments: Identity  # cloud (the server's own CA): payments.cloud.internal
    k8s_svc: Identity  # kubernetes (federated, has a rule): svc.k8s.internal
    impostor: Identity  # partner (federated, no rule): payments.cloud.internal
    k8s_web: Identity  # kubernetes: a well-formed SPIFFE ID below spiffe://k8s/ns/web/
    k8s_dots: Identity  # kubernetes: spiffe://k8s/ns/web/../../../prod/ns/payments


async def _build_world(base: Path) -> World:
    cloud, kubernetes, partner = (make_pki(base, n) for n in ("cloud", "kubernetes", "partner"))
    cloud.federate(kubernetes, partner)
    kubernetes.federate(cloud)
    partner.federate(cloud)
    async with serving(cloud), serving(kubernetes), serving(partner):

        async def enrol(ca: PKI, subject: str, *sans: str) -> Identity:
            return await federatls.bootstrap(ca.token(subject, sans=sans or (subject,)))

        return World(
            server=await enrol(cloud, "server.cloud.internal", "localhost", "127.0.0.1"),
            payments=await enrol(cloud, "payments.cloud.internal"),
            k8s_svc=await enrol(kubernetes, "svc.k8s.internal"),
            impostor=await enrol(partner, "payments.cloud.internal"),
            k8s_web=await enrol(kubernetes, "web", WEB_ID),
            k8s_dots=await enrol(kubernetes, "web", MALFORMED_IDS[0]),
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The three CAs served on a private event loop in a worker thread, just long enough to
    enrol."""
    base = tmp_path_factory.mktemp("three")
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, _build_world, base).result(timeout=90)


def _k8s_fingerprint(world: World) -> str:
    return world.k8s_svc.own_roots.roots[0].fingerprint


def documented(world: World, **options: bool) -> Authoriser:
    """docs/sdk.md's pattern: the kubernetes root may only vouch for ``*.k8s.internal``, and
    the server talks to the kubernetes services and to payments."""
    return all_of(
        root_may_vouch_for({_k8s_fingerprint(world): ["*.k8s.internal"]}, **options),
        allow_names("*.k8s.internal", "payments.cloud.internal"),
    )


def with_uris(uris: list[str], like: PeerInfo) -> PeerInfo:
    """A ``PeerInfo`` like ``like`` (same anchor) for a certificate whose only names are the
    URIs ``uris``, made here with cryptography: what a federated CA could issue."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(like.certificate.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return PeerInfo(certificate=cert, chain=(cert, *like.chain[1:]), anchor=like.anchor)


# 1. Federated roots without a rule ------------------------------------------------------------
def test_world_provenance(world: World) -> None:
    """The server sees the cloud peer as its own CA's, the kubernetes and partner peers as
    federated (what the tests below rely on)."""
    seen = {
        "payments": peer_of(world.payments, world.server),
        "k8s": peer_of(world.k8s_svc, world.server),
        "impostor": peer_of(world.impostor, world.server),
    }
    assert {k: p.anchor.provenance if p.anchor else None for k, p in seen.items()} == {
        "payments": Provenance.OWN,
        "k8s": Provenance.FEDERATED,
        "impostor": Provenance.FEDERATED,
    }
    assert seen["impostor"].sans.dns == ("payments.cloud.internal",)


def test_unruled_federated_root_refused(world: World) -> None:
    """The documented pattern refuses a peer of a third federated CA (no rule for its root)
    that names itself ``payments.cloud.internal``."""
    impostor = peer_of(world.impostor, world.server)
    with pytest.raises(PeerNotAuthorisedError, match=r"partner Root CA.*no rule") as info:
        documented(world)(impostor)
    assert info.value.peer is impostor
    with pytest.raises(PeerNotAuthorisedError, match="no rule"):
        root_may_vouch_for({})(impostor)


def test_ruled_and_own_roots_admitted(world: World) -> None:
    """Twin: a peer of the ruled kubernetes root whose names the rule covers is admitted, and
    so is a peer of the server's own CA (no rule names its root)."""
    rule = documented(world)
    rule(peer_of(world.k8s_svc, world.server))
    rule(peer_of(world.payments, world.server))
    root_may_vouch_for({})(peer_of(world.payments, world.server))


def test_rule_for_own_root_applies(world: World) -> None:
    """Twin: a rule naming the server's own root does bind its peers."""
    own = world.server.own_roots.roots[0].fingerprint
    with pytest.raises(PeerNotAuthorisedError, match="may only vouch for"):
        root_may_vouch_for({own: ["server.cloud.internal"]})(peer_of(world.payments, world.server))


def test_explicit_option_admits_unruled_federated_root(world: World) -> None:
    """Twin: ``allow_unruled_federated_roots=True`` lets a peer of a federated root without a
    rule through (and the kubernetes rule still binds)."""
    rule = documented(world, allow_unruled_federated_roots=True)
    rule(peer_of(world.impostor, world.server))
    k8s_only_cloud = root_may_vouch_for(
        {_k8s_fingerprint(world): ["*.cloud.internal"]}, allow_unruled_federated_roots=True
    )
    with pytest.raises(PeerNotAuthorisedError, match="may only vouch for"):
        k8s_only_cloud(peer_of(world.k8s_svc, world.server))


def test_option_is_keyword_only(world: World) -> None:
    """``allow_unruled_federated_roots`` cannot be passed by position."""
    with pytest.raises(TypeError):
        root_may_vouch_for({}, True)  # type: ignore[call-arg]


@pytest.mark.parametrize("key", ["5f1c", "zz" * 32, "not a fingerprint"])
def test_rule_keys_must_be_fingerprints(key: str) -> None:
    """A rule keyed by something that is not a SHA-256 fingerprint is a ``ValueError``
    quoting it, not a rule that never applies."""
    with pytest.raises(ValueError, match="fingerprint") as info:
        root_may_vouch_for({key: ["*.k8s.internal"]})
    assert repr(key) in str(info.value)


# 2. Over real TLS -----------------------------------------------------------------------------
async def _served(world: World, client: Identity, authoriser: Authoriser) -> bytes:
    """What ``client`` gets back from the server's stream server guarded by ``authoriser``."""
    async with streams_server(world.server, b"secret\n", authoriser=authoriser) as (port, _):
        return await _ask(client, port)


async def test_impostor_of_third_ca_refused_over_tls(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Over real TLS, the documented pattern cuts off the partner CA's
    ``payments.cloud.internal`` before the handler, and logs why."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    assert await _served(world, world.impostor, documented(world)) == b""
    assert "no rule" in caplog.text
    assert "partner Root CA" in caplog.text


@pytest.mark.parametrize("who", ["k8s_svc", "payments"])
async def test_ruled_and_own_peers_served_over_tls(world: World, who: str) -> None:
    """Twin: over real TLS the same server answers the kubernetes service and its own CA's
    payments service."""
    assert await _served(world, getattr(world, who), documented(world)) == b"secret\n"


async def test_option_serves_unruled_federated_peer_over_tls(world: World) -> None:
    """Twin: with ``allow_unruled_federated_roots=True`` the partner's peer is served."""
    rule = documented(world, allow_unruled_federated_roots=True)
    assert await _served(world, world.impostor, rule) == b"secret\n"


async def test_dot_segments_refused_over_tls(world: World) -> None:
    """Over real TLS, ``spiffe://k8s/ns/web/*`` refuses a kubernetes peer whose SPIFFE ID
    climbs out with ``..`` segments."""
    assert await _served(world, world.k8s_dots, allow_names("spiffe://k8s/ns/web/*")) == b""


async def test_well_formed_spiffe_id_served_over_tls(world: World) -> None:
    """Twin: the same server and pattern serve a well-formed ID below the prefix."""
    got = await _served(world, world.k8s_web, allow_names("spiffe://k8s/ns/web/*"))
    assert got == b"secret\n"


# 3. SPIFFE IDs (pure) -------------------------------------------------------------------------
@pytest.mark.parametrize("uri", MALFORMED_IDS)
def test_malformed_spiffe_id_refused(world: World, uri: str) -> None:
    """A peer whose SPIFFE ID breaks the SPIFFE ID rules matches no pattern: ``allow_names``
    and a root rule both refuse it, whatever its other names."""
    like = peer_of(world.k8s_web, world.server)
    peer = with_uris([uri], like)
    with pytest.raises(PeerNotAuthorisedError) as info:
        allow_names("spiffe://k8s/ns/web/*")(peer)
    assert info.value.peer is peer
    with pytest.raises(PeerNotAuthorisedError):
        root_may_vouch_for({_k8s_fingerprint(world): ["spiffe://k8s/ns/web/*"]})(peer)
    both = with_uris([WEB_ID, uri], like)
    with pytest.raises(PeerNotAuthorisedError, match="not a well-formed SPIFFE ID"):
        allow_names("spiffe://k8s/ns/web/*")(both)


@pytest.mark.parametrize(
    "uri", [WEB_ID, "spiffe://k8s/ns/web/Front_End-2.v1", "spiffe://k8s/ns/web/a/b/c..d"]
)
def test_well_formed_spiffe_id_admitted(world: World, uri: str) -> None:
    """Twin: a well-formed ID below ``spiffe://k8s/ns/web/`` (path segments may hold upper
    case, digits, ``.``, ``-`` and ``_``) is admitted by the pattern and by a root rule."""
    peer = with_uris([uri], peer_of(world.k8s_web, world.server))
    allow_names("spiffe://k8s/ns/web/*")(peer)
    root_may_vouch_for({_k8s_fingerprint(world): ["spiffe://k8s/ns/web/*"]})(peer)
    assert NamePattern.parse(uri).matches(uri)


SEGMENT = st.one_of(
    st.sampled_from(["", ".", "..", "%2e%2e", "a?b", "a#b", "a b", "a:b", "a@b", "\\"]),
    st.from_regex(r"[A-Za-z0-9._-]{1,6}", fullmatch=True),
)


@settings(max_examples=300, deadline=None, database=None)
@given(segments=st.lists(SEGMENT, min_size=1, max_size=5))
def test_uri_prefix_match_is_segment_wise(segments: list[str]) -> None:
    """A name textually below ``spiffe://k8s/ns/web/`` matches the pattern exactly when
    every path segment after it is a well-formed one (no '.', '..', empty or odd ones)."""
    name = "spiffe://k8s/ns/web/" + "/".join(segments)
    well_formed = all(
        s not in ("", ".", "..") and re.fullmatch(r"[A-Za-z0-9._-]+", s) for s in segments
    )
    assert NamePattern.parse("spiffe://k8s/ns/web/*").matches(name) == well_formed


@pytest.mark.parametrize(
    "pattern",
    [
        *MALFORMED_IDS,
        "spiffe://k8s/ns/../*",
        "spiffe://k8s/ns/./*",
        "spiffe://k8s/ns//*",
        "spiffe://k8s/ns/%2e/*",
        "spiffe://k8s/ns/*?x",
        "spiffe://k8s/ns/*#x",
        "SPIFFE://k8s/*",
        "spiffe://K8S/*",
        "spiffe://k8s:443/*",
        "spiffe://a@k8s/*",
        "spiffe:///ns/*",
        "spiffe:/k8s/ns/*",
        "spiffe:k8s/ns",
        "spiffe://k8s/ns/",
    ],
)
def test_malformed_uri_pattern_refused(pattern: str) -> None:
    """Building an authoriser from a URI pattern that breaks the SPIFFE ID rules is a
    ``ValueError`` quoting the pattern."""
    with pytest.raises(ValueError, match="pattern") as info:
        allow_names(pattern)
    assert repr(pattern) in str(info.value)


@pytest.mark.parametrize("pattern", ["spiffe://k8s", "spiffe://k8s/*", "spiffe://k8s.io_x-1/a/*"])
def test_well_formed_uri_pattern_accepted(pattern: str) -> None:
    """Twin: well-formed SPIFFE patterns (a trust domain alone, everything in it, a path
    prefix) build."""
    assert NamePattern.parse(pattern).kind == "uri"


def test_name_pattern_constructor_checks_too() -> None:
    """A ``NamePattern`` built directly, not through ``parse``, is checked the same way."""
    with pytest.raises(ValueError, match="pattern"):
        NamePattern("spiffe://k8s/ns/web/../*", "uri")
    with pytest.raises(ValueError, match="pattern"):
        NamePattern("svc.k8s.internal", "uri")


# 4. DNS names (pure) --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern",
    ["svc.k8s.internal..", "svc..k8s.internal", ".k8s.internal", "bücher.example", "a b.internal"],
)
def test_malformed_dns_pattern_refused(pattern: str) -> None:
    """A DNS pattern with an empty label, a space or a non-ASCII (U-label) name is a
    ``ValueError`` quoting it (give IDNs as A-labels, ``xn--...``)."""
    with pytest.raises(ValueError, match="pattern") as info:
        NamePattern.parse(pattern)
    assert repr(pattern) in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "name"),
    [
        ("svc.k8s.internal", "svc.k8s.internal.."),
        ("svc.k8s.internal", "svc..k8s.internal"),
        ("*.k8s.internal", "a b.k8s.internal"),
        ("*.k8s.internal", "*x.k8s.internal"),
        ("*.k8s.internal", "svc.k8s.internal.."),
    ],
)
def test_malformed_dns_name_matches_nothing(pattern: str, name: str) -> None:
    """A DNS name with an empty label or a character no host name has matches nothing."""
    assert not NamePattern.parse(pattern).matches(name)


@pytest.mark.parametrize(
    ("pattern", "name"),
    [
        ("svc.k8s.internal", "svc.k8s.internal."),
        ("svc.k8s.internal.", "SVC.k8s.internal"),
        ("*.k8s.internal", "Svc-2.k8s.internal."),
        ("xn--bcher-kva.example", "XN--BCHER-KVA.example"),
        ("_grpc.k8s.internal", "_grpc.k8s.internal"),
    ],
)
def test_dns_spellings_that_match(pattern: str, name: str) -> None:
    """Twin: one trailing dot, letter case and A-labels do not change a DNS name."""
    assert NamePattern.parse(pattern).matches(name)
