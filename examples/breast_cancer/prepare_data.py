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

from meshfl.demo import load_data, split_non_iid

SITES = 3
SEED = 0


def split(seed: int = SEED, sites: int = SITES):
    """The same split as `meshfl demo` (its helpers are reused, not copied)."""
    x_train, y_train, x_test, y_test = load_data(seed)
    columns = [name.replace(" ", "_") for name in load_breast_cancer().feature_names]
    return columns, split_non_iid(x_train, y_train, sites, seed), (x_test, y_test)


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
