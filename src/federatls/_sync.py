"""Blocking wrappers over the async core. This is the one module where federatls starts
threads: an anyio blocking portal runs the coroutine on an event loop of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from anyio.from_thread import start_blocking_portal

__all__ = ["background", "run_sync"]

T = TypeVar("T")


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion on a private event loop thread and return its result
    (exceptions propagate). Callable from any thread, including one running a loop, which
    it blocks meanwhile."""
    with start_blocking_portal() as portal:
        return portal.call(fn)


@contextlib.contextmanager
def background(fn: Callable[..., Awaitable[Any]], *args: Any) -> Iterator[Any]:
    """Run the task ``fn(*args, task_status=...)`` on a private event loop thread while the
    block runs; yields what it passed to ``task_status.started()``; cancels it at the end."""
    with start_blocking_portal() as portal:
        future, value = portal.start_task(fn, *args)
        try:
            yield value
        finally:
            future.cancel()
