"""A node serving the hosted models its operator joined (:mod:`._joins`): one thread, two duties.

1. **Push** what the outbox holds for hosts: each ``hosted.diff`` result (the task's pack holds
   trained minus received) goes ``hosted.push`` -> ``hosted.go``, then ``hosted.diff`` ->
   ``hosted.ack`` (in chunks when larger than one: :mod:`meshfl.hosted._chunks`), and the ack
   acknowledges the outbox entry. Its diff id is the task id, so a node restarted before the ack
   re-sends it and the host counts it once. A diff the host refuses with a code (its cycle closed,
   its version too stale) can never count: it is dropped, audited; one whose chunks did not all get
   through (the host restarted mid-transfer) is pushed again. A request in flight when the host's
   link goes down (the host was killed) is given up at once, not at its timeout: its reply could
   only come over that link, and every exchange here may be repeated.
2. **Ask** for a slot, when the node is idle (no task queued or running, nothing of that join in
   the outbox) and the host's last backoff has passed: ``hosted.request``; pull the version (and
   the plan, when its hash changed) only when the cached hash differs; then the same gate as a
   researcher's task (plan approved by hash, the dataset's policy allowing kind ``hosted``) and a
   durable task in the node's queue, in the host's lane, that the runner trains like any other
   (:meth:`Node._run_one`, ``delta`` on) and releases through :mod:`._release`. A refusal is
   audited and the join is *blocked*: nothing is asked again until the plan is approved or the
   policy lets the model in.
3. **Secure cycles** (``secure`` in the host's answer; :mod:`meshfl.hosted._secure`): before the
   task is queued, the node takes part in the cycle's set-up through the host (its
   :class:`~meshfl.secagg.NodeSession` opened among the node's sessions, so the task masks its
   delta as in a researcher's secure round and the gate sees ``secagg``); after the host
   acknowledged the masked vector, the node reveals for the survivors (audited first). The
   session lives in memory: a node restarted mid-cycle has dropped out of it.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout

from ..errors import MeshflError, PeerUnavailable, RemoteError
from ..hosted import _chunks, _wire  # noqa: F401  (declares the hosted messages)
from ..hosted._secure import SecureTurn, bound_of
from ..privacy import Request
from ..wire import Message
from ._joins import Joins, cache_blob, join_key
from ._plans import APPROVED, PlanError, plan_hash

POLL_S = 0.5  # how often joins and the outbox are looked at when nothing wakes the thread
IDLE_S = 5.0  # the same with no join and no diff to push (a join from the CLI nudges the node)
RETRY_S = 5.0  # after a host did not answer
ERROR_RETRY_S = 30.0  # after a host refused a request with an error
CALL_TIMEOUT_S = 60.0  # a model-sized pull or push may wait its turn at the host (its transfer slots)


class HostedJoiner:
    def __init__(self, node) -> None:
        self.node = node
        self.joins = Joins(node.home.store, node.audit)
        self._retry_at: dict[str, float] = {}  # join or outbox id -> when to try again
        self._queued: dict[str, str] = {}  # join -> the task last queued for it
        self._turns: dict[str, tuple[SecureTurn, float]] = {}  # task -> its secure cycle's turn, push deadline
        self._links: dict[str, int] = {}  # peer -> how many times its link went up or down
        self._came_up: set[str] = set()  # hosts whose link came (back) up: retry what waits for them now
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"meshfl-hosted-{node.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def wake(self) -> None:
        self._wake.set()

    def on_link(self, peer_id: str, up: bool) -> None:
        """A link went up or down: what was asked over it before will get no answer; once it is
        up, what failed on it is tried again at once."""
        self._links[peer_id] = self._links.get(peer_id, 0) + 1
        if up:
            self._came_up.add(peer_id)
            self._wake.set()

    def _main(self) -> None:
        stopping = self.node._stopping
        while not stopping.is_set():
            wait = POLL_S
            try:
                self._retry_now()
                self._push_pending()
                joins = self.joins.list()
                if not joins and not self._items():
                    wait = IDLE_S  # nothing to serve: woken by a join, a release or a nudge
                if self._idle():
                    for join in joins:
                        if stopping.is_set() or not self._idle():
                            break
                        self._turn(join)
            except Exception:  # a bug of ours: keep the node serving
                self.node.log.exception("serving hosted models failed")
            self._wake.wait(wait)
            self._wake.clear()

    def _retry_now(self) -> None:
        while self._came_up:
            host = self._came_up.pop()
            for item in self._items():
                if item.dest == host:
                    self._retry_at.pop(item.msg_id, None)
            for key in [k for k in list(self._retry_at) if k.startswith(host + "/")]:
                self._retry_at.pop(key, None)

    # ------------------------------------------------------------------ pushing diffs
    def _items(self) -> list:
        outbox = self.node.outbox
        return [i for i in outbox.pending(buffers=False) + outbox.held(buffers=False)
                if i.envelope.get("type") == "hosted.diff"]

    def _push_pending(self) -> None:
        for item in self._items():
            if item.held or time.monotonic() < self._retry_at.get(item.msg_id, 0.0):
                continue
            if not self.node.peer.is_online(item.dest):
                continue  # pushed when the host's link is up
            f = item.envelope["fields"]
            if not f.get("ok"):  # a failed or denied task: the host has nothing to count
                self._forget(item.msg_id, item.dest, f.get("error", {}).get("code", "failed"))
                continue
            try:
                tensors = self.node._result(item.msg_id)  # a masked vector (secure cycle) or the pack
            except MeshflError:  # its pack is gone (an OS crash), its masked vector (a restart): it cannot be sent
                self._forget(item.msg_id, item.dest, "result_lost")
                continue
            fields = {"model": f["model"], "ticket": f["ticket"], "diff_id": item.msg_id, "version": f["version"],
                      "samples": f.get("samples", 0), "metrics": f.get("metrics") or {}}
            try:
                ack = _chunks.push(self._requester(item.dest), fields, tensors)
            except RemoteError as exc:
                if exc.code in _chunks.RETRY_CODES:
                    self.node.log.info("the diff of task %s did not get through whole (%s); retrying", item.msg_id,
                                       exc.code)
                    self._retry_at[item.msg_id] = time.monotonic() + RETRY_S
                    continue
                self.node.log.warning("host %s refused the diff of task %s (%s): %s", item.dest, item.msg_id,
                                      exc.code, exc.message)
                self._forget(item.msg_id, item.dest, exc.code)
                continue
            except MeshflError as exc:  # no link, no answer in time: the outbox keeps it
                self.node.log.info("pushing the diff of task %s failed (%s); retrying", item.msg_id, exc.code)
                self._retry_at[item.msg_id] = time.monotonic() + RETRY_S
                continue
            self._acknowledge(item.msg_id, item.dest, ack.fields)
            if item.msg_id in self._turns:
                self._reveal(item.dest, *self._turns.pop(item.msg_id), f.get("metric_names") or [])

    def _requester(self, host: str):
        """Requests to ``host`` (for :mod:`meshfl.hosted._chunks`): each one in flight a future,
        given up as soon as the host's link changes."""
        def request(msg: Message):
            link = self._links.get(host, 0)
            future = self.node.peer.request(host, msg, CALL_TIMEOUT_S)

            def wait() -> Message:
                while True:
                    try:
                        return future.result(timeout=POLL_S)
                    except FutureTimeout:
                        if self._links.get(host, 0) != link:
                            raise PeerUnavailable(f"the link to the host went down before {msg.type!r} was "
                                                  "answered") from None
            return wait
        return request

    def _acknowledge(self, task_id: str, host: str, ack: dict) -> None:
        """The host counted the diff (once, ``duplicate`` if this was a re-send): forget it."""
        node = self.node

        def commit(tx) -> None:
            if node.outbox.ack(task_id, dest=host):
                node.audit.append("result.acknowledged", task=task_id, researcher=host, cycle=ack["cycle"],
                                  duplicate=ack["duplicate"])

        node.home.store.atomic(commit)
        node._discard_result(task_id)
        self._retry_at.pop(task_id, None)
        self._wake.set()  # the join is free: ask for the next slot now

    def _forget(self, task_id: str, host: str, reason: str) -> None:
        node = self.node

        def commit(tx) -> None:
            if node.outbox.ack(task_id, dest=host):
                node.audit.append("hosted.diff_dropped", task=task_id, host=host, reason=reason)

        node.home.store.atomic(commit)
        node._discard_result(task_id)
        self._retry_at.pop(task_id, None)
        self._turns.pop(task_id, None)

    # ------------------------------------------------------------------ secure cycles
    def _secure_setup(self, join: dict, accepted: dict, cache: dict) -> tuple[SecureTurn, float]:
        """The cycle's set-up through the host, before the task exists: the roster, this node's
        round key and sealed shares, the members' keys. Returns the turn and its push deadline."""
        node, host = self.node, join["host"]
        samples = node.datasets.get(join["dataset"]).get("samples") or 0
        if samples <= 0:
            raise MeshflError(f"dataset {join['dataset']} has no sample count for a secure cycle", code="no_dataset")
        turn = SecureTurn(node.home.identity, host, join["model"])
        roster = node.peer.call(host, Message("hosted.setup", {"model": join["model"], "ticket": accepted["ticket"],
                                                               "bound": bound_of(samples)}),
                                accepted["deadline_in"] + CALL_TIMEOUT_S)
        keys = node.peer.call(host, turn.key_message(roster.fields), roster.fields["deadline_in"] + CALL_TIMEOUT_S)
        turn.take_keys(keys)
        node.secagg.open(turn.session)  # the task masks with it (Node._mask_result) and the gate sees it
        return turn, time.monotonic() + float(keys.fields["deadline_in"])

    def _reveal(self, host: str, turn: SecureTurn, deadline: float, names: list) -> None:
        """After the ack: wait for the survivors, reveal for them (audited before the shares leave)."""
        node, session = self.node, turn.session
        try:
            reply = node.peer.call(host, Message("hosted.reveal", {"model": turn.model, "session": session.session,
                                                                   "metric_names": names}),
                                   max(0.0, deadline - time.monotonic()) + CALL_TIMEOUT_S)
            shares = turn.shares_message(reply.fields)
            node.home.store.atomic(lambda tx: node.audit.append(
                "secagg.revealed", session=session.session, researcher=host, survivors=len(reply.fields["survivors"]),
                dropped=len(reply.fields["dropped"])))
            node.peer.call(host, shares, CALL_TIMEOUT_S)
        except MeshflError as exc:  # the cycle failed, or the host is gone: nothing to unmask with us
            node.log.warning("secure cycle of %s: no reveal (%s): %s", turn.model, exc.code, exc.message)

    # ------------------------------------------------------------------ asking for a slot
    def _idle(self) -> bool:
        return not self.node.queue.count("pending") and self.node._running_task is None

    def _busy(self, join: dict, key: str) -> bool:
        """A task of this join queued, running, or its result not yet acknowledged."""
        queued = self._queued.get(key)
        task = self.node.queue.get(queued) if queued else None
        if task is not None and task.state in ("pending", "running"):
            return True
        return any(i.dest == join["host"] and i.envelope["fields"].get("model") == join["model"]
                   for i in self._items())

    def _turn(self, join: dict) -> None:
        key = join_key(join["host"], join["model"])
        if time.monotonic() < self._retry_at.get(key, 0.0) or self._busy(join, key):
            return
        if join.get("blocked") and not self._unblocked(join, key):
            return
        if not self.node.peer.is_online(join["host"]):
            return
        model = join["model"]
        cache = self.joins.cache(key)
        request = Message("hosted.request", {"model": model, "capabilities": {"kind": "node"},
                                             "cached": (cache or {}).get("version_hash", "")})
        try:
            reply = self._requester(join["host"])(request)()
            if reply.type == "hosted.backoff":
                self._retry_at[key] = time.monotonic() + float(reply.fields["retry_in"])
                return
            a = reply.fields
            if cache is None or cache["version_hash"] != a["version_hash"] or cache["plan_hash"] != a["plan_hash"]:
                cache = self._pull(join, key, a, cache)
            turn = self._secure_setup(join, a, cache) if a.get("secure") else None
        except RemoteError as exc:
            self.node.log.warning("host %s refused hosted model %s (%s): %s", join["host_name"], model, exc.code,
                                  exc.message)
            self._retry_at[key] = time.monotonic() + ERROR_RETRY_S
            return
        except MeshflError as exc:
            self.node.log.info("host %s did not answer for %s (%s)", join["host_name"], model, exc.code)
            self._retry_at[key] = time.monotonic() + RETRY_S
            return
        self._queue(join, key, a, cache, turn)

    def _pull(self, join: dict, key: str, accepted: dict, cache: dict | None) -> dict:
        """The accepted version's tensors (and the plan, when its hash changed) into the cache."""
        plan = cache is None or cache["plan_hash"] != accepted["plan_hash"]
        peer = self.node.peer
        f, tensors = _chunks.pull(self._requester(join["host"]), lambda m: peer.send(join["host"], m), join["model"],
                                  accepted["version"], plan, peer.limits.max_message_bytes)
        if f["plan_hash"] != accepted["plan_hash"] or (not plan and cache["plan_hash"] != f["plan_hash"]):
            raise MeshflError("the host's plan changed between request and pull", code="plan_changed")
        record = dict(cache or {})
        if plan:
            record.update(plan_source=f.get("plan_source") or "", plan_class=f.get("plan_class") or "",
                          model_args=f.get("model_args") or {})
        record.update(version=f["version"], version_hash=f["version_hash"], plan_hash=f["plan_hash"])
        self.node.blobs.write(cache_blob(key), tensors)
        self.joins.set_cache(key, record)
        return record

    def _request(self, join: dict, cache: dict, training_args: dict | None, with_plan: bool = True,
                 turn: SecureTurn | None = None) -> Request:
        node = self.node
        return Request("hosted", join["host"], node.datasets.get(join["dataset"]), researcher_name=join["host_name"],
                       plan_source=cache["plan_source"] if with_plan else None, plan_name=cache["plan_class"],
                       training_args=training_args, secagg=turn is not None,
                       summed_over=turn.session.threshold if turn is not None else 1)

    def _unblocked(self, join: dict, key: str) -> bool:
        """Whether what blocked the join is gone (checked here: no slot asked, nothing audited)."""
        node, blocked = self.node, join["blocked"]
        if blocked.get("plan_hash"):
            if not (node.dev or node.plans.status(blocked["plan_hash"]) == APPROVED):
                return False
        else:
            cache = self.joins.cache(key)
            try:
                if cache is None:
                    raise MeshflError("nothing cached", code="no_cache")
                node.gate.check(self._request(join, cache, None, with_plan=False))
            except MeshflError:
                return False
        self.joins.update(key, blocked=None)
        node.log.info("hosted model %s of %s: unblocked", join["model"], join["host_name"])
        return True

    def _queue(self, join: dict, key: str, accepted: dict, cache: dict,
               secure: tuple[SecureTurn, float] | None = None) -> None:
        """The gate, then the task (its model in its own pack): one commit with its audit record."""
        node = self.node
        task_id = f"hosted-{uuid.uuid4().hex[:20]}"
        payload = {"kind": "hosted", "model": join["model"], "ticket": accepted["ticket"],
                   "version": accepted["version"], "cycle": accepted["cycle"], "researcher": join["host"],
                   "experiment": f"hosted:{join['model']}", "round": accepted["version"],
                   "plan_source": cache["plan_source"], "plan_class": cache["plan_class"],
                   "model_args": cache.get("model_args") or {}, "training_args": accepted["training_args"],
                   "dataset": join["dataset"], "dp": None, "secagg": secure[0].spec() if secure else None,
                   "preprocess": None}
        turn = secure[0] if secure else None
        try:
            request = self._request(join, cache, accepted["training_args"], turn=turn)
            node.blobs.write(task_id, node.blobs.read(cache_blob(key)))
        except MeshflError as exc:
            return self._refused(join, key, task_id, exc)

        def accept(tx) -> None:
            grant = node.gate.check(request)
            payload["plan_hash"] = grant.plan_hash
            node.queue.push(payload, task_id=task_id, lane=join["host"])
            self._queued[key] = task_id
            node.audit.append("task.accepted", task=task_id, researcher=join["host"], kind="hosted",
                              model=join["model"], version=accepted["version"], plan=grant.plan_hash,
                              dataset=join["dataset"])
            if turn is not None:  # the cycle's set-up, recorded with the task that uses it
                node.audit.append("secagg.setup", session=turn.session.session, researcher=join["host"], task=task_id,
                                  participants=len(turn.session.participants), threshold=turn.session.threshold)

        try:
            node.home.store.atomic(accept)
        except MeshflError as exc:
            node.blobs.delete(task_id)
            if isinstance(exc, PlanError):  # outside the rolled-back commit: the plan waits for review
                try:
                    node.plans.check(cache["plan_source"], dev=node.dev, name=cache["plan_class"],
                                     requester=join["host"])
                except MeshflError as again:
                    exc = again
            return self._refused(join, key, task_id, exc, cache["plan_source"])
        if secure:
            self._turns[task_id] = secure
        node._wake.set()

    def _refused(self, join: dict, key: str, task_id: str, exc: MeshflError, join_plan: str = "") -> None:
        node = self.node
        plan = plan_hash(join_plan) if isinstance(exc, PlanError) and join_plan else None
        blocked = {"code": exc.code, "message": exc.message, "plan_hash": plan, "at": time.time()}

        def commit(tx) -> None:  # the refusal and the blocked join: one commit
            node.audit.append("task.refused", task=task_id, researcher=join["host"], reason=exc.code, kind="hosted",
                              model=join["model"], dataset=exc.details.get("dataset", join["dataset"]))
            self.joins.update(key, blocked=blocked)

        node.home.store.atomic(commit)
        if exc.code == "plan_not_approved" and plan:
            node._warn_pending(plan, join["host"])
        else:
            node.log.warning("hosted model %s of %s refused here (%s): %s", join["model"], join["host_name"],
                             exc.code, exc.message)
