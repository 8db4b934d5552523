"""Three wineries learn to tell three grape cultivars apart, without pooling their measurements.

    python examples/wine/train.py [--rounds 30] [--nodes 3]

Everything runs in this one process: ``meshfl.testing.FederatedMesh`` starts a researcher and the
nodes with temporary homes, real LMDB stores, CURVE-encrypted links over ipc sockets and one
training worker process per node - the same code as separate machines, minus the set-up.

It differs from the breast-cancer example in the data (scikit-learn's wine data: 178 samples,
13 chemical measurements, 3 classes), the file format (NumPy .npz), the model (an MLP with
dropout) and the server optimizer (FedAdam instead of FedAvg).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from meshfl.aggregate import FedAdam
from meshfl.plans import TorchTrainingPlan
from meshfl.researcher import Experiment
from meshfl.testing import FederatedMesh


# The plan: its class source and this file's top-level imports (above) travel to the nodes,
# which approve exactly that text by hash. Keep the imports light and the plan self-contained.
class WinePlan(TorchTrainingPlan):
    task = "classification"

    def init_model(self, features: int = 13, hidden: int = 32, classes: int = 3, dropout: float = 0.2):
        return nn.Sequential(
            # BatchNorm's running statistics are buffers: FedAdam averages them (it steps only
            # the parameters), which gives a global normalisation no node had to reveal.
            nn.BatchNorm1d(features),
            nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, classes),
        )

    def preprocess(self, x, y):
        return torch.log1p(x), y  # every measurement is positive; proline runs to ~1700, hue to ~1.7


def load_wine_split(nodes: int, seed: int = 0):
    """A stratified 30 % held out for the researcher, the rest split with label skew (Dirichlet 0.5)."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    x, y = load_wine(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    while True:  # draw until every node holds at least 15 samples (nodes hide smaller datasets)
        parts = [[] for _ in range(nodes)]
        for label in np.unique(y_train):
            idx = rng.permutation(np.flatnonzero(y_train == label))
            cuts = (np.cumsum(rng.dirichlet([0.5] * nodes))[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(map(len, parts)) >= 15:
            return [(x_train[p], y_train[p]) for p in parts], (x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    shards, (x_test, y_test) = load_wine_split(args.nodes)

    # The researcher scores every new global model on its own held-out samples.
    plan = WinePlan()
    xt, yt = plan.preprocess(torch.as_tensor(x_test, dtype=torch.float32), torch.as_tensor(y_test))

    def evaluate(model):
        model.eval()  # no dropout; BatchNorm uses the federated running statistics
        return plan.evaluate(model, (xt, yt))

    with tempfile.TemporaryDirectory(prefix="meshfl-wine-") as tmp, \
            FederatedMesh(args.nodes, names=[f"winery-{i}" for i in range(args.nodes)], root=tmp) as mesh:
        # Each operator registers its file (npz with arrays x and y) under a tag researchers search by.
        for node, (x, y) in zip(mesh.nodes, shards):
            path = Path(tmp) / f"{node.name}.npz"
            np.savez(path, x=x.astype(np.float32), y=y)
            node.datasets.add("wine", ["wine", "tabular"], "npz", path, description="wine cultivars")
            print(f"{node.name}: {len(y)} samples, per class {np.bincount(y, minlength=3).tolist()}")

        # ... and approves the plan's hash, as `meshfl plan approve HASH` would.
        digest = mesh.approve(WinePlan)
        print(f"WinePlan approved on every node (sha256 {digest[:16]}...)")

        experiment = Experiment(
            mesh.researcher, WinePlan, tags=["wine"], rounds=args.rounds,
            model_args={"hidden": 32, "dropout": 0.2},          # passed to init_model on every node
            training_args={"epochs": 1, "batch_size": 16, "lr": 5e-3, "test_fraction": 0.2},
            aggregator=FedAdam(server_lr=0.02, beta1=0.9, beta2=0.99, tau=1e-3),
            min_nodes=args.nodes, round_timeout=120,
            evaluate=evaluate, progress=False,
        )
        history = experiment.run()

    # One history entry per round: the global score from `evaluate`, and what each node reported
    # about its own local test split (test_accuracy) after training.
    print(f"{'round':>5}  {'held-out acc':>12}  {'loss':>6}  local test accuracy per node")
    for entry in history:
        local = "  ".join(f"{n}={i['metrics']['test_accuracy']:.2f}" for n, i in sorted(entry["nodes"].items()))
        print(f"{entry['round']:>5}  {entry['global']['accuracy']:>12.3f}  {entry['global']['loss']:>6.3f}  {local}")
    print(f"final held-out accuracy {history[-1]['global']['accuracy']:.3f} on {len(y_test)} samples")


if __name__ == "__main__":
    main()
