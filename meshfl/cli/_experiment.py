"""`meshfl experiment ...`: a researcher's experiments, from the records in its home.

Every experiment's settings, plan source and last checkpoint are in the home's LMDB table
``experiments``, each round's history entry in ``rounds``: so `list`, `show` and `plot` work
without any node, and `resume` goes on from the last checkpoint with the stored plan.
"""

from __future__ import annotations

from pathlib import Path

import click

from ._app import UserError, emit_json, home_option, json_option, main, open_home, table, when

SHOWN_NAMES = 3  # nodes named in a table cell; more are counted


@main.group()
def experiment() -> None:
    """A researcher's experiments: list, show their rounds, plot, resume.

    They read the records an Experiment keeps in the researcher's home after every round.
    """


def _records(h) -> dict[str, dict]:
    from ..researcher._experiment import EXPERIMENTS_TABLE

    return dict(h.store.table(EXPERIMENTS_TABLE).items())


def _resolve(records: dict, name: str) -> str:
    """An experiment id, or a prefix of exactly one."""
    if name in records:
        return name
    found = [i for i in records if i.startswith(name)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"no experiment {name!r} in this home (see `meshfl experiment list`)")
    raise UserError(f"{name!r} names {len(found)} experiments: {', '.join(sorted(found))}")


def _summary(record: dict, history: list[dict]) -> dict:
    from ..node._plans import plan_hash

    last = history[-1] if history else {}
    return {
        "id": record["id"], "plan": record["plan_class"], "plan_hash": plan_hash(record["plan_source"]),
        "tags": record["tags"], "aggregator": record["aggregator"], "secagg": bool(record.get("secagg")),
        "round": record["round"], "rounds": record["rounds"], "attempts": record["attempt"] + 1,
        "min_nodes": record["min_nodes"], "created": record.get("created"), "updated": record.get("updated"),
        "last_round": {"nodes": sorted(last.get("nodes", {})), "failed": sorted(last.get("failed", {})),
                       "dropped": list(last.get("dropped", [])), "global": last.get("global", {})},
    }


def _resume_command(home: Path, record: dict) -> str:
    more = "" if record["round"] < record["rounds"] else f" --rounds {record['rounds'] + 10}"
    return f"meshfl experiment resume --home {home} {record['id']}{more}"


def _names(names) -> str:
    names = sorted(names)
    if not names:
        return "-"
    if len(names) > SHOWN_NAMES:
        return f"{len(names)} nodes"
    return ",".join(names)


def _scores(metrics: dict) -> dict[str, float]:
    from ..researcher._history import COUNTS

    return {k: v for k, v in metrics.items() if isinstance(v, float) and k not in COUNTS}


def _metrics_line(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in _scores(metrics).items()) or "-"


@experiment.command("list")
@home_option
@json_option
def experiment_list(home: Path, as_json: bool) -> None:
    """List the experiments in this home, newest first."""
    from ..researcher import Experiment

    with open_home(home, role="researcher") as h:
        records = _records(h)
        rows = [_summary(r, Experiment.saved_history(h.store, i)[-1:]) for i, r in records.items()]
    rows.sort(key=lambda r: r["updated"] or 0, reverse=True)
    if as_json:
        emit_json(rows)
    elif not rows:
        click.echo("no experiments yet (run one with meshfl.Experiment)")
    else:
        table([[r["id"], r["plan"], f"{r['round']}/{r['rounds']}", r["aggregator"]["name"],
                "yes" if r["secagg"] else "no", _names(r["last_round"]["nodes"]),
                _metrics_line(r["last_round"]["global"]), when(r["updated"])] for r in rows],
              ["ID", "PLAN", "ROUNDS", "AGGREGATOR", "SECAGG", "LAST NODES", "LAST METRICS", "UPDATED"])


@experiment.command("show")
@home_option
@click.argument("name", metavar="ID")
@json_option
def experiment_show(home: Path, name: str, as_json: bool) -> None:
    """Show an experiment's settings and every round: who took part, who failed or dropped,
    the metrics, and the command that resumes it. ID may be a unique prefix."""
    from ..researcher import Experiment

    with open_home(home, role="researcher") as h:
        records = _records(h)
        record = records[_resolve(records, name)]
        history = list(Experiment.saved_history(h.store, record["id"]))
    info = _summary(record, history)
    resume = _resume_command(home, record)
    if as_json:
        emit_json({**info, "plan_source": record["plan_source"], "model_args": record["model_args"],
                   "training_args": record["training_args"], "history": history, "resume": resume})
        return
    agg = record["aggregator"]
    params = ", ".join(f"{k}={v}" for k, v in agg.items() if k != "name")
    click.echo(f"experiment {info['id']}")
    click.echo(f"  plan:        {info['plan']} (sha256 {info['plan_hash'][:16]}...)")
    click.echo(f"  tags:        {', '.join(info['tags'])}")
    click.echo(f"  aggregator:  {agg['name']}" + (f" ({params})" if params else ""))
    click.echo(f"  secure agg:  {'yes' if info['secagg'] else 'no'}")
    click.echo(f"  rounds:      {info['round']} of {info['rounds']} done, {info['attempts']} attempt(s)")
    click.echo(f"  min nodes:   {info['min_nodes']}")
    click.echo(f"  created:     {when(info['created'])}, updated {when(info['updated'])}")
    if history:
        click.echo("")
        metrics = list(dict.fromkeys(k for e in history for k in _scores(e.get("global", {}))))
        table([[e["round"], _names(e.get("nodes", {})),
                ",".join(f"{n}:{err.get('code')}" for n, err in sorted(e.get("failed", {}).items())) or "-",
                _names(e.get("dropped", [])), e.get("samples"), f"{e.get('seconds', 0):.2f}",
                *[f"{e['global'][m]:.4f}" if isinstance(e.get("global", {}).get(m), float) else "-" for m in metrics]]
               for e in history],
              ["ROUND", "NODES", "FAILED", "DROPPED", "SAMPLES", "SECONDS", *[m.upper() for m in metrics]])
    click.echo("")
    if record["round"] < record["rounds"]:
        click.echo(f"resume it:   {resume}")
    else:
        click.echo(f"finished; to train longer: {resume}")


@experiment.command("plot")
@home_option
@click.argument("name", metavar="ID")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The image to write (.png, .svg or .pdf).")
@click.option("--metric", "metrics", multiple=True, help="Only this metric (repeat for several).")
def experiment_plot(home: Path, name: str, output: Path, metrics: tuple[str, ...]) -> None:
    """Draw an experiment's global and per-node metrics over its rounds (needs meshfl[plot])."""
    from ..researcher import Experiment

    with open_home(home, role="researcher") as h:
        records = _records(h)
        history = Experiment.saved_history(h.store, _resolve(records, name))
    history.plot(output, metrics=metrics or None)
    click.echo(f"wrote {output} ({len(history)} rounds)")


@experiment.command("resume")
@home_option
@click.argument("name", metavar="ID")
@click.option("--rounds", type=click.IntRange(min=1), help="A new total number of rounds (to train longer).")
@click.option("--nodes", "wanted", type=click.IntRange(min=1),
              help="Wait for this many nodes before the first round (default: the experiment's min_nodes).")
@click.option("--wait", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Seconds to wait for them.")
@click.option("--tensorboard", type=click.Path(file_okay=False, path_type=Path),
              help="Write TensorBoard event files under this folder (needs meshfl[plot]).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write the curves here at the end.")
@json_option
def experiment_resume(home: Path, name: str, rounds: int | None, wanted: int | None, wait: float,
                      tensorboard: Path | None, plot: Path | None, as_json: bool) -> None:
    """Go on with an experiment from its last checkpoint, with the plan stored in its record.

    Listens on the home's address, waits for the nodes, runs the rounds left (or up to --rounds)
    and prints one line per round. The round metrics are the nodes' (an `evaluate` function given
    in Python is not stored: resume from Python to use one). Ctrl-C stops it; run it again to go on.
    """
    from ..researcher import Experiment, Researcher
    from ..researcher._history import TensorBoardLog
    from ..researcher._plot import require_matplotlib

    with open_home(home, role="researcher") as h:
        records = _records(h)
        record = records[_resolve(records, name)]
    if (rounds or record["rounds"]) <= record["round"]:
        raise UserError(f"{record['id']} has done {record['round']} of {record['rounds']} rounds; "
                        f"give --rounds N, more than {record['round']}, to train longer")
    if plot is not None:
        require_matplotlib()  # fail now, not after the training
    if tensorboard is not None:
        TensorBoardLog.check()

    def line(entry: dict) -> None:
        if not as_json:
            click.echo(f"round {entry['round']:3d}  nodes {len(entry['nodes'])}  "
                       f"{_metrics_line(entry.get('global', {}))}  ({entry['seconds']:.2f}s)")

    with Researcher(home) as researcher:
        need = wanted or record["min_nodes"]
        if not as_json:
            click.echo(f"waiting up to {wait:g}s for {need} node(s) on {researcher.endpoint} ...", err=True)
        researcher.wait_for_nodes(need, timeout=wait)
        exp = Experiment.resume(researcher, record["id"], rounds=rounds, on_round=line, tensorboard=tensorboard,
                                progress=False if as_json else None)
        history = exp.run()
    if plot is not None:
        history.plot(plot)
    if as_json:
        emit_json({"id": record["id"], "round": exp.round, "rounds": exp.rounds, "history": list(history),
                   "plot": str(plot) if plot else None})
    else:
        click.echo(f"{record['id']}: {exp.round} of {exp.rounds} rounds done" + (f"; wrote {plot}" if plot else ""))
