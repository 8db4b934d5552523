"""A researcher's side of directories: search them, ask a found node for access, see what
became of the requests. Used by :class:`meshfl.researcher.Researcher` (its own peer) and by the
CLI (a short-lived peer with the researcher's identity that only dials the directories).

Every entry is verified here - the node's signature over it and the node card's own - before
it is returned; one that does not verify, or that does not have the tags asked for, is dropped
with a warning. So a directory can withhold entries, never forge or alter one.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from ..crypto import PeerCard
from ..errors import ConfigError, CryptoError, MeshflError
from ..home import Home
from ..transport import Peer
from ..wire import Message
from . import _wire  # noqa: F401  (declares the messages)
from ._signed import ENTRY, ENTRY_FIELDS, request_for, verify

log = logging.getLogger("meshfl.directory")


def directory_ids(home: Home, names: list[str] | None) -> list[str]:
    """Peer ids of the trusted directories named (names or ids); all of them for None."""
    trusted = home.directories()
    if names is None:
        return [e["peer_id"] for e in trusted]
    out = []
    for name in names:
        match = [e for e in trusted if name in (e["peer_id"], e["name"])]
        if not match:
            raise ConfigError(f"no trusted directory {name!r}; trust it with "
                              f"`meshfl peer trust --directory --key KEY --endpoint ENDPOINT`",
                              code="unknown_directory")
        out.append(match[0]["peer_id"])
    return out


def search(peer: Peer, directories: list[str], tags: list[str] | None = None,
           timeout: float = 10.0) -> dict[str, list[dict]]:
    """Verified entries with all ``tags`` in ``directories`` (peer ids): {node id: [records]},
    each record ``{name, tags, description, format, samples, shape, columns, node, node_name,
    card, directory, published}``; a dataset listed by several directories appears once (its
    latest publication)."""
    tags = [str(t) for t in tags or []]
    futures = {d: peer.request(d, Message("directory.search", {"tags": tags}), timeout) for d in directories}
    best: dict[tuple, dict] = {}
    for directory, fut in futures.items():
        try:
            answer = fut.result().fields
        except MeshflError as exc:
            log.warning("[%s] search in directory %s failed: %s", peer.name, directory, exc)
            continue
        docs = answer["entries"]
        if answer.get("truncated"):
            log.warning("[%s] directory %s lists more than one answer holds: search with more tags",
                        peer.name, directory)
        for doc in docs:
            try:
                body = verify(doc, ENTRY)
            except CryptoError as exc:
                log.warning("[%s] dropped an entry from directory %s that does not verify: %s",
                            peer.name, directory, exc.message)
                continue
            if not set(tags) <= set(body.get("tags") or []):
                log.warning("[%s] dropped an entry from directory %s without the tags asked for", peer.name, directory)
                continue
            card: PeerCard = body["card"]
            record = {"name": body.get("dataset"), **{k: body.get(k) for k in ENTRY_FIELDS},
                      "node": card.peer_id, "node_name": card.name, "card": card.to_text(),
                      "directory": directory, "published": body.get("published")}
            key = (card.peer_id, record["name"])
            if key not in best or (record["published"] or 0) > (best[key]["published"] or 0):
                best[key] = record
    found: dict[str, list[dict]] = {}
    for (node, _), record in sorted(best.items()):
        found.setdefault(node, []).append(record)
    return found


def request_access(home: Home, peer: Peer, entry: dict, endpoint: str, message: str = "",
                   timeout: float = 10.0) -> dict:
    """File a signed request, through the directory ``entry`` (a verified one) came from, for
    access to its dataset; the node's operator decides. The node's key is pinned in ``home``
    and ``peer`` first, so its connection is let in once approved. Returns ``{id, status}``."""
    pinned = _pin_node(home, entry)
    peer.trust(pinned["card"], pinned["endpoint"])
    doc = request_for(peer.identity, entry["node"], entry["name"], endpoint, message)
    reply = peer.call(entry["directory"], Message("access.request", {"request": doc}), timeout)
    home.audit.append("access.requested", id=reply.fields["id"], node=entry["node"], dataset=entry["name"],
                      directory=entry["directory"], endpoint=endpoint)
    return dict(reply.fields)


def requests(peer: Peer, directories: list[str], timeout: float = 10.0) -> list[dict]:
    """This researcher's requests in ``directories`` and their state (pending, delivered to the
    node, approved, denied), each with the ``directory`` it is kept in."""
    out = []
    for directory in directories:
        reply = peer.call(directory, Message("access.status"), timeout)
        out += [{**r, "directory": directory} for r in reply.fields["requests"]]
    return sorted(out, key=lambda r: r.get("received") or 0)


def _pin_node(home: Home, entry: dict) -> dict:
    """Trust the node of a verified ``entry`` (its card, pinned), so that once its operator
    approves, its connection is let in; a name taken here gets the peer id's start appended."""
    card = PeerCard.from_text(entry["card"])
    known = home.find_trusted(card.peer_id)
    if known is not None:
        return known
    name = card.name
    if home.find_trusted(name) is not None:
        name = f"{card.name}-{card.peer_id[:6]}"
    return home.trust(card, name=name)


@contextmanager
def dialing(home: Home, directories: list[str], timeout: float = 10.0) -> Iterator[Peer]:
    """A peer with ``home``'s identity that dials only ``directories`` (no port of its own), for
    the CLI; waits until they are connected (``unreachable`` after ``timeout``)."""
    cfg = home.config
    peer = Peer(home.identity, heartbeat=cfg.heartbeat, dead_after=cfg.dead_after).start()
    try:
        for entry in home.directories():
            if entry["peer_id"] in directories:
                peer.trust(entry["card"], entry["endpoint"])
        if not peer.wait_online(directories, timeout):
            down = [d for d in directories if not peer.is_online(d)]
            raise MeshflError(f"cannot reach directory {', '.join(down)} in {timeout:g}s (is it running, "
                              f"and does it trust this key?)", code="unreachable")
        yield peer
    finally:
        peer.close()
