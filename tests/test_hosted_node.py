"""A node daemon serving a hosted model it joined: a Host and a Node in this process, CURVE over ipc."""

from __future__ import annotations

import time

import pytest
import torch

from helpers.data import write_blobs_csv
from helpers.hosted import make_host_home
from helpers.plans import AddOnePlan
from meshfl.home import Home
from meshfl.hosted import Host
from meshfl.node import Node
from meshfl.node._datasets import DatasetRegistry
from meshfl.node._joins import Joins
from meshfl.node._plans import plan_hash
from meshfl.plans import plan_source

PLAN_HASH = plan_hash(plan_source(AddOnePlan))


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def host(tmp_path):
    h = Host(make_host_home(tmp_path)).start()
    h.add_model("m", AddOnePlan, server={"max_clients": 1, "cycle_length": 30})
    yield h
    h.close()


@pytest.fixture
def node_home(tmp_path, host):
    """A node home that trusts the host (with its endpoint), is enrolled there and joined model m."""
    with Home.init(tmp_path / "node", "node", "node", heartbeat=0.3, dead_after=3.0) as h:
        h.trust(host.card, host.endpoint)
        host.enroll([h.identity.card])
        DatasetRegistry(h.store, h.audit).add("blobs", ["blobs"], "csv", write_blobs_csv(tmp_path / "b.csv"),
                                              target="target")
        Joins(h.store, h.audit).join(host.card.peer_id, "host", "m", "blobs")
    return tmp_path / "node"


def _approve(node):
    node.plans.submit(plan_source(AddOnePlan), "AddOnePlan")
    node.plans.approve(PLAN_HASH)


def _audit(node, kind):
    return [r.fields for r in node.audit.records() if r.event == kind]


def test_a_joined_node_trains_and_the_hosts_version_advances(host, node_home):
    v0 = host.model("m")
    with Node(node_home) as node:
        _approve(node)
        assert host.wait_version("m", 1, timeout=20)
        [record] = [r for r in host.versions("m") if r["version"] == 1]
        assert record["diffs"] == 1 and record["clients"] == 1
        for k, t in host.model("m", 1).items():  # AddOnePlan: +1 on every parameter
            torch.testing.assert_close(t, v0[k] + 1)
        wait_for(lambda: not len(node.outbox) and _audit(node, "result.acknowledged"))
        [accepted] = [a for a in _audit(node, "task.accepted") if a.get("kind") == "hosted"][:1]
        assert accepted["model"] == "m" and accepted["plan"] == PLAN_HASH and accepted["dataset"] == "blobs"
        assert _audit(node, "result.released")
