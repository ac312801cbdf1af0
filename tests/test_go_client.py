"""A Go client, as step's own clients are, against the federatls CA and the real step-ca.

``tests/goclient/main.go`` uses only Go's standard library (crypto/tls, net/http with
keep-alive and HTTP/2 offered, as step's transport does) and step's paths. It asks for
/health twice on one client; fetches the root by its fingerprint (as ``step ca bootstrap``),
/version, /provisioners, /roots and /federation; signs a CSR with a one-time token; renews the
certificate over mutual TLS with the TLS settings of the answer's ``tlsOptions`` and rekeys
it; revokes the renewed certificate over mutual TLS and tries to renew it again. The same
binary runs against both CAs serving the same PKI, so a difference is the CA's. It is built
with the Go toolchain that ``../shared/tools/stepca/build.sh`` installs (offline, GOPATH
mode, standard library only).

``tests/gomtls/main.go`` is the other side of the story: a Go server and a Go client, each
enrolled with one of two CAs and trusting its CA's /federation, exchange one request over
mutual TLS, for every way the two CAs can federate.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from harness import PKI, go_build, make_pki, serving, stepca_process

pytestmark = [pytest.mark.anyio, pytest.mark.stepca]

# The client's steps before it signs, in order.
BEFORE_SIGN = (
    *("health", "health", "root", "root-unknown"),
    *("version", "provisioners", "roots", "federation"),
)


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go client of step's CA API, built once per session."""
    return go_build("goclient", tmp_path_factory.mktemp("goclient"))


@pytest.fixture(scope="session")
def go_mtls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go server and client that exchange one request over mutual TLS."""
    return go_build("gomtls", tmp_path_factory.mktemp("gomtls"))


@dataclass
class Run:
    code: int
    steps: list[dict[str, Any]]
    stderr: str


async def run_go_client(binary: Path, pki: PKI, token: str, subject: str, root: Path) -> Run:
    result = await anyio.run_process([str(binary), pki.url, str(root), token, subject], check=False)
    steps = [json.loads(line) for line in result.stdout.decode().splitlines() if line]
    return Run(result.returncode, steps, result.stderr.decode())


def _cert(step: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(step["crt"].encode())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def test_go_client_signs_renews_rekeys_and_revokes(
    any_ca: str, pki: PKI, go_client: Path
) -> None:
    """Keep-alive, bootstrap, sign with a token, renew and rekey over mutual TLS with the
    answer's tlsOptions, revoke over mutual TLS, and the refused renewal of the revoked
    certificate on the same connection (the twin of the renewal): the same on both CAs."""
    run = await run_go_client(
        go_client, pki, pki.token("go.internal"), "go.internal", pki.root_path
    )
    assert run.code == 0, run.stderr
    steps = [s["step"] for s in run.steps]
    assert steps == [*BEFORE_SIGN, "sign", "renew", "rekey", "revoke", "renew-revoked"]
    health = run.steps[:2]
    root, unknown, version, provisioners, roots, federation = run.steps[2:8]
    signed, renewed, rekeyed, revoked, refused = run.steps[8:]
    assert [h["status"] for h in health] == [200, 200]
    assert [h["reused"] for h in health] == [False, True]  # one connection, kept alive
    # Go offers HTTP/2 as step's client does; step-ca takes it, the federatls CA answers in
    # HTTP/1.1 (it offers only that in ALPN), and Go falls back without a fuss.
    expected = "HTTP/1.1" if any_ca == "federatls" else "HTTP/2.0"
    assert {h["proto"] for h in health} == {renewed["proto"]} == {expected}
    # step ca bootstrap: the root by its fingerprint, and its twin, a root the CA lacks.
    assert root == {"step": "root", "status": 200, "matches": True}
    assert unknown["status"] == 404
    assert json.loads(unknown["body"])["status"] == 404
    assert version["version"]  # each CA names its own version
    assert version["requireClientAuthentication"] is False
    assert provisioners["names"] == [f"JWK:{pki.provisioner}"]
    assert provisioners["nextCursor"] == ""
    assert roots["fingerprints"] == federation["fingerprints"] == [pki.fingerprint]
    assert signed["tlsOptions"] is True  # Go understood every cipher suite and version
    first, second = _cert(signed), _cert(renewed)
    assert signed["chain"] == renewed["chain"] == 2  # leaf and intermediate
    assert _cn(first) == _cn(second) == "go.internal"
    assert first.issuer == second.issuer
    assert first.serial_number != second.serial_number
    # notAfter "1h" as step ca certificate --not-after 1h sends it; notBefore is backdated
    # by step-ca's default minute.
    lifetime = first.not_valid_after_utc - first.not_valid_before_utc
    assert lifetime == timedelta(hours=1, minutes=1)
    third = _cert(rekeyed)
    assert rekeyed["chain"] == 2
    assert rekeyed["newKey"] is True  # the key of the rekey CSR, not the old one
    assert _cn(third) == "go.internal"
    assert third.serial_number not in (first.serial_number, second.serial_number)
    assert revoked["status"] == 200
    assert json.loads(revoked["body"]) == {"status": "ok"}
    assert refused["status"] == 401
    assert refused["reused"] is True  # revocation reaches a connection already open
    assert json.loads(refused["body"])["status"] == 401


async def test_go_client_refuses_a_foreign_root(
    any_ca: str, pki: PKI, go_client: Path, tmp_path: Path
) -> None:
    """Twin: trusting another CA's root, Go's TLS refuses the CA before any request."""
    other = make_pki(tmp_path, "elsewhere")
    run = await run_go_client(
        go_client, pki, pki.token("go.internal"), "go.internal", other.root_path
    )
    assert run.code == 1
    assert run.steps == []
    assert "certificate signed by unknown authority" in run.stderr


async def test_go_client_replayed_token_is_refused(any_ca: str, pki: PKI, go_client: Path) -> None:
    """Twin: the second enrolment with the same one-time token gets step-ca's 401."""
    token = pki.token("go.internal")
    first = await run_go_client(go_client, pki, token, "go.internal", pki.root_path)
    assert first.code == 0, first.stderr
    again = await run_go_client(go_client, pki, token, "go.internal", pki.root_path)
    assert again.code == 1
    assert [s["step"] for s in again.steps] == list(BEFORE_SIGN)
    assert "sign: HTTP 401" in again.stderr


# Go workloads across two CAs -----------------------------------------------------------------
@contextlib.asynccontextmanager
async def _serving(kind: str, pki: PKI, request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """``pki`` served by the federatls CA or by the real step-ca."""
    if kind == "federatls":
        async with serving(pki):
            yield
    else:
        with stepca_process(request.getfixturevalue("stepca_bin"), pki):
            yield


async def _party(pki: PKI, subject: str, sans: list[str]) -> tuple[dict[str, str], str]:
    """A workload enrolled with ``pki`` as gomtls reads it (its chain, key and the CA's
    /federation bundle), and the common name of its certificate's issuer."""
    chain, key = await pki.enroll(subject, sans=sans)
    async with pki.client() as ca:
        bundle = await ca.federation()
    pem = serialization.Encoding.PEM
    party = {
        "chain": "".join(c.public_bytes(pem).decode() for c in chain),
        "key": key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        "trust": "".join(c.public_bytes(pem).decode() for c in bundle),
    }
    return party, _cn(chain[1])


# (cloud federates kubernetes, kubernetes federates cloud) -> what happens to a kubernetes
# client calling a cloud server
CELLS = [
    pytest.param(True, True, "ok", id="both-ways"),
    pytest.param(False, False, "client refuses the server", id="none"),
    pytest.param(True, False, "client refuses the server", id="cloud-only"),
    pytest.param(False, True, "server refuses the client", id="kubernetes-only"),
]


@pytest.mark.parametrize(("cloud_federates", "kubernetes_federates", "outcome"), CELLS)
@pytest.mark.parametrize("kind", ["federatls", "step-ca"])
async def test_go_workloads_across_two_cas(
    kind: str,
    cloud_federates: bool,
    kubernetes_federates: bool,
    outcome: str,
    go_mtls: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A Go server enrolled with 'cloud' and a Go client enrolled with 'kubernetes', each
    trusting its CA's /federation, talk over mutual TLS only when each CA federates the
    other; one-way federation fails on the side that lacks the other's root. Go's x509
    checks the certificates the CA issued (names, key usages, chains) on both sides."""
    cloud, kubernetes = make_pki(tmp_path, "cloud"), make_pki(tmp_path, "kubernetes")
    if cloud_federates:
        cloud.federate(kubernetes)
    if kubernetes_federates:
        kubernetes.federate(cloud)
    async with _serving(kind, cloud, request), _serving(kind, kubernetes, request):
        server, _ = await _party(cloud, "server.cloud.internal", ["server.cloud.internal"])
        client, client_issuer = await _party(kubernetes, "client.k8s.internal", [])
    exchange = {"serverName": "server.cloud.internal", "server": server, "client": client}
    result = await anyio.run_process(
        [str(go_mtls)], input=json.dumps(exchange).encode(), check=False
    )
    assert result.returncode in (0, 1), result.stderr.decode()
    report = json.loads(result.stdout)
    if outcome == "ok":
        assert result.returncode == 0, report
        assert report == {
            "status": 200,
            "peer": {"subject": "client.k8s.internal", "issuer": client_issuer},
        }
    elif outcome == "client refuses the server":
        assert result.returncode == 1
        assert "certificate signed by unknown authority" in report["error"]
    else:
        assert result.returncode == 1
        assert "bad certificate" in report["error"]
        # The server names the roots it accepts in its certificate request; Go's client
        # holds none that chains to them, so it sends no certificate at all.
        assert "client didn't provide a certificate" in report["server"]
