"""The hosted models a node's operator joined (``meshfl node join`` / ``leave``), kept in its LMDB.

A join names a trusted host (a peer with an endpoint: the node dials out to it, as to a
researcher), a model it hosts and the node's dataset to train it on. Every change is audited.
Beside it the node keeps what it last pulled of the model (table ``hosted.cache``: version, hash,
plan; the tensors in a pack) and why it stopped asking, if it did (``blocked``: a plan awaiting
approval, a policy that refuses the model): see :mod:`meshfl.node._hosted`.
"""

from __future__ import annotations

import time

from ..errors import ConfigError
from ..hosted._config import check_model_name
from ..store import AuditLog, Store

JOINS = "hosted.joins"
CACHE = "hosted.cache"


def join_key(host: str, model: str) -> str:
    return f"{host}/{model}"


def cache_blob(key: str) -> str:
    """The pack holding a join's cached model (blob names hold no '/')."""
    return "hosted." + key.replace("/", ".")


class Joins:
    def __init__(self, store: Store, audit: AuditLog) -> None:
        self._store, self._audit = store, audit

    def join(self, host: str, host_name: str, model: str, dataset: str, by: str = "operator") -> dict:
        """Join (or re-join with another dataset) ``model`` of ``host``; returns the record."""
        check_model_name(model)
        record = {"host": host, "host_name": host_name, "model": model, "dataset": dataset,
                  "joined": time.time(), "by": by}

        def write(tx) -> None:
            tx.put(JOINS, join_key(host, model), record)
            self._audit.append("hosted.joined", host=host, host_name=host_name, model=model, dataset=dataset,
                               by=by)

        self._store.atomic(write)
        return record

    def leave(self, host: str, model: str, by: str = "operator") -> bool:
        """Stop serving ``model`` of ``host`` (a diff already in the outbox is still sent)."""
        key = join_key(host, model)

        def write(tx) -> bool:
            if not tx.delete(JOINS, key):
                return False
            tx.delete(CACHE, key)
            self._audit.append("hosted.left", host=host, model=model, by=by)
            return True

        return self._store.atomic(write)

    def list(self) -> list[dict]:
        return self._store.read(lambda tx: [r for _, r in tx.items(JOINS)])

    def get(self, key: str) -> dict | None:
        return self._store.read(lambda tx: tx.get(JOINS, key))

    def update(self, key: str, **changes) -> None:
        """Change the node's own fields of a join (``blocked``); a join left meanwhile stays left."""

        def write(tx) -> None:
            record = tx.get(JOINS, key)
            if record is not None:
                tx.put(JOINS, key, {**record, **changes})

        self._store.atomic(write)

    def cache(self, key: str) -> dict | None:
        return self._store.read(lambda tx: tx.get(CACHE, key))

    def set_cache(self, key: str, record: dict) -> None:
        self._store.atomic(lambda tx: tx.put(CACHE, key, record) if tx.has(JOINS, key) else None)


def find_host(trusted: list[dict], host: str) -> dict:
    """The trusted peer named or identified by ``host``; it must have an endpoint to dial."""
    for entry in trusted:
        if host in (entry["peer_id"], entry["name"]):
            if not entry.get("endpoint"):
                raise ConfigError(f"trusted peer {entry['name']} has no endpoint: trust its card again with "
                                  f"--endpoint, so this node can dial it", code="no_endpoint")
            return entry
    raise ConfigError(f"no trusted peer named {host!r} (meshfl peer trust --key CARD --endpoint ...)",
                      code="not_trusted")
