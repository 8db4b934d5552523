"""Messages kept until their addressee acknowledges them, so they can be re-sent after a
reconnect or a restart.

Three tables per outbox `name`: ``name`` (message id -> record), ``name.order`` (sequence number
-> message id, in insertion order) and ``name.buffers`` (raw binary frames, not JSON-encoded,
keyed by the message's sequence number and position). A message and its buffers are written and
removed in one transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from ._codec import next_seq, seq_key
from .store import Store, Tx


@dataclass(frozen=True)
class OutboxItem:
    msg_id: str
    dest: str
    envelope: dict
    buffers: list[bytes]
    created: float


class Outbox:
    def __init__(self, store: Store, name: str = "outbox"):
        self._store = store
        self._records, self._order, self._buffers = name, f"{name}.order", f"{name}.buffers"

    def put(self, msg_id: str, dest: str, envelope: dict, buffers: Sequence = ()) -> None:
        """Keep a message for `dest`; a `msg_id` already kept is left as it is.

        `buffers` are bytes-like objects (bytes, memoryview, contiguous numpy arrays).
        """

        def put(tx: Tx) -> None:
            if tx.has(self._records, msg_id):
                return
            seq = next_seq(tx, self._order)
            record = {
                "dest": dest, "envelope": envelope, "seq": seq,
                "buffers": len(buffers), "created": time.time(),
            }
            tx.put(self._records, msg_id, record)
            tx.put(self._order, seq_key(seq), msg_id)
            for i, data in enumerate(buffers):
                tx.put_bytes(self._buffers, _buffer_key(seq, i), data)

        self._store.atomic(put)

    def ack(self, msg_id: str, dest: str | None = None) -> bool:
        """Forget a delivered message and its buffers; False when it was not kept (for ``dest``,
        if given: only its addressee may acknowledge a message)."""

        def ack(tx: Tx) -> bool:
            record = tx.get(self._records, msg_id)
            if record is None or (dest is not None and record["dest"] != dest):
                return False
            tx.delete(self._records, msg_id)
            tx.delete(self._order, seq_key(record["seq"]))
            for i in range(record["buffers"]):
                tx.delete(self._buffers, _buffer_key(record["seq"], i))
            return True

        return self._store.atomic(ack)

    def get(self, msg_id: str) -> OutboxItem | None:
        def get(tx: Tx) -> OutboxItem | None:
            record = tx.get(self._records, msg_id)
            return None if record is None else self._item(tx, msg_id, record)

        return self._store.read(get)

    def pending(self, dest: str | None = None) -> list[OutboxItem]:
        """Messages not yet acknowledged, oldest first, optionally only those for `dest`."""

        def pending(tx: Tx) -> list[OutboxItem]:
            items = []
            for _, msg_id in tx.items(self._order):
                record = tx.get(self._records, msg_id)
                if dest is None or record["dest"] == dest:
                    items.append(self._item(tx, msg_id, record))
            return items

        return self._store.read(pending)

    def __len__(self) -> int:
        return self._store.read(lambda tx: tx.count(self._records))

    def _item(self, tx: Tx, msg_id: str, record: dict) -> OutboxItem:
        keys = [_buffer_key(record["seq"], i) for i in range(record["buffers"])]
        buffers = [tx.get_bytes(self._buffers, key) for key in keys]
        return OutboxItem(msg_id, record["dest"], record["envelope"], buffers, record["created"])


def _buffer_key(seq: int, index: int) -> str:
    return f"{seq_key(seq)}.{index}"
