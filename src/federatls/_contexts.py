"""``ssl.SSLContext``s for workloads: a server or client context holding the workload's
certificate and in-memory key and trusting a bundle of roots. Safe defaults only: TLS 1.2 or
newer, forward-secret AEAD cipher suites, hostname checks on clients, client certificates
required on servers, no TLS session tickets (a resumed session would skip the certificate
check against today's roots). Real ``ssl.SSLContext`` objects, nothing faked.

A server context logs every handshake it refuses, with OpenSSL's reason, on the
``federatls.peer`` logger: asyncio's TLS (under streams, aiohttp and uvicorn) reports a
failed handshake only in debug mode, and sends the client no alert, so without this line
nobody would learn why a client was cut off.

Both kinds check the peer right after the handshake, in this order: the trust bundle's name
rules (``_namerules``; on by default), so a peer anchored in a root that may vouch only for
some names is refused unless every name it presents is one of them; then the context's
``authoriser``, if it was given one. A refusal is logged on ``federatls.peer`` and raised
from the handshake as an ``ssl.SSLCertVerificationError`` (its ``__cause__`` the
``PeerNotAuthorisedError``), so asyncio, anyio, httpx, aiohttp, uvicorn, hypercorn, urllib3
and requests close the connection before any application data, as for any certificate
OpenSSL refuses. This is how every integration applies its authoriser: one mechanism, in the
context. ``name_rules=False`` builds contexts that do not check the name rules.
"""

from __future__ import annotations

import logging
import ssl
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509

from ._authorise import Authoriser, apply_authoriser
from ._errors import BadMaterialError, PeerNotAuthorisedError
from ._keys import PrivateKey
from ._namerules import NameRules
from ._peer import peer_info
from ._sslkeys import tls_context
from ._trust import TrustBundle

__all__ = ["new_client_context", "new_server_context"]

log = logging.getLogger("federatls.peer")

# TLS 1.2 suites (TLS 1.3 has only AEAD suites): ECDHE key exchange, AEAD ciphers.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


Ctx = TypeVar("Ctx", bound=ssl.SSLContext)


@dataclass(frozen=True)
class _PeerChecks:
    """What a context checks on its peer after the handshake."""

    trust: TrustBundle
    rules: NameRules | None
    authoriser: Authoriser | None


# The checks each context makes (contexts with none are absent). A server context's handshake
# may switch to another context (``LiveServerContext``): the connection's context at the end
# of the handshake is the one whose checks apply.
_CHECKS: weakref.WeakKeyDictionary[ssl.SSLContext, _PeerChecks] = weakref.WeakKeyDictionary()


def _base(
    protocol: int,
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    trust: TrustBundle,
    cls: type[Ctx],
    name_rules: bool,
    authoriser: Authoriser | None,
) -> Ctx:
    if not trust.roots:
        raise ValueError("a context needs at least one trusted root")
    ctx = tls_context(protocol, roots=trust.certificates, chain=chain, key=key, cls=cls)
    ctx.set_ciphers(_TLS12_CIPHERS)
    rules = NameRules.of(trust) if name_rules else None
    if rules is not None or authoriser is not None:
        _CHECKS[ctx] = _PeerChecks(trust, rules, authoriser)
    return ctx


def _authoriser_refusal(
    conn: ssl.SSLObject | ssl.SSLSocket, checks: _PeerChecks
) -> PeerNotAuthorisedError | None:
    """Why ``checks.authoriser`` refuses the verified peer of ``conn``, or None. A peer that
    sent no certificate (optional client certificates) is refused: an authoriser is only
    given to see one. An authoriser that fails (raises anything but
    ``PeerNotAuthorisedError``, its error the refusal's ``__cause__``, or returns anything
    but None) refuses too: the connection is cut and the line logged as for any refusal,
    whatever the library would have done with an unexpected exception from a handshake
    (asyncio drops it silently)."""
    if checks.authoriser is None:
        return None
    try:
        peer = peer_info(conn, checks.trust)
    except BadMaterialError as exc:
        return PeerNotAuthorisedError(f"the authoriser has no verified peer to check: {exc}")
    try:
        apply_authoriser(checks.authoriser, peer)
    except PeerNotAuthorisedError as exc:
        return exc
    return None


def _check_peer(conn: ssl.SSLObject | ssl.SSLSocket, what: str) -> None:
    """After a handshake: refuse the peer (``what``: "TLS client" or "TLS server"; logged,
    and an ``ssl.SSLCertVerificationError`` raised from the ``PeerNotAuthorisedError``) if
    the connection's context has name rules its verified peer breaks, or an authoriser that
    refuses it."""
    checks = _CHECKS.get(conn.context)
    if checks is None:
        return
    refusal, by = (checks.rules.refusal(conn) if checks.rules else None), "name rules"
    if refusal is None:
        refusal, by = _authoriser_refusal(conn, checks), "authoriser"
    if refusal is None:
        return
    who = _address(conn, what) if isinstance(conn, ssl.SSLSocket) else f"a {what}"
    log.warning("refused %s after the TLS handshake (%s): %s", who, by, refusal)
    error = ssl.SSLCertVerificationError(1, f"federatls {by}: {refusal}")
    # What OpenSSL's own verification errors carry, for code that reads them.
    error.library = "federatls"
    error.reason = "PEER_NAME_NOT_AUTHORISED" if by == "name rules" else "PEER_NOT_AUTHORISED"
    error.verify_code, error.verify_message = 47, str(refusal)  # X509_V_ERR_PERMITTED_VIOLATION
    raise error from refusal


def _address(sock: ssl.SSLSocket, what: str) -> str:
    try:
        address = sock.getpeername()
    except OSError:
        return f"a {what}"
    if not isinstance(address, tuple):  # a Unix socket's peer: no address to name
        return f"a {what}"
    return f"the {what} at {address[0]}:{address[1]}"


def log_refused_handshake(exc: ssl.SSLError, peer: str = "a TLS client") -> None:
    """One log line for a server-side handshake that failed with ``exc``: a WARNING when
    either side refused the other's certificate, INFO for other TLS errors, DEBUG when the
    client just went away."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        log.warning(
            "refused %s in the TLS handshake: its certificate failed verification (%s)",
            peer,
            exc.verify_message,
        )
    elif exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        log.warning("refused %s in the TLS handshake: it sent no certificate", peer)
    elif exc.reason and exc.reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_")):
        alert = exc.reason.split("_ALERT_", 1)[1].lower().replace("_", " ")
        log.warning("%s refused this server in the TLS handshake (alert: %s)", peer, alert)
    elif isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        log.debug("%s closed the connection during the TLS handshake", peer)
    else:
        log.info("TLS handshake with %s failed: %s", peer, exc.reason or exc)


# The check runs in ``do_handshake``. A handshake can also be done by OpenSSL inside the first
# read or write (a socket wrapped with ``do_handshake_on_connect=False`` and read at once, as
# gunicorn does; an SSLObject read before its handshake), where no ``do_handshake`` of ours
# would run: so the first read or write of the classes below does the handshake through
# ``do_handshake`` first (a non-blocking one raises SSLWantRead/WriteError as a read would).
class _CheckedObject(ssl.SSLObject):
    """An ``ssl.SSLObject`` (asyncio, anyio) that is read or written only after its
    ``do_handshake`` (below: server or client) has checked the peer."""

    _checked = False

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        if not self._checked:
            self.do_handshake()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        if not self._checked:
            self.do_handshake()
        return super().write(data)


class _CheckedSocket(ssl.SSLSocket):
    """``_CheckedObject`` for blocking ``ssl.SSLSocket``s (a socket not connected yet has no
    TLS object, and no handshake to do: its reads and writes fail as ssl's do)."""

    _checked = False

    def _check_first(self) -> None:
        if not self._checked and getattr(self, "_sslobj", None) is not None:
            self.do_handshake()

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        self._check_first()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        self._check_first()
        return super().write(data)

    def send(self, data: Any, flags: int = 0) -> int:
        self._check_first()
        return super().send(data, flags)


class _ServerSSLObject(_CheckedObject):
    """The TLS object asyncio's servers get from a federatls server context: it logs a
    refused handshake (the peer's address is not known at this level) and checks the peer
    (name rules, authoriser)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            log_refused_handshake(exc)
            raise
        _check_peer(self, "TLS client")
        self._checked = True


class _ServerSSLSocket(_CheckedSocket):
    """The blocking TLS socket of a federatls server context: it logs a refused handshake,
    with the client's address, and checks the peer (name rules, authoriser)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            log_refused_handshake(exc, _address(self, "TLS client"))
            raise
        _check_peer(self, "TLS client")
        self._checked = True


class _ClientSSLObject(_CheckedObject):
    """The TLS object of a federatls client context under asyncio and anyio (httpx, aiohttp,
    streams): it checks the server (name rules, authoriser)."""

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_peer(self, "TLS server")
        self._checked = True


class _ClientSSLSocket(_CheckedSocket):
    """The blocking TLS socket of a federatls client context (httpx's sync client, urllib3,
    requests): it checks the server (name rules, authoriser)."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_peer(self, "TLS server")
        self._checked = True


def new_server_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    trust: TrustBundle,
    *,
    require_client_certificate: bool = True,
    name_rules: bool = True,
    authoriser: Authoriser | None = None,
    cls: type[Ctx] = ssl.SSLContext,  # type: ignore[assignment]
) -> Ctx:
    """A server context presenting ``chain`` and verifying client certificates against
    ``trust`` (required unless ``require_client_certificate`` is False: then optional, but
    still verified when sent), its name rules (unless ``name_rules`` is False) and
    ``authoriser`` (a client without a certificate is refused when there is one). ``cls``
    may be a subclass of ``ssl.SSLContext``."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, chain, key, trust, cls, name_rules, authoriser)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    ctx.sslobject_class = _ServerSSLObject
    ctx.sslsocket_class = _ServerSSLSocket
    return ctx


def new_client_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    trust: TrustBundle,
    *,
    check_hostname: bool = True,
    name_rules: bool = True,
    authoriser: Authoriser | None = None,
) -> ssl.SSLContext:
    """A client context presenting ``chain`` and verifying servers against ``trust``, its
    name rules (unless ``name_rules`` is False) and ``authoriser``; the server's name (DNS
    or IP) is checked unless ``check_hostname`` is False."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, chain, key, trust, ssl.SSLContext, name_rules, authoriser)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sslobject_class = _ClientSSLObject
    ctx.sslsocket_class = _ClientSSLSocket
    return ctx
