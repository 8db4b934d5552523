"""The node daemon: answers researchers, queues their training tasks, runs them, returns results.

Threads: the Peer's I/O thread owns the sockets; its dispatcher thread runs :meth:`Node._handle`
(pings, searches and plan queries are answered at once, even while a task trains); one runner
thread takes tasks from the durable queue to the executor's worker process.

Crash safety (design §3): a task is committed to the LMDB queue and its input model to a pack
file before the researcher hears ``train.accepted``; a result is committed to the outbox before
the task is marked done, and stays there until the researcher's ``result.ack``. On restart, a
task left running is reported failed (``interrupted``: its worker trains in place in the task's
pack, which may hold a half-trained model), and every unacknowledged result is re-sent when the
researcher's link comes up - but for a secure round's masked vector, kept in memory only (see
``_masked``): that result is reported lost, as the node has dropped out of the round.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import stat
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__, analytics
from .._gc import freeze_startup_objects
from ..directory import NodeDirectories
from ..errors import MeshflError
from ..home import Home
from ..overlay import Overlay, OverlayRejected, bundle, unbundle
from ..privacy import DPSpec, Ledger, Request, clip_and_noise, public_policy
from ..protocol import CHUNK_BYTES, INLINE_RESULT_BYTES, chunk_plan, layout_of
from ..secagg import Encoding, NodeSession, NodeSessions, SecAggError, UpdateEncoder, frac_bits_for
from ..store import Outbox, TaskQueue
from ..store.blobs import BlobStore
from ..transport import Peer
from ..wire import Message
from ._datasets import DatasetRegistry
from ._executor import Executor, TaskFailed
from ._hosted import HostedJoiner
from ._masked import MaskedResults
from ._plans import APPROVED, PlanError, PlanRegistry, plan_hash, review_commands
from ._presence import NodeLock, links_down, record_link
from ._release import Release, home_gate
from ._state import ExperimentState

KEYS_TIMEOUT_S = 60.0  # a secure task waits this long after training for the members' keys
# (the researcher sends them once every participant answered the set-up, within 30 s)

_TASK_ID = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
RELEASE_CHECK_S = 5.0  # how often the outbox is checked for releases nobody announced


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


class _NodeLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['peer']}] {msg}", kwargs


class Node:
    """A data site. ``Node(home).run()`` serves until SIGINT/SIGTERM."""

    def __init__(self, home: str | Path | Home, *, dev: bool | None = None, peer_options: dict | None = None) -> None:
        self.home = home if isinstance(home, Home) else Home.open(home)
        cfg = self.home.config
        self.name = cfg.name
        self.dev = cfg.dev if dev is None else dev
        self.log = _NodeLog(logging.getLogger("meshfl.node"), {"peer": self.name})
        store, self.audit = self.home.store, self.home.audit
        self.datasets = DatasetRegistry(store, self.audit)
        self.plans = PlanRegistry(store, self.audit)
        self.queue = TaskQueue(store, "tasks")
        self.outbox = Outbox(store, "outbox")
        self.ledger = Ledger(store)
        self.gate = home_gate(self.home, self.ledger, self._check_plan)
        self.release = Release(store, self.outbox, self.queue, self.ledger, self.audit, self.gate)
        self.blobs = BlobStore(self.home.path / "blobs")
        self.executor = Executor(name=self.name, sandbox=cfg.sandbox_settings())
        self.state = ExperimentState(store, self.blobs, self.audit, self.log)  # SCAFFOLD's c_i, local layers
        options = {"heartbeat": cfg.heartbeat, "dead_after": cfg.dead_after, **(peer_options or {})}
        self.peer = Peer(
            self.home.identity, listen=cfg.listen, handler=self._handle, on_link=self._on_link, **options
        )
        self.overlay = Overlay(self.peer, self._on_overlay_message, on_reject=self._on_overlay_reject)
        self.directories = NodeDirectories(self.home, self.peer, self.log)  # publication, access requests
        self.secagg = NodeSessions()
        self.masked = MaskedResults()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._runner = threading.Thread(target=self._run_tasks, name=f"meshfl-runner-{self.name}", daemon=True)
        self._released = threading.Event()  # set when a held result was released (notify_released)
        self._sender = threading.Thread(target=self._send_released, name=f"meshfl-release-{self.name}", daemon=True)
        self._trusted_names: dict[str, str] = {}
        self._running_task: dict | None = None
        self._packs: dict[str, dict] = {}  # task id -> mapped result pack, while it is being pulled
        self._scratch_dir = os.path.join(self.home.path, "scratch", "task")  # see _scratch
        self._lock: NodeLock | None = None
        self.hosted = HostedJoiner(self)  # the hosted models the operator joined (meshfl node join)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Node":
        self._lock = NodeLock(self.home.path, dev=self.dev)  # refuses a second node on this home
        links_down(self.home.store)
        for task in self.queue.recover(requeue=False):
            # Its worker trains in place in the task's pack, so a half-trained model may be
            # there: report the task failed rather than run it again from a corrupt start.
            if self.outbox.get(task.id) is not None:
                continue  # the crash came after its result was committed: that result stands
            self.log.warning("task %s was interrupted by a restart: reporting it failed", task.id)
            mtype, fields = _result_head(task)
            fields.update(ok=False, error=task.error)
            self._atomically(lambda: self.outbox.put(task.id, task.payload["researcher"],
                                                     {"type": mtype, "fields": fields}),
                             lambda: self.ledger.unreserve(task.id),
                             lambda: self.audit.append("task.interrupted", task=task.id))
            self.blobs.delete(task.id)
            self.state.delete([ExperimentState.output(task.id)])
        self._drop_stale_reservations()
        if self.dev:
            self.log.warning("development mode: training plans run WITHOUT operator approval")
        self.peer.start()
        for entry in self.home.trusted():
            self.peer.trust(entry["card"], entry.get("endpoint"))
            self._trusted_names[entry["peer_id"]] = entry["name"]
        self.directories.start()
        self.executor.start()
        self.audit.append("node.started", dev=self.dev, version=__version__, sandbox=self.executor.protections)
        if self.executor.protections is None:
            self.log.warning("plans run without a sandbox (config.toml: sandbox = false)")
        self._runner.start()
        self._sender.start()
        self.hosted.start()
        self.log.info("node %s (%s) up; %d unacknowledged results", self.name, self.peer.peer_id, len(self.outbox))
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._released.set()
        self.executor.cancel()
        for thread in (self._runner, self._sender):
            if thread.is_alive():
                thread.join()
        self.directories.stop()
        self.peer.close()  # fails a call to a host in flight: the joiner's thread ends at once
        self.hosted.stop()
        self.executor.close()
        self._packs.clear()
        self.audit.append("node.stopped")
        self.home.close()
        if self._lock is not None:
            self._lock.release()

    def run(self) -> None:
        """Serve in the foreground until SIGINT or SIGTERM, then stop cleanly."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        signal.signal(signal.SIGUSR1, lambda *_: self.notify_released())  # `meshfl result release`
        self.start()
        freeze_startup_objects()
        self._lock.note(nudge=True)  # this process takes SIGUSR1 (one that did not would die of it)
        try:
            done.wait()
        finally:
            self.stop()

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests
    def _handle(self, msg: Message) -> Message | None:
        if self.directories.is_directory(msg.sender):  # a directory is served nothing else
            return self.directories.handle(msg)
        handler = getattr(self, "_on_" + msg.type.replace(".", "_"), None)
        if handler is None:
            raise MeshflError(f"a node does not handle {msg.type!r}", code="unknown_type")
        return handler(msg)

    def _on_ping(self, msg: Message) -> Message:
        fields = {"name": self.name, "peer_id": self.peer.peer_id, "role": "node", "version": __version__, "dev": self.dev}
        return Message("pong", fields)

    def _on_datasets_search(self, msg: Message) -> Message:
        """The datasets with the tags that this researcher may use, each with the rules it must
        meet (``policy``) and what is left of its privacy budget (``privacy``, if it has one)."""
        tags = [str(t) for t in msg.fields.get("tags") or []]
        name = self._trusted_names.get(msg.sender, "")
        found = [dict(r, policy=public_policy(self.gate.policy(r["name"]), self.home.config.minimum_samples),
                      privacy=self.gate.budget(r["name"]))
                 for r in self.datasets.search(tags, self.home.config.minimum_samples)
                 if self.gate.may_use(msg.sender, name, r["name"])]
        self.audit.append("datasets.searched", researcher=msg.sender, tags=tags, found=len(found))
        return Message("datasets.list", {"datasets": found})

    def _on_plan_status(self, msg: Message) -> Message:
        h = msg.fields["hash"]
        return Message("plan.info", {"hash": h, "status": self.plans.status(h)})

    def _on_plan_submit(self, msg: Message) -> Message:
        record = self.plans.submit(msg.fields["source"], msg.fields.get("name", ""), requester=msg.sender)
        if record["status"] == "pending":
            self._warn_pending(record["hash"], msg.sender)
        return Message("plan.info", {"hash": record["hash"], "status": record["status"]})

    def _warn_pending(self, digest: str, researcher: str) -> None:
        """Tell the operator, at a level shown without -v, that a plan waits and how to review it."""
        card = self._card_of(researcher)
        self.log.warning("training plan %s from %s awaits approval: %s", digest,
                         card.name if card else researcher, review_commands(digest, self.home.path))

    def _on_train(self, msg: Message) -> Message:
        f = msg.fields
        task_id = f["task_id"]
        if not _TASK_ID.match(task_id):
            raise MeshflError("task ids are 1-120 characters of A-Z a-z 0-9 . _ -", code="bad_field")
        existing = self._own_task(task_id, msg.sender)
        if existing is not None:  # a re-sent request: answer it again, never run it twice
            if self.outbox.get(task_id) is not None:
                self._deliver(task_id)
            return Message("train.accepted", {"task_id": task_id, "state": existing.state})
        secagg, session = self._secagg_spec(f["secagg"], msg.sender) if f.get("secagg") else (None, None)
        dp = DPSpec.from_wire(f["dp"]) if f.get("dp") is not None else None
        preprocess = analytics.preprocess.check(f["preprocess"]) if f.get("preprocess") else None
        found = self.datasets.search([str(t) for t in f["dataset_tags"]], self.home.config.minimum_samples)
        if not found:
            raise MeshflError(f"no dataset on {self.name} matches tags {f['dataset_tags']}", code="no_dataset")
        request = Request("training", msg.sender, found[0], researcher_name=self._trusted_names.get(msg.sender, ""),
                          plan_source=f["plan_source"], plan_name=f["plan_class"], secagg=session is not None,
                          summed_over=session.threshold if session is not None else 1, dp=dp,
                          training_args=f["training_args"])
        self.blobs.write(task_id, msg.tensors)  # before the task exists: never a task without its model
        if dp is not None and dp.mode == "client" and session is None:  # the noised change goes back onto it
            self.blobs.write(f"{task_id}.base", msg.tensors)
        payload = {k: f[k] for k in ("experiment", "round", "plan_source", "plan_class", "training_args", "model_args")}
        payload.update(researcher=msg.sender, secagg=secagg, dp=dp.to_wire() if dp else None, preprocess=preprocess)

        def accept(tx) -> None:  # the gate's decision, the task and its audit record: one commit
            dataset, grant = self._admit(request, found)
            payload.update(dataset=dataset, plan_hash=grant.plan_hash)
            if grant.mechanism is not None:
                payload["privacy"] = {"mechanism": list(grant.mechanism)}
                if grant.policy.epsilon is not None:
                    self.ledger.reserve(task_id, dataset, grant.mechanism)
            self.queue.push(payload, task_id=task_id, lane=msg.sender)  # lanes: fair between researchers
            self.audit.append(
                "task.accepted", task=task_id, researcher=msg.sender, experiment=f["experiment"],
                round=f["round"], plan=grant.plan_hash, dataset=dataset, dp=payload["dp"],
                epsilon=grant.epsilon if grant.mechanism is not None else None,
            )
            if session is not None:  # the round's set-up, recorded with the task that uses it
                self.audit.append("secagg.setup", session=session.session, researcher=msg.sender, task=task_id,
                                  participants=len(session.participants), threshold=session.threshold)

        try:
            self.home.store.atomic(accept)
        except MeshflError as exc:
            self.blobs.delete(task_id)
            self.blobs.delete(f"{task_id}.base")
            refusal = exc
            if isinstance(exc, PlanError):  # outside the rolled-back transaction: record the plan for review
                try:
                    self.plans.check(f["plan_source"], dev=self.dev, name=f["plan_class"], requester=msg.sender)
                except MeshflError as again:
                    refusal = again
            self.audit.append("task.refused", task=task_id, researcher=msg.sender, reason=refusal.code,
                              dataset=refusal.details.get("dataset"))
            if refusal.code == "plan_not_approved":
                self._warn_pending(refusal.details["hash"], msg.sender)
            raise refusal from None
        self._wake.set()
        return Message("train.accepted", {"task_id": task_id, "state": "pending"})

    def _own_task(self, task_id: str, researcher: str):
        """The task ``task_id`` if ``researcher`` sent it, None if there is none; another
        researcher's task of that id is refused (each researcher sees only its own tasks)."""
        task = self.queue.get(task_id)
        if task is not None and task.payload.get("researcher") != researcher:
            self.audit.append("task.refused", task=task_id, researcher=researcher, reason="task_conflict")
            raise MeshflError(f"task id {task_id} is taken on {self.name}: choose another", code="task_conflict")
        return task

    def _admit(self, request: Request, datasets: list[dict]):
        """The first of ``datasets`` the gate admits ``request`` to, and the grant; else the first
        dataset's refusal. The plan is decided (and audited) once: its refusal holds for all."""
        first, plan = None, None
        for record in datasets:
            try:
                grant = self.gate.check(replace(request, dataset=record, plan_source=None if plan else request.plan_source))
                return record["name"], replace(grant, plan_hash=plan or grant.plan_hash)
            except PlanError:
                raise
            except MeshflError as exc:
                first = first or exc
                if request.plan_source is not None:
                    plan = plan or plan_hash(request.plan_source)
        raise first

    def _check_plan(self, request: Request) -> str:
        """The gate's plan rule: the plan's hash if it may run here, else PlanError. A task already
        accepted is checked again without a new audit record, unless it is refused now."""
        if request.task_id is not None and (self.dev or self.plans.status(plan_hash(request.plan_source)) == APPROVED):
            return plan_hash(request.plan_source)
        return self.plans.check(request.plan_source, dev=self.dev, name=request.plan_name,
                                requester=request.researcher)

    def _on_analytics(self, msg: Message) -> Message:
        """A federated statistics query: checked, gated and queued like a training task (no plan
        code runs for it: meshfl's own statistics, in the worker)."""
        f = msg.fields
        task_id = f["task_id"]
        if not _TASK_ID.match(task_id):
            raise MeshflError("task ids are 1-120 characters of A-Z a-z 0-9 . _ -", code="bad_field")
        existing = self._own_task(task_id, msg.sender)
        if existing is not None:
            if self.outbox.get(task_id) is not None:
                self._deliver(task_id)
            return Message("analytics.accepted", {"task_id": task_id, "state": existing.state})
        if f["purpose"] not in ("analytics", "preprocessing"):
            raise MeshflError("purpose is analytics or preprocessing", code="bad_field")
        ops = analytics.parse(f["query"], self.home.config.analytics_max_bins)
        session = None
        if f.get("secagg") is not None:
            session = self.secagg.get(str((f["secagg"] or {}).get("session")), msg.sender)
        secure = session is not None
        if analytics.nbytes(ops, secure) > INLINE_RESULT_BYTES:
            raise analytics.AnalyticsError("the answer to this query would exceed 4 MiB: ask for fewer bins or "
                                           "columns per query", code="too_many_bins")
        if secure and any(op.op == "levels" for op in ops):
            raise analytics.AnalyticsError("levels reveal a node's own values: plain mode only")
        found = self.datasets.search([str(t) for t in f["dataset_tags"]], self.home.config.minimum_samples)
        if not found:
            raise MeshflError(f"no dataset on {self.name} matches tags {f['dataset_tags']}", code="no_dataset")
        request = Request(f["purpose"], msg.sender, found[0], researcher_name=self._trusted_names.get(msg.sender, ""),
                          secagg=secure, summed_over=session.threshold if secure else 1)
        columns = analytics.columns_of(ops)
        payload = {"kind": "analytics", "analysis": f["analysis"], "purpose": f["purpose"], "query": f["query"],
                   "researcher": msg.sender, "secagg": {"session": session.session} if secure else None,
                   "audit": {"query": analytics.summary(ops), "columns": columns}}

        def accept(tx) -> None:
            dataset, _ = self._admit(request, found)
            analytics.check_columns(ops, self.datasets.get(dataset))
            payload["dataset"] = dataset
            self.queue.push(payload, task_id=task_id, lane=msg.sender)
            self.audit.append("task.accepted", task=task_id, researcher=msg.sender, kind=f["purpose"],
                              analysis=f["analysis"], dataset=dataset, **payload["audit"], secagg=secure)
            if secure:
                self.audit.append("secagg.setup", session=session.session, researcher=msg.sender, task=task_id,
                                  participants=len(session.participants), threshold=session.threshold)

        try:
            self.home.store.atomic(accept)
        except MeshflError as exc:
            self.audit.append("task.refused", task=task_id, researcher=msg.sender, reason=exc.code,
                              dataset=exc.details.get("dataset"), kind=f["purpose"])
            raise
        self._wake.set()
        return Message("analytics.accepted", {"task_id": task_id, "state": "pending"})

    def _on_result_pull(self, msg: Message) -> None:
        task_id, first, count = msg.fields["task_id"], msg.fields["first"], msg.fields["count"]
        item = self.outbox.get(task_id)
        if item is None or item.dest != msg.sender:
            raise MeshflError(f"no result {task_id} waits for you here", code="unknown_task")
        tensors = self._packs.get(task_id)
        if tensors is None:
            tensors = self._packs[task_id] = self._result(task_id)
        chunks = chunk_plan(item.envelope["layout"], CHUNK_BYTES)
        for index in range(max(0, first), min(first + max(0, count), len(chunks))):
            name, start, n = chunks[index]
            piece = tensors[name].reshape(-1)[start : start + n]
            self.peer.send(msg.sender, Message("result.chunk", {"task_id": task_id, "index": index}, {"data": piece}))
        return None

    def _on_result_ack(self, msg: Message) -> None:
        """Forget an acknowledged result; a repeated ack is answered by nothing, another
        researcher's result is refused (``unknown_task``, as a pull of it is)."""
        task_id = msg.fields["task_id"]
        if self.home.store.atomic(lambda tx: self._acknowledge(task_id, msg.sender)):
            self._discard_result(task_id)
            return None
        item = self.outbox.get(task_id)
        if item is not None and item.dest != msg.sender:
            raise MeshflError(f"no result {task_id} waits for you here", code="unknown_task")
        return None

    def _acknowledge(self, task_id: str, researcher: str) -> bool:
        """Drop an acknowledged result from the outbox, audited (in the caller's commit)."""
        acked = self.outbox.ack(task_id, dest=researcher)
        if acked:
            self.audit.append("result.acknowledged", task=task_id, researcher=researcher)
        return acked

    def _on_task_cancel(self, msg: Message) -> Message:
        """Cancel the sender's tasks of an experiment; an experiment of which the sender has no
        task here is ``unknown_experiment`` (whether or not another researcher has one of that id)."""
        experiment = msg.fields["experiment"]
        mine = [t for t in self.queue.list() if t.payload.get("experiment", t.payload.get("analysis")) == experiment
                and t.payload.get("researcher") == msg.sender]
        if not mine:
            raise MeshflError(f"you have no experiment {experiment} on {self.name}", code="unknown_experiment")
        count = 0
        for task in mine:
            if task.state == "pending":
                count += self.queue.cancel(task.id)
                self.ledger.unreserve(task.id)
                self.blobs.delete(task.id)
        running = self._running_task
        if running and running["experiment"] == experiment and running["researcher"] == msg.sender:
            running["cancelled"] = True
            self.executor.cancel()
            if running["session"]:  # a secure task may be waiting for its round's keys
                try:
                    self.secagg.get(running["session"]).call_off("the researcher cancelled the experiment")
                except SecAggError:
                    pass  # its session is gone: nothing waits on it
            count += 1
        self.audit.append("experiment.cancelled", experiment=experiment, researcher=msg.sender, tasks=count)
        return Message("task.cancelled", {"count": count})

    # ------------------------------------------------------------------ results
    def _on_link(self, peer_id: str, up: bool) -> None:
        record_link(self.home.store, peer_id, up)  # for the console and `node status`: changes only
        self.directories.on_link(peer_id, up)
        self.hosted.on_link(peer_id, up)
        if up:
            for item in self.outbox.pending(dest=peer_id):
                self._send_result(item.dest, item.msg_id, item.envelope["fields"], mtype=_type(item.envelope))

    def _deliver(self, task_id: str) -> None:
        """Send (or re-send) a result kept in the outbox."""
        item = self.outbox.get(task_id)
        if item is not None and not item.held:
            self._send_result(item.dest, task_id, item.envelope["fields"], mtype=_type(item.envelope))

    def _send_result(self, dest: str, task_id: str, fields: dict, tensors: dict | None = None,
                     mtype: str = "train.done") -> None:
        """``train.done`` (or ``mtype``): the result inline if small (``tensors``, else
        :meth:`_result`), otherwise announced for pulling. A result that is gone - a masked vector after a restart
        (it lives in memory), a pack after an OS crash (packs are not fsynced) - is reported lost,
        never dropped silently. A hosted model's diff (``hosted.diff``) is pushed by :mod:`._hosted`."""
        if mtype == "hosted.diff":
            self.hosted.wake()
            return
        if fields.get("ok") and tensors is None:
            try:
                tensors = self._result(task_id)
            except MeshflError:
                fields = {**fields, "ok": False, "inline": False,
                          "error": {"code": "result_lost", "message": "the result was lost when this node restarted"}}
        self.peer.send(dest, Message(mtype, fields, tensors if fields.get("inline") else {}))

    def _result(self, task_id: str) -> dict:
        """A finished task's tensors: its masked vector (secure rounds) or its pack."""
        return self.masked.tensors(task_id) or self.blobs.read(task_id)

    def _discard_result(self, task_id: str) -> None:
        self._packs.pop(task_id, None)
        self.masked.drop(task_id)
        self.blobs.delete(task_id)
        self.blobs.delete(f"{task_id}.base")

    def _run_tasks(self) -> None:
        while not self._stopping.is_set():
            task = self.queue.claim()
            if task is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                if task.payload.get("kind") == "analytics":
                    self._run_analytics(task)
                else:
                    self._run_one(task)
            except Exception:  # a bug of ours: log it and keep serving; the outbox re-sends what was kept
                self.log.exception("task %s: the runner failed after the task ran", task.id)

    def _run_one(self, task) -> None:
        """A training task: a researcher's, or a hosted model's (``kind`` hosted: its diff goes to the host)."""
        p = task.payload
        mtype, fields = _result_head(task)
        self._running_task = {"experiment": p["experiment"], "researcher": p["researcher"], "cancelled": False,
                              "session": (p.get("secagg") or {}).get("session")}
        client_dp = (p.get("dp") or {}).get("mode") == "client"
        try:
            dataset = self.datasets.get(p["dataset"])
            grant = self._recheck(task, dataset)  # approval, policy or budget may have changed since acceptance
            job = {
                "task_id": task.id,
                "plan_source": p["plan_source"],
                "plan_class": p["plan_class"],
                "plan_hash": p["plan_hash"],
                "model_args": p["model_args"],
                "training_args": p["training_args"],
                "dataset": dataset,
                "pack": str(self.blobs.path(task.id)),
                "allow_cuda": self.home.config.allow_cuda,
                # the node itself masks or noises the change; a host takes the diff
                "delta": bool(p.get("secagg")) or client_dp or p.get("kind") == "hosted",
                "update_norm": grant.policy.review,  # for the operator's review
                "dp": p.get("dp"),
                "mechanism": (p.get("privacy") or {}).get("mechanism"),
                "preprocess": p.get("preprocess"),
                **self.state.job_fields(task.id, p["researcher"], p["experiment"], p["round"]),
            }
            limit = self.home.config.task_timeout  # the operator's limit: a researcher may only lower it
            timeout = min(limit, float(p["training_args"].get("timeout") or limit))
            job["scratch"] = self._scratch()
            job["cpu_seconds"] = self.home.config.plan_cpu_seconds or timeout
            result = self.executor.run(job, timeout)
            delta = None
            if result.get("ok") and p.get("dp"):  # only the noised model leaves: no data-dependent metric
                result["metrics"] = {"steps": float(result["metrics"].get("steps", 0))}
                if client_dp:
                    delta = self._client_dp(task.id, p, result)
            if result.get("ok") and p.get("secagg"):
                kept = {k: result.get(k) for k in ("state", "device")}
                result = {**self._mask_result(task.id, p["secagg"], result, delta), **kept}
        except MeshflError as exc:
            result = {"ok": False, "error": exc.to_wire()}
        finally:
            cancelled = self._running_task["cancelled"]
            self._running_task = None
            self._drop_scratch()
        if cancelled:
            result = {"ok": False, "error": TaskFailed("the researcher cancelled the experiment", code="cancelled").to_wire()}
        fields["ok"] = bool(result.get("ok"))
        envelope: dict = {} if mtype == "train.done" else {"type": mtype}
        if fields["ok"] and p.get("secagg"):  # sample count and metrics ride inside the masked vector
            fields.update(metric_names=result["metric_names"], duration=result["duration"], device=result["device"])
        elif fields["ok"]:
            fields.update(samples=result["samples"], metrics=result["metrics"], duration=result["duration"],
                          device=result["device"])
        tensors = None
        if fields["ok"]:
            tensors = self._result(task.id)
            layout = layout_of(tensors)
            nbytes = sum(row[3] for row in layout)
            fields["inline"] = nbytes <= INLINE_RESULT_BYTES
            if not fields["inline"]:
                fields.update(layout=layout, chunk_bytes=CHUNK_BYTES)
            envelope["layout"] = layout
        else:
            fields["error"] = result["error"]
            self.log.warning("task %s failed: %s", task.id, result["error"].get("message"))
        review = {k: result.get(k) for k in ("metrics", "samples", "duration", "update_norm")}
        obsolete = [] if fields["ok"] else [ExperimentState.output(task.id)]  # what a failed task wrote

        def keep_state(final: dict) -> None:  # the experiment's state on this node, in the release's commit
            if final["ok"] and result.get("state"):
                obsolete[:] = self.state.commit(task.id, p["researcher"], p["experiment"], p["round"])
            elif not final["ok"]:
                obsolete[:] = [ExperimentState.output(task.id)]

        held, fields = self.release.finish(task, fields, envelope, review, also=keep_state)
        self.state.delete(obsolete)
        if not fields["ok"]:
            self._discard_result(task.id)
        elif held:
            return
        self._send_result(p["researcher"], task.id, fields, tensors if fields["ok"] else None, mtype=mtype)

    def _run_analytics(self, task) -> None:
        """Answer a statistics query: the worker computes it over the dataset, this process
        applies the dataset's rules (small cells suppressed, extremes coarsened, levels of too few
        records left out), masks it under secure aggregation, and it leaves through the release step."""
        p = task.payload
        mtype, fields = _result_head(task)
        secure = p.get("secagg")
        self._running_task = {"experiment": p["analysis"], "researcher": p["researcher"], "cancelled": False,
                              "session": (secure or {}).get("session")}
        tensors = None
        try:
            record = self.datasets.get(p["dataset"])
            self.gate.check(Request(p["purpose"], p["researcher"], record, task_id=task.id, secagg=bool(secure),
                                    researcher_name=self._trusted_names.get(p["researcher"], ""),
                                    summed_over=self._summed_over(p)))
            ops = analytics.parse(p["query"], self.home.config.analytics_max_bins)
            job = {"kind": "stats", "task_id": task.id, "query": p["query"], "dataset": record, "secure": bool(secure),
                   "scratch": self._scratch(), "cpu_seconds": self.home.config.plan_cpu_seconds or None}
            result = self.executor.run(job, self.home.config.task_timeout)
            if not result.get("ok"):
                raise MeshflError(result["error"]["message"], code=result["error"]["code"])
            policy = self.gate.policy(p["dataset"])
            minimum = policy.min_cell or self.home.config.minimum_samples
            values = np.asarray([np.nan if v is None else v for v in result["values"]], dtype=np.float64)
            suppressed = analytics.suppress(ops, values, bool(secure), minimum)
            if not secure and not policy.exact_extremes:
                analytics.coarsen_extremes(ops, values)
            levels = []
            for found in result["extras"]:
                if found is not None:
                    kept, dropped = analytics.keep_levels(found, minimum)
                    levels.append([kept, dropped])
            tensors = self._stats_result(task.id, secure, values)
            fields.update(ok=True, rows=result["rows"], suppressed=suppressed, duration=result["duration"],
                          exact_extremes=bool(policy.exact_extremes) and not secure, inline=True)
            if levels:
                fields["levels"] = levels
        except MeshflError as exc:
            fields.update(ok=False, error=exc.to_wire())
            self.log.warning("analytics task %s failed: %s", task.id, exc.message)
        except Exception:  # a bug of ours: fail the task, keep the runner (and the node) alive
            self.log.exception("analytics task %s failed", task.id)
            fields.update(ok=False, error={"code": "internal", "message": "the node failed to answer this query"})
        finally:
            self._running_task = None
            self._drop_scratch()
        held, fields = self.release.finish(task, fields, {"type": mtype},
                                           {"suppressed": fields.get("suppressed"), "rows": fields.get("rows")})
        if not fields["ok"]:
            self._discard_result(task.id)
        elif held:
            return
        self._send_result(p["researcher"], task.id, fields, tensors if fields["ok"] else None, mtype=mtype)

    def _stats_result(self, task_id: str, secure: dict | None, values: np.ndarray) -> dict:
        """The answer's tensors: the values (kept in the task's pack until acknowledged), or under
        secure aggregation their masked fixed-point words (kept in memory, as a masked update)."""
        if not secure:
            tensors = {"values": torch.from_numpy(values)}
            self.blobs.write(task_id, tensors)
            return tensors
        session = self.secagg.get(secure["session"])
        session.wait_keys(KEYS_TIMEOUT_S)
        words = analytics.encode(values).view(np.uint8)
        vector = self.masked.buffer(words.size)
        session.mask(vector, lambda block, offset: block.__setitem__(slice(None), words[offset:offset + block.size]),
                     0)
        self.masked.keep(task_id, vector)
        return self.masked.tensors(task_id)

    def _scratch(self) -> str:
        """The empty folder the task's plan may write in (emptied after each task). One folder,
        reused: the runner runs one task at a time, and a mkdir + rmdir per task cost more than
        looking into it."""
        path = self._scratch_dir
        try:
            os.mkdir(path, 0o700)
        except FileNotFoundError:
            os.makedirs(path, 0o700)
        except FileExistsError:  # kept empty after the last task, or left by a crash during one
            self._drop_scratch()
            os.makedirs(path, 0o700, exist_ok=True)
        return path

    def _drop_scratch(self) -> None:
        """Remove what the plan wrote (the common case: nothing; the empty folder stays)."""
        path = self._scratch_dir
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):  # never a link to elsewhere
                os.unlink(path)
                return
            with os.scandir(path) as entries:
                written = next(entries, None) is not None
        except FileNotFoundError:
            return
        if written:
            shutil.rmtree(path, ignore_errors=True)

    def _client_dp(self, task_id: str, payload: dict, result: dict) -> dict | None:
        """Clip and noise the trained change here, in the node process, where no plan code runs.
        A secure round masks the noised change (returned); otherwise it goes back onto the received
        model in the task's pack (counters and flags keep their received values)."""
        spec = DPSpec.from_wire(payload["dp"])
        delta = dict(self.blobs.read(task_id))  # a private mapping: changed in memory, not on disk
        secagg = payload.get("secagg")
        weight = result["samples"] / secagg["weight_scale"] if secagg else 1.0
        norm = clip_and_noise(delta, spec, self._summed_over(payload), weight)
        if result.get("update_norm") is not None:
            result["update_norm"] = norm
        if secagg:
            return delta
        base = self.blobs.read(f"{task_id}.base")
        self.blobs.write(task_id, {k: base[k] + delta[k] if base[k].is_floating_point() else base[k] for k in base})
        self.blobs.delete(f"{task_id}.base")
        return None

    def _recheck(self, task, dataset: dict):
        """The gate again, just before the task runs (without a new reservation); its grant."""
        p = task.payload
        return self.gate.check(Request(p.get("kind", "training"), p["researcher"], dataset,
                                researcher_name=self._trusted_names.get(p["researcher"], ""),
                                plan_source=p["plan_source"], plan_name=p["plan_class"],
                                secagg=bool(p.get("secagg")),
                                summed_over=self._summed_over(p),
                                dp=DPSpec.from_wire(p["dp"]) if p.get("dp") else None,
                                training_args=p["training_args"], task_id=task.id))

    def _summed_over(self, payload: dict) -> int:
        secagg = payload.get("secagg")
        if not secagg:
            return 1
        try:
            return self.secagg.get(secagg["session"]).threshold
        except SecAggError:
            return 1  # its session is gone (a restart): the task fails when it masks

    # ------------------------------------------------------------------ released results
    def notify_released(self) -> None:
        """A held result was released or denied, an access request decided, a dataset published, a
        hosted model joined (here or by another process, which sends SIGUSR1): act on it now."""
        self._released.set()
        self.directories.wake()
        self.hosted.wake()

    def _sync_trust(self) -> None:
        """Take up peers trusted in the home since the node started (an approved access request):
        the node dials a new researcher at once."""
        added = self.home.trust_into(self.peer)
        for entry in added:
            self._trusted_names[entry["peer_id"]] = entry["name"]
            self.log.info("now trusting %s (%s)", entry["name"], entry["peer_id"])
        if any(entry["directory"] for entry in added):
            self.directories.refresh()

    def _send_released(self) -> None:
        """Send results the operator released (``meshfl result release``, which nudges a node run
        by :meth:`run` with SIGUSR1, the console, :meth:`Release.decide`). The outbox is looked at
        every few seconds too, so a release nobody announced still goes out."""
        while not self._stopping.is_set():
            self._released.wait(RELEASE_CHECK_S)
            self._released.clear()
            if self._stopping.is_set():
                return
            try:
                self._sync_trust()
            except MeshflError as exc:
                self.log.warning("cannot read the trust table: %s", exc)
            for task_id in self.outbox.take_released():
                item = self.outbox.get(task_id)
                if item is None:
                    continue
                if not item.envelope["fields"].get("ok"):
                    self._discard_result(task_id)
                self._deliver(task_id)

    def _drop_stale_reservations(self) -> None:
        """Budget set aside for tasks that can no longer be released (a crash between their end and
        the reservation's removal cannot happen - one commit - but a table edited by hand can)."""
        live = {t.id for t in self.queue.list("pending") + self.queue.list("running")}
        live |= {item.msg_id for item in self.outbox.held()}
        for task_id in self.ledger.reserved():
            if task_id not in live:
                self.ledger.unreserve(task_id)

    # ------------------------------------------------------------------ secure aggregation
    def _on_secagg_setup(self, msg: Message) -> Message:
        """Open a round: make its secrets, seal their shares to the other participants, answer
        with the round key and the sealed shares (the researcher passes them on)."""
        f = msg.fields
        participants = [str(p) for p in f["participants"]]
        session = NodeSession(self.home.identity, f["session"], msg.sender, participants, f["threshold"], f["prg"])
        sealed = [self.overlay.seal(dest, payload) for dest, payload in session.distribute(self._card_of)]
        self.secagg.open(session)  # audited with the round's task (_on_train): one commit less per round
        headers, tensors = bundle(sealed, "share")
        return Message("secagg.key", {"session": f["session"], **session.key_fields(), "shares": headers}, tensors)

    def _card_of(self, peer_id: str):
        entry = self.peer.trust_table.get(peer_id)
        return entry.card if entry is not None else None

    def _on_secagg_unmask(self, msg: Message) -> Message:
        """Reveal shares for unmasking, audited in a synced commit before they leave. The request
        also acknowledges this node's masked result (``ack``): one commit for both, not one each."""
        f = msg.fields
        ack = f.get("ack")
        refused = None
        try:
            session = self.secagg.get(f["session"], msg.sender)
            shares = session.reveal([str(p) for p in f["survivors"]], [str(p) for p in f["dropped"]])
        except SecAggError as exc:  # refused to reveal; the researcher has the result all the same
            refused = exc

        def commit(tx) -> bool:
            if refused is None:
                self.audit.append("secagg.revealed", session=f["session"], researcher=msg.sender,
                                  survivors=len(f["survivors"]), dropped=len(f["dropped"]))
            return ack is not None and self._acknowledge(ack, msg.sender)

        if self.home.store.atomic(commit):
            self._discard_result(ack)
        if refused is not None:
            raise refused
        return Message("secagg.shares", {"session": f["session"], **shares})

    def _on_overlay_message(self, src: str, payload: dict) -> None:
        if payload.get("type") != "secagg.share":
            raise SecAggError(f"unknown overlay payload {str(payload.get('type'))[:40]!r}", code="unknown_type")
        self.secagg.get(str(payload.get("session"))).receive_share(src, payload)

    def _on_overlay_reject(self, src: str, code: str, message: str) -> None:
        self.audit.append("overlay.rejected", src=src, reason=code)

    def _secagg_spec(self, spec: dict, researcher: str) -> tuple[dict, NodeSession]:
        """The ``secagg`` field of a train request, checked against this node's open session; and
        that session."""
        parameters, clip = spec.get("parameters"), spec.get("clip")
        frac_bits, scale = spec.get("frac_bits"), spec.get("weight_scale")
        session = self.secagg.get(str(spec.get("session")), researcher)
        if not (_str_list(parameters) and _number(clip) and clip > 0 and _integer(frac_bits)
                and 8 <= frac_bits <= 30 and _integer(scale) and scale > 0
                and frac_bits_for(len(session.participants), clip) >= frac_bits):
            raise MeshflError("secagg needs parameters, weight_scale > 0, clip > 0 and frac_bits "
                              "that keep the sum of the participants' values in range", code="bad_field")
        return {"session": session.session, "parameters": parameters, "weight_scale": scale,
                "clip": float(clip), "frac_bits": frac_bits}, session

    def _on_secagg_keys(self, msg: Message) -> None:
        """The members' round keys and their shares for this node: the task of this round masks
        its result with the keys, each checked against the copy its owner's share carried. A share
        that does not check out is refused and audited (the overlay's checks); without it, its
        owner's key cannot be checked, and the key list (so the task) fails."""
        session = self.secagg.get(msg.fields["session"], msg.sender)
        try:
            envelopes = unbundle(msg.fields.get("shares", []), msg.tensors, "share")
        except OverlayRejected as exc:
            envelopes = []
            self._on_overlay_reject(msg.sender, exc.code, exc.message)
        for envelope in envelopes:
            try:
                self.overlay.accept(envelope)
            except OverlayRejected:
                pass  # logged and audited by the overlay
            except MeshflError as exc:
                self.log.warning("secure round %s: share from %s refused: %s", session.session,
                                 envelope.fields["src"], exc.message)
        try:
            session.set_keys(msg.fields["keys"], self._card_of)
        except SecAggError as exc:  # the waiting task fails with this error; nothing to answer
            self.log.warning("secure round %s: key list refused: %s", session.session, exc.message)
        return None

    def _mask_result(self, task_id: str, spec: dict, result: dict, delta: dict | None = None) -> dict:
        """Encode and mask the trained delta (the pack's, or ``delta``: a noised one) into the task's
        result, one 256 KiB block at a time (the plain vector never goes through memory whole). The
        result stays in memory until it is acknowledged (:mod:`._masked`); the delta's pack is deleted."""
        session = self.secagg.get(spec["session"])
        session.wait_keys(KEYS_TIMEOUT_S)  # sent once every participant answered the set-up
        if delta is None:
            delta = self.blobs.read(task_id)
        enc = Encoding.for_state(delta, set(spec["parameters"]), spec["frac_bits"], spec["clip"])
        encoder = UpdateEncoder(delta, result["samples"], spec["weight_scale"], result["metrics"], enc)
        vector = self.masked.buffer(enc.nbytes)
        session.mask(vector, encoder.fill, enc.boundary)
        self.masked.keep(task_id, vector)
        self.blobs.delete(task_id)
        encoder.log_clipped()
        return {"ok": True, "metric_names": encoder.names, "duration": result["duration"]}

    def _atomically(self, *steps) -> None:
        """Run store operations in one LMDB transaction (they join it): one disk flush, all or none."""
        self.home.store.atomic(lambda tx: [step() for step in steps])


def _result_head(task) -> tuple[str, dict]:
    """The message type of a task's result and the fields that name it."""
    p = task.payload
    if p.get("kind") == "analytics":
        return "analytics.done", {"task_id": task.id, "analysis": p["analysis"]}
    if p.get("kind") == "hosted":
        return "hosted.diff", {"task_id": task.id, "model": p["model"], "ticket": p["ticket"], "version": p["version"]}
    return "train.done", {"task_id": task.id, "experiment": p["experiment"], "round": p["round"]}


def _type(envelope: dict) -> str:
    return envelope.get("type", "train.done")
