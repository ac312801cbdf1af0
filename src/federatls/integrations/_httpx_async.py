"""federatls's httpx ``AsyncClient`` and its transport (documented in ``integrations.httpx``).

Written once: this module is the source, and ``_httpx_sync`` (``Client``) is generated from
it by scripts/unasync.py (``async``/``await`` dropped, ``aclose`` to ``close``, ``Async*``
names to their sync twins); tests/test_httpx_generated.py fails when the two differ. Edit
this module, then run ``python scripts/unasync.py``. What does not await lives in
``_httpx_shared``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpcore
import httpx

from .._authorise import Authoriser
from .._identity import Identity, TrustChoice
from .._netstream import ClosingBackend
from ._httpx_shared import alpn, arguments, core_request, httpx_errors, pool_limits, require_https
from ._source import Slot, Source, Swapping, check_common, client_context

__all__ = ["AsyncClient"]

_Pool = httpcore.AsyncConnectionPool


class _AsyncResponseStream(httpx.AsyncByteStream):
    """A response's body; closing it gives the request's pool slot back."""

    def __init__(
        self,
        inner: Any,
        transport: _AsyncLiveTransport,
        slot: Slot[_Pool],
        request: httpx.Request,
    ) -> None:
        self._inner = inner
        self._transport = transport
        self._slot: Slot[_Pool] | None = slot
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with httpx_errors(self._request):
            async for part in self._inner:
                yield part

    async def aclose(self) -> None:
        try:
            with httpx_errors(self._request):
                await self._inner.aclose()
        finally:
            slot, self._slot = self._slot, None
            if slot is not None:
                await self._transport.release(slot)


class _AsyncLiveTransport(httpx.AsyncBaseTransport):
    """Sends each request through the connection pool of the source's newest snapshot
    (``Swapping``): its context presents that snapshot's certificate, trusts its bundle and
    checks servers with the authoriser in the handshake. After a renewal the next request
    builds the new snapshot's pool; the old one is closed once its last response is."""

    def __init__(
        self,
        source: Source,
        authoriser: Authoriser | None,
        trust: TrustChoice,
        http2: bool,
        pool_limits: dict[str, Any],
    ) -> None:
        def build(snapshot: Identity) -> _Pool:
            # The source's context, not one made for ``snapshot``: a RenewingIdentity builds
            # the contexts of its next snapshot off the event loop, before the swap. It is
            # ``snapshot``'s, or a newer one's if a renewal came in between (threads).
            return httpcore.AsyncConnectionPool(
                ssl_context=client_context(source, trust, authoriser, alpn(http2)),
                http1=True,
                http2=http2,
                network_backend=ClosingBackend(),
                **pool_limits,
            )

        self._pools = Swapping(source, build)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        require_https(request)
        slot, retired = self._pools.acquire()
        try:
            for pool in retired:
                await pool.aclose()
            with httpx_errors(request):
                response = await slot.resource.handle_async_request(core_request(request))
        except BaseException:
            await self.release(slot)
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_AsyncResponseStream(response.stream, self, slot, request),
            extensions=response.extensions,
        )

    async def release(self, slot: Slot[_Pool]) -> None:
        """Give ``slot`` back; close its pool if that was a retired pool's last use."""
        pool = self._pools.release(slot)
        if pool is not None:
            await pool.aclose()

    async def aclose(self) -> None:
        for pool in self._pools.close():
            await pool.aclose()


class AsyncClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` speaking mutual TLS as ``source`` (an ``Identity`` or a
    ``RenewingIdentity``), servers checked by ``authoriser`` before anything is sent.
    ``kwargs`` go to httpx if they are in ``_httpx_shared._PASSED_ON``; others are a
    ``ConfigError``."""

    def __init__(
        self,
        source: Source,
        *,
        authoriser: Authoriser | None = None,
        trust: TrustChoice = "federation",
        http2: bool = False,
        limits: httpx.Limits | None = None,
        **kwargs: Any,
    ) -> None:
        check_common("federatls.integrations.httpx.AsyncClient", source, trust, authoriser)
        options = arguments("AsyncClient", kwargs)
        transport = _AsyncLiveTransport(source, authoriser, trust, http2, pool_limits(limits))
        super().__init__(transport=transport, **options)
