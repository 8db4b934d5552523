"""One LMDB environment per peer: named tables and transactions that span them.

Every write is a committed LMDB transaction before the call returns, so anything a peer has
acknowledged survives a crash. When the memory map is full it is doubled and the transaction run
again, so callers never see "map full".

One Store per folder per process. LMDB's locks belong to the process: opening a folder twice in
one process, or using a Store inherited across ``fork()``, corrupts the lock bookkeeping. A child
process opens its own Store (``multiprocessing`` "spawn", or open after the fork).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import lmdb

from ..errors import StoreError
from ._codec import decode_value, encode_key, encode_value
from .table import Table

T = TypeVar("T")

MAX_TABLES = 64

_open_paths: set[str] = set()  # folders open in this process, see the module docstring
_open_paths_lock = threading.Lock()


class Store:
    """An LMDB environment in folder `path` (created with mode 0700)."""

    def __init__(self, path: str | os.PathLike, *, map_size: int = 16 * 2**20, sync: bool = True):
        self._path = Path(path).absolute()
        self._path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._id = os.path.realpath(self._path)
        with _open_paths_lock:
            if self._id in _open_paths:
                raise StoreError(f"{self._path} is already open here", code="already_open")
            _open_paths.add(self._id)
        try:
            # max_spare_txns=0: cached read transactions would hold reader slots across a fork
            # (torch DataLoader workers fork), and a child cannot release them.
            self._env = lmdb.open(
                str(self._path), map_size=map_size, max_dbs=MAX_TABLES, sync=sync,
                metasync=sync, max_spare_txns=0, mode=0o600,
            )
        except lmdb.Error as exc:
            with _open_paths_lock:
                _open_paths.discard(self._id)
            raise StoreError(f"cannot open {self._path}: {exc}", code="open_failed") from exc
        self._env.reader_check()  # free the slots of readers that died without closing
        self._map_size = self._env.info()["map_size"]  # at least the size of the data already there
        self._pid = os.getpid()
        self._gate = _Gate()
        self._local = threading.local()
        self._dbs: dict[str, Any] = {}
        self._tables: dict[str, Table] = {}
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"<Store {str(self._path)!r}{' closed' if self._closed else ''}>"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the environment; waits for running transactions. Closing twice is fine."""
        if self._closed:
            return
        self._check_not_nested()
        with self._gate.exclusive():
            if self._closed:
                return
            self._closed = True
            self._env.close()
        with _open_paths_lock:
            _open_paths.discard(self._id)

    def table(self, name: str) -> Table:
        """The table `name`, created on first use; the same object for the same name."""
        table = self._tables.get(name)
        if table is None:
            self._open_db(name)
            table = self._tables.setdefault(name, Table(self, name))
        return table

    def atomic(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn(tx)`` in one write transaction and commit it; returns what `fn` returns.

        If `fn` raises, nothing it wrote is kept. `fn` may run more than once (after the map grows)
        so it must have no effects besides those made through `tx`.

        Called inside another ``atomic`` function on the same thread, it joins that transaction:
        ``store.atomic(lambda tx: (queue.done(...), audit.append(...)))`` commits both at once,
        one disk flush instead of two.
        """
        return self._run(fn, write=True)

    def read(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn(tx)`` on one consistent snapshot of all tables (writes through `tx` fail)."""
        return self._run(fn, write=False)

    def _run(self, fn: Callable[[Tx], T], *, write: bool) -> T:
        outer = getattr(self._local, "tx", None)
        if outer is not None:
            if write and not self._local.write:
                raise StoreError("cannot write inside a read-only transaction", code="nested_txn")
            return fn(outer)  # join the transaction already open on this thread
        while True:
            seen_size = self._map_size
            try:
                with self._gate.shared():
                    self._check_usable()
                    with self._env.begin(write=write) as txn:
                        tx = Tx(self, txn)
                        self._local.in_txn, self._local.tx, self._local.write = True, tx, write
                        try:
                            result = fn(tx)
                        finally:
                            self._local.in_txn, self._local.tx = False, None
                        if tx._missing_table:  # raised inside fn but swallowed by it
                            raise _MissingTable(tx._missing_table)
                        return result
            except lmdb.MapFullError:
                self._resize(2 * seen_size, seen_size)
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                self._resize(0, seen_size)
            except _MissingTable as missing:
                self._open_db(missing.name)

    def _resize(self, new_size: int, seen_size: int) -> None:
        with self._gate.exclusive():  # LMDB requires that no transaction of ours is open
            self._check_usable()
            if self._map_size == seen_size:  # else another thread has already resized it
                self._env.set_mapsize(new_size)
                self._map_size = self._env.info()["map_size"]

    def _open_db(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise StoreError(f"table names are non-empty str, not {name!r}", code="bad_table")
        key = encode_key(name)
        if name in self._dbs:
            return

        def create(tx: Tx):
            return self._env.open_db(key, txn=tx._txn, create=True)

        # The handle becomes shared only once its creating transaction commits, so keep it after.
        try:
            self._dbs.setdefault(name, self._run(create, write=True))
        except lmdb.DbsFullError:
            raise StoreError(
                f"a store holds at most {MAX_TABLES} tables", code="too_many_tables"
            ) from None

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreError(f"store {self._path} is closed", code="closed")
        if os.getpid() != self._pid:
            raise StoreError("a Store cannot be used across fork(); open a new one", code="forked")

    def _check_not_nested(self) -> None:
        # A second transaction on this thread would wait for the first one: a silent deadlock.
        if getattr(self._local, "in_txn", False):
            raise StoreError(
                "store called inside a transaction function; use its tx argument", code="nested_txn"
            )


class Tx:
    """The transaction handed to ``Store.atomic`` / ``Store.read``, valid only during that call.

    Values returned are decoded copies, safe to keep after the transaction ends.
    """

    def __init__(self, store: Store, txn: lmdb.Transaction):
        self._store = store
        self._txn = txn
        self._missing_table: str | None = None

    def get(self, table: str, key: str, default: Any = None) -> Any:
        raw = self._txn.get(encode_key(key), db=self._db(table))
        return default if raw is None else decode_value(raw, f"{table}[{key!r}]")

    def put(self, table: str, key: str, value: Any) -> None:
        self._txn.put(encode_key(key), encode_value(value), db=self._db(table))

    def get_bytes(self, table: str, key: str) -> bytes | None:
        return self._txn.get(encode_key(key), db=self._db(table))

    def put_bytes(self, table: str, key: str, data) -> None:
        """Store any bytes-like object (bytes, memoryview, contiguous numpy array) as is."""
        self._txn.put(encode_key(key), data, db=self._db(table))

    def has(self, table: str, key: str) -> bool:
        """Whether `key` is there, without copying its value out."""
        return self._txn.cursor(db=self._db(table)).set_key(encode_key(key))

    def delete(self, table: str, key: str) -> bool:
        """Remove `key`; False when it was not there."""
        return self._txn.delete(encode_key(key), db=self._db(table))

    def items(
        self, table: str, prefix: str = "", *, start: str | None = None, limit: int | None = None
    ) -> list[tuple[str, Any]]:
        """(key, value) pairs whose key starts with `prefix` (and is >= `start`), sorted by key."""
        return [
            (key, decode_value(raw, f"{table}[{key!r}]"))
            for key, raw in self._scan(table, prefix, start, limit)
        ]

    def items_bytes(
        self, table: str, prefix: str = "", *, start: str | None = None, limit: int | None = None
    ) -> list[tuple[str, bytes]]:
        """Like `items` but values are the raw stored bytes."""
        return list(self._scan(table, prefix, start, limit))

    def keys(self, table: str, prefix: str = "") -> list[str]:
        return [key for key, _ in self._scan(table, prefix, None, None, values=False)]

    def last(self, table: str) -> tuple[str, Any] | None:
        """The (key, value) pair with the greatest key, None when the table is empty."""
        cursor = self._txn.cursor(db=self._db(table))
        if not cursor.last():
            return None
        key = cursor.key().decode()
        return key, decode_value(cursor.value(), f"{table}[{key!r}]")

    def count(self, table: str) -> int:
        return self._txn.stat(self._db(table))["entries"]

    def _scan(
        self, table: str, prefix: str, start: str | None, limit: int | None, *, values: bool = True
    ) -> Iterator[tuple[str, bytes | None]]:
        cursor = self._txn.cursor(db=self._db(table))
        raw_prefix = prefix.encode()
        if not cursor.set_range(max(prefix, start or "").encode()):
            return
        for n, key in enumerate(cursor.iternext(keys=True, values=False)):
            if (limit is not None and n >= limit) or not key.startswith(raw_prefix):
                return
            yield key.decode(), (cursor.value() if values else None)

    def _db(self, table: str):
        db = self._store._dbs.get(table)
        if db is None:  # Store._run creates the table and runs the function again
            self._missing_table = table
            raise _MissingTable(table)
        return db


class _MissingTable(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _Gate:
    """Transactions share the gate; resizing the map or closing the environment takes it alone.

    LMDB forbids both while any transaction of the process is open. A waiting exclusive holder
    keeps new transactions out, so a stream of readers cannot starve a resize.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not (self._exclusive or self._waiting))
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not (self._exclusive or self._shared))
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
