"""Test helpers for SPIFFE federation: a trust domain's X.509 authority made at run time
(roots with ``spiffe://<trust domain>`` names, X509-SVIDs) and a SPIFFE bundle endpoint, an
aiohttp HTTPS server on 127.0.0.1 whose certificate, bundle and status a test changes while it
runs and which counts the fetches it answered. Keys stay in memory."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federatls._spiffe import SpiffeBundle
from federatls._sslkeys import load_cert_chain_in_memory

NOW = datetime.now(UTC)


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


@dataclass
class TrustDomain:
    """A SPIFFE trust domain's authority: a self-signed root per ``new_root`` call (the
    latest issues), each carrying ``spiffe://<name>`` as the SPIFFE specification's example."""

    name: str
    roots: list[x509.Certificate] = field(default_factory=list)
    keys: list[ec.EllipticCurvePrivateKey] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.roots:
            self.new_root()

    def new_root(self, spiffe_name: str | None = None) -> x509.Certificate:
        """A new root (the one that issues from now on); ``spiffe_name`` replaces the
        trust domain in its URI name."""
        key = ec.generate_private_key(ec.SECP256R1())
        uri = f"spiffe://{spiffe_name or self.name}"
        subject = _name(f"{self.name} root {len(self.roots) + 1}")
        root = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(hours=1))
            .not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        self.roots.append(root)
        self.keys.append(key)
        return root

    def svid(
        self, spiffe_id: str, *, dns: tuple[str, ...] = (), ca: bool = False
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """An X509-SVID for ``spiffe_id`` from the latest root (``dns`` names added; ``ca``
        makes it a CA certificate, which no X509-SVID leaf may be)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        names += [x509.DNSName(d) for d in dns]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name("bundle endpoint"))
            .issuer_name(self.roots[-1].subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(hours=1))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.keys[-1], hashes.SHA256())
        )
        return leaf, key

    def bundle(self, sequence: int | None = 1, hint: int | None = 1) -> dict[str, Any]:
        """This trust domain's SPIFFE bundle (every root so far)."""
        return SpiffeBundle(tuple(self.roots), sequence, hint).to_json()


@dataclass
class BundleEndpoint:
    """A running bundle endpoint: set ``body`` (bytes, or a JSON value) and ``status`` at any
    time, and ``present`` another certificate for new handshakes; ``fetches`` counts the
    GETs answered."""

    ctx: ssl.SSLContext
    body: Any = field(default_factory=lambda: {"keys": []})
    status: int = 200
    fetches: int = 0
    url: str = ""

    def present(self, certificate: x509.Certificate, key: Any) -> None:
        """Serve ``certificate`` (with ``key``) from the next handshake on."""
        load_cert_chain_in_memory(self.ctx, [certificate], key)

    async def _answer(self, request: web.Request) -> web.Response:
        body = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        self.fetches += 1
        return web.Response(body=body, status=self.status, content_type="application/json")

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, certificate: tuple[x509.Certificate, Any], body: Any = None
    ) -> AsyncIterator[BundleEndpoint]:
        endpoint = cls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        endpoint.present(*certificate)
        if body is not None:
            endpoint.body = body
        app = web.Application()
        app.router.add_get("/bundle", endpoint._answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=endpoint.ctx)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        endpoint.url = f"https://127.0.0.1:{port}/bundle"
        try:
            yield endpoint
        finally:
            await runner.cleanup()
