"""Meshes over real links: every peer a process in its own network namespace (root, as in CI).

The researcher and each node live in separate namespaces joined by veth pairs; the nodes reach
the researcher through the impairment relay (latency) and over shaped or cut links
(meshfl.testing.netns). Every namespace, veth, relay and process is removed afterwards.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers.plans import AddOnePlan, GatedPlan
from helpers.procs import NODE_COMMAND, make_homes
from helpers.system import require
from meshfl.home import Home
from meshfl.store import Outbox, TaskQueue
from meshfl.testing.netns import Host, Network, RelayLink, available

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
HELPERS = Path(__file__).parent / "helpers"
PORT = 5555


@pytest.fixture
def network(tmp_path):
    require(available())
    net = Network()
    net.start()
    try:
        yield net
    finally:
        net.close()
        assert net.leftovers() == []  # no namespace (and so no veth) of the test survives it


@dataclass
class Mesh:
    researcher: Host
    hosts: list[Host]
    links: list[RelayLink]
    r_home: Path
    homes: list[Path]
    nodes: list[subprocess.Popen]


def _mesh(net: Network, tmp_path: Path, plan, n: int, *, rtt_ms: float = 0.0, closed: tuple[int, ...] = (),
          mutual: bool = False, node_config: dict | None = None) -> Mesh:
    """A researcher host and ``n`` node hosts (those in ``closed`` without inbound route), each
    node dialing the researcher through its own relay link with ``rtt_ms``; node processes started."""
    r_host = net.add_host("researcher")
    hosts = [net.add_host(f"node{i}", inbound=i not in closed) for i in range(n)]
    links = [net.relay(h, r_host, PORT, delay_ms=rtt_ms / 2) for h in hosts]
    r_path, paths = make_homes(tmp_path, n, plan, listen=f"tcp://{r_host.address}:{PORT}",
                               endpoints=[link.endpoint for link in links], mutual=mutual,
                               node_config=node_config)
    nodes = [net.popen(host, [*NODE_COMMAND, str(path)], stdout=open(path / "node.log", "ab"),
                       stderr=subprocess.STDOUT) for host, path in zip(hosts, paths)]
    return Mesh(r_host, hosts, links, r_path, paths, nodes)


def _researcher(net: Network, host, home: Path, **config) -> subprocess.Popen:
    return net.popen(host, [sys.executable, str(HELPERS / "netns_researcher.py"), str(home), json.dumps(config)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _lines(proc: subprocess.Popen) -> list[dict]:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out[-2000:]
    return [json.loads(line) for line in out.splitlines()]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _task_states(path: Path) -> list[str]:
    with Home.open(path) as home:
        return [t.state for t in TaskQueue(home.store, "tasks").list()]


def test_secure_rounds_across_namespaces_at_50ms_rtt_one_node_without_inbound_route(network, tmp_path):
    mesh = _mesh(network, tmp_path, AddOnePlan, 3, rtt_ms=50, closed=(2,), mutual=True)
    closed, routed = mesh.hosts[2], mesh.hosts[0]
    for target, error in ((closed, "Network is unreachable"), (routed, "Connection refused")):
        probe = network.run(mesh.researcher, [sys.executable, "-c", "import socket; "
                                              f"socket.create_connection(('{target.address}', 9), 5)"])
        assert error in probe.stderr  # node2 cannot even be tried; node0 could be, but listens nowhere
    researcher = _researcher(network, mesh.researcher, mesh.r_home, plan="AddOnePlan", rounds=2, nodes=3,
                             min_nodes=3, secagg=True)
    *rounds, result = _lines(researcher)
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:  # node2 takes part, dialing out only: its shares travel through the researcher
        assert sorted(entry["nodes"]) == ["node0", "node1", "node2"] and entry["dropped"] == []
        assert sorted(entry["secagg"]["members"]) == ["node0", "node1", "node2"]
    for name, initial in result["initial"].items():  # every node added 1 per round: the unmasked mean
        assert torch.allclose(torch.tensor(result["final"][name]), torch.tensor(initial) + 2, atol=1e-4), name
    for link in mesh.links:  # each node's traffic crossed its delayed path, the only one it has
        stats = link.stats()
        assert stats["down_bytes"] > 0 and stats["up_bytes"] > 0


def test_a_link_cut_mid_round_drops_the_node_and_its_result_still_arrives(network, tmp_path):
    gates = tmp_path / "gates"  # GatedPlan reads its gate there: the sandbox allows it
    gates.mkdir()
    mesh = _mesh(network, tmp_path, GatedPlan, 2, rtt_ms=10, node_config={"sandbox_read_paths": [str(gates)]})
    cut_home = mesh.homes[1]
    gate = gates / "gate"
    gate.touch()
    with open(gate, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # every node's training waits here
        researcher = _researcher(network, mesh.researcher, mesh.r_home, plan="GatedPlan", rounds=2, nodes=2,
                                 min_nodes=1, pause_after=1, training_args={"gate": str(gate)}, hold=True)
        _wait_for(lambda: _task_states(cut_home) == ["running"], 60, "node1 to be training")
        network.cut(mesh.hosts[1])  # mid-round: node1 has its task, the researcher waits for it
        fcntl.flock(held, fcntl.LOCK_UN)
        first = json.loads(researcher.stdout.readline() or "{}")
    assert first.get("round") == 1, first
    assert list(first["nodes"]) == ["node0"] and first["dropped"] == ["node1"]  # on quorum

    network.restore(mesh.hosts[1])
    with Home.open(cut_home) as home:
        (cut_task,) = [t.id for t in TaskQueue(home.store, "tasks").list()]
    # node1 finished training while cut off; back online, it re-sends the result, which is acknowledged
    _wait_for(lambda: _outbox(cut_home) == 0, 45, "node1's result of round 1 to be delivered")
    researcher.stdin.write("\n")
    researcher.stdin.flush()
    second, result = (json.loads(researcher.stdout.readline() or "{}") for _ in range(2))
    assert second["round"] == 2 and sorted(second["nodes"]) == ["node0", "node1"]
    # Nothing lost or counted twice: each round is exactly the sample-weighted mean of its own nodes.
    step = sum(s * s for s in _samples(first)) / sum(_samples(first)) / 100
    step += sum(s * s for s in _samples(second)) / sum(_samples(second)) / 100
    for name, initial in result["initial"].items():
        assert torch.allclose(torch.tensor(result["final"][name]), torch.tensor(initial) + step, atol=1e-5), name
    _wait_for(lambda: _outbox(cut_home) == 0, 30, "node1's result of round 2 to be acknowledged")
    assert _lines(researcher) == []  # told to go (its stdin closes), it exits cleanly
    network.stop(mesh.nodes[1])  # node1, cleanly, so its store can be read
    with Home.open(cut_home) as home:
        events = [(r.event, r.fields.get("task")) for r in home.audit.records()]
        assert ("task.finished", cut_task) in events and ("result.acknowledged", cut_task) in events
        assert sum(e == "result.acknowledged" for e, _ in events) == 2 and len(Outbox(home.store, "outbox")) == 0


def _outbox(path: Path) -> int:
    with Home.open(path) as home:
        return len(Outbox(home.store, "outbox"))


def _samples(entry: dict) -> list[int]:
    return [info["samples"] for info in entry["nodes"].values()]
