"""Blocking wrappers over the async core. This is the one module where federatls starts
threads: an anyio blocking portal runs the coroutine on an event loop of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from anyio.from_thread import start_blocking_portal

__all__ = ["run_sync"]

T = TypeVar("T")


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion on a private event loop thread and return its result
    (exceptions propagate). Callable from any thread, including one running a loop, which
    it blocks meanwhile."""
    with start_blocking_portal() as portal:
        return portal.call(fn)
