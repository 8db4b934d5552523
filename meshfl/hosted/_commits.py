"""Group commit: checked diffs wait here for one shared commit, made on a thread of their own.

A durable commit costs disk flushes (about half a millisecond here, more while the disk is busy).
Made by the dispatcher for each diff in turn, they were most of a cycle's time: every client
waited behind them, requests and pulls too. So the dispatcher checks a diff, stores its bytes and
folds it in, and hands its record here; the committer thread commits every record that came
meanwhile in one transaction (one flush for all) and only then acknowledges them, while the
dispatcher goes on serving. An acknowledgement still follows its diff's commit.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger("meshfl.hosted")


class GroupCommit:
    """Items queue up; ``run(batch)`` gets all that waited, on the committer thread."""

    def __init__(self, run: Callable[[list], None], name: str) -> None:
        self._run = run
        self._name = name
        self._items: list = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=f"meshfl-commit-{name}", daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def close(self) -> None:
        """Commit what waits, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                batch, self._items = self._items, []
            try:
                self._run(batch)
            except Exception:  # a bug of ours: logged; those clients get no ack
                log.exception("[%s] committing %d diff(s) failed", self._name, len(batch))
