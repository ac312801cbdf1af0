"""Name constraints at the source, end to end: ``federatls ca init --permit-*`` writes them
into the intermediate, root rotation carries them over, the CA refuses (403) to sign, renew
or rekey names outside them (read from the intermediate at load and reload, whoever made
it), and every verifier refuses a leaf for a foreign name forged under the constrained
intermediate (signed in the test with the intermediate's key, bypassing the CA): the SDK in
a real TLS handshake, Go's crypto/tls (``tests/gomtls``) and curl. Each forged leaf has a
twin inside the constraints that all of them accept. Over names at the edges, the CA's check
admits nothing OpenSSL or Go refuses; the real step-ca 0.19 issues foreign names regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import shutil
import ssl
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federatls._contexts import new_client_context, new_server_context
from federatls._errors import CARefusedError, ConfigError
from federatls._keys import KeyType, PrivateKey, build_csr, new_private_key
from federatls._protocol import RekeyRequest, SignRequest
from federatls._trust import TrustBundle
from federatls._x509 import cert_sans, certs_to_pem, load_pem_certificate
from federatls.ca import CAServer, add_root, issue_from_new_root
from federatls.ca._constraints import (
    NameConstraints,
    constraints_refusal,
    dns_subtree,
    ip_subtree,
    permitted_subtrees,
    uri_subtree,
)
from federatls.ca._material import load_signing_key
from federatls.ca._pki import encrypted_key_pem, write_private

from harness import PASSWORD, PKI, federatls, go_build, make_pki, serving, stepca_process

pytestmark = pytest.mark.anyio

K8S = permitted_subtrees(
    [dns_subtree("k8s.internal"), uri_subtree("k8s.internal"), ip_subtree("127.0.0.1/32")]
)
Chain = tuple[list[x509.Certificate], PrivateKey]


def _constraints_of(cert: x509.Certificate) -> x509.NameConstraints | None:
    try:
        ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return None
    assert ext.critical
    return ext.value


@pytest.fixture
def kubernetes(tmp_path: Path) -> PKI:
    """A CA whose intermediate may issue only k8s.internal names (DNS and URI) and the IP
    127.0.0.1 (its own name)."""
    return make_pki(tmp_path, "kubernetes", dns=("127.0.0.1",), name_constraints=K8S)


def _intermediate(pki: PKI) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    data = json.loads(pki.config.read_text())
    cert = load_pem_certificate(Path(data["crt"]).read_bytes())
    key = load_signing_key(Path(data["key"]), PASSWORD, "intermediate key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def forge(pki: PKI, common_name: str, sans: Sequence[x509.GeneralName]) -> Chain:
    """A leaf signed directly with the CA's intermediate key, bypassing the CA and its
    checks: what a stolen intermediate key, or a CA with a bug, would make."""
    return _leaf(*_intermediate(pki), common_name, sans)


def _leaf(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    sans: Sequence[x509.GeneralName],
) -> Chain:
    key = new_private_key(KeyType.P256)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return [leaf, issuer], key


FOREIGN = "payments.cloud.internal"
INSIDE = "payments.k8s.internal"


# The CA --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("subject", "sans", "admitted"),
    [
        ("api.k8s.internal", [], True),
        ("api", ["api.k8s.internal", "spiffe://k8s.internal/ns/a/sa/api", "127.0.0.1"], True),
        (FOREIGN, [], False),
        ("api", ["api.k8s.internal", "spiffe://cloud.internal/ns/a/sa/api"], False),
        ("api", ["evilk8s.internal"], False),
        ("api", ["api.k8s.internal", "10.0.0.1"], False),
        ("api", ["spiffe://x@k8s.internal/ns/a"], False),
    ],
)
async def test_ca_signs_only_names_inside_its_constraints(
    kubernetes: PKI, subject: str, sans: list[str], admitted: bool
) -> None:
    """The CA signs a token whose names are inside its intermediate's constraints. Twin: a
    token with one foreign name (DNS, SPIFFE ID, IP, look-alike, userinfo) gets 403 with
    step-ca's JSON error body naming it, and is not spent (sent again: 403 again, not 401)."""
    key = new_private_key(KeyType.P256)
    names = sans or [subject]
    async with serving(kubernetes), kubernetes.client() as ca:
        token = kubernetes.token(subject, sans=names)  # for the CA's URL, after its start
        request = SignRequest(build_csr(key, subject, names), token)
        if admitted:
            answer = await ca.sign(request)
            assert _constraints_of(answer.chain[1]) == K8S
            return
        for _ in range(2):
            with pytest.raises(CARefusedError) as refused:
                await ca.sign(request)
            assert refused.value.status == 403
            assert refused.value.body is not None
            assert refused.value.body["status"] == 403
            message = refused.value.body["message"]
            assert "the name constraints of CN=kubernetes Intermediate CA" in message


async def _constrain_by_hand(pki: PKI, server: CAServer, value: x509.NameConstraints) -> bool:
    """Give the CA a new intermediate under its root, made here with cryptography as another
    tool would (``value`` as its critical name constraints), and reload."""
    data = json.loads(pki.config.read_text())
    root = load_pem_certificate(Path(data["root"]).read_bytes())
    root_key = load_signing_key(pki.directory / "secrets" / "root_ca_key", PASSWORD, "root key")
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Other Tool CA")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(value, critical=True)
        .sign(root_key, hashes.SHA256())
    )
    crt, key_path = pki.directory / "certs" / "other.crt", pki.directory / "secrets" / "other_key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(key_path, encrypted_key_pem(key, PASSWORD))
    pki.edit(lambda d: d.update(crt=str(crt), key=str(key_path)))
    return server.reload()


async def test_renewal_and_rekey_follow_the_constraints_of_todays_intermediate(
    tmp_path: Path,
) -> None:
    """After a reload onto an intermediate made by another tool, with permitted and excluded
    subtrees, certificates issued before are renewed and rekeyed only when their names are
    inside its constraints: 403 for one now outside (permitted) and one now excluded. Twin:
    one inside renews and rekeys, under the new intermediate."""
    pki = make_pki(tmp_path, "cloud", dns=("127.0.0.1",))
    async with serving(pki) as server:
        inside = await pki.enroll("api.k8s.internal")
        foreign = await pki.enroll(FOREIGN)
        excluded = await pki.enroll("db.k8s.internal")
        value = x509.NameConstraints(
            permitted_subtrees=[
                x509.DNSName("k8s.internal"),
                x509.IPAddress(ipaddress.ip_network("127.0.0.1")),
            ],
            excluded_subtrees=[x509.DNSName("db.k8s.internal")],
        )
        assert await _constrain_by_hand(pki, server, value), server.reload_error
        async with pki.client(inside) as ca:
            renewed = await ca.renew()
            new_key = new_private_key(KeyType.P256)
            rekeyed = await ca.rekey(RekeyRequest(build_csr(new_key, "api.k8s.internal", [])))
        for answer in (renewed, rekeyed):
            assert answer.chain[1].subject.rfc4514_string() == "CN=Other Tool CA"
        for identity, why in ((foreign, "outside"), (excluded, "excluded")):
            async with pki.client(identity) as ca:
                for call in (ca.renew, lambda: ca.rekey(rekey_request())):
                    with pytest.raises(CARefusedError) as refused:
                        await call()
                    assert refused.value.status == 403
                    assert why in refused.value.message


def rekey_request() -> RekeyRequest:
    return RekeyRequest(build_csr(new_private_key(KeyType.P256), "x", []))


async def test_ca_refuses_to_load_constraints_that_exclude_its_own_name(tmp_path: Path) -> None:
    """A reload onto an intermediate whose constraints leave out a name of the CA's own
    (dnsNames 'localhost') fails and keeps the running configuration; serving that ca.json
    from the start fails with one ConfigError. Twin: the same constraints with dnsNames
    inside them load."""
    pki = make_pki(tmp_path, "cloud", dns=("127.0.0.1", "localhost"))
    value = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("k8s.internal")], excluded_subtrees=None
    )
    async with serving(pki) as server:
        assert not await _constrain_by_hand(pki, server, value)
        assert "dnsNames" in server.reload_error
        assert "'localhost' is outside" in server.reload_error
        await pki.enroll(FOREIGN)  # still the old, unconstrained intermediate
    with pytest.raises(ConfigError, match="clients would refuse the CA's own certificate"):
        async with CAServer.running(pki.config, PASSWORD):
            pass
    pki.edit(lambda d: d.update(dnsNames=["127.0.0.1", "ca.k8s.internal"]))
    async with serving(pki):
        with pytest.raises(CARefusedError):
            await pki.enroll(FOREIGN)


async def test_ca_refuses_a_spiffe_trust_domain_outside_its_constraints(kubernetes: PKI) -> None:
    """A constrained CA given a ``spiffe.trustDomain`` outside its URI constraints (its HTTPS
    certificate would carry ``spiffe://cloud.internal/federatls/ca``, which every client
    refuses) fails to start with one ConfigError naming the block. Twin: the trust domain
    ``k8s.internal``, inside them, serves."""
    kubernetes.edit(lambda d: d.update(spiffe={"trustDomain": "cloud.internal"}))
    with pytest.raises(ConfigError, match=r"spiffe\.trustDomain: URI 'spiffe://cloud\.internal/"):
        async with CAServer.running(kubernetes.config, PASSWORD):
            pass
    kubernetes.edit(lambda d: d.update(spiffe={"trustDomain": "k8s.internal"}))
    async with serving(kubernetes) as server:
        assert server.server_certificate is not None
        names = server.server_certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        assert "spiffe://k8s.internal/federatls/ca" in names.get_values_for_type(
            x509.UniformResourceIdentifier
        )


def test_rotation_carries_the_constraints_to_the_new_intermediate(
    kubernetes: PKI, tmp_path: Path
) -> None:
    """``add_root`` gives the new intermediate the constraints of the current one, so issuing
    from the new root keeps the names the CA may issue. Twin: an unconstrained CA's new
    intermediate has none."""
    plain = make_pki(tmp_path, "plain")
    for pki, expected in ((kubernetes, K8S), (plain, None)):
        add_root(pki.directory, PASSWORD, now=datetime.now(UTC))
        step = issue_from_new_root(pki.directory)
        assert _constraints_of(load_pem_certificate(step.issuer.read_bytes())) == expected


# The command line ------------------------------------------------------------------------------
async def test_init_writes_the_permitted_subtrees(tmp_path: Path) -> None:
    """``ca init --permit-*`` writes one critical NameConstraints extension with those
    permitted subtrees in the intermediate (none in the root). Twin: without the flags there
    is no extension."""
    (tmp_path / "pw").write_bytes(PASSWORD)
    common: list[str | Path] = [
        "ca",
        "init",
        "k8s",
        "--address",
        "127.0.0.1:9000",
        "--password-file",
        tmp_path / "pw",
    ]
    run = await federatls(
        *common,
        "--dir",
        tmp_path / "k8s",
        *("--permit-dns", "k8s.internal", "--permit-dns", ".svc.test"),
        *("--permit-uri-domain", "k8s.internal", "--permit-ip", "127.0.0.0/8"),
        *("--permit-email", "ops@k8s.internal"),
    )
    assert run.code == 0, run.err
    inter = load_pem_certificate((tmp_path / "k8s/certs/intermediate_ca.crt").read_bytes())
    value = _constraints_of(inter)
    assert value is not None
    assert value.excluded_subtrees is None
    assert [str(n.value) for n in value.permitted_subtrees or []] == [
        "k8s.internal",
        ".svc.test",
        "k8s.internal",
        "127.0.0.0/8",
        "ops@k8s.internal",
    ]
    root = load_pem_certificate((tmp_path / "k8s/certs/root_ca.crt").read_bytes())
    assert _constraints_of(root) is None
    run = await federatls(*common, "--dir", tmp_path / "plain")
    assert run.code == 0, run.err
    plain = load_pem_certificate((tmp_path / "plain/certs/intermediate_ca.crt").read_bytes())
    assert _constraints_of(plain) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--permit-dns", "k8s.internal."],
            "argument --permit-dns: 'k8s.internal.' ends with a dot",
        ),
        (["--permit-dns", "*.k8s.internal"], "holds a wildcard"),
        (["--permit-dns", "bücher.test"], "A-label"),
        (["--permit-dns", ""], "empty"),
        (["--permit-uri-domain", "spiffe://k8s.internal"], "give its host only"),
        (["--permit-ip", "10.0.0.1/8"], "host bits set"),
        (["--permit-email", "a b@k8s.internal"], "not a mailbox"),
        (["--permit-dns", "k8s.internal"], "the CA's own name would be refused: IP address"),
    ],
)
async def test_init_refuses_a_bad_constraint_in_one_line(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    """A bad --permit-* value, or constraints that leave out the CA's own name (the IP of
    --address outside --permit-ip), is one line on stderr, exit 2, and nothing is written.
    Twin: test_init_writes_the_permitted_subtrees."""
    (tmp_path / "pw").write_bytes(PASSWORD)
    extra = ["--permit-ip", "10.0.0.0/8"] if "own name" in message else []
    run = await federatls(
        "ca",
        "init",
        "k8s",
        "--dir",
        tmp_path / "k8s",
        "--address",
        "127.0.0.1:9000",
        "--password-file",
        tmp_path / "pw",
        *flags,
        *extra,
    )
    assert run.code == 2, run
    assert run.out == ""
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("federatls ca init: error: ")
    assert message in lines[0]
    assert not (tmp_path / "k8s").exists()


# The verifiers ---------------------------------------------------------------------------------
def _forged(pki: PKI, inside: bool) -> Chain:
    name = INSIDE if inside else FOREIGN
    return forge(pki, name, [x509.DNSName(name)])


async def _handshake(server: Chain, client: Chain, root: x509.Certificate, name: str) -> str:
    """One request over mutual TLS between SDK contexts (both trusting ``root`` only): the
    server's answer, or raises the client's error."""
    trust = TrustBundle.from_ca([root], [])
    server_ctx: ssl.SSLContext = new_server_context(server[0], server[1], trust)
    client_ctx = new_client_context(client[0], client[1], trust)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=name), 30
        )
        try:
            return (await asyncio.wait_for(reader.read(), 30)).decode()
        finally:
            writer.close()
    finally:
        listener.close()


@pytest.mark.parametrize("inside", [True, False])
async def test_sdk_refuses_a_forged_server_outside_the_constraints(
    kubernetes: PKI, inside: bool
) -> None:
    """An SDK client refuses a server whose leaf, forged under the constrained intermediate,
    names a foreign host: OpenSSL reports a permitted subtree violation. Twin: a forged leaf
    inside the constraints is accepted."""
    async with serving(kubernetes):
        client = await kubernetes.enroll("client.k8s.internal")
    server = _forged(kubernetes, inside)
    name = INSIDE if inside else FOREIGN
    if inside:
        assert await _handshake(server, client, kubernetes.root, name) == "hello"
        return
    with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
        await _handshake(server, client, kubernetes.root, name)


@pytest.mark.parametrize("inside", [True, False])
async def test_sdk_server_refuses_a_forged_client_outside_the_constraints(
    kubernetes: PKI, inside: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An SDK server refuses a client whose forged leaf names a foreign host, and logs the
    violation. Twin: a forged client leaf inside the constraints is served."""
    async with serving(kubernetes):
        server = await kubernetes.enroll(INSIDE)
    client = _forged(kubernetes, inside)
    caplog.set_level(logging.WARNING, "federatls.peer")
    if inside:
        assert await _handshake(server, client, kubernetes.root, INSIDE) == "hello"
        return
    try:  # TLS 1.3: the client learns of the refusal after its handshake, reading
        answer = await _handshake(server, client, kubernetes.root, INSIDE)
    except (ssl.SSLError, ConnectionError):
        answer = ""
    assert answer == ""
    await anyio.sleep(0.1)
    assert "permitted subtree violation" in caplog.text


@pytest.fixture(scope="session")
def go_mtls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go server and client of tests/gomtls, built once per session."""
    return go_build("gomtls", tmp_path_factory.mktemp("gomtls"))


def _party(chain: Chain, root: x509.Certificate) -> dict[str, str]:
    key = chain[1].private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {"chain": certs_to_pem(chain[0]), "key": key.decode(), "trust": certs_to_pem([root])}


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("inside", [True, False])
async def test_go_refuses_a_forged_leaf_outside_the_constraints(
    kubernetes: PKI, go_mtls: Path, side: str, inside: bool
) -> None:
    """Go's crypto/tls refuses a forged leaf for a foreign name under the constrained
    intermediate, as a server (the client refuses it) and as a client (the server refuses
    it). Twin: forged leaves inside the constraints complete the request."""
    async with serving(kubernetes):
        honest = await kubernetes.enroll(INSIDE)
    forged = _forged(kubernetes, inside)
    server, client = (forged, honest) if side == "server" else (honest, forged)
    exchange = {
        "serverName": INSIDE if inside or side == "client" else FOREIGN,
        "server": _party(server, kubernetes.root),
        "client": _party(client, kubernetes.root),
    }
    # The keys go over standard input: no private key is written to a file.
    result = await anyio.run_process(
        [str(go_mtls)], input=json.dumps(exchange).encode(), check=False
    )
    assert result.returncode in (0, 1), result.stderr.decode()
    report = json.loads(result.stdout)
    if inside:
        assert result.returncode == 0, report
        assert report["status"] == 200
        return
    assert result.returncode == 1, report
    if side == "server":
        assert "not authorized to sign for this name" in report["error"], report
        assert FOREIGN in report["error"]
    else:
        assert "not authorized to sign for this name" in report["server"], report


@pytest.fixture
def curl() -> str:
    found = shutil.which("curl")
    if found is None:
        pytest.fail("curl is not installed")  # the demo needs it too
    return found


@contextlib.asynccontextmanager
async def _https_server(chain: Chain, root: x509.Certificate) -> AsyncIterator[int]:
    """An HTTPS server on an SDK server context (client certificates optional) that answers
    every request with 'ok'."""
    trust = TrustBundle.from_ca([root], [])
    ctx: ssl.SSLContext = new_server_context(
        chain[0], chain[1], trust, require_client_certificate=False
    )

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ctx)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()


@pytest.mark.parametrize("inside", [True, False])
async def test_curl_refuses_a_forged_server_outside_the_constraints(
    kubernetes: PKI, curl: str, tmp_path: Path, inside: bool
) -> None:
    """curl (with the root as --cacert) refuses a server whose forged leaf names a foreign
    host: exit 60, "permitted subtree violation". Twin: the forged leaf inside is fetched."""
    name = INSIDE if inside else FOREIGN
    root = tmp_path / "root.pem"
    root.write_text(certs_to_pem([kubernetes.root]))
    async with _https_server(_forged(kubernetes, inside), kubernetes.root) as port:
        result = await anyio.run_process(
            [
                curl,
                "-sS",
                "--max-time",
                "30",
                "--cacert",
                str(root),
                "--resolve",
                f"{name}:{port}:127.0.0.1",
                f"https://{name}:{port}/",
            ],
            check=False,
        )
    if inside:
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b"ok"
        return
    assert result.returncode == 60, result
    assert "permitted subtree violation" in result.stderr.decode()


@pytest.mark.stepca
async def test_stepca_issues_foreign_names_that_verifiers_refuse(
    tmp_path: Path, stepca_bin: str, go_mtls: Path
) -> None:
    """The real step-ca (0.19) serving a constrained intermediate made by ``ca init`` does not
    check the constraints: it issues a foreign name (201) as readily as one inside. The SDK
    and Go refuse the foreign leaf in a handshake. Twin: the leaf inside is accepted by both."""
    pki = make_pki(tmp_path, "kubernetes", dns=("127.0.0.1",), name_constraints=K8S)
    with stepca_process(stepca_bin, pki):
        foreign = await pki.enroll(FOREIGN)
        inside = await pki.enroll(INSIDE)
        client = await pki.enroll("client.k8s.internal")
    assert _constraints_of(foreign[0][1]) == K8S  # issued under the constrained intermediate
    assert await _handshake(inside, client, pki.root, INSIDE) == "hello"
    with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
        await _handshake(foreign, client, pki.root, FOREIGN)
    for server, name, code in ((inside, INSIDE, 0), (foreign, FOREIGN, 1)):
        exchange = {
            "serverName": name,
            "server": _party(server, pki.root),
            "client": _party(client, pki.root),
        }
        result = await anyio.run_process(
            [str(go_mtls)], input=json.dumps(exchange).encode(), check=False
        )
        assert result.returncode == code, result.stdout.decode()
    assert "not authorized to sign for this name" in result.stdout.decode()


def _general(spec: str) -> x509.GeneralName:
    kind, _, value = spec.partition(":")
    if kind == "IP":
        return x509.IPAddress(ipaddress.ip_address(value))
    if kind == "DNS":
        return x509.DNSName(value)
    if kind == "URI":
        return x509.UniformResourceIdentifier(value)
    assert kind == "email"
    return x509.RFC822Name(value)


# (common name, SAN): names at the edges where verifiers and the CA may disagree.
EDGES = [
    ("x", "DNS:a.k8s.internal"),
    ("x", "DNS:A.K8S.Internal"),
    ("x", "DNS:a.svc.test"),
    ("x", "DNS:svc.test"),
    ("x", "DNS:evilk8s.internal"),
    ("x", "DNS:a.k8s.internal."),
    ("x", "DNS:*.k8s.internal"),
    ("x", "DNS:*.web.k8s.internal"),
    ("x", "DNS:x.db.k8s.internal"),
    ("x", "URI:spiffe://k8s.internal/ns/a"),
    ("x", "URI:spiffe://a.k8s.internal/ns/a"),
    ("x", "URI:spiffe://u@k8s.internal/ns/a"),
    ("x", "URI:https://k8s.internal:x@evil.test/"),
    ("x", "URI:https://k8s.internal:8443/a"),
    ("x", "URI:spiffe://a.mesh.test/x"),
    ("x", "URI:spiffe://x.bad.mesh.test/y"),
    ("x", "URI:urn:k8s.internal"),
    ("x", "email:a@k8s.internal"),
    ("x", "email:a@b.k8s.internal"),
    ("x", "email:root@cloud.internal"),
    ("x", "email:Root@cloud.internal"),
    ("x", "IP:10.1.2.3"),
    ("x", "IP:11.0.0.1"),
    ("x", "IP:10.9.1.1"),
    ("x", "IP:::ffff:10.1.2.3"),
    ("api", "URI:spiffe://k8s.internal/ns/a"),
    ("payments.cloud.internal", "URI:spiffe://k8s.internal/ns/a"),
    ("payments.cloud.internal", "DNS:a.k8s.internal"),
]


async def test_ca_admits_only_names_that_openssl_and_go_admit(go_mtls: Path) -> None:
    """Over names at the edges, every name the CA's check admits is admitted by OpenSSL (an
    SDK server verifying it as a client certificate) and by Go (the same, in gomtls): the CA
    never issues a certificate a verifier refuses. Twin: names each verifier refuses are
    found, and the CA refuses more than either (the readings that differ)."""
    now = datetime.now(UTC)
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Edge Root")])

    def ca(subject: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(root_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        )

    root = ca(root_name, root_key.public_key()).sign(root_key, hashes.SHA256())
    value = x509.NameConstraints(
        permitted_subtrees=[
            _general_subtree(t)
            for t in (
                "DNS:k8s.internal",
                "DNS:.svc.test",
                "URI:k8s.internal",
                "URI:.mesh.test",
                "email:k8s.internal",
                "email:root@cloud.internal",
                "IP:10.0.0.0/8",
            )
        ],
        excluded_subtrees=[
            _general_subtree(t)
            for t in ("DNS:db.k8s.internal", "URI:bad.mesh.test", "IP:10.9.0.0/16")
        ],
    )
    inter_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Edge Intermediate")])
    inter = (
        ca(inter_name, key.public_key())
        .add_extension(value, critical=True)
        .sign(root_key, hashes.SHA256())
    )
    constraints = NameConstraints.of(inter)
    assert constraints is not None
    server = _leaf(inter, key, "server.k8s.internal", [x509.DNSName("server.k8s.internal")])
    verdicts: dict[tuple[str, str], tuple[bool, bool, bool]] = {}
    for cn, san in EDGES:
        client = _leaf(inter, key, cn, [_general(san)])
        subject = client[0][0].subject
        ca_admits = constraints_refusal([constraints], subject, cert_sans(client[0][0])) is None
        try:
            openssl_admits = (
                await _handshake(server, client, root, "server.k8s.internal") == "hello"
            )
        except (ssl.SSLError, ConnectionError):
            openssl_admits = False
        exchange = {
            "serverName": "server.k8s.internal",
            "server": _party(server, root),
            "client": _party(client, root),
        }
        result = await anyio.run_process(
            [str(go_mtls)], input=json.dumps(exchange).encode(), check=False
        )
        assert result.returncode in (0, 1, 2), result.stderr.decode()  # 2: Go cannot load it
        verdicts[cn, san] = (ca_admits, openssl_admits, result.returncode == 0)
    loose = [edge for edge, (c, o, g) in verdicts.items() if c and not (o and g)]
    assert not loose, f"the CA admits names a verifier refuses: {loose}"
    assert any(not o for _, o, _ in verdicts.values())
    assert any(not g for _, _, g in verdicts.values())
    stricter = {edge for edge, (c, o, g) in verdicts.items() if not c and o and g}
    assert ("x", "DNS:*.k8s.internal") in stricter  # a wildcard over an excluded name
    assert ("payments.cloud.internal", "DNS:a.k8s.internal") in stricter  # its common name
    assert verdicts["x", "URI:https://k8s.internal:x@evil.test/"] == (False, True, False)
    assert verdicts["x", "URI:spiffe://a.k8s.internal/ns/a"] == (False, False, True)
    assert verdicts["x", "DNS:a.k8s.internal"] == (True, True, True)


def _general_subtree(spec: str) -> x509.GeneralName:
    kind, _, value = spec.partition(":")
    return x509.IPAddress(ipaddress.ip_network(value)) if kind == "IP" else _general(spec)


@pytest.mark.parametrize(
    ("cn", "csr_sans", "admitted"),
    [
        ("api", ["api.k8s.internal"], True),
        ("api", ["api.k8s.internal", FOREIGN], False),
        ("api", ["api.k8s.internal", "spiffe://cloud.internal/ns/a/sa/api"], False),
        (FOREIGN, ["api.k8s.internal"], False),
    ],
)
async def test_ca_issues_the_tokens_names_not_the_csrs(
    kubernetes: PKI, cn: str, csr_sans: list[str], admitted: bool
) -> None:
    """A token inside the constraints buys no foreign name through its CSR: a CSR with one
    more SAN (DNS or SPIFFE ID) or another common name gets 403. Twin: a CSR naming what
    the token names is signed, and the leaf carries only those names."""
    key = new_private_key(KeyType.P256)
    async with serving(kubernetes), kubernetes.client() as ca:
        token = kubernetes.token("api", sans=["api.k8s.internal"])
        request = SignRequest(build_csr(key, cn, csr_sans), token)
        if admitted:
            answer = await ca.sign(request)
            leaf = answer.chain[0]
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert [str(n.value) for n in sans] == ["api.k8s.internal"]
            return
        with pytest.raises(CARefusedError) as refused:
            await ca.sign(request)
        assert refused.value.status == 403
        assert "certificate request does not contain the valid" in refused.value.message
