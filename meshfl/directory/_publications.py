"""The datasets a node publishes, and to which directories (table ``published``).

The operator opts each dataset in (``meshfl dataset publish NAME --directory DIR``): dataset ->
directories and since when. The running node (meshfl.directory._links) signs the entries with its
identity key when it sends them; removing or unpublishing a dataset withdraws it.
"""

from __future__ import annotations

import logging
import time

from ..errors import ConfigError, DatasetError
from ..home import Home
from ..node._datasets import DatasetRegistry
from ._signed import MAX_DOCUMENT_BYTES, entry_for

log = logging.getLogger("meshfl.directory")

TABLE = "published"


class Publications:
    """Which datasets this node publishes, and to which directories."""

    def __init__(self, home: Home):
        self._home = home
        self._table = home.store.table(TABLE)

    def publish(self, dataset: str, directory: str) -> dict:
        """Publish ``dataset`` (a registered one) to the trusted directory ``directory`` (name or id)."""
        entry = _directory(self._home, directory)
        record = DatasetRegistry(self._home.store).get(dataset)
        minimum = self._home.config.minimum_samples
        if record["samples"] is not None and record["samples"] < minimum:
            raise DatasetError(f"{dataset} has fewer than minimum_samples={minimum} samples: it is served to "
                               f"nobody, so it is not published", code="too_few_samples")
        row = self._table.get(dataset) or {"directories": [], "since": time.time()}
        if entry["peer_id"] not in row["directories"]:
            row = {**row, "directories": sorted([*row["directories"], entry["peer_id"]])}

        def commit(tx) -> None:
            tx.put(TABLE, dataset, row)
            self._home.audit.append("dataset.published", name=dataset, directory=entry["peer_id"])

        self._home.store.atomic(commit)
        return self._view(dataset, row)

    def unpublish(self, dataset: str, directory: str | None = None) -> dict:
        """Withdraw ``dataset`` from ``directory`` (name or id), or from every directory."""
        row = self._table.get(dataset)
        if row is None:
            raise DatasetError(f"{dataset} is not published", code="not_published")
        gone = row["directories"] if directory is None else [_directory(self._home, directory)["peer_id"]]
        left = [d for d in row["directories"] if d not in gone]

        def commit(tx) -> None:
            if left:
                tx.put(TABLE, dataset, {**row, "directories": left})
            else:
                tx.delete(TABLE, dataset)
            self._home.audit.append("dataset.unpublished", name=dataset, directories=gone)

        self._home.store.atomic(commit)
        return self._view(dataset, {**row, "directories": left})

    def list(self) -> list[dict]:
        return [self._view(name, row) for name, row in self._table.items()]

    def entries(self, directory_id: str) -> list[dict]:
        """The signed entries this node publishes to ``directory_id`` now (registered datasets
        with enough samples only)."""
        registry = DatasetRegistry(self._home.store)
        minimum = self._home.config.minimum_samples
        out = []
        for name, row in self._table.items():
            if directory_id not in row["directories"]:
                continue
            try:
                record = registry.get(name)
            except DatasetError:
                continue  # removed since: withdrawn
            if record["samples"] is not None and record["samples"] < minimum:
                continue
            entry = entry_for(self._home.identity, record, published=row["since"])
            if len(entry["body"]) > MAX_DOCUMENT_BYTES:
                log.warning("dataset %s is not published: its entry (%d columns) exceeds %d bytes", name,
                            len(record.get("columns") or []), MAX_DOCUMENT_BYTES)
                continue
            out.append(entry)
        return out

    def _view(self, name: str, row: dict) -> dict:
        names = {e["peer_id"]: e["name"] for e in self._home.trusted()}
        return {"dataset": name, "since": row["since"],
                "directories": [names.get(d, d) for d in row["directories"]]}


def _directory(home: Home, name_or_id: str) -> dict:
    entry = home.find_trusted(name_or_id)
    if entry is None or not entry["directory"]:
        raise ConfigError(f"no trusted directory {name_or_id!r}; trust it first with "
                          f"`meshfl peer trust --directory --home {home.path} --key KEY --endpoint ENDPOINT`",
                          code="unknown_directory")
    return entry
