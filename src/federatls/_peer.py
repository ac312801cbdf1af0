"""Who is on the other end of a TLS connection: the peer's subject, names, serial, expiry, and
the root that anchored its verified chain (with its provenance: own CA or federated).

Works with what applications hold: an ``ssl.SSLObject`` or ``ssl.SSLSocket``, an asyncio
``StreamWriter`` or transport, an httpx response, an aiohttp client response or server
request, a requests or urllib3 response, a gRPC server call's context. The verified chain
comes from ``get_verified_chain()`` (public in Python 3.13, the same method on the private
``_sslobj`` in 3.11 and 3.12). Where a library shows only the certificates the peer presented
(gRPC's auth context), ``peer_from_chain`` rebuilds the chain from them up to a root of the
bundle trusted now.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from cryptography import x509

from ._errors import BadMaterialError
from ._trust import TrustBundle, TrustedRoot
from ._x509 import CertificateFacts, fingerprint, may_sign, path_up

__all__ = [
    "PeerInfo",
    "TLSObject",
    "TLSRecord",
    "grpc_presented_pem",
    "peer_from_chain",
    "peer_info",
    "presented_certificates",
    "remember",
    "ssl_object_of",
]

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


@dataclass(frozen=True)
class TLSRecord:
    """What a TLS connection's peer presented and how it was verified, kept after the
    connection is gone: for responses whose connection went back to a pool (or was closed)
    before the application asks who answered (requests reads the body first)."""

    peer_der: bytes | None
    verified: tuple[bytes, ...]

    @classmethod
    def of(cls, tls: TLSObject) -> TLSRecord:
        return cls(tls.getpeercert(True), tuple(_verified_der(tls)))

    def getpeercert(self, binary_form: bool = False, /) -> bytes | None:
        if not binary_form:
            raise ValueError("a TLSRecord keeps the peer's certificate in DER form only")
        return self.peer_der

    def get_verified_chain(self) -> list[bytes]:
        return list(self.verified)


# Responses an integration answered over TLS connections (whose peers it recorded), and each
# connection's record (made once per connection, not once per response).
_RECORDS: weakref.WeakKeyDictionary[object, TLSRecord] = weakref.WeakKeyDictionary()


def remember(response: object, tls: object) -> None:
    """Record that ``response`` came over ``tls`` (a TLS connection or its ``TLSRecord``), so
    ``peer(response)`` works after the connection went back to its pool or was closed (and
    ``peer`` of a requests response whose ``raw`` is ``response``). Nothing is recorded when
    ``tls`` is neither."""
    if isinstance(tls, TLSRecord):
        _RECORDS[response] = tls
        return
    try:
        record = _RECORDS.get(tls)
    except TypeError:  # None, or anything else that is no connection
        return
    if record is None:
        if not _is_tls(tls):
            return
        record = _RECORDS[tls] = TLSRecord.of(cast(TLSObject, tls))
    _RECORDS[response] = record


def _is_tls(obj: object) -> bool:
    return (
        isinstance(obj, ssl.SSLObject | ssl.SSLSocket | TLSRecord)
        or type(obj).__name__ == "_SSLSocket"
    )


def ssl_object_of(conn: object) -> TLSObject:
    """The TLS object behind a connection-like value; ``BadMaterialError`` if there is none."""
    found = conn if _is_tls(conn) else _lookup(conn)
    if found is None or not _is_tls(found):
        raise BadMaterialError(
            f"cannot find a TLS connection in {type(conn).__name__}: pass an SSLObject, "
            "SSLSocket, asyncio StreamWriter or transport, httpx response, aiohttp "
            "response/request, or a requests/urllib3 response (from federatls's Session or "
            "PoolManager, or one whose connection is still held: stream=True / "
            "preload_content=False, body not read to the end)"
        )
    return cast(TLSObject, found)


def _recorded(obj: object) -> TLSRecord | None:
    try:
        return _RECORDS.get(obj)
    except TypeError:  # neither hashable nor weakly referenced: not a response we answered
        return None


def _lookup(conn: Any) -> object | None:
    raw = getattr(conn, "raw", None)  # requests.Response: its urllib3 response
    # A response of federatls's requests Session is found through its urllib3 response,
    # recorded when it arrived (``remember``).
    recorded = _recorded(conn) or (_recorded(raw) if raw is not None else None)
    if recorded is not None:
        return recorded
    held = getattr(raw if raw is not None else conn, "connection", None)
    sock: object = getattr(held, "sock", None)  # urllib3 HTTPConnection, while held
    if sock is not None and _is_tls(sock):
        return sock
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


def _verified_der(obj: TLSObject) -> list[bytes]:
    getter = getattr(obj, "get_verified_chain", None)  # SSLObject in 3.13+, or _ssl's own
    if getter is None:
        getter = obj._sslobj.get_verified_chain  # type: ignore[attr-defined]  # 3.11, 3.12
    # DER bytes (ssl, 3.13+) or _ssl.Certificate objects
    return [i if isinstance(i, bytes) else i.public_bytes(_ENCODING_DER) for i in getter() or []]


def _verified_chain(obj: TLSObject) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in _verified_der(obj)]


def peer_info(conn: object, trust: TrustBundle) -> PeerInfo:
    """The verified peer of ``conn``, its anchor looked up in ``trust``.

    Raises ``BadMaterialError`` when the connection has no verified peer certificate (the
    peer sent none, or the context does not verify peers). ``conn`` may also be a gRPC
    server call's context: its client's chain is then rebuilt against ``trust``
    (``peer_from_chain``).
    """
    if not _is_tls(conn) and callable(getattr(conn, "auth_context", None)):
        presented = presented_certificates(*grpc_presented_pem(conn))  # a gRPC call's context
        return peer_from_chain(presented, trust)
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
    path = path_up(leaf, pool.values(), lambda c: trust.anchor_of(c) is not None, signer=may_sign)
    if path is None:
        raise BadMaterialError(
            f"the TLS peer's certificate {leaf.subject.rfc4514_string()!r} does not chain "
            "to a root trusted now"
        )
    anchor = trust.anchor_of(path[-1])
    assert anchor is not None  # path_up stopped at an anchored certificate
    if anchor.fingerprint != fingerprint(path[-1]):
        path.append(anchor.certificate)
    return PeerInfo(certificate=leaf, chain=tuple(path), anchor=anchor)


def grpc_presented_pem(context: Any) -> tuple[bytes, bytes]:
    """What the client of a gRPC server call presented, as PEM from its ``auth_context()``:
    the leaf (``x509_pem_cert``; empty when it sent none) and the rest of its chain
    (``x509_pem_cert_chain``, the certificates it sent besides, maybe none)."""
    auth = context.auth_context()
    return (
        b"".join(auth.get("x509_pem_cert", ())),
        b"".join(auth.get("x509_pem_cert_chain", ())),
    )


def presented_certificates(leaf: bytes, rest: bytes) -> list[x509.Certificate]:
    """The certificates of ``grpc_presented_pem``, leaf first; ``BadMaterialError`` when
    there is no leaf or the PEM does not parse."""
    if not leaf:
        raise BadMaterialError("the client presented no certificate (a plaintext port?)")
    try:
        certs = [x509.load_pem_x509_certificate(leaf)]
        if rest:
            certs += x509.load_pem_x509_certificates(rest)
    except ValueError as exc:
        raise BadMaterialError(f"unreadable client certificate: {exc}") from exc
    return certs
