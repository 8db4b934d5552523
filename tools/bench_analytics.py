#!/usr/bin/env python
"""Federated analytics benchmark: K node processes, each with rows x columns of float64 in a
.npy file, against one plain numpy process over the same files.

Computed both ways: per column count, mean and variance, a histogram of ``bins`` equal bins
over the column's range, and the covariance matrix. Federated: ``Analytics.describe(bins,
covariance=True)`` (two passes: the second shifted by the first's means), in the clear and
under secure aggregation, the nodes allowing exact extremes so that both sides bin alike.
Baseline: this process loads the K files and computes the same figures with numpy (mean, var,
cov, histogram on the concatenation). The nodes' workers are started (a query on another,
small dataset first), as a running node's are, but each timed run loads its file, as the
baseline does. Prints JSON: the wall times, ``ratio_over_numpy`` (plain federated ÷
numpy; goal <= 1.5), ``secagg_over_plain`` (goal <= 1.5) and ``max_rel_error`` of every
figure against numpy (goal <= 1e-9).

    python tools/bench_analytics.py                       # K = 8, 1e6 rows x 20 columns each
    python tools/bench_analytics.py --nodes 3 --rows 2e5  # smaller
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_round import setup, stop_nodes  # noqa: E402
from meshfl.analytics import Analytics  # noqa: E402
from meshfl.node._datasets import DatasetRegistry  # noqa: E402
from meshfl.privacy import PolicyTable  # noqa: E402
from meshfl.researcher import Researcher  # noqa: E402


def write_data(root: Path, k: int, rows: int, cols: int) -> list[Path]:
    """Node i's columns: shifted and scaled differently per node and column (non-IID), some with
    means far from 0 (the shifted second pass keeps their variances exact)."""
    paths = []
    for i in range(k):
        rng = np.random.default_rng(i)
        scale = 10.0 ** rng.uniform(-2, 3, size=cols)
        shift = rng.uniform(-1, 1, size=cols) * 10.0 ** rng.uniform(0, 4, size=cols)
        x = rng.standard_normal((rows, cols)) * scale + shift
        path = root / f"data{i}.npy"
        np.save(path, x)
        paths.append(path)
    return paths


def numpy_baseline(paths: list[Path], bins: int) -> tuple[float, dict]:
    start = time.perf_counter()
    x = np.concatenate([np.load(p) for p in paths])
    lo, hi = x.min(axis=0), x.max(axis=0)
    figures = {
        "count": np.full(x.shape[1], x.shape[0], dtype=float),
        "mean": x.mean(axis=0),
        "variance": x.var(axis=0, ddof=1),
        "histogram": np.stack([np.histogram(x[:, j], bins=bins, range=(lo[j], hi[j]))[0] for j in range(x.shape[1])]),
        "covariance": np.cov(x, rowvar=False),
    }
    return time.perf_counter() - start, figures


def federated(researcher: Researcher, columns: list[str], bins: int, secagg: bool) -> tuple[float, dict]:
    analytics = Analytics(researcher, ["bench-analytics"], secagg=secagg, timeout=1800)
    start = time.perf_counter()
    summary = analytics.describe(columns, bins=bins, covariance=True)
    seconds = time.perf_counter() - start
    stats = [summary.columns[c] for c in columns]
    return seconds, {
        "count": np.array([s.count for s in stats], dtype=float),
        "mean": np.array([s.mean for s in stats]),
        "variance": np.array([s.variance for s in stats]),
        "histogram": np.stack([summary.histograms[c].counts for c in columns]),
        "covariance": summary.covariance,
        "edges": [summary.histograms[c].edges for c in columns],
    }


def rel_errors(got: dict, want: dict, paths: list[Path]) -> dict[str, float]:
    """Per figure, the largest relative error of ``got`` against ``want``; histograms against
    numpy's on the edges ``got`` used (under secure aggregation the nodes release only coarse
    extremes, so the bins span a wider range than the data's own)."""
    want = {**want, "histogram": [np.zeros(len(e) - 1) for e in got["edges"]]}
    for p in paths:
        x = np.load(p)
        for j, edges in enumerate(got["edges"]):
            want["histogram"][j] += np.histogram(x[:, j], bins=edges)[0]
    out = {}
    for name, ref in want.items():
        ref = np.asarray(ref, dtype=float)
        err = np.abs(np.asarray(got[name], dtype=float) - ref) / np.maximum(np.abs(ref), 1e-300)
        out[name] = float(np.max(err))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=8, help="K node processes (default 8)")
    ap.add_argument("--rows", type=float, default=1e6, help="rows per node (default 1e6)")
    ap.add_argument("--columns", type=int, default=20, help="float columns (default 20)")
    ap.add_argument("--bins", type=int, default=64, help="histogram bins per column (default 64)")
    args = ap.parse_args()
    k, rows, cols = args.nodes, int(args.rows), args.columns
    root = Path(tempfile.mkdtemp(prefix="meshfl-bench-analytics-"))
    nodes = []
    try:
        paths = write_data(root, k, rows, cols)

        def prepare(i, home):
            DatasetRegistry(home.store, home.audit).add("big", ["bench-analytics"], "npy", paths[i])
            PolicyTable(home.store, home.audit).set("big", exact_extremes=True, min_cell=1)  # nothing suppressed

        r_path, nodes = setup(root, k, mutual=True, prepare=prepare)
        numpy_s, want = numpy_baseline(paths, args.bins)
        with Researcher(r_path, peer_options={"dead_after": 600.0}) as researcher:
            researcher.wait_for_nodes(k, timeout=180)
            columns = [str(j) for j in range(cols)]
            # A query on the small dataset first: every node's worker is started, as a running
            # node's is, and holds that one, so each timed run loads its .npy file as numpy does.
            warm = Analytics(researcher, ["bench"], timeout=600)
            warm.describe(["x"])
            plain_s, plain = federated(researcher, columns, args.bins, secagg=False)
            warm.describe(["x"])
            secure_s, secure = federated(researcher, columns, args.bins, secagg=True)
        errors = {"plain": rel_errors(plain, want, paths), "secagg": rel_errors(secure, want, paths)}
    finally:
        stop_nodes(nodes)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({
        "benchmark": "analytics",
        "nodes": k,
        "rows_per_node": rows,
        "columns": cols,
        "bins": args.bins,
        "numpy_s": round(numpy_s, 3),
        "federated_plain_s": round(plain_s, 3),
        "federated_secagg_s": round(secure_s, 3),
        "ratio_over_numpy": round(plain_s / numpy_s, 3),
        "secagg_over_plain": round(secure_s / plain_s, 3),
        "rel_error_plain": errors["plain"],
        "rel_error_secagg": errors["secagg"],
        "max_rel_error": max(v for e in errors.values() for v in e.values()),
        "goals": {"ratio_over_numpy": 1.5, "secagg_over_plain": 1.5, "max_rel_error": 1e-9},
    }, indent=2))


if __name__ == "__main__":
    main()
