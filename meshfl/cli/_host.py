"""`meshfl host ...`: host models that many clients train (meshfl/hosted), on a researcher home."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click
import orjson

from ._app import UserError, emit_json, home_option, json_option, main, open_home, table, when


@main.group()
def host() -> None:
    """Host models for many clients: cycles or FedBuff, bulk enrollment, progress."""


def _store(home):
    from ..hosted._state import HostStore

    return HostStore(home.store, home.path / "hosted")


def _json_arg(text: str | None, what: str) -> dict:
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UserError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} must be a JSON object")
    return value


@host.command("start")
@home_option
@click.option("--listen", metavar="ENDPOINT", help="Where clients connect (default: the home's listen).")
@click.option("--enroll-listen", metavar="ENDPOINT",
              help="Also accept enrollment tokens here (any key may connect, only to redeem a token).")
@click.option("--max-transfers", type=click.IntRange(1), default=2, show_default=True,
              help="Model-sized pulls and pushes in flight at once (others wait their turn): bounds host memory.")
def host_start(home: Path, listen: str | None, enroll_listen: str | None, max_transfers: int) -> None:
    """Serve the home's hosted models until Ctrl-C (SIGINT) or SIGTERM."""
    from ..hosted import Host

    with open_home(home, role="researcher"):
        pass  # a clear error for a missing or node home first
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    h = Host(home, listen=listen, enroll_listen=enroll_listen, max_transfers=max_transfers).start()
    try:
        click.echo(f"host listening on {h.endpoint}")
        if h.enroll_server is not None:
            click.echo(f"enrollment on {h.enroll_server.endpoint}")
        done.wait()
    finally:
        h.close()


@host.command("add-model")
@home_option
@click.argument("name")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True,
              help="Python file defining the TorchTrainingPlan (its whole text is the plan clients approve).")
@click.option("--class", "plan_class", required=True, help="The plan's class name in that file.")
@click.option("--model-args", help="JSON object passed to init_model().")
@click.option("--training-args", help="JSON object of training arguments sent to every client.")
@click.option("--mode", type=click.Choice(["cycle", "async"]), default="cycle", show_default=True,
              help="cycle: synchronous cycles; async: FedBuff (a version every --buffer diffs).")
@click.option("--cycle-length", type=float, help="Seconds a cycle stays open (cycle mode).")
@click.option("--min-clients", type=int, help="Diffs a cycle needs at its deadline.")
@click.option("--max-clients", type=int, help="Clients a cycle accepts (async: training at once).")
@click.option("--goal", type=int, help="Diffs that close a cycle at once (default: max clients).")
@click.option("--buffer", type=int, help="Diffs per new version (async mode).")
@click.option("--max-staleness", type=int, help="Versions a diff may lag behind (async mode).")
@click.option("--aggregator", help='Aggregator name or JSON, e.g. \'{"name": "fedadam", "server_lr": 0.01}\'.')
@click.option("--secure", is_flag=True, help="Secure aggregation (cycle mode, 2..100 clients): the host sees only "
              "the cycle's masked sum.")
@click.option("--setup-timeout", type=float, help="Seconds each set-up step of a secure cycle may wait.")
@json_option
def host_add_model(home: Path, name: str, plan_file: Path, plan_class: str, model_args: str | None,
                   training_args: str | None, mode: str, cycle_length, min_clients, max_clients, goal, buffer,
                   max_staleness, aggregator: str | None, secure: bool, setup_timeout, as_json: bool) -> None:
    """Host a new model NAME; a running host serves it within a second."""
    from ..hosted._host import create_model

    server = {"mode": mode}
    for key, value in (("cycle_length", cycle_length), ("min_clients", min_clients), ("max_clients", max_clients),
                       ("goal", goal), ("buffer", buffer), ("max_staleness", max_staleness),
                       ("setup_timeout", setup_timeout), ("secure_aggregation", secure or None)):
        if value is not None:
            server[key] = value
    if aggregator:
        server["aggregator"] = _json_arg(aggregator, "--aggregator") if aggregator.lstrip().startswith("{") \
            else {"name": aggregator}
    with open_home(home, role="researcher") as h:
        info = create_model(h, _store(h), name, plan_file.read_text(encoding="utf-8"), plan_class=plan_class,
                            model_args=_json_arg(model_args, "--model-args"),
                            training_args=_json_arg(training_args, "--training-args"), server=server)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"hosting {name} ({mode} mode), version 0 {info['version_hash'][:12]}, plan {info['plan_hash']}")


def stored_status(h, name: str | None = None) -> list[dict]:
    """What the home's records say of each hosted model (a running host or not)."""
    from ..errors import HostedError
    from ..hosted._state import CYCLES

    state = _store(h)
    models = [m for m in state.models() if name in (None, m["name"])]
    if name and not models:
        raise HostedError(f"no hosted model named {name!r}", code="unknown_model")
    out = []
    for m in models:
        cycle = h.store.read(lambda tx: tx.get(CYCLES, m["name"]))
        diffs = state.diffs(m["name"], cycle["cycle"])
        out.append({"name": m["name"], "mode": m["server"]["mode"], "version": m["version"],
                    "plan_hash": m["plan_hash"], "cycle": cycle["cycle"],
                    "open": {"diffs": len(diffs), "clients": len({d["client"] for d in diffs}),
                             "deadline": cycle.get("deadline"), "phase": _phase(m["server"], cycle)},
                    "server": m["server"], "versions": state.versions(m["name"])})
    return out


def _phase(server: dict, cycle: dict) -> str:
    """A cycle's phase: a secure cycle's step (:mod:`meshfl.hosted._secure`), "open", or "buffer" (async)."""
    if server.get("secure_aggregation"):
        return (cycle.get("secure") or {}).get("phase", "accepting")
    return "open" if server["mode"] == "cycle" else "buffer"


@host.command("status")
@home_option
@click.argument("name", required=False)
@json_option
def host_status(home: Path, name: str | None, as_json: bool) -> None:
    """Each hosted model's version history: diffs, clients, staleness, client-reported metrics."""
    with open_home(home, role="researcher") as h:
        models = stored_status(h, name)
    if as_json:
        emit_json(models)
        return
    for m in models:
        secure = f", secure: {m['open']['phase']}" if m["server"].get("secure_aggregation") else ""
        click.echo(f"{m['name']}: {m['mode']} mode, version {m['version']}, cycle {m['cycle']}{secure} "
                   f"({m['open']['diffs']} diff(s) so far)")
        table([[v["version"], when(v["created"]), v["diffs"], v["clients"], v["samples"],
                " ".join(f"{k}:{n}" for k, n in sorted(v["staleness"].items(), key=lambda kv: int(kv[0]))) or "-",
                " ".join(f"{k}={x:.4g}" for k, x in sorted(v["metrics"].items())) or "-"] for v in m["versions"]],
              ["VERSION", "CREATED", "DIFFS", "CLIENTS", "SAMPLES", "STALENESS", "METRICS"])


@host.command("enroll")
@home_option
@click.option("--cards", "cards_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True,
              help="A file of client cards (the key `meshfl peer id` prints), one a line; # starts a comment.")
@json_option
def host_enroll(home: Path, cards_file: Path, as_json: bool) -> None:
    """Enroll many clients at once (one transaction, one audit record)."""
    from ..crypto import PeerCard
    from ..hosted._host import enroll_cards

    cards = []
    for n, line in enumerate(cards_file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                cards.append(PeerCard.from_text(line))
            except Exception as exc:
                raise UserError(f"{cards_file}:{n}: not a valid card ({exc})") from None
    with open_home(home, role="researcher") as h:
        new = enroll_cards(h, cards, f"file:{cards_file.name}")
    if as_json:
        emit_json({"cards": len(cards), "new": new})
    else:
        click.echo(f"enrolled {len(cards)} client(s), {new} new")


@host.command("revoke")
@home_option
@click.argument("peer_id")
def host_revoke(home: Path, peer_id: str) -> None:
    """Cut an enrolled client off (a running host drops it within a second)."""
    from ..hosted._host import revoke_in

    with open_home(home, role="researcher") as h:
        if not revoke_in(h, peer_id):
            raise UserError(f"no enrolled client {peer_id}")
    click.echo(f"revoked {peer_id}")


@host.group("token")
def host_token() -> None:
    """Enrollment tokens: a client redeems one for itself (limited uses, revocable, audited)."""


@host_token.command("create")
@home_option
@click.option("--uses", type=click.IntRange(1), default=1, show_default=True, help="Clients it may enroll.")
@click.option("--expires", type=float, help="Seconds until it expires (default: never).")
@click.option("--label", default="", help="A note for the audit log (which batch of devices).")
@json_option
def token_create(home: Path, uses: int, expires: float | None, label: str, as_json: bool) -> None:
    """Print a new token (shown once: only its hash is stored)."""
    from ..hosted._enroll import create_token

    with open_home(home, role="researcher") as h:
        token = create_token(h, uses, expires, label)
    if as_json:
        emit_json({"token": token, "id": token.split(".")[0], "uses": uses})
    else:
        click.echo(token)


@host_token.command("list")
@home_option
@json_option
def token_list(home: Path, as_json: bool) -> None:
    """List enrollment tokens: uses, uses left, expiry, revoked (never their secrets)."""
    from ..hosted._enroll import tokens

    with open_home(home, role="researcher") as h:
        rows = tokens(h)
    if as_json:
        emit_json(rows)
        return
    table([[t["id"], t["uses"], t["uses_left"], when(t["expires"]), "yes" if t["revoked"] else "no", t["label"]]
           for t in rows], ["ID", "USED", "LEFT", "EXPIRES", "REVOKED", "LABEL"])


@host_token.command("revoke")
@home_option
@click.argument("token_id")
def token_revoke(home: Path, token_id: str) -> None:
    """Stop a token's further uses (clients it enrolled stay enrolled)."""
    from ..hosted._enroll import revoke_token

    with open_home(home, role="researcher") as h:
        if not revoke_token(h, token_id.split(".")[0]):
            raise UserError(f"no usable token {token_id}")
    click.echo(f"revoked token {token_id.split('.')[0]}")
