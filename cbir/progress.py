"""Progress reporting that suits where stderr goes.

On a terminal: a tqdm bar. Piped to a file or a CI log: plain lines, one at a 10 % step when ``min_gap`` seconds
have passed since the last line, else one every ``interval`` seconds, and a last one at the end: never one per image
(a bar redrawn per update filled logs with hundreds of lines).
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Optional


class LineProgress:
    """The subset of tqdm's interface cbir uses (``update``, ``write``, ``close``, iteration), printing whole lines."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", unit: str = "it",
                 interval: float = 30.0, min_gap: float = 5.0, stream=None, disable: bool = False) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval = interval
        self.min_gap = min_gap
        self.stream = stream if stream is not None else sys.stderr
        self.disable = disable
        self.n = 0
        self.t0 = time.monotonic()
        self._last_t = self.t0
        self._last_step = 0
        self._closed = False

    def __iter__(self):
        for x in self.iterable or ():
            yield x
            self.update()
        self.close()

    def _line(self) -> str:
        dt = max(1e-9, time.monotonic() - self.t0)
        rate = self.n / dt
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else float("inf")
            eta = f", {left:.0f} s left" if left != float("inf") and self.n < self.total else ""
            return f"{self.desc}: {self.n}/{self.total} ({100 * self.n // self.total}%) {rate:.1f} {self.unit}/s, {dt:.0f} s{eta}"
        return f"{self.desc}: {self.n} {self.unit} {rate:.1f} {self.unit}/s, {dt:.0f} s"

    def update(self, n: int = 1) -> None:
        if self.disable:
            return
        self.n += n
        now = time.monotonic()
        step = 10 * self.n // self.total if self.total else 0
        gap = now - self._last_t
        if (step > self._last_step and gap >= self.min_gap) or gap >= self.interval:
            if self.total is None or self.n < self.total:  # the final line comes from close()
                self._emit()
            self._last_step, self._last_t = step, now

    def _emit(self) -> None:
        print(self._line(), file=self.stream, flush=True)

    def write(self, msg: str, file=None) -> None:
        print(msg, file=file or self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n:
            self._emit()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable=None, total=None, desc: str = "", enabled: bool = True, unit: str = "img", stream=None):
    """A tqdm bar on a terminal, :class:`LineProgress` elsewhere; ``enabled=False`` shows nothing."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", lambda: False)()
    if isatty:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit=unit, dynamic_ncols=True, file=stream)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, stream=stream, disable=not enabled)


def bar(iterable=None, total=None, desc: str = "", enabled: bool = True, unit: str = "img"):
    """The progress display of a pipeline stage, on stderr (a tqdm bar on a terminal, lines in a log)."""
    return progress(iterable, total=total, desc=desc, enabled=enabled, unit=unit, stream=sys.stderr)


def log(msg: str, pb=None) -> None:
    """A message on stderr that does not break the progress display ``pb`` (when given)."""
    if pb is not None and hasattr(pb, "write"):
        pb.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)
