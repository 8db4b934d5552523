"""Whole meshes inside one process, for meshfl's own tests and for users' tests.

``FederatedMesh`` starts a whole researcher + N nodes (real homes, LMDB, CURVE over ipc or
loopback tcp, a warm worker process per node) for integration tests and the demo.

``PeerMesh`` starts N transport peers with temporary homes (real identity files) and mutual trust;
peer 0 is the hub that listens, the others dial it (the researcher/node shape), or with
``topology="full"`` every peer listens and dials every other one.

Security note: libzmq applies no CURVE over ``inproc://`` (an untrusted key's message was delivered
over inproc here, refused over ipc and tcp), so a mesh that claims CURVE uses ``ipc`` (default) or
loopback ``tcp``; ``transport="inproc"`` requires ``curve=False`` and says so in the log.

Use it as a context manager, or as the ``peer_mesh`` pytest fixture after
``pytest_plugins = ["meshfl.testing"]`` in a conftest.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import zmq

from ..crypto import Identity
from ..errors import ConfigError
from ..transport import Peer
from ..wire import Message

log = logging.getLogger("meshfl.testing")


class PeerMesh:
    def __init__(
        self,
        n: int = 3,
        *,
        transport: str = "ipc",
        curve: bool = True,
        topology: str = "star",
        handler: Callable[[Message], Message | None] | None = None,
        names: list[str] | None = None,
        heartbeat: float = 0.5,
        dead_after: float = 3.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if transport not in ("ipc", "tcp", "inproc"):
            raise ConfigError(f"unknown transport {transport!r}: ipc, tcp or inproc")
        if transport == "inproc" and curve:
            raise ConfigError("inproc runs no CURVE: use transport='ipc' or 'tcp', or curve=False")
        if topology not in ("star", "full"):
            raise ConfigError(f"unknown topology {topology!r}: star or full")
        self.n, self.transport, self.curve, self.topology = n, transport, curve, topology
        self._handler, self._heartbeat, self._dead_after = handler, heartbeat, dead_after
        self._connect_timeout = connect_timeout
        self.names = names or [f"peer{i}" for i in range(n)]
        self.root: Path | None = None
        self.identities: list[Identity] = []
        self.peers: list[Peer] = []
        self._ctx: zmq.Context | None = None

    def _endpoint(self, i: int) -> str:
        if self.transport == "ipc":
            return f"ipc://{self.root}/peer{i}.sock"
        if self.transport == "tcp":
            return "tcp://127.0.0.1:0"
        return f"inproc://meshfl-{uuid.uuid4().hex}-{i}"

    def start(self) -> "PeerMesh":
        self.root = Path(tempfile.mkdtemp(prefix="meshfl-mesh-"))
        if self.transport == "inproc":
            self._ctx = zmq.Context()
            log.warning("in-process mesh over inproc: CURVE is off, links are not authenticated")
        try:
            for i, name in enumerate(self.names):
                identity = Identity.create(self.root / name, name)
                listens = i == 0 or self.topology == "full"
                peer = Peer(
                    identity,
                    listen=self._endpoint(i) if listens else None,
                    curve=self.curve,
                    handler=self._handler,
                    heartbeat=self._heartbeat,
                    dead_after=self._dead_after,
                    context=self._ctx,
                )
                self.identities.append(identity)
                self.peers.append(peer.start())
            self._link()
        except BaseException:
            self.close()
            raise
        return self

    def _link(self) -> None:
        for i, peer in enumerate(self.peers):
            for j, other in enumerate(self.peers):
                if i == j:
                    continue
                dial = (self.topology == "full" and i < j) or (self.topology == "star" and j == 0)
                peer.trust(other.identity.card, other.endpoint if dial else None)
        hub = self.peers[0]
        others = [p.peer_id for p in self.peers[1:]]
        if not hub.wait_online(others, self._connect_timeout):
            raise ConfigError(f"mesh did not come up in {self._connect_timeout}s: online {hub.online()}")

    def close(self) -> None:
        for peer in reversed(self.peers):
            peer.close(linger=0)
        self.peers.clear()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "PeerMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, i: int) -> Peer:
        return self.peers[i]

    def __len__(self) -> int:
        return len(self.peers)


class FederatedMesh:
    """A researcher and ``n_nodes`` nodes in this process, with temporary homes and mutual trust
    (researcher and nodes, and nodes among themselves, as secure aggregation needs).
    ``researchers=2`` or more: several researchers, each trusted by every node (``self.researchers``;
    ``self.researcher`` is the first)."""

    def __init__(
        self,
        n_nodes: int = 3,
        *,
        transport: str = "ipc",
        dev: bool = False,
        node_config: dict | None = None,
        names: list[str] | None = None,
        root: str | Path | None = None,
        heartbeat: float = 0.5,
        dead_after: float = 5.0,
        researchers: int = 1,
    ) -> None:
        if transport not in ("ipc", "tcp"):
            raise ConfigError("a federated mesh runs CURVE: transport must be ipc or tcp")
        self.n_nodes, self.transport, self.dev = n_nodes, transport, dev
        self.node_config = dict(node_config or {})
        self.names = names or [f"node{i}" for i in range(n_nodes)]
        self._root_given = root
        self.root: Path | None = None
        self._timing = {"heartbeat": heartbeat, "dead_after": dead_after}
        self.n_researchers = max(1, int(researchers))
        self.researcher = None
        self.researchers: list = []
        self.nodes: list = []

    def start(self) -> "FederatedMesh":
        from ..home import Home
        from ..node import Node
        from ..researcher import Researcher

        self.root = Path(self._root_given or tempfile.mkdtemp(prefix="meshfl-fed-"))
        try:
            names = ["researcher"] + [f"researcher{i}" for i in range(1, self.n_researchers)]
            r_homes = [Home.init(self.root / name, "researcher", name, **self._timing, listen=(
                f"ipc://{self.root}/{name}.sock" if self.transport == "ipc" else "tcp://127.0.0.1:0"))
                for name in names]
            node_homes = [
                Home.init(self.root / name, "node", name, dev=self.dev, **self._timing, **self.node_config)
                for name in self.names
            ]
            for home in node_homes:  # nodes know each other's cards: secure aggregation seals to them
                for other in node_homes:
                    if other is not home:
                        home.trust(other.identity.card)
            for r_home in r_homes:
                self.researchers.append(Researcher(r_home).start())
            self.researcher = self.researchers[0]
            for home in node_homes:
                for researcher in self.researchers:
                    researcher.home.trust(home.identity.card)
                    researcher.peer.trust(home.identity.card)
                    home.trust(researcher.home.identity.card, researcher.endpoint)
                self.nodes.append(Node(home).start())
            for researcher in self.researchers:
                researcher.wait_for_nodes(len(self.nodes), timeout=30)
        except BaseException:
            self.close()
            raise
        return self

    def approve(self, plan) -> str:
        """Approve ``plan`` (class or source) on every node, as each operator would; returns its hash."""
        from ..node._plans import plan_hash
        from ..plans import plan_source

        source = plan if isinstance(plan, str) else plan_source(plan)
        for node in self.nodes:
            node.plans.submit(source, getattr(plan, "__name__", ""))
            node.plans.approve(plan_hash(source))
        return plan_hash(source)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        for researcher in self.researchers:
            researcher.close()
        self.researchers.clear()
        self.researcher = None
        if self.root is not None and self._root_given is None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> "FederatedMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


try:  # the fixture is only defined where pytest is installed
    import pytest

    @pytest.fixture
    def peer_mesh():
        """A started 3-peer CURVE mesh over ipc, torn down after the test."""
        with PeerMesh(3) as mesh:
            yield mesh

except ImportError:  # pragma: no cover
    pass

__all__ = ["FederatedMesh", "PeerMesh"]
