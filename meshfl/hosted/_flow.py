"""Flow control: at most ``limit`` model-sized transfers in flight, whatever the number of clients.

A thousand clients pulling at once would queue a thousand encrypted copies of the model in
libzmq, and a thousand pushing at once a thousand diffs in the host's inbox: host memory in
models would grow with the number of clients. So a pull is answered, and a push is granted
(``hosted.push`` -> ``hosted.go``, then the diff), only while fewer than ``limit`` transfers are
in flight; later ones wait in a queue, answered as transfers end (``hosted.pulled``, the diff
itself) or time out (a client that vanished mid-transfer: ``timeout`` seconds with no chunk of
its transfer, since each chunk renews the slot). A waiting client simply sees a slower reply: no
polling, no error.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from ..errors import MeshflError
from ..wire import Message, error_message

Start = Callable[[Message], Message]


class Transfers:
    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self._busy: dict[str, float] = {}  # client -> when its transfer slot expires
        self._waiting: deque[str] = deque()  # clients waiting for a slot, in order of arrival
        self._requests: dict[str, list[tuple[Message, Start]]] = {}  # what each waiting client asked

    def admit(self, msg: Message, start: Start) -> Message | None:
        """The reply now if a slot is free (or the client holds one), else None: queued."""
        if msg.sender in self._busy or len(self._busy) < self.limit:
            self._busy[msg.sender] = time.monotonic() + self.timeout
            return _run(msg, start)
        if msg.sender not in self._requests:
            self._waiting.append(msg.sender)
        self._requests.setdefault(msg.sender, []).append((msg, start))
        return None

    def touch(self, client: str) -> bool:
        """Renew ``client``'s slot (a chunk of its transfer came); False if it holds none."""
        if client not in self._busy:
            return False
        self._busy[client] = time.monotonic() + self.timeout
        return True

    def holds(self, client: str) -> bool:
        return client in self._busy

    def release(self, client: str) -> list[tuple[Message, Message]]:
        """End ``client``'s transfer; returns (request, reply) of those that start now."""
        self._busy.pop(client, None)
        return self._next()

    def expire(self) -> list[tuple[Message, Message]]:
        now = time.monotonic()
        for client in [c for c, t in self._busy.items() if t <= now]:
            del self._busy[client]
        return self._next()

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    @property
    def queued(self) -> int:
        return sum(len(r) for r in self._requests.values())

    def _next(self) -> list[tuple[Message, Message]]:
        """Give free slots to waiting clients in order; all a client asked for (a window of chunk
        requests) starts with its slot."""
        out = []
        while self._waiting and len(self._busy) < self.limit:
            client = self._waiting.popleft()
            self._busy[client] = time.monotonic() + self.timeout
            out.extend((msg, _run(msg, start)) for msg, start in self._requests.pop(client))
        return out


def _run(msg: Message, start: Start) -> Message:
    try:
        return start(msg)
    except MeshflError as exc:
        return error_message(exc.code, exc.message, msg.id, exc.details)
