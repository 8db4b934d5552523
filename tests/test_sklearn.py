"""scikit-learn plans end to end on in-process meshes (homes, LMDB, CURVE, sandboxed workers):
the federated model is exactly the sample-weighted average of what scikit-learn learns on each
node, under secure aggregation too, resumes exactly, and a node without the extra says so."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from helpers.data import register_blobs, write_one_class_csv
from helpers.sklearn_plans import LinearRegressionPlan, LogisticPlan, ThreeClassPerceptron, UndeclaredClassesPlan
from meshfl.aggregate import Scaffold
from meshfl.errors import ConfigError, MeshflError
from meshfl.node._datasets import load_dataset
from meshfl.plans import DEFAULT_TRAINING_ARGS, load_plan_class, plan_source
from meshfl.privacy import ClientDP, DPSGD
from meshfl.researcher import Experiment, RoundFailed
from meshfl.testing import FederatedMesh

pytestmark = pytest.mark.timeout(240)

ARGS = {"epochs": 2, "seed": 3}


@pytest.fixture(scope="module")
def mesh():
    with FederatedMesh(3) as m:
        register_blobs(m, n=50)
        for i, node in enumerate(m.nodes):  # a regression target: y = x . w + 0.5, no noise
            rng = np.random.default_rng(i)
            x = rng.normal(size=(40, 3))
            y = x @ np.array([1.0, -2.0, 0.5]) + 0.5
            np.savetxt(node.home.path / "linear.csv", np.column_stack([x, y]), delimiter=",",
                       header="a,b,c,target", comments="", fmt="%.8g")
            node.datasets.add("linear", ["linear"], "csv", node.home.path / "linear.csv", target="target")
            path = write_one_class_csv(node.home.path / "one_class.csv", label=i, seed=i)
            node.datasets.add("one-class", ["three"], "csv", path, target="target")
        for plan in (LogisticPlan, ThreeClassPerceptron, LinearRegressionPlan):
            m.approve(plan)
        yield m


def _experiment(mesh, plan, tags, rounds, experiment_id, n_features=4, **kw):
    return Experiment(mesh.researcher, plan, tags, rounds, model_args={"n_features": n_features},
                      training_args=kw.pop("training_args", ARGS), min_nodes=3, round_timeout=60, progress=False,
                      experiment_id=experiment_id, **kw)


def _local_round(node, plan_cls, dataset: str, start: dict) -> tuple[dict, int]:
    """What one node's round computes, redone here with scikit-learn directly: its data, the
    plan's split, ``partial_fit`` from ``start``."""
    plan = plan_cls()
    x, y = load_dataset(node.datasets.get(dataset))
    args = {**DEFAULT_TRAINING_ARGS, **ARGS}
    (xt, yt), _ = plan.split(x, y, args["test_fraction"], args["seed"])
    est = plan.init_estimator().set_params(random_state=args["seed"] + 1)  # round 1's seed
    est.coef_, est.intercept_ = (start[k].double().numpy().copy() for k in ("coef", "intercept"))
    for _ in range(args["epochs"]):
        est.partial_fit(xt.double().numpy(), yt.numpy(), classes=np.array(plan.classes))
    return {"coef": est.coef_, "intercept": est.intercept_}, xt.shape[0]


def test_a_round_is_the_sample_weighted_average_of_each_nodes_partial_fit(mesh):
    exp = _experiment(mesh, LogisticPlan, ["blobs"], 1, "exp-sk-exact")
    start = {k: v.clone() for k, v in exp.global_state.items()}
    assert {k: tuple(v.shape) for k, v in start.items()} == {"coef": (1, 4), "intercept": (1,)}
    exp.run()
    results = [_local_round(node, LogisticPlan, "blobs", start) for node in mesh.nodes]
    total = sum(n for _, n in results)
    for key in ("coef", "intercept"):
        expected = sum(r[key] * n for r, n in results) / total
        np.testing.assert_allclose(exp.global_state[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    entry = exp.history[-1]
    assert entry["samples"] == total and set(entry["nodes"]) == {"node0", "node1", "node2"}
    assert all("test_accuracy" in n["metrics"] and "test_loss" in n["metrics"] for n in entry["nodes"].values())


def test_classifier_perceptron_and_regressor_learn_across_nodes(mesh):
    logistic = _experiment(mesh, LogisticPlan, ["blobs"], 5, "exp-sk-logistic", training_args={"epochs": 5})
    logistic.run()
    assert logistic.history[-1]["global"]["test_accuracy"] >= 0.9
    # Each node holds one class only; the averaged one-vs-rest perceptron still separates all three.
    perceptron = _experiment(mesh, ThreeClassPerceptron, ["three"], 3, "exp-sk-perceptron")
    assert tuple(perceptron.global_state["coef"].shape) == (3, 4)
    perceptron.run()
    x = torch.cat([load_dataset(n.datasets.get("one-class"))[0] for n in mesh.nodes]).double().numpy()
    y = np.repeat([0, 1, 2], 60)
    assert perceptron.model.fitted().score(x, y) >= 0.9  # the researcher's copy predicts
    regression = _experiment(mesh, LinearRegressionPlan, ["linear"], 6, "exp-sk-linear", n_features=3,
                             training_args={"epochs": 5, "seed": 0})
    regression.run()
    losses = [e["global"]["test_loss"] for e in regression.history]
    assert losses[-1] < 0.05 * losses[0], losses
    np.testing.assert_allclose(regression.global_state["coef"].numpy(), [1.0, -2.0, 0.5], atol=0.1)


def test_secure_aggregation_gives_the_plain_model(mesh):
    plain = _experiment(mesh, LogisticPlan, ["blobs"], 2, "exp-sk-plain")
    plain.run()
    secure = _experiment(mesh, LogisticPlan, ["blobs"], 2, "exp-sk-secure", secagg=True)
    secure.run()
    assert all("secagg" in entry for entry in secure.history)
    for key, value in plain.global_state.items():
        assert torch.allclose(secure.global_state[key], value, atol=1e-4), key


def test_resume_after_a_researcher_crash_gives_the_straight_run(mesh):
    straight = _experiment(mesh, LogisticPlan, ["blobs"], 3, "exp-sk-straight")
    straight.run()
    crashed = _experiment(mesh, LogisticPlan, ["blobs"], 3, "exp-sk-crash")
    checkpoint = crashed._checkpoint

    def crash():
        if crashed.round == 2:
            raise RuntimeError("the researcher dies before its round-2 checkpoint")
        checkpoint()

    crashed._checkpoint = crash
    with pytest.raises(RuntimeError):
        crashed.run()
    resumed = Experiment.resume(mesh.researcher, "exp-sk-crash", progress=False)
    assert resumed.round == 1
    resumed.run()
    assert resumed.round == 3
    for key, value in straight.global_state.items():
        assert torch.allclose(resumed.global_state[key], value, atol=1e-6), key  # nodes may answer in another order


def test_what_a_scikit_learn_plan_cannot_do_is_refused_up_front(mesh):
    with pytest.raises(ConfigError) as info:
        _experiment(mesh, LogisticPlan, ["blobs"], 1, "exp-sk-dpsgd", dp=DPSGD(1.0))
    assert info.value.code == "dp_incompatible" and "client-level" in info.value.message
    with pytest.raises(ConfigError) as info:
        _experiment(mesh, LogisticPlan, ["blobs"], 1, "exp-sk-scaffold", aggregator=Scaffold())
    assert info.value.code == "bad_plan" and "Scaffold" in info.value.message
    with pytest.raises(MeshflError) as info:
        _experiment(mesh, UndeclaredClassesPlan, ["blobs"], 1, "exp-sk-classes")
    assert info.value.code == "bad_plan" and "classes" in info.value.message
    # Client-level DP works on any plan: the node clips and noises the update itself.
    private = _experiment(mesh, LogisticPlan, ["blobs"], 1, "exp-sk-clientdp", dp=ClientDP(0.5, clip=1.0))
    private.run()
    assert all(n["privacy"]["epsilon"] > 0 for n in private.history[-1]["nodes"].values())  # each node debited
    assert private.global_state["coef"].abs().sum() > 0


def test_a_side_without_scikit_learn_gets_missing_dependency(tmp_path, monkeypatch):
    # The researcher's side: loading the plan names the extra.
    for name in ("sklearn", "sklearn.linear_model"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MeshflError) as info:
        load_plan_class(plan_source(LogisticPlan), "LogisticPlan")
    assert info.value.code == "missing_dependency" and "meshfl[sklearn]" in info.value.message
    monkeypatch.undo()
    # A node whose Python lacks it: the round fails with the node's coded answer.
    shim = tmp_path / "shim" / "sklearn"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'sklearn'\", name='sklearn')\n")
    monkeypatch.setenv("PYTHONPATH", f"{shim.parent}:{':'.join(sys.path[1:])}")
    with FederatedMesh(1) as m:
        register_blobs(m, plan=LogisticPlan)
        exp = Experiment(m.researcher, LogisticPlan, ["blobs"], 1, model_args={"n_features": 4}, round_timeout=60,
                         progress=False)
        with pytest.raises(RoundFailed) as failed:
            exp.run()
    (error,) = failed.value.details["failed"].values()
    assert error["code"] == "missing_dependency" and "meshfl[sklearn]" in error["message"]
