"""A CA call cut short while its TLS handshake is in flight (its deadline passes, or the task
running it is cancelled, as when a service shuts its renewal down) closes its socket at once:
the server sees the connection end, and no socket is left for the garbage collector to find
(which would be a ResourceWarning, and a descriptor held open until then).

The server here accepts TCP and never answers the ClientHello, so every call is caught in
its handshake. The garbage collector is off while each test watches the socket, and what a
freed socket warns of is recorded rather than lost.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime

import anyio
import httpcore
import pytest
from cryptography import x509

from federatls import CATimeoutError
from federatls._client import CAClient, client_tls_context
from federatls._netstream import ClosingBackend
from federatls.ca._pki import new_root

pytestmark = pytest.mark.anyio

SEEN_WITHIN = 5.0  # seconds for the server to see the end of a closed connection


class SilentServer:
    """Accepts TCP connections, reads whatever comes and never answers; counts the
    connections that the client has ended."""

    def __init__(self) -> None:
        self.accepted = 0
        self.ended = 0
        self.port = 0
        self._changed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._changed.set()
        try:
            while await reader.read(4096):
                pass
        except ConnectionError:
            pass
        self.ended += 1
        self._changed.set()
        writer.close()

    async def wait(self, check: Callable[[], bool], seconds: float) -> bool:
        with anyio.move_on_after(seconds):
            while not check():
                self._changed.clear()
                await self._changed.wait()
        return check()


@asynccontextmanager
async def silent_server() -> AsyncIterator[SilentServer]:
    silent = SilentServer()
    server = await asyncio.start_server(silent.handle, "127.0.0.1", 0)
    silent.port = server.sockets[0].getsockname()[1]
    try:
        yield silent
    finally:
        server.close()


@contextmanager
def leaks_watched() -> Iterator[list[str]]:
    """Collects what a socket left for the garbage collector says (the ResourceWarning an
    unclosed socket or transport raises when freed), with the collector off while the test
    looks and one collection at the end."""
    found: list[str] = []
    previous = sys.unraisablehook

    def record(unraisable: sys.UnraisableHookArgs) -> None:
        found.append(f"{unraisable.exc_type.__name__}: {unraisable.exc_value}")

    gc.disable()
    sys.unraisablehook = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            yield found
            gc.collect()
    finally:
        sys.unraisablehook = previous
        gc.enable()


@pytest.fixture(scope="module")
def roots() -> list[x509.Certificate]:
    return [new_root("Cleanup", datetime.now(UTC))[0]]


async def _cut_short(call: Callable[[], Awaitable[str]], how: str, server: SilentServer) -> None:
    """Run ``call`` until its handshake hangs, then end it: by its own deadline ("deadline")
    or by cancelling its task group from outside ("cancel")."""
    if how == "deadline":
        with pytest.raises(CATimeoutError):
            await call()
        return
    async with anyio.create_task_group() as tg:
        tg.start_soon(_drop_result, call)
        assert await server.wait(lambda: server.accepted == 1, SEEN_WITHIN)
        tg.cancel_scope.cancel()


async def _drop_result(call: Callable[[], Awaitable[str]]) -> None:
    await call()


@pytest.mark.parametrize("how", ["deadline", "cancel"])
async def test_a_ca_call_cut_short_mid_handshake_closes_its_socket(
    roots: list[x509.Certificate], how: str
) -> None:
    """A CA call whose deadline passes, or whose task is cancelled, during the TLS handshake
    ends its connection at once and leaves no socket to the garbage collector. Twin:
    test_a_handshake_cut_short_closes_its_socket_only_with_the_closing_backend[httpcore]."""
    async with silent_server() as server:
        with leaks_watched() as leaks:
            async with CAClient(f"https://127.0.0.1:{server.port}", roots, timeout=0.5) as ca:
                await _cut_short(ca.health, how, server)
                assert server.accepted == 1
                assert await server.wait(lambda: server.ended == 1, SEEN_WITHIN)
        assert leaks == []


@pytest.mark.parametrize("backend", ["closing", "httpcore"])
async def test_a_handshake_cut_short_closes_its_socket_only_with_the_closing_backend(
    roots: list[x509.Certificate], backend: str
) -> None:
    """With federatls's ClosingBackend, a TLS handshake cancelled by a deadline closes the
    socket at once, though the stream is still referenced; with httpcore's own backend
    (the twin, and the reason ClosingBackend exists) the same socket stays open. If the
    twin starts failing, httpcore closes such sockets itself now and the wrapper can go."""
    chosen = ClosingBackend() if backend == "closing" else httpcore.AnyIOBackend()
    context = client_tls_context(roots)
    async with silent_server() as server:
        stream = await chosen.connect_tcp("127.0.0.1", server.port)
        with anyio.move_on_after(0.5) as scope:
            await stream.start_tls(context, server_hostname="127.0.0.1")
        assert scope.cancelled_caught
        ended = await server.wait(
            lambda: server.ended == 1, 1.0 if backend == "httpcore" else SEEN_WITHIN
        )
        try:
            assert ended is (backend == "closing")
        finally:
            await stream.aclose()
