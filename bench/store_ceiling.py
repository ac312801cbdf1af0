"""The store's own ceiling: how many certificate records per second SQLite and PostgreSQL
commit, with no CA in front of them.

What is measured
----------------
``Store.record_issuances`` called in a loop with realistic records (a spent token and the
certificate it bought: a 24-hour P-256 leaf of the size the CA issues, a fresh serial and
token id each), in batches the size of the CA's group commit (one event-loop turn's
certificates: 1 at one client, a few to a few dozen under load), from one thread and from
several (each with its own store, as separate CA processes or replicas have). SQLite in two
flavours: non-durable commits (what a sign with a past-``iat`` token makes: WAL,
``synchronous=NORMAL``) and durable ones (synced to disk before the answer). PostgreSQL
commits are always durable on the server before the answer.

Figures per configuration: commits and records per second, and the CPU per record of this
process and of the PostgreSQL server. Dividing the records per second by the CA's
certificates per CPU-second (``1000 / CA ms/cert`` from ``sign_throughput.py``) gives the
number of cores of CA at which the store, not the CPU, would bind.

Configurations run in alternating rounds (each one a short slice per round, the order
reversed every other round), since the machine is shared and its speed drifts.

What is not measured
--------------------
Reads (replay checks, revocation checks), revocations, the network between a CA and a
PostgreSQL server on another machine (here it is loopback), a store grown large (state
growth is measured apart).

Run ``python bench/store_ceiling.py --help``; bench/README.md explains how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federatls.ca._database import Database, init_schema, open_store
from federatls.ca._store import IssuedCertificate, SQLiteStore, Store, TokenUse
from sign_throughput import (
    RESULTS_DIR,
    postgres_cluster,
    process_cpu_seconds,
    tree_cpu_seconds,
    write_results,
)

CHECKPOINT_INTERVAL = 0.1  # seconds, as the CA's server opens its store


def sample_certificate() -> bytes:
    """DER of a leaf like the ones the CA issues (P-256, a DNS SAN, 24 hours), so a record
    has a realistic size; the store does not parse it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w0.bench.internal")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=24))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("w0.bench.internal")]), False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


class Records:
    """An endless supply of distinct records (thread-safe: one counter for all threads)."""

    def __init__(self, durable: bool) -> None:
        self._der = sample_certificate()
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self.durable = durable

    def batch(self, size: int) -> list[TokenUse]:
        with self._lock:
            numbers = [next(self._numbers) for _ in range(size)]
        now = datetime.now(UTC)
        uses = []
        for n in numbers:
            token_id = f"{os.getpid()}-{n:012d}-bench-token-id-of-forty-odd-chars"
            subject = f"w{n}.bench.internal"
            cert = IssuedCertificate(
                serial=str(2**120 + n * 7919 + os.getpid()),
                subject=subject,
                sans=(subject,),
                not_before=now,
                not_after=now + timedelta(hours=24),
                provisioner="admin:WyKLU-4iYCtdgNGyE-c4bMJ2piFdn8KPQc13Z_PFvMY",
                der=self._der,
                operation="sign",
                token_id=token_id,
            )
            uses.append(
                TokenUse(
                    token_id=token_id,
                    provisioner=cert.provisioner,
                    expires_at=now + timedelta(minutes=5),
                    used_at=now,
                    certificate=cert,
                    durable=self.durable,
                )
            )
        return uses


# --- The stores under test -----------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One configuration: a store kind, a batch size and a number of threads."""

    store: str  # "sqlite", "sqlite-durable" or "postgresql"
    batch: int
    threads: int

    @property
    def name(self) -> str:
        return f"{self.store} batch {self.batch} x{self.threads}"


@dataclass
class Slice:
    commits: int
    records: int
    seconds: float
    cpu: float  # this process's CPU seconds
    db_cpu: float  # the PostgreSQL server's CPU seconds


def run_slice(
    stores: Sequence[Store], records: Records, batch: int, seconds: float, db_pid: int
) -> Slice:
    """Every store in its own thread, committing batches for ``seconds``."""
    counts = [0] * len(stores)
    errors: list[BaseException] = []
    start = time.monotonic() + 0.05
    stop = start + seconds

    def work(i: int, store: Store) -> None:
        try:
            while time.monotonic() < start:
                time.sleep(0.001)
            while time.monotonic() < stop:
                uses = records.batch(batch)
                if not all(store.record_issuances(uses)):
                    raise RuntimeError("a fresh token was refused as spent")
                counts[i] += 1
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(stores)]
    db_before = tree_cpu_seconds(db_pid) if db_pid else {}
    cpu_before = process_cpu_seconds(os.getpid())
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    cpu = process_cpu_seconds(os.getpid()) - cpu_before
    db_after = tree_cpu_seconds(db_pid) if db_pid else {}
    if errors:
        raise errors[0]
    db = sum(v - db_before.get(pid, 0.0) for pid, v in db_after.items())
    return Slice(sum(counts), sum(counts) * batch, elapsed, cpu, db)


@dataclass
class Result:
    config: str
    store: str
    batch: int
    threads: int
    commits_per_s: float
    records_per_s: float
    client_ms_per_record: float  # this process: building records, the driver, SQLite itself
    db_ms_per_record: float  # the PostgreSQL server
    round_records_per_s: list[float]
    cores_to_bind: float  # records/s divided by the CA's certificates per CPU-second


def summarise(config: Config, slices: Sequence[Slice], ca_ms_per_cert: float) -> Result:
    seconds = sum(s.seconds for s in slices)
    records = sum(s.records for s in slices)
    rate = records / seconds
    return Result(
        config=config.name,
        store=config.store,
        batch=config.batch,
        threads=config.threads,
        commits_per_s=sum(s.commits for s in slices) / seconds,
        records_per_s=rate,
        client_ms_per_record=sum(s.cpu for s in slices) / max(records, 1) * 1000,
        db_ms_per_record=sum(s.db_cpu for s in slices) / max(records, 1) * 1000,
        round_records_per_s=[s.records / s.seconds for s in slices],
        cores_to_bind=rate * ca_ms_per_cert / 1000 if ca_ms_per_cert else 0.0,
    )


# --- PostgreSQL (the test suite's throwaway cluster and the CA's store) ---------------------
def open_postgres(url: str, *, init: bool) -> Store:
    """The CA's PostgreSQL store on ``url`` (its schema made first when ``init``)."""
    db = Database.postgresql(url)
    if init:
        init_schema(db)
    return open_store(db)


# --- Main -----------------------------------------------------------------------------------
def latest_ca_ms_per_cert() -> float:
    """The federatls CA's CPU milliseconds per certificate at its busiest level in the
    newest ``sign_throughput`` result on this machine; 0 if there is none."""
    files = sorted(RESULTS_DIR.glob("sign_throughput-*.json"))
    for path in reversed(files):
        rows = json.loads(path.read_text()).get("results", {}).get("federatls", [])
        if rows:
            return float(max(rows, key=lambda r: r["concurrency"])["server_ms_per_cert"])
    return 0.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--stores",
        default="sqlite,sqlite-durable,postgresql",
        help="any of sqlite, sqlite-durable, postgresql (comma-separated)",
    )
    p.add_argument("--batches", default="1,16", help="records per commit, comma-separated")
    p.add_argument("--threads", default="1,4", help="writing threads, comma-separated")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per slice")
    p.add_argument("--rounds", type=int, default=2, help="slices per configuration")
    p.add_argument(
        "--ca-ms-per-cert",
        type=float,
        default=None,
        help="the CA's CPU ms per certificate (default: the newest sign_throughput result)",
    )
    p.add_argument("--workdir", type=Path, help="where the SQLite files go (default: $TMPDIR)")
    p.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = args.stores.split(",")
    if not set(kinds) <= {"sqlite", "sqlite-durable", "postgresql"} or args.rounds < 1:
        print(
            "--stores: sqlite, sqlite-durable or postgresql; --rounds at least 1", file=sys.stderr
        )
        return 2
    configs = [
        Config(kind, int(b), int(t))
        for kind in kinds
        for b in args.batches.split(",")
        for t in args.threads.split(",")
    ]
    ca_ms = args.ca_ms_per_cert if args.ca_ms_per_cert is not None else latest_ca_ms_per_cert()
    base = Path(tempfile.mkdtemp(prefix="federatls-store-", dir=args.workdir))
    started = datetime.now(UTC)
    slices: dict[Config, list[Slice]] = {c: [] for c in configs}
    try:
        with contextlib.ExitStack() as stack:
            db_pid, new_database = 0, None
            if "postgresql" in kinds:
                db_pid, new_database = stack.enter_context(postgres_cluster())
            for r in range(args.rounds):
                for config in configs if r % 2 == 0 else reversed(configs):
                    stores: list[Store] = []
                    if config.store == "postgresql":
                        assert new_database is not None
                        url = new_database()
                        stores = [open_postgres(url, init=i == 0) for i in range(config.threads)]
                    else:
                        path = base / f"{config.store}-{config.batch}-{config.threads}-{r}.db"
                        stores = [
                            SQLiteStore(path, checkpoint_interval=CHECKPOINT_INTERVAL)
                            for _ in range(config.threads)
                        ]
                    try:
                        records = Records(durable=config.store != "sqlite")
                        pid = db_pid if config.store == "postgresql" else 0
                        slices[config].append(
                            run_slice(stores, records, config.batch, args.seconds, pid)
                        )
                    finally:
                        for store in stores:
                            store.close()
                    print(".", end="", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()

    results = [summarise(c, slices[c], ca_ms) for c in configs]
    print(f"\n{os.cpu_count()} CPUs; {args.rounds} rounds of {args.seconds:g} s per configuration")
    print(
        f"{'configuration':<32} {'commits/s':>9} {'records/s':>9} {'ms/rec':>7} "
        f"{'db ms/rec':>9} {'cores':>6}  records/s in each round"
    )
    for res in results:
        rounds = " ".join(f"{x:.0f}" for x in res.round_records_per_s)
        print(
            f"{res.config:<32} {res.commits_per_s:>9.0f} {res.records_per_s:>9.0f} "
            f"{res.client_ms_per_record:>7.3f} {res.db_ms_per_record:>9.3f} "
            f"{res.cores_to_bind:>6.1f}  {rounds}"
        )
    if ca_ms:
        print(
            f"cores: at {ca_ms:.2f} CA CPU ms per certificate ({1000 / ca_ms:.0f} certificates "
            "per CPU-second), the number of CA cores whose certificates fill the store"
        )
    report = {
        "benchmark": "store_ceiling",
        "started": started.isoformat(),
        "settings": vars(args) | {"workdir": str(args.workdir), "json": str(args.json)},
        "ca_ms_per_cert": ca_ms,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": [asdict(r) for r in results],
    }
    write_results("store_ceiling", report, started, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
