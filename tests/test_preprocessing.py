"""Federated preprocessing: global statistics fitted before round 1, applied alike on every node."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.plans import SGDLinearPlan
from meshfl.analytics import ImputeMean, MinMaxScale, OneHot, Standardize, preprocess
from meshfl.demo import load_data, split_non_iid, write_csv
from meshfl.node._worker import default_train
from meshfl.plans import DEFAULT_TRAINING_ARGS
from meshfl.researcher import Experiment
from meshfl.testing import FederatedMesh

pytestmark = pytest.mark.timeout(240)
ARGS = {"epochs": 2, "batch_size": 16, "lr": 0.05, "test_fraction": 0.0, "seed": 0}
ROUNDS = 8


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        out = model(torch.as_tensor(x, dtype=torch.float32))
    return float((out.argmax(1).numpy() == y).mean())


@pytest.fixture(scope="module")
def hospitals():
    """Breast-cancer data (features from 0.001 to 4000 in scale) split non-IID over 3 nodes."""
    x_train, y_train, x_test, y_test = load_data(0)
    with FederatedMesh(3) as mesh:
        for node, (x, y) in zip(mesh.nodes, split_non_iid(x_train, y_train, 3, 0)):
            write_csv(node.home.path / "bc.csv", x, y)
            node.datasets.add("bc", ["bc"], "csv", node.home.path / "bc.csv", target="target")
        mesh.approve(SGDLinearPlan)
        yield mesh, (x_train, y_train, x_test, y_test)


def _federated(mesh, steps, secagg=False):
    torch.manual_seed(0)
    exp = Experiment(mesh.researcher, SGDLinearPlan, ["bc"], ROUNDS, training_args=ARGS, min_nodes=3,
                     round_timeout=120, progress=False, preprocess=steps, secagg=secagg)
    exp.run()
    return exp


def test_federated_standardisation_matches_central_training_and_beats_unscaled(hospitals):
    mesh, (x_train, y_train, x_test, y_test) = hospitals
    names = [f"f{i}" for i in range(30)]
    scaled = _federated(mesh, [Standardize()])
    (fitted,) = scaled.preprocess
    # the global statistics are those of the pooled training data (which no one pooled)
    assert np.allclose(fitted["mean"], x_train.mean(axis=0), rtol=1e-9)
    assert np.allclose(fitted["std"], x_train.std(axis=0, ddof=1), rtol=1e-6)
    federated = _accuracy(scaled.model, preprocess.apply(x_test, names, scaled.preprocess), y_test)

    torch.manual_seed(0)  # the same model and optimiser, centrally, on globally standardised data
    central = SGDLinearPlan().init_model()
    pooled = torch.as_tensor(preprocess.apply(x_train, names, scaled.preprocess), dtype=torch.float32)
    default_train(SGDLinearPlan(), central, (pooled, torch.as_tensor(y_train)),
                  {**DEFAULT_TRAINING_ARGS, **ARGS, "epochs": ARGS["epochs"] * ROUNDS}, torch.device("cpu"))
    central_accuracy = _accuracy(central, preprocess.apply(x_test, names, scaled.preprocess), y_test)

    raw = _federated(mesh, [])
    unscaled = _accuracy(raw.model, x_test, y_test)
    assert abs(federated - central_accuracy) <= 0.01, (federated, central_accuracy)
    assert federated >= unscaled + 0.05, (federated, unscaled)


def test_fitted_preprocessing_is_checkpointed_and_reused_by_a_resume(hospitals):
    mesh, _ = hospitals
    start = len(mesh.nodes[0].audit)
    exp = Experiment(mesh.researcher, SGDLinearPlan, ["bc"], 1, training_args=ARGS, min_nodes=3,
                     round_timeout=120, progress=False, preprocess=[MinMaxScale(columns=["f0", "f3"]), Standardize()],
                     secagg=True)
    exp.run()
    minmax, standard = exp.preprocess
    assert minmax["columns"] == ["f0", "f3"] and standard["step"] == "standardize"
    passes = [r for r in mesh.nodes[0].audit.records(start=start) if r.event == "task.accepted"
              and r.fields.get("kind") == "preprocessing"]
    assert passes and all(r.fields["secagg"] for r in passes)  # fitted under secure aggregation
    resumed = Experiment.resume(mesh.researcher, exp.id, progress=False, rounds=2)
    assert resumed.preprocess == exp.preprocess
    before = len(mesh.nodes[0].audit.records())
    resumed.run()
    fitted_again = [r for r in mesh.nodes[0].audit.records(start=before) if r.fields.get("kind") == "preprocessing"]
    assert fitted_again == []  # no new statistics were asked for


def test_steps_apply_in_order_and_one_hot_appends_its_levels():
    x = np.array([[1.0, np.nan], [3.0, 4.0], [5.0, 8.0]])
    text = {"site": np.array(["a", "b", "a"], dtype=object)}
    fitted = [{"step": "impute", "columns": ["v"], "mean": [6.0]},
              {"step": "standardize", "columns": ["u", "v"], "mean": [3.0, 6.0], "std": [2.0, 2.0]},
              {"step": "onehot", "column": "site", "levels": ["a", "b", "c"]}]
    out = preprocess.apply(x, ["u", "v"], preprocess.check(fitted), text)
    assert out.tolist() == [[-1.0, 0.0, 1, 0, 0], [0.0, -1.0, 0, 1, 0], [1.0, 1.0, 1, 0, 0]]
    assert preprocess.output_width(["u", "v"], fitted) == 5
    for bad in ([{"step": "rotate"}], [{"step": "standardize", "columns": ["u"], "mean": [1.0]}],
                [{"step": "onehot", "column": "site", "levels": []}], {"step": "impute"}):
        with pytest.raises(Exception) as caught:
            preprocess.check(bad)
        assert caught.value.code == "bad_preprocess"
    assert ImputeMean().columns is None and OneHot("site").levels is None
