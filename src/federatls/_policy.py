"""When to renew: the pure renewal policy. Renew when about two thirds of a certificate's
remaining life (counted from when we received it) has passed, minus some jitter so a fleet
does not renew in step; after a failure retry with capped exponential backoff and jitter, but
never so late that the certificate expires before a few more tries; wake at least once a
minute whatever the plan, because laptops sleep and clocks jump; and give one refresh (all
its calls to the CA together) a deadline, past which it counts as a failure. Apart from
renewal, the trust bundle (``/roots`` and ``/federation``) is fetched again every
``trust_refresh`` (5 minutes; a little sooner at random), so a federation change reaches
workloads in minutes rather than at their next renewal.

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
    # How often the trust bundle is fetched between renewals; None (or 0) turns that off.
    trust_refresh: timedelta | None = timedelta(minutes=5)
    trust_jitter: float = 0.1  # up to this fraction of trust_refresh earlier, at random

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
        refresh: object = self.trust_refresh
        off = refresh is None or (not isinstance(refresh, bool) and refresh in (0, timedelta(0)))
        if off:
            object.__setattr__(self, "trust_refresh", None)
        elif not isinstance(refresh, timedelta) or refresh < timedelta(0):
            raise ValueError(
                "trust_refresh must be a positive timedelta, or None or 0 to turn the trust "
                f"refresh off, not {refresh!r}"
            )
        if not 0 <= self.trust_jitter < 1:
            raise ValueError("trust_jitter must be at least 0 and less than 1")

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

    def trust_refresh_due(self, now: datetime, rand: float) -> datetime | None:
        """When to fetch the trust bundle again after fetching it (or trying to) at ``now``:
        ``trust_refresh`` later, less up to ``trust_jitter`` of it at random (``rand`` in
        [0, 1)), so a fleet does not poll in step and no wait exceeds ``trust_refresh``;
        None when the trust refresh is off."""
        if self.trust_refresh is None:
            return None
        return now + self.trust_refresh * (1 - self.trust_jitter * rand)

    def sleep_for(self, now: datetime, wake_at: datetime) -> float:
        """Seconds to sleep before looking again: until ``wake_at``, at most ``recheck``."""
        return max(0.0, min((wake_at - now).total_seconds(), self.recheck.total_seconds()))
