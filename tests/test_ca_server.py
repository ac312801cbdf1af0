"""The federatls CA's HTTPS surface: routes under / and /1.0/, step-ca's status codes and
bodies, limits, its own server certificate, reloads and signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from federatls._jwk import ProvisionerKey
from federatls._x509 import fingerprint, load_pem_certificates
from federatls.ca import CAServer
from federatls.ca._issuer import SERVER_COMMON_NAME
from federatls.ca._server import server_renewal_due

from harness import PKI, make_pki, serving, start_serving, stepca_process

pytestmark = pytest.mark.anyio


def _http(pki: PKI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=pki.url, verify=ssl.create_default_context(cadata=pki.root_path.read_text())
    )


@pytest.mark.parametrize("prefix", ["", "/1.0"])
async def test_read_routes_answer_like_step_ca(ca: CAServer, pki: PKI, prefix: str) -> None:
    """Every read route answers under both prefixes, with step-ca's status codes."""
    async with _http(pki) as http:
        health = await http.get(prefix + "/health")
        version = await http.get(prefix + "/version")
        roots = await http.get(prefix + "/roots")
        federation = await http.get(prefix + "/federation")
        pem = await http.get(prefix + "/roots.pem")
        root = await http.get(f"{prefix}/root/{pki.fingerprint}")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert version.status_code == 200
    assert version.json()["version"].startswith("federatls/")
    assert "requireClientAuthentication" not in version.json()
    assert roots.status_code == 201
    assert federation.status_code == 201
    assert [fingerprint(c) for c in load_pem_certificates("".join(roots.json()["crts"]))] == [
        pki.fingerprint
    ]
    assert pem.status_code == 200
    assert pem.headers["content-type"] == "application/x-pem-file"  # step-ca's, no charset
    assert load_pem_certificates(pem.text) == [pki.root]
    assert root.status_code == 200
    assert fingerprint(x509.load_pem_x509_certificate(root.json()["ca"].encode())) == (
        pki.fingerprint
    )


async def test_root_lookup_normalises_and_404s(ca: CAServer, pki: PKI) -> None:
    """/root/{sha} accepts upper case and dashes, and 404s with step-ca 0.30's body (naming
    the fingerprint) for unknown ones."""
    odd = "-".join([pki.fingerprint.upper()[:32], pki.fingerprint.upper()[32:]])
    async with _http(pki) as http:
        found = await http.get(f"/root/{odd}")
        missing = await http.get("/root/" + "0" * 64)
    assert found.status_code == 200
    assert missing.status_code == 404
    assert missing.json() == {
        "status": 404,
        "message": f'root certificate with fingerprint "{"0" * 64}" was not found',
    }


async def test_federation_lists_own_and_federated_roots(pki: PKI, tmp_path: Path) -> None:
    """/federation is own roots + federatedRoots; /roots stays own roots only."""
    other = make_pki(tmp_path, "kubernetes")
    pki.federate(other)
    async with serving(pki), _http(pki) as http:
        fed = (await http.get("/federation")).json()["crts"]
        own = (await http.get("/roots")).json()["crts"]
        federated_root = await http.get(f"/root/{other.fingerprint}")
    assert {fingerprint(c) for c in load_pem_certificates("".join(fed))} == {
        pki.fingerprint,
        other.fingerprint,
    }
    assert len(own) == 1
    assert federated_root.status_code == 200


async def test_unknown_path_and_method_get_json_errors(ca: CAServer, pki: PKI) -> None:
    """Unknown paths are 404 and wrong methods 405, both with a step-style JSON body."""
    async with _http(pki) as http:
        missing = await http.get("/nope")
        wrong = await http.get("/sign")
    assert missing.status_code == 404
    assert missing.json()["status"] == 404
    assert wrong.status_code == 405
    assert set(wrong.json()) == {"status", "message"}


async def test_oversized_body_is_413_and_stores_nothing(ca: CAServer, pki: PKI) -> None:
    """A body over 64 KiB is refused with 413 before it is parsed."""
    async with _http(pki) as http:
        response = await http.post("/sign", content=b"{" + b" " * (70 * 1024) + b"}")
    assert response.status_code == 413
    assert response.json()["status"] == 413
    assert ca.authority.store.counts() == {"used_tokens": 0, "certificates": 0, "revocations": 0}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"csr": 5, "ott": "x"}',
        b'{"csr": "-----BEGIN CERTIFICATE REQUEST-----\\nAAAA\\n'
        b'-----END CERTIFICATE REQUEST-----\\n", "ott": "x"}',
    ],
)
async def test_malformed_sign_bodies_are_400(ca: CAServer, pki: PKI, body: bytes) -> None:
    """Malformed JSON and bad PEM are step-ca's 400 'error reading request body'."""
    async with _http(pki) as http:
        response = await http.post("/1.0/sign", content=body)
    assert response.status_code == 400
    assert response.json() == {
        "status": 400,
        "message": "The request could not be completed: error reading request body.",
    }


async def test_provisioners_are_paginated(pki: PKI) -> None:
    """/provisioners pages with limit and nextCursor, and serves each encrypted key by kid."""
    extra = [ProvisionerKey.generate() for _ in range(2)]

    def add(d: dict[str, object]) -> None:
        provs = d["authority"]["provisioners"]  # type: ignore[index]
        for i, key in enumerate(extra):
            provs.append(
                {
                    "type": "JWK",
                    "name": f"extra{i}",
                    "key": key.public.as_dict(),
                    "encryptedKey": key.encrypt(b"pw"),
                }
            )

    pki.edit(add)
    async with serving(pki), _http(pki) as http:
        names, cursor = [], ""
        for _ in range(5):
            page = (await http.get(f"/provisioners?limit=1&cursor={cursor}")).json()
            assert len(page["provisioners"]) == 1
            names.append(page["provisioners"][0]["name"])
            cursor = page["nextCursor"]
            if not cursor:
                break
        everything = (await http.get("/provisioners")).json()
        bad_limit = await http.get("/provisioners?limit=abc")
        key = await http.get(f"/provisioners/{extra[1].kid}/encrypted-key")
        no_key = await http.get("/provisioners/nope/encrypted-key")
    assert names == ["admin", "extra0", "extra1"]
    assert everything["nextCursor"] == ""
    assert len(everything["provisioners"]) == 3
    assert bad_limit.status_code == 400
    assert bad_limit.json()["message"] == (
        "The request could not be completed: limit 'abc' is not an integer."
    )
    assert ProvisionerKey.decrypt(key.json()["key"], b"pw").kid == extra[1].kid
    assert no_key.status_code == 404


async def test_server_certificate_is_step_shaped(ca: CAServer, pki: PKI) -> None:
    """The CA serves leaf + intermediate, SANs = dnsNames, 24 h, from its own intermediate."""
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", ca.address[1], ssl=ssl.create_default_context(cadata=pki.root_path.read_text())
    )
    sslobj = writer.get_extra_info("ssl_object")
    chain = sslobj._sslobj.get_unverified_chain()
    writer.close()
    await writer.wait_closed()
    leaf = x509.load_pem_x509_certificate(chain[0].public_bytes().encode())
    assert len(chain) == 2
    assert leaf.subject.rfc4514_string() == f"CN={SERVER_COMMON_NAME}"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    span = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert span.total_seconds() == 24 * 3600 + 60
    due = server_renewal_due(leaf)
    assert (due - leaf.not_valid_before_utc) == span * 2 / 3


async def test_server_certificate_renews_without_restart(ca: CAServer, pki: PKI) -> None:
    """After a renewal new handshakes get the new certificate; an open connection lives on."""
    context = ssl.create_default_context(cadata=pki.root_path.read_text())
    async with httpx.AsyncClient(base_url=pki.url, verify=context) as keepalive:
        assert (await keepalive.get("/health")).status_code == 200
        first = ca.server_certificate
        renewed = ca.renew_server_certificate()
        assert first is not None
        assert renewed.serial_number != first.serial_number
        assert (await keepalive.get("/health")).status_code == 200  # same connection
    _reader, writer = await asyncio.open_connection("127.0.0.1", ca.address[1], ssl=context)
    served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    assert x509.load_der_x509_certificate(served).serial_number == renewed.serial_number


async def test_reload_picks_up_federation(ca: CAServer, pki: PKI, tmp_path: Path) -> None:
    """reload() (what SIGHUP does) re-reads federatedRoots; a broken file keeps the old config."""
    other = make_pki(tmp_path, "kubernetes")
    async with _http(pki) as http:
        before = len((await http.get("/federation")).json()["crts"])
        pki.federate(other)
        assert ca.reload()
        after = len((await http.get("/federation")).json()["crts"])
        good = pki.config.read_text()
        pki.config.write_text("{ not json")
        assert not ca.reload()
        still = len((await http.get("/federation")).json()["crts"])
        pki.config.write_text(good)
    assert (before, after, still) == (1, 2, 2)


async def _serve_process(pki: PKI) -> tuple[asyncio.subprocess.Process, str]:
    proc, line = await start_serving(pki)
    assert line.startswith("Serving HTTPS on "), line
    return proc, line.split()[3]


async def test_sighup_reloads_and_sigterm_stops(pki: PKI, tmp_path: Path) -> None:
    """`federatls ca serve` reloads ca.json on SIGHUP and exits 0 on SIGTERM."""
    other = make_pki(tmp_path, "kubernetes")
    proc, url = await _serve_process(pki)
    pki.url = url
    try:
        async with _http(pki) as http:
            assert len((await http.get("/federation")).json()["crts"]) == 1
            pki.federate(other)
            proc.send_signal(signal.SIGHUP)
            for _ in range(100):
                if len((await http.get("/federation")).json()["crts"]) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len((await http.get("/federation")).json()["crts"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert proc.stderr is not None
    log = (await proc.stderr.read()).decode()
    assert code == 0
    assert "configuration reloaded" in log
    assert "stopping" in log


async def test_serve_with_wrong_password_fails_in_one_line(pki: PKI, tmp_path: Path) -> None:
    """Twin: a wrong password stops `ca serve` at once, one line on stderr, exit 1."""
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "federatls",
        "ca",
        "serve",
        str(pki.config),
        "--password-file",
        str(wrong),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("federatls: error: cannot decrypt intermediate key")
    assert out == b""


async def test_ca_json_errors_name_the_field(pki: PKI) -> None:
    """A ca.json without dnsNames fails to start with an error naming the field."""
    from federatls import ConfigError

    pki.edit(lambda d: d.pop("dnsNames"))
    with pytest.raises(ConfigError, match="dnsNames"):
        async with serving(pki):
            pass
    json.loads(pki.config.read_text())  # the file itself is left as it was


@pytest.mark.parametrize("backend", ["federatls", "step-ca"])
async def test_several_roots_are_served(
    backend: str, pki: PKI, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """ca.json may list several roots (rotation): /roots and /federation carry them all, on
    the federatls CA as on step-ca, and /root/{sha} finds each."""
    other = make_pki(tmp_path, "next")
    pki.edit(lambda d: d.__setitem__("root", [str(pki.root_path), str(other.root_path)]))
    async with contextlib.AsyncExitStack() as stack:
        if backend == "federatls":
            await stack.enter_async_context(serving(pki))
        else:
            stack.enter_context(stepca_process(request.getfixturevalue("stepca_bin"), pki))
        async with _http(pki) as http:
            roots = await http.get("/roots")
            federation = await http.get("/federation")
            second = await http.get(f"/root/{other.fingerprint}")
    want = {pki.fingerprint, other.fingerprint}
    assert roots.status_code == 201
    assert _fingerprints(roots.json()["crts"]) == want
    assert _fingerprints(federation.json()["crts"]) == want
    assert second.status_code == 200


def _fingerprints(pems: list[str]) -> set[str]:
    return {fingerprint(c) for c in load_pem_certificates("".join(pems))}
