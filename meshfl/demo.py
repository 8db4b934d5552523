"""``meshfl demo``: three hospitals train one model on breast-cancer data they never share.

An in-process mesh (real homes, LMDB, CURVE links over ipc, one worker process per node) holds
the Wisconsin breast-cancer data shipped with scikit-learn, split non-IID: each hospital sees a
different mix of benign and malignant cases and a different number of patients. Each operator
registers its CSV file and approves the plan by hash; the researcher runs FedAvg rounds and
scores the global model on held-out patients after each round, next to the same model trained
centrally on the pooled data (what the hospitals avoid doing). With ``--secagg`` the researcher
sees only the masked sum of the hospitals' updates (docs/security.md).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ._demo_plan import BreastCancerPlan
from .errors import MeshflError, MissingDependency

EPOCHS_PER_ROUND = 2
TRAINING_ARGS = {"epochs": EPOCHS_PER_ROUND, "batch_size": 32, "lr": 1e-2, "test_fraction": 0.2}


def load_data(seed: int = 0):
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        raise MissingDependency("the demo needs scikit-learn, which", "examples") from None
    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in (0, 1):  # stratified 25 % held out
        idx = rng.permutation(np.flatnonzero(y == label))
        test[idx[: len(idx) // 4]] = True
    return x[~test], y[~test], x[test], y[test]


def split_non_iid(x, y, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Label skew: hospital i gets a share of each class that rises (malignant) or falls (benign)."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, n + 1, dtype=float)
    shares = {0: weights[::-1] / weights.sum(), 1: weights / weights.sum()}
    parts: list[list[int]] = [[] for _ in range(n)]
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == label))
        cuts = (np.cumsum(shares[label])[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].extend(chunk.tolist())
    return [(x[p], y[p]) for p in parts]


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["target"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")


def _accuracy(model, x, y) -> dict:
    plan = BreastCancerPlan()
    xt, yt = plan.preprocess(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))
    model.eval()
    return plan.evaluate(model, (xt, yt))


def train_centrally(x, y, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The same plan and optimiser on the pooled data: the upper bound federated training chases."""
    from .node._worker import default_train
    from .plans import DEFAULT_TRAINING_ARGS

    torch.manual_seed(seed)
    plan = BreastCancerPlan()
    model = plan.init_model()
    xt, yt = plan.preprocess(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))
    args = {**DEFAULT_TRAINING_ARGS, **TRAINING_ARGS, "epochs": epochs, "seed": seed}
    default_train(plan, model, (xt, yt), args, torch.device("cpu"))
    return model


def run_demo(nodes: int = 3, rounds: int = 10, secagg: bool = False, json_output: bool = False, seed: int = 0,
             plot: str | Path | None = None) -> dict:
    """Run the demo; with ``plot``, also draw its curves there (next to the centralized baseline)."""
    from .researcher import Experiment
    from .testing import FederatedMesh

    if nodes < 1 or rounds < 1:
        raise MeshflError("--nodes and --rounds must be at least 1", code="bad_argument")
    if plot is not None:
        from .researcher._plot import require_matplotlib

        require_matplotlib()  # before the training, not after it
    x_train, y_train, x_test, y_test = load_data(seed)
    names = [f"hospital-{chr(ord('a') + i)}" for i in range(nodes)] if nodes <= 26 else None
    say = (lambda *a: None) if json_output else (lambda *a: print(*a, flush=True))
    clear = "\r\x1b[K" if sys.stderr.isatty() and sys.stdout.isatty() else ""  # above the progress bar
    with tempfile.TemporaryDirectory(prefix="meshfl-demo-") as tmp, FederatedMesh(nodes, names=names, root=tmp) as mesh:
        for node, (x, y) in zip(mesh.nodes, split_non_iid(x_train, y_train, nodes, seed)):
            path = node.home.path / "breast_cancer.csv"  # the data stays in the hospital's home
            write_csv(path, x, y)
            node.datasets.add("breast-cancer", ["breast-cancer", "tabular"], "csv", path, target="target",
                              description="Wisconsin diagnostic breast cancer (demo split)")
            say(f"{node.name}: {len(y)} patients, {int(y.sum())} benign / {int(len(y) - y.sum())} malignant")
        plan_hash = mesh.approve(BreastCancerPlan)
        say(f"plan BreastCancerPlan approved on every node (sha256 {plan_hash[:16]}...)")
        torch.manual_seed(seed)  # the same initial model every run, with or without --secagg
        exp = Experiment(
            mesh.researcher, BreastCancerPlan, tags=["breast-cancer"], rounds=rounds,
            training_args={**TRAINING_ARGS, "seed": seed}, min_nodes=nodes, round_timeout=300,
            evaluate=lambda model: _accuracy(model, x_test, y_test), progress=None if not json_output else False,
            secagg=secagg,
            on_round=lambda e: say(
                f"{clear}round {e['round']:3d}  loss {e['global']['loss']:.4f}  "
                f"accuracy {e['global']['accuracy']:.4f}  ({e['seconds']:.2f}s)"
            ),
        )
        history = exp.run()
    central = _accuracy(train_centrally(x_train, y_train, EPOCHS_PER_ROUND * rounds, seed), x_test, y_test)
    result = {
        "nodes": nodes,
        "rounds": rounds,
        "secagg": secagg,
        "history": [
            {"round": e["round"], "loss": e["global"]["loss"], "accuracy": e["global"]["accuracy"],
             "samples": e["samples"], "seconds": e["seconds"]}
            for e in history
        ],
        "final_accuracy": history[-1]["global"]["accuracy"],
        "centralized_accuracy": central["accuracy"],
        "held_out_patients": int(len(y_test)),
    }
    say(f"federated accuracy {result['final_accuracy']:.4f}  |  centralized {result['centralized_accuracy']:.4f}")
    if plot is not None:
        history.plot(plot, baselines={"centralized": central},
                     title=f"meshfl demo: {nodes} hospitals, FedAvg{' + secure aggregation' if secagg else ''}")
        result["plot"] = str(plot)
        say(f"curves written to {plot}")
    return result


if __name__ == "__main__":  # python -m meshfl.demo
    run_demo()
    sys.exit(0)
