"""A scikit-learn model across the three hospitals: SGDClassifier, federated.

    python train_sklearn.py [--work WORK] [--rounds 10]

Each round every node builds `SGDLogisticPlan`'s estimator, loads the global coefficients, runs
`partial_fit` over its patients (standardised with the global mean and standard deviation that
federated analytics fitted before round 1) and sends back `coef_` and `intercept_`; FedAvg
averages them, weighted by samples. Only those numbers leave a hospital. The researcher scores
the global estimator on its own held-out patients with plain scikit-learn.
"""

from __future__ import annotations

import sys

from meshfl import Experiment, Researcher, Standardize
from meshfl.analytics import preprocess
from meshfl.errors import MeshflError

from prepare_data import split
from sklearn_plan import SGDLogisticPlan
from train import TAGS, example_args, load_test_set, wait_for_approval


def main() -> None:
    args = example_args(__doc__.splitlines()[0], rounds=10)
    work = args.work.absolute()
    columns, _, _ = split()
    x_test, y_test = load_test_set(work / "lab" / "data" / "test.csv")
    researcher = Researcher(work / "lab" / "home").start()
    try:
        nodes = researcher.wait_for_nodes(3, timeout=60)
        for node in nodes:
            info = researcher.submit_plan(node, SGDLogisticPlan)
        (work / "lab" / "plan.sha256").write_text(info["hash"] + "\n")
        print(f"\nplan SGDLogisticPlan, sha256 {info['hash']}: waiting for the operators ...", flush=True)
        wait_for_approval(researcher, nodes, SGDLogisticPlan, args.approval_timeout)

        def evaluate(model) -> dict:  # plain scikit-learn on the researcher's own patients
            x = preprocess.apply(x_test.numpy(), columns, experiment.preprocess)
            return {"accuracy": model.fitted().score(x, y_test.numpy())}

        experiment = Experiment(
            researcher, SGDLogisticPlan, tags=TAGS, rounds=args.rounds, model_args={"n_features": len(columns)},
            training_args={"epochs": 2}, min_nodes=3, preprocess=[Standardize()], round_timeout=300,
            evaluate=evaluate, progress=False,
            on_round=lambda e: print(f"  round {e['round']:2d}  accuracy {e['global']['accuracy']:.4f}", flush=True),
        )
        history = experiment.run()
    except MeshflError as exc:
        sys.exit(f"train_sklearn.py: {exc}")
    finally:
        researcher.close()
    estimator = experiment.model.fitted()
    top = sorted(zip(estimator.coef_[0], columns), key=lambda c: -abs(c[0]))[:3]
    print("largest coefficients: " + ", ".join(f"{name} {w:+.2f}" for w, name in top))
    accuracy = history[-1]["global"]["accuracy"]
    print(f"held-out accuracy of the federated SGDClassifier: {accuracy:.4f}")
    if accuracy <= 0.9:
        sys.exit("accuracy did not pass 0.9")


if __name__ == "__main__":
    main()
