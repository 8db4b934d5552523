"""The researcher's script: send the plan for review, wait for approval, train with FedAvg.

    python train.py [--work WORK] [--rounds 10]

WORK is the folder setup_nodes.sh filled (default ./work): this script uses only the
researcher's home (WORK/lab/home) and the researcher's own held-out patients
(WORK/lab/data/test.csv). The hospitals' data stays with the nodes; only model weights and
metrics come back.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from meshfl.aggregate import FedAvg
from meshfl.errors import MeshflError
from meshfl.researcher import Experiment, Researcher

from plan import BreastCancerPlan  # the plan module next to this script (see plan.py)

SITES = ("hospital-a", "hospital-b", "hospital-c")
TAGS = ["breast-cancer"]
TRAINING_ARGS = {"epochs": 2, "batch_size": 32, "lr": 1e-2, "test_fraction": 0.2}


def load_test_set(path: Path):
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    return torch.as_tensor(table[:, :-1], dtype=torch.float32), torch.as_tensor(table[:, -1], dtype=torch.int64)


def held_out_scorer(path: Path):
    """Score a global model on the researcher's own patients (the same preprocessing as the nodes)."""
    plan = BreastCancerPlan()
    x, y = plan.preprocess(*load_test_set(path))

    def evaluate(model: torch.nn.Module) -> dict:
        model.eval()  # BatchNorm: use the (federated) running statistics
        return plan.evaluate(model, (x, y))

    return evaluate, len(y)


def wait_for_approval(researcher: Researcher, nodes: list[str], plan, timeout: float) -> None:
    """Poll every node until its operator approved ``plan``; fail if one rejects it."""
    waiting = set(nodes)
    deadline = time.monotonic() + timeout
    while waiting:
        for node in sorted(waiting):
            status = researcher.plan_status(node, plan)["status"]
            if status == "approved":
                print(f"  {researcher.node_name(node)}: approved", flush=True)
                waiting.discard(node)
            elif status == "rejected":
                sys.exit(f"{researcher.node_name(node)} rejected the plan")
        if waiting and time.monotonic() > deadline:
            names = ", ".join(researcher.node_name(n) for n in sorted(waiting))
            sys.exit(f"no approval from {names} within {timeout:g}s")
        if waiting:
            time.sleep(0.5)


def example_args(description: str, rounds: int) -> argparse.Namespace:
    """The options every researcher script of this example takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", type=Path, default=Path("work"), help="the folder setup_nodes.sh made")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--approval-timeout", type=float, default=600.0, help="seconds to wait for operators")
    return parser.parse_args()


def main() -> None:
    args = example_args("Train the breast-cancer model across three hospitals.", rounds=10)
    work = args.work.absolute()
    evaluate, n_test = held_out_scorer(work / "lab" / "data" / "test.csv")

    researcher = Researcher(work / "lab" / "home").start()
    try:
        print(f"researcher listening on {researcher.endpoint}; waiting for 3 nodes ...", flush=True)
        nodes = researcher.wait_for_nodes(3, timeout=60)

        # What the nodes offer: the public part of each registration (never the file's path).
        for node, datasets in researcher.search(TAGS).items():
            for d in datasets:
                print(f"  {researcher.node_name(node)}: dataset {d['name']}, {d['samples']} samples, "
                      f"shape {d['shape']}, target {d['target']!r}")

        # 1. Send the plan to each node's operator. It lands there as "pending"; nothing runs yet.
        for node in nodes:
            info = researcher.submit_plan(node, BreastCancerPlan)
            print(f"  {researcher.node_name(node)}: plan {info['hash'][:16]}... {info['status']}")
        digest = info["hash"]  # the same source gives the same hash on every node
        (work / "lab" / "plan.sha256").write_text(digest + "\n")

        # 2. Each operator reviews the source and approves that exact hash. Tell them what to run
        #    (and give them the hash by another channel, so they can check it is yours).
        print(f"\nplan BreastCancerPlan, sha256 {digest}\nask each hospital's operator to run:")
        for site in SITES:
            home = work / site / "home"
            print(f"  meshfl plan show {digest[:16]} --home {home}")
            print(f"  meshfl plan approve {digest[:16]} --home {home}")
        print("waiting for approvals ...", flush=True)
        wait_for_approval(researcher, nodes, BreastCancerPlan, args.approval_timeout)

        # 3. Federated training: every round, each node trains 2 epochs on its share, FedAvg
        #    averages the models (weighted by samples), and we score the result on test.csv.
        print(f"\ntraining {args.rounds} rounds of FedAvg; accuracy on {n_test} held-out patients:", flush=True)
        experiment = Experiment(
            researcher, BreastCancerPlan, tags=TAGS, rounds=args.rounds,
            training_args=TRAINING_ARGS, aggregator=FedAvg(),
            min_nodes=3,            # a round counts only if all three hospitals contributed
            round_timeout=300,
            evaluate=evaluate,      # history[i]["global"] = this function's result
            progress=False,
            on_round=lambda e: print(
                f"  round {e['round']:2d}  loss {e['global']['loss']:.4f}  accuracy {e['global']['accuracy']:.4f}"
                f"  ({e['samples']} samples, {e['seconds']:.2f}s)", flush=True),
        )
        history = experiment.run()
    except MeshflError as exc:
        sys.exit(f"train.py: {exc}")
    finally:
        researcher.close()

    print(f"\nexperiment {experiment.id}: per-round history")
    for entry in history:
        local = ", ".join(
            f"{name} {info['metrics'].get('test_accuracy', float('nan')):.3f}" for name, info in sorted(entry["nodes"].items())
        )
        print(f"  round {entry['round']:2d}: global accuracy {entry['global']['accuracy']:.4f}; "
              f"local test accuracy {local}; failed {entry['failed'] or '-'}; dropped {entry['dropped'] or '-'}")
    final = history[-1]["global"]["accuracy"]
    print(f"final held-out accuracy: {final:.4f}")
    if final <= 0.9:
        sys.exit("accuracy did not pass 0.9")


if __name__ == "__main__":
    main()
