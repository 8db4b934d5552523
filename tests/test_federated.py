"""Federated training end to end on an in-process mesh (real homes, LMDB, CURVE, worker processes)."""

from __future__ import annotations

import logging

import orjson
import pytest
import torch

from helpers.data import write_blobs_csv
from helpers.plans import AddOnePlan, DyingPlan, HangingPlan, RaisingPlan, TinyPlan
from meshfl.errors import RemoteError
from meshfl.node._plans import plan_hash
from meshfl.plans import plan_source
from meshfl.researcher import Experiment, RoundFailed
from meshfl.testing import FederatedMesh

pytestmark = pytest.mark.timeout(180)


def _register(mesh, samples=(60, 40)):
    for i, node in enumerate(mesh.nodes):
        path = write_blobs_csv(node.home.path / "blobs.csv", n=samples[i % len(samples)], seed=i)
        node.datasets.add("blobs", ["blobs", "tabular"], "csv", path, target="target")


@pytest.fixture(scope="module")
def mesh():
    with FederatedMesh(2) as m:
        _register(m)
        yield m


def _experiment(mesh, plan, rounds=1, **kw):
    kw.setdefault("round_timeout", 60)
    kw.setdefault("min_nodes", len(mesh.nodes))
    return Experiment(mesh.researcher, plan, ["blobs"], rounds, training_args={"epochs": 5, "lr": 0.05}, progress=False, **kw)


def test_federated_training_learns_and_records_history(mesh):
    mesh.approve(TinyPlan)
    exp = _experiment(mesh, TinyPlan, rounds=3)
    history = exp.run()
    assert [h["round"] for h in history] == [1, 2, 3]
    assert set(history[-1]["nodes"]) == {"node0", "node1"}
    assert history[-1]["samples"] == 48 + 32  # 80 % of 60 and 40 train, 20 % held out on each node
    assert history[-1]["global"]["test_accuracy"] > 0.8
    # The checkpoint in the researcher's LMDB counts 3 rounds; each round's history entry is a
    # record of its own, so the experiment's record does not grow with the rounds.
    record = mesh.researcher.home.store.table("experiments").get(exp.id)
    assert record["round"] == 3 and "history" not in record
    assert Experiment.saved_history(mesh.researcher.home.store, exp.id) == orjson.loads(orjson.dumps(history))
    assert Experiment.saved_history(mesh.researcher.home.store, "exp-none") == []
    # A record written before the rounds table holds its history: resume moves it there.
    old_style = {**record, "id": "exp-old", "history": Experiment.saved_history(mesh.researcher.home.store, exp.id)}
    mesh.researcher.home.store.table("experiments").put("exp-old", old_style)
    old = Experiment.resume(mesh.researcher, "exp-old", progress=False)
    assert [h["round"] for h in old.history] == [1, 2, 3]
    old.rounds = 4
    old.run()
    assert [h["round"] for h in Experiment.saved_history(mesh.researcher.home.store, "exp-old")] == [1, 2, 3, 4]


def test_a_resume_that_crashes_before_its_first_checkpoint_loses_nothing(mesh):
    """Resuming rewrites the experiment's record (a new attempt); a second crash before the next
    checkpoint must still find the last checkpoint's model and history."""
    mesh.approve(AddOnePlan)
    exp = _experiment(mesh, AddOnePlan, rounds=2)
    exp.run()  # two rounds checkpointed
    saved = {k: v.clone() for k, v in exp.global_state.items()}

    crashing = Experiment.resume(mesh.researcher, exp.id, progress=False)
    crashing.rounds = 3

    def crash(rnd):
        raise RuntimeError("the researcher's script dies in round 3")

    crashing._run_round = crash
    with pytest.raises(RuntimeError):
        crashing.run()
    again = Experiment.resume(mesh.researcher, exp.id, progress=False)
    assert again.round == 2 and [h["round"] for h in again.history] == [1, 2]
    for name, value in saved.items():
        assert torch.equal(again.global_state[name], value), name
    again.rounds = 3
    assert [h["round"] for h in again.run()] == [1, 2, 3]


def test_search_reply_never_reveals_a_path(mesh):
    found = mesh.researcher.search(["blobs"])
    assert len(found) == 2
    for datasets in found.values():
        assert datasets and all("path" not in d for d in datasets)
        assert str(mesh.root) not in repr(datasets)
        assert datasets[0]["samples"] in (60, 40)
    assert mesh.researcher.search(["no-such-tag"]) == {n: [] for n in found}


def test_unapproved_plan_is_refused_with_its_hash_then_runs_after_approval(mesh, caplog):
    source = plan_source(AddOnePlan).replace("p.add_(1.0)", "p.add_(3.0)")
    h = plan_hash(source)
    exp = _experiment(mesh, source, plan_class="AddOnePlan")
    with caplog.at_level(logging.WARNING, logger="meshfl.node"), pytest.raises(RoundFailed) as info:
        exp.run()
    failed = info.value.details["failed"]
    assert {e["code"] for e in failed.values()} == {"plan_not_approved"}
    assert all(h in e["message"] and "meshfl plan approve" in e["message"] for e in failed.values())
    # The researcher's error itself says what the operators must do (each distinct error once).
    message = str(info.value)
    assert f"node0, node1: [plan_not_approved] training plan {h}" in message
    assert f"`meshfl plan show {h} --diff`" in message and f"`meshfl plan approve {h}`" in message
    # Each node warns its operator (shown without -v), naming its home in the commands.
    waiting = [r.getMessage() for r in caplog.records if "awaits approval" in r.getMessage()]
    assert len(waiting) == 2
    for node in mesh.nodes:
        assert any(f"[{node.name}] training plan {h} from researcher awaits approval" in w
                   and f"meshfl plan show {h} --diff --home {node.home.path}" in w for w in waiting)
    assert all(node.plans.get(h)["name"] == "AddOnePlan" for node in mesh.nodes)  # named by its class
    records = [r for r in mesh.nodes[0].audit.records() if r.event == "task.refused"]
    assert records[-1].fields["reason"] == "plan_not_approved"
    stopped = mesh.researcher.home.audit.head()  # the researcher's audit: this run failed, and why
    assert stopped.event == "experiment.failed" and stopped.fields["experiment"] == exp.id
    assert stopped.fields["round"] == 1 and h in stopped.fields["message"]
    assert all(node.plans.status(h) == "pending" for node in mesh.nodes)  # waiting for the operator
    for node in mesh.nodes:  # what `meshfl plan approve <hash>` does on each node
        node.plans.approve(h)
    exp = _experiment(mesh, source, plan_class="AddOnePlan")
    before = {k: v.clone() for k, v in exp.global_state.items()}
    exp.run()
    assert all(torch.allclose(exp.global_state[k], before[k] + 3.0) for k in before)


def test_a_node_that_refuses_a_plan_is_named_in_the_round_history_with_the_commands(mesh):
    source = plan_source(AddOnePlan).replace("p.add_(1.0)", "p.add_(5.0)")
    h = plan_hash(source)
    mesh.nodes[0].plans.submit(source)
    mesh.nodes[0].plans.approve(h)  # node1's operator has not approved it yet
    history = _experiment(mesh, source, plan_class="AddOnePlan", min_nodes=1).run()
    assert list(history[0]["nodes"]) == ["node0"]
    refusal = history[0]["failed"]["node1"]
    assert refusal["code"] == "plan_not_approved" and refusal["details"]["hash"] == h
    assert f"meshfl plan show {h} --diff" in refusal["message"] and f"meshfl plan approve {h}" in refusal["message"]


def test_changed_plan_source_needs_a_new_approval(mesh):
    h = mesh.approve(AddOnePlan)
    changed = plan_source(AddOnePlan).replace("p.add_(1.0)", "p.add_(2.0)")
    assert plan_hash(changed) != h
    with pytest.raises(RoundFailed) as info:
        _experiment(mesh, changed, plan_class="AddOnePlan").run()
    assert {e["code"] for e in info.value.details["failed"].values()} == {"plan_not_approved"}


def test_fedavg_result_is_exact_and_large_results_stream_in_chunks(mesh):
    mesh.approve(AddOnePlan)
    # width 600_000 -> ~9.6 MB of float32: above the inline limit, pulled in 1 MB chunks.
    exp = _experiment(mesh, AddOnePlan, model_args={"width": 600_000})
    before = {k: v.clone() for k, v in exp.global_state.items()}
    exp.run()
    for k, v in exp.global_state.items():
        assert torch.allclose(v, before[k] + 1.0), k
    assert all(len(node.outbox) == 0 for node in mesh.nodes)  # every result acknowledged


@pytest.mark.parametrize(
    "plan, code",
    [(RaisingPlan, "plan_failed"), (HangingPlan, "timeout"), (DyingPlan, "worker_died")],
)
def test_a_bad_plan_fails_only_its_task(mesh, plan, code):
    mesh.approve(plan)
    exp = Experiment(
        mesh.researcher, plan, ["blobs"], 1, training_args={"epochs": 1, "timeout": 2.0},
        min_nodes=1, round_timeout=60, progress=False,
    )
    with pytest.raises(RoundFailed) as info:
        exp.run()
    errors = list(info.value.details["failed"].values())
    assert len(errors) == 2 and {e["code"] for e in errors} == {code}
    if plan is RaisingPlan:
        assert "plan bug at step 3" in errors[0]["message"]
    # Every node carries on: it answers at once and trains the next task.
    for node_id in mesh.researcher.nodes():
        assert mesh.researcher.ping(node_id)["role"] == "node"
    mesh.approve(TinyPlan)
    assert _experiment(mesh, TinyPlan).run()[0]["samples"] == 80


def test_min_nodes_quorum_and_dropouts_are_reported():
    with FederatedMesh(2) as m:
        _register(m)
        m.approve(TinyPlan)
        m.nodes[1].stop()
        exp = Experiment(m.researcher, TinyPlan, ["blobs"], 1, min_nodes=1, round_timeout=30, progress=False)
        history = exp.run()
        assert list(history[0]["nodes"]) == ["node0"]
        with pytest.raises(RoundFailed):
            Experiment(m.researcher, TinyPlan, ["blobs"], 1, min_nodes=2, round_timeout=5, progress=False).run()
        m.nodes.pop()  # already stopped


def test_force_secure_aggregation_refuses_plain_training():
    with FederatedMesh(1, node_config={"force_secure_aggregation": True}) as m:
        _register(m)
        m.approve(TinyPlan)
        with pytest.raises(RoundFailed) as info:
            Experiment(m.researcher, TinyPlan, ["blobs"], 1, round_timeout=30, progress=False).run()
        assert [e["code"] for e in info.value.details["failed"].values()] == ["secagg_required"]


def test_dev_mode_runs_unapproved_plans_and_audits_it():
    with FederatedMesh(1, dev=True) as m:
        _register(m)
        assert Experiment(m.researcher, TinyPlan, ["blobs"], 1, round_timeout=60, progress=False).run()
        events = [r.event for r in m.nodes[0].audit.records()]
        assert "plan.allowed_dev" in events and "task.finished" in events
        assert m.nodes[0].audit.verify().ok


def test_unknown_request_type_gets_an_error_code(mesh):
    from meshfl.wire import Message

    node = mesh.researcher.nodes()[0]
    with pytest.raises(RemoteError) as info:
        mesh.researcher.peer.call(node, Message("pong", {"name": "x", "peer_id": "y", "role": "z", "version": "1"}), 5)
    assert info.value.code == "unknown_type"


def test_cancel_stops_running_and_queued_tasks(mesh):
    import threading

    mesh.approve(HangingPlan)
    exp = Experiment(mesh.researcher, HangingPlan, ["blobs"], 1, training_args={"timeout": 120},
                     min_nodes=1, round_timeout=120, progress=False)
    outcome = {}

    def run():
        try:
            exp.run()
        except RoundFailed as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    running = threading.Event()
    for _ in range(600):  # bounded: until both nodes train (the hanging plan never returns)
        if all(node._running_task for node in mesh.nodes):
            running.set()
            break
        running.wait(0.05)
    assert running.is_set()
    cancelled = exp.cancel()
    assert sum(cancelled.values()) == 2
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert {e["code"] for e in outcome["error"].details["failed"].values()} == {"cancelled"}


def test_a_researcher_cannot_lift_the_operators_time_limit():
    with FederatedMesh(1, node_config={"task_timeout": 1.0}) as m:
        _register(m)
        m.approve(HangingPlan)
        exp = Experiment(m.researcher, HangingPlan, ["blobs"], 1, training_args={"timeout": 600},
                         round_timeout=60, progress=False)
        with pytest.raises(RoundFailed) as info:
            exp.run()
        assert [e["code"] for e in info.value.details["failed"].values()] == ["timeout"]


def test_fraction_with_too_few_nodes_fails_the_round_clearly(mesh):
    mesh.approve(TinyPlan)
    with pytest.raises(RoundFailed):
        _experiment(mesh, TinyPlan, min_nodes=3, fraction=0.5).run()
