"""The federatls CA's CRL (GET /crl, step-ca 0.23+; docs/protocol.md, "CRL"): a real CRL
signed by the intermediate from the store's revocations (SQLite and PostgreSQL), its headers,
its caching, the 404 of a CA whose ca.json does not enable it, ca.json's ``crl`` block,
CAClient.crl() and ``federatls ca crl``; checked with ``openssl crl`` and ``cryptography``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from federatls._errors import BadMaterialError, CARefusedError, ConfigError
from federatls._protocol import CRL_DISABLED_MESSAGE, CRLResponse, RevokeRequest
from federatls._x509 import load_pem_certificate
from federatls.ca import CAServer
from federatls.ca._config import CRLConfig
from federatls.ca._crl import StoredCRL
from test_ca_workers import supervised

from harness import (
    PASSWORD,
    PKI,
    FakeClock,
    assert_one_line_error,
    federatls,
    make_pki,
    serving,
)

pytestmark = pytest.mark.anyio

_ON = {"enabled": True, "generateOnRevoke": True}


def _enable(pki: PKI, block: dict[str, Any] | None = None) -> None:
    pki.edit(lambda d: d.__setitem__("crl", dict(_ON) if block is None else block))


def _intermediate(pki: PKI) -> x509.Certificate:
    return load_pem_certificate((pki.directory / "certs" / "intermediate_ca.crt").read_bytes())


def _http(pki: PKI, url: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url or pki.url,
        verify=ssl.create_default_context(cadata=pki.root_path.read_text()),
    )


async def _revoke(pki: PKI, serial: int, reason_code: int = 0) -> None:
    token = pki.token(str(serial), revoke=True)
    async with pki.client() as ca:
        await ca.revoke(RevokeRequest(str(serial), ott=token, reason_code=reason_code))


async def _fetch(pki: PKI, path: str = "/crl", url: str | None = None) -> httpx.Response:
    async with _http(pki, url) as http:
        return await http.get(path)


def _openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("openssl")
    assert binary is not None, "the openssl command is needed to check CRLs"
    return subprocess.run(
        [binary, "crl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def _number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


@contextlib.asynccontextmanager
async def _serving_crl(
    pki: PKI, clock: FakeClock, block: dict[str, Any] | None = None
) -> AsyncIterator[CAServer]:
    _enable(pki, block)
    async with serving(pki, clock) as server:
        yield server


async def test_revoked_serial_is_listed_with_reason_and_time_and_a_live_one_is_not(
    pki: PKI, clock: FakeClock, tmp_path: Path
) -> None:
    """A revoked serial is in the DER CRL with its reason and time, a live serial is not, and
    openssl verifies it with the intermediate. Twin: the live serial's absence, and another
    CA's intermediate (test_crl_signature_fails_with_another_cas_intermediate)."""
    async with _serving_crl(pki, clock):
        revoked = (await pki.enroll("gone.cloud.internal"))[0][0]
        live = (await pki.enroll("live.cloud.internal"))[0][0]
        before = clock().replace(microsecond=0)
        await _revoke(pki, revoked.serial_number, reason_code=1)
        answer = await _fetch(pki)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/pkix-crl"
    assert answer.headers["content-disposition"] == 'attachment; filename="crl.crl"'
    crl = x509.load_der_x509_crl(answer.content)
    assert parsedate_to_datetime(answer.headers["expires"]) == crl.next_update_utc
    entry = crl.get_revoked_certificate_by_serial_number(revoked.serial_number)
    assert entry is not None
    assert crl.get_revoked_certificate_by_serial_number(live.serial_number) is None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    assert before <= entry.revocation_date_utc <= clock() + timedelta(seconds=1)
    assert crl.issuer == _intermediate(pki).subject
    assert crl.is_signature_valid(_intermediate(pki).public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None
    assert crl.last_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(hours=24)  # default
    point = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert point.critical
    assert point.value.full_name == [x509.UniformResourceIdentifier("https://127.0.0.1/1.0/crl")]
    der = tmp_path / "crl.der"
    der.write_bytes(answer.content)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(
        (pki.directory / "certs" / "intermediate_ca.crt").read_bytes() + pki.root_path.read_bytes()
    )
    text = _openssl("-inform", "DER", "-in", der, "-noout", "-text")
    assert text.returncode == 0, text.stderr
    assert f"{revoked.serial_number:X}" in text.stdout.replace(":", "")
    assert "Key Compromise" in text.stdout
    verify = _openssl("-inform", "DER", "-in", der, "-CAfile", chain, "-noout")
    assert verify.returncode == 0, verify
    assert "verify OK" in verify.stderr + verify.stdout, verify


async def test_crl_signature_fails_with_another_cas_intermediate(
    pki: PKI, clock: FakeClock, tmp_path: Path
) -> None:
    """openssl and cryptography refuse the CRL with another CA's intermediate and root.
    Twin of the verification that succeeds with this CA's own."""
    other = make_pki(tmp_path, "edge")
    async with _serving_crl(pki, clock):
        answer = await _fetch(pki)
    crl = x509.load_der_x509_crl(answer.content)
    assert not crl.is_signature_valid(_intermediate(other).public_key())  # type: ignore[arg-type]
    der, chain = tmp_path / "crl.der", tmp_path / "other.pem"
    der.write_bytes(answer.content)
    chain.write_bytes(
        (other.directory / "certs" / "intermediate_ca.crt").read_bytes()
        + other.root_path.read_bytes()
    )
    verify = _openssl("-inform", "DER", "-in", der, "-CAfile", chain, "-noout")
    assert verify.returncode != 0
    assert "verify OK" not in verify.stdout + verify.stderr


@pytest.mark.parametrize("path", ["/crl?pem", "/1.0/crl?pem=true"])
async def test_pem_variant(pki: PKI, clock: FakeClock, tmp_path: Path, path: str) -> None:
    """``?pem`` (any value) answers the same CRL in PEM, application/x-pem-file, crl.pem.
    Twin: without ``?pem`` the body is DER (the first test)."""
    async with _serving_crl(pki, clock):
        gone = (await pki.enroll("gone.cloud.internal"))[0][0]
        await _revoke(pki, gone.serial_number)
        pem, der = (
            await _fetch(pki, path),
            await _fetch(pki, path.replace("?pem=true", "").replace("?pem", "")),
        )
    assert pem.status_code == 200
    assert pem.headers["content-type"] == "application/x-pem-file"
    assert pem.headers["content-disposition"] == 'attachment; filename="crl.pem"'
    assert pem.content.startswith(b"-----BEGIN X509 CRL-----\n")
    assert x509.load_pem_x509_crl(pem.content) == x509.load_der_x509_crl(der.content)
    assert not der.content.startswith(b"-----")
    crl = x509.load_pem_x509_crl(pem.content)
    entry = crl.get_revoked_certificate_by_serial_number(gone.serial_number)
    assert entry is not None
    assert not list(entry.extensions)  # reason 0 (unspecified) is left out, as step-ca
    file = tmp_path / "crl.pem"
    file.write_bytes(pem.content)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(
        (pki.directory / "certs" / "intermediate_ca.crt").read_bytes() + pki.root_path.read_bytes()
    )
    verify = _openssl("-in", file, "-CAfile", chain, "-noout")
    assert verify.returncode == 0, verify


@pytest.mark.parametrize("block", [None, {"enabled": False, "generateOnRevoke": True}])
async def test_ca_without_crl_answers_404(
    pki: PKI, clock: FakeClock, block: dict[str, Any] | None, caplog: pytest.LogCaptureFixture
) -> None:
    """No ``crl`` block, or one with enabled false: 404 with step-ca 0.30's body, under both
    prefixes, and a log line naming the request id and the reason. Twin: an enabled block
    answers 200 (the tests above)."""
    caplog.set_level(logging.INFO, "federatls.ca")
    if block is not None:
        pki.edit(lambda d: d.__setitem__("crl", block))
    async with serving(pki, clock):
        answers = [await _fetch(pki, p) for p in ("/crl", "/1.0/crl", "/crl?pem")]
        async with pki.client() as ca:
            with pytest.raises(CARefusedError) as refused:
                await ca.crl()
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    for answer in answers:
        assert answer.status_code == 404
        assert answer.json() == {"status": 404, "message": CRL_DISABLED_MESSAGE}
        said = [line for line in refusals if f"(request {answer.headers['x-request-id']})" in line]
        assert len(said) == 1, refusals
        assert "does not enable CRLs" in said[0]
    assert refused.value.status == 404
    assert "does not enable one" in str(refused.value)  # the hint
    assert refused.value.request_id is not None


async def test_number_grows_and_a_cached_crl_waits_for_its_renewal(
    pki: PKI, clock: FakeClock
) -> None:
    """Without generateOnRevoke the served CRL is kept until renewPeriod has passed, then a
    new one (number one more) lists the revocation; with it, a revocation makes one at once
    (the first test). Twin: before the period, the revoked serial is not yet listed."""
    block = {"enabled": True, "cacheDuration": "1h", "renewPeriod": "10m"}
    async with _serving_crl(pki, clock, block):
        gone = (await pki.enroll("gone.cloud.internal"))[0][0]
        first = x509.load_der_x509_crl((await _fetch(pki)).content)
        await _revoke(pki, gone.serial_number)
        kept = await _fetch(pki)
        clock.advance(11 * 60)
        renewed = x509.load_der_x509_crl((await _fetch(pki)).content)
        again = x509.load_der_x509_crl((await _fetch(pki)).content)
    assert x509.load_der_x509_crl(kept.content) == first
    assert first.get_revoked_certificate_by_serial_number(gone.serial_number) is None
    assert renewed.get_revoked_certificate_by_serial_number(gone.serial_number) is not None
    assert _number(renewed) == _number(first) + 1
    assert again == renewed  # cached until its own renewal
    assert renewed.next_update_utc is not None
    assert renewed.last_update_utc is not None
    assert renewed.next_update_utc - renewed.last_update_utc == timedelta(hours=1)


async def test_long_expired_revoked_certificate_is_left_out(pki: PKI, clock: FakeClock) -> None:
    """A revoked certificate stays listed until an hour after it expired, then is left
    out, as step-ca does. Twin: listed 30 minutes after its expiry."""
    block = {"enabled": True, "generateOnRevoke": True, "cacheDuration": "30m"}
    async with _serving_crl(pki, clock, block):
        gone = (await pki.enroll("gone.cloud.internal", not_after="5m"))[0][0]
        await _revoke(pki, gone.serial_number)
        clock.advance(35 * 60)
        soon_after = x509.load_der_x509_crl((await _fetch(pki)).content)
        clock.advance(35 * 60)
        long_after = x509.load_der_x509_crl((await _fetch(pki)).content)
    assert soon_after.get_revoked_certificate_by_serial_number(gone.serial_number) is not None
    assert long_after.get_revoked_certificate_by_serial_number(gone.serial_number) is None


async def test_idp_url_from_the_block(pki: PKI, clock: FakeClock) -> None:
    """``idpURL`` becomes the issuing distribution point. Twin: the default (first test)."""
    block = {"enabled": True, "idpURL": "http://crl.cloud.example/ca.crl"}
    async with _serving_crl(pki, clock, block):
        crl = x509.load_der_x509_crl((await _fetch(pki)).content)
    point = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    assert point.full_name == [x509.UniformResourceIdentifier("http://crl.cloud.example/ca.crl")]


async def test_replicas_on_one_postgresql_serve_the_same_crl(pki: PKI, pg: str) -> None:
    """Two CA processes on one PostgreSQL serve byte-identical CRLs, a revocation made
    through one listed by the other. Twin: the CRL before the revocation lacks it."""
    _enable(pki)
    async with (
        CAServer.running(pki.config, PASSWORD) as one,
        CAServer.running(pki.config, PASSWORD) as two,
    ):
        pki.url = one.url
        gone = (await pki.enroll("gone.cloud.internal"))[0][0]
        before = (await _fetch(pki, url=two.url)).content
        await _revoke(pki, gone.serial_number, reason_code=4)
        answers = [(await _fetch(pki, url=u)).content for u in (one.url, two.url, one.url)]
    assert len(set(answers)) == 1
    crl, old = x509.load_der_x509_crl(answers[0]), x509.load_der_x509_crl(before)
    assert old.get_revoked_certificate_by_serial_number(gone.serial_number) is None
    entry = crl.get_revoked_certificate_by_serial_number(gone.serial_number)
    assert entry is not None
    assert _number(crl) > _number(old)


async def test_client_crl_verifies_and_refuses_another_cas_intermediate(
    pki: PKI, clock: FakeClock, tmp_path: Path
) -> None:
    """CAClient.crl() returns the CRL verified with the CA's intermediate chained to the
    pinned root. Twin: another CA's intermediate, or none, is refused."""
    other = make_pki(tmp_path, "edge")
    async with _serving_crl(pki, clock), pki.client() as ca:
        body, crl = await ca.crl(issuers=[_intermediate(pki)])
        pem, _ = await ca.crl(pem=True, issuers=[_intermediate(pki)])
        with pytest.raises(BadMaterialError, match="does not verify"):
            await ca.crl(issuers=[_intermediate(other)])
        with pytest.raises(BadMaterialError, match="does not verify"):
            await ca.crl(issuers=[])
    assert x509.load_der_x509_crl(body) == crl
    assert pem.startswith(b"-----BEGIN X509 CRL-----")


async def test_cli_crl_writes_verified_der_and_pem(
    pki: PKI, clock: FakeClock, tmp_path: Path
) -> None:
    """``federatls ca crl --out`` writes the verified CRL, DER or --pem. Twin: the failures
    below write nothing."""
    inter = pki.directory / "certs" / "intermediate_ca.crt"
    async with _serving_crl(pki, clock):
        gone = (await pki.enroll("gone.cloud.internal"))[0][0]
        await _revoke(pki, gone.serial_number)
        flags = ("--ca-url", pki.url, "--root", pki.root_path, "--intermediates", inter)
        der = await federatls("ca", "crl", *flags, "--out", tmp_path / "c.crl")
        pem = await federatls("ca", "crl", *flags, "--pem", "--out", tmp_path / "c.pem")
        stdout = await federatls("ca", "crl", *flags, "--pem")
    assert (der.code, pem.code, stdout.code) == (0, 0, 0), (der, pem, stdout)
    assert der.out == f"The CRL (1 revoked certificate) has been saved in {tmp_path / 'c.crl'}.\n"
    crl = x509.load_der_x509_crl((tmp_path / "c.crl").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(gone.serial_number) is not None
    assert x509.load_pem_x509_crl((tmp_path / "c.pem").read_bytes()) == crl
    assert x509.load_pem_x509_crl(stdout.out.encode()) == crl


async def test_cli_crl_failures_are_one_line_and_write_nothing(
    pki: PKI, clock: FakeClock, tmp_path: Path
) -> None:
    """Another CA's intermediate, another CA's root, and a CA without a CRL: one line on
    stderr, exit 1, no file. Twin: test_cli_crl_writes_verified_der_and_pem."""
    other = make_pki(tmp_path, "edge")
    out = tmp_path / "c.crl"
    mine = pki.directory / "certs" / "intermediate_ca.crt"
    theirs = other.directory / "certs" / "intermediate_ca.crt"
    async with _serving_crl(pki, clock):
        base = ("ca", "crl", "--ca-url", pki.url, "--out", out)
        forged = await federatls(*base, "--root", pki.root_path, "--intermediates", theirs)
        pinned = await federatls(*base, "--root", other.root_path, "--intermediates", mine)
    assert_one_line_error(forged, "does not verify")
    assert_one_line_error(pinned, "TLS")
    assert not out.exists()
    async with serving(other, clock):
        absent = await federatls(
            "ca", "crl", "--ca-url", other.url, "--root", other.root_path, "--out", out
        )
    assert_one_line_error(absent, "404", "crl block does not enable one", "request id")
    assert not out.exists()
    assert not list(tmp_path.glob(".c.crl.*"))


# ca.json's crl block (pure) -------------------------------------------------------------------
def test_block_defaults_and_fields() -> None:
    """step-ca's names and defaults: absent is None, enabled alone means 24h, renewal at two
    thirds of it; every field read. Twin: the refusals below."""
    assert CRLConfig.from_json(None, "ca.json") is None
    on = CRLConfig.from_json({"enabled": True}, "ca.json")
    assert on == CRLConfig(enabled=True)
    assert on.cache_duration == timedelta(hours=24)
    assert on.renew_after == timedelta(hours=16)
    full = CRLConfig.from_json(
        {
            "enabled": True,
            "generateOnRevoke": True,
            "cacheDuration": "2h",
            "renewPeriod": "30m",
            "idpURL": "http://x.example/crl",
        },
        "ca.json",
    )
    assert full == CRLConfig(
        True, True, timedelta(hours=2), timedelta(minutes=30), "http://x.example/crl"
    )
    assert full.renew_after == timedelta(minutes=30)
    zero = CRLConfig.from_json({"enabled": True, "cacheDuration": "0s"}, "ca.json")
    assert zero is not None
    assert zero.cache_duration == timedelta(hours=24)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"enabled": True, "cacheDuration": "-1h"},
            "crl.cacheDuration must be greater than or equal to 0",
        ),
        (
            {"enabled": True, "renewPeriod": "-1m"},
            "crl.renewPeriod must be greater than or equal to 0",
        ),
        (
            {"enabled": True, "cacheDuration": "1h", "renewPeriod": "2h"},
            "crl.cacheDuration must be greater than or equal to crl.renewPeriod",
        ),
        ({"enabled": True, "renewPeriod": "25h"}, "greater than or equal to crl.renewPeriod"),
        ({"enabled": "yes"}, "crl.enabled must be true or false"),
        ({"enabled": True, "cacheDuration": 3600}, "crl.cacheDuration must be a duration"),
        ({"enabled": True, "idpURL": 5}, "crl.idpURL must be a string"),
        ([], "crl must be an object"),
    ],
)
def test_block_refusals(block: object, message: str) -> None:
    """Bad blocks are refused with step-ca's messages where it has one. Twin: the defaults."""
    with pytest.raises(ConfigError, match=message):
        CRLConfig.from_json(block, "ca.json")


def test_renew_period_longer_than_default_is_fine_when_disabled() -> None:
    """step-ca compares renewPeriod with the default cacheDuration only when enabled.
    Twin: the enabled row above."""
    block = CRLConfig.from_json({"enabled": False, "renewPeriod": "25h"}, "ca.json")
    assert block is not None
    assert not block.enabled


async def test_workers_serve_one_crl(pki: PKI) -> None:
    """``ca serve --workers 2`` on one SQLite file: concurrent first fetches on new
    connections (spread over both workers, which race to make the first CRL) get one and the
    same CRL, and after a revocation one same CRL that lists it. Twin: the first lacks it."""
    _enable(pki)
    async with supervised(pki, 2):
        gone = (await pki.enroll("gone.cloud.internal"))[0][0]
        first = await _fetch_many(pki, 16)
        await _revoke(pki, gone.serial_number, reason_code=5)
        after = await _fetch_many(pki, 16)
    assert len(set(first)) == 1
    assert len(set(after)) == 1
    old, new = x509.load_der_x509_crl(first[0]), x509.load_der_x509_crl(after[0])
    assert old.get_revoked_certificate_by_serial_number(gone.serial_number) is None
    assert new.get_revoked_certificate_by_serial_number(gone.serial_number) is not None
    assert _number(new) > _number(old)


async def _fetch_many(pki: PKI, count: int) -> list[bytes]:
    """GET /crl ``count`` times at once, each on a new connection; the bodies."""
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=count)
    tls = ssl.create_default_context(cadata=pki.root_path.read_text())
    async with httpx.AsyncClient(verify=tls, limits=limits, timeout=60) as http:
        answers = await asyncio.gather(*(http.get(pki.url + "/crl") for _ in range(count)))
    assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
    return [a.content for a in answers]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_crl_answer_parser_raises_only_bad_material(data: bytes) -> None:
    """Whatever a CA answers, reading it as a CRL gives a CRL or BadMaterialError. Twin:
    the real CRLs read above."""
    with contextlib.suppress(BadMaterialError):
        CRLResponse.parse(data)
    with contextlib.suppress(BadMaterialError):
        CRLResponse.parse(b"-----BEGIN X509 CRL-----\n" + data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_stored_crl_parser_raises_only_bad_material(data: bytes) -> None:
    """Whatever the store holds under ``crl``, reading it gives a StoredCRL or
    BadMaterialError. Twin: a stored CRL read back."""
    with contextlib.suppress(BadMaterialError):
        StoredCRL.from_bytes(data)
    with contextlib.suppress(BadMaterialError):
        StoredCRL.from_bytes(b'{"number": 1, "thisUpdate": "x"}\n' + data)


def test_stored_crl_round_trip() -> None:
    """A stored CRL reads back equal; a negative number is refused. Twin of the above."""
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    stored = StoredCRL(7, now, now + timedelta(hours=1), "ab", b"\x30\x00\n\x01")
    assert StoredCRL.from_bytes(stored.to_bytes()) == stored
    bad = StoredCRL(-1, now, now, "ab", b"x").to_bytes()
    with pytest.raises(BadMaterialError, match="non-negative"):
        StoredCRL.from_bytes(bad)
