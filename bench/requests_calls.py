"""Calls per second through federatls's requests ``Session`` and urllib3 ``PoolManager``
against the same libraries configured from PEM files by hand, in one run; and the p99 of
calls while the client's certificate renews every two seconds against steady state.

What is measured
----------------
Two federated federatls CAs run in this process (``federatls.testing.federated_pair``). A
server process (its own GIL) enrolled with "cloud" serves a minimal keep-alive HTTP/1.1
``GET /`` (a 3-byte answer) over ``asyncio.start_server(ssl=identity.server_context())``
on 127.0.0.1. The client, enrolled with "kubernetes", calls it from ``--threads`` threads
(4) sharing one client, each sending its next call as soon as the last one is answered
(body read). Keep-alive, so handshakes are rare: what is compared is the per-call cost.

1. Calls per second, four variants in alternating segments (ABBA over the list, so a linear
   drift in outside load cancels out), ``--rounds`` rounds of ``--segment`` seconds each:

   * ``federatls-requests``: ``federatls.integrations.requests.Session(identity)``;
   * ``pem-requests``: ``requests.Session()`` with ``cert=(chain.pem, key.pem)`` and
     ``verify=bundle.pem``;
   * ``federatls-urllib3``: ``federatls.integrations.urllib3.PoolManager(identity)``;
   * ``pem-urllib3``: ``urllib3.PoolManager(cert_file=, key_file=, ca_certs=)``.

   requests and urllib3 take a client key only from a file, and requests cannot take a
   password for it: the baseline's key is written in plaintext by this script (not by the
   library) to a 0700 temporary directory, removed at the end. The same certificate, key and
   roots on both sides of each pair. Both requests sessions have ``trust_env = False``: the
   baseline needs it (``REQUESTS_CA_BUNDLE`` would replace its ``verify=``), and with it
   requests skips its per-call look for ``~/.netrc`` (about 9 µs), so federatls's has it too,
   lest the ratio count that look against federatls.

2. p99 during renewal: ``federatls-requests`` with a ``RenewingIdentity`` (its renewals on a
   background thread, ``keep_renewed_sync``) whose certificates live ``--lifetime`` seconds
   (3: a renewal, and so a new pool and a new handshake, about every two seconds), against
   the same with a 24-hour certificate; segments steady, churn, churn, steady of
   ``--window`` seconds. Reported: calls/s, p50 and p99 latency, failed calls (must be 0),
   renewals in the window, and the p99 of the calls that started within 250 ms after a
   swap.

What is not measured: the network (loopback only), request or response bodies of any
size, HTTP/2 (neither library speaks it), handshake cost (bench/handshake.py), the server's
renewals (bench/renewal_under_load.py).

Run ``python bench/requests_calls.py --help``; a default run takes about 90 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import requests
import urllib3

import federatls
from federatls import Identity, RenewalPolicy
from federatls._renewal import keep_renewed_sync
from federatls.integrations import requests as frequests
from federatls.integrations import urllib3 as furllib3
from federatls.testing import federated_pair
from sign_throughput import percentile, write_results

HOST = "127.0.0.1"
BODY = b"ok\n"
CLAIMS = {"minTLSCertDuration": "2s", "defaultTLSCertDuration": "24h", "maxTLSCertDuration": "24h"}
LONG = timedelta(hours=24)
NEAR_SWAP = 0.250  # seconds after a swap
VARIANTS = ("federatls-requests", "pem-requests", "federatls-urllib3", "pem-urllib3")


# --- The server process ------------------------------------------------------------------------
def _serve(token: str, conn: Connection) -> None:
    identity = federatls.bootstrap_sync(token, lifetime=LONG)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, HOST, 0, ssl=identity.server_context())
        conn.send(server.sockets[0].getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        server.close()

    asyncio.run(main())


@contextlib.contextmanager
def server(token: str) -> Iterator[int]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(token, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the server did not start")
        yield parent.recv()
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# --- Clients -----------------------------------------------------------------------------------
Get = Callable[[], bytes]


@contextlib.contextmanager
def variant(name: str, identity: Identity, files: dict[str, str], url: str) -> Iterator[Get]:
    """A ``get`` for ``name``: one call, its body."""
    if name == "federatls-requests":
        with frequests.Session(identity) as session:
            session.trust_env = False  # as the baseline's (see the module's docstring)
            yield lambda: session.get(url, timeout=10).content
    elif name == "pem-requests":
        with requests.Session() as session:
            session.cert = (files["chain"], files["key"])
            session.verify = files["bundle"]
            session.trust_env = False  # else REQUESTS_CA_BUNDLE would replace verify=
            yield lambda: session.get(url, timeout=10).content
    elif name == "federatls-urllib3":
        with furllib3.PoolManager(identity, maxsize=16) as pool:
            yield lambda: pool.request("GET", url, timeout=10).data
    else:
        plain = urllib3.PoolManager(
            maxsize=16, cert_file=files["chain"], key_file=files["key"], ca_certs=files["bundle"]
        )
        try:
            yield lambda: plain.request("GET", url, timeout=10).data
        finally:
            plain.clear()


@dataclass
class Segment:
    calls: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def run_segment(get: Get, threads: int, seconds: float, warmup: float) -> Segment:
    """``threads`` threads calling ``get`` back to back; only calls that start after
    ``warmup`` and end before the window closes count."""
    out = Segment()
    lock = threading.Lock()
    begin = time.monotonic() + warmup
    end = begin + seconds

    def loop() -> None:
        mine: list[tuple[float, float]] = []
        errors: list[str] = []
        while (t0 := time.monotonic()) < end:
            try:
                ok = get() == BODY
            except Exception as exc:  # counted, not raised: a failed call is a figure
                ok, why = False, f"{type(exc).__name__}: {exc}"
            else:
                why = "wrong body"
            t1 = time.monotonic()
            if t0 >= begin and t1 <= end:
                if ok:
                    mine.append((t0, t1 - t0))
                else:
                    errors.append(why)
        with lock:
            out.calls += len(mine)
            out.started += [t for t, _ in mine]
            out.latencies += [d for _, d in mine]
            out.failures += errors

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.seconds = seconds
    return out


def summary(segments: list[Segment]) -> dict[str, Any]:
    latencies = sorted(x for s in segments for x in s.latencies)
    return {
        "calls_per_s": sum(s.calls for s in segments) / sum(s.seconds for s in segments),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "failed": sum(len(s.failures) for s in segments),
        "failure_samples": [f for s in segments for f in s.failures][:5],
    }


# --- Part 1: calls per second -----------------------------------------------------------------
def throughput(args: argparse.Namespace, identity: Identity, url: str) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="federatls-bench-"))
    try:
        os.chmod(workdir, 0o700)
        files = {"chain": str(workdir / "chain.pem"), "key": str(workdir / "key.pem")}
        files["bundle"] = str(workdir / "bundle.pem")
        Path(files["chain"]).write_text(identity.chain_pem)
        key = Path(files["key"])
        key.touch(0o600)
        key.write_bytes(identity.export_private_key(password=None))  # the baseline's, not ours
        Path(files["bundle"]).write_text(identity.trust.pem)
        results: dict[str, list[Segment]] = {v: [] for v in args.variants}
        for n in range(args.rounds):
            order = args.variants if n % 2 == 0 else tuple(reversed(args.variants))
            for name in order:
                with variant(name, identity, files, url) as get:
                    results[name].append(run_segment(get, args.threads, args.segment, args.warmup))
                seg = results[name][-1]
                print(f"  round {n + 1} {name:20} {seg.calls / seg.seconds:8.0f} calls/s")
    finally:
        shutil.rmtree(workdir)
    report = {name: summary(segs) for name, segs in results.items()}
    for lib in ("requests", "urllib3"):
        ours, theirs = report.get(f"federatls-{lib}"), report.get(f"pem-{lib}")
        if ours and theirs:
            report[f"ratio-{lib}"] = {
                "calls_per_s": ours["calls_per_s"] / theirs["calls_per_s"],
                "p99": ours["p99_ms"] / theirs["p99_ms"],
            }
    return report


# --- Part 2: p99 during renewal ---------------------------------------------------------------
def renewal(args: argparse.Namespace, token: Callable[[], str], url: str) -> dict[str, Any]:
    results: dict[str, list[Segment]] = {"steady": [], "churn": []}
    near: list[float] = []
    renewals: list[int] = []
    for condition in ("steady", "churn", "churn", "steady"):
        lifetime = timedelta(seconds=args.lifetime) if condition == "churn" else LONG
        identity = federatls.bootstrap_sync(token(), lifetime=lifetime)
        with keep_renewed_sync(identity, policy=RenewalPolicy()) as live:
            swaps: list[float] = []
            stop = threading.Event()

            def watch(live: Any = live, swaps: list[float] = swaps, stop: Any = stop) -> None:
                last = live.current
                while not stop.wait(0.002):
                    if live.current is not last:
                        last = live.current
                        swaps.append(time.monotonic())

            watcher = threading.Thread(target=watch)
            watcher.start()
            before = live.renewals
            try:
                with frequests.Session(live) as session:

                    def get(session: frequests.Session = session) -> bytes:
                        return session.get(url, timeout=10).content

                    seg = run_segment(get, args.threads, args.window, args.warmup)
            finally:
                stop.set()
                watcher.join()
            results[condition].append(seg)
            if condition == "churn":
                renewals.append(live.renewals - before)
                near += [
                    d
                    for t, d in zip(seg.started, seg.latencies, strict=True)
                    if any(0 <= t - s <= NEAR_SWAP for s in swaps)
                ]
        print(f"  {condition:7} {seg.calls / seg.seconds:8.0f} calls/s, {len(seg.failures)} failed")
    report = {name: summary(segs) for name, segs in results.items()}
    report["churn"]["renewals_per_window"] = renewals
    report["churn"]["p99_near_swap_ms"] = percentile(sorted(near), 99) * 1000
    report["churn"]["calls_near_swap"] = len(near)
    report["ratio"] = {
        "p99": report["churn"]["p99_ms"] / report["steady"]["p99_ms"],
        "calls_per_s": report["churn"]["calls_per_s"] / report["steady"]["calls_per_s"],
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="ABBA rounds over the variants")
    parser.add_argument("--segment", type=float, default=3.0, help="seconds per segment")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--variants", type=lambda s: tuple(s.split(",")), default=VARIANTS)
    parser.add_argument("--lifetime", type=float, default=3.0, help="churn certificates, s")
    parser.add_argument("--window", type=float, default=8.0, help="renewal segments, s")
    parser.add_argument("--skip-renewal", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = datetime.now(UTC)
    with federated_pair("cloud", "kubernetes", claims=CLAIMS, backdate="1s") as (cloud, k8s):
        server_token = cloud.token("server.cloud.internal", sans=["server.cloud.internal", HOST])
        with server(server_token) as port:
            url = f"https://{HOST}:{port}/"
            identity = k8s.identity("client.k8s.internal", lifetime=LONG)
            print(f"calls per second, {args.threads} threads, {args.rounds} rounds:")
            report: dict[str, Any] = {"throughput": throughput(args, identity, url)}
            if not args.skip_renewal:
                print("renewal:")
                report["renewal"] = renewal(args, lambda: k8s.token("client.k8s.internal"), url)
    report["args"] = {k: v for k, v in vars(args).items() if k != "json"}
    report["args"]["json"] = None
    print()
    for name in args.variants:
        r = report["throughput"][name]
        print(
            f"{name:20} {r['calls_per_s']:8.0f} calls/s  p50 {r['p50_ms']:6.2f} ms  "
            f"p99 {r['p99_ms']:6.2f} ms  failed {r['failed']}"
        )
    for lib in ("requests", "urllib3"):
        if f"ratio-{lib}" in report["throughput"]:
            ratio = report["throughput"][f"ratio-{lib}"]
            print(
                f"{lib}: federatls / PEM files: calls/s {ratio['calls_per_s']:.3f}x, "
                f"p99 {ratio['p99']:.3f}x"
            )
    if "renewal" in report:
        r = report["renewal"]
        for cond in ("steady", "churn"):
            print(
                f"{cond:7} {r[cond]['calls_per_s']:8.0f} calls/s  p50 {r[cond]['p50_ms']:6.2f} ms"
                f"  p99 {r[cond]['p99_ms']:6.2f} ms  failed {r[cond]['failed']}"
            )
        print(
            f"churn / steady: p99 {r['ratio']['p99']:.3f}x, calls/s "
            f"{r['ratio']['calls_per_s']:.3f}x; renewals per window "
            f"{r['churn']['renewals_per_window']}; p99 within {NEAR_SWAP * 1000:.0f} ms after a "
            f"swap {r['churn']['p99_near_swap_ms']:.2f} ms ({r['churn']['calls_near_swap']} calls)"
        )
    write_results("requests_calls", report, started, args.json)


if __name__ == "__main__":
    main()
