#!/usr/bin/env python3
"""Generates federatls's sync httpx client from the async one, so the two cannot drift:
src/federatls/integrations/_httpx_sync.py from _httpx_async.py, by token rewrites (the
async source is written so that each rewrite is exact; the module docstring is replaced).

    python scripts/unasync.py           # write _httpx_sync.py
    python scripts/unasync.py --check   # exit 1, showing the difference, if it is stale

tests/test_httpx_generated.py runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "src" / "federatls" / "integrations"
SOURCE = HERE / "_httpx_async.py"
TARGET = HERE / "_httpx_sync.py"

HEADER = '''"""federatls's httpx ``Client`` and its transport (see ``integrations.httpx``).

GENERATED from _httpx_async.py by scripts/unasync.py: do not edit; edit _httpx_async.py and
run ``python scripts/unasync.py`` (tests/test_httpx_generated.py checks the two match).
"""
'''

# In order: the specific names first, then the general ``Async`` prefix.
RULES: list[tuple[str, str]] = [
    (r"^from \.\._netstream import ClosingBackend\n", ""),
    (r"\bClosingBackend\(\)", "httpcore.SyncBackend()"),
    (r"\basync for (\w+) in (.+):\n\s+yield \1$", r"yield from \2"),
    (r"\basync (def|for|with)\b", r"\1"),
    (r"\bawait ", ""),
    (r"\b__aiter__\b", "__iter__"),
    (r"\baclose\b", "close"),
    (r"\bhandle_async_request\b", "handle_request"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAsyncByteStream\b", "SyncByteStream"),
    (r"\b_Async(?=[A-Z])", "_"),
    (r"\bAsync(?=[A-Z])", ""),
]


def generate(source: str) -> str:
    """The sync module for the async module's text ``source``."""
    _, end, body = source.partition('\n"""\n')
    if not end:
        raise SystemExit(f"{SOURCE}: no module docstring to replace")
    for pattern, replacement in RULES:
        body = re.sub(pattern, replacement, body, flags=re.MULTILINE)
    leftover = re.search(r"\b(async|await|Async\w*|aclose)\b", body)
    if leftover:
        raise SystemExit(f"{SOURCE}: no rule rewrites {leftover.group()!r}; add one to RULES")
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    p.add_argument("--source", type=Path, default=SOURCE, help=argparse.SUPPRESS)
    p.add_argument("--target", type=Path, default=TARGET, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    wanted = generate(args.source.read_text())
    if not args.check:
        args.target.write_text(wanted)
        return 0
    have = args.target.read_text() if args.target.exists() else ""
    if have == wanted:
        return 0
    diff = difflib.unified_diff(
        have.splitlines(keepends=True),
        wanted.splitlines(keepends=True),
        str(args.target),
        "generated from " + str(args.source),
    )
    sys.stderr.write("".join(diff))
    sys.stderr.write(f"{args.target} is stale: run python scripts/unasync.py\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
