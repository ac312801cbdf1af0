"""Who is on the other end of a TLS connection: the peer's subject, names, serial, expiry, and
the root that anchored its verified chain (with its provenance: own CA or federated).

Works with what applications hold: an ``ssl.SSLObject`` or ``ssl.SSLSocket``, an asyncio
``StreamWriter`` or transport, an httpx response, an aiohttp client response or server
request. The verified chain comes from ``get_verified_chain()`` (public in Python 3.13, the
same method on the private ``_sslobj`` in 3.11 and 3.12).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from ._errors import BadMaterialError
from ._trust import TrustBundle, TrustedRoot
from ._x509 import SANs, cert_sans, common_name

__all__ = ["PeerInfo", "peer_info", "ssl_object_of"]

_ENCODING_DER = 2  # _ssl.ENCODING_DER


@dataclass(frozen=True)
class PeerInfo:
    """The verified peer of a TLS connection."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # as verified: leaf first, the anchoring root last
    anchor: TrustedRoot | None  # the root of the bundle that anchored the chain

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def common_name(self) -> str:
        return common_name(self.certificate.subject)

    @property
    def sans(self) -> SANs:
        return cert_sans(self.certificate)

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def __str__(self) -> str:
        names = ", ".join(self.sans.as_strings()) or "no SAN"
        root = str(self.anchor) if self.anchor else "an unknown root"
        return f"{self.common_name or self.subject} [{names}] anchored in {root}"


def ssl_object_of(conn: object) -> ssl.SSLObject | ssl.SSLSocket:
    """The TLS object behind a connection-like value; ``BadMaterialError`` if there is none."""
    if isinstance(conn, ssl.SSLObject | ssl.SSLSocket):
        return conn
    found = _lookup(conn)
    if found is None:
        raise BadMaterialError(
            f"cannot find a TLS connection in {type(conn).__name__}: pass an SSLObject, "
            "SSLSocket, asyncio StreamWriter or transport, httpx response or aiohttp "
            "response/request (aiohttp client responses: before the body is read)"
        )
    return found


def _lookup(conn: Any) -> ssl.SSLObject | ssl.SSLSocket | None:
    if isinstance(conn, asyncio.StreamWriter | asyncio.BaseTransport):
        obj = conn.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject | ssl.SSLSocket) else None
    extensions = getattr(conn, "extensions", None)  # httpx.Response
    if isinstance(extensions, dict) and "network_stream" in extensions:
        obj = extensions["network_stream"].get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject | ssl.SSLSocket) else None
    transport = getattr(conn, "transport", None)  # aiohttp web.Request
    if transport is None:
        connection = getattr(conn, "connection", None)  # aiohttp ClientResponse
        transport = getattr(connection, "transport", None)
    if transport is not None:
        obj = transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject | ssl.SSLSocket) else None
    return None


def _verified_chain(obj: ssl.SSLObject | ssl.SSLSocket) -> list[x509.Certificate]:
    getter = getattr(obj, "get_verified_chain", None)  # Python 3.13 and newer
    if getter is None:
        getter = obj._sslobj.get_verified_chain  # type: ignore[union-attr]  # 3.11, 3.12
    raw = getter() or []
    return [x509.load_der_x509_certificate(c.public_bytes(_ENCODING_DER)) for c in raw]


def peer_info(conn: object, trust: TrustBundle) -> PeerInfo:
    """The verified peer of ``conn``, its anchor looked up in ``trust``.

    Raises ``BadMaterialError`` when the connection has no verified peer certificate (the
    peer sent none, or the context does not verify peers).
    """
    obj = ssl_object_of(conn)
    if obj.getpeercert(binary_form=True) is None:
        raise BadMaterialError("the TLS peer presented no certificate")
    chain = _verified_chain(obj)
    if not chain:
        raise BadMaterialError("the TLS peer's certificate was not verified on this connection")
    return PeerInfo(certificate=chain[0], chain=tuple(chain), anchor=trust.anchor_of(chain[-1]))
