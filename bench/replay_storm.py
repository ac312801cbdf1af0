"""Replay storm: dozens of concurrent copies of ONE sign token, spread over CA replicas that
share one database, repeated for several tokens; how many certificates each token buys.

What is measured
----------------
A one-time token must buy exactly one certificate however many copies of it arrive at once
and whichever replica each copy reaches. Each round mints one token and one CSR, opens
``--copies`` TLS connections (50 by default) spread round-robin over the replicas of one
system, and only when every connection is up sends the same ``POST /1.0/sign`` on all of
them back to back (a few milliseconds from the first to the last), then reads every answer.
The statuses are counted per system: 201 (a certificate), 401 (refused: the replay
protection worked), 500 (the CA failed) and anything else (other statuses, connection
errors). A round with more than one 201 is a double spend. After the rounds the database of
each system is asked how many certificates and spent tokens it holds, so that a 201 whose
certificate was never recorded would show too.

The systems, all started on fresh PKIs from ``federatls.ca.init_pki`` and run side by side,
the rounds alternating between them (the machine is shared, so what matters is the count
per system, not its speed):

* ``step-ca/mariadb``: ``--replicas`` step-ca 0.19 processes (two by default), one ca.json
  each (the same PKI, their own port), on one MariaDB database: ``"db": {"type": "mysql",
  "dataSource": "USER:PASSWORD@tcp(127.0.0.1:PORT)/", "database": "stepca"}``, which is how
  step-ca's database layer (github.com/smallstep/nosql, 0.3.8 in Debian) spells it. Its
  token check is ``CmpAndSwap``: a plain ``SELECT`` of the token id, then ``INSERT ... ON
  DUPLICATE KEY UPDATE``, in one transaction at MariaDB's default isolation (REPEATABLE
  READ). MariaDB is a throwaway server: ``mariadb-install-db`` into a temporary directory,
  ``mariadbd`` as the unprivileged user ``nobody`` on 127.0.0.1 and a free port. It needs
  Debian's ``mariadb-server`` (``apt-get install mariadb-server``), which only this
  benchmark uses.
* ``federatls/sqlite``: ``--replicas`` ``federatls ca serve`` processes sharing one SQLite
  file (WAL mode), as worker processes on one machine do.
* ``federatls/postgresql``: ``--replicas`` ``federatls ca serve --db URL`` processes on one
  PostgreSQL 15 database (a throwaway cluster from tests/postgres.py), when this federatls
  has a PostgreSQL store.

step-ca on PostgreSQL cannot be measured with the step-ca this project builds: Debian's
nosql 0.3.8 has drivers for Badger, BoltDB and MySQL only (``nosql.New`` refuses
"postgresql").

What is not measured
--------------------
* Speed: the rounds are bounded in count, not timed; see sign_throughput.py.
* Copies that arrive seconds apart (the sequential case the test suite covers), revoke
  tokens, renew and rekey.

Run ``python bench/replay_storm.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pwd
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from cryptography.hazmat.primitives import serialization

import federatls
from federatls._keys import build_csr, new_private_key
from sign_throughput import (
    CA,
    DEFAULT_STEPCA,
    client_context,
    find_stepca,
    free_port,
    make_pki,
    token_for,
    write_results,
)
from state_growth import postgres_cluster, postgres_missing

REQUEST_TIMEOUT = 60.0  # seconds for one copy's whole exchange; slower counts as "other"
MARIADB_INSTALL = "apt-get install mariadb-server (Debian's package; only this benchmark uses it)"
UNPRIVILEGED = "nobody"  # MariaDB and PostgreSQL refuse to run as root
SYSTEMS = ("step-ca/mariadb", "federatls/sqlite", "federatls/postgresql")


# --- A throwaway MariaDB server -----------------------------------------------------------
@dataclass(frozen=True)
class MariaDB:
    """A running throwaway MariaDB: a user with every privilege over TCP, root on the
    socket (for the record counts)."""

    port: int
    socket: Path
    user: str = "stepca"
    password: str = "stepca-bench"
    client: str = "mariadb"  # the client program's path

    def query(self, sql: str) -> str:
        """One statement through the ``mariadb`` client on the socket; its tab-separated
        output without the column names."""
        out = subprocess.run(
            [self.client, "--no-defaults", "-uroot", f"--socket={self.socket}", "-N", "-e", sql],
            capture_output=True,
            check=True,
            timeout=60,
        )
        return out.stdout.decode().strip()

    def version(self) -> str:
        return self.query("SELECT VERSION()")


def mariadb_missing() -> str | None:
    """What is missing to run MariaDB here, with how to install it; None if nothing."""
    missing = [p for p in ("mariadbd", "mariadb-install-db", "mariadb") if not find_program(p)]
    if missing:
        return f"MariaDB is not installed ({', '.join(missing)} not found): {MARIADB_INSTALL}"
    return None


def find_program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


@contextlib.contextmanager
def mariadb_server(base: Path) -> Iterator[MariaDB]:
    """``mariadb-install-db`` into ``base/mariadb``, ``mariadbd`` on 127.0.0.1 and a free
    port as ``nobody`` (when run as root), until the block ends."""
    home = base / "mariadb"
    home.mkdir()
    as_root = os.geteuid() == 0
    user = UNPRIVILEGED if as_root else pwd.getpwuid(os.geteuid()).pw_name
    if as_root:
        entry = pwd.getpwnam(user)
        for path in (base, home):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    subprocess.run(
        [
            str(find_program("mariadb-install-db")),
            "--no-defaults",
            f"--datadir={home / 'data'}",
            f"--user={user}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        capture_output=True,
        check=True,
        timeout=120,
    )
    port = free_port()
    server = MariaDB(port, home / "mariadb.sock", client=str(find_program("mariadb")))
    log = home / "error.log"
    proc = subprocess.Popen(
        [
            str(find_program("mariadbd")),
            "--no-defaults",
            f"--datadir={home / 'data'}",
            f"--user={user}",
            "--bind-address=127.0.0.1",
            f"--port={port}",
            f"--socket={server.socket}",
            f"--pid-file={home / 'mariadb.pid'}",
            f"--log-error={log}",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=64M",
            "--max-connections=500",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited: {log.read_text(errors='replace')}")
            with contextlib.suppress(subprocess.CalledProcessError):
                server.query("SELECT 1")
                break
            if time.monotonic() > deadline:
                raise RuntimeError("mariadbd did not answer within 60 s")
            time.sleep(0.2)
        who = f"'{server.user}'@'127.0.0.1'"
        server.query(f"CREATE USER {who} IDENTIFIED BY '{server.password}'")
        server.query(f"GRANT ALL ON *.* TO {who}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- Replicas of one CA -------------------------------------------------------------------
@dataclass
class System:
    """One CA system: its PKI (``ca``, whose URL is the first replica's) and every replica's
    URL; how to count its records."""

    name: str
    ca: CA
    replicas: list[tuple[str, int]]  # host, port
    version: str = ""
    database: str = ""
    records: Callable[[], dict[str, int]] = field(default=lambda: {})


def replica_config(ca: CA, index: int, port: int, db: dict[str, Any] | None) -> Path:
    """ca.json for replica ``index``: the PKI's own file with its address (and ``db``
    block) changed, beside it, so that relative paths and federatls.db stay shared."""
    data = json.loads(ca.config.read_text())
    data["address"] = f"127.0.0.1:{port}"
    if db is not None:
        data["db"] = db
    path = ca.config.with_name(f"ca-{index}.json")
    path.write_text(json.dumps(data, indent=2))
    return path


@contextlib.contextmanager
def replicas_running(ca: CA, commands: Sequence[list[str]], ports: Sequence[int]) -> Iterator[str]:
    """Start one process per command (each listening on its port), each once the one before
    answers /health, then a second more (step-ca and the SQLite CA refuse tokens issued
    before their start second). Yields the first one's /version."""
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        ctx = client_context(ca.root_pem)
        for i, (command, port) in enumerate(zip(commands, ports, strict=True)):
            # One after another: two federatls CAs opening a new SQLite file at the same
            # moment can fail ("database is locked" while one switches it to WAL mode).
            log = (ca.directory / f"replica-{i}.log").open("wb")
            logs.append(log)
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            procs.append(proc)
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    text = (ca.directory / f"replica-{i}.log").read_text(errors="replace")
                    raise RuntimeError(f"{ca.name} replica {i} exited: {text}")
                url = f"https://127.0.0.1:{port}/health"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url, verify=ctx, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ca.name} replica {i} did not answer within 60 s")
                time.sleep(0.1)
        version = httpx.get(f"https://127.0.0.1:{ports[0]}/version", verify=ctx).json()
        time.sleep(1.1)
        yield str(version.get("version", ""))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


# --- The storm ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    status: str  # "201", "401", "500", or another status or an error's name
    body: str  # the start of the answer's body (or the error), for samples


def sign_request(host: str, port: int, csr_pem: str, token: str) -> bytes:
    body = json.dumps({"csr": csr_pem, "ott": token}).encode()
    head = (
        f"POST /1.0/sign HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


def parse_answer(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return Answer("no answer", raw[:200].decode(errors="replace"))
    return Answer(parts[1].decode(), body[:300].decode(errors="replace"))


async def storm(system: System, copies: int, token: str, csr_pem: str) -> list[Answer]:
    """``copies`` connections spread over the replicas, all opened first; then the same
    request written on every one back to back; every answer read to the end."""
    ctx = client_context(system.ca.root_pem)
    targets = [system.replicas[i % len(system.replicas)] for i in range(copies)]

    async def connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)

    async with asyncio.timeout(REQUEST_TIMEOUT):
        opened = await asyncio.gather(*(connect(h, p) for h, p in targets), return_exceptions=True)
    for (host, port), conn in zip(targets, opened, strict=True):
        if not isinstance(conn, BaseException):
            conn[1].write(sign_request(host, port, csr_pem, token))

    async def answer(conn: Any) -> Answer:
        if isinstance(conn, BaseException):
            return Answer(type(conn).__name__, str(conn))
        reader, writer = conn
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return parse_answer(await reader.read())
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            return Answer(type(exc).__name__, str(exc))
        finally:
            writer.close()

    return list(await asyncio.gather(*(answer(c) for c in opened)))


@dataclass
class Tally:
    """What one system answered over every round."""

    system: str
    replicas: int
    copies: int
    rounds: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    certificates_per_token: list[int] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)  # first body per refusal
    records: dict[str, int] = field(default_factory=dict)
    version: str = ""
    database: str = ""

    def add(self, answers: Sequence[Answer]) -> None:
        self.rounds += 1
        for a in answers:
            self.statuses[a.status] += 1
            if a.status != "201":
                self.samples.setdefault(a.status, a.body)
        self.certificates_per_token.append(sum(a.status == "201" for a in answers))

    def summary(self) -> dict[str, Any]:
        main = ("201", "401", "500")
        return {
            "201": self.statuses["201"],
            "401": self.statuses["401"],
            "500": self.statuses["500"],
            "other": sum(n for s, n in self.statuses.items() if s not in main),
            "tokens_with_several_certificates": sum(n > 1 for n in self.certificates_per_token),
            "tokens_with_no_certificate": sum(n == 0 for n in self.certificates_per_token),
            "most_certificates_for_one_token": max(self.certificates_per_token, default=0),
        }


def one_round(system: System, copies: int, round_no: int) -> list[Answer]:
    subject = f"storm{round_no}.bench.internal"
    csr = build_csr(new_private_key(), subject, [subject])
    csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    token = token_for(system.ca, subject)
    return asyncio.run(storm(system, copies, token, csr_pem))


# --- The systems ----------------------------------------------------------------------------
def stepca_mariadb(stack: contextlib.ExitStack, base: Path, stepca: str, replicas: int) -> System:
    ca = make_pki(base, "step-ca-mariadb")
    db = stack.enter_context(mariadb_server(base))
    block = {
        "type": "mysql",
        "dataSource": f"{db.user}:{db.password}@tcp(127.0.0.1:{db.port})/",
        "database": "stepca",
    }
    ports = [free_port() for _ in range(replicas)]
    configs = [replica_config(ca, i, port, block) for i, port in enumerate(ports)]
    commands = [[stepca, str(c), "--password-file", str(ca.password)] for c in configs]
    version = stack.enter_context(replicas_running(ca, commands, ports))

    def records() -> dict[str, int]:
        return {
            "certificates": int(db.query("SELECT COUNT(*) FROM stepca.x509_certs")),
            "spent_tokens": int(db.query("SELECT COUNT(*) FROM stepca.used_ott")),
        }

    return System(
        "step-ca/mariadb",
        ca,
        [("127.0.0.1", p) for p in ports],
        version=version,
        database=f"MariaDB {db.version()}",
        records=records,
    )


def federatls_sqlite(stack: contextlib.ExitStack, base: Path, replicas: int) -> System:
    ca = make_pki(base, "federatls-sqlite")
    ports = [free_port() for _ in range(replicas)]
    configs = [replica_config(ca, i, port, None) for i, port in enumerate(ports)]
    serve = [sys.executable, "-m", "federatls", "ca", "serve"]
    commands = [[*serve, str(c), "--password-file", str(ca.password)] for c in configs]
    version = stack.enter_context(replicas_running(ca, commands, ports))
    path = ca.config.with_name("federatls.db")

    def records() -> dict[str, int]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            certs = "SELECT COUNT(*) FROM certificates WHERE provisioner != ''"  # not its own
            return {
                "certificates": conn.execute(certs).fetchone()[0],
                "spent_tokens": conn.execute("SELECT COUNT(*) FROM used_tokens").fetchone()[0],
            }

    return System(
        "federatls/sqlite",
        ca,
        [("127.0.0.1", p) for p in ports],
        version=version,
        database=f"SQLite {sqlite3.sqlite_version}",
        records=records,
    )


def federatls_postgresql(stack: contextlib.ExitStack, base: Path, replicas: int) -> System:
    """Replicas on one database of a throwaway PostgreSQL 15 cluster, its schema made first
    (``init_schema``, what ``federatls ca db init`` does) and the replicas connecting as a
    role that may read and write but not create tables."""
    import psycopg

    from federatls.ca._database import Database, init_schema

    ca = make_pki(base, "federatls-postgresql")
    cluster = stack.enter_context(postgres_cluster())
    owner_url = cluster.new_database()
    init_schema(Database.postgresql(owner_url))
    url = cluster.new_role("replica", owner_url)
    parts = urlsplit(url)
    block = {
        "type": "postgresql",
        "dataSource": urlunsplit((parts.scheme, parts.netloc, "/", "", "")),
        "database": parts.path.lstrip("/"),
    }
    ports = [free_port() for _ in range(replicas)]
    configs = [replica_config(ca, i, port, block) for i, port in enumerate(ports)]
    serve = [sys.executable, "-m", "federatls", "ca", "serve"]
    commands = [[*serve, str(c), "--password-file", str(ca.password)] for c in configs]
    version = stack.enter_context(replicas_running(ca, commands, ports))

    def query(sql: str) -> Any:
        with psycopg.connect(owner_url) as conn:
            row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]

    def records() -> dict[str, int]:
        return {
            "certificates": query("SELECT count(*) FROM certificates WHERE provisioner != ''"),
            "spent_tokens": query("SELECT count(*) FROM used_tokens"),
        }

    return System(
        "federatls/postgresql",
        ca,
        [("127.0.0.1", p) for p in ports],
        version=version,
        database=f"PostgreSQL {query('SHOW server_version')}",
        records=records,
    )


# --- Main -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--copies", type=int, default=50, help="concurrent copies of each token")
    p.add_argument("--rounds", type=int, default=20, help="tokens per system (one per round)")
    p.add_argument("--replicas", type=int, default=2, help="CA processes per system")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, of: {', '.join(SYSTEMS)} (default: all)",
    )
    p.add_argument(
        "--stepca",
        default=os.environ.get("FEDERATLS_STEPCA", DEFAULT_STEPCA),
        help=f"step-ca binary (default $FEDERATLS_STEPCA or {DEFAULT_STEPCA})",
    )
    p.add_argument("--keep", action="store_true", help="keep the PKIs, logs and databases")
    p.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        print(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    if min(args.copies, args.rounds, args.replicas) < 1:
        print("--copies, --rounds and --replicas must be at least 1", file=sys.stderr)
        return 2
    stepca = ""
    if "step-ca/mariadb" in names:
        found = find_stepca(args.stepca)
        problem = mariadb_missing()
        if found is None or problem:
            print(problem or "step-ca is needed for step-ca/mariadb", file=sys.stderr)
            return 2
        stepca = found
    if "federatls/postgresql" in names and (problem := postgres_missing()):
        print(f"federatls/postgresql: {problem}", file=sys.stderr)
        return 2

    base = Path(tempfile.mkdtemp(prefix="federatls-storm-"))
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    tallies: dict[str, Tally] = {}
    try:
        with contextlib.ExitStack() as stack:
            systems: list[System] = []
            for name in names:
                if name == "step-ca/mariadb":
                    systems.append(stepca_mariadb(stack, base, stepca, args.replicas))
                elif name == "federatls/sqlite":
                    systems.append(federatls_sqlite(stack, base, args.replicas))
                else:
                    systems.append(federatls_postgresql(stack, base, args.replicas))
                tallies[name] = Tally(name, args.replicas, args.copies)
                s = systems[-1]
                tallies[name].version, tallies[name].database = s.version, s.database
                print(f"{name}: {s.version} on {s.database}, {len(s.replicas)} replicas")
            for i in range(args.rounds):
                order = systems[i % len(systems) :] + systems[: i % len(systems)]
                for system in order:
                    tallies[system.name].add(one_round(system, args.copies, i))
                print(".", end="", flush=True)
            print()
            for system in systems:
                tallies[system.name].records = system.records()
    finally:
        if args.keep:
            print(f"PKIs, logs and databases kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    print(
        f"\n{args.rounds} tokens per system, {args.copies} concurrent copies of each over "
        f"{args.replicas} replicas; {os.cpu_count()} CPUs, load average before {load_before[0]:.2f}"
    )
    header = f"{'system':<22} {'201':>5} {'401':>5} {'500':>5} {'other':>5}"
    print(header + "  tokens with >1 cert (max)  certificates / spent tokens recorded")
    for t in tallies.values():
        n = t.summary()
        print(
            f"{t.system:<22} {n['201']:>5} {n['401']:>5} {n['500']:>5} {n['other']:>5}"
            f"  {n['tokens_with_several_certificates']:>5} of {t.rounds} "
            f"({n['most_certificates_for_one_token']:>2})"
            f"           {t.records.get('certificates', 0)} / {t.records.get('spent_tokens', 0)}"
        )
    for t in tallies.values():
        for status, body in sorted(t.samples.items()):
            print(f"  {t.system} {status}: {' '.join(body.split())[:160]}")

    report = {
        "benchmark": "replay_storm",
        "started": started.isoformat(),
        "settings": {"copies": args.copies, "rounds": args.rounds, "replicas": args.replicas},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "federatls_version": federatls.__version__,
        "systems": {
            name: {**asdict(t), "statuses": dict(t.statuses), "summary": t.summary()}
            for name, t in tallies.items()
        },
    }
    write_results("replay_storm", report, started, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
