"""Sign throughput of the federatls CA against the real step-ca: same client, same machine,
one run.

What is measured
----------------
For each CA and each concurrency level (1, 8 and 64 clients by default): certificates issued
per second and the p50/p99 latency of ``POST /1.0/sign``. Every request is what a
bootstrapping client does: a new TCP connection, a full TLS handshake (no session
resumption), one HTTP/1.1 request ``{"csr": ..., "ott": ...}`` sent with
``Connection: close``, the whole response read, status 201 checked, the connection closed.
Latency runs from the connect call to the last byte of the response. Alongside: the CPU
time used by the CA process, by the load-generating processes and by the whole machine
during each timed window, so a reader can see who had the cores.

Both CAs get the same treatment: a fresh PKI from ``federatls.ca.init_pki`` in a temporary
directory (P-256 root and intermediate, one JWK provisioner, one ca.json that both run), each
CA in its own process (``step-ca ca.json`` and ``python -m federatls ca serve ca.json``), and
the same client code drives both. Tokens (exactly what ``step ca token`` mints, one per
request since they are one-time) and CSRs (a fresh P-256 key per request) are made before the
timed phase, so while the clock runs the client does nothing but TCP, TLS and HTTP.
Each level is measured in rounds (five by default) that alternate the two CAs, step-ca
first in one round and federatls first in the next, each getting an equal slice of the
duration. A shared machine's speed drifts by tens of percent over a minute; alternating short
slices gives both CAs the same drift, and the per-round ratios printed beside the overall
one show how steady the run was.

``--postgres`` adds two CAs to the same run: the federatls CA on a throwaway PostgreSQL
server (``tests/postgres.py``), with one process, and with two processes (replicas of one
ca.json, same keys, same database) that the client sends its requests to in turn. The
database server's CPU is counted apart. ``--pinned`` measures per-core efficiency: every CA
process on core 0 (step-ca with ``GOMAXPROCS=1``), the load client on core 1.

What is not measured
--------------------
* Other endpoints (renew, revoke, roots), HTTP keep-alive, TLS resumption, HTTP/2.
* Network latency (everything is on 127.0.0.1) and the client side of enrolment (key
  generation, token minting, certificate parsing).
* CA start-up time.
* Anything about correctness beyond "201 with a certificate in the body" (the test suite
  covers that); one request per CA is checked more closely before the timed phases.

Run ``python bench/sign_throughput.py --help``; bench/README.md explains how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import federatls
from federatls._jwk import ProvisionerKey
from federatls._keys import build_csr, new_private_key
from federatls._token import mint_token, sign_audience
from federatls.ca import init_pki

PASSWORD = b"bench password, thrown away with the temporary directory"
DEFAULT_STEPCA = "/var/tmp/stepca-build/bin/step-ca"  # noqa: S108 (where build.sh puts it)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUEST_TIMEOUT = 30.0  # seconds; a request slower than this counts as an error
MAX_ERROR_SAMPLES = 5  # error messages kept per run (the count is always complete)


def write_results(name: str, report: object, started: datetime, path: Path | None) -> Path:
    """Write a benchmark's ``report`` as JSON to ``path``, or to results/NAME-TIME.json."""
    out = path or RESULTS_DIR / f"{name}-{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {out}")
    return out


# --- The CAs under test --------------------------------------------------------------------
@dataclass
class CA:
    """A running CA: where it listens, what the client trusts, how to mint its tokens."""

    name: str
    directory: Path
    host: str
    port: int
    root_pem: bytes
    root_fingerprint: str
    provisioner: str
    key: ProvisionerKey
    command: list[str] = field(default_factory=list)  # how to start it
    process: subprocess.Popen[bytes] | None = None
    version: str = ""
    tls: str = ""  # negotiated TLS version and cipher, for the report
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    # More processes of the same CA (same keys, same database), each on its own port; the
    # client sends its requests to all of them in turn (round-robin).
    replicas: list[CA] = field(default_factory=list)
    database: str = ""  # where its records go, for the report
    database_pid: int = 0  # the PostgreSQL server's postmaster, whose CPU is counted apart

    @property
    def ports(self) -> list[int]:
        return [self.port, *(r.port for r in self.replicas)]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self.process, *(r.process for r in self.replicas)) if p]

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def config(self) -> Path:
        return self.directory / "config" / "ca.json"

    @property
    def password(self) -> Path:
        return self.directory / "password"


def find_stepca(path: str) -> str | None:
    """The step-ca executable ``--stepca`` names (a path or a name on PATH); None, after a
    one-line message, if there is none."""
    stepca = shutil.which(path) or path
    if not os.access(stepca, os.X_OK):
        print(f"step-ca not found at {stepca}: build it or pass --stepca", file=sys.stderr)
        return None
    return stepca


def free_port() -> int:
    """A loopback port nobody listens on right now (step-ca needs a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_pki(base: Path, name: str) -> CA:
    """A fresh PKI for one CA, listening on a fixed free loopback port."""
    port = free_port()
    result = init_pki(
        name,
        base / name,
        address=f"127.0.0.1:{port}",
        password=PASSWORD,
        now=datetime.now(UTC),
        dns_names=["127.0.0.1", "localhost"],
    )
    (result.directory / "password").write_bytes(PASSWORD + b"\n")
    provisioner = json.loads(result.config.read_text())["authority"]["provisioners"][0]
    return CA(
        name=name,
        directory=result.directory,
        host="127.0.0.1",
        port=port,
        root_pem=result.root.read_bytes(),
        root_fingerprint=result.root_fingerprint,
        provisioner=provisioner["name"],
        key=ProvisionerKey.decrypt(provisioner["encryptedKey"], PASSWORD),
    )


def client_context(root_pem: bytes) -> ssl.SSLContext:
    """What a bootstrapping client uses: trust only the CA's root, check the host name
    (127.0.0.1 is an IP SAN of the CA's certificate), HTTP/1.1, no session reuse (Python
    only resumes a session when one is passed in explicitly, and we never do)."""
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@contextlib.contextmanager
def running(ca: CA) -> Iterator[CA]:
    """Start the CA (``ca.command``, and its replicas) with its output in a log file; wait
    until /health answers on each."""
    with contextlib.ExitStack() as stack:
        for replica in ca.replicas:
            stack.enter_context(_running_one(replica))
        yield stack.enter_context(_running_one(ca))


@contextlib.contextmanager
def _running_one(ca: CA) -> Iterator[CA]:
    log = (ca.directory / "ca.log").open("wb")
    env = {**os.environ, **ca.env}
    ca.process = subprocess.Popen(ca.command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        ctx = client_context(ca.root_pem)
        deadline = time.monotonic() + 60
        while True:
            if ca.process.poll() is not None:
                raise RuntimeError(f"{ca.name} exited: {(ca.directory / 'ca.log').read_text()}")
            try:
                if httpx.get(ca.url + "/health", verify=ctx, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ca.name} did not answer /health within 60 s")
            time.sleep(0.1)
        ca.version = httpx.get(ca.url + "/version", verify=ctx).json().get("version", "")
        # step-ca refuses tokens issued (iat, whole seconds) before the second it started.
        time.sleep(1.1)
        yield ca
    finally:
        ca.process.terminate()
        try:
            ca.process.wait(10)
        except subprocess.TimeoutExpired:
            ca.process.kill()
            ca.process.wait()
        log.close()


def check_one_sign(ca: CA) -> None:
    """Before measuring: one sign request through httpx, the answer parsed as certificates,
    and the TLS parameters the benchmark connections will negotiate."""
    key = new_private_key()
    subject = "check.bench.internal"
    body = {
        "csr": build_csr(key, subject, [subject]).public_bytes(serialization.Encoding.PEM).decode(),
        "ott": token_for(ca, subject),
    }
    answer = httpx.post(
        ca.url + "/1.0/sign", json=body, verify=client_context(ca.root_pem), timeout=10
    )
    if answer.status_code != 201:
        raise RuntimeError(f"{ca.name}: sign returned {answer.status_code}: {answer.text}")
    leaf = x509.load_pem_x509_certificate(answer.json()["crt"].encode())
    if leaf.public_key() != key.public_key():
        raise RuntimeError(f"{ca.name}: the certificate is not for the CSR's key")
    with (
        socket.create_connection((ca.host, ca.port)) as raw,
        client_context(ca.root_pem).wrap_socket(raw, server_hostname=ca.host) as tls,
    ):
        cipher = tls.cipher()
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    assert cipher is not None
    server_key = x509.load_der_x509_certificate(der).public_key()
    kind = (
        server_key.curve.name
        if isinstance(server_key, ec.EllipticCurvePublicKey)
        else type(server_key).__name__
    )
    ca.tls = f"{cipher[1]} {cipher[0]}, server key {kind}"


# --- The workload: one prepared HTTP request per certificate ---------------------------------
def token_for(ca: CA, subject: str) -> str:
    """A one-time token for ``subject``, exactly as ``step ca token`` makes it."""
    return mint_token(
        ca.key,
        issuer=ca.provisioner,
        subject=subject,
        audience=sign_audience(ca.url),
        now=datetime.now(UTC),
        sans=[subject],
        root_fingerprint=ca.root_fingerprint,
    )


def prepare_requests(ca: CA, count: int) -> list[bytes]:
    """``count`` complete HTTP requests, each with its own key, CSR and one-time token.

    Tokens are valid five minutes from now, so prepare just before using them."""
    requests = []
    for i in range(count):
        subject = f"w{i}.bench.internal"
        csr = build_csr(new_private_key(), subject, [subject])
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        body = json.dumps({"csr": pem, "ott": token_for(ca, subject)}).encode()
        head = (
            f"POST /1.0/sign HTTP/1.1\r\nHost: {ca.host}:{ca.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        requests.append(head + body)
    return requests


# --- The client (runs in the load-generator processes) ---------------------------------------
@dataclass
class LoadJob:
    """One load generator's share of a run. Times are ``time.monotonic()``, which on Linux is
    one clock for all processes."""

    host: str
    ports: list[int]  # one per replica: request number ``i`` goes to ``ports[i % len]``
    root_pem: bytes
    concurrency: int
    requests: list[bytes]
    start_at: float
    stop_at: float  # no new request after this (math.inf: until ``requests`` run out)


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    last_end: float = 0.0
    cpu_seconds: float = 0.0  # this load generator's user+system CPU in the window
    ran_out: bool = False  # the prepared requests ended before stop_at


async def sign_once(host: str, port: int, ctx: ssl.SSLContext, request: bytes) -> bytes:
    """One certificate, as a bootstrapping client gets it: connect, TLS handshake, POST,
    read until the server closes. Returns the raw response (status line onwards)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    try:
        writer.write(request)
        return await reader.read()  # to EOF: we asked for Connection: close
    finally:
        writer.close()


async def _run_load(job: LoadJob) -> LoadResult:
    ctx = client_context(job.root_pem)
    pending = enumerate(job.requests)
    result = LoadResult()

    async def client() -> None:
        for i, request in pending:  # shared iterator: each request is sent once
            if time.monotonic() >= job.stop_at:
                return
            port = job.ports[i % len(job.ports)]
            started = time.monotonic()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    response = await sign_once(job.host, port, ctx, request)
                ok = response.startswith(b"HTTP/1.1 201 ") and b'"crt"' in response
                problem = "" if ok else response[:300].decode(errors="replace")
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            ended = time.monotonic()
            result.last_end = max(result.last_end, ended)
            if problem:
                result.errors += 1
                if len(result.error_samples) < MAX_ERROR_SAMPLES:
                    result.error_samples.append(problem)
            else:
                result.latencies.append(ended - started)
        result.ran_out = time.monotonic() < job.stop_at

    await asyncio.sleep(max(0.0, job.start_at - time.monotonic()))
    cpu_before = time.process_time()
    await asyncio.gather(*(client() for _ in range(job.concurrency)))
    result.cpu_seconds = time.process_time() - cpu_before
    return result


def run_load(job: LoadJob) -> LoadResult:
    """Entry point of a load-generator process."""
    return asyncio.run(_run_load(job))


def pin_client() -> None:
    """Initializer of the load-generator processes under ``--pinned``: core 1 only (the
    CAs have core 0)."""
    os.sched_setaffinity(0, {1})


# --- CPU accounting from /proc ------------------------------------------------------------
def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and of each of its children (a PostgreSQL server: the
    postmaster and its backends), by pid."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # field 4 of proc(5): ppid
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy, summed over all cores (/proc/stat:
    user, nice, system, irq and softirq; not idle, iowait or steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = values
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


# --- PostgreSQL: the federatls CA with one replica and two --------------------------------
def set_database(config: Path, url: str) -> None:
    """Point a ca.json at a PostgreSQL database, in the ``db`` block step-ca writes
    (``dataSource`` the server, ``database`` the name)."""
    parts = urllib.parse.urlsplit(url)
    server = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/", parts.query, ""))
    data = json.loads(config.read_text())
    data["db"] = {"type": "postgresql", "dataSource": server, "database": parts.path.lstrip("/")}
    config.write_text(json.dumps(data, indent=2) + "\n")


def add_replica(ca: CA, directory: Path) -> CA:
    """Another process of ``ca``: a copy of its ca.json (same keys, same database) that
    listens on a port of its own."""
    port = free_port()
    config = directory / "config" / "ca.json"
    config.parent.mkdir(parents=True)
    data = json.loads(ca.config.read_text())
    data["address"] = f"127.0.0.1:{port}"
    config.write_text(json.dumps(data, indent=2) + "\n")
    shutil.copy(ca.password, directory / "password")
    replica = CA(
        name=f"{ca.name} replica {len(ca.replicas) + 2}",
        directory=directory,
        host=ca.host,
        port=port,
        root_pem=ca.root_pem,
        root_fingerprint=ca.root_fingerprint,
        provisioner=ca.provisioner,
        key=ca.key,
    )
    ca.replicas.append(replica)
    return replica


def federatls_command(ca: CA, pinned: bool) -> list[str]:
    command = [sys.executable, "-m", "federatls", "ca", "serve", str(ca.config)]
    command += ["--password-file", str(ca.password)]
    return ["taskset", "-c", "0", *command] if pinned else command


def postgres_cas(base: Path, new_database: Callable[[], str]) -> list[CA]:
    """Two federatls CAs on PostgreSQL, each on a fresh database whose schema
    ``federatls ca db init`` made: one process, and two processes behind the client."""
    cas = []
    for name, processes in (("federatls-pg", 1), ("federatls-pg-x2", 2)):
        ca = make_pki(base, name)
        url = new_database()
        set_database(ca.config, url)
        init = [sys.executable, "-m", "federatls", "ca", "db", "init", str(ca.config)]
        subprocess.run(init, check=True, capture_output=True)
        for k in range(1, processes):
            add_replica(ca, base / f"{name}-{k + 1}")
        ca.database = f"PostgreSQL, {processes} process(es)"
        cas.append(ca)
    return cas


@contextlib.contextmanager
def postgres_cluster() -> Iterator[tuple[int, Callable[[], str]]]:
    """A throwaway PostgreSQL server (the test suite's ``tests/postgres.py``): its
    postmaster's pid and a function that makes a fresh database and returns its URL."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from postgres import PostgresCluster, PostgresUnavailable, find_bindir

    try:
        find_bindir()
    except PostgresUnavailable as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from exc
    with PostgresCluster.started() as cluster:
        pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
        yield pid, cluster.new_database


# --- One measurement: one CA, one concurrency level -----------------------------------------
@dataclass
class LevelResult:
    ca: str
    concurrency: int
    requests: int  # successful ones
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu: float  # CPU seconds / wall seconds: 1.0 = one core busy (all its processes)
    client_cpu: float  # the load-generator processes together
    db_cpu: float  # the PostgreSQL server (0 for the others)
    other_cpu: float  # the rest of the machine: kernel networking, other users' work
    server_ms_per_cert: float  # CA CPU milliseconds per certificate: the least noisy figure
    db_ms_per_cert: float  # the PostgreSQL server's CPU milliseconds per certificate
    ran_out: bool
    error_samples: list[str]
    round_rps: list[float]  # cert/s in each round, in order


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; NaN if it is empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Settings:
    levels: tuple[int, ...]
    duration: float
    requests: int  # per level; 0 = run for ``duration``
    warmup: int
    client_processes: int
    rounds: int = 5  # alternating slices per level
    postgres: bool = False  # add the CA on PostgreSQL, one process and two
    pinned: bool = False  # every CA on core 0 (step-ca with GOMAXPROCS=1), the client on 1


@dataclass
class LoadRun:
    """What the load processes reported, and the CPU the CA and the machine used meanwhile."""

    results: list[LoadResult]
    start: float
    server_cpu: float  # seconds
    machine_busy: float  # seconds, all cores
    db_cpu: float = 0.0  # seconds, the PostgreSQL server's processes

    @property
    def seconds(self) -> float:
        return max(r.last_end for r in self.results) - self.start

    @property
    def latencies(self) -> list[float]:
        return sorted(x for r in self.results for x in r.latencies)


def generate_load(
    pool: concurrent.futures.Executor,
    ca: CA,
    concurrency: int,
    requests: list[bytes],
    seconds: float,
    processes: int,
) -> LoadRun:
    """Send prepared requests with ``concurrency`` clients spread over the load processes,
    for ``seconds`` or until the requests run out."""
    processes = min(processes, concurrency)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    cuts = [len(requests) * sum(shares[:i]) // concurrency for i in range(processes + 1)]
    start_at = time.monotonic() + 0.5  # every process starts the clock together
    jobs = [
        LoadJob(
            ca.host,
            ca.ports,
            ca.root_pem,
            shares[i],
            requests[cuts[i] : cuts[i + 1]],
            start_at,
            start_at + seconds,
        )
        for i in range(processes)
    ]
    futures = [pool.submit(run_load, job) for job in jobs]
    while time.monotonic() < start_at:
        time.sleep(0.001)
    server_before = sum(process_cpu_seconds(pid) for pid in ca.pids)
    db_before = tree_cpu_seconds(ca.database_pid) if ca.database_pid else {}
    busy_before = machine_busy_seconds()
    results = [f.result() for f in futures]
    server = sum(process_cpu_seconds(pid) for pid in ca.pids) - server_before
    db_after = tree_cpu_seconds(ca.database_pid) if ca.database_pid else {}
    busy = machine_busy_seconds() - busy_before
    db = sum(cpu - db_before.get(pid, 0.0) for pid, cpu in db_after.items())
    return LoadRun(results, start_at, server, busy, db)


def measure(
    pool: concurrent.futures.Executor,
    ca: CA,
    concurrency: int,
    settings: Settings,
    *,
    seconds: float,
    requests: int,
) -> tuple[LoadRun, bool]:
    """Warm up, then load one CA at one concurrency level for ``seconds`` (or ``requests``
    requests when that is not 0). Returns the run and whether it ran out of prepared requests
    before the time was up."""
    procs = settings.client_processes
    warmup = prepare_requests(ca, max(settings.warmup, 4 * concurrency))
    warm = generate_load(pool, ca, concurrency, warmup, math.inf, procs)
    if any(r.errors for r in warm.results):
        samples = [s for r in warm.results for s in r.error_samples]
        raise RuntimeError(f"{ca.name} failed during warm-up: {samples}")
    if requests:
        count, seconds = requests, math.inf
    else:  # enough requests for twice the warm-up rate; flagged if they still run out
        warm_rate = len(warm.latencies) / warm.seconds
        count = math.ceil(2 * warm_rate * seconds) + 4 * concurrency
    run = generate_load(pool, ca, concurrency, prepare_requests(ca, count), seconds, procs)
    return run, requests == 0 and any(r.ran_out for r in run.results)


def summarise(ca: CA, concurrency: int, runs: Sequence[tuple[LoadRun, bool]]) -> LevelResult:
    """One CA at one level over all its rounds: rates over the summed windows, percentiles
    over every latency."""
    window = sum(run.seconds for run, _ in runs)
    latencies = sorted(x for run, _ in runs for x in run.latencies)
    server = sum(run.server_cpu for run, _ in runs)
    client = sum(r.cpu_seconds for run, _ in runs for r in run.results)
    db = sum(run.db_cpu for run, _ in runs)
    busy = sum(run.machine_busy for run, _ in runs)
    samples = [s for run, _ in runs for r in run.results for s in r.error_samples]
    return LevelResult(
        ca=ca.name,
        concurrency=concurrency,
        requests=len(latencies),
        errors=sum(r.errors for run, _ in runs for r in run.results),
        seconds=window,
        rps=len(latencies) / window,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        server_cpu=server / window,
        client_cpu=client / window,
        db_cpu=db / window,
        other_cpu=max(0.0, busy - server - client - db) / window,
        server_ms_per_cert=server / max(1, len(latencies)) * 1000,
        db_ms_per_cert=db / max(1, len(latencies)) * 1000,
        ran_out=any(ran_out for _, ran_out in runs),
        error_samples=samples[:MAX_ERROR_SAMPLES],
        round_rps=[len(run.latencies) / run.seconds for run, _ in runs],
    )


# --- Report ---------------------------------------------------------------------------------
def print_table(title: str, rows: Sequence[LevelResult]) -> None:
    print(f"\n{title}")
    print(
        f"{'clients':>7} {'cert/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'requests':>8} {'CA cpu':>6} {'client':>6} {'db':>6} {'other':>6} "
        f"{'CA ms/cert':>10} {'db ms/cert':>10}"
    )
    for r in rows:
        note = "  (ran out of prepared requests early)" if r.ran_out else ""
        print(
            f"{r.concurrency:>7} {r.rps:>8.1f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} {r.errors:>6} "
            f"{r.requests:>8} {r.server_cpu:>6.0%} {r.client_cpu:>6.0%} {r.db_cpu:>6.0%} "
            f"{r.other_cpu:>6.0%} {r.server_ms_per_cert:>10.2f} {r.db_ms_per_cert:>10.2f}{note}"
        )


def ratios(ours: Sequence[LevelResult], theirs: Sequence[LevelResult]) -> list[dict[str, Any]]:
    return [
        {
            "concurrency": a.concurrency,
            "throughput": a.rps / b.rps,
            "throughput_per_round": [x / y for x, y in zip(a.round_rps, b.round_rps, strict=True)],
            "p50": a.p50_ms / b.p50_ms,
            "p99": a.p99_ms / b.p99_ms,
            "ca_cpu_per_cert": a.server_ms_per_cert / b.server_ms_per_cert,
            "ca_and_db_cpu_per_cert": (a.server_ms_per_cert + a.db_ms_per_cert)
            / (b.server_ms_per_cert + b.db_ms_per_cert),
        }
        for a, b in zip(ours, theirs, strict=True)
    ]


def print_ratios(name: str, rows: Sequence[dict[str, Any]]) -> None:
    print(f"\n{name} / step-ca: cert/s above 1 and the others below 1 favour {name}")
    print(
        f"{'clients':>7} {'cert/s':>8} {'p50':>7} {'p99':>7} {'CA ms/cert':>10} {'+db':>7}"
        "  cert/s in each round"
    )
    for r in rows:
        rounds = " ".join(f"{x:.2f}" for x in r["throughput_per_round"])
        print(
            f"{r['concurrency']:>7} {r['throughput']:>7.2f}x {r['p50']:>6.2f}x {r['p99']:>6.2f}x "
            f"{r['ca_cpu_per_cert']:>9.2f}x {r['ca_and_db_cpu_per_cert']:>6.2f}x  {rounds}"
        )


def filesystem_of(path: Path) -> str:
    """The file-system type holding ``path`` (both CAs' databases live there)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        mount, fs = line.split()[1:3]
        inside = (str(path.resolve()) + "/").startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fs
    return kind


# --- Main -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--levels", default="1,8,64", help="concurrent clients, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per level and CA")
    p.add_argument("--rounds", type=int, default=5, help="alternating slices per level (default 5)")
    p.add_argument(
        "--requests", type=int, default=0, help="requests per level and CA instead of --duration"
    )
    p.add_argument("--warmup", type=int, default=100, help="warm-up requests (at least 4/client)")
    p.add_argument(
        "--client-processes", type=int, default=1, help="load-generator processes (default 1)"
    )
    p.add_argument(
        "--postgres",
        action="store_true",
        help="add the federatls CA on PostgreSQL: one process, and two behind the client",
    )
    p.add_argument(
        "--pinned",
        action="store_true",
        help="per-core efficiency: every CA on core 0 (step-ca with GOMAXPROCS=1), "
        "the load client on core 1",
    )
    p.add_argument(
        "--stepca",
        default=os.environ.get("FEDERATLS_STEPCA", DEFAULT_STEPCA),
        help=f"step-ca binary (default $FEDERATLS_STEPCA or {DEFAULT_STEPCA})",
    )
    p.add_argument("--workdir", type=Path, help="where the temporary PKIs go (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the PKIs and CA logs")
    p.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    return p.parse_args(argv)


def run_benchmark(
    settings: Settings, stepca: str, base: Path
) -> tuple[list[CA], dict[str, list[LevelResult]]]:
    """Start the CAs on fresh PKIs under ``base`` and measure them level by level, in
    rounds that rotate the order of the CAs."""
    with contextlib.ExitStack() as stack:
        real, ours = make_pki(base, "step-ca"), make_pki(base, "federatls")
        real.command = [stepca, str(real.config), "--password-file", str(real.password)]
        ours.database = "SQLite"
        cas = [real, ours]
        if settings.postgres:
            pid, new_database = stack.enter_context(postgres_cluster())
            for ca in postgres_cas(base, new_database):
                ca.database_pid = pid
                cas.append(ca)
        for ca in cas[1:]:
            for process in (ca, *ca.replicas):
                process.command = federatls_command(process, settings.pinned)
        if settings.pinned:
            real.command = ["taskset", "-c", "0", *real.command]
            real.env["GOMAXPROCS"] = "1"
        for ca in cas:
            stack.enter_context(running(ca))
        spawn = multiprocessing.get_context("spawn")
        pool = stack.enter_context(
            concurrent.futures.ProcessPoolExecutor(
                settings.client_processes,
                spawn,
                initializer=pin_client if settings.pinned else None,
            )
        )
        return cas, measure_levels(pool, cas, settings)
    raise AssertionError("unreachable")  # mypy: ExitStack may swallow exceptions


def measure_levels(
    pool: concurrent.futures.Executor, cas: Sequence[CA], settings: Settings
) -> dict[str, list[LevelResult]]:
    for ca in cas:
        check_one_sign(ca)
        print(f"{ca.name} {ca.version} at {' '.join(map(str, ca.ports))}, {ca.tls}", flush=True)
    results: dict[str, list[LevelResult]] = {ca.name: [] for ca in cas}
    rounds = settings.rounds
    seconds = settings.duration / rounds
    requests = math.ceil(settings.requests / rounds) if settings.requests else 0
    for concurrency in settings.levels:
        runs: dict[str, list[tuple[LoadRun, bool]]] = {ca.name: [] for ca in cas}
        print(f"  {concurrency} client(s), {rounds} rounds:", end="", flush=True)
        for i in range(rounds):
            # Each CA goes first in turn; with two CAs this is A B, B A, A B, ...
            order = list(cas[i % len(cas) :]) + list(cas[: i % len(cas)])
            for ca in order if i % 2 == 0 or len(cas) > 2 else reversed(order):
                runs[ca.name].append(
                    measure(pool, ca, concurrency, settings, seconds=seconds, requests=requests)
                )
            print(".", end="", flush=True)
        for ca in cas:
            row = summarise(ca, concurrency, runs[ca.name])
            results[ca.name].append(row)
            print(f" {ca.name} {row.rps:.0f} cert/s, {row.errors} errors;", end="")
        print(flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        levels=tuple(int(x) for x in args.levels.split(",")),
        duration=args.duration,
        requests=args.requests,
        warmup=args.warmup,
        client_processes=args.client_processes,
        rounds=args.rounds,
        postgres=args.postgres,
        pinned=args.pinned,
    )
    if settings.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    if settings.pinned and (os.cpu_count() or 1) < 2:
        print("--pinned needs two cores", file=sys.stderr)
        return 2
    stepca = find_stepca(args.stepca)
    if stepca is None:
        return 2

    base = Path(tempfile.mkdtemp(prefix="federatls-bench-", dir=args.workdir))
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    try:
        cas, results = run_benchmark(settings, stepca, base)
    finally:
        if args.keep:
            print(f"PKIs and CA logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    print(
        f"\n{os.cpu_count()} CPUs, load average before the run {load_before[0]:.2f}; "
        f"CPU columns: 100% = one core busy for the whole window"
        + ("; pinned: each CA on core 0, the client on core 1" if settings.pinned else "")
    )
    for ca in cas:
        print_table(f"{ca.name} ({ca.version}, {ca.database or 'badger'})", results[ca.name])
    tables = {ca.name: ratios(results[ca.name], results["step-ca"]) for ca in cas[1:]}
    for name, table in tables.items():
        print_ratios(name, table)

    report = {
        "benchmark": "sign_throughput",
        "started": started.isoformat(),
        "settings": asdict(settings),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "filesystem": filesystem_of(base.parent),
        },
        "cas": {
            ca.name: {
                "version": ca.version,
                "tls": ca.tls,
                "command": " ".join(ca.command),
                "processes": len(ca.ports),
                "database": ca.database,
            }
            for ca in cas
        },
        "federatls_version": federatls.__version__,
        "results": {name: [asdict(r) for r in rows] for name, rows in results.items()},
        "ratios_over_stepca": tables,
    }
    write_results("sign_throughput", report, started, args.json)
    errors = sum(r.errors for rows in results.values() for r in rows)
    if errors:
        print(f"{errors} request(s) failed; see error_samples in the JSON", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
