"""Go-style durations ("5m", "24h1m0s", "1.5h", "300ms"), as step-ca writes them in ca.json
and in `notAfter`/`notBefore`. Pure: parsing and formatting only, no clock.
"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["format_go_duration", "parse_go_duration"]

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_TERM = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")  # ASCII digits, as Go
_MAX_NS = 2**63 - 1


def parse_go_duration(text: str) -> timedelta:
    """Parse a Go ``time.ParseDuration`` string into a ``timedelta``.

    Raises ``ValueError`` quoting the text when it is not a Go duration. Precision is the
    microsecond (``timedelta``'s); Go's nanoseconds below that are dropped.
    """
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string, got {type(text).__name__}")
    s = text
    sign = 1
    if s and s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return timedelta(0)
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(s):
        m = _TERM.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        number, unit = m.group(1), m.group(2)
        whole, _, frac = number.partition(".")
        scale = _UNIT_NS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(frac) * scale // (10 ** len(frac))
        total += value
        if total > _MAX_NS:
            raise ValueError(f"invalid duration {text!r}: out of range")
        pos = m.end()
    return timedelta(microseconds=sign * total // 1000)


def format_go_duration(value: timedelta) -> str:
    """Format like Go's ``Duration.String()``: ``24h1m0s``, ``5m0s``, ``1.5s``, ``300ms``."""
    ns = (value.days * 86_400 + value.seconds) * 1_000_000_000 + value.microseconds * 1000
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, scale in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= scale:
                return sign + _decimal(ns, scale) + unit
    hours, rest = divmod(ns, 3600 * 1_000_000_000)
    minutes, rest = divmod(rest, 60 * 1_000_000_000)
    seconds = _decimal(rest, 1_000_000_000)
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{sign}{minutes}m{seconds}s"
    return f"{sign}{seconds}s"


def _decimal(ns: int, scale: int) -> str:
    whole, frac = divmod(ns, scale)
    if not frac:
        return str(whole)
    digits = str(frac).rjust(len(str(scale)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"
