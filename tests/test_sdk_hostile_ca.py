"""The SDK against a hostile CA (``rogue_ca.RogueCA``, a real HTTPS server on 127.0.0.1 with
a real test PKI): answers dripped a byte at a time or far too large must not hold
``bootstrap`` or a renewal past its deadline nor fill memory, and certificates the CA had no
business issuing (expired, not yet valid, for other names or another key, a CA certificate)
are refused at bootstrap and at every renewal, the old identity staying in place.

Each refusal has its twin: the same server left honest, or slow but in time, or answering
just under the size cap, works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import federatls
from federatls import (
    BadMaterialError,
    CATimeoutError,
    ConfigError,
    Identity,
    RenewalPolicy,
    RenewingIdentity,
    TrustBundle,
)
from federatls._client import MAX_ANSWER_BYTES, CAClient
from federatls._issuance import CLOCK_SKEW, check_issued
from federatls._x509 import split_sans
from rogue_ca import Behaviour, Issue, RogueCA

from harness import make_pki, wait_until

pytestmark = pytest.mark.anyio

SUBJECT = "svc.cloud.internal"
SANS = [SUBJECT, "127.0.0.1"]
DRIP = Behaviour(drip=0.2)
HUGE = 50_000_000
WALL = 10.0  # seconds: a 2 s deadline overrun by a loaded machine still ends well within this
LOGGER = "federatls.renewal"
# Renewal scaled to seconds: due at 5% of a 30 s certificate, a 1 s deadline per refresh.
QUICK = RenewalPolicy(
    renew_at=0.05,
    jitter=0.0,
    first_retry=timedelta(milliseconds=200),
    max_retry=timedelta(seconds=1),
    recheck=timedelta(seconds=1),
    timeout=timedelta(seconds=1),
)
SHORT = Issue(not_after=timedelta(seconds=30))
CLIENT_AUTH, CODE_SIGNING = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING


@contextlib.contextmanager
def _rogue(tmp_path: Path, **behaviour: Behaviour) -> Iterator[RogueCA]:
    """A rogue CA for a fresh 'cloud' PKI, answering ``behaviour`` (``root=``, ``sign=``...)
    for those endpoints; ``pki.url`` points at it."""
    rogue = RogueCA(make_pki(tmp_path, "cloud"))
    rogue.behaviour.update({f"/{path}": how for path, how in behaviour.items()})
    with rogue.running():
        yield rogue


def _token(rogue: RogueCA, sans: list[str] = SANS) -> str:
    return rogue.pki.token(SUBJECT, sans=sans)


def _timed_bootstrap_sync(token: str, timeout: float) -> tuple[BaseException, float]:
    """Run ``bootstrap_sync`` expecting it to fail; the error and the wall time it took."""
    start = time.monotonic()
    with pytest.raises(federatls.FederatlsError) as failed:
        federatls.bootstrap_sync(token, timeout=timeout)
    return failed.value, time.monotonic() - start


# 1. Deadlines ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["root", "sign"])
def test_dripping_answer_cannot_hold_bootstrap_past_its_deadline(path: str, tmp_path: Path) -> None:
    """A CA dripping /root/{sha} (before the pin) or /sign (after it) one byte every 0.2 s:
    bootstrap_sync(timeout=2) fails with CATimeoutError naming the deadline, in bounded time."""
    with _rogue(tmp_path, **{path: DRIP}) as rogue:
        error, elapsed = _timed_bootstrap_sync(_token(rogue), timeout=2)
        requests = list(rogue.requests)
    assert isinstance(error, CATimeoutError), repr(error)
    suffix = f"/{rogue.pki.fingerprint}" if path == "root" else ""
    assert error.url == f"{rogue.url}/{path}{suffix}"
    assert error.timeout == 2
    assert "2 s deadline of the bootstrap" in str(error)
    assert elapsed < WALL
    assert requests[-1].startswith("POST /sign" if path == "sign" else "GET /root/")


async def test_bootstrap_deadline_bounds_all_its_calls_together(tmp_path: Path) -> None:
    """Every answer 0.8 s late is in time for each call of a 2 s budget, but not for all four
    of bootstrap's calls together: CATimeoutError, and /federation is never reached."""
    late = Behaviour(delay=0.8)
    with _rogue(tmp_path, root=late, sign=late, roots=late, federation=late) as rogue:
        with pytest.raises(CATimeoutError) as overrun:
            await federatls.bootstrap(_token(rogue), timeout=2)
        requests = [r.split(" ")[1].split("/")[1] for r in rogue.requests]
    assert "deadline of the bootstrap" in str(overrun.value)
    assert "federation" not in requests
    assert requests[:2] == ["root", "sign"]


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "3"], ids=repr)
async def test_a_timeout_that_is_no_deadline_is_refused_before_any_call(
    timeout: Any, tmp_path: Path
) -> None:
    """timeout= zero, negative, NaN or not a number: ConfigError naming it, and nothing is
    sent to the CA (NaN made no deadline at all)."""
    with _rogue(tmp_path) as rogue:
        with pytest.raises(ConfigError, match="timeout must be a positive number of seconds"):
            await federatls.bootstrap(_token(rogue), timeout=timeout)
        with pytest.raises(ConfigError, match="timeout must be a positive number of seconds"):
            CAClient(rogue.url, [rogue.pki.root], timeout=timeout)
        requests = list(rogue.requests)
    assert requests == []


async def test_slow_but_in_time_ca_works(tmp_path: Path) -> None:
    """Twin: every answer 0.5 s late, with timeout=5: bootstrap completes."""
    late = Behaviour(delay=0.5)
    with _rogue(tmp_path, root=late, sign=late, roots=late, federation=late) as rogue:
        identity = await federatls.bootstrap(_token(rogue), timeout=5)
    assert identity.common_name == SUBJECT
    assert identity.sans == split_sans(SANS)


@pytest.mark.parametrize(
    ("path", "size", "declared"),
    [
        ("root", HUGE, True),
        ("root", HUGE, False),
        ("federation", HUGE, False),
        ("sign", MAX_ANSWER_BYTES + 1, True),
        ("sign", MAX_ANSWER_BYTES + 1, False),
    ],
)
async def test_answer_above_the_cap_is_refused_unread(
    path: str, size: int, declared: bool, tmp_path: Path
) -> None:
    """An answer over 1 MiB, announced by Content-Length or streamed in chunks, is refused
    with BadMaterialError naming the cap, and the client stops reading (the server could not
    send it all)."""
    how = Behaviour(pad_to=size, declare_length=declared)
    with _rogue(tmp_path, **{path: how}) as rogue:
        with pytest.raises(BadMaterialError) as refused:
            await federatls.bootstrap(_token(rogue), timeout=10)
        sent = rogue.sent[f"/{path}"]
    assert f"larger than {MAX_ANSWER_BYTES} bytes" in str(refused.value)
    assert f"/{path}" in str(refused.value)
    if size == HUGE:
        assert sent < HUGE // 2


async def test_compressed_answer_is_refused_uninflated(tmp_path: Path) -> None:
    """A /root/{sha} answer gzip-compressed from 50 MB to some 50 kB (not asked for: the SDK
    asks for identity) is refused with BadMaterialError before anything is inflated."""
    how = Behaviour(pad_to=HUGE, gzip=True)
    with _rogue(tmp_path, root=how) as rogue:
        with pytest.raises(BadMaterialError) as refused:
            await federatls.bootstrap(_token(rogue), timeout=10)
        requests = list(rogue.requests)
    assert "gzip-encoded, not asked for" in str(refused.value)
    assert requests == [f"GET /root/{rogue.pki.fingerprint}"]


@pytest.mark.parametrize("declared", [True, False])
async def test_answer_at_the_cap_is_read(declared: bool, tmp_path: Path) -> None:
    """Twin: answers of exactly 1 MiB (/root/{sha} and /federation, padded) are read and used."""
    how = Behaviour(pad_to=MAX_ANSWER_BYTES, declare_length=declared)
    with _rogue(tmp_path, root=how, federation=how) as rogue:
        identity = await federatls.bootstrap(_token(rogue), timeout=10)
        sent = rogue.sent["/federation"]
    assert identity.own_roots.certificates == (rogue.pki.root,)
    assert sent >= MAX_ANSWER_BYTES


# 2. What the CA issued, at bootstrap ------------------------------------------------------------
BAD_ISSUES = {
    "expired": (Issue(not_before=timedelta(days=-2), not_after=timedelta(days=-1)), "expired at"),
    "ten years ahead": (
        Issue(not_before=timedelta(days=3650), not_after=timedelta(days=3651)),
        "not valid before",
    ),
    "other names": (Issue(names=("*.cloud.internal",)), "is for other names"),
    "an extra name": (Issue(names=(*SANS, "*.cloud.internal")), "is for other names"),
    "a name missing": (Issue(names=(SUBJECT,)), "is for other names"),
    "CA:TRUE": (Issue(ca=True), "CA certificate (basicConstraints CA:TRUE)"),
    "another key": (Issue(other_key=True), "for another key"),
    "for code signing only": (Issue(purposes=(CODE_SIGNING,)), "neither serverAuth nor"),
    "an intermediate that is no CA": (Issue(issuer_is_ca=False), "is not a CA"),
}


@pytest.mark.parametrize("case", list(BAD_ISSUES))
async def test_bootstrap_refuses_what_the_ca_had_no_business_issuing(
    case: str, tmp_path: Path
) -> None:
    """A CA issuing an expired certificate, one ten years ahead, one for other names (or one
    too many or too few), a CA certificate, one for another key, one no TLS use allows, or
    one signed by a certificate that is no CA: BadMaterialError naming it."""
    issue, problem = BAD_ISSUES[case]
    with _rogue(tmp_path) as rogue:
        rogue.issue = issue
        with pytest.raises(BadMaterialError) as refused:
            await federatls.bootstrap(_token(rogue))
        requests = list(rogue.requests)
    assert problem in str(refused.value)
    assert any(r.startswith("POST /sign") for r in requests)


@pytest.mark.parametrize(
    ("case", "issue"),
    [
        ("backdated a minute (step-ca's default)", Issue()),
        ("valid two minutes from now (clock skew)", Issue(not_before=timedelta(minutes=2))),
        ("for clients only", Issue(purposes=(CLIENT_AUTH,))),
        ("without extended key usage (any use)", Issue(purposes=None)),
    ],
)
async def test_bootstrap_accepts_what_an_honest_ca_issues(
    case: str, issue: Issue, tmp_path: Path
) -> None:
    """Twin: a certificate backdated a minute, or starting within the allowed clock skew, for
    exactly the token's names and our key, for TLS clients only or any use, is accepted."""
    with _rogue(tmp_path) as rogue:
        rogue.issue = issue
        identity = await federatls.bootstrap(_token(rogue))
    assert identity.sans == split_sans(SANS)
    assert identity.common_name == SUBJECT


async def test_without_sans_the_names_are_the_subject(tmp_path: Path) -> None:
    """A token without a 'sans' claim asks for its 'sub' (as step-ca derives it): a
    certificate for the subject is accepted, one for another name refused."""
    with _rogue(tmp_path) as rogue:
        pki = rogue.pki
        token = pki.forge(pki.claims(SUBJECT, sans=None))
        identity = await federatls.bootstrap(token)
        rogue.issue = Issue(names=("other.cloud.internal",))
        with pytest.raises(BadMaterialError) as refused:
            await federatls.bootstrap(pki.forge(pki.claims(SUBJECT, sans=None)))
    assert identity.sans == split_sans([SUBJECT])
    assert "is for other names" in str(refused.value)


async def test_pinned_root_missing_from_roots_is_refused(tmp_path: Path) -> None:
    """A CA whose /roots does not list the root the token pins contradicts itself:
    BadMaterialError naming the pinned root."""
    with _rogue(tmp_path) as rogue:
        rogue.roots = [make_pki(tmp_path, "elsewhere").root]
        with pytest.raises(BadMaterialError) as refused:
            await federatls.bootstrap(_token(rogue))
    assert f"pinned root {rogue.pki.fingerprint}" in str(refused.value)
    assert "/roots" in str(refused.value)


async def test_pinned_root_among_several_roots_is_accepted(tmp_path: Path) -> None:
    """Twin: /roots listing another root beside the pinned one (a rotation) is fine."""
    with _rogue(tmp_path) as rogue:
        rogue.roots = [make_pki(tmp_path, "next").root, rogue.pki.root]
        identity = await federatls.bootstrap(_token(rogue))
    assert len(identity.own_roots) == 2


# 3. Renewal ------------------------------------------------------------------------------------
def _failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.getMessage().startswith(f"renewal of {SUBJECT} failed")
    ]


async def _renew_against(
    rogue: RogueCA,
    caplog: pytest.LogCaptureFixture,
    *,
    fail: bool,
    issue: Issue = SHORT,
    policy: RenewalPolicy = QUICK,
    **behaviour: Behaviour,
) -> tuple[Identity, RenewingIdentity]:
    """Enrol honestly (a 30 s certificate), then let the CA issue ``issue`` and answer
    ``behaviour`` (``renew=``...), and keep renewing under ``policy`` until two failures
    (``fail``) or a renewal; returns the enrolled identity and the live one."""
    rogue.issue = SHORT
    identity = await federatls.bootstrap(_token(rogue))
    rogue.issue = issue
    rogue.behaviour.update({f"/{path}": how for path, how in behaviour.items()})
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            live: RenewingIdentity = await tg.start(federatls.keep_renewed, identity, policy)
            if fail:
                await wait_until(lambda: len(_failures(caplog)) >= 2, timeout=20)
            else:
                await live.wait_for_update()
            tg.cancel_scope.cancel()
    return identity, live


async def test_renewal_against_a_dripping_ca_fails_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA dripping every answer: each refresh ends at its 1 s deadline as a failure, retried
    with backoff (1, 2 in a row), last_error says so and the identity stays in place."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with _rogue(tmp_path) as rogue:
        identity, live = await _renew_against(
            rogue, caplog, fail=True, roots=DRIP, federation=DRIP, renew=DRIP
        )
    failures = _failures(caplog)
    assert "(1 in a row)" in failures[0]
    assert "(2 in a row)" in failures[1]
    assert "deadline of the renewal" in failures[0]
    assert isinstance(live.last_error, CATimeoutError)
    assert live.current is identity
    assert live.renewals == 0
    assert live.stopped is None


async def test_renewal_outlives_a_dripping_trust_bundle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA dripping /roots and /federation while /renew answers at once: the bundle fetch
    gives up within its share of the deadline, the last good bundle is kept, and the
    certificate still renews (a slow bundle must not stop the certificate)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    patient = dataclasses.replace(QUICK, timeout=timedelta(seconds=6))
    with _rogue(tmp_path) as rogue:
        identity, live = await _renew_against(
            rogue, caplog, fail=False, policy=patient, roots=DRIP, federation=DRIP
        )
    assert live.renewals == 1
    assert live.current.serial != identity.serial
    assert isinstance(live.last_error, CATimeoutError)  # the bundle, not the certificate
    assert live.current.trust == identity.trust


async def test_renewal_against_a_slow_but_in_time_ca_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Twin: answers 0.3 s late fit the renewal's deadline; the certificate renews, same key."""
    late = Behaviour(delay=0.3)
    with _rogue(tmp_path) as rogue:
        identity, live = await _renew_against(
            rogue, caplog, fail=False, roots=late, federation=late, renew=late
        )
    assert live.renewals == 1
    assert live.current.serial != identity.serial
    assert live.current.public_key_matches(identity.certificate)
    assert live.last_error is None


BAD_RENEWALS = {
    "other names": (Issue(names=("*.cloud.internal",)), "is for other names"),
    "CA:TRUE": (Issue(ca=True, not_after=timedelta(seconds=30)), "CA:TRUE"),
    "expired": (Issue(not_before=timedelta(days=-2), not_after=timedelta(days=-1)), "expired at"),
    "another key": (Issue(other_key=True), "for another key"),
    "an intermediate that is no CA": (Issue(issuer_is_ca=False), "is not a CA"),
    "no longer for servers": (Issue(purposes=(CLIENT_AUTH,)), "no longer allows serverAuth"),
}


@pytest.mark.parametrize("case", list(BAD_RENEWALS))
async def test_renewal_refuses_what_the_ca_had_no_business_issuing(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CA renewing into a certificate for other names, a CA certificate, an expired one,
    one for another key, one signed by a certificate that is no CA, or one that drops a TLS
    use the old one had: refused, retried with backoff, last_error names it, and the old
    identity stays in place."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    issue, problem = BAD_RENEWALS[case]
    with _rogue(tmp_path) as rogue:
        identity, live = await _renew_against(rogue, caplog, fail=True, issue=issue)
    assert isinstance(live.last_error, BadMaterialError)
    assert "renewed certificate" in str(live.last_error)
    assert problem in str(live.last_error)
    assert live.current is identity
    assert live.renewals == 0
    assert live.stopped is None


async def test_renewal_accepts_what_an_honest_ca_issues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Twin: the same rogue CA left honest renews the identity: same names, same key."""
    with _rogue(tmp_path) as rogue:
        identity, live = await _renew_against(rogue, caplog, fail=False)
    assert live.renewals == 1
    assert live.current.sans == identity.sans
    assert live.current.public_key_matches(identity.certificate)


# 4. The pure check at its edges -----------------------------------------------------------------
def test_validity_edges_of_the_pure_check(tmp_path: Path) -> None:
    """check_issued accepts a start exactly CLOCK_SKEW ahead and refuses one a second further,
    and refuses a certificate from its notAfter on (a second before, it is accepted)."""
    rogue = RogueCA(make_pki(tmp_path, "cloud"))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = rogue.certificate(SUBJECT, SANS, key.public_key(), Issue())
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc

    def check(now: datetime) -> None:
        check_issued(
            (leaf, rogue.intermediate),
            key=key.public_key(),
            subject=SUBJECT,
            names=split_sans(SANS),
            roots=TrustBundle.from_ca([rogue.pki.root], []),
            now=now,
        )

    check(start - CLOCK_SKEW)
    check(end - timedelta(seconds=1))
    with pytest.raises(BadMaterialError, match="not valid before"):
        check(start - CLOCK_SKEW - timedelta(seconds=1))
    with pytest.raises(BadMaterialError, match="expired at"):
        check(end)
