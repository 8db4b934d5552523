"""A named table: str keys to JSON values, or to raw bytes for large binary data.

Each call is its own transaction, committed before it returns. To change several keys or tables
together, use ``Store.atomic``. Keep JSON and raw-bytes values in separate tables: ``get`` and
``items`` decode JSON, and raw bytes are not JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import Store


class Table:
    def __init__(self, store: Store, name: str):
        self._store = store
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<Table {self._name!r} of {self._store!r}>"

    def get(self, key: str, default: Any = None) -> Any:
        return self._store.read(lambda tx: tx.get(self._name, key, default))

    def put(self, key: str, value: Any) -> None:
        self._store.atomic(lambda tx: tx.put(self._name, key, value))

    def delete(self, key: str) -> bool:
        """Remove `key`; False when it was not there."""
        return self._store.atomic(lambda tx: tx.delete(self._name, key))

    def get_bytes(self, key: str) -> bytes | None:
        return self._store.read(lambda tx: tx.get_bytes(self._name, key))

    def put_bytes(self, key: str, data) -> None:
        """Store a bytes-like object (bytes, memoryview, contiguous numpy array) as it is."""
        self._store.atomic(lambda tx: tx.put_bytes(self._name, key, data))

    def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        """(key, value) pairs whose key starts with `prefix`, sorted by key."""
        return self._store.read(lambda tx: tx.items(self._name, prefix))

    def keys(self, prefix: str = "") -> list[str]:
        return self._store.read(lambda tx: tx.keys(self._name, prefix))

    def __len__(self) -> int:
        return self._store.read(lambda tx: tx.count(self._name))

    def __contains__(self, key: str) -> bool:
        return self._store.read(lambda tx: tx.has(self._name, key))
