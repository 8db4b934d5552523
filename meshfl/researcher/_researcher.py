"""Researcher: the thin client. Binds, tracks which nodes are online, sends requests.

Requests are matched to replies by id with timeouts (the Peer does that). The researcher also
relays node-to-node overlay messages (sealed: it sees ciphertext only). Messages that belong
to a running experiment or analysis — ``train.done``, ``result.chunk``, ``analytics.done`` — are
routed by task id to its inbox; a result for a task nobody waits for (a round that already ended, or one from
before a crash) is acknowledged and dropped, so nodes do not keep it forever.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from pathlib import Path

from ..errors import ConfigError, MeshflError
from ..home import Home
from ..overlay import Overlay, OverlayRejected
from ..plans import plan_source
from ..protocol import INLINE_RESULT_BYTES  # noqa: F401  (declares the protocol's types)
from ..transport import Peer
from ..wire import Message

log = logging.getLogger("meshfl.researcher")


class Researcher:
    """A researcher's endpoint. ``Researcher(home)`` opens the home made by ``meshfl init``."""

    def __init__(self, home: str | Path | Home, *, listen: str | None = None, peer_options: dict | None = None) -> None:
        self.home = home if isinstance(home, Home) else Home.open(home)
        if self.home.config.role != "researcher":
            raise ConfigError(f"{self.home.path} is a {self.home.config.role} home, not a researcher's")
        cfg = self.home.config
        endpoint = listen or cfg.listen
        if not endpoint:
            raise ConfigError("a researcher needs a listen endpoint (meshfl init --listen, or listen=...)")
        options = {"heartbeat": cfg.heartbeat, "dead_after": cfg.dead_after, **(peer_options or {})}
        # Its handler only routes results to the round waiting for them (and the overlay only
        # relays), so it runs on the I/O thread: a thread hand-off less per result.
        self.peer = Peer(self.home.identity, listen=endpoint, handler=self._handle, on_link=self._on_link,
                         inline=True, **options)
        self.overlay = Overlay(self.peer, self._on_overlay_message)  # relays node-to-node ciphertext
        self.name = cfg.name
        self._routes: dict[str, queue.SimpleQueue] = {}
        self._routes_lock = threading.Lock()
        self._directories: set[str] = set()
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Researcher":
        self.peer.start()
        self._directories = {e["peer_id"] for e in self.home.directories()}  # before their links come up
        for entry in self.home.trusted():
            self.peer.trust(entry["card"], entry.get("endpoint"))
        self._started = True
        log.info("[%s] researcher listening on %s", self.name, self.peer.endpoint)
        return self

    def close(self) -> None:
        self.peer.close()
        self.home.close()

    def __enter__(self) -> "Researcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        return self.peer.endpoint

    # ------------------------------------------------------------------ nodes
    def nodes(self) -> list[str]:
        """Peer ids of the nodes online now (directories are no nodes)."""
        return [p for p in self.peer.online() if p not in self._directories]

    def node_name(self, peer_id: str) -> str:
        entry = self.peer.trust_table.get(peer_id)
        return entry.card.name if entry else peer_id

    def wait_for_nodes(self, count: int, timeout: float = 30.0) -> list[str]:
        """Block until at least ``count`` nodes are online; returns their ids."""
        if not self.peer.wait_links(lambda online: len(online - self._directories) >= count, timeout):
            raise MeshflError(f"only {len(self.nodes())} of {count} nodes came online in {timeout:g}s", code="timeout")
        return self.nodes()

    def ping(self, node: str, timeout: float = 10.0) -> dict:
        return self.peer.call(node, Message("ping"), timeout).fields

    def search(self, tags: list[str] | None = None, timeout: float = 10.0, nodes: list[str] | None = None,
               directories: list[str] | None = None) -> dict[str, list[dict]]:
        """Datasets matching all ``tags`` on every online node (or on ``nodes``): {node id: [public records]}.

        With ``directories`` (trusted directories' names or ids; ``[]``: all of them), the
        entries those directories list instead, also of nodes not trusted yet, each verified
        against its node's key (meshfl.directory._client.search); pass one to
        :meth:`request_access`."""
        if directories is not None:
            from ..directory import _client

            ids = _client.directory_ids(self.home, directories or None)
            self._directories |= set(ids)
            self.peer.wait_online(ids, timeout)  # just started: its links may still be coming up
            return _client.search(self.peer, ids, tags, timeout)
        ask = self.nodes() if nodes is None else nodes
        futures = {n: self.peer.request(n, Message("datasets.search", {"tags": list(tags or [])}), timeout) for n in ask}
        found = {}
        for node, fut in futures.items():
            try:
                found[node] = fut.result().fields["datasets"]
            except MeshflError as exc:
                log.warning("[%s] search on %s failed: %s", self.name, self.node_name(node), exc)
        return found

    def request_access(self, entry: dict, endpoint: str | None = None, message: str = "",
                       timeout: float = 10.0) -> dict:
        """Ask the node of a directory ``entry`` (from :meth:`search`) for access to its dataset,
        through that directory. The node's key is pinned here now, so once its operator approves
        it dials ``endpoint`` (default: where this researcher listens) and is let in. Returns
        ``{id, status}``."""
        from ..directory import _client

        endpoint = endpoint or self.peer.endpoint
        if "0.0.0.0" in endpoint or "[::]" in endpoint or "*" in endpoint:
            raise ConfigError(f"{endpoint} is where this researcher listens, not where a node can dial it: "
                              f"give endpoint=tcp://HOST:PORT", code="bad_endpoint")
        return _client.request_access(self.home, self.peer, entry, endpoint, message, timeout)

    def access_requests(self, directories: list[str] | None = None, timeout: float = 10.0) -> list[dict]:
        """This researcher's access requests in ``directories`` (default: all trusted ones) and
        what became of them."""
        from ..directory import _client

        return _client.requests(self.peer, _client.directory_ids(self.home, directories), timeout)

    def plan_status(self, node: str, plan, timeout: float = 10.0) -> dict:
        """Ask a node whether it approved ``plan`` (a training plan class or its source)."""
        from ..node._plans import plan_hash

        source = plan if isinstance(plan, str) else plan_source(plan)
        return self.peer.call(node, Message("plan.status", {"hash": plan_hash(source)}), timeout).fields

    def submit_plan(self, node: str, plan, name: str = "", timeout: float = 10.0) -> dict:
        """Send ``plan``'s source to a node's operator for review (it lands as pending)."""
        source = plan if isinstance(plan, str) else plan_source(plan)
        fields = {"source": source, "name": name or getattr(plan, "__name__", "")}
        return self.peer.call(node, Message("plan.submit", fields), timeout).fields

    def host(self, name: str, plan, *, listen: str, enroll_listen: str | None = None, **model: object):
        """Host ``plan`` as model ``name`` for light clients (meshfl/hosted), on this home, at
        ``listen`` (the host is a peer of its own beside this one). ``model``: what
        :meth:`meshfl.hosted.Host.add_model` takes; an existing model of that name is served as it is.
        Returns the started :class:`~meshfl.hosted.Host`; close it before this researcher."""
        from ..hosted import Host

        host = Host(self.home, listen=listen, enroll_listen=enroll_listen).start()
        try:
            if not any(m["name"] == name for m in host.status()):
                host.add_model(name, plan, **model)
        except BaseException:
            host.close()
            raise
        return host

    # ------------------------------------------------------------------ experiment plumbing
    def _route(self, task_ids, inbox: queue.SimpleQueue | None) -> None:
        with self._routes_lock:
            for tid in task_ids:
                if inbox is None:
                    self._routes.pop(tid, None)
                else:
                    self._routes[tid] = inbox

    def _on_link(self, peer_id: str, up: bool) -> None:
        """A node's link came up, or back up after a reconnect that may have lost what was in
        flight on it: every running round hears of it (as ``("link", peer_id)``) and sends the
        node its task again if the node has not accepted it yet."""
        if not up:
            return
        with self._routes_lock:
            inboxes = {id(inbox): inbox for inbox in self._routes.values()}
        for inbox in inboxes.values():
            inbox.put(("link", peer_id))

    def _handle(self, msg: Message) -> Message | None:
        if msg.type in ("train.done", "result.chunk", "analytics.done"):
            with self._routes_lock:
                inbox = self._routes.get(msg.fields["task_id"])
            if inbox is not None:
                inbox.put(msg)
            elif msg.type != "result.chunk":
                log.info("[%s] result %s is for no running round: acknowledged, dropped", self.name, msg.fields["task_id"])
                self.send(msg.sender, Message("result.ack", {"task_id": msg.fields["task_id"]}))
            return None
        if msg.type == "ping":
            return Message("pong", {"name": self.name, "peer_id": self.peer.peer_id, "role": "researcher", "version": "1"})
        raise MeshflError(f"a researcher does not handle {msg.type!r}", code="unknown_type")

    @staticmethod
    def _on_overlay_message(src: str, payload: dict) -> None:
        raise OverlayRejected("a researcher takes no overlay messages for itself", code="bad_overlay")

    def send(self, node: str, msg: Message) -> Future:
        return self.peer.send(node, msg)

    def request(self, node: str, msg: Message, timeout: float) -> Future:
        return self.peer.request(node, msg, timeout)
