"""``ssl.SSLContext``s for workloads: a server or client context holding the workload's
certificate and in-memory key and trusting a bundle of roots. Safe defaults only: TLS 1.2 or
newer, forward-secret AEAD cipher suites, hostname checks on clients, client certificates
required on servers, no TLS session tickets (a resumed session would skip the certificate
check against today's roots). Real ``ssl.SSLContext`` objects, nothing faked.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import TypeVar

from cryptography import x509

from ._keys import PrivateKey
from ._sslkeys import load_cert_chain_in_memory
from ._trust import TrustBundle

__all__ = ["new_client_context", "new_server_context"]

# TLS 1.2 suites (TLS 1.3 has only AEAD suites): ECDHE key exchange, AEAD ciphers.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


Ctx = TypeVar("Ctx", bound=ssl.SSLContext)


def _base(
    protocol: int,
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    trust: TrustBundle,
    cls: type[Ctx],
) -> Ctx:
    if not trust.roots:
        raise ValueError("a context needs at least one trusted root")
    ctx = cls(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    load_cert_chain_in_memory(ctx, chain, key)
    ctx.load_verify_locations(cadata=trust.pem)
    return ctx


def new_server_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    trust: TrustBundle,
    *,
    require_client_certificate: bool = True,
    cls: type[Ctx] = ssl.SSLContext,  # type: ignore[assignment]
) -> Ctx:
    """A server context presenting ``chain`` and verifying client certificates against
    ``trust`` (required unless ``require_client_certificate`` is False: then optional, but
    still verified when sent). ``cls`` may be a subclass of ``ssl.SSLContext``."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, chain, key, trust, cls)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def new_client_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    trust: TrustBundle,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client context presenting ``chain`` and verifying servers against ``trust``; the
    server's name (DNS or IP) is checked unless ``check_hostname`` is False."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, chain, key, trust, ssl.SSLContext)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
