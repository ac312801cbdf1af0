"""The client of a step-ca compatible CA (the real step-ca or the federatls CA), pinned to the
CA's roots. Bodies are built and parsed by ``_protocol``; every httpx and ssl error is
translated here, in ``_call``, into federatls errors.

Every call is bounded by a deadline (connect, send and the read of the whole body), and
optionally by a longer exchange's (a bootstrap's, a renewal's); answers larger than
``MAX_ANSWER_BYTES`` are refused as they stream in, never buffered whole. Every call sends a
fresh ``X-Request-Id``, and the id the CA echoes (step-ca 0.26 and later) is logged and
carried on the errors (docs/protocol.md, "Request ids").
"""

from __future__ import annotations

import json as jsonlib
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ._errors import (
    BadMaterialError,
    CARefusedError,
    CATimeoutError,
    CAUnreachableError,
    ConfigError,
    FingerprintMismatchError,
)
from ._namerules import structured_bundle
from ._netstream import closing_transport
from ._protocol import (
    CRL_PATH,
    CRL_PEM_QUERY,
    FEDERATION_PATH,
    FEDERATION_SOURCES_PATH,
    HEALTH_PATH,
    INTERMEDIATES_PATH,
    PROVISIONERS_PATH,
    REKEY_PATH,
    RENEW_PATH,
    REQUEST_ID_HEADER,
    REVOKE_PATH,
    ROOTS_PATH,
    SIGN_PATH,
    VERSION_PATH,
    CRLResponse,
    ErrorBody,
    FederationSourcesResponse,
    HealthResponse,
    ProvisionerKeyResponse,
    ProvisionersResponse,
    RekeyRequest,
    RevokeRequest,
    RootResponse,
    RootsResponse,
    SignRequest,
    SignResponse,
    VersionResponse,
    encrypted_key_path,
    new_request_id,
    read_request_id,
    root_path,
)
from ._sslkeys import tls_context
from ._trust import TrustBundle
from ._version import __version__
from ._x509 import crl_signer, fingerprint

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_CRL_BYTES",
    "CAClient",
    "Deadline",
    "fetch_root",
    "refused_as_expired",
]

log = logging.getLogger("federatls")

DEFAULT_TIMEOUT = 15.0
# Far above any step-ca answer (a chain, a bundle of roots, a page of provisioners).
MAX_ANSWER_BYTES = 1 << 20
# A CRL grows with the CA's revocations (some 40 bytes each): its own, larger cap.
MAX_CRL_BYTES = 64 << 20
# Compressed answers are neither asked for nor accepted: a small body must not inflate.
# The 401 of a renewal whose certificate has expired: "certificate expired on <time>" from
# step-ca 0.20 (docs/protocol.md, "Renew"), "certificate has expired" before.
_EXPIRED = re.compile(r"certificate (has )?expired")
_HEADERS = {"User-Agent": f"federatls/{__version__}", "Accept-Encoding": "identity"}


@dataclass(frozen=True)
class Deadline:
    """When an exchange must be over: ``at`` on anyio's clock, having been given ``seconds``
    for ``what`` ("the call", "the bootstrap", "the renewal"), which errors name."""

    at: float
    seconds: float
    what: str

    @classmethod
    def after(cls, seconds: float, what: str) -> Deadline:
        """The deadline ``seconds`` from now (call it inside the event loop); ``ConfigError``
        unless ``seconds`` is a positive number."""
        return cls(anyio.current_time() + _positive(seconds), seconds, what)

    def sooner(self, other: Deadline | None) -> Deadline:
        """Whichever of the two comes first."""
        return self if other is None or self.at <= other.at else other


def _positive(seconds: float) -> float:
    """``seconds`` if it is a positive number (not NaN, not a string), else ``ConfigError``:
    a timeout that cannot be a deadline must not quietly become none."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ConfigError(f"a timeout must be a positive number of seconds, not {seconds!r}")
    return seconds


def _base_url(url: str) -> str:
    """``https://host[:port]`` of ``url``; ``BadMaterialError`` for anything that is not an
    https:// URL with a host and a port in range (before a socket is ever opened)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise BadMaterialError(f"CA URL {url!r} is not a URL ({exc})") from exc
    if parts.scheme != "https" or not parts.netloc:
        raise BadMaterialError(f"CA URL {url!r} must be an https:// URL")
    if not parts.hostname:
        raise BadMaterialError(f"CA URL {url!r} has no host")
    try:
        port = parts.port  # a ValueError when out of range or not a number
    except ValueError:
        port = 0
    if port == 0:
        raise BadMaterialError(f"CA URL {url!r} has an invalid port")
    return f"https://{parts.netloc}"


def client_tls_context(
    roots: Sequence[x509.Certificate],
    identity: tuple[Sequence[x509.Certificate], PrivateKeyTypes] | None = None,
) -> ssl.SSLContext:
    """A client context trusting exactly ``roots``, TLS 1.2+, hostname checked, with an
    optional client certificate (kept in memory)."""
    if identity is None:
        return tls_context(ssl.PROTOCOL_TLS_CLIENT, roots=roots)
    return tls_context(ssl.PROTOCOL_TLS_CLIENT, roots=roots, chain=identity[0], key=identity[1])


async def _call(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    deadline: Deadline,
    json: Any = None,
    headers: dict[str, str] | None = None,
    expect: tuple[int, ...] = (200,),
    raw: bool = False,
    limit: int = MAX_ANSWER_BYTES,
) -> Any:
    """One request, over by ``deadline`` (connect, send, the whole body): the JSON answer
    (``raw``: the body's bytes, at most ``limit``), or a federatls error saying what went
    wrong.

    Each call sends a fresh ``X-Request-Id``; the id the CA echoes (step-ca 0.26 and later,
    docs/protocol.md "Request ids") is logged at DEBUG for an answer and carried on the
    error for a refusal, or for a failure once the answer's headers had come."""
    sent = new_request_id()
    status, content, echoed = 0, b"", None
    try:
        with anyio.CancelScope(deadline=deadline.at) as scope:
            async with client.stream(
                method, url, json=json, headers={**(headers or {}), REQUEST_ID_HEADER: sent}
            ) as response:
                status = response.status_code
                echoed = read_request_id(response.headers.get(REQUEST_ID_HEADER))
                content = await _read_capped(response, url, limit)
    except httpx.TimeoutException as exc:
        raise CATimeoutError(url, deadline.seconds, deadline.what, request_id=echoed) from exc
    except httpx.TransportError as exc:
        raise CAUnreachableError(url, _transport_reason(exc), request_id=echoed) from exc
    except ssl.SSLError as exc:  # an alert after the handshake (TLS 1.3) escapes httpx
        raise CAUnreachableError(
            url, f"TLS failure: {exc.reason or exc}", request_id=echoed
        ) from exc
    if scope.cancelled_caught:
        raise CATimeoutError(url, deadline.seconds, deadline.what, request_id=echoed)
    log.debug("%s %s: %d, request id %s", method, url, status, echoed or f"{sent} (not echoed)")
    if status not in expect:
        body = ErrorBody.parse(status, content)
        raise CARefusedError(
            status, body.message, url=url, body=dict(body.extra) or None, request_id=echoed
        )
    if raw:
        return content
    try:
        return jsonlib.loads(content)
    except ValueError as exc:
        raise BadMaterialError(f"{url}: the CA's answer is not JSON") from exc


async def _read_capped(response: httpx.Response, url: str, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The body, read as it streams in and refused once it passes ``limit`` (or announces
    more up front); the rest is never read."""
    too_large = f"{url}: the CA's answer is larger than {limit} bytes: refused"
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadMaterialError(f"{url}: the CA's answer is {encoding}-encoded, not asked for")
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise BadMaterialError(f"{too_large} (Content-Length {declared})")
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            raise BadMaterialError(f"{too_large} (read no further)")
    return bytes(body)


_NO_CRL_HINT = (
    "the CA serves no CRL: its ca.json's crl block does not enable one, or it is a step-ca "
    "older than 0.23"
)


def refused_as_expired(error: CARefusedError | CAUnreachableError) -> bool:
    """Whether a failed renewal over mutual TLS says that the certificate has expired (by the
    CA's clock): a 401 "certificate expired on ..." (step-ca 0.20 and later; "certificate
    has expired" from the federatls CA before), or a TLS alert "certificate expired" from a
    CA that checks client certificates at the handshake (step-ca, the federatls CA). A 401
    of step-ca 0.19 says only "The request lacked necessary authorization to be completed"
    and is not told apart from any other refusal."""
    if isinstance(error, CARefusedError):
        return error.status == 401 and _EXPIRED.search(error.message) is not None
    return "CERTIFICATE_EXPIRED" in error.reason.upper()


def _transport_reason(exc: httpx.TransportError) -> str:
    """A sentence for a transport failure, naming TLS when TLS is the cause."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"TLS failure: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {exc}" if str(exc) else "connection refused"
    if isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError):
        # Under TLS 1.3 a server that refuses the client certificate just closes.
        return (
            "TLS failure or connection closed by the CA (a client certificate the CA "
            "does not trust looks like this)"
        )
    return str(exc) or type(exc).__name__


async def fetch_root(
    url: str, sha: str, *, timeout: float = DEFAULT_TIMEOUT, deadline: Deadline | None = None
) -> x509.Certificate:
    """GET ``/root/{sha}`` *without* TLS verification, then require the fingerprint to match.

    This is trust on first use made safe by the token: ``sha`` came from a token the user
    trusts, so a CA that answers with any other certificate is refused
    (``FingerprintMismatchError``) and nothing more is sent to it. The call is over within
    ``timeout`` seconds, and by ``deadline`` if one is given (``CATimeoutError``).
    """
    base = _base_url(url)
    want = sha.lower().replace("-", "").replace(":", "")
    ctx = tls_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    bound = Deadline.after(timeout, "the call").sooner(deadline)
    async with httpx.AsyncClient(
        transport=closing_transport(ctx), timeout=timeout, headers=_HEADERS
    ) as client:
        data = await _call(client, "GET", f"{base}/root/{want}", deadline=bound)
    root = RootResponse.parse(data).certificate
    got = fingerprint(root)
    if got != want:
        raise FingerprintMismatchError(want, got, base)
    return root


class CAClient:
    """Talks to one CA over TLS pinned to ``roots``; ``identity`` enables mTLS (renew, rekey,
    revoke by certificate). Use as ``async with CAClient(url, roots) as ca``.

    Each call is over within ``timeout`` seconds, and all of them by ``deadline`` when one
    is given (an exchange of several calls); else ``CATimeoutError``."""

    def __init__(
        self,
        url: str,
        roots: Sequence[x509.Certificate],
        *,
        identity: tuple[Sequence[x509.Certificate], PrivateKeyTypes] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        deadline: Deadline | None = None,
    ) -> None:
        if not roots:
            raise BadMaterialError("a CA client needs at least one root certificate to trust")
        self.url = _base_url(url)
        self.roots = tuple(roots)
        self.timeout = _positive(timeout)
        self.deadline = deadline
        self._client = httpx.AsyncClient(
            transport=closing_transport(client_tls_context(roots, identity)),
            timeout=timeout,
            headers=_HEADERS,
        )

    async def __aenter__(self) -> CAClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    def _deadline(self) -> Deadline:
        return Deadline.after(self.timeout, "the call").sooner(self.deadline)

    async def _get(self, path: str, expect: tuple[int, ...] = (200,)) -> Any:
        return await _call(
            self._client, "GET", self.url + path, deadline=self._deadline(), expect=expect
        )

    async def _post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        return await _call(
            self._client,
            "POST",
            self.url + path,
            deadline=self._deadline(),
            json=body,
            headers=headers,
            expect=(200, 201),
        )

    async def health(self) -> str:
        return HealthResponse.parse(await self._get(HEALTH_PATH)).status

    async def version(self) -> VersionResponse:
        return VersionResponse.parse(await self._get(VERSION_PATH))

    async def root(self, sha: str) -> x509.Certificate:
        return RootResponse.parse(await self._get(root_path(sha))).certificate

    async def roots_bundle(self) -> tuple[x509.Certificate, ...]:
        """``/roots``: the CA's own roots."""
        data = await self._get(ROOTS_PATH, expect=(200, 201))
        return RootsResponse.parse(data, "roots response").certificates

    async def federation(self) -> tuple[x509.Certificate, ...]:
        """``/federation``: the CA's own roots and every federated root."""
        data = await self._get(FEDERATION_PATH, expect=(200, 201))
        return RootsResponse.parse(data, "federation response").certificates

    async def federation_sources(self) -> FederationSourcesResponse | None:
        """``/federatls/federation``: the federation with its structure (which roots belong
        to which source, and the names each may vouch for); None when the CA answers 404 (a
        plain step-ca, which publishes only the flat ``/federation``). Any other failure
        raises, as every call does."""
        try:
            data = await self._get(FEDERATION_SOURCES_PATH)
        except CARefusedError as exc:
            if exc.status == 404:
                return None
            raise
        return FederationSourcesResponse.parse(data)

    async def trust_bundle(self, own: Sequence[x509.Certificate] | None = None) -> TrustBundle:
        """What a workload of this CA trusts: its own roots (``/roots``, or ``own`` when the
        caller fetched them already) and its federation. Bootstrap, renewal and the trust
        refresh all build their bundle here.

        Where the CA publishes its federation's structure, each federated root carries the
        names it may vouch for, and roots on which ``/federation`` and the structure
        disagree are left out (logged; ``structured_bundle``). A 404 there means a plain
        step-ca: the flat bundle, every root vouching for any name. Any other failure of
        that endpoint fails the whole fetch (``CARefusedError``, ``CAUnreachableError``,
        ``BadMaterialError``), so that rules are never dropped silently: the caller keeps
        the bundle it had (renewal does) or fails (bootstrap)."""
        if own is None:
            own = await self.roots_bundle()
        federation = await self.federation()
        sources = await self.federation_sources()
        if sources is None:
            return TrustBundle.from_ca(own, federation)
        trust, left_out = structured_bundle(own, federation, sources.sources)
        for sentence in left_out:
            log.warning("%s: not trusted: %s", self.url, sentence)
        return trust

    async def intermediates(self) -> tuple[x509.Certificate, ...] | None:
        """``/intermediates``: the CA's intermediate certificates (step-ca 0.27.3 and later);
        None when the CA has no such endpoint: 404 (step-ca before 0.27.3: no route) or 501
        (a CA that does not publish them). Any other failure raises, as every call does."""
        try:
            data = await self._get(INTERMEDIATES_PATH, expect=(200, 201))
        except CARefusedError as exc:
            if exc.status in (404, 501):
                log.debug("%s has no %s (%d)", self.url, INTERMEDIATES_PATH, exc.status)
                return None
            raise
        return RootsResponse.parse(data, "intermediates response").certificates

    async def provisioners(self) -> list[dict[str, Any]]:
        """Every provisioner, following ``nextCursor`` through all pages."""
        out: list[dict[str, Any]] = []
        cursor = ""
        for _ in range(1000):
            page = ProvisionersResponse.parse(
                await self._get(f"{PROVISIONERS_PATH}?cursor={cursor}&limit=100")
            )
            out += [dict(p) for p in page.provisioners]
            if not page.next_cursor or page.next_cursor == cursor:
                return out
            cursor = page.next_cursor
        raise BadMaterialError("the CA's provisioner list does not end")

    async def encrypted_key(self, kid: str) -> str:
        return ProvisionerKeyResponse.parse(await self._get(encrypted_key_path(kid))).key

    async def sign(self, request: SignRequest) -> SignResponse:
        return SignResponse.parse(await self._post(SIGN_PATH, request.to_json()))

    async def renew(self) -> SignResponse:
        """Renew the certificate this client presents (mTLS). A CA's refusal of an expired
        certificate is raised as it came (``CARefusedError``, ``CAUnreachableError``);
        ``refused_as_expired`` tells it apart."""
        return SignResponse.parse(await self._post(RENEW_PATH, None))

    async def renew_with_token(self, token: str) -> SignResponse:
        """Renew with a ``Bearer`` x5cInsecure token instead of mTLS."""
        return SignResponse.parse(
            await self._post(RENEW_PATH, None, {"Authorization": f"Bearer {token}"})
        )

    async def rekey(self, request: RekeyRequest) -> SignResponse:
        return SignResponse.parse(await self._post(REKEY_PATH, request.to_json()))

    async def revoke(self, request: RevokeRequest) -> None:
        await self._post(REVOKE_PATH, request.to_json())

    async def crl(
        self, *, pem: bool = False, issuers: Sequence[x509.Certificate] | None = None
    ) -> tuple[bytes, x509.CertificateRevocationList]:
        """``/crl`` (docs/protocol.md, "CRL"): the CA's CRL as served (DER, or PEM with
        ``pem``) and parsed, its signature verified with one of ``issuers`` that chains to
        this client's roots, else ``BadMaterialError``. ``issuers`` None: the CA's own
        ``/intermediates`` (step-ca 0.27.3+; a CA without it leaves only the roots, and the
        error then says to give them).
        ``CARefusedError`` 404 when the CA serves no CRL, with a hint saying why it may not."""
        path = CRL_PATH + (f"?{CRL_PEM_QUERY}" if pem else "")
        try:
            body: bytes = await _call(
                self._client,
                "GET",
                self.url + path,
                deadline=self._deadline(),
                raw=True,
                limit=MAX_CRL_BYTES,
            )
        except CARefusedError as exc:
            if exc.status != 404:
                raise
            raise exc.with_hint(_NO_CRL_HINT) from exc
        crl = CRLResponse.parse(body)
        unpublished = False
        if issuers is None:
            published = await self.intermediates()
            unpublished, issuers = published is None, published or ()
        try:
            crl_signer(crl, issuers, self.roots)
        except BadMaterialError as exc:
            if not unpublished:
                raise
            raise BadMaterialError(
                f"{exc}; the CA does not publish its intermediates (/intermediates: step-ca "
                "0.27.3 and later), so give them (issuers=, federatls ca crl --intermediates)"
            ) from exc
        return body, crl
