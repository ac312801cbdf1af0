"""The ``federatls ca`` command line, run as a real subprocess against real CAs on 127.0.0.1.

The key verbs (token, certificate, renew, revoke, roots, federation, health) run against both
the federatls CA and the real step-ca (fixture ``any_ca``), so the CLI is shown to work with
step-ca too. The CLI's contract is checked everywhere: a usage error is exit 2 and one line,
a runtime error is exit 1, nothing on stdout and one ``federatls: error:`` line on stderr.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jws

from federatls._keys import build_csr, new_private_key
from federatls._protocol import SignRequest
from federatls._x509 import fingerprint, load_pem_certificate, load_pem_certificates
from federatls.ca import CAServer

from harness import (
    PKI,
    FakeClock,
    Run,
    assert_one_line_error,
    federatls,
    free_port,
    make_pki,
    pem_begin,
    serving,
    start_serving,
    stepca_process,
)

pytestmark = pytest.mark.anyio

SVC = "svc.cloud.internal"
DAY_AND_BACKDATE = 24 * 3600 + 60


# Running the CLI -----------------------------------------------------------------------------
def assert_ok(run: Run) -> None:
    assert run.code == 0, run
    assert run.err == "", run


def ca_flags(pki: PKI) -> list[str]:
    return ["--ca-url", pki.url, "--root", str(pki.root_path)]


def mint_flags(pki: PKI) -> list[str]:
    return [*ca_flags(pki), "--password-file", str(pki.password_file)]


def unreachable_url() -> str:
    return f"https://127.0.0.1:{free_port()}"


# Looking at tokens and files -------------------------------------------------------------------
def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def header_of(token: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_b64url(token.split(".")[0]))
    return data


def claims_of(token: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_b64url(token.split(".")[1]))
    return data


def token_from(run: Run) -> str:
    """The token a successful ``ca token`` printed: one line, nothing else."""
    assert_ok(run)
    lines = run.out.splitlines()
    assert len(lines) == 1, run.out
    assert lines[0].count(".") == 2
    return lines[0]


def intermediate(pki: PKI) -> x509.Certificate:
    return load_pem_certificate((pki.directory / "certs" / "intermediate_ca.crt").read_bytes())


def spki(key_or_cert: Any) -> bytes:
    public = key_or_cert.public_key()
    data: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def issued(pki: PKI, crt: Path, key: Path, subject: str) -> x509.Certificate:
    """Check CRT = leaf + intermediate issued for ``subject`` and KEY = its 0600 private key;
    return the leaf."""
    chain = load_pem_certificates(crt.read_bytes())
    assert len(chain) == 2
    leaf, inter = chain
    assert inter == intermediate(pki)
    leaf.verify_directly_issued_by(inter)
    assert leaf.subject.rfc4514_string() == f"CN={subject}"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pem = key.read_bytes()
    assert pem.startswith(pem_begin("PRIVATE KEY") + b"\n")
    private = serialization.load_pem_private_key(pem, password=None)
    assert spki(private) == spki(leaf)
    return leaf


def lifetime(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()


def sans_of(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in ext]


def serial_of(crt: Path) -> str:
    return str(load_pem_certificate(crt.read_bytes()).serial_number)


def csr_pem(subject: str, sans: list[str]) -> str:
    csr = build_csr(new_private_key(), subject, sans)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def verify_context(pki: PKI) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pki.root_path.read_text())


async def post_sign(pki: PKI, token: str, subject: str = SVC) -> httpx.Response:
    async with httpx.AsyncClient(verify=verify_context(pki)) as http:
        return await http.post(
            pki.url + "/1.0/sign", json={"csr": csr_pem(subject, []), "ott": token}
        )


async def certificate(pki: PKI, tmp_path: Path, name: str, *extra: str) -> tuple[Path, Path]:
    """``ca certificate SVC name.crt name.key`` minting its token with the password."""
    crt, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    run = await federatls("ca", "certificate", SVC, crt, key, *mint_flags(pki), *extra)
    assert_ok(run)
    assert run.out == f"Certificate: {crt}\nPrivate Key: {key}\n"
    return crt, key


# Fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def other(tmp_path: Path) -> PKI:
    """A second, unrelated PKI ('kubernetes'), not running."""
    return make_pki(tmp_path, "kubernetes")


@pytest.fixture(params=["federatls", "step-ca"])
async def federated_ca(
    request: pytest.FixtureRequest, pki: PKI, other: PKI, clock: FakeClock
) -> AsyncIterator[PKI]:
    """'cloud' federated with 'kubernetes' (set before start), served by either CA; yields
    the 'kubernetes' PKI."""
    pki.federate(other)
    if request.param == "federatls":
        async with serving(pki, clock):
            yield other
    else:
        with stepca_process(request.getfixturevalue("stepca_bin"), pki):
            yield other


# --help and usage errors ------------------------------------------------------------------
HELP_PATHS = [
    [],
    ["ca"],
    *[
        ["ca", verb]
        for verb in (
            "init",
            "serve",
            "token",
            "certificate",
            "renew",
            "revoke",
            "roots",
            "federation",
            "health",
        )
    ],
    ["demo"],
]


@pytest.mark.parametrize("path", HELP_PATHS, ids=lambda p: " ".join(p) or "federatls")
async def test_help_exits_zero(path: list[str]) -> None:
    """Every command and subcommand prints its usage for --help and exits 0."""
    run = await federatls(*path, "--help")
    assert_ok(run)
    assert run.out.startswith("usage: " + " ".join(["federatls", *path]))


async def test_version_exits_zero() -> None:
    """--version prints the program's version and exits 0."""
    run = await federatls("--version")
    assert_ok(run)
    assert re.fullmatch(r"federatls \d+\.\d+\.\d+\S*\n", run.out)


USAGE_ERRORS = [
    ([], "required: command"),
    (["--bogus", "demo"], "unrecognized arguments: --bogus"),
    (["ca"], "required: verb"),
    (["ca", "bogus"], "invalid choice: 'bogus'"),
    (["ca", "init"], "required: name, --dir, --address"),
    (["ca", "init", "cloud", "--dir", "d"], "required: --address"),
    (["ca", "init", "cloud", "--dir", "d", "--address", "h:1", "--bogus"], "--bogus"),
    (["ca", "init", "cloud", "--dir", "d", "--address", "h"], "must be HOST:PORT"),
    (["ca", "init", " ", "--dir", "d", "--address", "h:1"], "a name cannot be empty"),
    (["ca", "serve"], "required: config"),
    (["ca", "serve", "ca.json", "--port", "1"], "unrecognized arguments: --port"),
    (["ca", "token"], "required: subject"),
    (["ca", "token", SVC, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["ca", "token", SVC, "--ca-url"], "argument --ca-url: expected one argument"),
    (["ca", "certificate", SVC, "svc.crt"], "required: key"),
    (["ca", "certificate", SVC, "c", "k", "--bogus"], "unrecognized arguments: --bogus"),
    (["ca", "renew", "svc.crt"], "required: key"),
    (["ca", "renew", "c", "k", "--out"], "argument --out: expected one argument"),
    (["ca", "revoke"], "required: serial"),
    (["ca", "revoke", "1", "--reason-code", "x"], "invalid int value: 'x'"),
    (["ca", "roots", "a.pem", "b.pem"], "unrecognized arguments: b.pem"),
    (["ca", "roots", "--ca-url"], "argument --ca-url: expected one argument"),
    (["ca", "federation", "--root"], "argument --root: expected one argument"),
    (["ca", "health", "extra"], "unrecognized arguments: extra"),
    (["ca", "rotate", "pki/cloud", "bogus"], "invalid choice: 'bogus'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    # Mistakes argparse cannot see alone: missing or contradictory flags, malformed values.
    (["ca", "token", SVC, "--password-file", "pw"], "give --ca-url and --root"),
    (["ca", "token", SVC, "--ca-url", "https://127.0.0.1:1"], "--root is required"),
    (["ca", "token", SVC, "--offline", "ca.json", "--not-after", "2h"], "token validity must"),
    (["ca", "token", SVC, "--offline", "ca.json", "--not-after", "5s"], "token validity must"),
    (["ca", "token", SVC, "--offline", "ca.json", "--not-after", "soon"], "--not-after"),
    (["ca", "certificate", SVC, "c", "k", "--kty", "DSA-1024"], "unknown key type 'DSA-1024'"),
    (["ca", "certificate", SVC, "c", "k", "--not-after", "soon"], "--not-after"),
    (["ca", "certificate", SVC, "c", "k", "--token", "t", "--ca-url", "http://h:1"], "https://"),
    (["ca", "renew", "c", "k", "--root", "r.crt"], "--ca-url is required"),
    (["ca", "revoke", "0x1g", "--ca-url", "https://127.0.0.1:1"], "must be a decimal number"),
    (["ca", "token", "0x1g", "--revoke", "--offline", "ca.json"], "must be a decimal number"),
    (["ca", "revoke", "1", "--cert", "c.crt", "--ca-url", "https://h:1"], "--cert and --key go"),
    (["ca", "roots", "--root", "r.crt"], "--ca-url is required"),
    (["ca", "federation", "--ca-url", "https://127.0.0.1:1"], "--root is required"),
    (["ca", "health", "--root", "r.crt"], "--ca-url is required"),
    (["ca", "health", "--ca-url", "http://127.0.0.1:1", "--root", "r.crt"], "https:// URL"),
    (["ca", "health", "--ca-url", "https://127.0.0.1:99999", "--root", "r.crt"], "invalid port"),
    (["ca", "health", "--ca-url", "https://[::1", "--root", "r.crt"], "https://[::1"),
    (["ca", "roots", "--ca-url", "https://:9000", "--root", "r.crt"], "has no host"),
]


@pytest.mark.parametrize(
    ("argv", "fragment"), USAGE_ERRORS, ids=[" ".join(a) or "nothing" for a, _ in USAGE_ERRORS]
)
async def test_usage_error_is_one_line_exit_2(argv: list[str], fragment: str) -> None:
    """A usage error (unknown flag, missing argument) exits 2 with exactly one stderr line."""
    run = await federatls(*argv)
    assert run.code == 2, run
    assert run.out == ""
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("federatls")
    assert ": error: " in lines[0]
    assert fragment in lines[0]
    assert lines[0].endswith("(see --help)")


# Runtime errors that need no CA ----------------------------------------------------------------
def _plain_key(tmp_path: Path) -> Path:
    """A plaintext P-256 key written at run time (in the test's temporary directory)."""
    path = tmp_path / "stray.key"
    path.write_bytes(
        new_private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


Argv = Callable[[PKI, Path], list[str | Path]]


def _unreachable(pki: PKI) -> list[str]:
    return ["--ca-url", unreachable_url(), "--root", str(pki.root_path)]


def _offline(pki: PKI) -> list[str | Path]:
    return ["--offline", pki.config, "--password-file", pki.password_file]


LOCAL_ERRORS: list[Any] = [
    pytest.param(
        lambda p, t: ["ca", "roots", "--ca-url", unreachable_url(), "--root", t / "no.crt"],
        ("cannot read root certificate", "no.crt"),
        id="missing root file",
    ),
    pytest.param(
        lambda p, t: ["ca", "federation", "--ca-url", unreachable_url(), "--root", p.config],
        ("no PEM CERTIFICATE block",),
        id="root file is not PEM",
    ),
    pytest.param(
        lambda p, t: ["ca", "health", *_unreachable(p)],
        ("cannot reach the CA", "/health"),
        id="health of an unreachable CA",
    ),
    pytest.param(
        lambda p, t: ["ca", "token", SVC, "--offline", t / "none.json"],
        ("cannot read CA configuration", "none.json"),
        id="offline ca.json missing",
    ),
    pytest.param(
        lambda p, t: ["ca", "token", SVC, "--offline", p.config, "--password-file", t / "x"],
        ("cannot read password file",),
        id="password file missing",
    ),
    pytest.param(
        lambda p, t: ["ca", "token", SVC, "--offline", p.config],
        ("a password is needed: give --password-file",),
        id="no password and no terminal",
    ),
    pytest.param(
        lambda p, t: ["ca", "token", SVC, *_offline(p), "--provisioner", "nobody"],
        ("no JWK provisioner named 'nobody'",),
        id="offline unknown provisioner",
    ),
    pytest.param(
        lambda p, t: ["ca", "certificate", SVC, t / "c", t / "k", "--token", "not-a-jwt"],
        ("three dot-separated parts",),
        id="certificate with a malformed token",
    ),
    pytest.param(
        lambda p, t: [
            "ca",
            "certificate",
            "other.name",
            t / "c",
            t / "k",
            "--token",
            p.forge(p.claims(SVC)),
        ],
        ("the token is for 'svc.cloud.internal', not 'other.name'",),
        id="certificate for another subject than the token's",
    ),
    pytest.param(
        lambda p, t: ["ca", "renew", t / "none.crt", _plain_key(t), *_unreachable(p)],
        ("cannot read certificate",),
        id="renew a missing certificate",
    ),
    pytest.param(
        lambda p, t: [
            "ca",
            "renew",
            p.root_path,
            p.directory / "secrets" / "intermediate_ca_key",
            *_unreachable(p),
        ],
        ("is not an unencrypted PEM private key",),
        id="renew with an encrypted key",
    ),
    pytest.param(
        lambda p, t: ["ca", "renew", p.root_path, _plain_key(t), *_unreachable(p)],
        ("does not match",),
        id="renew with a key that is not the certificate's",
    ),
    pytest.param(
        lambda p, t: [
            "ca",
            "revoke",
            str(p.root.serial_number),
            "--cert",
            p.root_path,
            "--key",
            _plain_key(t),
            *_unreachable(p),
        ],
        ("does not match",),
        id="revoke with a key that is not the certificate's",
    ),
]


@pytest.mark.parametrize(("argv", "fragments"), LOCAL_ERRORS)
async def test_runtime_error_is_one_line_exit_1(
    pki: PKI, tmp_path: Path, argv: Argv, fragments: tuple[str, ...]
) -> None:
    """A runtime error exits 1 with one ``federatls: error:`` line saying what is wrong."""
    before = sorted(p.name for p in tmp_path.iterdir())
    run = await federatls(*argv(pki, tmp_path))
    assert_one_line_error(run, *fragments)
    created = sorted(set(p.name for p in tmp_path.iterdir()) - set(before) - {"stray.key"})
    assert created == []


_NOT_DECIMAL = "must be a decimal number"


@pytest.mark.parametrize(
    "serial",
    [
        "0x1g",
        "12a",
        "-5",
        "1 2",
        "",
        "²",
        "١٢٣",
    ],
)
async def test_revoke_refuses_a_non_decimal_serial(pki: PKI, serial: str) -> None:
    """A serial that is neither ASCII decimal nor 0x hex (nor negative) is a usage mistake,
    refused before any CA is contacted. Twin: test_revoke_by_hex_serial."""
    run = await federatls("ca", "revoke", serial, *_unreachable(pki), "--password-file", "x")
    assert run.code == 2, run
    assert run.out == ""
    assert len(run.err.splitlines()) == 1, run.err
    assert _NOT_DECIMAL in run.err


# ca token ---------------------------------------------------------------------------------------
async def test_token_has_step_claims_and_is_accepted(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """`ca token` prints exactly step's token (header, claims, 5 min) and the CA accepts it
    through `ca certificate --token`."""
    before = int(datetime.now(UTC).timestamp())
    token = token_from(await federatls("ca", "token", SVC, *mint_flags(pki)))
    after = int(datetime.now(UTC).timestamp())

    assert header_of(token) == {"alg": "ES256", "kid": pki.key.kid, "typ": "JWT"}
    claims = claims_of(token)
    assert set(claims) == {"aud", "exp", "iat", "iss", "jti", "nbf", "sans", "sha", "sub"}
    assert claims["aud"] == pki.url + "/1.0/sign"
    assert claims["iss"] == "admin"
    assert claims["sub"] == SVC
    assert claims["sans"] == [SVC]
    assert re.fullmatch(r"[0-9a-f]{64}", claims["jti"])
    root_der = pki.root.public_bytes(serialization.Encoding.DER)
    assert claims["sha"] == hashlib.sha256(root_der).hexdigest()
    assert before <= claims["iat"] <= after
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] - claims["iat"] == 300
    jws.deserialize_compact(token, pki.key.public.key, algorithms=["ES256"])  # signature

    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    run = await federatls("ca", "certificate", SVC, crt, key, "--token", token)
    assert_ok(run)
    leaf = issued(pki, crt, key, SVC)
    assert sans_of(leaf) == [SVC]
    assert lifetime(leaf) == pytest.approx(DAY_AND_BACKDATE, abs=2)


async def test_token_options_not_after_sans_provisioner(
    any_ca: str, pki: PKI, tmp_path: Path
) -> None:
    """--not-after sets the token's validity, --san its SANs (which the certificate gets),
    --provisioner picks the provisioner."""
    token = token_from(
        await federatls(
            "ca",
            "token",
            SVC,
            *mint_flags(pki),
            "--not-after",
            "10m",
            "--san",
            "api.cloud.internal",
            "--san",
            "127.0.0.1",
            "--provisioner",
            "admin",
        )
    )
    claims = claims_of(token)
    assert claims["exp"] - claims["iat"] == 600
    assert claims["sans"] == ["api.cloud.internal", "127.0.0.1"]
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    assert_ok(await federatls("ca", "certificate", SVC, crt, key, "--token", token))
    assert sans_of(issued(pki, crt, key, SVC)) == ["api.cloud.internal", "127.0.0.1"]


async def test_offline_token_is_accepted(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """`ca token --offline CA.JSON` mints from the ca.json alone (aud from its dnsNames and
    address, or --ca-url) and the running CA accepts it."""
    config = json.loads(pki.config.read_text())
    port = config["address"].rpartition(":")[2]
    run = await federatls(
        "ca", "token", SVC, "--offline", pki.config, "--password-file", pki.password_file
    )
    token = token_from(run)
    claims = claims_of(token)
    assert claims["aud"] == f"https://{config['dnsNames'][0]}:{port}/1.0/sign"
    assert claims["sha"] == pki.fingerprint
    assert header_of(token)["kid"] == pki.key.kid
    response = await post_sign(pki, token)  # ports in aud are ignored by both CAs
    assert response.status_code == 201, response.text

    token = token_from(await federatls("ca", "token", SVC, *_offline(pki), "--ca-url", pki.url))
    assert claims_of(token)["aud"] == pki.url + "/1.0/sign"
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    assert_ok(await federatls("ca", "certificate", SVC, crt, key, "--token", token))
    issued(pki, crt, key, SVC)


async def test_offline_token_of_another_ca_is_refused(
    any_ca: str, pki: PKI, other: PKI, tmp_path: Path
) -> None:
    """The twin: a token minted offline from another CA's ca.json gets 401 here."""
    token = token_from(await federatls("ca", "token", SVC, *_offline(other), "--ca-url", pki.url))
    response = await post_sign(pki, token)
    assert response.status_code == 401, response.text
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    run = await federatls(
        "ca", "certificate", SVC, crt, key, "--token", token, "--root", pki.root_path
    )
    assert_one_line_error(run, "401")
    assert not crt.exists()
    assert not key.exists()


async def test_token_with_wrong_password(ca: CAServer, pki: PKI, tmp_path: Path) -> None:
    """A wrong password: exit 1, one line, nothing on stdout."""
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the password\n")
    run = await federatls("ca", "token", SVC, *ca_flags(pki), "--password-file", wrong)
    assert_one_line_error(run, "cannot decrypt the provisioner key")


async def test_token_with_unknown_provisioner(ca: CAServer, pki: PKI) -> None:
    """An unknown --provisioner: exit 1 naming it."""
    run = await federatls("ca", "token", SVC, *mint_flags(pki), "--provisioner", "nobody")
    assert_one_line_error(run, "no JWK provisioner named 'nobody'")


async def test_token_from_unreachable_ca(pki: PKI) -> None:
    """An unreachable --ca-url: exit 1 with one line."""
    run = await federatls(
        "ca", "token", SVC, *_unreachable(pki), "--password-file", pki.password_file
    )
    assert_one_line_error(run, "cannot reach the CA")


async def test_token_with_a_root_that_is_not_the_cas(ca: CAServer, pki: PKI, other: PKI) -> None:
    """A --root that did not issue the CA's TLS certificate: exit 1, a TLS failure."""
    run = await federatls(
        "ca",
        "token",
        SVC,
        "--ca-url",
        pki.url,
        "--root",
        other.root_path,
        "--password-file",
        pki.password_file,
    )
    assert_one_line_error(run, "TLS failure")


# ca certificate ---------------------------------------------------------------------------------
async def test_certificate_minted_with_password(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """Without --token the token is minted with the password; --san and --not-after 1h give a
    1h1m certificate with those SANs."""
    crt, key = await certificate(
        pki,
        tmp_path,
        "svc",
        "--san",
        SVC,
        "--san",
        "10.0.0.7",
        "--not-after",
        "1h",
    )
    leaf = issued(pki, crt, key, SVC)
    assert sans_of(leaf) == [SVC, "10.0.0.7"]
    assert lifetime(leaf) == pytest.approx(3600 + 60, abs=2)
    assert stat.S_IMODE(crt.stat().st_mode) == 0o644


async def test_certificate_key_types(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """--kty Ed25519 and RSA-2048 give a key of that type that matches the certificate."""
    for kty, kind in (("Ed25519", ed25519.Ed25519PublicKey), ("RSA-2048", rsa.RSAPublicKey)):
        crt, key = await certificate(pki, tmp_path, kty, "--kty", kty)
        leaf = issued(pki, crt, key, SVC)
        assert isinstance(leaf.public_key(), kind), kty
        if kind is rsa.RSAPublicKey:
            assert leaf.public_key().key_size == 2048  # type: ignore[union-attr]
            usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
            assert usage.key_encipherment
    crt, key = await certificate(pki, tmp_path, "p256")
    assert isinstance(issued(pki, crt, key, SVC).public_key(), ec.EllipticCurvePublicKey)


async def test_certificate_refuses_to_overwrite(ca: CAServer, pki: PKI, tmp_path: Path) -> None:
    """An existing CRT or KEY without --force: exit 1, files unchanged, and the token is not
    spent (it still works with --force)."""
    token = token_from(await federatls("ca", "token", SVC, *mint_flags(pki)))
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    crt.write_text("old certificate\n")
    run = await federatls("ca", "certificate", SVC, crt, key, "--token", token)
    assert_one_line_error(run, str(crt), "already exists", "--force")
    assert crt.read_text() == "old certificate\n"
    assert not key.exists()

    crt.unlink()
    key.write_text("old key\n")
    run = await federatls("ca", "certificate", SVC, crt, key, "--token", token)
    assert_one_line_error(run, str(key), "already exists")
    assert key.read_text() == "old key\n"
    assert not crt.exists()

    crt.write_text("old certificate\n")
    assert_ok(await federatls("ca", "certificate", SVC, crt, key, "--token", token, "--force"))
    issued(pki, crt, key, SVC)


async def test_replayed_token_is_refused(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """A token used a second time: exit 1 with a message naming status 401, nothing written."""
    token = token_from(await federatls("ca", "token", SVC, *mint_flags(pki)))
    first = await federatls(
        "ca", "certificate", SVC, tmp_path / "a.crt", tmp_path / "a.key", "--token", token
    )
    assert_ok(first)
    crt, key = tmp_path / "b.crt", tmp_path / "b.key"
    run = await federatls("ca", "certificate", SVC, crt, key, "--token", token)
    assert_one_line_error(run, "401", "already used, has expired")  # the SDK's hint too
    assert not crt.exists()
    assert not key.exists()


async def test_refusal_other_than_401_has_no_token_hint(
    ca: CAServer, pki: PKI, tmp_path: Path
) -> None:
    """Twin: a refusal that is not about the token (403, too long) carries no token hint."""
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    run = await federatls(
        "ca", "certificate", SVC, crt, key, "--not-after", "48h", *mint_flags(pki)
    )
    line = assert_one_line_error(run, "403")
    assert "already used" not in line


async def test_expired_token_is_refused(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """A token whose exp is past the one-minute leeway: exit 1 naming 401, nothing written."""
    now = int(datetime.now(UTC).timestamp())
    token = pki.forge(pki.claims(SVC, iat=None, nbf=None, exp=now - 90))
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    run = await federatls("ca", "certificate", SVC, crt, key, "--token", token)
    assert_one_line_error(run, "401")
    assert not crt.exists()
    assert not key.exists()


async def test_token_naming_an_unknown_root_is_refused(
    ca: CAServer, pki: PKI, other: PKI, tmp_path: Path
) -> None:
    """A token whose sha is another CA's root: the CA has no such root (404), nothing written."""
    token = pki.forge(pki.claims(SVC, sha=other.fingerprint))
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    run = await federatls("ca", "certificate", SVC, crt, key, "--token", token)
    assert_one_line_error(run, "404", other.fingerprint)
    assert not crt.exists()
    assert not key.exists()


async def test_certificate_with_wrong_root_is_a_tls_failure(
    ca: CAServer, pki: PKI, other: PKI, tmp_path: Path
) -> None:
    """--root of another CA: a TLS failure, nothing written."""
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    run = await federatls(
        "ca",
        "certificate",
        SVC,
        crt,
        key,
        "--ca-url",
        pki.url,
        "--root",
        other.root_path,
        "--password-file",
        pki.password_file,
    )
    assert_one_line_error(run, "TLS failure")
    assert not crt.exists()
    assert not key.exists()


async def test_certificate_longer_than_allowed_is_refused(
    ca: CAServer, pki: PKI, tmp_path: Path
) -> None:
    """--not-after 48h is above the 24h maximum: exit 1 with the CA's 403 reason."""
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    run = await federatls(
        "ca", "certificate", SVC, crt, key, *mint_flags(pki), "--not-after", "48h"
    )
    assert_one_line_error(run, "403", "more than the authorized maximum")
    assert not crt.exists()
    assert not key.exists()


async def test_certificate_into_a_missing_directory_writes_nothing(
    ca: CAServer, pki: PKI, tmp_path: Path
) -> None:
    """CRT in a directory that does not exist: exit 1 and no KEY left behind either."""
    crt, key = tmp_path / "missing" / "svc.crt", tmp_path / "svc.key"
    run = await federatls("ca", "certificate", SVC, crt, key, *mint_flags(pki))
    assert_one_line_error(run, "does not exist")
    assert not key.exists()


async def test_certificate_onto_a_directory_spends_no_token(
    ca: CAServer, pki: PKI, tmp_path: Path
) -> None:
    """CRT or KEY naming a directory, even with --force: exit 1 naming it before the CA is
    asked, nothing written, and the token still works."""
    token = token_from(await federatls("ca", "token", SVC, *mint_flags(pki)))
    here = tmp_path / "out"
    crt, key, folder = here / "svc.crt", here / "svc.key", here / "folder"
    folder.mkdir(parents=True)
    for paths in ((folder, key), (crt, folder)):
        run = await federatls("ca", "certificate", SVC, *paths, "--token", token, "--force")
        assert_one_line_error(run, str(folder), "is a directory")
        assert sorted(p.name for p in here.iterdir()) == ["folder"]
    assert_ok(await federatls("ca", "certificate", SVC, crt, key, "--token", token))
    issued(pki, crt, key, SVC)


# ca renew ------------------------------------------------------------------------------------
async def test_renew_over_mtls(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """`ca renew` presents the certificate over mTLS and writes the renewal over CRT: a new
    serial, the same key, subject, SANs and lifetime."""
    crt, key = await certificate(pki, tmp_path, "svc")
    old = issued(pki, crt, key, SVC)
    run = await federatls("ca", "renew", crt, key, *ca_flags(pki))
    assert_ok(run)
    assert run.out == f"Your certificate has been saved in {crt}.\n"
    new = issued(pki, crt, key, SVC)
    assert new.serial_number != old.serial_number
    assert spki(new) == spki(old)
    assert sans_of(new) == sans_of(old)
    assert lifetime(new) == pytest.approx(lifetime(old), abs=2)


async def test_renew_out_and_its_refusals(ca: CAServer, pki: PKI, tmp_path: Path) -> None:
    """--out writes the renewal elsewhere and leaves CRT alone; an existing --out needs
    --force."""
    crt, key = await certificate(pki, tmp_path, "svc")
    original = crt.read_bytes()
    out = tmp_path / "renewed.crt"
    assert_ok(await federatls("ca", "renew", crt, key, *ca_flags(pki), "--out", out))
    assert crt.read_bytes() == original
    first = issued(pki, out, key, SVC)
    assert first.serial_number != load_pem_certificate(original).serial_number

    run = await federatls("ca", "renew", crt, key, *ca_flags(pki), "--out", out)
    assert_one_line_error(run, "already exists", "--force")
    assert issued(pki, out, key, SVC) == first

    assert_ok(await federatls("ca", "renew", crt, key, *ca_flags(pki), "--out", out, "--force"))
    assert issued(pki, out, key, SVC).serial_number != first.serial_number


async def test_renew_with_wrong_root_is_a_tls_failure(
    ca: CAServer, pki: PKI, other: PKI, tmp_path: Path
) -> None:
    """The twin of renew: a --root that is not the CA's: TLS failure, CRT unchanged."""
    crt, key = await certificate(pki, tmp_path, "svc")
    original = crt.read_bytes()
    run = await federatls("ca", "renew", crt, key, "--ca-url", pki.url, "--root", other.root_path)
    assert_one_line_error(run, "TLS failure")
    assert crt.read_bytes() == original


async def test_renew_of_an_expired_certificate_says_so(
    pki: PKI, clock: FakeClock, tmp_path: Path
) -> None:
    """An expired CRT: one line saying it expired and how to get a new one, exit 1, CRT
    unchanged, instead of a handshake failure told as "cannot reach the CA". Twin:
    test_renew_over_mtls (a valid one renews)."""
    past = FakeClock()
    past.advance(-25 * 3600)  # a day's certificate, signed then, ended an hour ago
    key = new_private_key()
    async with serving(pki, past) as then:
        request = SignRequest(build_csr(key, SVC, [SVC]), pki.token(SVC, sans=[SVC]))
        chain = then.authority.sign(request, past())
    crt, key_path = tmp_path / "old.crt", tmp_path / "old.key"
    crt.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    original = crt.read_bytes()
    async with serving(pki, clock):
        run = await federatls("ca", "renew", crt, key_path, *ca_flags(pki))
    assert_one_line_error(run, f"{crt} expired on", "federatls ca certificate")
    assert "cannot reach" not in run.err
    assert crt.read_bytes() == original


# ca revoke ----------------------------------------------------------------------------------------
async def test_key_verbs_token_certificate_renew_revoke(
    any_ca: str, pki: PKI, tmp_path: Path
) -> None:
    """token → certificate → renew → revoke over mTLS; then renew fails (401) and a second
    revoke fails (400 already revoked)."""
    token = token_from(await federatls("ca", "token", SVC, *mint_flags(pki)))
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    assert_ok(await federatls("ca", "certificate", SVC, crt, key, "--token", token))
    assert_ok(await federatls("ca", "renew", crt, key, *ca_flags(pki)))
    serial = serial_of(crt)

    run = await federatls("ca", "revoke", serial, "--cert", crt, "--key", key, *ca_flags(pki))
    assert_ok(run)
    assert run.out == f"Certificate with serial number {serial} has been revoked.\n"

    renewed = crt.read_bytes()
    run = await federatls("ca", "renew", crt, key, *ca_flags(pki))
    assert_one_line_error(run, "401")
    assert crt.read_bytes() == renewed

    run = await federatls("ca", "revoke", serial, "--cert", crt, "--key", key, *ca_flags(pki))
    assert_one_line_error(run, "400", "already revoked")


async def test_revoke_by_minted_token(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """`ca revoke SERIAL --password-file` mints a revoke token; the cert can no longer renew
    (401) and a second revoke is refused (400)."""
    crt, key = await certificate(pki, tmp_path, "svc")
    serial = serial_of(crt)
    run = await federatls("ca", "revoke", serial, *mint_flags(pki), "--reason", "key lost")
    assert_ok(run)
    assert run.out == f"Certificate with serial number {serial} has been revoked.\n"

    assert_one_line_error(await federatls("ca", "renew", crt, key, *ca_flags(pki)), "401")
    run = await federatls("ca", "revoke", serial, *mint_flags(pki))
    assert_one_line_error(run, "400", "already revoked")


async def test_revoke_by_hex_serial(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """`ca revoke 0x...` (and `ca token 0x... --revoke`) send the serial in decimal, so the
    hex form works on step-ca 0.19 (which reads serials as text) and today's (which wants the
    token's sub in decimal); the certificate can no longer renew (401)."""
    crt, key = await certificate(pki, tmp_path, "svc")
    serial = serial_of(crt)
    token = token_from(
        await federatls("ca", "token", hex(int(serial)), *mint_flags(pki), "--revoke")
    )
    assert claims_of(token)["sub"] == serial
    run = await federatls("ca", "revoke", hex(int(serial)), *ca_flags(pki), "--token", token)
    assert_ok(run)
    assert run.out == f"Certificate with serial number {serial} has been revoked.\n"
    assert_one_line_error(await federatls("ca", "renew", crt, key, *ca_flags(pki)), "401")


async def test_revoke_token_from_ca_token(any_ca: str, pki: PKI, tmp_path: Path) -> None:
    """`ca token SERIAL --revoke` makes a revoke token (aud .../1.0/revoke) that `ca revoke
    --token` uses; a sign token is refused for revoking (401)."""
    crt, key = await certificate(pki, tmp_path, "svc")
    serial = serial_of(crt)

    sign_token = token_from(await federatls("ca", "token", serial, *mint_flags(pki)))
    run = await federatls("ca", "revoke", serial, *ca_flags(pki), "--token", sign_token)
    assert_one_line_error(run, "401")
    renewed = tmp_path / "renewed.crt"  # still renewable: not revoked
    assert_ok(await federatls("ca", "renew", crt, key, *ca_flags(pki), "--out", renewed))

    token = token_from(await federatls("ca", "token", serial, *mint_flags(pki), "--revoke"))
    claims = claims_of(token)
    assert claims["aud"] == pki.url + "/1.0/revoke"
    assert claims["sub"] == serial
    assert_ok(await federatls("ca", "revoke", serial, *ca_flags(pki), "--token", token))
    assert_one_line_error(await federatls("ca", "renew", crt, key, *ca_flags(pki)), "401")


# ca roots, ca federation, ca health -----------------------------------------------------------
def _fingerprints(pem: str | bytes) -> set[str]:
    return {fingerprint(c) for c in load_pem_certificates(pem)}


async def test_roots_and_federation_bundles(federated_ca: PKI, pki: PKI, tmp_path: Path) -> None:
    """`ca roots` is the CA's own root, `ca federation` its root plus the federated one; to
    stdout or to OUT."""
    other = federated_ca
    run = await federatls("ca", "roots", *ca_flags(pki))
    assert_ok(run)
    assert load_pem_certificates(run.out) == [pki.root]

    out = tmp_path / "roots.pem"
    run = await federatls("ca", "roots", out, *ca_flags(pki))
    assert_ok(run)
    assert run.out == f"The root certificate bundle has been saved in {out}.\n"
    assert load_pem_certificates(out.read_bytes()) == [pki.root]

    run = await federatls("ca", "federation", *ca_flags(pki))
    assert_ok(run)
    assert _fingerprints(run.out) == {pki.fingerprint, other.fingerprint}
    assert len(load_pem_certificates(run.out)) == 2

    out = tmp_path / "federation.pem"
    run = await federatls("ca", "federation", out, *ca_flags(pki))
    assert_ok(run)
    assert run.out == f"The federation certificate bundle has been saved in {out}.\n"
    assert _fingerprints(out.read_bytes()) == {pki.fingerprint, other.fingerprint}


async def test_federation_without_federated_roots(ca: CAServer, pki: PKI) -> None:
    """The twin: a CA federated with nobody answers `ca federation` with its own root only."""
    run = await federatls("ca", "federation", *ca_flags(pki))
    assert_ok(run)
    assert load_pem_certificates(run.out) == [pki.root]


async def test_bundle_out_refuses_to_overwrite(ca: CAServer, pki: PKI, tmp_path: Path) -> None:
    """An existing OUT without --force: exit 1, unchanged; with --force it is replaced."""
    for verb in ("roots", "federation"):
        out = tmp_path / f"{verb}.pem"
        out.write_text("mine\n")
        run = await federatls("ca", verb, out, *ca_flags(pki))
        assert_one_line_error(run, str(out), "already exists")
        assert out.read_text() == "mine\n"
        assert_ok(await federatls("ca", verb, out, *ca_flags(pki), "--force"))
        assert load_pem_certificates(out.read_bytes()) == [pki.root]


async def test_bundle_out_onto_a_directory(ca: CAServer, pki: PKI, tmp_path: Path) -> None:
    """OUT naming a directory, even with --force: exit 1 naming it (not a temporary file),
    and nothing left in it."""
    for verb in ("roots", "federation"):
        out = tmp_path / verb
        out.mkdir()
        run = await federatls("ca", verb, out, *ca_flags(pki), "--force")
        assert_one_line_error(run, str(out), "is a directory")
        assert list(out.iterdir()) == []
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{verb}.")] == []


async def test_bundles_with_wrong_root(ca: CAServer, pki: PKI, other: PKI) -> None:
    """A --root that is not the CA's: roots, federation and health fail with a TLS failure."""
    for verb in ("roots", "federation", "health"):
        run = await federatls("ca", verb, "--ca-url", pki.url, "--root", other.root_path)
        assert_one_line_error(run, "TLS failure")


async def test_health(any_ca: str, pki: PKI) -> None:
    """`ca health` prints ok."""
    run = await federatls("ca", "health", *ca_flags(pki))
    assert_ok(run)
    assert run.out == "ok\n"


# ca serve ---------------------------------------------------------------------------------------
async def test_serve_runs_a_ca_until_sigterm(pki: PKI, tmp_path: Path) -> None:
    """`ca serve` announces its URL, serves the CLI's requests, and exits 0 on SIGTERM."""
    port = free_port()
    pki.edit(lambda d: d.__setitem__("address", f"127.0.0.1:{port}"))
    pki.url = f"https://127.0.0.1:{port}"
    proc, line = await start_serving(pki)
    try:
        assert line == f"Serving HTTPS on {pki.url} (root fingerprint {pki.fingerprint})\n"
        run = await federatls("ca", "health", *ca_flags(pki))
        assert run.out == "ok\n"
        await certificate(pki, tmp_path, "svc")
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err
        said = (line.encode() + out + err).decode().lower()
        assert said.count("serving https on") == 1, said  # the ready line, once
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def test_serve_with_wrong_password(pki: PKI, tmp_path: Path) -> None:
    """The twin: a wrong password stops `ca serve` at once with one error line."""
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the password\n")
    run = await federatls("ca", "serve", pki.config, "--password-file", wrong)
    assert_one_line_error(run, "cannot decrypt intermediate key")


async def test_serve_on_a_busy_port(pki: PKI) -> None:
    """`ca serve` on a port someone else listens on: exit 1 with one line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        pki.edit(lambda d: d.__setitem__("address", f"127.0.0.1:{port}"))
        run = await federatls("ca", "serve", pki.config, "--password-file", pki.password_file)
    assert_one_line_error(run, "cannot listen on", str(port))


# ca init ----------------------------------------------------------------------------------------
async def test_init_creates_missing_parent_directories(tmp_path: Path) -> None:
    """`ca init --dir pki/cloud` without pki/: the parents are made, with mode 0700."""
    password = tmp_path / "pw.txt"
    password.write_text("a long CA password\n")
    target = tmp_path / "pki" / "deeper" / "cloud"
    run = await federatls(
        "ca",
        "init",
        "cloud",
        "--dir",
        target,
        "--address",
        "127.0.0.1:9000",
        "--password-file",
        password,
    )
    assert_ok(run)
    assert (target / "config" / "ca.json").is_file()
    for made in (tmp_path / "pki", tmp_path / "pki" / "deeper"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made


@pytest.mark.parametrize("below", ["cloud", "deeper/cloud"])
async def test_init_below_a_file_names_the_file(below: str, tmp_path: Path) -> None:
    """`ca init --dir pw.txt/cloud` (a file where a directory should be): exit 1 with one
    line saying that file is not a directory (not that it "does not exist"), nothing made."""
    password = tmp_path / "pw.txt"
    password.write_text("a long CA password\n")
    run = await federatls(
        "ca", "init", "cloud", "--dir", password / below, "--address", "127.0.0.1:9000",
        "--password-file", password,
    )  # fmt: skip
    assert_one_line_error(run, f"{password} is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pw.txt"]


async def test_init_leaves_existing_parent_modes_alone(tmp_path: Path) -> None:
    """Twin: an existing parent keeps its mode; a usage mistake makes no parent."""
    password = tmp_path / "pw.txt"
    password.write_text("a long CA password\n")
    parent = tmp_path / "pki"
    parent.mkdir(mode=0o755)
    parent.chmod(0o755)
    run = await federatls(
        "ca",
        "init",
        "cloud",
        "--dir",
        parent / "cloud",
        "--address",
        "127.0.0.1:9000",
        "--password-file",
        password,
    )
    assert_ok(run)
    assert stat.S_IMODE(parent.stat().st_mode) == 0o755
    run = await federatls(
        "ca",
        "init",
        "k8s",
        "--dir",
        tmp_path / "new" / "k8s",
        "--address",
        "127.0.0.1:9001",
        "--password-file",
        password,
        "--provisioner",
        "",
    )
    assert run.code == 2, run
    assert "--provisioner: a name cannot be empty" in run.err
    assert not (tmp_path / "new").exists()


async def test_demo_help_describes_the_demo() -> None:
    """`demo --help` says what the demo does, not only its usage."""
    run = await federatls("demo", "--help")
    assert_ok(run)
    description = run.out.split("\n\n")[1]
    assert "two CAs" in description, run.out
