"""When to renew: the pure renewal policy. Renew when about two thirds of a certificate's
remaining life (counted from when we received it) has passed, minus some jitter so a fleet
does not renew in step; after a failure retry with capped exponential backoff and jitter, but
never so late that the certificate expires before a few more tries; wake at least once a
minute whatever the plan, because laptops sleep and clocks jump; and give one refresh (all
its calls to the CA together) a deadline, past which it counts as a failure.

Everything takes the time (and the random draw) as arguments: no clock, no sleep, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["RenewalPolicy"]


@dataclass(frozen=True)
class RenewalPolicy:
    """The numbers of renewal. The defaults suit certificates of minutes to days."""

    renew_at: float = 2 / 3  # fraction of the life left at receipt
    jitter: float = 0.05  # up to this fraction of that life earlier, at random
    first_retry: timedelta = timedelta(seconds=1)
    max_retry: timedelta = timedelta(minutes=5)
    recheck: timedelta = timedelta(minutes=1)  # the longest single sleep
    timeout: timedelta = timedelta(seconds=15)  # the deadline of one refresh, all calls together

    def __post_init__(self) -> None:
        if not 0 < self.renew_at < 1:
            raise ValueError("renew_at must lie strictly between 0 and 1")
        if not 0 <= self.jitter < self.renew_at:
            raise ValueError("jitter must be at least 0 and less than renew_at")
        if not timedelta(0) < self.first_retry <= self.max_retry:
            raise ValueError("need 0 < first_retry <= max_retry")
        if self.recheck <= timedelta(0):
            raise ValueError("recheck must be positive")
        if self.timeout <= timedelta(0):
            raise ValueError("timeout must be positive")

    def renewal_due(self, received_at: datetime, not_after: datetime, rand: float) -> datetime:
        """When to renew a certificate received at ``received_at``; ``rand`` in [0, 1)."""
        life = max(not_after - received_at, timedelta(0))
        return received_at + life * self.renew_at - life * (self.jitter * rand)

    def retry_at(self, failures: int, now: datetime, not_after: datetime, rand: float) -> datetime:
        """When to try again after ``failures`` failures in a row (1 for the first).

        Exponential from ``first_retry``, capped at ``max_retry``, scaled by 50-100% at
        random; and while the certificate is valid, never later than a quarter of its
        remaining life, so several tries still fit before it expires.
        """
        exponent = min(max(failures, 1) - 1, 60)
        # In float seconds: a timedelta of first_retry * 2**60 would overflow.
        seconds = min(
            self.max_retry.total_seconds(), self.first_retry.total_seconds() * (2.0**exponent)
        )
        delay = timedelta(seconds=seconds * (0.5 + rand / 2))
        left = not_after - now
        if left > timedelta(0):
            delay = min(delay, max(left / 4, timedelta(milliseconds=100)))
        return now + delay

    def sleep_for(self, now: datetime, wake_at: datetime) -> float:
        """Seconds to sleep before looking again: until ``wake_at``, at most ``recheck``."""
        return max(0.0, min((wake_at - now).total_seconds(), self.recheck.total_seconds()))
