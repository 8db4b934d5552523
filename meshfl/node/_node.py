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
import re
import signal
import threading
from pathlib import Path

from .. import __version__
from ..errors import MeshflError
from ..home import Home
from ..overlay import Overlay, OverlayRejected, bundle, unbundle
from ..protocol import CHUNK_BYTES, INLINE_RESULT_BYTES, chunk_plan
from ..secagg import Encoding, NodeSession, NodeSessions, SecAggError, UpdateEncoder, frac_bits_for
from ..store import Outbox, TaskQueue
from ..store.blobs import BlobStore
from ..transport import Peer
from ..wire import DTYPE_NAMES, Message
from ._datasets import DatasetRegistry, public_view
from ._executor import Executor, TaskFailed
from ._masked import MaskedResults
from ._plans import PlanRegistry
from ._state import ExperimentState

KEYS_TIMEOUT_S = 60.0  # a secure task waits this long after training for the members' keys
# (the researcher sends them once every participant answered the set-up, within 30 s)

_TASK_ID = re.compile(r"^[A-Za-z0-9._-]{1,120}$")


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
        self.blobs = BlobStore(self.home.path / "blobs")
        self.state = ExperimentState(store, self.blobs, self.audit, self.log)  # SCAFFOLD's c_i, local layers
        self.executor = Executor(name=self.name)
        options = {"heartbeat": cfg.heartbeat, "dead_after": cfg.dead_after, **(peer_options or {})}
        self.peer = Peer(
            self.home.identity, listen=cfg.listen, handler=self._handle, on_link=self._on_link, **options
        )
        self.overlay = Overlay(self.peer, self._on_overlay_message, on_reject=self._on_overlay_reject)
        self.secagg = NodeSessions()
        self.masked = MaskedResults()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._runner = threading.Thread(target=self._run_tasks, name=f"meshfl-runner-{self.name}", daemon=True)
        self._running_task: dict | None = None
        self._packs: dict[str, dict] = {}  # task id -> mapped result pack, while it is being pulled

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Node":
        for task in self.queue.recover(requeue=False):
            # Its worker trains in place in the task's pack, so a half-trained model may be
            # there: report the task failed rather than run it again from a corrupt start.
            if self.outbox.get(task.id) is not None:
                continue  # the crash came after its result was committed: that result stands
            self.log.warning("task %s was interrupted by a restart: reporting it failed", task.id)
            fields = {"task_id": task.id, "experiment": task.payload["experiment"],
                      "round": task.payload["round"], "ok": False, "error": task.error}
            self.outbox.put(task.id, task.payload["researcher"], {"fields": fields})
            self.blobs.delete(task.id)
            self.state.delete([ExperimentState.output(task.id)])
            self.audit.append("task.interrupted", task=task.id)
        if self.dev:
            self.log.warning("development mode: training plans run WITHOUT operator approval")
        self.peer.start()
        for entry in self.home.trusted():
            self.peer.trust(entry["card"], entry.get("endpoint"))
        self.audit.append("node.started", dev=self.dev, version=__version__)
        self.executor.start()
        self._runner.start()
        self.log.info("node %s (%s) up; %d unacknowledged results", self.name, self.peer.peer_id, len(self.outbox))
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.executor.cancel()
        if self._runner.is_alive():
            self._runner.join()
        self.peer.close()
        self.executor.close()
        self._packs.clear()
        self.audit.append("node.stopped")
        self.home.close()

    def run(self) -> None:
        """Serve in the foreground until SIGINT or SIGTERM, then stop cleanly."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
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
        handler = getattr(self, "_on_" + msg.type.replace(".", "_"), None)
        if handler is None:
            raise MeshflError(f"a node does not handle {msg.type!r}", code="unknown_type")
        return handler(msg)

    def _on_ping(self, msg: Message) -> Message:
        fields = {"name": self.name, "peer_id": self.peer.peer_id, "role": "node", "version": __version__, "dev": self.dev}
        return Message("pong", fields)

    def _on_datasets_search(self, msg: Message) -> Message:
        tags = [str(t) for t in msg.fields.get("tags") or []]
        found = self.datasets.search(tags, self.home.config.minimum_samples)
        self.audit.append("datasets.searched", researcher=msg.sender, tags=tags, found=len(found))
        return Message("datasets.list", {"datasets": [public_view(r) for r in found]})

    def _on_plan_status(self, msg: Message) -> Message:
        h = msg.fields["hash"]
        return Message("plan.info", {"hash": h, "status": self.plans.status(h)})

    def _on_plan_submit(self, msg: Message) -> Message:
        record = self.plans.submit(msg.fields["source"], msg.fields.get("name", ""), requester=msg.sender)
        return Message("plan.info", {"hash": record["hash"], "status": record["status"]})

    def _on_train(self, msg: Message) -> Message:
        f = msg.fields
        task_id = f["task_id"]
        if not _TASK_ID.match(task_id):
            raise MeshflError("task ids are 1-120 characters of A-Z a-z 0-9 . _ -", code="bad_field")
        existing = self.queue.get(task_id)
        if existing is not None:  # a re-sent request: answer it again, never run it twice
            if self.outbox.get(task_id) is not None:
                self._deliver(task_id)
            return Message("train.accepted", {"task_id": task_id, "state": existing.state})
        if self.home.config.force_secure_aggregation and not f.get("secagg"):
            self.audit.append("task.refused", task=task_id, researcher=msg.sender, reason="secagg_required")
            raise MeshflError("this node only trains with secure aggregation", code="secagg_required")
        secagg, session = self._secagg_spec(f["secagg"], msg.sender) if f.get("secagg") else (None, None)
        found = self.datasets.search([str(t) for t in f["dataset_tags"]], self.home.config.minimum_samples)
        if not found:
            raise MeshflError(f"no dataset on {self.name} matches tags {f['dataset_tags']}", code="no_dataset")
        self.blobs.write(task_id, msg.tensors)  # before the task exists: never a task without its model
        payload = {k: f[k] for k in ("experiment", "round", "plan_source", "plan_class", "training_args", "model_args")}
        payload.update(researcher=msg.sender, dataset=found[0]["name"], secagg=secagg)

        def accept(tx) -> None:  # the approval decision, the task and its audit record: one commit
            payload["plan_hash"] = self.plans.check(f["plan_source"], dev=self.dev, requester=msg.sender)
            self.queue.push(payload, task_id=task_id)
            self.audit.append(
                "task.accepted", task=task_id, researcher=msg.sender, experiment=f["experiment"],
                round=f["round"], plan=payload["plan_hash"], dataset=found[0]["name"],
            )
            if session is not None:  # the round's set-up, recorded with the task that uses it
                self.audit.append("secagg.setup", session=session.session, researcher=msg.sender, task=task_id,
                                  participants=len(session.participants), threshold=session.threshold)

        try:
            self.home.store.atomic(accept)
        except MeshflError:
            self.blobs.delete(task_id)
            try:  # outside the rolled-back transaction: record the plan for review, audit the refusal
                self.plans.check(f["plan_source"], dev=self.dev, requester=msg.sender)
            finally:
                self.audit.append("task.refused", task=task_id, researcher=msg.sender, reason="plan_not_approved")
            raise
        self._wake.set()
        return Message("train.accepted", {"task_id": task_id, "state": "pending"})

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
        task_id = msg.fields["task_id"]
        if self.home.store.atomic(lambda tx: self._acknowledge(task_id, msg.sender)):
            self._discard_result(task_id)
        return None

    def _acknowledge(self, task_id: str, researcher: str) -> bool:
        """Drop an acknowledged result from the outbox, audited (in the caller's commit)."""
        acked = self.outbox.ack(task_id, dest=researcher)
        if acked:
            self.audit.append("result.acknowledged", task=task_id, researcher=researcher)
        return acked

    def _on_task_cancel(self, msg: Message) -> Message:
        experiment = msg.fields["experiment"]
        count = 0
        for task in self.queue.list("pending"):
            if task.payload.get("experiment") == experiment and task.payload.get("researcher") == msg.sender:
                count += self.queue.cancel(task.id)
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
        if up:
            for item in self.outbox.pending(dest=peer_id):
                self._send_result(item.dest, item.msg_id, item.envelope["fields"])

    def _deliver(self, task_id: str) -> None:
        """Send (or re-send) a result kept in the outbox."""
        item = self.outbox.get(task_id)
        if item is not None:
            self._send_result(item.dest, task_id, item.envelope["fields"])

    def _send_result(self, dest: str, task_id: str, fields: dict, tensors: dict | None = None) -> None:
        """``train.done``: the result inline if small (``tensors``, else :meth:`_result`),
        otherwise announced for pulling. A result that is gone - a masked vector after a restart
        (it lives in memory), a pack after an OS crash (packs are not fsynced) - is reported lost,
        never dropped silently."""
        if fields.get("ok") and tensors is None:
            try:
                tensors = self._result(task_id)
            except MeshflError:
                fields = {**fields, "ok": False, "inline": False,
                          "error": {"code": "result_lost", "message": "the result was lost when this node restarted"}}
        self.peer.send(dest, Message("train.done", fields, tensors if fields.get("inline") else {}))

    def _result(self, task_id: str) -> dict:
        """A finished task's tensors: its masked vector (secure rounds) or its pack."""
        return self.masked.tensors(task_id) or self.blobs.read(task_id)

    def _discard_result(self, task_id: str) -> None:
        self._packs.pop(task_id, None)
        self.masked.drop(task_id)
        self.blobs.delete(task_id)

    def _run_tasks(self) -> None:
        while not self._stopping.is_set():
            task = self.queue.claim()
            if task is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._run_one(task)

    def _run_one(self, task) -> None:
        p = task.payload
        fields: dict = {"task_id": task.id, "experiment": p["experiment"], "round": p["round"]}
        self._running_task = {"experiment": p["experiment"], "researcher": p["researcher"], "cancelled": False,
                              "session": (p.get("secagg") or {}).get("session")}
        try:
            if not self.dev and self.plans.status(p["plan_hash"]) != "approved":
                self.plans.check(p["plan_source"], dev=self.dev)  # approval withdrawn: refuse, audited
            job = {
                "task_id": task.id,
                "plan_source": p["plan_source"],
                "plan_class": p["plan_class"],
                "plan_hash": p["plan_hash"],
                "model_args": p["model_args"],
                "training_args": p["training_args"],
                "dataset": self.datasets.get(p["dataset"]),
                "pack": str(self.blobs.path(task.id)),
                "allow_cuda": self.home.config.allow_cuda,
                "delta": bool(p.get("secagg")),
                **self.state.job_fields(task.id, p["researcher"], p["experiment"], p["round"]),
            }
            limit = self.home.config.task_timeout  # the operator's limit: a researcher may only lower it
            timeout = min(limit, float(p["training_args"].get("timeout") or limit))
            result = self.executor.run(job, timeout)
            if result.get("ok") and p.get("secagg"):
                kept = {k: result.get(k) for k in ("state", "device")}
                result = {**self._mask_result(task.id, p["secagg"], result), **kept}
        except MeshflError as exc:
            result = {"ok": False, "error": exc.to_wire()}
        finally:
            cancelled = self._running_task["cancelled"]
            self._running_task = None
        if cancelled:
            result = {"ok": False, "error": TaskFailed("the researcher cancelled the experiment", code="cancelled").to_wire()}
        fields["ok"] = bool(result.get("ok"))
        envelope: dict = {}
        if fields["ok"] and p.get("secagg"):  # sample count and metrics ride inside the masked vector
            fields.update(metric_names=result["metric_names"], duration=result["duration"], device=result["device"])
        elif fields["ok"]:
            fields.update(samples=result["samples"], metrics=result["metrics"], duration=result["duration"],
                          device=result["device"])
        tensors = None
        if fields["ok"]:
            tensors = self._result(task.id)
            layout = [[name, DTYPE_NAMES[t.dtype], list(t.shape), t.numel() * t.element_size()]
                      for name, t in tensors.items()]
            nbytes = sum(row[3] for row in layout)
            fields["inline"] = nbytes <= INLINE_RESULT_BYTES
            if not fields["inline"]:
                fields.update(layout=layout, chunk_bytes=CHUNK_BYTES)
            envelope["layout"] = layout
        else:
            fields["error"] = result["error"]
            self.log.warning("task %s failed: %s", task.id, result["error"].get("message"))
        envelope["fields"] = fields
        finish = (
            (lambda: self.queue.done(task.id, {"samples": fields.get("samples")}))
            if fields["ok"]
            else (lambda: self.queue.fail(task.id, fields["error"]))
        )
        obsolete = [] if fields["ok"] else [ExperimentState.output(task.id)]  # what a failed task wrote

        def keep_state() -> None:
            if fields["ok"] and result.get("state"):
                obsolete[:] = self.state.commit(task.id, p["researcher"], p["experiment"], p["round"])

        self._atomically(  # the result, the task's end, its audit record and its state: one commit
            lambda: self.outbox.put(task.id, p["researcher"], envelope),
            finish,
            lambda: self.audit.append("task.finished", task=task.id, ok=fields["ok"], error=fields.get("error", {}).get("code")),
            keep_state,
        )
        self.state.delete(obsolete)
        if not fields["ok"]:
            self._discard_result(task.id)
        self._send_result(p["researcher"], task.id, fields, tensors)

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

    def _mask_result(self, task_id: str, spec: dict, result: dict) -> dict:
        """Encode and mask the trained delta into the task's result, one 256 KiB block at a time
        (the plain vector never goes through memory whole). The result stays in memory until it is
        acknowledged (:mod:`._masked`); the delta's pack is deleted."""
        session = self.secagg.get(spec["session"])
        session.wait_keys(KEYS_TIMEOUT_S)  # sent once every participant answered the set-up
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
