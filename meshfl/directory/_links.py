"""A node's links to its directories: it sends each its publication, takes the access requests
it holds for the node, and tells it the operator's decisions.

One thread keeps them in step (requests to a directory never wait in the node's dispatcher): the
node sends a directory its whole publication whenever the link comes up or the publication
changed, fetches the requests kept for it, and reports decisions taken since. It serves a
directory nothing else: a directory is no researcher.
"""

from __future__ import annotations

import hashlib
import threading

import orjson

from ..errors import CryptoError, MeshflError, RemoteError
from ..home import Home
from ..wire import Message
from . import _wire  # noqa: F401  (declares the messages)
from ._access import AccessRequests
from ._publications import Publications

SYNC_CHECK_S = 5.0  # how often the node looks for changes nobody announced
TIMEOUT_S = 10.0


class NodeDirectories:
    """The node's directory links, kept in step by one thread (requests to a directory never
    wait in the node's dispatcher)."""

    def __init__(self, home: Home, peer, log) -> None:
        self.home, self.peer, self.log = home, peer, log
        self.publications = Publications(home)
        self.access = AccessRequests(home.store, home.audit)
        self._ids = {e["peer_id"] for e in home.directories()}
        self._sent: dict[str, str] = {}  # directory -> digest of the publication it holds
        self._fetched: set[str] = set()  # directories asked for requests since their link came up
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"meshfl-directories-{peer.name}", daemon=True)

    def is_directory(self, peer_id: str) -> bool:
        return peer_id in self._ids

    def refresh(self) -> None:
        """Directories were trusted meanwhile: know them, and sync with them."""
        self._ids |= {e["peer_id"] for e in self.home.directories()}
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def wake(self) -> None:
        """Something changed (a publication, a decision, a directory trusted): sync now."""
        self._wake.set()

    def on_link(self, peer_id: str, up: bool) -> None:
        if peer_id in self._ids:
            self._sent.pop(peer_id, None)
            self._fetched.discard(peer_id)
            if up:
                self._wake.set()

    def handle(self, msg: Message) -> None:
        """What a directory may send a node: the access requests it holds for it."""
        if msg.type != "access.pending":
            raise MeshflError(f"a directory may not send {msg.type!r} to a node", code="not_a_researcher")
        self._take(msg.sender, msg.fields["requests"])
        return None

    def _take(self, directory: str, docs: list) -> None:
        ids = []
        for doc in docs:
            try:
                record = self.access.receive(doc, directory, self.peer.peer_id)
            except (CryptoError, MeshflError) as exc:
                self.log.warning("dropped an access request from directory %s: %s", directory, exc.message)
                continue
            ids.append(record["id"] if record else doc_id(doc))
            if record is not None:
                self.log.warning("researcher %s (%s) asks for access to %s: meshfl access approve %s --home %s "
                                 "(or deny)", record["name"], record["researcher"], record["dataset"],
                                 record["id"], self.home.path)
        if ids:
            self.peer.send(directory, Message("access.received", {"ids": ids}))

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(SYNC_CHECK_S)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                directories = self.home.directories()
            except MeshflError as exc:
                self.log.warning("cannot read the trust table: %s", exc)
                continue
            self._ids |= {e["peer_id"] for e in directories}  # (a revoked one stays until restart)
            for entry in directories:
                if self.peer.is_online(entry["peer_id"]):
                    try:
                        self._sync(entry["peer_id"])
                    except MeshflError as exc:
                        self.log.warning("directory %s: %s", entry["name"], exc)

    def _sync(self, directory: str) -> None:
        docs = self.publications.entries(directory)
        digest = hashlib.sha256("".join(d["sig"] for d in docs).encode()).hexdigest()
        if self._sent.get(directory) != digest:
            self.peer.call(directory, Message("directory.publish", {"entries": docs}), TIMEOUT_S)
            self._sent[directory] = digest
            self.home.audit.append("directory.published", directory=directory,
                                   datasets=sorted(_dataset(d) for d in docs))
        if directory not in self._fetched:
            reply = self.peer.call(directory, Message("access.fetch"), TIMEOUT_S)
            self._fetched.add(directory)
            self._take(directory, reply.fields["requests"])
        for row in self.access.unreported(directory):
            try:
                self.peer.call(directory, Message("access.decided", {"id": row["id"], "status": row["status"]}),
                               TIMEOUT_S)
            except RemoteError as exc:
                if exc.code != "unknown_request":  # the directory forgot it: nothing to tell
                    raise
            self.access.reported(row["id"])


def doc_id(doc: dict) -> str:
    return str(orjson.loads(doc["body"]).get("id"))


def _dataset(doc: dict) -> str:
    return str(orjson.loads(doc["body"]).get("dataset"))
