"""The CA's HTTPS contexts: step-ca's TLS settings (``tls`` in ca.json), the CA's own server
certificate, and client certificates verified against the CA's *own* roots only (federated
roots never authenticate a client to the CA, as in step-ca). The listener takes the newest
context for each new handshake, so a renewed server certificate or a reloaded root list never
needs a restart.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .._errors import ConfigError
from .._sslkeys import tls_context

__all__ = ["build_server_context"]

# Go cipher-suite names (ca.json) -> OpenSSL names; they apply to TLS 1.2 (TLS 1.3 suites are
# not configurable in Go either).
_CIPHERS = {
    f"TLS_ECDHE_{auth}_WITH_{go}": f"ECDHE-{auth}-{ossl}"
    for auth in ("ECDSA", "RSA")
    for go, ossl in (
        ("AES_128_GCM_SHA256", "AES128-GCM-SHA256"),
        ("AES_256_GCM_SHA384", "AES256-GCM-SHA384"),
        ("CHACHA20_POLY1305_SHA256", "CHACHA20-POLY1305"),
        ("CHACHA20_POLY1305", "CHACHA20-POLY1305"),
        ("AES_128_CBC_SHA256", "AES128-SHA256"),
        ("AES_128_CBC_SHA", "AES128-SHA"),
        ("AES_256_CBC_SHA", "AES256-SHA"),
    )
}
_VERSIONS = {1.2: ssl.TLSVersion.TLSv1_2, 1.3: ssl.TLSVersion.TLSv1_3}


def openssl_ciphers(names: Sequence[str]) -> str:
    """OpenSSL cipher string for Go cipher-suite names; ``ConfigError`` for unknown ones."""
    out = []
    for name in names:
        if name not in _CIPHERS:
            raise ConfigError(f"tls.cipherSuites: {name!r} is not a supported cipher suite")
        out.append(_CIPHERS[name])
    return ":".join(dict.fromkeys(out))


def build_server_context(
    *,
    chain: Sequence[x509.Certificate],
    key: PrivateKeyTypes,
    client_cas: Sequence[x509.Certificate],
    tls_options: Mapping[str, Any],
) -> ssl.SSLContext:
    """A server context: the CA's certificate, optional client certificates checked against
    ``client_cas``, TLS 1.2 at least (1.0/1.1 in ca.json are raised to 1.2), no session
    tickets (a resumed session would skip the client-certificate check)."""
    ctx = tls_context(ssl.PROTOCOL_TLS_SERVER, roots=client_cas, chain=chain, key=key)
    ctx.minimum_version = _VERSIONS.get(
        float(tls_options.get("minVersion", 1.2)), ssl.TLSVersion.TLSv1_2
    )
    ctx.maximum_version = _VERSIONS.get(
        float(tls_options.get("maxVersion", 1.3)), ssl.TLSVersion.TLSv1_3
    )
    ctx.set_ciphers(openssl_ciphers(tls_options.get("cipherSuites") or []))
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
