"""One node, several researchers (#17 §2): each sees only its own tasks, results and
cancellations, search honours each dataset's researcher list, and the node's queue serves the
researchers in turn, so one's backlog does not starve the other."""

from __future__ import annotations

import queue
import threading

import pytest

from helpers.data import write_blobs_csv
from helpers.plans import AddOnePlan, TinyPlan
from helpers.waiting import wait_until
from meshfl.errors import RemoteError
from meshfl.plans import plan_source
from meshfl.researcher import Experiment
from meshfl.testing import FederatedMesh
from meshfl.wire import Message

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def mesh():
    with FederatedMesh(2, researchers=2) as m:
        for i, node in enumerate(m.nodes):
            path = write_blobs_csv(node.home.path / "blobs.csv", n=40, seed=i)
            node.datasets.add("blobs", ["blobs"], "csv", path, target="target")
        m.approve(TinyPlan)
        m.approve(AddOnePlan)
        yield m


def _train(task_id: str, experiment: str) -> Message:
    fields = {"task_id": task_id, "experiment": experiment, "round": 1, "plan_source": plan_source(AddOnePlan),
              "plan_class": "AddOnePlan", "dataset_tags": ["blobs"], "training_args": {}, "model_args": {}}
    return Message("train", fields, AddOnePlan().init_model().state_dict())


def _refused(researcher, node: str, msg: Message) -> str:
    with pytest.raises(RemoteError) as info:
        researcher.peer.call(node, msg, timeout=10)
    return info.value.code


def test_two_researchers_train_on_the_same_nodes_at_once_and_each_sees_only_its_own(mesh):
    alice, bob = mesh.researchers
    # One experiment id for both: the nodes keep them apart by researcher.
    exps = [Experiment(r, TinyPlan, ["blobs"], 2, experiment_id="shared", min_nodes=2, round_timeout=60,
                       training_args={"epochs": 1}, progress=False) for r in (alice, bob)]
    histories: dict = {}
    threads = [threading.Thread(target=lambda e=e: histories.update({e.researcher.name: e.run()})) for e in exps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(histories) == ["researcher", "researcher1"]
    for history in histories.values():
        assert [h["round"] for h in history] == [1, 2] and set(history[-1]["nodes"]) == {"node0", "node1"}
    tasks = {name: {info["task"] for h in history for info in h["nodes"].values()}
             for name, history in histories.items()}
    assert not tasks["researcher"] & tasks["researcher1"]
    for node in mesh.nodes:
        for task in node.queue.list():
            if task.payload.get("experiment") == "shared":
                owner = alice if task.id in tasks["researcher"] else bob
                assert task.payload["researcher"] == owner.peer.peer_id and task.state == "done"
        acks = [e.fields for e in node.home.audit.records() if e.event == "result.acknowledged"]
        assert all((a["task"] in tasks["researcher"]) == (a["researcher"] == alice.peer.peer_id)
                   for a in acks if a["task"] in tasks["researcher"] | tasks["researcher1"])


def test_a_researcher_cannot_fetch_ack_cancel_or_reuse_anothers_task(mesh):
    alice, bob = mesh.researchers
    node = alice.nodes()[0]
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    alice._route(["alice-x.t1"], inbox)  # alice takes the result herself and does not acknowledge it
    alice.peer.call(node, _train("alice-x.t1", "alice-x"), timeout=30)
    done = inbox.get(timeout=60)
    assert done.type == "train.done" and done.fields["ok"]
    served = next(n for n in mesh.nodes if n.peer.peer_id == node)
    assert served.outbox.get("alice-x.t1").dest == alice.peer.peer_id

    pull = Message("result.pull", {"task_id": "alice-x.t1", "first": 0, "count": 1})
    assert _refused(bob, node, pull) == "unknown_task"
    assert _refused(bob, node, Message("result.ack", {"task_id": "alice-x.t1"})) == "unknown_task"
    assert _refused(bob, node, Message("task.cancel", {"experiment": "alice-x"})) == "unknown_experiment"
    assert _refused(bob, node, _train("alice-x.t1", "bob-x")) == "task_conflict"
    assert served.outbox.get("alice-x.t1") is not None  # nothing of alice's was touched
    assert alice.peer.call(node, Message("task.cancel", {"experiment": "alice-x"}), 10).fields["count"] == 0
    alice.send(node, Message("result.ack", {"task_id": "alice-x.t1"}))
    assert wait_until(lambda: served.outbox.get("alice-x.t1") is None)


def test_search_shows_a_researcher_only_the_datasets_its_policy_allows(mesh):
    alice, bob = mesh.researchers
    node = mesh.nodes[0]
    path = write_blobs_csv(node.home.path / "private.csv", n=40, seed=9)
    node.datasets.add("private", ["private"], "csv", path, target="target")
    node.gate.policies.set("private", researchers=["researcher"])  # alice, by her name
    found = {r.name: r.search(["private"]) for r in (alice, bob)}
    assert [d["name"] for d in found["researcher"][node.peer.peer_id]] == ["private"]
    assert found["researcher1"].get(node.peer.peer_id, []) == []
    refusal = _refused(bob, node.peer.peer_id, Message("train", {**_train("bob-p.t1", "bob-p").fields,
                                                                 "dataset_tags": ["private"]},
                                                      AddOnePlan().init_model().state_dict()))
    assert refusal == "policy_denied"


def test_one_researchers_backlog_does_not_starve_another(mesh):
    """Round-robin between researchers: with alice's backlog queued first, bob's task runs as
    soon as her running task ends, not after her whole backlog."""
    alice, bob = mesh.researchers
    served = mesh.nodes[1]
    node = served.peer.peer_id
    claimed: list[str] = []
    claim = served.queue.claim

    def recording_claim():
        task = claim()
        if task is not None:
            claimed.append(task.id)
        return task

    inbox: queue.SimpleQueue = queue.SimpleQueue()
    ids = [f"flood.t{i}" for i in range(5)]
    alice._route(ids, inbox)
    bob._route(["bob-1.t1"], inbox)
    with served.executor._lock:  # the runner takes a task and waits: the backlog queues up behind it
        served.queue.claim = recording_claim
        for task_id in ids:
            alice.peer.call(node, _train(task_id, "flood"), timeout=30)
        assert wait_until(lambda: claimed == ids[:1])
        bob.peer.call(node, _train("bob-1.t1", "bob-1"), timeout=30)
    results = [inbox.get(timeout=60) for _ in range(6)]
    served.queue.claim = claim
    assert all(m.fields["ok"] for m in results)
    assert claimed == [ids[0], "bob-1.t1", *ids[1:]]
    for m in results:
        sender = bob if m.fields["task_id"] == "bob-1.t1" else alice
        sender.send(node, Message("result.ack", {"task_id": m.fields["task_id"]}))
