"""Write each hospital's share of the Wisconsin breast-cancer data as a CSV file.

    python prepare_data.py OUT_DIR            # every share and the researcher's test set
    python prepare_data.py OUT_DIR --site 0   # only site 0's share, as OUT_DIR/site0.csv
    python prepare_data.py OUT_DIR --test     # only the researcher's held-out OUT_DIR/test.csv

The 569 patients shipped with scikit-learn are split once, with a fixed seed:

* 25 % (stratified) is held out as ``test.csv``: the researcher's own labelled patients, used
  only to score the global model after each round. It never goes to any node.
* the rest is split non-IID across the hospitals: site 0 sees mostly malignant cases, the
  last site mostly benign ones, and they differ in size (label skew, as with real referrals).

Every CSV has a header row, the 30 feature columns and a ``target`` column (0 = malignant,
1 = benign, as in scikit-learn).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

SITES = 3
SEED = 0


def split(seed: int = SEED, sites: int = SITES):
    data = load_breast_cancer()
    x, y = data.data, data.target
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in (0, 1):  # stratified 25 % held out for the researcher
        idx = rng.permutation(np.flatnonzero(y == label))
        test[idx[: len(idx) // 4]] = True
    x_train, y_train = x[~test], y[~test]
    # label skew: site i's share of class 0 (malignant) falls with i, its share of class 1 rises
    weights = np.arange(1, sites + 1, dtype=float)
    shares = {0: weights[::-1] / weights.sum(), 1: weights / weights.sum()}
    parts: list[list[int]] = [[] for _ in range(sites)]
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(y_train == label))
        cuts = (np.cumsum(shares[label])[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].extend(chunk.tolist())
    shards = [(x_train[p], y_train[p]) for p in parts]
    columns = [name.replace(" ", "_") for name in data.feature_names]
    return columns, shards, (x[test], y[test])


def write_csv(path: Path, columns: list[str], x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join(columns + ["target"])
    table = np.column_stack([x, y])
    fmt = ["%.6g"] * x.shape[1] + ["%d"]
    np.savetxt(path, table, delimiter=",", header=header, comments="", fmt=fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the CSV files to")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--site", type=int, choices=range(SITES), help="write only this site's share")
    only.add_argument("--test", action="store_true", help="write only the held-out test set")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    columns, shards, (x_test, y_test) = split()
    for i, (x, y) in enumerate(shards):
        if args.test or (args.site is not None and i != args.site):
            continue
        path = args.out / f"site{i}.csv"
        write_csv(path, columns, x, y)
        print(f"{path}: {len(y)} patients, {int((y == 1).sum())} benign / {int((y == 0).sum())} malignant")
    if args.site is None:
        path = args.out / "test.csv"
        write_csv(path, columns, x_test, y_test)
        print(f"{path}: {len(y_test)} held-out patients for the researcher")


if __name__ == "__main__":
    main()
