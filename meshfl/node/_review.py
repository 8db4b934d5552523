"""What a node's operator reviews, read from its home, and the review's decision.

The results held for review (what would leave, and its privacy cost), each dataset's policy in
force with its budget's use, and releasing or denying a held result: one implementation for the
CLI (``meshfl result ...``, ``meshfl dataset policy|show``, ``meshfl node status``) and the
console. Each read is one of the store's short read transactions; the values are decoded copies.
"""

from __future__ import annotations

from collections import Counter

from ._datasets import DatasetRegistry
from ._release import Release, nudge_node, open_release

#: What became of a held result the operator decided on: "withheld" is a release that its
#: dataset's budget, lowered meanwhile, no longer covers (the researcher gets that error).
OUTCOMES = ("released", "withheld", "denied")


def held_results(home, release: Release | None = None) -> list[dict]:
    """Each result held for review, oldest first: its task, researcher (by the name trusted
    here), dataset, plan hash, metrics, update norm, tensors and what releasing it would cost."""
    release = release or open_release(home)
    names = {e["peer_id"]: e["name"] for e in home.trusted()}
    out = []
    for item in release.outbox.held(buffers=False):
        review = item.envelope.get("review", {})
        task = review.get("task", {})
        out.append({
            "task": item.msg_id,
            "researcher": names.get(task.get("researcher"), task.get("researcher")),
            "dataset": task.get("dataset"),
            "experiment": task.get("experiment"),
            "round": task.get("round"),
            "plan": task.get("plan_hash"),
            "secure_aggregation": bool(task.get("secagg")),
            "samples": review.get("samples"),
            "metrics": review.get("metrics") or {},
            "update_norm": review.get("update_norm"),
            "privacy_cost": privacy_cost(release, task),
            "finished": item.created,
            "layout": item.envelope.get("layout"),
        })
    return out


def privacy_cost(release: Release, task: dict) -> dict | None:
    """What releasing the task's result now would debit from its dataset's budget (the ledger's
    entry for it: its epsilon on top of what the dataset has spent); None for a task that is not
    differentially private."""
    privacy = task.get("privacy")
    if not privacy:
        return None
    policy = release.gate.policy(task["dataset"])
    return {"epsilon": release.ledger.cost(task["dataset"], privacy["mechanism"], policy.delta),
            "delta": policy.delta, "mechanism": privacy["mechanism"], "budget": policy.epsilon}


def policies(home, names: list[str] | None = None, release: Release | None = None) -> dict[str, dict]:
    """Per dataset (all registered ones by default): the policy in force (config.toml applied),
    its rules as readable lines, its budget's use (None without a budget) and how many released
    results its ledger has debited."""
    release = release or open_release(home)
    gate = release.gate
    names = names if names is not None else [r["name"] for r in DatasetRegistry(home.store).list()]
    debited = Counter(entry["dataset"] for entry in release.ledger.entries())
    out = {}
    for name in names:
        policy = gate.policy(name)
        budget = gate.budget(name)
        lines = policy.describe()
        if budget is not None:
            # The part of the budget that accepted, unreleased tasks have set aside.
            budget["reserved"] = max(0.0, budget["epsilon"] - budget["spent"] - budget["left"])
            lines.append(f"budget spent:     epsilon {budget['spent']:.4g}, {budget['reserved']:.4g} set aside "
                         f"for queued tasks, {budget['left']:.4g} left")
        if budget is not None or debited[name]:
            lines.append(f"privacy ledger:   {debited[name]} released result(s) debited")
        out[name] = {"policy": policy.to_dict(), "budget": budget, "ledger_entries": debited[name], "lines": lines}
    return out


def decide(home, task_id: str, release: bool, by: str) -> dict:
    """Release or deny the held result of ``task_id`` (audited ``result.released`` or
    ``result.denied`` with ``by``), then tell the running node, if any: the operator's one way
    to decide, from the CLI or the console. MeshflError ``unknown_result`` when none is held."""
    fields = open_release(home).decide(task_id, release, by=by)
    error = (fields.get("error") or {}).get("code")
    outcome = ("released" if fields["ok"] else "withheld") if release else "denied"
    return {"task": task_id, "released": release, "ok": fields["ok"], "outcome": outcome, "error": error,
            "node_running": nudge_node(home.path)}
