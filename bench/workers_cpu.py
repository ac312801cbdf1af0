"""CPU per certificate of the federatls CA with one worker process and with two.

What is measured
----------------
Two CAs run side by side, each its own fresh PKI and SQLite database: ``federatls ca serve``
(one process) and ``federatls ca serve --workers 2`` (a supervisor and two workers). In each
round each CA gets one slice of the same load, in alternating order: a fixed number of
``POST /1.0/sign`` requests, each on a new TCP connection with a full TLS handshake and
``Connection: close`` (what a bootstrapping client does), at a fixed concurrency, from a
load client in a process of its own. During each slice the CA's CPU time (user + system of
the serving process and, with workers, of the supervisor and every worker, read from
/proc) is summed. The headline is CPU seconds per 1,000 certificates for each, and their
ratio (2 workers / 1): work spread over processes should cost no more CPU per certificate
(the aim is within 10%), so that throughput scales with cores until the store binds.
Throughput (certificates per second over the slices) is printed beside it: on a machine with
two cores that also runs the load client, it says little about scaling.

Tokens are minted and the CSR made before the timed phase (one CSR for every request: the CA
does not care); every answer must be 201.

Not measured: other endpoints, keep-alive, more than two workers, PostgreSQL.

Run ``python bench/workers_cpu.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from federatls._jwk import ProvisionerKey
from federatls._keys import build_csr, new_private_key
from federatls._token import mint_token, sign_audience
from federatls._x509 import fingerprint, load_pem_certificate
from federatls.ca import init_pki

PASSWORD = b"bench password, thrown away with the temporary directory"
SLICE_TIMEOUT = 300.0  # seconds; a slice that takes longer fails the run
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class CA:
    """One running CA: its process (the supervisor with workers), URL, root and provisioner."""

    workers: int
    process: subprocess.Popen[bytes]
    url: str
    root_file: Path
    provisioner: str
    key: ProvisionerKey
    root_sha: str

    def pids(self) -> list[int]:
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        """User + system CPU of the serving processes so far (their own, not children's)."""
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / TICKS

    def bodies(self, count: int, subject: str) -> list[bytes]:
        """``count`` sign requests, each with a token of its own (one CSR for all)."""
        key = new_private_key()
        csr = build_csr(key, subject, [subject]).public_bytes(serialization.Encoding.PEM)
        now = datetime.now(UTC)
        out = []
        for _ in range(count):
            token = mint_token(
                self.key,
                issuer=self.provisioner,
                subject=subject,
                audience=sign_audience(self.url),
                now=now,
                sans=[subject],
                root_fingerprint=self.root_sha,
                validity=timedelta(minutes=30),
            )
            out.append(json.dumps({"csr": csr.decode(), "ott": token}).encode())
        return out


@contextlib.contextmanager
def running(base: Path, name: str, workers: int) -> Iterator[CA]:
    result = init_pki(
        name,
        base / name,
        address="127.0.0.1:0",
        password=PASSWORD,
        now=datetime.now(UTC),
        dns_names=["127.0.0.1"],
    )
    password_file = base / f"{name}.password"
    password_file.write_bytes(PASSWORD)
    prov = json.loads(result.config.read_text())["authority"]["provisioners"][0]
    log = (base / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "federatls",
            "ca",
            "serve",
            str(result.config),
            "--password-file",
            str(password_file),
            "--workers",
            str(workers),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        found = re.match(r"Serving HTTPS on (https://\S+) ", line)
        if not found:
            raise RuntimeError(f"{name} did not start: {(base / f'{name}.log').read_text()}")
        root = load_pem_certificate(result.root.read_bytes())
        yield CA(
            workers,
            process,
            found.group(1),
            result.root,
            prov["name"],
            ProvisionerKey.decrypt(prov["encryptedKey"], PASSWORD),
            fingerprint(root),
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# The load client (in a process of its own) ------------------------------------------------------
def load(url: str, root_file: str, bodies: Sequence[bytes], concurrency: int) -> tuple[int, float]:
    """Send every body to ``url``/1.0/sign, ``concurrency`` at a time, each on a new
    connection; returns (201s, seconds). Any other answer raises."""
    return asyncio.run(_load(url, root_file, bodies, concurrency))


async def _load(
    url: str, root_file: str, bodies: Sequence[bytes], concurrency: int
) -> tuple[int, float]:
    ctx = ssl.create_default_context(cafile=root_file)
    host, port = url.removeprefix("https://").rsplit(":", 1)
    queue = list(reversed(bodies))
    ok = 0

    async def one(body: bytes) -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=ctx, server_hostname=host
        )
        head = (
            f"POST /1.0/sign HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        answer = await reader.read()
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        if not answer.startswith(b"HTTP/1.1 201"):
            raise RuntimeError(f"answer: {answer[:300]!r}")
        ok += 1

    async def lane() -> None:
        while queue:
            await one(queue.pop())

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(lane() for _ in range(concurrency))), SLICE_TIMEOUT)
    return ok, time.perf_counter() - started


# The run ------------------------------------------------------------------------------------------
@dataclass
class Slice:
    workers: int
    certificates: int
    seconds: float
    cpu: float


def measure(pool: concurrent.futures.Executor, ca: CA, count: int, concurrency: int) -> Slice:
    bodies = ca.bodies(count, "bench.internal")
    cpu = ca.cpu_seconds()
    ok, seconds = pool.submit(load, ca.url, str(ca.root_file), bodies, concurrency).result()
    return Slice(ca.workers, ok, seconds, ca.cpu_seconds() - cpu)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    parser.add_argument(
        "--per-slice", type=int, default=1000, help="certificates per CA per round (default 1000)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once (default 16)")
    args = parser.parse_args(argv)
    spawn = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="federatls-bench-workers-") as tmp,
        concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool,
        running(Path(tmp), "one", 1) as one,
        running(Path(tmp), "two", 2) as two,
    ):
        print(f"{os.cpu_count()} CPUs; {args.rounds} rounds of {args.per_slice} certificates")
        print(f"per CA, {args.concurrency} at once, a new TLS connection each\n")
        for ca in (one, two):  # warm-up, not counted
            measure(pool, ca, 50, args.concurrency)
        slices: list[Slice] = []
        print("round  workers  certs  CA CPU s  CPU s/1000 certs  certs/s")
        for round_ in range(args.rounds):
            order = (one, two) if round_ % 2 == 0 else (two, one)
            for ca in order:
                s = measure(pool, ca, args.per_slice, args.concurrency)
                slices.append(s)
                print(
                    f"{round_ + 1:5}  {s.workers:7}  {s.certificates:5}  {s.cpu:8.2f}  "
                    f"{1000 * s.cpu / s.certificates:16.2f}  {s.certificates / s.seconds:7.0f}"
                )
        totals = {}
        for workers in (1, 2):
            mine = [s for s in slices if s.workers == workers]
            certs = sum(s.certificates for s in mine)
            cpu = sum(s.cpu for s in mine)
            rate = certs / sum(s.seconds for s in mine)
            totals[workers] = 1000 * cpu / certs
            print(
                f"\n{workers} worker(s): {1000 * cpu / certs:.2f} CPU s per 1,000 certificates, "
                f"{rate:.0f} certificates/s",
                end="",
            )
        ratio = totals[2] / totals[1]
        per_round = []
        for pair in zip(slices[0::2], slices[1::2], strict=True):
            cost = {s.workers: s.cpu / s.certificates for s in pair}
            per_round.append(f"{cost[2] / cost[1]:.2f}x")
        rounds = ", ".join(per_round)
        print(f"\n\nCPU per certificate, 2 workers / 1: {ratio:.3f}x (aim: at most 1.10x)")
        print(f"in each round: {rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
