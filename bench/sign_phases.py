"""Where one certificate's time goes at one client: the federatls CA against the real step-ca.

``sign_throughput.py`` says how many certificates per second each CA issues; this says in
which phase of a request the two differ. One client sends ``POST /1.0/sign`` requests one
after the other, each on a new connection, exactly as ``sign_throughput.py`` does, and times
three phases from the client's side:

* ``handshake``: from the connect call until the TLS handshake is done on the client
  (TCP connect, the CA's first flight, the client's verification of the CA's chain);
* ``first byte``: from writing the request until the first byte of the answer (the CA
  finishing the handshake, then reading, checking, signing, recording and answering);
* ``to EOF``: from the first byte until the connection's end (the rest of the answer, the
  CA's close_notify and TCP close).

The client's own work is the same for every CA, so differences between CAs are the CAs'.
The CAs run side by side and are measured in interleaved blocks (A B, then B A, ...), so the
machine's drift reaches them all alike. ``--compare NAME=SRC`` adds a federatls CA run from
another source tree (for example a ``git worktree`` of an older commit), for A/B checks of a
change to the CA.

Usage::

    python bench/sign_phases.py                          # 10 blocks of 1,000 requests per CA
    python bench/sign_phases.py --compare before=/tmp/before/src

Writes ``bench/results/sign_phases-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sign_throughput as st  # the sibling benchmark: PKIs, CAs, requests

PHASES = ("handshake", "first byte", "to EOF", "total")
WARMUP = 50  # requests per CA and block before timing


async def _one(ca: st.CA, ctx: ssl.SSLContext, request: bytes) -> tuple[float, ...]:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(
        ca.host, ca.port, ssl=ctx, server_hostname=ca.host
    )
    connected = time.perf_counter()
    try:
        writer.write(request)
        first = await reader.read(1)
        answered = time.perf_counter()
        rest = await reader.read()
        ended = time.perf_counter()
    finally:
        writer.close()
    answer = first + rest
    if not (answer.startswith(b"HTTP/1.1 201 ") and b'"crt"' in answer):
        raise RuntimeError(f"{ca.name}: {answer[:300]!r}")
    return connected - started, answered - connected, ended - answered, ended - started


async def _block(ca: st.CA, requests: Sequence[bytes]) -> list[tuple[float, ...]]:
    ctx = st.client_context(ca.root_pem)
    return [await _one(ca, ctx, request) for request in requests]


def measure(cas: Sequence[st.CA], blocks: int, per_block: int) -> dict[str, dict[str, Any]]:
    """Time ``per_block`` requests per CA and block; the CA order reverses every block."""
    samples: dict[str, list[tuple[float, ...]]] = {ca.name: [] for ca in cas}
    cpu = dict.fromkeys(samples, 0.0)
    for i in range(blocks):
        for ca in cas if i % 2 == 0 else list(reversed(cas)):
            assert ca.process is not None
            requests = st.prepare_requests(ca, WARMUP + per_block)
            asyncio.run(_block(ca, requests[:WARMUP]))
            before = st.process_cpu_seconds(ca.process.pid)
            samples[ca.name] += asyncio.run(_block(ca, requests[WARMUP:]))
            cpu[ca.name] += st.process_cpu_seconds(ca.process.pid) - before
        print(".", end="", flush=True)
    print()
    out = {}
    for name, rows in samples.items():
        columns = dict(zip(PHASES, zip(*rows, strict=True), strict=True))
        out[name] = {
            "requests": len(rows),
            "cert_per_s": len(rows) / sum(columns["total"]),
            "ca_ms_per_cert": cpu[name] / len(rows) * 1e3,
            "median_us": {p: statistics.median(c) * 1e6 for p, c in columns.items()},
            "mean_us": {p: statistics.fmean(c) * 1e6 for p, c in columns.items()},
        }
    return out


def report(results: dict[str, dict[str, Any]]) -> None:
    header = "".join(f"{p:>18}" for p in PHASES)
    print(f"median / mean, µs{header}    cert/s CA ms/cert")
    for name, r in results.items():
        cells = "".join(f"{r['median_us'][p]:>10.0f} /{r['mean_us'][p]:>6.0f}" for p in PHASES)
        print(f"{name:17}{cells}  {r['cert_per_s']:8.1f} {r['ca_ms_per_cert']:10.3f}")
    base = results["step-ca"]
    print("\nagainst step-ca (median difference in µs; cert/s as a ratio)")
    for name, r in results.items():
        if name == "step-ca":
            continue
        diffs = "".join(f"{r['median_us'][p] - base['median_us'][p]:>+18.0f}" for p in PHASES)
        print(f"{name:17}{diffs}  {r['cert_per_s'] / base['cert_per_s']:7.2f}x")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=10, help="interleaved blocks (10)")
    parser.add_argument("--per-block", type=int, default=1000, help="requests per CA and block")
    parser.add_argument("--stepca", default=os.environ.get("FEDERATLS_STEPCA", st.DEFAULT_STEPCA))
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="also run a federatls CA from the source tree SRC (its src/ directory)",
    )
    parser.add_argument("--json", type=Path, help="result file")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.per_block < 1:
        print("--blocks and --per-block must be at least 1", file=sys.stderr)
        return 2
    stepca = st.find_stepca(args.stepca)
    if stepca is None:
        return 2
    extra: list[tuple[str, Path]] = []
    for spec in args.compare:
        name, sep, src = spec.partition("=")
        if not sep or not name or name in ("step-ca", "federatls") or not Path(src).is_dir():
            print(f"--compare {spec!r}: want NAME=SRC with SRC a directory", file=sys.stderr)
            return 2
        extra.append((name, Path(src).resolve()))

    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="federatls-phases-") as tmp:
        base = Path(tmp)
        real = st.make_pki(base, "step-ca")
        real.command = [stepca, str(real.config), "--password-file", str(real.password)]
        cas = [real]
        for name, src in [("federatls", None), *extra]:
            ca = st.make_pki(base, name)
            env = [] if src is None else ["env", f"PYTHONPATH={src}"]
            ca.command = [*env, sys.executable, "-m", "federatls", "ca", "serve"]
            ca.command += [str(ca.config), "--password-file", str(ca.password)]
            cas.append(ca)
        with contextlib.ExitStack() as stack:
            for ca in cas:
                stack.enter_context(st.running(ca))
            print(f"{len(cas)} CAs, {args.blocks} blocks of {args.per_block} requests each")
            results = measure(cas, args.blocks, args.per_block)
    report(results)
    out = args.json or st.RESULTS_DIR / f"sign_phases-{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "sign_phases",
        "started": started.isoformat(),
        "settings": {"blocks": args.blocks, "per_block": args.per_block},
        "compare": {name: str(src) for name, src in extra},
        "results": results,
    }
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
