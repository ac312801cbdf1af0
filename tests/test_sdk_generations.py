"""The SDK against a CA of either step-ca generation (docs/protocol.md, "Versions"): request
ids sent on every call and the CA's echo logged and carried on errors; ``/intermediates``
read where the CA has it (absent, not an error, where it has not: step-ca 0.19's 404, a
501) and used to complete a chain the CA sent short; and a certificate past its end renewed
with a renew token where the CA allows renewal after expiry, else enrolled again, else
stopped with ``IdentityExpiredError``.

Against real servers on 127.0.0.1: the federatls CA, the real step-ca 0.19 binary, and
``rogue_ca.RogueCA`` (a real HTTPS server with a real test PKI) for what neither does: echo
ids with or without 0.26's header, answer a short chain, publish intermediates or not.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import federatls
from federatls import (
    BadMaterialError,
    CARefusedError,
    CATimeoutError,
    CAUnreachableError,
    Identity,
    IdentityExpiredError,
    RenewingIdentity,
    TrustBundle,
)
from federatls._client import CAClient, refused_as_expired
from federatls._issuance import complete_chain, needs_completing
from federatls._keys import KeyType, new_private_key
from federatls._protocol import RevokeRequest, read_request_id
from rogue_ca import Behaviour, Issue, RogueCA

from harness import (
    FAST,
    PKI,
    SHORT,
    FakeClock,
    free_port,
    make_pki,
    serving,
    stepca_binary,
    stepca_process,
    wait_until,
)

pytestmark = pytest.mark.anyio

SUBJECT = "svc.cloud.internal"
SANS = [SUBJECT, "127.0.0.1"]
CLIENT_LOG = "federatls"
RENEWAL_LOG = "federatls.renewal"
CAS = ["federatls", pytest.param("step-ca", marks=pytest.mark.stepca)]


# Helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _rogue(tmp_path: Path) -> Iterator[RogueCA]:
    rogue = RogueCA(make_pki(tmp_path, "cloud"))
    with rogue.running():
        yield rogue


def _short_pki(tmp_path: Path, *, after_expiry: bool) -> PKI:
    """A PKI issuing certificates that end 3 s after they are issued, its provisioner
    allowing renewal after expiry or not. step-ca 0.19 verifies a renew token's chain as of
    a minute before the leaf's notAfter: the default backdate of a minute stays (a leaf valid
    for less than a minute in all could never be renewed after expiry), and the PKI is made
    as of ten minutes ago (an intermediate younger than a minute fails that check too)."""
    pki = make_pki(tmp_path, "cloud", now=datetime.now(UTC) - timedelta(minutes=10))
    pki.set_claims(**SHORT, allowRenewalAfterExpiry=after_expiry)
    return pki


@contextlib.asynccontextmanager
async def _running(
    kind: str, pki: PKI, request: pytest.FixtureRequest, clock: FakeClock | None = None
) -> AsyncIterator[None]:
    """``pki`` served by the federatls CA (on ``clock``) or by the real step-ca 0.19."""
    if kind == "federatls":
        async with serving(pki, clock):
            yield
        return
    request.getfixturevalue("stepca_bin")  # skips (or fails) without the binary
    binary = stepca_binary()
    assert binary is not None
    with stepca_process(binary, pki):
        yield


async def _enrol(pki: PKI) -> Identity:
    return await federatls.bootstrap(pki.token(SUBJECT, sans=SANS))


async def _past(identity: Identity) -> None:
    """Sleep until ``identity`` has expired (by the wall clock), with a margin."""
    left = identity.not_after - datetime.now(UTC) + timedelta(milliseconds=1200)
    await anyio.sleep(max(left.total_seconds(), 0.0))


def _messages(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


# 1. Request ids --------------------------------------------------------------------------------
async def test_every_call_sends_a_fresh_request_id_and_logs_the_ca_echo(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bootstrap's every call carries its own UUID in X-Request-Id, and each answer is
    logged at DEBUG with the id the CA echoed."""
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOG)
    with _rogue(tmp_path) as rogue:
        await _enrol(rogue.pki)
    ids = rogue.request_ids
    assert len(ids) == len(rogue.requests) >= 4  # /root, /sign, /roots, /federation...
    assert all(i is not None and str(uuid.UUID(i)) == i for i in ids)
    assert len(set(ids)) == len(ids)
    logged = "\n".join(_messages(caplog, CLIENT_LOG, logging.DEBUG))
    for request_id in ids:
        assert f"request id {request_id}" in logged
    assert "not echoed" not in logged


async def test_a_ca_that_echoes_no_request_id_is_logged_as_not_echoed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Twin: a CA before 0.26 echoes nothing: the call still works, and its log line gives
    the id sent, marked as not echoed."""
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOG)
    with _rogue(tmp_path) as rogue:
        rogue.echo = False
        await _enrol(rogue.pki)
    logged = _messages(caplog, CLIENT_LOG, logging.DEBUG)
    for request_id in rogue.request_ids:
        assert any(f"request id {request_id} (not echoed)" in line for line in logged)


async def test_crl_from_a_ca_without_intermediates_says_to_give_them(tmp_path: Path) -> None:
    """A CA serving /crl but not /intermediates (step-ca 0.23 to 0.27.2): the CRL cannot be
    checked with the roots alone, and the error says to give the intermediates. Twin: given
    them (issuers=), or published, the same CRL verifies."""
    with _rogue(tmp_path) as rogue:
        rogue.crl = rogue.signed_crl()
        async with rogue.pki.client() as ca:
            with pytest.raises(BadMaterialError) as unverified:
                await ca.crl()
            _, given = await ca.crl(issuers=[rogue.intermediate])
        rogue.published = (201, [rogue.intermediate])
        async with rogue.pki.client() as ca:
            _, published = await ca.crl()
    assert "does not verify" in str(unverified.value)
    assert "--intermediates" in str(unverified.value)
    assert given.issuer == published.issuer == rogue.intermediate.subject


async def test_a_refusal_carries_the_request_id_the_ca_echoed(tmp_path: Path) -> None:
    """A refusal's CARefusedError carries the CA's echoed id as request_id and in its
    message, so that it can be found in the CA's log."""
    with _rogue(tmp_path) as rogue:
        async with rogue.pki.client() as ca:
            with pytest.raises(CARefusedError) as refused:
                await ca.version()  # the rogue CA has no /version: 404
    assert refused.value.status == 404
    echoed = rogue.request_ids[-1]
    assert echoed is not None
    assert refused.value.request_id == echoed
    assert f"[request id {echoed}]" in str(refused.value)


@pytest.mark.parametrize("answer", [None, "x" * 129, "two words", "id\tcontrol"])
async def test_a_refusal_without_a_plain_echoed_id_carries_none(
    answer: str | None, tmp_path: Path
) -> None:
    """Twin: no id echoed (step-ca before 0.26), or one too long or with odd characters (a
    hostile CA's): request_id is None, and the message quotes no id."""
    with _rogue(tmp_path) as rogue:
        rogue.echo = answer is not None
        rogue.answer_id = answer
        async with rogue.pki.client() as ca:
            with pytest.raises(CARefusedError) as refused:
                await ca.version()
    assert refused.value.status == 404
    assert refused.value.request_id is None
    assert "request id" not in str(refused.value)


def test_read_request_id_keeps_plain_ids_only() -> None:
    """A UUID, an xid and 128 plain characters are read as ids; Twin: 129 characters, a
    space, a quote or nothing are not."""
    for plain in (str(uuid.uuid4()), "9m4e2mr0ui3e8a215n4g", "a" * 128, " padded "):
        assert read_request_id(plain) == plain.strip()
    for odd in ("a" * 129, "two words", 'say"no', "-leading-dash", "", None):
        assert read_request_id(odd) is None


@settings(max_examples=300, deadline=None, database=None)
@given(value=st.text(max_size=200))
def test_read_request_id_never_lets_an_odd_value_through(value: str) -> None:
    """Whatever a CA echoes, what is read is None or a plain id of at most 128 characters
    from letters, digits and ``._:/+=@~-``, starting with a letter or digit (nothing that
    could forge a log line or a header)."""
    got = read_request_id(value)
    assert got is None or (
        len(got) <= 128
        and got[0].isascii()
        and got[0].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "._:/+=@~-") for c in got)
    )


async def test_a_failure_after_the_answer_began_carries_the_echoed_id(tmp_path: Path) -> None:
    """An answer whose headers came but whose body dripped past the deadline: the
    CATimeoutError carries the id the CA echoed."""
    with _rogue(tmp_path) as rogue:
        rogue.behaviour["/roots"] = Behaviour(drip=0.2, head_at_once=True)
        async with CAClient(rogue.url, [rogue.pki.root], timeout=1.0) as ca:
            with pytest.raises(CATimeoutError) as late:
                await ca.roots_bundle()
    echoed = rogue.request_ids[-1]
    assert echoed is not None
    assert late.value.request_id == echoed
    assert f"[request id {echoed}]" in str(late.value)


async def test_a_ca_that_never_answered_gives_no_request_id(tmp_path: Path) -> None:
    """Twin: nothing listening, no answer: CAUnreachableError with request_id None."""
    pki = make_pki(tmp_path, "cloud")
    async with CAClient(f"https://127.0.0.1:{free_port()}", [pki.root], timeout=5.0) as ca:
        with pytest.raises(CAUnreachableError) as unreachable:
            await ca.health()
    assert unreachable.value.request_id is None
    assert "request id" not in str(unreachable.value)


@pytest.mark.parametrize(
    ("kind", "echoes"),
    [
        ("federatls", True),
        # step-ca 0.19 answers without X-Request-Id (echoed from 0.26 on, PR #1743).
        pytest.param("step-ca", False, marks=pytest.mark.stepca),
    ],
)
async def test_a_real_ca_refusal_carries_its_echoed_request_id(
    kind: str,
    echoes: bool,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The federatls CA echoes each call's id: its refusal (400, no client certificate)
    carries the id the client sent and logged; Twin: step-ca 0.19 echoes none, so its
    refusal carries None while the call is logged as not echoed."""
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOG)
    pki = make_pki(tmp_path, "cloud")
    async with _running(kind, pki, request), pki.client() as ca:
        assert await ca.health() == "ok"
        with pytest.raises(CARefusedError) as refused:
            await ca.renew()  # no client certificate: 400
    assert refused.value.status == 400
    logged = [m for m in _messages(caplog, CLIENT_LOG, logging.DEBUG) if "/renew: 400" in m]
    assert len(logged) == 1
    if echoes:
        echoed = refused.value.request_id
        assert echoed is not None
        assert str(uuid.UUID(echoed)) == echoed  # the client's UUID, echoed as sent
        assert logged[0].endswith(f"request id {echoed}")
        assert f"[request id {echoed}]" in str(refused.value)
    else:
        assert refused.value.request_id is None
        assert logged[0].endswith("(not echoed)")


# 2. /intermediates -----------------------------------------------------------------------------
async def test_intermediates_are_read_where_the_ca_publishes_them(tmp_path: Path) -> None:
    """A CA answering /intermediates (201 {"crts": [...]}) gives its intermediates."""
    with _rogue(tmp_path) as rogue:
        rogue.published = (201, [rogue.intermediate])
        async with rogue.pki.client() as ca:
            assert await ca.intermediates() == (rogue.intermediate,)


@pytest.mark.parametrize("status", [404, 501])
async def test_intermediates_absent_is_none(status: int, tmp_path: Path) -> None:
    """A 404 (step-ca before 0.27.3: no such route) or a 501 means no intermediates
    published: None, not an error."""
    with _rogue(tmp_path) as rogue:
        rogue.published = None if status == 404 else (status, [])
        async with rogue.pki.client() as ca:
            assert await ca.intermediates() is None
    assert rogue.requests[-1] == "GET /intermediates"


async def test_intermediates_failing_otherwise_is_an_error(tmp_path: Path) -> None:
    """Twin: a 500 is no answer about intermediates: CARefusedError, not None."""
    with _rogue(tmp_path) as rogue:
        rogue.published = (500, [])
        async with rogue.pki.client() as ca:
            with pytest.raises(CARefusedError) as refused:
                await ca.intermediates()
    assert refused.value.status == 500


@pytest.mark.parametrize(
    ("kind", "publishes"),
    [
        ("federatls", True),
        # step-ca 0.19 has no /intermediates (404; added in 0.27.3, PR #1962): absent.
        pytest.param("step-ca", False, marks=pytest.mark.stepca),
    ],
)
async def test_a_real_ca_intermediates(
    kind: str, publishes: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The federatls CA publishes its intermediate, the one that signs its certificates;
    Twin: step-ca 0.19 has no such route, and intermediates() says None."""
    pki = make_pki(tmp_path, "cloud")
    async with _running(kind, pki, request):
        identity = await _enrol(pki)
        async with pki.client() as ca:
            published = await ca.intermediates()
    if publishes:
        assert published == identity.chain[1:]
    else:
        assert published is None


async def test_bootstrap_completes_a_short_chain_from_intermediates(tmp_path: Path) -> None:
    """A CA whose sign answer holds the leaf alone: the chain is completed from its
    /intermediates, and the identity serves leaf and intermediate."""
    with _rogue(tmp_path) as rogue:
        rogue.issue = Issue(short_chain=True)
        rogue.published = (201, [rogue.intermediate])
        identity = await _enrol(rogue.pki)
    assert identity.chain[1:] == (rogue.intermediate,)
    assert "GET /intermediates" in rogue.requests


@pytest.mark.parametrize("published", ["404", "501", "another CA's"])
async def test_bootstrap_refuses_a_short_chain_it_cannot_complete(
    published: str, tmp_path: Path
) -> None:
    """Twin: a short chain from a CA that publishes no intermediates (404, 501) or none that
    fits is refused: it does not chain to the CA's roots."""
    other = RogueCA(make_pki(tmp_path, "other"))
    with _rogue(tmp_path) as rogue:
        rogue.issue = Issue(short_chain=True)
        rogue.published = {
            "404": None,
            "501": (501, []),
            "another CA's": (201, [other.intermediate]),
        }[published]
        with pytest.raises(BadMaterialError, match="does not chain to a root of its CA"):
            await _enrol(rogue.pki)


async def test_a_full_chain_needs_no_intermediates(tmp_path: Path) -> None:
    """Twin: a full chain is taken as it came, /intermediates never asked for."""
    with _rogue(tmp_path) as rogue:
        rogue.published = (201, [rogue.intermediate])
        identity = await _enrol(rogue.pki)
    assert identity.chain[1:] == (rogue.intermediate,)
    assert "GET /intermediates" not in rogue.requests


async def test_renewal_completes_a_short_chain_from_intermediates(tmp_path: Path) -> None:
    """A renewal answered with the leaf alone is completed from /intermediates."""
    with _rogue(tmp_path) as rogue:
        identity = await _enrol(rogue.pki)
        rogue.issue = Issue(short_chain=True)
        rogue.published = (201, [rogue.intermediate])
        renewed = await RenewingIdentity(identity, policy=FAST).refresh()
    assert renewed.serial != identity.serial
    assert renewed.chain[1:] == (rogue.intermediate,)


async def test_renewal_refuses_a_short_chain_it_cannot_complete(tmp_path: Path) -> None:
    """Twin: the same short answer from a CA without /intermediates is refused, and the old
    identity stays."""
    with _rogue(tmp_path) as rogue:
        identity = await _enrol(rogue.pki)
        rogue.issue = Issue(short_chain=True)
        live = RenewingIdentity(identity, policy=FAST)
        with pytest.raises(BadMaterialError, match="does not chain to a root of its CA"):
            await live.refresh()
    assert live.current is identity


def test_complete_chain_replaces_a_wrong_intermediate(tmp_path: Path) -> None:
    """A chain holding another CA's intermediate is rebuilt from the published ones; Twin: with
    none that fits, the chain is returned as it was (and still needs completing)."""
    rogue, other = RogueCA(make_pki(tmp_path, "cloud")), RogueCA(make_pki(tmp_path, "other"))
    key = new_private_key(KeyType.P256)
    leaf = rogue.certificate(SUBJECT, SANS, key.public_key(), Issue())
    roots = TrustBundle.from_ca([rogue.pki.root], ())
    wrong = (leaf, other.intermediate)
    assert needs_completing(wrong, roots)
    fixed = complete_chain(wrong, [other.intermediate, rogue.intermediate], roots)
    assert fixed == (leaf, rogue.intermediate)
    assert not needs_completing(fixed, roots)
    assert complete_chain(wrong, [other.intermediate], roots) == wrong


# 3. Expiry -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "alert", "told"),
    [
        ("federatls", "SSLV3_ALERT_CERTIFICATE_EXPIRED", True),
        # step-ca 0.19 (Go's TLS stack) answers an expired client certificate with the
        # alert bad_certificate, as it does one it does not trust: not told apart. The
        # renewal learns the expiry from its own clock, and retries until then.
        pytest.param("step-ca", "SSLV3_ALERT_BAD_CERTIFICATE", False, marks=pytest.mark.stepca),
    ],
)
async def test_an_expired_certificate_is_refused_at_the_handshake(
    kind: str, alert: str, told: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Renewing an expired certificate over mutual TLS fails at the handshake; the federatls
    CA's alert "certificate expired" is recognised by refused_as_expired."""
    pki = _short_pki(tmp_path, after_expiry=False)
    async with _running(kind, pki, request):
        identity = await _enrol(pki)
        await _past(identity)
        async with pki.client(identity=(identity.chain, identity._key)) as ca:
            with pytest.raises(CAUnreachableError) as failed:
                await ca.renew()
    assert alert in str(failed.value)
    assert refused_as_expired(failed.value) is told


@pytest.mark.parametrize("kind", CAS)
async def test_a_revoked_certificate_refused_over_mtls_is_not_taken_for_expired(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Twin: a valid but revoked certificate's refusal (401) is not an expiry."""
    pki = _short_pki(tmp_path, after_expiry=False)
    pki.set_claims(minTLSCertDuration="1s", defaultTLSCertDuration="1h")
    async with _running(kind, pki, request):
        identity = await _enrol(pki)
        async with pki.client(identity=(identity.chain, identity._key)) as ca:
            await ca.revoke(RevokeRequest(serial=str(identity.serial)))
            with pytest.raises(CARefusedError) as refused:
                await ca.renew()
    assert refused.value.status == 401
    assert not refused_as_expired(refused.value)


async def test_a_ca_clock_ahead_says_expired_with_401(tmp_path: Path) -> None:
    """A certificate valid by the TLS layer's clock but past its end by the CA's: 401
    "certificate ... expired", which refused_as_expired recognises."""
    pki = _short_pki(tmp_path, after_expiry=False)
    clock = FakeClock()
    async with serving(pki, clock):
        identity = await _enrol(pki)
        clock.advance(10)
        async with pki.client(identity=(identity.chain, identity._key)) as ca:
            with pytest.raises(CARefusedError) as refused:
                await ca.renew()
    assert refused.value.status == 401
    assert refused_as_expired(refused.value), refused.value


@pytest.mark.parametrize("kind", CAS)
async def test_an_expired_identity_renews_with_a_renew_token_where_allowed(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """With allowRenewalAfterExpiry, an identity past its end renews through the Bearer
    renew token: the same key and names, a new serial, valid now."""
    caplog.set_level(logging.INFO, logger=RENEWAL_LOG)
    pki = _short_pki(tmp_path, after_expiry=True)
    async with _running(kind, pki, request):
        identity = await _enrol(pki)
        await _past(identity)
        live = RenewingIdentity(identity, policy=FAST)
        with anyio.fail_after(20):
            renewed = await live.refresh()
    assert renewed.serial != identity.serial
    assert renewed.public_key_matches(identity.certificate)
    assert renewed.sans == identity.sans
    assert renewed.not_after > datetime.now(UTC) - timedelta(seconds=2)
    assert live.current is renewed
    warned = _messages(caplog, RENEWAL_LOG, logging.WARNING)
    assert any(f"certificate of {SUBJECT} expired" in m and "renew token" in m for m in warned)


@pytest.mark.parametrize("kind", CAS)
async def test_an_expired_identity_stops_where_renewal_after_expiry_is_not_allowed(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """Twin: without allowRenewalAfterExpiry the renew token is refused (401), and with no
    token source renewal stops with IdentityExpiredError after that one try: the task ends
    by itself, no retry loop."""
    caplog.set_level(logging.INFO, logger=RENEWAL_LOG)
    pki = _short_pki(tmp_path, after_expiry=False)
    async with _running(kind, pki, request):
        identity = await _enrol(pki)
        await _past(identity)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                live: RenewingIdentity = await tg.start(federatls.keep_renewed, identity, FAST)
    error = live.stopped
    assert isinstance(error, IdentityExpiredError)
    assert isinstance(error.__cause__, CARefusedError)
    assert error.__cause__.status == 401
    assert "does not renew it after expiry (401" in str(error)
    assert "token source" in str(error)
    assert live.renewals == 0
    assert live.current is identity
    warned = _messages(caplog, RENEWAL_LOG, logging.WARNING)
    tried = [m for m in warned if "renewing it with a renew token" in m]
    assert len(tried) == 1
    assert not [m for m in warned if "failed (" in m]
    stopped = _messages(caplog, RENEWAL_LOG, logging.ERROR)
    assert len(stopped) == 1
    assert stopped[0].startswith(f"renewal of {SUBJECT} stopped")


@pytest.mark.parametrize("kind", CAS)
async def test_an_expired_identity_enrols_again_where_renewal_after_expiry_is_not_allowed(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Twin: the same refusal with a token source enrols again (a new key), and renewal
    goes on."""
    pki = _short_pki(tmp_path, after_expiry=False)

    async def token_source() -> str:
        return pki.token(SUBJECT, sans=SANS)

    async with _running(kind, pki, request):
        identity = await _enrol(pki)
        await _past(identity)
        live = RenewingIdentity(identity, policy=FAST, token_source=token_source)
        with anyio.fail_after(20):
            enrolled = await live.refresh()
    assert live.stopped is None
    assert enrolled.serial != identity.serial
    assert not enrolled.public_key_matches(identity.certificate)
    assert enrolled.sans == identity.sans


@pytest.mark.parametrize("after_expiry", [True, False])
async def test_an_identity_the_ca_calls_expired_takes_the_renew_token_path(
    after_expiry: bool, tmp_path: Path
) -> None:
    """Our clock says valid, the CA's (ahead) says expired (401): the renewal goes the renew
    token way at once; it renews where the provisioner allows it, and Twin: stops with
    IdentityExpiredError where it does not."""
    pki = _short_pki(tmp_path, after_expiry=after_expiry)
    clock = FakeClock()
    async with serving(pki, clock):
        identity = await _enrol(pki)
        clock.advance(10)
        live = RenewingIdentity(identity, policy=FAST)
        with anyio.fail_after(20):
            if after_expiry:
                renewed = await live.refresh()
                assert renewed.public_key_matches(identity.certificate)
                assert renewed.serial != identity.serial
            else:
                with pytest.raises(IdentityExpiredError, match="does not renew it after expiry"):
                    await live.refresh()
                assert live.current is identity


async def test_an_expired_identity_retries_while_the_ca_is_down(tmp_path: Path) -> None:
    """An expired identity whose CA does not answer is retried with backoff (not stopped, no
    busy loop), and renews once the CA is back where renewal after expiry is allowed."""
    pki = _short_pki(tmp_path, after_expiry=True)
    pki.edit(lambda d: d.__setitem__("address", f"127.0.0.1:{free_port()}"))
    async with serving(pki):
        identity = await _enrol(pki)
    await _past(identity)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            live: RenewingIdentity = await tg.start(federatls.keep_renewed, identity, FAST)
            await wait_until(lambda: isinstance(live.last_error, CAUnreachableError))
            failures = live._failures
            await anyio.sleep(1.0)
            assert live._failures - failures <= 5  # backoff of 0.2..1 s, no busy loop
            assert live.stopped is None
            async with serving(pki):
                renewed = await live.wait_for_update()
            tg.cancel_scope.cancel()
    assert renewed.public_key_matches(identity.certificate)
    assert renewed.serial != identity.serial
