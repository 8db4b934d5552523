"""Warnings that a peer can trigger at will, written at a bounded rate.

A trusted but buggy or hostile peer sending malformed messages would otherwise make us write one
line per message (20 000 junk frames wrote about 16 000 lines) and fill the operator's disk
through the log. Per key (a peer and a kind of trouble) the first ``burst`` warnings are written
as they come, the last with a note that more are counted; from then on one line per ``period``
gives the count (written from the I/O loop's heartbeat, and on close), for as long as the trouble
goes on. A key that stays quiet for a whole period starts afresh. So a peer gets at most
``burst + 1`` lines in its first period and one line per period after, whatever it sends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Hashable


@dataclass
class _Window:
    start: float
    what: str  # what is counted, e.g. "bad messages from hospital-a"
    logged: int = 0
    suppressed: int = 0


class RateLimitedLog:
    def __init__(self, log, burst: int = 5, period: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self.burst, self.period = burst, period
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}

    def warning(self, key: Hashable, what: str, msg: str, *args) -> None:
        """Log ``msg % args`` while ``key`` has had fewer than ``burst`` warnings, else count it;
        ``what`` names the warnings in the count line."""
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.period:
            window = self._roll(key, now)
        if window is None:
            window = self._windows[key] = _Window(now, what)
        if window.logged < self.burst:
            window.logged += 1
            note = f" (more {what} are counted, one line per {self.period:g} s)" if window.logged == self.burst else ""
            self._log.warning(msg + note, *args)
        else:
            window.suppressed += 1

    def flush(self, everything: bool = False) -> None:
        """Write the counts of the periods that are over (``everything``: all counts, as on close)."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            if everything:
                self._report(self._windows.pop(key), now)
            elif now - window.start >= self.period:
                self._roll(key, now)

    def _roll(self, key: Hashable, now: float) -> _Window | None:
        """End ``key``'s period: write its count; it stays counted-only if it was noisy, else it starts afresh."""
        window = self._windows.pop(key)
        self._report(window, now)
        if not window.suppressed or now - window.start >= 2 * self.period:  # quiet since: afresh
            return None
        self._windows[key] = _Window(now, window.what, logged=self.burst)
        return self._windows[key]

    def _report(self, window: _Window, now: float) -> None:
        if window.suppressed:
            self._log.warning("%d more %s in the last %.0f s, not logged one by one", window.suppressed,
                              window.what, min(now - window.start, self.period))
