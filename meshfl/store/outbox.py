"""Messages kept until their addressee acknowledges them, so they can be re-sent after a
reconnect or a restart.

A message may be *held*: kept, but not to be sent until someone releases it (a node's operator
reviewing a result before it leaves). Holding is a state of the same record, not a second store,
so a held message survives a crash exactly like a ready one.

Four tables per outbox `name`: ``name`` (message id -> record), ``name.order`` (sequence number
-> message id, in insertion order), ``name.buffers`` (raw binary frames, not JSON-encoded,
keyed by the message's sequence number and position) and ``name.released`` (ids released since
the sender last looked: another process may release a message, and the sending process picks it
up from there). A message and its buffers are written and removed in one transaction.
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
    held: bool = False


class Outbox:
    def __init__(self, store: Store, name: str = "outbox"):
        self._store = store
        self._records, self._order, self._buffers = name, f"{name}.order", f"{name}.buffers"
        self._released = f"{name}.released"

    def put(self, msg_id: str, dest: str, envelope: dict, buffers: Sequence = (), *, held: bool = False) -> None:
        """Keep a message for `dest`; a `msg_id` already kept is left as it is.

        `buffers` are bytes-like objects (bytes, memoryview, contiguous numpy arrays). A `held`
        message is kept but not listed by :meth:`pending` until :meth:`release`.
        """

        def put(tx: Tx) -> None:
            if tx.has(self._records, msg_id):
                return
            seq = next_seq(tx, self._order)
            record = {
                "dest": dest, "envelope": envelope, "seq": seq,
                "buffers": len(buffers), "created": time.time(), "held": held,
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
            tx.delete(self._released, msg_id)
            for i in range(record["buffers"]):
                tx.delete(self._buffers, _buffer_key(record["seq"], i))
            return True

        return self._store.atomic(ack)

    def release(self, msg_id: str, envelope: dict | None = None) -> OutboxItem | None:
        """Make a held message sendable (with `envelope` instead of its own, if given) and note it
        in the released list; None when `msg_id` is not held here."""

        def release(tx: Tx) -> OutboxItem | None:
            record = tx.get(self._records, msg_id)
            if record is None or not record.get("held"):
                return None
            record["held"] = False
            if envelope is not None:
                record["envelope"] = envelope
            tx.put(self._records, msg_id, record)
            tx.put(self._released, msg_id, record["seq"])
            return self._item(tx, msg_id, record)

        return self._store.atomic(release)

    def take_released(self) -> list[str]:
        """Ids released since the last call (by this process or another), oldest first; they are
        forgotten from the released list, so each is returned once."""

        def take(tx: Tx) -> list[str]:
            found = sorted(tx.items(self._released), key=lambda kv: kv[1])
            for msg_id, _ in found:
                tx.delete(self._released, msg_id)
            return [msg_id for msg_id, _ in found]

        return self._store.atomic(take)

    def get(self, msg_id: str) -> OutboxItem | None:
        def get(tx: Tx) -> OutboxItem | None:
            record = tx.get(self._records, msg_id)
            return None if record is None else self._item(tx, msg_id, record)

        return self._store.read(get)

    def pending(self, dest: str | None = None, *, buffers: bool = True) -> list[OutboxItem]:
        """Messages to send and not yet acknowledged, oldest first, optionally only those for
        `dest` (held ones are left out). ``buffers=False`` leaves their buffers out (empty
        lists): what a listing needs, without copying every kept model out of the store."""
        return self._list(lambda record: not record.get("held") and (dest is None or record["dest"] == dest), buffers)

    def held(self, *, buffers: bool = True) -> list[OutboxItem]:
        """Held messages, oldest first (``buffers``: as for :meth:`pending`)."""
        return self._list(lambda record: bool(record.get("held")), buffers)

    def _list(self, wanted, buffers: bool) -> list[OutboxItem]:
        def scan(tx: Tx) -> list[OutboxItem]:
            items = []
            for _, msg_id in tx.items(self._order):
                record = tx.get(self._records, msg_id)
                if wanted(record):
                    items.append(self._item(tx, msg_id, record, buffers))
            return items

        return self._store.read(scan)

    def __len__(self) -> int:
        return self._store.read(lambda tx: tx.count(self._records))

    def _item(self, tx: Tx, msg_id: str, record: dict, with_buffers: bool = True) -> OutboxItem:
        count = record["buffers"] if with_buffers else 0
        buffers = [tx.get_bytes(self._buffers, _buffer_key(record["seq"], i)) for i in range(count)]
        return OutboxItem(msg_id, record["dest"], record["envelope"], buffers, record["created"],
                          bool(record.get("held")))


def _buffer_key(seq: int, index: int) -> str:
    return f"{seq_key(seq)}.{index}"
