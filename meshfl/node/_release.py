"""The one way a result leaves the node (design §8): outbox, privacy debit and audit, one commit.

When a task ends, :meth:`Release.finish` writes its result to the outbox, marks the task done or
failed, and appends the audit record, in one LMDB transaction. A result of a dataset whose policy
asks for review is *held* there (a state of the outbox record, not a second store) until the
operator decides (:meth:`Release.decide`: ``meshfl result release`` / ``deny``, or the console);
any other result is released in that same commit. Releasing debits the task's privacy cost
against its dataset's budget (:class:`~meshfl.privacy.Ledger`) and audits ``result.released``;
denying answers the researcher with ``result_denied`` and debits nothing, as nothing left.

So a kill at any instant leaves either no trace of the release or all of it: a released result
always has its debit and its audit record, and a result is never debited twice (the ledger keeps
one entry per task, the outbox one record per task).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

from ..errors import MeshflError
from ..privacy import Gate, Ledger
from ..store import AuditLog, Outbox, Store, TaskQueue

log = logging.getLogger("meshfl.node")

DENIED = {"code": "result_denied", "message": "the node's operator withheld this result"}
#: What a held result's review record keeps of its task.
REVIEWED = ("kind", "experiment", "round", "analysis", "researcher", "dataset", "plan_hash", "privacy", "secagg",
            "audit")


class Release:
    def __init__(self, store: Store, outbox: Outbox, queue: TaskQueue, ledger: Ledger, audit: AuditLog,
                 gate: Gate) -> None:
        self.store, self.outbox, self.queue, self.ledger, self.audit, self.gate = store, outbox, queue, ledger, audit, gate

    def finish(self, task, fields: dict, envelope: dict, review: dict | None = None,
               also: Callable[[dict], None] | None = None) -> tuple[bool, dict]:
        """Commit a finished task's result: (held for review?, the fields the researcher gets).

        ``envelope`` is what the outbox keeps besides ``fields``; a held result also keeps
        ``review`` (what the operator reviews: metrics, update norm, privacy cost), which never
        leaves the node. ``also(final fields)`` joins the commit (the experiment's node state)."""
        p = task.payload
        held = bool(fields["ok"]) and self.gate.policy(p["dataset"]).review

        def commit(tx) -> dict:
            kept = {**envelope, "fields": dict(fields)}  # fresh each attempt: atomic may run twice
            if held:
                kept["review"] = {"task": {k: p.get(k) for k in REVIEWED}, **(review or {})}
            elif fields["ok"]:
                self._release(task.id, p, kept, "auto")  # may withhold it: then it fails
            final = kept["fields"]
            if final["ok"]:
                self.queue.done(task.id, {"samples": final.get("samples")})
            else:
                self.queue.fail(task.id, final["error"])
                self.ledger.unreserve(task.id)
            self.audit.append("task.finished", task=task.id, ok=final["ok"], error=final.get("error", {}).get("code"))
            if not final["ok"] and final["error"].get("code") == "plan_violation":
                self.audit.append("plan.violation", task=task.id, plan=p.get("plan_hash"),
                                  researcher=p["researcher"], what=final["error"].get("message"))
            if held:
                self.audit.append("result.held", task=task.id, dataset=p["dataset"], researcher=p["researcher"])
            self.outbox.put(task.id, p["researcher"], kept, held=held)
            if also is not None:
                also(final)
            crash_point("release.before_commit")
            return final

        final = self.store.atomic(commit)
        crash_point("release.after_commit")
        if held:
            log.warning("result of task %s (dataset %s) awaits your review: meshfl result show %s",
                        task.id, p["dataset"], task.id)
        return held, final

    def decide(self, task_id: str, release: bool, by: str = "operator") -> dict:
        """Release or deny a held result (the operator's review); returns the fields the researcher
        will get. The node sends them when it next looks at the outbox (at once if it runs)."""
        item = self.outbox.get(task_id)
        if item is None or not item.held:
            raise MeshflError(f"no result {task_id} awaits review here (see `meshfl result list`)",
                              code="unknown_result")
        payload = item.envelope["review"]["task"]

        def commit(tx) -> dict:
            envelope = {k: v for k, v in item.envelope.items() if k != "review"}
            envelope["fields"] = dict(envelope["fields"])
            if release:
                self._release(task_id, payload, envelope, by)
            else:
                envelope = {**envelope, "fields": {**_head(envelope["fields"]), "ok": False, "error": DENIED}}
                self.ledger.unreserve(task_id)
                self.audit.append("result.denied", task=task_id, dataset=payload["dataset"],
                                  researcher=payload["researcher"], by=by)
            self.outbox.release(task_id, envelope)
            return envelope["fields"]

        return self.store.atomic(commit)

    def _release(self, task_id: str, payload: dict, envelope: dict, by: str) -> None:
        """The result leaves: its debit (if private) and ``result.released``, in the caller's commit.
        A cost that no longer fits the budget (the operator lowered it meanwhile) stops it."""
        privacy = payload.get("privacy")
        fields = envelope["fields"]
        epsilon = None
        if privacy:
            policy = self.gate.policy(payload["dataset"])
            committed = self.ledger.committed(payload["dataset"], policy.delta, exclude=task_id, extra=privacy["mechanism"])
            if policy.epsilon is not None and committed > policy.epsilon:
                self.ledger.unreserve(task_id)
                envelope["fields"] = {**_head(fields), "ok": False,
                                      "error": {"code": "privacy_budget_exhausted",
                                                "message": f"dataset {payload['dataset']}'s privacy budget no longer "
                                                           f"covers this result; it was withheld",
                                                "details": {"dataset": payload["dataset"]}}}
                self.audit.append("result.withheld", task=task_id, dataset=payload["dataset"],
                                  reason="privacy_budget_exhausted")
                return
            entry = self.ledger.debit(task_id, payload["dataset"], payload["researcher"], privacy["mechanism"],
                                      policy.delta)
            epsilon = entry["epsilon"]
            left = None if policy.epsilon is None else max(0.0, policy.epsilon - entry["epsilon_total"])
            fields["privacy"] = {"dataset": payload["dataset"], "epsilon": epsilon, "delta": policy.delta,
                                 "epsilon_spent": entry["epsilon_total"], "epsilon_left": left}
        self.audit.append("result.released", task=task_id, dataset=payload["dataset"],
                          researcher=payload["researcher"], epsilon=epsilon, by=by,
                          **{k: fields[k] for k in ("suppressed",) if k in fields}, **(payload.get("audit") or {}))


def _head(fields: dict) -> dict:
    """The fields that name a result (its task, and its experiment and round, or its analysis)."""
    return {k: fields[k] for k in ("task_id", "experiment", "round", "analysis") if k in fields}


def home_gate(home, ledger: Ledger, check_plan) -> Gate:
    """A home's gate: its policies, with its config.toml's node-wide settings applied."""
    from ..privacy import PolicyTable

    return Gate(PolicyTable(home.store, home.audit), ledger, check_plan=check_plan,
                force_secure_aggregation=home.config.force_secure_aggregation,
                kinds_off=() if home.config.analytics else ("analytics", "preprocessing"))


def open_release(home) -> Release:
    """The release step over a home's store, for the operator's commands (the node need not run)."""
    from ._plans import PlanRegistry

    plans = PlanRegistry(home.store, home.audit)
    ledger = Ledger(home.store)
    gate = home_gate(home, ledger, lambda request: plans.check(request.plan_source, dev=home.config.dev))
    return Release(home.store, Outbox(home.store, "outbox"), TaskQueue(home.store, "tasks"), ledger, home.audit, gate)


def nudge_node(home_path) -> bool:
    """Tell the node running on ``home_path`` that results were released (SIGUSR1); False when
    none runs there, or one that does not take the signal (a node inside another program): it
    finds them in the outbox within seconds, or when it starts."""
    from ._presence import running_node

    info = running_node(home_path) or {}
    if not info.get("nudge") or info.get("pid") == os.getpid():
        return False
    try:
        os.kill(int(info["pid"]), signal.SIGUSR1)
    except (OSError, ValueError, KeyError):
        return False
    return True


_CRASH_POINT = os.environ.get("MESHFL_CRASH_POINT")  # read once: it is checked on every release


def crash_point(name: str) -> None:
    """Fault injection for crash tests: SIGKILL this process at ``name`` when the environment's
    ``MESHFL_CRASH_POINT`` named it as the process started (never set outside tests)."""
    if _CRASH_POINT == name:
        os.kill(os.getpid(), signal.SIGKILL)
