"""The researcher looks at the hospitals' data before training, then trains on it standardised.

    python analyze.py [--work WORK] [--rounds 8]

Against the three nodes setup_nodes.sh started (WORK, default ./work):

1. Federated analytics, in the clear: per feature count, missing values, mean, std and extremes
   (rounded outward to a coarse grid: the hospitals do not release exact extremes), a histogram,
   the quartiles with their bound, class counts, and each hospital's own figures.
2. The same totals under secure aggregation: the researcher learns only the sums.
3. Federated preprocessing: `Experiment(..., preprocess=[Standardize()])` fits the global mean and
   standard deviation of every feature (by analytics, under secure aggregation), and every node
   standardises its patients with them before training `ScaledPlan`, a plain logistic regression
   that plain SGD cannot train on the raw features (they span five orders of magnitude).

No record leaves a hospital: only sums of them do.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from meshfl import Analytics, Experiment, Researcher, Standardize
from meshfl.analytics import preprocess
from meshfl.errors import MeshflError

from plan import ScaledPlan
from prepare_data import split
from train import TAGS, example_args, load_test_set, wait_for_approval

TRAINING_ARGS = {"epochs": 2, "batch_size": 16, "lr": 0.05, "test_fraction": 0.0}


def bars(histogram, width: int = 40) -> str:
    """A histogram as text, one line per bin ("suppressed" where a node withheld a small bin)."""
    top = max(histogram.counts + [1])
    lines = []
    for lo, hi, count, withheld in zip(histogram.edges, histogram.edges[1:], histogram.counts, histogram.suppressed):
        bar = "#" * round(width * count / top)
        note = f"  (+ suppressed on {withheld} node(s))" if withheld else ""
        lines.append(f"  [{lo:7.2f}, {hi:7.2f})  {count:4d} {bar}{note}")
    return "\n".join(lines)


def explore(researcher: Researcher) -> None:
    plain = Analytics(researcher, TAGS)
    summary = plain.describe()
    print("\nper feature, over all three hospitals (extremes marked ~ are coarsened by the nodes):")
    print(summary.table())
    print("\nhistogram of mean_radius, on bins the researcher chose:")
    print(bars(plain.histogram(["mean_radius"], bins=[float(edge) for edge in range(6, 31, 2)])["mean_radius"]))
    for q in plain.quantiles(["mean_radius"])["mean_radius"]:
        print(f"  quantile {q.q:.2f} of mean_radius: {q.value:.3f} +- {q.bound:.3f}")
    counts = plain.class_counts("target", levels=[0, 1])
    print(f"\nclass counts: malignant {counts[0]}, benign {counts[1]}")
    print("each hospital's own count and mean of mean_radius (plain mode only):")
    for name, stats in sorted(summary.per_node.items()):
        print(f"  {name}: {stats['mean_radius'].count} patients, mean {stats['mean_radius'].mean:.3f}")

    secure = Analytics(researcher, TAGS, secagg=True).describe(["mean_radius", "mean_area"])
    print("\nunder secure aggregation (the researcher sees only these totals, no hospital's own):")
    for column in ("mean_radius", "mean_area"):
        s, p = secure.columns[column], summary.columns[column]
        print(f"  {column}: count {s.count}, mean {s.mean:.6f} (in the clear {p.mean:.6f}), std {s.std:.6f}")
        if s.count != p.count or not math.isclose(s.mean, p.mean, rel_tol=1e-9):
            sys.exit("the secure totals differ from the plain ones")
    if secure.per_node:
        sys.exit("secure aggregation revealed a hospital's own figures")


def train_standardised(researcher: Researcher, work: Path, rounds: int, approval_timeout: float) -> float:
    nodes = researcher.nodes()
    for node in nodes:
        info = researcher.submit_plan(node, ScaledPlan)
    (work / "lab" / "plan.sha256").write_text(info["hash"] + "\n")
    print(f"\nplan ScaledPlan, sha256 {info['hash']}: waiting for the operators to approve it ...", flush=True)
    wait_for_approval(researcher, nodes, ScaledPlan, approval_timeout)

    columns, _, _ = split()
    x_test, y_test = load_test_set(work / "lab" / "data" / "test.csv")
    plan = ScaledPlan()

    def evaluate(model):  # the researcher scales its own patients with the same fitted statistics
        x = preprocess.apply(x_test.numpy(), columns, experiment.preprocess)
        return plan.evaluate(model, (torch.as_tensor(x, dtype=torch.float32), y_test))

    experiment = Experiment(
        researcher, ScaledPlan, tags=TAGS, rounds=rounds, training_args=TRAINING_ARGS, min_nodes=3,
        preprocess=[Standardize()], secagg=True, round_timeout=300, evaluate=evaluate, progress=False,
        on_round=lambda e: print(f"  round {e['round']:2d}  accuracy {e['global']['accuracy']:.4f}", flush=True),
    )
    history = experiment.run()
    (fitted,) = experiment.preprocess
    print(f"fitted before round 1: mean of mean_area {fitted['mean'][columns.index('mean_area')]:.2f}, "
          f"std {fitted['std'][columns.index('mean_area')]:.2f}")
    return history[-1]["global"]["accuracy"]


def main() -> None:
    args = example_args(__doc__.splitlines()[0], rounds=8)
    work = args.work.absolute()
    researcher = Researcher(work / "lab" / "home").start()
    try:
        researcher.wait_for_nodes(3, timeout=60)
        explore(researcher)
        accuracy = train_standardised(researcher, work, args.rounds, args.approval_timeout)
    except MeshflError as exc:
        sys.exit(f"analyze.py: {exc}")
    finally:
        researcher.close()
    print(f"held-out accuracy with federated standardisation: {accuracy:.4f}")
    if accuracy <= 0.9:
        sys.exit("accuracy did not pass 0.9")


if __name__ == "__main__":
    main()
