"""The federatls CA's HTTPS server: step-ca's routes (docs/protocol.md, "Endpoints"; no SSH)
and federatls's own ``/federatls/federation`` (the federation with its structure) under ``/``
and ``/1.0/``, step-ca's status codes and JSON bodies, every answer carrying its request's
``X-Request-Id`` (docs/protocol.md, "Request ids"), the CA's own server certificate renewed
before it expires, SIGHUP to reload ca.json, SIGTERM/SIGINT to stop cleanly.

The HTTP layer only translates: bodies are parsed by ``_protocol``, decisions are taken by
``Authority``, refusals are logged here with their specific reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from cryptography import x509

from .._errors import ConfigError, StoreBusyError, StoreUnavailableError
from .._protocol import (
    API_PREFIX,
    CRL_DISABLED_MESSAGE,
    CRL_PATH,
    CRL_PEM_QUERY,
    ENCRYPTED_KEY_PATH,
    FEDERATION_PATH,
    FEDERATION_SOURCES_PATH,
    HEALTH_PATH,
    INTERMEDIATES_PATH,
    INTERMEDIATES_PEM_PATH,
    LEGACY_RENEW_PATH,
    LEGACY_REQUEST_ID_HEADER,
    MAX_BODY_BYTES,
    PROVISIONERS_PATH,
    REKEY_PATH,
    RENEW_PATH,
    REQUEST_ID_HEADER,
    REVOKE_PATH,
    ROOT_PATH,
    ROOTS_PATH,
    ROOTS_PEM_PATH,
    SIGN_PATH,
    VERSION_PATH,
    CRLResponse,
    ErrorBody,
    FederationEntry,
    FederationSourcesResponse,
    HealthResponse,
    ProtocolError,
    ProvisionerKeyResponse,
    ProvisionersResponse,
    RekeyRequest,
    RevokeRequest,
    RevokeResponse,
    RootResponse,
    RootsResponse,
    SignRequest,
    SignResponse,
    VersionResponse,
    new_request_id,
    read_request_id,
)
from .._spiffe import BUNDLE_PATH, ca_spiffe_id
from .._x509 import certs_to_pem, fingerprint
from ._authority import Authority, Issuance, Refusal
from ._config import CAConfig, ConnectionLimits, split_address
from ._connections import ConnectionTable, Listener, Phase, connection_limit
from ._crl import STATE_KEY as CRL_STATE_KEY
from ._crl import StoredCRL, current_crl, idp_url, made_for, renewal_due
from ._database import Database, open_store
from ._federation import PeerRoots
from ._follower import Follower
from ._issuer import server_certificate
from ._material import load_material
from ._purge import PURGE_INTERVAL, TokenPurge
from ._spiffe_own import OwnBundle, own_bundle
from ._store import Store, StoreWouldWait, without_waiting
from ._tls import build_server_context
from ._tlsconn import TLSServerConnection

__all__ = ["CAServer", "Serving", "serve"]

log = logging.getLogger("federatls.ca")
# Marks the "serving HTTPS on" record, for a front end that announces readiness itself.
READY_RECORD = "federatls_ready"
CHECKPOINT_INTERVAL = 0.1  # seconds between checkpoints of the database's write-ahead log
HEALTH_CHECK_INTERVAL = 1.0  # /health asks the database at most this often
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# step-ca's older header for the same id, read when a request has no X-Request-Id.
# A request id the CA echoes: letters, digits and a few separators (a UUID, an xid, a
# trace id); anything else is replaced by a fresh id, never echoed or logged raw.
_REQUEST_ID = web.RequestKey("request_id", str)


Clock = Callable[[], datetime]
_T = TypeVar("_T")


_Batch = list[tuple[Authority, Issuance, "asyncio.Future[bool]"]]


class _GroupCommit:
    """Signed certificates waiting to be recorded are committed together: what arrives
    within one turn of the event loop, or while the previous group is being written, goes
    into one transaction, so a busy CA pays one commit (and, when one is needed, one sync
    to disk) for many certificates instead of one each.

    The event loop never waits for the database: it commits a group itself only when that
    needs no wait (``without_waiting``: no lock held elsewhere, no sync to disk); otherwise
    the group goes to the writer thread, which waits a bounded time. A group that cannot
    have the database in time fails with ``StoreBusyError`` (503) and records nothing.

    A group whose transaction the database refuses for one of its records (a statement
    refused, a constraint) is tried again one certificate per transaction, so only that
    sign fails; not when the database is busy or unreachable (``_record``)."""

    def __init__(self) -> None:
        self._pending: _Batch = []
        self._writing = False  # the writer thread has a group
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="federatls-ca-commit")

    async def commit(self, authority: Authority, issuance: Issuance) -> None:
        """Record ``issuance``; a 401 ``Refusal`` if its token was spent meanwhile."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        if not self._pending and not self._writing:
            loop.call_soon(self._flush, loop)
        self._pending.append((authority, issuance, done))
        if not await done:
            raise Refusal(401, "token already used")

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        authority = batch[-1][0]  # all share one store, whichever reload made them
        issuances = [issuance for _, issuance, _ in batch]
        failure: Exception | None = None
        try:
            with without_waiting():
                results = authority.commit(issuances)
        except StoreWouldWait:
            pass
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch, [exc])
                return
            failure = exc  # the writer thread decides whether to try them one by one
        else:
            _settle(batch, results)
            return
        self._writing = True
        written = loop.run_in_executor(self._writer, _record, authority, issuances, failure)
        written.add_done_callback(lambda _: self._written(loop, batch, written))

    def _written(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: _Batch,
        written: asyncio.Future[list[bool | Exception]],
    ) -> None:
        self._writing = False
        if self._pending:
            loop.call_soon(self._flush, loop)
        exc = written.exception()
        if exc is None:
            _settle(batch, written.result())
        else:  # not raised by _record, which answers for each; all fail alike
            _settle(batch, [exc] * len(batch))

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.shutdown)


def _record(
    authority: Authority, issuances: list[Issuance], failure: Exception | None
) -> list[bool | Exception]:
    """In the writer thread: commit ``issuances`` in one transaction (unless ``failure``
    says that was just tried), and when it fails, each in its own transaction, so that a
    record the database refuses fails only its own sign. Each one's outcome: committed
    (True), its token spent by another request (False), or why it failed."""
    if failure is None:
        try:
            return list(authority.commit(issuances))
        except Exception as exc:
            failure = exc
    if len(issuances) == 1 or not _worth_retrying(authority, failure):
        return [failure] * len(issuances)
    outcomes: list[bool | Exception] = []
    for i, issuance in enumerate(issuances, 1):
        try:
            outcomes.append(authority.commit([issuance])[0])
        except Exception as exc:
            outcomes.append(exc)
            left = len(issuances) - i
            if left and not _worth_retrying(authority, exc):  # the database went away
                return outcomes + [exc] * left
    return outcomes


def _worth_retrying(authority: Authority, failure: Exception) -> bool:
    """Whether, after ``failure``, issuances should (still) be committed one by one.

    Not when the database is busy (a lock held elsewhere, a timeout, SQLite's write lock):
    each attempt would wait as long again, on the one writer thread, for the same 503. Not
    when it cannot be reached: ``StoreUnavailableError`` is also what PostgreSQL's refusal
    of a statement becomes, so one bounded ``check`` tells the two apart; if the database
    does not answer it, N more attempts would only hammer (or wait for) a server that is
    down, and every sign gets its 503 at once. Anything else (a statement refused, an
    integrity error) belongs to a record: the others deserve their own transactions."""
    if isinstance(failure, StoreBusyError):
        if not isinstance(failure, StoreUnavailableError):
            return False
        try:
            authority.store.check()
        except StoreBusyError:
            return False
    return True


def _settle(batch: _Batch, outcome: Sequence[bool | BaseException]) -> None:
    for (_, _, done), result in zip(batch, outcome, strict=True):
        if done.done():  # a handler cancelled meanwhile (client gone)
            continue
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)


class _State:
    """What requests use: the authority (a reload replaces it for the requests that follow),
    the clock (tests pass a fake one), the group committer and the threads that make the
    authority's store calls that would wait, so that a wait for the database never holds
    up the event loop."""

    def __init__(self, authority: Authority, clock: Clock) -> None:
        self.authority = authority
        self.clock = clock
        self.committer = _GroupCommit()
        self.spiffe_bundle = OwnBundle()
        self.crl_making = asyncio.Lock()  # one CRL made at a time in this process
        self._workers = ThreadPoolExecutor(4, thread_name_prefix="federatls-ca-store")
        # /health's own thread: not queued behind signs that wait for a busy database.
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="federatls-ca-health")
        self._health: asyncio.Future[str | None] | None = None
        self._health_checked = float("-inf")

    async def off_loop(self, call: Callable[[], _T]) -> _T:
        """``call()`` in a worker thread, where it may wait for the store (boundedly)."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, call)

    async def soon(self, call: Callable[[], _T]) -> _T:
        """``call()`` here if it needs no wait for the store, else in a worker thread.

        Only for calls whose one write, if they make one, is their last store call: a
        first attempt stopped by ``StoreWouldWait`` has then changed nothing, and the call
        may be made again from the start. A store that always waits (PostgreSQL) has it
        made in a thread straight away: a first attempt here would only be thrown away."""
        if self.authority.store.always_waits:
            return await self.off_loop(call)
        try:
            with without_waiting():
                return call()
        except StoreWouldWait:
            return await self.off_loop(call)

    async def store_problem(self) -> str | None:
        """What keeps the store from being used now (``Store.check``), or None. Asked at
        most once per ``HEALTH_CHECK_INTERVAL``, and once for all the requests that arrive
        while it is being asked, so a flood of ``/health`` takes no worker from signing."""
        if time.monotonic() - self._health_checked < HEALTH_CHECK_INTERVAL:
            assert self._health is not None
            return self._health.result()
        if self._health is None or self._health.done():
            self._health = asyncio.ensure_future(self._check_store())
        return await asyncio.shield(self._health)

    async def _check_store(self) -> str | None:
        check = self.authority.store.check
        try:
            if self.authority.store.always_waits:
                await asyncio.get_running_loop().run_in_executor(self._checker, check)
            else:
                await self.soon(check)
            problem = None
        except StoreBusyError as exc:  # unavailable, or busy past its bounded wait
            problem = str(exc) or type(exc).__name__
        self._health_checked = time.monotonic()
        return problem

    async def close(self) -> None:
        await self.committer.close()
        await asyncio.to_thread(self._workers.shutdown)
        await asyncio.to_thread(self._checker.shutdown)


_STATE = web.AppKey("state", _State)
_UNANSWERED = (Phase.HANDSHAKE, Phase.WAITING, Phase.HEAD, Phase.BODY, Phase.IDLE)


def _now() -> datetime:
    return datetime.now(UTC)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The verified client certificate of this connection, if the client sent one."""
    sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
    if sslobj is None:
        return None
    der = sslobj.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


async def _body(request: web.Request) -> bytes:
    """The whole body, however it arrives (chunked, in pieces); over the limit is a 413
    (aiohttp enforces ``client_max_size`` while reading)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_BODY_BYTES, actual_size=request.content_length
        )
    return await request.read()


@web.middleware
async def _close_promptly(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A client that asked for ``Connection: close`` (every bootstrapping client) gets the
    answer, close_notify and the TCP close in the same turn of the event loop. Left to
    aiohttp, the close comes a turn later, and the client waits for it to read to the end."""
    response = await handler(request)
    if not request.keep_alive and request.transport is not None:
        await response.prepare(request)
        await response.write_eof()
        request.transport.close()
    return response


@web.middleware
async def _phases(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection's table where the request is (docs/ca.md, "Connection limits"):
    the head is complete when this runs; the body then has its deadline, the CA's work and
    the writing of the answer theirs; a kept-alive connection is idle once answered."""
    connection = request.transport
    if not isinstance(connection, TLSServerConnection):
        return await handler(request)
    connection.requested()
    try:
        if request.body_exists:
            try:
                await _body(request)  # read whole here, kept for the handler
            except ConnectionError:  # closed on the body timeout, or the client left
                return web.Response(status=408)
        connection.working()
        return await handler(request)
    finally:
        if request.keep_alive:
            connection.answered()


class _HTTPLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's request handler logs each malformed request (a bad request line, a header
    too long) at ERROR with a traceback, and a client can send one per connection: they
    are counted in the connection table's summary line instead. Everything else aiohttp
    logs passes through to ``aiohttp.server``."""

    def __init__(self, table: ConnectionTable) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._table = table

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if isinstance(kwargs.get("exc_info"), HttpProcessingError):
            self._table.note("malformed HTTP requests answered 400")
            return
        super().log(level, msg, *args, **kwargs)


def request_id_of(headers: Mapping[str, str]) -> str:
    """The id a request is answered and logged under (docs/protocol.md, "Request ids"): the
    client's ``X-Request-Id`` (else ``X-Smallstep-Id``, as step-ca reads it) when it is a sane
    id (``read_request_id``), else a fresh UUID, as step-ca makes one."""
    for name in (REQUEST_ID_HEADER, LEGACY_REQUEST_ID_HEADER):
        given = headers.get(name, "")
        if given:
            return read_request_id(given) or new_request_id()
    return new_request_id()


@web.middleware
async def _request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer, refusals included, carries the request's id in ``X-Request-Id``; the
    CA's log lines about the request name it."""
    request[_REQUEST_ID] = rid = request_id_of(request.headers)
    response = await handler(request)
    response.headers[REQUEST_ID_HEADER] = rid
    return response


def _rid(request: web.Request) -> str:
    return str(request.get(_REQUEST_ID, "-"))


def _clipped(text: str, most: int) -> str:
    """``text`` cut to ``most`` characters for the log (a client chooses paths and claims)."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes step-ca's JSON error body; the specific reason goes to the log,
    quoted and clipped, so that a refusal is one line of bounded length whatever a client
    puts in its path or its token."""
    where = _clipped(f"{request.method} {request.path}", 200)
    rid = _rid(request)
    try:
        return await handler(request)
    except Refusal as refusal:
        reason = _clipped(refusal.reason, 600)
        log.warning("refused %r (request %s): %d %r", where, rid, refusal.status, reason)
        return _json(refusal.body.to_json(), refusal.status)
    except StoreBusyError as exc:
        what = "unavailable" if isinstance(exc, StoreUnavailableError) else "busy"
        log.warning("refused %r (request %s): 503 the database is %s (%s)", where, rid, what, exc)
        response = _json(ErrorBody.for_status(503).to_json(), 503)
        response.headers["Retry-After"] = "1"
        return response
    except ProtocolError as exc:
        reason = _clipped(exc.reason, 600)
        log.warning("refused %r (request %s): %d %r", where, rid, exc.status, reason)
        return _json(ErrorBody.for_status(exc.status, exc.reason).to_json(), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = _clipped(exc.reason, 600)
        log.warning("refused %r (request %s): %d %r", where, rid, exc.status, reason)
        return _json(ErrorBody.for_status(exc.status).to_json(), exc.status)
    except Exception:
        log.exception("internal error on %r (request %s)", where, rid)
        return _json(ErrorBody.for_status(500).to_json(), 500)


def _authority(request: web.Request) -> Authority:
    return request.app[_STATE].authority


def _clock(request: web.Request) -> datetime:
    return request.app[_STATE].clock()


async def _health(request: web.Request) -> web.Response:
    """200 ``{"status": "ok"}`` (step-ca's answer) while the store can be used; else 503
    with step-ca's error body, its message saying what is wrong (``step ca health`` and
    ``federatls ca health`` print it). No other read-only route touches the store."""
    problem = await request.app[_STATE].store_problem()
    if problem is None:
        return _json(HealthResponse().to_json())
    message = f"The certificate authority cannot use its database: {problem}"
    return _json(ErrorBody(503, message).to_json(), 503)


async def _version(request: web.Request) -> web.Response:
    return _json(VersionResponse(_authority(request).version()).to_json())


async def _roots(request: web.Request) -> web.Response:
    return _json(RootsResponse(_authority(request).roots()).to_json(), 201)


def _pem_file(pem: str) -> web.Response:
    """Concatenated PEM as step-ca answers it: ``Content-Type: application/x-pem-file``, with
    no charset parameter (aiohttp adds one to a ``text=`` body)."""
    return web.Response(body=pem.encode("ascii"), content_type="application/x-pem-file")


async def _roots_pem(request: web.Request) -> web.Response:
    return _pem_file(certs_to_pem(_authority(request).roots()))


async def _intermediates(request: web.Request) -> web.Response:
    """The CA's intermediates, the signing one first, as step-ca 0.27.3 and later answer
    them: 201 with ``{"crts": [...]}`` (the shape of ``/roots``)."""
    return _json(RootsResponse(_authority(request).material.intermediates).to_json(), 201)


async def _intermediates_pem(request: web.Request) -> web.Response:
    return _pem_file(certs_to_pem(_authority(request).material.intermediates))


async def _federation(request: web.Request) -> web.Response:
    return _json(RootsResponse(_authority(request).federation()).to_json(), 201)


async def _spiffe_bundle(request: web.Request) -> web.Response:
    """The CA's own roots as a SPIFFE bundle (docs/spiffe.md), to anyone (no client
    authentication, as the SPIFFE Federation specification requires); 404 with step-ca's
    error body while ca.json has no ``spiffe`` block."""
    state = request.app[_STATE]
    authority = state.authority
    config = authority.config
    if config.spiffe_trust_domain is None:
        raise Refusal(404, "no SPIFFE bundle is served: ca.json has no spiffe.trustDomain")
    roots, hint = authority.roots(), config.federation.refresh

    def make() -> bytes:
        return own_bundle(authority.store, roots, hint)

    body = await state.spiffe_bundle.body(authority, make, state.off_loop)
    return web.Response(body=body, content_type="application/json")


async def _federation_sources(request: web.Request) -> web.Response:
    sources = _authority(request).federation_sources()
    entries = tuple(FederationEntry(s.kind, s.peer, s.roots, s.names) for s in sources)
    return _json(FederationSourcesResponse(entries).to_json())


async def _root(request: web.Request) -> web.Response:
    cert = _authority(request).root(request.match_info["sha"])
    return _json(RootResponse(cert).to_json())


async def _provisioners(request: web.Request) -> web.Response:
    page, cursor = _authority(request).provisioners(
        request.query.get("cursor", ""), request.query.get("limit", "")
    )
    return _json(ProvisionersResponse(tuple(p.raw for p in page), cursor).to_json())


async def _encrypted_key(request: web.Request) -> web.Response:
    key = _authority(request).encrypted_key(request.match_info["kid"])
    return _json(ProvisionerKeyResponse(key).to_json())


def _signed(
    authority: Authority, chain: list[x509.Certificate], request: web.Request, what: str
) -> web.Response:
    # The log line waits for the next turn of the event loop, by when the answer has been
    # sent and the connection closed: the client does not wait for the CA's bookkeeping.
    asyncio.get_running_loop().call_soon(_log_signed, what, request.path, _rid(request), chain[0])
    body = SignResponse(tuple(chain), authority.config.tls_options).to_json()
    return _json(body, 201)


def _log_signed(what: str, path: str, rid: str, leaf: x509.Certificate) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(
            "%s %s (request %s): serial=%d subject=%r not_after=%s",
            what,
            path,
            rid,
            leaf.serial_number,
            leaf.subject.rfc4514_string(),
            leaf.not_valid_after_utc.isoformat(),
        )


async def _sign(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    authority = state.authority
    sign = SignRequest.parse(await _body(request))
    now = _clock(request)
    issuance = await state.soon(lambda: authority.prepare_sign(sign, now))
    await state.committer.commit(authority, issuance)
    return _signed(authority, list(issuance.chain), request, "signed")


async def _renew(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    authority = state.authority
    peer = _peer_certificate(request)
    now = _clock(request)
    if peer is None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise Refusal(400, "missing client certificate")
        token = auth[len("Bearer ") :]

        def renew() -> list[x509.Certificate]:
            leaf, spend = authority.authorize_renew_token(token, now)
            return authority.renew(leaf, now, spend=spend)

        # One write, last: the token spent with the certificate it buys. A renew token's
        # spend is always synced to disk (a wait), so the whole call goes to a thread at once.
        return _signed(authority, await state.off_loop(renew), request, "renewed")
    known = peer
    chain = await state.soon(lambda: authority.renew(known, now))
    return _signed(authority, chain, request, "renewed")


async def _rekey(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    authority = state.authority
    peer = _peer_certificate(request)
    if peer is None:
        raise Refusal(400, "missing client certificate")
    rekey = RekeyRequest.parse(await _body(request))
    now = _clock(request)
    key = rekey.csr.public_key()
    chain = await state.soon(
        lambda: authority.renew(peer, now, public_key=key)  # type: ignore[arg-type]
    )
    return _signed(authority, chain, request, "rekeyed")


async def _current_crl(
    state: _State, authority: Authority, now: datetime, *, fresh: bool = False
) -> StoredCRL:
    """The CRL to serve (``_crl.current_crl``): the stored one read on the event loop where
    that needs no wait; a new one made in a worker thread, one at a time, when it is due
    (those waiting for it then find it stored) or ``fresh`` is asked."""
    config, material, store = authority.config, authority.material, authority.store
    crl = config.crl
    assert crl is not None
    if not fresh:
        raw = await state.soon(lambda: store.get_state(CRL_STATE_KEY))
        if raw is not None:
            stored = StoredCRL.from_bytes(raw)
            if not renewal_due(stored, made_for(material, crl, idp_url(config, crl)), crl, now):
                return stored
    async with state.crl_making:
        return await state.off_loop(lambda: current_crl(store, config, material, now, fresh=fresh))


async def _crl(request: web.Request) -> web.Response:
    """The CRL (DER; PEM with ``?pem``) while ca.json's ``crl`` block enables it; else 404
    with step-ca's body (docs/protocol.md, "CRL")."""
    state = request.app[_STATE]
    authority = state.authority
    crl = authority.config.crl
    if crl is None or not crl.enabled:
        reason = "the crl block of ca.json does not enable CRLs"
        raise Refusal(404, reason, message=CRL_DISABLED_MESSAGE)
    current = await _current_crl(state, authority, _clock(request))
    answer = CRLResponse(current.der, current.next_update)
    pem = CRL_PEM_QUERY in request.query
    headers = answer.headers(pem)
    kind = headers.pop("Content-Type")
    return web.Response(body=answer.body(pem), headers=headers, content_type=kind)


async def _revoke(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    authority = state.authority
    revoke = RevokeRequest.parse(await _body(request))
    peer, now = _peer_certificate(request), _clock(request)
    # One write (the revocation, with its token), durable: always from a thread.
    await state.off_loop(lambda: authority.revoke(revoke, peer, now))
    log.info(
        "revoked serial=%r reason_code=%d (request %s)",
        revoke.serial,
        revoke.reason_code,
        _rid(request),
    )
    crl = authority.config.crl
    if crl is not None and crl.enabled and crl.generate_on_revoke:
        # As step-ca: the revocation's answer waits for the CRL that lists it.
        await _current_crl(state, authority, now, fresh=True)
    return _json(RevokeResponse().to_json())


def build_app(authority: Authority, clock: Clock = _now) -> web.Application:
    """The aiohttp application: every route under ``/`` and ``/1.0/``."""
    app = web.Application(
        middlewares=[_close_promptly, _request_id, _errors, _phases],
        client_max_size=MAX_BODY_BYTES,
    )
    state = _State(authority, clock)
    app[_STATE] = state

    async def close(_: web.Application) -> None:
        await state.close()

    app.on_cleanup.append(close)
    for prefix in ("", API_PREFIX):
        app.router.add_get(prefix + HEALTH_PATH, _health, allow_head=False)
        app.router.add_get(prefix + VERSION_PATH, _version, allow_head=False)
        app.router.add_get(prefix + ROOTS_PATH, _roots, allow_head=False)
        app.router.add_get(prefix + ROOTS_PEM_PATH, _roots_pem, allow_head=False)
        app.router.add_get(prefix + INTERMEDIATES_PATH, _intermediates, allow_head=False)
        app.router.add_get(prefix + INTERMEDIATES_PEM_PATH, _intermediates_pem, allow_head=False)
        app.router.add_get(prefix + FEDERATION_PATH, _federation, allow_head=False)
        app.router.add_get(prefix + FEDERATION_SOURCES_PATH, _federation_sources, allow_head=False)
        app.router.add_get(prefix + ROOT_PATH, _root, allow_head=False)
        app.router.add_get(prefix + BUNDLE_PATH, _spiffe_bundle, allow_head=False)
        app.router.add_get(prefix + PROVISIONERS_PATH, _provisioners, allow_head=False)
        app.router.add_get(prefix + ENCRYPTED_KEY_PATH, _encrypted_key, allow_head=False)
        app.router.add_get(prefix + CRL_PATH, _crl, allow_head=False)
        app.router.add_post(prefix + SIGN_PATH, _sign)
        app.router.add_post(prefix + RENEW_PATH, _renew)
        app.router.add_post(prefix + LEGACY_RENEW_PATH, _renew)
        app.router.add_post(prefix + REKEY_PATH, _rekey)
        app.router.add_post(prefix + REVOKE_PATH, _revoke)
    return app


def server_renewal_due(cert: x509.Certificate) -> datetime:
    """When the CA renews its own server certificate: at two thirds of its lifetime."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_before_utc + lifetime * 2 / 3


class CAServer:
    """A running federatls CA. Use ``async with CAServer.running(config, password) as ca``.

    ``database`` replaces ca.json's ``db`` block (``federatls ca serve --db``);
    ``purge_interval`` is the time between two runs of the purge of expired token ids."""

    def __init__(
        self,
        config_path: Path,
        password: bytes,
        *,
        host: str | None = None,
        port: int | None = None,
        clock: Clock = _now,
        limits: ConnectionLimits | None = None,
        sockets: list[socket.socket] | None = None,
        started_at: datetime | None = None,
        checkpoints: bool = True,
        database: Database | None = None,
        purge_interval: float = PURGE_INTERVAL,
    ) -> None:
        """``sockets``: listening sockets to serve on instead of binding ca.json's address
        (a worker's, from its supervisor); ``started_at``: when the CA started, for step-ca's
        "token issued before the CA started" rule (a worker's is its supervisor's);
        ``checkpoints``: whether this process runs the database's checkpoint thread (one
        worker does; the others leave checkpoints to SQLite)."""
        self.config_path = Path(config_path)
        self._password = password
        self._host = host
        self._port = port
        self._limits = limits  # None: ca.json's federatls.connections block
        self._sockets = sockets
        self._checkpoints = checkpoints
        self.reload_error = ""  # why the last reload failed ("" if it did not)
        self._database = database  # None: ca.json's db block
        self._purge_interval = purge_interval
        self._store: Store | None = None
        self._store_database: Database | None = None  # where _store is
        self.purge: TokenPurge | None = None
        self._authority: Authority | None = None
        self.peer_roots = PeerRoots()  # the federation peers' current roots, across reloads
        self.follower: Follower | None = None  # keeps peer_roots current (ca.json's peers)
        self._tls: ssl.SSLContext | None = None  # for new handshakes; replaced on renewal
        self._listener: Listener | None = None
        self._connections: ConnectionTable | None = None
        self._runner: web.AppRunner | None = None
        self._renewal: asyncio.Task[None] | None = None
        self.clock = clock
        self._started = started_at if started_at is not None else clock()
        self.address: tuple[str, int] = ("", 0)
        self.server_certificate: x509.Certificate | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        config_path: Path | str,
        password: bytes,
        *,
        host: str | None = None,
        port: int | None = None,
        clock: Clock = _now,
        limits: ConnectionLimits | None = None,
        database: Database | None = None,
        purge_interval: float = PURGE_INTERVAL,
    ) -> AsyncIterator[CAServer]:
        """Start the CA, yield it while it serves, stop it cleanly. ``limits`` replaces
        ca.json's ``federatls.connections`` block, ``database`` its ``db`` block."""
        server = cls(
            Path(config_path),
            password,
            host=host,
            port=port,
            clock=clock,
            limits=limits,
            database=database,
            purge_interval=purge_interval,
        )
        await server.start()
        try:
            yield server
        finally:
            await server.stop()

    @property
    def authority(self) -> Authority:
        if self._authority is None:
            raise RuntimeError("the CA is not started")
        return self._authority

    @property
    def url(self) -> str:
        host, port = self.address
        return f"https://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def root_fingerprint(self) -> str:
        return fingerprint(self.authority.roots()[0])

    def _load(self) -> Authority:
        config = CAConfig.load(self.config_path)
        material = load_material(config, self._password)
        database = self._database or config.database
        if self._store is None:
            # PostgreSQL: never creates tables; refuses a schema it does not know and an
            # unreachable server (ConfigError, one line). Expired token ids are purged while
            # the CA serves (TokenPurge), not here.
            interval = CHECKPOINT_INTERVAL if self._checkpoints else None
            self._store = open_store(database, checkpoint_interval=interval)
            self._store_database = database
        elif database != self._store_database:
            raise ConfigError("the database location cannot change on reload")
        if config.raw.get("insecureAddress"):
            log.warning("insecureAddress is not served by the federatls CA (no SSH or ACME)")
        return Authority(
            config, material, self._store, started_at=self._started, peer_roots=self.peer_roots
        )

    def _new_context(self, authority: Authority) -> ssl.SSLContext:
        material = authority.material
        names = list(authority.config.dns_names)
        if authority.config.spiffe_trust_domain is not None:  # an https_spiffe endpoint too
            names.append(ca_spiffe_id(authority.config.spiffe_trust_domain))
        cert, key = server_certificate(material, names, _now())
        self.server_certificate = cert
        return build_server_context(
            chain=[cert, *material.intermediates],
            key=key,
            client_cas=[*material.roots, *material.intermediates],
            tls_options=authority.config.tls_options,
        )

    async def start(self) -> None:
        """Load ca.json, open the store, bind the address and serve. On failure the store
        is closed again (a PostgreSQL pool holds connections)."""
        try:
            await self._start()
        except BaseException:
            if self.follower is not None:
                await self.follower.stop()
                self.follower = None
            if self._store is not None:
                self._store.close()
                self._store = None
            raise

    async def _start(self) -> None:
        self._authority = self._load()
        config = self._authority.config
        assert self._store is not None
        # The peers' last good roots are loaded before the first request is answered.
        self.follower = Follower(self._store, self.peer_roots, self.clock)
        await self.follower.start(config.federation)
        host, port = split_address(config.address)
        host = self._host if self._host is not None else host
        port = self._port if self._port is not None else port
        self._tls = self._new_context(self._authority)
        limits = self._connection_limits(config)
        table = self._connections = ConnectionTable(
            limits, connection_limit(limits.max_connections)
        )
        self._runner = web.AppRunner(
            build_app(self._authority, self.clock),
            access_log=None,
            logger=_HTTPLog(table),
            handle_signals=False,
            # step-ca (Go) allows 1 MB of headers; a renew token header holds a chain.
            max_line_size=MAX_BODY_BYTES,
            max_field_size=MAX_BODY_BYTES,
            # A body is read as the bytes sent, as Go's server reads it: aiohttp would inflate
            # a Content-Encoding (a 16 KB gzip bomb is 16 MB of work, drained even after the
            # 413) and answer a body that does not inflate with a 500 and a traceback.
            auto_decompress=False,
        )
        await self._runner.setup()
        handlers = self._runner.server
        assert handlers is not None

        def accept() -> TLSServerConnection:
            return TLSServerConnection(handlers, self._current_tls, table)

        try:
            if self._sockets is not None:
                self._listener = Listener.serving(self._sockets, accept, table)
            else:
                self._listener = Listener.bind(host or None, port, accept, table)
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"cannot listen on {config.address}: {exc.strerror}") from exc
        table.start()
        bound = self._listener.sockets[0].getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        self._renewal = asyncio.create_task(self._renew_server_certificate())
        assert self._store is not None
        self.purge = TokenPurge(self._store, self.clock, interval=self._purge_interval)
        self.purge.start()
        log.info(
            "serving HTTPS on %s (root %s, at most %d connections)",
            self.url,
            self.root_fingerprint,
            table.max_connections,
            extra={READY_RECORD: True},
        )

    def _connection_limits(self, config: CAConfig) -> ConnectionLimits:
        return self._limits if self._limits is not None else config.limits

    def reload(self) -> bool:
        """Re-read ca.json and its files (SIGHUP). On error the old configuration stays."""
        try:
            authority = self._load()
            ctx = self._new_context(authority)
            limits = self._connection_limits(authority.config)
            max_connections = connection_limit(limits.max_connections)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.reload_error = str(exc)
            return False
        self.reload_error = ""
        assert self._runner is not None
        assert self._connections is not None
        self._connections.configure(limits, max_connections)
        self._runner.app[_STATE].authority = authority
        self._authority = authority
        self._tls = ctx
        if self.follower is not None:
            self.follower.reconfigure(authority.config.federation)
        log.info(
            "configuration reloaded from %s: %d root(s), %d federated root(s), %d peer(s)",
            self.config_path,
            len(authority.roots()),
            len(authority.material.federated_roots),
            len(authority.config.federation.peers),
        )
        return True

    def _current_tls(self) -> ssl.SSLContext:
        assert self._tls is not None
        return self._tls

    def renew_server_certificate(self) -> x509.Certificate:
        """Issue the CA a new server certificate; new handshakes use it at once."""
        self._tls = self._new_context(self.authority)
        assert self.server_certificate is not None
        log.info(
            "renewed the CA's own server certificate (serial %d)",
            self.server_certificate.serial_number,
        )
        return self.server_certificate

    async def _renew_server_certificate(self) -> None:
        # Wake at least once a minute: the wall clock may jump (suspend, NTP).
        while True:
            assert self.server_certificate is not None
            due = server_renewal_due(self.server_certificate)
            await asyncio.sleep(min(max((due - _now()).total_seconds(), 1.0), 60.0))
            if _now() >= due:
                try:
                    self.renew_server_certificate()
                except Exception:
                    log.exception("could not renew the CA's server certificate; retrying")
                    await asyncio.sleep(10)

    async def stop(self) -> None:
        """Stop serving, let running requests finish, close the store."""
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None
        if self.purge is not None:
            await self.purge.stop()
            self.purge = None
        if self.follower is not None:
            await self.follower.stop()
            self.follower = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._connections is not None:
            self._connections.stop()
            # Connections whose request has not fully arrived will never be answered (the
            # HTTP server reads nothing more once it shuts down): closed now, not left to
            # hold the stop until its grace runs out. Requests being answered finish.
            for phase in _UNANSWERED:
                for connection in self._connections.in_phase(phase):
                    connection.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._store is not None:
            self._store.close()
            self._store = None


class Serving(Protocol):
    """What ``serve`` hands its ``ready`` callback once the CA serves: the ``CAServer``, or
    with worker processes their supervisor's account of them."""

    @property
    def url(self) -> str: ...

    @property
    def root_fingerprint(self) -> str: ...


async def serve(
    config_path: Path | str,
    password: bytes,
    ready: Callable[[Serving], None] | None = None,
    *,
    workers: int = 1,
    database: Database | None = None,
) -> None:
    """Run a CA until SIGTERM or SIGINT; SIGHUP reloads ca.json. ``database`` replaces
    ca.json's ``db`` block. With ``workers`` above 1, that many processes share the port
    and the store (docs/ca.md, "Worker processes")."""
    if workers != 1:
        from ._workers import supervise

        await supervise(config_path, password, workers, ready, database=database)
        return
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with CAServer.running(config_path, password, database=database) as ca:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, ca.reload)
        if ready is not None:
            ready(ca)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("stopping")
