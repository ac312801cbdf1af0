"""Bootstrap latency: from a one-time token to an identity with its server and client
contexts built, against the federatls CA and against the real step-ca.

What is measured
----------------
One bootstrap is what a workload does at start-up, timed from the moment it holds a token:

    identity = await federatls.bootstrap(token)
    identity.server_context()
    identity.client_context()

that is: fetch the root over unverified TLS and check its fingerprint against the token's
``sha``, make a P-256 key and CSR in memory, open a TLS connection pinned to that root and
``POST /1.0/sign``, ``GET /roots`` and ``GET /federation`` on it (HTTP keep-alive), check the
chain and key, then build the two ``ssl.SSLContext``s. Each CA gets ``--count`` bootstraps
(500 by default), one after another (one workload starting at a time), alternating between
the CAs bootstrap by bootstrap (step-ca, federatls, federatls, step-ca, ...) so that outside
load hits both alike. Reported per CA: median, p99 and mean latency, the CA's CPU
milliseconds per bootstrap (``/proc/<pid>/stat``) and this process's (``process_time``).

Both CAs run at the same time, each in its own process (``step-ca ca.json`` and
``python -m federatls ca serve ca.json``), each on a fresh PKI from
``federatls.ca.init_pki`` (P-256 root and intermediate, one JWK provisioner) whose ca.json
lists the root of a third, never-started CA in ``federatedRoots``, so ``/federation``
answers two roots, as in a federation. Tokens are minted just before each bootstrap (the
CAs are up: step-ca refuses tokens issued before it started), outside the timed part.

A breakdown of one bootstrap, step by step, follows: it repeats what
``federatls._bootstrap.bootstrap`` does with the same (partly private) functions, timing
each step (``--breakdown`` bootstraps per CA, 50 by default, median per step). Each is
followed by a real call, and the medians of both totals are printed under the steps, so a
drift between this copy and the real code would show.

What is not measured
--------------------
* Token minting (the issuer's work, not the workload's), ``bootstrap_sync`` (which adds an
  event-loop thread per call), key types other than P-256.
* Concurrent bootstraps (see ``sign_throughput.py`` for the CA under load), renewal.
* Network latency (everything is on 127.0.0.1) and CA start-up time.

Run ``python bench/bootstrap_latency.py --help``; bench/README.md explains how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import federatls
from federatls import Identity, TrustBundle
from federatls._bootstrap import _read_token
from federatls._client import CAClient, fetch_root
from federatls._errors import BadMaterialError
from federatls._issuance import check_issued
from federatls._keys import build_csr, new_private_key
from federatls._protocol import SignRequest
from federatls._x509 import split_sans
from sign_throughput import (
    CA,
    DEFAULT_STEPCA,
    make_pki,
    percentile,
    process_cpu_seconds,
    running,
    token_for,
    write_results,
)

MAX_ERROR_SAMPLES = 5


# --- The CAs --------------------------------------------------------------------------------
def prepare_cas(base: Path, stepca: str) -> list[CA]:
    """Two PKIs (step-ca's and federatls') that both federate a third CA's root."""
    peer = make_pki(base, "peer")  # never started: only its root is used
    cas = [make_pki(base, "step-ca"), make_pki(base, "federatls")]
    for ca in cas:
        config = json.loads(ca.config.read_text())
        config["federatedRoots"] = [str(peer.directory / "certs" / "root_ca.crt")]
        ca.config.write_text(json.dumps(config, indent=2))
    real, ours = cas
    real.command = [stepca, str(real.config), "--password-file", str(real.password)]
    ours.command = [sys.executable, "-m", "federatls", "ca", "serve", str(ours.config)]
    ours.command += ["--password-file", str(ours.password)]
    return cas


# --- One bootstrap, as a workload does it ----------------------------------------------------
async def bootstrap_with_contexts(token: str) -> Identity:
    """What is timed: the token to an identity with both its contexts built."""
    identity = await federatls.bootstrap(token)
    identity.server_context()
    identity.client_context()
    return identity


@dataclass
class Samples:
    """Every bootstrap against one CA."""

    latencies: list[float] = field(default_factory=list)  # seconds, successful ones
    client_cpu: float = 0.0  # seconds, this process, all bootstraps
    server_cpu: float = 0.0  # seconds, the CA process over the whole run
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


async def timed_bootstrap(ca: CA, subject: str, samples: Samples) -> None:
    token = token_for(ca, subject)  # outside the clock
    cpu = time.process_time()
    started = time.perf_counter()
    try:
        identity = await bootstrap_with_contexts(token)
        if identity.common_name != subject:
            raise BadMaterialError(f"got an identity for {identity.common_name!r}")
    except federatls.FederatlsError as exc:
        samples.errors += 1
        if len(samples.error_samples) < MAX_ERROR_SAMPLES:
            samples.error_samples.append(f"{type(exc).__name__}: {exc}")
    else:
        samples.latencies.append(time.perf_counter() - started)
    samples.client_cpu += time.process_time() - cpu


async def measure(cas: Sequence[CA], count: int, warmup: int) -> dict[str, Samples]:
    """``warmup`` then ``count`` bootstraps per CA, alternating CAs (ABBA)."""
    for i in range(warmup):
        for ca in cas:
            await timed_bootstrap(ca, f"warm{i}.bench.internal", Samples())
    samples = {ca.name: Samples() for ca in cas}
    cpu_before = {}
    for ca in cas:
        assert ca.process is not None
        cpu_before[ca.name] = process_cpu_seconds(ca.process.pid)
    for i in range(count):
        for ca in cas if i % 2 == 0 else cas[::-1]:
            await timed_bootstrap(ca, f"w{i}.bench.internal", samples[ca.name])
    for ca in cas:
        assert ca.process is not None
        samples[ca.name].server_cpu = process_cpu_seconds(ca.process.pid) - cpu_before[ca.name]
    return samples


# --- The breakdown: the same steps as federatls.bootstrap, each timed ------------------------
STEPS = (
    "read token",
    "fetch root (unverified TLS)",
    "new P-256 key",
    "CSR",
    "CA client (pinned context)",
    "POST /sign (new TLS conn.)",
    "GET /roots (same conn.)",
    "GET /federation (same conn.)",
    "close client",
    "check chain, build identity",
    "server_context()",
    "client_context()",
)


async def bootstrap_in_steps(token: str) -> list[float]:
    """``federatls._bootstrap.bootstrap`` followed by the two contexts, with a clock read
    between steps; returns the seconds of each step, in ``STEPS`` order."""
    marks = [time.perf_counter()]

    def mark() -> None:
        marks.append(time.perf_counter())

    parsed, ca_url, sha = _read_token(token, datetime.now(UTC))
    mark()
    root = await fetch_root(ca_url, sha)
    mark()
    key = new_private_key()
    mark()
    names = list(parsed.sans) or [parsed.subject]
    csr = build_csr(key, parsed.subject, names)
    request = SignRequest(csr, token)
    mark()
    ca = CAClient(ca_url, [root])
    mark()
    signed = await ca.sign(request)
    mark()
    own = await ca.roots_bundle()
    mark()
    federation = await ca.federation()
    mark()
    await ca.aclose()
    mark()
    trust = TrustBundle.from_ca(own, federation)
    check_issued(
        signed.chain,
        key=key.public_key(),
        subject=parsed.subject,
        names=split_sans(names),
        roots=trust.own(),
        now=datetime.now(UTC),
    )
    identity = Identity.from_parts(signed.chain, key, trust, ca_url)
    mark()
    identity.server_context()
    mark()
    identity.client_context()
    mark()
    return [b - a for a, b in itertools.pairwise(marks)]


@dataclass
class Breakdown:
    """Median milliseconds per step over the step-by-step bootstraps of one CA, and, for
    comparison, the median whole time of those and of real calls made in between."""

    steps_ms: list[float]  # in ``STEPS`` order
    total_ms: float  # median of the step-by-step bootstraps' totals
    real_ms: float  # median of the real calls interleaved with them


async def breakdown(cas: Sequence[CA], count: int) -> dict[str, Breakdown]:
    """``count`` step-by-step bootstraps per CA, each followed by a real one."""
    steps: dict[str, list[list[float]]] = {ca.name: [] for ca in cas}
    real: dict[str, Samples] = {ca.name: Samples() for ca in cas}
    for i in range(count):
        for ca in cas if i % 2 == 0 else cas[::-1]:
            steps[ca.name].append(await bootstrap_in_steps(token_for(ca, f"b{i}.bench.internal")))
            await timed_bootstrap(ca, f"r{i}.bench.internal", real[ca.name])
    return {
        name: Breakdown(
            steps_ms=[statistics.median(column) * 1000 for column in zip(*rows, strict=True)],
            total_ms=statistics.median(sum(row) for row in rows) * 1000,
            real_ms=statistics.median(real[name].latencies) * 1000,
        )
        for name, rows in steps.items()
    }


# --- Report ---------------------------------------------------------------------------------
@dataclass
class CAResult:
    ca: str
    version: str
    bootstraps: int  # successful ones
    errors: int
    median_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    ca_cpu_ms: float  # CA CPU milliseconds per bootstrap
    client_cpu_ms: float  # this process's CPU milliseconds per bootstrap
    error_samples: list[str]


def summarise(ca: CA, samples: Samples) -> CAResult:
    latencies = sorted(samples.latencies)
    done = max(1, len(latencies) + samples.errors)
    return CAResult(
        ca=ca.name,
        version=ca.version,
        bootstraps=len(latencies),
        errors=samples.errors,
        median_ms=statistics.median(latencies) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        mean_ms=statistics.fmean(latencies) * 1000,
        max_ms=latencies[-1] * 1000,
        ca_cpu_ms=samples.server_cpu / done * 1000,
        client_cpu_ms=samples.client_cpu / done * 1000,
        error_samples=samples.error_samples,
    )


def print_results(rows: Sequence[CAResult]) -> None:
    print(
        f"\n{'CA':<10} {'boots':>6} {'errors':>6} {'median ms':>9} {'p99 ms':>7} "
        f"{'mean ms':>7} {'max ms':>7} {'CA cpu ms':>9} {'client cpu ms':>13}"
    )
    for r in rows:
        print(
            f"{r.ca:<10} {r.bootstraps:>6} {r.errors:>6} {r.median_ms:>9.2f} {r.p99_ms:>7.2f} "
            f"{r.mean_ms:>7.2f} {r.max_ms:>7.2f} {r.ca_cpu_ms:>9.2f} {r.client_cpu_ms:>13.2f}"
        )


def print_breakdown(results: dict[str, Breakdown]) -> None:
    names = list(results)
    print("\nOne bootstrap, step by step (median ms per step)")
    print(f"{'step':<34} " + " ".join(f"{n:>10}" for n in names))
    rows = [(step, [results[n].steps_ms[i] for n in names]) for i, step in enumerate(STEPS)]
    rows += [
        ("sum of the step medians", [sum(results[n].steps_ms) for n in names]),
        ("median step-by-step total", [results[n].total_ms for n in names]),
        ("median real call, interleaved", [results[n].real_ms for n in names]),
    ]
    for what, values in rows:
        print(f"{what:<34} " + " ".join(f"{v:>10.2f}" for v in values))


# --- Main -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=500, help="bootstraps per CA (default 500)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up bootstraps per CA")
    p.add_argument(
        "--breakdown", type=int, default=50, help="step-by-step bootstraps per CA (0: none)"
    )
    p.add_argument(
        "--stepca",
        default=os.environ.get("FEDERATLS_STEPCA", DEFAULT_STEPCA),
        help=f"step-ca binary (default $FEDERATLS_STEPCA or {DEFAULT_STEPCA})",
    )
    p.add_argument("--workdir", type=Path, help="where the temporary PKIs go (default: $TMPDIR)")
    p.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stepca = shutil.which(args.stepca) or args.stepca
    if not os.access(stepca, os.X_OK):
        print(f"step-ca not found at {stepca}: build it or pass --stepca", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="federatls-bench-boot-", dir=args.workdir))
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    try:
        cas = prepare_cas(base, stepca)
        with ExitStack() as stack:
            for ca in cas:
                stack.enter_context(running(ca))
                print(f"{ca.name} {ca.version} at {ca.url}", flush=True)
            print(f"  {args.count} bootstraps per CA ...", flush=True)
            samples = asyncio.run(measure(cas, args.count, args.warmup))
            steps: dict[str, Breakdown] = {}
            if args.breakdown:
                print(f"  {args.breakdown} step-by-step bootstraps per CA ...", flush=True)
                steps = asyncio.run(breakdown(cas, args.breakdown))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    rows = [summarise(ca, samples[ca.name]) for ca in cas]
    print(f"\n{os.cpu_count()} CPUs, load average before the run {load_before[0]:.2f}")
    print_results(rows)
    real, ours = rows
    ratio = {
        "median": ours.median_ms / real.median_ms,
        "p99": ours.p99_ms / real.p99_ms,
        "ca_cpu": ours.ca_cpu_ms / real.ca_cpu_ms,
    }
    print(
        f"\nfederatls / step-ca (below 1 favours federatls): median {ratio['median']:.2f}x, "
        f"p99 {ratio['p99']:.2f}x, CA cpu {ratio['ca_cpu']:.2f}x"
    )
    if steps:
        print_breakdown(steps)

    report = {
        "benchmark": "bootstrap_latency",
        "started": started.isoformat(),
        "settings": {"count": args.count, "warmup": args.warmup, "breakdown": args.breakdown},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "cas": {ca.name: {"version": ca.version, "command": " ".join(ca.command)} for ca in cas},
        "federatls_version": federatls.__version__,
        "results": [asdict(r) for r in rows],
        "ratios_federatls_over_stepca": ratio,
        "breakdown": {
            name: {
                "steps_median_ms": dict(zip(STEPS, b.steps_ms, strict=True)),
                "total_median_ms": b.total_ms,
                "real_call_median_ms": b.real_ms,
            }
            for name, b in steps.items()
        },
    }
    write_results("bootstrap_latency", report, started, args.json)
    errors = sum(r.errors for r in rows)
    if errors:
        print(f"{errors} bootstrap(s) failed; see error_samples in the JSON", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
