"""``federatls ca init``: the files it writes, their protection, step-ca's ca.json format, its
refusals (which must leave nothing behind), and that the result runs under the real step-ca
and under the federatls CA.

The command is always run as a real subprocess; the PKIs are made at run time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OctKey

from federatls._errors import ConfigError
from federatls._jwk import ProvisionerKey
from federatls._keys import build_csr, new_private_key
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import CAServer

from harness import (
    PASSWORD,
    PKI,
    Run,
    assert_one_line_error,
    federatls,
    pem_begin,
    serving,
    stepca_process,
)

pytestmark = pytest.mark.anyio

LAYOUT = {
    "certs/root_ca.crt",
    "certs/intermediate_ca.crt",
    "secrets/root_ca_key",
    "secrets/intermediate_ca_key",
    "config/ca.json",
}
# Every PEM label that would hold a private key in the clear.
PLAINTEXT_KEY_MARKERS = (
    pem_begin("PRIVATE KEY"),
    pem_begin("EC PRIVATE KEY"),
    pem_begin("RSA PRIVATE KEY"),
    pem_begin("OPENSSH PRIVATE KEY"),
)


# Helpers -------------------------------------------------------------------------------------
def password_file(tmp_path: Path, password: bytes = PASSWORD) -> Path:
    path = tmp_path / f"password-{hashlib.sha256(password).hexdigest()[:8]}.txt"
    path.write_bytes(password + b"\n")
    return path


async def init(
    tmp_path: Path,
    directory: Path,
    *extra: str,
    name: str = "cloud",
    address: str = "127.0.0.1:0",
) -> Run:
    """``federatls ca init NAME --dir DIRECTORY --address ADDRESS`` with the test password."""
    return await federatls(
        "ca",
        "init",
        name,
        "--dir",
        directory,
        "--address",
        address,
        "--password-file",
        password_file(tmp_path),
        *extra,
    )


async def made(tmp_path: Path, *extra: str, address: str = "127.0.0.1:0") -> Path:
    """A PKI directory made by ``federatls ca init`` (which must succeed)."""
    directory = tmp_path / "cloud"
    run = await init(tmp_path, directory, *extra, address=address)
    assert run.code == 0, run
    assert run.err == "", run
    return directory


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under ``root`` with its content (None for directories) and mode."""
    out: dict[str, tuple[bytes | None, int]] = {}
    for path in sorted(root.rglob("*")):
        mode = path.stat().st_mode
        out[str(path.relative_to(root))] = (path.read_bytes() if path.is_file() else None, mode)
    return out


def staging_leftovers(parent: Path) -> list[Path]:
    return sorted(parent.glob(".*.init-*"))


def plaintext_keys(root: Path) -> list[str]:
    """Files under ``root`` holding an unencrypted private key (PEM, or a JWK with ``d``)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if any(marker in data for marker in PLAINTEXT_KEY_MARKERS) or b'"d":' in data.replace(
            b" ", b""
        ):
            found.append(str(path.relative_to(root)))
    return found


def ca_json(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "config" / "ca.json").read_text())
    return data


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def rfc7638_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 by hand: SHA-256 of the required EC members, sorted, no whitespace."""
    required = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(required, sort_keys=True, separators=(",", ":")).encode())
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def open_encrypted_key(token: str, password: bytes) -> dict[str, Any]:
    """Decrypt a step ``encryptedKey`` with joserfc alone (independent of federatls)."""
    registry = jwe.JWERegistry(algorithms=["PBES2-HS256+A128KW", "A256GCM"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc warns that a password is a "short" key
        key = OctKey.import_key(password)
    obj = jwe.decrypt_compact(token, key, registry=registry)
    data: dict[str, Any] = json.loads(obj.plaintext or b"")
    return data


def as_pki(directory: Path, password: Path) -> PKI:
    """The harness's view of a directory made by the CLI, to run it with a CA."""
    config = directory / "config" / "ca.json"
    prov = ca_json(directory)["authority"]["provisioners"][0]
    root_path = directory / "certs" / "root_ca.crt"
    return PKI(
        name=directory.name,
        directory=directory,
        config=config,
        root_path=root_path,
        root=load_pem_certificate(root_path.read_bytes()),
        provisioner=prov["name"],
        key=ProvisionerKey.decrypt(prov["encryptedKey"], PASSWORD),
        password_file=password,
    )


async def check_served(pki: PKI, *, roots_status: int) -> None:
    """/health, /roots and /provisioners answer with this PKI's material, and a token from its
    provisioner key gets a certificate."""
    verify = ssl.create_default_context(cadata=pki.root_path.read_text())
    async with httpx.AsyncClient(verify=verify) as http:
        health = await http.get(pki.url + "/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})

        roots = await http.get(pki.url + "/roots")
        assert roots.status_code == roots_status, roots.text
        assert [load_pem_certificate(c) for c in roots.json()["crts"]] == [pki.root]

        provs = await http.get(pki.url + "/provisioners")
        assert provs.status_code == 200, provs.text
        [served] = provs.json()["provisioners"]
        mine = json.loads(pki.config.read_text())["authority"]["provisioners"][0]
        assert served["type"] == "JWK"
        assert served["name"] == mine["name"]
        assert served["key"] == mine["key"]
        assert served["encryptedKey"] == mine["encryptedKey"]

        csr = build_csr(new_private_key(), "svc.cloud.internal", ["svc.cloud.internal"])
        signed = await http.post(
            pki.url + "/1.0/sign",
            json={
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
                "ott": pki.token("svc.cloud.internal"),
            },
        )
        assert signed.status_code == 201, signed.text


# The files -----------------------------------------------------------------------------------
async def test_init_writes_step_layout(tmp_path: Path) -> None:
    """init writes step's layout and reports the root fingerprint, the kid and the CA URL."""
    directory = tmp_path / "cloud"
    run = await init(tmp_path, directory, address="127.0.0.1:9443")
    assert run.code == 0, run
    assert run.err == ""
    files = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
    assert files == LAYOUT
    assert (directory / "db").is_dir()
    root = load_pem_certificate((directory / "certs" / "root_ca.crt").read_bytes())
    kid = ca_json(directory)["authority"]["provisioners"][0]["key"]["kid"]
    assert run.out.splitlines() == [
        f"Root certificate: {directory / 'certs' / 'root_ca.crt'}",
        f"Root fingerprint: {fingerprint(root)}",
        f"CA configuration: {directory / 'config' / 'ca.json'}",
        f"Provisioner: admin (kid {kid})",
        "CA URL: https://127.0.0.1:9443",
    ]


async def test_certificates_form_a_chain(tmp_path: Path) -> None:
    """The root is a self-signed CA named after NAME and the intermediate is issued by it."""
    directory = await made(tmp_path)
    root = load_pem_certificate((directory / "certs" / "root_ca.crt").read_bytes())
    inter = load_pem_certificate((directory / "certs" / "intermediate_ca.crt").read_bytes())
    assert root.subject.rfc4514_string() == "CN=cloud Root CA,O=cloud"
    assert root.issuer == root.subject
    assert inter.subject.rfc4514_string() == "CN=cloud Intermediate CA,O=cloud"
    assert inter.issuer == root.subject
    inter.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    # the twin: the root is not issued by the intermediate
    with pytest.raises((ValueError, TypeError)):
        root.verify_directly_issued_by(inter)


@pytest.mark.parametrize(
    ("key_file", "cert_file"),
    [("root_ca_key", "root_ca.crt"), ("intermediate_ca_key", "intermediate_ca.crt")],
)
async def test_secret_keys_are_encrypted_0600(
    tmp_path: Path, key_file: str, cert_file: str
) -> None:
    """Each CA key is a mode-0600 ENCRYPTED PRIVATE KEY that opens with the password and
    matches its certificate."""
    directory = await made(tmp_path)
    path = directory / "secrets" / key_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(pem_begin("ENCRYPTED PRIVATE KEY") + b"\n")
    assert data.count(b"-----BEGIN ") == 1
    key = serialization.load_pem_private_key(data, password=PASSWORD)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = load_pem_certificate((directory / "certs" / cert_file).read_bytes())
    assert key.public_key() == cert.public_key()
    assert stat.S_IMODE((directory / "secrets").stat().st_mode) == 0o700


@pytest.mark.parametrize("key_file", ["root_ca_key", "intermediate_ca_key"])
@pytest.mark.parametrize("password", [b"wrong password", None])
async def test_secret_keys_refuse_a_wrong_password(
    tmp_path: Path, key_file: str, password: bytes | None
) -> None:
    """The twin: a CA key does not open with another password, nor without one."""
    directory = await made(tmp_path)
    data = (directory / "secrets" / key_file).read_bytes()
    with pytest.raises((ValueError, TypeError)):
        serialization.load_pem_private_key(data, password=password)


async def test_no_plaintext_private_key_anywhere(tmp_path: Path) -> None:
    """No file under the directory holds a private key in the clear (PEM or JWK ``d``)."""
    directory = await made(tmp_path)
    assert len([p for p in directory.rglob("*") if p.is_file()]) == len(LAYOUT)
    assert plaintext_keys(directory) == []


async def test_plaintext_key_scan_finds_a_planted_key(tmp_path: Path) -> None:
    """The twin: the scan above does see an unencrypted key, as PEM or as a private JWK."""
    directory = await made(tmp_path)
    key = serialization.load_pem_private_key(
        (directory / "secrets" / "intermediate_ca_key").read_bytes(), password=PASSWORD
    )
    (directory / "db" / "leak.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    prov = ca_json(directory)["authority"]["provisioners"][0]
    private_jwk = open_encrypted_key(prov["encryptedKey"], PASSWORD)
    (directory / "config" / "leak.json").write_text(json.dumps(private_jwk, indent=1))
    assert plaintext_keys(directory) == ["config/leak.json", "db/leak.pem"]


# ca.json ---------------------------------------------------------------------------------------
async def test_ca_json_has_step_ca_format(tmp_path: Path) -> None:
    """ca.json carries exactly step-ca's fields (docs/ca.md, "Configuration"), pointing at the
    new files."""
    directory = await made(
        tmp_path,
        "--dns",
        "ca.cloud.internal",
        "--dns",
        "127.0.0.1",
        "--provisioner",
        "ops@cloud",
        address="127.0.0.1:9443",
    )
    data = ca_json(directory)
    assert data["root"] == str(directory / "certs" / "root_ca.crt")
    assert data["federatedRoots"] == []
    assert data["crt"] == str(directory / "certs" / "intermediate_ca.crt")
    assert data["key"] == str(directory / "secrets" / "intermediate_ca_key")
    assert data["address"] == "127.0.0.1:9443"
    assert data["dnsNames"] == ["ca.cloud.internal", "127.0.0.1"]
    assert data["db"] == {
        "type": "badgerv2",
        "dataSource": str(directory / "db"),
        "badgerFileLoadingMode": "",
    }
    [prov] = data["authority"]["provisioners"]
    assert set(prov) == {"type", "name", "key", "encryptedKey"}
    assert prov["type"] == "JWK"
    assert prov["name"] == "ops@cloud"
    key = prov["key"]
    assert set(key) == {"use", "kty", "kid", "crv", "alg", "x", "y"}
    assert (key["use"], key["kty"], key["crv"], key["alg"]) == ("sig", "EC", "P-256", "ES256")
    assert len(b64url_decode(key["x"])) == len(b64url_decode(key["y"])) == 32


@pytest.mark.parametrize(
    ("address", "dns"),
    [
        ("127.0.0.1:9000", ["127.0.0.1"]),
        ("ca.example.internal:9000", ["ca.example.internal"]),
        ("0.0.0.0:9000", ["localhost", "127.0.0.1"]),
    ],
)
async def test_dns_names_default_to_the_address_host(
    tmp_path: Path, address: str, dns: list[str]
) -> None:
    """Without --dns, dnsNames is the address's host (a listen-anywhere address names none)."""
    directory = await made(tmp_path, address=address)
    assert ca_json(directory)["dnsNames"] == dns


async def test_provisioner_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    """The provisioner key's kid is the RFC 7638 SHA-256 thumbprint of that key."""
    directory = await made(tmp_path)
    key = ca_json(directory)["authority"]["provisioners"][0]["key"]
    assert key["kid"] == ECKey.import_key(key).thumbprint()
    assert key["kid"] == rfc7638_thumbprint(key)
    # the twin: the thumbprint of any other key is not this kid
    other = ECKey.generate_key("P-256", private=False).as_dict()
    assert rfc7638_thumbprint({**key, "y": other["y"]}) != key["kid"]
    assert ECKey.import_key(other).thumbprint() != key["kid"]


async def test_encrypted_key_is_step_jwe_of_the_private_jwk(tmp_path: Path) -> None:
    """encryptedKey is a PBES2-HS256+A128KW/A256GCM JWE with a random 16-byte salt, opening
    with the password to the private JWK of ``key``."""
    directory = await made(tmp_path)
    prov = ca_json(directory)["authority"]["provisioners"][0]
    token = prov["encryptedKey"]
    assert token.count(".") == 4
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert set(header) == {"alg", "cty", "enc", "p2c", "p2s"}
    assert {k: header[k] for k in ("alg", "cty", "enc", "p2c")} == {
        "alg": "PBES2-HS256+A128KW",
        "cty": "jwk+json",
        "enc": "A256GCM",
        "p2c": 100000,
    }
    assert len(b64url_decode(header["p2s"])) == 16

    private = open_encrypted_key(token, PASSWORD)
    public = prov["key"]
    assert {k: private[k] for k in public} == public
    assert len(b64url_decode(private["d"])) == 32
    # d is the private half of x, y
    jwk = ECKey.import_key(private)
    derived = ECKey.import_key(jwk.as_dict(private=False)).as_dict()
    assert (derived["x"], derived["y"]) == (public["x"], public["y"])
    raw = jwk.private_key
    assert isinstance(raw, ec.EllipticCurvePrivateKey)
    assert raw.public_key() == ECKey.import_key(public).public_key

    # a second PKI gets another salt and another key
    other = tmp_path / "second"
    other.mkdir()
    again = await made(other)
    prov2 = ca_json(again)["authority"]["provisioners"][0]
    header2 = json.loads(b64url_decode(prov2["encryptedKey"].split(".")[0]))
    assert header2["p2s"] != header["p2s"]
    assert prov2["key"]["kid"] != public["kid"]


async def test_encrypted_key_refuses_a_wrong_password(tmp_path: Path) -> None:
    """The twin: the encryptedKey does not open with another password."""
    directory = await made(tmp_path)
    token = ca_json(directory)["authority"]["provisioners"][0]["encryptedKey"]
    with pytest.raises(JoseError):
        open_encrypted_key(token, b"not the password")


# Refusals --------------------------------------------------------------------------------------
async def test_init_into_an_empty_directory_succeeds(tmp_path: Path) -> None:
    """An existing but empty --dir is filled (the twin of the refusal below)."""
    directory = tmp_path / "cloud"
    directory.mkdir()
    run = await init(tmp_path, directory)
    assert run.code == 0, run
    assert {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} == LAYOUT


async def test_second_init_refuses_and_changes_nothing(tmp_path: Path) -> None:
    """A second init into the same directory exits 1 with one line and leaves every file
    byte-identical."""
    directory = await made(tmp_path)
    before = snapshot(directory)
    run = await init(tmp_path, directory, "--provisioner", "other")
    assert_one_line_error(run, str(directory), "refusing to overwrite")
    assert snapshot(directory) == before
    assert staging_leftovers(tmp_path) == []


async def test_init_refuses_a_directory_with_one_foreign_file(tmp_path: Path) -> None:
    """Any file in --dir (not only a PKI) makes init refuse and leave it alone."""
    directory = tmp_path / "cloud"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine\n")
    run = await init(tmp_path, directory)
    assert_one_line_error(run, "already exists and is not empty")
    assert snapshot(directory) == {
        "notes.txt": (b"mine\n", (directory / "notes.txt").stat().st_mode)
    }
    assert staging_leftovers(tmp_path) == []


async def test_init_under_a_file_fails_cleanly(tmp_path: Path) -> None:
    """--dir under a path that is a file: one line, exit 1, nothing created (missing parents
    are made otherwise: tests/test_cli.py)."""
    (tmp_path / "file").write_text("not a directory\n")
    run = await init(tmp_path, tmp_path / "file" / "such" / "cloud")
    assert_one_line_error(run, f"{tmp_path / 'file'} is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [password_file(tmp_path).name, "file"]
    )


@pytest.mark.parametrize(
    "address", ["nohost", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:https", "", "127.0.0.1:-1"]
)
async def test_bad_address_fails_with_one_line(tmp_path: Path, address: str) -> None:
    """An address that is not HOST:PORT is a usage mistake (exit 2): one line, nothing
    written."""
    run = await init(tmp_path, tmp_path / "cloud", address=address)
    assert run.code == 2, run
    assert run.out == ""
    assert len(run.err.splitlines()) == 1, run.err
    assert "must be HOST:PORT" in run.err
    assert not (tmp_path / "cloud").exists()
    assert staging_leftovers(tmp_path) == []


async def test_missing_password_file_fails_with_one_line(tmp_path: Path) -> None:
    """A --password-file that does not exist is refused with one line, nothing written."""
    run = await federatls(
        "ca",
        "init",
        "cloud",
        "--dir",
        tmp_path / "cloud",
        "--address",
        "127.0.0.1:0",
        "--password-file",
        tmp_path / "missing.txt",
    )
    assert_one_line_error(run, "cannot read password file", "missing.txt")
    assert not (tmp_path / "cloud").exists()
    assert staging_leftovers(tmp_path) == []


async def test_empty_password_is_refused(tmp_path: Path) -> None:
    """An empty (whitespace-only) password file is refused: keys are never left unprotected."""
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"  \n")
    run = await federatls(
        "ca",
        "init",
        "cloud",
        "--dir",
        tmp_path / "cloud",
        "--address",
        "127.0.0.1:0",
        "--password-file",
        empty,
    )
    assert_one_line_error(run, "is empty")
    assert not (tmp_path / "cloud").exists()


async def test_no_password_and_no_terminal_is_refused(tmp_path: Path) -> None:
    """Without --password-file and with no terminal to ask on, init refuses with one line."""
    run = await federatls(
        "ca", "init", "cloud", "--dir", tmp_path / "cloud", "--address", "127.0.0.1:0"
    )
    assert_one_line_error(run, "--password-file")
    assert not (tmp_path / "cloud").exists()


def _size_limited(limit: int, *args: str | Path) -> list[str]:
    """A command running ``federatls ARGS`` with files limited to ``limit`` bytes
    (RLIMIT_FSIZE): writes past it fail with EFBIG, a real disk-full-like failure."""
    code = (
        "import resource, runpy, sys\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "sys.argv = ['federatls', *sys.argv[1:]]\n"
        "runpy.run_module('federatls', run_name='__main__', alter_sys=True)\n"
    )
    return [sys.executable, "-B", "-c", code, *map(str, args)]


async def _init_with_failing_write(tmp_path: Path) -> tuple[Run, Path]:
    directory = tmp_path / "cloud"
    command = _size_limited(
        1500,  # the certificates and keys fit; ca.json (about 2 kB) does not
        "ca",
        "init",
        "cloud",
        "--dir",
        directory,
        "--address",
        "127.0.0.1:0",
        "--password-file",
        password_file(tmp_path),
    )
    result = await anyio.run_process(command, check=False, stdin=subprocess.DEVNULL)
    return Run(result.returncode, result.stdout.decode(), result.stderr.decode()), directory


async def test_failed_write_leaves_no_partial_directory(tmp_path: Path) -> None:
    """When a write fails midway (file size limit), neither --dir nor a staging dir remains."""
    run, directory = await _init_with_failing_write(tmp_path)
    assert run.code != 0, run
    assert "File too large" in run.err or "EFBIG" in run.err or "too large" in run.err, run.err
    assert not directory.exists()
    assert staging_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [password_file(tmp_path).name]


async def test_size_limit_lets_a_normal_init_through(tmp_path: Path) -> None:
    """The twin: the same wrapper with a roomy limit makes a complete PKI."""
    directory = tmp_path / "cloud"
    command = _size_limited(
        1 << 20,
        "ca",
        "init",
        "cloud",
        "--dir",
        directory,
        "--address",
        "127.0.0.1:0",
        "--password-file",
        password_file(tmp_path),
    )
    result = await anyio.run_process(command, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} == LAYOUT


async def test_failed_write_is_a_one_line_error(tmp_path: Path) -> None:
    """A write failure during init is reported like every runtime error: one line, exit 1."""
    run, _directory = await _init_with_failing_write(tmp_path)
    assert_one_line_error(run, "File too large")


# Running the result ----------------------------------------------------------------------------
async def test_directory_runs_under_real_stepca(tmp_path: Path, stepca_bin: str) -> None:
    """The real step-ca starts on the directory: /health ok, /roots (201) is our root,
    /provisioners serves our provisioner and encryptedKey, and a token signs."""
    directory = await made(tmp_path)
    pki = as_pki(directory, password_file(tmp_path))
    with stepca_process(stepca_bin, pki):
        await check_served(pki, roots_status=201)


async def test_real_stepca_refuses_the_wrong_password(tmp_path: Path, stepca_bin: str) -> None:
    """The twin: step-ca cannot open the intermediate key with another password and exits."""
    directory = await made(tmp_path)
    pki = as_pki(directory, password_file(tmp_path, b"not the password"))
    with (
        pytest.raises(RuntimeError, match="decryption password incorrect"),
        stepca_process(stepca_bin, pki),
    ):
        pass


async def test_directory_runs_under_federatls_ca(tmp_path: Path) -> None:
    """The federatls CA serves the directory made by init, with the same answers."""
    directory = await made(tmp_path)
    pki = as_pki(directory, password_file(tmp_path))
    async with serving(pki):
        await check_served(pki, roots_status=201)
    assert plaintext_keys(directory) == []


async def test_federatls_ca_refuses_the_wrong_password(tmp_path: Path) -> None:
    """The twin: the federatls CA does not start with another password."""
    directory = await made(tmp_path)
    with pytest.raises(ConfigError, match="cannot decrypt intermediate key"):
        async with CAServer.running(directory / "config" / "ca.json", b"not the password"):
            pass
