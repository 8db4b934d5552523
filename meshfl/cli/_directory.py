"""`meshfl directory ...`, `meshfl dataset publish|unpublish` and `meshfl access ...`: the dataset
directory (run one, search it), a node's publications and its access requests (meshfl.directory)."""

from __future__ import annotations

from pathlib import Path

import click

from ._app import UserError, emit_json, home_option, json_option, main, open_home, table, when
from ._node import dataset


@main.group()
def directory() -> None:
    """A directory of datasets: nodes publish signed descriptions to it (never data, never paths),
    researchers search it and ask found nodes for access through it."""


@directory.command("start")
@home_option
def directory_start(home: Path) -> None:
    """Run the directory until Ctrl-C (SIGINT) or SIGTERM. It admits the peers its home trusts
    (`meshfl peer trust`, taken up while it runs)."""
    from ..directory import Directory

    with open_home(home, role="directory"):
        pass  # a clear error for a missing or other home before the directory starts
    Directory(home).run()


@directory.command("entries")
@home_option
@json_option
def directory_entries(home: Path, as_json: bool) -> None:
    """What this directory lists: each node's published datasets, as it stored them."""
    from ..directory._signed import ENTRY, verify
    from ..errors import CryptoError

    rows = []
    with open_home(home, role="directory") as h:
        for key, row in h.store.table("entries").items():
            try:
                body = verify(row["doc"], ENTRY)
                rows.append({"node": body["node"], "node_name": body["card"].name, "dataset": body["dataset"],
                             "tags": body.get("tags"), "samples": body.get("samples"), "verified": True,
                             "received": row["received"]})
            except CryptoError:
                rows.append({"node": key.split("/")[0], "node_name": None, "dataset": key.split("/", 1)[-1],
                             "tags": None, "samples": None, "verified": False, "received": row["received"]})
    if as_json:
        emit_json(rows)
    elif not rows:
        click.echo("no entries (nodes publish with `meshfl dataset publish`)")
    else:
        table([[r["node_name"] or r["node"], r["dataset"], r["samples"], ",".join(r["tags"] or []),
                "yes" if r["verified"] else "NO", when(r["received"])] for r in rows],
              ["NODE", "DATASET", "SAMPLES", "TAGS", "VERIFIES", "RECEIVED"])


@directory.command("search")
@home_option
@click.option("--tags", default="", metavar="A,B", help="Datasets with all these tags (default: every one).")
@click.option("--directory", "directories", multiple=True, metavar="NAME",
              help="A trusted directory to search (repeatable; default: every trusted directory).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to wait for the directories.")
@json_option
def directory_search(home: Path, tags: str, directories: tuple, timeout: float, as_json: bool) -> None:
    """Search directories for datasets, also of nodes this researcher does not trust yet. Only
    entries whose node's signature verifies are shown."""
    from ..directory import _client

    wanted = [t.strip() for t in tags.split(",") if t.strip()]
    with open_home(home, role="researcher") as h:
        ids = _client.directory_ids(h, list(directories) or None)
        if not ids:
            raise UserError("this researcher trusts no directory: `meshfl peer trust --directory ...`")
        with _client.dialing(h, ids, timeout) as peer:
            found = _client.search(peer, ids, wanted, timeout)
    records = [r for rows in found.values() for r in rows]
    if as_json:
        emit_json(records)
    elif not records:
        click.echo("no datasets found")
    else:
        table([[r["node"], r["node_name"], r["name"], r["samples"], ",".join(r["tags"] or []), r["description"]]
               for r in records], ["NODE", "NODE NAME", "DATASET", "SAMPLES", "TAGS", "DESCRIPTION"])
        click.echo(f"\nask for access: meshfl access request --home {home} --node NODE --dataset DATASET "
                   f"--endpoint tcp://THIS_HOST:PORT")


@dataset.command("publish")
@home_option
@click.argument("name")
@click.option("--directory", required=True, metavar="NAME",
              help="The trusted directory to publish to (`meshfl peer trust --directory`).")
@json_option
def dataset_publish(home: Path, name: str, directory: str, as_json: bool) -> None:
    """List dataset NAME in a directory: its tags, description, format, sample count, shape and
    column names, signed with this node's key (never its path, never its data). The running node
    sends it when connected to the directory."""
    from ..directory import Publications
    from ..node._release import nudge_node

    with open_home(home, role="node") as h:
        info = Publications(h).publish(name, directory)
        running = nudge_node(h.path)
    if as_json:
        emit_json({**info, "node_running": running})
    else:
        click.echo(f"{name} published to {', '.join(info['directories'])}"
                   + ("" if running else "; it goes out when the node runs"))


@dataset.command("unpublish")
@home_option
@click.argument("name")
@click.option("--directory", metavar="NAME", help="Withdraw from this directory only (default: from all).")
@json_option
def dataset_unpublish(home: Path, name: str, directory: str | None, as_json: bool) -> None:
    """Withdraw dataset NAME from directories (the running node tells them)."""
    from ..directory import Publications
    from ..node._release import nudge_node

    with open_home(home, role="node") as h:
        info = Publications(h).unpublish(name, directory)
        nudge_node(h.path)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"{name} published to {', '.join(info['directories']) or 'no directory'}")


@main.group()
def access() -> None:
    """Access requests: a researcher asks a node found in a directory for access; the node's
    operator approves (trusting the researcher) or denies."""


@access.command("request")
@home_option
@click.option("--node", required=True, metavar="PEER_ID", help="The node, as `meshfl directory search` shows it.")
@click.option("--dataset", "dataset_name", required=True, help="The dataset asked for.")
@click.option("--endpoint", required=True, metavar="ENDPOINT",
              help="Where the node is to dial this researcher once approved, e.g. tcp://lab.example.org:5555.")
@click.option("--message", default="", help="A note for the node's operator (who you are, what for).")
@click.option("--directory", "directories", multiple=True, metavar="NAME",
              help="The directory to ask through (default: the first trusted one listing the dataset).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to wait for the directories.")
@json_option
def access_request(home: Path, node: str, dataset_name: str, endpoint: str, message: str, directories: tuple,
                   timeout: float, as_json: bool) -> None:
    """Ask a node for access to a dataset, through a directory that lists it. The node's key (from
    its verified entry) is trusted here at once, so it gets in when its operator approves."""
    from ..directory import _client
    from ..home import check_endpoint

    check_endpoint(endpoint)
    if any(wild in endpoint for wild in ("0.0.0.0", "*", "[::]")):
        raise UserError(f"{endpoint} is no address a node can dial: give this machine's host name")
    with open_home(home, role="researcher") as h:
        ids = _client.directory_ids(h, list(directories) or None)
        with _client.dialing(h, ids, timeout) as peer:
            entries = [r for r in _client.search(peer, ids, None, timeout).get(node, [])
                       if r["name"] == dataset_name]
            if not entries:
                raise UserError(f"no verified entry of dataset {dataset_name!r} of node {node} in "
                                f"{', '.join(directories) or 'the trusted directories'}")
            queued = _client.request_access(h, peer, entries[0], endpoint, message, timeout)
    if as_json:
        emit_json(queued)
    else:
        click.echo(f"access request {queued['id']} {queued['status']}: the node's operator decides "
                   f"(see `meshfl access list --home {home}`)")


@access.command("list")
@home_option
@click.option("--status", type=click.Choice(["pending", "approved", "denied"]), help="Only requests in this state.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="A researcher's home: seconds to wait for the directories.")
@json_option
def access_list(home: Path, status: str | None, timeout: float, as_json: bool) -> None:
    """A node's home: the access requests it received. A researcher's: the requests it filed, and
    what became of them (asked of its directories)."""
    with open_home(home) as h:
        if h.config.role == "node":
            from ..directory import AccessRequests

            rows = AccessRequests(h.store, h.audit).list(status)
            header = ["ID", "RESEARCHER", "DATASET", "ENDPOINT", "STATUS", "RECEIVED", "MESSAGE"]
            cells = [[r["id"], f"{r['name']} ({r['researcher']})", r["dataset"], r["endpoint"], r["status"],
                      when(r["received"]), r["message"]] for r in rows]
        elif h.config.role == "researcher":
            from ..directory import _client

            ids = _client.directory_ids(h, None)
            with _client.dialing(h, ids, timeout) as peer:
                rows = [r for r in _client.requests(peer, ids, timeout) if status in (None, r["status"])]
            header = ["ID", "NODE", "DATASET", "STATUS", "FILED"]
            cells = [[r["id"], r["node"], r["dataset"], r["status"], when(r["received"])] for r in rows]
        else:
            raise UserError("access requests are a node's or a researcher's")
    if as_json:
        emit_json(rows)
    elif not rows:
        click.echo("no access requests")
    else:
        table(cells, header)


def _decide(approve: bool):
    @home_option
    @click.argument("request_id", metavar="ID")
    @click.option("--name", help="Approve only: what to call the researcher here (default: its card's name).")
    @click.option("--by", default="operator", show_default=True, help="Who decides, for the audit log.")
    @json_option
    def command(home: Path, request_id: str, name: str | None, by: str, as_json: bool) -> None:
        from ..directory import decide

        with open_home(home, role="node") as h:
            done = decide(h, request_id, approve, by=by, name=name)
        if as_json:
            emit_json(done)
            return
        if approve:
            click.echo(f"approved: {done['name']} ({done['researcher']}) is trusted at {done['endpoint']}; it "
                       f"may use every dataset whose policy admits any trusted researcher "
                       f"(narrow with `meshfl dataset policy NAME --researchers ...`)")
        else:
            click.echo(f"denied request {request_id}")
        if not done["node_running"]:
            click.echo("no running node took the news: it acts on it within seconds once it runs")

    return command


access.command("approve", help="Approve a pending request: trust the researcher's key and endpoint, so the "
               "node dials it and serves it.")(_decide(True))
access.command("deny", help="Deny a pending request: nothing changes but its record.")(_decide(False))
