"""The token and CSR cases of docs/protocol.md ("Tokens", "Sign"), against the federatls CA and
the real step-ca.

Every case runs against both CAs with the same PKI and the same client code, so a passing
row shows the federatls CA answers exactly as step-ca does (status and, for 400/403, the
message). The federatls CA must also log the specific reason of each refusal. The federatls CA
follows today's step-ca where it differs from the 0.19 binary: such a row carries 0.19's
message as ``message_019`` and says why in ``differs_in_019``.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federatls._jwk import ProvisionerKey
from federatls._keys import build_csr, new_private_key
from federatls._token import sign_audience

from harness import PKI

pytestmark = pytest.mark.anyio

UNAUTHORIZED = (
    "The request lacked necessary authorization to be completed. "
    "Please see the certificate authority logs for more info."
)


def _csr_pem(subject: str, sans: list[str]) -> str:
    csr = build_csr(new_private_key(), subject, sans)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Case:
    name: str
    body: Callable[[PKI], dict[str, object]]
    status: int
    message: str  # exact body message (401 is always the generic one)
    log: str  # what the federatls CA's log must say
    message_019: str | None = None  # step-ca 0.19's message, where today's differs
    differs_in_019: str = ""  # why: the upstream change


def _good(p: PKI) -> dict[str, object]:
    return {
        "csr": _csr_pem("svc.cloud.internal", ["svc.cloud.internal"]),
        "ott": p.token("svc.cloud.internal"),
    }


def _forged(**claims: object) -> Callable[[PKI], dict[str, object]]:
    def body(p: PKI) -> dict[str, object]:
        token = p.forge(p.claims("svc.cloud.internal", **claims))
        return {"csr": _csr_pem("svc.cloud.internal", []), "ott": token}

    return body


def _now() -> int:
    return int(datetime.now(UTC).timestamp())


def _other_key(p: PKI) -> dict[str, object]:
    token = p.forge(p.claims("svc.cloud.internal"), key=ProvisionerKey.generate())
    return {"csr": _csr_pem("svc.cloud.internal", []), "ott": token}


def _foreign_kid(p: PKI) -> dict[str, object]:
    other = ProvisionerKey.generate()
    token = p.forge(p.claims("svc.cloud.internal"), key=other, kid=other.kid)
    return {"csr": _csr_pem("svc.cloud.internal", []), "ott": token}


CASES = [
    Case(
        "exp in the past (beyond the one-minute leeway)",
        _forged(iat=None, nbf=None, exp=_now() - 90),
        401,
        UNAUTHORIZED,
        "token is expired",
    ),
    Case(
        "iat before the CA started",
        _forged(iat=_now() - 3600, nbf=None),
        401,
        UNAUTHORIZED,
        "token issued before the bootstrap of certificate authority",
    ),
    Case(
        "wrong aud",
        _forged(aud="https://wrong.example/1.0/sign"),
        401,
        UNAUTHORIZED,
        "provisioner not found or invalid audience (https://wrong.example/1.0/sign)",
    ),
    Case(
        "wrong iss",
        _forged(iss="nobody"),
        401,
        UNAUTHORIZED,
        "provisioner not found or invalid audience",
    ),
    Case(
        "another CA's kid",
        _foreign_kid,
        401,
        UNAUTHORIZED,
        "provisioner not found or invalid audience",
    ),
    Case(
        "signed with another key, right kid",
        _other_key,
        401,
        UNAUTHORIZED,
        "signature does not verify",
    ),
    Case(
        "ott not a JWT",
        lambda p: {"csr": _csr_pem("svc.cloud.internal", []), "ott": "not-a-jwt"},
        401,
        UNAUTHORIZED,
        "three dot-separated parts",
    ),
    Case(
        "CSR SAN not in the token",
        lambda p: {
            "csr": _csr_pem("svc.cloud.internal", ["other.cloud.internal"]),
            "ott": p.token("svc.cloud.internal"),
        },
        403,
        "The request was forbidden by the certificate authority: certificate request does "
        "not contain the valid DNS names - got [other.cloud.internal], want "
        "[svc.cloud.internal].",
        "does not contain the valid DNS names",
    ),
    Case(
        "CSR subset of the token's SANs",
        lambda p: {
            "csr": _csr_pem("svc.cloud.internal", ["svc.cloud.internal"]),
            "ott": p.token("svc.cloud.internal", sans=["svc.cloud.internal", "api.cloud.internal"]),
        },
        403,
        "The request was forbidden by the certificate authority: certificate request does "
        "not contain the valid DNS names - got [svc.cloud.internal], want "
        "[svc.cloud.internal api.cloud.internal].",
        "does not contain the valid DNS names",
    ),
    Case(
        "CSR CN other than sub",
        lambda p: {"csr": _csr_pem("other.name", []), "ott": p.token("svc.cloud.internal")},
        403,
        "The request was forbidden by the certificate authority: certificate request does "
        "not contain the valid common name - got other.name, want "
        "[svc.cloud.internal svc.cloud.internal].",
        "does not contain the valid common name",
        message_019="The request was forbidden by the certificate authority: certificate "
        "request does not contain the valid common name - got other.name, want "
        "svc.cloud.internal.",
        differs_in_019="step-ca 0.25.1 (PR #1609) lets the CN be sub or any of the token's "
        "sans, and names them all: [sub, *sans]",
    ),
    Case(
        "notAfter 48h",
        lambda p: {**_good(p), "notAfter": "48h"},
        403,
        "The request was forbidden by the certificate authority: requested duration of 48h1m0s "
        "is more than the authorized maximum certificate duration of 24h1m0s.",
        "more than the authorized maximum",
    ),
    Case(
        "notAfter 1m (below the 5m minimum)",
        lambda p: {**_good(p), "notAfter": "1m"},
        403,
        "The request was forbidden by the certificate authority: requested duration of 2m0s "
        "is less than the authorized minimum certificate duration of 5m0s.",
        "less than the authorized minimum",
    ),
    Case(
        "no csr",
        lambda p: {"ott": p.token("svc.cloud.internal")},
        400,
        "The request could not be completed: missing csr.",
        "missing csr",
    ),
    Case(
        "no ott",
        lambda p: {"csr": _csr_pem("svc.cloud.internal", [])},
        400,
        "The request could not be completed: missing ott.",
        "missing ott",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_refusals_match_step_ca(
    any_ca: str, pki: PKI, case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    """Each defective request gets step-ca's status and body, and the reason is logged."""
    caplog.set_level(logging.WARNING, "federatls.ca")
    async with httpx.AsyncClient(verify=_verify(pki)) as http:
        response = await http.post(pki.url + "/1.0/sign", json=case.body(pki))
    message = case.message
    if any_ca == "step-ca" and case.message_019 is not None:
        assert case.differs_in_019  # a row that differs says why
        message = case.message_019
    assert response.status_code == case.status, response.text
    assert response.json() == {"status": case.status, "message": message}
    if any_ca == "federatls":
        assert case.log in caplog.text


async def test_good_token_signs_on_both(any_ca: str, pki: PKI) -> None:
    """The twin of every refusal above: a good token and CSR get 201 and a step-shaped cert."""
    async with httpx.AsyncClient(verify=_verify(pki)) as http:
        response = await http.post(pki.url + "/1.0/sign", json=_good(pki))
        assert response.status_code == 201, response.text
        body = response.json()
        assert set(body) == {"crt", "ca", "certChain", "tlsOptions"}
        leaf = x509.load_pem_x509_certificate(body["crt"].encode())
        assert body["certChain"][0] == body["crt"]
        assert body["certChain"][1] == body["ca"]
        assert leaf.subject.rfc4514_string() == "CN=svc.cloud.internal"
        span = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert span.total_seconds() == pytest.approx(24 * 3600 + 60, abs=2)
        # the replay of the same token is refused
        again = await http.post(pki.url + "/1.0/sign", json=body_of(response, pki))
        assert again.status_code == 401


def body_of(response: httpx.Response, pki: PKI) -> dict[str, object]:
    """The request that produced ``response``."""
    body: dict[str, object] = json.loads(response.request.content)
    return body


async def test_expired_token_within_leeway_is_accepted(any_ca: str, pki: PKI) -> None:
    """exp 30 s in the past is inside step-ca's one-minute leeway: accepted by both CAs."""
    now = _now()
    token = pki.forge(pki.claims("svc.cloud.internal", iat=now, nbf=now - 300, exp=now - 30))
    async with httpx.AsyncClient(verify=_verify(pki)) as http:
        response = await http.post(
            pki.url + "/1.0/sign", json={"csr": _csr_pem("svc.cloud.internal", []), "ott": token}
        )
    assert response.status_code == 201, response.text


async def test_port_is_ignored_in_audience(any_ca: str, pki: PKI) -> None:
    """Both CAs strip ports before comparing audiences (proxies may sit in front)."""
    aud = sign_audience("https://127.0.0.1:1")
    token = pki.forge(pki.claims("svc.cloud.internal", aud=aud))
    async with httpx.AsyncClient(verify=_verify(pki)) as http:
        response = await http.post(
            pki.url + "/sign", json={"csr": _csr_pem("svc.cloud.internal", []), "ott": token}
        )
    assert response.status_code == 201, response.text


def _verify(pki: PKI) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pki.root_path.read_text())
