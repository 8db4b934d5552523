"""`meshfl node ...` and `meshfl dataset ...`: run a node and manage the data it offers."""

from __future__ import annotations

from pathlib import Path

import click

from ..directory._access import AccessRequests
from ..directory._publications import Publications
from ..node._datasets import FORMATS, DatasetRegistry, normalize_tags
from ..node._plans import STATUSES, PlanRegistry
from ..node._presence import running_node
from ..node._review import policies
from ..node._sandbox import probe, protections
from ..privacy import KINDS, PolicyTable
from ..store import Outbox, TaskQueue
from ._app import UserError, emit_json, home_option, json_option, main, open_home, table, when

@main.group()
def node() -> None:
    """Run a node, or see what it holds and does."""


@node.command("start")
@home_option
@click.option("--dev", is_flag=True,
              help="Run training plans without approval (development only; the node's "
                   "config.toml can also turn this on).")
def node_start(home: Path, dev: bool) -> None:
    """Start the node and keep it running until Ctrl-C (SIGINT) or SIGTERM."""
    from ..node import Node  # imported here: the other commands need no torch/zmq start-up

    with open_home(home, role="node"):
        pass  # a clear error for a missing or researcher home before the node starts
    Node(home, dev=True if dev else None).run()  # None: the home's config.toml decides


@node.command("console")
@home_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the console (plain HTTP) "
                   "to the network: prefer an SSH tunnel.")
@click.option("--port", type=click.IntRange(0, 65535), default=8470, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--read-only", is_flag=True, help="Show everything, change nothing (no buttons; every "
                                                "action is refused).")
@click.option("--by", metavar="NAME",
              help="Who acts through this console, for the audit log (default: your login name).")
def node_console(home: Path, host: str, port: int, read_only: bool, by: str | None) -> None:
    """Serve the operator's web console for this home until Ctrl-C.

    It prints a URL with a secret token: open it in a browser on this machine. A node's home shows
    its overview, datasets, plans (approve or reject them, with their diff) and audit log; a
    researcher's home its experiments. Runs beside `meshfl node start` on the same home. Needs
    `pip install meshfl[console]`.
    """
    with open_home(home):
        pass  # a clear error for a missing home before the web stack loads
    from ..console import serve  # the console extra; a coded error names it when missing

    serve(home, host=host, port=port, read_only=read_only, by=by,
          echo=lambda line: click.echo(line, err=line.startswith("warning:")))


@node.command("status")
@home_option
@json_option
def node_status(home: Path, as_json: bool) -> None:
    """Summarise the node's home: trust, datasets, plans, tasks. Works while it runs or not.

    "dev" is config.toml's setting; "running" describes the node process, if one runs (its pid,
    and its own "dev", which `node start --dev` may have turned on).
    """
    with open_home(home, role="node") as h:
        plans = PlanRegistry(h.store, h.audit).list()
        tasks = TaskQueue(h.store, "tasks")
        info = {
            "home": str(h.path), "name": h.config.name, "peer_id": h.identity.peer_id,
            "dev": h.config.dev, "running": running_node(h.path),
            "trusted": [{"peer_id": e["peer_id"], "name": e["name"], "endpoint": e["endpoint"],
                         "directory": e["directory"]} for e in h.trusted()],
            "published": Publications(h).list(),
            "access_pending": len(AccessRequests(h.store, h.audit).list("pending")),
            "datasets": len(DatasetRegistry(h.store).list()),
            "plans": {s: sum(p["status"] == s for p in plans) for s in STATUSES},
            "tasks": tasks.counts(),
            "outbox": len(Outbox(h.store, "outbox")),
            "held_for_review": len(Outbox(h.store, "outbox").held(buffers=False)),
            "audit": len(h.audit),
            "policies": policies(h),
            "sandbox": probe() if h.config.sandbox else None,
            "hosted": _joined(h),
        }
        settings = h.config.sandbox_settings()
    if as_json:
        emit_json(info)
        return
    click.echo(f"node {info['name']} ({info['peer_id']})  home {info['home']}")
    running = info["running"]
    pid = f" (pid {running['pid']})" if running and running.get("pid") else ""
    click.echo("node process:  " + ("not running" if running is None else f"running{pid}"))
    if (running or {}).get("dev", info["dev"]):
        click.echo("development mode: training plans run WITHOUT approval")
    click.echo("trusted peers: " + (", ".join(f"{e['name']} ({e['endpoint'] or 'no endpoint'}"
                                              f"{', directory' if e['directory'] else ''})"
                                              for e in info["trusted"]) or "none"))
    click.echo(f"datasets:      {info['datasets']}")
    if info["published"]:
        click.echo("published:     " + ", ".join(f"{p['dataset']} to {', '.join(p['directories'])}"
                                                 for p in info["published"]))
    if info["access_pending"]:
        click.echo(f"access:        {info['access_pending']} request(s) await you (meshfl access list)")
    click.echo("plans:         " + ", ".join(f"{n} {s}" for s, n in info["plans"].items()))
    click.echo("tasks:         " + ", ".join(f"{n} {s}" for s, n in info["tasks"].items()))
    click.echo(f"outbox:        {info['outbox']} unacknowledged, {info['held_for_review']} held for review")
    click.echo(f"audit records: {info['audit']}")
    for j in info["hosted"]:
        cached = f"version {j['version']}" if j["version"] is not None else "nothing pulled yet"
        blocked = f"; BLOCKED: {j['blocked']['code']} ({j['blocked']['message']})" if j["blocked"] else ""
        click.echo(f"hosted model:  {j['model']} of {j['host_name']} on dataset {j['dataset']}, {cached}{blocked}")
    click.echo("plan sandbox:")
    for row in protections(settings, info["sandbox"]):
        click.echo(f"  {row['name'] + ':':<16}{'on ' if row['on'] else 'OFF'}  {row['note']}")
    for name, rules in info["policies"].items():
        click.echo(f"policy of {name}:")
        for line in rules["lines"]:
            click.echo(f"  {line}")


@node.command("join")
@home_option
@click.option("--host", "host", required=True, metavar="PEER",
              help="The host: a trusted peer's name or id, with an endpoint (the node dials it).")
@click.option("--model", required=True, help="The hosted model's name on that host.")
@click.option("--dataset", "dataset_name", required=True, metavar="NAME", help="The dataset to train it on.")
@click.option("--by", default="operator", show_default=True, help="Who decides, for the audit log.")
@json_option
def node_join(home: Path, host: str, model: str, dataset_name: str, by: str, as_json: bool) -> None:
    """Serve a hosted model: whenever idle, the node asks the host for a slot, trains the model on
    DATASET (its plan approved here, the dataset's policy allowing kind "hosted") and pushes the diff.
    A running node picks the join up at once; joining again changes the dataset."""
    from ..node._joins import Joins, find_host
    from ..node._release import nudge_node

    with open_home(home, role="node") as h:
        entry = find_host(h.trusted(), host)
        DatasetRegistry(h.store).get(dataset_name)
        record = Joins(h.store, h.audit).join(entry["peer_id"], entry["name"], model, dataset_name, by=by)
    nudge_node(home)  # a running node acts on it now (else within seconds)
    if as_json:
        emit_json(record)
        return
    click.echo(f"joined model {model} of {entry['name']} with dataset {dataset_name}")


@node.command("leave")
@home_option
@click.option("--host", "host", required=True, metavar="PEER", help="The host's name or id.")
@click.option("--model", required=True, help="The hosted model's name.")
@click.option("--by", default="operator", show_default=True, help="Who decides, for the audit log.")
def node_leave(home: Path, host: str, model: str, by: str) -> None:
    """Stop serving a hosted model (a diff already in the outbox is still sent)."""
    from ..node._joins import Joins

    with open_home(home, role="node") as h:
        joins = Joins(h.store, h.audit)
        peer = next((j["host"] for j in joins.list() if host in (j["host"], j["host_name"]) and j["model"] == model),
                    None)
        if peer is None or not joins.leave(peer, model, by=by):
            raise UserError(f"this node has not joined model {model} of {host}")
    click.echo(f"left model {model} of {host}")


@main.group()
def dataset() -> None:
    """The data this node offers (files never leave it)."""


@dataset.command("add")
@home_option
@click.option("--name", required=True, help="A unique name, e.g. mnist-train.")
@click.option("--tags", required=True, metavar="A,B",
              help="Comma-separated tags researchers search by, e.g. mnist,train.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="csv: header row, one sample per row. npy: one features array. npz or torch "
                   "(.pt dict of tensors): arrays x and y. images: folder/<class>/<image files>.")
@click.option("--path", required=True, type=click.Path(exists=True, path_type=Path),
              help="The file or folder holding the data.")
@click.option("--target", metavar="COLUMN",
              help="The label: a csv column, or the npz/torch array name if not y.")
@click.option("--description", default="", help="A note for researchers.")
@json_option
def dataset_add(home: Path, name: str, tags: str, fmt: str, path: Path, target: str | None,
                description: str, as_json: bool) -> None:
    """Register data so researchers can train on it (the node reads it in place)."""
    with open_home(home, role="node") as h:
        record = DatasetRegistry(h.store, h.audit).add(
            name, normalize_tags(tags), fmt, path, target=target, description=description)
        minimum = h.config.minimum_samples
    if as_json:
        emit_json(record)
        return
    _show(record)
    if record["samples"] is not None and record["samples"] < minimum:
        click.echo(f"note: fewer than minimum_samples={minimum} samples, so researchers will "
                   f"not see it", err=True)


@dataset.command("list")
@home_option
@json_option
def dataset_list(home: Path, as_json: bool) -> None:
    """List registered datasets."""
    with open_home(home, role="node") as h:
        records = DatasetRegistry(h.store).list()
    if as_json:
        emit_json(records)
    elif not records:
        click.echo("no datasets (add one with `meshfl dataset add`)")
    else:
        table([[r["name"], r["format"], r["samples"], _shape(r), ",".join(r["tags"])]
               for r in records], ["NAME", "FORMAT", "SAMPLES", "SHAPE", "TAGS"])


@dataset.command("show")
@home_option
@click.argument("name")
@json_option
def dataset_show(home: Path, name: str, as_json: bool) -> None:
    """Show everything recorded about one dataset."""
    with open_home(home, role="node") as h:
        record = DatasetRegistry(h.store).get(name)
        record = {**record, "policy": policies(h, [name])[name]}
    if as_json:
        emit_json(record)
    else:
        _show(record)
        click.echo("  policy:")
        for line in record["policy"]["lines"]:
            click.echo(f"    {line}")


@dataset.command("remove")
@home_option
@click.argument("name")
@json_option
def dataset_remove(home: Path, name: str, as_json: bool) -> None:
    """Stop offering a dataset (its files are left alone)."""
    with open_home(home, role="node") as h:
        removed = DatasetRegistry(h.store, h.audit).remove(name)
    if as_json:
        emit_json({"name": name, "removed": removed})
    elif removed:
        click.echo(f"removed dataset {name}")
    if not removed:
        raise UserError(f"no dataset named {name!r} (see `meshfl dataset list`)")


@dataset.command("policy")
@home_option
@click.argument("name")
@click.option("--researchers", metavar="A,B", help="Only these researchers (names as trusted here, or peer ids).")
@click.option("--any-researcher", is_flag=True, help="Every trusted researcher (the default).")
@click.option("--kinds", metavar="K,L", help=f"Request kinds served, of: {', '.join(KINDS)}.")
@click.option("--min-participants", type=click.IntRange(min=1),
              help="Contribute only to sums of at least this many nodes (above 1: secure aggregation only).")
@click.option("--require-secagg/--no-require-secagg", default=None, help="Serve only secure aggregation.")
@click.option("--require-dp/--no-require-dp", default=None, help="Serve only differentially private tasks.")
@click.option("--min-noise", type=click.FloatRange(min=0), help="The smallest DP noise multiplier accepted.")
@click.option("--budget", "epsilon", type=click.FloatRange(min=0, min_open=True),
              help="The dataset's privacy budget epsilon (DP tasks only, spent by released results).")
@click.option("--delta", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              help="The budget's delta (default 1e-5).")
@click.option("--no-budget", is_flag=True, help="Remove the privacy budget.")
@click.option("--review/--auto-release", default=None,
              help="Hold results for your review (`meshfl result ...`) before they leave.")
@click.option("--min-cell", type=click.IntRange(min=1),
              help="Analytics: suppress a released cell (bin, count, group) of fewer records than this.")
@click.option("--default-min-cell", is_flag=True, help="Analytics: cells suppressed below minimum_samples again.")
@click.option("--exact-extremes/--coarse-extremes", default=None,
              help="Analytics: release exact minima and maxima (default: rounded outward to a coarse grid).")
@click.option("--reset", is_flag=True, help="Back to the default policy.")
@click.option("--by", default="operator", show_default=True, help="Who decides, for the audit log.")
@json_option
def dataset_policy(home: Path, name: str, researchers, any_researcher, kinds, min_participants, require_secagg,
                   require_dp, min_noise, epsilon, delta, no_budget, review, min_cell, default_min_cell,
                   exact_extremes, reset, by, as_json) -> None:
    """Show or change what dataset NAME may be used for (each change is audited).

    Without options, shows the policy in force. Options change only the rules they name.
    """
    changes: dict = {}
    if researchers and any_researcher:
        raise UserError("give --researchers or --any-researcher, not both")
    if researchers:
        changes["researchers"] = [r.strip() for r in researchers.split(",") if r.strip()]
    if any_researcher:
        changes["researchers"] = None
    if kinds:
        changes["kinds"] = [k.strip() for k in kinds.split(",") if k.strip()]
    for key, value in (("min_participants", min_participants), ("require_secagg", require_secagg),
                       ("require_dp", require_dp), ("min_noise", min_noise), ("epsilon", epsilon),
                       ("delta", delta), ("review", review), ("min_cell", min_cell),
                       ("exact_extremes", exact_extremes)):
        if value is not None:
            changes[key] = value
    if no_budget:
        if epsilon is not None:
            raise UserError("give --budget or --no-budget, not both")
        changes["epsilon"] = None
    if default_min_cell:
        if min_cell is not None:
            raise UserError("give --min-cell or --default-min-cell, not both")
        changes["min_cell"] = None
    with open_home(home, role="node") as h:
        DatasetRegistry(h.store).get(name)  # a clear error for an unknown dataset
        table_ = PolicyTable(h.store, h.audit)
        if reset:
            table_.reset(name, by=by)
        if changes:
            table_.set(name, by=by, **changes)
        info = policies(h, [name])[name]
    if as_json:
        emit_json(info)
        return
    click.echo(f"policy of {name}:")
    for line in info["lines"]:
        click.echo(f"  {line}")


def _joined(h) -> list[dict]:
    """The hosted models this node joined, with what it last pulled and why it waits, if it does."""
    from ..node._joins import Joins, join_key

    joins = Joins(h.store, h.audit)
    out = []
    for j in joins.list():
        cache = joins.cache(join_key(j["host"], j["model"])) or {}
        out.append({"host": j["host"], "host_name": j["host_name"], "model": j["model"], "dataset": j["dataset"],
                    "joined": j["joined"], "version": cache.get("version"), "plan_hash": cache.get("plan_hash"),
                    "blocked": j.get("blocked")})
    return out


def _shape(record: dict) -> str:
    return "x".join(map(str, record["shape"])) if record.get("shape") else "-"


def _show(record: dict) -> None:
    click.echo(f"dataset {record['name']} ({record['format']})")
    click.echo(f"  path:        {record['path']}")
    click.echo(f"  tags:        {', '.join(record['tags']) or '-'}")
    click.echo(f"  samples:     {record['samples']}")
    click.echo(f"  shape:       {_shape(record)}")
    if record.get("columns"):
        click.echo("  columns:     " + ", ".join(f"{c} ({record['dtypes'][c]})"
                                                for c in record["columns"]))
    if record.get("target"):
        click.echo(f"  target:      {record['target']}")
    if record.get("classes"):
        click.echo(f"  classes:     {', '.join(map(str, record['classes']))}")
    if record.get("description"):
        click.echo(f"  description: {record['description']}")
    click.echo(f"  added:       {when(record['added'])}")
