"""What each console page shows, read from a home's store: plain dicts, no web code.

The console runs in its own process beside ``meshfl node start`` and shares its LMDB home, as
the CLI does. Every read here is one short read transaction (the store's calls), and every value
is a decoded copy, so pages render outside any transaction: the console never holds a reader
open while it builds HTML, and never blocks the node, whose writers LMDB does not make wait
for readers.
"""

from __future__ import annotations

import functools
import time

from ..home import Home
from ..node._datasets import DatasetRegistry
from ..node._plans import PENDING, PlanRegistry
from ..node._presence import links, running_node
from ..node._review import held_results, policies
from ..node._sandbox import probe, protections
from ..privacy import Policy
from ..store import Outbox, TaskQueue

RECENT_TASKS = 20
AUDIT_PAGE = 100
AUDIT_BATCH = 500  # records per read transaction while scanning the chain backwards
# Offered in the audit filter (a prefix ending in "." selects a family); events seen on the page
# are added, so an event this list lacks can still be chosen.
AUDIT_EVENTS = (
    "home.", "peer.", "dataset.", "datasets.searched", "plan.", "plan.submitted", "plan.approved",
    "plan.rejected", "plan.removed", "plan.allowed", "plan.refused", "plan.allowed_dev", "task.",
    "task.accepted", "task.refused", "task.finished", "task.interrupted", "plan.violation", "policy.",
    "policy.set", "policy.reset", "result.", "result.held", "result.released", "result.denied",
    "result.withheld", "result.acknowledged", "node.", "secagg.", "overlay.rejected", "experiment.",
)
#: What the plan sandbox can do on this machine, tried once per console (a child process): the
#: kernel's answer does not change while the console runs.
machine_sandbox = functools.cache(probe)


def names(home: Home) -> dict[str, str]:
    """Trusted peer id -> the name this home gave it."""
    return {e["peer_id"]: e["name"] for e in home.trusted()}


# ---------------------------------------------------------------------- node pages
def node_overview(home: Home) -> dict:
    cfg = home.config
    running = running_node(home.path)
    dev = (running or {}).get("dev", cfg.dev)  # `node start --dev` overrides config.toml
    seen = links(home.store)
    peers = []
    for entry in home.trusted():
        link = seen.get(entry["peer_id"])
        peers.append({
            "name": entry["name"], "peer_id": entry["peer_id"], "endpoint": entry["endpoint"],
            # A link recorded up counts only while the node runs: a killed node cannot say so.
            "online": bool(running is not None and link and link["up"]),
            "since": link["since"] if link else None,
        })
    queue = TaskQueue(home.store, "tasks")
    peer_names = {p["peer_id"]: p["name"] for p in peers}
    now = time.time()
    recent = []
    for task in queue.recent(RECENT_TASKS):
        p = task.payload
        limit = min(cfg.task_timeout, float(p.get("training_args", {}).get("timeout") or cfg.task_timeout))
        recent.append({
            "id": task.id, "state": task.state, "experiment": p.get("experiment"), "round": p.get("round"),
            "researcher": peer_names.get(p.get("researcher"), p.get("researcher")),
            "dataset": p.get("dataset"), "plan": p.get("plan_hash"), "updated": task.updated,
            "error": (task.error or {}).get("code"),
            "elapsed": now - task.updated if task.state == "running" else None, "limit": limit,
        })
    audit = home.audit.verify()
    outbox = Outbox(home.store, "outbox")
    settings = cfg.sandbox_settings()
    return {
        "name": cfg.name, "peer_id": home.identity.peer_id, "card": home.identity.card.to_text(),
        "home": str(home.path), "running": running, "dev": dev, "peers": peers,
        "tasks": queue.counts(), "recent": recent, "held": len(outbox.held(buffers=False)),
        "unacknowledged": len(outbox.pending(buffers=False)),
        "protections": _protections(cfg, dev, len(peers), audit, policies(home)), "audit": audit,
        "sandbox": protections(settings, machine_sandbox() if settings else None),
    }


def _protections(cfg, dev: bool, trusted: int, audit, rules: dict[str, dict]) -> list[dict]:
    """Each protection in force on this node: on (True), off (False) or not available (None)."""
    return [
        {"name": "Plan approval", "on": not dev,
         "note": "a plan runs only once its exact code is approved here" if not dev else
         "DEVELOPMENT MODE: every trusted researcher's plan runs without approval"},
        {"name": "Authenticated, encrypted links", "on": True,
         "note": f"CURVE on every link; only the {trusted} trusted keys get in"},
        {"name": "Secure aggregation required", "on": cfg.force_secure_aggregation,
         "note": "researchers learn only the sum of the sites' updates" if cfg.force_secure_aggregation
         else "not required: a researcher may see this node's own update"},
        {"name": "Task time limit", "on": True, "note": f"{cfg.task_timeout:g} s per task"},
        {"name": "Minimum dataset size", "on": cfg.minimum_samples > 0,
         "note": f"datasets under {cfg.minimum_samples} samples are not offered"},
        {"name": "Audit chain", "on": audit.ok,
         "note": f"{audit.count} records verify" if audit.ok else
         f"BROKEN at record {audit.first_bad}: {audit.reason}"},
        _datasets_where("Review before release", rules, lambda r: r["policy"]["review"],
                        "results wait for your review before they leave"),
        _datasets_where("Privacy budgets", rules, lambda r: r["budget"] is not None,
                        "a budget the node keeps (differentially private tasks only)"),
    ]


def _datasets_where(name: str, rules: dict[str, dict], test, what: str) -> dict:
    """A protection some datasets' policies turn on: on for any, naming them; n/a without datasets."""
    found = [dataset for dataset, rule in rules.items() if test(rule)]
    note = f"{what}: {', '.join(found)}" if found else "no dataset's policy asks for it"
    return {"name": name, "on": bool(found) if rules else None, "note": note}


def node_datasets(home: Home) -> list[dict]:
    """Each dataset's record, whether it is offered, its policy in force (``policies``: budget,
    ledger) and that policy's rules as (label, value) pairs, worded as ``meshfl dataset show``."""
    minimum = home.config.minimum_samples
    records = DatasetRegistry(home.store).list()
    summaries = policies(home, [r["name"] for r in records])
    out = []
    for record in records:
        summary = summaries[record["name"]]
        lines = Policy.from_dict(summary["policy"]).describe()
        rules = [tuple(part.strip() for part in line.split(":", 1)) for line in lines]
        out.append({**record, "offered": record["samples"] is None or record["samples"] >= minimum,
                    "policy": summary, "rules": rules})
    return out


def node_review(home: Home) -> list[dict]:
    """Results held for review (what would leave, its privacy cost), each with its tensors' size."""
    return [{**r, "bytes": sum(row[3] for row in r["layout"] or [])} for r in held_results(home)]


def node_plans(home: Home) -> list[dict]:
    """Pending plans first (oldest first: review in arrival order), then the decided ones, the
    latest decision first; each pending plan with a summary of its diff."""
    registry = PlanRegistry(home.store, home.audit)
    peer_names = names(home)
    records = registry.list()
    pending = [r for r in records if r["status"] == PENDING]
    decided = sorted((r for r in records if r["status"] != PENDING), key=lambda r: -(r["decided_at"] or 0))
    return [{**{k: v for k, v in r.items() if k != "source"},
             "requester_name": peer_names.get(r["requester"], r["requester"]),
             "changes": registry.diff(r["hash"]).summary() if r["status"] == PENDING else None}
            for r in pending + decided]


def node_plan(home: Home, hash: str) -> dict:
    """One plan, its diff against the approved plan it replaces; PlanError when unknown."""
    registry = PlanRegistry(home.store, home.audit)
    digest = registry.resolve(hash)
    record = registry.get(digest)
    return {**record, "requester_name": names(home).get(record["requester"], record["requester"]),
            "diff": registry.diff(digest)}


def node_results(home: Home) -> list[dict]:
    """Results in the outbox: sent, kept until their researcher acknowledges them."""
    peer_names = names(home)
    out = []
    for item in Outbox(home.store, "outbox").pending(buffers=False):
        fields = item.envelope.get("fields", {})
        out.append({
            "task": item.msg_id, "researcher": peer_names.get(item.dest, item.dest),
            "experiment": fields.get("experiment"), "round": fields.get("round"), "ok": fields.get("ok"),
            "error": (fields.get("error") or {}).get("code"), "samples": fields.get("samples"),
            "bytes": sum(row[3] for row in item.envelope.get("layout", [])), "created": item.created,
        })
    return out


# ---------------------------------------------------------------------- both roles
def audit_page(home: Home, event: str = "", before: int | None = None, limit: int = AUDIT_PAGE) -> dict:
    """The chain's verification and up to `limit` records older than `before`, newest first,
    whose event is `event` (or starts with it, when it ends in ".")."""
    audit = home.audit
    head = audit.head()

    def wanted(name: str) -> bool:
        return not event or name == event or (event.endswith(".") and name.startswith(event))

    top = head.index if head else -1
    end = top if before is None else min(before - 1, top)
    records: list = []
    while end >= 0 and len(records) < limit:
        start = max(0, end - AUDIT_BATCH + 1)
        for record in reversed(audit.records(start=start, limit=end - start + 1)):
            if wanted(record.event):
                records.append(record)
                if len(records) == limit:
                    break
        end = start - 1
    more = len(records) == limit and records[-1].index > 0
    events = sorted({*AUDIT_EVENTS, *(r.event for r in records)})
    return {"verify": audit.verify(), "head": head, "records": records, "event": event,
            "events": events, "older": records[-1].index if more else None}


# ---------------------------------------------------------------------- researcher pages
def experiments(home: Home) -> list[dict]:
    """Every experiment in a researcher's home, the newest started first."""
    from ..researcher._experiment import EXPERIMENTS_TABLE, Experiment

    events = _last_events(home)
    out = []
    for exp_id, record in home.store.table(EXPERIMENTS_TABLE).items():
        history = Experiment.saved_history(home.store, exp_id)
        last = history[-1] if history else {}
        out.append({**_summary(record, events.get(exp_id, {})), "global": last.get("global", {}),
                    "nodes": len(last.get("nodes", {}))})
    return sorted(out, key=lambda e: -(e["started"] or 0))


def experiment(home: Home, exp_id: str) -> dict | None:
    """One experiment: its rounds, who took part in each, and its metric curves' data."""
    from ..researcher._experiment import EXPERIMENTS_TABLE, Experiment

    record = home.store.table(EXPERIMENTS_TABLE).get(exp_id)
    if record is None:
        return None
    history = Experiment.saved_history(home.store, exp_id)
    nodes = sorted({n for e in history for part in ("nodes", "failed") for n in e.get(part, {})}
                   | {n for e in history for n in e.get("dropped", [])})
    participation = []
    for entry in history:
        row = {}
        for node in nodes:
            if node in entry.get("nodes", {}):
                info = entry["nodes"][node]
                row[node] = {"state": "ok", "note": f"{info['samples']} samples" if info.get("samples") is not None
                             else "masked"}
            elif node in entry.get("failed", {}):
                row[node] = {"state": "failed", "note": entry["failed"][node].get("code", "failed")}
            elif node in entry.get("dropped", []):
                row[node] = {"state": "dropped", "note": "dropped"}
        participation.append({"round": entry["round"], "nodes": row})
    return {**_summary(record, _last_events(home).get(exp_id, {})), "history": history, "node_names": nodes,
            "participation": participation, "curves": curves(history)}


def curves(history: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """metric -> {"global" or node name -> [(round, value)]}, numeric metrics only."""
    out: dict[str, dict[str, list]] = {}
    for entry in history:
        rnd = entry["round"]
        sources = [("global", entry.get("global", {}))]
        sources += [(node, info.get("metrics") or {}) for node, info in entry.get("nodes", {}).items()]
        for source, metrics in sources:
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.setdefault(metric, {}).setdefault(source, []).append((rnd, float(value)))
    for metric in out:  # "global" first, then the nodes by name
        out[metric] = dict(sorted(out[metric].items(), key=lambda kv: (kv[0] != "global", kv[0])))
    return dict(sorted(out.items()))


def _summary(record: dict, events: dict) -> dict:
    """An experiment's settings and state: "finished", "failed" (its last run stopped on an error,
    audited) or "unfinished" (running now, or its process was interrupted: resume it)."""
    failed, started = events.get("failed"), events.get("started")
    if record["round"] >= record["rounds"]:
        state = "finished"
    elif failed and (started is None or failed.index > started.index):
        state = "failed"
    else:
        state = "unfinished"
    return {
        "id": record["id"], "plan_class": record["plan_class"], "tags": record["tags"],
        "round": record["round"], "rounds": record["rounds"], "state": state,
        "error": failed.fields.get("message") or failed.fields.get("error") if state == "failed" else None,
        "aggregator": (record.get("aggregator") or {}).get("name", "?"), "secagg": bool(record.get("secagg")),
        "min_nodes": record["min_nodes"], "started": started.ts if started else None,
    }


def _last_events(home: Home) -> dict[str, dict]:
    """experiment id -> {"started" | "failed" | ...: its latest such audit record}."""
    out: dict[str, dict] = {}
    for record in home.audit.records():
        if record.event.startswith("experiment."):
            out.setdefault(record.fields.get("experiment"), {})[record.event.split(".", 1)[1]] = record
    return out
