"""`meshfl peer announce` and `meshfl peer discover`: LAN discovery with pinned keys (``[lan]``)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from ..crypto import PeerCard
from ..launch import lan
from ._app import emit_json, home_option, json_option, open_home, table
from ._home import peer

_interfaces = click.option("--interface", "interfaces", multiple=True, metavar="ADDRESS",
                           help="Use this local address only (repeatable; default: all interfaces).")


@peer.command("announce")
@home_option
@click.option("--endpoint", metavar="ENDPOINT",
              help="The endpoint to announce (default: this home's listen address; a wildcard host "
                   "announces this host's addresses).")
@click.option("--seconds", type=float, help="Stop after this many seconds (default: until Ctrl-C).")
@_interfaces
def peer_announce(home: Path, endpoint: str | None, seconds: float | None, interfaces: tuple[str, ...]) -> None:
    """Announce this peer (its endpoint and key) on the LAN, until Ctrl-C.

    Run it beside a researcher's listener; node operators then see it with `meshfl peer discover`
    and trust it with `meshfl peer trust --discovered NAME --fingerprint PEER_ID`, the peer id
    you read out to them.
    """
    with open_home(home) as h:
        card, role, listen = h.identity.card, h.config.role, h.config.listen
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with lan.Announcer(card, role, listen, endpoint=endpoint, interfaces=list(interfaces) or None) as announcer:
        click.echo(f"announcing {card.name} ({card.peer_id}) at {announcer.endpoint}; fingerprint to "
                   f"read out: {card.peer_id}")
        done.wait(seconds)


@peer.command("discover")
@home_option
@click.option("--timeout", type=float, default=3.0, show_default=True, help="How long to listen, in seconds.")
@_interfaces
@json_option
def peer_discover(home: Path, timeout: float, interfaces: tuple[str, ...], as_json: bool) -> None:
    """List the peers announcing themselves on the LAN, and how each stands with this home's keys.

    Nothing is trusted here: trust one with `meshfl peer trust --discovered NAME --fingerprint ...`.
    A peer announcing a key other than the one pinned for its name is shown with a WARNING.
    """
    with open_home(home) as h:
        trusted, own = h.trusted(), h.identity.peer_id
    seen = [a for a in lan.discover(timeout, interfaces=list(interfaces) or None) if a.peer_id != own]
    rows = []
    for ann in seen:
        status, warning = lan.pin_status(ann, trusted)
        rows.append({**ann.to_dict(), "status": status, "warning": warning})
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no meshfl peer announced itself within {timeout:g} s")
        return
    table([[r["name"], r["role"], r["endpoint"], r["peer_id"], r["status"]] for r in rows],
          ["NAME", "ROLE", "ENDPOINT", "FINGERPRINT", "STATUS"])
    for r in rows:
        if r["warning"]:
            click.echo(r["warning"], err=True)


def trusted_discovery(home, name: str, confirmed: str, timeout: float,
                      interfaces: list[str]) -> tuple[PeerCard, str | None]:
    """The card and endpoint announced for ``name``, if its key has the ``confirmed``
    fingerprint (else a coded LanError); a key other than the one pinned for the name is refused."""
    fp = lan.fingerprint(confirmed)
    seen = lan.discover(timeout, interfaces=interfaces or None,
                        until=lambda anns: any(a.name == name and a.peer_id == fp and a.card for a in anns))
    ann = lan.choose(seen, name, fp)
    status, warning = lan.pin_status(ann, home.trusted())
    if status == "key_changed":
        raise lan.LanError(warning.removeprefix("WARNING: "), code="key_changed")
    return ann.card, ann.endpoint
