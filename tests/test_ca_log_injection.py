"""Log injection against the CA (`federatls ca serve`, a real process on 127.0.0.1): values a
client chooses (a validly signed token's ``aud`` and ``sub``, a CSR's common name, the request
path and query, with newlines decoded from ``%0a``) reach the log quoted, so that one request
can never write a line of its own into the CA's log.
"""

from __future__ import annotations

import contextlib
import signal
import ssl
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import PKI, free_port, start_serving

pytestmark = pytest.mark.anyio

SUBJECT = "svc.cloud.internal"
FORGED = "2026-12-04 22:00:00,000 WARNING federatls.ca: FORGED"


def _forged(marker: str) -> str:
    """A newline, then what a forged log line would say, naming ``marker``."""
    return f"\n{FORGED}-{marker}"


def _csr(common_name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class _Log:
    """What a CA process wrote to its log (stderr), once it has stopped."""

    text = ""


@contextlib.asynccontextmanager
async def _serving(pki: PKI) -> AsyncIterator[_Log]:
    """``federatls ca serve`` on a free port of its own (``pki.url`` names it), stopped with
    SIGTERM on the way out; the log is then in the yielded ``_Log``."""
    port = free_port()
    pki.edit(lambda d: d.__setitem__("address", f"127.0.0.1:{port}"))
    pki.url = f"https://127.0.0.1:{port}"
    proc, _ = await start_serving(pki)
    log = _Log()
    try:
        yield log
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            _, err = await proc.communicate()
        log.text = err.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


def _client(pki: PKI) -> httpx.AsyncClient:
    """An HTTPS client of the CA, trusting its root."""
    ctx = ssl.create_default_context(cadata=pki.root_path.read_text())
    return httpx.AsyncClient(base_url=pki.url, verify=ctx, timeout=30)


async def _attack(pki: PKI) -> dict[str, int]:
    """Send each injecting request; the status each got, by marker."""
    token_for = {
        "aud": pki.forge(pki.claims(SUBJECT, aud=pki.url + "/1.0/sign" + _forged("aud"))),
        "sub": pki.forge(pki.claims(SUBJECT + _forged("sub"))),
        "cn": pki.forge(pki.claims(SUBJECT)),
    }
    csr_for = {"aud": _csr(SUBJECT), "sub": _csr(SUBJECT), "cn": _csr("svc" + _forged("cn"))}
    got: dict[str, int] = {}
    async with _client(pki) as http:
        for marker, token in token_for.items():
            answer = await http.post("/1.0/sign", json={"csr": csr_for[marker], "ott": token})
            got[marker] = answer.status_code
        nl = "%0a" + FORGED.replace(" ", "%20")
        for marker, path in {
            "root": f"/root/abc{nl}-root",
            "route": f"/nothing{nl}-route",
            "kid": f"/provisioners/kid{nl}-kid/encrypted-key",
            "limit": f"/provisioners?limit=1{nl}-limit",
        }.items():
            got[marker] = (await http.get(path)).status_code
    return got


async def test_attacker_values_cannot_forge_a_ca_log_line(pki: PKI) -> None:
    """Injected newlines in a signed token's aud and sub, a CSR's CN, a path and a query:
    each request is refused and logged, and no line of the CA's log starts with the forged
    text."""
    async with _serving(pki) as ca_log:
        statuses = await _attack(pki)
    log = ca_log.text
    assert statuses == {
        "aud": 401,
        "sub": 403,
        "cn": 403,
        "root": 404,
        "route": 404,
        "kid": 404,
        "limit": 400,
    }, log
    for marker in statuses:
        assert f"FORGED-{marker}" in log, (marker, log)  # the value did reach the log
    forged = [line for line in log.splitlines() if line.lstrip().startswith(FORGED)]
    assert forged == [], log


async def test_ordinary_refusals_are_logged_on_one_line(pki: PKI) -> None:
    """Twin: a plain refusal (an unknown fingerprint) is logged as one line naming the path
    and the reason."""
    async with _serving(pki) as ca_log, _client(pki) as http:
        assert (await http.get("/root/abc")).status_code == 404
    lines = [line for line in ca_log.text.splitlines() if "refused" in line]
    assert len(lines) == 1, lines
    assert "GET /root/abc" in lines[0]
    assert "404" in lines[0]
    assert "certificate with fingerprint abc was not found" in lines[0]


async def test_long_attacker_values_are_clipped_in_the_log(pki: PKI) -> None:
    """A 6,000-character path and a token whose ``aud`` is 11,000 characters long are each
    refused with one log line of at most ~1,000 characters, which still names the start of
    the value; twin: the short refusal above is logged whole."""
    async with _serving(pki) as ca_log, _client(pki) as http:
        token = pki.forge(pki.claims(SUBJECT, aud="https://aud.example/" + "a" * 11000))
        assert (await http.get("/root/" + "b" * 6000)).status_code == 404
        answer = await http.post("/1.0/sign", json={"csr": _csr(SUBJECT), "ott": token})
        assert answer.status_code == 401
    lines = [line for line in ca_log.text.splitlines() if "refused" in line]
    assert len(lines) == 2, lines
    assert "GET /root/bbbb" in lines[0]
    assert "https://aud.example/aaaa" in lines[1]
    assert all(len(line) <= 1200 for line in lines), [len(line) for line in lines]
