"""`meshfl result ...`: review the results held back by a dataset's policy, release or deny them."""

from __future__ import annotations

from pathlib import Path

import click

from ..node._review import decide, held_results
from ._app import UserError, emit_json, home_option, json_option, main, open_home, table, when


@main.group()
def result() -> None:
    """Results waiting for your review before they leave this node.

    A dataset whose policy says --review holds each finished result here: see what would leave,
    then release it (it goes to the researcher, its privacy cost is debited) or deny it (the
    researcher gets the error result_denied). Every decision is audited.
    """


@result.command("list")
@home_option
@json_option
def result_list(home: Path, as_json: bool) -> None:
    """List results held for review, oldest first."""
    with open_home(home, role="node") as h:
        held = held_results(h)
    if as_json:
        emit_json(held)
    elif not held:
        click.echo("no results await review")
    else:
        table([[r["task"], r["researcher"], r["dataset"], r["round"], _eps(r), when(r["finished"])] for r in held],
              ["TASK", "RESEARCHER", "DATASET", "ROUND", "EPSILON", "FINISHED"])


@result.command("show")
@home_option
@click.argument("task")
@json_option
def result_show(home: Path, task: str, as_json: bool) -> None:
    """Show what a held result would release: task, researcher, plan, metrics, update norm, cost."""
    with open_home(home, role="node") as h:
        found = [r for r in held_results(h) if r["task"] == task]
    if not found:
        raise UserError(f"no result {task} awaits review (see `meshfl result list`)")
    (r,) = found
    if as_json:
        emit_json(r)
        return
    click.echo(f"task:        {r['task']}  (experiment {r['experiment']}, round {r['round']})")
    click.echo(f"researcher:  {r['researcher']}")
    click.echo(f"dataset:     {r['dataset']}")
    click.echo(f"plan:        {r['plan']}")
    click.echo(f"samples:     {r['samples']}")
    click.echo("metrics:     " + (", ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items())) or "-"))
    norm = r["update_norm"]
    click.echo(f"update norm: {'-' if norm is None else f'{norm:.6g}'}  (L2, trained minus received)")
    if r["secure_aggregation"]:
        click.echo("secure aggregation: the researcher gets this update masked, summed with the others")
    cost = r["privacy_cost"]
    click.echo("privacy:     " + ("not a differentially private task" if cost is None else
                                  f"epsilon {cost['epsilon']:.4g} (delta {cost['delta']:g}) of the dataset's budget"))
    if r["layout"]:
        tensors = ", ".join(f"{name} {dtype}{shape}" for name, dtype, shape, _ in r["layout"])
        click.echo(f"tensors:     {tensors}")
    click.echo(f"\nrelease:     meshfl result release {r['task']} --home {h.path}")
    click.echo(f"deny:        meshfl result deny {r['task']} --home {h.path}")


def _decide(release: bool):
    @home_option
    @click.argument("task")
    @click.option("--by", default="operator", show_default=True, help="Who decides, for the audit log.")
    @json_option
    def command(home: Path, task: str, by: str, as_json: bool) -> None:
        with open_home(home, role="node") as h:
            done = decide(h, task, release, by)
        if as_json:
            emit_json(done)
            return
        what = done["outcome"] + (f" ({done['error']})" if done["outcome"] == "withheld" else "")
        click.echo(f"result {task} {what}" + ("" if done["node_running"] else "; it goes out when the node runs"))

    return command


result.command("release", help="Let a held result leave: it goes to its researcher and its privacy "
               "cost is debited.")(_decide(True))
result.command("deny", help="Withhold a held result: the researcher gets result_denied.")(_decide(False))


def _eps(r: dict) -> str:
    cost = r["privacy_cost"]
    return "-" if cost is None else f"{cost['epsilon']:.4g}"
