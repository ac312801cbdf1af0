"""The CA's background purge of expired token ids, while it serves: small batches on the
store's index (``Store.purge_expired``), in a thread of its own, a pause between batches and a
run every minute. Only the scheduling lives here; what may be forgotten is the store's rule
(a spent token past its ``exp`` and the retention can never be replayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from ._store import Store

__all__ = ["TokenPurge"]

log = logging.getLogger("federatls.ca")

PURGE_INTERVAL = 60.0  # seconds from the end of one run to the start of the next
PURGE_BATCH = 250  # token ids per transaction: SQLite holds its write lock ~5 ms for it
PURGE_PAUSE = 0.1  # seconds between two batches of one run, so commits are not held up


class TokenPurge:
    """Purges ``store``'s expired token ids every ``interval`` seconds from ``start`` until
    ``stop``. A run deletes ``batch`` ids per transaction, in a thread (a store call may wait
    for the database; the event loop never does), until a batch comes back short.

    A failing run (the database busy or unreachable) is logged once, when the failures start,
    and once more when a run succeeds again, not at every interval; nothing else is done about
    it: the ids wait for the next run, and spent tokens stay refused meanwhile."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime],
        *,
        interval: float = PURGE_INTERVAL,
        batch: int = PURGE_BATCH,
        pause: float = PURGE_PAUSE,
    ) -> None:
        self._store = store
        self._clock = clock
        self._interval = interval
        self._batch = batch
        self._pause = pause
        self._stopping = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="federatls-ca-purge")
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # completed runs, for tests and operators
        self.purged = 0  # token ids deleted since the start

    async def _run(self) -> None:
        failing = False
        await self._sleep(self._interval)
        while not self._stopping.is_set():
            try:
                purged = await self._one_run()
            except Exception as exc:  # any store failure: the next run tries again
                if not failing:
                    log.warning(
                        "purging expired token ids failed; retrying every %g s: %s",
                        self._interval,
                        exc,
                    )
                failing = True
            else:
                if failing:
                    log.warning("purging expired token ids works again")
                failing = False
                self.runs += 1
                if purged:
                    log.info("purged %d expired token ids", purged)
            await self._sleep(self._interval)

    async def _one_run(self) -> int:
        loop = asyncio.get_running_loop()
        total = 0
        while not self._stopping.is_set():
            purge = functools.partial(self._store.purge_expired, self._clock(), limit=self._batch)
            purged = await loop.run_in_executor(self._thread, purge)
            total += purged
            self.purged += purged
            if purged < self._batch:
                break
            await self._sleep(self._pause)
        return total

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if ``stop`` is called meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def start(self) -> None:
        """Start purging, in a task of the running event loop."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop purging: a batch under way finishes first, so the store can be closed once
        this returns."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        await asyncio.to_thread(self._thread.shutdown)
