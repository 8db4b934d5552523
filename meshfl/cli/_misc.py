"""`meshfl audit ...` (the tamper-evident log of decisions) and `meshfl demo`."""

from __future__ import annotations

from pathlib import Path

import click

from ._app import UserError, emit_json, home_option, json_option, main, open_home, table, when


@main.group()
def audit() -> None:
    """The tamper-evident log of trust, dataset and plan decisions."""


@audit.command("list")
@home_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Show at most this many of the newest records.")
@json_option
def audit_list(home: Path, limit: int, as_json: bool) -> None:
    """Show the newest audit records, oldest of them first."""
    with open_home(home) as h:
        start = max(0, len(h.audit) - limit)
        records = [vars(r) for r in h.audit.records(start=start, limit=limit)]
    if as_json:
        emit_json(records)
        return
    table([[r["index"], when(r["ts"]), r["event"],
            " ".join(f"{k}={v}" for k, v in r["fields"].items())] for r in records],
          ["#", "TIME", "EVENT", "DETAILS"])


@audit.command("verify")
@home_option
@json_option
def audit_verify(home: Path, as_json: bool) -> None:
    """Check the hash chain; exit 1 and name the first bad record if it was tampered with."""
    with open_home(home) as h:
        result = h.audit.verify()
        head = h.audit.head()
    info = {"ok": result.ok, "count": result.count, "first_bad": result.first_bad,
            "reason": result.reason, "head": head.hash if head and result.ok else None}
    if as_json:
        emit_json(info)
    elif result.ok:
        click.echo(f"audit log ok: {result.count} records, head {info['head']}")
    if not result.ok:
        raise UserError(f"audit log tampered: record {result.first_bad} fails "
                        f"({result.reason}); {result.count} records before it verify")


@main.command()
@click.option("--nodes", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many nodes to start.")
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many training rounds to run.")
@click.option("--secagg", is_flag=True, help="Use secure aggregation (masked updates).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the curves into this image (.png, .svg, .pdf; needs meshfl[plot]).")
@json_option
def demo(nodes: int, rounds: int, secagg: bool, plot: Path | None, as_json: bool) -> None:
    """Try meshfl: train one model across local nodes.

    Starts one researcher and several nodes on this machine and runs a small federated
    training, then prints what happened.
    """
    from ..demo import run_demo  # imported here: it pulls in the whole stack

    result = run_demo(nodes=nodes, rounds=rounds, secagg=secagg, json_output=as_json, plot=plot)
    if as_json:
        emit_json(result)
