"""Secure aggregation on an in-process mesh: real nodes, overlay relayed by the researcher."""

from __future__ import annotations

import fcntl
import threading
import time

import numpy as np
import pytest
import torch

import meshfl.researcher._secure as secure_module
from helpers.data import write_blobs_csv
from helpers.plans import AddOnePlan, GatedPlan, TinyPlan
from meshfl.researcher import Experiment, RoundFailed
from meshfl.secagg import DEFAULT_CLIP, MaskedSum, UpdateEncoder, frac_bits_for
from meshfl.testing import FederatedMesh
from meshfl.wire import Message

pytestmark = pytest.mark.timeout(180)
SIZES = (40, 50, 60, 70, 80)


def _register(mesh):
    for i, node in enumerate(mesh.nodes):
        path = write_blobs_csv(node.home.path / "blobs.csv", n=SIZES[i], seed=i)
        node.datasets.add("blobs", ["blobs"], "csv", path, target="target")


def wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        threading.Event().wait(0.02)
    return cond()


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory):
    gates = tmp_path_factory.mktemp("gates")  # GatedPlan reads its gate there: the sandbox allows it
    with FederatedMesh(3, node_config={"sandbox_read_paths": [str(gates)]}) as m:
        m.gates = gates
        _register(m)
        m.approve(TinyPlan)
        m.approve(AddOnePlan)
        m.approve(GatedPlan)
        yield m


def _run(mesh, secagg, **kw):
    torch.manual_seed(0)  # the same initial model for both runs
    exp = Experiment(mesh.researcher, TinyPlan, ["blobs"], 1, training_args={"epochs": 2, "lr": 0.05, "seed": 1},
                     min_nodes=len(mesh.nodes), round_timeout=60, progress=False, secagg=secagg, **kw)
    return exp, exp.run()


def test_secure_round_equals_plain_fedavg_within_the_quantization_bound(mesh3):
    plain, plain_history = _run(mesh3, False)
    secure, secure_history = _run(mesh3, True)
    n_total = plain_history[0]["samples"]
    assert secure_history[0]["samples"] == n_total  # only the total sample count is learned
    # docs/security.md: K * 2**-(frac_bits + 1) * W / N for K nodes, weight scale W (the largest
    # dataset), N samples; plus float32 arithmetic (2**-21 of these deltas, well below 1e-6).
    bound = 3 * 2.0 ** -(frac_bits_for(3, DEFAULT_CLIP) + 1) * max(SIZES[:3]) / n_total + 1e-6
    for name, value in plain.global_state.items():
        assert torch.allclose(secure.global_state[name], value, atol=bound, rtol=0), name
    for key, value in plain_history[0]["global"].items():
        assert secure_history[0]["global"][key] == pytest.approx(value, abs=1e-6)
    assert all(info["samples"] is None and info["metrics"] == {} for info in secure_history[0]["nodes"].values())
    assert secure_history[0]["secagg"]["threshold"] == 2
    for node in mesh3.nodes:  # each node's audit log records the round's set-up with the task it served
        records = node.audit.records()
        setup = [i for i, r in enumerate(records) if r.event == "secagg.setup"][-1]
        accepted, revealed = records[setup - 1], [r for r in records[setup:] if r.event == "secagg.revealed"]
        assert accepted.event == "task.accepted" and accepted.fields["task"] == records[setup].fields["task"]
        assert records[setup].fields["participants"] == 3 and records[setup].fields["threshold"] == 2
        assert len(revealed) <= 1 and all(r.fields["session"] == records[setup].fields["session"] for r in revealed)
    for node in mesh3.nodes:  # the unmasking request acknowledged each result, in the reveal's commit
        assert wait_until(lambda: len(node.outbox) == 0)
        records = node.audit.records()
        revealed = [i for i, r in enumerate(records) if r.event == "secagg.revealed"][-1]
        acked = records[revealed + 1]
        assert acked.event == "result.acknowledged" and node.masked.tensors(acked.fields["task"]) is None


def test_a_masked_result_too_large_to_travel_inline_is_pulled_from_the_nodes_memory(mesh3):
    """Width 600_000: ~9.6 MB masked vectors, above the inline limit, so the researcher pulls them in
    chunks - from the node's memory, where a masked result stays until the unmasking acknowledges it."""
    exp = Experiment(mesh3.researcher, AddOnePlan, ["blobs"], 1, model_args={"width": 600_000}, min_nodes=3,
                     round_timeout=120, progress=False, secagg=True)
    before = {k: v.clone() for k, v in exp.global_state.items()}
    (entry,) = exp.run()
    assert sorted(entry["nodes"]) == ["node0", "node1", "node2"]
    for k, v in exp.global_state.items():  # every node added 1: so does their mean, exactly
        assert torch.allclose(v, before[k] + 1.0, atol=1e-5), k
    assert all(wait_until(lambda: len(node.outbox) == 0) for node in mesh3.nodes)


def test_the_researcher_receives_only_masked_vectors(mesh3, monkeypatch):
    blocks, received = {}, []
    real_fill, real_add = UpdateEncoder.fill, MaskedSum.add

    def spy_fill(self, out, offset):  # a node's true vector, block by block, before it is masked
        real_fill(self, out, offset)
        blocks.setdefault(self, []).append(out.copy())  # keyed by the encoder itself: ids are reused

    def spy_add(self, tensors, weight=0.0, node=""):
        received.append(tensors["masked"].numpy().copy())
        return real_add(self, tensors, weight, node)

    monkeypatch.setattr(UpdateEncoder, "fill", spy_fill)
    monkeypatch.setattr(MaskedSum, "add", spy_add)
    torch.manual_seed(0)
    exp = Experiment(mesh3.researcher, AddOnePlan, ["blobs"], 1, model_args={"width": 500}, min_nodes=3,
                     round_timeout=60, progress=False, secagg=True)  # 4 000 parameters
    exp.run()
    true = [np.concatenate(parts) for parts in blocks.values()]
    assert len(true) == len(received) == 3
    for masked in received:
        for update in true:  # no received vector resembles any node's true update
            words = update.view(np.int32)
            assert masked.shape == words.shape and np.mean(masked == words) < 0.01
            assert abs(np.corrcoef(masked.astype(float), words.astype(float))[0, 1]) < 0.1


def test_robust_aggregators_are_refused_with_secagg(mesh3):
    from meshfl.aggregate import Median
    from meshfl.errors import ConfigError

    with pytest.raises(ConfigError):
        Experiment(mesh3.researcher, TinyPlan, ["blobs"], 1, aggregator=Median(), secagg=True)


def test_a_forged_overlay_message_is_rejected_and_audited(mesh3):
    a, b = mesh3.nodes[0], mesh3.nodes[1]
    fields = {"src": a.peer.peer_id, "dst": b.peer.peer_id, "oid": "f" * 16, "exp": time.time() + 60}
    forged = Message("overlay", fields, {"sealed": torch.zeros(200, dtype=torch.uint8)})
    mesh3.researcher.peer.send(b.peer.peer_id, forged)  # the relay injects a message "from" a
    assert wait_until(lambda: any(r.event == "overlay.rejected" for r in b.audit.records()))
    record = [r for r in b.audit.records() if r.event == "overlay.rejected"][-1]
    assert record.fields["src"] == a.peer.peer_id and record.fields["reason"] == "bad_signature"


def _sized_experiment(mesh, tmp_path) -> Experiment:
    """A secure round of GatedPlan with its gate open: every node adds samples / 100."""
    gate = mesh.gates / tmp_path.name
    gate.touch()
    return Experiment(mesh.researcher, GatedPlan, ["blobs"], 1, min_nodes=2, round_timeout=60, progress=False,
                      training_args={"gate": str(gate), "test_fraction": 0}, secagg=True)


def test_a_node_denied_a_members_share_fails_its_task_and_the_others_finish(mesh3, tmp_path, monkeypatch):
    """The researcher withholds one share from node0: node0 cannot check that member's round key,
    so it fails its task rather than mask blind; the round completes over node1 and node2."""
    victim = mesh3.nodes[0].peer.peer_id
    real_bundle = secure_module.bundle

    def withhold_one(messages, prefix):
        if messages and messages[0].fields["dst"] == victim:
            messages = messages[1:]
        return real_bundle(messages, prefix)

    monkeypatch.setattr(secure_module, "bundle", withhold_one)
    exp = _sized_experiment(mesh3, tmp_path)
    g = {k: v.clone() for k, v in exp.global_state.items()}
    (entry,) = exp.run()
    assert entry["failed"]["node0"]["code"] == "secagg_protocol"
    assert "round key is unchecked" in entry["failed"]["node0"]["message"]
    assert sorted(entry["nodes"]) == ["node1", "node2"]
    survivors = SIZES[1:3]
    expected = sum(n * n for n in survivors) / sum(survivors) / 100  # node0's pairwise masks were removed
    for name, value in exp.global_state.items():
        assert torch.allclose(value, g[name] + expected, atol=1e-5), name


def test_cancel_ends_a_secure_task_that_waits_for_its_keys(mesh3, tmp_path, monkeypatch):
    """node0 never gets the key list, so its trained task waits for it; cancelling the experiment
    ends that wait at once (not after the keys' time limit), and the round completes without it."""
    victim = mesh3.nodes[0]
    researcher = mesh3.researcher
    real_send = researcher.send
    monkeypatch.setattr(researcher, "send", lambda node, msg: None if (
        msg.type == "secagg.keys" and node == victim.peer.peer_id) else real_send(node, msg))
    exp = _sized_experiment(mesh3, tmp_path)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=_catch(exp.run)))
    runner.start()
    try:
        def mine(node):
            return [t for t in node.queue.list() if t.payload.get("experiment") == exp.id]

        assert wait_until(lambda: all(t.state == "done" for n in mesh3.nodes[1:] for t in mine(n)) and all(
            mine(n) for n in mesh3.nodes[1:]))
        # its task is running and its training is over: it waits for the keys
        assert wait_until(lambda: victim._running_task is not None and not victim.executor._lock.locked())
        exp.cancel()
        # well inside the 60 s the task would otherwise wait for its keys
        assert wait_until(lambda: [t.state for t in mine(victim)] == ["failed"], timeout=20)
    finally:
        runner.join(90)
    (entry,) = outcome["result"]
    assert entry["failed"]["node0"]["code"] == "cancelled"
    assert sorted(entry["nodes"]) == ["node1", "node2"]


def _gated_round(tmp_path, kill: int):
    """5 nodes, t = 3: start a secure round, stop ``kill`` nodes once the key exchange is done
    (their tasks are queued, training waits at the gate), then open the gate."""
    gate = tmp_path / "gate"
    with FederatedMesh(5, dead_after=2.0, node_config={"sandbox_read_paths": [str(tmp_path)]}) as mesh, \
            open(gate, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # closed: training waits for the lock
        _register(mesh)
        mesh.approve(GatedPlan)
        exp = Experiment(mesh.researcher, GatedPlan, ["blobs"], 1,
                         training_args={"gate": str(gate), "test_fraction": 0, "timeout": 60},
                         min_nodes=3, round_timeout=60, progress=False, secagg={"threshold": 3})
        g = {k: v.clone() for k, v in exp.global_state.items()}
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(result=_catch(exp.run)))
        runner.start()
        try:
            victims = mesh.nodes[:kill]
            assert wait_until(lambda: all(len(n.queue.list()) == 1 for n in mesh.nodes))  # all past the exchange
            for node in victims:
                node.stop()
            fcntl.flock(held, fcntl.LOCK_UN)  # open the gate
            runner.join(90)
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
            runner.join(90)
            mesh.nodes[:] = mesh.nodes[kill:]  # the stopped ones are not stopped twice
        survivors = SIZES[kill:]
        revealed = [any(r.event == "secagg.revealed" for r in n.audit.records()) for n in mesh.nodes]
        acknowledged = wait_until(lambda: all(len(n.outbox) == 0 for n in mesh.nodes))  # round over or not
        return outcome["result"], exp, g, survivors, revealed, acknowledged


def _catch(fn):
    try:
        return fn()
    except Exception as exc:  # handed to the test thread
        return exc


def test_two_of_five_nodes_die_after_the_key_exchange_and_the_round_completes(tmp_path):
    result, exp, g, survivors, revealed, acknowledged = _gated_round(tmp_path, kill=2)
    assert not isinstance(result, Exception), result
    (entry,) = result
    assert sorted(entry["nodes"]) == ["node2", "node3", "node4"]
    assert sorted(entry["dropped"] + list(entry["failed"])) == ["node0", "node1"]
    assert entry["samples"] == sum(survivors)
    expected = sum(n * n for n in survivors) / sum(survivors) / 100  # FedAvg of the 3 survivors only
    for name, value in exp.global_state.items():
        assert torch.allclose(value, g[name] + expected, atol=1e-5), name
    assert all(revealed) and acknowledged


def test_one_node_too_many_dies_and_the_round_fails_without_unmasking(tmp_path):
    result, _, _, _, revealed, acknowledged = _gated_round(tmp_path, kill=3)
    assert isinstance(result, RoundFailed)
    assert "2 of 5 nodes contributed, 3 needed" in result.message and "nothing was unmasked" in result.message
    assert not any(revealed)  # no survivor revealed a single share
    assert acknowledged  # their results were acknowledged all the same: nothing waits in an outbox


def test_a_node_restarted_before_its_masked_update_arrives_reports_it_lost_and_the_round_completes():
    """A masked vector lives in the node's memory until the researcher acknowledges it, as its
    round's secrets do: it never reaches the disk, and a node restarted before the researcher got
    it reports the result lost, so the round goes on without it."""
    from meshfl.node import Node

    with FederatedMesh(4, dead_after=2.0) as mesh:  # t = 3
        _register(mesh)
        mesh.approve(TinyPlan)
        victim = mesh.nodes[0]
        held: dict = {}

        def hold(dest, task_id, fields, tensors=None, mtype="train.done"):  # committed to the outbox, never sent
            held.update(task=task_id, on_disk=victim.blobs.exists(task_id),
                        in_outbox=victim.outbox.get(task_id) is not None, vector=victim.masked.tensors(task_id))
            held["event"].set()

        held["event"] = threading.Event()
        victim._send_result = hold
        exp = Experiment(mesh.researcher, TinyPlan, ["blobs"], 1,
                         training_args={"epochs": 1, "seed": 1, "test_fraction": 0}, min_nodes=3, round_timeout=60, progress=False, secagg=True)
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(result=_catch(exp.run)))
        runner.start()
        try:
            assert held["event"].wait(60)
            assert held["in_outbox"] and held["vector"] is not None and not held["on_disk"]
            victim.stop()
            mesh.nodes[0] = Node(victim.home.path).start()  # comes back, re-sends its outbox
        finally:
            runner.join(90)
        (entry,) = outcome["result"]
        assert entry["failed"]["node0"]["code"] == "result_lost"
        assert sorted(entry["nodes"]) == ["node1", "node2", "node3"]
        assert entry["samples"] == sum(SIZES[1:4])  # the survivors' alone
        assert wait_until(lambda: mesh.nodes[0].outbox.get(held["task"]) is None)  # the loss is acknowledged


def test_a_node_that_forces_secure_aggregation_trains_in_secure_rounds():
    with FederatedMesh(2, node_config={"force_secure_aggregation": True}) as mesh:
        _register(mesh)
        mesh.approve(TinyPlan)
        exp = Experiment(mesh.researcher, TinyPlan, ["blobs"], 2, min_nodes=2, round_timeout=60, progress=False,
                         secagg=True)
        history = exp.run()
        assert [len(h["nodes"]) for h in history] == [2, 2]
