"""How keys and values become bytes.

Keys are UTF-8 strings, so LMDB's byte order is also their code-point order and prefix scans work
on strings. Values are JSON (orjson): readable by any tool, stable across Python versions, and
nothing in the store can execute code when read, unlike pickle.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import StoreError

MAX_KEY_BYTES = 511  # LMDB's compiled-in limit (env.max_key_size())
SEQ_DIGITS = 20  # enough for any 64-bit counter; fixed width keeps numeric order = key order


def encode_key(key: str) -> bytes:
    if not isinstance(key, str):
        raise StoreError(f"keys are str, not {type(key).__name__}", code="bad_key")
    try:
        raw = key.encode()
    except UnicodeEncodeError as exc:
        raise StoreError(f"key is not valid UTF-8: {exc}", code="bad_key") from None
    if not 0 < len(raw) <= MAX_KEY_BYTES:
        raise StoreError(
            f"keys are 1 to {MAX_KEY_BYTES} UTF-8 bytes, got {len(raw)}", code="bad_key"
        )
    return raw


def encode_value(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise StoreError(f"value cannot be stored as JSON: {exc}", code="bad_value") from None


def decode_value(raw: bytes, where: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"{where} does not hold JSON: {exc}", code="corrupt") from None


def seq_key(seq: int) -> str:
    """The key of entry number `seq` in an ordered table."""
    return f"{seq:0{SEQ_DIGITS}d}"


def next_seq(tx, table: str) -> int:
    """The number after the last one used in an ordered table (0 when it is empty)."""
    last = tx.last(table)
    return int(last[0]) + 1 if last else 0
