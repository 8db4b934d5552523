"""Flow control: at most ``limit`` model-sized transfers of one kind in flight, whatever the number of clients.

A thousand clients pulling at once would queue a thousand encrypted copies of the model in
libzmq, and a thousand pushing at once a thousand diffs in the host's inbox: host memory in
models would grow with the number of clients. So the host keeps one :class:`Transfers` for pulls
and one for pushes (they use the two directions of the links, so they overlap). A pull is
answered, and a push is granted (``hosted.push`` -> ``hosted.go``, then the diff), only while
fewer than ``limit`` of its kind are in flight and, for pushes, while the cycle or buffer has
room for another diff (``room``); later ones wait in a queue, answered as transfers end
(``hosted.pulled``, the diff itself), room opens (a new version) or slots time out (a client that
vanished mid-transfer: ``timeout`` seconds with no chunk of its transfer, since each chunk renews
the slot). A waiting client simply sees a slower reply: no polling, no error.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from ..errors import MeshflError
from ..wire import Message, error_message

Start = Callable[[Message], Message]


class Transfers:
    def __init__(self, limit: int, timeout: float, room: Callable[[Message], bool] | None = None) -> None:
        self.limit = limit
        self.timeout = timeout
        self._room = room or (lambda msg: True)
        self._busy: dict[str, tuple[float, str]] = {}  # client -> (when its slot expires, its model)
        self._waiting: deque[str] = deque()  # clients waiting for a slot, in order of arrival
        self._requests: dict[str, list[tuple]] = {}  # what each waiting client asked: (request, start, keep)

    def admit(self, msg: Message, start: Start, keep: Callable[[Message], object] | None = None) -> Message | None:
        """The reply now if a slot is free (or the client holds one), else None: queued. With
        ``keep``, the slot is given back at once unless ``keep(reply)`` (no transfer came of it)."""
        if msg.sender in self._busy or (len(self._busy) < self.limit and self._room(msg)):
            return self._start(msg, start, keep)
        if msg.sender not in self._requests:
            self._waiting.append(msg.sender)
        self._requests.setdefault(msg.sender, []).append((msg, start, keep))
        return None

    def touch(self, client: str) -> bool:
        """Renew ``client``'s slot (a chunk of its transfer came); False if it holds none."""
        if client not in self._busy:
            return False
        self._busy[client] = (time.monotonic() + self.timeout, self._busy[client][1])
        return True

    def holds(self, client: str) -> bool:
        return client in self._busy

    def release(self, client: str) -> list[tuple[Message, Message]]:
        """End ``client``'s transfer; returns (request, reply) of those that start now."""
        self._busy.pop(client, None)
        return self.poke()

    def expire(self) -> list[tuple[Message, Message]]:
        now = time.monotonic()
        for client in [c for c, (t, _) in self._busy.items() if t <= now]:
            del self._busy[client]
        return self.poke()

    def poke(self) -> list[tuple[Message, Message]]:
        """Give free slots to waiting clients in order (one with no room yet keeps its place); all
        a client asked for (a window of chunk requests) starts with its slot."""
        out, kept = [], []
        while self._waiting and len(self._busy) < self.limit:
            client = self._waiting.popleft()
            if not self._room(self._requests[client][0][0]):
                kept.append(client)
                continue
            out.extend((msg, self._start(msg, start, keep)) for msg, start, keep in self._requests.pop(client))
        self._waiting.extendleft(reversed(kept))
        return out

    def in_flight_for(self, model: str) -> int:
        return sum(1 for _, m in self._busy.values() if m == model)

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    @property
    def queued(self) -> int:
        return sum(len(r) for r in self._requests.values())

    def _start(self, msg: Message, start: Start, keep) -> Message:
        self._busy[msg.sender] = (time.monotonic() + self.timeout, str(msg.fields.get("model")))
        reply = _run(msg, start)
        if keep is not None and not keep(reply):
            self._busy.pop(msg.sender, None)
        return reply


def _run(msg: Message, start: Start) -> Message:
    try:
        return start(msg)
    except MeshflError as exc:
        return error_message(exc.code, exc.message, msg.id, exc.details)
