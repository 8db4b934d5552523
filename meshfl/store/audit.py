"""An append-only audit log whose records form a hash chain.

Each record carries the SHA-256 of its own content and the hash of the record before it, so
changing or removing any stored record breaks the chain at that record, and ``verify`` says where.
The chain cannot reveal that its newest records were cut off: to catch that, keep the head hash
somewhere else (another peer, a printout) and compare.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import AuditError, StoreError
from ._codec import decode_value, encode_value, seq_key
from .store import Store, Tx

GENESIS = "0" * 64  # the `prev` of the first record
_HASHED = ("index", "ts", "event", "fields", "prev")
_VERIFY_BATCH = 1000  # records per read transaction, so a long log needs no big snapshot


@dataclass(frozen=True)
class AuditRecord:
    index: int
    ts: float
    event: str
    fields: dict
    prev: str
    hash: str


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int  # records that verified, from the first
    first_bad: int | None
    reason: str  # "" when ok

    def check(self) -> VerifyResult:
        """Raise AuditError when the chain does not verify; otherwise return self."""
        if not self.ok:
            raise AuditError(
                f"audit chain broken at record {self.first_bad}: {self.reason}",
                details={"index": self.first_bad, "reason": self.reason},
            )
        return self


class AuditLog:
    def __init__(self, store: Store, name: str = "audit"):
        self._store = store
        self._name = name

    def append(self, event: str, **fields: Any) -> AuditRecord:
        """Add a record; `fields` must be JSON-serialisable. Safe from several threads at once."""
        if not isinstance(event, str):
            raise StoreError(f"event is a str, not {type(event).__name__}", code="bad_value")
        # Hash exactly what will be read back (tuples become lists, and so on).
        fields = decode_value(encode_value(fields), "audit fields")

        def append(tx: Tx) -> AuditRecord:
            head = tx.last(self._name)  # read and write in one transaction: the chain cannot fork
            index, prev = (head[1]["index"] + 1, head[1]["hash"]) if head else (0, GENESIS)
            body = {
                "index": index, "ts": time.time(), "event": event, "fields": fields, "prev": prev,
            }
            body["hash"] = _digest(body)
            tx.put(self._name, seq_key(index), body)
            return AuditRecord(**body)

        return self._store.atomic(append)

    def records(self, start: int = 0, limit: int | None = None) -> list[AuditRecord]:
        found = self._store.read(lambda tx: tx.items(self._name, start=seq_key(start), limit=limit))
        return [AuditRecord(**record) for _, record in found]

    def head(self) -> AuditRecord | None:
        last = self._store.read(lambda tx: tx.last(self._name))
        return None if last is None else AuditRecord(**last[1])

    def __len__(self) -> int:
        return self._store.read(lambda tx: tx.count(self._name))

    def verify(self) -> VerifyResult:
        """Walk the chain from the first record; report the first one that does not check out."""
        index, prev = 0, GENESIS
        while True:
            start = seq_key(index)
            batch = self._store.read(
                lambda tx: tx.items_bytes(self._name, start=start, limit=_VERIFY_BATCH)
            )
            for key, raw in batch:
                reason, record = _check(key, raw, index, prev)
                if reason:
                    return VerifyResult(False, index, index, reason)
                index, prev = index + 1, record["hash"]
            if len(batch) < _VERIFY_BATCH:
                return VerifyResult(True, index, None, "")


def _digest(body: dict) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _check(key: str, raw: bytes, index: int, prev: str) -> tuple[str, dict | None]:
    """Why the stored record at `key` is not record `index` following `prev` ("" if it is)."""
    if key != seq_key(index):
        return "missing record", None
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or set(record) != {*_HASHED, "hash"}:
        return "malformed record", None
    if _digest({name: record[name] for name in _HASHED}) != record["hash"]:
        return "hash mismatch", record
    if record["index"] != index:
        return "bad index", record
    if record["prev"] != prev:
        return "broken link", record
    return "", record
