"""The directory peer: keeps the signed entries nodes publish and the access requests researchers
file, and hands each node the requests addressed to it. It sees no data and no paths.

It listens (nodes and researchers dial it) and admits only the peers its operator trusts
(``meshfl peer trust`` on its home, picked up while it runs). Everything it stores is signed by
its author and checked on arrival; researchers check it again, so a directory that alters an
entry is caught by them. Tables: ``entries`` (``node id/dataset`` -> the signed entry),
``requests`` (request id -> the signed request and its state: pending, delivered, approved,
denied); every step lands in the home's audit chain.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from pathlib import Path

import orjson

from .. import __version__
from ..errors import ConfigError, CryptoError, MeshflError
from ..home import Home
from ..transport import Peer
from ..wire import Message
from . import _wire  # noqa: F401  (declares the messages)
from ._signed import ENTRY, REQUEST, verify

log = logging.getLogger("meshfl.directory")

ENTRIES = "entries"
REQUESTS = "requests"
TRUST_CHECK_S = 2.0  # how often the home's trust table is read for peers trusted meanwhile
MAX_ENTRIES = 1000  # per node
MAX_PENDING = 100  # undecided requests per researcher
ANSWER_BYTES = 768 << 10  # entries in one search answer (the envelope's limit is 1 MiB)
DECISIONS = ("approved", "denied")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a dataset's name, as a node's registry allows
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Directory:
    """``Directory(home).run()`` serves until SIGINT/SIGTERM (``meshfl directory start``)."""

    def __init__(self, home: str | Path | Home, *, peer_options: dict | None = None) -> None:
        self.home = home if isinstance(home, Home) else Home.open(home)
        cfg = self.home.config
        if cfg.role != "directory":
            raise ConfigError(f"{self.home.path} is a {cfg.role} home, not a directory's", code="wrong_role")
        if not cfg.listen:
            raise ConfigError("a directory needs a listen endpoint (meshfl init --listen)", code="bad_config")
        self.name = cfg.name
        self.audit = self.home.audit
        self.entries = self.home.store.table(ENTRIES)
        self.requests = self.home.store.table(REQUESTS)
        options = {"heartbeat": cfg.heartbeat, "dead_after": cfg.dead_after, **(peer_options or {})}
        self.peer = Peer(self.home.identity, listen=cfg.listen, handler=self._handle, **options)
        self._stopping = threading.Event()
        self._trust_thread = threading.Thread(target=self._watch_trust, name=f"meshfl-trust-{self.name}",
                                              daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Directory":
        self.peer.start()
        self.home.trust_into(self.peer)
        self._trust_thread.start()
        self.audit.append("directory.started", version=__version__, endpoint=self.peer.endpoint)
        log.info("[%s] directory listening on %s, %d entries", self.name, self.peer.endpoint, len(self.entries))
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._trust_thread.is_alive():
            self._trust_thread.join()
        self.peer.close()
        self.audit.append("directory.stopped")
        self.home.close()

    def run(self) -> None:
        """Serve in the foreground until SIGINT or SIGTERM."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        try:
            done.wait()
        finally:
            self.stop()

    def __enter__(self) -> "Directory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return self.peer.endpoint

    def _watch_trust(self) -> None:
        while not self._stopping.wait(TRUST_CHECK_S):
            try:
                self.home.trust_into(self.peer)
            except MeshflError as exc:
                log.warning("[%s] cannot read the trust table: %s", self.name, exc)

    # ------------------------------------------------------------------ requests
    def _handle(self, msg: Message) -> Message | None:
        handler = getattr(self, "_on_" + msg.type.replace(".", "_"), None)
        if handler is None:
            raise MeshflError(f"a directory does not handle {msg.type!r}", code="unknown_type")
        return handler(msg)

    def _on_ping(self, msg: Message) -> Message:
        return Message("pong", {"name": self.name, "peer_id": self.peer.peer_id, "role": "directory",
                                "version": __version__})

    def _on_directory_publish(self, msg: Message) -> Message:
        """A node's whole publication here: each entry its own, signed; what it published before
        and left out now is withdrawn."""
        docs = msg.fields["entries"]
        if len(docs) > MAX_ENTRIES:
            raise MeshflError(f"at most {MAX_ENTRIES} entries per node", code="too_many_entries")
        rows = {}
        for doc in docs:
            body = _checked(doc, ENTRY, "bad_entry")
            if body["node"] != msg.sender:
                raise MeshflError("a node publishes only its own entries", code="bad_entry")
            if not isinstance(body.get("dataset"), str) or not _NAME.fullmatch(body["dataset"]):
                raise MeshflError("an entry names its dataset (1-64 letters, digits, '_', '.', '-')",
                                  code="bad_entry")
            rows[f"{msg.sender}/{body['dataset']}"] = {"doc": doc, "received": time.time()}

        def replace(tx) -> None:
            for key in tx.keys(ENTRIES, f"{msg.sender}/"):
                if key not in rows:
                    tx.delete(ENTRIES, key)
            for key, row in rows.items():
                tx.put(ENTRIES, key, row)
            self.audit.append("entries.published", node=msg.sender,
                              datasets=sorted(key.split("/", 1)[1] for key in rows))

        self.home.store.atomic(replace)
        return Message("directory.published", {"count": len(rows)})

    def _on_directory_search(self, msg: Message) -> Message:
        tags = {str(t) for t in msg.fields.get("tags") or []}
        found, size, truncated = [], 0, False
        for _, row in self.entries.items():
            if tags <= set(_body(row["doc"]).get("tags") or []):
                size += len(row["doc"]["body"]) + len(row["doc"]["sig"]) + 32
                if size > ANSWER_BYTES:
                    truncated = True
                    break
                found.append(row["doc"])
        self.audit.append("entries.searched", researcher=msg.sender, tags=sorted(tags), found=len(found))
        return Message("directory.entries", {"entries": found, "truncated": truncated})

    def _on_access_request(self, msg: Message) -> Message:
        doc = msg.fields["request"]
        body = _checked(doc, REQUEST, "bad_request")
        if body["researcher"] != msg.sender:
            raise MeshflError("a researcher files only its own requests", code="bad_request")
        node, dataset = body.get("node"), body.get("dataset")
        if not (isinstance(body.get("id"), str) and _ID.fullmatch(body["id"])) or not isinstance(node, str) \
                or not isinstance(dataset, str):
            raise MeshflError("a request names its id, node and dataset", code="bad_request")
        if f"{node}/{dataset}" not in self.entries:
            raise MeshflError(f"no dataset {dataset!r} of node {node} is listed here", code="unknown_dataset")
        existing = self.requests.get(body["id"])
        if existing is not None:  # a re-sent request
            if existing["doc"] != doc:
                raise MeshflError("another request has this id", code="bad_request")
            return Message("access.queued", {"id": body["id"], "status": existing["status"]})
        undecided = sum(row["researcher"] == msg.sender and row["status"] in ("pending", "delivered")
                        for _, row in self.requests.items())
        if undecided >= MAX_PENDING:
            raise MeshflError(f"{undecided} of this researcher's requests await a decision already",
                              code="too_many_requests")

        def store(tx) -> None:
            tx.put(REQUESTS, body["id"], {"doc": doc, "researcher": msg.sender, "node": node, "dataset": dataset,
                                          "status": "pending", "received": time.time()})
            self.audit.append("access.requested", id=body["id"], researcher=msg.sender, node=node, dataset=dataset)

        self.home.store.atomic(store)
        if self.peer.is_online(node):  # else it fetches the request when it connects
            self.peer.send(node, Message("access.pending", {"requests": [doc]}))
        return Message("access.queued", {"id": body["id"], "status": "pending"})

    def _on_access_fetch(self, msg: Message) -> Message:
        pending = [row["doc"] for _, row in self.requests.items()
                   if row["node"] == msg.sender and row["status"] == "pending"]
        return Message("access.pending", {"requests": pending})

    def _on_access_received(self, msg: Message) -> None:
        def mark(tx) -> None:
            for rid in msg.fields["ids"]:
                row = tx.get(REQUESTS, str(rid))
                if row is not None and row["node"] == msg.sender and row["status"] == "pending":
                    tx.put(REQUESTS, str(rid), {**row, "status": "delivered", "delivered": time.time()})
                    self.audit.append("access.delivered", id=rid, node=msg.sender)

        self.home.store.atomic(mark)
        return None

    def _on_access_decided(self, msg: Message) -> Message:
        rid, status = msg.fields["id"], msg.fields["status"]
        if status not in DECISIONS:
            raise MeshflError(f"a decision is one of {', '.join(DECISIONS)}", code="bad_field")

        def note(tx) -> None:
            row = tx.get(REQUESTS, rid)
            if row is None or row["node"] != msg.sender:
                raise MeshflError(f"no request {rid} for this node", code="unknown_request")
            tx.put(REQUESTS, rid, {**row, "status": status, "decided": time.time()})
            self.audit.append("access.decided", id=rid, node=msg.sender, researcher=row["researcher"],
                              status=status)

        self.home.store.atomic(note)
        return Message("access.noted", {"id": rid})

    def _on_access_status(self, msg: Message) -> Message:
        """The asking researcher's own requests and what became of them."""
        mine = [{key: row.get(key) for key in ("node", "dataset", "status", "received", "decided")} | {"id": rid}
                for rid, row in self.requests.items() if row["researcher"] == msg.sender]
        return Message("access.requests", {"requests": mine})


def _checked(doc: object, kind: str, code: str) -> dict:
    try:
        return verify(doc, kind)
    except CryptoError as exc:
        raise MeshflError(f"refused: {exc.message}", code=code) from None


def _body(doc: dict) -> dict:
    """A stored document's body, unverified (for indexing only: readers verify)."""
    try:
        body = orjson.loads(doc["body"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}
