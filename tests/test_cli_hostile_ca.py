"""The ``federatls ca`` verbs that write certificates (``certificate``, ``renew``), run as a
user runs them (a real subprocess) against a hostile CA (``rogue_ca.RogueCA``, real HTTPS on
127.0.0.1): a certificate the CA had no business issuing is refused with one line and exit 1,
and nothing is written (no certificate, no key, the old certificate left as it was); a CA
dripping its answer cannot hold the command past its ``--timeout``.

Each refusal has its twin: the same server left honest works.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from federatls._x509 import load_pem_certificates
from rogue_ca import Behaviour, Issue, RogueCA

from harness import Run, assert_one_line_error, federatls, make_pki

pytestmark = pytest.mark.anyio

SUBJECT = "svc.cloud.internal"
SANS = [SUBJECT, "127.0.0.1"]
WALL = 12.0  # seconds: a 2 s deadline overrun by a loaded machine still ends well within this

BAD_ISSUES = {
    "expired": (Issue(not_before=timedelta(days=-2), not_after=timedelta(days=-1)), "expired at"),
    "other names": (Issue(names=("*.cloud.internal",)), "is for other names"),
    "CA:TRUE": (Issue(ca=True), "CA certificate (basicConstraints CA:TRUE)"),
    "another key": (Issue(other_key=True), "for another key"),
}


@contextlib.contextmanager
def _rogue(tmp_path: Path, **behaviour: Behaviour) -> Iterator[RogueCA]:
    rogue = RogueCA(make_pki(tmp_path, "cloud"))
    rogue.behaviour.update({f"/{path}": how for path, how in behaviour.items()})
    with rogue.running():
        yield rogue


async def _certificate(rogue: RogueCA, crt: Path, key: Path, *extra: str) -> Run:
    token = rogue.pki.token(SUBJECT, sans=SANS)
    return await federatls("ca", "certificate", SUBJECT, crt, key, "--token", token, *extra)


def _ca_flags(rogue: RogueCA) -> list[str]:
    return ["--ca-url", rogue.url, "--root", str(rogue.pki.root_path)]


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ca certificate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD_ISSUES))
async def test_certificate_refuses_what_the_ca_had_no_business_issuing(
    case: str, tmp_path: Path
) -> None:
    """`ca certificate` given an expired certificate, one for other names, a CA certificate
    or one for another key: one line naming the problem, exit 1, and no file written."""
    issue, problem = BAD_ISSUES[case]
    out = tmp_path / "out"
    out.mkdir()
    with _rogue(tmp_path) as rogue:
        rogue.issue = issue
        run = await _certificate(rogue, out / "svc.crt", out / "svc.key")
        requests = list(rogue.requests)
    assert_one_line_error(run, problem)
    assert any(r.startswith("POST /sign") for r in requests)
    assert _files(out) == []


async def test_certificate_refuses_roots_without_the_pinned_root(tmp_path: Path) -> None:
    """A CA whose /roots does not list the root the token pins (and that issued the chain):
    one line naming the inconsistency, exit 1, no file written."""
    out = tmp_path / "out"
    out.mkdir()
    with _rogue(tmp_path) as rogue:
        rogue.roots = [make_pki(tmp_path, "other").root]
        run = await _certificate(rogue, out / "svc.crt", out / "svc.key")
    assert_one_line_error(run, "does not list the pinned root")
    assert _files(out) == []


async def test_certificate_from_an_honest_ca_is_written(tmp_path: Path) -> None:
    """Twin: the same server left honest: certificate and key written, the leaf for our
    names."""
    out = tmp_path / "out"
    out.mkdir()
    with _rogue(tmp_path) as rogue:
        run = await _certificate(rogue, out / "svc.crt", out / "svc.key")
    assert run.code == 0, run
    assert _files(out) == ["svc.crt", "svc.key"]
    leaf = load_pem_certificates((out / "svc.crt").read_bytes())[0]
    assert leaf.subject.rfc4514_string() == f"CN={SUBJECT}"


async def test_certificate_that_cannot_be_put_in_place_leaves_no_key(tmp_path: Path) -> None:
    """Twin of the refusals: a good certificate whose CRT path cannot be replaced (it is a
    directory, --force given): one line, exit 1, and no key nor temporary file left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "svc.crt").mkdir()
    with _rogue(tmp_path) as rogue:
        run = await _certificate(rogue, out / "svc.crt", out / "svc.key", "--force")
    assert_one_line_error(run, "svc.crt")
    assert _files(out) == ["svc.crt"]
    assert (out / "svc.crt").is_dir()


async def test_certificate_timeout_bounds_the_whole_command(tmp_path: Path) -> None:
    """A CA dripping /sign one byte every 0.2 s: `ca certificate --timeout 2` ends with one
    line naming the deadline, exit 1, in bounded time, and writes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    with _rogue(tmp_path, sign=Behaviour(drip=0.2)) as rogue:
        start = time.monotonic()
        run = await _certificate(rogue, out / "svc.crt", out / "svc.key", "--timeout", "2")
        elapsed = time.monotonic() - start
    assert_one_line_error(run, "2 s deadline")
    assert elapsed < WALL
    assert _files(out) == []


async def test_certificate_timeout_in_time_works(tmp_path: Path) -> None:
    """Twin: every answer 0.3 s late, with --timeout 10: the certificate is written."""
    late = Behaviour(delay=0.3)
    out = tmp_path / "out"
    out.mkdir()
    with _rogue(tmp_path, root=late, sign=late, roots=late) as rogue:
        run = await _certificate(rogue, out / "svc.crt", out / "svc.key", "--timeout", "10")
    assert run.code == 0, run
    assert _files(out) == ["svc.crt", "svc.key"]


# ca renew ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD_ISSUES))
async def test_renew_refuses_what_the_ca_had_no_business_issuing(case: str, tmp_path: Path) -> None:
    """`ca renew` given a bad renewal (as at `ca certificate`): one line naming the problem,
    exit 1, CRT unchanged and no --out file written."""
    issue, problem = BAD_ISSUES[case]
    out = tmp_path / "out"
    out.mkdir()
    crt, key = out / "svc.crt", out / "svc.key"
    with _rogue(tmp_path) as rogue:
        assert (await _certificate(rogue, crt, key)).code == 0
        original = crt.read_bytes()
        rogue.issue = issue
        over = await federatls("ca", "renew", crt, key, *_ca_flags(rogue))
        renewed = out / "renewed.crt"
        elsewhere = await federatls("ca", "renew", crt, key, *_ca_flags(rogue), "--out", renewed)
        requests = list(rogue.requests)
    for run in (over, elsewhere):
        assert_one_line_error(run, "renewed certificate", problem)
    assert sum(r.startswith("POST /renew") for r in requests) == 2
    assert crt.read_bytes() == original
    assert _files(out) == ["svc.crt", "svc.key"]


async def test_renew_from_an_honest_ca_is_written(tmp_path: Path) -> None:
    """Twin: the same server left honest: the renewal is written over CRT, a new serial."""
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    with _rogue(tmp_path) as rogue:
        assert (await _certificate(rogue, crt, key)).code == 0
        old = load_pem_certificates(crt.read_bytes())[0]
        run = await federatls("ca", "renew", crt, key, *_ca_flags(rogue))
    assert run.code == 0, run
    new = load_pem_certificates(crt.read_bytes())[0]
    assert new.serial_number != old.serial_number


async def test_renew_timeout_bounds_the_whole_command(tmp_path: Path) -> None:
    """A CA dripping /renew one byte every 0.2 s: `ca renew --timeout 2` ends with one line
    naming the deadline, exit 1, in bounded time, CRT unchanged."""
    crt, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    with _rogue(tmp_path) as rogue:
        assert (await _certificate(rogue, crt, key)).code == 0
        original = crt.read_bytes()
        rogue.behaviour["/renew"] = Behaviour(drip=0.2)
        start = time.monotonic()
        run = await federatls("ca", "renew", crt, key, *_ca_flags(rogue), "--timeout", "2")
        elapsed = time.monotonic() - start
    assert_one_line_error(run, "2 s deadline")
    assert elapsed < WALL
    assert crt.read_bytes() == original
