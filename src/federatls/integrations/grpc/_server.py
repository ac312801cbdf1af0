"""gRPC servers (sync ``grpc.server`` and ``grpc.aio.server``) with mutual TLS from a federatls
identity: credentials that follow renewal, and an interceptor that authorises every call.

gRPC runs its own TLS (not Python's ``ssl``), so the one mechanism of the other integrations
(the check in the context's handshake) cannot reach it. Here instead:

* ``server_credentials``: ``grpc.dynamic_ssl_server_credentials``, whose fetcher gRPC calls
  before every new connection's handshake; it hands gRPC a new configuration (the newest
  snapshot's chain, its key as PEM bytes in memory, the roots trusted now) only when the
  snapshot changed (when the fetcher raises, gRPC keeps the previous one). Client
  certificates are required. A connection keeps the certificate it was opened with; new
  connections get the new one. gRPC issues TLS session tickets and resumes sessions (not
  configurable from Python), but each new configuration gets new TLS contexts, whose
  handshakes accept no ticket from before: no session outlives a change of roots.
* ``Interceptor`` / ``AioInterceptor``: before the handler runs, the client's certificates
  are read from ``context.auth_context()`` (``x509_pem_cert``, the leaf, and
  ``x509_pem_cert_chain``, what the client sent besides) and its chain rebuilt up to a root
  of the bundle trusted *now* (``peer_from_chain``), so a connection opened before a root was
  dropped cannot go on calling, nor one whose certificate has expired since (a connection, or
  a resumed TLS session, outlives the handshake's check of validity); then the bundle's name
  rules, then the authoriser (one that raises anything else than ``PeerNotAuthorisedError``
  refuses too). A refusal
  aborts the call with ``PERMISSION_DENIED`` (logged once on ``federatls.peer``); the handler
  is never called. Every call shape is covered (unary and streaming, both ways). The
  verdict is remembered per presented certificates and snapshot, so a client calling many
  times costs one chain walk and one authoriser call, as a handshake does elsewhere.

Without the interceptor nothing checks the name rules or the authoriser: gRPC's handshake
only verifies the chain against the bundle. A connection open across a renewal keeps the
server's old certificate until it closes (HTTP/2 connections can live long: gRPC's
``grpc.max_connection_age_ms`` server option bounds that); its calls are still checked
against the roots trusted now.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio

try:  # gRPC's extension module: see _presented
    from grpc._cython import cygrpc as _cygrpc
except ImportError:  # pragma: no cover - depends on gRPC's build
    _cygrpc = None

from ..._authorise import Authoriser, apply_authoriser
from ..._errors import BadMaterialError, ConfigError, PeerNotAuthorisedError
from ..._identity import Identity, TrustChoice
from ..._namerules import NameRules
from ..._peer import PeerInfo, grpc_presented_pem, peer_from_chain, presented_certificates
from ..._trust import TrustBundle
from .._source import Source, check_common, snapshot

__all__ = ["AioInterceptor", "Interceptor", "peer", "server_credentials"]

log = logging.getLogger("federatls.peer")
log_credentials = logging.getLogger("federatls")


def _bundle(identity: Identity, trust: TrustChoice) -> TrustBundle:
    if trust == "federation":
        return identity.trust
    if trust == "own":
        return identity.own_roots
    raise ConfigError(f"trust must be 'federation' or 'own', not {trust!r}")


def _configuration(identity: Identity, trust: TrustChoice) -> Any:
    """gRPC's certificate configuration for ``identity``: its chain, its key as PEM bytes
    (in memory, never a file), and the client roots it trusts."""
    return grpc.ssl_server_certificate_configuration(
        [(identity.export_private_key(password=None), identity.chain_pem.encode())],
        root_certificates=_bundle(identity, trust).pem.encode(),
    )


class _Fetcher:
    """gRPC's certificate configuration fetcher: called before every new connection's
    handshake (on a gRPC thread); a new configuration only when the snapshot changed."""

    def __init__(self, source: Source, trust: TrustChoice, first: Identity) -> None:
        self._source = source
        self._trust = trust
        self._lock = threading.Lock()
        self._served = first
        self._failed: Identity | None = None

    def __call__(self) -> Any:
        identity = snapshot(self._source)
        with self._lock:
            if identity is self._served or identity is self._failed:
                return None
            try:
                configuration = _configuration(identity, self._trust)
            except Exception:  # gRPC would log it at each connection: say it once, ourselves
                self._failed = identity
                log_credentials.exception(
                    "gRPC server: cannot hand over the renewed identity %s; new connections "
                    "keep the previous one",
                    identity,
                )
                return None
            self._served = identity
            return configuration


def server_credentials(source: Source, *, trust: TrustChoice = "federation") -> Any:
    """``grpc.ServerCredentials`` for ``server.add_secure_port``: the source's newest
    certificate, and client certificates required and verified against the federation bundle
    (or only the own CA's roots with ``trust="own"``) trusted now, for every new connection.

    Pass ``Interceptor`` (or ``AioInterceptor``) to the server too: the credentials check the
    chain only; the name rules, the authoriser and the re-check against the current roots
    are the interceptor's."""
    check_common("federatls.integrations.grpc.server_credentials", source, trust, None)
    first = snapshot(source)
    return grpc.dynamic_ssl_server_credentials(
        _configuration(first, trust),
        _Fetcher(source, trust, first),
        require_client_authentication=True,
    )


# Checking calls -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Verdict:
    """The outcome of checking a client: its PeerInfo, or what refused it and why."""

    peer: PeerInfo | None
    by: str = ""  # "trust bundle", "name rules", "authoriser" or "validity"
    refusal: Exception | None = None
    expires: float = 0.0  # POSIX time the first certificate of the peer's chain expires at


class _Checker:
    """What both interceptors share: the check of a call's client.

    Verdicts are remembered per presented certificates and bundle (the snapshot's, by
    identity), so a client calling many times over one connection costs one chain walk and
    one authoriser call, as a handshake does elsewhere; a new snapshot (renewal, new trust)
    checks every client again. Authorisers are pure (``federatls._authorise``)."""

    _CACHE_SIZE = 256

    def __init__(
        self, where: str, source: Source, authoriser: Authoriser | None, trust: TrustChoice
    ) -> None:
        check_common(where, source, trust, authoriser)
        self._source = source
        self._authoriser = authoriser
        self._trust = trust
        self._lock = threading.Lock()
        # The end of the presented leaf -> (snapshot, what was presented, verdict)
        self._verdicts: dict[bytes, tuple[Identity, tuple[bytes, bytes], _Verdict]] = {}

    def _judge(self, leaf: bytes, rest: bytes, identity: Identity) -> _Verdict:
        """The verdict on the client presenting ``leaf`` and ``rest`` (PEM) under
        ``identity``'s bundle and name rules, and then the authoriser."""
        bundle = _bundle(identity, self._trust)
        by = "trust bundle"
        try:
            info = peer_from_chain(presented_certificates(leaf, rest), bundle)
            rules = NameRules.of(bundle) if identity.name_rules else None
            if rules is not None:
                by = "name rules"
                rules.authorise(info)
            if self._authoriser is not None:
                by = "authoriser"
                apply_authoriser(self._authoriser, info)
        except (BadMaterialError, PeerNotAuthorisedError) as exc:
            return _Verdict(None, by, exc)
        return _Verdict(info, expires=min(c.not_valid_after_utc for c in info.chain).timestamp())

    def admit(self, context: Any, method: str) -> PeerInfo:
        """The client of the call behind a sync handler's ``context``, or the call aborted
        with ``PERMISSION_DENIED``. Every call of a sync server starts here, and there every
        microsecond held under the GIL costs several in calls per second, so a client
        admitted before under the same snapshot costs one frame: the call's certificates
        read raw (see ``_presented``), one look-up, and comparisons. Anything else (a first
        call, a refusal, a grpc.aio context, a gRPC whose internals differ) is ``check``'s."""
        try:
            auth = _cygrpc.auth_context(context._rpc_event.call)
            leaf = auth[b"x509_pem_cert"]
        except (AttributeError, KeyError, TypeError):
            pass
        else:
            presented = (b"".join(leaf), b"".join(auth.get(b"x509_pem_cert_chain", ())))
            hit = self._verdicts.get(presented[0][-64:])
            if hit is not None and hit[1] == presented and hit[0] is snapshot(self._source):
                admitted = hit[2].peer
                if admitted is not None and hit[2].expires >= time.time():
                    return admitted
        verdict = self.check(context, method)
        if verdict.peer is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, _details(verdict))
            raise AssertionError("grpc's abort returned")  # pragma: no cover
        return verdict.peer

    def check(self, context: Any, method: str) -> _Verdict:
        """The verdict on the client of the call to ``method`` behind ``context``; a
        refusal is logged here, once per call. A client admitted before costs reading its
        certificates, one dictionary look-up (no lock: a dict's get is atomic) and a clock
        read (on a sync server, ``admit`` does that much without coming here)."""
        identity = snapshot(self._source)
        presented = _presented(context)
        # Looked up by the leaf's last bytes (its signature: hashing 64 bytes, not the
        # whole chain), used only if what was presented is the same, byte for byte.
        hit = self._verdicts.get(presented[0][-64:])
        if hit is not None and hit[0] is identity and hit[1] == presented:
            verdict = hit[2]
            if verdict.peer is not None and verdict.expires >= time.time():
                return verdict  # admitted, as before
        else:
            verdict = self._judge(*presented, identity)
            with self._lock:
                if len(self._verdicts) >= self._CACHE_SIZE:
                    self._verdicts.pop(next(iter(self._verdicts)))
                self._verdicts[presented[0][-64:]] = (identity, presented, verdict)
        if verdict.peer is not None and verdict.expires < time.time():
            verdict = _expired(verdict)
        if verdict.peer is None:
            who, why = context.peer(), verdict.refusal
            log.warning("refused the gRPC call %s from %s (%s): %s", method, who, verdict.by, why)
        return verdict


# Whether this gRPC's extension module has the function _presented reads properties with.
_RAW_READ = _cygrpc is not None and hasattr(_cygrpc, "auth_context")


def _raw_call(context: Any) -> Any:
    """The gRPC core call behind a sync server's ``context``, or None (grpc.aio's contexts,
    or a gRPC whose internals differ)."""
    if not _RAW_READ:
        return None
    return getattr(getattr(context, "_rpc_event", None), "call", None)


def _presented(context: Any) -> tuple[bytes, bytes]:
    """``grpc_presented_pem(context)``, read faster on a sync server: its public
    ``auth_context()`` decodes each of a dozen property names in Python at every call, about
    a tenth of a small call's server time under load (bench/grpc_calls.py), so the call's
    raw properties are read instead. When they do not hold the shape known here (no leaf
    under ``b"x509_pem_cert"``: a client without a certificate, or another gRPC), the
    public way decides, so a change in gRPC can cost speed but never admit anyone."""
    call = _raw_call(context)
    if call is not None:
        auth = _cygrpc.auth_context(call)
        leaf = auth.get(b"x509_pem_cert") if auth else None
        if leaf:
            rest = auth.get(b"x509_pem_cert_chain")
            return b"".join(leaf), b"".join(rest) if rest else b""
    return grpc_presented_pem(context)


def _expired(verdict: _Verdict) -> _Verdict:
    """The refusal of ``verdict``'s peer, a certificate of whose chain has expired since its
    handshake: the handshake checked validity, but an HTTP/2 connection outlives it, and
    gRPC resumes TLS sessions (no certificate check) for as long as the server's
    configuration lasts."""
    assert verdict.peer is not None
    cert = min(verdict.peer.chain, key=lambda c: c.not_valid_after_utc)
    why = f"{cert.subject.rfc4514_string()!r} expired at {cert.not_valid_after_utc}"
    return _Verdict(None, "validity", PeerNotAuthorisedError(f"the client's {why}"))


# The PeerInfo of each call running now, keyed by its context: set before the handler runs,
# dropped when it returns (or its response stream ends).
_PEERS: dict[int, PeerInfo] = {}


def peer(context: Any) -> PeerInfo:
    """The verified client of the call a handler is serving (``context``: the handler's
    ``grpc.ServicerContext`` or ``grpc.aio.ServicerContext``), as ``live.peer(x)`` gives it
    elsewhere: anchored in the bundle trusted when the call began. ``BadMaterialError`` when
    the call was not admitted by a federatls interceptor (none on the server, or asked after
    the handler returned)."""
    found = _PEERS.get(id(context))
    if found is None:
        raise BadMaterialError(
            "no federatls peer for this gRPC call: serve with interceptors=[Interceptor(...)] "
            "(grpc.aio: AioInterceptor) and ask from inside the handler"
        )
    return found


_MAKERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _kind(handler: Any) -> str:
    """Which of the four call shapes ``handler`` (a ``grpc.RpcMethodHandler``) serves."""
    return ("stream_" if handler.request_streaming else "unary_") + (
        "stream" if handler.response_streaming else "unary"
    )


def _rebuilt(handler: Any, kind: str, behaviour: Callable[[Any, Any], Any]) -> Any:
    """``handler`` serving ``behaviour`` instead (its (de)serialisers kept)."""
    return _MAKERS[kind](
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _details(verdict: _Verdict) -> str:
    """The refused call's status details: who refused it, and why."""
    return f"federatls {verdict.by}: {verdict.refusal}"


def _unknown(request: Any, context: Any) -> None:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")  # gRPC's own words


async def _unknown_async(request: Any, context: Any) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


# A method no handler serves: the client is checked first, so one that is refused learns
# nothing of which methods exist (PERMISSION_DENIED for all).
_UNKNOWN = grpc.unary_unary_rpc_method_handler(_unknown)
_UNKNOWN_ASYNC = grpc.unary_unary_rpc_method_handler(_unknown_async)


async def _refuse(context: Any, verdict: _Verdict) -> NoReturn:
    """Abort an async handler's call refused by ``verdict`` with ``PERMISSION_DENIED``."""
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, _details(verdict))
    raise AssertionError("grpc's abort returned")  # pragma: no cover


def _checked(checker: _Checker, handler: Any, method: str) -> Any:
    """``handler`` with its (sync) behaviour run only for a client ``checker`` admits."""
    kind = _kind(handler)
    behaviour = getattr(handler, kind)
    admit = checker.admit

    def call(request: Any, context: Any) -> Any:
        key = id(context)
        _PEERS[key] = admit(context, method)
        try:
            return behaviour(request, context)
        finally:
            _PEERS.pop(key, None)

    def stream(request: Any, context: Any) -> Iterator[Any]:
        # The check runs when gRPC first asks for a response, before ``behaviour``.
        _PEERS[id(context)] = admit(context, method)
        try:
            yield from behaviour(request, context)
        finally:
            _PEERS.pop(id(context), None)

    return _rebuilt(handler, kind, stream if handler.response_streaming else call)


def _checked_async(checker: _Checker, handler: Any, method: str) -> Any:
    """``handler`` with its behaviour (a coroutine or async generator function; a sync one
    runs on grpc.aio's migration thread pool, checked as on a sync server) run only for a
    client ``checker`` admits."""
    kind = _kind(handler)
    behaviour = getattr(handler, kind)

    # The check itself does not wait: only a refusal's abort is awaited, so an admitted
    # call costs no coroutine more than its handler.
    async def call(request: Any, context: Any) -> Any:
        verdict = checker.check(context, method)
        if verdict.peer is None:
            await _refuse(context, verdict)
        _PEERS[id(context)] = verdict.peer
        try:
            return await behaviour(request, context)
        finally:
            _PEERS.pop(id(context), None)

    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        verdict = checker.check(context, method)
        if verdict.peer is None:
            await _refuse(context, verdict)
        _PEERS[id(context)] = verdict.peer
        try:
            async for item in behaviour(request, context):
                yield item
        finally:
            _PEERS.pop(id(context), None)

    if inspect.isasyncgenfunction(behaviour):
        return _rebuilt(handler, kind, stream)
    if inspect.iscoroutinefunction(behaviour):
        return _rebuilt(handler, kind, call)
    return _checked(checker, handler, method)


def _in_event_loop() -> bool:
    """Whether this runs in an event loop: a ``grpc.aio`` server calls its interceptors
    there, a sync ``grpc.server`` on a thread of its own (``_get_running_loop`` answers
    without raising, on a path a sync server takes for every call)."""
    return asyncio._get_running_loop() is not None


class _Wrapped:
    """The checked handlers made so far, per method and handler: servers hand out the same
    handler object for a method at every call, so its checked twin is made once, not at each
    call. Bounded (a generic handler may make new handler objects per call); the handler for
    unknown methods is not kept (any name may be asked for)."""

    _SIZE = 1024

    def __init__(self, checker: _Checker, wrap: Callable[[_Checker, Any, str], Any]) -> None:
        self._checker = checker
        self._wrap = wrap
        self._lock = threading.Lock()
        # (method, id(handler)) -> (handler, checked handler); the handler is kept so its id
        # cannot be reused by another object while the entry lives.
        self._made: dict[tuple[str, int], tuple[Any, Any]] = {}

    def __call__(self, handler: Any, method: str) -> Any:
        key = (method, id(handler))
        made = self._made.get(key)
        if made is not None and made[0] is handler:
            return made[1]
        checked = self._wrap(self._checker, handler, method)
        with self._lock:
            if len(self._made) >= self._SIZE:
                self._made.pop(next(iter(self._made)))
            self._made[key] = (handler, checked)
        return checked


async def _intercept_async(
    wrapped: _Wrapped, continuation: Callable[[Any], Any], details: Any
) -> Any:
    handler = await continuation(details)
    if handler is None:
        return _checked_async(wrapped._checker, _UNKNOWN_ASYNC, details.method)
    return wrapped(handler, details.method)


class Interceptor(grpc.ServerInterceptor, grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """For ``grpc.server(..., interceptors=[Interceptor(source, authoriser=...)])``: every
    call's client is checked (chain against the bundle trusted now, name rules, then
    ``authoriser``) before its handler runs; a refused call ends with ``PERMISSION_DENIED``
    and its handler is never called. ``trust``: as given to ``server_credentials``. List it
    first among the server's interceptors, so its check runs before their wrappers do.

    It serves ``grpc.aio.server`` as well (as ``AioInterceptor`` serves ``grpc.server``):
    the two differ only in name, so taking the other flavour's by mistake still checks
    every call (grpc ships no types: the classes are ``Any`` to mypy)."""

    _where = "federatls.integrations.grpc.Interceptor"

    def __init__(
        self,
        source: Source,
        *,
        authoriser: Authoriser | None = None,
        trust: TrustChoice = "federation",
    ) -> None:
        self._checker = _Checker(self._where, source, authoriser, trust)
        self._sync = _Wrapped(self._checker, _checked)
        self._async = _Wrapped(self._checker, _checked_async)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        if _in_event_loop():  # grpc.aio.server: it awaits the coroutine returned
            return _intercept_async(self._async, continuation, details)
        handler = continuation(details)
        if handler is None:
            return _checked(self._checker, _UNKNOWN, details.method)
        return self._sync(handler, details.method)


class AioInterceptor(Interceptor):
    """``Interceptor`` for ``grpc.aio.server(interceptors=[AioInterceptor(source, ...)])``:
    async handlers (coroutines, async generators) and sync ones (on the server's
    ``migration_thread_pool``) alike."""

    _where = "federatls.integrations.grpc.aio.Interceptor"
