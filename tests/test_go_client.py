"""A Go client, as step's own clients are, against the federatls CA and the real step-ca.

``tests/goclient/main.go`` uses only Go's standard library (crypto/tls, net/http with
keep-alive and HTTP/2 offered, as step's transport does) and step's paths. It asks for
/health twice on one client; fetches the root by its fingerprint (as ``step ca bootstrap``),
/provisioners, /roots and /federation; signs a CSR with a one-time token; renews the
certificate over mutual TLS with the TLS settings of the answer's ``tlsOptions`` and rekeys
it; revokes the renewed certificate over mutual TLS and tries to renew it again. The same
binary runs against both CAs serving the same PKI, so a difference is the CA's. It is built
with the Go toolchain that ``../shared/tools/stepca/build.sh`` installs (offline, GOPATH
mode, standard library only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from harness import PKI, make_pki, stepca_binary

pytestmark = [pytest.mark.anyio, pytest.mark.stepca]

SOURCE = Path(__file__).parent / "goclient" / "main.go"
# The client's steps before it signs, in order.
BEFORE_SIGN = ("health", "health", "root", "root-unknown", "provisioners", "roots", "federation")


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go client, built once per session; no Go toolchain skips (fails in CI)."""
    go = shutil.which("go")
    if go is None:
        message = "no Go toolchain: bash ../shared/tools/stepca/build.sh installs one"
        if os.environ.get("FEDERATLS_REQUIRE_STEPCA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("goclient")
    stepca = stepca_binary()
    cache = Path(stepca).resolve().parents[1] / "gocache" if stepca else None
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPROXY": "off",
        "GOPATH": str(out / "gopath"),
        # step-ca's build cache already holds the standard library: a build takes a second.
        "GOCACHE": str(cache if cache is not None and cache.is_dir() else out / "gocache"),
    }
    binary = out / "goclient"
    subprocess.run([go, "build", "-o", str(binary), str(SOURCE)], env=env, check=True, timeout=600)
    return binary


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
    root, unknown, provisioners, roots, federation = run.steps[2:7]
    signed, renewed, rekeyed, revoked, refused = run.steps[7:]
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
