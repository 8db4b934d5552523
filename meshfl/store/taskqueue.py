"""A durable queue of tasks: pending -> running -> done | failed, or pending -> cancelled.

Tasks belong to lanes (a node's lane is the researcher that sent the task). ``claim`` serves the
lanes round-robin, each lane first in first out, so one lane's backlog never starves another
(:func:`next_lane`). Tables per queue `name`: ``name`` (task id -> task record), ``name.order``
(sequence number -> task id, every task, in push order), ``name.pending`` (the same for pending
tasks only, so ``claim`` never scans finished work), ``name.lane`` (lane + 0x1f + sequence number
-> task id, pending tasks), ``name.lanes`` (lane + 0x1f -> its pending count) and ``name.meta`` (the
lane served last). Each state change is one transaction, so after a crash every task is wholly
in one state, listed in every index it belongs to, and the round-robin resumes where it was.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import StoreError
from ._codec import next_seq, seq_key
from .store import Store, Tx

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})


@dataclass(frozen=True)
class Task:
    id: str
    seq: int
    state: str
    payload: dict
    result: dict | None
    error: dict | None
    attempts: int
    created: float
    updated: float
    lane: str = ""


_SEP = "\x1f"  # between a lane and a sequence number in the lane index; lanes hold no control characters


def next_lane(lanes: list[str], last: str | None) -> str | None:
    """The lane to serve next: the first of the sorted ``lanes`` (those with pending tasks) after
    ``last``, the lane served last, wrapping around; None when no lane has work."""
    if not lanes:
        return None
    ordered = sorted(lanes)
    if last is None:
        return ordered[0]
    return next((lane for lane in ordered if lane > last), ordered[0])


class TaskQueue:
    def __init__(self, store: Store, name: str = "tasks"):
        self._store = store
        self._tasks, self._order, self._pending = name, f"{name}.order", f"{name}.pending"
        self._lane, self._lanes, self._meta = f"{name}.lane", f"{name}.lanes", f"{name}.meta"

    def push(self, payload: dict, task_id: str | None = None, *, lane: str = "") -> str:
        """Add a pending task to ``lane``; pushing an id that already exists changes nothing."""
        task_id = uuid.uuid4().hex if task_id is None else task_id
        if not isinstance(lane, str) or any(c < " " for c in lane) or len(lane) > 200:
            raise StoreError("a lane is a string of at most 200 characters, no control characters", code="bad_key")

        def push(tx: Tx) -> None:
            if tx.has(self._tasks, task_id):
                return
            now = time.time()
            seq = next_seq(tx, self._order)
            task = Task(task_id, seq, PENDING, payload, None, None, 0, now, now, lane)
            self._save(tx, task)
            tx.put(self._order, seq_key(seq), task_id)
            self._enqueue(tx, task)

        self._store.atomic(push)
        return task_id

    def claim(self) -> Task | None:
        """Mark the oldest pending task of the next lane (round-robin) running and return it;
        None when nothing is pending."""

        def claim(tx: Tx) -> Task | None:
            lane = next_lane([key[:-1] for key in tx.keys(self._lanes)], tx.get(self._meta, "last"))
            if lane is None:
                return None
            ((_, task_id),) = tx.items(self._lane, lane + _SEP, limit=1)
            task = self._load(tx, task_id)
            self._dequeue(tx, task)
            tx.put(self._meta, "last", lane)
            return self._save(tx, task, state=RUNNING, attempts=task.attempts + 1)

        if not self._store.read(lambda tx: tx.count(self._lanes)):
            return None  # nothing pending: no write transaction (a runner asks after every task)
        return self._store.atomic(claim)

    def done(self, task_id: str, result: dict | None = None) -> Task:
        return self._finish(task_id, DONE, result=result)

    def fail(self, task_id: str, error: dict) -> Task:
        return self._finish(task_id, FAILED, error=error)

    def cancel(self, task_id: str) -> bool:
        """Cancel a pending task; False when it is unknown or no longer pending."""

        def cancel(tx: Tx) -> bool:
            task = self._load(tx, task_id, missing_ok=True)
            if task is None or task.state != PENDING:
                return False
            self._dequeue(tx, task)
            self._save(tx, task, state=CANCELLED)
            return True

        return self._store.atomic(cancel)

    def recover(self, requeue: bool = True) -> list[Task]:
        """Deal with tasks a crash left running; call once at start-up, before any claim.

        With `requeue` they become pending again at their original place in the queue; otherwise
        they fail with error code "interrupted". Returns them, changed, in queue order.
        """

        def recover(tx: Tx) -> list[Task]:
            recovered = []
            tasks = self._all(tx)
            if tx.count(self._lane) != tx.count(self._pending):  # a queue written before lanes
                for task in tasks:
                    if task.state == PENDING:
                        self._dequeue(tx, task)
                        self._enqueue(tx, task)
            for task in tasks:
                if task.state != RUNNING:
                    continue
                if requeue:
                    self._enqueue(tx, task)
                    recovered.append(self._save(tx, task, state=PENDING))
                else:
                    error = {"code": "interrupted", "message": "its process stopped mid-task"}
                    recovered.append(self._save(tx, task, state=FAILED, error=error))
            return recovered

        return self._store.atomic(recover)

    def remove_finished(self, older_than: float | None = None) -> int:
        """Delete done, failed and cancelled tasks finished at least `older_than` seconds ago
        (all of them when None); returns how many."""

        def remove(tx: Tx) -> int:
            cutoff = None if older_than is None else time.time() - older_than
            removed = 0
            for task in self._all(tx):
                if task.state in FINISHED and (cutoff is None or task.updated <= cutoff):
                    tx.delete(self._tasks, task.id)
                    tx.delete(self._order, seq_key(task.seq))
                    removed += 1
            return removed

        return self._store.atomic(remove)

    def get(self, task_id: str) -> Task | None:
        return self._store.read(lambda tx: self._load(tx, task_id, missing_ok=True))

    def list(self, state: str | None = None) -> list[Task]:
        """Tasks in queue order, optionally only those in `state`."""
        tasks = self._store.read(self._all)
        return tasks if state is None else [task for task in tasks if task.state == state]

    def recent(self, limit: int) -> list[Task]:
        """The `limit` newest tasks, newest first (reads only those)."""

        def recent(tx: Tx) -> list[Task]:
            last = tx.last(self._order)
            if last is None:
                return []
            start = seq_key(max(0, int(last[0]) - limit + 1))
            ids = [task_id for _, task_id in tx.items(self._order, start=start)]
            return [self._load(tx, task_id) for task_id in reversed(ids)]

        return self._store.read(recent)

    def counts(self) -> dict[str, int]:
        """How many tasks are in each state, from one snapshot."""

        def counts(tx: Tx) -> dict[str, int]:
            out = dict.fromkeys((PENDING, RUNNING, DONE, FAILED, CANCELLED), 0)
            for _, record in tx.items(self._tasks):
                out[record["state"]] += 1
            return out

        return self._store.read(counts)

    def count(self, state: str | None = None) -> int:
        if state is None:
            return self._store.read(lambda tx: tx.count(self._tasks))
        if state == PENDING:
            return self._store.read(lambda tx: tx.count(self._pending))
        return len(self.list(state))

    def _finish(self, task_id: str, state: str, **changes: Any) -> Task:
        def finish(tx: Tx) -> Task:
            task = self._load(tx, task_id)
            if task.state != RUNNING:
                raise StoreError(
                    f"task {task_id!r} is {task.state}, only a running task can become {state}",
                    code="bad_state",
                    details={"task_id": task_id, "state": task.state},
                )
            return self._save(tx, task, state=state, **changes)

        return self._store.atomic(finish)

    def _enqueue(self, tx: Tx, task: Task) -> None:
        """List a pending task in the pending and lane indexes."""
        tx.put(self._pending, seq_key(task.seq), task.id)
        tx.put(self._lane, task.lane + _SEP + seq_key(task.seq), task.id)
        key = task.lane + _SEP  # never empty, as a key must not be
        tx.put(self._lanes, key, tx.get(self._lanes, key, 0) + 1)

    def _dequeue(self, tx: Tx, task: Task) -> None:
        """Take a task out of the pending and lane indexes (what of it is there)."""
        tx.delete(self._pending, seq_key(task.seq))
        if tx.delete(self._lane, task.lane + _SEP + seq_key(task.seq)):
            key = task.lane + _SEP
            left = tx.get(self._lanes, key, 1) - 1
            if left > 0:
                tx.put(self._lanes, key, left)
            else:
                tx.delete(self._lanes, key)

    def _all(self, tx: Tx) -> list[Task]:
        return [self._load(tx, task_id) for _, task_id in tx.items(self._order)]

    def _load(self, tx: Tx, task_id: str, *, missing_ok: bool = False) -> Task | None:
        record = tx.get(self._tasks, task_id)
        if record is None:
            if missing_ok:
                return None
            raise StoreError(f"no task {task_id!r}", code="not_found", details={"task_id": task_id})
        return Task(**record)

    def _save(self, tx: Tx, task: Task, **changes: Any) -> Task:
        """Write `task` with `changes` applied; a change also stamps `updated`."""
        if changes:
            task = dataclasses.replace(task, updated=time.time(), **changes)
        tx.put(self._tasks, task.id, vars(task))  # not asdict(): it deep-copies the payload
        return task
