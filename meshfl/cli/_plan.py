"""`meshfl plan ...`: review the training plans researchers sent, and approve or reject them."""

from __future__ import annotations

from pathlib import Path

import click

from ..node._plans import PENDING, STATUSES, PlanRegistry
from ._app import UserError, emit_json, home_option, json_option, main, open_home, table, when

HASH_HELP = "The plan's hash, or its first 8 or more characters."


@main.group()
def plan() -> None:
    """Review, approve or reject training plans.

    A node runs a plan's code only once its operator approved the plan's hash here.
    """


@plan.command("list")
@home_option
@click.option("--status", type=click.Choice(STATUSES), help="Only plans with this status.")
@json_option
def plan_list(home: Path, status: str | None, as_json: bool) -> None:
    """List training plans, oldest first (the source is left out; see `plan show`).

    For each pending plan, CHANGES says how many lines it adds and removes against the approved
    plan it replaces (`plan show HASH --diff` shows them), or that it is new.
    """
    with open_home(home, role="node") as h:
        registry = PlanRegistry(h.store, h.audit)
        records = registry.list(status)
        changes = {r["hash"]: registry.diff(r["hash"]).summary() for r in records
                   if r["status"] == PENDING}
    summaries = [{**{k: v for k, v in r.items() if k != "source"}, "changes": changes.get(r["hash"])}
                 for r in records]
    if as_json:
        emit_json(summaries)
    elif not records:
        click.echo("no training plans" + (f" with status {status}" if status else ""))
    else:
        table([[r["hash"][:16], r["status"], r["name"] or "-", r["requester"] or "-",
                when(r["submitted"]), r["changes"]] for r in summaries],
              ["HASH", "STATUS", "NAME", "REQUESTER", "SUBMITTED", "CHANGES"])


@plan.command("show")
@home_option
@click.argument("hash", metavar="HASH")
@click.option("--diff", "show_diff", is_flag=True,
              help="Show what changed against the last approved plan with the same name or "
                   "class (a unified diff) instead of the whole source.")
@json_option
def plan_show(home: Path, hash: str, show_diff: bool, as_json: bool) -> None:
    """Show a plan's details, then its full source code to review."""
    with open_home(home, role="node") as h:
        registry = PlanRegistry(h.store, h.audit)
        record = registry.get(registry.resolve(hash))
        diff = registry.diff(record["hash"]) if show_diff else None
    if as_json:
        emit_json({**record, "diff": diff.to_dict()} if diff else record)
        return
    click.echo(f"hash:      {record['hash']}")
    click.echo(f"name:      {record['name'] or '-'}")
    click.echo(f"status:    {record['status']}")
    click.echo(f"requester: {record['requester'] or '-'}")
    click.echo(f"submitted: {when(record['submitted'])}")
    if record["decided_by"]:
        click.echo(f"decided:   {record['status']} by {record['decided_by']} "
                   f"at {when(record['decided_at'])}")
    click.echo("-" * 72)
    if diff is None or diff.base is None:
        if diff is not None:
            click.echo("no approved plan with the same name or class: the whole source follows")
        click.echo(record["source"], nl=False)
        return
    base = diff.base
    click.echo(f"changes against {base['hash']} ({base['name'] or 'unnamed'}, approved by "
               f"{base['decided_by']} at {when(base['decided_at'])}): lines +{diff.added} -{diff.removed}")
    for line in diff.lines:
        click.echo(line)


def _decide(action: str):
    @home_option
    @click.argument("hash", metavar="HASH")
    @click.option("--by", default="operator", show_default=True,
                  help="Who decides, for the audit log.")
    @json_option
    def command(home: Path, hash: str, by: str, as_json: bool) -> None:
        with open_home(home, role="node") as h:
            registry = PlanRegistry(h.store, h.audit)
            record = getattr(registry, action)(hash, by=by)
        if as_json:
            emit_json({k: v for k, v in record.items() if k != "source"})
        else:
            click.echo(f"training plan {record['hash']} {record['status']}")

    return command


plan.command("approve", help="Allow a plan to run on this node (review it with "
             "`meshfl plan show` first). " + HASH_HELP)(_decide("approve"))
plan.command("reject", help="Refuse a plan: requests to run it fail. " + HASH_HELP)(
    _decide("reject"))


@plan.command("remove")
@home_option
@click.argument("hash", metavar="HASH")
@json_option
def plan_remove(home: Path, hash: str, as_json: bool) -> None:
    """Forget a plan; if sent again it waits for approval again."""
    with open_home(home, role="node") as h:
        registry = PlanRegistry(h.store, h.audit)
        full = registry.resolve(hash)
        removed = registry.remove(full)
    if as_json:
        emit_json({"hash": full, "removed": removed})
    elif removed:
        click.echo(f"removed training plan {full}")
    if not removed:
        raise UserError(f"no training plan {hash}")
