"""SCAFFOLD, Krum / Multi-Krum and personalised layers on real in-process meshes (homes, LMDB,
CURVE, worker processes), with resumes and node restarts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.data import one_class_samples, write_blobs_csv, write_one_class_csv
from helpers.plans import PersonalPlan, SgdPlan, TinyPlan
from meshfl.aggregate import FedAvg, Krum, MultiKrum, Scaffold
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
