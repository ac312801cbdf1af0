"""Who is on the other end of a TLS connection: the peer's subject, names, serial, expiry, and
the root that anchored its verified chain (with its provenance: own CA or federated).

Works with what applications hold: an ``ssl.SSLObject`` or ``ssl.SSLSocket``, an asyncio
``StreamWriter`` or transport, an httpx response, an aiohttp client response or server
request. The verified chain comes from ``get_verified_chain()`` (public in Python 3.13, the
same method on the private ``_sslobj`` in 3.11 and 3.12). Where a library shows only the
certificates the peer presented (gRPC's auth context), ``peer_from_chain`` rebuilds the chain
from them up to a root of the bundle trusted now.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from cryptography import x509

from ._errors import BadMaterialError
from ._trust import TrustBundle, TrustedRoot
from ._x509 import CertificateFacts, fingerprint, issued_by, may_sign

__all__ = ["PeerInfo", "TLSObject", "peer_from_chain", "peer_info", "ssl_object_of"]

_ENCODING_DER = 2  # _ssl.ENCODING_DER


@dataclass(frozen=True)
class PeerInfo(CertificateFacts):
    """The verified peer of a TLS connection."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # as verified: leaf first, the anchoring root last
    anchor: TrustedRoot | None  # the root of the bundle that anchored the chain

    def __str__(self) -> str:
        names = ", ".join(self.sans.as_strings()) or "no SAN"
        root = str(self.anchor) if self.anchor else "an unknown root"
        return f"{self.common_name or self.subject} [{names}] anchored in {root}"


class TLSObject(Protocol):
    """What federatls needs of a TLS connection object: ``ssl.SSLObject``, ``ssl.SSLSocket``,
    or the private ``_ssl._SSLSocket`` that httpcore's sync backend hands out."""

    def getpeercert(self, binary_form: bool = ..., /) -> Any: ...


def _is_tls(obj: object) -> bool:
    return isinstance(obj, ssl.SSLObject | ssl.SSLSocket) or type(obj).__name__ == "_SSLSocket"


def ssl_object_of(conn: object) -> TLSObject:
    """The TLS object behind a connection-like value; ``BadMaterialError`` if there is none."""
    found = conn if _is_tls(conn) else _lookup(conn)
    if found is None or not _is_tls(found):
        raise BadMaterialError(
            f"cannot find a TLS connection in {type(conn).__name__}: pass an SSLObject, "
            "SSLSocket, asyncio StreamWriter or transport, httpx response or aiohttp "
            "response/request"
        )
    return cast(TLSObject, found)


def _lookup(conn: Any) -> object | None:
    if isinstance(conn, asyncio.StreamWriter | asyncio.BaseTransport):
        found: object = conn.get_extra_info("ssl_object")
        return found
    extensions = getattr(conn, "extensions", None)  # httpx.Response
    if isinstance(extensions, dict) and "network_stream" in extensions:
        found = extensions["network_stream"].get_extra_info("ssl_object")
        return found
    transport = getattr(conn, "transport", None)  # aiohttp web.Request
    if transport is None:  # aiohttp ClientResponse, its connection held or already released
        connection = getattr(conn, "connection", None) or getattr(conn, "_protocol", None)
        transport = getattr(connection, "transport", None)
    if transport is not None:
        found = transport.get_extra_info("ssl_object")
        return found
    return None


def _verified_chain(obj: TLSObject) -> list[x509.Certificate]:
    getter = getattr(obj, "get_verified_chain", None)  # SSLObject in 3.13+, or _ssl's own
    if getter is None:
        getter = obj._sslobj.get_verified_chain  # type: ignore[attr-defined]  # 3.11, 3.12
    out = []
    for item in getter() or []:  # DER bytes (ssl, 3.13+) or _ssl.Certificate objects
        der = item if isinstance(item, bytes) else item.public_bytes(_ENCODING_DER)
        out.append(x509.load_der_x509_certificate(der))
    return out


def peer_info(conn: object, trust: TrustBundle) -> PeerInfo:
    """The verified peer of ``conn``, its anchor looked up in ``trust``.

    Raises ``BadMaterialError`` when the connection has no verified peer certificate (the
    peer sent none, or the context does not verify peers).
    """
    obj = ssl_object_of(conn)
    if obj.getpeercert(True) is None:
        raise BadMaterialError("the TLS peer presented no certificate")
    chain = _verified_chain(obj)
    if not chain:
        raise BadMaterialError("the TLS peer's certificate was not verified on this connection")
    return PeerInfo(certificate=chain[0], chain=tuple(chain), anchor=trust.anchor_of(chain[-1]))


def peer_from_chain(presented: Sequence[x509.Certificate], trust: TrustBundle) -> PeerInfo:
    """The peer whose leaf is ``presented[0]``, its chain rebuilt from the other certificates
    it presented (in any order; duplicates and extras ignored) up to a root of ``trust``.

    For libraries that verified the handshake themselves and show only what the peer sent:
    the chain is walked again here, so a peer anchored in a root since dropped from ``trust``
    is refused. Signatures and CA flags (basicConstraints, keyUsage) are checked link by
    link; validity periods are not (the handshake checked them). ``BadMaterialError`` when
    nothing was presented or no path reaches a root of ``trust``. At most a few signature
    checks per certificate presented are made, whatever the peer sent."""
    if not presented:
        raise BadMaterialError("the TLS peer presented no certificate")
    leaf = presented[0]
    pool = {fingerprint(c): c for c in presented[1:]}
    pool.pop(fingerprint(leaf), None)
    chain, link = [leaf], leaf
    budget = 2 * len(pool) + 4  # signature checks against presented certificates
    while True:
        anchor = trust.anchor_of(link)
        if anchor is not None:
            if anchor.fingerprint != fingerprint(link):
                chain.append(anchor.certificate)
            return PeerInfo(certificate=leaf, chain=tuple(chain), anchor=anchor)
        parent = None
        for fp, cert in pool.items():
            if cert.subject != link.issuer or not may_sign(cert):
                continue
            budget -= 1
            if budget < 0:
                break
            if issued_by(link, cert):
                parent = pool.pop(fp)
                break
        if parent is None:
            raise BadMaterialError(
                f"the TLS peer's certificate {leaf.subject.rfc4514_string()!r} does not chain "
                f"to a root trusted now (stuck at issuer {link.issuer.rfc4514_string()!r})"
            )
        chain.append(parent)
        link = parent
