"""Attacks on issue 15's federation by a peer the CA follows, against real CAs and real TLS
on 127.0.0.1: what a peer publishes at its ``/roots`` goes into every workload's trust store
of the following CA with no operator in between, so it must not be able to break that CA's
own traffic."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import socket
import ssl
import threading
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from federatls import Identity
from federatls._client import client_tls_context
from federatls._protocol import ErrorBody
from federatls._x509 import certs_to_pem, fingerprint, load_pem_certificate
from federatls.ca._federation import PeerConfig, PeerState, peer_status
from test_federation_peers import follow, serving, until_federation

from harness import PKI, free_port, make_pki
from harness import serving as serving_ca

pytestmark = pytest.mark.anyio


def _shadow_of(target: x509.Certificate) -> x509.Certificate:
    """A self-signed CA certificate with ``target``'s subject and key identifier but a key
    of its own: what any peer can make from ``target``'s public certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ski = target.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(target.subject)
        .issuer_name(target.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _handshake(server: Identity, client: Identity, host: str) -> None:
    """One mutual TLS handshake between the two identities' contexts (over a socket pair);
    the client's exception, if any, is raised."""
    a, b = socket.socketpair()
    with a, b:
        done = threading.Thread(target=_serve_once, args=(server, a), daemon=True)
        done.start()
        with client.client_context().wrap_socket(b, server_hostname=host) as tls:
            tls.sendall(b"x")
        done.join(10)


def _serve_once(server: Identity, sock: socket.socket) -> None:
    try:
        with server.server_context().wrap_socket(sock, server_side=True) as tls:
            tls.recv(1)
    except (OSError, ValueError):  # the client's refusal is what the test looks at
        pass


async def _identity(pki: PKI, name: str) -> Identity:
    chain, key = await pki.enroll(name)
    async with pki.client() as ca:
        trust = await ca.trust_bundle()
    return Identity.from_parts(chain, key, trust, pki.url)


@pytest.mark.parametrize("shadowed", ["intermediate", "none"])
async def test_a_peer_root_posing_as_our_intermediate_is_not_followed(
    tmp_path: Path, shadowed: str
) -> None:
    """A peer that lists, among its roots, a self-signed certificate with the following CA's
    intermediate's subject and key identifier (OpenSSL would take it as that intermediate's
    trusted self, and refuse every chain through the real one) gets it left out of
    ``/federation``, and the CA's own workloads still talk to each other; the peer's real
    root is still followed. Twin: ``shadowed="none"``, and the same attack on the code
    before this fix, where the cloud's own handshakes failed with a signature failure."""
    kube = make_pki(tmp_path, "kubernetes", address=f"127.0.0.1:{free_port()}")
    cloud = make_pki(tmp_path, "cloud")
    intermediate = load_pem_certificate(
        (cloud.directory / "certs" / "intermediate_ca.crt").read_bytes()
    )
    extra = [_shadow_of(intermediate)] if shadowed == "intermediate" else []
    if extra:
        roots = tmp_path / "kube-roots.crt"
        roots.write_text(certs_to_pem([kube.root, *extra]))
        kube.edit(lambda d: d.__setitem__("root", str(roots)))
    async with serving(kube):
        async with kube.client() as ca:
            published = {fingerprint(c) for c in await ca.roots_bundle()}
        assert published == {kube.fingerprint, *(fingerprint(c) for c in extra)}
        follow(cloud, kube.url, kube.fingerprint)
        async with serving(cloud) as server:
            await until_federation(cloud, lambda fps: kube.fingerprint in fps)
            await asyncio.sleep(0.5)  # one more refresh: the answer is not partly followed
            peer = next(s for s in server.authority.federation_sources() if s.kind == "peer")
            assert [fingerprint(r) for r in peer.roots] == [kube.fingerprint]
            a = await _identity(cloud, "a.cloud.internal")
            b = await _identity(cloud, "b.cloud.internal")
            assert {r.fingerprint for r in a.trust} == {cloud.fingerprint, kube.fingerprint}
            await asyncio.to_thread(_handshake, b, a, "b.cloud.internal")


def _serve_unix(server: Identity, sock: socket.socket, errors: list[BaseException]) -> None:
    try:
        with server.server_context().wrap_socket(sock, server_side=True) as tls:
            tls.recv(1)
    except Exception as exc:  # what the server's own code sees is the point
        errors.append(exc)


@pytest.mark.parametrize("client_ca", ["stranger", "cloud"])
async def test_a_refused_handshake_on_a_unix_socket_stays_a_tls_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, client_ca: str
) -> None:
    """A blocking federatls server on a Unix socket that refuses a client (its certificate
    from a CA it does not trust) raises the ``ssl.SSLError`` and logs the refusal, as on TCP;
    it used to raise ``ValueError`` from naming the peer's (absent) address. Twin: a client
    of the server's own CA is served on the same kind of socket."""
    cloud = make_pki(tmp_path, "cloud")
    other = make_pki(tmp_path, "stranger") if client_ca == "stranger" else cloud
    async with contextlib.AsyncExitStack() as running:
        await running.enter_async_context(serving(cloud))
        if other is not cloud:
            await running.enter_async_context(serving(other))
        server = await _identity(cloud, "b.cloud.internal")
        client = await _identity(other, "a.cloud.internal")
    client = Identity.from_parts(client.chain, client._key, server.trust, cloud.url)
    a, b = socket.socketpair(socket.AF_UNIX)
    errors: list[BaseException] = []
    with a, b:
        thread = threading.Thread(target=_serve_unix, args=(server, a, errors), daemon=True)
        thread.start()
        try:
            with client.client_context().wrap_socket(b, server_hostname="b.cloud.internal") as c:
                c.sendall(b"x")
        except (ssl.SSLError, OSError):
            pass
        thread.join(10)
    if client_ca == "cloud":
        assert errors == []
        return
    assert len(errors) == 1
    assert isinstance(errors[0], ssl.SSLError), repr(errors[0])
    assert any("refused a TLS client" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("error", ["x\x1b[31mred\nWARNING forged", "connection refused"])
def test_the_peers_report_escapes_a_stored_error(error: str) -> None:
    """``federatls ca peers`` escapes the stored last error again when it shows it: a state
    another program wrote to the shared store (raw control characters) cannot paint the
    operator's terminal or forge a line. Twin: a plain error is shown as stored."""
    peer = PeerConfig(
        name="kubernetes",
        profile="step",
        url="https://127.0.0.1:9443",
        names=("*.k8s.internal",),
        fingerprint="ab" * 32,
    )
    raw = json.dumps({"lastError": error, "url": peer.url, "fingerprint": peer.fingerprint})
    shown = peer_status(peer, PeerState.from_bytes(raw.encode(), "peer:kubernetes"))["lastError"]
    if error == "connection refused":
        assert shown == error
    else:
        assert shown == "x\\x1b[31mred\\nWARNING forged"


async def test_odd_requests_to_the_federation_endpoints(pki: PKI) -> None:
    """``/federatls/federation`` and ``/spiffe/bundle`` answer a query string, the ``/1.0``
    prefix and 40 requests at once as a plain GET; HEAD and POST get step-ca's 405 JSON body,
    and a path with a trailing slash its 404, never a crash or an empty 200. Twin: the plain
    GET itself answers 200 with the federation and the bundle."""
    pki.edit(lambda data: data.__setitem__("spiffe", {"trustDomain": "cloud.internal"}))
    async with serving_ca(pki) as ca:
        verify = client_tls_context(ca.authority.roots())
        async with httpx.AsyncClient(verify=verify, trust_env=False) as client:
            for path in ("/federatls/federation", "/spiffe/bundle"):
                plain = await client.get(ca.url + path)
                assert plain.status_code == 200
                assert plain.json()  # the twin: a real answer
                for odd in (f"{path}?x=1&cursor=%00", f"/1.0{path}", f"/1.0{path}?"):
                    answer = await client.get(ca.url + odd)
                    assert (answer.status_code, answer.content) == (200, plain.content), odd
                many = await asyncio.gather(*(client.get(ca.url + path) for _ in range(40)))
                assert {(a.status_code, a.content) for a in many} == {(200, plain.content)}
                for method in ("HEAD", "POST"):
                    answer = await client.request(method, ca.url + path)
                    assert answer.status_code == 405, method
                    if method == "POST":
                        assert answer.json() == ErrorBody.for_status(405).to_json()
                answer = await client.get(ca.url + path + "/")
                assert answer.status_code == 404
                assert answer.json() == ErrorBody.for_status(404).to_json()
