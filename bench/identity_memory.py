"""Memory per live identity: what one bootstrapped federatls identity, kept alive with its
server and client contexts, costs a process; against stdlib contexts loaded from files for
the same certificates.

What is measured
----------------
A federatls CA runs as a subprocess (``python -m federatls ca serve``) on a fresh PKI from
``federatls.ca.init_pki`` whose ca.json federates a second root, so every identity trusts
two roots, as in a federation. Each measurement runs in a fresh process of its own (so
nothing left over from another measurement is counted), first warms up (five identities or
context pairs made and dropped: imports, caches and OpenSSL's one-off set-up are excluded),
then:

* ``federatls``: bootstraps ``--count`` identities (200 by default) and keeps them
  (``identity objects``), then builds and keeps ``server_context()`` and
  ``client_context()`` for each (``+ contexts``). The sum is the cost of one live identity.
* ``stdlib``: for the same certificates, written as files (chain, plaintext key, federation
  bundle) by the first ``federatls`` process, loads and keeps one server and one client
  context per identity the ordinary way (``load_cert_chain`` and ``load_verify_locations``
  from the files; the same functions as ``handshake.py``'s baseline).

Each is measured two ways, in separate processes:

* ``tracemalloc``: the growth of Python's heap (``tracemalloc.get_traced_memory()``) after
  ``gc.collect()``: live Python objects only, nothing freed is counted. It does not see
  memory that OpenSSL (the ``SSL_CTX``, its certificate store and key) or the Rust core of
  ``cryptography`` (parsed certificates, keys) take from ``malloc`` directly.
* ``RSS``: the growth of ``VmRSS`` in ``/proc/self/status`` (without tracemalloc, whose own
  bookkeeping would inflate it), read after ``gc.collect()`` and glibc's ``malloc_trim(0)``
  (free pages handed back to the kernel). It sees everything, OpenSSL and Rust included,
  but also fragmentation: pages kept because a few live bytes remain on them, for
  ``identity objects`` partly what bootstrapping (HTTP clients, TLS connections to the CA)
  left behind among the identities' own allocations.

Results are KiB per identity (per pair of contexts for ``stdlib``).

What is not measured
--------------------
* Memory of connections (each ``SSLObject`` and its buffers), of the CA, or of the
  interpreter and libraries themselves (excluded by the warm-up).
* Key types other than P-256, larger trust bundles (two roots here), renewal churn.
* Shared pages: RSS counts a page once however many identities share it.

Run ``python bench/identity_memory.py --help``; bench/README.md explains how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import gc
import json
import multiprocessing
import platform
import shutil
import ssl
import sys
import tempfile
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import federatls
from handshake import Files, stdlib_client_context, stdlib_server_context, write_files
from sign_throughput import CA, make_pki, running, token_for, write_results

WARMUP = 5  # identities or context pairs made and dropped before the measured ones


# --- Measuring a process from inside ---------------------------------------------------------
def rss_kib() -> int:
    """This process's resident set size (VmRSS), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])  # "VmRSS:   123456 kB"
    raise RuntimeError("no VmRSS in /proc/self/status")


def heap_bytes() -> int:
    """Bytes of live Python objects traced by tracemalloc."""
    return tracemalloc.get_traced_memory()[0]


def release_free_memory() -> None:
    """Give the pages malloc holds but nobody uses back to the kernel (glibc's
    ``malloc_trim(0)``), so RSS shows live memory rather than what earlier work freed."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@dataclass
class Reading:
    """Memory in use at one point, after a full garbage collection and a malloc trim."""

    heap: int = 0  # bytes, tracemalloc (0 when not tracing)
    rss: int = 0  # KiB

    @classmethod
    def now(cls) -> Reading:
        gc.collect()
        release_free_memory()
        return cls(heap_bytes() if tracemalloc.is_tracing() else 0, rss_kib())


@dataclass
class Phase:
    """Growth over one phase of a measurement, per identity."""

    name: str
    heap_kib: float  # per identity, tracemalloc
    rss_kib: float  # per identity, VmRSS


def phase(name: str, before: Reading, after: Reading, count: int) -> Phase:
    return Phase(name, (after.heap - before.heap) / 1024 / count, (after.rss - before.rss) / count)


# --- The measurements, each in a process of its own ------------------------------------------
@dataclass
class Job:
    kind: str  # "federatls" or "stdlib"
    trace: bool  # tracemalloc on (heap figures) or off (RSS figures)
    tokens: list[str] = field(default_factory=list)  # federatls: WARMUP + count tokens
    files: list[Files] = field(default_factory=list)  # stdlib: WARMUP + count identities
    write_to: Path | None = None  # federatls: write the identities' files here afterwards


@dataclass
class JobResult:
    phases: list[Phase]
    files: list[Files]  # what a federatls job wrote for the stdlib jobs
    top: list[str]  # the largest tracemalloc allocation sites, when tracing


async def _warm_up(tokens: Sequence[str]) -> None:
    for token in tokens:
        identity = await federatls.bootstrap(token)
        identity.server_context()
        identity.client_context()


async def _federatls(job: Job) -> JobResult:
    warm, tokens = job.tokens[:WARMUP], job.tokens[WARMUP:]
    await _warm_up(warm)
    snapshot = tracemalloc.take_snapshot() if job.trace else None  # before ``start``
    start = Reading.now()
    identities = [await federatls.bootstrap(token) for token in tokens]
    bootstrapped = Reading.now()
    contexts = [(i.server_context(), i.client_context()) for i in identities]
    ready = Reading.now()
    top = _top_sites(snapshot) if snapshot else []
    n = len(identities)
    phases = [
        phase("identity objects", start, bootstrapped, n),
        phase("+ server and client contexts", bootstrapped, ready, n),
        phase("identity with its contexts", start, ready, n),
    ]
    files = []
    if job.write_to is not None:
        for i, identity in enumerate(identities):
            files.append(write_files(identity, job.write_to, f"id{i}"))
    del contexts
    return JobResult(phases, files, top)


def _stdlib(job: Job) -> JobResult:
    for files in job.files[:WARMUP]:
        stdlib_server_context(files)
        stdlib_client_context(files)
    for files in job.files:  # pathlib caches a path's string on first use: not the contexts'
        str(files.chain), str(files.key), str(files.bundle)
    snapshot = tracemalloc.take_snapshot() if job.trace else None  # before ``start``
    start = Reading.now()
    pairs = [(stdlib_server_context(f), stdlib_client_context(f)) for f in job.files[WARMUP:]]
    ready = Reading.now()
    top = _top_sites(snapshot) if snapshot else []
    result = JobResult([phase("server and client contexts", start, ready, len(pairs))], [], top)
    del pairs
    return result


def _top_sites(before: tracemalloc.Snapshot, limit: int = 8) -> list[str]:
    """Where the Python heap grew most since ``before`` (file:line, KiB, blocks)."""
    gc.collect()
    stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
    return [
        f"{s.size_diff / 1024:9.1f} KiB {s.count_diff:>7} blocks  {s.traceback[0]}"
        for s in stats[:limit]
    ]


def run_job(job: Job) -> JobResult:
    """Entry point of a measuring process."""
    if job.trace:
        tracemalloc.start()
    if job.kind == "federatls":
        return asyncio.run(_federatls(job))
    return _stdlib(job)


def in_fresh_process(job: Job) -> JobResult:
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(run_job, job).result()


# --- Main -----------------------------------------------------------------------------------
def tokens(ca: CA, count: int, run: str) -> list[str]:
    return [token_for(ca, f"{run}-{i}.bench.internal") for i in range(WARMUP + count)]


def measure(ca: CA, count: int, directory: Path) -> dict[str, dict[str, JobResult]]:
    """federatls traced (and writing the files), stdlib traced, federatls RSS, stdlib RSS."""
    print("  federatls, tracemalloc ...", flush=True)
    written = in_fresh_process(Job("federatls", True, tokens(ca, count, "t"), write_to=directory))
    print("  stdlib, tracemalloc ...", flush=True)
    stdlib_traced = in_fresh_process(Job("stdlib", True, files=written.files))
    print("  federatls, RSS ...", flush=True)
    federatls_rss = in_fresh_process(Job("federatls", False, tokens(ca, count, "r")))
    print("  stdlib, RSS ...", flush=True)
    stdlib_rss = in_fresh_process(Job("stdlib", False, files=written.files))
    return {
        "federatls": {"tracemalloc": written, "rss": federatls_rss},
        "stdlib": {"tracemalloc": stdlib_traced, "rss": stdlib_rss},
    }


@dataclass
class Row:
    what: str
    heap_kib: float  # per identity (per pair of contexts for stdlib), tracemalloc
    rss_kib: float  # the same, VmRSS


def table(results: dict[str, dict[str, JobResult]]) -> list[Row]:
    """One row per phase: the heap figure from the traced process, RSS from the other."""
    return [
        Row(f"{kind}: {traced.name}", traced.heap_kib, rss.rss_kib)
        for kind, runs in results.items()
        for traced, rss in zip(runs["tracemalloc"].phases, runs["rss"].phases, strict=True)
    ]


def print_table(rows: Sequence[Row]) -> None:
    print(f"\n{'KiB per identity':<46} {'Python heap':>11} {'RSS':>8}")
    for r in rows:
        print(f"{r.what:<46} {r.heap_kib:>11.1f} {r.rss_kib:>8.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=200, help="live identities (default 200)")
    p.add_argument("--top", action="store_true", help="print the largest allocation sites")
    p.add_argument("--workdir", type=Path, help="where the temporary files go (default: $TMPDIR)")
    p.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    args = p.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="federatls-bench-memory-", dir=args.workdir))
    started = datetime.now(UTC)
    try:
        peer, ca = make_pki(base, "peer"), make_pki(base, "federatls")  # peer: root only
        config = json.loads(ca.config.read_text())
        config["federatedRoots"] = [str(peer.directory / "certs" / "root_ca.crt")]
        ca.config.write_text(json.dumps(config, indent=2))
        ca.command = [sys.executable, "-m", "federatls", "ca", "serve", str(ca.config)]
        ca.command += ["--password-file", str(ca.password)]
        files = base / "identities"  # the stdlib baseline's files, plaintext keys included
        files.mkdir(mode=0o700)
        with running(ca):
            print(f"federatls CA {ca.version} at {ca.url}; {args.count} identities", flush=True)
            results = measure(ca, args.count, files)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\nPython {platform.python_version()}, {ssl.OPENSSL_VERSION}, P-256 keys, two roots")
    rows = table(results)
    print_table(rows)
    by_name = {r.what: r for r in rows}
    ours = by_name["federatls: identity with its contexts"]
    contexts = by_name["federatls: + server and client contexts"]
    theirs = by_name["stdlib: server and client contexts"]
    ratio = {
        "identity_with_contexts_rss": ours.rss_kib / theirs.rss_kib,
        "contexts_only_rss": contexts.rss_kib / theirs.rss_kib,
    }
    print(
        f"\nRSS, federatls / stdlib: identity with its contexts "
        f"{ratio['identity_with_contexts_rss']:.2f}x, the contexts alone "
        f"{ratio['contexts_only_rss']:.2f}x"
    )
    if args.top:
        for kind, runs in results.items():
            print(f"\nLargest Python heap growth, {kind} (tracemalloc, whole measured phase)")
            print("\n".join(runs["tracemalloc"].top))

    report = {
        "benchmark": "identity_memory",
        "started": started.isoformat(),
        "settings": {"count": args.count, "warmup": WARMUP},
        "machine": {
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "platform": platform.platform(),
        },
        "ca": {"version": ca.version},
        "federatls_version": federatls.__version__,
        "kib_per_identity": [asdict(r) for r in rows],
        "ratios_federatls_over_stdlib": ratio,
        "top_heap_sites": {kind: runs["tracemalloc"].top for kind, runs in results.items()},
    }
    write_results("identity_memory", report, started, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
