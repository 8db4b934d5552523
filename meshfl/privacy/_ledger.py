"""The node's privacy ledger: what each dataset's released results have cost, against its budget.

Tables:

* ``privacy.spent`` - dataset -> ``{"rdp": summed RDP curve, "entries": n}``;
* ``privacy.ledger`` - task id -> the debit of that task's released result (dataset, researcher,
  mechanism, its marginal epsilon, time): one entry per released result, never two;
* ``privacy.reserved`` - task id -> the curve of a task accepted but not yet released, so that
  tasks queued together cannot overspend a budget that each alone would fit.

Every method joins the caller's transaction (``Store.atomic``), so the release step debits in the
same commit that puts the result in the outbox and appends its audit record: a crash either keeps
all three or none.
"""

from __future__ import annotations

import time
from typing import Sequence

from ..store import Store
from . import _accountant

SPENT = "privacy.spent"
LEDGER = "privacy.ledger"
RESERVED = "privacy.reserved"


class Ledger:
    def __init__(self, store: Store) -> None:
        self._store = store

    def reserve(self, task_id: str, dataset: str, mechanism: Sequence[float]) -> None:
        """Set an accepted task's cost aside until it is released (:meth:`debit`) or ends without a
        release (:meth:`unreserve`)."""
        curve = _accountant.rdp_curve([mechanism])
        self._store.atomic(lambda tx: tx.put(RESERVED, task_id, {"dataset": dataset, "mechanism": list(mechanism),
                                                                  "rdp": curve}))

    def unreserve(self, task_id: str) -> bool:
        return self._store.atomic(lambda tx: tx.delete(RESERVED, task_id))

    def debit(self, task_id: str, dataset: str, researcher: str, mechanism: Sequence[float], delta: float) -> dict:
        """Record the release of ``task_id``'s result; a task already debited is not debited again."""

        def debit(tx) -> dict:
            entry = tx.get(LEDGER, task_id)
            if entry is not None:
                return entry
            reserved = tx.get(RESERVED, task_id)
            curve = reserved["rdp"] if reserved is not None else _accountant.rdp_curve([mechanism])
            tx.delete(RESERVED, task_id)
            spent = tx.get(SPENT, dataset) or {"rdp": [], "entries": 0}
            before = _accountant.epsilon(spent["rdp"], delta)
            total = _accountant.add_curves(spent["rdp"], curve)
            after = _accountant.epsilon(total, delta)
            tx.put(SPENT, dataset, {"rdp": total, "entries": spent["entries"] + 1})
            entry = {"task": task_id, "dataset": dataset, "researcher": researcher, "mechanism": list(mechanism),
                     "epsilon": after - before, "epsilon_total": after, "delta": delta, "ts": time.time()}
            tx.put(LEDGER, task_id, entry)
            return entry

        return self._store.atomic(debit)

    def spent(self, dataset: str, delta: float) -> float:
        """Epsilon the dataset's released results have cost, at ``delta``."""
        record = self._store.read(lambda tx: tx.get(SPENT, dataset))
        return _accountant.epsilon(record["rdp"], delta) if record else 0.0

    def cost(self, dataset: str, mechanism: Sequence[float], delta: float) -> float:
        """Epsilon that releasing a result of ``mechanism`` now would add to what the dataset has
        spent: what :meth:`debit` would record for it (reservations do not change it)."""
        record = self._store.read(lambda tx: tx.get(SPENT, dataset))
        spent = record["rdp"] if record else []
        total = _accountant.add_curves(spent, _accountant.rdp_curve([mechanism]))
        return _accountant.epsilon(total, delta) - _accountant.epsilon(spent, delta)

    def committed(self, dataset: str, delta: float, extra: Sequence[float] | None = None,
                  exclude: str | None = None) -> float:
        """Epsilon spent plus what the dataset's reserved tasks (but ``exclude``) would add, and
        ``extra`` (a mechanism) on top: the figure a new task must fit in."""

        def read(tx) -> list:
            record = tx.get(SPENT, dataset)
            curves = [record["rdp"]] if record else []
            curves += [r["rdp"] for key, r in tx.items(RESERVED) if r["dataset"] == dataset and key != exclude]
            return curves

        curves = self._store.read(read)
        if extra is not None:
            curves.append(_accountant.rdp_curve([extra]))
        return _accountant.epsilon(_accountant.add_curves(*curves), delta)

    def entry(self, task_id: str) -> dict | None:
        return self._store.read(lambda tx: tx.get(LEDGER, task_id))

    def entries(self, dataset: str | None = None) -> list[dict]:
        """Debits, oldest first, optionally only ``dataset``'s."""
        found = self._store.read(lambda tx: [v for _, v in tx.items(LEDGER)])
        return sorted((e for e in found if dataset is None or e["dataset"] == dataset), key=lambda e: e["ts"])

    def reserved(self) -> dict[str, dict]:
        return dict(self._store.read(lambda tx: tx.items(RESERVED)))
