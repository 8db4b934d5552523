"""`meshfl init` and `meshfl peer ...`: create a home, show this peer's key, trust other peers."""

from __future__ import annotations

from pathlib import Path

import click

from ..crypto import PeerCard
from ..home import Home
from ._app import UserError, emit_json, home_option, json_option, main, open_home, table

DEFAULT_RESEARCHER_LISTEN = "tcp://0.0.0.0:5555"
DEFAULT_DIRECTORY_LISTEN = "tcp://0.0.0.0:5560"


@main.command()
@home_option
@click.option("--role", type=click.Choice(["node", "researcher", "directory"]), required=True,
              help="node: keeps data and trains on it. researcher: runs experiments. directory: "
                   "lists the datasets nodes publish to it, relays access requests.")
@click.option("--name", required=True, help="A name for humans, e.g. hospital-a or alice.")
@click.option("--listen", metavar="ENDPOINT",
              help=f"Where this peer accepts connections. A researcher defaults to "
                   f"{DEFAULT_RESEARCHER_LISTEN}, a directory to {DEFAULT_DIRECTORY_LISTEN}; "
                   f"a node usually needs none.")
@click.option("--dev", is_flag=True,
              help="Node only: run training plans without approval. For development, never "
                   "with real data.")
@json_option
def init(home: Path, role: str, name: str, listen: str | None, dev: bool, as_json: bool) -> None:
    """Create a home folder for a node or researcher.

    It holds the keys (keys/, the secret readable only by you), the settings (config.toml,
    commented: read it) and an empty store.
    """
    if listen is None and role != "node":
        listen = DEFAULT_RESEARCHER_LISTEN if role == "researcher" else DEFAULT_DIRECTORY_LISTEN
    with Home.init(home, role, name, listen=listen, dev=dev) as h:
        info = {"home": str(h.path), "role": role, "name": name, "peer_id": h.identity.peer_id,
                "card": h.identity.card.to_text(), "listen": listen, "dev": dev}
    if as_json:
        emit_json(info)
        return
    click.echo(f"Created {role} home {info['home']}")
    click.echo(f"peer id: {info['peer_id']}")
    click.echo(f"public key (share it; it is not secret):\n  {info['card']}")
    click.echo("\nNext steps:")
    at = f" --home {info['home']}"
    if role == "node":
        click.echo(f"  1. Give the public key above to your researcher.\n"
                   f"  2. Trust the researcher:  meshfl peer trust{at} --name NAME "
                   f"--key RESEARCHER_KEY --endpoint tcp://HOST:5555\n"
                   f"  3. Offer data:            meshfl dataset add{at} --name NAME "
                   f"--tags TAGS --format csv --path FILE\n"
                   f"  4. Start the node:        meshfl node start{at}")
    elif role == "directory":
        click.echo(f"  1. Give the public key above and your address ({listen}, with this "
                   f"machine's host name) to each node operator and researcher.\n"
                   f"  2. Trust each of them:    meshfl peer trust{at} --name NAME --key THEIR_KEY\n"
                   f"  3. Start the directory:   meshfl directory start{at}")
    else:
        click.echo(f"  1. Give the public key above and your address ({listen}, with this "
                   f"machine's host name) to each node operator.\n"
                   f"  2. Trust each node:       meshfl peer trust{at} --name NAME --key NODE_KEY\n"
                   f"  3. Run experiments with meshfl.researcher in Python, using this home.")
    if dev:
        click.echo("\nDevelopment mode is on: this node runs training plans without approval.")


@main.group()
def peer() -> None:
    """This peer's key, and the peers it trusts.

    Like SSH known hosts: peers talk only to keys they were told to trust.
    """


@peer.command("id")
@home_option
@json_option
def peer_id(home: Path, as_json: bool) -> None:
    """Show this peer's id, name and public key (to give to other peers)."""
    with open_home(home) as h:
        info = {"peer_id": h.identity.peer_id, "name": h.config.name, "role": h.config.role,
                "card": h.identity.card.to_text(), "listen": h.config.listen}
    if as_json:
        emit_json(info)
    else:
        click.echo(f"peer id: {info['peer_id']}\nname:    {info['name']}\nrole:    {info['role']}")
        click.echo(f"key:     {info['card']}")


@peer.command("trust")
@home_option
@click.option("--key", "key", metavar="CARDTEXT",
              help="The other peer's public key, as `meshfl peer id` prints it (meshfl1:...).")
@click.option("--discovered", metavar="NAME",
              help="Instead of --key: the peer of this name announcing itself on the LAN "
                   "(`meshfl peer discover`); needs --fingerprint.")
@click.option("--fingerprint", metavar="PEER_ID",
              help="With --discovered: the peer id its operator reads out to you (`meshfl peer id` on "
                   "its host). The announced key is trusted only if it has this fingerprint.")
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="With --discovered: how long to listen for the announcement, in seconds.")
@click.option("--interface", "interfaces", multiple=True, metavar="ADDRESS",
              help="With --discovered: listen on this local address only (repeatable; default all).")
@click.option("--name", help="What to call the peer here (default: the name in its key).")
@click.option("--endpoint", metavar="ENDPOINT",
              help="Where to reach the peer, e.g. tcp://host:5555. A node needs this for each "
                   "researcher or directory it dials (with --discovered: the announced one unless "
                   "given); a researcher needs none for its nodes.")
@click.option("--directory", is_flag=True,
              help="The peer is a dataset directory (`meshfl directory start`): a node publishes "
                   "datasets to it and serves it nothing; a researcher searches it.")
@json_option
def peer_trust(home: Path, key: str | None, discovered: str | None, fingerprint: str | None, timeout: float,
               interfaces: tuple[str, ...], name: str | None, endpoint: str | None, directory: bool,
               as_json: bool) -> None:
    """Trust another peer's key (again, to change its name or endpoint)."""
    if (key is None) == (discovered is None):
        raise UserError("give the peer's key (--key) or a discovered peer's name (--discovered NAME)")
    with open_home(home) as h:
        if key is not None:
            card = PeerCard.from_text(key)
        else:
            if fingerprint is None:
                raise UserError("--discovered needs --fingerprint: the peer id its operator reads out to you")
            from ._lan import trusted_discovery

            card, announced = trusted_discovery(h, discovered, fingerprint, timeout, list(interfaces))
            endpoint = endpoint or announced
        if directory and not endpoint:
            raise UserError("a directory is dialed: give its --endpoint")
        entry = h.trust(card, endpoint=endpoint, name=name, directory=directory)
    info = _public(entry)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"trusted {info['name']} ({info['peer_id']})"
                   + (f" at {info['endpoint']}" if info["endpoint"] else ""))


@peer.command("list")
@home_option
@json_option
def peer_list(home: Path, as_json: bool) -> None:
    """List the peers this home trusts."""
    with open_home(home) as h:
        entries = [_public(e) for e in h.trusted()]
    if as_json:
        emit_json(entries)
    elif not entries:
        click.echo("no trusted peers (add one with `meshfl peer trust`)")
    else:
        table([[e["peer_id"], e["name"] + (" (directory)" if e["directory"] else ""), e["endpoint"]]
               for e in entries], ["PEER ID", "NAME", "ENDPOINT"])


@peer.command("revoke")
@home_option
@click.argument("peer", metavar="ID_OR_NAME")
@json_option
def peer_revoke(home: Path, peer: str, as_json: bool) -> None:
    """Stop trusting a peer, given by its peer id or name."""
    with open_home(home) as h:
        revoked = h.revoke(peer)
    if as_json:
        emit_json({"peer": peer, "revoked": revoked})
    elif revoked:
        click.echo(f"revoked {peer}")
    if not revoked:
        raise UserError(f"no trusted peer {peer!r} (see `meshfl peer list`)")


def _public(entry: dict) -> dict:
    return {**entry, "card": entry["card"].to_text()}
