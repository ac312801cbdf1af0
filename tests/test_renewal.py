"""Renewal: the pure policy (when to renew, retry, wake) without sleeping, and the renewal task
against real CAs on 127.0.0.1 with certificates of a few seconds, so a renewal happens every
second or two.

The task is exercised the way a service runs it: started in the caller's task group (or, for
blocking code, by ``keep_renewed_sync``), with live mutual-TLS traffic over
``federatls.integrations.streams`` while certificates roll over, and with the CA made
unreachable, restarted, refusing (a revoked certificate) or outlived (an expired one). The
only fake is at a seam of our own: ``CAClient.federation`` made to fail, to break the trust
bundle fetch and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import anyio
import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

import federatls
from federatls import (
    CARefusedError,
    CAUnreachableError,
    Identity,
    IdentityExpiredError,
    Provenance,
    RenewalPolicy,
    RenewingIdentity,
)
from federatls._client import CAClient
from federatls._protocol import RevokeRequest
from federatls.integrations import streams
from federatls.testing import TestCA, federated_pair, running_ca

from harness import FAST, PKI, SHORT, FakeClock, free_port, make_pki, serving, wait_until

pytestmark = pytest.mark.anyio

LOGGER = "federatls.renewal"
SUBJECT = "svc.cloud.internal"
# Renewing at a quarter of the life: a renewal every ~0.7 s of a 3 s certificate.
EAGER = RenewalPolicy(
    renew_at=0.25,
    first_retry=timedelta(milliseconds=200),
    max_retry=timedelta(seconds=1),
    recheck=timedelta(seconds=1),
)
SLACK = 0.05  # seconds between the task reading its clock and its log record's timestamp
T0 = datetime(2030, 1, 1, tzinfo=UTC)
PROPERTIES = settings(max_examples=300, deadline=None, database=None)
FAILED = re.compile(r"^renewal of (\S+) failed \((\d+) in a row\), retrying at (\S+): ")


# Helpers ---------------------------------------------------------------------------------------
def _records(caplog: pytest.LogCaptureFixture, level: int, start: str) -> list[logging.LogRecord]:
    """Log records of the renewal logger at ``level`` whose message starts with ``start``."""
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == level and r.getMessage().startswith(start)
    ]


def _failures(caplog: pytest.LogCaptureFixture) -> list[tuple[int, float]]:
    """(failures in a row, planned delay in seconds) of every 'renewal ... failed' warning."""
    out = []
    for record in _records(caplog, logging.WARNING, "renewal of "):
        match = FAILED.match(record.getMessage())
        assert match is not None, record.getMessage()
        planned = datetime.fromisoformat(match[3])
        out.append((int(match[2]), planned.timestamp() - record.created))
    return out


async def _enrol(ca: TestCA | PKI, subject: str = SUBJECT) -> Identity:
    """A fresh identity for ``subject`` (also valid for 127.0.0.1, to serve on loopback)."""
    return await federatls.bootstrap(ca.token(subject, sans=[subject, "127.0.0.1"]))


def _fixed_port_pki(tmp_path: Path, lifetime: str) -> PKI:
    """A PKI whose CA always listens on the same loopback port (so it can be stopped and
    started again at the same URL), issuing certificates of ``lifetime`` backdated by 1 s."""
    pki = make_pki(tmp_path, "cloud", address=f"127.0.0.1:{free_port()}")
    pki.set_claims(
        minTLSCertDuration="1s", defaultTLSCertDuration=lifetime, maxTLSCertDuration="1h"
    )
    pki.edit(lambda d: d["authority"].__setitem__("backdate", "1s"))
    return pki


async def _revoke(ca: TestCA, serial: int) -> None:
    """Revoke ``serial`` at ``ca`` with a revoke token, as ``step ca revoke`` does."""
    async with CAClient(ca.url, [ca.root]) as client:
        await client.revoke(RevokeRequest(str(serial), ott=ca.token(str(serial), revoke=True)))


def _serial_of(writer: asyncio.StreamWriter) -> int:
    """The serial of the certificate the peer of ``writer`` presented."""
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


@dataclass
class Echo:
    """A streams server answering ``pong <line>`` and recording its clients' serials."""

    server: asyncio.Server
    port: int
    client_serials: set[int] = field(default_factory=set)


@contextlib.asynccontextmanager
async def _echo(identity: Identity | RenewingIdentity) -> AsyncIterator[Echo]:
    echo: Echo | None = None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            assert echo is not None
            echo.client_serials.add(_serial_of(writer))
            line = await reader.readline()
            writer.write(b"pong " + line)
            await writer.drain()
        finally:
            await _close(writer)

    server = await streams.start_server(identity, handle, "127.0.0.1", 0)
    echo = Echo(server, server.sockets[0].getsockname()[1])
    try:
        yield echo
    finally:
        server.close()
        await server.wait_closed()


async def _request(client: Identity | RenewingIdentity, port: int) -> int:
    """One request over a new mutual-TLS connection; returns the server's serial."""
    with anyio.fail_after(5):
        reader, writer = await streams.open_connection(client, "127.0.0.1", port)
        try:
            writer.write(b"ping\n")
            await writer.drain()
            assert await reader.readline() == b"pong ping\n"
            return _serial_of(writer)
        finally:
            await _close(writer)


def _wait_sync(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


# 1. The pure policy ------------------------------------------------------------------------------
def test_default_policy_renews_at_two_thirds_with_jitter_only_earlier() -> None:
    """A 24 h certificate is renewed 16 h after receipt or up to 5% of 24 h earlier, never later."""
    policy = RenewalPolicy()
    received, not_after = T0, T0 + timedelta(hours=24)
    assert policy.renewal_due(received, not_after, 0.0) == T0 + timedelta(hours=16)
    assert policy.renewal_due(received, not_after, 0.5) == T0 + timedelta(hours=16, minutes=-36)
    latest_jitter = policy.renewal_due(received, not_after, 0.999999)
    assert T0 + timedelta(hours=16 - 1.2) <= latest_jitter < T0 + timedelta(hours=16)


def test_renewal_is_due_at_receipt_when_the_certificate_is_already_past() -> None:
    """A certificate received after its notAfter has no life left: renewal is due at once."""
    assert RenewalPolicy().renewal_due(T0, T0 - timedelta(seconds=5), 0.3) == T0


def test_retry_backs_off_exponentially_up_to_max_retry() -> None:
    """With a day of life left: 1 s, 2 s, 4 s ... scaled by 50-100%, capped at 5 min."""
    policy = RenewalPolicy()
    far = T0 + timedelta(days=1)
    delays = [policy.retry_at(n, T0, far, 1 - 1e-9) - T0 for n in range(1, 12)]
    assert [round(d.total_seconds()) for d in delays] == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        300,
        300,
    ]
    assert policy.retry_at(3, T0, far, 0.0) - T0 == timedelta(seconds=2)  # 50% of 4 s
    assert policy.retry_at(0, T0, far, 0.0) == policy.retry_at(1, T0, far, 0.0)
    assert policy.retry_at(10_000, T0, far, 0.5) - T0 == timedelta(seconds=225)


def test_retry_never_waits_more_than_a_quarter_of_the_remaining_life() -> None:
    """With 10 min left a 300 s backoff shrinks to 150 s; with 0.2 s left to the 0.1 s floor;
    once expired the backoff is no longer capped by the life left."""
    policy = RenewalPolicy()
    assert policy.retry_at(20, T0, T0 + timedelta(minutes=10), 0.99) - T0 == timedelta(seconds=150)
    tiny = policy.retry_at(20, T0, T0 + timedelta(milliseconds=200), 0.99) - T0
    assert tiny == timedelta(milliseconds=100)
    expired = policy.retry_at(20, T0, T0 - timedelta(hours=1), 0.0) - T0
    assert expired == timedelta(seconds=150)  # 50% of max_retry: no cap from the life left


def test_sleep_never_exceeds_recheck() -> None:
    """A renewal due in an hour still wakes the task within a minute; one due in 10 s sleeps
    10 s; one already past does not sleep."""
    policy = RenewalPolicy()
    assert policy.sleep_for(T0, T0 + timedelta(hours=1)) == 60.0
    assert policy.sleep_for(T0, T0 + timedelta(seconds=10)) == 10.0
    assert policy.sleep_for(T0, T0 - timedelta(seconds=10)) == 0.0
    short = RenewalPolicy(recheck=timedelta(seconds=2))
    assert short.sleep_for(T0, T0 + timedelta(days=3)) == 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"renew_at": 0.0}, "renew_at"),
        ({"renew_at": 1.0}, "renew_at"),
        ({"renew_at": -0.5}, "renew_at"),
        ({"jitter": -0.01}, "jitter"),
        ({"renew_at": 0.5, "jitter": 0.5}, "jitter"),
        ({"first_retry": timedelta(0)}, "first_retry"),
        ({"first_retry": timedelta(seconds=-1)}, "first_retry"),
        ({"first_retry": timedelta(minutes=6)}, "first_retry <= max_retry"),
        ({"recheck": timedelta(0)}, "recheck"),
        ({"recheck": timedelta(seconds=-1)}, "recheck"),
        ({"timeout": timedelta(0)}, "timeout"),
    ],
)
def test_policy_refuses_impossible_numbers(kwargs: dict[str, object], message: str) -> None:
    """Each impossible setting is a ValueError naming the setting."""
    with pytest.raises(ValueError, match=message):
        RenewalPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_accepts_the_edges_of_the_valid_range() -> None:
    """Twin: no jitter, first_retry equal to max_retry and tiny positive values are accepted."""
    policy = RenewalPolicy(
        renew_at=0.001,
        jitter=0.0,
        first_retry=timedelta(microseconds=1),
        max_retry=timedelta(microseconds=1),
        recheck=timedelta(microseconds=1),
        timeout=timedelta(microseconds=1),
    )
    assert policy.renewal_due(T0, T0 + timedelta(seconds=1), 0.9) == T0 + timedelta(milliseconds=1)


RAND = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
MICROS = 1e-6 * 2  # rounding of timedelta * float, twice


@st.composite
def policies(draw: st.DrawFn) -> RenewalPolicy:
    renew_at = draw(st.floats(min_value=0.01, max_value=0.99))
    first_ms = draw(st.integers(min_value=1, max_value=3_600_000))
    return RenewalPolicy(
        renew_at=renew_at,
        jitter=renew_at * draw(st.floats(min_value=0.0, max_value=0.99)),
        first_retry=timedelta(milliseconds=first_ms),
        max_retry=timedelta(milliseconds=first_ms + draw(st.integers(0, 86_400_000))),
        recheck=timedelta(seconds=draw(st.integers(min_value=1, max_value=3_600))),
    )


LIFETIMES = st.integers(min_value=-86_400_000_000, max_value=400 * 86_400_000_000).map(
    lambda us: timedelta(microseconds=us)
)


@PROPERTIES
@given(policy=policies(), life=LIFETIMES, rand=RAND)
def test_renewal_due_lies_in_the_jitter_window(
    policy: RenewalPolicy, life: timedelta, rand: float
) -> None:
    """Renewal is due between (renew_at - jitter) and renew_at of the life from receipt:
    jitter only ever moves it earlier, and never before receipt or after expiry."""
    due = policy.renewal_due(T0, T0 + life, rand)
    span = max(life, timedelta(0)).total_seconds()
    offset = (due - T0).total_seconds()
    assert span * (policy.renew_at - policy.jitter) - MICROS <= offset
    assert offset <= span * policy.renew_at + MICROS
    assert T0 <= due <= max(T0, T0 + life)


@PROPERTIES
@given(
    policy=policies(), left=LIFETIMES, failures=st.integers(min_value=0, max_value=80), rand=RAND
)
def test_retry_is_capped_exponential_and_never_too_late(
    policy: RenewalPolicy, left: timedelta, failures: int, rand: float
) -> None:
    """The retry delay is 50-100% of first_retry * 2^(n-1) capped at max_retry, never more
    than a quarter of the remaining life (floor 100 ms) while valid, never shrinks with more
    failures, and is always in the future."""
    not_after = T0 + left
    delay = (policy.retry_at(failures, T0, not_after, rand) - T0).total_seconds()
    growth = policy.first_retry.total_seconds() * 2 ** min(max(failures, 1) - 1, 30)
    backoff = min(policy.max_retry.total_seconds(), growth)
    cap = max(left.total_seconds() / 4, 0.1) if left > timedelta(0) else float("inf")
    assert delay > 0
    assert delay <= backoff + MICROS
    assert min(backoff / 2, cap) - MICROS <= delay <= cap + MICROS
    later = (policy.retry_at(failures + 1, T0, not_after, rand) - T0).total_seconds()
    assert later >= delay - MICROS


@PROPERTIES
@given(
    policy=policies(),
    gap=st.integers(min_value=-(10**12), max_value=10**12).map(
        lambda us: timedelta(microseconds=us)
    ),
)
def test_sleep_is_bounded_by_recheck(policy: RenewalPolicy, gap: timedelta) -> None:
    """The task sleeps until the planned time, but never less than 0 or more than recheck."""
    slept = policy.sleep_for(T0, T0 + gap)
    assert 0.0 <= slept <= policy.recheck.total_seconds()
    if timedelta(0) <= gap <= policy.recheck:
        assert slept == gap.total_seconds()


def test_retry_with_a_day_long_first_retry_survives_a_long_outage() -> None:
    """After 31 failures with first_retry=1 day the retry is 50-100% of max_retry (7 days)."""
    policy = RenewalPolicy(first_retry=timedelta(days=1), max_retry=timedelta(days=7))
    delay = policy.retry_at(31, T0, T0 - timedelta(days=1), 0.5) - T0
    assert delay == timedelta(days=5.25)


# 2. keep_renewed in a task group ------------------------------------------------------------
async def test_keep_renewed_renews_again_and_again(caplog: pytest.LogCaptureFixture) -> None:
    """Started in a task group, the identity renews several times with the same key, each
    swap seen by wait_for_update() and updates(), and logged at INFO."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with running_ca("cloud", claims=SHORT, backdate="1s") as ca:
        identity = await _enrol(ca)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                live: RenewingIdentity = await tg.start(federatls.keep_renewed, identity, FAST)
                assert live.current is identity
                assert live.renewals == 0
                assert live.expires_at == identity.not_after
                assert live.next_renewal_at is not None
                assert identity.not_before < live.next_renewal_at < identity.not_after
                seen = [identity, await live.wait_for_update()]
                async with contextlib.aclosing(
                    cast("AsyncGenerator[Identity, None]", live.updates())
                ) as updates:
                    async for new in updates:
                        seen.append(new)
                        if len(seen) == 4:
                            break
                planned = live.next_renewal_at
                tg.cancel_scope.cancel()
    assert live.renewals == 3
    assert live.next_renewal_at is None  # the task has ended
    assert live.current is seen[-1]
    assert len({i.serial for i in seen}) == 4
    assert all(i.public_key_matches(identity.certificate) for i in seen)
    assert all(i.common_name == SUBJECT and i.sans == identity.sans for i in seen)
    ends = [i.not_after for i in seen]
    assert ends == sorted(ends)
    assert ends[-1] > ends[0]
    assert live.expires_at == seen[-1].not_after
    assert planned is not None
    assert seen[-1].not_before < planned < live.expires_at
    assert live.last_error is None
    assert live.stopped is None
    renewed = _records(caplog, logging.INFO, f"renewed {SUBJECT}: serial ")
    assert len(renewed) == 3
    for new, record in zip(seen[1:], renewed, strict=True):
        assert (
            f"serial {new.serial}, valid until {new.not_after.isoformat()}" in record.getMessage()
        )
    assert _records(caplog, logging.WARNING, "") == []


async def test_traffic_across_federated_cas_never_fails_while_both_sides_renew() -> None:
    """Continuous mutual-TLS requests between a cloud server and a kubernetes client, both
    renewing every ~2 s, never fail, and each side sees several certificates of the other."""
    with federated_pair(claims=SHORT, backdate="1s") as (cloud, kubernetes):
        server_identity = await _enrol(cloud, "server.cloud.internal")
        client_identity = await _enrol(kubernetes, "client.k8s.internal")
        ok, failed, server_serials = 0, list[BaseException](), set[int]()
        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                server_live = await tg.start(federatls.keep_renewed, server_identity, FAST)
                client_live = await tg.start(federatls.keep_renewed, client_identity, FAST)
                async with _echo(server_live) as echo:
                    while not failed and (len(server_serials) < 4 or len(echo.client_serials) < 4):
                        try:
                            server_serials.add(await _request(client_live, echo.port))
                            ok += 1
                        except Exception as exc:
                            failed.append(exc)
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
    assert failed == []
    assert ok >= 20
    assert server_live.renewals >= 3
    assert client_live.renewals >= 3
    assert server_identity.serial in server_serials
    assert server_live.current.serial in server_serials
    assert client_identity.serial in echo.client_serials
    # The run outlived the first certificates: renewed ones were really served.
    assert datetime.now(UTC) > server_identity.not_after
    assert datetime.now(UTC) > client_identity.not_after


async def test_traffic_to_a_server_that_does_not_renew_fails_once_it_expires() -> None:
    """Twin: a server on a fixed Identity is refused by clients once its short certificate
    expires ('certificate has expired')."""
    with federated_pair(claims=SHORT, backdate="1s") as (cloud, kubernetes):
        server_identity = await _enrol(cloud, "server.cloud.internal")
        client_identity = await _enrol(kubernetes, "client.k8s.internal")
        ok, failed = 0, list[BaseException]()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                client_live = await tg.start(federatls.keep_renewed, client_identity, FAST)
                async with _echo(server_identity) as echo:
                    while not failed:
                        try:
                            assert await _request(client_live, echo.port) == server_identity.serial
                            ok += 1
                        except Exception as exc:
                            failed.append(exc)
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
    assert ok >= 1
    assert datetime.now(UTC) >= server_identity.not_after
    assert isinstance(failed[0], ssl.SSLCertVerificationError), repr(failed[0])
    assert failed[0].verify_message == "certificate has expired"


# 3. The trust bundle -----------------------------------------------------------------------------
async def _renew_after_federating(ca: TestCA, partner: TestCA) -> tuple[Identity, Identity]:
    """Enrol with ``ca``, start renewal, federate ``partner`` at ``ca``, and return the
    enrolled identity and the one after the next renewal."""
    identity = await _enrol(ca)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            live = await tg.start(federatls.keep_renewed, identity, FAST)
            ca.federate(partner)
            renewed = await live.wait_for_update()
            tg.cancel_scope.cancel()
    return identity, renewed


async def test_renewal_refreshes_the_trust_bundle(caplog: pytest.LogCaptureFixture) -> None:
    """A root federated after enrolment is trusted from the next renewal on."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with (
        running_ca("cloud", claims=SHORT, backdate="1s") as cloud,
        running_ca("partner") as partner,
    ):
        identity, renewed = await _renew_after_federating(cloud, partner)
    assert identity.trust.by_fingerprint(partner.root_fingerprint) is None
    added = renewed.trust.by_fingerprint(partner.root_fingerprint)
    assert added is not None
    assert added.provenance is Provenance.FEDERATED
    assert len(renewed.trust) == 2
    assert _records(caplog, logging.WARNING, "trust bundle") == []


async def test_failed_bundle_fetch_keeps_the_last_good_bundle_and_still_renews(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twin: with /federation failing the certificate still renews, the previous bundle is
    kept (the new root is not trusted), last_error says why and a WARNING is logged."""
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def unreachable(self: CAClient) -> tuple[x509.Certificate, ...]:
        raise CAUnreachableError(self.url + "/federation", "injected failure")

    with (
        running_ca("cloud", claims=SHORT, backdate="1s") as cloud,
        running_ca("partner") as partner,
    ):
        identity = await _enrol(cloud)
        monkeypatch.setattr(CAClient, "federation", unreachable)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                live = await tg.start(federatls.keep_renewed, identity, FAST)
                cloud.federate(partner)
                renewed = await live.wait_for_update()
                tg.cancel_scope.cancel()
    assert renewed.serial != identity.serial
    assert live.renewals == 1
    assert renewed.trust is identity.trust
    assert renewed.trust.by_fingerprint(partner.root_fingerprint) is None
    assert isinstance(live.last_error, CAUnreachableError)
    assert live.last_error.reason == "injected failure"
    assert live.stopped is None
    warned = _records(caplog, logging.WARNING, "trust bundle not refreshed, keeping the last good")
    assert len(warned) == 1
    assert "injected failure" in warned[0].getMessage()
    assert _records(caplog, logging.WARNING, "renewal of") == []


# 4. The CA unreachable ---------------------------------------------------------------------------
async def test_unreachable_ca_backs_off_keeps_serving_and_recovers_by_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the CA stopped renewals fail with CAUnreachableError and back off while the
    current certificate keeps serving; the CA restarted on the same port and store is
    renewed against without help, and the failure count starts again from one."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    pki = _fixed_port_pki(tmp_path, "6s")
    with anyio.fail_after(45):
        async with anyio.create_task_group() as tg:
            async with serving(pki):
                identity = await _enrol(pki)
                live: RenewingIdentity = await tg.start(federatls.keep_renewed, identity, EAGER)
            # The CA is gone: every attempt fails, retried ever later.
            await wait_until(lambda: len(_failures(caplog)) >= 3, timeout=15)
            failures = _failures(caplog)[:3]
            assert [n for n, _ in failures] == [1, 2, 3]
            assert live.renewals == 0
            assert live.current is identity
            assert isinstance(live.last_error, CAUnreachableError)
            assert live.stopped is None
            assert live.next_renewal_at is not None
            assert live.next_renewal_at < live.expires_at
            delays = [d for _, d in failures]
            assert delays[0] <= 0.2 + SLACK
            assert delays[1] <= 0.4 + SLACK
            assert delays[2] <= 0.8 + SLACK
            assert delays[2] >= 2 * delays[0] - SLACK
            # ... and meanwhile the workload still serves with its current certificate.
            async with _echo(live) as echo:
                assert await _request(live, echo.port) == identity.serial
            assert datetime.now(UTC) < identity.not_after
            # The CA comes back at the same address with the same database.
            async with serving(pki):
                renewed = await live.wait_for_update()
            assert live.renewals == 1
            assert renewed.serial != identity.serial
            assert renewed.public_key_matches(identity.certificate)
            assert renewed.not_after > identity.not_after
            assert live.stopped is None
            # Gone again: the next failure is the first in a row, not the fourth.
            before = len(_failures(caplog))
            await wait_until(lambda: len(_failures(caplog)) > before, timeout=15)
            tg.cancel_scope.cancel()
    assert _failures(caplog)[before][0] == 1
    assert before >= 3
    assert live.renewals == 1
    assert _records(caplog, logging.ERROR, "") == []  # an outage never stops renewal


# 5. The CA refuses: revoked -------------------------------------------------------------------
@pytest.mark.parametrize("revoked", ["current", "superseded"])
async def test_revoked_certificate_stops_renewal(
    revoked: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Revoking the current certificate makes the next renewal a 401: renewal stops, says
    why, and the task returns by itself; revoking only a superseded one (the twin) changes
    nothing."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with running_ca("cloud", claims=SHORT, backdate="1s") as ca:
        identity = await _enrol(ca)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                live: RenewingIdentity = await tg.start(federatls.keep_renewed, identity, FAST)
                first = await live.wait_for_update()
                await _revoke(ca, first.serial if revoked == "current" else identity.serial)
                after = await live.wait_for_update()
                planned = live.next_renewal_at
                if revoked == "superseded":
                    tg.cancel_scope.cancel()
    stopped = _records(caplog, logging.ERROR, f"renewal of {SUBJECT} stopped")
    if revoked == "superseded":
        assert after.serial not in (identity.serial, first.serial)
        assert live.renewals == 2
        assert live.stopped is None
        assert planned is not None  # still renewing until the task group was left
        assert stopped == []
        return
    assert not tg.cancel_scope.cancel_called  # the task ended by itself
    assert after is first
    assert live.current is first
    assert live.renewals == 1
    assert isinstance(live.stopped, CARefusedError)
    assert live.stopped.status == 401
    assert live.last_error is live.stopped
    assert live.next_renewal_at is None
    assert len(stopped) == 1
    assert "401" in stopped[0].getMessage()


async def test_wait_for_update_after_renewal_stopped_returns_at_once() -> None:
    """Once renewal has stopped, wait_for_update() returns the current identity at once
    (as updates() ends at once) instead of waiting for a swap that will never come."""
    with running_ca("cloud", claims=SHORT, backdate="1s") as ca:
        identity = await _enrol(ca)
        clock = FakeClock()
        clock.advance(3600)  # an hour later the certificate has long expired
        live = RenewingIdentity(identity, policy=FAST, clock=clock)
        # The CA refuses its renew token (401: no renewal after expiry), and renewal stops.
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(live.run)
    if not isinstance(live.stopped, IdentityExpiredError):
        pytest.fail(f"renewal should have stopped on expiry, not {live.stopped!r}")
    with anyio.fail_after(1):
        assert [i async for i in live.updates()] == []
    with anyio.fail_after(1):
        assert await live.wait_for_update() is identity


# 6. The certificate expired --------------------------------------------------------------------
async def test_expired_certificate_without_token_source_stops_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate that expires while the CA is down cannot renew: tried again with backoff
    until the CA is back, then refused a renew token (its provisioner does not allow renewal
    after expiry), renewal stops with an IdentityExpiredError naming the expiry, and the task
    returns."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    pki = _fixed_port_pki(tmp_path, "3s")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            async with serving(pki):
                identity = await _enrol(pki)
                live: RenewingIdentity = await tg.start(federatls.keep_renewed, identity, FAST)
            # Past the second after notAfter: the CA compares whole seconds (as step-ca does),
            # so within that second it would still renew the certificate.
            left = identity.not_after - datetime.now(UTC) + timedelta(milliseconds=1300)
            await anyio.sleep(max(left.total_seconds(), 0.0))
            await wait_until(lambda: len(_failures(caplog)) >= 2)  # expired, the CA still down
            assert live.stopped is None
            async with serving(pki):
                await wait_until(lambda: live.stopped is not None)
        # The task ended by itself: nothing cancelled it.
    assert not tg.cancel_scope.cancel_called
    assert datetime.now(UTC) >= identity.not_after
    error = live.stopped
    assert isinstance(error, IdentityExpiredError)
    assert live.last_error is error
    message = str(error)
    assert f"the certificate of {SUBJECT} expired at {identity.not_after.isoformat()}" in message
    assert "new token" in message
    assert "token source" in message
    assert live.renewals == 0
    assert live.current is identity
    assert live.next_renewal_at is None
    with anyio.fail_after(1):
        assert [i async for i in live.updates()] == []
    assert len(_failures(caplog)) >= 1  # it tried (and failed) while the CA was down
    stopped = _records(caplog, logging.ERROR, f"renewal of {SUBJECT} stopped")
    assert len(stopped) == 1
    assert identity.not_after.isoformat() in stopped[0].getMessage()


async def test_expired_certificate_with_token_source_enrols_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Twin: given a token source, the expired workload enrols again once the CA is back
    (new serial, new key) and then renews that new certificate as usual."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    pki = _fixed_port_pki(tmp_path, "3s")
    tokens: list[str] = []

    async def token_source() -> str:
        tokens.append(pki.token(SUBJECT, sans=[SUBJECT, "127.0.0.1"]))
        return tokens[-1]

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            async with serving(pki):
                identity = await _enrol(pki)
                live: RenewingIdentity = await tg.start(
                    federatls.keep_renewed, identity, FAST, token_source
                )
            # Past the second after notAfter: the CA compares whole seconds (as step-ca does),
            # so within that second it would still renew the certificate.
            left = identity.not_after - datetime.now(UTC) + timedelta(milliseconds=1300)
            await anyio.sleep(max(left.total_seconds(), 0.0))
            assert live.stopped is None
            assert live.current is identity
            async with serving(pki):
                enrolled = await live.wait_for_update()
                renewed = await live.wait_for_update()
            tg.cancel_scope.cancel()
    assert tokens  # asked for at least once, after the expiry
    assert enrolled.serial != identity.serial
    assert not enrolled.public_key_matches(identity.certificate)  # a new key
    assert enrolled.common_name == SUBJECT
    assert enrolled.sans == identity.sans
    assert enrolled.not_before > identity.not_after - timedelta(seconds=2)
    assert renewed.serial != enrolled.serial
    assert renewed.public_key_matches(enrolled.certificate)  # renewed over mTLS: same key
    assert live.renewals == 2
    assert live.stopped is None
    warned = _records(caplog, logging.WARNING, f"certificate of {SUBJECT} expired")
    assert len(warned) >= 1
    assert "enrolling again with a new token" in warned[0].getMessage()


# 7. Blocking code -------------------------------------------------------------------------------
@contextlib.contextmanager
def _sync_identity() -> Iterator[Identity]:
    with running_ca("cloud", claims=SHORT, backdate="1s") as ca:
        yield ca.identity(SUBJECT, sans=[SUBJECT, "127.0.0.1"])


def test_keep_renewed_sync_renews_in_the_background_until_the_block_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From plain sync code the identity renews on a background thread, contexts follow the
    newest certificate, and nothing renews any more once the block has ended."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with _sync_identity() as identity:
        with federatls.keep_renewed_sync(identity, policy=EAGER) as live:
            before = live.client_context()
            _wait_sync(lambda: live.renewals >= 2, timeout=15)
            inside = live.current
            assert live.client_context() is not before
        ended_at = live.renewals
        time.sleep(2.0)  # about three renewal periods of EAGER with these certificates
    assert ended_at >= 2
    assert live.renewals == ended_at
    assert inside.serial != identity.serial
    assert inside.public_key_matches(identity.certificate)
    assert live.stopped is None
    assert len(_records(caplog, logging.INFO, f"renewed {SUBJECT}")) == ended_at


def test_next_renewal_at_is_none_once_keep_renewed_sync_has_ended() -> None:
    """After the keep_renewed_sync block no renewal is planned any more: next_renewal_at is
    None, as its docstring says once renewal has stopped."""
    with _sync_identity() as identity, federatls.keep_renewed_sync(identity, policy=FAST) as live:
        if live.next_renewal_at is None:
            pytest.fail("a renewal should be planned while the block runs")
    assert live.next_renewal_at is None
