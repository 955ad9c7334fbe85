"""Small helpers of the command-line layers: argparse types for counts, and terminal-safe text.

Bottom floor: imports nothing of cbir, so every sub-command module (and the engine's log lines) can use it.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Callable

# C0 and C1 control characters (ESC, BEL, CR, newline...), DEL, line/paragraph separators and the bidi overrides:
# written raw, they move the cursor, retitle the window or reorder what a terminal shows
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def tty_safe(s: Any) -> str:
    """``str(s)`` with terminal control characters written as escapes (``"\\x1b[31mred"`` -> ``\\x1b[31mred``).

    For text meant for a terminal (tables, log lines); JSON output needs none of it (``json.dumps`` escapes them).
    """
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(s))


def int_at_least(minimum: int, what: str = "") -> Callable[[str], int]:
    """An argparse ``type=``: an integer >= ``minimum``; anything else is a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            kind = what or ("a positive integer" if minimum == 1 else "an integer >= 0" if minimum == 0 else f"an integer >= {minimum}")
            raise argparse.ArgumentTypeError(f"expected {kind}, got {v}")
        return v

    parse.__name__ = "positive_int" if minimum == 1 else "non_negative_int" if minimum == 0 else f"int_at_least_{minimum}"
    return parse


#: counts where 0 or less makes no sense (--top-k, --batch-size, --threads...)
positive_int = int_at_least(1)
#: counts where 0 means something (--workers 0: decode inline; --min-inliers 0; --hidden 0: linear head)
non_negative_int = int_at_least(0)
