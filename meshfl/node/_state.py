"""What a node keeps of an experiment between rounds: SCAFFOLD's control variate, personalised layers.

Per researcher and experiment, one tensor pack under ``home/blobs`` (written by the worker, named
after the task that made it) and one record in the LMDB table ``experiment_state`` naming the
packs of the last rounds. A task of round ``r`` starts from the newest pack of a round before
``r``; the pack it writes becomes round ``r``'s in the same commit as the task's result, and only
then is the pack before its start pack removed. So a task interrupted by a crash leaves the state
as it was, and a round run again (the researcher resumed it after a crash) starts where its first
run started - the node's side of an exact resume.

Packs are not fsynced (see :mod:`meshfl.store.blobs`): after an OS crash a lost state pack is
logged, audited (``experiment_state.lost``) and the experiment goes on from a fresh state.
"""

from __future__ import annotations

import os

from ..store import Store
from ..store.blobs import BlobStore

TABLE = "experiment_state"


class ExperimentState:
    def __init__(self, store: Store, blobs: BlobStore, audit, log) -> None:
        self._store = store
        self._table = store.table(TABLE)
        self._blobs = blobs
        self._audit = audit
        self._log = log

    @staticmethod
    def _key(researcher: str, experiment: str) -> str:
        return f"{researcher}/{experiment}"

    @staticmethod
    def output(task_id: str) -> str:
        """The name of the pack a task writes its experiment state to."""
        return f"{task_id}.state"

    def job_fields(self, task_id: str, researcher: str, experiment: str, rnd: int) -> dict:
        """The worker job's ``state`` (the pack to start from, or None) and ``state_out`` paths."""
        record = self._table.get(self._key(researcher, experiment)) or {"packs": []}
        earlier = [name for r, name in record["packs"] if r < rnd]
        start = self._blobs.path(earlier[-1]) if earlier else None
        if start is not None and not os.path.exists(start):
            self._log.warning("experiment %s: its state pack %s is lost (OS crash?): starting from a fresh state",
                              experiment, earlier[-1])
            self._audit.append("experiment_state.lost", researcher=researcher, experiment=experiment, pack=earlier[-1])
            start = None
        return {"state": start, "state_out": self._blobs.path(self.output(task_id))}

    def commit(self, task_id: str, researcher: str, experiment: str, rnd: int) -> list[str]:
        """Make the task's pack round ``rnd``'s state (joins the caller's transaction); returns
        the packs no longer needed, to delete once that transaction committed."""
        key = self._key(researcher, experiment)
        packs = (self._table.get(key) or {"packs": []})["packs"]
        earlier = [p for p in packs if p[0] < rnd]
        keep = earlier[-1:] + [[rnd, self.output(task_id)]]
        self._table.put(key, {"packs": keep})
        return [name for _, name in packs if [_, name] not in keep]

    def delete(self, names) -> None:
        for name in names:
            self._blobs.delete(name)
