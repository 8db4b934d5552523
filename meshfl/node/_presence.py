"""What a running node leaves for other processes on its home to see: that it runs, and its links.

A node holds an exclusive ``flock`` on ``home/node.lock`` while it runs (the file says its pid,
whether it runs in development mode - ``node start --dev`` overrides config.toml - and since when).
The kernel drops the lock when the process ends, SIGKILL included, so the lock, unlike a pid file
or an audit record, never claims that a dead node runs; and a second node on the same home is
refused. Each link coming up or going down is one small record in table ``links`` (peer id ->
``{"up", "since"}``), written only on a change, never per heartbeat. A console or ``node status``
in another process reads both without talking to the node.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import orjson

from ..errors import ConfigError
from ..store import Store

LOCK_FILE = "node.lock"
LINKS_TABLE = "links"
PROBE_GRACE_S = 1.0  # how long a starting node retries a lock held by another process's probe


class NodeLock:
    """The running node's hold on its home; :meth:`release` (or the process's end) lets go."""

    def __init__(self, home: Path, *, dev: bool = False):
        self._path = Path(home) / LOCK_FILE
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + PROBE_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    pid = (running_node(home) or {}).get("pid")
                    raise ConfigError(f"a node already runs on {home}" + (f" (pid {pid})" if pid else ""),
                                      code="node_running") from None
                time.sleep(0.01)  # a probe (running_node) holds the lock for microseconds
        self._fd: int | None = fd
        self._info = {"pid": os.getpid(), "dev": dev, "since": time.time()}
        self._write()

    def note(self, **fields) -> None:
        """Add ``fields`` to what the lock file says (``nudge``: the process takes SIGUSR1)."""
        self._info.update(fields)
        self._write()

    def _write(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, orjson.dumps(self._info), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the lock
            self._fd = None


def running_node(home: Path) -> dict | None:
    """``{"pid", "dev", "since", "nudge"?}`` of the node running on `home` (empty while it has not written
    them yet), or None when none runs. Probing takes a shared lock for an instant; a starting node
    waits that out."""
    try:
        fd = os.open(Path(home) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a node runs
            try:
                info = orjson.loads(os.read(fd, 4096))
            except orjson.JSONDecodeError:
                return {}
            return info if isinstance(info, dict) else {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def record_link(store: Store, peer_id: str, up: bool) -> None:
    store.table(LINKS_TABLE).put(peer_id, {"up": up, "since": time.time()})


def links_down(store: Store) -> None:
    """At start: links recorded up by a node that died are down since now (none is up yet)."""
    now = time.time()

    def reset(tx) -> None:
        for peer_id, link in tx.items(LINKS_TABLE):
            if link["up"]:
                tx.put(LINKS_TABLE, peer_id, {"up": False, "since": now})

    store.atomic(reset)


def links(store: Store) -> dict[str, dict]:
    """peer id -> ``{"up": bool, "since": epoch seconds}`` for every link the node ever had."""
    return dict(store.table(LINKS_TABLE).items())
