"""The federatls CA's HTTPS server: step-ca's routes (PROTOCOL.md §2, without SSH) under ``/``
and ``/1.0/``, step-ca's status codes and JSON bodies, the CA's own server certificate renewed
before it expires, SIGHUP to reload ca.json, SIGTERM/SIGINT to stop cleanly.

The HTTP layer only translates: bodies are parsed by ``_protocol``, decisions are taken by
``Authority``, refusals are logged here with their specific reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from .._errors import ConfigError
from .._protocol import (
    API_PREFIX,
    MAX_BODY_BYTES,
    ErrorBody,
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
)
from .._x509 import certs_to_pem, fingerprint
from ._authority import Authority, Issuance, Refusal
from ._config import CAConfig, split_address
from ._issuer import server_certificate
from ._material import load_material
from ._store import SQLiteStore
from ._tls import build_server_context
from ._tlsconn import TLSServerConnection

__all__ = ["CAServer", "serve"]

log = logging.getLogger("federatls.ca")
CHECKPOINT_INTERVAL = 0.1  # seconds between checkpoints of the database's write-ahead log
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


Clock = Callable[[], datetime]


class _GroupCommit:
    """Signed certificates waiting to be recorded are committed together: everything that
    arrives within one turn of the event loop goes into one transaction, so a busy CA pays
    one fsync for many certificates instead of one each."""

    def __init__(self) -> None:
        self._pending: list[tuple[Authority, Issuance, asyncio.Future[bool]]] = []

    async def commit(self, authority: Authority, issuance: Issuance) -> None:
        """Record ``issuance``; a 401 ``Refusal`` if its token was spent meanwhile."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((authority, issuance, done))
        if not await done:
            raise Refusal(401, "token already used")

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        authority = batch[-1][0]  # all share one store, whichever reload made them
        try:
            results = authority.commit([issuance for _, issuance, _ in batch])
        except Exception as exc:
            for _, _, done in batch:
                if not done.done():  # a handler cancelled meanwhile (client gone)
                    done.set_exception(exc)
            return
        for (_, _, done), fresh in zip(batch, results, strict=True):
            if not done.done():
                done.set_result(fresh)


class _State:
    """What requests use: the authority (a reload replaces it for the requests that follow),
    the clock (tests pass a fake one) and the group committer."""

    def __init__(self, authority: Authority, clock: Clock) -> None:
        self.authority = authority
        self.clock = clock
        self.committer = _GroupCommit()


_STATE = web.AppKey("state", _State)


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
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes step-ca's JSON error body; the specific reason goes to the log."""
    where = f"{request.method} {request.path}"
    try:
        return await handler(request)
    except Refusal as refusal:
        log.warning("refused %r: %d %r", where, refusal.status, refusal.reason)
        return _json(refusal.body.to_json(), refusal.status)
    except ProtocolError as exc:
        log.warning("refused %r: %d %r", where, exc.status, exc.reason)
        return _json(ErrorBody.for_status(exc.status, exc.reason).to_json(), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        log.warning("refused %r: %d %r", where, exc.status, exc.reason)
        return _json(ErrorBody.for_status(exc.status).to_json(), exc.status)
    except Exception:
        log.exception("internal error on %r", where)
        return _json(ErrorBody.for_status(500).to_json(), 500)


def _authority(request: web.Request) -> Authority:
    return request.app[_STATE].authority


def _clock(request: web.Request) -> datetime:
    return request.app[_STATE].clock()


async def _health(request: web.Request) -> web.Response:
    return _json(HealthResponse().to_json())


async def _version(request: web.Request) -> web.Response:
    return _json(VersionResponse(_authority(request).version()).to_json())


async def _roots(request: web.Request) -> web.Response:
    return _json(RootsResponse(_authority(request).roots()).to_json(), 201)


async def _roots_pem(request: web.Request) -> web.Response:
    body = certs_to_pem(_authority(request).roots())
    return web.Response(text=body, content_type="application/x-pem-file")


async def _federation(request: web.Request) -> web.Response:
    return _json(RootsResponse(_authority(request).federation()).to_json(), 201)


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
    asyncio.get_running_loop().call_soon(_log_signed, what, request.path, chain[0])
    body = SignResponse(tuple(chain), authority.config.tls_options).to_json()
    return _json(body, 201)


def _log_signed(what: str, path: str, leaf: x509.Certificate) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(
            "%s %s: serial=%d subject=%r not_after=%s",
            what,
            path,
            leaf.serial_number,
            leaf.subject.rfc4514_string(),
            leaf.not_valid_after_utc.isoformat(),
        )


async def _sign(request: web.Request) -> web.Response:
    authority = _authority(request)
    sign = SignRequest.parse(await _body(request))
    issuance = authority.prepare_sign(sign, _clock(request))
    await request.app[_STATE].committer.commit(authority, issuance)
    return _signed(authority, list(issuance.chain), request, "signed")


async def _renew(request: web.Request) -> web.Response:
    authority = _authority(request)
    peer = _peer_certificate(request)
    now = _clock(request)
    if peer is None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise Refusal(400, "missing client certificate")
        peer = authority.authorize_renew_token(auth[len("Bearer ") :], now)
    return _signed(authority, authority.renew(peer, now), request, "renewed")


async def _rekey(request: web.Request) -> web.Response:
    authority = _authority(request)
    peer = _peer_certificate(request)
    if peer is None:
        raise Refusal(400, "missing client certificate")
    rekey = RekeyRequest.parse(await _body(request))
    chain = authority.renew(peer, _clock(request), public_key=rekey.csr.public_key())  # type: ignore[arg-type]
    return _signed(authority, chain, request, "rekeyed")


async def _revoke(request: web.Request) -> web.Response:
    authority = _authority(request)
    revoke = RevokeRequest.parse(await _body(request))
    authority.revoke(revoke, _peer_certificate(request), _clock(request))
    log.info("revoked serial=%r reason_code=%d", revoke.serial, revoke.reason_code)
    return _json(RevokeResponse().to_json())


def build_app(authority: Authority, clock: Clock = _now) -> web.Application:
    """The aiohttp application: every route under ``/`` and ``/1.0/``."""
    app = web.Application(middlewares=[_close_promptly, _errors], client_max_size=MAX_BODY_BYTES)
    app[_STATE] = _State(authority, clock)
    for prefix in ("", API_PREFIX):
        app.router.add_get(prefix + "/health", _health, allow_head=False)
        app.router.add_get(prefix + "/version", _version, allow_head=False)
        app.router.add_get(prefix + "/roots", _roots, allow_head=False)
        app.router.add_get(prefix + "/roots.pem", _roots_pem, allow_head=False)
        app.router.add_get(prefix + "/federation", _federation, allow_head=False)
        app.router.add_get(prefix + "/root/{sha}", _root, allow_head=False)
        app.router.add_get(prefix + "/provisioners", _provisioners, allow_head=False)
        app.router.add_get(
            prefix + "/provisioners/{kid}/encrypted-key", _encrypted_key, allow_head=False
        )
        app.router.add_post(prefix + "/sign", _sign)
        app.router.add_post(prefix + "/renew", _renew)
        app.router.add_post(prefix + "/re-sign", _renew)
        app.router.add_post(prefix + "/rekey", _rekey)
        app.router.add_post(prefix + "/revoke", _revoke)
    return app


def server_renewal_due(cert: x509.Certificate) -> datetime:
    """When the CA renews its own server certificate: at two thirds of its lifetime."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_before_utc + lifetime * 2 / 3


class CAServer:
    """A running federatls CA. Use ``async with CAServer.running(config, password) as ca``."""

    def __init__(
        self,
        config_path: Path,
        password: bytes,
        *,
        host: str | None = None,
        port: int | None = None,
        clock: Clock = _now,
    ) -> None:
        self.config_path = Path(config_path)
        self._password = password
        self._host = host
        self._port = port
        self._store: SQLiteStore | None = None
        self._authority: Authority | None = None
        self._tls: ssl.SSLContext | None = None  # for new handshakes; replaced on renewal
        self._listener: asyncio.Server | None = None
        self._handshakes: set[TLSServerConnection] = set()
        self._runner: web.AppRunner | None = None
        self._renewal: asyncio.Task[None] | None = None
        self.clock = clock
        self._started = clock()
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
    ) -> AsyncIterator[CAServer]:
        """Start the CA, yield it while it serves, stop it cleanly."""
        server = cls(Path(config_path), password, host=host, port=port, clock=clock)
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
        if self._store is None:
            self._store = SQLiteStore(config.store_path, checkpoint_interval=CHECKPOINT_INTERVAL)
            self._store.prune(self.clock())
        elif self._store.path != config.store_path:
            raise ConfigError("the database location cannot change on reload")
        if config.raw.get("insecureAddress"):
            log.warning("insecureAddress is not served by the federatls CA (no SSH or ACME)")
        return Authority(config, material, self._store, started_at=self._started)

    def _new_context(self, authority: Authority) -> ssl.SSLContext:
        material = authority.material
        cert, key = server_certificate(material, authority.config.dns_names, _now())
        self.server_certificate = cert
        return build_server_context(
            chain=[cert, *material.intermediates],
            key=key,
            client_cas=[*material.roots, *material.intermediates],
            tls_options=authority.config.tls_options,
        )

    async def start(self) -> None:
        """Load ca.json, open the store, bind the address and serve."""
        self._authority = self._load()
        config = self._authority.config
        host, port = split_address(config.address)
        host = self._host if self._host is not None else host
        port = self._port if self._port is not None else port
        self._tls = self._new_context(self._authority)
        self._runner = web.AppRunner(
            build_app(self._authority, self.clock),
            access_log=None,
            handle_signals=False,
            # step-ca (Go) allows 1 MB of headers; a renew token header holds a chain.
            max_line_size=MAX_BODY_BYTES,
            max_field_size=MAX_BODY_BYTES,
        )
        await self._runner.setup()
        handlers = self._runner.server
        assert handlers is not None

        def accept() -> TLSServerConnection:
            return TLSServerConnection(handlers, self._current_tls, self._handshakes)

        try:
            self._listener = await asyncio.get_running_loop().create_server(
                accept, host or None, port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"cannot listen on {config.address}: {exc.strerror}") from exc
        bound = self._listener.sockets[0].getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        self._renewal = asyncio.create_task(self._renew_server_certificate())
        log.info("serving HTTPS on %s (root %s)", self.url, self.root_fingerprint)

    def reload(self) -> bool:
        """Re-read ca.json and its files (SIGHUP). On error the old configuration stays."""
        try:
            authority = self._load()
            ctx = self._new_context(authority)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        assert self._runner is not None
        self._runner.app[_STATE].authority = authority
        self._authority = authority
        self._tls = ctx
        log.info(
            "configuration reloaded from %s: %d root(s), %d federated root(s)",
            self.config_path,
            len(authority.roots()),
            len(authority.material.federated_roots),
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
        if self._listener is not None:
            self._listener.close()
            for connection in list(self._handshakes):
                connection.abort()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._store is not None:
            self._store.close()
            self._store = None


async def serve(
    config_path: Path | str,
    password: bytes,
    ready: Callable[[CAServer], None] | None = None,
) -> None:
    """Run a CA until SIGTERM or SIGINT; SIGHUP reloads ca.json."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with CAServer.running(config_path, password) as ca:
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
