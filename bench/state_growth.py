"""State growth: does a CA that has issued a million certificates sign as fast as a new one,
and what does forgetting half a million expired token ids cost?

What is measured
----------------
1. **Sign latency against the size of the store.** Two federatls CAs run side by side on
   fresh PKIs: one on an empty store, one on a store holding ``--rows`` spent token ids and
   ``--rows`` certificate records (a million each by default). The full store is filled
   before its CA starts, by bulk inserts straight into the database (not through the CA):
   rows as the CA writes them, token ids of 64 hex digits, decimal 128-bit serials, a
   certificate's DER of ``--der-bytes`` random bytes (the size of the P-256 leaves this CA
   issues; the run prints the size of a real one beside it), ``expires_at`` spread over the
   next 24 hours so that no purge removes a row during the run. Then ``POST /1.0/sign``
   requests (new TCP connection and TLS handshake each, as sign_throughput.py makes them)
   at 1 and 8 concurrent clients, in rounds that alternate the two CAs; reported per CA:
   p50 and p99 latency, and the ratio full / empty (the aim is at most 1.1), overall and per
   round.
2. **Purging expired token ids.** A store holding ``--expired`` token ids (500,000 by
   default) whose tokens expired more than the retention (a day) ago, and nothing else. How
   long from the CA's process start to its first answer (``GET /roots``, polled every 20
   ms), against the same CA on an empty store; then sign requests one after another (at
   most 50 a second) while the expired rows go, up to ``--purge-seconds``: how many are
   answered and how slowly, and how many expired rows remain when the window ends. A CA
   that purges only at start (before it listens) shows the cost in the first figure; one
   that purges while it serves shows it in the second. ``--baseline-src DIR`` runs a
   second CA from another checkout's ``src`` (``git archive REV src | tar -x -C DIR``)
   through the same steps, so that the old and the new purge are compared in one run.

Both stores: SQLite (the file beside ca.json) and, when this federatls has one, PostgreSQL.

What is not measured
--------------------
* The fill itself (how fast a CA writes rows is sign_throughput.py's business).
* Stores larger than the machine's page cache: a million rows of each kind are about 1 GB
  with this DER size, read once by the fill, so they stay in memory.
* Revocations (the store keeps them, but a CA has few).

Run ``python bench/state_growth.py --help``.
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
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

import federatls
from federatls.ca._store import SQLiteStore
from sign_throughput import (
    CA,
    LevelResult,
    LoadRun,
    Settings,
    check_one_sign,
    client_context,
    make_pki,
    measure,
    percentile,
    prepare_requests,
    running,
    sign_once,
    summarise,
    write_results,
)

DER_BYTES = 570  # a P-256 leaf this CA issues for one DNS name is 560-580 bytes
BATCH = 20_000  # rows per executemany
RETENTION = timedelta(days=1)  # how long the CA keeps a used token id after its exp
SIGN_EVERY = 0.02  # seconds between the starts of two signs while purging


# --- Filling a store ------------------------------------------------------------------------
def token_rows(
    count: int, provisioner: str, first_exp: datetime, spread: timedelta
) -> Iterator[list[tuple[str, str, datetime, datetime]]]:
    """``count`` used-token rows in batches, sorted by id (a bulk load in key order), their
    ``expires_at`` spread evenly from ``first_exp`` over ``spread``."""
    ids = sorted(secrets.token_hex(32) for _ in range(count))
    step = spread / max(1, count)
    for start in range(0, count, BATCH):
        batch = []
        for i in range(start, min(count, start + BATCH)):
            # spread in an order unrelated to the key, as real ids are random
            exp = first_exp + step * ((i * 7919) % count)
            batch.append((ids[i], provisioner, exp, exp - timedelta(minutes=5)))
        yield batch


CertificateRow = tuple[str, str, list[str], datetime, datetime, str, None, bytes, str, str]


def certificate_rows(
    count: int, provisioner: str, now: datetime, der_bytes: int
) -> Iterator[list[CertificateRow]]:
    """``count`` certificate rows in batches, sorted by serial: a day's validity each, issued
    over the last day (so every one is current), the audit trail of a sign."""
    serials = sorted(str(int.from_bytes(os.urandom(16), "big")) for _ in range(count))
    for start in range(0, count, BATCH):
        batch: list[CertificateRow] = []
        for i in range(start, min(count, start + BATCH)):
            issued = now - timedelta(seconds=(i * 7919) % 86_400)
            name = f"svc-{i}.bench.internal"
            batch.append(
                (
                    serials[i],
                    name,
                    [name],
                    issued,
                    issued + timedelta(days=1),
                    provisioner,
                    None,
                    os.urandom(der_bytes),
                    "sign",
                    secrets.token_hex(32),
                )
            )
        yield batch


CERT_COLUMNS = (
    "serial, subject, sans, not_before, not_after, provisioner, renewed_from, der, operation,"
    " token_id"
)


def provisioner_id(ca: CA) -> str:
    """How the CA writes a row's provisioner: ``<name>:<kid>``."""
    return f"{ca.provisioner}:{ca.key.kid}"


@dataclass(frozen=True)
class Fill:
    """What to put in a store before its CA starts."""

    tokens: int
    certificates: int
    now: datetime
    expired: bool = False  # tokens expired more than the retention ago, else in the future
    der_bytes: int = DER_BYTES

    def first_exp(self) -> datetime:
        if self.expired:  # spread over the day before the retention's cut
            return self.now - RETENTION - timedelta(days=1)
        return self.now + timedelta(minutes=1)


class SQLiteBackend:
    """The embedded store: ``federatls.db`` beside each CA's ca.json."""

    name = "sqlite"

    def prepare(self, ca: CA, schema_src: Path | None = None) -> None:
        """Create the store (the CA's own code makes the schema: this checkout's, or the
        one in ``schema_src``)."""
        path = self.path(ca)
        if schema_src is None:
            SQLiteStore(path).close()
        else:
            code = "import sys; from federatls.ca._store import SQLiteStore; "
            code += "SQLiteStore(sys.argv[1]).close()"
            run = [sys.executable, "-c", code, str(path)]
            subprocess.run(run, env=env_for(schema_src), check=True)

    def path(self, ca: CA) -> Path:
        return ca.config.with_name("federatls.db")

    def fill(self, ca: CA, fill: Fill) -> None:
        provisioner = provisioner_id(ca)
        with contextlib.closing(sqlite3.connect(self.path(ca), isolation_level=None)) as conn:
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("BEGIN")
            rows = token_rows(fill.tokens, provisioner, fill.first_exp(), timedelta(days=1))
            for batch in rows:
                conn.executemany(
                    "INSERT INTO used_tokens VALUES (?, ?, ?, ?)",
                    [(t, p, e.isoformat(), u.isoformat()) for t, p, e, u in batch],
                )
            for certs in certificate_rows(fill.certificates, provisioner, fill.now, fill.der_bytes):
                conn.executemany(
                    f"INSERT INTO certificates ({CERT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                    [
                        (*c[:2], json.dumps(c[2]), c[3].isoformat(), c[4].isoformat(), *c[5:])
                        for c in certs
                    ],
                )
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def counts(self, ca: CA, now: datetime) -> dict[str, int]:
        with contextlib.closing(sqlite3.connect(self.path(ca))) as conn:
            cut = (now - RETENTION).isoformat()
            return {
                "used_tokens": conn.execute("SELECT COUNT(*) FROM used_tokens").fetchone()[0],
                "expired_tokens": conn.execute(
                    "SELECT COUNT(*) FROM used_tokens WHERE expires_at < ?", (cut,)
                ).fetchone()[0],
                "certificates": conn.execute("SELECT COUNT(*) FROM certificates").fetchone()[0],
            }

    def real_der_size(self, ca: CA) -> int:
        """The DER size of a certificate the CA itself issued (for the report)."""
        with contextlib.closing(sqlite3.connect(self.path(ca))) as conn:
            row = conn.execute(
                "SELECT length(der) FROM certificates WHERE provisioner != '' LIMIT 1"
            ).fetchone()
        return int(row[0]) if row else 0

    def megabytes(self, ca: CA) -> float:
        return sum(p.stat().st_size for p in ca.config.parent.glob("federatls.db*")) / 1e6


class PostgresBackend:
    """One throwaway PostgreSQL 15 cluster (tests/postgres.py), a database per CA, named in
    the CA's ca.json ``db`` block as step-ca writes it."""

    name = "postgresql"

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.urls: dict[str, str] = {}

    def prepare(self, ca: CA, schema_src: Path | None = None) -> None:
        from federatls.ca._database import Database, init_schema

        assert schema_src is None, "the baseline has no PostgreSQL store"
        url = self.urls[ca.name] = self.cluster.new_database()
        parts = urlsplit(url)
        data = json.loads(ca.config.read_text())
        data["db"] = {
            "type": "postgresql",
            "dataSource": urlunsplit((parts.scheme, parts.netloc, "/", "", "")),
            "database": parts.path.lstrip("/"),
        }
        ca.config.write_text(json.dumps(data, indent=2))
        init_schema(Database.postgresql(url))

    def fill(self, ca: CA, fill: Fill) -> None:
        import psycopg

        provisioner = provisioner_id(ca)
        with psycopg.connect(self.urls[ca.name]) as conn:
            with conn.cursor().copy(
                "COPY used_tokens (token_id, provisioner, expires_at, used_at) FROM STDIN"
            ) as copy:
                for batch in token_rows(
                    fill.tokens, provisioner, fill.first_exp(), timedelta(days=1)
                ):
                    for row in batch:
                        copy.write_row(row)
            with conn.cursor().copy(f"COPY certificates ({CERT_COLUMNS}) FROM STDIN") as copy:
                for certs in certificate_rows(
                    fill.certificates, provisioner, fill.now, fill.der_bytes
                ):
                    for cert in certs:
                        copy.write_row(cert)
        with psycopg.connect(self.urls[ca.name], autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE used_tokens")
            conn.execute("VACUUM ANALYZE certificates")
            conn.execute("CHECKPOINT")

    def counts(self, ca: CA, now: datetime) -> dict[str, int]:
        import psycopg

        with psycopg.connect(self.urls[ca.name]) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM used_tokens),"
                " (SELECT count(*) FROM used_tokens WHERE expires_at < %s),"
                " (SELECT count(*) FROM certificates)",
                (now - RETENTION,),
            ).fetchone()
        assert row is not None
        return {"used_tokens": row[0], "expired_tokens": row[1], "certificates": row[2]}

    def real_der_size(self, ca: CA) -> int:
        import psycopg

        with psycopg.connect(self.urls[ca.name]) as conn:
            row = conn.execute(
                "SELECT length(der) FROM certificates WHERE provisioner != '' LIMIT 1"
            ).fetchone()
        return int(row[0]) if row else 0

    def megabytes(self, ca: CA) -> float:
        import psycopg

        with psycopg.connect(self.urls[ca.name]) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        assert row is not None
        return int(row[0]) / 1e6


Backend = SQLiteBackend | PostgresBackend


# --- Part 1: sign latency, empty store against full store ---------------------------------
def serve_command(ca: CA) -> list[str]:
    """``federatls ca serve`` for ``ca`` (from whichever code PYTHONPATH names)."""
    command = [sys.executable, "-m", "federatls", "ca", "serve", str(ca.config)]
    return [*command, "--password-file", str(ca.password)]


def growth(args: argparse.Namespace, base: Path, backend: Backend) -> dict[str, Any]:
    now = datetime.now(UTC)
    empty, full = make_pki(base, f"empty-{backend.name}"), make_pki(base, f"full-{backend.name}")
    empty.name, full.name = "empty", "full"
    for ca in (empty, full):
        backend.prepare(ca)
    print(
        f"{backend.name}: filling a store with {args.rows:,} spent tokens and {args.rows:,} "
        "certificates",
        flush=True,
    )
    began = time.monotonic()
    backend.fill(full, Fill(args.rows, args.rows, now))
    fill_seconds = time.monotonic() - began
    size_mb = backend.megabytes(full)
    print(f"  {fill_seconds:.0f} s, {size_mb:.0f} MB", flush=True)
    for ca in (empty, full):
        ca.command = serve_command(ca)
    levels = tuple(int(x) for x in args.levels.split(","))
    settings = Settings(levels, 0.0, args.requests, args.warmup, 1, args.rounds)
    results: dict[str, list[LevelResult]] = {"empty": [], "full": []}
    p50_per_round: list[list[float]] = []  # full / empty, per level
    starts: dict[str, float] = {}
    spawn = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        for ca in (empty, full):
            began = time.monotonic()
            stack.enter_context(running(ca))
            starts[ca.name] = time.monotonic() - began - 1.1  # running() sleeps 1.1 s
            check_one_sign(ca)
        pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(1, spawn))
        per_round = math.ceil(args.requests / args.rounds)
        for concurrency in levels:
            runs: dict[str, list[tuple[LoadRun, bool]]] = {"empty": [], "full": []}
            print(f"  {concurrency} client(s), {args.rounds} rounds:", end="", flush=True)
            for i in range(args.rounds):
                for ca in (empty, full) if i % 2 == 0 else (full, empty):
                    runs[ca.name].append(
                        measure(
                            pool, ca, concurrency, settings, seconds=math.inf, requests=per_round
                        )
                    )
                print(".", end="", flush=True)
            print(flush=True)
            for ca in (empty, full):
                results[ca.name].append(summarise(ca, concurrency, runs[ca.name]))
            p50_per_round.append(
                [
                    percentile(f.latencies, 50) / percentile(e.latencies, 50)
                    for (e, _), (f, _) in zip(runs["empty"], runs["full"], strict=True)
                ]
            )
    counts = backend.counts(full, datetime.now(UTC))
    rows = []
    for e, f, per_round in zip(results["empty"], results["full"], p50_per_round, strict=True):
        rows.append(
            {
                "clients": e.concurrency,
                "empty_p50_ms": e.p50_ms,
                "empty_p99_ms": e.p99_ms,
                "full_p50_ms": f.p50_ms,
                "full_p99_ms": f.p99_ms,
                "p50_ratio": f.p50_ms / e.p50_ms,
                "p99_ratio": f.p99_ms / e.p99_ms,
                "p50_ratio_per_round": per_round,
                "requests_each": e.requests,
                "errors": e.errors + f.errors,
                "error_samples": e.error_samples + f.error_samples,
            }
        )
    return {
        "store": backend.name,
        "rows": args.rows,
        "fill_seconds": fill_seconds,
        "store_megabytes": size_mb,
        "der_bytes_filled": DER_BYTES,
        "der_bytes_real": backend.real_der_size(empty),
        "start_seconds": starts,
        "counts_after": counts,
        "levels": rows,
    }


# --- Part 2: the purge of expired token ids -------------------------------------------------
@dataclass
class PurgeRun:
    """One CA started on a store of expired ids: when it first answered, then how it signed
    while the expired ids went."""

    store: str  # "sqlite" or "postgresql"
    code: str  # "this checkout" or the baseline's directory
    schema: str  # whose code made the store's schema
    expired_at_start: int
    first_answer_seconds: float = math.nan  # process start to the first GET /roots answer
    empty_first_answer_seconds: float = math.nan  # the same CA on an empty store
    signs: int = 0
    sign_errors: int = 0
    sign_p50_ms: float = math.nan
    sign_p99_ms: float = math.nan
    sign_max_ms: float = math.nan
    # the same for the signs made while the purge ran (from the first sample with fewer
    # expired ids than at start to the first with none), and for those made before it
    purge_seconds: float = math.nan
    during: dict[str, float] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    expired_left: list[tuple[float, int]] = field(default_factory=list)  # (s, rows) samples
    error_samples: list[str] = field(default_factory=list)


def env_for(src: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src.resolve())
    return env


@contextlib.contextmanager
def started(ca: CA, src: Path | None) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """Start ``federatls ca serve`` (from ``src`` if given); yields the process and the
    seconds from its start to the first ``GET /roots`` answer."""
    log = (ca.directory / "ca.log").open("wb")
    began = time.monotonic()
    proc = subprocess.Popen(
        serve_command(ca), stdout=log, stderr=subprocess.STDOUT, env=env_for(src)
    )
    try:
        ctx = client_context(ca.root_pem)
        deadline = began + 120
        with httpx.Client(verify=ctx, timeout=5) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{ca.name} exited: {(ca.directory / 'ca.log').read_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    # step-ca answers /roots with 201, and so does the federatls CA
                    if client.get(ca.url + "/roots").status_code in (200, 201):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ca.name} did not answer within 120 s")
                time.sleep(0.02)
        yield proc, time.monotonic() - began
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def signs_while_purging(ca: CA, backend: Backend, seconds: float, run: PurgeRun) -> None:
    """Sign one request after another, at most 50 a second, for ``seconds`` (a new connection
    each), sampling how many expired ids remain every half second; stops early once none
    remain and a second has passed. (The federatls CA's first purge run starts a minute
    after it does.)"""
    ctx = client_context(ca.root_pem)
    latencies: list[float] = []
    signs: list[tuple[float, float | None]] = []  # (s from the start, latency or None)
    began = time.monotonic()
    next_sample = began
    gone_at: float | None = None
    last = 0.0

    async def sign(request: bytes) -> bytes:
        async with asyncio.timeout(30):
            return await sign_once(ca.host, ca.port, ctx, request)

    while time.monotonic() - began < seconds:
        if time.monotonic() >= next_sample:
            left = backend.counts(ca, datetime.now(UTC))["expired_tokens"]
            run.expired_left.append((round(time.monotonic() - began, 2), left))
            next_sample += 0.5
            if left == 0 and gone_at is None:
                gone_at = time.monotonic()
            if gone_at is not None and time.monotonic() - gone_at > 1.0:
                break
        request = prepare_requests(ca, 1)[0]
        time.sleep(max(0.0, last + SIGN_EVERY - time.monotonic()))  # at most 50 signs/s
        t0 = last = time.monotonic()
        try:
            answer = asyncio.run(sign(request))
            ok = answer.startswith(b"HTTP/1.1 201 ")
            problem = "" if ok else answer[:200].decode(errors="replace")
        except (OSError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            run.sign_errors += 1
            if len(run.error_samples) < 5:
                run.error_samples.append(problem)
            signs.append((t0 - began, None))
        else:
            latencies.append(time.monotonic() - t0)
            signs.append((t0 - began, latencies[-1]))
    first = run.expired_left[0][1] if run.expired_left else 0
    start = next((t for t, n in run.expired_left if n < first), None)
    end = next((t for t, n in run.expired_left if n == 0), None)
    if start is not None and end is not None:
        run.purge_seconds = end - start
        run.during = sign_stats([x for t, x in signs if start - 0.5 <= t <= end])
        run.before = sign_stats([x for t, x in signs if t < start - 0.5])
    latencies.sort()
    run.signs = len(latencies)
    if latencies:
        run.sign_p50_ms = percentile(latencies, 50) * 1000
        run.sign_p99_ms = percentile(latencies, 99) * 1000
        run.sign_max_ms = latencies[-1] * 1000


def sign_stats(outcomes: Sequence[float | None]) -> dict[str, float]:
    """Count, errors, p50, p99 and max (ms) of sign outcomes (latency in s, None: failed)."""
    ok = sorted(x for x in outcomes if x is not None)
    if not ok:
        return {"signs": 0, "errors": len(outcomes)}
    return {
        "signs": len(ok),
        "errors": len(outcomes) - len(ok),
        "p50_ms": percentile(ok, 50) * 1000,
        "p99_ms": percentile(ok, 99) * 1000,
        "max_ms": ok[-1] * 1000,
    }


def purge(args: argparse.Namespace, base: Path, backend: Backend) -> list[PurgeRun]:
    """The CA of this checkout; with ``--baseline-src`` (SQLite only), the baseline's CA on
    a store of its own schema, then this checkout's CA on that older store (an upgrade: its
    migration runs at start)."""
    this, old = ("this checkout", None), (f"baseline {args.baseline_src}", args.baseline_src)
    cases: list[tuple[tuple[str, Path | None], tuple[str, Path | None]]] = [(this, this)]
    if args.baseline_src is not None and backend.name == "sqlite":
        cases += [(old, old), (this, old)]
    runs = []
    for i, ((label, src), (schema, schema_src)) in enumerate(cases):
        now = datetime.now(UTC)
        ca = make_pki(base, f"purge-{backend.name}-{i}")
        empty = make_pki(base, f"purge-empty-{backend.name}-{i}")
        for each in (ca, empty):
            backend.prepare(each, schema_src)
        print(
            f"{backend.name}, {label} on a store made by {schema}: {args.expired:,} expired ids",
            flush=True,
        )
        backend.fill(ca, Fill(args.expired, 0, now, expired=True))
        run = PurgeRun(backend.name, label, schema, backend.counts(ca, now)["expired_tokens"])
        with started(empty, src) as (_, seconds):
            run.empty_first_answer_seconds = seconds
        with started(ca, src) as (_, seconds):
            run.first_answer_seconds = seconds
            signs_while_purging(ca, backend, args.purge_seconds, run)
        runs.append(run)
    return runs


# --- PostgreSQL ----------------------------------------------------------------------------
TESTS = Path(__file__).resolve().parents[1] / "tests"


def postgres_missing() -> str | None:
    """Why the PostgreSQL store cannot be measured here, or None."""
    try:
        from federatls.ca import _postgres  # noqa: F401
        from federatls.ca._config import CAConfig
    except ImportError as exc:
        return f"this federatls has no PostgreSQL store ({exc})"
    if "database" not in getattr(CAConfig, "__dataclass_fields__", {}) and not hasattr(
        CAConfig, "database"
    ):
        return "this federatls CA does not read ca.json's db block (CAConfig.database)"
    sys.path.insert(0, str(TESTS))
    from postgres import PostgresUnavailable, find_bindir

    try:
        find_bindir()
    except PostgresUnavailable as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL 15 cluster (tests/postgres.py) with 128 MB of shared buffers:
    small beside a real server's, so that a million rows do not all fit in them."""
    sys.path.insert(0, str(TESTS))
    from postgres import PostgresCluster

    cluster = PostgresCluster(shared_buffers="128MB")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


# --- Main -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--rows",
        type=int,
        default=1_000_000,
        help="spent tokens and certificates in the full store",
    )
    p.add_argument("--levels", default="1,8", help="concurrent clients, comma-separated")
    p.add_argument("--requests", type=int, default=2000, help="sign requests per level and CA")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds per level")
    p.add_argument("--warmup", type=int, default=20, help="warm-up requests before each round")
    p.add_argument(
        "--expired", type=int, default=500_000, help="expired token ids for the purge part"
    )
    p.add_argument(
        "--purge-seconds", type=float, default=180.0, help="longest sign window while purging"
    )
    p.add_argument("--baseline-src", type=Path, help="another checkout's src/ for the purge part")
    p.add_argument("--parts", default="growth,purge", help="growth, purge or both")
    p.add_argument(
        "--stores", default="sqlite,postgresql", help="sqlite, postgresql or both (default)"
    )
    p.add_argument("--workdir", type=Path, help="where the stores go (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the PKIs, stores and logs")
    p.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",")}
    if not parts <= {"growth", "purge"}:
        print("--parts takes growth, purge or both", file=sys.stderr)
        return 2
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or not set(stores) <= {"sqlite", "postgresql"}:
        print("--stores takes sqlite, postgresql or both", file=sys.stderr)
        return 2
    if "postgresql" in stores and (problem := postgres_missing()):
        print(f"postgresql: {problem} (or pass --stores sqlite)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="federatls-growth-", dir=args.workdir))
    started_at = datetime.now(UTC)
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "benchmark": "state_growth",
        "started": started_at.isoformat(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "federatls_version": federatls.__version__,
    }
    report["growth"], report["purge"] = [], []
    try:
        with contextlib.ExitStack() as stack:
            for store in stores:
                backend: Backend = SQLiteBackend()
                if store == "postgresql":
                    backend = PostgresBackend(stack.enter_context(postgres_cluster()))
                if "growth" in parts:
                    report["growth"].append(growth(args, base, backend))
                if "purge" in parts:
                    report["purge"] += [asdict(r) for r in purge(args, base, backend)]
    finally:
        if args.keep:
            print(f"kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    print(f"\n{os.cpu_count()} CPUs, load average before the run {load_before[0]:.2f}")
    for g in report.get("growth", []):
        print(
            f"\nsign latency, {g['store']}: empty store against {g['rows']:,} spent tokens and "
            f"{g['rows']:,} certificates ({g['store_megabytes']:.0f} MB; DER bytes: "
            f"{g['der_bytes_filled']} filled, {g['der_bytes_real']} real)"
        )
        print(
            f"{'clients':>7} {'empty p50':>9} {'p99':>7} {'full p50':>9} {'p99':>7} "
            f"{'p50 x':>6} {'p99 x':>6}  p50 x per round"
        )
        for r in g["levels"]:
            per = " ".join(f"{x:.2f}" for x in r["p50_ratio_per_round"])
            print(
                f"{r['clients']:>7} {r['empty_p50_ms']:>9.1f} {r['empty_p99_ms']:>7.1f} "
                f"{r['full_p50_ms']:>9.1f} {r['full_p99_ms']:>7.1f} {r['p50_ratio']:>6.2f} "
                f"{r['p99_ratio']:>6.2f}  {per}"
            )
        starts = ", ".join(f"{k} {v:.2f} s" for k, v in g["start_seconds"].items())
        print(f"  start to /health: {starts}")
    for r in report.get("purge", []):
        print(
            f"\npurge, {r['store']}, {r['code']} (schema: {r['schema']}): "
            f"{r['expired_at_start']:,} expired ids; first answer "
            f"{r['first_answer_seconds']:.2f} s "
            f"(empty store {r['empty_first_answer_seconds']:.2f} s); "
            f"{r['signs']} signs while purging (p50 {r['sign_p50_ms']:.1f} ms, p99 "
            f"{r['sign_p99_ms']:.1f} ms, max {r['sign_max_ms']:.1f} ms, {r['sign_errors']} errors)"
        )
        for when in ("before", "during"):
            st = r[when]
            if st.get("signs"):
                print(
                    f"  {when} the purge ({r['purge_seconds']:.1f} s): {st['signs']} signs, "
                    f"{st['errors']} errors, p50 {st['p50_ms']:.1f} ms, p99 {st['p99_ms']:.1f} "
                    f"ms, max {st['max_ms']:.1f} ms"
                )
        left = r["expired_left"]
        print(
            "  expired ids left: "
            + ", ".join(f"{t:g} s {n:,}" for t, n in left[:: max(1, len(left) // 8)])
        )
    write_results("state_growth", report, started_at, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
