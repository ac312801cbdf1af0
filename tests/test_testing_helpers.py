"""``federatls.testing``: the in-process CAs and pytest fixtures users test their own mutual-TLS
code with. Every CA here is real (the federatls CA on 127.0.0.1, on a thread of its own) and
every handshake is a real one between blocking sockets; the tests are plain sync code, as a
user's would be.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import textwrap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import federatls
from federatls import CARefusedError, CAUnreachableError, Identity, Provenance
from federatls.testing import TestCA, federated_pair, running_ca

pytest_plugins = ["pytester"]

SHORT = {"minTLSCertDuration": "5s", "defaultTLSCertDuration": "1m", "maxTLSCertDuration": "1h"}


def _fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, computed here rather than by federatls."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _temp_dir(ca: TestCA) -> Path:
    """The temporary directory ``running_ca`` made for ``ca``."""
    return next(p for p in ca.config.parents if p.name.startswith("federatls-test-"))


def _prints(identity: Identity) -> dict[str, Provenance]:
    return {root.fingerprint: root.provenance for root in identity.trust}


def _get(ca: TestCA, path: str) -> httpx.Response:
    """GET ``path`` from ``ca``, verifying its TLS certificate against its root only."""
    ctx = ssl.create_default_context(cadata=ca.root_path.read_text())
    return httpx.get(ca.url + path, verify=ctx, timeout=10)


def _federation(ca: TestCA) -> set[str]:
    """Fingerprints of the roots the CA's ``/federation`` lists right now."""
    response = _get(ca, "/federation")
    assert response.status_code == 201
    pems = response.json()["crts"]
    return {_fingerprint(x509.load_pem_x509_certificate(p.encode())) for p in pems}


def _mtls(server: Identity, client: Identity, hostname: str = "localhost") -> tuple[str, str]:
    """One mutual-TLS handshake between blocking sockets (the server on its own thread, the
    client checking ``hostname``); returns the common names each side saw, server's view
    first. A handshake failure on the client side is raised; the server's, if the client's
    did not fail first, too."""

    def probe(me: Identity) -> Callable[[ssl.SSLSocket], str]:
        return lambda tls: me.peer(tls).common_name

    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> str:
            conn, _ = listener.accept()
            with server.server_context().wrap_socket(conn, server_side=True) as tls:
                seen = probe(server)(tls)
                tls.sendall(b"ok")
                return seen

        served = pool.submit(serve)
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client.client_context().wrap_socket(raw, server_hostname=hostname) as tls,
            ):
                seen_by_client = probe(client)(tls)
                assert tls.recv(2) == b"ok"
        except BaseException:
            # The server's own failure (if any) is secondary: wait for it, then re-raise ours.
            served.exception(timeout=10)
            raise
        return served.result(timeout=10), seen_by_client


def _no_new_threads(before: set[threading.Thread]) -> bool:
    return set(threading.enumerate()) <= before


# running_ca ------------------------------------------------------------------------------------
def test_running_ca_is_a_working_ca() -> None:
    """``running_ca()`` serves a CA on 127.0.0.1: its root and fingerprint match what it serves,
    its tokens enrol through ``bootstrap_sync``, ``identity()`` works in sync code; afterwards
    the CA is gone, its thread ended and its temporary directory deleted."""
    threads = set(threading.enumerate())
    with running_ca("test") as ca:
        assert ca.url.startswith("https://127.0.0.1:")
        assert int(ca.url.rsplit(":", 1)[1]) > 0
        assert ca.root.subject.rfc4514_string() == "CN=test Root CA,O=test"
        assert ca.root_fingerprint == _fingerprint(ca.root)
        served = _get(ca, f"/root/{ca.root_fingerprint}")
        assert served.status_code == 200
        assert x509.load_pem_x509_certificate(served.json()["ca"].encode()) == ca.root
        assert _get(ca, "/health").json() == {"status": "ok"}

        by_token = federatls.bootstrap_sync(ca.token("svc.test", sans=["svc.test", "10.0.0.1"]))
        assert by_token.common_name == "svc.test"
        assert by_token.sans.as_strings() == ["svc.test", "10.0.0.1"]
        by_helper = ca.identity("helper.test")
        assert by_helper.sans.as_strings() == ["helper.test"]  # sans default to the subject
        for identity in (by_token, by_helper):
            assert identity.ca_url == ca.url
            assert _prints(identity) == {ca.root_fingerprint: Provenance.OWN}
            assert identity.trust.anchor_of(identity.chain[-1]) is not None
            assert identity.not_after - datetime.now(UTC) > timedelta(hours=23)
        assert _mtls(by_token, by_helper, "svc.test") == ("helper.test", "svc.test")
        directory = _temp_dir(ca)
        assert (directory / "test").is_dir()
        url = ca.url
    assert not directory.exists()
    assert _no_new_threads(threads)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", verify=False, timeout=5)  # noqa: S501


def test_running_ca_refuses_replayed_and_foreign_tokens() -> None:
    """Twin: the CA behind ``running_ca()`` really checks tokens: a replayed one is refused
    (401), so is one signed by another CA's provisioner; after the block, enrolling fails as
    the CA is unreachable."""
    with running_ca("test") as ca, running_ca("other") as other:
        token = ca.token("svc.test")
        federatls.bootstrap_sync(token)
        with pytest.raises(CARefusedError) as replayed:
            federatls.bootstrap_sync(token)
        assert replayed.value.status == 401
        header, claims, _ = ca.token("svc.test").split(".")
        foreign_signature = other.token("svc.test").split(".")[2]
        with pytest.raises(CARefusedError) as refused:
            federatls.bootstrap_sync(f"{header}.{claims}.{foreign_signature}")
        assert refused.value.status == 401
        late = ca.token("late.test")
    with pytest.raises(CAUnreachableError):
        federatls.bootstrap_sync(late, timeout=5)


def test_running_ca_cleans_up_after_an_error() -> None:
    """An exception inside the block propagates, and the CA, its thread and its temporary
    directory are gone all the same."""
    threads = set(threading.enumerate())
    seen: list[TestCA] = []

    def failing_test() -> None:
        with running_ca("test") as ca:
            seen.append(ca)
            assert _temp_dir(ca).is_dir()
            raise LookupError("the test failed")

    with pytest.raises(LookupError, match="the test failed"):
        failing_test()
    (ca,) = seen
    assert not _temp_dir(ca).exists()
    assert _no_new_threads(threads)
    with pytest.raises(httpx.ConnectError):
        httpx.get(ca.url + "/health", verify=False, timeout=5)  # noqa: S501


def test_running_ca_in_a_directory_of_ones_own(tmp_path: Path) -> None:
    """With ``directory=``, the PKI is made there and left there for the caller."""
    with running_ca("mine", directory=tmp_path) as ca:
        assert ca.config.is_relative_to(tmp_path)
        assert ca.root_path.is_relative_to(tmp_path)
        assert ca.identity("svc.mine").common_name == "svc.mine"
    assert ca.config.is_file()
    assert ca.root_path.is_file()


def test_running_ca_with_short_lived_claims() -> None:
    """``claims`` reach the provisioner: a default certificate lives about one minute, a
    longer one may be asked for up to the maximum."""
    with running_ca("short", claims=SHORT) as ca:
        short = ca.identity("svc.short")
        longer = ca.identity("svc.short", lifetime=timedelta(minutes=30))
    left = short.not_after - datetime.now(UTC)
    assert timedelta(seconds=45) < left <= timedelta(seconds=61)
    assert timedelta(minutes=29) < longer.not_after - datetime.now(UTC) <= timedelta(minutes=31)


def test_running_ca_claims_bound_the_lifetime() -> None:
    """Twin: past ``maxTLSCertDuration`` the CA refuses (403), and without claims the default
    is step's 24 hours, not one minute."""
    with running_ca("short", claims=SHORT) as ca:
        with pytest.raises(CARefusedError) as info:
            ca.identity("svc.short", lifetime=timedelta(hours=2))
        assert info.value.status == 403
        assert "maximum certificate duration" in info.value.message
    with running_ca("default") as ca:
        assert ca.identity("svc").not_after - datetime.now(UTC) > timedelta(hours=23)


# federated_pair --------------------------------------------------------------------------------
def test_federated_pair_is_federated_both_ways() -> None:
    """``federated_pair()``: identities of each CA trust both roots (own and federated), and
    mutual TLS works in both directions; both temporary directories go away afterwards."""
    with federated_pair() as (cloud, kubernetes):
        assert (cloud.name, kubernetes.name) == ("cloud", "kubernetes")
        both = {cloud.root_fingerprint, kubernetes.root_fingerprint}
        assert _federation(cloud) == _federation(kubernetes) == both
        in_cloud = cloud.identity("server.cloud.internal", sans=["localhost", "127.0.0.1"])
        in_k8s = kubernetes.identity("client.k8s.internal", sans=["localhost"])
        assert _prints(in_cloud) == {
            cloud.root_fingerprint: Provenance.OWN,
            kubernetes.root_fingerprint: Provenance.FEDERATED,
        }
        assert _prints(in_k8s) == {
            kubernetes.root_fingerprint: Provenance.OWN,
            cloud.root_fingerprint: Provenance.FEDERATED,
        }
        assert _mtls(in_cloud, in_k8s) == ("client.k8s.internal", "server.cloud.internal")
        assert _mtls(in_k8s, in_cloud) == ("server.cloud.internal", "client.k8s.internal")
        directories = [_temp_dir(cloud), _temp_dir(kubernetes)]
        assert directories[0] != directories[1]
    assert not any(d.exists() for d in directories)


def test_federated_pair_one_way() -> None:
    """Twin: with ``mutual=False`` the second CA does not trust the first: its identities
    refuse the first's servers in the handshake, though the first trusts the second."""
    with federated_pair(mutual=False) as (cloud, kubernetes):
        assert _federation(cloud) == {cloud.root_fingerprint, kubernetes.root_fingerprint}
        assert _federation(kubernetes) == {kubernetes.root_fingerprint}
        in_cloud = cloud.identity("server.cloud.internal", sans=["localhost"])
        in_k8s = kubernetes.identity("client.k8s.internal", sans=["localhost"])
        assert kubernetes.root_fingerprint in _prints(in_cloud)
        assert _prints(in_k8s) == {kubernetes.root_fingerprint: Provenance.OWN}
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            _mtls(in_cloud, in_k8s)


def test_federated_pair_passes_claims_to_both() -> None:
    """``federated_pair(claims=...)`` gives both CAs the short-lived claims."""
    with federated_pair(claims=SHORT) as (cloud, kubernetes):
        lifetimes = [ca.identity("svc").not_after - datetime.now(UTC) for ca in (cloud, kubernetes)]
    assert all(timedelta(seconds=45) < left <= timedelta(seconds=61) for left in lifetimes)


# TestCA.federate --------------------------------------------------------------------------------
def test_federate_at_run_time() -> None:
    """``TestCA.federate()`` on running CAs updates ``/federation`` at once: identities made
    afterwards trust the other root and talk mutual TLS; those made before keep their bundle."""
    with running_ca("cloud") as cloud, running_ca("kubernetes") as kubernetes:
        old_server = cloud.identity("server.cloud.internal", sans=["localhost"])
        old_client = kubernetes.identity("client.k8s.internal", sans=["localhost"])
        assert _federation(cloud) == {cloud.root_fingerprint}
        with pytest.raises(ssl.SSLCertVerificationError):
            _mtls(old_server, old_client)

        cloud.federate(kubernetes)
        kubernetes.federate(cloud)
        assert _federation(cloud) == _federation(kubernetes)
        assert _federation(cloud) == {cloud.root_fingerprint, kubernetes.root_fingerprint}
        server = cloud.identity("server.cloud.internal", sans=["localhost"])
        client = kubernetes.identity("client.k8s.internal", sans=["localhost"])
        assert _prints(server)[kubernetes.root_fingerprint] is Provenance.FEDERATED
        assert _prints(client)[cloud.root_fingerprint] is Provenance.FEDERATED
        assert _mtls(server, client) == ("client.k8s.internal", "server.cloud.internal")
        assert len(old_server.trust) == 1
        with pytest.raises(ssl.SSLCertVerificationError):
            _mtls(server, old_client)  # old_client still trusts only the kubernetes root


def test_federate_with_a_missing_root_keeps_the_running_configuration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Twin: federating with a CA whose root file is gone fails loudly (``RuntimeError``) and
    the running CA keeps serving its previous federation."""
    with running_ca("gone") as gone:
        pass
    assert not gone.root_path.exists()
    with running_ca("cloud") as cloud, running_ca("kubernetes") as kubernetes:
        cloud.federate(kubernetes)
        with pytest.raises(RuntimeError, match="could not reload"):
            cloud.federate(gone)
        assert "reload failed" in caplog.text
        assert str(gone.root_path) in caplog.text
        assert _federation(cloud) == {cloud.root_fingerprint, kubernetes.root_fingerprint}
        assert kubernetes.root_fingerprint in _prints(cloud.identity("svc"))


# The pytest fixtures ---------------------------------------------------------------------------
INNER_TESTS = """
    from pathlib import Path

    from federatls import Provenance

    pytest_plugins = ["federatls.testing"]


    def test_one_ca(federatls_ca):
        identity = federatls_ca.identity("svc.test")
        assert identity.common_name == "svc.test"
        assert [r.fingerprint for r in identity.trust] == [federatls_ca.root_fingerprint]
        with open("configs.txt", "a") as out:
            out.write(f"{federatls_ca.config}\\n")


    def test_pair(federatls_pair):
        cloud, kubernetes = federatls_pair
        assert (cloud.name, kubernetes.name) == ("cloud", "kubernetes")
        for ca, other in ((cloud, kubernetes), (kubernetes, cloud)):
            identity = ca.identity(f"svc.{ca.name}")
            provenance = {r.fingerprint: r.provenance for r in identity.trust}
            assert provenance == {
                ca.root_fingerprint: Provenance.OWN,
                other.root_fingerprint: Provenance.FEDERATED,
            }
        with open("configs.txt", "a") as out:
            out.write(f"{cloud.config}\\n{kubernetes.config}\\n")
"""


def test_pytest_fixtures_through_pytest_plugins(pytester: pytest.Pytester) -> None:
    """A test module declaring ``pytest_plugins = ["federatls.testing"]`` gets working
    ``federatls_ca`` and ``federatls_pair`` fixtures, whose CAs are cleaned up after each test."""
    pytester.makepyfile(test_inner=textwrap.dedent(INNER_TESTS))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    configs = [Path(line) for line in (pytester.path / "configs.txt").read_text().splitlines()]
    assert len(configs) == 3
    for config in configs:
        directory = next(p for p in config.parents if p.name.startswith("federatls-test-"))
        assert not directory.exists(), directory


def test_pytest_fixtures_need_the_plugin(pytester: pytest.Pytester) -> None:
    """Twin: without ``pytest_plugins = ["federatls.testing"]`` the fixtures do not exist."""
    inner = textwrap.dedent(INNER_TESTS).replace('pytest_plugins = ["federatls.testing"]', "")
    pytester.makepyfile(test_inner=inner)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*fixture 'federatls_ca' not found*"])
    result.stdout.fnmatch_lines(["*fixture 'federatls_pair' not found*"])
