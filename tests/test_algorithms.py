"""SCAFFOLD, Krum / Multi-Krum and personalised layers on real in-process meshes (homes, LMDB,
CURVE, worker processes), with resumes and node restarts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.data import one_class_samples, register_blobs, write_blobs_csv, write_one_class_csv
from helpers.plans import PersonalPlan, SgdPlan, TinyPlan
from meshfl.aggregate import FedAvg, Krum, Median, MultiKrum, Scaffold, TrimmedMean
from meshfl.errors import ConfigError
from meshfl.node import Node
from meshfl.researcher import Experiment, RoundFailed
from meshfl.store.blobs import read_pack
from meshfl.testing import FederatedMesh

pytestmark = pytest.mark.timeout(240)

NON_IID = {"steps": 30, "lr": 0.1, "batch_size": 16, "test_fraction": 0.0}


def _restart(mesh, i: int) -> None:
    """Stop node ``i`` and start it again from its home, as an operator's restart would."""
    path = mesh.nodes[i].home.path
    mesh.nodes[i].stop()
    mesh.nodes[i] = Node(path).start()
    assert mesh.researcher.peer.wait_online([mesh.nodes[i].peer.peer_id], 30)


def _run(mesh, plan, rounds, aggregator, tags, training_args, experiment_id, **kw):
    torch.manual_seed(0)  # the same initial model for every experiment compared
    exp = Experiment(mesh.researcher, plan, tags, rounds, training_args=training_args, aggregator=aggregator,
                     min_nodes=len(mesh.nodes), round_timeout=60, progress=False, experiment_id=experiment_id, **kw)
    exp.run()
    return exp


def _crash_after_the_nodes_committed(exp, rnd: int) -> None:
    """The researcher dies in round ``rnd`` after every node committed its result and state,
    before its own checkpoint: the resumed round must start from the nodes' earlier state."""
    checkpoint = exp._checkpoint

    def crash():
        if exp.round == rnd:
            raise RuntimeError("the researcher dies before its checkpoint")
        checkpoint()

    exp._checkpoint = crash
    with pytest.raises(RuntimeError):
        exp.run()


def _kept(node, experiment_id: str) -> tuple[list, dict]:
    """What a node keeps for an experiment: the (round, pack) list and its newest pack's tensors."""
    (record,) = [v for k, v in node.state._table.items() if k.endswith("/" + experiment_id)]
    return record["packs"], read_pack(node.blobs.path(record["packs"][-1][1]))


def _assert_same_model(a, b, atol=1e-6):
    for name, value in a.global_state.items():
        assert torch.allclose(value, b.global_state[name], atol=atol), name


# ----------------------------------------------------------------------------- SCAFFOLD


@pytest.fixture(scope="module")
def non_iid():
    """Three nodes, each holding one class only; the researcher scores on all three classes."""
    with FederatedMesh(3) as m:
        for i, node in enumerate(m.nodes):
            path = write_one_class_csv(node.home.path / "one_class.csv", label=i, seed=i)
            node.datasets.add("one-class", ["non-iid"], "csv", path, target="target")
        m.approve(SgdPlan)
        held_out = [one_class_samples(c, 100, seed=10 + c) for c in range(3)]
        m.x_test = torch.tensor(np.concatenate([x for x, _ in held_out]), dtype=torch.float32)
        m.y_test = torch.tensor(np.concatenate([y for _, y in held_out]))
        yield m


def _pooled(mesh):
    def evaluate(model):
        with torch.no_grad():
            out = model(mesh.x_test)
            return {"loss": torch.nn.functional.cross_entropy(out, mesh.y_test).item(),
                    "accuracy": (out.argmax(1) == mesh.y_test).float().mean().item()}
    return evaluate


def test_scaffold_beats_fedavg_on_a_strongly_non_iid_split(non_iid):
    runs = {name: _run(non_iid, SgdPlan, 5, agg, ["non-iid"], NON_IID, f"exp-{name}", evaluate=_pooled(non_iid))
            for name, agg in (("fedavg", FedAvg()), ("scaffold", Scaffold()))}
    fedavg, scaffold = ([e["global"]["loss"] for e in runs[k].history] for k in ("fedavg", "scaffold"))
    assert scaffold[0] == pytest.approx(fedavg[0], rel=1e-5)  # round 1: c = c_i = 0, so SCAFFOLD is FedAvg
    assert scaffold[-1] < 0.8 * fedavg[-1], (fedavg, scaffold)  # then the drift correction pays
    # Each node keeps its control variate for the experiment, in its own store.
    for node in non_iid.nodes:
        packs, kept = _kept(node, "exp-scaffold")
        assert [r for r, _ in packs] == [4, 5]  # the last round's, and the one it started from
        assert set(kept) == {"scaffold.ci/weight", "scaffold.ci/bias"} and kept["scaffold.ci/weight"].abs().sum() > 0


def test_scaffold_resumes_exactly_across_a_researcher_crash_and_node_restarts(non_iid):
    straight = _run(non_iid, SgdPlan, 3, Scaffold(), ["non-iid"], NON_IID, "exp-scaffold-straight")
    torch.manual_seed(0)
    crashed = Experiment(non_iid.researcher, SgdPlan, ["non-iid"], 3, training_args=NON_IID, aggregator=Scaffold(),
                         min_nodes=3, round_timeout=60, progress=False, experiment_id="exp-scaffold-crash")
    _crash_after_the_nodes_committed(crashed, 3)
    assert [[r for r, _ in _kept(node, "exp-scaffold-crash")[0]] for node in non_iid.nodes] == [[2, 3]] * 3
    for i in range(3):  # every node restarts: their control variates come back from their stores
        _restart(non_iid, i)
    resumed = Experiment.resume(non_iid.researcher, "exp-scaffold-crash", progress=False)
    assert resumed.round == 2 and torch.count_nonzero(resumed.aggregator.state_dict()["tensors"]["c/weight"])
    resumed.run()  # round 3 again, from each node's round-2 control variate, not its round-3 one
    _assert_same_model(resumed, straight)
    for node in non_iid.nodes:
        assert torch.allclose(_kept(node, "exp-scaffold-crash")[1]["scaffold.ci/weight"],
                              _kept(node, "exp-scaffold-straight")[1]["scaffold.ci/weight"], atol=1e-6)


def test_scaffold_under_secure_aggregation_matches_the_plain_run(non_iid):
    plain = _run(non_iid, SgdPlan, 3, Scaffold(), ["non-iid"], NON_IID, "exp-scaffold-plain")
    secure = _run(non_iid, SgdPlan, 3, Scaffold(), ["non-iid"], NON_IID, "exp-scaffold-secure", secagg=True)
    assert all("secagg" in entry for entry in secure.history)
    _assert_same_model(secure, plain, atol=1e-4)  # the fixed-point error of three rounds
    c_plain, c_secure = (e.aggregator.state_dict()["tensors"]["c/weight"] for e in (plain, secure))
    assert torch.allclose(c_secure, c_plain, atol=1e-4) and c_plain.abs().sum() > 0


# ----------------------------------------------------------------------------- Krum

ATTACKS = {  # what a Byzantine node sends instead of its trained model
    "sign-flipped": lambda t: -10 * t,
    "scaled noise": lambda t: t + 50 * torch.randn(t.shape, generator=torch.Generator().manual_seed(7)),
}


@pytest.fixture(scope="module")
def byzantine():
    """Five nodes on the same task; node4 runs modified code that tampers with what it sends."""
    with FederatedMesh(5) as m:
        register_blobs(m, plan=TinyPlan)
        honest_result = m.nodes[4]._result
        m.attack = None
        m.nodes[4]._result = lambda task_id: {k: m.attack(v) if v.is_floating_point() else v
                                              for k, v in honest_result(task_id).items()}
        x = write_blobs_csv(m.root / "held_out.csv", n=200, seed=100)
        data = np.loadtxt(x, delimiter=",", skiprows=1)
        m.x_test = torch.tensor(data[:, :-1], dtype=torch.float32)
        m.y_test = torch.tensor(data[:, -1]).long()
        yield m


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_krum_resists_a_byzantine_node_that_wrecks_fedavg(byzantine, attack):
    byzantine.attack = ATTACKS[attack]
    args = {"epochs": 5, "lr": 0.05}
    accuracy, loss = {}, {}
    for agg in (FedAvg(), Krum(f=1), MultiKrum(f=1)):
        exp = _run(byzantine, TinyPlan, 3, agg, ["blobs"], args, f"exp-{agg.name}-{attack[:4]}", evaluate=_pooled(byzantine))
        accuracy[agg.name] = exp.history[-1]["global"]["accuracy"]
        loss[agg.name] = exp.history[-1]["global"]["loss"]
        if agg.name != "fedavg":  # the tampered update is never the one kept
            assert all("node4" not in e["aggregator"]["selected"] for e in exp.history)
            assert len(exp.history[-1]["aggregator"]["selected"]) == (1 if agg.name == "krum" else 4)
    assert accuracy["krum"] > 0.9 and accuracy["multi_krum"] > 0.9 and accuracy["fedavg"] < 0.8, accuracy
    assert loss["fedavg"] > 10 * max(loss["krum"], loss["multi_krum"]), loss


def test_multi_krum_resumes_exactly_and_needs_2f_plus_3_nodes(byzantine):
    byzantine.attack = ATTACKS["sign-flipped"]
    args = {"epochs": 2, "lr": 0.05}
    straight = _run(byzantine, TinyPlan, 3, MultiKrum(f=1), ["blobs"], args, "exp-mk-straight")
    torch.manual_seed(0)
    crashed = Experiment(byzantine.researcher, TinyPlan, ["blobs"], 3, training_args=args, aggregator=MultiKrum(f=1),
                         min_nodes=5, round_timeout=60, progress=False, experiment_id="exp-mk-crash")
    _crash_after_the_nodes_committed(crashed, 3)
    resumed = Experiment.resume(byzantine.researcher, "exp-mk-crash", progress=False)
    assert resumed.aggregator.config() == {"name": "multi_krum", "f": 1, "m": None}
    resumed.run()
    _assert_same_model(resumed, straight)
    # Four nodes cannot outvote f = 2: the round fails with the reason, nothing is half-applied.
    with pytest.raises(RoundFailed) as info:
        _run(byzantine, TinyPlan, 1, Krum(f=2), ["blobs"], args, "exp-krum-f2")
    assert info.value.details["cause"] == "too_few_updates" and "at least 7" in info.value.message


def test_secure_aggregation_refuses_aggregators_that_need_each_update(byzantine):
    for agg in (TrimmedMean(), Median(), Krum(f=1), MultiKrum()):
        with pytest.raises(ConfigError) as info:
            Experiment(byzantine.researcher, TinyPlan, ["blobs"], 1, aggregator=agg, secagg=True)
        assert info.value.code == "secagg_incompatible"
        assert type(agg).__name__ in info.value.message and "only their sum" in info.value.message


# ----------------------------------------------------------------------------- personalised layers


@pytest.fixture(scope="module")
def personal():
    with FederatedMesh(2) as m:
        yield register_blobs(m, plan=PersonalPlan)


def _spy(mesh) -> tuple[set, set]:
    """The names of every tensor the researcher sends in a train request and receives in a result."""
    sent, received = set(), set()
    request, handle = mesh.researcher.request, mesh.researcher.peer._handler

    def spy_request(node, msg, timeout):
        if msg.type == "train":
            sent.update(msg.tensors)
        return request(node, msg, timeout)

    def spy_handle(msg):
        if msg.type in ("train.done", "result.chunk"):
            received.update(msg.tensors)
        return handle(msg)

    mesh.researcher.request, mesh.researcher.peer._handler = spy_request, spy_handle
    return sent, received


def test_personalised_layers_stay_on_their_nodes_across_rounds_restarts_and_a_resume(personal):
    sent, received = _spy(personal)
    torch.manual_seed(0)
    exp = Experiment(personal.researcher, PersonalPlan, ["blobs"], 3, min_nodes=2, round_timeout=60, progress=False,
                     experiment_id="exp-personal")
    assert exp.local_layers == {"norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                                "norm.num_batches_tracked", "head.weight", "head.bias"}
    start = {k: v.clone() for k, v in exp.global_state.items()}
    _crash_after_the_nodes_committed(exp, 3)
    for i in range(2):
        _restart(personal, i)
    resumed = Experiment.resume(personal.researcher, "exp-personal", progress=False)
    resumed.rounds = 4
    resumed.run()  # round 3 again (from each node's round-2 layers), then round 4
    # Nothing personal ever travelled, either way.
    assert sent == received == {"body.weight", "body.bias"}
    # The shared body was averaged four times; the researcher's copy of the local layers never moved.
    for name, value in resumed.global_state.items():
        assert torch.allclose(value, start[name] + 4 if name.startswith("body.") else start[name]), name
    # Each node's own layers started fresh from the plan's init under the round-1 seed and count
    # exactly four rounds: kept across rounds and restarts, and the re-run round counted once.
    torch.default_generator.manual_seed(1)
    fresh = PersonalPlan().init_model().state_dict()
    for node in personal.nodes:
        packs, kept = _kept(node, "exp-personal")
        assert [r for r, _ in packs] == [3, 4]
        assert set(kept) == {f"local/{k}" for k in exp.local_layers}
        for key in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
            assert torch.allclose(kept[f"local/{key}"], fresh[key] + 4), key
        assert torch.equal(kept["local/norm.running_mean"], fresh["norm.running_mean"])  # buffers: no forward ran


def test_a_request_that_carries_a_local_layer_is_refused_by_the_node(personal):
    exp = Experiment(personal.researcher, PersonalPlan, ["blobs"], 1, min_nodes=1, round_timeout=60, progress=False)
    exp.local_layers = set()  # a researcher that ignores the plan's local_layers
    with pytest.raises(RoundFailed) as info:
        exp.run()
    errors = info.value.details["failed"].values()
    assert {e["code"] for e in errors} == {"bad_request"} and all("keeps on the node" in e["message"] for e in errors)


def test_a_local_layer_that_names_nothing_is_a_plan_error(personal):
    from meshfl.plans import plan_source

    source = plan_source(PersonalPlan).replace('("norm", "head")', '("norm", "tail")')
    with pytest.raises(ConfigError) as info:
        Experiment(personal.researcher, source, ["blobs"], 1, plan_class="PersonalPlan")
    assert info.value.code == "bad_plan" and "'tail'" in info.value.message
