"""Test harness: PKIs made at run time, federatls CAs and real step-ca processes on 127.0.0.1,
and helpers to mint ordinary and deliberately broken tokens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
import pytest
from cryptography import x509
from joserfc import jws

from federatls import RenewalPolicy
from federatls._client import CAClient
from federatls._jwk import ProvisionerKey
from federatls._keys import KeyType, PrivateKey, build_csr, new_private_key
from federatls._protocol import SignRequest, TimeDuration
from federatls._token import mint_token, revoke_audience, sign_audience
from federatls._x509 import load_pem_certificate
from federatls.ca import CAServer, init_pki

PASSWORD = b"correct horse battery staple"
# CA claims for certificates of 3 s (issue them with a 1 s backdate): the default policy
# renews them every ~2 s.
SHORT = {"minTLSCertDuration": "1s", "defaultTLSCertDuration": "3s", "maxTLSCertDuration": "1h"}
# The default renewal policy with retries and wake-ups scaled to certificates of seconds.
FAST = RenewalPolicy(
    first_retry=timedelta(milliseconds=200),
    max_retry=timedelta(seconds=1),
    recheck=timedelta(seconds=1),
)


class FakeClock:
    """Wall-clock time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PKI:
    """A CA's files, made by ``init_pki`` at run time, and its provisioner key."""

    name: str
    directory: Path
    config: Path
    root_path: Path
    root: x509.Certificate
    provisioner: str
    key: ProvisionerKey
    password_file: Path
    url: str = ""
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    @property
    def fingerprint(self) -> str:
        from federatls._x509 import fingerprint

        return fingerprint(self.root)

    def edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        data = json.loads(self.config.read_text())
        change(data)
        self.config.write_text(json.dumps(data, indent=2))

    def federate(self, *others: PKI) -> None:
        self.edit(lambda d: d.__setitem__("federatedRoots", [str(o.root_path) for o in others]))

    def set_claims(self, **claims: Any) -> None:
        def change(d: dict[str, Any]) -> None:
            d["authority"]["provisioners"][0]["claims"] = claims

        self.edit(change)

    def token(
        self,
        subject: str,
        *,
        sans: Sequence[str] = (),
        revoke: bool = False,
        now: datetime | None = None,
        validity: timedelta = timedelta(minutes=5),
    ) -> str:
        aud = revoke_audience(self.url) if revoke else sign_audience(self.url)
        return mint_token(
            self.key,
            issuer=self.provisioner,
            subject=subject,
            audience=aud,
            now=now or self.clock(),
            sans=sans,
            root_fingerprint=self.fingerprint,
            validity=validity,
        )

    def claims(self, subject: str, **overrides: Any) -> dict[str, Any]:
        """The claims ``step ca token`` would put in a sign token, with overrides."""
        now = int(self.clock().timestamp())
        claims: dict[str, Any] = {
            "aud": sign_audience(self.url),
            "exp": now + 300,
            "iat": now,
            "iss": self.provisioner,
            "jti": secrets.token_hex(32),
            "nbf": now,
            "sans": [subject],
            "sha": self.fingerprint,
            "sub": subject,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def forge(
        self, claims: dict[str, Any], *, key: ProvisionerKey | None = None, kid: str | None = None
    ) -> str:
        """A token with exactly these claims, signed by ``key`` (the provisioner's by default)
        under header ``kid`` (the provisioner's by default)."""
        signer = key or self.key
        header = {"alg": "ES256", "kid": kid or self.key.kid, "typ": "JWT"}
        return jws.serialize_compact(header, json.dumps(claims), signer.key, algorithms=["ES256"])

    def client(
        self, identity: tuple[Sequence[x509.Certificate], PrivateKey] | None = None
    ) -> CAClient:
        return CAClient(self.url, [self.root], identity=identity)

    async def enroll(
        self,
        subject: str,
        *,
        sans: Sequence[str] = (),
        kind: KeyType = KeyType.P256,
        not_after: str | None = None,
    ) -> tuple[list[x509.Certificate], PrivateKey]:
        key = new_private_key(kind)
        names = list(sans) or [subject]
        request = SignRequest(
            build_csr(key, subject, names),
            self.token(subject, sans=names),
            not_after=TimeDuration.parse(not_after),
        )
        async with self.client() as ca:
            answer = await ca.sign(request)
        return list(answer.chain), key


def make_pki(
    base: Path,
    name: str,
    *,
    address: str = "127.0.0.1:0",
    dns: Sequence[str] = ("127.0.0.1", "localhost"),
    name_constraints: x509.NameConstraints | None = None,
    now: datetime | None = None,
) -> PKI:
    """A PKI made by ``init_pki``; ``now``: when its root and intermediate begin (default:
    now)."""
    result = init_pki(
        name,
        base / name,
        address=address,
        password=PASSWORD,
        now=now or datetime.now(UTC),
        dns_names=list(dns),
        name_constraints=name_constraints,
    )
    data = json.loads(result.config.read_text())
    prov = data["authority"]["provisioners"][0]
    password_file = base / f"{name}.password"
    password_file.write_bytes(PASSWORD + b"\n")
    return PKI(
        name=name,
        directory=result.directory,
        config=result.config,
        root_path=result.root,
        root=load_pem_certificate(result.root.read_bytes()),
        provisioner=prov["name"],
        key=ProvisionerKey.decrypt(prov["encryptedKey"], PASSWORD),
        password_file=password_file,
    )


@contextlib.asynccontextmanager
async def serving(pki: PKI, clock: FakeClock | None = None) -> AsyncIterator[CAServer]:
    """Run a federatls CA for ``pki`` in this event loop; ``pki.url`` points at it."""
    kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
    async with CAServer.running(pki.config, PASSWORD, **kwargs) as server:
        pki.url = server.url
        if clock is not None:
            pki.clock = clock
        yield server


# The real step-ca ----------------------------------------------------------------------------
def stepca_binary() -> str | None:
    """The step-ca binary from FEDERATLS_STEPCA or the default build place, if present."""
    for candidate in (os.environ.get("FEDERATLS_STEPCA"), "/var/tmp/stepca-build/bin/step-ca"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("step-ca")


@contextlib.contextmanager
def stepca_process(binary: str, pki: PKI) -> Iterator[subprocess.Popen[bytes]]:
    """Run the real step-ca on ``pki`` (on a free loopback port) until the block ends."""
    port = free_port()
    pki.edit(lambda d: d.__setitem__("address", f"127.0.0.1:{port}"))
    log = (pki.directory / "step-ca.log").open("wb")
    proc = subprocess.Popen(
        [binary, str(pki.config), "--password-file", str(pki.password_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    pki.url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError("step-ca exited: " + (pki.directory / "step-ca.log").read_text())
            try:
                r = httpx.get(pki.url + "/health", verify=False, timeout=1)  # noqa: S501
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("step-ca did not become healthy in 30 s")
            time.sleep(0.1)
        time.sleep(1.0)  # step-ca compares token iat with its start second
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def go_build(program: str, out: Path, *, debian_sources: bool = False) -> Path:
    """Build ``tests/<program>/main.go`` as ``build.sh`` builds step-ca (GOPATH mode, offline,
    ``-trimpath``), with step-ca's build cache, so that a build takes seconds.
    ``debian_sources`` adds the Go sources of Debian's packages (step's SDK among them) to
    the import path. No Go toolchain skips, or fails when FEDERATLS_REQUIRE_STEPCA=1."""
    go = shutil.which("go")
    if go is None:
        message = "no Go toolchain: bash ../shared/tools/stepca/build.sh installs one"
        if os.environ.get("FEDERATLS_REQUIRE_STEPCA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    stepca = stepca_binary()
    cache = Path(stepca).resolve().parents[1] / "gocache" if stepca else None
    gopath = [str(out / "gopath")] + (["/usr/share/gocode"] if debian_sources else [])
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOPATH": os.pathsep.join(gopath),
        "GOCACHE": str(cache if cache is not None and cache.is_dir() else out / "gocache"),
    }
    binary = out / program
    source = Path(__file__).parent / program / "main.go"
    # stderr is captured: Debian's sources print cgo warnings even when the build succeeds.
    built = subprocess.run(
        [go, "build", "-trimpath", "-o", str(binary), str(source)],
        env=env,
        capture_output=True,
        check=False,
        timeout=900,
    )
    if built.returncode != 0:
        raise RuntimeError(f"go build {program} failed:\n{built.stderr.decode()}")
    return binary


def stepca_log(pki: PKI) -> str:
    return (pki.directory / "step-ca.log").read_text(errors="replace")


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


# Running the command line ----------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """What a finished ``federatls`` process left: exit status, stdout and stderr."""

    code: int
    out: str
    err: str


async def federatls(*args: str | Path, cwd: Path | None = None) -> Run:
    """Run ``python -m federatls ARGS`` as a real subprocess; the event loop keeps serving any
    in-process CA meanwhile. stdin is not a terminal, so nothing can prompt."""
    result = await anyio.run_process(
        [sys.executable, "-m", "federatls", *map(str, args)],
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    return Run(result.returncode, result.stdout.decode(), result.stderr.decode())


def assert_one_line_error(run: Run, *fragments: str) -> str:
    """Exit 1, nothing on stdout, exactly one ``federatls: error:`` line naming ``fragments``."""
    assert run.code == 1, run
    assert run.out == "", run
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("federatls: error: "), run.err
    for fragment in fragments:
        assert fragment in lines[0], run.err
    return lines[0]


def use_postgres(pki: PKI, url: str) -> None:
    """Point ca.json's db block at ``url`` the way step-ca's docs write it: the server in
    ``dataSource`` (ending in "/"), the database's name in ``database``."""
    parts = urlsplit(url)
    source = urlunsplit((parts.scheme, parts.netloc, "/", "", ""))
    block = {"type": "postgresql", "dataSource": source, "database": parts.path.lstrip("/")}
    pki.edit(lambda d: d.__setitem__("db", block))


async def spawn_serve(
    pki: PKI, *extra: str, stderr: Any = subprocess.PIPE, **options: Any
) -> asyncio.subprocess.Process:
    """``federatls ca serve`` on ``pki`` (its password file) with ``extra`` arguments, as a
    subprocess: no standard input, standard output piped (the ready line), ``stderr`` as
    given; ``options`` go to ``create_subprocess_exec``."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "federatls",
        "ca",
        "serve",
        str(pki.config),
        "--password-file",
        str(pki.password_file),
        *extra,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        **options,
    )


async def start_serving(pki: PKI) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``federatls ca serve`` on ``pki`` as a subprocess; returns it and the first line
    it printed (``Serving HTTPS on URL ...`` once it serves)."""
    proc = await spawn_serve(pki)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    return proc, line


def pem_begin(label: str) -> bytes:
    """``b"-----BEGIN <label>-----"``, spelled out of parts so that scanners looking for
    committed private keys do not mistake the tests' expectations for keys."""
    return b"-----BEGIN " + label.encode() + b"-----"
