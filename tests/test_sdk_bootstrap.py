"""``federatls.bootstrap(token)`` end to end, against the federatls CA and the real step-ca.

From a one-time token alone: the CA URL and the root fingerprint, the root fetched unverified
and pinned, a key made in memory, ``/sign``, ``/roots`` and ``/federation``; the resulting
``Identity`` then does mutual TLS across federated CAs (asyncio streams, federatls' and plain
asyncio's), and tells which root anchored each peer. A recording HTTPS server of our own
plays a CA that presents another root; an audit hook watches that no key reaches a disk.

Every CA here runs on 127.0.0.1 with a PKI made at run time in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import ssl
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

import federatls
from federatls import (
    CARefusedError,
    CAUnreachableError,
    FingerprintMismatchError,
    Identity,
    KeyType,
    PeerInfo,
    Provenance,
    TokenError,
    TrustChoice,
    _sslkeys,
)
from federatls._sslkeys import load_cert_chain_in_memory
from federatls._x509 import cert_sans, load_pem_certificates, split_sans
from federatls.ca import CAServer
from federatls.integrations import streams

from harness import (
    PKI,
    free_port,
    make_pki,
    pem_begin,
    serving,
    stepca_log,
    stepca_process,
    wait_until,
)

pytestmark = pytest.mark.anyio

SUBJECT = "svc.cloud.internal"
SANS = [SUBJECT, "127.0.0.1", "spiffe://cloud/svc"]
DAY_AND_BACKDATE = timedelta(hours=24, minutes=1)
HOUR_AND_BACKDATE = timedelta(hours=1, minutes=1)
UNAUTHORIZED = "The request lacked necessary authorization to be completed."
KINDS = ["federatls", pytest.param("step-ca", marks=pytest.mark.stepca)]
APIS = ["streams", "asyncio"]


# PKIs: in this module 'cloud' federates 'kubernetes' unless a test builds its own pair ----------
@pytest.fixture
def other(tmp_path: Path) -> PKI:
    """A second, 'kubernetes' PKI (not running unless a test serves it)."""
    return make_pki(tmp_path, "kubernetes")


@pytest.fixture
def pki(tmp_path: Path, other: PKI) -> PKI:
    """The 'cloud' PKI with the kubernetes root in its federatedRoots (set before any start)."""
    cloud = make_pki(tmp_path, "cloud")
    cloud.federate(other)
    return cloud


def _stepca_requests(pki: PKI) -> list[str]:
    """``METHOD path`` of every request the SDK (user agent ``federatls/``) made to step-ca."""
    out = []
    for line in stepca_log(pki).splitlines():
        if "user-agent=federatls/" in line:
            found = re.search(r"\bmethod=(\w+)\b.*?\bpath=(\S+)", line)
            assert found is not None, line
            out.append(f"{found[1]} {found[2]}")
    return out


@contextlib.asynccontextmanager
async def _running(
    kind: str, pki: PKI, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[], list[str]]]:
    """Serve ``pki`` with the federatls CA or the real step-ca; yields what reached the CA so
    far: step-ca's logged SDK requests, or the federatls CA's non-zero store counts."""
    if kind == "federatls":
        async with serving(pki) as server:

            def counts() -> list[str]:
                return [f"{k}={v}" for k, v in server.authority.store.counts().items() if v]

            yield counts
    else:
        binary = request.getfixturevalue("stepca_bin")
        with stepca_process(binary, pki):
            yield lambda: _stepca_requests(pki)


@contextlib.contextmanager
def _running_sync(kind: str, pki: PKI, request: pytest.FixtureRequest) -> Iterator[None]:
    """``_running`` for blocking code: the federatls CA runs on an event loop thread."""
    if kind == "federatls":
        with start_blocking_portal() as portal, portal.wrap_async_context_manager(serving(pki)):
            yield
    else:
        with stepca_process(request.getfixturevalue("stepca_bin"), pki):
            yield


def _intermediate(pki: PKI) -> x509.Certificate:
    path = pki.directory / "certs" / "intermediate_ca.crt"
    return load_pem_certificates(path.read_bytes())[0]


def _spki(cert: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem_body(pem: bytes) -> str:
    """The base64 lines of a PEM block, joined."""
    return "".join(line for line in pem.decode().splitlines() if not line.startswith("-----"))


# 1. The identity -------------------------------------------------------------------------------
async def test_bootstrap_gives_a_complete_identity(any_ca: str, pki: PKI, other: PKI) -> None:
    """From the token alone: leaf + intermediate for the token's names, 24h1m, a P-256 key,
    and the own root (OWN) and federated root (FEDERATED) with fingerprints and subjects."""
    identity = await federatls.bootstrap(pki.token(SUBJECT, sans=SANS))
    now = datetime.now(UTC)

    leaf, intermediate = identity.chain
    assert intermediate == _intermediate(pki)
    assert leaf.issuer == intermediate.subject
    leaf.verify_directly_issued_by(intermediate)
    assert identity.certificate == leaf
    assert identity.subject == f"CN={SUBJECT}"
    assert identity.common_name == SUBJECT
    assert identity.sans == cert_sans(leaf) == split_sans(SANS)
    assert identity.not_after - identity.not_before == DAY_AND_BACKDATE
    assert identity.not_before.timestamp() == pytest.approx(
        (now - timedelta(minutes=1)).timestamp(), abs=5
    )
    assert identity.ca_url == pki.url
    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert identity.public_key_matches(leaf)
    assert load_pem_certificates(identity.chain_pem) == list(identity.chain)

    own, federated = identity.trust.roots
    for root, made, provenance, name in [
        (own, pki, Provenance.OWN, "cloud Root CA"),
        (federated, other, Provenance.FEDERATED, "kubernetes Root CA"),
    ]:
        der = made.root.public_bytes(serialization.Encoding.DER)
        assert root.certificate == made.root
        assert root.fingerprint == hashlib.sha256(der).hexdigest() == made.fingerprint
        assert root.subject == made.root.subject.rfc4514_string()
        assert root.common_name == name
        assert root.provenance is provenance
    assert identity.own_roots.roots == (own,)
    assert identity.trust.by_fingerprint(other.fingerprint.upper()) == federated


async def test_unfederated_ca_gives_only_its_own_root(tmp_path: Path) -> None:
    """Twin of the provenance check: a CA that federates nobody yields a bundle of one OWN root."""
    alone = make_pki(tmp_path, "alone")
    async with serving(alone):
        identity = await federatls.bootstrap(alone.token(SUBJECT))
    assert [(r.fingerprint, r.provenance) for r in identity.trust] == [
        (alone.fingerprint, Provenance.OWN)
    ]
    assert identity.trust.by_fingerprint(make_pki(tmp_path, "stranger").fingerprint) is None


async def test_key_types_and_lifetime(any_ca: str, pki: PKI) -> None:
    """lifetime=1h gives 1h1m; Ed25519 and RSA-2048 keys are made on request, and their
    identities (one serving, one connecting) do mutual TLS with each other."""
    hour = await federatls.bootstrap(pki.token(SUBJECT, sans=SANS), lifetime=timedelta(hours=1))
    assert hour.not_after - hour.not_before == HOUR_AND_BACKDATE

    edwards = await federatls.bootstrap(pki.token(SUBJECT, sans=SANS), key_type=KeyType.ED25519)
    assert isinstance(edwards.certificate.public_key(), ed25519.Ed25519PublicKey)
    assert edwards.not_after - edwards.not_before == DAY_AND_BACKDATE

    client = "rsa.cloud.internal"
    rsa2048 = await federatls.bootstrap(pki.token(client), key_type=KeyType.RSA2048)
    public = rsa2048.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    usage = rsa2048.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment

    outcome = await _exchange(edwards, rsa2048, api="streams")
    assert outcome.verdict == "ok"
    assert outcome.served[0].common_name == client
    assert outcome.client_peer is not None
    assert outcome.client_peer.certificate == edwards.certificate


async def test_lifetime_beyond_the_maximum_is_refused(any_ca: str, pki: PKI) -> None:
    """Twin of the lifetime option: 48h is beyond the CA's 24h maximum, a 403 naming it."""
    with pytest.raises(CARefusedError) as refused:
        await federatls.bootstrap(pki.token(SUBJECT), lifetime=timedelta(hours=48))
    assert refused.value.status == 403
    assert "requested duration of 48h1m0s is more than the authorized maximum" in (
        refused.value.message
    )


async def test_rsa_3072_key(ca: CAServer, pki: PKI) -> None:
    """KeyType.RSA3072 gives an RSA-3072 leaf whose key works in a TLS context."""
    identity = await federatls.bootstrap(pki.token(SUBJECT, sans=SANS), key_type=KeyType.RSA3072)
    public = identity.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 3072
    outcome = await _exchange(identity, identity, api="asyncio")
    assert outcome.verdict == "ok"


async def test_key_type_given_by_name(ca: CAServer, pki: PKI) -> None:
    """A key type may be given by name ("Ed25519") and gives that key type, not another."""
    identity = await federatls.bootstrap(pki.token(SUBJECT), key_type="Ed25519")
    assert isinstance(identity.certificate.public_key(), ed25519.Ed25519PublicKey)


async def test_unknown_key_type_name_sends_nothing(ca: CAServer, pki: PKI) -> None:
    """Twin: an unknown key type name is a ValueError before anything reaches the CA."""
    with pytest.raises(ValueError, match="unknown key type 'DSA'"):
        await federatls.bootstrap(pki.token(SUBJECT), key_type="DSA")
    assert ca.authority.store.counts() == {"used_tokens": 0, "certificates": 0, "revocations": 0}


async def test_private_key_export_and_repr(
    ca: CAServer, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """The key leaves only through export_private_key: plaintext PEM with password=None,
    encrypted PEM with a password; neither repr nor the log shows it."""
    caplog.set_level("DEBUG")
    identity = await federatls.bootstrap(pki.token(SUBJECT, sans=SANS))

    plain = identity.export_private_key(password=None)
    assert plain.startswith(pem_begin("PRIVATE KEY"))
    key = serialization.load_pem_private_key(plain, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert _spki(identity.certificate) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    sealed = identity.export_private_key(password=b"s3cret")
    assert sealed.startswith(pem_begin("ENCRYPTED PRIVATE KEY"))
    with pytest.raises(TypeError):  # encrypted: refuses to load without the password
        serialization.load_pem_private_key(sealed, password=None)
    with pytest.raises(ValueError, match="Incorrect password"):
        serialization.load_pem_private_key(sealed, password=b"wrong")
    reopened = serialization.load_pem_private_key(sealed, password=b"s3cret")
    assert isinstance(reopened, ec.EllipticCurvePrivateKey)
    assert reopened.private_numbers() == key.private_numbers()

    body = _pem_body(plain)
    scalar = str(key.private_numbers().private_value)
    for text in (repr(identity), str(identity), caplog.text):
        assert body[:40] not in text
        assert scalar not in text
        assert "PRIVATE KEY" not in text
    assert repr(identity).startswith(f"Identity('{SUBJECT}', serial={identity.serial}")


async def test_empty_export_password_is_refused(ca: CAServer, pki: PKI) -> None:
    """An empty password is refused: only an explicit password=None exports plaintext."""
    identity = await federatls.bootstrap(pki.token(SUBJECT))
    with pytest.raises(ValueError, match=r"[Pp]assword"):
        identity.export_private_key(password=b"")


# 2. Refusals ------------------------------------------------------------------------------------
async def test_replayed_token_is_refused(any_ca: str, pki: PKI) -> None:
    """A token works once; its replay is CARefusedError 401 with step-ca's body and a hint,
    and (federatls CA; step-ca 0.19 echoes none) the request id the CA echoed, which the
    hint must not drop."""
    token = pki.token(SUBJECT)
    first = await federatls.bootstrap(token)
    assert first.common_name == SUBJECT
    with pytest.raises(CARefusedError) as refused:
        await federatls.bootstrap(token)
    assert refused.value.status == 401
    assert refused.value.message.startswith(UNAUTHORIZED)
    assert refused.value.url == f"{pki.url}/sign"
    assert "already used" in str(refused.value)
    if any_ca == "federatls":
        assert refused.value.request_id is not None
        assert f"[request id {refused.value.request_id}]" in str(refused.value)
    else:
        assert refused.value.request_id is None


@pytest.mark.parametrize("kind", KINDS)
async def test_expired_token_fails_before_any_request(
    kind: str, pki: PKI, request: pytest.FixtureRequest
) -> None:
    """A token expired 2 minutes ago is a TokenError and nothing reaches the CA; one expired
    30 s ago (inside the minute of leeway both CAs allow) still enrols, and is seen."""
    async with _running(kind, pki, request) as reached:
        now = int(datetime.now(UTC).timestamp())
        stale = pki.forge(pki.claims(SUBJECT, iat=now - 420, nbf=now - 420, exp=now - 120))
        with pytest.raises(TokenError, match="expired"):
            await federatls.bootstrap(stale)
        assert reached() == []

        fresh = pki.forge(pki.claims(SUBJECT, iat=now, nbf=now, exp=now - 30))
        identity = await federatls.bootstrap(fresh)
        assert identity.common_name == SUBJECT
        if kind == "federatls":
            assert reached() == ["used_tokens=1", "certificates=1"]
        else:
            assert reached() == [
                f"GET /root/{pki.fingerprint}",
                "POST /sign",
                "GET /roots",
                "GET /federation",
                "GET /federatls/federation",  # a 404 at step-ca: the flat bundle
            ]


async def test_unreachable_ca(pki: PKI) -> None:
    """A token whose aud names a port nobody listens on is CAUnreachableError."""
    port = free_port()
    pki.url = f"https://127.0.0.1:{port}"
    with pytest.raises(CAUnreachableError) as unreachable:
        await federatls.bootstrap(pki.token(SUBJECT), timeout=5)
    assert unreachable.value.url == f"https://127.0.0.1:{port}/root/{pki.fingerprint}"
    assert "connect" in unreachable.value.reason


# 3. A CA that presents another root: our own recording HTTPS server ------------------------------
def _self_signed(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A throwaway self-signed server certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


class RecordingCA:
    """An HTTPS server on 127.0.0.1 that answers ``GET /root/...`` with ``root`` (404 to
    anything else) and records every TCP connection, failed TLS handshake and request."""

    def __init__(self, root: x509.Certificate) -> None:
        self.root = root
        self.connections = 0
        self.tls_failures: list[str] = []
        self.requests: list[str] = []
        cert, key = _self_signed("not a CA")
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        load_cert_chain_in_memory(self._tls, [cert], key)
        self.url = ""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RecordingCA]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await writer.start_tls(self._tls)
        except (ssl.SSLError, ConnectionError) as exc:
            self.tls_failures.append(repr(exc))  # the client aborted: reset, or an alert
            writer.close()
            return
        try:
            line = await reader.readline()
            method, path, _ = line.decode().split(" ", 2)
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = header.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.requests.append(f"{method} {path}")
            answer: dict[str, object] = {"status": 404, "message": "not found"}
            status = "404 Not Found"
            if method == "GET" and path.startswith("/root/"):
                answer = {"ca": self.root.public_bytes(serialization.Encoding.PEM).decode()}
                status = "200 OK"
            data = json.dumps(answer).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()


async def test_ca_presenting_another_root_gets_nothing_more(pki: PKI, tmp_path: Path) -> None:
    """A server answering /root/{sha} with another root: FingerprintMismatchError, after exactly
    one connection and one GET /root/... (no /sign, no CSR, no token beyond that)."""
    rogue = make_pki(tmp_path, "rogue")
    async with RecordingCA(rogue.root).running() as fake:
        pki.url = fake.url
        with pytest.raises(FingerprintMismatchError) as mismatch:
            await federatls.bootstrap(pki.token(SUBJECT))
    assert mismatch.value.expected == pki.fingerprint
    assert mismatch.value.actual == rogue.fingerprint
    assert mismatch.value.url == fake.url
    assert fake.requests == [f"GET /root/{pki.fingerprint}"]
    assert fake.connections == 1
    assert fake.tls_failures == []


async def test_server_with_the_right_root_passes_the_pin_then_must_prove_it(pki: PKI) -> None:
    """Twin: the same server answering with the token's root passes the pin, but /sign then
    goes pinned to that root, so the server (not issued under it) fails the TLS handshake:
    CAUnreachableError, and the POST never reaches it."""
    async with RecordingCA(pki.root).running() as fake:
        pki.url = fake.url
        with pytest.raises(CAUnreachableError) as unreachable:
            await federatls.bootstrap(pki.token(SUBJECT))
        await wait_until(lambda: len(fake.tls_failures) == 1)
    assert unreachable.value.url == f"{fake.url}/sign"
    assert "TLS failure: CERTIFICATE_VERIFY_FAILED" in unreachable.value.reason
    assert fake.requests == [f"GET /root/{pki.fingerprint}"]
    assert fake.connections == 2
    assert len(fake.tls_failures) == 1  # the second connection's handshake never completed


BAD_CLAIMS: dict[str, tuple[Callable[[int], dict[str, Any]], str]] = {
    "expired": (lambda now: {"iat": now - 420, "nbf": now - 420, "exp": now - 120}, "expired at"),
    "no sha": (lambda now: {"sha": None}, "no 'sha' claim"),
    "no sub": (lambda now: {"sub": None}, r"no subject \('sub'\)"),
}


@pytest.mark.parametrize("case", list(BAD_CLAIMS))
async def test_bad_token_sends_nothing(case: str, pki: PKI) -> None:
    """An expired token, or one without sha or sub, aimed at a recording server: TokenError,
    and the server never even sees a connection."""
    overrides, message = BAD_CLAIMS[case]
    async with RecordingCA(pki.root).running() as fake:
        pki.url = fake.url
        token = pki.forge(pki.claims(SUBJECT, **overrides(int(datetime.now(UTC).timestamp()))))
        with pytest.raises(TokenError, match=message):
            await federatls.bootstrap(token)
        await asyncio.sleep(0.05)
    assert fake.connections == 0
    assert fake.requests == []


# 4. Mutual TLS across federated CAs ---------------------------------------------------------------
@dataclass
class Outcome:
    """What one mutual-TLS exchange gave: the line the client read back, every peer the
    server's handler saw, the server as the client verified it, the error that stopped it."""

    answer: bytes = b""
    served: list[PeerInfo] = field(default_factory=list)
    client_peer: PeerInfo | None = None
    error: Exception | None = None

    @property
    def verdict(self) -> str:
        """'ok'; 'client refused server' (certificate verify failure in the client's
        handshake); 'server refused client' (the client verified the server, then got
        nothing back: the server's handshake failed)."""
        if self.answer == b"echo hello\n" and len(self.served) == 1 and self.error is None:
            return "ok"
        assert self.served == [], "the server's handler ran, yet the exchange failed"
        assert self.answer == b""
        if self.client_peer is None:
            assert isinstance(self.error, ssl.SSLCertVerificationError), self.error
            assert self.error.verify_message == "unable to get local issuer certificate"
            return "client refused server"
        assert self.error is None or isinstance(self.error, ssl.SSLError | ConnectionError)
        return "server refused client"


async def _exchange(
    server: Identity,
    client: Identity,
    *,
    api: str,
    server_trust: TrustChoice = "federation",
    client_trust: TrustChoice = "federation",
) -> Outcome:
    """A line over mutual TLS on 127.0.0.1: ``client`` sends ``hello``, ``server`` echoes it.
    ``api`` is ``streams`` (federatls.integrations.streams) or ``asyncio`` (the contexts)."""
    outcome = Outcome()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outcome.served.append(server.peer(writer))
        writer.write(b"echo " + await reader.readline())
        await writer.drain()
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()

    if api == "streams":
        listener = await streams.start_server(server, handle, "127.0.0.1", 0, trust=server_trust)
    else:
        ctx = server.server_context(trust=server_trust)
        listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = listener.sockets[0].getsockname()[1]
    try:
        try:
            if api == "streams":
                reader, writer = await streams.open_connection(
                    client, "127.0.0.1", port, trust=client_trust
                )
            else:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client.client_context(trust=client_trust)
                )
        except ssl.SSLError as exc:
            outcome.error = exc
        else:
            outcome.client_peer = client.peer(writer)
            try:
                writer.write(b"hello\n")
                await writer.drain()
                outcome.answer = await asyncio.wait_for(reader.readline(), 10)
            except (ssl.SSLError, ConnectionError) as exc:
                outcome.error = exc
            finally:
                writer.close()
                with contextlib.suppress(ssl.SSLError, ConnectionError):
                    await writer.wait_closed()
        await asyncio.sleep(0.05)  # the server's side of a failed handshake settles
    finally:
        listener.close()
        await listener.wait_closed()
    return outcome


@dataclass
class Pair:
    """Two CAs' PKIs and a server and a client workload enrolled with each."""

    cloud: PKI
    kubernetes: PKI
    workloads: dict[tuple[str, str], Identity]  # (CA name, "server" | "client")

    def root(self, name: str) -> PKI:
        return self.cloud if name == "cloud" else self.kubernetes


async def _pair(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    *,
    cloud_federates: bool,
    kubernetes_federates: bool,
) -> Pair:
    """Make 'cloud' and 'kubernetes' (federating as told, before they start), run them with
    ``kind``'s CA and bootstrap a server (names include 127.0.0.1) and a client from each."""
    cloud, kubernetes = make_pki(tmp_path, "cloud"), make_pki(tmp_path, "kubernetes")
    if cloud_federates:
        cloud.federate(kubernetes)
    if kubernetes_federates:
        kubernetes.federate(cloud)
    workloads = {}
    async with _running(kind, cloud, request), _running(kind, kubernetes, request):
        for name, made, domain in [("cloud", cloud, "cloud"), ("kubernetes", kubernetes, "k8s")]:
            for role in ("server", "client"):
                subject = f"{role}.{domain}.internal"
                sans = [subject, "127.0.0.1"] if role == "server" else [subject]
                workloads[name, role] = await federatls.bootstrap(made.token(subject, sans=sans))
    return Pair(cloud, kubernetes, workloads)


def _anchor(peer: PeerInfo | None) -> tuple[str, str, Provenance] | None:
    """The anchoring root of a peer as (common name, fingerprint, provenance)."""
    if peer is None or peer.anchor is None:
        return None
    return (peer.anchor.common_name, peer.anchor.fingerprint, peer.anchor.provenance)


@pytest.mark.parametrize("kind", KINDS)
async def test_mutual_tls_across_federated_cas(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """cloud and kubernetes federate each other: a cloud server and a kubernetes client
    exchange a line (federatls streams and plain asyncio), each seeing the other anchored in
    the other's root as FEDERATED; peers of the same CA are anchored as OWN."""
    pair = await _pair(kind, tmp_path, request, cloud_federates=True, kubernetes_federates=True)
    server, client = pair.workloads["cloud", "server"], pair.workloads["kubernetes", "client"]
    cloud_root = ("cloud Root CA", pair.cloud.fingerprint)
    k8s_root = ("kubernetes Root CA", pair.kubernetes.fingerprint)
    assert [(r.common_name, r.fingerprint, r.provenance) for r in server.trust] == [
        (*cloud_root, Provenance.OWN),
        (*k8s_root, Provenance.FEDERATED),
    ]
    assert [(r.common_name, r.fingerprint, r.provenance) for r in client.trust] == [
        (*k8s_root, Provenance.OWN),
        (*cloud_root, Provenance.FEDERATED),
    ]
    for api in APIS:
        outcome = await _exchange(server, client, api=api)
        assert outcome.verdict == "ok", api
        (seen,) = outcome.served
        assert seen.common_name == "client.k8s.internal"
        assert seen.certificate == client.certificate
        assert _anchor(seen) == (*k8s_root, Provenance.FEDERATED)
        assert outcome.client_peer is not None
        assert outcome.client_peer.common_name == "server.cloud.internal"
        assert _anchor(outcome.client_peer) == (*cloud_root, Provenance.FEDERATED)
        assert str(seen).startswith("client.k8s.internal [client.k8s.internal] anchored in ")

        own = await _exchange(server, pair.workloads["cloud", "client"], api=api)
        assert own.verdict == "ok", api
        assert _anchor(own.served[0]) == (*cloud_root, Provenance.OWN)
        assert _anchor(own.client_peer) == (*cloud_root, Provenance.OWN)


@pytest.mark.parametrize("kind", KINDS)
async def test_without_federation_handshakes_across_cas_are_refused(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Twin: neither CA federates: each workload trusts only its own root, so every
    cross-CA handshake fails (the client refuses the server first) and no handler runs;
    same-CA pairs still work."""
    pair = await _pair(kind, tmp_path, request, cloud_federates=False, kubernetes_federates=False)
    for (name, _role), identity in pair.workloads.items():
        assert [(r.fingerprint, r.provenance) for r in identity.trust] == [
            (pair.root(name).fingerprint, Provenance.OWN)
        ]
    for api in APIS:
        for server_ca, client_ca, verdict in [
            ("cloud", "kubernetes", "client refused server"),
            ("kubernetes", "cloud", "client refused server"),
            ("cloud", "cloud", "ok"),
            ("kubernetes", "kubernetes", "ok"),
        ]:
            outcome = await _exchange(
                pair.workloads[server_ca, "server"], pair.workloads[client_ca, "client"], api=api
            )
            assert outcome.verdict == verdict, (api, server_ca, client_ca, outcome)
            if verdict == "ok":
                assert _anchor(outcome.served[0]) == _anchor(outcome.client_peer)
                assert _anchor(outcome.served[0]) == (
                    f"{server_ca} Root CA",
                    pair.root(server_ca).fingerprint,
                    Provenance.OWN,
                )


@pytest.mark.parametrize("kind", KINDS)
async def test_one_way_federation_matrix(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """cloud federates kubernetes only: same-CA cells work, and each cross-CA cell fails on
    the side lacking trust (a kubernetes client refuses a cloud server; a kubernetes server
    refuses a cloud client that had accepted it as FEDERATED)."""
    # Cloud workloads trust both roots, kubernetes workloads only theirs, and mutual TLS needs
    # each side to trust the other's root: so neither cross-CA direction can work.
    pair = await _pair(kind, tmp_path, request, cloud_federates=True, kubernetes_federates=False)
    assert len(pair.workloads["cloud", "server"].trust) == 2
    assert len(pair.workloads["kubernetes", "server"].trust) == 1
    k8s_root = ("kubernetes Root CA", pair.kubernetes.fingerprint)
    matrix = {
        ("cloud", "cloud"): "ok",
        ("cloud", "kubernetes"): "client refused server",
        ("kubernetes", "cloud"): "server refused client",
        ("kubernetes", "kubernetes"): "ok",
    }
    for api in APIS:
        for (server_ca, client_ca), verdict in matrix.items():
            outcome = await _exchange(
                pair.workloads[server_ca, "server"], pair.workloads[client_ca, "client"], api=api
            )
            assert outcome.verdict == verdict, (api, server_ca, client_ca, outcome)
            if (server_ca, client_ca) == ("kubernetes", "cloud"):
                # the cloud client did accept the kubernetes server, through federation
                assert _anchor(outcome.client_peer) == (*k8s_root, Provenance.FEDERATED)


@pytest.mark.parametrize("kind", KINDS)
async def test_trust_own_refuses_the_federated_peer(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Twin of federation: with trust='own' a cloud server refuses the kubernetes client and
    a kubernetes client refuses the cloud server, though both CAs federate; own peers pass."""
    pair = await _pair(kind, tmp_path, request, cloud_federates=True, kubernetes_federates=True)
    server, client = pair.workloads["cloud", "server"], pair.workloads["kubernetes", "client"]
    for api in APIS:
        refused_by_server = await _exchange(server, client, api=api, server_trust="own")
        assert refused_by_server.verdict == "server refused client", api
        assert _anchor(refused_by_server.client_peer) == (
            "cloud Root CA",
            pair.cloud.fingerprint,
            Provenance.FEDERATED,
        )
        refused_by_client = await _exchange(server, client, api=api, client_trust="own")
        assert refused_by_client.verdict == "client refused server", api
        own = await _exchange(
            server,
            pair.workloads["cloud", "client"],
            api=api,
            server_trust="own",
            client_trust="own",
        )
        assert own.verdict == "ok", api
        assert _anchor(own.served[0]) == ("cloud Root CA", pair.cloud.fingerprint, Provenance.OWN)


# 5. Blocking code ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_bootstrap_sync_from_blocking_code(
    kind: str, pki: PKI, other: PKI, request: pytest.FixtureRequest
) -> None:
    """bootstrap_sync works from plain sync code, with options; a replay of its token
    propagates the CA's CARefusedError 401 to the caller."""
    with _running_sync(kind, pki, request):
        token = pki.token(SUBJECT, sans=SANS)
        identity = federatls.bootstrap_sync(
            token, key_type=KeyType.ED25519, lifetime=timedelta(hours=1)
        )
        with pytest.raises(CARefusedError) as refused:
            federatls.bootstrap_sync(token)
    assert identity.common_name == SUBJECT
    assert identity.sans == split_sans(SANS)
    assert isinstance(identity.certificate.public_key(), ed25519.Ed25519PublicKey)
    assert identity.not_after - identity.not_before == HOUR_AND_BACKDATE
    assert [r.provenance for r in identity.trust] == [Provenance.OWN, Provenance.FEDERATED]
    assert refused.value.status == 401
    assert refused.value.message.startswith(UNAUTHORIZED)


# 6. No plaintext key on disk ----------------------------------------------------------------------
class _Audit:
    """Audit events recorded while ``active``. ``sys.addaudithook`` cannot be undone, so the
    hook is installed once per process and does nothing unless a test is recording."""

    installed = False
    active = False
    events: list[tuple[str, tuple[Any, ...]]] = []  # noqa: RUF012


# Events that create, change or move files (``open`` is filtered by its flags below).
_FILE_EVENTS = frozenset(
    {
        "open",
        "os.chmod",
        "os.link",
        "os.mkdir",
        "os.remove",
        "os.rename",
        "os.symlink",
        "os.truncate",
        "shutil.copyfile",
        "shutil.move",
        "tempfile.mkdtemp",
        "tempfile.mkstemp",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PROC_FD = re.compile(r"/proc/self/fd/\d+")


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if _Audit.active and event in _FILE_EVENTS:
        if event == "open" and isinstance(args[0], str) and _PROC_FD.fullmatch(args[0]):
            try:  # what the descriptor is, while it is still open
                args = (*args, os.readlink(args[0]))
            except OSError:
                args = (*args, "?")
        _Audit.events.append((event, args))


def _is_memfd(target: str) -> bool:
    """Whether a /proc/self/fd/N link target is an anonymous memory file, unlinked."""
    return target.startswith("/memfd:") and target.endswith(" (deleted)")


@dataclass
class Recording:
    """What a recording saw: file events, and each in-memory key load as (path, what the
    path links to, its link count) observed while the path was open."""

    events: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    key_loads: list[tuple[str, str, int]] = field(default_factory=list)

    def writes(self) -> list[tuple[str, tuple[Any, ...]]]:
        """Every event that wrote or changed a file: opens for reading left out, and so are
        opens of /proc/self/fd/N that is an unlinked memfd (no file on any disk)."""
        out = []
        for event, args in self.events:
            if event == "open":
                path, mode, flags = args[:3]
                writing = isinstance(flags, int) and flags & _WRITE_FLAGS
                if not writing and not (isinstance(mode, str) and set(mode) & set("wax+")):
                    continue
                if _PROC_FD.fullmatch(str(path)) and _is_memfd(args[3]):
                    continue
            out.append((event, args))
        return out


@contextlib.contextmanager
def _recording() -> Iterator[Recording]:
    """Record file events (audit hook) and in-memory key loads (a profile hook on the one
    function that hands keys to OpenSSL, ``_sslkeys._load``) in this thread."""
    if not _Audit.installed:
        sys.addaudithook(_audit_hook)
        _Audit.installed = True
    recording = Recording()
    target = _sslkeys._load.__code__

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is target:
            path = str(frame.f_locals["path"])
            recording.key_loads.append((path, os.readlink(path), os.stat(path).st_nlink))

    previous = sys.getprofile()
    _Audit.events.clear()
    _Audit.active = True
    sys.setprofile(profile)
    try:
        yield recording
    finally:
        sys.setprofile(previous)
        _Audit.active = False
        recording.events = list(_Audit.events)
        _Audit.events.clear()


def _files_containing(needles: list[bytes], roots: list[str], since: float) -> list[str]:
    """Regular files under ``roots`` modified since ``since`` holding any of ``needles``."""
    found: dict[str, None] = {}  # ordered, and roots may nest (tmp_path is under /tmp)
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    info = os.lstat(path)
                    if not stat.S_ISREG(info.st_mode) or info.st_mtime < since:
                        continue
                    if info.st_size > 64 * 1024 * 1024:
                        continue
                    data = Path(path).read_bytes()
                except OSError:
                    continue
                if any(n in data for n in needles):
                    found[os.path.realpath(path)] = None
    return list(found)


def _key_needles(identity: Identity) -> list[bytes]:
    """Byte strings any copy of the identity's key would contain: the first base64 line of
    its PKCS#8 and SEC1 PEMs, its PKCS#8 DER, and the raw private scalar."""
    pem = identity.export_private_key(password=None)
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return [
        _pem_body(pem)[:64].encode(),
        _pem_body(sec1)[:64].encode(),
        der,
        key.private_numbers().private_value.to_bytes(32, "big"),
    ]


def _scan_roots(tmp_path: Path) -> list[str]:
    return [str(tmp_path), tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"]


@pytest.mark.skipif(sys.platform != "linux", reason="the memfd key path is Linux-only")
async def test_no_plaintext_key_file_is_ever_written(pki: PKI, tmp_path: Path) -> None:
    """Through bootstrap, server_context(), client_context() and an mTLS exchange nothing is
    opened for writing; each key reaches OpenSSL through /proc/self/fd/N of an unlinked
    memfd; no file under the temporary directories holds either key."""
    since = datetime.now(UTC).timestamp() - 2
    async with serving(pki):
        server_token = pki.token(SUBJECT, sans=SANS)
        client_token = pki.token("client.cloud.internal")
        with _recording() as recording:
            server = await federatls.bootstrap(server_token)
            client = await federatls.bootstrap(client_token)
            server.server_context()
            client.client_context()
            outcome = await _exchange(server, client, api="streams")
    assert outcome.verdict == "ok"
    assert recording.writes() == []
    assert [e for e in recording.events if e[0] != "open"] == []
    # two explicit contexts, then one each for the exchange's server and client
    assert len(recording.key_loads) == 4
    for path, target, links in recording.key_loads:
        assert _PROC_FD.fullmatch(path), path
        assert _is_memfd(target), target
        assert target.startswith("/memfd:federatls-key"), target
        assert links == 0
    for identity in (server, client):
        assert _files_containing(_key_needles(identity), _scan_roots(tmp_path), since) == []


def _write_through_proc(fd: int, data: bytes) -> None:
    """Open /proc/self/fd/``fd`` for writing by path (the way a key could reach OpenSSL)."""
    with open(f"/proc/self/fd/{fd}", "wb") as through_proc:
        through_proc.write(data)


@pytest.mark.skipif(sys.platform != "linux", reason="memfd_create is Linux-only")
async def test_the_watchers_see_a_key_written_to_disk(pki: PKI, tmp_path: Path) -> None:
    """Twin: a key file written (and renamed) while recording is caught by the audit hook and
    found on disk by the scan; /proc/self/fd/N is let through only for a memfd, not for a
    file on disk; the profile hook sees the context's key load."""
    since = datetime.now(UTC).timestamp() - 2
    async with serving(pki):
        identity = await federatls.bootstrap(pki.token(SUBJECT, sans=SANS))
    pem = identity.export_private_key(password=None)
    leaked = tmp_path / "leaked" / "key.pem"
    leaked.parent.mkdir()
    disk = str(tmp_path / "behind-a-descriptor")
    memfd = os.memfd_create("twin", os.MFD_CLOEXEC)
    disk_fd = os.open(disk, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with _recording() as recording:
            leaked.write_bytes(pem)
            os.rename(leaked, leaked.with_name("moved.pem"))
            for fd in (memfd, disk_fd):
                _write_through_proc(fd, b"not the key")
            identity.server_context()
    finally:
        os.close(memfd)
        os.close(disk_fd)
    moved = str(leaked.with_name("moved.pem"))
    assert [(event, str(args[0])) for event, args in recording.writes()] == [
        ("open", str(leaked)),
        ("os.rename", str(leaked)),
        ("open", f"/proc/self/fd/{disk_fd}"),
    ]
    assert len(recording.key_loads) == 1
    found = _files_containing(_key_needles(identity), _scan_roots(tmp_path), since)
    assert found == [moved]
