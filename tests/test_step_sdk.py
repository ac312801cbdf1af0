"""step's own Go code against the federatls CA, with the real step-ca as the reference.

``tests/stepsdk/main.go`` calls ``github.com/smallstep/certificates/ca``, the library that
step's clients and the federation tutorial's demo server and client are built on, as Debian
packages it (the sources step-ca is built from). Nothing in it is ours: it mints tokens with
``ca.NewProvisioner`` as ``step ca token`` does, and enrols a server and a client with
``ca.BootstrapServer`` and ``ca.BootstrapClient``, trusting ``/federation``, as the
tutorial does. ``tests/stepinit/main.go`` makes a PKI with the library ``step ca init``
calls. Each test runs on the federatls CA and on step-ca, so that the CA is the only
difference; one also federates a step-ca with a federatls CA, and federatls workloads talk
to the SDK's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from cryptography.x509.oid import NameOID

import federatls
from federatls._errors import CARefusedError
from federatls._jwk import ProvisionerKey
from federatls._keys import KeyType, build_csr, new_private_key
from federatls._protocol import SignRequest
from federatls._token import Token
from federatls._x509 import load_pem_certificate
from federatls.integrations import streams

from harness import (
    PASSWORD,
    PKI,
    assert_one_line_error,
    go_build,
    make_pki,
    serving,
    stepca_process,
)
from harness import federatls as federatls_cli

pytestmark = [pytest.mark.anyio, pytest.mark.stepca]

KINDS = ["federatls", "step-ca"]


@pytest.fixture(scope="session")
def step_sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The step SDK program, built once per session from Debian's Go sources."""
    return go_build("stepsdk", tmp_path_factory.mktemp("stepsdk"), debian_sources=True)


class CAs:
    """CAs for ``pki`` objects, served by the federatls CA or by the real step-ca, that can
    re-read their ca.json (SIGHUP for step-ca) while they run."""

    def __init__(self, kind: str, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self._request = request
        self._reloads: dict[str, Callable[[], object]] = {}

    @contextlib.asynccontextmanager
    async def serve(self, pki: PKI) -> AsyncIterator[PKI]:
        if self.kind == "federatls":
            async with serving(pki) as server:
                self._reloads[pki.name] = server.reload
                yield pki
        else:
            with stepca_process(self._request.getfixturevalue("stepca_bin"), pki) as proc:
                self._reloads[pki.name] = lambda: proc.send_signal(signal.SIGHUP)
                yield pki

    def reload(self, pki: PKI) -> None:
        self._reloads[pki.name]()


async def sdk(binary: Path, *args: str, stdin: str) -> subprocess.CompletedProcess[bytes]:
    """Run step's SDK program; one still running after 60 s is killed and fails the test
    saying so (once, in CI, a run hung until pytest's timeout, which told nothing)."""
    try:
        with anyio.fail_after(60):
            command = [str(binary), *args]
            return await anyio.run_process(command, input=stdin.encode() + b"\n", check=False)
    except TimeoutError:
        raise AssertionError(f"step's SDK ({' '.join(args[:2])}) ran for 60 s") from None


def lines(result: subprocess.CompletedProcess[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.decode().splitlines() if line]


async def cli_token(pki: PKI, subject: str) -> str:
    """A token from ``federatls ca token``, as the tutorial takes one from ``step ca token``."""
    run = await federatls_cli(
        "ca",
        "token",
        subject,
        "--ca-url",
        pki.url,
        "--root",
        pki.root_path,
        "--password-file",
        pki.password_file,
    )
    assert run.code == 0, run.err
    return run.out.strip()


@contextlib.asynccontextmanager
async def sdk_server(
    binary: Path, token: str, *flags: str
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The SDK's server, enrolled with ``token``: yields its URL and its 'listening' line."""
    async with await anyio.open_process([str(binary), "server", *flags]) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        await proc.stdin.send(token.encode() + b"\n")
        try:
            with anyio.fail_after(30):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 65536)
        except (anyio.EndOfStream, anyio.IncompleteRead, TimeoutError):
            raise AssertionError(await _stderr(proc)) from None
        listening = json.loads(line)
        try:
            yield f"https://{listening['addr']}/", listening
        finally:
            proc.terminate()


async def _stderr(proc: Process) -> str:
    proc.terminate()
    await proc.wait()
    assert proc.stderr is not None
    return (await proc.stderr.receive()).decode(errors="replace")


# Tokens from step's SDK ----------------------------------------------------------------------
@pytest.mark.parametrize("by", ["name", "kid"])
@pytest.mark.parametrize("kind", KINDS)
async def test_sdk_token_is_accepted_once(
    kind: str, by: str, step_sdk: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``ca.NewProvisioner`` finds the provisioner (through /provisioners by name, through
    /provisioners/{kid}/encrypted-key by kid), decrypts the key ``federatls ca init``
    encrypted, and mints a token the CA signs with; the same token a second time is a
    replay (401)."""
    pki = make_pki(tmp_path, "cloud")
    async with CAs(kind, request).serve(pki):
        kid = pki.key.kid if by == "kid" else ""
        args = ("token", pki.url, str(pki.root_path), pki.provisioner, kid, "svc.internal")
        minted = await sdk(step_sdk, *args, "svc.internal", "10.0.0.7", stdin=PASSWORD.decode())
        assert minted.returncode == 0, minted.stderr.decode()
        raw = minted.stdout.decode().strip()
        token = Token.parse(raw)
        assert token.subject == "svc.internal"
        assert list(token.sans) == ["svc.internal", "10.0.0.7"]
        assert token.root_fingerprint == pki.fingerprint
        assert list(token.audience) == [pki.url + "/1.0/sign"]
        key = new_private_key(KeyType.P256)
        csr = build_csr(key, "svc.internal", ["svc.internal", "10.0.0.7"])
        async with pki.client() as ca:
            answer = await ca.sign(SignRequest(csr, raw))
            leaf = answer.chain[0]
            assert leaf.public_key() == key.public_key()
            with pytest.raises(CARefusedError) as replay:
                await ca.sign(SignRequest(csr, raw))
        assert replay.value.status == 401


@pytest.mark.parametrize("kind", KINDS)
async def test_sdk_token_needs_the_provisioner_password(
    kind: str, step_sdk: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Twin: with a wrong password the SDK cannot decrypt the provisioner key the CA
    serves, so it mints nothing."""
    pki = make_pki(tmp_path, "cloud")
    async with CAs(kind, request).serve(pki):
        args = ("token", pki.url, str(pki.root_path), pki.provisioner, "", "svc.internal")
        minted = await sdk(step_sdk, *args, stdin="not the password")
    assert minted.returncode == 1
    assert minted.stdout == b""
    assert "not found (or your password is wrong)" in minted.stderr.decode()


# step's typed client ---------------------------------------------------------------------------
API_STEPS = ["bootstrap", "health", "root", "version", "provisioners", "roots", "federation"]


@pytest.mark.parametrize("kind", KINDS)
async def test_sdk_client_walks_the_lifecycle(
    kind: str, step_sdk: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """step's ``ca.Client`` decodes every answer into step's own types: bootstrap by the
    token's fingerprint, the public reads, sign, renew, rekey with a new key and revoke over
    mutual TLS; the renewal of the revoked certificate is refused with step-ca's 401 and
    message, which the SDK reads back (the twin of the renewal)."""
    pki = make_pki(tmp_path, "cloud")
    async with CAs(kind, request).serve(pki):
        run = await sdk(step_sdk, "api", stdin=pki.token("api.internal"))
    steps = lines(run)
    assert run.returncode == 1, run.stderr.decode()
    assert [s["step"] for s in steps] == [
        *API_STEPS,
        "sign",
        "renew",
        "rekey",
        "revoke",
        "renew-revoked",
    ]
    got = {s["step"]: s for s in steps}
    assert got["bootstrap"]["fingerprint"] == pki.fingerprint
    assert got["health"]["status"] == "ok"
    assert got["root"]["subject"] == _root_cn(pki)
    assert got["version"]["requireClientAuthentication"] is False
    assert got["provisioners"] == {
        "step": "provisioners",
        "names": [pki.provisioner],
        "nextCursor": "",
    }
    assert got["roots"]["count"] == got["federation"]["count"] == 1
    assert got["sign"]["subject"] == "api.internal"
    assert got["sign"]["chain"] == 2
    assert got["sign"]["tlsOptions"] is True
    serials = [got[s]["serial"] for s in ("sign", "renew", "rekey")]
    assert len(set(serials)) == 3
    assert got["revoke"]["status"] == "ok"
    refused = got["renew-revoked"]
    assert "serial" not in refused, refused  # no certificate for a revoked one
    assert refused["status"] == 401
    assert refused["message"] == (
        "The request lacked necessary authorization to be completed. "
        "Please see the certificate authority logs for more info."
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_sdk_client_refuses_a_replayed_token(
    kind: str, step_sdk: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Twin: the second walk with the same token stops at the sign, 401."""
    pki = make_pki(tmp_path, "cloud")
    async with CAs(kind, request).serve(pki):
        token = pki.token("api.internal")
        first = await sdk(step_sdk, "api", stdin=token)
        again = await sdk(step_sdk, "api", stdin=token)
    assert [s["step"] for s in lines(first)][-1] == "renew-revoked"
    steps = lines(again)
    assert [s["step"] for s in steps] == [*API_STEPS, "sign"]
    assert steps[-1]["status"] == 401


# The federation tutorial with step's SDK -----------------------------------------------------
def _root_cn(pki: PKI) -> str:
    [cn] = pki.root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn.value)


async def _tutorial(
    kind: str | tuple[str, str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    step_sdk: Path,
    *,
    cloud_federates: bool,
    kubernetes_federates: bool,
    server_flags: tuple[str, ...] = (),
    client_flags: tuple[str, ...] = (),
) -> tuple[dict[str, Any], subprocess.CompletedProcess[bytes], PKI, PKI]:
    """The tutorial: a server enrolled with 'cloud' (token for 127.0.0.1), a client enrolled
    with 'kubernetes' (token for sdk_client), tokens from ``federatls ca token``. ``kind``
    serves both CAs, or is the pair (cloud's, kubernetes'). Returns the server's
    'listening' line and the finished client."""
    cloud, kubernetes = make_pki(tmp_path, "cloud"), make_pki(tmp_path, "kubernetes")
    if cloud_federates:
        cloud.federate(kubernetes)
    if kubernetes_federates:
        kubernetes.federate(cloud)
    cloud_kind, kubernetes_kind = (kind, kind) if isinstance(kind, str) else kind
    async with (
        CAs(cloud_kind, request).serve(cloud),
        CAs(kubernetes_kind, request).serve(kubernetes),
    ):
        server_token = await cli_token(cloud, "127.0.0.1")
        client_token = await cli_token(kubernetes, "sdk_client")
        async with sdk_server(step_sdk, server_token, *server_flags) as (url, listening):
            client = await sdk(step_sdk, "client", *client_flags, url, stdin=client_token)
    return listening, client, cloud, kubernetes


@pytest.mark.parametrize("kind", KINDS)
async def test_tutorial_server_and_client_trust_each_other(
    kind: str, step_sdk: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Both CAs federate the other: the SDK's server (cloud) accepts the SDK's client
    (kubernetes) and the client accepts the server, each through its own CA's
    /federation; the answer is the tutorial's."""
    listening, client, cloud, kubernetes = await _tutorial(
        kind, request, tmp_path, step_sdk, cloud_federates=True, kubernetes_federates=True
    )
    assert sorted(listening["accepts"]) == sorted([_root_cn(cloud), _root_cn(kubernetes)])
    assert client.returncode == 0, client.stderr.decode()
    [answer] = lines(client)
    assert answer["status"] == 200
    assert answer["body"] == f"Hello sdk_client (cert issued by '{_root_cn(kubernetes)}')"
    assert answer["server"] == "127.0.0.1"
    assert answer["serverRoot"] == _root_cn(cloud)
    assert answer["serverSerial"] == listening["serial"]


@pytest.mark.parametrize("federated", [True, False], ids=["federated", "not-federated"])
@pytest.mark.parametrize(
    "kinds",
    [("step-ca", "federatls"), ("federatls", "step-ca")],
    ids=["cloud-is-step-ca", "kubernetes-is-step-ca"],
)
async def test_tutorial_across_step_ca_and_federatls_ca(
    kinds: tuple[str, str],
    federated: bool,
    step_sdk: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """One CA is step-ca, the other the federatls CA: each lists the other's root in
    ``federatedRoots`` and the tutorial works across them, in both arrangements. Without
    federation (the twin) the client refuses the server."""
    listening, client, cloud, kubernetes = await _tutorial(
        kinds,
        request,
        tmp_path,
        step_sdk,
        cloud_federates=federated,
        kubernetes_federates=federated,
    )
    if federated:
        assert sorted(listening["accepts"]) == sorted([_root_cn(cloud), _root_cn(kubernetes)])
        assert client.returncode == 0, client.stderr.decode()
        [answer] = lines(client)
        assert answer["body"] == f"Hello sdk_client (cert issued by '{_root_cn(kubernetes)}')"
        assert answer["serverRoot"] == _root_cn(cloud)
    else:
        assert listening["accepts"] == [_root_cn(cloud)]
        assert client.returncode == 1
        [answer] = lines(client)
        assert "certificate signed by unknown authority" in answer["error"]


# (cloud federates, kubernetes federates, server flags, client flags) -> who refuses whom
REFUSALS = [
    pytest.param(False, False, (), (), "client", id="no-federation"),
    pytest.param(True, False, (), (), "client", id="cloud-only"),
    pytest.param(False, True, (), (), "server", id="kubernetes-only"),
    pytest.param(True, True, (), ("-own-roots",), "client", id="client-without-federation"),
    pytest.param(True, True, ("-own-roots",), (), "server", id="server-without-federation"),
]


@pytest.mark.parametrize(
    ("cloud_federates", "kubernetes_federates", "server_flags", "client_flags", "refuser"),
    REFUSALS,
)
@pytest.mark.parametrize("kind", KINDS)
async def test_tutorial_refused_without_federation(
    kind: str,
    cloud_federates: bool,
    kubernetes_federates: bool,
    server_flags: tuple[str, ...],
    client_flags: tuple[str, ...],
    refuser: str,
    step_sdk: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Twins: where a side's CA does not federate the other's, or where a side asks for its
    CA's /roots instead of /federation, that side refuses the other's certificate."""
    listening, client, _cloud, kubernetes = await _tutorial(
        kind,
        request,
        tmp_path,
        step_sdk,
        cloud_federates=cloud_federates,
        kubernetes_federates=kubernetes_federates,
        server_flags=server_flags,
        client_flags=client_flags,
    )
    accepts_kubernetes = cloud_federates and not server_flags
    assert (_root_cn(kubernetes) in listening["accepts"]) == accepts_kubernetes
    assert client.returncode == 1
    [answer] = lines(client)
    if refuser == "client":
        assert "certificate signed by unknown authority" in answer["error"]
    else:
        assert "remote error: tls: bad certificate" in answer["error"]


# Renewal, and federation picked up without a restart ----------------------------------------
async def _wait_for_federation(pki: PKI, size: int) -> None:
    """Until the CA's /federation holds ``size`` roots (step-ca reloads on its own time)."""
    with anyio.fail_after(10):
        while True:
            async with pki.client() as ca:
                if len(await ca.federation()) == size:
                    return
            await anyio.sleep(0.1)


@pytest.mark.parametrize("kind", KINDS)
async def test_sdk_renewal_picks_up_federation_without_restart(
    kind: str, step_sdk: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The blog's promise with step's SDK: 'cloud' starts without kubernetes' root, so its
    server refuses the kubernetes client. The CA re-reads its ca.json with kubernetes'
    root federated; no workload restarts. At about two thirds of its 65 s certificate the
    SDK's server renews over mutual TLS (``/renew``), fetches /federation again, and from
    then on accepts the client, with its renewed certificate; the client renews too, and
    the server sees the client's renewed certificate. About a minute per CA."""
    cloud, kubernetes = make_pki(tmp_path, "cloud"), make_pki(tmp_path, "kubernetes")
    kubernetes.federate(cloud)
    for pki in (cloud, kubernetes):
        pki.set_claims(minTLSCertDuration="1m", defaultTLSCertDuration="65s")
    cas = CAs(kind, request)
    async with cas.serve(cloud), cas.serve(kubernetes):
        server_token = await cli_token(cloud, "127.0.0.1")
        client_token = await cli_token(kubernetes, "sdk_client")
        async with sdk_server(step_sdk, server_token) as (url, listening):
            assert listening["accepts"] == [_root_cn(cloud)]
            cloud.federate(kubernetes)
            cas.reload(cloud)
            await _wait_for_federation(cloud, 2)
            args = ("client", "-count", "26", "-every", "2s", url)
            client = await sdk(step_sdk, *args, stdin=client_token)
    answers = lines(client)
    assert len(answers) == 26, client.stderr.decode()
    ok = [i for i, a in enumerate(answers) if "status" in a]
    # Refused until the server's renewal (about 40 s in: the re-read ca.json alone changes
    # nothing for a running workload), accepted from then on.
    assert ok, answers
    assert ok == list(range(ok[0], 26)), answers
    assert 15 <= ok[0] <= 23, answers
    for refused in answers[: ok[0]]:
        assert "remote error: tls: bad certificate" in refused["error"]
    for accepted in answers[ok[0] :]:
        assert accepted["status"] == 200
        assert accepted["body"] == f"Hello sdk_client (cert issued by '{_root_cn(kubernetes)}')"
        assert accepted["serverSerial"] != listening["serial"]  # the renewed certificate
        assert accepted["clientSerial"] == accepted["ownSerial"]
    # The client renewed as well: it presented a new certificate before the end.
    assert answers[0]["ownSerial"] != answers[-1]["ownSerial"]


# federatls workloads and step SDK workloads, across two CAs ---------------------------------
@contextlib.asynccontextmanager
async def python_server(identity: federatls.Identity) -> AsyncIterator[tuple[str, list[str]]]:
    """A federatls asyncio-streams server on 127.0.0.1 (mutual TLS, trusting the federation)
    that answers as the tutorial's server does. Yields its URL and the peers it served."""
    served: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = identity.peer(writer)
        served.append(str(peer))
        root = peer.anchor.common_name if peer.anchor else "?"
        body = f"Hello {peer.common_name} (cert issued by '{root}')\n".encode()
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await streams.start_server(identity, answer, "127.0.0.1", 0)
    async with server:
        host, port = server.sockets[0].getsockname()[:2]
        yield f"https://{host}:{port}/", served


@pytest.mark.parametrize("federated", [True, False], ids=["federated", "not-federated"])
@pytest.mark.parametrize("kind", KINDS)
async def test_go_sdk_client_calls_python_server(
    kind: str,
    federated: bool,
    step_sdk: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A federatls server enrolled with 'cloud' (``federatls.bootstrap``) and a Go client
    enrolled with 'kubernetes' through step's SDK: the Python server accepts the Go client
    through cloud's /federation; without kubernetes' root there (the twin) it refuses it."""
    cloud, kubernetes = make_pki(tmp_path, "cloud"), make_pki(tmp_path, "kubernetes")
    kubernetes.federate(cloud)
    if federated:
        cloud.federate(kubernetes)
    cas = CAs(kind, request)
    async with cas.serve(cloud), cas.serve(kubernetes):
        identity = await federatls.bootstrap(cloud.token("127.0.0.1"))
        client_token = kubernetes.token("sdk_client")
        async with python_server(identity) as (url, served):
            client = await sdk(step_sdk, "client", url, stdin=client_token)
    [answer] = lines(client)
    if federated:
        assert client.returncode == 0, client.stderr.decode()
        assert answer["status"] == 200
        assert answer["body"] == f"Hello sdk_client (cert issued by '{_root_cn(kubernetes)}')"
        assert answer["server"] == "127.0.0.1"
        assert answer["serverRoot"] == _root_cn(cloud)
        [peer] = served
        assert peer.startswith("sdk_client [sdk_client] anchored in ")
    else:
        # The server refused the handshake: its handler never ran, and its log says why.
        # asyncio's TLS drops the connection without sending OpenSSL's alert, so Go sees
        # the connection end (reset or EOF), not the reason; the Go client did accept the
        # server's certificate.
        assert client.returncode == 1
        assert served == []
        assert "error" in answer
        assert "unknown authority" not in answer["error"]
        assert (
            "refused a TLS client in the TLS handshake: its certificate failed verification "
            "(unable to get local issuer certificate)"
        ) in [r.getMessage() for r in caplog.records if r.name == "federatls.peer"]


@pytest.mark.parametrize("federated", [True, False], ids=["federated", "not-federated"])
@pytest.mark.parametrize("kind", KINDS)
async def test_python_client_calls_go_sdk_server(
    kind: str, federated: bool, step_sdk: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A Go server enrolled with 'cloud' through step's SDK and a federatls client (httpx)
    enrolled with 'kubernetes': the client trusts the Go server through kubernetes'
    /federation; without cloud's root there (the twin) it refuses the server."""
    cloud, kubernetes = make_pki(tmp_path, "cloud"), make_pki(tmp_path, "kubernetes")
    cloud.federate(kubernetes)
    if federated:
        kubernetes.federate(cloud)
    cas = CAs(kind, request)
    async with cas.serve(cloud), cas.serve(kubernetes):
        server_token = cloud.token("127.0.0.1")
        identity = await federatls.bootstrap(kubernetes.token("py_client"))
        async with (
            sdk_server(step_sdk, server_token) as (url, _),
            httpx.AsyncClient(verify=identity.client_context()) as http,
        ):
            if federated:
                response = await http.get(url)
                assert response.status_code == 200
                assert (
                    response.text == f"Hello py_client (cert issued by '{_root_cn(kubernetes)}')\n"
                )
                peer = identity.peer(response)
                assert peer.common_name == "127.0.0.1"
                assert peer.anchor is not None
                assert peer.anchor.common_name == _root_cn(cloud)
            else:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await http.get(url)


# A PKI made by step's own `step ca init` code ------------------------------------------------
@pytest.fixture(scope="session")
def step_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The program that makes a PKI with the library `step ca init` calls."""
    return go_build("stepinit", tmp_path_factory.mktemp("stepinit"), debian_sources=True)


async def step_made_pki(binary: Path, base: Path, name: str) -> PKI:
    """A PKI as `step ca init` makes it (legacy-encrypted PEM keys, step's ca.json with
    ``"federatedRoots": null``, templates, defaults.json), with the harness's password."""
    home = base / name
    made = await anyio.run_process(
        [str(binary), name, "127.0.0.1,localhost", "127.0.0.1:0", "admin"],
        input=PASSWORD + b"\n",
        env={**os.environ, "STEPPATH": str(home)},
        check=False,
    )
    assert made.returncode == 0, made.stderr.decode()
    paths = json.loads(made.stdout.decode().splitlines()[-1])
    config = json.loads(Path(paths["config"]).read_text())
    [prov] = config["authority"]["provisioners"]
    password_file = base / f"{name}.password"
    password_file.write_bytes(PASSWORD + b"\n")
    root_path = Path(paths["root"])
    pki = PKI(
        name=name,
        directory=home,
        config=Path(paths["config"]),
        root_path=root_path,
        root=load_pem_certificate(root_path.read_bytes()),
        provisioner=prov["name"],
        key=ProvisionerKey.decrypt(prov["encryptedKey"], PASSWORD),
        password_file=password_file,
    )
    assert pki.fingerprint == paths["fingerprint"]
    return pki


@pytest.mark.parametrize("kind", KINDS)
async def test_a_pki_made_by_step_ca_init(
    kind: str, step_init: Path, step_sdk: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The federatls CA serves a directory `step ca init`'s code made, as step-ca does:
    it opens step's encrypted intermediate key with the password, ``federatls ca token``
    opens step's provisioner key (from the CA, and offline from step's ca.json), and a
    workload enrols (``federatls.bootstrap``) and renews;
    step's SDK mints a token from it too. A token signed by another CA's provisioner key is
    refused (the twin)."""
    pki = await step_made_pki(step_init, tmp_path, "stepmade")
    stranger = make_pki(tmp_path, "stranger")
    intermediate = load_pem_certificate(
        (pki.directory / "certs" / "intermediate_ca.crt").read_bytes()
    )
    async with CAs(kind, request).serve(pki):
        identity = await federatls.bootstrap(await cli_token(pki, "svc.internal"))
        assert identity.chain[1] == intermediate
        assert [r.fingerprint for r in identity.trust.roots] == [pki.fingerprint]
        chain, key = await pki.enroll("renew.internal")
        async with pki.client(identity=(chain, key)) as ca:
            renewed = await ca.renew()
        assert renewed.chain[0].serial_number != chain[0].serial_number
        assert renewed.chain[0].subject == chain[0].subject
        assert renewed.chain[1] == intermediate
        args = ("token", pki.url, str(pki.root_path), pki.provisioner, "", "sdk.internal")
        minted = await sdk(step_sdk, *args, stdin=PASSWORD.decode())
        assert minted.returncode == 0, minted.stderr.decode()
        sdk_identity = await federatls.bootstrap(minted.stdout.decode().strip())
        assert sdk_identity.certificate.issuer == intermediate.subject
        # Minted offline from step's ca.json, as `step ca token --offline` mints.
        offline = await federatls_cli(
            "ca",
            "token",
            "offline.internal",
            "--offline",
            pki.config,
            "--ca-url",
            pki.url,
            "--password-file",
            pki.password_file,
        )
        assert offline.code == 0, offline.err
        offline_identity = await federatls.bootstrap(offline.out.strip())
        assert offline_identity.certificate.issuer == intermediate.subject
        # Signed by another CA's provisioner key, under this provisioner's kid.
        forged = pki.forge(pki.claims("svc.internal"), key=stranger.key, kid=pki.key.kid)
        with pytest.raises(CARefusedError) as refused:
            await federatls.bootstrap(forged)
    assert refused.value.status == 401


async def test_a_pki_made_by_step_ca_init_needs_its_password(
    step_init: Path, tmp_path: Path
) -> None:
    """Twin: with another password, ``federatls ca serve`` cannot open step's encrypted
    intermediate key and says so in one line, without serving."""
    pki = await step_made_pki(step_init, tmp_path, "stepmade")
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not the password\n")
    run = await federatls_cli("ca", "serve", pki.config, "--password-file", wrong)
    assert_one_line_error(run, "cannot decrypt intermediate key", "wrong password")
