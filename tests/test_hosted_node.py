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
from meshfl.hosted._state import tensors_hash
from meshfl.node._joins import Joins, cache_blob, join_key
from meshfl.node._plans import PlanRegistry, plan_hash
from meshfl.plans import plan_source
from meshfl.privacy import PolicyTable
from meshfl.store import Outbox
from meshfl.store.blobs import BlobStore

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
    return make_node_home(tmp_path, host)


def make_node_home(tmp_path, host, model="m"):
    """A node home that trusts the host (with its endpoint), is enrolled there and joined ``model``."""
    with Home.init(tmp_path / "node", "node", "node", heartbeat=0.3, dead_after=3.0) as h:
        h.trust(host.card, host.endpoint)
        host.enroll([h.identity.card])
        DatasetRegistry(h.store, h.audit).add("blobs", ["blobs"], "csv", write_blobs_csv(tmp_path / "b.csv"),
                                              target="target")
        Joins(h.store, h.audit).join(host.card.peer_id, "host", model, "blobs")
    return tmp_path / "node"


def _approve(node):
    plans = getattr(node, "plans", node)
    plans.submit(plan_source(AddOnePlan), "AddOnePlan")
    plans.approve(PLAN_HASH)


def _before_start(node_home, **policy):
    """Approve the plan and set the dataset's policy before the node runs (nothing races them)."""
    with Home.open(node_home) as h:
        _approve(PlanRegistry(h.store, h.audit))
        PolicyTable(h.store, h.audit).set("blobs", **policy)


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


def test_an_unapproved_plan_waits_pending_and_nothing_trains_until_approved(host, node_home):
    with Node(node_home) as node:
        wait_for(lambda: node.plans.status(PLAN_HASH) == "pending")
        wait_for(lambda: any(r["reason"] == "plan_not_approved" for r in _audit(node, "task.refused")))
        [joined] = node.hosted.joins.list()
        assert joined["blocked"]["code"] == "plan_not_approved" and joined["blocked"]["plan_hash"] == PLAN_HASH
        assert not host.wait_version("m", 1, timeout=1.0)  # no diff: nothing trained
        assert not [a for a in _audit(node, "task.accepted") if a.get("kind") == "hosted"]
        refusals = len(_audit(node, "task.refused"))
        node.plans.approve(PLAN_HASH)
        assert host.wait_version("m", 1, timeout=20)
        assert len([r for r in _audit(node, "task.refused") if r.get("kind") == "hosted"]) == refusals  # asked once
        assert node.hosted.joins.list()[0]["blocked"] is None


def test_a_dataset_policy_without_the_hosted_kind_refuses_it_with_the_gates_code(host, node_home):
    _before_start(node_home, kinds=["training"])
    with Node(node_home) as node:
        wait_for(lambda: any(r["reason"] == "policy_denied" for r in _audit(node, "task.refused")))
        [refused] = [r for r in _audit(node, "task.refused") if r["reason"] == "policy_denied"][:1]
        assert refused["kind"] == "hosted" and refused["dataset"] == "blobs" and refused["model"] == "m"
        assert node.hosted.joins.list()[0]["blocked"]["code"] == "policy_denied"
        assert not host.wait_version("m", 1, timeout=1.0)
        node.gate.policies.set("blobs", kinds=["training", "hosted"])  # the operator lets it in: it trains
        assert host.wait_version("m", 1, timeout=20)


def test_a_diff_unacknowledged_at_a_restart_is_sent_again_and_counted_once(host, node_home, monkeypatch):
    node = Node(node_home)
    lost = []
    monkeypatch.setattr(node.hosted, "_acknowledge", lambda task_id, *a: lost.append(task_id))  # the ack is lost
    node.start()
    try:
        _approve(node)
        assert host.wait_version("m", 1, timeout=20)
        wait_for(lambda: lost)
    finally:
        node.stop()
    with Home.open(node_home) as h:
        assert [i.msg_id for i in Outbox(h.store).pending()] == lost
    with Node(node_home) as node:
        wait_for(lambda: any(r["task"] == lost[0] for r in _audit(node, "result.acknowledged")))
        [ack] = [r for r in _audit(node, "result.acknowledged") if r["task"] == lost[0]]
        assert ack["duplicate"] is True
        [record] = [r for r in host.versions("m") if r["version"] == 1]
        assert record["diffs"] == 1 and record["clients"] == 1


def test_node_join_leave_and_status_from_the_cli(tmp_path, host):
    from click.testing import CliRunner

    from meshfl.cli import main

    def run(*args, ok=True):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert (result.exit_code == 0) == ok, (result.output, result.exception)
        return result.output

    home = tmp_path / "n2"
    with Home.init(home, "node", "n2") as h:
        h.trust(host.card, host.endpoint)
        DatasetRegistry(h.store, h.audit).add("blobs", ["blobs"], "csv", write_blobs_csv(tmp_path / "c.csv"),
                                              target="target")
    assert "no trusted peer" in run("node", "join", "--home", home, "--host", "nobody", "--model", "m",
                                    "--dataset", "blobs", ok=False)
    assert "no dataset named 'nope'" in run("node", "join", "--home", home, "--host", "host", "--model", "m",
                                            "--dataset", "nope", ok=False)
    run("node", "join", "--home", home, "--host", "host", "--model", "m", "--dataset", "blobs")
    assert "hosted model:  m of host on dataset blobs, nothing pulled yet" in run("node", "status", "--home", home)
    run("node", "leave", "--home", home, "--host", "host", "--model", "m")
    assert "hosted model" not in run("node", "status", "--home", home)
    run("node", "leave", "--home", home, "--host", "host", "--model", "m", ok=False)
    with Home.open(home) as h:
        events = [r.event for r in h.audit.records()]
    assert "hosted.joined" in events and "hosted.left" in events


def test_a_diff_held_for_review_is_pushed_once_the_operator_releases_it(host, node_home):
    _before_start(node_home, review=True)
    with Node(node_home) as node:
        wait_for(lambda: node.outbox.held(buffers=False))
        assert not host.wait_version("m", 1, timeout=1.0)
        [held] = node.outbox.held(buffers=False)
        node.release.decide(held.msg_id, True)
        node.notify_released()
        assert host.wait_version("m", 1, timeout=20)
        wait_for(lambda: any(r["task"] == held.msg_id for r in _audit(node, "result.acknowledged")))


def test_a_node_joined_to_a_fedbuff_model_comes_back_for_each_new_version(host, node_home):
    """Asynchronous mode: every diff makes a version (buffer 1); the node, idle again after each
    ack, asks again, pulls the newer version and trains on it, so its diffs are never stale."""
    host.add_model("a", AddOnePlan, server={"mode": "async", "buffer": 1, "max_staleness": 2})
    v0 = host.model("a")
    with Home.open(node_home) as h:
        joins = Joins(h.store, h.audit)
        joins.leave(host.card.peer_id, "m")
        joins.join(host.card.peer_id, "host", "a", "blobs")
    _before_start(node_home)
    with Node(node_home) as node:
        assert host.wait_version("a", 3, timeout=30)
        for version in (1, 2, 3):
            [record] = [r for r in host.versions("a") if r["version"] == version]
            assert record["diffs"] == 1 and record["staleness"] == {"0": 1}
        for k, t in host.model("a", 3).items():  # three AddOne diffs, each on the newest version
            torch.testing.assert_close(t, v0[k] + 3)
        assert not host.wait_version("m", 1, timeout=0.5)  # the model it left gets nothing
        assert all(a["model"] == "a" for a in _audit(node, "task.accepted") if a.get("kind") == "hosted")


def test_a_node_trains_a_model_of_several_chunks_through_a_host_whose_messages_are_smaller(tmp_path):
    """A 4.2 MB model (five 1 MB chunks) pulled and pushed in chunks by a node, through a host that
    takes no message over 2 MB."""
    with Host(make_host_home(tmp_path), max_message_bytes=2 << 20) as host:
        host.add_model("m", AddOnePlan, model_args={"width": 150_000}, server={"max_clients": 1})
        v0 = host.model("m")
        assert sum(t.numel() * t.element_size() for t in v0.values()) > 2 * (2 << 20)
        _before_start(make_node_home(tmp_path, host))
        with Node(tmp_path / "node") as node:
            assert host.wait_version("m", 1, timeout=30)
            for k, t in host.model("m", 1).items():
                torch.testing.assert_close(t, v0[k] + 1)
            wait_for(lambda: not len(node.outbox) and _audit(node, "result.acknowledged"))
        key = join_key(host.card.peer_id, "m")
        with Home.open(tmp_path / "node") as h:  # the pulled chunks, each in its place: the version's hash
            record = Joins(h.store, h.audit).cache(key)
            assert tensors_hash(BlobStore(h.path / "blobs").read(cache_blob(key))) == record["version_hash"]
