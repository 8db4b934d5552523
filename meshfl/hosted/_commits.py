"""Group commit: checked diffs wait here for one shared commit, made on a thread of their own.

A durable commit costs disk flushes (about half a millisecond here, more while the disk is busy)
and a hand-off of the interpreter lock between threads. Made by the dispatcher for each diff in
turn, they were most of a cycle's time: every client waited behind them, requests and pulls too.
So the dispatcher checks a diff, stores its bytes and folds it in, and hands its record here; the
committer thread commits every record that came meanwhile in one transaction (one flush for all)
and only then acknowledges them, while the dispatcher goes on serving. An acknowledgement still
follows its diff's commit.

Commits start at most every ``interval`` seconds: a diff that comes to an idle committer commits
at once, but under load, when a commit would otherwise hold one or two diffs (a thousand commits
for a cycle of a thousand clients), the records of the next ``interval`` share one. That bounds
an acknowledgement's extra wait to ``interval``, and the commits per second to ``1/interval``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("meshfl.hosted")

INTERVAL_S = 0.01
MAX_BATCH = 512  # records in one transaction at most


class GroupCommit:
    """Items queue up; ``run(batch)`` gets all that waited, on the committer thread."""

    def __init__(self, run: Callable[[list], None], name: str, interval: float = INTERVAL_S) -> None:
        self._run = run
        self._name = name
        self._interval = interval
        self._items: list = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=f"meshfl-commit-{name}", daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            if len(self._items) in (1, MAX_BATCH):  # else the committer is busy or waits out its interval
                self._cond.notify()

    def close(self) -> None:
        """Commit what waits, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _main(self) -> None:
        started = -self._interval
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                due = started + self._interval
                while not self._closed and len(self._items) < MAX_BATCH and (left := due - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch, self._items = self._items[:MAX_BATCH], self._items[MAX_BATCH:]
            started = time.monotonic()
            try:
                self._run(batch)
            except Exception:  # a bug of ours: logged; those clients get no ack
                log.exception("[%s] committing %d diff(s) failed", self._name, len(batch))
